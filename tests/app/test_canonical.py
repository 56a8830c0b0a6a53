"""Canonicalisation: every ambiguous path, query or body is a 400 and never reaches MLflow.

MLflow parses loosely (percent-decoded paths, GET bodies, camelCase aliases, last duplicate key
wins, JSON-in-a-string decoded twice, ``run_id or run_uuid``). Each attack below would address an
object or route other than the one the gateway checked; the gateway must refuse it outright.
Paths are sent over a raw socket so that no client library normalises them first.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from tests.app.conftest import (
    ACME,
    AJAX,
    API,
    USER_AGENT,
    FakeUpstream,
    GatewayUnderTest,
    assert_mlflow_error,
    send_raw,
)

AUTH = {"Authorization": ACME["Authorization"]}

# Each would route to GET /api/2.0/mlflow/runs/get (or another object) in MLflow's loose parsing.
AMBIGUOUS_PATHS = {
    "encoded slash": b"/api/2.0/mlflow/runs%2Fget",
    "encoded slash lower": b"/api/2.0/mlflow/runs%2fget",
    "double-encoded slash": b"/api/2.0/mlflow/runs%252Fget",
    "double-encoded letter": b"/api/2.0/mlflow/runs/ge%2574",
    "double-encoded digit": b"/api/2.0/mlflow/runs/get%2531",
    "leading double slash": b"//api/2.0/mlflow/runs/get",
    "inner double slash": b"/api/2.0//mlflow/runs/get",
    "dot segment": b"/api/2.0/mlflow/./runs/get",
    "dot-dot segment": b"/api/2.0/mlflow/runs/../runs/get",
    "encoded dot-dot": b"/api/2.0/mlflow/runs/%2e%2e/runs/get",
    "encoded dot": b"/api/2.0/mlflow/%2E/runs/get",
    "trailing dot-dot": b"/api/2.0/mlflow/runs/get/..",
    "backslash": b"/api/2.0/mlflow\\runs/get",
    "encoded backslash": b"/api/2.0/mlflow%5Cruns/get",
    "encoded NUL": b"/api/2.0/mlflow/runs/get%00",
    "encoded newline": b"/api/2.0/mlflow/runs/get%0a",
    "encoded DEL": b"/api/2.0/mlflow/runs/get%7f",
    "invalid UTF-8": b"/api/2.0/mlflow/runs/get%ff",
    "static prefix escape": b"/static-files/%2e%2e/api/2.0/mlflow/runs/get",
}


@pytest.mark.parametrize("path", AMBIGUOUS_PATHS.values(), ids=AMBIGUOUS_PATHS.keys())
def test_ambiguous_paths_are_400(gateway: GatewayUnderTest, fake: FakeUpstream, path: bytes) -> None:
    run_id = fake.add_run(fake.add_experiment("acme", "canonical"))
    response = gateway.raw("GET", path + f"?run_id={run_id}".encode(), headers=AUTH)
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    assert response.headers["x-request-id"]
    fake.assert_untouched()


def test_raw_nul_in_the_path_is_400(gateway: GatewayUnderTest, fake: FakeUpstream) -> None:
    # Refused by the HTTP parser itself (not MLflow-shaped), which is fine: it never gets further.
    response = gateway.raw("GET", b"/api/2.0/mlflow/runs/get\x00?run_id=x", headers=AUTH)
    assert response.status == 400
    fake.assert_untouched()


def test_single_encoded_path_is_decoded_and_forwarded_canonical(gateway: GatewayUnderTest, fake: FakeUpstream) -> None:
    run_id = fake.add_run(fake.add_experiment("acme", "canonical"))
    response = gateway.raw("GET", f"/api/2.0/mlflow/runs/g%65t?run_id={run_id}", headers=AUTH)
    assert response.status == 200, response.body
    (forwarded,) = fake.forwarded()
    assert forwarded.raw_path == b"/api/2.0/mlflow/runs/get"
    assert forwarded.query_string == f"run_id={run_id}".encode()


def test_get_with_a_json_body_is_400(client: httpx.Client, fake: FakeUpstream) -> None:
    # MLflow reads the JSON body of a GET whose query string is empty.
    run_id = fake.add_run(fake.add_experiment("globex", "victim"))
    response = client.request("GET", f"{API}/runs/get", headers=ACME, json={"run_id": run_id})
    body = assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    assert "must not carry a body" in body["message"]
    fake.assert_untouched()


def test_get_with_a_chunked_json_body_is_400(gateway: GatewayUnderTest, fake: FakeUpstream) -> None:
    # No Content-Length, so the body is announced only by Transfer-Encoding: it is still read and refused.
    run_id = fake.add_run(fake.add_experiment("globex", "victim"))
    body = json.dumps({"run_id": run_id}).encode()
    request = (
        (
            f"GET {API}/runs/get HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: {USER_AGENT}\r\n"
            f"Authorization: {AUTH['Authorization']}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        ).encode()
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n"
    )
    response = send_raw(gateway.port, request)
    assert response.status == 400, response.body
    error = json.loads(response.body)
    assert error["error_code"] == "INVALID_PARAMETER_VALUE" and "must not carry a body" in error["message"]
    fake.assert_untouched()


def test_get_with_a_query_and_a_body_is_400(client: httpx.Client, fake: FakeUpstream) -> None:
    own = fake.add_run(fake.add_experiment("acme", "mine"))
    response = client.request(
        "GET", f"{API}/runs/get", params={"run_id": own}, headers=ACME, content=b'{"run_id": "other"}'
    )
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


BAD_BODIES = {
    "duplicate keys": b'{"run_id":"a","run_id":"b","key":"k","value":"v"}',
    "duplicate nested keys": b'{"run_id":"a","tags":[{"key":"x","key":"matih.tenant_id","value":"v"}]}',
    "JSON in a string": json.dumps(json.dumps({"run_id": "a", "key": "k", "value": "v"})).encode(),
    "array": b'[{"run_id":"a","key":"k","value":"v"}]',
    "number": b"42",
    "null": b"null",
    "not JSON": b"run_id=a&key=k&value=v",
    "truncated": b'{"run_id":"a"',
    "trailing garbage": b'{"run_id":"a"} {"run_id":"b"}',
    "deeply nested": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_json_bodies_are_400(client: httpx.Client, fake: FakeUpstream, body: bytes) -> None:
    response = client.post(f"{API}/runs/set-tag", headers={**ACME, "Content-Type": "application/json"}, content=body)
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


def test_both_spellings_of_a_field_are_400(client: httpx.Client, fake: FakeUpstream) -> None:
    own = fake.add_experiment("acme", "mine")
    foreign = fake.add_experiment("globex", "victim")
    response = client.post(
        f"{API}/runs/search", headers=ACME, json={"experiment_ids": [own], "experimentIds": [foreign]}
    )
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


def test_run_id_and_run_uuid_naming_different_runs_are_400(client: httpx.Client, fake: FakeUpstream) -> None:
    own = fake.add_run(fake.add_experiment("acme", "mine"))
    foreign = fake.add_run(fake.add_experiment("globex", "victim"))
    for run_id, run_uuid in [(own, foreign), (foreign, own)]:
        response = client.post(
            f"{API}/runs/set-tag", headers=ACME, json={"run_id": run_id, "run_uuid": run_uuid, "key": "k", "value": "v"}
        )
        assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
        response = client.get(f"{API}/runs/get", params={"run_id": run_id, "run_uuid": run_uuid}, headers=ACME)
        assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


@pytest.mark.parametrize(
    "query",
    [
        "run_id={own}&run_id={foreign}",
        "run_id={foreign}&run_id={own}",
        "run_id={own}&run%5Fid={foreign}",  # the same key once decoded
        "run_uuid={own}&run_uuid={foreign}",
    ],
)
def test_repeated_scalar_query_parameters_are_400(gateway: GatewayUnderTest, fake: FakeUpstream, query: str) -> None:
    own = fake.add_run(fake.add_experiment("acme", "mine"))
    foreign = fake.add_run(fake.add_experiment("globex", "victim"))
    target = f"{API}/runs/get?" + query.format(own=own, foreign=foreign)
    assert_mlflow_error(gateway.raw("GET", target, headers=AUTH), 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


def test_repeated_experiment_id_is_400(client: httpx.Client, fake: FakeUpstream) -> None:
    own = fake.add_experiment("acme", "mine")
    foreign = fake.add_experiment("globex", "victim")
    response = client.get(f"{API}/experiments/get", params=[("experiment_id", own), ("experiment_id", foreign)])
    assert response.status_code == 401  # no token: refused even earlier
    response = client.get(
        f"{API}/experiments/get", params=[("experiment_id", own), ("experiment_id", foreign)], headers=ACME
    )
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()


def test_double_encoded_query_value_is_taken_literally(gateway: GatewayUnderTest, fake: FakeUpstream) -> None:
    # `%2531` decodes once to `%31`, which is not an experiment id: refused without an upstream call.
    response = gateway.raw("GET", f"{API}/experiments/get?experiment_id=%2531", headers=AUTH)
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", "No Experiment with id=%31 exists")
    fake.assert_untouched()


def test_camel_case_alias_is_checked_and_forwarded_as_snake_case(client: httpx.Client, fake: FakeUpstream) -> None:
    own = fake.add_run(fake.add_experiment("acme", "mine"))
    foreign = fake.add_run(fake.add_experiment("globex", "victim"))
    response = client.post(f"{API}/runs/set-tag", headers=ACME, json={"runId": foreign, "key": "k", "value": "v"})
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"Run with id={foreign} not found")
    assert fake.forwarded() == []

    response = client.post(f"{API}/runs/set-tag", headers=ACME, json={"runId": own, "key": "k", "value": "v"})
    assert response.status_code == 200, response.text
    (forwarded,) = fake.forwarded("POST", "runs/set-tag")
    assert forwarded.json() == {"run_id": own, "key": "k", "value": "v"}


def test_run_uuid_alone_is_checked(client: httpx.Client, fake: FakeUpstream) -> None:
    foreign = fake.add_run(fake.add_experiment("globex", "victim"))
    response = client.post(f"{API}/runs/set-tag", headers=ACME, json={"run_uuid": foreign, "key": "k", "value": "v"})
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"Run with id={foreign} not found")
    response = client.get(f"{AJAX}/runs/get", params={"run_uuid": foreign}, headers=ACME)
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"Run with id={foreign} not found")
    assert fake.forwarded() == []


def test_body_is_reserialised_not_copied(client: httpx.Client, fake: FakeUpstream) -> None:
    own = fake.add_run(fake.add_experiment("acme", "mine"))
    raw = b'{ "run_id" : "' + own.encode() + b'",\n "key": "k",  "value": "v\\u00e9" }'
    response = client.post(
        f"{API}/runs/set-tag", headers={**ACME, "Content-Type": "text/plain; charset=latin-1"}, content=raw
    )
    assert response.status_code == 200, response.text
    (forwarded,) = fake.forwarded("POST", "runs/set-tag")
    assert forwarded.body == f'{{"run_id":"{own}","key":"k","value":"vé"}}'.encode()
    assert forwarded.header("content-type") == "application/json"
    assert forwarded.header("content-length") == str(len(forwarded.body))


def test_get_forwards_no_body(client: httpx.Client, fake: FakeUpstream) -> None:
    own = fake.add_run(fake.add_experiment("acme", "mine"))
    assert client.get(f"{API}/runs/get", params={"run_id": own}, headers=ACME).status_code == 200
    (forwarded,) = fake.forwarded("GET", "runs/get")
    assert forwarded.body == b""
    assert forwarded.header("content-type") is None


def test_oversized_json_body_is_413(start_gateway: Callable[..., GatewayUnderTest], fake: FakeUpstream) -> None:
    gateway = start_gateway(max_json_body_bytes=1024)
    response = gateway.client.post(f"{API}/experiments/create", headers=ACME, json={"name": "x" * 2000})
    assert_mlflow_error(response, 413, "REQUEST_LIMIT_EXCEEDED")
    fake.assert_untouched()


def test_lone_surrogate_in_a_json_string_is_400(client: httpx.Client, fake: FakeUpstream) -> None:
    response = client.post(
        f"{API}/experiments/create",
        headers={**ACME, "Content-Type": "application/json"},
        content=b'{"name": "x\\ud800"}',
    )
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    fake.assert_untouched()
