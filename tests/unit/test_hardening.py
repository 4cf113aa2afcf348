"""Small guarantees found while reviewing: case of tenant ids, readable redaction, policy checked by health."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from shared.health import check_health
from shared.observability import redact
from shared.settings import MARKETPLACE_RESOURCE_ID
from shared.webhook_auth import WebhookAuthenticator
from tests.fakes import fake_services

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
AUDIENCE = "a1b2c3d4-0000-4000-8000-0000000000bb"


class _StaticKeys:
    def __init__(self, key):
        self.key = key

    def get(self, kid, *, issued_at=None):
        return self.key if kid == "k1" else None


def _token(private_key, **claims) -> str:
    now = int(time.time())
    body = {
        "aud": AUDIENCE,
        "iss": f"https://login.microsoftonline.com/{TENANT}/v2.0",
        "tid": TENANT,
        "azp": MARKETPLACE_RESOURCE_ID,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        **claims,
    }
    return jwt.encode(body, private_key, algorithm="RS256", headers={"kid": "k1"})


@pytest.mark.parametrize("configured", [TENANT.upper(), f" {TENANT} "])
def test_tenant_id_setting_matches_whatever_its_case(configured):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    auth = WebhookAuthenticator(
        tenant_id=configured, audience=AUDIENCE, metadata_url="http://127.0.0.1:9/x/v2.0/.well-known/openid-configuration"
    )
    auth.keys = _StaticKeys(key.public_key())
    claims = auth.authenticate("Bearer " + _token(key))
    assert claims["tid"] == TENANT


def test_redaction_keeps_prose_but_hides_tokens():
    assert redact("Authorization is not a Bearer token") == "Authorization is not a Bearer token"
    assert "abcdefghijklmnop0123" not in redact("Authorization: Bearer abcdefghijklmnop0123+/=")


def test_health_reports_an_unloadable_publisher_policy():
    services = fake_services(PUBLISHER_POLICY="no_such_module:decide")
    status, body = check_health(lambda: services)
    assert status == 503
    assert "PUBLISHER_POLICY" in body["checks"]["configuration"]["problems"][0]


def test_health_is_ok_with_the_default_policy():
    status, body = check_health(lambda: fake_services())
    assert (status, body["status"]) == (200, "healthy")
