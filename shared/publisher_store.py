"""Storage of publisher operations: the changes the publisher's SaaS application asks Microsoft for.

Rows (see docs/storage.md):

* ``<prefix>subscriptions``, the subscription's partition:
  - the state row's ``PendingOperationId`` is the **claim**: at most one publisher operation per
    subscription. It is set by an ETag-guarded merge in the same transaction that creates the
    operation row, so two concurrent requests cannot both claim; every later change of the record
    (webhook, reconciler) keeps it, and the transaction that settles the operation clears it;
  - ``pubop|<operation id>``: the operation (what was asked, Microsoft's operation id once known,
    its status and Microsoft's error message). ``Pending`` is true until it is settled, so the
    reconciler's single scan finds the unsettled ones.
* ``<prefix>operations``: one row per operation id (``PartitionKey`` = our operation id), naming
  its subscription and the request's fingerprint. It serves ``GET /api/operations/{id}`` and
  ``Idempotency-Key`` (the id of a keyed request is derived from caller and key).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableTransactionError, UpdateMode

from shared.domain import format_timestamp, parse_quantity, parse_timestamp
from shared.errors import ConflictError
from shared.repository import STATE_ROW, StoredRecord, _storage_errors

if TYPE_CHECKING:
    from shared.repository import SubscriptionRepository

log = logging.getLogger(__name__)

PUBOP_PREFIX = "pubop|"
INDEX_ROW = "op"

# Statuses of a publisher operation (the API shows CLAIMED as InProgress: it is in flight).
CLAIMED = "Claimed"  # claimed locally; Microsoft's answer to the PATCH/DELETE not recorded (yet)
IN_PROGRESS = "InProgress"  # Microsoft accepted it (202); followed with Get Operation
SUCCEEDED = "Succeeded"
FAILED = "Failed"
CONFLICT = "Conflict"
TERMINAL = frozenset({SUCCEEDED, FAILED, CONFLICT})


@dataclass(frozen=True)
class PublisherOperation:
    id: str
    subscription_id: str
    action: str  # ChangePlan | ChangeQuantity | Unsubscribe (Microsoft's action names)
    status: str = CLAIMED
    plan_id: str = ""
    quantity: int | None = None
    marketplace_operation_id: str = ""
    error_code: str = ""
    error_message: str = ""
    caller: str = ""
    correlation_id: str = ""
    fingerprint: str = ""
    created_at: datetime | None = None
    sent_at: datetime | None = None
    completed_at: datetime | None = None
    polls: int = 0
    etag: str = ""

    @property
    def settled(self) -> bool:
        return self.status in TERMINAL

    @property
    def public_status(self) -> str:
        return IN_PROGRESS if self.status == CLAIMED else self.status

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "subscriptionId": self.subscription_id,
            "action": self.action,
            "status": self.public_status,
            "planId": self.plan_id or None,
            "quantity": self.quantity,
            "marketplaceOperationId": self.marketplace_operation_id or None,
            "errorCode": self.error_code or None,
            "errorMessage": self.error_message or None,
            "requestedBy": self.caller,
            "correlationId": self.correlation_id or None,
            "created": format_timestamp(self.created_at),
            "completed": format_timestamp(self.completed_at) or None,
        }


def operation_row(operation: PublisherOperation) -> dict[str, Any]:
    """The operation's row (without PartitionKey: ``repository.apply(extra_rows=...)`` adds it)."""
    return {
        "RowKey": PUBOP_PREFIX + operation.id,
        "Kind": "pubop",
        "Pending": not operation.settled,
        "Action": operation.action,
        "Status": operation.status,
        "PlanId": operation.plan_id,
        "Quantity": -1 if operation.quantity is None else operation.quantity,
        "MarketplaceOperationId": operation.marketplace_operation_id,
        "ErrorCode": operation.error_code[:200],
        "ErrorMessage": operation.error_message[:2000],
        "Caller": operation.caller[:400],
        "CorrelationId": operation.correlation_id,
        "Fingerprint": operation.fingerprint,
        "CreatedAt": format_timestamp(operation.created_at),
        "SentAt": format_timestamp(operation.sent_at),
        "CompletedAt": format_timestamp(operation.completed_at),
        "Polls": operation.polls,
    }


def operation_from_entity(entity: Any) -> PublisherOperation:
    quantity = parse_quantity(entity.get("Quantity"))
    return PublisherOperation(
        id=str(entity["RowKey"])[len(PUBOP_PREFIX) :],
        subscription_id=str(entity["PartitionKey"]),
        action=entity.get("Action", ""),
        status=entity.get("Status", CLAIMED),
        plan_id=entity.get("PlanId", "") or "",
        quantity=None if quantity is None or quantity < 0 else quantity,
        marketplace_operation_id=entity.get("MarketplaceOperationId", "") or "",
        error_code=entity.get("ErrorCode", "") or "",
        error_message=entity.get("ErrorMessage", "") or "",
        caller=entity.get("Caller", "") or "",
        correlation_id=entity.get("CorrelationId", "") or "",
        fingerprint=entity.get("Fingerprint", "") or "",
        created_at=parse_timestamp(entity.get("CreatedAt")),
        sent_at=parse_timestamp(entity.get("SentAt")),
        completed_at=parse_timestamp(entity.get("CompletedAt")),
        polls=int(entity.get("Polls", 0) or 0),
        etag=entity.metadata["etag"] if hasattr(entity, "metadata") else "",
    )


@dataclass(frozen=True)
class OperationIndex:
    operation_id: str
    subscription_id: str
    fingerprint: str
    caller: str
    created_at: datetime | None


class PublisherOperationStore:
    """Claims, publisher operations and their index, on the repository's tables and connection."""

    def __init__(self, repository: SubscriptionRepository):
        self._repository = repository
        self.index_table_name = f"{repository.prefix}operations"
        self._index_client = repository._service.get_table_client(self.index_table_name)
        self._index_ready = False
        self.metrics = repository.metrics

    @property
    def _rows(self):
        return self._repository._subscriptions

    @property
    def _index(self):
        if not self._index_ready:
            with _storage_errors("create tables"):
                self._repository._service.create_table_if_not_exists(self.index_table_name)
            self._index_ready = True
        return self._index_client

    # -- the index -------------------------------------------------------------------------------

    def get_index(self, operation_id: str) -> OperationIndex | None:
        with _storage_errors("read operation index"):
            self.metrics.add(reads=1)
            try:
                entity = self._index.get_entity(operation_id, INDEX_ROW)
            except ResourceNotFoundError:
                return None
        return OperationIndex(
            operation_id,
            entity.get("SubscriptionId", ""),
            entity.get("Fingerprint", ""),
            entity.get("Caller", ""),
            parse_timestamp(entity.get("CreatedAt")),
        )

    def create_index(self, index: OperationIndex) -> bool:
        """Insert the index row; False if the id is taken (a concurrent request with the same key)."""
        entity = {
            "PartitionKey": index.operation_id,
            "RowKey": INDEX_ROW,
            "SubscriptionId": index.subscription_id,
            "Fingerprint": index.fingerprint,
            "Caller": index.caller[:400],
            "CreatedAt": format_timestamp(index.created_at),
        }
        with _storage_errors("write operation index"):
            self.metrics.add(writes=1)
            try:
                self._index.create_entity(entity)
            except ResourceExistsError:
                return False
        return True

    def delete_index(self, operation_id: str) -> None:
        with _storage_errors("delete operation index"):
            self.metrics.add(writes=1)
            try:
                self._index.delete_entity(operation_id, INDEX_ROW)
            except ResourceNotFoundError:
                pass

    # -- operations --------------------------------------------------------------------------------

    def get(self, subscription_id: str, operation_id: str) -> PublisherOperation | None:
        with _storage_errors("read publisher operation"):
            self.metrics.add(reads=1)
            try:
                entity = self._rows.get_entity(subscription_id, PUBOP_PREFIX + operation_id)
            except ResourceNotFoundError:
                return None
        return operation_from_entity(entity)

    def list_for(self, subscription_id: str) -> list[PublisherOperation]:
        """Every publisher operation of a subscription, oldest first."""
        query = "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi"
        params = {"pk": subscription_id, "lo": PUBOP_PREFIX, "hi": PUBOP_PREFIX[:-1] + chr(ord("|") + 1)}
        with _storage_errors("list publisher operations"):
            self.metrics.add(reads=1)
            rows = [operation_from_entity(row) for row in self._rows.query_entities(query, parameters=params)]
        return sorted(rows, key=lambda op: op.created_at or datetime.min)

    def claim(self, stored: StoredRecord, operation: PublisherOperation) -> PublisherOperation:
        """Set the subscription's claim and create the operation, in one transaction.

        Raises ConflictError when the state row changed since ``stored`` was read (another claim,
        or any other change): the caller re-reads and decides again.
        """
        state = {"PartitionKey": stored.record.id, "RowKey": STATE_ROW, "PendingOperationId": operation.id}
        row = {**operation_row(operation), "PartitionKey": stored.record.id}
        transaction = [
            ("update", state, {"mode": UpdateMode.MERGE, "etag": stored.etag, "match_condition": MatchConditions.IfNotModified}),
            ("create", row),
        ]
        with _storage_errors("claim subscription"):
            self.metrics.add(writes=1)
            try:
                results = self._rows.submit_transaction(transaction)
            except TableTransactionError as error:
                if error.status_code in (409, 412):
                    raise ConflictError("the subscription changed while it was being claimed") from error
                raise
        return replace(operation, etag=str(results[1].get("etag", "")))

    def update(self, operation: PublisherOperation) -> PublisherOperation | None:
        """Write ``operation`` if its row is unchanged since it was read (its ETag); None otherwise."""
        entity = {**operation_row(operation), "PartitionKey": operation.subscription_id}
        with _storage_errors("update publisher operation"):
            self.metrics.add(writes=1)
            try:
                metadata = self._rows.update_entity(
                    entity, mode=UpdateMode.MERGE, etag=operation.etag, match_condition=MatchConditions.IfNotModified
                )
            except (ResourceModifiedError, ResourceNotFoundError):
                return None
        return replace(operation, etag=str(metadata.get("etag", "")))

    def release(self, operation: PublisherOperation) -> None:
        """Undo a claim that never reached Microsoft: clear the claim and delete the operation row, in
        one transaction (nothing recorded). A claim already released or taken over stays as it is."""
        self._unclaim(operation.subscription_id, operation.id, delete_row=True)

    def clear_claim(self, subscription_id: str, operation_id: str) -> None:
        """Free the subscription if ``operation_id`` still holds its claim (ETag-guarded merge)."""
        self._unclaim(subscription_id, operation_id, delete_row=False)

    def _unclaim(self, subscription_id: str, operation_id: str, *, delete_row: bool, attempts: int = 6) -> None:
        for _ in range(attempts):
            stored = self._repository.get(subscription_id)
            transaction: list[tuple] = []
            if stored is not None and stored.record.pending_operation_id == operation_id:
                state = {"PartitionKey": subscription_id, "RowKey": STATE_ROW, "PendingOperationId": ""}
                condition = {"mode": UpdateMode.MERGE, "etag": stored.etag, "match_condition": MatchConditions.IfNotModified}
                transaction.append(("update", state, condition))
            if delete_row:
                transaction.append(("delete", {"PartitionKey": subscription_id, "RowKey": PUBOP_PREFIX + operation_id}))
            if not transaction:
                return
            with _storage_errors("release claim"):
                self.metrics.add(writes=1)
                try:
                    self._rows.submit_transaction(transaction)
                except TableTransactionError as error:
                    if error.status_code == 404:
                        return  # the operation row is gone already
                    if error.status_code in (409, 412):
                        continue
                    raise
            return
        raise ConflictError(f"subscription {subscription_id} kept changing while its claim was released")
