"""Rate limits and body-size limits through the gateway on a real uvicorn, in front of the fake MLflow.

Limits here are per replica (in memory); the Redis-shared variant runs against a real redis-server in
tests/integration/test_limits_redis.py. Rates are slow (0.1 token/s) so no token comes back during a
test unless the test waits for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from gateway.app import Gateway, create_app
from gateway.limits import RateLimitMiddleware
from gateway.middleware import AuthenticationMiddleware
from tests.app.conftest import (
    ACME,
    API,
    GLOBEX,
    FakeUpstream,
    GatewayUnderTest,
    assert_mlflow_error,
    send_raw,
)
from tests.factories import bearer, make_settings

SLOW = {"rate_limit_tenant_rps": 0.1}  # one token every ten seconds: nothing refills during a test


def get_experiment(gateway: GatewayUnderTest, experiment_id: str, headers: dict[str, str]) -> httpx.Response:
    return gateway.client.get(f"{API}/experiments/get", params={"experiment_id": experiment_id}, headers=headers)


def assert_rate_limited(response: httpx.Response, *, retry_after: tuple[int, int], owner: str) -> None:
    """A 429 in MLflow's error shape with a whole-seconds ``Retry-After`` in the given range."""
    body = assert_mlflow_error(response, 429, "REQUEST_LIMIT_EXCEEDED")
    assert owner in body["message"], body
    value = response.headers["retry-after"]
    assert value.isdigit(), value
    assert retry_after[0] <= int(value) <= retry_after[1], value
    assert response.headers.get("x-request-id")
    assert response.headers.get("cache-control") == "no-store"


def middleware_chain(app: Any) -> list[type]:
    """The ASGI layers from the outside in, following each middleware's ``app``."""
    chain: list[type] = []
    while app is not None and not isinstance(app, Gateway):
        chain.append(type(app))
        app = getattr(app, "app", None)
    return chain


# -- installation --------------------------------------------------------------------------------------------


def test_no_rate_limit_layer_when_no_limit_is_configured() -> None:
    assert RateLimitMiddleware not in middleware_chain(create_app(make_settings()))
    assert RateLimitMiddleware not in middleware_chain(
        create_app(make_settings(rate_limit_tenant_overrides=(("acme", 0.0, 5),)))
    )


def test_the_rate_limit_layer_sits_right_inside_authentication() -> None:
    chain = middleware_chain(create_app(make_settings(rate_limit_user_rps=1.0)))
    assert chain.index(RateLimitMiddleware) == chain.index(AuthenticationMiddleware) + 1


# -- per tenant ------------------------------------------------------------------------------------------------


def test_a_tenant_over_its_limit_gets_429_and_other_tenants_are_unaffected(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream
) -> None:
    gateway = start_gateway(**SLOW, rate_limit_tenant_burst=3)
    acme, globex = fake.add_experiment("acme", "a"), fake.add_experiment("globex", "g")
    assert [get_experiment(gateway, acme, ACME).status_code for _ in range(3)] == [200, 200, 200]
    refused = get_experiment(gateway, acme, ACME)
    assert_rate_limited(refused, retry_after=(9, 10), owner="tenant 'acme'")
    # Another user of the same tenant shares the tenant's bucket.
    assert_rate_limited(
        get_experiment(gateway, acme, bearer("acme", "carol")), retry_after=(9, 10), owner="tenant 'acme'"
    )
    assert len(fake.forwarded("GET", "experiments/get")) == 3, "a refused request never reaches MLflow"
    assert [get_experiment(gateway, globex, GLOBEX).status_code for _ in range(3)] == [200, 200, 200]
    assert get_experiment(gateway, globex, GLOBEX).status_code == 429


def test_a_token_comes_back_after_retry_after(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream
) -> None:
    gateway = start_gateway(rate_limit_tenant_rps=5.0, rate_limit_tenant_burst=1)
    acme = fake.add_experiment("acme", "a")
    assert get_experiment(gateway, acme, ACME).status_code == 200
    refused = get_experiment(gateway, acme, ACME)
    assert_rate_limited(refused, retry_after=(1, 1), owner="tenant 'acme'")  # 0.2 s, rounded up to 1
    time.sleep(0.25)
    assert get_experiment(gateway, acme, ACME).status_code == 200


def test_per_tenant_overrides(start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream) -> None:
    gateway = start_gateway(
        **SLOW, rate_limit_tenant_burst=1, rate_limit_tenant_overrides=(("acme", 0.1, 4), ("initech", 0.0, 0))
    )
    acme, globex = fake.add_experiment("acme", "a"), fake.add_experiment("globex", "g")
    initech = fake.add_experiment("initech", "i")
    assert [get_experiment(gateway, acme, ACME).status_code for _ in range(5)] == [200, 200, 200, 200, 429]
    assert [get_experiment(gateway, globex, GLOBEX).status_code for _ in range(2)] == [200, 429]
    initech_token = bearer("initech", "peter")
    assert {get_experiment(gateway, initech, initech_token).status_code for _ in range(10)} == {200}


# -- per user ----------------------------------------------------------------------------------------------------


def test_per_user_limits_are_per_user_within_a_tenant(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream
) -> None:
    gateway = start_gateway(rate_limit_user_rps=0.1, rate_limit_user_burst=2)
    acme, globex = fake.add_experiment("acme", "a"), fake.add_experiment("globex", "g")
    assert [get_experiment(gateway, acme, ACME).status_code for _ in range(2)] == [200, 200]
    assert_rate_limited(get_experiment(gateway, acme, ACME), retry_after=(9, 10), owner="user 'alice' of tenant 'acme'")
    assert get_experiment(gateway, acme, bearer("acme", "bob")).status_code == 200
    # The same user name in another tenant is another caller.
    assert get_experiment(gateway, globex, bearer("globex", "alice")).status_code == 200


def test_tenant_and_user_limits_together(start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream) -> None:
    gateway = start_gateway(**SLOW, rate_limit_tenant_burst=3, rate_limit_user_rps=0.1, rate_limit_user_burst=2)
    acme = fake.add_experiment("acme", "a")
    bob = bearer("acme", "bob")
    assert [get_experiment(gateway, acme, ACME).status_code for _ in range(2)] == [200, 200]
    assert_rate_limited(get_experiment(gateway, acme, ACME), retry_after=(9, 10), owner="user 'alice'")
    # alice's refused request did not use up a tenant token: bob still gets the third one.
    assert get_experiment(gateway, acme, bob).status_code == 200
    assert_rate_limited(get_experiment(gateway, acme, bob), retry_after=(9, 10), owner="tenant 'acme'")


# -- what is never limited ------------------------------------------------------------------------------------------


def test_public_paths_are_never_limited(start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream) -> None:
    gateway = start_gateway(**SLOW, rate_limit_tenant_burst=1, rate_limit_user_rps=0.1, rate_limit_user_burst=1)
    acme = fake.add_experiment("acme", "a")
    assert get_experiment(gateway, acme, ACME).status_code == 200
    assert get_experiment(gateway, acme, ACME).status_code == 429
    for _ in range(5):
        assert gateway.client.get("/health").status_code == 200
        assert gateway.client.get("/health", headers=ACME).status_code == 200  # a token does not make it count
        assert gateway.client.get("/ready", headers=ACME).status_code == 200


def test_unauthenticated_requests_are_refused_by_authentication_and_use_no_token(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream
) -> None:
    gateway = start_gateway(**SLOW, rate_limit_tenant_burst=1)
    acme = fake.add_experiment("acme", "a")
    for _ in range(5):
        assert_mlflow_error(get_experiment(gateway, acme, {}), 401, "UNAUTHENTICATED")
        assert_mlflow_error(
            get_experiment(gateway, acme, {"Authorization": "Bearer not-a-jwt"}), 401, "UNAUTHENTICATED"
        )
    assert get_experiment(gateway, acme, ACME).status_code == 200


# -- body size ------------------------------------------------------------------------------------------------------


def headers_only(port: int, method: str, target: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join([*lines, "Connection: close"]) + "\r\n\r\n").encode()


@pytest.mark.parametrize(
    ("method", "target", "setting"),
    [
        ("POST", f"{API}/experiments/create", "max_json_body_bytes"),  # JSON
        ("POST", "/v1/traces", "max_json_body_bytes"),  # RAW (OTLP)
        ("PUT", "/api/2.0/mlflow-artifacts/artifacts/1/run/artifacts/model.bin", "max_body_bytes"),  # STREAM
    ],
)
def test_a_declared_content_length_over_the_limit_is_refused_before_the_body_is_sent(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream, method: str, target: str, setting: str
) -> None:
    gateway = start_gateway(**{setting: 1000})
    # Only the headers are sent: a gateway waiting for the body would never answer.
    request = headers_only(
        gateway.port, method, target, {**ACME, "Content-Type": "application/json", "Content-Length": "1001"}
    )
    started = time.monotonic()
    response = send_raw(gateway.port, request)
    assert time.monotonic() - started < 5
    assert response.status == 413, response.body
    assert response.json()["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    fake.assert_untouched()


def test_expect_100_continue_gets_the_413_instead_of_continue(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream
) -> None:
    gateway = start_gateway(max_json_body_bytes=1000)
    headers = {**ACME, "Content-Type": "application/json", "Content-Length": "5000", "Expect": "100-continue"}
    response = send_raw(gateway.port, headers_only(gateway.port, "POST", f"{API}/runs/log-batch", headers))
    assert response.status == 413  # http.client would return the 100 if it came first
    fake.assert_untouched()


def test_an_oversized_body_sent_in_full_still_gets_the_413_and_the_connection_stays_usable(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream
) -> None:
    gateway = start_gateway(max_json_body_bytes=1000)
    with httpx.Client(base_url=gateway.server.url, timeout=10) as client:
        response = client.post(f"{API}/runs/log-batch", headers=ACME, json={"run_id": "r", "params": ["x" * 200_000]})
        assert_mlflow_error(response, 413, "REQUEST_LIMIT_EXCEEDED")
        assert client.get("/health").status_code == 200  # same keep-alive connection: the rest was drained
    fake.assert_untouched()


def test_a_chunked_json_body_over_the_limit_is_413(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream
) -> None:
    gateway = start_gateway(max_json_body_bytes=1000)
    chunks = iter([b'{"name": "', b"x" * 600, b"x" * 600, b'"}'])
    response = gateway.client.post(
        f"{API}/experiments/create", headers={**ACME, "Content-Type": "application/json"}, content=chunks
    )
    assert_mlflow_error(response, 413, "REQUEST_LIMIT_EXCEEDED")
    fake.assert_untouched()


def test_a_malformed_content_length_is_refused(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream
) -> None:
    gateway = start_gateway()
    request = headers_only(gateway.port, "POST", f"{API}/experiments/create", {**ACME, "Content-Length": "12abc"})
    response = send_raw(gateway.port, request)
    assert response.status == 400
    fake.assert_untouched()
