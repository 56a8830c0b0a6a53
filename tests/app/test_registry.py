"""Model registry and prompts: names are prefixed upstream and stripped in answers, searches are
scoped by an appended ``name LIKE '<tenant>.%'``, and a new version's lineage must be the caller's.

Every refusal is asserted together with what the upstream received (nothing forwarded), and every
happy path with the exact rewritten request, so the security tests can fail.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.app.conftest import (
    ACME,
    AJAX,
    API,
    FakeUpstream,
    Received,
    Reply,
    assert_mlflow_error,
    mlflow_error,
)
from tests.app.test_artifacts import ArtifactGateway, _artifact_gateway
from tests.factories import bearer

RM = f"{API}/registered-models"
MV = f"{API}/model-versions"
ADMIN = bearer("acme", "alice", roles=["admin"])
VIEWER = bearer("acme", "alice", roles=["viewer"])


@pytest.fixture(scope="module")
def _registry_gateway(fake_upstream: FakeUpstream) -> Iterator[ArtifactGateway]:
    with _artifact_gateway(fake_upstream, "proxy") as gateway:
        yield gateway


@dataclass
class Registry:
    """The fake upstream's registry: upstream names and the download URI it answers."""

    fake: FakeUpstream
    gateway: ArtifactGateway
    models: dict[str, list[dict[str, Any]]]
    download_uri: str = ""

    @property
    def client(self) -> httpx.Client:
        return self.gateway.client


def _name_of(request: Received) -> str:
    if request.method == "GET":
        return request.query.get("name", [""])[0]
    return str(request.json().get("name", "")) if request.body else request.query.get("name", [""])[0]


@pytest.fixture
def registry(_registry_gateway: ArtifactGateway, fake: FakeUpstream) -> Iterator[Registry]:
    """A small MLflow-like registry behind the fake upstream."""
    _registry_gateway.store.reset()
    state = Registry(fake, _registry_gateway, {})

    def missing(name: str) -> Reply:
        return mlflow_error(404, "RESOURCE_DOES_NOT_EXIST", f"Registered Model with name={name} not found")

    def model(request: Received) -> Reply:
        name = _name_of(request)
        if name not in state.models:
            return missing(name)
        versions = state.models[name]
        return Reply(200, {"registered_model": {"name": name, "latest_versions": versions[-1:]}})

    def create_model(request: Received) -> Reply:
        name = request.json()["name"]
        state.models[name] = []
        return Reply(200, {"registered_model": {"name": name, "tags": request.json().get("tags", [])}})

    def version(request: Received) -> Reply:
        name = _name_of(request)
        if name not in state.models or not state.models[name]:
            return mlflow_error(404, "RESOURCE_DOES_NOT_EXIST", f"Model Version (name={name}, version=1) not found")
        return Reply(200, {"model_version": state.models[name][0]})

    def create_version(request: Received) -> Reply:
        body = request.json()
        name = body["name"]
        if name not in state.models:
            return missing(name)
        mv = {"name": name, "version": str(len(state.models[name]) + 1), "source": body["source"]}
        state.models[name].append(mv)
        return Reply(200, {"model_version": mv})

    def like_prefix(request: Received) -> str:
        match = re.search(r"name LIKE '([^']*)%'$", request.query.get("filter", [""])[0])
        return match.group(1) if match else ""

    def search_models(request: Received) -> Reply:
        prefix = like_prefix(request)
        rows = [{"name": name} for name in state.models if name.startswith(prefix)]
        return Reply(200, {"registered_models": rows})

    def search_versions(request: Received) -> Reply:
        prefix = like_prefix(request)
        rows = [mv for name, mvs in state.models.items() if name.startswith(prefix) for mv in mvs]
        return Reply(200, {"model_versions": rows})

    def download_uri(request: Received) -> Reply:
        name = _name_of(request)
        if name not in state.models or not state.models[name]:
            return mlflow_error(404, "RESOURCE_DOES_NOT_EXIST", f"Model Version (name={name}, version=1) not found")
        return Reply(200, {"artifact_uri": state.download_uri})

    for prefix in (API, AJAX):
        fake.on("POST", f"{prefix}/registered-models/create", create_model)
        fake.on("GET", f"{prefix}/registered-models/search", search_models)
        fake.on("POST", f"{prefix}/model-versions/create", create_version)
        fake.on("GET", f"{prefix}/model-versions/search", search_versions)
        fake.on("GET", f"{prefix}/model-versions/get-download-uri", download_uri)
        for method, route in [
            ("POST", "registered-models/rename"),
            ("PATCH", "registered-models/update"),
            ("DELETE", "registered-models/delete"),
            ("GET", "registered-models/get"),
            ("POST", "registered-models/alias"),
            ("DELETE", "registered-models/alias"),
            ("POST", "registered-models/set-tag"),
            ("DELETE", "registered-models/delete-tag"),
        ]:
            fake.on(method, f"{prefix}/{route}", model)
        for method, route in [
            ("GET", "registered-models/get-latest-versions"),
            ("POST", "registered-models/get-latest-versions"),
        ]:
            fake.on(
                method,
                f"{prefix}/{route}",
                lambda r: Reply(200, {"model_versions": state.models.get(_name_of(r), [])}),
            )
        for method, route in [
            ("GET", "registered-models/alias"),
            ("PATCH", "model-versions/update"),
            ("POST", "model-versions/transition-stage"),
            ("DELETE", "model-versions/delete"),
            ("GET", "model-versions/get"),
            ("POST", "model-versions/set-tag"),
            ("DELETE", "model-versions/delete-tag"),
        ]:
            fake.on(method, f"{prefix}/{route}", version)
    yield state
    _registry_gateway.store.reset()


def _unique() -> str:
    return f"clf-{uuid.uuid4().hex[:8]}"


def _with_version(registry: Registry, tenant: str, name: str, source: str = "prompt-template") -> None:
    upstream = f"{tenant}.{name}"
    registry.models[upstream] = [{"name": upstream, "version": "1", "source": source}]


# -- names: every route prefixes the request and strips the answer -----------------------------------

# (method, route, params or body, the answer's object paths)
NAMED_ROUTES: list[tuple[str, str, dict[str, str], str]] = [
    ("POST", "registered-models/rename", {"new_name": "renamed"}, "registered_model"),
    ("PATCH", "registered-models/update", {"description": "d"}, "registered_model"),
    ("DELETE", "registered-models/delete", {}, "registered_model"),
    ("GET", "registered-models/get", {}, "registered_model"),
    ("GET", "registered-models/get-latest-versions", {}, "model_versions"),
    ("POST", "registered-models/get-latest-versions", {}, "model_versions"),
    ("POST", "registered-models/alias", {"alias": "prod", "version": "1"}, "registered_model"),
    ("DELETE", "registered-models/alias", {"alias": "prod"}, "registered_model"),
    ("GET", "registered-models/alias", {"alias": "prod"}, "model_version"),
    ("POST", "registered-models/set-tag", {"key": "team", "value": "ds"}, "registered_model"),
    ("DELETE", "registered-models/delete-tag", {"key": "team"}, "registered_model"),
    ("PATCH", "model-versions/update", {"version": "1", "description": "d"}, "model_version"),
    ("POST", "model-versions/transition-stage", {"version": "1", "stage": "Production"}, "model_version"),
    ("DELETE", "model-versions/delete", {"version": "1"}, "model_version"),
    ("GET", "model-versions/get", {"version": "1"}, "model_version"),
    ("POST", "model-versions/set-tag", {"version": "1", "key": "k", "value": "v"}, "model_version"),
    ("DELETE", "model-versions/delete-tag", {"version": "1", "key": "k"}, "model_version"),
]


def _send(client: httpx.Client, method: str, route: str, fields: dict[str, Any], headers: dict[str, str]) -> Any:
    url = f"{API}/{route}"
    if method == "GET":
        return client.get(url, params=fields, headers=headers)
    return client.request(method, url, json=fields, headers=headers)


def _received_fields(request: Received) -> dict[str, Any]:
    if request.method == "GET":
        return {key: values[0] for key, values in request.query.items()}
    return dict(request.json())


@pytest.mark.parametrize(("method", "route", "extra", "answer"), NAMED_ROUTES)
def test_every_named_route_is_prefixed_and_stripped(
    registry: Registry, method: str, route: str, extra: dict[str, str], answer: str
) -> None:
    name = _unique()
    _with_version(registry, "acme", name)
    response = _send(registry.client, method, route, {"name": name, **extra}, ADMIN)
    assert response.status_code == 200, response.text
    (forwarded,) = registry.fake.forwarded(method, route)
    sent = _received_fields(forwarded)
    assert sent["name"] == f"acme.{name}"
    if "new_name" in extra:
        assert sent["new_name"] == "acme.renamed"
    body = response.json()
    objects = body[answer] if isinstance(body[answer], list) else [body[answer]]
    assert objects and all(obj["name"] == name for obj in objects), body
    assert "acme." not in response.text


@pytest.mark.parametrize(("method", "route", "extra", "answer"), NAMED_ROUTES)
def test_another_tenants_model_is_answered_as_missing(
    registry: Registry, method: str, route: str, extra: dict[str, str], answer: str
) -> None:
    name = _unique()
    _with_version(registry, "globex", name)  # globex has it; acme has none of that name
    response = _send(registry.client, method, route, {"name": name, **extra}, ADMIN)
    if answer == "model_versions":  # get-latest-versions of a missing model: MLflow's empty list here
        assert response.json() == {"model_versions": []}
        return
    body = assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST")
    assert "acme." not in body["message"] and "globex" not in body["message"]
    assert name in body["message"]
    (forwarded,) = registry.fake.forwarded(method, route)
    assert _received_fields(forwarded)["name"] == f"acme.{name}"


def test_foreign_object_in_an_answer_is_not_found(registry: Registry) -> None:
    registry.fake.on("GET", f"{RM}/get", Reply(200, {"registered_model": {"name": "globex.secret"}}))
    response = registry.client.get(f"{RM}/get", params={"name": "x"}, headers=ACME)
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", "Registered Model with name=x not found")
    assert "secret" not in response.text


def test_deletes_need_admin_and_reads_allow_viewers(registry: Registry) -> None:
    name = _unique()
    _with_version(registry, "acme", name)
    for route, fields in [
        ("registered-models/delete", {"name": name}),
        ("model-versions/delete", {"name": name, "version": "1"}),
    ]:
        assert_mlflow_error(
            registry.client.request("DELETE", f"{API}/{route}", json=fields, headers=ACME), 403, "PERMISSION_DENIED"
        )
    assert registry.fake.forwarded() == []
    assert registry.client.get(f"{RM}/get", params={"name": name}, headers=VIEWER).status_code == 200
    assert_mlflow_error(
        registry.client.post(f"{RM}/create", json={"name": "v"}, headers=VIEWER), 403, "PERMISSION_DENIED"
    )


def test_create_stamps_provenance_and_refuses_reserved_tags(registry: Registry) -> None:
    name = _unique()
    response = registry.client.post(
        f"{RM}/create", json={"name": name, "tags": [{"key": "mlflow.prompt.is_prompt", "value": "true"}]}, headers=ACME
    )
    assert response.status_code == 200, response.text
    assert response.json()["registered_model"]["name"] == name
    (forwarded,) = registry.fake.forwarded("POST", "registered-models/create")
    tags = {tag["key"]: tag["value"] for tag in forwarded.json()["tags"]}
    assert forwarded.json()["name"] == f"acme.{name}"
    assert tags == {"mlflow.prompt.is_prompt": "true", "matih.tenant_id": "acme", "matih.user_id": "alice"}
    registry.fake.requests.clear()
    for route, body in [
        ("registered-models/create", {"name": "y", "tags": [{"key": "matih.tenant_id", "value": "globex"}]}),
        ("registered-models/set-tag", {"name": name, "key": "MATIH.user_id", "value": "x"}),
        ("model-versions/set-tag", {"name": name, "version": "1", "key": "matih.tenant_id", "value": "x"}),
    ]:
        assert_mlflow_error(registry.client.post(f"{API}/{route}", json=body, headers=ACME), 403, "PERMISSION_DENIED")
    for route, body in [
        ("registered-models/delete-tag", {"name": name, "key": "matih.tenant_id"}),
        ("model-versions/delete-tag", {"name": name, "version": "1", "key": "matih.user_id"}),
    ]:
        response = registry.client.request("DELETE", f"{API}/{route}", json=body, headers=ACME)
        assert_mlflow_error(response, 403, "PERMISSION_DENIED")
    assert registry.fake.forwarded() == []


def test_error_messages_lose_the_prefix(registry: Registry) -> None:
    registry.fake.on(
        "POST",
        f"{RM}/create",
        mlflow_error(400, "RESOURCE_ALREADY_EXISTS", "Registered Model (name=acme.dup) already exists."),
    )
    response = registry.client.post(f"{RM}/create", json={"name": "dup"}, headers=ACME)
    assert_mlflow_error(response, 400, "RESOURCE_ALREADY_EXISTS", "Registered Model (name=dup) already exists.")


# -- searches ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "given", "expected"),
    [
        ("registered-models/search", "", "name LIKE 'acme.%'"),
        ("registered-models/search", "name = 'x'", "name = 'acme.x' AND name LIKE 'acme.%'"),
        ("registered-models/search", "name ILIKE '%x%'", "name ILIKE 'acme.%x%' AND name LIKE 'acme.%'"),
        ("registered-models/search", "name IN ('a', 'b')", "name IN ('acme.a', 'acme.b') AND name LIKE 'acme.%'"),
        (
            "registered-models/search",
            "tags.`mlflow.prompt.is_prompt` = 'true' AND name != 'x'",
            "tags.mlflow.prompt.is_prompt = 'true' AND name != 'acme.x' AND name LIKE 'acme.%'",
        ),
        ("model-versions/search", "", "name LIKE 'acme.%'"),
        ("model-versions/search", "run_id = 'abc'", "run_id = 'abc' AND name LIKE 'acme.%'"),
        (
            "model-versions/search",
            "name = 'x' AND version_number > 1",
            "name = 'acme.x' AND version_number > 1 AND name LIKE 'acme.%'",
        ),
    ],
)
def test_searches_are_scoped(registry: Registry, route: str, given: str, expected: str) -> None:
    params = {"filter": given, "max_results": "5", "page_token": "tok", "order_by": ["name DESC"]}
    response = registry.client.get(f"{API}/{route}", params=params, headers=VIEWER)
    assert response.status_code == 200, response.text
    (forwarded,) = registry.fake.forwarded("GET", route)
    assert forwarded.query == {
        "filter": [expected],
        "max_results": ["5"],
        "page_token": ["tok"],
        "order_by": ["name DESC"],
    }


def test_search_answers_only_own_names_stripped(registry: Registry) -> None:
    name = _unique()
    _with_version(registry, "acme", name)
    _with_version(registry, "globex", name)
    response = registry.client.get(f"{RM}/search", headers=ACME)
    assert response.json() == {"registered_models": [{"name": name}]}
    response = registry.client.get(f"{MV}/search", params={"filter": f"name = '{name}'"}, headers=ACME)
    assert [mv["name"] for mv in response.json()["model_versions"]] == [name]


@pytest.mark.parametrize(
    "attack",
    [
        "name = 'x' OR name LIKE '%'",
        "name = 'x' name LIKE '%'",
        "name = 'x\\' AND name LIKE 'y'",
        "name LIKE '%' --",
        "name = 'x'; DROP",
        "tags.k IS NULL",
        "creation_timestamp > 1",
    ],
)
def test_search_filters_that_could_escape_are_refused(registry: Registry, attack: str) -> None:
    response = registry.client.get(f"{RM}/search", params={"filter": attack}, headers=ACME)
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    assert registry.fake.forwarded() == []


# -- lineage ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Owned:
    exp: str
    run: str
    model: str
    foreign_exp: str
    foreign_run: str
    foreign_model: str


@pytest.fixture
def owned(registry: Registry) -> Owned:
    fake = registry.fake
    exp = fake.add_experiment("acme", f"reg-{uuid.uuid4().hex[:6]}")
    foreign = fake.add_experiment("globex", f"victim-{uuid.uuid4().hex[:6]}")
    return Owned(
        exp,
        fake.add_run(exp),
        fake.add_logged_model(exp),
        foreign,
        fake.add_run(foreign),
        fake.add_logged_model(foreign),
    )


def _create_version(registry: Registry, name: str, **fields: Any) -> httpx.Response:
    return registry.client.post(f"{MV}/create", json={"name": name, **fields}, headers=ACME)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("runs:/{run}/model", "runs:/{run}/model"),
        ("models:/{model}", "models:/{model}"),
        ("models:/other/3", "models:/acme.other/3"),
        ("models:/other@champion", "models:/acme.other@champion"),
        ("mlflow-artifacts:/{exp}/{run}/artifacts/model", "mlflow-artifacts:/{exp}/{run}/artifacts/model"),
        ("mlflow-artifacts:/{exp}/models/{model}/artifacts", "mlflow-artifacts:/{exp}/models/{model}/artifacts"),
        ("s3://bucket/artifacts/{exp}/{run}/artifacts/model", "s3://bucket/artifacts/{exp}/{run}/artifacts/model"),
        ("prompt-template", "prompt-template"),
        ("dummy-source", "dummy-source"),
    ],
)
def test_owned_sources_are_accepted(registry: Registry, owned: Owned, template: str, expected: str) -> None:
    name = _unique()
    registry.models[f"acme.{name}"] = []
    values = {"run": owned.run, "model": owned.model, "exp": owned.exp}
    response = _create_version(registry, name, source=template.format(**values), run_id=owned.run)
    assert response.status_code == 200, response.text
    (forwarded,) = registry.fake.forwarded("POST", "model-versions/create")
    body = forwarded.json()
    assert body["source"] == expected.format(**values)
    assert body["name"] == f"acme.{name}"
    assert {tag["key"]: tag["value"] for tag in body["tags"]} == {"matih.tenant_id": "acme", "matih.user_id": "alice"}
    answer = response.json()["model_version"]
    assert answer["name"] == name
    assert answer["source"] == template.format(**values)  # a models:/<name> source is shown unprefixed


@pytest.mark.parametrize(
    ("template", "status"),
    [
        ("runs:/{foreign_run}/model", 404),
        ("models:/{foreign_model}", 404),
        ("mlflow-artifacts:/{foreign_exp}/{foreign_run}/artifacts/model", 404),
        ("mlflow-artifacts:/{exp}/{foreign_run}/artifacts/model", 404),
        ("mlflow-artifacts:/{exp}", 404),
        ("mlflow-artifacts:/{exp}/{run}/artifacts/../../{foreign_run}", 400),
        ("mlflow-artifacts:/{exp}/{run}/artifacts/%2e%2e/x", 400),
        ("mlflow-artifacts://host/{exp}/{run}/artifacts", 400),
        ("s3://bucket/artifacts/{foreign_exp}/{foreign_run}/artifacts", 404),
        ("s3://other-bucket/artifacts/{exp}/{run}/artifacts", 400),
        ("s3://bucket/elsewhere/{exp}/{run}/artifacts", 400),
        ("file:///etc/passwd", 400),
        ("/tmp/model", 400),
        ("http://example.com/model", 400),
        ("https://example.com/model", 400),
        ("models:/a/b/c", 400),
        ("models://host/x/1", 400),
        ("runs:/{run}/../{foreign_run}", 400),
        ("runs:/../x", 400),
        ("", 400),
    ],
)
def test_foreign_or_unknown_sources_are_refused(registry: Registry, owned: Owned, template: str, status: int) -> None:
    name = _unique()
    registry.models[f"acme.{name}"] = []
    source = template.format(**vars(owned))
    response = _create_version(registry, name, source=source)
    assert_mlflow_error(response, status, "RESOURCE_DOES_NOT_EXIST" if status == 404 else "INVALID_PARAMETER_VALUE")
    assert registry.fake.forwarded() == []


@pytest.mark.parametrize("field", ["run_id", "model_id"])
def test_foreign_run_or_logged_model_id_is_refused(registry: Registry, owned: Owned, field: str) -> None:
    name = _unique()
    registry.models[f"acme.{name}"] = []
    foreign = owned.foreign_run if field == "run_id" else owned.foreign_model
    response = _create_version(registry, name, source=f"runs:/{owned.run}/model", **{field: foreign})
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST")
    assert registry.fake.forwarded() == []


def test_version_tags_are_reserved(registry: Registry, owned: Owned) -> None:
    response = _create_version(
        registry, "x", source=f"runs:/{owned.run}/m", tags=[{"key": "matih.tenant_id", "value": "globex"}]
    )
    assert_mlflow_error(response, 403, "PERMISSION_DENIED")
    assert registry.fake.forwarded() == []


# -- download URIs and the UI's artifact route -------------------------------------------------------


def test_download_uri_must_be_in_the_callers_space(registry: Registry, owned: Owned) -> None:
    name = _unique()
    _with_version(registry, "acme", name)
    registry.download_uri = f"mlflow-artifacts:/{owned.exp}/models/{owned.model}/artifacts"
    response = registry.client.get(f"{MV}/get-download-uri", params={"name": name, "version": "1"}, headers=VIEWER)
    assert response.status_code == 200, response.text
    assert response.json() == {"artifact_uri": registry.download_uri}
    (forwarded,) = registry.fake.calls("GET", "model-versions/get-download-uri")
    assert forwarded.query == {"name": [f"acme.{name}"], "version": ["1"]}

    for uri in (
        f"mlflow-artifacts:/{owned.foreign_exp}/{owned.foreign_run}/artifacts",
        f"s3://bucket/artifacts/{owned.foreign_exp}/models/{owned.foreign_model}/artifacts",
    ):
        registry.download_uri = uri
        response = registry.client.get(f"{MV}/get-download-uri", params={"name": name, "version": "1"}, headers=ACME)
        assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST")
    registry.download_uri = "file:///mlflow/artifacts/1/x"
    response = registry.client.get(f"{MV}/get-download-uri", params={"name": name, "version": "1"}, headers=ACME)
    assert_mlflow_error(response, 403, "PERMISSION_DENIED")


def test_download_uri_of_a_foreign_version_is_missing(registry: Registry) -> None:
    name = _unique()
    _with_version(registry, "globex", name)
    response = registry.client.get(f"{MV}/get-download-uri", params={"name": name, "version": "1"}, headers=ACME)
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"Model Version (name={name}, version=1) not found")


def test_get_artifact_streams_from_the_gateways_store(registry: Registry, owned: Owned) -> None:
    name = _unique()
    _with_version(registry, "acme", name)
    root = f"{owned.exp}/models/{owned.model}/artifacts"
    registry.download_uri = f"mlflow-artifacts:/{root}"
    registry.gateway.store.put(f"{root}/MLmodel", b"flavors: {}\n")
    response = registry.client.get(
        "/model-versions/get-artifact", params={"name": name, "version": "1", "path": "MLmodel"}, headers=VIEWER
    )
    assert response.status_code == 200, response.text
    assert response.content == b"flavors: {}\n"
    assert registry.gateway.store.calls == [("open", f"{root}/MLmodel")]
    assert registry.fake.forwarded("GET", "model-versions/get-artifact") == []

    registry.gateway.store.calls.clear()
    for path in ("../../x", "%2e%2e/x", "/etc/passwd"):
        response = registry.client.get(
            "/model-versions/get-artifact", params={"name": name, "version": "1", "path": path}, headers=ACME
        )
        assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    registry.download_uri = f"mlflow-artifacts:/{owned.foreign_exp}/{owned.foreign_run}/artifacts"
    response = registry.client.get(
        "/model-versions/get-artifact", params={"name": name, "version": "1", "path": "MLmodel"}, headers=ACME
    )
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST")
    assert registry.gateway.store.calls == []
