"""The run-ownership step reads the run id exactly as MLflow's handlers do (``run_id`` or its alias ``run_uuid``).

``require_string``'s fast path (one ``run_id``, no alias) and ``field_value`` must name the same run and refuse the
same requests.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.auth.principal import Principal
from gateway.errors import BadRequest
from gateway.http.canonical import JsonObject, Query
from gateway.policy.core import Exchange
from gateway.policy.runs import require_owned_run


class _Ownership:
    """Every run is owned; records which run id was asked about, cached or not."""

    def __init__(self, *, cached: bool) -> None:
        self.cached = cached
        self.asked: list[str] = []

    def cached_owned_run(self, tenant: str, run_id: str) -> str | None:
        self.asked.append(run_id)
        return "7" if self.cached else None

    async def require_run(self, tenant: str, run_id: str) -> str:
        self.asked.append(run_id)
        return "7"


def _check(query: Query | None = None, body: JsonObject | None = None, *, cached: bool = True) -> list[str]:
    ownership = _Ownership(cached=cached)
    ex = Exchange(
        Principal(tenant="acme", user="alice"),
        "GET" if body is None else "POST",
        "/api/2.0/mlflow/runs/get",
        {},
        query or {},
        body,
        SimpleNamespace(ownership=ownership),  # type: ignore[arg-type]
        "test",
    )
    pending = require_owned_run()(ex)
    if pending is not None:
        asyncio.run(pending)  # type: ignore[arg-type]
    assert ex.notes["experiment_id"] == "7"
    return ownership.asked


@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize(
    ("query", "body", "run"),
    [
        ({"run_id": ["r1"]}, None, "r1"),
        ({"run_uuid": ["r1"]}, None, "r1"),
        ({"run_id": ["r1"], "run_uuid": ["r1"]}, None, "r1"),
        ({"run_id": [""], "run_uuid": ["r1"]}, None, "r1"),
        (None, {"run_id": "r1"}, "r1"),
        (None, {"run_uuid": "r1"}, "r1"),
        (None, {"run_id": "r1", "run_uuid": "r1"}, "r1"),
        (None, {"run_id": None, "run_uuid": "r1"}, "r1"),
    ],
)
def test_the_run_named_by_run_id_or_its_alias_is_the_one_checked(
    query: Query | None, body: JsonObject | None, run: str, cached: bool
) -> None:
    assert set(_check(query, body, cached=cached)) == {run}  # uncached: asked twice (cached, then looked up)


@pytest.mark.parametrize(
    ("query", "body"),
    [
        ({}, None),
        ({"run_id": [""]}, None),
        ({"run_id": ["r1", "r1"]}, None),  # a repeated scalar is ambiguous
        ({"run_id": ["r1"], "run_uuid": ["r2"]}, None),  # two runs named
        (None, {}),
        (None, {"run_id": ""}),
        (None, {"run_id": 7}),
        (None, {"run_id": ["r1"]}),
        (None, {"run_id": "r1", "run_uuid": "r2"}),
    ],
)
def test_a_missing_ambiguous_or_malformed_run_id_is_refused_before_any_look_up(query: Query | None, body: Any) -> None:
    with pytest.raises(BadRequest):
        _check(query, body)
