"""Strict request parsing: path, query and JSON body in one canonical form, or a 400.

MLflow parses loosely (it percent-decodes paths, reads a JSON body on a GET with no query, takes the
last of duplicate JSON keys, decodes a JSON string that contains JSON twice, and accepts camelCase
aliases). The gateway parses strictly, checks the parsed form, and forwards only what it
re-serialised, so no parser differential between the gateway and MLflow can be exploited.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson

from gateway.errors import BadRequest

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_ENCODED_SEPARATOR = re.compile(rb"%(2[fF]|5[cC])")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_CAMEL_HUMP = re.compile(r"(?<=[a-z0-9])([A-Z])")
# 19 digits in a row: an integer that may not fit 64 bits (orjson reads it as a float). Looked for in the
# body with every digit turned into "0" and everything else into " ": a regular expression takes ~20 us
# on a 700-byte body (it retries at each digit), translate() and a substring search ~2 us.
_DIGITS_AS_ZEROS = bytes(0x30 if 0x30 <= byte <= 0x39 else 0x20 for byte in range(256))
_LONG_DIGITS = b"0" * 19

# Byte values, not one-byte strings: `0x25 in raw` is a plain scan, while `b"%" in raw` goes through
# the buffer protocol, ten times slower (~1 k instructions per test, bench/RESULTS.md section 2e).
_PERCENT = ord("%")
_PLUS = ord("+")
_BACKSLASH = ord("\\")

Query = dict[str, list[str]]
JsonObject = dict[str, Any]


def canonical_path(raw_path: bytes) -> str:
    """Decode a request path exactly once and refuse every ambiguous form.

    Refused: encoded ``/`` or ``\\``, a second layer of percent-encoding (``%252F``), empty segments
    (``//``), dot segments, backslashes, control characters and invalid UTF-8. What remains maps to
    one route and one object, whatever decoder sits upstream.
    """
    if not raw_path.startswith(b"/"):
        raise BadRequest("Request path must be absolute")
    encoded = _PERCENT in raw_path
    if encoded and _ENCODED_SEPARATOR.search(raw_path):
        raise BadRequest("Encoded path separators are not allowed")
    try:
        path = (unquote_to_bytes(raw_path) if encoded else raw_path).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("Request path is not valid UTF-8") from None
    if encoded and _PERCENT_ESCAPE.search(path):
        raise BadRequest("Request path is percent-encoded more than once")
    # str.isprintable() is False for exactly the control characters among ASCII ones (no regex needed);
    # beyond ASCII it also refuses printable-looking characters, so those paths take the regex.
    if (not (path.isascii() and path.isprintable()) and _CONTROL.search(path)) or "\\" in path:
        raise BadRequest("Request path contains forbidden characters")
    if "//" not in path and "/." not in path:  # no empty or dot segment possible (most requests)
        return path
    segments = path.split("/")[1:]
    # A trailing slash is one empty last segment (MLflow has `/ajax-api/3.0/jobs/`); any other empty
    # segment is a `//`.
    inner = segments[:-1] if segments and segments[-1] == "" else segments
    for segment in inner:
        if segment in ("", ".", ".."):
            raise BadRequest("Request path contains empty or dot segments")
    return path


def parse_query(raw_query: bytes) -> Query:
    """Parse a query string into ``{key: [values...]}``; malformed escapes or UTF-8 are a 400.

    Which keys may repeat depends on the route and is checked by :func:`single_value`.
    """
    query: Query = {}
    if not raw_query:
        return query
    if _PERCENT not in raw_query and _PLUS not in raw_query:
        # Nothing to unescape (most queries): decode and check the whole string once, not part by part.
        text = _decode_query_component(raw_query)
        for item in text.split("&"):
            if item:
                name, _, text_value = item.partition("=")
                if not name:
                    raise BadRequest("Query string has an empty parameter name")
                query.setdefault(name, []).append(text_value)
        return query
    for part in raw_query.split(b"&"):
        if not part:
            continue
        key_raw, _, value_raw = part.partition(b"=")
        key = _decode_query_component(key_raw)
        value = _decode_query_component(value_raw)
        if not key:
            raise BadRequest("Query string has an empty parameter name")
        query.setdefault(key, []).append(value)
    return query


def _decode_query_component(raw: bytes) -> str:
    try:
        if _PERCENT in raw or _PLUS in raw:
            text = unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")
        else:
            text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("Query string is not valid UTF-8") from None
    if "\x00" in text:
        raise BadRequest("Query string contains a NUL character")
    return text


def single_value(query: Query, key: str) -> str | None:
    """The one value of a scalar query parameter; a repeated scalar is ambiguous, hence a 400."""
    values = query.get(key)
    if values is None:
        return None
    if len(values) != 1:
        raise BadRequest(f"Query parameter '{key}' must be given once")
    return values[0]


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> JsonObject:
    result: JsonObject = {}
    for key, value in pairs:
        if key in result:
            raise BadRequest(f"Duplicate JSON key '{key}'")
        result[key] = value
    return result


def parse_json_document(raw: str | bytes, *, what: str = "Request body") -> Any:
    """Parse any JSON document strictly (duplicate keys refused); 400 naming ``what`` otherwise."""
    try:
        return json.loads(raw, object_pairs_hook=_object_without_duplicates)
    except BadRequest:
        raise
    except (ValueError, RecursionError):
        raise BadRequest(f"{what} is not valid JSON") from None


def parse_json_object(body: bytes) -> JsonObject:
    """Parse a request body that must be one JSON object with no duplicate keys.

    An empty body is an empty object (the MLflow client sends ``{}`` or nothing for argument-less
    POSTs). A JSON string holding JSON, an array or a scalar is refused: MLflow would decode a
    string body a second time.
    """
    if not body.strip():
        return {}
    value = _parse_plain_object(body)
    if value is not None:
        return value
    value = parse_json_document(body)
    if not isinstance(value, dict):
        raise BadRequest("Request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(body):
        _refuse_lone_surrogates(value)
    return value


def _parse_plain_object(body: bytes) -> JsonObject | None:
    """The usual body, an object without escapes, parsed by orjson; ``None``: the strict parser decides.

    orjson is ~7x faster than the stdlib with a duplicate-key hook, but keeps the last of duplicate
    keys silently. Without a backslash in the body, every string comes back exactly as written, and
    every ':' outside a string stands for one key: re-serialised, a value with all its keys has as
    many ':' as the body, and one that lost a duplicate has fewer. Anything else (escapes, NaN and
    Infinity, integers beyond 64 bits, another encoding, an error) goes to the strict parser, which
    also writes the error message.
    """
    if _BACKSLASH in body or _LONG_DIGITS in body.translate(_DIGITS_AS_ZEROS):
        return None
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(value) is not dict or body.count(b":") != orjson.dumps(value).count(b":"):
        return None
    return value


def _refuse_lone_surrogates(value: JsonObject) -> None:
    """A ``\\ud800`` escape decodes to a lone surrogate, which no UTF-8 upstream request can carry."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("Request body contains an invalid Unicode escape (lone surrogate)") from None


def snake_case(name: str) -> str:
    """``experimentIds`` -> ``experiment_ids`` (the alias MLflow's protobuf parser accepts)."""
    return _CAMEL_HUMP.sub(lambda match: "_" + match.group(1).lower(), name)


# Fields whose JSON value is a protobuf map or google.protobuf.Value: their keys are user data
# (tag names, metadata keys, arbitrary JSON) and are never renamed. Read off MLflow 3.17's protos.
# Also ``variables``, the GraphQL request's variable map (no proto has a field of that name): its keys
# are variable names and GraphQL input field names, which are camelCase by definition.
OPAQUE_FIELDS = frozenset(
    {
        "auth_config",
        "dimensions",
        "final_eval_scores",
        "headers",
        "initial_eval_scores",
        "masked_values",
        "metadata",
        "secret_value",
        "tags",
        "trace_metadata",
        "value",
        "values",
        "variables",
    }
)


def normalise_field_names(body: JsonObject) -> JsonObject:
    """Rename camelCase aliases to snake_case at every level; both spellings at once is a 400.

    MLflow's protobuf JSON parser accepts either spelling of every field, nested ones included
    (``metrics[].modelId``), so a policy that checks ``model_id`` must also see ``modelId``. The keys
    of map and ``google.protobuf.Value`` fields (:data:`OPAQUE_FIELDS`) are user data and are kept;
    a map given as a list of ``{key, value}`` objects is still normalised item by item.
    """
    normalised: JsonObject = {}
    for key, value in body.items():
        name = key if key.islower() else snake_case(key)  # islower(): no upper-case letter to rename
        if name in normalised:
            raise BadRequest(f"Field '{name}' is given twice (as '{key}' and '{name}')")
        if isinstance(value, dict):
            if name not in OPAQUE_FIELDS:
                value = normalise_field_names(value)
        elif isinstance(value, list):
            value = _normalise_list(value)
        normalised[name] = value
    return normalised


def parse_json_message(body: bytes) -> JsonObject:
    """:func:`parse_json_object`, then :func:`normalise_field_names`, which changes nothing (and is skipped) when
    the body has no escape and no upper-case ASCII letter: only ``[A-Z]`` after a letter or digit is renamed."""
    value = parse_json_object(body)
    if _BACKSLASH in body or body.lower() != body:
        return normalise_field_names(value)
    return value


def _normalise_list(items: list[Any]) -> list[Any]:
    return [
        normalise_field_names(item)
        if isinstance(item, dict)
        else _normalise_list(item)
        if isinstance(item, list)
        else item
        for item in items
    ]


def dump_json(value: Any) -> bytes:
    """Re-serialise a checked request body: orjson, or the stdlib where it keeps NaN/Infinity metric values.

    orjson writes NaN and Infinity as ``null`` and refuses integers beyond 64 bits; a body whose orjson
    form holds ``null`` at all, or that orjson refuses, is written by the stdlib, which keeps both.
    """
    try:
        encoded = orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: an integer beyond 64 bits
        pass
    else:
        if b"null" not in encoded:
            return encoded
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
