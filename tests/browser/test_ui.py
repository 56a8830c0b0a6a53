"""The MLflow web UI in a real browser, through the gateway, with the token login.

Data is created with the stock client (as acme and as globex); a person then logs in by pasting a
token, uses the normal UI pages and sees only their tenant's objects under their own names.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient
from playwright.sync_api import Browser, BrowserContext, Page, expect

from gateway.dev import DevStack
from tests.integration.conftest import MLFLOW_CLIENT_ENV, TokenFactory

# Screenshots go to pytest's temporary directory; `UI_SCREENSHOT_DIR=docs` refreshes the README's ones.
SCREENSHOT_DIR_VARIABLE = "UI_SCREENSHOT_DIR"
TIMEOUT_MS = 45_000


@dataclass(frozen=True)
class Seeded:
    acme_experiment: str
    acme_experiment_id: str
    acme_run_id: str
    acme_run_name: str
    acme_model: str
    globex_experiment: str
    globex_model: str


def _client_as(gateway: str, token: str) -> Iterator[MlflowClient]:
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**MLFLOW_CLIENT_ENV, "MLFLOW_TRACKING_URI": gateway, "MLFLOW_TRACKING_TOKEN": token}.items():
            patch.setenv(key, value)
        yield MlflowClient(tracking_uri=gateway)


@pytest.fixture(scope="module")
def seeded(ui_gateway: str, token_factory: TokenFactory) -> Seeded:
    """acme: an experiment with a run (a metric over 20 steps, params, a text artifact) and a model."""
    suffix = uuid.uuid4().hex[:6]
    acme_experiment, model, globex_experiment = f"churn-{suffix}", f"churn-model-{suffix}", f"globex-secret-{suffix}"
    for client in _client_as(ui_gateway, token_factory("acme", "alice")):
        experiment_id = client.create_experiment(acme_experiment)
        run = client.create_run(experiment_id, run_name=f"baseline-{suffix}")
        run_id = run.info.run_id
        for step in range(20):
            client.log_metric(run_id, "loss", 1.0 / (step + 1), step=step)
            client.log_metric(run_id, "accuracy", 1 - 0.5 / (step + 1), step=step)
        client.log_param(run_id, "learning_rate", "0.01")
        client.log_text(run_id, "Tenant-private notes: the UI preview works through the gateway.\n", "notes.txt")
        client.set_terminated(run_id)
        client.create_registered_model(model)
        run_name = run.info.run_name
    for client in _client_as(ui_gateway, token_factory("globex", "bob")):
        client.create_experiment(globex_experiment)
        client.create_registered_model(f"globex-model-{suffix}")
    return Seeded(acme_experiment, experiment_id, run_id, run_name, model, globex_experiment, f"globex-model-{suffix}")


def _login(browser: Browser, gateway: str, token: str) -> tuple[BrowserContext, Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto(f"{gateway}/")
    expect(page).to_have_url(f"{gateway}/login")
    page.fill("#token", token)
    page.click("#login")
    expect(page).to_have_url(f"{gateway}/")
    return context, page


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where the UI screenshots are saved (printed, so a failing run can be inspected)."""
    directory = Path(os.environ.get(SCREENSHOT_DIR_VARIABLE) or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    print(f"UI screenshots: {directory}")
    return directory


def test_acme_uses_the_ui(
    browser: Browser, ui_gateway: str, token_factory: TokenFactory, seeded: Seeded, screenshots: Path
) -> None:
    context, page = _login(browser, ui_gateway, token_factory("acme", "alice"))
    cookie = next(c for c in context.cookies() if c["name"] == "mlflow_gateway_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"

    # The experiments list: acme's experiment, un-prefixed; nothing of globex.
    page.goto(f"{ui_gateway}/#/experiments")
    expect(page.get_by_text(seeded.acme_experiment, exact=True).first).to_be_visible()
    body = page.inner_text("body")
    assert seeded.globex_experiment not in body
    assert "acme/" not in body
    page.screenshot(path=str(screenshots / "ui-experiments.png"))

    # A run page: its metric charts.
    page.goto(f"{ui_gateway}/#/experiments/{seeded.acme_experiment_id}/runs/{seeded.acme_run_id}/model-metrics")
    expect(page.get_by_text(seeded.acme_run_name).first).to_be_visible()
    expect(page.get_by_text("loss", exact=True).first).to_be_visible()
    expect(page.locator("canvas, .js-plotly-plot, svg.main-svg").first).to_be_visible()
    page.wait_for_timeout(1500)
    page.screenshot(path=str(screenshots / "ui-run.png"))

    # The run's artifacts: the text preview.
    page.goto(f"{ui_gateway}/#/experiments/{seeded.acme_experiment_id}/runs/{seeded.acme_run_id}/artifacts")
    page.get_by_text("notes.txt", exact=True).first.click()
    expect(page.get_by_text("Tenant-private notes", exact=False).first).to_be_visible()
    page.screenshot(path=str(screenshots / "ui-artifact.png"))

    # The models page: acme's model under its own name.
    page.goto(f"{ui_gateway}/#/models")
    expect(page.get_by_text(seeded.acme_model, exact=True).first).to_be_visible()
    assert "acme." not in page.inner_text("body")

    # The login page says who is logged in; logout ends the session.
    page.goto(f"{ui_gateway}/login")
    expect(page.locator("#user")).to_have_text("alice")
    expect(page.locator("#tenant")).to_have_text("acme")
    page.click("#logout")
    expect(page).to_have_url(f"{ui_gateway}/login")
    assert not [c for c in context.cookies() if c["name"] == "mlflow_gateway_session"]
    page.goto(f"{ui_gateway}/")
    expect(page).to_have_url(f"{ui_gateway}/login")
    context.close()


def test_globex_sees_none_of_acme(
    browser: Browser, ui_gateway: str, token_factory: TokenFactory, seeded: Seeded
) -> None:
    context, page = _login(browser, ui_gateway, token_factory("globex", "bob"))
    page.goto(f"{ui_gateway}/#/experiments")
    expect(page.get_by_text(seeded.globex_experiment, exact=True).first).to_be_visible()
    assert seeded.acme_experiment not in page.inner_text("body")
    page.goto(f"{ui_gateway}/#/models")
    expect(page.get_by_text(seeded.globex_model, exact=True).first).to_be_visible()
    assert seeded.acme_model not in page.inner_text("body")
    # acme's experiment and run by their ids: nothing of them is shown.
    page.goto(f"{ui_gateway}/#/experiments/{seeded.acme_experiment_id}")
    page.wait_for_timeout(3000)
    assert seeded.acme_experiment not in page.inner_text("body")
    page.goto(f"{ui_gateway}/#/experiments/{seeded.acme_experiment_id}/runs/{seeded.acme_run_id}")
    page.wait_for_timeout(3000)
    body = page.inner_text("body")
    assert seeded.acme_run_name not in body
    assert seeded.acme_experiment not in body
    context.close()


class _AttackPage(BaseHTTPRequestHandler):
    target = ""

    def do_GET(self) -> None:
        body = (
            "<!doctype html><html><body>"
            f'<form id="f" method="post" action="{self.target}" enctype="text/plain">'
            '<input name=\'{"name": "pwned-by-csrf", "x": "\' value=\'"}\'></form>'
            "<script>document.getElementById('f').submit()</script></body></html>"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def attacker(ui_gateway: str) -> Iterator[str]:
    """Another origin on 127.0.0.1 (same site, so a SameSite=Lax cookie IS sent) serving a CSRF form."""
    handler = type("Attack", (_AttackPage,), {"target": f"{ui_gateway}/ajax-api/2.0/mlflow/experiments/create"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_cross_site_form_post_with_the_cookie_is_refused(
    browser: Browser, ui_gateway: str, token_factory: TokenFactory, stack: DevStack, attacker: str, seeded: Seeded
) -> None:
    context, page = _login(browser, ui_gateway, token_factory("acme", "alice"))
    with page.expect_response(lambda r: r.url.endswith("/experiments/create")) as answer:
        page.goto(attacker)
    response = answer.value
    assert response.status == 403
    assert response.json()["error_code"] == "PERMISSION_DENIED"
    assert "Cross-site" in response.json()["message"]
    # Nothing was created upstream.
    upstream = httpx.get(
        f"{stack.mlflow_url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": "acme/pwned-by-csrf"}
    )
    assert upstream.status_code == 404
    # The same session still works same-origin (the refusal was the CSRF check, not a dead session).
    page.goto(f"{ui_gateway}/#/experiments")
    expect(page.get_by_text(seeded.acme_experiment, exact=True).first).to_be_visible()
    context.close()
