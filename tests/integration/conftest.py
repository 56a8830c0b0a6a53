"""Real-stack fixtures: one dev stack (moto S3 + ``mlflow server``) and one gateway per pytest run.

Both run as real subprocesses on free local ports and are stopped at the end of the session. Tests
talk to them with the stock ``mlflow`` client configured only through ``MLFLOW_TRACKING_URI`` and
``MLFLOW_TRACKING_TOKEN`` (:func:`mlflow_as`), exactly as a user would.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import pytest

from gateway.auth.jwt import mint_token
from gateway.dev import DevStack, ManagedProcess, free_port, gateway_environment

HERE = Path(__file__).resolve().parent
GATEWAY_START_TIMEOUT = 60.0
# The stock client retries 5xx/429 with backoff for minutes by default; fail fast in tests.
MLFLOW_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: starts extra processes of its own (tens of seconds)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration (and only those) as ``integration``."""
    for item in items:
        if item.path.resolve().is_relative_to(HERE):
            item.add_marker(pytest.mark.integration)


class TokenFactory(Protocol):
    def __call__(
        self,
        tenant: str,
        user: str = "alice",
        roles: Iterable[str] = (),
        job: str | None = None,
        ttl: int = 3600,
    ) -> str: ...


class MlflowEnv(Protocol):
    def __call__(self, tracking_uri: str, token: str | None = None) -> None: ...


class MlflowAs(Protocol):
    def __call__(self, tenant: str, user: str = "alice", roles: Iterable[str] = (), job: str | None = None) -> str: ...


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    """The session's S3 emulator + MLflow server (fresh data dir; logs in ``<data_dir>/logs``)."""
    with DevStack(tmp_path_factory.mktemp("devstack")) as dev_stack:
        yield dev_stack


@pytest.fixture(scope="session")
def jwt_secret() -> str:
    """The HS256 secret the session's gateway verifies tokens with."""
    return secrets.token_urlsafe(36)  # 48 characters


@contextlib.contextmanager
def serve_gateway(stack: DevStack, name: str, settings: dict[str, str], *, port: int | None = None) -> Iterator[str]:
    """Run ``mlflow-gateway serve`` as a subprocess with ``settings`` as its only GATEWAY_/MLFLOW_ variables.

    Yields its base URL once ``/ready`` answers; its log is ``<stack.data_dir>/logs/<name>.log``; it is
    always stopped. ``port``: one chosen beforehand (settings that name the gateway's own URL need it).
    """
    port = port or free_port()
    script = Path(sys.executable).parent / "mlflow-gateway"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "gateway.cli"]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GATEWAY_", "MLFLOW_"))}
    process = ManagedProcess(
        name=name,
        argv=[*command, "serve", "--host", "127.0.0.1", "--port", str(port)],
        log_path=stack.data_dir / "logs" / f"{name}.log",
        env=env | settings,
    )
    try:
        process.wait_http_ok(f"http://127.0.0.1:{port}/ready", timeout=GATEWAY_START_TIMEOUT)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()


@pytest.fixture(scope="session")
def gateway_url(stack: DevStack, jwt_secret: str) -> Iterator[str]:
    """The session's gateway in front of the session's MLflow (log: ``<stack.data_dir>/logs/gateway.log``)."""
    with serve_gateway(stack, "gateway", gateway_environment(stack, jwt_secret)) as url:
        yield url


@pytest.fixture(scope="session")
def token_factory(jwt_secret: str) -> TokenFactory:
    """Mint tokens the session's gateway accepts: ``token_factory("acme", "alice", roles=["admin"])``."""

    def make(
        tenant: str, user: str = "alice", roles: Iterable[str] = (), job: str | None = None, ttl: int = 3600
    ) -> str:
        return mint_token(secret=jwt_secret, tenant=tenant, user=user, roles=roles, job=job, ttl_seconds=ttl)

    return make


@pytest.fixture
def mlflow_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowEnv]:
    """Point the stock ``mlflow`` client at a server through the environment only.

    ``mlflow_env(url, token)`` resets mlflow's fluent state (active runs, experiment, tracking and
    registry URIs set in code), removes every ``MLFLOW_*`` variable and sets ``MLFLOW_TRACKING_URI``
    (+ ``MLFLOW_TRACKING_TOKEN``) and fail-fast HTTP settings. After the test the state is reset
    again and the environment is as before.
    """
    for key in _mlflow_env_keys():
        monkeypatch.delenv(key)  # monkeypatch restores the original values at teardown

    def configure(tracking_uri: str, token: str | None = None) -> None:
        _reset_mlflow_state()
        # Not through monkeypatch: mlflow writes some variables itself (set_experiment sets
        # MLFLOW_EXPERIMENT_ID), and monkeypatch would "restore" those at teardown.
        for key in _mlflow_env_keys():
            del os.environ[key]
        os.environ.update(MLFLOW_CLIENT_ENV)
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        if token is not None:
            os.environ["MLFLOW_TRACKING_TOKEN"] = token

    yield configure
    _reset_mlflow_state()
    for key in _mlflow_env_keys():
        del os.environ[key]


def _mlflow_env_keys() -> list[str]:
    return [key for key in os.environ if key.startswith(("MLFLOW_", "_MLFLOW_"))]


@pytest.fixture
def mlflow_as(gateway_url: str, token_factory: TokenFactory, mlflow_env: MlflowEnv) -> MlflowAs:
    """``mlflow_as("acme", "alice")``: the stock client now talks to the gateway as that user.

    May be called again in the same test to switch identity; returns the token.
    """

    def use(tenant: str, user: str = "alice", roles: Iterable[str] = (), job: str | None = None) -> str:
        token = token_factory(tenant, user, roles=roles, job=job)
        mlflow_env(gateway_url, token)
        return token

    return use


def _reset_mlflow_state() -> None:
    """End active runs and forget everything mlflow's fluent API remembers between calls."""
    import mlflow
    from mlflow.tracing import provider as tracing_provider
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    for _ in range(len(fluent._active_run_stack.get())):
        try:
            mlflow.end_run()
        except Exception:  # the server may be gone or deny it: just forget the run below
            break
    fluent._active_run_stack.reset()
    fluent._last_active_run_id.reset()
    fluent._last_logged_model_id.reset()
    fluent._ACTIVE_MODEL_CONTEXT.reset()
    fluent._active_experiment_id = None
    tracking_utils._tracking_uri = None
    registry_utils._registry_uri = None
    tracing_provider.reset()  # the tracer provider caches the tracking URI it exports to
