"""Headers are built, not copied: the upstream sees an allow-list plus what the gateway sets."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable

import httpx
import pytest

from tests.app.conftest import ACME, API, GLOBEX, FakeUpstream, GatewayUnderTest, Reply, assert_mlflow_error
from tests.factories import token

HOSTILE_HEADERS = {
    "Cookie": "session=stolen; mlflow-request-header-Authorization=Bearer x",
    "Origin": "http://attacker.example",
    "Referer": "http://attacker.example/page",
    "X-MLFLOW-WORKSPACE": "globex",
    "X-Forwarded-For": "8.8.8.8",
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-Proto": "https",
    "X-Real-IP": "8.8.8.8",
    "Forwarded": "for=8.8.8.8;host=evil.example",
    "X-Tenant-Id": "globex",
    "X-User-Id": "admin",
    "Remote-User": "admin",
    "Proxy-Authorization": "Basic YWRtaW46YWRtaW4=",
    "X-Mlflow-Experiment-Id": "0",
    "Transfer-Encoding-Hint": "chunked",
    "X_MLFLOW_WORKSPACE": "globex",
    "X-Mlflow_Workspace": "globex",
    "X-Forwarded-User": "admin",
    "X-Matih-Tenant-Id": "globex",
    "X-Matih-User-Id": "admin",
    "X-Matih-Job-Id": "job-label",
    "Connection": "keep-alive, X-Hop-Secret",
    "X-Hop-Secret": "1",
}
NEVER_FORWARDED = {name.lower() for name in HOSTILE_HEADERS} - {"x-forwarded-for", "connection"}
REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


def _owned_run(fake: FakeUpstream) -> str:
    return fake.add_run(fake.add_experiment("acme", "headers"))


def test_client_identity_and_routing_headers_never_reach_the_upstream(client: httpx.Client, fake: FakeUpstream) -> None:
    run_id = _owned_run(fake)
    response = client.get(f"{API}/runs/get", params={"run_id": run_id}, headers={**ACME, **HOSTILE_HEADERS})
    assert response.status_code == 200, response.text
    (forwarded,) = fake.forwarded()
    assert forwarded.header("authorization") is None
    assert not (forwarded.header_names & NEVER_FORWARDED), forwarded.headers
    assert forwarded.header_values("x-forwarded-for") == ["127.0.0.1"]
    assert forwarded.header("x-forwarded-proto") is None  # the client's "https" is dropped, none is added
    assert forwarded.header("host") == fake.url.removeprefix("http://")


def test_upstream_headers_are_exactly_the_allow_list_plus_the_gateways(
    client: httpx.Client, fake: FakeUpstream
) -> None:
    run_id = _owned_run(fake)
    headers = {**ACME, "Accept": "application/json", "Accept-Language": "fr", "X-Custom": "1"}
    assert client.post(f"{API}/runs/set-tag", headers=headers, json={"run_id": run_id, "key": "k", "value": "v"})
    (forwarded,) = fake.forwarded("POST", "runs/set-tag")
    assert forwarded.header_names == {
        "host",
        "accept",
        "accept-language",
        "user-agent",
        "x-forwarded-for",
        "x-request-id",
        "accept-encoding",
        "content-type",
        "content-length",
    }
    assert forwarded.header("accept-encoding") == "identity"
    assert forwarded.header("accept-language") == "fr"


def test_basic_credentials_are_not_forwarded(client: httpx.Client, fake: FakeUpstream) -> None:
    run_id = _owned_run(fake)
    credentials = base64.b64encode(f"alice:{token('acme')}".encode()).decode()
    response = client.get(
        f"{API}/runs/get", params={"run_id": run_id}, headers={"Authorization": f"Basic {credentials}"}
    )
    assert response.status_code == 200
    assert all(request.header("authorization") is None for request in fake.requests)


def test_the_upstream_always_gets_a_request_id_and_the_client_sees_it(client: httpx.Client, fake: FakeUpstream) -> None:
    run_id = _owned_run(fake)
    response = client.get(f"{API}/runs/get", params={"run_id": run_id}, headers=ACME)
    request_id = response.headers["x-request-id"]
    assert REQUEST_ID.match(request_id)
    (forwarded,) = fake.forwarded()
    assert forwarded.header_values("x-request-id") == [request_id]


def test_a_well_formed_client_request_id_is_kept(client: httpx.Client, fake: FakeUpstream) -> None:
    run_id = _owned_run(fake)
    response = client.get(
        f"{API}/runs/get", params={"run_id": run_id}, headers={**ACME, "X-Request-Id": "trace-1234.ab_C"}
    )
    assert response.headers.get_list("x-request-id") == ["trace-1234.ab_C"]
    (forwarded,) = fake.forwarded()
    assert forwarded.header_values("x-request-id") == ["trace-1234.ab_C"]


@pytest.mark.parametrize("bad", ["short", "x" * 129, "has space in it", "semi;colon;id", "<script>alert</script>"])
def test_a_malformed_client_request_id_is_replaced(client: httpx.Client, fake: FakeUpstream, bad: str) -> None:
    run_id = _owned_run(fake)
    response = client.get(f"{API}/runs/get", params={"run_id": run_id}, headers={**ACME, "X-Request-Id": bad})
    (request_id,) = response.headers.get_list("x-request-id")
    assert REQUEST_ID.match(request_id)
    (forwarded,) = fake.forwarded()
    assert forwarded.header_values("x-request-id") == [request_id]


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", f"{API}/runs/get", {}, 401),
        ("GET", f"{API}/nope", ACME, 403),
        ("GET", f"{API}/experiments/get?experiment_id=1&experiment_id=2", ACME, 400),
        ("GET", f"{API}/experiments/get?experiment_id=abc", ACME, 404),
    ],
)
def test_gateway_errors_carry_the_request_id(
    client: httpx.Client, fake: FakeUpstream, method: str, path: str, headers: dict[str, str], status: int
) -> None:
    response = client.request(method, path, headers={**headers, "X-Request-Id": "req-from-client-1"})
    assert response.status_code == status
    assert response.headers.get_list("x-request-id") == ["req-from-client-1"]
    assert response.headers["cache-control"] == "no-store"


def test_upstream_response_headers_are_filtered(client: httpx.Client, fake: FakeUpstream) -> None:
    run_id = _owned_run(fake)
    fake.on(
        "POST",
        f"{API}/runs/log-parameter",
        Reply(
            200,
            {},
            headers=(
                ("Set-Cookie", "upstream-session=1"),
                ("X-Request-Id", "upstream-chosen-id"),
                ("Access-Control-Allow-Origin", "*"),
                ("X-Internal-Host", "mlflow-0.internal"),
                ("ETag", '"abc"'),
                ("X-Frame-Options", "SAMEORIGIN"),  # as MLflow answers: the gateway's own replaces it
                ("vary", "Origin"),
            ),
        ),
    )
    response = client.post(
        f"{API}/runs/log-parameter",
        headers={**ACME, "X-Request-Id": "client-chosen-id"},
        json={"run_id": run_id, "key": "p", "value": "1"},
    )
    assert response.status_code == 200
    assert "set-cookie" not in response.headers
    assert "access-control-allow-origin" not in response.headers
    assert "x-internal-host" not in response.headers
    assert response.headers["etag"] == '"abc"'
    assert response.headers.get_list("x-request-id") == ["client-chosen-id"]
    assert response.headers.get_list("x-frame-options") == ["DENY"]
    assert "vary" not in response.headers


def test_tenant_cannot_be_chosen_by_a_header(client: httpx.Client, fake: FakeUpstream) -> None:
    response = client.post(
        f"{API}/experiments/create",
        headers={**ACME, "X-MLFLOW-WORKSPACE": "globex", "X-Tenant-Id": "globex"},
        json={"name": "mine"},
    )
    assert response.status_code == 200, response.text
    (forwarded,) = fake.forwarded("POST", "experiments/create")
    assert forwarded.json()["name"] == "acme/mine"
    assert forwarded.header("x-mlflow-workspace") is None


def test_ownership_lookups_carry_the_request_id_and_forwarded_for(client: httpx.Client, fake: FakeUpstream) -> None:
    run_id = _owned_run(fake)
    response = client.get(f"{API}/runs/get", params={"run_id": run_id}, headers={**ACME, "X-Request-Id": "lookup-id-1"})
    assert response.status_code == 200
    lookups = fake.lookups()
    assert lookups, "expected ownership look-ups"
    for request in lookups:
        assert request.header("x-request-id") == "lookup-id-1"
        assert request.header("x-forwarded-for") == "127.0.0.1"


def test_unauthenticated_errors_do_not_leak_the_token(client: httpx.Client, fake: FakeUpstream) -> None:
    forged = token("acme", secret="a-completely-different-secret-of-enough-length")
    response = client.get(f"{API}/runs/get", params={"run_id": "x"}, headers={"Authorization": f"Bearer {forged}"})
    body = assert_mlflow_error(response, 401, "UNAUTHENTICATED")
    assert forged not in body["message"]
    fake.assert_untouched()


def test_upstream_cookies_are_never_kept_nor_sent_for_later_requests(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream
) -> None:
    # A host name, not 127.0.0.1: a cookie jar ignores cookies from IP addresses, but not from
    # "mlflow.internal" or a load balancer in front of MLflow. One shared jar would replay a cookie set
    # on one tenant's request to the upstream on every other tenant's requests.
    gateway = start_gateway(upstream_url=fake.url.replace("127.0.0.1", "localhost"))
    acme_run, globex_run = _owned_run(fake), fake.add_run(fake.add_experiment("globex", "headers"))
    fake.on_mlflow(
        "POST", "runs/log-parameter", Reply(200, {}, headers=(("Set-Cookie", "session=acme-secret; Path=/"),))
    )
    params = {"key": "p", "value": "1"}
    assert gateway.client.post(f"{API}/runs/log-parameter", headers=ACME, json={"run_id": acme_run, **params})
    response = gateway.client.post(f"{API}/runs/log-parameter", headers=GLOBEX, json={"run_id": globex_run, **params})
    assert response.status_code == 200, response.text
    assert len(fake.forwarded("POST", "runs/log-parameter")) == 2
    assert all(request.header("cookie") is None for request in fake.requests), [r.headers for r in fake.requests]
