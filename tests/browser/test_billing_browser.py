"""Billing in Debian's Chromium: the read-back page (ours beside Microsoft's, differences highlighted,
links to the subscription) and an operator's decision on flagged usage from the Attention page.

The metering test's services (Azurite, the stand-in over HTTP, the injected clock) serve the dev host.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from devtools.devhost import SignedInUser
from shared import metering
from shared.services import set_services_factory
from shared.usage_readback import run_usage_readback
from tests.conftest import TENANT_ID
from tests.integration.test_billing import NINE, flag_one
from tests.integration.test_metering import meter, usage

__all__ = ["meter"]  # the fixture, shared with the metering tests

pytestmark = [pytest.mark.browser, pytest.mark.azurite]


@pytest.fixture
def billing_site(meter, devhost):
    set_services_factory(lambda: meter.services)  # the dev host fixture installed a bundle of its own
    devhost.signed_in_user = SignedInUser.parse("Ada Operator <ada@contoso.example>", TENANT_ID, roles=("Console.Operator",))
    return meter


def test_billing_page_highlights_what_microsoft_billed_differently_and_links_to_the_subscription(tab, devhost, billing_site):
    meter = billing_site
    same, billed_less = meter.subscription(), meter.subscription()
    meter.report(usage(same, 7, at=NINE, id="a"), usage(billed_less, 9, at=NINE, id="b"))
    meter.emit()
    meter.standin.usage_recon[(billed_less, "api_calls", NINE.date().isoformat())] = {"processedQuantity": Decimal(4)}
    meter.clock.advance(days=1)
    assert run_usage_readback(meter.services, days=1).differences == 1

    page = tab.page
    assert page.goto(devhost.url + "/api/console/billing?days=3").status == 200
    rows = page.locator('[data-testid="billing-row"]')
    assert rows.count() == 2
    differing = page.locator('[data-testid="billing-row"].differs')
    assert differing.count() == 1 and billed_less in differing.inner_text() and "Difference" in differing.inner_text()
    calm = page.locator('[data-testid="billing-row"]:not(.differs)')
    # The highlight is visible, not only a class: the differing row is painted unlike the matching one.
    assert differing.evaluate("e => getComputedStyle(e).backgroundColor") != calm.evaluate(
        "e => getComputedStyle(e).backgroundColor"
    )
    tab.shot("billing")
    differing.get_by_role("link", name=billed_less).click()
    page.wait_for_url(f"**/api/console/subscriptions/{billed_less}")
    assert page.locator("#page-title").count() == 1 and billed_less in page.content()
    assert tab.problems == []


def test_operator_moves_flagged_usage_into_the_current_hour_from_the_attention_page(tab, devhost, billing_site):
    meter = billing_site
    sid = flag_one(meter, quantity=6)
    page = tab.page
    page.goto(devhost.url + "/api/console/attention")
    form = page.locator('form[action="/api/console/usage/resolve"]').first
    assert sid in page.locator('[data-testid="attention-usage"]').first.inner_text()
    form.get_by_label("Decision").select_option("move")
    form.get_by_label("I confirm").check()
    form.locator('button[type="submit"]').click()
    assert "moved into" in page.locator('[data-testid="result"]').inner_text()
    assert metering.usage_store(meter.services).list_flagged() == []
    meter.clock.advance(hours=1)
    meter.emit()
    assert any(e["dimension"] == "storage_gb" and Decimal(e["quantity"]) == 6 for e in meter.accepted(sid))
    assert tab.problems == []
