"""JWT verification: a credential from the request becomes a :class:`Principal`.

Algorithms come from configuration only, never from the token header, and ``none`` is never
accepted; an issuer configured with a shared secret only accepts HS* tokens, one configured with public
keys only RS/PS/ES/EdDSA tokens. ``exp`` is always required; ``iss``/``aud`` are checked when
configured; ``nbf``/``iat`` are honoured with the configured leeway. With several issuers, the token's
``iss`` selects which one verifies it (an unverified read used only for that choice).
"""

from __future__ import annotations

import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import jwt
from jwt.types import Options

from gateway.auth.keys import Fetcher, JwksKeys, KeySource, OidcKeys, StaticKey, fetch_json
from gateway.auth.principal import Principal, is_valid_tenant_id
from gateway.errors import HeadersTooLarge, PermissionDenied, Unauthenticated
from gateway.settings import IssuerSettings, Settings

MAX_TOKEN_BYTES = 8 * 1024
JOB_LABEL_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}$")
VERIFIED_CACHE_SIZE = 10_000
VERIFIED_CACHE_SECONDS = 60.0
VERIFIED_CACHE_BYTES = 16 * 1024 * 1024  # of cached tokens: 2,000 of the largest accepted, ~16,000 of 1 KiB

_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "Token has expired"),
    (jwt.ImmatureSignatureError, "Token is not valid yet (nbf/iat in the future)"),
    (jwt.InvalidAudienceError, "Token audience is not accepted"),
    (jwt.InvalidIssuerError, "Token issuer is not accepted"),
    (jwt.InvalidSignatureError, "Token signature is invalid"),
    (jwt.InvalidAlgorithmError, "Token algorithm is not accepted"),
    (jwt.DecodeError, "Token is malformed"),
)


def _claim(claims: dict[str, Any], path: str) -> Any:
    """A claim by name, or by dotted path into nested objects (``realm_access.roles``).

    The whole name is tried first, so URL-shaped custom claims (``https://example.com/tenant``) work.
    """
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


class IssuerVerifier:
    """Verifies the tokens of one issuer and maps its claims to a :class:`Principal`."""

    def __init__(self, config: IssuerSettings, keys: KeySource, *, platform_admin_role: str) -> None:
        self.config = config
        self.keys = keys
        self.platform_admin_role = platform_admin_role
        required = ["exp"]
        if config.expected_issuer:
            required.append("iss")
        if config.audience:
            required.append("aud")
        self._options: Options = {"require": required, "verify_aud": config.audience is not None}

    async def verify(self, token: str, header: dict[str, Any]) -> Principal:
        """Verify signature and claims; map them to a Principal."""
        if header.get("alg") not in self.config.algorithms:
            raise Unauthenticated(f"Token algorithm {header.get('alg')!r} is not accepted")
        kid = header.get("kid")
        key = await self.keys.key_for(kid if isinstance(kid, str) else None)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=list(self.config.algorithms),
                issuer=self.config.expected_issuer,
                audience=self.config.audience,
                leeway=self.config.leeway_seconds,
                options=self._options,
            )
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"Token lacks the required '{exc.claim}' claim") from None
        except jwt.InvalidTokenError as exc:
            message = next((text for kind, text in _ERRORS if isinstance(exc, kind)), "Token is invalid")
            raise Unauthenticated(message) from None
        return self.principal_from_claims(claims)

    def principal_from_claims(self, claims: dict[str, Any]) -> Principal:
        """Map verified claims to a Principal (claim names from the issuer's configuration)."""
        config = self.config
        roles = _roles(_claim(claims, config.roles_claim), config.roles_claim)
        platform_admin = self.platform_admin_role in roles
        raw_tenant = _claim(claims, config.tenant_claim)
        tenant = raw_tenant.lower() if isinstance(raw_tenant, str) else None
        if tenant is None or not is_valid_tenant_id(tenant):
            if not platform_admin:
                raise PermissionDenied(
                    f"Token has no valid tenant claim '{config.tenant_claim}': lowercase letters, digits and '-', "
                    "1 to 63 characters, starting and ending with a letter or digit"
                )
            tenant = ""
        user = _claim(claims, config.user_claim)
        if not isinstance(user, str) or not user:
            user = claims.get("email")
        if not isinstance(user, str) or not user:
            raise Unauthenticated(f"Token has no user claim ('{config.user_claim}' or 'email')")
        job = _claim(claims, config.job_claim)
        if job is not None and not isinstance(job, str):
            raise Unauthenticated(f"Token claim '{config.job_claim}' must be a string")
        return Principal(
            tenant=tenant,
            user=user,
            roles=frozenset(roles),
            job=job or None,
            issuer=config.expected_issuer or config.name,
            platform_admin=platform_admin,
        )


def _roles(value: Any, claim: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list) and all(isinstance(role, str) for role in value):
        return value
    raise Unauthenticated(f"Token claim '{claim}' must be a list of strings or a space-separated string")


class Authenticator:
    """Turns a bearer token into a Principal: picks the issuer, verifies, caches the result briefly.

    A verified token is remembered until it expires or for at most a minute, so a client's steady stream
    of requests does not pay for signature verification every time. The cache is keyed by the token
    itself: only tokens whose signature was verified enter it, it holds at most
    ``VERIFIED_CACHE_SIZE`` tokens and ``VERIFIED_CACHE_BYTES`` of them, and a dict look-up costs a
    tenth of hashing the token with SHA-256 (15 k instructions, bench/RESULTS.md section 2e).
    """

    def __init__(self, verifiers: Iterable[IssuerVerifier], *, clock: Any = time.time) -> None:
        self.verifiers = list(verifiers)
        self._by_issuer = {v.config.expected_issuer: v for v in self.verifiers if v.config.expected_issuer}
        self._clock = clock
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._verified_bytes = 0  # the summed length of the cached tokens

    @classmethod
    def from_settings(cls, settings: Settings, *, fetch: Fetcher = fetch_json) -> Authenticator:
        """Build every configured issuer's verifier with its key source."""
        verifiers = []
        for config in settings.issuers():
            keys: KeySource
            options = {
                "ttl_seconds": float(settings.jwks_cache_seconds),
                "cooldown_seconds": float(settings.jwks_refetch_cooldown_seconds),
                "fetch": fetch,
            }
            if config.secret:
                keys = StaticKey.secret(config.secret)
            elif config.public_key:
                keys = StaticKey.public_key(config.public_key)
            elif config.jwks_url:
                keys = JwksKeys(config.jwks_url, **options)  # type: ignore[arg-type]
            else:
                assert config.oidc_issuer is not None
                keys = OidcKeys(config.oidc_issuer, **options)  # type: ignore[arg-type]
            verifiers.append(IssuerVerifier(config, keys, platform_admin_role=settings.platform_admin_role))
        return cls(verifiers)

    def recently_verified(self, token: str) -> Principal | None:
        """The Principal of a token verified less than a minute ago and not expired since, else ``None``.

        The steady state of a client's requests, answered without a coroutine; :meth:`authenticate`
        does the rest.
        """
        cached = self._verified.get(token)
        return cached[0] if cached is not None and cached[1] > self._clock() else None

    async def authenticate(self, token: str) -> Principal:
        """The Principal of a valid token; :class:`Unauthenticated` (401) or 403 otherwise."""
        principal = self.recently_verified(token)
        if principal is not None:
            return principal
        if len(token) > MAX_TOKEN_BYTES:
            raise HeadersTooLarge("Token is too large")
        now = self._clock()
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            raise Unauthenticated("Token is malformed") from None
        verifier = self._select(unverified.get("iss"))
        principal = await verifier.verify(token, header)
        expires = unverified.get("exp")
        if isinstance(expires, int | float):
            self._remember(token, principal, min(float(expires), now + VERIFIED_CACHE_SECONDS))
        return principal

    def _select(self, issuer: Any) -> IssuerVerifier:
        if len(self.verifiers) == 1:
            return self.verifiers[0]
        verifier = self._by_issuer.get(issuer) if isinstance(issuer, str) else None
        if verifier is None:
            raise Unauthenticated("Token issuer is not accepted")
        return verifier

    def _remember(self, token: str, principal: Principal, until: float) -> None:
        if self._verified.pop(token, None) is None:
            self._verified_bytes += len(token)
        self._verified[token] = (principal, until)
        while len(self._verified) > VERIFIED_CACHE_SIZE or self._verified_bytes > VERIFIED_CACHE_BYTES:
            oldest, _ = self._verified.popitem(last=False)
            self._verified_bytes -= len(oldest)


def job_label(value: str) -> str | None:
    """A client ``X-Matih-Job-Id`` label when well-formed (a run tag value, never an identity)."""
    return value if JOB_LABEL_PATTERN.match(value) else None


def mint_token(
    *,
    secret: str,
    tenant: str,
    user: str,
    roles: Iterable[str] = (),
    job: str | None = None,
    ttl_seconds: int = 3600,
    algorithm: str = "HS256",
    issuer: str | None = None,
    audience: str | None = None,
) -> str:
    """Sign a token the gateway accepts (for `mlflow-gateway token`, `dev` and tests)."""
    if not is_valid_tenant_id(tenant):
        raise ValueError(f"invalid tenant id {tenant!r}: lowercase letters, digits and '-' only")
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": user,
        "tenant_id": tenant,
        "roles": sorted(set(roles)),
        "iat": now,
        "exp": now + ttl_seconds,
        "jti": uuid.uuid4().hex,
    }
    if job:
        claims["job_id"] = job
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm=algorithm)
