"""OTLP/HTTP trace export bodies: decoded strictly, checked, re-encoded as protobuf.

MLflow's ``/v1/traces`` (``server/otel_api.py:export_traces``) accepts protobuf or JSON, gzip or
deflate, and stores every span under ``tr-<hex of the OTel traceId>``. Spans of a trace id that
already exists are appended to that trace whatever its experiment, so the gateway must see every
trace id before forwarding. It decodes the body itself (decompressed size capped), refuses what it
cannot read, and forwards only the protobuf it re-serialised, so MLflow parses exactly the message
the gateway checked.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from collections.abc import Iterator
from typing import Any

from google.protobuf.json_format import ParseDict
from google.protobuf.json_format import ParseError as JsonParseError
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from gateway.errors import BadRequest, PayloadTooLarge
from gateway.http.canonical import parse_json_object
from gateway.policy.core import Body, Exchange, Policy
from gateway.policy.traces import check_trace_tag_key, require_new_or_owned_trace

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
# The span id fields OTLP/JSON writes in hex, where protobuf's JSON mapping expects base64
# (converted exactly as MLflow's `otel_api._convert_otlp_json_ids_to_base64` does).
_HEX_ID_FIELDS = ("traceId", "spanId", "parentSpanId")
_TRACE_ID_BYTES = 16
_SPAN_ID_BYTES = 8
EXPERIMENT_HEADER = "x-mlflow-experiment-id"
RUN_HEADER = "x-mlflow-run-id"
TRACE_TAG_PREFIX = "mlflow.traceTag."  # root-span attributes MLflow turns into trace tags
MAX_TRACES = 1000  # distinct trace ids per export, each looked up unless cached
MAX_DECOMPRESSED_BYTES = 16 * 1024 * 1024


def decode_export_request(
    body: bytes, *, content_type: str | None, content_encoding: str | None, limit: int
) -> ExportTraceServiceRequest:
    """Decompress (at most ``limit`` bytes) and parse an OTLP trace export; a 400 if unreadable."""
    media_type = content_type.split(";", 1)[0].strip().lower() if content_type else ""
    if media_type not in (PROTOBUF, JSON):
        raise BadRequest(f"Invalid Content-Type: {content_type}. Expected: {PROTOBUF} or {JSON}")
    payload = decompress(body, (content_encoding or "identity").strip().lower(), limit=limit)
    request = ExportTraceServiceRequest()
    try:
        if media_type == JSON:
            ParseDict(_hex_ids_to_base64(parse_json_object(payload)), request, ignore_unknown_fields=True)
        else:
            request.ParseFromString(payload)
    except (DecodeError, JsonParseError, ValueError, TypeError, RecursionError):
        raise BadRequest("Invalid OpenTelemetry format") from None
    # Forward only what this gateway's schema understood.
    request.DiscardUnknownFields()
    if not request.resource_spans:
        raise BadRequest("Invalid OpenTelemetry format - no spans found")
    return request


def decompress(body: bytes, encoding: str, *, limit: int) -> bytes:
    """Undo ``Content-Encoding`` (identity, gzip, deflate: MLflow's set) without exceeding ``limit``."""
    if encoding == "identity":
        if len(body) > limit:
            raise PayloadTooLarge(f"OTLP body exceeds {limit} bytes")
        return body
    if encoding == "gzip":
        return _inflate(body, wbits=16 + zlib.MAX_WBITS, limit=limit, members=True)
    if encoding == "deflate":
        try:  # zlib-wrapped (RFC 1950), then raw deflate, as MLflow tries them
            return _inflate(body, wbits=zlib.MAX_WBITS, limit=limit, members=False)
        except BadRequest:
            return _inflate(body, wbits=-zlib.MAX_WBITS, limit=limit, members=False)
    raise BadRequest(f"Unsupported Content-Encoding: {encoding}")


def _inflate(data: bytes, *, wbits: int, limit: int, members: bool) -> bytes:
    """Decompress one stream (or, for gzip, every concatenated member) into at most ``limit`` bytes."""
    out = bytearray()
    remaining = data
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            out += inflater.decompress(remaining, limit + 1 - len(out))
        except zlib.error:
            raise BadRequest("Failed to decompress the OTLP payload") from None
        if len(out) > limit or inflater.unconsumed_tail:
            raise PayloadTooLarge(f"Decompressed OTLP body exceeds {limit} bytes")
        if not inflater.eof:
            raise BadRequest("Failed to decompress the OTLP payload (truncated)")
        remaining = inflater.unused_data
        if not (members and remaining):
            return bytes(out)


def _hex_ids_to_base64(data: dict[str, Any]) -> dict[str, Any]:
    """OTLP/JSON ids are hex; protobuf's JSON mapping of ``bytes`` is base64 (as MLflow converts)."""
    for resource_span in _objects(data.get("resourceSpans")):
        for scope_span in _objects(resource_span.get("scopeSpans")):
            for span in _objects(scope_span.get("spans")):
                for field in _HEX_ID_FIELDS:
                    value = span.get(field)
                    if value:
                        if not isinstance(value, str):
                            raise BadRequest(f"OTLP span field '{field}' must be a hex string")
                        try:
                            span[field] = base64.b64encode(bytes.fromhex(value)).decode("ascii")
                        except ValueError:
                            raise BadRequest(f"OTLP span field '{field}' is not valid hex") from None
    return data


def _objects(value: object) -> Iterator[dict[str, Any]]:
    if isinstance(value, list):
        yield from (item for item in value if isinstance(item, dict))


def iter_spans(request: ExportTraceServiceRequest) -> Iterator[Span]:
    """Every span of the export, in order."""
    for resource_span in request.resource_spans:
        for scope_span in resource_span.scope_spans:
            yield from scope_span.spans


def resource_attribute_keys(request: ExportTraceServiceRequest) -> Iterator[str]:
    """The keys of every resource attribute (MLflow copies most of them into trace tags)."""
    for resource_span in request.resource_spans:
        yield from (attribute.key for attribute in resource_span.resource.attributes)


def mlflow_trace_id(span: Span) -> str:
    """The MLflow trace id MLflow will file this span under, after checking the span's ids.

    MLflow derives ``tr-`` + 32 hex digits from the 16-byte OTel trace id
    (``entities/span.py:Span.from_otel_proto``); ids of any other length, and the all-zero id
    OTel calls invalid, are refused, so the check and MLflow always name the same trace.
    """
    if len(span.trace_id) != _TRACE_ID_BYTES or not any(span.trace_id):
        raise BadRequest(f"OTLP span trace id must be {_TRACE_ID_BYTES} bytes and not all zero")
    if len(span.span_id) != _SPAN_ID_BYTES:
        raise BadRequest(f"OTLP span id must be {_SPAN_ID_BYTES} bytes")
    if span.parent_span_id and len(span.parent_span_id) != _SPAN_ID_BYTES:
        raise BadRequest(f"OTLP parent span id must be empty or {_SPAN_ID_BYTES} bytes")
    return "tr-" + binascii.hexlify(span.trace_id).decode("ascii")


# -- the policy step ---------------------------------------------------------------------------------


def _single_header(ex: Exchange, name: str) -> str | None:
    values = ex.headers.get(name, [])
    if len(values) > 1:
        raise BadRequest(f"Header '{name}' must be given once")
    return values[0] if values else None


async def check_otlp_export(ex: Exchange) -> None:
    """Check an OTLP trace export and replace it with the checked, re-serialised protobuf.

    The experiment header must name one of the tenant's experiments (``0`` -> its Default), the run
    header (spans are linked to it) one of its runs. Every span's trace id must be new or the
    tenant's (leak c). Resource attributes and root-span ``mlflow.traceTag.*`` attributes become
    trace tags in MLflow, so they may not write ``matih.*`` or the storage-location tags. Only the
    checked headers and body are forwarded.
    """
    raw_experiment = _single_header(ex, EXPERIMENT_HEADER)
    if not raw_experiment:
        raise BadRequest(f"Missing header '{EXPERIMENT_HEADER}'")
    run_id = _single_header(ex, RUN_HEADER)
    request = decode_export_request(
        ex.raw_body,
        content_type=_single_header(ex, "content-type"),
        content_encoding=_single_header(ex, "content-encoding"),
        limit=min(MAX_DECOMPRESSED_BYTES, ex.services.settings.max_json_body_bytes),
    )
    for key in resource_attribute_keys(request):
        check_trace_tag_key(key)
    trace_ids: dict[str, None] = {}
    for span in iter_spans(request):
        trace_ids[mlflow_trace_id(span)] = None
        for attribute in span.attributes:
            if attribute.key.startswith(TRACE_TAG_PREFIX):
                check_trace_tag_key(attribute.key[len(TRACE_TAG_PREFIX) :])
    if len(trace_ids) > MAX_TRACES:
        raise BadRequest(f"At most {MAX_TRACES} traces per OTLP export are allowed")
    # Local checks first: the look-ups below only run for an export that could be forwarded.
    ownership = ex.services.ownership
    experiment_id = await ownership.resolve_experiment_id(ex.tenant, raw_experiment)
    await ownership.require_experiment(ex.tenant, experiment_id)
    forward = {"content-type": PROTOBUF, EXPERIMENT_HEADER: experiment_id}
    if run_id:
        await ownership.require_run(ex.tenant, run_id)
        forward[RUN_HEADER] = run_id
    for trace_id in trace_ids:
        await require_new_or_owned_trace(ex, trace_id)
    ex.raw_body = request.SerializeToString()
    ex.forward_headers.update(forward)


OTLP_EXPORT = Policy(
    request=(check_otlp_export,),
    body=Body.RAW,
    description="OE(header) + OR(header); every span's trace new or owned (leak c); re-encoded protobuf",
)
