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
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization

from devtools.marketplace_standin import MARKETPLACE_APP_ID
from shared import webhook_auth
from shared.errors import ConfigurationError, UnauthorizedError
from shared.webhook_auth import SigningKeysUnavailableError, WebhookAuthenticator

OTHER_TENANT = "0b5e5f3a-0000-4000-8000-0000000000cc"


# --------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def http():
    session = requests.Session()
    session.trust_env = False  # loopback only: never through a proxy from the environment
    yield session
    session.close()


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
    """Stands in for the ``time`` module inside shared.webhook_auth (monotonic only is used there)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(webhook_auth, "time", fake)
    return fake


def _authenticator(standin, audience: str) -> WebhookAuthenticator:
    return WebhookAuthenticator(tenant_id=standin.tenant_id, audience=audience, metadata_url=standin.openid_config_url)


def test_webhook_audience_setting_replaces_the_client_id(standin, make_services):
    custom = str(uuid.uuid4())
    services = make_services(WEBHOOK_AUDIENCE=custom)
    authenticator = services.webhook_authenticator

    assert authenticator.authenticate("Bearer " + standin.sign_token({"aud": custom}))["aud"] == custom
    assert authenticator.authenticate("Bearer " + standin.sign_token({"aud": f"api://{custom}"}))
    with pytest.raises(UnauthorizedError, match="audience"):
        authenticator.authenticate("Bearer " + standin.sign_token())  # MARKETPLACE_CLIENT_ID no longer counts


def test_keys_are_fetched_once_and_cached(standin, services, clock):
    authenticator = _authenticator(standin, services.settings.marketplace_client_id)
    tokens = [standin.sign_token(), standin.sign_token(version="1.0")] * 10

    for token in tokens:
        assert authenticator.authenticate("Bearer " + token)["tid"] == standin.tenant_id
    clock.advance(3600)  # an hour later the cache still serves
    authenticator.authenticate("Bearer " + standin.sign_token())

    assert authenticator.keys.fetch_count == 1
    assert standin.calls["openid_config"] == 2  # v2 and v1 metadata
    assert standin.calls["jwks"] == 2


def test_keys_are_refetched_when_older_than_a_day(standin, services, clock):
    authenticator = _authenticator(standin, services.settings.marketplace_client_id)
    authenticator.authenticate("Bearer " + standin.sign_token())
    clock.advance(webhook_auth.MAX_KEY_AGE_SECONDS + 1)
    authenticator.authenticate("Bearer " + standin.sign_token())
    assert authenticator.keys.fetch_count == 2


def test_unknown_kids_refresh_the_keys_at_most_once_per_interval(standin, services, clock):
    """A flood of tokens with made-up kids must not turn into a flood of metadata fetches."""
    authenticator = _authenticator(standin, services.settings.marketplace_client_id)
    authenticator.authenticate("Bearer " + standin.sign_token())
    assert authenticator.keys.fetch_count == 1

    def unknown_kid() -> str:
        return "Bearer " + standin.sign_token(headers_overrides={"kid": uuid.uuid4().hex}, key=standin.other_key())

    for _ in range(10):
        with pytest.raises(UnauthorizedError, match="key"):
            authenticator.authenticate(unknown_kid())
        clock.advance(1)
    assert authenticator.keys.fetch_count <= 2
    jwks_calls = standin.calls["jwks"]

    clock.advance(webhook_auth.REFRESH_INTERVAL_SECONDS + 1)
    with pytest.raises(UnauthorizedError, match="key"):
        authenticator.authenticate(unknown_kid())
    with pytest.raises(UnauthorizedError, match="key"):
        authenticator.authenticate(unknown_kid())
    assert standin.calls["jwks"] == jwks_calls + 2  # exactly one refresh (v2 + v1 key sets) in the new interval
    # Known kids keep working throughout, without fetching.
    authenticator.authenticate("Bearer " + standin.sign_token())
    assert standin.calls["jwks"] == jwks_calls + 2


def test_rotated_key_is_accepted_after_exactly_one_refresh(standin, services, clock):
    authenticator = _authenticator(standin, services.settings.marketplace_client_id)
    authenticator.authenticate("Bearer " + standin.sign_token())
    old_token = standin.sign_token()
    clock.advance(5)

    new_kid = standin.rotate_key()
    claims = authenticator.authenticate("Bearer " + standin.sign_token())

    assert claims["tid"] == standin.tenant_id
    assert authenticator.keys.fetch_count == 2
    assert jwt.get_unverified_header(standin.sign_token())["kid"] == new_kid
    authenticator.authenticate("Bearer " + old_token)  # the old key stays published and valid
    authenticator.authenticate("Bearer " + standin.sign_token(version="1.0"))
    assert authenticator.keys.fetch_count == 2


def test_retired_key_is_refused_once_the_keys_are_refreshed(standin, services, clock):
    authenticator = _authenticator(standin, services.settings.marketplace_client_id)
    old_token = standin.sign_token()
    authenticator.authenticate("Bearer " + old_token)

    standin.rotate_key(retire_old=True)
    clock.advance(webhook_auth.MAX_KEY_AGE_SECONDS + 1)
    authenticator.authenticate("Bearer " + standin.sign_token())  # refreshed: the new key only

    with pytest.raises(UnauthorizedError, match="key"):
        authenticator.authenticate("Bearer " + old_token)


def test_unreachable_metadata_is_a_retryable_error(standin, services, clock):
    authenticator = _authenticator(standin, services.settings.marketplace_client_id)
    standin.fail_next(4, status=503, path_contains="/discovery/")

    with pytest.raises(SigningKeysUnavailableError) as raised:
        authenticator.authenticate("Bearer " + standin.sign_token())
    assert raised.value.http_status >= 500

    standin.clear_faults()
    assert authenticator.authenticate("Bearer " + standin.sign_token())["tid"] == standin.tenant_id
