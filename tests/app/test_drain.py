"""Graceful drain of one gateway process (gateway/serving.py), driven without real signals.

The server runs in a thread, so the signal handler is called directly; the real SIGTERM path through
``mlflow-gateway serve`` is tested in tests/integration/test_resilience.py.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from gateway.app import create_app
from gateway.serving import GatewayServer, uvicorn_config
from tests.app.conftest import ACME, API, FakeUpstream, Reply
from tests.factories import make_settings


@dataclass
class Running:
    server: GatewayServer
    url: str
    port: int
    thread: threading.Thread


@pytest.fixture
def draining_gateway(fake: FakeUpstream) -> Iterator[Running]:
    settings = make_settings(upstream_url=fake.url, drain_delay_seconds=1.0, shutdown_grace_seconds=5)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn_config(create_app(settings), settings)
    config.log_level = "critical"
    server = GatewayServer(config, drain_delay=settings.drain_delay_seconds)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.01)
    try:
        yield Running(server, f"http://127.0.0.1:{port}", port, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_draining_fails_ready_keeps_serving_then_refuses(draining_gateway: Running, fake: FakeUpstream) -> None:
    url, server = draining_gateway.url, draining_gateway.server
    assert httpx.get(f"{url}/ready").json() == {"status": "ready"}
    server.handle_exit(signal.SIGTERM, None)
    started = time.monotonic()
    ready = httpx.get(f"{url}/ready")
    assert ready.status_code == 503
    assert ready.json() == {"status": "draining"}
    assert httpx.get(f"{url}/health").status_code == 200
    # A new connection during the delay is still accepted and served.
    response = httpx.post(f"{url}{API}/experiments/create", json={"name": "late"}, headers=ACME)
    assert response.status_code == 200, response.text
    server.handle_exit(signal.SIGTERM, None)  # a repeated SIGTERM does not cut the delay short
    assert not server.should_exit
    draining_gateway.thread.join(timeout=10)
    assert not draining_gateway.thread.is_alive()
    assert time.monotonic() - started >= 0.9  # the port stayed open for the drain delay
    assert _refused(draining_gateway.port)


def test_in_flight_request_finishes_after_the_port_closes(draining_gateway: Running, fake: FakeUpstream) -> None:
    fake.on("POST", f"{API}/experiments/create", Reply(200, {"experiment_id": "5"}, delay=2.0))
    url, server = draining_gateway.url, draining_gateway.server
    results: list[httpx.Response] = []
    client = threading.Thread(
        target=lambda: results.append(httpx.post(f"{url}{API}/experiments/create", json={"name": "slow"}, headers=ACME))
    )
    client.start()
    deadline = time.monotonic() + 5
    while not fake.calls("POST", "experiments/create"):  # the request is in flight upstream
        assert time.monotonic() < deadline
        time.sleep(0.01)
    server.handle_exit(signal.SIGTERM, None)
    client.join(timeout=10)
    assert results and results[0].status_code == 200, results
    draining_gateway.thread.join(timeout=10)
    assert not draining_gateway.thread.is_alive()


def test_second_ctrl_c_ends_the_delay(draining_gateway: Running) -> None:
    server = draining_gateway.server
    server.drain_delay = 60  # the fixture's 1 s would end by itself
    server.handle_exit(signal.SIGINT, None)
    assert httpx.get(f"{draining_gateway.url}/ready").status_code == 503
    started = time.monotonic()
    server.handle_exit(signal.SIGINT, None)
    draining_gateway.thread.join(timeout=10)
    assert not draining_gateway.thread.is_alive()
    assert time.monotonic() - started < 5
