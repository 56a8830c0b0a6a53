"""bench/instructions.py counts a server's instructions per request under callgrind (smoke run, arithmetic)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from instructions import build_report, instructions_in  # noqa: E402

from tests.bench_run import bench_report  # noqa: E402


def test_the_count_is_read_from_the_dumps_summary_line() -> None:
    assert (
        instructions_in(b"version: 1\ncreator: callgrind-3.19.0\nsummary: 965415486\ntotals: 976108332\n") == 965415486
    )
    with pytest.raises(ValueError):
        instructions_in(b"totals: 12\n")


def test_the_gateways_extra_instructions_are_split_into_headers_access_log_and_the_rest() -> None:
    per_request = {
        "passthrough": 470_000.0,
        "passthrough_gateway_headers": 518_000.0,
        "gateway": 700_000.0,
        "gateway_no_access_log": 672_000.0,
    }
    report = build_report(per_request, argparse.Namespace(requests=2000, warmup=300))
    assert report["ratio_over_passthrough"]["gateway"] == round(700 / 470, 3)
    assert report["implied_gateway_over_passthrough_rps"] == round(1 / round(700 / 470, 3), 3)
    assert report["gateway_extra_split"] == {"headers_k": 48.0, "access_log_k": 28.0, "rest_k": 154.0}


@pytest.mark.skipif(shutil.which("callgrind_control") is None, reason="valgrind is not installed")
def test_a_smoke_run_counts_the_passthrough_and_the_cost_of_the_gateways_headers() -> None:
    report = bench_report(
        "instructions.py",
        "--targets",
        "passthrough,passthrough_gateway_headers",
        "--requests",
        "40",
        "--warmup",
        "20",
        timeout=600,
    )
    counts = report["instructions_per_request_k"]
    assert set(counts) == {"passthrough", "passthrough_gateway_headers"}
    assert counts["passthrough"] > 50  # a whole proxied request, not an idle server
    assert counts["passthrough_gateway_headers"] > counts["passthrough"]  # seven more headers cost something
