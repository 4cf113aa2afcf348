"""Correlation ids and log hygiene.

A unit of work (one landing page request, one webhook, one reconciliation run) runs inside
``correlation(...)``; every log line written meanwhile carries ``[cid=...]`` and every Marketplace
call sends it as ``x-ms-correlationid``. Bearer tokens and purchase tokens are never logged; the
redacting filter is a second line of defence for accidents.
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

_correlation_id: contextvars.ContextVar[str] = contextvars.ContextVar("correlation_id", default="")

_SECRET_PATTERNS = (
    # RFC 6750 b64token; prose such as "not a Bearer token" stays readable.
    re.compile(r"(?i)(bearer\s+)(?!(?:token|tokens|scheme|auth)\b)[A-Za-z0-9\-_=\.~+/]+"),
    re.compile(r"(?i)(token=)[^&\s]+"),
    re.compile(r"(?i)(x-ms-marketplace-token['\"]?\s*[:=]\s*['\"]?)[^'\"\s,}]+"),
    re.compile(r"(eyJ[A-Za-z0-9_\-]{8,}\.)[A-Za-z0-9_\-\.]+"),
)


def new_correlation_id() -> str:
    return str(uuid.uuid4())


def current_correlation_id() -> str:
    return _correlation_id.get()


@contextmanager
def correlation(correlation_id: str | None = None) -> Iterator[str]:
    value = correlation_id or new_correlation_id()
    token = _correlation_id.set(value)
    try:
        yield value
    finally:
        _correlation_id.reset(token)


def redact(text: str) -> str:
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + "[redacted]", text)
    return text


class CorrelationFilter(logging.Filter):
    """Adds ``correlation_id`` to records, prefixes it to the message and redacts secrets."""

    def filter(self, record: logging.LogRecord) -> bool:
        cid = _correlation_id.get()
        record.correlation_id = cid
        if getattr(record, "_saas_processed", False):
            return True
        message = record.getMessage()
        if cid and "[cid=" not in message:
            message = f"[cid={cid}] {message}"
        record.msg, record.args = redact(message), ()
        record._saas_processed = True
        return True


_installed = False


def install_log_filter() -> None:
    """Install the filter on the root handlers (idempotent). Called once by the service factory."""
    global _installed
    if _installed:
        return
    root = logging.getLogger()
    filt = CorrelationFilter()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in root.handlers:
        handler.addFilter(filt)
    # The storage SDK logs every request and response header at INFO: noise, and a leak risk.
    logging.getLogger("azure").setLevel(logging.WARNING)
    _installed = True
