"""The MLflow web UI through the gateway: token login, the session cookie, CSRF, headers, root path.

:class:`UiMiddleware` sits between the request id and the authentication middleware:

- ``GATEWAY_ROOT_PATH``: the prefix is stripped from every incoming path (a request outside it is a
  404); redirects and the cookie path carry it. The UI bundle uses relative URLs, so it works as is.
- ``GET/POST /login`` and ``POST /logout`` are answered here. A pasted token is verified by the
  :class:`~gateway.auth.jwt.Authenticator` exactly like a Bearer token, then sealed into an encrypted
  ``HttpOnly; SameSite=Lax`` cookie (``Secure`` unless ``GATEWAY_UI_INSECURE_COOKIES``) that expires
  no later than the token.
- A request carrying the session cookie gets the token inside as its ``Authorization`` header, so the
  authentication middleware verifies it again on every request. Cookie and ``Authorization`` in one
  request are ambiguous: 400. Neither header nor cookie reaches MLflow (the forward allow-list).
- CSRF: a cookie-authenticated state-changing request must be same-origin (``Origin`` equal to the
  ``Host``, or ``Sec-Fetch-Site: same-origin`` when no ``Origin``) and JSON (artifact uploads excepted);
  otherwise 403. A cross-site form can neither set a JSON content type nor a same-origin ``Origin``.
  Bearer requests are not affected: a browser never adds an ``Authorization`` header by itself.
- ``GET /`` without a session redirects to the login page.
- Every response gets ``X-Frame-Options: DENY``, ``X-Content-Type-Options: nosniff`` and
  ``Referrer-Policy: same-origin``.
"""

from __future__ import annotations

import html
import re
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth.jwt import MAX_TOKEN_BYTES, Authenticator
from gateway.auth.principal import Principal
from gateway.auth.session import COOKIE_NAME, MAX_COOKIE_VALUE_BYTES, InvalidSession, SessionCodec
from gateway.errors import BadRequest, EndpointNotFound, GatewayError, PermissionDenied, Unauthenticated
from gateway.middleware import send_error
from gateway.policy.core import Access, Body, Exchange, Policy, Served
from gateway.settings import Settings

LOGIN_PATH, LOGOUT_PATH = "/login", "/logout"
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
)
_SECURITY_HEADER_NAMES = frozenset(name for name, _ in SECURITY_HEADERS)
_PAGE_CSP = b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
# Artifact uploads carry the file's bytes, not JSON (the Origin check still applies).
_UPLOAD_PATHS = re.compile(r"^/(?:api|ajax-api)/2\.0/(?:mlflow-artifacts/artifacts/.+|mlflow/upload-artifact)$")
_MAX_FORM_BYTES = MAX_TOKEN_BYTES + 1024

# -- route-table entries for the UI (gateway/policy/table.py) -------------------------------------

INDEX = Policy(
    body=Body.NONE,
    access=Access.READ,
    description="UI: MLflow's index.html for a logged-in user (the bundle it loads is public)",
)
# MLflow's answer when telemetry is off (mlflow/telemetry/constant.py FALLBACK_UI_CONFIG).
_TELEMETRY_OFF = orjson.dumps({"disable_ui_telemetry": True, "disable_ui_events": [], "ui_rollout_percentage": 0})


async def _telemetry_off(ex: Exchange, receive: Receive, send: Send) -> None:
    """The UI asks whether to send telemetry: the gateway always says no (nothing is forwarded)."""
    await _send(send, 200, _TELEMETRY_OFF, [(b"content-type", b"application/json"), (b"cache-control", b"no-store")])


TELEMETRY_CONFIG = Served(_telemetry_off, access=Access.READ, description="UI: telemetry is always off")


# -- the middleware ---------------------------------------------------------------------------------


class UiMiddleware:
    """Root path, login/logout pages, session cookie -> credential, CSRF and security headers."""

    def __init__(self, app: ASGIApp, *, settings: Settings, authenticator: Authenticator) -> None:
        self.app = app
        self.authenticator = authenticator
        self.codec = SessionCodec(settings.session_secret) if settings.session_secret else None
        self.root = settings.root_path
        self.secure = not settings.ui_insecure_cookies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = scope.setdefault("state", {}).get("request_id")
        send = _with_security_headers(send)
        try:
            inner = self._strip_root(scope)
            if inner is None:
                await self._redirect(send, "/")
                return
            await self._dispatch(inner, receive, send)
        except GatewayError as error:
            await send_error(send, error, request_id=request_id)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path == LOGIN_PATH:
            if method == "GET":
                await self._login_page(scope, send)
            elif method == "POST":
                await self._login(scope, receive, send)
            else:
                raise EndpointNotFound(f"{method} {path} is not an endpoint")
            return
        if path == LOGOUT_PATH:
            if method != "POST":
                raise EndpointNotFound(f"{method} {path} is not an endpoint")
            if not _same_origin(scope["headers"]):
                raise PermissionDenied("Cross-site logout refused")
            await self._redirect(send, LOGIN_PATH, cookie=self._clear_cookie())
            return
        cookie = _session_cookie(scope["headers"]) if self.codec is not None else None
        has_authorization = any(key == b"authorization" for key, _ in scope["headers"])
        is_index = path == "/" and method == "GET"
        if cookie is None:
            if is_index and not has_authorization:
                await self._redirect(send, LOGIN_PATH)
                return
            await self.app(scope, receive, send)
            return
        if has_authorization:
            raise BadRequest("Send either the session cookie or an Authorization header, not both")
        assert self.codec is not None
        try:
            session = self.codec.decode(cookie)
        except InvalidSession as exc:
            if is_index:
                await self._redirect(send, LOGIN_PATH, cookie=self._clear_cookie())
                return
            raise Unauthenticated(
                f"Browser {exc}: log in again", headers={"Set-Cookie": self._clear_cookie()}
            ) from None
        if method in STATE_CHANGING:
            _check_csrf(scope, path, method)
        if is_index:
            try:
                await self.authenticator.authenticate(session.token)
            except GatewayError:
                await self._redirect(send, LOGIN_PATH, cookie=self._clear_cookie())
                return
        headers = [(key, value) for key, value in scope["headers"] if key != b"cookie"]
        headers.append((b"authorization", f"Bearer {session.token}".encode("latin-1")))
        scope["state"]["session"] = True
        await self.app({**scope, "headers": headers}, receive, send)

    # -- root path --------------------------------------------------------------------------------

    def _strip_root(self, scope: Scope) -> Scope | None:
        """The scope with the root path removed; ``None`` for the bare prefix (redirected to ``prefix/``)."""
        if not self.root:
            return scope
        path: str = scope["path"]
        raw: bytes = scope.get("raw_path") or path.encode("utf-8")
        root = self.root.encode("ascii")
        if path == self.root and raw == root:
            return None
        if not (path.startswith(self.root + "/") and raw.startswith(root + b"/")):
            raise EndpointNotFound(f"This gateway serves only under {self.root}/")
        return {**scope, "path": path[len(self.root) :], "raw_path": raw[len(root) :], "root_path": self.root}

    # -- pages ------------------------------------------------------------------------------------

    async def _login_page(self, scope: Scope, send: Send) -> None:
        principal = None
        cookie = _session_cookie(scope["headers"]) if self.codec is not None else None
        if cookie is not None and self.codec is not None:
            try:
                principal = await self.authenticator.authenticate(self.codec.decode(cookie).token)
            except (InvalidSession, GatewayError):
                principal = None
        await self._page(send, 200, self._login_html(principal=principal))

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.codec is None:
            await self._page(send, 403, self._login_html(error=_NOT_CONFIGURED))
            return
        if not _same_origin(scope["headers"]):
            raise PermissionDenied("Cross-site login refused")
        token = _form_token(scope["headers"], await _read_form(receive))
        try:
            await self.authenticator.authenticate(token)
            session = self.codec.seal(token)
        except GatewayError as error:
            await self._page(send, error.status, self._login_html(error=error.message))
            return
        except InvalidSession as exc:
            await self._page(send, 401, self._login_html(error=str(exc)))
            return
        if session is None:
            await self._page(send, 401, self._login_html(error="Token has expired"))
            return
        value = self.codec.encode(session)
        if len(value) > MAX_COOKIE_VALUE_BYTES:
            await self._page(send, 400, self._login_html(error="This token is too large for a browser cookie"))
            return
        max_age = max(0, session.expires_at - int(time.time()))
        await self._redirect(send, "/", cookie=self._cookie(value, max_age))

    def _login_html(self, *, principal: Principal | None = None, error: str | None = None) -> bytes:
        login, logout, home = (html.escape(self.root + p) for p in (LOGIN_PATH, LOGOUT_PATH, "/"))
        if self.codec is None and error is None:
            error = _NOT_CONFIGURED
        parts = ["<h1>MLflow</h1>"]
        if error:
            parts.append(f'<p class="error" role="alert">{html.escape(error)}</p>')
        if principal is not None:
            parts.append(
                f'<p id="who">Signed in as <b id="user">{html.escape(principal.user)}</b> in tenant '
                f'<b id="tenant">{html.escape(principal.tenant)}</b>.</p>'
                f'<p><a id="open" href="{home}">Open MLflow</a></p>'
                f'<form method="post" action="{logout}"><button id="logout" type="submit">Log out</button></form>'
            )
        else:
            parts.append(
                f'<form method="post" action="{login}"><label for="token">Paste your access token</label>'
                '<textarea id="token" name="token" rows="6" required autocomplete="off" spellcheck="false"></textarea>'
                '<button id="login" type="submit">Log in</button></form>'
            )
        body = "".join(parts)
        return (
            '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>MLflow - log in</title>'
            f"<style>{_STYLE}</style></head><body><main>{body}</main></body></html>"
        ).encode()

    async def _page(self, send: Send, status: int, body: bytes) -> None:
        headers = [
            (b"content-type", b"text/html; charset=utf-8"),
            (b"cache-control", b"no-store"),
            (b"content-security-policy", _PAGE_CSP),
        ]
        await _send(send, status, body, headers)

    async def _redirect(self, send: Send, path: str, *, cookie: str | None = None) -> None:
        headers = [(b"location", (self.root + path).encode("latin-1")), (b"cache-control", b"no-store")]
        if cookie is not None:
            headers.append((b"set-cookie", cookie.encode("latin-1")))
        await _send(send, 303, b"", headers)

    # -- cookies ----------------------------------------------------------------------------------

    def _cookie(self, value: str, max_age: int) -> str:
        attributes = [f"{COOKIE_NAME}={value}", f"Path={self.root or '/'}", f"Max-Age={max_age}"]
        attributes += ["HttpOnly", "SameSite=Lax"]
        if self.secure:
            attributes.append("Secure")
        return "; ".join(attributes)

    def _clear_cookie(self) -> str:
        return self._cookie("", 0)


_NOT_CONFIGURED = "Browser login is not configured on this gateway (GATEWAY_SESSION_SECRET)"
_STYLE = (
    "body{font-family:system-ui,sans-serif;background:#f5f6f8;margin:0}"
    "main{max-width:28rem;margin:10vh auto;background:#fff;padding:2rem;border-radius:8px;"
    "box-shadow:0 1px 4px #0002}h1{margin-top:0;color:#0194e2}label{display:block;margin-bottom:.5rem}"
    "textarea{width:100%;box-sizing:border-box;font-family:monospace}"
    "button{margin-top:1rem;padding:.5rem 1.5rem;background:#0194e2;color:#fff;border:0;border-radius:4px}"
    ".error{color:#b00020}"
)


# -- request checks -----------------------------------------------------------------------------


def _values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[str]:
    return [value.decode("latin-1").strip() for key, value in headers if key == name]


def _session_cookie(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The session cookie's value; two of them are ambiguous (400)."""
    found: list[str] = []
    for header in _values(headers, b"cookie"):
        for pair in header.split(";"):
            name, separator, value = pair.strip().partition("=")
            if separator and name == COOKIE_NAME and value:
                found.append(value)
    if len(found) > 1:
        raise BadRequest("More than one session cookie")
    return found[0] if found else None


def _same_origin(headers: list[tuple[bytes, bytes]]) -> bool:
    """True when the browser says the request comes from this gateway's own pages.

    ``Origin`` (sent by browsers on every state-changing request) must name the ``Host`` the request
    was sent to; without ``Origin``, ``Sec-Fetch-Site`` must be ``same-origin``.
    """
    origins, hosts = _values(headers, b"origin"), _values(headers, b"host")
    if len(origins) > 1 or len(hosts) != 1:
        return False
    if origins:
        parts = urlsplit(origins[0])
        return parts.scheme in ("http", "https") and parts.netloc.lower() == hosts[0].lower()
    return _values(headers, b"sec-fetch-site") == ["same-origin"]


def _check_csrf(scope: Scope, path: str, method: str) -> None:
    """Refuse a cookie-authenticated state-changing request that is cross-site or not JSON."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    if not _same_origin(headers):
        raise PermissionDenied("Cross-site request refused: a session-authenticated change must come from this site")
    if _UPLOAD_PATHS.match(path):
        return
    content_types = _values(headers, b"content-type")
    media = content_types[0].split(";")[0].strip().lower() if len(content_types) == 1 else ""
    if media == "application/json":
        return
    has_body = any(key == b"transfer-encoding" for key, _ in headers) or any(
        value not in ("", "0") for value in _values(headers, b"content-length")
    )
    if method == "DELETE" and not content_types and not has_body:
        return
    raise PermissionDenied("A session-authenticated change must be sent as application/json")


async def _read_form(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("Client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_FORM_BYTES:
            raise BadRequest("Login form is too large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _form_token(headers: list[tuple[bytes, bytes]], body: bytes) -> str:
    media = [value.split(";")[0].strip().lower() for value in _values(headers, b"content-type")]
    if media != ["application/x-www-form-urlencoded"]:
        raise BadRequest("The login form must be application/x-www-form-urlencoded")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("Malformed login form") from None
    tokens = fields.get("token", [])
    if len(tokens) != 1 or not tokens[0].strip():
        raise BadRequest("The login form needs exactly one token")
    token = tokens[0].strip()
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    return token


# -- responses ----------------------------------------------------------------------------------


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _with_security_headers(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers: list[Any] = [h for h in message.get("headers", []) if h[0].lower() not in _SECURITY_HEADER_NAMES]
            headers.extend(SECURITY_HEADERS)
            message = {**message, "headers": headers}
        await send(message)

    return wrapped
