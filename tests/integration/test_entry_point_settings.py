"""Each function requires only the settings it uses: a missing landing page secret stops the landing
page (503 page) and shows in the health check, while the webhook keeps working."""

from __future__ import annotations

import uuid

import pytest
import requests

from shared.services import build_services, set_services_factory
from shared.settings import Settings
from tests.conftest import make_env

pytestmark = pytest.mark.azurite


@pytest.fixture
def without_landing_secret(azurite, standin, devhost_session):
    settings = Settings.from_env(make_env(azurite, standin, LANDING_FORM_SECRET=""), require=())
    services = build_services(settings)
    services.repository.ensure_tables()
    set_services_factory(lambda: services)
    standin.webhook_url = devhost_session.url + "/api/webhook"
    yield services
    set_services_factory(None)
    relay = services._lazy.get("events")
    if relay is not None:
        relay.wait_idle(30)
    services.close()


def test_a_missing_landing_secret_stops_only_the_landing_page(without_landing_secret, standin, devhost_session):
    services = without_landing_secret
    session = requests.Session()
    session.trust_env = False

    purchase = standin.create_purchase(plan_id="standard", quantity=2)
    page = session.get(devhost_session.url + "/api/landing", params={"token": purchase["token"]}, timeout=30)
    assert page.status_code == 503 and 'data-testid="support-reference"' in page.text
    assert standin.calls["resolve"] == 0  # refused before any outbound call

    health = session.get(devhost_session.url + "/api/health", timeout=30)
    assert health.status_code == 503
    configuration = health.json()["checks"]["configuration"]
    assert configuration["ok"] is False
    assert configuration["functions"] == {"landing_page": ["LANDING_FORM_SECRET is required (32+ random characters)"]}
    assert health.json()["checks"]["storage"]["ok"] is True

    (subscription_id,) = standin.seed(1, plan_id="standard", quantity=5)
    operation = standin.trigger(subscription_id, "Suspend")  # delivered to the dev host, signed
    assert standin.webhook_deliveries == [(operation["id"], 200)]
    stored = services.repository.get(subscription_id)
    assert stored is not None and stored.record.status.value == "Suspended"


def test_an_unconfigured_publisher_api_is_disabled_not_unhealthy(azurite, standin, devhost_session, http):
    services = build_services(Settings.from_env(make_env(azurite, standin, PUBLISHER_API_AUDIENCE=""), require=()))
    services.repository.ensure_tables()
    set_services_factory(lambda: services)
    try:
        _check_publisher_api_disabled(devhost_session, http)
    finally:
        set_services_factory(None)
        services.close()


def _check_publisher_api_disabled(devhost_session, http):
    health = http.get(devhost_session.url + "/api/health", timeout=30)
    assert health.status_code == 200, health.text
    configuration = health.json()["checks"]["configuration"]
    assert configuration["ok"] is True
    assert configuration["disabled"] == {"publisher_api": ["PUBLISHER_API_AUDIENCE is required when PUBLISHER_API_AUTH=entra"]}
    answer = http.get(devhost_session.url + f"/api/subscriptions/{uuid.uuid4()}", timeout=30)
    assert answer.status_code == 503 and answer.json()["error"] == "configuration_error"
