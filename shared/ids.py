"""Identifiers that cross a boundary (webhook bodies, landing forms, CLI arguments, API paths).

Microsoft's subscription and operation ids are GUIDs. They become Table Storage keys and Marketplace
URL path segments, so anything else (``/``, ``..``, ``?``, quotes, control characters) is refused
where it enters: 400, nothing recorded, no outbound call.
"""

from __future__ import annotations

import re

from shared.errors import BadRequestError

MARKETPLACE_ID = _GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def is_marketplace_id(value: object) -> bool:
    return isinstance(value, str) and _GUID.fullmatch(value) is not None


def canonical_marketplace_id(value: str) -> str:
    """The one spelling of a GUID this app stores and looks up: lower case. Microsoft sends ids in
    lower case, but a caller may quote one in upper case (GUIDs are case-insensitive); every door
    (publisher API, usage API, console, CLI) goes through here so ``ABC...`` finds ``abc...``."""
    return value.lower()


def require_marketplace_id(value: object, what: str = "subscription id") -> str:
    """``value`` in its canonical (lower-case) form when it is a GUID; BadRequestError naming
    ``what`` otherwise (the value is not echoed: it is attacker-controlled and may be huge)."""
    if not is_marketplace_id(value):
        raise BadRequestError(f"{what} must be a GUID", field=what)
    assert isinstance(value, str)
    return canonical_marketplace_id(value)
