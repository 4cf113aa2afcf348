"""Lifecycle events for the publisher's SaaS application (outbox document format; see docs/events.md).

An event row is written in the same transaction as the state change that caused it (the
repository's outbox), so an event exists if and only if the transition was applied.
"""
from __future__ import annotations

import json
import uuid

from shared.domain import format_timestamp
from shared.state_machine import EVENT_UNSUBSCRIBED, Outcome

SCHEMA_VERSION = "1.0"
_EVENT_NAMESPACE = uuid.UUID("5b0c3c8e-9a4f-4f0e-8f43-0d6c5a2f7e11")


def event_id_for(subscription_id: str, seq: int) -> str:
    """Stable id: the same transition always yields the same id, so consumers can de-duplicate."""
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"{subscription_id}:{seq}"))


def build_event_document(outcome: Outcome, seq: int) -> tuple[str, str]:
    record, entry = outcome.record, outcome.history
    event_id = event_id_for(record.id, seq)
    previous = {name: values[0] for name, values in entry.changes.items()}
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
    return event_id, json.dumps(document, sort_keys=True)
