"""Deny by default: what the route table does not name, or names as denied, never reaches MLflow."""

from __future__ import annotations

import httpx
import pytest

from tests.app.conftest import ACME, AJAX, API, FakeUpstream, assert_mlflow_error

UNKNOWN = [
    ("GET", f"{API}/no-such-endpoint"),
    ("GET", "/admin"),
    ("GET", "/api/2.0/preview/mlflow/runs/get"),
    ("GET", "/api/2.1/mlflow/runs/get"),
    ("GET", "/API/2.0/mlflow/runs/get"),
    ("GET", f"{API}/runs/get/"),  # a trailing slash is another route
    ("GET", f"{API}/Runs/Get"),
    ("POST", "/api/2.0/mlflow/users/create"),  # basic-auth app routes are not served
    ("GET", "/ajax-api/4.0/mlflow/traces/x"),
]

DENIED = [
    ("POST", f"{API}/webhooks", "webhooks are server-global"),
    ("GET", f"{AJAX}/webhooks", "webhooks are server-global"),
    ("POST", "/ajax-api/3.0/mlflow/assistant/message", "the assistant runs agents and shell tools"),
    ("PUT", "/ajax-api/3.0/mlflow/assistant/config", "the assistant runs agents and shell tools"),
    ("POST", "/ajax-api/3.0/jobs/", "server-side jobs"),
    ("POST", "/ajax-api/3.0/jobs/search", "server-side jobs"),
    ("GET", "/api/3.0/mlflow/workspaces", "workspaces are managed by the platform"),
    ("POST", "/gateway/openai/v1/chat/completions", "the AI Gateway holds server-wide provider secrets"),
    ("POST", "/api/3.0/mlflow/gateway/secrets/create", "the AI Gateway holds server-wide provider secrets"),
    ("POST", "/ajax-api/3.0/mlflow/demo/generate", "the demo experiment is shared"),
    ("GET", f"{API}/webhooks", "webhooks are server-global"),
    ("POST", f"{AJAX}/runs/create-promptlab-run", "prompt-lab runs cannot carry the gateway's provenance tags"),
    ("GET", "/graphql", "GraphQL over GET is not supported"),
    ("POST", f"{API}/traces/link-prompts", "registered prompts"),
    ("POST", f"{API}/artifacts/presigned-upload-url", "artifact roots are served by the gateway"),
]

WRONG_METHOD = [
    ("GET", f"{API}/runs/create"),
    ("POST", f"{API}/runs/get"),
    ("DELETE", f"{API}/experiments/get"),
    ("PUT", f"{API}/runs/log-batch"),
    ("PATCH", f"{API}/runs/set-tag"),
    ("GET", f"{API}/experiments/create"),
    ("POST", "/health"),
    ("DELETE", f"{API}/webhooks"),
]


@pytest.mark.parametrize(("method", "path"), UNKNOWN)
def test_unknown_paths_are_403(client: httpx.Client, fake: FakeUpstream, method: str, path: str) -> None:
    body = assert_mlflow_error(client.request(method, path, headers=ACME), 403, "PERMISSION_DENIED")
    assert "is not an endpoint the gateway allows" in body["message"]
    fake.assert_untouched()


@pytest.mark.parametrize(("method", "path", "reason"), DENIED)
def test_denied_routes_are_403_with_the_reason(
    client: httpx.Client, fake: FakeUpstream, method: str, path: str, reason: str
) -> None:
    response = client.request(method, path, headers=ACME, json={"url": "http://attacker", "events": ["*"]})
    body = assert_mlflow_error(response, 403, "PERMISSION_DENIED")
    assert body["message"].startswith("This MLflow endpoint is disabled by the gateway: ")
    assert reason in body["message"]
    fake.assert_untouched()


@pytest.mark.parametrize(("method", "path"), WRONG_METHOD)
def test_known_paths_with_the_wrong_method_are_403(
    client: httpx.Client, fake: FakeUpstream, method: str, path: str
) -> None:
    assert_mlflow_error(client.request(method, path, headers=ACME), 403, "PERMISSION_DENIED")
    fake.assert_untouched()


def test_denied_routes_refuse_before_reading_any_body(client: httpx.Client, fake: FakeUpstream) -> None:
    # A malformed body does not turn a deny into a 400: the table decides first.
    response = client.post(f"{API}/webhooks", headers=ACME, content=b'{"a":1,"a":2}')
    assert_mlflow_error(response, 403, "PERMISSION_DENIED")
    fake.assert_untouched()


def test_forwarded_headers_do_not_unlock_the_assistant(client: httpx.Client, fake: FakeUpstream) -> None:
    response = client.post(
        "/ajax-api/3.0/mlflow/assistant/message",
        headers={**ACME, "X-Forwarded-For": "127.0.0.1", "Host": "localhost"},
        json={"message": "run `id`"},
    )
    assert_mlflow_error(response, 403, "PERMISSION_DENIED")
    fake.assert_untouched()


def test_ajax_twin_of_an_allowed_route_is_allowed(client: httpx.Client, fake: FakeUpstream) -> None:
    experiment_id = fake.add_experiment("acme", "twin")
    response = client.get(f"{AJAX}/experiments/get", params={"experiment_id": experiment_id}, headers=ACME)
    assert response.status_code == 200, response.text
    assert [r.path for r in fake.forwarded()] == [f"{AJAX}/experiments/get"]
