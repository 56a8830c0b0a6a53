"""Traces (v3 and legacy v2), assessments and OTLP: every trace id must be new or the tenant's.

A trace belongs to its experiment, hence to the experiment's tenant. Three verified leaks shape
this module (``shared/mlflow-api.md`` §3): (a) ``StartTraceV3`` with an existing ``trace_id``
re-homes that trace into the caller's experiment, (b) a ``trace_id`` holding ``../`` is stored
verbatim and ends up in the artifact path the trace's files are read from, and (c) OTLP spans with
an existing trace id are appended to that trace whatever its experiment. So trace ids must be
``tr-<32 hex>`` (or a v2 request id, 32 hex) everywhere, a trace id a client creates must be new or
already the tenant's, and OTLP bodies are decoded and checked before they are forwarded.

The tags that tell MLflow where a trace's data lives (``mlflow.artifactLocation`` and the
``mlflow.trace.*Location`` tags) are written by MLflow only: a client that could set them could
point its own trace at another experiment's files.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from gateway.errors import BadRequest, NotFound, PermissionDenied, UpstreamError
from gateway.http.canonical import JsonObject, single_value
from gateway.policy.core import Access, Body, Exchange, Policy, RequestStep, ResponseStep
from gateway.policy.experiments import require_owned_experiment
from gateway.policy.ownership import TRACE_ID, trace_not_found
from gateway.policy.router import PARAM_PATTERNS
from gateway.policy.runs import require_owned_run
from gateway.policy.steps import (
    field_value,
    inject_tags,
    is_reserved_tag,
    provenance_tags,
    require_string,
    reserved_tag_denied,
    tag_list,
)

# The id a client may give a new trace: `tr-` + the 32-hex OTel trace id (no v2 ids, no paths).
NEW_TRACE_ID = re.compile(r"^tr-[0-9a-f]{32}$")
# A client-chosen assessment id must stay addressable by the gateway's assessment routes.
ASSESSMENT_ID = re.compile(rf"^(?:{PARAM_PATTERNS['assessment_id']})$")
# Tags MLflow writes to say where a trace's spans and files live (`mlflow/utils/mlflow_tags.py`).
STORAGE_TAGS = frozenset(
    {
        "mlflow.artifactLocation",
        "mlflow.trace.spansLocation",
        "mlflow.trace.archiveLocation",
        "mlflow.trace.archivalFailure",
    }
)
# MLflow lets clients delete this one to retry a failed archival (`handlers._HANDLER_TRACE_TAGS_...`).
DELETABLE_STORAGE_TAGS = frozenset({"mlflow.trace.archivalFailure"})
ARTIFACT_LOCATION_TAG = "mlflow.artifactLocation"
SOURCE_RUN = "mlflow.sourceRun"
MODEL_ID = "mlflow.modelId"
USER_TAG = "mlflow.user"
HUMAN_SOURCE = ("HUMAN", 1)
SOURCE_TYPES = frozenset({"SOURCE_TYPE_UNSPECIFIED", "HUMAN", "LLM_JUDGE", "CODE", 0, 1, 2, 3})
MLFLOW_EXPERIMENT_LOCATION = ("MLFLOW_EXPERIMENT", 1)
MAX_TRACE_IDS = 500  # per batch read whose ids are looked up one by one (MLflow's search page size)
MAX_LINKED_TRACES = 100  # MLflow's own limit (sqlalchemy_store.link_traces_to_run)

Missing = Callable[[str], NotFound]


def assessment_trace_not_found(trace_id: str) -> NotFound:
    """MLflow's answer for a missing trace on assessment get/update (``_get_sql_assessment``)."""
    return NotFound(f"Trace with request_id '{trace_id}' not found")


def trace_taken(trace_id: str) -> NotFound:
    """The refusal of a create that names another tenant's trace id.

    A missing id would be created, so no answer can look like "missing"; this is MLflow's own
    answer when its workspaces refuse the same re-homing (``sqlalchemy_store.start_trace``).
    """
    return NotFound(f"Trace with ID '{trace_id}' no longer exists.")


# -- trace ids ---------------------------------------------------------------------------------------


def check_trace_id(value: object, field: str) -> str:
    """A well-formed trace id (``tr-<32 hex>`` or a v2 32-hex request id), or a 400."""
    if not isinstance(value, str) or not TRACE_ID.match(value):
        raise BadRequest(f"Invalid trace id in '{field}': expected 'tr-' followed by 32 hex digits")
    return value


def _path_or_field(ex: Exchange, name: str) -> str:
    if name in ex.path_params:
        return ex.path_params[name]
    return check_trace_id(require_string(ex, name), name)


def require_owned_trace(name: str, *, missing: Missing = trace_not_found) -> RequestStep:
    """Check the trace named by path parameter or field ``name`` is the tenant's.

    Another tenant's trace gets ``missing(id)``, exactly what MLflow answers for an unknown id on
    this route.
    """

    async def step(ex: Exchange) -> None:
        trace_id = _path_or_field(ex, name)
        try:
            ex.notes["experiment_id"] = await ex.services.ownership.require_trace(ex.tenant, trace_id)
        except NotFound:
            raise missing(trace_id) from None
        ex.notes["trace_id"] = trace_id

    return step


def ids_match_path(*names: str) -> RequestStep:
    """Refuse a body or query id (``trace_id``, ``assessment_id``...) that differs from the path's.

    The stock client repeats the path ids in the body (or the query of a GET) and MLflow's handlers
    use the path only; a request whose two ids differ would mean two things, so it is refused.
    """

    async def step(ex: Exchange) -> None:
        for name in names:
            value = field_value(ex, name)
            if value not in (None, "") and value != ex.path_params[name]:
                raise BadRequest(f"Field '{name}' does not match the id in the path")

    return step


async def require_new_or_owned_trace(ex: Exchange, trace_id: str) -> None:
    """Pass when no trace has this id yet, or the tenant owns it (leaks a and c)."""
    ownership = ex.services.ownership
    experiment_id = await ownership.trace_experiment_id(trace_id)
    if experiment_id is None:
        return
    try:
        await ownership.require_experiment(ex.tenant, experiment_id)
    except NotFound:
        raise trace_taken(trace_id) from None


# -- tags and metadata -------------------------------------------------------------------------------


def check_trace_tag_key(key: object, *, deleting: bool = False) -> None:
    """Refuse the reserved ``matih.*`` namespace and the tags that locate a trace's data."""
    if is_reserved_tag(key):
        raise reserved_tag_denied(str(key))
    if isinstance(key, str):
        name = key.strip()
        if name in STORAGE_TAGS and not (deleting and name in DELETABLE_STORAGE_TAGS):
            raise PermissionDenied(f"Tag '{name}' records where MLflow stores the trace; only MLflow writes it")


def reject_trace_tag_key(field: str = "key", *, deleting: bool = False) -> RequestStep:
    """Refuse a set/delete of one trace tag in a reserved or storage-location key."""

    async def step(ex: Exchange) -> None:
        check_trace_tag_key(field_value(ex, field), deleting=deleting)

    return step


def reject_trace_tag_list(field: str = "tags") -> RequestStep:
    """Refuse a v2 ``[{key, value}]`` tag list that writes a reserved or storage-location key."""

    async def step(ex: Exchange) -> None:
        for tag in tag_list(ex, field):
            check_trace_tag_key(tag.get("key"))

    return step


def _string_map(value: object, field: str) -> dict[str, str]:
    """A protobuf map field as JSON: an object of strings (anything else MLflow would half-parse)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise BadRequest(f"Field '{field}' must be an object of string values")
    return value


def _pairs(value: object, field: str) -> Iterable[tuple[object, object]]:
    """Key/value pairs of a v3 map (object) or a v2 ``[{key, value}]`` list."""
    if value is None:
        return []
    if isinstance(value, dict):
        return list(_string_map(value, field).items())
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        return [(item.get("key"), item.get("value")) for item in value]
    raise BadRequest(f"Field '{field}' must be an object or a list of {{key, value}} objects")


async def check_metadata_references(ex: Exchange, metadata: object, field: str) -> None:
    """Trace metadata that names a run (``mlflow.sourceRun``) or a logged model must name the tenant's."""
    ownership = ex.services.ownership
    for key, value in _pairs(metadata, field):
        if key in (SOURCE_RUN, MODEL_ID) and value not in (None, ""):
            if not isinstance(value, str):
                raise BadRequest(f"Metadata '{key}' must be a string")
            if key == SOURCE_RUN:
                await ownership.require_run(ex.tenant, value)
            else:
                await ownership.require_logged_model(ex.tenant, value)


def creator_tags(ex: Exchange) -> dict[str, str]:
    """Who created a trace, from the verified token: ``mlflow.user`` and the ``matih.*`` provenance."""
    return {USER_TAG: ex.caller.user, **provenance_tags(ex)}


# -- StartTraceV3 ------------------------------------------------------------------------------------


def _trace_info(ex: Exchange) -> JsonObject:
    trace = ex.json_body().get("trace")
    info = trace.get("trace_info") if isinstance(trace, dict) else None
    if not isinstance(trace, dict) or not isinstance(info, dict):
        raise BadRequest("Missing value for required parameter 'trace.trace_info'.")
    if trace.get("spans") not in (None, []):
        raise BadRequest("Field 'trace.spans' is not accepted here: spans are sent to /v1/traces")
    return info


async def check_start_trace_v3(ex: Exchange) -> None:
    """Check and stamp a new v3 trace (``POST /api/3.0/mlflow/traces``).

    The trace id must be ``tr-<32 hex>`` and new or already the tenant's; its experiment (``0`` is
    the tenant's Default) must be the tenant's, and so must a run or logged model its metadata
    names. Client tags may not write ``matih.*`` or the storage-location tags; ``mlflow.user`` and
    the provenance tags are set from the token. Assessments logged with the trace get the human
    source from the token.
    """
    info = _trace_info(ex)
    trace_id = info.get("trace_id")
    if not isinstance(trace_id, str) or not NEW_TRACE_ID.match(trace_id):
        raise BadRequest("Field 'trace.trace_info.trace_id' must be 'tr-' followed by 32 lowercase hex digits")
    tags = _string_map(info.get("tags"), "tags")
    for key in tags:
        check_trace_tag_key(key)
    info["tags"] = {**tags, **creator_tags(ex)}
    metadata = _string_map(info.get("trace_metadata"), "trace_metadata")
    if USER_TAG in metadata:  # the stock client also records its OS user here
        metadata[USER_TAG] = ex.caller.user
    assessments = info.get("assessments") or []
    if not isinstance(assessments, list):
        raise BadRequest("Field 'assessments' must be a list")
    for assessment in assessments:
        _check_assessment(ex, assessment, allow_overrides=False)
    # Local checks first: the look-ups below only run for a request that could be forwarded.
    info["trace_location"] = await _owned_location(ex, info.get("trace_location"), "trace.trace_info.trace_location")
    await check_metadata_references(ex, metadata, "trace_metadata")
    await require_new_or_owned_trace(ex, trace_id)
    ex.notes["trace_id"] = trace_id


async def _owned_location(ex: Exchange, location: object, field: str) -> JsonObject:
    """A ``TraceLocation`` naming one of the tenant's experiments (``0`` -> its Default), rewritten."""
    experiment = location.get("mlflow_experiment") if isinstance(location, dict) else None
    if not isinstance(location, dict) or not isinstance(experiment, dict) or set(experiment) != {"experiment_id"}:
        raise BadRequest(f"Field '{field}' must name an MLflow experiment (mlflow_experiment.experiment_id)")
    if set(location) - {"type", "mlflow_experiment"}:
        raise BadRequest(f"Field '{field}' may only name an MLflow experiment")
    if location.get("type", "MLFLOW_EXPERIMENT") not in MLFLOW_EXPERIMENT_LOCATION:
        raise BadRequest(f"Field '{field}.type' must be MLFLOW_EXPERIMENT")
    ownership = ex.services.ownership
    experiment_id = await ownership.resolve_experiment_id(ex.tenant, experiment["experiment_id"])
    await ownership.require_experiment(ex.tenant, experiment_id)
    ex.notes["experiment_id"] = experiment_id
    return {"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": experiment_id}}


def remember_started_trace(ex: Exchange, status: int, body: JsonObject) -> None:
    """Prime trace -> experiment from a start-trace response (v3 ``trace.trace_info`` or v2 ``trace_info``)."""
    if status != 200:
        return
    info = _dig(body, "trace", "trace_info")
    if isinstance(info, dict):
        trace_id = info.get("trace_id")
        experiment_id = _dig(info, "trace_location", "mlflow_experiment", "experiment_id")
    else:
        info = body.get("trace_info")
        trace_id = info.get("request_id") if isinstance(info, dict) else None
        experiment_id = info.get("experiment_id") if isinstance(info, dict) else None
    if isinstance(trace_id, str) and isinstance(experiment_id, str):
        ex.services.ownership.remember_trace(trace_id, experiment_id)


def remember_listed_traces(list_field: str) -> ResponseStep:
    """Prime trace -> experiment from a scoped listing (v3 trace infos), so follow-up reads are free."""

    def step(ex: Exchange, status: int, body: JsonObject) -> None:
        items = body.get(list_field)
        if status != 200 or not isinstance(items, list):
            return
        for info in items:
            trace_id = info.get("trace_id") if isinstance(info, dict) else None
            experiment_id = _dig(info, "trace_location", "mlflow_experiment", "experiment_id")
            if isinstance(trace_id, str) and isinstance(experiment_id, str):
                ex.services.ownership.remember_trace(trace_id, experiment_id)

    return step


def _dig(value: object, *keys: str) -> object:
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


# -- legacy v2 start / end -----------------------------------------------------------------------------


async def check_v2_trace_metadata(ex: Exchange) -> None:
    """A v2 trace's ``request_metadata`` may only name the tenant's runs and logged models."""
    await check_metadata_references(ex, ex.json_body().get("request_metadata"), "request_metadata")


async def stamp_v2_trace_creator(ex: Exchange) -> None:
    """Set ``mlflow.user`` and the ``matih.*`` provenance tags of a v2 trace from the token."""
    inject_tags(ex, "tags", creator_tags(ex))


# -- assessments ---------------------------------------------------------------------------------------


def _check_assessment(ex: Exchange, assessment: object, *, allow_overrides: bool) -> JsonObject:
    """Check one assessment; a human source is the caller (its ``source_id`` is the token's user)."""
    if not isinstance(assessment, dict):
        raise BadRequest("Missing value for required parameter 'assessment'.")
    assessment_id = assessment.get("assessment_id")
    if assessment_id not in (None, "") and not (isinstance(assessment_id, str) and ASSESSMENT_ID.match(assessment_id)):
        raise BadRequest("Field 'assessment_id' must be 'a-' followed by hex digits")
    if not allow_overrides and assessment.get("overrides") not in (None, ""):
        raise BadRequest("Field 'overrides' is only accepted by the create-assessment endpoint")
    source = assessment.get("source")
    if source is not None:
        if not isinstance(source, dict) or source.get("source_type", 0) not in SOURCE_TYPES:
            raise BadRequest("Field 'assessment.source.source_type' is not a known source type")
        if source.get("source_type") in HUMAN_SOURCE:
            source["source_id"] = ex.caller.user
    return assessment


async def check_new_assessment(ex: Exchange) -> None:
    """Check the body of a new assessment; it is filed under the path's trace (as MLflow does)."""
    assessment = _check_assessment(ex, ex.json_body().get("assessment"), allow_overrides=True)
    assessment["trace_id"] = ex.path_params["trace_id"]


# -- searches and batch reads --------------------------------------------------------------------------


def _id_list(ex: Exchange, field: str) -> list[Any]:
    """A repeated field from the JSON body or the query."""
    values = ex.json_body().get(field) if ex.body is not None else ex.query.get(field)
    if values is None:
        return []
    if not isinstance(values, list):
        raise BadRequest(f"Field '{field}' must be a list")
    return values


def _set_id_list(ex: Exchange, field: str, values: list[str]) -> None:
    if ex.body is not None:
        ex.body[field] = values
    else:
        ex.query[field] = values


async def _owned_experiment_ids(ex: Exchange, raw_ids: list[Any]) -> list[str]:
    ownership = ex.services.ownership
    resolved: list[str] = []
    for raw in raw_ids:
        experiment_id = await ownership.resolve_experiment_id(ex.tenant, raw)
        await ownership.require_experiment(ex.tenant, experiment_id)
        resolved.append(experiment_id)
    return list(dict.fromkeys(resolved))


def require_owned_experiment_list(field: str = "experiment_ids") -> RequestStep:
    """Check a non-empty list of experiment ids (body or query) is the tenant's; ``0`` -> its Default.

    Empty is refused: these MLflow queries treat "no experiment" as "every experiment".
    """

    async def step(ex: Exchange) -> None:
        raw_ids = _id_list(ex, field)
        if not raw_ids:
            raise BadRequest(f"Missing value for required parameter '{field}'.")
        _set_id_list(ex, field, await _owned_experiment_ids(ex, raw_ids))

    return step


async def require_owned_locations(ex: Exchange) -> None:
    """Every search location must be one of the tenant's experiments (``0`` -> its Default).

    An empty list is forwarded: MLflow then matches no experiment and answers ``{}``.
    """
    locations = ex.json_body().get("locations")
    if locations is None:
        return
    if not isinstance(locations, list):
        raise BadRequest("Field 'locations' must be a list")
    ex.json_body()["locations"] = [await _owned_location(ex, location, "locations[]") for location in locations]


def scope_batch_read(*, ids_field: str = "trace_ids", experiments_field: str = "experiment_ids") -> RequestStep:
    """Scope a batch read of trace ids to the tenant's experiments, upstream.

    MLflow silently skips ids it cannot find, so another tenant's id must behave the same: the
    request is forwarded with ``experiment_ids`` set to experiments the tenant owns (the client's,
    each checked, or else those of the requested traces the tenant owns, or its Default), and MLflow
    itself leaves every other trace out. No row is dropped from a response.
    """

    async def step(ex: Exchange) -> None:
        trace_ids = [check_trace_id(value, ids_field) for value in _id_list(ex, ids_field)]
        if not trace_ids:
            raise BadRequest(f"Missing value for required parameter '{ids_field}'.")
        requested = _id_list(ex, experiments_field)
        if requested:
            scope = await _owned_experiment_ids(ex, requested)
        else:
            if len(trace_ids) > MAX_TRACE_IDS:
                raise BadRequest(f"At most {MAX_TRACE_IDS} values of '{ids_field}' are allowed")
            scope = []
            for trace_id in dict.fromkeys(trace_ids):
                try:
                    scope.append(await ex.services.ownership.require_trace(ex.tenant, trace_id))
                except NotFound:
                    continue
            scope = list(dict.fromkeys(scope)) or [await ex.services.ownership.default_experiment(ex.tenant)]
        _set_id_list(ex, experiments_field, scope)

    return step


# -- deletes and links ---------------------------------------------------------------------------------


async def check_request_ids(ex: Exchange) -> None:
    """The trace ids of a delete must be well formed (MLflow scopes them to the owned experiment)."""
    for value in _id_list(ex, "request_ids"):
        check_trace_id(value, "request_ids")


def forget_deleted_traces(ex: Exchange, status: int, body: JsonObject) -> None:
    """Drop deleted trace ids from the ownership cache (a deleted id is free to be reused)."""
    if status == 200:
        for trace_id in _id_list(ex, "request_ids"):
            ex.services.ownership.trace_experiment.discard(trace_id)


async def require_owned_trace_list(ex: Exchange) -> None:
    """Every trace id to link to a run must be the tenant's (at most MLflow's own 100)."""
    trace_ids = _id_list(ex, "trace_ids")
    if not trace_ids:
        raise BadRequest("Missing value for required parameter 'trace_ids'.")
    if len(trace_ids) > MAX_LINKED_TRACES:
        raise BadRequest(f"Cannot link more than {MAX_LINKED_TRACES} traces to a run in a single request.")
    for trace_id in dict.fromkeys(trace_ids):
        await ex.services.ownership.require_trace(ex.tenant, check_trace_id(trace_id, "trace_ids"))


# -- the trace-artifact download (web UI) --------------------------------------------------------------


async def check_trace_artifact(ex: Exchange) -> None:
    """Check a ``get-trace-artifact`` download: owned trace, safe path, data inside its experiment.

    MLflow reads the file from the trace's ``mlflow.artifactLocation`` tag. The gateway never lets a
    client write that tag, and checks here that it is exactly the location MLflow gives a trace of
    the owning experiment (``<experiment artifact location>/traces/<id>/artifacts``).
    """
    trace_id = check_trace_id(require_string(ex, "request_id"), "request_id")
    path = single_value(ex.query, "path")
    if path is not None and (not path or path.startswith("/") or "\\" in path or ".." in path.split("/")):
        raise BadRequest(f"Invalid attachment path '{path}'")
    upstream = ex.services.upstream
    status, body = await upstream.json_call(
        "GET", f"/api/3.0/mlflow/traces/{trace_id}", headers={"Accept": "application/json"}
    )
    if status >= 500:
        raise UpstreamError(f"Upstream MLflow failed a trace look-up ({status})")
    info = _dig(body, "trace", "trace_info")
    experiment_id = _dig(info, "trace_location", "mlflow_experiment", "experiment_id")
    if status != 200 or not isinstance(experiment_id, str):
        raise trace_not_found(trace_id)
    try:
        await ex.services.ownership.require_experiment(ex.tenant, experiment_id)
    except NotFound:
        raise trace_not_found(trace_id) from None
    status, body = await upstream.json_call(
        "GET", f"/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}", headers={"Accept": "application/json"}
    )
    root = _dig(body, "experiment", "artifact_location")
    location = _dig(info, "tags", ARTIFACT_LOCATION_TAG)
    if status != 200 or not isinstance(root, str) or location != f"{root.rstrip('/')}/traces/{trace_id}/artifacts":
        raise PermissionDenied("The trace's artifact location is not inside its experiment")


# -- policies ------------------------------------------------------------------------------------------

_TRACE_V3 = require_owned_trace("trace_id")
_TRACE_V2 = require_owned_trace("request_id")
_SAME_TRACE_V3 = ids_match_path("trace_id")
_SAME_TRACE_V2 = ids_match_path("request_id")
_SAME_ASSESSMENT = ids_match_path("trace_id", "assessment_id")

START_V3 = Policy(
    request=(check_start_trace_v3,),
    response=(remember_started_trace,),
    description="OE (0 -> Default) + trace id tr-<hex>, new or owned (leaks a, b); OR/OM in metadata; creator tags",
)
GET_INFO_V3 = Policy(request=(_SAME_TRACE_V3, _TRACE_V3), body=Body.NONE, access=Access.READ, description="OT")
GET_TRACE = Policy(request=(_TRACE_V3,), body=Body.NONE, access=Access.READ, description="OT (query)")
BATCH_GET = Policy(
    request=(scope_batch_read(),), body=Body.NONE, access=Access.READ, description="scoped to owned experiments"
)
BATCH_GET_INFOS = Policy(
    request=(scope_batch_read(),),
    response=(remember_listed_traces("trace_infos"),),
    access=Access.READ,
    description="scoped to owned experiments",
)
SEARCH_V3 = Policy(
    request=(require_owned_locations,),
    response=(remember_listed_traces("traces"),),
    access=Access.READ,
    description="OE on every location",
)
EXPERIMENT_QUERY = Policy(
    request=(require_owned_experiment_list(),), access=Access.READ, description="OE on every (non-empty) id"
)
DELETE_TRACES = Policy(
    request=(require_owned_experiment(), check_request_ids),
    response=(forget_deleted_traces,),
    description="OE; MLflow deletes only that experiment's traces",
)
SET_TAG_V3 = Policy(
    request=(_SAME_TRACE_V3, reject_trace_tag_key(), _TRACE_V3),
    description="OT; matih.* and storage tags reserved",
)
DELETE_TAG_V3 = Policy(
    request=(_SAME_TRACE_V3, reject_trace_tag_key(deleting=True), _TRACE_V3),
    description="OT; matih.* and storage tags reserved",
)
CREATE_ASSESSMENT = Policy(request=(_TRACE_V3, check_new_assessment), description="OT; a human source is the caller")
_ASSESSMENT_TRACE = require_owned_trace("trace_id", missing=assessment_trace_not_found)
GET_ASSESSMENT = Policy(
    request=(_SAME_ASSESSMENT, _ASSESSMENT_TRACE), body=Body.NONE, access=Access.READ, description="OT"
)
UPDATE_ASSESSMENT = Policy(
    request=(_SAME_ASSESSMENT, _ASSESSMENT_TRACE), description="OT (MLflow keeps the source immutable)"
)
DELETE_ASSESSMENT = Policy(request=(_SAME_ASSESSMENT, _TRACE_V3), description="OT")
# -- legacy v2
START_V2 = Policy(
    request=(
        reject_trace_tag_list("tags"),
        require_owned_experiment(),
        check_v2_trace_metadata,
        stamp_v2_trace_creator,
    ),
    response=(remember_started_trace,),
    description="OE; OR/OM in metadata; creator tags (MLflow picks the id)",
)
END_V2 = Policy(
    request=(
        _SAME_TRACE_V2,
        reject_trace_tag_list("tags"),
        _TRACE_V2,
        check_v2_trace_metadata,
    ),
    description="OT; OR/OM in metadata; matih.* and storage tags reserved",
)
GET_INFO_V2 = Policy(request=(_SAME_TRACE_V2, _TRACE_V2), body=Body.NONE, access=Access.READ, description="OT")
SEARCH_V2 = Policy(
    request=(require_owned_experiment_list(),),
    body=Body.NONE,
    access=Access.READ,
    description="OE on every (non-empty) id",
)
SET_TAG_V2 = Policy(
    request=(_SAME_TRACE_V2, reject_trace_tag_key(), _TRACE_V2),
    description="OT; matih.* and storage tags reserved",
)
DELETE_TAG_V2 = Policy(
    request=(_SAME_TRACE_V2, reject_trace_tag_key(deleting=True), _TRACE_V2),
    description="OT; matih.* and storage tags reserved",
)
LINK_TO_RUN = Policy(
    request=(require_owned_trace_list, require_owned_run("run_id", aliases=())), description="OT each + OR"
)
TRACE_ARTIFACT = Policy(
    request=(check_trace_artifact,),
    body=Body.NONE,
    access=Access.READ,
    description="OT + the trace's artifact location inside its experiment",
)
