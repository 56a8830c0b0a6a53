"""The tenant-aware tracking SDK: explicit tenant, user and job context over the stock mlflow client.

```python
from gateway.tracking import RunConfig, get_experiment_tracker

tracker = get_experiment_tracker()  # MLFLOW_TRACKING_URI + MLFLOW_TRACKING_TOKEN
config = RunConfig(run_name="train", tenant_id="acme", user_id="alice", job_id="nightly-42")
with tracker.start_run("forecasting", run_config=config) as run:
    run.log_params({"lr": 0.01}).log_metric("loss", 0.3, step=1)
```

Nothing here is trusted by the gateway: the tenant and user come from the verified token there.
The SDK checks ``RunConfig.tenant_id``/``user_id`` against the token's (unverified) claims only to
fail early and loudly when platform code believes it runs as someone else; it never overrides the
token. ``job_id`` is sent as the ``X-Matih-Job-Id`` header (a request-header provider registered
with mlflow's own plugin registry), which the gateway records as the ``matih.job_id`` run tag when
the token carries no job claim.

``mlflow`` is imported lazily: it is a dev dependency of the gateway, not a runtime one.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jwt

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger("gateway.tracking")

DEFAULT_TRACKING_URI = "http://localhost:5000"
JOB_HEADER = "X-Matih-Job-Id"
RESERVED_TAG_PREFIX = "matih."
# The gateway's default claim mapping (gateway/settings.py IssuerSettings).
TENANT_CLAIM = "tenant_id"
USER_CLAIM = "sub"

_current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("matih_job_id", default=None)
_provider_lock = threading.Lock()
_provider_registered = False


class TrackingError(Exception):
    """A misuse the SDK refuses before anything is sent (identity mismatch, reserved tag)."""


@dataclass(frozen=True)
class RunConfig:
    """Who a run is for: checked against the token (tenant/user), labelled (job), tagged (tags)."""

    run_name: str | None = None
    tenant_id: str | None = None
    user_id: str | None = None
    job_id: str | None = None
    tags: Mapping[str, str] | None = field(default=None)


@dataclass(frozen=True)
class TokenIdentity:
    """The tenant and user a token claims (read without verification: the gateway verifies)."""

    tenant_id: str | None
    user_id: str | None
    job_id: str | None


def token_identity(token: str | None) -> TokenIdentity:
    """Read ``tenant_id``, ``sub`` (or ``email``) and ``job_id`` from ``token`` without verifying it.

    Safe because nothing is granted from it: it only lets the SDK refuse a ``RunConfig`` that
    disagrees with the identity the gateway will use.
    """
    if not token:
        return TokenIdentity(None, None, None)
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise TrackingError(f"MLFLOW_TRACKING_TOKEN is not a JWT: {exc}") from None

    def text(key: str) -> str | None:
        value = claims.get(key)
        return value if isinstance(value, str) and value else None

    return TokenIdentity(text(TENANT_CLAIM), text(USER_CLAIM) or text("email"), text("job_id"))


def check_run_config(config: RunConfig, identity: TokenIdentity) -> None:
    """Refuse a ``RunConfig`` whose tenant or user differs from the token's (never override silently)."""
    for label, wanted, actual in (
        ("tenant_id", config.tenant_id, identity.tenant_id),
        ("user_id", config.user_id, identity.user_id),
    ):
        if wanted is None:
            continue
        if actual is None:
            raise TrackingError(
                f"RunConfig.{label}={wanted!r} but no token claims a {label}: set MLFLOW_TRACKING_TOKEN "
                "to a token for that identity"
            )
        if wanted != actual:
            raise TrackingError(
                f"RunConfig.{label}={wanted!r} does not match the token's {label}={actual!r}: the gateway "
                "records the token's identity, so use a token for the intended one"
            )
    for key in config.tags or {}:
        check_tag_key(key)


def check_tag_key(key: str) -> None:
    """Refuse ``matih.*`` tags locally: the gateway reserves that namespace and would answer 403."""
    if key.lower().startswith(RESERVED_TAG_PREFIX):
        raise TrackingError(f"tag {key!r}: the 'matih.' namespace is reserved for the gateway (provenance tags)")


def _register_job_header_provider() -> None:
    """Register (once per process) the mlflow request-header provider that sends ``X-Matih-Job-Id``."""
    global _provider_registered
    with _provider_lock:
        if _provider_registered:
            return
        from mlflow.tracking.request_header.abstract_request_header_provider import RequestHeaderProvider
        from mlflow.tracking.request_header.registry import _request_header_provider_registry

        class JobHeaderProvider(RequestHeaderProvider):
            """Adds the job label of the run block being executed (a context variable) to requests."""

            def in_context(self) -> bool:
                return _current_job.get() is not None

            def request_headers(self) -> dict[str, str]:
                job = _current_job.get()
                return {JOB_HEADER: job} if job else {}

        _request_header_provider_registry.register(JobHeaderProvider)  # type: ignore[no-untyped-call]
        _provider_registered = True


class ActiveRun:
    """A run being logged to; every logging method returns ``self`` so calls chain."""

    def __init__(self, client: MlflowClient, run: Any) -> None:
        self._client = client
        self._run = run
        self._started = time.monotonic()

    @property
    def run_id(self) -> str:
        """The run's id."""
        return str(self._run.info.run_id)

    @property
    def experiment_id(self) -> str:
        """The id of the run's experiment."""
        return str(self._run.info.experiment_id)

    @property
    def artifact_uri(self) -> str:
        """Where the run's artifacts go (``mlflow-artifacts:/...`` through the gateway)."""
        return str(self._run.info.artifact_uri)

    def log_params(self, params: Mapping[str, Any]) -> ActiveRun:
        """Log parameters; values are converted with ``str`` and long values are handled by mlflow."""
        from mlflow.entities import Param

        if params:
            self._client.log_batch(self.run_id, params=[Param(key, str(value)) for key, value in params.items()])
        return self

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> ActiveRun:
        """Log several metrics at one timestamp (and ``step``, default 0)."""
        from mlflow.entities import Metric

        if metrics:
            timestamp = int(time.time() * 1000)
            batch = [Metric(key, float(value), timestamp, step or 0) for key, value in metrics.items()]
            self._client.log_batch(self.run_id, metrics=batch)
        return self

    def log_metric(self, key: str, value: float, step: int | None = None) -> ActiveRun:
        """Log one metric value."""
        self._client.log_metric(self.run_id, key, value, step=step)
        return self

    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> ActiveRun:
        """Upload a local file (or directory, with ``log_artifacts`` semantics) under ``artifact_path``."""
        path = os.fspath(local_path)
        if os.path.isdir(path):
            self._client.log_artifacts(self.run_id, path, artifact_path)
        else:
            self._client.log_artifact(self.run_id, path, artifact_path)
        return self

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> ActiveRun:
        """Store ``dictionary`` as a JSON (or YAML, by extension) artifact file."""
        self._client.log_dict(self.run_id, dict(dictionary), artifact_file)
        return self

    def set_tag(self, key: str, value: Any) -> ActiveRun:
        """Set a run tag; ``matih.*`` keys are refused locally (reserved for the gateway)."""
        check_tag_key(key)
        self._client.set_tag(self.run_id, key, str(value))
        return self

    def get_elapsed_time(self) -> float:
        """Seconds since the run started (monotonic clock)."""
        return time.monotonic() - self._started


class ExperimentTracker:
    """Configures the stock mlflow client for the gateway and starts runs with explicit context."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        default_artifact_root: str | None = None,
        registry_uri: str | None = None,
        token: str | None = None,
    ) -> None:
        import mlflow

        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
        self.default_artifact_root = default_artifact_root or os.environ.get("MLFLOW_ARTIFACT_ROOT") or None
        self.registry_uri = registry_uri or os.environ.get("MLFLOW_REGISTRY_URI") or self.tracking_uri
        if token is not None:
            # The stock client reads its bearer token from the environment only.
            os.environ["MLFLOW_TRACKING_TOKEN"] = token
        self.token = os.environ.get("MLFLOW_TRACKING_TOKEN") or None
        self.identity = token_identity(self.token)
        mlflow.set_tracking_uri(self.tracking_uri)
        if self.registry_uri != self.tracking_uri:
            mlflow.set_registry_uri(self.registry_uri)
        self.client: MlflowClient = mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)
        _register_job_header_provider()

    def get_or_create_experiment(self, name: str) -> str:
        """The id of the caller's experiment ``name``, created when missing (race-safe)."""
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return str(experiment.experiment_id)
        try:
            return str(self.client.create_experiment(name, artifact_location=self.default_artifact_root))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return str(experiment.experiment_id)

    @contextmanager
    def start_run(self, experiment_name: str, run_config: RunConfig | None = None) -> Iterator[ActiveRun]:
        """Start a run in ``experiment_name``; it ends FINISHED, or FAILED when the block raises.

        ``run_config.tenant_id``/``user_id`` must match the token's; ``job_id`` is sent as the
        ``X-Matih-Job-Id`` label for every request made inside the block.
        """
        config = run_config or RunConfig()
        check_run_config(config, self.identity)
        tenant = self.identity.tenant_id
        user = self.identity.user_id
        job = self.identity.job_id or config.job_id
        reset = _current_job.set(config.job_id)
        try:
            experiment_id = self.get_or_create_experiment(experiment_name)
            run = self.client.create_run(experiment_id, tags=dict(config.tags or {}), run_name=config.run_name)
            active = ActiveRun(self.client, run)
            context = {"tenant": tenant, "user": user, "job": job, "run_id": active.run_id}
            logger.info(
                "run started run_id=%s experiment=%s tenant=%s user=%s job=%s",
                active.run_id,
                experiment_name,
                tenant,
                user,
                job,
                extra={"event": "run_started", **context},
            )
            try:
                yield active
            except BaseException as exc:
                try:
                    self.client.set_terminated(active.run_id, "FAILED")
                except Exception:  # the block's own exception is the one to propagate
                    logger.exception("could not mark run %s FAILED", active.run_id)
                logger.warning(
                    "run failed run_id=%s tenant=%s user=%s job=%s error=%s",
                    active.run_id,
                    tenant,
                    user,
                    job,
                    type(exc).__name__,
                    extra={"event": "run_failed", "elapsed": active.get_elapsed_time(), **context},
                )
                raise
            self.client.set_terminated(active.run_id, "FINISHED")
            logger.info(
                "run finished run_id=%s tenant=%s user=%s job=%s elapsed=%.3fs",
                active.run_id,
                tenant,
                user,
                job,
                active.get_elapsed_time(),
                extra={"event": "run_finished", "elapsed": active.get_elapsed_time(), **context},
            )
        finally:
            _current_job.reset(reset)


_tracker: ExperimentTracker | None = None
_tracker_lock = threading.Lock()


def get_experiment_tracker() -> ExperimentTracker:
    """The process-wide tracker (created once, from the environment, under a lock)."""
    global _tracker
    if _tracker is None:
        with _tracker_lock:
            if _tracker is None:
                _tracker = ExperimentTracker()
    return _tracker
