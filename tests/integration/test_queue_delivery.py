"""Event delivery on the work queue (event_delivery queue trigger) - see docs/events.md.

Real Azurite queues and the dev host's queue poller; no thread of the app delivers in the background.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import timedelta

import azure.functions as func
import pytest
from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy

from devtools.devhost import DevHost
from shared.domain import utc_now
from shared.events import JOB_DELIVER, MAX_JOB_ATTEMPTS
from shared.work_queue import POISON_MARKER, Job, WorkQueue
from tests.integration.test_events import (
    HOOK_SECRET,
    EventQueue,
    HookReceiver,
    activated,
    change_quantity,
    queue_name,
)

pytestmark = pytest.mark.azurite


def work_messages(azurite, name: str) -> list[dict]:
    client = QueueClient.from_connection_string(azurite.connection_string, name, message_decode_policy=TextBase64DecodePolicy())
    try:
        return [json.loads(m.content) for m in client.peek_messages(max_messages=32)]
    except Exception:  # noqa: BLE001 - a queue not created yet holds nothing
        return []


def test_a_change_enqueues_a_delivery_job_before_answering_and_nothing_runs_in_the_background(make_services, standin, azurite):
    name = queue_name()
    services = make_services(EVENTS_QUEUE_NAME=name)
    subscription_id = activated(services, standin)
    # the change answered; its event waits in the outbox and a job names the subscription
    assert len(services.repository.pending_events(subscription_id)) == 1
    assert work_messages(azurite, name + "-jobs") == [{"attempt": 0, "kind": JOB_DELIVER, "subscriptionId": subscription_id}]
    time.sleep(0.5)  # nothing else would deliver it meanwhile
    assert len(services.repository.pending_events(subscription_id)) == 1
    assert services.events.drain() == 1
    assert services.repository.pending_events(subscription_id) == []
    assert [e["subscriptionId"] for e in EventQueue(azurite, name).drain()] == [subscription_id]


def test_instance_gone_right_after_the_answer_a_second_process_delivers(make_services, standin, azurite):
    """The first services bundle answers and is dropped without draining; a second bundle (another
    process, same Azurite) serves the job and delivers, with no timer involved."""
    name = queue_name()
    with HookReceiver() as hook:
        overrides = {"EVENTS_QUEUE_NAME": name, "EVENTS_WEBHOOK_URL": hook.url, "EVENTS_WEBHOOK_SECRET": HOOK_SECRET}
        first = make_services(**overrides)
        subscription_id = activated(first, standin)
        for quantity in (6, 7):
            change_quantity(first, subscription_id, quantity)
        first._lazy.pop("events")  # gone: its jobs are never served by it
        first.close()
        assert hook.requests == []

        second = make_services(**overrides, TABLES_PREFIX=first.settings.tables_prefix)  # same storage
        results = [second.events.run_job(m.content) for m in second.events.work_queue.client.receive_messages(max_messages=32)]
        assert [(r.stats.delivered, r.stats.failed, r.stats.errors) for r in results] == [(3, 0, []), (0, 0, []), (0, 0, [])]
        received = [json.loads(r["body"]) for r in hook.requests]
        assert [e["sequence"] for e in received] == sorted(e["sequence"] for e in received)
        assert len({e["eventId"] for e in received}) == 3
        assert second.repository.pending_events(subscription_id) == []
        # duplicates of a job (at least once) deliver nothing twice
        assert second.events.run_job(Job(kind=JOB_DELIVER, subscription_id=subscription_id).to_message()).stats.delivered == 0
        assert len(hook.requests) == 3


def test_a_failing_hook_puts_the_job_back_with_backoff_then_poisons_it_and_the_sweep_delivers_later(
    make_services, standin, azurite, caplog
):
    name = queue_name()
    with HookReceiver(statuses=(500,) * 50) as hook:
        services = make_services(EVENTS_QUEUE_NAME=name, EVENTS_WEBHOOK_URL=hook.url, EVENTS_WEBHOOK_SECRET=HOOK_SECRET)
        subscription_id = activated(services, standin)
        relay = services.events
        assert relay.drain() == 1  # the hook answered 500: the job went back, invisible for the backoff
        assert work_messages(azurite, name + "-jobs") == []
        assert relay.work_queue.client.get_queue_properties().approximate_message_count == 1
        assert len(hook.requests) == 1

        delays = []
        for attempt in range(1, MAX_JOB_ATTEMPTS):
            services.clock = lambda attempt=attempt: utc_now() + timedelta(hours=2 * attempt)  # backoff elapsed
            with caplog.at_level(logging.ERROR, logger="shared.events"):
                result = relay.run_job(Job(kind=JOB_DELIVER, subscription_id=subscription_id, attempt=attempt).to_message())
            delays.append(result.retry_in_seconds)
        assert delays[:-1] == sorted(delays[:-1]) and delays[0] < delays[-2]  # exponential backoff
        assert result.poisoned and delays[-1] is None
        assert any(POISON_MARKER in r.getMessage() and subscription_id in r.getMessage() for r in caplog.records)
        poison = work_messages(azurite, name + "-jobs-poison")
        assert [m["subscriptionId"] for m in poison] == [subscription_id]
        # nothing lost: the outbox row is still pending
        assert len(services.repository.pending_events(subscription_id)) == 1

        hook.statuses.clear()  # the hook works again; the console's Redeliver (same as the sweep) delivers it
        stats = relay.relay_subscription(subscription_id, respect_backoff=False)
        assert (stats.delivered, stats.failed) == (1, 0)
        assert services.repository.pending_events(subscription_id) == []
        bodies = {json.loads(r["body"])["eventId"] for r in hook.requests}
        assert len(bodies) == 1  # every attempt carried the same eventId


def test_the_dev_host_serves_the_queue_trigger_end_to_end_in_order(make_services, standin, azurite):
    from function_app import app

    name = queue_name()
    with HookReceiver() as hook:
        services = make_services(EVENTS_QUEUE_NAME=name, EVENTS_WEBHOOK_URL=hook.url, EVENTS_WEBHOOK_SECRET=HOOK_SECRET)
        environ = {
            "EVENTS_WORK_QUEUE": name + "-jobs",
            "OPERATIONS_WORK_QUEUE": name + "-operations",
            "AzureWebJobsStorage": azurite.connection_string,
            "RECONCILE_SCHEDULE": "0 0 0 1 1 *",
            "METERING_SCHEDULE": "0 0 0 1 1 *",
            "USAGE_RECONCILE_SCHEDULE": "0 0 0 1 1 *",
        }
        with DevHost(app, port=0, timers=False, signed_in_user="", environ=environ):
            subscription_id = activated(services, standin)
            for quantity in (6, 7, 8):
                change_quantity(services, subscription_id, quantity)
            deadline = time.monotonic() + 20
            while services.repository.pending_events(subscription_id) and time.monotonic() < deadline:
                time.sleep(0.1)
        assert services.repository.pending_events(subscription_id) == []
        received = [json.loads(r["body"]) for r in hook.requests if r["status"] == 200]
        assert [e["subscription"]["quantity"] for e in received][-3:] == [6, 7, 8]
        assert [e["sequence"] for e in received] == sorted(e["sequence"] for e in received)


FAILURES: list[str] = []
bad_app = func.FunctionApp()


@bad_app.function_name("always_fails")
@bad_app.queue_trigger(arg_name="msg", queue_name="%BAD_QUEUE%", connection="AzureWebJobsStorage")
def always_fails(msg: func.QueueMessage) -> None:
    FAILURES.append(msg.get_body().decode())
    raise RuntimeError("this message always fails")


def test_the_dev_host_moves_a_message_to_poison_after_max_dequeue_count(azurite, tmp_path, caplog):
    host_json = tmp_path / "host.json"
    host_json.write_text(
        json.dumps(
            {
                "version": "2.0",
                "extensions": {
                    "queues": {"maxDequeueCount": 3, "visibilityTimeout": "00:00:00", "maxPollingInterval": "00:00:00.2"}
                },
            }
        )
    )
    name = queue_name()
    client = QueueClient.from_connection_string(azurite.connection_string, name)
    client.create_queue()
    QueueClient.from_connection_string(
        azurite.connection_string, name, message_encode_policy=TextBase64EncodePolicy()
    ).send_message("job-1")
    FAILURES.clear()
    environ = {"BAD_QUEUE": name, "AzureWebJobsStorage": azurite.connection_string}
    with (
        caplog.at_level(logging.ERROR, logger="devtools.devhost"),
        DevHost(bad_app, port=0, timers=False, signed_in_user="", environ=environ, host_json=host_json),
    ):
        deadline = time.monotonic() + 20
        while not work_messages_raw(azurite, name + "-poison") and time.monotonic() < deadline:
            time.sleep(0.1)
    assert FAILURES == ["job-1"] * 3
    assert work_messages_raw(azurite, name + "-poison") == ["job-1"]
    assert work_messages_raw(azurite, name) == []
    assert any("queue_message_poisoned" in r.getMessage() and name in r.getMessage() for r in caplog.records)


def work_messages_raw(azurite, name: str) -> list[str]:
    client = QueueClient.from_connection_string(azurite.connection_string, name, message_decode_policy=TextBase64DecodePolicy())
    try:
        return [m.content for m in client.peek_messages(max_messages=32)]
    except Exception:  # noqa: BLE001 - a queue not created yet holds nothing
        return []


def test_instance_gone_right_after_the_202_a_second_process_settles_the_operation(make_services, standin, azurite):
    """The first bundle answers the publisher change with 202 and is dropped; a second bundle (same
    Azurite) serves the "poll operation" job and settles the operation without any timer."""
    from shared import publisher

    name = queue_name()
    first = make_services(EVENTS_QUEUE_NAME=name, PUBLISHER_OPERATION_POLL_SECONDS="1")
    subscription_id = activated(first, standin)
    standin.partner_webhook = False  # only our poll can settle it
    try:
        result = publisher.request_change(
            first, publisher.ChangeRequest(subscription_id, publisher.CHANGE_QUANTITY, quantity=9), caller="test"
        )
        assert result.status == 202
        operation_id = result.body["id"]
        first._lazy.pop("follower", None)  # gone: nothing of it keeps polling
        first.close()
        second = make_services(
            EVENTS_QUEUE_NAME=name, PUBLISHER_OPERATION_POLL_SECONDS="1", TABLES_PREFIX=first.settings.tables_prefix
        )
        assert second.follower.wait_idle(20)
        assert second.publisher_store is not None
        assert second.publisher_store.get(subscription_id, operation_id).settled
        assert second.repository.get(subscription_id).record.quantity == 9
    finally:
        standin.partner_webhook = True


batch_app = func.FunctionApp()
BATCH_BARRIER = threading.Barrier(4, timeout=10)
BATCH_SEEN: list[str] = []


@batch_app.function_name("waits_for_its_batch")
@batch_app.queue_trigger(arg_name="msg", queue_name="%BATCH_QUEUE%", connection="AzureWebJobsStorage")
def waits_for_its_batch(msg: func.QueueMessage) -> None:
    BATCH_BARRIER.wait()  # passes only when the four messages run at the same time
    BATCH_SEEN.append(msg.get_body().decode())


def test_the_dev_host_runs_the_messages_of_a_batch_concurrently_as_the_functions_host_does(azurite):
    name = queue_name()
    client = QueueClient.from_connection_string(azurite.connection_string, name, message_encode_policy=TextBase64EncodePolicy())
    client.create_queue()
    for index in range(4):
        client.send_message(f"job-{index}")
    BATCH_SEEN.clear()
    environ = {"BATCH_QUEUE": name, "AzureWebJobsStorage": azurite.connection_string}
    with DevHost(batch_app, port=0, timers=False, signed_in_user="", environ=environ):
        deadline = time.monotonic() + 20
        while len(BATCH_SEEN) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert sorted(BATCH_SEEN) == [f"job-{index}" for index in range(4)]
    assert not BATCH_BARRIER.broken
    assert work_messages_raw(azurite, name) == [] and work_messages_raw(azurite, name + "-poison") == []


def job_client(azurite, name: str) -> QueueClient:
    """A client for a work queue as the app makes one (base64 text messages)."""
    return QueueClient.from_connection_string(
        azurite.connection_string,
        name,
        message_encode_policy=TextBase64EncodePolicy(),
        message_decode_policy=TextBase64DecodePolicy(),
    )


def test_tracked_delays_are_released_by_the_injected_clock_not_by_waiting(azurite):
    """What the tests rely on instead of sleeping: a delayed job is a real message sent with a
    visibility timeout; release_delayed(now) makes the ones due by ``now`` visible at once."""
    now = utc_now()
    clock = [now]
    name = queue_name()
    queue = WorkQueue(job_client(azurite, name), clock=lambda: clock[0]).track_delays()
    queue.put(Job(kind=JOB_DELIVER, subscription_id="a"), delay_seconds=30)
    queue.put(Job(kind=JOB_DELIVER, subscription_id="b"), delay_seconds=90)
    queue.put(Job(kind=JOB_DELIVER, subscription_id="c"))  # no delay: visible, not tracked
    assert queue.delayed() == [now + timedelta(seconds=30), now + timedelta(seconds=90)]
    assert [m["subscriptionId"] for m in work_messages(azurite, name)] == ["c"]

    assert queue.release_delayed(now + timedelta(seconds=29)) == 0
    assert [m["subscriptionId"] for m in work_messages(azurite, name)] == ["c"]
    assert queue.release_delayed(now + timedelta(seconds=30)) == 1
    assert sorted(m["subscriptionId"] for m in work_messages(azurite, name)) == ["a", "c"]
    assert queue.delayed() == [now + timedelta(seconds=90)]
    assert queue.release_delayed() == 1  # None: every tracked delay has passed
    assert sorted(m["subscriptionId"] for m in work_messages(azurite, name)) == ["a", "b", "c"]
    assert queue.delayed() == [] and queue.release_delayed() == 0


def test_an_untracked_queue_keeps_its_delays_to_storage(azurite):
    """Production queues track nothing (no memory grows across invocations): releasing is a no-op."""
    name = queue_name()
    queue = WorkQueue(job_client(azurite, name))
    queue.put(Job(kind=JOB_DELIVER, subscription_id="a"), delay_seconds=30)
    assert queue.release_delayed() == 0 and queue.delayed() == []
    assert work_messages(azurite, name) == [] and queue.waiting() == 1


def test_the_poll_job_waits_the_poll_delay_then_doubles_by_the_services_clock(make_services, standin):
    """The follow-up's time rules on the injected clock: the first poll is due after
    PUBLISHER_OPERATION_POLL_SECONDS, an open operation's next poll after twice that."""
    from shared import publisher

    services = make_services(PUBLISHER_OPERATION_POLL_SECONDS="5")
    subscription_id = activated(services, standin)
    standin.partner_webhook = False
    standin.operation_delay_seconds = 3600  # Microsoft keeps it InProgress
    try:
        now = utc_now()
        services.clock = lambda: now
        result = publisher.request_change(
            services, publisher.ChangeRequest(subscription_id, publisher.CHANGE_QUANTITY, quantity=9), caller="test"
        )
        assert result.status == 202
        queue = services.follower.queue
        assert queue.delayed() == [now + timedelta(seconds=5)]
        assert queue.release_delayed(now + timedelta(seconds=4)) == 0
        assert queue.drain(services.follower.run_job) == 0  # not due: nothing polled
        assert queue.release_delayed(now + timedelta(seconds=5)) == 1
        assert queue.drain(services.follower.run_job) == 1  # polled once: still InProgress, put back
        assert queue.delayed() == [now + timedelta(seconds=10)]
    finally:
        standin.partner_webhook = True
