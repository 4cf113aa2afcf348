"""Work queues: small job messages a queue-triggered function serves (see docs/events.md).

Work for later never runs on a thread of ours after a handler answers: it goes on a Storage queue
as a job message, and a queue-triggered function (or the dev host, serving the same function
against Azurite) does it. A job that must wait (a held lease, a failing hook) is put back with a
visibility delay, so the queue itself is the timer.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from shared.domain import utc_now

if TYPE_CHECKING:
    from shared.settings import Settings

log = logging.getLogger(__name__)

MAX_VISIBILITY_SECONDS = 7 * 24 * 3600 - 1  # Storage queues refuse a visibility timeout of 7 days or more
POISON_MARKER = "queue_message_poisoned"


@dataclass(frozen=True)
class Job:
    kind: str
    subscription_id: str
    attempt: int = 0
    #: poll jobs: the publisher operation, the current wait (s) and the end of the budget (epoch s)
    operation_id: str = ""
    wait: float = 0.0
    ends: float = 0.0

    def to_message(self) -> str:
        data: dict[str, object] = {"kind": self.kind, "subscriptionId": self.subscription_id, "attempt": self.attempt}
        if self.operation_id:
            data.update(operationId=self.operation_id, wait=self.wait, ends=self.ends)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_message(cls, text: str) -> Job:
        """A job from a message body; ValueError for a body that is not one of ours."""
        try:
            data = json.loads(text)
            kind, subscription_id, attempt = data["kind"], data["subscriptionId"], int(data.get("attempt", 0))
            operation_id = str(data.get("operationId") or "")
            wait, ends = float(data.get("wait") or 0.0), float(data.get("ends") or 0.0)
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"not a job message: {type(error).__name__}") from None
        if not (isinstance(kind, str) and isinstance(subscription_id, str) and subscription_id):
            raise ValueError("not a job message: kind and subscriptionId must be text")
        return cls(
            kind=kind, subscription_id=subscription_id, attempt=max(0, attempt), operation_id=operation_id, wait=wait, ends=ends
        )


def queue_client(settings: Settings, queue_name: str, *, endpoint: str = "") -> Any:
    """A QueueClient for ``queue_name``: the connection string locally (Azurite), otherwise the
    managed identity on ``endpoint`` or AzureWebJobsStorage__queueServiceUri (the queue triggers'
    connection: a work queue must be where its trigger listens)."""
    from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy

    from shared.repository import pooled_transport

    timeouts = {"connection_timeout": 5, "read_timeout": 10}
    # Base64 text messages: what a queue-triggered Azure Function expects by default.
    options: dict[str, Any] = {
        "message_encode_policy": TextBase64EncodePolicy(),
        "message_decode_policy": TextBase64DecodePolicy(),
        "retry_total": 2,
        **timeouts,
        "transport": pooled_transport(**timeouts),
    }
    if settings.tables_connection_string:
        return QueueClient.from_connection_string(settings.tables_connection_string, queue_name, **options)
    from shared.credentials import storage_credential

    endpoint = (
        endpoint
        or settings.queue_service_uri
        or settings.events_queue_endpoint
        or settings.tables_endpoint.replace(".table.", ".queue.")
    )
    return QueueClient(endpoint, queue_name, credential=storage_credential(settings), **options)


class WorkQueue:
    """Puts job messages on one Storage queue (created on first use).

    A delayed job is a message sent with a visibility timeout: the queue is the timer. Tools and
    tests that drive time themselves call ``track_delays()``: the queue then remembers the receipt
    and due time (by ``clock``) of each delayed message it sent, and ``release_delayed(now)`` makes
    those due by ``now`` visible at once, through Storage's own Update Message, so nothing waits
    in real time for a visibility timeout to pass.
    """

    def __init__(self, client: Any, *, clock: Callable[[], datetime] | None = None):
        self.client = client
        self.clock = clock or utc_now
        self._ready = False
        self._lock = threading.Lock()
        self._delayed: dict[str, tuple[str, datetime]] | None = None  # message id -> (pop receipt, due)

    @property
    def name(self) -> str:
        return str(self.client.queue_name)

    def _ensure(self) -> None:
        from azure.core.exceptions import ResourceExistsError

        with self._lock:
            if self._ready:
                return
            try:
                self.client.create_queue()
            except ResourceExistsError:
                pass
            self._ready = True

    def put(self, job: Job, *, delay_seconds: float = 0) -> None:
        self._ensure()
        visibility = max(0, min(round(delay_seconds), MAX_VISIBILITY_SECONDS))
        sent = self.client.send_message(job.to_message(), visibility_timeout=visibility or None)
        if visibility and self._delayed is not None:
            with self._lock:
                self._delayed[sent.id] = (sent.pop_receipt, self.clock() + timedelta(seconds=visibility))

    def track_delays(self) -> WorkQueue:
        """Remember the delayed messages this queue sends, for ``release_delayed`` (tools, tests)."""
        with self._lock:
            if self._delayed is None:
                self._delayed = {}
        return self

    def delayed(self) -> list[datetime]:
        """Due times of the tracked delayed messages not yet released, earliest first."""
        with self._lock:
            return sorted(due for _, due in (self._delayed or {}).values())

    def release_delayed(self, now: datetime | None = None) -> int:
        """Make the tracked delayed messages due by ``now`` (all when None) visible now; returns how
        many. A message already received or deleted meanwhile is skipped."""
        from azure.core.exceptions import HttpResponseError

        with self._lock:
            tracked = self._delayed or {}
            due = [(mid, receipt) for mid, (receipt, at) in tracked.items() if now is None or at <= now]
            for mid, _ in due:
                del tracked[mid]
        released = 0
        for mid, receipt in due:
            try:
                self.client.update_message(mid, receipt, visibility_timeout=0)
                released += 1
            except HttpResponseError:  # received by someone (receipt changed) or gone
                pass
        return released

    def drain(self, run: Callable[[str], object], *, max_messages: int = 1000, lock_seconds: int = 600) -> int:
        """Run the visible jobs here, one after another, as the queue trigger would (tools, tests,
        the bench); returns jobs run. A job whose hold ran out while the batch was worked through
        may have been taken by another consumer: it is not deleted twice (jobs are idempotent)."""
        from azure.core.exceptions import ResourceNotFoundError

        done = 0
        while done < max_messages:
            try:
                batch = list(self.client.receive_messages(messages_per_page=16, visibility_timeout=lock_seconds, max_messages=16))
            except ResourceNotFoundError:
                return done
            if not batch:
                return done
            for message in batch:
                run(message.content)
                try:
                    self.client.delete_message(message)
                except ResourceNotFoundError:  # its hold ran out and someone else received it
                    log.info("job %s was received again before this run ended; not deleted here", message.id)
                done += 1
        return done

    def waiting(self) -> int:
        """Messages on the queue, visible or not (approximate, as Storage counts them)."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return int(self.client.get_queue_properties().approximate_message_count or 0)
        except ResourceNotFoundError:
            return 0
