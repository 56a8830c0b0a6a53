"""bench/inprocess.py still drives both apps end to end (a smoke run: no figure is checked, only that it works)."""

from __future__ import annotations

from tests.bench_run import bench_report


def test_the_in_process_benchmark_runs_both_apps_to_a_200() -> None:
    report = bench_report("inprocess.py", "--rounds", "1", "--requests", "20", timeout=120)
    assert report["benchmark"] == "inprocess"
    assert set(report["cpu_us_per_req_best"]) == {"passthrough", "gateway"}
    assert all(value > 0 for value in report["cpu_us_per_req_best"].values())
