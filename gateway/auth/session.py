"""Browser sessions: the verified token, encrypted into an ``HttpOnly`` cookie.

The cookie holds the token itself (and its expiry), encrypted and authenticated with Fernet
(AES-128-CBC + HMAC-SHA256) under a key derived from ``GATEWAY_SESSION_SECRET``. It is not an identity
on its own: every request that carries it has the token inside verified again by the
:class:`~gateway.auth.jwt.Authenticator`, exactly like a Bearer token, so revoking keys, expiry and
claim checks apply to browser sessions too. A cookie never outlives its token.

A session opened by the OpenID Connect login (:mod:`gateway.auth.oidc_login`) also holds the IdP's
refresh token and ID token (for the end-session ``id_token_hint``); such a cookie lasts as long as the
refresh token, and the access token inside is refreshed before it expires. Together they can exceed a
browser's 4 KB cookie limit, so a cookie value is split into at most :data:`MAX_CHUNKS` cookies
(``COOKIE_NAME``, ``COOKIE_NAME_1``, ...), joined again before decryption: a missing, stale or
reordered chunk fails authentication like any altered cookie.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass

import jwt
import orjson
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

COOKIE_NAME = "mlflow_gateway_session"
# Browsers keep cookies up to 4096 bytes (name, value and attributes together).
MAX_COOKIE_VALUE_BYTES = 3800
# A session is split into at most this many cookies (about 15 KB in all).
MAX_CHUNKS = 4
# A session never lasts longer than this, whatever the token's own expiry.
MAX_SESSION_SECONDS = 12 * 3600
_KDF_INFO = b"mlflow-tenant-gateway session cookie v1"


class InvalidSession(Exception):
    """The cookie is not one this gateway issued, or it has expired."""


@dataclass(frozen=True)
class Session:
    """What a session cookie holds: the token and the time it stops being valid.

    ``refresh_token`` and ``id_token`` come from an OIDC login (``None`` for a pasted token).
    """

    token: str
    expires_at: int
    refresh_token: str | None = None
    id_token: str | None = None


def _fernet_key(secret: str) -> bytes:
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KDF_INFO).derive(secret.encode("utf-8"))
    return base64.urlsafe_b64encode(derived)


def chunk_name(index: int) -> str:
    """The name of a session cookie's ``index``-th chunk (the first one is :data:`COOKIE_NAME`)."""
    return COOKIE_NAME if index == 0 else f"{COOKIE_NAME}_{index}"


def split_value(value: str) -> list[str]:
    """A cookie value cut into chunks of at most :data:`MAX_COOKIE_VALUE_BYTES` (one when it fits)."""
    size = MAX_COOKIE_VALUE_BYTES
    return [value[start : start + size] for start in range(0, len(value), size)] or [""]


def token_expiry(token: str) -> int:
    """The ``exp`` of a token the authenticator has already verified (it requires ``exp``)."""
    claims = jwt.decode(token, options={"verify_signature": False})
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise InvalidSession("the token has no usable 'exp' claim")
    return int(exp)


class SessionCodec:
    """Seal a verified token into a cookie value, and open such a value again."""

    def __init__(self, secret: str, *, clock: Callable[[], float] = time.time) -> None:
        self._fernet = Fernet(_fernet_key(secret))
        self._clock = clock

    def seal(self, token: str) -> Session | None:
        """The session for a verified ``token``; ``None`` when it has already expired."""
        now = int(self._clock())
        expires_at = min(token_expiry(token), now + MAX_SESSION_SECONDS)
        if expires_at <= now:
            return None
        return Session(token=token, expires_at=expires_at)

    def encode(self, session: Session) -> str:
        """The cookie value: the session encrypted and authenticated."""
        data: dict[str, str | int] = {"t": session.token, "e": session.expires_at}
        if session.refresh_token is not None:
            data["r"] = session.refresh_token
        if session.id_token is not None:
            data["i"] = session.id_token
        payload = orjson.dumps(data)
        return self._fernet.encrypt_at_time(payload, int(self._clock())).decode("ascii")

    def decode(self, value: str) -> Session:
        """The session in a cookie value; :class:`InvalidSession` if forged, altered or expired."""
        if len(value) > MAX_COOKIE_VALUE_BYTES * MAX_CHUNKS:
            raise InvalidSession("session cookie is too large")
        now = int(self._clock())
        try:
            payload = self._fernet.decrypt_at_time(value.encode("ascii"), MAX_SESSION_SECONDS, now)
            data = orjson.loads(payload)
        except (InvalidToken, UnicodeEncodeError, orjson.JSONDecodeError):
            raise InvalidSession("session cookie is not valid") from None
        if not isinstance(data, dict):
            raise InvalidSession("session cookie is not valid")
        token, expires_at = data.get("t"), data.get("e")
        if not isinstance(token, str) or not isinstance(expires_at, int):
            raise InvalidSession("session cookie is not valid")
        if expires_at <= now:
            raise InvalidSession("session has expired")
        refresh_token, id_token = data.get("r"), data.get("i")
        if not isinstance(refresh_token, str | None) or not isinstance(id_token, str | None):
            raise InvalidSession("session cookie is not valid")
        return Session(token=token, expires_at=expires_at, refresh_token=refresh_token, id_token=id_token)
