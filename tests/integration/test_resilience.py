"""Fault injection through real processes: `mlflow-gateway serve` subprocesses in front of a real `mlflow
server` that is killed and restarted, a deliberately slow upstream (MLflow and S3 roles), clients that
vanish mid-transfer, SIGTERM with requests in flight, and `serve --workers 2`.

Everything a test kills it starts itself, on its own free ports; the session's stack is only read from
(and its gateway's connections inspected). Open connections are read from /proc (Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import orjson
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from gateway.dev import (
    S3_ACCESS_KEY,
    S3_REGION,
    S3_SECRET_KEY,
    DevStack,
    ManagedProcess,
    free_port,
    gateway_environment,
    s3_client,
    start_mlflow,
)
from tests.integration.conftest import TokenFactory

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads connections from /proc (Linux)")

API = "/api/2.0/mlflow"
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
STALL_BUCKET = "stall-bucket"
UPSTREAM_TIMEOUT = 1.0


# -- a gateway subprocess whose pid the test knows -----------------------------------------------------


@dataclass
class GatewayProcess:
    url: str
    port: int
    process: ManagedProcess


@contextlib.contextmanager
def gateway_process(log_dir: Path, name: str, env: dict[str, str], *args: str) -> Iterator[GatewayProcess]:
    """``mlflow-gateway serve [args]`` with ``env`` as its only GATEWAY_/MLFLOW_/AWS_ variables; always stopped."""
    port = free_port()
    script = Path(sys.executable).parent / "mlflow-gateway"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "gateway.cli"]
    base = {key: value for key, value in os.environ.items() if not key.startswith(("GATEWAY_", "MLFLOW_", "AWS_"))}
    process = ManagedProcess(
        name=name,
        argv=[*command, "serve", "--host", "127.0.0.1", "--port", str(port), *args],
        log_path=log_dir / f"{name}.log",
        env=base | env,
    )
    try:
        process.wait_http_ok(f"http://127.0.0.1:{port}/ready", timeout=60)
        yield GatewayProcess(f"http://127.0.0.1:{port}", port, process)
    finally:
        process.stop()


def wait_for(condition: Callable[[], bool], *, timeout: float, message: str) -> float:
    """Poll ``condition`` every 50 ms; return the seconds it took, fail after ``timeout``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"timed out after {timeout}s: {message}")
        time.sleep(0.05)
    return time.monotonic() - started


def wait_draining(url: str, *, timeout: float) -> None:
    """Poll /ready until it reports draining (the signal is handled asynchronously, within uvicorn's 0.1 s tick)."""

    def draining() -> bool:
        response = httpx.get(f"{url}/ready")
        return response.status_code == 503 and response.json() == {"status": "draining"}

    wait_for(draining, timeout=timeout, message="/ready reports draining")


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


# -- open TCP connections of a process, from /proc -------------------------------------------------------

TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}


@dataclass(frozen=True)
class Connection:
    local_port: int
    remote_port: int
    state: str


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    return inodes


def _tcp_table() -> list[tuple[int, int, str, int]]:
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as handle:
            for line in handle.readlines()[1:]:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
                rows.append((int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state, inode))
    return rows


def connections_of(pid: int) -> list[Connection]:
    """The TCP sockets process ``pid`` holds open."""
    inodes = _socket_inodes(pid)
    return [
        Connection(local, remote, TCP_STATES.get(state, state))
        for local, remote, state, inode in _tcp_table()
        if inode in inodes
    ]


def pid_listening_on(port: int) -> int:
    """The process holding the listening socket of 127.0.0.1:``port``."""
    inodes = {inode for local, _, state, inode in _tcp_table() if local == port and state == "0A"}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if _socket_inodes(int(entry.name)) & inodes:
                    return int(entry.name)
    raise AssertionError(f"no process listens on port {port}")


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live child processes of ``pid``."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rfind(")") + 2 :].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                children.append((int(entry.name), cmdline))
    return children


def process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return state[state.rfind(")") + 2] == "Z"


# -- a programmable slow upstream: MLflow's and S3's roles, in a uvicorn thread ---------------------------


class SlowUpstream:
    """Answers just enough of MLflow (experiment and run look-ups) and S3 (GetObject) to be slow on purpose.

    - ``POST .../experiments/create`` waits ``create_delay`` seconds, then answers;
    - ``GET .../runs/get`` for a run id starting with ``5low`` never answers in time (an ownership look-up);
    - ``GET /<STALL_BUCKET>/...`` (S3 GetObject) sends its headers and 256 KiB of a 4 MiB body, then stalls.
    """

    def __init__(self) -> None:
        self.create_delay = 0.0
        self.creates_started = 0
        self.creates_answered = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        query = parse_qs(scope.get("query_string", b"").decode())
        while (await receive()).get("more_body"):
            pass
        if path == "/health":
            await _reply(send, 200, b"OK", b"text/plain")
        elif method == "POST" and path.endswith("/experiments/create"):
            self.creates_started += 1
            await asyncio.sleep(self.create_delay)
            self.creates_answered += 1
            await _reply(send, 200, b'{"experiment_id": "1"}')
        elif path.endswith("/experiments/get"):
            experiment_id = query.get("experiment_id", ["1"])[0]
            experiment = {"experiment_id": experiment_id, "name": "acme/slow", "lifecycle_stage": "active"}
            await _reply(send, 200, orjson.dumps({"experiment": experiment}))
        elif path.endswith("/runs/get"):
            run_id = query.get("run_id", [""])[0]
            if run_id.startswith("5low"):
                await asyncio.sleep(30)
            run = {"info": {"run_id": run_id, "run_uuid": run_id, "experiment_id": "1"}, "data": {}}
            await _reply(send, 200, orjson.dumps({"run": run}))
        elif method == "GET" and path.startswith(f"/{STALL_BUCKET}/"):
            headers = [(b"content-type", b"application/octet-stream"), (b"content-length", str(4 << 20).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"\0" * (256 << 10), "more_body": True})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(receive(), timeout=30)  # until the gateway hangs up
        else:
            await _reply(send, 404, b'{"error_code": "ENDPOINT_NOT_FOUND", "message": "not here"}')


async def _reply(send: Send, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def slow_upstream() -> Iterator[tuple[SlowUpstream, str]]:
    app = SlowUpstream()
    sock = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(app, lifespan="off", log_level="critical", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=10, message="slow upstream start")
    try:
        yield app, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def slow_gateway_env(upstream_url: str, jwt_secret: str, **extra: str) -> dict[str, str]:
    """A gateway in front of the slow upstream, which also plays S3 for ``s3://stall-bucket``."""
    return {
        "GATEWAY_UPSTREAM_URL": upstream_url,
        "GATEWAY_JWT_SECRET": jwt_secret,
        "GATEWAY_ARTIFACTS_DESTINATION": f"s3://{STALL_BUCKET}/artifacts",
        "AWS_ENDPOINT_URL_S3": upstream_url,
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_DEFAULT_REGION": S3_REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        **extra,
    }


def assert_mlflow_error(response: httpx.Response, status: int, error_code: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error_code", "message"} and body["error_code"] == error_code, body


# -- upstream killed, then back ------------------------------------------------------------------------


@pytest.mark.slow
def test_upstream_killed_gives_fast_503_and_recovers_when_it_returns(
    stack: DevStack, jwt_secret: str, token_factory: TokenFactory, tmp_path: Path
) -> None:
    port = free_port()
    data_dir = tmp_path / "mlflow"
    mlflow = start_mlflow(data_dir, port, s3_endpoint=stack.s3_endpoint, bucket=stack.bucket)
    try:
        env = gateway_environment(stack, jwt_secret) | {"GATEWAY_UPSTREAM_URL": f"http://127.0.0.1:{port}"}
        with (
            gateway_process(tmp_path, "gateway-kill", env) as gateway,
            httpx.Client(base_url=gateway.url, timeout=30) as client,
        ):
            auth = {"Authorization": f"Bearer {token_factory('acme')}"}
            created = client.post(f"{API}/experiments/create", json={"name": "survivor"}, headers=auth)
            assert created.status_code == 200, created.text
            experiment_id = created.json()["experiment_id"]
            get_experiment = (f"{API}/experiments/get", {"experiment_id": experiment_id})
            assert client.get(get_experiment[0], params=get_experiment[1], headers=auth).status_code == 200

            os.killpg(mlflow.pid, signal.SIGKILL)  # a crash, not a shutdown
            mlflow.stop()
            attempts: list[Callable[[], httpx.Response]] = [
                lambda: client.get(get_experiment[0], params=get_experiment[1], headers=auth),  # forwarded read
                lambda: client.post(f"{API}/runs/create", json={"experiment_id": experiment_id}, headers=auth),
                lambda: client.get(f"{API}/runs/get", params={"run_id": uuid.uuid4().hex}, headers=auth),  # look-up
            ]
            for attempt in attempts:
                started = time.monotonic()
                response = attempt()
                assert time.monotonic() - started < 2.0  # refused at once, never a hang
                assert_mlflow_error(response, 503, "TEMPORARILY_UNAVAILABLE")
                assert int(response.headers["retry-after"]) > 0
            ready = client.get("/ready")
            assert (ready.status_code, ready.json()) == (503, {"status": "upstream unavailable"})
            assert client.get("/health").status_code == 200

            mlflow = start_mlflow(data_dir, port, s3_endpoint=stack.s3_endpoint, bucket=stack.bucket)
            assert gateway.process.is_running()  # the same gateway process, never restarted
            assert client.get("/ready").status_code == 200
            response = client.get(get_experiment[0], params=get_experiment[1], headers=auth)
            assert response.status_code == 200 and response.json()["experiment"]["name"] == "survivor"
            run = client.post(f"{API}/runs/create", json={"experiment_id": experiment_id}, headers=auth)
            assert run.status_code == 200, run.text
    finally:
        mlflow.stop()


# -- upstream slow: 504 at the configured timeout, everywhere ----------------------------------------------


@pytest.fixture(scope="module")
def slow_gateway(
    slow_upstream: tuple[SlowUpstream, str], jwt_secret: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    _, url = slow_upstream
    env = slow_gateway_env(url, jwt_secret, GATEWAY_UPSTREAM_TIMEOUT=str(UPSTREAM_TIMEOUT))
    with gateway_process(tmp_path_factory.mktemp("slow"), "gateway-slow", env) as gateway:
        yield gateway


def test_slow_upstream_is_504_at_the_timeout_and_not_retried(
    slow_upstream: tuple[SlowUpstream, str], slow_gateway: GatewayProcess, token_factory: TokenFactory
) -> None:
    fake, _ = slow_upstream
    fake.create_delay = 3 * UPSTREAM_TIMEOUT
    before = fake.creates_started
    auth = {"Authorization": f"Bearer {token_factory('acme')}"}
    started = time.monotonic()
    response = httpx.post(f"{slow_gateway.url}{API}/experiments/create", json={"name": "late"}, headers=auth)
    elapsed = time.monotonic() - started
    assert_mlflow_error(response, 504, "DEADLINE_EXCEEDED")
    assert UPSTREAM_TIMEOUT * 0.9 <= elapsed < UPSTREAM_TIMEOUT + 1.5, elapsed
    assert fake.creates_started == before + 1


def test_slow_ownership_lookup_is_504_at_the_timeout(slow_gateway: GatewayProcess, token_factory: TokenFactory) -> None:
    auth = {"Authorization": f"Bearer {token_factory('acme')}"}
    started = time.monotonic()
    response = httpx.get(f"{slow_gateway.url}{API}/runs/get", params={"run_id": "5low" + "0" * 28}, headers=auth)
    elapsed = time.monotonic() - started
    assert_mlflow_error(response, 504, "DEADLINE_EXCEEDED")
    # Once, not twice: a GET is re-sent only when its connection failed, never after a timeout.
    assert UPSTREAM_TIMEOUT * 0.9 <= elapsed < 2 * UPSTREAM_TIMEOUT, elapsed


def test_stalled_artifact_download_is_cut_off_at_the_timeout(
    slow_gateway: GatewayProcess, token_factory: TokenFactory
) -> None:
    auth = {"Authorization": f"Bearer {token_factory('acme')}"}
    run_id = uuid.uuid4().hex
    received = 0
    started = time.monotonic()
    with (
        pytest.raises(httpx.TransportError),
        httpx.stream("GET", f"{slow_gateway.url}{ARTIFACTS}/1/{run_id}/artifacts/big.bin", headers=auth) as response,
    ):
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            received += len(chunk)
    elapsed = time.monotonic() - started
    assert received < 4 << 20  # the body was cut short, the client was not left waiting
    assert elapsed < UPSTREAM_TIMEOUT + 3, elapsed
    assert httpx.get(f"{slow_gateway.url}/ready").status_code == 200


# -- SIGTERM with requests in flight -------------------------------------------------------------------


def test_sigterm_drains_in_flight_requests_then_exits(
    slow_upstream: tuple[SlowUpstream, str],
    jwt_secret: str,
    token_factory: TokenFactory,
    tmp_path: Path,
) -> None:
    fake, url = slow_upstream
    fake.create_delay = 2.0
    env = slow_gateway_env(url, jwt_secret, GATEWAY_DRAIN_DELAY_SECONDS="1", GATEWAY_SHUTDOWN_GRACE_SECONDS="10")
    auth = {"Authorization": f"Bearer {token_factory('acme')}"}
    with gateway_process(tmp_path, "gateway-sigterm", env) as gateway:
        before = fake.creates_started
        results: list[int] = []

        def create(index: int) -> None:
            response = httpx.post(f"{gateway.url}{API}/experiments/create", json={"name": f"e{index}"}, headers=auth)
            results.append(response.status_code)

        clients = [threading.Thread(target=create, args=(index,)) for index in range(4)]
        for thread in clients:
            thread.start()
        wait_for(lambda: fake.creates_started >= before + 4, timeout=10, message="requests in flight upstream")
        os.kill(gateway.process.pid, signal.SIGTERM)
        signalled = time.monotonic()

        wait_draining(gateway.url, timeout=0.8)  # new connections, during the drain delay
        assert httpx.get(f"{gateway.url}/health").status_code == 200
        wait_for(lambda: refuses_connections(gateway.port), timeout=5, message="port closed after the drain delay")
        assert time.monotonic() - signalled >= 0.9  # accepted for the whole delay
        for thread in clients:
            thread.join(timeout=15)
        assert results == [200, 200, 200, 200]
        wait_for(lambda: not gateway.process.is_running(), timeout=10, message="gateway exit within the grace")
        assert gateway.process.returncode == 0
    # Access lines are written in batches: the ones still waiting at shutdown are written before the exit.
    lines = (tmp_path / "gateway-sigterm.log").read_text(encoding="utf-8").splitlines()
    creates = [line for line in lines if '"route":"/api/2.0/mlflow/experiments/create"' in line]
    assert len(creates) == 4 and all('"status":200' in line for line in creates), creates


# -- serve --workers 2 ---------------------------------------------------------------------------------


def test_workers_serve_and_all_stop_on_sigterm(
    slow_upstream: tuple[SlowUpstream, str], jwt_secret: str, token_factory: TokenFactory, tmp_path: Path
) -> None:
    fake, url = slow_upstream
    fake.create_delay = 0.0
    env = slow_gateway_env(url, jwt_secret, GATEWAY_DRAIN_DELAY_SECONDS="2")
    auth = {"Authorization": f"Bearer {token_factory('acme')}"}
    with gateway_process(tmp_path, "gateway-workers", env, "--workers", "2") as gateway:
        supervisor = gateway.process.pid
        workers = [pid for pid, cmdline in children_of(supervisor) if "spawn_main" in cmdline]
        assert len(workers) == 2, children_of(supervisor)
        wait_for(  # each worker holds the shared listening socket
            lambda: all(any(c.state == "LISTEN" for c in connections_of(pid)) for pid in workers),
            timeout=30,
            message="both workers listening",
        )
        for index in range(20):  # new connections each time: the kernel spreads them over the workers
            response = httpx.post(f"{gateway.url}{API}/experiments/create", json={"name": f"w{index}"}, headers=auth)
            assert response.status_code == 200, response.text

        os.kill(workers[0], signal.SIGKILL)  # a worker dies: the supervisor replaces it, the other serves meanwhile

        def replaced() -> bool:
            current = [pid for pid, cmdline in children_of(supervisor) if "spawn_main" in cmdline]
            return len(current) == 2 and workers[0] not in current

        wait_for(replaced, timeout=10, message="a new worker")
        workers = [pid for pid, cmdline in children_of(supervisor) if "spawn_main" in cmdline]
        wait_for(lambda: httpx.get(f"{gateway.url}/ready").status_code == 200, timeout=30, message="ready")
        for index in range(10):
            response = httpx.post(f"{gateway.url}{API}/experiments/create", json={"name": f"x{index}"}, headers=auth)
            assert response.status_code == 200, response.text
        assert gateway.process.is_running()

        os.kill(supervisor, signal.SIGTERM)  # passed on to each worker within 0.2 s
        wait_draining(gateway.url, timeout=1.5)
        wait_for(lambda: not gateway.process.is_running(), timeout=20, message="supervisor exit")
        assert gateway.process.returncode == 0
        assert all(process_gone(pid) for pid in workers)
        assert refuses_connections(gateway.port)


def test_workers_stop_by_themselves_when_the_supervisor_is_killed(
    slow_upstream: tuple[SlowUpstream, str], jwt_secret: str, tmp_path: Path
) -> None:
    _, url = slow_upstream
    with gateway_process(tmp_path, "gateway-orphans", slow_gateway_env(url, jwt_secret), "--workers", "2") as gateway:
        workers = [pid for pid, cmdline in children_of(gateway.process.pid) if "spawn_main" in cmdline]
        assert len(workers) == 2
        os.kill(gateway.process.pid, signal.SIGKILL)
        wait_for(lambda: all(process_gone(pid) for pid in workers), timeout=15, message="orphaned workers exit")
        assert refuses_connections(gateway.port)


# -- clients that vanish mid-transfer (the session's real stack and gateway) -------------------------------


def _abort(sock: socket.socket, *, reset: bool) -> None:
    if reset:  # SO_LINGER 0: close() sends RST
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _counts(pid: int, gateway_port: int, s3_port: int, mlflow_port: int) -> dict[str, Any]:
    connections = connections_of(pid)
    return {
        "clients": sum(1 for c in connections if c.local_port == gateway_port and c.state != "LISTEN"),
        "close_wait": sum(1 for c in connections if c.state == "CLOSE_WAIT"),
        "s3": sum(1 for c in connections if c.remote_port == s3_port),
        "mlflow": sum(1 for c in connections if c.remote_port == mlflow_port),
    }


def test_clients_vanishing_mid_transfer_leak_nothing(
    stack: DevStack, gateway_url: str, token_factory: TokenFactory
) -> None:
    gateway_port = int(gateway_url.rsplit(":", 1)[1])
    s3_port = int(stack.s3_endpoint.rsplit(":", 1)[1])
    mlflow_port = int(stack.mlflow_url.rsplit(":", 1)[1])
    pid = pid_listening_on(gateway_port)
    token = token_factory("acme")
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=gateway_url, headers=auth, timeout=30) as client:
        experiment_id = client.post(f"{API}/experiments/create", json={"name": uuid.uuid4().hex}).json()[
            "experiment_id"
        ]
        run_id = client.post(f"{API}/runs/create", json={"experiment_id": experiment_id}).json()["run"]["info"][
            "run_id"
        ]
        base = f"{ARTIFACTS}/{experiment_id}/{run_id}/artifacts"
        payload = os.urandom(1 << 20) * 24  # 24 MiB: several S3 reads, three upload parts
        s3 = s3_client(stack.s3_endpoint)
        s3.put_object(Bucket=stack.bucket, Key=f"artifacts/{experiment_id}/{run_id}/artifacts/big.bin", Body=payload)
        assert client.get(f"{base}/big.bin").content == payload  # warm: ownership cached, pools open
    baseline = _counts(pid, gateway_port, s3_port, mlflow_port)

    host = ("127.0.0.1", gateway_port)
    for attempt in range(6):  # downloads abandoned after the first megabyte
        sock = socket.create_connection(host, timeout=10)
        sock.sendall(
            f"GET {base}/big.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode("latin-1")
        )
        received = 0
        while received < 1 << 20:
            chunk = sock.recv(1 << 16)
            assert chunk
            received += len(chunk)
        _abort(sock, reset=attempt % 2 == 1)
    for attempt in range(4):  # uploads abandoned after 10 MiB of 24 MiB (one S3 part already sent)
        sock = socket.create_connection(host, timeout=10)
        head = (
            f"PUT {base}/partial-{attempt}.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        sock.sendall(head.encode("latin-1") + payload[: 10 << 20])
        time.sleep(0.2)
        _abort(sock, reset=attempt % 2 == 1)

    def settled() -> bool:
        now = _counts(pid, gateway_port, s3_port, mlflow_port)
        return (
            now["clients"] <= baseline["clients"]
            and now["close_wait"] == 0
            and now["s3"] <= baseline["s3"] + 2
            and now["mlflow"] <= baseline["mlflow"] + 1
        )

    wait_for(settled, timeout=20, message=f"connections back to {baseline}: {_counts(pid, gateway_port, s3_port, 0)}")
    for attempt in range(4):
        with pytest.raises(s3.exceptions.ClientError):  # no partial object became visible
            s3.head_object(
                Bucket=stack.bucket, Key=f"artifacts/{experiment_id}/{run_id}/artifacts/partial-{attempt}.bin"
            )
    with httpx.Client(base_url=gateway_url, headers=auth, timeout=30) as client:
        assert client.get("/ready").status_code == 200
        assert client.get(f"{base}/big.bin").content == payload
        assert client.put(f"{base}/after.bin", content=b"still working").status_code == 200
        assert client.get(f"{base}/after.bin").content == b"still working"
