from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import SettingsError, load_settings

SECRET = "s" * 64


def test_env_settings_are_typed() -> None:
    settings = load_settings(
        env={
            "GATEWAY_UPSTREAM_URL": "http://mlflow:5000",
            "GATEWAY_JWT_SECRET": SECRET,
            "GATEWAY_PORT": "9000",
            "GATEWAY_JWT_ALGORITHMS": "HS256, HS512",
            "GATEWAY_UPSTREAM_TIMEOUT": "2.5",
        }
    )
    assert settings.port == 9000
    assert settings.jwt_algorithms == ("HS256", "HS512")
    assert settings.upstream_timeout == 2.5
    assert settings.upstream_host == "mlflow:5000"
    assert SECRET not in repr(settings)


def test_env_wins_over_file_and_flags_win_over_env(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'[gateway]\nupstream_url = "http://file:1"\njwt_secret = "{SECRET}"\nport = 7000\n')
    settings = load_settings(env={"GATEWAY_PORT": "7100"}, config_file=config)
    assert (settings.upstream_url, settings.port) == ("http://file:1", 7100)
    settings = load_settings(env={"GATEWAY_PORT": "7100"}, config_file=config, overrides={"port": 7200})
    assert settings.port == 7200


def test_config_file_from_env(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'upstream_url = "http://file:1"\njwt_secret = "{SECRET}"\n')
    assert load_settings(env={"GATEWAY_CONFIG": str(config)}).upstream_url == "http://file:1"


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(
            env={
                "GATEWAY_UPSTREAM_URL": "ftp://x",
                "GATEWAY_JWT_SECRET": "short",
                "GATEWAY_PORT": "99999",
                "GATEWAY_JWT_ALGORITHMS": "none,RS256",
                "GATEWAY_UPSTREAM_TIMEOUT": "-1",
            }
        )
    message = str(caught.value)
    for fragment in ("GATEWAY_UPSTREAM_URL", "GATEWAY_JWT_SECRET", "GATEWAY_PORT", "none", "GATEWAY_UPSTREAM_TIMEOUT"):
        assert fragment in message
    assert len(caught.value.problems) == 5


def test_missing_required_and_unparseable_values() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(env={"GATEWAY_PORT": "eighty"})
    assert sorted(caught.value.problems) == [
        "GATEWAY_JWT_SECRET: is required",
        "GATEWAY_PORT: must be an integer, got 'eighty'",
        "GATEWAY_UPSTREAM_URL: is required",
    ]


def test_bad_config_file_is_reported(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("upstream_url = \nwhat = 1")
    with pytest.raises(SettingsError, match="invalid TOML"):
        load_settings(env={}, config_file=config)
    config.write_text(f'upstream_url = "http://x:1"\njwt_secret = "{SECRET}"\ntypo_setting = 1\n')
    with pytest.raises(SettingsError, match="unknown setting 'typo_setting'"):
        load_settings(env={}, config_file=config)
    with pytest.raises(SettingsError, match="cannot be read"):
        load_settings(env={}, config_file=tmp_path / "missing.toml")


def test_upstream_url_must_be_a_base_url() -> None:
    with pytest.raises(SettingsError, match="path"):
        load_settings(env={"GATEWAY_UPSTREAM_URL": "http://x:1/mlflow", "GATEWAY_JWT_SECRET": SECRET})


def test_example_config_file_is_valid() -> None:
    example = Path(__file__).parents[2] / "config" / "gateway.example.toml"
    settings = load_settings(env={"GATEWAY_JWT_SECRET": SECRET}, config_file=example)
    assert settings.upstream_url == "http://127.0.0.1:5001"
