"""Run one of the ``bench/`` scripts as its users do, and read the JSON report on its last line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def bench_report(script: str, *args: str, timeout: float) -> dict[str, Any]:
    """``python bench/<script> <args>`` from the repository root; it must exit 0. Returns its last line, parsed."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return report
