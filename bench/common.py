"""Helpers shared by the benchmarks in this directory (not by the gateway).

Process and /proc helpers (CPU time, RSS, process groups), percentiles, the machine description
every benchmark records, and :func:`running_gateway`, which starts ``mlflow-gateway serve`` as a
subprocess exactly like ``tests/integration/conftest.py::serve_gateway`` does.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from gateway.dev import ManagedProcess, free_port, group_pids

HOST = "127.0.0.1"
GATEWAY_START_TIMEOUT_S = 60.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def log(message: str) -> None:
    """Progress, to stderr (stdout is for the report and the JSON line)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (NaN when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mib(pid: int) -> float:
    """VmRSS of ``pid`` in MiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def group_cpu_seconds(pgid: int) -> float:
    """Summed CPU seconds of a process group's live members."""
    return sum(cpu_seconds(pid) for pid in group_pids(pgid))


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": mem_gib,
        "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "versions": {p: version(p) for p in ("mlflow", "uvicorn", "uvloop", "httptools", "aiohttp", "orjson", "pyjwt")},
    }


def gateway_command() -> list[str]:
    """How to run the ``mlflow-gateway`` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "mlflow-gateway"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gateway.cli"]


@contextlib.contextmanager
def running_gateway(log_dir: Path, name: str, settings: dict[str, str]) -> Iterator[tuple[ManagedProcess, str]]:
    """``mlflow-gateway serve`` on a free port with ``settings`` as its only GATEWAY_/MLFLOW_ variables.

    Yields the process and its base URL once ``/ready`` answers; always stopped.
    """
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GATEWAY_", "MLFLOW_"))}
    process = ManagedProcess(
        name=name,
        argv=[*gateway_command(), "serve", "--host", HOST, "--port", str(port)],
        log_path=log_dir / f"{name}.log",
        env=env | settings,
    )
    try:
        process.wait_http_ok(f"http://{HOST}:{port}/ready", timeout=GATEWAY_START_TIMEOUT_S)
        yield process, f"http://{HOST}:{port}"
    finally:
        process.stop()


def exit_on_sigterm() -> None:
    """SIGTERM unwinds through the ``finally`` blocks that stop the children."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def ratio(numerator: float | None, denominator: float | None, digits: int = 3) -> float | None:
    """``numerator / denominator`` rounded, or None when either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, digits)
