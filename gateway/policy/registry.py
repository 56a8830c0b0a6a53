"""The model registry and prompts: names carry the tenant prefix upstream, lineage must be owned.

Upstream a registered model (or prompt, which is a registered model tagged
``mlflow.prompt.is_prompt``) is named ``<tenant>.<name>``; the client only ever sees ``<name>``.
MLflow forbids ``/`` and ``:`` in model names, and tenant ids are ``[a-z0-9-]`` (no ``.``), so the
prefix is unambiguous: ``acme.`` never starts another tenant's name.

Every request naming a model is prefixed, every response is stripped, and a response object that
does not carry the caller's prefix is answered as not found. Searches are parsed strictly
(:mod:`gateway.policy.filters`) and re-serialised with ``name LIKE '<tenant>.%'`` appended.

A model version's lineage (``source``, ``run_id``, ``model_id``) must be the caller's own: MLflow
itself accepts any source the server can read (``mlflow-api.md`` §9 d), so a tenant could register
another tenant's run artifacts and download them. Only owned runs, logged models, registered model
versions, artifact paths of owned objects, and the prompt placeholders are accepted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from urllib.parse import quote

from starlette.types import Receive, Send

from gateway.artifacts.paths import ArtifactPath, check_relative, parse_artifact_path, require_owned_path
from gateway.artifacts.routes import send_json, stream_download
from gateway.errors import BadRequest, NotFound, PermissionDenied
from gateway.http.canonical import JsonObject, single_value
from gateway.policy.core import Access, Body, Exchange, Policy, RequestStep, ResponseStep, Served
from gateway.policy.experiments import objects_at
from gateway.policy.filters import (
    Comparison,
    FilterError,
    Grammar,
    Value,
    parse_filter,
    serialise_filter,
)
from gateway.policy.steps import (
    field_value,
    inject_tags,
    provenance_tags,
    reject_reserved_key,
    reject_reserved_tags,
    require_string,
    set_field,
)

# Upstream registered-model and prompt names are `<tenant>.<name>` (design rule 5).
REGISTRY_SEPARATOR = "."
# MLflow's placeholders for a prompt version's (unused) source (mlflow/prompt/constants.py).
PROMPT_SOURCE_PLACEHOLDERS = frozenset({"dummy-source", "prompt-template"})
_TENANT_ID = re.compile(r"[a-z0-9-]{1,63}")
_LOGGED_MODEL_ID = re.compile(r"m-[0-9a-f]{32}")
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_MODEL_REFERENCE = re.compile(r"(?P<name>[^/@]+)(?:/(?P<version>[A-Za-z0-9_-]+)|@(?P<alias>[A-Za-z0-9_-]+))")
_MLFLOW_ARTIFACTS = "mlflow-artifacts:/"


def registered_model_prefix(tenant: str) -> str:
    """The upstream name prefix of every registered model (and prompt) of ``tenant``."""
    return tenant + REGISTRY_SEPARATOR


def registered_model_not_found(name: str) -> NotFound:
    """MLflow's own answer for a missing registered model (sqlalchemy_store._get_registered_model)."""
    return NotFound(f"Registered Model with name={name} not found")


# -- names ------------------------------------------------------------------------------------------


def prefix_name(field: str, *, required: bool = True) -> RequestStep:
    """Prefix the registered-model name in ``field`` with ``<tenant>.``: a tenant can only name its own."""

    async def step(ex: Exchange) -> None:
        if not required and field_value(ex, field) is None:
            return
        name = require_string(ex, field)
        ex.notes.setdefault("registry_name", name)
        set_field(ex, field, registered_model_prefix(ex.tenant) + name)

    return step


_NAME = prefix_name("name")


def _strip_source(obj: JsonObject, prefix: str) -> None:
    """``models:/<tenant>.<name>/<v>`` sources (copied versions) are shown as the client wrote them."""
    source = obj.get("source")
    if isinstance(source, str) and source.startswith("models:/" + prefix):
        obj["source"] = "models:/" + source[len("models:/" + prefix) :]


_OBJECT_PATHS = (
    "registered_model",
    "registered_model.latest_versions[]",
    "registered_models[]",
    "registered_models[].latest_versions[]",
    "model_version",
    "model_versions[]",
)


def strip_names(ex: Exchange, status: int, body: JsonObject) -> None:
    """Remove the tenant prefix from every registered model and version of a 2xx response.

    An object that does not carry the caller's prefix is another tenant's: the request was scoped
    so this cannot happen, and if it did the answer is MLflow's "not found".
    """
    if status >= 300:
        return
    prefix = registered_model_prefix(ex.tenant)
    for path in _OBJECT_PATHS:
        for obj in objects_at(body, path):
            name = obj.get("name")
            if not isinstance(name, str):
                continue
            if not name.startswith(prefix) or len(name) == len(prefix):
                raise registered_model_not_found(str(ex.notes.get("registry_name", "")))
            obj["name"] = name[len(prefix) :]
            _strip_source(obj, prefix)


def strip_prefix_in_error(ex: Exchange, status: int, body: JsonObject) -> None:
    """Remove the caller's own prefix from error messages ("Registered Model with name=acme.x not found")."""
    message = body.get("message")
    if status >= 400 and isinstance(message, str):
        pattern = r"(?<![\w/.-])" + re.escape(registered_model_prefix(ex.tenant))
        body["message"] = re.sub(pattern, "", message)


_RESPONSE: tuple[ResponseStep, ...] = (strip_names, strip_prefix_in_error)


async def stamp_provenance(ex: Exchange) -> None:
    """Record the creating tenant and user as ``matih.*`` tags (from the verified token)."""
    inject_tags(ex, "tags", provenance_tags(ex))


# -- searches ---------------------------------------------------------------------------------------


_STRING_OPS = frozenset({"=", "!=", "LIKE", "ILIKE"})
_NUMERIC_OPS = frozenset({"=", "!=", "<", "<=", ">", ">="})
_LIST_OPS = frozenset({"IN", "NOT IN"})


def _registry_comparators(numeric: frozenset[str], lists: frozenset[str]) -> Callable[[str, str], frozenset[str]]:
    def comparators(entity: str, key: str) -> frozenset[str]:
        if entity == "tag":
            return _STRING_OPS
        if key in numeric:
            return _NUMERIC_OPS
        return _STRING_OPS | (_LIST_OPS if key in lists else frozenset())

    return comparators


def _check_registry_value(comparison: Comparison) -> Comparison:
    if isinstance(comparison.value, float):
        raise FilterError(f"Invalid value for numeric attribute '{comparison.key}': {comparison.value!r}")
    return comparison


# SearchModelUtils / the registry store's _get_search_registered_model_filter_query.
REGISTERED_MODELS = Grammar(
    name="registered_models",
    entities={"attribute": "attribute", "tag": "tag", "tags": "tag"},
    backticked_entity=False,
    attributes=frozenset({"name"}),
    order_by_attributes=frozenset({"name", "creation_timestamp", "last_updated_timestamp"}),
    numeric_attributes=frozenset(),
    list_attributes=frozenset({"name"}),
    comparators=_registry_comparators(frozenset(), frozenset({"name"})),
    upper_case_comparators=True,
    check_value=_check_registry_value,
    canonical_entity={"attribute": "attribute", "tag": "tags"},
    order_by_types=frozenset({"attribute"}),
)
# SearchModelVersionUtils / the registry store's _get_search_model_versions_filter_clauses.
MODEL_VERSIONS = Grammar(
    name="model_versions",
    entities={"attribute": "attribute", "tag": "tag", "tags": "tag"},
    backticked_entity=False,
    attributes=frozenset({"name", "version_number", "run_id", "source_path"}),
    order_by_attributes=frozenset({"name", "version_number", "creation_timestamp", "last_updated_timestamp"}),
    numeric_attributes=frozenset({"version_number"}),
    list_attributes=frozenset({"name", "run_id"}),
    comparators=_registry_comparators(frozenset({"version_number"}), frozenset({"name", "run_id"})),
    upper_case_comparators=True,
    check_value=_check_registry_value,
    canonical_entity={"attribute": "attribute", "tag": "tags"},
    order_by_types=frozenset({"attribute"}),
)


def _prefixed(value: Value, prefix: str) -> Value:
    if isinstance(value, tuple):
        return tuple(prefix + item for item in value)
    if isinstance(value, str):
        return prefix + value
    raise FilterError("Registered model names are compared with strings")


def scope_registry_filter(text: str, tenant: str, grammar: Grammar) -> str:
    """Rewrite a registry search filter so it can only match ``tenant``'s models or versions.

    Every ``name`` literal gets the ``<tenant>.`` prefix (``=``/``!=``/``IN`` values and
    ``LIKE``/``ILIKE`` patterns alike, so a pattern is anchored in the tenant's namespace), and
    ``name LIKE '<tenant>.%'`` is appended. The tenant id has no LIKE wildcard and the prefix ends
    with the separator, so ``acme`` never matches ``acmeco.x``; tag clauses (the prompt marker) are
    kept as parsed.
    """
    if not _TENANT_ID.fullmatch(tenant):
        raise PermissionDenied("This tenant id cannot be used to scope a search")
    prefix = registered_model_prefix(tenant)
    comparisons = [
        replace(comparison, value=_prefixed(comparison.value, prefix))
        if comparison.entity == "attribute" and comparison.key == "name"
        else comparison
        for comparison in parse_filter(text, grammar)
    ]
    comparisons.append(Comparison("attribute", "name", "LIKE", prefix + "%"))
    return serialise_filter(comparisons, grammar)


def scope_search(grammar: Grammar) -> RequestStep:
    """Replace the query's ``filter`` with its tenant-scoped, gateway-serialised form.

    Pagination (offset page tokens), ``max_results`` and ``order_by`` pass through: every row of
    the scoped query is the caller's, whatever the page or order.
    """

    async def step(ex: Exchange) -> None:
        text = single_value(ex.query, "filter") or ""
        ex.query["filter"] = [scope_registry_filter(text, ex.tenant, grammar)]

    return step


# -- lineage ----------------------------------------------------------------------------------------


def invalid_source(source: str) -> BadRequest:
    """The refusal for a model-version source outside the caller's own objects."""
    return BadRequest(
        f"Invalid model version source: '{source}'. The gateway accepts runs:/, models:/ and "
        "mlflow-artifacts:/ sources of your own runs, logged models and model versions"
    )


def destination_relative(ex: Exchange, uri: str) -> str | None:
    """The path under the artifacts destination that ``uri`` names, or ``None`` if it names none.

    ``mlflow-artifacts:/<path>`` and ``s3://<bucket>/<prefix>/<path>`` (the gateway's own
    destination) are understood; every other scheme, bucket or prefix is outside it.
    """
    if uri.startswith(_MLFLOW_ARTIFACTS):
        rest = uri[len(_MLFLOW_ARTIFACTS) :]
        return None if rest.startswith("/") else rest
    store = ex.services.artifacts
    if store is None or not uri.startswith("s3://"):
        return None
    root = f"s3://{store.bucket}/{store.prefix}/" if store.prefix else f"s3://{store.bucket}/"
    return uri[len(root) :] if uri.startswith(root) else None


async def owned_artifact(ex: Exchange, relative: str) -> ArtifactPath:
    """A destination path inside an owned run's, logged model's or trace's artifacts."""
    artifact = parse_artifact_path(relative)
    if not artifact.is_inside_artifacts:
        raise NotFound("Artifact does not exist")
    await require_owned_path(ex, artifact)
    return artifact


async def check_source(ex: Exchange, source: str) -> str:
    """Check a model-version ``source`` names the caller's own object; return it as sent upstream."""
    if source in PROMPT_SOURCE_PLACEHOLDERS:
        return source
    ownership = ex.services.ownership
    if source.startswith("runs:/"):
        run_id, _, inner = source[len("runs:/") :].partition("/")
        if not _RUN_ID.fullmatch(run_id):
            raise invalid_source(source)
        check_relative(inner, allow_empty=True)
        await ownership.require_run(ex.tenant, run_id)
        return source
    if source.startswith("models:/"):
        reference = source[len("models:/") :]
        if _LOGGED_MODEL_ID.fullmatch(reference):
            await ownership.require_logged_model(ex.tenant, reference)
            return source
        match = _MODEL_REFERENCE.fullmatch(reference)
        if match is None:
            raise invalid_source(source)
        return "models:/" + registered_model_prefix(ex.tenant) + reference
    relative = destination_relative(ex, source)
    if relative is None:
        raise invalid_source(source)
    await owned_artifact(ex, relative)
    return source


async def check_lineage(ex: Exchange) -> None:
    """``source``, ``run_id`` and ``model_id`` of a new model version must all be the caller's.

    MLflow lets a version point at any location its server can read and then serves it; here the
    source must be an owned run (``runs:/``), logged model (``models:/m-...``), a version of the
    caller's own registered model (``models:/<name>/<version>``, prefixed), an owned object's
    artifacts in the gateway's destination, or a prompt placeholder. Anything else is a 400, a
    foreign object MLflow's own "not found".
    """
    body = ex.json_body()
    source = body.get("source")
    if not isinstance(source, str) or not source:
        raise BadRequest("Missing value for required parameter 'source'.")
    body["source"] = await check_source(ex, source)
    run_id = body.get("run_id")
    if run_id not in (None, ""):
        if not isinstance(run_id, str):
            raise BadRequest("Field 'run_id' must be a string")
        await ex.services.ownership.require_run(ex.tenant, run_id)
    model_id = body.get("model_id")
    if model_id not in (None, ""):
        if not isinstance(model_id, str):
            raise BadRequest("Field 'model_id' must be a string")
        await ex.services.ownership.require_logged_model(ex.tenant, model_id)


# -- download URIs and the UI's model-version artifact route ----------------------------------------

_JSON_HEADERS = {"Accept": "application/json"}


async def _download_uri(ex: Exchange) -> tuple[int, JsonObject]:
    """Ask MLflow for the (prefixed) version's download URI; the body is stripped like a response."""
    name = require_string(ex, "name")
    version = require_string(ex, "version")
    ex.notes["registry_name"] = name
    upstream_name = registered_model_prefix(ex.tenant) + name
    path = (
        "/api/2.0/mlflow/model-versions/get-download-uri"
        f"?name={quote(upstream_name, safe='')}&version={quote(version, safe='')}"
    )
    status, body = await ex.services.upstream.json_call("GET", path, headers=_JSON_HEADERS)
    payload: JsonObject = body if isinstance(body, dict) else {}
    strip_prefix_in_error(ex, status, payload)
    return status, payload


async def _owned_download_root(ex: Exchange, uri: object) -> ArtifactPath:
    relative = destination_relative(ex, uri) if isinstance(uri, str) else None
    if relative is None:
        raise PermissionDenied("This model version's artifacts are not stored in the gateway's artifact store")
    return await owned_artifact(ex, relative)


async def get_download_uri(ex: Exchange, receive: Receive, send: Send) -> None:
    """GET model-versions/get-download-uri: prefix the name, and answer only a URI in the caller's space."""
    status, body = await _download_uri(ex)
    if status == 200:
        await _owned_download_root(ex, body.get("artifact_uri"))
    await send_json(send, body, status)


async def get_model_version_artifact(ex: Exchange, receive: Receive, send: Send) -> None:
    """GET /model-versions/get-artifact?name=&version=&path= (UI): stream the file from S3 ourselves."""
    relative = single_value(ex.query, "path")
    if not relative:
        raise BadRequest("Missing value for required parameter 'path'.")
    inner = check_relative(relative)
    status, body = await _download_uri(ex)
    if status != 200:
        await send_json(send, body, status)
        return
    root = await _owned_download_root(ex, body.get("artifact_uri"))
    artifact = await owned_artifact(ex, f"{root.path}/{inner}")
    store = ex.services.artifacts
    if store is None:
        raise PermissionDenied("Artifact storage is not configured on this gateway (GATEWAY_ARTIFACTS_DESTINATION)")
    await stream_download(store, artifact.path, receive, send)


# -- policies ---------------------------------------------------------------------------------------

CREATE_MODEL = Policy(
    request=(reject_reserved_tags("tags"), _NAME, stamp_provenance),
    response=_RESPONSE,
    description="NR: prefix the name; matih.* reserved; provenance from the token",
)
RENAME_MODEL = Policy(
    request=(_NAME, prefix_name("new_name")),
    response=_RESPONSE,
    description="NR(name, new_name): a rename cannot leave the tenant's prefix",
)
UPDATE_MODEL = Policy(request=(_NAME,), response=_RESPONSE, description="NR")
DELETE_MODEL = Policy(request=(_NAME,), response=_RESPONSE, access=Access.ADMIN, description="NR (admin)")
READ_MODEL = Policy(
    request=(_NAME,), response=_RESPONSE, body=Body.NONE, access=Access.READ, description="NR, strip the answer"
)
READ_MODEL_POST = Policy(request=(_NAME,), response=_RESPONSE, access=Access.READ, description="NR, strip the answer")
SEARCH_MODELS = Policy(
    request=(scope_search(REGISTERED_MODELS),),
    response=_RESPONSE,
    body=Body.NONE,
    access=Access.READ,
    description="filter parsed, name literals prefixed, AND name LIKE '<tenant>.%' appended",
)
WRITE_MODEL = Policy(request=(_NAME,), response=_RESPONSE, description="NR")
DELETE_ALIAS = Policy(request=(_NAME,), response=_RESPONSE, description="NR")
MODEL_TAG = Policy(request=(reject_reserved_key("key"), _NAME), response=_RESPONSE, description="NR; matih.* reserved")
CREATE_VERSION = Policy(
    request=(reject_reserved_tags("tags"), _NAME, check_lineage, stamp_provenance),
    response=_RESPONSE,
    description="NR + lineage: source, run_id and model_id must be the caller's; provenance from the token",
)
WRITE_VERSION = Policy(request=(_NAME,), response=_RESPONSE, description="NR")
DELETE_VERSION = Policy(request=(_NAME,), response=_RESPONSE, access=Access.ADMIN, description="NR (admin)")
READ_VERSION = Policy(
    request=(_NAME,), response=_RESPONSE, body=Body.NONE, access=Access.READ, description="NR, strip the answer"
)
SEARCH_VERSIONS = Policy(
    request=(scope_search(MODEL_VERSIONS),),
    response=_RESPONSE,
    body=Body.NONE,
    access=Access.READ,
    description="filter parsed, name literals prefixed, AND name LIKE '<tenant>.%' appended",
)
VERSION_TAG = Policy(
    request=(reject_reserved_key("key"), _NAME), response=_RESPONSE, description="NR; matih.* reserved"
)
DOWNLOAD_URI = Served(
    get_download_uri, Access.READ, description="NR; the answered URI must be in the caller's artifact space"
)
GET_ARTIFACT = Served(
    get_model_version_artifact,
    Access.READ,
    description="NR -> download URI -> owned path, then stream from S3 (never read by MLflow)",
)
