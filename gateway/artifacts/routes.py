"""Artifact routes the gateway serves itself: bytes go between the client and S3, never through MLflow.

Every handler checks the canonical path (``paths.parse_artifact_path``) and its ownership before any
S3 call. Downloads are sent as attachments with ``nosniff`` and a sandboxing CSP, so an artifact can
never run script in the gateway's origin.
"""

from __future__ import annotations

import posixpath
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import orjson
from starlette.types import Message, Receive, Send

from gateway.artifacts.paths import ArtifactPath, check_relative, parse_artifact_path, require_owned_path
from gateway.artifacts.s3 import ArtifactStore, guess_content_type
from gateway.errors import BadRequest, EndpointNotFound, NotFound, PayloadTooLarge, PermissionDenied
from gateway.http.canonical import JsonObject, single_value
from gateway.middleware import client_disconnect
from gateway.observability import note_artifact_bytes
from gateway.policy.core import Access, Body, Exchange, Policy, Served

PROXY, PRESIGNED = "proxy", "presigned"
UI_UPLOAD_LIMIT = 10 * 1024 * 1024  # MLflow's own limit for the UI's upload-artifact route
_DOWNLOAD_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", b"default-src 'none'; sandbox"),
    (b"cache-control", b"private, no-store"),
]


def _store(ex: Exchange) -> ArtifactStore:
    store = ex.services.artifacts
    if store is None:
        raise PermissionDenied("Artifact storage is not configured on this gateway (GATEWAY_ARTIFACTS_DESTINATION)")
    return store


# MLflow's own messages for "this artifact repository cannot do that": the stock client falls back to
# plain proxied PUT/GET on exactly these (mlflow/exceptions.py, store/artifact/http_artifact_repo.py),
# e.g. when a user forces MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD/DOWNLOAD against a proxy-mode gateway.
_NO_MULTIPART_UPLOAD = "Multipart upload is not supported for the current artifact repository"
_NO_MULTIPART_DOWNLOAD = "Multipart download is not supported for the current artifact repository"


def _require_presigned_mode(ex: Exchange, *, download: bool = False) -> None:
    """Presigned and multipart routes exist only in presigned mode; refused in a way the client falls back on."""
    if ex.services.settings.artifacts_mode == PRESIGNED:
        return
    if download:  # the client falls back to a proxied GET on 404/501
        raise EndpointNotFound(f"{_NO_MULTIPART_DOWNLOAD} (the gateway streams artifacts: proxy mode)")
    raise BadRequest(f"{_NO_MULTIPART_UPLOAD} (the gateway streams artifacts: proxy mode)")


async def send_json(send: Send, payload: Any, status: int = 200) -> None:
    """Answer a small JSON body."""
    body = orjson.dumps(payload)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _owned(ex: Exchange, raw_path: str, *, writing: bool = False) -> ArtifactPath:
    artifact = parse_artifact_path(raw_path)
    if writing and not artifact.is_inside_artifacts:
        raise BadRequest("Artifacts can only be written inside a run's, logged model's or trace's artifacts directory")
    await require_owned_path(ex, artifact)
    return artifact


# -- streaming helpers ------------------------------------------------------------------------------


async def stream_download(store: ArtifactStore, path: str, receive: Receive, send: Send) -> None:
    """Stream one object to the client; stop reading S3 as soon as the client disconnects."""
    download = await store.open(path)
    name = posixpath.basename(path)
    headers = [
        (b"content-type", download.content_type.encode("latin-1")),
        (b"content-disposition", f"attachment; filename*=UTF-8''{quote(name)}".encode("latin-1")),
        *_DOWNLOAD_HEADERS,
    ]
    if download.size is not None:
        headers.append((b"content-length", str(download.size).encode()))
    chunks = download.chunks
    try:
        async with client_disconnect(receive) as disconnected:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async for chunk in chunks:
                if disconnected.is_set():
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                note_artifact_bytes(sent=len(chunk))
            await send({"type": "http.response.body", "body": b""})
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


async def request_chunks(receive: Receive, *, limit: int) -> AsyncIterator[bytes]:
    """The request body as it arrives; a disconnect or an oversized body raises (aborting an upload)."""
    size = 0
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("Client disconnected during the upload")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Artifact exceeds the gateway's limit of {limit} bytes")
        if chunk:
            note_artifact_bytes(received=len(chunk))
            yield chunk
        if not message.get("more_body", False):
            return


def _header(ex: Exchange, name: str) -> str | None:
    values = ex.headers.get(name)
    return values[0] if values else None


# -- the mlflow-artifacts service ---------------------------------------------------------------------


async def download_artifact(ex: Exchange, receive: Receive, send: Send) -> None:
    """GET mlflow-artifacts/artifacts/<path>: stream an owned object from S3."""
    artifact = await _owned(ex, ex.path_params["artifact_path"])
    await stream_download(_store(ex), artifact.path, receive, send)


async def upload_artifact(ex: Exchange, receive: Receive, send: Send) -> None:
    """PUT mlflow-artifacts/artifacts/<path>: stream the body into S3 (multipart above one part)."""
    artifact = await _owned(ex, ex.path_params["artifact_path"], writing=True)
    if not artifact.relative:
        raise BadRequest("An artifact upload needs a file name")
    content_type = _header(ex, "content-type") or guess_content_type(artifact.path)
    limit = ex.services.settings.max_body_bytes
    await _store(ex).upload(artifact.path, request_chunks(receive, limit=limit), content_type=content_type)
    await send_json(send, {})


async def delete_artifact(ex: Exchange, receive: Receive, send: Send) -> None:
    """DELETE mlflow-artifacts/artifacts/<path>: delete an owned file or directory."""
    artifact = await _owned(ex, ex.path_params["artifact_path"], writing=True)
    if not artifact.relative:
        raise BadRequest("Deleting a whole artifacts root is not allowed; delete the run instead")
    await _store(ex).delete(artifact.path)
    await send_json(send, {})


async def list_artifacts(ex: Exchange, receive: Receive, send: Send) -> None:
    """GET mlflow-artifacts/artifacts?path=<dir>: list an owned directory (the root is refused)."""
    raw = single_value(ex.query, "path")
    if not raw:
        raise PermissionDenied("Listing the artifact root is not allowed: give the path of an owned experiment")
    artifact = await _owned(ex, raw)
    entries = await _store(ex).list_dir(artifact.path)
    await send_json(send, {"files": [entry.to_json() for entry in entries]} if entries else {})


async def presigned_download(ex: Exchange, receive: Receive, send: Send) -> None:
    """GET mlflow-artifacts/presigned/<path>: a short-lived GET URL for exactly this owned key."""
    _require_presigned_mode(ex, download=True)
    artifact = await _owned(ex, ex.path_params["artifact_path"])
    store = _store(ex)
    size = await store.size(artifact.path)
    await send_json(send, {"url": store.presign("get_object", artifact.path), "headers": {}, "file_size": size})


def _mpu_target(ex: Exchange) -> str:
    body = ex.json_body()
    local = body.get("path")
    if not isinstance(local, str) or not local:
        raise BadRequest("Missing value for required parameter 'path'.")
    # MLflow uses only the base name of the client's local path (handlers: os.path.basename).
    name = check_relative(posixpath.basename(local.replace("\\", "/")))
    return f"{ex.path_params['artifact_path'].rstrip('/')}/{name}"


async def create_multipart(ex: Exchange, receive: Receive, send: Send) -> None:
    """POST mlflow-artifacts/mpu/create/<dir>: start an upload of <dir>/basename(path); sign its parts."""
    _require_presigned_mode(ex)
    artifact = await _owned(ex, _mpu_target(ex), writing=True)
    num_parts = ex.json_body().get("num_parts", 1)
    if isinstance(num_parts, str) and num_parts.isdigit():
        num_parts = int(num_parts)
    if not isinstance(num_parts, int) or isinstance(num_parts, bool):
        raise BadRequest("num_parts must be an integer")
    response = await _store(ex).create_multipart(
        artifact.path, num_parts, content_type=guess_content_type(artifact.path)
    )
    await send_json(send, response)


def _upload_id(ex: Exchange) -> str:
    upload_id = ex.json_body().get("upload_id")
    if not isinstance(upload_id, str) or not upload_id:
        raise BadRequest("Missing value for required parameter 'upload_id'.")
    return upload_id


async def complete_multipart(ex: Exchange, receive: Receive, send: Send) -> None:
    """POST mlflow-artifacts/mpu/complete/<dir>: complete an upload the caller started for this key."""
    _require_presigned_mode(ex)
    artifact = await _owned(ex, _mpu_target(ex), writing=True)
    upload_id = _upload_id(ex)
    parts = ex.json_body().get("parts")
    if not isinstance(parts, list) or not parts:
        raise BadRequest("Missing value for required parameter 'parts'.")
    checked: list[dict[str, Any]] = []
    for part in parts:
        number, etag = (part.get("part_number"), part.get("etag")) if isinstance(part, dict) else (None, None)
        if isinstance(number, str) and number.isdigit():
            number = int(number)
        if not isinstance(number, int) or isinstance(number, bool) or not isinstance(etag, str):
            raise BadRequest("Each part needs an integer part_number and a string etag")
        checked.append({"PartNumber": number, "ETag": etag})
    store = _store(ex)
    await store.require_upload(artifact.path, upload_id)  # another key's upload id: "does not exist"
    await store.complete_multipart(artifact.path, upload_id, checked)
    await send_json(send, {})


async def abort_multipart(ex: Exchange, receive: Receive, send: Send) -> None:
    """POST mlflow-artifacts/mpu/abort/<dir>: abort an upload the caller started for this key."""
    _require_presigned_mode(ex)
    artifact = await _owned(ex, _mpu_target(ex), writing=True)
    upload_id = _upload_id(ex)
    store = _store(ex)
    await store.require_upload(artifact.path, upload_id)
    await store.abort_multipart(artifact.path, upload_id)
    await send_json(send, {})


# -- tracking-API and UI artifact routes ----------------------------------------------------------------


def _run_id(ex: Exchange) -> str:
    run_ids = {value for key in ("run_id", "run_uuid") if (value := single_value(ex.query, key))}
    if len(run_ids) != 1:
        raise BadRequest("Give exactly one run id (run_id or run_uuid)")
    return run_ids.pop()


async def _experiment_of(ex: Exchange, kind: str, object_id: str) -> str:
    """The experiment of a run or logged model: owned by the caller, or any for a platform admin."""
    ownership = ex.services.ownership
    if ex.caller.platform_admin:
        lookup = ownership.run_experiment_id if kind == "run" else ownership.logged_model_experiment_id
        experiment_id = await lookup(object_id)
        if experiment_id is None:
            raise NotFound("Artifact does not exist")
        return experiment_id
    if kind == "run":
        return await ownership.require_run(ex.tenant, object_id)
    return await ownership.require_logged_model(ex.tenant, object_id)


async def _run_artifact(ex: Exchange, relative: str | None) -> ArtifactPath:
    run_id = _run_id(ex)
    experiment_id = await _experiment_of(ex, "run", run_id)
    inner = check_relative(relative or "", allow_empty=True)
    root = f"{experiment_id}/{run_id}/artifacts"
    return await _owned(ex, f"{root}/{inner}" if inner else root)


async def list_run_artifacts(ex: Exchange, receive: Receive, send: Send) -> None:
    """GET mlflow/artifacts/list?run_id=&path=: MLflow's ListArtifacts, paths relative to the run root."""
    relative = single_value(ex.query, "path")
    artifact = await _run_artifact(ex, relative)
    entries = await _store(ex).list_dir(artifact.path)
    inner = artifact.relative or ""
    files = [
        {**entry.to_json(), "path": posixpath.join(inner, entry.path) if inner else entry.path} for entry in entries
    ]
    payload: JsonObject = {"root_uri": f"mlflow-artifacts:/{artifact.root}"}
    if files:
        payload["files"] = files
    await send_json(send, payload)


async def get_run_artifact(ex: Exchange, receive: Receive, send: Send) -> None:
    """GET /get-artifact?run_id=&path= (the UI's file viewer): stream one run artifact."""
    relative = single_value(ex.query, "path")
    if not relative:
        raise BadRequest("Missing value for required parameter 'path'.")
    artifact = await _run_artifact(ex, relative)
    await stream_download(_store(ex), artifact.path, receive, send)


async def get_logged_model_artifact(ex: Exchange, receive: Receive, send: Send) -> None:
    """GET logged-models/<id>/artifacts/files?artifact_file_path=: stream one logged-model artifact."""
    model_id = ex.path_params["model_id"]
    relative = single_value(ex.query, "artifact_file_path")
    if not relative:
        raise BadRequest("Missing value for required parameter 'artifact_file_path'.")
    experiment_id = await _experiment_of(ex, "model", model_id)
    artifact = await _owned(ex, f"{experiment_id}/models/{model_id}/artifacts/{check_relative(relative)}")
    await stream_download(_store(ex), artifact.path, receive, send)


async def ui_upload_artifact(ex: Exchange, receive: Receive, send: Send) -> None:
    """POST ajax-api/2.0/mlflow/upload-artifact?run_uuid=&path=: the UI's small uploads (10 MB, like MLflow)."""
    relative = single_value(ex.query, "path")
    if not relative:
        raise BadRequest("Missing value for required parameter 'path'.")
    artifact = await _run_artifact(ex, relative)
    content_type = _header(ex, "content-type") or guess_content_type(artifact.path)
    limit = min(UI_UPLOAD_LIMIT, ex.services.settings.max_body_bytes)  # never above GATEWAY_MAX_BODY_BYTES
    await _store(ex).upload(artifact.path, request_chunks(receive, limit=limit), content_type=content_type)
    await send_json(send, {})


# -- server-info: what the client is told about the artifact protocol --------------------------------------


def advertise_artifact_protocol(ex: Exchange, status: int, body: JsonObject) -> None:
    """Tell the client which artifact protocol the *gateway* speaks, whatever the upstream says.

    In presigned mode the client asks the gateway for presigned URLs and multipart uploads; in proxy
    mode it never does, and every byte streams through the gateway. Workspaces are never advertised:
    the gateway is the tenancy layer.
    """
    if status != 200:
        return
    presigned = ex.services.artifacts is not None and ex.services.settings.artifacts_mode == PRESIGNED
    body["multipart_uploads_enabled"] = presigned
    body["multipart_downloads_enabled"] = presigned
    body["workspaces_enabled"] = False


SERVER_INFO = Policy(
    response=(advertise_artifact_protocol,),
    body=Body.NONE,
    access=Access.READ,
    description="PUB, rewritten: artifact protocol capabilities are the gateway's",
)
DOWNLOAD = Served(download_artifact, Access.READ, description="ART read: stream from S3")
UPLOAD = Served(upload_artifact, Access.WRITE, Body.STREAM, description="ART write: stream to S3")
DELETE = Served(delete_artifact, Access.WRITE, description="ART write: delete in S3")
LIST = Served(list_artifacts, Access.READ, description="ART list; the root is refused")
PRESIGNED_DOWNLOAD = Served(presigned_download, Access.READ, description="ART read: sign a GET for this key")
MPU_CREATE = Served(create_multipart, Access.WRITE, Body.JSON, description="ART write: sign part uploads")
MPU_COMPLETE = Served(complete_multipart, Access.WRITE, Body.JSON, description="ART write: upload id checked")
MPU_ABORT = Served(abort_multipart, Access.WRITE, Body.JSON, description="ART write: upload id checked")
RUN_LIST = Served(list_run_artifacts, Access.READ, description="OR, then list in S3")
RUN_GET = Served(get_run_artifact, Access.READ, description="OR, then stream from S3")
LOGGED_MODEL_GET = Served(get_logged_model_artifact, Access.READ, description="OM, then stream from S3")
UI_UPLOAD = Served(ui_upload_artifact, Access.WRITE, Body.STREAM, description="OR, then store in S3")
