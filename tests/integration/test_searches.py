"""Searches with the stock client through the real gateway and a real MLflow server.

Tenants ``acme``, ``acmeco`` (``acme`` is a prefix of it) and ``globex`` create experiments with
identical names; each search sees its own only, wildcard and quote tricks never reach another
tenant or MLflow's shared Default, pagination works exactly as upstream, and run searches take
filters and refuse foreign experiments. Upstream facts are checked on the MLflow server directly.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException

from gateway.dev import DevStack
from tests.integration.conftest import MlflowAs, TokenFactory


def nonce() -> str:
    return uuid.uuid4().hex[:8]


def upstream_name(stack: DevStack, experiment_id: str) -> str:
    response = httpx.get(f"{stack.mlflow_url}/api/2.0/mlflow/experiments/get", params={"experiment_id": experiment_id})
    response.raise_for_status()
    name: str = response.json()["experiment"]["name"]
    return name


def upstream_search(stack: DevStack, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{stack.mlflow_url}/api/2.0/mlflow/experiments/search", json=body)
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def create_as(mlflow_as: MlflowAs, tenant: str, *names: str, tags: dict[str, str] | None = None) -> list[str]:
    mlflow_as(tenant, f"{tenant}-user")
    return [mlflow.create_experiment(name, tags=tags) for name in names]


def search_ids(filter_string: str | None = None, view_type: int = ViewType.ACTIVE_ONLY) -> dict[str, str]:
    """experiment id -> name, over every page, as the stock fluent API returns them."""
    return {e.experiment_id: e.name for e in mlflow.search_experiments(view_type, filter_string=filter_string)}


def test_identical_names_in_three_tenants_are_private(mlflow_as: MlflowAs, stack: DevStack) -> None:
    name = f"search-same-{nonce()}"
    owned = {
        tenant: create_as(mlflow_as, tenant, name, tags={"owner": tenant})[0] for tenant in ("acme", "acmeco", "globex")
    }
    for tenant, experiment_id in owned.items():
        mlflow_as(tenant, "someone")
        found = mlflow.search_experiments(filter_string=f"name = '{name}'")
        assert [(e.experiment_id, e.name, e.tags["owner"]) for e in found] == [(experiment_id, name, tenant)]
        assert upstream_name(stack, experiment_id) == f"{tenant}/{name}"
        tagged = mlflow.search_experiments(filter_string=f"tags.owner != '{tenant}' AND name = '{name}'")
        assert tagged == []


def test_search_without_filter_lists_exactly_the_tenants_experiments(mlflow_as: MlflowAs, stack: DevStack) -> None:
    tag = nonce()
    acme_active, acme_deleted = create_as(mlflow_as, "acme", f"all-{tag}-a", f"all-{tag}-b")
    mlflow.delete_experiment(acme_deleted)
    foreign = create_as(mlflow_as, "globex", f"all-{tag}-a") + create_as(mlflow_as, "acmeco", f"all-{tag}-a")

    mlflow_as("acme")
    active = search_ids()
    everything = search_ids(view_type=ViewType.ALL)
    assert acme_active in active and acme_deleted not in active
    assert {acme_active, acme_deleted} <= set(everything)
    assert not set(everything) & {*foreign, "0"}
    for experiment_id, name in everything.items():
        assert upstream_name(stack, experiment_id) == f"acme/{name}"  # every listed one is acme's
    # The upstream holds the other tenants' experiments and MLflow's Default all along.
    upstream = upstream_search(stack, {"max_results": 50000, "view_type": "ALL"})
    upstream_ids = {e["experiment_id"] for e in upstream["experiments"]}
    assert {*foreign, "0"} <= upstream_ids and len(upstream_ids) > len(everything)


@pytest.mark.parametrize(
    "attack",
    [
        "name LIKE '%'",
        "name LIKE 'acme%'",
        "name LIKE 'acme/%'",
        "name LIKE 'acm_/%'",
        "name LIKE '_cme/%'",
        "name LIKE '____/%'",
        "name ILIKE 'ACME/%'",
        "name ILIKE '%ACME%'",
        "name LIKE '%/%'",
        "name LIKE '%secret%'",
        "name != 'x'",
        "name = 'Default'",
        "tags.`matih.tenant_id` = 'acme'",
        "tags.`matih.tenant_id` IS NOT NULL",
    ],
)
def test_wildcards_never_reach_another_tenant(mlflow_as: MlflowAs, stack: DevStack, attack: str) -> None:
    (secret,) = create_as(mlflow_as, "acme", f"secret-{nonce()}")
    mlflow_as("globex", "mallory")
    found = search_ids(attack, view_type=ViewType.ALL)
    assert secret not in found and "0" not in found
    for experiment_id in found:
        assert upstream_name(stack, experiment_id).startswith("globex/")


def test_the_uis_get_search_is_scoped(
    mlflow_as: MlflowAs, stack: DevStack, gateway_url: str, token_factory: TokenFactory
) -> None:
    tag = nonce()
    (mine,) = create_as(mlflow_as, "acme", f"ui-{tag}")
    (theirs,) = create_as(mlflow_as, "globex", f"ui-{tag}")
    response = httpx.get(
        f"{gateway_url}/ajax-api/2.0/mlflow/experiments/search",
        params=[("max_results", "1000"), ("filter", f"name LIKE '%{tag}'"), ("order_by", "name DESC")],
        headers={"Authorization": f"Bearer {token_factory('acme')}"},
    )
    assert response.status_code == 200, response.text
    assert [(e["experiment_id"], e["name"]) for e in response.json()["experiments"]] == [(mine, f"ui-{tag}")]
    assert theirs != mine and upstream_name(stack, theirs) == f"globex/ui-{tag}"


def test_experiment_id_filters_cannot_name_foreign_experiments(mlflow_as: MlflowAs) -> None:
    (secret,) = create_as(mlflow_as, "acme", f"by-id-{nonce()}")
    mlflow_as("globex", "mallory")
    assert search_ids(f"experiment_id = '{secret}'") == {}
    assert search_ids(f"experiment_id IN ('{secret}', '0')") == {}
    assert search_ids("experiment_id = '0'") == {}
    mlflow_as("acme")
    assert list(search_ids(f"experiment_id IN ('{secret}', '0')")) == [secret]


def test_acme_and_acmeco_never_see_each_other(mlflow_as: MlflowAs, stack: DevStack) -> None:
    tag = nonce()
    (acme,) = create_as(mlflow_as, "acme", f"co/{tag}")  # upstream "acme/co/<tag>"
    (acmeco,) = create_as(mlflow_as, "acmeco", tag)  # upstream "acmeco/<tag>"
    mlflow_as("acme")
    assert set(search_ids(f"name LIKE '%{tag}'")) == {acme}
    assert acmeco not in search_ids("name LIKE 'co%'")
    mlflow_as("acmeco")
    assert set(search_ids(f"name LIKE '%{tag}'")) == {acmeco}
    assert acme not in search_ids("name LIKE '%'")
    assert upstream_name(stack, acme) == f"acme/co/{tag}" and upstream_name(stack, acmeco) == f"acmeco/{tag}"


@pytest.mark.parametrize(
    "attack",
    [
        "name = 'x' OR name LIKE '%'",
        "name = 'x' or 1 = 1",
        "name = 'x",
        "name = 'x\\' AND name LIKE '%'",
        "name = 'x\\'",
        "name LIKE '%' -- ",
        "name LIKE '%' /* */",
        "name = 'x'; SELECT 1",
        "(name LIKE '%')",
        "NOT name = 'x'",
        "name = 'x' name LIKE '%'",
        "name = 'x' AND",
    ],
)
def test_quote_swallowing_and_other_tricks_are_refused(mlflow_as: MlflowAs, attack: str) -> None:
    mlflow_as("globex", "mallory")
    with pytest.raises(MlflowException) as refused:
        MlflowClient().search_experiments(filter_string=attack)
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"


def test_pagination_works_across_pages_exactly_as_upstream(mlflow_as: MlflowAs, stack: DevStack) -> None:
    tag = nonce()
    names = [f"page-{tag}-{i}" for i in range(7)]
    ids = create_as(mlflow_as, "acme", *names)
    client = MlflowClient()
    for size, shape in ((3, [3, 3, 1]), (2, [2, 2, 2, 1])):
        pages: list[list[str]] = []
        tokens: list[str | None] = []
        token = None
        while True:
            page = client.search_experiments(
                filter_string=f"name LIKE 'page-{tag}-%'", max_results=size, order_by=["name ASC"], page_token=token
            )
            pages.append([e.name for e in page])
            token = page.token
            tokens.append(token)
            if not token:
                break
        assert [len(page) for page in pages] == shape
        assert [name for page in pages for name in page] == names
        # The same pages and tokens as MLflow's own paging of the scoped query.
        upstream_tokens: list[str | None] = []
        upstream_token = None
        for _ in shape:
            body = {
                "filter": f"name LIKE 'acme/page-{tag}-%' AND name LIKE 'acme/%'",
                "max_results": size,
                "order_by": ["name ASC"],
                **({"page_token": upstream_token} if upstream_token else {}),
            }
            upstream_token = upstream_search(stack, body).get("next_page_token")
            upstream_tokens.append(upstream_token)
        assert tokens == upstream_tokens
    assert {e.experiment_id for e in client.search_experiments(filter_string=f"name LIKE 'page-{tag}-%'")} == set(ids)

    # Another tenant replaying acme's page token only moves within its own (empty) result.
    first = client.search_experiments(filter_string=f"name LIKE 'page-{tag}-%'", max_results=2)
    mlflow_as("globex", "mallory")
    replay = MlflowClient().search_experiments(
        filter_string=f"name LIKE 'page-{tag}-%'", max_results=2, page_token=first.token
    )
    assert list(replay) == [] and replay.token is None


def test_search_runs_with_filters(mlflow_as: MlflowAs) -> None:
    mlflow_as("acme")
    name = f"runs-{nonce()}"
    experiment_id = mlflow.create_experiment(name)
    runs = {}
    for lr, loss in (("0.01", 0.2), ("0.01", 0.7), ("0.1", 0.1)):
        with mlflow.start_run(experiment_id=experiment_id) as run:
            mlflow.log_param("lr", lr)
            mlflow.log_metric("loss", loss)
            mlflow.set_tag("team", "forecasting")
        runs[loss] = run.info.run_id

    found = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string="metrics.loss < 0.5 AND params.lr = '0.01'",
    )
    assert list(found["run_id"]) == [runs[0.2]]
    ordered = mlflow.search_runs(
        experiment_names=[name], filter_string="tags.team = 'forecasting'", order_by=["metrics.loss DESC"]
    )
    assert list(ordered["run_id"]) == [runs[0.7], runs[0.2], runs[0.1]]
    by_id = MlflowClient().search_runs([experiment_id], f"attributes.run_id IN ('{runs[0.1]}', '{runs[0.7]}')")
    assert {r.info.run_id for r in by_id} == {runs[0.1], runs[0.7]}
    provenance = MlflowClient().search_runs([experiment_id], "tags.`matih.user_id` = 'alice'")
    assert len(provenance) == 3

    with pytest.raises(MlflowException) as refused:
        MlflowClient().search_runs([experiment_id], "metrics.loss < 1 OR 1 = 1")
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException) as refused:
        MlflowClient().search_runs([experiment_id], order_by=["metrics.loss", "metrics.loss DESC"])
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"

    mlflow_as("globex", "mallory")
    with pytest.raises(MlflowException) as foreign:
        mlflow.search_runs(experiment_ids=[experiment_id])
    assert foreign.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert f"No Experiment with id={experiment_id} exists" in str(foreign.value)
    with pytest.raises(MlflowException) as foreign:
        MlflowClient().search_runs([experiment_id], f"attributes.run_id = '{runs[0.1]}'")
    assert foreign.value.error_code == "RESOURCE_DOES_NOT_EXIST"


def test_the_shared_default_experiment_never_appears(mlflow_as: MlflowAs, stack: DevStack) -> None:
    mlflow_as("acme")
    with mlflow.start_run():  # experiment "0": the gateway uses acme's own Default
        pass
    defaults = search_ids("name = 'Default'")
    assert len(defaults) == 1 and "0" not in defaults
    (default_id,) = defaults
    assert upstream_name(stack, default_id) == "acme/Default"
    assert "0" not in search_ids(view_type=ViewType.ALL)


def test_dataset_search_is_scoped(mlflow_as: MlflowAs, gateway_url: str, token_factory: TokenFactory) -> None:
    mlflow_as("acme")
    experiment_id = mlflow.create_experiment(f"datasets-{nonce()}")
    with mlflow.start_run(experiment_id=experiment_id):
        mlflow.log_input(mlflow.data.from_numpy(np.arange(4), name="numbers"), context="training")
    url = f"{gateway_url}/ajax-api/2.0/mlflow/experiments/search-datasets"
    acme = {"Authorization": f"Bearer {token_factory('acme')}"}
    found = httpx.post(url, json={"experiment_ids": [experiment_id]}, headers=acme)
    assert found.status_code == 200, found.text
    assert [(d["name"], d["context"]) for d in found.json()["dataset_summaries"]] == [("numbers", "training")]
    globex = {"Authorization": f"Bearer {token_factory('globex', 'mallory')}"}
    foreign = httpx.post(url, json={"experiment_ids": [experiment_id]}, headers=globex)
    assert foreign.status_code == 404
    assert foreign.json() == {
        "error_code": "RESOURCE_DOES_NOT_EXIST",
        "message": f"No Experiment with id={experiment_id} exists",
    }


def test_promptlab_runs_are_denied(mlflow_as: MlflowAs, gateway_url: str, token_factory: TokenFactory) -> None:
    mlflow_as("acme")
    experiment_id = mlflow.create_experiment(f"lab-{nonce()}")
    response = httpx.post(
        f"{gateway_url}/ajax-api/2.0/mlflow/runs/create-promptlab-run",
        json={"experiment_id": experiment_id, "prompt_template": "x", "model_route": "r"},
        headers={"Authorization": f"Bearer {token_factory('acme')}"},
    )
    assert response.status_code == 403 and response.json()["error_code"] == "PERMISSION_DENIED"
    assert mlflow.search_runs(experiment_ids=[experiment_id]).empty
