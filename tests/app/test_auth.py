"""Authentication: a request without a valid token is refused before any policy and any upstream call."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable

import httpx
import jwt
import pytest

from tests.app.conftest import (
    ACME,
    API,
    FakeUpstream,
    GatewayUnderTest,
    Reply,
    assert_mlflow_error,
    closed_port,
)
from tests.factories import SECRET, raw_token, token

OTHER_SECRET = "another-secret-that-is-also-long-enough-for-hs256"


def _b64url(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _unsigned_token() -> str:
    """A token with ``alg: none`` and no signature, claiming tenant acme."""
    claims = {"tenant_id": "acme", "sub": "alice", "exp": int(time.time()) + 3600}
    return f"{_b64url({'alg': 'none', 'typ': 'JWT'})}.{_b64url(claims)}."


def _forged_claims_token() -> str:
    """acme's valid signature pasted onto a payload that claims tenant globex."""
    header, _, signature = token("acme").split(".")
    claims = {"tenant_id": "globex", "sub": "alice", "exp": int(time.time()) + 3600}
    return f"{header}.{_b64url(claims)}.{signature}"


def _tampered_signature_token() -> str:
    header, payload, signature = token("acme").split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    return f"{header}.{payload}.{flipped}"


BAD_TOKENS: dict[str, Callable[[], str]] = {
    "expired": lambda: raw_token({"tenant_id": "acme", "sub": "alice", "exp": int(time.time()) - 3600}),
    "tampered signature": _tampered_signature_token,
    "forged claims": _forged_claims_token,
    "alg none": _unsigned_token,
    "other secret": lambda: token("acme", secret=OTHER_SECRET),
    "no exp": lambda: jwt.encode({"tenant_id": "acme", "sub": "alice"}, SECRET, algorithm="HS256"),
    "not yet valid": lambda: raw_token({"tenant_id": "acme", "sub": "alice", "nbf": int(time.time()) + 3600}),
    "no user": lambda: raw_token({"tenant_id": "acme"}),
    "roles not a list": lambda: raw_token({"tenant_id": "acme", "sub": "alice", "roles": {"admin": True}}),
    "not a jwt": lambda: "not-a-jwt",
    "empty segments": lambda: "..",
}

BAD_TENANT_IDS = [
    "ac_me",  # LIKE wildcard
    "ac%me",  # LIKE wildcard
    "Ac_me",  # upper case is folded, but the wildcard stays
    "ac/me",  # the experiment-name separator
    "ac.me",  # the registry-name separator
    "acme/globex",
    "",
    "-acme",
    "acme-",
    "a" * 64,
    "acme\n",
    " acme",
    "ac me",
]


def _get_experiment(client: httpx.Client, headers: dict[str, str] | None = None) -> httpx.Response:
    return client.get(f"{API}/experiments/get", params={"experiment_id": "1"}, headers=headers)


def test_no_token_is_401_and_the_upstream_is_untouched(client: httpx.Client, fake: FakeUpstream) -> None:
    response = _get_experiment(client)
    assert_mlflow_error(response, 401, "UNAUTHENTICATED")
    assert response.headers["www-authenticate"].startswith("Bearer")
    fake.assert_untouched()


@pytest.mark.parametrize("make", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
def test_invalid_tokens_are_401(client: httpx.Client, fake: FakeUpstream, make: Callable[[], str]) -> None:
    response = _get_experiment(client, {"Authorization": f"Bearer {make()}"})
    assert_mlflow_error(response, 401, "UNAUTHENTICATED")
    fake.assert_untouched()


@pytest.mark.parametrize("tenant", [*BAD_TENANT_IDS, None, ["acme"], 42])
def test_unsafe_tenant_ids_are_403(client: httpx.Client, fake: FakeUpstream, tenant: object) -> None:
    claims = {"sub": "u"} if tenant is None else {"tenant_id": tenant, "sub": "u"}
    response = _get_experiment(client, {"Authorization": f"Bearer {raw_token(claims)}"})
    body = assert_mlflow_error(response, 403, "PERMISSION_DENIED")
    assert "tenant_id" in body["message"]
    fake.assert_untouched()


@pytest.mark.parametrize("tenant", ["Acme", "ACME"])
def test_tenant_ids_are_lower_cased(client: httpx.Client, fake: FakeUpstream, tenant: str) -> None:
    experiment_id = fake.add_experiment("acme", "mine")
    token_ = raw_token({"tenant_id": tenant, "sub": "u"})
    response = client.get(
        f"{API}/experiments/get", params={"experiment_id": experiment_id}, headers={"Authorization": f"Bearer {token_}"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["experiment"]["name"] == "mine"


def test_algorithm_not_configured_is_401(client: httpx.Client, fake: FakeUpstream) -> None:
    # The gateway is configured for HS256 only; the token header cannot choose another algorithm.
    forged = raw_token({"tenant_id": "acme", "sub": "alice"}, secret=SECRET + SECRET, algorithm="HS384")
    assert_mlflow_error(_get_experiment(client, {"Authorization": f"Bearer {forged}"}), 401, "UNAUTHENTICATED")
    fake.assert_untouched()


@pytest.mark.parametrize(
    "authorization",
    ["Token abc", "Bearer", "Bearer  ,", "Basic", "Basic !!!not-base64!!!", "Digest username=alice"],
)
def test_malformed_authorization_is_401(client: httpx.Client, fake: FakeUpstream, authorization: str) -> None:
    assert_mlflow_error(_get_experiment(client, {"Authorization": authorization}), 401, "UNAUTHENTICATED")
    fake.assert_untouched()


def test_token_outside_the_authorization_header_is_ignored(client: httpx.Client, fake: FakeUpstream) -> None:
    jwt_ = token("acme")
    response = client.get(
        f"{API}/experiments/get",
        params={"experiment_id": "1", "access_token": jwt_},
        headers={"Cookie": f"mlflow-request-header-Authorization=Bearer {jwt_}", "X-Auth-Token": jwt_},
    )
    assert_mlflow_error(response, 401, "UNAUTHENTICATED")
    fake.assert_untouched()


def test_basic_auth_with_the_token_as_password(client: httpx.Client, fake: FakeUpstream) -> None:
    experiment_id = fake.add_experiment("acme", "basic")
    credentials = base64.b64encode(f"whoever:{token('acme')}".encode()).decode()
    response = client.get(
        f"{API}/experiments/get",
        params={"experiment_id": experiment_id},
        headers={"Authorization": f"Basic {credentials}"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["experiment"]["name"] == "basic"
    (forwarded,) = fake.forwarded("GET", "experiments/get")
    assert forwarded.header("authorization") is None


@pytest.mark.parametrize("userinfo", ["alice:", "no-separator", ":"])
def test_basic_auth_without_a_token_password_is_401(client: httpx.Client, fake: FakeUpstream, userinfo: str) -> None:
    credentials = base64.b64encode(userinfo.encode()).decode()
    response = _get_experiment(client, {"Authorization": f"Basic {credentials}"})
    assert_mlflow_error(response, 401, "UNAUTHENTICATED")
    fake.assert_untouched()


def test_basic_auth_with_an_invalid_token_password_is_401(client: httpx.Client, fake: FakeUpstream) -> None:
    credentials = base64.b64encode(f"alice:{token('acme', secret=OTHER_SECRET)}".encode()).decode()
    assert_mlflow_error(_get_experiment(client, {"Authorization": f"Basic {credentials}"}), 401, "UNAUTHENTICATED")
    fake.assert_untouched()


def test_two_authorization_headers_are_400(client: httpx.Client, fake: FakeUpstream) -> None:
    headers = [("Authorization", f"Bearer {token('acme')}"), ("Authorization", f"Bearer {token('globex')}")]
    response = client.get(f"{API}/experiments/get", params={"experiment_id": "1"}, headers=headers)
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


@pytest.mark.parametrize("scheme", ["Bearer", "Basic"])
def test_oversized_token_is_431(client: httpx.Client, fake: FakeUpstream, scheme: str) -> None:
    huge = "a" * 9000
    value = huge if scheme == "Bearer" else base64.b64encode(f"alice:{huge}".encode()).decode()
    response = _get_experiment(client, {"Authorization": f"{scheme} {value}"})
    assert_mlflow_error(response, 431, "REQUEST_LIMIT_EXCEEDED")
    fake.assert_untouched()


def test_token_just_over_the_limit_inside_basic_is_431(client: httpx.Client, fake: FakeUpstream) -> None:
    # The header fits (base64 of a short user + 8 KiB + 1), the decoded token does not.
    credentials = base64.b64encode(("u:" + "a" * (8 * 1024 + 1)).encode()).decode()
    response = _get_experiment(client, {"Authorization": f"Basic {credentials}"})
    assert response.status_code == 431
    fake.assert_untouched()


def test_every_route_but_health_and_ready_needs_a_token(client: httpx.Client, fake: FakeUpstream) -> None:
    for method, path in [
        ("GET", "/version"),
        ("GET", "/api/3.0/mlflow/server-info"),
        ("POST", f"{API}/runs/create"),
        ("POST", f"{API}/webhooks"),
        ("GET", "/no/such/route"),
    ]:
        assert_mlflow_error(client.request(method, path), 401, "UNAUTHENTICATED")
    fake.assert_untouched()


def test_health_needs_no_token_and_no_upstream(client: httpx.Client, fake: FakeUpstream) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response.headers["x-request-id"]
    fake.assert_untouched()


def test_ready_needs_no_token_and_probes_the_upstream(client: httpx.Client, fake: FakeUpstream) -> None:
    response = client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}
    assert [(r.method, r.path) for r in fake.requests] == [("GET", "/health")]
    assert fake.requests[0].header("authorization") is None


def test_ready_is_503_when_the_upstream_is_down(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream
) -> None:
    gateway = start_gateway(upstream_url=f"http://127.0.0.1:{closed_port()}")
    response = gateway.client.get("/ready")
    assert response.status_code == 503
    assert response.json() == {"status": "upstream unavailable"}
    assert gateway.client.get("/health").status_code == 200


def test_ready_is_503_when_the_upstream_is_unhealthy(client: httpx.Client, fake: FakeUpstream) -> None:
    fake.on("GET", "/health", Reply(500, "boom"))
    assert client.get("/ready").status_code == 503


def test_a_valid_token_passes(client: httpx.Client, fake: FakeUpstream) -> None:
    experiment_id = fake.add_experiment("acme", "ok")
    response = client.get(f"{API}/experiments/get", params={"experiment_id": experiment_id}, headers=ACME)
    assert response.status_code == 200, response.text
