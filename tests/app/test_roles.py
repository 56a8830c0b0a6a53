"""Roles from the token: viewer is read-only, editor (the default) writes, admin-only stays admin-only."""

from __future__ import annotations

import httpx
import pytest

from tests.app.conftest import API, FakeUpstream, assert_mlflow_error
from tests.factories import bearer


@pytest.mark.parametrize("roles", [["viewer"], ["viewer", "offline_access"]])
def test_viewer_reads_but_cannot_write(client: httpx.Client, fake: FakeUpstream, roles: list[str]) -> None:
    experiment = fake.add_experiment("acme", "ro")
    run = fake.add_run(experiment)
    headers = bearer("acme", "vera", roles=roles)
    assert client.get(f"{API}/runs/get", params={"run_id": run}, headers=headers).status_code == 200
    assert client.post(f"{API}/runs/search", json={"experiment_ids": [experiment]}, headers=headers).status_code == 200
    before = len(fake.forwarded())
    for path, body in [
        ("runs/log-parameter", {"run_id": run, "key": "k", "value": "v"}),
        ("runs/create", {"experiment_id": experiment}),
        ("experiments/create", {"name": "new"}),
        ("runs/delete", {"run_id": run}),
    ]:
        response = client.post(f"{API}/{path}", json=body, headers=headers)
        assert_mlflow_error(response, 403, "PERMISSION_DENIED")
        assert "'editor' role" in response.json()["message"]
    assert len(fake.forwarded()) == before


@pytest.mark.parametrize("roles", [[], ["editor"], ["admin"], ["offline_access", "uma_authorization"]])
def test_editors_and_admins_write(client: httpx.Client, fake: FakeUpstream, roles: list[str]) -> None:
    run = fake.add_run(fake.add_experiment("acme", "rw"))
    response = client.post(
        f"{API}/runs/log-parameter", json={"run_id": run, "key": "k", "value": "v"}, headers=bearer(roles=roles)
    )
    assert response.status_code == 200, response.text
