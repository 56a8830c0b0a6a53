"""The gateway's upstream client as it was until issue 9's eighth session (aiohttp), for ``overhead.py``.

``overhead.py --aiohttp-passthrough`` runs its bare passthrough on this client, to show what a bare Python proxy
written with a common HTTP client costs next to one on the gateway's own client (gateway/http/upstream.py, which
replaced this one: bench/RESULTS.md section 2h). The interface is the same: ``send`` returns a response to
``read``, stream (``iter_chunks``) or ``close``. Errors become the gateway's (503 unavailable, 504 timeout).
Not used by the gateway.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass

import aiohttp
import orjson
from yarl import URL

from gateway.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gateway.observability import note_upstream, note_upstream_error

CHUNK_SIZE = 64 * 1024
RETRIED_METHODS = frozenset({"GET", "HEAD"})


@dataclass
class UpstreamResponse:
    """An open upstream response: read it whole or stream it, then it is released."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]  # as received: names in the upstream's case, values as sent
    _response: aiohttp.ClientResponse

    async def read(self) -> bytes:
        """Read the whole body and release the connection."""
        started = time.perf_counter()
        try:
            return await self._response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _translate(exc) from exc
        finally:
            note_upstream(time.perf_counter() - started, call=False)
            self._response.release()

    async def iter_chunks(self) -> AsyncGenerator[bytes, None]:
        """Yield the body in chunks; the connection is released (or closed) when done."""
        try:
            async for chunk in self._response.content.iter_chunked(CHUNK_SIZE):
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            self._response.close()
            raise _translate(exc) from exc
        finally:
            self._response.release()

    def close(self) -> None:
        """Drop the connection without reading the rest of the body."""
        self._response.close()


class AiohttpUpstreamClient:
    """A pooled aiohttp client for one upstream base URL."""

    def __init__(self, base_url: str) -> None:  # the gateway's defaults: 5 s connect, 120 s per read, 100 connections
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=120.0)
        self._pool_size = 100
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the connection pool."""
        connector = aiohttp.TCPConnector(limit=self._pool_size, ttl_dns_cache=300, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            # One session serves every tenant: a cookie an upstream (or a load balancer before it) set on
            # one request must not ride along on the next. No jar also saves its look-up per request.
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            json_serialize=lambda value: orjson.dumps(value).decode(),
        )
        # aiohttp silently re-sends GET/HEAD/PUT/DELETE once when a pooled connection fails; there is
        # no public switch (aio-libs/aiohttp#10790), this private flag is the one its own test client
        # uses. The gateway decides itself what may be retried (see send()).
        self._session._retry_connection = False

    async def close(self) -> None:
        """Close the pool; idempotent."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(
        self,
        method: str,
        path_and_query: str,
        *,
        headers: Mapping[str, str],
        body: bytes | AsyncIterator[bytes] | None = None,
    ) -> UpstreamResponse:
        """Send one request; the caller must read, stream or close the response.

        ``path_and_query`` must already be percent-encoded: it is sent exactly as given.
        """
        if self._session is None:
            raise UpstreamUnavailable("Upstream client is not started")
        url = URL(self.base_url + path_and_query, encoded=True)
        retry = method in RETRIED_METHODS and body is None
        started = time.perf_counter()
        while True:
            try:
                response = await self._session.request(
                    method,
                    url,
                    headers=headers if type(headers) is dict else dict(headers),
                    data=body,
                    allow_redirects=False,
                    compress=None,
                )
                break
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                if retry and _failed_before_response(exc):
                    retry = False
                    continue
                note_upstream(time.perf_counter() - started)
                raise _translate(exc) from exc
        note_upstream(time.perf_counter() - started)
        return UpstreamResponse(status=response.status, headers=response.raw_headers, _response=response)


def _failed_before_response(exc: BaseException) -> bool:
    """Whether the connection failed before any part of a response was read: safe to re-send a GET.

    Timeouts are excluded (aiohttp's ServerTimeoutError is also a connection error): the upstream may
    still be working on the request, and a retry would double the time the client waits.
    """
    if isinstance(exc, TimeoutError):
        return False
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return isinstance(exc.message, str)  # otherwise a partly read response (RawResponseMessage)
    return isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ClientOSError | ConnectionError)


def _translate(exc: BaseException) -> UpstreamError:
    """The gateway's error for a failed upstream call; counted here, as every failure passes once."""
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        note_upstream_error("timeout")
        return UpstreamTimeout("Upstream MLflow did not answer in time")
    if isinstance(exc, aiohttp.ClientConnectionError | OSError):
        note_upstream_error("unavailable")
        return UpstreamUnavailable("Upstream MLflow is unavailable")
    note_upstream_error("invalid")
    return UpstreamError("Upstream MLflow answered with an invalid response")
