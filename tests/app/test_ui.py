"""The web UI login: token page, session cookie, CSRF, security headers and the root path (app tier)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from gateway.auth.session import COOKIE_NAME, Session, SessionCodec
from tests.app.conftest import AJAX, FakeUpstream, GatewayUnderTest, Reply
from tests.factories import bearer, raw_token, token

SESSION_SECRET = "session-secret-for-the-app-tier-ui-tests-0123456789"
INDEX_HTML = "<!doctype html><html><body><div id='root'></div></body></html>"
EXPERIMENTS = f"{AJAX}/experiments/search"


@pytest.fixture
def ui(start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream) -> GatewayUnderTest:
    fake.on("GET", "/", Reply(200, INDEX_HTML, content_type="text/html; charset=utf-8"))
    return start_gateway(session_secret=SESSION_SECRET)


def _origin(gw: GatewayUnderTest) -> dict[str, str]:
    return {"Origin": f"http://127.0.0.1:{gw.port}"}


def login(gw: GatewayUnderTest, tok: str, **headers: str) -> httpx.Response:
    return gw.client.post(
        "/login",
        content=f"token={tok}",
        headers={"Content-Type": "application/x-www-form-urlencoded", **_origin(gw), **headers},
    )


def cookie_of(response: httpx.Response) -> str:
    header = response.headers["set-cookie"]
    match = re.match(rf"{COOKIE_NAME}=([^;]*)", header)
    assert match, header
    return match.group(1)


def with_cookie(value: str, **extra: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE_NAME}={value}", **extra}


def test_index_without_session_redirects_to_login(ui: GatewayUnderTest, fake: FakeUpstream) -> None:
    response = ui.client.get("/")
    assert response.status_code == 303
    assert response.headers["location"] == "/login"
    assert fake.forwarded() == []
    page = ui.client.get("/login")
    assert page.status_code == 200
    assert 'name="token"' in page.text
    assert page.headers["cache-control"] == "no-store"


def test_login_sets_a_secure_httponly_cookie_that_expires_with_the_token(ui: GatewayUnderTest) -> None:
    tok = token("acme", "alice", ttl_seconds=600)
    response = login(ui, tok)
    assert response.status_code == 303
    assert response.headers["location"] == "/"
    header = response.headers["set-cookie"]
    attributes = {part.strip().split("=")[0].lower(): part for part in header.split(";")[1:]}
    assert {"httponly", "secure", "samesite", "path", "max-age"} <= set(attributes)
    assert attributes["samesite"].strip() == "SameSite=Lax"
    assert attributes["path"].strip() == "Path=/"
    max_age = int(attributes["max-age"].split("=")[1])
    assert 590 <= max_age <= 600
    # Encrypted: the token is not readable in the cookie.
    assert tok not in header
    assert tok.split(".")[1] not in header


def test_session_cookie_authenticates_the_ui_and_is_never_forwarded(ui: GatewayUnderTest, fake: FakeUpstream) -> None:
    value = cookie_of(login(ui, token("acme", "alice")))
    index = ui.client.get("/", headers=with_cookie(value))
    assert index.status_code == 200
    assert index.text == INDEX_HTML
    mine = fake.add_experiment("acme", "mine")
    theirs = fake.add_experiment("globex", "theirs")
    got = ui.client.get(f"{AJAX}/experiments/get", params={"experiment_id": mine}, headers=with_cookie(value))
    assert got.status_code == 200
    assert got.json()["experiment"]["name"] == "mine"  # un-prefixed, by the same policy as a Bearer call
    other = ui.client.get(f"{AJAX}/experiments/get", params={"experiment_id": theirs}, headers=with_cookie(value))
    assert other.status_code == 404
    assert fake.forwarded()
    for request in fake.calls():
        assert "cookie" not in request.header_names
        assert "authorization" not in request.header_names


def test_login_page_shows_who_is_logged_in_and_logout_clears(ui: GatewayUnderTest) -> None:
    value = cookie_of(login(ui, token("acme", "alice")))
    page = ui.client.get("/login", headers=with_cookie(value))
    assert 'id="user">alice<' in page.text
    assert 'id="tenant">acme<' in page.text
    assert "/logout" in page.text
    out = ui.client.post("/logout", headers={**with_cookie(value), **_origin(ui)})
    assert out.status_code == 303
    assert out.headers["location"] == "/login"
    assert re.match(rf"{COOKIE_NAME}=;.*Max-Age=0", out.headers["set-cookie"])
    cross_site = ui.client.post("/logout", headers={**with_cookie(value), "Origin": "https://evil.example"})
    assert cross_site.status_code == 403


@pytest.mark.parametrize(
    ("tok", "status"),
    [
        ("not-a-token", 401),
        (raw_token({"tenant_id": "acme", "sub": "alice"}, secret="x" * 40), 401),
        (raw_token({"tenant_id": "acme", "sub": "alice", "exp": int(time.time()) - 300}), 401),
    ],
)
def test_bad_tokens_are_refused_without_a_cookie(ui: GatewayUnderTest, tok: str, status: int) -> None:
    response = login(ui, tok)
    assert response.status_code == status
    assert "set-cookie" not in response.headers
    assert 'class="error"' in response.text


def test_cross_site_login_is_refused(ui: GatewayUnderTest) -> None:
    response = login(ui, token("acme", "alice"), Origin="https://evil.example")
    assert response.status_code == 403
    assert "set-cookie" not in response.headers


def test_forged_or_tampered_cookie_is_refused(ui: GatewayUnderTest, fake: FakeUpstream) -> None:
    value = cookie_of(login(ui, token("acme", "alice")))
    tampered = value[:-4] + ("AAAA" if not value.endswith("AAAA") else "BBBB")
    forged = SessionCodec("another-secret-that-is-also-long-enough-0123").encode(
        Session(token=token("acme", "alice"), expires_at=int(time.time()) + 600)
    )
    for bad in (tampered, forged, "garbage"):
        api = ui.client.get(EXPERIMENTS, headers=with_cookie(bad))
        assert api.status_code == 401
        assert "Max-Age=0" in api.headers["set-cookie"]
        index = ui.client.get("/", headers=with_cookie(bad))
        assert index.status_code == 303
        assert index.headers["location"] == "/login"
    assert fake.forwarded() == []


def test_expired_session_is_refused(ui: GatewayUnderTest, fake: FakeUpstream) -> None:
    codec = SessionCodec(SESSION_SECRET)
    # A cookie whose session has expired, sealed with the right key.
    expired = codec.encode(Session(token=token("acme", "alice"), expires_at=int(time.time()) - 1))
    assert ui.client.get(EXPERIMENTS, headers=with_cookie(expired)).status_code == 401
    # A session whose token inside has expired is refused by the authenticator on every request.
    stale_token = raw_token({"tenant_id": "acme", "sub": "alice", "exp": int(time.time()) - 120})
    stale = codec.encode(Session(token=stale_token, expires_at=int(time.time()) + 600))
    assert ui.client.get(EXPERIMENTS, headers=with_cookie(stale)).status_code == 401
    assert ui.client.get("/", headers=with_cookie(stale)).status_code == 303
    assert fake.forwarded() == []


def test_cookie_and_authorization_together_are_refused(ui: GatewayUnderTest, fake: FakeUpstream) -> None:
    value = cookie_of(login(ui, token("acme", "alice")))
    response = ui.client.get(EXPERIMENTS, headers={**with_cookie(value), **bearer("globex", "bob")})
    assert response.status_code == 400
    assert fake.forwarded() == []


def test_two_session_cookies_are_refused(ui: GatewayUnderTest) -> None:
    acme = cookie_of(login(ui, token("acme", "alice")))
    globex = cookie_of(login(ui, token("globex", "bob")))
    response = ui.client.get(EXPERIMENTS, headers={"Cookie": f"{COOKIE_NAME}={acme}; {COOKIE_NAME}={globex}"})
    assert response.status_code == 400


CREATE = f"{AJAX}/experiments/create"


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example", "Content-Type": "application/json"},
        {"Origin": "null", "Content-Type": "application/json"},
        {"Content-Type": "application/json"},  # neither Origin nor Sec-Fetch-Site
        {"Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"},
        {"Origin": "http://127.0.0.1:1", "Content-Type": "application/json"},  # another port is another origin
        {"same-origin": "1", "Content-Type": "text/plain"},
        {"same-origin": "1", "Content-Type": "application/x-www-form-urlencoded"},
        {"same-origin": "1", "Content-Type": "multipart/form-data; boundary=x"},
    ],
)
def test_csrf_refusals(ui: GatewayUnderTest, fake: FakeUpstream, headers: dict[str, str]) -> None:
    value = cookie_of(login(ui, token("acme", "alice")))
    sent: dict[str, Any] = {**with_cookie(value), **headers}
    if sent.pop("same-origin", None):
        sent.update(_origin(ui))
    response = ui.client.post(CREATE, content=b'{"name": "x"}', headers=sent)
    assert response.status_code == 403, response.text
    assert response.json()["error_code"] == "PERMISSION_DENIED"
    assert fake.forwarded() == []


def test_same_origin_json_change_with_cookie_is_forwarded(ui: GatewayUnderTest, fake: FakeUpstream) -> None:
    value = cookie_of(login(ui, token("acme", "alice")))
    for extra in (_origin(ui), {"Sec-Fetch-Site": "same-origin"}):
        response = ui.client.post(
            CREATE,
            json={"name": f"ui-{time.time_ns()}"},
            headers={**with_cookie(value), **extra},
        )
        assert response.status_code == 200, response.text
    names = [request.json()["name"] for request in fake.forwarded("POST", CREATE)]
    assert len(names) == 2
    assert all(name.startswith("acme") for name in names)


def test_bearer_changes_are_not_subject_to_the_csrf_check(ui: GatewayUnderTest) -> None:
    response = ui.client.post(
        CREATE,
        json={"name": f"api-{time.time_ns()}"},
        headers={**bearer("acme", "alice"), "Origin": "https://x.example"},
    )
    assert response.status_code == 200


@pytest.mark.parametrize("path", ["/login", "/health", "/static-files/static/js/main.js", EXPERIMENTS])
def test_security_headers(ui: GatewayUnderTest, fake: FakeUpstream, path: str) -> None:
    fake.on("GET", "/static-files/static/js/main.js", Reply(200, "x", content_type="text/javascript"))
    response = ui.client.get(path, headers=bearer() if path == EXPERIMENTS else {})
    assert response.headers.get_list("x-frame-options") == ["DENY"]
    assert response.headers.get_list("x-content-type-options") == ["nosniff"]
    assert response.headers.get_list("referrer-policy") == ["same-origin"]


def test_ui_telemetry_is_answered_off_locally(ui: GatewayUnderTest, fake: FakeUpstream) -> None:
    value = cookie_of(login(ui, token("acme", "alice")))
    response = ui.client.get("/ajax-api/3.0/mlflow/ui-telemetry", headers=with_cookie(value))
    assert response.status_code == 200
    assert response.json()["disable_ui_telemetry"] is True
    assert fake.forwarded() == []


def test_login_is_not_configured_without_a_session_secret(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream
) -> None:
    gw = start_gateway()
    response = login(gw, token("acme", "alice"))
    assert response.status_code == 403
    assert "set-cookie" not in response.headers
    assert "GATEWAY_SESSION_SECRET" in gw.client.get("/login").text


def test_insecure_cookies_for_plain_http_development(start_gateway: Callable[..., GatewayUnderTest]) -> None:
    gw = start_gateway(session_secret=SESSION_SECRET, ui_insecure_cookies=True)
    header = login(gw, token("acme", "alice")).headers["set-cookie"]
    assert "HttpOnly" in header
    assert "Secure" not in header


def test_root_path(start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream) -> None:
    fake.on("GET", "/", Reply(200, INDEX_HTML, content_type="text/html; charset=utf-8"))
    gw = start_gateway(session_secret=SESSION_SECRET, root_path="/tools/mlflow")
    bare = gw.client.get("/tools/mlflow")
    assert (bare.status_code, bare.headers["location"]) == (303, "/tools/mlflow/")
    assert gw.client.get("/tools/mlflow/").headers["location"] == "/tools/mlflow/login"
    assert 'action="/tools/mlflow/login"' in gw.client.get("/tools/mlflow/login").text
    response = gw.client.post(
        "/tools/mlflow/login",
        content=f"token={token('acme', 'alice')}",
        headers={"Content-Type": "application/x-www-form-urlencoded", **_origin(gw)},
    )
    assert response.headers["location"] == "/tools/mlflow/"
    assert "Path=/tools/mlflow;" in response.headers["set-cookie"]
    value = cookie_of(response)
    assert gw.client.get("/tools/mlflow/", headers=with_cookie(value)).text == INDEX_HTML
    mine = fake.add_experiment("acme", "mine")
    api = gw.client.get(f"/tools/mlflow{AJAX}/experiments/get", params={"experiment_id": mine}, headers=bearer())
    assert api.status_code == 200
    assert fake.forwarded("GET", "experiments/get")[-1].path == f"{AJAX}/experiments/get"  # without the prefix
    # Outside the prefix, or the prefix spelt with escapes: not served.
    for outside in ("/login", EXPERIMENTS, "/tools/mlflowx/login", "/tools/%6Dlflow/login"):
        assert gw.client.get(outside, headers=bearer()).status_code == 404, outside
