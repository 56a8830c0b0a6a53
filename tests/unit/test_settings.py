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
    for fragment in (
        "GATEWAY_UPSTREAM_URL",
        "'none' algorithm is never allowed",
        "RS256 cannot be verified with a shared secret",
        "secret must be at least",
        "GATEWAY_PORT",
        "GATEWAY_UPSTREAM_TIMEOUT",
    ):
        assert fragment in message
    assert len(caught.value.problems) == 6


def test_missing_required_and_unparseable_values() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(env={"GATEWAY_PORT": "eighty"})
    assert sorted(caught.value.problems) == [
        "GATEWAY_PORT: must be an integer, got 'eighty'",
        "GATEWAY_UPSTREAM_URL: is required",
    ]
    with pytest.raises(SettingsError, match="no token issuer configured"):
        load_settings(env={"GATEWAY_UPSTREAM_URL": "http://x:1"})


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


PEM = """-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEQ9nZUjD0zEN8K2Qq3fpNkn2s0l5v
3gqkFxFxBt9S6bbn9e5Yx6cQnMnAHpPpWqUgOt0Zi9KmgFyLRmF1xgkHFQ==
-----END PUBLIC KEY-----
"""


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_JWKS_URL": "http://idp/jwks"}, "exactly one key source"),
        ({"GATEWAY_JWKS_URL": "http://idp/jwks", "GATEWAY_JWT_ALGORITHMS": "HS256"}, "HS256 cannot be verified"),
        ({"GATEWAY_JWT_PUBLIC_KEY": PEM, "GATEWAY_JWT_ALGORITHMS": "RS256,none"}, "'none'"),
        ({"GATEWAY_OIDC_ISSUER": "ftp://idp"}, "must be an http\\(s\\) URL"),
        ({"GATEWAY_JWT_PUBLIC_KEY_FILE": "/nonexistent/key.pem"}, "cannot be read"),
        ({"GATEWAY_JWT_SECRET": "x" * 40, "GATEWAY_JWT_ALGORITHMS": "HS512"}, "at least 64 bytes"),
    ],
)
def test_key_source_problems(env: dict[str, str], problem: str) -> None:
    with pytest.raises(SettingsError, match=problem):
        load_settings(env={"GATEWAY_UPSTREAM_URL": "http://x:1", **env})


def test_asymmetric_sources_default_to_rs256(tmp_path: Path) -> None:
    key_file = tmp_path / "key.pem"
    key_file.write_text(PEM)
    settings = load_settings(env={"GATEWAY_UPSTREAM_URL": "http://x:1", "GATEWAY_JWT_PUBLIC_KEY_FILE": str(key_file)})
    (issuer,) = settings.issuers()
    assert issuer.algorithms == ("RS256",) and issuer.public_key == PEM
    oidc = load_settings(env={"GATEWAY_UPSTREAM_URL": "http://x:1", "GATEWAY_OIDC_ISSUER": "https://idp/realms/a"})
    assert oidc.issuers()[0].expected_issuer == "https://idp/realms/a"


def test_several_issuers_from_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
[gateway]
upstream_url = "http://mlflow:5000"
jwt_secret = "{SECRET}"
jwt_issuer = "https://ci"

[[gateway.issuers]]
oidc_issuer = "https://keycloak/realms/acme"
audience = "mlflow"
roles_claim = "realm_access.roles"

[[gateway.issuers]]
name = "okta"
jwks_url = "https://okta/oauth2/default/v1/keys"
issuer = "https://okta/oauth2/default"
algorithms = ["RS256", "ES256"]
tenant_claim = "org"
"""
    )
    issuers = load_settings(env={}, config_file=config).issuers()
    assert [issuer.expected_issuer for issuer in issuers] == [
        "https://ci",
        "https://keycloak/realms/acme",
        "https://okta/oauth2/default",
    ]
    assert issuers[1].roles_claim == "realm_access.roles" and issuers[1].audience == "mlflow"
    assert issuers[2].algorithms == ("RS256", "ES256") and issuers[2].tenant_claim == "org"


def test_several_issuers_need_distinct_iss(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
upstream_url = "http://mlflow:5000"
jwt_secret = "{SECRET}"

[[issuers]]
jwks_url = "https://okta/keys"
colour = "blue"
"""
    )
    with pytest.raises(SettingsError) as caught:
        load_settings(env={}, config_file=config)
    assert any("unknown key 'colour'" in p for p in caught.value.problems)
    assert any("every issuer needs" in p for p in caught.value.problems)


@pytest.mark.parametrize("value", ["-0.01", "10.5", "nan", "inf"])
def test_access_log_flush_interval_is_bounded(value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(
            env={
                "GATEWAY_UPSTREAM_URL": "http://mlflow:5000",
                "GATEWAY_JWT_SECRET": SECRET,
                "GATEWAY_ACCESS_LOG_FLUSH_SECONDS": value,
            }
        )
    assert "GATEWAY_ACCESS_LOG_FLUSH_SECONDS: must be between 0 and 10 seconds" in str(caught.value)


@pytest.mark.parametrize(("value", "expected"), [(None, 0.05), ("0", 0.0), ("2.5", 2.5)])
def test_access_log_flush_interval(value: str | None, expected: float) -> None:
    env = {"GATEWAY_UPSTREAM_URL": "http://mlflow:5000", "GATEWAY_JWT_SECRET": SECRET}
    if value is not None:
        env["GATEWAY_ACCESS_LOG_FLUSH_SECONDS"] = value
    assert load_settings(env=env).access_log_flush_seconds == expected
