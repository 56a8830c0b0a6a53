"""The scoped experiment search against MLflow's real store: the shared server must feel private.

One sqlite ``SqlAlchemyStore`` (MLflow's own SQL, LIKE/ILIKE semantics included) holds the same
experiment names for the tenants ``acme``, ``acmeco`` and ``globex`` (upstream ``<tenant>/<name>``),
MLflow's shared ``Default``, and a *private copy* of acme's experiments: the same names without a
prefix, marked with the tag ``copy=private``. That copy is the oracle: what acme would see on a
server of its own.

For random filters on names and tags (every comparator, LIKE wildcards, quotes, case), the
scoped upstream search with prefixes stripped returns exactly what the client's filter returns
on the private copy, and every other tenant's scoped search returns its own experiments only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mlflow.entities import ExperimentTag, ViewType
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

from gateway.policy import filters
from gateway.policy.filters import EXPERIMENTS, Comparison, FilterError

TENANTS = ("acme", "acmeco", "globex")
NAMES = ["alpha", "Alpha", "ALPHA", "beta", "a_b", "aXb", "a%b", "x/y", "co/x", "acme", "ACME/x", "it's", "Default"]
TEAMS = {"alpha": "red", "Alpha": "blue", "beta": "red", "a_b": "Red", "x/y": "red%"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqlAlchemyStore]:
    root: Path = tmp_path_factory.mktemp("scoping-store")
    db = SqlAlchemyStore(f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts"))
    for name in NAMES:
        tags = [ExperimentTag("team", TEAMS[name])] if name in TEAMS else []
        for tenant in TENANTS:
            db.create_experiment(f"{tenant}/{name}", tags=tags)
        if name != "Default":
            db.create_experiment(name, tags=[*tags, ExperimentTag("copy", "private")])
    # On a server of its own, MLflow's Default (experiment 0) would be the tenant's Default.
    db.set_experiment_tag("0", ExperimentTag("copy", "private"))
    deleted = db.create_experiment("acme/deleted-one")
    db.delete_experiment(deleted)
    yield db


def search(store: SqlAlchemyStore, filter_string: str) -> list[tuple[str, dict[str, str]]]:
    found = store.search_experiments(view_type=ViewType.ALL, max_results=1000, filter_string=filter_string)
    return sorted((experiment.name, experiment.tags) for experiment in found)


PATTERN = st.lists(
    st.sampled_from(["%", "_", "a", "A", "l", "x", "/", "b", "'", "acme", "ACME", "co"]), max_size=4
).map("".join)


@st.composite
def comparisons(draw: st.DrawFn) -> Comparison:
    if draw(st.booleans()):
        operator = draw(st.sampled_from(["=", "!=", "LIKE", "ILIKE"]))
        value = draw(st.sampled_from(NAMES)) if operator in ("=", "!=") and draw(st.booleans()) else draw(PATTERN)
        return Comparison("attribute", "name", operator, value)
    operator = draw(st.sampled_from(["=", "!=", "LIKE", "ILIKE", "IS NULL", "IS NOT NULL"]))
    value = None if operator.startswith("IS") else draw(st.sampled_from(["red", "Red", "r%", "%", "red%", "blue"]))
    return Comparison("tag", "team", operator, value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(comparisons(), max_size=3))
def test_scoped_search_equals_a_private_server(store: SqlAlchemyStore, wanted: list[Comparison]) -> None:
    try:
        client_filter = filters.serialise_filter(wanted, EXPERIMENTS)
    except FilterError:
        assume(False)
        return
    private = [
        (name, {k: v for k, v in tags.items() if k != "copy"})
        for name, tags in search(store, client_filter)
        if tags.get("copy") == "private"
    ]
    scoped = search(store, filters.scope_experiment_filter(client_filter, "acme"))
    assert all(name.startswith("acme/") for name, _ in scoped)
    stripped = [(name.removeprefix("acme/"), tags) for name, tags in scoped if name != "acme/deleted-one"]
    assert stripped == private, client_filter
    for tenant in TENANTS[1:]:
        assert all(
            name.startswith(f"{tenant}/")
            for name, _ in search(store, filters.scope_experiment_filter(client_filter, tenant))
        )


@pytest.mark.parametrize(
    "attack",
    [
        "name LIKE '%'",
        "name LIKE 'acme%'",
        "name LIKE 'acm_/%'",
        "name LIKE '_cme/%'",
        "name ILIKE 'ACME/%'",
        "name LIKE '%/%'",
        "name = 'Default'",
        "experiment_id = '0'",
        "name != 'x'",
        "tags.team IS NULL",
    ],
)
def test_other_tenants_and_default_never_match(store: SqlAlchemyStore, attack: str) -> None:
    for tenant in TENANTS:
        names = [name for name, _ in search(store, filters.scope_experiment_filter(attack, tenant))]
        assert all(name.startswith(f"{tenant}/") for name in names), (tenant, attack, names)
    # acme is a prefix of acmeco, yet neither sees the other
    acme = [name for name, _ in search(store, filters.scope_experiment_filter("name LIKE '%'", "acme"))]
    acmeco = [name for name, _ in search(store, filters.scope_experiment_filter("name LIKE '%'", "acmeco"))]
    assert len(acme) == len(NAMES) + 1 and len(acmeco) == len(NAMES)  # + acme's deleted one (view ALL)
    assert not set(acme) & set(acmeco)
