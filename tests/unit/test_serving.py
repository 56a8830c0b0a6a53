"""Settings and command line of graceful shutdown and workers (gateway/serving.py, `serve --workers`)."""

from __future__ import annotations

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
    monkeypatch.setattr("gateway.observability.configure_logging", lambda level: None)  # keep pytest's logging
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
