"""The buyer's journey in headless Chromium: dev host (function_app.app) + Azurite + marketplace stand-in.

Each page is screenshotted under ``test-artifacts/browser/<test>/``; the new-purchase test also writes
``landing-confirm.png`` and ``landing-success.png`` for the README: into ``docs/images/`` when
``UPDATE_DOC_IMAGES=1`` (they carry a random support reference and today's date, so an ordinary run
must not dirty the work tree), otherwise into ``test-artifacts/docs-images/``.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from playwright.sync_api import expect

from devtools.marketplace_standin import make_identity, make_plan
from shared.state_machine import LocalStatus
from tests.conftest import TEST_USER, sign_in

pytestmark = [pytest.mark.browser, pytest.mark.azurite]

_ROOT = Path(__file__).resolve().parents[2]
DOCS_IMAGES = (
    _ROOT / "docs" / "images" if os.environ.get("UPDATE_DOC_IMAGES") == "1" else _ROOT / "test-artifacts" / "docs-images"
)
SAAS_APP_URL = "https://app.contoso.example/"
ACTIVATE = "Activate subscription"


def landing_url(host, token: str) -> str:
    """The link Microsoft sends the buyer to: the token percent-encoded once."""
    return f"{host.url}/api/landing?token={quote(token, safe='')}"


def heading(page) -> str:
    return page.locator("#page-title").inner_text().strip()


def text_of(page, name: str) -> str:
    return page.get_by_test_id(name).inner_text().strip()


def activate_button(page):
    return page.get_by_role("button", name=ACTIVATE)


def assert_document_headers(response) -> None:
    headers = response.all_headers()
    csp = headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["cache-control"] == "no-store"
    assert headers["x-content-type-options"] == "nosniff"


def stored(services, subscription_id: str):
    found = services.repository.get(subscription_id)
    return found.record if found else None


def wait_for_status(services, subscription_id: str, status: LocalStatus, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (record := stored(services, subscription_id)) is None or record.status is not status:
        assert time.monotonic() < deadline, f"still {record.status if record else None}, expected {status}"
        time.sleep(0.05)


@pytest.fixture
def host_with(make_services, devhost_session):
    """The dev host with services built from setting overrides: ``host, services = host_with(...)``."""
    sign_in(devhost_session, TEST_USER)
    yield lambda **overrides: (devhost_session, make_services(**overrides))
    sign_in(devhost_session, TEST_USER)


def test_new_purchase_to_active_subscription(devhost, standin, services, tab):
    standin.set_plans(
        "contoso-offer", [make_plan("team", per_seat=True, min_quantity=1, max_quantity=100, display_name="Team (per seat)")]
    )
    purchase = standin.create_purchase(
        plan_id="team",
        quantity=10,
        name="Contoso Analytics for Finance",
        purchaser=make_identity("ada@contoso.example"),
        term_unit="P1M",
    )
    sid = purchase["subscriptionId"]
    page = tab.page

    response = page.goto(landing_url(devhost, purchase["token"]))

    assert response.status == 200
    assert_document_headers(response)
    assert heading(page) == "Confirm your subscription"
    assert text_of(page, "subscription-name") == "Contoso Analytics for Finance"
    assert text_of(page, "offer") == "contoso-offer"
    assert text_of(page, "plan").startswith("Team (per seat)")
    assert text_of(page, "quantity") == "10"
    assert text_of(page, "term").startswith("1 month")
    assert text_of(page, "free-trial") == "No"
    assert text_of(page, "purchaser") == text_of(page, "beneficiary") == "ada@contoso.example"
    assert text_of(page, "signed-in-user") == "Ada Lovelace (ada@contoso.example)"
    assert page.get_by_role("button").count() == 1
    assert activate_button(page).is_visible()
    assert purchase["token"] not in page.content()
    assert stored(services, sid).status is LocalStatus.PENDING_FULFILLMENT_START
    tab.shot("confirm")
    DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(DOCS_IMAGES / "landing-confirm.png"), full_page=True)

    with page.expect_navigation() as navigation:
        activate_button(page).click()

    assert navigation.value.status == 200
    assert_document_headers(navigation.value)
    assert heading(page) == "Your subscription is active"
    assert text_of(page, "status") == "Active"
    assert page.get_by_test_id("open-app").get_attribute("href") == SAAS_APP_URL
    assert page.get_by_role("button").count() == 0
    tab.shot("success")
    page.screenshot(path=str(DOCS_IMAGES / "landing-success.png"), full_page=True)

    record = stored(services, sid)
    assert record.status is LocalStatus.SUBSCRIBED
    assert record.activated_by == TEST_USER
    assert standin.activation_count(sid) == 1
    assert standin.get_subscription(sid)["saasSubscriptionStatus"] == "Subscribed"


def test_returning_buyer(devhost, standin, services, tab):
    purchase = standin.create_purchase(name="Contoso Analytics")
    sid = purchase["subscriptionId"]
    standin.set_subscription(sid, status="Subscribed")
    page = tab.page

    response = page.goto(landing_url(devhost, purchase["token"]))

    assert response.status == 200
    assert heading(page) == "Your subscription"
    assert text_of(page, "status") == "Active"
    assert page.get_by_role("link", name="Open Contoso Analytics").get_attribute("href") == SAAS_APP_URL
    assert activate_button(page).count() == 0
    tab.shot("returning-active")

    standin.set_subscription(sid, status="Suspended")
    response = page.goto(landing_url(devhost, standin.new_token(sid)["token"]))
    assert response.status == 200 and text_of(page, "status") == "Suspended"
    assert activate_button(page).count() == 0
    tab.shot("returning-suspended")

    standin.set_subscription(sid, status="Unsubscribed")
    response = page.goto(landing_url(devhost, standin.new_token(sid)["token"]))
    assert response.status == 200 and heading(page) == "This subscription was cancelled"
    tab.shot("returning-cancelled")

    assert standin.activation_count(sid) == 0
    assert stored(services, sid).status is LocalStatus.UNSUBSCRIBED


def test_expired_token(devhost, standin, services, tab):
    purchase = standin.create_purchase()
    standin.expire_token(purchase["token"])
    page = tab.page

    response = page.goto(landing_url(devhost, purchase["token"]))

    assert response.status == 400
    assert_document_headers(response)
    assert heading(page) == "We couldn't identify this purchase"
    assert "expired" in page.locator("main").inner_text()
    assert page.get_by_text("Configure account").is_visible()
    assert activate_button(page).count() == 0
    tab.shot("expired-token")
    assert stored(services, purchase["subscriptionId"]) is None

    response = page.goto(f"{devhost.url}/api/landing")
    assert response.status == 400 and heading(page) == "We need your purchase details"
    tab.shot("missing-token")


def test_sign_in_required(devhost, standin, services, tab):
    purchase = standin.create_purchase(name="Not for strangers")
    sign_in(devhost, None)
    page = tab.page

    response = page.goto(landing_url(devhost, purchase["token"]))

    assert response.status == 401
    assert heading(page) == "Sign in to continue"
    assert "Not for strangers" not in page.content()
    link = page.get_by_role("link", name="Sign in with Microsoft").get_attribute("href")
    assert link.startswith("/.auth/login/aad?post_login_redirect_uri=")
    tab.shot("sign-in")
    assert stored(services, purchase["subscriptionId"]) is None


def test_marketplace_down_then_recovered(devhost, standin, services, tab):
    purchase = standin.create_purchase()
    sid = purchase["subscriptionId"]
    standin.fail_next(n=20, status=503, path_contains="/resolve")
    page = tab.page

    response = page.goto(landing_url(devhost, purchase["token"]))

    assert response.status == 503
    assert_document_headers(response)
    assert heading(page) == "Something went wrong on our side"
    reference = text_of(page, "support-reference")
    assert reference == standin.last_request("resolve")["correlationId"]
    assert page.get_by_text("Please try again").is_visible()
    tab.shot("marketplace-down")
    assert stored(services, sid) is None

    standin.clear_faults()
    response = page.reload()
    assert response.status == 200 and heading(page) == "Confirm your subscription"
    tab.shot("recovered-confirm")
    with page.expect_navigation() as navigation:
        activate_button(page).click()
    assert navigation.value.status == 200 and heading(page) == "Your subscription is active"
    tab.shot("recovered-success")
    assert standin.activation_count(sid) == 1
    assert stored(services, sid).status is LocalStatus.SUBSCRIBED


def test_manual_mode(host_with, standin, tab):
    host, services = host_with(ACTIVATION_MODE="manual")
    purchase = standin.create_purchase()
    sid = purchase["subscriptionId"]
    page = tab.page

    response = page.goto(landing_url(host, purchase["token"]))
    assert response.status == 200 and heading(page) == "Confirm your subscription"
    assert page.get_by_text("We will finish setting up your account").is_visible()
    tab.shot("manual-confirm")

    with page.expect_navigation() as navigation:
        activate_button(page).click()

    assert navigation.value.status == 200
    assert heading(page) == "We are setting up your account"
    assert text_of(page, "status") == "Set-up in progress"
    tab.shot("manual-pending")
    record = stored(services, sid)
    assert record.status is LocalStatus.PENDING_ACTIVATION
    assert record.activated_by == TEST_USER
    assert standin.activation_count(sid) == 0


def test_double_submit(devhost, standin, services, tab):
    """Two clicks, a refresh of the result (form re-posted) and a second tab: one Activate, no error."""
    purchase = standin.create_purchase()
    sid = purchase["subscriptionId"]
    page = tab.page
    posts: list[str] = []
    lock = threading.Lock()

    def count_posts(request):
        if request.method == "POST" and request.url.endswith("/api/landing"):
            with lock:
                posts.append(request.url)

    tab.context.on("request", count_posts)
    page.goto(landing_url(devhost, purchase["token"]))
    second = tab.new_page()  # a second tab on the same purchase, opened before activating
    second.goto(landing_url(devhost, purchase["token"]))
    assert heading(second) == "Confirm your subscription"

    standin.latency_seconds = 0.3  # Microsoft is slow: the second click lands while the first is in flight
    box = activate_button(page).bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.click(x, y)  # low-level clicks: the second lands while the first POST is in flight
    page.wait_for_timeout(150)
    page.mouse.click(x, y)
    # the first navigation is abandoned by the browser; the page shows the second request's answer
    expect(page.locator("#page-title")).to_have_text(
        re.compile(r"^Your subscription is (active|being activated)$"), timeout=15_000
    )
    assert page.url == f"{devhost.url}/api/landing"
    assert len(posts) == 2, "both clicks were submitted"
    tab.shot("double-click")
    standin.latency_seconds = 0
    wait_for_status(services, sid, LocalStatus.SUBSCRIBED)  # the first (abandoned) request finishes server-side

    response = page.reload()  # re-posts the form
    assert response.request.method == "POST"
    assert response.status == 200 and heading(page) == "Your subscription is active"
    tab.shot("refresh-after-success")

    with second.expect_navigation() as navigation:
        activate_button(second).click()
    assert navigation.value.status == 200 and heading(second) == "Your subscription is active"
    tab.shot("second-tab", page=second)

    assert len(posts) == 4, posts  # two clicks, the refresh, the second tab
    assert standin.activation_count(sid) == 1
    assert stored(services, sid).status is LocalStatus.SUBSCRIBED
    kinds = [entry["kind"] for entry in services.repository.history(sid)]
    assert kinds.count("activation_sent") == 1
