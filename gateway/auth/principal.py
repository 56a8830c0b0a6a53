"""The identity of one request, taken from a verified token and from nothing else."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Tenant ids are restricted to what is safe inside names, S3 keys and MLflow LIKE patterns:
# `_` and `%` are LIKE wildcards and MLflow has no ESCAPE, `.` is the registry-name separator.
TENANT_ID_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: one frozen value per request, built by the authenticator."""

    tenant: str
    user: str
    roles: frozenset[str] = frozenset()
    job: str | None = None
    issuer: str | None = None
    # Reads every tenant's objects with their stored names, never writes (role name is configurable).
    platform_admin: bool = False
    # access_level() of these roles, computed once per verified token instead of on every request.
    level: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "level", _level_of(self.roles))

    def has_role(self, role: str) -> bool:
        """True when the token grants ``role``."""
        return role in self.roles


VIEWER, EDITOR, ADMIN = "viewer", "editor", "admin"


def access_level(principal: Principal) -> int:
    """The highest access the caller's roles grant: viewer 1, editor 2, admin 3.

    A token with none of these roles is an editor: most identity providers put unrelated roles in
    the same claim, and "editor" is the documented default.
    """
    return principal.level


def _level_of(roles: frozenset[str]) -> int:
    if ADMIN in roles:
        return 3
    if EDITOR in roles:
        return 2
    if VIEWER in roles:
        return 1
    return 2


def is_valid_tenant_id(tenant: str) -> bool:
    """True for a tenant id the gateway can use safely as a name prefix."""
    return bool(TENANT_ID_PATTERN.fullmatch(tenant))
