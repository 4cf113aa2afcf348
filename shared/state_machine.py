"""The one place that decides how a local subscription record may change.

Landing page, webhook, reconciler and operator all describe what happened as a ``Change`` and
call :func:`apply`. It returns an :class:`Outcome`: the new record, the history entry to append
and, when the state really changed, the lifecycle event to publish. It never does I/O, so the
repository can re-run it on a fresh copy of the record after an ETag conflict.

Ordering: every change carries ``occurred_at`` (Marketplace ``timeStamp`` for webhooks, the time a
listing was fetched for reconciliation, now for local actions). A change older than the last one
applied is *stale*: it is written to history but never moves the subscription backwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from shared.domain import AadIdentifier, Subscription, SubscriptionStatus, Term, format_timestamp, utc_now

DATA_RETENTION_DAYS = 7


class LocalStatus(str, Enum):
    PENDING_FULFILLMENT_START = "PendingFulfillmentStart"
    PENDING_ACTIVATION = "PendingActivation"  # manual mode: waits for an operator
    ACTIVATION_REQUESTED = "ActivationRequested"  # Activate answered 200; Microsoft not yet Subscribed
    ACTIVATION_FAILED = "ActivationFailed"
    SUBSCRIBED = "Subscribed"
    SUSPENDED = "Suspended"
    UNSUBSCRIBED = "Unsubscribed"

    @classmethod
    def parse(cls, value: str) -> LocalStatus:
        return cls(value)


NOT_YET_ACTIVE = frozenset(
    {
        LocalStatus.PENDING_FULFILLMENT_START,
        LocalStatus.PENDING_ACTIVATION,
        LocalStatus.ACTIVATION_REQUESTED,
        LocalStatus.ACTIVATION_FAILED,
    }
)
ACTIVE = frozenset({LocalStatus.SUBSCRIBED, LocalStatus.SUSPENDED})


class Source(str, Enum):
    LANDING_PAGE = "landing_page"
    WEBHOOK = "webhook"
    RECONCILE = "reconcile"
    OPERATOR = "operator"
    PUBLISHER = "publisher"  # the publisher's SaaS application (publisher API) or an operator's CLI change
    METERING = "metering"  # the metering emitter: Microsoft's answer to an hour of usage


class Kind(str, Enum):
    RECORD_PURCHASE = "record_purchase"  # resolve on the landing page: Microsoft's snapshot
    SYNC = "sync"  # reconciliation: adopt Microsoft's snapshot
    REQUEST_ACTIVATION = "request_activation"  # manual mode: wait for an operator
    ACTIVATION_SENT = "activation_sent"
    ACTIVATION_CONFIRMED = "activation_confirmed"
    ACTIVATION_FAILED = "activation_failed"
    SUBSCRIBE = "subscribe"
    SUSPEND = "suspend"
    REINSTATE = "reinstate"
    UNSUBSCRIBE = "unsubscribe"
    RENEW = "renew"
    CHANGE_PLAN = "change_plan"
    CHANGE_QUANTITY = "change_quantity"
    FLAG = "flag"  # something needs an operator; no state change
    CLEAR_FLAG = "clear_flag"  # the reason for a flag is gone
    UNKNOWN_ACTION = "unknown_action"  # recorded for reconciliation
    REFUSED = "refused"  # the publisher's policy refused a requested change; state stays
    CHANGE_FAILED = "change_failed"  # a publisher change Microsoft failed or never confirmed; state stays
    USAGE_ACCEPTED = "usage_accepted"  # Microsoft accepted an hour of metered usage; state stays
    USAGE_REJECTED = "usage_rejected"  # Microsoft refused an hour of usage, or it expired unsent; state stays
    USAGE_MISMATCH = "usage_mismatch"  # Microsoft's daily read-back differs from what we recorded accepted; state stays
    OPERATOR_ACTION = "operator_action"  # a person acted from the console (redeliver, replay, run); state stays


# Flags for a person, kept until an operator acknowledges them (the console's Acknowledge).
FLAG_CHANGE_FAILED = "change_failed"  # a publisher change failed at Microsoft or was never confirmed
FLAG_CHANGE_REFUSED = "change_refused"  # our policy refused a change Microsoft sent (the buyer's request failed)

# Kinds that record a fact without moving the subscription: never "stale".
HISTORY_ONLY_KINDS = frozenset(
    {
        Kind.FLAG,
        Kind.CLEAR_FLAG,
        Kind.UNKNOWN_ACTION,
        Kind.REFUSED,
        Kind.CHANGE_FAILED,
        Kind.USAGE_ACCEPTED,
        Kind.USAGE_REJECTED,
        Kind.USAGE_MISMATCH,
        Kind.OPERATOR_ACTION,
    }
)


class Result(str, Enum):
    APPLIED = "applied"
    NOOP = "noop"  # already in that state
    STALE = "stale"  # older than the last applied change
    REJECTED = "rejected"  # illegal from the current state
    RECORDED = "recorded"  # history only (flags, unknown actions)


# Lifecycle event names for the publisher's SaaS application (see docs/events.md).
EVENT_ACTIVATED = "subscription.activated"
EVENT_PENDING = "subscription.pending"
EVENT_ACTIVATION_FAILED = "subscription.activation_failed"
EVENT_PLAN_CHANGED = "subscription.plan_changed"
EVENT_QUANTITY_CHANGED = "subscription.quantity_changed"
EVENT_SUSPENDED = "subscription.suspended"
EVENT_REINSTATED = "subscription.reinstated"
EVENT_RENEWED = "subscription.renewed"
EVENT_UNSUBSCRIBED = "subscription.unsubscribed"
EVENT_FLAGGED = "subscription.flagged"
EVENT_CHANGE_FAILED = "subscription.change_failed"
EVENT_USAGE_ACCEPTED = "usage.accepted"
EVENT_USAGE_REJECTED = "usage.rejected"
EVENT_USAGE_MISMATCH = "usage.mismatch"


@dataclass(frozen=True)
class SubscriptionRecord:
    """Our copy of a subscription, with local states and bookkeeping."""

    id: str
    status: LocalStatus
    marketplace_status: str = ""
    name: str = ""
    offer_id: str = ""
    plan_id: str = ""
    quantity: int | None = None
    publisher_id: str = ""
    purchaser: AadIdentifier = field(default_factory=AadIdentifier)
    beneficiary: AadIdentifier = field(default_factory=AadIdentifier)
    term_unit: str = ""
    term_start: datetime | None = None
    term_end: datetime | None = None
    is_free_trial: bool = False
    auto_renew: bool = False
    allowed_customer_operations: tuple[str, ...] = ()
    # Microsoft's test markers: a preview/private-offer test purchase or a sandbox/dry-run session.
    # Their usage is sent as usual but never counted as revenue.
    is_test: bool = False
    sandbox_type: str = ""
    session_mode: str = ""
    last_event_at: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    signed_in_user: str = ""
    activated_by: str = ""
    activation_requested_at: datetime | None = None
    activation_attempts: int = 0
    unsubscribed_at: datetime | None = None
    retain_data_until: datetime | None = None
    flags: tuple[str, ...] = ()
    #: the publisher operation (our id) holding this subscription's claim; "" when none is pending
    pending_operation_id: str = ""
    history_seq: int = 0  # number of history entries; also orders them

    @property
    def needs_attention(self) -> bool:
        return bool(self.flags)

    @property
    def is_test_purchase(self) -> bool:
        """Test or dry-run: ``isTest``, a sandbox other than ``None``, or ``sessionMode`` ``DryRun``."""
        return (
            self.is_test or self.sandbox_type.strip().lower() not in ("", "none") or self.session_mode.strip().lower() == "dryrun"
        )

    def snapshot(self) -> dict[str, Any]:
        """The fields a lifecycle event consumer cares about, JSON-ready."""
        return {
            "id": self.id,
            "status": self.status.value,
            "marketplaceStatus": self.marketplace_status,
            "name": self.name,
            "offerId": self.offer_id,
            "planId": self.plan_id,
            "quantity": self.quantity,
            "purchaser": self.purchaser.to_api(),
            "beneficiary": self.beneficiary.to_api(),
            "term": {
                "termUnit": self.term_unit,
                "startDate": format_timestamp(self.term_start),
                "endDate": format_timestamp(self.term_end),
            },
            "isFreeTrial": self.is_free_trial,
            "autoRenew": self.auto_renew,
            "isTest": self.is_test,
            "sandboxType": self.sandbox_type,
            "sessionMode": self.session_mode,
            "activatedBy": self.activated_by,
            "retainDataUntil": format_timestamp(self.retain_data_until),
            "flags": list(self.flags),
            "pendingOperationId": self.pending_operation_id or None,
        }


@dataclass(frozen=True)
class Change:
    """Something that happened to a subscription, described by whoever saw it."""

    kind: Kind
    source: Source
    occurred_at: datetime
    subscription: Subscription | None = None  # Microsoft's snapshot, when the change carries one
    plan_id: str = ""
    quantity: int | None = None
    term: Term | None = None
    operation_id: str = ""
    correlation_id: str = ""
    actor: str = ""
    detail: str = ""
    flag: str = ""
    #: a publisher operation this change settles: its claim is released whatever the result
    release_operation: str = ""


@dataclass(frozen=True)
class HistoryEntry:
    seq: int
    recorded_at: datetime
    occurred_at: datetime
    kind: str
    source: str
    result: str
    from_status: str
    to_status: str
    changes: dict[str, list[Any]]
    operation_id: str = ""
    correlation_id: str = ""
    actor: str = ""
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "recordedAt": format_timestamp(self.recorded_at),
            "occurredAt": format_timestamp(self.occurred_at),
            "kind": self.kind,
            "source": self.source,
            "result": self.result,
            "fromStatus": self.from_status,
            "toStatus": self.to_status,
            "changes": self.changes,
            "operationId": self.operation_id,
            "correlationId": self.correlation_id,
            "actor": self.actor,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class Outcome:
    record: SubscriptionRecord
    history: HistoryEntry
    result: Result
    event_type: str | None = None  # lifecycle event to publish, if any
    previous: SubscriptionRecord | None = None

    @property
    def changed(self) -> bool:
        return self.result in (Result.APPLIED, Result.RECORDED)


# ---------------------------------------------------------------------------------------------

_STATUS_FROM_MARKETPLACE = {
    SubscriptionStatus.PENDING_FULFILLMENT_START: LocalStatus.PENDING_FULFILLMENT_START,
    SubscriptionStatus.NOT_STARTED: LocalStatus.PENDING_FULFILLMENT_START,
    SubscriptionStatus.SUBSCRIBED: LocalStatus.SUBSCRIBED,
    SubscriptionStatus.SUSPENDED: LocalStatus.SUSPENDED,
    SubscriptionStatus.UNSUBSCRIBED: LocalStatus.UNSUBSCRIBED,
}

# Fields copied from Microsoft's snapshot (Microsoft is the source of truth for these).
SNAPSHOT_FIELDS = (
    "marketplace_status",
    "name",
    "offer_id",
    "plan_id",
    "quantity",
    "publisher_id",
    "purchaser",
    "beneficiary",
    "term_unit",
    "term_start",
    "term_end",
    "is_free_trial",
    "auto_renew",
    "allowed_customer_operations",
    "is_test",
    "sandbox_type",
    "session_mode",
)
_TRACKED_FIELDS = ("status", *SNAPSHOT_FIELDS, "activated_by", "activation_attempts", "flags", "pending_operation_id")


def snapshot_values(subscription: Subscription) -> dict[str, Any]:
    return {
        "marketplace_status": subscription.status.value,
        "name": subscription.name,
        "offer_id": subscription.offer_id,
        "plan_id": subscription.plan_id,
        "quantity": subscription.quantity,
        "publisher_id": subscription.publisher_id,
        "purchaser": subscription.purchaser,
        "beneficiary": subscription.beneficiary,
        "term_unit": subscription.term.term_unit,
        "term_start": subscription.term.start_date,
        "term_end": subscription.term.end_date,
        "is_free_trial": subscription.is_free_trial,
        "auto_renew": subscription.auto_renew,
        "allowed_customer_operations": subscription.allowed_customer_operations,
        "is_test": subscription.is_test,
        "sandbox_type": subscription.sandbox_type,
        "session_mode": subscription.session_mode,
    }


def status_for_snapshot(current: LocalStatus | None, marketplace: SubscriptionStatus) -> LocalStatus | None:
    """Local status implied by Microsoft's status; None when Microsoft's status is unknown."""
    target = _STATUS_FROM_MARKETPLACE.get(marketplace)
    if target is None:
        return None
    # Our local refinements of "not yet active" stay while Microsoft still says pending.
    if target is LocalStatus.PENDING_FULFILLMENT_START and current in NOT_YET_ACTIVE:
        return current
    return target


def drift(record: SubscriptionRecord, subscription: Subscription) -> dict[str, list[Any]]:
    """Fields where our record differs from Microsoft's snapshot (empty: in step)."""
    wanted: dict[str, Any] = snapshot_values(subscription)
    target = status_for_snapshot(record.status, subscription.status)
    if target is None:
        wanted.pop("marketplace_status")  # an unknown Microsoft status: nothing to adopt
    else:
        wanted["status"] = target
    return {
        name: [jsonable(getattr(record, name)), jsonable(value)]
        for name, value in wanted.items()
        if getattr(record, name) != value
    }


def jsonable(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return format_timestamp(value)
    if isinstance(value, AadIdentifier):
        return value.to_api()
    if isinstance(value, tuple):
        return list(value)
    return value


def _diff(before: SubscriptionRecord | None, after: SubscriptionRecord) -> dict[str, list[Any]]:
    changes = {}
    for name in _TRACKED_FIELDS:
        old = getattr(before, name) if before is not None else None
        new = getattr(after, name)
        if old != new:
            changes[name] = [jsonable(old), jsonable(new)]
    return changes


def new_record(subscription_id: str, now: datetime) -> SubscriptionRecord:
    return SubscriptionRecord(id=subscription_id, status=LocalStatus.PENDING_FULFILLMENT_START, created_at=now, updated_at=now)


class _Decision:
    """What a rule decided: the result, the new field values and the lifecycle event."""

    def __init__(self, result: Result, updates: dict[str, Any] | None = None, event: str | None = None, detail: str = ""):
        self.result = result
        self.updates = updates or {}
        self.event = event
        self.detail = detail


def _adopt_snapshot(record: SubscriptionRecord, change: Change) -> _Decision:
    subscription = change.subscription
    if subscription is None:
        return _Decision(Result.REJECTED, detail="no snapshot")
    updates = snapshot_values(subscription)
    target = status_for_snapshot(record.status, subscription.status)
    if target is None:
        updates.pop("marketplace_status")
        target = record.status
    if record.status is LocalStatus.UNSUBSCRIBED and target is not LocalStatus.UNSUBSCRIBED:
        return _Decision(Result.REJECTED, detail="Unsubscribed is terminal")
    updates["status"] = target
    event = _event_for_status_change(record.status, target)
    if event is None and record.status in ACTIVE and target is record.status:
        if subscription.plan_id and subscription.plan_id != record.plan_id and record.plan_id:
            event = EVENT_PLAN_CHANGED
        elif subscription.quantity != record.quantity and record.quantity is not None:
            event = EVENT_QUANTITY_CHANGED
        elif subscription.term.end_date and record.term_end and subscription.term.end_date > record.term_end:
            event = EVENT_RENEWED
    if target is LocalStatus.UNSUBSCRIBED and record.status is not LocalStatus.UNSUBSCRIBED:
        updates.update(_unsubscribe_updates(change.occurred_at))
    if target is LocalStatus.SUBSCRIBED and record.status in NOT_YET_ACTIVE:
        updates["flags"] = tuple(f for f in record.flags if not f.startswith("activation"))
    return _Decision(Result.APPLIED, updates, event)


def _event_for_status_change(old: LocalStatus, new: LocalStatus) -> str | None:
    if old is new:
        return None
    if new is LocalStatus.SUBSCRIBED:
        return EVENT_REINSTATED if old is LocalStatus.SUSPENDED else EVENT_ACTIVATED
    return {
        LocalStatus.SUSPENDED: EVENT_SUSPENDED,
        LocalStatus.UNSUBSCRIBED: EVENT_UNSUBSCRIBED,
        LocalStatus.ACTIVATION_FAILED: EVENT_ACTIVATION_FAILED,
        LocalStatus.PENDING_ACTIVATION: EVENT_PENDING,
    }.get(new)


def _unsubscribe_updates(at: datetime) -> dict[str, Any]:
    return {
        "status": LocalStatus.UNSUBSCRIBED,
        "marketplace_status": SubscriptionStatus.UNSUBSCRIBED.value,
        "unsubscribed_at": at,
        "retain_data_until": at + timedelta(days=DATA_RETENTION_DAYS),
    }


def _move(
    record: SubscriptionRecord, allowed: frozenset[LocalStatus] | set[LocalStatus], target: LocalStatus, **extra: Any
) -> _Decision:
    if record.status is target:
        return _Decision(Result.NOOP)
    if record.status not in allowed:
        return _Decision(Result.REJECTED, detail=f"{record.status.value} cannot become {target.value}")
    return _Decision(Result.APPLIED, {"status": target, **extra}, _event_for_status_change(record.status, target))


def _with_flag(record: SubscriptionRecord, flag: str) -> dict[str, Any]:
    return {"flags": (*record.flags, flag)} if flag and flag not in record.flags else {}


def _decide(record: SubscriptionRecord, change: Change) -> _Decision:
    kind = change.kind
    status = record.status
    if kind in (Kind.RECORD_PURCHASE, Kind.SYNC):
        return _adopt_snapshot(record, change)
    if kind is Kind.FLAG:
        if change.flag in record.flags:
            return _Decision(Result.NOOP)
        return _Decision(Result.RECORDED, {"flags": (*record.flags, change.flag)}, EVENT_FLAGGED)
    if kind is Kind.CLEAR_FLAG:
        if change.flag not in record.flags:
            return _Decision(Result.NOOP)
        return _Decision(Result.RECORDED, {"flags": tuple(f for f in record.flags if f != change.flag)})
    if kind in (Kind.UNKNOWN_ACTION, Kind.OPERATOR_ACTION):
        return _Decision(Result.RECORDED)
    if kind is Kind.REFUSED:  # with ``change.flag`` when a person should look (our policy said no)
        return _Decision(Result.RECORDED, _with_flag(record, change.flag))
    if kind is Kind.CHANGE_FAILED:
        return _Decision(Result.RECORDED, _with_flag(record, change.flag or FLAG_CHANGE_FAILED), EVENT_CHANGE_FAILED)
    if kind is Kind.USAGE_ACCEPTED:
        return _Decision(Result.RECORDED, event=EVENT_USAGE_ACCEPTED)
    if kind is Kind.USAGE_REJECTED:
        return _Decision(Result.RECORDED, event=EVENT_USAGE_REJECTED)
    if kind is Kind.USAGE_MISMATCH:
        return _Decision(Result.RECORDED, event=EVENT_USAGE_MISMATCH)
    if kind is Kind.UNSUBSCRIBE:
        if status is LocalStatus.UNSUBSCRIBED:
            return _Decision(Result.NOOP)
        return _Decision(Result.APPLIED, _unsubscribe_updates(change.occurred_at), EVENT_UNSUBSCRIBED)
    if status is LocalStatus.UNSUBSCRIBED:
        return _Decision(Result.REJECTED, detail="Unsubscribed is terminal")

    if kind is Kind.REQUEST_ACTIVATION:
        return _move(
            record,
            {LocalStatus.PENDING_FULFILLMENT_START, LocalStatus.ACTIVATION_FAILED},
            LocalStatus.PENDING_ACTIVATION,
            activated_by=change.actor,
        )
    if kind is Kind.ACTIVATION_SENT:
        if status in ACTIVE:
            return _Decision(Result.NOOP)
        updates = {
            "status": LocalStatus.ACTIVATION_REQUESTED,
            "activation_requested_at": change.occurred_at,
            "activation_attempts": record.activation_attempts + 1,
            "activated_by": change.actor or record.activated_by,
        }
        return _Decision(Result.APPLIED, updates)
    if kind is Kind.ACTIVATION_CONFIRMED:
        flags = tuple(f for f in record.flags if not f.startswith("activation"))
        # Microsoft's read-back carries what activation set (term dates); adopt it with the status.
        snapshot = snapshot_values(change.subscription) if change.subscription is not None else {}
        return _move(
            record,
            NOT_YET_ACTIVE,
            LocalStatus.SUBSCRIBED,
            **{**snapshot, "marketplace_status": "Subscribed"},
            flags=flags,
            activated_by=record.activated_by or change.actor,
        )
    if kind is Kind.ACTIVATION_FAILED:
        return _move(record, NOT_YET_ACTIVE, LocalStatus.ACTIVATION_FAILED)
    if kind is Kind.SUBSCRIBE:
        return _move(record, NOT_YET_ACTIVE, LocalStatus.SUBSCRIBED, marketplace_status="Subscribed")
    if kind is Kind.SUSPEND:
        return _move(record, NOT_YET_ACTIVE | {LocalStatus.SUBSCRIBED}, LocalStatus.SUSPENDED, marketplace_status="Suspended")
    if kind is Kind.REINSTATE:
        return _move(record, {LocalStatus.SUSPENDED} | NOT_YET_ACTIVE, LocalStatus.SUBSCRIBED, marketplace_status="Subscribed")
    if kind is Kind.RENEW:
        term = change.term or (change.subscription.term if change.subscription else None)
        if term is None or (term.start_date == record.term_start and term.end_date == record.term_end):
            return _Decision(Result.NOOP)
        updates = {"term_start": term.start_date, "term_end": term.end_date}
        if term.term_unit:
            updates["term_unit"] = term.term_unit
        return _Decision(Result.APPLIED, updates, EVENT_RENEWED)
    if kind is Kind.CHANGE_PLAN:
        if not change.plan_id or change.plan_id == record.plan_id:
            return _Decision(Result.NOOP)
        return _Decision(Result.APPLIED, {"plan_id": change.plan_id}, EVENT_PLAN_CHANGED)
    if kind is Kind.CHANGE_QUANTITY:
        if change.quantity is None or change.quantity == record.quantity:
            return _Decision(Result.NOOP)
        return _Decision(Result.APPLIED, {"quantity": change.quantity}, EVENT_QUANTITY_CHANGED)
    return _Decision(Result.REJECTED, detail=f"unhandled change {kind.value}")  # type: ignore[unreachable]  # a Kind added without a rule


def is_stale(record: SubscriptionRecord, change: Change) -> bool:
    return record.last_event_at is not None and change.occurred_at < record.last_event_at


def apply(record: SubscriptionRecord | None, change: Change, *, now: datetime | None = None) -> Outcome:
    """Apply ``change`` to ``record`` (None: not recorded yet) and say what happened."""
    now = now or utc_now()
    current = record if record is not None else new_record(_subscription_id(change), now)
    if record is not None and change.kind not in HISTORY_ONLY_KINDS and is_stale(record, change):
        decision = _Decision(Result.STALE, detail="older than the last applied change")
    else:
        decision = _decide(current, change)

    updated = current
    if decision.result in (Result.APPLIED, Result.RECORDED):
        updates = dict(decision.updates)
        if decision.result is Result.APPLIED:
            last = current.last_event_at
            updates["last_event_at"] = change.occurred_at if last is None or change.occurred_at > last else last
        if change.kind is Kind.RECORD_PURCHASE and change.actor and not current.signed_in_user:
            updates["signed_in_user"] = change.actor
        updated = replace(current, **updates, updated_at=now)
    elif record is None:
        # A first sighting that changed nothing still creates the record, so history has a home.
        updated = current
    elif decision.result is Result.NOOP and change.kind not in HISTORY_ONLY_KINDS:
        # "Already so" still dates the state: an older event arriving later must be stale (e.g. a
        # Reinstate that found us Subscribed, then the earlier Suspend). Only the ordering clock moves.
        last = current.last_event_at
        if last is None or change.occurred_at > last:
            updated = replace(current, last_event_at=change.occurred_at)
    released = bool(change.release_operation) and current.pending_operation_id == change.release_operation
    if released:
        # Settling a publisher operation frees the subscription for the next one, whatever the
        # state machine made of the change itself (applied, already so, stale or refused).
        updated = replace(updated, pending_operation_id="", updated_at=now)
    updated = replace(updated, history_seq=current.history_seq + 1)

    entry = HistoryEntry(
        seq=updated.history_seq,
        recorded_at=now,
        occurred_at=change.occurred_at,
        kind=change.kind.value,
        source=change.source.value,
        result=decision.result.value,
        from_status=record.status.value if record is not None else "",
        to_status=updated.status.value,
        changes=_diff(record, updated) if released or decision.result in (Result.APPLIED, Result.RECORDED) else {},
        operation_id=change.operation_id,
        correlation_id=change.correlation_id,
        actor=change.actor,
        detail=change.detail or decision.detail,
    )
    event = decision.event if decision.result in (Result.APPLIED, Result.RECORDED) else None
    return Outcome(record=updated, history=entry, result=decision.result, event_type=event, previous=record)


def _subscription_id(change: Change) -> str:
    if change.subscription is not None and change.subscription.id:
        return change.subscription.id
    raise ValueError(f"{change.kind.value} for an unknown subscription needs Microsoft's snapshot")
