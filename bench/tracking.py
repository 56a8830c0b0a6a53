"""Tracking workload: MLflow direct against MLflow through the gateway, side by side (issue 9, 1 and 3).

One real ``mlflow server`` (``gateway.dev.DevStack``: sqlite, ``--workers 1``, moto S3) and one
gateway (``mlflow-gateway serve``) in front of it, both subprocesses on free 127.0.0.1 ports. A
closed-loop load generator (its own process: aiohttp on uvloop, one keep-alive pool) runs
``--clients`` workers; each repeats the cycle

    runs/create -> runs/log-batch (10 metrics + 1 param) -> runs/get -> runs/search -> runs/update

against one path at a time: ``direct`` (MLflow's own URL) or ``gateway`` (the gateway's URL, with a
Bearer token). The paths alternate, ``direct, gateway`` then ``gateway, direct``, for ``--rounds``
rounds, each phase a warm-up followed by ``--duration`` measured seconds, so drift on the machine
affects both. The same client, the same requests and the same headers are used on both paths; each
path works in its own experiment (created beforehand), so both experiments grow alike.

Upstream amplification (issue 9, workload 3): MLflow's own access log (uvicorn, one line per
request, in the dev stack's ``logs/mlflow.log``) is read between the byte offsets the load
generator records at the start and end of each measured window. Upstream requests / client
requests in that window is 1.0 for ``direct`` by construction (a check of the method) and, for
``gateway``, counts every ownership look-up the gateway made. The breakdown by route shows which
calls repeat.

Progress goes to stderr, a table to stdout, and the LAST line of stdout is one JSON object.

Usage::

    python bench/tracking.py                          # 3 rounds x 20 s per path, 16 clients
    python bench/tracking.py --quick                  # 2 rounds x 5 s
    python bench/tracking.py --rounds 5 --duration 30 --clients 32
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from array import array
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead
from common import (
    cpu_seconds,
    exit_on_sigterm,
    group_cpu_seconds,
    log,
    machine,
    percentile,
    ratio,
    running_gateway,
)

from gateway.auth.jwt import mint_token
from gateway.dev import DevStack, gateway_environment

API = "/api/2.0/mlflow"
OPS = ("create", "log_batch", "get", "search", "update")
PATHS = ("direct", "gateway")
PATHS_WITH_PASSTHROUGH = ("direct", "passthrough", "gateway")
TENANT = "bench"
TARGET_RATIO = 0.95
TARGET_P50_ADDED_MS = 2.0
TARGET_AMPLIFICATION = 1.05
MAX_SAMPLES = 2_000_000
# MLflow's SQLAlchemy pool defaults to 5 + 10 connections for its 40 request threads. With 16
# clients, requests holding a connection wait on sqlite's lock while others wait for the pool, and
# whole phases stall for the pool's 30 s checkout timeout ("QueuePool limit of size 5 overflow 10
# reached"), on either path. A pool as large as the thread pool removes that MLflow-side stall.
MLFLOW_ENV = {"MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "40", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "10"}
REQUEST_TIMEOUT_S = 30.0
# One uvicorn access-log line: ... "GET /api/2.0/mlflow/runs/get?run_id=... HTTP/1.1" 200
_ACCESS_LINE = re.compile(rb'"([A-Z]+) (/[^ ?"]*)[^ "]* HTTP/[0-9.]+" ([0-9]{3})')


# The tags the stock client sends with every run it creates (``mlflow.start_run()``: MLflow's default
# run context), on every path. The gateway sets mlflow.user from the token instead of the client's.
CLIENT_TAGS: list[dict[str, str]] = [
    {"key": "mlflow.user", "value": "bench"},
    {"key": "mlflow.source.name", "value": "bench/tracking.py"},
    {"key": "mlflow.source.type", "value": "LOCAL"},
]
# What the gateway adds to every runs/create (user_id and these tags, from the token). With
# --direct-provenance the direct (and passthrough) path sends them itself: MLflow stores the same data on every path.
PROVENANCE: dict[str, Any] = {
    "user_id": "bench",
    "tags": [
        *CLIENT_TAGS[1:],
        {"key": "matih.tenant_id", "value": TENANT},
        {"key": "matih.user_id", "value": "bench"},
        {"key": "mlflow.user", "value": "bench"},
    ],
}

# --------------------------------------------------------------------------------------------------
# The load generator (a child process: ``--role load``)
# --------------------------------------------------------------------------------------------------


def _now_ms() -> int:
    return int(time.time() * 1000)


async def run_load(args: argparse.Namespace) -> dict[str, Any]:
    """``args.clients`` closed-loop workers; latencies of requests finishing in the measured window."""
    base = args.url.rstrip("/") + API
    headers = {
        "accept": "application/json",
        "content-type": "application/json",
        "authorization": f"Bearer {args.token}",
    }
    get_headers = {"accept": "application/json", "authorization": f"Bearer {args.token}"}
    latencies = {op: array("d") for op in OPS}
    errors: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    error_samples: list[str] = []
    window: dict[str, Any] = {}
    mlflow_log = Path(args.mlflow_log)
    connector = aiohttp.TCPConnector(limit=args.clients, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False, trust_env=False
    ) as session:
        t_start = time.perf_counter()
        t_measure = t_start + args.warmup
        t_end = t_measure + args.duration

        async def call(op: str, method: str, url: str, body: dict[str, Any] | None) -> Any:
            t0 = time.perf_counter()
            ok, answer = False, None
            try:
                if body is None:
                    response_cm = session.request(method, url, headers=get_headers)
                else:
                    response_cm = session.request(method, url, headers=headers, data=orjson.dumps(body))
                async with response_cm as response:
                    raw = await response.read()
                    ok = response.status == 200
                    if ok:
                        answer = orjson.loads(raw)
                    elif len(error_samples) < 5:
                        error_samples.append(f"{op}: {response.status} {raw[:200]!r}")
            except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
                if len(error_samples) < 5:
                    error_samples.append(f"{op}: {exc!r}")
            t1 = time.perf_counter()
            totals["ok" if ok else "failed"] += 1
            if t_measure <= t1 <= t_end:
                if ok:
                    if len(latencies[op]) < MAX_SAMPLES:
                        latencies[op].append((t1 - t0) * 1000)
                else:
                    errors[op] += 1
            return answer

        async def worker(index: int) -> None:
            search = {
                "experiment_ids": [args.experiment_id],
                "max_results": 10,
                "filter": "attributes.status = 'FINISHED'",
            }
            cycle = 0
            while time.perf_counter() < t_end:
                cycle += 1
                create = {
                    "experiment_id": args.experiment_id,
                    "start_time": _now_ms(),
                    "run_name": f"w{index}-{cycle}",
                    "tags": CLIENT_TAGS,
                }
                if args.provenance:
                    create |= PROVENANCE
                created = await call("create", "POST", f"{base}/runs/create", create)
                run_id = created.get("run", {}).get("info", {}).get("run_id") if isinstance(created, dict) else None
                if not isinstance(run_id, str):
                    await asyncio.sleep(0.05)  # an error: do not spin
                    continue
                now = _now_ms()
                batch = {
                    "run_id": run_id,
                    "metrics": [
                        {"key": f"m{i}", "value": i * 0.5 + cycle, "timestamp": now, "step": 0} for i in range(10)
                    ],
                    "params": [{"key": "lr", "value": "0.01"}],
                }
                await call("log_batch", "POST", f"{base}/runs/log-batch", batch)
                await call("get", "GET", f"{base}/runs/get?run_id={run_id}", None)
                await call("search", "POST", f"{base}/runs/search", search)
                await call(
                    "update",
                    "POST",
                    f"{base}/runs/update",
                    {"run_id": run_id, "status": "FINISHED", "end_time": _now_ms()},
                )

        async def mark_window() -> None:
            await asyncio.sleep(max(0.0, t_measure - time.perf_counter()))
            window["log_start"] = os.stat(mlflow_log).st_size
            window["cpu_start"] = {name: _cpu(pid) for name, pid in args.watch_pids.items()}
            window["own_cpu_start"] = time.process_time()
            await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
            window["log_end"] = os.stat(mlflow_log).st_size
            window["cpu_end"] = {name: _cpu(pid) for name, pid in args.watch_pids.items()}
            window["own_cpu_end"] = time.process_time()

        async with asyncio.timeout(args.warmup + args.duration + 2 * REQUEST_TIMEOUT_S):
            await asyncio.gather(mark_window(), *(worker(i) for i in range(args.clients)))

    cpu = {
        name: round(100 * (window["cpu_end"][name] - window["cpu_start"][name]) / args.duration, 1)
        for name in args.watch_pids
    }
    cpu["loadgen"] = round(100 * (window["own_cpu_end"] - window["own_cpu_start"]) / args.duration, 1)
    return {
        "latencies_ms": {op: [round(v, 3) for v in values] for op, values in latencies.items()},
        "errors": dict(errors),
        "error_samples": error_samples,
        "totals": dict(totals),
        "log_start": window["log_start"],
        "log_end": window["log_end"],
        "cpu_pct": cpu,
    }


def _cpu(spec: str) -> float:
    """CPU seconds of ``pid`` or, for ``g<pgid>``, of a whole process group."""
    return group_cpu_seconds(int(spec[1:])) if spec.startswith("g") else cpu_seconds(int(spec))


def load_main(args: argparse.Namespace) -> None:
    import uvloop

    args.watch_pids = dict(item.split("=", 1) for item in args.watch or [])
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(run_load(args))
    print(orjson.dumps(result).decode(), flush=True)


# --------------------------------------------------------------------------------------------------
# The orchestrator
# --------------------------------------------------------------------------------------------------


def http_json(method: str, url: str, *, token: str | None = None, body: dict[str, Any] | None = None) -> Any:
    """One small synchronous JSON call (set-up only)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    headers = {"accept": "application/json", "content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    try:
        conn.request(
            method,
            parts.path + (f"?{parts.query}" if parts.query else ""),
            body=orjson.dumps(body) if body else None,
            headers=headers,
        )
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"{method} {url} answered {response.status}: {raw[:300]!r}")
    return orjson.loads(raw)


def use_wal(db: Path) -> None:
    """Switch MLflow's sqlite file to write-ahead logging (persistent in the file; MLflow is idle now).

    In the default rollback-journal mode, readers and writers of MLflow's 16 concurrent requests
    wait for each other on sqlite's file lock; WAL lets reads proceed during a write. Production
    MLflow runs on PostgreSQL; this only keeps the sqlite upstream from dominating the comparison.
    """
    import sqlite3

    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        raise RuntimeError(f"could not switch {db} to WAL (journal_mode={mode})")


def measure(
    path: str,
    url: str,
    token: str,
    experiment_id: str,
    args: argparse.Namespace,
    mlflow_log: Path,
    watch: dict[str, str],
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--role",
        "load",
        "--url",
        url,
        "--token",
        token,
        "--experiment-id",
        experiment_id,
        *(["--provenance"] if path != "gateway" and args.direct_provenance else []),
        "--clients",
        str(args.clients),
        "--warmup",
        str(args.warmup),
        "--duration",
        str(args.duration),
        "--mlflow-log",
        str(mlflow_log),
    ]
    for name, spec in watch.items():
        cmd += ["--watch", f"{name}={spec}"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        out, _ = proc.communicate(timeout=args.warmup + args.duration + 120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed on {path} (exit code {proc.returncode})")
    result: dict[str, Any] = orjson.loads(out.strip().splitlines()[-1])
    result["path"] = path
    result["upstream"] = count_upstream(mlflow_log, result["log_start"], result["log_end"])
    return result


def count_upstream(mlflow_log: Path, start: int, end: int) -> dict[str, int]:
    """Requests MLflow logged between two byte offsets of its log, by ``METHOD route``."""
    with mlflow_log.open("rb") as handle:
        handle.seek(start)
        chunk = handle.read(end - start)
    counts: Counter[str] = Counter()
    for match in _ACCESS_LINE.finditer(chunk):
        counts[f"{match.group(1).decode()} {match.group(2).decode()}"] += 1
    return dict(counts)


def summarize_path(runs: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    """Figures for one path over its rounds: ops/s, p50/p99 per op and overall, amplification."""
    per_op: dict[str, Any] = {}
    all_latencies: list[float] = []
    for op in OPS:
        values = sorted(v for r in runs for v in r["latencies_ms"][op])
        all_latencies.extend(values)
        per_op[op] = {
            "count": len(values),
            "p50_ms": round(percentile(values, 50), 2),
            "p99_ms": round(percentile(values, 99), 2),
        }
    all_latencies.sort()
    ops_per_round = [sum(len(r["latencies_ms"][op]) for op in OPS) for r in runs]
    client_calls = sum(ops_per_round) + sum(sum(r["errors"].values()) for r in runs)
    upstream: Counter[str] = Counter()
    for r in runs:
        upstream.update(r["upstream"])
    upstream_calls = sum(upstream.values())
    cpu: dict[str, list[float]] = {}
    for r in runs:
        for name, value in r["cpu_pct"].items():
            cpu.setdefault(name, []).append(value)
    ops_s = [n / duration for n in ops_per_round]
    proxy_cpu_us = [  # the CPU of the path's own proxy (the gateway, or the bare passthrough)
        r["cpu_pct"][r["path"]] / 100 * duration / n * 1e6
        for r, n in zip(runs, ops_per_round, strict=True)
        if r["path"] in r["cpu_pct"] and n
    ]
    mlflow_cpu_us = [
        r["cpu_pct"]["mlflow"] / 100 * duration / n * 1e6 for r, n in zip(runs, ops_per_round, strict=True) if n
    ]
    return {
        "ops_s": round(sum(ops_per_round) / (duration * len(runs)), 1),
        "ops_s_rounds": [round(v, 1) for v in ops_s],
        "p50_ms": round(percentile(all_latencies, 50), 2),
        "p99_ms": round(percentile(all_latencies, 99), 2),
        "per_op": per_op,
        "errors": sum(sum(r["errors"].values()) for r in runs),
        # Failed calls anywhere in the phases (warm-up, or answered after the window, e.g. timeouts).
        "failed_calls_total": sum(r["totals"].get("failed", 0) for r in runs),
        "error_samples": [s for r in runs for s in r["error_samples"]][:5],
        "client_calls": client_calls,
        "upstream_calls": upstream_calls,
        "upstream_per_client_call": ratio(upstream_calls, client_calls, 4),
        "upstream_by_route": dict(upstream.most_common()),
        "cpu_pct_median": {name: round(statistics.median(values), 1) for name, values in cpu.items()},
        "proxy_cpu_us_per_op": round(statistics.median(proxy_cpu_us)) if proxy_cpu_us else None,
        "mlflow_cpu_us_per_op": round(statistics.median(mlflow_cpu_us)) if mlflow_cpu_us else None,
    }


def print_report(runs: list[dict[str, Any]], summary: dict[str, Any], args: argparse.Namespace) -> None:
    paths = args.paths
    print(
        f"tracking benchmark: {args.clients} clients, {args.rounds} rounds x ({args.warmup:g} s warm-up + "
        f"{args.duration:g} s) per path, mlflow server --workers {args.mlflow_workers}, {os.cpu_count()} CPUs"
        + (", the direct and passthrough paths send the gateway's user and tags" if args.direct_provenance else "")
    )
    print()
    header = (
        f"{'#':>2} {'path':<11} {'ops/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'up/client':>9}"
        "  cpu% proxy/mlflow/loadgen"
    )
    print(header)
    print("-" * len(header))
    for i, r in enumerate(runs, 1):
        values = sorted(v for op in OPS for v in r["latencies_ms"][op])
        n = len(values)
        errors = sum(r["errors"].values())
        up = sum(r["upstream"].values())
        cpu = r["cpu_pct"]
        print(
            f"{i:>2} {r['path']:<11} {n / args.duration:>8.1f} {percentile(values, 50):>8.2f}"
            f" {percentile(values, 99):>8.2f} {errors:>6} {up / max(1, n + errors):>9.3f}"
            f"  {cpu.get(r['path'], '-')}/{cpu.get('mlflow')}/{cpu.get('loadgen')}"
        )
    print()
    header = (
        f"{'op':<10} " + " ".join(f"{p[:7] + ' p50':>12} {p[:7] + ' p99':>12}" for p in paths) + f" {'p50 added':>10}"
    )
    print(header)
    print("-" * len(header))
    for op in (*OPS, "overall"):
        cells = []
        for path in paths:
            s = summary[path] if op == "overall" else summary[path]["per_op"][op]
            cells.append(f"{s['p50_ms']:>12.2f} {s['p99_ms']:>12.2f}")
        added = summary["p50_added_ms"] if op == "overall" else summary["p50_added_ms_per_op"][op]
        print(f"{op:<10} " + " ".join(cells) + f" {added:>10.2f}")
    print()
    d, g = summary["direct"], summary["gateway"]
    print(f"ops/s: direct {d['ops_s']:.1f} {d['ops_s_rounds']}, gateway {g['ops_s']:.1f} {g['ops_s_rounds']}")
    print(
        f"throughput ratio gateway/direct: {summary['ratio_gateway_over_direct']} "
        f"(per round: {summary['ratio_per_round']}; target >= {TARGET_RATIO})"
    )
    print(f"p50 added: {summary['p50_added_ms']} ms (target <= {TARGET_P50_ADDED_MS} ms)")
    if "passthrough" in summary:
        print(
            f"p50 added by the bare passthrough: {summary['p50_added_ms_passthrough']} ms; by the gateway over it: "
            f"{summary['p50_added_ms_over_passthrough']} ms"
        )
    print(
        f"upstream calls per client call: direct {d['upstream_per_client_call']}, gateway "
        f"{g['upstream_per_client_call']} (target <= {TARGET_AMPLIFICATION})"
    )
    print(f"gateway upstream calls by route: {g['upstream_by_route']}")
    print(
        f"proxy CPU per op: gateway {g['proxy_cpu_us_per_op']} us"
        + (f", passthrough {summary['passthrough']['proxy_cpu_us_per_op']} us" if "passthrough" in summary else "")
        + f"; mlflow CPU per op: direct {d['mlflow_cpu_us_per_op']} us, gateway {g['mlflow_cpu_us_per_op']} us"
    )
    for path in paths:
        if summary[path]["errors"] or summary[path]["failed_calls_total"]:
            print(
                f"{path}: {summary[path]['errors']} errors in the windows, {summary[path]['failed_calls_total']} "
                f"failed calls in all, e.g. {summary[path]['error_samples']}"
            )


def main_orchestrator(args: argparse.Namespace) -> int:
    secret = secrets.token_urlsafe(48)
    token = mint_token(secret=secret, tenant=TENANT, user="bench", ttl_seconds=24 * 3600)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
        data_dir = Path(tmp)
        log(f"starting the dev stack (moto S3 + mlflow server --workers {args.mlflow_workers}) ...")
        with DevStack(data_dir, mlflow_workers=args.mlflow_workers, mlflow_env=MLFLOW_ENV) as stack:
            assert stack.mlflow is not None
            mlflow_log = stack.data_dir / "logs" / "mlflow.log"
            if not args.no_wal:
                use_wal(stack.data_dir / "mlflow.db")
            env = gateway_environment(stack, secret)
            if args.gateway_log_level:
                env["GATEWAY_LOG_LEVEL"] = args.gateway_log_level
            with contextlib.ExitStack() as proxies:
                gateway, gateway_url = proxies.enter_context(running_gateway(stack.data_dir / "logs", "gateway", env))
                urls = {"direct": stack.mlflow_url, "gateway": gateway_url}
                watch = {"mlflow": f"g{stack.mlflow.pid}", "gateway": str(gateway.pid)}
                if "passthrough" in args.paths:
                    passthrough, urls["passthrough"] = proxies.enter_context(
                        overhead.server("passthrough", stack.data_dir / "logs", stack.mlflow_url)
                    )
                    watch["passthrough"] = str(passthrough.pid)
                suffix = uuid.uuid4().hex[:8]
                experiments = {  # each path its own experiment; the gateway's is created through it
                    path: http_json(
                        "POST",
                        f"{urls[path]}{API}/experiments/create",
                        token=token if path == "gateway" else None,
                        body={"name": f"{path}-{suffix}"},
                    )["experiment_id"]
                    for path in args.paths
                }
                order: list[str] = []
                for i in range(args.rounds):
                    order += list(args.paths) if i % 2 == 0 else list(reversed(args.paths))
                for i, path in enumerate(order, 1):
                    log(f"[{i}/{len(order)}] {path}: {args.warmup:g} s warm-up + {args.duration:g} s ...")
                    result = measure(path, urls[path], token, experiments[path], args, mlflow_log, watch)
                    n = sum(len(v) for v in result["latencies_ms"].values())
                    log(
                        f"[{i}/{len(order)}] {path}: {n / args.duration:.1f} ops/s, calls {result['totals']}"
                        + (f", e.g. {result['error_samples'][:2]}" if result["error_samples"] else "")
                    )
                    runs.append(result)

    summary: dict[str, Any] = {
        path: summarize_path([r for r in runs if r["path"] == path], args.duration) for path in args.paths
    }
    d, g = summary["direct"], summary["gateway"]
    summary["ratio_gateway_over_direct"] = ratio(g["ops_s"], d["ops_s"])
    # Rounds pair up in the order they ran (ABBA): each gateway phase with its neighbouring direct phase.
    summary["ratio_per_round"] = [ratio(gr, dr) for gr, dr in zip(g["ops_s_rounds"], d["ops_s_rounds"], strict=True)]
    summary["p50_added_ms"] = round(g["p50_ms"] - d["p50_ms"], 2)
    summary["p50_added_ms_per_op"] = {op: round(g["per_op"][op]["p50_ms"] - d["per_op"][op]["p50_ms"], 2) for op in OPS}
    if "passthrough" in summary:  # what any proxy hop adds here, and what the gateway adds over it
        summary["p50_added_ms_passthrough"] = round(summary["passthrough"]["p50_ms"] - d["p50_ms"], 2)
        summary["p50_added_ms_over_passthrough"] = round(g["p50_ms"] - summary["passthrough"]["p50_ms"], 2)
    print_report(runs, summary, args)
    report = {
        "benchmark": "tracking",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "clients": args.clients,
        "rounds": args.rounds,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "mlflow_workers": args.mlflow_workers,
        "mlflow_env": MLFLOW_ENV,
        "sqlite_wal": not args.no_wal,
        "direct_provenance": args.direct_provenance,
        "paths": list(args.paths),
        "machine": machine(),
        **summary,
        "targets": {
            "ratio_at_least_0_95": summary["ratio_gateway_over_direct"] is not None
            and summary["ratio_gateway_over_direct"] >= TARGET_RATIO,
            "p50_added_at_most_2_ms": summary["p50_added_ms"] <= TARGET_P50_ADDED_MS,
            "amplification_at_most_1_05": g["upstream_per_client_call"] is not None
            and g["upstream_per_client_call"] <= TARGET_AMPLIFICATION,
        },
    }
    print(orjson.dumps(report).decode(), flush=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16, help="concurrent closed-loop clients (default 16)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds; each measures both paths (default 3)")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per path and round (default 20)")
    parser.add_argument(
        "--warmup", type=float, default=None, help="warm-up seconds before each measurement (default 3)"
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds x 5 s, 2 s warm-up")
    parser.add_argument(
        "--direct-provenance",
        action="store_true",
        help="the direct (and passthrough) path creates runs with the user and tags the gateway adds",
    )
    parser.add_argument(
        "--passthrough",
        action="store_true",
        help="a third path: overhead.py's bare passthrough in front of the same MLflow (what any proxy hop adds)",
    )
    parser.add_argument(
        "--mlflow-workers", type=int, default=1, help="mlflow server --workers (default 1, as the dev stack)"
    )
    parser.add_argument(
        "--no-wal", action="store_true", help="leave MLflow's sqlite in rollback-journal mode (stalls under load)"
    )
    parser.add_argument(
        "--gateway-log-level", help="GATEWAY_LOG_LEVEL of the gateway under test (default: its default)"
    )
    # Internal: the load generator child.
    parser.add_argument("--role", choices=("orchestrator", "load"), default="orchestrator", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--experiment-id", help=argparse.SUPPRESS)
    parser.add_argument("--provenance", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mlflow-log", help=argparse.SUPPRESS)
    parser.add_argument("--watch", action="append", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = (2, 5.0, 2.0) if args.quick else (3, 20.0, 3.0)
    args.rounds = args.rounds if args.rounds is not None else defaults[0]
    args.duration = args.duration if args.duration is not None else defaults[1]
    args.warmup = args.warmup if args.warmup is not None else defaults[2]
    args.paths = PATHS_WITH_PASSTHROUGH if args.passthrough else PATHS
    if args.clients < 1 or args.rounds < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--clients and --rounds must be >= 1, --duration > 0, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "load":
        load_main(args)
        return 0
    exit_on_sigterm()
    return main_orchestrator(args)


if __name__ == "__main__":
    sys.exit(main())
