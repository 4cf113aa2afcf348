"""Activating a subscription: shared by the landing page, the operator command line and the reconciler.

Activate is asynchronous on Microsoft's side (a 200 means "received"), and not idempotent (a second
Activate answers 400). So:

1. claim the activation locally first (PendingFulfillmentStart -> ActivationRequested, ETag-guarded):
   of two tabs or a double click only one wins the claim and calls Microsoft;
2. call Activate; a 400 is read back with Get Subscription and counts as success when Microsoft
   already shows Subscribed (someone, or Microsoft's auto-activation, got there first);
3. read the subscription back once: Subscribed -> record it; otherwise keep ActivationRequested
   and let the reconciler confirm (or retry) later.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from typing import TYPE_CHECKING

from shared import state_machine as sm
from shared.domain import SubscriptionStatus
from shared.errors import MarketplaceBadRequestError, MarketplaceError, MarketplaceNotFoundError, StorageUnavailableError
from shared.events import build_event_document
from shared.observability import current_correlation_id
from shared.state_machine import Change, Kind, LocalStatus, Source, SubscriptionRecord

if TYPE_CHECKING:
    from shared.services import Services

log = logging.getLogger(__name__)

# A claim younger than this belongs to a request still in flight; older ones may be retried.
CLAIM_TIMEOUT = timedelta(minutes=2)


class ActivationResult(str, Enum):
    ACTIVATED = "activated"  # Microsoft shows Subscribed
    REQUESTED = "requested"  # Activate accepted; Microsoft not yet Subscribed
    IN_PROGRESS = "in_progress"  # another request holds the claim
    ALREADY_ACTIVE = "already_active"
    PENDING_OPERATOR = "pending_operator"  # manual mode
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass(frozen=True)
class Activation:
    result: ActivationResult
    record: SubscriptionRecord | None
    error: MarketplaceError | None = None


def _change(services: Services, kind: Kind, source: Source, actor: str, **extra) -> Change:
    return Change(
        kind=kind, source=source, occurred_at=services.clock(), actor=actor, correlation_id=current_correlation_id(), **extra
    )


def _record(services: Services, subscription_id: str, change: Change) -> sm.Outcome | None:
    return services.repository.apply(
        subscription_id, lambda record: sm.apply(record, change, now=services.clock()), build_event=build_event_document
    )


def request_operator_activation(services: Services, subscription_id: str, actor: str, source: Source) -> Activation:
    """Manual mode: record PendingActivation once; an active or cancelled subscription is left alone."""
    change = _change(services, Kind.REQUEST_ACTIVATION, source, actor)

    def decide(record: SubscriptionRecord | None):
        if record is None or record.status not in (LocalStatus.PENDING_FULFILLMENT_START, LocalStatus.ACTIVATION_FAILED):
            return None  # unknown, already requested, active or cancelled: nothing to record
        return sm.apply(record, change, now=services.clock())

    outcome = services.repository.apply(subscription_id, decide, build_event=build_event_document)
    if outcome is not None:
        return Activation(ActivationResult.PENDING_OPERATOR, outcome.record)
    return _nothing_to_do(services, subscription_id, otherwise=ActivationResult.PENDING_OPERATOR)


def _nothing_to_do(services: Services, subscription_id: str, *, otherwise: ActivationResult) -> Activation:
    """Why a request recorded nothing: unknown, already active, cancelled, or ``otherwise``."""
    stored = services.repository.get(subscription_id)
    record = stored.record if stored else None
    if record is None:
        return Activation(ActivationResult.FAILED, None)
    if record.status in sm.ACTIVE:
        return Activation(ActivationResult.ALREADY_ACTIVE, record)
    if record.status is LocalStatus.UNSUBSCRIBED:
        return Activation(ActivationResult.CANCELLED, record)
    return Activation(otherwise, record)


def activate(services: Services, subscription_id: str, *, actor: str, source: Source, force_retry: bool = False) -> Activation:
    """Activate once, however many callers ask at the same time."""
    now = services.clock()

    def claim(record: SubscriptionRecord | None):
        if record is None:
            return None
        if record.status in sm.ACTIVE or record.status is LocalStatus.UNSUBSCRIBED:
            return None
        if record.status is LocalStatus.ACTIVATION_REQUESTED and not force_retry:
            requested = record.activation_requested_at
            if requested is not None and now - requested < CLAIM_TIMEOUT:
                return None
        change = _change(services, Kind.ACTIVATION_SENT, source, actor)
        return sm.apply(record, change, now=now)

    outcome = services.repository.apply(subscription_id, claim, build_event=build_event_document)
    if outcome is None:  # another request holds the claim, or there is nothing to activate
        return _nothing_to_do(services, subscription_id, otherwise=ActivationResult.IN_PROGRESS)

    record = outcome.record
    try:
        services.marketplace.activate(subscription_id, record.plan_id, record.quantity)
    except (MarketplaceNotFoundError, MarketplaceBadRequestError) as error:
        return _after_refusal(services, subscription_id, actor, source, error)
    except MarketplaceError as error:
        log.warning("activation of %s failed: %s", subscription_id, error)
        failed = _record_quietly(
            services, subscription_id, _change(services, Kind.ACTIVATION_FAILED, source, actor, detail=str(error))
        )
        return Activation(ActivationResult.FAILED, failed or record, error)
    return _read_back(services, subscription_id, record, actor, source)


def _read_back(services: Services, subscription_id: str, record: SubscriptionRecord, actor: str, source: Source) -> Activation:
    try:
        subscription = services.marketplace.get_subscription(subscription_id)
    except MarketplaceError as error:
        log.info("activation of %s accepted; read-back failed (%s), the reconciler confirms it", subscription_id, error)
        return Activation(ActivationResult.REQUESTED, record)
    if subscription.status is SubscriptionStatus.SUBSCRIBED:
        confirmed = _record_quietly(
            services, subscription_id, _change(services, Kind.ACTIVATION_CONFIRMED, source, actor, subscription=subscription)
        )
        return Activation(ActivationResult.ACTIVATED, confirmed or record)
    return Activation(ActivationResult.REQUESTED, record)


def _after_refusal(services: Services, subscription_id: str, actor: str, source: Source, error: MarketplaceError) -> Activation:
    """400/404 from Activate: Microsoft's own record tells whether it is already done."""
    try:
        subscription = services.marketplace.get_subscription(subscription_id)
    except MarketplaceError:
        subscription = None
    if subscription is not None and subscription.status in (SubscriptionStatus.SUBSCRIBED, SubscriptionStatus.SUSPENDED):
        synced = _record_quietly(
            services, subscription_id, _change(services, Kind.ACTIVATION_CONFIRMED, source, actor, subscription=subscription)
        )
        return Activation(ActivationResult.ALREADY_ACTIVE, synced)
    if subscription is not None and subscription.status is SubscriptionStatus.UNSUBSCRIBED:
        synced = _record_quietly(services, subscription_id, _change(services, Kind.UNSUBSCRIBE, source, actor))
        return Activation(ActivationResult.CANCELLED, synced)
    log.error("Marketplace refused to activate %s: %s", subscription_id, error)
    failed = _record_quietly(
        services, subscription_id, _change(services, Kind.ACTIVATION_FAILED, source, actor, detail=str(error))
    )
    return Activation(ActivationResult.FAILED, failed, error)


def _record_quietly(services: Services, subscription_id: str, change: Change) -> SubscriptionRecord | None:
    """Record a follow-up; if storage fails now, the reconciler repairs it from Microsoft's record."""
    try:
        outcome = _record(services, subscription_id, change)
    except StorageUnavailableError:
        log.warning("could not record %s for %s; the reconciler will repair it", change.kind.value, subscription_id)
        return None
    return outcome.record if outcome else None
