"""bench/inprocess.py still drives both apps end to end (a smoke run: no figure is checked, only that it works)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_in_process_benchmark_runs_both_apps_to_a_200() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "inprocess.py"), "--rounds", "1", "--requests", "20"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["benchmark"] == "inprocess"
    assert set(report["cpu_us_per_req_best"]) == {"passthrough", "gateway"}
    assert all(value > 0 for value in report["cpu_us_per_req_best"].values())
