"""Registered-model names shown inside logged models are the tenant's own names (no upstream prefix)."""

from __future__ import annotations

import json
import uuid

import pytest
from mlflow import MlflowClient

from tests.integration.conftest import MlflowAs


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_registrations_of_a_logged_model_show_unprefixed_names(mlflow_as: MlflowAs) -> None:
    mlflow_as("acme")
    client = MlflowClient()
    experiment_id = client.create_experiment(f"lm-{uuid.uuid4().hex[:6]}")
    model = client.create_logged_model(experiment_id=experiment_id, name="m")
    name = f"reg-{uuid.uuid4().hex[:6]}"
    client.create_registered_model(name)
    client.create_model_version(name, source=f"models:/{model.model_id}", model_id=model.model_id)

    fetched = client.get_logged_model(model.model_id)
    tag = json.loads(fetched.tags["mlflow.modelVersions"])
    assert tag == [{"name": name, "version": 1}] or tag == [{"name": name, "version": "1"}]
    found = client.search_logged_models(experiment_ids=[experiment_id])
    assert json.loads(found[0].tags["mlflow.modelVersions"])[0]["name"] == name
