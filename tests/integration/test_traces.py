"""Tracing through the real gateway with the stock client: private traces, assessments, the trace leaks.

The stock 3.17 client exports spans over OTLP (``POST /v1/traces``, one call per batch) and the trace
info with ``StartTraceV3``; both go through the gateway's checks. The verified leaks of
``shared/mlflow-api.md`` §3 (trace-id hijack, ``tr-z/../..`` ids, OTLP injection into a victim's
trace) are attempted against the real MLflow behind the gateway, with a control showing the same
request succeeds when sent to MLflow directly.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import AssessmentSource, AssessmentSourceType
from mlflow.exceptions import MlflowException
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from gateway.dev import DevStack
from tests.integration.conftest import MlflowAs, TokenFactory

V3 = "/api/3.0/mlflow"
# mlflow's tracing imports its pyfunc type-hint module on the first span, which warns once; with warnings
# as errors the client would swallow the error and silently record no trace.
pytestmark = pytest.mark.filterwarnings("ignore:.*Any type hint is inferred as AnyType:UserWarning")


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@mlflow.trace
def predict(question: str) -> str:
    with mlflow.start_span("retrieve") as span:
        span.set_inputs({"question": question})
        span.set_outputs({"documents": 2})
    return question.upper()


def _trace_once(question: str = "hello") -> str:
    """Run the traced function, wait for the client's asynchronous export, return the trace id."""
    predict(question)
    mlflow.flush_trace_async_logging()
    trace_id = mlflow.get_last_active_trace_id()
    assert trace_id is not None
    return trace_id


def _upstream_info(stack: DevStack, trace_id: str) -> dict[str, Any]:
    response = httpx.get(f"{stack.mlflow_url}{V3}/traces/{trace_id}")
    assert response.status_code == 200, response.text
    info: dict[str, Any] = response.json()["trace"]["trace_info"]
    return info


def _upstream_span_names(stack: DevStack, trace_id: str) -> list[str]:
    response = httpx.get(f"{stack.mlflow_url}{V3}/traces/get", params={"trace_id": trace_id, "allow_partial": "true"})
    assert response.status_code == 200, response.text
    return sorted(span["name"] for span in response.json()["trace"]["spans"])


def _bearer(token_factory: TokenFactory, tenant: str, user: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {token_factory(tenant, user)}"}


def _start_trace_body(trace_id: str, experiment_id: str) -> dict[str, Any]:
    return {
        "trace": {
            "trace_info": {
                "trace_id": trace_id,
                "trace_location": {"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": experiment_id}},
                "request_time": "2026-01-01T00:00:00Z",
                "state": "OK",
            }
        }
    }


def _otlp_span(trace_hex: str, name: str) -> bytes:
    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name = bytes.fromhex(trace_hex), uuid.uuid4().bytes[:8], name
    span.parent_span_id = uuid.uuid4().bytes[:8]  # a child span, as an injected one would be
    span.start_time_unix_nano, span.end_time_unix_nano = 1_700_000_000_000_000_000, 1_700_000_000_100_000_000
    return request.SerializeToString()


# -- the stock client ------------------------------------------------------------------------------------------


def test_traces_are_private_to_their_tenant(mlflow_as: MlflowAs, stack: DevStack) -> None:
    mlflow_as("acme", "alice")
    experiment_id = mlflow.set_experiment(_unique("agent")).experiment_id
    trace_id = _trace_once()

    found = mlflow.search_traces(return_type="list")
    assert [trace.info.trace_id for trace in found] == [trace_id]
    trace = MlflowClient().get_trace(trace_id)
    assert sorted(span.name for span in trace.data.spans) == ["predict", "retrieve"]
    assert trace.info.tags["mlflow.user"] == "alice"
    assert trace.info.tags["matih.tenant_id"] == "acme"
    assert trace.info.tags["matih.user_id"] == "alice"
    # The spans went through OTLP into MLflow's database, not into an artifact upload.
    upstream = _upstream_info(stack, trace_id)
    assert upstream["tags"]["mlflow.trace.spansLocation"] == "TRACKING_STORE"
    assert upstream["trace_location"]["mlflow_experiment"]["experiment_id"] == experiment_id
    assert _upstream_span_names(stack, trace_id) == ["predict", "retrieve"]

    mlflow_as("globex", "bob")
    client = MlflowClient()
    for call in (
        lambda: client.get_trace(trace_id),
        lambda: client.search_traces(locations=[experiment_id]),
        lambda: client.set_trace_tag(trace_id, "stolen", "yes"),
        lambda: client.delete_trace_tag(trace_id, "mlflow.traceName"),
    ):
        with pytest.raises(MlflowException) as caught:
            call()
        assert caught.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    _trace_once("globex's own")  # globex traces into its own Default experiment
    assert trace_id not in [t.info.trace_id for t in mlflow.search_traces(return_type="list")]
    assert "stolen" not in _upstream_info(stack, trace_id)["tags"]


def test_traces_inside_a_run_record_the_owned_run(mlflow_as: MlflowAs) -> None:
    mlflow_as("acme", "alice")
    mlflow.set_experiment(_unique("with-run"))
    with mlflow.start_run() as run:
        trace_id = _trace_once()
    trace = MlflowClient().get_trace(trace_id)
    assert trace.info.trace_metadata["mlflow.sourceRun"] == run.info.run_id
    found = mlflow.search_traces(run_id=run.info.run_id, return_type="list")
    assert [t.info.trace_id for t in found] == [trace_id]


def test_trace_tags_with_the_stock_client(
    mlflow_as: MlflowAs, stack: DevStack, gateway_url: str, token_factory: TokenFactory
) -> None:
    mlflow_as("acme", "alice")
    mlflow.set_experiment(_unique("tags"))
    trace_id = _trace_once()
    client = MlflowClient()
    client.set_trace_tag(trace_id, "team", "ml")
    assert client.get_trace(trace_id).info.tags["team"] == "ml"
    client.delete_trace_tag(trace_id, "team")
    assert "team" not in client.get_trace(trace_id).info.tags
    with pytest.raises(MlflowException) as caught:
        client.set_trace_tag(trace_id, "matih.tenant_id", "globex")
    assert caught.value.error_code == "PERMISSION_DENIED"

    # The stock client will not send the storage tags; a hand-made request is refused by the gateway.
    location = _upstream_info(stack, trace_id)["tags"]["mlflow.artifactLocation"]
    headers = _bearer(token_factory, "acme")
    for prefix in ("/api/2.0/mlflow", V3):
        for key, value in [
            ("mlflow.artifactLocation", "mlflow-artifacts:/1/traces/tr-0/artifacts"),
            ("mlflow.trace.spansLocation", "ARCHIVE_REPO"),
            ("mlflow.trace.archiveLocation", "s3://elsewhere/traces"),
        ]:
            url = f"{gateway_url}{prefix}/traces/{trace_id}/tags"
            response = httpx.patch(url, json={"key": key, "value": value}, headers=headers)
            assert (response.status_code, response.json()["error_code"]) == (403, "PERMISSION_DENIED")
    tags = _upstream_info(stack, trace_id)["tags"]
    assert (tags["matih.tenant_id"], tags["mlflow.artifactLocation"]) == ("acme", location)
    assert tags["mlflow.trace.spansLocation"] == "TRACKING_STORE"
    assert "mlflow.trace.archiveLocation" not in tags


def test_feedback_and_expectations(mlflow_as: MlflowAs) -> None:
    mlflow_as("acme", "alice")
    mlflow.set_experiment(_unique("assess"))
    trace_id = _trace_once()
    human = AssessmentSource(source_type=AssessmentSourceType.HUMAN, source_id="mallory")
    feedback = mlflow.log_feedback(trace_id=trace_id, name="helpful", value=True, source=human, rationale="ok")
    expectation = mlflow.log_expectation(trace_id=trace_id, name="answer", value="HELLO")
    assert feedback.source.source_id == "alice"  # a human source is the token's user

    stored = mlflow.get_assessment(trace_id, feedback.assessment_id)
    assert (stored.name, stored.value, stored.source.source_id) == ("helpful", True, "alice")
    mlflow.update_assessment(trace_id, feedback.assessment_id, mlflow.entities.Feedback(name="helpful", value=False))
    assert mlflow.get_assessment(trace_id, feedback.assessment_id).value is False
    names = {a.name for a in MlflowClient().get_trace(trace_id).info.assessments}
    assert names == {"helpful", "answer"}

    mlflow_as("globex", "bob")
    for call in (
        lambda: mlflow.log_feedback(trace_id=trace_id, name="spam", value=False),
        lambda: mlflow.get_assessment(trace_id, feedback.assessment_id),
        lambda: mlflow.delete_assessment(trace_id, expectation.assessment_id),
    ):
        with pytest.raises(MlflowException) as caught:
            call()
        assert caught.value.error_code == "RESOURCE_DOES_NOT_EXIST"

    mlflow_as("acme", "alice")
    mlflow.delete_assessment(trace_id, expectation.assessment_id)
    assert {a.name for a in MlflowClient().get_trace(trace_id).info.assessments} == {"helpful"}


def test_link_traces_to_run(mlflow_as: MlflowAs) -> None:
    mlflow_as("globex", "bob")
    globex_run = MlflowClient().create_run(mlflow.set_experiment(_unique("theirs")).experiment_id).info.run_id
    mlflow_as("acme", "alice")
    experiment_id = mlflow.set_experiment(_unique("link")).experiment_id
    trace_id = _trace_once()
    client = MlflowClient()
    run_id = client.create_run(experiment_id).info.run_id
    client.link_traces_to_run([trace_id], run_id)
    assert [t.info.trace_id for t in mlflow.search_traces(run_id=run_id, return_type="list")] == [trace_id]
    with pytest.raises(MlflowException) as caught:
        client.link_traces_to_run([trace_id], globex_run)
    assert caught.value.error_code == "RESOURCE_DOES_NOT_EXIST"


def test_delete_traces_only_deletes_the_tenants_own(mlflow_as: MlflowAs, stack: DevStack) -> None:
    mlflow_as("acme", "alice")
    acme_experiment = mlflow.set_experiment(_unique("victim")).experiment_id
    victim = _trace_once()

    mlflow_as("globex", "bob")
    globex_experiment = mlflow.set_experiment(_unique("attacker")).experiment_id
    client = MlflowClient()
    assert client.delete_traces(experiment_id=globex_experiment, trace_ids=[victim]) == 0
    with pytest.raises(MlflowException) as caught:
        client.delete_traces(experiment_id=acme_experiment, trace_ids=[victim])
    assert caught.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert _upstream_info(stack, victim)["trace_id"] == victim

    mlflow_as("acme", "alice")
    assert MlflowClient().delete_traces(experiment_id=acme_experiment, trace_ids=[victim]) == 1
    assert httpx.get(f"{stack.mlflow_url}{V3}/traces/{victim}").status_code == 404


# -- the verified leaks ------------------------------------------------------------------------------------


def test_trace_id_hijack_is_refused(
    mlflow_as: MlflowAs, gateway_url: str, token_factory: TokenFactory, stack: DevStack
) -> None:
    """Leak (a): StartTraceV3 with the victim's id would move the victim's trace into my experiment."""
    mlflow_as("acme", "alice")
    acme_experiment = mlflow.set_experiment(_unique("victim")).experiment_id
    victim = _trace_once("secret question")
    mlflow_as("globex", "bob")
    globex_experiment = mlflow.set_experiment(_unique("attacker")).experiment_id

    response = httpx.post(
        f"{gateway_url}{V3}/traces",
        json=_start_trace_body(victim, globex_experiment),
        headers=_bearer(token_factory, "globex", "bob"),
    )
    assert response.status_code == 404
    assert response.json() == {
        "error_code": "RESOURCE_DOES_NOT_EXIST",
        "message": f"Trace with ID '{victim}' no longer exists.",
    }
    info = _upstream_info(stack, victim)
    assert info["trace_location"]["mlflow_experiment"]["experiment_id"] == acme_experiment
    assert info["request_preview"]  # still the victim's data, untouched

    # Control: sent straight to MLflow, the same request does move a trace.
    throwaway = f"tr-{uuid.uuid4().hex}"
    assert httpx.post(f"{stack.mlflow_url}{V3}/traces", json=_start_trace_body(throwaway, acme_experiment)).is_success
    moved = httpx.post(f"{stack.mlflow_url}{V3}/traces", json=_start_trace_body(throwaway, globex_experiment))
    assert moved.json()["trace"]["trace_info"]["trace_location"]["mlflow_experiment"]["experiment_id"] == (
        globex_experiment
    )


@pytest.mark.parametrize(
    "trace_id",
    ["tr-z/../../../1/traces/tr-0123456789abcdef0123456789abcdef", "tr-0123456789ABCDEF0123456789ABCDEF"],
)
def test_path_traversal_trace_ids_are_refused(
    mlflow_as: MlflowAs, gateway_url: str, token_factory: TokenFactory, stack: DevStack, trace_id: str
) -> None:
    """Leak (b): the id would be stored verbatim and used to build the trace's artifact path."""
    mlflow_as("globex", "bob")
    experiment_id = mlflow.set_experiment(_unique("traversal")).experiment_id
    headers = _bearer(token_factory, "globex", "bob")
    response = httpx.post(f"{gateway_url}{V3}/traces", json=_start_trace_body(trace_id, experiment_id), headers=headers)
    assert response.status_code == 400
    assert response.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    listed = httpx.post(
        f"{stack.mlflow_url}{V3}/traces/search",
        json={"locations": [{"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": experiment_id}}]},
    ).json()
    assert listed.get("traces", []) == []
    artifact = httpx.get(
        f"{gateway_url}/ajax-api/2.0/mlflow/get-trace-artifact", params={"request_id": trace_id}, headers=headers
    )
    assert artifact.status_code == 400


def test_otlp_injection_into_a_victim_trace_is_refused(
    mlflow_as: MlflowAs, gateway_url: str, token_factory: TokenFactory, stack: DevStack
) -> None:
    """Leak (c): spans with the victim's trace id would be appended to the victim's trace."""
    mlflow_as("acme", "alice")
    mlflow.set_experiment(_unique("victim"))
    victim = _trace_once()
    mlflow_as("globex", "bob")
    globex_experiment = mlflow.set_experiment(_unique("attacker")).experiment_id

    headers = {
        **_bearer(token_factory, "globex", "bob"),
        "content-type": "application/x-protobuf",
        "x-mlflow-experiment-id": globex_experiment,
    }
    injected = _otlp_span(victim.removeprefix("tr-"), "injected")
    response = httpx.post(f"{gateway_url}/v1/traces", content=injected, headers=headers)
    assert response.status_code == 404
    assert response.json()["message"] == f"Trace with ID '{victim}' no longer exists."
    assert _upstream_span_names(stack, victim) == ["predict", "retrieve"]

    # globex's own new trace goes through the same route.
    own_hex = uuid.uuid4().hex
    assert httpx.post(f"{gateway_url}/v1/traces", content=_otlp_span(own_hex, "mine"), headers=headers).is_success
    assert _upstream_info(stack, f"tr-{own_hex}")["trace_location"]["mlflow_experiment"]["experiment_id"] == (
        globex_experiment
    )

    # Control: sent straight to MLflow, the injection lands in the victim's trace.
    control = _trace_once_as_acme_control(mlflow_as)
    direct_headers = {"content-type": "application/x-protobuf", "x-mlflow-experiment-id": globex_experiment}
    sent = httpx.post(
        f"{stack.mlflow_url}/v1/traces", content=_otlp_span(control.removeprefix("tr-"), "x"), headers=direct_headers
    )
    assert sent.is_success
    assert "x" in _upstream_span_names(stack, control)


def _trace_once_as_acme_control(mlflow_as: MlflowAs) -> str:
    mlflow_as("acme", "alice")
    mlflow.set_experiment(_unique("control"))
    return _trace_once("control")


def test_trace_artifact_download_is_scoped(mlflow_as: MlflowAs, gateway_url: str, token_factory: TokenFactory) -> None:
    mlflow_as("acme", "alice")
    mlflow.set_experiment(_unique("ui"))
    trace_id = _trace_once("for the ui")
    url = f"{gateway_url}/ajax-api/2.0/mlflow/get-trace-artifact"
    own = httpx.get(url, params={"request_id": trace_id}, headers=_bearer(token_factory, "acme"))
    assert own.status_code == 200, own.text
    assert {span["name"] for span in own.json()["spans"]} == {"predict", "retrieve"}
    foreign = httpx.get(url, params={"request_id": trace_id}, headers=_bearer(token_factory, "globex", "bob"))
    assert foreign.status_code == 404
    assert foreign.json() == {
        "error_code": "RESOURCE_DOES_NOT_EXIST",
        "message": f"Trace with ID '{trace_id}' not found.",
    }


def test_searches_are_scoped_upstream(mlflow_as: MlflowAs, gateway_url: str, token_factory: TokenFactory) -> None:
    mlflow_as("acme", "alice")
    acme_experiment = mlflow.set_experiment(_unique("searched")).experiment_id
    trace_id = _trace_once()
    acme, globex = _bearer(token_factory, "acme"), _bearer(token_factory, "globex", "bob")

    # No location: MLflow matches no experiment (never "every experiment").
    empty = httpx.post(f"{gateway_url}{V3}/traces/search", json={"locations": []}, headers=globex)
    assert (empty.status_code, empty.json()) == (200, {})
    legacy = httpx.get(f"{gateway_url}/api/2.0/mlflow/traces", params={"experiment_ids": acme_experiment}, headers=acme)
    assert [t["request_id"] for t in legacy.json()["traces"]] == [trace_id]
    for response in (
        httpx.get(f"{gateway_url}/api/2.0/mlflow/traces", params={"experiment_ids": acme_experiment}, headers=globex),
        httpx.post(
            f"{gateway_url}{V3}/traces/metrics",
            json={"experiment_ids": [acme_experiment], "view_type": "TRACES", "metric_name": "trace_count"},
            headers=globex,
        ),
    ):
        assert response.status_code == 404
        assert response.json()["message"] == f"No Experiment with id={acme_experiment} exists"
    assert httpx.get(f"{gateway_url}/api/2.0/mlflow/traces", headers=globex).status_code == 400

    # A batch read of another tenant's id answers like a missing id: nothing.
    batch = httpx.get(f"{gateway_url}{V3}/traces/batchGet", params={"trace_ids": trace_id}, headers=globex)
    assert (batch.status_code, batch.json().get("traces", [])) == (200, [])
    infos = httpx.post(f"{gateway_url}{V3}/traces/batchGetInfos", json={"trace_ids": [trace_id]}, headers=globex)
    assert (infos.status_code, infos.json().get("trace_infos", [])) == (200, [])
    mine = httpx.post(f"{gateway_url}{V3}/traces/batchGetInfos", json={"trace_ids": [trace_id]}, headers=acme)
    assert [info["trace_id"] for info in mine.json()["trace_infos"]] == [trace_id]
