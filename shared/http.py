"""Helpers shared by the HTTP handlers: turning use-case results and errors into responses."""

from __future__ import annotations

import json
import logging
from typing import Any

import azure.functions as func

from shared.errors import AppError, http_status_for

log = logging.getLogger(__name__)


def json_response(status: int, body: dict, headers: dict[str, str] | None = None) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body),
        status_code=status,
        mimetype="application/json",
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", **(headers or {})},
    )


def error_response(error: BaseException, correlation_id: str) -> func.HttpResponse:
    """The single mapping of an escaped error to an HTTP answer (status from shared.errors)."""
    status = http_status_for(error)
    if isinstance(error, AppError):
        body: dict[str, Any] = {
            "error": error.code,
            "message": error.message if status < 500 else "internal problem, retry later",
        }
        if status < 500 and error.details:
            body["details"] = error.details
    else:
        log.exception("unexpected error")
        body = {"error": "internal_error", "message": "internal problem, retry later"}
    body["correlationId"] = correlation_id
    return json_response(status, body)
