"""Lifecycle events for the publisher's SaaS application (outbox document format; see docs/events.md).

An event row is written in the same transaction as the state change that caused it (the
repository's outbox), so an event exists if and only if the transition was applied.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from shared.domain import format_timestamp, utc_now
from shared.errors import AppError
from shared.state_machine import (
    EVENT_CHANGE_FAILED,
    EVENT_UNSUBSCRIBED,
    EVENT_USAGE_ACCEPTED,
    EVENT_USAGE_MISMATCH,
    EVENT_USAGE_REJECTED,
    Outcome,
)
from shared.work_queue import POISON_MARKER, Job, WorkQueue, queue_client

if TYPE_CHECKING:
    from shared.ports import OutboxStore
    from shared.settings import Settings

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1.0"
_EVENT_NAMESPACE = uuid.UUID("5b0c3c8e-9a4f-4f0e-8f43-0d6c5a2f7e11")


def _camel(name: str) -> str:
    """plan_id -> planId: the event document speaks the same case as Microsoft's API and our snapshot."""
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def event_id_for(subscription_id: str, seq: int) -> str:
    """Stable id: the same transition always yields the same id, so consumers can de-duplicate."""
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"{subscription_id}:{seq}"))


def build_event_document(outcome: Outcome, seq: int) -> tuple[str, str]:
    record, entry = outcome.record, outcome.history
    event_id = event_id_for(record.id, seq)
    previous = {_camel(name): values[0] for name, values in entry.changes.items()}
    document = {
        "schemaVersion": SCHEMA_VERSION,
        "eventId": event_id,
        "eventType": outcome.event_type,
        "subscriptionId": record.id,
        "sequence": seq,
        "occurredAt": format_timestamp(entry.occurred_at),
        "recordedAt": format_timestamp(entry.recorded_at),
        "source": entry.source,
        "operationId": entry.operation_id or None,
        "correlationId": entry.correlation_id or None,
        "subscription": record.snapshot(),
        "previous": previous,
    }
    if outcome.event_type == EVENT_UNSUBSCRIBED:
        document["retainDataUntil"] = format_timestamp(record.retain_data_until)
    if outcome.event_type == EVENT_CHANGE_FAILED:
        document["reason"] = entry.detail  # which change failed and Microsoft's message
    if outcome.event_type in (EVENT_USAGE_ACCEPTED, EVENT_USAGE_REJECTED):
        document["usage"] = json.loads(entry.detail or "[]")  # the hour's buckets and Microsoft's answer
    if outcome.event_type == EVENT_USAGE_MISMATCH:
        document["readBack"] = json.loads(entry.detail or "[]")  # ours beside Microsoft's, per day and dimension
    return event_id, json.dumps(document, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# The relay: outbox rows -> Storage queue (and the optional signed HTTPS hook)

SIGNATURE_HEADER = "X-Marketplace-Signature"
EVENT_ID_HEADER = "X-Marketplace-Event-Id"
HOOK_TIMEOUT_SECONDS = 5.0
QUEUE_MESSAGE_MAX_BYTES = 48_000  # 64 KiB per Storage queue message once base64-encoded
MAX_BACKOFF = timedelta(hours=1)
LEASE_SECONDS = 60
MAX_PASSES = 20  # lease takes per relay_subscription call (events keep arriving: the timer finishes)


def sign_payload(secret: str, body: str, timestamp: int) -> str:
    """``t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">``, as receivers verify it."""
    digest = hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(
    secret: str, body: str, header: str | None, *, tolerance_seconds: int = 300, now: float | None = None
) -> bool:
    """Receiver side: True when ``header`` signs ``body`` with ``secret`` and is recent enough.

    A missing (None) or malformed header is refused, never raised on.
    """
    if not isinstance(header, str):
        return False
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
        signature = parts["v1"]
    except (ValueError, KeyError):
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_seconds:
        return False
    expected = sign_payload(secret, body, timestamp).split("v1=", 1)[1]
    # bytes: compare_digest raises TypeError on non-ASCII str, which a forged header may contain
    return hmac.compare_digest(expected.encode(), signature.encode())


def backoff_for(attempts: int) -> timedelta:
    return min(timedelta(seconds=15 * (2 ** min(attempts, 12))), MAX_BACKOFF)


@dataclass
class RelayStats:
    delivered: int = 0
    failed: int = 0
    skipped: int = 0
    subscriptions: int = 0
    errors: list[str] = field(default_factory=list)
    lease_held: bool = False
    #: seconds until a held lease expires (a job waiting on it goes back with this delay)
    retry_after_seconds: float | None = None


class EventRelay:
    """Delivers outbox events at least once, never dropping one; in order per subscription to the hook.

    The Storage queue does not keep order anyway (consumers order by ``sequence`` and de-duplicate
    by ``eventId``), so when it is the only sink the relay needs no lease: it reads the pending
    rows, sends them and marks them delivered (1 read + 1 write + 1 message per event). The signed
    HTTPS hook promises order, so with a hook a lease row makes one deliverer per subscription.
    """

    def __init__(
        self,
        repository: OutboxStore,
        *,
        queue_client: Any = None,
        work_queue: WorkQueue | None = None,
        poison_queue: WorkQueue | None = None,
        hook_url: str = "",
        hook_secret: str = "",
        http_session: Any = None,
        clock: Callable[[], datetime] = utc_now,
    ):
        self.repository = repository
        self.queue_client = queue_client
        self.work_queue = work_queue
        self.poison_queue = poison_queue
        self.hook_url = hook_url
        self.hook_secret = hook_secret
        self.clock = clock
        self._session = http_session
        self._queue_ready = False

    @classmethod
    def from_settings(cls, settings: Settings, repository: OutboxStore, *, clock: Callable[[], datetime] = utc_now) -> EventRelay:
        # The events queue is the application's: EVENTS_QUEUE_ENDPOINT when set, not the triggers' account.
        events_client = queue_client(
            settings,
            settings.events_queue_name,
            endpoint=settings.events_queue_endpoint or settings.tables_endpoint.replace(".table.", ".queue."),
        )
        return cls(
            repository,
            queue_client=events_client,
            work_queue=WorkQueue(queue_client(settings, settings.events_work_queue), clock=clock),
            poison_queue=WorkQueue(queue_client(settings, settings.events_work_queue + "-poison"), clock=clock),
            hook_url=settings.events_webhook_url,
            hook_secret=settings.events_webhook_secret,
            clock=clock,
        )

    # -- sinks ---------------------------------------------------------------------------------

    def _send_to_queue(self, body: str) -> None:
        from azure.core.exceptions import ResourceExistsError

        from shared.repository import shrink_json

        # A queue message holds 64 KiB after base64: a larger document goes out shortened, still valid.
        body = shrink_json(body, lambda text: len(text.encode("utf-8")) <= QUEUE_MESSAGE_MAX_BYTES)

        if not self._queue_ready:
            try:
                self.queue_client.create_queue()
            except ResourceExistsError:
                pass
            self._queue_ready = True
        self.queue_client.send_message(body)

    def _send_to_hook(self, event_id: str, body: str) -> None:
        import requests

        session = self._session or requests
        headers = {
            "Content-Type": "application/json",
            EVENT_ID_HEADER: event_id,
            SIGNATURE_HEADER: sign_payload(self.hook_secret, body, int(self.clock().timestamp())),
        }
        response = session.post(self.hook_url, data=body.encode(), headers=headers, timeout=HOOK_TIMEOUT_SECONDS)
        if response.status_code >= 300:
            raise RuntimeError(f"hook answered {response.status_code}")

    # -- delivery ------------------------------------------------------------------------------

    def relay_subscription(
        self, subscription_id: str, stats: RelayStats | None = None, *, respect_backoff: bool = True
    ) -> RelayStats:
        """Deliver this subscription's pending events in sequence; stop at the first failure.

        While the lease is held, other callers skip this subscription, including the inline relay
        of an event written meanwhile. So after releasing the lease the holder looks again, and
        delivers what arrived in the meantime (a skipped caller's event was committed before it
        tried the lease, so this second look, or the next lease holder's, sees it).
        """
        stats = stats or RelayStats()
        if not self.hook_url:  # the queue is the only sink: no order to keep, no lease to take
            stats.subscriptions += 1
            self._deliver_pending(subscription_id, stats, respect_backoff, self.clock(), ordered=False)
            return stats
        counted = False
        for _ in range(MAX_PASSES):
            lease = self.repository.try_lease(subscription_id, LEASE_SECONDS)
            if lease is None:
                stats.skipped += 1  # another deliverer holds this subscription; it delivers in order
                stats.lease_held = True
                stats.retry_after_seconds = self._lease_wait_seconds(subscription_id)
                return stats
            if not counted:
                stats.subscriptions += 1
                counted = True
            try:
                finished = self._deliver_pending(subscription_id, stats, respect_backoff, self.clock(), ordered=True)
            finally:
                self.repository.release_lease(subscription_id, lease)
            if not finished or not self.repository.pending_events(subscription_id):
                return stats
        return stats

    def _lease_wait_seconds(self, subscription_id: str) -> float | None:
        """The lease is held: by a live deliverer, which looks again after releasing it, or by one
        that crashed. Either way, look again when the lease expires (the job goes back on the work
        queue with that delay), so an orphaned lease delays delivery by at most LEASE_SECONDS."""
        try:
            expiry = self.repository.lease_expiry(subscription_id)
        except AppError:
            return None  # storage trouble: the job's backoff and the reconciler's pass are the safety net
        if expiry is None:
            return None
        return max(0.0, (expiry - self.clock()).total_seconds()) + 1.0

    def _deliver_pending(
        self, subscription_id: str, stats: RelayStats, respect_backoff: bool, started: datetime, *, ordered: bool
    ) -> bool:
        """One pass. False: stopped by a failure or a backoff (retry later). ``ordered``: under the
        lease, where a failed or waiting event holds back the later ones."""
        now = self.clock()
        for event in self.repository.pending_events(subscription_id):
            if ordered and (self.clock() - started).total_seconds() > LEASE_SECONDS / 2:
                return True  # release and take the lease again rather than let it expire mid-pass
            if (
                respect_backoff
                and event.attempts
                and event.last_attempt_at
                and now < event.last_attempt_at + backoff_for(event.attempts)
            ):
                stats.skipped += 1
                if ordered:
                    return False  # keep order: later events wait for this one
                continue
            queued = event.queue_done
            try:
                if not queued:
                    self._send_to_queue(event.body)
                    queued = True
                if self.hook_url and not event.hook_done:
                    self._send_to_hook(event.event_id, event.body)
                self.repository.mark_event_delivered(event)
                stats.delivered += 1
            except (AppError, Exception) as error:  # noqa: BLE001 - any sink failure: retry later
                stats.failed += 1
                stats.errors.append(f"{event.event_id}: {type(error).__name__}")
                log.warning("event %s for %s not delivered yet: %s", event.event_id, subscription_id, type(error).__name__)
                try:
                    # The attempt notes whether the queue has it, so a hook failure does not resend
                    # it (one write; a crash before it only means the queue may see it twice, same
                    # eventId: at least once, as documented).
                    self.repository.note_event_attempt(event, type(error).__name__, queue_done=queued)
                except AppError:
                    pass
                return False  # the sink is failing: the rest would too; retry later
        return True

    def relay_pending(self, *, time_budget_seconds: float = 60.0) -> RelayStats:
        """Deliver every pending event (the timer's pass; also picks up crashed inline deliveries)."""
        started = time.monotonic()
        stats = RelayStats()
        seen: set[str] = set()
        for event in self.repository.scan_pending_events():
            if event.subscription_id in seen:
                continue
            seen.add(event.subscription_id)
            self.relay_subscription(event.subscription_id, stats)
            if time.monotonic() - started > time_budget_seconds:
                break
        return stats

    # -- the work queue (event_delivery function) ---------------------------------------------

    def enqueue_delivery(self, subscription_id: str) -> None:
        """Put a "deliver subscription X" job on the work queue (called before the handler answers).

        A failure to enqueue loses nothing: the outbox row stays pending and the reconciler's
        sweep delivers it; the change itself is already committed.
        """
        if self.work_queue is None:
            return
        try:
            self.work_queue.put(Job(kind=JOB_DELIVER, subscription_id=subscription_id))
        except Exception as error:  # noqa: BLE001 - the outbox row is the truth; the sweep delivers
            log.warning(
                "delivery job for %s not enqueued (%s); the reconciler's pass delivers it", subscription_id, type(error).__name__
            )

    def run_job(self, message: str) -> JobResult:
        """One delivery job (the event_delivery function's use case): deliver the subscription's
        pending events in order; when a lease is held or a sink fails, put the job back with a
        visibility delay (the lease's remaining time, or exponential backoff); after
        MAX_JOB_ATTEMPTS the job goes to the poison queue (the outbox row stays pending)."""
        job = Job.from_message(message)
        if job.kind != JOB_DELIVER:
            raise ValueError(f"unknown job kind {job.kind!r}")
        stats = self.relay_subscription(job.subscription_id)
        still_pending = bool(stats.failed or stats.lease_held or stats.skipped)
        if not still_pending:
            return JobResult(job=job, stats=stats)
        if job.attempt + 1 >= MAX_JOB_ATTEMPTS:
            self._poison(job, stats)
            return JobResult(job=job, stats=stats, poisoned=True)
        if stats.lease_held and stats.retry_after_seconds is not None:
            delay = stats.retry_after_seconds
        else:
            delay = backoff_for(job.attempt).total_seconds()
        retry = Job(kind=job.kind, subscription_id=job.subscription_id, attempt=job.attempt + 1)
        if self.work_queue is not None:
            self.work_queue.put(retry, delay_seconds=delay)
        return JobResult(job=job, stats=stats, retry_in_seconds=delay)

    def _poison(self, job: Job, stats: RelayStats) -> None:
        log.error(
            "%s queue=%s subscription=%s attempts=%s errors=%s: the outbox row stays pending; "
            "the reconciler's sweep or the console's Redeliver delivers it",
            POISON_MARKER,
            self.work_queue.name if self.work_queue else "",
            job.subscription_id,
            job.attempt + 1,
            ",".join(stats.errors[-3:]),
        )
        if self.poison_queue is not None:
            self.poison_queue.put(job)

    def drain(self, *, max_messages: int = 1000) -> int:
        """Serve the work queue's visible jobs here (tools, tests, the bench), through ``run_job``
        as the event_delivery function does; delayed retries stay invisible until due (by this
        relay's clock when the queue tracks its delays). Returns jobs run."""
        if self.work_queue is None:
            return 0
        self.work_queue.release_delayed(self.clock())  # tracked retries already due by our clock (tests, tools)
        return self.work_queue.drain(self.run_job, max_messages=max_messages)

    def close(self) -> None:
        """Nothing runs in the background any more; kept for callers that close the relay."""

    def wait_idle(self, timeout: float) -> bool:
        """Drain the visible delivery jobs in this thread (tools, tests). Always True."""
        self.drain()
        return True


JOB_DELIVER = "deliver"
MAX_JOB_ATTEMPTS = 5  # = host.json extensions.queues.maxDequeueCount: a job failing this often is poison


@dataclass(frozen=True)
class JobResult:
    job: Job
    stats: RelayStats
    retry_in_seconds: float | None = None
    poisoned: bool = False
