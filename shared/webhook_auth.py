"""Validation of the Entra ID bearer token Microsoft sends with every webhook call (PyJWT).

Checks, in order: a ``Bearer`` header, RS256 only, a signing key from the publisher tenant's
OpenID metadata (v1 and v2 key sets, cached, refreshed at most once per interval on an unknown
``kid``), signature, ``exp``/``nbf`` with a small leeway, ``aud`` (the marketplace app id, also
as ``api://``), ``iss`` (v1 or v2 issuer of the tenant), ``tid`` and ``azp``/``appid`` (the
marketplace's own app id). Failures raise UnauthorizedError naming the failed check, never the token.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import jwt
import requests

from shared.errors import AppError, UnauthorizedError
from shared.settings import MARKETPLACE_RESOURCE_ID

log = logging.getLogger(__name__)

LEEWAY_SECONDS = 120
REFRESH_INTERVAL_SECONDS = 300  # unknown kid: refetch keys at most this often
MAX_KEY_AGE_SECONDS = 24 * 3600


class SigningKeysUnavailableError(AppError):
    """The tenant's signing keys could not be fetched; Microsoft should retry (5xx)."""

    http_status = 503
    code = "signing_keys_unavailable"


def _v1_metadata_url(url: str) -> str:
    return url.replace("/v2.0/.well-known/", "/.well-known/")


class SigningKeys:
    """kid -> key from the OpenID metadata documents, fetched lazily and refreshed sparingly."""

    def __init__(self, metadata_urls: list[str], *, timeout: float = 5.0):
        self._metadata_urls = list(dict.fromkeys(metadata_urls))
        self._timeout = timeout
        self._keys: dict[str, Any] = {}
        self._fetched_at = 0.0
        self._refreshed_at = float("-inf")  # last refresh caused by an unknown kid (rate limit)
        self._lock = threading.Lock()
        self.fetch_count = 0

    def _fetch(self) -> dict[str, Any]:
        keys: dict[str, Any] = {}
        errors = 0
        for url in self._metadata_urls:
            try:
                response = requests.get(url, timeout=self._timeout)
                response.raise_for_status()  # an error page is not a key set
                metadata = response.json()
                response = requests.get(metadata["jwks_uri"], timeout=self._timeout)
                response.raise_for_status()
                jwks = response.json()
            except (requests.RequestException, ValueError, KeyError, TypeError) as error:
                errors += 1
                log.warning("could not read signing keys from %s: %s", url, type(error).__name__)
                continue
            for entry in jwks.get("keys", []):
                if entry.get("kid") and entry.get("kty") == "RSA":
                    try:
                        keys[entry["kid"]] = jwt.PyJWK.from_dict(entry, algorithm="RS256").key
                    except jwt.PyJWTError:
                        continue
        if errors == len(self._metadata_urls) or not keys:
            # Never cache an empty key set: every genuine webhook would get 401 until the next refresh.
            raise SigningKeysUnavailableError("no signing keys could be read from the OpenID metadata")
        self.fetch_count += 1
        return keys

    def get(self, kid: str) -> Any | None:
        with self._lock:
            now = time.monotonic()
            stale = now - self._fetched_at > MAX_KEY_AGE_SECONDS
            if not self._keys or stale:
                self._keys = self._fetch()
                self._fetched_at = now
            elif kid not in self._keys and now - self._refreshed_at > REFRESH_INTERVAL_SECONDS:
                # A rotated key: refresh now (not only once the last fetch is an interval old), but
                # at most once per interval, so made-up kids cannot make us hammer the metadata.
                self._refreshed_at = now
                self._keys = self._fetch()
                self._fetched_at = now
            return self._keys.get(kid)


class WebhookAuthenticator:
    def __init__(self, *, tenant_id: str, audience: str, metadata_url: str, enabled: bool = True):
        self.enabled = enabled
        tenant_id = tenant_id.strip().lower()  # GUIDs: compare case-insensitively
        self.tenant_id = tenant_id
        self.audiences = [audience, f"api://{audience}"] if audience and not audience.startswith("api://") else [audience]
        self.issuers = {f"https://sts.windows.net/{tenant_id}/", f"https://login.microsoftonline.com/{tenant_id}/v2.0"}
        self.keys = SigningKeys([metadata_url, _v1_metadata_url(metadata_url)]) if enabled else None

    @classmethod
    def from_settings(cls, settings) -> WebhookAuthenticator:
        return cls(
            tenant_id=settings.marketplace_tenant_id,
            audience=settings.webhook_audience,
            metadata_url=settings.webhook_openid_config_url,
            enabled=settings.webhook_auth == "entra",
        )

    def authenticate(self, authorization: str | None) -> dict[str, Any]:
        """Return the verified claims, or raise UnauthorizedError saying which check failed."""
        if not self.enabled:
            log.warning("WEBHOOK_AUTH=none: accepting an unauthenticated webhook call (local development only)")
            return {}
        scheme, _, token = (authorization or "").strip().partition(" ")
        if not authorization:
            raise UnauthorizedError("no Authorization header")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthorizedError("Authorization is not a Bearer token")
        token = token.strip()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise UnauthorizedError("token is not a JWT") from error
        if header.get("alg") != "RS256":
            raise UnauthorizedError(f"algorithm {header.get('alg')!r} is not allowed")
        key = self.keys.get(str(header.get("kid", "")))
        if key is None:
            raise UnauthorizedError("signing key id is not one of the tenant's keys")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=["RS256"],
                audience=self.audiences,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iat", "aud", "iss", "tid"], "verify_iss": False},
            )
        except jwt.InvalidSignatureError as error:
            raise UnauthorizedError("signature does not verify") from error
        except jwt.ExpiredSignatureError as error:
            raise UnauthorizedError("token has expired") from error
        except jwt.ImmatureSignatureError as error:
            raise UnauthorizedError("token is not valid yet") from error
        except jwt.InvalidAudienceError as error:
            raise UnauthorizedError("audience is not ours") from error
        except jwt.MissingRequiredClaimError as error:
            raise UnauthorizedError(f"claim {error.claim!r} is missing") from error
        except jwt.PyJWTError as error:
            raise UnauthorizedError(f"token is invalid ({type(error).__name__})") from error
        if str(claims.get("iss", "")).lower() not in self.issuers:
            raise UnauthorizedError("issuer is not our tenant")
        if str(claims.get("tid", "")).lower() != self.tenant_id:
            raise UnauthorizedError("tenant is not ours")
        caller = claims.get("azp") or claims.get("appid")
        if caller != MARKETPLACE_RESOURCE_ID:
            raise UnauthorizedError("caller is not the Microsoft marketplace")
        return claims
