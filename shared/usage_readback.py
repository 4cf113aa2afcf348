"""Read-back: what Microsoft says it billed, compared with what we recorded accepted, day by day.

Microsoft's ``GET /api/usageEvents`` answers daily aggregates per (resource, dimension, plan, day):
``submittedQuantity``, ``processedQuantity``, ``submittedCount`` and a ``reconStatus``
(``Submitted``, ``Accepted``, ``Rejected``, ``Mismatch``, ``TestHeaders``, ``DryRun``). Once a day
(``usage_reconcile_timer`` on ``USAGE_RECONCILE_SCHEDULE``, or ``usage reconcile`` in the CLI) the
last closed UTC days are read and compared per (subscription, dimension, day) with the sum of our
buckets recorded ``Accepted`` in that day's hours (what Microsoft confirmed per event, carried-in
usage included: it is billed in the hour it went to). Every quantity is an exact Decimal.

A row is ``Match``; ``Test`` (a test or dry-run purchase, or Microsoft's ``TestHeaders`` /
``DryRun``: never revenue); ``Processing`` (Microsoft still says ``Submitted`` and the submitted
quantity is ours); or a difference: ``Difference`` (quantities differ), ``MissingAtMicrosoft``,
``UnknownToUs``, ``Rejected`` or ``Mismatch`` (Microsoft's own verdicts). Results are stored per day
(``recon|<yyyymmdd>``, docs/storage.md), differences are logged as ``usage_readback_difference``
(alerted), and each subscription with a difference gets one ``usage.mismatch`` lifecycle event per
distinct finding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import TYPE_CHECKING, Any

from shared.domain import decimal_text, format_timestamp
from shared.errors import AppError, DeadlineExceededError, MarketplaceError
from shared.metering import parallel_storage, usage_store
from shared.observability import current_correlation_id
from shared.state_machine import Change, Kind, Source
from shared.usage_store import ACCEPTED, SHARDS

if TYPE_CHECKING:
    from shared.services import Services

log = logging.getLogger(__name__)

MATCH = "Match"
TEST = "Test"
PROCESSING = "Processing"
DIFFERENCE = "Difference"
MISSING_AT_MICROSOFT = "MissingAtMicrosoft"
UNKNOWN_TO_US = "UnknownToUs"
REJECTED = "Rejected"
MISMATCH = "Mismatch"
DIFFERENCES = frozenset({DIFFERENCE, MISSING_AT_MICROSOFT, UNKNOWN_TO_US, REJECTED, MISMATCH})
TEST_RECON_STATUSES = frozenset({"testheaders", "dryrun"})
READBACK_DEADLINE_SECONDS = 60.0  # one usageEvents call, its retries included


@dataclass
class ReadBackRow:
    """One (subscription, dimension, day): ours beside Microsoft's."""

    day: str
    subscription_id: str
    dimension: str
    plan_id: str = ""
    ours: Decimal = Decimal(0)
    ours_hours: int = 0
    submitted: Decimal | None = None
    processed: Decimal | None = None
    submitted_count: int = 0
    recon_status: str = ""
    test: bool = False
    status: str = MATCH

    @property
    def differs(self) -> bool:
        return self.status in DIFFERENCES

    def to_api(self) -> dict[str, Any]:
        return {
            "day": self.day,
            "subscriptionId": self.subscription_id,
            "dimension": self.dimension,
            "planId": self.plan_id,
            "ours": decimal_text(self.ours),
            "oursHours": self.ours_hours,
            "submitted": "" if self.submitted is None else decimal_text(self.submitted),
            "processed": "" if self.processed is None else decimal_text(self.processed),
            "submittedCount": self.submitted_count,
            "reconStatus": self.recon_status,
            "test": self.test,
            "status": self.status,
        }


@dataclass
class ReadBackSummary:
    days: list[str] = field(default_factory=list)
    rows: int = 0
    matched: int = 0
    differences: int = 0
    rejected: int = 0
    test_rows: int = 0
    processing: int = 0
    revenue_ours: Decimal = Decimal(0)  # accepted quantity of real (non-test) purchases, all dimensions
    revenue_microsoft: Decimal = Decimal(0)  # Microsoft's processed quantity of the same
    events_written: int = 0
    hour_queries: int = 0
    marketplace_calls: int = 0
    error: str = ""
    seconds: float = 0.0
    found: list[dict[str, Any]] = field(default_factory=list)  # the differences (first 50)

    def to_json(self) -> dict[str, Any]:
        return {k: decimal_text(v) if isinstance(v, Decimal) else v for k, v in asdict(self).items()}


def closed_days(now: datetime, count: int) -> list[date]:
    """The ``count`` last closed UTC days, oldest first (today is still being billed)."""
    today = now.astimezone(UTC).date()
    return [today - timedelta(days=n) for n in range(count, 0, -1)]


def _ours(services: Services, days: list[date]) -> tuple[dict[tuple[str, str, str], ReadBackRow], int]:
    """Our accepted buckets summed per (subscription, dimension, day); and the hour shards read."""
    store = usage_store(services)
    hours = [
        (datetime(d.year, d.month, d.day, tzinfo=UTC) + timedelta(hours=h), f"{shard:02d}")
        for d in days
        for h in range(24)
        for shard in range(SHARDS)
    ]
    rows: dict[tuple[str, str, str], ReadBackRow] = {}
    for buckets in parallel_storage([partial(store.read_hour_buckets, hour, shard) for hour, shard in hours]):
        for bucket in buckets:
            if bucket.status != ACCEPTED or bucket.quantity <= 0:
                continue
            day = bucket.hour.date().isoformat()
            key = (bucket.subscription_id, bucket.dimension, day)
            row = rows.get(key) or ReadBackRow(day, bucket.subscription_id, bucket.dimension, bucket.plan_id)
            row.ours += bucket.quantity
            row.ours_hours += 1
            row.plan_id = bucket.plan_id or row.plan_id
            rows[key] = row
    return rows, len(hours)


def _compare(row: ReadBackRow) -> str:
    recon = row.recon_status.strip().lower()
    if row.test or recon in TEST_RECON_STATUSES:
        return TEST
    if row.submitted is None:
        return MISSING_AT_MICROSOFT
    if row.ours_hours == 0:
        return UNKNOWN_TO_US
    if recon == "rejected":
        return REJECTED
    if recon == "mismatch":
        return MISMATCH
    if row.submitted != row.ours:
        return DIFFERENCE
    if recon == "submitted":  # not processed yet: the processed quantity means nothing so far
        return PROCESSING
    if row.processed != row.ours:
        return DIFFERENCE
    return MATCH


def _test_purchases(services: Services, subscription_ids: set[str]) -> set[str]:
    def test(subscription_id: str) -> str | None:
        stored = services.repository.get(subscription_id)
        return subscription_id if stored is not None and stored.record.is_test_purchase else None

    return {found for found in parallel_storage([partial(test, s) for s in sorted(subscription_ids)]) if found}


def run_usage_readback(services: Services, *, days: int | None = None) -> ReadBackSummary:
    """Read Microsoft's daily aggregates of the last closed days and compare them with ours."""
    from shared.deadline import deadline_scope

    started = time.monotonic()
    now = services.clock()
    count = days if days is not None else services.settings.usage_reconcile_days
    wanted = closed_days(now, max(1, count))
    summary = ReadBackSummary(days=[d.isoformat() for d in wanted])
    store = usage_store(services)
    try:
        with deadline_scope(READBACK_DEADLINE_SECONDS):
            summary.marketplace_calls += 1
            aggregates = services.marketplace.list_usage_aggregates(
                datetime(wanted[0].year, wanted[0].month, wanted[0].day, tzinfo=UTC),
                datetime(wanted[-1].year, wanted[-1].month, wanted[-1].day, tzinfo=UTC),
            )
    except (MarketplaceError, DeadlineExceededError) as error:
        # Nothing is compared (a missing read-back is not a difference); the next run tries again.
        summary.error = error.code
        log.warning("usage read-back: Microsoft's usageEvents could not be read (%s); nothing compared", error.code)
        _save(store, summary, now, started)
        return summary
    rows, summary.hour_queries = _ours(services, wanted)
    wanted_days = set(summary.days)
    for aggregate in aggregates:
        day = aggregate.usage_date.date().isoformat() if aggregate.usage_date else ""
        if day not in wanted_days:
            continue
        key = (aggregate.resource_id, aggregate.dimension, day)
        row = rows.get(key) or ReadBackRow(day, aggregate.resource_id, aggregate.dimension, aggregate.plan_id)
        # several plans in one day (a plan change) add up: we compare per subscription and dimension
        row.submitted = (row.submitted or Decimal(0)) + aggregate.submitted_quantity
        row.processed = (row.processed or Decimal(0)) + aggregate.processed_quantity
        row.submitted_count += aggregate.submitted_count
        worst = {"rejected": 3, "mismatch": 2}
        if not row.recon_status or worst.get(aggregate.recon_status.lower(), 0) > worst.get(row.recon_status.lower(), 0):
            row.recon_status = aggregate.recon_status
        rows[key] = row
    tests = _test_purchases(services, {sid for sid, _, _ in rows})
    by_subscription: dict[str, list[ReadBackRow]] = defaultdict(list)
    for row in rows.values():
        row.test = row.subscription_id in tests
        row.status = _compare(row)
        summary.rows += 1
        if row.status == TEST:
            summary.test_rows += 1
            continue
        summary.revenue_ours += row.ours
        summary.revenue_microsoft += row.processed or Decimal(0)
        if row.status == MATCH:
            summary.matched += 1
        elif row.status == PROCESSING:
            summary.processing += 1
        else:
            summary.differences += 1
            summary.rejected += row.status == REJECTED
            by_subscription[row.subscription_id].append(row)
            log.error(
                "usage_readback_difference: subscription %s day %s dimension %s ours %s microsoft submitted %s processed %s "
                "reconStatus %s: %s",
                row.subscription_id,
                row.day,
                row.dimension,
                decimal_text(row.ours),
                "-" if row.submitted is None else decimal_text(row.submitted),
                "-" if row.processed is None else decimal_text(row.processed),
                row.recon_status or "-",
                row.status,
            )
    try:
        store.save_read_back(sorted(rows.values(), key=lambda r: (r.day, r.subscription_id, r.dimension)), summary.days)
    except AppError as error:
        summary.error = error.code
        log.warning("usage read-back results not stored: %s", error.code)
    for subscription_id, found in sorted(by_subscription.items()):
        if _notify(services, subscription_id, found):
            summary.events_written += 1
    summary.found = [r.to_api() for rows_of in by_subscription.values() for r in rows_of][:50]
    _save(store, summary, now, started)
    log.info(
        "usage read-back of %s: %s rows, %s match, %s differences (%s rejected), %s processing, %s test; "
        "ours %s, Microsoft processed %s",
        ", ".join(summary.days),
        summary.rows,
        summary.matched,
        summary.differences,
        summary.rejected,
        summary.processing,
        summary.test_rows,
        decimal_text(summary.revenue_ours),
        decimal_text(summary.revenue_microsoft),
    )
    return summary


def _save(store: Any, summary: ReadBackSummary, now: datetime, started: float) -> None:
    summary.seconds = round(time.monotonic() - started, 3)
    try:
        store.save_summary({**summary.to_json(), "ranAt": format_timestamp(now)}, "readback")
    except AppError as error:
        log.warning("usage read-back summary not saved: %s", error.code)


def _notify(services: Services, subscription_id: str, rows: list[ReadBackRow]) -> bool:
    """One ``usage.mismatch`` per distinct finding (the marker's id is derived from its content)."""
    from shared import state_machine as sm
    from shared.events import build_event_document

    detail = [
        {k: v for k, v in row.to_api().items() if k not in ("subscriptionId", "oursHours", "submittedCount", "test")}
        for row in sorted(rows, key=lambda r: (r.day, r.dimension))
    ]
    digest = hashlib.sha256(json.dumps(detail, sort_keys=True).encode()).hexdigest()[:24]
    change = Change(
        kind=Kind.USAGE_MISMATCH,
        source=Source.METERING,
        occurred_at=services.clock(),
        correlation_id=current_correlation_id(),
        detail=json.dumps(detail),
    )

    def decide(record: sm.SubscriptionRecord | None) -> sm.Outcome | None:
        return sm.apply(record, change, now=services.clock()) if record is not None else None

    marker = f"usage-mismatch-{digest}"
    return services.repository.apply(subscription_id, decide, operation_id=marker, build_event=build_event_document) is not None


def read_back_view(services: Services, days: int = 7) -> dict[str, Any]:
    """The stored results of the last read-backs (for the console's Billing page and the CLI)."""
    store = usage_store(services)
    wanted = [d.isoformat() for d in closed_days(services.clock(), days)]
    rows = store.read_back_rows(wanted)
    return {"summary": store.latest_summary("readback"), "rows": rows}
