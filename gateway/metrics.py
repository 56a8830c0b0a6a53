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

import glob
import hmac
import ipaddress
import os
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.types import Receive, Scope, Send

from gateway.errors import PermissionDenied
from gateway.middleware import send_error

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Latency buckets in seconds: sub-millisecond proxying up to long artifact transfers.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)


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


class GatewayMetrics:
    """Every metric the gateway exports, registered in one registry per app."""

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
        self._cache_children: dict[tuple[str, bool], Any] = {}
        if not self.multiprocess:
            ProcessCollector(registry=registry)  # process_resident_memory_bytes, cpu, open fds

    def cache_lookup(self, cache: str, hit: bool) -> None:
        """Count one ownership-cache look-up (the labelled child is resolved once per cache and result)."""
        child = self._cache_children.get((cache, hit))
        if child is None:
            child = self._cache_children[(cache, hit)] = self.cache_requests.labels(cache, "hit" if hit else "miss")
        child.inc()

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition text (Prometheus or OpenMetrics, as ``accept`` asks) and its content type."""
        encoder, content_type = choose_encoder(accept)
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return encoder(registry), content_type
        return encoder(self.registry), content_type

    def process_exiting(self) -> None:
        """Drop this worker's live gauges from the multiprocess directory (on shutdown)."""
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
        accept = next((value.decode("latin-1") for key, value in scope["headers"] if key == b"accept"), "")
        body, content_type = self.metrics.render(accept)
        headers = [
            (b"content-type", content_type.encode("latin-1")),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
