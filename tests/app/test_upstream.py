"""Upstream failures and response handling: always MLflow's error shape, never internal details."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.app.conftest import (
    ACME,
    API,
    FakeUpstream,
    GatewayUnderTest,
    Reply,
    ServerThread,
    assert_mlflow_error,
    closed_port,
)

LEAKY_MESSAGE = (
    "(sqlite3.OperationalError) database is locked: sqlite:////data/mlflow.db while running "
    'File "/srv/mlflow/store/x.py", line 12; also see postgresql://mlflow:hunter2@db.internal:5432/mlflow '
    "and /var/lib/mlflow/artifacts/1"
)
INTERNAL_DETAILS = ["sqlite:", "/data/mlflow.db", "/srv/mlflow/store/x.py", "hunter2", "postgresql://", "/var/lib/"]


@pytest.fixture
def down_gateway(start_gateway: Callable[..., GatewayUnderTest]) -> GatewayUnderTest:
    """A gateway whose upstream is a closed port."""
    return start_gateway(upstream_url=f"http://127.0.0.1:{closed_port()}")


# -- upstream down, slow, broken ---------------------------------------------------------------------------


def test_upstream_down_is_503_with_retry_after(down_gateway: GatewayUnderTest) -> None:
    response = down_gateway.client.post(f"{API}/experiments/create", headers=ACME, json={"name": "x"})
    assert_mlflow_error(response, 503, "TEMPORARILY_UNAVAILABLE")
    assert int(response.headers["retry-after"]) > 0
    assert response.headers["x-request-id"]


def test_upstream_down_during_an_ownership_lookup_is_503(down_gateway: GatewayUnderTest) -> None:
    response = down_gateway.client.get(f"{API}/runs/get", params={"run_id": "a" * 32}, headers=ACME)
    assert_mlflow_error(response, 503, "TEMPORARILY_UNAVAILABLE")
    assert "retry-after" in response.headers


def test_slow_upstream_is_504(start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream) -> None:
    gateway = start_gateway(upstream_timeout=0.2)
    fake.on("POST", f"{API}/experiments/create", Reply(200, {"experiment_id": "1"}, delay=0.8))
    response = gateway.client.post(f"{API}/experiments/create", headers=ACME, json={"name": "x"})
    assert_mlflow_error(response, 504, "DEADLINE_EXCEEDED")
    assert len(fake.calls("POST", "experiments/create")) == 1  # sent once, not retried by the gateway


def test_slow_ownership_lookup_is_504(start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream) -> None:
    gateway = start_gateway(upstream_timeout=0.2)
    fake.on("GET", f"{API}/runs/get", Reply(200, {}, delay=0.8))
    response = gateway.client.get(f"{API}/runs/get", params={"run_id": "b" * 32}, headers=ACME)
    assert_mlflow_error(response, 504, "DEADLINE_EXCEEDED")


def test_stalled_body_of_a_buffered_response_is_504(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream
) -> None:
    gateway = start_gateway(upstream_timeout=0.2)
    experiment_id = fake.add_experiment("acme", "slow")
    url, params = f"{API}/experiments/get", {"experiment_id": experiment_id}
    assert gateway.client.get(url, params=params, headers=ACME).status_code == 200  # ownership now cached
    experiment = {"experiment": {"experiment_id": experiment_id, "name": "acme/slow"}}
    fake.on("GET", url, Reply(200, experiment, body_delay=0.8))  # headers at once, then the body stalls
    response = gateway.client.get(url, params=params, headers=ACME)
    assert_mlflow_error(response, 504, "DEADLINE_EXCEEDED")


def test_stalled_body_of_a_small_relayed_answer_is_504_not_a_cut_200(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream
) -> None:
    # runs/get is relayed untouched; an answer this small is read whole before anything is sent, so a
    # stall is still an MLflow-shaped 504 rather than a 200 whose body never ends.
    gateway = start_gateway(upstream_timeout=0.2)
    run_id = fake.add_run(fake.add_experiment("acme", "slow-relay"))
    url, params = f"{API}/runs/get", {"run_id": run_id}
    assert gateway.client.get(url, params=params, headers=ACME).status_code == 200  # ownership now cached
    run = {"run": {"info": {"run_id": run_id, "experiment_id": "1"}, "data": {}}}
    fake.on("GET", url, Reply(200, run, body_delay=0.8))
    response = gateway.client.get(url, params=params, headers=ACME)
    assert_mlflow_error(response, 504, "DEADLINE_EXCEEDED")


class EndlessUpstream:
    """Answers with an unsized body of ``CHUNK`` every few ms, up to ``LIMIT`` chunks; notes when its client goes."""

    CHUNK = b"x" * 65536
    LIMIT = 4000  # 20 s or more: far past the test's wait

    def __init__(self) -> None:
        self.chunks_sent = 0
        self.client_gone = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/javascript")]})
        try:
            while not gone.is_set() and self.chunks_sent < self.LIMIT:
                await send({"type": "http.response.body", "body": self.CHUNK, "more_body": True})
                self.chunks_sent += 1
                await asyncio.sleep(0.005)
            if gone.is_set():
                self.client_gone.set()
            else:
                await send({"type": "http.response.body", "body": b""})
        finally:
            watcher.cancel()


def test_a_streamed_answer_stops_being_read_when_the_client_leaves(
    start_gateway: Callable[..., GatewayUnderTest],
) -> None:
    # uvicorn's send() does nothing once the client has gone: the gateway must notice the disconnect itself,
    # close its upstream connection and stop reading, not pull the rest of the answer for nobody.
    upstream = EndlessUpstream()
    server = ServerThread(upstream, lifespan="off").start()  # type: ignore[arg-type]
    try:
        gateway = start_gateway(upstream_url=server.url)
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as client:
            client.sendall(b"GET /static-files/static/js/big.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            received = b""
            while len(received) < 4 * len(EndlessUpstream.CHUNK):
                data = client.recv(65536)
                assert data, "the gateway closed the response early"
                received += data
            assert received.startswith(b"HTTP/1.1 200 ")
        assert upstream.client_gone.wait(10), f"the gateway kept reading: {upstream.chunks_sent} chunks"
        assert upstream.chunks_sent < EndlessUpstream.LIMIT
    finally:
        server.stop()


def test_upstream_500_keeps_the_status_and_redacts_internal_details(client: httpx.Client, fake: FakeUpstream) -> None:
    fake.on(
        "POST",
        f"{API}/experiments/create",
        Reply(500, {"error_code": "INTERNAL_ERROR", "message": LEAKY_MESSAGE, "stack_trace": "Traceback ..."}),
    )
    response = client.post(f"{API}/experiments/create", headers=ACME, json={"name": "x"})
    body = assert_mlflow_error(response, 500, "INTERNAL_ERROR")
    for detail in INTERNAL_DETAILS:
        assert detail not in body["message"], body["message"]
    assert "database is locked" in body["message"]
    assert "Traceback" not in response.text


@pytest.mark.parametrize("status", [500, 502, 503])
def test_upstream_5xx_error_code_is_kept(client: httpx.Client, fake: FakeUpstream, status: int) -> None:
    fake.on(
        "POST",
        f"{API}/experiments/create",
        Reply(status, {"error_code": "TEMPORARILY_UNAVAILABLE", "message": "at /srv/mlflow/store/x.py"}),
    )
    response = client.post(f"{API}/experiments/create", headers=ACME, json={"name": "x"})
    body = assert_mlflow_error(response, status, "TEMPORARILY_UNAVAILABLE")
    assert "/srv/" not in body["message"]


def test_upstream_500_html_traceback_is_replaced(client: httpx.Client, fake: FakeUpstream) -> None:
    fake.on(
        "POST",
        f"{API}/experiments/create",
        Reply(
            500,
            "<html><pre>Traceback: /srv/mlflow/store/x.py sqlite:////data/mlflow.db</pre></html>",
            content_type="text/html",
        ),
    )
    response = client.post(f"{API}/experiments/create", headers=ACME, json={"name": "x"})
    assert_mlflow_error(response, 500, "INTERNAL_ERROR", "Upstream MLflow answered HTTP 500")


def test_upstream_5xx_during_an_ownership_lookup_is_a_clean_502(client: httpx.Client, fake: FakeUpstream) -> None:
    fake.on("GET", f"{API}/runs/get", Reply(500, {"error_code": "INTERNAL_ERROR", "message": LEAKY_MESSAGE}))
    run_id = "c" * 32
    response = client.get(f"{API}/runs/get", params={"run_id": run_id}, headers=ACME)
    body = assert_mlflow_error(response, 502, "INTERNAL_ERROR")
    for detail in INTERNAL_DETAILS:
        assert detail not in body["message"]
    assert fake.forwarded() == []


def test_upstream_non_json_404_is_mlflow_shaped(client: httpx.Client, fake: FakeUpstream) -> None:
    run_id = fake.add_run(fake.add_experiment("acme", "mine"))
    fake.on(
        "POST",
        f"{API}/runs/log-parameter",
        Reply(404, "<!doctype html><title>404 Not Found</title><p>/srv/www</p>", content_type="text/html"),
    )
    response = client.post(f"{API}/runs/log-parameter", headers=ACME, json={"run_id": run_id, "key": "p", "value": "1"})
    assert_mlflow_error(response, 404, "ENDPOINT_NOT_FOUND", "Upstream MLflow answered HTTP 404")


def test_upstream_json_error_without_a_message_is_mlflow_shaped(client: httpx.Client, fake: FakeUpstream) -> None:
    fake.on("POST", f"{API}/experiments/create", Reply(400, {"detail": "bad"}))
    response = client.post(f"{API}/experiments/create", headers=ACME, json={"name": "x"})
    assert_mlflow_error(response, 400, "BAD_REQUEST", "Upstream MLflow answered HTTP 400")


def test_upstream_invalid_json_error_is_mlflow_shaped(client: httpx.Client, fake: FakeUpstream) -> None:
    fake.on(
        "POST", f"{API}/experiments/create", Reply(500, b'{"message": "/srv/x/y.py', content_type="application/json")
    )
    response = client.post(f"{API}/experiments/create", headers=ACME, json={"name": "x"})
    assert_mlflow_error(response, 500, "INTERNAL_ERROR", "Upstream MLflow answered HTTP 500")


# -- error bodies and messages ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 404, 409, 500])
def test_upstream_error_bodies_keep_only_code_and_message(
    client: httpx.Client, fake: FakeUpstream, status: int
) -> None:
    run_id = fake.add_run(fake.add_experiment("acme", "mine"))
    fake.on(
        "POST",
        f"{API}/runs/log-parameter",
        Reply(
            status,
            {
                "error_code": "INVALID_PARAMETER_VALUE",
                "message": "Changing param values is not allowed.",
                "stack_trace": "Traceback (most recent call last): ...",
                "details": {"host": "mlflow-0"},
            },
        ),
    )
    response = client.post(f"{API}/runs/log-parameter", headers=ACME, json={"run_id": run_id, "key": "p", "value": "2"})
    assert response.json() == {
        "error_code": "INVALID_PARAMETER_VALUE",
        "message": "Changing param values is not allowed.",
    }
    assert response.status_code == status


@pytest.mark.parametrize(
    ("upstream_message", "client_message"),
    [
        ("Experiment(name=acme/x) already exists", "Experiment(name=x) already exists"),
        (
            "Experiment(name=acme/x) already exists. Error: UNIQUE constraint failed: experiments.name",
            "Experiment(name=x) already exists. Error: UNIQUE constraint failed: experiments.name",
        ),
    ],
)
def test_already_exists_message_is_stripped(
    client: httpx.Client, fake: FakeUpstream, upstream_message: str, client_message: str
) -> None:
    fake.on(
        "POST",
        f"{API}/experiments/create",
        Reply(400, {"error_code": "RESOURCE_ALREADY_EXISTS", "message": upstream_message, "stack_trace": "..."}),
    )
    response = client.post(f"{API}/experiments/create", headers=ACME, json={"name": "x"})
    assert_mlflow_error(response, 400, "RESOURCE_ALREADY_EXISTS", client_message)


def test_creating_an_existing_experiment_twice(client: httpx.Client, fake: FakeUpstream) -> None:
    assert client.post(f"{API}/experiments/create", headers=ACME, json={"name": "dup"}).status_code == 200
    response = client.post(f"{API}/experiments/create", headers=ACME, json={"name": "dup"})
    body = assert_mlflow_error(response, 400, "RESOURCE_ALREADY_EXISTS")
    assert body["message"].startswith("Experiment(name=dup) already exists")
    assert "acme/" not in body["message"]


def test_get_by_name_not_found_message_is_stripped(client: httpx.Client, fake: FakeUpstream) -> None:
    response = client.get(f"{API}/experiments/get-by-name", params={"experiment_name": "nope"}, headers=ACME)
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", "Could not find experiment with name 'nope'")


def test_only_the_callers_own_prefix_is_stripped(client: httpx.Client, fake: FakeUpstream) -> None:
    fake.on(
        "POST",
        f"{API}/experiments/create",
        Reply(400, {"error_code": "RESOURCE_ALREADY_EXISTS", "message": "x-acme/y and acme/z and acme/acme/w"}),
    )
    response = client.post(f"{API}/experiments/create", headers=ACME, json={"name": "z"})
    assert response.json()["message"] == "x-acme/y and z and acme/w"


# -- successful responses ------------------------------------------------------------------------------------


def test_unrewritten_success_is_passed_through_untouched(client: httpx.Client, fake: FakeUpstream) -> None:
    run_id = fake.add_run(fake.add_experiment("acme", "mine"))
    assert client.get(f"{API}/runs/get", params={"run_id": run_id}, headers=ACME).status_code == 200  # cached now
    payload = (
        b'{"run": {"info": {"run_id": "%s"}, "data": {"metrics": [{"value": NaN}]}},   "extra": 1}' % run_id.encode()
    )
    fake.on("GET", f"{API}/runs/get", Reply(200, payload, content_type="application/json"))
    response = client.get(f"{API}/runs/get", params={"run_id": run_id}, headers=ACME)
    assert response.status_code == 200
    assert response.content == payload
    assert response.headers["content-type"] == "application/json"


def test_rewritten_success_keeps_nan_values(client: httpx.Client, fake: FakeUpstream) -> None:
    experiment_id = fake.add_experiment("acme", "nan")
    url, params = f"{API}/experiments/get", {"experiment_id": experiment_id}
    assert client.get(url, params=params, headers=ACME).status_code == 200  # cached now
    payload = b'{"experiment": {"experiment_id": "%s", "name": "acme/nan", "x": NaN}}' % experiment_id.encode()
    fake.on("GET", url, Reply(200, payload, content_type="application/json"))
    response = client.get(url, params=params, headers=ACME)
    assert response.status_code == 200
    decoded = json.loads(response.text)  # the stdlib reads NaN literals back
    assert decoded["experiment"]["name"] == "nan"
    assert math.isnan(decoded["experiment"]["x"])
    assert response.headers["content-length"] == str(len(response.content))
