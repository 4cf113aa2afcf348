"""Request deadlines (issue 11, item 2): a webhook answers within WEBHOOK_DEADLINE_SECONDS and the
landing page within LANDING_DEADLINE_SECONDS, whatever Microsoft does, and nothing is left half done.

Structure is asserted (how many attempts Microsoft saw, what was recorded), not wall time: the
measured worst answer times are in the closing note and docs/benchmarks.md."""

from __future__ import annotations

import json

import pytest
import requests

pytestmark = pytest.mark.azurite


def _post_webhook(http, devhost, standin, operation_id: str) -> requests.Response:
    return http.post(
        devhost.url + "/api/webhook",
        data=json.dumps(standin.webhook_payload(operation_id)).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer " + standin.sign_token()},
        timeout=60,
    )


def test_a_throttled_marketplace_gets_no_retry_the_deadline_cannot_hold(standin, make_services, devhost, http):
    """Before: 3 retries honouring Retry-After 10 s each, an answer after 30 s (Microsoft waits 10)."""
    services = make_services(WEBHOOK_DEADLINE_SECONDS="3")
    (subscription_id,) = standin.seed(1, plan_id="standard", quantity=5)
    operation = standin.trigger(subscription_id, "ChangeQuantity", quantity=8, deliver=False)
    standin.fail_next(100, status=429, path_contains="/operations/", retry_after=10)

    answer = _post_webhook(http, devhost, standin, operation["id"])

    assert answer.status_code == 503, answer.text
    assert standin.calls["get_operation"] == 1  # the 10 s wait did not fit in the deadline
    assert services.repository.get_marker(subscription_id, operation["id"]) is None
    assert standin.get_operation(operation["id"])["status"] == "InProgress"


def test_a_hanging_marketplace_is_given_up_on_inside_the_deadline(standin, make_services, devhost, http):
    """Before: a 20 s read timeout and 3 retries, an answer after 83.5 s."""
    services = make_services(WEBHOOK_DEADLINE_SECONDS="2")
    (subscription_id,) = standin.seed(1, plan_id="standard", quantity=5)
    operation = standin.trigger(subscription_id, "Suspend", deliver=False)
    standin.latency_seconds = 30  # every API call hangs

    answer = _post_webhook(http, devhost, standin, operation["id"])
    standin.latency_seconds = 0

    assert answer.status_code == 503, answer.text
    assert standin.calls["get_operation"] == 1  # one attempt, bounded by what was left; no retry after it
    assert services.repository.get(subscription_id) is None


def test_no_answer_to_microsoft_without_time_left_to_record_it(standin, make_services, devhost, http):
    """Microsoft must not be told Success when our own write can no longer follow within the deadline."""
    services = make_services(WEBHOOK_DEADLINE_SECONDS="2")
    (subscription_id,) = standin.seed(1, plan_id="standard", quantity=5)
    operation = standin.trigger(subscription_id, "ChangeQuantity", quantity=8, deliver=False)
    standin.latency_seconds = 1.0  # Get Operation (and Get Subscription) eat half the budget

    answer = _post_webhook(http, devhost, standin, operation["id"])
    standin.latency_seconds = 0

    assert answer.status_code == 503, answer.text
    assert standin.patches == []  # nothing answered ...
    assert standin.get_operation(operation["id"])["status"] == "InProgress"
    marker = services.repository.get_marker(subscription_id, operation["id"])
    assert marker is None or marker.pending  # ... and nothing applied; the redelivery finishes it

    redelivered = _post_webhook(http, devhost, standin, operation["id"])
    assert redelivered.status_code == 200, redelivered.text
    assert [(p["operationId"], p["status"]) for p in standin.patches] == [(operation["id"], "Success")]
    assert services.repository.get(subscription_id).record.quantity == 8


def test_the_landing_page_answers_a_retry_page_while_resolve_is_throttled(standin, make_services, devhost, http):
    """Before: 30 s while Resolve was throttled."""
    make_services(LANDING_DEADLINE_SECONDS="3")
    purchase = standin.create_purchase(plan_id="standard", quantity=2)
    standin.fail_next(100, status=429, path_contains="resolve", retry_after=10)

    page = http.get(devhost.url + "/api/landing", params={"token": purchase["token"]}, timeout=60)

    assert page.status_code == 503
    assert 'data-testid="support-reference"' in page.text
    assert standin.calls["resolve"] == 1
