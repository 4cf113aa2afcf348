"""Webhook authentication: Microsoft's Entra bearer token, checked by the app itself.

The forged-token matrix goes through the real HTTP path (dev host serving ``function_app.app``):
every forged or broken token is answered 401, leaves nothing in storage, makes no Marketplace call,
and leaves one log line naming the failed check but never the token. The same body with a genuine
token is then accepted, so each 401 is caused by the token alone.

The key cache (``SigningKeys``) is tested directly on ``WebhookAuthenticator`` against the
stand-in's OpenID metadata, with the module's clock replaced so no test waits for real intervals.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization

from devtools.marketplace_standin import MARKETPLACE_APP_ID
from shared import webhook_auth
from shared.domain import utc_now
from shared.errors import ConfigurationError, UnauthorizedError
from shared.webhook_auth import SigningKeysUnavailableError, WebhookAuthenticator

OTHER_TENANT = "0b5e5f3a-0000-4000-8000-0000000000cc"


# --------------------------------------------------------------------------------------------------
# helpers


class RawLogs(logging.Handler):
    """Records messages as the app wrote them, before any redacting filter on the root handlers.

    Logger-level handlers run before the root's, so a token the app logs would show up here
    even though a root filter later masks it for other handlers.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.levelname} {record.getMessage()}")

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def raw_logs():
    handler = RawLogs()
    loggers = [logging.getLogger(name) for name in ("webhook", "shared", "devtools", "function_app")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_json(value: dict) -> str:
    return _b64url(json.dumps(value, separators=(",", ":")).encode())


def _claims_of(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def _current_kid(standin) -> str:
    return jwt.get_unverified_header(standin.sign_token())["kid"]


def _tampered(standin) -> str:
    """A genuine token whose payload was changed afterwards (the signature no longer matches)."""
    header, _, signature = standin.sign_token().split(".")
    claims = _claims_of(standin.sign_token())
    claims["oid"] = str(uuid.uuid4())
    return ".".join((header, _b64url_json(claims), signature))


def _hs256_with_public_key(standin) -> str:
    """The classic key-confusion forgery: HS256, the HMAC secret being the tenant's published RSA key."""
    kid = _current_kid(standin)
    jwks = requests.get(standin.jwks_url, timeout=10).json()
    published = next(entry for entry in jwks["keys"] if entry["kid"] == kid)
    public_pem = jwt.PyJWK.from_dict(published, algorithm="RS256").key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": kid}
    signing_input = f"{_b64url_json(header)}.{_b64url_json(_claims_of(standin.sign_token()))}"
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64url(signature)}"


def _other_tenant(standin) -> str:
    """A well-formed token of another tenant, signed with that tenant's own key (published nowhere here)."""
    return standin.sign_token(
        {"tid": OTHER_TENANT, "iss": f"https://login.microsoftonline.com/{OTHER_TENANT}/v2.0"},
        headers_overrides={"kid": "other-tenant-" + uuid.uuid4().hex[:12]},
        key=standin.other_key(),
    )


def _now() -> int:
    return int(time.time())


@dataclass(frozen=True)
class Forgery:
    name: str
    authorization: Callable  # standin -> Authorization header value (None: no header)
    check: str  # a word of the log line that names the failed check (case-insensitive)


FORGERIES = [
    Forgery("no header", lambda s: None, "authorization header"),
    Forgery("empty header", lambda s: "", "authorization header"),
    Forgery("wrong scheme", lambda s: "Basic " + s.sign_token(), "bearer"),
    Forgery("bearer without token", lambda s: "Bearer ", "bearer"),
    Forgery("not a jwt", lambda s: "Bearer not-a-jwt", "jwt"),
    Forgery("bad signature (payload tampered)", lambda s: "Bearer " + _tampered(s), "signature"),
    Forgery("bad signature (unpublished key, our kid)", lambda s: "Bearer " + s.sign_token(key=s.other_key()), "signature"),
    Forgery("unknown kid", lambda s: "Bearer " + s.sign_token(headers_overrides={"kid": "unknown-" + uuid.uuid4().hex}), "key"),
    Forgery("no kid", lambda s: "Bearer " + s.sign_token(headers_overrides={"kid": None}), "key"),
    Forgery("alg none", lambda s: "Bearer " + s.sign_token(algorithm="none"), "algorithm"),
    Forgery("HS256 signed with the public key", lambda s: "Bearer " + _hs256_with_public_key(s), "algorithm"),
    Forgery("wrong aud", lambda s: "Bearer " + s.sign_token({"aud": str(uuid.uuid4())}), "audience"),
    Forgery(
        "wrong aud (api:// of another app)", lambda s: "Bearer " + s.sign_token({"aud": f"api://{uuid.uuid4()}"}), "audience"
    ),
    Forgery("no aud", lambda s: "Bearer " + s.sign_token({"aud": None}), "aud"),
    Forgery("wrong tid", lambda s: "Bearer " + s.sign_token({"tid": OTHER_TENANT}), "tenant"),
    Forgery(
        "wrong issuer (another tenant)",
        lambda s: "Bearer " + s.sign_token({"iss": f"https://login.microsoftonline.com/{OTHER_TENANT}/v2.0"}),
        "issuer",
    ),
    Forgery("wrong issuer (not Entra)", lambda s: "Bearer " + s.sign_token({"iss": "https://issuer.evil.example/"}), "issuer"),
    Forgery("wrong azp", lambda s: "Bearer " + s.sign_token({"azp": str(uuid.uuid4())}), "marketplace"),
    Forgery("wrong appid (v1)", lambda s: "Bearer " + s.sign_token({"appid": str(uuid.uuid4())}, version="1.0"), "marketplace"),
    Forgery("neither azp nor appid", lambda s: "Bearer " + s.sign_token({"azp": None}), "marketplace"),
    Forgery(
        "expired",
        lambda s: "Bearer " + s.sign_token({"iat": _now() - 7200, "nbf": _now() - 7200, "exp": _now() - 3600}),
        "expired",
    ),
    Forgery("no exp", lambda s: "Bearer " + s.sign_token({"exp": None}), "exp"),
    Forgery(
        "not yet valid",
        lambda s: "Bearer " + s.sign_token({"iat": _now(), "nbf": _now() + 3600, "exp": _now() + 7200}),
        "not valid yet",
    ),
    Forgery("token from another tenant's keys", lambda s: "Bearer " + _other_tenant(s), "key"),
]


def _post(http, devhost, body: bytes, authorization: str | None) -> requests.Response:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    return http.post(devhost.url + "/api/webhook", data=body, headers=headers, timeout=60)


def _pending_operation(standin, action: str = "Suspend", **kwargs) -> tuple[str, str, bytes]:
    """A subscription the app has never seen and a real operation on it (not delivered)."""
    subscription_id = standin.seed(1, plan_id="standard", quantity=5)[0]
    operation = standin.trigger(subscription_id, action, deliver=False, **kwargs)
    return subscription_id, operation["id"], json.dumps(standin.webhook_payload(operation["id"])).encode()


def _assert_nothing_stored(services, subscription_id: str, operation_id: str) -> None:
    repository = services.repository
    assert repository.get(subscription_id) is None
    assert repository.get_marker(subscription_id, operation_id) is None
    assert repository.history(subscription_id) == []
    assert repository.pending_events(subscription_id) == []


def _assert_never_logged(text: str, authorization: str) -> None:
    """Neither the credential of the Authorization header nor any piece of a JWT in it appears in ``text``."""
    credential = authorization.split(" ", 1)[1].strip() if " " in authorization else authorization.strip()
    if len(credential) < 16:
        return  # nothing that could be recognised (no header, empty credential)
    assert credential not in text
    for segment in credential.split("."):
        if len(segment) >= 16:
            assert segment not in text, "a piece of the token reached the log"


# --------------------------------------------------------------------------------------------------
# the forged-token matrix, over HTTP


@pytest.mark.parametrize("forgery", FORGERIES, ids=[f.name for f in FORGERIES])
def test_forged_token_is_401_with_nothing_stored(forgery, standin, services, devhost, http, caplog, raw_logs):
    caplog.set_level(logging.INFO)
    subscription_id, operation_id, body = _pending_operation(standin)
    authorization = forgery.authorization(standin)
    calls_before = dict(standin.calls)

    response = _post(http, devhost, body, authorization)

    assert response.status_code == 401, response.text
    assert response.json()["error"] == "unauthorized"
    _assert_nothing_stored(services, subscription_id, operation_id)
    # Nothing was asked of Microsoft either (no Get Operation, no Get Subscription, no PATCH).
    for kind in ("get", "get_operation", "patch_operation"):
        assert standin.calls[kind] == calls_before.get(kind, 0), kind
    assert standin.patches == []

    # One warning names the failed check; neither the log nor the answer carries the token.
    refusals = [r for r in caplog.records if r.levelno >= logging.WARNING and "401" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in caplog.records]
    assert forgery.check.lower() in refusals[0].getMessage().lower()
    _assert_never_logged(caplog.text, authorization or "")
    _assert_never_logged(raw_logs.text, authorization or "")
    _assert_never_logged(response.text, authorization or "")

    # Control: the very same body with Microsoft's genuine token is accepted and recorded.
    genuine = _post(http, devhost, body, "Bearer " + standin.sign_token())
    assert genuine.status_code == 200, genuine.text
    assert services.repository.get_marker(subscription_id, operation_id) is not None
    assert services.repository.get(subscription_id) is not None


# --------------------------------------------------------------------------------------------------
# genuine tokens in their accepted shapes, over HTTP


@pytest.mark.parametrize(
    "shape",
    ["v2", "v1 (appid, sts.windows.net issuer)", "api:// audience", "v1 with api:// audience", "aud as a list"],
)
def test_genuine_token_shapes_are_accepted(shape, standin, services, devhost, http):
    audience = services.settings.marketplace_client_id
    tokens = {
        "v2": lambda: standin.sign_token(),
        "v1 (appid, sts.windows.net issuer)": lambda: standin.sign_token(version="1.0"),
        "api:// audience": lambda: standin.sign_token({"aud": f"api://{audience}"}),
        "v1 with api:// audience": lambda: standin.sign_token({"aud": f"api://{audience}"}, version="1.0"),
        "aud as a list": lambda: standin.sign_token({"aud": [str(uuid.uuid4()), audience]}),
    }
    token = tokens[shape]()
    claims = _claims_of(token)
    if shape.startswith("v1"):
        assert claims["iss"] == f"https://sts.windows.net/{standin.tenant_id}/" and claims["appid"] == MARKETPLACE_APP_ID
        assert "azp" not in claims
    subscription_id, operation_id, body = _pending_operation(standin)

    response = _post(http, devhost, body, "Bearer " + token)

    assert response.status_code == 200, response.text
    marker = services.repository.get_marker(subscription_id, operation_id)
    assert marker is not None and not marker.pending
    assert services.repository.get(subscription_id).record.status.value == "Suspended"


def test_stand_in_fires_v1_tokens_and_the_app_accepts_them(standin, services, devhost):
    standin.webhook_url = devhost.url + "/api/webhook"
    standin.webhook_token_version = "1.0"
    subscription_id = standin.seed(1, plan_id="standard", quantity=5)[0]

    operation = standin.trigger(subscription_id, "Suspend")

    assert standin.webhook_deliveries == [(operation["id"], 200)]
    assert services.repository.get_marker(subscription_id, operation["id"]) is not None


def test_small_clock_skew_is_tolerated_but_not_more(standin, services, devhost, http):
    slightly_expired = standin.sign_token({"iat": _now() - 3600, "nbf": _now() - 3600, "exp": _now() - 30})
    slightly_early = standin.sign_token({"iat": _now() + 30, "nbf": _now() + 30, "exp": _now() + 3600})
    long_expired = standin.sign_token({"iat": _now() - 3600, "nbf": _now() - 3600, "exp": _now() - 900})

    for token, expected in ((slightly_expired, 200), (slightly_early, 200), (long_expired, 401)):
        subscription_id, operation_id, body = _pending_operation(standin)
        response = _post(http, devhost, body, "Bearer " + token)
        assert response.status_code == expected, response.text
        if expected == 401:
            _assert_nothing_stored(services, subscription_id, operation_id)
        else:
            assert services.repository.get_marker(subscription_id, operation_id) is not None


def test_key_rotation_is_accepted_after_one_refresh(standin, services, devhost):
    """Microsoft starts signing with a new key: the first webhook with the new kid refreshes the keys once."""
    standin.webhook_url = devhost.url + "/api/webhook"
    first_sub, second_sub = standin.seed(2, plan_id="standard", quantity=5)
    first = standin.trigger(first_sub, "Suspend")
    assert standin.webhook_deliveries[-1] == (first["id"], 200)
    keys = services.webhook_authenticator.keys
    fetches_before = keys.fetch_count
    jwks_before = standin.calls["jwks"]

    new_kid = standin.rotate_key()
    services.clock = lambda: utc_now() + timedelta(seconds=webhook_auth.MIN_REFRESH_SECONDS + 1)  # the keys are a minute old
    second = standin.trigger(second_sub, "Suspend")

    assert jwt.get_unverified_header(standin.sign_token())["kid"] == new_kid
    assert standin.webhook_deliveries[-1] == (second["id"], 200)
    assert keys.fetch_count == fetches_before + 1
    assert standin.calls["jwks"] == jwks_before + 2  # the v2 and the v1 key set, once each
    assert services.repository.get(second_sub).record.status.value == "Suspended"

    # More webhooks with the new key: no further fetches.
    third = standin.trigger(second_sub, "Reinstate")
    assert standin.webhook_deliveries[-1] == (third["id"], 200)
    assert keys.fetch_count == fetches_before + 1


def test_signing_keys_unreachable_is_5xx_not_401(standin, services, devhost, http):
    """The tenant's metadata cannot be read: a transient problem, so Microsoft must retry (never 4xx)."""
    subscription_id, operation_id, body = _pending_operation(standin, "ChangeQuantity", quantity=8)
    standin.fail_next(20, status=503, path_contains="openid-configuration")

    response = _post(http, devhost, body, "Bearer " + standin.sign_token())

    assert 500 <= response.status_code < 600, response.text
    _assert_nothing_stored(services, subscription_id, operation_id)
    assert standin.get_operation(operation_id)["status"] == "InProgress"  # a 4xx would have rejected it

    standin.clear_faults()
    # Backing off the failing endpoint: Microsoft's retry right away is still a 5xx, with no call out ...
    metadata_calls = standin.calls["openid_config"]
    assert 500 <= _post(http, devhost, body, "Bearer " + standin.sign_token()).status_code < 600
    assert standin.calls["openid_config"] == metadata_calls
    # ... and once the backoff has passed (the clock moves; nothing sleeps), the retry goes through.
    services.clock = lambda: utc_now() + timedelta(seconds=webhook_auth.BACKOFF_FIRST_SECONDS + 1)
    retried = _post(http, devhost, body, "Bearer " + standin.sign_token())
    assert retried.status_code == 200, retried.text
    assert services.repository.get(subscription_id).record.quantity == 8


def test_webhook_auth_none_accepts_unauthenticated_calls_with_a_warning_each_time(standin, make_services, devhost, http, caplog):
    services = make_services(WEBHOOK_AUTH="none")
    caplog.set_level(logging.WARNING)
    calls = []
    for _ in range(3):
        subscription_id, operation_id, body = _pending_operation(standin)
        response = _post(http, devhost, body, None)
        assert response.status_code == 200, response.text
        assert services.repository.get_marker(subscription_id, operation_id) is not None
        calls.append(subscription_id)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "WEBHOOK_AUTH=none" in r.getMessage()]
    assert len(warnings) == len(calls)


def test_webhook_auth_none_is_refused_at_start_up_in_azure(make_services):
    with pytest.raises(ConfigurationError) as raised:
        make_services(WEBHOOK_AUTH="none", WEBSITE_INSTANCE_ID="0123456789abcdef")
    assert any("WEBHOOK_AUTH" in problem for problem in raised.value.problems)
    # Entra validation in Azure is fine, and `none` outside Azure is fine.
    assert make_services(WEBSITE_INSTANCE_ID="0123456789abcdef").settings.running_in_azure
    assert make_services(WEBHOOK_AUTH="none").settings.webhook_auth == "none"


# --------------------------------------------------------------------------------------------------
# WebhookAuthenticator directly: audience setting and the signing key cache


class FakeClock:
    """The key cache's injected clock (epoch seconds), moved by the tests instead of sleeping."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock():
    return FakeClock()


def _authenticator(standin, audience: str, clock: FakeClock | None = None) -> WebhookAuthenticator:
    return WebhookAuthenticator(
        tenant_id=standin.tenant_id, audience=audience, metadata_url=standin.openid_config_url, clock=clock or time.time
    )


def test_webhook_audience_setting_replaces_the_client_id(standin, make_services):
    custom = str(uuid.uuid4())
    services = make_services(WEBHOOK_AUDIENCE=custom)
    authenticator = services.webhook_authenticator

    assert authenticator.authenticate("Bearer " + standin.sign_token({"aud": custom}))["aud"] == custom
    assert authenticator.authenticate("Bearer " + standin.sign_token({"aud": f"api://{custom}"}))
    with pytest.raises(UnauthorizedError, match="audience"):
        authenticator.authenticate("Bearer " + standin.sign_token())  # MARKETPLACE_CLIENT_ID no longer counts


def test_keys_are_fetched_once_and_cached(standin, services, clock):
    authenticator = _authenticator(standin, services.settings.marketplace_client_id, clock)
    tokens = [standin.sign_token(), standin.sign_token(version="1.0")] * 10

    for token in tokens:
        assert authenticator.authenticate("Bearer " + token)["tid"] == standin.tenant_id
    clock.advance(3600)  # an hour later the cache still serves
    authenticator.authenticate("Bearer " + standin.sign_token())

    assert authenticator.keys.fetch_count == 1
    assert standin.calls["openid_config"] == 2  # v2 and v1 metadata
    assert standin.calls["jwks"] == 2


def test_keys_are_refetched_when_older_than_a_day(standin, services, clock):
    authenticator = _authenticator(standin, services.settings.marketplace_client_id, clock)
    authenticator.authenticate("Bearer " + standin.sign_token())
    clock.advance(webhook_auth.MAX_KEY_AGE_SECONDS + 1)
    authenticator.authenticate("Bearer " + standin.sign_token())
    assert authenticator.keys.fetch_count == 2


def test_unknown_kids_refresh_the_keys_at_most_once_per_interval(standin, services, clock):
    """A flood of tokens with made-up kids must not turn into a flood of metadata fetches."""
    authenticator = _authenticator(standin, services.settings.marketplace_client_id, clock)
    authenticator.authenticate("Bearer " + standin.sign_token())
    assert authenticator.keys.fetch_count == 1

    def unknown_kid() -> str:
        return "Bearer " + standin.sign_token(headers_overrides={"kid": uuid.uuid4().hex}, key=standin.other_key())

    for _ in range(10):
        # The keys were just read and the token is newer: not decidable yet, so 5xx (never 401).
        with pytest.raises(SigningKeysUnavailableError):
            authenticator.authenticate(unknown_kid())
        clock.advance(1)
    assert authenticator.keys.attempt_count == 1
    jwks_calls = standin.calls["jwks"]

    clock.advance(webhook_auth.MIN_REFRESH_SECONDS + 1)
    with pytest.raises(UnauthorizedError, match="key"):  # refreshed for it: fresh keys do not hold it
        authenticator.authenticate(unknown_kid())
    with pytest.raises(SigningKeysUnavailableError):  # and the next one cannot refresh again so soon
        authenticator.authenticate(unknown_kid())
    assert standin.calls["jwks"] == jwks_calls + 2  # exactly one refresh (v2 + v1 key sets) in the new interval
    # Known kids keep working throughout, without fetching.
    authenticator.authenticate("Bearer " + standin.sign_token())
    assert standin.calls["jwks"] == jwks_calls + 2


def test_an_old_token_with_a_kid_unknown_to_keys_read_after_it_is_401(standin, services, clock):
    authenticator = _authenticator(standin, services.settings.marketplace_client_id, clock)
    issued = int(clock())
    token = standin.sign_token(
        {"iat": issued, "nbf": issued, "exp": issued + 3600},
        headers_overrides={"kid": "gone-" + uuid.uuid4().hex},
        key=standin.other_key(),
    )
    clock.advance(webhook_auth.ISSUED_AT_MARGIN_SECONDS + 60)
    authenticator.authenticate("Bearer " + standin.sign_token())  # keys read 11 minutes after it was issued
    with pytest.raises(UnauthorizedError, match="key"):
        authenticator.authenticate("Bearer " + token)


def test_rotated_key_is_accepted_after_exactly_one_refresh(standin, services, clock):
    authenticator = _authenticator(standin, services.settings.marketplace_client_id, clock)
    authenticator.authenticate("Bearer " + standin.sign_token())
    old_token = standin.sign_token()
    clock.advance(webhook_auth.MIN_REFRESH_SECONDS + 1)

    new_kid = standin.rotate_key()
    claims = authenticator.authenticate("Bearer " + standin.sign_token())

    assert claims["tid"] == standin.tenant_id
    assert authenticator.keys.fetch_count == 2
    assert jwt.get_unverified_header(standin.sign_token())["kid"] == new_kid
    authenticator.authenticate("Bearer " + old_token)  # the old key stays published and valid
    authenticator.authenticate("Bearer " + standin.sign_token(version="1.0"))
    assert authenticator.keys.fetch_count == 2


def test_retired_key_is_refused_once_the_keys_are_refreshed(standin, services, clock):
    authenticator = _authenticator(standin, services.settings.marketplace_client_id, clock)
    old_token = standin.sign_token()
    authenticator.authenticate("Bearer " + old_token)

    standin.rotate_key(retire_old=True)
    clock.advance(webhook_auth.MAX_KEY_AGE_SECONDS + 1)
    authenticator.authenticate("Bearer " + standin.sign_token())  # refreshed: the new key only

    with pytest.raises(UnauthorizedError, match="key"):
        authenticator.authenticate("Bearer " + old_token)


def test_unreachable_metadata_is_a_retryable_error(standin, services, clock):
    authenticator = _authenticator(standin, services.settings.marketplace_client_id, clock)
    standin.fail_next(4, status=503, path_contains="/discovery/")

    with pytest.raises(SigningKeysUnavailableError) as raised:
        authenticator.authenticate("Bearer " + standin.sign_token())
    assert raised.value.http_status >= 500

    standin.clear_faults()
    clock.advance(webhook_auth.BACKOFF_FIRST_SECONDS + 1)
    assert authenticator.authenticate("Bearer " + standin.sign_token())["tid"] == standin.tenant_id


# --------------------------------------------------------------------------------------------------
# the key cache under attack and under faults (hardening)


def test_a_forged_kid_cannot_use_up_the_refresh_a_genuine_rotation_needs(standin, services, devhost, http):
    """Before: one refresh per 5 minutes for everyone, so a forged random kid spent it and the genuine
    webhook after Microsoft's key rotation got 401 (Microsoft reads that as a rejection)."""
    t0 = utc_now()
    services.clock = lambda: t0
    *_, warm_body = _pending_operation(standin)
    assert _post(http, devhost, warm_body, "Bearer " + standin.sign_token()).status_code == 200  # keys read at t0

    services.clock = lambda: t0 + timedelta(seconds=61)
    forged = "Bearer " + standin.sign_token(headers_overrides={"kid": uuid.uuid4().hex}, key=standin.other_key())
    _, _, other_body = _pending_operation(standin)
    assert _post(http, devhost, other_body, forged).status_code == 401  # it got its refresh, and a 401

    standin.rotate_key()  # Microsoft rotates right after
    subscription_id, operation_id, body = _pending_operation(standin, "ChangeQuantity", quantity=8)
    services.clock = lambda: t0 + timedelta(seconds=80)
    genuine = "Bearer " + standin.sign_token()
    answer = _post(http, devhost, body, genuine)
    assert 500 <= answer.status_code < 600, answer.text  # not decidable yet: retry, never a rejection
    assert standin.get_operation(operation_id)["status"] == "InProgress"
    _assert_nothing_stored(services, subscription_id, operation_id)

    services.clock = lambda: t0 + timedelta(seconds=125)  # Microsoft's retry, the keys a minute old
    retried = _post(http, devhost, body, genuine)
    assert retried.status_code == 200, retried.text
    assert services.repository.get(subscription_id).record.quantity == 8


def test_a_down_endpoint_costs_one_attempt_per_backoff_period(standin, services, clock):
    """Before: with no keys cached, every request tried again (4 calls out per request)."""
    authenticator = _authenticator(standin, services.settings.marketplace_client_id, clock)
    standin.fail_next(10_000, status=503, path_contains="openid-configuration")
    for _ in range(20):
        with pytest.raises(SigningKeysUnavailableError):
            authenticator.authenticate("Bearer " + standin.sign_token())
    assert standin.calls["openid_config"] == 2  # one attempt (the v2 and v1 documents)
    clock.advance(webhook_auth.BACKOFF_FIRST_SECONDS + 0.1)
    for _ in range(20):
        with pytest.raises(SigningKeysUnavailableError):
            authenticator.authenticate("Bearer " + standin.sign_token())
    assert standin.calls["openid_config"] == 4  # one more attempt; the next waits twice as long
    clock.advance(webhook_auth.BACKOFF_FIRST_SECONDS + 0.1)
    with pytest.raises(SigningKeysUnavailableError):
        authenticator.authenticate("Bearer " + standin.sign_token())
    assert standin.calls["openid_config"] == 4
    standin.clear_faults()
    clock.advance(2 * webhook_auth.BACKOFF_FIRST_SECONDS)
    assert authenticator.authenticate("Bearer " + standin.sign_token())["tid"] == standin.tenant_id


def test_cached_keys_keep_verifying_past_a_day_while_the_refresh_fails(standin, services, clock):
    """Before: past 24 h a failing refresh made every webhook 503 although the cached keys verify."""
    authenticator = _authenticator(standin, services.settings.marketplace_client_id, clock)
    authenticator.authenticate("Bearer " + standin.sign_token())
    clock.advance(webhook_auth.MAX_KEY_AGE_SECONDS + 1)
    standin.fail_next(10_000, status=503, path_contains="openid-configuration")
    for _ in range(5):
        assert authenticator.authenticate("Bearer " + standin.sign_token())["tid"] == standin.tenant_id
    assert authenticator.keys.attempt_count == 2  # the first fetch and one refresh attempt, then backoff
    standin.clear_faults()


class _KeysServer:
    """OpenID metadata and keys copied from the stand-in, served by a local server that can hang or
    trickle: what a slow or hostile network path looks like to the key cache."""

    def __init__(self, standin):
        self.jwks = json.dumps(standin.jwks()).encode()
        self.mode = "normal"  # "hang": wait for release; "trickle": one byte per 50 ms
        self.release = threading.Event()
        self.entered = threading.Event()
        self.bytes_sent = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                base = f"http://127.0.0.1:{self.server.server_address[1]}"
                body = json.dumps({"jwks_uri": f"{base}/keys"}).encode() if "openid-configuration" in self.path else server.jwks
                if server.mode == "hang" and "openid-configuration" in self.path:
                    server.entered.set()
                    server.release.wait(30)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.mode == "trickle":
                    try:
                        for byte in body:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            server.bytes_sent += 1
                            time.sleep(0.05)
                    except OSError:
                        return  # the client gave up
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/tenant/v2.0/.well-known/openid-configuration"

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_cached_kid_never_waits_for_a_refresh_in_progress(standin, clock):
    """Before: one global lock; concurrent webhooks queued behind a slow metadata endpoint."""
    server = _KeysServer(standin)
    try:
        keys = webhook_auth.SigningKeys([server.url], clock=clock)
        kid = jwt.get_unverified_header(standin.sign_token())["kid"]
        assert keys.get(kid) is not None
        clock.advance(webhook_auth.MIN_REFRESH_SECONDS + 1)
        server.mode = "hang"
        outcome: list = []
        refresher = threading.Thread(target=lambda: outcome.append(_safe_get(keys, "rotated-" + uuid.uuid4().hex)))
        refresher.start()
        assert server.entered.wait(10)  # the refresh is in progress, stuck on the endpoint
        assert keys.get(kid) is not None  # served from memory while it hangs
        clock.advance(webhook_auth.MAX_KEY_AGE_SECONDS + 1)
        assert keys.get(kid) is not None  # even when due for its own refresh: it does not queue
        assert refresher.is_alive()
        server.release.set()
        refresher.join(30)
        # The hung refresh outlived its budget (the clock moved a day meanwhile): a 5xx for that caller.
        assert outcome and isinstance(outcome[0], SigningKeysUnavailableError)
    finally:
        server.close()


def _safe_get(keys, kid: str):
    try:
        return keys.get(kid)
    except SigningKeysUnavailableError as error:
        return error


def test_a_trickling_metadata_server_cannot_hold_a_request_past_its_deadline(standin):
    """Before: a per-read timeout only, so one byte a second held a webhook for 48 s."""
    from shared.deadline import deadline_scope

    server = _KeysServer(standin)
    server.mode = "trickle"
    try:
        keys = webhook_auth.SigningKeys([server.url])
        with deadline_scope(1.0), pytest.raises(SigningKeysUnavailableError):
            keys.get("any")
        document_size = len(json.dumps({"jwks_uri": server.url}))
        assert server.bytes_sent < document_size  # given up mid-document, at the deadline
    finally:
        server.close()
