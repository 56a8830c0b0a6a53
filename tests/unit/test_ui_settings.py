"""Settings of the web UI login: session secret, insecure cookies, root path."""

from __future__ import annotations

import pytest

from gateway.settings import SettingsError, load_settings

BASE = {"GATEWAY_UPSTREAM_URL": "http://127.0.0.1:5000", "GATEWAY_JWT_SECRET": "s" * 48}


def test_defaults_have_no_ui_login() -> None:
    settings = load_settings(env=BASE)
    assert (settings.session_secret, settings.ui_insecure_cookies, settings.root_path) == (None, False, "")


@pytest.mark.parametrize(("raw", "expected"), [("/mlflow", "/mlflow"), ("/a/b/", "/a/b"), ("/", ""), ("", "")])
def test_root_path_is_normalised(raw: str, expected: str) -> None:
    assert load_settings(env={**BASE, "GATEWAY_ROOT_PATH": raw}).root_path == expected


@pytest.mark.parametrize("raw", ["mlflow", "/a//b", "/a?b", "/a%2Fb", "/a b"])
def test_bad_root_paths_are_refused(raw: str) -> None:
    with pytest.raises(SettingsError, match="GATEWAY_ROOT_PATH"):
        load_settings(env={**BASE, "GATEWAY_ROOT_PATH": raw})


def test_short_session_secret_and_bad_boolean_are_refused_together() -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(env={**BASE, "GATEWAY_SESSION_SECRET": "short", "GATEWAY_UI_INSECURE_COOKIES": "maybe"})
    assert len(error.value.problems) == 2


def test_ui_settings_are_read() -> None:
    env = {**BASE, "GATEWAY_SESSION_SECRET": "k" * 32, "GATEWAY_UI_INSECURE_COOKIES": "true"}
    settings = load_settings(env=env)
    assert settings.session_secret == "k" * 32
    assert settings.ui_insecure_cookies is True
    assert "k" * 32 not in repr(settings)
