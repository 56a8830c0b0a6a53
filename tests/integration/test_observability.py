"""Metrics, access log and denial audit of a real ``mlflow-gateway serve`` in front of the real stack.

A dedicated gateway subprocess gets a metrics token and no allowed network, so only the token opens
``/metrics``. The stock ``mlflow`` client does real work through it (experiment, run, params,
metrics, an artifact up and down through the gateway's S3 streaming); then ``/metrics`` is scraped
with the token, and the subprocess's stderr (its log file) is read for the JSON access and audit
lines.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlflow
import orjson
import pytest
from mlflow import MlflowClient

from gateway.dev import DevStack, gateway_environment
from tests.integration.conftest import MlflowEnv, TokenFactory, serve_gateway
from tests.prometheus import Scrape

METRICS_TOKEN = secrets.token_urlsafe(32)
NAME = "observability"


@pytest.fixture(scope="module")
def observed_url(stack: DevStack, jwt_secret: str) -> Iterator[str]:
    settings = gateway_environment(stack, jwt_secret) | {
        "GATEWAY_METRICS_TOKEN": METRICS_TOKEN,
        "GATEWAY_METRICS_ALLOW_NETWORKS": "",  # not even loopback: the token only
        "GATEWAY_ACCESS_LOG_FLUSH_SECONDS": "0",  # each access line written at once, not batched
    }
    with serve_gateway(stack, NAME, settings) as url:
        yield url


def _log(stack: DevStack) -> Path:
    return stack.data_dir / "logs" / f"{NAME}.log"


def _json_lines(stack: DevStack) -> list[dict[str, Any]]:
    lines = []
    for raw in _log(stack).read_text(encoding="utf-8", errors="replace").splitlines():
        if raw.startswith("{"):
            lines.append(orjson.loads(raw))
    return lines


def _wait_for(stack: DevStack, predicate: Any, timeout: float = 10.0, count: int = 1) -> list[dict[str, Any]]:
    """The log lines matching ``predicate`` once there are ``count`` (access lines are written in batches)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in _json_lines(stack) if predicate(line)]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _scrape(url: str) -> Scrape:
    response = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10)
    assert response.status_code == 200, response.text
    return Scrape.parse(response.text)


def test_stock_client_work_shows_in_metrics_and_logs(
    observed_url: str, stack: DevStack, token_factory: TokenFactory, mlflow_env: MlflowEnv, tmp_path: Path
) -> None:
    tenant = f"obs-{uuid.uuid4().hex[:6]}"
    jwt = token_factory(tenant, "olga")
    before = _scrape(observed_url)
    assert before.value("gateway_requests_total", tenant=tenant) == 0

    mlflow_env(observed_url, jwt)
    artifact = tmp_path / "notes.txt"
    artifact.write_bytes(b"observed bytes\n" * 1000)
    mlflow.set_experiment("watched")
    with mlflow.start_run() as run:
        mlflow.log_param("lr", 0.1)
        mlflow.log_metric("loss", 0.5)
        mlflow.log_artifact(str(artifact))
    downloaded = Path(MlflowClient().download_artifacts(run.info.run_id, "notes.txt", str(tmp_path / "down")))
    assert downloaded.read_bytes() == artifact.read_bytes()

    after = _scrape(observed_url)
    requests = after.value("gateway_requests_total", tenant=tenant)
    assert requests >= 6  # experiment get/create, run create, params, metrics, artifact, update, get...
    # Every request succeeded, except the client's look-up of the experiment it then created.
    assert after.value("gateway_requests_total", tenant=tenant, status="404") == 1
    assert after.value("gateway_requests_total", tenant=tenant, status="200") == requests - 1
    assert after.value("gateway_denials_total") == before.value("gateway_denials_total")  # MLflow's 404, not ours
    assert after.value("gateway_requests_total", tenant=tenant, route="/api/2.0/mlflow/runs/create") == 1
    upstream_calls = after.value("gateway_upstream_request_duration_seconds_count") - before.value(
        "gateway_upstream_request_duration_seconds_count"
    )
    size = artifact.stat().st_size
    assert after.value("gateway_artifact_bytes_total", tenant=tenant, direction="in") == size
    assert after.value("gateway_artifact_bytes_total", tenant=tenant, direction="out") == size
    assert after.value("gateway_cache_requests_total", result="hit") > before.value(
        "gateway_cache_requests_total", result="hit"
    )

    # The subprocess's stderr holds one JSON access line per request, with the route template.
    access = _wait_for(
        stack,
        lambda line: line.get("tenant") == tenant and "route" in line and "event" not in line,
        count=int(requests),
    )
    assert len(access) == requests
    run_routes = {line["route"] for line in access}
    assert "/api/2.0/mlflow/runs/create" in run_routes
    assert "/api/2.0/mlflow-artifacts/artifacts/{artifact_path:path}" in run_routes
    upload = next(line for line in access if line["method"] == "PUT")
    assert upload["bytes_in"] == size and upload["user"] == "olga"
    assert all(line["latency_ms"] > 0 for line in access)
    # Each upstream call is in the histogram and in its request's line; artifact bytes go to S3 instead.
    assert upstream_calls == sum(line["upstream_calls"] for line in access) >= requests - 3
    assert upload["upstream_calls"] == 0
    assert jwt not in _log(stack).read_text(encoding="utf-8")


def test_metrics_refusals_are_real_and_audited(observed_url: str, stack: DevStack, token_factory: TokenFactory) -> None:
    attempts = {
        "none": {},
        "tenant-jwt": {"Authorization": f"Bearer {token_factory('acme', 'mallory')}"},
        "admin-jwt": {"Authorization": f"Bearer {token_factory('acme', 'root', roles=['platform-admin'])}"},
        "wrong-token": {"Authorization": f"Bearer {METRICS_TOKEN[:-2]}"},
    }
    for name, headers in attempts.items():
        request_id = f"metrics-refusal-{name}-{uuid.uuid4().hex[:8]}"
        response = httpx.get(f"{observed_url}/metrics", headers={**headers, "X-Request-Id": request_id}, timeout=10)
        assert response.status_code == 403, name
        assert response.json()["error_code"] == "PERMISSION_DENIED"
        assert "gateway_" not in response.text
        denied = _wait_for(
            stack, lambda line, rid=request_id: line.get("event") == "denied" and line["request_id"] == rid
        )
        assert len(denied) == 1, name
        assert denied[0]["route"] == "/metrics" and denied[0]["status"] == 403
    text = _log(stack).read_text(encoding="utf-8")
    assert METRICS_TOKEN not in text and METRICS_TOKEN[:-2] not in text
    assert _scrape(observed_url).value("gateway_denials_total", reason="PERMISSION_DENIED", status="403") >= 4
