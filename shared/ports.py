"""The two sides every use case talks to, as ``typing.Protocol`` classes.

``Services`` (shared/services.py) holds one of each. The production classes
(``shared.repository.SubscriptionRepository``, ``shared.marketplace.MarketplaceClient``) and the test
fakes (``tests/fakes.py``) are checked against these protocols by the type checker, so a use case
can only call what both provide, and a fake cannot drift from the real interface unnoticed.

Nothing here imports the Azure SDKs: the protocols are read by the type checker, and at run time this
module costs nothing on a cold start.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from shared.domain import (
        Operation,
        Plan,
        ResolvedPurchase,
        Subscription,
        UpdateStatus,
        UsageAggregate,
        UsageEvent,
        UsageResult,
    )
    from shared.marketplace import CallCounter
    from shared.repository import OperationMarker, OutboxEvent, ScanItem, StorageMetrics, StoredRecord
    from shared.state_machine import Outcome, SubscriptionRecord

    #: builds an outbox event (event id, JSON body) for an applied outcome and its history sequence
    EventBuilder = Callable[[Outcome, int], tuple[str, str]]


class MarketplaceApi(Protocol):
    """Microsoft's SaaS Fulfillment API v2, as the use cases call it."""

    counter: CallCounter

    def close(self) -> None: ...

    def resolve(self, purchase_token: str) -> ResolvedPurchase: ...

    def activate(self, subscription_id: str, plan_id: str = "", quantity: int | None = None) -> None: ...

    def get_subscription(self, subscription_id: str) -> Subscription: ...

    def list_subscription_pages(self, start_link: str | None = None) -> Iterator[tuple[list[Subscription], str]]: ...

    def list_available_plans(self, subscription_id: str) -> list[Plan]: ...

    def change_plan(self, subscription_id: str, plan_id: str) -> str: ...

    def change_quantity(self, subscription_id: str, quantity: int) -> str: ...

    def delete_subscription(self, subscription_id: str) -> str: ...

    def batch_usage_event(self, events: list[UsageEvent]) -> list[UsageResult]: ...

    def list_usage_aggregates(self, start: datetime, end: datetime | None = None) -> list[UsageAggregate]: ...

    def list_outstanding_operations(self, subscription_id: str) -> list[Operation]: ...

    def get_operation(self, subscription_id: str, operation_id: str) -> Operation: ...

    def update_operation(self, subscription_id: str, operation_id: str, status: UpdateStatus) -> None: ...


class SubscriptionStore(Protocol):
    """Our records: subscriptions, their history, webhook operation markers and reconciler runs."""

    metrics: StorageMetrics
    #: called with the subscription id after a change that wrote an outbox event (the relay)
    on_event_written: Callable[[str], object] | None

    def ensure_tables(self) -> None: ...

    def check(self) -> None: ...

    def get(self, subscription_id: str) -> StoredRecord | None: ...

    def get_marker(self, subscription_id: str, operation_id: str) -> OperationMarker | None: ...

    def history(self, subscription_id: str, *, since_seq: int = 0) -> list[dict[str, Any]]: ...

    def list_records(
        self, *, status: str = "", offer_id: str = "", plan_id: str = "", flagged: bool = False
    ) -> Iterator[SubscriptionRecord]: ...

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
    ) -> tuple[list[SubscriptionRecord], bool]: ...

    def page_records(
        self,
        *,
        status: str = "",
        offer_id: str = "",
        plan_id: str = "",
        flagged: bool = False,
        page_size: int = 50,
        continuation: Any = None,
    ) -> tuple[list[SubscriptionRecord], Any]: ...

    def pending_events(self, subscription_id: str) -> list[OutboxEvent]: ...

    def list_markers(self, subscription_id: str) -> list[OperationMarker]: ...

    def list_events(self, subscription_id: str, *, since_seq: int = 0) -> list[OutboxEvent]: ...

    def scan(self, *, page_size: int = 1000, delivered_since: datetime | None = None) -> Iterator[ScanItem]: ...

    def record_operation(
        self, subscription_id: str, operation_id: str, *, action: str, payload: str, correlation_id: str
    ) -> tuple[bool, OperationMarker]: ...

    def settle_marker(self, marker: OperationMarker, status: str) -> bool: ...

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
    ) -> Outcome | None: ...

    def get_checkpoint(self) -> dict[str, Any] | None: ...

    def save_checkpoint(self, state: dict[str, Any] | None) -> None: ...

    def save_run_summary(self, summary: dict[str, Any]) -> None: ...

    def latest_runs(self, count: int = 10) -> list[dict[str, Any]]: ...


class OutboxStore(Protocol):
    """The outbox side the event relay works on (its own connection: separate metrics)."""

    metrics: StorageMetrics
    clock: Callable[[], datetime]

    def pending_events(self, subscription_id: str) -> list[OutboxEvent]: ...

    def scan_pending_events(self) -> Iterator[OutboxEvent]: ...

    def mark_event_delivered(self, event: OutboxEvent) -> None: ...

    def note_event_attempt(self, event: OutboxEvent, error: str, *, queue_done: bool = False) -> None: ...

    def try_lease(self, subscription_id: str, seconds: float) -> str | None: ...

    def release_lease(self, subscription_id: str, etag: str) -> None: ...

    def lease_expiry(self, subscription_id: str) -> datetime | None: ...
