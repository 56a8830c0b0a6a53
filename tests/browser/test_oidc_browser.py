"""The OpenID Connect login in a real browser: chromium, a gateway subprocess, a local OIDC provider.

The gateway trusts only the provider (``GATEWAY_OIDC_ISSUER``, keys by discovery): the stock MLflow
client seeds data with provider-signed access tokens, and a person logs in by clicking "Sign in" on the
gateway's login page and picking a user on the provider's page. Logout ends the provider's session
and comes back to the gateway's login page.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from mlflow import MlflowClient
from playwright.sync_api import Browser, BrowserContext, Page, expect

from gateway.dev import DevStack, free_port, gateway_environment
from tests.integration.conftest import MLFLOW_CLIENT_ENV, serve_gateway
from tests.oidc_provider import OidcProvider, ProviderConfig

TIMEOUT_MS = 45_000
SESSION_COOKIES = "mlflow_gateway_session"


@dataclass(frozen=True)
class OidcStack:
    gateway: str
    provider: OidcProvider


@pytest.fixture(scope="module")
def oidc_stack(stack: DevStack, jwt_secret: str) -> Iterator[OidcStack]:
    """A local provider and a gateway whose only issuer it is, with the browser login through it."""
    port = free_port()
    gateway = f"http://127.0.0.1:{port}"
    config = ProviderConfig(redirect_uris=[f"{gateway}/oidc/callback"], post_logout_redirect_uris=[f"{gateway}/login"])
    with OidcProvider(config) as provider:
        settings = {
            key: value for key, value in gateway_environment(stack, jwt_secret).items() if key != "GATEWAY_JWT_SECRET"
        }
        settings |= {
            "GATEWAY_OIDC_ISSUER": provider.issuer,
            "GATEWAY_OIDC_CLIENT_ID": config.client_id,
            "GATEWAY_OIDC_CLIENT_SECRET": config.client_secret or "",
            "GATEWAY_OIDC_REDIRECT_URL": f"{gateway}/oidc/callback",
            "GATEWAY_OIDC_PROVIDER_NAME": "Test IdP",
        }
        with serve_gateway(stack, "gateway-oidc", settings, port=port) as url:
            yield OidcStack(url, provider)


@dataclass(frozen=True)
class Seeded:
    acme_experiment: str
    globex_experiment: str


def _create_experiment(gateway: str, token: str, name: str) -> None:
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**MLFLOW_CLIENT_ENV, "MLFLOW_TRACKING_URI": gateway, "MLFLOW_TRACKING_TOKEN": token}.items():
            patch.setenv(key, value)
        MlflowClient(tracking_uri=gateway).create_experiment(name)


@pytest.fixture(scope="module")
def seeded(oidc_stack: OidcStack) -> Seeded:
    """One experiment per tenant, created with the stock client and the provider's access tokens."""
    suffix = uuid.uuid4().hex[:6]
    seeded = Seeded(f"oidc-acme-{suffix}", f"oidc-globex-{suffix}")
    provider = oidc_stack.provider
    _create_experiment(oidc_stack.gateway, provider.mint_access_token("acme-alice"), seeded.acme_experiment)
    _create_experiment(oidc_stack.gateway, provider.mint_access_token("globex-bob"), seeded.globex_experiment)
    return seeded


def _sign_in(browser: Browser, gateway: str, user: str) -> tuple[BrowserContext, Page]:
    """Open the gateway, get sent to its login page, sign in at the provider as ``user``."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto(f"{gateway}/")
    expect(page).to_have_url(f"{gateway}/login")
    page.click("#oidc-login")
    expect(page.locator(f"#user-{user}")).to_be_visible()  # the provider's page
    page.click(f"#user-{user}")
    expect(page).to_have_url(f"{gateway}/")
    return context, page


def test_acme_signs_in_through_the_provider_and_out_again(
    browser: Browser, oidc_stack: OidcStack, seeded: Seeded
) -> None:
    gateway, provider = oidc_stack.gateway, oidc_stack.provider
    context, page = _sign_in(browser, gateway, "acme-alice")
    cookie = next(c for c in context.cookies() if c["name"] == SESSION_COOKIES)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    assert not [c for c in context.cookies() if c["name"] == "mlflow_gateway_oidc"]  # the login state is spent

    page.goto(f"{gateway}/#/experiments")
    expect(page.get_by_text(seeded.acme_experiment, exact=True).first).to_be_visible()
    body = page.inner_text("body")
    assert seeded.globex_experiment not in body
    assert "acme/" not in body

    page.goto(f"{gateway}/login")
    expect(page.locator("#user")).to_have_text("alice")
    expect(page.locator("#tenant")).to_have_text("acme")
    logouts = len(provider.logouts)
    page.click("#logout")
    expect(page).to_have_url(f"{gateway}/login")  # through the provider's end-session endpoint
    assert len(provider.logouts) == logouts + 1
    ended = provider.logouts[-1]
    assert ended["post_logout_redirect_uri"] == f"{gateway}/login" and ended["id_token_hint"]
    assert not [c for c in context.cookies() if c["name"].startswith(SESSION_COOKIES)]
    page.goto(f"{gateway}/")
    expect(page).to_have_url(f"{gateway}/login")
    context.close()


def test_globex_signs_in_and_sees_none_of_acme(browser: Browser, oidc_stack: OidcStack, seeded: Seeded) -> None:
    gateway = oidc_stack.gateway
    context, page = _sign_in(browser, gateway, "globex-bob")
    page.goto(f"{gateway}/#/experiments")
    expect(page.get_by_text(seeded.globex_experiment, exact=True).first).to_be_visible()
    assert seeded.acme_experiment not in page.inner_text("body")
    page.goto(f"{gateway}/login")
    expect(page.locator("#tenant")).to_have_text("globex")
    context.close()
