"""The one upstream HTTP client: HTTP/1.1 keep-alive connections on asyncio, parsed by httptools.

Why not a library. aiohttp (chosen first: several times faster than httpx here, encode/httpx#3215) spent
~260 µs of CPU per call on this machine's cores against ~65 µs for this client, for the same `GET` of a
1 KiB answer, and ~950 against ~290 µs when the call follows 20 ms of idleness, the gateway's usual state in
front of MLflow (bench/RESULTS.md, section 2h). The gateway needs a small part of HTTP: requests whose body it
already holds, to one origin, answers read whole or streamed. httptools (llhttp, also uvicorn's parser) parses
the answers: status line, headers, chunked and Content-Length framing.

Lower-level errors are translated here, once: connection failures (refused, reset, closed before an answer or
in the middle of its body, connect timeout) become :class:`UpstreamUnavailable` (503 + Retry-After), a read that
waits longer than ``timeout`` :class:`UpstreamTimeout` (504), an answer that is not valid HTTP
:class:`UpstreamError` (502).

Retries: a GET or HEAD without a body is sent a second time, once, when the connection failed before a byte
of the answer arrived (refused, reset, or a pooled keep-alive connection the upstream had already closed).
Nothing else is ever retried: not a timeout (the upstream may still be working on it), and never POST, PUT,
PATCH or DELETE, which may already have taken effect upstream (RFC 9110 §9.2.2 lets PUT and DELETE be
retried; MLflow's handlers are not written to be, so the gateway does not). A request that could not even be
written (its pooled connection was found closed) was never sent, so it is sent on another connection.

Connections: at most ``pool_size`` open at once (callers beyond that wait for one), reused LIFO while the
upstream keeps them alive, dropped after ``KEEPALIVE_SECONDS`` idle, after an answer that says
``Connection: close`` or is HTTP/1.0, after a HEAD (whose framing headers describe a body that is not sent),
and whenever an answer was not read to its end. No cookie is ever kept (one client serves every tenant).
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
from collections import deque
from collections.abc import AsyncGenerator, Mapping
from urllib.parse import unquote, urlsplit

import httptools
import orjson

from gateway.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from gateway.observability import current_request, note_upstream, note_upstream_error

JOINED_BODY_BYTES = 64 * 1024  # a request body up to this size is sent in one buffer with its head
RETRIED_METHODS = frozenset({"GET", "HEAD"})
KEEPALIVE_SECONDS = 30.0
STREAM_HIGH_WATER = 256 * 1024  # unread bytes of an answer not read whole above which reading the socket pauses
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # sent with Content-Length: 0 when they carry no body
# Set by the client itself, whatever the caller passes: framing, and `accept-encoding: identity` (the client
# never decodes a compressed answer; the gateway reads and rewrites bodies as they are).
_OWN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "accept-encoding"})


class _Failure(Exception):
    """Why an exchange failed, before it is translated: ``kind`` is unavailable, timeout or invalid."""

    def __init__(self, kind: str, *, before_response: bool = False) -> None:
        super().__init__(kind)
        self.kind = kind
        self.before_response = before_response  # nothing of an answer arrived: a GET may be sent again


class UpstreamResponse:
    """An open upstream response: read it whole or stream it, then its connection is released."""

    __slots__ = ("_buffered", "_chunks", "_complete", "_connection", "_failure", "_whole", "headers", "status")

    def __init__(self, connection: _Connection) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []  # as received: names in the upstream's case, values as sent
        self._connection: _Connection | None = connection
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._complete = False
        self._failure: _Failure | None = None
        self._whole = False  # read() takes it whole: never pause reading (a streamed answer pauses, see on_body)

    async def read(self) -> bytes:
        """Read the whole body and release the connection."""
        started = time.perf_counter()
        self._whole = True
        if self._connection is not None:
            self._connection.resume()
        try:
            while not self._complete:
                await self._wait()
            return b"".join(self._chunks)
        finally:
            note_upstream(time.perf_counter() - started, call=False)
            self._release()

    async def iter_chunks(self) -> AsyncGenerator[bytes, None]:
        """Yield the body in chunks; the connection is released (or closed) when done."""
        try:
            while True:
                if self._chunks:
                    chunks, self._chunks, self._buffered = self._chunks, [], 0
                    if self._connection is not None:
                        self._connection.resume()
                    yield chunks[0] if len(chunks) == 1 else b"".join(chunks)
                elif self._complete:
                    return
                else:
                    await self._wait()
        finally:
            self._release()

    def close(self) -> None:
        """Drop the connection without reading the rest of the body (nothing once it was released)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            if not self._complete and self._failure is None:  # a later read() fails instead of waiting forever
                self._failure = _Failure("unavailable")
            connection.client.discard(connection)

    async def _wait(self) -> None:
        """Wait for more of the answer; raises the translated error when the exchange failed."""
        connection = self._connection
        if self._failure is None and connection is not None:
            await connection.wait()
        if self._failure is not None:
            self.close()
            raise _translate(self._failure)

    def _release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.client.release(connection, reusable=self._complete and self._failure is None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; its parser feeds the response of the exchange in progress."""

    def __init__(self, client: UpstreamClient) -> None:
        self.client = client
        self.loop = client.loop
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.closed = False
        self.keep_alive = True
        self.paused = False
        self.head = False  # the exchange in progress is a HEAD: its framing headers describe no body here
        self.received = False  # a byte of the current answer arrived
        self.headers_done = False
        self.idle_since = 0.0
        self.last_data = 0.0
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None

    # --- the exchange, for UpstreamClient and UpstreamResponse

    def begin(self, response: UpstreamResponse, request: bytes, body: bytes | None, *, head: bool) -> bool:
        """Start an exchange by writing ``request``; False if the connection turned out to be closed."""
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            return False
        self.response, self.head, self.received, self.headers_done = response, head, False, False
        try:
            transport.write(request)
            if body is not None:  # a large body: not copied into one buffer with the head (see _request)
                transport.write(body)
        except RuntimeError:  # uvloop: the handle closed before connection_lost was delivered
            self.response = None
            return False
        return True

    async def wait(self) -> None:
        """Wait until the parser or the connection has something new for the response."""
        self.waiter = waiter = self.loop.create_future()
        self.last_data = self.loop.time()
        if self.timer is None:
            self.timer = self.loop.call_at(self.last_data + self.client.read_timeout, self._on_timer)
        try:
            await waiter
        finally:
            self.waiter = None

    def resume(self) -> None:
        """Read the socket again if a lagging consumer had paused it."""
        if self.paused:
            self.paused = False
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def close(self) -> None:
        self._closed()
        if self.transport is not None:
            self.transport.close()

    def _closed(self) -> None:
        """Closed, by either side: never reused, and no read timeout to watch."""
        self.closed = True
        self.keep_alive = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, failure: _Failure) -> None:
        response = self.response
        self.keep_alive = False
        if response is not None and not response._complete and response._failure is None:
            response._failure = failure
        self._wake()

    def _on_timer(self) -> None:
        self.timer = None
        if self.waiter is None or self.closed:
            return  # nobody waits: armed again by the next wait
        idle = self.loop.time() - self.last_data
        if idle < self.client.read_timeout:
            self.timer = self.loop.call_at(self.last_data + self.client.read_timeout, self._on_timer)
            return
        self._fail(_Failure("timeout"))
        self.close()

    # --- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None or response._complete:  # nothing was asked: not a connection to keep
            self.close()
            return
        self.received = True
        self.last_data = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if not response._complete:  # else: bytes after a complete answer, the connection is dropped
                self._fail(_Failure("invalid"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed()
        response = self.response
        if response is None or response._complete:
            return
        if self.headers_done and not self.head and _ends_at_close(response.headers):
            response._complete = True  # a body delimited by the end of the connection (RFC 9112 6.3 rule 8)
            self._wake()
            return
        self._fail(_Failure("unavailable", before_response=not self.received))

    # --- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.response.headers.append((name, value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        status = self.parser.get_status_code()
        if status < 200:  # an interim answer (103 Early Hints): the real one follows
            response.headers.clear()
            return
        response.status = status
        self.headers_done = True
        if self.head:
            response._complete = True
            self.keep_alive = False
        self._wake()

    def on_body(self, body: bytes) -> None:
        response = self.response
        assert response is not None
        response._chunks.append(body)
        response._buffered += len(body)
        if response._buffered > STREAM_HIGH_WATER and not response._whole and not self.paused:
            self.paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        self._wake()

    def on_message_complete(self) -> None:
        response = self.response
        assert response is not None
        if not self.headers_done:  # the end of an interim answer
            return
        response._complete = True
        if not self.parser.should_keep_alive():
            self.keep_alive = False
        self._wake()


def _ends_at_close(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether an answer's body runs to the end of the connection: neither Content-Length nor chunked."""
    return not any(name.lower() in (b"content-length", b"transfer-encoding") for name, _ in headers)


class UpstreamClient:
    """A pooled client for one upstream MLflow base URL. Create it in the app lifespan."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 5.0,
        timeout: float = 120.0,
        pool_size: int = 100,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream URL must be http(s)://host[:port], got {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if parts.scheme == "https" else None
        self._prefix = parts.path.rstrip("/")
        host = f"[{self._host}]" if ":" in self._host else self._host
        if parts.port is not None:
            host += f":{parts.port}"
        own = [f"host: {host}\r\n", "accept-encoding: identity\r\n"]
        if parts.username is not None:  # credentials in the URL: Basic authentication, as browsers and aiohttp do
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            own.append(f"authorization: Basic {base64.b64encode(pair).decode()}\r\n")
        self._own_headers = "".join(own)
        self._own_breaks = len(own)  # line breaks in _own_headers, for the check in _request
        self.connect_timeout = connect_timeout
        self.read_timeout = timeout
        self._pool_size = pool_size
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._started = False
        self.loop: asyncio.AbstractEventLoop

    async def start(self) -> None:
        """Start the client on the running event loop (connections are opened on demand)."""
        self.loop = asyncio.get_running_loop()
        self._started = True

    async def close(self) -> None:
        """Close every connection; idempotent."""
        self._started = False
        for connection in list(self._open):
            connection._fail(_Failure("unavailable"))
            connection.close()
        self._open.clear()
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def send(
        self,
        method: str,
        path_and_query: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None = None,
    ) -> UpstreamResponse:
        """Send one request; the caller must read, stream or close the response.

        ``path_and_query`` must already be percent-encoded: it is sent exactly as given.
        """
        if not self._started:
            raise UpstreamUnavailable("Upstream client is not started")
        request = self._request(method, path_and_query, headers, body)
        if body is not None and len(body) <= JOINED_BODY_BYTES:
            request, body = request + body, None  # one write, one TCP segment for a small request
        retry = method in RETRIED_METHODS and body is None
        head = method == "HEAD"
        started = time.perf_counter()
        while True:
            try:
                connection = await self._acquire()
            except _Failure as refused:
                if retry and refused.before_response:
                    retry = False
                    continue
                note_upstream(time.perf_counter() - started)
                raise _translate(refused) from None
            pooled = connection.idle_since > 0.0
            response = UpstreamResponse(connection)
            if connection.begin(response, request, body, head=head):
                try:
                    while not connection.headers_done and response._failure is None:
                        await connection.wait()
                except BaseException:  # cancelled: the connection is in an unknown state
                    response.close()
                    raise
                failure = response._failure
            elif pooled:  # found closed before a byte was sent: any method may go on another connection
                self.discard(connection)
                continue
            else:
                failure = _Failure("unavailable", before_response=True)
            if failure is None:
                note_upstream(time.perf_counter() - started)
                return response
            response.close()
            if retry and failure.before_response:
                retry = False
                continue
            note_upstream(time.perf_counter() - started)
            raise _translate(failure)

    async def json_call(
        self, method: str, path_and_query: str, *, headers: Mapping[str, str], body: bytes | None = None
    ) -> tuple[int, object]:
        """A small buffered call (ownership look-ups): returns the status and the decoded JSON body.

        The current request's id and forwarded-for headers are added, so MLflow's logs tie the call
        to the client request that caused it.
        """
        record = current_request()
        if record is not None:
            headers = {"x-request-id": record.request_id, "x-forwarded-for": record.client, **headers}
        response = await self.send(method, path_and_query, headers=headers, body=body)
        raw = await response.read()
        try:
            return response.status, orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            raise UpstreamError(f"Upstream answered {response.status} with a non-JSON body") from None

    # --- the request and the pool

    def _request(self, method: str, target: str, headers: Mapping[str, str], body: bytes | None) -> bytes:
        """The request line and headers; refuses a CR or LF in any part (header injection, request smuggling)."""
        lines = [f"{method} {self._prefix}{target} HTTP/1.1\r\n", self._own_headers]
        own = _OWN_HEADERS
        for name, value in headers.items():
            if name.lower() not in own:
                lines.append(f"{name}: {value}\r\n")
        if body is not None:
            lines.append(f"content-length: {len(body)}\r\n")
        elif method in _BODY_METHODS:
            lines.append("content-length: 0\r\n")
        lines.append("\r\n")
        head = "".join(lines)
        breaks = len(lines) - 1 + self._own_breaks
        if head.count("\n") != breaks or head.count("\r") != breaks or " " in target:
            raise ValueError("a CR, LF or space in an upstream request's target or header")
        try:
            encoded = head.encode("latin-1")  # client headers arrive as bytes decoded as latin-1: sent as they came
        except UnicodeEncodeError:
            encoded = head.encode()
        return encoded

    async def _acquire(self) -> _Connection:
        while True:
            idle = self._idle
            now = self.loop.time()
            while idle:
                connection = idle.pop()
                if not connection.closed and now - connection.idle_since < KEEPALIVE_SECONDS:
                    return connection
                self.discard(connection)
            if len(self._open) < self._pool_size:
                return await self._connect()
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if not waiter.done():
                    self._waiters.remove(waiter)
                elif not waiter.cancelled():  # woken, then cancelled: pass the place on
                    self._wake_one()
                raise
            if not self._started:
                raise _Failure("unavailable")

    async def _connect(self) -> _Connection:
        connection = _Connection(self)
        self._open.add(connection)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self.loop.create_connection(
                    lambda: connection,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                )
        except TimeoutError as exc:  # not sent again: a retry would double the time the client waits
            self.discard(connection)
            raise _Failure("unavailable") from exc
        except OSError as exc:  # refused, unreachable, a failed TLS handshake: nothing was sent
            self.discard(connection)
            raise _Failure("unavailable", before_response=True) from exc
        except BaseException:
            self.discard(connection)
            raise
        return connection

    def release(self, connection: _Connection, *, reusable: bool) -> None:
        """Return a connection whose answer was read to its end to the pool; any other is closed."""
        connection.response = None
        if reusable and connection.keep_alive and not connection.closed and self._started:
            connection.idle_since = self.loop.time()
            self._idle.append(connection)
            self._wake_one()
        else:
            self.discard(connection)

    def discard(self, connection: _Connection) -> None:
        """Close a connection and free its place in the pool."""
        connection.response = None
        connection.close()
        if connection in self._open:
            self._open.discard(connection)
            self._wake_one()

    def _wake_one(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _translate(failure: _Failure) -> UpstreamError:
    """The gateway's error for a failed upstream call; counted here, as every failure passes once."""
    note_upstream_error(failure.kind)
    if failure.kind == "timeout":
        return UpstreamTimeout("Upstream MLflow did not answer in time")
    if failure.kind == "unavailable":
        return UpstreamUnavailable("Upstream MLflow is unavailable")
    return UpstreamError("Upstream MLflow answered with an invalid response")
