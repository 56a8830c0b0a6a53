"""Runs, metrics and params: every run id must be owned; runs are created with provenance.

A run is owned through its experiment. ``run_uuid`` is MLflow's legacy alias of ``run_id`` and the
handlers read ``run_id or run_uuid``, so both are checked and must agree.
"""

from __future__ import annotations

from collections.abc import Awaitable

from gateway.errors import BadRequest
from gateway.http.canonical import JsonObject
from gateway.policy.core import Access, Body, Exchange, Policy, RequestStep
from gateway.policy.experiments import require_owned_experiment
from gateway.policy.ownership import Ownership
from gateway.policy.steps import (
    inject_tags,
    provenance_tags,
    reject_reserved_key,
    reject_reserved_tags,
    require_string,
)

RUN_ID_ALIASES = ("run_uuid",)
MAX_IDS_PER_REQUEST = 100  # MLflow's own limit for bulk metric history


def require_owned_run(field: str = "run_id", *, aliases: tuple[str, ...] = RUN_ID_ALIASES) -> RequestStep:
    """Check the run named by ``field`` (or its alias) is in one of the tenant's experiments."""

    def step(ex: Exchange) -> Awaitable[None] | None:
        run_id = require_string(ex, field, aliases=aliases)
        ownership, tenant = ex.services.ownership, ex.tenant
        experiment_id = ownership.cached_owned_run(tenant, run_id)  # the steady state: no coroutine
        if experiment_id is None:
            return _look_up(ex, ownership, tenant, run_id)
        ex.notes["experiment_id"] = experiment_id
        return None

    return step


async def _look_up(ex: Exchange, ownership: Ownership, tenant: str, run_id: str) -> None:
    ex.notes["experiment_id"] = await ownership.require_run(tenant, run_id)


def require_owned_runs(field: str) -> RequestStep:
    """Check every run id of a repeated query field (bulk metric history) is the tenant's."""

    async def step(ex: Exchange) -> None:
        run_ids = ex.query.get(field, [])
        if not run_ids:
            raise BadRequest(f"Missing value for required parameter '{field}'.")
        if len(run_ids) > MAX_IDS_PER_REQUEST:
            raise BadRequest(f"At most {MAX_IDS_PER_REQUEST} values of '{field}' are allowed")
        for run_id in dict.fromkeys(run_ids):
            await ex.services.ownership.require_run(ex.tenant, run_id)

    return step


def require_owned_experiments(field: str = "experiment_ids") -> RequestStep:
    """Check every experiment id in the list ``field`` is the tenant's (``0`` maps to its Default)."""

    async def step(ex: Exchange) -> None:
        ownership = ex.services.ownership
        ids = ex.json_body().get(field, [])
        if not isinstance(ids, list):
            raise BadRequest(f"Field '{field}' must be a list")
        resolved = []
        for raw in ids:
            experiment_id = await ownership.resolve_experiment_id(ex.tenant, raw)
            await ownership.require_experiment(ex.tenant, experiment_id)
            resolved.append(experiment_id)
        ex.json_body()[field] = list(dict.fromkeys(resolved))

    return step


def require_owned_model_ids(*paths: str) -> RequestStep:
    """Check logged-model ids in the body (``model_id`` or ``metrics[].model_id``) are the tenant's."""

    async def step(ex: Exchange) -> None:
        body = ex.json_body()
        for path in paths:
            container, _, key = path.rpartition(".")
            items = body.get(container.removesuffix("[]"), []) if container else [body]
            if not isinstance(items, list):
                raise BadRequest(f"Field '{container}' must be a list")
            for item in items:
                model_id = item.get(key) if isinstance(item, dict) else None
                if model_id not in (None, ""):
                    if not isinstance(model_id, str):
                        raise BadRequest(f"Field '{key}' must be a string")
                    await ex.services.ownership.require_logged_model(ex.tenant, model_id)

    return step


async def stamp_run_provenance(ex: Exchange) -> None:
    """Set the run's user and ``matih.*`` tags from the verified token, whatever the client sent."""
    body = ex.json_body()
    body["user_id"] = ex.caller.user
    inject_tags(ex, "tags", {**provenance_tags(ex), "mlflow.user": ex.caller.user})


def remember_created_run(ex: Exchange, status: int, body: JsonObject) -> None:
    """Prime the run -> experiment cache from the create response."""
    info = body.get("run", {}).get("info", {}) if isinstance(body.get("run"), dict) else {}
    run_id, experiment_id = info.get("run_id"), info.get("experiment_id")
    if status == 200 and isinstance(run_id, str) and isinstance(experiment_id, str):
        ex.services.ownership.remember_run(run_id, experiment_id)


_OWNED_RUN = require_owned_run()

CREATE = Policy(
    request=(reject_reserved_tags("tags"), require_owned_experiment(), stamp_run_provenance),
    response=(remember_created_run,),
    description="OE (0 -> tenant Default); user and matih.* tags from the token",
)
READ = Policy(request=(_OWNED_RUN,), body=Body.NONE, access=Access.READ, description="OR")
WRITE = Policy(request=(_OWNED_RUN,), description="OR")
SET_OR_DELETE_TAG = Policy(request=(reject_reserved_key("key"), _OWNED_RUN), description="OR; matih.* reserved")
LOG_METRIC = Policy(request=(_OWNED_RUN, require_owned_model_ids("model_id")), description="OR + OM")
LOG_BATCH = Policy(
    request=(reject_reserved_tags("tags"), _OWNED_RUN, require_owned_model_ids("metrics[].model_id")),
    description="OR + OM; matih.* reserved",
)
LOG_INPUTS = Policy(request=(_OWNED_RUN, require_owned_model_ids("models[].model_id")), description="OR + OM")
BULK_HISTORY_INTERVAL = Policy(
    request=(require_owned_runs("run_ids"),), body=Body.NONE, access=Access.READ, description="OR each"
)
BULK_HISTORY = Policy(
    request=(require_owned_runs("run_id"),), body=Body.NONE, access=Access.READ, description="OR each"
)
