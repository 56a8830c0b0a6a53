"""The tracking SDK (gateway.tracking) through the real gateway, mlflow server and S3 emulator."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from gateway import tracking
from gateway.dev import DevStack
from gateway.tracking import ExperimentTracker, RunConfig, TrackingError, get_experiment_tracker
from tests.integration.conftest import MlflowEnv, TokenFactory

README = Path(__file__).resolve().parents[2] / "README.md"


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def lifecycle_log() -> Iterator[_Records]:
    handler = _Records()
    sdk_logger = logging.getLogger("gateway.tracking")
    previous = sdk_logger.level
    sdk_logger.addHandler(handler)
    sdk_logger.setLevel(logging.INFO)
    yield handler
    sdk_logger.removeHandler(handler)
    sdk_logger.setLevel(previous)


@pytest.fixture
def fresh_singleton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking, "_tracker", None)


def _as(mlflow_env: MlflowEnv, gateway_url: str, token: str) -> ExperimentTracker:
    mlflow_env(gateway_url, token)
    return ExperimentTracker()


def test_run_logs_everything_and_finishes(
    mlflow_env: MlflowEnv,
    gateway_url: str,
    token_factory: TokenFactory,
    stack: DevStack,
    tmp_path: Path,
    lifecycle_log: _Records,
) -> None:
    tracker = _as(mlflow_env, gateway_url, token_factory("acme", "alice"))
    name = _unique("sdk")
    artifact = tmp_path / "notes.txt"
    artifact.write_text("hello", encoding="utf-8")
    config = RunConfig(run_name="train", tenant_id="acme", user_id="alice", job_id="job-sdk-1", tags={"team": "ml"})
    with tracker.start_run(name, run_config=config) as run:
        assert run.artifact_uri.startswith("mlflow-artifacts:/")
        returned = (
            run.log_params({"lr": 0.01, "layers": [64, 32], "long": "x" * 7000})
            .log_metrics({"loss": 0.5, "acc": 0.9}, step=2)
            .log_metric("loss", 0.25, step=3)
            .log_artifact(artifact, "docs")
            .log_dict({"a": 1}, "config/a.json")
            .set_tag("stage", "dev")
        )
        assert returned is run
        assert run.get_elapsed_time() >= 0

    client = MlflowClient()
    fetched = client.get_run(run.run_id)
    assert fetched.info.status == "FINISHED"
    assert fetched.info.run_name == "train"
    assert fetched.info.experiment_id == run.experiment_id
    assert fetched.data.params["lr"] == "0.01"
    assert fetched.data.params["layers"] == "[64, 32]"
    assert fetched.data.params["long"] == "x" * 6000  # truncated as mlflow does (MAX_PARAM_VAL_LENGTH)
    assert fetched.data.metrics == {"loss": 0.25, "acc": 0.9}
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "loss")] == [(2, 0.5), (3, 0.25)]
    tags = fetched.data.tags
    assert tags["team"] == "ml" and tags["stage"] == "dev"
    assert tags["matih.tenant_id"] == "acme" and tags["matih.user_id"] == "alice"
    assert tags["matih.job_id"] == "job-sdk-1"  # from the X-Matih-Job-Id header
    assert sorted(f.path for f in client.list_artifacts(run.run_id)) == ["config", "docs"]
    downloaded = client.download_artifacts(run.run_id, "config/a.json", str(tmp_path / "dl"))
    assert json.loads(Path(downloaded).read_text(encoding="utf-8")) == {"a": 1}
    assert Path(client.download_artifacts(run.run_id, "docs/notes.txt", str(tmp_path / "dl2"))).read_text() == "hello"

    upstream = httpx.get(
        f"{stack.mlflow_url}/api/2.0/mlflow/experiments/get", params={"experiment_id": run.experiment_id}
    ).json()["experiment"]
    assert upstream["name"] == f"acme/{name}"

    events = [(r.event, r.run_id, r.tenant, r.user, r.job) for r in lifecycle_log.records]  # type: ignore[attr-defined]
    assert events == [
        ("run_started", run.run_id, "acme", "alice", "job-sdk-1"),
        ("run_finished", run.run_id, "acme", "alice", "job-sdk-1"),
    ]

    # The same experiment is reused by the next run (get-or-create).
    with tracker.start_run(name) as second:
        pass
    assert second.experiment_id == run.experiment_id
    assert "matih.job_id" not in client.get_run(second.run_id).data.tags  # the label ended with the block


def test_failing_block_marks_the_run_failed_and_propagates(
    mlflow_env: MlflowEnv, gateway_url: str, token_factory: TokenFactory, lifecycle_log: _Records
) -> None:
    tracker = _as(mlflow_env, gateway_url, token_factory("acme", "alice"))
    with pytest.raises(ZeroDivisionError), tracker.start_run(_unique("sdk-fail")) as run:
        run.log_metric("before", 1.0)
        _ = 1 / 0
    assert MlflowClient().get_run(run.run_id).info.status == "FAILED"
    assert [r.event for r in lifecycle_log.records] == ["run_started", "run_failed"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (RunConfig(tenant_id="globex"), "tenant_id='globex' does not match the token's tenant_id='acme'"),
        (RunConfig(tenant_id="acme", user_id="mallory"), "user_id='mallory' does not match the token's"),
        (RunConfig(tags={"matih.tenant_id": "globex"}), "reserved"),
    ],
)
def test_identity_mismatch_and_reserved_tags_are_refused_before_anything_is_sent(
    mlflow_env: MlflowEnv, gateway_url: str, token_factory: TokenFactory, config: RunConfig, message: str
) -> None:
    tracker = _as(mlflow_env, gateway_url, token_factory("acme", "alice"))
    name = _unique("sdk-refused")
    with pytest.raises(TrackingError, match=re.escape(message)), tracker.start_run(name, run_config=config):
        pytest.fail("the block must not run")
    assert MlflowClient().get_experiment_by_name(name) is None  # nothing was created


def test_set_tag_refuses_the_reserved_namespace_locally(
    mlflow_env: MlflowEnv, gateway_url: str, token_factory: TokenFactory
) -> None:
    tracker = _as(mlflow_env, gateway_url, token_factory("acme", "alice"))
    with tracker.start_run(_unique("sdk-tag")) as run, pytest.raises(TrackingError, match="reserved"):
        run.set_tag("MATIH.tenant_id", "globex")
    tags = MlflowClient().get_run(run.run_id).data.tags
    assert tags["matih.tenant_id"] == "acme"


def test_the_gateway_still_refuses_a_forged_tag_when_the_sdk_check_is_bypassed(
    mlflow_env: MlflowEnv, gateway_url: str, token_factory: TokenFactory
) -> None:
    tracker = _as(mlflow_env, gateway_url, token_factory("acme", "alice"))
    with tracker.start_run(_unique("sdk-bypass")) as run:
        with pytest.raises(MlflowException) as raised:
            tracker.client.set_tag(run.run_id, "matih.tenant_id", "globex")
        assert raised.value.error_code == "PERMISSION_DENIED"


def test_token_job_claim_wins_over_the_label(
    mlflow_env: MlflowEnv, gateway_url: str, token_factory: TokenFactory, lifecycle_log: _Records
) -> None:
    tracker = _as(mlflow_env, gateway_url, token_factory("acme", "alice", job="claim-job"))
    with tracker.start_run(_unique("sdk-job"), run_config=RunConfig(job_id="label-job")) as run:
        pass
    assert MlflowClient().get_run(run.run_id).data.tags["matih.job_id"] == "claim-job"
    assert lifecycle_log.records[0].job == "claim-job"  # type: ignore[attr-defined]


def test_another_tenant_cannot_see_the_run(
    mlflow_env: MlflowEnv, gateway_url: str, token_factory: TokenFactory
) -> None:
    tracker = _as(mlflow_env, gateway_url, token_factory("acme", "alice"))
    name = _unique("sdk-private")
    with tracker.start_run(name) as run:
        run.log_metric("m", 1.0)
    other = _as(mlflow_env, gateway_url, token_factory("globex", "bob"))
    with pytest.raises(MlflowException) as raised:
        other.client.get_run(run.run_id)
    assert raised.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert other.client.get_experiment_by_name(name) is None
    with other.start_run(name) as theirs:  # the same name is a separate experiment for globex
        pass
    assert theirs.experiment_id != run.experiment_id


def test_explicit_token_and_singleton(
    mlflow_env: MlflowEnv, gateway_url: str, token_factory: TokenFactory, fresh_singleton: None
) -> None:
    mlflow_env(gateway_url)  # no token in the environment
    tracker = ExperimentTracker(tracking_uri=gateway_url, token=token_factory("acme", "carol"))
    assert tracker.identity.user_id == "carol" and tracker.registry_uri == gateway_url
    with tracker.start_run(_unique("sdk-explicit"), run_config=RunConfig(user_id="carol")) as run:
        pass
    assert MlflowClient().get_run(run.run_id).data.tags["matih.user_id"] == "carol"
    assert get_experiment_tracker() is get_experiment_tracker()


def test_readme_example_runs_as_written(
    mlflow_env: MlflowEnv,
    gateway_url: str,
    token_factory: TokenFactory,
    fresh_singleton: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = README.read_text(encoding="utf-8")
    example = text.split("<!-- sdk-example -->\n```python\n", 1)[1].split("```", 1)[0]
    mlflow_env(gateway_url, token_factory("acme", "alice"))
    exec(compile(example, "README.md", "exec"), {})
    run_id = capsys.readouterr().out.split()[0]
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["matih.job_id"] == "nightly-42"
    assert run.data.params["layers"] == "[64, 32]"
