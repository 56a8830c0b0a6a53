"""App tier: the real gateway on a real uvicorn, in front of a programmable fake MLflow.

The gateway's upstream client speaks HTTP over TCP, so the fake upstream must listen on a real socket: it is
a raw ASGI app served by uvicorn in a background thread. It records every request it receives
(method, raw path, query string, headers, body) and answers from handlers keyed by (method, path),
with MLflow-like defaults backed by a small in-memory store (experiments, runs, logged models).

Tests attempt the attack through the gateway and assert both the refusal and what the upstream
received: nothing at all, or exactly the rewritten request.

Ids are unique for the whole session (the gateway's ownership caches live as long as the gateway),
so tests never see each other's cached facts.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.app import create_app
from tests.factories import bearer, make_settings

API = "/api/2.0/mlflow"
AJAX = "/ajax-api/2.0/mlflow"
# Sent by every test client and forwarded by the gateway (allow-listed): marks client-originated calls.
USER_AGENT = "mlflow-gateway-app-tier"


# -- a uvicorn server in a background thread --------------------------------------------------------


class ServerThread:
    """Serve an ASGI app with uvicorn on 127.0.0.1 and a free port, in a daemon thread."""

    def __init__(self, app: ASGIApp, *, lifespan: str = "on") -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        # As `mlflow-gateway serve` runs it: no proxy-header trust (uvicorn's default would let a
        # loopback client choose scope["client"] through X-Forwarded-For), httptools, no Server header.
        config = uvicorn.Config(
            app,
            lifespan=lifespan,
            http="httptools",
            ws="none",
            proxy_headers=False,
            server_header=False,
            log_level="critical",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, name=f"uvicorn-{self.port}", daemon=True
        )

    @property
    def url(self) -> str:
        """The base URL of the server."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        """Start serving; return once uvicorn has started (or fail if it died)."""
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"uvicorn on port {self.port} did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Ask uvicorn to exit, wait for the thread, release the socket."""
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._socket.close()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- what the fake upstream received and how it answers ---------------------------------------------


@dataclass(frozen=True)
class Received:
    """One request as the fake upstream saw it."""

    method: str
    path: str
    raw_path: bytes
    query_string: bytes
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``None``."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive)."""
        return [value for key, value in self.headers if key == name.lower()]

    @property
    def header_names(self) -> set[str]:
        """The lower-case names of every header received."""
        return {key for key, _ in self.headers}

    @property
    def query(self) -> dict[str, list[str]]:
        """The decoded query string."""
        return parse_qs(self.query_string.decode(), keep_blank_values=True)

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body)


@dataclass(frozen=True)
class Reply:
    """How the fake upstream answers: a status, a JSON or raw body, headers, optional delays.

    ``delay`` holds back the whole response; ``body_delay`` sends the status and headers, then
    holds back the body.
    """

    status: int = 200
    body: Any = None
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str | None = None
    delay: float = 0.0
    body_delay: float = 0.0

    def encode(self) -> tuple[bytes, str]:
        """The body bytes and content type to send."""
        if isinstance(self.body, bytes):
            return self.body, self.content_type or "application/octet-stream"
        if isinstance(self.body, str):
            return self.body.encode(), self.content_type or "text/plain; charset=utf-8"
        payload = {} if self.body is None else self.body
        return json.dumps(payload).encode(), self.content_type or "application/json"


Handler = Callable[[Received], Reply]


def mlflow_error(status: int, error_code: str, message: str) -> Reply:
    """An MLflow-shaped error reply."""
    return Reply(status, {"error_code": error_code, "message": message})


@dataclass
class FakeMlflowState:
    """The fake upstream's store: experiment id -> upstream name and tags, run id -> experiment id."""

    experiments: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    logged_models: dict[str, str] = field(default_factory=dict)


class FakeUpstream:
    """A raw ASGI app that records requests and answers like a (tiny) MLflow tracking server."""

    # Session-wide counters: ids never repeat, so the gateway's caches cannot leak between tests.
    _ids = itertools.count(1001)

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.state = FakeMlflowState()
        self._handlers: list[tuple[str, re.Pattern[str], Handler]] = []
        self._lock = threading.Lock()
        self.server: ServerThread | None = None
        self.reset()

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL the gateway is pointed at."""
        assert self.server is not None
        return self.server.url

    def reset(self) -> None:
        """Forget requests, programmed handlers and stored objects; reinstall MLflow-like defaults."""
        with self._lock:
            self.requests = []
            self.state = FakeMlflowState()
            self._handlers = []
        self._install_defaults()

    # -- programming -------------------------------------------------------------------------------

    def on(self, method: str, path: str, answer: Reply | Handler, *, regex: bool = False) -> None:
        """Answer ``method path`` (exact, or a full-match regex) with a reply or a handler; last wins."""
        handler: Handler = answer if callable(answer) else (lambda _request, reply=answer: reply)
        pattern = re.compile(path if regex else re.escape(path))
        with self._lock:
            self._handlers.append((method, pattern, handler))

    def on_mlflow(self, method: str, route: str, answer: Reply | Handler) -> None:
        """Answer ``route`` (e.g. ``runs/get``) under both ``/api/2.0/mlflow`` and its ajax twin."""
        for prefix in (API, AJAX):
            self.on(method, f"{prefix}/{route}", answer)

    def new_experiment_id(self) -> str:
        """A fresh experiment id, never used before in this session."""
        return str(next(self._ids))

    def add_experiment(self, tenant: str | None, name: str, *, experiment_id: str | None = None) -> str:
        """Store an experiment named ``<tenant>/<name>`` upstream (``tenant=None``: unprefixed)."""
        experiment_id = experiment_id or self.new_experiment_id()
        upstream_name = f"{tenant}/{name}" if tenant else name
        tags = [{"key": "matih.tenant_id", "value": tenant}] if tenant else []
        self.state.experiments[experiment_id] = {"name": upstream_name, "tags": tags}
        return experiment_id

    def add_run(self, experiment_id: str, *, run_id: str | None = None) -> str:
        """Store a run in ``experiment_id`` upstream."""
        run_id = run_id or uuid.uuid4().hex
        self.state.runs[run_id] = {"experiment_id": experiment_id, "tags": []}
        return run_id

    def add_logged_model(self, experiment_id: str) -> str:
        """Store a logged model in ``experiment_id`` upstream."""
        model_id = f"m-{uuid.uuid4().hex}"
        self.state.logged_models[model_id] = experiment_id
        return model_id

    # -- inspection --------------------------------------------------------------------------------

    def calls(self, method: str | None = None, route: str | None = None) -> list[Received]:
        """Requests received, optionally filtered by method and path suffix (e.g. ``runs/get``)."""
        return [
            request
            for request in list(self.requests)
            if (method is None or request.method == method) and (route is None or request.path.endswith(route))
        ]

    def forwarded(self, method: str | None = None, route: str | None = None) -> list[Received]:
        """Requests the gateway forwarded for a client: they carry the test client's User-Agent.

        Ownership look-ups and the Default-experiment bootstrap are the gateway's own calls.
        """
        return [request for request in self.calls(method, route) if request.header("user-agent") == USER_AGENT]

    def lookups(self, method: str | None = None, route: str | None = None) -> list[Received]:
        """The gateway's own calls (ownership look-ups, Default-experiment bootstrap)."""
        return [request for request in self.calls(method, route) if request.header("user-agent") != USER_AGENT]

    def assert_untouched(self) -> None:
        """The upstream received nothing at all."""
        assert self.requests == [], f"upstream received {[(r.method, r.raw_path) for r in self.requests]}"

    # -- ASGI --------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        request = Received(
            method=scope["method"],
            path=scope["path"],
            raw_path=scope.get("raw_path") or scope["path"].encode(),
            query_string=scope.get("query_string", b""),
            headers=tuple((key.decode("latin-1"), value.decode("latin-1")) for key, value in scope["headers"]),
            body=b"".join(chunks),
        )
        with self._lock:
            self.requests.append(request)
            handlers = list(self._handlers)
        reply = self._dispatch(request, handlers)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        body, content_type = reply.encode()
        headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        headers.extend((key.lower().encode(), value.encode()) for key, value in reply.headers)
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        if reply.body_delay:
            await asyncio.sleep(reply.body_delay)
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _dispatch(request: Received, handlers: list[tuple[str, re.Pattern[str], Handler]]) -> Reply:
        for method, pattern, handler in reversed(handlers):
            if method == request.method and pattern.fullmatch(request.path):
                return handler(request)
        return mlflow_error(404, "ENDPOINT_NOT_FOUND", f"No API route for {request.method} {request.path}")

    # -- MLflow-like default handlers ----------------------------------------------------------------

    def _install_defaults(self) -> None:
        self.on("GET", "/health", Reply(200, "OK"))
        self.on_mlflow("GET", "experiments/get", self._experiments_get)
        self.on_mlflow("GET", "experiments/get-by-name", self._experiments_get_by_name)
        self.on_mlflow("POST", "experiments/create", self._experiments_create)
        self.on_mlflow("GET", "runs/get", self._runs_get)
        self.on_mlflow("POST", "runs/create", self._runs_create)
        self.on_mlflow("POST", "runs/search", self._runs_search)
        for route in (
            "runs/log-batch",
            "runs/log-metric",
            "runs/log-parameter",
            "runs/log-inputs",
            "runs/outputs",
            "runs/set-tag",
            "runs/delete-tag",
            "runs/update",
            "runs/delete",
            "runs/restore",
            "experiments/update",
            "experiments/delete",
            "experiments/restore",
            "experiments/set-experiment-tag",
            "experiments/delete-experiment-tag",
        ):
            self.on_mlflow("POST", route, Reply(200, {}))
        self.on("GET", rf"{re.escape(API)}/logged-models/[^/]+", self._logged_model_get, regex=True)

    def _experiment_json(self, experiment_id: str) -> dict[str, Any]:
        stored = self.state.experiments[experiment_id]
        return {
            "experiment_id": experiment_id,
            "name": stored["name"],
            "artifact_location": f"mlflow-artifacts:/{experiment_id}",
            "lifecycle_stage": "active",
            "last_update_time": 1700000000000,
            "creation_time": 1700000000000,
            "tags": stored["tags"],
        }

    def _experiments_get(self, request: Received) -> Reply:
        experiment_id = (request.query.get("experiment_id") or [""])[0]
        if experiment_id not in self.state.experiments:
            return mlflow_error(404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={experiment_id} exists")
        return Reply(200, {"experiment": self._experiment_json(experiment_id)})

    def _experiments_get_by_name(self, request: Received) -> Reply:
        name = (request.query.get("experiment_name") or [""])[0]
        for experiment_id, stored in self.state.experiments.items():
            if stored["name"] == name:
                return Reply(200, {"experiment": self._experiment_json(experiment_id)})
        return mlflow_error(404, "RESOURCE_DOES_NOT_EXIST", f"Could not find experiment with name '{name}'")

    def _experiments_create(self, request: Received) -> Reply:
        body = request.json()
        name = body["name"]
        if any(stored["name"] == name for stored in self.state.experiments.values()):
            return mlflow_error(
                400,
                "RESOURCE_ALREADY_EXISTS",
                f"Experiment(name={name}) already exists. Error: (sqlite3.IntegrityError) UNIQUE constraint failed",
            )
        experiment_id = self.new_experiment_id()
        self.state.experiments[experiment_id] = {"name": name, "tags": body.get("tags", [])}
        return Reply(200, {"experiment_id": experiment_id})

    def _run_json(self, run_id: str) -> dict[str, Any]:
        stored = self.state.runs[run_id]
        return {
            "info": {
                "run_id": run_id,
                "run_uuid": run_id,
                "experiment_id": stored["experiment_id"],
                "user_id": stored.get("user_id", ""),
                "status": "RUNNING",
                "start_time": 1700000000000,
                "artifact_uri": f"mlflow-artifacts:/{stored['experiment_id']}/{run_id}/artifacts",
                "lifecycle_stage": "active",
            },
            "data": {"tags": stored["tags"]},
        }

    def _runs_get(self, request: Received) -> Reply:
        query = request.query
        run_id = (query.get("run_id") or query.get("run_uuid") or [""])[0]
        if run_id not in self.state.runs:
            return mlflow_error(404, "RESOURCE_DOES_NOT_EXIST", f"Run with id={run_id} not found")
        return Reply(200, {"run": self._run_json(run_id)})

    def _runs_create(self, request: Received) -> Reply:
        body = request.json()
        experiment_id = str(body.get("experiment_id"))
        if experiment_id not in self.state.experiments:
            return mlflow_error(404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={experiment_id} exists")
        run_id = uuid.uuid4().hex
        self.state.runs[run_id] = {
            "experiment_id": experiment_id,
            "user_id": body.get("user_id", ""),
            "tags": body.get("tags", []),
        }
        return Reply(200, {"run": self._run_json(run_id)})

    def _runs_search(self, request: Received) -> Reply:
        wanted = set(request.json().get("experiment_ids", []))
        runs = [self._run_json(run_id) for run_id, run in self.state.runs.items() if run["experiment_id"] in wanted]
        return Reply(200, {"runs": runs} if runs else {})

    def _logged_model_get(self, request: Received) -> Reply:
        model_id = request.path.rsplit("/", 1)[1]
        experiment_id = self.state.logged_models.get(model_id)
        if experiment_id is None:
            return mlflow_error(404, "RESOURCE_DOES_NOT_EXIST", f"Logged model with ID '{model_id}' not found.")
        return Reply(200, {"model": {"info": {"model_id": model_id, "experiment_id": experiment_id}}})


# -- raw HTTP, for request targets httpx would normalise ----------------------------------------------


@dataclass(frozen=True)
class RawResponse:
    """A response read from a raw socket."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body)


def send_raw(port: int, request: bytes) -> RawResponse:
    """Send exact request bytes to 127.0.0.1:``port`` and read one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        try:
            response.begin()
            return RawResponse(response.status, response.headers, response.read())
        finally:
            response.close()


def raw_request(
    port: int,
    method: str,
    target: bytes | str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> RawResponse:
    """Build an HTTP/1.1 request with ``target`` exactly as given and send it."""
    target_bytes = target.encode("latin-1") if isinstance(target, str) else target
    lines = [
        method.encode() + b" " + target_bytes + b" HTTP/1.1",
        f"Host: 127.0.0.1:{port}".encode(),
        f"User-Agent: {USER_AGENT}".encode(),
    ]
    lines.extend(f"{key}: {value}".encode("latin-1") for key, value in (headers or {}).items())
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}".encode())
    lines.append(b"Connection: close")
    return send_raw(port, b"\r\n".join(lines) + b"\r\n\r\n" + body)


# -- fixtures -----------------------------------------------------------------------------------------


@dataclass
class GatewayUnderTest:
    """A running gateway and a client bound to it."""

    server: ServerThread
    client: httpx.Client

    @property
    def port(self) -> int:
        """The gateway's port (for raw requests)."""
        return self.server.port

    def raw(self, method: str, target: bytes | str, **kwargs: Any) -> RawResponse:
        """Send a request whose target is not normalised by any client library."""
        return raw_request(self.port, method, target, **kwargs)


def _client(base_url: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, timeout=10, headers={"User-Agent": USER_AGENT})


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[FakeUpstream]:
    """The fake MLflow, served for the whole session."""
    fake = FakeUpstream()
    fake.server = ServerThread(fake, lifespan="off").start()
    try:
        yield fake
    finally:
        fake.server.stop()


@pytest.fixture
def fake(fake_upstream: FakeUpstream) -> Iterator[FakeUpstream]:
    """The fake MLflow with no recorded requests, default handlers and an empty store."""
    fake_upstream.reset()
    yield fake_upstream
    fake_upstream.reset()


@pytest.fixture(scope="session")
def shared_gateway(fake_upstream: FakeUpstream) -> Iterator[GatewayUnderTest]:
    """The gateway under test, in front of the fake MLflow, with one client, for the whole session."""
    server = ServerThread(create_app(make_settings(upstream_url=fake_upstream.url))).start()
    try:
        with _client(server.url) as client:
            yield GatewayUnderTest(server, client)
    finally:
        server.stop()


@pytest.fixture
def gateway(shared_gateway: GatewayUnderTest, fake: FakeUpstream) -> GatewayUnderTest:
    """The shared gateway, with the upstream freshly reset for this test."""
    return shared_gateway


@pytest.fixture
def client(gateway: GatewayUnderTest) -> httpx.Client:
    """An httpx client bound to the shared gateway."""
    return gateway.client


@pytest.fixture
def start_gateway(fake: FakeUpstream) -> Iterator[Callable[..., GatewayUnderTest]]:
    """Start a dedicated gateway (fresh caches, custom settings); every one is stopped after the test."""
    started: list[GatewayUnderTest] = []

    def start(**overrides: Any) -> GatewayUnderTest:
        overrides.setdefault("upstream_url", fake.url)
        server = ServerThread(create_app(make_settings(**overrides))).start()
        handle = GatewayUnderTest(server, _client(server.url))
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.client.close()
        handle.server.stop()


# -- small helpers shared by the test modules ---------------------------------------------------------

ACME = bearer("acme", "alice")
GLOBEX = bearer("globex", "bob")


def assert_mlflow_error(
    response: httpx.Response | RawResponse, status: int, error_code: str, message: str | None = None
) -> dict[str, Any]:
    """The response is MLflow's error shape, exactly ``{"error_code", "message"}``, with this status."""
    status_code = response.status_code if isinstance(response, httpx.Response) else response.status
    assert status_code == status, (status_code, response.content if isinstance(response, httpx.Response) else b"")
    content_type = response.headers.get("content-type", "")
    assert content_type.startswith("application/json"), content_type
    body = response.json()
    assert set(body) == {"error_code", "message"}, body
    assert body["error_code"] == error_code, body
    assert isinstance(body["message"], str) and body["message"], body
    if message is not None:
        assert body["message"] == message, body
    return body
