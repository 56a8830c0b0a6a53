"""bench/inprocess.py still drives both apps end to end (a smoke run: no figure is checked, only that it works)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import orjson
from inprocess import CannedUpstream, _scope
from overhead import RUN_ID, PassthroughProxy, upstream_app

from tests.app.conftest import ServerThread
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


def test_the_passthrough_relays_the_same_answer_on_either_upstream_client() -> None:
    """``overhead.py --aiohttp-passthrough``: the aiohttp reference passthrough answers what the default one does."""
    upstream = ServerThread(upstream_app, lifespan="off").start()  # the benchmark's canned upstream, on a socket
    try:
        answers = [_passthrough_answer(upstream.url, aiohttp=aiohttp) for aiohttp in (False, True)]
    finally:
        upstream.stop()
    assert answers[0] == answers[1]
    status, headers, body = answers[0]
    assert status == 200 and orjson.loads(body)["run"]["info"]["run_id"] == RUN_ID
    assert headers[:2] == [b"content-type", b"content-length"]


def _passthrough_answer(upstream_url: str, *, aiohttp: bool) -> tuple[int, list[bytes], bytes]:
    proxy = PassthroughProxy(upstream_url, aiohttp=aiohttp)
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    async def scenario() -> None:
        await proxy.upstream.start()
        try:
            await proxy(_scope("unused"), receive, send)
        finally:
            await proxy.upstream.close()

    asyncio.run(scenario())
    start, *bodies = messages
    return start["status"], [name for name, _ in start["headers"]], b"".join(m.get("body", b"") for m in bodies)
