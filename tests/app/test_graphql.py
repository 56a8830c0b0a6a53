"""The UI's GraphQL endpoint through the gateway: what the upstream receives, and what comes back.

Every id of the UI's four queries is checked like its REST twin; the upstream only ever receives the
document printed from the checked AST with the checked input. Refused requests never reach MLflow's
``/graphql`` (only the gateway's read-only ownership look-ups may reach the upstream).
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from graphql import parse, print_ast

from tests.app.conftest import ACME, GLOBEX, FakeUpstream, GatewayUnderTest, Reply, assert_mlflow_error
from tests.factories import bearer
from tests.graphql_ui import BULK_INTERVAL, GET_EXPERIMENT, GET_RUN, SEARCH_RUNS, with_typenames

GRAPHQL = "/graphql"


def _post(
    client: httpx.Client, query: str, variables: Any = None, name: str | None = None, **kwargs: Any
) -> httpx.Response:
    headers = kwargs.pop("headers", ACME)
    body: dict[str, Any] = {"query": query, "variables": variables}
    if name is not None:
        body["operationName"] = name
    return client.post(GRAPHQL, headers=headers, json=body, **kwargs)


def _answer(fake: FakeUpstream, data: dict[str, Any], errors: list[Any] | None = None) -> None:
    fake.on("POST", GRAPHQL, Reply(200, {"data": data, "errors": errors}))


def _forwarded_graphql(fake: FakeUpstream) -> dict[str, Any]:
    (request,) = fake.forwarded("POST", GRAPHQL)
    assert request.header("content-type") == "application/json"
    assert request.query_string == b""
    body: dict[str, Any] = request.json()
    return body


def _printed(document: str) -> str:
    return print_ast(parse(document))


def _run_payload(experiment_id: str, experiment_name: str, run_id: str, *versions: str) -> dict[str, Any]:
    return {
        "info": {"runUuid": run_id, "experimentId": experiment_id, "__typename": "MlflowRunInfo"},
        "experiment": {"experimentId": experiment_id, "name": experiment_name, "__typename": "MlflowExperiment"},
        "modelVersions": [
            {
                "name": name,
                "version": "1",
                "source": "s3://bucket/key",
                "status": "READY",
                "__typename": "MlflowModelVersion",
            }
            for name in versions
        ],
        "__typename": "MlflowRunExtension",
    }


# -- GetRun ------------------------------------------------------------------------------------------------


def test_get_run_forwards_the_checked_document_and_strips_the_answer(
    gateway: GatewayUnderTest, fake: FakeUpstream
) -> None:
    experiment = fake.add_experiment("acme", "exp")
    run = fake.add_run(experiment)
    payload = _run_payload(experiment, "acme/exp", run, "acme.mine", "globex.evil", "legacy")
    _answer(fake, {"mlflowGetRun": {"apiError": None, "run": payload, "__typename": "MlflowGetRunResponse"}})
    document = with_typenames(GET_RUN)

    response = _post(gateway.client, document, {"data": {"runId": run}}, "GetRun")

    assert response.status_code == 200, response.text
    assert _forwarded_graphql(fake) == {
        "query": _printed(document),
        "variables": {"data": {"runId": run}},
        "operationName": "GetRun",
    }
    answer = response.json()["data"]["mlflowGetRun"]["run"]
    assert answer["experiment"]["name"] == "exp"
    assert [version["name"] for version in answer["modelVersions"]] == ["mine"]
    assert response.json()["errors"] is None


def test_get_run_of_another_tenant_is_answered_like_a_missing_run(
    gateway: GatewayUnderTest, fake: FakeUpstream
) -> None:
    foreign = fake.add_run(fake.add_experiment("globex", "victim"))
    missing = uuid.uuid4().hex
    _answer(fake, {"mlflowGetRun": None})

    refused = _post(gateway.client, GET_RUN, {"data": {"runId": foreign}}, "GetRun")
    absent = _post(gateway.client, GET_RUN, {"data": {"runId": missing}}, "GetRun")

    assert_mlflow_error(refused, 404, "RESOURCE_DOES_NOT_EXIST", f"Run with id={foreign} not found")
    assert_mlflow_error(absent, 404, "RESOURCE_DOES_NOT_EXIST", f"Run with id={missing} not found")
    assert fake.forwarded("POST", GRAPHQL) == []


def test_a_foreign_run_uuid_beside_an_own_run_id_is_refused(gateway: GatewayUnderTest, fake: FakeUpstream) -> None:
    own = fake.add_run(fake.add_experiment("acme", "exp"))
    foreign = fake.add_run(fake.add_experiment("globex", "victim"))

    both = _post(gateway.client, GET_RUN, {"data": {"runId": own, "runUuid": foreign}}, "GetRun")
    uuid_only = _post(gateway.client, GET_RUN, {"data": {"runUuid": foreign}}, "GetRun")

    assert_mlflow_error(both, 400, "INVALID_PARAMETER_VALUE")
    assert_mlflow_error(uuid_only, 404, "RESOURCE_DOES_NOT_EXIST", f"Run with id={foreign} not found")
    assert fake.forwarded("POST", GRAPHQL) == []


def test_run_uuid_alone_is_forwarded_as_the_checked_run_id(gateway: GatewayUnderTest, fake: FakeUpstream) -> None:
    run = fake.add_run(fake.add_experiment("acme", "exp"))
    _answer(fake, {"mlflowGetRun": None})

    response = _post(gateway.client, GET_RUN, {"data": {"runUuid": run}}, "GetRun")

    assert response.status_code == 200, response.text
    assert _forwarded_graphql(fake)["variables"] == {"data": {"runId": run}}


def test_inline_foreign_run_id_is_refused_and_inline_own_id_is_re_printed(
    gateway: GatewayUnderTest, fake: FakeUpstream
) -> None:
    own = fake.add_run(fake.add_experiment("acme", "exp"))
    foreign = fake.add_run(fake.add_experiment("globex", "victim"))
    _answer(fake, {"mlflowGetRun": None})
    template = '{ mlflowGetRun(input: {runId: "RUN"}) { run { info { runId } } } }'

    refused = _post(gateway.client, template.replace("RUN", foreign))
    accepted = _post(gateway.client, "# client text\n" + template.replace("RUN", own))

    assert_mlflow_error(refused, 404, "RESOURCE_DOES_NOT_EXIST", f"Run with id={foreign} not found")
    assert accepted.status_code == 200, accepted.text
    assert _forwarded_graphql(fake) == {"query": _printed(template.replace("RUN", own)), "variables": {}}


# -- MlflowGetExperimentQuery ----------------------------------------------------------------------------


def test_get_experiment_maps_zero_to_the_tenants_default(gateway: GatewayUnderTest, fake: FakeUpstream) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    default = fake.add_experiment(tenant, "Default")
    _answer(
        fake,
        {
            "mlflowGetExperiment": {
                "apiError": None,
                "experiment": {"experimentId": default, "name": f"{tenant}/Default"},
            }
        },
    )

    response = _post(gateway.client, GET_EXPERIMENT, {"input": {"experimentId": "0"}}, headers=bearer(tenant, "u"))

    assert response.status_code == 200, response.text
    forwarded = _forwarded_graphql(fake)
    assert forwarded["variables"] == {"input": {"experimentId": default}}
    assert forwarded["operationName"] == "MlflowGetExperimentQuery"
    assert response.json()["data"]["mlflowGetExperiment"]["experiment"] == {"experimentId": default, "name": "Default"}


def test_get_experiment_of_another_tenant_is_answered_like_a_missing_one(
    gateway: GatewayUnderTest, fake: FakeUpstream
) -> None:
    foreign = fake.add_experiment("globex", "victim")
    missing = fake.new_experiment_id()

    refused = _post(gateway.client, GET_EXPERIMENT, {"input": {"experimentId": foreign}})
    absent = _post(gateway.client, GET_EXPERIMENT, {"input": {"experimentId": missing}})

    assert_mlflow_error(refused, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={foreign} exists")
    assert_mlflow_error(absent, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={missing} exists")
    assert fake.forwarded("POST", GRAPHQL) == []


def test_an_unexpected_foreign_experiment_in_the_answer_is_not_leaked(
    gateway: GatewayUnderTest, fake: FakeUpstream
) -> None:
    own = fake.add_experiment("acme", "exp")
    _answer(fake, {"mlflowGetExperiment": {"experiment": {"experimentId": own, "name": "globex/secret"}}})

    response = _post(gateway.client, GET_EXPERIMENT, {"input": {"experimentId": own}})

    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST")
    assert "globex" not in response.text


# -- SearchRuns --------------------------------------------------------------------------------------------


def test_search_runs_checks_every_experiment_and_rewrites_every_run(
    gateway: GatewayUnderTest, fake: FakeUpstream
) -> None:
    first, second = fake.add_experiment("acme", "a"), fake.add_experiment("acme", "b/c")
    runs = [
        _run_payload(first, "acme/a", uuid.uuid4().hex, "globex.evil"),
        _run_payload(second, "acme/b/c", uuid.uuid4().hex, "acme.model"),
    ]
    _answer(fake, {"mlflowSearchRuns": {"apiError": None, "runs": runs}})
    variables = {"data": {"filter": "tags.x = 'y'", "experimentIds": [first, second, first]}}

    response = _post(gateway.client, with_typenames(SEARCH_RUNS), variables, "SearchRuns")

    assert response.status_code == 200, response.text
    assert _forwarded_graphql(fake)["variables"] == {
        "data": {"filter": "tags.x = 'y'", "experimentIds": [first, second], "runViewType": None}
    }
    answered = response.json()["data"]["mlflowSearchRuns"]["runs"]
    assert [run["experiment"]["name"] for run in answered] == ["a", "b/c"]
    assert [[v["name"] for v in run["modelVersions"]] for run in answered] == [[], ["model"]]


def test_search_runs_with_one_foreign_experiment_is_refused(gateway: GatewayUnderTest, fake: FakeUpstream) -> None:
    own, foreign = fake.add_experiment("acme", "a"), fake.add_experiment("globex", "victim")

    response = _post(gateway.client, SEARCH_RUNS, {"data": {"experimentIds": [own, foreign]}}, "SearchRuns")

    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={foreign} exists")
    assert fake.forwarded("POST", GRAPHQL) == []


@pytest.mark.parametrize("data", [{}, {"experimentIds": []}, {"experimentIds": None}, {"experimentIds": [None]}])
def test_unscoped_search_runs_is_refused(gateway: GatewayUnderTest, fake: FakeUpstream, data: dict[str, Any]) -> None:
    response = _post(gateway.client, SEARCH_RUNS, {"data": data}, "SearchRuns")

    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    assert fake.forwarded("POST", GRAPHQL) == []


# -- GetMetricHistoryBulkInterval --------------------------------------------------------------------------


def test_bulk_interval_checks_every_run(gateway: GatewayUnderTest, fake: FakeUpstream) -> None:
    experiment = fake.add_experiment("acme", "exp")
    runs = [fake.add_run(experiment), fake.add_run(experiment)]
    _answer(fake, {"mlflowGetMetricHistoryBulkInterval": {"__typename": "X", "metrics": [], "apiError": None}})
    data = {"runIds": runs, "metricKey": "loss", "startStep": None, "endStep": None, "maxResults": 320}

    response = _post(gateway.client, BULK_INTERVAL, {"data": data}, "GetMetricHistoryBulkInterval")

    assert response.status_code == 200, response.text
    assert _forwarded_graphql(fake)["variables"] == {"data": data}


def test_bulk_interval_with_a_foreign_run_is_refused_like_a_missing_one(
    gateway: GatewayUnderTest, fake: FakeUpstream
) -> None:
    own = fake.add_run(fake.add_experiment("acme", "exp"))
    foreign = fake.add_run(fake.add_experiment("globex", "victim"))
    missing = uuid.uuid4().hex

    refused = _post(gateway.client, BULK_INTERVAL, {"data": {"runIds": [own, foreign], "metricKey": "m"}})
    absent = _post(gateway.client, BULK_INTERVAL, {"data": {"runIds": [own, missing], "metricKey": "m"}})

    assert_mlflow_error(refused, 404, "RESOURCE_DOES_NOT_EXIST", f"Run with id={foreign} not found")
    assert_mlflow_error(absent, 404, "RESOURCE_DOES_NOT_EXIST", f"Run with id={missing} not found")
    assert fake.forwarded("POST", GRAPHQL) == []


def test_bulk_interval_is_capped_at_one_hundred_runs(gateway: GatewayUnderTest, fake: FakeUpstream) -> None:
    ids = [uuid.uuid4().hex for _ in range(101)]

    response = _post(gateway.client, BULK_INTERVAL, {"data": {"runIds": ids, "metricKey": "m"}})

    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


# -- refusals of the request's shape ---------------------------------------------------------------------


def test_batched_requests_are_refused(gateway: GatewayUnderTest, fake: FakeUpstream) -> None:
    run = fake.add_run(fake.add_experiment("acme", "exp"))
    batch = [{"query": GET_RUN, "variables": {"data": {"runId": run}}}] * 2

    response = gateway.client.post(GRAPHQL, headers=ACME, json=batch)

    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


def test_a_query_string_is_refused(gateway: GatewayUnderTest, fake: FakeUpstream) -> None:
    run = fake.add_run(fake.add_experiment("acme", "exp"))

    response = gateway.client.post(
        f"{GRAPHQL}?max_results=1000000",
        headers=ACME,
        json={"query": BULK_INTERVAL, "variables": {"data": {"runIds": [run], "metricKey": "m"}}},
    )

    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


def test_unknown_request_fields_are_refused(gateway: GatewayUnderTest, fake: FakeUpstream) -> None:
    response = gateway.client.post(
        GRAPHQL, headers=ACME, json={"query": GET_RUN, "variables": {}, "extensions": {"persistedQuery": {}}}
    )

    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


def test_extra_variables_are_not_forwarded(gateway: GatewayUnderTest, fake: FakeUpstream) -> None:
    run = fake.add_run(fake.add_experiment("acme", "exp"))
    foreign = fake.add_run(fake.add_experiment("globex", "victim"))
    _answer(fake, {"mlflowGetRun": None})

    response = _post(gateway.client, GET_RUN, {"data": {"runId": run}, "other": {"runId": foreign}}, "GetRun")

    assert response.status_code == 200, response.text
    assert _forwarded_graphql(fake)["variables"] == {"data": {"runId": run}}


@pytest.mark.parametrize(
    ("query", "status", "error_code"),
    [
        (
            '{ a: mlflowGetExperiment(input: {experimentId: "ID"}) { experiment { name } } }',
            400,
            "INVALID_PARAMETER_VALUE",
        ),
        (
            "{ mlflowSearchModelVersions(input: {filter: \"run_id='x'\"}) { modelVersions { name } } }",
            403,
            "PERMISSION_DENIED",
        ),
        (
            'mutation { mlflowSearchRuns(input: {experimentIds: ["ID"]}) { runs { info { runId } } } }',
            403,
            "PERMISSION_DENIED",
        ),
        ("{ __schema { types { name } } }", 403, "PERMISSION_DENIED"),
        (
            '{ mlflowGetExperiment(input: {experimentId: "ID"}) { __typename } } query B { __typename }',
            400,
            "INVALID_PARAMETER_VALUE",
        ),
    ],
    ids=["alias", "foreign-root-field", "mutation", "introspection", "two-operations"],
)
def test_refused_documents_never_reach_mlflow(
    gateway: GatewayUnderTest, fake: FakeUpstream, query: str, status: int, error_code: str
) -> None:
    experiment = fake.add_experiment("acme", "exp")

    response = _post(gateway.client, query.replace("ID", experiment))

    assert_mlflow_error(response, status, error_code)
    fake.assert_untouched()


def test_get_graphql_is_denied_with_a_reason(gateway: GatewayUnderTest, fake: FakeUpstream) -> None:
    response = gateway.client.get(GRAPHQL, headers=ACME, params={"query": "{ __typename }"})

    body = assert_mlflow_error(response, 403, "PERMISSION_DENIED")
    assert "GraphQL over GET" in body["message"]
    fake.assert_untouched()


def test_graphql_needs_a_token(gateway: GatewayUnderTest, fake: FakeUpstream) -> None:
    response = gateway.client.post(
        GRAPHQL, json={"query": GET_EXPERIMENT, "variables": {"input": {"experimentId": "1"}}}
    )

    assert_mlflow_error(response, 401, "UNAUTHENTICATED")
    fake.assert_untouched()


def test_viewers_may_query(gateway: GatewayUnderTest, fake: FakeUpstream) -> None:
    experiment = fake.add_experiment("acme", "exp")
    _answer(fake, {"mlflowGetExperiment": {"experiment": {"name": "acme/exp"}}})

    response = _post(
        gateway.client,
        GET_EXPERIMENT,
        {"input": {"experimentId": experiment}},
        headers=bearer("acme", "v", roles=["viewer"]),
    )

    assert response.status_code == 200, response.text
    assert response.json()["data"]["mlflowGetExperiment"]["experiment"]["name"] == "exp"


# -- upstream answers -----------------------------------------------------------------------------------


def test_upstream_error_strings_lose_the_callers_prefix(gateway: GatewayUnderTest, fake: FakeUpstream) -> None:
    experiment = fake.add_experiment("acme", "exp")
    _answer(fake, {"mlflowSearchRuns": None}, errors=["Invalid filter on experiment acme/exp"])

    response = _post(gateway.client, SEARCH_RUNS, {"data": {"experimentIds": [experiment], "filter": "x"}})

    assert response.status_code == 200, response.text
    assert response.json() == {"data": {"mlflowSearchRuns": None}, "errors": ["Invalid filter on experiment exp"]}


def test_an_upstream_http_error_keeps_mlflows_error_shape(gateway: GatewayUnderTest, fake: FakeUpstream) -> None:
    experiment = fake.add_experiment("acme", "exp")
    fake.on("POST", GRAPHQL, Reply(400, {"error_code": "BAD_REQUEST", "message": "experiment acme/exp: bad"}))

    response = _post(gateway.client, GET_EXPERIMENT, {"input": {"experimentId": experiment}})

    assert_mlflow_error(response, 400, "BAD_REQUEST", "experiment exp: bad")


def test_other_tenants_see_their_own_objects(gateway: GatewayUnderTest, fake: FakeUpstream) -> None:
    experiment = fake.add_experiment("globex", "theirs")
    run = fake.add_run(experiment)
    _answer(fake, {"mlflowGetRun": {"run": _run_payload(experiment, "globex/theirs", run, "globex.m", "acme.x")}})

    response = _post(gateway.client, GET_RUN, {"data": {"runId": run}}, "GetRun", headers=GLOBEX)

    assert response.status_code == 200, response.text
    answer = response.json()["data"]["mlflowGetRun"]["run"]
    assert answer["experiment"]["name"] == "theirs"
    assert [version["name"] for version in answer["modelVersions"]] == ["m"]
