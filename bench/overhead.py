"""Gateway overhead against a fast upstream: the full gateway against a bare passthrough (issue 9, workload 2).

Everything runs on 127.0.0.1, each server in its own process, all under uvicorn with uvloop,
httptools, one worker and no access log:

* ``upstream``: a minimal raw-ASGI app answering canned MLflow responses: ``GET
  /api/2.0/mlflow/runs/get`` gives a run in experiment ``1``, ``GET /api/2.0/mlflow/experiments/get``
  gives experiment ``1`` named ``bench/overhead`` (so it belongs to tenant ``bench``), ``GET /health``
  answers ``OK``; with the headers ``mlflow server`` 3.17 sends (``MLFLOW_RESPONSE_HEADERS``);
* ``passthrough``: a bare passthrough proxy on the gateway's own stack: a pure ASGI app that forwards
  the method, path, query, body and an allow-list of headers through the gateway's
  :class:`gateway.http.upstream.UpstreamClient` and streams the answer back with its headers
  (all but the hop-by-hop ones, as nginx's ``proxy_pass`` does). No authentication, no policy; its garbage
  collector is set as the served gateway's (``gc.freeze`` after start-up, the young generation's threshold);
* ``gateway``: ``mlflow-gateway serve`` (JWT authentication with an HS256 secret, the route table, the
  run-scoped policy of ``runs/get``: the run's ownership is looked up once, then cached).

``wrk`` (``/usr/bin/wrk``; ``make bench-overhead`` installs it with apt when missing) sends ``GET
/api/2.0/mlflow/runs/get?run_id=...`` with an ``Authorization: Bearer <jwt>`` header (set by a Lua
script) to ``direct`` (the upstream itself: the ceiling), ``passthrough`` and ``gateway``: a warm-up,
then ``--duration`` seconds with ``--connections`` connections on ``--threads`` threads, ABBA over
``--rounds``. The load generator shares the machine's cores with the servers.

``--profile`` then samples the gateway and the passthrough with py-spy (``pip install py-spy``, in the
dev extras) under the same load and prints where the gateway's time goes (own time per function, and
inclusive time) and, per function, its own CPU microseconds per request next to the passthrough's.

Progress goes to stderr, a table to stdout, and the LAST line of stdout is one JSON object.

Usage::

    python bench/overhead.py                    # 15 s per target, 2 rounds, 2 threads x 64 connections
    python bench/overhead.py --quick            # 5 s per target, 1 round
    python bench/overhead.py --profile          # ... then 15 s of py-spy on the gateway and the passthrough
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_seconds, exit_on_sigterm, group_cpu_seconds, log, machine, ratio, running_gateway

from gateway.auth.jwt import mint_token
from gateway.dev import ManagedProcess, free_port
from gateway.errors import GatewayError
from gateway.http.forward import read_whole
from gateway.observability import (
    FRONT_HEADER_NAMES,
    REQUEST_ID_HEADER,
    SECURITY_HEADERS,
    client_address,
    new_request_id,
)
from gateway.serving import freeze_startup_objects

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HOST = "127.0.0.1"
TENANT = "bench"
RUN_ID = "5f2d0c1b9a8e47d6b3c2a1f0e9d8c7b6"
LOAD_PATH = f"/api/2.0/mlflow/runs/get?run_id={RUN_ID}"
WRK = "/usr/bin/wrk"
TARGETS = ("direct", "passthrough", "gateway")
# --access-log-off-too: the same gateway with GATEWAY_ACCESS_LOG=false, to show what the access log costs.
NO_LOG_TARGET = "gateway_no_access_log"
# --server-variants: the same gateway with `serve --workers 2` (CPU summed over its processes), and under
# uvicorn's pure-Python event loop and HTTP parser instead of uvloop and httptools.
WORKERS_TARGET = "gateway_2_workers"
ASYNCIO_TARGET = "gateway_asyncio_h11"
# --aiohttp-passthrough: the same bare passthrough forwarding through aiohttp (bench/aiohttp_client.py, the
# gateway's upstream client until the eighth session of issue 9): what a bare Python proxy written with a
# common HTTP client costs, next to the one on the gateway's own client.
AIOHTTP_TARGET = "passthrough_aiohttp"
TARGET_RATIO = 0.8
TARGET_RPS_PER_WORKER = 2000
START_TIMEOUT_S = 30.0
# A run as MLflow 3 answers runs/get: info, a few metrics, params and tags (about 1 KiB).
CANNED_RUN = orjson.dumps(
    {
        "run": {
            "info": {
                "run_uuid": RUN_ID,
                "run_id": RUN_ID,
                "experiment_id": "1",
                "run_name": "bench-run",
                "user_id": "alice",
                "status": "RUNNING",
                "start_time": 1764250000000,
                "artifact_uri": f"mlflow-artifacts:/1/{RUN_ID}/artifacts",
                "lifecycle_stage": "active",
            },
            "data": {
                "metrics": [
                    {"key": f"m{i}", "value": 0.5 * i, "timestamp": 1764250000000, "step": 0} for i in range(5)
                ],
                "params": [{"key": "lr", "value": "0.01"}, {"key": "epochs", "value": "10"}],
                "tags": [
                    {"key": "mlflow.runName", "value": "bench-run"},
                    {"key": "mlflow.user", "value": "alice"},
                    {"key": "matih.tenant_id", "value": TENANT},
                    {"key": "matih.user_id", "value": "alice"},
                ],
            },
            "inputs": {},
        }
    }
)
CANNED_EXPERIMENT = orjson.dumps(
    {
        "experiment": {
            "experiment_id": "1",
            "name": f"{TENANT}/overhead",
            "artifact_location": "mlflow-artifacts:/1",
            "lifecycle_stage": "active",
            "tags": [{"key": "matih.tenant_id", "value": TENANT}],
        }
    }
)
NOT_FOUND = orjson.dumps({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "not found"})
# The headers `mlflow server` 3.17 adds to every API answer besides content-type and content-length (its
# security middleware, and Vary for CORS); its uvicorn adds date and server as the fake's does.
MLFLOW_RESPONSE_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"SAMEORIGIN"),
    (b"vary", b"Origin"),
)
# What the passthrough does not relay, as a bare reverse proxy (nginx's proxy_pass): the hop-by-hop headers, and
# date and server, which its own server sets.
NOT_RELAYED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"date",
        b"server",
    }
)
# The client headers the passthrough forwards (the gateway forwards a similar allow-list).
FORWARD_HEADERS = frozenset({b"accept", b"accept-language", b"user-agent", b"content-type", b"x-request-id"})


# --------------------------------------------------------------------------------------------------
# The servers (child processes)
# --------------------------------------------------------------------------------------------------


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _announces_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request has a body by HTTP/1.1's rule (the gateway reads none otherwise, nor does the passthrough)."""
    return any(key == b"transfer-encoding" or (key == b"content-length" and value != b"0") for key, value in headers)


async def _answer(send: Send, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *MLFLOW_RESPONSE_HEADERS]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def upstream_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The fake MLflow: canned runs/get and experiments/get answers, /health."""
    if scope["type"] != "http":
        return
    await _read_body(receive)
    path = scope["path"]
    if path == "/api/2.0/mlflow/runs/get":
        await _answer(send, 200, CANNED_RUN)
    elif path == "/api/2.0/mlflow/experiments/get":
        await _answer(send, 200, CANNED_EXPERIMENT)
    elif path == "/health":
        await _answer(send, 200, b"OK", b"text/plain; charset=utf-8")
    else:
        await _answer(send, 404, NOT_FOUND)


class PassthroughProxy:
    """A bare passthrough on the gateway's stack: pure ASGI + the gateway's UpstreamClient; no auth, no policy."""

    def __init__(self, upstream_url: str, *, gateway_headers: bool = False, aiohttp: bool = False) -> None:
        from gateway.http.upstream import UpstreamClient

        if aiohttp:
            from aiohttp_client import AiohttpUpstreamClient

            self.upstream: Any = AiohttpUpstreamClient(upstream_url)
        else:
            self.upstream = UpstreamClient(upstream_url)
        # bench/instructions.py: the headers the gateway adds (upstream: X-Forwarded-For, a request id;
        # response: the security headers and the request id), to tell their cost from the policy's.
        self.gateway_headers = gateway_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await self.upstream.start()
                    # The garbage collector set as `mlflow-gateway serve` sets it after start-up, so that the
                    # comparison is of the per-request work.
                    freeze_startup_objects()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.upstream.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = await _read_body(receive) if _announces_body(scope["headers"]) else b""
        target = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in FORWARD_HEADERS}
        headers["accept-encoding"] = "identity"
        added: list[tuple[bytes, bytes]] = []
        if self.gateway_headers:
            headers["x-forwarded-for"] = client_address(scope)
            headers["x-request-id"] = request_id = new_request_id()
            added = [*SECURITY_HEADERS, (REQUEST_ID_HEADER, request_id.encode())]
        try:
            response = await self.upstream.send(scope["method"], target, headers=headers, body=body or None)
        except GatewayError:
            await _answer(send, 502, b'{"error_code": "BAD_GATEWAY", "message": "upstream failed"}')
            return
        try:
            # Every upstream header but the hop-by-hop ones (and date, server); with the gateway's headers, those
            # the gateway sets replace the upstream's, as in the gateway.
            dropped = NOT_RELAYED | FRONT_HEADER_NAMES if added else NOT_RELAYED
            out = [(k.lower(), v) for k, v in response.headers if k.lower() not in dropped]
            out += added
            if read_whole(next((v for k, v in out if k == b"content-length"), None)):  # as the gateway relays
                whole = await response.read()
                await send({"type": "http.response.start", "status": response.status, "headers": out})
                await send({"type": "http.response.body", "body": whole})
                return
            await send({"type": "http.response.start", "status": response.status, "headers": out})
            async for chunk in response.iter_chunks():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            response.close()


def serve(role: str, port: int, upstream: str | None) -> None:
    """Run one server (``upstream``, ``passthrough`` or ``gateway-asyncio``) on ``port`` until SIGTERM."""
    import uvicorn

    if role == "gateway-asyncio":
        # The gateway exactly as `serve` runs it (GATEWAY_* from the environment), but with asyncio and h11.
        from gateway.app import create_app
        from gateway.observability import configure_logging
        from gateway.serving import GatewayServer, uvicorn_config
        from gateway.settings import load_settings

        settings = load_settings()
        configure_logging(settings.log_level)
        config = uvicorn_config(create_app(settings), settings)
        config.host, config.port, config.loop, config.http = HOST, port, "asyncio", "h11"
        GatewayServer(config, drain_delay=0).run()
        return

    app: Any = (
        upstream_app
        if role == "upstream"
        else PassthroughProxy(
            upstream or "", gateway_headers=role == "passthrough-gateway-headers", aiohttp=role == "passthrough-aiohttp"
        )
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="off" if role == "upstream" else "on",
        access_log=False,
        log_level="warning",
        backlog=2048,
        # As the gateway runs uvicorn (gateway/serving.py): the passthrough must not pay for a layer
        # (ProxyHeadersMiddleware) or a response header ("server") the gateway does not have.
        proxy_headers=False,
        server_header=False,
    )
    uvicorn.Server(config).run(sockets=[sock])


# --------------------------------------------------------------------------------------------------
# wrk
# --------------------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unreadable wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests/sec, the latency percentiles of ``--latency`` and the error counts from wrk's report."""
    rps = re.search(r"Requests/sec:\s+([0-9.]+)", output)
    total = re.search(r"([0-9]+) requests in", output)
    if rps is None or total is None:
        raise RuntimeError(f"unreadable wrk output:\n{output}")
    percentiles = {
        f"p{m.group(1)}_ms": round(_ms(m.group(2)), 3) for m in re.finditer(r"\s(50|75|90|99)%\s+(\S+)", output)
    }
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+([0-9]+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {
        "rps": float(rps.group(1)),
        "requests": int(total.group(1)),
        **percentiles,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": sum(int(x) for x in socket_errors.groups()) if socket_errors else 0,
    }


def run_wrk(url: str, script: Path, *, threads: int, connections: int, duration: float) -> dict[str, Any]:
    cmd = [WRK, f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    return parse_wrk(out)


# --------------------------------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------------------------------


def profile_process(
    name: str, pid: int, url: str, script: Path, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """py-spy on one server while wrk loads it: the functions with the most own and inclusive time.

    ``own_us`` converts every function's share of the samples into CPU microseconds per request
    (the process's CPU time over the requests wrk completed while it was sampled).
    """
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        return {"error": "py-spy is not installed (pip install py-spy)"}
    raw = workdir / f"{name}.pyspy.txt"
    seconds = args.duration
    cpu_before = cpu_seconds(pid)
    spy = subprocess.Popen(
        [py_spy, "record", "-p", str(pid), "-d", f"{int(seconds)}", "-r", "250", "-f", "raw", "-o", str(raw)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(1.0)
        wrk = run_wrk(url + LOAD_PATH, script, threads=args.threads, connections=args.connections, duration=seconds)
        cpu_us_per_req = (cpu_seconds(pid) - cpu_before) / max(1, wrk["requests"]) * 1e6
        _, err = spy.communicate(timeout=seconds + 60)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if not raw.exists():
        return {"error": f"py-spy failed: {err.decode(errors='replace')[-500:]}"}
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short(frame) for frame in stack.split(";")]
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if total == 0:
        return {"error": "py-spy recorded no samples"}
    return {
        "samples": total,
        "wrk_rps_while_profiled": wrk["rps"],
        "cpu_us_per_req_while_profiled": round(cpu_us_per_req),
        "own_pct": [(frame, round(100 * n / total, 1)) for frame, n in own.most_common(args.profile_top)],
        "inclusive_pct": [(frame, round(100 * n / total, 1)) for frame, n in inclusive.most_common(args.profile_top)],
        "own_us": {frame: n / total * cpu_us_per_req for frame, n in own.items()},
        "raw_file": str(raw) if args.keep else None,
    }


def _profile_difference(gateway: dict[str, Any], bare: dict[str, Any], top: int) -> list[tuple[str, float, float]]:
    """Functions by how much more own CPU time per request the gateway spends in them than the passthrough."""
    if "error" in gateway or "error" in bare:
        return []
    frames = set(gateway["own_us"]) | set(bare["own_us"])
    rows = [(frame, gateway["own_us"].get(frame, 0.0), bare["own_us"].get(frame, 0.0)) for frame in frames]
    rows.sort(key=lambda row: row[1] - row[2], reverse=True)
    return [(frame, round(g, 1), round(b, 1)) for frame, g, b in rows[:top]]


def _short(frame: str) -> str:
    """``function (path/to/module.py:line)`` -> ``function (module.py)``; the line numbers are dropped."""
    match = re.fullmatch(r"(.*) \((.*?):?\d*\)", frame)
    if match is None:
        return frame
    name, path = match.groups()
    parts = Path(path.rstrip(":0123456789")).parts
    short = "/".join(parts[-2:]) if "gateway" in parts[-2:-1] or "site-packages" not in parts else parts[-1]
    return f"{name} ({short})"


# --------------------------------------------------------------------------------------------------
# The orchestrator
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def server(role: str, workdir: Path, upstream: str | None = None, env: dict[str, str] | None = None) -> Any:
    port = free_port()
    argv = [sys.executable, os.path.abspath(__file__), "--role", role, "--port", str(port)]
    if upstream:
        argv += ["--upstream", upstream]
    environment = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_")} | (env or {})
    process = ManagedProcess(name=role, argv=argv, log_path=workdir / f"{role}.log", env=environment)
    try:
        process.wait_http_ok(f"http://{HOST}:{port}/health", timeout=START_TIMEOUT_S)
        yield process, f"http://{HOST}:{port}"
    finally:
        process.stop()


def check_targets(urls: dict[str, str], token: str) -> None:
    """Before measuring: every target answers the canned run; the gateway refuses a missing token."""
    import http.client
    from urllib.parse import urlsplit

    def get(url: str, headers: dict[str, str]) -> tuple[int, bytes]:
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        try:
            conn.request("GET", LOAD_PATH, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    for name, url in urls.items():
        status, body = get(url, {"authorization": f"Bearer {token}", "accept": "application/json"})
        if status != 200 or orjson.loads(body) != orjson.loads(CANNED_RUN):
            raise RuntimeError(f"{name} answered {status} {body[:200]!r}")
    status, _ = get(urls["gateway"], {"accept": "application/json"})
    if status != 401:
        raise RuntimeError(f"the gateway answered {status} without a token (expected 401)")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rps = [r["rps"] for r in runs]
    return {
        "rps_median": round(statistics.median(rps), 1),
        "rps_best": round(max(rps), 1),
        "p50_ms_median": round(statistics.median(r["p50_ms"] for r in runs), 3),
        "p99_ms_median": round(statistics.median(r["p99_ms"] for r in runs), 3),
        "cpu_us_per_req_median": (
            round(statistics.median(r["cpu_us_per_req"] for r in runs)) if runs[0].get("cpu_us_per_req") else None
        ),
        "errors": sum(r["non_2xx"] + r["socket_errors"] for r in runs),
        "runs": runs,
    }


def main_orchestrator(args: argparse.Namespace) -> int:
    if not os.access(WRK, os.X_OK):
        raise SystemExit(f"error: {WRK} is missing (make bench-overhead installs it with apt, or apt-get install wrk)")
    secret = secrets.token_urlsafe(48)
    token = mint_token(secret=secret, tenant=TENANT, user="alice", ttl_seconds=24 * 3600)
    runs: list[dict[str, Any]] = []
    profile: dict[str, Any] | None = None
    workdir = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    try:
        script = workdir / "auth.lua"
        script.write_text(
            f'wrk.headers["Authorization"] = "Bearer {token}"\nwrk.headers["Accept"] = "application/json"\n'
        )
        with contextlib.ExitStack() as stack:
            log("starting upstream, passthrough and gateway ...")
            upstream, upstream_url = stack.enter_context(server("upstream", workdir))
            passthrough, passthrough_url = stack.enter_context(server("passthrough", workdir, upstream_url))
            settings = {"GATEWAY_UPSTREAM_URL": upstream_url, "GATEWAY_JWT_SECRET": secret}
            if args.gateway_log_level:
                settings["GATEWAY_LOG_LEVEL"] = args.gateway_log_level
            gateway, gateway_url = stack.enter_context(running_gateway(workdir, "gateway", settings))
            urls = {"direct": upstream_url, "passthrough": passthrough_url, "gateway": gateway_url}
            pids = {"direct": upstream.pid, "passthrough": passthrough.pid, "gateway": gateway.pid}
            if args.access_log_off_too:
                no_log, no_log_url = stack.enter_context(
                    running_gateway(workdir, NO_LOG_TARGET, settings | {"GATEWAY_ACCESS_LOG": "false"})
                )
                urls[NO_LOG_TARGET], pids[NO_LOG_TARGET] = no_log_url, no_log.pid
            if args.server_variants:
                workers, workers_url = stack.enter_context(
                    running_gateway(workdir, WORKERS_TARGET, settings | {"GATEWAY_WORKERS": "2"})
                )
                urls[WORKERS_TARGET], pids[WORKERS_TARGET] = workers_url, workers.pid
                plain, plain_url = stack.enter_context(server("gateway-asyncio", workdir, env=settings))
                urls[ASYNCIO_TARGET], pids[ASYNCIO_TARGET] = plain_url, plain.pid
            if args.aiohttp_passthrough:
                bare, bare_url = stack.enter_context(server("passthrough-aiohttp", workdir, upstream_url))
                urls[AIOHTTP_TARGET], pids[AIOHTTP_TARGET] = bare_url, bare.pid
            check_targets(urls, token)
            targets = list(urls)
            order: list[str] = []
            for i in range(args.rounds):
                order += targets if i % 2 == 0 else list(reversed(targets))
            for i, target in enumerate(order, 1):
                url = urls[target] + LOAD_PATH
                log(f"[{i}/{len(order)}] {target}: {args.warmup:g} s warm-up + {args.duration:g} s ...")
                run_wrk(url, script, threads=args.threads, connections=args.connections, duration=args.warmup)
                # Each server leads its own process group: `serve --workers 2` is summed over its processes.
                cpu_before = {name: group_cpu_seconds(pid) for name, pid in pids.items()}
                result = run_wrk(
                    url, script, threads=args.threads, connections=args.connections, duration=args.duration
                )
                cpu_after = {name: group_cpu_seconds(pid) for name, pid in pids.items()}
                cpu_pct = {name: round(100 * (cpu_after[name] - cpu_before[name]) / args.duration, 1) for name in pids}
                result["target"] = target
                result["cpu_pct"] = cpu_pct
                # CPU time the target process spends per request: steadier than req/s on a shared machine.
                result["cpu_us_per_req"] = round(
                    cpu_pct[target] / 100 * args.duration / max(1, result["requests"]) * 1e6
                )
                log(
                    f"[{i}/{len(order)}] {target}: {result['rps']:.0f} req/s, p50 {result['p50_ms']} ms, "
                    f"p99 {result['p99_ms']} ms, {result['cpu_us_per_req']} us CPU/req, cpu% {cpu_pct}"
                )
                runs.append(result)
            if args.profile:
                log(f"profiling the gateway and the passthrough with py-spy, {args.duration:g} s each ...")
                profile = profile_process("gateway", gateway.pid, gateway_url, script, args, workdir)
                bare = profile_process("passthrough", passthrough.pid, passthrough_url, script, args, workdir)
                profile["more_than_passthrough_us"] = _profile_difference(profile, bare, args.profile_top)
                profile["passthrough_cpu_us_per_req_while_profiled"] = bare.get("cpu_us_per_req_while_profiled")
                profile.pop("own_us", None)  # every function: only the differences are reported
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    every_target = (*TARGETS, AIOHTTP_TARGET, NO_LOG_TARGET, WORKERS_TARGET, ASYNCIO_TARGET)
    measured = [target for target in every_target if any(r["target"] == target for r in runs)]
    summary = {target: summarize([r for r in runs if r["target"] == target]) for target in measured}
    g, p = summary["gateway"], summary["passthrough"]
    report = {
        "benchmark": "overhead",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "threads": args.threads,
        "connections": args.connections,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "gateway_workers": 1,
        "machine": machine(),
        **summary,
        "ratio_gateway_over_passthrough": ratio(g["rps_median"], p["rps_median"]),
        "ratio_gateway_over_passthrough_best": ratio(g["rps_best"], p["rps_best"]),
        "ratio_cpu_per_req_gateway_over_passthrough": ratio(g["cpu_us_per_req_median"], p["cpu_us_per_req_median"]),
        "ratio_gateway_over_passthrough_aiohttp": (
            ratio(g["rps_median"], summary[AIOHTTP_TARGET]["rps_median"]) if AIOHTTP_TARGET in summary else None
        ),
        "ratio_cpu_per_req_gateway_over_passthrough_aiohttp": (
            ratio(g["cpu_us_per_req_median"], summary[AIOHTTP_TARGET]["cpu_us_per_req_median"])
            if AIOHTTP_TARGET in summary
            else None
        ),
        "ratio_gateway_no_access_log_over_passthrough": (
            ratio(summary[NO_LOG_TARGET]["rps_median"], p["rps_median"]) if NO_LOG_TARGET in summary else None
        ),
        "ratio_cpu_per_req_gateway_no_access_log_over_passthrough": (
            ratio(summary[NO_LOG_TARGET]["cpu_us_per_req_median"], p["cpu_us_per_req_median"])
            if NO_LOG_TARGET in summary
            else None
        ),
        "server_variants_over_gateway": {
            variant: {
                "rps": ratio(summary[variant]["rps_median"], g["rps_median"]),
                "cpu_per_req": ratio(summary[variant]["cpu_us_per_req_median"], g["cpu_us_per_req_median"]),
            }
            for variant in (WORKERS_TARGET, ASYNCIO_TARGET)
            if variant in summary
        },
        "targets": {
            "gateway_at_least_0_8_of_passthrough": (ratio(g["rps_median"], p["rps_median"]) or 0) >= TARGET_RATIO,
            "gateway_at_least_2000_rps_per_worker": g["rps_median"] >= TARGET_RPS_PER_WORKER,
        },
        "profile": profile,
    }
    print_report(summary, report, args)
    print(orjson.dumps(report).decode(), flush=True)
    return 0


def print_report(summary: dict[str, Any], report: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"overhead benchmark: wrk {args.threads} threads x {args.connections} connections, "
        f"{args.warmup:g} s warm-up + {args.duration:g} s, {args.rounds} rounds (ABBA), "
        f"1 worker process each, {os.cpu_count()} CPUs shared with wrk"
    )
    print()
    header = (
        f"{'target':<22} {'median req/s':>12} {'best req/s':>10} {'p50 ms':>8} {'p99 ms':>8}"
        f" {'CPU us/req':>10} {'errors':>6}"
    )
    print(header)
    print("-" * len(header))
    for target, s in summary.items():
        print(
            f"{target:<22} {s['rps_median']:>12.0f} {s['rps_best']:>10.0f} {s['p50_ms_median']:>8.2f}"
            f" {s['p99_ms_median']:>8.2f} {s['cpu_us_per_req_median'] or '-':>10} {s['errors']:>6}"
        )
    print()
    print(
        f"gateway / passthrough: {report['ratio_gateway_over_passthrough']} (median req/s; target >= {TARGET_RATIO}), "
        f"{report['ratio_gateway_over_passthrough_best']} (best); CPU per request "
        f"{report['ratio_cpu_per_req_gateway_over_passthrough']}x"
    )
    print(f"gateway req/s per worker: {summary['gateway']['rps_median']:.0f} (target >= {TARGET_RPS_PER_WORKER})")
    if report["ratio_gateway_over_passthrough_aiohttp"] is not None:
        print(
            f"gateway / {AIOHTTP_TARGET}: {report['ratio_gateway_over_passthrough_aiohttp']} (median req/s), "
            f"CPU per request {report['ratio_cpu_per_req_gateway_over_passthrough_aiohttp']}x"
        )
    if report["ratio_gateway_no_access_log_over_passthrough"] is not None:
        print(
            f"{NO_LOG_TARGET} / passthrough: {report['ratio_gateway_no_access_log_over_passthrough']} (median req/s), "
            f"CPU per request {report['ratio_cpu_per_req_gateway_no_access_log_over_passthrough']}x"
        )
    for variant, ratios in report["server_variants_over_gateway"].items():
        print(f"{variant} / gateway: {ratios['rps']} (median req/s), CPU per request {ratios['cpu_per_req']}x")
    profile = report["profile"]
    if profile:
        print()
        if "error" in profile:
            print(f"profile: {profile['error']}")
        else:
            print(
                f"py-spy on the gateway ({profile['samples']} samples, "
                f"{profile['wrk_rps_while_profiled']:.0f} req/s while sampled):"
            )
            print("  own time:")
            for name, pct in profile["own_pct"]:
                print(f"    {pct:5.1f}%  {name}")
            print("  inclusive time:")
            for name, pct in profile["inclusive_pct"]:
                print(f"    {pct:5.1f}%  {name}")
            if profile.get("more_than_passthrough_us"):
                print("  own CPU us per request, gateway vs passthrough (largest differences first):")
                for name, gateway_us, bare_us in profile["more_than_passthrough_us"]:
                    print(f"    {gateway_us:6.1f} {bare_us:6.1f}  {name}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per target (default 15)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds per target (default 3)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds, ABBA order (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--quick", action="store_true", help="5 s per target, 1 s warm-up, 1 round")
    parser.add_argument("--profile", action="store_true", help="then profile the gateway with py-spy")
    parser.add_argument("--profile-top", type=int, default=25, help="functions listed per profile table")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, the py-spy samples)")
    parser.add_argument("--gateway-log-level", help="GATEWAY_LOG_LEVEL of the gateway under test")
    parser.add_argument(
        "--access-log-off-too",
        action="store_true",
        help=f"also measure the gateway with its access log off ({NO_LOG_TARGET})",
    )
    parser.add_argument(
        "--server-variants",
        action="store_true",
        help=f"also measure {WORKERS_TARGET} (serve --workers 2) and {ASYNCIO_TARGET} (asyncio + h11 instead of "
        "uvloop + httptools)",
    )
    parser.add_argument(
        "--aiohttp-passthrough",
        action="store_true",
        help=f"also measure {AIOHTTP_TARGET}: the bare passthrough forwarding through aiohttp instead of the "
        "gateway's own upstream client",
    )
    parser.add_argument(
        "--role",
        choices=(
            "orchestrator",
            "upstream",
            "passthrough",
            "passthrough-gateway-headers",
            "passthrough-aiohttp",
            "gateway-asyncio",
        ),
        default="orchestrator",
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = (5.0, 1.0, 1) if args.quick else (15.0, 3.0, 2)
    args.duration = args.duration if args.duration is not None else defaults[0]
    args.warmup = args.warmup if args.warmup is not None else defaults[1]
    args.rounds = args.rounds if args.rounds is not None else defaults[2]
    if args.duration < 1 or args.warmup < 1 or args.rounds < 1 or args.threads < 1 or args.connections < args.threads:
        parser.error("--duration and --warmup >= 1 s, --rounds and --threads >= 1, --connections >= --threads")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role != "orchestrator":
        serve(args.role, args.port, args.upstream)
        return 0
    exit_on_sigterm()
    return main_orchestrator(args)


if __name__ == "__main__":
    sys.exit(main())
