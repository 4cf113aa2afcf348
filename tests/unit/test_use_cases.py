"""Use cases (landing page, activation, webhook) against in-memory fakes: no Functions runtime, no I/O."""

from __future__ import annotations

import json
import threading
from urllib.parse import parse_qs, urlsplit

import pytest

from shared import errors
from shared.landing import confirm_activation, view_purchase
from shared.principal import SignedInUser
from shared.state_machine import LocalStatus
from shared.webhook import PayloadTooLargeError, VerificationFailedError, handle_webhook
from tests.fakes import fake_services

USER = SignedInUser(name="Ada Lovelace", email="ada@contoso.example", object_id="oid-ada")
OTHER_USER = SignedInUser(name="Eve", email="eve@contoso.example", object_id="oid-eve")
TOKEN = "abc+def/ghi=="
SUB = "11111111-2222-3333-4444-555555555555"


@pytest.fixture
def services():
    s = fake_services()
    s.marketplace.add(SUB, token=TOKEN, plan_id="standard", quantity=5, name="Team sub")
    return s


def _form_token(page) -> str:
    return page.context["form_token"]


# -- landing page -------------------------------------------------------------------------------


def test_new_purchase_shows_confirmation_and_records_pending(services):
    page = view_purchase(services, TOKEN, USER)
    assert (page.status, page.template) == (200, "confirm.html")
    assert page.context["plan_name"] == "Standard"
    stored = services.repository.get(SUB)
    assert stored.record.status is LocalStatus.PENDING_FULFILLMENT_START
    assert stored.record.signed_in_user == "Ada Lovelace <ada@contoso.example>"


def test_token_space_is_restored_to_plus(services):
    page = view_purchase(services, TOKEN.replace("+", " "), USER)
    assert page.status == 200 and page.template == "confirm.html"


def test_missing_and_invalid_tokens(services):
    assert view_purchase(services, "", USER).status == 400
    page = view_purchase(services, "not-a-token", USER)
    assert (page.status, page.template) == (400, "invalid_token.html")
    assert services.repository.get(SUB) is None


def test_sign_in_required_and_link_keeps_token(services):
    page = view_purchase(services, TOKEN, None)
    assert (page.status, page.template) == (401, "sign_in.html")
    login = urlsplit(page.context["login_url"])
    back = parse_qs(login.query)["post_login_redirect_uri"][0]
    assert parse_qs(urlsplit(back).query)["token"][0] == TOKEN
    assert services.repository.get(SUB) is None


def test_marketplace_down_shows_retry_page_and_writes_nothing(services):
    services.marketplace.fail_with = errors.MarketplaceUnavailableError("down", status=503)
    page = view_purchase(services, TOKEN, USER)
    assert (page.status, page.template) == (503, "unavailable.html")
    assert services.repository.get(SUB) is None


def test_marketplace_403_is_neutral_for_the_buyer(services, caplog):
    services.marketplace.fail_with = errors.MarketplaceUnauthorizedError("forbidden", status=403)
    page = view_purchase(services, TOKEN, USER)
    assert (page.status, page.template) == (502, "unavailable.html")
    assert any(r.levelname == "ERROR" and "OPERATOR ACTION NEEDED" in r.getMessage() for r in caplog.records)


def test_storage_down_shows_retry_page(services):
    services.repository.down = True
    page = view_purchase(services, TOKEN, USER)
    assert page.status == 503


def test_confirm_activates_exactly_once(services):
    page = view_purchase(services, TOKEN, USER)
    first = confirm_activation(services, SUB, _form_token(page), USER)
    second = confirm_activation(services, SUB, _form_token(page), USER)
    assert (first.status, first.template, first.context["activation"]) == (200, "success.html", "activated")
    assert (second.status, second.template, second.context["activation"]) == (200, "success.html", "already_active")
    assert services.marketplace.activations == [SUB]
    record = services.repository.get(SUB).record
    assert record.status is LocalStatus.SUBSCRIBED
    assert record.activated_by == "Ada Lovelace <ada@contoso.example>"
    # The read-back's term dates (set by activation) are recorded with the status.
    assert record.term_start is not None and record.term_start.isoformat().startswith("2026-11-01")


def test_concurrent_confirms_activate_once(services):
    page = view_purchase(services, TOKEN, USER)
    results = []

    def submit():
        results.append(confirm_activation(services, SUB, _form_token(page), USER))

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status == 200 for r in results)
    assert services.marketplace.activations == [SUB]


def test_form_token_swapped_or_forged_is_refused_and_changes_nothing(services):
    page = view_purchase(services, TOKEN, USER)
    token = _form_token(page)
    assert confirm_activation(services, SUB, token, OTHER_USER).status == 403
    assert confirm_activation(services, "a7ed91eb-d879-5d63-8d09-a48ab865fb7f", token, USER).status == 403
    assert confirm_activation(services, SUB, token[:-2] + "xx", USER).status == 403
    assert services.marketplace.activations == []
    assert services.repository.get(SUB).record.status is LocalStatus.PENDING_FULFILLMENT_START


def test_expired_form_token_is_refused(services):
    page = view_purchase(services, TOKEN, USER)
    services.clock.advance(minutes=31)
    refused = confirm_activation(services, SUB, _form_token(page), USER)
    assert (refused.status, refused.template) == (403, "forbidden.html")
    assert services.marketplace.activations == []


def test_asynchronous_activation_stays_requested(services):
    services.marketplace.activation_completes = False
    page = view_purchase(services, TOKEN, USER)
    result = confirm_activation(services, SUB, _form_token(page), USER)
    assert result.context["activation"] == "requested"
    assert services.repository.get(SUB).record.status is LocalStatus.ACTIVATION_REQUESTED
    # A refresh of the landing page shows "being activated" and never a second form.
    again = view_purchase(services, TOKEN, USER)
    assert again.template == "activating.html"


def test_manual_mode_waits_for_an_operator():
    services = fake_services(ACTIVATION_MODE="manual")
    services.marketplace.add(SUB, token=TOKEN)
    page = view_purchase(services, TOKEN, USER)
    result = confirm_activation(services, SUB, _form_token(page), USER)
    assert result.template == "pending_operator.html"
    assert services.marketplace.activations == []
    assert services.repository.get(SUB).record.status is LocalStatus.PENDING_ACTIVATION


@pytest.mark.parametrize(
    "status,template", [("Subscribed", "manage.html"), ("Suspended", "manage.html"), ("Unsubscribed", "cancelled.html")]
)
def test_returning_buyer_never_activates_again(status, template):
    services = fake_services()
    services.marketplace.add(SUB, status=status, token=TOKEN)
    page = view_purchase(services, TOKEN, USER)
    assert page.template == template
    assert "form_token" not in page.context
    assert services.marketplace.activations == []


# -- webhook ------------------------------------------------------------------------------------


def _known(services, status="Subscribed"):
    services.marketplace.subscriptions[SUB]["saasSubscriptionStatus"] = status
    view_purchase(services, TOKEN, USER)


def _body(operation_id, action, **fields) -> bytes:
    return json.dumps({"id": operation_id, "subscriptionId": SUB, "action": action, **fields}).encode()


def test_webhook_suspend_applies_once(services):
    _known(services)
    op = services.marketplace.add_operation(
        "727382df-0288-5872-9e5a-05089b71dde0", SUB, "Suspend", timeStamp="2026-11-02T00:00:00Z"
    )
    result = handle_webhook(services, None, _body("727382df-0288-5872-9e5a-05089b71dde0", "Suspend", timeStamp=op["timeStamp"]))
    assert result.result == "applied"
    assert services.repository.get(SUB).record.status is LocalStatus.SUSPENDED
    duplicate = handle_webhook(services, None, _body("727382df-0288-5872-9e5a-05089b71dde0", "Suspend"))
    assert (duplicate.status, duplicate.result) == (200, "duplicate")
    assert [h["kind"] for h in services.repository.history(SUB)].count("suspend") == 1


def test_webhook_older_event_is_stale(services):
    _known(services)
    services.marketplace.add_operation("adfe5d4b-600d-5203-9e34-8ab2c399dd46", SUB, "Suspend", timeStamp="2026-11-03T00:00:00Z")
    services.marketplace.add_operation(
        "ca539779-7e88-5059-852e-981fa1250b7b", SUB, "Reinstate", timeStamp="2026-11-02T00:00:00Z", status="Succeeded"
    )
    handle_webhook(services, None, _body("adfe5d4b-600d-5203-9e34-8ab2c399dd46", "Suspend"))
    result = handle_webhook(services, None, _body("ca539779-7e88-5059-852e-981fa1250b7b", "Reinstate"))
    assert result.result == "stale"
    assert services.repository.get(SUB).record.status is LocalStatus.SUSPENDED


def test_webhook_change_quantity_in_progress_is_answered_and_applied(services):
    _known(services)
    services.marketplace.add_operation(
        "3d53e3cc-6ee2-592f-a2c7-2ff1d696b7f9", SUB, "ChangeQuantity", status="InProgress", quantity=9
    )
    result = handle_webhook(
        services, None, _body("3d53e3cc-6ee2-592f-a2c7-2ff1d696b7f9", "ChangeQuantity", quantity=9, status="InProgress")
    )
    assert result.result == "applied"
    assert services.marketplace.updates == [(SUB, "3d53e3cc-6ee2-592f-a2c7-2ff1d696b7f9", "Success")]
    assert services.repository.get(SUB).record.quantity == 9


def test_webhook_policy_refusal_patches_failure_and_keeps_state():
    from shared.policy import PolicyDecision

    services = fake_services()
    services.marketplace.add(SUB, token=TOKEN, status="Subscribed", quantity=5)
    view_purchase(services, TOKEN, USER)
    services._lazy["policy"] = lambda request: PolicyDecision.refuse("seats in use")
    services.marketplace.add_operation(
        "3d53e3cc-6ee2-592f-a2c7-2ff1d696b7f9", SUB, "ChangeQuantity", status="InProgress", quantity=2
    )
    result = handle_webhook(services, None, _body("3d53e3cc-6ee2-592f-a2c7-2ff1d696b7f9", "ChangeQuantity", quantity=2))
    assert result.result == "refused"
    assert services.marketplace.updates == [(SUB, "3d53e3cc-6ee2-592f-a2c7-2ff1d696b7f9", "Failure")]
    assert services.repository.get(SUB).record.quantity == 5


def test_webhook_for_unknown_subscription_fetches_and_records_it(services):
    services.marketplace.subscriptions[SUB]["saasSubscriptionStatus"] = "Subscribed"
    services.marketplace.add_operation("a812b4be-2da7-5ff2-8473-b147cb506482", SUB, "Subscribe", status="Succeeded")
    result = handle_webhook(services, None, _body("a812b4be-2da7-5ff2-8473-b147cb506482", "Subscribe"))
    assert result.status == 200
    assert services.repository.get(SUB).record.status is LocalStatus.SUBSCRIBED


def test_webhook_unknown_action_is_recorded(services):
    _known(services)
    services.marketplace.add_operation("1a07e6d2-2771-5ecd-94cd-0beedb33575a", SUB, "Transfer", status="Succeeded")
    result = handle_webhook(services, None, _body("1a07e6d2-2771-5ecd-94cd-0beedb33575a", "Transfer"))
    assert (result.status, result.result) == (200, "recorded")
    assert services.repository.history(SUB)[-1]["kind"] == "unknown_action"


def test_webhook_verification_mismatch_is_refused_and_records_nothing(services):
    _known(services)
    services.marketplace.add_operation("db28a77e-17dc-5ee0-97c2-33e3a556b504", SUB, "Reinstate", status="Succeeded")
    with pytest.raises(VerificationFailedError):
        handle_webhook(services, None, _body("db28a77e-17dc-5ee0-97c2-33e3a556b504", "Unsubscribe"))
    with pytest.raises(VerificationFailedError):
        handle_webhook(services, None, _body("5c06d23a-ad56-5487-9f1d-0e9460dce286", "Suspend"))
    assert services.repository.get_marker(SUB, "db28a77e-17dc-5ee0-97c2-33e3a556b504") is None
    assert services.repository.get(SUB).record.status is LocalStatus.SUBSCRIBED


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"id": "x"}', json.dumps({"id": "x", "action": "Suspend"}).encode()])
def test_webhook_malformed_bodies_are_bad_requests(services, body):
    with pytest.raises(errors.BadRequestError):
        handle_webhook(services, None, body)


def test_webhook_oversized_body_is_refused(services):
    with pytest.raises(PayloadTooLargeError):
        handle_webhook(services, None, b"{" + b" " * (services.settings.webhook_max_body_bytes + 1) + b"}")


def test_webhook_transient_failures_are_5xx(services):
    _known(services)
    services.marketplace.add_operation("727382df-0288-5872-9e5a-05089b71dde0", SUB, "Suspend")
    services.marketplace.fail_with = errors.MarketplaceUnavailableError("timeout")
    with pytest.raises(errors.MarketplaceError) as caught:
        handle_webhook(services, None, _body("727382df-0288-5872-9e5a-05089b71dde0", "Suspend"))
    assert errors.http_status_for(caught.value) >= 500
    services.marketplace.fail_with = None
    services.repository.down = True
    with pytest.raises(errors.StorageUnavailableError) as caught:
        handle_webhook(services, None, _body("727382df-0288-5872-9e5a-05089b71dde0", "Suspend"))
    assert errors.http_status_for(caught.value) == 503
    services.repository.down = False
    assert handle_webhook(services, None, _body("727382df-0288-5872-9e5a-05089b71dde0", "Suspend")).result == "applied"


def test_webhook_fields_match_case_insensitively(services):
    _known(services)
    services.marketplace.add_operation("c4345a62-70e3-5dd9-bef2-a74e29d1e95a", SUB, "Suspend")
    body = json.dumps({"Id": "c4345a62-70e3-5dd9-bef2-a74e29d1e95a", "SubscriptionId": SUB, "Action": "suspend"}).encode()
    assert handle_webhook(services, None, body).result == "applied"


def test_stale_webhook_defers_to_microsofts_current_record(services):
    # Our record was synced (at the fake clock's now) from a listing that did not show the Suspend yet.
    _known(services)
    services.marketplace.subscriptions[SUB]["saasSubscriptionStatus"] = "Suspended"
    services.marketplace.add_operation("a812b4be-2da7-5ff2-8473-b147cb506482", SUB, "Suspend", timeStamp="2026-11-01T11:00:00Z")
    result = handle_webhook(services, None, _body("a812b4be-2da7-5ff2-8473-b147cb506482", "Suspend"))
    assert result.result == "stale"  # older than what we had applied...
    assert services.repository.get(SUB).record.status is LocalStatus.SUSPENDED  # ...but Microsoft's truth wins
    assert services.repository.history(SUB)[-1]["detail"].startswith("stale event")


def test_stale_duplicate_that_microsoft_agrees_with_writes_nothing_more(services):
    _known(services)
    services.marketplace.add_operation("ca539779-7e88-5059-852e-981fa1250b7b", SUB, "Renew", timeStamp="2026-11-01T11:00:00Z")
    before = len(services.repository.history(SUB))
    assert handle_webhook(services, None, _body("ca539779-7e88-5059-852e-981fa1250b7b", "Renew")).result == "stale"
    assert len(services.repository.history(SUB)) == before + 1  # the stale entry only, no sync
