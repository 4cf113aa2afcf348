"""Storage of metered usage: reported events, the hourly buckets sent to Microsoft, and their indexes.

One table ``<prefix>usage`` (see docs/storage.md, "Metering"). Subscriptions are spread over
SHARDS shards (a hash of the id), so one call's events land in few partitions and are written in
entity group transactions, and the emitter reads an hour with a few range queries:

* ``h|<yyyymmddhh>|<shard>``: one partition per UTC hour and shard
  - ``r|<subscription>|<dimension>|<event id>``: one reported event, **insert only** (never
    read-modify-written);
  - ``b|<subscription>|<dimension>``: the bucket, written by the emitter (ETag-guarded): what was
    sent, Microsoft's answer, late usage carried out of it;
  - ``c|<subscription>|<dimension>|<from hour>|<n>``: late usage carried into this hour, insert only.
* ``i|<shard>``: the caller's event ids (``RowKey`` = ``<subscription>|<id>``), so a repeated id is
  counted once even when it would fall into another hour.
* ``pending``: ``<yyyymmddhh>|<shard>``, upserted after every write into that hour and shard; the
  emitter's work list, oldest hour first, deleted (ETag-conditional) once the hour is settled.
* ``flagged``: ``<yyyymmddhh>|<subscription>|<dimension>``: buckets that need a person.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
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
RECON_PREFIX = "recon|"
SHARDS = 16  # partitions per hour: Table storage serves ~2,000 entities/s per partition
TRANSACTION_LIMIT = 100  # Table storage: operations per entity group transaction
# Below this many rows, plain inserts cost less: the SDK spends ~7 ms of CPU building any multipart
# transaction body, a single insert ~2 ms (measured against Azurite; docs/benchmarks.md).
TRANSACTION_MIN_ROWS = 6

# Bucket statuses (ours; Microsoft's per-item answer is kept in MarketplaceStatus)
SENT_PENDING = "Pending"  # not sent yet, or sent without an answer (429, 5xx, timeout): sent again
ACCEPTED = "Accepted"  # Microsoft has it (Accepted, or Duplicate with the same quantity)
FLAGGED = "Flagged"  # Microsoft refused it, or kept another quantity: a person decides
EXPIRED = "Expired"  # (before carrying existed) the 24-hour window closed before Microsoft accepted it
CARRIED = "Carried"  # could not be accepted in its own hour: its usage went into a later open hour
UNBILLABLE = "Unbillable"  # an operator wrote it off (recorded, never billed)
SETTLED_STATUSES = frozenset({ACCEPTED, FLAGGED, EXPIRED, CARRIED, UNBILLABLE})


def hour_of(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def hour_key(hour: datetime) -> str:
    return hour.astimezone(UTC).strftime("%Y%m%d%H")


def hour_from_key(key: str) -> datetime:
    return datetime.strptime(key, "%Y%m%d%H").replace(tzinfo=UTC)


def shard_of(subscription_id: str) -> str:
    return f"{int(hashlib.sha1(subscription_id.encode()).hexdigest()[:8], 16) % SHARDS:02d}"


def partition_of(subscription_id: str, hour: datetime) -> str:
    """The partition holding a subscription's usage of one hour."""
    return hour_partition(hour, shard_of(subscription_id))


def hour_partition(hour: datetime, shard: str) -> str:
    return f"h|{hour_key(hour)}|{shard}"


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
    # Usage of this hour Microsoft did not take here and that is owed to a later hour whatever
    # METERING_LATE_USAGE says: a Duplicate that kept less than ours, the digits a double cannot
    # hold, or the whole hour when it could not be accepted in its own hour (Carried).
    shortfall: Decimal = Decimal(0)
    etag: str = ""

    @property
    def settled(self) -> bool:
        return self.status in SETTLED_STATUSES

    @property
    def billed_here(self) -> Decimal:
        """What Microsoft bills in this hour for this bucket."""
        return self.quantity if self.status == ACCEPTED else Decimal(0)

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
            "shortfall": float(self.shortfall),
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
    """One shard of one hour with usage not settled yet (a row of the work list)."""

    hour: datetime
    shard: str
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


def _bucket_from_entity(subscription_id: str, hour: datetime, dimension: str, entity: Any) -> Bucket:
    return Bucket(
        subscription_id=subscription_id,
        hour=hour,
        dimension=dimension,
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
        shortfall=decimal_of(entity.get("Shortfall")),
        etag=entity.metadata["etag"] if hasattr(entity, "metadata") else "",
    )


def bucket_entity(bucket: Bucket) -> dict[str, Any]:
    return {
        "PartitionKey": partition_of(bucket.subscription_id, bucket.hour),
        "RowKey": f"{BUCKET_PREFIX}{bucket.subscription_id}|{bucket.dimension}",
        "Kind": "bucket",
        "SubscriptionId": bucket.subscription_id,
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
        "Shortfall": str(bucket.shortfall),
    }


def _id_entity(subscription_id: str, record: IdRecord) -> dict[str, Any]:
    return {
        "PartitionKey": f"i|{shard_of(subscription_id)}",
        "RowKey": f"{subscription_id}|{record.event_id}",
        "Kind": "id",
        "Hour": hour_key(record.hour),
        "Dimension": record.dimension,
        "Quantity": str(record.quantity),
        "PlanId": record.plan_id,
        "EffectiveStartTime": format_timestamp(record.effective_start_time),
    }


def _bucket_operation(bucket: Bucket) -> tuple:
    entity = bucket_entity(bucket)
    if bucket.etag:
        return (
            "update",
            entity,
            {"mode": UpdateMode.REPLACE, "etag": bucket.etag, "match_condition": MatchConditions.IfNotModified},
        )
    return ("create", entity)


def event_key(subscription_id: str, event_id: str) -> str:
    """An event's RowKey: the id is unique per subscription within an hour (a repeat collides)."""
    return f"{EVENT_PREFIX}{subscription_id}|{event_id}"


def _event_row(entity: Any) -> UsageRow:
    return UsageRow(
        entity.get("Dimension", ""),
        entity["RowKey"].rsplit("|", 1)[1],
        decimal_of(entity.get("Quantity")),
        entity.get("PlanId", ""),
        parse_timestamp(entity.get("EffectiveStartTime")),
        parse_timestamp(entity.get("ReportedAt")),
        entity.get("Caller", ""),
    )


def event_entity(subscription_id: str, hour: datetime, row: UsageRow) -> dict[str, Any]:
    return {
        "PartitionKey": partition_of(subscription_id, hour),
        "RowKey": event_key(subscription_id, row.event_id),
        "Kind": "usage",
        "SubscriptionId": subscription_id,
        "Dimension": row.dimension,
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

    def _insert_all(self, entities: Sequence[dict[str, Any]], what: str) -> set[str]:
        """Insert rows of one partition; returns the RowKeys that existed already (left as they are)."""
        existing: set[str] = set()
        for start in range(0, len(entities), TRANSACTION_LIMIT):
            chunk = entities[start : start + TRANSACTION_LIMIT]
            if len(chunk) >= TRANSACTION_MIN_ROWS:
                with _storage_errors(what):
                    self.metrics.add(writes=1)
                    try:
                        self._table.submit_transaction([("create", entity) for entity in chunk])
                        continue
                    except TableTransactionError as error:
                        if error.status_code != 409:
                            raise
            for entity in chunk:  # few rows, or one of them exists: one by one
                if not self._insert_once(entity, what):
                    existing.add(entity["RowKey"])
        return existing

    def _insert_once(self, entity: dict[str, Any], what: str = "record usage") -> bool:
        with _storage_errors(what):
            self.metrics.add(writes=1)
            try:
                self._table.create_entity(entity)
                return True
            except ResourceExistsError:
                return False

    def claim_ids(self, shard: str, claims: Sequence[tuple[str, IdRecord]]) -> dict[tuple[str, str], IdRecord]:
        """Insert the id rows of one shard ((subscription, record), distinct); the ids counted before,
        keyed (subscription, id), with where they were counted."""
        entities = [_id_entity(subscription_id, record) for subscription_id, record in claims]
        existing = self._insert_all(entities, "record usage ids")
        earlier: dict[tuple[str, str], IdRecord] = {}
        for subscription_id, record in claims:
            if f"{subscription_id}|{record.event_id}" in existing:
                earlier[(subscription_id, record.event_id)] = self._read_id(subscription_id, record.event_id)
        return earlier

    def _read_id(self, subscription_id: str, event_id: str) -> IdRecord:
        with _storage_errors("read usage id"):
            self.metrics.add(reads=1)
            found = self._table.get_entity(f"i|{shard_of(subscription_id)}", f"{subscription_id}|{event_id}")
        return IdRecord(
            event_id=event_id,
            hour=hour_from_key(found["Hour"]),
            dimension=found.get("Dimension", ""),
            quantity=decimal_of(found.get("Quantity")),
            plan_id=found.get("PlanId", ""),
            effective_start_time=parse_timestamp(found.get("EffectiveStartTime")),
        )

    def insert_events(self, partition: str, rows: Sequence[tuple[str, datetime, UsageRow]]) -> dict[str, UsageRow]:
        """Insert the event rows of one partition ((subscription, hour, row)). A row whose key exists is
        left as it is; those are returned (RowKey -> the stored row) for the caller to compare."""
        existing = self._insert_all([event_entity(sid, hour, row) for sid, hour, row in rows], "record usage")
        stored: dict[str, UsageRow] = {}
        for key in existing:
            with _storage_errors("read usage"):
                self.metrics.add(reads=1)
                stored[key] = _event_row(self._table.get_entity(partition, key))
        return stored

    def mark_pending(self, keys: Iterable[tuple[datetime, str]]) -> None:
        """Upsert the emitter's work-list rows (hour, shard), after the rows they point at are written."""
        now = format_timestamp(self._repository.clock())
        entities = [
            {"PartitionKey": PENDING_PARTITION, "RowKey": f"{hour_key(hour)}|{shard}", "Kind": "pending", "TouchedAt": now}
            for hour, shard in sorted(set(keys))
        ]
        for start in range(0, len(entities), TRANSACTION_LIMIT):
            chunk = entities[start : start + TRANSACTION_LIMIT]
            with _storage_errors("record pending usage"):
                self.metrics.add(writes=1)
                # REPLACE changes the ETag even when the content is the same: an emitter that read the
                # row before this write cannot delete it (see docs/storage.md).
                if len(chunk) < TRANSACTION_MIN_ROWS:
                    for entity in chunk:
                        self._table.upsert_entity(entity, mode=UpdateMode.REPLACE)
                else:
                    self._table.submit_transaction([("upsert", entity, {"mode": UpdateMode.REPLACE}) for entity in chunk])

    # -- emission ---------------------------------------------------------------------------------

    def list_pending(self, before: datetime) -> list[PendingHour]:
        """Hour shards with usage not settled yet, strictly before ``before``, oldest first."""
        query = "PartitionKey eq @pk and RowKey lt @hi"
        found: list[PendingHour] = []
        with _storage_errors("list pending usage"):
            pages = self._table.query_entities(
                query, parameters={"pk": PENDING_PARTITION, "hi": hour_key(before)}, results_per_page=1000
            ).by_page()
            for page in pages:
                self.metrics.add(reads=1, pages=1)
                for entity in page:
                    hour_text, _, shard = entity["RowKey"].partition("|")
                    found.append(PendingHour(hour_from_key(hour_text), shard, entity.metadata["etag"]))
        return found

    def count_pending(self) -> tuple[int, datetime | None]:
        """(pending hour shards, oldest pending hour)."""
        count, oldest = 0, None
        with _storage_errors("count pending usage"):
            for entity in self._table.query_entities(
                "PartitionKey eq @pk", parameters={"pk": PENDING_PARTITION}, select=["RowKey"]
            ):
                count += 1
                hour = hour_from_key(entity["RowKey"].split("|", 1)[0])
                oldest = hour if oldest is None or hour < oldest else oldest
        return count, oldest

    def read_shard(self, hour: datetime, shard: str, subscription_id: str | None = None) -> dict[str, HourPartition]:
        """Everything stored for one hour and shard (or one subscription of it), by subscription."""
        found: dict[str, HourPartition] = {}
        query, params = "PartitionKey eq @pk", {"pk": hour_partition(hour, shard)}
        if subscription_id is not None:
            query += " and SubscriptionId eq @sid"
            params["sid"] = subscription_id
        with _storage_errors("read usage hour"):
            pages = self._table.query_entities(query, parameters=params, results_per_page=1000).by_page()
            for page in pages:
                self.metrics.add(reads=1, pages=1)
                for entity in page:
                    kind, _, rest = entity["RowKey"].partition("|")
                    sid, _, rest = rest.partition("|")
                    partition = found.get(sid)
                    if partition is None:
                        partition = found[sid] = HourPartition(sid, hour)
                    if kind == "r":
                        partition.rows.append(_event_row(entity))
                    elif kind == "b":
                        partition.buckets[rest] = _bucket_from_entity(sid, hour, rest, entity)
                    elif kind == "c":
                        dimension, from_hour, number = rest.split("|", 2)
                        partition.carries.append(
                            Carry(dimension, from_hour, int(number), decimal_of(entity.get("Quantity")), entity.get("PlanId", ""))
                        )
        return found

    def write_buckets(self, buckets: Sequence[Bucket]) -> dict[tuple[str, str], Bucket]:
        """Write buckets of one partition, each conditional on the ETag it was read with (none: it must
        not exist yet). Returns the ones written, keyed (subscription, dimension), with their new ETags;
        a bucket another emitter wrote first is left out (the caller looks again next run)."""
        written: dict[tuple[str, str], Bucket] = {}
        for start in range(0, len(buckets), TRANSACTION_LIMIT):
            chunk = buckets[start : start + TRANSACTION_LIMIT]
            if len(chunk) >= TRANSACTION_MIN_ROWS:
                with _storage_errors("write usage buckets"):
                    self.metrics.add(writes=1)
                    try:
                        results = self._table.submit_transaction([_bucket_operation(b) for b in chunk])
                    except TableTransactionError as error:
                        if error.status_code not in (409, 412):
                            raise
                        results = None
                if results is not None:
                    for bucket, metadata in zip(chunk, results, strict=True):
                        written[(bucket.subscription_id, bucket.dimension)] = replace(bucket, etag=metadata["etag"])
                    continue
            for bucket in chunk:  # few, or one of them moved under us: one by one
                operation = _bucket_operation(bucket)
                with _storage_errors("write usage bucket"):
                    self.metrics.add(writes=1)
                    try:
                        if operation[0] == "update":
                            metadata = self._table.update_entity(operation[1], **operation[2])
                        else:
                            metadata = self._table.create_entity(operation[1])
                    except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
                        continue
                written[(bucket.subscription_id, bucket.dimension)] = replace(bucket, etag=metadata["etag"])
        return written

    def read_bucket(self, subscription_id: str, hour: datetime, dimension: str) -> Bucket | None:
        with _storage_errors("read usage bucket"):
            self.metrics.add(reads=1)
            try:
                entity = self._table.get_entity(
                    partition_of(subscription_id, hour), f"{BUCKET_PREFIX}{subscription_id}|{dimension}"
                )
            except ResourceNotFoundError:
                return None
        return _bucket_from_entity(subscription_id, hour, dimension, entity)

    def read_hour_buckets(self, hour: datetime, shard: str) -> list[Bucket]:
        """The buckets (only) of one hour and shard: what the read-back compares with Microsoft."""
        out: list[Bucket] = []
        with _storage_errors("read usage buckets"):
            pages = self._table.query_entities(
                "PartitionKey eq @pk and Kind eq 'bucket'", parameters={"pk": hour_partition(hour, shard)}, results_per_page=1000
            ).by_page()
            for page in pages:
                self.metrics.add(reads=1, pages=1)
                for entity in page:
                    _, _, rest = entity["RowKey"].partition("|")
                    sid, _, dimension = rest.partition("|")
                    out.append(_bucket_from_entity(sid, hour, dimension, entity))
        return out

    def insert_carry(self, subscription_id: str, into: datetime, carry: Carry) -> Decimal:
        """Record late usage in the hour it is carried into; the quantity of that carry as stored (a
        run that stopped after this insert finds its own carry again, with the quantity it carried)."""
        entity = {
            "PartitionKey": partition_of(subscription_id, into),
            "RowKey": f"{CARRY_PREFIX}{subscription_id}|{carry.dimension}|{carry.from_hour}|{carry.number}",
            "Kind": "carry",
            "SubscriptionId": subscription_id,
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
                    f"{hour_key(pending.hour)}|{pending.shard}",
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

    def unflag(self, subscription_id: str, hour: datetime, dimension: str) -> None:
        with _storage_errors("unflag usage"):
            self.metrics.add(writes=1)
            try:
                self._table.delete_entity(FLAGGED_PARTITION, f"{hour_key(hour)}|{subscription_id}|{dimension}")
            except ResourceNotFoundError:
                pass

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

    # -- the read-back: Microsoft's daily aggregates beside ours, per day ------------------------------

    def save_read_back(self, rows: Sequence[Any], days: Sequence[str]) -> None:
        """Upsert the read-back rows (``ReadBackRow``), one partition per day: ``recon|<yyyymmdd>``."""
        by_day: dict[str, list[dict[str, Any]]] = {day: [] for day in days}
        for row in rows:
            data = row.to_api()
            by_day.setdefault(row.day, []).append(
                {
                    "PartitionKey": f"{RECON_PREFIX}{row.day.replace('-', '')}",
                    "RowKey": f"{row.subscription_id}|{row.dimension}",
                    "Kind": "recon",
                    "Data": json.dumps(data),
                    "Status": row.status,
                }
            )
        for entities in by_day.values():
            for start in range(0, len(entities), TRANSACTION_LIMIT):
                chunk = entities[start : start + TRANSACTION_LIMIT]
                with _storage_errors("record usage read-back"):
                    self.metrics.add(writes=1)
                    self._table.submit_transaction([("upsert", e, {"mode": UpdateMode.REPLACE}) for e in chunk])

    def read_back_rows(self, days: Sequence[str]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        with _storage_errors("read usage read-back"):
            for day in days:
                for entity in self._table.query_entities(
                    "PartitionKey eq @pk", parameters={"pk": f"{RECON_PREFIX}{day.replace('-', '')}"}
                ):
                    self.metrics.add(reads=1)
                    out.append(json.loads(entity.get("Data") or "{}"))
        return out

    # -- the last run's summary (health reads one row, never the work list) --------------------------

    def save_summary(self, summary: dict[str, Any], name: str = "latest") -> None:
        """The last run's summary (``latest``: the metering run; ``readback``: the daily read-back)."""
        with _storage_errors("write metering summary"):
            self.metrics.add(writes=1)
            self._table.upsert_entity(
                {"PartitionKey": SUMMARY_PARTITION, "RowKey": name, "Summary": json.dumps(summary)}, mode=UpdateMode.REPLACE
            )

    def latest_summary(self, name: str = "latest") -> dict[str, Any] | None:
        with _storage_errors("read metering summary"):
            self.metrics.add(reads=1)
            try:
                entity = self._table.get_entity(SUMMARY_PARTITION, name)
            except ResourceNotFoundError:
                return None
        return json.loads(entity.get("Summary") or "{}")
