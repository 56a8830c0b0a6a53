"""Artifacts through the real stack: the gateway streams to/from the moto S3 server itself (proxy mode) or signs
exactly the caller's keys (presigned mode), for the stock client of two tenants. Attacks are refused.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import httpx
import matplotlib
import mlflow
import numpy
import pytest
from matplotlib import pyplot
from mlflow import MlflowClient

from gateway.dev import S3_SECRET_KEY, DevStack, gateway_environment, s3_client
from tests.integration.conftest import MlflowAs, MlflowEnv, TokenFactory, serve_gateway

matplotlib.use("Agg")


def sigv4_query_signature_valid(url: str, method: str, secret: str = S3_SECRET_KEY) -> bool:
    """Recompute a presigned URL's SigV4 query signature (AWS's algorithm) and compare."""
    parts = urlsplit(url)
    params = parse_qsl(parts.query, keep_blank_values=True)
    given = dict(params).get("X-Amz-Signature", "")
    canonical_query = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params) if k != "X-Amz-Signature"
    )
    canonical_request = "\n".join(
        [method, quote(unquote(parts.path), safe="/-_.~"), canonical_query, f"host:{parts.netloc}", "", "host",
         "UNSIGNED-PAYLOAD"]
    )  # fmt: skip
    fields = dict(params)
    date, scope = fields["X-Amz-Date"], fields["X-Amz-Credential"].split("/", 1)[1]
    to_sign = "\n".join(["AWS4-HMAC-SHA256", date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()])
    key = ("AWS4" + secret).encode()
    for piece in scope.split("/"):
        key = hmac.new(key, piece.encode(), hashlib.sha256).digest()
    return hmac.compare_digest(hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest(), given)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _random_file(path: Path, size: int) -> Path:
    with path.open("wb") as handle:
        remaining = size
        while remaining:
            chunk = os.urandom(min(remaining, 1 << 20))
            handle.write(chunk)
            remaining -= len(chunk)
    return path


@pytest.fixture(scope="module")
def presigned_gateway(stack: DevStack, jwt_secret: str) -> Iterator[str]:
    """A second gateway on the same stack, in presigned mode."""
    settings = gateway_environment(stack, jwt_secret) | {"GATEWAY_ARTIFACTS_MODE": "presigned"}
    with serve_gateway(stack, "gateway-presigned", settings) as url:
        yield url


@pytest.fixture(params=["proxy", "presigned"])
def artifact_gateway(
    request: pytest.FixtureRequest, gateway_url: str, mlflow_env: MlflowEnv, token_factory: TokenFactory
) -> Iterator[tuple[str, str]]:
    """(mode, gateway URL) with the stock client pointed at it as acme/alice."""
    url = gateway_url if request.param == "proxy" else request.getfixturevalue("presigned_gateway")
    mlflow_env(url, token_factory("acme", "alice"))
    yield request.param, url


def test_stock_client_round_trip(artifact_gateway: tuple[str, str], tmp_path: Path, stack: DevStack) -> None:
    mode, _ = artifact_gateway
    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "a.txt").write_text("alpha")
    (tree / "sub" / "b.json").write_text('{"b": 1}')
    (tree / "sub" / "deeper" / "c.bin").write_bytes(os.urandom(3000))
    single = _random_file(tmp_path / "single.bin", 200_000)
    mlflow.set_experiment(f"artifacts-{mode}-{uuid.uuid4().hex[:6]}")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(single))
        mlflow.log_artifacts(str(tree), artifact_path="tree")
        mlflow.log_dict({"k": [1, 2, 3]}, "conf/config.json")
        mlflow.log_text("<script>alert(1)</script>", "page.html")
        mlflow.log_image(numpy.full((8, 8, 3), 200, dtype=numpy.uint8), "plots/image.png")
        figure, axes = pyplot.subplots()
        axes.plot([1, 2, 3], [3, 1, 2])
        mlflow.log_figure(figure, "plots/figure.png")
        pyplot.close(figure)

    client = MlflowClient()
    names = sorted(f.path for f in client.list_artifacts(run.info.run_id))
    assert names == ["conf", "page.html", "plots", "single.bin", "tree"]
    plots = sorted(f.path for f in client.list_artifacts(run.info.run_id, "plots"))
    assert plots == ["plots/figure.png", "plots/image.png"]
    assert sorted(f.path for f in client.list_artifacts(run.info.run_id, "tree")) == ["tree/a.txt", "tree/sub"]
    out = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "out")))
    assert _sha256(out / "single.bin") == _sha256(single)
    assert (out / "tree" / "sub" / "deeper" / "c.bin").read_bytes() == (tree / "sub" / "deeper" / "c.bin").read_bytes()
    assert mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/conf/config.json") == {"k": [1, 2, 3]}
    assert (out / "plots" / "image.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "plots" / "figure.png").read_bytes().startswith(b"\x89PNG")
    # The bytes are in the shared bucket, under the run's experiment, where MLflow itself expects them.
    key = f"artifacts/{run.info.experiment_id}/{run.info.run_id}/artifacts/single.bin"
    assert s3_client(stack.s3_endpoint).head_object(Bucket=stack.bucket, Key=key)["ContentLength"] == 200_000


def test_large_file_multipart_upload(
    artifact_gateway: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mode, _ = artifact_gateway
    # Make the stock client use its multipart protocol for this file (presigned mode), and the
    # gateway its own S3 multipart upload (proxy mode: the body is larger than one 8 MiB part).
    monkeypatch.setenv("MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE", str(10 * 1024 * 1024))
    monkeypatch.setenv("MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE", str(5 * 1024 * 1024))
    big = _random_file(tmp_path / "big.bin", 21 * 1024 * 1024 + 17)
    experiment_id = MlflowClient().create_experiment(f"big-{mode}-{uuid.uuid4().hex[:6]}")
    run = MlflowClient().create_run(experiment_id)
    MlflowClient().log_artifact(run.info.run_id, str(big))
    out = Path(MlflowClient().download_artifacts(run.info.run_id, "big.bin", str(tmp_path)))
    assert _sha256(out) == _sha256(big)


@pytest.mark.filterwarnings("ignore:.*type hint:UserWarning")  # MLflow's own schema inference chatter
def test_pyfunc_model_logs_and_loads(artifact_gateway: tuple[str, str]) -> None:
    mode, _ = artifact_gateway

    class AddOne(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            return [value + 1 for value in model_input]

    mlflow.set_experiment(f"models-{mode}-{uuid.uuid4().hex[:6]}")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=AddOne())
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    assert list(loaded.predict([1, 2])) == [2, 3]


def test_another_tenants_artifacts_are_invisible(
    mlflow_as: MlflowAs, gateway_url: str, token_factory: TokenFactory, tmp_path: Path
) -> None:
    mlflow_as("acme")
    experiment_id = MlflowClient().create_experiment(f"secret-{uuid.uuid4().hex[:6]}")
    run = MlflowClient().create_run(experiment_id)
    (tmp_path / "secret.txt").write_text("acme only")
    MlflowClient().log_artifact(run.info.run_id, str(tmp_path / "secret.txt"))

    globex = {"Authorization": f"Bearer {token_factory('globex', 'bob')}"}
    base = f"{gateway_url}/api/2.0/mlflow-artifacts/artifacts"
    path = f"{experiment_id}/{run.info.run_id}/artifacts/secret.txt"
    for method, url, kwargs in [
        ("GET", f"{base}/{path}", {}),
        ("PUT", f"{base}/{path}", {"content": b"overwrite"}),
        ("DELETE", f"{base}/{path}", {}),
        ("GET", base, {"params": {"path": f"{experiment_id}/{run.info.run_id}/artifacts"}}),
        ("GET", base, {"params": {"path": experiment_id}}),
        ("GET", f"{gateway_url}/get-artifact", {"params": {"run_id": run.info.run_id, "path": "secret.txt"}}),
        ("GET", f"{gateway_url}/api/2.0/mlflow/artifacts/list", {"params": {"run_id": run.info.run_id}}),
    ]:
        response = httpx.request(method, url, headers=globex, **kwargs)
        assert response.status_code == 404, (method, url, response.text)
        assert response.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    # globex's own run under acme's experiment id: refused too.
    own_exp = httpx.post(f"{gateway_url}/api/2.0/mlflow/experiments/create", json={"name": uuid.uuid4().hex},
                         headers=globex).json()["experiment_id"]  # fmt: skip
    own_run = httpx.post(f"{gateway_url}/api/2.0/mlflow/runs/create", json={"experiment_id": own_exp},
                         headers=globex).json()["run"]["info"]["run_id"]  # fmt: skip
    response = httpx.put(f"{base}/{experiment_id}/{own_run}/artifacts/planted.txt", content=b"x", headers=globex)
    assert response.status_code == 404
    mlflow_as("acme")
    assert Path(MlflowClient().download_artifacts(run.info.run_id, "secret.txt", str(tmp_path / "o"))).read_text() == (
        "acme only"
    )


def _raw_get(url: str, target: str, token: str) -> int:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest("GET", target, skip_accept_encoding=True)
        connection.putheader("Authorization", f"Bearer {token}")
        connection.endheaders()
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.parametrize(
    "suffix",
    [
        "../../../etc/passwd",
        "%2e%2e/%2e%2e/x",
        "%252e%252e/x",
        "..%5cx",
        "%2Fabsolute",
        "./x",
        "a//b",
        "x%00y",
        "x%23frag",
        "x%3Fq=1",
    ],
)
def test_traversal_forms_are_refused(
    mlflow_as: MlflowAs, gateway_url: str, token_factory: TokenFactory, suffix: str
) -> None:
    mlflow_as("acme")
    experiment_id = MlflowClient().create_experiment(uuid.uuid4().hex)
    run = MlflowClient().create_run(experiment_id)
    token = token_factory("acme")
    target = f"/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/{run.info.run_id}/artifacts/{suffix}"
    assert _raw_get(gateway_url, target, token) in (400, 404)


def test_double_encoded_experiment_id_and_root_listing(
    mlflow_as: MlflowAs, gateway_url: str, token_factory: TokenFactory
) -> None:
    mlflow_as("acme")
    victim = MlflowClient().create_experiment(uuid.uuid4().hex)
    token = token_factory("globex", "bob")
    encoded = "".join(f"%25{ord(c):02X}" for c in victim)
    assert _raw_get(gateway_url, f"/api/2.0/mlflow-artifacts/artifacts/{encoded}/x", token) == 400
    assert _raw_get(gateway_url, "/api/2.0/mlflow-artifacts/artifacts", token) == 403
    assert _raw_get(gateway_url, "/api/2.0/mlflow-artifacts/artifacts?path=", token) == 403
    assert _raw_get(gateway_url, f"/api/2.0/mlflow-artifacts/artifacts?path={victim}", token) == 404


def test_presigned_urls_are_for_exactly_one_key(
    presigned_gateway: str, mlflow_env: MlflowEnv, token_factory: TokenFactory, tmp_path: Path
) -> None:
    token = token_factory("acme")
    mlflow_env(presigned_gateway, token)
    experiment_id = MlflowClient().create_experiment(uuid.uuid4().hex)
    run = MlflowClient().create_run(experiment_id)
    for name in ("one.txt", "two.txt"):
        (tmp_path / name).write_text(name)
        MlflowClient().log_artifact(run.info.run_id, str(tmp_path / name))
    headers = {"Authorization": f"Bearer {token}"}
    signed = httpx.get(
        f"{presigned_gateway}/api/2.0/mlflow-artifacts/presigned/{experiment_id}/{run.info.run_id}/artifacts/one.txt",
        headers=headers,
    ).json()
    assert signed["file_size"] == len("one.txt")
    assert httpx.get(signed["url"]).text == "one.txt"
    # moto's server does not verify SigV4 signatures, so check them the way S3 does: the signature
    # covers exactly this key, this method and this expiry; any tampering breaks it.
    url = signed["url"]
    assert sigv4_query_signature_valid(url, "GET")
    assert not sigv4_query_signature_valid(url.replace("one.txt", "two.txt"), "GET")
    assert not sigv4_query_signature_valid(url, "PUT")
    assert not sigv4_query_signature_valid(url.replace("X-Amz-Expires=300", "X-Amz-Expires=99999"), "GET")

    # A foreign (or made-up) upload id cannot be completed or aborted through another key.
    mpu = f"{presigned_gateway}/api/2.0/mlflow-artifacts/mpu"
    directory = f"{experiment_id}/{run.info.run_id}/artifacts"
    created = httpx.post(f"{mpu}/create/{directory}", json={"path": "/tmp/x/a.bin", "num_parts": 1}, headers=headers)
    upload_id = created.json()["upload_id"]
    for target in ("b.bin", "a.bin/../b.bin"):
        response = httpx.post(
            f"{mpu}/abort/{directory}", json={"path": target, "upload_id": upload_id}, headers=headers
        )
        assert response.status_code in (400, 404)
    response = httpx.post(f"{mpu}/abort/{directory}", json={"path": "a.bin", "upload_id": upload_id}, headers=headers)
    assert response.status_code == 200
    mlflow_env(presigned_gateway, token_factory("globex", "bob"))
    response = httpx.post(
        f"{mpu}/create/{directory}",
        json={"path": "evil.bin", "num_parts": 1},
        headers={"Authorization": f"Bearer {token_factory('globex', 'bob')}"},
    )
    assert response.status_code == 404


def test_html_artifacts_cannot_run_in_the_gateway_origin(
    mlflow_as: MlflowAs, gateway_url: str, token_factory: TokenFactory
) -> None:
    mlflow_as("acme")
    experiment_id = MlflowClient().create_experiment(uuid.uuid4().hex)
    run = MlflowClient().create_run(experiment_id)
    MlflowClient().log_text(run.info.run_id, "<script>alert(document.cookie)</script>", "x.html")
    response = httpx.get(
        f"{gateway_url}/get-artifact",
        params={"run_id": run.info.run_id, "path": "x.html"},
        headers={"Authorization": f"Bearer {token_factory('acme')}"},
    )
    assert response.status_code == 200
    assert response.headers["content-disposition"].startswith("attachment")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in response.headers["content-security-policy"]
