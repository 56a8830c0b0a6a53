"""Experiments: names are prefixed upstream and stripped for the client; ids must be owned.

acme and globex share one MLflow. Another tenant's experiment must be indistinguishable from a
missing one, and a request that fails a check must not reach MLflow.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.app.conftest import ACME, AJAX, API, GLOBEX, FakeUpstream, GatewayUnderTest, Reply, assert_mlflow_error

TENANT_TAG = {"key": "matih.tenant_id", "value": "acme"}


def _volatile_free(headers: httpx.Headers) -> dict[str, str]:
    return {key: value for key, value in headers.items() if key not in ("date", "x-request-id")}


# -- create --------------------------------------------------------------------------------------------


def test_create_prefixes_the_name_and_tags_the_tenant(client: httpx.Client, fake: FakeUpstream) -> None:
    response = client.post(
        f"{API}/experiments/create", headers=ACME, json={"name": "churn", "tags": [{"key": "team", "value": "ds"}]}
    )
    assert response.status_code == 200, response.text
    experiment_id = response.json()["experiment_id"]
    assert fake.lookups() == []
    (forwarded,) = fake.forwarded()
    assert forwarded.json() == {"name": "acme/churn", "tags": [{"key": "team", "value": "ds"}, TENANT_TAG]}
    assert fake.state.experiments[experiment_id]["name"] == "acme/churn"


def test_create_for_another_tenant_lands_in_its_own_namespace(client: httpx.Client, fake: FakeUpstream) -> None:
    assert client.post(f"{API}/experiments/create", headers=GLOBEX, json={"name": "acme/churn"}).status_code == 200
    (forwarded,) = fake.forwarded()
    assert forwarded.json() == {"name": "globex/acme/churn", "tags": [{"key": "matih.tenant_id", "value": "globex"}]}


def test_created_experiment_is_owned_without_a_lookup(client: httpx.Client, fake: FakeUpstream) -> None:
    experiment_id = client.post(f"{API}/experiments/create", headers=ACME, json={"name": "primed"}).json()[
        "experiment_id"
    ]
    response = client.get(f"{API}/experiments/get", params={"experiment_id": experiment_id}, headers=ACME)
    assert response.status_code == 200
    assert response.json()["experiment"]["name"] == "primed"
    assert fake.lookups() == []  # the create response primed the ownership cache
    response = client.get(f"{API}/experiments/get", params={"experiment_id": experiment_id}, headers=GLOBEX)
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={experiment_id} exists")


@pytest.mark.parametrize("field", ["artifact_location", "artifactLocation"])
def test_create_refuses_an_artifact_location(client: httpx.Client, fake: FakeUpstream, field: str) -> None:
    response = client.post(f"{API}/experiments/create", headers=ACME, json={"name": "x", field: "mlflow-artifacts:/1"})
    body = assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    assert "artifact_location" in body["message"]
    fake.assert_untouched()


@pytest.mark.parametrize("key", ["matih.tenant_id", "matih.user_id", "MATIH.tenant_id", " matih.x", "matih."])
def test_create_refuses_reserved_tags(client: httpx.Client, fake: FakeUpstream, key: str) -> None:
    response = client.post(
        f"{API}/experiments/create", headers=ACME, json={"name": "x", "tags": [{"key": key, "value": "globex"}]}
    )
    body = assert_mlflow_error(response, 403, "PERMISSION_DENIED")
    assert "reserved" in body["message"]
    fake.assert_untouched()


@pytest.mark.parametrize("body", [{}, {"name": ""}, {"name": 7}, {"name": "x" * 501}, {"name": "x", "tags": "t"}])
def test_create_refuses_invalid_names_and_tags(
    client: httpx.Client, fake: FakeUpstream, body: dict[str, object]
) -> None:
    assert_mlflow_error(
        client.post(f"{API}/experiments/create", headers=ACME, json=body), 400, "INVALID_PARAMETER_VALUE"
    )
    fake.assert_untouched()


# -- get-by-name -----------------------------------------------------------------------------------------


def test_get_by_name_prefixes_the_query_and_strips_the_answer(client: httpx.Client, fake: FakeUpstream) -> None:
    experiment_id = fake.add_experiment("acme", "churn")
    response = client.get(f"{API}/experiments/get-by-name", params={"experiment_name": "churn"}, headers=ACME)
    assert response.status_code == 200, response.text
    experiment = response.json()["experiment"]
    assert experiment["experiment_id"] == experiment_id
    assert experiment["name"] == "churn"
    (forwarded,) = fake.forwarded()
    assert forwarded.query == {"experiment_name": ["acme/churn"]}


def test_get_by_name_cannot_reach_another_tenant(client: httpx.Client, fake: FakeUpstream) -> None:
    fake.add_experiment("globex", "secret")
    for name in ("secret", "globex/secret", "../globex/secret"):
        response = client.get(f"{API}/experiments/get-by-name", params={"experiment_name": name}, headers=ACME)
        assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"Could not find experiment with name '{name}'")
    assert [request.query["experiment_name"] for request in fake.forwarded()] == [
        ["acme/secret"],
        ["acme/globex/secret"],
        ["acme/../globex/secret"],
    ]


def test_get_by_name_refuses_a_repeated_name(client: httpx.Client, fake: FakeUpstream) -> None:
    response = client.get(
        f"{API}/experiments/get-by-name", params=[("experiment_name", "a"), ("experiment_name", "b")], headers=ACME
    )
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


# -- get ---------------------------------------------------------------------------------------------------


def test_get_own_experiment_strips_the_prefix(client: httpx.Client, fake: FakeUpstream) -> None:
    experiment_id = fake.add_experiment("acme", "churn")
    response = client.get(f"{API}/experiments/get", params={"experiment_id": experiment_id}, headers=ACME)
    assert response.status_code == 200, response.text
    assert response.json()["experiment"]["name"] == "churn"
    assert response.json()["experiment"]["tags"] == [TENANT_TAG]
    (lookup,) = fake.lookups()
    assert (lookup.path, lookup.query) == (f"{API}/experiments/get", {"experiment_id": [experiment_id]})


def test_foreign_experiment_is_indistinguishable_from_a_missing_one(client: httpx.Client, fake: FakeUpstream) -> None:
    foreign = fake.add_experiment("globex", "secret")
    missing = fake.new_experiment_id()

    foreign_response = client.get(f"{API}/experiments/get", params={"experiment_id": foreign}, headers=ACME)
    missing_response = client.get(f"{API}/experiments/get", params={"experiment_id": missing}, headers=ACME)

    # Exactly MLflow's own answer for a missing id.
    assert foreign_response.status_code == 404
    assert foreign_response.json() == {
        "error_code": "RESOURCE_DOES_NOT_EXIST",
        "message": f"No Experiment with id={foreign} exists",
    }
    assert missing_response.status_code == 404
    assert missing_response.content == foreign_response.content.replace(foreign.encode(), missing.encode())
    assert _volatile_free(missing_response.headers) == _volatile_free(foreign_response.headers)
    assert fake.forwarded() == []  # only the ownership look-ups reached MLflow


def test_unprefixed_experiments_belong_to_nobody(client: httpx.Client, fake: FakeUpstream) -> None:
    shared = fake.add_experiment(None, "Shared")  # e.g. created directly on the server
    response = client.get(f"{API}/experiments/get", params={"experiment_id": shared}, headers=ACME)
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={shared} exists")
    assert fake.forwarded() == []


def test_foreign_experiment_via_the_ajax_twin_is_404(client: httpx.Client, fake: FakeUpstream) -> None:
    foreign = fake.add_experiment("globex", "secret")
    response = client.get(f"{AJAX}/experiments/get", params={"experiment_id": foreign}, headers=ACME)
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={foreign} exists")
    assert fake.forwarded() == []


@pytest.mark.parametrize("experiment_id", ["abc", "-1", "1 OR 1=1", "1.0", "9" * 20])
def test_malformed_experiment_ids_are_not_looked_up(
    client: httpx.Client, fake: FakeUpstream, experiment_id: str
) -> None:
    response = client.get(f"{API}/experiments/get", params={"experiment_id": experiment_id}, headers=ACME)
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST")
    fake.assert_untouched()


def test_experiment_zero_is_the_tenants_own_default(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream
) -> None:
    gateway = start_gateway()
    global_default = fake.add_experiment(None, "Default", experiment_id="0")
    response = gateway.client.get(f"{API}/experiments/get", params={"experiment_id": "0"}, headers=ACME)
    assert response.status_code == 200, response.text
    experiment = response.json()["experiment"]
    assert experiment["name"] == "Default"
    assert experiment["experiment_id"] != global_default
    assert fake.state.experiments[experiment["experiment_id"]] == {"name": "acme/Default", "tags": [TENANT_TAG]}
    (forwarded,) = fake.forwarded()
    assert forwarded.query == {"experiment_id": [experiment["experiment_id"]]}


# -- writes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["experiments/set-experiment-tag", "experiments/delete-experiment-tag"])
def test_experiment_tags_in_the_reserved_namespace_are_403(
    client: httpx.Client, fake: FakeUpstream, route: str
) -> None:
    experiment_id = fake.add_experiment("acme", "mine")
    response = client.post(
        f"{API}/{route}", headers=ACME, json={"experiment_id": experiment_id, "key": "matih.tenant_id", "value": "x"}
    )
    assert_mlflow_error(response, 403, "PERMISSION_DENIED")
    assert fake.forwarded() == []


@pytest.mark.parametrize(
    "route", ["experiments/set-experiment-tag", "experiments/delete", "experiments/restore", "experiments/update"]
)
def test_writes_to_a_foreign_experiment_are_404(client: httpx.Client, fake: FakeUpstream, route: str) -> None:
    foreign = fake.add_experiment("globex", "secret")
    response = client.post(
        f"{API}/{route}", headers=ACME, json={"experiment_id": foreign, "key": "k", "value": "v", "new_name": "n"}
    )
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={foreign} exists")
    assert fake.forwarded() == []


def test_rename_keeps_the_tenant_prefix(client: httpx.Client, fake: FakeUpstream) -> None:
    experiment_id = fake.add_experiment("acme", "old")
    response = client.post(
        f"{API}/experiments/update", headers=ACME, json={"experiment_id": experiment_id, "new_name": "../globex/new"}
    )
    assert response.status_code == 200, response.text
    (forwarded,) = fake.forwarded()
    assert forwarded.json() == {"experiment_id": experiment_id, "new_name": "acme/../globex/new"}


def test_rename_error_messages_are_stripped(client: httpx.Client, fake: FakeUpstream) -> None:
    experiment_id = fake.add_experiment("acme", "old")
    fake.on(
        "POST",
        f"{API}/experiments/update",
        Reply(400, {"error_code": "RESOURCE_ALREADY_EXISTS", "message": "Experiment(name=acme/taken) already exists"}),
    )
    response = client.post(
        f"{API}/experiments/update", headers=ACME, json={"experiment_id": experiment_id, "new_name": "taken"}
    )
    assert_mlflow_error(response, 400, "RESOURCE_ALREADY_EXISTS", "Experiment(name=taken) already exists")
