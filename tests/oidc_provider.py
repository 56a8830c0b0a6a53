"""A small, strict OpenID Connect provider for tests, served by uvicorn on 127.0.0.1.

It implements what the gateway's browser login uses, and checks what a real provider checks:

- ``/.well-known/openid-configuration`` (discovery) and ``/jwks`` (one RSA key, ``kid`` set);
- ``GET /authorize``: validates the client, the exact redirect URI, ``response_type=code`` and a PKCE
  ``S256`` challenge, then shows a tiny login page: one button per user (``#user-acme-alice``,
  ``#user-globex-bob``); ``POST /authorize`` issues a one-time code and redirects back with ``state``;
- ``POST /token``: client authentication (Basic or form secret for a confidential client, ``client_id``
  alone for a public one), ``authorization_code`` (one-time code, same redirect URI, PKCE verifier
  hashed against the challenge) and ``refresh_token`` (rotated: the old one stops working);
- ``GET /logout``: RP-initiated logout; checks ``post_logout_redirect_uri``, revokes the user's refresh
  tokens, redirects back.

Tokens are RS256 JWTs with ``iss``, ``aud``, ``sub``, ``tenant_id``, ``roles``, ``exp`` (and ``nonce``
in the ID token). Knobs on :class:`ProviderConfig` make it misbehave for the attack tests (wrong
audience, wrong nonce, opaque access tokens, huge tokens, short lifetimes). Every token request is
recorded (without the client secret) for assertions.
"""

from __future__ import annotations

import base64
import hashlib
import html
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from tests.app.conftest import ServerThread

USERS: dict[str, dict[str, Any]] = {
    "acme-alice": {"sub": "alice", "tenant_id": "acme", "roles": ["editor"], "email": "alice@acme.example"},
    "globex-bob": {"sub": "bob", "tenant_id": "globex", "roles": ["editor"], "email": "bob@globex.example"},
}


@dataclass
class ProviderConfig:
    """The registered client and the knobs the tests turn."""

    client_id: str = "mlflow-gateway"
    client_secret: str | None = "provider-test-client-secret"
    redirect_uris: list[str] = field(default_factory=list)
    post_logout_redirect_uris: list[str] = field(default_factory=list)
    access_token_seconds: int = 300
    access_audience: str = "mlflow"
    id_token_audience: str | None = None  # None: the client id (a wrong one for the audience attack)
    id_token_nonce: str | None = None  # None: the nonce of the request (a wrong one for the nonce attack)
    opaque_access_tokens: bool = False
    claim_padding: int = 0  # bytes of a filler claim in every token (for the cookie-size tests)
    issue_refresh_tokens: bool = True
    end_session: bool = True


@dataclass
class _Code:
    user: str
    client_id: str
    redirect_uri: str
    challenge: str
    nonce: str | None


class OidcProvider:
    """The provider app and its state; ``with OidcProvider() as provider: provider.issuer``."""

    def __init__(self, config: ProviderConfig | None = None) -> None:
        self.config = config or ProviderConfig()
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = uuid.uuid4().hex[:12]
        self._codes: dict[str, _Code] = {}
        self._refresh: dict[str, str] = {}  # refresh token -> user
        self._lock = threading.Lock()
        self.token_requests: list[dict[str, Any]] = []
        self.logouts: list[dict[str, str]] = []
        self.authorize_requests: list[dict[str, str]] = []
        self.discovery_requests = 0
        self.server: ServerThread | None = None
        self.app = Starlette(
            routes=[
                Route("/.well-known/openid-configuration", self._discovery),
                Route("/jwks", self._jwks),
                Route("/authorize", self._authorize, methods=["GET", "POST"]),
                Route("/token", self._token, methods=["POST"]),
                Route("/logout", self._logout),
            ]
        )

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> OidcProvider:
        """Serve on 127.0.0.1 and a free port."""
        self.server = ServerThread(self.app, lifespan="off").start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        if self.server is not None:
            self.server.stop()

    def __enter__(self) -> OidcProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def issuer(self) -> str:
        """The issuer URL (``iss`` of every token)."""
        assert self.server is not None
        return self.server.url

    # -- tokens ---------------------------------------------------------------------------------

    def _sign(self, claims: dict[str, Any]) -> str:
        if self.config.claim_padding:
            claims["padding"] = secrets.token_urlsafe(self.config.claim_padding)[: self.config.claim_padding]
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})

    def mint_access_token(self, user: str, *, seconds: int | None = None) -> str:
        """An access token for ``user`` (also what the stock MLflow client uses in the browser test)."""
        now = int(time.time())
        profile = USERS[user]
        claims = {
            "iss": self.issuer,
            "aud": self.config.access_audience,
            "azp": self.config.client_id,
            "sub": profile["sub"],
            "tenant_id": profile["tenant_id"],
            "roles": profile["roles"],
            "email": profile["email"],
            "iat": now,
            "exp": now + (self.config.access_token_seconds if seconds is None else seconds),
            "jti": uuid.uuid4().hex,
        }
        return self._sign(claims)

    def _id_token(self, user: str, nonce: str | None) -> str:
        now = int(time.time())
        profile = USERS[user]
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.config.id_token_audience or self.config.client_id,
            "sub": profile["sub"],
            "tenant_id": profile["tenant_id"],
            "roles": profile["roles"],
            "email": profile["email"],
            "iat": now,
            "exp": now + 300,
        }
        nonce = self.config.id_token_nonce or nonce
        if nonce is not None:
            claims["nonce"] = nonce
        return self._sign(claims)

    def _token_answer(self, user: str, nonce: str | None) -> dict[str, Any]:
        access = secrets.token_urlsafe(32) if self.config.opaque_access_tokens else self.mint_access_token(user)
        answer: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.config.access_token_seconds,
            "id_token": self._id_token(user, nonce),
        }
        if self.config.issue_refresh_tokens:
            refresh = secrets.token_urlsafe(32) + "." + secrets.token_urlsafe(self.config.claim_padding or 8)
            with self._lock:
                self._refresh[refresh] = user
            answer["refresh_token"] = refresh
            answer["refresh_expires_in"] = 1800
        return answer

    def revoke_refresh_tokens(self) -> None:
        """Every refresh token stops working (the IdP session ended)."""
        with self._lock:
            self._refresh.clear()

    # -- endpoints ------------------------------------------------------------------------------

    async def _discovery(self, request: Request) -> Response:
        self.discovery_requests += 1
        document: dict[str, Any] = {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "jwks_uri": f"{self.issuer}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        }
        if self.config.end_session:
            document["end_session_endpoint"] = f"{self.issuer}/logout"
        return JSONResponse(document)

    async def _jwks(self, request: Request) -> Response:
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        return JSONResponse({"keys": [{**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}]})

    def _check_authorization_request(self, params: dict[str, str]) -> str | None:
        """Why this authorization request is refused, or ``None``."""
        if params.get("client_id") != self.config.client_id:
            return "unknown client_id"
        if params.get("redirect_uri") not in self.config.redirect_uris:
            return "redirect_uri is not registered"
        if params.get("response_type") != "code":
            return "response_type must be code"
        if params.get("code_challenge_method") != "S256" or len(params.get("code_challenge", "")) != 43:
            return "a PKCE S256 code_challenge is required"
        if "openid" not in params.get("scope", "").split():
            return "scope must include openid"
        if not params.get("state"):
            return "state is required"
        return None

    async def _authorize(self, request: Request) -> Response:
        if request.method == "GET":
            params = dict(request.query_params)
            self.authorize_requests.append(params)
            problem = self._check_authorization_request(params)
            if problem:
                return HTMLResponse(f"<p id='error'>{html.escape(problem)}</p>", status_code=400)
            hidden = "".join(
                f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">' for k, v in params.items()
            )
            buttons = "".join(
                f'<button id="user-{name}" name="username" value="{name}" type="submit">{name}</button>'
                for name in USERS
            )
            page = f"<!doctype html><title>Test IdP</title><h1>Test IdP</h1><form method=post>{hidden}{buttons}</form>"
            return HTMLResponse(page)
        form = {key: values[-1] for key, values in parse_qs((await request.body()).decode()).items()}
        problem = self._check_authorization_request(form)
        user = form.get("username", "")
        if problem or user not in USERS:
            return HTMLResponse(f"<p id='error'>{html.escape(problem or 'unknown user')}</p>", status_code=400)
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._codes[code] = _Code(
                user, form["client_id"], form["redirect_uri"], form["code_challenge"], form.get("nonce")
            )
        target = f"{form['redirect_uri']}?{urlencode({'code': code, 'state': form['state']})}"
        return RedirectResponse(target, status_code=303)

    def _client_authenticated(self, request: Request, form: dict[str, str]) -> bool:
        header = request.headers.get("authorization", "")
        if self.config.client_secret is None:
            return not header and form.get("client_id") == self.config.client_id and "client_secret" not in form
        if header.lower().startswith("basic "):
            decoded = base64.b64decode(header[6:]).decode()
            client_id, _, secret = decoded.partition(":")
            return client_id == self.config.client_id and secret == self.config.client_secret
        return form.get("client_id") == self.config.client_id and form.get("client_secret") == self.config.client_secret

    async def _token(self, request: Request) -> Response:
        form = {key: values[-1] for key, values in parse_qs((await request.body()).decode()).items()}
        recorded = {key: value for key, value in form.items() if key != "client_secret"}
        recorded["basic_auth"] = request.headers.get("authorization", "").lower().startswith("basic ")
        self.token_requests.append(recorded)
        if not self._client_authenticated(request, form):
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        grant = form.get("grant_type")
        if grant == "authorization_code":
            with self._lock:
                code = self._codes.pop(form.get("code", ""), None)  # one-time
            if code is None or code.redirect_uri != form.get("redirect_uri"):
                return JSONResponse({"error": "invalid_grant"}, status_code=400)
            verifier = form.get("code_verifier", "")
            challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            if not 43 <= len(verifier) <= 128 or challenge != code.challenge:
                return JSONResponse({"error": "invalid_grant", "error_description": "PKCE"}, status_code=400)
            return JSONResponse(self._token_answer(code.user, code.nonce))
        if grant == "refresh_token":
            with self._lock:
                user = self._refresh.pop(form.get("refresh_token", ""), None)  # rotated
            if user is None:
                return JSONResponse({"error": "invalid_grant"}, status_code=400)
            answer = self._token_answer(user, None)
            return JSONResponse(answer)
        return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)

    async def _logout(self, request: Request) -> Response:
        params = dict(request.query_params)
        self.logouts.append(params)
        target = params.get("post_logout_redirect_uri")
        if target is not None and target not in self.config.post_logout_redirect_uris:
            return HTMLResponse("<p id='error'>post_logout_redirect_uri is not registered</p>", status_code=400)
        self.revoke_refresh_tokens()
        if target is None:
            return HTMLResponse("<p id='logged-out'>You are logged out</p>")
        return RedirectResponse(target, status_code=302)
