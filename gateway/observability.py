"""What the gateway tells its operators: the per-request record, the access log and the audit log.

:class:`ObservabilityMiddleware` (the outermost layer, which also gives the request its id) keeps one
:class:`RequestRecord` per HTTP request in a context variable; small hooks fill it from where the
facts are known:

- :func:`set_route`: the matched route template (``Gateway.__call__``),
- :func:`note_upstream` / :func:`note_upstream_error`: time, calls and failures of upstream calls
  (``UpstreamClient``),
- :func:`note_error`: every error the gateway answers itself (``send_error``), so every denial, from
  whichever middleware, is seen,
- :func:`note_artifact_bytes`: artifact bytes streamed to or from S3 (``gateway/artifacts/routes.py``).

When the response is done the middleware updates the metrics, writes one JSON line on the
``gateway.access`` logger and, for a refusal (a 4xx the gateway produced, never an upstream's own
error), one ``denied`` record on the ``gateway.audit`` logger. Neither ever contains a token, a
cookie, a query string or a body: only who, what, how it ended and why.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from time import perf_counter
from typing import TYPE_CHECKING, Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import GatewayError
from gateway.http.canonical import canonical_path

if TYPE_CHECKING:
    from gateway.metrics import GatewayMetrics, MetricsEndpoint
    from gateway.policy.router import RouteTable

audit_logger = logging.getLogger("gateway.audit")
access_logger = logging.getLogger("gateway.access")

UNAUTHENTICATED_TENANT = "-"
UNMATCHED_ROUTE = "unmatched"
_MAX_LOGGED_TEXT = 512  # paths and refusal reasons are cut here: a log line stays a line
# Metric label values for the method: the methods MLflow uses, anything else is "other".
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
REQUEST_ID_HEADER = b"x-request-id"
# Access-log lines are written in batches: at most this long after they were made (the default of
# GATEWAY_ACCESS_LOG_FLUSH_SECONDS; 0 writes each line at once), or this many at once.
ACCESS_LOG_FLUSH_SECONDS = 0.05
ACCESS_LOG_BATCH_LINES = 256
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._-]{8,128}$")
# On every response (the UI runs in a browser; harmless on API answers).
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
)
# Response header names (lower case, as ASGI apps send them) the front layer sets itself.
FRONT_HEADER_NAMES = frozenset({REQUEST_ID_HEADER, *(name for name, _ in SECURITY_HEADERS)})


def _new_request_id_source() -> None:
    """A fresh random prefix and counter for this process (again in a forked child, so ids never repeat)."""
    global _request_id_base, _request_id_counter
    # 64 random bits, the top one set, above a 64-bit counter: hex() always gives 32 digits, no padding.
    _request_id_base = (int.from_bytes(os.urandom(8), "big") | 1 << 63) << 64
    _request_id_counter = itertools.count()


_request_id_base = 0
_request_id_counter = itertools.count()
_new_request_id_source()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_request_id_source)


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case), or ``None``.

    A plain loop: on the request path, ``next()`` over a generator expression costs 2-3 k instructions
    more per call (bench/RESULTS.md, section 2d).
    """
    for key, value in headers:
        if key == name:
            return value
    return None


def handoff_of(app: ASGIApp) -> Callable[[Scope], ASGIApp] | None:
    """``app``'s ``handoff(scope)`` method, when it is a layer that can be passed without a coroutine of its own.

    A layer's ``handoff`` does the layer's work for ``scope`` that needs no waiting (a check, a cached
    token) and returns the app that serves the request next: the layer itself when it has more to do
    (a page, a token to verify, an answer to send), else what comes after it. The layer before calls
    that app directly, so a request passing a layer adds no coroutine frame to the chain (every frame
    of it is entered again each time the request resumes from an upstream wait; bench/RESULTS.md 2e).
    """
    handoff = getattr(app, "handoff", None)
    return handoff if callable(handoff) else None


def client_address(scope: Scope) -> str:
    """The client's address as the socket gives it (never a header), or ``unknown``."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def new_request_id() -> str:
    """32 hex digits like ``uuid4().hex``: a random per-process prefix and a counter.

    Unique, not secret (it is echoed to the client and written to logs), so no random bytes (a system
    call) per request: the process's random prefix (63 bits) keeps ids of different processes apart.
    ``hex()`` of one integer costs half a format string (bench/RESULTS.md section 2e); the counter
    would need 2**64 requests to reach the prefix.
    """
    return hex(_request_id_base + next(_request_id_counter))[2:]


class RequestRecord:
    """What is known about one HTTP request, filled in as it is served; also its ``send`` and ``receive``.

    :meth:`send` and :meth:`receive` wrap the server's, for every layer inside
    :class:`ObservabilityMiddleware`: they count the bytes, note the response status and put the
    front headers on the response. Methods of the record rather than closures made per request, and
    ``send`` a plain function that returns the server's awaitable rather than a coroutine of its own:
    each request sends at least twice (bench/RESULTS.md section 2i).
    """

    __slots__ = (
        "_receive",
        "_send",
        "artifact_bytes_in",
        "artifact_bytes_out",
        "bytes_in",
        "bytes_out",
        "client",
        "error_code",
        "error_message",
        "error_status",
        "method",
        "metrics",
        "path",
        "request_id",
        "route",
        "started",
        "status",
        "upstream_calls",
        "upstream_seconds",
    )

    def __init__(
        self,
        request_id: str,
        method: str,
        path: str,
        started: float,
        send: Send,
        receive: Receive,
        metrics: GatewayMetrics | None = None,
        client: str = "unknown",
    ) -> None:
        self.request_id = request_id
        self.method = method
        self.path = path
        self.started = started  # time.perf_counter() when the request arrived
        self.metrics = metrics
        self.client = client  # the client's address (the socket's peer), for X-Forwarded-For upstream
        self.route: str | None = None  # the route template, never the raw path
        self.status = 0  # of the response start; 0 until one is sent
        self.upstream_seconds = 0.0  # time to upstream response headers, plus buffered body reads
        self.upstream_calls = 0
        self.bytes_in = 0  # request body bytes received from the client
        self.bytes_out = 0  # response body bytes sent to the client
        self.artifact_bytes_in = 0
        self.artifact_bytes_out = 0
        self.error_status = 0  # of the last error the gateway answered itself (send_error)
        self.error_code: str | None = None
        self.error_message: str | None = None
        self._send = send
        self._receive = receive

    def send(self, message: Message) -> Awaitable[None]:
        """The server's ``send`` for the inner layers: counts body bytes, notes the status, sets the front headers.

        The inner app's own message is changed in place, not copied. Its headers named like a front header
        are dropped: the front's values replace them.
        """
        kind = message["type"]
        if kind == "http.response.body":
            self.bytes_out += len(message.get("body", b""))
        elif kind == "http.response.start":
            self.status = message["status"]
            headers = []  # a loop, not a list comprehension: no function call (Python 3.11)
            for header in message.get("headers", ()):
                if header[0] not in FRONT_HEADER_NAMES:
                    headers.append(header)
            headers += SECURITY_HEADERS
            headers.append((REQUEST_ID_HEADER, self.request_id.encode()))
            message["headers"] = headers
        return self._send(message)

    async def receive(self) -> Message:
        """The server's ``receive`` for the inner layers, counting request body bytes."""
        message = await self._receive()
        if message["type"] == "http.request":
            self.bytes_in += len(message.get("body", b""))
        return message


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("gateway_request", default=None)


def current_request() -> RequestRecord | None:
    """The record of the request being served, or ``None`` outside a request."""
    return _current.get()


def set_route(template: str) -> None:
    """Record the matched route template."""
    record = _current.get()
    if record is not None:
        record.route = template


def note_error(error: GatewayError) -> None:
    """Record an error the gateway answers itself (called by ``send_error``)."""
    record = _current.get()
    if record is not None:
        record.error_status = error.status
        record.error_code = error.error_code
        record.error_message = error.message


def note_upstream(seconds: float, *, call: bool = True) -> None:
    """Add ``seconds`` of upstream time; ``call``: one more upstream call (its headers arrived or it failed)."""
    record = _current.get()
    if record is None:
        return
    record.upstream_seconds += seconds
    if call:
        record.upstream_calls += 1
        if record.metrics is not None:
            record.metrics.upstream_call(seconds)


def note_upstream_error(kind: str) -> None:
    """Count an upstream failure: ``unavailable``, ``timeout`` or ``invalid``."""
    record = _current.get()
    if record is not None and record.metrics is not None:
        record.metrics.upstream_errors.labels(kind).inc()


def note_artifact_bytes(*, received: int = 0, sent: int = 0) -> None:
    """Count artifact bytes received from the client (uploads) or sent to it (downloads)."""
    record = _current.get()
    if record is not None:
        record.artifact_bytes_in += received
        record.artifact_bytes_out += sent


def audit(event: str, **fields: Any) -> None:
    """Write one audit record (``event`` plus the given fields) as a JSON line."""
    if audit_logger.isEnabledFor(logging.INFO):
        record = {"ts": round(time.time(), 3), "event": event, **fields}
        audit_logger.info(orjson.dumps(record, default=str).decode())


class ObservabilityMiddleware:
    """The outermost layer: request id, the request's record, ``/metrics``, the headers every response carries.

    One layer and one ``send`` wrapper for what every request needs, because each layer costs CPU on
    every request (bench/RESULTS.md, the overhead profile):

    - the request id: a well-formed client ``X-Request-Id`` is kept, otherwise one is generated; it is
      put in ``scope["state"]["request_id"]`` and echoed on the response;
    - the :class:`RequestRecord`, in a context variable for the hooks above; its ``status`` tells inner
      layers whether a response has started;
    - ``GET /metrics`` is answered here, before authentication, so the metrics token is never taken
      for a JWT;
    - every response gets the security headers (``X-Frame-Options: DENY``, ``X-Content-Type-Options:
      nosniff``, ``Referrer-Policy: same-origin``) and the request id, replacing any the inner app set;
    - when the response is done: metrics, one access-log line, and a ``denied`` audit record for a
      refusal the gateway made itself. The principal is read from ``scope["state"]`` after the inner
      app ran (the state dict is shared by every layer).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: GatewayMetrics,
        metrics_endpoint: MetricsEndpoint,
        table: RouteTable,
        access_log: bool = True,
        root_path: str = "",
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.metrics_endpoint = metrics_endpoint
        self.table = table
        self.access_log = access_log
        self.root_path = root_path
        self.metrics_path = f"{root_path}/metrics"
        self._handoff = handoff_of(app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                send = self._on_shutdown(send)
            await self.app(scope, receive, send)
            return
        incoming = header_value(scope["headers"], REQUEST_ID_HEADER)
        request_id = incoming.decode() if incoming and _REQUEST_ID.match(incoming) else new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        path: str = scope["path"]
        method: str = scope["method"]
        record = RequestRecord(
            request_id, method, path, perf_counter(), send, receive, self.metrics, client_address(scope)
        )
        context = _current.set(record)
        self.metrics.request_started()
        try:
            app: ASGIApp
            if path == self.metrics_path and method == "GET":
                app = self.metrics_endpoint
            else:
                handoff = self._handoff
                app = self.app if handoff is None else handoff(scope)
            await app(scope, record.receive, record.send)
        finally:
            _current.reset(context)
            self._finish(record, scope, state)  # metrics.request_done(): one request fewer in flight

    def _finish(self, record: RequestRecord, scope: Scope, state: dict[str, Any]) -> None:
        """Count, log and audit a finished request."""
        elapsed = perf_counter() - record.started
        principal = state.get("principal")
        tenant = (principal.tenant or UNAUTHENTICATED_TENANT) if principal is not None else UNAUTHENTICATED_TENANT
        user = principal.user if principal is not None else None
        route = record.route or self._route_of(scope)
        status = record.status or 500  # no response started: the server answers 500
        method = record.method if record.method in _METHODS else "other"
        metrics = self.metrics
        metrics.request_done(tenant, route, method, status, elapsed)
        if record.artifact_bytes_in:
            metrics.artifact_bytes.labels(tenant, "in").inc(record.artifact_bytes_in)
        if record.artifact_bytes_out:
            metrics.artifact_bytes.labels(tenant, "out").inc(record.artifact_bytes_out)
        if 400 <= record.error_status < 500 and record.error_code is not None:
            metrics.denials.labels(record.error_code, str(record.error_status)).inc()
            audit(
                "denied",
                request_id=record.request_id,
                tenant=tenant,
                user=user,
                method=record.method,
                route=route,
                path=record.path[:_MAX_LOGGED_TEXT],
                status=record.error_status,
                error_code=record.error_code,
                reason=(record.error_message or "")[:_MAX_LOGGED_TEXT],
            )
        if self.access_log:  # whether logging lets it out is checked when the batch is written
            line = {
                # Rounded to 3 decimals inline (non-negative values): a function call per figure cost
                # as much as the arithmetic, and round(value, 3) three times more (bench/RESULTS.md 2e).
                # `// 1.0` and float constants: int(...) / 1000 gives the same float (every value is below
                # 2**53) for ~0.5 k instructions more per figure (2i).
                "ts": (time.time() * 1e3 + 0.5) // 1.0 / 1e3,
                "request_id": record.request_id,
                "tenant": tenant,
                "user": user,
                "method": record.method,
                "route": route,
                "path": record.path[:_MAX_LOGGED_TEXT],
                "status": status,
                "latency_ms": (elapsed * 1e6 + 0.5) // 1.0 / 1e3,
                "upstream_ms": (record.upstream_seconds * 1e6 + 0.5) // 1.0 / 1e3,
                "upstream_calls": record.upstream_calls,
                "bytes_in": record.bytes_in,
                "bytes_out": record.bytes_out,
                "error_code": record.error_code,
            }
            write_access_line(orjson.dumps(line))

    def _route_of(self, scope: Scope) -> str:
        """The route template of a request answered before the pipeline matched it (or ``unmatched``)."""
        raw: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        root = self.root_path.encode("ascii")
        if root and raw.startswith(root + b"/"):
            raw = raw[len(root) :]
        try:
            match = self.table.match(scope["method"], canonical_path(raw))
        except GatewayError:
            return UNMATCHED_ROUTE
        return match.route.template if match is not None else UNMATCHED_ROUTE

    def _on_shutdown(self, send: Send) -> Send:
        async def send_and_release(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                self.metrics.process_exiting()
                for handler in _gateway_logger.handlers:
                    handler.flush()  # the access lines still waiting for their batch
            await send(message)

        return send_and_release


class _LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The gateway's stderr handler: one line per record, and a batched path for access-log lines.

    Access-log lines written from the event loop are collected and written together, at most
    ``flush_seconds`` later (or once ``ACCESS_LOG_BATCH_LINES`` wait): one write instead of one per
    request; with ``flush_seconds`` 0, each line is written at once. Every other record first writes
    the collected lines, so the order of lines on stderr is the order they were made; ``flush()``
    (called at exit by ``logging.shutdown``) writes them too. A process killed outright loses at most
    that interval of access lines.
    """

    def __init__(self, flush_seconds: float = ACCESS_LOG_FLUSH_SECONDS) -> None:
        super().__init__()
        self.flush_seconds = flush_seconds
        # A deque: the event loop appends without the lock, the writer takes lines out one by one
        # under it, so a line appended meanwhile is never lost.
        self._pending: collections.deque[bytes] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    def write_line(self, line: bytes) -> bool:
        """Write an already formatted line (UTF-8), as emit() would for a ``%(message)s`` record; False on failure."""
        pending = self._pending
        pending.append(line)
        if self._timer is not None and len(pending) < ACCESS_LOG_BATCH_LINES:
            return True  # most lines: a write is already due
        try:
            loop = asyncio.get_running_loop() if self.flush_seconds > 0 else None
        except RuntimeError:  # no event loop to flush later: write it now
            loop = None
        if loop is None or len(pending) >= ACCESS_LOG_BATCH_LINES:
            with self.lock:  # type: ignore[union-attr]  # what acquire()/release() take, without their calls
                return self._write_pending()
        self._timer = loop.call_later(self.flush_seconds, self._flush_soon)
        return True

    def _flush_soon(self) -> None:
        self._timer = None  # only the event loop's thread touches the timer
        self._write_waiting()

    def _write_waiting(self) -> None:
        """Write the collected lines now, under the handler's lock."""
        self.acquire()
        try:
            self._write_pending()
        finally:
            self.release()

    def _write_pending(self) -> bool:
        """Write the collected lines (the caller holds the lock); False when the stream failed."""
        pending = self._pending
        if not pending:
            return True
        lines = []
        while pending:
            lines.append(pending.popleft())
        if not access_logger.isEnabledFor(logging.INFO):  # e.g. logging.disable(): the lines are dropped
            return True
        if not self._sole_access_destination():
            for line in lines:  # the set-up changed since configure_logging: a record per line
                _access_record(line.decode("utf-8"))
            return True
        newline = self.terminator.encode("utf-8")
        data = newline.join(lines) + newline
        stream = self.stream
        try:
            binary = getattr(stream, "buffer", None)
            if binary is not None:  # bytes as they are: the text layer is flushed first, to keep the order
                stream.flush()
                binary.write(data)
                binary.flush()
            else:
                stream.write(data.decode("utf-8"))
                stream.flush()
        except Exception:  # the caller falls back to a record, whose handler reports the failure
            return False
        return True

    def _sole_access_destination(self) -> bool:
        """Whether an access-log record would reach this handler and nothing else (checked once per batch)."""
        handlers = _gateway_logger.handlers
        return (
            len(handlers) == 1
            and handlers[0] is self
            and not access_logger.handlers
            and not access_logger.filters
            and not _gateway_logger.filters
            and not self.filters
            and self.level <= logging.INFO
            and access_logger.propagate
        )

    def emit(self, record: logging.LogRecord) -> None:
        self._write_waiting()
        super().emit(record)

    def flush(self) -> None:
        self._write_waiting()
        super().flush()


_gateway_logger = logging.getLogger("gateway")


def write_access_line(line: str | bytes) -> None:
    """Write one access-log line (text, or UTF-8 bytes) on the ``gateway.access`` logger.

    With :func:`configure_logging`'s handler in place, the line goes to that handler's batch; when the
    batch is written, the handler checks once that the access log is enabled and that it is still the
    only place such a record would go (the set-up of :func:`configure_logging`, untouched since), and
    writes the lines itself: building a ``LogRecord`` per line and passing it through the logger and
    handler chain cost more than the rest of the access log (bench/RESULTS.md). Any other set-up
    (handlers or filters added by the embedding application) gets a normal record per line.
    """
    data = line.encode("utf-8") if isinstance(line, str) else line
    handler = _own_handler
    if handler is not None and handler.write_line(data):
        return
    if access_logger.isEnabledFor(logging.INFO):
        _access_record(data.decode("utf-8"))


def _access_record(line: str) -> None:
    # A record made here rather than by logger.info(): the caller's frame is never wanted.
    access_logger.handle(logging.LogRecord(access_logger.name, logging.INFO, "", 0, line, None, None))


_own_handler: _LineHandler | None = None  # the handler configure_logging() installed


def configure_logging(level: str, *, access_log_flush_seconds: float = ACCESS_LOG_FLUSH_SECONDS) -> None:
    """Send the gateway's loggers (``gateway``, ``gateway.access``, ``gateway.audit``, ...) to stderr.

    One line per record. ``level`` applies to the gateway's diagnostic messages; the access log
    (switched by ``GATEWAY_ACCESS_LOG``) and the audit log are written at every level. Access-log
    lines wait at most ``access_log_flush_seconds`` to be written in a batch (0: each at once).
    """
    logger = logging.getLogger("gateway")
    if any(getattr(handler, "_gateway", False) for handler in logger.handlers):
        return
    handler = _LineHandler(access_log_flush_seconds)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._gateway = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    global _own_handler
    _own_handler = handler
    logger.setLevel(level.upper())
    logger.propagate = False
    access_logger.setLevel(logging.INFO)
    audit_logger.setLevel(logging.INFO)
