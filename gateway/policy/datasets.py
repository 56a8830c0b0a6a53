"""Evaluation datasets (GenAI): owned through the experiments they are linked to.

A dataset may be linked to several experiments; it is the tenant's when it has links and every
linked experiment is the tenant's (:meth:`~gateway.policy.ownership.Ownership.dataset_tenant_of`).
The policies keep that true, which is what makes the dataset -> tenant cache safe: a dataset is
created linked to at least one experiment, all the caller's; add-experiments links only the
owner's experiments; remove-experiments may not drop the last link. A foreign or missing dataset id
is answered with MLflow's own "not found" for that route.

Searches are forced to name the caller's experiments: MLflow's dataset search with no experiment
ids returns every tenant's datasets (mlflow-api.md §9f, verified).

``tags`` and ``records`` are JSON documents inside a JSON string field. Like the body itself they
are parsed strictly (no duplicate keys), checked, and re-serialised, so MLflow reads exactly what
was checked.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from gateway.errors import BadRequest, NotFound, PermissionDenied
from gateway.http.canonical import JsonObject, parse_json_document
from gateway.policy.core import Access, Body, Exchange, Policy, RequestStep
from gateway.policy.logged_models import owned_experiment_ids, reject_reserved_path_key
from gateway.policy.ownership import dataset_not_found
from gateway.policy.steps import is_reserved_tag, provenance_tags, reserved_tag_denied

MLFLOW_USER_TAG = "mlflow.user"  # MLflow sets created_by / last_updated_by from this tag
TRACE_SOURCE = "TRACE"


def _set_tags_not_found(dataset_id: str) -> NotFound:
    """MLflow's answer for a missing dataset on set-tags (sqlalchemy_store.set_dataset_tags)."""
    return NotFound(f"Could not find evaluation dataset with ID {dataset_id}")


def _link_not_found(dataset_id: str) -> NotFound:
    """MLflow's answer for a missing dataset on add/remove-experiments."""
    return NotFound(f"Dataset '{dataset_id}' not found")


# -- JSON documents inside string fields ------------------------------------------------------------


def _json_string_field(ex: Exchange, field: str) -> Any:
    """The JSON document in string field ``field`` (``None`` when absent), parsed strictly."""
    raw = ex.json_body().get(field)
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise BadRequest(f"Field '{field}' must be a JSON string")
    return parse_json_document(raw, what=f"Field '{field}'")


def _set_json_string_field(ex: Exchange, field: str, value: Any) -> None:
    ex.json_body()[field] = json.dumps(value, separators=(",", ":"))


def _tag_dict(value: Any, what: str) -> dict[str, Any]:
    """A ``{key: value}`` tag map with no reserved key (``None`` is an empty map)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object of tag keys to values")
    for key in value:
        if is_reserved_tag(key):
            raise reserved_tag_denied(key)
    return value


# -- ownership ----------------------------------------------------------------------------------------


def require_owned_dataset(not_found: Callable[[str], NotFound] = dataset_not_found) -> RequestStep:
    """Check the path's dataset is the tenant's; otherwise answer ``not_found`` (MLflow's text for the route)."""

    async def step(ex: Exchange) -> None:
        dataset_id = ex.path_params["dataset_id"]
        try:
            await ex.services.ownership.require_dataset(ex.tenant, dataset_id)
        except NotFound:
            raise not_found(dataset_id) from None

    return step


async def bind_body_dataset_id(ex: Exchange) -> None:
    """Make the body's ``dataset_id`` the path's (the one checked); a body naming another is a 400."""
    dataset_id = ex.path_params["dataset_id"]
    body = ex.json_body()
    if body.get("dataset_id") not in (None, "", dataset_id):
        raise BadRequest("The body's 'dataset_id' and the path name different datasets")
    body["dataset_id"] = dataset_id


def require_owned_experiment_ids(*, required: bool) -> RequestStep:
    """Check every ``experiment_ids`` entry is the tenant's (``0`` -> its Default); send them resolved."""

    async def step(ex: Exchange) -> None:
        body = ex.json_body()
        body["experiment_ids"] = await owned_experiment_ids(
            ex, body.get("experiment_ids"), "experiment_ids", required=required
        )

    return step


async def require_linked_experiments(ex: Exchange) -> None:
    """A new dataset must be linked to at least one experiment: that is what makes it the caller's."""
    body = ex.json_body()
    ids = body.get("experiment_ids")
    if not ids:
        raise BadRequest(
            "Field 'experiment_ids' must name at least one experiment: a dataset belongs to the "
            "tenant of the experiments it is linked to"
        )
    body["experiment_ids"] = await owned_experiment_ids(ex, ids, "experiment_ids")


async def keep_one_link(ex: Exchange) -> None:
    """Refuse removing every remaining experiment link: an unlinked dataset would belong to no one.

    The experiment ids were resolved and checked by the previous step; the current links are read
    upstream (they change, so they are never cached).
    """
    dataset_id = ex.path_params["dataset_id"]
    removing = set(ex.json_body().get("experiment_ids") or [])
    current = set(await ex.services.ownership.dataset_experiment_ids(dataset_id))
    if current and current <= removing:
        raise PermissionDenied(
            "A dataset must stay linked to at least one experiment: it belongs to the tenant of its experiments"
        )


def remember_created_dataset(ex: Exchange, status: int, body: JsonObject) -> None:
    """Prime the dataset -> tenant cache from the create response (it was linked to the caller's experiments)."""
    dataset: Any = body.get("dataset")
    dataset_id = dataset.get("dataset_id") if isinstance(dataset, dict) else None
    if status == 200 and isinstance(dataset_id, str):
        ex.services.ownership.remember_dataset(dataset_id, ex.tenant)


# -- searches -----------------------------------------------------------------------------------------


async def scope_dataset_search(ex: Exchange) -> None:
    """Force the search onto the caller's experiments: ``experiment_ids`` is required and owned.

    MLflow treats a missing or empty list as "every dataset on the server". The GET form carries the
    list in the query (repeated ``experiment_ids``), the POST form in the body.
    """
    if ex.body is None:
        ex.query["experiment_ids"] = await owned_experiment_ids(ex, ex.query.get("experiment_ids"), "experiment_ids")
    else:
        ex.body["experiment_ids"] = await owned_experiment_ids(ex, ex.body.get("experiment_ids"), "experiment_ids")


# -- tags and records ---------------------------------------------------------------------------------


async def stamp_dataset_provenance(ex: Exchange) -> None:
    """Check the new dataset's tags (no ``matih.*``) and set its creator and provenance from the token.

    MLflow takes ``created_by`` from the ``mlflow.user`` tag (the body's ``created_by`` is ignored,
    and is overwritten here too).
    """
    tags = _tag_dict(_json_string_field(ex, "tags"), "Field 'tags'")
    tags.update({**provenance_tags(ex), MLFLOW_USER_TAG: ex.caller.user})
    _set_json_string_field(ex, "tags", tags)
    ex.json_body()["created_by"] = ex.caller.user


async def check_dataset_tags(ex: Exchange) -> None:
    """Refuse a set-tags document that writes a ``matih.*`` key; forward it re-serialised."""
    tags = _json_string_field(ex, "tags")
    if tags is None:
        raise BadRequest("Missing value for required parameter 'tags'.")
    _set_json_string_field(ex, "tags", _tag_dict(tags, "Field 'tags'"))


async def check_records(ex: Exchange) -> None:
    """Check upserted records and stamp their user from the token; note the traces they cite.

    Each record's tags may not write ``matih.*``, and their ``mlflow.user`` (which MLflow turns into
    the record's ``created_by`` / ``last_updated_by``) is the caller. The body's ``updated_by`` is
    ignored by MLflow and overwritten too. Cited traces are checked by :func:`require_cited_traces`.
    """
    records = _json_string_field(ex, "records")
    if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
        raise BadRequest("Field 'records' must be a JSON list of record objects")
    trace_ids: dict[str, None] = {}
    for record in records:
        tags = _tag_dict(record.get("tags"), "A record's 'tags'")
        tags[MLFLOW_USER_TAG] = ex.caller.user
        record["tags"] = tags
        trace_id = _cited_trace(record.get("source"))
        if trace_id is not None:
            trace_ids[trace_id] = None
    ex.notes["cited_traces"] = list(trace_ids)
    _set_json_string_field(ex, "records", records)
    ex.json_body()["updated_by"] = ex.caller.user


async def require_cited_traces(ex: Exchange) -> None:
    """Check every trace a record cites as its source is the tenant's (else MLflow's "not found").

    MLflow stores a record's source trace id unchecked; without this a dataset could cite another
    tenant's trace. Runs after the dataset's ownership check, so a foreign dataset costs no look-up.
    """
    for trace_id in ex.notes.get("cited_traces", []):
        await ex.services.ownership.require_trace(ex.tenant, trace_id)


def _cited_trace(source: Any) -> str | None:
    """The trace id a record's ``source`` cites, read as MLflow reads it (``DatasetRecord``)."""
    if source is None:
        return None
    if not isinstance(source, dict):
        raise BadRequest("A record's 'source' must be an object")
    source_type = source.get("source_type")
    if source_type is None:
        return None
    if not isinstance(source_type, str):
        raise BadRequest("A record's 'source.source_type' must be a string")
    if source_type.upper() != TRACE_SOURCE:  # DatasetRecordSourceType._parse upper-cases it
        return None
    data = source.get("source_data")
    if data is None:
        return None
    if not isinstance(data, dict):
        raise BadRequest("A record's 'source.source_data' must be an object")
    trace_id = data.get("trace_id")
    if trace_id is not None and not isinstance(trace_id, str):
        raise BadRequest("A record's 'source.source_data.trace_id' must be a string")
    return trace_id


_OWNED = require_owned_dataset()

CREATE = Policy(
    request=(require_linked_experiments, stamp_dataset_provenance),
    response=(remember_created_dataset,),
    description="OE on every experiment id (at least one); matih.* reserved; creator and provenance from the token",
)
GET = Policy(request=(_OWNED,), body=Body.NONE, access=Access.READ, description="OD")
DELETE = Policy(request=(_OWNED,), description="OD (permanent: records go too)")
SEARCH_POST = Policy(request=(scope_dataset_search,), access=Access.READ, description="SR: experiment_ids forced")
SEARCH_GET = Policy(
    request=(scope_dataset_search,), body=Body.NONE, access=Access.READ, description="SR: experiment_ids forced"
)
SET_TAGS = Policy(
    request=(check_dataset_tags, bind_body_dataset_id, require_owned_dataset(_set_tags_not_found)),
    description="OD; matih.* reserved",
)
DELETE_TAG = Policy(request=(reject_reserved_path_key("key"), _OWNED), description="OD; matih.* reserved")
UPSERT_RECORDS = Policy(
    request=(check_records, bind_body_dataset_id, _OWNED, require_cited_traces),
    description="OD; record user from the token; cited traces must be owned",
)
GET_RECORDS = Policy(request=(_OWNED,), body=Body.NONE, access=Access.READ, description="OD")
DELETE_RECORDS = Policy(request=(bind_body_dataset_id, _OWNED), description="OD (records are scoped to the dataset)")
GET_EXPERIMENT_IDS = Policy(request=(_OWNED,), body=Body.NONE, access=Access.READ, description="OD")
ADD_EXPERIMENTS = Policy(
    request=(
        bind_body_dataset_id,
        require_owned_dataset(_link_not_found),
        require_owned_experiment_ids(required=False),
    ),
    description="OD + OE on every experiment id",
)
REMOVE_EXPERIMENTS = Policy(
    request=(
        bind_body_dataset_id,
        require_owned_dataset(_link_not_found),
        require_owned_experiment_ids(required=False),
        keep_one_link,
    ),
    description="OD + OE on every experiment id; the last link cannot be removed",
)
