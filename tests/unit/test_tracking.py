"""gateway.tracking without a server: token claims, RunConfig checks, the job header, the singleton."""

from __future__ import annotations

import threading

import jwt
import pytest

from gateway import tracking
from gateway.tracking import RunConfig, TokenIdentity, TrackingError, check_run_config, token_identity


def _token(**claims: object) -> str:
    return jwt.encode(dict(claims), "x" * 32, algorithm="HS256")


def test_token_identity_reads_claims_without_verification() -> None:
    assert token_identity(_token(tenant_id="acme", sub="alice", job_id="j1")) == TokenIdentity("acme", "alice", "j1")
    assert token_identity(_token(tenant_id="acme", email="a@x")) == TokenIdentity("acme", "a@x", None)
    assert token_identity(None) == TokenIdentity(None, None, None)
    with pytest.raises(TrackingError, match="not a JWT"):
        token_identity("opaque-token")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (RunConfig(tenant_id="globex"), "does not match the token's tenant_id='acme'"),
        (RunConfig(user_id="bob"), "does not match the token's user_id='alice'"),
        (RunConfig(tags={"Matih.job_id": "x"}), "reserved"),
    ],
)
def test_run_config_mismatch_is_an_error(config: RunConfig, message: str) -> None:
    with pytest.raises(TrackingError, match=message):
        check_run_config(config, TokenIdentity("acme", "alice", None))


def test_run_config_without_a_token_identity_is_an_error() -> None:
    with pytest.raises(TrackingError, match="no token claims a tenant_id"):
        check_run_config(RunConfig(tenant_id="acme"), TokenIdentity(None, None, None))


def test_matching_or_unset_run_config_passes() -> None:
    identity = TokenIdentity("acme", "alice", None)
    check_run_config(RunConfig(tenant_id="acme", user_id="alice", tags={"team": "ml"}), identity)
    check_run_config(RunConfig(), identity)


def test_job_header_is_sent_only_inside_a_run_block() -> None:
    from mlflow.tracking.request_header.registry import resolve_request_headers

    tracking._register_job_header_provider()
    tracking._register_job_header_provider()  # idempotent
    assert tracking.JOB_HEADER not in resolve_request_headers()
    reset = tracking._current_job.set("job-7")
    try:
        assert resolve_request_headers()[tracking.JOB_HEADER] == "job-7"
    finally:
        tracking._current_job.reset(reset)
    assert tracking.JOB_HEADER not in resolve_request_headers()


def test_singleton_is_created_once_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[object] = []

    class Fake:
        def __init__(self) -> None:
            created.append(self)

    monkeypatch.setattr(tracking, "_tracker", None)
    monkeypatch.setattr(tracking, "ExperimentTracker", Fake)
    results: list[object] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        results.append(tracking.get_experiment_tracker())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(created) == 1 and all(result is created[0] for result in results)


def test_importing_the_sdk_does_not_import_mlflow() -> None:
    import subprocess
    import sys

    code = "import sys, gateway.tracking; assert 'mlflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
