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


def require_marketplace_id(value: object, what: str = "subscription id") -> str:
    """``value`` as given when it is a GUID; BadRequestError naming ``what`` otherwise (the value is
    not echoed: it is attacker-controlled and may be huge)."""
    if not is_marketplace_id(value):
        raise BadRequestError(f"{what} must be a GUID", field=what)
    assert isinstance(value, str)
    return value
