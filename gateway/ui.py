"""The MLflow web UI through the gateway: token login, the session cookie, CSRF, headers, root path.

:class:`UiMiddleware` sits between the observability (request id) and the authentication middleware:

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
- With an OpenID Connect client configured (``GATEWAY_OIDC_CLIENT_ID``), the login page also offers
  "Sign in with <IdP>": ``GET /oidc/login`` redirects to the provider, ``GET /oidc/callback`` opens
  the session (:mod:`gateway.auth.oidc_login`); a session whose access token is about to expire is
  refreshed here, once, before the request goes on (the new cookie rides on the response); logout
  also ends the provider's session when it has an end-session endpoint. A session too large for one
  cookie is split into several (:func:`gateway.auth.session.split_value`).
- Every response gets ``X-Frame-Options: DENY``, ``X-Content-Type-Options: nosniff`` and
  ``Referrer-Policy: same-origin`` from the outermost layer (:mod:`gateway.observability`).
"""

from __future__ import annotations

import html
import logging
import re
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth.jwt import MAX_TOKEN_BYTES, Authenticator
from gateway.auth.oidc_login import (
    CALLBACK_PATH,
    LOGIN_START_PATH,
    STATE_COOKIE,
    STATE_TTL_SECONDS,
    OidcLogin,
    OidcLoginError,
)
from gateway.auth.principal import Principal
from gateway.auth.session import (
    COOKIE_NAME,
    MAX_CHUNKS,
    InvalidSession,
    Session,
    SessionCodec,
    chunk_name,
    split_value,
)
from gateway.errors import BadRequest, EndpointNotFound, GatewayError, PermissionDenied, Unauthenticated
from gateway.middleware import read_body, send_error
from gateway.observability import handoff_of, header_value
from gateway.policy.core import Access, Body, Exchange, Policy, Served
from gateway.settings import Settings

logger = logging.getLogger("gateway.ui")

LOGIN_PATH, LOGOUT_PATH = "/login", "/logout"
# Paths this layer may answer itself ("/" redirects a browser without a session to the login page).
_OWN_PATHS = frozenset({"/", LOGIN_PATH, LOGOUT_PATH, LOGIN_START_PATH, CALLBACK_PATH})
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_PAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'{}; frame-ancestors 'none'"
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
    """Root path, login/logout pages, session cookie -> credential and CSRF."""

    def __init__(self, app: ASGIApp, *, settings: Settings, authenticator: Authenticator) -> None:
        self.app = app
        self.authenticator = authenticator
        self.codec = SessionCodec(settings.session_secret) if settings.session_secret else None
        self.root = settings.root_path
        self.secure = not settings.ui_insecure_cookies
        self.oidc = OidcLogin(settings, authenticator) if settings.oidc_client_id and settings.session_secret else None
        # The logout form's redirect may continue to the provider's end-session endpoint: CSP's
        # form-action governs redirects after a form submission too.
        extra = f" {self.oidc.end_session_origin}" if self.oidc is not None else ""
        self._csp = _PAGE_CSP.format(extra).encode("latin-1")
        self._next_handoff = handoff_of(app)

    def _passes(self, scope: Scope) -> bool:
        """An API call (most requests): no page of this layer, no browser session to turn into a token."""
        return (
            not self.root
            and scope["path"] not in _OWN_PATHS
            and (self.codec is None or header_value(scope["headers"], b"cookie") is None)
        )

    def handoff(self, scope: Scope) -> ASGIApp:
        """The next app for a request this layer passes on as it is (see :func:`gateway.observability.handoff_of`)."""
        if scope["type"] != "http" or not self._passes(scope):
            return self
        handoff = self._next_handoff
        return self.app if handoff is None else handoff(scope)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._passes(scope):
            await self.app(scope, receive, send)
            return
        request_id = scope.setdefault("state", {}).get("request_id")
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
            await self._logout(scope, send)
            return
        if path in (LOGIN_START_PATH, CALLBACK_PATH) and self.oidc is not None:
            if method != "GET":
                raise EndpointNotFound(f"{method} {path} is not an endpoint")
            await (self._oidc_start(scope, send) if path == LOGIN_START_PATH else self._oidc_callback(scope, send))
            return
        cookie = _session_cookie(scope["headers"]) if self.codec is not None else None
        is_index = path == "/" and method == "GET"
        if cookie is None:
            if is_index and not _has_authorization(scope["headers"]):
                await self._redirect(send, LOGIN_PATH)
                return
            await self.app(scope, receive, send)
            return
        if _has_authorization(scope["headers"]):
            raise BadRequest("Send either the session cookie or an Authorization header, not both")
        assert self.codec is not None
        try:
            session = self.codec.decode(cookie)
        except InvalidSession as exc:
            await self._session_ended(scope, send, is_index=is_index, reason=f"Browser {exc}")
            return
        if method in STATE_CHANGING:
            _check_csrf(scope, path, method)
        if self.oidc is not None and self.oidc.needs_refresh(session):
            try:
                session = await self.oidc.refresh(session)
                refreshed = self._session_cookies(session, scope)
            except OidcLoginError as error:
                await self._session_ended(scope, send, is_index=is_index, reason=f"Session refresh failed: {error}")
                return
            send = _with_cookies(send, refreshed)
        if is_index:
            try:
                await self.authenticator.authenticate(session.token)
            except GatewayError:
                await self._redirect(send, LOGIN_PATH, cookies=self._clear_cookies(scope))
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

    async def _session_ended(self, scope: Scope, send: Send, *, is_index: bool, reason: str) -> None:
        """A dead session: the index goes to the login page, an API call gets 401; the cookies are cleared."""
        if is_index:
            await self._redirect(send, LOGIN_PATH, cookies=self._clear_cookies(scope))
            return
        error = Unauthenticated(f"{reason}: log in again")
        await send_error(
            _with_cookies(send, self._clear_cookies(scope)), error, request_id=scope["state"].get("request_id")
        )

    # -- OpenID Connect -----------------------------------------------------------------------------

    async def _oidc_start(self, scope: Scope, send: Send) -> None:
        """Redirect to the provider; the state, nonce and PKCE verifier ride in a short-lived cookie."""
        assert self.oidc is not None
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        targets = query.get("next", [])
        try:
            if len(targets) > 1:
                raise OidcLoginError(400, "One page to return to, please")
            url, state = await self.oidc.start(targets[0] if targets else None)
        except OidcLoginError as error:
            await self._page(send, error.status, self._login_html(error=error.message))
            return
        cookie = self._cookie(STATE_COOKIE, state, STATE_TTL_SECONDS, path=f"{self.root}/oidc")
        await self._redirect(send, url, cookies=[cookie], absolute=True)

    async def _oidc_callback(self, scope: Scope, send: Send) -> None:
        """Finish the login; any failure is an HTML page (400/401/503) and clears the state cookie."""
        assert self.oidc is not None
        clear_state = self._cookie(STATE_COOKIE, "", 0, path=f"{self.root}/oidc")
        try:
            query = parse_qs(scope.get("query_string", b"").decode("utf-8"), keep_blank_values=True)
            session, return_to = await self.oidc.finish(query, _cookie_value(scope["headers"], STATE_COOKIE))
            cookies = self._session_cookies(session, scope)
        except UnicodeDecodeError:
            await self._page(send, 400, self._login_html(error="Malformed callback"), cookies=[clear_state])
            return
        except OidcLoginError as error:
            await self._page(send, error.status, self._login_html(error=error.message), cookies=[clear_state])
            return
        except GatewayError:
            raise
        except Exception:
            # A defect or an answer nobody foresaw: say so plainly (logged with the request id), never a 500.
            logger.exception("OIDC callback failed (request id %s)", scope["state"].get("request_id"))
            page = self._login_html(error="The login could not be completed: try again")
            await self._page(send, 502, page, cookies=[clear_state])
            return
        await self._redirect(send, return_to, cookies=[clear_state, *cookies])

    async def _logout(self, scope: Scope, send: Send) -> None:
        """Clear the session; with an OIDC provider that can, end the provider's session too."""
        target: str | None = None
        if self.oidc is not None:
            session: Session | None = None
            cookie = _session_cookie(scope["headers"]) if self.codec is not None else None
            if cookie is not None and self.codec is not None:
                try:
                    session = self.codec.decode(cookie)
                except InvalidSession:
                    session = None
            if session is not None and (session.refresh_token or session.id_token):  # an OIDC login's session
                target = await self.oidc.end_session_url(session)
        if target is not None:
            await self._redirect(send, target, cookies=self._clear_cookies(scope), absolute=True)
        else:
            await self._redirect(send, LOGIN_PATH, cookies=self._clear_cookies(scope))

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
        token = _form_token(
            scope["headers"],
            await read_body(receive, limit=_MAX_FORM_BYTES, too_large=lambda: BadRequest("Login form is too large")),
        )
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
        try:
            cookies = self._session_cookies(session, scope)
        except OidcLoginError as error:
            await self._page(send, error.status, self._login_html(error=error.message))
            return
        await self._redirect(send, "/", cookies=cookies)

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
            if self.oidc is not None:
                start = html.escape(self.root + LOGIN_START_PATH)
                name = html.escape(self.oidc.provider_name)
                parts.append(f'<p><a id="oidc-login" class="button" href="{start}">Sign in with {name}</a></p>')
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

    async def _page(self, send: Send, status: int, body: bytes, *, cookies: Iterable[str] = ()) -> None:
        headers = [
            (b"content-type", b"text/html; charset=utf-8"),
            (b"cache-control", b"no-store"),
            (b"content-security-policy", self._csp),
        ]
        headers.extend((b"set-cookie", cookie.encode("latin-1")) for cookie in cookies)
        await _send(send, status, body, headers)

    async def _redirect(self, send: Send, path: str, *, cookies: Iterable[str] = (), absolute: bool = False) -> None:
        """303 to ``path`` under the root path (or, ``absolute``, to exactly that URL: the IdP's)."""
        location = path if absolute else self.root + path
        headers = [(b"location", location.encode("latin-1")), (b"cache-control", b"no-store")]
        headers.extend((b"set-cookie", cookie.encode("latin-1")) for cookie in cookies)
        await _send(send, 303, b"", headers)

    # -- cookies ----------------------------------------------------------------------------------

    def _cookie(self, name: str, value: str, max_age: int, *, path: str | None = None) -> str:
        attributes = [f"{name}={value}", f"Path={path or self.root or '/'}", f"Max-Age={max_age}"]
        attributes += ["HttpOnly", "SameSite=Lax"]
        if self.secure:
            attributes.append("Secure")
        return "; ".join(attributes)

    def _session_cookies(self, session: Session, scope: Scope) -> list[str]:
        """The session's cookies: its value in as many chunks as it needs; stale chunks the browser sent cleared."""
        assert self.codec is not None
        chunks = split_value(self.codec.encode(session))
        if len(chunks) > MAX_CHUNKS and session.id_token is not None:
            # Too large even in chunks: drop the logout hint (logout then names the client only).
            chunks = split_value(self.codec.encode(Session(session.token, session.expires_at, session.refresh_token)))
        if len(chunks) > MAX_CHUNKS:
            raise OidcLoginError(400, "This login's tokens are too large for browser cookies")
        max_age = max(0, session.expires_at - int(time.time()))
        cookies = [self._cookie(chunk_name(index), chunk, max_age) for index, chunk in enumerate(chunks)]
        sent = _cookie_names(scope["headers"])
        cookies += [self._cookie(chunk_name(i), "", 0) for i in range(len(chunks), MAX_CHUNKS) if chunk_name(i) in sent]
        return cookies

    def _clear_cookies(self, scope: Scope) -> list[str]:
        """Clear the session: its first cookie, and every other chunk the browser sent."""
        sent = _cookie_names(scope["headers"])
        return [self._cookie(chunk_name(i), "", 0) for i in range(MAX_CHUNKS) if i == 0 or chunk_name(i) in sent]


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


def _cookie_value(headers: Iterable[tuple[bytes, bytes]], cookie: str) -> str | None:
    """The value of cookie ``cookie``; two of them are ambiguous (400)."""
    found: list[str] = []
    for header in _values(headers, b"cookie"):
        for pair in header.split(";"):
            name, separator, value = pair.strip().partition("=")
            if separator and name == cookie and value:
                found.append(value)
    if len(found) > 1:
        raise BadRequest(f"More than one {cookie} cookie")
    return found[0] if found else None


def _cookie_names(headers: Iterable[tuple[bytes, bytes]]) -> set[str]:
    """The names of the cookies a request carries."""
    return {pair.strip().partition("=")[0] for header in _values(headers, b"cookie") for pair in header.split(";")}


def _has_authorization(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(key == b"authorization" for key, _ in headers)


def _session_cookie(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The session cookie's value, its chunks joined in order; two of one chunk are ambiguous (400)."""
    first = _cookie_value(headers, COOKIE_NAME)
    if first is None:
        return None
    chunks = [first]
    for index in range(1, MAX_CHUNKS):
        chunk = _cookie_value(headers, chunk_name(index))
        if chunk is None:
            break
        chunks.append(chunk)
    return "".join(chunks)


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


def _with_cookies(send: Send, cookies: list[str]) -> Send:
    """``send`` that adds ``Set-Cookie`` headers to the response (a refreshed session rides on any answer)."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers: list[Any] = list(message.get("headers", []))
            headers.extend((b"set-cookie", cookie.encode("latin-1")) for cookie in cookies)
            message = {**message, "headers": headers}
        await send(message)

    return wrapped
