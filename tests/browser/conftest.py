"""Real-browser fixtures: Debian's chromium driven by Playwright against a UI-enabled gateway.

The stack fixtures (``stack``, ``jwt_secret``, ``token_factory``, ``mlflow_env``) come from
tests/integration/conftest.py. Chromium is never downloaded by Playwright: the Debian package is used
(``make browser-deps`` installs it; this conftest installs it too when running as root). The tests skip
only when chromium truly cannot be installed, and say why.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from gateway.dev import DevStack, gateway_environment
from tests.integration.conftest import jwt_secret, mlflow_env, serve_gateway, stack, token_factory

__all__ = ["jwt_secret", "mlflow_env", "stack", "token_factory"]

HERE = Path(__file__).resolve().parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Browser tests need the real stack: mark them ``integration`` too."""
    for item in items:
        if item.path.resolve().is_relative_to(HERE):
            item.add_marker(pytest.mark.integration)


def _install_chromium() -> str | None:
    """Install Debian's chromium when missing; the reason it cannot be, or ``None`` once it is there."""
    if CHROMIUM.exists():
        return None
    if os.geteuid() != 0:
        return f"{CHROMIUM} is missing and this is not root (run `make browser-deps` as root)"
    if shutil.which("apt-get") is None:
        return f"{CHROMIUM} is missing and there is no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            return f"`{' '.join(argv)}` failed: {done.stderr.strip()[-500:]}"
    return None if CHROMIUM.exists() else f"apt-get installed chromium but {CHROMIUM} is still missing"


@pytest.fixture(scope="session")
def chromium() -> str:
    """The path of a usable chromium (installed if needed), or a skip that says why not."""
    reason = _install_chromium()
    if reason is not None:
        print(f"browser tests skipped: {reason}", file=sys.stderr)
        pytest.skip(reason)
    return str(CHROMIUM)


@pytest.fixture(scope="session")
def ui_gateway(stack: DevStack, jwt_secret: str) -> Iterator[str]:
    """A gateway with the browser login on (plain-HTTP cookies) in front of the session's stack."""
    settings = gateway_environment(stack, jwt_secret) | {
        "GATEWAY_SESSION_SECRET": secrets.token_urlsafe(36),
        "GATEWAY_UI_INSECURE_COOKIES": "true",
    }
    with serve_gateway(stack, "gateway-ui", settings) as url:
        yield url


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Browser]:
    """Headless chromium (no sandbox: tests run as root in containers), closed after the module.

    Module scope, not session: Playwright's sync API keeps an event loop running in this thread while
    it is open, and later tests that call ``asyncio.run`` would fail.
    """
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()
