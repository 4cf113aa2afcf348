"""The one small error hierarchy of the app, and the one place that maps errors to HTTP status codes."""

from __future__ import annotations


class AppError(Exception):
    """Base of every error this app raises on purpose."""

    #: the HTTP status an HTTP handler answers with when this error escapes a use case
    http_status = 500
    #: a short code safe to show to callers (never secrets)
    code = "internal_error"

    def __init__(self, message: str = "", *, code: str = "", **details):
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.message = message or (self.__class__.__doc__ or self.code).strip()
        if code:  # a more precise code than the class's (the status stays the class's)
            self.code = code
        self.details = details


class ConfigurationError(AppError):
    """The app's settings are missing or malformed."""

    http_status = 503
    code = "configuration_error"

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration: " + "; ".join(self.problems))


class BadRequestError(AppError):
    """The caller sent input we refuse (malformed, missing, oversized)."""

    http_status = 400
    code = "bad_request"


class PayloadTooLargeError(BadRequestError):
    """The request body is larger than this endpoint accepts (webhook, publisher API, usage API)."""

    http_status = 413
    code = "payload_too_large"


class UnauthorizedError(AppError):
    """The caller did not prove who it is."""

    http_status = 401
    code = "unauthorized"


class ForbiddenError(AppError):
    """The caller is known but may not do this (e.g. a forged or swapped form token)."""

    http_status = 403
    code = "forbidden"


class NotFoundError(AppError):
    """The thing asked for does not exist."""

    http_status = 404
    code = "not_found"


class ConflictError(AppError):
    """Another writer changed the record first; re-read and retry."""

    http_status = 409
    code = "conflict"


class UnprocessableError(AppError):
    """The request is well formed but asks for something the subscription cannot do (e.g. its
    current plan, a quantity outside the plan's limits, an idempotency key reused for another body)."""

    http_status = 422
    code = "unprocessable"


class StorageUnavailableError(AppError):
    """Table Storage could not be reached or failed; nothing was written."""

    http_status = 503
    code = "storage_unavailable"


class StorageRefusedError(AppError):
    """Table Storage refused the request as invalid (a permanent 4xx, e.g. a value over its limits):
    retrying the same request cannot help, so it is not reported as an outage."""

    http_status = 500
    code = "storage_refused"


class DeadlineExceededError(AppError):
    """The request's time budget ran out before the work could finish; nothing was left half done."""

    http_status = 503
    code = "deadline_exceeded"


class MarketplaceError(AppError):
    """A call to the SaaS Fulfillment API failed.

    Carries the HTTP status, Marketplace's error code and message, and the request and correlation
    ids so operators can quote them to Microsoft support.
    """

    http_status = 502
    code = "marketplace_error"

    def __init__(
        self,
        message: str = "",
        *,
        status: int | None = None,
        error_code: str = "",
        error_message: str = "",
        request_id: str = "",
        correlation_id: str = "",
        operation: str = "",
    ):
        super().__init__(message or f"Marketplace call {operation} failed with status {status}")
        self.status = status
        self.error_code = error_code
        self.error_message = error_message
        self.request_id = request_id
        self.correlation_id = correlation_id
        self.operation = operation

    def __str__(self) -> str:
        parts = [self.message]
        if self.error_code or self.error_message:
            parts.append(f"({self.error_code}: {self.error_message})")
        parts.append(f"[request {self.request_id or '-'}, correlation {self.correlation_id or '-'}]")
        return " ".join(parts)


class MarketplaceBadRequestError(MarketplaceError):
    """400: invalid input or state, e.g. an expired purchase token or a second activation."""


class MarketplaceUnauthorizedError(MarketplaceError):
    """401/403: our token is for the wrong app or tenant; configuration is broken."""


class MarketplaceNotFoundError(MarketplaceError):
    """404: no such subscription or operation."""


class MarketplaceConflictError(MarketplaceError):
    """409: the operation was already settled differently."""


class MarketplaceThrottledError(MarketplaceError):
    """429 that outlasted our retries."""

    http_status = 503


class MarketplaceUnavailableError(MarketplaceError):
    """5xx, timeouts or connection errors that outlasted our retries."""

    http_status = 503


class UsageResultsUnmatchedError(MarketplaceUnavailableError):
    """batchUsageEvent answered for other events than those sent: an unknown answer, sent again."""


def http_status_for(error: BaseException) -> int:
    """The HTTP status a handler answers with for an error escaping a use case."""
    if isinstance(error, AppError):
        return error.http_status
    return 500
