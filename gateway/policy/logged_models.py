"""Logged models (MLflow 3): owned through their experiment, created with provenance.

A logged model belongs to one experiment for life, so ``model -> experiment`` is cached like
``run -> experiment`` (:meth:`~gateway.policy.ownership.Ownership.require_logged_model`). Every
route that names a model id in its path checks it; a foreign id is answered exactly like a missing
one ("Logged model with ID '...' not found.").

Registered-model names: a model's ``registrations[].name`` and its ``mlflow.modelVersions`` tag (a
JSON list of ``{name, version}``, written by the registry's create-model-version) carry REGISTERED
MODEL names, stored upstream as ``<tenant>.<name>``. Responses strip the caller's prefix from both
and drop entries of any other tenant (:func:`strip_registered_model_names`).
"""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import BadRequest
from gateway.http.canonical import JsonObject
from gateway.policy.core import Access, Body, Exchange, Policy, RequestStep
from gateway.policy.experiments import require_owned_experiment, strip_prefix_in_error
from gateway.policy.steps import (
    field_value,
    inject_tags,
    is_reserved_tag,
    provenance_tags,
    reject_reserved_tags,
    reserved_tag_denied,
)

# Characters the upstream URL would read as the start of the query or the fragment: a tag key
# holding them cannot be addressed in a path (MLflow's tag names never contain them anyway).
_URL_DELIMITERS = ("?", "#")


async def owned_experiment_ids(ex: Exchange, raw: object, field: str, *, required: bool = True) -> list[str]:
    """The experiment ids of a request list, each the tenant's (``0`` -> its Default), sorted and unique.

    The result is deterministic (numeric order, no duplicates), so a request repeated for its next
    page sends exactly the same list: MLflow embeds the list in logged-model page tokens and
    refuses a token whose list differs. A missing or empty list is a 400 when ``required``: MLflow
    reads "no experiment" as "every experiment", i.e. every tenant's.
    """
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise BadRequest(f"Field '{field}' must be a list of experiment ids")
    if required and not raw:
        raise BadRequest(
            f"Field '{field}' must name at least one experiment: the gateway scopes every search to "
            "the caller's experiments"
        )
    ownership = ex.services.ownership
    resolved: set[str] = set()
    for item in raw:
        experiment_id = await ownership.resolve_experiment_id(ex.tenant, item)
        await ownership.require_experiment(ex.tenant, experiment_id)
        resolved.add(experiment_id)
    return sorted(resolved, key=int)  # require_experiment only passes all-digit ids


async def require_owned_path_model(ex: Exchange) -> None:
    """Check the path's ``model_id`` is a logged model of one of the tenant's experiments."""
    model_id = ex.path_params["model_id"]
    ex.notes["experiment_id"] = await ex.services.ownership.require_logged_model(ex.tenant, model_id)


async def bind_body_model_id(ex: Exchange) -> None:
    """Make the body's ``model_id`` the path's, which is the one checked.

    MLflow's finalize handler acts on the BODY's ``model_id`` and ignores the path's, and the other
    handlers read the path's: a body naming another model is a 400, and the body always carries the
    path's id, so both readings name the model whose ownership was checked.
    """
    model_id = ex.path_params["model_id"]
    body = ex.json_body()
    if body.get("model_id") not in (None, "", model_id):
        raise BadRequest("The body's 'model_id' and the path name different logged models")
    body["model_id"] = model_id


def reject_reserved_path_key(param: str) -> RequestStep:
    """Refuse a tag key in path parameter ``param`` that is reserved (``matih.*``) or not addressable.

    The key is part of the upstream URL: a ``?`` or ``#`` in it would end the path there and address
    another tag, so such a key is a 400 (MLflow's tag names never contain them).
    """

    async def step(ex: Exchange) -> None:
        key = ex.path_params[param]
        if is_reserved_tag(key):
            raise reserved_tag_denied(key)
        if any(delimiter in key for delimiter in _URL_DELIMITERS):
            raise BadRequest(f"Tag key '{key}' cannot be addressed in a path")

    return step


async def require_owned_source_run(ex: Exchange) -> None:
    """Check ``source_run_id``, when given, is one of the tenant's runs: no claiming another's run."""
    run_id = field_value(ex, "source_run_id")
    if run_id is None:
        return
    if not isinstance(run_id, str):
        raise BadRequest("Field 'source_run_id' must be a string")
    await ex.services.ownership.require_run(ex.tenant, run_id)


async def stamp_model_provenance(ex: Exchange) -> None:
    """Set the model's ``mlflow.user`` and ``matih.*`` tags from the verified token, like a run's."""
    inject_tags(ex, "tags", {**provenance_tags(ex), "mlflow.user": ex.caller.user})


def remember_created_model(ex: Exchange, status: int, body: JsonObject) -> None:
    """Prime the model -> experiment cache from the create response."""
    model: Any = body.get("model")
    info: Any = model.get("info") if isinstance(model, dict) else None
    if status != 200 or not isinstance(info, dict):
        return
    model_id, experiment_id = info.get("model_id"), info.get("experiment_id")
    if isinstance(model_id, str) and isinstance(experiment_id, str):
        ex.services.ownership.remember_logged_model(model_id, experiment_id)


async def scope_model_search(ex: Exchange) -> None:
    """Require every searched experiment to be the tenant's; send the ids sorted and de-duplicated.

    The search is scoped by its (required) experiment ids upstream; the filter and order-by only
    narrow within them and are embedded in the page token, so they are forwarded untouched.
    """
    body = ex.json_body()
    body["experiment_ids"] = await owned_experiment_ids(ex, body.get("experiment_ids"), "experiment_ids")


_OWNED = require_owned_path_model
MODEL_VERSIONS_TAG = "mlflow.modelVersions"


def _strip_registrations(registrations: list[Any], prefix: str) -> list[Any]:
    kept = []
    for entry in registrations:
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and name.startswith(prefix):
            kept.append({**entry, "name": name[len(prefix) :]})
    return kept


def strip_registered_model_names(ex: Exchange, status: int, body: JsonObject) -> None:
    """Show registered-model names inside logged models as the caller named them.

    ``info.registrations[].name`` and the ``mlflow.modelVersions`` tag carry upstream registry names
    (``<tenant>.<name>``): the caller's prefix is removed; an entry of another tenant (a version that
    points at this model, made behind the gateway's back) is dropped rather than shown.
    """
    if status >= 300:
        return
    prefix = ex.tenant + "."
    models = [body["model"]] if isinstance(body.get("model"), dict) else []
    models += [m for m in body.get("models", []) if isinstance(m, dict)] if isinstance(body.get("models"), list) else []
    for model in models:
        info = model.get("info")
        if not isinstance(info, dict):
            continue
        if isinstance(info.get("registrations"), list):
            info["registrations"] = _strip_registrations(info["registrations"], prefix)
        for tag in info.get("tags", []) if isinstance(info.get("tags"), list) else []:
            if isinstance(tag, dict) and tag.get("key") == MODEL_VERSIONS_TAG and isinstance(tag.get("value"), str):
                try:
                    versions = json.loads(tag["value"])
                except ValueError:
                    continue
                if isinstance(versions, list):
                    tag["value"] = json.dumps(_strip_registrations(versions, prefix))


CREATE = Policy(
    request=(
        reject_reserved_tags("tags"),
        require_owned_experiment("experiment_id"),
        require_owned_source_run,
        stamp_model_provenance,
    ),
    response=(remember_created_model, strip_prefix_in_error),
    description="OE (0 -> tenant Default) + OR(source_run_id); matih.* reserved; provenance from the token",
)
_NAMES = (strip_registered_model_names,)
GET = Policy(request=(_OWNED,), response=_NAMES, body=Body.NONE, access=Access.READ, description="OM")
FINALIZE = Policy(
    request=(bind_body_model_id, _OWNED), response=_NAMES, description="OM; the body's model_id is the path's"
)
DELETE = Policy(request=(bind_body_model_id, _OWNED), description="OM (a soft delete)")
SET_TAGS = Policy(
    request=(reject_reserved_tags("tags"), bind_body_model_id, _OWNED),
    response=_NAMES,
    description="OM; matih.* reserved",
)
DELETE_TAG = Policy(request=(reject_reserved_path_key("tag_key"), _OWNED), description="OM; matih.* reserved")
LOG_PARAMS = Policy(request=(bind_body_model_id, _OWNED), description="OM")
LIST_ARTIFACTS = Policy(
    request=(_OWNED,),
    body=Body.NONE,
    access=Access.READ,
    description="OM; MLflow lists inside the model's own artifact location and validates the path",
)
SEARCH = Policy(
    request=(scope_model_search,),
    response=_NAMES,
    access=Access.READ,
    description="OE on every experiment id (required), sorted and de-duplicated for the page token",
)
