"""Operator console: the pages (subscriptions, one subscription, needs attention, reconciliation) and actions.

Who may look: App Service Authentication (Easy Auth) signs the user in; the principal's app roles
decide (``Console.Reader`` to look, ``Console.Operator`` to act). ``CONSOLE_AUTH=none`` (local only,
refused in Azure) treats every signed-in user as an operator.

The list never scans the whole table for a page view: one filtered query (``RowKey eq 'state'``
plus the status / offer / plan filters) that the server stops after PAGE_SIZE matches, with Table
storage's continuation token as the "next page" cursor. Counts per status come from the last
reconciliation run (it scans every record anyway). A text search other than a subscription id
reads at most SEARCH_SCAN_LIMIT records and says so.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, timedelta
from typing import TYPE_CHECKING, Any

from shared.domain import format_timestamp, parse_timestamp
from shared.errors import AppError, BadRequestError, ForbiddenError, NotFoundError, UnauthorizedError
from shared.ids import canonical_marketplace_id, is_marketplace_id, require_marketplace_id
from shared.settings import LANDING_PAGE
from shared.state_machine import LocalStatus

if TYPE_CHECKING:
    from shared.principal import SignedInUser
    from shared.services import Services

log = logging.getLogger(__name__)

ROLE_READER = "Console.Reader"
ROLE_OPERATOR = "Console.Operator"
PAGE_SIZE = 50
HISTORY_SHOWN = 100  # the latest entries; a metered subscription gains one an hour
RUNS_SHOWN = 30
CHART_HEIGHT = 120
CHART_WIDTH = 560
STATUS_COLORS = {
    "Subscribed": "#107c10",
    "Suspended": "#8a5300",
    "Unsubscribed": "#b3261e",
    "ActivationFailed": "#d13438",
    "PendingActivation": "#0f6cbd",
    "ActivationRequested": "#5b5fc7",
    "PendingFulfillmentStart": "#8a8886",
}
SEARCH_SCAN_LIMIT = 5000
MAX_FILTER_CHARS = 200


@dataclass(frozen=True)
class ConsoleUser:
    id: str  # binds the forms' CSRF tokens
    label: str
    can_act: bool

    @property
    def actor(self) -> str:
        """How history records this person's actions."""
        return f"operator:{self.label}"


@dataclass(frozen=True)
class Page:
    template: str
    context: dict[str, Any] = field(default_factory=dict)
    status: int = 200


def authorize(services: Services, user: SignedInUser | None, *, act: bool = False) -> ConsoleUser:
    """The console user, or UnauthorizedError (nobody signed in) / ForbiddenError (no console role)."""
    if user is None:
        raise UnauthorizedError("sign in to use the operator console", code="sign_in_required")
    if services.settings.console_auth == "none":
        return ConsoleUser(user.id, user.label, can_act=True)
    # The sign-in app is multi-tenant (buyers of any tenant sign in), and any tenant's admin can assign
    # its app roles in that tenant: only roles held in the publisher's own tenant count.
    tenant = services.settings.console_tenant_id
    if not tenant or user.tenant_id.lower() != tenant.lower():
        log.warning("console refused %s: not a user of the publisher's tenant", user.label)
        raise ForbiddenError("the operator console is for the publisher's own staff", code="wrong_tenant")
    roles = set(user.roles)
    can_act = ROLE_OPERATOR in roles
    if not (can_act or ROLE_READER in roles) or (act and not can_act):
        needed = ROLE_OPERATOR if act else f"{ROLE_READER} or {ROLE_OPERATOR}"
        log.warning("console refused %s: no %s role", user.label, needed)
        raise ForbiddenError(f"the operator console needs the app role {needed}", code="missing_role")
    return ConsoleUser(user.id, user.label, can_act=can_act)


def _cursor_out(token: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(token).encode()).decode() if token else ""


def _cursor_in(text: str) -> Any:
    if not text:
        return None
    try:
        token = json.loads(base64.urlsafe_b64decode(text.encode() + b"=" * (-len(text) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        raise BadRequestError("the page cursor is not valid", code="bad_cursor") from None
    if not isinstance(token, dict) or not all(isinstance(v, str) for v in token.values()):
        raise BadRequestError("the page cursor is not valid", code="bad_cursor")
    return token


def _filter(params: Mapping[str, str], name: str) -> str:
    value = (params.get(name) or "").strip()
    if len(value) > MAX_FILTER_CHARS:
        raise BadRequestError(f"{name} is too long", code="bad_filter")
    return value


def _row(record: Any) -> dict[str, Any]:
    return {
        "id": record.id,
        "name": record.name,
        "status": record.status.value,
        "offer_id": record.offer_id,
        "plan_id": record.plan_id,
        "quantity": record.quantity,
        "purchaser": record.purchaser.email_id,
        "beneficiary": record.beneficiary.email_id,
        "flags": list(record.flags),
        "updated_at": format_timestamp(record.updated_at),
        "test": record.is_test_purchase,  # test or dry-run purchase: its usage is not revenue
    }


def list_page(services: Services, user: SignedInUser | None, params: Mapping[str, str]) -> Page:
    console_user = authorize(services, user)
    status, offer, plan, text = (_filter(params, name) for name in ("status", "offer", "plan", "q"))
    flagged = _filter(params, "flagged") in ("1", "true", "on")
    if status and status not in {s.value for s in LocalStatus}:
        raise BadRequestError("unknown status", code="bad_filter")
    cursor = _cursor_in(_filter(params, "cursor"))
    repository = services.repository
    note, next_cursor = "", ""
    if text and is_marketplace_id(text):
        stored = repository.get(canonical_marketplace_id(text))
        records = [stored.record] if stored is not None else []
    elif text:
        records, cut_short = repository.search_records(
            text,
            status=status,
            offer_id=offer,
            plan_id=plan,
            flagged=flagged,
            limit=PAGE_SIZE,
            scan_limit=SEARCH_SCAN_LIMIT,
        )
        if cut_short:
            note = f"Searched the first {SEARCH_SCAN_LIMIT:,} records; narrow the filters or search by subscription id."
    else:
        records, token = repository.page_records(
            status=status, offer_id=offer, plan_id=plan, flagged=flagged, page_size=PAGE_SIZE, continuation=cursor
        )
        next_cursor = _cursor_out(token)
    runs = repository.latest_runs(1)
    last_run = runs[0] if runs else {}
    return Page(
        "console_list.html",
        {
            "brand_name": services.settings.brand_name,
            "user": console_user,
            "rows": [_row(record) for record in records],
            "filters": {"status": status, "offer": offer, "plan": plan, "q": text, "flagged": "1" if flagged else ""},
            "statuses": [s.value for s in LocalStatus],
            "counts": last_run.get("by_status") or {},
            "colors": STATUS_COLORS,
            "counts_at": last_run.get("started_at", ""),
            "next_cursor": next_cursor,
            "first_page": cursor is None,
            "note": note,
        },
    )


def _change_choices(services: Services, record: Any) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """(why each change action is not offered, the plans the plan form offers): the same rules the
    publisher API applies (status, pending operation, allowedCustomerOperations, List available plans)."""
    from shared import publisher

    by_action = {
        ACTION_CHANGE_PLAN: publisher.CHANGE_PLAN,
        ACTION_CHANGE_QUANTITY: publisher.CHANGE_QUANTITY,
        ACTION_CANCEL: publisher.UNSUBSCRIBE,
    }
    refusals = publisher.change_refusals(record)
    blocked = {action: refusals[name] for action, name in by_action.items() if name in refusals}
    choices: list[dict[str, Any]] = []
    if ACTION_CHANGE_PLAN in blocked and ACTION_CHANGE_QUANTITY in blocked:
        return blocked, choices
    try:
        plans = publisher.available_plans(services, record.id)
    except AppError as error:
        reason = f"Microsoft's list of available plans could not be read ({error.code}); try again shortly"
        blocked.setdefault(ACTION_CHANGE_PLAN, reason)
        return blocked, choices
    choices = [
        {"plan_id": plan.plan_id, "label": f"{plan.display_name or plan.plan_id} ({plan.plan_id})"}
        for plan in plans
        if plan.plan_id != record.plan_id
    ]
    if not choices:
        blocked.setdefault(ACTION_CHANGE_PLAN, "List available plans offers no other plan for this subscription")
    current = next((plan for plan in plans if plan.plan_id == record.plan_id), None)
    if current is not None and not current.is_price_per_seat:
        blocked.setdefault(ACTION_CHANGE_QUANTITY, f"plan {record.plan_id} is not priced per seat")
    return blocked, choices


def subscription_page(services: Services, user: SignedInUser | None, subscription_id: str) -> Page:
    console_user = authorize(services, user)
    subscription_id = require_marketplace_id(subscription_id, "subscription id")
    stored = services.repository.get(subscription_id)
    if stored is None:
        raise NotFoundError("this subscription is not recorded here", code="unknown_subscription")
    record = stored.record
    checked_at = format_timestamp(services.clock())
    try:
        found = services.marketplace.get_subscription(subscription_id)
        microsoft: dict[str, Any] | None = {
            "status": found.status.value,
            "name": found.name,
            "offer_id": found.offer_id,
            "plan_id": found.plan_id,
            "quantity": found.quantity,
            "term": f"{format_timestamp(found.term.start_date)} - {format_timestamp(found.term.end_date)}",
            "auto_renew": found.auto_renew,
        }
        microsoft_error = ""
    except AppError as error:  # shown, never fatal: the console must work when Microsoft does not
        microsoft, microsoft_error = None, error.code
    since = max(0, record.history_seq - HISTORY_SHOWN + 1)
    history = list(reversed(services.repository.history(subscription_id, since_seq=since)))
    operations = services.publisher_store.list_for(subscription_id) if services.publisher_store is not None else []
    usage: list[dict[str, Any]] = []
    if services.usage_store is not None:
        from shared.metering import usage_view

        now = services.clock()
        usage = usage_view(services, subscription_id, now - timedelta(hours=24), now)
    waiting = services.repository.pending_events(subscription_id)
    events = {e.seq: e for e in services.repository.list_events(subscription_id, since_seq=since)} | {e.seq: e for e in waiting}
    markers = services.repository.list_markers(subscription_id)
    can_activate = console_user.can_act and record.status in ACTIVATABLE
    can_change = console_user.can_act and services.publisher_store is not None and record.status in CHANGEABLE
    change_blocked, plan_choices = _change_choices(services, record) if can_change else ({}, [])
    ours = _row(record) | {
        "marketplace_status": record.marketplace_status,
        "term": f"{format_timestamp(record.term_start)} - {format_timestamp(record.term_end)}",
        "auto_renew": record.auto_renew,
        "activated_by": record.activated_by,
        "last_event_at": format_timestamp(record.last_event_at),
    }
    return Page(
        "console_subscription.html",
        {
            "brand_name": services.settings.brand_name,
            "user": console_user,
            "record": ours,
            "microsoft": microsoft,
            "microsoft_error": microsoft_error,
            "checked_at": checked_at,
            "history": history,
            "operations": [op.to_api() for op in operations],
            "usage": usage,
            "history_total": record.history_seq,
            "events": [_event_row(e) for e in sorted(events.values(), key=lambda e: e.seq, reverse=True)],
            "waiting_count": len(waiting),
            "activate_token": _form_token(services, console_user, ACTION_ACTIVATE, subscription_id) if can_activate else "",
            "redeliver_token": (
                _form_token(services, console_user, ACTION_REDELIVER, subscription_id) if console_user.can_act and waiting else ""
            ),
            "change_forms": (
                {
                    action: {
                        "token": _form_token(services, console_user, action, subscription_id),
                        # one key per rendered form: a double submit or a browser retry sends the change once
                        "key": uuid.uuid4().hex,
                    }
                    for action in CHANGE_ACTIONS
                    if action not in change_blocked
                }
                if can_change
                else {}
            ),
            "change_blocked": change_blocked,
            "plan_choices": plan_choices,
            "pending_operation_id": record.pending_operation_id,
            "flag_forms": [
                {
                    "flag": flag,
                    "advice": advice_for(flag),
                    "token": (
                        _form_token(services, console_user, ACTION_ACKNOWLEDGE, f"{subscription_id}:{flag}")
                        if console_user.can_act
                        else ""
                    ),
                }
                for flag in record.flags
            ],
            "webhook_operations": [
                {
                    "id": m.operation_id,
                    "action": m.action,
                    "status": m.status,
                    "received": format_timestamp(m.received_at),
                    "completed": format_timestamp(m.completed_at),
                    "replay_token": (
                        _form_token(services, console_user, ACTION_REPLAY, f"{subscription_id}:{m.operation_id}")
                        if console_user.can_act and m.pending
                        else ""
                    ),
                }
                for m in reversed(markers)
            ],
        },
    )


def _event_row(event: Any) -> dict[str, Any]:
    if event.pending:
        state = f"waiting ({event.attempts} attempts)" + (f": {event.last_error[:200]}" if event.last_error else "")
    else:
        state = f"delivered {format_timestamp(event.delivered_at)}".strip()
    return {
        "seq": event.seq,
        "event_id": event.event_id,
        "type": event.event_type,
        "created": format_timestamp(event.created_at),
        "state": state,
        "pending": event.pending,
    }


FLAG_ADVICE = {
    "activation_awaiting_operator": "Manual activation: check the purchase, then Activate.",
    "activation_stuck": "Activation retries are exhausted: read the error in the history, fix the cause, then Retry activation.",
    "unknown_marketplace_status": "Microsoft reports a status this version does not know; it clears itself once both views agree.",
    "marketplace_conflict": "Microsoft's record contradicts ours (e.g. active after Unsubscribed): open a Partner Center case; "
    "it clears itself once both views agree.",
    "change_failed": "A publisher change failed at Microsoft: read Microsoft's message under Publisher operations, "
    "send it again if still wanted, then Acknowledge.",
    "change_refused": "We refused a change Microsoft sent (the buyer's request failed): tell the buyer why, then Acknowledge.",
    "storage_refused": "Storage refused this record: find the run's log line with this id.",
    "invalid_subscription_id": "Microsoft listed an id that is not a GUID: open a Partner Center case.",
}


def advice_for(flag: str) -> str:
    return FLAG_ADVICE.get(flag, "Read the history; Acknowledge once handled.")


def attention_page(services: Services, user: SignedInUser | None) -> Page:
    """What needs a person: subscriptions waiting for manual activation, what the last reconciliation
    flagged, events waiting too long, and metered usage Microsoft refused or that expired."""
    console_user = authorize(services, user)
    repository = services.repository
    waiting, _ = repository.page_records(status=LocalStatus.PENDING_ACTIVATION.value, page_size=PAGE_SIZE)
    failed, _ = repository.page_records(status=LocalStatus.ACTIVATION_FAILED.value, page_size=PAGE_SIZE)
    flagged_now, more = repository.page_records(flagged=True, page_size=PAGE_SIZE)
    runs = repository.latest_runs(1)
    last_run = runs[0] if runs else {}
    usage = services.usage_store.list_flagged() if services.usage_store is not None else []
    for item in usage:
        target = _usage_target(item["subscriptionId"], item["hour"], item["dimension"])
        item["token"] = _form_token(services, console_user, ACTION_USAGE, target) if console_user.can_act else ""
    return Page(
        "console_attention.html",
        {
            "brand_name": services.settings.brand_name,
            "user": console_user,
            "activations": [_row(record) for record in [*waiting, *failed]],
            "flagged_records": [
                _row(record) | {"advice": [(flag, advice_for(flag)) for flag in record.flags]} for record in flagged_now
            ],
            "more_flagged": bool(more),
            "flagged": [f | {"advice": advice_for(f.get("reason", ""))} for f in last_run.get("flagged") or []],
            "flagged_count": last_run.get("flagged_count", 0),
            "events_waiting": last_run.get("events_waiting_too_long", 0),
            "run_at": last_run.get("started_at", ""),
            "usage": usage,
        },
    )


# ---------------------------------------------------------------------------------------------
# actions: POST, operator role, CSRF token bound to (action, target, user), an explicit confirmation

ACTION_ACTIVATE = "activate"
ACTION_RECONCILE = "reconcile"
ACTION_PREVIEW = "preview"
ACTION_REDELIVER = "redeliver"
ACTION_REPLAY = "replay"
ACTION_ACKNOWLEDGE = "acknowledge"
ACTION_CHANGE_PLAN = "change_plan"
ACTION_CHANGE_QUANTITY = "change_quantity"
ACTION_CANCEL = "cancel"
ACTION_USAGE = "usage_resolve"
CHANGE_ACTIONS = (ACTION_CHANGE_PLAN, ACTION_CHANGE_QUANTITY, ACTION_CANCEL)
CHANGEABLE = frozenset({LocalStatus.SUBSCRIBED, LocalStatus.SUSPENDED})
ACTIVATABLE = frozenset({LocalStatus.PENDING_ACTIVATION, LocalStatus.ACTIVATION_FAILED, LocalStatus.PENDING_FULFILLMENT_START})


def _form_token(services: Services, user: ConsoleUser, action: str, target: str) -> str:
    from shared.form_tokens import CONSOLE_AUDIENCE, issue_form_token

    services.settings.require(LANDING_PAGE)  # LANDING_FORM_SECRET signs the console's forms too
    return issue_form_token(
        services.settings.landing_form_secret, f"{action}:{target}", user.id, services.clock(), audience=CONSOLE_AUDIENCE
    )


def _check_form(services: Services, user: ConsoleUser, action: str, target: str, form: Mapping[str, str]) -> None:
    from shared.form_tokens import CONSOLE_AUDIENCE, verify_form_token

    services.settings.require(LANDING_PAGE)
    verify_form_token(
        services.settings.landing_form_secret,
        form.get("form_token", ""),
        f"{action}:{target}",
        user.id,
        services.clock(),
        audience=CONSOLE_AUDIENCE,
    )
    if form.get("confirm") != "yes":
        raise BadRequestError("tick the confirmation box to do this", code="not_confirmed")


def _done(services: Services, user: ConsoleUser, title: str, message: str, *, back: str, detail: str = "", **extra: Any) -> Page:
    context = {"brand_name": services.settings.brand_name, "user": user, "title": title, "message": message}
    return Page("console_done.html", context | {"detail": detail, "back": back, "differences": []} | extra)


def _subscription_url(subscription_id: str) -> str:
    return f"/api/console/subscriptions/{subscription_id}"


def _record_action(
    services: Services, user: ConsoleUser, subscription_id: str, detail: str, *, kind: str = "operator_action", flag: str = ""
) -> Any:
    """An action that moves no state still goes into the subscription's history, as ``operator:<user>``."""
    from shared import state_machine as sm
    from shared.observability import current_correlation_id

    change = sm.Change(
        kind=sm.Kind(kind),
        source=sm.Source.OPERATOR,
        occurred_at=services.clock(),
        correlation_id=current_correlation_id(),
        actor=user.actor,
        detail=detail,
        flag=flag,
    )
    return services.repository.apply(
        subscription_id, lambda record: sm.apply(record, change, now=services.clock()) if record else None
    )


def _known_subscription(services: Services, subscription_id: str) -> str:
    subscription_id = require_marketplace_id(subscription_id, "subscription id")
    if services.repository.get(subscription_id) is None:
        raise NotFoundError("this subscription is not recorded here", code="unknown_subscription")
    return subscription_id


def activate_action(services: Services, user: SignedInUser | None, subscription_id: str, form: Mapping[str, str]) -> Page:
    """Activate (manual mode) or retry a failed activation; the activation itself records the operator."""
    from shared.activation import ActivationResult, activate
    from shared.state_machine import Source

    console_user = authorize(services, user, act=True)
    subscription_id = require_marketplace_id(subscription_id, "subscription id")
    _check_form(services, console_user, ACTION_ACTIVATE, subscription_id, form)
    subscription_id = _known_subscription(services, subscription_id)
    result = activate(services, subscription_id, actor=console_user.actor, source=Source.OPERATOR)
    messages = {
        ActivationResult.ACTIVATED: "Activated: Microsoft shows it Subscribed.",
        ActivationResult.ALREADY_ACTIVE: "Already active: nothing was sent.",
        ActivationResult.REQUESTED: "Activation sent; Microsoft has not confirmed yet (the reconciler confirms it).",
        ActivationResult.IN_PROGRESS: "Another activation is in flight; try again in two minutes.",
        ActivationResult.CANCELLED: "The subscription is cancelled (Unsubscribed).",
        ActivationResult.FAILED: "Activation failed.",
    }
    log.info("console: %s activated %s: %s", console_user.actor, subscription_id, result.result.value)
    return _done(
        services,
        console_user,
        "Activate",
        messages.get(result.result, result.result.value),
        detail=str(result.error) if result.error else "",
        back=_subscription_url(subscription_id),
    )


def redeliver_action(services: Services, user: SignedInUser | None, subscription_id: str, form: Mapping[str, str]) -> Page:
    """Deliver the subscription's waiting lifecycle events now, ignoring their backoff."""
    console_user = authorize(services, user, act=True)
    subscription_id = require_marketplace_id(subscription_id, "subscription id")
    _check_form(services, console_user, ACTION_REDELIVER, subscription_id, form)
    subscription_id = _known_subscription(services, subscription_id)
    stats = services.events.relay_subscription(subscription_id, respect_backoff=False)
    left = len(services.repository.pending_events(subscription_id))
    message = f"{stats.delivered} delivered, {stats.failed} failed; {left} still waiting."
    _record_action(services, console_user, subscription_id, f"redeliver events: {message}")
    log.info("console: %s redelivered events of %s: %s", console_user.actor, subscription_id, message)
    return _done(
        services,
        console_user,
        "Redeliver events",
        message,
        detail="; ".join(stats.errors[:3]),
        back=_subscription_url(subscription_id),
    )


def replay_action(services: Services, user: SignedInUser | None, subscription_id: str, form: Mapping[str, str]) -> Page:
    """Apply a webhook operation Microsoft sent that was recorded but never applied (the reconciler
    does the same after RECONCILE_OPERATION_DEADLINE_SECONDS; this does it now, for one)."""
    from shared.reconcile import REPLAY_APPLIED, REPLAY_DEFERRED, Reconciler

    console_user = authorize(services, user, act=True)
    subscription_id = require_marketplace_id(subscription_id, "subscription id")
    operation_id = form.get("operation_id", "").strip().lower()
    require_marketplace_id(operation_id, "operation id")
    _check_form(services, console_user, ACTION_REPLAY, f"{subscription_id}:{operation_id}", form)
    marker = services.repository.get_marker(subscription_id, operation_id)
    if marker is None:
        raise NotFoundError("no webhook operation with this id is recorded for this subscription", code="unknown_operation")
    back = _subscription_url(subscription_id)
    if not marker.pending:
        return _done(services, console_user, "Replay", f"Already applied ({marker.status}): nothing to do.", back=back)
    outcome = Reconciler(services, actor=console_user.actor).replay_marker(marker)
    messages = {
        REPLAY_APPLIED: "Applied.",
        REPLAY_DEFERRED: "The subscription kept changing; try again (the reconciler also retries it).",
    }
    message = messages.get(outcome, "Microsoft does not confirm this operation; it was settled as unverifiable.")
    settled = services.repository.get_marker(subscription_id, operation_id)
    result = f" Outcome: {settled.status}." if settled is not None and not settled.pending else ""
    _record_action(services, console_user, subscription_id, f"replay webhook {marker.action} {operation_id}: {outcome}")
    log.info("console: %s replayed operation %s of %s: %s", console_user.actor, operation_id, subscription_id, outcome)
    return _done(services, console_user, "Replay", message + result, back=back)


def change_action(services: Services, user: SignedInUser | None, subscription_id: str, form: Mapping[str, str]) -> Page:
    """A publisher change (plan, seats) or cancellation, sent like the publisher API sends it: history
    records it as ``operator:<user>`` when Microsoft's operation settles."""
    from shared import publisher

    console_user = authorize(services, user, act=True)
    subscription_id = require_marketplace_id(subscription_id, "subscription id")
    action = form.get("action", "")
    if action not in CHANGE_ACTIONS:
        raise BadRequestError("unknown action", code="unknown_action")
    _check_form(services, console_user, action, subscription_id, form)
    if action == ACTION_CHANGE_PLAN:
        request = publisher.parse_change_body(subscription_id, json.dumps({"planId": form.get("plan_id", "")}).encode())
    elif action == ACTION_CHANGE_QUANTITY:
        quantity = form.get("quantity", "").strip()
        if not quantity.isdigit():
            raise BadRequestError("seats must be a positive whole number", code="invalid_quantity")
        request = publisher.parse_change_body(subscription_id, json.dumps({"quantity": int(quantity)}).encode())
    else:
        request = publisher.ChangeRequest(subscription_id, publisher.UNSUBSCRIBE)
    result = publisher.request_change(services, request, caller=console_user.actor, idempotency_key=form.get("key", ""))
    operation = result.body
    log.info("console: %s asked %s of %s: operation %s", console_user.actor, request.action, subscription_id, operation["id"])
    status = operation.get("status", "")
    messages = {
        "Succeeded": "Done: Microsoft confirmed it.",
        "InProgress": "Sent to Microsoft; it is in progress (this page and the reconciler follow it to its end).",
    }
    return _done(
        services,
        console_user,
        {ACTION_CHANGE_PLAN: "Change plan", ACTION_CHANGE_QUANTITY: "Change seats", ACTION_CANCEL: "Cancel"}[action],
        messages.get(status, f"Microsoft answered {status}."),
        detail=f"Operation {operation['id']}" + (f": {operation['errorMessage']}" if operation.get("errorMessage") else ""),
        back=_subscription_url(subscription_id),
    )


def acknowledge_action(services: Services, user: SignedInUser | None, subscription_id: str, form: Mapping[str, str]) -> Page:
    """Clear a flag once a person has dealt with its cause (history keeps who and when)."""
    console_user = authorize(services, user, act=True)
    subscription_id = require_marketplace_id(subscription_id, "subscription id")
    flag = form.get("flag", "").strip()
    if not flag or len(flag) > MAX_FILTER_CHARS:
        raise BadRequestError("which flag?", code="bad_flag")
    _check_form(services, console_user, ACTION_ACKNOWLEDGE, f"{subscription_id}:{flag}", form)
    subscription_id = _known_subscription(services, subscription_id)
    outcome = _record_action(services, console_user, subscription_id, f"acknowledged {flag}", kind="clear_flag", flag=flag)
    cleared = outcome is not None and outcome.result.value == "recorded"
    log.info("console: %s acknowledged %s on %s (%s)", console_user.actor, flag, subscription_id, cleared)
    return _done(
        services,
        console_user,
        "Acknowledge",
        f"Acknowledged: {flag} is cleared." if cleared else f"{flag} was already cleared: nothing to do.",
        back=_subscription_url(subscription_id),
    )


def runs_page(services: Services, user: SignedInUser | None) -> Page:
    console_user = authorize(services, user)
    tokens = (
        {name: _form_token(services, console_user, name, "*") for name in (ACTION_PREVIEW, ACTION_RECONCILE)}
        if console_user.can_act
        else {}
    )
    runs = services.repository.latest_runs(RUNS_SHOWN)
    return Page(
        "console_runs.html",
        {
            "brand_name": services.settings.brand_name,
            "user": console_user,
            "runs": runs,
            "tokens": tokens,
            "chart": status_chart(runs),
            "deliveries": delivery_chart(runs),
        },
    )


def delivery_chart(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Lifecycle events delivered per hour over the DELIVERY_CHART_HOURS before the latest run that
    counted them (its scan reads them: no query of the page's own). Plain numbers for an inline SVG."""
    from shared.reconcile import DELIVERY_CHART_HOURS

    run = next((r for r in runs if "delivered_by_hour" in r), None)
    started = parse_timestamp(run.get("started_at", "")) if run else None
    if run is None or started is None:
        return {}
    counts: dict[str, int] = run["delivered_by_hour"]
    last = started.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    hours = [last - timedelta(hours=DELIVERY_CHART_HOURS - 1 - i) for i in range(DELIVERY_CHART_HOURS)]
    values = [counts.get(hour.strftime("%Y-%m-%dT%H:00Z"), 0) for hour in hours]
    peak = max(values) or 1
    step = CHART_WIDTH / len(hours)
    bars = []
    for index, (hour, count) in enumerate(zip(hours, values, strict=True)):
        height = round(CHART_HEIGHT * count / peak, 1)
        bars.append(
            {
                "x": round(40 + index * step, 1),
                "y": round(CHART_HEIGHT - height, 1),
                "width": round(step * 0.8, 1),
                "height": height,
                "hour": hour.strftime("%Y-%m-%d %H:00"),
                "count": count,
            }
        )
    return {
        "bars": bars,
        "peak": max(values),
        "total": sum(values),
        "height": CHART_HEIGHT,
        "width": CHART_WIDTH + 80,
        "counted_at": started.astimezone(UTC).strftime("%Y-%m-%d %H:%M"),
        "first": bars[0]["hour"],
        "last": bars[-1]["hour"],
    }


def status_chart(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Subscriptions by status over time: one stacked bar per reconciliation run (each run counts
    what its scan found), oldest left. Plain numbers for an inline SVG: no script, no CDN."""
    points = [run for run in reversed(runs) if not run.get("dry_run") and run.get("by_status")]
    if len(points) < 2:
        return {}
    peak = max(sum(run["by_status"].values()) for run in points) or 1
    step = CHART_WIDTH / len(points)
    bars, present = [], set()
    for index, run in enumerate(points):
        top, segments = float(CHART_HEIGHT), []
        for status in LocalStatus:
            count = run["by_status"].get(status.value, 0)
            if not count:
                continue
            present.add(status.value)
            height = CHART_HEIGHT * count / peak
            top -= height
            segments.append({"status": status.value, "count": count, "y": round(top, 1), "height": round(height, 1)})
        bars.append(
            {
                "x": round(40 + index * step, 1),
                "width": round(max(1.0, step * 0.8), 1),
                "at": run.get("started_at", ""),
                "total": sum(run["by_status"].values()),
                "segments": segments,
            }
        )
    legend = _legend([s.value for s in LocalStatus if s.value in present])
    return {
        "bars": bars,
        "peak": peak,
        "height": CHART_HEIGHT,
        "width": max(CHART_WIDTH + 80, legend[-1]["x"] + 24 + 7 * len(legend[-1]["name"])),
        "legend": legend,
        "colors": STATUS_COLORS,
    }


def _legend(names: list[str]) -> list[dict[str, Any]]:
    """Legend entries laid out left to right, each as wide as its name (about 7 px a character at 11 px)."""
    entries, x = [], 40
    for name in names:
        entries.append({"name": name, "color": STATUS_COLORS.get(name, "#0f6cbd"), "x": x})
        x += 24 + 7 * len(name)
    return entries


def reconcile_action(services: Services, user: SignedInUser | None, form: Mapping[str, str]) -> Page:
    from shared.reconcile import run_reconciliation

    console_user = authorize(services, user, act=True)
    action = form.get("action", "")
    if action not in (ACTION_PREVIEW, ACTION_RECONCILE):
        raise BadRequestError("unknown action", code="unknown_action")
    _check_form(services, console_user, action, "*", form)
    # A run started here records its repairs as operator:<user> and its summary says who started it.
    summary = run_reconciliation(services, dry_run=action == ACTION_PREVIEW, actor=console_user.actor)
    data = summary.to_json(with_differences=True)
    log.info("console: %s ran reconciliation (%s)", console_user.actor, action)
    return _done(
        services,
        console_user,
        "Preview" if action == ACTION_PREVIEW else "Reconciliation",
        (
            f"{len(data['differences'])} differences found; nothing was changed."
            if action == ACTION_PREVIEW
            else f"Done: {sum(data['repairs'].values())} repairs, {data['flagged_count']} flagged."
        ),
        detail="" if summary.completed else f"stopped: {summary.stopped_reason}",
        back="/api/console/reconcile",
        differences=data["differences"],
    )


# ---------------------------------------------------------------------------------------------
# billing: flagged usage decisions and Microsoft's read-back


def _usage_target(subscription_id: str, hour: str, dimension: str) -> str:
    return f"{subscription_id}:{hour}:{dimension}"


def usage_resolve_action(services: Services, user: SignedInUser | None, form: Mapping[str, str]) -> Page:
    """Requeue, move into the current hour, or write off one flagged bucket (operator, CSRF, confirmed)."""
    from shared.domain import parse_timestamp
    from shared.metering import FLAGGED_ACTIONS, resolve_flagged_usage

    console_user = authorize(services, user, act=True)
    subscription_id = require_marketplace_id(form.get("subscription_id", ""), "subscription id")
    hour_text, dimension, action = (form.get(name, "").strip() for name in ("hour", "dimension", "action"))
    hour = parse_timestamp(hour_text)
    if hour is None or not dimension or len(dimension) > MAX_FILTER_CHARS:
        raise BadRequestError("which hour and dimension?", code="bad_usage")
    if action not in FLAGGED_ACTIONS:
        raise BadRequestError(f"action must be one of {', '.join(FLAGGED_ACTIONS)}", code="unknown_action")
    _check_form(services, console_user, ACTION_USAGE, _usage_target(subscription_id, hour_text, dimension), form)
    result = resolve_flagged_usage(services, subscription_id, hour, dimension, action, actor=console_user.actor)
    log.info("console: %s decided %s on usage %s %s of %s", console_user.actor, action, hour_text, dimension, subscription_id)
    return _done(
        services,
        console_user,
        "Flagged usage",
        f"{hour_text} {dimension}: {result['status']} ({result['message']}).",
        back="/api/console/attention",
    )


def billing_page(services: Services, user: SignedInUser | None, params: Mapping[str, str]) -> Page:
    """Per day and dimension: what we recorded accepted beside what Microsoft's read-back says."""
    from decimal import Decimal

    from shared.usage_readback import DIFFERENCES, TEST, read_back_view

    console_user = authorize(services, user)
    days_text = _filter(params, "days") or "7"
    if not days_text.isdigit() or not 1 <= int(days_text) <= 35:
        raise BadRequestError("days must be a whole number from 1 to 35", code="bad_filter")
    view = read_back_view(services, int(days_text)) if services.usage_store is not None else {"summary": None, "rows": []}
    grouped: dict[tuple[str, str], dict[str, Any]] = {}
    for row in view["rows"]:
        key = (row.get("day", ""), row.get("dimension", ""))
        group = grouped.setdefault(
            key,
            {
                "day": key[0],
                "dimension": key[1],
                "ours": Decimal(0),
                "microsoft": Decimal(0),
                "rows": [],
                "differences": 0,
                "test": [],
            },
        )
        if row.get("status") == TEST:
            group["test"].append(row)
            continue
        group["ours"] += Decimal(row.get("ours") or 0)
        group["microsoft"] += Decimal(row.get("processed") or 0)
        group["differences"] += row.get("status") in DIFFERENCES
        group["rows"].append(row | {"differs": row.get("status") in DIFFERENCES})
    groups = sorted(grouped.values(), key=lambda g: (g["day"], g["dimension"]), reverse=True)
    for group in groups:
        group["ours"], group["microsoft"] = str(group["ours"]), str(group["microsoft"])
        group["rows"].sort(key=lambda r: (not r["differs"], r.get("subscriptionId", "")))
    return Page(
        "console_billing.html",
        {
            "brand_name": services.settings.brand_name,
            "user": console_user,
            "summary": view["summary"],
            "groups": groups,
            "days": int(days_text),
        },
    )
