"""The subscription state machine: every Kind from every LocalStatus, staleness, history, events, drift.

The expectation tables are written from the rules, not from the code:

* local states: PendingFulfillmentStart, PendingActivation (manual), ActivationRequested,
  ActivationFailed (the four "not yet active"), Subscribed, Suspended, Unsubscribed;
* Suspend only from Subscribed and the not-yet-active states (Microsoft is the truth);
* Reinstate: Suspended -> Subscribed;
* ChangePlan/ChangeQuantity change plan/quantity, the same value is a no-op;
* Renew moves the term dates;
* Unsubscribe from anything; Unsubscribed is terminal, a repeated Unsubscribe is a no-op;
* Subscribe: not-yet-active -> Subscribed;
* a change already in effect is a NOOP, a change that is illegal from the current state is REJECTED.

One cell deliberately follows the code rather than the literal rule (see ``REINSTATE`` below).
"""

from __future__ import annotations

from dataclasses import fields, replace
from datetime import UTC, datetime, timedelta

import pytest

from shared import state_machine as sm
from shared.domain import AadIdentifier, Subscription, Term
from shared.state_machine import (
    ACTIVE,
    NOT_YET_ACTIVE,
    Change,
    Kind,
    LocalStatus,
    Result,
    Source,
    SubscriptionRecord,
    apply,
    drift,
)

SID = "37f9dea2-4345-438f-b0bd-03d40d28c7e0"
T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
LATER = T0 + timedelta(hours=1)
NOW = T0 + timedelta(hours=2)

PFS = LocalStatus.PENDING_FULFILLMENT_START
PA = LocalStatus.PENDING_ACTIVATION
AR = LocalStatus.ACTIVATION_REQUESTED
AF = LocalStatus.ACTIVATION_FAILED
SUB = LocalStatus.SUBSCRIBED
SUSP = LocalStatus.SUSPENDED
UNSUB = LocalStatus.UNSUBSCRIBED

A, N, R = Result.APPLIED, Result.NOOP, Result.REJECTED

_MARKETPLACE_STATUS = {
    PFS: "PendingFulfillmentStart",
    PA: "PendingFulfillmentStart",
    AR: "PendingFulfillmentStart",
    AF: "PendingFulfillmentStart",
    SUB: "Subscribed",
    SUSP: "Suspended",
    UNSUB: "Unsubscribed",
}


def record_in(status: LocalStatus, **overrides) -> SubscriptionRecord:
    active = status in (SUB, SUSP)
    values = dict(
        id=SID,
        status=status,
        marketplace_status=_MARKETPLACE_STATUS[status],
        name="Contoso",
        offer_id="offer1",
        plan_id="basic",
        quantity=5,
        publisher_id="contoso",
        purchaser=AadIdentifier(email_id="buyer@contoso.example", tenant_id="tid"),
        beneficiary=AadIdentifier(email_id="user@contoso.example", tenant_id="tid"),
        term_unit="P1M",
        term_start=datetime(2024, 4, 1, tzinfo=UTC) if active else None,
        term_end=datetime(2024, 4, 30, tzinfo=UTC) if active else None,
        auto_renew=True,
        allowed_customer_operations=("Read", "Update", "Delete"),
        last_event_at=T0,
        created_at=T0 - timedelta(days=1),
        updated_at=T0,
        activation_attempts=1 if status in (AR, AF) else 0,
        unsubscribed_at=T0 if status is UNSUB else None,
        retain_data_until=T0 + timedelta(days=7) if status is UNSUB else None,
        history_seq=3,
    )
    values.update(overrides)
    return SubscriptionRecord(**values)


def change(kind: Kind, at: datetime = LATER, **kwargs) -> Change:
    return Change(kind=kind, source=kwargs.pop("source", Source.WEBHOOK), occurred_at=at, **kwargs)


def snapshot(status: str, **overrides) -> Subscription:
    payload = {
        "id": SID,
        "publisherId": "contoso",
        "offerId": "offer1",
        "name": "Contoso",
        "saasSubscriptionStatus": status,
        "purchaser": {"emailId": "buyer@contoso.example", "tenantId": "tid"},
        "beneficiary": {"emailId": "user@contoso.example", "tenantId": "tid"},
        "planId": "basic",
        "quantity": 5,
        "term": {"termUnit": "P1M"},
        "autoRenew": True,
        "allowedCustomerOperations": ["Read", "Update", "Delete"],
    }
    if status in ("Subscribed", "Suspended", "Unsubscribed"):
        payload["term"] = {"termUnit": "P1M", "startDate": "2024-04-01T00:00:00Z", "endDate": "2024-04-30T00:00:00Z"}
    payload.update(overrides)
    return Subscription.from_api(payload)


NEW_TERM = Term(term_unit="P1M", start_date=datetime(2024, 5, 1, tzinfo=UTC), end_date=datetime(2024, 5, 31, tzinfo=UTC))

# kind -> (how to build the change, {from status: (result, resulting status)})
ALL = (PFS, PA, AR, AF, SUB, SUSP, UNSUB)


def _row(**cells):
    return {status: cells[status.name] for status in ALL}


TRANSITIONS = {
    # manual mode: an operator must approve; only before anything was sent (or after it failed)
    Kind.REQUEST_ACTIVATION: (
        lambda: change(Kind.REQUEST_ACTIVATION, source=Source.LANDING_PAGE, actor="ada@contoso.example"),
        _row(
            PENDING_FULFILLMENT_START=(A, PA),
            PENDING_ACTIVATION=(N, PA),
            ACTIVATION_REQUESTED=(R, AR),
            ACTIVATION_FAILED=(A, PA),
            SUBSCRIBED=(R, SUB),
            SUSPENDED=(R, SUSP),
            UNSUBSCRIBED=(R, UNSUB),
        ),
    ),
    # Activate answered 200: any not-yet-active state (a re-send counts again); active: nothing to do
    Kind.ACTIVATION_SENT: (
        lambda: change(Kind.ACTIVATION_SENT, source=Source.LANDING_PAGE, actor="ada@contoso.example"),
        _row(
            PENDING_FULFILLMENT_START=(A, AR),
            PENDING_ACTIVATION=(A, AR),
            ACTIVATION_REQUESTED=(A, AR),
            ACTIVATION_FAILED=(A, AR),
            SUBSCRIBED=(N, SUB),
            SUSPENDED=(N, SUSP),
            UNSUBSCRIBED=(R, UNSUB),
        ),
    ),
    Kind.ACTIVATION_CONFIRMED: (
        lambda: change(Kind.ACTIVATION_CONFIRMED, source=Source.RECONCILE),
        _row(
            PENDING_FULFILLMENT_START=(A, SUB),
            PENDING_ACTIVATION=(A, SUB),
            ACTIVATION_REQUESTED=(A, SUB),
            ACTIVATION_FAILED=(A, SUB),
            SUBSCRIBED=(N, SUB),
            SUSPENDED=(R, SUSP),
            UNSUBSCRIBED=(R, UNSUB),
        ),
    ),
    Kind.ACTIVATION_FAILED: (
        lambda: change(Kind.ACTIVATION_FAILED, source=Source.LANDING_PAGE),
        _row(
            PENDING_FULFILLMENT_START=(A, AF),
            PENDING_ACTIVATION=(A, AF),
            ACTIVATION_REQUESTED=(A, AF),
            ACTIVATION_FAILED=(N, AF),
            SUBSCRIBED=(R, SUB),
            SUSPENDED=(R, SUSP),
            UNSUBSCRIBED=(R, UNSUB),
        ),
    ),
    # Subscribe: not-yet-active -> Subscribed
    Kind.SUBSCRIBE: (
        lambda: change(Kind.SUBSCRIBE),
        _row(
            PENDING_FULFILLMENT_START=(A, SUB),
            PENDING_ACTIVATION=(A, SUB),
            ACTIVATION_REQUESTED=(A, SUB),
            ACTIVATION_FAILED=(A, SUB),
            SUBSCRIBED=(N, SUB),
            SUSPENDED=(R, SUSP),
            UNSUBSCRIBED=(R, UNSUB),
        ),
    ),
    # Suspend only from Subscribed and not-yet-active states
    Kind.SUSPEND: (
        lambda: change(Kind.SUSPEND),
        _row(
            PENDING_FULFILLMENT_START=(A, SUSP),
            PENDING_ACTIVATION=(A, SUSP),
            ACTIVATION_REQUESTED=(A, SUSP),
            ACTIVATION_FAILED=(A, SUSP),
            SUBSCRIBED=(A, SUSP),
            SUSPENDED=(N, SUSP),
            UNSUBSCRIBED=(R, UNSUB),
        ),
    ),
    # Reinstate: Suspended -> Subscribed. DISAGREEMENT with the literal rule: the code also accepts
    # Reinstate from the not-yet-active states (state_machine.py `_decide`, REINSTATE branch), by the
    # same "Microsoft is the truth" argument the rules make for Suspend: Microsoft can only reinstate
    # what it had active. That reading is kept (rejecting would leave the record out of step with
    # Microsoft until reconciliation) and pinned here.
    Kind.REINSTATE: (
        lambda: change(Kind.REINSTATE),
        _row(
            PENDING_FULFILLMENT_START=(A, SUB),
            PENDING_ACTIVATION=(A, SUB),
            ACTIVATION_REQUESTED=(A, SUB),
            ACTIVATION_FAILED=(A, SUB),
            SUBSCRIBED=(N, SUB),
            SUSPENDED=(A, SUB),
            UNSUBSCRIBED=(R, UNSUB),
        ),
    ),
    # Unsubscribe from anything; a repeat is a no-op
    Kind.UNSUBSCRIBE: (
        lambda: change(Kind.UNSUBSCRIBE),
        _row(
            PENDING_FULFILLMENT_START=(A, UNSUB),
            PENDING_ACTIVATION=(A, UNSUB),
            ACTIVATION_REQUESTED=(A, UNSUB),
            ACTIVATION_FAILED=(A, UNSUB),
            SUBSCRIBED=(A, UNSUB),
            SUSPENDED=(A, UNSUB),
            UNSUBSCRIBED=(N, UNSUB),
        ),
    ),
    # value changes: any live state; Unsubscribed is terminal
    Kind.CHANGE_PLAN: (
        lambda: change(Kind.CHANGE_PLAN, plan_id="premium"),
        _row(
            PENDING_FULFILLMENT_START=(A, PFS),
            PENDING_ACTIVATION=(A, PA),
            ACTIVATION_REQUESTED=(A, AR),
            ACTIVATION_FAILED=(A, AF),
            SUBSCRIBED=(A, SUB),
            SUSPENDED=(A, SUSP),
            UNSUBSCRIBED=(R, UNSUB),
        ),
    ),
    Kind.CHANGE_QUANTITY: (
        lambda: change(Kind.CHANGE_QUANTITY, quantity=12),
        _row(
            PENDING_FULFILLMENT_START=(A, PFS),
            PENDING_ACTIVATION=(A, PA),
            ACTIVATION_REQUESTED=(A, AR),
            ACTIVATION_FAILED=(A, AF),
            SUBSCRIBED=(A, SUB),
            SUSPENDED=(A, SUSP),
            UNSUBSCRIBED=(R, UNSUB),
        ),
    ),
    Kind.RENEW: (
        lambda: change(Kind.RENEW, term=NEW_TERM),
        _row(
            PENDING_FULFILLMENT_START=(A, PFS),
            PENDING_ACTIVATION=(A, PA),
            ACTIVATION_REQUESTED=(A, AR),
            ACTIVATION_FAILED=(A, AF),
            SUBSCRIBED=(A, SUB),
            SUSPENDED=(A, SUSP),
            UNSUBSCRIBED=(R, UNSUB),
        ),
    ),
    # history-only kinds: recorded from every state, even the terminal one
    Kind.FLAG: (
        lambda: change(Kind.FLAG, flag="activation_stuck", source=Source.RECONCILE),
        {status: (Result.RECORDED, status) for status in ALL},
    ),
    Kind.UNKNOWN_ACTION: (
        lambda: change(Kind.UNKNOWN_ACTION, detail="unknown action 'Transfer'"),
        {status: (Result.RECORDED, status) for status in ALL},
    ),
    Kind.REFUSED: (
        lambda: change(Kind.REFUSED, detail="policy refused ChangePlan"),
        {status: (Result.RECORDED, status) for status in ALL},
    ),
    Kind.CHANGE_FAILED: (
        lambda: change(Kind.CHANGE_FAILED, detail="ChangePlan Failed: refused by billing", source=Source.PUBLISHER),
        {status: (Result.RECORDED, status) for status in ALL},
    ),
    # metering outcomes are history only: whatever the status, nothing moves
    Kind.USAGE_ACCEPTED: (
        lambda: change(Kind.USAGE_ACCEPTED, detail='[{"dimension": "api_calls"}]', source=Source.METERING),
        {status: (Result.RECORDED, status) for status in ALL},
    ),
    Kind.USAGE_REJECTED: (
        lambda: change(Kind.USAGE_REJECTED, detail='[{"dimension": "api_calls"}]', source=Source.METERING),
        {status: (Result.RECORDED, status) for status in ALL},
    ),
    Kind.USAGE_MISMATCH: (
        lambda: change(Kind.USAGE_MISMATCH, detail='[{"day": "2026-12-03", "dimension": "api_calls"}]', source=Source.METERING),
        {status: (Result.RECORDED, status) for status in ALL},
    ),
    # a person's console action (redeliver, replay, a run) is history only, in every status
    Kind.OPERATOR_ACTION: (
        lambda: change(Kind.OPERATOR_ACTION, detail="redeliver events: 1 delivered", source=Source.OPERATOR),
        {status: (Result.RECORDED, status) for status in ALL},
    ),
}

# The same change again (value already in effect) is a no-op, except where Unsubscribed refuses it.
SAME_VALUE = {
    Kind.CHANGE_PLAN: lambda record: change(Kind.CHANGE_PLAN, plan_id="basic"),
    Kind.CHANGE_QUANTITY: lambda record: change(Kind.CHANGE_QUANTITY, quantity=5),
    # the term the record already has (none yet for the not-yet-active states)
    Kind.RENEW: lambda record: change(
        Kind.RENEW, term=Term(term_unit="P1M", start_date=record.term_start, end_date=record.term_end)
    ),
}

EXPECTED_EVENT = {
    Kind.REQUEST_ACTIVATION: lambda old: sm.EVENT_PENDING,
    Kind.ACTIVATION_SENT: lambda old: None,
    Kind.ACTIVATION_CONFIRMED: lambda old: sm.EVENT_ACTIVATED,
    Kind.ACTIVATION_FAILED: lambda old: sm.EVENT_ACTIVATION_FAILED,
    Kind.SUBSCRIBE: lambda old: sm.EVENT_ACTIVATED,
    Kind.SUSPEND: lambda old: sm.EVENT_SUSPENDED,
    Kind.REINSTATE: lambda old: sm.EVENT_REINSTATED if old is SUSP else sm.EVENT_ACTIVATED,
    Kind.UNSUBSCRIBE: lambda old: sm.EVENT_UNSUBSCRIBED,
    Kind.CHANGE_PLAN: lambda old: sm.EVENT_PLAN_CHANGED,
    Kind.CHANGE_QUANTITY: lambda old: sm.EVENT_QUANTITY_CHANGED,
    Kind.RENEW: lambda old: sm.EVENT_RENEWED,
    Kind.FLAG: lambda old: sm.EVENT_FLAGGED,
    Kind.UNKNOWN_ACTION: lambda old: None,
    Kind.REFUSED: lambda old: None,
    Kind.CHANGE_FAILED: lambda old: sm.EVENT_CHANGE_FAILED,
    Kind.USAGE_ACCEPTED: lambda old: sm.EVENT_USAGE_ACCEPTED,
    Kind.USAGE_REJECTED: lambda old: sm.EVENT_USAGE_REJECTED,
    Kind.USAGE_MISMATCH: lambda old: sm.EVENT_USAGE_MISMATCH,
    Kind.OPERATOR_ACTION: lambda old: None,
}

CASES = [(kind, status) for kind in TRANSITIONS for status in ALL]


def test_tables_cover_every_kind_and_status():
    # snapshot kinds have their own table below; CLEAR_FLAG depends on the record's flags (own test)
    covered = set(TRANSITIONS) | {Kind.RECORD_PURCHASE, Kind.SYNC, Kind.CLEAR_FLAG}
    assert covered == set(Kind)
    for _, table in TRANSITIONS.values():
        assert set(table) == set(LocalStatus)
    assert {PFS, PA, AR, AF} == NOT_YET_ACTIVE
    assert {SUB, SUSP} == ACTIVE


@pytest.mark.parametrize("kind, status", CASES, ids=[f"{k.value}-from-{s.value}" for k, s in CASES])
def test_transition(kind, status):
    build, table = TRANSITIONS[kind]
    expected_result, expected_status = table[status]
    before = record_in(status)
    the_change = build()
    outcome = apply(before, the_change, now=NOW)

    assert outcome.result is expected_result
    assert outcome.record.status is expected_status
    assert outcome.previous is before
    assert outcome.record.history_seq == before.history_seq + 1

    entry = outcome.history
    assert entry.seq == before.history_seq + 1
    assert entry.kind == kind.value
    assert entry.source == the_change.source.value
    assert entry.result == expected_result.value
    assert entry.from_status == status.value
    assert entry.to_status == expected_status.value
    assert entry.occurred_at == LATER and entry.recorded_at == NOW

    if expected_result in (Result.NOOP, Result.REJECTED):
        # nothing else moved; a NOOP still dates the state ("already so at LATER"), a REJECTED does not
        clock = LATER if expected_result is Result.NOOP and kind is not Kind.FLAG else T0
        assert outcome.record == replace(before, history_seq=before.history_seq + 1, last_event_at=clock)
        assert entry.changes == {}
        assert outcome.event_type is None
        assert not outcome.changed
        if expected_result is Result.REJECTED:
            assert entry.detail  # says why
    else:
        assert outcome.changed
        assert outcome.record.updated_at == NOW
        assert outcome.event_type == EXPECTED_EVENT[kind](status)
        if expected_result is Result.APPLIED:
            assert outcome.record.last_event_at == LATER
            assert entry.changes  # an applied change says what changed
        else:  # RECORDED: history only, the ordering clock does not move
            assert outcome.record.last_event_at == T0
        if expected_status is not status:
            assert entry.changes["status"] == [status.value, expected_status.value]


@pytest.mark.parametrize("kind", list(SAME_VALUE))
@pytest.mark.parametrize("status", ALL)
def test_same_value_is_noop(kind, status):
    before = record_in(status)
    outcome = apply(before, SAME_VALUE[kind](before), now=NOW)
    expected = Result.REJECTED if status is UNSUB else Result.NOOP
    assert outcome.result is expected
    clock = T0 if status is UNSUB else LATER
    assert outcome.record == replace(before, history_seq=before.history_seq + 1, last_event_at=clock)
    assert outcome.event_type is None


def test_value_changes_change_only_their_value():
    before = record_in(SUB)
    plan = apply(before, change(Kind.CHANGE_PLAN, plan_id="premium"), now=NOW)
    assert plan.record.plan_id == "premium" and plan.record.quantity == 5
    assert plan.history.changes == {"plan_id": ["basic", "premium"]}

    quantity = apply(before, change(Kind.CHANGE_QUANTITY, quantity=12), now=NOW)
    assert quantity.record.quantity == 12 and quantity.record.plan_id == "basic"
    assert quantity.history.changes == {"quantity": [5, 12]}

    renew = apply(before, change(Kind.RENEW, term=NEW_TERM), now=NOW)
    assert renew.record.term_start == NEW_TERM.start_date
    assert renew.record.term_end == NEW_TERM.end_date
    assert renew.record.status is SUB


def test_empty_values_are_noops():
    before = record_in(SUB)
    assert apply(before, change(Kind.CHANGE_PLAN, plan_id=""), now=NOW).result is Result.NOOP
    assert apply(before, change(Kind.CHANGE_QUANTITY, quantity=None), now=NOW).result is Result.NOOP
    assert apply(before, change(Kind.RENEW), now=NOW).result is Result.NOOP  # no term at all


def test_renew_takes_the_term_from_the_snapshot_when_the_change_has_none():
    renewed = snapshot(
        "Subscribed", term={"termUnit": "P1Y", "startDate": "2024-05-01T00:00:00Z", "endDate": "2025-04-30T00:00:00Z"}
    )
    outcome = apply(record_in(SUB), change(Kind.RENEW, subscription=renewed), now=NOW)
    assert outcome.result is Result.APPLIED
    assert outcome.record.term_unit == "P1Y"
    assert outcome.record.term_end == datetime(2025, 4, 30, tzinfo=UTC)
    assert outcome.event_type == sm.EVENT_RENEWED


def test_activation_bookkeeping():
    sent = apply(record_in(PFS), change(Kind.ACTIVATION_SENT, actor="ada@contoso.example"), now=NOW)
    assert sent.record.activation_requested_at == LATER
    assert sent.record.activation_attempts == 1
    assert sent.record.activated_by == "ada@contoso.example"
    again = apply(sent.record, change(Kind.ACTIVATION_SENT, at=LATER + timedelta(minutes=5)), now=NOW)
    assert again.record.activation_attempts == 2
    assert again.record.activated_by == "ada@contoso.example"  # kept when the re-send has no actor

    flagged = replace(sent.record, flags=("activation_stuck", "other"))
    confirmed = apply(flagged, change(Kind.ACTIVATION_CONFIRMED, at=LATER + timedelta(minutes=6)), now=NOW)
    assert confirmed.record.status is SUB
    assert confirmed.record.marketplace_status == "Subscribed"
    assert confirmed.record.flags == ("other",)  # activation flags are settled by the activation

    manual = apply(record_in(PFS), change(Kind.REQUEST_ACTIVATION, actor="ada@contoso.example"), now=NOW)
    assert manual.record.activated_by == "ada@contoso.example"


def test_marketplace_status_follows_status_changes():
    assert apply(record_in(SUB), change(Kind.SUSPEND), now=NOW).record.marketplace_status == "Suspended"
    assert apply(record_in(SUSP), change(Kind.REINSTATE), now=NOW).record.marketplace_status == "Subscribed"
    assert apply(record_in(AR), change(Kind.SUBSCRIBE), now=NOW).record.marketplace_status == "Subscribed"
    assert apply(record_in(SUB), change(Kind.UNSUBSCRIBE), now=NOW).record.marketplace_status == "Unsubscribed"


# --- unsubscribe ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [PFS, PA, AR, AF, SUB, SUSP])
def test_unsubscribe_sets_retention_seven_days_after_the_event(status):
    outcome = apply(record_in(status), change(Kind.UNSUBSCRIBE), now=NOW)
    assert outcome.record.unsubscribed_at == LATER
    assert outcome.record.retain_data_until == LATER + timedelta(days=7)
    assert sm.DATA_RETENTION_DAYS == 7
    assert outcome.event_type == sm.EVENT_UNSUBSCRIBED


def test_repeated_unsubscribe_is_noop_and_keeps_retention():
    first = apply(record_in(SUB), change(Kind.UNSUBSCRIBE), now=NOW)
    second = apply(first.record, change(Kind.UNSUBSCRIBE, at=LATER + timedelta(days=3)), now=NOW)
    assert second.result is Result.NOOP
    assert second.record.retain_data_until == LATER + timedelta(days=7)  # not pushed out by a duplicate
    assert second.record.unsubscribed_at == LATER


def test_unsubscribed_is_terminal_for_every_state_change():
    gone = apply(record_in(SUB), change(Kind.UNSUBSCRIBE), now=NOW).record
    later = LATER + timedelta(minutes=1)
    for kind in (
        Kind.SUBSCRIBE,
        Kind.REINSTATE,
        Kind.SUSPEND,
        Kind.ACTIVATION_SENT,
        Kind.ACTIVATION_CONFIRMED,
        Kind.ACTIVATION_FAILED,
        Kind.REQUEST_ACTIVATION,
    ):
        outcome = apply(gone, change(kind, at=later), now=NOW)
        assert outcome.result is Result.REJECTED, kind
        assert outcome.record.status is UNSUB
    for status in ("Subscribed", "Suspended", "PendingFulfillmentStart"):
        outcome = apply(gone, change(Kind.SYNC, at=later, subscription=snapshot(status)), now=NOW)
        assert outcome.result is Result.REJECTED, status
        assert outcome.record.status is UNSUB


# --- staleness -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "the_change",
    [
        change(Kind.SUSPEND, at=T0 - timedelta(seconds=1)),
        change(Kind.UNSUBSCRIBE, at=T0 - timedelta(microseconds=1)),
        change(Kind.CHANGE_PLAN, at=T0 - timedelta(days=1), plan_id="premium"),
        change(Kind.CHANGE_QUANTITY, at=T0 - timedelta(days=1), quantity=99),
        change(Kind.RENEW, at=T0 - timedelta(days=1), term=NEW_TERM),
        change(Kind.SYNC, at=T0 - timedelta(minutes=1), subscription=snapshot("Suspended")),
    ],
    ids=["suspend", "unsubscribe", "change_plan", "change_quantity", "renew", "sync"],
)
def test_stale_change_is_recorded_but_changes_nothing(the_change):
    before = record_in(SUB)
    outcome = apply(before, the_change, now=NOW)
    assert outcome.result is Result.STALE
    assert outcome.record == replace(before, history_seq=before.history_seq + 1)
    assert outcome.event_type is None
    assert not outcome.changed
    entry = outcome.history
    assert entry.result == "stale"
    assert entry.seq == before.history_seq + 1
    assert entry.changes == {}
    assert entry.from_status == entry.to_status == "Subscribed"
    assert entry.occurred_at == the_change.occurred_at
    assert entry.detail


def test_same_instant_is_not_stale():
    outcome = apply(record_in(SUB), change(Kind.SUSPEND, at=T0), now=NOW)
    assert outcome.result is Result.APPLIED


def test_history_only_kinds_are_never_stale():
    old = T0 - timedelta(days=2)
    assert apply(record_in(SUB), change(Kind.FLAG, at=old, flag="x"), now=NOW).result is Result.RECORDED
    assert apply(record_in(SUB), change(Kind.UNKNOWN_ACTION, at=old), now=NOW).result is Result.RECORDED
    assert apply(record_in(SUB), change(Kind.REFUSED, at=old), now=NOW).result is Result.RECORDED


def test_ordering_clock_only_moves_forward():
    record = record_in(SUB)
    applied = apply(record, change(Kind.CHANGE_QUANTITY, at=LATER, quantity=7), now=NOW).record
    assert applied.last_event_at == LATER
    # a NOOP dates the state too ("already 7 at LATER+1h"), without touching anything else
    noop = apply(applied, change(Kind.CHANGE_QUANTITY, at=LATER + timedelta(hours=1), quantity=7), now=NOW)
    assert noop.result is Result.NOOP
    assert noop.record.last_event_at == LATER + timedelta(hours=1)
    assert noop.record.updated_at == applied.updated_at
    assert noop.history.changes == {}
    # so an event from before it is stale
    between = apply(noop.record, change(Kind.CHANGE_PLAN, at=LATER + timedelta(minutes=30), plan_id="premium"), now=NOW)
    assert between.result is Result.STALE
    # a NOOP older than the clock (stale anyway) never moves it back
    old_noop = apply(noop.record, change(Kind.CHANGE_QUANTITY, at=LATER, quantity=7), now=NOW).record
    assert old_noop.last_event_at == LATER + timedelta(hours=1)
    # a REJECTED change says nothing about the state: the clock stays
    suspended = apply(record_in(SUSP), change(Kind.SUBSCRIBE, at=LATER), now=NOW)
    assert suspended.result is Result.REJECTED
    assert suspended.record.last_event_at == T0
    # history-only kinds never move it
    flagged = apply(record_in(SUB, flags=("x",)), change(Kind.FLAG, at=LATER, flag="x"), now=NOW)
    assert flagged.result is Result.NOOP and flagged.record.last_event_at == T0


def test_reinstate_noop_then_late_suspend_is_stale():
    """Microsoft suspended then reinstated; we only hear the Reinstate (a NOOP), then the older Suspend."""
    suspend_at, reinstate_at = LATER, LATER + timedelta(seconds=5)
    reinstated = apply(record_in(SUB), change(Kind.REINSTATE, at=reinstate_at), now=NOW)
    assert reinstated.result is Result.NOOP
    late_suspend = apply(reinstated.record, change(Kind.SUSPEND, at=suspend_at), now=NOW)
    assert late_suspend.result is Result.STALE
    assert late_suspend.record.status is SUB


def test_out_of_order_delivery_never_moves_backwards():
    record = record_in(SUB)
    suspended = apply(record, change(Kind.SUSPEND, at=LATER + timedelta(minutes=10)), now=NOW).record
    late_reinstate_before_suspend = apply(suspended, change(Kind.REINSTATE, at=LATER), now=NOW)
    assert late_reinstate_before_suspend.result is Result.STALE
    assert late_reinstate_before_suspend.record.status is SUSP


# --- history sequence ----------------------------------------------------------------------------


def test_history_seq_increments_for_every_outcome():
    purchase = apply(
        None,
        change(
            Kind.RECORD_PURCHASE,
            at=T0,
            subscription=snapshot("PendingFulfillmentStart"),
            source=Source.LANDING_PAGE,
            actor="Ada <ada@contoso.example>",
        ),
        now=NOW,
    )
    assert purchase.history.seq == 1 and purchase.record.history_seq == 1
    assert purchase.history.from_status == ""
    record = purchase.record
    steps = [
        (change(Kind.ACTIVATION_SENT, at=T0 + timedelta(seconds=1)), Result.APPLIED),
        (change(Kind.ACTIVATION_SENT, at=T0 + timedelta(seconds=2)), Result.APPLIED),
        (change(Kind.ACTIVATION_CONFIRMED, at=T0 + timedelta(seconds=3)), Result.APPLIED),
        (change(Kind.ACTIVATION_CONFIRMED, at=T0 + timedelta(seconds=4)), Result.NOOP),
        (change(Kind.ACTIVATION_FAILED, at=T0 + timedelta(seconds=5)), Result.REJECTED),
        (change(Kind.SUSPEND, at=T0), Result.STALE),
        (change(Kind.FLAG, at=T0, flag="look"), Result.RECORDED),
        (change(Kind.FLAG, at=T0, flag="look"), Result.NOOP),
    ]
    for index, (the_change, expected) in enumerate(steps, start=2):
        outcome = apply(record, the_change, now=NOW)
        assert outcome.result is expected, the_change.kind
        assert outcome.history.seq == index
        assert outcome.record.history_seq == index
        record = outcome.record
    assert record.status is SUB
    assert record.flags == ("look",)
    assert record.needs_attention


def test_history_entry_json():
    outcome = apply(
        record_in(SUB),
        change(Kind.CHANGE_PLAN, plan_id="premium", operation_id="op-1", correlation_id="cid-1", actor="microsoft"),
        now=NOW,
    )
    document = outcome.history.to_json()
    assert document["seq"] == 4
    assert document["kind"] == "change_plan"
    assert document["result"] == "applied"
    assert document["operationId"] == "op-1"
    assert document["correlationId"] == "cid-1"
    assert document["occurredAt"].endswith("Z")
    assert document["changes"] == {"plan_id": ["basic", "premium"]}


# --- snapshots: RECORD_PURCHASE and SYNC -------------------------------------------------------------

MS = {"PendingFulfillmentStart": PFS, "Subscribed": SUB, "Suspended": SUSP, "Unsubscribed": UNSUB}
# local status x Microsoft status -> (result, resulting local status); Microsoft is the truth except
# that Unsubscribed is terminal, and pending keeps our local refinements of "not yet active".
SYNC_TABLE = {
    (local, ms): (
        (Result.REJECTED, UNSUB)
        if local is UNSUB and ms != "Unsubscribed"
        else (Result.APPLIED, local if ms == "PendingFulfillmentStart" and local in NOT_YET_ACTIVE else MS[ms])
    )
    for local in ALL
    for ms in MS
}
SYNC_EVENTS = {
    (PFS, SUB): sm.EVENT_ACTIVATED,
    (PA, SUB): sm.EVENT_ACTIVATED,
    (AR, SUB): sm.EVENT_ACTIVATED,
    (AF, SUB): sm.EVENT_ACTIVATED,
    (SUSP, SUB): sm.EVENT_REINSTATED,
}


@pytest.mark.parametrize("kind", [Kind.SYNC, Kind.RECORD_PURCHASE])
@pytest.mark.parametrize("local, ms", list(SYNC_TABLE), ids=[f"{local.value}-ms-{ms}" for local, ms in SYNC_TABLE])
def test_snapshot_adoption(kind, local, ms):
    expected_result, expected_status = SYNC_TABLE[(local, ms)]
    before = record_in(local)
    outcome = apply(
        before, change(kind, subscription=snapshot(ms, planId="premium" if ms != "PendingFulfillmentStart" else "basic")), now=NOW
    )
    assert outcome.result is expected_result
    assert outcome.record.status is expected_status
    if expected_result is Result.APPLIED:
        assert outcome.record.marketplace_status == ms
        if ms != "PendingFulfillmentStart":
            assert outcome.record.plan_id == "premium"  # Microsoft's values adopted
        if expected_status is not local:
            if expected_status is SUSP:
                assert outcome.event_type == sm.EVENT_SUSPENDED
            elif expected_status is UNSUB:
                assert outcome.event_type == sm.EVENT_UNSUBSCRIBED
                assert outcome.record.retain_data_until == LATER + timedelta(days=7)
            elif (local, expected_status) in SYNC_EVENTS:
                assert outcome.event_type == SYNC_EVENTS[(local, expected_status)]
    else:
        assert outcome.record == replace(before, history_seq=before.history_seq + 1)


@pytest.mark.parametrize("local", [PFS, PA, AR, AF])
def test_sync_from_pending_keeps_local_refinements(local):
    before = record_in(local, flags=("activation_stuck",))
    outcome = apply(before, change(Kind.SYNC, subscription=snapshot("PendingFulfillmentStart")), now=NOW)
    assert outcome.record.status is local  # e.g. ActivationRequested stays while Microsoft says pending
    assert outcome.record.flags == ("activation_stuck",)
    assert "status" not in outcome.history.changes
    assert outcome.event_type is None


def test_sync_to_subscribed_clears_activation_flags():
    before = record_in(AR, flags=("activation_stuck", "other"))
    outcome = apply(before, change(Kind.SYNC, subscription=snapshot("Subscribed")), now=NOW)
    assert outcome.record.status is SUB
    assert outcome.record.flags == ("other",)
    assert outcome.event_type == sm.EVENT_ACTIVATED


@pytest.mark.parametrize(
    "overrides, event",
    [
        ({"planId": "premium"}, sm.EVENT_PLAN_CHANGED),
        ({"quantity": 9}, sm.EVENT_QUANTITY_CHANGED),
        ({"term": {"termUnit": "P1M", "startDate": "2024-05-01T00:00:00Z", "endDate": "2024-05-31T00:00:00Z"}}, sm.EVENT_RENEWED),
        ({"autoRenew": False}, None),
    ],
)
def test_sync_of_an_active_subscription_reports_what_changed(overrides, event):
    outcome = apply(record_in(SUB), change(Kind.SYNC, subscription=snapshot("Subscribed", **overrides)), now=NOW)
    assert outcome.result is Result.APPLIED
    assert outcome.record.status is SUB
    assert outcome.event_type == event
    assert outcome.history.changes


def test_sync_with_an_unknown_microsoft_status_keeps_ours():
    before = record_in(SUB)
    outcome = apply(before, change(Kind.SYNC, subscription=snapshot("Frozen")), now=NOW)
    assert outcome.result is Result.APPLIED
    assert outcome.record.status is SUB
    assert outcome.record.marketplace_status == "Subscribed"  # "Unknown" is not adopted
    assert "status" not in outcome.history.changes


def test_sync_in_step_changes_nothing():
    before = record_in(SUB)
    outcome = apply(before, change(Kind.SYNC, subscription=snapshot("Subscribed")), now=NOW)
    assert outcome.record.status is SUB
    assert outcome.history.changes == {}
    assert outcome.event_type is None
    for name in ("plan_id", "quantity", "term_start", "term_end", "flags", "marketplace_status"):
        assert getattr(outcome.record, name) == getattr(before, name)


def test_sync_without_snapshot_is_rejected():
    assert apply(record_in(SUB), change(Kind.SYNC), now=NOW).result is Result.REJECTED


def test_first_sighting_creates_the_record():
    purchase = snapshot("PendingFulfillmentStart", quantity="")
    outcome = apply(
        None,
        change(Kind.RECORD_PURCHASE, at=T0, subscription=purchase, source=Source.LANDING_PAGE, actor="Ada <ada@contoso.example>"),
        now=NOW,
    )
    assert outcome.result is Result.APPLIED
    assert outcome.previous is None
    record = outcome.record
    assert record.id == SID
    assert record.status is PFS
    assert record.quantity is None
    assert record.signed_in_user == "Ada <ada@contoso.example>"
    assert record.created_at == NOW
    assert record.last_event_at == T0
    assert record.term_start is None and record.term_end is None  # pending: no term dates

    auto_activated = apply(None, change(Kind.SYNC, at=T0, subscription=snapshot("Subscribed")), now=NOW)
    assert auto_activated.record.status is SUB
    assert auto_activated.event_type == sm.EVENT_ACTIVATED
    assert auto_activated.record.signed_in_user == ""  # only the landing page knows who signed in


def test_signed_in_user_is_not_overwritten():
    first = apply(
        None,
        change(Kind.RECORD_PURCHASE, at=T0, subscription=snapshot("PendingFulfillmentStart"), actor="Ada <ada@contoso.example>"),
        now=NOW,
    ).record
    second = apply(
        first,
        change(Kind.RECORD_PURCHASE, subscription=snapshot("PendingFulfillmentStart"), actor="Eve <eve@contoso.example>"),
        now=NOW,
    ).record
    assert second.signed_in_user == "Ada <ada@contoso.example>"


def test_a_change_for_an_unknown_subscription_needs_a_snapshot():
    with pytest.raises(ValueError):
        apply(None, change(Kind.SUSPEND), now=NOW)


# --- drift ------------------------------------------------------------------------------------------


def test_drift_is_empty_when_in_step():
    for ms in ("PendingFulfillmentStart", "Subscribed", "Suspended", "Unsubscribed"):
        subscription = snapshot(ms)
        record = apply(None, change(Kind.SYNC, at=T0, subscription=subscription), now=NOW).record
        assert drift(record, subscription) == {}, ms


@pytest.mark.parametrize("local", [PFS, PA, AR, AF])
def test_drift_accepts_local_refinements_of_pending(local):
    pending = snapshot("PendingFulfillmentStart")
    record = apply(None, change(Kind.SYNC, at=T0, subscription=pending), now=NOW).record
    assert drift(replace(record, status=local), pending) == {}


def test_drift_names_the_differing_fields():
    subscription = snapshot("Subscribed")
    record = apply(None, change(Kind.SYNC, at=T0, subscription=subscription), now=NOW).record
    moved = snapshot("Suspended", planId="premium", quantity=9)
    assert drift(record, moved) == {
        "status": ["Subscribed", "Suspended"],
        "marketplace_status": ["Subscribed", "Suspended"],
        "plan_id": ["basic", "premium"],
        "quantity": [5, 9],
    }
    assert drift(replace(record, status=AR), subscription)["status"] == ["ActivationRequested", "Subscribed"]


def test_drift_ignores_an_unknown_microsoft_status():
    subscription = snapshot("Subscribed")
    record = apply(None, change(Kind.SYNC, at=T0, subscription=subscription), now=NOW).record
    frozen = snapshot("Frozen", term={"termUnit": "P1M", "startDate": "2024-04-01T00:00:00Z", "endDate": "2024-04-30T00:00:00Z"})
    assert drift(record, frozen) == {}


def test_drift_and_sync_agree():
    """After a SYNC, drift against the same snapshot is empty, whatever the starting state."""
    for status in (PFS, PA, AR, AF, SUB, SUSP):
        for ms in ("PendingFulfillmentStart", "Subscribed", "Suspended", "Unsubscribed"):
            subscription = snapshot(ms, planId="premium", quantity=11)
            synced = apply(record_in(status), change(Kind.SYNC, subscription=subscription), now=NOW).record
            assert drift(synced, subscription) == {}, (status, ms)


def test_snapshot_of_a_record_is_json_ready():
    import json

    outcome = apply(record_in(SUB), change(Kind.UNSUBSCRIBE), now=NOW)
    document = outcome.record.snapshot()
    json.dumps(document)
    assert document["status"] == "Unsubscribed"
    assert document["retainDataUntil"] == "2024-05-08T13:00:00.123456Z"
    assert {f.name for f in fields(SubscriptionRecord)} >= {"retain_data_until", "history_seq"}


@pytest.mark.parametrize("status", ALL)
def test_clear_flag_removes_only_that_flag_and_never_moves_the_subscription(status):
    before = record_in(status, flags=("marketplace_conflict", "activation_stuck"))
    cleared = apply(before, change(Kind.CLEAR_FLAG, at=T0 - timedelta(days=1), flag="marketplace_conflict"), now=NOW)
    assert cleared.result is Result.RECORDED  # never stale: it records a fact about us, not Microsoft
    assert cleared.record.flags == ("activation_stuck",)
    assert cleared.record.status is status and cleared.record.last_event_at == before.last_event_at
    assert cleared.event_type is None
    again = apply(cleared.record, change(Kind.CLEAR_FLAG, flag="marketplace_conflict"), now=NOW)
    assert again.result is Result.NOOP and again.record.flags == ("activation_stuck",)
