"""Client for the SaaS Fulfillment API v2 (``requests`` + any azure-core TokenCredential).

Retries use urllib3's ``Retry`` (backoff with jitter, ``Retry-After`` honoured up to a cap, a
bounded number of attempts). Which calls may be repeated is decided per call, because a repeat is
only safe where it is proven harmless:

* GET calls and Resolve (a POST that only reads) are retried on connection errors, read
  timeouts, 429 and 5xx.
* Activate is retried the same way: a repeated Activate of a subscription that the first attempt
  already activated answers 400 (already Subscribed) and changes nothing; callers read the
  subscription back and treat "400 + Subscribed" as success. Activation is a state change, not a
  charge, so it cannot bill twice.
* PATCH operation (Success/Failure) is retried the same way: a repeat of an ACK that landed
  answers 200 or 409 (already settled) and changes nothing.
* Change plan, change quantity and delete create a new Marketplace operation each time they are
  accepted; a repeat after a lost answer could start a second operation. They are retried only
  when the request provably was not processed: connection errors before sending, and 429.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry

from shared.deadline import current_deadline
from shared.domain import (
    Operation,
    Plan,
    ResolvedPurchase,
    Subscription,
    UpdateStatus,
    UsageAggregate,
    UsageEvent,
    UsageResult,
    dumps_exact,
)
from shared.errors import (
    DeadlineExceededError,
    MarketplaceBadRequestError,
    MarketplaceConflictError,
    MarketplaceError,
    MarketplaceNotFoundError,
    MarketplaceThrottledError,
    MarketplaceUnauthorizedError,
    MarketplaceUnavailableError,
    UsageResultsUnmatchedError,
)
from shared.observability import current_correlation_id, new_correlation_id

log = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
MIN_ATTEMPT_SECONDS = 0.5
MAX_USAGE_BATCH = 25  # batchUsageEvent refuses more (400)
# The read timeout of the attempt in flight (inside a deadline), so a retry is only started if it fits.
_attempt_timeout: ContextVar[float] = ContextVar("marketplace_attempt_timeout", default=MIN_ATTEMPT_SECONDS)


class CappedRetry(Retry):
    """urllib3 Retry whose ``Retry-After`` wait is capped, so a call's total time stays bounded."""

    max_retry_after: float = 10.0

    def get_retry_after(self, response):
        try:
            value = super().get_retry_after(response)
        except InvalidHeader:  # e.g. "0.5": urllib3 would fail the call; back off as without the header
            return None
        if value is None:
            return None
        return min(value, self.max_retry_after)

    def is_retry(self, method, status_code, has_retry_after=False):
        # urllib3 also retries 413/503 that carry Retry-After even when they are not in
        # status_forcelist; only the statuses the policy lists may be repeated (PATCH/DELETE: 429).
        if self.status_forcelist is not None and status_code not in self.status_forcelist:
            return False
        return super().is_retry(method, status_code, has_retry_after)

    def new(self, **kw):
        retry = super().new(**kw)
        retry.max_retry_after = self.max_retry_after
        return retry

    def sleep(self, response=None):
        # Inside a request deadline, a wait (Retry-After or backoff) is taken only if the next
        # attempt still fits after it; otherwise the call ends now and the caller answers 5xx.
        deadline = current_deadline()
        if deadline is not None:
            wait = self.get_retry_after(response) if response is not None and self.respect_retry_after_header else None
            wait = self.get_backoff_time() if wait is None else wait
            if deadline.remaining() - wait < _attempt_timeout.get():
                raise DeadlineExceededError("no time left to retry the Marketplace call")
        super().sleep(response)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3  # retries after the first try
    backoff_factor: float = 0.5
    backoff_max: float = 8.0
    jitter: float = 0.3
    max_retry_after: float = 10.0
    connect_timeout: float = 5.0
    read_timeout: float = 20.0

    def build(self, *, repeatable: bool) -> Retry:
        retry = CappedRetry(
            total=self.attempts,
            connect=self.attempts,
            read=self.attempts if repeatable else 0,
            status=self.attempts,
            other=0,
            status_forcelist=RETRYABLE_STATUSES if repeatable else frozenset({429}),
            allowed_methods=frozenset({"GET", "POST", "PATCH", "DELETE"}),
            backoff_factor=self.backoff_factor,
            backoff_max=self.backoff_max,
            backoff_jitter=self.jitter,
            respect_retry_after_header=True,
            raise_on_status=False,
        )
        retry.max_retry_after = self.max_retry_after
        return retry


@dataclass
class CallCounter:
    """Counts Marketplace calls per operation (reported by reconciliation and benchmarks)."""

    def __post_init__(self):
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def add(self, operation: str) -> None:
        with self._lock:
            self.counts[operation] = self.counts.get(operation, 0) + 1

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())


def _error_fields(response: requests.Response) -> tuple[str, str]:
    try:
        body = response.json()
    except ValueError:
        return "", (response.text or "")[:300]
    if isinstance(body, dict):
        error = body.get("error")
        inner = error if isinstance(error, dict) else body
        return str(inner.get("code", "")), str(inner.get("message", ""))[:500]
    return "", ""


_ERRORS_BY_STATUS = {
    400: MarketplaceBadRequestError,
    401: MarketplaceUnauthorizedError,
    403: MarketplaceUnauthorizedError,
    404: MarketplaceNotFoundError,
    409: MarketplaceConflictError,
    429: MarketplaceThrottledError,
}


def operation_id_from_location(location: str) -> str:
    """The operation id is the last path segment of Operation-Location."""
    path = urlsplit(location).path.rstrip("/")
    return path.rsplit("/", 1)[-1] if path else ""


class MarketplaceClient:
    """Every call of the SaaS Fulfillment API v2."""

    def __init__(
        self,
        base_url: str,
        *,
        api_version: str = "2018-08-31",
        token_provider: Callable[[], str] | None = None,
        publisher_id: str = "",
        retry: RetryPolicy | None = None,
        counter: CallCounter | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.api_version = api_version
        self.publisher_id = publisher_id
        self.retry = retry or RetryPolicy()
        self.counter = counter or CallCounter()
        self._token_provider = token_provider
        self._sessions = {repeatable: self._session(repeatable) for repeatable in (True, False)}

    @classmethod
    def from_settings(cls, settings, **kwargs) -> MarketplaceClient:
        provider = None
        if settings.marketplace_auth == "entra":
            from shared.credentials import MARKETPLACE_SCOPE, marketplace_credential

            credential = marketplace_credential(settings)

            def provider() -> str:
                return credential.get_token(MARKETPLACE_SCOPE).token

        return cls(
            settings.marketplace_api_base_url,
            api_version=settings.marketplace_api_version,
            token_provider=provider,
            publisher_id=settings.marketplace_publisher_id,
            **kwargs,
        )

    def _session(self, repeatable: bool) -> requests.Session:
        session = requests.Session()
        adapter = HTTPAdapter(max_retries=self.retry.build(repeatable=repeatable), pool_maxsize=32)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()

    # -- transport -------------------------------------------------------------------------------

    def _request(
        self,
        operation: str,
        method: str,
        path_or_url: str,
        *,
        repeatable: bool = True,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> requests.Response:
        url = path_or_url if path_or_url.startswith(("http://", "https://")) else self.base_url + path_or_url
        params: dict[str, str] = {}
        if "api-version=" not in url:
            params["api-version"] = self.api_version
        if self.publisher_id and "publisherId=" not in url:
            params["publisherId"] = self.publisher_id
        request_id = str(uuid.uuid4())
        correlation_id = current_correlation_id() or new_correlation_id()
        all_headers = {
            "x-ms-requestid": request_id,
            "x-ms-correlationid": correlation_id,
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
        if self._token_provider is not None:
            all_headers["Authorization"] = "Bearer " + self._token_provider()
        all_headers.update(headers or {})
        connect_timeout, read_timeout = self.retry.connect_timeout, self.retry.read_timeout
        deadline = current_deadline()
        if deadline is not None:
            # Half of what is left per attempt leaves room for one retry; never less than a minimum.
            left = deadline.timeout(read_timeout, what=f"Marketplace {operation}")
            read_timeout = min(read_timeout, max(left / 2, MIN_ATTEMPT_SECONDS), left)
            connect_timeout = min(connect_timeout, read_timeout)
        token = _attempt_timeout.set(read_timeout)
        self.counter.add(operation)
        try:
            response = self._sessions[repeatable].request(
                method,
                url,
                params=params,
                headers=all_headers,
                data=None if json_body is None else dumps_exact(json_body),
                timeout=(connect_timeout, read_timeout),
            )
        except requests.RequestException as error:
            log.warning("marketplace %s failed: %s (request %s)", operation, type(error).__name__, request_id)
            raise MarketplaceUnavailableError(
                f"Marketplace {operation} could not be completed: {type(error).__name__}",
                request_id=request_id,
                correlation_id=correlation_id,
                operation=operation,
            ) from error
        finally:
            _attempt_timeout.reset(token)
        request_id = response.headers.get("x-ms-requestid", request_id)
        log.info("marketplace %s -> %s (request %s)", operation, response.status_code, request_id)
        if response.status_code in ok:
            return response
        code, message = _error_fields(response)
        status = response.status_code
        error_type = _ERRORS_BY_STATUS.get(status, MarketplaceUnavailableError if status >= 500 else MarketplaceError)
        if status in (401, 403):
            log.error(
                "marketplace refused our credentials on %s (%s): check MARKETPLACE_TENANT_ID/MARKETPLACE_CLIENT_ID "
                "against Partner Center technical configuration (request %s)",
                operation,
                status,
                request_id,
            )
        raise error_type(
            f"Marketplace {operation} answered {status}",
            status=status,
            error_code=code,
            error_message=message,
            request_id=request_id,
            correlation_id=correlation_id,
            operation=operation,
        )

    @staticmethod
    def _json(response: requests.Response, *, exact: bool = False) -> Any:
        """The body as JSON; ``exact`` reads numbers as Decimal (quantities are billed: never via a float)."""
        if not response.content or not response.content.strip():
            return None  # Microsoft answers some empty results with an empty body
        try:
            if exact:
                return json.loads(response.content, parse_float=Decimal, parse_int=Decimal)
            return response.json()
        except ValueError as error:
            raise MarketplaceUnavailableError("Marketplace answered with malformed JSON", status=response.status_code) from error

    # -- subscriptions -------------------------------------------------------------------------

    def resolve(self, purchase_token: str) -> ResolvedPurchase:
        """Resolve a landing page token (already URL-decoded once) to the subscription."""
        response = self._request(
            "resolve", "POST", "/saas/subscriptions/resolve", headers={"x-ms-marketplace-token": purchase_token}
        )
        body = self._json(response)
        if not isinstance(body, dict):
            raise MarketplaceUnavailableError("Resolve answered without a subscription", status=response.status_code)
        return ResolvedPurchase.from_api(body)

    def activate(self, subscription_id: str, plan_id: str = "", quantity: int | None = None) -> None:
        body: dict[str, Any] = {}
        if plan_id:
            body["planId"] = plan_id
        if quantity is not None:
            body["quantity"] = quantity
        self._request("activate", "POST", f"/saas/subscriptions/{subscription_id}/activate", json_body=body)

    def get_subscription(self, subscription_id: str) -> Subscription:
        body = self._json(self._request("get_subscription", "GET", f"/saas/subscriptions/{subscription_id}"))
        if not isinstance(body, dict):
            raise MarketplaceNotFoundError("Get subscription answered with an empty body", status=200)
        return Subscription.from_api(body)

    def list_subscription_pages(self, start_link: str | None = None) -> Iterator[tuple[list[Subscription], str]]:
        """Yield (subscriptions, next_link) page by page; next_link is "" on the last page."""
        link = start_link or "/saas/subscriptions"
        while link:
            body = self._json(self._request("list_subscriptions", "GET", link))
            if not isinstance(body, dict):
                return  # empty body: no subscriptions at all
            items = body.get("subscriptions") or []
            next_link = str(body.get("@nextLink") or body.get("nextLink") or "").strip()
            yield [Subscription.from_api(item) for item in items if isinstance(item, dict)], next_link
            link = next_link

    def list_subscriptions(self) -> Iterator[Subscription]:
        """Every subscription of every offer, following @nextLink transparently."""
        for page, _ in self.list_subscription_pages():
            yield from page

    def list_available_plans(self, subscription_id: str) -> list[Plan]:
        body = self._json(self._request("list_plans", "GET", f"/saas/subscriptions/{subscription_id}/listAvailablePlans"))
        if not isinstance(body, dict):
            return []
        return [Plan.from_api(item) for item in body.get("plans") or [] if isinstance(item, dict)]

    def _start_operation(self, operation: str, method: str, subscription_id: str, body: Any = None) -> str:
        response = self._request(
            operation, method, f"/saas/subscriptions/{subscription_id}", repeatable=False, json_body=body, ok=(200, 202)
        )
        location = response.headers.get("Operation-Location", "")
        return operation_id_from_location(location) or response.headers.get("Operation-Id", "")

    def change_plan(self, subscription_id: str, plan_id: str) -> str:
        """Ask Microsoft to change the plan; returns the operation id from Operation-Location."""
        return self._start_operation("change_plan", "PATCH", subscription_id, {"planId": plan_id})

    def change_quantity(self, subscription_id: str, quantity: int) -> str:
        return self._start_operation("change_quantity", "PATCH", subscription_id, {"quantity": quantity})

    def delete_subscription(self, subscription_id: str) -> str:
        return self._start_operation("delete", "DELETE", subscription_id)

    # -- operations ----------------------------------------------------------------------------

    # -- metering --------------------------------------------------------------------------------

    def batch_usage_event(self, events: list[UsageEvent]) -> list[UsageResult]:
        """Send up to MAX_USAGE_BATCH usage events; one result per event, in the order of ``events``.

        Microsoft does not promise its results in request order: each result is matched to its
        event by the key fields it repeats (resourceId, dimension, effectiveStartTime's hour,
        planId). An answer that does not match the request one to one is unknown (raised as
        unavailable: the caller sends again, which Microsoft's one event per hour makes safe).
        Quantities go out as exact JSON numbers and come back as Decimal.
        """
        if len(events) > MAX_USAGE_BATCH:
            raise ValueError(f"a batch holds at most {MAX_USAGE_BATCH} usage events")
        keys = [event.key for event in events]
        if len(set(keys)) != len(keys):
            raise ValueError("a batch holds one event per resource, dimension, hour and plan")
        body = self._json(
            self._request("batch_usage_event", "POST", "/batchUsageEvent", json_body={"request": [e.to_api() for e in events]}),
            exact=True,
        )
        items = body.get("result") if isinstance(body, dict) else None
        if not isinstance(items, list) or len(items) != len(events):
            raise MarketplaceUnavailableError("batchUsageEvent answered without one result per event", status=200)
        by_key: dict[tuple[str, str, str, str], UsageResult] = {}
        for item in items:
            result = UsageResult.from_api(item if isinstance(item, dict) else {})
            if result.key in by_key:
                raise MarketplaceUnavailableError("batchUsageEvent answered twice for one event", status=200)
            by_key[result.key] = result
        if set(by_key) != set(keys):
            log.warning(
                "batchUsageEvent results do not match the events sent (%s of %s match)", len(set(by_key) & set(keys)), len(keys)
            )
            raise UsageResultsUnmatchedError("batchUsageEvent answered for other events than those sent", status=200)
        return [by_key[key] for key in keys]

    def list_usage_aggregates(self, start: datetime, end: datetime | None = None) -> list[UsageAggregate]:
        """``GET /usageEvents``: Microsoft's daily aggregates (per resource, dimension, plan, day) from ``start``."""
        query = {"usageStartDate": start.astimezone(UTC).strftime("%Y-%m-%d")}
        if end is not None:
            query["UsageEndDate"] = end.astimezone(UTC).strftime("%Y-%m-%d")
        body = self._json(self._request("usage_events", "GET", "/usageEvents?" + urlencode(query)), exact=True)
        items = body.get("value", body.get("result")) if isinstance(body, dict) else body
        if body is None:
            return []
        if not isinstance(items, list):
            raise MarketplaceUnavailableError("usageEvents answered without a list", status=200)
        return [UsageAggregate.from_api(item) for item in items if isinstance(item, dict)]

    def list_outstanding_operations(self, subscription_id: str) -> list[Operation]:
        body = self._json(self._request("list_operations", "GET", f"/saas/subscriptions/{subscription_id}/operations"))
        if not isinstance(body, dict):
            return []
        return [Operation.from_api(item) for item in body.get("operations") or [] if isinstance(item, dict)]

    def get_operation(self, subscription_id: str, operation_id: str) -> Operation:
        body = self._json(
            self._request("get_operation", "GET", f"/saas/subscriptions/{subscription_id}/operations/{operation_id}")
        )
        if not isinstance(body, dict):
            raise MarketplaceNotFoundError("Get operation answered with an empty body", status=200)
        return Operation.from_api(body)

    def update_operation(self, subscription_id: str, operation_id: str, status: UpdateStatus) -> None:
        self._request(
            "update_operation",
            "PATCH",
            f"/saas/subscriptions/{subscription_id}/operations/{operation_id}",
            json_body={"status": UpdateStatus(status).value},
        )
