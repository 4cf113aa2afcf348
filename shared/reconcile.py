"""Reconciliation: make our records equal Microsoft's again, and tell operators what could not be fixed.

One run:
1. one scan of our table (state rows, pending webhook operations, pending outbox events) into a
   compact in-memory index (a fingerprint per subscription, not the records: bounded memory);
2. page through List subscriptions (from the checkpoint, if the last run ran out of time);
   subscriptions whose fingerprint matches cost nothing; the others are read once and repaired
   through the state machine with source ``reconcile`` (ETag-guarded, re-decided on conflict);
3. stuck work: unconfirmed or failed activations are retried up to a limit and then flagged,
   PendingActivation is flagged for an operator, recorded-but-unapplied webhook operations are
   finished, and InProgress operations of suspended subscriptions past their deadline are settled;
4. a summary is stored and logged as one structured line.

A change applied locally after the listing page was fetched (or within SETTLE_WINDOW before it)
wins over the listing: Microsoft's list can lag behind an operation it just notified us of.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from shared import state_machine as sm
from shared.activation import CLAIM_TIMEOUT, ActivationResult, activate
from shared.domain import OperationStatus, Subscription, SubscriptionStatus, WebhookEvent
from shared.errors import (
    AppError,
    ConflictError,
    MarketplaceBadRequestError,
    MarketplaceError,
    MarketplaceNotFoundError,
    StorageRefusedError,
    StorageUnavailableError,
)
from shared.events import build_event_document
from shared.ids import is_marketplace_id
from shared.observability import current_correlation_id
from shared.repository import OperationMarker
from shared.state_machine import Change, Kind, LocalStatus, Source

if TYPE_CHECKING:
    from shared.publisher_store import PublisherOperation
    from shared.services import Services

log = logging.getLogger(__name__)

SETTLE_WINDOW = timedelta(minutes=2)
EVENT_DELAY_WARNING = timedelta(minutes=15)
DELIVERY_CHART_HOURS = 24  # the hours of lifecycle-event deliveries a run counts (this one included)
FLAG_ACTIVATION_STUCK = "activation_stuck"
# Flags that start with "activation" are cleared by the state machine once the subscription is active.
FLAG_AWAITING_OPERATOR = "activation_awaiting_operator"
FLAG_UNKNOWN_STATUS = "unknown_marketplace_status"
# Microsoft's record cannot be adopted (e.g. it shows Subscribed again after our terminal Unsubscribed).
FLAG_MARKETPLACE_CONFLICT = "marketplace_conflict"
# Storage refuses this subscription's record as invalid (only the run summary can hold the flag).
FLAG_STORAGE_REFUSED = "storage_refused"
# Microsoft listed an id that is not a GUID: never used as a storage key or URL segment.
FLAG_INVALID_ID = "invalid_subscription_id"
# Flags whose reason disappears once Microsoft's record and ours agree again.
SELF_CLEARING_FLAGS = frozenset({FLAG_UNKNOWN_STATUS, FLAG_MARKETPLACE_CONFLICT})
MAX_DIFFERENCES_KEPT = 500
# The stored summary is one Table property (MAX_PAYLOAD_CHARS): keep it well under that, count them all.
MAX_FLAGS_KEPT = 200


def _fingerprint_values(values: dict[str, Any]) -> bytes:
    text = json.dumps({k: sm.jsonable(v) for k, v in sorted(values.items())}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).digest()


def _record_fingerprint(record: sm.SubscriptionRecord) -> bytes:
    return _fingerprint_values({name: getattr(record, name) for name in sm.SNAPSHOT_FIELDS})


def _subscription_fingerprint(subscription: Subscription) -> bytes:
    return _fingerprint_values(sm.snapshot_values(subscription))


@dataclass(frozen=True)
class IndexEntry:
    """What the scan keeps per subscription: enough to tell drift without keeping the record."""

    status: LocalStatus
    fingerprint: bytes
    updated_at: datetime | None
    activation_requested_at: datetime | None
    activation_attempts: int
    flags: tuple[str, ...]


@dataclass
class RunSummary:
    run_id: str
    dry_run: bool
    started_at: str
    started_by: str = ""  # "operator:<user>" for a run started from the console; empty for the timer
    completed: bool = False
    stopped_reason: str = ""
    resumed_from_checkpoint: bool = False
    subscriptions_seen: int = 0
    pages: int = 0
    repairs: dict[str, int] = field(default_factory=dict)
    flagged: list[dict[str, str]] = field(default_factory=list)
    flagged_count: int = 0  # all of them; ``flagged`` lists the first MAX_FLAGS_KEPT
    deferred: int = 0
    confirmed_with_get: int = 0  # drifts inside the settle window settled by one Get Subscription
    events_waiting_too_long: int = 0
    events_pending: int = 0
    events_delivered: int = 0
    events_failed: int = 0
    # Lifecycle events delivered in the DELIVERY_CHART_HOURS before the run, by UTC hour
    # ("2026-12-03T16:00Z"): read by the same scan; the console charts them.
    delivered_by_hour: dict[str, int] = field(default_factory=dict)
    publisher_operations_pending: int = 0  # publisher changes not settled when the run started
    publisher_operations_settled: int = 0
    by_status: dict[str, int] = field(default_factory=dict)  # our records by local status, as scanned
    differences: list[dict[str, Any]] = field(default_factory=list)
    duration_seconds: float = 0.0
    marketplace_calls: int = 0
    storage_reads: int = 0
    storage_writes: int = 0

    def count(self, kind: str) -> None:
        self.repairs[kind] = self.repairs.get(kind, 0) + 1

    def flag(self, subscription_id: str, reason: str) -> None:
        self.flagged_count += 1
        if len(self.flagged) < MAX_FLAGS_KEPT:
            self.flagged.append({"subscriptionId": subscription_id, "reason": reason})

    def to_json(self, *, with_differences: bool = False) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "differences"}
        data["repairs_total"] = sum(self.repairs.values())
        if with_differences:
            data["differences"] = self.differences
        return data


REPLAY_APPLIED, REPLAY_DEFERRED, REPLAY_UNVERIFIABLE = "applied", "deferred", "unverifiable"


class _OutOfTime(Exception):
    pass


class Reconciler:
    def __init__(self, services: Services, *, dry_run: bool = False, time_budget_seconds: float | None = None, actor: str = ""):
        self.services = services
        self.actor = actor  # who started the run: recorded on every history entry it writes
        self.settings = services.settings
        self.repository = services.repository
        self.marketplace = services.marketplace
        self.dry_run = dry_run
        self.budget = time_budget_seconds if time_budget_seconds is not None else self.settings.reconcile_time_budget_seconds
        self._started = time.monotonic()
        now = services.clock()
        self.summary = RunSummary(
            run_id=current_correlation_id() or now.isoformat(), dry_run=dry_run, started_at=now.isoformat(), started_by=actor
        )
        self.index: dict[str, IndexEntry] = {}
        self.pending_markers: list[OperationMarker] = []
        self.publisher_operations: list[PublisherOperation] = []
        self._checkpoint_link: str | None = None

    # -- helpers -------------------------------------------------------------------------------

    def _out_of_time(self) -> bool:
        return time.monotonic() - self._started > self.budget

    def _change(self, kind: Kind, occurred_at: datetime, **extra) -> Change:
        return Change(
            kind=kind,
            source=Source.RECONCILE,
            occurred_at=occurred_at,
            correlation_id=current_correlation_id(),
            actor=self.actor,
            **extra,
        )

    def _difference(self, subscription_id: str, kind: str, detail: Any) -> None:
        if len(self.summary.differences) < MAX_DIFFERENCES_KEPT:
            self.summary.differences.append({"subscriptionId": subscription_id, "kind": kind, "detail": detail})

    # -- phases --------------------------------------------------------------------------------

    def _index(self, record: sm.SubscriptionRecord) -> None:
        self.index[record.id] = IndexEntry(
            record.status,
            _record_fingerprint(record),
            record.updated_at,
            record.activation_requested_at,
            record.activation_attempts,
            record.flags,
        )

    def scan(self) -> None:
        now = self.services.clock()
        since = (now - timedelta(hours=DELIVERY_CHART_HOURS - 1)).replace(minute=0, second=0, microsecond=0)
        for item in self.repository.scan(delivered_since=since):
            if item.kind == "delivered" and item.event is not None:
                if item.event.delivered_at is not None:
                    hour = item.event.delivered_at.astimezone(UTC).strftime("%Y-%m-%dT%H:00Z")
                    self.summary.delivered_by_hour[hour] = self.summary.delivered_by_hour.get(hour, 0) + 1
            elif item.stored is not None:
                self._index(item.stored.record)
                status = item.stored.record.status.value
                self.summary.by_status[status] = self.summary.by_status.get(status, 0) + 1
            elif item.marker is not None:
                self.pending_markers.append(item.marker)
            elif item.publisher_operation is not None:
                self.publisher_operations.append(item.publisher_operation)
                self.summary.publisher_operations_pending += 1
            elif item.event is not None:
                self.summary.events_pending += 1
                if item.event.created_at and now - item.event.created_at > EVENT_DELAY_WARNING:
                    self.summary.events_waiting_too_long += 1

    def compare_listing(self, start_link: str | None) -> None:
        link = start_link
        pages = self.marketplace.list_subscription_pages(start_link)
        while True:
            fetched_at = self.services.clock()
            try:
                page, next_link = next(pages)
            except StopIteration:
                return
            self.summary.pages += 1
            for subscription in page:
                self.summary.subscriptions_seen += 1
                if not is_marketplace_id(subscription.id):
                    # Not a key storage accepts nor a URL segment we send: flag it, touch nothing.
                    self.summary.flag(subscription.id[:100], FLAG_INVALID_ID)
                    log.error("OPERATOR ACTION NEEDED: Microsoft listed a subscription whose id is not a GUID")
                    continue
                try:
                    self.compare(subscription, fetched_at)
                except ConflictError:
                    # It kept changing under us (every write lost the ETag race): the next run looks again.
                    log.warning("subscription %s kept changing during reconciliation; deferred", subscription.id)
                    self.summary.deferred += 1
                except StorageRefusedError:
                    # A poison record (storage refuses it as invalid): one subscription must not stop the
                    # run for all the others. Flagged in the run summary, which storage still accepts.
                    log.error("OPERATOR ACTION NEEDED: storage refused the record of subscription %s", subscription.id)
                    self.summary.flag(subscription.id, FLAG_STORAGE_REFUSED)
            link = next_link
            if link and self._out_of_time():
                self._checkpoint_link = link
                raise _OutOfTime()
            if not link:
                return

    def compare(self, subscription: Subscription, fetched_at: datetime) -> None:
        entry = self.index.get(subscription.id)
        if entry is None:
            self._difference(subscription.id, "missing_locally", subscription.status.value)
            self._repair(subscription, fetched_at, "recorded_new")
            return
        target = sm.status_for_snapshot(entry.status, subscription.status)
        if target is None:
            self._flag(subscription.id, FLAG_UNKNOWN_STATUS, fetched_at, entry)
            return
        in_step = target is entry.status and _subscription_fingerprint(subscription) == entry.fingerprint
        if in_step:
            for flag in SELF_CLEARING_FLAGS & set(entry.flags):
                self._clear_flag(subscription.id, flag, fetched_at)
        else:
            kind = "status_drift" if target is not entry.status else "detail_drift"
            self._difference(subscription.id, kind, {"local": entry.status.value, "marketplace": subscription.status.value})
            self._repair(subscription, fetched_at, kind)
        if subscription.status is SubscriptionStatus.PENDING_FULFILLMENT_START:
            self._stuck_activation(subscription.id, entry, fetched_at)
        elif subscription.status is SubscriptionStatus.SUSPENDED:
            self._settle_overdue_operations(subscription.id)

    def _repair(self, subscription: Subscription, fetched_at: datetime, kind: str) -> None:
        if self.dry_run:
            self.summary.count(kind)
            return
        # Microsoft's list can lag behind a change it just notified us of: a local change inside the
        # settle window wins over the listing ...
        result = self._apply_snapshot(subscription, fetched_at, kind, local_wins_after=fetched_at - SETTLE_WINDOW)
        if result == "deferred":
            # ... but one Get Subscription (which does not lag) settles it in this run, instead of
            # leaving a real drift (e.g. a lost Suspend right after another change) to the next run.
            result = self._confirm_with_get(subscription.id, kind)
        if result == "deferred":
            self.summary.deferred += 1
        elif result == "applied":
            self.summary.count(kind)

    def _confirm_with_get(self, subscription_id: str, kind: str) -> str:
        asked_at = self.services.clock()
        try:
            current = self.marketplace.get_subscription(subscription_id)
        except MarketplaceError as error:
            log.info("could not confirm drift of %s in this run (%s); the next run looks again", subscription_id, error.code)
            return "deferred"
        self.summary.confirmed_with_get += 1
        # Only a local change made after the Get was sent can be newer than its answer.
        return self._apply_snapshot(current, asked_at, kind, local_wins_after=asked_at)

    def _apply_snapshot(self, subscription: Subscription, fetched_at: datetime, kind: str, *, local_wins_after: datetime) -> str:
        """Adopt Microsoft's record through the state machine: "applied", "deferred", "in_step" or "refused"."""
        change = self._change(Kind.SYNC, fetched_at, subscription=subscription, detail=kind)
        verdict = {"value": "in_step"}

        def decide(record: sm.SubscriptionRecord | None) -> sm.Outcome | None:
            verdict["value"] = "in_step"
            if record is None:
                return sm.apply(None, change, now=self.services.clock())
            if not sm.drift(record, subscription):
                return None
            if record.updated_at and record.updated_at > local_wins_after:
                verdict["value"] = "deferred"  # a newer local change wins
                return None
            outcome = sm.apply(record, change, now=self.services.clock())
            if outcome.result is not sm.Result.APPLIED:
                # Rejected or stale: writing that history entry would repeat on every run.
                verdict["value"] = "rejected" if outcome.result is sm.Result.REJECTED else "deferred"
                return None
            return outcome

        outcome = self.repository.apply(subscription.id, decide, build_event=build_event_document)
        if outcome is not None and outcome.result is sm.Result.APPLIED:
            return "applied"
        if verdict["value"] == "rejected":
            self._flag(subscription.id, FLAG_MARKETPLACE_CONFLICT, fetched_at, self.index.get(subscription.id))
            return "refused"
        return verdict["value"]

    def _flag(self, subscription_id: str, reason: str, at: datetime, entry: IndexEntry | None) -> None:
        self.summary.flag(subscription_id, reason)
        if self.dry_run or (entry is not None and reason in entry.flags):
            return
        change = self._change(Kind.FLAG, at, flag=reason, detail=reason)
        self.repository.apply(
            subscription_id,
            lambda record: sm.apply(record, change, now=self.services.clock()) if record else None,
            build_event=build_event_document,
        )

    def _clear_flag(self, subscription_id: str, reason: str, at: datetime) -> None:
        """Microsoft and we agree again: the flag's reason is gone."""
        self._difference(subscription_id, "flag_cleared", reason)
        if self.dry_run:
            self.summary.count("flag_cleared")
            return
        change = self._change(Kind.CLEAR_FLAG, at, flag=reason, detail=reason)
        outcome = self.repository.apply(
            subscription_id, lambda record: sm.apply(record, change, now=self.services.clock()) if record else None
        )
        if outcome is not None and outcome.result is sm.Result.RECORDED:
            self.summary.count("flag_cleared")

    def _stuck_activation(self, subscription_id: str, entry: IndexEntry, at: datetime) -> None:
        status = entry.status
        if status is LocalStatus.PENDING_ACTIVATION:
            self._flag(subscription_id, FLAG_AWAITING_OPERATOR, at, entry)
            return
        if status not in (LocalStatus.ACTIVATION_REQUESTED, LocalStatus.ACTIVATION_FAILED):
            return
        requested = entry.activation_requested_at
        if requested is not None and at - requested < CLAIM_TIMEOUT:
            return  # just sent; Microsoft needs a moment
        resent = max(entry.activation_attempts - 1, 0)  # the first attempt was the buyer's (or the operator's)
        if resent >= self.settings.reconcile_activation_retry_limit:
            self._flag(subscription_id, FLAG_ACTIVATION_STUCK, at, entry)
            return
        self._difference(subscription_id, "activation_retry", {"attempts": entry.activation_attempts})
        if self.dry_run:
            self.summary.count("activation_retried")
            return
        result = activate(
            self.services, subscription_id, actor=self.actor or "reconciler", source=Source.RECONCILE, force_retry=True
        )
        self.summary.count(
            "activation_confirmed"
            if result.result in (ActivationResult.ACTIVATED, ActivationResult.ALREADY_ACTIVE)
            else "activation_retried"
        )

    def _settle_overdue_operations(self, subscription_id: str) -> None:
        """A Reinstate nobody answered keeps a subscription Suspended forever: settle it."""
        deadline = timedelta(seconds=self.settings.reconcile_operation_deadline_seconds)
        now = self.services.clock()
        for operation in self.marketplace.list_outstanding_operations(subscription_id):
            if operation.status is not OperationStatus.IN_PROGRESS:
                continue
            if operation.request_source.lower() == "partner":
                continue  # the publisher's own change: followed as a publisher operation, never answered
            if operation.timestamp and now - operation.timestamp < deadline:
                continue
            self._difference(subscription_id, "overdue_operation", {"operationId": operation.id, "action": operation.action_name})
            if self.dry_run:
                self.summary.count("operation_settled")
                continue
            self._finish_operation(subscription_id, operation.id, operation.raw)
            self.summary.count("operation_settled")

    def _finish_operation(self, subscription_id: str, operation_id: str, payload: Mapping[str, Any]) -> None:
        from shared.webhook import apply_operation

        event = WebhookEvent.from_api(
            {**payload, "id": operation_id, "subscriptionId": subscription_id, "action": payload.get("action") or "Unknown"}
        )
        operation = self.marketplace.get_operation(subscription_id, operation_id)
        if self.repository.get_marker(subscription_id, operation_id) is None:
            self.repository.record_operation(
                subscription_id,
                operation_id,
                action=operation.action_name,
                payload=json.dumps(payload),
                correlation_id=current_correlation_id(),
            )
        apply_operation(self.services, event, operation)

    def replay_operations(self, *, all_pending: bool = False) -> None:
        """Finish webhook operations that were recorded but never applied (a crash, an outage)."""
        deadline = timedelta(seconds=self.settings.reconcile_operation_deadline_seconds)
        now = self.services.clock()
        for marker in self.pending_markers:
            if not all_pending and marker.received_at and now - marker.received_at < deadline:
                continue  # probably still being handled by a webhook delivery
            self._difference(
                marker.subscription_id, "unapplied_operation", {"operationId": marker.operation_id, "action": marker.action}
            )
            if self.dry_run:
                self.summary.count("operation_replayed")
                continue
            outcome = self.replay_marker(marker)
            if outcome == REPLAY_DEFERRED:
                self.summary.deferred += 1
                continue
            if outcome == REPLAY_UNVERIFIABLE:
                self._difference(marker.subscription_id, "unverifiable_operation", {"operationId": marker.operation_id})
                self.summary.count("operation_unverifiable")
                continue
            self.summary.count("operation_replayed")
            stored = self.repository.get(marker.subscription_id)  # the listing compares with what replay left
            if stored is not None:
                self._index(stored.record)
            if self._out_of_time():
                raise _OutOfTime()

    def replay_marker(self, marker: OperationMarker) -> str:
        """Apply one recorded-but-unapplied webhook operation: REPLAY_APPLIED, REPLAY_DEFERRED (the
        subscription kept changing; the next run tries again) or REPLAY_UNVERIFIABLE (settled)."""
        try:
            payload = json.loads(marker.payload or "{}")
        except ValueError:
            payload = {}
        try:
            self._finish_operation(marker.subscription_id, marker.operation_id, payload if isinstance(payload, dict) else {})
        except ConflictError:
            log.warning(
                "operation %s of %s: the subscription kept changing; the next run replays it",
                marker.operation_id,
                marker.subscription_id,
            )
            return REPLAY_DEFERRED
        except (MarketplaceNotFoundError, MarketplaceBadRequestError) as error:
            # Microsoft does not confirm this operation (unverified webhook, purged operation):
            # settle the marker so it stops blocking every run; the listing repairs any drift.
            log.warning("operation %s of %s cannot be replayed: %s", marker.operation_id, marker.subscription_id, error)
            self.repository.settle_marker(marker, "unverifiable")
            return REPLAY_UNVERIFIABLE
        return REPLAY_APPLIED

    def follow_publisher_operations(self) -> None:
        """Publisher changes not settled yet: ask Microsoft once each and settle the final ones
        (also claims whose request died before Microsoft's operation id was recorded)."""
        from shared.publisher import follow_operation

        for pending in self.publisher_operations:
            self._difference(pending.subscription_id, "publisher_operation_open", {"operationId": pending.id})
            if self.dry_run:
                continue
            try:
                operation = follow_operation(self.services, pending.subscription_id, pending.id)
            except ConflictError:
                self.summary.deferred += 1
                continue
            except MarketplaceError as error:
                log.info("publisher operation %s: %s; the next run looks again", pending.id, error.code)
                continue
            if operation is not None and operation.settled:
                self.summary.publisher_operations_settled += 1
                self.summary.count("publisher_operation_settled")
                stored = self.repository.get(pending.subscription_id)
                if stored is not None:
                    self._index(stored.record)
            if self._out_of_time():
                raise _OutOfTime()

    def relay_events(self) -> None:
        """Deliver lifecycle events that are still waiting (the inline delivery's safety net)."""
        if self.dry_run or not self.summary.events_pending:
            return
        remaining = max(5.0, self.budget - (time.monotonic() - self._started))
        stats = self.services.events.relay_pending(time_budget_seconds=min(60.0, remaining))
        self.summary.events_delivered += stats.delivered
        self.summary.events_failed += stats.failed

    def replay_pending(self, *, all_pending: bool = True) -> RunSummary:
        """Scan, then finish recorded-but-unapplied webhook operations (the operator's ``replay``).

        ``all_pending`` also takes markers younger than RECONCILE_OPERATION_DEADLINE_SECONDS. No
        listing and no stored run summary; errors end the pass cleanly like a run's.
        """
        with self._measured():
            try:
                self.scan()
                self.replay_operations(all_pending=all_pending)
                self.summary.completed = True
            except _OutOfTime:
                self.summary.stopped_reason = "time_budget"
            except (MarketplaceError, StorageUnavailableError) as error:
                self.summary.stopped_reason = f"{error.code}: {error.message}"
                log.error("replay stopped: %s", error)
        return self.summary

    @contextmanager
    def _measured(self) -> Iterator[None]:
        """Fill the summary's duration, Marketplace calls and storage reads/writes for the block."""
        metrics, counter = self.repository.metrics, self.marketplace.counter
        reads0, writes0, calls0 = metrics.reads, metrics.writes, counter.total
        try:
            yield
        finally:
            self.summary.duration_seconds = round(time.monotonic() - self._started, 3)
            self.summary.marketplace_calls = counter.total - calls0
            self.summary.storage_reads = metrics.reads - reads0
            self.summary.storage_writes = metrics.writes - writes0

    # -- run -------------------------------------------------------------------------------------

    def _run_phases(self) -> None:
        repository = self.repository
        try:
            checkpoint = None if self.dry_run else repository.get_checkpoint()
            start_link = (checkpoint or {}).get("next_link") or None
            self.summary.resumed_from_checkpoint = bool(start_link)
            self.scan()
            self.replay_operations()
            self.follow_publisher_operations()
            try:
                self.compare_listing(start_link)
            except (MarketplaceBadRequestError, MarketplaceNotFoundError) as error:
                if not start_link or self.summary.pages:
                    raise
                log.warning("the checkpoint's continuation link was refused (%s); listing from the start", error)
                self.summary.resumed_from_checkpoint = False
                self.compare_listing(None)
            self.relay_events()
            self.summary.completed = True
            if not self.dry_run and checkpoint:
                repository.save_checkpoint(None)
        except _OutOfTime:
            self.summary.stopped_reason = "time_budget"
            if not self.dry_run and self._checkpoint_link:
                repository.save_checkpoint({"next_link": self._checkpoint_link, "run_id": self.summary.run_id})
        except (MarketplaceError, StorageUnavailableError) as error:
            self.summary.stopped_reason = f"{error.code}: {error.message}"
            log.error("reconciliation stopped: %s", error)

    def run(self) -> RunSummary:
        repository = self.repository
        self._checkpoint_link = None
        with self._measured():
            self._run_phases()
        if not self.dry_run:
            try:
                repository.save_run_summary(self.summary.to_json())
                self.summary.storage_writes += 1
            except AppError:
                log.error("could not store the reconciliation summary")
        level = logging.WARNING if (self.summary.flagged or not self.summary.completed) else logging.INFO
        log.log(level, "reconcile summary %s", json.dumps(self.summary.to_json(), sort_keys=True))
        return self.summary


def run_reconciliation(
    services: Services, *, dry_run: bool = False, time_budget_seconds: float | None = None, actor: str = ""
) -> RunSummary:
    return Reconciler(services, dry_run=dry_run, time_budget_seconds=time_budget_seconds, actor=actor).run()
