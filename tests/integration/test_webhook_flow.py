"""The webhook use case end to end: the marketplace stand-in fires signed webhooks at the dev host
serving ``function_app.app``; the app verifies, answers and applies them against Azurite.

Covered: every action (PATCH observed for the InProgress ones, none for settled ones, Partner
operations included), the publisher policy (refusal = Failure and the state stays; a broken policy
= retry), duplicates (5 times, sequential and concurrent), reordered events, storage outage, a crash
between recording and applying, never-seen subscriptions, unknown actions, malformed, oversized and
leniently spelled bodies, verification mismatches and Marketplace failures.

"Nothing recorded" means: the state row (and its ETag), the history and the outbox are unchanged
and there is no operation marker.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import pytest
import requests
from azure.data.tables import TableServiceClient

import tests.policies as policies
from shared import state_machine as sm
from shared.domain import UpdateStatus, parse_timestamp
from shared.errors import StorageUnavailableError
from shared.events import build_event_document
from shared.repository import StoredRecord
from shared.state_machine import Change, Kind, Source

# --------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def wired(standin, devhost):
    """The stand-in fires its webhooks at the dev host."""
    standin.webhook_url = devhost.url + "/api/webhook"
    return standin


def known_subscription(
    standin, services, *, status: str = "Subscribed", plan_id: str = "standard", quantity: int | None = 5
) -> str:
    """A subscription at Microsoft that the app already recorded (as the landing page or reconciler would)."""
    if status == "PendingFulfillmentStart":
        subscription_id = standin.create_purchase(plan_id=plan_id, quantity=quantity)["subscriptionId"]
    else:
        subscription_id = standin.seed(1, status=status, plan_id=plan_id, quantity=quantity)[0]
    snapshot = services.marketplace.get_subscription(subscription_id)
    change = Change(kind=Kind.SYNC, source=Source.RECONCILE, occurred_at=services.clock(), subscription=snapshot)
    services.repository.apply(subscription_id, lambda record: sm.apply(record, change), build_event=build_event_document)
    assert services.repository.get(subscription_id).record.status.value == status
    return subscription_id


@dataclass(frozen=True)
class Stored:
    state: StoredRecord | None
    history: list
    events: list


def outbox(services, subscription_id: str) -> list[dict]:
    """Every outbox row of the subscription, relayed or not (the app relays them in the background)."""
    table = TableServiceClient.from_connection_string(services.settings.tables_connection_string).get_table_client(
        services.repository.subscriptions_table_name
    )
    with table:
        rows = table.query_entities("PartitionKey eq @pk and Kind eq @kind", parameters={"pk": subscription_id, "kind": "event"})
        return sorted((dict(row) for row in rows), key=lambda row: row["RowKey"])


def stored(services, subscription_id: str) -> Stored:
    repository = services.repository
    events = [(row["RowKey"], row["EventId"]) for row in outbox(services, subscription_id)]
    return Stored(repository.get(subscription_id), repository.history(subscription_id), events)


def assert_nothing_recorded(services, subscription_id: str, operation_id: str, before: Stored) -> None:
    after = stored(services, subscription_id)
    assert after.state == before.state  # same record, same ETag: not even rewritten
    assert after.history == before.history
    assert after.events == before.events
    assert services.repository.get_marker(subscription_id, operation_id) is None


def entries_for(services, subscription_id: str, operation_id: str) -> list[dict]:
    return [entry for entry in services.repository.history(subscription_id) if entry["operationId"] == operation_id]


def event_types(services, subscription_id: str) -> list[str]:
    return [json.loads(row["Body"])["eventType"] for row in outbox(services, subscription_id)]


def record(services, subscription_id: str):
    return services.repository.get(subscription_id).record


def assert_settled_once(services, subscription_id: str, operation_id: str, result: str) -> dict:
    marker = services.repository.get_marker(subscription_id, operation_id)
    assert marker is not None and not marker.pending
    entries = entries_for(services, subscription_id, operation_id)
    assert len(entries) == 1, entries
    assert entries[0]["result"] == result, entries[0]
    assert entries[0]["source"] == "webhook"
    return entries[0]


def post(http, devhost, standin, body: bytes) -> requests.Response:
    headers = {"Authorization": "Bearer " + standin.sign_token(), "Content-Type": "application/json"}
    return http.post(devhost.url + "/api/webhook", data=body, headers=headers, timeout=60)


def payload(standin, operation_id: str) -> dict:
    return standin.webhook_payload(operation_id)


# --------------------------------------------------------------------------------------------------
# every action, end to end


SETTLED_ACTIONS = [
    # action, status before, status after, event
    ("Suspend", "Subscribed", "Suspended", "subscription.suspended"),
    ("Unsubscribe", "Subscribed", "Unsubscribed", "subscription.unsubscribed"),
    ("Unsubscribe", "Suspended", "Unsubscribed", "subscription.unsubscribed"),
    ("Renew", "Subscribed", "Subscribed", "subscription.renewed"),
    ("Subscribe", "PendingFulfillmentStart", "Subscribed", "subscription.activated"),
]


@pytest.mark.parametrize("action, before, after, event", SETTLED_ACTIONS, ids=[f"{a[0]} from {a[1]}" for a in SETTLED_ACTIONS])
def test_settled_actions_are_applied_without_a_patch(action, before, after, event, wired, services):
    subscription_id = known_subscription(wired, services, status=before)
    events_before = event_types(services, subscription_id)

    operation = wired.trigger(subscription_id, action)

    assert wired.webhook_deliveries == [(operation["id"], 200)]
    assert operation["status"] == "Succeeded"
    assert wired.patches == []  # nothing to answer for an operation that already happened
    assert_settled_once(services, subscription_id, operation["id"], "applied")
    current = record(services, subscription_id)
    at_microsoft = wired.get_subscription(subscription_id)
    assert current.status.value == after == at_microsoft["saasSubscriptionStatus"]
    assert event_types(services, subscription_id) == [*events_before, event]
    if action == "Renew":
        assert current.term_start == parse_timestamp(at_microsoft["term"]["startDate"])
        assert current.term_end == parse_timestamp(at_microsoft["term"]["endDate"])
        assert current.term_start > parse_timestamp(operation["timeStamp"]).replace(hour=0, minute=0, second=0, microsecond=0)
    if action == "Unsubscribe":
        assert current.unsubscribed_at is not None
        assert (current.retain_data_until - current.unsubscribed_at).days == sm.DATA_RETENTION_DAYS


IN_PROGRESS_ACTIONS = [
    ("ChangePlan", {"plan_id": "premium"}, "Subscribed", "subscription.plan_changed"),
    ("ChangeQuantity", {"quantity": 9}, "Subscribed", "subscription.quantity_changed"),
    ("Reinstate", {}, "Suspended", "subscription.reinstated"),
]


@pytest.mark.parametrize("action, args, before, event", IN_PROGRESS_ACTIONS, ids=[a[0] for a in IN_PROGRESS_ACTIONS])
def test_in_progress_actions_are_answered_with_success_and_applied(action, args, before, event, wired, services):
    subscription_id = known_subscription(wired, services, status=before)

    operation = wired.trigger(subscription_id, action, **args)

    assert wired.webhook_deliveries == [(operation["id"], 200)]
    assert [(p["operationId"], p["status"], p["responseStatus"]) for p in wired.patches] == [(operation["id"], "Success", 200)]
    assert wired.get_operation(operation["id"])["status"] == "Succeeded"
    assert_settled_once(services, subscription_id, operation["id"], "applied")
    current, at_microsoft = record(services, subscription_id), wired.get_subscription(subscription_id)
    assert current.status.value == at_microsoft["saasSubscriptionStatus"] == "Subscribed"
    assert current.plan_id == at_microsoft["planId"] == args.get("plan_id", "standard")
    assert current.quantity == at_microsoft["quantity"] == args.get("quantity", 5)
    assert event_types(services, subscription_id)[-1] == event


def test_partner_operation_is_applied_without_a_patch(wired, services):
    """Our own change (PATCH subscription) comes back as a Succeeded webhook with source Partner."""
    subscription_id = known_subscription(wired, services)

    operation_id = services.marketplace.change_quantity(subscription_id, 12)
    deliveries = wired.wait_for_deliveries(1, timeout=15)

    assert deliveries == [(operation_id, 200)]
    assert wired.get_operation(operation_id)["operationRequestSource"] == "Partner"
    assert payload(wired, operation_id)["status"] == "Succeeded"
    assert wired.patches == []
    assert_settled_once(services, subscription_id, operation_id, "applied")
    assert record(services, subscription_id).quantity == 12


def test_operation_settled_before_delivery_is_applied_without_a_patch(wired, services):
    """Microsoft auto-accepted the change before the webhook was handled: follow Get Operation."""
    subscription_id = known_subscription(wired, services)
    wired.auto_accept_seconds = 0.05
    operation = wired.trigger(subscription_id, "ChangePlan", plan_id="premium", deliver=False)
    deadline = time.monotonic() + 10
    while wired.get_operation(operation["id"])["status"] != "Succeeded":
        assert time.monotonic() < deadline, "the stand-in did not auto-accept"
        time.sleep(0.02)
    assert payload(wired, operation["id"])["status"] == "InProgress"  # the webhook still says InProgress

    assert wired.deliver(operation["id"]) == [200]

    assert wired.patches == []
    assert_settled_once(services, subscription_id, operation["id"], "applied")
    assert record(services, subscription_id).plan_id == "premium"


def test_operation_that_failed_at_microsoft_changes_nothing(wired, services):
    subscription_id = known_subscription(wired, services)
    operation = wired.trigger(subscription_id, "ChangeQuantity", quantity=20, deliver=False)
    services.marketplace.update_operation(subscription_id, operation["id"], UpdateStatus.FAILURE)
    patches = len(wired.patches)
    before = record(services, subscription_id)

    assert wired.deliver(operation["id"]) == [200]

    assert len(wired.patches) == patches  # no second answer
    entry = assert_settled_once(services, subscription_id, operation["id"], "recorded")
    assert entry["kind"] == "refused"
    assert record(services, subscription_id).quantity == before.quantity == 5
    assert record(services, subscription_id).flags == before.flags  # Microsoft's own failure: nothing for a person


# --------------------------------------------------------------------------------------------------
# publisher policy


def test_policy_refusal_patches_failure_and_the_state_stays(wired, make_services, devhost):
    services = make_services(PUBLISHER_POLICY="tests.policies:refuse_small_quantity")
    subscription_id = known_subscription(wired, services)
    policies.seen.clear()
    events_before = event_types(services, subscription_id)

    refused = wired.trigger(subscription_id, "ChangeQuantity", quantity=2)

    assert wired.webhook_deliveries == [(refused["id"], 200)]
    assert [(p["operationId"], p["status"]) for p in wired.patches] == [(refused["id"], "Failure")]
    assert wired.get_operation(refused["id"])["status"] == "Failed"
    assert wired.get_subscription(subscription_id)["quantity"] == 5
    entry = assert_settled_once(services, subscription_id, refused["id"], "recorded")
    assert entry["kind"] == "refused" and "3 seats" in entry["detail"]
    assert record(services, subscription_id).quantity == 5
    assert "change_refused" in record(services, subscription_id).flags  # on the console's Needs attention
    assert event_types(services, subscription_id) == events_before  # nothing to tell the SaaS app
    asked = policies.seen[-1]
    assert (asked.action, asked.subscription_id, asked.quantity, asked.operation_id) == (
        "ChangeQuantity",
        subscription_id,
        2,
        refused["id"],
    )
    assert asked.record is not None and asked.record.quantity == 5

    accepted = wired.trigger(subscription_id, "ChangeQuantity", quantity=4)

    assert wired.patches[-1]["operationId"] == accepted["id"] and wired.patches[-1]["status"] == "Success"
    assert record(services, subscription_id).quantity == wired.get_subscription(subscription_id)["quantity"] == 4


def test_policy_refusing_reinstate_keeps_the_subscription_suspended(wired, make_services, devhost):
    services = make_services(PUBLISHER_POLICY="tests.policies:refuse_reinstate")
    subscription_id = known_subscription(wired, services, status="Suspended")

    operation = wired.trigger(subscription_id, "Reinstate")

    assert [(p["operationId"], p["status"]) for p in wired.patches] == [(operation["id"], "Failure")]
    assert wired.get_subscription(subscription_id)["saasSubscriptionStatus"] == "Suspended"
    assert record(services, subscription_id).status.value == "Suspended"
    assert assert_settled_once(services, subscription_id, operation["id"], "recorded")["kind"] == "refused"


def test_a_change_the_state_machine_refuses_is_answered_failure_before_anything_else(wired, services, devhost):
    """Found by a probe: an InProgress Reinstate on a subscription we hold as Unsubscribed was answered
    Success (Microsoft then showed Subscribed) and only afterwards refused by the state machine."""
    subscription_id = known_subscription(wired, services, status="Suspended")
    unsubscribe = Change(kind=Kind.UNSUBSCRIBE, source=Source.OPERATOR, occurred_at=services.clock())
    services.repository.apply(subscription_id, lambda current: sm.apply(current, unsubscribe), build_event=build_event_document)
    assert record(services, subscription_id).status.value == "Unsubscribed"  # ours; Microsoft still says Suspended

    operation = wired.trigger(subscription_id, "Reinstate")

    assert [(p["operationId"], p["status"]) for p in wired.patches] == [(operation["id"], "Failure")]
    assert wired.get_subscription(subscription_id)["saasSubscriptionStatus"] == "Suspended"  # not Subscribed
    assert record(services, subscription_id).status.value == "Unsubscribed"
    assert assert_settled_once(services, subscription_id, operation["id"], "recorded")["kind"] == "refused"


def test_broken_policy_is_retried_not_guessed(wired, make_services, devhost):
    """A policy that raises must neither accept nor reject: 5xx, no PATCH, the next delivery decides."""
    services = make_services(PUBLISHER_POLICY="tests.policies:broken")
    subscription_id = known_subscription(wired, services)
    before = stored(services, subscription_id)

    operation = wired.trigger(subscription_id, "ChangeQuantity", quantity=7)

    assert len(wired.webhook_deliveries) == 1 and wired.webhook_deliveries[0][1] >= 500
    assert wired.patches == []
    assert wired.get_operation(operation["id"])["status"] == "InProgress"
    after = stored(services, subscription_id)
    assert (after.state, after.history, after.events) == (before.state, before.history, before.events)
    marker = services.repository.get_marker(subscription_id, operation["id"])
    assert marker is not None and marker.pending  # recorded, to be finished by a redelivery

    # The policy is fixed (same storage, default policy): the redelivery finishes the job once.
    make_services(TABLES_PREFIX=services.settings.tables_prefix)
    assert wired.deliver(operation["id"]) == [200]
    assert [p["status"] for p in wired.patches] == ["Success"]
    assert_settled_once(services, subscription_id, operation["id"], "applied")
    assert record(services, subscription_id).quantity == 7


# --------------------------------------------------------------------------------------------------
# exactly once


@pytest.mark.parametrize("action, args", [("Suspend", {}), ("ChangeQuantity", {"quantity": 9})])
def test_same_event_five_times_is_applied_once(action, args, wired, services):
    subscription_id = known_subscription(wired, services)
    operation = wired.trigger(subscription_id, action, deliver=False, **args)

    assert wired.deliver(operation["id"], times=5) == [200] * 5

    assert_settled_once(services, subscription_id, operation["id"], "applied")
    assert len(event_types(services, subscription_id)) == 2  # the setup's activation + this change
    if action == "ChangeQuantity":
        assert [p["status"] for p in wired.patches] == ["Success"]
        assert record(services, subscription_id).quantity == 9
    else:
        assert wired.patches == []
        assert record(services, subscription_id).status.value == "Suspended"


@pytest.mark.parametrize("action, args", [("Suspend", {}), ("ChangeQuantity", {"quantity": 9})])
def test_same_event_five_times_concurrently_is_applied_once(action, args, wired, services):
    subscription_id = known_subscription(wired, services)
    operation = wired.trigger(subscription_id, action, deliver=False, **args)

    assert wired.deliver_many([operation["id"]] * 5, concurrency=5) == [200] * 5

    assert_settled_once(services, subscription_id, operation["id"], "applied")
    assert len(event_types(services, subscription_id)) == 2
    # Concurrent deliveries may race to answer, but Microsoft accepted exactly one answer, a Success.
    assert {p["status"] for p in wired.patches} <= {"Success"}
    assert sum(p["responseStatus"] == 200 for p in wired.patches) == (1 if action == "ChangeQuantity" else 0)


def test_concurrent_first_deliveries_for_a_never_seen_subscription_record_it_once(wired, services):
    subscription_id = wired.seed(1, plan_id="standard", quantity=5)[0]
    operation = wired.trigger(subscription_id, "Suspend", deliver=False)

    assert wired.deliver_many([operation["id"]] * 5, concurrency=5) == [200] * 5

    history = services.repository.history(subscription_id)
    assert [entry["kind"] for entry in history].count("sync") == 1
    assert len(entries_for(services, subscription_id, operation["id"])) == 1
    assert record(services, subscription_id).status.value == "Suspended"


def test_crash_between_recording_and_applying_is_finished_by_the_next_delivery(wired, services, monkeypatch):
    subscription_id = known_subscription(wired, services)
    before = stored(services, subscription_id)
    operation = wired.trigger(subscription_id, "ChangeQuantity", quantity=6, deliver=False)
    real_apply = services.repository.apply

    def crash(*args, **kwargs):
        raise StorageUnavailableError("injected: storage went away after the marker was written")

    monkeypatch.setattr(services.repository, "apply", crash)
    assert wired.deliver(operation["id"])[0] >= 500
    after = stored(services, subscription_id)
    assert (after.state, after.history, after.events) == (before.state, before.history, before.events)
    marker = services.repository.get_marker(subscription_id, operation["id"])
    assert marker is not None and marker.pending

    monkeypatch.setattr(services.repository, "apply", real_apply)
    assert wired.deliver(operation["id"]) == [200]

    assert_settled_once(services, subscription_id, operation["id"], "applied")
    assert record(services, subscription_id).quantity == 6 == wired.get_subscription(subscription_id)["quantity"]
    assert sum(p["responseStatus"] == 200 for p in wired.patches) == 1
    assert wired.deliver(operation["id"]) == [200]  # and later duplicates change nothing
    assert len(services.repository.history(subscription_id)) == len(after.history) + 1


# --------------------------------------------------------------------------------------------------
# ordering


def test_suspend_delivered_after_a_later_reinstate_never_regresses(wired, services):
    subscription_id = known_subscription(wired, services)
    suspend = wired.trigger(subscription_id, "Suspend", deliver=False)
    reinstate = wired.trigger(subscription_id, "Reinstate", deliver=False)
    assert parse_timestamp(suspend["timeStamp"]) < parse_timestamp(reinstate["timeStamp"])

    assert wired.deliver(reinstate["id"]) == [200]
    assert wired.deliver(suspend["id"]) == [200]

    assert wired.get_subscription(subscription_id)["saasSubscriptionStatus"] == "Subscribed"
    assert record(services, subscription_id).status.value == "Subscribed"
    assert assert_settled_once(services, subscription_id, suspend["id"], "stale")["kind"] == "suspend"
    assert "subscription.suspended" not in event_types(services, subscription_id)


def test_older_event_after_a_later_applied_one_lands_in_history_as_stale(wired, services):
    subscription_id = known_subscription(wired, services)
    suspend = wired.trigger(subscription_id, "Suspend", deliver=False)
    unsubscribe = wired.trigger(subscription_id, "Unsubscribe", deliver=False)

    assert wired.deliver(unsubscribe["id"]) == [200]
    assert wired.deliver(suspend["id"]) == [200]

    assert record(services, subscription_id).status.value == "Unsubscribed"
    assert_settled_once(services, subscription_id, unsubscribe["id"], "applied")
    assert assert_settled_once(services, subscription_id, suspend["id"], "stale")["toStatus"] == "Unsubscribed"
    assert event_types(services, subscription_id)[-1] == "subscription.unsubscribed"


# --------------------------------------------------------------------------------------------------
# transient failures: 5xx, nothing half-written, a redelivery succeeds


def test_storage_down_is_5xx_and_a_later_redelivery_succeeds(wired, services, azurite):
    subscription_id = known_subscription(wired, services)
    before = stored(services, subscription_id)
    operation = wired.trigger(subscription_id, "ChangeQuantity", quantity=8, deliver=False)

    with azurite.outage():
        statuses = wired.deliver(operation["id"])

    assert statuses[0] is not None and 500 <= statuses[0] < 600
    assert wired.patches == []  # Microsoft was not answered either
    assert wired.get_operation(operation["id"])["status"] == "InProgress"
    assert_nothing_recorded(services, subscription_id, operation["id"], before)

    assert wired.deliver(operation["id"]) == [200]
    assert_settled_once(services, subscription_id, operation["id"], "applied")
    assert record(services, subscription_id).quantity == 8
    assert [p["status"] for p in wired.patches] == ["Success"]


def test_marketplace_503_on_get_operation_is_5xx_and_nothing_recorded(wired, services):
    subscription_id = known_subscription(wired, services)
    before = stored(services, subscription_id)
    operation = wired.trigger(subscription_id, "ChangeQuantity", quantity=8, deliver=False)
    wired.fail_next(50, status=503, path_contains=f"/operations/{operation['id']}")

    statuses = wired.deliver(operation["id"])

    assert statuses[0] is not None and 500 <= statuses[0] < 600
    assert wired.calls["get_operation"] >= 1
    assert wired.patches == []
    assert wired.get_operation(operation["id"])["status"] == "InProgress"  # a 4xx would have rejected it
    assert_nothing_recorded(services, subscription_id, operation["id"], before)

    wired.clear_faults()
    assert wired.deliver(operation["id"]) == [200]
    assert_settled_once(services, subscription_id, operation["id"], "applied")
    assert record(services, subscription_id).quantity == 8


def test_marketplace_503_on_get_subscription_for_a_never_seen_subscription_is_5xx(wired, services):
    subscription_id = wired.seed(1, plan_id="standard", quantity=5)[0]
    operation = wired.trigger(subscription_id, "Suspend", deliver=False)
    wired.fail_next(50, status=503, path_contains=f"/saas/subscriptions/{subscription_id}?")

    statuses = wired.deliver(operation["id"])

    assert statuses[0] is not None and 500 <= statuses[0] < 600
    assert services.repository.get(subscription_id) is None
    assert services.repository.history(subscription_id) == []
    marker = services.repository.get_marker(subscription_id, operation["id"])
    assert marker is not None and marker.pending  # recorded, not applied: the redelivery finishes it

    wired.clear_faults()
    assert wired.deliver(operation["id"]) == [200]
    assert record(services, subscription_id).status.value == "Suspended"
    assert len(entries_for(services, subscription_id, operation["id"])) == 1


# --------------------------------------------------------------------------------------------------
# never-seen subscriptions and unknown actions


def test_webhook_for_a_never_seen_subscription_fetches_and_records_it(wired, services):
    subscription_id = wired.seed(1, plan_id="premium", quantity=25)[0]

    operation = wired.trigger(subscription_id, "Suspend")

    assert wired.webhook_deliveries == [(operation["id"], 200)]
    assert wired.calls["get"] == 1  # Get Subscription
    at_microsoft = wired.get_subscription(subscription_id)
    current = record(services, subscription_id)
    assert current.status.value == at_microsoft["saasSubscriptionStatus"] == "Suspended"
    assert (current.offer_id, current.plan_id, current.quantity, current.name) == (
        at_microsoft["offerId"],
        "premium",
        25,
        at_microsoft["name"],
    )
    assert current.purchaser.email_id == at_microsoft["purchaser"]["emailId"]
    first = services.repository.history(subscription_id)[0]
    assert first["kind"] == "sync" and "first seen" in first["detail"]
    marker = services.repository.get_marker(subscription_id, operation["id"])
    assert marker is not None and not marker.pending
    assert len(entries_for(services, subscription_id, operation["id"])) == 1


def test_in_progress_change_for_a_never_seen_subscription_is_answered_and_applied(wired, services):
    subscription_id = wired.seed(1, plan_id="standard", quantity=5)[0]

    operation = wired.trigger(subscription_id, "ChangeQuantity", quantity=11)

    assert wired.webhook_deliveries == [(operation["id"], 200)]
    assert [(p["operationId"], p["status"]) for p in wired.patches] == [(operation["id"], "Success")]
    assert record(services, subscription_id).quantity == wired.get_subscription(subscription_id)["quantity"] == 11
    assert_settled_once(services, subscription_id, operation["id"], "applied")


def test_unknown_action_is_recorded_and_answered_200(wired, services):
    subscription_id = known_subscription(wired, services)
    before = record(services, subscription_id)
    events_before = event_types(services, subscription_id)

    operation = wired.trigger(subscription_id, "Transfer")

    assert wired.webhook_deliveries == [(operation["id"], 200)]
    entry = assert_settled_once(services, subscription_id, operation["id"], "recorded")
    assert entry["kind"] == "unknown_action" and "Transfer" in entry["detail"]
    current = record(services, subscription_id)
    assert (current.status, current.plan_id, current.quantity) == (before.status, before.plan_id, before.quantity)
    assert wired.patches == []
    assert event_types(services, subscription_id) == events_before


# --------------------------------------------------------------------------------------------------
# bodies: malformed, oversized, lenient


def _without(data: dict, name: str) -> dict:
    return {key: value for key, value in data.items() if key != name}


MALFORMED = {
    "not json": lambda p: b"{not json",
    "empty body": lambda p: b"",
    "json array": lambda p: json.dumps([p]).encode(),
    "json string": lambda p: json.dumps("Suspend").encode(),
    "not utf-8": lambda p: json.dumps(p).encode().replace(b'"Suspend"', b'"Susp\xff\xfeend"'),
    "missing id": lambda p: json.dumps(_without(p, "id")).encode(),
    "missing subscriptionId": lambda p: json.dumps(_without(p, "subscriptionId")).encode(),
    "missing action": lambda p: json.dumps(_without(p, "action")).encode(),
    "blank action": lambda p: json.dumps({**p, "action": "  "}).encode(),
    "null subscriptionId": lambda p: json.dumps({**p, "subscriptionId": None}).encode(),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_body_is_400_and_nothing_recorded(case, standin, services, devhost, http):
    subscription_id = known_subscription(standin, services)
    operation = standin.trigger(subscription_id, "Suspend", deliver=False)
    before = stored(services, subscription_id)
    calls = standin.calls["get_operation"]

    response = post(http, devhost, standin, MALFORMED[case](payload(standin, operation["id"])))

    assert response.status_code == 400, response.text
    assert response.json()["error"] == "bad_request"
    assert_nothing_recorded(services, subscription_id, operation["id"], before)
    assert standin.calls["get_operation"] == calls


def test_oversized_body_is_413_and_nothing_recorded(standin, make_services, devhost, http):
    services = make_services(WEBHOOK_MAX_BODY_BYTES="4096")
    subscription_id = known_subscription(standin, services)
    operation = standin.trigger(subscription_id, "Suspend", deliver=False)
    before = stored(services, subscription_id)
    body = payload(standin, operation["id"])
    oversized = json.dumps({**body, "padding": "x" * 5000}).encode()
    assert len(json.dumps(body)) < 4096 < len(oversized)

    response = post(http, devhost, standin, oversized)

    assert response.status_code == 413, response.text
    assert_nothing_recorded(services, subscription_id, operation["id"], before)

    just_fits = json.dumps({**body, "padding": "x" * (4096 - len(json.dumps(body)) - 20)}).encode()
    assert len(just_fits) <= 4096
    assert post(http, devhost, standin, just_fits).status_code == 200
    assert record(services, subscription_id).status.value == "Suspended"


def test_field_names_in_any_case_are_accepted(standin, services, devhost, http):
    subscription_id = known_subscription(standin, services)
    operation = standin.trigger(subscription_id, "ChangeQuantity", quantity=15, deliver=False)
    shouted = {
        key.upper() if key in ("id", "action") else key[0].upper() + key[1:]: value
        for key, value in payload(standin, operation["id"]).items()
    }
    shouted["QUANTITY"] = str(shouted.pop("Quantity"))  # quantity as a string, as Microsoft sometimes sends it
    assert "id" not in shouted and "subscriptionId" not in shouted and "ID" in shouted

    response = post(http, devhost, standin, json.dumps(shouted).encode())

    assert response.status_code == 200, response.text
    assert response.json()["operationId"] == operation["id"]
    assert_settled_once(services, subscription_id, operation["id"], "applied")
    assert record(services, subscription_id).quantity == 15


# --------------------------------------------------------------------------------------------------
# verification with Get Operation


def test_event_that_does_not_match_its_operation_is_refused(standin, services, devhost, http):
    subscription_id = known_subscription(standin, services)
    other_id = known_subscription(standin, services)
    operation = standin.trigger(subscription_id, "Suspend", deliver=False)
    genuine = payload(standin, operation["id"])
    forged = {
        "other action": {**genuine, "action": "Unsubscribe"},
        "other subscription": {**genuine, "subscriptionId": other_id},
        "unknown operation": {**genuine, "id": str(uuid.uuid4())},
    }
    before = {sid: stored(services, sid) for sid in (subscription_id, other_id)}

    for name, body in forged.items():
        response = post(http, devhost, standin, json.dumps(body).encode())
        assert response.status_code == 400, (name, response.text)
        assert response.json()["error"] == "verification_failed", name
        for sid in (subscription_id, other_id):
            assert_nothing_recorded(services, sid, body["id"], before[sid])

    assert standin.get_subscription(subscription_id)["saasSubscriptionStatus"] == "Suspended"
    assert record(services, subscription_id).status.value == "Subscribed"  # the forged Unsubscribe did nothing
    assert record(services, other_id).status.value == "Subscribed"
    assert post(http, devhost, standin, json.dumps(genuine).encode()).status_code == 200  # the genuine one passes
    assert record(services, subscription_id).status.value == "Suspended"


def test_verification_can_be_switched_off(standin, make_services, devhost, http):
    services = make_services(WEBHOOK_VERIFY_OPERATION="false")
    subscription_id = known_subscription(standin, services)
    operation = standin.trigger(subscription_id, "Suspend", deliver=False)

    response = post(http, devhost, standin, json.dumps(payload(standin, operation["id"])).encode())

    assert response.status_code == 200, response.text
    assert standin.calls["get_operation"] == 0
    assert record(services, subscription_id).status.value == "Suspended"
