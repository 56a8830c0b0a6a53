"""The gateway's own S3 access (boto3, SigV4): streaming both ways, listing, presigning, multipart.

boto3 is synchronous: every call runs in a worker thread of the store's own pool (``S3_THREADS``, with as
many pooled S3 connections), never asyncio's small default pool, so a few large uploads cannot hold up
every other S3 call. Memory stays bounded whatever the object size (a few part buffers per upload, one
chunk per download). Uploads larger
than one part go through S3 multipart upload and are aborted on any failure or client disconnect, so a
partial object never becomes visible as complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import mimetypes
import os
import posixpath
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import boto3
from botocore.client import Config
from botocore.exceptions import BotoCoreError, ClientError

from gateway.errors import BadRequest, GatewayError, NotFound, UpstreamTimeout, UpstreamUnavailable

PART_SIZE = 8 * 1024 * 1024
# Parts of one upload sent to S3 at the same time (each holds PART_SIZE bytes of memory while in flight).
PARTS_IN_FLIGHT = 3
# Threads (and pooled connections) for S3 calls: uploads hold PARTS_IN_FLIGHT each while in flight.
S3_THREADS = 32
DOWNLOAD_CHUNK = 1024 * 1024
MAX_PARTS = 10_000
_MISSING = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}

T = TypeVar("T")


class ArtifactStorageError(GatewayError):
    """S3 refused or failed an operation the gateway cannot map to a client error."""

    status = 502
    error_code = "INTERNAL_ERROR"


@dataclass(frozen=True)
class FileEntry:
    """One entry of a directory listing (MLflow's FileInfo)."""

    path: str
    is_dir: bool
    file_size: int | None = None

    def to_json(self) -> dict[str, Any]:
        """MLflow's JSON shape: directories carry no size."""
        entry: dict[str, Any] = {"path": self.path, "is_dir": self.is_dir}
        if not self.is_dir and self.file_size is not None:
            entry["file_size"] = self.file_size
        return entry


@dataclass(frozen=True)
class Download:
    """An open S3 object: its size, content type and a chunk iterator that closes the body when done."""

    size: int | None
    content_type: str
    chunks: AsyncIterator[bytes]


def parse_destination(destination: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes)."""
    parts = urlsplit(destination)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"artifacts destination must be s3://bucket[/prefix], got {destination!r}")
    return parts.netloc, parts.path.strip("/")


def guess_content_type(path: str) -> str:
    """A content type from the file name (MLflow's own client does the same on upload)."""
    return mimetypes.guess_type(path)[0] or "application/octet-stream"


class ArtifactStore:
    """One S3 bucket/prefix: the ``--artifacts-destination`` the upstream MLflow also uses."""

    def __init__(
        self,
        destination: str,
        *,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        region: str | None = None,
        presign_ttl_seconds: int = 300,
        part_size: int = PART_SIZE,
        parts_in_flight: int = PARTS_IN_FLIGHT,
        connect_timeout: float = 60.0,
        read_timeout: float = 60.0,
    ) -> None:
        self.bucket, self.prefix = parse_destination(destination)
        self.presign_ttl_seconds = presign_ttl_seconds
        self.part_size = part_size
        self.parts_in_flight = max(1, parts_in_flight)
        # The gateway's upstream timeouts apply to S3 too (per attempt; a streamed download that stalls
        # for read_timeout seconds is cut off), so no artifact transfer hangs indefinitely.
        config = Config(
            max_pool_connections=S3_THREADS,
            signature_version="s3v4",
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        options: dict[str, Any] = {"config": config}
        if region:
            options["region_name"] = region
        self._client = boto3.client("s3", endpoint_url=endpoint_url, **options)
        self._threads = ThreadPoolExecutor(max_workers=S3_THREADS, thread_name_prefix="gateway-s3")
        # Presigned URLs name the host the *client* reaches, which may differ from the gateway's.
        self._signer = (
            boto3.client("s3", endpoint_url=public_endpoint_url, **options)
            if public_endpoint_url and public_endpoint_url != endpoint_url
            else self._client
        )

    def key(self, path: str) -> str:
        """The S3 key of an artifact path relative to the destination root."""
        return posixpath.join(self.prefix, path) if self.prefix else path

    # -- small helpers ------------------------------------------------------------------------------

    async def _call(self, function: Callable[..., T], /, **kwargs: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._threads, functools.partial(function, **kwargs)
            )
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING:
                raise NotFound("Artifact does not exist") from None
            if code in ("InvalidPart", "InvalidPartOrder", "EntityTooSmall", "MalformedXML"):
                raise BadRequest(f"S3 refused the multipart upload: {code}") from None
            raise ArtifactStorageError(f"Artifact storage refused the request ({code or 'error'})") from None
        except BotoCoreError as exc:
            name = type(exc).__name__
            if "Timeout" in name:
                raise UpstreamTimeout("Artifact storage did not answer in time") from None
            raise UpstreamUnavailable("Artifact storage is unavailable") from None

    # -- reads --------------------------------------------------------------------------------------

    async def open(self, path: str) -> Download:
        """Open an object for streaming; :class:`NotFound` when it does not exist."""
        response = await self._call(self._client.get_object, Bucket=self.bucket, Key=self.key(path))
        body = response["Body"]
        content_type = response.get("ContentType") or guess_content_type(path)
        if content_type in ("binary/octet-stream", "application/octet-stream"):
            content_type = guess_content_type(path)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while True:
                    chunk = await self._call(body.read, amt=DOWNLOAD_CHUNK)
                    if not chunk:
                        return
                    yield chunk
            finally:
                body.close()

        return Download(size=response.get("ContentLength"), content_type=content_type, chunks=chunks())

    async def size(self, path: str) -> int:
        """The object's size; :class:`NotFound` when it does not exist."""
        response = await self._call(self._client.head_object, Bucket=self.bucket, Key=self.key(path))
        return int(response["ContentLength"])

    async def list_dir(self, path: str) -> list[FileEntry]:
        """Entries directly under ``path`` (names relative to ``path``), MLflow's listing semantics."""
        prefix = self.key(path).rstrip("/") + "/"
        entries: list[FileEntry] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._call(self._client.list_objects_v2, **kwargs)
            for common in page.get("CommonPrefixes", []):
                entries.append(FileEntry(common["Prefix"][len(prefix) :].rstrip("/"), True))
            for item in page.get("Contents", []):
                name = item["Key"][len(prefix) :]
                if name:
                    entries.append(FileEntry(name, False, int(item["Size"])))
            if not page.get("IsTruncated"):
                return sorted(entries, key=lambda entry: entry.path)
            token = page.get("NextContinuationToken")

    # -- writes -------------------------------------------------------------------------------------

    async def upload(self, path: str, chunks: AsyncIterator[bytes], *, content_type: str) -> int:
        """Store a streamed body; returns its size. Bounded memory: at most ``parts_in_flight`` + 1 parts.

        Full parts are sent to S3 in the background, up to ``parts_in_flight`` at a time, while the next
        one is read from the client, so the transfer time is not the sum of both and S3 is kept busy.
        If ``chunks`` raises (client disconnect, size limit), a started multipart upload is aborted,
        so nothing is left behind as a complete object.
        """
        key = self.key(path)
        buffer = bytearray()
        upload_id: str | None = None
        pending: list[asyncio.Task[dict[str, Any]]] = []  # in part-number order
        parts: list[dict[str, Any]] = []
        total = 0
        try:
            async for chunk in chunks:
                buffer.extend(chunk)
                total += len(chunk)
                while len(buffer) >= self.part_size:
                    if upload_id is None:
                        created = await self._call(
                            self._client.create_multipart_upload, Bucket=self.bucket, Key=key, ContentType=content_type
                        )
                        upload_id = created["UploadId"]
                    part = bytes(memoryview(buffer)[: self.part_size])
                    del buffer[: self.part_size]
                    if len(pending) >= self.parts_in_flight:
                        parts.append(await pending.pop(0))
                    number = len(parts) + len(pending) + 1
                    pending.append(asyncio.create_task(self._upload_part(key, upload_id, number, part)))
            if upload_id is None:
                await self._call(
                    self._client.put_object, Bucket=self.bucket, Key=key, Body=bytes(buffer), ContentType=content_type
                )
                return total
            while pending:
                parts.append(await pending[0])
                pending.pop(0)
            if buffer:
                parts.append(await self._upload_part(key, upload_id, len(parts) + 1, bytes(buffer)))
            await self._call(
                self._client.complete_multipart_upload,
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
            return total
        except BaseException:
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(BaseException):
                    await task
            if upload_id is not None:
                await asyncio.shield(self._abort_quietly(key, upload_id))
            raise

    async def _upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> dict[str, Any]:
        response = await self._call(
            self._client.upload_part, Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
        )
        return {"PartNumber": number, "ETag": response["ETag"]}

    async def _abort_quietly(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(GatewayError):
            await self._call(self._client.abort_multipart_upload, Bucket=self.bucket, Key=key, UploadId=upload_id)

    async def delete(self, path: str) -> None:
        """Delete an artifact file or a whole artifact directory (recursively)."""
        key = self.key(path).rstrip("/")
        keys = [key]
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": key + "/"}
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._call(self._client.list_objects_v2, **kwargs)
            keys.extend(item["Key"] for item in page.get("Contents", []))
            if not page.get("IsTruncated"):
                break
            token = page.get("NextContinuationToken")
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            await self._call(self._client.delete_objects, Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    # -- presigned access -----------------------------------------------------------------------

    def presign(self, method: str, path: str, **params: Any) -> str:
        """A URL for exactly this key and S3 operation, valid for the configured TTL."""
        return str(
            self._signer.generate_presigned_url(
                ClientMethod=method,
                Params={"Bucket": self.bucket, "Key": self.key(path), **params},
                ExpiresIn=self.presign_ttl_seconds,
            )
        )

    async def create_multipart(self, path: str, num_parts: int, *, content_type: str) -> dict[str, Any]:
        """Start a multipart upload and sign one part-upload URL per part (MLflow's response shape)."""
        if not 1 <= num_parts <= MAX_PARTS:
            raise BadRequest(f"num_parts must be between 1 and {MAX_PARTS}")
        created = await self._call(
            self._client.create_multipart_upload, Bucket=self.bucket, Key=self.key(path), ContentType=content_type
        )
        upload_id = created["UploadId"]
        credentials = [
            {
                "url": self.presign("upload_part", path, UploadId=upload_id, PartNumber=number),
                "part_number": number,
                "headers": {},
            }
            for number in range(1, num_parts + 1)
        ]
        return {"upload_id": upload_id, "credentials": credentials}

    async def require_upload(self, path: str, upload_id: str) -> None:
        """Pass only when ``upload_id`` is an open multipart upload of exactly this key.

        Checked by listing the open uploads under the key (S3 itself does not tie ``ListParts`` to the
        key on every implementation), so an upload id from another key, another tenant or thin air
        is "does not exist".
        """
        key = self.key(path)
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": key}
        while True:
            page = await self._call(self._client.list_multipart_uploads, **kwargs)
            for upload in page.get("Uploads", []):
                if upload.get("Key") == key and upload.get("UploadId") == upload_id:
                    return
            if not page.get("IsTruncated"):
                raise NotFound("Multipart upload does not exist")
            kwargs["KeyMarker"] = page.get("NextKeyMarker")
            kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker")

    async def complete_multipart(self, path: str, upload_id: str, parts: list[dict[str, Any]]) -> None:
        """Complete an upload of this key (the upload id was checked to belong to it)."""
        await self._call(
            self._client.complete_multipart_upload,
            Bucket=self.bucket,
            Key=self.key(path),
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )

    async def abort_multipart(self, path: str, upload_id: str) -> None:
        """Abort an upload of this key."""
        await self._call(
            self._client.abort_multipart_upload, Bucket=self.bucket, Key=self.key(path), UploadId=upload_id
        )


def store_from_environment(
    destination: str,
    *,
    public_endpoint_url: str | None,
    presign_ttl_seconds: int,
    connect_timeout: float = 60.0,
    read_timeout: float = 60.0,
) -> ArtifactStore:
    """Build the store with the standard AWS variables (``AWS_ENDPOINT_URL_S3`` or ``MLFLOW_S3_ENDPOINT_URL``)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
    return ArtifactStore(
        destination,
        endpoint_url=endpoint,
        public_endpoint_url=public_endpoint_url,
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None,
        presign_ttl_seconds=presign_ttl_seconds,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
