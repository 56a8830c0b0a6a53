"""The model registry and prompts through the real stack, with the stock client of two tenants that
use the SAME model and prompt names. Cross-tenant reads and lineage attacks are refused.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from gateway.dev import DevStack
from tests.integration.conftest import MlflowAs, TokenFactory

# MLflow's own schema-inference chatter when a pyfunc model is logged.
pytestmark = pytest.mark.filterwarnings("ignore:.*type hint:UserWarning")


def _log_model(n: int) -> tuple[str, str, str]:
    """Log a pyfunc model in a new run of a new experiment: (model uri, run id, experiment id)."""

    class AddN(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
        def __init__(self, n: int) -> None:
            self.n = n

        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            return [value + self.n for value in model_input]

    experiment = mlflow.set_experiment(f"reg-{uuid.uuid4().hex[:6]}")
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=AddN(n))
    return info.model_uri, run.info.run_id, experiment.experiment_id


def _upstream(stack: DevStack, route: str, **params: str) -> httpx.Response:
    return httpx.get(f"{stack.mlflow_url}/api/2.0/mlflow/{route}", params=params, timeout=30)


def test_two_tenants_register_and_serve_the_same_model_name(
    mlflow_as: MlflowAs, stack: DevStack, gateway_url: str
) -> None:
    name = f"shared-{uuid.uuid4().hex[:6]}"
    for tenant, n in (("acme", 1), ("globex", 100)):
        mlflow_as(tenant, roles=["admin"])
        uri, run_id, _ = _log_model(n)
        version = mlflow.register_model(uri, name)
        assert (version.name, version.version) == (name, "1")
        client = MlflowClient()
        client.set_registered_model_alias(name, "champion", "1")
        client.set_registered_model_tag(name, "team", tenant)
        by_alias = client.get_model_version_by_alias(name, "champion")
        assert (by_alias.name, by_alias.version, by_alias.run_id) == (name, "1", run_id)
        model = client.get_registered_model(name)
        assert model.name == name and model.tags["team"] == tenant
        assert model.tags["matih.tenant_id"] == tenant
        assert [m.name for m in client.search_registered_models(filter_string=f"name = '{name}'")] == [name]
        versions = client.search_model_versions(f"name = '{name}'")
        assert [(v.name, v.run_id) for v in versions] == [(name, run_id)]
        assert [v.run_id for v in client.search_model_versions(f"run_id = '{run_id}'")] == [run_id]
        loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion")
        assert list(loaded.predict([1, 2])) == [1 + n, 2 + n]
        assert client.get_model_version_download_uri(name, "1").startswith("mlflow-artifacts:/")
        # The UI's file viewer: the gateway streams the version's file from S3 itself.
        token = mlflow_as(tenant, roles=["viewer"])
        ui = httpx.get(
            f"{gateway_url}/model-versions/get-artifact",
            params={"name": name, "version": "1", "path": "MLmodel"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert ui.status_code == 200 and b"python_function" in ui.content, ui.text

    # Upstream, each tenant's model carries its prefix; neither sees the other's.
    for tenant in ("acme", "globex"):
        assert _upstream(stack, "registered-models/get", name=f"{tenant}.{name}").status_code == 200
    assert _upstream(stack, "registered-models/get", name=name).status_code == 404
    mlflow_as("acme")
    every = [m.name for m in MlflowClient().search_registered_models(max_results=1000)]
    assert every.count(name) == 1 and not any(n.startswith(("acme.", "globex.")) for n in every)

    # Renames stay within the tenant; deletes need the admin role.
    client = MlflowClient()
    client.rename_registered_model(name, f"{name}-r")
    assert _upstream(stack, "registered-models/get", name=f"acme.{name}-r").status_code == 200
    with pytest.raises(MlflowException) as refused:
        client.delete_registered_model(f"{name}-r")
    assert refused.value.error_code == "PERMISSION_DENIED"
    mlflow_as("acme", roles=["admin"])
    MlflowClient().delete_model_version(f"{name}-r", "1")
    MlflowClient().delete_registered_model(f"{name}-r")
    assert _upstream(stack, "registered-models/get", name=f"globex.{name}").status_code == 200


def test_another_tenants_model_is_missing(mlflow_as: MlflowAs) -> None:
    name = f"private-{uuid.uuid4().hex[:6]}"
    mlflow_as("acme")
    uri, _, _ = _log_model(1)
    mlflow.register_model(uri, name)
    MlflowClient().set_registered_model_alias(name, "prod", "1")

    mlflow_as("globex", roles=["admin"])
    client = MlflowClient()
    attempts: list[Any] = [
        lambda: client.get_registered_model(name),
        lambda: client.get_model_version(name, "1"),
        lambda: client.get_model_version_by_alias(name, "prod"),
        lambda: client.get_model_version_download_uri(name, "1"),
        lambda: client.set_registered_model_tag(name, "x", "y"),
        lambda: client.delete_model_version(name, "1"),
        lambda: client.delete_registered_model(name),
        lambda: mlflow.pyfunc.load_model(f"models:/{name}/1"),
    ]
    for attempt in attempts:
        with pytest.raises(MlflowException) as missing:
            attempt()
        assert missing.value.error_code == "RESOURCE_DOES_NOT_EXIST", missing.value
        assert "acme" not in str(missing.value)
    assert name not in [m.name for m in client.search_registered_models(max_results=1000)]
    assert client.search_model_versions(f"name = '{name}'") == []

    mlflow_as("acme")
    assert MlflowClient().get_model_version_by_alias(name, "prod").version == "1"


def test_lineage_attacks_are_refused(
    mlflow_as: MlflowAs, gateway_url: str, token_factory: TokenFactory, stack: DevStack
) -> None:
    mlflow_as("acme")
    uri, victim_run, victim_exp = _log_model(1)
    victim_model_id = mlflow.get_logged_model(uri.split("/")[-1]).model_id if uri.startswith("models:/m-") else None

    mlflow_as("globex")
    own_uri, own_run, _ = _log_model(2)
    name = f"thief-{uuid.uuid4().hex[:6]}"
    MlflowClient().create_registered_model(name)
    token = token_factory("globex")
    destination = stack.artifacts_destination.rstrip("/")
    attacks = [
        (f"{destination}/{victim_exp}/{victim_run}/artifacts", 404),
        (f"{destination}/{victim_exp}/{victim_run}/artifacts/model", 404),
        (f"runs:/{victim_run}/model", 404),
        (f"mlflow-artifacts:/{victim_exp}/{victim_run}/artifacts", 404),
        (f"{destination}/../{victim_exp}/{victim_run}/artifacts", 400),
        ("s3://another-bucket/x", 400),
        ("file:///etc", 400),
        ("http://example.com/model", 400),
    ]
    if victim_model_id:
        attacks.append((f"models:/{victim_model_id}", 404))
    for source, status in attacks:
        response = httpx.post(
            f"{gateway_url}/api/2.0/mlflow/model-versions/create",
            json={"name": name, "source": source},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert response.status_code == status, (source, response.text)
    # The victim's run named as run_id with an own source is refused too.
    response = httpx.post(
        f"{gateway_url}/api/2.0/mlflow/model-versions/create",
        json={"name": name, "source": f"runs:/{own_run}/model", "run_id": victim_run},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert response.status_code == 404, response.text
    assert (
        _upstream(stack, "model-versions/search", filter=f"name = 'globex.{name}'").json().get("model_versions", [])
        == []
    )

    # The tenant's own lineage is accepted (so the refusals above can fail).
    version = mlflow.register_model(own_uri, name)
    assert version.version == "1"


def test_prompts_with_the_same_name(mlflow_as: MlflowAs) -> None:
    name = f"greet_{uuid.uuid4().hex[:6]}"
    for tenant in ("acme", "globex"):
        mlflow_as(tenant)
        prompt = mlflow.genai.register_prompt(name=name, template=f"Hello from {tenant}, {{{{who}}}}!")
        assert (prompt.name, prompt.version) == (name, 1)
        # No client-side cache: the client caches prompts by name and version, not by server identity.
        loaded = mlflow.genai.load_prompt(f"prompts:/{name}/1", cache_ttl_seconds=0)
        assert loaded.format(who="bob") == f"Hello from {tenant}, bob!"
        found = mlflow.genai.search_prompts(filter_string=f"name = '{name}'")
        assert [p.name for p in found] == [name]
