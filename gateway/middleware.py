"""Pure-ASGI middleware: authentication; the error answer and body reader every layer uses.

Each class wraps the next ASGI app, passes non-HTTP scopes through and short-circuits by sending a
response. The whole order is declared once, in :func:`gateway.app.create_app`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.auth.jwt import MAX_TOKEN_BYTES, Authenticator, job_label
from gateway.auth.principal import Principal
from gateway.errors import BadRequest, GatewayError, HeadersTooLarge, Unauthenticated, error_body
from gateway.observability import REQUEST_ID_HEADER, handoff_of, note_error

JOB_LABEL_HEADER = b"x-matih-job-id"
# Authorization values remembered by AuthenticationMiddleware.handoff: at most this many, of at most this many bytes
# (with their tokens).
VERIFIED_VALUES_SIZE = 4096
VERIFIED_VALUES_BYTES = 8 * 1024 * 1024


async def send_error(send: Send, error: GatewayError, *, request_id: str | None = None) -> None:
    """Answer ``error`` in MLflow's JSON error shape (and note it on the request's record: denials are audited)."""
    note_error(error)
    body = error_body(error.error_code, error.message)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    headers.extend((key.lower().encode(), value.encode()) for key, value in error.headers.items())
    if request_id:
        headers.append((REQUEST_ID_HEADER, request_id.encode()))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Receive, *, limit: int, too_large: Callable[[], GatewayError]) -> bytes:
    """Read a whole request body; the error ``too_large()`` makes is raised once it exceeds ``limit`` bytes.

    A client that disconnects first gets 400 (nothing is answered to it anyway).
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("Client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large()
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


@contextlib.asynccontextmanager
async def client_disconnect(receive: Receive) -> AsyncIterator[asyncio.Event]:
    """An event set once the client has gone, for as long as a long response is being sent.

    uvicorn's ``send`` does nothing once the client has disconnected, so a loop relaying a long body
    would otherwise read its source (S3, the upstream) to the end for nobody. Only for a response sent
    after the request body was read: the watcher takes every ``receive()`` message.
    """
    disconnected = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        disconnected.set()

    watcher = asyncio.create_task(watch())
    try:
        yield disconnected
    finally:
        watcher.cancel()


def credential_from_headers(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The JWT of a request: ``Bearer <jwt>`` or ``Basic base64(user:<jwt>)``; ``None`` when absent.

    Two ``Authorization`` headers are ambiguous and refused. Basic auth exists for tools that can
    only send a username and password (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``): the password is
    the token and the username is ignored.
    """
    raw, _ = _auth_headers(headers)
    return None if raw is None else _credential(raw)


def _auth_headers(headers: list[tuple[bytes, bytes]]) -> tuple[bytes | None, bytes | None]:
    """The ``Authorization`` value (two are refused) and the first ``X-Matih-Job-Id`` value, in one pass."""
    raw = job = None
    for key, value in headers:  # a plain loop: the cheapest on the request path
        if key == b"authorization":
            if raw is not None:
                raise BadRequest("More than one Authorization header")
            raw = value
        elif key == JOB_LABEL_HEADER and job is None:
            job = value
    return raw, job


def _credential(raw: bytes) -> str:
    """The token of an ``Authorization`` value (see :func:`credential_from_headers`)."""
    if len(raw) > MAX_TOKEN_BYTES + 16:
        raise HeadersTooLarge("Authorization header is too large")
    text = raw.decode("latin-1")
    if text.startswith("Bearer "):  # the usual spelling, without the general case's splitting
        token = text[7:].strip()
        if token:
            return token
    scheme, _, credentials = text.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer" and credentials:
        return credentials
    if scheme.lower() == "basic" and credentials:
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthenticated("Malformed Basic credentials") from None
        _, separator, password = decoded.partition(":")
        if not separator or not password:
            raise Unauthenticated("Basic credentials must carry the token as the password")
        return password
    raise Unauthenticated("Unsupported Authorization scheme (use Bearer <token>)")


class AuthenticationMiddleware:
    """Verify the request's token and put the :class:`Principal` in ``scope["state"]``.

    Requests to public paths (health, readiness, static UI files) pass without a token; every other
    request without a valid token is answered here (401, or 403 for a token without a usable tenant)
    and never reaches the policy or the upstream. Tokens are only read from the ``Authorization``
    header: never from the query string, never logged. A well-formed ``X-Matih-Job-Id`` header labels
    the caller's runs when the token carries no job claim; it is never an identity.
    """

    def __init__(self, app: ASGIApp, *, authenticator: Authenticator, is_public: Callable[[str], bool]) -> None:
        self.app = app
        self.authenticator = authenticator
        self.is_public = is_public
        self._next_handoff = handoff_of(app)
        # Authorization values whose token was recently verified -> that token: a client sends the same value
        # on every request, and taking the token out of it (decode, strip, hash the new string) cost more
        # than the rest of this layer (bench/RESULTS.md section 2i). Only values of verified tokens enter;
        # whether the token is still valid is asked of the authenticator every time.
        self._verified_values: dict[bytes, str] = {}
        self._verified_values_bytes = 0

    def handoff(self, scope: Scope) -> ASGIApp:
        """The steady state without a coroutine: a recently verified token (or a public path without one).

        Sets the principal as :meth:`__call__` would and returns the next app; this layer itself when
        a token must be verified or the request refused (``__call__`` then does all of it).
        """
        if scope["type"] != "http":
            return self
        try:
            raw, job = _auth_headers(scope["headers"])
            remembered = token = None
            if raw is not None:
                remembered = self._verified_values.get(raw)
                token = remembered or _credential(raw)
        except GatewayError:
            return self
        if token is None:
            if not self.is_public(scope["path"]):
                return self
            principal = None
        else:
            principal = self.authenticator.recently_verified(token)
            if principal is None:
                return self
            if raw is not None and remembered is None:
                self._remember_value(raw, token)
            principal = _with_job_label(principal, job)
        scope.setdefault("state", {})["principal"] = principal
        handoff = self._next_handoff
        return self.app if handoff is None else handoff(scope)

    def _remember_value(self, raw: bytes, token: str) -> None:
        """Remember a verified token's Authorization value; the oldest go first beyond the count or byte bound."""
        values = self._verified_values
        values[raw] = token
        self._verified_values_bytes += len(raw) + len(token)
        while len(values) > VERIFIED_VALUES_SIZE or self._verified_values_bytes > VERIFIED_VALUES_BYTES:
            oldest = next(iter(values))
            self._verified_values_bytes -= len(oldest) + len(values.pop(oldest))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        try:
            raw, job = _auth_headers(scope["headers"])
            token = None if raw is None else _credential(raw)
            principal: Principal | None = None
            if token is None:
                if not self.is_public(scope["path"]):
                    raise Unauthenticated("Authentication required: send 'Authorization: Bearer <token>'")
            else:
                authenticator = self.authenticator
                principal = authenticator.recently_verified(token) or await authenticator.authenticate(token)
                principal = _with_job_label(principal, job)
        except GatewayError as error:
            await send_error(send, error, request_id=state.get("request_id"))
            return
        state["principal"] = principal
        await self.app(scope, receive, send)


def _with_job_label(principal: Principal, raw: bytes | None) -> Principal:
    """``principal`` labelled with a well-formed ``X-Matih-Job-Id`` value (a token's own job claim is kept)."""
    if principal.job is not None:
        return principal
    label = job_label(raw.decode("latin-1").strip()) if raw else None
    return dataclasses.replace(principal, job=label) if label else principal
