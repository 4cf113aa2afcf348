"""Lenient parsing of the SaaS Fulfillment API v2 payloads (docs/marketplace-fulfillment-v2.md §5, §7.2, §10).

Microsoft extends payloads without notice, spells quantity five ways, and pads or invents enum
values; parsing must never fail on any of that, and must keep what it does not understand.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from shared.domain import (
    AadIdentifier,
    Action,
    Operation,
    OperationStatus,
    Plan,
    ResolvedPurchase,
    Subscription,
    SubscriptionStatus,
    UpdateStatus,
    WebhookEvent,
    clean_text,
    describe_term,
    field_of,
    format_timestamp,
    parse_quantity,
    parse_timestamp,
)

SUBSCRIPTION_ID = "37f9dea2-4345-438f-b0bd-03d40d28c7e0"
OPERATION_ID = "74dfb4db-c193-4891-827d-eb05fbdc64b0"


def subscription_payload(**overrides):
    payload = {
        "id": SUBSCRIPTION_ID,
        "publisherId": "contoso",
        "offerId": "offer1-preview",
        "name": "Contoso Cloud Solution",
        "saasSubscriptionStatus": "Subscribed",
        "beneficiary": {"emailId": "test@test.com", "objectId": "oid-1", "tenantId": "tid-1", "puid": "p1"},
        "purchaser": {"emailId": "buyer@test.com", "objectId": "oid-2", "tenantId": "tid-2", "puid": "p2"},
        "planId": "silver",
        "quantity": 10,
        "term": {
            "termUnit": "P1M",
            "startDate": "2022-03-07T00:00:00Z",
            "endDate": "2022-04-06T00:00:00Z",
            "chargeDuration": None,
        },
        "autoRenew": True,
        "isTest": False,
        "isFreeTrial": False,
        "allowedCustomerOperations": ["Delete", "Update", "Read"],
        "sandboxType": "None",
        "sessionMode": "None",
        "created": "2022-03-01T10:00:00.1234567Z",
        "lastModified": "0001-01-01T00:00:00",
    }
    payload.update(overrides)
    return payload


def webhook_payload(**overrides):
    payload = {
        "id": OPERATION_ID,
        "activityId": "a1",
        "publisherId": "contoso",
        "offerId": "offer1",
        "planId": "silver",
        "quantity": 20,
        "subscriptionId": SUBSCRIPTION_ID,
        "timeStamp": "2023-02-10T18:48:58.4449839Z",
        "action": "ChangeQuantity",
        "status": "InProgress",
        "operationRequestSource": "Azure",
        "subscription": subscription_payload(),
        "purchaseToken": None,
    }
    payload.update(overrides)
    return payload


# --- quantity ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("", None),
        (None, None),
        (20, 20),
        ("20", 20),
        (20.0, 20),
        ("abc", None),
        (" 20 ", 20),
        ("20.0", 20),
        (0, 0),
        ("0", 0),
        (20.5, None),  # fractional seats are not a quantity
        ("20.5", None),
        (True, None),  # a JSON boolean is not a number of seats
        ([], None),
        ({}, None),
    ],
)
def test_parse_quantity(raw, expected):
    assert parse_quantity(raw) == expected


@pytest.mark.parametrize("raw, expected", [("", None), (None, None), (20, 20), ("20", 20), (20.0, 20), ("abc", None)])
def test_subscription_quantity_in_every_spelling(raw, expected):
    subscription = Subscription.from_api(subscription_payload(quantity=raw))
    assert subscription.quantity == expected
    assert subscription.raw["quantity"] == raw  # the original is kept


def test_quantity_absent_for_non_per_seat_plans():
    payload = subscription_payload()
    del payload["quantity"]
    assert Subscription.from_api(payload).quantity is None


@pytest.mark.parametrize("raw, expected", [("", None), (None, None), (20, 20), ("20", 20), (20.0, 20), ("abc", None)])
def test_webhook_and_resolve_quantity_in_every_spelling(raw, expected):
    assert WebhookEvent.from_api(webhook_payload(quantity=raw)).operation.quantity == expected
    resolved = ResolvedPurchase.from_api(
        {"id": SUBSCRIPTION_ID, "planId": "silver", "quantity": raw, "subscription": subscription_payload(quantity=raw)}
    )
    assert resolved.quantity == expected
    assert resolved.subscription.quantity == expected


# --- enums: unknown values are never fatal --------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Subscribed", SubscriptionStatus.SUBSCRIBED),
        (" Subscribed ", SubscriptionStatus.SUBSCRIBED),  # documentation samples pad enum strings
        ("subscribed", SubscriptionStatus.SUBSCRIBED),
        ("PendingFulfillmentStart", SubscriptionStatus.PENDING_FULFILLMENT_START),
        ("Suspended", SubscriptionStatus.SUSPENDED),
        ("Unsubscribed", SubscriptionStatus.UNSUBSCRIBED),
        ("NotStarted", SubscriptionStatus.NOT_STARTED),
        ("Frozen", SubscriptionStatus.UNKNOWN),
        ("", SubscriptionStatus.UNKNOWN),
        (None, SubscriptionStatus.UNKNOWN),
        (42, SubscriptionStatus.UNKNOWN),
    ],
)
def test_subscription_status_parsing(raw, expected):
    subscription = Subscription.from_api(subscription_payload(saasSubscriptionStatus=raw))
    assert subscription.status is expected
    assert subscription.raw["saasSubscriptionStatus"] == raw  # unknown text is still available


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("ChangePlan", Action.CHANGE_PLAN),
        ("changequantity", Action.CHANGE_QUANTITY),
        ("Suspend", Action.SUSPEND),
        ("Reinstate", Action.REINSTATE),
        ("Unsubscribe", Action.UNSUBSCRIBE),
        ("Renew", Action.RENEW),
        ("Subscribe", Action.SUBSCRIBE),
        ("Transfer", Action.UNKNOWN),  # Accelerator enum has it; ours does not
        ("SomethingNew", Action.UNKNOWN),
    ],
)
def test_webhook_actions_known_and_unknown(raw, expected):
    event = WebhookEvent.from_api(webhook_payload(action=raw))
    assert event.action is expected
    assert event.operation.action_name == raw  # Microsoft's spelling kept as text


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("NotStarted", OperationStatus.NOT_STARTED),
        ("InProgress", OperationStatus.IN_PROGRESS),
        ("Succeeded", OperationStatus.SUCCEEDED),
        ("Failed", OperationStatus.FAILED),
        ("Conflict", OperationStatus.CONFLICT),
        ("Success", OperationStatus.UNKNOWN),  # the PATCH word is not an operation status
        ("Paused", OperationStatus.UNKNOWN),
        (None, OperationStatus.UNKNOWN),
    ],
)
def test_operation_status_parsing(raw, expected):
    assert Operation.from_api({"id": OPERATION_ID, "status": raw}).status is expected


def test_update_status_words_differ_from_operation_status():
    assert [member.value for member in UpdateStatus] == ["Success", "Failure"]


@pytest.mark.parametrize("term_unit", ["P1M", "P1Y", "P2Y", "P3Y", "P4Y", "P5Y", "PAY", "P18M", "SomethingElse"])
def test_term_unit_is_open_text(term_unit):
    subscription = Subscription.from_api(subscription_payload(term={"termUnit": term_unit, "startDate": None}))
    assert subscription.term.term_unit == term_unit


def test_term_unit_padding_is_stripped():
    subscription = Subscription.from_api(subscription_payload(term={"termUnit": " P1Y "}))
    assert subscription.term.term_unit == "P1Y"


# --- unknown fields, case-insensitive keys ---------------------------------------------------------


def test_unknown_fields_are_kept_in_raw():
    payload = subscription_payload(sourceOffers=[{"externalId": "x"}], futureField={"nested": [1, 2]})
    payload["term"]["chargeDuration"] = "P1M"
    subscription = Subscription.from_api(payload)
    assert subscription.raw["futureField"] == {"nested": [1, 2]}
    assert subscription.raw["sourceOffers"] == [{"externalId": "x"}]
    assert subscription.term.charge_duration == "P1M"

    event = WebhookEvent.from_api(webhook_payload(newThing="x"))
    assert event.operation.raw["newThing"] == "x"

    plan = Plan.from_api({"planId": "gold", "planComponents": {"meteringDimensions": []}, "isStopSell": True})
    assert plan.raw["isStopSell"] is True
    assert plan.raw["planComponents"] == {"meteringDimensions": []}

    resolved = ResolvedPurchase.from_api({"id": SUBSCRIPTION_ID, "subscription": subscription_payload(), "extra": 1})
    assert resolved.raw["extra"] == 1


def test_raw_is_a_copy_not_the_callers_dict():
    payload = subscription_payload()
    subscription = Subscription.from_api(payload)
    payload["name"] = "changed later"
    assert subscription.raw["name"] == "Contoso Cloud Solution"


def test_case_insensitive_keys_in_webhook():
    event = WebhookEvent.from_api(
        {
            "Id": OPERATION_ID,
            "SubscriptionId": SUBSCRIPTION_ID,
            "ACTION": "Suspend",
            "TimeStamp": "2023-02-10T18:48:58.4449839Z",
            "STATUS": "Succeeded",
            "PlanId": "silver",
            "Quantity": "5",
            "OperationRequestSource": "Azure",
            "Subscription": {"ID": SUBSCRIPTION_ID, "SaasSubscriptionStatus": "Suspended", "PLANID": "silver"},
        }
    )
    assert event.id == OPERATION_ID
    assert event.subscription_id == SUBSCRIPTION_ID
    assert event.action is Action.SUSPEND
    assert event.operation.status is OperationStatus.SUCCEEDED
    assert event.operation.timestamp == datetime(2023, 2, 10, 18, 48, 58, 444983, tzinfo=UTC)
    assert event.operation.plan_id == "silver"
    assert event.operation.quantity == 5
    assert event.operation.request_source == "Azure"
    assert event.subscription is not None
    assert event.subscription.id == SUBSCRIPTION_ID
    assert event.subscription.status is SubscriptionStatus.SUSPENDED
    assert event.subscription.plan_id == "silver"


def test_field_of_prefers_exact_match_then_any_case():
    assert field_of({"id": "exact", "ID": "upper"}, "id") == "exact"
    assert field_of({"ID": "upper"}, "id") == "upper"
    assert field_of({"other": 1}, "id", "default") == "default"
    assert field_of(None, "id", "default") == "default"
    assert field_of("not a mapping", "id") is None


def test_emulator_spelling_of_request_source():
    operation = Operation.from_api({"id": OPERATION_ID, "operationRequestedSource": "Partner"})
    assert operation.request_source == "Partner"


# --- timestamps ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("2023-02-10T18:48:58.4449839Z", datetime(2023, 2, 10, 18, 48, 58, 444983, tzinfo=UTC)),
        ("2023-02-10T18:48:58.4449839z", datetime(2023, 2, 10, 18, 48, 58, 444983, tzinfo=UTC)),
        ("2023-02-10T18:48:58.1Z", datetime(2023, 2, 10, 18, 48, 58, 100000, tzinfo=UTC)),
        ("2023-02-10T18:48:58Z", datetime(2023, 2, 10, 18, 48, 58, tzinfo=UTC)),
        ("2023-02-10T20:48:58.4449839+02:00", datetime(2023, 2, 10, 18, 48, 58, 444983, tzinfo=UTC)),
        ("2023-02-10T18:48:58.4449839", datetime(2023, 2, 10, 18, 48, 58, 444983, tzinfo=UTC)),  # naive = UTC
        ("2023-02-10", datetime(2023, 2, 10, tzinfo=UTC)),
        ("0001-01-01T00:00:00", datetime(1, 1, 1, tzinfo=UTC)),  # lastModified placeholder
        ("", None),
        (None, None),
        ("not a date", None),
        ("2023-13-45T00:00:00Z", None),
        ("0001-01-01T00:00:00+05:00", None),  # out of range in UTC: never an exception
        ("9999-12-31T23:59:59-05:00", None),
        (12345, None),
    ],
)
def test_parse_timestamp(raw, expected):
    parsed = parse_timestamp(raw)
    assert parsed == expected
    if parsed is not None:
        assert parsed.utcoffset().total_seconds() == 0


def test_timestamps_with_seven_fraction_digits_in_payloads():
    subscription = Subscription.from_api(subscription_payload(created="2022-03-01T10:00:00.1234567Z"))
    assert subscription.created == datetime(2022, 3, 1, 10, 0, 0, 123456, tzinfo=UTC)
    operation = WebhookEvent.from_api(webhook_payload(timeStamp="2023-02-10T18:48:58.4449839Z")).operation
    assert operation.timestamp.microsecond == 444983
    assert operation.timestamp.tzinfo is not None


def test_format_timestamp_round_trips():
    moment = datetime(2023, 2, 10, 18, 48, 58, 444983, tzinfo=UTC)
    text = format_timestamp(moment)
    assert text.endswith("Z")
    assert parse_timestamp(text) == moment
    assert format_timestamp(None) == ""


# --- whole objects ----------------------------------------------------------------------------


def test_full_subscription():
    subscription = Subscription.from_api(subscription_payload())
    assert subscription.id == SUBSCRIPTION_ID
    assert subscription.offer_id == "offer1-preview"
    assert subscription.publisher_id == "contoso"
    assert subscription.name == "Contoso Cloud Solution"
    assert subscription.plan_id == "silver"
    assert subscription.quantity == 10
    assert subscription.status is SubscriptionStatus.SUBSCRIBED
    assert subscription.beneficiary.email_id == "test@test.com"
    assert subscription.beneficiary.tenant_id == "tid-1"
    assert subscription.purchaser.object_id == "oid-2"
    assert subscription.purchaser.puid == "p2"
    assert subscription.term.start_date == datetime(2022, 3, 7, tzinfo=UTC)
    assert subscription.term.end_date == datetime(2022, 4, 6, tzinfo=UTC)
    assert subscription.auto_renew is True
    assert subscription.is_free_trial is False
    assert subscription.allowed_customer_operations == ("Delete", "Update", "Read")
    assert subscription.sandbox_type == "None"
    assert subscription.session_mode == "None"


def test_pending_fulfillment_start_without_term_dates():
    payload = subscription_payload(
        saasSubscriptionStatus="PendingFulfillmentStart", term={"termUnit": "P1M", "chargeDuration": None}
    )
    subscription = Subscription.from_api(payload)
    assert subscription.status is SubscriptionStatus.PENDING_FULFILLMENT_START
    assert subscription.term.term_unit == "P1M"
    assert subscription.term.start_date is None
    assert subscription.term.end_date is None

    without_term = subscription_payload(saasSubscriptionStatus="PendingFulfillmentStart")
    del without_term["term"]
    assert Subscription.from_api(without_term).term.start_date is None

    null_term = Subscription.from_api(subscription_payload(term=None))
    assert null_term.term.term_unit == "" and null_term.term.end_date is None

    empty_dates = Subscription.from_api(subscription_payload(term={"termUnit": "P1Y", "startDate": "", "endDate": None}))
    assert empty_dates.term.start_date is None and empty_dates.term.end_date is None


def test_minimal_and_odd_subscriptions_never_fail():
    placeholder = Subscription.from_api(subscription_payload(created="0001-01-01T00:00:00+05:00"))
    assert placeholder.created is None
    bare = Subscription.from_api({"id": SUBSCRIPTION_ID})
    assert bare.status is SubscriptionStatus.UNKNOWN
    assert bare.quantity is None
    assert bare.beneficiary.email_id == ""
    assert bare.allowed_customer_operations == ()
    odd = Subscription.from_api(
        subscription_payload(
            beneficiary=None, purchaser="not an object", allowedCustomerOperations="Read", autoRenew="true", isFreeTrial=None
        )
    )
    assert odd.beneficiary.email_id == ""
    assert odd.purchaser.email_id == ""
    assert odd.allowed_customer_operations == ("Read",)
    assert odd.auto_renew is True
    assert odd.is_free_trial is False


def test_resolved_purchase():
    resolved = ResolvedPurchase.from_api(
        {
            "id": SUBSCRIPTION_ID,
            "subscriptionName": "Contoso Cloud Solution",
            "offerId": "offer1",
            "planId": "silver",
            "quantity": "",
            "subscription": subscription_payload(saasSubscriptionStatus="PendingFulfillmentStart", term={"termUnit": "P1M"}),
        }
    )
    assert resolved.subscription_id == SUBSCRIPTION_ID
    assert resolved.subscription_name == "Contoso Cloud Solution"
    assert resolved.offer_id == "offer1"
    assert resolved.plan_id == "silver"
    assert resolved.quantity is None
    assert resolved.subscription.status is SubscriptionStatus.PENDING_FULFILLMENT_START
    assert resolved.subscription.term.start_date is None


def test_resolved_purchase_ids_fill_each_other():
    inner_only = ResolvedPurchase.from_api({"subscription": {"id": SUBSCRIPTION_ID}})
    assert inner_only.subscription_id == SUBSCRIPTION_ID
    outer_only = ResolvedPurchase.from_api({"id": SUBSCRIPTION_ID, "subscription": {"planId": "silver"}})
    assert outer_only.subscription.id == SUBSCRIPTION_ID
    assert outer_only.subscription.plan_id == "silver"
    no_inner = ResolvedPurchase.from_api({"id": SUBSCRIPTION_ID, "subscription": None})
    assert no_inner.subscription is None


def test_plan():
    plan = Plan.from_api(
        {
            "planId": "gold",
            "displayName": "Gold",
            "isPrivate": "true",
            "isPricePerSeat": True,
            "minQuantity": "5",
            "maxQuantity": None,
        }
    )
    assert plan.plan_id == "gold"
    assert plan.display_name == "Gold"
    assert plan.is_private is True
    assert plan.is_price_per_seat is True
    assert plan.min_quantity == 5
    assert plan.max_quantity is None


def test_operation_error_fields():
    operation = Operation.from_api(
        {
            "id": OPERATION_ID,
            "subscriptionId": SUBSCRIPTION_ID,
            "action": "ChangePlan",
            "status": "Failed",
            "errorStatusCode": 400,
            "errorMessage": "Plan not available",
        }
    )
    assert operation.status is OperationStatus.FAILED
    assert operation.error_status_code == "400"
    assert operation.error_message == "Plan not available"


# --- webhook required fields ---------------------------------------------------------------------


def test_webhook_event_full():
    event = WebhookEvent.from_api(webhook_payload())
    assert event.id == OPERATION_ID
    assert event.subscription_id == SUBSCRIPTION_ID
    assert event.action is Action.CHANGE_QUANTITY
    assert event.operation.quantity == 20
    assert event.operation.status is OperationStatus.IN_PROGRESS
    assert event.subscription.quantity == 10  # Microsoft's snapshot, separate from the operation


@pytest.mark.parametrize(
    "missing",
    [("id",), ("subscriptionId",), ("action",), ("id", "action"), ("id", "subscriptionId", "action")],
)
def test_webhook_event_requires_id_subscription_id_and_action(missing):
    payload = webhook_payload()
    for name in missing:
        del payload[name]
    with pytest.raises(ValueError) as error:
        WebhookEvent.from_api(payload)
    message = str(error.value)
    for name in missing:
        assert name in message
    for name in {"id", "subscriptionId", "action"} - set(missing) - {"id"}:  # "id" is a substring of the others
        assert name not in message


@pytest.mark.parametrize("blank", ["", "   ", None])
def test_webhook_event_blank_required_values_count_as_missing(blank):
    with pytest.raises(ValueError, match="subscriptionId"):
        WebhookEvent.from_api(webhook_payload(subscriptionId=blank))


@pytest.mark.parametrize("body", [None, [], "text", 42])
def test_webhook_event_body_must_be_an_object(body):
    with pytest.raises(ValueError):
        WebhookEvent.from_api(body)


def test_webhook_without_subscription_snapshot():
    payload = webhook_payload()
    del payload["subscription"]
    event = WebhookEvent.from_api(payload)
    assert event.subscription is None
    assert WebhookEvent.from_api(webhook_payload(subscription=None)).subscription is None


@pytest.mark.parametrize(
    ("unit", "words"),
    [
        ("P1M", "1 month"),
        ("P1Y", "1 year"),
        ("p3y", "3 years"),
        ("P2M", "2 months"),
        ("P1W", "1 week"),
        ("P30D", "30 days"),
        ("", ""),
        (None, ""),
        ("P1Y2M", "P1Y2M"),  # a compound duration is shown as Microsoft sent it, not guessed at
        ("monthly", "monthly"),
    ],
)
def test_billing_term_in_words(unit, words):
    assert describe_term(unit) == words


def test_landing_details_show_the_term_in_words_with_dates():
    from shared.web import render_page

    html, _ = render_page(
        "_details.html",
        {
            "subscription_name": "S",
            "offer_id": "o",
            "plan_name": "Basic",
            "plan_id": "basic",
            "quantity": 5,
            "term_unit": "P1M",
            "term_start": datetime(2026, 11, 1, tzinfo=UTC),
            "term_end": datetime(2026, 11, 30, tzinfo=UTC),
            "is_free_trial": False,
            "purchaser": AadIdentifier(email_id="a@b.example"),
            "beneficiary": AadIdentifier(email_id="a@b.example"),
            "is_csp": False,
            "user": None,
        },
    )
    assert "1 month · 2026-11-01 to 2026-11-30" in html
    assert "P1M" not in html


def test_lone_surrogates_from_json_become_replacement_characters():
    """JSON may carry "\\ud800" alone; such a str cannot be encoded as UTF-8 anywhere it goes."""
    import json

    data = json.loads('{"id": "s", "name": "Contoso \\ud800 Ltd", "purchaser": {"emailId": "a\\udfff@b.example"}}')
    subscription = Subscription.from_api(data)
    assert subscription.name == "Contoso \ufffd Ltd"
    assert subscription.purchaser.email_id == "a\ufffd@b.example"
    subscription.name.encode("utf-8")  # would raise UnicodeEncodeError before the fix
    assert clean_text("pair \U0001f600 kept") == "pair \U0001f600 kept"  # a real astral character stays
