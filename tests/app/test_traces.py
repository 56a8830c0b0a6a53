"""Traces, assessments and trace searches: every trace id must be well formed and new or owned.

Each route is attempted with the tenant's own trace (forwarded, rewritten as documented) and with
another tenant's (answered exactly like a missing one, never forwarded). The verified leaks are
attempted directly: re-homing a foreign trace id with StartTraceV3 (a), a ``tr-z/../..`` trace id
(b), and writing the tags that point a trace at another experiment's files.
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

API3 = "/api/3.0/mlflow"
AJAX3 = "/ajax-api/3.0/mlflow"
V3_PREFIXES = [API3, AJAX3]
V2_PREFIXES = [API, AJAX]


def new_trace_id() -> str:
    return f"tr-{uuid.uuid4().hex}"


class FakeTraces:
    """Traces held by the fake MLflow (trace id -> experiment id and tags) and its trace routes."""

    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake
        self.traces: dict[str, dict[str, Any]] = {}
        for prefix in ("/api/3.0/mlflow", "/ajax-api/3.0/mlflow", "/api/2.0/mlflow", "/ajax-api/2.0/mlflow"):
            base = re.escape(f"{prefix}/traces")
            for method in ("GET", "POST", "PATCH", "DELETE"):  # registered first: the last match wins
                fake.on(method, rf"{base}(/.*)?", Reply(200, {}), regex=True)
        for prefix in V3_PREFIXES:
            fake.on("GET", rf"{re.escape(prefix)}/traces/(tr-)?[0-9a-f]{{32}}", self._get, regex=True)
            fake.on("POST", f"{prefix}/traces", self._start)

    def add(self, experiment_id: str, *, trace_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        """A trace in ``experiment_id`` upstream, with MLflow's artifact-location tag."""
        trace_id = trace_id or new_trace_id()
        location = f"mlflow-artifacts:/{experiment_id}/traces/{trace_id}/artifacts"
        self.traces[trace_id] = {
            "experiment_id": experiment_id,
            "tags": {"mlflow.artifactLocation": location, **(tags or {})},
        }
        return trace_id

    def info(self, trace_id: str) -> dict[str, Any]:
        stored = self.traces[trace_id]
        return {
            "trace_id": trace_id,
            "trace_location": {
                "type": "MLFLOW_EXPERIMENT",
                "mlflow_experiment": {"experiment_id": stored["experiment_id"]},
            },
            "tags": stored["tags"],
        }

    def _get(self, request: Received) -> Reply:
        trace_id = request.path.rsplit("/", 1)[1]
        if trace_id not in self.traces:
            return mlflow_error(404, "RESOURCE_DOES_NOT_EXIST", f"Trace with ID '{trace_id}' not found.")
        return Reply(200, {"trace": {"trace_info": self.info(trace_id)}})

    def _start(self, request: Received) -> Reply:
        info = request.json()["trace"]["trace_info"]
        experiment_id = info["trace_location"]["mlflow_experiment"]["experiment_id"]
        self.add(experiment_id, trace_id=info["trace_id"], tags=info.get("tags"))
        return Reply(200, {"trace": {"trace_info": self.info(info["trace_id"])}})


@pytest.fixture
def traces(fake: FakeUpstream) -> Iterator[FakeTraces]:
    yield FakeTraces(fake)


@pytest.fixture
def own(fake: FakeUpstream) -> str:
    """An experiment of acme."""
    return fake.add_experiment("acme", f"traces-{uuid.uuid4().hex[:6]}")


@pytest.fixture
def foreign(fake: FakeUpstream) -> str:
    """An experiment of globex."""
    return fake.add_experiment("globex", f"victim-{uuid.uuid4().hex[:6]}")


def not_found(trace_id: str) -> str:
    return f"Trace with ID '{trace_id}' not found."


def trace_body(trace_id: str, experiment_id: str, **info: Any) -> dict[str, Any]:
    return {
        "trace": {
            "trace_info": {
                "trace_id": trace_id,
                "trace_location": {"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": experiment_id}},
                "request_time": "2026-01-01T00:00:00Z",
                "state": "OK",
                **info,
            }
        }
    }


# -- StartTraceV3 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", V3_PREFIXES)
def test_start_trace_stamps_the_creator_and_primes_the_cache(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str, prefix: str
) -> None:
    trace_id = new_trace_id()
    body = trace_body(
        trace_id,
        own,
        tags={"mlflow.user": "mallory", "mlflow.traceName": "predict"},
        trace_metadata={"mlflow.user": "root", "mlflow.traceInputs": "{}"},
    )
    response = client.post(f"{prefix}/traces", headers=bearer("acme", "alice", job="j-1"), json=body)
    assert response.status_code == 200, response.text
    (forwarded,) = fake.forwarded("POST", f"{prefix}/traces")
    info = forwarded.json()["trace"]["trace_info"]
    assert info["tags"] == {
        "mlflow.traceName": "predict",
        "mlflow.user": "alice",
        "matih.tenant_id": "acme",
        "matih.user_id": "alice",
        "matih.job_id": "j-1",
    }
    assert info["trace_metadata"] == {"mlflow.user": "alice", "mlflow.traceInputs": "{}"}
    assert info["trace_location"] == {"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": own}}
    # The lookup proved the id new; the response primed the cache: reading it back needs no lookup.
    assert [r.path for r in fake.lookups() if "/traces/" in r.path] == [f"{API3}/traces/{trace_id}"]
    fake.requests.clear()
    assert client.get(f"{API3}/traces/{trace_id}", headers=ACME).status_code == 200
    assert fake.lookups() == []


def test_start_trace_in_experiment_zero_uses_the_tenants_default(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces
) -> None:
    response = client.post(f"{API3}/traces", headers=ACME, json=trace_body(new_trace_id(), "0"))
    assert response.status_code == 200, response.text
    default_id = fake.forwarded("POST")[0].json()["trace"]["trace_info"]["trace_location"]["mlflow_experiment"]
    assert default_id["experiment_id"] != "0"


def test_restarting_an_own_trace_is_allowed(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str
) -> None:
    trace_id = traces.add(own)
    response = client.post(f"{API3}/traces", headers=ACME, json=trace_body(trace_id, own))
    assert response.status_code == 200, response.text
    assert len(fake.forwarded("POST", "/traces")) == 1


def test_start_trace_hijacking_a_foreign_trace_id_is_refused(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str, foreign: str
) -> None:
    """Leak (a): MLflow would move the victim's trace into the caller's experiment."""
    victim = traces.add(foreign)
    response = client.post(f"{API3}/traces", headers=ACME, json=trace_body(victim, own))
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"Trace with ID '{victim}' no longer exists.")
    assert fake.forwarded() == []
    assert traces.traces[victim]["experiment_id"] == foreign


@pytest.mark.parametrize(
    "trace_id",
    [
        "tr-z/../../../2/traces/tr-0123456789abcdef0123456789abcdef",  # leak (b)
        "tr-../0123456789abcdef0123456789abcdef",
        "tr-0123456789ABCDEF0123456789ABCDEF",
        "0123456789abcdef0123456789abcdef",  # v2 ids are chosen by MLflow, never by clients
        "tr-0123456789abcdef",
        "",
        None,
        123,
    ],
)
def test_start_trace_refuses_malformed_trace_ids(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str, trace_id: Any
) -> None:
    response = client.post(f"{API3}/traces", headers=ACME, json=trace_body(trace_id, own))
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


def test_start_trace_in_a_foreign_experiment_is_404(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, foreign: str
) -> None:
    response = client.post(f"{API3}/traces", headers=ACME, json=trace_body(new_trace_id(), foreign))
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={foreign} exists")
    assert fake.forwarded() == []


def test_start_trace_checks_runs_and_models_named_in_metadata(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str, foreign: str
) -> None:
    own_run, foreign_run = fake.add_run(own), fake.add_run(foreign)
    own_model, foreign_model = fake.add_logged_model(own), fake.add_logged_model(foreign)
    ok = trace_body(new_trace_id(), own, trace_metadata={"mlflow.sourceRun": own_run, "mlflow.modelId": own_model})
    assert client.post(f"{API3}/traces", headers=ACME, json=ok).status_code == 200

    bad_run = trace_body(new_trace_id(), own, trace_metadata={"mlflow.sourceRun": foreign_run})
    response = client.post(f"{API3}/traces", headers=ACME, json=bad_run)
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"Run with id={foreign_run} not found")
    bad_model = trace_body(new_trace_id(), own, traceMetadata={"mlflow.modelId": foreign_model})
    response = client.post(f"{API3}/traces", headers=ACME, json=bad_model)
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"Logged model with ID '{foreign_model}' not found.")
    assert len(fake.forwarded("POST", "/traces")) == 1


@pytest.mark.parametrize(
    "key",
    [
        "matih.tenant_id",
        "MATIH.user_id",
        "mlflow.artifactLocation",
        "mlflow.trace.spansLocation",
        "mlflow.trace.archiveLocation",
        " mlflow.artifactLocation",
    ],
)
def test_start_trace_refuses_reserved_and_storage_tags(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str, key: str
) -> None:
    body = trace_body(new_trace_id(), own, tags={key: "mlflow-artifacts:/1/traces/tr-x/artifacts"})
    assert_mlflow_error(client.post(f"{API3}/traces", headers=ACME, json=body), 403, "PERMISSION_DENIED")
    fake.assert_untouched()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"trace_location": {"type": "INFERENCE_TABLE", "inference_table": {"full_table_name": "a.b.c"}}}, "location"),
        ({"trace_location": {"mlflow_experiment": {"experiment_id": "1"}, "inference_table": {}}}, "location"),
        ({"trace_location": {"type": "INFERENCE_TABLE", "mlflow_experiment": {"experiment_id": "1"}}}, "type"),
        ({"tags": [{"key": "a", "value": "b"}]}, "tags"),
        ({"tags": {"a": 1}}, "tags"),
        ({"trace_metadata": "x"}, "trace_metadata"),
        ({"assessments": [{"overrides": "a-1"}]}, "overrides"),
        ({"assessments": [{"source": {"source_type": "human"}}]}, "source_type"),
    ],
)
def test_start_trace_refuses_what_it_cannot_check(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str, change: dict[str, Any], field: str
) -> None:
    body = trace_body(new_trace_id(), own)
    body["trace"]["trace_info"].update(change)
    response = client.post(f"{API3}/traces", headers=ACME, json=body)
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    assert fake.forwarded() == []


def test_start_trace_refuses_spans_in_the_body(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str
) -> None:
    body = trace_body(new_trace_id(), own)
    body["trace"]["spans"] = [{"trace_id": "AAAA", "span_id": "AAAA"}]
    assert_mlflow_error(client.post(f"{API3}/traces", headers=ACME, json=body), 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


def test_assessments_logged_with_a_trace_get_the_human_source_from_the_token(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str
) -> None:
    assessments = [
        {"assessment_name": "ok", "source": {"source_type": "HUMAN", "source_id": "mallory"}},
        {"assessment_name": "judge", "source": {"source_type": "LLM_JUDGE", "source_id": "gpt"}},
    ]
    body = trace_body(new_trace_id(), own, assessments=assessments)
    assert client.post(f"{API3}/traces", headers=ACME, json=body).status_code == 200
    sent = fake.forwarded("POST")[0].json()["trace"]["trace_info"]["assessments"]
    assert [a["source"] for a in sent] == [
        {"source_type": "HUMAN", "source_id": "alice"},
        {"source_type": "LLM_JUDGE", "source_id": "gpt"},
    ]


# -- reads of one trace ----------------------------------------------------------------------------------


def _read_routes(trace_id: str) -> list[tuple[str, str, dict[str, str]]]:
    return [
        ("GET", f"{API3}/traces/{trace_id}", {}),
        ("GET", f"{AJAX3}/traces/{trace_id}", {}),
        ("GET", f"{API3}/traces/get", {"trace_id": trace_id}),
        ("GET", f"{API}/traces/{trace_id}/info", {}),
        ("GET", f"{AJAX}/traces/{trace_id}/info", {}),
    ]


def test_reads_of_an_own_trace_are_forwarded(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str
) -> None:
    trace_id = traces.add(own)
    for method, path, params in _read_routes(trace_id):
        response = client.request(method, path, params=params, headers=ACME)
        assert response.status_code == 200, (path, response.text)
    assert [r.path for r in fake.forwarded()] == [path for _, path, _ in _read_routes(trace_id)]


def test_reads_of_a_foreign_trace_are_indistinguishable_from_a_missing_one(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, foreign: str
) -> None:
    victim, missing = traces.add(foreign), new_trace_id()
    for (method, path, params), (_, missing_path, missing_params) in zip(
        _read_routes(victim), _read_routes(missing), strict=True
    ):
        response = client.request(method, path, params=params, headers=ACME)
        assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", not_found(victim))
        other = client.request(method, missing_path, params=missing_params, headers=ACME)
        assert other.content == response.content.replace(victim.encode(), missing.encode())
    assert fake.forwarded() == []


@pytest.mark.parametrize(
    "trace_id", ["tr-z/../../1/traces/x", "tr-0123", "../x", "tr-0123456789ABCDEF0123456789ABCDEF", "x" * 40]
)
def test_malformed_trace_ids_in_queries_are_refused(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, trace_id: str
) -> None:
    response = client.get(f"{API3}/traces/get", params={"trace_id": trace_id}, headers=ACME)
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    response = client.get(f"{AJAX}/get-trace-artifact", params={"request_id": trace_id}, headers=ACME)
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("tr-z/../../1", 400),  # dot segments never reach the route table
        ("tr-z%2F..%2F..%2F1", 400),  # nor encoded separators
        ("tr-0123", 403),  # a short id matches no route
        ("tr-0123456789ABCDEF0123456789ABCDEF", 403),
        ("tr-0123456789abcdef0123456789abcdef/../x", 400),
    ],
)
def test_malformed_trace_ids_in_paths_are_refused(
    gateway: GatewayUnderTest, fake: FakeUpstream, path: str, status: int
) -> None:
    response = gateway.raw("GET", f"{API3}/traces/{path}", headers=ACME)
    assert response.status == status
    fake.assert_untouched()


def test_a_query_id_that_differs_from_the_path_is_refused(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str, foreign: str
) -> None:
    trace_id, victim = traces.add(own), traces.add(foreign)
    response = client.get(f"{API3}/traces/{trace_id}", params={"trace_id": victim}, headers=ACME)
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    same = client.get(f"{API3}/traces/{trace_id}", params={"trace_id": trace_id}, headers=ACME)
    assert same.status_code == 200
    assert fake.forwarded()[0].query == {"trace_id": [trace_id]}


# -- batch reads ---------------------------------------------------------------------------------------------


def test_batch_get_is_scoped_to_the_experiments_of_owned_traces(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str, foreign: str
) -> None:
    mine, victim = traces.add(own), traces.add(foreign)
    response = client.get(f"{API3}/traces/batchGet", params={"trace_ids": [mine, victim]}, headers=ACME)
    assert response.status_code == 200, response.text
    (forwarded,) = fake.forwarded()
    # The victim's id is still asked for, but MLflow only looks inside acme's experiment.
    assert forwarded.query == {"trace_ids": [mine, victim], "experiment_ids": [own]}


def test_batch_get_of_only_foreign_traces_is_scoped_to_the_tenants_default(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream, traces: FakeTraces, foreign: str
) -> None:
    client = start_gateway().client
    victim = traces.add(foreign)
    response = client.get(f"{API3}/traces/batchGet", params={"trace_ids": victim}, headers=ACME)
    assert response.status_code == 200, response.text
    scope = fake.forwarded()[0].query["experiment_ids"]
    assert scope != [foreign]
    assert [fake.state.experiments[e]["name"] for e in scope] == ["acme/Default"]


def test_batch_get_with_client_experiments_checks_each(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str, foreign: str
) -> None:
    victim = traces.add(foreign)
    response = client.post(
        f"{API3}/traces/batchGetInfos", headers=ACME, json={"traceIds": [victim], "experimentIds": [foreign]}
    )
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={foreign} exists")
    response = client.post(
        f"{API3}/traces/batchGetInfos", headers=ACME, json={"trace_ids": [victim], "experiment_ids": [own]}
    )
    assert response.status_code == 200
    assert fake.forwarded()[0].json() == {"trace_ids": [victim], "experiment_ids": [own]}
    # The client named its experiments: no per-trace look-up was needed.
    assert not [r for r in fake.lookups() if "/traces/" in r.path]


def test_batch_get_infos_response_primes_the_cache(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str
) -> None:
    unknown = new_trace_id()  # exists upstream but the gateway has never seen it
    traces.add(own, trace_id=unknown)
    fake.on("POST", f"{API3}/traces/batchGetInfos", Reply(200, {"trace_infos": [traces.info(unknown)]}))
    assert client.post(
        f"{API3}/traces/batchGetInfos", headers=ACME, json={"trace_ids": [unknown], "experiment_ids": [own]}
    )
    fake.requests.clear()
    assert client.get(f"{API3}/traces/{unknown}", headers=ACME).status_code == 200
    assert fake.lookups() == []


@pytest.mark.parametrize("body", [{}, {"trace_ids": []}, {"trace_ids": ["../x"]}, {"trace_ids": "tr-x"}])
def test_batch_get_infos_needs_well_formed_ids(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, body: dict[str, Any]
) -> None:
    assert_mlflow_error(
        client.post(f"{API3}/traces/batchGetInfos", headers=ACME, json=body), 400, "INVALID_PARAMETER_VALUE"
    )
    fake.assert_untouched()


# -- searches and aggregate queries --------------------------------------------------------------------------


def _location(experiment_id: str) -> dict[str, Any]:
    return {"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": experiment_id}}


def test_search_v3_checks_every_location(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str, foreign: str
) -> None:
    response = client.post(
        f"{API3}/traces/search", headers=ACME, json={"locations": [_location(own), _location(foreign)]}
    )
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={foreign} exists")
    assert fake.forwarded() == []
    response = client.post(
        f"{API3}/traces/search",
        headers=ACME,
        json={"locations": [{"mlflowExperiment": {"experimentId": own}}], "filter": "status = 'OK'"},
    )
    assert response.status_code == 200, response.text
    assert fake.forwarded()[0].json() == {"locations": [_location(own)], "filter": "status = 'OK'"}


def test_search_v3_primes_the_cache_from_its_results(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str
) -> None:
    listed = traces.add(own)
    fake.on("POST", f"{API3}/traces/search", Reply(200, {"traces": [traces.info(listed)]}))
    response = client.post(f"{API3}/traces/search", headers=ACME, json={"locations": [_location(own)]})
    assert response.json()["traces"][0]["trace_id"] == listed
    fake.requests.clear()
    assert client.get(f"{API3}/traces/batchGet", params={"trace_ids": listed}, headers=ACME).status_code == 200
    assert fake.lookups() == []
    assert fake.forwarded()[0].query["experiment_ids"] == [own]


@pytest.mark.parametrize(
    "location",
    [
        {"type": "INFERENCE_TABLE", "inference_table": {"full_table_name": "a.b.c"}},
        {"mlflow_experiment": {"experiment_id": "1"}, "inference_table": {"full_table_name": "a.b.c"}},
        {"mlflow_experiment": {}},
        "1",
    ],
)
def test_search_v3_refuses_other_location_kinds(client: httpx.Client, fake: FakeUpstream, location: Any) -> None:
    response = client.post(f"{API3}/traces/search", headers=ACME, json={"locations": [location]})
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


def test_search_v3_with_no_location_is_forwarded_as_is(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces
) -> None:
    assert client.post(f"{API3}/traces/search", headers=ACME, json={"locations": []}).status_code == 200
    assert fake.forwarded()[0].json() == {"locations": []}


@pytest.mark.parametrize("prefix", V2_PREFIXES)
def test_search_v2_needs_owned_experiments(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str, foreign: str, prefix: str
) -> None:
    assert_mlflow_error(client.get(f"{prefix}/traces", headers=ACME), 400, "INVALID_PARAMETER_VALUE")
    response = client.get(f"{prefix}/traces", params={"experiment_ids": [own, foreign]}, headers=ACME)
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={foreign} exists")
    assert fake.forwarded() == []
    response = client.get(f"{prefix}/traces", params={"experiment_ids": [own, own], "filter": "x"}, headers=ACME)
    assert response.status_code == 200
    assert fake.forwarded()[0].query == {"experiment_ids": [own], "filter": ["x"]}


@pytest.mark.parametrize(
    ("route", "extra"),
    [
        ("calculate-filter-correlation", {"filter_string1": "a", "filter_string2": "b"}),
        ("metrics", {"view_type": "TRACES", "metric_name": "count", "aggregations": []}),
    ],
)
def test_aggregate_queries_need_owned_experiments(
    client: httpx.Client,
    fake: FakeUpstream,
    traces: FakeTraces,
    own: str,
    foreign: str,
    route: str,
    extra: dict[str, Any],
) -> None:
    path = f"{API3}/traces/{route}"
    for ids in ([], None):
        body = {**extra, **({"experiment_ids": ids} if ids is not None else {})}
        assert_mlflow_error(client.post(path, headers=ACME, json=body), 400, "INVALID_PARAMETER_VALUE")
    response = client.post(path, headers=ACME, json={**extra, "experiment_ids": [foreign]})
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={foreign} exists")
    assert fake.forwarded() == []
    assert client.post(path, headers=ACME, json={**extra, "experimentIds": [own]}).status_code == 200
    assert fake.forwarded()[0].json()["experiment_ids"] == [own]


# -- deletes, tags, links ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [API, API3])
def test_delete_traces_needs_an_owned_experiment(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str, foreign: str, prefix: str
) -> None:
    victim = traces.add(foreign)
    response = client.post(
        f"{prefix}/traces/delete-traces", headers=ACME, json={"experiment_id": foreign, "request_ids": [victim]}
    )
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={foreign} exists")
    assert fake.forwarded() == []
    # With its own experiment, MLflow deletes only that experiment's traces: the victim's id is inert.
    response = client.post(
        f"{prefix}/traces/delete-traces",
        headers=ACME,
        json={"experiment_id": own, "request_ids": [victim], "max_traces": 5},
    )
    assert response.status_code == 200
    assert fake.forwarded()[0].json() == {"experiment_id": own, "request_ids": [victim], "max_traces": 5}
    bad = client.post(
        f"{prefix}/traces/delete-traces", headers=ACME, json={"experiment_id": own, "request_ids": ["../x"]}
    )
    assert_mlflow_error(bad, 400, "INVALID_PARAMETER_VALUE")


def test_deleted_trace_ids_leave_the_cache(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str
) -> None:
    trace_id = traces.add(own)
    assert client.get(f"{API3}/traces/{trace_id}", headers=ACME).status_code == 200
    assert client.post(
        f"{API3}/traces/delete-traces", headers=ACME, json={"experiment_id": own, "request_ids": [trace_id]}
    )
    del traces.traces[trace_id]
    fake.requests.clear()
    assert_mlflow_error(client.get(f"{API3}/traces/{trace_id}", headers=ACME), 404, "RESOURCE_DOES_NOT_EXIST")
    assert [r.path for r in fake.lookups()] == [f"{API3}/traces/{trace_id}"]


TAG_ROUTES = [(API, "request_id"), (AJAX, "request_id"), (API3, "trace_id"), (AJAX3, "trace_id")]


@pytest.mark.parametrize(("prefix", "id_field"), TAG_ROUTES)
def test_trace_tags_on_own_and_foreign_traces(
    client: httpx.Client,
    fake: FakeUpstream,
    traces: FakeTraces,
    own: str,
    foreign: str,
    prefix: str,
    id_field: str,
) -> None:
    mine, victim = traces.add(own), traces.add(foreign)
    assert (
        client.patch(f"{prefix}/traces/{mine}/tags", headers=ACME, json={"key": "k", "value": "v"}).status_code == 200
    )
    deleted = client.request("DELETE", f"{prefix}/traces/{mine}/tags", headers=ACME, json={id_field: mine, "key": "k"})
    assert deleted.status_code == 200
    assert len(fake.forwarded()) == 2
    fake.requests.clear()
    response = client.patch(f"{prefix}/traces/{victim}/tags", headers=ACME, json={"key": "k", "value": "v"})
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", not_found(victim))
    response = client.request("DELETE", f"{prefix}/traces/{victim}/tags", headers=ACME, json={"key": "k"})
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", not_found(victim))
    # A body that names another trace than the path is ambiguous.
    response = client.patch(
        f"{prefix}/traces/{mine}/tags", headers=ACME, json={id_field: victim, "key": "k", "value": "v"}
    )
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    assert fake.forwarded() == []


@pytest.mark.parametrize("prefix", [API, API3])
@pytest.mark.parametrize(
    ("key", "method", "status"),
    [
        ("matih.tenant_id", "PATCH", 403),
        ("matih.user_id", "DELETE", 403),
        ("mlflow.artifactLocation", "PATCH", 403),
        ("mlflow.artifactLocation", "DELETE", 403),
        ("mlflow.trace.spansLocation", "PATCH", 403),
        ("mlflow.trace.archiveLocation", "PATCH", 403),
        ("mlflow.trace.archivalFailure", "PATCH", 403),
        ("mlflow.trace.archivalFailure", "DELETE", 200),  # MLflow's way to retry an archival
    ],
)
def test_reserved_and_storage_trace_tags(
    client: httpx.Client,
    fake: FakeUpstream,
    traces: FakeTraces,
    own: str,
    prefix: str,
    key: str,
    method: str,
    status: int,
) -> None:
    trace_id = traces.add(own)
    body = (
        {"key": key, "value": f"mlflow-artifacts:/1/traces/{trace_id}/artifacts"} if method == "PATCH" else {"key": key}
    )
    response = client.request(method, f"{prefix}/traces/{trace_id}/tags", headers=ACME, json=body)
    assert response.status_code == status, response.text
    assert len(fake.forwarded()) == (1 if status == 200 else 0)


def test_link_traces_to_run_checks_every_trace_and_the_run(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str, foreign: str
) -> None:
    mine, victim = traces.add(own), traces.add(foreign)
    own_run, foreign_run = fake.add_run(own), fake.add_run(foreign)
    path = f"{API}/traces/link-to-run"
    response = client.post(path, headers=ACME, json={"trace_ids": [mine, victim], "run_id": own_run})
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", not_found(victim))
    response = client.post(path, headers=ACME, json={"trace_ids": [mine], "run_id": foreign_run})
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"Run with id={foreign_run} not found")
    too_many = [new_trace_id() for _ in range(101)]
    assert_mlflow_error(
        client.post(path, headers=ACME, json={"trace_ids": too_many, "run_id": own_run}), 400, "INVALID_PARAMETER_VALUE"
    )
    assert fake.forwarded() == []
    assert client.post(path, headers=ACME, json={"traceIds": [mine], "runId": own_run}).status_code == 200
    assert fake.forwarded()[0].json() == {"trace_ids": [mine], "run_id": own_run}


def test_linking_prompts_is_denied(client: httpx.Client, fake: FakeUpstream) -> None:
    response = client.post(f"{API}/traces/link-prompts", headers=ACME, json={"trace_id": new_trace_id()})
    body = assert_mlflow_error(response, 403, "PERMISSION_DENIED")
    assert "registered prompts" in body["message"]
    fake.assert_untouched()


# -- legacy v2 start / end ----------------------------------------------------------------------------------


def test_start_trace_v2_checks_the_experiment_and_stamps_the_creator(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str, foreign: str
) -> None:
    response = client.post(f"{API}/traces", headers=ACME, json={"experiment_id": foreign, "timestamp_ms": 1})
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={foreign} exists")
    request_id = uuid.uuid4().hex
    fake.on("POST", f"{API}/traces", Reply(200, {"trace_info": {"request_id": request_id, "experiment_id": own}}))
    body = {"experiment_id": own, "tags": [{"key": "mlflow.user", "value": "mallory"}], "request_metadata": []}
    assert client.post(f"{API}/traces", headers=ACME, json=body).status_code == 200
    tags = {t["key"]: t["value"] for t in fake.forwarded()[0].json()["tags"]}
    assert tags == {"mlflow.user": "alice", "matih.tenant_id": "acme", "matih.user_id": "alice"}
    # The response primed the cache for MLflow's own v2 id.
    fake.requests.clear()
    assert client.get(f"{API}/traces/{request_id}/info", headers=ACME).status_code == 200
    assert fake.lookups() == []


@pytest.mark.parametrize(
    "body",
    [
        {"tags": [{"key": "matih.tenant_id", "value": "globex"}]},
        {"tags": [{"key": "mlflow.artifactLocation", "value": "mlflow-artifacts:/1"}]},
    ],
)
def test_v2_start_and_end_refuse_reserved_and_storage_tags(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str, body: dict[str, Any]
) -> None:
    trace_id = traces.add(own)
    assert_mlflow_error(
        client.post(f"{API}/traces", headers=ACME, json={"experiment_id": own, **body}), 403, "PERMISSION_DENIED"
    )
    assert_mlflow_error(client.patch(f"{API}/traces/{trace_id}", headers=ACME, json=body), 403, "PERMISSION_DENIED")
    assert fake.forwarded() == []


def test_end_trace_v2_on_foreign_trace_and_foreign_run_metadata(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str, foreign: str
) -> None:
    mine, victim = traces.add(own), traces.add(foreign)
    foreign_run = fake.add_run(foreign)
    response = client.patch(f"{API}/traces/{victim}", headers=ACME, json={"status": "OK"})
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", not_found(victim))
    metadata = [{"key": "mlflow.sourceRun", "value": foreign_run}]
    response = client.patch(f"{API}/traces/{mine}", headers=ACME, json={"request_metadata": metadata})
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"Run with id={foreign_run} not found")
    assert fake.forwarded() == []
    assert (
        client.patch(f"{API}/traces/{mine}", headers=ACME, json={"request_id": mine, "status": "OK"}).status_code == 200
    )


# -- assessments -------------------------------------------------------------------------------------------


def test_create_assessment_files_it_under_the_path_trace_with_the_callers_identity(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str, foreign: str
) -> None:
    mine, victim = traces.add(own), traces.add(foreign)
    assessment = {
        "assessment_name": "correct",
        "trace_id": victim,
        "source": {"source_type": "HUMAN", "source_id": "mallory"},
        "feedback": {"value": True},
        "metadata": {"camelKey": "kept"},
    }
    response = client.post(f"{API3}/traces/{mine}/assessments", headers=ACME, json={"assessment": assessment})
    assert response.status_code == 200, response.text
    sent = fake.forwarded()[0].json()["assessment"]
    assert sent["trace_id"] == mine
    assert sent["source"] == {"source_type": "HUMAN", "source_id": "alice"}
    assert sent["metadata"] == {"camelKey": "kept"}
    fake.requests.clear()
    response = client.post(f"{API3}/traces/{victim}/assessments", headers=ACME, json={"assessment": assessment})
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", not_found(victim))
    assert fake.forwarded() == []


@pytest.mark.parametrize(
    "assessment",
    [None, "x", {"assessment_id": "../x"}, {"source": {"source_type": "ROBOT"}}, {"source": "HUMAN"}],
)
def test_create_assessment_refuses_what_it_cannot_check(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str, assessment: Any
) -> None:
    trace_id = traces.add(own)
    response = client.post(f"{API3}/traces/{trace_id}/assessments", headers=ACME, json={"assessment": assessment})
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    assert fake.forwarded() == []


def test_assessments_of_a_foreign_trace_are_missing(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str, foreign: str
) -> None:
    mine, victim = traces.add(own), traces.add(foreign)
    assessment_id = f"a-{uuid.uuid4().hex}"
    for trace_id, expected in ((mine, 200), (victim, 404)):
        path = f"{API3}/traces/{trace_id}/assessments/{assessment_id}"
        get = client.get(path, params={"trace_id": trace_id, "assessment_id": assessment_id}, headers=ACME)
        update = client.patch(path, headers=ACME, json={"assessment": {"rationale": "x"}, "update_mask": "rationale"})
        delete = client.request(
            "DELETE", path, headers=ACME, json={"trace_id": trace_id, "assessment_id": assessment_id}
        )
        assert (get.status_code, update.status_code, delete.status_code) == (expected,) * 3
        if expected == 404:
            message = f"Trace with request_id '{victim}' not found"
            assert_mlflow_error(get, 404, "RESOURCE_DOES_NOT_EXIST", message)
            assert_mlflow_error(update, 404, "RESOURCE_DOES_NOT_EXIST", message)
            assert_mlflow_error(delete, 404, "RESOURCE_DOES_NOT_EXIST", not_found(victim))
    assert len(fake.forwarded()) == 3


def test_assessment_ids_must_agree_with_the_path(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str
) -> None:
    trace_id = traces.add(own)
    path = f"{API3}/traces/{trace_id}/assessments/a-{uuid.uuid4().hex}"
    response = client.request("DELETE", path, headers=ACME, json={"assessment_id": f"a-{uuid.uuid4().hex}"})
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    assert fake.forwarded() == []


# -- the trace-artifact download ---------------------------------------------------------------------------


def _artifact_routes(fake: FakeUpstream) -> None:
    fake.on("GET", f"{AJAX}/get-trace-artifact", Reply(200, b'{"spans": []}', content_type="application/octet-stream"))
    fake.on(
        "GET", "/ajax-api/3.0/mlflow/get-trace-artifact", Reply(200, b"{}", content_type="application/octet-stream")
    )


@pytest.mark.parametrize("prefix", [AJAX, AJAX3])
def test_trace_artifact_of_an_own_trace_is_served(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str, prefix: str
) -> None:
    _artifact_routes(fake)
    trace_id = traces.add(own)
    response = client.get(f"{prefix}/get-trace-artifact", params={"request_id": trace_id}, headers=ACME)
    assert response.status_code == 200, response.text
    (forwarded,) = fake.forwarded()
    assert forwarded.query == {"request_id": [trace_id]}


def test_trace_artifact_of_a_foreign_trace_is_missing(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str, foreign: str
) -> None:
    _artifact_routes(fake)
    victim = traces.add(foreign)
    response = client.get(f"{AJAX}/get-trace-artifact", params={"request_id": victim}, headers=ACME)
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", not_found(victim))
    assert fake.forwarded() == []


def test_trace_artifact_refuses_a_location_outside_the_experiment(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str, foreign: str
) -> None:
    """A trace whose location tag points elsewhere (written before the gateway, say) is not read."""
    _artifact_routes(fake)
    victim_location = f"mlflow-artifacts:/{foreign}/traces/{new_trace_id()}/artifacts"
    tampered = traces.add(own, tags={"mlflow.artifactLocation": victim_location})
    response = client.get(f"{AJAX}/get-trace-artifact", params={"request_id": tampered}, headers=ACME)
    assert_mlflow_error(response, 403, "PERMISSION_DENIED")
    assert fake.forwarded() == []


@pytest.mark.parametrize("path", ["../traces.json", "/etc/passwd", "a/../../b", "a\\b", ""])
def test_trace_artifact_refuses_unsafe_attachment_paths(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str, path: str
) -> None:
    trace_id = traces.add(own)
    response = client.get(f"{AJAX}/get-trace-artifact", params={"request_id": trace_id, "path": path}, headers=ACME)
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


# -- roles ---------------------------------------------------------------------------------------------------


def test_viewers_read_traces_but_cannot_write_them(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str
) -> None:
    viewer = bearer("acme", "vic", roles=["viewer"])
    trace_id = traces.add(own)
    assert client.get(f"{API3}/traces/{trace_id}", headers=viewer).status_code == 200
    assert client.post(f"{API3}/traces/search", headers=viewer, json={"locations": [_location(own)]}).status_code == 200
    for method, path, body in [
        ("POST", f"{API3}/traces", trace_body(new_trace_id(), own)),
        ("PATCH", f"{API3}/traces/{trace_id}/tags", {"key": "k", "value": "v"}),
        ("POST", f"{API3}/traces/{trace_id}/assessments", {"assessment": {}}),
        ("POST", f"{API3}/traces/delete-traces", {"experiment_id": own}),
    ]:
        assert_mlflow_error(client.request(method, path, headers=viewer, json=body), 403, "PERMISSION_DENIED")
    assert len(fake.forwarded()) == 2


def test_another_tenant_sees_its_own_traces_only(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str
) -> None:
    trace_id = traces.add(own)
    assert client.get(f"{API3}/traces/{trace_id}", headers=ACME).status_code == 200
    assert_mlflow_error(client.get(f"{API3}/traces/{trace_id}", headers=GLOBEX), 404, "RESOURCE_DOES_NOT_EXIST")


def test_an_unusable_trace_lookup_fails_closed(
    client: httpx.Client, fake: FakeUpstream, traces: FakeTraces, own: str
) -> None:
    """Only MLflow's 404 makes an id "new": any other answer to the look-up forwards nothing."""
    trace_id = new_trace_id()
    fake.on("GET", f"{API3}/traces/{trace_id}", mlflow_error(403, "PERMISSION_DENIED", "blocked"))
    response = client.post(f"{API3}/traces", headers=ACME, json=trace_body(trace_id, own))
    assert response.status_code == 502
    assert fake.forwarded() == []
