"""Searches through the gateway: the exact filter the upstream receives, and what the client gets back.

Experiment searches are scoped upstream by a rewritten filter (names prefixed, tenant clause
appended); run searches forward a canonical filter after checking every experiment id; refused
filters never reach MLflow.
"""

from __future__ import annotations

import logging
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
    Reply,
    assert_mlflow_error,
    mlflow_error,
)
from tests.factories import bearer


def experiment(experiment_id: str, name: str) -> dict[str, Any]:
    return {
        "experiment_id": experiment_id,
        "name": name,
        "artifact_location": f"mlflow-artifacts:/{experiment_id}",
        "lifecycle_stage": "active",
        "tags": [],
    }


def answer_search(fake: FakeUpstream, *experiments: dict[str, Any], token: str | None = None) -> None:
    body: dict[str, Any] = {"experiments": list(experiments)}
    if token:
        body["next_page_token"] = token
    for method in ("GET", "POST"):
        fake.on_mlflow(method, "experiments/search", Reply(200, body))


def only_forwarded(fake: FakeUpstream, route: str) -> Received:
    (request,) = fake.forwarded(route=route)
    return request


# -- experiments/search ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [API, AJAX])
def test_post_search_is_scoped_upstream(client: httpx.Client, fake: FakeUpstream, prefix: str) -> None:
    answer_search(fake, experiment("7001", "acme/x"), token="next")
    response = client.post(
        f"{prefix}/experiments/search",
        headers=ACME,
        json={
            "filter": "name = 'x' and tags.team LIKE 'r%'",
            "max_results": 3,
            "order_by": ["name desc", "attribute.creation_time"],
            "page_token": "tok",
            "view_type": "ALL",
            "not_a_field": True,
        },
    )
    assert response.status_code == 200, response.text
    forwarded = only_forwarded(fake, "experiments/search")
    assert forwarded.path == f"{prefix}/experiments/search"
    assert forwarded.json() == {
        "filter": "name = 'acme/x' AND tags.team LIKE 'r%' AND name LIKE 'acme/%'",
        "max_results": 3,
        "order_by": ["name DESC", "creation_time"],
        "page_token": "tok",
        "view_type": "ALL",
    }
    assert response.json() == {"experiments": [experiment("7001", "x")], "next_page_token": "next"}


def test_a_post_forwards_no_query_string(client: httpx.Client, fake: FakeUpstream) -> None:
    answer_search(fake)
    response = client.post(f"{API}/experiments/search?filter=name+LIKE+'%25'&max_results=1", headers=ACME, json={})
    assert response.status_code == 200, response.text
    forwarded = only_forwarded(fake, "experiments/search")
    assert forwarded.query_string == b""
    assert forwarded.json() == {"filter": "name LIKE 'acme/%'"}


def test_get_search_is_scoped_in_the_query(client: httpx.Client, fake: FakeUpstream) -> None:
    answer_search(fake, experiment("7002", "acme/a"), experiment("7003", "acme/b"))
    response = client.get(
        f"{AJAX}/experiments/search",
        headers=ACME,
        params=[
            ("filter", "name LIKE '%a'"),
            ("max_results", "2"),
            ("order_by", "name ASC"),
            ("order_by", "creation_time desc"),
            ("view_type", "ACTIVE_ONLY"),
            ("maxResults", "99"),
        ],
    )
    assert response.status_code == 200, response.text
    forwarded = only_forwarded(fake, "experiments/search")
    assert forwarded.method == "GET" and forwarded.body == b""
    assert forwarded.query == {
        "filter": ["name LIKE 'acme/%a' AND name LIKE 'acme/%'"],
        "max_results": ["2"],
        "order_by": ["name ASC", "creation_time DESC"],
        "view_type": ["ACTIVE_ONLY"],
    }
    assert [e["name"] for e in response.json()["experiments"]] == ["a", "b"]


@pytest.mark.parametrize(("headers", "tenant"), [(ACME, "acme"), (GLOBEX, "globex")])
def test_no_filter_still_lists_only_the_tenant(
    client: httpx.Client, fake: FakeUpstream, headers: dict[str, str], tenant: str
) -> None:
    answer_search(fake)
    assert client.post(f"{API}/experiments/search", headers=headers, json={"max_results": 10}).status_code == 200
    assert client.get(f"{API}/experiments/search", headers=headers, params={"max_results": "10"}).status_code == 200
    post, get = fake.forwarded(route="experiments/search")
    assert post.json() == {"filter": f"name LIKE '{tenant}/%'", "max_results": 10}
    assert get.query == {"filter": [f"name LIKE '{tenant}/%'"], "max_results": ["10"]}


def test_camel_case_fields_are_normalised(client: httpx.Client, fake: FakeUpstream) -> None:
    answer_search(fake)
    body = {"filter": "", "maxResults": 2, "pageToken": "t", "orderBy": ["name"], "viewType": 3}
    assert client.post(f"{API}/experiments/search", headers=ACME, json=body).status_code == 200
    assert only_forwarded(fake, "experiments/search").json() == {
        "filter": "name LIKE 'acme/%'",
        "max_results": 2,
        "page_token": "t",
        "order_by": ["name"],
        "view_type": 3,
    }


def test_listed_experiments_prime_the_ownership_cache(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream
) -> None:
    gateway = start_gateway()
    listed = fake.add_experiment("acme", "listed")
    answer_search(fake, experiment(listed, "acme/listed"))
    assert gateway.client.post(f"{API}/experiments/search", headers=ACME, json={"max_results": 5}).status_code == 200
    fake.requests.clear()
    response = gateway.client.get(f"{API}/experiments/get", headers=ACME, params={"experiment_id": listed})
    assert response.status_code == 200, response.text
    assert fake.lookups() == []  # the owner came from the search page
    assert response.json()["experiment"]["name"] == "listed"


@pytest.mark.parametrize("leaked", [experiment("7010", "globex/x"), experiment("0", "Default"), {"name": "acme/x"}])
def test_an_experiment_outside_the_scope_is_never_passed_on(
    client: httpx.Client, fake: FakeUpstream, caplog: pytest.LogCaptureFixture, leaked: dict[str, Any]
) -> None:
    answer_search(fake, experiment("7011", "acme/mine"), leaked)
    with caplog.at_level(logging.ERROR, logger="gateway.searches"):
        response = client.post(f"{API}/experiments/search", headers=ACME, json={"max_results": 5})
    body = assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST")
    assert "globex" not in body["message"] and "mine" not in response.text
    assert any("ALARM" in record.getMessage() for record in caplog.records)


ATTACKS = [
    "name = 'x' OR name LIKE '%'",
    "name = 'x' or 1 = 1",
    "name = 'x",
    "name = 'x\\' AND name LIKE '%'",
    "name = 'x' -- ",
    "name = 'x' /* */",
    "name = 'x'; SELECT 1",
    "(name LIKE '%')",
    "NOT name = 'x'",
    "name = 'x' AND",
    "name = 'x' name LIKE '%'",
    "name IN ('x')",
    "metrics.x > 1",
    "name like '%'",
    "   ",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_refused_filters_never_reach_mlflow(client: httpx.Client, fake: FakeUpstream, attack: str) -> None:
    response = client.post(f"{API}/experiments/search", headers=ACME, json={"filter": attack, "max_results": 5})
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    response = client.get(f"{AJAX}/experiments/search", headers=ACME, params={"filter": attack, "max_results": "5"})
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


@pytest.mark.parametrize(
    "body",
    [
        {"filter": 5},
        {"filter": ["name = 'x'"]},
        {"max_results": "abc"},
        {"max_results": True},
        {"order_by": "name"},
        {"order_by": ["tags.x"]},
        {"order_by": [" name"]},
        {"page_token": 5},
        {"view_type": ["ALL"]},
    ],
)
def test_malformed_fields_are_refused(client: httpx.Client, fake: FakeUpstream, body: dict[str, Any]) -> None:
    response = client.post(f"{API}/experiments/search", headers=ACME, json=body)
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


def test_repeated_scalar_query_parameters_are_refused(client: httpx.Client, fake: FakeUpstream) -> None:
    for query in ("filter=a&filter=b", "max_results=1&max_results=2"):
        assert_mlflow_error(
            client.get(f"{API}/experiments/search?{query}", headers=ACME), 400, "INVALID_PARAMETER_VALUE"
        )
    fake.assert_untouched()


def test_upstream_errors_do_not_show_the_prefix(client: httpx.Client, fake: FakeUpstream) -> None:
    fake.on_mlflow(
        "POST",
        "experiments/search",
        mlflow_error(400, "INVALID_PARAMETER_VALUE", "Invalid filter: name = 'acme/x' AND name LIKE 'acme/%'"),
    )
    response = client.post(f"{API}/experiments/search", headers=ACME, json={"filter": "name = 'x'"})
    body = assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    assert "acme/" not in body["message"]


def test_viewers_search(client: httpx.Client, fake: FakeUpstream) -> None:
    answer_search(fake)
    response = client.post(f"{API}/experiments/search", headers=bearer("acme", "vera", roles=["viewer"]), json={})
    assert response.status_code == 200, response.text


# -- runs/search -------------------------------------------------------------------------------------------


def test_run_search_forwards_the_canonical_filter(client: httpx.Client, fake: FakeUpstream) -> None:
    mine = fake.add_experiment("acme", "runs")
    fake.add_run(mine)
    response = client.post(
        f"{API}/runs/search",
        headers=ACME,
        json={
            "experimentIds": [mine, mine],
            "filter": "metric.loss < .5 and params.lr = \"0.01\" AND attributes.run_id IN ('a','b')",
            "orderBy": ["metrics.loss desc", "attributes.created"],
            "maxResults": "5",
            "pageToken": "p",
            "runViewType": "ALL",
            "extra": {"x": 1},
        },
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["runs"]) == 1
    assert only_forwarded(fake, "runs/search").json() == {
        "experiment_ids": [mine],
        "filter": "metrics.loss < .5 AND params.lr = '0.01' AND run_id IN ('a', 'b')",
        "order_by": ["metrics.loss DESC", "created"],
        "max_results": 5,
        "page_token": "p",
        "run_view_type": "ALL",
    }


def test_run_search_without_filter_forwards_none(client: httpx.Client, fake: FakeUpstream) -> None:
    mine = fake.add_experiment("acme", "runs")
    response = client.post(f"{API}/runs/search", headers=ACME, json={"experiment_ids": [mine], "filter": ""})
    assert response.status_code == 200, response.text
    assert only_forwarded(fake, "runs/search").json() == {"experiment_ids": [mine]}


@pytest.mark.parametrize(
    "body",
    [
        {"filter": "metrics.loss < 1 OR 1 = 1"},
        {"filter": "params.x = 'a' -- "},
        {"filter": "metrics.loss IS NULL"},
        {"filter": 5},
        {"order_by": ["metrics.a", "metrics.a DESC"]},
        {"order_by": ["dataset.name"]},
        {"max_results": 0},
        {"max_results": 50001},
        {"max_results": "many"},
    ],
)
def test_run_search_refusals_never_reach_mlflow(client: httpx.Client, fake: FakeUpstream, body: dict[str, Any]) -> None:
    mine = fake.add_experiment("acme", "runs")
    response = client.post(f"{API}/runs/search", headers=ACME, json={"experiment_ids": [mine], **body})
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


def test_run_search_in_a_foreign_experiment_is_a_missing_experiment(client: httpx.Client, fake: FakeUpstream) -> None:
    mine, theirs = fake.add_experiment("acme", "mine"), fake.add_experiment("globex", "theirs")
    fake.add_run(theirs)
    response = client.post(
        f"{API}/runs/search", headers=ACME, json={"experiment_ids": [mine, theirs], "filter": "metrics.x > 0"}
    )
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={theirs} exists")
    assert fake.forwarded() == []


# -- experiments/search-datasets (UI) ----------------------------------------------------------------------


def test_dataset_search_needs_owned_experiments(client: httpx.Client, fake: FakeUpstream) -> None:
    fake.on_mlflow("POST", "experiments/search-datasets", Reply(200, {"dataset_summaries": []}))
    mine, theirs = fake.add_experiment("acme", "d1"), fake.add_experiment("globex", "d2")
    ok = client.post(f"{AJAX}/experiments/search-datasets", headers=ACME, json={"experimentIds": [mine], "x": 1})
    assert ok.status_code == 200, ok.text
    assert only_forwarded(fake, "experiments/search-datasets").json() == {"experiment_ids": [mine]}
    fake.requests.clear()
    foreign = client.post(f"{AJAX}/experiments/search-datasets", headers=ACME, json={"experiment_ids": [mine, theirs]})
    assert_mlflow_error(foreign, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={theirs} exists")
    assert fake.forwarded() == []


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([], "SearchDatasets request must specify at least one experiment_id."),
        (None, "SearchDatasets request must specify at least one experiment_id."),
        ([str(i) for i in range(21)], "SearchDatasets request cannot specify more than 20 experiment_ids."),
    ],
)
def test_dataset_search_bounds(client: httpx.Client, fake: FakeUpstream, ids: list[str] | None, message: str) -> None:
    response = client.post(f"{AJAX}/experiments/search-datasets", headers=ACME, json={"experiment_ids": ids})
    assert message in assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")["message"]
    fake.assert_untouched()


def test_dataset_search_is_ui_only(client: httpx.Client, fake: FakeUpstream) -> None:
    response = client.post(f"{API}/experiments/search-datasets", headers=ACME, json={"experiment_ids": ["1"]})
    assert_mlflow_error(response, 403, "PERMISSION_DENIED")
    fake.assert_untouched()


# -- runs/create-promptlab-run (UI) -------------------------------------------------------------------------


def test_promptlab_runs_stay_denied(client: httpx.Client, fake: FakeUpstream) -> None:
    mine = fake.add_experiment("acme", "lab")
    response = client.post(f"{AJAX}/runs/create-promptlab-run", headers=ACME, json={"experiment_id": mine})
    body = assert_mlflow_error(response, 403, "PERMISSION_DENIED")
    assert "provenance tags" in body["message"]
    fake.assert_untouched()
