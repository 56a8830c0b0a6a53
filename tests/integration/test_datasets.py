"""Evaluation datasets with the stock mlflow client, through the real gateway and a real MLflow.

Each tenant sees only its own datasets: a dataset is owned through the experiments it is linked
to; id-addressed routes answer another tenant's dataset like a missing one; searches must name the
caller's experiments (MLflow's unscoped search returns every tenant's datasets); records can only
cite the caller's own traces.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import TraceInfo, TraceLocation, TraceState
from mlflow.exceptions import MlflowException, RestException
from mlflow.genai.datasets import create_dataset, delete_dataset, get_dataset, search_datasets
from mlflow.store.tracking.rest_store import RestStore
from mlflow.utils.rest_utils import MlflowHostCreds

from gateway.dev import DevStack
from tests.integration.conftest import MlflowAs, TokenFactory


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _store() -> RestStore:
    """The client's own REST store (``EvaluationDataset.experiment_ids`` lazy-loads through it)."""
    store = mlflow.tracking._tracking_service.utils._get_store()
    assert isinstance(store, RestStore)
    return store


def _upstream(stack: DevStack, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """A call straight to MLflow, bypassing the gateway (to check state or show what it blocks)."""
    return httpx.request(method, f"{stack.mlflow_url}/api/3.0/mlflow/{path}", **kwargs)


def _upstream_trace(stack: DevStack, experiment_id: str) -> str:
    """A trace created directly in MLflow (the gateway's trace routes are another issue)."""
    trace_id = f"tr-{uuid.uuid4().hex}"
    info = TraceInfo(
        trace_id=trace_id,
        trace_location=TraceLocation.from_experiment_id(experiment_id),
        request_time=int(time.time() * 1000),
        state=TraceState.OK,
    )
    RestStore(lambda: MlflowHostCreds(stack.mlflow_url)).start_trace(info)
    return trace_id


def test_stock_client_dataset_lifecycle(mlflow_as: MlflowAs, stack: DevStack) -> None:
    mlflow_as("acme", "alice", job="eval-1")
    experiment = mlflow.set_experiment(_unique("eval"))
    dataset = create_dataset(name="qa", tags={"team": "ds", "mlflow.user": "mallory"})  # the active experiment
    assert dataset.experiment_ids == [experiment.experiment_id]
    assert dataset.created_by == "alice"
    assert dataset.tags["matih.tenant_id"] == "acme" and dataset.tags["matih.job_id"] == "eval-1"

    dataset.merge_records(
        [
            {"inputs": {"question": "What is MLflow?"}, "expectations": {"answer": "A platform"}},
            {"inputs": {"question": "What is a run?"}, "expectations": {"answer": "An execution"}},
        ]
    )
    fetched = get_dataset(dataset_id=dataset.dataset_id)
    frame = fetched.to_df()
    assert sorted(q["question"] for q in frame["inputs"]) == ["What is MLflow?", "What is a run?"]

    client = MlflowClient()
    client.set_dataset_tags(dataset.dataset_id, {"stage": "gold"})
    client.delete_dataset_tag(dataset.dataset_id, "team")
    tags = client.get_dataset(dataset.dataset_id).tags
    assert tags["stage"] == "gold" and "team" not in tags and tags["mlflow.user"] == "alice"

    found = search_datasets(experiment_ids=experiment.experiment_id)
    assert [d.dataset_id for d in found] == [dataset.dataset_id]

    other = client.create_experiment(_unique("other"))
    client.add_dataset_to_experiments(dataset.dataset_id, [other])
    assert sorted(_store().get_dataset_experiment_ids(dataset.dataset_id)) == sorted([experiment.experiment_id, other])
    client.remove_dataset_from_experiments(dataset.dataset_id, [experiment.experiment_id])
    assert _store().get_dataset_experiment_ids(dataset.dataset_id) == [other]
    with pytest.raises(RestException) as caught:  # the last link stays: it is what makes it acme's
        client.remove_dataset_from_experiments(dataset.dataset_id, [other])
    assert caught.value.error_code == "PERMISSION_DENIED"

    records = _upstream(stack, "GET", f"datasets/{dataset.dataset_id}/records").json()["records"]
    assert {record["created_by"] for record in json.loads(records)} == {"alice"}

    delete_dataset(dataset_id=dataset.dataset_id)
    assert _upstream(stack, "GET", f"datasets/{dataset.dataset_id}").status_code == 404


def test_datasets_in_experiment_zero_go_to_the_tenants_default(mlflow_as: MlflowAs, stack: DevStack) -> None:
    mlflow_as("acme")
    dataset = MlflowClient().create_dataset(name=_unique("d0"), experiment_id="0")
    (linked,) = dataset.experiment_ids
    assert linked != "0"
    name = httpx.get(f"{stack.mlflow_url}/api/2.0/mlflow/experiments/get", params={"experiment_id": linked})
    assert name.json()["experiment"]["name"] == "acme/Default"
    assert dataset.dataset_id in [d.dataset_id for d in MlflowClient().search_datasets(experiment_ids=["0"])]


def test_another_tenant_cannot_see_or_touch_datasets(
    mlflow_as: MlflowAs, gateway_url: str, token_factory: TokenFactory, stack: DevStack
) -> None:
    mlflow_as("acme")
    acme_exp = MlflowClient().create_experiment(_unique("private"))
    acme_dataset = create_dataset(name="secret", experiment_id=acme_exp, tags={"k": "v"})
    acme_dataset.merge_records([{"inputs": {"q": "acme-only"}}])

    mlflow_as("globex", "bob")
    client = MlflowClient()
    globex_exp = client.create_experiment(_unique("own"))
    globex_dataset = create_dataset(name="secret", experiment_id=globex_exp)

    # The stock client answers exactly as for a missing dataset.
    missing = f"d-{uuid.uuid4().hex}"
    dataset_calls: list[Callable[[str], object]] = [
        lambda dataset_id: client.get_dataset(dataset_id),
        lambda dataset_id: client.set_dataset_tags(dataset_id, {"pwned": "1"}),
        lambda dataset_id: client.delete_dataset_tag(dataset_id, "k"),
        lambda dataset_id: client.delete_dataset(dataset_id),
        lambda dataset_id: _store().get_dataset_experiment_ids(dataset_id),
        lambda dataset_id: client.add_dataset_to_experiments(dataset_id, [globex_exp]),
        lambda dataset_id: client.remove_dataset_from_experiments(dataset_id, [globex_exp]),
        lambda dataset_id: get_dataset(dataset_id=dataset_id).merge_records([{"inputs": {"q": "x"}}]),
    ]
    for call in dataset_calls:
        answers = []
        for dataset_id in (acme_dataset.dataset_id, missing):
            with pytest.raises(MlflowException) as caught:
                call(dataset_id)
            answers.append((caught.value.error_code, caught.value.message.replace(dataset_id, "<id>")))
        assert answers[0] == answers[1]
        assert answers[0][0] == "RESOURCE_DOES_NOT_EXIST"
    for experiment_call in (
        lambda: search_datasets(experiment_ids=[acme_exp]),
        lambda: search_datasets(experiment_ids=[globex_exp, acme_exp]),
        lambda: create_dataset(name="x", experiment_id=[globex_exp, acme_exp]),
        lambda: client.add_dataset_to_experiments(globex_dataset.dataset_id, [acme_exp]),
    ):
        with pytest.raises(MlflowException) as caught:
            experiment_call()
        assert caught.value.message.endswith(f"No Experiment with id={acme_exp} exists")
    assert [d.dataset_id for d in search_datasets(experiment_ids=globex_exp)] == [globex_dataset.dataset_id]

    # Byte for byte like a missing id on the raw routes too (GET records: MLflow itself would
    # answer an empty list for any id).
    headers = {"Authorization": f"Bearer {token_factory('globex', 'bob')}"}
    api = f"{gateway_url}/api/3.0/mlflow/datasets"
    for method, suffix, body in [
        ("GET", "", None),
        ("GET", "/records", None),
        ("DELETE", "/records", {"dataset_record_ids": ["dr-1"]}),
        ("POST", "/records", {"records": "[]"}),
        ("GET", "/experiment-ids", None),
    ]:
        foreign_response = httpx.request(method, f"{api}/{acme_dataset.dataset_id}{suffix}", headers=headers, json=body)
        missing_response = httpx.request(method, f"{api}/{missing}{suffix}", headers=headers, json=body)
        assert foreign_response.status_code == missing_response.status_code == 404, (method, suffix)
        assert missing_response.content == foreign_response.content.replace(
            acme_dataset.dataset_id.encode(), missing.encode()
        )
    upstream_missing = _upstream(stack, "GET", f"datasets/{missing}").json()
    gateway_missing = httpx.get(f"{api}/{missing}", headers=headers).json()
    assert {key: upstream_missing[key] for key in ("error_code", "message")} == gateway_missing

    # Nothing of acme's changed.
    upstream = _upstream(stack, "GET", f"datasets/{acme_dataset.dataset_id}").json()["dataset"]
    assert "pwned" not in json.loads(upstream["tags"]) and json.loads(upstream["tags"])["k"] == "v"
    ids = _upstream(stack, "GET", f"datasets/{acme_dataset.dataset_id}/experiment-ids").json()["experiment_ids"]
    assert ids == [acme_exp]
    records = _upstream(stack, "GET", f"datasets/{acme_dataset.dataset_id}/records").json()["records"]
    assert [record["inputs"] for record in json.loads(records)] == [{"q": "acme-only"}]


def test_unscoped_search_is_refused(mlflow_as: MlflowAs, stack: DevStack) -> None:
    """MLflow's search without experiment ids lists every tenant's datasets; the gateway refuses it."""
    mlflow_as("acme")
    acme = create_dataset(name=_unique("a"), experiment_id=MlflowClient().create_experiment(_unique("a")))
    mlflow_as("globex", "bob")
    create_dataset(name=_unique("g"), experiment_id=MlflowClient().create_experiment(_unique("g")))

    for call in (
        lambda: search_datasets(),
        lambda: MlflowClient().search_datasets(),
        lambda: MlflowClient().search_datasets(experiment_ids=[]),
        lambda: get_dataset(name=acme.name),  # the client looks names up with an unscoped search
    ):
        with pytest.raises(RestException) as caught:
            call()
        assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    # Directly upstream, the same search returns both tenants' datasets (the test can fail).
    everything = _upstream(stack, "POST", "datasets/search", json={}).json()["datasets"]
    assert acme.dataset_id in {dataset["dataset_id"] for dataset in everything}


def test_records_and_tags_are_protected(mlflow_as: MlflowAs, stack: DevStack) -> None:
    mlflow_as("globex", "bob")
    globex_exp = MlflowClient().create_experiment(_unique("g"))
    foreign_trace = _upstream_trace(stack, globex_exp)

    mlflow_as("acme", "alice")
    client = MlflowClient()
    acme_exp = client.create_experiment(_unique("a"))
    own_trace = _upstream_trace(stack, acme_exp)
    dataset = create_dataset(name="traced", experiment_id=acme_exp)

    def cite(trace_id: str) -> dict[str, Any]:
        return {"inputs": {"q": trace_id}, "source": {"source_type": "TRACE", "source_data": {"trace_id": trace_id}}}

    dataset.merge_records([cite(own_trace)])
    with pytest.raises(MlflowException) as caught:
        dataset.merge_records([cite(foreign_trace)])
    assert f"Trace with ID '{foreign_trace}' not found." in caught.value.message
    records = json.loads(_upstream(stack, "GET", f"datasets/{dataset.dataset_id}/records").json()["records"])
    assert [record["source_id"] for record in records] == [own_trace]

    for call in (
        lambda: create_dataset(name="x", experiment_id=acme_exp, tags={"matih.tenant_id": "globex"}),
        lambda: client.set_dataset_tags(dataset.dataset_id, {"matih.tenant_id": "globex"}),
        lambda: client.delete_dataset_tag(dataset.dataset_id, "matih.tenant_id"),
        lambda: dataset.merge_records([{"inputs": {"q": 1}, "tags": {"matih.user_id": "mallory"}}]),
    ):
        with pytest.raises(MlflowException) as caught:
            call()
        assert caught.value.error_code == "PERMISSION_DENIED", caught.value.message
    tags = json.loads(_upstream(stack, "GET", f"datasets/{dataset.dataset_id}").json()["dataset"]["tags"])
    assert tags["matih.tenant_id"] == "acme"


def test_search_pages_and_the_get_form_is_scoped(
    mlflow_as: MlflowAs, gateway_url: str, token_factory: TokenFactory
) -> None:
    mlflow_as("acme")
    client = MlflowClient()
    first, second = client.create_experiment(_unique("p1")), client.create_experiment(_unique("p2"))
    created = {
        create_dataset(name=f"page-{i}", experiment_id=exp).dataset_id for i, exp in enumerate([first, second] * 2)
    }
    mlflow_as("globex", "bob")
    create_dataset(name="page-x", experiment_id=MlflowClient().create_experiment(_unique("p3")))

    mlflow_as("acme")
    page = MlflowClient().search_datasets(experiment_ids=[second, first], max_results=3)
    assert len(page) == 3 and page.token
    rest = MlflowClient().search_datasets(experiment_ids=[second, first], max_results=3, page_token=page.token)
    assert not rest.token
    assert {d.dataset_id for d in [*page, *rest]} == created

    headers = {"Authorization": f"Bearer {token_factory('acme')}"}
    response = httpx.get(
        f"{gateway_url}/api/3.0/mlflow/datasets/search", headers=headers, params={"experiment_ids": [first, second]}
    )
    assert response.status_code == 200, response.text
    assert {d["dataset_id"] for d in response.json()["datasets"]} == created
