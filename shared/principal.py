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


def signed_in_user(headers: Mapping[str, str]) -> SignedInUser | None:
    """Read the principal from the X-MS-CLIENT-PRINCIPAL* headers; None when nobody is signed in."""
    lowered = {k.lower(): v for k, v in headers.items()}
    encoded = lowered.get("x-ms-client-principal", "")
    claims: dict[str, str] = {}
    roles: list[str] = []
    provider = lowered.get("x-ms-client-principal-idp", "")
    if encoded:
        try:
            padded = encoded + "=" * (-len(encoded) % 4)
            data = json.loads(base64.b64decode(padded))
        except (ValueError, binascii.Error):
            data = {}
        for claim in data.get("claims", []) if isinstance(data, dict) else []:
            if isinstance(claim, dict) and claim.get("typ") and claim.get("val"):
                claim_type, value = clean_text(str(claim["typ"])), clean_text(str(claim["val"]))
                claims.setdefault(claim_type, value)
                if claim_type in _ROLE_CLAIMS and value not in roles:  # one claim per role
                    roles.append(value)
        provider = provider or str(data.get("auth_typ", "")) if isinstance(data, dict) else provider
    principal_name = clean_text(lowered.get("x-ms-client-principal-name", ""))
    principal_id = clean_text(lowered.get("x-ms-client-principal-id", ""))
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
