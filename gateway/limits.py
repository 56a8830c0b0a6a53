"""Request limits: token-bucket rate limits per tenant (and per user), and early body-size refusal.

Rate limits are token buckets: a bucket holds at most ``burst`` tokens, refills at ``rps`` tokens per
second, and every request takes one token from each of its buckets (the tenant's, and the user's
within that tenant when user limits are on) -- all of them or none. A request that finds a bucket
empty is answered 429 ``REQUEST_LIMIT_EXCEEDED`` with ``Retry-After`` (whole seconds until a token is
back); the stock MLflow client retries 429 and sleeps for ``Retry-After`` (urllib3 ``Retry`` with
``respect_retry_after_header``, ``mlflow/utils/request_utils.py``).

Where the buckets live:

- without ``GATEWAY_REDIS_URL``, in this replica's memory (:class:`MemoryBuckets`: a bounded LRU of
  buckets, idle full buckets dropped, monotonic clock), so N replicas allow N times the rate;
- with it, in Redis (:class:`RedisBuckets`: one atomic Lua script per request, timed by the Redis
  server's clock, keys expiring once their bucket would be full again), shared by every replica.

If Redis fails, the limiter fails open to the in-memory buckets of the replica (a warning at most
every :data:`WARN_INTERVAL` seconds) and tries Redis again after :data:`REDIS_RETRY_INTERVAL`: a Redis
outage weakens limits to per-replica ones, it never fails a request.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth.principal import Principal
from gateway.errors import BadRequest, PayloadTooLarge, RateLimited
from gateway.middleware import send_error

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

    from gateway.settings import Settings

logger = logging.getLogger("gateway.limits")

KEY_PREFIX = "gateway:rl:"
MAX_BUCKETS = 100_000  # in-memory buckets per replica; the least recently used go first
REDIS_TIMEOUT = 0.25  # seconds to connect to / hear from Redis before failing open
REDIS_RETRY_INTERVAL = 1.0  # after a Redis failure, seconds of in-memory limiting before trying again
WARN_INTERVAL = 30.0  # at most one "Redis unavailable" warning per this many seconds
_MAX_KEY_PART = 128  # longer user names are hashed into the Redis key


# -- limits ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rate:
    """A token bucket's shape: ``per_second`` refill and ``burst`` capacity (at least 1)."""

    per_second: float
    burst: int

    @classmethod
    def of(cls, rps: float, burst: int = 0) -> Rate | None:
        """The rate for configured ``rps``/``burst``: ``None`` when ``rps`` is 0 (no limit), burst 0 means 2 s worth."""
        if rps <= 0:
            return None
        return cls(float(rps), burst if burst > 0 else max(1, math.ceil(2 * rps)))


@dataclass(frozen=True, slots=True)
class Bucket:
    """One bucket a request draws from: its key (shared by every replica), its rate, and whose it is."""

    key: str
    rate: Rate
    owner: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one request: allowed, or refused by ``bucket`` for ``retry_after`` seconds."""

    allowed: bool
    retry_after: float = 0.0
    bucket: Bucket | None = None

    @property
    def retry_after_header(self) -> int:
        """Whole seconds for ``Retry-After``: rounded up, at least 1."""
        return max(1, math.ceil(self.retry_after))


ALLOWED = Decision(True)


@dataclass(frozen=True)
class RateLimits:
    """The configured limits: a default per tenant, per-tenant overrides, and a default per user."""

    tenant: Rate | None = None
    user: Rate | None = None
    overrides: Mapping[str, Rate | None] = field(default_factory=dict)  # tenant -> rate (None: unlimited)

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimits:
        """The limits ``GATEWAY_RATE_LIMIT_*`` configure."""
        return cls(
            tenant=Rate.of(settings.rate_limit_tenant_rps, settings.rate_limit_tenant_burst),
            user=Rate.of(settings.rate_limit_user_rps, settings.rate_limit_user_burst),
            overrides={tenant: Rate.of(rps, burst) for tenant, rps, burst in settings.rate_limit_tenant_overrides},
        )

    @property
    def enabled(self) -> bool:
        """Whether any request can ever be limited (otherwise the middleware is not installed)."""
        return self.tenant is not None or self.user is not None or any(self.overrides.values())

    def buckets(self, principal: Principal) -> tuple[Bucket, ...]:
        """The buckets a request by ``principal`` draws from (none: not limited)."""
        return self.buckets_of(principal.tenant, principal.user)

    def buckets_of(self, tenant: str, user: str) -> tuple[Bucket, ...]:
        """The buckets of ``user`` in ``tenant`` (``""``: a platform administrator without a tenant)."""
        # Platform administrators without a tenant share the tenant-less bucket "-" (never a tenant id).
        tenant_part = _key_part(tenant) if tenant else "-"
        tenant_name = f"tenant '{tenant}'" if tenant else "platform administrators"
        found: list[Bucket] = []
        tenant_rate = self.overrides.get(tenant, self.tenant)
        if tenant_rate is not None:
            found.append(Bucket(f"{KEY_PREFIX}{{{tenant_part}}}:t", tenant_rate, tenant_name))
        if self.user is not None:
            key = f"{KEY_PREFIX}{{{tenant_part}}}:u:{_key_part(user)}"
            found.append(Bucket(key, self.user, f"user '{user}' of {tenant_name}"))
        return tuple(found)


def _key_part(value: str) -> str:
    """``value`` safe inside a Redis key: percent-encoded (no ``:``, ``{`` or ``}`` left), long ones hashed.

    Tenants share a Redis Cluster hash slot with their users' buckets (the ``{tenant}`` hash tag), so
    one script call touches one slot.
    """
    encoded = quote(value, safe="")
    if len(encoded) > _MAX_KEY_PART:  # '#' is always percent-encoded above, so this cannot collide
        return "#" + hashlib.sha256(value.encode()).hexdigest()
    return encoded


# -- in-memory buckets (per replica) -----------------------------------------------------------------------


class MemoryBuckets:
    """Token buckets in this process: O(1) per request, bounded, on a monotonic clock.

    Each entry is ``[tokens, updated_at, per_second, burst]``. A bucket that has refilled completely
    carries no information (a missing bucket is a full one), so the oldest entries are dropped once
    full; above ``max_buckets`` the least recently used are dropped even if not full (their owners
    get a fresh burst: the bound on memory wins).
    """

    def __init__(self, *, max_buckets: int = MAX_BUCKETS, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_buckets = max_buckets
        self.clock = clock
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, buckets: Sequence[Bucket]) -> Decision:
        """Take one token from every bucket if each has one; else take none and say how long to wait."""
        now = self.clock()
        levels: list[float] = []
        refusal = ALLOWED
        for bucket in buckets:
            state = self._buckets.get(bucket.key)
            rate = bucket.rate
            if state is None:
                level = float(rate.burst)
            else:
                level = min(float(rate.burst), state[0] + max(0.0, now - state[1]) * rate.per_second)
                self._buckets.move_to_end(bucket.key)
            levels.append(level)
            if level < 1.0:
                wait = (1.0 - level) / rate.per_second
                if wait > refusal.retry_after:
                    refusal = Decision(False, wait, bucket)
        if not refusal.allowed:
            return refusal
        for bucket, level in zip(buckets, levels, strict=True):
            self._buckets[bucket.key] = [level - 1.0, now, bucket.rate.per_second, float(bucket.rate.burst)]
            self._buckets.move_to_end(bucket.key)
        self._evict(now)
        return ALLOWED

    def _evict(self, now: float) -> None:
        """Drop up to two idle full buckets from the old end, then anything above the bound."""
        for _ in range(2):
            if not self._buckets:
                break
            key, (tokens, updated_at, per_second, burst) = next(iter(self._buckets.items()))
            if tokens + (now - updated_at) * per_second < burst:
                break
            del self._buckets[key]
        while len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)


# -- Redis buckets (shared by every replica) -----------------------------------------------------------------

# KEYS: the buckets; ARGV: per bucket its refill per second and its burst. Time is the Redis server's
# (TIME), so replicas with skewed clocks agree. Either every bucket has a token and each loses one, or
# nothing is written and the answer says which bucket refused and for how many milliseconds. A key
# expires when its bucket would be full again: a missing key is a full bucket.
# Returns {allowed (1|0), wait in ms (0 when allowed), 1-based index of the refusing bucket}.
TOKEN_BUCKET_LUA = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + tonumber(now_parts[2]) / 1000
local levels = {}
local wait, refused = 0, 0
for i = 1, #KEYS do
  local per_ms = tonumber(ARGV[2 * i - 1]) / 1000
  local burst = tonumber(ARGV[2 * i])
  local state = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local level, ts = tonumber(state[1]), tonumber(state[2])
  if level == nil or ts == nil then
    level = burst
  else
    level = math.min(burst, level + math.max(0, now - ts) * per_ms)
  end
  levels[i] = level
  if level < 1 then
    local need = (1 - level) / per_ms
    if need > wait then
      wait, refused = need, i
    end
  end
end
if refused > 0 then
  return {0, math.ceil(wait), refused}
end
for i = 1, #KEYS do
  local per_ms = tonumber(ARGV[2 * i - 1]) / 1000
  local burst = tonumber(ARGV[2 * i])
  local level = levels[i] - 1
  redis.call('HSET', KEYS[i], 'tokens', string.format('%.6f', level), 'ts', string.format('%.3f', now))
  redis.call('PEXPIRE', KEYS[i], math.ceil((burst - level) / per_ms) + 1000)
end
return {1, 0, 0}
"""


class RedisBuckets:
    """Token buckets in Redis: one ``EVALSHA`` per request (the script is loaded again if Redis lost it)."""

    def __init__(self, url: str) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # No client-side retries: a failure falls back to memory at once instead of stalling the request.
        self.client: Redis = Redis.from_url(
            url,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        self.script: AsyncScript = self.client.register_script(TOKEN_BUCKET_LUA)
        parts = urlsplit(url)
        self.where = f"{parts.hostname}:{parts.port or 6379}" if parts.scheme != "unix" else parts.path

    async def take(self, buckets: Sequence[Bucket]) -> Decision:
        """Run the token-bucket script on every bucket of a request at once."""
        args: list[str | int] = []
        for bucket in buckets:
            args.extend((repr(bucket.rate.per_second), bucket.rate.burst))
        allowed, wait_ms, refused = await self.script(keys=[bucket.key for bucket in buckets], args=args)
        if allowed:
            return ALLOWED
        return Decision(False, int(wait_ms) / 1000, buckets[int(refused) - 1])

    async def ping(self) -> None:
        """Check Redis answers and load the script (a failure only means failing open later)."""
        await self.client.ping()
        await self.client.script_load(TOKEN_BUCKET_LUA)

    async def close(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()


# -- the limiter ------------------------------------------------------------------------------------------------


class RateLimiter:
    """Decides whether a principal's request may pass, in Redis when configured, else (or failing open) in memory."""

    def __init__(
        self,
        limits: RateLimits,
        *,
        redis_url: str | None = None,
        memory: MemoryBuckets | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        # Keys are built once per caller, not per request (bounded like the in-memory buckets).
        self._buckets_of = functools.lru_cache(maxsize=MAX_BUCKETS)(limits.buckets_of)
        self.redis_url = redis_url
        self.memory = memory if memory is not None else MemoryBuckets(clock=clock)
        self.clock = clock
        self.redis: RedisBuckets | None = None
        self._closed = False
        self._redis_retry_at = 0.0
        self._warned_at = -math.inf
        self.fail_open_count = 0  # requests decided in memory because Redis failed (since start)

    async def start(self) -> None:
        """Create the Redis connection pool (nothing to do without a Redis URL)."""
        if self.redis_url is None or self.redis is not None:
            return
        self.redis = RedisBuckets(self.redis_url)
        try:
            await self.redis.ping()
        except Exception as exc:  # a Redis outage at start-up is the same as one later: fail open
            self._redis_failed(exc)
        else:
            logger.info("rate limits are shared by every replica through Redis at %s", self.redis.where)

    async def close(self) -> None:
        """Close the Redis connection pool; requests still in flight are decided in memory from now on."""
        self._closed = True
        redis, self.redis = self.redis, None
        if redis is not None:
            await redis.close()

    async def check(self, principal: Principal) -> Decision:
        """Take a token for ``principal``'s request from each of its buckets, or say how long to wait."""
        buckets = self._buckets_of(principal.tenant, principal.user)
        if not buckets:
            return ALLOWED
        if self.redis_url is not None:
            if self.redis is None and not self._closed:  # served without a lifespan: create the pool now
                await self.start()
            redis = self.redis
            if redis is not None and self.clock() >= self._redis_retry_at:
                try:
                    return await redis.take(buckets)
                except Exception as exc:  # any Redis failure: fail open per replica, never a 500
                    self._redis_failed(exc)
            self.fail_open_count += 1
        return self.memory.take(buckets)

    def _redis_failed(self, exc: BaseException) -> None:
        now = self.clock()
        self._redis_retry_at = now + REDIS_RETRY_INTERVAL
        if now - self._warned_at >= WARN_INTERVAL:
            self._warned_at = now
            where = self.redis.where if self.redis is not None else "?"
            logger.warning(
                "rate limits: Redis at %s is unavailable (%s: %s); limiting per replica in memory until it is back",
                where,
                type(exc).__name__,
                exc,
            )


# -- the middleware ---------------------------------------------------------------------------------------------

_METRICS_PATH = "/metrics"


class RateLimitMiddleware:
    """Answer 429 with ``Retry-After`` when an authenticated request's buckets are empty.

    Sits right inside the authentication middleware and reads the :class:`Principal` it left in
    ``scope["state"]``. Requests without a principal (public paths: health, readiness, static files)
    and the metrics endpoint are never limited. It also owns the limiter's lifespan: the Redis pool is
    created at start-up and closed after the inner app has shut down.
    """

    def __init__(self, app: ASGIApp, *, limiter: RateLimiter, is_public: Callable[[str], bool]) -> None:
        self.app = app
        self.limiter = limiter
        self.is_public = is_public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            state = scope.get("state") or {}
            principal: Principal | None = state.get("principal")
            path: str = scope["path"]
            if principal is not None and path != _METRICS_PATH and not self.is_public(path):
                decision = await self.limiter.check(principal)
                if not decision.allowed:
                    await send_error(send, _refusal(decision), request_id=state.get("request_id"))
                    return
        elif scope["type"] == "lifespan":
            receive, send = self._lifespan_hooks(receive, send)
        await self.app(scope, receive, send)

    def _lifespan_hooks(self, receive: Receive, send: Send) -> tuple[Receive, Send]:
        limiter = self.limiter

        async def on_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await limiter.start()
            return message

        async def on_send(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await limiter.close()
            await send(message)

        return on_receive, on_send


def _refusal(decision: Decision) -> RateLimited:
    seconds = decision.retry_after_header
    owner = decision.bucket.owner if decision.bucket is not None else "this caller"
    return RateLimited(f"Rate limit exceeded for {owner}; retry after {seconds} s", retry_after=seconds)


def rate_limit_middleware(
    settings: Settings, *, is_public: Callable[[str], bool]
) -> Callable[[ASGIApp], ASGIApp] | None:
    """The rate-limit layer for :func:`gateway.app.create_app`, or ``None`` when no limit is configured."""
    limits = RateLimits.from_settings(settings)
    if not limits.enabled:
        return None
    limiter = RateLimiter(limits, redis_url=settings.redis_url)
    return lambda app: RateLimitMiddleware(app, limiter=limiter, is_public=is_public)


# -- body size ------------------------------------------------------------------------------------------------


def refuse_declared_oversize(headers: Sequence[tuple[bytes, bytes]], limit: int) -> bool:
    """413 before reading a body whose ``Content-Length`` already exceeds ``limit``; whether a body is announced.

    The readers count the bytes anyway (chunked bodies have no length); this spares reading, and for
    ``Expect: 100-continue`` clients, sending, a body that will be refused. uvicorn reads and drops
    the unread rest, so the client still gets the 413 rather than a reset connection.

    Returns False when the request has no body by HTTP/1.1's rule (RFC 9112 6.3: neither a
    ``Transfer-Encoding`` nor a non-zero ``Content-Length``), so there is nothing to read.
    """
    announced = False
    for key, value in headers:
        if key == b"content-length":
            if not value.strip().isdigit():
                raise BadRequest("Invalid Content-Length header")
            length = int(value)
            if length > limit:
                raise PayloadTooLarge(f"Request body exceeds {limit} bytes")
            announced = announced or length > 0
        elif key == b"transfer-encoding":
            announced = True
    return announced
