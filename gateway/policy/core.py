"""What a policy is: small named request and response steps over one :class:`Exchange`.

A route's entry in the table is either a :class:`Policy` (steps that check and rewrite the request,
then the response) or a :class:`Deny` with its reason. A request step may raise a
:class:`~gateway.errors.GatewayError` to answer locally, so the upstream is never called.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Any

from starlette.types import Receive, Send

from gateway.auth.principal import Principal
from gateway.errors import PermissionDenied, Unauthenticated
from gateway.http.canonical import JsonObject, Query

if TYPE_CHECKING:
    from gateway.artifacts.s3 import ArtifactStore
    from gateway.http.upstream import UpstreamClient
    from gateway.policy.ownership import Ownership
    from gateway.settings import Settings


class Access(IntEnum):
    """What an operation needs; a caller's roles grant a level (see :func:`gateway.auth.principal.access_of`)."""

    READ = 1  # gets, lists and searches: viewer and up
    WRITE = 2  # everything a tenant may do to its own objects: editor and up
    ADMIN = 3  # destructive operations the table marks admin-only: admin


class Body(Enum):
    """How a route's request body is handled."""

    NONE = "none"  # no body allowed (GET, DELETE without body); a body is a 400
    JSON = "json"  # one JSON object, parsed strictly, checked, re-serialised
    STREAM = "stream"  # opaque bytes streamed untouched (artifact uploads)
    # Opaque bytes buffered (same size limit as JSON) in ``Exchange.raw_body`` for a request step
    # that decodes, checks and replaces them; ``raw_body`` is forwarded as the step left it (OTLP).
    RAW = "raw"


@dataclass(frozen=True)
class Services:
    """Shared clients and caches, created once in the app lifespan."""

    settings: Settings
    upstream: UpstreamClient
    ownership: Ownership
    # The gateway's own S3 access to the artifacts destination (None when not configured).
    artifacts: ArtifactStore | None = None


class Exchange:
    """One request as the policy steps see it; steps rewrite ``query``/``body`` in place.

    A plain slotted class with its own ``__init__``: one is made per request, and a dataclass's
    generated one (default factories, an instance dict) cost twice as much (bench/RESULTS.md 2e).
    """

    __slots__ = (
        "_headers",
        "body",
        "forward_headers",
        "method",
        "notes",
        "path",
        "path_params",
        "principal",
        "query",
        "raw_body",
        "raw_headers",
        "request_id",
        "services",
    )

    def __init__(
        self,
        principal: Principal | None,
        method: str,
        path: str,
        path_params: dict[str, str],
        query: Query,
        body: JsonObject | None,
        services: Services,
        request_id: str,
        raw_body: bytes = b"",
        raw_headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        self.principal = principal
        self.method = method
        self.path = path
        self.path_params = path_params
        self.query = query
        self.body = body
        self.services = services
        self.request_id = request_id
        # What the response phase may need from the request phase (e.g. the owned experiment id).
        self.notes: dict[str, Any] = {}
        # Body.RAW routes only: the request body bytes (a step may replace them with a checked form).
        self.raw_body = raw_body
        # The request headers as the server gave them (lower-case names); see ``headers``.
        self.raw_headers = raw_headers
        # Headers a step checked and wants sent upstream, on top of the built allow-list (e.g. OTLP's
        # ``x-mlflow-experiment-id`` once its experiment is known to be the caller's).
        self.forward_headers: dict[str, str] = {}
        self._headers: dict[str, list[str]] | None = None

    @property
    def headers(self) -> dict[str, list[str]]:
        """The request headers by lower-case name, every value kept (so steps can refuse duplicates).

        Built on first use: few routes read headers (Body.RAW ones), every request would pay for it.
        """
        if self._headers is None:
            headers: dict[str, list[str]] = {}
            for key, value in self.raw_headers:
                headers.setdefault(key.decode("latin-1").lower(), []).append(value.decode("latin-1"))
            self._headers = headers
        return self._headers

    @property
    def caller(self) -> Principal:
        """The verified caller; only public routes (which have no steps) run without one."""
        if self.principal is None:
            raise Unauthenticated("Authentication required: send 'Authorization: Bearer <token>'")
        return self.principal

    @property
    def tenant(self) -> str:
        """The caller's tenant (from the verified token)."""
        return self.caller.tenant

    def json_body(self) -> JsonObject:
        """The request body of a JSON route (an empty object when the client sent none)."""
        if self.body is None:
            self.body = {}
        return self.body


# A request step is usually a coroutine function. A step that can often decide without waiting may be
# a plain function returning ``None`` when it is done, or an awaitable for the rest: no coroutine is
# made in its steady state (bench/RESULTS.md section 2e).
RequestStep = Callable[[Exchange], Awaitable[None] | None]
# A response step rewrites the decoded JSON response body in place. It runs on buffered responses
# only, with the upstream status: most steps act on 2xx, error-message steps on 4xx.
ResponseStep = Callable[[Exchange, int, JsonObject], None]


@dataclass(frozen=True)
class Policy:
    """A route that is forwarded after its request steps, with its response steps applied."""

    request: tuple[RequestStep, ...] = ()
    # A successful response is buffered only when one of these steps rewrites it (design rule 10).
    response: tuple[ResponseStep, ...] = ()
    body: Body = Body.JSON
    access: Access = Access.WRITE
    authenticated: bool = True
    description: str = ""


@dataclass(frozen=True)
class Deny:
    """A route the gateway refuses, with the reason shown to the caller and kept in the table."""

    reason: str

    def error(self) -> PermissionDenied:
        """The refusal answered for this route."""
        return PermissionDenied(f"This MLflow endpoint is disabled by the gateway: {self.reason}")


# A handler the gateway runs itself instead of forwarding (artifact bytes go between the client and
# S3, never through MLflow). It gets the checked Exchange and the raw ASGI receive/send.
ServeHandler = Callable[[Exchange, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class Served:
    """A route answered by the gateway itself, after authentication and the role check."""

    handler: ServeHandler
    access: Access
    body: Body = Body.NONE  # NONE or JSON are parsed by the pipeline; STREAM leaves ``receive`` to the handler
    description: str = ""


Action = Policy | Deny | Served


@dataclass(frozen=True)
class Local:
    """A route the gateway answers itself (health, readiness) without calling a policy."""

    name: str
    authenticated: bool = False
