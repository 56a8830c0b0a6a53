"""The gateway's own work part by part: instructions per request with one part taken away (issue 9).

callgrind gives no per-function split of Python code here (the interpreter has no symbols, so every instruction
lands in one C function). So each part of the gateway's per-request work is counted by taking it away:
``inprocess.py``'s set-up (both apps called directly, ``overhead.py``'s canned ``runs/get`` answer from an
in-memory upstream, no sockets) runs in a child process under ``valgrind --tool=callgrind``, once per variant. After
``--warmup`` requests its counters are zeroed (``callgrind_control -z``), ``--requests`` requests are counted and
the count is dumped (``callgrind_control -d``). A count is the same to within a fraction of a percent from run to
run, whatever else the machine does.

Variants (only this benchmark's copy of the app is changed, in the child process):

* ``passthrough``: ``overhead.py``'s bare passthrough;
* ``gateway``: :func:`gateway.app.create_app` with an HS256 secret and default settings (the run's owner cached);
* ``no_access_log``: the same with ``GATEWAY_ACCESS_LOG=false``;
* ``no_front_layer``: the same without :class:`~gateway.observability.ObservabilityMiddleware`: no request id, no
  request record or context variable, no metrics, no security headers, no access log;
* ``token_as_constant``: once the token was verified, the authentication layer's work is replaced by setting that
  principal (what a token check can cost at the least: nothing);
* ``no_ui_layer``: without :class:`~gateway.ui.UiMiddleware` (the API request passes it untouched);
* ``no_ownership_step``: ``runs/get`` without its run-ownership step.

Each part is the gateway's count minus its variant's; ``rest`` is what no variant takes away (the route table,
canonicalisation, the request object, the upstream headers and query, relaying the answer). What serving adds on
top (uvicorn's check of each response header, ~5 k each) is in ``instructions.py``'s figures, not here.

The LAST line of stdout is one JSON object. Usage::

    python bench/parts.py                         # 2000 counted requests per variant (about 6 minutes)
    python bench/parts.py --quick                 # 300
    python bench/parts.py --variants passthrough,gateway,no_access_log
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import log
from inprocess import SECRET, CannedResponse, CannedUpstream, _scope, _start, layer_of
from instructions import callgrind_control, dumped_instructions, report_head, require_valgrind
from overhead import CANNED_RUN, TENANT, PassthroughProxy

from gateway.app import Gateway, create_app
from gateway.auth.jwt import mint_token
from gateway.middleware import AuthenticationMiddleware
from gateway.observability import ObservabilityMiddleware, configure_logging
from gateway.policy import runs
from gateway.settings import Settings
from gateway.ui import UiMiddleware

VARIANTS = (
    "passthrough",
    "gateway",
    "no_access_log",
    "no_front_layer",
    "token_as_constant",
    "no_ui_layer",
    "no_ownership_step",
)
# part -> the variant that takes it away
PARTS = {
    "access_log": "no_access_log",
    "front_layer": "no_front_layer",
    "token_check": "token_as_constant",
    "ui_layer": "no_ui_layer",
    "ownership_step": "no_ownership_step",
}
START_TIMEOUT_S = 600.0  # start-up under valgrind is 30-50x slower than native
# Access lines wait this long for their batch: under valgrind the app answers ~50x fewer requests a second, and a
# batch should hold about as many lines as at full speed (instructions.py does the same).
ACCESS_LOG_FLUSH_UNDER_VALGRIND_S = 5.0


class CountingUpstream(CannedUpstream):
    """The canned upstream, counting what it was asked: ownership look-ups apart from forwarded requests."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {"forwarded": 0, "lookups": 0}

    async def send(
        self, method: str, path_and_query: str, *, headers: Mapping[str, str], body: Any = None
    ) -> CannedResponse:
        self.calls["forwarded"] += 1
        return await super().send(method, path_and_query, headers=headers, body=body)

    async def json_call(
        self, method: str, path_and_query: str, *, headers: Mapping[str, str], body: bytes | None = None
    ) -> tuple[int, object]:
        self.calls["lookups"] += 1
        self.calls["forwarded"] -= 1  # json_call answers through send()
        return await super().json_call(method, path_and_query, headers=headers, body=body)


class LineCounter:
    """The access log's stream, as cheap as ``/dev/null``: counts the lines written to it and keeps the last one.

    It is its own ``buffer``, so the gateway's handler writes its batches as bytes, as it does to stderr.
    """

    def __init__(self) -> None:
        self.lines = 0
        self.last = b""
        self.buffer = self

    def write(self, data: str | bytes) -> int:
        raw = data.encode() if isinstance(data, str) else data
        self.lines += raw.count(b"\n")
        end = len(raw) - 1 if raw.endswith(b"\n") else len(raw)
        start = raw.rfind(b"\n", 0, end) + 1
        if end > start:
            self.last = raw[start:end]
        return len(data)

    def flush(self) -> None:
        return None


def _without_front_layer(app: Any) -> Any:
    front = layer_of(app, ObservabilityMiddleware)
    handoff = front._handoff  # what the front layer calls next for a request it passes on

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        scope.setdefault("state", {})
        await handoff(scope)(scope, receive, send)

    return inner


def _token_as_constant(app: Any) -> Any:
    ui = layer_of(app, UiMiddleware)
    auth = layer_of(app, AuthenticationMiddleware)
    gateway = layer_of(app, Gateway)
    verify_once = auth.handoff
    verified: list[Any] = []

    def handoff(scope: Any) -> Any:
        if verified:
            scope.setdefault("state", {})["principal"] = verified[0]
            return gateway
        after = verify_once(scope)
        principal = scope.get("state", {}).get("principal")
        if principal is not None and after is gateway:
            verified.append(principal)
        return after

    ui._next_handoff = handoff
    return app


def _without_ui_layer(app: Any) -> Any:
    layer_of(app, ObservabilityMiddleware)._handoff = layer_of(app, AuthenticationMiddleware).handoff
    return app


def _without_ownership_step(app: Any) -> Any:
    object.__setattr__(runs.READ, "request", ())  # the frozen policy of runs/get, in this process only
    return app


CHANGES: dict[str, Callable[[Any], Any]] = {
    "no_front_layer": _without_front_layer,
    "token_as_constant": _token_as_constant,
    "no_ui_layer": _without_ui_layer,
    "no_ownership_step": _without_ownership_step,
}


async def _call(app: Any, token: str) -> tuple[int, list[bytes], bytes]:
    """One ``runs/get``: the status, the response header names, the body."""
    started: dict[str, Any] = {}
    body: list[bytes] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            started.update(message)
        else:
            body.append(message.get("body", b""))

    await app(_scope(token), receive, send)
    return started.get("status", 0), [name for name, _ in started.get("headers", ())], b"".join(body)


async def run_variant(variant: str, *, warmup: int, requests: int, count: bool) -> dict[str, Any]:
    """Serve ``warmup`` + ``requests`` requests with one variant; under callgrind (``count``), count the latter."""
    stream = LineCounter()
    configure_logging("info", access_log_flush_seconds=ACCESS_LOG_FLUSH_UNDER_VALGRIND_S if count else 0.05)
    logging.getLogger("gateway").handlers[0].setStream(stream)  # type: ignore[attr-defined]
    token = mint_token(secret=SECRET, tenant=TENANT, user="alice", ttl_seconds=3600)
    upstream = CountingUpstream()
    app: Any
    stop: Callable[[], Any] | None = None
    if variant == "passthrough":
        app = PassthroughProxy("http://127.0.0.1:9")
        app.upstream = upstream
    else:
        settings = Settings(upstream_url="http://127.0.0.1:9", jwt_secret=SECRET, access_log=variant != "no_access_log")
        app = create_app(settings)
        inbox, lifespan = await _start(app)
        gateway = layer_of(app, Gateway)
        assert gateway.services is not None
        gateway.services = dataclasses.replace(gateway.services, upstream=upstream)  # type: ignore[arg-type]
        gateway.services.ownership._upstream = upstream  # type: ignore[assignment]
        app = CHANGES.get(variant, lambda same: same)(app)

        async def stop() -> None:
            await inbox.put({"type": "lifespan.shutdown"})
            await lifespan

    status, headers, body = 0, [], b""
    for _ in range(warmup):  # also caches the run's owner
        status, headers, body = await _call(app, token)
        if status != 200 or body != CANNED_RUN:
            raise RuntimeError(f"{variant} answered {status}: {body[:200]!r}")
    await asyncio.sleep(0.2)
    if count:
        callgrind_control("-z", os.getpid())
    for i in range(requests):
        await _call(app, token)
        if i & 63 == 0:
            await asyncio.sleep(0)  # let the access log's batch timer run, as the event loop would
    await asyncio.sleep(0.1)
    if count:
        callgrind_control("-d", os.getpid())
    if stop is not None:
        await stop()
    logging.getLogger("gateway").handlers[0].flush()
    return {
        "variant": variant,
        "status": status,
        "response_headers": [name.decode("latin-1") for name in headers],
        "upstream_calls": upstream.calls,
        "access_lines": stream.lines,
        "last_access_line": stream.last.decode("utf-8"),
    }


def measure(variant: str, args: argparse.Namespace, workdir: Path) -> float:
    """Instructions per request of one variant, counted in a child process under callgrind."""
    dump = workdir / f"{variant}.callgrind"
    argv = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={dump}",
        sys.executable,
        os.path.abspath(__file__),
        "--role",
        "variant",
        "--variant",
        variant,
        "--warmup",
        str(args.warmup),
        "--requests",
        str(args.requests),
        "--count",
    ]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GATEWAY_", "MLFLOW_"))}
    env["PYTHONHASHSEED"] = "0"  # the same string hashes in every run: counts repeat exactly
    done = subprocess.run(argv, capture_output=True, env=env, timeout=START_TIMEOUT_S, check=False)
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"{variant}: the counted run failed (exit code {done.returncode}): {tail}")
    return dumped_instructions(dump, variant) / args.requests


def build_report(per_request: dict[str, float], args: argparse.Namespace) -> dict[str, Any]:
    """The counts, and each part as the gateway's count minus its variant's."""
    gateway = per_request.get("gateway")
    passthrough = per_request.get("passthrough")
    parts: dict[str, float] = {}
    if gateway is not None:
        parts = {part: round((gateway - per_request[v]) / 1000, 1) for part, v in PARTS.items() if v in per_request}
    own = round((gateway - passthrough) / 1000, 1) if gateway is not None and passthrough is not None else None
    split: dict[str, float] = {}
    if own is not None and set(PARTS) <= parts.keys():
        # The front layer's figure includes the access log: each instruction is counted in one part only.
        split = {
            "front_layer_without_access_log": round(parts["front_layer"] - parts["access_log"], 1),
            "access_log": parts["access_log"],
            "token_check": parts["token_check"],
            "ui_layer": parts["ui_layer"],
            "ownership_step": parts["ownership_step"],
        }
        split["rest"] = round(own - sum(split.values()), 1)
    return {
        **report_head("parts", per_request, args),
        "gateway_own_work_k": own,
        "parts_taken_away_k": parts,
        "gateway_own_work_split_k": split,
    }


def print_report(report: dict[str, Any]) -> None:
    print(f"instructions per request in-process (callgrind, {report['requests']} after {report['warmup']} warm-up)")
    for name, value in report["instructions_per_request_k"].items():
        print(f"  {name:<20} {value:9.1f} k")
    if report["gateway_own_work_k"] is not None:
        print(f"the gateway's own work (gateway - passthrough): {report['gateway_own_work_k']} k")
    for name, value in (report["gateway_own_work_split_k"] or report["parts_taken_away_k"]).items():
        print(f"  {name:<32} {value:7.1f} k")


def main_orchestrator(args: argparse.Namespace) -> int:
    require_valgrind()
    workdir = Path(tempfile.mkdtemp(prefix="bench-parts-"))
    per_request: dict[str, float] = {}
    try:
        for variant in args.variants:
            log(f"{variant}: {args.warmup} warm-up + {args.requests} counted requests under callgrind ...")
            per_request[variant] = measure(variant, args, workdir)
            log(f"{variant}: {per_request[variant] / 1000:.1f} k instructions per request")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = build_report(per_request, args)
    print_report(report)
    print(orjson.dumps(report).decode(), flush=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=None, help="counted requests per variant (default 2000)")
    parser.add_argument("--warmup", type=int, default=300, help="requests before counting (default 300)")
    parser.add_argument("--quick", action="store_true", help="300 counted requests per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    # Internal: how this script runs one variant in its child process.
    parser.add_argument("--role", choices=("orchestrator", "variant"), default="orchestrator", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--count", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.requests = args.requests or (300 if args.quick else 2000)
    args.variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")
    if args.requests < 1 or args.warmup < 1:
        parser.error("--requests and --warmup must be >= 1")
    if args.role == "variant" and args.variant is None:
        parser.error("--role variant needs --variant")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "variant":
        result = uvloop.run(run_variant(args.variant, warmup=args.warmup, requests=args.requests, count=args.count))
        print(orjson.dumps(result).decode(), flush=True)
        return 0
    return main_orchestrator(args)


if __name__ == "__main__":
    sys.exit(main())
