"""The operator console in Debian's Chromium: list, filter, detail, activate end to end, the refusals.

Screenshots of the three main pages go to ``docs/images/`` when UPDATE_DOC_IMAGES=1 (else under
``test-artifacts/docs-images``); the tab fixture fails the test on any CSP refusal or script error.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from devtools.devhost import SignedInUser
from shared import state_machine as sm
from shared.reconcile import run_reconciliation
from tests.conftest import TENANT_ID, flag_with_waiting_event

pytestmark = [pytest.mark.browser, pytest.mark.azurite]

_ROOT = Path(__file__).resolve().parents[2]
DOCS_IMAGES = (
    _ROOT / "docs" / "images" if os.environ.get("UPDATE_DOC_IMAGES") == "1" else _ROOT / "test-artifacts" / "docs-images"
)
ADA = "Ada Operator <ada@contoso.example>"


@pytest.fixture
def console_site(standin, services, devhost):
    ids = standin.seed(6, plan_id="standard", quantity=5)
    standin.set_subscription(ids[1], status="Suspended")
    for n, sid in enumerate(ids):
        standin.set_subscription(sid, name=f"Contoso tenant {n + 1}")
    purchase = standin.create_purchase(plan_id="standard", quantity=3, name="Fabrikam (waiting)")
    assert run_reconciliation(services).completed
    assert run_reconciliation(services).completed
    waiting = purchase["subscriptionId"]
    change = sm.Change(
        kind=sm.Kind.REQUEST_ACTIVATION, source=sm.Source.LANDING_PAGE, occurred_at=services.clock(), actor="buyer"
    )
    services.repository.apply(waiting, lambda record: sm.apply(record, change, now=services.clock()))

    def sign_in(roles=("Console.Operator",)) -> None:
        devhost.signed_in_user = SignedInUser.parse(ADA, TENANT_ID, roles=roles)

    sign_in()
    return ids, waiting, sign_in


def test_list_filter_and_detail(tab, devhost, console_site):
    ids, _, _ = console_site
    page = tab.page
    response = page.goto(devhost.url + "/api/console")
    assert response.status == 200
    assert page.locator('[data-testid="subscription-row"]').count() == 7
    DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(DOCS_IMAGES / "console-list.png"), full_page=True)
    # Readable at 1024 px: ids shortened (the full id on hover and in the link), no row wrapping into many lines.
    page.set_viewport_size({"width": 1024, "height": 768})
    short = page.locator('[data-testid="short-id"]').first
    assert short.get_attribute("title") in ids or short.get_attribute("title") == short.get_attribute("data-full-id")
    assert len(short.inner_text()) <= 9
    heights = page.locator('[data-testid="subscription-row"]').evaluate_all(
        "rows => rows.map(r => r.getBoundingClientRect().height)"
    )
    line = page.evaluate("parseFloat(getComputedStyle(document.body).lineHeight) || 20")
    assert max(heights) <= 3.2 * line, (heights, line)  # two lines (name, short id) plus padding
    assert page.evaluate("document.documentElement.scrollWidth") <= 1024 + 1  # no horizontal scrolling
    page.screenshot(path=str(DOCS_IMAGES / "console-list-1024.png"), full_page=True)
    page.select_option('select[name="status"]', "Suspended")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url("**status=Suspended**")
    assert page.locator('[data-testid="subscription-row"]').count() == 1
    page.get_by_role("link", name="Contoso tenant 2").click()
    assert page.locator("#page-title").inner_text().startswith("Contoso tenant 2")
    assert ids[1] in page.content()
    assert page.locator('[data-testid="history-entry"]').count() >= 1
    page.screenshot(path=str(DOCS_IMAGES / "console-subscription.png"), full_page=True)
    tab.shot("detail")


def test_activate_end_to_end_and_attention(tab, devhost, console_site, standin, services):
    _, waiting, _ = console_site
    page = tab.page
    page.goto(devhost.url + "/api/console/attention")
    assert page.locator('[data-testid="attention-activation"]').count() == 1
    page.screenshot(path=str(DOCS_IMAGES / "console-attention.png"), full_page=True)
    page.get_by_role("link", name="Fabrikam (waiting)").click()
    page.get_by_label("I confirm").check()
    page.get_by_role("button", name="Activate").click()
    assert page.locator('[data-testid="result"]').inner_text().startswith(("Activated", "Activation sent"))
    assert standin.calls["activate"] == 1
    actors = [entry["actor"] for entry in services.repository.history(waiting)]
    assert f"operator:{ADA}" in actors
    tab.shot("activated")


def test_refusals_in_the_browser(tab, devhost, console_site, standin):
    _, waiting, sign_in = console_site
    page = tab.page
    page.goto(f"{devhost.url}/api/console/subscriptions/{waiting}")
    # A tampered CSRF token: refused, nothing sent.
    page.locator('input[name="form_token"]').evaluate("element => { element.value = 'forged'; }")
    page.get_by_label("I confirm").check()
    with page.expect_response("**/activate") as answer:
        page.get_by_role("button", name="Activate").click()
    assert answer.value.status == 403
    assert standin.calls["activate"] == 0
    tab.shot("csrf-refused")
    # A reader sees no action; a user without a console role sees nothing.
    sign_in(roles=("Console.Reader",))
    page.goto(f"{devhost.url}/api/console/subscriptions/{waiting}")
    assert page.locator('[data-testid="activate-form"]').count() == 0
    sign_in(roles=())
    response = page.goto(devhost.url + "/api/console")
    assert response.status == 403 and page.locator("h1").inner_text() == "Not allowed"
    assert waiting not in page.content()


def _settle(services, sid: str, text: str) -> None:
    """Follow the publisher operation named on the result page until Microsoft's side settles it."""
    import re
    import time

    from shared import publisher

    operation_id = re.search(r"Operation ([0-9a-f-]{36})", text).group(1)
    ends = time.monotonic() + 20
    while (operation := publisher.follow_operation(services, sid, operation_id)) is not None and not operation.settled:
        assert time.monotonic() < ends, "the operation never settled"
        time.sleep(0.2)


def test_change_seats_cancel_replay_and_reconcile_in_the_browser(tab, devhost, console_site, standin, services):
    import json

    ids, _, _ = console_site
    page = tab.page
    operator = f"operator:{ADA}"

    # Change seats: the form's own confirmation, Microsoft's operation followed to its end.
    page.goto(f"{devhost.url}/api/console/subscriptions/{ids[0]}")
    seats = page.locator('[data-testid="change-quantity-form"]')
    seats.locator('input[name="quantity"]').fill("9")
    seats.get_by_label("I confirm").check()
    seats.get_by_role("button", name="Change seats").click()
    result = page.locator('[data-testid="result"]').inner_text()
    assert result.startswith(("Sent to Microsoft", "Done")), result
    _settle(services, ids[0], page.content())
    assert services.repository.get(ids[0]).record.quantity == 9
    tab.shot("seats-changed")

    # Cancel another one: the red button, its confirmation, and the buyer's subscription ends.
    page.goto(f"{devhost.url}/api/console/subscriptions/{ids[3]}")
    cancel = page.locator('[data-testid="cancel-form"]')
    cancel.get_by_label("I confirm").check()
    cancel.get_by_role("button", name="Cancel subscription").click()
    _settle(services, ids[3], page.content())
    assert services.repository.get(ids[3]).record.status is sm.LocalStatus.UNSUBSCRIBED

    # Replay a webhook Microsoft sent that was recorded but never applied.
    suspend = standin.trigger(ids[2], "Suspend", deliver=False)
    services.repository.record_operation(
        ids[2], suspend["id"], action="Suspend", payload=json.dumps(standin.webhook_payload(suspend["id"])), correlation_id="t"
    )
    page.goto(f"{devhost.url}/api/console/subscriptions/{ids[2]}")
    replay = page.locator('[data-testid="replay-form"]')
    replay.get_by_label("I confirm").check()
    replay.get_by_role("button", name="Apply now").click()
    assert page.locator('[data-testid="result"]').inner_text().startswith("Applied")
    assert services.repository.get(ids[2]).record.status is sm.LocalStatus.SUSPENDED

    # Reconciliation: preview changes nothing, run now repairs, the runs table says who started it.
    (unrecorded,) = standin.seed(1, plan_id="standard", quantity=1)
    page.goto(devhost.url + "/api/console/reconcile")
    preview = page.locator('[data-testid="preview-form"]')
    preview.get_by_label("I confirm").check()
    preview.get_by_role("button", name="Preview").click()
    assert unrecorded in page.locator("table").inner_text()
    assert services.repository.get(unrecorded) is None
    page.get_by_role("link", name="Back").click()
    run = page.locator('[data-testid="reconcile-form"]')
    run.get_by_label("I confirm").check()
    run.get_by_role("button", name="Run now").click()
    assert page.locator('[data-testid="result"]').inner_text().startswith("Done")
    assert services.repository.get(unrecorded) is not None
    page.get_by_role("link", name="Back").click()
    assert operator in page.locator('[data-testid="run"]').first.inner_text()
    page.screenshot(path=str(DOCS_IMAGES / "console-reconcile.png"), full_page=True)

    # Every one of those actions is in its subscription's history as the operator.
    for sid, kind in ((ids[0], "change_quantity"), (ids[3], "unsubscribe"), (ids[2], "operator_action")):
        entries = [e for e in services.repository.history(sid) if e["kind"] == kind and e["actor"] == operator]
        assert entries, (sid, kind)


def test_retry_activation_change_plan_redeliver_and_acknowledge_in_the_browser(tab, devhost, console_site, standin, services):
    ids, waiting, _ = console_site
    page = tab.page
    operator = f"operator:{ADA}"

    # Microsoft refuses the operator's Activate once: the record says so and Needs attention offers the retry.
    standin.fail_next(1, status=400, path_contains="/activate")
    page.goto(f"{devhost.url}/api/console/subscriptions/{waiting}")
    page.get_by_label("I confirm").check()
    page.get_by_role("button", name="Activate").click()
    assert page.locator('[data-testid="result"]').inner_text().startswith("Activation failed")
    assert services.repository.get(waiting).record.status is sm.LocalStatus.ACTIVATION_FAILED
    page.goto(devhost.url + "/api/console/attention")
    row = page.locator('[data-testid="attention-activation"]')
    assert row.count() == 1 and "ActivationFailed" in row.inner_text()
    row.get_by_role("link").click()
    page.locator('[data-testid="activate-form"]').get_by_label("I confirm").check()
    page.get_by_role("button", name="Retry activation").click()
    assert page.locator('[data-testid="result"]').inner_text().startswith("Activated")
    assert services.repository.get(waiting).record.status is sm.LocalStatus.SUBSCRIBED
    assert standin.get_subscription(waiting)["saasSubscriptionStatus"] == "Subscribed"
    page.goto(devhost.url + "/api/console/attention")
    assert page.locator('[data-testid="attention-activation"]').count() == 0

    # Change plan: Microsoft's operation followed to its end, recorded as the operator.
    page.goto(f"{devhost.url}/api/console/subscriptions/{ids[0]}")
    plan = page.locator('[data-testid="change-plan-form"]')
    plan.locator('select[name="plan_id"]').select_option("premium")
    plan.get_by_label("I confirm").check()
    plan.get_by_role("button", name="Change plan").click()
    _settle(services, ids[0], page.content())
    assert services.repository.get(ids[0]).record.plan_id == "premium"
    assert standin.get_subscription(ids[0])["planId"] == "premium"
    changes = [e for e in services.repository.history(ids[0]) if e["kind"] == "change_plan" and e["result"] == "applied"]
    assert [e["actor"] for e in changes] == [operator]

    # A lifecycle event that could not be delivered, and a flag for a person: redeliver, then acknowledge.
    flag_with_waiting_event(services, ids[4])
    page.goto(f"{devhost.url}/api/console/subscriptions/{ids[4]}")
    assert page.locator('[data-testid="lifecycle-event"].differs').count() == 1
    redeliver = page.locator('[data-testid="redeliver-form"]')
    redeliver.get_by_label("I confirm").check()
    redeliver.get_by_role("button", name="Redeliver").click()
    assert page.locator('[data-testid="result"]').inner_text().startswith("1 delivered, 0 failed; 0 still waiting")
    assert services.repository.pending_events(ids[4]) == []
    page.get_by_role("link", name="Back").click()
    assert page.locator('[data-testid="lifecycle-event"].differs').count() == 0
    acknowledge = page.locator('[data-testid="acknowledge-form"]')
    acknowledge.get_by_label("I confirm").check()
    acknowledge.get_by_role("button", name="Acknowledge").click()
    assert "Acknowledged" in page.locator('[data-testid="result"]').inner_text()
    assert services.repository.get(ids[4]).record.flags == ()
    kinds = {e["kind"] for e in services.repository.history(ids[4]) if e["actor"] == operator}
    assert kinds == {"operator_action", "clear_flag"}
    tab.shot("redelivered-acknowledged")
