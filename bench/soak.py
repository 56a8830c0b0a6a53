"""Bounded soak test: N clients for M minutes through the gateway, then every acknowledged write is checked upstream.

One real dev stack (``gateway.dev.DevStack``: moto S3 + an unmodified ``mlflow server``, sqlite, in a temp dir)
and one ``mlflow-gateway serve`` subprocess in front of it (``--workers`` processes, default 1). ``--clients``
closed-loop clients (asyncio + aiohttp in this process, one keep-alive pool), spread over ``--tenants`` tenants,
each work in their own experiment and repeat a mix of tracking writes and reads:

    10 %  runs/create                     (a new run becomes the client's current run)
    30 %  runs/log-batch                  (3 metrics with keys used once, so each one is checkable)
    20 %  runs/set-tag                    (a tag key used once)
    40 %  reads: runs/get, runs/search, experiments/get (in turn)

Every request is timed; a non-200 answer or a transport error counts as an error (by status). The gateway's
VmRSS (summed over its process group with ``--workers``) is read before the load, every second during it and
after it. When the time is up, every write the gateway acknowledged with 200 is read back **directly from the
mlflow server** (not through the gateway): each created run must exist with the tenant's ``matih.tenant_id``
tag, each logged metric must have its value, each set tag its value. Missing writes make the exit code 1.

Progress goes to stderr, a summary to stdout, and the LAST line of stdout is one JSON object. Not part of
``make test``: ``make bench-soak`` or::

    python bench/soak.py                       # 8 clients, 2 minutes
    python bench/soak.py --clients 16 --minutes 10 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import random
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import exit_on_sigterm, group_pids, log, machine, percentile, rss_mib, running_gateway

from gateway.auth.jwt import mint_token
from gateway.dev import DevStack, gateway_environment

API = "/api/2.0/mlflow"
REQUEST_TIMEOUT_S = 30.0


@dataclass
class Acknowledged:
    """Writes the gateway answered 200 to, by run: what must be found upstream afterwards."""

    tenant: str
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Results:
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    runs: dict[str, Acknowledged] = field(default_factory=dict)
    writes_acknowledged: int = 0

    def record(self, op: str, started: float, outcome: str) -> None:
        self.latencies_ms.setdefault(op, []).append((time.perf_counter() - started) * 1000)
        if outcome != "200":
            self.errors[f"{op} {outcome}"] += 1


class Client:
    """One closed-loop client: its own experiment, a current run, a mix of writes and reads."""

    def __init__(self, index: int, *, session: aiohttp.ClientSession, base: str, tenant: str, token: str) -> None:
        self.index = index
        self.session = session
        self.base = base
        self.tenant = tenant
        self.headers = {"Authorization": f"Bearer {token}"}
        self.experiment_id = ""
        self.run_id: str | None = None
        self.serial = itertools.count()
        self.reads = itertools.cycle(("runs/get", "runs/search", "experiments/get"))
        self.random = random.Random(index)

    async def call(self, results: Results, op: str, method: str, route: str, body: Any = None) -> Any:
        """One request; returns the decoded JSON on 200, else None (the error is recorded)."""
        started = time.perf_counter()
        kwargs: dict[str, Any] = {"headers": self.headers}
        if method == "GET":
            kwargs["params"] = body
        else:
            kwargs["data"] = orjson.dumps(body)
            kwargs["headers"] = {**self.headers, "Content-Type": "application/json"}
        try:
            async with self.session.request(method, f"{self.base}{API}/{route}", **kwargs) as response:
                raw = await response.read()
                outcome = str(response.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            results.record(op, started, type(exc).__name__)
            return None
        results.record(op, started, outcome)
        return orjson.loads(raw) if outcome == "200" else None

    async def run(self, results: Results, deadline: float) -> None:
        created = await self.call(
            results,
            "experiments/create",
            "POST",
            "experiments/create",
            {"name": f"soak-{self.index}-{uuid.uuid4().hex}"},
        )
        if created is None:
            return
        self.experiment_id = created["experiment_id"]
        while time.monotonic() < deadline:
            draw = self.random.random()
            if self.run_id is None or draw < 0.10:
                await self.create_run(results)
            elif draw < 0.40:
                await self.log_batch(results)
            elif draw < 0.60:
                await self.set_tag(results)
            else:
                await self.read(results)

    async def create_run(self, results: Results) -> None:
        body = {"experiment_id": self.experiment_id, "start_time": int(time.time() * 1000)}
        answer = await self.call(results, "runs/create", "POST", "runs/create", body)
        if answer is not None:
            self.run_id = answer["run"]["info"]["run_id"]
            results.runs[self.run_id] = Acknowledged(self.tenant)
            results.writes_acknowledged += 1

    async def log_batch(self, results: Results) -> None:
        assert self.run_id is not None
        serial, now = next(self.serial), int(time.time() * 1000)
        metrics = {f"m{serial}_{i}": round(self.random.uniform(-1e6, 1e6), 3) for i in range(3)}
        body = {
            "run_id": self.run_id,
            "metrics": [{"key": k, "value": v, "timestamp": now, "step": serial} for k, v in metrics.items()],
        }
        if await self.call(results, "runs/log-batch", "POST", "runs/log-batch", body) is not None:
            results.runs[self.run_id].metrics.update(metrics)
            results.writes_acknowledged += 1

    async def set_tag(self, results: Results) -> None:
        assert self.run_id is not None
        key, value = f"soak.t{next(self.serial)}", secrets.token_hex(8)
        body = {"run_id": self.run_id, "key": key, "value": value}
        if await self.call(results, "runs/set-tag", "POST", "runs/set-tag", body) is not None:
            results.runs[self.run_id].tags[key] = value
            results.writes_acknowledged += 1

    async def read(self, results: Results) -> None:
        route = next(self.reads)
        if route == "runs/get":
            await self.call(results, route, "GET", route, {"run_id": self.run_id})
        elif route == "runs/search":
            body = {"experiment_ids": [self.experiment_id], "max_results": 20}
            await self.call(results, route, "POST", route, body)
        else:
            await self.call(results, route, "GET", route, {"experiment_id": self.experiment_id})


async def sample_rss(pgid: int, samples: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.append(group_rss_mib(pgid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)


def group_rss_mib(pgid: int) -> float:
    """VmRSS summed over the gateway's process group (the supervisor and its workers)."""
    return sum(rss_mib(pid) for pid in group_pids(pgid))


async def load(args: argparse.Namespace, gateway_url: str, tokens: dict[str, str], pgid: int) -> dict[str, Any]:
    results = Results()
    rss_samples: list[float] = []
    stop = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=args.clients * 2)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    tenants = list(tokens)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        clients = [
            Client(
                i,
                session=session,
                base=gateway_url,
                tenant=tenants[i % len(tenants)],
                token=tokens[tenants[i % len(tenants)]],
            )
            for i in range(args.clients)
        ]
        sampler = asyncio.create_task(sample_rss(pgid, rss_samples, stop))
        started = time.monotonic()
        deadline = started + args.minutes * 60
        await asyncio.gather(*(client.run(results, deadline) for client in clients))
        elapsed = time.monotonic() - started
        stop.set()
        await sampler
    return {"results": results, "elapsed_s": elapsed, "rss_samples": rss_samples}


async def verify(mlflow_url: str, runs: dict[str, Acknowledged]) -> tuple[int, list[str]]:
    """Read every acknowledged run back from MLflow itself; return (writes verified, what is missing)."""
    missing: list[str] = []
    verified = 0
    semaphore = asyncio.Semaphore(8)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as session:

        async def check(run_id: str, expected: Acknowledged) -> None:
            nonlocal verified
            async with semaphore, session.get(f"{mlflow_url}{API}/runs/get", params={"run_id": run_id}) as response:
                if response.status != 200:
                    missing.append(f"run {run_id}: HTTP {response.status}")
                    return
                data = (await response.json())["run"].get("data", {})
            tags = {tag["key"]: tag["value"] for tag in data.get("tags", [])}
            metrics = {metric["key"]: metric["value"] for metric in data.get("metrics", [])}
            if tags.get("matih.tenant_id") != expected.tenant:
                missing.append(f"run {run_id}: matih.tenant_id {tags.get('matih.tenant_id')!r} != {expected.tenant!r}")
            else:
                verified += 1  # the run itself
            batches = {key.split("_")[0] for key in expected.metrics}
            lost_batches = {key.split("_")[0] for key, value in expected.metrics.items() if metrics.get(key) != value}
            verified += len(batches - lost_batches)
            missing.extend(f"run {run_id}: metrics of batch {batch} missing" for batch in sorted(lost_batches))
            for key, value in expected.tags.items():
                if tags.get(key) == value:
                    verified += 1
                else:
                    missing.append(f"run {run_id}: tag {key} is {tags.get(key)!r}, expected {value!r}")

        await asyncio.gather(*(check(run_id, expected) for run_id, expected in runs.items()))
    return verified, missing


def summarize(args: argparse.Namespace, outcome: dict[str, Any], rss_start: float, rss_end: float) -> dict[str, Any]:
    results: Results = outcome["results"]
    every = sorted(latency for values in results.latencies_ms.values() for latency in values)
    by_op = {
        op: {
            "requests": len(values),
            "p50_ms": round(percentile(sorted(values), 50), 2),
            "p99_ms": round(percentile(sorted(values), 99), 2),
        }
        for op, values in sorted(results.latencies_ms.items())
    }
    samples = outcome["rss_samples"] or [rss_start]
    return {
        "requests": len(every),
        "errors": sum(results.errors.values()),
        "errors_by_kind": dict(results.errors),
        "elapsed_s": round(outcome["elapsed_s"], 1),
        "rps": round(len(every) / outcome["elapsed_s"], 1) if outcome["elapsed_s"] else None,
        "p50_ms": round(percentile(every, 50), 2),
        "p99_ms": round(percentile(every, 99), 2),
        "by_op": by_op,
        "gateway_rss_mib": {"start": round(rss_start, 1), "end": round(rss_end, 1), "peak": round(max(samples), 1)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients (default 8)")
    parser.add_argument("--minutes", type=float, default=2.0, help="duration of the load (default 2)")
    parser.add_argument("--tenants", type=int, default=2, help="tenants the clients are spread over (default 2)")
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes (default 1)")
    parser.add_argument("--tmp-dir", default=None, help="where the work dir goes (default: the system temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, sqlite, S3 log)")
    args = parser.parse_args()
    if args.clients < 1 or args.minutes <= 0 or args.tenants < 1 or args.workers < 1:
        parser.error("--clients, --tenants, --workers must be >= 1 and --minutes > 0")
    exit_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="soak-", dir=args.tmp_dir))
    secret = secrets.token_urlsafe(48)
    try:
        log(f"starting the dev stack in {work}")
        with DevStack(work / "stack") as stack:
            settings = gateway_environment(stack, secret) | {"GATEWAY_WORKERS": str(args.workers)}
            with running_gateway(work, "gateway", settings) as (gateway, gateway_url):
                tokens = {
                    f"soak{t}": mint_token(secret=secret, tenant=f"soak{t}", user=f"user{t}", ttl_seconds=24 * 3600)
                    for t in range(args.tenants)
                }
                rss_start = group_rss_mib(gateway.pid)
                log(f"{args.clients} clients for {args.minutes:g} min through {gateway_url} (RSS {rss_start:.1f} MiB)")
                outcome = asyncio.run(load(args, gateway_url, tokens, gateway.pid))
                rss_end = group_rss_mib(gateway.pid)
                summary = summarize(args, outcome, rss_start, rss_end)
                results: Results = outcome["results"]
                acknowledged = results.writes_acknowledged
                log(f"load done: {summary['requests']} requests; verifying {acknowledged} writes upstream")
                verified, missing = asyncio.run(verify(stack.mlflow_url, results.runs))
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report = {
        "benchmark": "soak",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "clients": args.clients,
        "minutes": args.minutes,
        "tenants": args.tenants,
        "workers": args.workers,
        **summary,
        "writes_acknowledged": results.writes_acknowledged,
        "writes_verified": verified,
        "writes_missing": len(missing),
        "missing_examples": missing[:20],
        "machine": machine(),
    }
    print(
        f"requests {report['requests']} in {report['elapsed_s']} s ({report['rps']} req/s), errors {report['errors']}"
    )
    for kind, count in sorted(report["errors_by_kind"].items()):
        print(f"  error {kind}: {count}")
    print(f"latency p50 {report['p50_ms']} ms, p99 {report['p99_ms']} ms")
    for op, figures in report["by_op"].items():
        print(f"  {op:<20} {figures['requests']:>7}  p50 {figures['p50_ms']:>8} ms  p99 {figures['p99_ms']:>8} ms")
    rss = report["gateway_rss_mib"]
    print(f"gateway RSS start {rss['start']} MiB, end {rss['end']} MiB, peak {rss['peak']} MiB")
    print(f"writes acknowledged {report['writes_acknowledged']}, found upstream {verified}, missing {len(missing)}")
    print(orjson.dumps(report).decode())
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
