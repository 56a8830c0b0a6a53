"""Experiments: names carry the tenant prefix upstream, ids must be owned.

Upstream an experiment is ``<tenant>/<name>``; the client only ever sees ``<name>``. Experiment
``0`` (MLflow's shared Default) is never used: it maps to the tenant's own ``<tenant>/Default``.
"""

from __future__ import annotations

import re

from gateway.errors import BadRequest, NotFound
from gateway.http.canonical import JsonObject
from gateway.policy.core import Access, Body, Exchange, Policy, RequestStep, ResponseStep
from gateway.policy.ownership import EXPERIMENT_SEPARATOR, TENANT_TAG
from gateway.policy.steps import (
    field_value,
    inject_tags,
    reject_fields,
    reject_reserved_key,
    reject_reserved_tags,
    require_string,
    set_field,
)

MAX_EXPERIMENT_NAME_LENGTH = 500  # mlflow/utils/validation.py


def experiment_prefix(tenant: str) -> str:
    """The upstream name prefix of every experiment of ``tenant``."""
    return tenant + EXPERIMENT_SEPARATOR


def prefix_experiment_name(field: str) -> RequestStep:
    """Prefix the experiment name in ``field`` with ``<tenant>/``: a tenant can only name its own."""

    async def step(ex: Exchange) -> None:
        name = require_string(ex, field)
        if len(name) > MAX_EXPERIMENT_NAME_LENGTH:
            raise BadRequest(f"'{field}' exceeds the maximum length of {MAX_EXPERIMENT_NAME_LENGTH} characters")
        set_field(ex, field, experiment_prefix(ex.tenant) + name)

    return step


def require_owned_experiment(field: str = "experiment_id") -> RequestStep:
    """Check the experiment id in ``field`` is the tenant's (``0`` becomes the tenant's Default)."""

    async def step(ex: Exchange) -> None:
        ownership = ex.services.ownership
        raw = field_value(ex, field)
        if raw is None:
            raise BadRequest(f"Missing value for required parameter '{field}'.")
        experiment_id = await ownership.resolve_experiment_id(ex.tenant, raw)
        await ownership.require_experiment(ex.tenant, experiment_id)
        set_field(ex, field, experiment_id)
        ex.notes["experiment_id"] = experiment_id

    return step


async def tag_new_experiment(ex: Exchange) -> None:
    """Record the owning tenant as tag ``matih.tenant_id`` on experiments created through the gateway."""
    inject_tags(ex, "tags", {TENANT_TAG: ex.tenant})


def strip_experiment_names(*paths: str) -> ResponseStep:
    """Remove the tenant prefix from ``experiment.name``-style fields of a 2xx response.

    An experiment that does not carry the caller's prefix would be another tenant's: the policy
    scoped the request so this cannot happen, and if it did the answer is "does not exist".
    """

    def step(ex: Exchange, status: int, body: JsonObject) -> None:
        if status >= 300:
            return
        prefix = experiment_prefix(ex.tenant)
        for path in paths:
            for experiment in objects_at(body, path):
                name = experiment.get("name")
                if isinstance(name, str):
                    if not name.startswith(prefix):
                        raise NotFound("Experiment does not exist")
                    experiment["name"] = name[len(prefix) :]

    return step


def objects_at(body: JsonObject, path: str) -> list[JsonObject]:
    """Objects at a dotted path; ``[]`` after a key walks a list (``experiments[]``)."""
    current: list[object] = [body]
    for part in path.split("."):
        is_list = part.endswith("[]")
        key = part[:-2] if is_list else part
        following: list[object] = []
        for node in current:
            value = node.get(key) if isinstance(node, dict) else None
            if is_list and isinstance(value, list):
                following.extend(value)
            elif value is not None and not is_list:
                following.append(value)
        current = following
    return [node for node in current if isinstance(node, dict)]


def remember_created_experiment(ex: Exchange, status: int, body: JsonObject) -> None:
    """Prime the ownership cache from a create response (the id is the caller's from now on)."""
    experiment_id = body.get("experiment_id")
    if status == 200 and isinstance(experiment_id, str):
        ex.services.ownership.remember_experiment(experiment_id, ex.tenant)


def strip_prefix_in_error(ex: Exchange, status: int, body: JsonObject) -> None:
    """Remove the caller's own prefix from error messages ("Experiment(name=acme/x) already exists")."""
    message = body.get("message")
    if status >= 400 and isinstance(message, str):
        pattern = r"(?<![\w/.-])" + re.escape(experiment_prefix(ex.tenant))
        body["message"] = re.sub(pattern, "", message)


_NO_ARTIFACT_LOCATION = reject_fields(
    "artifact_location", reason="artifact locations are assigned by the server (tenant isolation)"
)

CREATE = Policy(
    request=(
        _NO_ARTIFACT_LOCATION,
        reject_reserved_tags("tags"),
        prefix_experiment_name("name"),
        tag_new_experiment,
    ),
    response=(remember_created_experiment, strip_prefix_in_error),
    description="NE: prefix the name, refuse artifact_location, tag with the tenant",
)
GET_BY_NAME = Policy(
    request=(prefix_experiment_name("experiment_name"),),
    response=(strip_experiment_names("experiment"), strip_prefix_in_error),
    body=Body.NONE,
    access=Access.READ,
    description="NE: prefix the queried name, strip it from the answer",
)
GET = Policy(
    request=(require_owned_experiment(),),
    response=(strip_experiment_names("experiment"), strip_prefix_in_error),
    body=Body.NONE,
    access=Access.READ,
    description="OE, then strip the name",
)
DELETE_OR_RESTORE = Policy(request=(require_owned_experiment(),), description="OE")
UPDATE = Policy(
    request=(require_owned_experiment(), prefix_experiment_name("new_name")),
    response=(strip_prefix_in_error,),
    description="OE + NE(new_name): a rename cannot leave the tenant's prefix",
)
SET_OR_DELETE_TAG = Policy(
    request=(reject_reserved_key("key"), require_owned_experiment()),
    description="OE; the matih.* namespace is reserved",
)
