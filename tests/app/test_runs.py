"""Runs: every run id must be owned, runs are created with provenance, ``matih.*`` is reserved.

A foreign run must be answered exactly like a missing one, and a refused write must never reach
MLflow (only the gateway's read-only ownership look-ups may).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.app.conftest import (
    ACME,
    AJAX,
    API,
    GLOBEX,
    FakeUpstream,
    GatewayUnderTest,
    Received,
    assert_mlflow_error,
)
from tests.factories import bearer


def _own_and_foreign(fake: FakeUpstream) -> tuple[str, str, str]:
    """(acme experiment, acme run, globex run)."""
    acme_experiment = fake.add_experiment("acme", "mine")
    return acme_experiment, fake.add_run(acme_experiment), fake.add_run(fake.add_experiment("globex", "victim"))


def _tags(request: Received) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in request.json()["tags"]}


# -- create ------------------------------------------------------------------------------------------------


def test_create_run_in_experiment_zero_uses_the_tenants_default(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream
) -> None:
    gateway = start_gateway()
    fake.add_experiment(None, "Default", experiment_id="0")
    response = gateway.client.post(f"{API}/runs/create", headers=ACME, json={"experiment_id": "0", "run_name": "r"})
    assert response.status_code == 200, response.text

    get_by_name, create = fake.lookups()
    assert (get_by_name.method, get_by_name.path) == ("GET", f"{API}/experiments/get-by-name")
    assert get_by_name.query == {"experiment_name": ["acme/Default"]}
    assert (create.method, create.path) == ("POST", f"{API}/experiments/create")
    assert create.json() == {"name": "acme/Default", "tags": [{"key": "matih.tenant_id", "value": "acme"}]}
    default_id = next(i for i, e in fake.state.experiments.items() if e["name"] == "acme/Default")

    (forwarded,) = fake.forwarded()
    assert forwarded.path == f"{API}/runs/create"
    assert forwarded.json()["experiment_id"] == default_id
    assert response.json()["run"]["info"]["experiment_id"] == default_id

    # Cached: the next run in "0" makes no look-up; globex gets its own Default.
    fake.requests.clear()
    assert gateway.client.post(f"{API}/runs/create", headers=ACME, json={"experiment_id": 0}).status_code == 200
    assert fake.lookups() == []
    assert fake.forwarded()[0].json()["experiment_id"] == default_id
    assert gateway.client.post(f"{API}/runs/create", headers=GLOBEX, json={"experiment_id": "0"}).status_code == 200
    globex_default = fake.forwarded()[-1].json()["experiment_id"]
    assert globex_default != default_id
    assert fake.state.experiments[globex_default]["name"] == "globex/Default"


def test_existing_tenant_default_is_reused(start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream) -> None:
    gateway = start_gateway()
    default_id = fake.add_experiment("acme", "Default")
    assert gateway.client.post(f"{API}/runs/create", headers=ACME, json={"experimentId": "0"}).status_code == 200
    assert [(r.method, r.path) for r in fake.lookups()] == [("GET", f"{API}/experiments/get-by-name")]
    assert fake.forwarded()[0].json()["experiment_id"] == default_id


def test_create_run_stamps_provenance_over_client_values(client: httpx.Client, fake: FakeUpstream) -> None:
    experiment_id = fake.add_experiment("acme", "mine")
    response = client.post(
        f"{API}/runs/create",
        headers=bearer("acme", "alice", job="job-42"),
        json={
            "experiment_id": experiment_id,
            "user_id": "mallory",
            "tags": [{"key": "mlflow.user", "value": "mallory"}, {"key": "team", "value": "ds"}],
        },
    )
    assert response.status_code == 200, response.text
    (forwarded,) = fake.forwarded()
    body = forwarded.json()
    assert body["user_id"] == "alice"
    assert _tags(forwarded) == {
        "team": "ds",
        "mlflow.user": "alice",
        "matih.tenant_id": "acme",
        "matih.user_id": "alice",
        "matih.job_id": "job-42",
    }
    assert [tag["key"] for tag in body["tags"]].count("mlflow.user") == 1


def test_create_run_without_a_job_has_no_job_tag(client: httpx.Client, fake: FakeUpstream) -> None:
    experiment_id = fake.add_experiment("acme", "mine")
    assert client.post(f"{API}/runs/create", headers=ACME, json={"experimentId": experiment_id, "userId": "x"})
    (forwarded,) = fake.forwarded()
    assert forwarded.json()["user_id"] == "alice"
    assert "userId" not in forwarded.json()
    assert _tags(forwarded) == {"mlflow.user": "alice", "matih.tenant_id": "acme", "matih.user_id": "alice"}


@pytest.mark.parametrize("key", ["matih.tenant_id", "matih.user_id", "matih.job_id", "Matih.Anything"])
def test_create_run_refuses_reserved_tags(client: httpx.Client, fake: FakeUpstream, key: str) -> None:
    experiment_id = fake.add_experiment("acme", "mine")
    response = client.post(
        f"{API}/runs/create", headers=ACME, json={"experiment_id": experiment_id, "tags": [{"key": key, "value": "x"}]}
    )
    assert_mlflow_error(response, 403, "PERMISSION_DENIED")
    assert fake.forwarded() == []
    assert fake.calls("POST", "runs/create") == []


def test_create_run_in_a_foreign_experiment_is_404(client: httpx.Client, fake: FakeUpstream) -> None:
    foreign = fake.add_experiment("globex", "victim")
    response = client.post(f"{API}/runs/create", headers=ACME, json={"experiment_id": foreign})
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={foreign} exists")
    assert fake.calls("POST", "runs/create") == []


@pytest.mark.parametrize("experiment_id", [None, "", True, 1.5, ["1"], {"id": "1"}])
def test_create_run_needs_a_valid_experiment_id(client: httpx.Client, fake: FakeUpstream, experiment_id: Any) -> None:
    response = client.post(f"{API}/runs/create", headers=ACME, json={"experiment_id": experiment_id})
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


@pytest.mark.parametrize("route", ["runs/create", "experiments/create"])
def test_unhashable_tag_keys_are_400(client: httpx.Client, fake: FakeUpstream, route: str) -> None:
    experiment_id = fake.add_experiment("acme", "mine")
    response = client.post(
        f"{API}/{route}",
        headers=ACME,
        json={"experiment_id": experiment_id, "name": "n", "tags": [{"key": ["matih.tenant_id"], "value": "x"}]},
    )
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    assert fake.forwarded() == []


# -- reads and writes of existing runs ----------------------------------------------------------------------

RUN_WRITES: list[tuple[str, dict[str, Any]]] = [
    ("runs/log-batch", {"metrics": [{"key": "m", "value": 1, "timestamp": 1, "step": 0}]}),
    ("runs/set-tag", {"key": "k", "value": "v"}),
    ("runs/delete-tag", {"key": "k"}),
    ("runs/log-metric", {"key": "m", "value": 1, "timestamp": 1}),
    ("runs/log-parameter", {"key": "p", "value": "1"}),
    ("runs/update", {"status": "FINISHED"}),
    ("runs/delete", {}),
    ("runs/restore", {}),
    ("runs/log-inputs", {"datasets": []}),
]


def test_get_own_run(client: httpx.Client, fake: FakeUpstream) -> None:
    _, own, _ = _own_and_foreign(fake)
    response = client.get(f"{API}/runs/get", params={"run_id": own}, headers=ACME)
    assert response.status_code == 200, response.text
    assert response.json()["run"]["info"]["run_id"] == own
    (forwarded,) = fake.forwarded()
    assert forwarded.query == {"run_id": [own]}


@pytest.mark.parametrize("prefix", [API, AJAX])
def test_foreign_run_is_indistinguishable_from_a_missing_one(
    client: httpx.Client, fake: FakeUpstream, prefix: str
) -> None:
    _, _, foreign = _own_and_foreign(fake)
    missing = "0123456789abcdef0123456789abcdef"
    foreign_response = client.get(f"{prefix}/runs/get", params={"run_id": foreign}, headers=ACME)
    missing_response = client.get(f"{prefix}/runs/get", params={"run_id": missing}, headers=ACME)
    assert foreign_response.status_code == missing_response.status_code == 404
    assert foreign_response.json() == {
        "error_code": "RESOURCE_DOES_NOT_EXIST",
        "message": f"Run with id={foreign} not found",
    }
    assert missing_response.content == foreign_response.content.replace(foreign.encode(), missing.encode())
    assert fake.forwarded() == []


@pytest.mark.parametrize(("route", "extra"), RUN_WRITES, ids=[route for route, _ in RUN_WRITES])
def test_writes_to_a_foreign_run_are_404_and_never_forwarded(
    client: httpx.Client, fake: FakeUpstream, route: str, extra: dict[str, Any]
) -> None:
    _, _, foreign = _own_and_foreign(fake)
    missing = "fedcba9876543210fedcba9876543210"
    response = client.post(f"{API}/{route}", headers=ACME, json={"run_id": foreign, **extra})
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"Run with id={foreign} not found")
    missing_response = client.post(f"{API}/{route}", headers=ACME, json={"run_id": missing, **extra})
    assert_mlflow_error(missing_response, 404, "RESOURCE_DOES_NOT_EXIST", f"Run with id={missing} not found")
    assert fake.forwarded() == []
    assert {request.path for request in fake.requests} <= {f"{API}/runs/get", f"{API}/experiments/get"}


@pytest.mark.parametrize(("route", "extra"), RUN_WRITES, ids=[route for route, _ in RUN_WRITES])
def test_writes_to_an_own_run_are_forwarded(
    client: httpx.Client, fake: FakeUpstream, route: str, extra: dict[str, Any]
) -> None:
    _, own, _ = _own_and_foreign(fake)
    response = client.post(f"{API}/{route}", headers=ACME, json={"run_id": own, **extra})
    assert response.status_code == 200, response.text
    (forwarded,) = fake.forwarded()
    assert forwarded.path == f"{API}/{route}"
    assert forwarded.json() == {"run_id": own, **extra}


def test_log_batch_refuses_reserved_tags(client: httpx.Client, fake: FakeUpstream) -> None:
    _, own, _ = _own_and_foreign(fake)
    response = client.post(
        f"{API}/runs/log-batch",
        headers=ACME,
        json={"run_id": own, "tags": [{"key": "team", "value": "x"}, {"key": "matih.user_id", "value": "bob"}]},
    )
    assert_mlflow_error(response, 403, "PERMISSION_DENIED")
    assert fake.forwarded() == []


@pytest.mark.parametrize("route", ["runs/set-tag", "runs/delete-tag"])
@pytest.mark.parametrize("key", ["matih.tenant_id", "MATIH.job_id", "matih.anything"])
def test_single_tag_writes_refuse_reserved_keys(client: httpx.Client, fake: FakeUpstream, route: str, key: str) -> None:
    _, own, _ = _own_and_foreign(fake)
    response = client.post(f"{API}/{route}", headers=ACME, json={"run_id": own, "key": key, "value": "x"})
    assert_mlflow_error(response, 403, "PERMISSION_DENIED")
    assert fake.forwarded() == []


@pytest.mark.parametrize("run_id", ["../x", "a b", "-abc", "x" * 300])
def test_malformed_run_ids_are_not_looked_up(client: httpx.Client, fake: FakeUpstream, run_id: str) -> None:
    response = client.get(f"{API}/runs/get", params={"run_id": run_id}, headers=ACME)
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"Run with id={run_id} not found")
    fake.assert_untouched()


def test_metric_history_of_a_foreign_run_is_404(client: httpx.Client, fake: FakeUpstream) -> None:
    _, own, foreign = _own_and_foreign(fake)
    response = client.get(f"{API}/metrics/get-history", params={"run_id": foreign, "metric_key": "m"}, headers=ACME)
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"Run with id={foreign} not found")
    response = client.get(
        f"{API}/metrics/get-history-bulk-interval",
        params=[("run_ids", own), ("run_ids", foreign), ("metric_key", "m")],
        headers=ACME,
    )
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"Run with id={foreign} not found")
    assert fake.forwarded() == []


# -- search --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["experiment_ids", "experimentIds"])
def test_search_with_a_foreign_experiment_is_404_and_never_forwarded(
    client: httpx.Client, fake: FakeUpstream, field: str
) -> None:
    own_experiment, _, _ = _own_and_foreign(fake)
    foreign = fake.add_experiment("globex", "other")
    for ids in ([foreign], [own_experiment, foreign]):
        response = client.post(f"{API}/runs/search", headers=ACME, json={field: ids})
        assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={foreign} exists")
    assert fake.calls("POST", "runs/search") == []


def test_search_own_experiments_is_forwarded_deduplicated(client: httpx.Client, fake: FakeUpstream) -> None:
    own_experiment, own_run, _ = _own_and_foreign(fake)
    response = client.post(
        f"{API}/runs/search",
        headers=ACME,
        json={"experimentIds": [own_experiment, int(own_experiment), own_experiment]},
    )
    assert response.status_code == 200, response.text
    assert [run["info"]["run_id"] for run in response.json()["runs"]] == [own_run]
    (forwarded,) = fake.forwarded()
    assert forwarded.json() == {"experiment_ids": [own_experiment]}


@pytest.mark.parametrize("ids", ["1", [None], [["1"]], [True]])
def test_search_refuses_malformed_experiment_ids(client: httpx.Client, fake: FakeUpstream, ids: Any) -> None:
    response = client.post(f"{API}/runs/search", headers=ACME, json={"experiment_ids": ids})
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


# -- ownership is cached ---------------------------------------------------------------------------------------


def test_run_ownership_is_looked_up_once(client: httpx.Client, fake: FakeUpstream) -> None:
    _, own, _ = _own_and_foreign(fake)
    for _ in range(3):
        assert client.get(f"{API}/runs/get", params={"run_id": own}, headers=ACME).status_code == 200
    assert client.post(f"{API}/runs/set-tag", headers=ACME, json={"run_id": own, "key": "k", "value": "v"})
    assert [(r.method, r.path) for r in fake.lookups()] == [
        ("GET", f"{API}/runs/get"),
        ("GET", f"{API}/experiments/get"),
    ]
    assert len(fake.forwarded("GET", "runs/get")) == 3


def test_foreign_ownership_is_cached_too(client: httpx.Client, fake: FakeUpstream) -> None:
    _, _, foreign = _own_and_foreign(fake)
    for _ in range(3):
        response = client.get(f"{API}/runs/get", params={"run_id": foreign}, headers=ACME)
        assert response.status_code == 404
    assert len(fake.lookups()) == 2
    # The owner still gets its run (the cache holds facts, not decisions).
    assert client.get(f"{API}/runs/get", params={"run_id": foreign}, headers=GLOBEX).status_code == 200
    assert len(fake.lookups()) == 2


def test_a_run_cached_by_its_owner_stays_missing_for_another_tenant(client: httpx.Client, fake: FakeUpstream) -> None:
    """Both facts cached by the owner's requests (the look-up-free path): another tenant still gets MLflow's 404."""
    _, _, foreign = _own_and_foreign(fake)
    tag = {"run_id": foreign, "key": "k", "value": "v"}
    for _ in range(2):
        assert client.get(f"{API}/runs/get", params={"run_id": foreign}, headers=GLOBEX).status_code == 200
        assert client.post(f"{API}/runs/set-tag", json=tag, headers=GLOBEX).status_code == 200
    not_found = f"Run with id={foreign} not found"
    for _ in range(2):
        response = client.get(f"{API}/runs/get", params={"run_id": foreign}, headers=ACME)
        assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", not_found)
        response = client.post(f"{API}/runs/set-tag", json=tag, headers=ACME)
        assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", not_found)
    assert len(fake.lookups()) == 2  # looked up once, for the owner's first request
    assert len(fake.forwarded("GET", "runs/get")) == len(fake.forwarded("POST", "runs/set-tag")) == 2  # the owner's


def test_created_run_is_owned_without_a_lookup(client: httpx.Client, fake: FakeUpstream) -> None:
    experiment_id = fake.add_experiment("acme", "mine")
    client.get(f"{API}/experiments/get", params={"experiment_id": experiment_id}, headers=ACME)
    run_id = client.post(f"{API}/runs/create", headers=ACME, json={"experiment_id": experiment_id}).json()["run"][
        "info"
    ]["run_id"]
    fake.requests.clear()
    assert client.get(f"{API}/runs/get", params={"run_id": run_id}, headers=ACME).status_code == 200
    assert fake.lookups() == []
    assert_mlflow_error(
        client.get(f"{API}/runs/get", params={"run_id": run_id}, headers=GLOBEX),
        404,
        "RESOURCE_DOES_NOT_EXIST",
        f"Run with id={run_id} not found",
    )


def test_a_missing_run_is_not_cached(client: httpx.Client, fake: FakeUpstream) -> None:
    experiment_id = fake.add_experiment("acme", "mine")
    run_id = uuid.uuid4().hex
    assert client.get(f"{API}/runs/get", params={"run_id": run_id}, headers=ACME).status_code == 404
    fake.add_run(experiment_id, run_id=run_id)  # created later (e.g. through another replica)
    assert client.get(f"{API}/runs/get", params={"run_id": run_id}, headers=ACME).status_code == 200


# -- logged models referenced from run writes ------------------------------------------------------------------


def _metric(model_field: str, model_id: str) -> dict[str, Any]:
    return {"key": "m", "value": 1.0, "timestamp": 1, "step": 0, model_field: model_id}


def test_log_batch_checks_metric_model_ids(client: httpx.Client, fake: FakeUpstream) -> None:
    own_experiment, own_run, _ = _own_and_foreign(fake)
    own_model = fake.add_logged_model(own_experiment)
    foreign_model = fake.add_logged_model(fake.add_experiment("globex", "models"))
    response = client.post(
        f"{API}/runs/log-batch", headers=ACME, json={"run_id": own_run, "metrics": [_metric("model_id", foreign_model)]}
    )
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"Logged model with ID '{foreign_model}' not found.")
    assert fake.forwarded() == []
    response = client.post(
        f"{API}/runs/log-batch", headers=ACME, json={"run_id": own_run, "metrics": [_metric("model_id", own_model)]}
    )
    assert response.status_code == 200, response.text
    assert len(fake.forwarded("POST", "runs/log-batch")) == 1


def test_log_metric_checks_its_model_id(client: httpx.Client, fake: FakeUpstream) -> None:
    _, own_run, _ = _own_and_foreign(fake)
    foreign_model = fake.add_logged_model(fake.add_experiment("globex", "models"))
    for field in ("model_id", "modelId"):
        response = client.post(
            f"{API}/runs/log-metric", headers=ACME, json={"run_id": own_run, **_metric(field, foreign_model)}
        )
        assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST")
    assert fake.forwarded() == []


def test_log_batch_checks_camel_case_metric_model_ids(client: httpx.Client, fake: FakeUpstream) -> None:
    _, own_run, _ = _own_and_foreign(fake)
    foreign_model = fake.add_logged_model(fake.add_experiment("globex", "models"))
    response = client.post(
        f"{API}/runs/log-batch", headers=ACME, json={"run_id": own_run, "metrics": [_metric("modelId", foreign_model)]}
    )
    assert response.status_code in (400, 404), response.text
    assert fake.forwarded() == []


@pytest.mark.parametrize("route", ["runs/log-inputs", "runs/outputs"])
def test_log_inputs_checks_camel_case_model_ids(client: httpx.Client, fake: FakeUpstream, route: str) -> None:
    _, own_run, _ = _own_and_foreign(fake)
    foreign_model = fake.add_logged_model(fake.add_experiment("globex", "models"))
    response = client.post(
        f"{API}/{route}", headers=ACME, json={"run_id": own_run, "models": [{"modelId": foreign_model}]}
    )
    assert response.status_code in (400, 404), response.text
    assert fake.forwarded() == []


def test_log_inputs_checks_snake_case_model_ids(client: httpx.Client, fake: FakeUpstream) -> None:
    _, own_run, _ = _own_and_foreign(fake)
    foreign_model = fake.add_logged_model(fake.add_experiment("globex", "models"))
    response = client.post(
        f"{API}/runs/log-inputs", headers=ACME, json={"run_id": own_run, "models": [{"model_id": foreign_model}]}
    )
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"Logged model with ID '{foreign_model}' not found.")
    assert fake.forwarded() == []


def test_search_without_experiment_ids_searches_nothing(client: httpx.Client, fake: FakeUpstream) -> None:
    _own_and_foreign(fake)
    response = client.post(f"{API}/runs/search", headers=ACME, json={"filter": "attributes.status = 'RUNNING'"})
    assert response.status_code == 200, response.text
    assert response.json() == {}
    (forwarded,) = fake.forwarded()
    # The filter is forwarded in the gateway's canonical form (tests/app/test_searches.py).
    assert forwarded.json() == {"filter": "status = 'RUNNING'", "experiment_ids": []}
