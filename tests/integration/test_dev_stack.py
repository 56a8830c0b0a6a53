"""The dev stack itself (no gateway policies): MLflow, the S3 emulator, persistence, ``mlflow-gateway dev``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest

from gateway.dev import DevStack, ManagedProcess, create_bucket, free_port, s3_client, start_s3

MlflowEnv = Callable[..., None]  # the ``mlflow_env`` fixture: (tracking_uri, token=None) -> None
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _request(method: str, url: str, body: dict[str, Any] | None = None, token: str | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with _OPENER.open(request, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
        exc.close()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def _log_text_artifact(mlflow_env: MlflowEnv, tracking_uri: str, text: str) -> tuple[str, str]:
    """Log ``text`` as ``notes/hello.txt`` in a new run of a new experiment; return (exp id, run id)."""
    import mlflow

    mlflow_env(tracking_uri)
    experiment = mlflow.set_experiment(f"dev-stack-{uuid.uuid4().hex[:8]}")
    with mlflow.start_run() as run:
        mlflow.log_text(text, "notes/hello.txt")
    return experiment.experiment_id, run.info.run_id


def test_mlflow_server_answers_health_and_experiments_search(stack: DevStack) -> None:
    assert _request("GET", f"{stack.mlflow_url}/health")[0] == 200
    status, body = _request(
        "POST",
        f"{stack.mlflow_url}/api/2.0/mlflow/experiments/search",
        {"filter": "name = 'Default'", "max_results": 10},
    )
    assert status == 200, body
    assert "Default" in [experiment["name"] for experiment in body["experiments"]]


def test_mlflow_server_refuses_unknown_host_header(stack: DevStack) -> None:
    """``--allowed-hosts`` is this address only: DNS-rebinding style Host headers are refused."""
    request = urllib.request.Request(f"{stack.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1")
    request.add_header("Host", "evil.example.com")
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        _OPENER.open(request, timeout=30)
    assert excinfo.value.code == 403
    excinfo.value.close()


def test_s3_bucket_exists(stack: DevStack) -> None:
    client = s3_client(stack.s3_endpoint)
    try:
        client.head_bucket(Bucket=stack.bucket)
    finally:
        client.close()
    assert stack.artifacts_destination == f"s3://{stack.bucket}/artifacts"


def test_artifact_logged_directly_lands_in_s3(stack: DevStack, mlflow_env: MlflowEnv) -> None:
    import mlflow

    experiment_id, run_id = _log_text_artifact(mlflow_env, stack.mlflow_url, "hello from the stock client")

    key = f"artifacts/{experiment_id}/{run_id}/artifacts/notes/hello.txt"
    client = s3_client(stack.s3_endpoint)
    try:
        assert client.get_object(Bucket=stack.bucket, Key=key)["Body"].read() == b"hello from the stock client"
    finally:
        client.close()
    # Download: the client gets a presigned URL from MLflow and reads the emulator directly.
    assert mlflow.artifacts.load_text(f"runs:/{run_id}/notes/hello.txt") == "hello from the stock client"


def test_s3_objects_survive_a_restart(tmp_path: Path) -> None:
    payload = os.urandom(6 * 1024 * 1024 + 123)  # > 5 MiB: stored by multipart upload below
    big_file = tmp_path / "big.bin"
    big_file.write_bytes(payload)

    with start_s3(tmp_path, free_port()) as s3:
        endpoint = _endpoint(s3)
        create_bucket(endpoint, "persist")
        create_bucket(endpoint, "persist")  # idempotent
        client = s3_client(endpoint)
        client.put_object(Bucket="persist", Key="dir/small.txt", Body=b"small", Metadata={"owner_id": "42"})
        transfer = _transfer_config(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
        client.upload_file(str(big_file), "persist", "dir/big.bin", Config=transfer)
        client.put_object(Bucket="persist", Key="dir/deleted.txt", Body=b"gone")
        client.delete_object(Bucket="persist", Key="dir/deleted.txt")
        client.close()

    with start_s3(tmp_path, free_port()) as s3:
        client = s3_client(_endpoint(s3))
        keys = [item["Key"] for item in client.list_objects_v2(Bucket="persist")["Contents"]]
        assert keys == ["dir/big.bin", "dir/small.txt"]
        small = client.get_object(Bucket="persist", Key="dir/small.txt")
        assert (small["Body"].read(), small["Metadata"]) == (b"small", {"owner_id": "42"})
        assert client.get_object(Bucket="persist", Key="dir/big.bin")["Body"].read() == payload
        client.close()


def test_s3_replay_survives_a_torn_last_line(tmp_path: Path) -> None:
    """A server killed mid-write leaves a partial line: it is skipped, later writes still persist."""
    with start_s3(tmp_path, free_port()) as s3:
        create_bucket(_endpoint(s3), "torn")
    with (tmp_path / "s3" / "mutations.jsonl").open("ab") as log:
        log.write(b'{"environ": {"REQUEST_METHOD": "PU')

    with start_s3(tmp_path, free_port()) as s3:
        client = s3_client(_endpoint(s3))
        client.put_object(Bucket="torn", Key="after.txt", Body=b"after")
        client.close()
        assert "skipping unreadable line" in s3.log_tail()

    with start_s3(tmp_path, free_port()) as s3:
        client = s3_client(_endpoint(s3))
        assert client.get_object(Bucket="torn", Key="after.txt")["Body"].read() == b"after"
        client.close()


@pytest.mark.slow
def test_dev_stack_restart_reuses_metadata_and_artifacts(tmp_path: Path, mlflow_env: MlflowEnv) -> None:
    import mlflow

    with DevStack(tmp_path) as first:
        _, run_id = _log_text_artifact(mlflow_env, first.mlflow_url, "kept across restarts")
    assert all(not process.is_running() for process in first.processes())

    with DevStack(tmp_path) as second:
        mlflow_env(second.mlflow_url)
        assert mlflow.get_run(run_id).info.status == "FINISHED"
        assert mlflow.artifacts.load_text(f"runs:/{run_id}/notes/hello.txt") == "kept across restarts"


@pytest.mark.slow
def test_mlflow_gateway_dev_prints_exports_and_sigterm_stops_every_child(tmp_path: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    output = tmp_path / "dev.out"
    script = Path(sys.executable).parent / "mlflow-gateway"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GATEWAY_", "MLFLOW_"))}
    with output.open("wb") as out:
        dev = subprocess.Popen(
            [str(script), "dev", "--port", str(port), "--data-dir", str(data_dir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        text = _wait_for_output(dev, output, "UI: ", timeout=150)
        children = _descendants(dev.pid)
        assert len(children) >= 3, children  # S3 server, mlflow server, its uvicorn

        secret = (data_dir / "jwt-secret").read_text().strip()
        assert stat.S_IMODE((data_dir / "jwt-secret").stat().st_mode) == 0o600
        for tenant, user in (("acme", "alice"), ("globex", "bob")):
            block = f"# tenant {tenant} (user {user})\nexport MLFLOW_TRACKING_URI=http://127.0.0.1:{port}\n"
            assert block in text, text
            token = text.split(block, 1)[1].splitlines()[0].removeprefix("export MLFLOW_TRACKING_TOKEN=")
            claims = jwt.decode(token, secret, algorithms=["HS256"])
            assert (claims["tenant_id"], claims["sub"]) == (tenant, user)
            assert claims["exp"] - claims["iat"] == 7 * 24 * 3600
        assert _request("GET", f"http://127.0.0.1:{port}/ready")[0] == 200

        dev.send_signal(signal.SIGTERM)
        assert dev.wait(timeout=60) == 0
        assert [pid for pid in children if _alive(pid)] == []
    finally:
        if dev.poll() is None:  # the test failed before the SIGTERM: leave nothing behind
            for pid in [dev.pid, *_descendants(dev.pid)]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            dev.wait()


def _endpoint(process: ManagedProcess) -> str:
    return f"http://127.0.0.1:{process.argv[process.argv.index('--port') + 1]}"


def _transfer_config(**kwargs: int) -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(**kwargs)


def _wait_for_output(process: subprocess.Popen[bytes], output: Path, marker: str, *, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = output.read_text(errors="replace")
        if marker in text:
            return text
        if process.poll() is not None:
            pytest.fail(f"`mlflow-gateway dev` exited with {process.returncode}:\n{text[-5000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"`mlflow-gateway dev` printed no {marker!r} within {timeout}s:\n{text[-5000:]}")
        time.sleep(0.2)


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, pgrp, ...]."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    pending = [root]
    while pending:
        for child in children.get(pending.pop(), []):
            if child not in found and _alive(child):
                found.add(child)
                pending.append(child)
    return found
