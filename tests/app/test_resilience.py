"""Upstream connection failures: which requests the gateway re-sends (GET/HEAD, once) and which never.

The fake upstream here is a raw socket server, because the failures under test happen below HTTP: it
reads a whole request (so it counts as having *arrived*), then closes the connection without a byte of
response, either cleanly (FIN, what a stale pooled keep-alive connection looks like) or abortively
(RST: connection reset). A request the upstream received must never be sent twice unless it is an
idempotent GET/HEAD without a body.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from gateway.app import create_app
from gateway.errors import UpstreamUnavailable
from gateway.http.upstream import UpstreamClient
from tests.app.conftest import ACME, API, USER_AGENT, ServerThread, assert_mlflow_error
from tests.factories import make_settings


@dataclass(frozen=True)
class Arrival:
    """One request the fake upstream read completely."""

    method: str
    path: str
    connection: int  # which accepted connection (1, 2, ...)
    index_on_connection: int  # 1 for the first request on that connection


DropRule = Callable[[Arrival], bool]


class DroppingUpstream:
    """A tiny HTTP/1.1 keep-alive server that drops the requests ``drop`` selects after reading them."""

    def __init__(self, *, reset: bool = False) -> None:
        self.reset = reset
        self.drop: DropRule = lambda _arrival: False
        self.arrivals: list[Arrival] = []
        self.dropped: list[Arrival] = []
        self._lock = threading.Lock()
        self._connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def calls(self, method: str) -> list[Arrival]:
        with self._lock:
            return [arrival for arrival in self.arrivals if arrival.method == method]

    def close(self) -> None:
        self._listener.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._connections += 1
                number = self._connections
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        with conn:
            reader = conn.makefile("rb")
            index = 0
            while True:
                request_line = reader.readline()
                if not request_line.strip():
                    return
                method, target, _ = request_line.decode().split(" ", 2)
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode().partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                if length:
                    reader.read(length)
                index += 1
                arrival = Arrival(method, target.split("?")[0], number, index)
                with self._lock:
                    self.arrivals.append(arrival)
                    drop = self.drop(arrival)
                    if drop:
                        self.dropped.append(arrival)
                if drop:
                    if self.reset:  # SO_LINGER 0: close() sends RST instead of FIN
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                conn.sendall(_answer(method, arrival.path))


def _answer(method: str, path: str) -> bytes:
    if path == "/health":
        body, content_type = b"OK", "text/plain"
    elif path.endswith("/experiments/get"):
        experiment = {"experiment_id": "7", "name": "acme/kept", "lifecycle_stage": "active", "tags": []}
        body, content_type = json.dumps({"experiment": experiment}).encode(), "application/json"
    elif path.endswith("/experiments/create"):
        body, content_type = b'{"experiment_id": "8"}', "application/json"
    else:
        body, content_type = b"{}", "application/json"
    head = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + (b"" if method == "HEAD" else body)


@pytest.fixture(params=[False, True], ids=["fin", "rst"])
def upstream(request: pytest.FixtureRequest) -> Iterator[DroppingUpstream]:
    server = DroppingUpstream(reset=request.param)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def gateway(upstream: DroppingUpstream) -> Iterator[httpx.Client]:
    server = ServerThread(create_app(make_settings(upstream_url=upstream.url))).start()
    try:
        with httpx.Client(base_url=server.url, timeout=10, headers={"User-Agent": USER_AGENT}) as client:
            yield client
    finally:
        server.stop()


def _first(method: str) -> DropRule:
    """Drop the first request with ``method``."""
    seen: list[Arrival] = []

    def drop(arrival: Arrival) -> bool:
        if arrival.method != method:
            return False
        seen.append(arrival)
        return len(seen) == 1

    return drop


def _reused(method: str) -> DropRule:
    """Drop the first ``method`` request sent on an already used (pooled keep-alive) connection."""
    done: list[Arrival] = []

    def drop(arrival: Arrival) -> bool:
        if arrival.method != method or arrival.index_on_connection < 2 or done:
            return False
        done.append(arrival)
        return True

    return drop


@pytest.mark.parametrize("rule", [_first, _reused], ids=["fresh-connection", "stale-keep-alive"])
def test_a_get_is_sent_again_once_when_its_connection_fails(
    upstream: DroppingUpstream, gateway: httpx.Client, rule: Callable[[str], DropRule]
) -> None:
    assert gateway.get("/ready").status_code == 200  # a pooled connection now exists
    upstream.drop = rule("GET")
    response = gateway.get(f"{API}/experiments/get", params={"experiment_id": "7"}, headers=ACME)
    assert response.status_code == 200, response.text
    assert response.json()["experiment"]["name"] == "kept"
    assert len(upstream.dropped) == 1
    # The dropped request arrived and was sent again: one more arrival than the successful exchanges.
    gets = [arrival for arrival in upstream.calls("GET") if arrival.path.endswith("/experiments/get")]
    assert len(gets) == 3  # ownership look-up + forwarded read + the one re-sent


def test_a_get_is_retried_only_once(upstream: DroppingUpstream, gateway: httpx.Client) -> None:
    upstream.drop = lambda arrival: arrival.method == "GET" and arrival.path.endswith("/experiments/get")
    response = gateway.get(f"{API}/experiments/get", params={"experiment_id": "7"}, headers=ACME)
    assert_mlflow_error(response, 503, "TEMPORARILY_UNAVAILABLE")
    assert int(response.headers["retry-after"]) > 0
    assert len(upstream.calls("GET")) == 2


@pytest.mark.parametrize("rule", [_first, _reused], ids=["fresh-connection", "stale-keep-alive"])
def test_a_post_is_never_sent_twice(
    upstream: DroppingUpstream, gateway: httpx.Client, rule: Callable[[str], DropRule]
) -> None:
    assert gateway.get("/ready").status_code == 200
    upstream.drop = rule("POST")
    response = gateway.post(f"{API}/experiments/create", json={"name": "once"}, headers=ACME)
    assert_mlflow_error(response, 503, "TEMPORARILY_UNAVAILABLE")
    assert "retry-after" in response.headers
    assert len(upstream.calls("POST")) == 1
    # The next POST goes through: the broken connection was not kept in the pool.
    response = gateway.post(f"{API}/experiments/create", json={"name": "twice"}, headers=ACME)
    assert response.status_code == 200, response.text
    assert len(upstream.calls("POST")) == 2


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "POST"])
def test_the_client_never_resends_a_non_retried_method_on_a_stale_connection(
    upstream: DroppingUpstream, method: str
) -> None:
    """A PUT/DELETE (RFC 9110: idempotent) is not re-sent either: MLflow's handlers are not written for it."""

    async def scenario() -> None:
        client = UpstreamClient(upstream.url, connect_timeout=2, timeout=5)
        await client.start()
        try:
            await (await client.send("GET", "/health", headers={})).read()
            upstream.drop = _reused(method)
            with pytest.raises(UpstreamUnavailable):
                await client.send(method, "/api/2.0/mlflow/anything", headers={}, body=b"{}")
        finally:
            await client.close()

    asyncio.run(scenario())
    assert len(upstream.calls(method)) == 1
    assert upstream.calls("GET")[0].connection == upstream.calls(method)[0].connection  # it was the pooled one


def test_a_head_is_sent_again_once(upstream: DroppingUpstream) -> None:
    async def scenario() -> int:
        client = UpstreamClient(upstream.url, connect_timeout=2, timeout=5)
        await client.start()
        try:
            upstream.drop = _first("HEAD")
            response = await client.send("HEAD", "/health", headers={})
            await response.read()
            return response.status
        finally:
            await client.close()

    assert asyncio.run(scenario()) == 200
    assert len(upstream.calls("HEAD")) == 2
