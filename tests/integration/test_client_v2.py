"""The stock MLflow 2.x client (mlflow-skinny 2.22, installed by `make client2`) through the real gateway.

The 2.x client is run in its own interpreter, configured only by MLFLOW_TRACKING_URI and MLFLOW_TRACKING_TOKEN.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.integration.conftest import TokenFactory

CLIENT2 = Path(__file__).resolve().parents[2] / ".venv-mlflow2" / "bin" / "python"

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, tempfile, uuid
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    assert mlflow.__version__.startswith("2."), mlflow.__version__
    name = "v2-" + uuid.uuid4().hex[:6]
    mlflow.set_experiment(name)
    with mlflow.start_run() as run:
        mlflow.log_param("lr", "0.1")
        mlflow.log_metric("loss", 0.5, step=1)
        mlflow.log_metrics({"acc": 0.9})
        mlflow.set_tag("team", "v2")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "note.txt")
            with open(path, "w") as handle:
                handle.write("from a 2.x client")
            mlflow.log_artifact(path)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    found = client.search_runs([experiment.experiment_id])
    fetched = client.get_run(run.info.run_id)
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run.info.run_id, "note.txt", tmp)
        note = open(local).read()
    foreign = sys.argv[1] if len(sys.argv) > 1 else ""
    foreign_error = ""
    if foreign:
        try:
            client.get_run(foreign)
        except MlflowException as exc:
            foreign_error = exc.error_code
    print(json.dumps({
        "version": mlflow.__version__,
        "experiment": experiment.name,
        "run_id": run.info.run_id,
        "runs": [r.info.run_id for r in found],
        "params": fetched.data.params,
        "metrics": fetched.data.metrics,
        "tags": {k: v for k, v in fetched.data.tags.items() if k.startswith(("matih.", "team"))},
        "artifacts": [f.path for f in client.list_artifacts(run.info.run_id)],
        "note": note,
        "foreign_error": foreign_error,
        "expected_name": name,
    }))
    """
)


def _run(gateway_url: str, token: str, *args: str) -> dict[str, object]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "GATEWAY_"))}
    env |= {
        "MLFLOW_TRACKING_URI": gateway_url,
        "MLFLOW_TRACKING_TOKEN": token,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    }
    result = subprocess.run(
        [str(CLIENT2), "-c", SCRIPT, *args], env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.skipif(not CLIENT2.exists(), reason="the 2.x client is installed by `make client2` (part of make test)")
def test_mlflow_2x_client_works_and_is_isolated(gateway_url: str, token_factory: TokenFactory) -> None:
    acme = _run(gateway_url, token_factory("acme", "alice"))
    assert str(acme["version"]).startswith("2.")
    assert acme["experiment"] == acme["expected_name"]
    assert acme["runs"] == [acme["run_id"]]
    assert acme["params"] == {"lr": "0.1"}
    assert acme["metrics"] == {"loss": 0.5, "acc": 0.9}
    assert acme["tags"] == {"team": "v2", "matih.tenant_id": "acme", "matih.user_id": "alice"}
    assert acme["artifacts"] == ["note.txt"] and acme["note"] == "from a 2.x client"
    globex = _run(gateway_url, token_factory("globex", "bob"), str(acme["run_id"]))
    assert globex["foreign_error"] == "RESOURCE_DOES_NOT_EXIST"
    assert globex["runs"] == [globex["run_id"]]
