"""Instructions per request, counted by valgrind: the gateway against the bare passthrough, without the noise (issue 9).

``overhead.py`` measures req/s and CPU time under wrk; on a shared machine both move by 10-15 % between rounds,
more than most changes to the gateway. This benchmark counts instead: each server runs under ``valgrind
--tool=callgrind``, gets a warm-up, its counters are zeroed (``callgrind_control -z``), then it answers
``--requests`` identical requests on one keep-alive connection, one at a time, and the count is dumped
(``callgrind_control -d``). The figure is the user-space instructions the server executed per request: the same
to within a fraction of a percent from run to run, whatever else the machine does. It leaves out kernel time
(the socket system calls, the same number on every target) and does not weigh cache misses, so it is a
companion to the wrk figures, not a replacement.

Targets, each served on 127.0.0.1 against ``overhead.py``'s canned upstream (``runs/get`` of a ~1 KiB run):

* ``passthrough``: ``overhead.py``'s bare passthrough (pure ASGI + the gateway's ``UpstreamClient``);
* ``passthrough_gateway_headers``: the same, sending the headers the gateway adds (upstream: X-Forwarded-For,
  X-Request-Id; to the client: the three security headers and X-Request-Id);
* ``gateway``: ``mlflow-gateway serve`` with an HS256 secret, default settings, the run's owner cached; its
  access lines are written in batches of the size a loaded gateway writes (``GATEWAY_ACCESS_LOG_FLUSH_SECONDS``
  scaled by valgrind's slow-down, see ``measure()``);
* ``gateway_no_access_log``: the same with ``GATEWAY_ACCESS_LOG=false``.

So the gateway's extra instructions split into: the headers it adds, its access log, and the rest (token check,
route table, ownership step, canonicalisation, observability, the UI layer, the ASGI layers).

The LAST line of stdout is one JSON object. Usage::

    python bench/instructions.py                  # 2000 requests per target (about 5 minutes)
    python bench/instructions.py --quick          # 300 requests per target
    python bench/instructions.py --targets passthrough,gateway
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HOST, gateway_command, log, machine
from overhead import RUN_ID, TENANT

from gateway.auth.jwt import mint_token
from gateway.dev import ManagedProcess, free_port

TARGETS = ("passthrough", "passthrough_gateway_headers", "gateway", "gateway_no_access_log")
START_TIMEOUT_S = 300.0  # start-up under valgrind is 30-50x slower than native
OVERHEAD_SCRIPT = str(Path(__file__).resolve().parent / "overhead.py")
PATH = f"/api/2.0/mlflow/runs/get?run_id={RUN_ID}"
ACCESS_LOG_FLUSH_UNDER_VALGRIND_S = 5.0  # the default 50 ms scaled by valgrind's slow-down (see measure())
_SUMMARY = re.compile(rb"^summary:\s+(\d+)", re.MULTILINE)


def instructions_in(dump: bytes) -> int:
    """The total instruction count of one callgrind dump (its ``summary:`` line)."""
    match = _SUMMARY.search(dump)
    if match is None:
        raise ValueError("not a callgrind dump: no 'summary:' line")
    return int(match.group(1))


def require_valgrind() -> None:
    """Exit with a clear message when valgrind's tools are not installed."""
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise SystemExit(f"error: {tool} is missing (apt-get install valgrind)")


def callgrind_control(flag: str, pid: int) -> None:
    """``callgrind_control <flag> <pid>``: ``-z`` zeroes a process's counters, ``-d`` dumps them."""
    subprocess.run(["callgrind_control", flag, str(pid)], check=True, capture_output=True)


def dumped_instructions(dump: Path, where: str) -> int:
    """The count of the first dump made on request for ``--callgrind-out-file=<dump>`` (``<dump>.<n>``)."""
    dumps = sorted(dump.parent.glob(f"{dump.name}.*"))
    if not dumps:
        raise RuntimeError(f"callgrind wrote no dump ({where})")
    return instructions_in(dumps[0].read_bytes())


def _server_argv(target: str, port: int, upstream: str) -> list[str]:
    if target.startswith("passthrough"):
        role = "passthrough-gateway-headers" if target == "passthrough_gateway_headers" else "passthrough"
        return [sys.executable, OVERHEAD_SCRIPT, "--role", role, "--port", str(port), "--upstream", upstream]
    command = gateway_command()  # valgrind runs the interpreter: a console script is given to it explicitly
    if command[0] != sys.executable:
        command = [sys.executable, *command]
    return [*command, "serve", "--host", HOST, "--port", str(port)]


@contextlib.contextmanager
def _started(name: str, argv: list[str], workdir: Path, env: dict[str, str], health: str) -> Iterator[ManagedProcess]:
    process = ManagedProcess(name=name, argv=argv, log_path=workdir / f"{name}.log", env=env)
    try:
        process.wait_http_ok(health, timeout=START_TIMEOUT_S)
        yield process
    finally:
        process.stop()


def _send(connection: http.client.HTTPConnection, count: int, headers: dict[str, str]) -> None:
    for _ in range(count):
        connection.request("GET", PATH, headers=headers)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200 or not body:
            raise RuntimeError(f"answered {response.status}: {body[:200]!r}")


def measure(target: str, upstream: str, secret: str, token: str, args: argparse.Namespace, workdir: Path) -> int:
    """Instructions the server executed for ``args.requests`` requests after the warm-up."""
    port = free_port()
    dump = workdir / f"{target}.callgrind"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GATEWAY_", "MLFLOW_"))}
    env |= {"GATEWAY_UPSTREAM_URL": upstream, "GATEWAY_JWT_SECRET": secret}
    # Under valgrind the gateway answers ~45 requests a second, so a 50 ms access-log batch would hold ~2 lines
    # and each batch's write would be counted against 2 requests; at the 1,900-3,900 req/s wrk measures, a batch
    # holds ~100-200. Waiting ACCESS_LOG_FLUSH_UNDER_VALGRIND_S gives batches of that size (~225 lines).
    env["GATEWAY_ACCESS_LOG_FLUSH_SECONDS"] = str(ACCESS_LOG_FLUSH_UNDER_VALGRIND_S)
    if target == "gateway_no_access_log":
        env["GATEWAY_ACCESS_LOG"] = "false"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={dump}", *_server_argv(target, port, upstream)]
    with _started(target, argv, workdir, env, f"http://{HOST}:{port}/health") as process:
        connection = http.client.HTTPConnection(HOST, port, timeout=120)
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        try:
            _send(connection, args.warmup, headers)  # also caches the run's owner in the gateway
            callgrind_control("-z", process.pid)
            _send(connection, args.requests, headers)
            callgrind_control("-d", process.pid)
        finally:
            connection.close()
    return dumped_instructions(dump, f"{target}; log: {workdir / (target + '.log')}")


def main_orchestrator(args: argparse.Namespace) -> int:
    require_valgrind()
    secret = secrets.token_urlsafe(48)
    token = mint_token(secret=secret, tenant=TENANT, user="alice", ttl_seconds=24 * 3600)
    workdir = Path(tempfile.mkdtemp(prefix="bench-instructions-"))
    per_request: dict[str, float] = {}
    try:
        upstream_port = free_port()
        upstream_argv = [sys.executable, OVERHEAD_SCRIPT, "--role", "upstream", "--port", str(upstream_port)]
        health = f"http://{HOST}:{upstream_port}/health"
        with _started("upstream", upstream_argv, workdir, dict(os.environ), health):
            for target in args.targets:
                log(f"{target}: {args.warmup} warm-up + {args.requests} counted requests under callgrind ...")
                total = measure(target, f"http://{HOST}:{upstream_port}", secret, token, args, workdir)
                per_request[target] = total / args.requests
                log(f"{target}: {per_request[target] / 1000:.1f} k instructions per request")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report = build_report(per_request, args)
    print_report(report)
    print(orjson.dumps(report).decode(), flush=True)
    return 0


def report_head(benchmark: str, per_request: dict[str, float], args: argparse.Namespace) -> dict[str, Any]:
    """What a report of counted instructions starts with (this benchmark's and ``parts.py``'s)."""
    return {
        "benchmark": benchmark,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "requests": args.requests,
        "warmup": args.warmup,
        "machine": machine(),
        "instructions_per_request_k": {name: round(value / 1000, 1) for name, value in per_request.items()},
    }


def build_report(per_request: dict[str, float], args: argparse.Namespace) -> dict[str, Any]:
    base = per_request.get("passthrough")
    ratios = {name: round(value / base, 3) for name, value in per_request.items()} if base else {}
    split: dict[str, float] = {}
    if {"passthrough", "passthrough_gateway_headers", "gateway", "gateway_no_access_log"} <= per_request.keys():
        headers = per_request["passthrough_gateway_headers"] - per_request["passthrough"]
        access_log = per_request["gateway"] - per_request["gateway_no_access_log"]
        split = {
            "headers_k": round(headers / 1000, 1),
            "access_log_k": round(access_log / 1000, 1),
            "rest_k": round((per_request["gateway"] - per_request["passthrough"] - headers - access_log) / 1000, 1),
        }
    return {
        **report_head("instructions", per_request, args),
        "ratio_over_passthrough": ratios,
        # At equal instructions per second, req/s goes as 1 / instructions per request.
        "implied_gateway_over_passthrough_rps": round(1 / ratios["gateway"], 3) if "gateway" in ratios else None,
        "gateway_extra_split": split,
    }


def print_report(report: dict[str, Any]) -> None:
    print(f"instructions per request (callgrind, {report['requests']} requests after {report['warmup']} warm-up)")
    for name, value in report["instructions_per_request_k"].items():
        ratio = report["ratio_over_passthrough"].get(name)
        print(f"  {name:<30} {value:9.1f} k   {'' if ratio is None else f'{ratio:.3f}x passthrough'}")
    if report["implied_gateway_over_passthrough_rps"] is not None:
        print(f"gateway / passthrough req/s implied by the counts: {report['implied_gateway_over_passthrough_rps']}")
    if report["gateway_extra_split"]:
        split = report["gateway_extra_split"]
        print(
            f"the gateway's extra instructions: headers {split['headers_k']} k, access log {split['access_log_k']} k, "
            f"the rest {split['rest_k']} k"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=None, help="counted requests per target (default 2000)")
    parser.add_argument("--warmup", type=int, default=None, help="requests before counting (default 300)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, from {', '.join(TARGETS)}")
    parser.add_argument("--quick", action="store_true", help="300 counted requests after 100")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, callgrind dumps)")
    args = parser.parse_args(argv)
    args.requests = args.requests or (300 if args.quick else 2000)
    args.warmup = args.warmup if args.warmup is not None else (100 if args.quick else 300)
    args.targets = [name for name in args.targets.split(",") if name]
    unknown = set(args.targets) - set(TARGETS)
    if unknown or not args.targets:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    if args.requests < 1 or args.warmup < 1:
        parser.error("--requests and --warmup must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    return main_orchestrator(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
