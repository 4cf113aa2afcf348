"""Local stand-in for Microsoft's SaaS Fulfillment API v2 (and Microsoft's webhook sender).

It behaves like ``https://marketplaceapi.microsoft.com/api`` as described in
``docs/marketplace-fulfillment-v2.md`` (§3 conventions, §4 endpoints, §5 schemas, §7 webhooks), keeps
its state in memory, and can play Microsoft's side: create purchases, change subscriptions "in the
portal" and POST signed webhooks to the app. It is used by ``make run``, by the integration and
browser tests and by the benchmarks (dict look-ups everywhere; 10,000+ subscriptions are fine).

Usage::

    python -m devtools.marketplace_standin --host 127.0.0.1 --port 7072 \\
        --webhook-url http://127.0.0.1:7071/api/webhook

    with MarketplaceStandIn(port=0, webhook_url=url) as standin:   # or .start() / .stop()
        purchase = standin.create_purchase(plan_id="standard", quantity=5)
        requests.post(standin.api_base_url + "/saas/subscriptions/resolve?api-version=2018-08-31",
                      headers={"x-ms-marketplace-token": purchase["token"]})

App settings that point the app at it: ``MARKETPLACE_API_BASE_URL = standin.api_base_url``,
``WEBHOOK_OPENID_CONFIG_URL = standin.openid_config_url``, ``WEBHOOK_AUDIENCE = standin.audience``,
``MARKETPLACE_TENANT_ID = standin.tenant_id``.

API (under ``/api``; ``api-version=2018-08-31`` is required on every call, ``publisherId`` is ignored)
    POST   /saas/subscriptions/resolve                      header x-ms-marketplace-token
    POST   /saas/subscriptions/{id}/activate                body {"planId"?, "quantity"?}
    GET    /saas/subscriptions[/]?continuationToken=...     pages of ``page_size``; no subscriptions = empty body
    GET    /saas/subscriptions/{id}
    GET    /saas/subscriptions/{id}/listAvailablePlans[?planId=]   unknown id = 200 with empty body
    PATCH  /saas/subscriptions/{id}                         {"planId"} or {"quantity"} -> 202 + Operation-Location
    DELETE /saas/subscriptions/{id}                         -> 202 + Operation-Location
    GET    /saas/subscriptions/{id}/operations              InProgress operations (Partner ones included)
    GET    /saas/subscriptions/{id}/operations/{opId}
    PATCH  /saas/subscriptions/{id}/operations/{opId}       {"status": "Success" | "Failure"}
    POST   /usageEvent                                      one per resource, dimension, hour; 409 Duplicate
    POST   /batchUsageEvent                                 {"request": [<= 25 events]} -> per-item statuses
    GET    /usageEvents?usageStartDate=...                  accepted events (read-back)

OpenID metadata and signing keys (the JWT issuer of the webhooks)
    GET /{tenant}/v2.0/.well-known/openid-configuration    (issuer https://login.microsoftonline.com/{tenant}/v2.0)
    GET /{tenant}/.well-known/openid-configuration         (issuer https://sts.windows.net/{tenant}/)
    GET /{tenant}/discovery/v2.0/keys  and  /{tenant}/discovery/keys

Control endpoints (JSON in and out; body keys may be camelCase or snake_case)
    POST /_control/purchases                 create_purchase() args -> {token, subscriptionId, landingUrl?}
    POST /_control/seed                      {count, status?, offerId?, planId?, quantity?} -> {subscriptionIds}
    GET  /_control/subscriptions/{id}        Microsoft's record + {activateCalls, operations}
    POST /_control/subscriptions/{id}        set_subscription(): silent drift, e.g. {"status": "Suspended"}
    POST /_control/subscriptions/{id}/tokens new_token() -> {token, subscriptionId, landingUrl?}
    POST /_control/subscriptions/{id}/actions {action, planId?, quantity?, deliver?, source?}
                                             -> operation + {"webhookStatusCodes": [...]}
    POST /_control/tokens/expire             {token}
    POST /_control/operations/{opId}/deliver {times?} -> {"statusCodes": [...]}
    POST /_control/plans                     {offerId, plans: [Plan...]} (replaces that offer's catalogue)
    POST /_control/faults                    any knob (snake_case names below) and/or
                                             {"fail_next": {n, status, path_contains?, retry_after?, process?},
                                              "fail_after": {n_requests, times, status, path_contains?, ...},
                                              "clear_faults": true}
    POST /_control/jwt                       {claims?, version?} -> {token} (a token signed like a webhook's)
    POST /_control/rotate-key                -> {kid}
    POST /_control/reset                     clears state, faults and knobs (signing keys are kept)
    GET  /_control/state                     counts, calls per route kind, subscriptions per status
    GET  /_control/patches | /_control/deliveries | /_control/requests   recorded operation PATCHes,
                                             webhook deliveries and the last requests (with headers)

Knobs (attributes; also settable through /_control/faults): page_size, require_bearer, latency_seconds,
activation_delay_seconds, activation_outcome ("success"|"fail"), operation_delay_seconds,
auto_accept_seconds (None disables), webhook_url, webhook_delay, webhook_retries,
webhook_retry_delay_seconds, webhook_timeout_seconds, webhook_token_version ("2.0"|"1.0").
"""

from __future__ import annotations

import argparse
import base64
import calendar
import copy
import hashlib
import heapq
import itertools
import json
import logging
import random
import re
import secrets
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from shared.domain import dumps_exact

logger = logging.getLogger(__name__)

API_VERSION = "2018-08-31"
MARKETPLACE_APP_ID = "20e940b3-4c77-4b0b-9a53-9e16a1b010a7"
DEFAULT_TENANT_ID = "11111111-1111-4111-8111-111111111111"
DEFAULT_AUDIENCE = "22222222-2222-4222-8222-222222222222"
DEFAULT_PUBLISHER_ID = "contoso"
DEFAULT_OFFER_ID = "contoso-offer"

PENDING = "PendingFulfillmentStart"
SUBSCRIBED = "Subscribed"
SUSPENDED = "Suspended"
UNSUBSCRIBED = "Unsubscribed"

IN_PROGRESS = "InProgress"
SUCCEEDED = "Succeeded"
FAILED = "Failed"

ACKED_ACTIONS = frozenset({"ChangePlan", "ChangeQuantity", "Reinstate"})  # InProgress until PATCHed
AUTO_ACCEPTED_ACTIONS = frozenset({"ChangePlan", "ChangeQuantity"})  # accepted after auto_accept_seconds

KNOB_DEFAULTS: dict[str, Any] = {
    "page_size": 100,
    "require_bearer": False,
    "latency_seconds": 0.0,
    "activation_delay_seconds": 0.0,
    "activation_outcome": "success",
    "operation_delay_seconds": 0.2,
    "auto_accept_seconds": 10.0,
    "webhook_url": None,
    "webhook_delay": 0.0,
    "webhook_retries": 0,
    "webhook_retry_delay_seconds": 0.5,
    "webhook_timeout_seconds": 15.0,
    "webhook_token_version": "2.0",
    # Publisher (Partner) operations from PATCH/DELETE: how they end after operation_delay_seconds
    # ("succeed", "fail" or "conflict"), and whether Microsoft's webhook announces a success.
    "partner_outcome": "succeed",
    "partner_webhook": True,
}

# set_subscription() accepts these Python-style names besides the JSON field names.
_FIELD_ALIASES = {
    "status": "saasSubscriptionStatus",
    "plan_id": "planId",
    "offer_id": "offerId",
    "auto_renew": "autoRenew",
    "is_free_trial": "isFreeTrial",
    "is_test": "isTest",
    "allowed_customer_operations": "allowedCustomerOperations",
}
_TERM_FIELDS = {
    "start_date": "startDate",
    "startDate": "startDate",
    "end_date": "endDate",
    "endDate": "endDate",
    "term_unit": "termUnit",
    "termUnit": "termUnit",
}


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _timestamp(moment: datetime | None = None) -> str:
    """UTC ISO 8601 with 7 fractional digits and ``Z``, as Microsoft writes ``timeStamp``."""
    moment = moment or datetime.now(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


def _day(value: date) -> str:
    return f"{value.isoformat()}T00:00:00Z"


def _new_id() -> str:
    return str(uuid.uuid4())


def _opaque_token() -> str:
    """A random opaque string that always contains ``+``, ``/`` and ``=`` (URL-decoding bugs show).
    Like a real base64 token it may start with ``+`` (1 in 64; tests/integration/test_landing_http.py)."""
    raw = base64.b64encode(secrets.token_bytes(30)).decode()  # 40 characters, no padding
    return f"{raw[:12]}+{raw[12:26]}/{raw[26:]}=="


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _snake(key: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).lower()


def _snake_keys(body: dict[str, Any]) -> dict[str, Any]:
    return {_snake(key): value for key, value in body.items()}


def _term_months(term_unit: str | None) -> int:
    """Months in an ISO-8601 term such as ``P1M``/``P1Y``/``P18M``; anything else (``PAY``) counts as 1."""
    match = re.fullmatch(r"P(\d+)([MY])", term_unit or "")
    if not match:
        return 1
    count = int(match.group(1))
    return count * 12 if match.group(2) == "Y" else count


def _add_months(start: date, months: int) -> date:
    years, month_index = divmod(start.month - 1 + months, 12)
    year, month = start.year + years, month_index + 1
    return date(year, month, min(start.day, calendar.monthrange(year, month)[1]))


def _set_term(subscription: dict[str, Any], start: date) -> None:
    term = subscription["term"]
    end = _add_months(start, _term_months(term.get("termUnit"))) - timedelta(days=1)
    term["startDate"], term["endDate"] = _day(start), _day(end)


def _today() -> date:
    return datetime.now(UTC).date()


def _as_json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return _timestamp(value.astimezone(UTC))
    if isinstance(value, date):
        return _day(value)
    return value


def _quantity(value: Any) -> int | None:
    """Normalise a quantity the way clients send it (``20``, ``"20"``, ``""``, ``None``)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError("quantity must be a whole number")
    return int(value)


def make_identity(email: str | None = None, tenant_id: str | None = None) -> dict[str, str]:
    """An AadIdentifier (purchaser/beneficiary) with random ids."""
    object_id = _new_id()
    return {
        "emailId": email or f"buyer-{object_id[:8]}@customer.example",
        "objectId": object_id,
        "tenantId": tenant_id or _new_id(),
        "puid": f"{secrets.randbits(64):016X}",
    }


def make_plan(
    plan_id: str,
    *,
    per_seat: bool = False,
    min_quantity: int | None = None,
    max_quantity: int | None = None,
    price: float = 10.0,
    display_name: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A Plan object (§5.3) for ``listAvailablePlans``; ``overrides`` are JSON field names."""
    plan = {
        "planId": plan_id,
        "displayName": display_name or plan_id.replace("-", " ").title(),
        "isPrivate": False,
        "description": f"The {plan_id} plan",
        "minQuantity": min_quantity,
        "maxQuantity": max_quantity,
        "hasFreeTrials": False,
        "isPricePerSeat": per_seat,
        "isStopSell": False,
        "market": "US",
        "planComponents": {
            "recurrentBillingTerms": [
                {
                    "currency": "USD",
                    "price": price,
                    "termUnit": "P1M",
                    "termDescription": "1 month",
                    "meteredQuantityIncluded": [],
                }
            ],
            "meteringDimensions": [],
        },
        "sourceOffers": [],
    }
    plan.update(overrides)
    return plan


def default_plans() -> list[dict[str, Any]]:
    """The catalogue every offer has unless ``set_plans`` replaces it."""
    return [
        make_plan("basic", price=10.0),
        make_plan("standard", per_seat=True, min_quantity=1, max_quantity=100, price=5.0),
        make_plan("premium", per_seat=True, min_quantity=1, max_quantity=10000, price=15.0),
    ]


# --------------------------------------------------------------------------------------------------
# HTTP plumbing types
# --------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answer: ``{"code", "message", "target"}`` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, target: str = "", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.target = status, code, message, target
        self.headers = headers or {}

    def response(self) -> _Response:
        body = {"code": self.code, "message": self.message, "target": self.target}
        return _Response(self.status, body, dict(self.headers))


def _not_found(what: str, target: str) -> ApiError:
    return ApiError(404, "EntityNotFound", f"{what} not found", target)


def _bad_request(message: str, target: str = "", code: str = "BadRequest") -> ApiError:
    return ApiError(400, code, message, target)


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, str]
    path_and_query: str
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> dict[str, Any]:
        if not self.body.strip():
            return {}
        try:
            value = json.loads(self.body)
        except ValueError:
            raise _bad_request("The request body is not valid JSON", "body") from None
        if not isinstance(value, dict):
            raise _bad_request("The request body must be a JSON object", "body")
        return value


def _exact_json(request: _Request) -> dict[str, Any]:
    """The body with its numbers as Decimal (the metering API bills them: never through a float)."""
    try:
        value = json.loads(request.body or b"{}", parse_float=Decimal, parse_int=Decimal)
    except ValueError:
        raise _bad_request("The request body is not valid JSON", "body") from None
    if not isinstance(value, dict):
        raise _bad_request("The request body must be a JSON object", "body")
    return value


@dataclass
class _Response:
    status: int = 200
    body: Any = None  # dict/list -> JSON, bytes -> as is, None -> empty body
    headers: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        if self.body is None:
            return b""
        if isinstance(self.body, bytes):
            return self.body
        self.headers.setdefault("Content-Type", "application/json; charset=utf-8")
        return dumps_exact(self.body).encode()  # Decimal quantities as exact JSON numbers


@dataclass
class _Route:
    method: str
    pattern: re.Pattern[str]
    kind: str
    handler: str


def _routes(*rows: tuple[str, str, str, str]) -> list[_Route]:
    return [_Route(method, re.compile(f"^{pattern}$"), kind, handler) for method, pattern, kind, handler in rows]


def _match(routes: list[_Route], method: str, path: str) -> tuple[_Route | None, dict[str, str]]:
    for route in routes:
        found = route.pattern.match(path)
        if found and route.method == method:
            return route, {name: unquote(value) for name, value in found.groupdict().items()}
    return None, {}


_SUB = r"/saas/subscriptions/(?P<sid>[^/]+)"
API_ROUTES = _routes(
    ("POST", r"/saas/subscriptions/resolve", "resolve", "_api_resolve"),
    ("GET", r"/saas/subscriptions/?", "list", "_api_list"),
    ("GET", _SUB, "get", "_api_get"),
    ("PATCH", _SUB, "update", "_api_update"),
    ("DELETE", _SUB, "delete", "_api_delete"),
    ("POST", _SUB + "/activate", "activate", "_api_activate"),
    ("GET", _SUB + "/listAvailablePlans", "list_plans", "_api_list_plans"),
    ("GET", _SUB + "/operations/?", "list_operations", "_api_list_operations"),
    ("GET", _SUB + "/operations/(?P<oid>[^/]+)", "get_operation", "_api_get_operation"),
    ("PATCH", _SUB + "/operations/(?P<oid>[^/]+)", "patch_operation", "_api_patch_operation"),
    ("POST", r"/usageEvent", "usage_event", "_api_usage_event"),
    ("POST", r"/batchUsageEvent", "batch_usage_event", "_api_batch_usage_event"),
    ("GET", r"/usageEvents", "usage_events", "_api_usage_events"),
)
MAX_BATCH_EVENTS = 25
USAGE_WINDOW = timedelta(hours=24)
IDENTITY_ROUTES = _routes(
    ("GET", r"/(?P<tenant>[^/]+)/v2\.0/\.well-known/openid-configuration", "openid_config", "_openid_v2"),
    ("GET", r"/(?P<tenant>[^/]+)/\.well-known/openid-configuration", "openid_config", "_openid_v1"),
    ("GET", r"/(?P<tenant>[^/]+)/discovery(?:/v2\.0)?/keys", "jwks", "_jwks"),
)
CONTROL_ROUTES = _routes(
    ("POST", r"/_control/purchases", "", "_control_purchase"),
    ("POST", r"/_control/seed", "", "_control_seed"),
    ("GET", r"/_control/subscriptions/(?P<sid>[^/]+)", "", "_control_get_subscription"),
    ("POST", r"/_control/subscriptions/(?P<sid>[^/]+)", "", "_control_set_subscription"),
    ("POST", r"/_control/subscriptions/(?P<sid>[^/]+)/tokens", "", "_control_new_token"),
    ("POST", r"/_control/subscriptions/(?P<sid>[^/]+)/actions", "", "_control_trigger"),
    ("POST", r"/_control/tokens/expire", "", "_control_expire_token"),
    ("POST", r"/_control/operations/(?P<oid>[^/]+)/deliver", "", "_control_deliver"),
    ("POST", r"/_control/plans", "", "_control_plans"),
    ("POST", r"/_control/faults", "", "_control_faults"),
    ("POST", r"/_control/jwt", "", "_control_jwt"),
    ("POST", r"/_control/rotate-key", "", "_control_rotate_key"),
    ("POST", r"/_control/reset", "", "_control_reset"),
    ("GET", r"/_control/state", "", "_control_state"),
    ("GET", r"/_control/patches", "", "_control_patches"),
    ("GET", r"/_control/deliveries", "", "_control_deliveries"),
    ("GET", r"/_control/requests", "", "_control_requests"),
)


# --------------------------------------------------------------------------------------------------
# Background work, signing keys, faults
# --------------------------------------------------------------------------------------------------


class _Scheduler:
    """Runs callables after a delay on one background thread (cheaper than a Timer per task)."""

    def __init__(self, name: str):
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._cond = threading.Condition()
        self._sequence = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_later(self, delay: float, function: Callable[..., None], *args: Any) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + max(delay, 0.0), next(self._sequence), function, args))
            self._cond.notify()

    def clear(self) -> None:
        with self._cond:
            self._heap.clear()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._stopped:
                    return
                _, _, function, args = heapq.heappop(self._heap)
            try:
                function(*args)
            except Exception:  # a failing task must not kill the scheduler
                logger.exception("Scheduled task %s failed", getattr(function, "__name__", function))


@dataclass
class _SigningKey:
    kid: str
    private_key: rsa.RSAPrivateKey
    certificate_der: bytes

    @classmethod
    def generate(cls) -> _SigningKey:
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "accounts.accesscontrol.windows.net")])
        now = datetime.now(UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(private_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=365))
            .sign(private_key, hashes.SHA256())
        )
        return cls(secrets.token_urlsafe(20), private_key, certificate.public_bytes(serialization.Encoding.DER))

    @property
    def x5t(self) -> str:
        return _b64url(hashlib.sha1(self.certificate_der).digest())

    def jwk(self, issuer: str) -> dict[str, Any]:
        numbers = self.private_key.public_key().public_numbers()
        return {
            "kty": "RSA",
            "use": "sig",
            "kid": self.kid,
            "x5t": self.x5t,
            "n": _b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
            "e": _b64url(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")),
            "x5c": [base64.b64encode(self.certificate_der).decode()],
            "issuer": issuer,
        }


@dataclass
class _Fault:
    """Makes matching requests answer ``status`` ``remaining`` times, after letting ``skip`` pass."""

    status: int
    remaining: int
    skip: int = 0
    path_contains: str | None = None
    retry_after: float | None = None
    process: bool = False  # True: handle the request (state changes) but answer with the fault

    def matches(self, request: _Request) -> bool:
        if self.path_contains is None:
            return request.path.startswith("/api/")
        return self.path_contains in request.path_and_query

    def error(self) -> ApiError:
        codes = {429: "TooManyRequests", 500: "InternalServerError", 503: "ServiceUnavailable"}
        headers = {} if self.retry_after is None else {"Retry-After": f"{self.retry_after:g}"}
        return ApiError(self.status, codes.get(self.status, "InjectedFault"), "Injected fault", "", headers)


# --------------------------------------------------------------------------------------------------
# The stand-in
# --------------------------------------------------------------------------------------------------


class MarketplaceStandIn:
    """Stateful, thread-safe fake of the SaaS Fulfillment API v2 plus Microsoft's webhook sender."""

    # Knobs (KNOB_DEFAULTS): set in __init__ and reset(), changed by tests or /_control/faults.
    page_size: int
    require_bearer: bool
    latency_seconds: float
    activation_delay_seconds: float
    activation_outcome: str
    operation_delay_seconds: float
    auto_accept_seconds: float | None
    webhook_url: str | None
    webhook_delay: float
    webhook_retries: int
    webhook_retry_delay_seconds: float
    webhook_timeout_seconds: float
    webhook_token_version: str
    partner_outcome: str
    partner_webhook: bool

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        webhook_url: str | None = None,
        tenant_id: str = DEFAULT_TENANT_ID,
        audience: str = DEFAULT_AUDIENCE,
        publisher_id: str = DEFAULT_PUBLISHER_ID,
        landing_page_url: str | None = None,
        public_url: str | None = None,
        **knobs: Any,
    ):
        unknown = set(knobs) - set(KNOB_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown knob(s): {', '.join(sorted(unknown))}")
        self.host, self.port = host, port
        self.tenant_id, self.audience, self.publisher_id = tenant_id, audience, publisher_id
        self.landing_page_url = landing_page_url
        self._public_url = public_url.rstrip("/") if public_url else None
        self._knob_defaults = {**KNOB_DEFAULTS, "webhook_url": webhook_url, **knobs}
        self._lock = threading.RLock()
        self._deliveries_changed = threading.Condition(self._lock)
        self._keys = [_SigningKey.generate()]
        self._signing_key = self._keys[0]
        self._marketplace_principal_id = _new_id()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._scheduler: _Scheduler | None = _Scheduler("standin-scheduler")
        self._delivery_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="standin-webhook")
        self._init_state()

    # ---- lifecycle ----------------------------------------------------------------------------

    def _init_state(self) -> None:
        for name, value in self._knob_defaults.items():
            setattr(self, name, value)
        self._subscriptions: dict[str, dict[str, Any]] = {}
        self._order: list[str] = []
        self._tokens: dict[str, tuple[str, float]] = {}  # token -> (subscription id, expiry epoch)
        self._operations: dict[str, dict[str, Any]] = {}
        self._operations_by_subscription: defaultdict[str, list[str]] = defaultdict(list)
        self._webhook_status: dict[str, str] = {}  # operation id -> status its webhook announces
        self._activating: set[str] = set()
        self._activate_calls: Counter[str] = Counter()
        self._plans: dict[str, dict[str, dict[str, Any]]] = {}
        self._continuations: dict[str, int] = {}
        self._continuation_by_offset: dict[int, str] = {}
        self._faults: list[_Fault] = []
        self.calls: Counter[str] = Counter()
        self.last_requests: deque[dict[str, Any]] = deque(maxlen=500)
        self.patches: list[dict[str, Any]] = []
        self.webhook_deliveries: list[tuple[str, int | None]] = []
        self._webhook_tokens: dict[tuple[str, ...], tuple[str, float]] = {}  # bearer cache: (token, exp)
        # Metering: one accepted event per (resource, dimension, hour); the clock decides the 24 h window.
        self.usage_events: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.usage_clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        self.usage_result_order = "request"  # "request" | "reversed" | "shuffled" (a seeded shuffle)
        self.usage_error_rate = 0.0  # share of usage events answered with a per-item Error
        self.usage_item_errors_answered = 0
        self.metering_routes = True  # False: no metering API (as the SaaS API emulator)
        # a test's hook that rewrites a batch's results before they are answered (a malformed answer)
        self.usage_answer_rewrite: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None
        # (resource, dimension, "yyyy-mm-dd") -> fields that override a daily aggregate (e.g. Mismatch)
        self.usage_recon: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._usage_item_errors = 0
        self._usage_random = random.Random(20261206)
        self._usage_offers: dict[tuple[str, str, str], str] = {}
        self._usage_submissions: dict[tuple[str, str, str], int] = {}

    def _later(self, delay: float, function: Callable[..., None], *args: Any) -> None:
        if self._scheduler is None:
            raise RuntimeError("the stand-in is stopped")
        self._scheduler.call_later(delay, function, *args)

    def start(self) -> MarketplaceStandIn:
        """Bind (port 0 picks a free port) and serve on a background thread."""
        if self._server is not None:
            return self
        if self._scheduler is None:  # restarted after stop()
            self._scheduler = _Scheduler("standin-scheduler")
            self._delivery_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="standin-webhook")
        self._server = _Server((self.host, self.port), _Handler, self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="standin-http", daemon=True
        )
        self._thread.start()
        logger.info("Marketplace stand-in listening on %s", self.url)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._scheduler is not None:
            self._scheduler.stop()
            self._scheduler = None
            self._delivery_pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> MarketplaceStandIn:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget every subscription, operation, token, record, fault and knob change (keys stay)."""
        with self._lock:
            if self._scheduler is not None:
                self._scheduler.clear()
            self._init_state()
            self._deliveries_changed.notify_all()

    @property
    def url(self) -> str:
        if self._public_url:
            return self._public_url
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"

    @property
    def api_base_url(self) -> str:
        return self.url + "/api"

    @property
    def openid_config_url(self) -> str:
        return f"{self.url}/{self.tenant_id}/v2.0/.well-known/openid-configuration"

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/{self.tenant_id}/discovery/v2.0/keys"

    # ---- Microsoft's side: purchases and subscription records ------------------------------------

    def create_purchase(
        self,
        offer_id: str = DEFAULT_OFFER_ID,
        plan_id: str = "basic",
        quantity: int | None = None,
        name: str | None = None,
        purchaser: dict[str, str] | None = None,
        beneficiary: dict[str, str] | None = None,
        term_unit: str = "P1M",
        is_free_trial: bool = False,
        token_ttl_seconds: float = 86400,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, str]:
        """A new purchase in PendingFulfillmentStart; returns ``{"token", "subscriptionId"}``.

        ``beneficiary`` defaults to the purchaser (pass a different identity for CSP purchases);
        ``extra`` adds or overrides Subscription fields by JSON name (e.g. allowedCustomerOperations).
        """
        with self._lock:
            subscription = self._new_subscription(
                offer_id,
                plan_id,
                quantity,
                status=PENDING,
                name=name,
                purchaser=purchaser,
                beneficiary=beneficiary,
                term_unit=term_unit,
                is_free_trial=is_free_trial,
            )
            subscription.update(extra or {})
            self._add_subscription(subscription)
            token = self._issue_token(subscription["id"], token_ttl_seconds)
        logger.info("Purchase %s (%s/%s)", subscription["id"], offer_id, plan_id)
        return {"token": token, "subscriptionId": subscription["id"]}

    def new_token(self, subscription_id: str, token_ttl_seconds: float = 86400) -> dict[str, str]:
        """Another purchase token for an existing subscription (the portal's "Manage account")."""
        with self._lock:
            self._require_subscription(subscription_id)
            return {"token": self._issue_token(subscription_id, token_ttl_seconds), "subscriptionId": subscription_id}

    def expire_token(self, token: str) -> None:
        with self._lock:
            subscription_id, _ = self._tokens[token]
            self._tokens[token] = (subscription_id, 0.0)

    def landing_url(self, token: str) -> str | None:
        """Where Microsoft would send the buyer: ``landing_page_url?token=<percent-encoded token>``."""
        if not self.landing_page_url:
            return None
        separator = "&" if "?" in self.landing_page_url else "?"
        return f"{self.landing_page_url}{separator}token={quote(token, safe='')}"

    def seed(
        self,
        count: int,
        status: str = SUBSCRIBED,
        offer_id: str = DEFAULT_OFFER_ID,
        plan_id: str = "basic",
        quantity: int | None = None,
    ) -> list[str]:
        """Add ``count`` subscriptions at once (no tokens, no webhooks); returns their ids."""
        with self._lock:
            created = _timestamp()
            ids = []
            for _index in range(count):
                subscription = self._new_subscription(
                    offer_id,
                    plan_id,
                    quantity,
                    status=status,
                    name=f"Seeded subscription {len(self._order) + 1}",
                    created=created,
                )
                self._add_subscription(subscription)
                ids.append(subscription["id"])
        logger.info("Seeded %d %s subscriptions", count, status)
        return ids

    def set_subscription(self, subscription_id: str, **fields: Any) -> dict[str, Any]:
        """Change Microsoft's record silently (no operation, no webhook) to simulate drift.

        Accepts JSON names (``saasSubscriptionStatus``, ``planId``, ``quantity``, ``autoRenew``...) and
        the aliases ``status``, ``plan_id``, ``start_date``, ``end_date``, ``term_unit``...; ``None``
        removes a field. Dates may be ``date``/``datetime`` objects or strings.
        """
        with self._lock:
            subscription = self._require_subscription(subscription_id)
            for key, value in fields.items():
                value = _as_json_value(value)
                if key in _TERM_FIELDS:
                    subscription["term"][_TERM_FIELDS[key]] = value
                elif value is None:
                    subscription.pop(_FIELD_ALIASES.get(key, key), None)
                else:
                    subscription[_FIELD_ALIASES.get(key, key)] = value
            self._ensure_term(subscription)
            subscription["lastModified"] = _timestamp()
            return copy.deepcopy(subscription)

    def set_plans(self, offer_id: str, plans: Iterable[dict[str, Any]]) -> None:
        """Replace the plan catalogue of one offer (missing Plan fields get defaults)."""
        with self._lock:
            self._plans[offer_id] = {plan["planId"]: {**make_plan(plan["planId"]), **plan} for plan in plans}

    # ---- Microsoft's side: operations and webhooks ---------------------------------------------

    def trigger(
        self,
        subscription_id: str,
        action: str,
        plan_id: str | None = None,
        quantity: int | None = None,
        deliver: bool = True,
        source: str = "Azure",
    ) -> dict[str, Any]:
        """Create an operation as Microsoft would, then (by default) POST its webhook synchronously.

        ChangePlan/ChangeQuantity/Reinstate stay InProgress until PATCHed (ChangePlan/ChangeQuantity
        are auto-accepted after ``auto_accept_seconds``; a 4xx webhook answer rejects them).
        Suspend/Unsubscribe/Renew/Subscribe (and unknown actions) are Succeeded and applied at once.
        Returns the operation as it is after the delivery.
        """
        with self._lock:
            subscription = self._require_subscription(subscription_id)
            target_plan, target_quantity = self._validate_trigger(subscription, action, plan_id, quantity)
            acked = action in ACKED_ACTIONS
            operation = self._new_operation(
                subscription, action, source, IN_PROGRESS if acked else SUCCEEDED, plan_id=target_plan, quantity=target_quantity
            )
            if not acked:
                self._apply(subscription, operation)
            elif action in AUTO_ACCEPTED_ACTIONS and self.auto_accept_seconds is not None:
                self._later(self.auto_accept_seconds, self._auto_accept, operation["id"])
        logger.info("Triggered %s %s on %s", action, operation["id"], subscription_id)
        if deliver:
            if self.webhook_delay:
                time.sleep(self.webhook_delay)
            self.deliver(operation["id"])
        return self.get_operation(operation["id"])

    def deliver(self, operation_id: str, times: int = 1) -> list[int | None]:
        """POST the operation's webhook ``times`` times (duplicates); returns the HTTP statuses
        (``None`` = connection failed). Each attempt is recorded in ``webhook_deliveries``."""
        url = self.webhook_url
        if not url:
            logger.warning("No webhook_url: webhook of operation %s not delivered", operation_id)
            return []
        body = json.dumps(self.webhook_payload(operation_id)).encode()
        statuses = [self._post_with_retries(url, operation_id, body) for _ in range(times)]
        if statuses:
            self._after_delivery(operation_id, statuses[-1])
        return statuses

    def deliver_many(self, operation_ids: Iterable[str], concurrency: int = 8) -> list[int | None]:
        """Deliver several webhooks concurrently; returns one status per operation, in order."""
        with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="standin-burst") as pool:
            results = list(pool.map(self.deliver, operation_ids))
        return [statuses[-1] if statuses else None for statuses in results]

    def webhook_payload(self, operation_id: str) -> dict[str, Any]:
        """The §7.2 webhook body of an operation, with the subscription as it is now."""
        with self._lock:
            operation = self._require_operation(operation_id)
            return {
                "id": operation["id"],
                "activityId": operation["activityId"],
                "publisherId": operation["publisherId"],
                "offerId": operation["offerId"],
                "planId": operation["planId"],
                "quantity": operation["quantity"],
                "subscriptionId": operation["subscriptionId"],
                "timeStamp": operation["timeStamp"],
                "action": operation["action"],
                "status": self._webhook_status[operation_id],
                "operationRequestSource": operation["operationRequestSource"],
                "subscription": copy.deepcopy(self._subscriptions[operation["subscriptionId"]]),
                "purchaseToken": None,
            }

    def wait_for_deliveries(self, count: int, timeout: float = 5.0) -> list[tuple[str, int | None]]:
        """Block until at least ``count`` webhook attempts were made; returns them (TimeoutError if not)."""
        deadline = time.monotonic() + timeout
        with self._deliveries_changed:
            while len(self.webhook_deliveries) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(self.webhook_deliveries)} of {count} webhook deliveries")
                self._deliveries_changed.wait(remaining)
            return list(self.webhook_deliveries)

    # ---- JWT signing ---------------------------------------------------------------------------

    def sign_token(
        self,
        claims_overrides: dict[str, Any] | None = None,
        *,
        version: str = "2.0",
        headers_overrides: dict[str, Any] | None = None,
        key: Any = None,
        algorithm: str = "RS256",
    ) -> str:
        """A bearer token as Entra ID issues it to the marketplace for the webhook.

        ``claims_overrides``/``headers_overrides`` replace values; a value of ``None`` removes the
        claim/header. ``key`` signs with another key (e.g. ``other_key()``) while the header still
        names the published ``kid``. ``version`` "1.0" gives the v1 shape (``appid``, sts issuer).
        """
        signing_key = self._signing_key
        claims = self._default_claims(version)
        headers: dict[str, Any] = {"kid": signing_key.kid}
        if version == "1.0":
            headers["x5t"] = signing_key.x5t
        for target, overrides in ((claims, claims_overrides), (headers, headers_overrides)):
            for name, value in (overrides or {}).items():
                if value is None:
                    target.pop(name, None)
                else:
                    target[name] = value
        if algorithm == "none":
            key = None
        elif key is None:
            key = signing_key.private_key
        return jwt.encode(claims, key, algorithm=algorithm, headers=headers)

    @staticmethod
    def other_key() -> rsa.RSAPrivateKey:
        """A fresh RSA key that is published nowhere (a forger's or another tenant's key)."""
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def rotate_key(self, retire_old: bool = False) -> str:
        """Publish a new signing key and sign with it from now on; returns its ``kid``."""
        new_key = _SigningKey.generate()
        with self._lock:
            self._keys = [new_key] if retire_old else [*self._keys, new_key]
            self._signing_key = new_key
        logger.info("Signing key rotated to %s", new_key.kid)
        return new_key.kid

    def jwks(self, tenant: str | None = None) -> dict[str, Any]:
        issuer = self._issuer("2.0", tenant or self.tenant_id)
        return {"keys": [key.jwk(issuer) for key in self._keys]}

    def _issuer(self, version: str, tenant: str) -> str:
        if version == "1.0":
            return f"https://sts.windows.net/{tenant}/"
        return f"https://login.microsoftonline.com/{tenant}/v2.0"

    def _default_claims(self, version: str) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "aud": self.audience,
            "iss": self._issuer(version, self.tenant_id),
            "iat": now - 300,
            "nbf": now - 300,
            "exp": now + 3600,
            "aio": _b64url(secrets.token_bytes(24)),
            "oid": self._marketplace_principal_id,
            "sub": self._marketplace_principal_id,
            "rh": _b64url(secrets.token_bytes(24)),
            "tid": self.tenant_id,
            "uti": _b64url(secrets.token_bytes(16)),
            "ver": version,
        }
        if version == "1.0":
            claims.update(appid=MARKETPLACE_APP_ID, appidacr="1", idp=self._issuer("1.0", self.tenant_id))
        else:
            claims.update(azp=MARKETPLACE_APP_ID, azpacr="1")
        return claims

    # ---- faults --------------------------------------------------------------------------------

    def fail_next(
        self,
        n: int = 1,
        status: int = 503,
        path_contains: str | None = None,
        retry_after: float | None = None,
        process: bool = False,
    ) -> None:
        """The next ``n`` matching requests answer ``status`` (with ``Retry-After`` if given).

        Without ``path_contains`` only ``/api/`` requests match; with it, any non-control request
        whose path+query contains it (so JWKS/metadata fetches can fail too). ``process=True`` lets
        the request take effect and only replaces the answer ("response lost").
        """
        self.fail_after(0, n, status, path_contains, retry_after, process)

    def fail_after(
        self,
        n_requests: int,
        times: int = 1,
        status: int = 500,
        path_contains: str | None = None,
        retry_after: float | None = None,
        process: bool = False,
    ) -> None:
        """Let ``n_requests`` matching requests pass, then fail the next ``times`` ones
        (e.g. ``fail_after(2, 1, 500, "continuationToken")`` fails page 4 of a listing once)."""
        with self._lock:
            self._faults.append(_Fault(int(status), int(times), int(n_requests), path_contains, retry_after, bool(process)))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, request: _Request) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if not fault.matches(request):
                    continue
                if fault.skip:
                    fault.skip -= 1
                    continue
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    # ---- inspection ----------------------------------------------------------------------------

    def get_subscription(self, subscription_id: str) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._require_subscription(subscription_id))

    def get_operation(self, operation_id: str) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._require_operation(operation_id))

    def operations_for(self, subscription_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [copy.deepcopy(self._operations[op_id]) for op_id in self._operations_by_subscription.get(subscription_id, ())]

    def activation_count(self, subscription_id: str) -> int:
        """How many Activate calls the subscription received (any outcome)."""
        with self._lock:
            return self._activate_calls[subscription_id]

    def last_request(self, kind: str | None = None) -> dict[str, Any] | None:
        """The latest recorded request (optionally of one route kind): method, path, kind, headers
        (as sent, lower-case names), status, and for API calls the effective requestId/correlationId."""
        with self._lock:
            return next((entry for entry in reversed(self.last_requests) if kind in (None, entry["kind"])), None)

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "subscriptions": len(self._subscriptions),
                "subscriptionsByStatus": dict(Counter(s["saasSubscriptionStatus"] for s in self._subscriptions.values())),
                "operations": len(self._operations),
                "operationsByStatus": dict(Counter(op["status"] for op in self._operations.values())),
                "patches": len(self.patches),
                "deliveries": len(self.webhook_deliveries),
                "activateCalls": sum(self._activate_calls.values()),
                "calls": dict(self.calls),
                "faults": len(self._faults),
                "knobs": {name: getattr(self, name) for name in KNOB_DEFAULTS},
            }

    # ---- internal state helpers ------------------------------------------------------------------

    def _require_subscription(self, subscription_id: str) -> dict[str, Any]:
        try:
            return self._subscriptions[subscription_id]
        except KeyError:
            raise KeyError(f"unknown subscription {subscription_id}") from None

    def _require_operation(self, operation_id: str) -> dict[str, Any]:
        try:
            return self._operations[operation_id]
        except KeyError:
            raise KeyError(f"unknown operation {operation_id}") from None

    def _plans_for(self, offer_id: str) -> dict[str, dict[str, Any]]:
        if offer_id not in self._plans:
            self._plans[offer_id] = {plan["planId"]: plan for plan in default_plans()}
        return self._plans[offer_id]

    def _require_plan(self, offer_id: str, plan_id: str) -> dict[str, Any]:
        plan = self._plans_for(offer_id).get(plan_id)
        if plan is None:
            raise ValueError(f"plan {plan_id!r} is not in the catalogue of offer {offer_id!r} (see set_plans)")
        return plan

    def _new_subscription(
        self,
        offer_id: str,
        plan_id: str,
        quantity: Any,
        *,
        status: str,
        name: str | None = None,
        purchaser: dict[str, str] | None = None,
        beneficiary: dict[str, str] | None = None,
        term_unit: str = "P1M",
        is_free_trial: bool = False,
        created: str | None = None,
    ) -> dict[str, Any]:
        plan = self._require_plan(offer_id, plan_id)
        seats = _quantity(quantity)
        if seats is None and plan["isPricePerSeat"]:
            seats = plan["minQuantity"] or 1
        purchaser = purchaser or make_identity()
        subscription_id = _new_id()
        created = created or _timestamp()
        subscription: dict[str, Any] = {
            "id": subscription_id,
            "publisherId": self.publisher_id,
            "offerId": offer_id,
            "name": name or f"Subscription {subscription_id[:8]}",
            "saasSubscriptionStatus": status,
            "beneficiary": dict(beneficiary or purchaser),
            "purchaser": dict(purchaser),
            "planId": plan_id,
            "quantity": seats,  # absent for plans that are not priced per seat
            "term": {"termUnit": term_unit, "chargeDuration": None},
            "autoRenew": True,
            "isTest": False,
            "isFreeTrial": is_free_trial,
            "allowedCustomerOperations": ["Delete", "Update", "Read"],
            "sandboxType": "None",
            "sessionMode": "None",
            "created": created,
            "lastModified": created,
        }
        if seats is None:
            del subscription["quantity"]
        self._ensure_term(subscription)
        return subscription

    def _add_subscription(self, subscription: dict[str, Any]) -> None:
        self._subscriptions[subscription["id"]] = subscription
        self._order.append(subscription["id"])

    def _issue_token(self, subscription_id: str, ttl_seconds: float) -> str:
        token = _opaque_token()
        self._tokens[token] = (subscription_id, time.time() + ttl_seconds)
        return token

    @staticmethod
    def _ensure_term(subscription: dict[str, Any]) -> None:
        """Active subscriptions have term dates; PendingFulfillmentStart ones do not (§5.1)."""
        if subscription["saasSubscriptionStatus"] in (SUBSCRIBED, SUSPENDED) and not subscription["term"].get("startDate"):
            _set_term(subscription, _today())

    def _new_operation(
        self,
        subscription: dict[str, Any],
        action: str,
        source: str,
        status: str,
        *,
        plan_id: str | None = None,
        quantity: int | None = None,
    ) -> dict[str, Any]:
        operation = {
            "id": _new_id(),
            "activityId": _new_id(),
            "subscriptionId": subscription["id"],
            "offerId": subscription["offerId"],
            "publisherId": subscription["publisherId"],
            "planId": plan_id or subscription["planId"],
            "quantity": quantity if quantity is not None else subscription.get("quantity"),
            "action": action,
            "timeStamp": _timestamp(),
            "status": status,
            "operationRequestSource": source,
            "errorStatusCode": "",
            "errorMessage": "",
        }
        self._operations[operation["id"]] = operation
        self._operations_by_subscription[subscription["id"]].append(operation["id"])
        # Partner operations are announced when they have succeeded (see _complete_partner_operation).
        self._webhook_status[operation["id"]] = SUCCEEDED if source == "Partner" else status
        return operation

    def _validate_trigger(
        self, subscription: dict[str, Any], action: str, plan_id: str | None, quantity: Any
    ) -> tuple[str | None, int | None]:
        if action == "ChangePlan":
            if not plan_id:
                raise ValueError("ChangePlan needs plan_id")
            self._require_plan(subscription["offerId"], plan_id)
        if action == "ChangeQuantity" and _quantity(quantity) is None:
            raise ValueError("ChangeQuantity needs quantity")
        if action not in ACKED_ACTIONS | {"Suspend", "Unsubscribe", "Renew", "Subscribe"}:
            logger.warning("Unknown action %r: sent as a notification that changes nothing", action)
        return plan_id, _quantity(quantity)

    def _apply(self, subscription: dict[str, Any], operation: dict[str, Any]) -> None:
        """Make the subscription reflect a succeeded operation."""
        action = operation["action"]
        if action == "ChangePlan":
            plan = self._plans_for(subscription["offerId"]).get(operation["planId"], {})
            subscription["planId"] = operation["planId"]
            if plan.get("isPricePerSeat") and subscription.get("quantity") is None:
                subscription["quantity"] = plan.get("minQuantity") or 1
        elif action == "ChangeQuantity":
            subscription["quantity"] = operation["quantity"]
        elif action in ("Reinstate", "Subscribe"):
            subscription["saasSubscriptionStatus"] = SUBSCRIBED
        elif action == "Suspend":
            subscription["saasSubscriptionStatus"] = SUSPENDED
        elif action == "Unsubscribe":
            subscription["saasSubscriptionStatus"] = UNSUBSCRIBED
        elif action == "Renew":
            end = subscription["term"].get("endDate")
            _set_term(subscription, date.fromisoformat(end[:10]) + timedelta(days=1) if end else _today())
        self._ensure_term(subscription)
        subscription["lastModified"] = _timestamp()

    def _settle(self, operation_id: str, success: bool) -> bool:
        """Finish an InProgress operation (applying it on success); False if it was already settled."""
        with self._lock:
            operation = self._operations.get(operation_id)
            if operation is None or operation["status"] != IN_PROGRESS:
                return False
            if success:
                self._apply(self._subscriptions[operation["subscriptionId"]], operation)
            operation["status"] = SUCCEEDED if success else FAILED
            return True

    def _auto_accept(self, operation_id: str) -> None:
        if self._settle(operation_id, success=True):
            logger.info("Operation %s auto-accepted (nobody PATCHed it in time)", operation_id)

    def _complete_partner_operation(self, operation_id: str) -> None:
        outcome = self.partner_outcome
        if outcome in ("fail", "conflict"):
            with self._lock:
                operation = self._operations.get(operation_id)
                if operation is None or operation["status"] != IN_PROGRESS:
                    return
                operation["status"] = FAILED if outcome == "fail" else "Conflict"
                operation["errorStatusCode"] = "400" if outcome == "fail" else "409"
                operation["errorMessage"] = (
                    "The requested plan change could not be completed by the billing system"
                    if outcome == "fail"
                    else "A newer update of this subscription was already fulfilled"
                )
            logger.info("Operation %s ended %s (partner_outcome=%s)", operation_id, operation["status"], outcome)
            return
        if self._settle(operation_id, success=True) and self.partner_webhook:
            self._deliver_later(operation_id)

    def _finish_activation(self, subscription_id: str) -> None:
        with self._lock:
            self._activating.discard(subscription_id)
            subscription = self._subscriptions.get(subscription_id)
            if subscription is None or subscription["saasSubscriptionStatus"] != PENDING:
                return
            if self.activation_outcome != "fail":
                self._activate_now(subscription)
                return
            operation = self._new_operation(subscription, "Unsubscribe", "Azure", SUCCEEDED)
            self._apply(subscription, operation)
        logger.info("Activation of %s failed (activation_outcome=fail): Unsubscribe sent", subscription_id)
        self._deliver_later(operation["id"])

    @staticmethod
    def _activate_now(subscription: dict[str, Any]) -> None:
        subscription["saasSubscriptionStatus"] = SUBSCRIBED
        _set_term(subscription, _today())
        subscription["lastModified"] = _timestamp()

    def _has_pending_operation(self, subscription_id: str) -> bool:
        return any(
            self._operations[op_id]["status"] == IN_PROGRESS
            for op_id in self._operations_by_subscription.get(subscription_id, ())
        )

    # ---- webhook delivery ----------------------------------------------------------------------

    def _deliver_later(self, operation_id: str) -> None:
        """Deliver on the worker pool after ``webhook_delay`` (used by asynchronous completions)."""

        def submit() -> None:
            try:
                self._delivery_pool.submit(self._deliver_logged, operation_id)
            except RuntimeError:  # pool shut down by stop()
                pass

        self._later(self.webhook_delay, submit)

    def _deliver_logged(self, operation_id: str) -> None:
        try:
            self.deliver(operation_id)
        except Exception:
            logger.exception("Delivering the webhook of operation %s failed", operation_id)

    def _post_with_retries(self, url: str, operation_id: str, body: bytes) -> int | None:
        status: int | None = None
        for attempt in range(int(self.webhook_retries) + 1):
            if attempt:
                time.sleep(self.webhook_retry_delay_seconds)
            status = self._post_webhook(url, body)
            with self._deliveries_changed:
                self.webhook_deliveries.append((operation_id, status))
                self._deliveries_changed.notify_all()
            if status is not None and status < 500:
                break
        return status

    def _webhook_bearer(self) -> str:
        """Entra issues one token per hour and Microsoft reuses it; so does the stand-in (RSA is slow)."""
        cache_key = (self.webhook_token_version, self._signing_key.kid, self.audience, self.tenant_id)
        with self._lock:
            token, expires = self._webhook_tokens.get(cache_key, ("", 0.0))
            if expires - time.time() > 300:
                return token
        token = self.sign_token(version=self.webhook_token_version)
        with self._lock:
            self._webhook_tokens[cache_key] = (token, jwt.decode(token, options={"verify_signature": False})["exp"])
        return token

    def _post_webhook(self, url: str, body: bytes) -> int | None:
        token = self._webhook_bearer()
        request = urllib.request.Request(
            url, data=body, method="POST", headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        )
        try:
            with _NO_PROXY_OPENER.open(request, timeout=self.webhook_timeout_seconds) as response:
                response.read()
                return response.status
        except urllib.error.HTTPError as error:
            error.read()
            return error.code
        except OSError as error:  # URLError, timeouts, refused connections
            logger.warning("Webhook POST to %s failed: %s", url, error)
            return None

    def _after_delivery(self, operation_id: str, status: int | None) -> None:
        """A 4xx answer to an InProgress ChangePlan/ChangeQuantity rejects it (§7.3)."""
        if status is None or not 400 <= status < 500:
            return
        with self._lock:
            operation = self._operations.get(operation_id)
            if operation and operation["action"] in AUTO_ACCEPTED_ACTIONS and self._settle(operation_id, success=False):
                logger.info("Operation %s rejected by a %d webhook answer", operation_id, status)

    # ---- HTTP dispatch -------------------------------------------------------------------------

    def handle(self, request: _Request) -> _Response:
        """Answer one HTTP request (called by the server threads)."""
        try:
            if request.path.startswith("/_control/"):
                return self._handle_control(request)
            if request.path.startswith("/api/"):
                return self._handle_api(request)
            return self._handle_identity(request)
        except ApiError as error:
            return error.response()
        except Exception:
            logger.exception("Stand-in failed on %s %s", request.method, request.path)
            return ApiError(500, "InternalServerError", "The stand-in failed; see its log").response()

    def _record(self, request: _Request, kind: str) -> dict[str, Any]:
        entry = {
            "method": request.method,
            "path": request.path_and_query,
            "kind": kind,
            "headers": dict(request.headers),
            "status": None,
            "at": _timestamp(),
        }
        if kind in ("usage_event", "batch_usage_event"):
            entry["body"] = request.body.decode("utf-8", "replace")  # what was billed, as sent on the wire
        with self._lock:
            self.calls[kind] += 1
            self.last_requests.append(entry)
        return entry

    def _handle_api(self, request: _Request) -> _Response:
        route, params = _match(API_ROUTES, request.method, request.path[len("/api") :])
        entry = self._record(request, route.kind if route else "unknown")
        request_id = request.headers.get("x-ms-requestid") or _new_id()
        correlation_id = request.headers.get("x-ms-correlationid") or _new_id()
        entry.update(requestId=request_id, correlationId=correlation_id)
        if self.latency_seconds:
            time.sleep(self.latency_seconds)
        fault = self._take_fault(request)
        try:
            if fault and not fault.process:
                raise fault.error()
            response = self._call_api(request, route, params)
            if fault:
                raise fault.error()
        except ApiError as error:
            response = error.response()
        response.headers.update({"x-ms-requestid": request_id, "x-ms-correlationid": correlation_id})
        entry["status"] = response.status
        return response

    def _call_api(self, request: _Request, route: _Route | None, params: dict[str, str]) -> _Response:
        if request.query.get("api-version") != API_VERSION:
            raise _bad_request(
                f"Invalid api-version. The supported version is {API_VERSION}", "api-version", code="InvalidApiVersion"
            )
        authorization = request.headers.get("authorization", "")
        if self.require_bearer and not (authorization.lower().startswith("bearer ") and authorization[7:].strip()):
            raise ApiError(401, "Unauthorized", "A bearer token is required", "authorization")
        if route is None:
            raise ApiError(404, "NotFound", f"No API at {request.method} {request.path}", "path")
        return getattr(self, route.handler)(request, **params)

    def _handle_identity(self, request: _Request) -> _Response:
        route, params = _match(IDENTITY_ROUTES, request.method, request.path)
        entry = self._record(request, route.kind if route else "unknown")
        fault = self._take_fault(request) if route else None
        if route is None:
            response = ApiError(404, "NotFound", f"Nothing at {request.path}", "path").response()
        elif fault:
            response = fault.error().response()
        else:
            response = getattr(self, route.handler)(request, **params)
        entry["status"] = response.status
        return response

    def _handle_control(self, request: _Request) -> _Response:
        route, params = _match(CONTROL_ROUTES, request.method, request.path)
        if route is None:
            raise ApiError(404, "NotFound", f"No control endpoint at {request.method} {request.path}", "path")
        try:
            result = getattr(self, route.handler)(request, **params)
        except KeyError as error:
            raise ApiError(404, "NotFound", str(error.args[0] if error.args else error), "") from None
        except (ValueError, TypeError) as error:
            raise _bad_request(str(error)) from None
        return result if isinstance(result, _Response) else _Response(200, result)

    # ---- fulfillment API handlers ----------------------------------------------------------------

    # ---- metering (usageEvent, batchUsageEvent, usageEvents) -------------------------------------

    def _usage_result(self, event: Any) -> tuple[str, dict[str, Any]]:
        """(status, item) for one usage event, recording it when Accepted (lock held).

        Shapes as Microsoft documents them: a success item is ``{usageEventId, status: Accepted,
        messageTime, resourceId, quantity, dimension, effectiveStartTime, planId}``; an error item
        is ``{status, messageTime, <key fields>, error: {message, code, additionalInfo}}`` with no
        ``usageEventId``, and for a Duplicate what Microsoft kept is in
        ``error.additionalInfo.acceptedMessage``."""
        item: dict[str, Any] = {
            "messageTime": _timestamp(self.usage_clock()),
            "resourceId": "",
            "quantity": None,
            "dimension": "",
            "effectiveStartTime": "",
            "planId": "",
        }
        if not isinstance(event, dict):
            return "BadArgument", {
                "status": "BadArgument",
                **item,
                "error": {"code": "BadArgument", "message": "The event must be an object", "additionalInfo": {}},
            }
        resource_id = str(event.get("resourceId") or "")
        dimension = str(event.get("dimension") or "")
        plan_id = str(event.get("planId") or "")
        quantity = event.get("quantity")
        started_text = str(event.get("effectiveStartTime") or "")
        item.update(resourceId=resource_id, quantity=quantity, dimension=dimension, planId=plan_id)
        item["effectiveStartTime"] = started_text

        def refuse(
            status: str, message: str, code: str = "", accepted: dict[str, Any] | None = None
        ) -> tuple[str, dict[str, Any]]:
            info = {"acceptedMessage": accepted} if accepted is not None else {}
            return status, {
                "status": status,
                **item,
                "error": {"code": code or status, "message": message, "additionalInfo": info},
            }

        if self._usage_item_errors > 0 or (self.usage_error_rate and self._usage_random.random() < self.usage_error_rate):
            self._usage_item_errors = max(0, self._usage_item_errors - 1)
            self.usage_item_errors_answered += 1
            return refuse("Error", "An internal error occurred while processing the usage event", code="InternalServerError")
        try:
            started = datetime.fromisoformat(started_text.replace("Z", "+00:00"))
        except ValueError:
            return refuse("BadArgument", "effectiveStartTime is not a date-time")
        if started.tzinfo is None:
            started = started.replace(tzinfo=UTC)
        if not resource_id or not dimension or not plan_id:
            return refuse("BadArgument", "resourceId, dimension and planId are required")
        if (
            isinstance(quantity, bool)
            or not isinstance(quantity, (int, float, Decimal))
            or not quantity > 0
            or quantity != quantity
        ):
            return refuse("InvalidQuantity", "The quantity must be a number greater than 0")
        now = self.usage_clock()
        if started > now:
            return refuse("BadArgument", "effectiveStartTime is in the future")
        if now - started > USAGE_WINDOW:
            return refuse("Expired", "effectiveStartTime is older than 24 hours")
        subscription = self._subscriptions.get(resource_id)
        if subscription is None:
            return refuse("ResourceNotFound", f"Resource {resource_id} was not found")
        if subscription["saasSubscriptionStatus"] != SUBSCRIBED:
            return refuse("ResourceNotActive", f"Resource {resource_id} is {subscription['saasSubscriptionStatus']}")
        if plan_id != subscription["planId"]:
            return refuse("BadArgument", f"Plan {plan_id} is not the plan of resource {resource_id}")
        plan = self._plans_for(subscription["offerId"]).get(plan_id, {})
        dimensions = {d.get("id") for d in (plan.get("planComponents") or {}).get("meteringDimensions") or []}
        if dimensions and dimension not in dimensions:
            return refuse("InvalidDimension", f"Dimension {dimension} is not defined for plan {plan_id}")
        hour = started.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        key = (resource_id.lower(), dimension, hour.isoformat())
        accepted = self.usage_events.get(key)
        if accepted is not None:
            kept = {**accepted, "status": "Duplicate"}
            return refuse("Duplicate", "This usage event already exist.", code="Conflict", accepted=kept)
        accepted = {
            "usageEventId": _new_id(),
            "status": "Accepted",
            **item,
            "quantity": quantity if isinstance(quantity, Decimal) else Decimal(str(quantity)),
            "effectiveStartTime": _timestamp(started),
        }
        self.usage_events[key] = accepted
        self._usage_offers[key] = subscription["offerId"]
        self._usage_submissions[key] = self._usage_submissions.get(key, 0) + 1
        return "Accepted", accepted

    def fail_usage_items(self, count: int) -> None:
        """The next ``count`` usage events answer a per-item ``Error`` (nothing recorded)."""
        with self._lock:
            self._usage_item_errors += count

    def _ordered(self, items: list[Any]) -> list[Any]:
        """Results in request order, or not: Microsoft's documentation does not promise the order."""
        if self.usage_result_order == "reversed":
            return list(reversed(items))
        if self.usage_result_order == "shuffled":
            shuffled = list(items)
            self._usage_random.shuffle(shuffled)
            return shuffled
        return items

    def _metering_route(self) -> None:
        if not self.metering_routes:  # as Microsoft's SaaS API emulator: no metering API at all
            raise ApiError(404, "NotFound", "Resource not found", "path")

    def _api_usage_event(self, request: _Request) -> _Response:
        self._metering_route()
        with self._lock:
            status, item = self._usage_result(_exact_json(request))
        if status == "Accepted":
            return _Response(200, item)
        if status == "Duplicate":
            # The single event answers 409 with what Microsoft kept under additionalInfo.acceptedMessage.
            return _Response(
                409,
                {
                    "additionalInfo": item["error"]["additionalInfo"],
                    "message": "This usage event already exist.",
                    "code": "Conflict",
                },
            )
        error = item.get("error", {})
        raise _bad_request(error.get("message", status), "usageEvent", code=status)

    def _api_batch_usage_event(self, request: _Request) -> _Response:
        self._metering_route()
        events = _exact_json(request).get("request")
        if not isinstance(events, list):
            raise _bad_request("request must be a list of usage events", "request")
        if len(events) > MAX_BATCH_EVENTS:
            raise _bad_request(f"A batch holds at most {MAX_BATCH_EVENTS} usage events", "request")
        with self._lock:
            results = self._ordered([self._usage_result(event)[1] for event in events])
            if self.usage_answer_rewrite is not None:
                results = self.usage_answer_rewrite(results)
        return _Response(200, {"count": len(results), "result": results})

    def _api_usage_events(self, request: _Request) -> _Response:
        """Daily aggregates per (resource, dimension, plan, day), as Microsoft's read-back answers."""
        self._metering_route()
        query = {name.lower(): value for name, value in request.query.items()}

        def day_of(name: str) -> date | None:
            text = query.get(name.lower(), "")
            if not text:
                return None
            try:
                return datetime.fromisoformat(text.replace("Z", "+00:00")[:10]).date()
            except ValueError:
                raise _bad_request(f"{name} is not a date", name) from None

        start, end = day_of("usageStartDate"), day_of("UsageEndDate")
        if start is None:
            raise _bad_request("usageStartDate is required", "usageStartDate")
        with self._lock:
            days: dict[tuple[str, str, str, str], dict[str, Any]] = {}
            for key, event in self.usage_events.items():
                resource, dimension, hour_text = key
                day = datetime.fromisoformat(hour_text).date()
                if day < start or (end is not None and day > end):
                    continue
                plan_id = event["planId"]
                offer_id = self._usage_offers.get(key, "")
                row = days.setdefault(
                    (resource, dimension, plan_id, day.isoformat()),
                    {
                        "usageDate": f"{day.isoformat()}T00:00:00Z",
                        "usageResourceId": resource,
                        "dimension": dimension,
                        "planId": plan_id,
                        "planName": plan_id,
                        "offerId": offer_id,
                        "offerName": offer_id,
                        "offerType": "SaaS",
                        "azureSubscriptionId": "",
                        "reconStatus": "Accepted",
                        "submittedQuantity": Decimal(0),
                        "processedQuantity": Decimal(0),
                        "submittedCount": 0,
                    },
                )
                row["submittedQuantity"] += event["quantity"]
                row["processedQuantity"] += event["quantity"]
                row["submittedCount"] += self._usage_submissions.get(key, 1)
            items = []
            for (resource, dimension, _, day_text), row in sorted(days.items()):
                row.update(self.usage_recon.get((resource, dimension, day_text), {}))
                if all(
                    query.get(name) in (None, "", row[name_in_row])
                    for name, name_in_row in (
                        ("offerid", "offerId"),
                        ("planid", "planId"),
                        ("dimension", "dimension"),
                        ("reconstatus", "reconStatus"),
                    )
                ):
                    items.append(row)
            items = self._ordered(items)
        return _Response(200, items)

    def accepted_usage(self, resource_id: str | None = None) -> list[dict[str, Any]]:
        """Every accepted usage event (of one resource), oldest hour first."""
        with self._lock:
            return [
                copy.deepcopy(event)
                for (resource, _, _), event in sorted(self.usage_events.items(), key=lambda kv: kv[0][2])
                if resource_id is None or resource == resource_id.lower()
            ]

    def _api_resolve(self, request: _Request) -> _Response:
        token = request.headers.get("x-ms-marketplace-token")
        if not token:
            raise _bad_request("Mandatory header missing", "x-ms-marketplace-token", code="HeaderNotPresent")
        with self._lock:
            subscription_id, expires = self._tokens.get(token, (None, 0.0))
            if subscription_id is None or expires <= time.time():
                raise _bad_request("The marketplace token is invalid or expired", "x-ms-marketplace-token", code="InvalidValue")
            subscription = copy.deepcopy(self._subscriptions[subscription_id])
        resolved = {
            "id": subscription["id"],
            "subscriptionName": subscription["name"],
            "offerId": subscription["offerId"],
            "planId": subscription["planId"],
        }
        if "quantity" in subscription:
            resolved["quantity"] = subscription["quantity"]
        resolved["subscription"] = subscription
        return _Response(200, resolved)

    def _api_activate(self, request: _Request, sid: str) -> _Response:
        body = request.json()
        with self._lock:
            self._activate_calls[sid] += 1
            subscription = self._subscriptions.get(sid)
            if subscription is None or subscription["saasSubscriptionStatus"] == UNSUBSCRIBED:
                raise _not_found(f"Subscription {sid}", "subscriptionId")
            status = subscription["saasSubscriptionStatus"]
            if status in (SUBSCRIBED, SUSPENDED):
                raise _bad_request(f"Subscription {sid} is already {status}", "subscriptionId")
            if body.get("planId") not in (None, "", subscription["planId"]):
                raise _bad_request("The plan id should match the purchased plan id", "planId")
            if sid in self._activating:
                return _Response(200)
            if self.activation_delay_seconds or self.activation_outcome == "fail":
                self._activating.add(sid)
                self._later(self.activation_delay_seconds, self._finish_activation, sid)
            else:
                self._activate_now(subscription)
        logger.info("Activate %s accepted", sid)
        return _Response(200)

    def _api_list(self, request: _Request) -> _Response:
        token = request.query.get("continuationToken") or ""
        with self._lock:
            if not self._order:
                return _Response(200)  # the real API answers an empty body, not {"subscriptions": []}
            offset = self._continuations.get(token) if token else 0
            if offset is None:
                raise _bad_request("Invalid continuation token", "continuationToken", code="InvalidValue")
            page_end = offset + int(self.page_size)
            page = [self._subscriptions[sid] for sid in self._order[offset:page_end]]
            next_link = self._next_link(page_end) if page_end < len(self._order) else ""
            # Serialise under the lock: a consistent snapshot without deep copies.
            body = json.dumps({"subscriptions": page, "@nextLink": next_link}).encode()
        return _Response(200, body, {"Content-Type": "application/json; charset=utf-8"})

    def _next_link(self, offset: int) -> str:
        token = self._continuation_by_offset.get(offset)
        if token is None:
            token = _opaque_token()
            self._continuation_by_offset[offset] = token
            self._continuations[token] = offset
        return f"{self.api_base_url}/saas/subscriptions?continuationToken={quote(token, safe='')}&api-version={API_VERSION}"

    def _api_get(self, request: _Request, sid: str) -> _Response:
        with self._lock:
            subscription = self._subscriptions.get(sid)
            if subscription is None:
                raise _not_found(f"Subscription {sid}", "subscriptionId")
            return _Response(200, json.dumps(subscription).encode(), {"Content-Type": "application/json; charset=utf-8"})

    def _api_list_plans(self, request: _Request, sid: str) -> _Response:
        with self._lock:
            subscription = self._subscriptions.get(sid)
            if subscription is None:
                return _Response(200)  # documented: empty body for an unknown subscription
            plans = [
                copy.deepcopy(plan)
                for plan in self._plans_for(subscription["offerId"]).values()
                if request.query.get("planId") in (None, "", plan["planId"])
            ]
        return _Response(200, {"plans": plans})

    def _api_update(self, request: _Request, sid: str) -> _Response:
        body = request.json()
        with self._lock:
            subscription = self._subscriptions.get(sid)
            if subscription is None:
                raise _not_found(f"Subscription {sid}", "subscriptionId")
            plan_id, quantity = self._validate_update(subscription, body)
            if self._has_pending_operation(sid):
                raise _bad_request(
                    "Patch cannot be completed because the subscription is locked due to pending operations",
                    "update",
                    code="Failed",
                )
            action = "ChangePlan" if plan_id else "ChangeQuantity"
            operation = self._new_operation(subscription, action, "Partner", IN_PROGRESS, plan_id=plan_id, quantity=quantity)
        return self._accepted(operation)

    def _validate_update(self, subscription: dict[str, Any], body: dict[str, Any]) -> tuple[str | None, int | None]:
        plan_id = body.get("planId") or None
        has_quantity = body.get("quantity") not in (None, "")
        if plan_id and has_quantity:
            raise _bad_request("Cannot patch more than one field in the same request", "update")
        if not plan_id and not has_quantity:
            raise _bad_request("The request content is null: planId or quantity is required", "update")
        if subscription["saasSubscriptionStatus"] != SUBSCRIBED:
            raise _bad_request("Subscription is not active", "update")
        if "Update" not in subscription.get("allowedCustomerOperations", ()):
            raise _bad_request("Update is not an allowed customer operation for this subscription", "update")
        plans = self._plans_for(subscription["offerId"])
        if plan_id:
            if plan_id not in plans:
                raise _bad_request("Request Plan is NOT in Catalog.", "planId")
            if plan_id == subscription["planId"]:
                raise _bad_request(
                    f"SaaS subscription {subscription['name']} is already subscribed to plan "
                    f"{plan_id}. Changing plans only supported between two different plans",
                    "planId",
                )
            return plan_id, None
        return None, self._validate_quantity(plans.get(subscription["planId"], {}), subscription, body["quantity"])

    @staticmethod
    def _validate_quantity(plan: dict[str, Any], subscription: dict[str, Any], raw: Any) -> int:
        try:
            quantity = _quantity(raw)
        except (TypeError, ValueError):
            raise _bad_request("Invalid quantity value", "quantity") from None
        if not plan.get("isPricePerSeat"):
            raise _bad_request(f"Plan {subscription['planId']} is not priced per seat", "quantity")
        low, high = plan.get("minQuantity") or 1, plan.get("maxQuantity") or 1_000_000
        if quantity is None or not low <= quantity <= high:
            raise _bad_request(f"Quantity must be between {low} and {high}", "quantity")
        if quantity == _quantity(subscription.get("quantity")):
            raise _bad_request("New quantity is the same as on the subscription", "quantity")
        return quantity

    def _api_delete(self, request: _Request, sid: str) -> _Response:
        with self._lock:
            subscription = self._subscriptions.get(sid)
            if subscription is None:
                raise _not_found(f"Subscription {sid}", "subscriptionId")
            if subscription["saasSubscriptionStatus"] == UNSUBSCRIBED:
                raise _bad_request(f"Subscription {sid} is already Unsubscribed", "subscriptionId")
            if "Delete" not in subscription.get("allowedCustomerOperations", ()):
                raise _bad_request("Delete is not an allowed customer operation for this subscription", "delete")
            if self._has_pending_operation(sid):
                raise ApiError(409, "Conflict", "The subscription is locked due to pending operation(s)", "delete")
            operation = self._new_operation(subscription, "Unsubscribe", "Partner", IN_PROGRESS)
        return self._accepted(operation)

    def _accepted(self, operation: dict[str, Any]) -> _Response:
        """202 for a Partner operation, completed (and announced) after ``operation_delay_seconds``."""
        self._later(self.operation_delay_seconds, self._complete_partner_operation, operation["id"])
        location = (
            f"{self.api_base_url}/saas/subscriptions/{operation['subscriptionId']}"
            f"/operations/{operation['id']}?api-version={API_VERSION}"
        )
        logger.info("%s %s accepted for %s", operation["action"], operation["id"], operation["subscriptionId"])
        return _Response(202, None, {"Operation-Location": location, "Operation-Id": operation["id"]})

    def _api_list_operations(self, request: _Request, sid: str) -> _Response:
        with self._lock:  # an unknown subscription gives an empty list (observed real behaviour)
            pending = [
                copy.deepcopy(self._operations[op_id])
                for op_id in self._operations_by_subscription.get(sid, ())
                if self._operations[op_id]["status"] == IN_PROGRESS
            ]
        return _Response(200, {"operations": pending})

    def _operation_of(self, sid: str, oid: str) -> dict[str, Any]:
        operation = self._operations.get(oid)
        if operation is None or operation["subscriptionId"] != sid:
            raise _not_found(f"Operation {oid}", "operationId")
        return operation

    def _api_get_operation(self, request: _Request, sid: str, oid: str) -> _Response:
        with self._lock:
            return _Response(200, copy.deepcopy(self._operation_of(sid, oid)))

    def _api_patch_operation(self, request: _Request, sid: str, oid: str) -> _Response:
        record: dict[str, Any] = {
            "subscriptionId": sid,
            "operationId": oid,
            "status": None,
            "action": None,
            "responseStatus": None,
            "at": _timestamp(),
        }
        try:
            record["status"] = request.json().get("status")
            response = self._patch_operation(sid, oid, record)
        except ApiError as error:
            record["responseStatus"] = error.status
            raise
        finally:
            with self._lock:
                self.patches.append(record)
        record["responseStatus"] = response.status
        return response

    def _patch_operation(self, sid: str, oid: str, record: dict[str, Any]) -> _Response:
        with self._lock:
            operation = self._operation_of(sid, oid)
            record["action"] = operation["action"]
            if record["status"] not in ("Success", "Failure"):
                raise _bad_request("Expected Success or Failure", "status", code="InvalidValue")
            if operation["operationRequestSource"] == "Partner":
                raise ApiError(500, "InternalServerError", "An operation requested by the partner cannot be updated")
            if operation["status"] != IN_PROGRESS:
                raise ApiError(409, "Conflict", f"Operation {oid} is already {operation['status']}", "operationId")
            if operation["action"] not in ACKED_ACTIONS:
                raise _bad_request("Cannot update the status of an operation that doesn't require an ACK", "operation")
            self._settle(oid, success=record["status"] == "Success")
        logger.info("Operation %s PATCHed %s", oid, record["status"])
        return _Response(200)

    # ---- identity (OpenID) handlers --------------------------------------------------------------

    def _openid_metadata(self, tenant: str, version: str) -> _Response:
        v2 = version == "2.0"
        base = f"{self.url}/{tenant}"
        return _Response(
            200,
            {
                "issuer": self._issuer(version, tenant),
                "jwks_uri": f"{base}/discovery/v2.0/keys" if v2 else f"{base}/discovery/keys",
                "token_endpoint": f"{base}/oauth2/v2.0/token" if v2 else f"{base}/oauth2/token",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize" if v2 else f"{base}/oauth2/authorize",
                "response_types_supported": ["code", "id_token", "code id_token", "token id_token", "token"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
                "tenant_region_scope": "EU",
            },
        )

    def _openid_v2(self, request: _Request, tenant: str) -> _Response:
        return self._openid_metadata(tenant, "2.0")

    def _openid_v1(self, request: _Request, tenant: str) -> _Response:
        return self._openid_metadata(tenant, "1.0")

    def _jwks(self, request: _Request, tenant: str) -> _Response:
        return _Response(200, self.jwks(tenant))

    # ---- control handlers ------------------------------------------------------------------------

    def _with_landing_url(self, purchase: dict[str, str]) -> dict[str, str]:
        landing = self.landing_url(purchase["token"])
        return {**purchase, "landingUrl": landing} if landing else purchase

    def _control_purchase(self, request: _Request) -> dict[str, Any]:
        return self._with_landing_url(self.create_purchase(**_snake_keys(request.json())))

    def _control_seed(self, request: _Request) -> dict[str, Any]:
        return {"subscriptionIds": self.seed(**_snake_keys(request.json()))}

    def _control_get_subscription(self, request: _Request, sid: str) -> dict[str, Any]:
        return {**self.get_subscription(sid), "activateCalls": self.activation_count(sid), "operations": self.operations_for(sid)}

    def _control_set_subscription(self, request: _Request, sid: str) -> dict[str, Any]:
        return self.set_subscription(sid, **request.json())

    def _control_new_token(self, request: _Request, sid: str) -> dict[str, Any]:
        return self._with_landing_url(self.new_token(sid, **_snake_keys(request.json())))

    def _control_trigger(self, request: _Request, sid: str) -> dict[str, Any]:
        args = _snake_keys(request.json())
        before = len(self.webhook_deliveries)
        operation = self.trigger(sid, **args)
        statuses = [status for op_id, status in self.webhook_deliveries[before:] if op_id == operation["id"]]
        return {**operation, "webhookStatusCodes": statuses}

    def _control_expire_token(self, request: _Request) -> dict[str, Any]:
        self.expire_token(request.json()["token"])
        return {"expired": True}

    def _control_deliver(self, request: _Request, oid: str) -> dict[str, Any]:
        self._require_operation(oid)
        return {"statusCodes": self.deliver(oid, **_snake_keys(request.json()))}

    def _control_plans(self, request: _Request) -> dict[str, Any]:
        body = request.json()
        self.set_plans(body["offerId"], body["plans"])
        return {"offerId": body["offerId"], "plans": [plan["planId"] for plan in body["plans"]]}

    def _control_faults(self, request: _Request) -> dict[str, Any]:
        settings = _snake_keys(request.json())
        unknown = set(settings) - set(KNOB_DEFAULTS) - {"fail_next", "fail_after", "clear_faults"}
        if unknown:
            raise ValueError(f"unknown knob(s): {', '.join(sorted(unknown))}")
        if settings.pop("clear_faults", False):
            self.clear_faults()
        if "fail_next" in settings:
            self.fail_next(**_snake_keys(settings.pop("fail_next")))
        if "fail_after" in settings:
            self.fail_after(**_snake_keys(settings.pop("fail_after")))
        for name, value in settings.items():
            setattr(self, name, value)
        return self.state()

    def _control_jwt(self, request: _Request) -> dict[str, Any]:
        body = request.json()
        return {"token": self.sign_token(body.get("claims"), version=body.get("version", "2.0"))}

    def _control_rotate_key(self, request: _Request) -> dict[str, Any]:
        return {"kid": self.rotate_key(**_snake_keys(request.json()))}

    def _control_reset(self, request: _Request) -> dict[str, Any]:
        self.reset()
        return {"reset": True}

    def _control_state(self, request: _Request) -> dict[str, Any]:
        return self.state()

    def _control_patches(self, request: _Request) -> dict[str, Any]:
        with self._lock:
            return {"patches": list(self.patches)}

    def _control_deliveries(self, request: _Request) -> dict[str, Any]:
        with self._lock:
            return {"deliveries": [{"operationId": op_id, "statusCode": status} for op_id, status in self.webhook_deliveries]}

    def _control_requests(self, request: _Request) -> dict[str, Any]:
        with self._lock:
            return {"requests": list(self.last_requests)}


# --------------------------------------------------------------------------------------------------
# HTTP server
# --------------------------------------------------------------------------------------------------

_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], standin: MarketplaceStandIn):
        self.standin = standin
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: benchmarks make thousands of calls
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid the 40 ms delayed-ACK stall
    server_version = "MarketplaceStandIn/1.0"
    server: _Server

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        query = {name: values[0] for name, values in parse_qs(parts.query, keep_blank_values=True).items()}
        request = _Request(
            self.command, parts.path, query, self.path, {name.lower(): value for name, value in self.headers.items()}, body
        )
        response = self.server.standin.handle(request)
        payload = response.encode()
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _handle

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Local stand-in for the SaaS Fulfillment API v2.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7072)
    parser.add_argument("--webhook-url", default=None, help="where to POST webhooks, e.g. http://127.0.0.1:7071/api/webhook")
    parser.add_argument("--tenant-id", default=DEFAULT_TENANT_ID)
    parser.add_argument("--audience", default=DEFAULT_AUDIENCE)
    parser.add_argument("--publisher-id", default=DEFAULT_PUBLISHER_ID)
    parser.add_argument("--landing-url", default=None, help="landing page URL; purchases then return a landingUrl")
    parser.add_argument("--seed", type=int, default=0, help="seed this many Subscribed subscriptions")
    parser.add_argument("--require-bearer", action="store_true")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    standin = MarketplaceStandIn(
        args.host,
        args.port,
        args.webhook_url,
        args.tenant_id,
        args.audience,
        args.publisher_id,
        args.landing_url,
        require_bearer=args.require_bearer,
    )
    if args.seed:
        standin.seed(args.seed)
    with standin:
        print(f"MARKETPLACE_API_BASE_URL={standin.api_base_url}")
        print(f"WEBHOOK_OPENID_CONFIG_URL={standin.openid_config_url}")
        print(f"WEBHOOK_AUDIENCE={standin.audience}")
        print(f"MARKETPLACE_TENANT_ID={standin.tenant_id}")
        print(f"Control: POST {standin.url}/_control/purchases  (see the module docstring)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
