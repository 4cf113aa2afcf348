"""Lifecycle events for the publisher's SaaS application (outbox document format; see docs/events.md).

An event row is written in the same transaction as the state change that caused it (the
repository's outbox), so an event exists if and only if the transition was applied.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
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

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

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
BACKGROUND_WORKERS = 4
RELAY_THREAD_PREFIX = "event-relay"
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
        hook_url: str = "",
        hook_secret: str = "",
        http_session: Any = None,
        clock: Callable[[], datetime] = utc_now,
    ):
        self.repository = repository
        self.queue_client = queue_client
        self.hook_url = hook_url
        self.hook_secret = hook_secret
        self.clock = clock
        self._session = http_session
        self._queue_ready = False
        self._executor: ThreadPoolExecutor | None = None
        self._queued: set[str] = set()
        self._running: set[str] = set()
        self._again: set[str] = set()
        self._inflight = 0
        self._background_lock = threading.Condition()
        self._retry_timers: dict[str, threading.Timer] = {}

    @classmethod
    def from_settings(cls, settings: Settings, repository: OutboxStore, *, clock: Callable[[], datetime] = utc_now) -> EventRelay:
        from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy

        # Base64 text messages: what a queue-triggered Azure Function expects by default.
        options: dict[str, Any] = {
            "message_encode_policy": TextBase64EncodePolicy(),
            "message_decode_policy": TextBase64DecodePolicy(),
            "retry_total": 2,
            "connection_timeout": 5,
            "read_timeout": 10,
        }
        if settings.tables_connection_string:
            queue = QueueClient.from_connection_string(settings.tables_connection_string, settings.events_queue_name, **options)
        else:
            from shared.credentials import storage_credential

            endpoint = settings.events_queue_endpoint or settings.tables_endpoint.replace(".table.", ".queue.")
            queue = QueueClient(endpoint, settings.events_queue_name, credential=storage_credential(settings), **options)
        return cls(
            repository,
            queue_client=queue,
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
                self._retry_when_lease_expires(subscription_id)
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

    def _retry_when_lease_expires(self, subscription_id: str) -> None:
        """The lease is held: by a live deliverer, which looks again after releasing it, or by one
        that crashed. Either way, look again when the lease expires, so an orphaned lease delays
        delivery by at most LEASE_SECONDS instead of until the next reconciliation run."""
        try:
            expiry = self.repository.lease_expiry(subscription_id)
        except AppError:
            return  # storage trouble: the reconciler's pass is the safety net
        if expiry is None:
            return
        delay = max(0.0, (expiry - self.clock()).total_seconds()) + 1.0
        with self._background_lock:
            if subscription_id in self._retry_timers:
                return
            timer = threading.Timer(delay, self._retry_after_lease, args=(subscription_id,))
            timer.daemon = True
            timer.name = f"{RELAY_THREAD_PREFIX}-lease-retry"
            self._retry_timers[subscription_id] = timer
        timer.start()

    def _retry_after_lease(self, subscription_id: str) -> None:
        with self._background_lock:
            self._retry_timers.pop(subscription_id, None)
        self.relay_in_background(subscription_id)

    def pending_lease_retries(self) -> dict[str, float]:
        """Subscription -> seconds until its delivery is retried, for those waiting on a held lease."""
        with self._background_lock:
            return {sid: timer.interval for sid, timer in self._retry_timers.items()}

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
            try:
                if not event.queue_done:
                    self._send_to_queue(event.body)
                    if self.hook_url:  # remember the queue has it, so a hook failure does not resend it
                        self.repository.mark_event_progress(event, queue_done=True)
                if self.hook_url and not event.hook_done:
                    self._send_to_hook(event.event_id, event.body)
                self.repository.mark_event_delivered(event)
                stats.delivered += 1
            except (AppError, Exception) as error:  # noqa: BLE001 - any sink failure: retry later
                stats.failed += 1
                stats.errors.append(f"{event.event_id}: {type(error).__name__}")
                log.warning("event %s for %s not delivered yet: %s", event.event_id, subscription_id, type(error).__name__)
                try:
                    self.repository.note_event_attempt(event, type(error).__name__)
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

    def relay_in_background(self, subscription_id: str) -> None:
        """Deliver right after a change without delaying the caller's answer; the timer is the safety net.

        A small fixed pool does the work. A subscription already waiting for the pool is not queued
        twice, and one that is being delivered gets one more pass by the same job instead of a
        second, concurrent job (which could send the same event twice), so a burst costs bounded
        threads and, within a process, no duplicate messages.
        """
        with self._background_lock:
            if subscription_id in self._running:
                self._again.add(subscription_id)
                return
            if subscription_id in self._queued:
                return
            self._queued.add(subscription_id)
            self._inflight += 1
            if self._executor is None:
                from concurrent.futures import ThreadPoolExecutor

                self._executor = ThreadPoolExecutor(max_workers=BACKGROUND_WORKERS, thread_name_prefix=RELAY_THREAD_PREFIX)
            executor = self._executor
        executor.submit(self._relay_quietly, subscription_id)

    def _relay_quietly(self, subscription_id: str) -> None:
        with self._background_lock:
            self._queued.discard(subscription_id)
            self._running.add(subscription_id)
        try:
            while True:
                try:
                    self.relay_subscription(subscription_id)
                except Exception:  # noqa: BLE001 - never let a background delivery crash the worker
                    log.warning("background relay for %s failed; the timer will retry", subscription_id)
                with self._background_lock:
                    if subscription_id not in self._again:
                        self._running.discard(subscription_id)
                        break
                    self._again.discard(subscription_id)  # changed while we delivered: one more pass
        finally:
            with self._background_lock:
                self._running.discard(subscription_id)
                self._inflight -= 1
                self._background_lock.notify_all()

    def close(self) -> None:
        """Cancel lease retries (tools, tests); pending events stay for the reconciler's pass."""
        with self._background_lock:
            timers, self._retry_timers = list(self._retry_timers.values()), {}
        for timer in timers:
            timer.cancel()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no background delivery is queued or running (tools, tests). False on timeout."""
        with self._background_lock:
            return self._background_lock.wait_for(lambda: self._inflight == 0, timeout)
