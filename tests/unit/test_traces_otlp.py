"""OTLP body decoding: content types, encodings, size caps and the trace ids MLflow will derive."""

from __future__ import annotations

import base64
import gzip
import zlib

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from gateway.errors import BadRequest, PayloadTooLarge
from gateway.policy import otlp
from gateway.policy.ownership import TRACE_ID

TRACE = bytes(range(1, 17))
LIMIT = 1024


def _request() -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name = TRACE, b"\x01" * 8, "root"
    return request


@pytest.mark.parametrize(
    ("encoding", "compressed"),
    [
        ("identity", b"payload"),
        ("gzip", gzip.compress(b"payload")),
        ("gzip", gzip.compress(b"pay") + gzip.compress(b"load")),
        ("deflate", zlib.compress(b"payload")),
        ("deflate", zlib.compress(b"payload")[2:-4]),
    ],
)
def test_decompress(encoding: str, compressed: bytes) -> None:
    assert otlp.decompress(compressed, encoding, limit=LIMIT) == b"payload"


@pytest.mark.parametrize(
    ("encoding", "data", "error"),
    [
        ("identity", b"x" * (LIMIT + 1), PayloadTooLarge),
        ("gzip", gzip.compress(b"x" * (LIMIT + 1)), PayloadTooLarge),
        ("gzip", gzip.compress(b"x" * LIMIT) + gzip.compress(b"y"), PayloadTooLarge),
        ("deflate", zlib.compress(b"x" * (LIMIT + 1)), PayloadTooLarge),
        ("gzip", gzip.compress(b"payload")[:-3], BadRequest),
        ("gzip", b"not gzip", BadRequest),
        ("gzip", gzip.compress(b"a") + b"trailing garbage", BadRequest),
        ("deflate", b"not deflate", BadRequest),
        ("br", b"x", BadRequest),
        ("gzip, gzip", b"x", BadRequest),
    ],
)
def test_decompress_refuses(encoding: str, data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        otlp.decompress(data, encoding, limit=LIMIT)


def test_decompress_accepts_exactly_the_limit() -> None:
    assert len(otlp.decompress(gzip.compress(b"x" * LIMIT), "gzip", limit=LIMIT)) == LIMIT


def test_decode_protobuf_and_json_give_the_same_message() -> None:
    expected = _request()
    from_protobuf = otlp.decode_export_request(
        expected.SerializeToString(), content_type="application/x-protobuf", content_encoding=None, limit=LIMIT
    )
    json_body = (
        b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"' + TRACE.hex().encode() + b'",'
        b'"spanId":"0101010101010101","name":"root"}]}]}]}'
    )
    from_json = otlp.decode_export_request(
        json_body, content_type="Application/JSON; charset=utf-8", content_encoding="identity", limit=LIMIT
    )
    assert from_protobuf == from_json == expected


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"{}", "application/json"),
        (b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"zz"}]}]}]}', "application/json"),
        (b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":7}]}]}]}', "application/json"),
        (b'{"resourceSpans":"x"}', "application/json"),
        (b"\xff", "application/x-protobuf"),
        (b"", "application/x-protobuf"),
        (b"x", None),
        (b"x", "application/protobuf"),
    ],
)
def test_decode_refuses_unreadable_bodies(body: bytes, content_type: str | None) -> None:
    with pytest.raises(BadRequest):
        otlp.decode_export_request(body, content_type=content_type, content_encoding=None, limit=LIMIT)


def test_json_ids_are_converted_like_mlflow_does() -> None:
    data = {"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "0a0b", "parentSpanId": ""}]}]}]}
    converted = otlp._hex_ids_to_base64(data)
    assert converted["resourceSpans"][0]["scopeSpans"][0]["spans"][0] == {
        "traceId": base64.b64encode(b"\x0a\x0b").decode(),
        "parentSpanId": "",
    }


@pytest.mark.parametrize(
    ("trace_id", "span_id", "parent", "expected"),
    [
        (TRACE, b"\x01" * 8, b"", "tr-" + TRACE.hex()),
        (b"\0" * 15 + b"\x01", b"\x01" * 8, b"\x02" * 8, "tr-" + "0" * 31 + "1"),
        (TRACE[:15], b"\x01" * 8, b"", None),
        (TRACE + b"\0", b"\x01" * 8, b"", None),
        (b"\0" * 16, b"\x01" * 8, b"", None),
        (TRACE, b"\x01" * 7, b"", None),
        (TRACE, b"\x01" * 8, b"\x01", None),
    ],
)
def test_mlflow_trace_id(trace_id: bytes, span_id: bytes, parent: bytes, expected: str | None) -> None:
    span = Span(trace_id=trace_id, span_id=span_id, parent_span_id=parent)
    if expected is None:
        with pytest.raises(BadRequest):
            otlp.mlflow_trace_id(span)
    else:
        assert otlp.mlflow_trace_id(span) == expected
        assert TRACE_ID.match(expected)


def test_mlflow_trace_id_matches_mlflows_own_derivation() -> None:
    from mlflow.entities.span import Span as MlflowSpan

    span = _request().resource_spans[0].scope_spans[0].spans[0]
    assert MlflowSpan.from_otel_proto(span).trace_id == otlp.mlflow_trace_id(span)
