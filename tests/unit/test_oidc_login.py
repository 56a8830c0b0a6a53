"""The OIDC login's pure parts: return paths, session chunks, discovery caching, client authentication.

The flow itself (state, nonce, PKCE, refresh, logout) is tested against a real provider in
tests/app/test_oidc_login.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from gateway.auth.jwt import Authenticator
from gateway.auth.oidc_login import OidcLogin, OidcLoginError, safe_return_path
from gateway.auth.session import MAX_COOKIE_VALUE_BYTES, InvalidSession, Session, SessionCodec, split_value
from tests.factories import make_settings

SECRET = "session-secret-for-the-oidc-unit-tests-0123456789"
ISSUER = "https://idp.example.com/realms/x"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "/"),
        ("", "/"),
        ("/", "/"),
        ("/#/experiments/1", "/#/experiments/1"),
        ("/a/b?c=d&e=%2F", "/a/b?c=d&e=%2F"),
    ],
)
def test_return_paths_accepted(value: str | None, expected: str) -> None:
    assert safe_return_path(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "//evil.example",
        "///evil.example",
        "/\\evil.example",
        "\\/evil.example",
        "https://evil.example/",
        "javascript:alert(1)",
        "evil.example/",
        "/a\r\nSet-Cookie: x=y",
        "/a\tb",
        "/ä",
        "/" + "a" * 600,
        "/oidc/callback?code=x",
        "/login",
        "/logout",
    ],
)
def test_return_paths_refused(value: str) -> None:
    with pytest.raises(OidcLoginError) as caught:
        safe_return_path(value)
    assert caught.value.status == 400


def test_large_sessions_split_and_join() -> None:
    codec = SessionCodec(SECRET)
    session = Session(token="t" * 5000, expires_at=2**40, refresh_token="r" * 3000, id_token="i" * 2000)
    value = codec.encode(session)
    chunks = split_value(value)
    assert len(chunks) == -(-len(value) // MAX_COOKIE_VALUE_BYTES) >= 3
    assert all(len(chunk) <= MAX_COOKIE_VALUE_BYTES for chunk in chunks)
    assert codec.decode("".join(chunks)) == session
    with pytest.raises(InvalidSession):
        codec.decode("".join(chunks[:-1]))
    with pytest.raises(InvalidSession):
        codec.decode("".join([chunks[1], chunks[0], *chunks[2:]]))


class _Fake:
    """Discovery and token endpoints recorded, answering from fixed documents."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.fetches = 0
        self.posts: list[tuple[str, dict[str, str], tuple[str, str] | None]] = []

    async def fetch(self, url: str) -> Any:
        self.fetches += 1
        return self.document

    async def post(self, url: str, form: Mapping[str, str], basic: tuple[str, str] | None) -> tuple[int, Any]:
        self.posts.append((url, dict(form), basic))
        return 400, {"error": "invalid_grant"}


def _discovery(**extra: Any) -> dict[str, Any]:
    return {
        "issuer": ISSUER,
        "authorization_endpoint": f"{ISSUER}/auth",
        "token_endpoint": f"{ISSUER}/token",
        "jwks_uri": f"{ISSUER}/certs",
        **extra,
    }


def _login(fake: _Fake, *, clock: list[float] | None = None, **overrides: Any) -> OidcLogin:
    values: dict[str, Any] = {
        "jwt_secret": None,
        "oidc_issuer": ISSUER,
        "session_secret": SECRET,
        "oidc_client_id": "gw client",
        "oidc_client_secret": "s:cr%t",
        "oidc_redirect_url": "https://gw.example.com/oidc/callback",
        **overrides,
    }
    settings = make_settings(**values)
    now = clock if clock is not None else [1_000_000.0]
    return OidcLogin(
        settings, Authenticator.from_settings(settings), fetch=fake.fetch, post=fake.post, clock=lambda: now[0]
    )


def test_discovery_is_cached_for_the_ttl() -> None:
    fake, clock = _Fake(_discovery()), [1_000_000.0]
    login = _login(fake, clock=clock, jwks_cache_seconds=300)

    async def run() -> None:
        for _ in range(3):
            await login.metadata()
        assert fake.fetches == 1
        clock[0] += 301
        await login.metadata()
        assert fake.fetches == 2

    asyncio.run(run())


@pytest.mark.parametrize(
    "document",
    [
        _discovery(issuer="https://another.example.com/realms/x"),
        _discovery(authorization_endpoint="javascript:alert(1)"),
        _discovery(token_endpoint=None),
        ["not", "an", "object"],
    ],
)
def test_unusable_discovery_is_a_503(document: Any) -> None:
    login = _login(_Fake(document))
    with pytest.raises(OidcLoginError) as caught:
        asyncio.run(login.start("/"))
    assert caught.value.status == 503


@pytest.mark.parametrize(
    ("methods", "basic", "in_form"),
    [
        (None, ("gw%20client", "s%3Acr%25t"), set()),  # the default is client_secret_basic, parts form-encoded
        (["client_secret_basic", "client_secret_post"], ("gw%20client", "s%3Acr%25t"), set()),
        (["client_secret_post"], None, {"client_id", "client_secret"}),
    ],
)
def test_client_authentication(methods: list[str] | None, basic: tuple[str, str] | None, in_form: set[str]) -> None:
    extra = {"token_endpoint_auth_methods_supported": methods} if methods else {}
    fake = _Fake(_discovery(**extra))
    login = _login(fake)
    session = Session(token="x.y.z", expires_at=2**40, refresh_token="refresh")
    with pytest.raises(OidcLoginError) as caught:
        asyncio.run(login.refresh(session))
    assert caught.value.status == 401 and "invalid_grant" in caught.value.message
    ((url, form, sent_basic),) = fake.posts
    assert url == f"{ISSUER}/token"
    assert sent_basic == basic
    assert {"client_id", "client_secret"} & set(form) == in_form
    assert form["grant_type"] == "refresh_token" and form["refresh_token"] == "refresh"


def test_public_client_sends_only_its_id() -> None:
    fake = _Fake(_discovery())
    login = _login(fake, oidc_client_secret=None)
    with pytest.raises(OidcLoginError):
        asyncio.run(login.refresh(Session(token="x.y.z", expires_at=2**40, refresh_token="refresh")))
    ((_, form, basic),) = fake.posts
    assert basic is None and form["client_id"] == "gw client" and "client_secret" not in form
