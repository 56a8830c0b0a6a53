"""Layers that hand a request straight to the next one (``handoff``) do exactly what their ``__call__`` does.

The observability layer calls the app a layer's ``handoff(scope)`` returns; a layer returns itself
whenever it has more to do than a check (a token to verify, a refusal, a page, a session cookie).
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import pytest

from gateway import middleware
from gateway.app import create_app
from gateway.auth.jwt import Authenticator
from gateway.middleware import AuthenticationMiddleware
from gateway.observability import handoff_of
from gateway.ui import UiMiddleware
from tests.factories import SECRET, make_settings, raw_token

TOKEN_CLAIMS = {"tenant_id": "acme", "sub": "alice"}


async def _inner(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("not called")


def _scope(path: str = "/api/2.0/mlflow/runs/get", headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": path, "headers": headers or [], "state": {}}


def _auth_layer(**settings: Any) -> tuple[AuthenticationMiddleware, Authenticator]:
    authenticator = Authenticator.from_settings(make_settings(jwt_secret=SECRET, **settings))
    return AuthenticationMiddleware(_inner, authenticator=authenticator, is_public=lambda p: p == "/health"), (
        authenticator
    )


def test_authentication_hands_off_only_a_recently_verified_token() -> None:
    layer, authenticator = _auth_layer()
    token = raw_token(TOKEN_CLAIMS)
    bearer = [(b"authorization", f"Bearer {token}".encode())]
    scope = _scope(headers=bearer)
    assert layer.handoff(scope) is layer and "principal" not in scope["state"]  # never verified: the layer verifies
    asyncio.run(authenticator.authenticate(token))
    scope = _scope(headers=[*bearer, (b"x-matih-job-id", b"nightly")])
    assert layer.handoff(scope) is _inner
    principal = scope["state"]["principal"]
    assert (principal.tenant, principal.user, principal.job) == ("acme", "alice", "nightly")
    # Everything the layer must refuse or answer stays with the layer.
    for refused in (
        _scope(),  # no token on a private path
        _scope(headers=[*bearer, *bearer]),  # two Authorization headers
        _scope(headers=[(b"authorization", b"Basic !!!")]),
        _scope(headers=[(b"authorization", f"Bearer {token}x".encode())]),  # another token: must be verified
    ):
        assert layer.handoff(refused) is layer and "principal" not in refused["state"]
    public = _scope("/health")
    assert layer.handoff(public) is _inner and public["state"]["principal"] is None
    assert layer.handoff({"type": "lifespan"}) is layer


def test_ui_hands_off_api_calls_and_keeps_its_pages_and_sessions() -> None:
    settings = make_settings(jwt_secret=SECRET, session_secret="s" * 32)
    auth, authenticator = _auth_layer()
    ui = UiMiddleware(auth, settings=settings, authenticator=authenticator)
    assert ui.handoff(_scope()) is auth  # the token is not cached: authentication has work to do
    assert ui.handoff(_scope("/login")) is ui
    assert ui.handoff(_scope(headers=[(b"cookie", b"session=x")])) is ui
    rooted = UiMiddleware(
        auth, settings=make_settings(jwt_secret=SECRET, root_path="/mlflow"), authenticator=authenticator
    )
    assert rooted.handoff(_scope("/mlflow/api/2.0/mlflow/runs/get")) is rooted  # the prefix is stripped by the layer


def test_the_served_chain_hands_an_api_call_with_a_cached_token_to_the_pipeline() -> None:
    app = create_app(make_settings(jwt_secret=SECRET))
    token = raw_token(TOKEN_CLAIMS)
    ui = app.app  # type: ignore[attr-defined]
    auth = ui.app
    asyncio.run(auth.authenticator.authenticate(token))
    handoff = handoff_of(ui)
    assert handoff is not None
    scope = _scope(headers=[(b"authorization", f"Bearer {token}".encode())])
    assert handoff(scope) is auth.app and scope["state"]["principal"].tenant == "acme"
    assert handoff_of(_inner) is None


def _basic(user: str, token: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{token}".encode())


def test_authorization_values_of_verified_tokens_are_remembered_bounded_and_rechecked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    layer, authenticator = _auth_layer()
    token = raw_token(TOKEN_CLAIMS)
    bearer = f"Bearer {token}".encode()
    layer.handoff(_scope(headers=[(b"authorization", bearer)]))
    assert layer._verified_values == {}  # never verified: nothing remembered
    asyncio.run(authenticator.authenticate(token))
    monkeypatch.setattr(middleware, "VERIFIED_VALUES_SIZE", 2)
    values = [bearer, _basic("a", token), _basic("b", token)]
    for _ in range(2):
        for value in values:  # each value, parsed or remembered, names the same verified token
            scope = _scope(headers=[(b"authorization", value)])
            assert layer.handoff(scope) is _inner and scope["state"]["principal"].tenant == "acme"
    assert list(layer._verified_values) == values[1:]  # bounded: the oldest went first
    assert set(layer._verified_values.values()) == {token}
    assert layer._verified_values_bytes == sum(len(value) + len(token) for value in values[1:])
    # A remembered value is no shortcut past verification: once the token's verification is stale, the layer
    # (which verifies again, and refuses an expired token) serves the request.
    monkeypatch.setattr(authenticator, "_clock", lambda: time.time() + 3600 * 24)
    scope = _scope(headers=[(b"authorization", values[2])])
    assert layer.handoff(scope) is layer and "principal" not in scope["state"]
