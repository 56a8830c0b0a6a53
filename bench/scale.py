"""Scale: ownership and search costs with many tenants and objects (issue 9, workload 4).

For each tenant count in ``--tenants`` (default ``10,100``), the script builds one sqlite MLflow
database holding ``--experiments`` experiments (default 10,000) and ``--runs`` runs (default
100,000), spread evenly over the tenants, so the data set is the same size and only its split
between tenants changes. The database is populated directly (MLflow's own ``SqlAlchemyStore``
creates the schema, then bulk ``INSERT`` statements), before an unmodified ``mlflow server``
(``gateway.dev.DevStack``) starts on it; a gateway (``mlflow-gateway serve``) runs in front.

One client (``http.client``, keep-alive, sequential: latencies are not queueing) then sends the same
requests three times:

* ``direct``: to MLflow itself (the upstream's own cost; experiment names carry the prefix);
* ``cold``: through a freshly started gateway: every run and experiment is touched for the first
  time, so each ownership check is an upstream look-up;
* ``warm``: the same requests again: the ownership caches answer.

The requests, ``--samples`` of each kind, pick random tenants and objects: ``get-run`` (``GET
runs/get`` of a random run), ``search-runs`` (``POST runs/search`` in a random experiment of the
tenant, ``max_results`` 10) and ``search-experiments`` (``POST experiments/search``,
``max_results`` 10; the gateway scopes it with ``name LIKE '<tenant>/%'``). Upstream calls per client
call come from MLflow's access log; the gateway's RSS is read after each phase. The figures of
interest are the ratios between tenant counts (flat = about 1.0) and the gateway's added latency.

Progress goes to stderr, a table to stdout, and the LAST line of stdout is one JSON object.

Usage::

    python bench/scale.py                       # 10,000 experiments, 100,000 runs; 10 vs 100 tenants
    python bench/scale.py --quick               # 1,000 experiments, 10,000 runs, 100 samples
    python bench/scale.py --experiments 20000 --runs 200000 --tenants 10,100,1000 --cache-size 5000
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import random
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import exit_on_sigterm, log, machine, percentile, ratio, rss_mib, running_gateway
from tracking import MLFLOW_ENV, count_upstream, use_wal

from gateway.auth.jwt import mint_token
from gateway.dev import DevStack, gateway_environment

API = "/api/2.0/mlflow"
OPS = ("get_run", "search_runs", "search_experiments")
FLAT_TOLERANCE = 1.25  # a ratio between tenant counts within 1/1.25 .. 1.25 counts as flat here


# -- populating the database ---------------------------------------------------------------------


def populate(db: Path, *, tenants: int, experiments: int, runs: int, seed: int) -> dict[str, Any]:
    """Create MLflow's schema in ``db`` and bulk-insert the data set; return what was inserted."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    started = time.perf_counter()
    store = SqlAlchemyStore(f"sqlite:///{db}", "mlflow-artifacts:/")  # runs MLflow's migrations
    store.engine.dispose()
    schema_s = time.perf_counter() - started
    rng = random.Random(seed)
    now = int(time.time() * 1000)
    tenant_names = [f"t{k:04d}" for k in range(tenants)]
    exp_rows = []
    exp_tenant: dict[int, str] = {}
    for i in range(experiments):
        experiment_id = i + 1  # 0 is MLflow's Default
        tenant = tenant_names[i % tenants]
        exp_tenant[experiment_id] = tenant
        exp_rows.append(
            (experiment_id, f"{tenant}/exp-{i // tenants}", f"mlflow-artifacts:/{experiment_id}", "active", now, now)
        )
    run_rows = []
    run_experiment: dict[str, int] = {}
    for j in range(runs):
        experiment_id = j % experiments + 1
        run_id = uuid.UUID(int=rng.getrandbits(128)).hex
        run_experiment[run_id] = experiment_id
        run_rows.append(
            (
                run_id,
                f"run-{j}",
                "LOCAL",
                "",
                "",
                "bench",
                "FINISHED",
                now - 1000,
                now,
                "",
                "active",
                f"mlflow-artifacts:/{experiment_id}/{run_id}/artifacts",
                experiment_id,
            )
        )
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.executemany(
            "INSERT INTO experiments (experiment_id, name, artifact_location, lifecycle_stage, creation_time,"
            " last_update_time) VALUES (?, ?, ?, ?, ?, ?)",
            exp_rows,
        )
        conn.executemany(
            "INSERT INTO experiment_tags (key, value, experiment_id) VALUES ('matih.tenant_id', ?, ?)",
            [(tenant, eid) for eid, tenant in exp_tenant.items()],
        )
        conn.executemany(
            "INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id, status,"
            " start_time, end_time, source_version, lifecycle_stage, artifact_uri, experiment_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            run_rows,
        )
    return {
        "tenants": tenant_names,
        "exp_tenant": exp_tenant,
        "run_experiment": run_experiment,
        "schema_s": round(schema_s, 1),
        "insert_s": round(time.perf_counter() - started - schema_s, 1),
    }


# -- the client ------------------------------------------------------------------------------------


class Client:
    """One keep-alive HTTP/1.1 connection; each call's latency in ms is recorded."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)

    def call(self, method: str, path: str, *, token: str | None, body: dict[str, Any] | None = None) -> float:
        headers = {"accept": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        payload = orjson.dumps(body) if body is not None else None
        if payload is not None:
            headers["content-type"] = "application/json"
        started = time.perf_counter()
        self.conn.request(method, API + path, body=payload, headers=headers)
        response = self.conn.getresponse()
        raw = response.read()
        elapsed = (time.perf_counter() - started) * 1000
        if response.status != 200:
            raise RuntimeError(f"{method} {path} answered {response.status}: {raw[:300]!r}")
        return elapsed

    def close(self) -> None:
        self.conn.close()


def plan_requests(data: dict[str, Any], samples: int, seed: int) -> list[tuple[str, str, dict[str, Any]]]:
    """``samples`` requests of each kind, interleaved: (op, tenant, parameters). Objects are distinct."""
    rng = random.Random(seed)
    runs = rng.sample(sorted(data["run_experiment"]), samples)
    run_parents = {data["run_experiment"][r] for r in runs}
    # Experiments for search-runs that no sampled run lives in, so their first use is a cold look-up.
    candidates = [eid for eid in data["exp_tenant"] if eid not in run_parents]
    experiments = rng.sample(candidates, min(samples, len(candidates)))
    plan: list[tuple[str, str, dict[str, Any]]] = []
    for i in range(samples):
        run_id = runs[i]
        plan.append(("get_run", data["exp_tenant"][data["run_experiment"][run_id]], {"run_id": run_id}))
        eid = experiments[i % len(experiments)]
        plan.append(("search_runs", data["exp_tenant"][eid], {"experiment_id": str(eid)}))
        plan.append(("search_experiments", rng.choice(data["tenants"]), {}))
    return plan


def run_plan(
    targets: list[tuple[Client, dict[str, str] | None]], plan: list[tuple[str, str, dict[str, Any]]]
) -> list[dict[str, list[float]]]:
    """Send each planned request to every target in turn (interleaved: drift hits all alike).

    A target's tokens are ``None`` for MLflow itself, which then gets the tenant filter the gateway adds.
    """
    latencies: list[dict[str, list[float]]] = [{op: [] for op in OPS} for _ in targets]
    for op, tenant, params in plan:
        for (client, tokens), recorded in zip(targets, latencies, strict=True):
            token = tokens[tenant] if tokens is not None else None
            if op == "get_run":
                elapsed = client.call("GET", f"/runs/get?run_id={params['run_id']}", token=token)
            elif op == "search_runs":
                body = {"experiment_ids": [params["experiment_id"]], "max_results": 10}
                elapsed = client.call("POST", "/runs/search", token=token, body=body)
            else:
                body = {"max_results": 10}
                if tokens is None:  # direct: what the gateway sends upstream for this tenant
                    body["filter"] = f"name LIKE '{tenant}/%'"
                elapsed = client.call("POST", "/experiments/search", token=token, body=body)
            recorded[op].append(elapsed)
    return latencies


def stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": round(percentile(ordered, 50), 3),
        "p99_ms": round(percentile(ordered, 99), 3),
        "mean_ms": round(statistics.fmean(ordered), 3),
    }


@contextlib.contextmanager
def measured_phase(mlflow_log: Path) -> Iterator[dict[str, Any]]:
    """Upstream requests MLflow logged during the block (by route), in the yielded dict."""
    result: dict[str, Any] = {}
    start = mlflow_log.stat().st_size
    yield result
    time.sleep(0.2)  # the last access-log line
    result["upstream"] = count_upstream(mlflow_log, start, mlflow_log.stat().st_size)


def measure_config(tenants: int, args: argparse.Namespace) -> dict[str, Any]:
    """Populate, start MLflow and a gateway, run the direct, cold and warm phases."""
    secret = secrets.token_urlsafe(48)
    with tempfile.TemporaryDirectory(prefix=f"bench-scale-{tenants}-") as tmp:
        data_dir = Path(tmp)
        log(f"{tenants} tenants: populating {args.experiments} experiments and {args.runs} runs ...")
        data = populate(
            data_dir / "mlflow.db", tenants=tenants, experiments=args.experiments, runs=args.runs, seed=args.seed
        )
        log(f"{tenants} tenants: schema {data['schema_s']} s, inserts {data['insert_s']} s; starting MLflow ...")
        tokens = {t: mint_token(secret=secret, tenant=t, user="bench", ttl_seconds=24 * 3600) for t in data["tenants"]}
        plan = plan_requests(data, args.samples, args.seed + tenants)
        with DevStack(data_dir, mlflow_env=MLFLOW_ENV) as stack:
            use_wal(data_dir / "mlflow.db")
            mlflow_log = stack.data_dir / "logs" / "mlflow.log"
            result: dict[str, Any] = {"tenants": tenants, "populate_s": data["schema_s"] + data["insert_s"]}
            env = gateway_environment(stack, secret)
            if args.cache_size:
                env["GATEWAY_CACHE_SIZE"] = str(args.cache_size)
            direct = Client(stack.mlflow_url)
            with running_gateway(stack.data_dir / "logs", "gateway", env) as (gateway, url):
                client = Client(url)
                try:
                    # MLflow's own warm-up, on other objects than the measured ones (the gateway stays cold).
                    run_plan([(direct, None)], plan_requests(data, min(100, args.samples), args.seed + 7 * tenants))
                    result["gateway_rss_mib_idle"] = round(rss_mib(gateway.pid), 1)
                    for phase in ("cold", "warm"):
                        log(f"{tenants} tenants: {phase} phase, {len(plan)} requests to MLflow and to the gateway ...")
                        with measured_phase(mlflow_log) as counted:
                            by_target = run_plan([(direct, None), (client, tokens)], plan)
                        # Every direct request is one upstream call; the rest are the gateway's.
                        gateway_calls = sum(counted["upstream"].values()) - len(plan)
                        result[phase] = {
                            "direct": {op: stats(by_target[0][op]) for op in OPS},
                            "gateway": {op: stats(by_target[1][op]) for op in OPS},
                            "gateway_upstream_per_client_call": ratio(gateway_calls, len(plan), 3),
                            "upstream_by_route": counted["upstream"],
                        }
                        result[phase]["added_p50_ms"] = {
                            op: round(result[phase]["gateway"][op]["p50_ms"] - result[phase]["direct"][op]["p50_ms"], 3)
                            for op in OPS
                        }
                        result[f"gateway_rss_mib_after_{phase}"] = round(rss_mib(gateway.pid), 1)
                finally:
                    client.close()
                    direct.close()
    return result


def print_report(configs: list[dict[str, Any]], report: dict[str, Any]) -> None:
    print(
        f"scale benchmark: {report['experiments']} experiments, {report['runs']} runs, {report['samples']} samples per "
        "op and phase, 1 sequential client alternating MLflow and the gateway, mlflow server --workers 1 (sqlite, WAL)"
    )
    print()
    header = (
        f"{'tenants':>7} {'phase':<5} {'target':<7} "
        + " ".join(f"{op + ' p50/p99 ms':>28}" for op in OPS)
        + f" {'up/call':>8}"
    )
    print(header)
    print("-" * len(header))
    for config in configs:
        for phase in ("cold", "warm"):
            for target in ("direct", "gateway"):
                figures = config[phase][target]
                cells = " ".join(f"{figures[op]['p50_ms']:>13.2f} / {figures[op]['p99_ms']:>12.2f}" for op in OPS)
                up = config[phase]["gateway_upstream_per_client_call"] if target == "gateway" else 1.0
                print(f"{config['tenants']:>7} {phase:<5} {target:<7} {cells} {up:>8}")
    print()
    for config in configs:
        print(
            f"{config['tenants']} tenants: gateway RSS idle {config['gateway_rss_mib_idle']} MiB, after cold "
            f"{config['gateway_rss_mib_after_cold']} MiB, after warm {config['gateway_rss_mib_after_warm']} MiB; "
            f"added p50 ms cold {config['cold']['added_p50_ms']}, warm {config['warm']['added_p50_ms']}"
        )
    if "ratios_last_over_first" in report:
        print(
            f"gateway p50 ratios {report['tenant_counts'][-1]} / {report['tenant_counts'][0]} tenants: "
            f"{report['ratios_last_over_first']}"
        )
        print(
            f"(gateway p50 / direct p50) at {report['tenant_counts'][-1]} over the same at "
            f"{report['tenant_counts'][0]} "
            f"tenants: {report['relative_cost_last_over_first']} (flat: {report['flat']})"
        )


def main_orchestrator(args: argparse.Namespace) -> int:
    configs = [measure_config(tenants, args) for tenants in args.tenants]
    report: dict[str, Any] = {
        "benchmark": "scale",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "experiments": args.experiments,
        "runs": args.runs,
        "samples": args.samples,
        "tenant_counts": args.tenants,
        "cache_size": args.cache_size or "default (GATEWAY_CACHE_SIZE 100000)",
        "machine": machine(),
        "configs": configs,
    }
    if len(configs) > 1:
        first, last = configs[0], configs[-1]
        ratios = {
            f"{phase}_{target}": {
                op: ratio(last[phase][target][op]["p50_ms"], first[phase][target][op]["p50_ms"]) for op in OPS
            }
            for phase in ("cold", "warm")
            for target in ("direct", "gateway")
        }
        report["ratios_last_over_first"] = ratios
        # The gateway's cost relative to MLflow's own (gateway p50 / direct p50) at each tenant count: the
        # upstream may itself get faster or slower with the split, the gateway's share must not grow.
        relative = {
            phase: {
                op: ratio(
                    (ratio(last[phase]["gateway"][op]["p50_ms"], last[phase]["direct"][op]["p50_ms"]) or 0),
                    ratio(first[phase]["gateway"][op]["p50_ms"], first[phase]["direct"][op]["p50_ms"]),
                )
                for op in OPS
            }
            for phase in ("cold", "warm")
        }
        report["relative_cost_last_over_first"] = relative
        report["flat"] = all(
            1 / FLAT_TOLERANCE <= (value or 0) <= FLAT_TOLERANCE
            for by_op in relative.values()
            for value in by_op.values()
        )
    print_report(configs, report)
    print(orjson.dumps(report).decode(), flush=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", type=int, default=None, help="experiments in the data set (default 10000)")
    parser.add_argument("--runs", type=int, default=None, help="runs in the data set (default 100000)")
    parser.add_argument("--tenants", default="10,100", help="comma-separated tenant counts (default 10,100)")
    parser.add_argument("--samples", type=int, default=None, help="requests of each kind per phase (default 300)")
    parser.add_argument(
        "--cache-size", type=int, default=None, help="GATEWAY_CACHE_SIZE of the gateway (default: its own)"
    )
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="1,000 experiments, 10,000 runs, 100 samples")
    args = parser.parse_args(argv)
    defaults = (1000, 10_000, 100) if args.quick else (10_000, 100_000, 300)
    args.experiments = args.experiments if args.experiments is not None else defaults[0]
    args.runs = args.runs if args.runs is not None else defaults[1]
    args.samples = args.samples if args.samples is not None else defaults[2]
    try:
        args.tenants = [int(t) for t in args.tenants.split(",")]
    except ValueError:
        parser.error("--tenants must be comma-separated integers")
    if min(args.tenants) < 1 or max(args.tenants) > args.experiments or args.runs < args.samples:
        parser.error("each tenant count must be between 1 and --experiments; --runs must be >= --samples")
    if args.samples < 1 or args.samples > args.experiments // 2:
        parser.error("--samples must be between 1 and half of --experiments")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    return main_orchestrator(args)


if __name__ == "__main__":
    sys.exit(main())
