"""The web UI's GraphQL queries through the real gateway, in front of the real MLflow server.

Runs are created with the stock client (``mlflow_as``) for two tenants; then the UI's exact documents
(as Apollo sends them, with ``__typename`` added) are POSTed with each tenant's Bearer token.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import mlflow
import pytest

from gateway.dev import DevStack
from tests.graphql_ui import BULK_INTERVAL, GET_EXPERIMENT, GET_RUN, SEARCH_RUNS, with_typenames
from tests.integration.conftest import MlflowAs

DOCUMENTS = {
    "GetRun": with_typenames(GET_RUN),
    "SearchRuns": with_typenames(SEARCH_RUNS),
    "MlflowGetExperimentQuery": with_typenames(GET_EXPERIMENT),
    "GetMetricHistoryBulkInterval": with_typenames(BULK_INTERVAL),
}


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _graphql(url: str, token: str | None, name: str, variables: dict[str, Any]) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"query": DOCUMENTS[name], "variables": variables, "operationName": name}
    return httpx.post(f"{url}/graphql", headers=headers, json=body, timeout=30)


def _variables(name: str, *, experiment_id: str, run_id: str) -> dict[str, Any]:
    """The variables the UI sends with each document."""
    return {
        "GetRun": {"data": {"runId": run_id}},
        "SearchRuns": {"data": {"filter": "", "experimentIds": [experiment_id]}},
        "MlflowGetExperimentQuery": {"input": {"experimentId": experiment_id}},
        "GetMetricHistoryBulkInterval": {
            "data": {"runIds": [run_id], "metricKey": "loss", "startStep": None, "endStep": None, "maxResults": 320}
        },
    }[name]


def _log_run(experiment_name: str) -> tuple[str, str]:
    experiment = mlflow.set_experiment(experiment_name)
    with mlflow.start_run() as run:
        mlflow.log_param("lr", "0.1")
        for step in range(3):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        mlflow.set_tag("team", "ui")
    return experiment.experiment_id, run.info.run_id


def _register_upstream(stack: DevStack, model_name: str, run_id: str) -> None:
    """Create a model version whose source run is ``run_id`` directly upstream (the registry is not routed yet)."""
    api = f"{stack.mlflow_url}/api/2.0/mlflow"
    httpx.post(f"{api}/registered-models/create", json={"name": model_name}, timeout=30).raise_for_status()
    httpx.post(
        f"{api}/model-versions/create",
        json={"name": model_name, "source": "s3://elsewhere/model", "run_id": run_id},
        timeout=30,
    ).raise_for_status()


def test_ui_queries_return_the_tenants_own_objects_with_plain_names(
    mlflow_as: MlflowAs, stack: DevStack, gateway_url: str
) -> None:
    token = mlflow_as("acme", "alice")
    name = _unique("ui")
    experiment_id, run_id = _log_run(name)
    own_model, foreign_model = _unique("acme.model"), _unique("globex.evil")
    _register_upstream(stack, own_model, run_id)
    _register_upstream(stack, foreign_model, run_id)  # another tenant's model naming acme's run as its source
    _register_upstream(stack, _unique("unprefixed"), run_id)

    # Upstream, MLflow itself resolves every one of them into the run (the leak the gateway closes).
    upstream = httpx.post(
        f"{stack.mlflow_url}/graphql",
        json={"query": DOCUMENTS["GetRun"], "variables": {"data": {"runId": run_id}}, "operationName": "GetRun"},
        timeout=30,
    ).json()
    upstream_run = upstream["data"]["mlflowGetRun"]["run"]
    assert upstream_run["experiment"]["name"] == f"acme/{name}"
    assert len(upstream_run["modelVersions"]) == 3

    def query(operation: str) -> dict[str, Any]:
        response = _graphql(
            gateway_url, token, operation, _variables(operation, experiment_id=experiment_id, run_id=run_id)
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        assert body["errors"] is None, body
        return body["data"]

    run = query("GetRun")["mlflowGetRun"]["run"]
    assert run["info"]["runUuid"] == run_id
    assert run["experiment"]["name"] == name
    assert [(v["name"], v["version"]) for v in run["modelVersions"]] == [(own_model.removeprefix("acme."), "1")]
    assert {p["key"]: p["value"] for p in run["data"]["params"]} == {"lr": "0.1"}

    (searched,) = query("SearchRuns")["mlflowSearchRuns"]["runs"]
    assert searched["info"]["runUuid"] == run_id
    assert searched["experiment"]["name"] == name
    assert [v["name"] for v in searched["modelVersions"]] == [own_model.removeprefix("acme.")]

    experiment = query("MlflowGetExperimentQuery")["mlflowGetExperiment"]["experiment"]
    assert (experiment["experimentId"], experiment["name"]) == (experiment_id, name)

    metrics = query("GetMetricHistoryBulkInterval")["mlflowGetMetricHistoryBulkInterval"]["metrics"]
    assert sorted((int(m["step"]), m["value"], m["runId"]) for m in metrics) == [
        (0, 1.0, run_id),
        (1, 0.5, run_id),
        (2, pytest.approx(1 / 3), run_id),
    ]


def test_experiment_zero_is_the_tenants_default(mlflow_as: MlflowAs, gateway_url: str) -> None:
    token = mlflow_as("acme", "alice")
    with mlflow.start_run() as run:  # no experiment set: the client uses "0", the gateway the tenant's Default
        pass

    response = _graphql(gateway_url, token, "MlflowGetExperimentQuery", {"input": {"experimentId": "0"}})

    assert response.status_code == 200, response.text
    experiment = response.json()["data"]["mlflowGetExperiment"]["experiment"]
    assert (experiment["experimentId"], experiment["name"]) == (run.info.experiment_id, "Default")


@pytest.mark.parametrize("operation", sorted(DOCUMENTS))
def test_another_tenants_ids_are_refused_like_missing_ones(
    mlflow_as: MlflowAs, gateway_url: str, operation: str
) -> None:
    mlflow_as("acme", "alice")
    acme_experiment, acme_run = _log_run(_unique("private"))
    globex_token = mlflow_as("globex", "bob")
    _log_run(_unique("globex-own"))  # globex is a real tenant with objects of its own

    # A random missing id of the same shape: the gateway must answer both the same way.
    missing_experiment = str(int(acme_experiment) + 100_000)
    missing_run = uuid.uuid4().hex
    foreign = _graphql(
        gateway_url, globex_token, operation, _variables(operation, experiment_id=acme_experiment, run_id=acme_run)
    )
    missing = _graphql(
        gateway_url,
        globex_token,
        operation,
        _variables(operation, experiment_id=missing_experiment, run_id=missing_run),
    )

    assert foreign.status_code == missing.status_code == 404, (foreign.text, missing.text)
    foreign_body, missing_body = foreign.json(), missing.json()
    assert foreign_body["error_code"] == missing_body["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    normalised = foreign_body["message"].replace(acme_run, "<id>").replace(acme_experiment, "<id>")
    assert normalised == missing_body["message"].replace(missing_run, "<id>").replace(missing_experiment, "<id>")
    assert set(foreign_body) == set(missing_body)
    assert "private" not in foreign.text


def test_a_foreign_id_hidden_in_an_inline_input_is_refused(mlflow_as: MlflowAs, gateway_url: str) -> None:
    mlflow_as("acme", "alice")
    _, acme_run = _log_run(_unique("inline"))
    globex_token = mlflow_as("globex", "bob")

    response = httpx.post(
        f"{gateway_url}/graphql",
        headers={"Authorization": f"Bearer {globex_token}"},
        json={
            "query": '{ mlflowGetRun(input: {runId: "' + acme_run + '"}) { run { data { params { key value } } } } }'
        },
        timeout=30,
    )

    assert response.status_code == 404, response.text
    assert response.json() == {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"Run with id={acme_run} not found"}


def test_aliases_that_read_several_experiments_are_refused(
    mlflow_as: MlflowAs, stack: DevStack, gateway_url: str
) -> None:
    acme_token = mlflow_as("acme", "alice")
    acme_experiment, _ = _log_run(_unique("alias-acme"))
    mlflow_as("globex", "bob")
    globex_experiment, _ = _log_run(_unique("alias-globex"))
    query = (
        "{ "
        + " ".join(
            f'{alias}: mlflowGetExperiment(input: {{experimentId: "{experiment_id}"}}) {{ experiment {{ name }} }}'
            for alias, experiment_id in (("a", acme_experiment), ("b", globex_experiment))
        )
        + " }"
    )

    # MLflow itself answers both (mlflow-api.md §8.3) ...
    upstream = httpx.post(f"{stack.mlflow_url}/graphql", json={"query": query}, timeout=30).json()
    assert upstream["data"]["b"]["experiment"]["name"].startswith("globex/")
    # ... the gateway refuses the document before anything reaches MLflow.
    response = httpx.post(
        f"{gateway_url}/graphql", headers={"Authorization": f"Bearer {acme_token}"}, json={"query": query}, timeout=30
    )
    assert response.status_code == 400, response.text
    assert response.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "globex" not in response.text


@pytest.mark.parametrize(
    "query",
    [
        "{ __schema { queryType { name } } }",
        "{ mlflowSearchModelVersions(input: {filter: \"name LIKE '%'\"}) { modelVersions { name } } }",
        'mutation { mlflowSearchDatasets(input: {experimentIds: ["1"]}) { datasetSummaries { name } } }',
    ],
    ids=["introspection", "registry-search", "mutation"],
)
def test_other_graphql_features_are_denied(mlflow_as: MlflowAs, gateway_url: str, query: str) -> None:
    token = mlflow_as("acme", "alice")

    response = httpx.post(
        f"{gateway_url}/graphql", headers={"Authorization": f"Bearer {token}"}, json={"query": query}, timeout=30
    )

    assert response.status_code == 403, response.text
    assert response.json()["error_code"] == "PERMISSION_DENIED"


def test_graphql_over_get_is_denied(mlflow_as: MlflowAs, gateway_url: str) -> None:
    token = mlflow_as("acme", "alice")

    response = httpx.get(
        f"{gateway_url}/graphql", headers={"Authorization": f"Bearer {token}"}, params={"query": "{ __typename }"}
    )

    assert response.status_code == 403, response.text
    assert "GraphQL over GET" in response.json()["message"]
