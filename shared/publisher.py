"""Publisher-initiated changes: the SaaS application (or an operator) changes plan or seats, or cancels.

Microsoft's rule: call the Fulfillment API first (PATCH / DELETE answers 202 + Operation-Location),
change our side only when Microsoft confirms. So a request here

1. validates everything it can before sending (subscription known and Subscribed, plan in List
   available plans and different, quantity inside the plan's limits and different, the operation
   allowed by ``allowedCustomerOperations``): 400/409/422, nothing sent, nothing recorded;
2. claims the subscription locally (one publisher operation at a time, ETag-guarded: a second
   request gets 409 naming the pending operation);
3. sends the PATCH / DELETE and records Microsoft's operation id, then answers 202 at once;
4. follows the operation to its end in the background and in every reconciliation run (Get
   Operation with bounded backoff). Succeeded: applied through the state machine (history, a
   lifecycle event with ``source: "publisher"``), Microsoft's record read back once. Failed or
   Conflict: the subscription stays as it was, the reason is recorded, a
   ``subscription.change_failed`` event says so, and the claim is released.

Microsoft also notifies the webhook of a change the publisher requested (``Partner``, already
Succeeded): the same operation id, so whichever arrives first applies it and the other finds the
operation's marker settled (exactly once). A crash between the PATCH and recording its operation id
leaves a claim without Microsoft's id; following it looks for Microsoft's operation (outstanding
operations, then the subscription's plan/quantity/status) and, past PUBLISHER_CLAIM_TIMEOUT_SECONDS,
settles it as failed, so no subscription stays locked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from shared import state_machine as sm
from shared.api_auth import ROLE_SUBSCRIPTIONS_READ, ROLE_SUBSCRIPTIONS_READ_WRITE, ApiAuthenticator, ApiCaller
from shared.deadline import deadline_scope
from shared.domain import Operation, OperationStatus, Plan, Subscription, SubscriptionStatus, format_timestamp
from shared.errors import (
    AppError,
    BadRequestError,
    ConfigurationError,
    ConflictError,
    DeadlineExceededError,
    MarketplaceBadRequestError,
    MarketplaceConflictError,
    MarketplaceError,
    MarketplaceNotFoundError,
    MarketplaceThrottledError,
    MarketplaceUnavailableError,
    NotFoundError,
    PayloadTooLargeError,
    StorageUnavailableError,
    UnprocessableError,
)
from shared.events import build_event_document
from shared.ids import require_marketplace_id
from shared.observability import current_correlation_id
from shared.publisher_store import (
    CONFLICT,
    FAILED,
    IN_PROGRESS,
    SUCCEEDED,
    OperationIndex,
    PublisherOperation,
    PublisherOperationStore,
    operation_row,
)
from shared.state_machine import Change, Kind, LocalStatus, Source
from shared.work_queue import Job, WorkQueue, queue_client

if TYPE_CHECKING:
    from shared.services import Services

log = logging.getLogger(__name__)

CHANGE_PLAN = "ChangePlan"
CHANGE_QUANTITY = "ChangeQuantity"
UNSUBSCRIBE = "Unsubscribe"  # Microsoft's action name for a cancellation (DELETE)
_KIND_FOR_ACTION = {CHANGE_PLAN: Kind.CHANGE_PLAN, CHANGE_QUANTITY: Kind.CHANGE_QUANTITY, UNSUBSCRIBE: Kind.UNSUBSCRIBE}

MAX_BODY_BYTES = 16 * 1024
MAX_PLAN_ID_CHARS = 200
MAX_QUANTITY = 1_000_000_000
MAX_IDEMPOTENCY_KEY_CHARS = 255
PLANS_CACHE_SECONDS = 60.0
POLL_MAX_SECONDS = 60.0
FOLLOW_BUDGET_SECONDS = 15 * 60.0  # background following; the reconciler takes over after it
_KEY_NAMESPACE = uuid.UUID("5b0f5a1e-8c4e-4d3b-9a55-0c1d2e3f4a5b")


# ---------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class ApiResult:
    """What an HTTP handler answers: status, JSON body, extra headers."""

    status: int
    body: dict[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)


def _accepted(operation: PublisherOperation, *, replayed: bool = False) -> ApiResult:
    headers = {"Location": f"/api/operations/{operation.id}"}
    if not operation.settled:
        headers["Retry-After"] = "5"
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return ApiResult(202, operation.to_api(), headers)


# ---------------------------------------------------------------------------------------------
# services this module adds to the bundle


def _store(services: Services) -> PublisherOperationStore:
    store = services.publisher_store
    if store is None:
        raise ConfigurationError(["this services bundle has no publisher operation store"])
    return store


def _authenticator(services: Services) -> ApiAuthenticator:
    return services.once(
        "api_authenticator", lambda: ApiAuthenticator.from_settings(services.settings, clock=lambda: services.clock().timestamp())
    )


class _PlansCache:
    """List available plans per subscription, kept briefly (every request would otherwise call Microsoft)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[datetime, list[Plan]]] = {}
        self._lock = threading.Lock()

    def get(self, services: Services, subscription_id: str) -> list[Plan]:
        now = services.clock()
        with self._lock:
            entry = self._entries.get(subscription_id)
        if entry is not None and entry[0] > now:
            return entry[1]
        plans = services.marketplace.list_available_plans(subscription_id)
        with self._lock:
            self._entries[subscription_id] = (now + timedelta(seconds=PLANS_CACHE_SECONDS), plans)
        return plans


def _plans(services: Services, subscription_id: str) -> list[Plan]:
    return services.once("plans_cache", _PlansCache).get(services, subscription_id)


def available_plans(services: Services, subscription_id: str) -> list[Plan]:
    """List available plans for the subscription, through the same short cache as the API."""
    return _plans(services, require_marketplace_id(subscription_id, "subscriptionId"))


def change_refusals(record: sm.SubscriptionRecord) -> dict[str, str]:
    """Why each change (CHANGE_PLAN/CHANGE_QUANTITY, UNSUBSCRIBE) would be refused now, by status,
    pending operation and allowedCustomerOperations (the checks of _validate that need no Microsoft
    call); an action missing from the answer is allowed."""
    reasons: dict[str, str] = {}
    allowed = record.allowed_customer_operations
    if record.pending_operation_id:
        pending = f"publisher operation {record.pending_operation_id} is still pending"
        return {CHANGE_PLAN: pending, CHANGE_QUANTITY: pending, UNSUBSCRIBE: pending}
    if record.status is not LocalStatus.SUBSCRIBED:
        reasons[CHANGE_PLAN] = reasons[CHANGE_QUANTITY] = (
            f"only Subscribed subscriptions can change (this one is {record.status.value})"
        )
    elif allowed and "Update" not in allowed:
        reasons[CHANGE_PLAN] = reasons[CHANGE_QUANTITY] = (
            "Microsoft does not allow updating this subscription (allowedCustomerOperations)"
        )
    if record.status not in (LocalStatus.SUBSCRIBED, LocalStatus.SUSPENDED):
        reasons[UNSUBSCRIBE] = f"only Subscribed or Suspended subscriptions can be cancelled (this one is {record.status.value})"
    elif allowed and "Delete" not in allowed:
        reasons[UNSUBSCRIBE] = "Microsoft does not allow cancelling this subscription (allowedCustomerOperations)"
    return reasons


# ---------------------------------------------------------------------------------------------
# reads


def subscription_view(services: Services, subscription_id: str) -> dict[str, Any]:
    """Our record (the lifecycle events' snapshot) and the pending publisher operation, if any."""
    subscription_id = require_marketplace_id(subscription_id, "subscriptionId")
    stored = services.repository.get(subscription_id)
    if stored is None:
        raise NotFoundError("no subscription with this id is recorded", code="subscription_not_found")
    pending = None
    if stored.record.pending_operation_id:
        operation = _store(services).get(subscription_id, stored.record.pending_operation_id)
        pending = operation.to_api() if operation is not None else None
    return {**stored.record.snapshot(), "pendingOperation": pending}


def plans_view(services: Services, subscription_id: str) -> dict[str, Any]:
    subscription_id = require_marketplace_id(subscription_id, "subscriptionId")
    stored = services.repository.get(subscription_id)
    if stored is None:
        raise NotFoundError("no subscription with this id is recorded", code="subscription_not_found")
    try:
        plans = _plans(services, subscription_id)
    except MarketplaceNotFoundError as error:
        raise NotFoundError("Microsoft does not know this subscription", code="subscription_not_found") from error
    return {
        "subscriptionId": subscription_id,
        "currentPlanId": stored.record.plan_id,
        "currentQuantity": stored.record.quantity,
        "plans": [
            {
                "planId": plan.plan_id,
                "displayName": plan.display_name,
                "description": plan.description,
                "isPrivate": plan.is_private,
                "isPricePerSeat": plan.is_price_per_seat,
                "hasFreeTrials": plan.has_free_trials,
                "minQuantity": plan.min_quantity,
                "maxQuantity": plan.max_quantity,
            }
            for plan in plans
        ],
    }


def operation_view(services: Services, operation_id: str) -> PublisherOperation:
    operation_id = require_marketplace_id(operation_id, "operationId")
    store = _store(services)
    index = store.get_index(operation_id)
    operation = store.get(index.subscription_id, operation_id) if index is not None else None
    if operation is None:
        raise NotFoundError("no publisher operation with this id", code="operation_not_found")
    return operation


# ---------------------------------------------------------------------------------------------
# the change request


@dataclass(frozen=True)
class ChangeRequest:
    subscription_id: str
    action: str
    plan_id: str = ""
    quantity: int | None = None

    def fingerprint(self) -> str:
        canonical: dict[str, Any] = {"subscriptionId": self.subscription_id.lower(), "action": self.action}
        if self.plan_id:
            canonical["planId"] = self.plan_id
        if self.quantity is not None:
            canonical["quantity"] = self.quantity
        return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def parse_change_body(subscription_id: str, body: bytes) -> ChangeRequest:
    """``{"planId": "..."}`` or ``{"quantity": n}``: exactly one, as Microsoft requires."""
    if len(body) > MAX_BODY_BYTES:
        raise PayloadTooLargeError(f"body is larger than {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(body.decode("utf-8")) if body.strip() else None
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # RecursionError: nested too deep
        raise BadRequestError("body is not valid JSON", code="invalid_json") from error
    if not isinstance(data, dict):
        raise BadRequestError('body must be a JSON object: {"planId": "..."} or {"quantity": n}', code="invalid_body")
    plan_id, quantity = data.get("planId"), data.get("quantity")
    if plan_id is not None and quantity is not None:
        raise BadRequestError("change the plan or the quantity, not both in one request", code="one_change_at_a_time")
    if plan_id is None and quantity is None:
        raise BadRequestError("planId or quantity is required", code="nothing_to_change")
    if plan_id is not None:
        if not isinstance(plan_id, str) or not plan_id.strip() or len(plan_id) > MAX_PLAN_ID_CHARS:
            raise BadRequestError(f"planId must be a plan id (1 to {MAX_PLAN_ID_CHARS} characters)", code="invalid_plan_id")
        if any(ord(ch) < 32 for ch in plan_id):
            raise BadRequestError("planId must not contain control characters", code="invalid_plan_id")
        return ChangeRequest(subscription_id, CHANGE_PLAN, plan_id=plan_id.strip())
    if isinstance(quantity, bool) or not isinstance(quantity, int) or not 0 < quantity <= MAX_QUANTITY:
        raise BadRequestError("quantity must be a positive whole number", code="invalid_quantity")
    return ChangeRequest(subscription_id, CHANGE_QUANTITY, quantity=quantity)


def _operation_id_for(caller: ApiCaller | str, key: str) -> str:
    """Keyed requests get an id derived from (caller, key): the key's first use and every repeat
    meet at the same index row, without a second lookup table."""
    if not key:
        return str(uuid.uuid4())
    if len(key) > MAX_IDEMPOTENCY_KEY_CHARS or not key.isprintable() or not key.isascii():
        raise BadRequestError(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII characters", code="invalid_idempotency_key"
        )
    caller_id = caller.id if isinstance(caller, ApiCaller) else caller
    return str(uuid.uuid5(_KEY_NAMESPACE, f"{caller_id}\n{key}"))


def _replay(services: Services, operation_id: str, fingerprint: str) -> PublisherOperation | None:
    """The first answer to a repeated Idempotency-Key, or None when the key is new (or abandoned)."""
    store = _store(services)
    index = store.get_index(operation_id)
    if index is None:
        return None
    if index.fingerprint != fingerprint:
        raise UnprocessableError(
            "this Idempotency-Key was used for a different request", code="idempotency_key_reused", operationId=operation_id
        )
    operation = store.get(index.subscription_id, operation_id)
    if operation is not None:
        return operation
    # The index row exists but the claim does not: the first request is still validating, or it
    # died before claiming (nothing was sent). After twice the request deadline it is abandoned.
    abandoned_after = timedelta(seconds=2 * services.settings.publisher_api_deadline_seconds)
    if index.created_at is not None and services.clock() - index.created_at > abandoned_after:
        store.delete_index(operation_id)
        return None
    raise ConflictError("a request with this Idempotency-Key is still in progress; retry shortly", code="request_in_progress")


def _validate(services: Services, record: sm.SubscriptionRecord, request: ChangeRequest) -> None:
    """Everything Microsoft would refuse, refused before anything is sent or recorded."""
    if record.pending_operation_id:
        raise ConflictError(
            f"publisher operation {record.pending_operation_id} is still pending on this subscription",
            code="operation_pending",
            pendingOperationId=record.pending_operation_id,
        )
    if request.action == UNSUBSCRIBE:
        if record.status is LocalStatus.UNSUBSCRIBED:
            raise ConflictError("the subscription is already Unsubscribed", code="subscription_not_active")
        if record.status not in (LocalStatus.SUBSCRIBED, LocalStatus.SUSPENDED):
            raise ConflictError(
                f"the subscription is {record.status.value}; only Subscribed or Suspended subscriptions can be cancelled",
                code="subscription_not_active",
            )
        if record.allowed_customer_operations and "Delete" not in record.allowed_customer_operations:
            raise UnprocessableError(
                "Microsoft does not allow cancelling this subscription through the API (allowedCustomerOperations)",
                code="operation_not_allowed",
            )
        return
    if record.status is not LocalStatus.SUBSCRIBED:
        raise ConflictError(
            f"the subscription is {record.status.value}; only Subscribed subscriptions can change", code="subscription_not_active"
        )
    if record.allowed_customer_operations and "Update" not in record.allowed_customer_operations:
        raise UnprocessableError(
            "Microsoft does not allow updating this subscription through the API (allowedCustomerOperations)",
            code="operation_not_allowed",
        )
    try:
        plans = {plan.plan_id: plan for plan in _plans(services, record.id)}
    except MarketplaceNotFoundError as error:
        raise NotFoundError("Microsoft does not know this subscription", code="subscription_not_found") from error
    if request.action == CHANGE_PLAN:
        if request.plan_id == record.plan_id:
            raise UnprocessableError(f"the subscription is already on plan {request.plan_id}", code="plan_unchanged")
        if request.plan_id not in plans:
            raise UnprocessableError(
                f"plan {request.plan_id} is not available to this subscription (List available plans)", code="plan_not_available"
            )
        return
    plan = plans.get(record.plan_id)
    if plan is not None and not plan.is_price_per_seat:
        raise UnprocessableError(f"plan {record.plan_id} is not priced per seat", code="plan_not_per_seat")
    assert request.quantity is not None
    if plan is not None:
        low, high = plan.min_quantity, plan.max_quantity
        if (low is not None and request.quantity < low) or (high is not None and high > 0 and request.quantity > high):
            raise UnprocessableError(
                f"quantity must be between {low if low is not None else 1} and {high if high else 'unlimited'} on plan {record.plan_id}",
                code="quantity_out_of_range",
            )
    if request.quantity == record.quantity:
        raise UnprocessableError(f"the subscription already has quantity {request.quantity}", code="quantity_unchanged")


def request_change(services: Services, request: ChangeRequest, *, caller: str, idempotency_key: str = "") -> ApiResult:
    """Validate, claim, send; 202 with the operation (the first answer again for a repeated key)."""
    with deadline_scope(services.settings.publisher_api_deadline_seconds):
        return _request_change(services, request, caller=caller, idempotency_key=idempotency_key)


def _request_change(services: Services, request: ChangeRequest, *, caller: str, idempotency_key: str) -> ApiResult:
    request = replace(request, subscription_id=require_marketplace_id(request.subscription_id, "subscriptionId"))
    store = _store(services)
    fingerprint = request.fingerprint()
    operation_id = _operation_id_for(caller, idempotency_key)
    if idempotency_key:
        earlier = _replay(services, operation_id, fingerprint)
        if earlier is not None:
            return _accepted(earlier, replayed=True)

    stored = services.repository.get(request.subscription_id)
    if stored is None:
        raise NotFoundError("no subscription with this id is recorded", code="subscription_not_found")
    _validate(services, stored.record, request)

    now = services.clock()
    try:
        created = store.create_index(OperationIndex(operation_id, request.subscription_id, fingerprint, caller, now))
    except StorageUnavailableError:
        _forget(store, operation_id)  # it may have landed: the retry with this key must not wait for it
        raise
    if not created:
        earlier = _replay(services, operation_id, fingerprint)  # the same key, concurrently
        if earlier is not None:
            return _accepted(earlier, replayed=True)
        raise ConflictError("a request with this Idempotency-Key is still in progress; retry shortly", code="request_in_progress")
    operation = PublisherOperation(
        id=operation_id,
        subscription_id=request.subscription_id,
        action=request.action,
        plan_id=request.plan_id,
        quantity=request.quantity,
        caller=caller,
        correlation_id=current_correlation_id(),
        fingerprint=fingerprint,
        created_at=now,
    )
    try:
        operation = _claim(services, stored, operation, request)
    except StorageUnavailableError:
        # The claim's answer was lost (a dropped connection, a timeout): it may have landed. Undo it
        # if it did, so the caller's retry is not refused as operation_pending; nothing was sent.
        _release(store, operation)
        services.follower.follow(operation.subscription_id, operation.id)  # if the release failed too
        raise
    except AppError:
        _forget(store, operation_id)
        raise
    log.info("publisher %s of %s claimed as operation %s by %s", request.action, request.subscription_id, operation.id, caller)
    return _send(services, operation)


def _claim(services: Services, stored, operation: PublisherOperation, request: ChangeRequest) -> PublisherOperation:
    store = _store(services)
    for _ in range(4):
        try:
            return store.claim(stored, operation)
        except ConflictError:
            stored = services.repository.get(request.subscription_id)  # changed meanwhile: decide again
            if stored is None:
                raise NotFoundError("no subscription with this id is recorded", code="subscription_not_found") from None
            _validate(services, stored.record, request)
    raise ConflictError("the subscription kept changing; retry", code="conflict")


def _forget(store: PublisherOperationStore, operation_id: str) -> None:
    try:
        store.delete_index(operation_id)
    except AppError:
        log.warning("could not delete the index row of operation %s (it expires as abandoned)", operation_id)


def _send(services: Services, operation: PublisherOperation) -> ApiResult:
    """PATCH / DELETE at Microsoft, then record its operation id. A definite refusal releases the
    claim (nothing recorded); an unknown outcome keeps it for the follower to resolve."""
    store = _store(services)
    marketplace = services.marketplace
    try:
        if operation.action == CHANGE_PLAN:
            marketplace_id = marketplace.change_plan(operation.subscription_id, operation.plan_id)
        elif operation.action == CHANGE_QUANTITY:
            assert operation.quantity is not None
            marketplace_id = marketplace.change_quantity(operation.subscription_id, operation.quantity)
        else:
            marketplace_id = marketplace.delete_subscription(operation.subscription_id)
    except (MarketplaceUnavailableError, DeadlineExceededError) as error:
        # Sent or not, we cannot tell (a timeout, a 5xx): keep the claim; following it finds
        # Microsoft's operation or, when there is none, settles it as failed.
        log.warning("operation %s: Microsoft's answer is unknown (%s); it will be confirmed later", operation.id, error.code)
        services.follower.follow(operation.subscription_id, operation.id)
        return _accepted(operation)
    except MarketplaceError as error:
        _release(store, operation)
        raise _refusal(error) from error
    sent = replace(operation, status=IN_PROGRESS, marketplace_operation_id=marketplace_id, sent_at=services.clock())
    try:
        recorded = store.update(sent)
    except AppError:
        # Microsoft has the change; our note of its id did not land. The follower (and the
        # reconciler) find it among Microsoft's operations.
        log.warning("operation %s: Microsoft's operation id %s could not be recorded yet", operation.id, marketplace_id)
        recorded = sent
    if recorded is None:
        # Settled meanwhile (Microsoft's webhook came first): answer with what it is now.
        recorded = store.get(operation.subscription_id, operation.id) or sent
    log.info("operation %s sent: Microsoft's operation %s", operation.id, marketplace_id)
    services.follower.follow(operation.subscription_id, operation.id)
    return _accepted(recorded)


def _release(store: PublisherOperationStore, operation: PublisherOperation) -> None:
    try:
        store.release(operation)
        store.delete_index(operation.id)
    except AppError:
        log.error("operation %s: the claim could not be released now; following it releases it", operation.id)


def _refusal(error: MarketplaceError) -> AppError:
    """Microsoft's definite answers, in the API's terms (Microsoft's message kept: it says why)."""
    text = f"{error.error_code}: {error.error_message}".strip(": ") or str(error.status)
    if isinstance(error, MarketplaceThrottledError):
        return error  # 503: retry later
    locked = "locked" in text.lower() or "pending operation" in text.lower()
    if isinstance(error, MarketplaceConflictError) or (isinstance(error, MarketplaceBadRequestError) and locked):
        return ConflictError(f"Microsoft has another operation pending on this subscription ({text})", code="subscription_locked")
    if isinstance(error, MarketplaceBadRequestError):
        return UnprocessableError(f"Microsoft refused the change ({text})", code="marketplace_refused")
    if isinstance(error, MarketplaceNotFoundError):
        return NotFoundError("Microsoft does not know this subscription", code="subscription_not_found")
    return error


# ---------------------------------------------------------------------------------------------
# following an operation to its end


def follow_operation(services: Services, subscription_id: str, operation_id: str) -> PublisherOperation | None:
    """Look at Microsoft's side once and settle the operation when it is final. Returns it as it is now."""
    store = _store(services)
    operation = store.get(subscription_id, operation_id)
    if operation is None or operation.settled:
        return operation
    if not operation.marketplace_operation_id:
        return _resolve_unconfirmed(services, operation)
    try:
        found = services.marketplace.get_operation(subscription_id, operation.marketplace_operation_id)
    except (MarketplaceNotFoundError, MarketplaceBadRequestError):
        if _expired(services, operation):
            return settle_failed(services, operation, FAILED, "Microsoft no longer knows this operation")
        return operation
    return _settle_from(services, operation, found)


def failure_of(found: Operation) -> tuple[str, str]:
    """(our status, the reason) of an operation Microsoft failed or found in conflict."""
    status = CONFLICT if found.status is OperationStatus.CONFLICT else FAILED
    return status, found.error_message or found.error_status_code or f"{found.status.value} at Microsoft"


def _settle_from(services: Services, operation: PublisherOperation, found: Operation) -> PublisherOperation:
    if found.status is OperationStatus.SUCCEEDED:
        return settle_succeeded(services, operation, found.id)
    if found.status in (OperationStatus.FAILED, OperationStatus.CONFLICT):
        status, message = failure_of(found)
        return settle_failed(services, operation, status, message, marketplace_id=found.id)
    return operation


def _expired(services: Services, operation: PublisherOperation) -> bool:
    started = operation.sent_at or operation.created_at
    timeout = timedelta(seconds=services.settings.publisher_claim_timeout_seconds)
    return started is not None and services.clock() - started >= timeout


def _matches(operation: PublisherOperation, found: Operation) -> bool:
    if found.action.value != operation.action and found.action_name != operation.action:
        return False
    if operation.action == CHANGE_PLAN:
        return found.plan_id == operation.plan_id
    if operation.action == CHANGE_QUANTITY:
        return found.quantity == operation.quantity
    return True


def _already_done(operation: PublisherOperation, subscription: Subscription) -> bool:
    if operation.action == CHANGE_PLAN:
        return subscription.plan_id == operation.plan_id
    if operation.action == CHANGE_QUANTITY:
        return subscription.quantity == operation.quantity
    return subscription.status is SubscriptionStatus.UNSUBSCRIBED


def _resolve_unconfirmed(services: Services, operation: PublisherOperation) -> PublisherOperation:
    """A claim without Microsoft's operation id (its answer was lost, or we crashed right after)."""
    grace = timedelta(seconds=2 * services.settings.publisher_api_deadline_seconds)
    if operation.created_at is not None and services.clock() - operation.created_at < grace:
        return operation  # the request that claimed it may still be sending
    marketplace = services.marketplace
    for found in marketplace.list_outstanding_operations(operation.subscription_id):
        if _matches(operation, found):
            adopted = _store(services).update(
                replace(operation, status=IN_PROGRESS, marketplace_operation_id=found.id, sent_at=operation.created_at)
            )
            if adopted is None:
                return operation  # changed meanwhile (settled or adopted by another follower)
            log.info("operation %s: found Microsoft's operation %s", operation.id, found.id)
            return _settle_from(services, adopted, found)
    subscription = marketplace.get_subscription(operation.subscription_id)
    if _already_done(operation, subscription):
        return settle_succeeded(services, operation, "", snapshot=subscription)
    if _expired(services, operation):
        return settle_failed(services, operation, FAILED, "Microsoft has no record of this change (it was not sent or was lost)")
    return operation


def settle_succeeded(
    services: Services, operation: PublisherOperation, marketplace_id: str, *, snapshot: Subscription | None = None
) -> PublisherOperation:
    """Apply a change Microsoft completed: state machine, history, lifecycle event, claim released."""
    now = services.clock()
    settled = replace(
        operation,
        status=SUCCEEDED,
        marketplace_operation_id=marketplace_id or operation.marketplace_operation_id,
        completed_at=now,
    )
    # It took effect when Microsoft completed it, which is no later than now.
    outcome = _settle(services, settled, _KIND_FOR_ACTION[operation.action], f"publisher operation {operation.id}")
    if outcome is None:
        return _settled_elsewhere(services, settled)
    log.info("operation %s succeeded: %s", operation.id, outcome.result.value)
    _read_back(services, operation.subscription_id, snapshot)
    return settled


def settle_failed(
    services: Services, operation: PublisherOperation, status: str, message: str, *, marketplace_id: str = ""
) -> PublisherOperation:
    """Microsoft failed the change (or never had it): the subscription stays, the reason is recorded,
    a ``subscription.change_failed`` event says so, the claim is released."""
    settled = replace(
        operation,
        status=status,
        marketplace_operation_id=marketplace_id or operation.marketplace_operation_id,
        error_message=message,
        completed_at=services.clock(),
    )
    outcome = _settle(services, settled, Kind.CHANGE_FAILED, f"{operation.action} {status}: {message}"[:1000])
    if outcome is None:
        return _settled_elsewhere(services, settled)
    log.warning("operation %s %s at Microsoft: %s", operation.id, status, message)
    return settled


def _settle(services: Services, settled: PublisherOperation, kind: Kind, detail: str) -> sm.Outcome | None:
    """Record ``settled`` through the state machine, releasing its claim, in one transaction with
    Microsoft's operation marker (None: that operation was applied already)."""
    change = Change(
        kind=kind,
        source=Source.PUBLISHER,
        occurred_at=settled.completed_at or services.clock(),
        plan_id=settled.plan_id,
        quantity=settled.quantity,
        operation_id=settled.marketplace_operation_id,
        correlation_id=settled.correlation_id or current_correlation_id(),
        actor=settled.caller,
        detail=detail,
        release_operation=settled.id,
    )
    return services.repository.apply(
        settled.subscription_id,
        lambda record: sm.apply(record, change, now=services.clock()) if record is not None else None,
        operation_id=settled.marketplace_operation_id,
        build_event=build_event_document,
        extra_rows=[operation_row(settled)],
    )


def _settled_elsewhere(services: Services, settled: PublisherOperation) -> PublisherOperation:
    """Microsoft's operation was already applied (its webhook came first). If that did not settle
    our operation row too (it could not match it), settle the row and free the claim here."""
    store = _store(services)
    current = store.get(settled.subscription_id, settled.id)
    if current is None or current.settled:
        return current or settled
    done = store.update(replace(settled, etag=current.etag))
    store.clear_claim(settled.subscription_id, settled.id)
    return done or settled


def _read_back(services: Services, subscription_id: str, snapshot: Subscription | None) -> None:
    """One Get Subscription after a change: adopt what else Microsoft changed with it (e.g. seats
    set by a plan change); the reconciler repairs it if this read fails."""
    try:
        subscription = snapshot or services.marketplace.get_subscription(subscription_id)
    except MarketplaceError as error:
        log.info(
            "read-back of %s after a publisher change failed (%s); reconciliation repairs drift", subscription_id, error.code
        )
        return
    change = Change(
        kind=Kind.SYNC,
        source=Source.PUBLISHER,
        occurred_at=services.clock(),
        subscription=subscription,
        correlation_id=current_correlation_id(),
        detail="read back after a publisher change",
    )

    def decide(record: sm.SubscriptionRecord | None) -> sm.Outcome | None:
        if record is None or not sm.drift(record, subscription):
            return None
        outcome = sm.apply(record, change, now=services.clock())
        return outcome if outcome.result is sm.Result.APPLIED else None

    services.repository.apply(subscription_id, decide, build_event=build_event_document)


def matching_operation(services: Services, record: sm.SubscriptionRecord, found: Operation) -> PublisherOperation | None:
    """The pending publisher operation a Partner webhook completes, if it is one of ours."""
    if not record.pending_operation_id or services.publisher_store is None:
        return None
    operation = services.publisher_store.get(record.id, record.pending_operation_id)
    if operation is None or operation.settled:
        return None
    if operation.marketplace_operation_id:
        return operation if operation.marketplace_operation_id.lower() == found.id.lower() else None
    # Not recorded yet (the webhook overtook our write, or a crash lost it): the same change matches.
    return operation if found.request_source.lower() == "partner" and _matches(operation, found) else None


def settled_row(operation: PublisherOperation, found: Operation, now: datetime) -> dict[str, Any]:
    """The operation row as a webhook that completes it leaves it."""
    if found.status is OperationStatus.SUCCEEDED:
        settled = replace(operation, status=SUCCEEDED, marketplace_operation_id=found.id, completed_at=now)
    else:
        status, message = failure_of(found)
        settled = replace(operation, status=status, marketplace_operation_id=found.id, error_message=message, completed_at=now)
    return operation_row(settled)


# ---------------------------------------------------------------------------------------------
# the background follower


JOB_POLL = "poll"


class OperationFollower:
    """Follows operations through the operations work queue (OPERATIONS_WORK_QUEUE), never a thread:
    after the 202 a "poll operation Y" job goes on the queue invisible for
    PUBLISHER_OPERATION_POLL_SECONDS; the operation_followup queue trigger polls Get Operation once
    (``run_job``) and puts the job back with the wait doubled (up to POLL_MAX_SECONDS) until the
    operation settles or FOLLOW_BUDGET_SECONDS are spent; the reconciler finishes the rest.
    """

    def __init__(self, services: Services):
        self._services = services
        self.queue = WorkQueue(
            queue_client(services.settings, services.settings.operations_work_queue), clock=lambda: services.clock()
        )
        self.first_wait = float(services.settings.publisher_operation_poll_seconds)

    def follow(self, subscription_id: str, operation_id: str) -> None:
        job = Job(
            kind=JOB_POLL,
            subscription_id=subscription_id,
            operation_id=operation_id,
            wait=self.first_wait,
            ends=self._services.clock().timestamp() + FOLLOW_BUDGET_SECONDS,
        )
        try:
            self.queue.put(job, delay_seconds=self.first_wait)
        except Exception as error:  # noqa: BLE001 - the operation row is the truth; the reconciler follows it
            log.warning(
                "follow-up of operation %s not enqueued (%s); the reconciler follows it", operation_id, type(error).__name__
            )

    def run_job(self, message: str) -> bool:
        """Poll once (the operation_followup function's use case). True: finished (settled,
        released or out of budget); False: put back with the doubled wait."""
        job = Job.from_message(message)
        if job.kind != JOB_POLL or not job.operation_id:
            raise ValueError(f"not a poll job: {job.kind!r}")
        try:
            operation = follow_operation(self._services, job.subscription_id, job.operation_id)
            done = operation is None or operation.settled  # None: released (nothing to follow)
        except AppError as error:
            log.warning("following operation %s: %s (retrying)", job.operation_id, error.code)
            done = False
        if done:
            return True
        wait = min(max(job.wait, 1.0) * 2, POLL_MAX_SECONDS)
        if self._services.clock().timestamp() + wait > job.ends:
            log.info("operation %s is still open; the reconciler follows it from here", job.operation_id)
            return True
        self.queue.put(replace(job, attempt=job.attempt + 1, wait=wait), delay_seconds=wait)
        return False

    def wait_idle(self, timeout: float) -> bool:
        """Serve the operations queue here until it is empty (tools, tests); False on timeout.
        Delayed jobs this queue tracks (``track_delays``) are released at once instead of waited for."""
        ends = time.monotonic() + timeout
        while True:
            self.queue.drain(self.run_job)
            if not self.queue.waiting():
                return True
            if time.monotonic() >= ends:
                return False
            # Released jobs are due at once; Microsoft (the stand-in) still answers in real time.
            time.sleep(0.05 if self.queue.release_delayed() else 0.1)

    def close(self) -> None:
        """Nothing runs in the background; waiting jobs stay on the queue."""


# ---------------------------------------------------------------------------------------------
# the HTTP API's use cases (authenticate, then one of the above)


def _caller(services: Services, authorization: str | None, role: str) -> ApiCaller:
    return _authenticator(services).authenticate(authorization, role)


def api_get_subscription(services: Services, authorization: str | None, subscription_id: str) -> ApiResult:
    _caller(services, authorization, ROLE_SUBSCRIPTIONS_READ)
    return ApiResult(200, subscription_view(services, subscription_id))


def api_list_plans(services: Services, authorization: str | None, subscription_id: str) -> ApiResult:
    _caller(services, authorization, ROLE_SUBSCRIPTIONS_READ)
    with deadline_scope(services.settings.publisher_api_deadline_seconds):
        return ApiResult(200, plans_view(services, subscription_id))


def api_get_operation(services: Services, authorization: str | None, operation_id: str) -> ApiResult:
    _caller(services, authorization, ROLE_SUBSCRIPTIONS_READ)
    return ApiResult(200, operation_view(services, operation_id).to_api())


def api_change(
    services: Services, authorization: str | None, subscription_id: str, body: bytes, idempotency_key: str | None
) -> ApiResult:
    caller = _caller(services, authorization, ROLE_SUBSCRIPTIONS_READ_WRITE)
    subscription_id = require_marketplace_id(subscription_id, "subscriptionId")
    request = parse_change_body(subscription_id, body)
    return request_change(services, request, caller=caller.id, idempotency_key=(idempotency_key or "").strip())


def api_cancel(services: Services, authorization: str | None, subscription_id: str, idempotency_key: str | None) -> ApiResult:
    caller = _caller(services, authorization, ROLE_SUBSCRIPTIONS_READ_WRITE)
    subscription_id = require_marketplace_id(subscription_id, "subscriptionId")
    request = ChangeRequest(subscription_id, UNSUBSCRIBE)
    return request_change(services, request, caller=caller.id, idempotency_key=(idempotency_key or "").strip())


def describe(operation: PublisherOperation) -> str:
    """One line for the CLI."""
    what = {CHANGE_PLAN: f"plan -> {operation.plan_id}", CHANGE_QUANTITY: f"quantity -> {operation.quantity}"}.get(
        operation.action, "cancel"
    )
    tail = f": {operation.error_message}" if operation.error_message else ""
    return f"{operation.id} {what} {operation.public_status}{tail} (created {format_timestamp(operation.created_at)})"
