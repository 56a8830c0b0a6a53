"""The browser's OpenID Connect login: authorization code with PKCE, refresh, RP-initiated logout.

The gateway is a confidential client (``GATEWAY_OIDC_CLIENT_SECRET``) or a public one (PKCE only) of
the provider at ``GATEWAY_OIDC_ISSUER``, whose tokens it already verifies by discovery and JWKS:

1. :meth:`OidcLogin.start` builds the authorization request from the discovery document
   (``response_type=code``, PKCE ``S256``, random ``state`` and ``nonce``). The state, nonce, PKCE
   verifier and the relative path to return to travel in a short-lived encrypted cookie (Fernet, a key
   derived from the session secret with its own label, so it can never pass for a session cookie): no
   server-side state, any replica can finish the login.
2. :meth:`OidcLogin.finish` checks ``state`` against the cookie (constant time; a state is accepted
   once), exchanges the code with the verifier, verifies the ID token (signature by the issuer's JWKS,
   ``iss``, ``aud``/``azp``, ``exp``, ``nonce``) and picks the credential the session keeps: the access
   token when it is a JWT, otherwise (opaque access tokens) the ID token. Either way the
   :class:`~gateway.auth.jwt.Authenticator` must accept it exactly like a Bearer token, and does again
   on every request.
3. :meth:`OidcLogin.refresh` renews the access token shortly before it expires (one refresh per
   refresh token in flight, shared by concurrent requests; the answer is reused briefly, so a burst of
   UI calls carrying the same old cookie spends the refresh token once).
4. :meth:`OidcLogin.end_session_url` is where logout sends the browser when the provider has an
   ``end_session_endpoint``.

Every failure is an :class:`OidcLoginError` with a status (400 for a bad or replayed callback, 401
for refused codes and tokens, 503 when the provider cannot be reached) and a message safe to show.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
import jwt
import orjson
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.auth.jwt import Authenticator
from gateway.auth.keys import MAX_DOCUMENT_BYTES, Fetcher, KeySource, OidcKeys, fetch_json
from gateway.auth.session import MAX_SESSION_SECONDS, InvalidSession, Session, token_expiry
from gateway.errors import GatewayError
from gateway.settings import Settings

logger = logging.getLogger("gateway.auth")

LOGIN_START_PATH = "/oidc/login"
CALLBACK_PATH = "/oidc/callback"
STATE_COOKIE = "mlflow_gateway_oidc"
# A login must come back from the provider within this time.
STATE_TTL_SECONDS = 600
# The access token is refreshed when it has less than this left.
REFRESH_MARGIN_SECONDS = 30
# A refresh's answer is reused this long for requests that still carry the old cookie.
REFRESH_REUSE_SECONDS = 30.0
TOKEN_TIMEOUT_SECONDS = 10.0
_CACHE_SIZE = 10_000
_DISCOVERY_RETRY_SECONDS = 10.0
_REFRESHED_SIZE = 1_000  # each entry holds a session's tokens (a few KB)
_STATE_KDF_INFO = b"mlflow-tenant-gateway oidc login state v1"
_RETURN_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@/%?#")
_NOT_RETURN_PATHS = ("/oidc/", "/login", "/logout")


class OidcLoginError(Exception):
    """A login, refresh or logout step failed; ``message`` is safe to show to the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ProviderMetadata:
    """What the gateway uses from the provider's discovery document."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    end_session_endpoint: str | None
    token_auth_methods: tuple[str, ...]


@dataclass(frozen=True)
class PendingLogin:
    """What the state cookie carries between the authorization request and the callback."""

    state: str
    nonce: str
    code_verifier: str
    return_to: str


# Posts a form to the token endpoint: (url, form fields, basic-auth pair) -> (HTTP status, JSON object).
TokenPoster = Callable[[str, Mapping[str, str], "tuple[str, str] | None"], Awaitable[tuple[int, Any]]]


async def post_token_request(url: str, form: Mapping[str, str], basic: tuple[str, str] | None) -> tuple[int, Any]:
    """POST ``form`` to a token endpoint with a timeout and a size cap; the status and the JSON answer."""
    timeout = aiohttp.ClientTimeout(total=TOKEN_TIMEOUT_SECONDS)
    headers = {"Accept": "application/json"}
    if basic is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode("ascii")
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(url, data=dict(form), headers=headers, allow_redirects=False) as response,
    ):
        body = await response.content.read(MAX_DOCUMENT_BYTES + 1)
        if len(body) > MAX_DOCUMENT_BYTES:
            raise OSError(f"{url} answered more than {MAX_DOCUMENT_BYTES} bytes")
        try:
            return response.status, orjson.loads(body)
        except orjson.JSONDecodeError:
            return response.status, None


def safe_return_path(value: str | None) -> str:
    """The relative path to return to after login; :class:`OidcLoginError` (400) for anything else.

    Only a same-site absolute path is accepted (``/`` followed by URL characters, never ``//`` or a
    backslash, which browsers read as another host), and never the login routes themselves: an
    attacker cannot turn the login into an open redirect.
    """
    if value is None or value == "":
        return "/"
    if (
        len(value) > 512
        or not value.startswith("/")
        or value.startswith("//")
        or not set(value) <= _RETURN_PATH_CHARS
        or value.startswith(_NOT_RETURN_PATHS)
    ):
        raise OidcLoginError(400, "The page to return to after login must be a path on this gateway")
    return value


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _state_fernet(secret: str) -> Fernet:
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_STATE_KDF_INFO).derive(secret.encode())
    return Fernet(base64.urlsafe_b64encode(derived))


def _is_jws(token: Any) -> bool:
    return isinstance(token, str) and token.count(".") == 2


def _unverified_claims(token: str | None) -> dict[str, Any]:
    """Claims of a token this gateway verified before (or only used for a cookie lifetime)."""
    if not token:
        return {}
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return {}
    return claims if isinstance(claims, dict) else {}


class OidcLogin:
    """The authorization-code flow of one gateway client at one provider (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        authenticator: Authenticator,
        *,
        fetch: Fetcher = fetch_json,
        post: TokenPoster = post_token_request,
        clock: Callable[[], float] = time.time,
    ) -> None:
        assert settings.oidc_client_id and settings.oidc_issuer and settings.oidc_redirect_url
        assert settings.session_secret
        self.client_id = settings.oidc_client_id
        self.client_secret = settings.oidc_client_secret
        self.issuer = settings.oidc_issuer.rstrip("/")
        self.redirect_url = settings.oidc_redirect_url
        self.scopes = " ".join(settings.oidc_scopes)
        self.provider_name = settings.oidc_provider_name or urlsplit(self.issuer).netloc
        issuer = urlsplit(self.issuer)
        # Where logout may send the browser (the end-session endpoint is on the issuer's origin with
        # the common providers: Keycloak, Okta, Auth0, Entra ID).
        self.end_session_origin = f"{issuer.scheme}://{issuer.netloc}"
        redirect = urlsplit(self.redirect_url)
        self.post_logout_url = f"{redirect.scheme}://{redirect.netloc}{settings.root_path}/login"
        self.authenticator = authenticator
        self._fetch = fetch
        self._post = post
        self._clock = clock
        self._discovery_ttl = float(settings.jwks_cache_seconds)
        self._metadata: ProviderMetadata | None = None
        self._metadata_at = 0.0
        self._metadata_lock = asyncio.Lock()
        self._state = _state_fernet(settings.session_secret)
        self._used_states: OrderedDict[bytes, float] = OrderedDict()
        self._refreshing: dict[bytes, asyncio.Task[Session]] = {}
        self._refreshed: OrderedDict[bytes, tuple[Session, float]] = OrderedDict()
        self._keys, self._algorithms, self._leeway = self._id_token_keys(settings, fetch)

    def _id_token_keys(self, settings: Settings, fetch: Fetcher) -> tuple[KeySource, list[str], int]:
        """The issuer's key source the authenticator already uses (one JWKS cache), its algorithms, leeway."""
        for verifier in self.authenticator.verifiers:
            if verifier.config.oidc_issuer and verifier.config.oidc_issuer.rstrip("/") == self.issuer:
                config = verifier.config
                return verifier.keys, list(config.algorithms), config.leeway_seconds
        keys = OidcKeys(self.issuer, ttl_seconds=float(settings.jwks_cache_seconds), fetch=fetch)
        return keys, list(settings.jwt_algorithms or ("RS256",)), settings.jwt_leeway_seconds

    # -- discovery ------------------------------------------------------------------------------

    async def metadata(self) -> ProviderMetadata:
        """The provider's endpoints, from its discovery document (cached; refetched after the TTL)."""
        now = self._clock()
        if self._metadata is not None and now - self._metadata_at < self._discovery_ttl:
            return self._metadata
        async with self._metadata_lock:
            if self._metadata is not None and self._clock() - self._metadata_at < self._discovery_ttl:
                return self._metadata
            url = f"{self.issuer}/.well-known/openid-configuration"
            try:
                document = await self._fetch(url)
                metadata = self._parse_metadata(document)
            except (TimeoutError, OSError, ValueError, aiohttp.ClientError) as exc:
                logger.warning("OIDC discovery at %s failed: %s", url, exc)
                if self._metadata is not None:
                    # Keep working with what we know while the provider is away; try again in a while.
                    self._metadata_at = self._clock() - self._discovery_ttl + _DISCOVERY_RETRY_SECONDS
                    return self._metadata
                raise OidcLoginError(503, "The identity provider cannot be reached; try again shortly") from None
            self._metadata, self._metadata_at = metadata, self._clock()
            return metadata

    def _parse_metadata(self, document: Any) -> ProviderMetadata:
        if not isinstance(document, dict) or str(document.get("issuer", "")).rstrip("/") != self.issuer:
            raise ValueError("the discovery document names another issuer")
        scheme = urlsplit(self.issuer).scheme

        def endpoint(name: str, *, required: bool = True) -> str | None:
            value = document.get(name)
            if value is None and not required:
                return None
            if not isinstance(value, str) or urlsplit(value).scheme not in ("https", scheme) or "#" in value:
                raise ValueError(f"the discovery document has no usable {name}")
            return value

        methods = document.get("token_endpoint_auth_methods_supported")
        if not isinstance(methods, list) or not methods:
            methods = ["client_secret_basic"]  # the default of OpenID Connect Discovery 1.0 §3
        authorization, token = endpoint("authorization_endpoint"), endpoint("token_endpoint")
        assert authorization is not None and token is not None
        return ProviderMetadata(
            issuer=str(document["issuer"]),
            authorization_endpoint=authorization,
            token_endpoint=token,
            end_session_endpoint=endpoint("end_session_endpoint", required=False),
            token_auth_methods=tuple(str(method) for method in methods),
        )

    # -- 1. the authorization request -----------------------------------------------------------

    async def start(self, return_to: str | None) -> tuple[str, str]:
        """The provider's authorization URL and the encrypted state cookie value for this login."""
        pending = PendingLogin(
            state=secrets.token_urlsafe(32),
            nonce=secrets.token_urlsafe(32),
            code_verifier=secrets.token_urlsafe(48),  # 64 characters: RFC 7636 wants 43 to 128
            return_to=safe_return_path(return_to),
        )
        metadata = await self.metadata()
        challenge = _b64url(hashlib.sha256(pending.code_verifier.encode("ascii")).digest())
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self.client_id,
                "redirect_uri": self.redirect_url,
                "scope": self.scopes,
                "state": pending.state,
                "nonce": pending.nonce,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            },
            quote_via=quote,
        )
        separator = "&" if "?" in metadata.authorization_endpoint else "?"
        payload = orjson.dumps(
            {"s": pending.state, "n": pending.nonce, "v": pending.code_verifier, "r": pending.return_to}
        )
        cookie = self._state.encrypt_at_time(payload, int(self._clock())).decode("ascii")
        return f"{metadata.authorization_endpoint}{separator}{query}", cookie

    def _pending(self, cookie: str | None) -> PendingLogin:
        if not cookie:
            raise OidcLoginError(400, "No login is in progress in this browser (or it took too long): start again")
        try:
            data = orjson.loads(self._state.decrypt_at_time(cookie.encode("ascii"), STATE_TTL_SECONDS, self._now()))
            return PendingLogin(state=data["s"], nonce=data["n"], code_verifier=data["v"], return_to=data["r"])
        except (InvalidToken, UnicodeEncodeError, orjson.JSONDecodeError, KeyError, TypeError):
            raise OidcLoginError(400, "The login has expired or is not valid: start again") from None

    def _now(self) -> int:
        return int(self._clock())

    # -- 2. the callback ------------------------------------------------------------------------

    async def finish(self, query: Mapping[str, list[str]], state_cookie: str | None) -> tuple[Session, str]:
        """Check the callback, exchange the code, verify the tokens: the new session and where to go."""
        pending = self._pending(state_cookie)
        states = query.get("state", [])
        if len(states) != 1 or not hmac.compare_digest(states[0].encode(), pending.state.encode()):
            raise OidcLoginError(400, "The login's state does not match this browser's: start again")
        self._consume_state(pending.state)
        errors = query.get("error", [])
        if errors:
            description = (query.get("error_description") or [""])[0][:300]
            detail = f"{errors[0][:100]}" + (f" ({description})" if description else "")
            raise OidcLoginError(400, f"The identity provider did not log you in: {detail}")
        codes = query.get("code", [])
        if len(codes) != 1 or not codes[0]:
            raise OidcLoginError(400, "The identity provider's answer has no authorization code")
        metadata = await self.metadata()
        answer = await self._token_request(
            metadata,
            {
                "grant_type": "authorization_code",
                "code": codes[0],
                "redirect_uri": self.redirect_url,
                "code_verifier": pending.code_verifier,
            },
        )
        id_token = answer.get("id_token")
        if not isinstance(id_token, str):
            raise OidcLoginError(401, "The identity provider returned no ID token")
        claims = await self._verify_id_token(metadata, id_token)
        nonce = claims.get("nonce")
        if not isinstance(nonce, str) or not hmac.compare_digest(nonce.encode(), pending.nonce.encode()):
            raise OidcLoginError(401, "The ID token's nonce does not match this login")
        session = await self._session(answer, id_token=id_token)
        return session, pending.return_to

    def _consume_state(self, state: str) -> None:
        """Accept each state once per process (the cookie is also cleared; codes are one-time at the IdP)."""
        key = hashlib.sha256(state.encode()).digest()
        now = self._clock()
        while self._used_states and next(iter(self._used_states.values())) <= now:
            self._used_states.popitem(last=False)
        if key in self._used_states:
            raise OidcLoginError(400, "This login was already completed: start again")
        self._used_states[key] = now + STATE_TTL_SECONDS
        if len(self._used_states) > _CACHE_SIZE:
            self._used_states.popitem(last=False)

    async def _token_request(self, metadata: ProviderMetadata, form: dict[str, str]) -> dict[str, Any]:
        """POST to the token endpoint with the client's authentication; the JSON answer (never logged)."""
        basic: tuple[str, str] | None = None
        if self.client_secret is None:
            form["client_id"] = self.client_id
        elif "client_secret_basic" in metadata.token_auth_methods:
            # RFC 6749 §2.3.1: both parts form-encoded before Basic.
            basic = (quote(self.client_id, safe=""), quote(self.client_secret, safe=""))
        else:
            form["client_id"], form["client_secret"] = self.client_id, self.client_secret
        try:
            status, answer = await self._post(metadata.token_endpoint, form, basic)
        except (TimeoutError, OSError, aiohttp.ClientError) as exc:
            logger.warning("OIDC token request to %s failed: %s", metadata.token_endpoint, exc)
            raise OidcLoginError(503, "The identity provider cannot be reached; try again shortly") from None
        if status != 200 or not isinstance(answer, dict):
            code = answer.get("error") if isinstance(answer, dict) else None
            reason = str(code)[:100] if isinstance(code, str) else f"HTTP {status}"
            raise OidcLoginError(401, f"The identity provider refused the token request ({reason})")
        if not isinstance(answer.get("access_token"), str):
            raise OidcLoginError(401, "The identity provider returned no access token")
        return answer

    async def _verify_id_token(self, metadata: ProviderMetadata, id_token: str) -> dict[str, Any]:
        """Signature (issuer's JWKS), ``iss``, ``aud`` (and ``azp``), ``exp``, ``iat``, ``sub``."""
        try:
            header = jwt.get_unverified_header(id_token)
            key = await self._keys.key_for(header.get("kid") if isinstance(header.get("kid"), str) else None)
            claims: dict[str, Any] = jwt.decode(
                id_token,
                key,
                algorithms=self._algorithms,
                audience=self.client_id,
                issuer=metadata.issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except GatewayError as error:
            raise OidcLoginError(401, f"The ID token cannot be verified: {error.message}") from None
        except jwt.InvalidTokenError as exc:
            raise OidcLoginError(401, f"The ID token is not valid ({type(exc).__name__})") from None
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if len(audiences) > 1 and claims.get("azp") != self.client_id:
            raise OidcLoginError(401, "The ID token was issued to another client (azp)")
        return claims

    async def _session(
        self, answer: dict[str, Any], *, id_token: str | None, previous: Session | None = None
    ) -> Session:
        """The session for a token answer: the credential the authenticator accepts, and its lifetime."""
        access_token: str = answer["access_token"]
        credential = access_token if _is_jws(access_token) else id_token
        if credential is None:
            raise OidcLoginError(401, "The access token is opaque and there is no ID token to use instead")
        try:
            await self.authenticator.authenticate(credential)
        except GatewayError as error:
            raise OidcLoginError(
                error.status, f"The gateway does not accept this login's token: {error.message}"
            ) from None
        refresh_token = answer.get("refresh_token")
        if not isinstance(refresh_token, str) or not refresh_token:
            refresh_token = previous.refresh_token if previous is not None else None
        now = self._now()
        try:
            expires_at = token_expiry(credential)
        except InvalidSession:
            raise OidcLoginError(401, "The token has no expiry") from None
        if refresh_token is not None:
            expires_at = now + MAX_SESSION_SECONDS
            lifetime = answer.get("refresh_expires_in")  # Keycloak's; a JWT refresh token's own exp otherwise
            refresh_exp = _unverified_claims(refresh_token).get("exp") if _is_jws(refresh_token) else None
            if isinstance(lifetime, int) and not isinstance(lifetime, bool) and lifetime > 0:
                expires_at = min(expires_at, now + lifetime)
            elif isinstance(refresh_exp, int) and not isinstance(refresh_exp, bool):
                expires_at = min(expires_at, refresh_exp)
        expires_at = min(expires_at, now + MAX_SESSION_SECONDS)
        if expires_at <= now:
            raise OidcLoginError(401, "The identity provider's token has already expired")
        return Session(token=credential, expires_at=expires_at, refresh_token=refresh_token, id_token=id_token)

    # -- 3. refresh -----------------------------------------------------------------------------

    def needs_refresh(self, session: Session) -> bool:
        """A session with a refresh token whose credential expires within the margin (or has expired)."""
        if session.refresh_token is None:
            return False
        try:
            return token_expiry(session.token) - self._now() < REFRESH_MARGIN_SECONDS
        except (InvalidSession, jwt.InvalidTokenError):
            return True

    async def refresh(self, session: Session) -> Session:
        """A renewed session (shared by concurrent requests with the same refresh token)."""
        assert session.refresh_token is not None
        key = hashlib.sha256(session.refresh_token.encode()).digest()
        now = self._clock()
        cached = self._refreshed.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        task = self._refreshing.get(key)
        if task is None:
            task = asyncio.create_task(self._refresh(session))
            self._refreshing[key] = task
            task.add_done_callback(lambda done: self._refresh_done(key, done))
        return await asyncio.shield(task)

    def _refresh_done(self, key: bytes, task: asyncio.Task[Session]) -> None:
        self._refreshing.pop(key, None)
        if not task.cancelled() and task.exception() is None:
            now = self._clock()
            while self._refreshed and next(iter(self._refreshed.values()))[1] <= now:
                self._refreshed.popitem(last=False)  # entries expire in insertion order
            self._refreshed[key] = (task.result(), now + REFRESH_REUSE_SECONDS)
            if len(self._refreshed) > _REFRESHED_SIZE:
                self._refreshed.popitem(last=False)

    async def _refresh(self, session: Session) -> Session:
        assert session.refresh_token is not None
        metadata = await self.metadata()
        answer = await self._token_request(
            metadata, {"grant_type": "refresh_token", "refresh_token": session.refresh_token}
        )
        id_token = answer.get("id_token")
        if isinstance(id_token, str):
            claims = await self._verify_id_token(metadata, id_token)
            if claims.get("sub") != _unverified_claims(session.id_token).get("sub", claims.get("sub")):
                raise OidcLoginError(401, "The refreshed ID token names another user")
        else:
            id_token = session.id_token
        renewed = await self._session(answer, id_token=id_token, previous=session)
        old_sub, new_sub = _unverified_claims(session.token).get("sub"), _unverified_claims(renewed.token).get("sub")
        if old_sub != new_sub:
            raise OidcLoginError(401, "The refreshed token names another user")
        return renewed

    # -- 4. logout ------------------------------------------------------------------------------

    async def end_session_url(self, session: Session | None) -> str | None:
        """The provider's end-session URL for this session, or ``None`` when it has none (or is away)."""
        try:
            metadata = await self.metadata()
        except OidcLoginError:
            return None
        if metadata.end_session_endpoint is None:
            return None
        if not metadata.end_session_endpoint.startswith(self.end_session_origin + "/"):
            logger.warning("the end-session endpoint is not on the issuer's origin; logging out locally only")
            return None
        params = {"client_id": self.client_id, "post_logout_redirect_uri": self.post_logout_url}
        if session is not None and session.id_token:
            params["id_token_hint"] = session.id_token
        separator = "&" if "?" in metadata.end_session_endpoint else "?"
        return f"{metadata.end_session_endpoint}{separator}{urlencode(params, quote_via=quote)}"
