"""The signed-in buyer, as App Service Authentication (Easy Auth) hands it to the function.

Easy Auth strips these headers from client requests and sets them itself, so they are trusted only
because the platform (or, locally, the dev host) guarantees that.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.domain import clean_text

_CLAIM_ALIASES = {
    "name": ("name", "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name"),
    "email": (
        "preferred_username",
        "email",
        "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/emailaddress",
        "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/upn",
    ),
    "object_id": ("oid", "http://schemas.microsoft.com/identity/claims/objectidentifier"),
    "tenant_id": ("tid", "http://schemas.microsoft.com/identity/claims/tenantid"),
}

# Easy Auth passes the token's `roles` claim as one claim per role, under the short or the long name.
_ROLE_CLAIMS = frozenset({"roles", "http://schemas.microsoft.com/ws/2008/06/identity/claims/role"})


@dataclass(frozen=True)
class SignedInUser:
    name: str
    email: str
    object_id: str = ""
    tenant_id: str = ""
    identity_provider: str = ""
    #: app roles from the principal's role claims (the operator console's Console.Reader / Console.Operator)
    roles: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        """A stable identity for binding form tokens: the Entra object id, else the email."""
        return self.object_id or self.email.lower()

    @property
    def label(self) -> str:
        return f"{self.name} <{self.email}>" if self.name and self.email else (self.email or self.name or self.object_id)


def _first(claims: dict[str, str], field: str) -> str:
    for claim_type in _CLAIM_ALIASES[field]:
        if claims.get(claim_type):
            return claims[claim_type]
    return ""


#: an encoded principal larger than this is not Easy Auth's (the platform's headers are a few KB)
MAX_PRINCIPAL_CHARS = 64 * 1024


def _principal_data(encoded: str) -> dict[str, Any]:
    """The decoded X-MS-CLIENT-PRINCIPAL document, or {} for anything that is not a JSON object
    (bad base64, bad UTF-8, bad or too deeply nested JSON, oversized): nobody signed in by it."""
    if not isinstance(encoded, str) or not encoded or len(encoded) > MAX_PRINCIPAL_CHARS:
        return {}
    try:
        padded = encoded + "=" * (-len(encoded) % 4)
        data = json.loads(base64.b64decode(padded))
    except (ValueError, binascii.Error, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _claim_text(value: object) -> str:
    """A claim's type or value as text: strings and numbers only (objects, lists, null are skipped)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return ""
    return clean_text(str(value)).strip()


def parse_principal(encoded: str) -> tuple[dict[str, str], list[str], str]:
    """(claims by type, roles, identity provider) from an encoded principal. Any shape is accepted
    without raising: ``claims`` that is not a list, claims that are not objects, values that are
    not text are ignored (so a hostile header yields no identity, hence 401/403, never a 500)."""
    data = _principal_data(encoded)
    claims: dict[str, str] = {}
    roles: list[str] = []
    raw_claims = data.get("claims")
    for claim in raw_claims if isinstance(raw_claims, list) else []:
        if not isinstance(claim, dict):
            continue
        claim_type, value = _claim_text(claim.get("typ")), _claim_text(claim.get("val"))
        if not claim_type or not value:
            continue
        claims.setdefault(claim_type, value)
        if claim_type in _ROLE_CLAIMS and value not in roles:  # one claim per role
            roles.append(value)
    return claims, roles, _claim_text(data.get("auth_typ"))


def _header(lowered: Mapping[str, object], name: str) -> str:
    value = lowered.get(name, "")
    return clean_text(value).strip() if isinstance(value, str) else ""


def signed_in_user(headers: Mapping[str, str]) -> SignedInUser | None:
    """Read the principal from the X-MS-CLIENT-PRINCIPAL* headers; None when nobody is signed in."""
    lowered = {str(k).lower(): v for k, v in headers.items()}
    claims, roles, auth_type = parse_principal(_header(lowered, "x-ms-client-principal"))
    provider = _header(lowered, "x-ms-client-principal-idp") or auth_type
    principal_name = _header(lowered, "x-ms-client-principal-name")
    principal_id = _header(lowered, "x-ms-client-principal-id")
    email = _first(claims, "email") or (principal_name if "@" in principal_name else "")
    name = _first(claims, "name") or principal_name
    object_id = _first(claims, "object_id") or principal_id
    if not (email or object_id):
        return None
    return SignedInUser(
        name=name,
        email=email,
        object_id=object_id,
        tenant_id=_first(claims, "tenant_id"),
        identity_provider=provider,
        roles=tuple(roles),
    )
