"""bench/inprocess.py still drives both apps end to end (a smoke run: no figure is checked, only that it works)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from inprocess import CannedUpstream, _scope
from overhead import PassthroughProxy

from tests.bench_run import bench_report


def test_the_in_process_benchmark_runs_both_apps_to_a_200() -> None:
    report = bench_report("inprocess.py", "--rounds", "1", "--requests", "20", timeout=120)
    assert report["benchmark"] == "inprocess"
    assert set(report["cpu_us_per_req_best"]) == {"passthrough", "gateway"}
    assert all(value > 0 for value in report["cpu_us_per_req_best"].values())


def _passthrough_headers(*, gateway_headers: bool) -> list[tuple[bytes, bytes]]:
    proxy = PassthroughProxy("http://127.0.0.1:9", gateway_headers=gateway_headers)
    proxy.upstream = CannedUpstream()  # type: ignore[assignment]
    started: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            started.append(message)

    asyncio.run(proxy(_scope("unused"), receive, send))
    assert started and started[0]["status"] == 200
    return list(started[0]["headers"])


def test_the_passthrough_relays_mlflows_headers_as_a_bare_proxy_does() -> None:
    """The baseline relays what MLflow answers (not only the body's headers): hop-by-hop, date and server aside."""
    names = [name for name, _ in _passthrough_headers(gateway_headers=False)]
    assert names == [b"content-type", b"content-length", b"x-content-type-options", b"x-frame-options", b"vary"]
    with_gateways = _passthrough_headers(gateway_headers=True)
    assert [value for name, value in with_gateways if name == b"x-frame-options"] == [b"DENY"]  # the gateway's, once
    assert b"vary" in dict(with_gateways) and b"x-request-id" in dict(with_gateways)
