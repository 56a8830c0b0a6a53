"""bench/parts.py takes each part away as it says, and splits the gateway's own work from the counts."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from parts import VARIANTS, build_report  # noqa: E402

from tests.bench_run import bench_report  # noqa: E402

WARMUP, REQUESTS = 3, 4


def _variant(name: str) -> dict[str, Any]:
    """One variant's run without callgrind: what it answered and did."""
    argv = ["--role", "variant", "--variant", name, "--warmup", str(WARMUP), "--requests", str(REQUESTS)]
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "parts.py"), *argv],
        capture_output=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    result: dict[str, Any] = orjson.loads(done.stdout.splitlines()[-1])
    assert result["variant"] == name and result["status"] == 200  # every variant still serves the run
    return result


@pytest.fixture(scope="module")
def runs() -> dict[str, dict[str, Any]]:
    return {name: _variant(name) for name in VARIANTS}


def test_the_full_gateway_logs_every_request_sets_its_headers_and_looks_the_run_up_once(
    runs: dict[str, dict[str, Any]],
) -> None:
    gateway = runs["gateway"]
    assert gateway["access_lines"] == WARMUP + REQUESTS
    assert '"tenant":"bench","user":"alice"' in gateway["last_access_line"]
    assert {"x-request-id", "referrer-policy"} <= set(gateway["response_headers"])
    assert gateway["upstream_calls"] == {"forwarded": WARMUP + REQUESTS, "lookups": 2}  # the run, its experiment


def test_each_variant_takes_away_its_part_and_only_that(runs: dict[str, dict[str, Any]]) -> None:
    gateway = runs["gateway"]
    assert runs["no_access_log"]["access_lines"] == 0
    assert runs["no_access_log"]["response_headers"] == gateway["response_headers"]
    front = runs["no_front_layer"]
    assert front["access_lines"] == 0 and "x-request-id" not in front["response_headers"]
    assert "referrer-policy" not in front["response_headers"]
    assert runs["no_ownership_step"]["upstream_calls"] == {"forwarded": WARMUP + REQUESTS, "lookups": 0}
    for name in ("token_as_constant", "no_ui_layer", "no_ownership_step"):
        # The same answer, logged for the same caller: the token's principal still reaches the policy.
        assert runs[name]["response_headers"] == gateway["response_headers"]
        assert runs[name]["access_lines"] == WARMUP + REQUESTS
        assert '"tenant":"bench","user":"alice"' in runs[name]["last_access_line"]
    assert runs["passthrough"]["upstream_calls"] == {"forwarded": WARMUP + REQUESTS, "lookups": 0}


def test_the_parts_are_the_gateways_count_minus_each_variants() -> None:
    per_request = {
        "passthrough": 60_000.0,
        "gateway": 140_000.0,
        "no_access_log": 124_000.0,
        "no_front_layer": 95_000.0,
        "token_as_constant": 132_000.0,
        "no_ui_layer": 138_000.0,
        "no_ownership_step": 131_000.0,
    }
    report = build_report(per_request, argparse.Namespace(requests=2000, warmup=300))
    assert report["gateway_own_work_k"] == 80.0
    assert report["parts_taken_away_k"]["front_layer"] == 45.0
    assert report["gateway_own_work_split_k"] == {
        "front_layer_without_access_log": 29.0,
        "access_log": 16.0,
        "token_check": 8.0,
        "ui_layer": 2.0,
        "ownership_step": 9.0,
        "rest": 16.0,
    }
    partial = build_report({"gateway": 140_000.0, "no_access_log": 124_000.0}, argparse.Namespace(requests=1, warmup=1))
    assert partial["gateway_own_work_k"] is None and partial["parts_taken_away_k"] == {"access_log": 16.0}
    assert partial["gateway_own_work_split_k"] == {}


@pytest.mark.skipif(shutil.which("callgrind_control") is None, reason="valgrind is not installed")
def test_a_smoke_run_counts_two_variants_under_callgrind() -> None:
    report = bench_report(
        "parts.py", "--variants", "passthrough,gateway", "--requests", "20", "--warmup", "10", timeout=600
    )
    assert report["benchmark"] == "parts"
    counts = report["instructions_per_request_k"]
    assert set(counts) == {"passthrough", "gateway"}
    assert counts["gateway"] > counts["passthrough"] > 0
    assert report["gateway_own_work_k"] == pytest.approx(counts["gateway"] - counts["passthrough"], abs=0.11)
