"""OTLP ``/v1/traces``: decoded, checked and re-encoded; spans may only land in new or owned traces.

Leak (c): MLflow appends spans whose trace id already exists to that trace, whatever experiment the
export names. The gateway decodes every body (protobuf or JSON, gzip or deflate), checks every
span's trace id, and forwards only the protobuf it re-serialised with the headers it checked.
"""

from __future__ import annotations

import gzip
import json
import re
import uuid
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from tests.app.conftest import ACME, FakeUpstream, GatewayUnderTest, Received, Reply, assert_mlflow_error, mlflow_error
from tests.factories import bearer

OTLP = "/v1/traces"
PROTOBUF = "application/x-protobuf"


def export(
    *trace_hex: str,
    attributes: dict[str, str] | None = None,
    resource: dict[str, str] | None = None,
    trace_id_bytes: bytes | None = None,
) -> ExportTraceServiceRequest:
    """One root span per trace id (hex), with optional span and resource attributes."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    for key, value in (resource or {"service.name": "svc"}).items():
        resource_spans.resource.attributes.append(KeyValue(key=key, value=AnyValue(string_value=value)))
    scope = resource_spans.scope_spans.add()
    for hex_id in trace_hex:
        span = scope.spans.add()
        span.trace_id = trace_id_bytes if trace_id_bytes is not None else bytes.fromhex(hex_id)
        span.span_id = uuid.uuid4().bytes[:8]
        span.name = "root"
        span.start_time_unix_nano = 1
        span.end_time_unix_nano = 2
        for key, value in (attributes or {}).items():
            span.attributes.append(KeyValue(key=key, value=AnyValue(string_value=value)))
    return request


class FakeOtlp:
    """The fake MLflow's trace look-up and OTLP route."""

    def __init__(self, fake: FakeUpstream) -> None:
        self.traces: dict[str, str] = {}
        fake.on("GET", r"/api/3\.0/mlflow/traces/tr-[0-9a-f]{32}", self._get, regex=True)
        fake.on("POST", OTLP, Reply(200, b"", content_type=PROTOBUF))

    def add(self, experiment_id: str) -> str:
        """An existing trace in ``experiment_id``; returns its OTel hex id."""
        hex_id = uuid.uuid4().hex
        self.traces[f"tr-{hex_id}"] = experiment_id
        return hex_id

    def _get(self, request: Received) -> Reply:
        trace_id = request.path.rsplit("/", 1)[1]
        if trace_id not in self.traces:
            return mlflow_error(404, "RESOURCE_DOES_NOT_EXIST", f"Trace with ID '{trace_id}' not found.")
        location = {"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": self.traces[trace_id]}}
        return Reply(200, {"trace": {"trace_info": {"trace_id": trace_id, "trace_location": location}}})


@pytest.fixture
def otlp(fake: FakeUpstream) -> Iterator[FakeOtlp]:
    yield FakeOtlp(fake)


@pytest.fixture
def own(fake: FakeUpstream) -> str:
    return fake.add_experiment("acme", f"otlp-{uuid.uuid4().hex[:6]}")


@pytest.fixture
def foreign(fake: FakeUpstream) -> str:
    return fake.add_experiment("globex", f"victim-{uuid.uuid4().hex[:6]}")


def post(
    client: httpx.Client,
    body: bytes,
    experiment_id: str | None,
    *,
    headers: dict[str, str] | None = None,
    content_type: str = PROTOBUF,
) -> httpx.Response:
    sent = {**ACME, "content-type": content_type, **(headers or {})}
    if experiment_id is not None:
        sent["x-mlflow-experiment-id"] = experiment_id
    return client.post(OTLP, content=body, headers=sent)


def forwarded_export(fake: FakeUpstream) -> tuple[Received, ExportTraceServiceRequest]:
    (request,) = fake.forwarded("POST", OTLP)
    message = ExportTraceServiceRequest()
    message.ParseFromString(request.body)
    return request, message


# -- what is forwarded ---------------------------------------------------------------------------------------


def test_new_traces_are_forwarded_as_checked_protobuf_with_checked_headers(
    client: httpx.Client, fake: FakeUpstream, otlp: FakeOtlp, own: str
) -> None:
    run_id = fake.add_run(own)
    message = export(uuid.uuid4().hex, uuid.uuid4().hex)
    response = post(
        client,
        message.SerializeToString(),
        own,
        headers={"x-mlflow-run-id": run_id, "x-mlflow-workspace": "team-b", "x-mlflow-other": "1"},
    )
    assert response.status_code == 200, response.text
    request, sent = forwarded_export(fake)
    assert sent == message
    assert request.header("content-type") == PROTOBUF
    assert request.header("x-mlflow-experiment-id") == own
    assert request.header("x-mlflow-run-id") == run_id
    assert request.header("content-encoding") is None
    assert {"x-mlflow-workspace", "x-mlflow-other", "authorization"}.isdisjoint(request.header_names)
    # Each new trace id was looked up once (and found missing) before forwarding.
    assert len([r for r in fake.lookups() if "/traces/" in r.path]) == 2


def test_spans_of_an_own_existing_trace_are_forwarded(
    client: httpx.Client, fake: FakeUpstream, otlp: FakeOtlp, own: str
) -> None:
    other_own_experiment = fake.add_experiment("acme", f"other-{uuid.uuid4().hex[:6]}")
    existing = otlp.add(other_own_experiment)
    assert post(client, export(existing).SerializeToString(), own).status_code == 200
    assert len(fake.forwarded("POST", OTLP)) == 1


def test_spans_injected_into_a_foreign_trace_are_refused(
    client: httpx.Client, fake: FakeUpstream, otlp: FakeOtlp, own: str, foreign: str
) -> None:
    """Leak (c): one victim trace id anywhere in the export refuses the whole export."""
    victim = otlp.add(foreign)
    body = export(uuid.uuid4().hex, victim).SerializeToString()
    response = post(client, body, own)
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"Trace with ID 'tr-{victim}' no longer exists.")
    assert fake.forwarded() == []


def test_the_experiment_header_must_be_owned(
    client: httpx.Client, fake: FakeUpstream, otlp: FakeOtlp, own: str, foreign: str
) -> None:
    body = export(uuid.uuid4().hex).SerializeToString()
    response = post(client, body, foreign)
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={foreign} exists")
    assert_mlflow_error(post(client, body, None), 400, "INVALID_PARAMETER_VALUE")
    response = client.post(
        OTLP,
        content=body,
        headers=[
            *ACME.items(),
            ("content-type", PROTOBUF),
            ("x-mlflow-experiment-id", own),
            ("x-mlflow-experiment-id", foreign),
        ],
    )
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    assert fake.forwarded() == []


def test_experiment_zero_is_the_tenants_default(
    start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream, otlp: FakeOtlp
) -> None:
    client = start_gateway().client
    assert post(client, export(uuid.uuid4().hex).SerializeToString(), "0").status_code == 200
    request, _ = forwarded_export(fake)
    default_id = request.header("x-mlflow-experiment-id")
    assert default_id is not None and fake.state.experiments[default_id]["name"] == "acme/Default"


def test_the_run_header_must_be_owned(
    client: httpx.Client, fake: FakeUpstream, otlp: FakeOtlp, own: str, foreign: str
) -> None:
    foreign_run = fake.add_run(foreign)
    response = post(client, export(uuid.uuid4().hex).SerializeToString(), own, headers={"x-mlflow-run-id": foreign_run})
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"Run with id={foreign_run} not found")
    assert fake.forwarded() == []


# -- encodings -------------------------------------------------------------------------------------------------


def _json_export(hex_id: str) -> bytes:
    return json.dumps(
        {
            "resourceSpans": [
                {
                    "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "svc"}}]},
                    "scopeSpans": [
                        {
                            "spans": [
                                {
                                    "traceId": hex_id,
                                    "spanId": "0102030405060708",
                                    "name": "root",
                                    "startTimeUnixNano": "1",
                                    "endTimeUnixNano": "2",
                                    "someFutureField": 1,
                                }
                            ]
                        }
                    ],
                }
            ]
        }
    ).encode()


def test_json_exports_are_decoded_with_hex_ids_and_forwarded_as_protobuf(
    client: httpx.Client, fake: FakeUpstream, otlp: FakeOtlp, own: str
) -> None:
    hex_id = uuid.uuid4().hex
    response = post(client, _json_export(hex_id), own, content_type="application/json; charset=utf-8")
    assert response.status_code == 200, response.text
    request, sent = forwarded_export(fake)
    assert request.header("content-type") == PROTOBUF
    span = sent.resource_spans[0].scope_spans[0].spans[0]
    assert (span.trace_id.hex(), span.span_id.hex(), span.name) == (hex_id, "0102030405060708", "root")


def test_json_exports_are_checked_like_protobuf_ones(
    client: httpx.Client, fake: FakeUpstream, otlp: FakeOtlp, own: str, foreign: str
) -> None:
    victim = otlp.add(foreign)
    response = post(client, _json_export(victim), own, content_type="application/json")
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST")
    duplicate_keys = b'{"resourceSpans": [], "resourceSpans": []}'
    assert_mlflow_error(
        post(client, duplicate_keys, own, content_type="application/json"), 400, "INVALID_PARAMETER_VALUE"
    )
    assert fake.forwarded() == []


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("GZIP", lambda data: gzip.compress(data[:10]) + gzip.compress(data[10:])),  # two members
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data)[2:-4]),  # raw deflate
    ],
)
def test_compressed_exports_are_decompressed_and_checked(
    client: httpx.Client,
    fake: FakeUpstream,
    otlp: FakeOtlp,
    own: str,
    foreign: str,
    encoding: str,
    compress: Callable[[bytes], bytes],
) -> None:
    victim = otlp.add(foreign)
    attack = compress(export(victim).SerializeToString())
    assert_mlflow_error(
        post(client, attack, own, headers={"content-encoding": encoding}), 404, "RESOURCE_DOES_NOT_EXIST"
    )
    assert fake.forwarded() == []
    message = export(uuid.uuid4().hex)
    response = post(client, compress(message.SerializeToString()), own, headers={"content-encoding": encoding})
    assert response.status_code == 200, response.text
    request, sent = forwarded_export(fake)
    assert sent == message and request.header("content-encoding") is None


def test_a_decompression_bomb_is_413(client: httpx.Client, fake: FakeUpstream, otlp: FakeOtlp, own: str) -> None:
    bomb = gzip.compress(b"\0" * (16 * 1024 * 1024 + 1))
    assert len(bomb) < 100_000
    response = post(client, bomb, own, headers={"content-encoding": "gzip"})
    assert_mlflow_error(response, 413, "REQUEST_LIMIT_EXCEEDED")
    fake.assert_untouched()


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"\xff\xff\xff", {}),  # not protobuf
        (ExportTraceServiceRequest().SerializeToString(), {}),  # no spans
        (b"x", {"content-type": "text/plain"}),
        (b"x", {"content-encoding": "br"}),
        (b"not gzip", {"content-encoding": "gzip"}),
        (b"{}", {"content-type": "application/json"}),
        (b"[1]", {"content-type": "application/json"}),
    ],
)
def test_unreadable_exports_are_400(
    client: httpx.Client, fake: FakeUpstream, otlp: FakeOtlp, own: str, body: bytes, headers: dict[str, str]
) -> None:
    assert_mlflow_error(post(client, body, own, headers=headers), 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


@pytest.mark.parametrize("trace_id", [b"\x01" * 8, b"\x01" * 17, b"\0" * 16, b"\0" + b"\x01" * 16])
def test_trace_ids_must_be_16_bytes(
    client: httpx.Client, fake: FakeUpstream, otlp: FakeOtlp, own: str, trace_id: bytes
) -> None:
    body = export("00", trace_id_bytes=trace_id).SerializeToString()
    assert_mlflow_error(post(client, body, own), 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


def test_unknown_fields_are_not_forwarded(client: httpx.Client, fake: FakeUpstream, otlp: FakeOtlp, own: str) -> None:
    message = export(uuid.uuid4().hex)
    unknown_field = bytes([(999 << 3 | 2) & 0x7F | 0x80, (999 << 3 | 2) >> 7, 3]) + b"abc"
    response = post(client, message.SerializeToString() + unknown_field, own)
    assert response.status_code == 200, response.text
    request, _ = forwarded_export(fake)
    assert request.body == message.SerializeToString()


# -- tags written through span and resource attributes ---------------------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "resource"),
    [
        ({"mlflow.traceTag.matih.tenant_id": "globex"}, None),
        ({"mlflow.traceTag.mlflow.artifactLocation": "mlflow-artifacts:/1/traces/x/artifacts"}, None),
        ({"mlflow.traceTag.mlflow.trace.spansLocation": "ARCHIVE_REPO"}, None),
        ({"mlflow.traceTag.mlflow.trace.archiveLocation": "s3://victim/traces"}, None),
        (None, {"matih.tenant_id": "globex"}),
        (None, {"Matih.User_Id": "bob"}),
    ],
)
def test_reserved_and_storage_tags_cannot_be_written_through_attributes(
    client: httpx.Client,
    fake: FakeUpstream,
    otlp: FakeOtlp,
    own: str,
    attributes: dict[str, str] | None,
    resource: dict[str, str] | None,
) -> None:
    body = export(uuid.uuid4().hex, attributes=attributes, resource=resource).SerializeToString()
    assert_mlflow_error(post(client, body, own), 403, "PERMISSION_DENIED")
    fake.assert_untouched()


def test_ordinary_tag_attributes_are_forwarded(
    client: httpx.Client, fake: FakeUpstream, otlp: FakeOtlp, own: str
) -> None:
    body = export(uuid.uuid4().hex, attributes={"mlflow.traceTag.team": "ml"}, resource={"deployment": "prod"})
    assert post(client, body.SerializeToString(), own).status_code == 200


def test_viewers_cannot_export_spans(client: httpx.Client, fake: FakeUpstream, otlp: FakeOtlp, own: str) -> None:
    headers = {**bearer("acme", "vic", roles=["viewer"]), "content-type": PROTOBUF, "x-mlflow-experiment-id": own}
    response = client.post(OTLP, content=export(uuid.uuid4().hex).SerializeToString(), headers=headers)
    assert_mlflow_error(response, 403, "PERMISSION_DENIED")
    fake.assert_untouched()


def test_upstream_errors_keep_mlflows_shape(client: httpx.Client, fake: FakeUpstream, otlp: FakeOtlp, own: str) -> None:
    fake.on("POST", OTLP, Reply(422, {"detail": "Cannot convert OpenTelemetry span to MLflow span"}))
    response = post(client, export(uuid.uuid4().hex).SerializeToString(), own)
    body: dict[str, Any] = assert_mlflow_error(response, 422, "INTERNAL_ERROR")
    assert re.search(r"HTTP 422", body["message"])
