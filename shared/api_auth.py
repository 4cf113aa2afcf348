"""Authentication of the publisher's own callers (the SaaS application, service to service).

The SaaS application calls with an Entra access token for this app's API (``PUBLISHER_API_AUDIENCE``),
issued by the publisher's tenant, typically to its managed identity. The token is validated in code
with the webhook's JWT machinery (signature from the tenant's keys, ``aud``, ``iss``, ``tid``,
lifetime), then the call needs an app role in ``roles``:

* ``Subscriptions.Read``: the GETs; ``Subscriptions.ReadWrite``: changes (and the GETs);
* ``Usage.Write``: metered usage reports (``POST /api/usage``).

401 for a token that does not prove who the caller is, 403 for a caller without the role; nothing
is recorded either way. ``PUBLISHER_API_AUTH=none`` (local work only, refused in Azure) accepts
every call as ``local`` with every role, and says so on every call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.errors import ForbiddenError
from shared.settings import Settings
from shared.webhook_auth import EntraTokenValidator

log = logging.getLogger(__name__)

ROLE_SUBSCRIPTIONS_READ = "Subscriptions.Read"
ROLE_SUBSCRIPTIONS_READ_WRITE = "Subscriptions.ReadWrite"
ROLE_USAGE_WRITE = "Usage.Write"  # POST /api/usage (metered billing)
#: a role that includes others (ReadWrite may read)
_IMPLIED_BY = {ROLE_SUBSCRIPTIONS_READ: frozenset({ROLE_SUBSCRIPTIONS_READ_WRITE})}


@dataclass(frozen=True)
class ApiCaller:
    """Who called: ``app:<client id>`` for an application token, ``local`` without authentication."""

    id: str
    roles: frozenset[str]


class PublisherApiValidator(EntraTokenValidator):
    switch_name = "PUBLISHER_API_AUTH"


class ApiAuthenticator:
    def __init__(self, validator: PublisherApiValidator):
        self.validator = validator

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Callable[[], float] = time.time) -> ApiAuthenticator:
        return cls(
            PublisherApiValidator(
                tenant_id=settings.publisher_api_tenant_id,
                audience=settings.publisher_api_audience,
                metadata_url=settings.publisher_api_openid_config_url,
                enabled=settings.publisher_api_auth == "entra",
                clock=clock,
            )
        )

    def authenticate(self, authorization: str | None, role: str) -> ApiCaller:
        """The verified caller holding ``role``; UnauthorizedError (401) or ForbiddenError (403)."""
        claims = self.validator.authenticate(authorization)
        if not self.validator.enabled:
            return ApiCaller("local", frozenset({role}))
        roles = claims.get("roles")
        held = frozenset(str(r) for r in roles) if isinstance(roles, list) else frozenset()
        if role not in held and not (held & _IMPLIED_BY.get(role, frozenset())):
            client = claims.get("azp") or claims.get("appid") or "?"
            log.warning("caller %s lacks the app role %s", client, role)
            raise ForbiddenError(f"the caller lacks the app role {role}", code="missing_role")
        client = str(claims.get("azp") or claims.get("appid") or claims.get("oid") or "unknown")
        return ApiCaller(f"app:{client}", held)
