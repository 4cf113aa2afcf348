"""Landing page use cases: show a purchase (GET) and activate it on confirmation (POST).

They take plain values and the services bundle and return a ``Page`` (status, template, context);
the HTTP handler only renders it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from shared import state_machine as sm
from shared.activation import Activation, ActivationResult, activate, request_operator_activation
from shared.deadline import deadline_scope
from shared.domain import AadIdentifier, Subscription
from shared.errors import (
    AppError,
    DeadlineExceededError,
    ForbiddenError,
    MarketplaceBadRequestError,
    MarketplaceError,
    MarketplaceNotFoundError,
    MarketplaceUnauthorizedError,
    StorageRefusedError,
    StorageUnavailableError,
    http_status_for,
)
from shared.events import build_event_document
from shared.form_tokens import issue_form_token, verify_form_token
from shared.ids import is_marketplace_id
from shared.observability import current_correlation_id
from shared.principal import SignedInUser
from shared.state_machine import Change, Kind, LocalStatus, Source

if TYPE_CHECKING:
    from shared.services import Services

log = logging.getLogger(__name__)

ANONYMOUS_USER_ID = "anonymous"


@dataclass(frozen=True)
class Page:
    status: int
    template: str
    context: dict[str, Any] = field(default_factory=dict)


def restore_token(raw: str | None) -> str:
    """The host already URL-decoded the query once; a '+' that arrived as a space is put back.

    Purchase tokens are base64-like and never contain spaces, so a space can only be a '+' that
    a browser or proxy sent unencoded. Never decode a second time. Spaces are restored before
    other whitespace is trimmed: a token may start or end with '+'.
    """
    return (raw or "").replace(" ", "+").strip()


def _base_context(services: Services, user: SignedInUser | None) -> dict[str, Any]:
    settings = services.settings
    return {
        "brand_name": settings.brand_name,
        "brand_logo_url": settings.brand_logo_url,
        "support_email": settings.support_email,
        "saas_app_url": settings.saas_app_url,
        "user": user,
        "correlation_id": current_correlation_id(),
    }


def _error_page(services: Services, user, status: int, template: str, **extra) -> Page:
    return Page(status, template, {**_base_context(services, user), **extra})


def _sign_in_page(services: Services, token: str) -> Page:
    back = "/api/landing?token=" + quote(token, safe="")
    login_url = "/.auth/login/aad?post_login_redirect_uri=" + quote(back, safe="")
    return _error_page(services, None, 401, "sign_in.html", login_url=login_url)


def _unavailable(services: Services, user, error: AppError) -> Page:
    # 503 where retrying later helps (storage, Marketplace unavailable or throttled); 500 when our
    # storage refused the record (retrying cannot help: support is alerted by the ERROR log); else 502.
    if isinstance(error, StorageRefusedError):
        log.error("OPERATOR ACTION NEEDED: storage refused a landing page record (%s)", error.message)
        return _error_page(services, user, 500, "unavailable.html")
    status = 503 if http_status_for(error) == 503 else 502
    return _error_page(services, user, status, "unavailable.html")


def _plan_name(services: Services, subscription_id: str, plan_id: str) -> str:
    try:
        for plan in services.marketplace.list_available_plans(subscription_id):
            if plan.plan_id == plan_id and plan.display_name:
                return plan.display_name
    except MarketplaceError as error:
        log.info("plan names unavailable for %s: %s", subscription_id, error)
    return plan_id


def belongs_to_purchase(user: SignedInUser | None, record: sm.SubscriptionRecord) -> bool:
    """Is the signed-in user of the purchaser's or the beneficiary's organisation (or one of them)?"""
    if user is None:
        return False
    parties = (record.purchaser, record.beneficiary)
    tenant = (user.tenant_id or "").strip().lower()
    if tenant and any(tenant == (party.tenant_id or "").strip().lower() for party in parties):
        return True
    email = (user.email or "").strip().lower()
    return bool(email) and any(email == (party.email_id or "").strip().lower() for party in parties)


def _masked(identity: AadIdentifier) -> AadIdentifier:
    """``a…@contoso.example``: enough to recognise one's own organisation, not to harvest addresses."""
    local, _, domain = (identity.email_id or "").partition("@")
    return AadIdentifier(email_id=f"{local[:1]}\u2026@{domain}" if domain else "")


def _purchase_context(
    services: Services, user, record: sm.SubscriptionRecord, subscription: Subscription | None
) -> dict[str, Any]:
    # The purchase token is the capability Microsoft issued, and buyers forward the link within their
    # organisation; someone outside it sees the purchase without its people's email addresses.
    show_people = services.settings.landing_tenant_check == "off" or belongs_to_purchase(user, record)
    return {
        **_base_context(services, user),
        "record": record,
        "subscription_name": record.name,
        "offer_id": record.offer_id,
        "plan_name": _plan_name(services, record.id, record.plan_id),
        "plan_id": record.plan_id,
        "quantity": record.quantity,
        "term_unit": record.term_unit,
        "term_start": record.term_start,
        "term_end": record.term_end,
        "is_free_trial": record.is_free_trial,
        "purchaser": record.purchaser if show_people else _masked(record.purchaser),
        "beneficiary": record.beneficiary if show_people else _masked(record.beneficiary),
        "is_csp": bool(record.purchaser.email_id and record.beneficiary.email_id and record.purchaser != record.beneficiary),
        "status": record.status.value,
    }


def view_purchase(services: Services, raw_token: str | None, user: SignedInUser | None) -> Page:
    """GET /api/landing within LANDING_DEADLINE_SECONDS (past it: the retry page, nothing half done)."""
    with deadline_scope(services.settings.landing_deadline_seconds):
        try:
            return _view_purchase(services, raw_token, user)
        except DeadlineExceededError as error:
            log.warning("landing page out of time: %s", error.message)
            return _unavailable(services, user, error)


def _view_purchase(services: Services, raw_token: str | None, user: SignedInUser | None) -> Page:
    """GET /api/landing?token=...: resolve, record, and show the purchase."""
    token = restore_token(raw_token)
    if not token:
        return _error_page(services, user, 400, "no_token.html")
    if user is None and services.settings.landing_require_signin:
        return _sign_in_page(services, token)
    try:
        resolved = services.marketplace.resolve(token)
        subscription = resolved.subscription or services.marketplace.get_subscription(resolved.subscription_id)
    except (MarketplaceBadRequestError, MarketplaceNotFoundError):
        return _error_page(services, user, 400, "invalid_token.html")
    except MarketplaceUnauthorizedError:
        log.error("OPERATOR ACTION NEEDED: Marketplace rejected our credentials while resolving a purchase")
        return _error_page(services, user, 502, "unavailable.html")
    except MarketplaceError as error:
        return _unavailable(services, user, error)

    change = Change(
        kind=Kind.RECORD_PURCHASE,
        source=Source.LANDING_PAGE,
        occurred_at=services.clock(),
        subscription=subscription,
        actor=user.label if user else "",
        correlation_id=current_correlation_id(),
    )

    def decide(record: sm.SubscriptionRecord | None):
        if record is not None and not sm.drift(record, subscription) and (record.signed_in_user or not change.actor):
            return None  # a returning buyer whose record is in step costs no write
        return sm.apply(record, change, now=change.occurred_at)

    try:
        outcome = services.repository.apply(subscription.id, decide, build_event=build_event_document)
        if outcome is not None:
            record = outcome.record
        else:
            stored = services.repository.get(subscription.id)
            if stored is None:  # written a moment ago, gone now: let the buyer retry
                raise StorageUnavailableError("the purchase record could not be read back")
            record = stored.record
    except (StorageUnavailableError, StorageRefusedError) as error:
        return _unavailable(services, user, error)

    if services.settings.landing_tenant_check == "strict" and not belongs_to_purchase(user, record):
        log.warning("landing page refused: the signed-in user is not of the purchaser's or beneficiary's organisation")
        return _error_page(services, user, 403, "forbidden.html", reason="this purchase belongs to another organisation")
    context = _purchase_context(services, user, record, subscription)
    status = record.status
    if status in (LocalStatus.PENDING_FULFILLMENT_START, LocalStatus.ACTIVATION_FAILED):
        context["form_token"] = issue_form_token(
            services.settings.landing_form_secret, record.id, user.id if user else ANONYMOUS_USER_ID, services.clock()
        )
        context["manual"] = services.settings.activation_mode == "manual"
        return Page(200, "confirm.html", context)
    if status is LocalStatus.PENDING_ACTIVATION:
        return Page(200, "pending_operator.html", context)
    if status is LocalStatus.ACTIVATION_REQUESTED:
        return Page(200, "activating.html", context)
    if status is LocalStatus.UNSUBSCRIBED:
        return Page(200, "cancelled.html", context)
    return Page(200, "manage.html", context)


def confirm_activation(services: Services, subscription_id: str, form_token: str, user: SignedInUser | None) -> Page:
    """POST /api/landing within LANDING_DEADLINE_SECONDS; an activation cut short is finished by the
    reconciler (the claim is recorded before Activate is sent)."""
    with deadline_scope(services.settings.landing_deadline_seconds):
        try:
            return _confirm_activation(services, subscription_id, form_token, user)
        except DeadlineExceededError as error:
            log.warning("landing confirmation out of time: %s", error.message)
            return _unavailable(services, user, error)


def _confirm_activation(services: Services, subscription_id: str, form_token: str, user: SignedInUser | None) -> Page:
    """POST /api/landing: check the form token, then activate exactly once."""
    if user is None and services.settings.landing_require_signin:
        return _error_page(services, None, 401, "sign_in_expired.html")
    subscription_id = (subscription_id or "").strip()
    if not is_marketplace_id(subscription_id):
        log.warning("landing form refused: the subscription id is not a GUID")
        return _error_page(services, user, 400, "forbidden.html", reason="the form does not name a subscription")
    try:
        verify_form_token(
            services.settings.landing_form_secret,
            form_token,
            subscription_id,
            user.id if user else ANONYMOUS_USER_ID,
            services.clock(),
        )
    except ForbiddenError as error:
        log.warning("landing form refused: %s", error.message)
        return _error_page(services, user, 403, "forbidden.html", reason=error.message)

    actor = user.label if user else ANONYMOUS_USER_ID
    try:
        if services.settings.activation_mode == "manual":
            result = request_operator_activation(services, subscription_id, actor, Source.LANDING_PAGE)
            if result.record is None:
                stored = services.repository.get(subscription_id)
                result = Activation(result.result, stored.record if stored else None)
        else:
            result = activate(services, subscription_id, actor=actor, source=Source.LANDING_PAGE)
    except (StorageUnavailableError, StorageRefusedError) as error:
        return _unavailable(services, user, error)

    if result.record is None:
        return _error_page(services, user, 400, "invalid_token.html")
    context = _purchase_context(services, user, result.record, None)
    if result.result is ActivationResult.PENDING_OPERATOR:
        return Page(200, "pending_operator.html", context)
    if result.result is ActivationResult.CANCELLED:
        return Page(200, "cancelled.html", context)
    if result.result is ActivationResult.FAILED:
        if isinstance(result.error, MarketplaceUnauthorizedError):
            log.error("OPERATOR ACTION NEEDED: Marketplace rejected our credentials while activating %s", subscription_id)
        return _unavailable(services, user, result.error or StorageUnavailableError())
    context["activation"] = result.result.value
    return Page(200, "success.html", context)
