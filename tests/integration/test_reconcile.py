"""Reconciliation against Azurite and the marketplace stand-in (real HTTP, real Table Storage).

Time: the reconciler leaves alone anything changed locally within SETTLE_WINDOW (2 minutes) of a
listing, an activation younger than CLAIM_TIMEOUT, and a webhook marker younger than
RECONCILE_OPERATION_DEADLINE_SECONDS. Tests that need "older" local state move
the services' clock (``services.clock``, the app's own injection point) instead of sleeping: the
initial sync happens "10 minutes ago", the run under test now.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import timedelta

import pytest
import requests

from shared import state_machine as sm
from shared.activation import ActivationResult, activate, request_operator_activation
from shared.domain import Operation, WebhookEvent, parse_timestamp, utc_now
from shared.reconcile import (
    FLAG_ACTIVATION_STUCK,
    FLAG_AWAITING_OPERATOR,
    FLAG_MARKETPLACE_CONFLICT,
    MAX_FLAGS_KEPT,
    RunSummary,
    run_reconciliation,
)
from shared.state_machine import Change, Kind, LocalStatus, Source
from shared.webhook import apply_operation

pytestmark = pytest.mark.azurite

API_KINDS = {
    "resolve",
    "list",
    "get",
    "update",
    "delete",
    "activate",
    "list_plans",
    "list_operations",
    "get_operation",
    "patch_operation",
}


class Clock:
    """utc_now() shifted by ``offset`` (the app reads time only through services.clock)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def at(self, minutes: float) -> Clock:
        self.offset = timedelta(minutes=minutes)
        return self

    def advance(self, seconds: float) -> Clock:
        self.offset += timedelta(seconds=seconds)
        return self

    def __call__(self):
        return utc_now() + self.offset


def with_clock(services) -> Clock:
    clock = Clock()
    services.clock = clock
    return clock


def initial_sync(services, clock: Clock, minutes_ago: float = 10):
    """Record everything Microsoft has, as if it happened ``minutes_ago``; the clock is back at now after."""
    clock.at(-minutes_ago)
    summary = run_reconciliation(services)
    assert summary.completed, summary.stopped_reason
    clock.at(0)
    return summary


def api_calls(standin) -> dict[str, int]:
    return {kind: count for kind, count in standin.calls.items() if kind in API_KINDS}


def calls_since(standin, before: dict[str, int]) -> dict[str, int]:
    now = api_calls(standin)
    return {kind: now[kind] - before.get(kind, 0) for kind in now if now[kind] - before.get(kind, 0)}


def stored_state(services) -> dict[str, tuple]:
    """Every state row with its ETag and history length: equal snapshots mean nothing was written."""
    state = {}
    for record in services.repository.list_records():
        stored = services.repository.get(record.id)
        state[record.id] = (stored.etag, stored.record, len(services.repository.history(record.id)))
    return state


def record_of(services, subscription_id: str) -> sm.SubscriptionRecord:
    stored = services.repository.get(subscription_id)
    assert stored is not None, f"{subscription_id} is not recorded"
    return stored.record


def assert_matches_microsoft(services, standin, subscription_id: str) -> sm.SubscriptionRecord:
    record = record_of(services, subscription_id)
    theirs = standin.get_subscription(subscription_id)
    assert record.marketplace_status == theirs["saasSubscriptionStatus"]
    if theirs["saasSubscriptionStatus"] != "PendingFulfillmentStart":
        assert record.status.value == theirs["saasSubscriptionStatus"]
    assert record.offer_id == theirs["offerId"]
    assert record.plan_id == theirs["planId"]
    assert record.quantity == theirs.get("quantity")
    assert record.name == theirs["name"]
    assert record.term_start == parse_timestamp(theirs["term"].get("startDate"))
    assert record.term_end == parse_timestamp(theirs["term"].get("endDate"))
    assert record.purchaser.object_id == theirs["purchaser"]["objectId"]
    return record


def webhook_parts(standin, operation_id: str) -> tuple[WebhookEvent, Operation]:
    """What the webhook handler would have after verification: the event and Microsoft's operation."""
    event = WebhookEvent.from_api(standin.webhook_payload(operation_id))
    return event, Operation.from_api(standin.get_operation(operation_id))


def record_unapplied(services, standin, operation_id: str) -> None:
    """A webhook that was recorded (step 4) but never applied: a crash or an outage right after."""
    payload = standin.webhook_payload(operation_id)
    created, _ = services.repository.record_operation(
        payload["subscriptionId"],
        operation_id,
        action=payload["action"],
        payload=json.dumps(payload),
        correlation_id="test",
    )
    assert created


# --------------------------------------------------------------------------------------------- drift


def test_each_kind_of_drift_is_found_and_repaired_and_a_second_run_writes_only_its_summary(standin, services):
    clock = with_clock(services)
    b, d, e, f, g = standin.seed(5, plan_id="standard", quantity=5)
    (c,) = standin.seed(1, status="Suspended", plan_id="standard", quantity=5)
    (h,) = standin.seed(1, plan_id="standard", quantity=5)  # stays in step
    initial_sync(services, clock)
    assert {r.id for r in services.repository.list_records()} == {b, c, d, e, f, g, h}

    (a,) = standin.seed(1, plan_id="basic")  # a subscription we never recorded
    standin.trigger(b, "Suspend", deliver=False)  # missed Suspend
    standin.set_subscription(c, status="Subscribed")  # missed Reinstate
    standin.trigger(d, "Unsubscribe", deliver=False)  # missed Unsubscribe
    standin.set_subscription(e, plan_id="premium")  # plan drift
    standin.set_subscription(f, quantity=12)  # quantity drift
    old_end = record_of(services, g).term_end
    standin.trigger(g, "Renew", deliver=False)  # term dates after renewal

    calls_before = api_calls(standin)
    summary = run_reconciliation(services)

    assert summary.completed and not summary.stopped_reason
    assert summary.repairs == {"recorded_new": 1, "status_drift": 3, "detail_drift": 3}
    found = {d_["subscriptionId"]: d_["kind"] for d_ in summary.differences}
    assert found == {
        a: "missing_locally",
        b: "status_drift",
        c: "status_drift",
        d: "status_drift",
        e: "detail_drift",
        f: "detail_drift",
        g: "detail_drift",
    }
    assert summary.subscriptions_seen == 8 and summary.flagged == [] and summary.deferred == 0

    for sid in (a, b, c, d, e, f, g, h):
        assert_matches_microsoft(services, standin, sid)
    assert record_of(services, b).status is LocalStatus.SUSPENDED
    assert record_of(services, c).status is LocalStatus.SUBSCRIBED
    unsubscribed = record_of(services, d)
    assert unsubscribed.status is LocalStatus.UNSUBSCRIBED and unsubscribed.unsubscribed_at is not None
    assert unsubscribed.retain_data_until == unsubscribed.unsubscribed_at + timedelta(days=sm.DATA_RETENTION_DAYS)
    assert record_of(services, e).plan_id == "premium"
    assert record_of(services, f).quantity == 12
    assert record_of(services, g).term_end > old_end
    for sid, kind in ((b, "status_drift"), (e, "detail_drift"), (g, "detail_drift")):
        last = services.repository.history(sid)[-1]
        assert (last["source"], last["kind"], last["result"], last["detail"]) == ("reconcile", "sync", "applied", kind)
    assert len(services.repository.history(h)) == 1  # the in-step one was not touched

    # The summary counts what really happened.
    calls = calls_since(standin, calls_before)
    assert summary.marketplace_calls == sum(calls.values())
    assert calls.get("list") == summary.pages == 1
    assert calls.get("list_operations") == 1  # outstanding operations are looked up for Suspended ones only (b)
    assert summary.storage_writes == sum(summary.repairs.values()) + 1  # one transaction per repair + the summary
    assert summary.storage_reads == 2 + sum(summary.repairs.values())  # checkpoint + one scan page + one read per repair
    stored = services.repository.latest_runs(1)[0]
    assert stored["run_id"] == summary.run_id and stored["repairs"] == summary.repairs and stored["completed"]

    # A second run right after: nothing to repair, nothing written but its summary.
    before = stored_state(services)
    again = run_reconciliation(services)
    assert again.completed and again.repairs == {} and again.differences == [] and again.flagged == []
    assert again.storage_writes == 1 and again.storage_reads == 2
    assert stored_state(services) == before
    assert [run["run_id"] for run in services.repository.latest_runs(2)] == [again.run_id, summary.run_id]


def test_dry_run_changes_nothing(standin, make_services):
    services = make_services(RECONCILE_OPERATION_DEADLINE_SECONDS="1")
    clock = with_clock(services)
    x, y, z = standin.seed(3, plan_id="standard", quantity=5)
    initial_sync(services, clock)
    (new,) = standin.seed(1)
    standin.trigger(x, "Suspend", deliver=False)
    standin.set_subscription(y, quantity=9)
    operation = standin.trigger(z, "ChangeQuantity", quantity=7, deliver=False)
    record_unapplied(services, standin, operation["id"])
    clock.advance(seconds=2)  # past RECONCILE_OPERATION_DEADLINE_SECONDS (no waiting: the clock moves)

    before = stored_state(services)
    runs_before = services.repository.latest_runs(50)
    writes_before = services.repository.metrics.writes
    microsoft_before = {sid: standin.get_subscription(sid) for sid in (x, y, z, new)}

    dry = run_reconciliation(services, dry_run=True)

    assert dry.dry_run and dry.completed
    assert dry.repairs == {"recorded_new": 1, "status_drift": 1, "detail_drift": 1, "operation_replayed": 1}
    kinds = {(d["subscriptionId"], d["kind"]) for d in dry.differences}
    assert kinds == {(new, "missing_locally"), (x, "status_drift"), (y, "detail_drift"), (z, "unapplied_operation")}
    assert dry.storage_writes == 0 and services.repository.metrics.writes == writes_before
    assert stored_state(services) == before
    assert services.repository.get(new) is None
    assert services.repository.get_marker(z, operation["id"]).pending
    assert services.repository.latest_runs(50) == runs_before  # no summary stored either
    assert standin.get_operation(operation["id"])["status"] == "InProgress" and standin.patches == []
    assert {sid: standin.get_subscription(sid) for sid in (x, y, z, new)} == microsoft_before

    real = run_reconciliation(services)
    assert real.completed and real.repairs == dry.repairs  # the dry run predicted exactly what a run does
    for sid in (x, y, z, new):
        assert_matches_microsoft(services, standin, sid)
    assert record_of(services, z).quantity == 7


# ------------------------------------------------------------------------------------- stuck work


def test_unconfirmed_activation_is_retried_up_to_the_limit_then_flagged(standin, make_services):
    services = make_services(RECONCILE_ACTIVATION_RETRY_LIMIT="2")
    clock = with_clock(services)
    standin.activation_delay_seconds = 3600  # Microsoft accepts Activate but stays PendingFulfillmentStart
    sid = standin.create_purchase(plan_id="basic")["subscriptionId"]
    initial_sync(services, clock, minutes_ago=60)
    clock.at(-50)
    assert activate(services, sid, actor="buyer", source=Source.LANDING_PAGE).result is ActivationResult.REQUESTED
    assert standin.activation_count(sid) == 1 and record_of(services, sid).status is LocalStatus.ACTIVATION_REQUESTED

    clock.at(-49)  # within CLAIM_TIMEOUT of the buyer's attempt: Microsoft needs a moment
    summary = run_reconciliation(services)
    assert summary.repairs == {} and summary.flagged == [] and standin.activation_count(sid) == 1

    for minutes, expected_calls in ((-40, 2), (-30, 3)):  # two re-sends (RECONCILE_ACTIVATION_RETRY_LIMIT=2)
        clock.at(minutes)
        summary = run_reconciliation(services)
        assert summary.repairs == {"activation_retried": 1} and summary.flagged == []
        assert standin.activation_count(sid) == expected_calls
        assert record_of(services, sid).activation_attempts == expected_calls

    clock.at(-20)
    summary = run_reconciliation(services)
    assert summary.repairs == {}
    assert summary.flagged == [{"subscriptionId": sid, "reason": FLAG_ACTIVATION_STUCK}]
    assert summary.storage_writes == 2  # the flag + the summary
    flagged = record_of(services, sid)
    assert FLAG_ACTIVATION_STUCK in flagged.flags and flagged.needs_attention
    assert standin.activation_count(sid) == 3
    assert services.repository.history(sid)[-1]["kind"] == "flag"

    clock.at(-10)  # still stuck: reported again, not re-written, not re-sent
    summary = run_reconciliation(services)
    assert summary.flagged == [{"subscriptionId": sid, "reason": FLAG_ACTIVATION_STUCK}]
    assert summary.storage_writes == 1 and standin.activation_count(sid) == 3

    standin.set_subscription(sid, status="Subscribed")  # Microsoft finally shows it active
    clock.at(0)
    summary = run_reconciliation(services)
    assert summary.repairs == {"status_drift": 1}
    active = record_of(services, sid)
    assert active.status is LocalStatus.SUBSCRIBED and active.flags == ()


def test_pending_activation_is_flagged_for_an_operator_and_never_activated_by_the_reconciler(standin, make_services):
    services = make_services(ACTIVATION_MODE="manual")
    clock = with_clock(services)
    sid = standin.create_purchase(plan_id="basic")["subscriptionId"]
    initial_sync(services, clock)
    clock.at(-9)
    assert request_operator_activation(services, sid, "buyer", Source.LANDING_PAGE).result is ActivationResult.PENDING_OPERATOR
    clock.at(0)

    summary = run_reconciliation(services)
    assert summary.flagged == [{"subscriptionId": sid, "reason": FLAG_AWAITING_OPERATOR}]
    record = record_of(services, sid)
    assert record.status is LocalStatus.PENDING_ACTIVATION and FLAG_AWAITING_OPERATOR in record.flags
    before = stored_state(services)
    again = run_reconciliation(services)
    assert again.flagged == summary.flagged and again.storage_writes == 1
    assert stored_state(services) == before
    assert standin.activation_count(sid) == 0  # only an operator activates in manual mode

    assert activate(services, sid, actor="operator:test", source=Source.OPERATOR).result is ActivationResult.ACTIVATED
    assert record_of(services, sid).flags == ()  # the operator's activation clears the flag


def test_recorded_but_unapplied_webhook_operations_are_finished(standin, make_services):
    services = make_services(RECONCILE_OPERATION_DEADLINE_SECONDS="1")
    clock = with_clock(services)
    x, y = standin.seed(2, plan_id="standard", quantity=5)
    initial_sync(services, clock)
    suspend = standin.trigger(x, "Suspend", deliver=False)
    change = standin.trigger(y, "ChangeQuantity", quantity=8, deliver=False)  # InProgress until we answer
    record_unapplied(services, standin, suspend["id"])
    record_unapplied(services, standin, change["id"])
    clock.advance(seconds=2)  # past RECONCILE_OPERATION_DEADLINE_SECONDS (no waiting: the clock moves)

    summary = run_reconciliation(services)
    assert summary.completed and summary.repairs == {"operation_replayed": 2}
    # Replayed first; the listing then finds both in step (no second report of the same change).
    assert sorted((d["subscriptionId"], d["kind"]) for d in summary.differences) == sorted(
        [(x, "unapplied_operation"), (y, "unapplied_operation")]
    )
    assert record_of(services, x).status is LocalStatus.SUSPENDED
    assert record_of(services, y).quantity == 8
    for sid, operation in ((x, suspend), (y, change)):
        marker = services.repository.get_marker(sid, operation["id"])
        assert not marker.pending and marker.completed_at is not None
        entry = services.repository.history(sid)[-1]
        assert (entry["operationId"], entry["source"], entry["result"]) == (operation["id"], "webhook", "applied")
    assert standin.get_operation(change["id"])["status"] == "Succeeded"
    assert [(p["operationId"], p["status"]) for p in standin.patches] == [(change["id"], "Success")]
    assert_matches_microsoft(services, standin, y)

    again = run_reconciliation(services)
    assert again.repairs == {} and again.storage_writes == 1


def test_a_marker_microsoft_does_not_know_does_not_block_reconciliation(standin, make_services):
    services = make_services(RECONCILE_OPERATION_DEADLINE_SECONDS="1")
    clock = with_clock(services)
    x, y = standin.seed(2)
    initial_sync(services, clock)
    bogus = str(uuid.uuid4())
    services.repository.record_operation(x, bogus, action="Suspend", payload="{}", correlation_id="")
    fresh = run_reconciliation(services)  # younger than the deadline: a delivery may still be handling it
    assert fresh.completed and fresh.repairs == {} and fresh.differences == []
    assert services.repository.get_marker(x, bogus).pending
    standin.set_subscription(y, status="Suspended")
    clock.advance(seconds=2)  # past RECONCILE_OPERATION_DEADLINE_SECONDS

    summary = run_reconciliation(services)
    assert summary.completed, summary.stopped_reason
    assert summary.repairs == {"operation_unverifiable": 1, "status_drift": 1}
    assert not services.repository.get_marker(x, bogus).pending
    assert record_of(services, x).status is LocalStatus.SUBSCRIBED  # nothing applied for it
    assert record_of(services, y).status is LocalStatus.SUSPENDED
    again = run_reconciliation(services)
    assert again.completed and again.repairs == {}


def test_overdue_reinstate_on_a_suspended_subscription_is_settled(standin, make_services):
    patient = make_services()  # default deadline: 600 s
    clock = with_clock(patient)
    (sid,) = standin.seed(1, status="Suspended")
    initial_sync(patient, clock)
    operation = standin.trigger(sid, "Reinstate", deliver=False)  # nobody answers it
    assert operation["status"] == "InProgress"

    summary = run_reconciliation(patient)
    assert summary.repairs == {} and standin.get_operation(operation["id"])["status"] == "InProgress"

    services = make_services(RECONCILE_OPERATION_DEADLINE_SECONDS="1", TABLES_PREFIX=patient.settings.tables_prefix)
    services.clock = clock.advance(seconds=2)  # past RECONCILE_OPERATION_DEADLINE_SECONDS
    summary = run_reconciliation(services)
    assert summary.completed and summary.repairs == {"operation_settled": 1}
    assert [d["kind"] for d in summary.differences] == ["overdue_operation"]
    assert standin.get_operation(operation["id"])["status"] == "Succeeded"
    assert [(p["operationId"], p["status"]) for p in standin.patches] == [(operation["id"], "Success")]
    assert standin.get_subscription(sid)["saasSubscriptionStatus"] == "Subscribed"
    record = record_of(services, sid)
    assert record.status is LocalStatus.SUBSCRIBED
    assert not services.repository.get_marker(sid, operation["id"]).pending
    assert services.repository.history(sid)[-1]["kind"] == "reinstate"

    again = run_reconciliation(services)
    assert again.repairs == {} and again.storage_writes == 1 and len(standin.patches) == 1


# ----------------------------------------------------------------------------------------- races


def test_a_webhook_racing_a_run_loses_no_update(standin, services):
    clock = with_clock(services)
    standin.page_size = 40
    ids = standin.seed(80, plan_id="standard", quantity=5)
    target = ids[-1]  # last on the last page: the run repairs 79 others around the webhook
    initial_sync(services, clock)
    for sid in ids:
        standin.set_subscription(sid, quantity=6)

    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(summary=run_reconciliation(services)))
    runner.start()
    deadline = time.monotonic() + 30
    while standin.calls["list"] < 2 + 2 and time.monotonic() < deadline:  # 2 pages in the sync + this run's 2nd
        time.sleep(0.005)
    # Microsoft suspends it after the run fetched the page (the page still says Subscribed), and the
    # webhook is applied while the run is busy repairing.
    operation = standin.trigger(target, "Suspend", deliver=False)
    outcome = apply_operation(services, *webhook_parts(standin, operation["id"]))
    assert outcome.result == "applied"
    runner.join(60)
    assert not runner.is_alive()
    summary = result["summary"]
    assert summary.completed and summary.subscriptions_seen == 80

    record = record_of(services, target)
    assert record.status is LocalStatus.SUSPENDED  # the newer local change survived the run
    history = services.repository.history(target)
    webhook_at = next(i for i, h in enumerate(history) if h["operationId"] == operation["id"])
    assert all(h["toStatus"] == "Suspended" for h in history[webhook_at:])
    others = [record_of(services, sid).quantity for sid in ids[:-1]]
    assert others == [6] * 79

    clock.at(5)  # a later run adopts whatever is still different, keeping the suspension
    later = run_reconciliation(services)
    assert later.completed
    settled = assert_matches_microsoft(services, standin, target)
    assert settled.status is LocalStatus.SUSPENDED and settled.quantity == 6


def test_a_local_change_between_the_listing_and_the_repair_wins(standin, services, make_services):
    clock = with_clock(services)
    x, y = standin.seed(2, plan_id="standard", quantity=5)
    initial_sync(services, clock)
    standin.set_subscription(x, quantity=9)
    standin.set_subscription(y, quantity=9)

    original = services.marketplace.list_subscription_pages

    def pages_then_a_webhook(start_link=None):
        for page, next_link in original(start_link):
            # The page is fetched; before the run looks at it, a webhook suspends x.
            operation = standin.trigger(x, "Suspend", deliver=False)
            apply_operation(services, *webhook_parts(standin, operation["id"]))
            yield page, next_link

    services.marketplace.list_subscription_pages = pages_then_a_webhook
    summary = run_reconciliation(services)
    services.marketplace.list_subscription_pages = original

    # The page is older than the local Suspend, so it is not adopted; one Get Subscription (which
    # does not lag) settles x in this run: suspended, with the quantity Microsoft has.
    assert summary.completed and summary.deferred == 0 and summary.confirmed_with_get == 1
    assert summary.repairs == {"detail_drift": 2}
    settled = assert_matches_microsoft(services, standin, x)
    assert settled.status is LocalStatus.SUSPENDED and settled.quantity == 9
    assert record_of(services, y).quantity == 9
    kinds = [h["kind"] for h in services.repository.history(x)]
    assert kinds[-2:] == ["suspend", "sync"]  # the webhook's change first, then Microsoft's current record

    clock.at(5)
    assert run_reconciliation(services).repairs == {}  # nothing left for the next run


def test_a_lost_suspend_right_after_another_change_is_repaired_in_the_same_run(standin, services):
    """Found by a probe: a drift inside the settle window used to wait for the next timer run."""
    clock = with_clock(services)
    (x,) = standin.seed(1, plan_id="standard", quantity=5)
    initial_sync(services, clock)
    clock.at(-1)  # a minute ago: a ChangeQuantity webhook, applied
    operation = standin.trigger(x, "ChangeQuantity", quantity=8, deliver=False)
    assert apply_operation(services, *webhook_parts(standin, operation["id"])).result == "applied"
    clock.at(0)
    standin.set_subscription(x, status="Suspended", quantity=8)  # then Microsoft suspends; the webhook is lost
    calls_before = standin.calls["get"]

    summary = run_reconciliation(services)

    assert summary.completed and summary.deferred == 0 and summary.confirmed_with_get == 1
    assert standin.calls["get"] - calls_before == 1  # exactly one Get Subscription to confirm
    settled = assert_matches_microsoft(services, standin, x)
    assert settled.status is LocalStatus.SUSPENDED and settled.quantity == 8


def test_an_etag_conflict_during_the_repair_re_decides_and_keeps_the_other_writer(standin, services, make_services):
    clock = with_clock(services)
    (x,) = standin.seed(1, plan_id="standard", quantity=5)
    initial_sync(services, clock)
    standin.set_subscription(x, quantity=9)
    other_worker = make_services(TABLES_PREFIX=services.settings.tables_prefix)  # another instance, same tables

    armed = threading.Event()
    fired = []

    class ConflictingClock(Clock):
        """Between the repair's read and its write (the state machine asks for the time), another
        instance applies a webhook to the same subscription."""

        def __call__(self):
            # Only the run's own reads: the background event relay reads the same clock.
            if armed.is_set() and threading.current_thread() is threading.main_thread():
                armed.clear()
                operation = standin.trigger(x, "Suspend", deliver=False)
                apply_operation(other_worker, *webhook_parts(standin, operation["id"]))
                fired.append(operation["id"])
            return super().__call__()

    services.clock = ConflictingClock()
    original = services.marketplace.list_subscription_pages

    def arm_after_fetch(start_link=None):
        for page, next_link in original(start_link):
            armed.set()
            yield page, next_link

    services.marketplace.list_subscription_pages = arm_after_fetch
    summary = run_reconciliation(services)
    services.marketplace.list_subscription_pages = original

    assert fired, "the conflicting write did not happen"
    # The repair read x, lost the ETag race (one write attempt failed), re-read it and stood back from
    # the listing; one Get Subscription then adopted Microsoft's current record (suspended, 9 seats).
    assert summary.completed and summary.deferred == 0 and summary.confirmed_with_get == 1
    assert summary.repairs == {"detail_drift": 1}
    assert summary.storage_reads == 2 + 2 + 1 and summary.storage_writes == 1 + 1 + 1
    record = record_of(services, x)
    assert record.status is LocalStatus.SUSPENDED and record.quantity == 9
    history = services.repository.history(x)
    assert history[-2]["operationId"] == fired[0]  # the other writer's change is kept, then the sync
    assert history[-1]["source"] == "reconcile" and history[-1]["kind"] == "sync"


def test_a_subscription_that_keeps_changing_is_deferred_and_the_run_goes_on(standin, services, make_services):
    clock = with_clock(services)
    x, y = standin.seed(2, plan_id="standard", quantity=5)
    initial_sync(services, clock)
    standin.set_subscription(x, quantity=9)
    standin.set_subscription(y, quantity=9)
    busy = make_services(TABLES_PREFIX=services.settings.tables_prefix)
    busy.clock = lambda: utc_now() - timedelta(minutes=30)  # its changes look old: the run keeps trying
    writes = []

    class BusyClock(Clock):
        """While armed, whenever the run reads the time (deciding or writing), another instance
        changes x first: every write attempt of the repair loses the ETag race."""

        def __call__(self):
            if armed.is_set() and len(writes) < 100 and threading.current_thread() is threading.main_thread():
                flag = Change(kind=Kind.FLAG, source=Source.OPERATOR, occurred_at=busy.clock(), flag=f"busy{len(writes)}")
                busy.repository.apply(x, lambda record: sm.apply(record, flag, now=busy.clock()))
                writes.append(flag.flag)
            return super().__call__()

    armed = threading.Event()
    services.clock = BusyClock()
    original = services.marketplace.list_subscription_pages

    def arm_after_fetch(start_link=None):
        for page, next_link in original(start_link):
            armed.set()
            yield page, next_link

    services.marketplace.list_subscription_pages = arm_after_fetch
    summary = run_reconciliation(services)  # must not raise
    armed.clear()
    services.marketplace.list_subscription_pages = original

    assert len(writes) >= 6  # at least one lost race per write attempt
    assert summary.completed and summary.deferred == 1 and summary.repairs == {"detail_drift": 1}
    assert record_of(services, x).quantity == 5 and record_of(services, y).quantity == 9
    assert services.repository.latest_runs(1)[0]["run_id"] == summary.run_id
    services.clock = clock.at(5)
    assert run_reconciliation(services).repairs == {"detail_drift": 1}
    assert record_of(services, x).quantity == 9


def test_microsoft_state_we_cannot_adopt_is_flagged_once_not_rewritten_every_run(standin, services):
    clock = with_clock(services)
    (x,) = standin.seed(1)
    initial_sync(services, clock, minutes_ago=20)
    standin.trigger(x, "Unsubscribe", deliver=False)
    initial_sync(services, clock, minutes_ago=10)
    assert record_of(services, x).status is LocalStatus.UNSUBSCRIBED
    standin.set_subscription(x, status="Subscribed")  # Microsoft's record contradicts a terminal state

    summary = run_reconciliation(services)
    assert summary.repairs == {} and summary.flagged == [{"subscriptionId": x, "reason": FLAG_MARKETPLACE_CONFLICT}]
    assert summary.storage_writes == 2  # the flag + the summary
    record = record_of(services, x)
    assert record.status is LocalStatus.UNSUBSCRIBED and FLAG_MARKETPLACE_CONFLICT in record.flags
    before = stored_state(services)
    again = run_reconciliation(services)
    assert again.repairs == {} and again.storage_writes == 1
    clock.at(5)
    later = run_reconciliation(services)  # still contradicting: reported again, not re-written
    assert later.flagged == summary.flagged and later.repairs == {} and later.storage_writes == 1
    assert stored_state(services) == before


def test_the_conflict_flag_clears_once_microsoft_agrees_again(standin, services):
    clock = with_clock(services)
    (x,) = standin.seed(1)
    initial_sync(services, clock, minutes_ago=20)
    standin.trigger(x, "Unsubscribe", deliver=False)
    initial_sync(services, clock, minutes_ago=10)
    standin.set_subscription(x, status="Subscribed")
    run_reconciliation(services)
    assert FLAG_MARKETPLACE_CONFLICT in record_of(services, x).flags

    standin.set_subscription(x, status="Unsubscribed")  # Microsoft's record agrees with ours again
    summary = run_reconciliation(services)
    assert summary.repairs == {"flag_cleared": 1} and summary.flagged == []
    assert FLAG_MARKETPLACE_CONFLICT not in record_of(services, x).flags
    assert run_reconciliation(services).storage_writes == 1  # nothing left to clear


# ------------------------------------------------------------------------------ budget and faults


def test_a_run_cut_off_by_its_time_budget_checkpoints_and_the_next_run_resumes(standin, services):
    standin.page_size = 5
    ids = standin.seed(12)

    first = run_reconciliation(services, time_budget_seconds=0)
    assert not first.completed and first.stopped_reason == "time_budget"
    assert first.pages == 1 and first.subscriptions_seen == 5 and first.repairs == {"recorded_new": 5}
    checkpoint = services.repository.get_checkpoint()
    assert checkpoint and "continuationToken=" in checkpoint["next_link"]
    assert {r.id for r in services.repository.list_records()} == set(ids[:5])

    second = run_reconciliation(services)
    assert second.completed and second.resumed_from_checkpoint
    assert second.pages == 2 and second.subscriptions_seen == 7 and second.repairs == {"recorded_new": 7}
    assert services.repository.get_checkpoint() is None
    assert {r.id for r in services.repository.list_records()} == set(ids)

    third = run_reconciliation(services)
    assert third.completed and not third.resumed_from_checkpoint and third.subscriptions_seen == 12
    assert third.repairs == {}


def test_a_checkpoint_link_microsoft_refuses_does_not_wedge_reconciliation(standin, services):
    stale = standin.api_base_url + "/saas/subscriptions?continuationToken=expired&api-version=2018-08-31"
    services.repository.save_checkpoint({"next_link": stale, "run_id": "an-old-run"})
    ids = standin.seed(3)
    summary = run_reconciliation(services)
    assert summary.completed, summary.stopped_reason
    assert not summary.resumed_from_checkpoint and summary.subscriptions_seen == 3
    assert services.repository.get_checkpoint() is None
    assert {r.id for r in services.repository.list_records()} == set(ids)


def test_marketplace_5xx_while_paging_stops_cleanly_and_the_next_run_completes(standin, services):
    ids = standin.seed(260)  # three pages of 100
    standin.fail_next(50, status=500, path_contains="continuationToken")  # page 2 fails, retries included

    first = run_reconciliation(services)
    assert not first.completed and first.stopped_reason.startswith("marketplace")
    assert first.pages == 1 and first.subscriptions_seen == 100 and first.repairs == {"recorded_new": 100}
    records = {r.id: r for r in services.repository.list_records()}
    assert set(records) == set(ids[:100])  # page 1 complete, nothing of page 2 or 3
    assert all(r.history_seq == 1 for r in records.values())
    for sid in ids[:100:25]:
        assert len(services.repository.history(sid)) == 1
    assert services.repository.get_checkpoint() is None
    assert services.repository.latest_runs(1)[0]["completed"] is False

    standin.clear_faults()
    second = run_reconciliation(services)
    assert second.completed and second.pages == 3 and second.subscriptions_seen == 260
    assert second.repairs == {"recorded_new": 160}
    assert {r.id for r in services.repository.list_records()} == set(ids)


def test_storage_reads_are_page_scans_not_per_subscription(standin, services):
    standin.seed(10)
    assert run_reconciliation(services).completed
    small = run_reconciliation(services)
    standin.seed(140)
    assert run_reconciliation(services).repairs == {"recorded_new": 140}
    large = run_reconciliation(services)

    assert small.completed and large.completed
    assert (small.subscriptions_seen, large.subscriptions_seen) == (10, 150)
    assert small.repairs == large.repairs == {}
    assert large.storage_reads == small.storage_reads == 2  # the checkpoint + one scan page
    assert large.storage_writes == small.storage_writes == 1
    assert large.marketplace_calls == 2 and small.marketplace_calls == 1  # listing pages only


def test_a_summary_with_many_flags_is_still_stored_and_readable(services):
    summary = RunSummary(run_id="many-flags", dry_run=False, started_at=utc_now().isoformat(), completed=True)
    for _ in range(1000):  # e.g. a thousand purchases waiting for an operator in manual mode
        summary.flag(str(uuid.uuid4()), FLAG_AWAITING_OPERATOR)
    services.repository.save_run_summary(summary.to_json())
    (stored,) = services.repository.latest_runs(1)
    assert stored["run_id"] == "many-flags" and stored["flagged_count"] == 1000
    assert stored["flagged"] == summary.flagged and len(stored["flagged"]) == MAX_FLAGS_KEPT


# ------------------------------------------------------------------------------------- the timer


def test_the_timer_through_the_dev_host_runs_and_stores_a_summary(standin, services, devhost):
    ids = standin.seed(3)
    response = requests.post(devhost.url + "/admin/functions/reconcile_timer?wait=true", timeout=60)
    assert response.status_code == 200, response.text
    runs = services.repository.latest_runs(5)
    assert len(runs) == 1
    assert runs[0]["completed"] and runs[0]["repairs"] == {"recorded_new": 3} and runs[0]["subscriptions_seen"] == 3
    assert runs[0]["marketplace_calls"] >= 1 and runs[0]["storage_writes"] == 3
    assert {r.id for r in services.repository.list_records()} == set(ids)


def test_a_run_counts_the_lifecycle_events_delivered_in_the_last_24_hours_by_hour(standin, services):
    clock = with_clock(services)
    ids = standin.seed(3, plan_id="standard", quantity=5)
    initial_sync(services, clock, minutes_ago=60 * 30)
    repository = services.repository
    events = [event for sid in ids for event in repository.list_events(sid)]
    assert len(events) >= 3
    now = utc_now()
    hour = now.replace(minute=0, second=0, microsecond=0)
    # When each was delivered (the relay stamps DeliveredAt with the services' clock): two in this
    # hour, one 5 hours ago, the rest 25 hours ago (before the 24 hours a run counts).
    delivered_at = [hour + timedelta(minutes=1), hour + timedelta(minutes=2), hour - timedelta(hours=5)]
    for index, event in enumerate(events):
        at = delivered_at[index] if index < len(delivered_at) else hour - timedelta(hours=25)
        clock.offset = at - utc_now()
        repository.mark_event_delivered(event)
    clock.offset = (hour + timedelta(minutes=30)) - utc_now()

    summary = run_reconciliation(services)
    key = "%Y-%m-%dT%H:00Z"
    assert summary.delivered_by_hour == {hour.strftime(key): 2, (hour - timedelta(hours=5)).strftime(key): 1}
    assert summary.events_pending == 0  # delivered events are counted, never taken for waiting ones
    stored = repository.latest_runs(1)[0]
    assert stored["delivered_by_hour"] == summary.delivered_by_hour
