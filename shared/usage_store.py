"""Storage of metered usage: reported events, the hourly buckets sent to Microsoft, and their indexes.

One table ``<prefix>usage`` (see docs/storage.md, "Metering"):

* ``<subscription id>|<yyyymmddhh>``: one partition per subscription and UTC hour
  - ``r|<dimension>|<event id>``: one reported event, **insert only** (never read-modify-written);
  - ``b|<dimension>``: the bucket, written by the emitter (ETag-guarded): what was sent, Microsoft's
    answer, late usage carried out of it;
  - ``c|<dimension>|<from hour>|<n>``: late usage carried into this hour, insert only.
* ``<subscription id>|id``: the caller's event ids (``RowKey`` = id), so a repeated id is counted once
  even when it would fall into another hour.
* ``pending``: ``<yyyymmddhh>|<subscription id>``, upserted after every write into an hour; the
  emitter's work list, oldest hour first, deleted (ETag-conditional) once the hour is settled.
* ``flagged``: ``<yyyymmddhh>|<subscription id>|<dimension>``: buckets that need a person.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableTransactionError, UpdateMode

from shared.domain import format_timestamp, parse_timestamp
from shared.repository import _storage_errors

if TYPE_CHECKING:
    from shared.repository import SubscriptionRepository

log = logging.getLogger(__name__)

EVENT_PREFIX = "r|"
BUCKET_PREFIX = "b|"
CARRY_PREFIX = "c|"
PENDING_PARTITION = "pending"
FLAGGED_PARTITION = "flagged"
SUMMARY_PARTITION = "summary"
ID_PARTITION_SUFFIX = "|id"
TRANSACTION_LIMIT = 100  # Table storage: operations per entity group transaction
# Below this many rows, plain inserts cost less: the SDK spends ~7 ms of CPU building any multipart
# transaction body, a single insert ~2 ms (measured against Azurite; docs/benchmarks.md).
TRANSACTION_MIN_ROWS = 6

# Bucket statuses (ours; Microsoft's per-item answer is kept in MarketplaceStatus)
SENT_PENDING = "Pending"  # not sent yet, or sent without an answer (429, 5xx, timeout): sent again
ACCEPTED = "Accepted"  # Microsoft has it (Accepted, or Duplicate with the same quantity)
FLAGGED = "Flagged"  # Microsoft refused it, or kept another quantity: a person decides
EXPIRED = "Expired"  # the 24-hour window closed before Microsoft accepted it
SETTLED_STATUSES = frozenset({ACCEPTED, FLAGGED, EXPIRED})


def hour_of(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def hour_key(hour: datetime) -> str:
    return hour.astimezone(UTC).strftime("%Y%m%d%H")


def hour_from_key(key: str) -> datetime:
    return datetime.strptime(key, "%Y%m%d%H").replace(tzinfo=UTC)


def partition_of(subscription_id: str, hour: datetime) -> str:
    return f"{subscription_id}|{hour_key(hour)}"


def decimal_of(value: Any) -> Decimal:
    try:
        return Decimal(str(value)) if value not in (None, "") else Decimal(0)
    except InvalidOperation:
        return Decimal(0)


@dataclass(frozen=True)
class UsageRow:
    """One reported event as stored."""

    dimension: str
    event_id: str
    quantity: Decimal
    plan_id: str
    effective_start_time: datetime | None
    reported_at: datetime | None = None
    caller: str = ""


@dataclass(frozen=True)
class Carry:
    """Late usage carried into an hour (``into``) from an hour already sent (``from_hour``)."""

    dimension: str
    from_hour: str
    number: int
    quantity: Decimal
    plan_id: str


@dataclass(frozen=True)
class Bucket:
    """What the emitter knows about one (subscription, hour, dimension)."""

    subscription_id: str
    hour: datetime
    dimension: str
    status: str = SENT_PENDING
    plan_id: str = ""
    quantity: Decimal = Decimal(0)  # what was sent (or found expired)
    events: int = 0  # reported events the sent quantity covered
    carried_in: Decimal = Decimal(0)  # part of ``quantity`` that was late usage of earlier hours
    marketplace_status: str = ""
    usage_event_id: str = ""
    message: str = ""
    attempts: int = 0
    sent_at: datetime | None = None
    carried_out: Decimal = Decimal(0)  # late usage moved to a later hour
    carry_count: int = 0
    unbillable: Decimal = Decimal(0)  # late usage recorded, never billed (METERING_LATE_USAGE=unbillable)
    etag: str = ""

    @property
    def settled(self) -> bool:
        return self.status in SETTLED_STATUSES

    def to_api(self) -> dict[str, Any]:
        return {
            "subscriptionId": self.subscription_id,
            "hour": format_timestamp(self.hour),
            "dimension": self.dimension,
            "planId": self.plan_id,
            "status": self.status,
            "quantity": float(self.quantity),
            "events": self.events,
            "carriedIn": float(self.carried_in),
            "carriedOut": float(self.carried_out),
            "unbillable": float(self.unbillable),
            "marketplaceStatus": self.marketplace_status,
            "usageEventId": self.usage_event_id or None,
            "message": self.message,
            "attempts": self.attempts,
            "sentAt": format_timestamp(self.sent_at) if self.sent_at else None,
        }


@dataclass
class HourPartition:
    """Everything stored for one subscription and hour."""

    subscription_id: str
    hour: datetime
    rows: list[UsageRow] = field(default_factory=list)
    carries: list[Carry] = field(default_factory=list)
    buckets: dict[str, Bucket] = field(default_factory=dict)


@dataclass(frozen=True)
class PendingHour:
    subscription_id: str
    hour: datetime
    etag: str


@dataclass(frozen=True)
class IdRecord:
    """Where a caller's event id was counted."""

    event_id: str
    hour: datetime
    dimension: str
    quantity: Decimal
    plan_id: str
    effective_start_time: datetime | None


def _bucket_from_entity(subscription_id: str, hour: datetime, entity: Any) -> Bucket:
    return Bucket(
        subscription_id=subscription_id,
        hour=hour,
        dimension=entity["RowKey"][len(BUCKET_PREFIX) :],
        status=entity.get("Status", SENT_PENDING),
        plan_id=entity.get("PlanId", ""),
        quantity=decimal_of(entity.get("Quantity")),
        events=int(entity.get("Events", 0) or 0),
        carried_in=decimal_of(entity.get("CarriedIn")),
        marketplace_status=entity.get("MarketplaceStatus", ""),
        usage_event_id=entity.get("UsageEventId", ""),
        message=entity.get("Message", ""),
        attempts=int(entity.get("Attempts", 0) or 0),
        sent_at=parse_timestamp(entity.get("SentAt")),
        carried_out=decimal_of(entity.get("CarriedOut")),
        carry_count=int(entity.get("CarryCount", 0) or 0),
        unbillable=decimal_of(entity.get("Unbillable")),
        etag=entity.metadata["etag"] if hasattr(entity, "metadata") else "",
    )


def bucket_entity(bucket: Bucket) -> dict[str, Any]:
    return {
        "PartitionKey": partition_of(bucket.subscription_id, bucket.hour),
        "RowKey": BUCKET_PREFIX + bucket.dimension,
        "Kind": "bucket",
        "Status": bucket.status,
        "PlanId": bucket.plan_id,
        "Quantity": str(bucket.quantity),
        "Events": bucket.events,
        "CarriedIn": str(bucket.carried_in),
        "MarketplaceStatus": bucket.marketplace_status,
        "UsageEventId": bucket.usage_event_id,
        "Message": bucket.message[:2000],
        "Attempts": bucket.attempts,
        "SentAt": format_timestamp(bucket.sent_at) if bucket.sent_at else "",
        "CarriedOut": str(bucket.carried_out),
        "CarryCount": bucket.carry_count,
        "Unbillable": str(bucket.unbillable),
    }


def _id_entity(subscription_id: str, record: IdRecord) -> dict[str, Any]:
    return {
        "PartitionKey": subscription_id + ID_PARTITION_SUFFIX,
        "RowKey": record.event_id,
        "Kind": "id",
        "Hour": hour_key(record.hour),
        "Dimension": record.dimension,
        "Quantity": str(record.quantity),
        "PlanId": record.plan_id,
        "EffectiveStartTime": format_timestamp(record.effective_start_time),
    }


def event_entity(subscription_id: str, hour: datetime, row: UsageRow) -> dict[str, Any]:
    return {
        "PartitionKey": partition_of(subscription_id, hour),
        "RowKey": f"{EVENT_PREFIX}{row.dimension}|{row.event_id}",
        "Kind": "usage",
        "Quantity": str(row.quantity),
        "PlanId": row.plan_id,
        "EffectiveStartTime": format_timestamp(row.effective_start_time),
        "ReportedAt": format_timestamp(row.reported_at),
        "Caller": row.caller,
    }


class UsageStore:
    """The usage table, on the repository's storage connection."""

    def __init__(self, repository: SubscriptionRepository):
        self._repository = repository
        self.table_name = f"{repository.prefix}usage"
        self._client = repository._service.get_table_client(self.table_name)
        self._ready = False
        self.metrics = repository.metrics

    @property
    def _table(self):
        if not self._ready:
            with _storage_errors("create tables"):
                self._repository._service.create_table_if_not_exists(self.table_name)
            self._ready = True
        return self._client

    # -- ingest ------------------------------------------------------------------------------------

    def claim_ids(self, subscription_id: str, records: Sequence[IdRecord]) -> dict[str, IdRecord]:
        """Insert the ids' rows (distinct ids), 100 per transaction; the ids counted before, with where."""
        earlier: dict[str, IdRecord] = {}
        for start in range(0, len(records), TRANSACTION_LIMIT):
            chunk = records[start : start + TRANSACTION_LIMIT]
            if len(chunk) < TRANSACTION_MIN_ROWS:
                for record in chunk:
                    first = self.claim_id(subscription_id, record)
                    if first is not None:
                        earlier[record.event_id] = first
                continue
            with _storage_errors("record usage ids"):
                self.metrics.add(writes=1)
                try:
                    self._table.submit_transaction([("create", _id_entity(subscription_id, r)) for r in chunk])
                    continue
                except TableTransactionError as error:
                    if error.status_code != 409:
                        raise
            for record in chunk:  # one of them was counted before: claim them one by one
                first = self.claim_id(subscription_id, record)
                if first is not None:
                    earlier[record.event_id] = first
        return earlier

    def claim_id(self, subscription_id: str, record: IdRecord) -> IdRecord | None:
        """Insert the id's row; None when it is new, else where it was counted first."""
        entity = _id_entity(subscription_id, record)
        with _storage_errors("record usage id"):
            self.metrics.add(writes=1)
            try:
                self._table.create_entity(entity)
                return None
            except ResourceExistsError:
                pass
            self.metrics.add(reads=1)
            found = self._table.get_entity(entity["PartitionKey"], record.event_id)
        return IdRecord(
            event_id=record.event_id,
            hour=hour_from_key(found["Hour"]),
            dimension=found.get("Dimension", ""),
            quantity=decimal_of(found.get("Quantity")),
            plan_id=found.get("PlanId", ""),
            effective_start_time=parse_timestamp(found.get("EffectiveStartTime")),
        )

    def insert_events(self, subscription_id: str, hour: datetime, rows: Sequence[UsageRow]) -> None:
        """Insert the rows of one hour; a row that exists already (a repeat) is left as it is."""
        entities = [event_entity(subscription_id, hour, row) for row in rows]
        for start in range(0, len(entities), TRANSACTION_LIMIT):
            chunk = entities[start : start + TRANSACTION_LIMIT]
            if len(chunk) < TRANSACTION_MIN_ROWS:
                for entity in chunk:
                    self._insert_once(entity)
                continue
            with _storage_errors("record usage"):
                self.metrics.add(writes=1)
                try:
                    self._table.submit_transaction([("create", entity) for entity in chunk])
                    continue
                except TableTransactionError as error:
                    if error.status_code != 409:
                        raise
            for entity in chunk:  # one of them exists: insert the others one by one
                self._insert_once(entity)

    def _insert_once(self, entity: dict[str, Any]) -> bool:
        with _storage_errors("record usage"):
            self.metrics.add(writes=1)
            try:
                self._table.create_entity(entity)
                return True
            except ResourceExistsError:
                return False

    def mark_pending(self, keys: Sequence[tuple[str, datetime]]) -> None:
        """Upsert the emitter's work-list rows (after the rows they point at are written)."""
        now = format_timestamp(self._repository.clock())
        entities = sorted(
            {
                f"{hour_key(hour)}|{subscription_id}": {
                    "PartitionKey": PENDING_PARTITION,
                    "RowKey": f"{hour_key(hour)}|{subscription_id}",
                    "Kind": "pending",
                    "TouchedAt": now,
                }
                for subscription_id, hour in keys
            }.values(),
            key=lambda e: e["RowKey"],
        )
        for start in range(0, len(entities), TRANSACTION_LIMIT):
            chunk = entities[start : start + TRANSACTION_LIMIT]
            with _storage_errors("record pending usage"):
                self.metrics.add(writes=1)
                # REPLACE changes the ETag even when the content is the same: an emitter that read the
                # row before this write cannot delete it (see docs/storage.md).
                self._table.submit_transaction([("upsert", entity, {"mode": UpdateMode.REPLACE}) for entity in chunk])

    # -- emission ---------------------------------------------------------------------------------

    def list_pending(self, before: datetime, *, limit: int | None = None) -> list[PendingHour]:
        """Hours with usage not settled yet, strictly before ``before``, oldest first."""
        query = "PartitionKey eq @pk and RowKey lt @hi"
        found: list[PendingHour] = []
        with _storage_errors("list pending usage"):
            pages = self._table.query_entities(
                query, parameters={"pk": PENDING_PARTITION, "hi": hour_key(before)}, results_per_page=1000
            ).by_page()
            for page in pages:
                self.metrics.add(reads=1, pages=1)
                for entity in page:
                    hour_text, _, subscription_id = entity["RowKey"].partition("|")
                    found.append(PendingHour(subscription_id, hour_from_key(hour_text), entity.metadata["etag"]))
                if limit is not None and len(found) >= limit:
                    break
        return found if limit is None else found[:limit]

    def count_pending(self) -> tuple[int, datetime | None]:
        """(pending subscription-hours, oldest pending hour)."""
        count, oldest = 0, None
        with _storage_errors("count pending usage"):
            for entity in self._table.query_entities(
                "PartitionKey eq @pk", parameters={"pk": PENDING_PARTITION}, select=["RowKey"]
            ):
                count += 1
                hour = hour_from_key(entity["RowKey"].split("|", 1)[0])
                oldest = hour if oldest is None or hour < oldest else oldest
        return count, oldest

    def read_hour(self, subscription_id: str, hour: datetime) -> HourPartition:
        partition = HourPartition(subscription_id, hour)
        with _storage_errors("read usage hour"):
            self.metrics.add(reads=1)
            for entity in self._table.query_entities(
                "PartitionKey eq @pk", parameters={"pk": partition_of(subscription_id, hour)}
            ):
                key = entity["RowKey"]
                if key.startswith(EVENT_PREFIX):
                    dimension, _, event_id = key[len(EVENT_PREFIX) :].partition("|")
                    partition.rows.append(
                        UsageRow(
                            dimension,
                            event_id,
                            decimal_of(entity.get("Quantity")),
                            entity.get("PlanId", ""),
                            parse_timestamp(entity.get("EffectiveStartTime")),
                            parse_timestamp(entity.get("ReportedAt")),
                            entity.get("Caller", ""),
                        )
                    )
                elif key.startswith(BUCKET_PREFIX):
                    bucket = _bucket_from_entity(subscription_id, hour, entity)
                    partition.buckets[bucket.dimension] = bucket
                elif key.startswith(CARRY_PREFIX):
                    dimension, from_hour, number = key[len(CARRY_PREFIX) :].split("|", 2)
                    partition.carries.append(
                        Carry(dimension, from_hour, int(number), decimal_of(entity.get("Quantity")), entity.get("PlanId", ""))
                    )
        return partition

    def write_buckets(self, buckets: Sequence[Bucket]) -> dict[str, Bucket]:
        """Write buckets, each conditional on the ETag it was read with (none: it must not exist yet).
        Returns the ones written, with their new ETags; a bucket another emitter wrote first is left out
        (the caller looks again next run). One write each: buckets are independent, and a transaction
        costs more CPU than the few writes an hour has."""
        written: dict[str, Bucket] = {}
        for bucket in buckets:
            entity = bucket_entity(bucket)
            with _storage_errors("write usage bucket"):
                self.metrics.add(writes=1)
                try:
                    if bucket.etag:
                        metadata = self._table.update_entity(
                            entity, mode=UpdateMode.REPLACE, etag=bucket.etag, match_condition=MatchConditions.IfNotModified
                        )
                    else:
                        metadata = self._table.create_entity(entity)
                except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                    continue
            written[bucket.dimension] = replace(bucket, etag=metadata["etag"])
        return written

    def insert_carry(self, subscription_id: str, into: datetime, carry: Carry) -> Decimal:
        """Record late usage in the hour it is carried into; the quantity of that carry as stored (a
        run that stopped after this insert finds its own carry again, with the quantity it carried)."""
        entity = {
            "PartitionKey": partition_of(subscription_id, into),
            "RowKey": f"{CARRY_PREFIX}{carry.dimension}|{carry.from_hour}|{carry.number}",
            "Kind": "carry",
            "Quantity": str(carry.quantity),
            "PlanId": carry.plan_id,
            "FromHour": carry.from_hour,
        }
        if self._insert_once(entity):
            return carry.quantity
        with _storage_errors("read usage carry"):
            self.metrics.add(reads=1)
            return decimal_of(self._table.get_entity(entity["PartitionKey"], entity["RowKey"]).get("Quantity"))

    def settle_pending(self, pending: PendingHour) -> bool:
        """Remove an hour from the work list unless usage arrived since it was listed."""
        with _storage_errors("settle pending usage"):
            self.metrics.add(writes=1)
            try:
                self._table.delete_entity(
                    PENDING_PARTITION,
                    f"{hour_key(pending.hour)}|{pending.subscription_id}",
                    etag=pending.etag,
                    match_condition=MatchConditions.IfNotModified,
                )
            except ResourceModifiedError:
                return False
            except ResourceNotFoundError:
                return True
        return True

    # -- the operators' view --------------------------------------------------------------------------

    def flag(self, bucket: Bucket) -> None:
        entity = {
            "PartitionKey": FLAGGED_PARTITION,
            "RowKey": f"{hour_key(bucket.hour)}|{bucket.subscription_id}|{bucket.dimension}",
            "Kind": "flagged",
            "Status": bucket.status,
            "MarketplaceStatus": bucket.marketplace_status,
            "Quantity": str(bucket.quantity),
            "PlanId": bucket.plan_id,
            "Message": bucket.message[:2000],
            "FlaggedAt": format_timestamp(self._repository.clock()),
        }
        with _storage_errors("flag usage"):
            self.metrics.add(writes=1)
            self._table.upsert_entity(entity, mode=UpdateMode.REPLACE)

    def list_flagged(self) -> list[dict[str, Any]]:
        with _storage_errors("list flagged usage"):
            rows = list(self._table.query_entities("PartitionKey eq @pk", parameters={"pk": FLAGGED_PARTITION}))
            self.metrics.add(reads=1)
        out = []
        for row in rows:
            hour_text, subscription_id, dimension = row["RowKey"].split("|", 2)
            out.append(
                {
                    "subscriptionId": subscription_id,
                    "hour": format_timestamp(hour_from_key(hour_text)),
                    "dimension": dimension,
                    "status": row.get("Status", ""),
                    "marketplaceStatus": row.get("MarketplaceStatus", ""),
                    "quantity": float(decimal_of(row.get("Quantity"))),
                    "planId": row.get("PlanId", ""),
                    "message": row.get("Message", ""),
                    "flaggedAt": row.get("FlaggedAt", ""),
                }
            )
        return out

    def count_flagged(self) -> int:
        with _storage_errors("count flagged usage"):
            return sum(
                1
                for _ in self._table.query_entities(
                    "PartitionKey eq @pk", parameters={"pk": FLAGGED_PARTITION}, select=["RowKey"]
                )
            )

    def list_buckets(self, subscription_id: str, start: datetime, end: datetime) -> Iterator[HourPartition]:
        """Every stored hour of a subscription in [start, end), oldest first."""
        query = "PartitionKey ge @lo and PartitionKey lt @hi"
        params = {"lo": partition_of(subscription_id, start), "hi": partition_of(subscription_id, end)}
        hours: dict[str, None] = {}
        with _storage_errors("list usage hours"):
            for entity in self._table.query_entities(query, parameters=params, select=["PartitionKey"]):
                hours.setdefault(entity["PartitionKey"], None)
        for key in sorted(hours):
            yield self.read_hour(subscription_id, hour_from_key(key.rsplit("|", 1)[1]))

    # -- the last run's summary (health reads one row, never the work list) --------------------------

    def save_summary(self, summary: dict[str, Any]) -> None:
        with _storage_errors("write metering summary"):
            self.metrics.add(writes=1)
            self._table.upsert_entity(
                {"PartitionKey": SUMMARY_PARTITION, "RowKey": "latest", "Summary": json.dumps(summary)}, mode=UpdateMode.REPLACE
            )

    def latest_summary(self) -> dict[str, Any] | None:
        with _storage_errors("read metering summary"):
            self.metrics.add(reads=1)
            try:
                entity = self._table.get_entity(SUMMARY_PARTITION, "latest")
            except ResourceNotFoundError:
                return None
        return json.loads(entity.get("Summary") or "{}")
