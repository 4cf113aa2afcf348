"""Metered billing: usage reported by the SaaS application reaches Microsoft exactly once, hour by hour.

Ingest (``POST /api/usage``, :func:`report_usage`): each event is checked (known subscription,
``Subscribed`` at the usage time, positive finite quantity, inside Microsoft's 24-hour window, a
dimension of the plan in force when Microsoft lists the plan's dimensions) and stored as its own
row, insert only, in the partition of its subscription and UTC hour (shared/usage_store.py). A
caller's ``id`` is counted once wherever it lands. The answer (202) comes after every accepted row
and the emitter's work-list row are written.

Emission (``metering_timer``, :func:`run_metering`): every closed hour with usage not yet settled,
oldest first, within a time budget. Per (subscription, hour, dimension) one event, the exact sum of
its rows (decimal arithmetic), sent with ``batchUsageEvent`` 25 at a time. Microsoft's answer is
recorded per bucket: ``Accepted`` (or ``Duplicate`` of the same quantity, e.g. after a lost answer)
settles it; refusals and a ``Duplicate`` of another quantity are flagged for a person and never
re-sent blindly; 429, 5xx and timeouts leave it pending for the next run. An hour about to leave the
24-hour window unsent is logged loudly (``usage_near_expiry``); one that left it is ``Expired``.

Plan rule: each reported event keeps the plan in force at its own time (from the subscription's
history). Microsoft keeps one event per resource, dimension and hour and checks ``planId`` against
the subscription's plan, so an hour split by a plan change is sent once, under the plan in force at
the hour's latest usage of that dimension.

Late usage (rows that reach an hour after its bucket was settled) never makes a second event for
that hour: by default it is carried into the earliest open hour (the current one) and recorded on
both buckets; ``METERING_LATE_USAGE=unbillable`` records it on the old bucket as unbillable instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from decimal import ROUND_DOWN, Decimal
from functools import partial
from typing import TYPE_CHECKING, Any

from shared.api_auth import ROLE_USAGE_WRITE
from shared.deadline import deadline_scope
from shared.domain import (
    QUANTITY_SIGNIFICANT_DIGITS,
    UsageEvent,
    UsageResult,
    UsageStatus,
    decimal_text,
    format_timestamp,
    parse_timestamp,
    quantity_of,
)
from shared.errors import (
    AppError,
    BadRequestError,
    ConfigurationError,
    DeadlineExceededError,
    MarketplaceError,
    PayloadTooLargeError,
    UsageResultsUnmatchedError,
)
from shared.ids import MARKETPLACE_ID
from shared.observability import current_correlation_id
from shared.parallel import run_parallel
from shared.state_machine import Change, Kind, LocalStatus, Source
from shared.usage_store import (
    ACCEPTED,
    CARRIED,
    EXPIRED,
    FLAGGED,
    SENT_PENDING,
    UNBILLABLE,
    Bucket,
    Carry,
    HourPartition,
    IdRecord,
    PendingHour,
    UsageRow,
    UsageStore,
    event_key,
    hour_key,
    hour_of,
    partition_of,
    shard_of,
)

if TYPE_CHECKING:
    from shared.publisher import ApiResult
    from shared.services import Services

log = logging.getLogger(__name__)

MAX_EVENTS_PER_CALL = 1000
MAX_USAGE_BODY_BYTES = 1024 * 1024
MAX_QUANTITY = Decimal("1000000000000")  # 1e12 per event: beyond any real hour; a typo, not usage
USAGE_WINDOW = timedelta(hours=24)  # Microsoft accepts an hour for 24 hours
FUTURE_TOLERANCE = timedelta(minutes=5)  # clock skew between the caller and us
DIMENSIONS_CACHE_SECONDS = 3600.0  # a plan's dimensions change only when the offer is republished
DIMENSIONS_RETRY_SECONDS = 60.0  # after Microsoft could not list them
RECORD_CACHE_SECONDS = 30.0
RECORD_CACHE_SIZE = 50_000
SEND_DEADLINE_SECONDS = 30.0  # one batchUsageEvent call, its retries included
EMIT_CHUNK_SHARDS = 16  # hour shards read, sent and recorded per step of a run
# Threads per concurrent storage step, started and joined by that step (shared/parallel.py), so
# each costs its start on every step and many concurrent requests multiply them: 100 calls of 2 ms
# took 29 ms wall / 7 ms CPU on 10 threads and 21 ms / 12.5 ms on 32 (2 cores).
STORAGE_WORKERS = 10
_DIMENSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}")
_EVENT_ID = re.compile(r"[A-Za-z0-9._:@\-]{1,128}")
_LATE_MODES = ("carry", "unbillable")

# Reasons an event is refused at ingest (the ``reason`` of its result)
INVALID_EVENT = "invalid_event"
INVALID_SUBSCRIPTION_ID = "invalid_subscription_id"
INVALID_DIMENSION = "invalid_dimension"
INVALID_QUANTITY = "invalid_quantity"
INVALID_TIME = "invalid_effective_start_time"
INVALID_ID = "invalid_id"
FUTURE_TIME = "effective_start_time_in_future"
EXPIRED_TIME = "effective_start_time_too_old"
UNKNOWN_SUBSCRIPTION = "unknown_subscription"
NOT_SUBSCRIBED = "not_subscribed"
UNKNOWN_DIMENSION = "unknown_dimension"
ID_REUSED = "id_reused"
QUANTITY_PRECISION = "quantity_precision"
STORAGE_UNAVAILABLE = "storage_unavailable"


# ---------------------------------------------------------------------------------------------
# ingest


def exact_in_double(amount: Decimal) -> bool:
    """True when a double (the type of Microsoft's ``quantity``) carries ``amount`` unchanged."""
    try:
        return Decimal(repr(float(amount))) == amount
    except (OverflowError, ValueError):
        return False


def billable_part(total: Decimal) -> Decimal:
    """The largest part of an hour's total that Microsoft can keep exactly: the total itself when a
    double carries it, else the total cut to QUANTITY_SIGNIFICANT_DIGITS (the rest is carried on)."""
    if exact_in_double(total):
        return total
    exponent = total.adjusted() - QUANTITY_SIGNIFICANT_DIGITS + 1
    return total.quantize(Decimal(1).scaleb(exponent), rounding=ROUND_DOWN)


@dataclass(frozen=True)
class ReportedUsage:
    """One event of a report, well-formed (not yet checked against the subscription)."""

    index: int
    subscription_id: str
    dimension: str
    quantity: Decimal
    at: datetime
    event_id: str
    caller_id: bool  # the id is the caller's (idempotency), not one we made up
    timed: bool  # the caller gave effectiveStartTime (else the hour is the time we received it)


@dataclass
class _Outcome:
    index: int
    event_id: str
    status: str  # accepted | refused | failed
    reason: str = ""
    message: str = ""
    subscription_id: str = ""
    dimension: str = ""
    hour: datetime | None = None
    plan_id: str = ""
    duplicate: bool = False

    def to_api(self) -> dict[str, Any]:
        body: dict[str, Any] = {"index": self.index, "id": self.event_id or None, "status": self.status}
        if self.status == "accepted":
            body.update(
                subscriptionId=self.subscription_id,
                dimension=self.dimension,
                hour=format_timestamp(self.hour),
                planId=self.plan_id,
                duplicate=self.duplicate,
            )
        else:
            body.update(reason=self.reason, message=self.message)
        return body


def _refused(index: int, event_id: str, reason: str, message: str) -> _Outcome:
    return _Outcome(index, event_id, "refused", reason, message)


def _parse_event(index: int, raw: Any, now: datetime) -> ReportedUsage | _Outcome:
    if not isinstance(raw, dict):
        return _refused(index, "", INVALID_EVENT, "each event must be a JSON object")
    given_id = raw.get("id")
    event_id = given_id if isinstance(given_id, str) else ""
    if given_id is not None and not (isinstance(given_id, str) and _EVENT_ID.fullmatch(given_id)):
        return _refused(index, "", INVALID_ID, "id must be 1-128 characters: letters, digits and . _ : @ -")
    subscription_id = raw.get("subscriptionId")
    if not (isinstance(subscription_id, str) and MARKETPLACE_ID.fullmatch(subscription_id)):
        return _refused(index, event_id, INVALID_SUBSCRIPTION_ID, "subscriptionId must be a Marketplace subscription id (GUID)")
    dimension = raw.get("dimension")
    if not (isinstance(dimension, str) and _DIMENSION.fullmatch(dimension)):
        return _refused(index, event_id, INVALID_DIMENSION, "dimension must be a dimension id (letters, digits, . _ -)")
    amount = quantity_of(raw.get("quantity"))  # the body was read with Decimal numbers: exact
    if amount is None or amount <= 0:
        return _refused(index, event_id, INVALID_QUANTITY, "quantity must be a number greater than 0")
    if amount > MAX_QUANTITY:
        return _refused(index, event_id, INVALID_QUANTITY, f"quantity must be at most {MAX_QUANTITY}")
    if not exact_in_double(amount):
        return _refused(
            index,
            event_id,
            QUANTITY_PRECISION,
            f"quantity {decimal_text(amount)[:40]} cannot be billed exactly: Microsoft's API keeps quantities as doubles "
            f"(at most {QUANTITY_SIGNIFICANT_DIGITS} significant digits always survive); round it in the application",
        )
    at = now
    if raw.get("effectiveStartTime") is not None:
        parsed = parse_timestamp(raw.get("effectiveStartTime")) if isinstance(raw.get("effectiveStartTime"), str) else None
        if parsed is None:
            return _refused(index, event_id, INVALID_TIME, "effectiveStartTime must be an ISO 8601 UTC date-time")
        at = parsed
    if at > now + FUTURE_TOLERANCE:
        return _refused(index, event_id, FUTURE_TIME, "effectiveStartTime is in the future")
    if now - hour_of(at) >= USAGE_WINDOW:
        return _refused(index, event_id, EXPIRED_TIME, "effectiveStartTime is older than Microsoft accepts (24 hours)")
    timed = raw.get("effectiveStartTime") is not None
    return ReportedUsage(index, subscription_id.lower(), dimension, amount, at, event_id, bool(event_id), timed)


def parse_usage_body(body: bytes, now: datetime) -> list[ReportedUsage | _Outcome]:
    """The events of a report; the whole call is refused only when the body itself is wrong."""
    if len(body) > MAX_USAGE_BODY_BYTES:
        raise PayloadTooLargeError(f"the body is larger than {MAX_USAGE_BODY_BYTES} bytes")
    try:
        # Numbers as Decimal: usage is billed, so never through a float (and no int-size limits).
        document = json.loads(body, parse_float=Decimal, parse_int=Decimal)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
        raise BadRequestError("the body is not JSON", code="malformed_json") from None
    events = document.get("events") if isinstance(document, dict) else None
    if not isinstance(events, list) or not events:
        raise BadRequestError('the body must be {"events": [ ... ]} with at least one event', code="no_events")
    if len(events) > MAX_EVENTS_PER_CALL:
        raise BadRequestError(f"at most {MAX_EVENTS_PER_CALL} events per call", code="too_many_events")
    return [_parse_event(index, raw, now) for index, raw in enumerate(events)]


def state_at(record: Any, history: Sequence[dict[str, Any]], at: datetime) -> tuple[str, str]:
    """(local status, plan id) of a subscription at ``at``: the record, with later changes undone."""
    status, plan = record.status.value, record.plan_id
    for entry in reversed(history):
        if entry.get("result") != "applied":
            continue
        occurred = parse_timestamp(entry.get("occurredAt"))
        if occurred is None or occurred <= at:
            continue
        changes = entry.get("changes") or {}
        if "status" in changes:
            status = changes["status"][0] or ""
        if "plan_id" in changes:
            plan = changes["plan_id"][0] or ""
    return status, plan


class _Expiring:
    """Values kept for a while (monotonic time), shared by threads; at most ``bound`` entries kept
    before the expired ones are dropped."""

    def __init__(self, bound: int = RECORD_CACHE_SIZE) -> None:
        self._entries: dict[Any, tuple[float, Any]] = {}
        self._lock = threading.Lock()
        self._bound = bound

    def get(self, key: Any) -> tuple[bool, Any]:
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None and entry[0] > time.monotonic():
            return True, entry[1]
        return False, None

    def put(self, key: Any, value: Any, seconds: float) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._entries) > self._bound:
                self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
            self._entries[key] = (now + seconds, value)


class _DimensionsCache:
    """The metering dimensions of each (offer, plan), from List available plans; None when unknown."""

    def __init__(self) -> None:
        self._entries = _Expiring()
        self._fetching = threading.Lock()  # one List available plans at a time: a burst asks once

    def get(self, services: Services, subscription_id: str, offer_id: str, plan_id: str) -> frozenset[str] | None:
        key = (offer_id, plan_id)
        found, value = self._entries.get(key)
        if found:
            return value
        with self._fetching:
            found, value = self._entries.get(key)
            return value if found else self._fetch(services, subscription_id, key)

    def _fetch(self, services: Services, subscription_id: str, key: tuple[str, str]) -> frozenset[str] | None:
        offer_id = key[0]
        try:
            plans = services.marketplace.list_available_plans(subscription_id)
        except (MarketplaceError, DeadlineExceededError) as error:
            # Microsoft will refuse an unknown dimension at emission (flagged); ingest never waits on it.
            log.warning("could not list plans of %s to check dimensions: %s", subscription_id, error.code)
            self._entries.put(key, None, DIMENSIONS_RETRY_SECONDS)
            return None
        found: dict[tuple[str, str], frozenset[str] | None] = {key: None}
        for plan in plans:
            components = plan.raw.get("planComponents") if isinstance(plan.raw, dict) else None
            dimensions = components.get("meteringDimensions") if isinstance(components, dict) else None
            ids = frozenset(str(d.get("id")) for d in dimensions or [] if isinstance(d, dict) and d.get("id"))
            # An empty list is treated as "not provided": Microsoft decides at emission.
            found[(offer_id, plan.plan_id)] = ids or None
        for each, value in found.items():
            self._entries.put(each, value, DIMENSIONS_CACHE_SECONDS)
        return found[key]


class _RecordCache:
    """Subscription records read by ingest, kept RECORD_CACHE_SECONDS: reporters send many calls a
    minute for the same subscriptions. Usage reported in those seconds after a suspension or
    cancellation is still caught at emission (Microsoft answers ResourceNotActive: flagged)."""

    def __init__(self) -> None:
        self._entries = _Expiring()

    def get(self, services: Services, subscription_id: str) -> Any:
        found, stored = self._entries.get(subscription_id)
        if found:
            return stored
        stored = services.repository.get(subscription_id)
        if stored is not None:  # not cached: a subscription recorded a moment later is found at once
            self._entries.put(subscription_id, stored, RECORD_CACHE_SECONDS)
        return stored


def usage_store(services: Services) -> UsageStore:
    store = services.usage_store
    if store is None:
        raise ConfigurationError(["this services bundle has no usage store"])
    return store


def parallel_storage(calls: Iterable[Callable[[], Any]]) -> list[Any]:
    """Storage calls run concurrently on STORAGE_WORKERS threads, joined before this returns."""
    return run_parallel(calls, workers=STORAGE_WORKERS)


def _check_subscription(
    services: Services, subscription_id: str, items: list[ReportedUsage]
) -> list[tuple[ReportedUsage, str] | _Outcome]:
    """Each item with the plan in force at its time, or its refusal."""
    stored = services.once("usage_records", _RecordCache).get(services, subscription_id)
    if stored is None:
        return [
            _refused(i.index, i.event_id, UNKNOWN_SUBSCRIPTION, f"subscription {subscription_id} is not known here")
            for i in items
        ]
    record = stored.record
    earliest = min(item.at for item in items)
    changed_since = record.last_event_at is not None and record.last_event_at > earliest
    history = services.repository.history(subscription_id) if changed_since else []
    dimensions_cache = services.once("usage_dimensions", _DimensionsCache)
    checked: list[tuple[ReportedUsage, str] | _Outcome] = []
    for item in items:
        status, plan_id = state_at(record, history, item.at) if changed_since else (record.status.value, record.plan_id)
        if status != LocalStatus.SUBSCRIBED.value:
            checked.append(
                _refused(
                    item.index, item.event_id, NOT_SUBSCRIBED, f"the subscription was {status or 'not created yet'} at that time"
                )
            )
            continue
        dimensions = dimensions_cache.get(services, subscription_id, record.offer_id, plan_id)
        if dimensions is not None and item.dimension not in dimensions:
            checked.append(
                _refused(item.index, item.event_id, UNKNOWN_DIMENSION, f"plan {plan_id} has no dimension {item.dimension}")
            )
            continue
        checked.append((item, plan_id))
    return checked


def _failed(index: int, event_id: str) -> _Outcome:
    """Not stored (storage failed or the deadline passed): the caller sends it again, same id."""
    return _Outcome(index, event_id, "failed", STORAGE_UNAVAILABLE, "not recorded; send it again")


def _store(
    services: Services, accepted: list[tuple[str, ReportedUsage, str]], caller: str, now: datetime
) -> tuple[list[_Outcome], set[tuple[datetime, str]]]:
    """Write the accepted events ((subscription, item, plan)); their results and the (hour, shard)s written.

    A caller's id counts once wherever it lands: every id is claimed first in the shard's id rows
    (``i|<shard>``, kept for good, so far beyond Microsoft's 24-hour window), with the hour, dimension
    and quantity it was counted with. A repeat (the same call retried, the same event again with
    another ``effectiveStartTime``, or without one after an hour turned) goes to the hour where it
    was first counted and is a duplicate, counted once; another dimension or quantity is
    ``id_reused``. Events without an id get one of ours and are never deduplicated. Rows go in
    transactions of up to 100."""
    store = usage_store(services)
    # 1. the caller's ids, distinct, claimed per shard (the first occurrence in this call decides)
    claims: dict[tuple[str, str], IdRecord] = {}
    for sid, item, plan_id in accepted:
        if item.caller_id and (sid, item.event_id) not in claims:
            claims[(sid, item.event_id)] = IdRecord(
                item.event_id, hour_of(item.at), item.dimension, item.quantity, plan_id, item.at
            )
    by_shard: dict[str, list[tuple[str, IdRecord]]] = defaultdict(list)
    for (sid, _), record in claims.items():
        by_shard[shard_of(sid)].append((sid, record))

    def claim(shard: str) -> tuple[str, dict[tuple[str, str], IdRecord] | None]:
        try:
            return shard, store.claim_ids(shard, by_shard[shard])
        except AppError as error:
            log.warning("usage ids of shard %s not recorded: %s", shard, error.code)
            return shard, None

    earlier: dict[tuple[str, str], IdRecord] = {}
    failed_shards: set[str] = set()
    for shard, found in parallel_storage([partial(claim, shard) for shard in by_shard]):
        if found is None:
            failed_shards.add(shard)
        else:
            earlier.update(found)
    # where each id counts: the earlier call's record, else this call's first occurrence
    counted = {**claims, **earlier}

    # 2. the rows, per partition; a repeat is compared with where the id was counted
    results: list[_Outcome] = []
    rows: dict[str, dict[str, tuple[str, datetime, UsageRow]]] = defaultdict(dict)  # partition -> RowKey -> row
    members: dict[str, list[int]] = defaultdict(list)  # partition -> positions in results
    for sid, item, plan_id in accepted:
        if (sid, item.event_id) in claims and shard_of(sid) in failed_shards:
            results.append(_failed(item.index, item.event_id))
            continue
        hour = hour_of(item.at)
        event_id = item.event_id or f"auto-{uuid.uuid4().hex}"
        row = UsageRow(item.dimension, event_id, item.quantity, plan_id, item.at, now, caller)
        outcome = _Outcome(
            item.index, event_id, "accepted", subscription_id=sid, dimension=item.dimension, hour=hour, plan_id=plan_id
        )
        first = counted.get((sid, event_id)) if item.caller_id else None
        if first is not None:
            if (first.dimension, first.quantity) != (item.dimension, item.quantity):
                results.append(
                    _refused(item.index, event_id, ID_REUSED, "this id was reported before with another dimension or quantity")
                )
                continue
            hour, plan_id = first.hour, first.plan_id
            row = UsageRow(first.dimension, event_id, first.quantity, first.plan_id, first.effective_start_time, now, caller)
            outcome = replace(outcome, hour=hour, plan_id=plan_id)
        partition, key = partition_of(sid, hour), event_key(sid, event_id)
        seen = rows[partition].get(key)
        if seen is not None:
            outcome = replace(outcome, duplicate=True)
        else:
            rows[partition][key] = (sid, hour, row)
        members[partition].append(len(results))
        results.append(outcome)

    def insert(partition: str) -> tuple[str, dict[str, UsageRow] | None]:
        try:
            return partition, store.insert_events(partition, list(rows[partition].values()))
        except AppError as error:
            log.warning("usage rows of %s not recorded: %s", partition, error.code)
            return partition, None

    written: set[tuple[datetime, str]] = set()
    for partition, existing in parallel_storage([partial(insert, partition) for partition in rows]):
        for position in members[partition]:
            outcome = results[position]
            if existing is None:
                results[position] = _failed(outcome.index, outcome.event_id)
                continue
            stored = existing.get(event_key(outcome.subscription_id, outcome.event_id))
            if stored is None:
                continue
            # The row was there before this call: the same event again (counted once), or an id reused.
            if (stored.dimension, stored.quantity) == (outcome.dimension, _quantity_of(rows, partition, outcome)):
                results[position] = replace(outcome, duplicate=True, plan_id=stored.plan_id)
            else:
                results[position] = _refused(
                    outcome.index, outcome.event_id, ID_REUSED, "this id was reported before with another dimension or quantity"
                )
        if existing is not None:
            sid, hour, _ = next(iter(rows[partition].values()))
            written.add((hour, shard_of(sid)))
    return results, written


def _quantity_of(rows: dict[str, dict[str, tuple[str, datetime, UsageRow]]], partition: str, outcome: _Outcome) -> Decimal:
    return rows[partition][event_key(outcome.subscription_id, outcome.event_id)][2].quantity


def report_usage(services: Services, body: bytes, *, caller: str) -> ApiResult:
    """Check and store a usage report; per-event results (see the module docstring)."""
    from shared.publisher import ApiResult

    now = services.clock()
    parsed = parse_usage_body(body, now)
    outcomes: list[_Outcome] = [p for p in parsed if isinstance(p, _Outcome)]
    by_subscription: dict[str, list[ReportedUsage]] = defaultdict(list)
    for item in parsed:
        if isinstance(item, ReportedUsage):
            by_subscription[item.subscription_id].append(item)

    def check(subscription_id: str, items: list[ReportedUsage]) -> list[tuple[ReportedUsage, str] | _Outcome]:
        try:
            return _check_subscription(services, subscription_id, items)
        except AppError as error:
            log.warning("usage for %s not checked: %s", subscription_id, error.code)
            return [_failed(item.index, item.event_id) for item in items]

    accepted: list[tuple[str, ReportedUsage, str]] = []
    for subscription_id, checked in zip(
        by_subscription, parallel_storage([partial(check, s, i) for s, i in by_subscription.items()]), strict=True
    ):
        for entry in checked:
            if isinstance(entry, _Outcome):
                outcomes.append(entry)
            else:
                accepted.append((subscription_id, entry[0], entry[1]))
    stored, written = _store(services, accepted, caller, now)
    outcomes += stored
    try:
        usage_store(services).mark_pending(written)
    except AppError as error:
        # The rows exist but the emitter would not look at them: the caller sends again (same ids: counted once).
        log.warning("usage work list not updated: %s", error.code)
        outcomes = [_failed(o.index, o.event_id) if o.status == "accepted" else o for o in outcomes]
    outcomes.sort(key=lambda o: o.index)
    accepted_count = sum(1 for o in outcomes if o.status == "accepted")
    refused = sum(1 for o in outcomes if o.status == "refused")
    failed = len(outcomes) - accepted_count - refused
    log.info("usage report: %s accepted, %s refused, %s failed (caller %s)", accepted_count, refused, failed, caller)
    status = 503 if failed and not accepted_count and not refused else 202
    body_out = {"accepted": accepted_count, "refused": refused, "failed": failed, "results": [o.to_api() for o in outcomes]}
    return ApiResult(status, body_out, {"Retry-After": "5"} if status == 503 else {})


def api_report_usage(services: Services, authorization: str | None, body: bytes) -> ApiResult:
    from shared.publisher import _authenticator

    caller = _authenticator(services).authenticate(authorization, ROLE_USAGE_WRITE)
    with deadline_scope(services.settings.usage_api_deadline_seconds):
        return report_usage(services, body, caller=caller.id)


# ---------------------------------------------------------------------------------------------
# emission


@dataclass
class MeteringSummary:
    """One run. ``hours_*`` and ``pending_hours`` count rows of the work list: an hour of one shard
    (a sixteenth of the subscriptions), not an hour of one subscription."""

    hours_listed: int = 0
    hours_settled: int = 0
    buckets_sent: int = 0
    accepted: int = 0
    duplicates_matched: int = 0
    flagged: int = 0
    expired: int = 0
    retry: int = 0
    calls: int = 0
    late_carried: int = 0
    late_carried_quantity: Decimal = Decimal(0)
    late_unbillable: int = 0
    late_unbillable_quantity: Decimal = Decimal(0)
    # hours that could not be accepted in their own hour (Expired, persistent failures, the window
    # closed while we were down), carried into the next open hour
    carried_forward: int = 0
    carried_forward_quantity: Decimal = Decimal(0)
    # what a Duplicate's kept quantity or a double's precision left over, carried into the next open hour
    shortfall_carried: int = 0
    shortfall_carried_quantity: Decimal = Decimal(0)
    item_errors: int = 0  # per-item Error answers (sent again)
    unmatched_answers: int = 0  # batch answers whose results did not match the request (sent again)
    emission: str = "on"  # on | off (METERING_EMISSION) | endpoint_missing (404 on the route itself)
    near_expiry: int = 0
    events_written: int = 0
    budget_exhausted: bool = False
    pending_hours: int = 0
    oldest_pending_hours: float | None = None
    oldest_pending_hour: str | None = None
    flagged_total: int = 0
    seconds: float = 0.0
    by_status: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: decimal_text(v) if isinstance(v, Decimal) else v for k, v in asdict(self).items()}


# Microsoft's per-item answers that are definitive: sending the same event again cannot succeed.
DEFINITIVE_REFUSALS = frozenset(
    {
        UsageStatus.RESOURCE_NOT_FOUND,
        UsageStatus.RESOURCE_NOT_AUTHORIZED,
        UsageStatus.RESOURCE_NOT_ACTIVE,
        UsageStatus.INVALID_DIMENSION,
        UsageStatus.INVALID_QUANTITY,
        UsageStatus.BAD_ARGUMENT,
    }
)
# After a failed attempt with less than this left of the hour's 24-hour window, the next hourly
# run could come too late: the hour is carried into the current one instead.
LAST_CHANCE = timedelta(minutes=65)
_endpoint_missing_logged = False


@dataclass
class _HourWork:
    """One subscription's hour within a shard being emitted."""

    partition: HourPartition
    to_send: dict[str, tuple[UsageEvent, Bucket]] = field(default_factory=dict)
    changed: dict[str, Bucket] = field(default_factory=dict)
    written: dict[str, Bucket] = field(default_factory=dict)
    unsettled: bool = False


@dataclass
class _ShardWork:
    """One row of the work list: an hour and shard, and the subscriptions in it."""

    pending: PendingHour
    hours: list[_HourWork]
    unanswered: int = 0  # items sent and not answered yet


def _totals(partition: HourPartition) -> dict[str, tuple[Decimal, Decimal, int, str]]:
    """Per dimension: (total, carried in, events, plan of the latest usage)."""
    totals: dict[str, tuple[Decimal, Decimal, int, str]] = {}
    latest: dict[str, datetime] = {}
    for row in partition.rows:
        total, carried, events, plan = totals.get(row.dimension, (Decimal(0), Decimal(0), 0, ""))
        at = row.effective_start_time or partition.hour
        if row.dimension not in latest or at >= latest[row.dimension]:
            latest[row.dimension], plan = at, row.plan_id
        totals[row.dimension] = (total + row.quantity, carried, events + 1, plan)
    for carry in partition.carries:
        total, carried, events, plan = totals.get(carry.dimension, (Decimal(0), Decimal(0), 0, ""))
        totals[carry.dimension] = (total + carry.quantity, carried + carry.quantity, events, plan or carry.plan_id)
    return totals


class Emitter:
    """One metering run (see the module docstring)."""

    def __init__(self, services: Services, *, time_budget_seconds: float | None = None):
        self.services = services
        self.store = usage_store(services)
        self.settings = services.settings
        self.budget = float(
            time_budget_seconds if time_budget_seconds is not None else self.settings.metering_time_budget_seconds
        )
        self.summary = MeteringSummary()
        self.now = services.clock()
        self.current_hour = hour_of(self.now)

    def run(self) -> MeteringSummary:
        started = time.monotonic()
        if self.settings.metering_emission == "off":
            # Usage is still taken in and kept; nothing is sent, nothing is carried or spent.
            self.summary.emission = "off"
            log.info("metering emission is off (METERING_EMISSION=off): usage stays pending")
            self._finish(started)
            return self.summary
        pending = self.store.list_pending(self.current_hour)
        self.summary.hours_listed = len(pending)
        # Items of many subscriptions and hours share a batch, and a partial batch waits for the next
        # chunk's items, so a run makes ceil(buckets / 25) calls; a shard is recorded once all its
        # items are answered.
        queued: list[tuple[_ShardWork, _HourWork, str]] = []
        for start in range(0, len(pending), EMIT_CHUNK_SHARDS):
            if self.summary.emission != "on":
                break  # the metering route is not there: the rest waits, untouched
            if time.monotonic() - started > self.budget:
                self.summary.budget_exhausted = True
                log.warning("metering run stopped by its time budget; %s hour shards left for the next run", len(pending) - start)
                break
            shards = parallel_storage([partial(self._plan, p) for p in pending[start : start + EMIT_CHUNK_SHARDS]])
            ready = []
            for shard in shards:
                items = [(shard, work, dimension) for work in shard.hours for dimension in sorted(work.to_send)]
                shard.unanswered = len(items)
                queued.extend(items)
                if not items:
                    ready.append(shard)
            last = start + EMIT_CHUNK_SHARDS >= len(pending)
            ready += self._send_batches(queued, everything=last)
            parallel_storage([partial(self._record, shard) for shard in ready])
        parallel_storage([partial(self._record, shard) for shard in self._send_batches(queued, everything=True)])
        self._finish(started)
        return self.summary

    def _send_batches(self, queued: list[tuple[_ShardWork, _HourWork, str]], *, everything: bool) -> list[_ShardWork]:
        """Send the queued items 25 at a time (all of them, or only full batches); the shards now complete."""
        complete: list[_ShardWork] = []
        while len(queued) >= 25 or (everything and queued):
            batch, queued[:] = queued[:25], queued[25:]
            self._send([(work, dimension) for _, work, dimension in batch])
            for shard, _, _ in batch:
                shard.unanswered -= 1
                if shard.unanswered == 0:
                    complete.append(shard)
        return complete

    def _plan(self, pending: PendingHour) -> _ShardWork:
        partitions = self.store.read_shard(pending.hour, pending.shard)
        return _ShardWork(pending, [self._plan_hour(partition) for _, partition in sorted(partitions.items())])

    def _plan_hour(self, partition: HourPartition) -> _HourWork:
        work = _HourWork(partition)
        hour, subscription_id = partition.hour, partition.subscription_id
        expires_at = hour + USAGE_WINDOW
        warning = timedelta(hours=self.settings.metering_expiry_warning_hours)
        for dimension, (total, carried_in, events, plan) in sorted(_totals(partition).items()):
            bucket = partition.buckets.get(dimension) or Bucket(subscription_id, hour, dimension)
            if bucket.settled:
                continue  # late usage of a settled bucket: _record handles it
            total -= bucket.carried_out + bucket.unbillable  # what earlier decisions moved out (a requeued bucket)
            if total <= 0:
                continue
            billable = billable_part(total)
            bucket = replace(
                bucket, plan_id=plan, quantity=billable, shortfall=total - billable, events=events, carried_in=carried_in
            )
            if self.now >= expires_at:
                work.changed[dimension] = self._carry_forward(bucket, "the 24-hour window closed before Microsoft accepted it")
                continue
            if expires_at - self.now <= warning:
                self.summary.near_expiry += 1
                log.error(
                    "usage_near_expiry: subscription %s hour %s dimension %s quantity %s is unsent and expires at %s",
                    subscription_id,
                    format_timestamp(hour),
                    dimension,
                    total,
                    format_timestamp(expires_at),
                )
            work.to_send[dimension] = (UsageEvent(subscription_id, plan, dimension, billable, hour), bucket)
        return work

    def _carry_forward(self, bucket: Bucket, why: str) -> Bucket:
        """The whole hour goes into the current (open) hour: recorded here as Carried, there as carried in."""
        total = bucket.quantity + bucket.shortfall
        return replace(
            bucket,
            status=CARRIED,
            quantity=Decimal(0),  # nothing billed in this hour
            shortfall=total,
            message=f"{why}; carried into {format_timestamp(self.current_hour)}",
        )

    def _last_chance(self, bucket: Bucket) -> bool:
        return bucket.hour + USAGE_WINDOW - self.now < LAST_CHANCE

    def _send(self, items: list[tuple[_HourWork, str]]) -> None:
        global _endpoint_missing_logged
        events = [work.to_send[dimension][0] for work, dimension in items]
        if self.summary.emission != "on":
            for work, _ in items:
                work.unsettled = True  # kept pending, untouched: the window is not spent on a route that is not there
            return
        self.summary.calls += 1
        try:
            with deadline_scope(SEND_DEADLINE_SECONDS):
                results: list[UsageResult] | None = self.services.marketplace.batch_usage_event(events)
        except MarketplaceError as error:
            if error.status == 404:
                # batchUsageEvent answers per-item ResourceNotFound inside a 200: a 404 is the route itself.
                self.summary.emission = "endpoint_missing"
                if not _endpoint_missing_logged:
                    _endpoint_missing_logged = True
                    log.error(
                        "metering_endpoint_missing: %s answered 404 for batchUsageEvent (Microsoft's SaaS emulator has no "
                        "metering API); usage stays pending. Set METERING_EMISSION=off to stop trying.",
                        self.services.settings.marketplace_api_base_url,
                    )
                for work, _ in items:
                    work.unsettled = True
                return
            if isinstance(error, UsageResultsUnmatchedError):
                self.summary.unmatched_answers += 1
            log.warning("batchUsageEvent failed (%s); %s buckets stay pending for the next run", error.code, len(events))
            results = None
        except DeadlineExceededError as error:
            log.warning("batchUsageEvent failed (%s); %s buckets stay pending for the next run", error.code, len(events))
            results = None
        for position, (work, dimension) in enumerate(items):
            event, bucket = work.to_send[dimension]
            bucket = replace(bucket, attempts=bucket.attempts + 1, sent_at=self.now)
            self.summary.buckets_sent += 1
            if results is None:
                bucket = replace(bucket, status=SENT_PENDING, message="no answer from Microsoft; sent again next run")
            else:
                bucket = self._settle(bucket, event, results[position])
            if bucket.status == FLAGGED:  # a person decides on the hour's whole total
                bucket = replace(bucket, quantity=bucket.quantity + bucket.shortfall, shortfall=Decimal(0))
            if bucket.status == SENT_PENDING and self._last_chance(bucket):
                bucket = self._carry_forward(bucket, f"not accepted before its window closes ({bucket.message})")
            work.changed[dimension] = bucket

    def _settle(self, bucket: Bucket, event: UsageEvent, result: UsageResult) -> Bucket:
        status = result.status
        self.summary.by_status[status.value] = self.summary.by_status.get(status.value, 0) + 1
        bucket = replace(bucket, marketplace_status=status.value, message=result.error_message)
        if status is UsageStatus.ACCEPTED:
            return replace(bucket, status=ACCEPTED, usage_event_id=result.usage_event_id)
        if status is UsageStatus.DUPLICATE:
            return self._duplicate(bucket, result)
        if status is UsageStatus.EXPIRED:
            return self._carry_forward(bucket, f"Microsoft answered Expired ({result.error_message or 'older than 24 hours'})")
        if status is UsageStatus.ERROR:
            self.summary.item_errors += 1
            return replace(bucket, status=SENT_PENDING, message=f"Microsoft answered Error: {result.error_message}; sent again")
        why = result.error_message or f"Microsoft answered {status.value}"
        if status not in DEFINITIVE_REFUSALS:
            why = f"Microsoft answered a status this app does not know ({result.raw.get('status')!r}): {why}"
        return replace(bucket, status=FLAGGED, message=why)

    def _duplicate(self, bucket: Bucket, result: UsageResult) -> Bucket:
        """Microsoft already holds this hour: what it kept (``error.additionalInfo.acceptedMessage``),
        compared exactly with what we sent."""
        kept, ours = result.kept_quantity, bucket.quantity
        kept_id = result.kept_usage_event_id
        if kept is None:
            return replace(bucket, status=FLAGGED, message="Microsoft answered Duplicate without the event it kept")
        if kept == ours:
            self.summary.duplicates_matched += 1
            return replace(bucket, status=ACCEPTED, usage_event_id=kept_id, message="Microsoft already had this hour")
        if 0 < kept < ours:
            # An earlier send of ours (its answer lost) before more usage reached the hour: Microsoft
            # bills what it kept; the rest is owed to the next open hour.
            self.summary.duplicates_matched += 1
            return replace(
                bucket,
                status=ACCEPTED,
                quantity=kept,
                shortfall=bucket.shortfall + (ours - kept),
                usage_event_id=kept_id,
                message=f"Microsoft kept {decimal_text(kept)}; the {decimal_text(ours - kept)} more is carried into the next open hour",
            )
        return replace(
            bucket,
            status=FLAGGED,
            usage_event_id=kept_id,
            message=f"Microsoft already holds {decimal_text(kept)} for this hour; our total is {decimal_text(ours)}",
        )

    # -- recording ---------------------------------------------------------------------------------

    def _record(self, shard: _ShardWork) -> None:
        pending = shard.pending
        try:
            # The lifecycle events first: they are exactly once by their content, so a bucket recorded
            # as settled always has its event, and a run that stops in between writes it once.
            for work in shard.hours:
                settled = [b for b in work.changed.values() if b.settled]
                self._notify(work.partition.subscription_id, pending.hour, settled)
            changed = [bucket for work in shard.hours for bucket in work.changed.values()]
            written = self.store.write_buckets(changed)
            for work in shard.hours:
                sid = work.partition.subscription_id
                work.written = {d: written[(sid, d)] for d in work.changed if (sid, d) in written}
                if len(work.written) < len(work.changed):
                    log.info(
                        "usage buckets of %s %s changed under this run; the next run looks again", sid, hour_key(pending.hour)
                    )
                    work.unsettled = True
                for bucket in work.written.values():
                    self._count(bucket)
                self._late_usage(work, {**work.partition.buckets, **work.written})
            if any(w.unsettled or not all(b.settled for b in {**w.partition.buckets, **w.written}.values()) for w in shard.hours):
                return
            if self.store.settle_pending(pending):
                self.summary.hours_settled += 1
        except AppError as error:
            log.warning(
                "usage of hour %s shard %s not recorded completely (%s); the next run finishes it",
                hour_key(pending.hour),
                pending.shard,
                error.code,
            )

    def _count(self, bucket: Bucket) -> None:
        if bucket.status == ACCEPTED:
            self.summary.accepted += 1
        elif bucket.status == SENT_PENDING:
            self.summary.retry += 1
        elif bucket.status == CARRIED:
            log.warning(
                "usage_carried_forward: subscription %s hour %s dimension %s quantity %s: %s",
                bucket.subscription_id,
                format_timestamp(bucket.hour),
                bucket.dimension,
                bucket.shortfall,
                bucket.message,
            )
        else:
            if bucket.status == EXPIRED:
                self.summary.expired += 1
            else:
                self.summary.flagged += 1
            log.error(
                "usage_flagged: subscription %s hour %s dimension %s quantity %s: %s %s",
                bucket.subscription_id,
                format_timestamp(bucket.hour),
                bucket.dimension,
                bucket.quantity,
                bucket.status,
                bucket.message,
            )
            self.store.flag(bucket)

    def _late_usage(self, work: _HourWork, buckets: Mapping[str, Bucket]) -> None:
        """Usage of a settled bucket not held in it: what it owes (shortfall, Carried) always goes
        into the current hour; usage that reached it after it was sent is carried or unbillable
        (METERING_LATE_USAGE)."""
        totals = _totals(work.partition)
        for dimension, bucket in sorted(buckets.items()):
            if not bucket.settled:
                continue
            total, _, _, plan = totals.get(dimension, (Decimal(0), Decimal(0), 0, bucket.plan_id))
            loose = total - bucket.quantity - bucket.carried_out - bucket.unbillable
            if loose <= 0:
                continue
            owed = min(loose, max(Decimal(0), bucket.shortfall - bucket.carried_out))
            late = loose - owed
            to_carry = owed + (late if self.settings.metering_late_usage == "carry" else Decimal(0))
            updated = bucket
            if late > 0 and self.settings.metering_late_usage == "unbillable":
                updated = replace(updated, unbillable=updated.unbillable + late)
                self.summary.late_unbillable += 1
                self.summary.late_unbillable_quantity += late
                log.warning(
                    "late usage of %s %s %s recorded unbillable: %s",
                    bucket.subscription_id,
                    hour_key(bucket.hour),
                    dimension,
                    late,
                )
            if to_carry > 0:
                into = self.current_hour
                carry = Carry(dimension, hour_key(bucket.hour), bucket.carry_count + 1, to_carry, plan or bucket.plan_id)
                carried = self.store.insert_carry(bucket.subscription_id, into, carry)
                self.store.mark_pending([(into, shard_of(bucket.subscription_id))])
                updated = replace(updated, carried_out=updated.carried_out + carried, carry_count=carry.number)
                owed_part, late_part = min(owed, carried), max(Decimal(0), carried - owed)
                if bucket.status == CARRIED and owed_part:
                    self.summary.carried_forward += 1
                    self.summary.carried_forward_quantity += owed_part
                elif owed_part:
                    self.summary.shortfall_carried += 1
                    self.summary.shortfall_carried_quantity += owed_part
                if late_part:
                    self.summary.late_carried += 1
                    self.summary.late_carried_quantity += late_part
                log.info(
                    "usage of %s %s %s (%s) carried into %s",
                    bucket.subscription_id,
                    hour_key(bucket.hour),
                    dimension,
                    carried,
                    hour_key(into),
                )
            if (bucket.subscription_id, dimension) not in self.store.write_buckets([updated]):
                work.unsettled = True  # another run moved it: look again next run

    def _notify(self, subscription_id: str, hour: datetime, settled: list[Bucket]) -> None:
        """One lifecycle event per outcome for the buckets this run settled (a Carried hour has none
        here: its usage is accepted or refused in the hour it went to)."""
        accepted = [b for b in settled if b.status == ACCEPTED]
        rejected = [b for b in settled if b.status not in (ACCEPTED, CARRIED)]
        for kind, group in ((Kind.USAGE_ACCEPTED, accepted), (Kind.USAGE_REJECTED, rejected)):
            if group and write_usage_event(self.services, subscription_id, hour, kind, group):
                self.summary.events_written += 1

    def _finish(self, started: float) -> None:
        try:
            count, oldest = self.store.count_pending()
            self.summary.pending_hours = count
            if oldest is not None:
                self.summary.oldest_pending_hours = round((self.now - oldest).total_seconds() / 3600, 2)
                self.summary.oldest_pending_hour = format_timestamp(oldest)
            self.summary.flagged_total = self.store.count_flagged()
            self.summary.seconds = round(time.monotonic() - started, 3)
            self.store.save_summary({**self.summary.to_json(), "ranAt": format_timestamp(self.now)})
        except AppError as error:
            log.warning("metering run summary not saved: %s", error.code)
        s = self.summary
        log.info(
            "metering run: %s hour shards listed, %s settled; %s buckets sent in %s calls: %s accepted (%s duplicates matched), "
            "%s flagged, %s carried forward, %s to retry (%s item errors); late usage %s carried, %s unbillable; %s near expiry; "
            "%s hour shards pending, %s flagged in all; emission %s",
            s.hours_listed,
            s.hours_settled,
            s.buckets_sent,
            s.calls,
            s.accepted,
            s.duplicates_matched,
            s.flagged,
            s.carried_forward,
            s.retry,
            s.item_errors,
            s.late_carried,
            s.late_unbillable,
            s.near_expiry,
            s.pending_hours,
            s.flagged_total,
            s.emission,
        )


def write_usage_event(services: Services, subscription_id: str, hour: datetime, kind: Kind, buckets: Sequence[Bucket]) -> bool:
    """A history entry and lifecycle event (``usage.accepted`` / ``usage.rejected``) for settled buckets;
    False when it was written before.

    The operation marker's id is derived from the hour and what was settled (dimension, outcome,
    quantity), so a run that stopped before recording the buckets, and sends them again (Microsoft
    answers ``Duplicate``), finds the marker and writes no second event."""
    from shared import state_machine as sm
    from shared.events import build_event_document

    usage = [
        {
            "hour": format_timestamp(b.hour),
            "dimension": b.dimension,
            "planId": b.plan_id,
            "quantity": float(b.quantity),
            "status": b.status,
            "marketplaceStatus": b.marketplace_status,
            "usageEventId": b.usage_event_id or None,
            "message": b.message,
        }
        for b in sorted(buckets, key=lambda b: b.dimension)
    ]
    settled = sorted((b.dimension, b.status, str(b.quantity)) for b in buckets)
    digest = hashlib.sha256(json.dumps([kind.value, settled]).encode()).hexdigest()[:24]
    marker = f"usage-{hour_key(hour)}-{digest}"
    change = Change(
        kind=kind,
        source=Source.METERING,
        occurred_at=services.clock(),
        correlation_id=current_correlation_id(),
        detail=json.dumps(usage),
    )

    def decide(record: sm.SubscriptionRecord | None) -> sm.Outcome | None:
        if record is None:
            return None
        return sm.apply(record, change, now=services.clock())

    return services.repository.apply(subscription_id, decide, operation_id=marker, build_event=build_event_document) is not None


def run_metering(services: Services, *, time_budget_seconds: float | None = None) -> MeteringSummary:
    return Emitter(services, time_budget_seconds=time_budget_seconds).run()


# ---------------------------------------------------------------------------------------------
# operators


def usage_view(services: Services, subscription_id: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """The buckets of a subscription between two hours, each with its reported total.

    The usage table is laid out by hour, so each hour is its own query; they run concurrently
    (the console's subscription page reads 25 of them)."""
    out = []
    store, subscription_id = usage_store(services), subscription_id.lower()
    shard, hour, last = shard_of(subscription_id), hour_of(start), hour_of(end)
    hours = []
    while hour <= last:
        hours.append(hour)
        hour += timedelta(hours=1)
    read = parallel_storage(partial(store.read_shard, h, shard, subscription_id) for h in hours)
    for partition in (found[subscription_id] for found in read if subscription_id in found):
        for dimension, (total, carried_in, events, plan) in sorted(_totals(partition).items()):
            bucket = partition.buckets.get(dimension)
            view = bucket.to_api() if bucket else Bucket(subscription_id, partition.hour, dimension, plan_id=plan).to_api()
            view.update(reported=float(total - carried_in), reportedEvents=events, status=view["status"] if bucket else "Unsent")
            out.append(view)
    return out


FLAGGED_ACTIONS = {
    "requeue": "send it again as it is (once the cause is fixed at Microsoft or in the plan)",
    "move": "carry it into the current hour (sent when that hour closes)",
    "unbillable": "write it off: recorded, never billed",
}


def resolve_flagged_usage(
    services: Services, subscription_id: str, hour: datetime, dimension: str, action: str, *, actor: str
) -> dict[str, Any]:
    """An operator's decision on a flagged bucket (FLAGGED_ACTIONS); recorded in the subscription's
    history as ``actor``. Only a flagged (or, from before carrying existed, expired) bucket moves."""
    from shared import state_machine as sm
    from shared.errors import ConflictError, NotFoundError
    from shared.ids import require_marketplace_id

    if action not in FLAGGED_ACTIONS:
        raise BadRequestError(f"action must be one of {', '.join(FLAGGED_ACTIONS)}", code="unknown_action")
    store = usage_store(services)
    sid = require_marketplace_id(subscription_id, "subscription id")
    hour = hour_of(hour)
    bucket = store.read_bucket(sid, hour, dimension)
    if bucket is None:
        raise NotFoundError("no usage of this subscription, hour and dimension is recorded", code="unknown_usage")
    if bucket.status not in (FLAGGED, EXPIRED):
        raise ConflictError(f"this usage is {bucket.status}, not flagged: nothing to decide", code="usage_not_flagged")
    now = services.clock()
    quantity = bucket.quantity
    note = f"{action} by {actor}"
    if action == "requeue":
        updated = replace(bucket, status=SENT_PENDING, marketplace_status="", message=f"requeued by {actor}")
    elif action == "move":
        into = hour_of(now)
        carry = Carry(dimension, hour_key(hour), bucket.carry_count + 1, quantity, bucket.plan_id)
        carried = store.insert_carry(sid, into, carry)
        store.mark_pending([(into, shard_of(sid))])
        updated = replace(
            bucket,
            status=CARRIED,
            quantity=Decimal(0),
            shortfall=quantity,
            carried_out=bucket.carried_out + carried,
            carry_count=carry.number,
            message=f"moved into {format_timestamp(into)} by {actor}",
        )
        note = f"moved into {format_timestamp(into)} by {actor}"
    else:
        updated = replace(
            bucket,
            status=UNBILLABLE,
            quantity=Decimal(0),
            unbillable=bucket.unbillable + quantity,
            message=f"written off by {actor}",
        )
    if (sid, dimension) not in store.write_buckets([updated]):
        raise ConflictError("this usage changed while you decided; look again", code="usage_changed")
    if action == "requeue":
        store.mark_pending([(hour, shard_of(sid))])
    store.unflag(sid, hour, dimension)
    detail = f"flagged usage {format_timestamp(hour)} {dimension} {decimal_text(quantity)} ({bucket.marketplace_status}): {note}"
    change = Change(
        kind=Kind.OPERATOR_ACTION,
        source=Source.OPERATOR,
        occurred_at=now,
        correlation_id=current_correlation_id(),
        actor=actor,
        detail=detail,
    )
    services.repository.apply(sid, lambda record: sm.apply(record, change, now=now) if record else None)
    log.info("usage: %s", detail)
    return {"subscriptionId": sid, "hour": format_timestamp(hour), "dimension": dimension, "action": action, **updated.to_api()}
