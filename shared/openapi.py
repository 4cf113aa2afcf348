"""The publisher API's OpenAPI 3.1 document (shared/openapi.json): the one contract the SaaS
application generates its client from, and the one the tests check every answer against.

It holds no data (no subscription, no setting, no secret): it is read once from the package and
served as it is at ``GET /api/openapi.json``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

DOCUMENT_PATH = Path(__file__).with_name("openapi.json")


@functools.cache
def document_bytes() -> bytes:
    """The document as served (read once per process)."""
    return DOCUMENT_PATH.read_bytes()


def document() -> dict[str, Any]:
    return json.loads(document_bytes())
