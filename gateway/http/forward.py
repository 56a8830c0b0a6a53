"""Forwarding to the upstream in exactly two shapes: stream untouched, or buffer + rewrite.

Upstream request headers are built from an allow-list, never copied: the client's
``Authorization``, ``Cookie``, ``Origin``, identity and workspace headers never reach MLflow.
Successful responses are streamed unless the route's policy rewrites them; error responses are
always buffered so they can be put in MLflow's error shape, stripped of the tenant prefix and, for
5xx, redacted of internal details.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

import orjson
from starlette.types import Receive, Scope, Send

from gateway.errors import GatewayError, redact_internal_details
from gateway.http.canonical import Query, dump_json
from gateway.http.upstream import UpstreamResponse
from gateway.middleware import client_disconnect
from gateway.observability import client_address
from gateway.policy.core import Exchange, Policy

# Client headers that may be passed upstream (lower-case), with the name they are sent under.
# Everything else is dropped.
_FORWARDED_REQUEST_HEADERS = {
    name: name.decode("latin-1")
    for name in (
        b"accept",
        b"accept-language",
        b"user-agent",
        b"x-mlflow-client-version",
        b"if-none-match",
        b"if-modified-since",
    )
}
# Upstream response headers passed back to the client (content-length is handled on its own).
_RETURNED_RESPONSE_HEADERS = frozenset(
    {
        b"content-type",
        b"content-disposition",
        b"cache-control",
        b"etag",
        b"last-modified",
        b"expires",
        b"content-encoding",
        b"x-content-type-options",
    }
)
# A streamed response whose Content-Length is at most this is read whole and sent in one message.
WHOLE_BODY_BYTES = 64 * 1024
_STATUS_ERROR_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "ENDPOINT_NOT_FOUND",
}


# What quote(text, safe=...) leaves as it is: letters, digits, "_.-~" and the safe characters.
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
_PATH_UNCHANGED = re.compile(r"[A-Za-z0-9/:@!$&'()*+,;=._~-]*")


def quote_component(text: str) -> str:
    """``quote(text, safe="")``, skipped when it would change nothing (ids, names: most values)."""
    if text.isascii() and (text.isalnum() or text.isidentifier()):  # hex ids and field names, without a regex
        return text
    return text if _UNRESERVED.fullmatch(text) else quote(text, safe="")


def quote_path(path: str) -> str:
    """Percent-encode a decoded path for the upstream; ``/`` and RFC 3986's sub-delimiters stay as they are.

    A ``%3F`` or ``%23`` inside a segment (a tag key, an artifact name) is thus sent encoded, staying
    part of the path instead of starting a query or a fragment.
    """
    return path if _PATH_UNCHANGED.fullmatch(path) else quote(path, safe=_PATH_SAFE)


def encode_query(query: Query) -> str:
    """Re-serialise a checked query (only what the gateway parsed is sent upstream)."""
    if len(query) == 1:  # one parameter with one value, an id (most queries): no loop, no calls
        for key, values in query.items():
            if len(values) == 1:
                value = values[0]
                if key.isidentifier() and value.isalnum() and key.isascii() and value.isascii():
                    return f"{key}={value}"
    parts = []  # a loop, not a generator expression: the cheaper one on the request path
    for key, values in query.items():
        quoted = quote_component(key)
        for value in values:
            parts.append(f"{quoted}={quote_component(value)}")
    return "&".join(parts)


def upstream_headers(scope: Scope, ex: Exchange, *, content_type: str | None) -> dict[str, str]:
    """Build the upstream request headers: allow-listed client headers plus the gateway's own."""
    headers: dict[str, str] = {}
    for key, value in scope["headers"]:
        name = _FORWARDED_REQUEST_HEADERS.get(key)
        if name is not None:
            headers[name] = value.decode("latin-1")
    # Always set: MLflow's assistant trusts loopback callers without X-Forwarded-For (mlflow-api §9g).
    # No X-Forwarded-Proto: the gateway serves plain HTTP (TLS ends in front of it), so it could only
    # ever say "http", which is what MLflow assumes without it. A client's X-Forwarded-* never passes.
    headers["x-forwarded-for"] = client_address(scope)
    headers["x-request-id"] = ex.request_id
    # accept-encoding: identity is the UpstreamClient's own header.
    if content_type:
        headers["content-type"] = content_type
    # Headers a policy step checked (e.g. an owned experiment id) and asked to forward.
    if ex.forward_headers:
        headers.update(ex.forward_headers)
    return headers


def read_whole(length: bytes | None) -> bool:
    """Whether an answer of this Content-Length is read whole and sent as one message (else streamed)."""
    return length is not None and length.isdigit() and int(length) <= WHOLE_BODY_BYTES


# Upstream header names as MLflow's servers spell them (lower case, or Title-Case) -> the lower-case name,
# or None for a header that is dropped: most names are recognised without a .lower() per header. MLflow
# answers every API call with X-Frame-Options (the gateway sends its own) and Vary (for CORS, which the
# gateway does not pass).
_DROPPED_USUAL = (b"date", b"server", b"connection", b"keep-alive", b"x-frame-options", b"vary")
_USUAL_SPELLINGS: dict[bytes, bytes | None] = {
    spelling: (name if name in _RETURNED_RESPONSE_HEADERS or name == b"content-length" else None)
    for name in (*_RETURNED_RESPONSE_HEADERS, b"content-length", *_DROPPED_USUAL)
    for spelling in (name, name.title())
}


def _response_headers(upstream: Iterable[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], bytes, bytes | None]:
    """The upstream headers returned to the client (names lower-cased), its content type and content length."""
    headers: list[tuple[bytes, bytes]] = []
    content_type, length = b"", None
    usual = _USUAL_SPELLINGS
    for key, value in upstream:
        name = usual.get(key, key)
        if name is None:  # a usual header that is dropped
            continue
        if name is key and key not in usual:  # another spelling, or another header
            name = key.lower()
        if name == b"content-length":
            length = value
            continue
        if name == b"content-type" and not content_type:  # the first one, as a client would read it
            content_type = value
        if name in _RETURNED_RESPONSE_HEADERS:
            headers.append((name, value))
    return headers, content_type, length


async def send_upstream_response(
    ex: Exchange, policy: Policy, response: UpstreamResponse, receive: Receive, send: Send
) -> None:
    """Relay the upstream response in the shape the status and policy call for.

    ``receive`` tells when the client has gone during a streamed answer: the relay then stops reading
    the upstream (the caller closes its connection).
    """
    headers, content_type, length = _response_headers(response.headers)
    is_json = content_type.startswith(b"application/json")
    if response.status < 400 and not (policy.response and is_json):  # no rewriting step: not buffered
        if length is not None:
            headers.append((b"content-length", length))
            if read_whole(length):
                # Small and of known size (most API answers): read it whole and send it as one message,
                # one pass through the send chain instead of three (bench/RESULTS.md, section 2c).
                whole = await response.read()
                await send({"type": "http.response.start", "status": response.status, "headers": headers})
                await send({"type": "http.response.body", "body": whole})
                return
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        chunks = response.iter_chunks()
        try:
            async with client_disconnect(receive) as disconnected:
                async for chunk in chunks:
                    if disconnected.is_set():
                        return
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        finally:
            await chunks.aclose()
        return
    raw = await response.read()
    if response.status >= 400:
        body: bytes = _error_body(ex, policy, response.status, raw, is_json=is_json)
        content_type = b"application/json"
    elif is_json:
        body = _rewrite(ex, policy, response.status, raw)
    else:
        body = raw
    headers = [(key, value) for key, value in headers if key not in (b"content-type", b"content-encoding")]
    headers.append((b"content-length", str(len(body)).encode()))
    headers.append((b"content-type", content_type or b"application/json"))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _decode(raw: bytes) -> tuple[Any, bool]:
    """Decode a JSON response; the flag is True when it needed the stdlib (NaN/Infinity literals)."""
    try:
        return orjson.loads(raw), False
    except orjson.JSONDecodeError:
        # MLflow may emit NaN/Infinity literals, which orjson refuses and the stdlib accepts.
        return json.loads(raw), True


def _encode(value: Any, *, non_finite: bool) -> bytes:
    """Encode a rewritten body; NaN/Infinity are kept as MLflow wrote them (orjson would write null)."""
    return dump_json(value) if non_finite else orjson.dumps(value)


def _rewrite(ex: Exchange, policy: Policy, status: int, raw: bytes) -> bytes:
    try:
        body, non_finite = _decode(raw) if raw else ({}, False)
    except ValueError:
        return raw
    if not isinstance(body, dict):
        return raw
    for step in policy.response:
        step(ex, status, body)
    return _encode(body, non_finite=non_finite)


def _error_body(ex: Exchange, policy: Policy, status: int, raw: bytes, *, is_json: bool) -> bytes:
    """MLflow's error shape for any upstream error; 5xx messages are redacted."""
    parsed: Any = None
    if is_json and raw:
        try:
            parsed, _ = _decode(raw)
        except ValueError:
            parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("message"), str):
        error_code = parsed.get("error_code")
        body: dict[str, Any] = {
            "error_code": error_code if isinstance(error_code, str) else _default_code(status),
            "message": parsed["message"],
        }
    else:
        body = {"error_code": _default_code(status), "message": f"Upstream MLflow answered HTTP {status}"}
    if status >= 500:
        body["message"] = redact_internal_details(body["message"])
    for step in policy.response:
        try:
            step(ex, status, body)
        except GatewayError:
            continue
    return orjson.dumps(body)


def _default_code(status: int) -> str:
    return _STATUS_ERROR_CODES.get(status, "INTERNAL_ERROR")
