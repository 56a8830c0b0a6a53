"""Prometheus metrics of one gateway app, and the protected ``GET /metrics`` endpoint.

Each app owns a :class:`GatewayMetrics` with its own ``CollectorRegistry`` (never the process-global
default registry: tests build many apps in one process, and a second registration of a metric
name in one registry is an error). Label values are bounded: ``route`` is the matched route
template (``unmatched`` otherwise), never a raw path; ``method`` is one of the HTTP methods MLflow
uses (``other`` otherwise); ``tenant`` comes from verified tokens only (``-`` when unauthenticated).

Several worker processes (``serve --workers N``): each worker has its own registry, so a scrape
would only show the worker that happened to answer. With ``PROMETHEUS_MULTIPROC_DIR`` set (before
the gateway starts) prometheus-client's multiprocess mode is used instead: every worker writes its
values to files in that directory and ``/metrics`` sums them over all workers
(``gateway_in_flight_requests`` counts live workers only). :func:`reset_multiprocess_dir` empties
the directory at start-up; a worker removes its live gauges when it shuts down.

``/metrics`` is answered before authentication: a tenant's JWT never opens it. A request passes when
it carries ``Authorization: Bearer <GATEWAY_METRICS_TOKEN>`` (compared in constant time), or when
it carries no ``Authorization`` header and comes from one of ``GATEWAY_METRICS_ALLOW_NETWORKS``
(loopback only by default). Anything else gets 403 ``PERMISSION_DENIED``: a wrong credential is
refused even from an allowed network.
"""

from __future__ import annotations

import asyncio
import bisect
import glob
import hmac
import ipaddress
import os
from collections.abc import Iterable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.types import Receive, Scope, Send

from gateway.errors import PermissionDenied
from gateway.middleware import send_error
from gateway.observability import header_value

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Latency buckets in seconds: sub-millisecond proxying up to long artifact transfers.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
# Multiprocess mode: how often a worker writes its pending counts to the shared files (see flush()).
FLUSH_INTERVAL_SECONDS = 1.0


def multiprocess_mode() -> bool:
    """True when prometheus-client keeps values in ``PROMETHEUS_MULTIPROC_DIR`` files.

    Decided by prometheus-client when it is first imported, so this asks it rather than the
    environment (a variable set later has no effect).
    """
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def reset_multiprocess_dir() -> None:
    """Remove the previous run's value files from ``PROMETHEUS_MULTIPROC_DIR`` (call before workers start)."""
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        return
    if not os.path.isdir(directory):
        raise ValueError(f"{MULTIPROC_ENV}={directory!r} is not a directory")
    for path in glob.glob(os.path.join(directory, "*.db")):
        os.remove(path)


def mark_worker_dead(pid: int | None) -> None:
    """Drop a dead worker's live gauges (in-flight requests) in multiprocess mode; no-op otherwise."""
    if pid is None or not os.environ.get(MULTIPROC_ENV):
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class _PendingHistogram:
    """Observations of one histogram child since the last flush: a count per bucket and their sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        # prometheus-client counts a value in the first bucket whose bound is >= the value.
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def apply(self, child: Any) -> None:
        """Add these observations to a prometheus-client histogram child, as its observe() would."""
        # Private attributes of prometheus-client's Histogram (stable for years; tests/unit/test_observability.py
        # checks that the result equals calling observe()): it has no public way to add many observations.
        for bucket, count in zip(child._buckets, self.counts, strict=True):
            if count:
                bucket.inc(count)
        child._sum.inc(self.total)


class CountingCache(Protocol):
    """A cache that counts its own look-ups (``gateway.policy.ownership.LruCache``)."""

    name: str
    hits: int
    misses: int


class GatewayMetrics:
    """Every metric the gateway exports, registered in one registry per app.

    The per-request figures (requests, their duration, upstream calls, cache look-ups, requests in
    flight) are counted in plain dicts on the request path and added to the prometheus-client metrics
    by :meth:`flush`: before every exposition, and in multiprocess mode at most
    ``FLUSH_INTERVAL_SECONDS`` after a request (a scrape answered by another worker sees this worker's
    figures up to that late). prometheus-client takes a lock (and in multiprocess mode writes a file)
    per update: about ten per request, the largest part of the metrics' cost (bench/RESULTS.md).
    """

    def __init__(self) -> None:
        self.multiprocess = multiprocess_mode()
        if self.multiprocess and not os.path.isdir(os.environ.get(MULTIPROC_ENV, "")):
            raise ValueError(f"{MULTIPROC_ENV} must name an existing directory")
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "gateway_requests",
            "HTTP requests answered, by tenant, route template, method and status.",
            ["tenant", "route", "method", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from receiving a request to sending the last byte of its response, by route template.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.denials = Counter(
            "gateway_denials",
            "Requests the gateway refused itself (4xx), by error code and status.",
            ["reason", "status"],
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "gateway_upstream_request_duration_seconds",
            "Time from sending a request to the upstream MLflow until its response headers arrive.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors",
            "Upstream calls that failed: unavailable (connect), timeout, invalid (broken response).",
            ["kind"],
            registry=registry,
        )
        self.cache_requests = Counter(
            "gateway_cache_requests",
            "Ownership cache look-ups, by cache and result (hit or miss).",
            ["cache", "result"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "gateway_in_flight_requests",
            "Requests being served right now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.artifact_bytes = Counter(
            "gateway_artifact_bytes",
            "Artifact bytes streamed through the gateway (proxy mode), by tenant and direction.",
            ["tenant", "direction"],
            registry=registry,
        )
        if not self.multiprocess:
            ProcessCollector(registry=registry)  # process_resident_memory_bytes, cpu, open fds
        self.in_flight_now = 0  # requests being served; the gauge is set from it by flush()
        self._in_flight_flushed = 0
        self._requests: dict[tuple[str, str, str, int], int] = {}
        self._durations: dict[str, _PendingHistogram] = {}
        self._upstream = _PendingHistogram()
        # The ownership caches count their own look-ups; flush() adds what they counted since the last one.
        self._caches: dict[CountingCache, tuple[int, int]] = {}
        self._flush_timer: asyncio.TimerHandle | None = None

    def request_started(self) -> None:
        """One more request in flight."""
        self.in_flight_now += 1
        if self.multiprocess:  # tested here, not in _flush_later: a call less per request otherwise
            self._flush_later()

    def request_done(self, tenant: str, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and its duration: one request fewer in flight."""
        self.in_flight_now -= 1
        key = (tenant, route, method, status)
        self._requests[key] = self._requests.get(key, 0) + 1
        pending = self._durations.get(route)
        if pending is None:
            pending = self._durations[route] = _PendingHistogram()
        pending.observe(seconds)
        if self.multiprocess:
            self._flush_later()

    def upstream_call(self, seconds: float) -> None:
        """Count one upstream call: the time until its response headers arrived (or it failed)."""
        self._upstream.observe(seconds)

    def track_caches(self, caches: Iterable[CountingCache]) -> None:
        """Export the look-ups of these caches (from now on), in place of any tracked before."""
        self.flush()  # what the previous caches counted until now
        self._caches = {cache: (cache.hits, cache.misses) for cache in caches}

    def flush(self) -> None:
        """Add everything counted since the last flush to the prometheus-client metrics."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        requests, self._requests = self._requests, {}
        for (tenant, route, method, status), count in requests.items():
            self.requests.labels(tenant, route, method, str(status)).inc(count)
        durations, self._durations = self._durations, {}
        for route, pending in durations.items():
            pending.apply(self.request_duration.labels(route))
        if any(self._upstream.counts):
            upstream, self._upstream = self._upstream, _PendingHistogram()
            upstream.apply(self.upstream_duration)
        for cache, (hits_before, misses_before) in self._caches.items():
            hits, misses = cache.hits, cache.misses
            if hits != hits_before:
                self.cache_requests.labels(cache.name, "hit").inc(hits - hits_before)
            if misses != misses_before:
                self.cache_requests.labels(cache.name, "miss").inc(misses - misses_before)
            self._caches[cache] = (hits, misses)
        if self.in_flight_now != self._in_flight_flushed:
            self.in_flight.set(self.in_flight_now)
            self._in_flight_flushed = self.in_flight_now

    def _flush_later(self) -> None:
        """Have a flush due within FLUSH_INTERVAL_SECONDS (multiprocess mode only: the callers check it)."""
        if self._flush_timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not in an event loop: nothing would run a timer
            self.flush()
            return
        self._flush_timer = loop.call_later(FLUSH_INTERVAL_SECONDS, self.flush)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition text (Prometheus or OpenMetrics, as ``accept`` asks) and its content type."""
        self.flush()
        encoder, content_type = choose_encoder(accept)
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return encoder(registry), content_type
        return encoder(self.registry), content_type

    def process_exiting(self) -> None:
        """Write the pending figures, then drop this worker's live gauges from the multiprocess directory."""
        self.flush()
        if self.multiprocess:
            mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


def parse_networks(networks: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """CIDRs as networks (host bits allowed: ``10.1.2.3/8`` means ``10.0.0.0/8``); ValueError otherwise."""
    return tuple(ipaddress.ip_network(network.strip(), strict=False) for network in networks)


class MetricsEndpoint:
    """``GET /metrics``: the exposition, for the metrics token or an allowed client network only."""

    def __init__(self, metrics: GatewayMetrics, *, token: str | None, allow_networks: Iterable[str]) -> None:
        self.metrics = metrics
        self._token = token.encode("utf-8") if token else None
        self._networks = parse_networks(allow_networks)

    def allows(self, scope: Scope) -> bool:
        """True for the right bearer token, or for no credential at all from an allowed network."""
        credentials = [value for key, value in scope["headers"] if key == b"authorization"]
        if credentials:
            scheme, _, token = credentials[0].strip().partition(b" ")
            return (
                len(credentials) == 1
                and self._token is not None
                and scheme.lower() == b"bearer"
                and hmac.compare_digest(token.strip(), self._token)
            )
        client = scope.get("client")
        if not client:
            return False
        try:
            address = ipaddress.ip_address(client[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
        return any(address in network for network in self._networks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = scope.get("state", {}).get("request_id")
        if not self.allows(scope):
            refusal = PermissionDenied("Metrics need the metrics token or a client address the gateway allows")
            await send_error(send, refusal, request_id=request_id)
            return
        accept = (header_value(scope["headers"], b"accept") or b"").decode("latin-1")
        body, content_type = self.metrics.render(accept)
        headers = [
            (b"content-type", content_type.encode("latin-1")),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
