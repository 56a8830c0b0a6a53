"""Who owns an id: cached, because experiment -> tenant and run -> experiment never change.

An experiment belongs to the tenant whose prefix its upstream name carries (``<tenant>/<name>``);
renames cannot leave the prefix, so the mapping is immutable. A run belongs to its experiment for
life. Both are kept in bounded LRU caches, primed from create responses, so a steady logging
workload adds almost no upstream calls. Another tenant's object and a missing one get exactly the
error MLflow gives for a missing one. An evaluation dataset is owned through the experiments it
is linked to; those links change, but its tenant does not (:meth:`Ownership.dataset_tenant_of`).
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Generic, TypeVar
from urllib.parse import quote

import orjson

from gateway.errors import BadRequest, NotFound, UpstreamError
from gateway.http.upstream import UpstreamClient

EXPERIMENT_SEPARATOR = "/"
DEFAULT_EXPERIMENT_ID = "0"
DEFAULT_EXPERIMENT_NAME = "Default"
TENANT_TAG = "matih.tenant_id"
_EXPERIMENT_ID = re.compile(r"^[0-9]{1,19}$")
# MLflow's own run-id rule (utils/validation.py:_validate_run_id).
_RUN_ID = re.compile(r"^[a-zA-Z0-9][\w\-]{0,255}$")
_LOGGED_MODEL_ID = re.compile(r"^m-[0-9a-f]{32}$")
# A v3 trace id (`tr-` + the 32-hex OTel trace id) or a v2 request id (32 hex): nothing else, so
# an id can never carry a path (`tr-z/../..`) into the trace's artifact location.
TRACE_ID = re.compile(r"^(?:tr-)?[0-9a-f]{32}$")
# MLflow's evaluation dataset ids: `d-` + uuid4 hex (sqlalchemy_store.create_dataset).
_DATASET_ID = re.compile(r"^d-[0-9a-f]{32}$")

K = TypeVar("K")
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """A small bounded LRU map (no expiry: it only ever holds immutable facts).

    It counts its ``hits`` and ``misses``; the gateway's metrics read them (``GatewayMetrics.track_caches``).
    """

    def __init__(self, max_size: int, *, name: str = "") -> None:
        self._max = max_size
        self._data: OrderedDict[K, V] = OrderedDict()
        self.name = name
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> V | None:
        """The cached value, refreshed as most recently used, or ``None``."""
        value = self._data.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Remember ``key``; evict the least recently used entry when full."""
        self._data[key] = value
        self._data.move_to_end(key)
        if len(self._data) > self._max:
            self._data.popitem(last=False)

    def discard(self, key: K) -> None:
        """Forget ``key`` (an object that was deleted)."""
        self._data.pop(key, None)

    def __len__(self) -> int:
        return len(self._data)


def experiment_not_found(experiment_id: str) -> NotFound:
    """MLflow's own answer for a missing experiment id (sqlalchemy_store.get_experiment)."""
    shown = int(experiment_id) if _EXPERIMENT_ID.match(experiment_id) else experiment_id
    return NotFound(f"No Experiment with id={shown} exists")


def run_not_found(run_id: str) -> NotFound:
    """MLflow's own answer for a missing run id (sqlalchemy_store._get_run)."""
    return NotFound(f"Run with id={run_id} not found")


def logged_model_not_found(model_id: str) -> NotFound:
    """MLflow's own answer for a missing logged model id."""
    return NotFound(f"Logged model with ID '{model_id}' not found.")


def trace_not_found(trace_id: str) -> NotFound:
    """MLflow's own answer for a missing trace id (sqlalchemy_store.get_trace_info)."""
    return NotFound(f"Trace with ID '{trace_id}' not found.")


def dataset_not_found(dataset_id: str) -> NotFound:
    """MLflow's own answer for a missing evaluation dataset id (sqlalchemy_store.get_dataset)."""
    return NotFound(f"Evaluation dataset with id '{dataset_id}' not found")


def tenant_of_experiment_name(name: str) -> str | None:
    """The tenant prefix of an upstream experiment name, or ``None`` for an unprefixed name."""
    tenant, separator, rest = name.partition(EXPERIMENT_SEPARATOR)
    return tenant if separator and rest else None


class Ownership:
    """Resolves and caches which tenant owns experiments, runs and logged models."""

    def __init__(self, upstream: UpstreamClient, *, max_size: int = 100_000) -> None:
        self._upstream = upstream

        def cache(name: str) -> LruCache[str, str]:
            return LruCache(max_size, name=name)

        self.experiment_tenant = cache("experiment_tenant")
        self.run_experiment = cache("run_experiment")
        self.model_experiment = cache("model_experiment")
        self.trace_experiment = cache("trace_experiment")
        # dataset -> tenant, not dataset -> experiments: links change, the tenant does not (see
        # :meth:`dataset_tenant_of`).
        self.dataset_tenant = cache("dataset_tenant")
        self._default_experiment: dict[str, str] = {}
        self._default_locks: dict[str, asyncio.Lock] = {}
        self.upstream_lookups = 0

    def caches(self) -> tuple[LruCache[str, str], ...]:
        """Every ownership cache (for the metrics of their look-ups)."""
        return (
            self.experiment_tenant,
            self.run_experiment,
            self.model_experiment,
            self.trace_experiment,
            self.dataset_tenant,
        )

    # -- recording facts learnt from responses -------------------------------------------------

    def remember_experiment(self, experiment_id: str, tenant: str) -> None:
        """Record that ``tenant`` owns ``experiment_id`` (e.g. from a create response)."""
        self.experiment_tenant.put(experiment_id, tenant)

    def remember_run(self, run_id: str, experiment_id: str) -> None:
        """Record that ``run_id`` lives in ``experiment_id`` (e.g. from a create response)."""
        self.run_experiment.put(run_id, experiment_id)

    def remember_trace(self, trace_id: str, experiment_id: str) -> None:
        """Record that ``trace_id`` lives in ``experiment_id`` (from a start-trace response)."""
        self.trace_experiment.put(trace_id, experiment_id)

    def remember_logged_model(self, model_id: str, experiment_id: str) -> None:
        """Record that ``model_id`` lives in ``experiment_id`` (from a create response)."""
        self.model_experiment.put(model_id, experiment_id)

    def remember_dataset(self, dataset_id: str, tenant: str) -> None:
        """Record that ``tenant`` owns ``dataset_id`` (from a create response)."""
        self.dataset_tenant.put(dataset_id, tenant)

    # -- checks -------------------------------------------------------------------------------

    async def resolve_experiment_id(self, tenant: str, experiment_id: object) -> str:
        """Map experiment ``0`` to the tenant's own Default experiment; validate the id's shape."""
        if not isinstance(experiment_id, str):
            if isinstance(experiment_id, int) and not isinstance(experiment_id, bool):
                experiment_id = str(experiment_id)
            else:
                raise BadRequest("Experiment id must be a string")
        if experiment_id == DEFAULT_EXPERIMENT_ID:
            return await self.default_experiment(tenant)
        return experiment_id

    async def require_experiment(self, tenant: str, experiment_id: str) -> None:
        """Pass when ``tenant`` owns the experiment; otherwise MLflow's "does not exist" 404."""
        if await self.experiment_owner(experiment_id) != tenant:
            raise experiment_not_found(experiment_id)

    async def experiment_owner(self, experiment_id: str) -> str | None:
        """The tenant owning an experiment (cached), or ``None`` for a missing or unprefixed one."""
        if not _EXPERIMENT_ID.match(experiment_id):
            return None
        owner = self.experiment_tenant.get(experiment_id)
        if owner is None:
            owner = await self._fetch_experiment_owner(experiment_id)
        return owner

    async def run_experiment_id(self, run_id: str) -> str | None:
        """The experiment a run lives in (cached for life), or ``None`` when there is no such run."""
        if not _RUN_ID.match(run_id):
            return None
        experiment_id = self.run_experiment.get(run_id)
        if experiment_id is None:
            experiment_id = await self._fetch_run_experiment_id(run_id)
        return experiment_id

    async def _fetch_run_experiment_id(self, run_id: str) -> str | None:
        experiment_id = await self._fetch_parent("runs/get", {"run_id": run_id}, ("run", "info"))
        if experiment_id is not None:
            self.run_experiment.put(run_id, experiment_id)
        return experiment_id

    def cached_owned_run(self, tenant: str, run_id: str) -> str | None:
        """:meth:`require_run`'s answer when both facts are cached and the run is ``tenant``'s, else ``None``.

        The steady state of run-scoped requests, answered without a coroutine (bench/RESULTS.md section
        2e). ``None`` says nothing (not cached, malformed or not owned): the caller then awaits
        :meth:`require_run`, which counts the look-ups; only a success is counted here.
        """
        # No shape checks needed here: a key of either cache was checked before it was looked up
        # upstream, or is an id MLflow itself answered (create and search responses: remember_*).
        runs, experiments = self.run_experiment, self.experiment_tenant
        experiment_id = runs._data.get(run_id)
        if experiment_id is None or experiments._data.get(experiment_id) != tenant:
            return None
        runs._data.move_to_end(run_id)
        experiments._data.move_to_end(experiment_id)
        runs.hits += 1
        experiments.hits += 1
        return experiment_id

    async def require_run(self, tenant: str, run_id: str) -> str:
        """Pass when the run's experiment is the tenant's; return that experiment id.

        The steady state (both facts cached) is answered without a further coroutine: this check runs
        on most tracking requests (bench/RESULTS.md, section 2c).
        """
        if not _RUN_ID.match(run_id):
            raise run_not_found(run_id)
        experiment_id = self.run_experiment.get(run_id)
        if experiment_id is None:
            experiment_id = await self._fetch_run_experiment_id(run_id)
        if experiment_id is None or not _EXPERIMENT_ID.match(experiment_id):
            raise run_not_found(run_id)
        owner = self.experiment_tenant.get(experiment_id)
        if owner is None:
            owner = await self._fetch_experiment_owner(experiment_id)
        if owner != tenant:
            raise run_not_found(run_id)
        return experiment_id

    async def logged_model_experiment_id(self, model_id: str) -> str | None:
        """The experiment a logged model lives in (cached for life), or ``None`` when there is none."""
        if not _LOGGED_MODEL_ID.match(model_id):
            return None
        experiment_id = self.model_experiment.get(model_id)
        if experiment_id is None:
            # allow_deleted: a deleted model keeps its experiment (and can still be read with
            # ?allow_deleted=true), so the look-up must find it too.
            experiment_id = await self._fetch_parent(
                f"logged-models/{model_id}", {"allow_deleted": "true"}, ("model", "info")
            )
            if experiment_id is not None:
                self.model_experiment.put(model_id, experiment_id)
        return experiment_id

    async def require_logged_model(self, tenant: str, model_id: str) -> str:
        """Pass when the logged model's experiment is the tenant's; return that experiment id."""
        experiment_id = await self.logged_model_experiment_id(model_id)
        if experiment_id is None:
            raise logged_model_not_found(model_id)
        try:
            await self.require_experiment(tenant, experiment_id)
        except NotFound:
            raise logged_model_not_found(model_id) from None
        return experiment_id

    async def trace_experiment_id(self, trace_id: str) -> str | None:
        """The experiment of an existing trace, or ``None`` when no trace has that id.

        A trace only changes experiment when MLflow's start-trace re-homes an existing id, which
        the gateway allows within one tenant only, so the cached experiment's tenant never changes.
        """
        if not TRACE_ID.match(trace_id):
            return None
        experiment_id = self.trace_experiment.get(trace_id)
        if experiment_id is None:
            self.upstream_lookups += 1
            status, body = await self._upstream.json_call(
                "GET", f"/api/3.0/mlflow/traces/{trace_id}", headers=_LOOKUP_HEADERS
            )
            _raise_on_server_error(status)
            if status == 404:
                return None
            found = _dig(body, ("trace", "trace_info", "trace_location", "mlflow_experiment", "experiment_id"))
            if status != 200 or not isinstance(found, str):
                # Fail closed: an id MLflow knows but cannot place is neither new nor owned.
                raise UpstreamError(f"Upstream MLflow gave an unusable answer to a trace look-up ({status})")
            experiment_id = found
            self.trace_experiment.put(trace_id, experiment_id)
        return experiment_id

    async def require_trace(self, tenant: str, trace_id: str) -> str:
        """Pass when the trace's experiment is the tenant's; return that experiment id."""
        experiment_id = await self.trace_experiment_id(trace_id)
        if experiment_id is None:
            raise trace_not_found(trace_id)
        try:
            await self.require_experiment(tenant, experiment_id)
        except NotFound:
            raise trace_not_found(trace_id) from None
        return experiment_id

    async def require_dataset(self, tenant: str, dataset_id: str) -> None:
        """Pass when ``tenant`` owns the evaluation dataset; otherwise MLflow's "not found" 404."""
        if not _DATASET_ID.match(dataset_id) or await self.dataset_tenant_of(dataset_id) != tenant:
            raise dataset_not_found(dataset_id)

    async def dataset_tenant_of(self, dataset_id: str) -> str | None:
        """The tenant owning a dataset: the one tenant of all its linked experiments, else ``None``.

        A dataset may be linked to several experiments and the links change (add/remove
        experiments), so the links are never cached. Its tenant is cached, because through the
        gateway it cannot change: a dataset is created linked to the caller's own experiments only,
        add-experiments links only its owner's experiments, and remove-experiments may not drop
        the last link. A dataset with no link, or with links to several tenants (made behind the
        gateway's back), belongs to nobody. (If links vanish behind the gateway's back, e.g. by a
        permanent experiment deletion, a cached tenant is still the one that owned it.)
        """
        cached = self.dataset_tenant.get(dataset_id)
        if cached is not None:
            return cached
        owners = {await self.experiment_owner(eid) for eid in await self.dataset_experiment_ids(dataset_id)}
        if len(owners) != 1:
            return None
        (owner,) = owners
        if owner is not None:
            self.dataset_tenant.put(dataset_id, owner)
        return owner

    async def dataset_experiment_ids(self, dataset_id: str) -> list[str]:
        """The experiments a dataset is linked to right now (never cached); ``[]`` for none.

        MLflow answers ``[]`` for a missing dataset too: the handler does not check existence.
        """
        if not _DATASET_ID.match(dataset_id):
            return []
        self.upstream_lookups += 1
        status, body = await self._upstream.json_call(
            "GET", f"/api/3.0/mlflow/datasets/{dataset_id}/experiment-ids", headers=_LOOKUP_HEADERS
        )
        _raise_on_server_error(status)
        found = _dig(body, ("experiment_ids",)) if status == 200 else None
        return [str(eid) for eid in found if isinstance(eid, str | int)] if isinstance(found, list) else []

    async def default_experiment(self, tenant: str) -> str:
        """The id of ``<tenant>/Default``, created (with its tenant tag) on first use."""
        cached = self._default_experiment.get(tenant)
        if cached is not None:
            return cached
        lock = self._default_locks.setdefault(tenant, asyncio.Lock())
        async with lock:
            cached = self._default_experiment.get(tenant)
            if cached is not None:
                return cached
            name = f"{tenant}{EXPERIMENT_SEPARATOR}{DEFAULT_EXPERIMENT_NAME}"
            experiment_id = await self._experiment_id_by_name(name)
            if experiment_id is None:
                experiment_id = await self._create_experiment(name, tenant)
            self._default_experiment[tenant] = experiment_id
            self.remember_experiment(experiment_id, tenant)
            return experiment_id

    # -- upstream look-ups ----------------------------------------------------------------------

    async def _get(self, route: str, query: Mapping[str, str]) -> tuple[int, object]:
        self.upstream_lookups += 1
        query_string = "&".join(f"{key}={quote(value, safe='')}" for key, value in query.items())
        path = f"/api/2.0/mlflow/{route}" + (f"?{query_string}" if query_string else "")
        return await self._upstream.json_call("GET", path, headers=_LOOKUP_HEADERS)

    async def _fetch_experiment_owner(self, experiment_id: str) -> str | None:
        """Ask the upstream who owns an experiment; a found owner is remembered."""
        status, body = await self._get("experiments/get", {"experiment_id": experiment_id})
        name = _dig(body, ("experiment", "name")) if status == 200 else None
        _raise_on_server_error(status)
        owner = tenant_of_experiment_name(name) if isinstance(name, str) else None
        if owner is not None:
            self.experiment_tenant.put(experiment_id, owner)
        return owner

    async def _fetch_parent(self, route: str, query: Mapping[str, str], info: tuple[str, str]) -> str | None:
        status, body = await self._get(route, query)
        _raise_on_server_error(status)
        experiment_id = _dig(body, (*info, "experiment_id")) if status == 200 else None
        return experiment_id if isinstance(experiment_id, str) else None

    async def _experiment_id_by_name(self, name: str) -> str | None:
        status, body = await self._get("experiments/get-by-name", {"experiment_name": name})
        _raise_on_server_error(status)
        experiment_id = _dig(body, ("experiment", "experiment_id")) if status == 200 else None
        return experiment_id if isinstance(experiment_id, str) else None

    async def _create_experiment(self, name: str, tenant: str) -> str:
        self.upstream_lookups += 1
        payload = orjson.dumps({"name": name, "tags": [{"key": TENANT_TAG, "value": tenant}]})
        status, body = await self._upstream.json_call(
            "POST", "/api/2.0/mlflow/experiments/create", headers=_JSON_HEADERS, body=payload
        )
        experiment_id = _dig(body, ("experiment_id",)) if status == 200 else None
        if isinstance(experiment_id, str):
            return experiment_id
        # Lost a race with another replica or request: the experiment exists now.
        existing = await self._experiment_id_by_name(name)
        if existing is None:
            raise UpstreamError(f"Could not create the tenant's default experiment (upstream {status})")
        return existing


_LOOKUP_HEADERS = {"Accept": "application/json"}
_JSON_HEADERS = {"Accept": "application/json", "Content-Type": "application/json"}


def _raise_on_server_error(status: int) -> None:
    if status >= 500:
        raise UpstreamError(f"Upstream MLflow failed an ownership look-up ({status})")


def _dig(body: object, keys: tuple[str, ...]) -> object:
    for key in keys:
        if not isinstance(body, dict):
            return None
        body = body.get(key)
    return body
