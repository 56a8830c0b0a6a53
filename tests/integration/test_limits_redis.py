"""Rate limits shared across replicas through a real redis-server, and the stock client meeting a 429.

Two real gateway subprocesses (``mlflow-gateway serve``) share one real ``redis-server`` through
``GATEWAY_REDIS_URL``: a tenant's bucket is one bucket whichever replica a request reaches. Killing
Redis shows the fail-open policy (requests are still served and limited per replica, never a 500),
and Redis coming back shows the replicas share again (the Lua script is loaded anew: EVALSHA falls back
to SCRIPT LOAD). Each test uses its own tenant, so buckets never carry over between tests.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlflow
import pytest
import redis
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gateway.dev import DevStack, ManagedProcess, free_port, gateway_environment
from gateway.limits import KEY_PREFIX, REDIS_RETRY_INTERVAL, Bucket, Rate, RedisBuckets
from tests.integration.conftest import MlflowEnv, TokenFactory, serve_gateway

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
BURST = 6  # default tenant bucket: 6 requests, then one every 10 s (nothing refills during a test)
RETRYING_TENANT, FAILING_TENANT = "rl-retry", "rl-noretry"
LIMITS = {
    "GATEWAY_RATE_LIMIT_TENANT_RPS": "0.1",
    "GATEWAY_RATE_LIMIT_TENANT_BURST": str(BURST),
    # For the stock client: 2 requests/s with a burst of 1 (Retry-After: 1), and one every 100 s.
    "GATEWAY_RATE_LIMIT_TENANT_OVERRIDES": f"{RETRYING_TENANT}=2:1,{FAILING_TENANT}=0.01:1",
}
SEARCH = "/api/2.0/mlflow/experiments/search"


class RedisServer:
    """A real redis-server on 127.0.0.1 without persistence; can be killed and started again on its port."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.log_dir = log_dir
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def start(self) -> None:
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = ManagedProcess(name="redis", argv=argv, log_path=self.log_dir / "redis.log")
        deadline = time.monotonic() + 10
        while True:
            try:
                with self.client() as client:
                    client.ping()
                return
            except redis.ConnectionError:
                if not self.process.is_running() or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start:\n{self.process.log_tail()}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no clean shutdown."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.stop()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@dataclass
class Replicas:
    """Two gateways sharing one Redis."""

    a: str
    b: str
    logs: tuple[Path, Path]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if not os.access(REDIS_SERVER, os.X_OK):
        pytest.skip(f"redis-server is not installed ({REDIS_SERVER}); `make test` installs it (make system-deps)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def replicas(stack: DevStack, jwt_secret: str, redis_server: RedisServer) -> Iterator[Replicas]:
    settings = {**gateway_environment(stack, jwt_secret), **LIMITS, "GATEWAY_REDIS_URL": redis_server.url}
    with serve_gateway(stack, "gateway-rl-a", settings) as a, serve_gateway(stack, "gateway-rl-b", settings) as b:
        logs = (stack.data_dir / "logs" / "gateway-rl-a.log", stack.data_dir / "logs" / "gateway-rl-b.log")
        yield Replicas(a, b, logs)


def new_tenant() -> str:
    return f"rl-{uuid.uuid4().hex[:10]}"


def search(base_url: str, token: str) -> httpx.Response:
    return httpx.get(
        base_url + SEARCH, params={"max_results": 1}, headers={"Authorization": f"Bearer {token}"}, timeout=10
    )


def statuses(urls: list[str], token: str) -> list[int]:
    return [search(url, token).status_code for url in urls]


def test_the_script_takes_from_every_bucket_or_none_on_the_redis_clock(redis_server: RedisServer) -> None:
    tenant = Bucket(f"{KEY_PREFIX}{{{new_tenant()}}}:t", Rate(0.1, 3), "tenant")
    alice, bob = (Bucket(f"{tenant.key}:u:{user}", Rate(0.1, 1), user) for user in ("alice", "bob"))

    async def scenario() -> None:
        buckets = RedisBuckets(redis_server.url)
        try:
            assert (await buckets.take([tenant, alice])).allowed
            refused = await buckets.take([tenant, alice])
            assert (refused.allowed, refused.bucket) == (False, alice)
            assert 9.0 < refused.retry_after <= 10.0
            await buckets.client.script_flush()  # Redis lost the script: EVALSHA fails, the script is loaded again
            assert (await buckets.take([tenant, bob])).allowed
            assert (await buckets.take([tenant, bob])).bucket == bob
        finally:
            await buckets.close()

    asyncio.run(scenario())
    with redis_server.client() as client:
        # alice's refused request took nothing from the tenant: 3 - alice - bob = 1 token left.
        assert float(client.hget(tenant.key, "tokens") or 0) == pytest.approx(1.0, abs=0.05)
        seconds, micros = client.time()
        stamp = float(client.hget(tenant.key, "ts") or 0) / 1000
        assert abs(seconds + micros / 1e6 - stamp) < 5  # Redis's clock, in milliseconds
        assert 0 < client.pttl(tenant.key) <= (3 - 1) / 0.1 * 1000 + 1000


def test_replicas_share_one_bucket_per_tenant(
    replicas: Replicas, redis_server: RedisServer, token_factory: TokenFactory
) -> None:
    tenant = new_tenant()
    token = token_factory(tenant, "alice")
    alternating = [replicas.a, replicas.b] * BURST
    results = statuses(alternating, token)
    # One bucket of BURST tokens for both replicas (per-replica buckets would have allowed all 2 * BURST).
    assert results == [200] * BURST + [429] * BURST, results
    refused = search(replicas.b, token)
    assert refused.status_code == 429
    assert refused.json()["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    assert 9 <= int(refused.headers["retry-after"]) <= 10
    # Another tenant has its own bucket, on both replicas.
    other = token_factory(new_tenant(), "bob")
    assert statuses([replicas.b, replicas.a], other) == [200, 200]
    # The bucket is in Redis, under the tenant's hash-tagged key, and expires once it would be full again.
    with redis_server.client() as client:
        key = f"{KEY_PREFIX}{{{tenant}}}:t"
        assert client.exists(key)
        assert 0 < client.pttl(key) <= (BURST / 0.1 + 1) * 1000


def test_a_redis_outage_fails_open_per_replica_and_sharing_resumes_when_it_returns(
    replicas: Replicas, redis_server: RedisServer, token_factory: TokenFactory
) -> None:
    redis_server.kill()
    try:
        token = token_factory(new_tenant(), "alice")
        # Served, never a 500; each replica now limits on its own: BURST on each.
        assert statuses([replicas.a] * (BURST + 1), token) == [200] * BURST + [429]
        assert statuses([replicas.b] * (BURST + 1), token) == [200] * BURST + [429]
    finally:
        redis_server.start()  # same port, empty: the script is gone too
    for log in replicas.logs:
        warnings = [line for line in log.read_text().splitlines() if "rate limits: Redis at" in line]
        assert len(warnings) == 1, warnings  # one warning per replica, not one per request
        assert "limiting per replica in memory" in warnings[0]
    time.sleep(REDIS_RETRY_INTERVAL + 0.1)  # the replicas leave Redis alone this long after a failure
    shared = token_factory(new_tenant(), "carol")
    assert statuses([replicas.a, replicas.b] * BURST, shared) == [200] * BURST + [429] * BURST


def test_the_stock_client_retries_a_429_after_retry_after(
    replicas: Replicas, token_factory: TokenFactory, mlflow_env: MlflowEnv
) -> None:
    mlflow_env(replicas.a, token_factory(RETRYING_TENANT, "alice"))
    # Retries with no backoff of their own: only Retry-After can make the retried request pass.
    os.environ.update(
        {
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
        }
    )
    client = MlflowClient()
    started = time.monotonic()
    for _ in range(3):  # 2 requests/s, burst 1: the 2nd and 3rd get a 429 with Retry-After: 1 first
        client.search_experiments(max_results=1)
    elapsed = time.monotonic() - started
    assert elapsed >= 1.8, f"the client did not wait for Retry-After ({elapsed:.2f} s)"
    experiment_id = mlflow.create_experiment(f"after-429-{uuid.uuid4().hex[:6]}")
    assert client.get_experiment(experiment_id).name.startswith("after-429-")


def test_the_stock_client_without_retries_gets_a_clear_error(
    replicas: Replicas, token_factory: TokenFactory, mlflow_env: MlflowEnv
) -> None:
    mlflow_env(replicas.b, token_factory(FAILING_TENANT, "alice"))  # MLFLOW_HTTP_REQUEST_MAX_RETRIES=0
    client = MlflowClient()
    client.search_experiments(max_results=1)
    with pytest.raises(MlflowException) as caught:
        client.search_experiments(max_results=1)
    # With no retries left urllib3 raises before MLflow reads the body (mlflow/utils/request_utils.py builds
    # a Retry whose status_forcelist holds 429), so the message is urllib3's, not the gateway's JSON.
    assert "too many 429 error responses" in str(caught.value), str(caught.value)
