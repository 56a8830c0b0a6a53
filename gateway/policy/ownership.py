"""Who owns an id: cached, because experiment -> tenant and run -> experiment never change.

An experiment belongs to the tenant whose prefix its upstream name carries (``<tenant>/<name>``);
renames cannot leave the prefix, so the mapping is immutable. A run belongs to its experiment for
life. Both are kept in bounded LRU caches, primed from create responses, so a steady logging
workload adds almost no upstream calls. Another tenant's object and a missing one get exactly the
error MLflow gives for a missing one.
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

K = TypeVar("K")
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """A small bounded LRU map (no expiry: it only ever holds immutable facts)."""

    def __init__(self, max_size: int) -> None:
        self._max = max_size
        self._data: OrderedDict[K, V] = OrderedDict()
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


def tenant_of_experiment_name(name: str) -> str | None:
    """The tenant prefix of an upstream experiment name, or ``None`` for an unprefixed name."""
    tenant, separator, rest = name.partition(EXPERIMENT_SEPARATOR)
    return tenant if separator and rest else None


class Ownership:
    """Resolves and caches which tenant owns experiments, runs and logged models."""

    def __init__(self, upstream: UpstreamClient, *, max_size: int = 100_000) -> None:
        self._upstream = upstream
        self.experiment_tenant: LruCache[str, str] = LruCache(max_size)
        self.run_experiment: LruCache[str, str] = LruCache(max_size)
        self.model_experiment: LruCache[str, str] = LruCache(max_size)
        self._default_experiment: dict[str, str] = {}
        self._default_locks: dict[str, asyncio.Lock] = {}
        self.upstream_lookups = 0

    # -- recording facts learnt from responses -------------------------------------------------

    def remember_experiment(self, experiment_id: str, tenant: str) -> None:
        """Record that ``tenant`` owns ``experiment_id`` (e.g. from a create response)."""
        self.experiment_tenant.put(experiment_id, tenant)

    def remember_run(self, run_id: str, experiment_id: str) -> None:
        """Record that ``run_id`` lives in ``experiment_id`` (e.g. from a create response)."""
        self.run_experiment.put(run_id, experiment_id)

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
        if not _EXPERIMENT_ID.match(experiment_id):
            raise experiment_not_found(experiment_id)
        owner = self.experiment_tenant.get(experiment_id)
        if owner is None:
            owner = await self._fetch_experiment_owner(experiment_id)
            if owner is not None:
                self.experiment_tenant.put(experiment_id, owner)
        if owner != tenant:
            raise experiment_not_found(experiment_id)

    async def require_run(self, tenant: str, run_id: str) -> str:
        """Pass when the run's experiment is the tenant's; return that experiment id."""
        if not _RUN_ID.match(run_id):
            raise run_not_found(run_id)
        experiment_id = self.run_experiment.get(run_id)
        if experiment_id is None:
            experiment_id = await self._fetch_parent("runs/get", {"run_id": run_id}, ("run", "info"))
            if experiment_id is None:
                raise run_not_found(run_id)
            self.run_experiment.put(run_id, experiment_id)
        try:
            await self.require_experiment(tenant, experiment_id)
        except NotFound:
            raise run_not_found(run_id) from None
        return experiment_id

    async def require_logged_model(self, tenant: str, model_id: str) -> str:
        """Pass when the logged model's experiment is the tenant's; return that experiment id."""
        if not _LOGGED_MODEL_ID.match(model_id):
            raise logged_model_not_found(model_id)
        experiment_id = self.model_experiment.get(model_id)
        if experiment_id is None:
            experiment_id = await self._fetch_parent(f"logged-models/{model_id}", {}, ("model", "info"))
            if experiment_id is None:
                raise logged_model_not_found(model_id)
            self.model_experiment.put(model_id, experiment_id)
        try:
            await self.require_experiment(tenant, experiment_id)
        except NotFound:
            raise logged_model_not_found(model_id) from None
        return experiment_id

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
        status, body = await self._get("experiments/get", {"experiment_id": experiment_id})
        name = _dig(body, ("experiment", "name")) if status == 200 else None
        _raise_on_server_error(status)
        return tenant_of_experiment_name(name) if isinstance(name, str) else None

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
