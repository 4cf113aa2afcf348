"""In-memory fakes of the repository and the Marketplace client, for fast use-case unit tests.

They implement the same protocols as the real classes (``shared.ports.SubscriptionStore`` and
``shared.ports.MarketplaceApi``), and the type checker holds them to it (``fake_services`` builds a
``Services``); the integration tests run the same use cases against Azurite and the stand-in over HTTP.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from shared import errors
from shared.domain import (
    Operation,
    Plan,
    ResolvedPurchase,
    Subscription,
    UpdateStatus,
    UsageAggregate,
    UsageEvent,
    UsageResult,
    UsageStatus,
)
from shared.marketplace import CallCounter
from shared.repository import (
    OP_RECEIVED,
    EventBuilder,
    OperationMarker,
    OutboxEvent,
    ScanItem,
    StorageMetrics,
    StoredRecord,
    matches_text,
)
from shared.services import Services
from shared.settings import Settings
from shared.state_machine import Outcome, SubscriptionRecord


class FakeRepository:
    def __init__(self):
        self.records: dict[str, tuple[SubscriptionRecord, int]] = {}
        self.histories: dict[str, list[dict]] = {}
        self.markers: dict[tuple[str, str], OperationMarker] = {}
        self.events: list[tuple[str, str, str]] = []  # (subscription id, event id, body)
        self.metrics = StorageMetrics()
        self.on_event_written: Callable[[str], object] | None = None
        self.checkpoint: dict[str, Any] | None = None
        self.runs: list[dict[str, Any]] = []
        self.extra_rows: dict[tuple[str, str], dict[str, Any]] = {}  # rows merged by apply(extra_rows=...)
        self.down = False
        self._lock = threading.Lock()

    def _check(self):
        if self.down:
            raise errors.StorageUnavailableError("storage is down (fake)")

    def ensure_tables(self):
        self._check()

    def check(self):
        self._check()

    def get(self, subscription_id: str) -> StoredRecord | None:
        self._check()
        with self._lock:
            found = self.records.get(subscription_id)
        return StoredRecord(found[0], str(found[1])) if found else None

    def get_marker(self, subscription_id: str, operation_id: str) -> OperationMarker | None:
        self._check()
        return self.markers.get((subscription_id, operation_id))

    def history(self, subscription_id: str, *, since_seq: int = 0) -> list[dict[str, Any]]:
        return [entry for entry in self.histories.get(subscription_id, []) if entry["seq"] >= since_seq]

    def list_records(
        self, *, status: str = "", offer_id: str = "", plan_id: str = "", flagged: bool = False
    ) -> Iterator[SubscriptionRecord]:
        self._check()
        with self._lock:
            records = [record for record, _ in self.records.values()]
        for record in records:
            if status and record.status.value != status:
                continue
            if (offer_id and record.offer_id != offer_id) or (plan_id and record.plan_id != plan_id):
                continue
            if flagged and not record.needs_attention:
                continue
            yield record

    def list_markers(self, subscription_id: str) -> list[OperationMarker]:
        with self._lock:
            return [marker for (sid, _), marker in self.markers.items() if sid == subscription_id]

    def pending_events(self, subscription_id: str) -> list[OutboxEvent]:
        return []  # the fake delivers nothing: it only keeps the documents (self.events)

    def list_events(self, subscription_id: str, *, since_seq: int = 0) -> list[OutboxEvent]:
        return []

    def search_records(
        self,
        text: str,
        *,
        status: str = "",
        offer_id: str = "",
        plan_id: str = "",
        flagged: bool = False,
        limit: int = 50,
        scan_limit: int = 5000,
    ) -> tuple[list[SubscriptionRecord], bool]:
        records = sorted(
            self.list_records(status=status, offer_id=offer_id, plan_id=plan_id, flagged=flagged), key=lambda r: r.id
        )[:scan_limit]
        found = [r for r in records if matches_text(text, r.id, r.name, r.purchaser.email_id, r.beneficiary.email_id)][:limit]
        return found, len(records) >= scan_limit

    def page_records(
        self,
        *,
        status: str = "",
        offer_id: str = "",
        plan_id: str = "",
        flagged: bool = False,
        page_size: int = 50,
        continuation: Any = None,
    ) -> tuple[list[SubscriptionRecord], Any]:
        records = sorted(
            self.list_records(status=status, offer_id=offer_id, plan_id=plan_id, flagged=flagged), key=lambda r: r.id
        )
        start = int(continuation["NextRowIndex"]) if continuation else 0
        following = {"NextRowIndex": str(start + page_size)} if start + page_size < len(records) else None
        return records[start : start + page_size], following

    def scan(self, *, page_size: int = 1000, delivered_since: datetime | None = None) -> Iterator[ScanItem]:
        self._check()
        with self._lock:
            states = [StoredRecord(record, str(version)) for record, version in self.records.values()]
            markers = [marker for marker in self.markers.values() if marker.pending]
        yield from (ScanItem("state", stored=stored) for stored in states)
        yield from (ScanItem("op", marker=marker) for marker in markers)

    def get_checkpoint(self) -> dict[str, Any] | None:
        self._check()
        return self.checkpoint

    def save_checkpoint(self, state: dict[str, Any] | None) -> None:
        self._check()
        self.checkpoint = state

    def save_run_summary(self, summary: dict[str, Any]) -> None:
        self._check()
        self.runs.insert(0, summary)

    def latest_runs(self, count: int = 10) -> list[dict[str, Any]]:
        return self.runs[:count]

    def record_operation(
        self, subscription_id: str, operation_id: str, *, action: str, payload: str, correlation_id: str
    ) -> tuple[bool, OperationMarker]:
        self._check()
        with self._lock:
            key = (subscription_id, operation_id)
            if key in self.markers:
                return False, self.markers[key]
            marker = OperationMarker(
                subscription_id,
                operation_id,
                action,
                OP_RECEIVED,
                datetime.now(UTC),
                payload=payload,
                correlation_id=correlation_id,
                etag="1",
            )
            self.markers[key] = marker
            return True, marker

    def settle_marker(self, marker: OperationMarker, status: str) -> bool:
        self.markers[(marker.subscription_id, marker.operation_id)] = replace(marker, status=status)
        return True

    def apply(
        self,
        subscription_id: str,
        decide: Callable[[SubscriptionRecord | None], Outcome | None],
        *,
        operation_id: str = "",
        build_event: EventBuilder | None = None,
        known: StoredRecord | None = None,
        known_marker: OperationMarker | None = None,
        attempts: int = 6,
        extra_rows: Sequence[Mapping[str, Any]] = (),
    ) -> Outcome | None:
        # known/known_marker only save reads in the real repository; the fake always reads.
        self._check()
        for _ in range(attempts):
            stored = self.get(subscription_id)
            if operation_id:
                marker = self.markers.get((subscription_id, operation_id))
                if marker is not None and not marker.pending:
                    return None
            outcome: Outcome | None = decide(stored.record if stored else None)
            if outcome is None:
                return None
            with self._lock:
                current = self.records.get(subscription_id)
                version = current[1] if current else 0
                if (stored is not None and str(version) != stored.etag) or (stored is None and current is not None):
                    continue  # a concurrent writer won: re-decide
                self._check()
                self.records[subscription_id] = (outcome.record, version + 1)
                self.histories.setdefault(subscription_id, []).append(outcome.history.to_json())
                for row in extra_rows:
                    key = (subscription_id, str(row["RowKey"]))
                    self.extra_rows[key] = {**self.extra_rows.get(key, {}), **row}
                if operation_id:
                    key = (subscription_id, operation_id)
                    base = self.markers.get(key) or OperationMarker(subscription_id, operation_id, "", OP_RECEIVED, None)
                    self.markers[key] = replace(base, status=outcome.result.value)
                if outcome.event_type and build_event is not None:
                    event_id, body = build_event(outcome, outcome.history.seq)
                    self.events.append((subscription_id, event_id, body))
            return outcome
        raise errors.ConflictError("kept changing")


class FakeMarketplace:
    """Microsoft's side in memory, with the documented status codes."""

    def __init__(self):
        self.subscriptions: dict[str, dict[str, Any]] = {}
        self.tokens: dict[str, str] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.activations: list[str] = []
        self.updates: list[tuple[str, str, str]] = []
        self.usage: dict[tuple[str, str, datetime], Decimal] = {}  # accepted usage per (resource, dimension, hour)
        self.counter = CallCounter()
        self.fail_with: errors.MarketplaceError | None = None
        self.activation_completes = True

    def close(self):
        pass

    def _maybe_fail(self, operation: str):
        self.counter.add(operation)
        if self.fail_with is not None:
            raise self.fail_with

    def add(
        self,
        subscription_id: str,
        status: str = "PendingFulfillmentStart",
        plan_id: str = "basic",
        quantity: int | None = None,
        name: str = "Sub",
        token: str = "",
    ) -> dict:
        data = {
            "id": subscription_id,
            "name": name,
            "offerId": "offer",
            "planId": plan_id,
            "quantity": quantity,
            "saasSubscriptionStatus": status,
            "publisherId": "contoso",
            "purchaser": {"emailId": "buyer@customer.example"},
            "beneficiary": {"emailId": "buyer@customer.example"},
            "term": {"termUnit": "P1M"},
            "allowedCustomerOperations": ["Read", "Update", "Delete"],
        }
        self.subscriptions[subscription_id] = data
        if token:
            self.tokens[token] = subscription_id
        return data

    def add_operation(self, operation_id: str, subscription_id: str, action: str, status: str = "Succeeded", **fields) -> dict:
        data = {
            "id": operation_id,
            "subscriptionId": subscription_id,
            "action": action,
            "status": status,
            "timeStamp": fields.pop("timeStamp", datetime.now(UTC).isoformat()),
            **fields,
        }
        self.operations[operation_id] = data
        return data

    def resolve(self, token: str) -> ResolvedPurchase:
        self._maybe_fail("resolve")
        if token not in self.tokens:
            raise errors.MarketplaceBadRequestError("bad token", status=400)
        data = self.subscriptions[self.tokens[token]]
        return ResolvedPurchase.from_api(
            {
                "id": data["id"],
                "subscriptionName": data["name"],
                "offerId": data["offerId"],
                "planId": data["planId"],
                "quantity": data["quantity"],
                "subscription": data,
            }
        )

    def activate(self, subscription_id: str, plan_id: str = "", quantity: int | None = None) -> None:
        self._maybe_fail("activate")
        data = self.subscriptions.get(subscription_id)
        if data is None or data["saasSubscriptionStatus"] == "Unsubscribed":
            raise errors.MarketplaceNotFoundError("not found", status=404)
        if data["saasSubscriptionStatus"] != "PendingFulfillmentStart":
            raise errors.MarketplaceBadRequestError("already active", status=400)
        self.activations.append(subscription_id)
        if self.activation_completes:
            data["saasSubscriptionStatus"] = "Subscribed"
            data["term"] = {"termUnit": "P1M", "startDate": "2026-11-01T00:00:00Z", "endDate": "2026-11-30T00:00:00Z"}

    def get_subscription(self, subscription_id: str) -> Subscription:
        self._maybe_fail("get_subscription")
        if subscription_id not in self.subscriptions:
            raise errors.MarketplaceNotFoundError("not found", status=404)
        return Subscription.from_api(self.subscriptions[subscription_id])

    def list_available_plans(self, subscription_id: str) -> list[Plan]:
        self._maybe_fail("list_plans")
        return [
            Plan.from_api({"planId": "basic", "displayName": "Basic"}),
            Plan.from_api({"planId": "standard", "displayName": "Standard"}),
        ]

    def list_subscription_pages(self, start_link=None):
        self._maybe_fail("list_subscriptions")
        items = [Subscription.from_api(d) for d in self.subscriptions.values()]
        yield items, ""

    def list_outstanding_operations(self, subscription_id: str) -> list[Operation]:
        self._maybe_fail("list_operations")
        return [
            Operation.from_api(op)
            for op in self.operations.values()
            if op["subscriptionId"] == subscription_id and op["status"] == "InProgress"
        ]

    def get_operation(self, subscription_id: str, operation_id: str) -> Operation:
        self._maybe_fail("get_operation")
        op = self.operations.get(operation_id)
        if op is None or op["subscriptionId"] != subscription_id:
            raise errors.MarketplaceNotFoundError("no such operation", status=404)
        return Operation.from_api(op)

    def _start_operation(self, subscription_id: str, action: str, **fields: Any) -> str:
        if subscription_id not in self.subscriptions:
            raise errors.MarketplaceNotFoundError("not found", status=404)
        operation_id = str(uuid.uuid4())
        self.add_operation(operation_id, subscription_id, action, status="InProgress", **fields)
        return operation_id

    def change_plan(self, subscription_id: str, plan_id: str) -> str:
        self._maybe_fail("change_plan")
        return self._start_operation(subscription_id, "ChangePlan", planId=plan_id)

    def change_quantity(self, subscription_id: str, quantity: int) -> str:
        self._maybe_fail("change_quantity")
        return self._start_operation(subscription_id, "ChangeQuantity", quantity=quantity)

    def delete_subscription(self, subscription_id: str) -> str:
        self._maybe_fail("delete_subscription")
        return self._start_operation(subscription_id, "Unsubscribe")

    def batch_usage_event(self, events: list[UsageEvent]) -> list[UsageResult]:
        """One accepted event per (resource, dimension, hour); the same hour again is a Duplicate."""
        self._maybe_fail("batch_usage_event")
        results = []
        for event in events:
            key = (event.resource_id, event.dimension, event.effective_start_time.replace(minute=0, second=0, microsecond=0))
            if key in self.usage:
                results.append(
                    UsageResult(UsageStatus.DUPLICATE, event.resource_id, event.dimension, kept_quantity=self.usage[key])
                )
                continue
            self.usage[key] = event.quantity
            results.append(
                UsageResult(
                    UsageStatus.ACCEPTED, event.resource_id, event.dimension, event.quantity, usage_event_id=str(uuid.uuid4())
                )
            )
        return results

    def list_usage_aggregates(self, start: datetime, end: datetime | None = None) -> list[UsageAggregate]:
        """Daily aggregates of what this fake accepted (per resource, dimension, day)."""
        self._maybe_fail("list_usage_aggregates")
        days: dict[tuple[str, str, str], Decimal] = {}
        for (resource, dimension, hour), quantity in self.usage.items():
            if hour.date() >= start.date() and (end is None or hour.date() <= end.date()):
                key = (resource, dimension, hour.date().isoformat())
                days[key] = days.get(key, Decimal(0)) + quantity
        return [
            UsageAggregate(
                datetime.fromisoformat(day).replace(tzinfo=UTC), resource, dimension, "", "", total, total, 1, "Accepted"
            )
            for (resource, dimension, day), total in sorted(days.items())
        ]

    def update_operation(self, subscription_id: str, operation_id: str, status: UpdateStatus) -> None:
        self._maybe_fail("update_operation")
        op = self.operations[operation_id]
        if op["status"] != "InProgress":
            raise errors.MarketplaceConflictError("settled", status=409)
        self.updates.append((subscription_id, operation_id, UpdateStatus(status).value))
        op["status"] = "Succeeded" if status == UpdateStatus.SUCCESS else "Failed"


class FakeClock:
    def __init__(self, start: datetime | None = None):
        self.now = start or datetime(2026, 11, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta) -> None:
        self.now += timedelta(**delta)


def fake_services(**setting_overrides) -> Services:
    env = {
        "MARKETPLACE_AUTH": "none",
        "WEBHOOK_AUTH": "none",
        "PUBLISHER_API_AUTH": "none",
        "TABLES_CONNECTION_STRING": "UseDevelopmentStorage=true",
        "LANDING_FORM_SECRET": "unit-test-form-secret-0123456789",
        "SAAS_APP_URL": "https://app.example/",
        **setting_overrides,
    }
    services = Services(settings=Settings.from_env(env), marketplace=FakeMarketplace(), repository=FakeRepository())
    services.clock = FakeClock()
    return services
