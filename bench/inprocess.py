"""The gateway's own CPU per request, in one process: the full app against a bare passthrough app (issue 9).

``overhead.py`` measures through sockets with wrk, which is the real figure but moves by 10-15 % between rounds on
a shared machine. This benchmark removes everything but the two apps: both are ASGI apps called directly, in one
process, ``--requests`` times per round, with the same canned upstream answer (``overhead.py``'s ``runs/get`` of a
run of tenant ``bench``) from an in-memory stand-in for :class:`gateway.http.upstream.UpstreamClient`:

* ``passthrough``: ``overhead.py``'s :class:`PassthroughProxy` (no authentication, no policy);
* ``gateway``: :func:`gateway.app.create_app` with a JWT secret and default settings, its access log written to
  ``/dev/null`` through the gateway's own handler, as ``serve`` sets it up; the run's owner is cached after the
  first request, as in ``overhead.py``.

No sockets, no aiohttp, no uvicorn: the difference of the two CPU times per request (``time.process_time``) is what
the gateway itself adds (authentication, canonicalisation, the route table, the run-ownership step, observability,
response handling). Rounds alternate between the two apps; the best round of each is kept, which filters out
interruptions by other processes. It does not show what the wrk figure adds on top: memory and cache effects of a
larger program, the event loop's scheduling, the garbage collector of a long-running process.

The LAST line of stdout is one JSON object. Usage::

    python bench/inprocess.py                     # 10 rounds x 3000 requests per app (about 20 s)
    python bench/inprocess.py --quick             # 4 rounds x 1000
    python bench/inprocess.py --access-log-off    # GATEWAY_ACCESS_LOG=false
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine
from overhead import CANNED_EXPERIMENT, CANNED_RUN, MLFLOW_RESPONSE_HEADERS, RUN_ID, TENANT, PassthroughProxy

from gateway.app import Gateway, create_app
from gateway.auth.jwt import mint_token
from gateway.observability import configure_logging
from gateway.settings import Settings

SECRET = "in-process-benchmark-secret-" + "x" * 32
PATH = "/api/2.0/mlflow/runs/get"


class CannedResponse:
    """What :class:`gateway.http.upstream.UpstreamResponse` offers, for one in-memory body."""

    def __init__(self, body: bytes) -> None:
        self.status = 200
        self.body = body
        self.headers = (
            (b"Content-Type", b"application/json"),
            (b"Content-Length", str(len(body)).encode()),
            (b"Server", b"uvicorn"),
            (b"Date", b"Fri, 27 Nov 2026 22:00:00 GMT"),
            *MLFLOW_RESPONSE_HEADERS,  # as `mlflow server` answers
        )

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        yield self.body

    async def read(self) -> bytes:
        return self.body

    def close(self) -> None:
        return None


class CannedUpstream:
    """Stands in for ``UpstreamClient``: ``experiments/get`` answers the experiment, anything else the run."""

    async def send(
        self, method: str, path_and_query: str, *, headers: Mapping[str, str], body: Any = None
    ) -> CannedResponse:
        return CannedResponse(CANNED_EXPERIMENT if "/experiments/get" in path_and_query else CANNED_RUN)

    async def json_call(
        self, method: str, path_and_query: str, *, headers: Mapping[str, str], body: bytes | None = None
    ) -> tuple[int, object]:
        response = await self.send(method, path_and_query, headers=headers)
        return response.status, orjson.loads(response.body)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def _scope(token: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": f"run_id={RUN_ID}".encode(),
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:5000"),
            (b"user-agent", b"wrk"),
            (b"authorization", f"Bearer {token}".encode()),
            (b"accept", b"application/json"),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 5000),
        "state": {},
    }


async def _request(app: Any, token: str) -> int:
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(_scope(token), receive, send)
    return status


async def _start(app: Any) -> tuple[asyncio.Queue[dict[str, Any]], asyncio.Task[None]]:
    """Run the app's lifespan start-up; returns what stops it."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    task = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, outbox.put)
    )
    message = await outbox.get()
    if message["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"gateway start-up failed: {message}")
    return inbox, task


def layer_of(app: Any, kind: type) -> Any:
    """The layer of type ``kind`` in the gateway's middleware chain (each layer keeps the next as ``.app``)."""
    layer = app
    while not isinstance(layer, kind):
        layer = getattr(layer, "app", None)
        if layer is None:
            raise RuntimeError(f"no {kind.__name__} in the gateway's middleware chain")
    return layer


async def measure(args: argparse.Namespace, log_stream: Any) -> dict[str, Any]:
    configure_logging("info")
    logging.getLogger("gateway").handlers[0].setStream(log_stream)  # type: ignore[attr-defined]
    token = mint_token(secret=SECRET, tenant=TENANT, user="alice", ttl_seconds=3600)
    gateway_app = create_app(Settings(upstream_url="http://127.0.0.1:9", jwt_secret=SECRET, access_log=args.access_log))
    inbox, lifespan = await _start(gateway_app)
    gateway: Gateway = layer_of(gateway_app, Gateway)
    canned = CannedUpstream()
    assert gateway.services is not None
    gateway.services = dataclasses.replace(gateway.services, upstream=canned)  # type: ignore[arg-type]
    gateway.services.ownership._upstream = canned  # type: ignore[assignment]
    passthrough = PassthroughProxy("http://127.0.0.1:9")
    passthrough.upstream = canned  # type: ignore[assignment]
    apps = {"passthrough": passthrough, "gateway": gateway_app}
    for name, app in apps.items():  # also primes the run's owner in the gateway's cache
        status = await _request(app, token)
        if status != 200:
            raise RuntimeError(f"{name} answered {status}")
    rounds: dict[str, list[float]] = {name: [] for name in apps}
    for _ in range(args.rounds):
        for name, app in apps.items():
            started = time.process_time()
            for _ in range(args.requests):
                await _request(app, token)
            rounds[name].append((time.process_time() - started) / args.requests * 1e6)
    await inbox.put({"type": "lifespan.shutdown"})
    await lifespan
    best = {name: min(values) for name, values in rounds.items()}
    return {
        "benchmark": "inprocess",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "rounds": args.rounds,
        "requests_per_round": args.requests,
        "access_log": args.access_log,
        "machine": machine(),
        "cpu_us_per_req_best": {name: round(value, 1) for name, value in best.items()},
        "cpu_us_per_req_rounds": {name: [round(value, 1) for value in values] for name, values in rounds.items()},
        "gateway_own_cpu_us_per_req": round(best["gateway"] - best["passthrough"], 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="rounds per app, alternating (default 10)")
    parser.add_argument("--requests", type=int, default=None, help="requests per round (default 3000)")
    parser.add_argument("--quick", action="store_true", help="4 rounds x 1000 requests")
    parser.add_argument("--access-log-off", dest="access_log", action="store_false", help="GATEWAY_ACCESS_LOG=false")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (4 if args.quick else 10)
    args.requests = args.requests or (1000 if args.quick else 3000)
    if args.rounds < 1 or args.requests < 1:
        parser.error("--rounds and --requests must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with open(os.devnull, "w", encoding="utf-8") as log_stream:
        report = uvloop.run(measure(args, log_stream))
    best = report["cpu_us_per_req_best"]
    print(
        f"in-process, {args.rounds} rounds x {args.requests} requests, access log {'on' if args.access_log else 'off'}"
    )
    print(f"passthrough {best['passthrough']:7.1f} us CPU per request (best round)")
    print(f"gateway     {best['gateway']:7.1f} us CPU per request (best round)")
    print(f"gateway's own work: {report['gateway_own_cpu_us_per_req']:.1f} us per request")
    print(orjson.dumps(report).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
