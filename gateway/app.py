"""The gateway application: middleware order, lifespan, and the request pipeline.

observability (request id, record, response headers) -> UI (login, session cookie) -> authentication
-> rate limits -> canonicalise (path, query, body) -> route table (deny by default)
-> policy request steps -> forward upstream -> policy response steps (buffered responses only)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.artifacts.s3 import ArtifactStore, store_from_environment
from gateway.auth.jwt import Authenticator
from gateway.auth.principal import ADMIN, EDITOR, VIEWER, Principal
from gateway.errors import (
    BadRequest,
    EndpointNotFound,
    GatewayError,
    PayloadTooLarge,
    PermissionDenied,
    Unauthenticated,
)
from gateway.http.canonical import (
    canonical_path,
    dump_json,
    parse_json_message,
    parse_json_object,
    parse_query,
)
from gateway.http.forward import encode_query, quote_path, send_upstream_response, upstream_headers
from gateway.http.upstream import UpstreamClient
from gateway.limits import rate_limit_middleware, refuse_declared_oversize
from gateway.metrics import GatewayMetrics, MetricsEndpoint
from gateway.middleware import AuthenticationMiddleware, read_body, send_error
from gateway.observability import ObservabilityMiddleware, audit, current_request, set_route
from gateway.policy.core import Access, Body, Deny, Exchange, Local, Policy, Served, Services
from gateway.policy.ownership import Ownership
from gateway.policy.router import RouteTable
from gateway.policy.table import TABLE
from gateway.settings import Settings
from gateway.ui import UiMiddleware

logger = logging.getLogger("gateway")

ROLE_FOR_ACCESS = {Access.READ: VIEWER, Access.WRITE: EDITOR, Access.ADMIN: ADMIN}
# Enum members as module globals for the request path: `Body.RAW` is an attribute look-up on the enum
# class, ~1 k instructions in Python 3.11; a global is a dict look-up (bench/RESULTS.md section 2e).
BODY_NONE, BODY_RAW, BODY_STREAM = Body.NONE, Body.RAW, Body.STREAM
PUBLIC_PREFIXES = ("/static-files/", "/build/")
PUBLIC_PATHS = frozenset({"/health", "/ready"})
# Set to True in the ASGI lifespan state by the server when it starts draining (gateway/serving.py):
# from then on /ready answers 503 so load balancers stop sending, while requests are still served.
DRAINING_STATE_KEY = "gateway.draining"


def is_public_path(path: str) -> bool:
    """Paths served without a token: liveness, readiness and the static UI bundle."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class Gateway:
    """The innermost ASGI app: canonicalise, look up the route, run the policy, forward."""

    def __init__(
        self,
        settings: Settings,
        table: RouteTable = TABLE,
        artifact_store: ArtifactStore | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.table = table
        self.artifact_store = artifact_store
        self.metrics = metrics
        self.services: Services | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Any = None) -> AsyncIterator[None]:
        """Create the shared upstream client and caches; close them on shutdown."""
        upstream = UpstreamClient(
            self.settings.upstream_url,
            connect_timeout=self.settings.upstream_connect_timeout,
            timeout=self.settings.upstream_timeout,
            pool_size=self.settings.upstream_pool_size,
        )
        await upstream.start()
        artifacts = self.artifact_store
        if artifacts is None and self.settings.artifacts_destination:
            artifacts = store_from_environment(
                self.settings.artifacts_destination,
                public_endpoint_url=self.settings.s3_public_endpoint_url,
                presign_ttl_seconds=self.settings.presigned_url_ttl_seconds,
                connect_timeout=self.settings.upstream_connect_timeout,
                read_timeout=self.settings.upstream_timeout,
            )
        self.services = Services(
            settings=self.settings,
            upstream=upstream,
            ownership=Ownership(upstream, max_size=self.settings.cache_size),
            artifacts=artifacts,
        )
        if self.metrics is not None:
            self.metrics.track_caches(self.services.ownership.caches())
        try:
            yield
        finally:
            await upstream.close()
            self.services = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request: the whole pipeline in this one coroutine.

        One frame, not three (handle, forward): every coroutine frame of the chain is entered again
        each time the request resumes from an upstream wait (bench/RESULTS.md section 2e).
        """
        if scope["type"] == "lifespan":
            await _run_lifespan(self, receive, send)
            return
        if scope["type"] != "http":  # websockets: MLflow has none
            return
        state = scope.setdefault("state", {})
        request_id: str = state.get("request_id", "-")
        try:
            services = self.services
            if services is None:
                raise GatewayError("Gateway is not started")
            method: str = scope["method"]
            raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
            match = self.table.match_static_raw(method, raw_path)
            if match is not None:
                path = match.route.template  # the request path is this template, byte for byte
            else:
                path = canonical_path(raw_path)
                match = self.table.match(method, path)
                if match is None:
                    raise PermissionDenied(f"{method} {path} is not an endpoint the gateway allows")
            set_route(match.route.template)
            action = match.route.action
            if isinstance(action, Deny):
                raise action.error()
            if isinstance(action, Local):
                await self._local(action, services, send, draining=bool(state.get(DRAINING_STATE_KEY)))
                return
            principal = state.get("principal")
            authenticated = action.authenticated if isinstance(action, Policy) else True
            if authenticated and principal is None:
                raise Unauthenticated("Authentication required: send 'Authorization: Bearer <token>'")
            if principal is not None and principal.level < action.access:  # access_level(), computed once
                raise PermissionDenied(f"This operation needs the '{ROLE_FOR_ACCESS[action.access]}' role")
            admin_view = principal is not None and principal.platform_admin
            if admin_view:
                action = _platform_admin_view(action, principal, method, path, request_id)
            body_kind = action.body
            body_limit = self.settings.max_body_bytes if body_kind is BODY_STREAM else self.settings.max_json_body_bytes
            # 413 before reading a body declared too large.
            has_body = refuse_declared_oversize(scope["headers"], body_limit)
            query = parse_query(scope.get("query_string", b""))
            raw_body = b""
            body = None
            if body_kind is not BODY_STREAM:
                if has_body:
                    raw_body = await read_body(
                        receive,
                        limit=body_limit,
                        too_large=lambda: PayloadTooLarge(f"Request body exceeds {body_limit} bytes"),
                    )
                if has_body or body_kind is not BODY_NONE:  # a bodiless route without a body: nothing to parse
                    body = _parse_body(action, method, raw_body, normalise=not admin_view)
            ex = Exchange(
                principal,
                method,
                path,
                match.params,
                query,
                body,
                services,
                request_id,
                raw_body if body_kind is BODY_RAW else b"",
                scope["headers"],
            )
            if isinstance(action, Served):
                await action.handler(ex, receive, send)
                return
            for step in action.request:
                pending = step(ex)  # None: decided without waiting (RequestStep)
                if pending is not None:
                    await pending
            # Forward: the checked request, re-serialised.
            content = dump_json(ex.body) if ex.body is not None else None
            headers = upstream_headers(scope, ex, content_type="application/json" if content is not None else None)
            if body_kind is BODY_RAW:  # the checked bytes a step left; its content type is in forward_headers
                content = ex.raw_body
            # The path was decoded once for checking: re-encode it (quote_path says why). A path without
            # parameters is a route template itself, which the route table checked needs no encoding.
            target = quote_path(ex.path) if ex.path_params else ex.path
            if ex.query:
                target += f"?{encode_query(ex.query)}"
            response = await services.upstream.send(ex.method, target, headers=headers, body=content)
            try:
                await send_upstream_response(ex, action, response, receive, send)
            finally:
                response.close()
        except GatewayError as error:
            if _response_started():  # too late for an error answer
                raise
            await send_error(send, error, request_id=request_id)
        except Exception:
            # A defect, not a policy decision: log it with the request id, answer MLflow's shape.
            logger.exception("unhandled error (request id %s)", request_id)
            if _response_started():
                raise
            await send_error(send, GatewayError("Internal gateway error"), request_id=request_id)

    async def _local(self, action: Local, services: Services, send: Send, *, draining: bool = False) -> None:
        if action.name not in ("health", "ready"):  # UI pages are answered by UiMiddleware, never here
            raise EndpointNotFound(f"{action.name} is not served here")
        status, payload = 200, {"status": "ok"}
        if action.name == "ready" and draining:
            status, payload = 503, {"status": "draining"}
        elif action.name == "ready":
            try:
                response = await services.upstream.send("GET", "/health", headers={"accept": "*/*"})
                await response.read()
                ready = response.status == 200
            except GatewayError:
                ready = False
            status, payload = (200, {"status": "ready"}) if ready else (503, {"status": "upstream unavailable"})
        body = orjson.dumps(payload)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"cache-control", b"no-store")],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _response_started() -> bool:
    """Whether the current request's response has started (its record is kept by ObservabilityMiddleware)."""
    record = current_request()
    assert record is not None, "the pipeline runs inside ObservabilityMiddleware (create_app)"
    return bool(record.status)


def _platform_admin_view(
    action: Policy | Served, principal: Principal, method: str, path: str, request_id: str
) -> Policy | Served:
    """Platform administrators read every tenant's objects as stored upstream, and never write.

    A forwarded route's tenancy steps are dropped (no scoping, no prefix stripping): the answer shows
    real stored names. Routes the gateway serves itself skip their ownership checks for them. Every
    such request is written to the audit log.
    """
    if action.access is not Access.READ:
        audit("platform_admin_denied", user=principal.user, method=method, path=path, request_id=request_id)
        raise PermissionDenied("Platform administrators are read-only")
    audit("platform_admin_read", user=principal.user, method=method, path=path, request_id=request_id)
    if isinstance(action, Served):
        return action
    return Policy(body=action.body, access=Access.READ, description="platform-admin read of stored objects")


def _parse_body(action: Policy | Served, method: str, raw: bytes, *, normalise: bool = True) -> dict[str, Any] | None:
    if action.body is BODY_RAW:
        return None
    if action.body is BODY_NONE:
        if raw.strip():
            raise BadRequest(f"A {method} request to this endpoint must not carry a body")
        return None
    return parse_json_message(raw) if normalise else parse_json_object(raw)


async def _run_lifespan(gateway: Gateway, receive: Receive, send: Send) -> None:
    message = await receive()
    assert message["type"] == "lifespan.startup"
    try:
        async with gateway.lifespan():
            await send({"type": "lifespan.startup.complete"})
            message = await receive()
            assert message["type"] == "lifespan.shutdown"
    except Exception as exc:  # startup failure must be reported, not swallowed
        logger.exception("gateway startup failed")
        await send({"type": "lifespan.startup.failed", "message": str(exc)})
        return
    await send({"type": "lifespan.shutdown.complete"})


def create_app(
    settings: Settings, *, table: RouteTable = TABLE, artifact_store: ArtifactStore | None = None
) -> ASGIApp:
    """The whole gateway as one ASGI app; the middleware order is declared here, once.

    ``artifact_store`` replaces the S3 store built from the settings (tests use a recording one).
    """
    metrics = GatewayMetrics()
    gateway = Gateway(settings, table, artifact_store, metrics)
    authenticator = Authenticator.from_settings(settings)
    rate_limits = rate_limit_middleware(settings, is_public=is_public_path)  # None: no limit configured
    stack: list[Callable[[ASGIApp], ASGIApp]] = [
        lambda app: ObservabilityMiddleware(
            app,
            metrics=metrics,
            metrics_endpoint=MetricsEndpoint(
                metrics, token=settings.metrics_token, allow_networks=settings.metrics_allow_networks
            ),
            table=table,
            access_log=settings.access_log,
            root_path=settings.root_path,
        ),
        lambda app: UiMiddleware(app, settings=settings, authenticator=authenticator),
        lambda app: AuthenticationMiddleware(app, authenticator=authenticator, is_public=is_public_path),
        *([rate_limits] if rate_limits is not None else []),
    ]
    app: ASGIApp = gateway
    for wrap in reversed(stack):
        app = wrap(app)
    return app
