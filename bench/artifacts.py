"""Artifact throughput: the gateway's own S3 streaming against MLflow's artifact proxy, same run, same S3.

Everything runs on 127.0.0.1, each server in its own process:

* the dev stack (``gateway.dev.DevStack``): moto's S3 server and an unmodified ``mlflow server
  --serve-artifacts`` with ``s3://mlflow/artifacts`` as its artifacts destination, in a temp dir;
* one gateway (``mlflow-gateway serve``, proxy mode) in front of it, configured exactly like the
  integration tests' gateway (``gateway_environment``).

For one run, the script uploads and downloads one file of ``--size-mib`` MiB with
``PUT/GET /api/2.0/mlflow-artifacts/artifacts/<exp>/<run>/artifacts/<name>``, streaming from and to
disk in 1 MiB chunks: (a) through the gateway with a Bearer token, (b) directly to MLflow's own
proxy. The targets alternate (ABBA per round). Every download is checked against the source's
SHA-256 after its timing window. While the gateway transfers, a thread samples the gateway's RSS
(``/proc/<pid>/status`` VmRSS) every 50 ms; the figure reported is the peak growth over the idle
gateway's RSS measured before the first transfer.

A readable table goes to stdout, progress to stderr, and the LAST line of stdout is one JSON object.

Usage::

    python bench/artifacts.py                  # 1024 MiB, 2 rounds
    python bench/artifacts.py --quick          # 64 MiB
    python bench/artifacts.py --size-mib 256 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from gateway.auth.jwt import mint_token
from gateway.dev import DevStack, ManagedProcess, free_port, gateway_environment, group_pids

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_seconds

MIB = 1024 * 1024
CHUNK = MIB  # client read/write chunk
SAMPLE_INTERVAL_S = 0.05
IDLE_BASELINE_S = 2.0
PAUSE_BETWEEN_S = 1.0
GATEWAY_START_TIMEOUT_S = 60.0
TRANSFER_TIMEOUT_S = 1800.0
RSS_TARGET_MIB = 64.0
TARGETS = ("gateway", "mlflow")
API = "/api/2.0/mlflow"
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def log(message: str) -> None:
    """Progress, to stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- /proc sampling ---------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    """Samples the summed RSS of named pid sets every 50 ms; windows give their peaks."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.groups = groups
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self._stop_event.is_set():
            now = time.perf_counter()
            sample = {name: sum(rss_kib(pid) for pid in pids) for name, pids in self.groups.items()}
            with self._lock:
                self.samples.append((now, sample))
            self._stop_event.wait(SAMPLE_INTERVAL_S)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def window(self, name: str, start: float, end: float) -> list[int]:
        """The RSS samples (KiB) of ``name`` taken in [start, end]."""
        with self._lock:
            return [sample[name] for at, sample in self.samples if start <= at <= end]

    def cpu(self, name: str) -> float:
        """Summed CPU seconds of the group now."""
        return sum(cpu_seconds(pid) for pid in self.groups[name])


# -- the transfers -----------------------------------------------------------------------------------


@dataclass
class Transfer:
    """One measured upload or download."""

    target: str
    direction: str
    round: int
    seconds: float
    size: int
    rss_peak_mib: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def mib_s(self) -> float:
        return self.size / MIB / self.seconds


def make_source(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; return their SHA-256."""
    digest = hashlib.sha256()
    with path.open("wb") as handle:
        remaining = size
        while remaining:
            block = os.urandom(min(remaining, 4 * MIB))
            digest.update(block)
            handle.write(block)
            remaining -= len(block)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(4 * MIB):
            digest.update(block)
    return digest.hexdigest()


def file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            yield block


def upload(client: httpx.Client, url: str, headers: dict[str, str], source: Path) -> float:
    """PUT the file with an explicit Content-Length (streamed, not chunked); seconds until the answer."""
    size = source.stat().st_size
    request_headers = {**headers, "Content-Type": "application/octet-stream", "Content-Length": str(size)}
    started = time.perf_counter()
    response = client.put(url, content=file_chunks(source), headers=request_headers)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"PUT {url} answered {response.status_code}: {response.text[:500]}")
    return elapsed


def download(client: httpx.Client, url: str, headers: dict[str, str], destination: Path) -> tuple[float, int]:
    """GET into a file; seconds until the last byte is written, and the byte count."""
    received = 0
    started = time.perf_counter()
    with client.stream("GET", url, headers=headers) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"GET {url} answered {response.status_code}: {response.text[:500]}")
        with destination.open("wb") as handle:
            for block in response.iter_raw(CHUNK):
                handle.write(block)
                received += len(block)
    return time.perf_counter() - started, received


# -- set-up -------------------------------------------------------------------------------------------


def check_resources(workdir: Path, size: int, rounds: int) -> None:
    """Refuse to start when the disk cannot hold the run (moto logs every uploaded byte, base64)."""
    uploads = rounds * len(TARGETS) + 2
    # source + one download at a time + moto's mutation log (4/3 per upload) + moto's spooled objects
    # (two live keys, one in flight, its parts) + MLflow's temp file, with 10 % slack.
    needed = int(size * (2 + uploads * 4 / 3 + 4 + 1) * 1.1)
    free = shutil.disk_usage(workdir).free
    system_tmp = Path(tempfile.gettempdir())
    if system_tmp.stat().st_dev != workdir.stat().st_dev:
        free = min(free, shutil.disk_usage(system_tmp).free)
    if free < needed:
        raise SystemExit(
            f"error: about {needed / 2**30:.1f} GiB of free disk needed in {workdir} and {system_tmp}, "
            f"{free / 2**30:.1f} GiB available; use --size-mib or --tmp-dir"
        )


@dataclass
class Gateway:
    """The gateway under test: its process, base URL and the secret its tokens are signed with."""

    process: ManagedProcess
    url: str
    secret: str


def start_gateway(stack: DevStack, secret: str) -> Gateway:
    """``mlflow-gateway serve`` (proxy mode) in front of ``stack``, ready on /ready."""
    port = free_port()
    script = Path(sys.executable).parent / "mlflow-gateway"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "gateway.cli"]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GATEWAY_", "MLFLOW_", "AWS_"))}
    env |= gateway_environment(stack, secret) | {"GATEWAY_ARTIFACTS_MODE": "proxy", "GATEWAY_LOG_LEVEL": "warning"}
    process = ManagedProcess(
        name="gateway",
        argv=[*command, "serve", "--host", "127.0.0.1", "--port", str(port)],
        log_path=stack.data_dir / "logs" / "gateway.log",
        env=env,
    )
    try:
        process.wait_http_ok(f"http://127.0.0.1:{port}/ready", timeout=GATEWAY_START_TIMEOUT_S)
    except BaseException:
        process.stop()
        raise
    return Gateway(process, f"http://127.0.0.1:{port}", secret)


def create_run(client: httpx.Client, gateway_url: str, headers: dict[str, str]) -> tuple[str, str]:
    """A fresh experiment and run of the bench tenant, created through the gateway."""
    created = client.post(
        f"{gateway_url}{API}/experiments/create", json={"name": f"bench-{uuid.uuid4().hex[:8]}"}, headers=headers
    )
    created.raise_for_status()
    experiment_id = created.json()["experiment_id"]
    run = client.post(f"{gateway_url}{API}/runs/create", json={"experiment_id": experiment_id}, headers=headers)
    run.raise_for_status()
    return experiment_id, run.json()["run"]["info"]["run_id"]


def versions() -> dict[str, str]:
    found = {}
    for name in ("mlflow", "boto3", "botocore", "moto", "uvicorn", "httpx", "uvloop", "httptools"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


# -- the run ------------------------------------------------------------------------------------------------


def run_bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    size = args.size_mib * MIB
    source = workdir / "source.bin"
    received = workdir / "received.bin"
    log(f"writing a {args.size_mib} MiB random source file")
    source_sha = make_source(source, size)

    log("starting the dev stack (moto S3 + mlflow server)")
    with DevStack(workdir / "stack") as stack:
        secret = secrets.token_urlsafe(48)
        gateway = start_gateway(stack, secret)
        try:
            return measure(args, stack, gateway, source, source_sha, received, size)
        finally:
            gateway.process.stop()


def measure(
    args: argparse.Namespace,
    stack: DevStack,
    gateway: Gateway,
    source: Path,
    source_sha: str,
    received: Path,
    size: int,
) -> dict[str, Any]:
    gateway_url = gateway.url
    token = mint_token(secret=gateway.secret, tenant="bench", user="bench", ttl_seconds=4 * 3600)
    auth = {"Authorization": f"Bearer {token}"}
    groups = {"gateway": [gateway.process.pid]}
    assert stack.mlflow is not None and stack.s3 is not None
    groups["mlflow"] = group_pids(stack.mlflow.pid)
    groups["s3"] = group_pids(stack.s3.pid)
    sampler = Sampler(groups)
    timeout = httpx.Timeout(TRANSFER_TIMEOUT_S, connect=10.0)
    with httpx.Client(timeout=timeout, trust_env=False) as client:
        experiment_id, run_id = create_run(client, gateway_url, auth)
        root = f"{experiment_id}/{run_id}/artifacts"
        log(f"run {run_id} in experiment {experiment_id}; gateway {gateway_url}, mlflow {stack.mlflow_url}")
        bases = {"gateway": (gateway_url, auth), "mlflow": (stack.mlflow_url, {})}

        def url(target: str, name: str) -> str:
            return f"{bases[target][0]}{ARTIFACTS}/{root}/{name}"

        # Warm-up: connections, the gateway's boto3 client and caches, MLflow's artifact repository.
        warm = source.parent / "warm.bin"
        warm.write_bytes(os.urandom(MIB))
        for target in TARGETS:
            upload(client, url(target, "warm.bin"), bases[target][1], warm)
            download(client, url(target, "warm.bin"), bases[target][1], received)
        warm.unlink()

        sampler.start()
        try:
            time.sleep(IDLE_BASELINE_S)
            now = time.perf_counter()
            idle = {name: statistics.median(sampler.window(name, now - IDLE_BASELINE_S, now)) for name in groups}
            log("idle RSS: " + ", ".join(f"{name} {kib / 1024:.1f} MiB" for name, kib in idle.items()))
            transfers: list[Transfer] = []
            for number in range(args.rounds):
                order = TARGETS if number % 2 == 0 else TARGETS[::-1]
                steps = [(target, "upload") for target in order] + [(target, "download") for target in order[::-1]]
                for target, direction in steps:
                    time.sleep(PAUSE_BETWEEN_S)
                    name = f"bench-{target}.bin"
                    cpu_before = {group: sampler.cpu(group) for group in groups}
                    started = time.perf_counter()
                    if direction == "upload":
                        seconds = upload(client, url(target, name), bases[target][1], source)
                        moved = size
                    else:
                        seconds, moved = download(client, url(target, name), bases[target][1], received)
                    ended = time.perf_counter()
                    time.sleep(2 * SAMPLE_INTERVAL_S)  # one more sample after the last byte
                    transfer = Transfer(target, direction, number + 1, seconds, moved)
                    transfer.cpu_s = {group: sampler.cpu(group) - cpu_before[group] for group in groups}
                    transfer.rss_peak_mib = {
                        group: max(sampler.window(group, started, ended + 2 * SAMPLE_INTERVAL_S), default=0) / 1024
                        for group in groups
                    }
                    transfers.append(transfer)
                    growth = transfer.rss_peak_mib["gateway"] - idle["gateway"] / 1024
                    log(
                        f"round {number + 1} {target:7s} {direction:8s} {transfer.mib_s:8.1f} MiB/s "
                        f"({seconds:.2f} s; gateway RSS peak +{growth:.1f} MiB)"
                    )
                    if direction == "download":
                        if moved != size or sha256_of(received) != source_sha:
                            raise RuntimeError(f"{target} download does not match the source")
                        received.unlink()
        finally:
            sampler.stop()
    return summarise(args, transfers, idle, size)


def summarise(args: argparse.Namespace, transfers: list[Transfer], idle: dict[str, float], size: int) -> dict[str, Any]:
    result: dict[str, Any] = {
        "benchmark": "artifacts",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "size_mib": args.size_mib,
        "rounds": args.rounds,
        "chunk_mib": CHUNK // MIB,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions(),
        "idle_rss_mib": {name: round(kib / 1024, 1) for name, kib in idle.items()},
    }
    for target in TARGETS:
        for direction in ("upload", "download"):
            runs = [t for t in transfers if t.target == target and t.direction == direction]
            rates = [t.mib_s for t in runs]
            result[f"{target}_{direction}"] = {
                "mib_s_median": round(statistics.median(rates), 1),
                "mib_s_best": round(max(rates), 1),
                "cpu_s_median": {
                    group: round(statistics.median(t.cpu_s[group] for t in runs), 2) for group in runs[0].cpu_s
                },
                "rss_peak_mib": {
                    group: round(max(t.rss_peak_mib[group] for t in runs), 1) for group in runs[0].rss_peak_mib
                },
                "runs": [{"round": t.round, "mib_s": round(t.mib_s, 1), "seconds": round(t.seconds, 3)} for t in runs],
            }
    gateway_idle = idle["gateway"] / 1024
    growth = {
        direction: round(result[f"gateway_{direction}"]["rss_peak_mib"]["gateway"] - gateway_idle, 1)
        for direction in ("upload", "download")
    }
    result["gateway_rss_growth_mib"] = {**growth, "max": max(growth.values())}
    for direction in ("upload", "download"):
        ratio = result[f"gateway_{direction}"]["mib_s_median"] / result[f"mlflow_{direction}"]["mib_s_median"]
        result[f"ratio_gateway_over_mlflow_{direction}"] = round(ratio, 3)
    result["targets_met"] = {
        "upload_at_least_mlflow": result["ratio_gateway_over_mlflow_upload"] >= 1.0,
        "download_at_least_mlflow": result["ratio_gateway_over_mlflow_download"] >= 1.0,
        "rss_growth_under_64_mib": result["gateway_rss_growth_mib"]["max"] < RSS_TARGET_MIB,
    }
    return result


def print_table(result: dict[str, Any]) -> None:
    print(f"\nArtifact transfer of one {result['size_mib']} MiB file, {result['rounds']} round(s), MiB/s")
    header = f"{'target':8s} {'direction':9s} {'median':>8s} {'best':>8s}   {'CPU s (gateway/mlflow/s3)':>26s}"
    print(header + f"   {'RSS peak MiB (gateway/mlflow/s3)':>33s}")
    print("-" * (len(header) + 36))
    for target in TARGETS:
        for direction in ("upload", "download"):
            row = result[f"{target}_{direction}"]
            cpu = "/".join(f"{row['cpu_s_median'][g]:.1f}" for g in ("gateway", "mlflow", "s3"))
            rss = "/".join(f"{row['rss_peak_mib'][g]:.0f}" for g in ("gateway", "mlflow", "s3"))
            print(
                f"{target:8s} {direction:9s} {row['mib_s_median']:8.1f} {row['mib_s_best']:8.1f}"
                f"   {cpu:>26s}   {rss:>33s}"
            )
    print(
        f"\ngateway / mlflow (median): upload {result['ratio_gateway_over_mlflow_upload']:.2f}x, "
        f"download {result['ratio_gateway_over_mlflow_download']:.2f}x"
    )
    growth = result["gateway_rss_growth_mib"]
    print(
        f"gateway RSS: idle {result['idle_rss_mib']['gateway']:.1f} MiB, "
        f"peak growth upload +{growth['upload']:.1f} MiB, "
        f"download +{growth['download']:.1f} MiB (target < {RSS_TARGET_MIB:.0f} MiB)"
    )
    print("targets met: " + ", ".join(f"{key}={value}" for key, value in result["targets_met"].items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the file (default 1024)")
    parser.add_argument("--quick", action="store_true", help="a 64 MiB file (overrides --size-mib)")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds (default 2)")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where the temp work dir goes (default: system)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, S3 mutation log)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mib = 64
    if args.size_mib < 1 or args.rounds < 1:
        parser.error("--size-mib and --rounds must be positive")
    if not Path("/proc/self/status").exists():
        parser.error("this benchmark reads /proc (Linux only)")

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="bench-artifacts-", dir=args.tmp_dir)).resolve()
    try:
        check_resources(workdir, args.size_mib * MIB, args.rounds)
        result = run_bench(args, workdir)
    finally:
        if args.keep:
            log(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(result)
    print(json.dumps(result, separators=(", ", ": ")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
