"""Factories for tokens and payloads, shared by every test tier."""

from __future__ import annotations

import time
from typing import Any

import jwt

from gateway.auth.jwt import mint_token
from gateway.settings import Settings

SECRET = "test-secret-that-is-long-enough-for-hs256-hs384-and-even-hs512-keys!"


def make_settings(upstream_url: str = "http://127.0.0.1:9", **overrides: Any) -> Settings:
    """Valid settings for an in-process gateway."""
    values: dict[str, Any] = {"upstream_url": upstream_url, "jwt_secret": SECRET, **overrides}
    return Settings(**values)


def token(tenant: str = "acme", user: str = "alice", *, secret: str = SECRET, **kwargs: Any) -> str:
    """A valid token for ``tenant``/``user``."""
    return mint_token(secret=secret, tenant=tenant, user=user, **kwargs)


def raw_token(claims: dict[str, Any], *, secret: str = SECRET, algorithm: str = "HS256", **kwargs: Any) -> str:
    """A token with exactly ``claims`` (an ``exp`` one hour ahead unless given)."""
    claims = {"exp": int(time.time()) + 3600, **claims}
    return jwt.encode(claims, secret, algorithm=algorithm, **kwargs)


def bearer(tenant: str = "acme", user: str = "alice", **kwargs: Any) -> dict[str, str]:
    """An Authorization header for ``tenant``/``user``."""
    return {"Authorization": f"Bearer {token(tenant, user, **kwargs)}"}
