"""Artifacts served by the gateway itself: every path is checked and owned before any storage call.

The gateways here get a :class:`RecordingStore` (an in-memory ``ArtifactStore`` that records every
call), so each attack asserts both the refusal and that storage was never touched; malformed paths
must not even cause an ownership look-up upstream. The last tests use the real ``ArtifactStore``
against moto's in-process S3 (``mock_aws``) to show that a client disconnecting in the middle of an
upload aborts the S3 multipart upload, so no partial object is ever left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import posixpath
import socket
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import boto3
import httpx
import pytest
from moto import mock_aws

from gateway.app import create_app
from gateway.artifacts.s3 import ArtifactStore, Download, FileEntry, guess_content_type
from gateway.errors import NotFound
from tests.app.conftest import (
    ACME,
    AJAX,
    API,
    GLOBEX,
    USER_AGENT,
    FakeUpstream,
    GatewayUnderTest,
    RawResponse,
    Reply,
    ServerThread,
    assert_mlflow_error,
)
from tests.factories import bearer, make_settings, token

ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
AJAX_ARTIFACTS = "/ajax-api/2.0/mlflow-artifacts/artifacts"
MPU = "/api/2.0/mlflow-artifacts/mpu"
PRESIGNED = "/api/2.0/mlflow-artifacts/presigned"
VIEWER = bearer("acme", "vera", roles=["viewer"])


# -- a store that records every call -------------------------------------------------------------------


class RecordingStore(ArtifactStore):
    """An in-memory ``ArtifactStore``: objects by artifact path, every public call recorded in order.

    No boto3 client exists, so any code path that reached real S3 would fail loudly.
    """

    def __init__(self) -> None:  # no super().__init__: no boto3 clients
        self.bucket, self.prefix = "bucket", "artifacts"
        self.presign_ttl_seconds = 300
        self.part_size = 8 * 1024 * 1024
        self.calls: list[tuple[Any, ...]] = []
        self.objects: dict[str, tuple[bytes, str]] = {}
        self.multipart: dict[str, str] = {}  # upload id -> artifact path

    def reset(self) -> None:
        self.calls.clear()
        self.objects.clear()
        self.multipart.clear()

    def put(self, path: str, data: bytes, content_type: str | None = None) -> None:
        """Store an object without recording a call (test set-up)."""
        self.objects[path] = (data, content_type or guess_content_type(path))

    def names(self) -> list[str]:
        """The recorded call names, in order."""
        return [call[0] for call in self.calls]

    async def _call(self, function: Callable[..., Any], /, **kwargs: Any) -> Any:
        raise AssertionError("RecordingStore never calls boto3")

    async def open(self, path: str) -> Download:
        self.calls.append(("open", path))
        if path not in self.objects:
            raise NotFound("Artifact does not exist")
        data, content_type = self.objects[path]

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(data), 1000):
                yield data[start : start + 1000]

        return Download(size=len(data), content_type=content_type, chunks=chunks())

    async def size(self, path: str) -> int:
        self.calls.append(("size", path))
        if path not in self.objects:
            raise NotFound("Artifact does not exist")
        return len(self.objects[path][0])

    async def list_dir(self, path: str) -> list[FileEntry]:
        self.calls.append(("list_dir", path))
        prefix = path.rstrip("/") + "/"
        entries: dict[str, FileEntry] = {}
        for name, (data, _) in self.objects.items():
            if name.startswith(prefix):
                first, _, rest = name[len(prefix) :].partition("/")
                entries[first] = FileEntry(first, True) if rest else FileEntry(first, False, len(data))
        return sorted(entries.values(), key=lambda entry: entry.path)

    async def upload(self, path: str, chunks: AsyncIterator[bytes], *, content_type: str) -> int:
        self.calls.append(("upload", path, content_type))
        data = b"".join([chunk async for chunk in chunks])
        self.objects[path] = (data, content_type)
        return len(data)

    async def delete(self, path: str) -> None:
        self.calls.append(("delete", path))
        for name in list(self.objects):
            if name == path or name.startswith(path + "/"):
                del self.objects[name]

    def presign(self, method: str, path: str, **params: Any) -> str:
        self.calls.append(("presign", method, path))
        return f"https://s3.example.test/{self.key(path)}?op={method}&signed=1"

    async def create_multipart(self, path: str, num_parts: int, *, content_type: str) -> dict[str, Any]:
        self.calls.append(("create_multipart", path, num_parts))
        upload_id = uuid.uuid4().hex
        self.multipart[upload_id] = path
        credentials = [{"url": f"https://s3.example.test/{n}", "part_number": n, "headers": {}} for n in (1,)]
        return {"upload_id": upload_id, "credentials": credentials}

    async def require_upload(self, path: str, upload_id: str) -> None:
        self.calls.append(("require_upload", path, upload_id))
        if self.multipart.get(upload_id) != path:
            raise NotFound("Multipart upload does not exist")

    async def complete_multipart(self, path: str, upload_id: str, parts: list[dict[str, Any]]) -> None:
        self.calls.append(("complete_multipart", path, upload_id, parts))
        del self.multipart[upload_id]

    async def abort_multipart(self, path: str, upload_id: str) -> None:
        self.calls.append(("abort_multipart", path, upload_id))
        del self.multipart[upload_id]


@dataclass
class ArtifactGateway:
    """A running gateway with its recording store."""

    handle: GatewayUnderTest
    store: RecordingStore

    @property
    def client(self) -> httpx.Client:
        return self.handle.client

    def raw(self, method: str, target: str, **kwargs: Any) -> RawResponse:
        return self.handle.raw(method, target, **kwargs)


def _serve(app: Any) -> GatewayUnderTest:
    server = ServerThread(app).start()
    return GatewayUnderTest(server, httpx.Client(base_url=server.url, timeout=10, headers={"User-Agent": USER_AGENT}))


@contextlib.contextmanager
def _artifact_gateway(fake: FakeUpstream, mode: str, **settings: Any) -> Iterator[ArtifactGateway]:
    store = RecordingStore()
    handle = _serve(
        create_app(make_settings(upstream_url=fake.url, artifacts_mode=mode, **settings), artifact_store=store)
    )
    try:
        yield ArtifactGateway(handle, store)
    finally:
        handle.client.close()
        handle.server.stop()


@pytest.fixture(scope="module")
def _proxy_gateway(fake_upstream: FakeUpstream) -> Iterator[ArtifactGateway]:
    with _artifact_gateway(fake_upstream, "proxy") as gateway:
        yield gateway


@pytest.fixture(scope="module")
def _presigned_gateway(fake_upstream: FakeUpstream) -> Iterator[ArtifactGateway]:
    with _artifact_gateway(fake_upstream, "presigned") as gateway:
        yield gateway


@pytest.fixture
def proxy(_proxy_gateway: ArtifactGateway, fake: FakeUpstream) -> Iterator[ArtifactGateway]:
    """The proxy-mode gateway, its store emptied and the upstream reset."""
    _proxy_gateway.store.reset()
    yield _proxy_gateway
    _proxy_gateway.store.reset()


@pytest.fixture
def presigned(_presigned_gateway: ArtifactGateway, fake: FakeUpstream) -> Iterator[ArtifactGateway]:
    """The presigned-mode gateway, its store emptied and the upstream reset."""
    _presigned_gateway.store.reset()
    yield _presigned_gateway
    _presigned_gateway.store.reset()


@dataclass(frozen=True)
class World:
    """acme's experiment with a run, a logged model and a trace; globex's the same; acme's second experiment."""

    exp: str
    run: str
    model: str
    trace: str
    exp2: str
    run2: str
    foreign_exp: str
    foreign_run: str
    foreign_model: str
    foreign_trace: str

    @property
    def run_root(self) -> str:
        return f"{self.exp}/{self.run}/artifacts"

    @property
    def foreign_root(self) -> str:
        return f"{self.foreign_exp}/{self.foreign_run}/artifacts"


def _add_trace(fake: FakeUpstream, experiment_id: str) -> str:
    trace_id = f"tr-{uuid.uuid4().hex}"
    location = {"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": experiment_id}}
    body = {"trace": {"trace_info": {"trace_id": trace_id, "trace_location": location}}}
    fake.on("GET", f"/api/3.0/mlflow/traces/{trace_id}", Reply(200, body))
    return trace_id


@pytest.fixture
def world(fake: FakeUpstream) -> World:
    exp = fake.add_experiment("acme", f"art-{uuid.uuid4().hex[:6]}")
    exp2 = fake.add_experiment("acme", f"art2-{uuid.uuid4().hex[:6]}")
    foreign_exp = fake.add_experiment("globex", f"victim-{uuid.uuid4().hex[:6]}")
    return World(
        exp=exp,
        run=fake.add_run(exp),
        model=fake.add_logged_model(exp),
        trace=_add_trace(fake, exp),
        exp2=exp2,
        run2=fake.add_run(exp2),
        foreign_exp=foreign_exp,
        foreign_run=fake.add_run(foreign_exp),
        foreign_model=fake.add_logged_model(foreign_exp),
        foreign_trace=_add_trace(fake, foreign_exp),
    )


def _missing_experiment(fake: FakeUpstream) -> str:
    return fake.new_experiment_id()  # never stored


def assert_refused_untouched(
    response: httpx.Response | RawResponse,
    status: int,
    error_code: str,
    store: RecordingStore,
    fake: FakeUpstream,
    *,
    message: str | None = None,
    lookups: bool = True,
) -> None:
    """The refusal, and no storage call; nothing forwarded upstream; no look-up unless allowed."""
    assert_mlflow_error(response, status, error_code, message)
    assert store.calls == [], store.calls
    assert fake.forwarded() == [], [(r.method, r.path) for r in fake.forwarded()]
    if not lookups:
        assert fake.lookups() == [], [(r.method, r.path) for r in fake.lookups()]


# -- the happy paths (so that every refusal below can fail) ----------------------------------------------


def test_upload_download_list_delete_own_run(proxy: ArtifactGateway, world: World, fake: FakeUpstream) -> None:
    path = f"{world.run_root}/dir/model.pkl"
    response = proxy.client.put(
        f"{ARTIFACTS}/{path}", content=b"pickled", headers={**ACME, "Content-Type": "application/x-test"}
    )
    assert response.status_code == 200, response.text
    assert response.json() == {}
    assert proxy.store.calls == [("upload", path, "application/x-test")]
    assert proxy.store.objects[path] == (b"pickled", "application/x-test")

    response = proxy.client.get(f"{ARTIFACTS}/{path}", headers=ACME)
    assert response.status_code == 200
    assert response.content == b"pickled"
    assert response.headers["content-length"] == "7"

    response = proxy.client.get(ARTIFACTS, params={"path": world.run_root}, headers=ACME)
    assert response.json() == {"files": [{"path": "dir", "is_dir": True}]}
    response = proxy.client.get(ARTIFACTS, params={"path": f"{world.run_root}/dir"}, headers=ACME)
    assert response.json() == {"files": [{"path": "model.pkl", "is_dir": False, "file_size": 7}]}
    response = proxy.client.get(ARTIFACTS, params={"path": f"{world.run_root}/nothing"}, headers=ACME)
    assert response.json() == {}

    response = proxy.client.delete(f"{ARTIFACTS}/{world.run_root}/dir", headers=ACME)
    assert response.status_code == 200
    assert proxy.store.objects == {}
    assert proxy.store.names() == ["upload", "open", "list_dir", "list_dir", "list_dir", "delete"]
    assert fake.forwarded() == []  # artifact bytes never go through MLflow


def test_ajax_twin_and_model_and_trace_artifacts(proxy: ArtifactGateway, world: World) -> None:
    for path in (
        f"{world.exp}/models/{world.model}/artifacts/MLmodel",
        f"{world.exp}/traces/{world.trace}/artifacts/traces.json",
    ):
        response = proxy.client.put(f"{AJAX_ARTIFACTS}/{path}", content=b"{}", headers=ACME)
        assert response.status_code == 200, response.text
        assert proxy.client.get(f"{ARTIFACTS}/{path}", headers=ACME).content == b"{}"
    response = proxy.client.get(
        f"{AJAX}/logged-models/{world.model}/artifacts/files", params={"artifact_file_path": "MLmodel"}, headers=ACME
    )
    assert response.status_code == 200
    assert response.content == b"{}"


def test_experiment_directory_listing(proxy: ArtifactGateway, world: World) -> None:
    proxy.store.put(f"{world.run_root}/a.txt", b"a")
    response = proxy.client.get(ARTIFACTS, params={"path": world.exp}, headers=ACME)
    assert response.status_code == 200
    assert response.json() == {"files": [{"path": world.run, "is_dir": True}]}
    assert proxy.store.calls == [("list_dir", world.exp)]


def test_tracking_api_list_and_get_artifact(proxy: ArtifactGateway, world: World) -> None:
    proxy.store.put(f"{world.run_root}/sub/x.txt", b"xx")
    proxy.store.put(f"{world.run_root}/top.txt", b"t")
    response = proxy.client.get(f"{API}/artifacts/list", params={"run_id": world.run}, headers=ACME)
    assert response.json() == {
        "root_uri": f"mlflow-artifacts:/{world.run_root}",
        "files": [{"path": "sub", "is_dir": True}, {"path": "top.txt", "is_dir": False, "file_size": 1}],
    }
    response = proxy.client.get(f"{API}/artifacts/list", params={"run_id": world.run, "path": "sub"}, headers=ACME)
    assert response.json()["files"] == [{"path": "sub/x.txt", "is_dir": False, "file_size": 2}]
    response = proxy.client.get("/get-artifact", params={"run_uuid": world.run, "path": "sub/x.txt"}, headers=ACME)
    assert response.status_code == 200
    assert response.content == b"xx"


def test_ui_upload(proxy: ArtifactGateway, world: World) -> None:
    response = proxy.client.post(
        "/ajax-api/2.0/mlflow/upload-artifact",
        params={"run_uuid": world.run, "path": "notes/a.txt"},
        content=b"note",
        headers=ACME,
    )
    assert response.status_code == 200, response.text
    assert proxy.store.objects[f"{world.run_root}/notes/a.txt"][0] == b"note"


# -- traversal and ambiguous paths: 400 before any look-up or storage call ----------------------------------

TRAVERSALS = [
    "../../../etc/passwd",
    "..",
    "%2e%2e/%2e%2e/x",
    "%2E%2E",
    "%2e",
    "%252e%252e/x",
    "%252e%252e%252f%252e%252e%252fx",
    "..%5cx",
    "..%5C..%5Cx",
    "a%2Fb",
    "%2Fabsolute",
    "./x",
    "x/./y",
    "a//b",
    "x%00y",
    "x%0ay",
    "x%23frag",
    "x%3Fq=1",
    "x%2541",
]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
@pytest.mark.parametrize("suffix", TRAVERSALS)
def test_traversal_in_artifact_paths_is_refused_before_any_call(
    proxy: ArtifactGateway, world: World, fake: FakeUpstream, method: str, suffix: str
) -> None:
    target = f"{ARTIFACTS}/{world.run_root}/{suffix}"
    response = proxy.raw(method, target, headers=ACME, body=b"evil" if method == "PUT" else b"")
    assert_refused_untouched(response, 400, "INVALID_PARAMETER_VALUE", proxy.store, fake, lookups=False)


@pytest.mark.parametrize(
    "target",
    [
        "{artifacts}/../{exp}/{run}/artifacts/x",
        "{artifacts}/%2e%2e/{exp}/{run}/artifacts/x",
        "{artifacts}/{exp}/{run}/artifacts/../../../{foreign}/x",
        "{artifacts}/{exp}/%2e%2e/{foreign}/x",
        "{artifacts}/{exp}%2F{run}/artifacts/x",
        "{artifacts}/{exp}%252F{run}/artifacts/x",
        "{artifacts}//{exp}/{run}/artifacts/x",
        "{artifacts}/./{exp}/{run}/artifacts/x",
        "{artifacts}/{enc_exp}/{run}/artifacts/x",
        "{artifacts}/{exp}/{run}%2Fartifacts/x",
        "{artifacts}/{exp}/{run}/artifacts%5cx",
    ],
)
def test_traversal_above_the_run_is_refused(
    proxy: ArtifactGateway, world: World, fake: FakeUpstream, target: str
) -> None:
    target = target.format(
        artifacts=ARTIFACTS,
        exp=world.exp,
        run=world.run,
        foreign=world.foreign_exp,
        enc_exp="".join(f"%25{ord(c):02X}" for c in world.foreign_exp),
    )
    for method in ("GET", "PUT", "DELETE"):
        response = proxy.raw(method, target, headers=ACME, body=b"x" if method == "PUT" else b"")
        assert_refused_untouched(response, 400, "INVALID_PARAMETER_VALUE", proxy.store, fake, lookups=False)


@pytest.mark.parametrize(
    "query",
    [
        "path=..",
        "path=%2e%2e",
        "path={exp}/..",
        "path={exp}/%2e%2e/{foreign}",
        "path={exp}%2F..%2F{foreign}",
        "path={exp}%252F{run}",
        "path=%25{hex_exp}",
        "path=/{exp}",
        "path=%2F{exp}",
        "path={exp}//{run}",
        "path={exp}/./{run}",
        "path={exp}%5c{run}",
        "path={exp}%00",
        "path={exp}%23",
        "path={exp}%3F",
        "path={exp}&path={exp}",
    ],
)
def test_listing_query_path_escapes_are_refused(
    proxy: ArtifactGateway, world: World, fake: FakeUpstream, query: str
) -> None:
    query = query.format(exp=world.exp, run=world.run, foreign=world.foreign_exp, hex_exp=f"{ord(world.exp[0]):02X}")
    response = proxy.raw("GET", f"{ARTIFACTS}?{query}", headers=ACME)
    assert_refused_untouched(response, 400, "INVALID_PARAMETER_VALUE", proxy.store, fake, lookups=False)


@pytest.mark.parametrize("query", ["", "?", "?path=", "?path", "?other=1"])
def test_root_listing_is_refused(proxy: ArtifactGateway, fake: FakeUpstream, query: str) -> None:
    proxy.store.put("1/x", b"root-level")
    response = proxy.raw("GET", f"{ARTIFACTS}{query}", headers=ACME)
    assert_refused_untouched(response, 403, "PERMISSION_DENIED", proxy.store, fake, lookups=False)


@pytest.mark.parametrize(
    ("route", "params"),
    [
        ("/get-artifact", {"path": "../../{foreign_exp}/{foreign_run}/artifacts/x"}),
        ("/get-artifact", {"path": "a/../../x"}),
        ("/get-artifact", {"path": "/etc/passwd"}),
        ("/get-artifact", {"path": "a%2Fb"}),
        ("/get-artifact", {"path": "a\\b"}),
        (f"{API}/artifacts/list", {"path": ".."}),
        (f"{API}/artifacts/list", {"path": "../../{foreign_run}"}),
        (f"{API}/artifacts/list", {"path": "a//b"}),
        (f"{API}/artifacts/list", {"path": "%2e%2e"}),
    ],
)
def test_run_relative_paths_cannot_leave_the_run(
    proxy: ArtifactGateway, world: World, fake: FakeUpstream, route: str, params: dict[str, str]
) -> None:
    filled = {key: value.format(**vars(world)) for key, value in params.items()}
    response = proxy.client.get(route, params={"run_id": world.run, **filled}, headers=ACME)
    assert_refused_untouched(response, 400, "INVALID_PARAMETER_VALUE", proxy.store, fake)


@pytest.mark.parametrize("relative", ["../x", "..", "a/../../b", "/abs", "a%2Fb", "./x"])
def test_logged_model_file_path_cannot_leave_the_model(
    proxy: ArtifactGateway, world: World, fake: FakeUpstream, relative: str
) -> None:
    response = proxy.client.get(
        f"{AJAX}/logged-models/{world.model}/artifacts/files", params={"artifact_file_path": relative}, headers=ACME
    )
    assert_refused_untouched(response, 400, "INVALID_PARAMETER_VALUE", proxy.store, fake)


# -- other tenants' objects: exactly like missing ones, and no storage call ----------------------------------


@pytest.mark.parametrize(
    ("method", "make"),
    [
        ("GET", lambda w: f"{ARTIFACTS}/{w.foreign_root}/secret.txt"),
        ("PUT", lambda w: f"{ARTIFACTS}/{w.foreign_root}/planted.txt"),
        ("DELETE", lambda w: f"{ARTIFACTS}/{w.foreign_root}/secret.txt"),
        ("DELETE", lambda w: f"{ARTIFACTS}/{w.foreign_root}/dir"),
        ("GET", lambda w: f"{ARTIFACTS}/{w.foreign_exp}/models/{w.foreign_model}/artifacts/MLmodel"),
        ("PUT", lambda w: f"{ARTIFACTS}/{w.foreign_exp}/models/{w.foreign_model}/artifacts/MLmodel"),
        ("GET", lambda w: f"{ARTIFACTS}/{w.foreign_exp}/traces/{w.foreign_trace}/artifacts/traces.json"),
        ("PUT", lambda w: f"{ARTIFACTS}/{w.foreign_exp}/traces/{w.foreign_trace}/artifacts/traces.json"),
        ("GET", lambda w: f"{ARTIFACTS}?path={w.foreign_exp}"),
        ("GET", lambda w: f"{ARTIFACTS}?path={w.foreign_root}"),
        ("GET", lambda w: f"{ARTIFACTS}?path={w.foreign_exp}/{w.foreign_run}"),
        ("GET", lambda w: f"{ARTIFACTS}?path={w.foreign_exp}/models/{w.foreign_model}/artifacts"),
    ],
)
def test_foreign_experiment_is_missing(
    proxy: ArtifactGateway, world: World, fake: FakeUpstream, method: str, make: Callable[[World], str]
) -> None:
    proxy.store.put(f"{world.foreign_root}/secret.txt", b"globex only")
    proxy.store.put(f"{world.foreign_root}/dir/a", b"globex only")
    snapshot = dict(proxy.store.objects)
    target = make(world)
    response = proxy.raw(method, target, headers=ACME, body=b"planted" if method == "PUT" else b"")
    expected = f"No Experiment with id={world.foreign_exp} exists"
    assert_refused_untouched(response, 404, "RESOURCE_DOES_NOT_EXIST", proxy.store, fake, message=expected)
    assert proxy.store.objects == snapshot
    # ... exactly what a never-created experiment id gets
    missing = _missing_experiment(fake)
    body = b"x" if method == "PUT" else b""
    response = proxy.raw(method, target.replace(world.foreign_exp, missing), headers=ACME, body=body)
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", f"No Experiment with id={missing} exists")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
@pytest.mark.parametrize("kind", ["run", "model", "trace"])
def test_own_object_under_another_tenants_experiment_is_missing(
    proxy: ArtifactGateway, world: World, fake: FakeUpstream, method: str, kind: str
) -> None:
    owner = {
        "run": world.run,
        "model": f"models/{world.model}",
        "trace": f"traces/{world.trace}",
    }[kind]
    target = f"{ARTIFACTS}/{world.foreign_exp}/{owner}/artifacts/planted.txt"
    response = proxy.raw(method, target, headers=ACME, body=b"x" if method == "PUT" else b"")
    expected = f"No Experiment with id={world.foreign_exp} exists"
    assert_refused_untouched(response, 404, "RESOURCE_DOES_NOT_EXIST", proxy.store, fake, message=expected)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_own_run_under_own_other_experiment_is_missing(
    proxy: ArtifactGateway, world: World, fake: FakeUpstream, method: str
) -> None:
    # Both experiments are acme's, but the run lives in the other one: its keys are not under exp2.
    target = f"{ARTIFACTS}/{world.exp2}/{world.run}/artifacts/x.txt"
    response = proxy.raw(method, target, headers=ACME, body=b"x" if method == "PUT" else b"")
    assert_refused_untouched(response, 404, "RESOURCE_DOES_NOT_EXIST", proxy.store, fake)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("run", "Run with id={} not found"),
        ("model", "Logged model with ID '{}' not found."),
        ("trace", "Trace with ID '{}' not found."),
    ],
)
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_foreign_object_under_own_experiment_is_missing(
    proxy: ArtifactGateway, world: World, fake: FakeUpstream, kind: str, message: str, method: str
) -> None:
    foreign, missing = {
        "run": (world.foreign_run, uuid.uuid4().hex),
        "model": (world.foreign_model, f"m-{uuid.uuid4().hex}"),
        "trace": (world.foreign_trace, f"tr-{uuid.uuid4().hex}"),
    }[kind]
    if kind == "trace":
        fake.on("GET", f"/api/3.0/mlflow/traces/{missing}", Reply(404, {"error_code": "RESOURCE_DOES_NOT_EXIST"}))
    segment = {"run": "{}", "model": "models/{}", "trace": "traces/{}"}[kind]
    body = b"planted" if method == "PUT" else b""
    for object_id in (foreign, missing):
        target = f"{ARTIFACTS}/{world.exp}/{segment.format(object_id)}/artifacts/x.txt"
        response = proxy.raw(method, target, headers=ACME, body=body)
        assert_refused_untouched(
            response, 404, "RESOURCE_DOES_NOT_EXIST", proxy.store, fake, message=message.format(object_id)
        )


@pytest.mark.parametrize(
    ("route", "params"),
    [
        (f"{API}/artifacts/list", {"run_id": "{foreign_run}"}),
        (f"{API}/artifacts/list", {"run_id": "{foreign_run}", "path": "sub"}),
        ("/get-artifact", {"run_id": "{foreign_run}", "path": "secret.txt"}),
        ("/get-artifact", {"run_uuid": "{foreign_run}", "path": "secret.txt"}),
    ],
)
def test_tracking_api_routes_with_foreign_run(
    proxy: ArtifactGateway, world: World, fake: FakeUpstream, route: str, params: dict[str, str]
) -> None:
    proxy.store.put(f"{world.foreign_root}/secret.txt", b"globex only")
    filled = {key: value.format(**vars(world)) for key, value in params.items()}
    response = proxy.client.get(route, params=filled, headers=ACME)
    expected = f"Run with id={world.foreign_run} not found"
    assert_refused_untouched(response, 404, "RESOURCE_DOES_NOT_EXIST", proxy.store, fake, message=expected)


def test_conflicting_run_ids_are_refused(proxy: ArtifactGateway, world: World, fake: FakeUpstream) -> None:
    response = proxy.client.get(
        "/get-artifact", params={"run_id": world.run, "run_uuid": world.foreign_run, "path": "x"}, headers=ACME
    )
    assert_refused_untouched(response, 400, "INVALID_PARAMETER_VALUE", proxy.store, fake, lookups=False)


def test_foreign_logged_model_file(proxy: ArtifactGateway, world: World, fake: FakeUpstream) -> None:
    response = proxy.client.get(
        f"{AJAX}/logged-models/{world.foreign_model}/artifacts/files",
        params={"artifact_file_path": "MLmodel"},
        headers=ACME,
    )
    expected = f"Logged model with ID '{world.foreign_model}' not found."
    assert_refused_untouched(response, 404, "RESOURCE_DOES_NOT_EXIST", proxy.store, fake, message=expected)


def test_ui_upload_to_foreign_run(proxy: ArtifactGateway, world: World, fake: FakeUpstream) -> None:
    response = proxy.client.post(
        "/ajax-api/2.0/mlflow/upload-artifact",
        params={"run_uuid": world.foreign_run, "path": "planted.txt"},
        content=b"x",
        headers=ACME,
    )
    expected = f"Run with id={world.foreign_run} not found"
    assert_refused_untouched(response, 404, "RESOURCE_DOES_NOT_EXIST", proxy.store, fake, message=expected)


@pytest.mark.parametrize("path", ["", "..", "../x", "a/../../x", "/abs"])
def test_ui_upload_paths(proxy: ArtifactGateway, world: World, fake: FakeUpstream, path: str) -> None:
    response = proxy.client.post(
        "/ajax-api/2.0/mlflow/upload-artifact", params={"run_uuid": world.run, "path": path}, content=b"x", headers=ACME
    )
    assert_refused_untouched(response, 400, "INVALID_PARAMETER_VALUE", proxy.store, fake)


def test_ui_upload_is_limited_like_mlflow(proxy: ArtifactGateway, world: World) -> None:
    response = proxy.client.post(
        "/ajax-api/2.0/mlflow/upload-artifact",
        params={"run_uuid": world.run, "path": "big.bin"},
        content=b"\0" * (10 * 1024 * 1024 + 1),
        headers=ACME,
    )
    assert_mlflow_error(response, 413, "REQUEST_LIMIT_EXCEEDED")
    assert f"{world.run_root}/big.bin" not in proxy.store.objects


# -- writes only inside an artifacts directory ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "make", "status"),
    [
        ("PUT", lambda w: w.exp, 400),
        ("PUT", lambda w: f"{w.exp}/{w.run}", 400),
        ("PUT", lambda w: f"{w.exp}/{w.run}/artifacts", 400),
        ("PUT", lambda w: f"{w.exp}/{w.run}/artifacts/", 400),
        ("PUT", lambda w: f"{w.exp}/models/{w.model}", 400),
        ("PUT", lambda w: f"{w.exp}/{w.run}/meta.yaml", 404),
        ("PUT", lambda w: f"{w.exp}/{w.run}/metrics/loss", 404),
        ("PUT", lambda w: f"{w.exp}/models/{w.model}/meta.yaml", 404),
        ("PUT", lambda w: f"{w.exp}/traces/{w.trace}/x.json", 404),
        ("PUT", lambda w: f"{w.exp}/x.txt", 404),
        ("DELETE", lambda w: w.exp, 400),
        ("DELETE", lambda w: f"{w.exp}/{w.run}", 400),
        ("DELETE", lambda w: f"{w.exp}/{w.run}/artifacts", 400),
        ("DELETE", lambda w: f"{w.exp}/models/{w.model}/artifacts", 400),
        ("DELETE", lambda w: f"{w.exp}/{w.run}/meta.yaml", 404),
    ],
)
def test_writes_outside_artifacts_are_refused(
    proxy: ArtifactGateway, world: World, fake: FakeUpstream, method: str, make: Callable[[World], str], status: int
) -> None:
    proxy.store.put(f"{world.run_root}/keep.txt", b"keep")
    response = proxy.raw(method, f"{ARTIFACTS}/{make(world)}", headers=ACME, body=b"x" if method == "PUT" else b"")
    code = "INVALID_PARAMETER_VALUE" if status == 400 else "RESOURCE_DOES_NOT_EXIST"
    assert_refused_untouched(response, status, code, proxy.store, fake)
    assert list(proxy.store.objects) == [f"{world.run_root}/keep.txt"]


# -- roles -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "make"),
    [
        ("PUT", lambda w: f"{ARTIFACTS}/{w.run_root}/x.txt"),
        ("DELETE", lambda w: f"{ARTIFACTS}/{w.run_root}/x.txt"),
        ("POST", lambda w: f"/ajax-api/2.0/mlflow/upload-artifact?run_uuid={w.run}&path=x.txt"),
    ],
)
def test_viewer_cannot_write(
    proxy: ArtifactGateway, world: World, fake: FakeUpstream, method: str, make: Callable[[World], str]
) -> None:
    proxy.store.put(f"{world.run_root}/x.txt", b"keep")
    response = proxy.raw(method, make(world), headers=VIEWER, body=b"overwrite" if method != "DELETE" else b"")
    assert_refused_untouched(response, 403, "PERMISSION_DENIED", proxy.store, fake, lookups=False)
    assert "'editor' role" in response.json()["message"]
    assert proxy.store.objects[f"{world.run_root}/x.txt"][0] == b"keep"


def test_viewer_reads(proxy: ArtifactGateway, world: World) -> None:
    proxy.store.put(f"{world.run_root}/x.txt", b"read me")
    assert proxy.client.get(f"{ARTIFACTS}/{world.run_root}/x.txt", headers=VIEWER).content == b"read me"
    response = proxy.client.get(ARTIFACTS, params={"path": world.run_root}, headers=VIEWER)
    assert response.json() == {"files": [{"path": "x.txt", "is_dir": False, "file_size": 7}]}


@pytest.mark.parametrize("action", ["create", "complete", "abort"])
def test_viewer_cannot_use_multipart(presigned: ArtifactGateway, world: World, fake: FakeUpstream, action: str) -> None:
    body = {"path": "a.bin", "num_parts": 1, "upload_id": "u", "parts": [{"part_number": 1, "etag": "e"}]}
    response = presigned.client.post(f"{MPU}/{action}/{world.run_root}", json=body, headers=VIEWER)
    assert_refused_untouched(response, 403, "PERMISSION_DENIED", presigned.store, fake, lookups=False)


def test_platform_admin_reads_any_tenant_but_never_writes(
    proxy: ArtifactGateway, world: World, fake: FakeUpstream
) -> None:
    admin = bearer("ops", "root", roles=["platform-admin"])
    proxy.store.put(f"{world.foreign_root}/secret.txt", b"globex")
    assert proxy.client.get(f"{ARTIFACTS}/{world.foreign_root}/secret.txt", headers=admin).content == b"globex"
    proxy.store.calls.clear()
    for method in ("PUT", "DELETE"):
        response = proxy.raw(
            method, f"{ARTIFACTS}/{world.foreign_root}/secret.txt", headers=admin, body=b"x" if method == "PUT" else b""
        )
        assert_refused_untouched(response, 403, "PERMISSION_DENIED", proxy.store, fake, lookups=False)
    assert proxy.store.objects[f"{world.foreign_root}/secret.txt"][0] == b"globex"


def test_unauthenticated_is_refused_before_storage(proxy: ArtifactGateway, world: World, fake: FakeUpstream) -> None:
    for method in ("GET", "PUT", "DELETE"):
        response = proxy.raw(method, f"{ARTIFACTS}/{world.run_root}/x.txt", body=b"x" if method == "PUT" else b"")
        assert_refused_untouched(response, 401, "UNAUTHENTICATED", proxy.store, fake, lookups=False)


# -- presigned access and multipart uploads ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "route", "body"),
    [
        ("GET", PRESIGNED + "/{root}/x.bin", None),
        ("POST", MPU + "/create/{root}", {"path": "x.bin", "num_parts": 1}),
        ("POST", MPU + "/complete/{root}", {"path": "x.bin", "upload_id": "u", "parts": [{"part_number": 1}]}),
        ("POST", MPU + "/abort/{root}", {"path": "x.bin", "upload_id": "u"}),
    ],
)  # fmt: skip
def test_presigned_routes_are_refused_in_proxy_mode(
    proxy: ArtifactGateway, world: World, fake: FakeUpstream, method: str, route: str, body: dict[str, Any] | None
) -> None:
    proxy.store.put(f"{world.run_root}/x.bin", b"x")
    response = proxy.client.request(method, route.format(root=world.run_root), json=body, headers=ACME)
    # MLflow's own "not supported" answers, which make the stock client fall back to proxied PUT/GET.
    if method == "GET":
        assert_refused_untouched(response, 404, "ENDPOINT_NOT_FOUND", proxy.store, fake, lookups=False)
        assert response.json()["message"].startswith("Multipart download is not supported")
    else:
        assert_refused_untouched(response, 400, "INVALID_PARAMETER_VALUE", proxy.store, fake, lookups=False)
        assert response.json()["message"].startswith("Multipart upload is not supported")
    assert "proxy mode" in response.json()["message"]


def test_presigned_download_signs_exactly_the_owned_key(presigned: ArtifactGateway, world: World) -> None:
    presigned.store.put(f"{world.run_root}/x.bin", b"12345")
    response = presigned.client.get(f"{PRESIGNED}/{world.run_root}/x.bin", headers=ACME)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "url": f"https://s3.example.test/artifacts/{world.run_root}/x.bin?op=get_object&signed=1",
        "headers": {},
        "file_size": 5,
    }
    assert presigned.store.calls == [
        ("size", f"{world.run_root}/x.bin"),
        ("presign", "get_object", f"{world.run_root}/x.bin"),
    ]


@pytest.mark.parametrize(
    "make",
    [
        lambda w: f"{PRESIGNED}/{w.foreign_root}/secret.txt",
        lambda w: f"{PRESIGNED}/{w.foreign_exp}/{w.run}/artifacts/secret.txt",
        lambda w: f"{PRESIGNED}/{w.exp}/{w.foreign_run}/artifacts/secret.txt",
    ],
)
def test_presigned_download_of_foreign_key(
    presigned: ArtifactGateway, world: World, fake: FakeUpstream, make: Callable[[World], str]
) -> None:
    presigned.store.put(f"{world.foreign_root}/secret.txt", b"globex")
    response = presigned.client.get(make(world), headers=ACME)
    assert_refused_untouched(response, 404, "RESOURCE_DOES_NOT_EXIST", presigned.store, fake)


@pytest.mark.parametrize("suffix", ["%2e%2e/x", "..%5cx", "%252e%252e/x", "x%23y", "x%3Fy"])
def test_presigned_download_traversal(
    presigned: ArtifactGateway, world: World, fake: FakeUpstream, suffix: str
) -> None:
    response = presigned.raw("GET", f"{PRESIGNED}/{world.run_root}/{suffix}", headers=ACME)
    assert_refused_untouched(response, 400, "INVALID_PARAMETER_VALUE", presigned.store, fake, lookups=False)


def test_multipart_round_trip_on_own_key(presigned: ArtifactGateway, world: World) -> None:
    directory = f"{MPU}/{{}}/{world.run_root}/sub"
    created = presigned.client.post(
        directory.format("create"), json={"path": "/home/me/data/a.bin", "num_parts": 1}, headers=ACME
    )
    assert created.status_code == 200, created.text
    upload_id = created.json()["upload_id"]
    key = f"{world.run_root}/sub/a.bin"  # MLflow uses the base name of the client's local path
    assert presigned.store.calls == [("create_multipart", key, 1)]
    parts = [{"part_number": 1, "etag": '"abc"'}]
    done = presigned.client.post(
        directory.format("complete"), json={"path": "a.bin", "upload_id": upload_id, "parts": parts}, headers=ACME
    )
    assert done.status_code == 200, done.text
    assert presigned.store.calls[1:] == [
        ("require_upload", key, upload_id),
        ("complete_multipart", key, upload_id, [{"PartNumber": 1, "ETag": '"abc"'}]),
    ]
    again = presigned.client.post(directory.format("create"), json={"path": "a.bin", "num_parts": 2}, headers=ACME)
    aborted = presigned.client.post(
        directory.format("abort"), json={"path": "a.bin", "upload_id": again.json()["upload_id"]}, headers=ACME
    )
    assert aborted.status_code == 200
    assert presigned.store.names()[-2:] == ["require_upload", "abort_multipart"]


@pytest.mark.parametrize("action", ["create", "complete", "abort"])
@pytest.mark.parametrize(
    "make",
    [
        lambda w: w.foreign_root,
        lambda w: f"{w.foreign_root}/sub",
        lambda w: f"{w.foreign_exp}/{w.run}/artifacts",  # own run, foreign experiment id
        lambda w: f"{w.exp}/{w.foreign_run}/artifacts",  # foreign run, own experiment id
        lambda w: f"{w.exp2}/{w.run}/artifacts",  # own run under own other experiment
        lambda w: f"{w.foreign_exp}/models/{w.foreign_model}/artifacts",
    ],
)
def test_multipart_with_foreign_paths(
    presigned: ArtifactGateway, world: World, fake: FakeUpstream, action: str, make: Callable[[World], str]
) -> None:
    body = {"path": "evil.bin", "num_parts": 1, "upload_id": "u-1", "parts": [{"part_number": 1, "etag": "e"}]}
    response = presigned.client.post(f"{MPU}/{action}/{make(world)}", json=body, headers=ACME)
    assert_refused_untouched(response, 404, "RESOURCE_DOES_NOT_EXIST", presigned.store, fake)


@pytest.mark.parametrize("action", ["create", "complete", "abort"])
@pytest.mark.parametrize(
    ("directory", "local", "status"),
    [
        ("{root}", "..", 400),
        ("{root}", "dir/..", 400),
        ("{root}", "dir/", 400),
        ("{root}", "", 400),
        ("{root}", "a#b", 400),
        ("{root}", "a?b", 400),
        ("{root}", "a%2Fb", 400),
        ("{exp}/{run}", "x.bin", 404),  # outside the artifacts directory
        ("{exp}", "x.bin", 404),
    ],
)
def test_multipart_target_must_be_one_file_in_an_artifacts_dir(
    presigned: ArtifactGateway,
    world: World,
    fake: FakeUpstream,
    action: str,
    directory: str,
    local: str,
    status: int,
) -> None:
    body = {"path": local, "num_parts": 1, "upload_id": "u-1", "parts": [{"part_number": 1, "etag": "e"}]}
    target = directory.format(root=world.run_root, exp=world.exp, run=world.run)
    response = presigned.client.post(f"{MPU}/{action}/{target}", json=body, headers=ACME)
    code = "INVALID_PARAMETER_VALUE" if status == 400 else "RESOURCE_DOES_NOT_EXIST"
    assert_refused_untouched(response, status, code, presigned.store, fake)


@pytest.mark.parametrize("suffix", ["%2e%2e", "..%5cx", "%252e%252e", "a%2Fb"])
@pytest.mark.parametrize("action", ["create", "complete", "abort"])
def test_multipart_directory_traversal(
    presigned: ArtifactGateway, world: World, fake: FakeUpstream, action: str, suffix: str
) -> None:
    body = b'{"path": "x.bin", "num_parts": 1, "upload_id": "u", "parts": [{"part_number": 1, "etag": "e"}]}'
    response = presigned.raw(
        "POST",
        f"{MPU}/{action}/{world.run_root}/{suffix}",
        headers={**ACME, "Content-Type": "application/json"},
        body=body,
    )
    assert_refused_untouched(response, 400, "INVALID_PARAMETER_VALUE", presigned.store, fake, lookups=False)


@pytest.mark.parametrize("action", ["complete", "abort"])
def test_upload_id_of_another_key_is_missing(presigned: ArtifactGateway, world: World, action: str) -> None:
    created = presigned.client.post(
        f"{MPU}/create/{world.run_root}", json={"path": "mine.bin", "num_parts": 1}, headers=ACME
    )
    upload_id = created.json()["upload_id"]
    body = {"path": "other.bin", "upload_id": upload_id, "parts": [{"part_number": 1, "etag": "e"}]}
    response = presigned.client.post(f"{MPU}/{action}/{world.run_root}", json=body, headers=ACME)
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST")
    assert presigned.store.names() == ["create_multipart", "require_upload"]
    assert upload_id in presigned.store.multipart


def test_upload_id_of_another_tenant_is_missing(presigned: ArtifactGateway, world: World, fake: FakeUpstream) -> None:
    created = presigned.client.post(
        f"{MPU}/create/{world.foreign_root}", json={"path": "theirs.bin", "num_parts": 1}, headers=GLOBEX
    )
    assert created.status_code == 200, created.text
    upload_id = created.json()["upload_id"]
    presigned.store.calls.clear()
    for action in ("complete", "abort"):
        body = {"path": "theirs.bin", "upload_id": upload_id, "parts": [{"part_number": 1, "etag": "e"}]}
        # on globex's key: refused by ownership before any storage call
        response = presigned.client.post(f"{MPU}/{action}/{world.foreign_root}", json=body, headers=ACME)
        assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST")
        # on acme's own key: the upload id does not belong to it
        response = presigned.client.post(f"{MPU}/{action}/{world.run_root}", json=body, headers=ACME)
        assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST")
    assert "complete_multipart" not in presigned.store.names()
    assert "abort_multipart" not in presigned.store.names()
    assert upload_id in presigned.store.multipart


@pytest.mark.parametrize(
    "body",
    [
        {"path": "x.bin", "num_parts": "many"},
        {"path": "x.bin", "num_parts": True},
        {"path": "x.bin", "num_parts": 1.5},
        {"num_parts": 1},
        {"path": 7, "num_parts": 1},
    ],
)
def test_multipart_create_validates_its_body(presigned: ArtifactGateway, world: World, body: dict[str, Any]) -> None:
    response = presigned.client.post(f"{MPU}/create/{world.run_root}", json=body, headers=ACME)
    assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    assert "complete_multipart" not in presigned.store.names()
    assert len(presigned.store.multipart) == 0


# -- server-info: the client is told the gateway's protocol ------------------------------------------------------

SERVER_INFO = {
    "store_type": "SqlStore",
    "workspaces_enabled": True,
    "trace_archival_enabled": False,
    "multipart_uploads_enabled": True,
    "multipart_downloads_enabled": True,
    "presigned_upload_run_id_supported": True,
    "presigned_upload_model_id_supported": True,
    "features_enabled": {"gateway": False},
}


@pytest.mark.parametrize("upstream_multipart", [True, False])
@pytest.mark.parametrize("prefix", ["/api/3.0", "/ajax-api/3.0"])
def test_server_info_advertises_the_gateways_protocol(
    proxy: ArtifactGateway,
    presigned: ArtifactGateway,
    client: httpx.Client,
    fake: FakeUpstream,
    upstream_multipart: bool,
    prefix: str,
) -> None:
    upstream = {**SERVER_INFO, "multipart_uploads_enabled": upstream_multipart}
    upstream["multipart_downloads_enabled"] = upstream_multipart
    fake.on("GET", f"{prefix}/mlflow/server-info", Reply(200, upstream))
    for gateway_client, multipart in ((proxy.client, False), (presigned.client, True), (client, False)):
        response = gateway_client.get(f"{prefix}/mlflow/server-info", headers=ACME)
        assert response.status_code == 200
        assert response.json() == {
            **SERVER_INFO,
            "workspaces_enabled": False,
            "multipart_uploads_enabled": multipart,
            "multipart_downloads_enabled": multipart,
        }
    assert proxy.store.calls == presigned.store.calls == []


def test_server_info_errors_pass_unchanged(proxy: ArtifactGateway, fake: FakeUpstream) -> None:
    fake.on("GET", "/api/3.0/mlflow/server-info", Reply(500, {"error_code": "INTERNAL_ERROR", "message": "boom"}))
    response = proxy.client.get("/api/3.0/mlflow/server-info", headers=ACME)
    assert "multipart_uploads_enabled" not in response.json()


# -- downloads cannot run in the gateway's origin --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("page.html", "text/html"),
        ("image.svg", "image/svg+xml"),
        ("x.js", "text/javascript"),
        ("naïve résumé.txt", "text/plain"),
        ('evil"; filename=x.exe', "application/octet-stream"),
    ],
)
def test_download_headers(proxy: ArtifactGateway, world: World, name: str, content_type: str) -> None:
    body = b"<script>alert(document.cookie)</script>"
    path = f"{world.run_root}/{name}"
    proxy.store.put(path, body, content_type)
    encoded = quote(name, safe="")
    targets = [
        f"{ARTIFACTS}/{world.run_root}/{encoded}",
        f"{AJAX_ARTIFACTS}/{world.run_root}/{encoded}",
        f"/get-artifact?run_id={world.run}&path={encoded}",
    ]
    for target in targets:
        response = proxy.client.get(target, headers=ACME)
        assert response.status_code == 200, (target, response.text)
        assert response.content == body
        assert response.headers["content-type"].startswith(content_type)
        disposition = response.headers["content-disposition"]
        assert disposition == f"attachment; filename*=UTF-8''{quote(posixpath.basename(name))}"
        assert ";" not in disposition.split("''", 1)[1]  # the name cannot add parameters
        assert response.headers["x-content-type-options"] == "nosniff"
        csp = response.headers["content-security-policy"]
        assert "sandbox" in csp and "default-src 'none'" in csp
        assert response.headers["cache-control"] == "private, no-store"


def test_model_file_download_headers(proxy: ArtifactGateway, world: World) -> None:
    proxy.store.put(f"{world.exp}/models/{world.model}/artifacts/x.html", b"<b>", "text/html")
    response = proxy.client.get(
        f"{AJAX}/logged-models/{world.model}/artifacts/files", params={"artifact_file_path": "x.html"}, headers=ACME
    )
    assert response.headers["content-disposition"].startswith("attachment")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in response.headers["content-security-policy"]


def test_missing_own_artifact(proxy: ArtifactGateway, world: World) -> None:
    response = proxy.client.get(f"{ARTIFACTS}/{world.run_root}/nope.txt", headers=ACME)
    assert_mlflow_error(response, 404, "RESOURCE_DOES_NOT_EXIST", "Artifact does not exist")


# -- the real ArtifactStore against moto's in-process S3: disconnects and limits abort the multipart upload -------

PART = 5 * 1024 * 1024  # S3's minimum part size


class SpyStore(ArtifactStore):
    """The real store, recording the name of every boto3 operation it calls once that call has returned.

    Recording on return (not on entry) lets a test wait for "abort_multipart_upload" and then check S3:
    the abort has then really happened, not merely started.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.operations: list[str] = []
        self.parts_sending = 0
        self.most_parts_sending = 0  # the most upload_part calls that were running at one time
        self.part_delay = 0.0  # seconds each upload_part takes longer (an S3 slower than the client)
        self.part_block = 0.0  # seconds each upload_part holds its worker thread before it runs
        self.threads: set[str] = set()  # names of the threads that ran S3 calls

    async def _call(self, function: Callable[..., Any], /, **kwargs: Any) -> Any:
        name = getattr(function, "__name__", repr(function))
        if name == "upload_part":
            self.parts_sending += 1
            self.most_parts_sending = max(self.most_parts_sending, self.parts_sending)
        block = self.part_block if name == "upload_part" else 0.0

        def in_thread(**arguments: Any) -> Any:
            self.threads.add(threading.current_thread().name)
            time.sleep(block)
            return function(**arguments)

        try:
            if name == "upload_part" and self.part_delay:
                await asyncio.sleep(self.part_delay)
            return await super()._call(in_thread, **kwargs)
        finally:
            self.parts_sending -= name == "upload_part"
            self.operations.append(name)


@dataclass
class S3Gateway:
    handle: GatewayUnderTest
    store: SpyStore
    s3: Any  # a boto3 client on the same (mocked) bucket

    def open_uploads(self) -> list[dict[str, Any]]:
        uploads: list[dict[str, Any]] = self.s3.list_multipart_uploads(Bucket="bucket").get("Uploads", [])
        return uploads

    def exists(self, path: str) -> bool:
        return "Contents" in self.s3.list_objects_v2(Bucket="bucket", Prefix=f"artifacts/{path}")


@pytest.fixture
def s3_gateway(fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., S3Gateway]]:
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    started: list[GatewayUnderTest] = []
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="bucket")

        def start(**settings: Any) -> S3Gateway:
            store = SpyStore("s3://bucket/artifacts", region="us-east-1", part_size=PART)
            app = create_app(make_settings(upstream_url=fake.url, **settings), artifact_store=store)
            handle = _serve(app)
            started.append(handle)
            return S3Gateway(handle, store, s3)

        try:
            yield start
        finally:
            for handle in started:
                handle.client.close()
                handle.server.stop()


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _partial_upload(port: int, target: str, *, declared: int, sent: int, reset: bool = True) -> None:
    """PUT with ``Content-Length: declared``, send ``sent`` bytes of it, then close the socket (RST or FIN)."""
    head = (
        f"PUT {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: {USER_AGENT}\r\n"
        f"Authorization: Bearer {token('acme', 'alice')}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        block = b"\xab" * 65536
        remaining = sent
        while remaining:
            remaining -= sock.send(block[: min(remaining, len(block))])
        time.sleep(1.0)  # let the gateway take in what was sent (and start parts)
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # moto's own datetime.utcnow
def test_large_upload_round_trip_through_real_store(
    s3_gateway: Callable[..., S3Gateway], world: World, fake: FakeUpstream
) -> None:
    gateway = s3_gateway()
    data = bytes(range(256)) * (12 * 1024 * 1024 // 256) + b"tail"
    path = f"{world.run_root}/big.bin"
    response = gateway.handle.client.put(f"{ARTIFACTS}/{path}", content=data, headers=ACME)
    assert response.status_code == 200, response.text
    ops = gateway.store.operations
    assert ops[0] == "create_multipart_upload" and ops[-1] == "complete_multipart_upload"
    assert ops.count("upload_part") == 3  # 5 + 5 + 2 MiB
    head = gateway.s3.head_object(Bucket="bucket", Key=f"artifacts/{path}")
    assert head["ContentLength"] == len(data)
    response = gateway.handle.client.get(f"{ARTIFACTS}/{path}", headers=ACME)
    assert response.content == data
    response = gateway.handle.client.put(f"{ARTIFACTS}/{world.run_root}/small.txt", content=b"s", headers=ACME)
    assert gateway.store.operations[-1] == "put_object"
    listing = gateway.handle.client.get(ARTIFACTS, params={"path": world.run_root}, headers=ACME).json()
    assert listing == {
        "files": [
            {"path": "big.bin", "is_dir": False, "file_size": len(data)},
            {"path": "small.txt", "is_dir": False, "file_size": 1},
        ]
    }
    assert gateway.handle.client.delete(f"{ARTIFACTS}/{path}", headers=ACME).status_code == 200
    assert not gateway.exists(path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_upload_parts_go_to_s3_several_at_a_time_and_arrive_in_order(
    s3_gateway: Callable[..., S3Gateway], world: World
) -> None:
    gateway = s3_gateway()
    gateway.store.parts_in_flight = 3
    gateway.store.part_delay = 1.0  # parts pile up behind a slow S3, as they do behind a real one
    # 8 parts, each its own pattern: a part sent under the wrong number would change the object.
    data = b"".join(bytes([number]) * PART for number in range(1, 9)) + b"tail"
    path = f"{world.run_root}/parallel.bin"
    response = gateway.handle.client.put(f"{ARTIFACTS}/{path}", content=data, headers=ACME, timeout=120)
    assert response.status_code == 200, response.text
    assert gateway.store.operations.count("upload_part") == 9
    assert gateway.store.most_parts_sending == 3  # several at once, never more than allowed
    stored = gateway.s3.get_object(Bucket="bucket", Key=f"artifacts/{path}")["Body"].read()
    assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(data).hexdigest()
    assert gateway.open_uploads() == []


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_s3_calls_have_their_own_threads_so_busy_uploads_do_not_hold_up_downloads(
    s3_gateway: Callable[..., S3Gateway], world: World
) -> None:
    gateway = s3_gateway()
    small = f"{world.run_root}/small.txt"
    assert gateway.handle.client.put(f"{ARTIFACTS}/{small}", content=b"small", headers=ACME).status_code == 200
    gateway.store.parts_in_flight = 8
    gateway.store.part_block = 3.0  # 8 parts each hold a thread: more than asyncio's default pool has on 2 cores
    upload_status: list[int] = []

    def upload() -> None:
        data = b"u" * (9 * PART)
        response = gateway.handle.client.put(f"{ARTIFACTS}/{world.run_root}/big.bin", content=data, headers=ACME)
        upload_status.append(response.status_code)

    uploader = threading.Thread(target=upload)
    uploader.start()
    assert _wait_for(lambda: gateway.store.parts_sending >= 8), gateway.store.parts_sending
    response = gateway.handle.client.get(f"{ARTIFACTS}/{small}", headers=ACME)
    still_sending = gateway.store.parts_sending
    assert response.status_code == 200 and response.content == b"small"
    assert still_sending >= 8  # the download was served while every part still held its thread
    uploader.join(timeout=60)
    assert upload_status == [200]
    assert gateway.store.threads and all(name.startswith("gateway-s3") for name in gateway.store.threads)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("reset", [True, False], ids=["rst", "fin"])
def test_client_disconnect_mid_upload_aborts_the_multipart_upload(
    s3_gateway: Callable[..., S3Gateway], world: World, reset: bool
) -> None:
    gateway = s3_gateway()
    path = f"{world.run_root}/partial.bin"
    target = f"{ARTIFACTS}/{path}"
    _partial_upload(gateway.handle.port, target, declared=64 * 1024 * 1024, sent=2 * PART + 4096, reset=reset)
    assert _wait_for(lambda: "abort_multipart_upload" in gateway.store.operations), gateway.store.operations
    ops = gateway.store.operations
    assert ops[0] == "create_multipart_upload"
    assert ops.count("upload_part") >= 1
    assert "complete_multipart_upload" not in ops and "put_object" not in ops
    assert gateway.open_uploads() == []
    assert not gateway.exists(path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_client_disconnect_before_the_first_part_stores_nothing(
    s3_gateway: Callable[..., S3Gateway], world: World
) -> None:
    gateway = s3_gateway()
    path = f"{world.run_root}/partial-small.bin"
    _partial_upload(gateway.handle.port, f"{ARTIFACTS}/{path}", declared=PART, sent=PART // 2)
    # The gateway notices the disconnect; give it the same time it needs above, then check nothing was stored.
    time.sleep(1.0)
    assert gateway.store.operations == []
    assert gateway.open_uploads() == []
    assert not gateway.exists(path)
    # the gateway is still serving
    response = gateway.handle.client.put(f"{ARTIFACTS}/{path}", content=b"whole", headers=ACME)
    assert response.status_code == 200
    assert gateway.store.operations == ["put_object"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_oversized_upload_is_refused_and_aborted(s3_gateway: Callable[..., S3Gateway], world: World) -> None:
    gateway = s3_gateway(max_body_bytes=PART + PART // 2)
    path = f"{world.run_root}/too-big.bin"
    # Chunked (no Content-Length, which would be refused before any S3 call): the limit is met mid-stream.
    chunks = iter([b"\0" * PART, b"\0" * PART])
    response = gateway.handle.client.put(f"{ARTIFACTS}/{path}", content=chunks, headers=ACME)
    assert_mlflow_error(response, 413, "REQUEST_LIMIT_EXCEEDED")
    ops = gateway.store.operations
    assert ops[:2] == ["create_multipart_upload", "upload_part"]
    assert ops[-1] == "abort_multipart_upload"
    assert gateway.open_uploads() == []
    assert not gateway.exists(path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_presigned_multipart_with_the_real_store(s3_gateway: Callable[..., S3Gateway], world: World) -> None:
    gateway = s3_gateway(artifacts_mode="presigned")
    client = gateway.handle.client
    for num_parts in (0, 10_001, -1):
        response = client.post(
            f"{MPU}/create/{world.run_root}", json={"path": "a.bin", "num_parts": num_parts}, headers=ACME
        )
        assert_mlflow_error(response, 400, "INVALID_PARAMETER_VALUE")
    assert gateway.store.operations == []
    created = client.post(f"{MPU}/create/{world.run_root}", json={"path": "/tmp/a.bin", "num_parts": 2}, headers=ACME)
    assert created.status_code == 200, created.text
    payload = created.json()
    upload_id = payload["upload_id"]
    key = f"artifacts/{world.run_root}/a.bin"
    assert [upload["Key"] for upload in gateway.open_uploads()] == [key]
    credentials = payload["credentials"]
    assert [c["part_number"] for c in credentials] == [1, 2]
    for credential in credentials:
        url = httpx.URL(credential["url"])
        assert url.path.endswith(f"/{key}")
        assert url.params["uploadId"] == upload_id
        assert url.params["partNumber"] == str(credential["part_number"])
        assert "X-Amz-Signature" in url.params
    # The upload id cannot be aborted through another key of the same tenant.
    other = client.post(f"{MPU}/abort/{world.run_root}", json={"path": "b.bin", "upload_id": upload_id}, headers=ACME)
    assert_mlflow_error(other, 404, "RESOURCE_DOES_NOT_EXIST")
    assert len(gateway.open_uploads()) == 1
    aborted = client.post(f"{MPU}/abort/{world.run_root}", json={"path": "a.bin", "upload_id": upload_id}, headers=ACME)
    assert aborted.status_code == 200, aborted.text
    assert gateway.open_uploads() == []


# -- the stock client against a proxy-mode gateway, with MLflow's "force multipart" switches set -----------------
#
# MLflow documents MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD / _DOWNLOAD for speeding up large transfers; when
# a server cannot do them, MLflow's own server answers so that the client falls back to the proxied
# PUT/GET (mpu/create: a message starting with _UnsupportedMultipartUploadException.MESSAGE; presigned
# download: 501 or 404). The gateway in proxy mode answers 403 with its own message, so the stock
# client fails instead of falling back.


@pytest.fixture
def stock_repo(proxy: ArtifactGateway, world: World, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

    for key in [key for key in os.environ if key.startswith("MLFLOW_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", token("acme", "alice"))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    yield MlflowArtifactsRepository(f"mlflow-artifacts:/{world.run_root}", tracking_uri=proxy.handle.server.url)


def test_stock_client_round_trip_in_proxy_mode(
    stock_repo: Any, proxy: ArtifactGateway, world: World, tmp_path: Path
) -> None:
    source = tmp_path / "a.txt"
    source.write_text("hello")
    stock_repo.log_artifact(str(source), "sub")
    assert proxy.store.objects[f"{world.run_root}/sub/a.txt"][0] == b"hello"
    assert [f.path for f in stock_repo.list_artifacts()] == ["sub"]
    (tmp_path / "out").mkdir()
    out = stock_repo.download_artifacts("sub/a.txt", str(tmp_path / "out"))
    assert Path(out).read_text() == "hello"


def test_forced_multipart_upload_falls_back_to_a_proxied_put(
    stock_repo: Any, proxy: ArtifactGateway, world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "true")
    monkeypatch.setenv("MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE", "1")
    source = tmp_path / "big.bin"
    source.write_bytes(b"x" * 1000)
    stock_repo.log_artifact(str(source))
    assert proxy.store.objects[f"{world.run_root}/big.bin"][0] == b"x" * 1000


def test_forced_multipart_download_falls_back_to_a_proxied_get(
    stock_repo: Any, proxy: ArtifactGateway, world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "true")
    monkeypatch.setenv("MLFLOW_MULTIPART_DOWNLOAD_MINIMUM_FILE_SIZE", "1")
    proxy.store.put(f"{world.run_root}/b.txt", b"bbb")
    (tmp_path / "out").mkdir()
    out = stock_repo.download_artifacts("b.txt", str(tmp_path / "out"))
    assert Path(out).read_bytes() == b"bbb"


def test_platform_admin_reads_any_tenants_artifacts_but_never_writes(proxy: ArtifactGateway, world: World) -> None:
    from tests.factories import raw_token

    admin = {"Authorization": f"Bearer {raw_token({'sub': 'root', 'roles': ['platform-admin']})}"}
    proxy.store.put(f"{world.foreign_root}/x.txt", b"globex data")
    for url, params in [
        ("/get-artifact", {"run_id": world.foreign_run, "path": "x.txt"}),
        (f"{ARTIFACTS}/{world.foreign_root}/x.txt", {}),
    ]:
        response = proxy.client.get(url, params=params, headers=admin)
        assert response.status_code == 200, response.text
        assert response.content == b"globex data"
    listing = proxy.client.get("/api/2.0/mlflow/artifacts/list", params={"run_id": world.foreign_run}, headers=admin)
    assert [f["path"] for f in listing.json()["files"]] == ["x.txt"]
    response = proxy.client.put(f"{ARTIFACTS}/{world.foreign_root}/y.txt", content=b"no", headers=admin)
    assert response.status_code == 403
    assert f"{world.foreign_root}/y.txt" not in proxy.store.objects
