"""Logged models with the stock mlflow client, through the real gateway and a real MLflow server.

Only the logged-model APIs that upload no artifacts are used (artifact routes are another issue).
Each tenant sees only its own models; every id-addressed route answers another tenant's model like
a missing one; searches never include foreign models, and paging works across pages.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException, RestException

from gateway.dev import DevStack
from tests.integration.conftest import MlflowAs, TokenFactory


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _upstream_model(stack: DevStack, model_id: str, *, allow_deleted: bool = False) -> dict[str, Any]:
    """The model as MLflow holds it, read directly (not through the gateway)."""
    params = {"allow_deleted": "true"} if allow_deleted else {}
    response = httpx.get(f"{stack.mlflow_url}/api/2.0/mlflow/logged-models/{model_id}", params=params)
    assert response.status_code == 200, response.text
    info: dict[str, Any] = response.json()["model"]["info"]
    return info


def _tags(info: dict[str, Any]) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in info.get("tags", [])}


def test_stock_client_logged_model_lifecycle(mlflow_as: MlflowAs, stack: DevStack) -> None:
    mlflow_as("acme", "alice", job="train-1")
    experiment = mlflow.set_experiment(_unique("models"))
    with mlflow.start_run() as run:
        model = mlflow.initialize_logged_model(
            name="clf", source_run_id=run.info.run_id, tags={"team": "ds"}, params={"lr": "0.1"}
        )
    client = MlflowClient()
    assert model.experiment_id == experiment.experiment_id
    assert model.status == LoggedModelStatus.PENDING

    client.set_logged_model_tags(model.model_id, {"stage": "candidate", "drop": "me"})
    client.delete_logged_model_tag(model.model_id, "drop")
    client.log_model_params(model.model_id, {"depth": "3"})
    finalized = client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    assert finalized.status == LoggedModelStatus.READY

    fetched = client.get_logged_model(model.model_id)
    assert fetched.params == {"lr": "0.1", "depth": "3"}
    assert fetched.source_run_id == run.info.run_id
    assert (fetched.tags["team"], fetched.tags["stage"]) == ("ds", "candidate")
    assert "drop" not in fetched.tags
    assert fetched.tags["matih.tenant_id"] == "acme"
    assert fetched.tags["matih.user_id"] == "alice"
    assert fetched.tags["matih.job_id"] == "train-1"
    assert fetched.tags["mlflow.user"] == "alice"

    found = mlflow.search_logged_models(output_format="list")  # the active experiment
    assert [m.model_id for m in found] == [model.model_id]

    client.delete_logged_model(model.model_id)
    with pytest.raises(MlflowException) as caught:
        client.get_logged_model(model.model_id)
    assert caught.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    # The ownership look-up finds deleted models too, so the owner may still read it explicitly.
    assert mlflow.tracking._tracking_service.utils._get_store().get_logged_model(model.model_id, allow_deleted=True)
    assert _upstream_model(stack, model.model_id, allow_deleted=True)["model_id"] == model.model_id


def test_models_in_experiment_zero_go_to_the_tenants_default(mlflow_as: MlflowAs, stack: DevStack) -> None:
    mlflow_as("acme")
    model = MlflowClient().create_logged_model(experiment_id="0", name="default-model")
    assert model.experiment_id != "0"
    upstream_experiment = httpx.get(
        f"{stack.mlflow_url}/api/2.0/mlflow/experiments/get", params={"experiment_id": model.experiment_id}
    ).json()["experiment"]
    assert upstream_experiment["name"] == "acme/Default"
    found = MlflowClient().search_logged_models(experiment_ids=["0"], filter_string="name = 'default-model'")
    assert model.model_id in [m.model_id for m in found]


def test_search_pages_across_owned_experiments(mlflow_as: MlflowAs) -> None:
    mlflow_as("acme")
    client = MlflowClient()
    first, second = client.create_experiment(_unique("a")), client.create_experiment(_unique("b"))
    created = {
        client.create_logged_model(experiment_id=exp, name=f"m{i}").model_id
        for i, exp in enumerate([first, second] * 3)
    }

    # Unsorted with duplicates: the gateway sends the same sorted list on every page, so the page
    # token (which embeds it) validates.
    ids = [second, first, second]
    seen: list[str] = []
    page = client.search_logged_models(experiment_ids=ids, max_results=4)
    seen += [m.model_id for m in page]
    assert len(page) == 4 and page.token
    page = client.search_logged_models(experiment_ids=ids, max_results=4, page_token=page.token)
    seen += [m.model_id for m in page]
    assert not page.token
    assert sorted(seen) == sorted(created)
    # The fluent API pages internally.
    found = mlflow.search_logged_models(experiment_ids=[first, second], max_results=6, output_format="list")
    assert {m.model_id for m in found} == created


def test_another_tenant_cannot_see_or_touch_models(
    mlflow_as: MlflowAs, gateway_url: str, token_factory: TokenFactory, stack: DevStack
) -> None:
    mlflow_as("acme")
    acme_client = MlflowClient()
    acme_exp = acme_client.create_experiment(_unique("private"))
    acme_model = acme_client.create_logged_model(experiment_id=acme_exp, name="secret", tags={"k": "v"})

    mlflow_as("globex", "bob")
    client = MlflowClient()
    globex_exp = client.create_experiment(_unique("own"))
    globex_model = client.create_logged_model(experiment_id=globex_exp, name="mine")
    # The stock client answers exactly as for a missing model (some calls re-wrap the error).
    missing = f"m-{uuid.uuid4().hex}"
    model_calls: list[Callable[[str], object]] = [
        lambda model_id: client.get_logged_model(model_id),
        lambda model_id: client.set_logged_model_tags(model_id, {"pwned": "1"}),
        lambda model_id: client.delete_logged_model_tag(model_id, "k"),
        lambda model_id: client.log_model_params(model_id, {"p": "1"}),
        lambda model_id: client.finalize_logged_model(model_id, LoggedModelStatus.FAILED),
        lambda model_id: client.delete_logged_model(model_id),
    ]
    for call in model_calls:
        answers = []
        for model_id in (acme_model.model_id, missing):
            with pytest.raises(MlflowException) as caught:
                call(model_id)
            answers.append((caught.value.error_code, caught.value.message.replace(model_id, "<id>")))
        assert answers[0] == answers[1]
    for experiment_call in (
        lambda: client.search_logged_models(experiment_ids=[acme_exp]),
        lambda: client.search_logged_models(experiment_ids=[globex_exp, acme_exp]),
        lambda: client.create_logged_model(experiment_id=acme_exp),
    ):
        with pytest.raises(MlflowException) as caught:
            experiment_call()
        assert caught.value.error_code == "RESOURCE_DOES_NOT_EXIST", caught.value.message
        assert caught.value.message.endswith(f"No Experiment with id={acme_exp} exists")
    assert [m.model_id for m in client.search_logged_models(experiment_ids=[globex_exp])] == [globex_model.model_id]

    # Byte for byte like a missing id, on every route, with MLflow's own message.
    headers = {"Authorization": f"Bearer {token_factory('globex', 'bob')}"}
    api = f"{gateway_url}/api/2.0/mlflow/logged-models"
    for method, suffix, body in [
        ("GET", "", None),
        ("PATCH", "", {"status": "LOGGED_MODEL_READY"}),
        ("DELETE", "", {}),
        ("PATCH", "/tags", {"tags": []}),
        ("DELETE", "/tags/k", None),
        ("POST", "/params", {"params": []}),
        ("GET", "/artifacts/directories", None),
    ]:
        foreign_response = httpx.request(method, f"{api}/{acme_model.model_id}{suffix}", headers=headers, json=body)
        missing_response = httpx.request(method, f"{api}/{missing}{suffix}", headers=headers, json=body)
        assert foreign_response.status_code == missing_response.status_code == 404, (method, suffix)
        assert foreign_response.json() == {
            "error_code": "RESOURCE_DOES_NOT_EXIST",
            "message": f"Logged model with ID '{acme_model.model_id}' not found.",
        }
        assert missing_response.content == foreign_response.content.replace(
            acme_model.model_id.encode(), missing.encode()
        )
    # The real MLflow answers a missing id with the same message (checked directly upstream).
    upstream_missing = httpx.get(f"{stack.mlflow_url}/api/2.0/mlflow/logged-models/{missing}").json()
    gateway_missing = httpx.get(f"{api}/{missing}", headers=headers).json()
    assert {key: upstream_missing[key] for key in ("error_code", "message")} == gateway_missing

    info = _upstream_model(stack, acme_model.model_id)
    assert info["status"] == "LOGGED_MODEL_PENDING"  # neither finalized nor deleted
    assert _tags(info)["k"] == "v" and "pwned" not in _tags(info)


def test_finalize_cannot_be_redirected_by_the_body(
    mlflow_as: MlflowAs, gateway_url: str, token_factory: TokenFactory, stack: DevStack
) -> None:
    """MLflow's finalize acts on the body's model_id, not the path's: the gateway binds them."""
    mlflow_as("acme")
    victim = MlflowClient().create_logged_model(experiment_id=MlflowClient().create_experiment(_unique("v")))
    mlflow_as("globex", "bob")
    own = MlflowClient().create_logged_model(experiment_id=MlflowClient().create_experiment(_unique("o")))

    headers = {"Authorization": f"Bearer {token_factory('globex', 'bob')}"}
    failed = LoggedModelStatus.FAILED.to_proto()
    response = httpx.patch(
        f"{gateway_url}/api/2.0/mlflow/logged-models/{own.model_id}",
        headers=headers,
        json={"model_id": victim.model_id, "status": failed},
    )
    assert response.status_code == 400
    assert _upstream_model(stack, victim.model_id)["status"] == "LOGGED_MODEL_PENDING"
    # Without the gateway the same request would have finalized the victim (the test can fail).
    direct = httpx.patch(
        f"{stack.mlflow_url}/api/2.0/mlflow/logged-models/{own.model_id}",
        json={"model_id": victim.model_id, "status": failed},
    )
    assert direct.status_code == 200
    assert _upstream_model(stack, victim.model_id)["status"] == "LOGGED_MODEL_UPLOAD_FAILED"
    assert _upstream_model(stack, own.model_id)["status"] == "LOGGED_MODEL_PENDING"


def test_reserved_tags_and_source_runs_are_protected(mlflow_as: MlflowAs) -> None:
    mlflow_as("globex", "bob")
    foreign_run = MlflowClient().create_run(MlflowClient().create_experiment(_unique("r"))).info.run_id

    mlflow_as("acme", "alice")
    client = MlflowClient()
    experiment = client.create_experiment(_unique("tags"))
    model = client.create_logged_model(experiment_id=experiment, tags={"mlflow.user": "mallory"})
    assert model.tags["mlflow.user"] == "alice"
    for call in (
        lambda: client.create_logged_model(experiment_id=experiment, tags={"matih.tenant_id": "globex"}),
        lambda: client.set_logged_model_tags(model.model_id, {"matih.user_id": "mallory"}),
        lambda: client.set_logged_model_tags(model.model_id, {"MATIH.tenant_id": "globex"}),
        lambda: client.delete_logged_model_tag(model.model_id, "matih.tenant_id"),
    ):
        with pytest.raises(RestException) as caught:
            call()
        assert caught.value.error_code == "PERMISSION_DENIED"
    with pytest.raises(MlflowException) as caught:
        client.create_logged_model(experiment_id=experiment, source_run_id=foreign_run)
    assert caught.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert client.get_logged_model(model.model_id).tags["matih.tenant_id"] == "acme"


def test_listing_artifact_directories_of_own_model(
    mlflow_as: MlflowAs, gateway_url: str, token_factory: TokenFactory
) -> None:
    """The UI's listing route: MLflow lists inside the model's own artifact location."""
    mlflow_as("acme")
    model = MlflowClient().create_logged_model(experiment_id=MlflowClient().create_experiment(_unique("art")))
    headers = {"Authorization": f"Bearer {token_factory('acme')}"}
    url = f"{gateway_url}/api/2.0/mlflow/logged-models/{model.model_id}/artifacts/directories"
    response = httpx.get(url, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json().get("files", []) == []
    traversal = httpx.get(url, headers=headers, params={"artifact_directory_path": "../../.."})
    assert traversal.status_code == 400
