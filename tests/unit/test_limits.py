"""Token-bucket maths, limit configuration, key encoding, fail-open and the Content-Length check (gateway/limits.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import pytest
from starlette.types import Message, Receive, Scope, Send

from gateway.auth.principal import Principal
from gateway.errors import BadRequest, PayloadTooLarge, RateLimited
from gateway.limits import (
    KEY_PREFIX,
    REDIS_RETRY_INTERVAL,
    WARN_INTERVAL,
    Bucket,
    Decision,
    MemoryBuckets,
    Rate,
    RateLimiter,
    RateLimitMiddleware,
    RateLimits,
    rate_limit_middleware,
    refuse_declared_oversize,
)
from gateway.settings import SettingsError, load_settings
from tests.factories import SECRET, make_settings


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def bucket(key: str = "t", rps: float = 2.0, burst: int = 4) -> Bucket:
    return Bucket(key, Rate(rps, burst), key)


# -- Rate ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rps", "burst", "expected"),
    [
        (0, 0, None),
        (0, 10, None),
        (5, 0, Rate(5.0, 10)),
        (5, 3, Rate(5.0, 3)),
        (0.2, 0, Rate(0.2, 1)),
        (1.5, 0, Rate(1.5, 3)),
        (0.7, 0, Rate(0.7, 2)),
    ],
)
def test_rate_of_configured_values(rps: float, burst: int, expected: Rate | None) -> None:
    assert Rate.of(rps, burst) == expected


@pytest.mark.parametrize(("wait", "header"), [(0.001, 1), (0.5, 1), (1.0, 1), (1.01, 2), (2.3, 3), (59.9, 60)])
def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(wait: float, header: int) -> None:
    assert Decision(False, wait).retry_after_header == header


# -- bucket maths ------------------------------------------------------------------------------------------------


def take_until_refused(buckets: MemoryBuckets, request: Sequence[Bucket], limit: int = 1000) -> int:
    for allowed in range(limit):
        if not buckets.take(request).allowed:
            return allowed
    raise AssertionError("never refused")


def test_a_full_bucket_allows_its_burst_then_refuses_with_the_time_to_the_next_token() -> None:
    clock = Clock()
    buckets = MemoryBuckets(clock=clock)
    assert take_until_refused(buckets, [bucket(rps=2, burst=4)]) == 4
    decision = buckets.take([bucket(rps=2, burst=4)])
    assert not decision.allowed
    assert decision.retry_after == pytest.approx(0.5)  # one token at 2 per second
    assert decision.retry_after_header == 1
    assert decision.bucket == bucket(rps=2, burst=4)


def test_refill_is_proportional_to_elapsed_time() -> None:
    clock = Clock()
    buckets = MemoryBuckets(clock=clock)
    take_until_refused(buckets, [bucket(rps=2, burst=4)])
    clock.advance(0.25)  # half a token
    decision = buckets.take([bucket(rps=2, burst=4)])
    assert not decision.allowed
    assert decision.retry_after == pytest.approx(0.25)
    clock.advance(0.25)
    assert buckets.take([bucket(rps=2, burst=4)]).allowed
    assert not buckets.take([bucket(rps=2, burst=4)]).allowed
    clock.advance(1.0)  # two tokens
    assert take_until_refused(buckets, [bucket(rps=2, burst=4)]) == 2


def test_refill_never_exceeds_the_burst() -> None:
    clock = Clock()
    buckets = MemoryBuckets(clock=clock)
    take_until_refused(buckets, [bucket(rps=2, burst=4)])
    clock.advance(3600)
    assert take_until_refused(buckets, [bucket(rps=2, burst=4)]) == 4


def test_a_slow_rate_gives_a_long_retry_after() -> None:
    clock = Clock()
    buckets = MemoryBuckets(clock=clock)
    assert buckets.take([bucket(rps=0.1, burst=1)]).allowed
    decision = buckets.take([bucket(rps=0.1, burst=1)])
    assert decision.retry_after == pytest.approx(10.0)
    assert decision.retry_after_header == 10
    clock.advance(7.5)
    assert buckets.take([bucket(rps=0.1, burst=1)]).retry_after_header == 3


def test_a_clock_going_backwards_does_not_drain_or_fill_a_bucket() -> None:
    clock = Clock()
    buckets = MemoryBuckets(clock=clock)
    assert buckets.take([bucket(rps=1, burst=2)]).allowed
    clock.advance(-100)
    assert buckets.take([bucket(rps=1, burst=2)]).allowed
    assert not buckets.take([bucket(rps=1, burst=2)]).allowed


def test_buckets_are_independent() -> None:
    clock = Clock()
    buckets = MemoryBuckets(clock=clock)
    take_until_refused(buckets, [bucket("acme", rps=1, burst=2)])
    assert take_until_refused(buckets, [bucket("globex", rps=1, burst=2)]) == 2


def test_a_request_takes_from_all_its_buckets_or_from_none() -> None:
    clock = Clock()
    buckets = MemoryBuckets(clock=clock)
    tenant, alice, bob = (
        bucket("tenant", rps=1, burst=3),
        bucket("alice", rps=1, burst=1),
        bucket("bob", rps=1, burst=5),
    )
    assert buckets.take([tenant, alice]).allowed
    refused = buckets.take([tenant, alice])  # alice's bucket is empty ...
    assert not refused.allowed and refused.bucket == alice
    # ... so the tenant kept the token that request did not use: bob still gets two.
    assert take_until_refused(buckets, [tenant, bob]) == 2
    refused = buckets.take([tenant, bob])
    assert refused.bucket == tenant


def test_the_refusal_names_the_bucket_that_needs_longest() -> None:
    clock = Clock()
    buckets = MemoryBuckets(clock=clock)
    fast, slow = bucket("fast", rps=10, burst=1), bucket("slow", rps=0.5, burst=1)
    assert buckets.take([fast, slow]).allowed
    decision = buckets.take([fast, slow])
    assert decision.bucket == slow
    assert decision.retry_after == pytest.approx(2.0)


# -- memory bound -------------------------------------------------------------------------------------------------


def test_memory_is_bounded_however_many_callers() -> None:
    clock = Clock()
    buckets = MemoryBuckets(max_buckets=50, clock=clock)
    for index in range(5000):
        assert buckets.take([bucket(f"user-{index}", rps=0.001, burst=5)]).allowed  # never refills in this test
        assert len(buckets) <= 50
    assert len(buckets) == 50
    # The most recently used survive; the least recently used were evicted.
    for _ in range(4):
        assert buckets.take([bucket("user-4999", rps=0.001, burst=5)]).allowed
    assert not buckets.take([bucket("user-4999", rps=0.001, burst=5)]).allowed


def test_idle_buckets_that_refilled_are_dropped() -> None:
    clock = Clock()
    buckets = MemoryBuckets(max_buckets=10_000, clock=clock)
    for index in range(100):
        buckets.take([bucket(f"user-{index}", rps=1, burst=2)])
    assert len(buckets) == 100
    clock.advance(2)  # every bucket is full again: they carry no information
    for _ in range(60):
        buckets.take([bucket("active", rps=1000, burst=1000)])
    assert len(buckets) == 1


def test_a_bucket_still_refilling_is_not_dropped_as_idle() -> None:
    clock = Clock()
    buckets = MemoryBuckets(clock=clock)
    take_until_refused(buckets, [bucket("busy", rps=1, burst=3)])
    clock.advance(1)
    for _ in range(10):
        buckets.take([bucket("other", rps=1000, burst=1000)])
    assert buckets.take([bucket("busy", rps=1, burst=3)]).allowed  # the one token that came back
    assert not buckets.take([bucket("busy", rps=1, burst=3)]).allowed


# -- configuration --------------------------------------------------------------------------------------------------


def settings_env(**variables: str) -> dict[str, str]:
    return {"GATEWAY_UPSTREAM_URL": "http://127.0.0.1:5001", "GATEWAY_JWT_SECRET": SECRET, **variables}


def test_rate_limits_are_off_by_default_and_the_middleware_is_not_installed() -> None:
    settings = load_settings(env=settings_env())
    assert not RateLimits.from_settings(settings).enabled
    assert rate_limit_middleware(settings, is_public=lambda path: False) is None


def test_rate_limit_settings_are_read() -> None:
    settings = load_settings(
        env=settings_env(
            GATEWAY_RATE_LIMIT_TENANT_RPS="10",
            GATEWAY_RATE_LIMIT_TENANT_BURST="30",
            GATEWAY_RATE_LIMIT_USER_RPS="2.5",
            GATEWAY_RATE_LIMIT_TENANT_OVERRIDES=" acme=50:100 , globex=5,initech=0 ",
            GATEWAY_REDIS_URL="redis://:secret@redis:6379/2",
        )
    )
    limits = RateLimits.from_settings(settings)
    assert limits.tenant == Rate(10.0, 30)
    assert limits.user == Rate(2.5, 5)
    assert dict(limits.overrides) == {"acme": Rate(50.0, 100), "globex": Rate(5.0, 10), "initech": None}
    assert settings.redis_url == "redis://:secret@redis:6379/2"
    assert "secret" not in repr(settings)
    assert rate_limit_middleware(settings, is_public=lambda path: False) is not None


def test_an_override_alone_enables_limits() -> None:
    settings = load_settings(env=settings_env(GATEWAY_RATE_LIMIT_TENANT_OVERRIDES="acme=1"))
    limits = RateLimits.from_settings(settings)
    assert limits.enabled
    assert [b.rate for b in limits.buckets(Principal("acme", "alice"))] == [Rate(1.0, 2)]
    assert limits.buckets(Principal("globex", "bob")) == ()


def test_overrides_from_a_toml_file_as_a_table_or_a_list(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "gateway.toml"  # type: ignore[operator]
    path.write_text('[gateway]\nrate_limit_tenant_overrides = {acme = "50:100", globex = "5"}\n')
    settings = load_settings(env=settings_env(), config_file=path)
    assert settings.rate_limit_tenant_overrides == (("acme", 50.0, 100), ("globex", 5.0, 0))
    path.write_text('[gateway]\nrate_limit_tenant_overrides = ["acme=1:2"]\n')
    assert load_settings(env=settings_env(), config_file=path).rate_limit_tenant_overrides == (("acme", 1.0, 2),)


def test_every_bad_override_entry_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(
            env=settings_env(
                GATEWAY_RATE_LIMIT_TENANT_OVERRIDES=(
                    "acme=50:100,Acme_Corp=1,acme=2,globex=fast,initech=-1,umbrella=nan,hooli=1:2.5,=3,vandelay"
                )
            )
        )
    (problem,) = caught.value.problems
    assert problem.startswith("GATEWAY_RATE_LIMIT_TENANT_OVERRIDES: bad entries: ")
    for entry in (
        "Acme_Corp=1",
        "acme=2",
        "globex=fast",
        "initech=-1",
        "umbrella=nan",
        "hooli=1:2.5",
        "=3",
        "vandelay",
    ):
        assert repr(entry) in problem, entry
    assert "'acme=50:100'" not in problem


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GATEWAY_RATE_LIMIT_TENANT_RPS", "-1"),
        ("GATEWAY_RATE_LIMIT_TENANT_RPS", "inf"),
        ("GATEWAY_RATE_LIMIT_USER_RPS", "nan"),
        ("GATEWAY_RATE_LIMIT_TENANT_BURST", "-5"),
        ("GATEWAY_RATE_LIMIT_USER_BURST", "-1"),
        ("GATEWAY_REDIS_URL", "http://redis:6379"),
        ("GATEWAY_REDIS_URL", "redis://redis:port"),
        ("GATEWAY_REDIS_URL", "redis://"),
    ],
)
def test_bad_rate_limit_settings_are_refused(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(env=settings_env(**{name: value}))
    assert [problem.split(":")[0] for problem in caught.value.problems] == [name]


def test_several_bad_rate_limit_settings_are_reported_together() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(
            env=settings_env(
                GATEWAY_RATE_LIMIT_TENANT_RPS="-1",
                GATEWAY_RATE_LIMIT_USER_BURST="x",
                GATEWAY_RATE_LIMIT_TENANT_OVERRIDES="Bad=1",
                GATEWAY_REDIS_URL="ftp://x",
            )
        )
    assert len(caught.value.problems) == 4


# -- buckets of a principal and their Redis keys --------------------------------------------------------------------


def test_buckets_of_a_principal() -> None:
    limits = RateLimits(tenant=Rate(10, 20), user=Rate(1, 2), overrides={"acme": Rate(50, 100), "initech": None})
    acme = limits.buckets(Principal("acme", "alice"))
    assert [(b.key, b.rate) for b in acme] == [
        (f"{KEY_PREFIX}{{acme}}:t", Rate(50, 100)),
        (f"{KEY_PREFIX}{{acme}}:u:alice", Rate(1, 2)),
    ]
    assert [b.rate for b in limits.buckets(Principal("globex", "bob"))] == [Rate(10, 20), Rate(1, 2)]
    # An override of 0 lifts the tenant limit; the per-user limit still applies.
    assert [b.key for b in limits.buckets(Principal("initech", "peter"))] == [f"{KEY_PREFIX}{{initech}}:u:peter"]


@pytest.mark.parametrize(
    "user",
    ["alice:t", "x}:t", "{other}", "a b", "ü", "alice\nbob", "%41", "#" + "0" * 64],
)
def test_user_names_cannot_escape_their_key_or_the_tenant_hash_tag(user: str) -> None:
    limits = RateLimits(tenant=Rate(1, 1), user=Rate(1, 1))
    tenant_key, user_key = (b.key for b in limits.buckets(Principal("acme", user)))
    assert tenant_key == f"{KEY_PREFIX}{{acme}}:t"
    assert user_key.startswith(f"{KEY_PREFIX}{{acme}}:u:")
    encoded = user_key.removeprefix(f"{KEY_PREFIX}{{acme}}:u:")
    assert not set(encoded) & set(":{}\n #"), encoded
    other = next(b.key for b in limits.buckets(Principal("acme", "alice")) if ":u:" in b.key)
    assert user_key != other


def test_long_user_names_are_hashed_without_collisions() -> None:
    limits = RateLimits(user=Rate(1, 1))
    first = limits.buckets(Principal("acme", "u" * 1000))[0].key
    second = limits.buckets(Principal("acme", "u" * 999 + "v"))[0].key
    assert first != second
    assert len(first) < 120 and first.endswith(tuple("0123456789abcdef"))
    assert "#" in first


def test_platform_administrators_without_a_tenant_share_one_bucket_that_no_tenant_can_have() -> None:
    limits = RateLimits(tenant=Rate(1, 1))
    (admin,) = limits.buckets(Principal("", "root", platform_admin=True))
    assert admin.key == f"{KEY_PREFIX}{{-}}:t"
    assert admin.owner == "platform administrators"


# -- the limiter: Redis failures fail open -------------------------------------------------------------------------


class BrokenRedis:
    """Stands in for :class:`RedisBuckets` when Redis is down."""

    where = "redis.example:6379"

    def __init__(self) -> None:
        self.calls = 0

    async def take(self, buckets: Sequence[Bucket]) -> Decision:
        self.calls += 1
        raise ConnectionError("Connection refused")

    async def close(self) -> None:
        pass


def test_a_redis_failure_falls_back_to_memory_warns_rarely_and_retries_later(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    limiter = RateLimiter(
        RateLimits(tenant=Rate(1, 2)), redis_url="redis://redis.example:6379", memory=MemoryBuckets(clock=clock)
    )
    limiter.clock = clock
    broken = BrokenRedis()
    limiter.redis = broken  # type: ignore[assignment]
    acme = Principal("acme", "alice")

    async def scenario() -> list[bool]:
        outcomes = [(await limiter.check(acme)).allowed for _ in range(3)]
        assert broken.calls == 1  # then Redis is left alone for REDIS_RETRY_INTERVAL
        clock.advance(REDIS_RETRY_INTERVAL)
        outcomes.append((await limiter.check(acme)).allowed)
        assert broken.calls == 2
        return outcomes

    with caplog.at_level(logging.WARNING, logger="gateway.limits"):
        outcomes = asyncio.run(scenario())
    # The per-replica bucket still limits: burst 2, then refused, then one token after a second.
    assert outcomes == [True, True, False, True]
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1, "at most one warning per WARN_INTERVAL"
    assert "redis.example:6379" in warnings[0].getMessage()
    assert limiter.fail_open_count == 4
    clock.advance(WARN_INTERVAL)
    with caplog.at_level(logging.WARNING, logger="gateway.limits"):
        asyncio.run(limiter.check(acme))
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_the_refusal_is_an_mlflow_shaped_429_with_retry_after() -> None:
    error = RateLimited("Rate limit exceeded", retry_after=3)
    assert (error.status, error.error_code, error.headers) == (429, "REQUEST_LIMIT_EXCEEDED", {"Retry-After": "3"})


def test_the_middleware_opens_the_pool_at_startup_and_closes_it_after_the_app_has_shut_down() -> None:
    events: list[str] = []

    class RecordingLimiter:
        async def start(self) -> None:
            events.append("limiter start")

        async def close(self) -> None:
            events.append("limiter close")

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        events.append((await receive())["type"])
        await send({"type": "lifespan.startup.complete"})
        events.append((await receive())["type"])
        events.append("app cleanup")  # e.g. draining requests that may still use the limiter
        await send({"type": "lifespan.shutdown.complete"})

    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> Message:
        return next(messages)

    async def send(message: Message) -> None:
        events.append(f"sent {message['type']}")

    middleware = RateLimitMiddleware(inner, limiter=RecordingLimiter(), is_public=lambda path: False)  # type: ignore[arg-type]
    asyncio.run(middleware({"type": "lifespan"}, receive, send))
    assert events == [
        "limiter start",
        "lifespan.startup",
        "sent lifespan.startup.complete",
        "lifespan.shutdown",
        "app cleanup",
        "limiter close",
        "sent lifespan.shutdown.complete",
    ]


# -- Content-Length ------------------------------------------------------------------------------------------------


def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    refuse_declared_oversize([(b"content-length", b"100")], 100)
    refuse_declared_oversize([(b"content-type", b"application/json")], 100)
    with pytest.raises(PayloadTooLarge):
        refuse_declared_oversize([(b"content-length", b"101")], 100)
    with pytest.raises(PayloadTooLarge):
        refuse_declared_oversize([(b"content-length", b"99999999999999999999999")], 100)
    with pytest.raises(BadRequest):
        refuse_declared_oversize([(b"content-length", b"-1")], 100)


@pytest.mark.parametrize(
    ("headers", "announced"),
    [
        ([], False),
        ([(b"content-type", b"application/json")], False),
        ([(b"content-length", b"0")], False),
        ([(b"content-length", b"1")], True),
        ([(b"transfer-encoding", b"chunked")], True),
        ([(b"content-length", b"0"), (b"transfer-encoding", b"chunked")], True),
    ],
)
def test_whether_headers_announce_a_body(headers: list[tuple[bytes, bytes]], announced: bool) -> None:
    # No body by HTTP/1.1's rule: the gateway then reads none.
    assert refuse_declared_oversize(headers, 100) is announced


def test_make_settings_keeps_limits_off() -> None:
    assert rate_limit_middleware(make_settings(), is_public=lambda path: False) is None
