"""Where verification keys come from: a static key, a JWKS URL, or OIDC discovery.

No fetch is ever driven by a token's header: ``jku``, ``x5u`` and embedded ``jwk`` headers are
ignored; the only URLs fetched are the configured JWKS URL and the configured issuer's discovery
document. A JWKS is cached with a TTL; a token whose ``kid`` is unknown triggers one refetch
(single-flight: concurrent requests share it), at most once per cooldown window, so a flood of random
``kid`` values costs at most one fetch per window. A request that meets an unknown ``kid`` inside the
window waits for the next allowed fetch instead of failing, so a key the issuer has just published is
accepted without restart and without a window of failures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import jwt
import orjson
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.errors import Unauthenticated

logger = logging.getLogger("gateway.auth")

MAX_DOCUMENT_BYTES = 1024 * 1024
FETCH_TIMEOUT_SECONDS = 5.0

# Fetches a JSON document by URL; injectable so tests can count fetches.
Fetcher = Callable[[str], Awaitable[Any]]


class KeySource(Protocol):
    """Finds the key that verifies a token with header ``kid``/``alg``."""

    async def key_for(self, kid: str | None) -> Any:
        """The verification key, or :class:`Unauthenticated` when there is none."""
        ...


async def fetch_json(url: str) -> Any:
    """GET a JSON document (JWKS or discovery) with a timeout and a size cap."""
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url, allow_redirects=False) as response:
        if response.status != 200:
            raise OSError(f"{url} answered HTTP {response.status}")
        body = await response.content.read(MAX_DOCUMENT_BYTES + 1)
        if len(body) > MAX_DOCUMENT_BYTES:
            raise OSError(f"{url} answered more than {MAX_DOCUMENT_BYTES} bytes")
        return orjson.loads(body)


@dataclass(frozen=True)
class StaticKey:
    """One configured key: an HMAC secret or a PEM public key (parsed once)."""

    key: Any

    @classmethod
    def secret(cls, secret: str) -> StaticKey:
        """An HMAC shared secret."""
        return cls(secret.encode("utf-8"))

    @classmethod
    def public_key(cls, pem: str) -> StaticKey:
        """A PEM public key (RSA, EC or Ed25519)."""
        return cls(load_pem_public_key(pem.encode("utf-8")))

    async def key_for(self, kid: str | None) -> Any:
        """The key, whatever the ``kid``: there is only one."""
        return self.key


class JwksKeys:
    """A JWKS URL, cached with a TTL and refetched (rate-limited, single-flight) for unknown ``kid``s."""

    def __init__(
        self,
        url: str,
        *,
        ttl_seconds: float = 300.0,
        cooldown_seconds: float = 10.0,
        fetch: Fetcher = fetch_json,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._ttl = ttl_seconds
        self._cooldown = cooldown_seconds
        self._fetch = fetch
        self._clock = clock
        self._keys: dict[str | None, Any] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._inflight: asyncio.Task[None] | None = None
        self.fetch_count = 0

    async def key_for(self, kid: str | None) -> Any:
        """The key for ``kid``; refreshes a stale set, and refetches once for an unknown ``kid``."""
        now = self._clock()
        if self._fetched_at is None or now - self._fetched_at >= self._ttl:
            await self._refresh(wait_for_cooldown=False)
        key = self._lookup(kid)
        if key is None:
            await self._refresh(wait_for_cooldown=True)
            key = self._lookup(kid)
        if key is None:
            raise Unauthenticated("Token is signed with an unknown key (kid)")
        return key

    def _lookup(self, kid: str | None) -> Any:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    async def _refresh(self, *, wait_for_cooldown: bool) -> None:
        """One shared fetch for everyone waiting; never more often than the cooldown allows."""
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._fetch_after_cooldown(wait=wait_for_cooldown))
        task = self._inflight
        try:
            await asyncio.shield(task)
        finally:
            if task.done() and self._inflight is task:
                self._inflight = None

    async def _fetch_after_cooldown(self, *, wait: bool) -> None:
        if self._attempted_at is not None:
            remaining = self._cooldown - (self._clock() - self._attempted_at)
            if remaining > 0:
                if not wait:
                    return
                await asyncio.sleep(remaining)
        self._attempted_at = self._clock()
        self.fetch_count += 1
        try:
            document = await self._fetch(self.url)
            keys = _parse_jwks(document)
        except (TimeoutError, OSError, ValueError, aiohttp.ClientError) as exc:
            # Keep serving the keys we have: an IdP outage must not lock every user out.
            logger.warning("JWKS fetch from %s failed: %s", self.url, exc)
            return
        self._keys = keys
        self._fetched_at = self._clock()


def _parse_jwks(document: Any) -> dict[str | None, Any]:
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    keys: dict[str | None, Any] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig" or entry.get("kty") == "oct":
            continue  # encryption keys and symmetric keys never verify tokens here
        try:
            keys[entry.get("kid")] = jwt.PyJWK(entry).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            logger.warning("ignoring an unusable JWKS key (kid %r)", entry.get("kid"))
    return keys


class OidcKeys:
    """OIDC discovery: ``<issuer>/.well-known/openid-configuration`` names the ``jwks_uri``."""

    def __init__(
        self,
        issuer: str,
        *,
        ttl_seconds: float = 300.0,
        cooldown_seconds: float = 10.0,
        fetch: Fetcher = fetch_json,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self._options: dict[str, Any] = {"ttl_seconds": ttl_seconds, "cooldown_seconds": cooldown_seconds}
        self._fetch = fetch
        self._clock = clock
        self._jwks: JwksKeys | None = None
        self._lock = asyncio.Lock()
        self._attempted_at: float | None = None

    async def key_for(self, kid: str | None) -> Any:
        """Discover the JWKS URL once, then behave like :class:`JwksKeys`."""
        if self._jwks is None:
            await self._discover()
        if self._jwks is None:
            raise Unauthenticated("The token issuer's keys are unavailable (OIDC discovery failed)")
        return await self._jwks.key_for(kid)

    async def _discover(self) -> None:
        async with self._lock:
            if self._jwks is not None:
                return
            cooldown = float(self._options["cooldown_seconds"])
            if self._attempted_at is not None and self._clock() - self._attempted_at < cooldown:
                return
            self._attempted_at = self._clock()
            url = f"{self.issuer}/.well-known/openid-configuration"
            try:
                document = await self._fetch(url)
            except (TimeoutError, OSError, ValueError, aiohttp.ClientError) as exc:
                logger.warning("OIDC discovery at %s failed: %s", url, exc)
                return
            if not isinstance(document, dict) or str(document.get("issuer", "")).rstrip("/") != self.issuer:
                logger.warning("OIDC discovery at %s names another issuer; ignoring it", url)
                return
            jwks_uri = document.get("jwks_uri")
            if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
                logger.warning("OIDC discovery at %s has no usable jwks_uri", url)
                return
            self._jwks = JwksKeys(jwks_uri, fetch=self._fetch, clock=self._clock, **self._options)
