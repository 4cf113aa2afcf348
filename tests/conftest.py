"""Shared test harness: real Azurite (npm), the marketplace stand-in over real HTTP, and the dev host.

Each test gets its own table prefix, so tests never see each other's data while sharing one
Azurite process, one stand-in and one dev host for the whole session.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid

import pytest

from devtools.azurite import Azurite
from devtools.marketplace_standin import MarketplaceStandIn

TENANT_ID = "72f988bf-0000-4000-8000-0000000000aa"
APP_CLIENT_ID = "a1b2c3d4-0000-4000-8000-0000000000bb"
FORM_SECRET = "test-form-secret-0123456789abcdef"
TEST_USER = "Ada Lovelace <ada@contoso.example>"
PUBLISHER_API_AUDIENCE = "api://contoso-fulfillment-api"


@pytest.fixture(scope="session")
def azurite():
    instance = Azurite(in_memory=False).start()
    yield instance
    instance.stop()


@pytest.fixture(scope="session")
def standin_session():
    instance = MarketplaceStandIn(host="127.0.0.1", port=0, tenant_id=TENANT_ID, audience=APP_CLIENT_ID)
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture
def standin(standin_session):
    standin_session.reset()
    standin_session.auto_accept_seconds = None  # tests answer operations explicitly
    yield standin_session
    standin_session.reset()


def make_env(azurite, standin, **overrides) -> dict[str, str]:
    prefix = overrides.get("TABLES_PREFIX") or "t" + uuid.uuid4().hex[:12]
    env = {
        "MARKETPLACE_API_BASE_URL": standin.api_base_url,
        "MARKETPLACE_AUTH": "none",
        "MARKETPLACE_TENANT_ID": TENANT_ID,
        "MARKETPLACE_CLIENT_ID": APP_CLIENT_ID,
        "TABLES_CONNECTION_STRING": azurite.connection_string,
        "TABLES_PREFIX": prefix,
        "LANDING_FORM_SECRET": FORM_SECRET,
        "WEBHOOK_AUTH": "entra",
        "WEBHOOK_OPENID_CONFIG_URL": standin.openid_config_url,
        "PUBLISHER_API_AUTH": "entra",
        "PUBLISHER_API_AUDIENCE": PUBLISHER_API_AUDIENCE,
        "PUBLISHER_API_OPENID_CONFIG_URL": standin.openid_config_url,
        "SAAS_APP_URL": "https://app.contoso.example/",
        "SUPPORT_EMAIL": "support@contoso.example",
        "BRAND_NAME": "Contoso Analytics",
    }
    if "EVENTS_QUEUE_NAME" not in overrides:  # else the work queues derive from the test's queue name
        # Work queues of the test's own (shared by bundles on the same storage): a job left waiting
        # never reaches another test's bundle.
        env.update(EVENTS_WORK_QUEUE=prefix + "-jobs", OPERATIONS_WORK_QUEUE=prefix + "-operations")
    env.update(overrides)
    return env


# Threads the app may start (shared/parallel.py), and the names the relay and follower pools had.
APP_THREAD_PREFIXES = ("app-parallel", "usage-storage", "event-relay", "publisher-follow")


@pytest.fixture
def make_services(azurite, standin):
    """Build a services bundle against Azurite and the stand-in, and install it as the app's factory."""
    from shared.services import build_services, set_services_factory
    from shared.settings import Settings

    built = []

    def factory(**overrides):
        settings = Settings.from_env(make_env(azurite, standin, **overrides))
        services = build_services(settings)
        services.repository.ensure_tables()
        # Delayed jobs (poll waits, delivery backoff) are released by the tests, never waited for.
        services.events.work_queue.track_delays()
        services.follower.queue.track_delays()
        set_services_factory(lambda: services)
        built.append(services)
        return services

    yield factory
    set_services_factory(None)
    for services in built:
        relay = services._lazy.get("events")
        if relay is not None:
            relay.wait_idle(30)  # delivery jobs are drained inside the test that caused them
        services.close()
    # No work outlives its invocation: no thread of the app's relay or follower is left running.
    leftover = [t.name for t in threading.enumerate() if t.is_alive() and t.name.startswith(APP_THREAD_PREFIXES)]
    assert not leftover, f"threads started by the app still alive after the test: {leftover}"


@pytest.fixture
def services(make_services):
    return make_services()


@pytest.fixture(scope="session")
def devhost_session():
    from devtools.devhost import DevHost
    from function_app import app

    os.environ.setdefault("RECONCILE_SCHEDULE", "0 0 0 1 1 *")
    os.environ.setdefault("METERING_SCHEDULE", "0 0 0 1 1 *")
    os.environ.setdefault("USAGE_RECONCILE_SCHEDULE", "0 0 0 1 1 *")
    host = DevHost(app, host="127.0.0.1", port=0, signed_in_user=TEST_USER, timers=False, queues=False)
    host.start()
    yield host
    host.stop()


def sign_in(host, user: str | None) -> None:
    """Make the dev host's Easy Auth stand-in sign in ``user`` ("Name <email>"), or nobody (None)."""
    from devtools.devhost import SignedInUser

    host.signed_in_user = SignedInUser.parse(user) if user else None


def flag_with_waiting_event(services, sid: str) -> None:
    """Flag ``sid`` for a person (``needs_a_look``) with inline delivery off, so its lifecycle event
    waits in the outbox for a redelivery."""
    from shared import state_machine as sm
    from shared.events import build_event_document

    services.repository.on_event_written = None
    change = sm.Change(kind=sm.Kind.FLAG, source=sm.Source.RECONCILE, occurred_at=services.clock(), flag="needs_a_look")
    services.repository.apply(sid, lambda r: sm.apply(r, change, now=services.clock()), build_event=build_event_document)


@pytest.fixture
def devhost(devhost_session, services):
    """The dev host serving function_app.app, wired to this test's services. No function it ran
    may return with a thread it started still running (the Functions host would not track it)."""
    sign_in(devhost_session, TEST_USER)
    devhost_session.threads_left.clear()
    yield devhost_session
    sign_in(devhost_session, TEST_USER)
    assert devhost_session.threads_left == [], "functions returned with threads still running"


@pytest.fixture
def http():
    """A requests session for loopback calls (never through a proxy from the environment). Every
    answer of a route the OpenAPI document describes is validated against it (tests/contract.py)."""
    import requests

    from tests.contract import contract_hook

    session = requests.Session()
    session.trust_env = False
    session.hooks["response"].append(contract_hook)
    yield session
    session.close()


@pytest.fixture(autouse=True)
def _quiet_azure_logs():
    logging.getLogger("azure").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
