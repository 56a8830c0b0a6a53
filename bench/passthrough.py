"""Which upstream HTTP client should an ASGI passthrough proxy use: httpx, aiohttp or the gateway's own?

Everything runs on 127.0.0.1, each part in its own process:

* ``upstream``: a raw ASGI app under uvicorn (uvloop + httptools) that answers any request with a
  canned MLflow-like JSON body (``/__echo...`` paths echo the request instead, for a correctness check);
* ``httpx``: a bare passthrough proxy (raw ASGI, no middleware) forwarding with one shared
  ``httpx.AsyncClient`` created in the lifespan;
* ``aiohttp``: the same proxy forwarding with one shared ``aiohttp.ClientSession``
  (``TCPConnector(limit=100)``);
* ``gateway_client``: the same proxy forwarding with the gateway's own client
  (:class:`gateway.http.upstream.UpstreamClient`: HTTP/1.1 on asyncio, httptools' parser), which replaced
  aiohttp in the gateway (bench/RESULTS.md, section 2h);
* ``load``: a closed-loop load generator (aiohttp client, N connections, warm-up then a fixed window),
  started once per measurement.

The targets are measured in alternating order (``direct, httpx, ..., gateway_client, gateway_client, ...,
httpx, direct`` for two rounds). A readable table goes to stdout, progress to stderr, and the LAST line of stdout is one
JSON object with the figures.

Usage::

    python bench/passthrough.py                 # 5 s per target and round, 32 connections
    python bench/passthrough.py --quick         # 1 s per target, for smoke runs
    python bench/passthrough.py --duration 10 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import importlib.metadata
import importlib.util
import math
import os
import platform
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import types
from array import array
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp
import httpx
import orjson
import uvicorn
import uvloop
from yarl import URL

from gateway.http.upstream import UpstreamClient

HOST = "127.0.0.1"
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RUN_ID = "5f2d0c1b9a8e47d6b3c2a1f0e9d8c7b6"
CANNED_BODY = orjson.dumps({"run": {"info": {"run_id": RUN_ID, "experiment_id": "1", "status": "RUNNING"}, "data": {}}})
LOAD_PATH = f"/api/2.0/mlflow/runs/get?run_id={RUN_ID}"
# The only request headers the proxies forward (lower-case, as in the ASGI scope).
FORWARD_HEADERS = frozenset({b"accept", b"authorization", b"content-type", b"x-request-id"})
POOL_SIZE = 100
UPSTREAM_TIMEOUT_S = 30.0
KEEP_ALIVE_S = 75  # longer than the gap between two measurements of one target
PROXIES = ("httpx", "httpx_sniffio", "aiohttp", "gateway_client")
TARGETS = ("direct", *PROXIES)
SERVER_ROLES = ("upstream", *PROXIES)
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
MAX_SAMPLES = 5_000_000  # hard cap on recorded requests per measurement


# --------------------------------------------------------------------------------------------------
# ASGI apps
# --------------------------------------------------------------------------------------------------


async def read_body(receive: Receive) -> bytes:
    """Read a whole ASGI request body."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def send_response(send: Send, status: int, body: bytes, content_type: bytes | None) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def upstream_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The fake MLflow server: a canned JSON answer for anything, or an echo under ``/__echo``."""
    if scope["type"] != "http":
        return
    body = await read_body(receive)
    if scope["path"].startswith("/__echo"):
        payload = orjson.dumps(
            {
                "method": scope["method"],
                "raw_path": scope.get("raw_path", scope["path"].encode()).decode("latin-1"),
                "query": scope["query_string"].decode("latin-1"),
                "body": body.decode("latin-1"),
                "headers": {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
            }
        )
    else:
        payload = CANNED_BODY
    await send_response(send, 200, payload, b"application/json")


class PassthroughProxy:
    """A bare ASGI passthrough: method, path+query, body and allow-listed headers go upstream;
    status, body and content-type come back. Subclasses supply the HTTP client."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def forward(
        self, method: str, url: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes, str | None]:
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope["query_string"]
        url = self.upstream + raw_path.decode("latin-1")
        if query:
            url += "?" + query.decode("latin-1")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in FORWARD_HEADERS}
        try:
            status, content, content_type = await self.forward(scope["method"], url, headers, body)
        except Exception as exc:  # a benchmark proxy: any upstream failure is a 502
            message = orjson.dumps({"error_code": "BAD_GATEWAY", "message": repr(exc)})
            await send_response(send, 502, message, b"application/json")
            return
        await send_response(send, status, content, content_type.encode("latin-1") if content_type else None)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


class HttpxProxy(PassthroughProxy):
    client: httpx.AsyncClient

    async def start(self) -> None:
        self.client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=POOL_SIZE, max_keepalive_connections=POOL_SIZE),
            timeout=httpx.Timeout(UPSTREAM_TIMEOUT_S, connect=5.0),
            trust_env=False,  # never pick up an HTTP(S)_PROXY from the environment
            follow_redirects=False,
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def forward(
        self, method: str, url: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes, str | None]:
        response = await self.client.request(method, url, headers=headers, content=body or None)
        return response.status_code, response.content, response.headers.get("content-type")


class AiohttpProxy(PassthroughProxy):
    session: aiohttp.ClientSession

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=POOL_SIZE),
            timeout=aiohttp.ClientTimeout(total=UPSTREAM_TIMEOUT_S, connect=5.0),
            auto_decompress=False,
            trust_env=False,
        )

    async def close(self) -> None:
        await self.session.close()

    async def forward(
        self, method: str, url: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes, str | None]:
        async with self.session.request(
            method, URL(url, encoded=True), headers=headers, data=body or None, allow_redirects=False
        ) as response:
            content = await response.read()
            return response.status, content, response.headers.get("Content-Type")


class GatewayClientProxy(PassthroughProxy):
    client: UpstreamClient

    async def start(self) -> None:
        self.client = UpstreamClient(self.upstream, timeout=UPSTREAM_TIMEOUT_S, pool_size=POOL_SIZE)
        await self.client.start()

    async def close(self) -> None:
        await self.client.close()

    async def forward(
        self, method: str, url: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes, str | None]:
        response = await self.client.send(method, url[len(self.upstream) :], headers=headers, body=body or None)
        content = await response.read()
        content_type = next((v for k, v in response.headers if k.lower() == b"content-type"), None)
        return response.status, content, content_type.decode("latin-1") if content_type is not None else None


# --------------------------------------------------------------------------------------------------
# Child processes: servers and the load generator
# --------------------------------------------------------------------------------------------------


def _watch_parent(lifetime_s: float) -> None:
    """Stop this server if the parent goes away (stdin reaches EOF) or after ``lifetime_s``."""

    def stop(_reason: str) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down gracefully
        time.sleep(STOP_TIMEOUT_S)
        os._exit(1)

    def on_eof() -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stdin.buffer.read()
        stop("parent gone")

    threading.Thread(target=on_eof, daemon=True).start()
    timer = threading.Timer(lifetime_s, stop, args=("lifetime exceeded",))
    timer.daemon = True
    timer.start()


def sniffio_installed() -> bool:
    return importlib.util.find_spec("sniffio") is not None


def ensure_sniffio() -> None:
    """Make ``import sniffio`` succeed, with a stand-in when the real package is absent.

    httpcore 1.0.x runs ``import sniffio`` inside ``current_async_library()``, i.e. for every lock,
    event and semaphore it creates (several per request), and falls back to asyncio on ImportError.
    anyio >= 4.11 no longer installs sniffio and Python does not cache failed imports, so without
    sniffio every request pays for a few sys.path searches (encode/httpcore#1103). The stand-in
    answers what httpcore concludes anyway ("asyncio"), so the ``httpx_sniffio`` target shows httpx
    as it performs with sniffio installed (or with that fix).
    """
    if sniffio_installed():
        return
    stand_in = types.ModuleType("sniffio")
    stand_in.current_async_library = lambda: "asyncio"  # type: ignore[attr-defined]
    sys.modules["sniffio"] = stand_in


def serve(role: str, upstream: str | None, lifetime_s: float) -> None:
    """Run one server on a free port; its port goes to stdout as ``PORT <n>``."""
    app: ASGIApp
    if role == "upstream":
        app = upstream_app
    elif role in ("httpx", "httpx_sniffio"):
        assert upstream is not None
        if role == "httpx_sniffio":
            ensure_sniffio()
        app = HttpxProxy(upstream)
    elif role == "aiohttp":
        assert upstream is not None
        app = AiohttpProxy(upstream)
    elif role == "gateway_client":
        assert upstream is not None
        app = GatewayClientProxy(upstream)
    else:
        raise SystemExit(f"unknown server role {role!r}")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))  # the kernel picks a free port: no race between choosing and binding
    sock.listen(2048)
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="off" if role == "upstream" else "on",
        access_log=False,
        log_level="warning",
        workers=1,
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    _watch_parent(lifetime_s)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), or None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


async def run_load(
    url: str, concurrency: int, warmup_s: float, duration_s: float, watch_pids: dict[str, int]
) -> dict[str, Any]:
    """Closed loop: ``concurrency`` workers each send a request, wait for the whole answer, repeat.

    Requests that complete inside ``[warm-up end, warm-up end + duration]`` are measured.
    """
    latencies = array("d")
    counters = {"errors": 0, "total": 0}
    cpu: dict[str, dict[str, float | None]] = {}
    headers = {"accept": "application/json", "authorization": "Bearer bench"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=10.0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False, trust_env=False
    ) as session:
        t_start = time.perf_counter()
        t_measure = t_start + warmup_s
        t_end = t_measure + duration_s

        async def worker() -> None:
            while len(latencies) < MAX_SAMPLES:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                try:
                    async with session.get(url, headers=headers) as response:
                        body = await response.read()
                        ok = response.status == 200 and len(body) > 0
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                t1 = time.perf_counter()
                counters["total"] += 1
                if t_measure <= t1 <= t_end:
                    if ok:
                        latencies.append(t1 - t0)
                    else:
                        counters["errors"] += 1

        async def sample_cpu() -> None:
            await asyncio.sleep(max(0.0, t_measure - time.perf_counter()))
            before = {name: _cpu_seconds(pid) for name, pid in watch_pids.items()}
            own_before = time.process_time()
            await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
            after = {name: _cpu_seconds(pid) for name, pid in watch_pids.items()}
            own = time.process_time() - own_before
            for name in watch_pids:
                b, a = before[name], after[name]
                cpu[name] = {"cpu_pct": None if a is None or b is None else 100 * (a - b) / duration_s}
            cpu["loadgen"] = {"cpu_pct": 100 * own / duration_s}

        async with asyncio.timeout(warmup_s + duration_s + 30.0):
            await asyncio.gather(sample_cpu(), *(worker() for _ in range(concurrency)))

    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "errors": counters["errors"],
        "total_including_warmup": counters["total"],
        "rps": len(ordered) / duration_s,
        "p50_ms": percentile(ordered, 50) * 1000,
        "p99_ms": percentile(ordered, 99) * 1000,
        "max_ms": (ordered[-1] * 1000) if ordered else math.nan,
        "cpu_pct": {name: value["cpu_pct"] for name, value in cpu.items()},
    }


def load_main(args: argparse.Namespace) -> None:
    watch: dict[str, int] = {}
    for item in args.watch or []:
        name, _, pid = item.partition("=")
        watch[name] = int(pid)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(run_load(args.url, args.concurrency, args.warmup, args.duration, watch))
    print(orjson.dumps(result).decode(), flush=True)


# --------------------------------------------------------------------------------------------------
# The orchestrator
# --------------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Server:
    """A server child process (started by :func:`start_server`)."""

    def __init__(self, role: str, proc: subprocess.Popen[bytes], port: int) -> None:
        self.role = role
        self.proc = proc
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Terminate, then kill; always reaps the child."""
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
    finally:
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def start_server(
    role: str, procs: list[subprocess.Popen[bytes]], lifetime_s: float, upstream: str | None = None
) -> Server:
    cmd = [sys.executable, os.path.abspath(__file__), "--role", role, "--lifetime", str(lifetime_s)]
    if upstream is not None:
        cmd += ["--upstream", upstream]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    procs.append(proc)  # registered before anything can fail, so the caller always stops it
    assert proc.stdout is not None
    line = b""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if selector.select(timeout=STARTUP_TIMEOUT_S):
            line = proc.stdout.readline()
    if not line.startswith(b"PORT "):
        raise RuntimeError(f"{role} server did not start (exit code {proc.poll()}, output {line!r})")
    server = Server(role, proc, int(line.split()[1]))
    wait_ready(server)
    return server


def http_call(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One plain HTTP/1.1 call to 127.0.0.1 (http.client ignores proxy environment variables)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=5.0)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_ready(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.role} server exited with code {server.proc.returncode}")
        try:
            status, _ = http_call(server.port, "GET", "/__echo/ready")
            if status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.role} server not ready after {STARTUP_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


def check_passthrough(name: str, port: int, is_proxy: bool) -> None:
    """Before measuring, check that a target forwards a request faithfully."""
    path = "/__echo/api/2.0/mlflow/runs/log-metric"
    query = "run_id=abc&key=a%2Fb"
    body = b'{"key": "loss", "value": 0.5}'
    headers = {"content-type": "application/json", "x-request-id": "bench-1", "x-not-forwarded": "1"}
    status, raw = http_call(port, "POST", f"{path}?{query}", body, headers)
    echo = orjson.loads(raw)
    problems = []
    if status != 200:
        problems.append(f"status {status}")
    for key, expected in (("method", "POST"), ("raw_path", path), ("query", query), ("body", body.decode())):
        if echo.get(key) != expected:
            problems.append(f"{key}={echo.get(key)!r}, expected {expected!r}")
    echoed_headers = echo.get("headers", {})
    if echoed_headers.get("x-request-id") != "bench-1":
        problems.append("x-request-id not forwarded")
    if is_proxy and "x-not-forwarded" in echoed_headers:
        problems.append("a header outside the allow-list was forwarded")
    status, raw = http_call(port, "GET", LOAD_PATH, headers={"accept": "application/json"})
    if status != 200 or raw != CANNED_BODY:
        problems.append(f"load path answered {status} {raw[:80]!r}")
    if problems:
        raise RuntimeError(f"{name}: passthrough check failed: {'; '.join(problems)}")


def measure(
    target: str,
    url: str,
    args: argparse.Namespace,
    watch: dict[str, int],
    procs: list[subprocess.Popen[bytes]],
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--role",
        "load",
        "--url",
        url + LOAD_PATH,
        "--concurrency",
        str(args.concurrency),
        "--warmup",
        str(args.warmup),
        "--duration",
        str(args.duration),
    ]
    for name, pid in watch.items():
        cmd += ["--watch", f"{name}={pid}"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    procs.append(proc)
    try:
        out, _ = proc.communicate(timeout=args.warmup + args.duration + 60.0)
    finally:
        stop_process(proc)
        procs.remove(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed against {target} (exit code {proc.returncode})")
    result: dict[str, Any] = orjson.loads(out.strip().splitlines()[-1])
    result["target"] = target
    return result


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rps = [r["rps"] for r in runs]
    p50 = [r["p50_ms"] for r in runs]
    p99 = [r["p99_ms"] for r in runs]
    proxy_cpu = [r["cpu_pct"].get("proxy") for r in runs]
    proxy_cpu_known = [c for c in proxy_cpu if c is not None]
    # CPU time the proxy spends per request: robust to other load on the machine, unlike req/s.
    per_request = [cpu / 100 / r["rps"] * 1e6 for cpu, r in zip(proxy_cpu, runs, strict=True) if cpu and r["rps"]]
    return {
        "rps_best": round(max(rps), 1),
        "rps_median": round(statistics.median(rps), 1),
        "p50_ms_median": round(statistics.median(p50), 3),
        "p99_ms_median": round(statistics.median(p99), 3),
        "p50_ms_best": round(min(p50), 3),
        "p99_ms_best": round(min(p99), 3),
        "errors": sum(r["errors"] for r in runs),
        "proxy_cpu_pct_median": round(statistics.median(proxy_cpu_known), 1) if proxy_cpu_known else None,
        "proxy_cpu_us_per_req_median": round(statistics.median(per_request)) if per_request else None,
        "runs": [
            {
                "rps": round(r["rps"], 1),
                "p50_ms": round(r["p50_ms"], 3),
                "p99_ms": round(r["p99_ms"], 3),
                "requests": r["requests"],
                "errors": r["errors"],
                "cpu_pct": {k: None if v is None else round(v, 1) for k, v in r["cpu_pct"].items()},
            }
            for r in runs
        ],
    }


def fmt_cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_report(runs: list[dict[str, Any]], summary: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"passthrough benchmark: {args.concurrency} connections, {args.warmup:g} s warm-up + "
        f"{args.duration:g} s per measurement, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print()
    print("Per measurement (CPU % is over the measured window; 100 = one core):")
    header = (
        f"{'#':>2}  {'target':<13} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
        f"  {'proxy%':>6} {'upstr%':>6} {'loadgen%':>8}"
    )
    print(header)
    print("-" * len(header))
    for i, r in enumerate(runs, 1):
        cpu = r["cpu_pct"]
        proxy, upstream, loadgen = (fmt_cpu(cpu.get(k)) for k in ("proxy", "upstream", "loadgen"))
        print(
            f"{i:>2}  {r['target']:<13} {r['rps']:>9.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}"
            f" {r['errors']:>6}  {proxy:>6} {upstream:>6} {loadgen:>8}"
        )
    print()
    print("Summary (p50, p99 and proxy CPU per request are medians over the runs of each target):")
    header = (
        f"{'target':<13} {'best req/s':>10} {'median req/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
        f" {'vs direct':>9} {'proxy CPU us/req':>16}"
    )
    print(header)
    print("-" * len(header))
    direct = summary["direct"]["rps_median"]
    for target in TARGETS:
        s = summary[target]
        share = f"{100 * s['rps_median'] / direct:.0f}%" if direct else "-"
        us_per_req = s["proxy_cpu_us_per_req_median"]
        print(
            f"{target:<13} {s['rps_best']:>10.0f} {s['rps_median']:>12.0f} {s['p50_ms_median']:>8.2f}"
            f" {s['p99_ms_median']:>8.2f} {s['errors']:>6} {share:>9} {'-' if us_per_req is None else us_per_req:>16}"
        )
    print()
    for other in ("httpx", "httpx_sniffio"):
        value = ratio(summary["aiohttp"]["rps_median"], summary[other]["rps_median"])
        if value is not None:
            print(f"aiohttp / {other} (median req/s): {value:.2f}x")
    value = ratio(summary["gateway_client"]["rps_median"], summary["aiohttp"]["rps_median"])
    if value is not None:
        print(f"gateway_client / aiohttp (median req/s): {value:.2f}x")
    if not sniffio_installed():
        print("sniffio is not installed here: 'httpx' pays for a failed import per lock, 'httpx_sniffio' does not.")


def ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator else None


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main_orchestrator(args: argparse.Namespace) -> int:
    order: list[str] = []
    for i in range(args.rounds):
        order += list(TARGETS) if i % 2 == 0 else list(reversed(TARGETS))
    # Generous bound on how long the servers may live if this process were to vanish without cleanup.
    lifetime_s = 120.0 + len(order) * (args.warmup + args.duration + 30.0)
    procs: list[subprocess.Popen[bytes]] = []
    runs: list[dict[str, Any]] = []
    try:
        log("starting upstream and proxies ...")
        upstream = start_server("upstream", procs, lifetime_s)
        proxies = {name: start_server(name, procs, lifetime_s, upstream=upstream.url) for name in PROXIES}
        check_passthrough("direct", upstream.port, is_proxy=False)
        for name, proxy in proxies.items():
            check_passthrough(name, proxy.port, is_proxy=True)
        log(f"order: {', '.join(order)}")
        for i, target in enumerate(order, 1):
            url = upstream.url if target == "direct" else proxies[target].url
            watch = {"upstream": upstream.proc.pid}
            if target != "direct":
                watch["proxy"] = proxies[target].proc.pid
            log(f"[{i}/{len(order)}] {target}: {args.warmup:g} s warm-up + {args.duration:g} s ...")
            result = measure(target, url, args, watch, procs)
            log(
                f"[{i}/{len(order)}] {target}: {result['rps']:.0f} req/s, p50 {result['p50_ms']:.2f} ms, "
                f"p99 {result['p99_ms']:.2f} ms, {result['errors']} errors"
            )
            runs.append(result)
    finally:
        for proc in reversed(procs):
            stop_process(proc)

    summary = {target: summarize([r for r in runs if r["target"] == target]) for target in TARGETS}
    print_report(runs, summary, args)
    report = {
        "benchmark": "passthrough",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "concurrency": args.concurrency,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "order": order,
        "cpus": os.cpu_count(),
        "sniffio_installed": sniffio_installed(),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("aiohttp", "httpx", "httpcore", "uvicorn", "uvloop", "httptools")},
        **summary,
        "ratio_aiohttp_over_httpx": ratio(summary["aiohttp"]["rps_median"], summary["httpx"]["rps_median"]),
        "ratio_aiohttp_over_httpx_best": ratio(summary["aiohttp"]["rps_best"], summary["httpx"]["rps_best"]),
        "ratio_aiohttp_over_httpx_sniffio": ratio(
            summary["aiohttp"]["rps_median"], summary["httpx_sniffio"]["rps_median"]
        ),
        "ratio_gateway_client_over_aiohttp": ratio(
            summary["gateway_client"]["rps_median"], summary["aiohttp"]["rps_median"]
        ),
    }
    print(orjson.dumps(report).decode(), flush=True)
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per target (default 5)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds per target (default 1)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent connections (default 32)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds over the targets, alternating the order (default 2)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 s per target, 0.5 s warm-up")
    # Internal: how this script starts its own child processes.
    parser.add_argument(
        "--role",
        choices=("orchestrator", "load", *SERVER_ROLES),
        default="orchestrator",
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--watch", action="append", help=argparse.SUPPRESS)
    parser.add_argument("--lifetime", type=float, default=600.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 1.0 if args.quick else 5.0
    if args.warmup is None:
        args.warmup = 0.5 if args.quick else 1.0
    if args.duration <= 0 or args.warmup < 0 or args.concurrency < 1 or args.rounds < 1:
        parser.error("--duration must be > 0, --warmup >= 0, --concurrency and --rounds >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role in SERVER_ROLES:
        serve(args.role, args.upstream, args.lifetime)
        return 0
    if args.role == "load":
        load_main(args)
        return 0

    def on_sigterm(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally that stops the children

    signal.signal(signal.SIGTERM, on_sigterm)
    return main_orchestrator(args)


if __name__ == "__main__":
    sys.exit(main())
