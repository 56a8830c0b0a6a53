"""Logged models: every model id must be owned (through its experiment), models are created with
provenance, ``matih.*`` is reserved, and searches are scoped to the caller's experiments.

A foreign model must be answered exactly like a missing one, and a refused request must never be
forwarded (only the gateway's read-only ownership look-ups may reach MLflow).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
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
    Reply,
    assert_mlflow_error,
    mlflow_error,
)
from tests.factories import bearer

MODELS = f"{API}/logged-models"


def _missing_model() -> str:
    return f"m-{uuid.uuid4().hex}"


@pytest.fixture
def models(fake: FakeUpstream) -> Iterator[FakeUpstream]:
    """The fake MLflow, answering the logged-model writes and searches like MLflow does."""

    def create(request: Received) -> Reply:
        body = request.json()
        experiment_id = body["experiment_id"]
        if experiment_id not in fake.state.experiments:
            return mlflow_error(404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={experiment_id} exists")
        model_id = _missing_model()
        fake.state.logged_models[model_id] = experiment_id
        info = {"model_id": model_id, "experiment_id": experiment_id, "tags": body.get("tags", [])}
        return Reply(200, {"model": {"info": info}})

    def model_write(request: Received) -> Reply:
        model_id = request.path.split("/")[5]
        if model_id not in fake.state.logged_models:
            return mlflow_error(404, "RESOURCE_DOES_NOT_EXIST", f"Logged model with ID '{model_id}' not found.")
        return Reply(200, {})

    def search(request: Received) -> Reply:
        wanted = request.json().get("experiment_ids", [])
        found = [
            {"info": {"model_id": model_id, "experiment_id": experiment_id}}
            for model_id, experiment_id in fake.state.logged_models.items()
            if experiment_id in wanted
        ]
        return Reply(200, {"models": found})

    for prefix in (API, AJAX):
        base = re.escape(f"{prefix}/logged-models")
        fake.on("POST", f"{prefix}/logged-models", create)
        fake.on("POST", f"{prefix}/logged-models/search", search)
        fake.on("PATCH", rf"{base}/[^/]+(/tags)?", model_write, regex=True)
        fake.on("DELETE", rf"{base}/[^/]+(/tags/.+)?", model_write, regex=True)
        fake.on("POST", rf"{base}/[^/]+/params", model_write, regex=True)
        fake.on("GET", rf"{base}/[^/]+/artifacts/directories", Reply(200, {"root_uri": "x", "files": []}), regex=True)
    yield fake


def _own_and_foreign(fake: FakeUpstream) -> tuple[str, str, str]:
    """(acme experiment, acme model, globex model)."""
    experiment = fake.add_experiment("acme", "models")
    return experiment, fake.add_logged_model(experiment), fake.add_logged_model(fake.add_experiment("globex", "v"))


def _tags(request: Received) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in request.json()["tags"]}


# -- create ------------------------------------------------------------------------------------------------


def test_create_stamps_provenance_and_checks_the_source_run(client: httpx.Client, models: FakeUpstream) -> None:
    experiment = models.add_experiment("acme", "models")
    run = models.add_run(experiment)
    response = client.post(
        MODELS,
        headers=bearer("acme", "alice", job="job-9"),
        json={
            "experimentId": experiment,
            "name": "clf",
            "sourceRunId": run,
            "tags": [{"key": "mlflow.user", "value": "mallory"}, {"key": "team", "value": "ds"}],
            "params": [{"key": "lr", "value": "0.1"}],
        },
    )
    assert response.status_code == 200, response.text
    (forwarded,) = models.forwarded()
    body = forwarded.json()
    assert (body["experiment_id"], body["source_run_id"], body["name"]) == (experiment, run, "clf")
    assert body["params"] == [{"key": "lr", "value": "0.1"}]
    assert _tags(forwarded) == {
        "team": "ds",
        "mlflow.user": "alice",
        "matih.tenant_id": "acme",
        "matih.user_id": "alice",
        "matih.job_id": "job-9",
    }

    # The create response primed the model -> experiment cache: no look-up for the new model.
    model_id = response.json()["model"]["info"]["model_id"]
    models.requests.clear()
    assert client.get(f"{MODELS}/{model_id}", headers=ACME).status_code == 200
    assert models.lookups() == []


def test_create_in_experiment_zero_uses_the_tenants_default(
    start_gateway: Callable[..., GatewayUnderTest], models: FakeUpstream
) -> None:
    gateway = start_gateway()
    default = models.add_experiment("acme", "Default")
    response = gateway.client.post(MODELS, headers=ACME, json={"experiment_id": "0"})
    assert response.status_code == 200, response.text
    assert models.forwarded()[0].json()["experiment_id"] == default


@pytest.mark.parametrize("key", ["matih.tenant_id", "matih.user_id", "MATIH.job_id", " matih.x"])
def test_create_refuses_reserved_tags(client: httpx.Client, models: FakeUpstream, key: str) -> None:
    experiment = models.add_experiment("acme", "models")
    response = client.post(MODELS, headers=ACME, json={"experiment_id": experiment, "tags": [{"key": key}]})
    assert_mlflow_error(response, 403, "PERMISSION_DENIED")
    models.assert_untouched()


def test_create_in_a_foreign_experiment_is_404(client: httpx.Client, models: FakeUpstream) -> None:
    foreign = models.add_experiment("globex", "victim")
    response = client.post(MODELS, headers=ACME, json={"experiment_id": foreign})
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={foreign} exists")
    assert models.calls("POST", "/logged-models") == []


def test_create_from_a_foreign_run_is_404(client: httpx.Client, models: FakeUpstream) -> None:
    experiment = models.add_experiment("acme", "models")
    foreign_run = models.add_run(models.add_experiment("globex", "victim"))
    response = client.post(MODELS, headers=ACME, json={"experiment_id": experiment, "source_run_id": foreign_run})
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"Run with id={foreign_run} not found")
    assert models.forwarded() == []


@pytest.mark.parametrize("source_run_id", [1, ["r"], {"id": "r"}])
def test_create_needs_a_string_source_run(client: httpx.Client, models: FakeUpstream, source_run_id: Any) -> None:
    experiment = models.add_experiment("acme", "models")
    response = client.post(MODELS, headers=ACME, json={"experiment_id": experiment, "source_run_id": source_run_id})
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    assert models.forwarded() == []


# -- routes naming a model id ------------------------------------------------------------------------------

MODEL_ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "", None),
    ("PATCH", "", {"status": "LOGGED_MODEL_READY"}),
    ("DELETE", "", {}),
    ("PATCH", "/tags", {"tags": [{"key": "k", "value": "v"}]}),
    ("DELETE", "/tags/k", None),
    ("POST", "/params", {"params": [{"key": "p", "value": "1"}]}),
    ("GET", "/artifacts/directories", None),
]
ROUTE_IDS = [f"{method} {suffix or '/'}" for method, suffix, _ in MODEL_ROUTES]


@pytest.mark.parametrize(("method", "suffix", "body"), MODEL_ROUTES, ids=ROUTE_IDS)
def test_own_model_routes_are_forwarded(
    client: httpx.Client, models: FakeUpstream, method: str, suffix: str, body: dict[str, Any] | None
) -> None:
    _, own, _ = _own_and_foreign(models)
    response = client.request(method, f"{MODELS}/{own}{suffix}", headers=ACME, json=body)
    assert response.status_code == 200, response.text
    (forwarded,) = models.forwarded()
    assert (forwarded.method, forwarded.path) == (method, f"{MODELS}/{own}{suffix}")
    if body is not None:
        assert forwarded.json()["model_id"] == own  # the path's id, which was checked


@pytest.mark.parametrize("prefix", [API, AJAX])
@pytest.mark.parametrize(("method", "suffix", "body"), MODEL_ROUTES, ids=ROUTE_IDS)
def test_foreign_model_is_indistinguishable_from_a_missing_one(
    client: httpx.Client, models: FakeUpstream, prefix: str, method: str, suffix: str, body: dict[str, Any] | None
) -> None:
    _, _, foreign = _own_and_foreign(models)
    missing = _missing_model()
    foreign_response = client.request(method, f"{prefix}/logged-models/{foreign}{suffix}", headers=ACME, json=body)
    missing_response = client.request(method, f"{prefix}/logged-models/{missing}{suffix}", headers=ACME, json=body)
    assert_mlflow_error(
        foreign_response, 404, "RESOURCE_DOES_NOT_EXIST", f"Logged model with ID '{foreign}' not found."
    )
    assert missing_response.status_code == 404
    assert missing_response.content == foreign_response.content.replace(foreign.encode(), missing.encode())
    assert models.forwarded() == []


def test_model_lookup_finds_deleted_models(client: httpx.Client, models: FakeUpstream) -> None:
    _, own, _ = _own_and_foreign(models)
    response = client.get(f"{MODELS}/{own}", params={"allow_deleted": "true"}, headers=ACME)
    assert response.status_code == 200, response.text
    (lookup,) = models.lookups("GET", own)
    assert lookup.query == {"allow_deleted": ["true"]}
    assert models.forwarded()[0].query == {"allow_deleted": ["true"]}


@pytest.mark.parametrize("method", ["PATCH", "DELETE"])
def test_a_body_naming_another_model_is_400(client: httpx.Client, models: FakeUpstream, method: str) -> None:
    """Finalize acts on the BODY's model_id: a body naming a foreign model behind an owned path is refused."""
    _, own, foreign = _own_and_foreign(models)
    response = client.request(method, f"{MODELS}/{own}", headers=ACME, json={"model_id": foreign, "status": 2})
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    models.assert_untouched()


def test_finalize_without_a_body_id_gets_the_paths(client: httpx.Client, models: FakeUpstream) -> None:
    _, own, _ = _own_and_foreign(models)
    assert client.patch(f"{MODELS}/{own}", headers=ACME, json={"status": 2}).status_code == 200
    assert models.forwarded()[0].json() == {"status": 2, "model_id": own}


@pytest.mark.parametrize("key", ["matih.tenant_id", "MATIH.user_id", "matih."])
def test_set_tags_refuses_reserved_keys(client: httpx.Client, models: FakeUpstream, key: str) -> None:
    _, own, _ = _own_and_foreign(models)
    response = client.patch(f"{MODELS}/{own}/tags", headers=ACME, json={"tags": [{"key": key, "value": "x"}]})
    assert_mlflow_error(response, 403, "PERMISSION_DENIED")
    models.assert_untouched()


@pytest.mark.parametrize("key", ["matih.tenant_id", "Matih.user_id", "%20matih.job_id"])
def test_delete_tag_refuses_reserved_keys(client: httpx.Client, models: FakeUpstream, key: str) -> None:
    _, own, _ = _own_and_foreign(models)
    response = client.delete(f"{MODELS}/{own}/tags/{key}", headers=ACME)
    assert_mlflow_error(response, 403, "PERMISSION_DENIED")
    models.assert_untouched()


@pytest.mark.parametrize("key", ["a%3Fmatih.x", "a%23b"])
def test_delete_tag_refuses_keys_the_url_cannot_carry(
    gateway: GatewayUnderTest, models: FakeUpstream, key: str
) -> None:
    _, own, _ = _own_and_foreign(models)
    response = gateway.raw("DELETE", f"{MODELS}/{own}/tags/{key}", headers={"Authorization": ACME["Authorization"]})
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    models.assert_untouched()


def test_malformed_model_ids_never_reach_mlflow(client: httpx.Client, models: FakeUpstream) -> None:
    for model_id in ["m-xyz", "m-" + "0" * 31, "M-" + "0" * 32, "..", "m-" + "0" * 32 + "x"]:
        response = client.get(f"{MODELS}/{model_id}", headers=ACME)
        assert response.status_code in (400, 403), (model_id, response.text)
    models.assert_untouched()


def test_viewer_reads_but_cannot_write(client: httpx.Client, models: FakeUpstream) -> None:
    experiment, own, _ = _own_and_foreign(models)
    viewer = bearer("acme", "vera", roles=["viewer"])
    assert client.get(f"{MODELS}/{own}", headers=viewer).status_code == 200
    assert client.get(f"{MODELS}/{own}/artifacts/directories", headers=viewer).status_code == 200
    assert client.post(f"{MODELS}/search", headers=viewer, json={"experiment_ids": [experiment]}).status_code == 200
    for method, suffix, body in [("POST", "", {"experiment_id": experiment}), ("DELETE", f"/{own}", {})]:
        response = client.request(method, f"{MODELS}{suffix}", headers=viewer, json=body)
        assert_mlflow_error(response, 403, "PERMISSION_DENIED")


# -- search -----------------------------------------------------------------------------------------------


def test_search_sends_owned_ids_sorted_and_unique(
    start_gateway: Callable[..., GatewayUnderTest], models: FakeUpstream
) -> None:
    gateway = start_gateway()
    default = models.add_experiment("acme", "Default")
    first, second = models.add_experiment("acme", "a"), models.add_experiment("acme", "b")
    models.add_logged_model(second)
    body = {"experiment_ids": [second, "0", first, second], "filter": "name = 'x'", "max_results": 5}
    response = gateway.client.post(f"{MODELS}/search", headers=ACME, json=body)
    assert response.status_code == 200, response.text
    (forwarded,) = models.forwarded()
    assert forwarded.json() == {**body, "experiment_ids": sorted({default, first, second}, key=int)}
    # Deterministic: the same request (the next page) sends the same list.
    gateway.client.post(f"{MODELS}/search", headers=ACME, json={**body, "page_token": "t"})
    assert models.forwarded()[1].json()["experiment_ids"] == forwarded.json()["experiment_ids"]


def test_search_with_a_foreign_experiment_is_404(client: httpx.Client, models: FakeUpstream) -> None:
    own = models.add_experiment("acme", "mine")
    foreign = models.add_experiment("globex", "victim")
    models.add_logged_model(foreign)
    response = client.post(f"{MODELS}/search", headers=ACME, json={"experiment_ids": [own, foreign]})
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={foreign} exists")
    assert models.forwarded() == []


@pytest.mark.parametrize("body", [{}, {"experiment_ids": []}, {"experiment_ids": None}, {"experiment_ids": "1"}])
def test_search_must_name_experiments(client: httpx.Client, models: FakeUpstream, body: dict[str, Any]) -> None:
    response = client.post(f"{MODELS}/search", headers=ACME, json=body)
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    models.assert_untouched()


def test_search_never_returns_another_tenants_models(client: httpx.Client, models: FakeUpstream) -> None:
    own = models.add_experiment("acme", "mine")
    own_model = models.add_logged_model(own)
    models.add_logged_model(models.add_experiment("globex", "victim"))
    response = client.post(f"{MODELS}/search", headers=ACME, json={"experimentIds": [own]})
    assert [model["info"]["model_id"] for model in response.json()["models"]] == [own_model]
    response = client.post(f"{MODELS}/search", headers=GLOBEX, json={"experiment_ids": [own]})
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST")
