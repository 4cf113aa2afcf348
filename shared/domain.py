"""Domain model of the SaaS Fulfillment API v2, parsed leniently at the boundary.

Microsoft extends these payloads without notice (new fields, new enum values, quantity as
``""``/``null``/number/string, field names in varying case), so parsing never fails on what it
does not know: unknown enum values map to ``UNKNOWN`` and the original payload is kept in ``raw``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from enum import Enum
from typing import Any


class _LenientEnum(str, Enum):
    @classmethod
    def parse(cls, value: Any):
        text = str(value or "").strip()
        for member in cls:
            if member.value.lower() == text.lower():
                return member
        return cls("Unknown")


class SubscriptionStatus(_LenientEnum):
    PENDING_FULFILLMENT_START = "PendingFulfillmentStart"
    SUBSCRIBED = "Subscribed"
    SUSPENDED = "Suspended"
    UNSUBSCRIBED = "Unsubscribed"
    NOT_STARTED = "NotStarted"
    UNKNOWN = "Unknown"


class Action(_LenientEnum):
    CHANGE_PLAN = "ChangePlan"
    CHANGE_QUANTITY = "ChangeQuantity"
    SUSPEND = "Suspend"
    REINSTATE = "Reinstate"
    UNSUBSCRIBE = "Unsubscribe"
    RENEW = "Renew"
    SUBSCRIBE = "Subscribe"
    UNKNOWN = "Unknown"


class OperationStatus(_LenientEnum):
    NOT_STARTED = "NotStarted"
    IN_PROGRESS = "InProgress"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CONFLICT = "Conflict"
    UNKNOWN = "Unknown"


class UpdateStatus(str, Enum):
    """Body values of PATCH operation (note: not the same words as OperationStatus)."""

    SUCCESS = "Success"
    FAILURE = "Failure"


# ---------------------------------------------------------------------------------------------
# lenient field readers


def field_of(data: Mapping[str, Any] | None, name: str, default: Any = None) -> Any:
    """Read ``name`` from a payload, matching the key case-insensitively."""
    if not isinstance(data, Mapping):
        return default
    if name in data:
        return data[name]
    lowered = name.lower()
    for key, value in data.items():
        if isinstance(key, str) and key.lower() == lowered:
            return value
    return default


def parse_quantity(value: Any) -> int | None:
    """Quantity arrives as 20, "20", 20.0, "", null or not at all."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    text = str(value).strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


_FRACTION = re.compile(r"(\.\d{1,6})\d*")


def parse_timestamp(value: Any) -> datetime | None:
    """Parse Marketplace date-times (``2023-03-28T18:59:20.1234567Z``, dates, offsets) to aware UTC."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    text = str(value or "").strip()
    if not text:
        return None
    text = _FRACTION.sub(lambda m: m.group(1), text.replace("Z", "+00:00").replace("z", "+00:00"), count=1)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # e.g. the 0001-01-01 placeholder with a positive offset: not a real moment
        return None


def format_timestamp(value: datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def utc_now() -> datetime:
    return datetime.now(UTC)


_TERM_UNITS = {"Y": "year", "M": "month", "W": "week", "D": "day"}
_TERM_PATTERN = re.compile(r"P(\d{1,4})([YMWD])")


def describe_term(term_unit: str | None) -> str:
    """Microsoft's billing term (an ISO 8601 duration such as ``P1M`` or ``P3Y``) in words: "1 month",
    "3 years". Anything else is shown as Microsoft sent it rather than guessed at."""
    text = (term_unit or "").strip()
    match = _TERM_PATTERN.fullmatch(text.upper())
    if match is None:
        return text
    count, unit = int(match.group(1)), _TERM_UNITS[match.group(2)]
    return f"{count} {unit}" if count == 1 else f"{count} {unit}s"


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(value: str) -> str:
    """``value`` with lone UTF-16 surrogates replaced by U+FFFD.

    JSON may carry ``"\\ud800"`` on its own; Python decodes it into a str that cannot be encoded
    as UTF-8, so every page, log line, CLI output and storage write holding it would fail. Text
    from outside is cleaned once, where it is parsed.
    """
    return _LONE_SURROGATE.sub("\ufffd", value)


def _text(data: Mapping[str, Any] | None, name: str) -> str:
    value = field_of(data, name)
    return "" if value is None else clean_text(str(value).strip())


def _bool(data: Mapping[str, Any] | None, name: str) -> bool:
    value = field_of(data, name)
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return bool(value)


# ---------------------------------------------------------------------------------------------
# value objects


@dataclass(frozen=True)
class AadIdentifier:
    email_id: str = ""
    object_id: str = ""
    tenant_id: str = ""
    puid: str = ""

    @classmethod
    def from_api(cls, data: Any) -> AadIdentifier:
        return cls(
            email_id=_text(data, "emailId"),
            object_id=_text(data, "objectId"),
            tenant_id=_text(data, "tenantId"),
            puid=_text(data, "puid"),
        )

    def to_api(self) -> dict[str, str]:
        return {"emailId": self.email_id, "objectId": self.object_id, "tenantId": self.tenant_id, "puid": self.puid}


@dataclass(frozen=True)
class Term:
    term_unit: str = ""  # open set: P1M, P1Y, P2Y, P3Y, PAY, P18M, ...
    start_date: datetime | None = None
    end_date: datetime | None = None
    charge_duration: str = ""

    @classmethod
    def from_api(cls, data: Any) -> Term:
        return cls(
            term_unit=_text(data, "termUnit"),
            start_date=parse_timestamp(field_of(data, "startDate")),
            end_date=parse_timestamp(field_of(data, "endDate")),
            charge_duration=_text(data, "chargeDuration"),
        )


@dataclass(frozen=True)
class Subscription:
    """The v2 Subscription object as Microsoft reports it."""

    id: str
    name: str = ""
    publisher_id: str = ""
    offer_id: str = ""
    plan_id: str = ""
    quantity: int | None = None
    status: SubscriptionStatus = SubscriptionStatus.UNKNOWN
    beneficiary: AadIdentifier = field(default_factory=AadIdentifier)
    purchaser: AadIdentifier = field(default_factory=AadIdentifier)
    term: Term = field(default_factory=Term)
    auto_renew: bool = False
    is_test: bool = False
    is_free_trial: bool = False
    allowed_customer_operations: tuple[str, ...] = ()
    sandbox_type: str = ""
    session_mode: str = ""
    created: datetime | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> Subscription:
        operations = field_of(data, "allowedCustomerOperations") or ()
        if isinstance(operations, str):
            operations = (operations,)
        return cls(
            id=_text(data, "id"),
            name=_text(data, "name"),
            publisher_id=_text(data, "publisherId"),
            offer_id=_text(data, "offerId"),
            plan_id=_text(data, "planId"),
            quantity=parse_quantity(field_of(data, "quantity")),
            status=SubscriptionStatus.parse(field_of(data, "saasSubscriptionStatus")),
            beneficiary=AadIdentifier.from_api(field_of(data, "beneficiary")),
            purchaser=AadIdentifier.from_api(field_of(data, "purchaser")),
            term=Term.from_api(field_of(data, "term")),
            auto_renew=_bool(data, "autoRenew"),
            is_test=_bool(data, "isTest"),
            is_free_trial=_bool(data, "isFreeTrial"),
            allowed_customer_operations=tuple(str(op).strip() for op in operations if op),
            sandbox_type=_text(data, "sandboxType"),
            session_mode=_text(data, "sessionMode"),
            created=parse_timestamp(field_of(data, "created")),
            raw=dict(data),
        )


@dataclass(frozen=True)
class ResolvedPurchase:
    """What Resolve returns for a landing page token."""

    subscription_id: str
    subscription_name: str = ""
    offer_id: str = ""
    plan_id: str = ""
    quantity: int | None = None
    subscription: Subscription | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> ResolvedPurchase:
        inner = field_of(data, "subscription")
        subscription = Subscription.from_api(inner) if isinstance(inner, Mapping) else None
        subscription_id = _text(data, "id") or (subscription.id if subscription else "")
        if subscription is not None and not subscription.id:
            subscription = Subscription.from_api({**inner, "id": subscription_id})
        return cls(
            subscription_id=subscription_id,
            subscription_name=_text(data, "subscriptionName"),
            offer_id=_text(data, "offerId"),
            plan_id=_text(data, "planId"),
            quantity=parse_quantity(field_of(data, "quantity")),
            subscription=subscription,
            raw=dict(data),
        )


@dataclass(frozen=True)
class Plan:
    plan_id: str
    display_name: str = ""
    description: str = ""
    is_private: bool = False
    is_price_per_seat: bool = False
    has_free_trials: bool = False
    min_quantity: int | None = None
    max_quantity: int | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> Plan:
        return cls(
            plan_id=_text(data, "planId"),
            display_name=_text(data, "displayName"),
            description=_text(data, "description"),
            is_private=_bool(data, "isPrivate"),
            is_price_per_seat=_bool(data, "isPricePerSeat"),
            has_free_trials=_bool(data, "hasFreeTrials"),
            min_quantity=parse_quantity(field_of(data, "minQuantity")),
            max_quantity=parse_quantity(field_of(data, "maxQuantity")),
            raw=dict(data),
        )


@dataclass(frozen=True)
class Operation:
    """An operation on a subscription (Get Operation, List outstanding operations, webhooks)."""

    id: str
    subscription_id: str = ""
    action: Action = Action.UNKNOWN
    status: OperationStatus = OperationStatus.UNKNOWN
    timestamp: datetime | None = None
    plan_id: str = ""
    quantity: int | None = None
    offer_id: str = ""
    publisher_id: str = ""
    request_source: str = ""
    error_status_code: str = ""
    error_message: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def action_name(self) -> str:
        """The action as Microsoft spelled it (kept for unknown actions)."""
        return _text(self.raw, "action") or self.action.value

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> Operation:
        return cls(
            id=_text(data, "id"),
            subscription_id=_text(data, "subscriptionId"),
            action=Action.parse(field_of(data, "action")),
            status=OperationStatus.parse(field_of(data, "status")),
            timestamp=parse_timestamp(field_of(data, "timeStamp")),
            plan_id=_text(data, "planId"),
            quantity=parse_quantity(field_of(data, "quantity")),
            offer_id=_text(data, "offerId"),
            publisher_id=_text(data, "publisherId"),
            request_source=_text(data, "operationRequestSource") or _text(data, "operationRequestedSource"),
            error_status_code=_text(data, "errorStatusCode"),
            error_message=_text(data, "errorMessage"),
            raw=dict(data),
        )


@dataclass(frozen=True)
class WebhookEvent:
    """A webhook call from Microsoft: an operation plus the subscription as Microsoft saw it."""

    operation: Operation
    subscription: Subscription | None = None

    @property
    def id(self) -> str:
        return self.operation.id

    @property
    def subscription_id(self) -> str:
        return self.operation.subscription_id

    @property
    def action(self) -> Action:
        return self.operation.action

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> WebhookEvent:
        """Parse a payload; raises ValueError naming the required fields that are missing."""
        if not isinstance(data, Mapping):
            raise ValueError("webhook body must be a JSON object")
        missing = [name for name in ("id", "subscriptionId", "action") if not _text(data, name)]
        if missing:
            raise ValueError("webhook body is missing " + ", ".join(missing))
        inner = field_of(data, "subscription")
        subscription = Subscription.from_api(inner) if isinstance(inner, Mapping) else None
        return cls(operation=Operation.from_api(data), subscription=subscription)


# ---------------------------------------------------------------------------------------------
# metering


class UsageStatus(_LenientEnum):
    """Per-item status of a batchUsageEvent answer (open set: unknown values are UNKNOWN)."""

    ACCEPTED = "Accepted"
    DUPLICATE = "Duplicate"
    EXPIRED = "Expired"
    ERROR = "Error"
    RESOURCE_NOT_FOUND = "ResourceNotFound"
    RESOURCE_NOT_AUTHORIZED = "ResourceNotAuthorized"
    RESOURCE_NOT_ACTIVE = "ResourceNotActive"
    INVALID_DIMENSION = "InvalidDimension"
    INVALID_QUANTITY = "InvalidQuantity"
    BAD_ARGUMENT = "BadArgument"
    UNKNOWN = "Unknown"


# Microsoft's metering API types quantities as JSON numbers of format ``double`` (its OpenAPI
# document); any decimal of at most 15 significant digits survives a round trip through a double
# (DBL_DIG), so that is the precision we can bill exactly.
QUANTITY_SIGNIFICANT_DIGITS = 15


def quantity_of(value: Any) -> Decimal | None:
    """A JSON number as an exact Decimal (None for anything else, booleans included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        return None
    try:
        amount = value if isinstance(value, Decimal) else Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return amount if amount.is_finite() else None


def significant_digits(amount: Decimal) -> int:
    """Digits a double must hold for ``amount`` (trailing zeros of an integer part do not count)."""
    digits = amount.normalize().as_tuple().digits
    return len(digits)


def decimal_text(amount: Decimal) -> str:
    """A Decimal as a plain JSON number: no exponent, no trailing fractional zeros."""
    text = format(amount, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


_EXACT_MARK = re.compile(r'"\\u0000(\d+)\\u0000"')


def dumps_exact(value: Any) -> str:
    """``json.dumps`` that writes Decimal values as exact JSON numbers (never through a float)."""
    import json

    numbers: list[Decimal] = []

    def swap(item: Any) -> Any:
        if isinstance(item, Decimal):
            numbers.append(item)
            return f"\u0000{len(numbers) - 1}\u0000"
        if isinstance(item, Mapping):
            return {key: swap(each) for key, each in item.items()}
        if isinstance(item, (list, tuple)):
            return [swap(each) for each in item]
        return item

    text = json.dumps(swap(value))
    return _EXACT_MARK.sub(lambda m: decimal_text(numbers[int(m.group(1))]), text) if numbers else text


@dataclass(frozen=True)
class UsageEvent:
    """One hour of one dimension of one subscription, as sent to the metering API."""

    resource_id: str
    plan_id: str
    dimension: str
    quantity: Decimal
    effective_start_time: datetime

    def to_api(self) -> dict[str, Any]:
        return {
            "resourceId": self.resource_id,
            "planId": self.plan_id,
            "dimension": self.dimension,
            "quantity": self.quantity,  # a Decimal: the client writes it with dumps_exact
            "effectiveStartTime": format_timestamp(self.effective_start_time),
        }

    @property
    def key(self) -> tuple[str, str, str, str]:
        """What Microsoft's answer repeats to say which event it is about."""
        return usage_key(self.resource_id, self.dimension, self.effective_start_time, self.plan_id)


def usage_key(resource_id: str, dimension: str, at: datetime | None, plan_id: str) -> tuple[str, str, str, str]:
    hour = at.astimezone(UTC).replace(minute=0, second=0, microsecond=0) if at is not None else None
    return (resource_id.strip().lower(), dimension.strip(), format_timestamp(hour), plan_id.strip())


@dataclass(frozen=True)
class UsageResult:
    """Microsoft's answer for one usage event (an item of batchUsageEvent).

    A success item carries ``usageEventId`` and the key fields; an error item carries ``status``,
    the key fields and ``error: {code, message, additionalInfo: {acceptedMessage}}``. For a
    ``Duplicate``, what Microsoft kept (its quantity and event id) is that ``acceptedMessage``."""

    status: UsageStatus
    resource_id: str = ""
    dimension: str = ""
    quantity: Decimal | None = None
    effective_start_time: datetime | None = None
    plan_id: str = ""
    usage_event_id: str = ""
    error_code: str = ""
    error_message: str = ""
    kept_quantity: Decimal | None = None  # Duplicate: the quantity Microsoft holds for this hour
    kept_usage_event_id: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> UsageResult:
        error = field_of(data, "error")
        error = error if isinstance(error, Mapping) else {}
        info = field_of(error, "additionalInfo")
        kept = field_of(info, "acceptedMessage") if isinstance(info, Mapping) else None
        kept = kept if isinstance(kept, Mapping) else {}
        return cls(
            status=UsageStatus.parse(field_of(data, "status")),
            resource_id=_text(data, "resourceId"),
            dimension=_text(data, "dimension"),
            quantity=quantity_of(field_of(data, "quantity")),
            effective_start_time=parse_timestamp(field_of(data, "effectiveStartTime")),
            plan_id=_text(data, "planId"),
            usage_event_id=_text(data, "usageEventId"),
            error_code=_text(error, "code"),
            error_message=_text(error, "message"),
            kept_quantity=quantity_of(field_of(kept, "quantity")),
            kept_usage_event_id=_text(kept, "usageEventId"),
            raw=dict(data),
        )

    @property
    def key(self) -> tuple[str, str, str, str]:
        return usage_key(self.resource_id, self.dimension, self.effective_start_time, self.plan_id)


@dataclass(frozen=True)
class UsageAggregate:
    """One row of ``GET /api/usageEvents``: Microsoft's daily aggregate of one resource and dimension."""

    usage_date: datetime | None
    resource_id: str
    dimension: str
    plan_id: str
    offer_id: str
    submitted_quantity: Decimal
    processed_quantity: Decimal
    submitted_count: int
    recon_status: str
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> UsageAggregate:
        count = field_of(data, "submittedCount")
        return cls(
            usage_date=parse_timestamp(field_of(data, "usageDate")),
            resource_id=_text(data, "usageResourceId").lower(),
            dimension=_text(data, "dimension"),
            plan_id=_text(data, "planId"),
            offer_id=_text(data, "offerId"),
            submitted_quantity=quantity_of(field_of(data, "submittedQuantity")) or Decimal(0),
            processed_quantity=quantity_of(field_of(data, "processedQuantity")) or Decimal(0),
            submitted_count=int(count) if isinstance(count, (int, Decimal)) and not isinstance(count, bool) else 0,
            recon_status=_text(data, "reconStatus"),
            raw=dict(data),
        )
