"""The embedded development stack: an S3 emulator, an unmodified ``mlflow server`` and the gateway.

``mlflow-gateway dev`` and the integration tests run the real parts on one machine, without
Docker or cloud credentials:

* **S3**: moto's S3 server in a child process. moto keeps objects in memory, so the child runs
  moto's WSGI app behind :class:`_MutationLog`, which appends every successful mutating request
  (PUT/POST/DELETE) to ``<data dir>/s3/mutations.jsonl`` and replays the file on the next start:
  artifacts survive restarts, and a crash loses at most the request being written. (moto's own
  recorder was not used: it also records every read, its concurrent writes can interleave lines,
  and its replay does not map multipart upload ids, so any object stored by multipart upload
  (boto3 switches to it above 8 MiB) would be lost.)
* **MLflow**: ``mlflow server`` (sqlite in the data dir, artifacts proxied to ``s3://<bucket>/artifacts``)
  hardened as ``mlflow-api.md`` §9 recommends, in a child process.
* **Gateway**: uvicorn in the calling process (:func:`run_dev`).

Every child runs in its own session, so Ctrl-C in a terminal reaches only the dev process, which
then stops the children in order (SIGTERM to each process group, SIGKILL after a grace period).
Nothing here is imported by the gateway at run time; boto3, moto and mlflow (dev extras) are
imported lazily.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import importlib
import io
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, TYPE_CHECKING, Any, Final, Self
from urllib.parse import parse_qs

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

S3_ACCESS_KEY: Final = "testing"
S3_SECRET_KEY: Final = "testing"
S3_REGION: Final = "us-east-1"
DEFAULT_BUCKET: Final = "mlflow"
ARTIFACTS_PREFIX: Final = "artifacts"
DEMO_TENANTS: Final = (("acme", "alice"), ("globex", "bob"))
DEMO_TOKEN_TTL_SECONDS: Final = 7 * 24 * 3600
S3_START_TIMEOUT: Final = 30.0
MLFLOW_START_TIMEOUT: Final = 120.0  # the first start runs every database migration
STOP_TIMEOUT: Final = 10.0
JWT_SECRET_FILE: Final = "jwt-secret"

# Local URLs only: never send dev-stack traffic through a proxy configured in the environment.
_LOCAL_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_NO_PROXY: Final = "127.0.0.1,localhost,::1"


class DevStackError(RuntimeError):
    """A dev-stack process failed to start or to become ready; the message holds its log tail."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_available(port: int) -> bool:
    """Whether 127.0.0.1:``port`` can be bound now (with SO_REUSEADDR, as uvicorn binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class ManagedProcess:
    """A child process in its own session whose output is appended to ``log_path``.

    The child leads a new process group, so :meth:`stop` reaches its own children too (``mlflow
    server`` runs uvicorn as a child) and a terminal's Ctrl-C does not reach it directly.
    """

    def __init__(
        self,
        *,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = tuple(argv)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"\n=== {stamp} starting {name}: {shlex.join(self.argv)}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
                cwd=cwd,
                start_new_session=True,
            )
        self._stopped = False

    @property
    def pid(self) -> int:
        """The child's pid, which is also its process group id."""
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit code once the child has exited (negative: killed by that signal), else None."""
        return self._popen.poll()

    def is_running(self) -> bool:
        """Whether the child itself has not exited yet."""
        return self._popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the child's log, for error messages."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_http_ok(self, url: str, timeout: float = 60.0) -> None:
        """Poll ``url`` until it answers 200.

        Raise :class:`DevStackError` with the log tail when the child exits first or ``timeout``
        seconds pass; the child is left running (the caller decides whether to stop it).
        """
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"not an http(s) URL: {url!r}")
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            if (code := self._popen.poll()) is not None:
                raise DevStackError(
                    f"{self.name} exited with code {code} before {url} answered "
                    f"(log {self.log_path}):\n{self.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DevStackError(
                    f"{self.name} did not answer 200 on {url} within {timeout:.0f}s ({last}; "
                    f"log {self.log_path}):\n{self.log_tail()}"
                )
            last = _probe(url, timeout=min(5.0, remaining))
            if last == "200":
                return
            time.sleep(0.2)

    def stop(self, *, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM the child's process group, wait up to ``timeout`` s, then SIGKILL it. Idempotent.

        Returns the child's exit code (None only if it could not be reaped).
        """
        if self._stopped:
            return self._popen.poll()
        self._stopped = True
        pgid = self._popen.pid
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._popen.poll() is None or _group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout=5.0)
        return self._popen.poll()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ManagedProcess(name={self.name!r}, pid={self.pid}, returncode={self.returncode})"


def _probe(url: str, *, timeout: float) -> str:
    """GET ``url`` once: ``"200"`` on success, otherwise a short description of what happened."""
    try:
        with _LOCAL_OPENER.open(url, timeout=timeout) as response:
            return str(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_pids(pgid: int) -> list[int]:
    """The live (non-zombie) pids of a process group, read from ``/proc`` (a ManagedProcess leads its own group)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Format: "pid (comm) state ppid pgrp ..."; comm may contain spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is still in the group (zombies may wait for a reaper)."""
    if Path("/proc").is_dir():
        return bool(group_pids(pgid))
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The parent's environment without MLflow client or AWS identity settings, plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MLFLOW_", "AWS_")) and key not in ("GATEWAY_JWT_SECRET",)
    }
    env["NO_PROXY"] = env["no_proxy"] = _NO_PROXY
    env.update(extra)
    return env


def gateway_environment(stack: DevStack, jwt_secret: str) -> dict[str, str]:
    """What a gateway in front of ``stack`` needs: upstream, secret, artifacts destination, S3 access."""
    return {
        "GATEWAY_UPSTREAM_URL": stack.mlflow_url,
        "GATEWAY_JWT_SECRET": jwt_secret,
        "GATEWAY_ARTIFACTS_DESTINATION": stack.artifacts_destination,
        # The browser login of the web UI: a session key derived from the dev secret, and cookies
        # without `Secure` because the dev stack serves plain HTTP on 127.0.0.1.
        "GATEWAY_SESSION_SECRET": hashlib.sha256(b"session:" + jwt_secret.encode()).hexdigest(),
        "GATEWAY_UI_INSECURE_COOKIES": "true",
        **_s3_env(stack.s3_endpoint),
    }


def _s3_env(endpoint: str) -> dict[str, str]:
    """AWS settings that point boto3 at the emulator with dummy credentials, and nowhere else."""
    return {
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_DEFAULT_REGION": S3_REGION,
        "AWS_REGION": S3_REGION,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    }


def start_s3(data_dir: Path, port: int) -> ManagedProcess:
    """Start the persistent moto S3 server on 127.0.0.1:``port`` and wait until it answers.

    Objects live in memory; the mutation log ``<data_dir>/s3/mutations.jsonl`` is replayed before
    the port is served, so a second start against the same ``data_dir`` has the same buckets and
    objects.
    """
    data_dir = data_dir.resolve()
    argv = [sys.executable, "-m", "gateway.dev", "s3-server"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir)]
    process = ManagedProcess(
        name="s3",
        argv=argv,
        log_path=data_dir / "logs" / "s3.log",
        env=_child_env({"MOTO_PORT": str(port), "PYTHONPATH": _pythonpath_with_this_package()}),
        cwd=data_dir,
    )
    try:
        # ListBuckets: moto answers it without credentials once the replay is done.
        process.wait_http_ok(f"http://127.0.0.1:{port}/", timeout=S3_START_TIMEOUT)
    except BaseException:
        process.stop()
        raise
    return process


def _pythonpath_with_this_package() -> str:
    """PYTHONPATH for a child that runs ``-m gateway.dev`` from another cwd, installed or not."""
    root = str(Path(__file__).resolve().parent.parent)
    return os.pathsep.join([root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client for the emulator (dummy credentials, path-style addressing)."""
    boto3 = importlib.import_module("boto3")
    config = importlib.import_module("botocore.config").Config(
        s3={"addressing_style": "path"}, retries={"max_attempts": 2}
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
        region_name=S3_REGION,
        config=config,
    )


def create_bucket(endpoint: str, bucket: str) -> None:
    """Create ``bucket`` on the emulator at ``endpoint``; an existing bucket is fine."""
    client_error = importlib.import_module("botocore.exceptions").ClientError
    client = s3_client(endpoint)
    try:
        client.create_bucket(Bucket=bucket)
    except client_error as exc:
        if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
    finally:
        client.close()


def start_mlflow(
    data_dir: Path,
    port: int,
    *,
    s3_endpoint: str,
    bucket: str,
    allowed_hosts: Sequence[str] | None = None,
    cors_allowed_origins: Sequence[str] | None = None,
    workers: int = 1,
    extra_env: Mapping[str, str] | None = None,
) -> ManagedProcess:
    """Start ``mlflow server`` on 127.0.0.1:``port`` and wait until ``/health`` answers 200.

    ``workers`` and ``extra_env`` (e.g. ``MLFLOW_SQLALCHEMYSTORE_POOL_SIZE``) exist for the benchmarks.

    Metadata goes to ``<data_dir>/mlflow.db``; artifacts are proxied (``--serve-artifacts``) to
    ``s3://<bucket>/artifacts`` on the emulator. ``allowed_hosts`` defaults to this address only
    (``127.0.0.1:<port>``, ``localhost:<port>``): the Host the gateway sends. ``cors_allowed_origins``
    defaults to MLflow's own default (localhost origins). The AI Gateway, the job runner (a
    separate huey process), the remote assistant and telemetry are switched off.
    """
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    hosts = allowed_hosts if allowed_hosts is not None else (f"127.0.0.1:{port}", f"localhost:{port}")
    argv = [sys.executable, "-m", "mlflow", "server"]
    argv += ["--backend-store-uri", f"sqlite:///{data_dir / 'mlflow.db'}"]
    argv += ["--serve-artifacts", "--artifacts-destination", f"s3://{bucket}/{ARTIFACTS_PREFIX}"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    argv += ["--allowed-hosts", ",".join(hosts)]
    if cors_allowed_origins:
        argv += ["--cors-allowed-origins", ",".join(cors_allowed_origins)]
    env = _child_env(
        {
            **_s3_env(s3_endpoint),
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_ENABLE_AI_GATEWAY": "false",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_ENABLE_REMOTE_ASSISTANT": "false",
            "DO_NOT_TRACK": "true",
            **(extra_env or {}),
        }
    )
    process = ManagedProcess(name="mlflow", argv=argv, log_path=data_dir / "logs" / "mlflow.log", env=env, cwd=data_dir)
    try:
        process.wait_http_ok(f"http://127.0.0.1:{port}/health", timeout=MLFLOW_START_TIMEOUT)
    except BaseException:
        process.stop()
        raise
    return process


class DevStack:
    """S3 emulator + bucket + ``mlflow server`` on free local ports, as a context manager.

    ``with DevStack(path) as stack:`` starts everything (reusing the data in ``path``) and stops
    every child on exit, including on exceptions and KeyboardInterrupt.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        bucket: str = DEFAULT_BUCKET,
        cors_allowed_origins: Sequence[str] | None = None,
        mlflow_workers: int = 1,
        mlflow_env: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.bucket = bucket
        self.cors_allowed_origins = cors_allowed_origins
        self.mlflow_workers = mlflow_workers
        self.mlflow_env = dict(mlflow_env or {})
        self.s3: ManagedProcess | None = None
        self.mlflow: ManagedProcess | None = None
        self._s3_port = 0
        self._mlflow_port = 0
        self._lock_file: IO[bytes] | None = None

    @property
    def s3_endpoint(self) -> str:
        """The emulator's endpoint URL (``http://127.0.0.1:<port>``)."""
        self._require_started()
        return f"http://127.0.0.1:{self._s3_port}"

    @property
    def mlflow_url(self) -> str:
        """The MLflow server's base URL (``http://127.0.0.1:<port>``): the gateway's upstream."""
        self._require_started()
        return f"http://127.0.0.1:{self._mlflow_port}"

    @property
    def artifacts_destination(self) -> str:
        """Where MLflow stores artifacts: ``s3://<bucket>/artifacts``."""
        return f"s3://{self.bucket}/{ARTIFACTS_PREFIX}"

    def start(self) -> Self:
        """Start S3, create the bucket, start MLflow; on any failure stop what was started."""
        if self.s3 is not None:
            raise RuntimeError("DevStack already started")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_data_dir()
        try:
            self._s3_port = free_port()
            self.s3 = start_s3(self.data_dir, self._s3_port)
            create_bucket(self.s3_endpoint, self.bucket)
            self._mlflow_port = free_port()
            self.mlflow = start_mlflow(
                self.data_dir,
                self._mlflow_port,
                s3_endpoint=self.s3_endpoint,
                bucket=self.bucket,
                cors_allowed_origins=self.cors_allowed_origins,
                workers=self.mlflow_workers,
                extra_env=self.mlflow_env,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop MLflow, then S3. Idempotent; Ctrl-C and SIGTERM are held off until it is done."""
        with _termination_deferred():
            for process in (self.mlflow, self.s3):
                if process is not None:
                    process.stop()
            if self._lock_file is not None:
                self._lock_file.close()  # releases the lock
                self._lock_file = None

    def _lock_data_dir(self) -> None:
        """Refuse to share a data dir: two stacks would replay and append to the same S3 log."""
        lock_file = (self.data_dir / ".devstack.lock").open("wb")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise DevStackError(f"{self.data_dir} is in use by another running dev stack") from None
        self._lock_file = lock_file

    def processes(self) -> list[ManagedProcess]:
        """The started child processes (MLflow first)."""
        return [process for process in (self.mlflow, self.s3) if process is not None]

    def _require_started(self) -> None:
        if self.s3 is None:
            raise RuntimeError("DevStack not started")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@contextlib.contextmanager
def _termination_deferred() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM for the block so a second Ctrl-C cannot abandon half-stopped children."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def resolve_jwt_secret(jwt_secret: str | None, data_dir: Path) -> str:
    """The dev gateway's HS256 secret: the argument, else ``$GATEWAY_JWT_SECRET``, else the secret
    persisted in ``<data_dir>/jwt-secret`` (created with mode 0600 on first use), so tokens
    printed by an earlier run stay valid."""
    if jwt_secret:
        return jwt_secret
    if from_env := os.environ.get("GATEWAY_JWT_SECRET"):
        return from_env
    path = data_dir / JWT_SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text(encoding="utf-8").strip()
    secret = secrets.token_urlsafe(48)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(secret + "\n")
    return secret


def demo_banner(*, gateway_url: str, jwt_secret: str, data_dir: Path) -> str:
    """The ready-to-paste shell snippets for the demo tenants, and where things are."""
    from gateway.auth.jwt import mint_token

    lines = [f"\nmlflow-gateway dev is ready on {gateway_url} (data in {data_dir})\n"]
    for tenant, user in DEMO_TENANTS:
        token = mint_token(secret=jwt_secret, tenant=tenant, user=user, ttl_seconds=DEMO_TOKEN_TTL_SECONDS)
        lines += [
            f"# tenant {tenant} (user {user})",
            f"export MLFLOW_TRACKING_URI={gateway_url}",
            f"export MLFLOW_TRACKING_TOKEN={token}",
            "",
        ]
    lines += [
        f"UI: {gateway_url}/ (log in by pasting one of the tokens above)",
        f"More tokens: mlflow-gateway token --data-dir {data_dir} --tenant <tenant> --user <user>",
        f"Logs: {data_dir / 'logs'}. Tokens are valid for 7 days. Stop with Ctrl-C.",
    ]
    return "\n".join(lines)


def run_dev(*, port: int = 5000, data_dir: Path, jwt_secret: str | None = None) -> int:
    """Run the whole stack: S3 + MLflow as children, the gateway with uvicorn in this process.

    Prints export lines for the demo tenants once the gateway is listening. Ctrl-C or SIGTERM
    stops the gateway, then every child. Returns the process exit code.
    """
    import uvicorn

    from gateway.app import create_app
    from gateway.observability import configure_logging
    from gateway.serving import return_large_buffers_to_the_os
    from gateway.settings import load_settings

    if not _port_available(port):  # fail now rather than after MLflow's start-up
        print(f"error: 127.0.0.1:{port} is already in use (choose another with --port)", file=sys.stderr)
        return 1
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = resolve_jwt_secret(jwt_secret, data_dir)
    gateway_url = f"http://127.0.0.1:{port}"
    on_main_thread = threading.current_thread() is threading.main_thread()
    # uvicorn captures SIGTERM while serving and re-raises it once shut down: with this handler
    # (instead of the default, which would end the process at once) the children are stopped too.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt) if on_main_thread else None

    class DevServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                print(demo_banner(gateway_url=gateway_url, jwt_secret=secret, data_dir=data_dir), flush=True)

    print(f"Starting the S3 emulator and mlflow server in {data_dir} ...", file=sys.stderr, flush=True)
    try:
        with DevStack(data_dir, cors_allowed_origins=(gateway_url, f"http://localhost:{port}")) as stack:
            gateway_env = {key: value for key, value in os.environ.items() if key.startswith("GATEWAY_")}
            gateway_env |= gateway_environment(stack, secret)
            # The in-process gateway's boto3 reads the standard AWS variables: point them at the emulator.
            os.environ.update({key: value for key, value in gateway_env.items() if not key.startswith("GATEWAY_")})
            settings = load_settings(env=gateway_env, overrides={"host": "127.0.0.1", "port": port})
            configure_logging(settings.log_level, access_log_flush_seconds=settings.access_log_flush_seconds)
            return_large_buffers_to_the_os()
            config = uvicorn.Config(
                create_app(settings),
                host="127.0.0.1",
                port=port,
                loop="uvloop",
                http="httptools",
                log_level="info",
                lifespan="on",
                proxy_headers=False,  # as `serve`: the client address is the socket's, never a header
                server_header=False,
            )
            server = DevServer(config)
            server.run()
            return 0 if server.started else 1
    except KeyboardInterrupt:
        return 0
    except SystemExit as exc:  # uvicorn exits this way when the app's lifespan fails
        return exc.code if isinstance(exc.code, int) else 1
    except DevStackError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# --- The persistent S3 emulator (runs in the child started by start_s3) --------------------------

_MUTATING_METHODS: Final = frozenset({"PUT", "POST", "DELETE"})
_UPLOAD_ID_RE: Final = re.compile(rb"<UploadId>([^<]+)</UploadId>")
_UPLOAD_ID_PARAM_RE: Final = re.compile(r"(?<![^?&])uploadId=([^&]*)")
# Hop-by-hop or framing headers: the recorded body is stored de-chunked with its exact length.
_UNRECORDED_KEYS: Final = frozenset({"HTTP_TRANSFER_ENCODING", "HTTP_EXPECT", "HTTP_CONNECTION", "CONTENT_LENGTH"})
_RECORDED_KEYS: Final = ("REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "RAW_URI", "REQUEST_URI", "CONTENT_TYPE")
_PRESERVED_HEADER_NAMES_KEY: Final = "moto.preserved_header_names"


class _MutationLog:
    """WSGI middleware: append each successful mutating request to a JSON-lines file.

    A line holds the request's WSGI environ strings (method, raw path, query, headers), its body
    (base64) and, for CreateMultipartUpload, the upload id moto answered, so that a replay can map
    the ids of later UploadPart/Complete requests to the new ones. Reads are not recorded. Lines
    are written whole under a lock and flushed, so a killed server leaves at most a torn last line.
    """

    def __init__(self, app: WSGIApplication, log_path: Path) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._file = log_path.open("ab")
        if self._file.tell() and not log_path.read_bytes().endswith(b"\n"):
            self._file.write(b"\n")  # end a torn last line so that the next entry stays readable

    def close(self) -> None:
        """Close the log file."""
        with self._lock:
            self._file.close()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "")
        if method not in _MUTATING_METHODS or environ.get("PATH_INFO", "").startswith("/moto-api"):
            return self.app(environ, start_response)
        body = _read_body(environ)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        recorded = _environ_record(environ)
        status = ""

        def capture(status_line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            nonlocal status
            status = status_line
            return start_response(status_line, headers, exc_info)

        result = self.app(environ, capture)
        try:
            content = b"".join(result)
        finally:
            if hasattr(result, "close"):
                result.close()
        if status[:1] == "2":
            entry: dict[str, Any] = {"environ": recorded, "body": base64.b64encode(body).decode("ascii")}
            if method == "POST" and "uploads" in parse_qs(recorded["QUERY_STRING"], keep_blank_values=True):
                match = _UPLOAD_ID_RE.search(content)
                entry["upload_id"] = match.group(1).decode() if match else None
            line = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
            with self._lock:
                self._file.write(line)
                self._file.flush()
        return [content]


def _read_body(environ: WSGIEnvironment) -> bytes:
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        data: bytes = stream.read(int(length))
        return data
    if environ.get("wsgi.input_terminated"):  # chunked transfer encoding, de-chunked by werkzeug
        rest: bytes = stream.read()
        return rest
    return b""


def _environ_record(environ: WSGIEnvironment) -> dict[str, Any]:
    recorded: dict[str, Any] = {key: environ.get(key, "") for key in _RECORDED_KEYS}
    recorded.update(
        {
            key: value
            for key, value in environ.items()
            if key.startswith("HTTP_") and key not in _UNRECORDED_KEYS and isinstance(value, str)
        }
    )
    recorded[_PRESERVED_HEADER_NAMES_KEY] = dict(environ.get(_PRESERVED_HEADER_NAMES_KEY) or {})
    return recorded


def _replay(app: WSGIApplication, log_path: Path) -> tuple[int, int]:
    """Re-apply every recorded request to ``app`` in order; return (applied, failed) counts."""
    from werkzeug.test import EnvironBuilder

    upload_ids: dict[str, str] = {}
    applied = failed = 0
    with log_path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            try:
                entry = json.loads(line)
                recorded = dict(entry["environ"])
                body = base64.b64decode(entry["body"])
            except (ValueError, KeyError, TypeError):
                print(f"s3 replay: skipping unreadable line {number} (torn write?)", file=sys.stderr)
                continue
            for key in ("QUERY_STRING", "RAW_URI", "REQUEST_URI"):
                recorded[key] = _UPLOAD_ID_PARAM_RE.sub(
                    lambda match: "uploadId=" + upload_ids.get(match.group(1), match.group(1)), recorded[key]
                )
            environ = EnvironBuilder(method=recorded["REQUEST_METHOD"]).get_environ()
            environ.update(recorded)
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = str(len(body))
            status, content = _call_wsgi(app, environ)
            if status[:1] != "2":
                failed += 1
                print(f"s3 replay: line {number} answered {status}", file=sys.stderr)
                continue
            applied += 1
            if (old_id := entry.get("upload_id")) and (match := _UPLOAD_ID_RE.search(content)):
                upload_ids[old_id] = match.group(1).decode()
    return applied, failed


def _call_wsgi(app: WSGIApplication, environ: WSGIEnvironment) -> tuple[str, bytes]:
    status = ""

    def start_response(status_line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        nonlocal status
        status = status_line
        return lambda data: None

    result = app(environ, start_response)
    try:
        content = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    return status, content


def serve_persistent_s3(*, host: str, port: int, data_dir: Path) -> None:
    """Run moto's server with the mutation log of ``data_dir``: replay it, then serve until SIGTERM.

    The port is bound before the replay (so a clash fails early) but answered only after it.
    """
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    log_dir = data_dir / "s3"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "mutations.jsonl"
    moto_app = DomainDispatcherApplication(create_backend_app)
    mutation_log = _MutationLog(moto_app, log_path)
    server = make_server(host, port, mutation_log, threaded=True, request_handler=MotoRequestHandler)
    started = time.monotonic()
    applied, failed = _replay(moto_app, log_path)  # straight to moto: replayed requests are not logged again
    elapsed = time.monotonic() - started
    print(f"s3 replay: {applied} requests applied, {failed} failed in {elapsed:.2f}s", file=sys.stderr)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    print(f"s3: serving http://{host}:{port} (mutation log {log_path})", file=sys.stderr, flush=True)
    try:
        server.serve_forever()  # returns on KeyboardInterrupt
    finally:
        mutation_log.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gateway.dev s3-server --port P --data-dir D``: the child process of :func:`start_s3`."""
    parser = argparse.ArgumentParser(prog="python -m gateway.dev")
    commands = parser.add_subparsers(dest="command", required=True)
    s3 = commands.add_parser("s3-server", help="moto S3 with a persistent mutation log")
    s3.add_argument("--host", default="127.0.0.1")
    s3.add_argument("--port", type=int, required=True)
    s3.add_argument("--data-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    serve_persistent_s3(host=args.host, port=args.port, data_dir=args.data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
