"""The route table names every route of the installed MLflow: an upgrade cannot open a hole silently."""

from __future__ import annotations

import warnings

import pytest

from gateway.policy.core import Deny, Local, Policy, Served
from gateway.policy.router import normalise_template
from gateway.policy.table import ROUTES, TABLE

IMPLICIT_METHODS = {"HEAD", "OPTIONS"}


def _walk_fastapi(routes: list[object], prefix: str = "") -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for route in routes:
        if hasattr(route, "original_router"):  # FastAPI >= 0.120 wraps included routers
            found += _walk_fastapi(route.original_router.routes, prefix + route.include_context.prefix)
        elif getattr(route, "methods", None):
            found += [(method, prefix + route.path) for method in route.methods - IMPLICIT_METHODS]
    return found


@pytest.fixture(scope="module")
def mlflow_routes() -> set[tuple[str, str]]:
    """(method, normalised template) of every Flask and FastAPI route of the installed MLflow."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mlflow.server import app as flask_app
        from mlflow.server.fastapi_app import create_fastapi_app

        fastapi_app = create_fastapi_app(flask_app)
    routes = {
        (method, normalise_template(rule.rule))
        for rule in flask_app.url_map.iter_rules()
        for method in rule.methods - IMPLICIT_METHODS
    }
    routes |= {(method, normalise_template(path)) for method, path in _walk_fastapi(fastapi_app.routes)}
    return routes


def test_mlflow_route_list_is_not_trivially_empty(mlflow_routes: set[tuple[str, str]]) -> None:
    assert len(mlflow_routes) > 250
    assert ("POST", "/api/2.0/mlflow/runs/create") in mlflow_routes
    assert ("POST", "/v1/traces") in mlflow_routes


def test_every_mlflow_route_has_an_entry(mlflow_routes: set[tuple[str, str]]) -> None:
    table = {(route.method, normalise_template(route.template)) for route in ROUTES}
    missing = sorted(mlflow_routes - table)
    assert not missing, "MLflow routes without a gateway policy or deny:\n" + "\n".join(
        f"  {method} {path}" for method, path in missing
    )


def test_table_has_no_route_mlflow_lacks(mlflow_routes: set[tuple[str, str]]) -> None:
    """Entries are real MLflow routes, except the gateway's own endpoints."""
    own = {("GET", "/ready"), ("GET", "/metrics"), ("GET", "/login"), ("POST", "/login"), ("POST", "/logout")}
    table = {(route.method, normalise_template(route.template)) for route in ROUTES}
    assert sorted(table - mlflow_routes - own) == []


def test_every_entry_is_a_policy_a_local_or_a_deny_with_reason() -> None:
    for route in ROUTES:
        assert isinstance(route.action, Policy | Served | Deny | Local), route
        if isinstance(route.action, Deny):
            assert len(route.action.reason) > 10, route


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/2.0/mlflow/not-a-route"),
        ("DELETE", "/api/2.0/mlflow/runs/create"),
        ("HEAD", "/api/2.0/mlflow/runs/get"),
        ("OPTIONS", "/api/2.0/mlflow/runs/create"),
        ("GET", "/api/9.0/mlflow/runs/get"),
        ("POST", "/api/2.0/mlflow/runs/create/"),
        ("GET", "/api/2.0/mlflow/traces/tr-abc/info"),
    ],
)
def test_unknown_routes_do_not_match(method: str, path: str) -> None:
    assert TABLE.match(method, path) is None
