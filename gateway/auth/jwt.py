"""JWT verification: a credential from the request becomes a :class:`Principal`.

Algorithms come from configuration only, never from the token header, and ``none`` is never
accepted. ``exp`` is always required; ``iss``/``aud`` are checked when configured.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jwt

from gateway.auth.principal import Principal, is_valid_tenant_id
from gateway.errors import Unauthenticated
from gateway.settings import Settings

TENANT_CLAIM = "tenant_id"
USER_CLAIMS = ("user_id", "preferred_username", "sub")
ROLES_CLAIM = "roles"
JOB_CLAIM = "job_id"


@dataclass(frozen=True)
class TokenVerifier:
    """Verifies HS-signed tokens with the configured secret and maps claims to a Principal."""

    secret: str
    algorithms: tuple[str, ...]
    issuer: str | None = None
    audience: str | None = None
    leeway: int = 30

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        """Build the verifier from validated settings."""
        return cls(
            secret=settings.jwt_secret,
            algorithms=settings.jwt_algorithms,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            leeway=settings.jwt_leeway_seconds,
        )

    def verify(self, token: str) -> Principal:
        """Return the principal of a valid token; raise :class:`Unauthenticated` otherwise."""
        required = ["exp"] + (["iss"] if self.issuer else []) + (["aud"] if self.audience else [])
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self.secret,
                algorithms=list(self.algorithms),
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway,
                options={"require": required, "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("Token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"Invalid token: {exc}") from None
        return principal_from_claims(claims, issuer=self.issuer)


def principal_from_claims(claims: dict[str, Any], *, issuer: str | None) -> Principal:
    """Map verified claims to a Principal; a token without a usable tenant is refused."""
    tenant = claims.get(TENANT_CLAIM)
    if not isinstance(tenant, str) or not is_valid_tenant_id(tenant):
        raise Unauthenticated(
            f"Token has no valid '{TENANT_CLAIM}' claim (lowercase letters, digits and '-', at most 63)"
        )
    user = next((claims[c] for c in USER_CLAIMS if isinstance(claims.get(c), str) and claims[c]), None)
    if user is None:
        raise Unauthenticated("Token has no user claim (user_id, preferred_username or sub)")
    roles = claims.get(ROLES_CLAIM, [])
    if isinstance(roles, str):
        roles = roles.split()
    if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
        raise Unauthenticated(f"Token claim '{ROLES_CLAIM}' must be a list of strings")
    job = claims.get(JOB_CLAIM)
    if job is not None and not isinstance(job, str):
        raise Unauthenticated(f"Token claim '{JOB_CLAIM}' must be a string")
    return Principal(tenant=tenant, user=user, roles=frozenset(roles), job=job, issuer=issuer)


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
        TENANT_CLAIM: tenant,
        ROLES_CLAIM: sorted(set(roles)),
        "iat": now,
        "exp": now + ttl_seconds,
        "jti": uuid.uuid4().hex,
    }
    if job:
        claims[JOB_CLAIM] = job
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm=algorithm)
