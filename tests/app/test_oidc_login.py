"""The browser's OpenID Connect login at the HTTP level: a real gateway, a real (local) OIDC provider.

Every check is made by attempting the attack: a forged, missing or replayed ``state``, a wrong nonce,
an ID token for another client, open redirects through the return path, an IdP error that tries to
inject markup. The provider (tests/oidc_provider.py) checks PKCE and client authentication itself,
so a login that succeeds proves the gateway sent them.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest

from gateway.auth.oidc_login import REFRESH_MARGIN_SECONDS, STATE_COOKIE, STATE_TTL_SECONDS
from gateway.auth.session import COOKIE_NAME, MAX_CHUNKS, MAX_COOKIE_VALUE_BYTES, SessionCodec
from gateway.settings import SettingsError, load_settings
from tests.app.conftest import AJAX, FakeUpstream, GatewayUnderTest, closed_port
from tests.oidc_provider import OidcProvider, ProviderConfig

SESSION_SECRET = "session-secret-for-the-oidc-login-tests-0123456789"
GATEWAY = "https://gateway.test"  # the gateway's public name: the tests carry the redirects themselves
REDIRECT_URL = f"{GATEWAY}/oidc/callback"
EXPERIMENT_GET = f"{AJAX}/experiments/get"


@pytest.fixture(scope="module")
def provider_server() -> Iterator[OidcProvider]:
    with OidcProvider() as provider:
        yield provider


@pytest.fixture
def provider(provider_server: OidcProvider) -> OidcProvider:
    """The module's provider with a fresh configuration and empty records."""
    provider_server.config = ProviderConfig(
        redirect_uris=[REDIRECT_URL], post_logout_redirect_uris=[f"{GATEWAY}/login"]
    )
    provider_server.token_requests.clear()
    provider_server.logouts.clear()
    provider_server.authorize_requests.clear()
    return provider_server


GatewayFactory = Callable[..., GatewayUnderTest]


@pytest.fixture
def oidc_gateway(start_gateway: GatewayFactory, provider: OidcProvider) -> GatewayFactory:
    """Start a gateway whose browser login goes through ``provider`` (overrides as keyword arguments)."""

    def start(**overrides: Any) -> GatewayUnderTest:
        settings: dict[str, Any] = {
            "jwt_secret": None,
            "oidc_issuer": provider.issuer,
            "session_secret": SESSION_SECRET,
            "oidc_client_id": provider.config.client_id,
            "oidc_client_secret": provider.config.client_secret,
            "oidc_redirect_url": REDIRECT_URL,
            "oidc_provider_name": "Test IdP",
            **overrides,
        }
        return start_gateway(**settings)

    return start


# -- driving the flow -----------------------------------------------------------------------------


def set_cookies(response: httpx.Response) -> dict[str, tuple[str, str]]:
    """``name -> (value, whole header)`` of every Set-Cookie of a response."""
    found: dict[str, tuple[str, str]] = {}
    for header in response.headers.get_list("set-cookie"):
        name, _, rest = header.partition("=")
        found[name] = (rest.split(";")[0], header)
    return found


def cookie_header(cookies: dict[str, str]) -> dict[str, str]:
    return {"Cookie": "; ".join(f"{name}={value}" for name, value in cookies.items())}


def session_of(response: httpx.Response) -> dict[str, str]:
    """The session cookies (every chunk) a response sets."""
    return {name: value for name, (value, _) in set_cookies(response).items() if name.startswith(COOKIE_NAME) and value}


@dataclass
class Started:
    authorize_url: str
    params: dict[str, str]
    state_cookie: str
    header: str


def begin(gw: GatewayUnderTest, **params: str) -> Started:
    response = gw.client.get("/oidc/login", params=params)
    assert response.status_code == 303, response.text
    location = response.headers["location"]
    value, header = set_cookies(response)[STATE_COOKIE]
    query = {key: values[0] for key, values in parse_qs(urlsplit(location).query).items()}
    return Started(location, query, value, header)


def authorize(provider: OidcProvider, started: Started, user: str = "acme-alice") -> dict[str, str]:
    """Log in at the provider as ``user``: the query the provider sends the browser back with."""
    page = httpx.get(started.authorize_url)
    assert page.status_code == 200, page.text
    assert f'id="user-{user}"' in page.text
    answer = httpx.post(f"{provider.issuer}/authorize", data={**started.params, "username": user})
    assert answer.status_code == 303, answer.text
    location = answer.headers["location"]
    assert location.startswith(REDIRECT_URL + "?")
    return {key: values[0] for key, values in parse_qs(urlsplit(location).query).items()}


def callback(gw: GatewayUnderTest, query: dict[str, str], state_cookie: str | None) -> httpx.Response:
    headers = cookie_header({STATE_COOKIE: state_cookie}) if state_cookie else {}
    return gw.client.get("/oidc/callback", params=query, headers=headers)


def log_in(gw: GatewayUnderTest, provider: OidcProvider, user: str = "acme-alice") -> dict[str, str]:
    """The whole flow; the session cookies."""
    started = begin(gw)
    response = callback(gw, authorize(provider, started, user), started.state_cookie)
    assert response.status_code == 303, response.text
    return session_of(response)


def refresh_requests(provider: OidcProvider) -> list[dict[str, Any]]:
    return [request for request in provider.token_requests if request["grant_type"] == "refresh_token"]


# -- the login page and the authorization request ---------------------------------------------------


def test_login_page_offers_the_provider_and_keeps_the_token_form(oidc_gateway: GatewayFactory) -> None:
    gw = oidc_gateway()
    index = gw.client.get("/")
    assert (index.status_code, index.headers["location"]) == (303, "/login")
    page = gw.client.get("/login")
    assert page.status_code == 200
    assert '<a id="oidc-login" class="button" href="/oidc/login">Sign in with Test IdP</a>' in page.text
    assert 'name="token"' in page.text


def test_authorization_request_and_state_cookie(oidc_gateway: GatewayFactory, provider: OidcProvider) -> None:
    gw = oidc_gateway()
    started = begin(gw)
    assert started.authorize_url.startswith(f"{provider.issuer}/authorize?")
    params = started.params
    assert params["response_type"] == "code"
    assert params["client_id"] == "mlflow-gateway"
    assert params["redirect_uri"] == REDIRECT_URL
    assert params["scope"] == "openid profile email"
    assert params["code_challenge_method"] == "S256"
    assert len(params["code_challenge"]) == 43
    assert len(params["state"]) >= 43 and len(params["nonce"]) >= 43
    # A fresh state, nonce and verifier every time.
    again = begin(gw)
    assert again.params["state"] != params["state"] and again.params["nonce"] != params["nonce"]
    assert again.params["code_challenge"] != params["code_challenge"]
    # The cookie: encrypted (nothing readable), short-lived, HttpOnly, Lax, Secure, only for /oidc.
    attributes = [part.strip() for part in started.header.split(";")[1:]]
    assert {"HttpOnly", "SameSite=Lax", "Secure", "Path=/oidc", f"Max-Age={STATE_TTL_SECONDS}"} <= set(attributes)
    assert params["state"] not in started.state_cookie and params["nonce"] not in started.state_cookie


def test_the_whole_flow_opens_a_session_the_gateway_verifies(
    oidc_gateway: GatewayFactory, provider: OidcProvider, fake: FakeUpstream
) -> None:
    gw = oidc_gateway()
    started = begin(gw)
    back = authorize(provider, started)
    assert back["state"] == started.params["state"]
    response = callback(gw, back, started.state_cookie)
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/"
    cookies = set_cookies(response)
    assert cookies[STATE_COOKIE][0] == ""  # the login state is spent
    value, header = cookies[COOKIE_NAME]
    assert {"HttpOnly", "SameSite=Lax", "Secure", "Path=/"} <= {part.strip() for part in header.split(";")[1:]}
    max_age = int(header.split("Max-Age=")[1].split(";")[0])
    assert 1790 <= max_age <= 1800  # the refresh token's lifetime (the provider's refresh_expires_in)

    # PKCE: the verifier reached the provider and hashes to the challenge; the client authenticated (Basic).
    (exchange,) = provider.token_requests
    assert exchange["grant_type"] == "authorization_code"
    assert exchange["redirect_uri"] == REDIRECT_URL
    digest = hashlib.sha256(exchange["code_verifier"].encode()).digest()
    assert base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == started.params["code_challenge"]
    assert exchange["basic_auth"] is True

    # The session holds the access token (a JWT the gateway accepts like a Bearer token), and works.
    session = SessionCodec(SESSION_SECRET).decode(value)
    claims = jwt.decode(session.token, options={"verify_signature": False})
    assert claims["aud"] == "mlflow" and claims["tenant_id"] == "acme"
    assert session.refresh_token and session.id_token
    mine, theirs = fake.add_experiment("acme", "mine"), fake.add_experiment("globex", "theirs")
    got = gw.client.get(EXPERIMENT_GET, params={"experiment_id": mine}, headers=cookie_header({COOKIE_NAME: value}))
    assert got.status_code == 200 and got.json()["experiment"]["name"] == "mine"
    other = gw.client.get(EXPERIMENT_GET, params={"experiment_id": theirs}, headers=cookie_header({COOKIE_NAME: value}))
    assert other.status_code == 404
    page = gw.client.get("/login", headers=cookie_header({COOKIE_NAME: value}))
    assert 'id="user">alice<' in page.text and 'id="tenant">acme<' in page.text


def test_public_client_sends_its_id_and_pkce_only(oidc_gateway: GatewayFactory, provider: OidcProvider) -> None:
    provider.config.client_secret = None
    gw = oidc_gateway(oidc_client_secret=None)
    assert log_in(gw, provider)
    (exchange,) = provider.token_requests
    assert exchange["basic_auth"] is False
    assert exchange["client_id"] == "mlflow-gateway"
    assert exchange["code_verifier"]


def test_the_provider_refuses_a_wrong_verifier(oidc_gateway: GatewayFactory, provider: OidcProvider) -> None:
    """The PKCE check the successful logins rely on is real: a stolen code without the verifier is useless."""
    gw = oidc_gateway()
    back = authorize(provider, begin(gw))
    stolen = httpx.post(
        f"{provider.issuer}/token",
        data={
            "grant_type": "authorization_code",
            "code": back["code"],
            "redirect_uri": REDIRECT_URL,
            "code_verifier": "x" * 64,
        },
        auth=(provider.config.client_id, provider.config.client_secret or ""),
    )
    assert stolen.status_code == 400 and stolen.json()["error"] == "invalid_grant"


def test_wrong_client_secret_is_a_clear_401(oidc_gateway: GatewayFactory, provider: OidcProvider) -> None:
    gw = oidc_gateway(oidc_client_secret="not-the-secret")
    started = begin(gw)
    response = callback(gw, authorize(provider, started), started.state_cookie)
    assert response.status_code == 401
    assert "refused the token request (invalid_client)" in response.text
    assert not session_of(response)


# -- state, nonce, audience -----------------------------------------------------------------------


def test_state_mismatch_is_refused(oidc_gateway: GatewayFactory, provider: OidcProvider) -> None:
    gw = oidc_gateway()
    mine, attackers = begin(gw), begin(gw)
    # Login CSRF: the attacker's code and state, delivered to a victim's browser holding its own state cookie.
    back = authorize(provider, attackers)
    response = callback(gw, back, mine.state_cookie)
    assert response.status_code == 400
    assert "state does not match" in response.text
    assert response.headers["content-type"].startswith("text/html")
    assert not session_of(response)
    assert provider.token_requests == []  # refused before the code was ever exchanged


@pytest.mark.parametrize("missing", ["cookie", "state", "garbage-cookie"])
def test_missing_state_is_refused(oidc_gateway: GatewayFactory, provider: OidcProvider, missing: str) -> None:
    gw = oidc_gateway()
    started = begin(gw)
    back = authorize(provider, started)
    if missing == "state":
        del back["state"]
    cookie = {"cookie": None, "state": started.state_cookie, "garbage-cookie": "gAAAAAB-not-a-state"}[missing]
    response = callback(gw, back, cookie)
    assert response.status_code == 400
    assert not session_of(response)
    assert provider.token_requests == []


def test_reused_state_is_refused(oidc_gateway: GatewayFactory, provider: OidcProvider) -> None:
    gw = oidc_gateway()
    started = begin(gw)
    back = authorize(provider, started)
    assert callback(gw, back, started.state_cookie).status_code == 303
    replay = callback(gw, back, started.state_cookie)
    assert replay.status_code == 400
    assert "already completed" in replay.text
    assert not session_of(replay)
    assert len(provider.token_requests) == 1  # the replay never reached the provider


def test_nonce_mismatch_is_refused(oidc_gateway: GatewayFactory, provider: OidcProvider) -> None:
    provider.config.id_token_nonce = "a-nonce-from-another-login"
    gw = oidc_gateway()
    started = begin(gw)
    response = callback(gw, authorize(provider, started), started.state_cookie)
    assert response.status_code == 401
    assert "nonce" in response.text
    assert not session_of(response)


def test_id_token_for_another_client_is_refused(oidc_gateway: GatewayFactory, provider: OidcProvider) -> None:
    provider.config.id_token_audience = "another-client"
    gw = oidc_gateway()
    started = begin(gw)
    response = callback(gw, authorize(provider, started), started.state_cookie)
    assert response.status_code == 401
    assert "ID token is not valid (InvalidAudienceError)" in response.text
    assert not session_of(response)


def test_access_token_the_gateway_refuses_opens_no_session(
    oidc_gateway: GatewayFactory, provider: OidcProvider
) -> None:
    gw = oidc_gateway(jwt_audience="an-api-the-provider-does-not-name")
    started = begin(gw)
    response = callback(gw, authorize(provider, started), started.state_cookie)
    assert response.status_code == 401
    assert "Token audience is not accepted" in response.text
    assert not session_of(response)


def test_opaque_access_tokens_fall_back_to_the_id_token(
    oidc_gateway: GatewayFactory, provider: OidcProvider, fake: FakeUpstream
) -> None:
    provider.config.opaque_access_tokens = True
    gw = oidc_gateway()
    session = SessionCodec(SESSION_SECRET).decode(log_in(gw, provider)[COOKIE_NAME])
    claims = jwt.decode(session.token, options={"verify_signature": False})
    assert claims["aud"] == "mlflow-gateway" and "nonce" in claims  # the ID token
    mine = fake.add_experiment("acme", "mine")
    got = gw.client.get(EXPERIMENT_GET, params={"experiment_id": mine}, headers=cookie_header(log_in(gw, provider)))
    assert got.status_code == 200


# -- return paths and error pages -------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example/",
        "https://evil.example/",
        "/\\evil.example",
        "\\\\evil.example",
        "javascript:alert(1)",
        "/x\r\nLocation: https://evil.example",
        "/oidc/callback",
        "evil.example",
    ],
)
def test_open_redirects_are_refused(oidc_gateway: GatewayFactory, provider: OidcProvider, target: str) -> None:
    gw = oidc_gateway()
    response = gw.client.get("/oidc/login", params={"next": target})
    assert response.status_code == 400, target
    assert "location" not in response.headers
    assert STATE_COOKIE not in set_cookies(response)


def test_the_return_path_is_honoured(oidc_gateway: GatewayFactory, provider: OidcProvider) -> None:
    gw = oidc_gateway()
    started = begin(gw, next="/static-files/x?y=1#/experiments/1")
    response = callback(gw, authorize(provider, started), started.state_cookie)
    assert response.headers["location"] == "/static-files/x?y=1#/experiments/1"


def test_idp_error_is_shown_escaped(oidc_gateway: GatewayFactory, provider: OidcProvider) -> None:
    gw = oidc_gateway()
    started = begin(gw)
    query = {
        "state": started.params["state"],
        "error": "<script>alert(1)</script>",
        "error_description": '"><img src=x onerror=alert(2)>',
    }
    response = callback(gw, query, started.state_cookie)
    assert response.status_code == 400
    assert "<script>alert" not in response.text and "<img" not in response.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in response.text
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert not session_of(response)
    assert provider.token_requests == []


def test_unreachable_provider_is_a_503_page(oidc_gateway: GatewayFactory) -> None:
    gw = oidc_gateway(oidc_issuer=f"http://127.0.0.1:{closed_port()}")
    response = gw.client.get("/oidc/login")
    assert response.status_code == 503
    assert "cannot be reached" in response.text
    assert "location" not in response.headers


# -- refresh ----------------------------------------------------------------------------------------


def test_an_expiring_access_token_is_refreshed_once(
    oidc_gateway: GatewayFactory, provider: OidcProvider, fake: FakeUpstream
) -> None:
    provider.config.access_token_seconds = REFRESH_MARGIN_SECONDS - 10  # "about to expire" from the start
    gw = oidc_gateway()
    old = log_in(gw, provider)
    mine = fake.add_experiment("acme", "mine")
    codec = SessionCodec(SESSION_SECRET)

    def get(cookies: dict[str, str]) -> httpx.Response:
        with httpx.Client(base_url=gw.client.base_url, timeout=10) as client:
            return client.get(EXPERIMENT_GET, params={"experiment_id": mine}, headers=cookie_header(cookies))

    # A burst of UI calls with the same expiring cookie: one refresh, shared (the provider rotates
    # refresh tokens, so a second use of the old one would fail).
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(get, [old] * 6))
    assert [answer.status_code for answer in answers] == [200] * 6
    assert len(refresh_requests(provider)) == 1
    renewed = {codec.decode(session_of(answer)[COOKIE_NAME]) for answer in answers}
    assert len(renewed) == 1  # every answer carries the same renewed session
    new_session = renewed.pop()
    old_session = codec.decode(old[COOKIE_NAME])
    assert new_session.token != old_session.token
    assert new_session.refresh_token != old_session.refresh_token
    assert new_session.id_token  # the login's ID token is kept for the logout hint


def test_a_failed_refresh_ends_the_session(oidc_gateway: GatewayFactory, provider: OidcProvider) -> None:
    provider.config.access_token_seconds = REFRESH_MARGIN_SECONDS - 10
    gw = oidc_gateway()
    cookies = log_in(gw, provider)
    provider.revoke_refresh_tokens()  # the IdP session ended elsewhere
    api = gw.client.get(f"{AJAX}/experiments/search", headers=cookie_header(cookies))
    assert api.status_code == 401
    assert api.json()["error_code"] == "UNAUTHENTICATED"
    assert "refresh failed" in api.json()["message"]
    assert set_cookies(api)[COOKIE_NAME][0] == ""
    cookies = log_in(gw, provider)
    provider.revoke_refresh_tokens()
    index = gw.client.get("/", headers=cookie_header(cookies))
    assert (index.status_code, index.headers["location"]) == (303, "/login")
    assert "Max-Age=0" in set_cookies(index)[COOKIE_NAME][1]


# -- logout -----------------------------------------------------------------------------------------


def test_logout_ends_the_provider_session(oidc_gateway: GatewayFactory, provider: OidcProvider) -> None:
    gw = oidc_gateway()
    cookies = log_in(gw, provider)
    id_token = SessionCodec(SESSION_SECRET).decode(cookies[COOKIE_NAME]).id_token
    origin = {"Origin": f"http://127.0.0.1:{gw.port}"}
    out = gw.client.post("/logout", headers={**cookie_header(cookies), **origin})
    assert out.status_code == 303
    location = out.headers["location"]
    assert location.startswith(f"{provider.issuer}/logout?")
    params = {key: values[0] for key, values in parse_qs(urlsplit(location).query).items()}
    assert params == {
        "client_id": "mlflow-gateway",
        "post_logout_redirect_uri": f"{GATEWAY}/login",
        "id_token_hint": id_token,
    }
    assert set_cookies(out)[COOKIE_NAME][0] == "" and "Max-Age=0" in set_cookies(out)[COOKIE_NAME][1]
    # The provider ends its session and sends the browser back to the gateway's login page.
    end = httpx.get(location)
    assert (end.status_code, end.headers["location"]) == (302, f"{GATEWAY}/login")
    assert provider.logouts[-1]["id_token_hint"] == id_token


def test_logout_without_an_end_session_endpoint_stays_local(
    oidc_gateway: GatewayFactory, provider: OidcProvider
) -> None:
    provider.config.end_session = False
    gw = oidc_gateway()
    cookies = log_in(gw, provider)
    out = gw.client.post("/logout", headers={**cookie_header(cookies), "Origin": f"http://127.0.0.1:{gw.port}"})
    assert (out.status_code, out.headers["location"]) == (303, "/login")


# -- cookie size ------------------------------------------------------------------------------------


def test_large_tokens_are_split_into_several_cookies(
    oidc_gateway: GatewayFactory, provider: OidcProvider, fake: FakeUpstream
) -> None:
    provider.config.claim_padding = 1500  # access, ID and refresh tokens of 2 KB and more each
    gw = oidc_gateway()
    started = begin(gw)
    response = callback(gw, authorize(provider, started), started.state_cookie)
    assert response.status_code == 303
    cookies = session_of(response)
    assert 2 <= len(cookies) <= MAX_CHUNKS
    for _, header in (set_cookies(response)[name] for name in cookies):
        assert len(header.split(";")[0]) <= MAX_COOKIE_VALUE_BYTES + 40
        assert len(header) < 4096  # what browsers keep
    mine = fake.add_experiment("acme", "mine")
    got = gw.client.get(EXPERIMENT_GET, params={"experiment_id": mine}, headers=cookie_header(cookies))
    assert got.status_code == 200
    # A chunk missing or altered: the session is invalid (and every chunk is cleared).
    last = sorted(cookies)[-1]
    for broken in ({**cookies, last: cookies[last][:-8] + "AAAAAAAA"}, {k: v for k, v in cookies.items() if k != last}):
        refused = gw.client.get(EXPERIMENT_GET, params={"experiment_id": mine}, headers=cookie_header(broken))
        assert refused.status_code == 401
        assert {name for name, (value, _) in set_cookies(refused).items() if value == ""} >= set(broken)
    # Logout still has the ID token for the end-session hint.
    out = gw.client.post("/logout", headers={**cookie_header(cookies), "Origin": f"http://127.0.0.1:{gw.port}"})
    assert "id_token_hint=" in out.headers["location"]


def test_tokens_too_large_even_in_chunks_drop_the_logout_hint(
    oidc_gateway: GatewayFactory, provider: OidcProvider
) -> None:
    provider.config.claim_padding = 2600
    gw = oidc_gateway()
    cookies = log_in(gw, provider)
    assert len(cookies) <= MAX_CHUNKS
    session = SessionCodec(SESSION_SECRET).decode("".join(cookies[name] for name in sorted(cookies)))
    assert session.id_token is None and session.refresh_token
    out = gw.client.post("/logout", headers={**cookie_header(cookies), "Origin": f"http://127.0.0.1:{gw.port}"})
    location = out.headers["location"]
    assert "id_token_hint" not in location and "client_id=mlflow-gateway" in location


# -- settings -----------------------------------------------------------------------------------------


def test_settings_report_every_problem_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(
            env={
                "GATEWAY_UPSTREAM_URL": "http://127.0.0.1:5001",
                "GATEWAY_JWT_SECRET": "s" * 40,
                "GATEWAY_OIDC_CLIENT_ID": "mlflow-gateway",
                "GATEWAY_OIDC_SCOPES": "profile email",
            }
        )
    text = str(caught.value)
    for expected in (
        "GATEWAY_OIDC_ISSUER",
        "GATEWAY_SESSION_SECRET",
        "must include 'openid'",
        "GATEWAY_OIDC_REDIRECT_URL",
    ):
        assert expected in text
    base = {
        "GATEWAY_UPSTREAM_URL": "http://127.0.0.1:5001",
        "GATEWAY_OIDC_ISSUER": "https://sso.example.com/realms/x",
        "GATEWAY_SESSION_SECRET": SESSION_SECRET,
        "GATEWAY_OIDC_CLIENT_ID": "mlflow-gateway",
        "GATEWAY_ROOT_PATH": "/mlflow",
    }
    for redirect, problem in [
        ("https://gw.example.com/oidc/callback", "its path must be /mlflow/oidc/callback"),
        ("http://gw.example.com/mlflow/oidc/callback", "must be https"),
        ("gw.example.com/mlflow/oidc/callback", "absolute http(s) URL"),
    ]:
        with pytest.raises(SettingsError, match=problem.replace("(", r"\(").replace(")", r"\)")):
            load_settings(env={**base, "GATEWAY_OIDC_REDIRECT_URL": redirect})
    settings = load_settings(
        env={
            **base,
            "GATEWAY_OIDC_REDIRECT_URL": "https://gw.example.com/mlflow/oidc/callback",
            "GATEWAY_OIDC_SCOPES": "openid profile email offline_access",
        }
    )
    assert settings.oidc_scopes == ("openid", "profile", "email", "offline_access")
    with pytest.raises(SettingsError, match="only used with GATEWAY_OIDC_CLIENT_ID"):
        load_settings(
            env={
                "GATEWAY_UPSTREAM_URL": "http://127.0.0.1:5001",
                "GATEWAY_JWT_SECRET": "s" * 40,
                "GATEWAY_OIDC_CLIENT_SECRET": "x",
            }
        )


def test_state_cookie_expires(oidc_gateway: GatewayFactory, provider: OidcProvider) -> None:
    """A login left at the provider longer than the state's lifetime cannot be finished."""
    from gateway.auth import oidc_login

    gw = oidc_gateway()
    started = begin(gw)
    back = authorize(provider, started)
    stale = oidc_login._state_fernet(SESSION_SECRET).encrypt_at_time(
        b'{"s": "%s", "n": "n", "v": "v", "r": "/"}' % back["state"].encode(), int(time.time()) - STATE_TTL_SECONDS - 5
    )
    response = callback(gw, back, stale.decode())
    assert response.status_code == 400
    assert "expired" in response.text


def test_discovery_is_fetched_once(oidc_gateway: GatewayFactory, provider: OidcProvider) -> None:
    before = provider.discovery_requests
    gw = oidc_gateway()
    for user in ("acme-alice", "globex-bob", "acme-alice"):
        assert log_in(gw, provider, user)
    # Once for the login's endpoints, once for the key source's jwks_uri: not once per login.
    assert provider.discovery_requests - before == 2


def test_under_a_root_path(oidc_gateway: GatewayFactory, provider: OidcProvider, fake: FakeUpstream) -> None:
    root = "/tools/mlflow"
    redirect = f"{GATEWAY}{root}/oidc/callback"
    provider.config.redirect_uris = [redirect]
    provider.config.post_logout_redirect_uris = [f"{GATEWAY}{root}/login"]
    gw = oidc_gateway(root_path=root, oidc_redirect_url=redirect)
    assert f'href="{root}/oidc/login"' in gw.client.get(f"{root}/login").text
    response = gw.client.get(f"{root}/oidc/login", params={"next": "/#/experiments"})
    assert response.status_code == 303
    value, header = set_cookies(response)[STATE_COOKIE]
    assert f"Path={root}/oidc;" in header
    params = {key: values[0] for key, values in parse_qs(urlsplit(response.headers["location"]).query).items()}
    assert params["redirect_uri"] == redirect
    answer = httpx.post(f"{provider.issuer}/authorize", data={**params, "username": "acme-alice"})
    back = {key: values[0] for key, values in parse_qs(urlsplit(answer.headers["location"]).query).items()}
    done = gw.client.get(f"{root}/oidc/callback", params=back, headers=cookie_header({STATE_COOKIE: value}))
    assert (done.status_code, done.headers["location"]) == (303, f"{root}/#/experiments")
    cookies = session_of(done)
    assert f"Path={root};" in set_cookies(done)[COOKIE_NAME][1]
    mine = fake.add_experiment("acme", "mine")
    got = gw.client.get(f"{root}{EXPERIMENT_GET}", params={"experiment_id": mine}, headers=cookie_header(cookies))
    assert got.status_code == 200
    out = gw.client.post(f"{root}/logout", headers={**cookie_header(cookies), "Origin": f"http://127.0.0.1:{gw.port}"})
    assert (
        f"post_logout_redirect_uri={GATEWAY}{root}/login".replace(":", "%3A").replace("/", "%2F")
        in out.headers["location"]
    )


def test_a_refresh_that_shrinks_the_session_clears_the_stale_chunks(
    oidc_gateway: GatewayFactory, provider: OidcProvider, fake: FakeUpstream
) -> None:
    provider.config.claim_padding = 1500
    provider.config.access_token_seconds = REFRESH_MARGIN_SECONDS - 10
    gw = oidc_gateway()
    cookies = log_in(gw, provider)
    assert len(cookies) >= 2
    provider.config.claim_padding = 0  # the refreshed tokens are small: one cookie
    mine = fake.add_experiment("acme", "mine")
    got = gw.client.get(EXPERIMENT_GET, params={"experiment_id": mine}, headers=cookie_header(cookies))
    assert got.status_code == 200
    written = set_cookies(got)
    assert written[COOKIE_NAME][0]
    assert {name for name, (value, _) in written.items() if value == ""} == set(cookies) - {COOKIE_NAME}
    fresh = session_of(got)
    assert set(fresh) == {COOKIE_NAME}
    again = gw.client.get(EXPERIMENT_GET, params={"experiment_id": mine}, headers=cookie_header(fresh))
    assert again.status_code == 200


def test_without_a_refresh_token_the_session_ends_with_the_access_token(
    oidc_gateway: GatewayFactory, provider: OidcProvider, fake: FakeUpstream
) -> None:
    provider.config.issue_refresh_tokens = False
    provider.config.access_token_seconds = 120
    gw = oidc_gateway()
    started = begin(gw)
    response = callback(gw, authorize(provider, started), started.state_cookie)
    header = set_cookies(response)[COOKIE_NAME][1]
    assert 110 <= int(header.split("Max-Age=")[1].split(";")[0]) <= 120
    cookies = session_of(response)
    session = SessionCodec(SESSION_SECRET).decode(cookies[COOKIE_NAME])
    assert session.refresh_token is None and session.id_token
    mine = fake.add_experiment("acme", "mine")
    got = gw.client.get(EXPERIMENT_GET, params={"experiment_id": mine}, headers=cookie_header(cookies))
    assert got.status_code == 200
    assert refresh_requests(provider) == []
    # Logout still ends the provider's session (the ID token is the hint).
    out = gw.client.post("/logout", headers={**cookie_header(cookies), "Origin": f"http://127.0.0.1:{gw.port}"})
    assert out.headers["location"].startswith(f"{provider.issuer}/logout?")
