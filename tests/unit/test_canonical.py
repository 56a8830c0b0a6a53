"""Strict parsing: every ambiguous form is refused before anything reaches the upstream."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.errors import BadRequest
from gateway.http.canonical import (
    canonical_path,
    dump_json,
    normalise_field_names,
    parse_json_message,
    parse_json_object,
    parse_query,
    single_value,
    snake_case,
)
from gateway.http.forward import quote_component, quote_path


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"/api/2.0/mlflow/runs/get", "/api/2.0/mlflow/runs/get"),
        (b"/ajax-api/3.0/jobs/", "/ajax-api/3.0/jobs/"),
        (b"/static-files/a%20b.js", "/static-files/a b.js"),
        (b"/", "/"),
    ],
)
def test_canonical_path_accepts(raw: bytes, expected: str) -> None:
    assert canonical_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"/api/2.0/mlflow/runs%2Fget",
        b"/api/2.0/mlflow/runs%2fget",
        b"/api/2.0/mlflow%5Cruns/get",
        b"//api/2.0/mlflow/runs/get",
        b"/api/2.0//mlflow/runs/get",
        b"/api/2.0/mlflow/./runs/get",
        b"/api/2.0/mlflow/runs/../runs/get",
        b"/api/2.0/mlflow/%2e%2e/runs/get",
        b"/api/2.0/mlflow-artifacts/artifacts/%2531/x",
        b"/api/2.0/mlflow-artifacts/artifacts/%252e%252e/x",
        b"/api/2.0/mlflow\\runs/get",
        b"/api/2.0/mlflow/runs/get%00",
        b"/api/2.0/mlflow/runs/get%0a",
        b"/api/2.0/mlflow/runs/get\x7f",
        b"/api/2.0/mlflow/%ff",
        b"api/2.0/mlflow/runs/get",
    ],
)
def test_canonical_path_refuses(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        canonical_path(raw)


def test_parse_query_keeps_repeats_and_decodes_once() -> None:
    query = parse_query(b"run_ids=a&run_ids=b&path=x%2520y&flag=&name=a+b")
    assert query == {"run_ids": ["a", "b"], "path": ["x%20y"], "flag": [""], "name": ["a b"]}


@pytest.mark.parametrize("raw", [b"=x", b"a=%ff", b"a=%00"])
def test_parse_query_refuses(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_query(raw)


def test_single_value_refuses_repeated_scalars() -> None:
    query = parse_query(b"run_id=a&run_id=b&x=1")
    assert single_value(query, "x") == "1"
    assert single_value(query, "missing") is None
    with pytest.raises(BadRequest, match="once"):
        single_value(query, "run_id")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", {}),
        (b"  ", {}),
        (b'{"a": 1, "b": {"c": [1, 2]}}', {"a": 1, "b": {"c": [1, 2]}}),
        (b'{"value": NaN}', None),
    ],
)
def test_parse_json_object_accepts(body: bytes, expected: dict[str, object] | None) -> None:
    parsed = parse_json_object(body)
    if expected is None:
        assert parsed["value"] != parsed["value"]  # NaN metric values survive
    else:
        assert parsed == expected


@pytest.mark.parametrize(
    "body",
    [
        b'{"run_id": "a", "run_id": "b"}',
        b'{"outer": {"k": 1, "k": 2}}',
        b'"{\\"run_id\\": \\"a\\"}"',
        b"[1, 2]",
        b"42",
        b"null",
        b"{not json",
        b"\xff\xfe",
        b"[" * 100_000,
    ],
)
def test_parse_json_object_refuses(body: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_json_object(body)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("experimentIds", "experiment_ids"), ("run_id", "run_id"), ("runUuid", "run_uuid"), ("maxResults", "max_results")],
)
def test_snake_case(name: str, expected: str) -> None:
    assert snake_case(name) == expected


def test_normalise_field_names_renames_aliases() -> None:
    assert normalise_field_names({"experimentIds": ["1"], "maxResults": 5}) == {
        "experiment_ids": ["1"],
        "max_results": 5,
    }


@pytest.mark.parametrize(
    "body",
    [{"experimentIds": ["1"], "experiment_ids": ["2"]}, {"run_id": "a", "runId": "b"}],
)
def test_normalise_field_names_refuses_both_spellings(body: dict[str, object]) -> None:
    with pytest.raises(BadRequest, match="twice"):
        normalise_field_names(body)


def test_dump_json_round_trips_nan() -> None:
    assert dump_json({"v": float("nan"), "s": "é"}) == '{"v":NaN,"s":"é"}'.encode()


def test_normalise_field_names_descends_into_nested_messages() -> None:
    body = {"runId": "r", "metrics": [{"key": "m", "modelId": "m-1"}], "dataset": {"sourceType": "s"}}
    assert normalise_field_names(body) == {
        "run_id": "r",
        "metrics": [{"key": "m", "model_id": "m-1"}],
        "dataset": {"source_type": "s"},
    }


def test_normalise_field_names_keeps_user_keys_of_maps_and_values() -> None:
    body = {"traceMetadata": {"myKey": "v"}, "tags": {"camelTag": "v"}, "value": {"someJson": 1}}
    assert normalise_field_names(body) == {
        "trace_metadata": {"myKey": "v"},
        "tags": {"camelTag": "v"},
        "value": {"someJson": 1},
    }
    # A repeated {key, value} list is a message list: its field names are normalised, the values kept.
    assert normalise_field_names({"tags": [{"key": "camelTag", "value": "x"}]}) == {
        "tags": [{"key": "camelTag", "value": "x"}]
    }


def test_nested_aliases_given_twice_are_refused() -> None:
    with pytest.raises(BadRequest, match="twice"):
        normalise_field_names({"metrics": [{"model_id": "a", "modelId": "b"}]})


@pytest.mark.parametrize("body", [b'{"name": "x\\ud800"}', b'{"name": "\\udfff"}', b'{"a": {"b": ["\\ud83d"]}}'])
def test_lone_surrogates_are_refused(body: bytes) -> None:
    with pytest.raises(BadRequest, match="surrogate"):
        parse_json_object(body)


def test_surrogate_pairs_are_fine() -> None:
    assert parse_json_object(b'{"name": "\\ud83d\\ude00"}') == {"name": "\U0001f600"}


@pytest.mark.parametrize(
    ("key", "reserved"),
    [
        ("matih.tenant_id", True),
        ("MATIH.tenant_id", True),
        (" matih.x", True),
        ("\uff4d\uff41\uff54\uff49\uff48.x", True),  # full-width letters
        ("ma\u200btih.x", True),  # zero-width space
        ("\uff2d\uff21\uff34\uff29\uff28.user_id", True),
        ("matih_x", False),
        ("mlflow.user", False),
        ("team.matih.x", False),
        (42, False),
    ],
)
def test_reserved_tag_keys(key: object, reserved: bool) -> None:
    from gateway.policy.steps import is_reserved_tag

    assert is_reserved_tag(key) is reserved


# -- fast paths: each must give exactly what the general code gives ------------------------------

_PATH_BYTES = st.binary(max_size=40) | st.lists(
    st.sampled_from(
        [b"/", b"a", b"Z", b"9", b".", b"..", b"%", b"%2F", b"%25", b"%41", b"+", b"\\", b"\x00", b"\xc3\xa9"]
    ),
    max_size=12,
).map(b"".join)


def _canonical_path_reference(raw_path: bytes) -> str:
    """canonical_path before its fast paths: every check on every path."""
    if not raw_path.startswith(b"/"):
        raise BadRequest("absolute")
    if re.search(rb"%(2[fF]|5[cC])", raw_path):
        raise BadRequest("separator")
    try:
        path = unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("utf-8") from None
    if re.search(r"%[0-9A-Fa-f]{2}", path):
        raise BadRequest("twice")
    if re.search(r"[\x00-\x1f\x7f]", path) or "\\" in path:
        raise BadRequest("forbidden")
    segments = path.split("/")[1:]
    inner = segments[:-1] if segments and segments[-1] == "" else segments
    if any(segment in ("", ".", "..") for segment in inner):
        raise BadRequest("segments")
    return path


def _outcome(function: Any, value: Any) -> Any:
    try:
        return function(value)
    except BadRequest:
        return BadRequest


@settings(max_examples=2000, deadline=None)
@given(raw=st.one_of(_PATH_BYTES, _PATH_BYTES.map(lambda raw: b"/" + raw)))
def test_canonical_path_fast_path_agrees_with_the_full_check(raw: bytes) -> None:
    assert _outcome(canonical_path, raw) == _outcome(_canonical_path_reference, raw)


@settings(max_examples=2000, deadline=None)
@given(text=st.text(max_size=30))
@example(text="5f2d0c1b9a8e47d6b3c2a1f0e9d8c7b6")  # ids and names take the str-method fast path...
@example(text="run_id")
@example(text="\u00e4rger")  # ...but a non-ASCII letter or digit does not
@example(text="\u0663")
@example(text="_")
@example(text="")
def test_quote_fast_paths_agree_with_quote(text: str) -> None:
    assert quote_component(text) == quote(text, safe="")
    assert quote_path("/" + text) == quote("/" + text, safe="/:@!$&'()*+,;=-._~")


@settings(max_examples=1000, deadline=None)
@given(raw=st.binary(max_size=30))
def test_query_decoding_fast_path_agrees_with_unquote(raw: bytes) -> None:
    query = b"k=" + raw.replace(b"&", b"")

    def reference(value: bytes) -> Any:
        text = unquote_to_bytes(value.replace(b"+", b" ")).decode("utf-8")
        if "\x00" in text:
            raise BadRequest("nul")
        return {"k": [text]}

    try:
        expected = reference(query[2:])
    except (UnicodeDecodeError, BadRequest):
        expected = BadRequest
    assert _outcome(parse_query, query) == expected


# -- the orjson fast paths agree with the strict stdlib ones -------------------------------------------

_JSON_KEYS = st.sampled_from(["a", "b", "run_id", "runId", "k:v", "", "é", "m0"])
_JSON_STRINGS = st.text(alphabet=st.sampled_from(["a", ":", '"', "\\", "é", "\U0001f600", "\x7f", "\n", "0", " "]))
_JSON_NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(
        ["NaN", "Infinity", "-Infinity", "1e400", "1e-400", "-0", "1E5", "0.1000000000000000055511151231257827"]
    ),
)


def _json_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


_JSON_VALUES = st.recursive(
    st.one_of(_JSON_NUMBERS, _JSON_STRINGS.map(_json_string), st.sampled_from(["true", "false", "null"])),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda items: "[" + ",".join(items) + "]"),
        # Keys may repeat: a duplicate anywhere must be refused on either path.
        st.lists(st.tuples(_JSON_KEYS.map(_json_string), inner), max_size=4).map(
            lambda pairs: "{" + ",".join(f"{key}:{value}" for key, value in pairs) + "}"
        ),
    ),
    max_leaves=12,
)


def _strict_parse(body: bytes) -> Any:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("gateway.http.canonical._parse_plain_object", lambda body: None)
        return parse_json_object(body)


@settings(max_examples=1500, deadline=None)
@given(value=_JSON_VALUES, spaces=st.sampled_from(["", " ", "\n  "]))
@example(value='{"a":1,"a":2}', spaces="")
@example(value='{"a":{"k:v":"x:y","k:v":"z"}}', spaces="")
@example(value='{"a":[{"b":1},{"b":2,"b":3}]}', spaces="")
@example(value='{"a":18446744073709551616}', spaces="")  # orjson would read a float
@example(value='{"a":-9223372036854775809}', spaces="")
@example(value='{"a":"\\u003a","b":1,"b":2}', spaces="")  # an escaped ":" cannot hide a duplicate
@example(value='{"a":"x\\ud800"}', spaces="")
def test_plain_body_parsing_agrees_with_the_strict_parser(value: str, spaces: str) -> None:
    body = (spaces + value + spaces).encode()
    fast, strict = _outcome(parse_json_object, body), _outcome(_strict_parse, body)
    assert repr(fast) == repr(strict)  # repr: NaN != NaN, and 1 == 1.0 == True must not pass


@settings(max_examples=1500, deadline=None)
@given(value=_JSON_VALUES)
def test_dump_json_writes_what_the_stdlib_reads_back(value: str) -> None:
    try:
        parsed = _strict_parse(f'{{"v":{value}}}'.encode())
    except BadRequest:
        return
    dumped = dump_json(parsed)
    assert repr(json.loads(dumped)) == repr(parsed)  # NaN, Infinity and big integers survive
    if b"null" in dumped:  # orjson's null may stand for NaN or Infinity: the stdlib wrote it
        assert dumped == json.dumps(parsed, separators=(",", ":"), ensure_ascii=False).encode()


def test_dump_json_keeps_what_orjson_cannot_write() -> None:
    assert dump_json({"v": float("inf"), "w": None}) == b'{"v":Infinity,"w":null}'
    assert dump_json({"v": 2**64}) == b'{"v":18446744073709551616}'
    assert dump_json({"v": [1.5, "é"]}) == '{"v":[1.5,"é"]}'.encode()


@settings(max_examples=1000, deadline=None)
@given(value=_JSON_VALUES)
@example(value='{"runId":"x"}')
@example(value='{"run\\u0049d":"x"}')  # an escaped capital is renamed too
@example(value='{"run_id":"x","runId":"y"}')
@example(value='{"a":"RUNNING","b":[{"modelId":"m"}]}')
def test_parse_json_message_renames_exactly_as_normalise_field_names(value: str) -> None:
    body = f'{{"v":{value}}}'.encode()

    def reference(raw: bytes) -> Any:
        return normalise_field_names(_strict_parse(raw))

    assert repr(_outcome(parse_json_message, body)) == repr(_outcome(reference, body))
