"""Property-based, stateful: two tenants issue random interleaved operations through the real gateway.

Each tenant's observations are checked against a model of that tenant *alone*. The model of one tenant
never sees the other's operations, so if every observation matches, nothing a tenant can observe
depends on what the other did (same names on both sides included), and every foreign id behaves
exactly like a missing one.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, rule

from tests.integration.conftest import TokenFactory

NAMES = st.sampled_from(["exp", "shared", "a/b", "x_y", "Default-ish"])
KEYS = st.sampled_from(["lr", "depth", "seed"])


@dataclass
class TenantModel:
    """What one tenant has done, and so what it must observe."""

    experiments: dict[str, str] = field(default_factory=dict)  # name -> id
    runs: dict[str, dict[str, str]] = field(default_factory=dict)  # run id -> params
    run_experiment: dict[str, str] = field(default_factory=dict)


def make_machine(gateway_url: str, token_factory: TokenFactory) -> type[RuleBasedStateMachine]:
    suffix = uuid.uuid4().hex[:8]
    tenants = (f"a-{suffix}", f"b-{suffix}")
    api = f"{gateway_url}/api/2.0/mlflow"
    headers = {tenant: {"Authorization": f"Bearer {token_factory(tenant, 'user')}"} for tenant in tenants}

    class TwoTenants(RuleBasedStateMachine):
        runs = Bundle("runs")

        def __init__(self) -> None:
            super().__init__()
            self.client = httpx.Client(timeout=30)
            self.models = {tenant: TenantModel() for tenant in tenants}
            # Experiment names must be fresh per example: the stack outlives the example.
            self.prefix = uuid.uuid4().hex[:6]

        def teardown(self) -> None:
            self.client.close()

        def call(self, tenant: str, method: str, route: str, **kwargs: Any) -> httpx.Response:
            return self.client.request(method, f"{api}/{route}", headers=headers[tenant], **kwargs)

        @initialize()
        def start(self) -> None:
            pass

        @rule(tenant=st.sampled_from(tenants), name=NAMES)
        def create_experiment(self, tenant: str, name: str) -> None:
            full = f"{self.prefix}-{name}"
            response = self.call(tenant, "POST", "experiments/create", json={"name": full})
            model = self.models[tenant]
            if full in model.experiments:
                assert response.status_code == 400
                assert response.json()["error_code"] == "RESOURCE_ALREADY_EXISTS"
                assert tenant not in response.text
            else:
                assert response.status_code == 200, response.text
                model.experiments[full] = response.json()["experiment_id"]

        @rule(target=runs, tenant=st.sampled_from(tenants), data=st.data())
        def create_run(self, tenant: str, data: st.DataObject) -> tuple[str, str]:
            model = self.models[tenant]
            if not model.experiments:
                return tenant, ""
            experiment_id = data.draw(st.sampled_from(sorted(model.experiments.values())))
            response = self.call(tenant, "POST", "runs/create", json={"experiment_id": experiment_id})
            assert response.status_code == 200, response.text
            run_id = response.json()["run"]["info"]["run_id"]
            model.runs[run_id] = {}
            model.run_experiment[run_id] = experiment_id
            return tenant, run_id

        @rule(actor=st.sampled_from(tenants), run=runs, key=KEYS, value=st.integers(0, 9))
        def log_param(self, actor: str, run: tuple[str, str], key: str, value: int) -> None:
            owner, run_id = run
            if not run_id:
                return
            response = self.call(
                actor, "POST", "runs/log-parameter", json={"run_id": run_id, "key": key, "value": str(value)}
            )
            if actor != owner:
                assert response.status_code == 404
                assert response.json() == {
                    "error_code": "RESOURCE_DOES_NOT_EXIST",
                    "message": f"Run with id={run_id} not found",
                }
                return
            params = self.models[owner].runs[run_id]
            if key in params and params[key] != str(value):
                assert response.status_code == 400  # MLflow refuses to change a logged param
            else:
                assert response.status_code == 200, response.text
                params[key] = str(value)

        @rule(actor=st.sampled_from(tenants), run=runs)
        def get_run(self, actor: str, run: tuple[str, str]) -> None:
            owner, run_id = run
            if not run_id:
                return
            response = self.call(actor, "GET", "runs/get", params={"run_id": run_id})
            if actor != owner:
                assert response.status_code == 404
                return
            assert response.status_code == 200
            data = response.json()["run"]["data"]
            assert {p["key"]: p["value"] for p in data.get("params", [])} == self.models[owner].runs[run_id]

        @rule(actor=st.sampled_from(tenants), run=consumes(runs))
        def delete_run(self, actor: str, run: tuple[str, str]) -> None:
            owner, run_id = run
            if not run_id:
                return
            response = self.call(actor, "POST", "runs/delete", json={"run_id": run_id})
            if actor != owner:
                assert response.status_code == 404
                # the owner still sees it, untouched
                assert (
                    self.call(owner, "GET", "runs/get", params={"run_id": run_id}).json()["run"]["info"][
                        "lifecycle_stage"
                    ]
                    == "active"
                )
                return
            assert response.status_code == 200
            del self.models[owner].runs[run_id]

        @rule(actor=st.sampled_from(tenants), name=NAMES)
        def get_by_name(self, actor: str, name: str) -> None:
            full = f"{self.prefix}-{name}"
            response = self.call(actor, "GET", "experiments/get-by-name", params={"experiment_name": full})
            expected = self.models[actor].experiments.get(full)
            if expected is None:
                assert response.status_code == 404
                assert actor not in response.text
            else:
                assert response.json()["experiment"]["experiment_id"] == expected
                assert response.json()["experiment"]["name"] == full

        @invariant()
        def each_tenant_sees_exactly_its_own(self) -> None:
            for tenant, model in self.models.items():
                response = self.call(
                    tenant,
                    "POST",
                    "experiments/search",
                    json={"filter": f"name LIKE '{self.prefix}-%'", "max_results": 1000},
                )
                assert response.status_code == 200, response.text
                found = {e["name"]: e["experiment_id"] for e in response.json().get("experiments", [])}
                assert found == model.experiments
                if model.experiments:
                    response = self.call(
                        tenant,
                        "POST",
                        "runs/search",
                        json={"experiment_ids": sorted(model.experiments.values()), "max_results": 1000},
                    )
                    assert response.status_code == 200, response.text
                    seen = {r["info"]["run_id"] for r in response.json().get("runs", [])}
                    assert seen == set(model.runs)

    return TwoTenants


@pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
def test_two_tenants_never_observe_each_other(gateway_url: str, token_factory: TokenFactory) -> None:
    machine = make_machine(gateway_url, token_factory)
    machine.TestCase.settings = settings(
        max_examples=12,
        stateful_step_count=12,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        derandomize=True,
    )
    machine.TestCase().runTest()
