""" "Instance gone right after the answer" with real operating-system processes (issue 24).

An app process (the dev host, as ``func start`` would run it) answers a webhook with 200 or a
publisher change with 202 and is killed at once (SIGKILL: nothing of it runs after the answer).
A second app process on the same Azurite, serving the queue triggers with timers off, delivers
the event and settles the operation: the work was on the Storage queue, not in the first process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from shared.state_machine import LocalStatus
from tests.conftest import make_env
from tests.integration.test_events import HOOK_SECRET, HookReceiver, activated, queue_name, serve_delivery_jobs
from tests.integration.test_publisher_api import API_AUDIENCE, SAAS_APP_ID, WRITE

pytestmark = pytest.mark.azurite

ROOT = Path(__file__).resolve().parents[2]
NEVER = "0 0 0 1 1 *"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def app_process(env: dict[str, str], log: Path, *, queues: bool) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The dev host in its own process (cwd outside the project: no local.settings.json of a
    developer is read); yields its base URL once it answers, kills it on the way out."""
    port = _free_port()
    argv = [sys.executable, "-m", "devtools.devhost", "--port", str(port), "--no-timers", "--log-level", "INFO"]
    if not queues:
        argv.append("--no-queues")
    environ = {
        **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR", "SYSTEMROOT")},
        **env,
        "PYTHONPATH": str(ROOT),
    }
    with log.open("ab") as output:
        process = subprocess.Popen(argv, cwd=log.parent, env=environ, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"the app process ended at start-up:\n{log.read_text(errors='replace')[-3000:]}"
            try:
                if requests.get(url + "/admin/host/status", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the app process did not start in 30 s"
            time.sleep(0.1)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def kill_now(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=10) == -signal.SIGKILL


def wait_until(predicate, timeout: float, message: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, message
        time.sleep(0.1)
    return value


def process_env(services, azurite, standin, **overrides: str) -> dict[str, str]:
    """The environment of an app process on the same storage and work queues as ``services``."""
    settings = services.settings
    return {
        **make_env(azurite, standin, **overrides),
        "TABLES_PREFIX": settings.tables_prefix,
        "EVENTS_WORK_QUEUE": settings.events_work_queue,
        "OPERATIONS_WORK_QUEUE": settings.operations_work_queue,
        "AzureWebJobsStorage": azurite.connection_string,
        "RECONCILE_SCHEDULE": NEVER,
        "METERING_SCHEDULE": NEVER,
        "USAGE_RECONCILE_SCHEDULE": NEVER,
    }


def test_killed_right_after_the_webhook_200_a_second_process_delivers_the_event(make_services, standin, azurite, tmp_path):
    name = queue_name()
    with HookReceiver() as hook:
        overrides = {"EVENTS_QUEUE_NAME": name, "EVENTS_WEBHOOK_URL": hook.url, "EVENTS_WEBHOOK_SECRET": HOOK_SECRET}
        services = make_services(**overrides)  # the test's view of the same storage
        subscription_id = activated(services, standin)
        serve_delivery_jobs()
        assert services.repository.pending_events(subscription_id) == []
        delivered_before = len(hook.requests)
        env = process_env(services, azurite, standin, **overrides)

        with app_process(env, tmp_path / "first.log", queues=False) as (url, first):
            standin.webhook_url = url + "/api/webhook"
            before = len(standin.webhook_deliveries)
            standin.trigger(subscription_id, "Suspend")
            assert [status for _, status in standin.webhook_deliveries[before:]] == [200]
            kill_now(first)  # gone the moment it answered

        # The change is committed and its event waits in the outbox; nobody delivered it.
        assert services.repository.get(subscription_id).record.status is LocalStatus.SUSPENDED
        assert len(services.repository.pending_events(subscription_id)) == 1
        assert len(hook.requests) == delivered_before

        with app_process(env, tmp_path / "second.log", queues=True):
            wait_until(
                lambda: len(hook.requests) > delivered_before, 20, "the second process delivered nothing from the work queue"
            )
            wait_until(lambda: not services.repository.pending_events(subscription_id), 10, "the outbox row stayed pending")
        events = [json.loads(r["body"]) for r in hook.requests[delivered_before:]]
        assert {e["eventType"] for e in events} == {"subscription.suspended"}
        assert len({e["eventId"] for e in events}) == 1  # at least once, one eventId


def test_killed_right_after_the_publisher_202_a_second_process_settles_the_operation(make_services, standin, azurite, tmp_path):
    overrides = {
        "PUBLISHER_API_AUTH": "entra",
        "PUBLISHER_API_AUDIENCE": API_AUDIENCE,
        "PUBLISHER_API_OPENID_CONFIG_URL": standin.openid_config_url,
        "PUBLISHER_OPERATION_POLL_SECONDS": "1",
    }
    services = make_services(**overrides)
    subscription_id = activated(services, standin)
    serve_delivery_jobs()
    env = process_env(services, azurite, standin, **overrides)
    token = standin.sign_token({"aud": API_AUDIENCE, "azp": SAAS_APP_ID, "roles": [WRITE]})
    standin.partner_webhook = False  # Microsoft's Partner webhook would settle it too: only our poll may
    try:
        with app_process(env, tmp_path / "first.log", queues=False) as (url, first):
            answer = requests.patch(
                f"{url}/api/subscriptions/{subscription_id}",
                json={"quantity": 9},
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
            )
            assert answer.status_code == 202, answer.text
            kill_now(first)
        operation_id = answer.json()["id"]
        store = services.publisher_store
        assert store is not None and not store.get(subscription_id, operation_id).settled
        assert services.repository.get(subscription_id).record.quantity != 9

        with app_process(env, tmp_path / "second.log", queues=True):
            wait_until(lambda: store.get(subscription_id, operation_id).settled, 30, "the second process did not settle it")
        assert store.get(subscription_id, operation_id).status == "Succeeded"
        assert services.repository.get(subscription_id).record.quantity == 9
        assert standin.calls["update"] == 1  # one PATCH: the second process only polled
    finally:
        standin.partner_webhook = True
