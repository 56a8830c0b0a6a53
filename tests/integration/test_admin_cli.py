"""``mlflow-gateway admin`` against the real upstream MLflow, checked through the real gateway."""

from __future__ import annotations

import re
import uuid

import httpx
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from gateway.cli import main
from gateway.dev import DevStack
from tests.integration.conftest import MlflowEnv, TokenFactory


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _admin(stack: DevStack, *args: str) -> int:
    return main(["admin", "--upstream-url", stack.mlflow_url, *args])


def _upstream_experiment(stack: DevStack, experiment_id: str) -> dict[str, object]:
    response = httpx.get(f"{stack.mlflow_url}/api/2.0/mlflow/experiments/get", params={"experiment_id": experiment_id})
    experiment: dict[str, object] = response.json()["experiment"]
    return experiment


def _tags(obj: dict[str, object]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in obj.get("tags", [])}  # type: ignore[attr-defined]


@pytest.fixture
def legacy(stack: DevStack, mlflow_env: MlflowEnv) -> dict[str, str]:
    """An experiment with a run and a registered model version, created directly on the upstream."""
    mlflow_env(stack.mlflow_url)
    client = MlflowClient()
    name, model = _unique("legacy"), _unique("legacy-model")
    experiment_id = client.create_experiment(name)
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "loss", 0.5)
    client.set_terminated(run.info.run_id)
    client.create_registered_model(model)
    client.create_model_version(model, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return {"name": name, "id": experiment_id, "run_id": run.info.run_id, "model": model}


def test_adopt_moves_experiment_runs_and_models_under_the_tenant(
    stack: DevStack,
    gateway_url: str,
    token_factory: TokenFactory,
    mlflow_env: MlflowEnv,
    legacy: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    tenant = _unique("adm")
    mlflow_env(gateway_url, token_factory(tenant))
    assert MlflowClient().get_experiment_by_name(legacy["name"]) is None  # not the tenant's yet

    # Dry run: a plan, no change.
    assert _admin(stack, "adopt", "--tenant", tenant, "--experiment", legacy["name"], "--models", "--dry-run") == 0
    out = capsys.readouterr().out
    assert f"-> {tenant}/{legacy['name']}" in out and f"-> {tenant}.{legacy['model']}" in out
    assert "dry run: nothing was changed" in out
    assert _upstream_experiment(stack, legacy["id"])["name"] == legacy["name"]

    assert _admin(stack, "adopt", "--tenant", tenant, "--experiment-id", legacy["id"], "--models") == 0
    out = capsys.readouterr().out
    assert "rename-experiment" in out and "refused" in out
    upstream = _upstream_experiment(stack, legacy["id"])
    assert upstream["name"] == f"{tenant}/{legacy['name']}"
    assert _tags(upstream)["matih.tenant_id"] == tenant

    # Idempotent: nothing left to do.
    assert _admin(stack, "adopt", "--tenant", tenant, "--experiment-id", legacy["id"], "--models") == 0
    assert "nothing to do: already adopted" in capsys.readouterr().out

    # Visible to the tenant through the gateway, under the unprefixed names.
    mlflow_env(gateway_url, token_factory(tenant))
    client = MlflowClient()
    experiment = client.get_experiment_by_name(legacy["name"])
    assert experiment is not None and experiment.experiment_id == legacy["id"]
    run = client.get_run(legacy["run_id"])
    assert run.data.metrics == {"loss": 0.5} and run.data.tags["matih.tenant_id"] == tenant
    model = client.get_registered_model(legacy["model"])
    assert model.name == legacy["model"] and model.tags["matih.tenant_id"] == tenant
    assert [v.run_id for v in client.search_model_versions(f"name='{legacy['model']}'")] == [legacy["run_id"]]

    # ... and not to another tenant.
    mlflow_env(gateway_url, token_factory(_unique("adm-other")))
    other = MlflowClient()
    assert other.get_experiment_by_name(legacy["name"]) is None
    for call in (lambda: other.get_run(legacy["run_id"]), lambda: other.get_registered_model(legacy["model"])):
        with pytest.raises(MlflowException) as raised:
            call()
        assert raised.value.error_code == "RESOURCE_DOES_NOT_EXIST"

    # Another tenant cannot adopt it now: refused, nothing changes.
    thief = _unique("adm-thief")
    assert _admin(stack, "adopt", "--tenant", thief, "--experiment-id", legacy["id"], "--models") == 1
    assert f"already owned by tenant '{tenant}'" in capsys.readouterr().out
    assert _upstream_experiment(stack, legacy["id"])["name"] == f"{tenant}/{legacy['name']}"

    # tenants: the tenant is listed with its counts; audit: clean.
    assert _admin(stack, "tenants") == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()]
    assert [cell.strip() for cell in next(r for r in rows if r[0].strip() == tenant)] == [tenant, "1", "1", "1"]
    assert _admin(stack, "audit", "--tenant", tenant) == 0
    assert "0 finding(s)" in capsys.readouterr().out


def test_adopt_refuses_objects_tagged_for_another_tenant(
    stack: DevStack, mlflow_env: MlflowEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    mlflow_env(stack.mlflow_url)
    client = MlflowClient()
    name = _unique("tagged")
    experiment_id = client.create_experiment(name, tags={"matih.tenant_id": "globex"})
    assert _admin(stack, "adopt", "--tenant", _unique("adm"), "--experiment", name) == 1
    assert "tagged matih.tenant_id='globex'" in capsys.readouterr().out
    assert client.get_experiment(experiment_id).name == name

    assert _admin(stack, "adopt", "--tenant", _unique("adm"), "--experiment-id", "0") == 1
    assert "Default experiment cannot be adopted" in capsys.readouterr().out
    assert _admin(stack, "adopt", "--tenant", "Not_A_Tenant", "--experiment", name) == 2


def test_audit_reports_invariant_breaks(
    stack: DevStack, mlflow_env: MlflowEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    tenant, other = _unique("aud"), _unique("aud-other")
    mlflow_env(stack.mlflow_url)
    client = MlflowClient()
    untagged = client.create_experiment(f"{tenant}/untagged")  # prefixed but no tenant tag
    run = client.create_run(untagged)  # a run without the tenant tag
    outside = client.create_experiment(_unique("outside"), tags={"matih.tenant_id": tenant})
    stray = client.create_run(outside, tags={"matih.tenant_id": tenant})  # tagged run outside the prefix
    foreign = client.create_experiment(f"{other}/theirs", tags={"matih.tenant_id": other})
    foreign_run = client.create_run(foreign, tags={"matih.tenant_id": other})
    client.create_registered_model(f"{tenant}.stolen", tags={"matih.tenant_id": tenant})
    client.create_model_version(
        f"{tenant}.stolen", f"{foreign_run.info.artifact_uri}/m", run_id=foreign_run.info.run_id
    )

    assert _admin(stack, "audit", "--tenant", tenant) == 1
    out = capsys.readouterr().out
    assert re.search(rf"experiment {untagged} \({tenant}/untagged\)\s+\|\s+missing matih.tenant_id tag", out)
    assert f"run {run.info.run_id}" in out
    assert f"experiment {outside} " in out and "named outside the" in out
    assert f"run {stray.info.run_id}" in out and "its experiment is outside the prefix" in out
    assert f"model version {tenant}.stolen/1" in out and f"not in an experiment of {tenant}" in out
    assert f"5 finding(s) for tenant {tenant}" in out

    assert _admin(stack, "audit", "--tenant", other) == 0  # the other tenant is clean


def test_admin_without_upstream_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GATEWAY_UPSTREAM_URL", raising=False)
    assert main(["admin", "tenants"]) == 2
    assert "GATEWAY_UPSTREAM_URL" in capsys.readouterr().err
