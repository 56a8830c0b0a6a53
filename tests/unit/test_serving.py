"""Settings and command line of graceful shutdown and workers (gateway/serving.py, `serve --workers`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway import cli
from gateway.serving import uvicorn_config
from gateway.settings import Settings, SettingsError, load_settings
from tests.factories import make_settings

BASE = {"GATEWAY_UPSTREAM_URL": "http://mlflow:5000", "GATEWAY_JWT_SECRET": "s" * 64}


def test_defaults() -> None:
    settings = load_settings(env=BASE)
    assert (settings.drain_delay_seconds, settings.shutdown_grace_seconds, settings.workers) == (0.0, 30.0, 1)


def test_environment_and_file(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[gateway]\nworkers = 4\ndrain_delay_seconds = 2.5\n")
    settings = load_settings(env=BASE | {"GATEWAY_SHUTDOWN_GRACE_SECONDS": "12"}, config_file=config)
    assert (settings.drain_delay_seconds, settings.shutdown_grace_seconds, settings.workers) == (2.5, 12.0, 4)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GATEWAY_WORKERS", "0"),
        ("GATEWAY_WORKERS", "1000"),
        ("GATEWAY_DRAIN_DELAY_SECONDS", "-1"),
        ("GATEWAY_DRAIN_DELAY_SECONDS", "nan"),
        ("GATEWAY_SHUTDOWN_GRACE_SECONDS", "-0.5"),
        ("GATEWAY_SHUTDOWN_GRACE_SECONDS", "inf"),
    ],
)
def test_bad_values_are_reported(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(env=BASE | {name: value})
    assert any(problem.startswith(name) for problem in error.value.problems), error.value.problems


def test_all_three_problems_at_once() -> None:
    env = BASE | {"GATEWAY_WORKERS": "0", "GATEWAY_DRAIN_DELAY_SECONDS": "-1", "GATEWAY_SHUTDOWN_GRACE_SECONDS": "x"}
    with pytest.raises(SettingsError) as error:
        load_settings(env=env)
    assert len(error.value.problems) == 3, error.value.problems


def test_uvicorn_runs_with_the_grace_period() -> None:
    config = uvicorn_config(lambda *args: None, make_settings(shutdown_grace_seconds=7.5))  # type: ignore[arg-type]
    assert config.timeout_graceful_shutdown == 8  # rounded up, never shorter than configured
    assert (config.loop, config.http, config.proxy_headers, config.server_header) == (
        "uvloop",
        "httptools",
        False,
        False,
    )


def test_serve_flags_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Settings] = []

    def fake_serve(settings: Settings) -> int:
        seen.append(settings)
        return 0

    monkeypatch.setattr("gateway.serving.serve", fake_serve)
    monkeypatch.setattr("gateway.observability.configure_logging", lambda level, **_: None)  # keep pytest's logging
    for key, value in BASE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GATEWAY_WORKERS", "2")
    assert cli.main(["serve", "--port", "9001", "--workers", "3"]) == 0
    assert (seen[0].port, seen[0].workers) == (9001, 3)  # the flag wins over GATEWAY_WORKERS
    assert cli.main(["serve"]) == 0
    assert seen[1].workers == 2


def test_bad_workers_flag_is_a_settings_error(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    for key, value in BASE.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["serve", "--workers", "0"]) == 2
    assert "GATEWAY_WORKERS" in capsys.readouterr().err


_HEAP_SCRIPT = """
import sys, threading
from gateway.serving import return_large_buffers_to_the_os
applied = return_large_buffers_to_the_os() if sys.argv[1] == "on" else False
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
base = rss()
def upload():  # 8 MiB part buffers with small objects made in between, as during an artifact upload
    for _ in range(4):
        held = []
        for _ in range(6):
            held.append(bytes(8 << 20))
            small = [b"x" * 100 for _ in range(2000)]
        del held
threads = [threading.Thread(target=upload) for _ in range(3)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
upload()
print(applied, rss() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_buffers_are_returned_to_the_os_after_use() -> None:
    """Without the setting glibc keeps freed part buffers (tens of MiB); with it RSS falls back."""
    results = {}
    for mode in ("on", "off"):
        done = subprocess.run(
            [sys.executable, "-c", _HEAP_SCRIPT, mode],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
        applied, growth = done.stdout.split()
        results[mode] = (applied, float(growth))
    assert results["on"][0] == "True"
    assert results["on"][1] < 4, results  # MiB still held after the buffers were freed
    assert results["off"][1] > 12, results  # the default keeps them: the setting is what makes the difference


def test_objects_alive_after_start_up_are_left_out_of_collections_and_the_young_collected_less_often() -> None:
    code = (
        "import gc\n"
        "from gateway.serving import freeze_startup_objects\n"
        "import boto3, gateway.app\n"
        "assert gc.get_freeze_count() == 0\n"
        "freeze_startup_objects()\n"
        "print(gc.get_freeze_count(), *gc.get_threshold())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    frozen, *threshold = map(int, done.stdout.split())
    assert frozen > 10_000  # modules, boto3's models...: no longer walked by every full collection
    assert threshold == [10_000, 10, 10]  # the youngest generation collected after 10,000 objects, not 700
