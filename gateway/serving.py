"""Running the gateway: uvicorn with a graceful drain on SIGTERM, in one or several worker processes.

What SIGTERM (or a first Ctrl-C) does, in order:

1. **drain**: ``/ready`` answers 503 ``{"status": "draining"}`` (``/health`` stays 200) and every request
   is still served, for ``GATEWAY_DRAIN_DELAY_SECONDS`` (default 0): the time a load balancer or
   Kubernetes needs to stop sending new connections here (a ``preStop`` sleep does the same);
2. **stop accepting**: the listening socket is closed (new connections are refused) and idle
   keep-alive connections are closed; a connection with a request in flight is closed once its
   response is sent;
3. **finish**: in-flight requests get ``GATEWAY_SHUTDOWN_GRACE_SECONDS`` (default 30; uvicorn's
   ``timeout_graceful_shutdown``) to complete, then they are cancelled;
4. the lifespan ends (upstream pool closed) and the process exits with code 0.

A repeated SIGTERM changes nothing (a process group and its parent may both send one); a second
Ctrl-C ends the drain delay at once, a third abandons in-flight requests (uvicorn's force exit).

With ``workers > 1`` (``serve --workers N`` or ``GATEWAY_WORKERS``) this process binds the port once and
supervises N spawned worker processes that share the socket, each a whole gateway (own upstream pool
and caches: they hold only immutable facts, so workers need not agree). A worker that dies is
replaced; SIGTERM, SIGHUP or Ctrl-C is passed to every worker, which drains as above, and the supervisor
exits when all of them have. A worker whose supervisor was killed (SIGKILL) drains and exits by itself.
uvicorn's own multi-process supervisor is not used because it runs a plain ``uvicorn.Server`` in each
worker, which knows nothing of the drain.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import math
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from multiprocessing.process import BaseProcess
from types import FrameType

import uvicorn
from starlette.types import ASGIApp

from gateway.app import DRAINING_STATE_KEY, create_app
from gateway.settings import Settings

logger = logging.getLogger("gateway")

STARTUP_FAILURE = 3  # uvicorn's exit code when the app's lifespan startup fails
RESTART_WINDOW = 60.0  # more than max(MIN_RESTARTS, 2 x workers) worker deaths within it: a crash loop
MIN_RESTARTS = 3
WORKER_STOP_MARGIN = 10.0  # seconds past drain + grace before a worker that did not exit is killed


class GatewayServer(uvicorn.Server):
    """``uvicorn.Server`` whose first SIGTERM/SIGINT drains before it stops accepting (see module doc)."""

    def __init__(self, config: uvicorn.Config, *, drain_delay: float = 0.0) -> None:
        super().__init__(config)
        self.drain_delay = drain_delay
        self.draining = False
        self._drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Signal handler: the first signal starts the drain, later ones only as the module doc says."""
        if not self.draining:
            self.begin_drain()
            return
        if sig == signal.SIGINT:
            if self._drain_deadline is not None and not self.should_exit:
                self._drain_deadline = time.monotonic()  # second Ctrl-C: stop accepting now
            else:
                super().handle_exit(sig, frame)  # third: uvicorn's force exit

    def begin_drain(self) -> None:
        """Mark the app draining (/ready -> 503); stop accepting once the drain delay has passed."""
        self.draining = True
        self._drain_deadline = time.monotonic() + self.drain_delay
        lifespan = getattr(self, "lifespan", None)  # absent if the signal came before start-up
        if lifespan is not None:
            lifespan.state[DRAINING_STATE_KEY] = True
        logger.info(
            "draining: /ready answers 503; the port closes in %.1fs, then requests in flight get %.0fs to finish",
            self.drain_delay,
            self.config.timeout_graceful_shutdown or 0,
        )

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start serving; a drain that began during start-up is reflected in the app state."""
        await super().startup(sockets=sockets)
        if self.draining:
            self.lifespan.state[DRAINING_STATE_KEY] = True
        freeze_startup_objects()

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's 0.1 s tick: exit (stop accepting, then finish in-flight requests) after the delay."""
        if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
            self.should_exit = True
        return await super().on_tick(counter)


def uvicorn_config(app: ASGIApp, settings: Settings) -> uvicorn.Config:
    """How every gateway process runs uvicorn: uvloop, httptools, no proxy-header trust, no access log."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        http="httptools",
        log_level=settings.log_level.lower(),
        access_log=False,
        proxy_headers=False,  # the client address is the socket's, never a header
        server_header=False,
        lifespan="on",
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_seconds),
    )


# glibc's mallopt() parameter and the size from which the gateway's allocations get their own mapping.
_M_MMAP_THRESHOLD = -3
LARGE_ALLOCATION_BYTES = 1024 * 1024
# New container objects (net) between collections of the youngest generation; CPython's default is 700.
GC_YOUNG_THRESHOLD = 10_000


def return_large_buffers_to_the_os() -> bool:
    """Make glibc serve allocations of 1 MiB and more from their own mappings, unmapped when freed.

    Artifact uploads hold 8 MiB parts. By default glibc raises its mmap threshold after the first such
    buffer is freed, so later parts come from the heap and their memory stays with the process after
    the upload (bench/RESULTS.md: +63 MiB of RSS growth for a 1 GiB upload, +37 MiB with this, and the
    RSS falls back afterwards). A fixed threshold keeps every part buffer a mapping of its own. Not
    glibc (musl, macOS): nothing changes. True when the setting was applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, LARGE_ALLOCATION_BYTES))
    except (OSError, AttributeError):  # no mallopt: not glibc
        return False


def freeze_startup_objects() -> None:
    """Exclude everything alive after start-up from the garbage collector's scans (``gc.freeze``), and
    collect the youngest generation less often (``GC_YOUNG_THRESHOLD``).

    Modules, boto3's service models, the route table and the clients are made once and live as long as
    the process, yet every full collection would walk them all: the collector was 5 % of the gateway's
    CPU per request under load (bench/RESULTS.md). Garbage made at start-up is collected first.

    Under load, the youngest generation is mostly the objects of the requests in flight (coroutines,
    their closures, header dicts: a thousand or more with 64 connections), alive and walked again by
    every collection; with CPython's threshold of 700 that was ~9 % of the CPU per request. The
    gateway's requests leave no cyclic garbage behind, so collecting after 10,000 new objects costs
    little memory (bench/RESULTS.md section 2f).
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def serve(settings: Settings) -> int:
    """Run the gateway until SIGTERM/SIGINT, in one process or ``settings.workers`` worker processes."""
    if settings.workers > 1:
        return _supervise(settings)  # each worker applies it itself: the supervisor serves nothing
    return_large_buffers_to_the_os()
    server = GatewayServer(uvicorn_config(create_app(settings), settings), drain_delay=settings.drain_delay_seconds)
    server.run()
    return 0 if server.started else 1


def _run_worker(settings: Settings, sock: socket.socket, supervisor: int) -> None:
    """One worker process: a whole gateway serving the socket the supervisor bound.

    If the supervisor disappears without stopping it (SIGKILL), the worker drains and exits by itself
    rather than hold the port as an orphan.
    """
    from gateway.observability import configure_logging

    def watch_supervisor() -> None:
        while os.getppid() == supervisor:
            time.sleep(1.0)
        logger.error("supervisor %d is gone: stopping worker %d", supervisor, os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch_supervisor, name="supervisor-watch", daemon=True).start()
    return_large_buffers_to_the_os()  # a spawned worker is a new process: its own allocator settings
    configure_logging(settings.log_level, access_log_flush_seconds=settings.access_log_flush_seconds)
    config = uvicorn_config(create_app(settings), settings)
    GatewayServer(config, drain_delay=settings.drain_delay_seconds).run(sockets=[sock])


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _supervise(settings: Settings) -> int:
    """Bind once, keep ``settings.workers`` workers running, drain them all on SIGTERM/SIGINT."""
    from gateway.metrics import mark_worker_dead, reset_multiprocess_dir

    try:
        reset_multiprocess_dir()  # PROMETHEUS_MULTIPROC_DIR: drop the previous run's values (gateway/metrics.py)
        sock = _bind(settings.host, settings.port)
    except (OSError, ValueError) as exc:
        logger.error("cannot start the workers on %s:%s: %s", settings.host, settings.port, exc)
        return 1
    multiprocessing.allow_connection_pickling()  # the socket is passed to each spawned worker
    context = multiprocessing.get_context("spawn")
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda sig, _frame: received.append(sig)) for sig in _STOP_SIGNALS}
    workers: list[BaseProcess] = []
    restarts: deque[float] = deque()

    def start() -> BaseProcess:
        process = context.Process(target=_run_worker, args=(settings, sock, os.getpid()), name="gateway-worker")
        process.start()
        return process

    logger.info("supervisor %d: %d workers on %s:%d", os.getpid(), settings.workers, settings.host, settings.port)
    failed = False
    try:
        workers.extend(start() for _ in range(settings.workers))
        while not received and not failed:
            time.sleep(0.2)
            for index, process in enumerate(workers):
                if process.is_alive():
                    continue
                process.join()
                mark_worker_dead(process.pid)  # its in-flight gauge must not count any more
                failed = _crash_loop(process, restarts, limit=max(MIN_RESTARTS, 2 * settings.workers))
                if failed:
                    break
                logger.warning("worker %d exited (code %s): starting another", process.pid, process.exitcode)
                workers[index] = start()
    finally:
        # The workers hold their own copies of the socket: closing this one lets the port refuse new
        # connections as soon as the last worker has stopped accepting.
        sock.close()
        _stop_workers(workers, settings)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1 if failed else 0


def _crash_loop(process: BaseProcess, restarts: deque[float], *, limit: int) -> bool:
    """Whether a dead worker means giving up: its app failed to start, or workers keep dying.

    A worker may die alone (killed for memory, a defect) and is replaced; but when the app's start-up
    fails (uvicorn's exit code 3), or more than ``limit`` workers died within ``RESTART_WINDOW``
    seconds, restarting would only loop.
    """
    if process.exitcode == STARTUP_FAILURE:
        logger.error("worker %d failed at start-up: stopping", process.pid)
        return True
    now = time.monotonic()
    restarts.append(now)
    while restarts and now - restarts[0] > RESTART_WINDOW:
        restarts.popleft()
    if len(restarts) > limit:
        logger.error(
            "%d workers died within %.0fs (last exit code %s): stopping",
            len(restarts),
            RESTART_WINDOW,
            process.exitcode,
        )
        return True
    return False


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # HUP too: never orphan the workers


def _stop_workers(processes: list[BaseProcess], settings: Settings) -> None:
    """SIGTERM every worker (each drains), wait for all, kill any that outlives drain + grace."""
    for process in processes:
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + settings.drain_delay_seconds + settings.shutdown_grace_seconds + WORKER_STOP_MARGIN
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            logger.error("worker %d did not stop in time: killing it", process.pid)
            process.kill()
            process.join()
    logger.info("supervisor %d: every worker has stopped", os.getpid())
