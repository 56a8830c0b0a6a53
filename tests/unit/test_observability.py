"""The pieces of observability alone: who may read /metrics, settings, logging set-up, multiprocess mode."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import NotFound
from gateway.metrics import GatewayMetrics, MetricsEndpoint
from gateway.observability import (
    current_request,
    new_request_id,
    note_artifact_bytes,
    note_error,
    note_upstream,
    note_upstream_error,
    set_route,
)
from gateway.policy.ownership import LruCache
from gateway.settings import SettingsError, load_settings
from tests.factories import SECRET
from tests.prometheus import Scrape

TOKEN = "a-metrics-token-of-some-length"
ROOT = Path(__file__).resolve().parents[2]


def _scope(client: str | None, *authorization: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "headers": [(b"authorization", value) for value in authorization],
        "client": (client, 40000) if client else None,
    }


@pytest.mark.parametrize(
    ("client", "authorization", "allowed"),
    [
        ("127.0.0.1", (), True),
        ("::1", (), True),
        ("::ffff:127.0.0.1", (), True),  # an IPv4 peer on a dual-stack socket
        ("10.1.2.3", (), True),
        ("10.1.2.3", (b"Bearer " + TOKEN.encode(),), True),
        ("192.168.1.1", (), False),
        ("192.168.1.1", (b"Bearer " + TOKEN.encode(),), True),
        ("192.168.1.1", (b"bearer  " + TOKEN.encode() + b" ",), True),
        ("127.0.0.1", (b"Bearer wrong",), False),  # a wrong credential loses even from an allowed network
        ("127.0.0.1", (b"Bearer " + TOKEN.encode()[:-1],), False),
        ("127.0.0.1", (b"Basic " + TOKEN.encode(),), False),
        ("127.0.0.1", (b"Bearer",), False),
        ("192.168.1.1", (b"Bearer " + TOKEN.encode(), b"Bearer " + TOKEN.encode()), False),
        (None, (), False),
        ("not-an-address", (), False),
    ],
)
def test_who_may_read_metrics(client: str | None, authorization: tuple[bytes, ...], allowed: bool) -> None:
    endpoint = MetricsEndpoint(GatewayMetrics(), token=TOKEN, allow_networks=("127.0.0.1/32", "::1/128", "10.0.0.0/8"))
    assert endpoint.allows(_scope(client, *authorization)) is allowed


def test_without_a_token_no_credential_opens_metrics() -> None:
    endpoint = MetricsEndpoint(GatewayMetrics(), token=None, allow_networks=())
    assert not endpoint.allows(_scope("127.0.0.1"))
    assert not endpoint.allows(_scope("127.0.0.1", b"Bearer "))


def test_each_app_has_its_own_registry() -> None:
    first, second = GatewayMetrics(), GatewayMetrics()
    first.requests.labels("acme", "/health", "GET", "200").inc()
    cache: LruCache[str, str] = LruCache(10, name="run_experiment")
    first.track_caches([cache])
    cache.put("r", "1")
    cache.get("r")
    cache.get("r")
    one, two = Scrape.parse(first.render()[0].decode()), Scrape.parse(second.render()[0].decode())
    assert one.value("gateway_requests_total", tenant="acme") == 1
    assert two.value("gateway_requests_total") == 0
    assert one.value("gateway_cache_requests_total", cache="run_experiment", result="hit") == 2


OBSERVED = (0.0, 0.0004, 0.001, 0.0010001, 0.003, 0.05, 0.9999, 1.0, 7.5, 120.0, 121.0, 3600.0)


def test_pending_counts_reach_prometheus_exactly_as_direct_updates_would() -> None:
    """The request path counts in plain dicts; flush() must give what prometheus-client's own calls give.

    This also guards the private Histogram attributes flush() writes to (``_buckets``, ``_sum``).
    """
    batched, direct = GatewayMetrics(), GatewayMetrics()
    for seconds in OBSERVED:
        batched.request_started()
        batched.request_done("acme", "/api/2.0/mlflow/runs/get", "GET", 200, seconds)
        batched.upstream_call(seconds)
        direct.requests.labels("acme", "/api/2.0/mlflow/runs/get", "GET", "200").inc()
        direct.request_duration.labels("/api/2.0/mlflow/runs/get").observe(seconds)
        direct.upstream_duration.observe(seconds)
    cache: LruCache[str, str] = LruCache(10, name="run_experiment")
    batched.track_caches([cache])
    cache.get("unknown")
    direct.cache_requests.labels("run_experiment", "miss").inc()
    batched.request_started()
    direct.in_flight.inc()

    def samples(metrics: GatewayMetrics) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
        scrape = Scrape.parse(metrics.render()[0].decode())
        return {
            (name, tuple(sorted(labels.items())), value)
            for name, labels, value in scrape.samples
            if name.startswith("gateway_") and not name.endswith("_created")
        }

    assert samples(batched) == samples(direct)
    assert (
        "gateway_request_duration_seconds_bucket",
        (("le", "0.001"), ("route", "/api/2.0/mlflow/runs/get")),
        3.0,
    ) in (samples(direct))
    # A second flush adds nothing twice.
    assert samples(batched) == samples(direct)


def test_cache_look_ups_are_exported_once_and_from_the_tracked_caches_only() -> None:
    metrics = GatewayMetrics()
    before: LruCache[str, str] = LruCache(10, name="run_experiment")
    metrics.track_caches([before])
    before.get("a")  # a miss while tracked
    counted_earlier: LruCache[str, str] = LruCache(10, name="experiment_tenant")
    counted_earlier.get("x")  # looked up before it is tracked: not exported
    after: LruCache[str, str] = LruCache(10, name="experiment_tenant")
    metrics.track_caches([counted_earlier, after])  # replaces `before`, whose miss is kept
    before.get("b")  # no longer tracked
    after.put("e", "acme")
    after.get("e")
    after.get("e")
    after.get("f")

    def value(cache: str, result: str) -> float:
        scrape = Scrape.parse(metrics.render()[0].decode())
        return scrape.value("gateway_cache_requests_total", cache=cache, result=result)

    assert value("run_experiment", "miss") == 1
    assert value("experiment_tenant", "hit") == 2
    assert value("experiment_tenant", "miss") == 1
    assert value("experiment_tenant", "hit") == 2  # a second scrape adds nothing twice


def test_hooks_do_nothing_outside_a_request() -> None:
    assert current_request() is None
    set_route("/x")
    note_error(NotFound("gone"))
    note_upstream(0.1)
    note_upstream_error("timeout")
    note_artifact_bytes(received=1, sent=2)
    assert current_request() is None


def _env(**values: str) -> dict[str, str]:
    return {"GATEWAY_UPSTREAM_URL": "http://mlflow:5000", "GATEWAY_JWT_SECRET": SECRET, **values}


def test_settings_defaults_and_parsing() -> None:
    settings = load_settings(env=_env())
    assert settings.access_log is True
    assert settings.metrics_token is None
    assert settings.metrics_allow_networks == ("127.0.0.1/32", "::1/128")
    assert "metrics_token" not in repr(load_settings(env=_env(GATEWAY_METRICS_TOKEN=TOKEN)))
    settings = load_settings(
        env=_env(
            GATEWAY_ACCESS_LOG="false",
            GATEWAY_METRICS_ALLOW_NETWORKS="10.0.0.0/8, fd00::/8",
            GATEWAY_METRICS_TOKEN=TOKEN,
        )
    )
    assert (settings.access_log, settings.metrics_token) == (False, TOKEN)
    assert settings.metrics_allow_networks == ("10.0.0.0/8", "fd00::/8")
    assert load_settings(env=_env(GATEWAY_METRICS_ALLOW_NETWORKS="")).metrics_allow_networks == ()


def test_bad_settings_are_all_reported() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(
            env=_env(
                GATEWAY_ACCESS_LOG="sometimes",
                GATEWAY_METRICS_TOKEN="short",
                GATEWAY_METRICS_ALLOW_NETWORKS="10.0.0.0/33,localhost",
            )
        )
    problems = "\n".join(caught.value.problems)
    assert "GATEWAY_ACCESS_LOG" in problems
    assert "GATEWAY_METRICS_TOKEN: must be at least 16 bytes" in problems
    assert "'10.0.0.0/33'" in problems and "'localhost'" in problems


def _python(script: Path, code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as a script file (multiprocessing's spawn re-imports it) in a fresh interpreter."""
    script.write_text(textwrap.dedent(code), encoding="utf-8")
    environment = {key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"}
    environment.update({"PYTHONPATH": str(ROOT), **(env or {})})
    return subprocess.run(
        [sys.executable, str(script)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_access_and_audit_lines_reach_stderr_at_every_log_level(tmp_path: Path) -> None:
    result = _python(
        tmp_path / "logging_check.py",
        """
        import logging
        from gateway.observability import access_logger, audit, configure_logging, write_access_line
        configure_logging("warning")
        access_logger.info('{"access": 1}')
        write_access_line('{"access": 2}')  # written straight to the gateway's own handler
        audit("denied", reason="why")
        logging.getLogger("gateway").info("diagnostic detail")
        logging.getLogger("gateway").warning("a warning")
        """,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[:2] == ['{"access": 1}', '{"access": 2}']
    assert '"event":"denied"' in lines[2] and '"reason":"why"' in lines[2]
    assert lines[3:] == ["a warning"]


def test_access_lines_are_written_in_batches_and_in_order(tmp_path: Path) -> None:
    """In the event loop, access lines wait up to ACCESS_LOG_FLUSH_SECONDS; any other record writes them first."""
    result = _python(
        tmp_path / "batch_check.py",
        """
        import asyncio, logging, sys
        from gateway.observability import ACCESS_LOG_FLUSH_SECONDS, configure_logging, write_access_line

        async def main():
            write_access_line("a")
            write_access_line("b")
            sys.stderr.write("not yet\\n")  # straight to stderr: a and b are still waiting
            await asyncio.sleep(ACCESS_LOG_FLUSH_SECONDS * 4)
            sys.stderr.write("timer\\n")
            write_access_line("c")
            logging.getLogger("gateway").warning("a warning")  # writes c first
            write_access_line("d")  # written by logging.shutdown at exit

        configure_logging("info")
        asyncio.run(main())
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["not yet", "a", "b", "timer", "c", "a warning", "d"]


def test_access_log_flush_interval_is_configurable(tmp_path: Path) -> None:
    """GATEWAY_ACCESS_LOG_FLUSH_SECONDS: lines wait that long (here 0.5 s), or not at all with 0."""
    result = _python(
        tmp_path / "flush_interval_check.py",
        """
        import asyncio, sys
        from gateway import observability
        from gateway.observability import configure_logging, write_access_line

        async def main():
            write_access_line("slow")
            await asyncio.sleep(0.2)
            sys.stderr.write("0.2 s\\n")  # the line still waits
            await asyncio.sleep(0.6)
            sys.stderr.write("0.8 s\\n")
            observability._own_handler.flush_seconds = 0  # as configure_logging(..., 0) sets it
            write_access_line("at once")
            sys.stderr.write("after\\n")

        configure_logging("info", access_log_flush_seconds=0.5)
        asyncio.run(main())
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["0.2 s", "slow", "0.8 s", "at once", "after"]


def test_access_lines_reach_handlers_an_application_adds(tmp_path: Path) -> None:
    """The direct write is only taken when the gateway's own handler is the sole destination."""
    result = _python(
        tmp_path / "handlers_check.py",
        """
        import logging, sys
        from gateway.observability import access_logger, configure_logging, write_access_line
        configure_logging("info")
        write_access_line("one")
        extra = logging.StreamHandler(sys.stdout)
        access_logger.addHandler(extra)
        write_access_line("two")  # to the added handler and, propagated, to stderr
        access_logger.removeHandler(extra)
        access_logger.addFilter(lambda record: "secret" not in record.getMessage())
        write_access_line("a secret line")  # a filter the application set is honoured
        write_access_line("three")
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["one", "two", "three"]
    assert result.stdout.splitlines() == ["two"]


def test_batched_access_lines_follow_the_logging_set_up_when_they_are_written(tmp_path: Path) -> None:
    """A batch waiting in the event loop is checked when it is written: a handler added meanwhile gets its lines."""
    result = _python(
        tmp_path / "batch_handlers_check.py",
        """
        import asyncio, logging, sys
        from gateway.observability import ACCESS_LOG_FLUSH_SECONDS, access_logger, configure_logging, write_access_line

        async def main():
            write_access_line("one")
            await asyncio.sleep(ACCESS_LOG_FLUSH_SECONDS * 4)  # written alone: only stderr
            write_access_line("two")
            write_access_line("three")
            access_logger.addHandler(logging.StreamHandler(sys.stdout))  # before the batch is written
            await asyncio.sleep(ACCESS_LOG_FLUSH_SECONDS * 4)
            write_access_line(b"four")
            logging.disable(logging.INFO)  # before the batch is written: the line is dropped
            await asyncio.sleep(ACCESS_LOG_FLUSH_SECONDS * 4)
            logging.disable(logging.NOTSET)
            write_access_line("five \u00e9")

        configure_logging("info")
        asyncio.run(main())
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["one", "two", "three", "five \u00e9"]
    assert result.stdout.splitlines() == ["two", "three", "five \u00e9"]


def test_multiprocess_mode_sums_every_worker(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR, /metrics of any worker shows the sum over every worker."""
    directory = tmp_path / "prometheus"
    directory.mkdir()
    (directory / "counter_999999.db").write_bytes(b"stale")  # left by a previous run
    result = _python(
        tmp_path / "workers.py",
        """
        import asyncio, multiprocessing, os
        from gateway.metrics import FLUSH_INTERVAL_SECONDS, GatewayMetrics, reset_multiprocess_dir

        def worker(started, release):
            metrics = GatewayMetrics()
            metrics.requests.labels("acme", "/health", "GET", "200").inc(3)
            metrics.in_flight.inc()
            started.release()
            release.acquire()
            metrics.in_flight.dec()
            metrics.process_exiting()

        async def serve_one(metrics):
            metrics.request_started()
            metrics.request_done("globex", "/health", "GET", 200, 0.002)
            print("PENDING", GatewayMetrics().render()[0].decode().replace(chr(10), "|"))
            await asyncio.sleep(FLUSH_INTERVAL_SECONDS + 0.5)  # the worker's flush timer writes them
            print("FLUSHED", GatewayMetrics().render()[0].decode().replace(chr(10), "|"))

        if __name__ == "__main__":
            reset_multiprocess_dir()
            assert os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"]) == []
            context = multiprocessing.get_context("spawn")
            started, release = context.Semaphore(0), context.Semaphore(0)
            workers = [context.Process(target=worker, args=(started, release)) for _ in range(2)]
            for process in workers:
                process.start()
            for _ in workers:
                assert started.acquire(timeout=60)
            metrics = GatewayMetrics()
            metrics.requests.labels("acme", "/health", "GET", "200").inc()
            print("DURING", metrics.render()[0].decode().replace(chr(10), "|"))
            for _ in workers:
                release.release()
            for process in workers:
                process.join(60)
            print("AFTER", metrics.render()[0].decode().replace(chr(10), "|"))
            asyncio.run(serve_one(GatewayMetrics()))
        """,
        env={"PROMETHEUS_MULTIPROC_DIR": str(directory)},
    )
    assert result.returncode == 0, result.stderr
    outputs = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in result.stdout.splitlines()}
    # A worker's per-request counts reach the shared files by its flush timer, without a scrape there.
    assert Scrape.parse(outputs["PENDING"].replace("|", "\n")).value("gateway_requests_total", tenant="globex") == 0
    flushed = Scrape.parse(outputs["FLUSHED"].replace("|", "\n"))
    assert flushed.value("gateway_requests_total", tenant="globex") == 1
    assert flushed.value("gateway_request_duration_seconds_count", route="/health") == 1
    during = Scrape.parse(outputs["DURING"].replace("|", "\n"))
    after = Scrape.parse(outputs["AFTER"].replace("|", "\n"))
    assert during.value("gateway_requests_total", tenant="acme") == 7  # 3 + 3 + 1
    assert during.value("gateway_in_flight_requests") == 2
    assert after.value("gateway_requests_total", tenant="acme") == 7  # counters outlive their worker
    assert after.value("gateway_in_flight_requests") == 0  # exited workers' live gauges are dropped


def test_a_crashed_workers_in_flight_gauge_is_dropped(tmp_path: Path) -> None:
    """A worker killed mid-request never decrements its gauge: the supervisor's mark_worker_dead drops it."""
    directory = tmp_path / "prometheus"
    directory.mkdir()
    result = _python(
        tmp_path / "crash.py",
        """
        import multiprocessing, os
        from gateway.metrics import GatewayMetrics, mark_worker_dead

        def worker():
            GatewayMetrics().in_flight.inc()
            os._exit(1)  # crashes with a request in flight

        if __name__ == "__main__":
            process = multiprocessing.get_context("spawn").Process(target=worker)
            process.start()
            process.join(60)
            metrics = GatewayMetrics()
            print("BEFORE", metrics.render()[0].decode().replace(chr(10), "|"))
            mark_worker_dead(process.pid)
            print("AFTER", metrics.render()[0].decode().replace(chr(10), "|"))
        """,
        env={"PROMETHEUS_MULTIPROC_DIR": str(directory)},
    )
    assert result.returncode == 0, result.stderr
    outputs = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in result.stdout.splitlines()}
    assert Scrape.parse(outputs["BEFORE"].replace("|", "\n")).value("gateway_in_flight_requests") == 1
    assert Scrape.parse(outputs["AFTER"].replace("|", "\n")).value("gateway_in_flight_requests") == 0


def test_generated_request_ids_are_uuid_shaped_unique_and_differ_in_a_forked_child() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", request_id) for request_id in ids)
    assert len(set(ids)) == len(ids)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a process of its own must not repeat the parent's ids
        os.close(reader)
        os.write(writer, new_request_id().encode())
        os._exit(0)
    os.close(writer)
    child_id = os.read(reader, 64).decode()
    os.close(reader)
    os.waitpid(pid, 0)
    parent_next = new_request_id()
    assert re.fullmatch(r"[0-9a-f]{32}", child_id)
    assert child_id[:16] != parent_next[:16]  # another random prefix, not the parent's counter continued
    assert child_id not in ids and child_id != parent_next
