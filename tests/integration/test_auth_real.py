"""Authentication through the real stack: a local OIDC issuer (discovery + JWKS) and a shared-secret issuer
configured side by side, the stock client with Bearer and with Basic credentials, key rotation, header attacks.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import mlflow
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from gateway.dev import DevStack
from tests.integration.conftest import MlflowEnv, serve_gateway

CI_ISSUER = "https://ci.example.invalid"
CI_SECRET = "integration-ci-secret-that-is-long-enough-for-hs256-0123456789"
AUDIENCE = "mlflow"


class LocalServer:
    """A tiny HTTP server on 127.0.0.1 serving JSON documents by path and recording every request."""

    def __init__(self) -> None:
        self.documents: dict[str, Any] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                document = server.documents.get(self.path)
                body = json.dumps(document).encode() if document is not None else b"{}"
                self.send_response(200 if document is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> LocalServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class Idp:
    """An OIDC issuer: discovery document, JWKS with rotatable keys, token minting."""

    def __init__(self, server: LocalServer) -> None:
        self.server = server
        self.issuer = f"{server.url}/realms/acme"
        self.keys: dict[str, Any] = {}
        server.documents["/realms/acme/.well-known/openid-configuration"] = {
            "issuer": self.issuer,
            "jwks_uri": f"{server.url}/realms/acme/protocol/openid-connect/certs",
        }
        self.add_key("k1")

    def add_key(self, kid: str) -> None:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._publish()

    def remove_key(self, kid: str) -> None:
        del self.keys[kid]
        self._publish()

    def _publish(self) -> None:
        jwks = []
        for kid, key in self.keys.items():
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            jwks.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
        self.server.documents["/realms/acme/protocol/openid-connect/certs"] = {"keys": jwks}

    def jwks_fetches(self) -> int:
        return sum(1 for path in self.server.requests if path.endswith("/certs"))

    def token(self, tenant: str, user: str, *, kid: str = "k1", roles: list[str] | None = None, **extra: Any) -> str:
        claims = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": str(uuid.uuid4()),
            "preferred_username": user,
            "tenant_id": tenant,
            "realm_access": {"roles": roles or []},
            "exp": int(time.time()) + 600,
            **extra,
        }
        headers = {"kid": kid, **extra.pop("headers", {})} if "headers" in extra else {"kid": kid}
        claims.pop("headers", None)
        return jwt.encode(claims, self.keys[kid], algorithm="RS256", headers=headers)


@pytest.fixture(scope="module")
def idp() -> Iterator[Idp]:
    with LocalServer() as server:
        yield Idp(server)


@pytest.fixture(scope="module")
def evil() -> Iterator[LocalServer]:
    with LocalServer() as server:
        yield server


@pytest.fixture(scope="module")
def multi_issuer_gateway(stack: DevStack, idp: Idp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway with two issuers: the CI shared secret (env) and the local OIDC realm (config file)."""
    config = tmp_path_factory.mktemp("auth") / "gateway.toml"
    config.write_text(
        f"""
[[gateway.issuers]]
oidc_issuer = "{idp.issuer}"
audience = "{AUDIENCE}"
user_claim = "preferred_username"
roles_claim = "realm_access.roles"
"""
    )
    settings = {
        "GATEWAY_UPSTREAM_URL": stack.mlflow_url,
        "GATEWAY_JWT_SECRET": CI_SECRET,
        "GATEWAY_JWT_ISSUER": CI_ISSUER,
        "GATEWAY_JWKS_REFETCH_COOLDOWN_SECONDS": "2",
        "GATEWAY_CONFIG": str(config),
    }
    with serve_gateway(stack, "gateway-auth", settings) as url:
        yield url


def _ci_token(tenant: str, user: str, **extra: Any) -> str:
    claims = {"iss": CI_ISSUER, "sub": user, "tenant_id": tenant, "exp": int(time.time()) + 600, **extra}
    return jwt.encode(claims, CI_SECRET, algorithm="HS256")


def _get(url: str, path: str, token: str, **params: str) -> httpx.Response:
    return httpx.get(f"{url}/api/2.0/mlflow/{path}", params=params, headers={"Authorization": f"Bearer {token}"})


def test_stock_client_with_an_oidc_token(multi_issuer_gateway: str, idp: Idp, mlflow_env: MlflowEnv) -> None:
    mlflow_env(multi_issuer_gateway, idp.token("acme", "alice"))
    mlflow.set_experiment(f"oidc-{uuid.uuid4().hex[:6]}")
    with mlflow.start_run() as run:
        mlflow.log_metric("m", 1.0)
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert (tags["matih.tenant_id"], tags["matih.user_id"], tags["mlflow.user"]) == ("acme", "alice", "alice")


def test_stock_client_with_basic_credentials(
    multi_issuer_gateway: str, idp: Idp, mlflow_env: MlflowEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    mlflow_env(multi_issuer_gateway)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "whoever")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", _ci_token("acme", "ci-bot"))
    experiment_id = MlflowClient().create_experiment(f"basic-{uuid.uuid4().hex[:6]}")
    run = MlflowClient().create_run(experiment_id)
    assert run.info.user_id == "ci-bot"
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-a-token")
    with pytest.raises(MlflowException) as caught:
        MlflowClient().get_run(run.info.run_id)
    assert caught.value.error_code == "UNAUTHENTICATED"


def test_tokens_of_both_issuers_and_cross_issuer_forgeries(multi_issuer_gateway: str, idp: Idp) -> None:
    ci, oidc = _ci_token("acme", "ci"), idp.token("acme", "alice")
    assert _get(multi_issuer_gateway, "experiments/get", ci, experiment_id="0").status_code == 200
    assert _get(multi_issuer_gateway, "experiments/get", oidc, experiment_id="0").status_code == 200
    forged = [
        jwt.encode({"iss": idp.issuer, "aud": AUDIENCE, "sub": "x", "tenant_id": "acme", "exp": int(time.time()) + 60},
                   CI_SECRET, algorithm="HS256"),  # HS-signed token claiming the RS issuer
        idp.token("acme", "alice", aud="someone-else"),
        idp.token("acme", "alice", exp=int(time.time()) - 3600),
        _ci_token("acme", "ci", iss="https://unknown.example"),
    ]  # fmt: skip
    for token in forged:
        response = _get(multi_issuer_gateway, "experiments/get", token, experiment_id="0")
        assert response.status_code == 401, response.text
        assert response.json()["error_code"] == "UNAUTHENTICATED"
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert token not in response.text


def test_key_rotation_without_restart_or_failures(multi_issuer_gateway: str, idp: Idp) -> None:
    assert _get(multi_issuer_gateway, "experiments/get", idp.token("acme", "a"), experiment_id="0").status_code == 200
    idp.add_key("k2")  # published and used at once, long before the gateway's JWKS cache expires
    new = idp.token("acme", "a", kid="k2")
    assert _get(multi_issuer_gateway, "experiments/get", new, experiment_id="0").status_code == 200
    old = idp.token("acme", "a", kid="k1")
    assert _get(multi_issuer_gateway, "experiments/get", old, experiment_id="0").status_code == 200


def test_unknown_kid_flood_is_rate_limited(multi_issuer_gateway: str, idp: Idp) -> None:
    assert _get(multi_issuer_gateway, "experiments/get", idp.token("acme", "a"), experiment_id="0").status_code == 200
    before = idp.jwks_fetches()
    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    started = time.monotonic()
    with httpx.Client() as client:
        for i in range(30):
            claims = {"iss": idp.issuer, "aud": AUDIENCE, "sub": "x", "tenant_id": "acme", "exp": int(time.time()) + 60}
            token = jwt.encode(claims, forger, algorithm="RS256", headers={"kid": f"random-{i}"})
            response = client.get(
                f"{multi_issuer_gateway}/api/2.0/mlflow/experiments/get",
                params={"experiment_id": "0"},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert response.status_code == 401
    windows = int((time.monotonic() - started) / 2) + 1  # the gateway's cooldown is 2 s
    assert idp.jwks_fetches() - before <= windows + 1


def test_token_headers_never_cause_fetches(multi_issuer_gateway: str, idp: Idp, evil: LocalServer) -> None:
    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(forger.public_key())), "kid": "k1"}
    evil.documents["/jwks"] = {"keys": [jwk]}
    claims = {"iss": idp.issuer, "aud": AUDIENCE, "sub": "x", "tenant_id": "acme", "exp": int(time.time()) + 60}
    token = jwt.encode(
        claims, forger, algorithm="RS256", headers={"kid": "k1", "jku": f"{evil.url}/jwks", "x5u": f"{evil.url}/x5u",
                                                    "jwk": jwk},
    )  # fmt: skip
    assert _get(multi_issuer_gateway, "experiments/get", token, experiment_id="0").status_code == 401
    assert evil.requests == []


def test_query_string_tokens_are_never_accepted(multi_issuer_gateway: str, idp: Idp) -> None:
    token = idp.token("acme", "a")
    for params in ({"access_token": token}, {"token": token}, {"jwt": token}):
        response = httpx.get(
            f"{multi_issuer_gateway}/api/2.0/mlflow/experiments/get", params={"experiment_id": "0", **params}
        )
        assert response.status_code == 401


def test_job_label_header_tags_runs_but_is_no_identity(multi_issuer_gateway: str, idp: Idp) -> None:
    token = idp.token("acme", "alice")
    headers = {"Authorization": f"Bearer {token}", "X-Matih-Job-Id": "airflow-run-42"}
    api = f"{multi_issuer_gateway}/api/2.0/mlflow"
    experiment_id = httpx.post(f"{api}/experiments/create", json={"name": uuid.uuid4().hex}, headers=headers).json()
    run = httpx.post(f"{api}/runs/create", json=experiment_id, headers=headers).json()["run"]
    tags = {tag["key"]: tag["value"] for tag in run["data"]["tags"]}
    assert tags["matih.job_id"] == "airflow-run-42" and tags["matih.tenant_id"] == "acme"
    # A token's own job claim wins over the label.
    ci = _ci_token("acme", "ci", job_id="token-job")
    headers = {"Authorization": f"Bearer {ci}", "X-Matih-Job-Id": "label-job"}
    run = httpx.post(f"{api}/runs/create", json=experiment_id, headers=headers).json()["run"]
    assert {t["key"]: t["value"] for t in run["data"]["tags"]}["matih.job_id"] == "token-job"


def test_roles_from_the_oidc_role_claim(multi_issuer_gateway: str, idp: Idp) -> None:
    api = f"{multi_issuer_gateway}/api/2.0/mlflow"
    viewer = {"Authorization": f"Bearer {idp.token('acme', 'v', roles=['viewer'])}"}
    response = httpx.post(f"{api}/experiments/create", json={"name": uuid.uuid4().hex}, headers=viewer)
    assert response.status_code == 403 and "'editor' role" in response.json()["message"]
    assert httpx.get(f"{api}/experiments/get", params={"experiment_id": "0"}, headers=viewer).status_code == 200


def test_platform_admin_reads_everything_with_real_names_and_never_writes(
    multi_issuer_gateway: str, idp: Idp, stack: DevStack
) -> None:
    api = f"{multi_issuer_gateway}/api/2.0/mlflow"
    name = f"private-{uuid.uuid4().hex[:6]}"
    globex = {"Authorization": f"Bearer {_ci_token('globex', 'bob')}"}
    experiment_id = httpx.post(f"{api}/experiments/create", json={"name": name}, headers=globex).json()["experiment_id"]
    admin = {"Authorization": f"Bearer {idp.token('', 'root', roles=['platform-admin'])}"}
    response = httpx.get(f"{api}/experiments/get", params={"experiment_id": experiment_id}, headers=admin)
    assert response.status_code == 200
    assert response.json()["experiment"]["name"] == f"globex/{name}"
    response = httpx.post(f"{api}/experiments/delete", json={"experiment_id": experiment_id}, headers=admin)
    assert response.status_code == 403 and "read-only" in response.json()["message"]
    log = (stack.data_dir / "logs" / "gateway-auth.log").read_text()
    assert '"event":"platform_admin_read"' in log and '"event":"platform_admin_denied"' in log
    # No credential is logged (the audit's refusal reasons may name the scheme, never a token).
    assert not re.search(r"Bearer\s+ey", log)
    assert all(header["Authorization"].split()[1] not in log for header in (globex, admin))
