"""Webhook use case: authenticate, verify, and apply each Marketplace operation exactly once.

Microsoft delivers at least once, in no guaranteed order, and reads a 4xx on ChangePlan and
ChangeQuantity as a rejection. So: 4xx only for input that is really bad (unauthenticated,
malformed, unverifiable); every transient problem escapes as a 5xx error so Microsoft retries, and
nothing is half-written because each change is one storage transaction.

Order of work for an event:
1. authenticate the bearer token; parse the body leniently;
2. a settled operation marker means a duplicate: answer 200, change nothing;
3. verify with Get Operation (the operation exists, for that subscription and action);
4. record the operation marker (durable before acting; a crash after this is finished by the
   next delivery or by the reconciler's replay);
5. for an InProgress ChangePlan/ChangeQuantity/Reinstate ask the publisher policy and PATCH the
   operation Success/Failure;
6. apply through the state machine in one transaction with the marker and the outbox event.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from shared import state_machine as sm
from shared.deadline import current_deadline, deadline_scope
from shared.domain import Action, Operation, OperationStatus, UpdateStatus, WebhookEvent
from shared.errors import (
    BadRequestError,
    DeadlineExceededError,
    MarketplaceBadRequestError,
    MarketplaceConflictError,
    MarketplaceNotFoundError,
    PayloadTooLargeError,
    StorageRefusedError,
)
from shared.events import build_event_document
from shared.ids import require_marketplace_id
from shared.observability import current_correlation_id
from shared.policy import PolicyDecision, PolicyRequest
from shared.repository import OperationMarker, StoredRecord
from shared.state_machine import FLAG_CHANGE_REFUSED, Change, Kind, Source

if TYPE_CHECKING:
    from shared.services import Services

log = logging.getLogger(__name__)
ANSWER_RESERVE_SECONDS = 1.5  # kept for our own write after answering Microsoft

NEEDS_ANSWER = frozenset({Action.CHANGE_PLAN, Action.CHANGE_QUANTITY, Action.REINSTATE})

_KIND_FOR_ACTION = {
    Action.CHANGE_PLAN: Kind.CHANGE_PLAN,
    Action.CHANGE_QUANTITY: Kind.CHANGE_QUANTITY,
    Action.SUSPEND: Kind.SUSPEND,
    Action.REINSTATE: Kind.REINSTATE,
    Action.UNSUBSCRIBE: Kind.UNSUBSCRIBE,
    Action.RENEW: Kind.RENEW,
    Action.SUBSCRIBE: Kind.SUBSCRIBE,
}


class VerificationFailedError(BadRequestError):
    """Get Operation does not confirm this event."""

    code = "verification_failed"


@dataclass(frozen=True)
class WebhookResult:
    status: int
    result: str
    operation_id: str = ""
    subscription_id: str = ""

    def body(self) -> dict:
        return {"result": self.result, "operationId": self.operation_id, "subscriptionId": self.subscription_id}


def parse_event(body: bytes, max_bytes: int) -> WebhookEvent:
    if len(body) > max_bytes:
        raise PayloadTooLargeError(f"body is larger than {max_bytes} bytes")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # RecursionError: nested too deep
        raise BadRequestError("body is not valid JSON") from error
    try:
        event = WebhookEvent.from_api(data)
    except ValueError as error:
        raise BadRequestError(str(error)) from error
    # They become storage keys and Marketplace URL segments: GUIDs only, refused before any I/O.
    require_marketplace_id(event.subscription_id, "subscriptionId")
    require_marketplace_id(event.id, "id")
    return event


def _verify(services: Services, event: WebhookEvent) -> Operation:
    """The authoritative operation from Microsoft; refuses events it does not confirm."""
    try:
        operation = services.marketplace.get_operation(event.subscription_id, event.id)
    except (MarketplaceNotFoundError, MarketplaceBadRequestError) as error:
        raise VerificationFailedError("Marketplace does not know this operation") from error
    if operation.subscription_id and operation.subscription_id.lower() != event.subscription_id.lower():
        raise VerificationFailedError("operation belongs to another subscription")
    if operation.action_name.lower() != event.operation.action_name.lower():
        raise VerificationFailedError("operation action does not match the event")
    return operation


def _change_for(event: WebhookEvent, operation: Operation, services, kind: Kind, detail: str = "", occurred_at=None) -> Change:
    term = event.subscription.term if event.subscription is not None else None
    return Change(
        kind=kind,
        source=Source.WEBHOOK,
        occurred_at=occurred_at or operation.timestamp or event.operation.timestamp or services.clock(),
        subscription=event.subscription,
        plan_id=operation.plan_id or event.operation.plan_id,
        quantity=operation.quantity if operation.quantity is not None else event.operation.quantity,
        term=term,
        operation_id=event.id,
        correlation_id=current_correlation_id(),
        detail=detail,
    )


def _ensure_known(services: Services, subscription_id: str, as_of) -> StoredRecord | None:
    """A webhook for a subscription we never saw (auto-activation, lost landing visit): fetch and record it.

    The snapshot is dated at the event (``as_of``), not now: it is the state the event belongs to,
    so the event then applies (usually as a no-op) instead of looking older than our first sighting.
    """
    stored = services.repository.get(subscription_id)
    if stored is not None:
        return stored
    _sync_from_microsoft(services, subscription_id, as_of=as_of or services.clock(), detail="first seen in a webhook")
    return services.repository.get(subscription_id)  # the rare path: read it back with its ETag


def _sync_from_microsoft(services: Services, subscription_id: str, *, as_of, detail: str) -> None:
    """Record Microsoft's current record of the subscription, unless ours already matches it."""
    subscription = services.marketplace.get_subscription(subscription_id)
    change = Change(
        kind=Kind.SYNC,
        source=Source.WEBHOOK,
        occurred_at=as_of,
        subscription=subscription,
        correlation_id=current_correlation_id(),
        detail=detail,
    )

    def decide(record):
        if record is not None and not sm.drift(record, subscription):
            return None  # in step: a concurrent first delivery, or a late duplicate
        return sm.apply(record, change, now=services.clock())

    services.repository.apply(subscription_id, decide, build_event=build_event_document)


def _state_machine_refusal(
    services: Services, event: WebhookEvent, operation: Operation, kind: Kind, record: sm.SubscriptionRecord | None
) -> str:
    """Why the state machine would refuse this change ("" if it would take it). Asked before
    Microsoft is answered, so Microsoft is never told Success for a change we then refuse."""
    if record is None:
        return ""
    trial = sm.apply(record, _change_for(event, operation, services, kind, occurred_at=services.clock()), now=services.clock())
    if trial.result is not sm.Result.REJECTED:
        return ""
    return trial.history.detail or "refused by the state machine"


def _answer(
    services: Services, event: WebhookEvent, operation: Operation, record: sm.SubscriptionRecord | None, *, refusal: str = ""
) -> tuple[PolicyDecision, Operation]:
    """Decide (state machine, then policy) and PATCH the operation with that decision; returns the
    decision and the settled operation."""
    if refusal:
        return _send_answer(services, event, operation, PolicyDecision(False, refusal))
    request = PolicyRequest(
        action=operation.action.value,
        subscription_id=event.subscription_id,
        record=record,
        plan_id=operation.plan_id or event.operation.plan_id,
        quantity=operation.quantity if operation.quantity is not None else event.operation.quantity,
        operation_id=event.id,
    )
    try:
        decision = services.policy(request)
    except Exception:  # a broken policy must not silently accept or reject: let Microsoft retry
        log.exception("publisher policy failed for operation %s", event.id)
        raise
    return _send_answer(services, event, operation, decision)


def _send_answer(
    services: Services, event: WebhookEvent, operation: Operation, decision: PolicyDecision
) -> tuple[PolicyDecision, Operation]:
    deadline = current_deadline()
    if deadline is not None and deadline.remaining() < ANSWER_RESERVE_SECONDS:
        # Answering Microsoft and then running out of time before our own write would leave the
        # two sides apart: answer nothing now; the redelivery decides again.
        raise DeadlineExceededError("not enough time left to answer Microsoft and record the change")
    status = UpdateStatus.SUCCESS if decision.accepted else UpdateStatus.FAILURE
    try:
        services.marketplace.update_operation(event.subscription_id, event.id, status)
    except MarketplaceConflictError:
        # Already settled (our earlier attempt, or Microsoft's 10-second auto-accept): follow Microsoft.
        settled = services.marketplace.get_operation(event.subscription_id, event.id)
        accepted = settled.status is OperationStatus.SUCCEEDED
        return PolicyDecision(accepted, "settled before our answer"), settled
    log.info("answered operation %s with %s", event.id, status.value)
    return decision, operation


def handle_webhook(services: Services, authorization: str | None, body: bytes) -> WebhookResult:
    """Authenticate, verify, record and apply one webhook within WEBHOOK_DEADLINE_SECONDS.

    Every outbound call (signing keys, Marketplace, storage) waits only for what is left of the
    deadline; when it runs out the answer is a 5xx and nothing is half done: the marker and the
    change are one transaction, and Microsoft's redelivery finishes a recorded operation.
    """
    with deadline_scope(services.settings.webhook_deadline_seconds):
        return _handle_webhook(services, authorization, body)


def _handle_webhook(services: Services, authorization: str | None, body: bytes) -> WebhookResult:
    settings = services.settings
    services.webhook_authenticator.authenticate(authorization)
    event = parse_event(body, settings.webhook_max_body_bytes)
    subscription_id, operation_id = event.subscription_id, event.id
    log.info("webhook %s for subscription %s, operation %s", event.operation.action_name, subscription_id, operation_id)

    try:
        repository = services.repository
        marker = repository.get_marker(subscription_id, operation_id)
        if marker is not None and not marker.pending:
            return WebhookResult(200, "duplicate", operation_id, subscription_id)

        operation = _verify(services, event) if settings.webhook_verify_operation else event.operation
        if marker is None:
            _, marker = repository.record_operation(
                subscription_id,
                operation_id,
                action=event.operation.action_name,
                payload=body.decode("utf-8", "replace"),
                correlation_id=current_correlation_id(),
            )
        return apply_operation(services, event, operation, marker=marker)
    except StorageRefusedError:
        # A poison event: storage will refuse it on every redelivery, so a 5xx would make Microsoft
        # retry forever and a 4xx would reject the change. Acknowledge it, and say so loudly: the
        # reconciler flags the subscription from Microsoft's record.
        log.error(
            "OPERATOR ACTION NEEDED: storage refused operation %s of subscription %s; acknowledged unapplied",
            operation_id,
            subscription_id,
        )
        return WebhookResult(200, "not_stored", operation_id, subscription_id)


def apply_operation(
    services: Services, event: WebhookEvent, operation: Operation, *, marker: OperationMarker | None = None
) -> WebhookResult:
    """Steps 5-6 for a recorded operation (also used by the reconciler's replay).

    ``marker`` is the operation's marker when the caller has it (saves a read; a stale one only
    costs a retry inside the repository).
    """
    subscription_id, operation_id = event.subscription_id, event.id
    stored = _ensure_known(services, subscription_id, operation.timestamp or event.operation.timestamp)
    requested_by_publisher = (operation.request_source or event.operation.request_source).lower() == "partner"
    if requested_by_publisher and operation.status in (OperationStatus.IN_PROGRESS, OperationStatus.NOT_STARTED):
        # A change the publisher asked for, not complete yet: there is nothing to answer (Microsoft
        # refuses a PATCH of its status) nor to apply. The marker stays pending: the publisher
        # operation's follower, or the reconciler's replay, applies it once it has succeeded.
        log.info("operation %s requested by the publisher is still %s", operation_id, operation.status.value)
        return WebhookResult(200, "in_progress", operation_id, subscription_id)
    ours = None
    if stored is not None and stored.record.pending_operation_id:
        from shared.publisher import matching_operation

        ours = matching_operation(services, stored.record, operation)

    kind = _KIND_FOR_ACTION.get(operation.action if operation.action is not Action.UNKNOWN else event.action)
    detail, flag = "", ""
    occurred_at = None
    if kind is None:
        kind, detail = Kind.UNKNOWN_ACTION, f"unknown action {event.operation.action_name!r}, left to reconciliation"
    elif operation.action in NEEDS_ANSWER and operation.status is OperationStatus.IN_PROGRESS:
        record = stored.record if stored else None
        refusal = _state_machine_refusal(services, event, operation, kind, record)
        decision, operation = _answer(services, event, operation, record, refusal=refusal)
        if not decision.accepted:
            kind, detail, flag = Kind.REFUSED, f"refused {operation.action.value}: {decision.reason}", FLAG_CHANGE_REFUSED
        else:
            # An InProgress change takes effect when it is accepted, not when Microsoft opened it:
            # a snapshot read in between (first sighting above, a reconciliation run) predates it
            # and must not make the accepted change look stale.
            occurred_at = services.clock()
    elif operation.status in (OperationStatus.FAILED, OperationStatus.CONFLICT):
        kind, detail = Kind.REFUSED, f"operation {operation.status.value} at Microsoft; nothing to apply"
        if ours is not None:
            from shared.publisher import failure_of

            status, reason = failure_of(operation)
            kind, detail = Kind.CHANGE_FAILED, f"{ours.action} {status}: {reason}"

    change = _change_for(event, operation, services, kind, detail, occurred_at)
    if flag:
        change = replace(change, flag=flag)
    extra_rows: list[dict] = []
    if ours is not None:
        # The publisher's own operation: settled here, in the same transaction, exactly once
        # whether this webhook or the operation's follower gets there first.
        from shared.publisher import settled_row

        change = replace(change, source=Source.PUBLISHER, release_operation=ours.id, actor=ours.caller)
        extra_rows.append(settled_row(ours, operation, services.clock()))
    outcome = services.repository.apply(
        subscription_id,
        lambda record: sm.apply(record, change, now=services.clock()),
        operation_id=operation_id,
        build_event=build_event_document,
        known=stored,
        known_marker=marker,
        extra_rows=extra_rows,
    )
    if outcome is None:
        return WebhookResult(200, "duplicate", operation_id, subscription_id)
    log.info("operation %s on %s: %s", operation_id, subscription_id, outcome.result.value)
    if outcome.result is sm.Result.STALE:
        _adopt_current_record(services, subscription_id)
    return WebhookResult(200, outcome.result.value if kind is not Kind.REFUSED else "refused", operation_id, subscription_id)


def _adopt_current_record(services: Services, subscription_id: str) -> None:
    """A stale event means our record is newer than it, or a listing we synced was. When in doubt,
    Microsoft's current record decides (its list can lag behind an operation it just notified)."""
    _sync_from_microsoft(
        services, subscription_id, as_of=services.clock(), detail="stale event: adopted Microsoft's current record"
    )
