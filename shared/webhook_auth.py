"""Validation of the Entra ID bearer token Microsoft sends with every webhook call (PyJWT).

Checks, in order: a ``Bearer`` header, RS256 only, a signing key from the publisher tenant's
OpenID metadata (v1 and v2 key sets, cached; see ``SigningKeys`` for when they are refreshed and why
not ``jwt.PyJWKClient``), signature, ``exp``/``nbf`` with a small leeway, ``aud`` (the marketplace app id, also
as ``api://``), ``iss`` (v1 or v2 issuer of the tenant), ``tid`` and ``azp``/``appid`` (the
marketplace's own app id). Failures raise UnauthorizedError naming the failed check, never the token.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import jwt
import requests

from shared.deadline import Deadline, current_deadline
from shared.errors import AppError, UnauthorizedError
from shared.settings import MARKETPLACE_RESOURCE_ID, Settings

log = logging.getLogger(__name__)

LEEWAY_SECONDS = 120
MAX_KEY_AGE_SECONDS = 24 * 3600  # keys older than this are refreshed (and kept while that fails)
# Entra backdates iat (and nbf) by about 5 minutes; with clock skew on top, only a token issued
# this long before the keys were read proves that the keys then published do not hold its kid.
ISSUED_AT_MARGIN_SECONDS = 600
MIN_REFRESH_SECONDS = 60  # an unknown kid refreshes the keys only if they are at least this old
BACKOFF_FIRST_SECONDS = 5.0  # a failing metadata endpoint is left alone this long, doubling ...
BACKOFF_MAX_SECONDS = 300.0  # ... up to this
FETCH_BUDGET_SECONDS = 6.0  # one refresh, every read included (a trickling server cannot hold it longer)
READ_TIMEOUT_SECONDS = 2.0  # one socket read; the budget is checked between reads
MAX_DOCUMENT_BYTES = 1 << 20


class SigningKeysUnavailableError(AppError):
    """The tenant's signing keys could not be read (or not yet); Microsoft should retry (5xx)."""

    http_status = 503
    code = "signing_keys_unavailable"


def _v1_metadata_url(url: str) -> str:
    return url.replace("/v2.0/.well-known/", "/.well-known/")


class _TooSlow(Exception):
    pass


class SigningKeys:
    """kid -> key from the tenant's OpenID metadata (v1 and v2 key sets), cached.

    Why not ``jwt.PyJWKClient`` (PyJWT parses the keys here, through ``PyJWK``): it reads one JWKS
    URL rather than OpenID metadata, and it refetches on every unknown ``kid`` (a forged token with
    a random kid makes it call out, or, rate-limited, refuse a genuine rotated key). It has no
    stale-while-error (a failing refresh fails the request although the cached keys still verify),
    no backoff of a failing endpoint, no single flight (callers queue on one lock even when their
    kid is cached), and only a per-read timeout, so a trickling server holds a request for as long
    as it likes. Webhooks need all of these: Microsoft reads a 4xx as a rejection of the change, and
    gives us 10 seconds.

    The policy:
    * a cached kid is served from memory, never waiting for a refresh in progress;
    * keys older than a day are refreshed; while that fails, the cached keys keep verifying;
    * an unknown kid refreshes the keys when they are at least MIN_REFRESH_SECONDS old, whoever
      asks, so no caller can use the refresh up for another;
    * an unknown kid that could not be checked against fresh keys (too recent a refresh to repeat,
      endpoint backing off, fetch failed or out of time) is a 5xx, never a 401; it is a 401 only
      when keys read after the token was issued do not hold it;
    * a failing endpoint is backed off (5 s doubling to 5 min): one attempt per period, however
      many requests arrive; one fetch at a time, bounded by FETCH_BUDGET_SECONDS and the request's
      deadline.
    """

    def __init__(self, metadata_urls: list[str], *, clock: Callable[[], float] = time.time):
        self._metadata_urls = list(dict.fromkeys(metadata_urls))
        self._clock = clock
        self._keys: dict[str, Any] = {}
        self._fetched_at = float("-inf")  # when the cached keys were read (clock seconds)
        self._failures = 0
        self._next_attempt_at = float("-inf")  # backoff of a failing endpoint
        self._state = threading.Lock()  # guards the fields above; never held during I/O
        self._fetching = threading.Lock()  # one fetch at a time
        self.fetch_count = 0  # successful refreshes
        self.attempt_count = 0  # refresh attempts, failed ones included

    # -- the lookup ------------------------------------------------------------------------------

    def get(self, kid: str, *, issued_at: float | None = None) -> Any | None:
        """The key for ``kid``; None when keys read after ``issued_at`` do not hold it (a 401).

        Raises SigningKeysUnavailableError when that cannot be decided now (a 5xx).
        """
        with self._state:
            key = self._keys.get(kid)
            age = self._clock() - self._fetched_at
        if key is not None:
            if age > MAX_KEY_AGE_SECONDS:
                self._refresh(required=False)  # stale-while-error: the cached key verifies meanwhile
                with self._state:
                    key = self._keys.get(kid, key)
            return key
        if age >= MIN_REFRESH_SECONDS:
            self._refresh(required=True)
            with self._state:
                key = self._keys.get(kid)
                fetched_at = self._fetched_at
            if key is not None or self._clock() - fetched_at < MIN_REFRESH_SECONDS:
                return key  # just read: the tenant does not publish this kid
        with self._state:
            fetched_at = self._fetched_at
        if issued_at is not None and issued_at + ISSUED_AT_MARGIN_SECONDS < fetched_at:
            return None  # keys read after the token was issued do not hold its kid
        raise SigningKeysUnavailableError("the token's signing key is not in the cached keys and they cannot be refreshed now")

    # -- refreshing --------------------------------------------------------------------------------

    def _refresh(self, *, required: bool) -> None:
        """Read the keys again (single flight, backoff). ``required``: raise when that fails."""
        deadline = current_deadline()
        wait = deadline.remaining() if deadline is not None else FETCH_BUDGET_SECONDS
        started_waiting = self._clock()
        # A caller that holds a usable key never queues behind a refresh in progress.
        acquired = self._fetching.acquire(timeout=max(0.0, wait)) if required else self._fetching.acquire(blocking=False)
        if not acquired:
            if required:
                raise SigningKeysUnavailableError("another refresh of the signing keys is still running")
            return
        try:
            with self._state:
                if self._fetched_at >= started_waiting:
                    return  # refreshed by the caller we waited for
                if self._clock() < self._next_attempt_at:
                    if required:
                        raise SigningKeysUnavailableError("the signing keys endpoint is failing; backing off")
                    return
                self.attempt_count += 1
            try:
                keys = self._fetch(deadline)
            except SigningKeysUnavailableError:
                with self._state:
                    self._failures += 1
                    backoff = min(BACKOFF_FIRST_SECONDS * 2 ** (self._failures - 1), BACKOFF_MAX_SECONDS)
                    self._next_attempt_at = self._clock() + backoff
                    log.warning("signing keys not refreshed (%s failure(s)); next attempt in %.0f s", self._failures, backoff)
                if required:
                    raise
                return
            with self._state:
                self._keys, self._fetched_at = keys, self._clock()
                self._failures, self._next_attempt_at = 0, float("-inf")
                self.fetch_count += 1
        finally:
            self._fetching.release()

    def _fetch(self, deadline: Deadline | None) -> dict[str, Any]:
        budget_end = self._clock() + FETCH_BUDGET_SECONDS
        if deadline is not None:
            budget_end = min(budget_end, self._clock() + deadline.remaining())
        keys: dict[str, Any] = {}
        errors = 0
        for url in self._metadata_urls:
            try:
                metadata = self._get_json(url, budget_end)
                jwks = self._get_json(str(metadata["jwks_uri"]), budget_end)
                entries = jwks.get("keys", [])
            except (requests.RequestException, ValueError, KeyError, TypeError, AttributeError, _TooSlow) as error:
                errors += 1
                log.warning("could not read signing keys from %s: %s", url, type(error).__name__)
                continue
            for entry in entries if isinstance(entries, list) else []:
                if isinstance(entry, dict) and entry.get("kid") and entry.get("kty") == "RSA":
                    try:
                        keys[str(entry["kid"])] = jwt.PyJWK.from_dict(entry, algorithm="RS256").key
                    except jwt.PyJWTError:
                        continue
        if errors == len(self._metadata_urls) or not keys:
            # Never cache an empty key set: every genuine webhook would get 401 until the next refresh.
            raise SigningKeysUnavailableError("no signing keys could be read from the OpenID metadata")
        return keys

    def _get_json(self, url: str, budget_end: float) -> Any:
        """GET a JSON document, the whole exchange bounded by ``budget_end`` (not only each read)."""
        left = budget_end - self._clock()
        if left <= 0:
            raise _TooSlow()
        timeout = min(READ_TIMEOUT_SECONDS, left)
        with requests.get(url, timeout=(timeout, timeout), stream=True) as response:
            response.raise_for_status()  # an error page is not a key set
            body = bytearray()
            while True:
                if self._clock() > budget_end:
                    raise _TooSlow()
                chunk = response.raw.read1(65536)  # returns what one socket read brought
                if not chunk:
                    break
                body += chunk
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise ValueError("signing keys document too large")
        return json.loads(bytes(body))


def _unverified_issued_at(token: str) -> float | None:
    """The token's ``iat`` before verification: only to tell "unknown to fresh keys" (401) from
    "not decidable yet" (5xx); an attacker who lies about it gains a 5xx at most."""
    try:
        issued_at = jwt.decode(token, options={"verify_signature": False}).get("iat")
    except jwt.PyJWTError:
        return None
    return float(issued_at) if isinstance(issued_at, (int, float)) and not isinstance(issued_at, bool) else None


class EntraTokenValidator:
    """Validates an Entra ID access token issued by one tenant for one audience (PyJWT).

    ``required_caller``: the only client application (``azp``/``appid``) accepted; None accepts any
    caller of the tenant (authorization is then the caller's job, e.g. app roles).
    """

    #: the setting that turns validation off, named in the warning every unauthenticated call logs
    switch_name = "AUTH"

    def __init__(
        self,
        *,
        tenant_id: str,
        audience: str,
        metadata_url: str,
        enabled: bool = True,
        clock: Callable[[], float] = time.time,
        required_caller: str | None = None,
    ):
        self.enabled = enabled
        tenant_id = tenant_id.strip().lower()  # GUIDs: compare case-insensitively
        self.tenant_id = tenant_id
        self.required_caller = required_caller
        self.audiences = [audience, f"api://{audience}"] if audience and not audience.startswith("api://") else [audience]
        self.issuers = {f"https://sts.windows.net/{tenant_id}/", f"https://login.microsoftonline.com/{tenant_id}/v2.0"}
        self.keys = SigningKeys([metadata_url, _v1_metadata_url(metadata_url)], clock=clock) if enabled else None

    def authenticate(self, authorization: str | None) -> dict[str, Any]:
        """Return the verified claims, or raise UnauthorizedError saying which check failed."""
        if not self.enabled:
            log.warning("%s=none: accepting an unauthenticated call (local development only)", self.switch_name)
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
        if self.keys is None:  # pragma: no cover - enabled implies keys
            raise UnauthorizedError("token validation is not configured")
        key = self.keys.get(str(header.get("kid", "")), issued_at=_unverified_issued_at(token))
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
        if self.required_caller is not None and caller != self.required_caller:
            raise UnauthorizedError("caller is not the Microsoft marketplace")
        return claims


class WebhookAuthenticator(EntraTokenValidator):
    """Microsoft's webhook tokens: our marketplace app's audience, the marketplace as caller."""

    switch_name = "WEBHOOK_AUTH"

    def __init__(
        self, *, tenant_id: str, audience: str, metadata_url: str, enabled: bool = True, clock: Callable[[], float] = time.time
    ):
        super().__init__(
            tenant_id=tenant_id,
            audience=audience,
            metadata_url=metadata_url,
            enabled=enabled,
            clock=clock,
            required_caller=MARKETPLACE_RESOURCE_ID,
        )

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Callable[[], float] = time.time) -> WebhookAuthenticator:
        return cls(
            tenant_id=settings.marketplace_tenant_id,
            audience=settings.webhook_audience,
            metadata_url=settings.webhook_openid_config_url,
            enabled=settings.webhook_auth == "entra",
            clock=clock,
        )
