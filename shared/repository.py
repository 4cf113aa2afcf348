"""Azure Table Storage repository for subscriptions, their history, webhook operations and the outbox.

Schema (see docs/storage.md for the reasons): one table ``<prefix>subscriptions`` partitioned by
subscription id. A partition holds

* ``state``               the current record (ETag-guarded),
* ``history|0000000001``  append-only history entries, one per applied change,
* ``op|<operation id>``   the marker of a webhook operation (exactly-once handling),
* ``event|0000000001``    outbox rows: lifecycle events waiting for the relay.

Everything a change writes lives in one partition, so it is written in one entity group
transaction: the state row (conditional on its ETag), the history entry, the operation marker and
the outbox event either all exist or none do. A second table ``<prefix>runs`` holds the
reconciler's checkpoint and run summaries.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableServiceClient, TableTransactionError, UpdateMode

from shared.deadline import current_deadline
from shared.domain import AadIdentifier, format_timestamp, parse_timestamp, utc_now
from shared.errors import ConflictError, StorageRefusedError, StorageUnavailableError
from shared.state_machine import HistoryEntry, LocalStatus, Outcome, SubscriptionRecord

if TYPE_CHECKING:
    from shared.publisher_store import PublisherOperation

log = logging.getLogger(__name__)

STATE_ROW = "state"
HISTORY_PREFIX = "history|"
OPERATION_PREFIX = "op|"
EVENT_PREFIX = "event|"
LEASE_ROW = "relay-lease"
MAX_PAYLOAD_CHARS = 30_000  # a Table string property holds 64 KiB of UTF-16
MAX_PAGE_REQUESTS = 10  # a console page of a rare filter: at most this many short answers are joined
MAX_TEXT_PARTS = 12  # a long text spans properties Name, Name1..Name11: 360,000 characters, ~720 KiB
MAX_FIELD_CHARS = 4_000  # display copies of Marketplace fields in the state row (the entity is 1 MiB at most)

# Operation marker states
OP_RECEIVED = "received"  # recorded, not applied yet: the next delivery or the reconciler finishes it


def _seq_key(prefix: str, seq: int) -> str:
    return f"{prefix}{seq:010d}"


@dataclass
class StorageMetrics:
    """Counts storage round trips; the reconciler and benchmarks report them."""

    reads: int = 0
    writes: int = 0
    scanned_pages: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, reads: int = 0, writes: int = 0, pages: int = 0) -> None:
        with self._lock:
            self.reads += reads
            self.writes += writes
            self.scanned_pages += pages

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"reads": self.reads, "writes": self.writes, "scanned_pages": self.scanned_pages}


@dataclass(frozen=True)
class StoredRecord:
    record: SubscriptionRecord
    etag: str


@dataclass(frozen=True)
class OperationMarker:
    subscription_id: str
    operation_id: str
    action: str
    status: str
    received_at: datetime | None
    completed_at: datetime | None = None
    payload: str = ""
    correlation_id: str = ""
    etag: str = ""

    @property
    def pending(self) -> bool:
        return self.status == OP_RECEIVED


@dataclass(frozen=True)
class OutboxEvent:
    subscription_id: str
    seq: int
    event_id: str
    body: str  # the JSON document delivered to consumers
    created_at: datetime | None
    attempts: int = 0
    etag: str = ""
    queue_done: bool = False
    hook_done: bool = False
    last_attempt_at: datetime | None = None
    event_type: str = ""
    pending: bool = True
    delivered_at: datetime | None = None
    last_error: str = ""


@dataclass(frozen=True)
class ScanItem:
    """One row of the reconciler's single scan."""

    kind: str  # "state" | "op" | "event" (waiting) | "delivered" (see scan's delivered_since) | "pubop"
    stored: StoredRecord | None = None
    marker: OperationMarker | None = None
    event: OutboxEvent | None = None
    publisher_operation: PublisherOperation | None = None  # not settled yet


# ---------------------------------------------------------------------------------------------
# entity mapping


def split_text(name: str, text: str) -> dict[str, str]:
    """``text`` as properties ``name``, ``name1``, ... of at most MAX_PAYLOAD_CHARS each, so a long
    JSON document is stored whole (never cut into invalid JSON). ValueError beyond MAX_TEXT_PARTS."""
    parts = [text[i : i + MAX_PAYLOAD_CHARS] for i in range(0, len(text), MAX_PAYLOAD_CHARS)] or [""]
    if len(parts) > MAX_TEXT_PARTS:
        raise ValueError(f"{name} is too long to store ({len(text)} characters)")
    return {(name if index == 0 else f"{name}{index}"): part for index, part in enumerate(parts)}


def join_text(entity: Mapping[str, Any], name: str, default: str = "") -> str:
    """The text ``split_text`` stored (a single-property value too)."""
    first = entity.get(name)
    if first is None:
        return default
    parts = [str(first)]
    for index in range(1, MAX_TEXT_PARTS):
        part = entity.get(f"{name}{index}")
        if part is None:
            break
        parts.append(str(part))
    return "".join(parts)


def _field(value: str) -> str:
    """A display copy of a Marketplace field: whole unless absurdly long (Microsoft's own fields are short)."""
    return value if len(value) <= MAX_FIELD_CHARS else value[: MAX_FIELD_CHARS - 1] + "\u2026"


def _dt(value: Any) -> datetime | None:
    return parse_timestamp(value) if value not in (None, "") else None


def record_to_entity(record: SubscriptionRecord) -> dict[str, Any]:
    entity: dict[str, Any] = {
        "PartitionKey": record.id,
        "RowKey": STATE_ROW,
        "Kind": "state",
        "Status": record.status.value,
        "MarketplaceStatus": record.marketplace_status,
        "Name": _field(record.name),
        "OfferId": _field(record.offer_id),
        "PlanId": _field(record.plan_id),
        "Quantity": -1 if record.quantity is None else record.quantity,
        "PublisherId": _field(record.publisher_id),
        "Purchaser": json.dumps({k: _field(str(v)) for k, v in record.purchaser.to_api().items()}),
        "Beneficiary": json.dumps({k: _field(str(v)) for k, v in record.beneficiary.to_api().items()}),
        "TermUnit": _field(record.term_unit),
        "IsFreeTrial": record.is_free_trial,
        "AutoRenew": record.auto_renew,
        "IsTest": record.is_test,
        "SandboxType": _field(record.sandbox_type),
        "SessionMode": _field(record.session_mode),
        "AllowedCustomerOperations": _field(",".join(record.allowed_customer_operations)),
        "SignedInUser": _field(record.signed_in_user),
        "ActivatedBy": _field(record.activated_by),
        "ActivationAttempts": record.activation_attempts,
        "Flags": ",".join(record.flags),
        "NeedsAttention": record.needs_attention,
        "PendingOperationId": record.pending_operation_id,
        "HistorySeq": record.history_seq,
    }
    for name, value in (
        ("TermStart", record.term_start),
        ("TermEnd", record.term_end),
        ("LastEventAt", record.last_event_at),
        ("CreatedAt", record.created_at),
        ("UpdatedAt", record.updated_at),
        ("ActivationRequestedAt", record.activation_requested_at),
        ("UnsubscribedAt", record.unsubscribed_at),
        ("RetainDataUntil", record.retain_data_until),
    ):
        entity[name] = format_timestamp(value)  # ISO strings: exact, sortable, no EDM surprises
    return entity


def _identifier(text: str) -> AadIdentifier:
    try:
        return AadIdentifier.from_api(json.loads(text or "{}"))
    except ValueError:
        return AadIdentifier()


def record_from_entity(entity: dict[str, Any]) -> SubscriptionRecord:
    quantity = entity.get("Quantity")
    return SubscriptionRecord(
        id=entity["PartitionKey"],
        status=LocalStatus.parse(entity.get("Status", LocalStatus.PENDING_FULFILLMENT_START.value)),
        marketplace_status=entity.get("MarketplaceStatus", ""),
        name=entity.get("Name", ""),
        offer_id=entity.get("OfferId", ""),
        plan_id=entity.get("PlanId", ""),
        quantity=None if quantity is None or quantity < 0 else int(quantity),
        publisher_id=entity.get("PublisherId", ""),
        purchaser=_identifier(entity.get("Purchaser", "")),
        beneficiary=_identifier(entity.get("Beneficiary", "")),
        term_unit=entity.get("TermUnit", ""),
        term_start=_dt(entity.get("TermStart")),
        term_end=_dt(entity.get("TermEnd")),
        is_free_trial=bool(entity.get("IsFreeTrial", False)),
        auto_renew=bool(entity.get("AutoRenew", False)),
        is_test=bool(entity.get("IsTest", False)),
        sandbox_type=entity.get("SandboxType", ""),
        session_mode=entity.get("SessionMode", ""),
        allowed_customer_operations=tuple(x for x in entity.get("AllowedCustomerOperations", "").split(",") if x),
        last_event_at=_dt(entity.get("LastEventAt")),
        created_at=_dt(entity.get("CreatedAt")),
        updated_at=_dt(entity.get("UpdatedAt")),
        signed_in_user=entity.get("SignedInUser", ""),
        activated_by=entity.get("ActivatedBy", ""),
        activation_requested_at=_dt(entity.get("ActivationRequestedAt")),
        activation_attempts=int(entity.get("ActivationAttempts", 0) or 0),
        unsubscribed_at=_dt(entity.get("UnsubscribedAt")),
        retain_data_until=_dt(entity.get("RetainDataUntil")),
        flags=tuple(x for x in entity.get("Flags", "").split(",") if x),
        pending_operation_id=entity.get("PendingOperationId", "") or "",
        history_seq=int(entity.get("HistorySeq", 0) or 0),
    )


def fit_event_body(body: str) -> str:
    """An event document that fits the outbox row (see ``shrink_json``)."""
    limit = MAX_PAYLOAD_CHARS * MAX_TEXT_PARTS
    return shrink_json(body, lambda text: len(text) <= limit)


def shrink_json(text: str, fits: Callable[[str], bool]) -> str:
    """``text`` (a JSON document) if it ``fits``; otherwise the same document with its longest
    strings shortened (each ends with "…[truncated]") until it does: valid JSON either way, never
    a cut text."""
    if fits(text):
        return text
    document = json.loads(text)
    cap = 8_000
    while True:
        shrunk = json.dumps(_shrink_strings(document, cap), sort_keys=True)
        if fits(shrunk) or cap <= 64:
            return shrunk
        cap //= 2


def _shrink_strings(value: Any, cap: int) -> Any:
    if isinstance(value, str) and len(value) > cap:
        return value[:cap] + "\u2026[truncated]"
    if isinstance(value, dict):
        return {key: _shrink_strings(item, cap) for key, item in value.items()}
    if isinstance(value, list):
        return [_shrink_strings(item, cap) for item in value]
    return value


def _bounded_entry(document: dict[str, Any]) -> str:
    """History must stay valid JSON: drop the bulky parts rather than cut the text."""
    text = json.dumps(document)
    if len(text) <= MAX_PAYLOAD_CHARS:
        return text
    slim = {**document, "changes": {"omitted": "too large to store"}, "detail": str(document.get("detail", ""))[:1000]}
    return json.dumps(slim)


def _history_to_entity(subscription_id: str, entry: HistoryEntry) -> dict[str, Any]:
    return {
        "PartitionKey": subscription_id,
        "RowKey": _seq_key(HISTORY_PREFIX, entry.seq),
        "Kind": "history",
        "Entry": _bounded_entry(entry.to_json()),
        "Source": entry.source,
        "Result": entry.result,
    }


def _marker_from_entity(entity: dict[str, Any]) -> OperationMarker:
    return OperationMarker(
        subscription_id=entity["PartitionKey"],
        operation_id=entity["RowKey"][len(OPERATION_PREFIX) :],
        action=entity.get("Action", ""),
        status=entity.get("Status", ""),
        received_at=_dt(entity.get("ReceivedAt")),
        completed_at=_dt(entity.get("CompletedAt")),
        payload=join_text(entity, "Payload"),
        correlation_id=entity.get("CorrelationId", ""),
        etag=entity.metadata["etag"] if hasattr(entity, "metadata") else "",
    )


def _event_from_entity(entity: dict[str, Any]) -> OutboxEvent:
    return OutboxEvent(
        subscription_id=entity["PartitionKey"],
        seq=int(entity["RowKey"][len(EVENT_PREFIX) :]),
        event_id=entity.get("EventId", ""),
        body=join_text(entity, "Body", "{}"),
        created_at=_dt(entity.get("CreatedAt")),
        attempts=int(entity.get("Attempts", 0) or 0),
        etag=entity.metadata["etag"] if hasattr(entity, "metadata") else "",
        queue_done=bool(entity.get("QueueDone", False)),
        hook_done=bool(entity.get("HookDone", False)),
        last_attempt_at=_dt(entity.get("LastAttemptAt")),
        event_type=entity.get("EventType", ""),
        pending=bool(entity.get("Pending", False)),
        delivered_at=_dt(entity.get("DeliveredAt")),
        last_error=entity.get("LastError", ""),
    )


def _records_query(status: str, offer_id: str, plan_id: str, flagged: bool) -> tuple[str, dict[str, Any]]:
    """The state rows' filter: server-side, parameterised (never string-built from input)."""
    clauses, params = ["RowKey eq @state"], {"state": STATE_ROW}
    for column, value in (("Status", status), ("OfferId", offer_id), ("PlanId", plan_id)):
        if value:
            clauses.append(f"{column} eq @{column.lower()}")
            params[column.lower()] = value
    if flagged:
        clauses.append("NeedsAttention eq true")
    return " and ".join(clauses), params


def matches_text(text: str, record_id: str, name: str, purchaser_email: str, beneficiary_email: str) -> bool:
    """The console's text search: a case-insensitive substring of the id, name or either e-mail."""
    needle = text.lower()
    return any(needle in (value or "").lower() for value in (record_id, name, purchaser_email, beneficiary_email))


# The columns the text search reads: the SDK's cost is per column, and a state row has about 30.
SEARCHED_COLUMNS = ["PartitionKey", "Name", "Purchaser", "Beneficiary"]


# Signature of the function that builds the outbox event for an outcome (see shared.events).
EventBuilder = Callable[[Outcome, int], tuple[str, str]]


class SubscriptionRepository:
    """Subscriptions, history, webhook operation markers, outbox and reconciler runs."""

    def __init__(
        self,
        service: TableServiceClient,
        prefix: str = "saas",
        *,
        metrics: StorageMetrics | None = None,
        clock: Callable[[], datetime] = utc_now,
    ):
        self._service = service
        # The services bundle's clock (build_services passes it): every time this repository
        # writes (receipts, leases, deliveries) follows the same clock as the use cases' decisions.
        self.clock = clock
        self.prefix = prefix
        self.subscriptions_table_name = f"{prefix}subscriptions"
        self.runs_table_name = f"{prefix}runs"
        self._subscriptions_client = service.get_table_client(self.subscriptions_table_name)
        self._runs_client = service.get_table_client(self.runs_table_name)
        self.metrics = metrics or StorageMetrics()
        self._tables_ready = False
        # Called with the subscription id after a change that wrote an outbox event (the relay).
        self.on_event_written: Callable[[str], object] | None = None

    # -- setup and health --------------------------------------------------------------------

    def sibling(self) -> SubscriptionRepository:
        """Same tables and connection, separate metrics (background work must not skew a run's counts)."""
        other = SubscriptionRepository(self._service, self.prefix, clock=self.clock)
        other._tables_ready = self._tables_ready
        return other

    @property
    def _subscriptions(self):
        self.ensure_tables()  # a fresh storage account has no tables: create them on first use
        return self._subscriptions_client

    @property
    def _runs(self):
        self.ensure_tables()
        return self._runs_client

    def ensure_tables(self) -> None:
        if self._tables_ready:
            return
        with _storage_errors("create tables"):
            for name in (self.subscriptions_table_name, self.runs_table_name):
                self._service.create_table_if_not_exists(name)
        self._tables_ready = True

    def check(self) -> None:
        """Raise StorageUnavailableError unless the subscriptions table answers."""
        self.ensure_tables()
        with _storage_errors("health check"):
            next(iter(self._subscriptions.query_entities("RowKey eq 'health'", results_per_page=1)), None)

    # -- reads ---------------------------------------------------------------------------------

    def get(self, subscription_id: str) -> StoredRecord | None:
        with _storage_errors("read subscription"):
            self.metrics.add(reads=1)
            try:
                entity = self._subscriptions.get_entity(subscription_id, STATE_ROW)
            except ResourceNotFoundError:
                return None
        return StoredRecord(record_from_entity(entity), entity.metadata["etag"])

    def get_marker(self, subscription_id: str, operation_id: str) -> OperationMarker | None:
        with _storage_errors("read operation marker"):
            self.metrics.add(reads=1)
            try:
                entity = self._subscriptions.get_entity(subscription_id, OPERATION_PREFIX + operation_id)
            except ResourceNotFoundError:
                return None
        return _marker_from_entity(entity)

    def list_markers(self, subscription_id: str) -> list[OperationMarker]:
        """The subscription's webhook operation markers (what Microsoft notified and how it ended)."""
        query = "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi"
        params = {"pk": subscription_id, "lo": OPERATION_PREFIX, "hi": OPERATION_PREFIX[:-1] + chr(ord("|") + 1)}
        with _storage_errors("read operation markers"):
            rows = list(self._subscriptions.query_entities(query, parameters=params))
            self.metrics.add(reads=1)
        return sorted((_marker_from_entity(row) for row in rows), key=lambda m: m.received_at or datetime.min.replace(tzinfo=UTC))

    def history(self, subscription_id: str, *, since_seq: int = 0) -> list[dict[str, Any]]:
        """The subscription's history, oldest first; ``since_seq`` keeps entries from that seq on
        (a metered subscription gains an entry an hour: the console reads only the latest)."""
        rows = self._sequence_rows(subscription_id, HISTORY_PREFIX, since_seq, "read history")
        return [json.loads(row["Entry"]) for row in sorted(rows, key=lambda r: r["RowKey"])]

    def _sequence_rows(self, subscription_id: str, prefix: str, since_seq: int, what: str) -> list[Any]:
        """The rows ``<prefix><seq>`` of one subscription from ``since_seq`` on: one range query."""
        query = "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi"
        lo = _seq_key(prefix, since_seq) if since_seq > 0 else prefix
        params = {"pk": subscription_id, "lo": lo, "hi": prefix[:-1] + chr(ord("|") + 1)}
        with _storage_errors(what):
            rows = list(self._subscriptions.query_entities(query, parameters=params))
            self.metrics.add(reads=1)
        return rows

    def list_records(
        self, *, status: str = "", offer_id: str = "", plan_id: str = "", flagged: bool = False
    ) -> Iterator[SubscriptionRecord]:
        query, params = _records_query(status, offer_id, plan_id, flagged)
        with _storage_errors("list subscriptions"):
            pages = self._subscriptions.query_entities(query, parameters=params).by_page()
            for page in pages:
                self.metrics.add(reads=1, pages=1)
                for entity in page:
                    yield record_from_entity(entity)

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
        """Records matching ``text`` (see matches_text) in key order, and whether the scan was cut short.

        No index serves a substring: this reads only the searched columns of at most ``scan_limit``
        state rows, then each match whole (one point read each, at most ``limit``)."""
        query, params = _records_query(status, offer_id, plan_id, flagged)
        matched: list[str] = []
        scanned = 0
        with _storage_errors("search subscriptions"):
            pages = self._subscriptions.query_entities(query, parameters=params, select=SEARCHED_COLUMNS).by_page()
            for page in pages:
                self.metrics.add(reads=1, pages=1)
                for entity in page:
                    scanned += 1
                    purchaser = _identifier(entity.get("Purchaser", "")).email_id
                    beneficiary = _identifier(entity.get("Beneficiary", "")).email_id
                    if matches_text(text, entity["PartitionKey"], entity.get("Name", ""), purchaser, beneficiary):
                        matched.append(entity["PartitionKey"])
                    if len(matched) >= limit or scanned >= scan_limit:
                        break
                if len(matched) >= limit or scanned >= scan_limit:
                    break
        found = (self.get(subscription_id) for subscription_id in matched)
        return [stored.record for stored in found if stored is not None], scanned >= scan_limit

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
        """One page of records and the token of the next (None at the end).

        Table storage may answer a filtered query with fewer matches than asked, even none, plus a
        continuation token (it stops at 1,000 entities scanned, 5 s, or a partition range boundary):
        the page is filled with at most MAX_PAGE_REQUESTS requests, each asking only for what is missing.
        """
        query, params = _records_query(status, offer_id, plan_id, flagged)
        entities: list[Any] = []
        token = continuation
        with _storage_errors("page subscriptions"):
            for _ in range(MAX_PAGE_REQUESTS):
                pages = self._subscriptions.query_entities(
                    query, parameters=params, results_per_page=page_size - len(entities)
                ).by_page(continuation_token=token)
                entities.extend(next(pages, []))
                self.metrics.add(reads=1, pages=1)
                token = pages.continuation_token
                if not token or len(entities) >= page_size:
                    break
        return [record_from_entity(entity) for entity in entities], token

    def scan(self, *, page_size: int = 1000, delivered_since: datetime | None = None) -> Iterator[ScanItem]:
        """The reconciler's one scan: every state row, pending operation marker and outbox row, and
        with ``delivered_since`` the lifecycle events delivered from then on (the console's chart of
        deliveries per hour: the same filtered scan, so no request of its own)."""
        query, params = "RowKey eq @state or Pending eq true", {"state": STATE_ROW}
        if delivered_since is not None:
            query += " or (Kind eq 'event' and DeliveredAt ge @since )"  # the SDK finds @names between spaces
            params["since"] = format_timestamp(delivered_since)
        with _storage_errors("scan"):
            pages = self._subscriptions.query_entities(query, parameters=params, results_per_page=page_size).by_page()
            for page in pages:
                self.metrics.add(reads=1, pages=1)
                for entity in page:
                    kind = entity.get("Kind")
                    if kind == "state":
                        yield ScanItem("state", stored=StoredRecord(record_from_entity(entity), entity.metadata["etag"]))
                    elif kind == "op":
                        yield ScanItem("op", marker=_marker_from_entity(entity))
                    elif kind == "event":
                        yield ScanItem("event" if entity.get("Pending") else "delivered", event=_event_from_entity(entity))
                    elif kind == "pubop":
                        from shared.publisher_store import operation_from_entity

                        yield ScanItem("pubop", publisher_operation=operation_from_entity(entity))

    def list_events(self, subscription_id: str, *, since_seq: int = 0) -> list[OutboxEvent]:
        """The subscription's lifecycle events (delivered or waiting), oldest first, from ``since_seq`` on."""
        rows = self._sequence_rows(subscription_id, EVENT_PREFIX, since_seq, "read events")
        return sorted((_event_from_entity(row) for row in rows), key=lambda e: e.seq)

    def pending_events(self, subscription_id: str) -> list[OutboxEvent]:
        query = "PartitionKey eq @pk and Pending eq true"
        with _storage_errors("read outbox"):
            self.metrics.add(reads=1)
            rows = list(self._subscriptions.query_entities(query, parameters={"pk": subscription_id}))
        events = [_event_from_entity(r) for r in rows if r.get("Kind") == "event"]
        return sorted(events, key=lambda e: e.seq)

    # -- writes --------------------------------------------------------------------------------

    def record_operation(
        self, subscription_id: str, operation_id: str, *, action: str, payload: str, correlation_id: str
    ) -> tuple[bool, OperationMarker]:
        """Durably note that a webhook operation arrived. Returns (created, marker)."""
        now = self.clock()
        # Whole or not at all: a replay parses it. Bodies are capped by WEBHOOK_MAX_BODY_BYTES anyway.
        stored_payload = payload if len(payload) <= MAX_PAYLOAD_CHARS * MAX_TEXT_PARTS else "{}"
        entity = {
            "PartitionKey": subscription_id,
            "RowKey": OPERATION_PREFIX + operation_id,
            "Kind": "op",
            "Action": action,
            "Status": OP_RECEIVED,
            "Pending": True,
            "ReceivedAt": format_timestamp(now),
            **split_text("Payload", stored_payload),
            "CorrelationId": correlation_id,
        }
        with _storage_errors("record operation"):
            self.metrics.add(writes=1)
            try:
                metadata = self._subscriptions.create_entity(entity)
            except ResourceExistsError:
                existing = self.get_marker(subscription_id, operation_id)
                if existing is None:  # deleted in between: treat as fresh
                    raise ConflictError("operation marker vanished") from None
                return False, existing
        # The insert's answer carries the ETag: no read-back needed.
        return True, OperationMarker(
            subscription_id,
            operation_id,
            action,
            OP_RECEIVED,
            now,
            payload=stored_payload,
            correlation_id=correlation_id,
            etag=metadata["etag"],
        )

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
        """Read-decide-write with optimistic concurrency; the decision is re-made after a conflict.

        ``decide`` gets the current record (None if we never saw the subscription) and returns the
        state machine's Outcome, or None to write nothing. With ``operation_id`` the operation's
        marker is settled in the same transaction, and the whole call does nothing (returns None)
        if the marker is already settled: a duplicate delivery. ``known`` and ``known_marker`` skip
        the first reads (the caller just read or wrote those rows); a stale ETag costs one retry.
        ``extra_rows`` are merged into rows of the same partition in the same transaction (e.g. the
        publisher operation a change settles).
        """
        for attempt in range(attempts):
            first = attempt == 0
            stored = known if first and known is not None else self.get(subscription_id)
            marker = None
            if operation_id:
                marker = known_marker if first and known_marker is not None else self.get_marker(subscription_id, operation_id)
                if marker is not None and not marker.pending:
                    return None
            outcome = decide(stored.record if stored else None)
            if outcome is None:
                return None
            try:
                self._write(subscription_id, stored, outcome, marker, operation_id, build_event, extra_rows)
            except _Conflict:
                log.info("concurrent update of subscription %s, retrying (attempt %s)", subscription_id, attempt + 1)
                continue
            if outcome.event_type and build_event is not None and self.on_event_written is not None:
                try:
                    self.on_event_written(subscription_id)
                except Exception:  # noqa: BLE001 - delivery is retried by the relay pass
                    log.warning("could not start event delivery for %s", subscription_id)
            return outcome
        raise ConflictError(f"subscription {subscription_id} kept changing; gave up after {attempts} attempts")

    def _write(
        self,
        subscription_id: str,
        stored: StoredRecord | None,
        outcome: Outcome,
        marker: OperationMarker | None,
        operation_id: str,
        build_event: EventBuilder | None,
        extra_rows: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        state = record_to_entity(outcome.record)
        operations: list[tuple] = []
        if stored is None:
            operations.append(("create", state))
        else:
            operations.append(
                (
                    "update",
                    state,
                    {"mode": UpdateMode.REPLACE, "etag": stored.etag, "match_condition": MatchConditions.IfNotModified},
                )
            )
        operations.append(("create", _history_to_entity(subscription_id, outcome.history)))
        now = format_timestamp(self.clock())
        if operation_id:
            settled = {
                "PartitionKey": subscription_id,
                "RowKey": OPERATION_PREFIX + operation_id,
                "Kind": "op",
                "Status": outcome.result.value,
                "Pending": False,
                "CompletedAt": now,
                "HistorySeq": outcome.history.seq,
            }
            if marker is not None:
                operations.append(
                    (
                        "update",
                        settled,
                        {"mode": UpdateMode.MERGE, "etag": marker.etag, "match_condition": MatchConditions.IfNotModified},
                    )
                )
            else:
                operations.append(("create", {**settled, "ReceivedAt": now}))
        if outcome.event_type and build_event is not None:
            seq = outcome.history.seq
            event_id, body = build_event(outcome, seq)
            operations.append(
                (
                    "create",
                    {
                        "PartitionKey": subscription_id,
                        "RowKey": _seq_key(EVENT_PREFIX, seq),
                        "Kind": "event",
                        "Pending": True,
                        "EventId": event_id,
                        "EventType": outcome.event_type,
                        **split_text("Body", fit_event_body(body)),
                        "CreatedAt": now,
                        "Attempts": 0,
                    },
                )
            )
        for row in extra_rows:
            operations.append(("upsert", {**row, "PartitionKey": subscription_id}, {"mode": UpdateMode.MERGE}))
        with _storage_errors("write change"):
            self.metrics.add(writes=1)
            try:
                self._subscriptions.submit_transaction(operations)
            except TableTransactionError as error:
                if error.status_code in (409, 412):
                    raise _Conflict() from error
                raise

    def settle_marker(self, marker: OperationMarker, status: str) -> bool:
        """Settle a marker without a state change (refused, verified away). False if someone else did."""
        entity = {
            "PartitionKey": marker.subscription_id,
            "RowKey": OPERATION_PREFIX + marker.operation_id,
            "Status": status,
            "Pending": False,
            "CompletedAt": format_timestamp(self.clock()),
        }
        with _storage_errors("settle operation"):
            self.metrics.add(writes=1)
            try:
                self._subscriptions.update_entity(
                    entity, mode=UpdateMode.MERGE, etag=marker.etag, match_condition=MatchConditions.IfNotModified
                )
            except (ResourceModifiedError, ResourceNotFoundError):
                return False
        return True

    def scan_pending_events(self) -> Iterator[OutboxEvent]:
        """Every undelivered outbox row, in one filtered scan (the relay timer's work list)."""
        with _storage_errors("scan outbox"):
            pages = self._subscriptions.query_entities("Pending eq true and Kind eq 'event'").by_page()
            for page in pages:
                self.metrics.add(reads=1, pages=1)
                for entity in page:
                    yield _event_from_entity(entity)

    def mark_event_delivered(self, event: OutboxEvent) -> None:
        entity = {
            "PartitionKey": event.subscription_id,
            "RowKey": _seq_key(EVENT_PREFIX, event.seq),
            "Pending": False,
            "QueueDone": True,
            "HookDone": True,
            "DeliveredAt": format_timestamp(self.clock()),
        }
        with _storage_errors("mark event delivered"):
            self.metrics.add(writes=1)
            self._subscriptions.update_entity(entity, mode=UpdateMode.MERGE)

    def note_event_attempt(self, event: OutboxEvent, error: str, *, queue_done: bool = False) -> None:
        """A failed delivery attempt; ``queue_done``: the events queue has it (not sent again)."""
        entity: dict[str, Any] = {
            "PartitionKey": event.subscription_id,
            "RowKey": _seq_key(EVENT_PREFIX, event.seq),
            "Attempts": event.attempts + 1,
            "LastError": error[:1000],
            "LastAttemptAt": format_timestamp(self.clock()),
        }
        if queue_done:
            entity["QueueDone"] = True
        with _storage_errors("note event attempt"):
            self.metrics.add(writes=1)
            self._subscriptions.update_entity(entity, mode=UpdateMode.MERGE)

    # -- relay lease: one deliverer per subscription at a time, across instances ----------------

    def try_lease(self, subscription_id: str, seconds: float) -> str | None:
        """Take the subscription's relay lease; returns its ETag, or None while someone else holds it."""
        now = self.clock()
        until = format_timestamp(now + timedelta(seconds=seconds))
        with _storage_errors("take relay lease"):
            self.metrics.add(reads=1, writes=1)
            try:
                current = self._subscriptions.get_entity(subscription_id, LEASE_ROW)
            except ResourceNotFoundError:
                try:
                    meta = self._subscriptions.create_entity(
                        {"PartitionKey": subscription_id, "RowKey": LEASE_ROW, "Kind": "lease", "LeaseUntil": until}
                    )
                except ResourceExistsError:
                    return None
                return meta["etag"]
            held_until = _dt(current.get("LeaseUntil"))
            if held_until is not None and held_until > now:
                return None
            try:
                meta = self._subscriptions.update_entity(
                    {"PartitionKey": subscription_id, "RowKey": LEASE_ROW, "Kind": "lease", "LeaseUntil": until},
                    mode=UpdateMode.REPLACE,
                    etag=current.metadata["etag"],
                    match_condition=MatchConditions.IfNotModified,
                )
            except (ResourceModifiedError, ResourceNotFoundError):
                return None
            return meta["etag"]

    def lease_expiry(self, subscription_id: str) -> datetime | None:
        """When the subscription's relay lease expires (None: not held)."""
        with _storage_errors("read relay lease"):
            self.metrics.add(reads=1)
            try:
                current = self._subscriptions.get_entity(subscription_id, LEASE_ROW)
            except ResourceNotFoundError:
                return None
        until = _dt(current.get("LeaseUntil"))
        return until if until is not None and until > self.clock() else None

    def release_lease(self, subscription_id: str, etag: str) -> None:
        with _storage_errors("release relay lease"):
            self.metrics.add(writes=1)
            try:
                self._subscriptions.update_entity(
                    {"PartitionKey": subscription_id, "RowKey": LEASE_ROW, "Kind": "lease", "LeaseUntil": ""},
                    mode=UpdateMode.REPLACE,
                    etag=etag,
                    match_condition=MatchConditions.IfNotModified,
                )
            except (ResourceModifiedError, ResourceNotFoundError):
                pass  # expired and taken by someone else: theirs now

    # -- reconciler runs -------------------------------------------------------------------------

    def get_checkpoint(self) -> dict[str, Any] | None:
        with _storage_errors("read checkpoint"):
            self.metrics.add(reads=1)
            try:
                entity = self._runs.get_entity("reconcile", "checkpoint")
            except ResourceNotFoundError:
                return None
        return json.loads(join_text(entity, "State", "{}"))

    def save_checkpoint(self, state: dict[str, Any] | None) -> None:
        with _storage_errors("write checkpoint"):
            self.metrics.add(writes=1)
            if state is None:
                try:
                    self._runs.delete_entity("reconcile", "checkpoint")
                except ResourceNotFoundError:
                    pass
                return
            self._runs.upsert_entity(
                {"PartitionKey": "reconcile", "RowKey": "checkpoint", **split_text("State", json.dumps(state))},
                mode=UpdateMode.REPLACE,
            )

    def save_run_summary(self, summary: dict[str, Any]) -> None:
        # Inverted time in the key lists the newest run first.
        key = f"run|{(10**13 - int(self.clock().timestamp() * 1000)):013d}"
        with _storage_errors("write run summary"):
            self.metrics.add(writes=1)
            self._runs.upsert_entity({"PartitionKey": "reconcile", "RowKey": key, **split_text("Summary", json.dumps(summary))})

    def latest_runs(self, count: int = 10) -> list[dict[str, Any]]:
        query = "PartitionKey eq 'reconcile' and RowKey ge 'run|' and RowKey lt 'run}'"
        with _storage_errors("read run summaries"):
            rows = self._runs.query_entities(query, results_per_page=count)
            out = []
            for row in rows:
                out.append(json.loads(join_text(row, "Summary", "{}")))
                if len(out) >= count:
                    break
        return out


class _Conflict(Exception):
    """An ETag or insert conflict inside a transaction; the caller re-reads and retries."""


# Table Storage's answers to a request that can never succeed as sent (bad key, value too large,
# entity too large): the same retry would fail the same way.
PERMANENT_STATUSES = frozenset({400, 413})


class _storage_errors:
    """Turn the SDK's errors into StorageRefusedError (permanent) or StorageUnavailableError (transient)."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(
            exc, (_Conflict, ConflictError, ResourceNotFoundError, ResourceExistsError, ResourceModifiedError)
        ):
            return False
        if isinstance(exc, TableTransactionError) and exc.status_code in (409, 412):
            return False
        if isinstance(exc, HttpResponseError) and exc.status_code in PERMANENT_STATUSES:
            log.error("storage refused %s as invalid (%s %s)", self.what, exc.status_code, type(exc).__name__)
            raise StorageRefusedError(f"storage refused {self.what} ({exc.status_code})") from exc
        if isinstance(exc, (AzureError, HttpResponseError, OSError)):
            log.warning("storage failed during %s: %s", self.what, type(exc).__name__)
            raise StorageUnavailableError(f"storage unavailable during {self.what}") from exc
        return False


def _bound_by_deadline(request: Any) -> None:
    """Per attempt (the SDK's retries included): inside a request deadline, wait only for what is left;
    with nothing left, start nothing (DeadlineExceededError, a 5xx)."""
    deadline = current_deadline()
    if deadline is None:
        return
    left = deadline.timeout(15.0, what="a storage request")
    request.context.options["connection_timeout"] = min(5.0, left)
    request.context.options["read_timeout"] = left


def pooled_transport(**timeouts: float) -> Any:
    """A requests transport whose pool is as large as the concurrency we run at (the SDK's default
    of 10 connections drops and reopens connections under a burst); for the table and queue clients."""
    import requests
    from azure.core.pipeline.transport import RequestsTransport

    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=64))
    session.mount("https://", requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=64))
    return RequestsTransport(session=session, session_owner=False, **timeouts)


def table_service_from_settings(settings) -> TableServiceClient:
    """Connection string (Azurite) or endpoint + managed identity (Azure). Short timeouts, few retries."""
    timeouts = {"connection_timeout": 5, "read_timeout": 15}
    options: dict[str, Any] = {
        "raw_request_hook": _bound_by_deadline,
        "retry_total": 2,
        "retry_backoff_factor": 0.4,
        **timeouts,
        "transport": pooled_transport(**timeouts),
    }
    if settings.tables_connection_string:
        return TableServiceClient.from_connection_string(settings.tables_connection_string, **options)
    from shared.credentials import storage_credential

    return TableServiceClient(endpoint=settings.tables_endpoint, credential=storage_credential(settings), **options)
