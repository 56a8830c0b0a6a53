"""The stock mlflow client through the real gateway, real mlflow server and real S3 emulator.

Only ``MLFLOW_TRACKING_URI`` and ``MLFLOW_TRACKING_TOKEN`` are set (by ``mlflow_as``); everything else
is the client's own behaviour.
"""

from __future__ import annotations

import uuid

import httpx
import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException

from gateway.dev import DevStack
from tests.integration.conftest import MlflowAs, TokenFactory


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_stock_client_logs_and_searches_a_run(mlflow_as: MlflowAs, stack: DevStack) -> None:
    mlflow_as("acme", "alice", job="nightly-7")
    name = _unique("demo")
    experiment = mlflow.set_experiment(name)
    assert experiment.name == name
    with mlflow.start_run() as run:
        mlflow.log_param("lr", 0.1)
        mlflow.log_metric("loss", 0.5, step=1)
        mlflow.log_metrics({"acc": 0.9, "f1": 0.8})
        mlflow.set_tag("team", "forecasting")

    found = mlflow.search_runs(experiment_names=[name])
    assert list(found["run_id"]) == [run.info.run_id]
    assert found["metrics.loss"][0] == 0.5 and found["params.lr"][0] == "0.1"

    fetched = MlflowClient().get_run(run.info.run_id)
    assert fetched.info.status == "FINISHED"
    assert fetched.data.tags["matih.tenant_id"] == "acme"
    assert fetched.data.tags["matih.user_id"] == "alice"
    assert fetched.data.tags["matih.job_id"] == "nightly-7"
    assert fetched.data.tags["mlflow.user"] == "alice"
    assert fetched.info.user_id == "alice"
    history = MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5)]

    # Upstream, the experiment carries the tenant prefix and tag; the client never saw them.
    upstream = httpx.get(
        f"{stack.mlflow_url}/api/2.0/mlflow/experiments/get", params={"experiment_id": experiment.experiment_id}
    ).json()["experiment"]
    assert upstream["name"] == f"acme/{name}"
    assert {"key": "matih.tenant_id", "value": "acme"} in upstream["tags"]


def test_default_experiment_is_per_tenant(mlflow_as: MlflowAs, stack: DevStack) -> None:
    mlflow_as("acme")
    with mlflow.start_run() as acme_run:  # no experiment set: the client uses experiment "0"
        pass
    mlflow_as("globex", "bob")
    with mlflow.start_run() as globex_run:
        pass
    acme_exp, globex_exp = acme_run.info.experiment_id, globex_run.info.experiment_id
    assert "0" not in (acme_exp, globex_exp)
    assert acme_exp != globex_exp
    names = {
        exp_id: httpx.get(
            f"{stack.mlflow_url}/api/2.0/mlflow/experiments/get", params={"experiment_id": exp_id}
        ).json()["experiment"]["name"]
        for exp_id in (acme_exp, globex_exp)
    }
    assert names == {acme_exp: "acme/Default", globex_exp: "globex/Default"}
    assert MlflowClient().get_experiment("0").name == "Default"
    assert MlflowClient().get_experiment("0").experiment_id == globex_exp


def test_same_name_in_two_tenants_and_no_cross_tenant_access(mlflow_as: MlflowAs) -> None:
    name = _unique("shared-name")
    mlflow_as("acme")
    acme_exp = mlflow.create_experiment(name)
    with mlflow.start_run(experiment_id=acme_exp) as acme_run:
        mlflow.log_param("secret", "acme-only")

    mlflow_as("globex", "bob")
    globex_exp = mlflow.create_experiment(name)  # no "already exists": names are per tenant
    assert globex_exp != acme_exp
    client = MlflowClient()
    assert client.get_experiment_by_name(name).experiment_id == globex_exp

    foreign_calls = [
        lambda: client.get_experiment(acme_exp),
        lambda: client.get_run(acme_run.info.run_id),
        lambda: client.log_param(acme_run.info.run_id, "x", "1"),
        lambda: client.set_tag(acme_run.info.run_id, "x", "1"),
        lambda: client.delete_run(acme_run.info.run_id),
        lambda: client.search_runs([acme_exp]),
        lambda: client.get_metric_history(acme_run.info.run_id, "loss"),
        lambda: client.create_run(acme_exp),
        lambda: client.rename_experiment(acme_exp, "stolen"),
    ]
    for call in foreign_calls:
        with pytest.raises(MlflowException) as caught:
            call()
        assert caught.value.error_code == "RESOURCE_DOES_NOT_EXIST"

    mlflow_as("acme")
    assert MlflowClient().get_run(acme_run.info.run_id).data.params == {"secret": "acme-only"}
    assert MlflowClient().get_experiment(acme_exp).name == name


def test_foreign_ids_look_exactly_like_missing_ones(
    mlflow_as: MlflowAs, gateway_url: str, token_factory: TokenFactory
) -> None:
    mlflow_as("acme")
    acme_exp = mlflow.create_experiment(_unique("private"))
    acme_run = MlflowClient().create_run(acme_exp).info.run_id

    headers = {"Authorization": f"Bearer {token_factory('globex', 'bob')}"}
    api = f"{gateway_url}/api/2.0/mlflow"
    foreign = httpx.get(f"{api}/experiments/get", params={"experiment_id": acme_exp}, headers=headers)
    missing = httpx.get(f"{api}/experiments/get", params={"experiment_id": "987654321"}, headers=headers)
    assert (foreign.status_code, missing.status_code) == (404, 404)
    assert foreign.json() == {
        "error_code": "RESOURCE_DOES_NOT_EXIST",
        "message": f"No Experiment with id={acme_exp} exists",
    }
    assert missing.json() == {
        "error_code": "RESOURCE_DOES_NOT_EXIST",
        "message": "No Experiment with id=987654321 exists",
    }

    fake_run = uuid.uuid4().hex
    foreign = httpx.get(f"{api}/runs/get", params={"run_id": acme_run}, headers=headers)
    missing = httpx.get(f"{api}/runs/get", params={"run_id": fake_run}, headers=headers)
    assert (foreign.status_code, missing.status_code) == (404, 404)
    assert foreign.json() == {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"Run with id={acme_run} not found"}
    assert missing.json() == {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"Run with id={fake_run} not found"}


def test_reserved_tags_cannot_be_forged(mlflow_as: MlflowAs) -> None:
    mlflow_as("acme", "alice")
    client = MlflowClient()
    experiment_id = client.create_experiment(_unique("tags"))
    run = client.create_run(experiment_id, tags={"team": "a"})
    for call in (
        lambda: client.set_tag(run.info.run_id, "matih.tenant_id", "globex"),
        lambda: client.delete_tag(run.info.run_id, "matih.user_id"),
        lambda: client.create_run(experiment_id, tags={"matih.tenant_id": "globex"}),
        lambda: client.set_experiment_tag(experiment_id, "matih.tenant_id", "globex"),
        lambda: client.log_batch(run.info.run_id, tags=[mlflow.entities.RunTag("MATIH.user_id", "mallory")]),
    ):
        with pytest.raises(RestException) as caught:
            call()
        assert caught.value.error_code == "PERMISSION_DENIED"
    assert client.get_run(run.info.run_id).data.tags["matih.tenant_id"] == "acme"


def test_user_id_comes_from_the_token(mlflow_as: MlflowAs) -> None:
    mlflow_as("acme", "alice")
    client = MlflowClient()
    experiment_id = client.create_experiment(_unique("who"))
    run = client.create_run(experiment_id, tags={"mlflow.user": "mallory"})
    assert run.info.user_id == "alice"
    assert client.get_run(run.info.run_id).data.tags["mlflow.user"] == "alice"


def test_rename_stays_inside_the_tenant(mlflow_as: MlflowAs, stack: DevStack) -> None:
    mlflow_as("acme")
    client = MlflowClient()
    experiment_id = client.create_experiment(_unique("before"))
    client.rename_experiment(experiment_id, "../globex/after")
    upstream = httpx.get(
        f"{stack.mlflow_url}/api/2.0/mlflow/experiments/get", params={"experiment_id": experiment_id}
    ).json()["experiment"]
    assert upstream["name"] == "acme/../globex/after"
    assert client.get_experiment(experiment_id).name == "../globex/after"


def test_duplicate_experiment_error_shows_the_tenants_name(mlflow_as: MlflowAs) -> None:
    mlflow_as("acme")
    name = _unique("twice")
    mlflow.create_experiment(name)
    with pytest.raises(MlflowException) as caught:
        mlflow.create_experiment(name)
    assert caught.value.error_code == "RESOURCE_ALREADY_EXISTS"
    assert f"name={name}" in caught.value.message
    assert "acme/" not in caught.value.message


def test_denied_routes_and_missing_token(gateway_url: str, token_factory: TokenFactory) -> None:
    api = f"{gateway_url}/api/2.0/mlflow"
    assert httpx.post(f"{api}/experiments/search", json={}).status_code == 401
    headers = {"Authorization": f"Bearer {token_factory('acme')}"}
    for method, url in [
        ("POST", f"{api}/webhooks"),
        ("POST", f"{gateway_url}/ajax-api/3.0/mlflow/assistant/message"),
        ("GET", f"{api}/not-a-route"),
    ]:
        response = httpx.request(method, url, json={}, headers=headers)
        assert response.status_code == 403
        assert response.json()["error_code"] == "PERMISSION_DENIED"
    assert httpx.get(f"{gateway_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{gateway_url}/ready").status_code == 200
