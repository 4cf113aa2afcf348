"""Lifecycle events against Azurite: outbox -> relay -> Storage queue (and the signed HTTPS hook).

Everything here is real: Azurite tables and queues, the marketplace stand-in over HTTP, webhooks
delivered through the dev host, the relay's background threads, a local HTTP receiver for the
hook. Queue messages are read back the way a queue-triggered Function reads them (base64 text).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import UpdateMode
from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy

from devtools.azurite import free_port
from shared import state_machine as sm
from shared.activation import ActivationResult, activate, request_operator_activation
from shared.domain import format_timestamp, parse_timestamp, utc_now
from shared.errors import StorageUnavailableError
from shared.events import (
    EVENT_ID_HEADER,
    JOB_DELIVER,
    SIGNATURE_HEADER,
    EventRelay,
    backoff_for,
    build_event_document,
    event_id_for,
    verify_signature,
)
from shared.landing import view_purchase
from shared.observability import correlation
from shared.principal import SignedInUser
from shared.reconcile import FLAG_AWAITING_OPERATOR, run_reconciliation
from shared.repository import EVENT_PREFIX
from shared.state_machine import Change, Kind, Source
from shared.work_queue import Job

pytestmark = pytest.mark.azurite

USER = SignedInUser(name="Ada Lovelace", email="ada@contoso.example", object_id=str(uuid.uuid4()))
HOOK_SECRET = "events-hook-secret-0123456789abcdef"
WAIT = 20.0


# ---------------------------------------------------------------------------------------------
# helpers


def queue_name() -> str:
    return "ev-" + uuid.uuid4().hex[:10]


def eventually(predicate, timeout: float = WAIT, interval: float = 0.05, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        serve_delivery_jobs()  # what the Functions host's queue trigger does meanwhile
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message() if callable(message) else message}")
        time.sleep(interval)


def serve_delivery_jobs() -> None:
    """Run the visible delivery jobs of the installed services as the event_delivery function does
    (no thread of the app delivers in the background any more)."""
    from shared.services import get_services

    relay = get_services()._lazy.get("events")
    if relay is not None:
        relay.drain()


class EventQueue:
    """Reads (and removes) the messages of one queue as a queue-triggered Function would."""

    def __init__(self, azurite, name: str):
        self.client = QueueClient.from_connection_string(
            azurite.connection_string, name, message_decode_policy=TextBase64DecodePolicy()
        )
        self.received: list[dict] = []

    def drain(self) -> list[dict]:
        serve_delivery_jobs()
        try:
            messages = list(self.client.receive_messages(messages_per_page=32, visibility_timeout=300))
        except ResourceNotFoundError:
            return self.received  # the relay creates the queue on its first delivery
        for message in messages:
            self.received.append(json.loads(message.content))
            self.client.delete_message(message)
        return self.received

    def wait_for(self, count: int, timeout: float = WAIT) -> list[dict]:
        seen = lambda: [(e["eventType"], e["sequence"]) for e in self.received]  # noqa: E731
        eventually(lambda: len(self.drain()) >= count, timeout, message=lambda: f"{count} queue messages; got {seen()}")
        time.sleep(0.2)
        return self.drain()

    def for_subscription(self, subscription_id: str) -> list[dict]:
        return [event for event in self.drain() if event["subscriptionId"] == subscription_id]


def outbox(services, subscription_id: str) -> list[dict]:
    """Every outbox row of the subscription (delivered or not), in sequence order."""
    rows = services.repository._subscriptions.query_entities(
        "PartitionKey eq @pk and Kind eq 'event'", parameters={"pk": subscription_id}
    )
    return sorted(rows, key=lambda row: row["RowKey"])


def wait_until_delivered(services, subscription_id: str, timeout: float = WAIT) -> None:
    def pending():
        serve_delivery_jobs()
        return [(e.seq, e.attempts, e.queue_done) for e in services.repository.pending_events(subscription_id)]

    eventually(lambda: not pending(), timeout, message=lambda: f"the outbox of {subscription_id} to empty; pending {pending()}")


def new_purchase(services, standin, plan_id: str = "standard", quantity: int | None = 5) -> str:
    purchase = standin.create_purchase(plan_id=plan_id, quantity=quantity)
    page = view_purchase(services, purchase["token"], USER)
    assert page.status == 200 and page.template == "confirm.html"
    return purchase["subscriptionId"]


def activated(services, standin, **kwargs) -> str:
    subscription_id = new_purchase(services, standin, **kwargs)
    result = activate(services, subscription_id, actor=USER.label, source=Source.LANDING_PAGE)
    assert result.result is ActivationResult.ACTIVATED
    return subscription_id


def change_quantity(services, subscription_id: str, quantity: int, source: Source = Source.OPERATOR) -> sm.Outcome:
    """An operator's change, applied like every other change (read, decide, ETag-guarded write)."""

    def decide(record):
        now = utc_now()
        change = Change(
            kind=Kind.CHANGE_QUANTITY,
            source=source,
            occurred_at=now,
            quantity=quantity,
            actor="operator",
            correlation_id=f"cid-{quantity}",
        )
        return sm.apply(record, change, now=now)

    return services.repository.apply(subscription_id, decide, build_event=build_event_document, attempts=200)


def webhook_via_devhost(standin, devhost, subscription_id: str, action: str, **kwargs) -> dict:
    standin.webhook_url = devhost.url + "/api/webhook"
    before = len(standin.webhook_deliveries)
    operation = standin.trigger(subscription_id, action, **kwargs)
    assert [status for _, status in standin.webhook_deliveries[before:]] == [200], standin.webhook_deliveries[before:]
    return operation


class HookReceiver:
    """A local HTTP endpoint for EVENTS_WEBHOOK_URL: records requests, answers scripted statuses."""

    def __init__(self, statuses: tuple[int, ...] = (), delay: float = 0.0):
        self.statuses = list(statuses)  # answered first, in order; then 200
        self.delay = delay
        self.requests: list[dict] = []
        self.started = threading.Event()
        self.finished = threading.Event()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode("utf-8")
                with receiver._lock:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.requests.append(
                        {"body": body, "headers": dict(self.headers), "status": status, "at": time.monotonic()}
                    )
                receiver.started.set()
                if receiver.delay:
                    time.sleep(receiver.delay)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                receiver.finished.set()

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/subscription-events"

    def __enter__(self) -> HookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def assert_in_order(events: list[dict]) -> None:
    sequences = [event["sequence"] for event in events]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences), sequences


# ---------------------------------------------------------------------------------------------
# each transition yields exactly one event


def test_each_transition_through_landing_page_and_webhooks_yields_exactly_one_event(make_services, standin, devhost, azurite):
    name = queue_name()
    services = make_services(EVENTS_QUEUE_NAME=name)
    queue = EventQueue(azurite, name)

    # landing page: the purchase is recorded (no event), the first Activate is refused (400) ...
    subscription_id = new_purchase(services, standin, plan_id="standard", quantity=5)
    standin.fail_next(1, status=400, path_contains="/activate")
    with correlation("cid-landing-1"):
        failed = activate(services, subscription_id, actor=USER.label, source=Source.LANDING_PAGE)
    assert failed.result is ActivationResult.FAILED
    # ... and the buyer's retry succeeds
    with correlation("cid-landing-2"):
        assert (
            activate(services, subscription_id, actor=USER.label, source=Source.LANDING_PAGE).result is ActivationResult.ACTIVATED
        )

    # Microsoft's changes, delivered as signed webhooks through the dev host
    operations = [
        webhook_via_devhost(standin, devhost, subscription_id, "ChangePlan", plan_id="premium"),
        webhook_via_devhost(standin, devhost, subscription_id, "ChangeQuantity", quantity=12),
        webhook_via_devhost(standin, devhost, subscription_id, "Suspend"),
        webhook_via_devhost(standin, devhost, subscription_id, "Reinstate"),
        webhook_via_devhost(standin, devhost, subscription_id, "Renew"),
        webhook_via_devhost(standin, devhost, subscription_id, "Unsubscribe"),
    ]
    expected = [
        sm.EVENT_ACTIVATION_FAILED,
        sm.EVENT_ACTIVATED,
        sm.EVENT_PLAN_CHANGED,
        sm.EVENT_QUANTITY_CHANGED,
        sm.EVENT_SUSPENDED,
        sm.EVENT_REINSTATED,
        sm.EVENT_RENEWED,
        sm.EVENT_UNSUBSCRIBED,
    ]

    # delivered by the inline (background) relay alone: no relay pass is run here
    events = queue.wait_for(len(expected))
    wait_until_delivered(services, subscription_id)
    assert [event["eventType"] for event in events] == expected
    assert_in_order(events)

    # an event exists if and only if the transition was applied: one outbox row per event,
    # none for the history entries that applied nothing (purchase recorded, activation claims)
    rows = outbox(services, subscription_id)
    assert [row["EventId"] for row in rows] == [event["eventId"] for event in events]
    assert not any(row["Pending"] for row in rows)
    history = {entry["seq"]: entry for entry in services.repository.history(subscription_id)}
    assert len(history) > len(events)
    for event in events:
        entry = history[event["sequence"]]
        assert entry["result"] == "applied" and entry["toStatus"] == event["subscription"]["status"]
        assert event["eventId"] == event_id_for(subscription_id, event["sequence"])
        assert event["occurredAt"] == entry["occurredAt"] and event["correlationId"] == (entry["correlationId"] or None)
    without_event = set(history) - {event["sequence"] for event in events}
    assert {history[seq]["kind"] for seq in without_event} == {"record_purchase", "activation_sent"}

    by_type = {event["eventType"]: event for event in events}
    # the source, the Marketplace operation id and the correlation id
    assert by_type[sm.EVENT_ACTIVATION_FAILED]["source"] == "landing_page"
    assert by_type[sm.EVENT_ACTIVATION_FAILED]["correlationId"] == "cid-landing-1"
    assert by_type[sm.EVENT_ACTIVATED]["correlationId"] == "cid-landing-2"
    assert by_type[sm.EVENT_ACTIVATED]["operationId"] is None
    webhook_events = events[2:]
    assert [event["operationId"] for event in webhook_events] == [operation["id"] for operation in operations]
    assert all(event["source"] == "webhook" and event["correlationId"] for event in webhook_events)
    # the snapshot after the change and the previous values
    assert by_type[sm.EVENT_ACTIVATED]["subscription"]["activatedBy"] == USER.label
    assert by_type[sm.EVENT_ACTIVATED]["previous"]["status"] == "ActivationRequested"
    plan = by_type[sm.EVENT_PLAN_CHANGED]
    assert (plan["previous"]["planId"], plan["subscription"]["planId"]) == ("standard", "premium")
    quantity = by_type[sm.EVENT_QUANTITY_CHANGED]
    assert (quantity["previous"]["quantity"], quantity["subscription"]["quantity"]) == (5, 12)
    assert by_type[sm.EVENT_SUSPENDED]["subscription"]["status"] == "Suspended"
    assert by_type[sm.EVENT_REINSTATED]["previous"]["status"] == "Suspended"
    renewed = by_type[sm.EVENT_RENEWED]
    assert (
        renewed["subscription"]["term"]["startDate"][:10] == standin.get_subscription(subscription_id)["term"]["startDate"][:10]
    )
    assert "termStart" in renewed["previous"] and renewed["previous"]["termStart"] != renewed["subscription"]["term"]["startDate"]

    # the unsubscribed event carries the date until which data must be kept: >= 7 days after
    gone = by_type[sm.EVENT_UNSUBSCRIBED]
    cancelled_at = parse_timestamp(standin.get_operation(operations[-1]["id"])["timeStamp"])
    retain = parse_timestamp(gone["retainDataUntil"])
    assert retain - cancelled_at >= timedelta(days=7)
    assert retain - parse_timestamp(gone["occurredAt"]) >= timedelta(days=7)
    assert gone["subscription"]["retainDataUntil"] == gone["retainDataUntil"]
    assert gone["subscription"]["status"] == "Unsubscribed"
    assert "retainDataUntil" not in by_type[sm.EVENT_SUSPENDED]


def test_pending_flagged_and_reconcile_repairs_yield_one_event_each(make_services, standin, azurite):
    name = queue_name()
    services = make_services(EVENTS_QUEUE_NAME=name, ACTIVATION_MODE="manual")
    queue = EventQueue(azurite, name)

    manual = new_purchase(services, standin)
    assert (
        request_operator_activation(services, manual, USER.label, Source.LANDING_PAGE).record.status
        is sm.LocalStatus.PENDING_ACTIVATION
    )
    drifted = activated(services, standin)
    standin.set_subscription(drifted, status="Suspended")  # silently, no webhook: the reconciler repairs it
    wait_until_delivered(services, manual)
    wait_until_delivered(services, drifted)
    # the reconciler leaves alone a record changed within its settle window: make the activation older
    services.repository._subscriptions.update_entity(
        {"PartitionKey": drifted, "RowKey": "state", "UpdatedAt": format_timestamp(utc_now() - timedelta(hours=1))},
        mode=UpdateMode.MERGE,
    )

    with correlation("cid-reconcile-1"):
        first = run_reconciliation(services)
    assert first.completed and first.repairs == {"status_drift": 1}
    with correlation("cid-reconcile-2"):
        second = run_reconciliation(services)  # nothing new: no event
    assert second.completed and second.repairs == {}

    events = queue.wait_for(4)
    wait_until_delivered(services, manual)
    wait_until_delivered(services, drifted)
    events = queue.drain()
    manual_events = [event for event in events if event["subscriptionId"] == manual]
    drifted_events = [event for event in events if event["subscriptionId"] == drifted]
    assert [(event["eventType"], event["source"]) for event in manual_events] == [
        (sm.EVENT_PENDING, "landing_page"),
        (sm.EVENT_FLAGGED, "reconcile"),
    ]
    assert manual_events[1]["subscription"]["flags"] == [FLAG_AWAITING_OPERATOR]
    assert [(event["eventType"], event["source"]) for event in drifted_events] == [
        (sm.EVENT_ACTIVATED, "landing_page"),
        (sm.EVENT_SUSPENDED, "reconcile"),
    ]
    assert manual_events[1]["correlationId"] == drifted_events[1]["correlationId"] == "cid-reconcile-1"
    assert len(events) == 4


# ---------------------------------------------------------------------------------------------
# crash between state change and relay; storage and queue failures


def test_crash_between_state_change_and_relay_loses_nothing(make_services, standin, azurite):
    name = queue_name()
    services = make_services(EVENTS_QUEUE_NAME=name)
    queue = EventQueue(azurite, name)
    subscription_id = activated(services, standin)
    wait_until_delivered(services, subscription_id)
    assert [event["eventType"] for event in queue.drain()] == [sm.EVENT_ACTIVATED]

    services.repository.on_event_written = None  # the process "dies" before the inline relay runs
    outcome = change_quantity(services, subscription_id, 9)
    assert outcome.event_type == sm.EVENT_QUANTITY_CHANGED

    pending = services.repository.pending_events(subscription_id)
    assert [event.seq for event in pending] == [outcome.history.seq]
    assert pending[0].attempts == 0 and not pending[0].queue_done
    time.sleep(0.3)
    assert queue.drain()[1:] == []  # nothing was sent

    stats = services.events.relay_pending()  # the next relay run (the reconciler's safety net)
    assert (stats.delivered, stats.failed) == (1, 0)
    events = queue.drain()[1:]
    assert [(event["eventType"], event["sequence"]) for event in events] == [(sm.EVENT_QUANTITY_CHANGED, outcome.history.seq)]
    assert events[0]["subscription"]["quantity"] == 9
    assert services.repository.pending_events(subscription_id) == []
    assert services.events.relay_pending().delivered == 0  # delivered once, not again
    time.sleep(0.2)
    assert len(queue.drain()) == 2


def test_storage_outage_during_relay_keeps_the_event_for_a_later_run(make_services, standin, azurite):
    name = queue_name()
    services = make_services(EVENTS_QUEUE_NAME=name)
    queue = EventQueue(azurite, name)
    subscription_id = activated(services, standin)
    wait_until_delivered(services, subscription_id)
    services.repository.on_event_written = None
    outcome = change_quantity(services, subscription_id, 7)

    with azurite.outage():  # tables and queues refuse connections
        with pytest.raises(StorageUnavailableError):
            services.events.relay_subscription(subscription_id)
        with pytest.raises(StorageUnavailableError):
            services.events.relay_pending()

    pending = services.repository.pending_events(subscription_id)
    assert [event.seq for event in pending] == [outcome.history.seq]  # still there after the outage
    stats = services.events.relay_pending()
    assert (stats.delivered, stats.failed) == (1, 0)
    events = queue.drain()
    assert [event["eventType"] for event in events] == [sm.EVENT_ACTIVATED, sm.EVENT_QUANTITY_CHANGED]


def test_failing_queue_notes_attempts_backs_off_and_delivers_later_in_order(make_services, standin, azurite):
    name = queue_name()
    services = make_services(EVENTS_QUEUE_NAME=name)
    queue = EventQueue(azurite, name)
    subscription_id = activated(services, standin)
    wait_until_delivered(services, subscription_id)
    services.repository.on_event_written = None
    outcomes = [change_quantity(services, subscription_id, quantity) for quantity in (6, 7, 8)]

    # the queue service refuses connections (the table service still works)
    dead = azurite.connection_string.replace(f":{azurite.queue_port}/", f":{free_port()}/")
    broken = EventRelay(
        services.repository.sibling(),
        queue_client=QueueClient.from_connection_string(
            dead, name, message_encode_policy=TextBase64EncodePolicy(), retry_total=0, connection_timeout=2
        ),
    )
    first = broken.relay_subscription(subscription_id)
    assert (first.delivered, first.failed) == (0, 1)
    second = broken.relay_subscription(subscription_id, respect_backoff=False)
    assert (second.delivered, second.failed) == (0, 1)

    pending = services.repository.pending_events(subscription_id)
    assert [event.seq for event in pending] == [outcome.history.seq for outcome in outcomes]  # nothing dropped
    head = services.repository._subscriptions.get_entity(subscription_id, f"{EVENT_PREFIX}{outcomes[0].history.seq:010d}")
    assert head["Attempts"] == 2 and head["LastError"] and head["LastAttemptAt"] and head["Pending"] is True
    assert [event.attempts for event in pending[1:]] == [0, 0]  # later events wait behind the first

    # Inside the backoff window the failed event waits; the queue keeps no order anyway (consumers
    # order by sequence), so the later ones are not held back behind it.
    waiting = services.events.relay_subscription(subscription_id)
    assert (waiting.delivered, waiting.skipped) == (2, 1)
    assert [event["sequence"] for event in queue.drain()[1:]] == [outcome.history.seq for outcome in outcomes[1:]]

    # Once its backoff has passed (the services' clock moves; nothing sleeps), it goes out too.
    services.clock = lambda: utc_now() + backoff_for(2) + timedelta(seconds=1)
    delivered = services.events.relay_subscription(subscription_id)
    assert (delivered.delivered, delivered.failed, delivered.skipped) == (1, 0, 0)
    events = sorted(queue.drain()[1:], key=lambda event: event["sequence"])
    assert [event["sequence"] for event in events] == [outcome.history.seq for outcome in outcomes]
    assert [event["subscription"]["quantity"] for event in events] == [6, 7, 8]
    assert services.repository.pending_events(subscription_id) == []


def test_a_redelivered_event_keeps_its_event_id_and_body(make_services, standin, azurite):
    """At least once: if the delivery mark is lost after sending, the same event (same id) is sent again."""
    name = queue_name()
    services = make_services(EVENTS_QUEUE_NAME=name)
    queue = EventQueue(azurite, name)
    subscription_id = activated(services, standin)
    wait_until_delivered(services, subscription_id)
    first = queue.drain()[0]

    row = outbox(services, subscription_id)[0]
    services.repository._subscriptions.update_entity(  # as if the relay died before marking it delivered
        {"PartitionKey": subscription_id, "RowKey": row["RowKey"], "Pending": True, "QueueDone": False}, mode=UpdateMode.MERGE
    )
    assert services.events.relay_pending().delivered == 1
    again = queue.drain()[1]
    assert again == first and again["eventId"] == event_id_for(subscription_id, first["sequence"])


# ---------------------------------------------------------------------------------------------
# duplicates and concurrency


def test_duplicate_webhooks_yield_no_duplicate_events(make_services, standin, devhost, azurite):
    name = queue_name()
    services = make_services(EVENTS_QUEUE_NAME=name)
    queue = EventQueue(azurite, name)
    subscription_id = activated(services, standin)
    standin.webhook_url = devhost.url + "/api/webhook"

    suspend = standin.trigger(subscription_id, "Suspend", deliver=False)["id"]
    assert standin.deliver(suspend, times=3) == [200, 200, 200]  # one after the other
    unsubscribe = standin.trigger(subscription_id, "Unsubscribe", deliver=False)["id"]
    assert standin.deliver_many([unsubscribe] * 6, concurrency=6) == [200] * 6  # all at once
    assert standin.deliver(suspend) == [200]  # a late duplicate of an older operation

    queue.wait_for(3)
    wait_until_delivered(services, subscription_id)
    time.sleep(0.3)
    events = queue.drain()
    assert [event["eventType"] for event in events] == [sm.EVENT_ACTIVATED, sm.EVENT_SUSPENDED, sm.EVENT_UNSUBSCRIBED]
    assert [event["operationId"] for event in events[1:]] == [suspend, unsubscribe]
    assert len({event["eventId"] for event in events}) == 3
    assert len(outbox(services, subscription_id)) == 3
    applied = [entry for entry in services.repository.history(subscription_id) if entry["operationId"]]
    assert [(entry["kind"], entry["result"]) for entry in applied] == [("suspend", "applied"), ("unsubscribe", "applied")]


def test_every_change_is_delivered_once_per_event_id_and_ordered_by_sequence_under_concurrent_updates(
    make_services, standin, azurite
):
    name = queue_name()
    services = make_services(EVENTS_QUEUE_NAME=name)
    queue = EventQueue(azurite, name)
    subscriptions = [activated(services, standin, quantity=1) for _ in range(2)]
    threads_per_subscription, changes_per_thread = 5, 4
    errors: list[BaseException] = []
    start = threading.Barrier(threads_per_subscription * len(subscriptions))

    def worker(subscription_id: str, first_quantity: int) -> None:
        try:
            start.wait()
            for quantity in range(first_quantity, first_quantity + changes_per_thread):
                outcome = change_quantity(services, subscription_id, quantity)
                assert outcome is not None and outcome.event_type == sm.EVENT_QUANTITY_CHANGED
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [
        threading.Thread(target=worker, args=(subscription_id, 10 + 10 * index))
        for subscription_id in subscriptions
        for index in range(threads_per_subscription)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors

    changes = threads_per_subscription * changes_per_thread
    # delivered by the inline relays alone (no relay pass): none is left behind by a lease race
    for subscription_id in subscriptions:
        wait_until_delivered(services, subscription_id)
    events = queue.wait_for(len(subscriptions) * (changes + 1))
    # The queue is at least once and keeps no order: consumers de-duplicate by eventId and order by
    # sequence (docs/events.md). After that, every change is there once, in a gapless sequence.
    unique = {event["eventId"]: event for event in events}
    assert len(unique) == len(subscriptions) * (changes + 1)
    assert all(unique[event["eventId"]] == event for event in events)  # a duplicate is the same document
    for subscription_id in subscriptions:
        mine = sorted((e for e in unique.values() if e["subscriptionId"] == subscription_id), key=lambda e: e["sequence"])
        assert_in_order(mine)
        assert [event["sequence"] for event in mine] == list(range(mine[0]["sequence"], mine[0]["sequence"] + changes + 1))
        assert [event["eventType"] for event in mine] == [sm.EVENT_ACTIVATED] + [sm.EVENT_QUANTITY_CHANGED] * changes
        # each event's previous value is the quantity the event before it announced
        for before, after in itertools.pairwise(mine):
            assert after["previous"]["quantity"] == before["subscription"]["quantity"]
        assert sorted(event["subscription"]["quantity"] for event in mine[1:]) == sorted(
            q for index in range(threads_per_subscription) for q in range(10 + 10 * index, 10 + 10 * index + changes_per_thread)
        )
        assert mine[-1]["subscription"]["quantity"] == services.repository.get(subscription_id).record.quantity


# ---------------------------------------------------------------------------------------------
# the signed HTTPS hook


def test_hook_receives_signed_events_and_a_tampered_body_fails(make_services, standin, azurite):
    name = queue_name()
    with HookReceiver() as hook:
        services = make_services(EVENTS_QUEUE_NAME=name, EVENTS_WEBHOOK_URL=hook.url, EVENTS_WEBHOOK_SECRET=HOOK_SECRET)
        subscription_id = activated(services, standin)
        change_quantity(services, subscription_id, 8)
        wait_until_delivered(services, subscription_id)
        queued = EventQueue(azurite, name).wait_for(2)

    assert len(hook.requests) == 2
    for request, event in zip(hook.requests, queued, strict=False):
        body, headers = request["body"], request["headers"]
        assert json.loads(body) == event  # the same document as the queue message
        assert headers[EVENT_ID_HEADER] == event["eventId"]
        assert headers["Content-Type"] == "application/json"
        assert verify_signature(HOOK_SECRET, body, headers[SIGNATURE_HEADER]) is True
        assert verify_signature(HOOK_SECRET, body.replace('"quantity": ', '"quantity": 1'), headers[SIGNATURE_HEADER]) is False
        assert verify_signature(HOOK_SECRET, body + "\n", headers[SIGNATURE_HEADER]) is False
        assert verify_signature("not-the-secret-0123456789", body, headers[SIGNATURE_HEADER]) is False
    assert [json.loads(r["body"])["eventType"] for r in hook.requests] == [sm.EVENT_ACTIVATED, sm.EVENT_QUANTITY_CHANGED]


def test_failing_hook_is_retried_with_backoff_and_never_dropped(make_services, standin, azurite):
    name = queue_name()
    with HookReceiver(statuses=(500,)) as hook:
        services = make_services(EVENTS_QUEUE_NAME=name, EVENTS_WEBHOOK_URL=hook.url, EVENTS_WEBHOOK_SECRET=HOOK_SECRET)
        queue = EventQueue(azurite, name)
        subscription_id = activated(services, standin)

        # the inline relay: queue accepted, hook answered 500 -> stays pending, attempt noted
        eventually(lambda: len(hook.requests) == 1, message="the first hook call")
        eventually(
            lambda: (
                services.repository.pending_events(subscription_id)
                and services.repository.pending_events(subscription_id)[0].attempts == 1
            ),
            message="the attempt noted",
        )
        event = services.repository.pending_events(subscription_id)[0]
        assert event.queue_done and not event.hook_done
        assert len(queue.wait_for(1)) == 1

        # within the backoff window nothing is sent
        assert services.events.relay_pending().delivered == 0
        assert len(hook.requests) == 1

        # the retry (backoff elapsed) reaches the hook again, signed afresh; the queue is not sent twice
        stats = services.events.relay_subscription(subscription_id, respect_backoff=False)
        assert (stats.delivered, stats.failed) == (1, 0)
        assert [r["status"] for r in hook.requests] == [500, 200]
        assert hook.requests[0]["body"] == hook.requests[1]["body"]
        assert verify_signature(HOOK_SECRET, hook.requests[1]["body"], hook.requests[1]["headers"][SIGNATURE_HEADER])
        assert services.repository.pending_events(subscription_id) == []
        time.sleep(0.3)
        assert len(queue.drain()) == 1


def test_slow_hook_does_not_delay_the_webhook_answer(make_services, standin, devhost, azurite):
    name = queue_name()
    with HookReceiver() as hook:
        services = make_services(EVENTS_QUEUE_NAME=name, EVENTS_WEBHOOK_URL=hook.url, EVENTS_WEBHOOK_SECRET=HOOK_SECRET)
        services.repository.on_event_written = None  # activation's event is delivered below, not inline
        subscription_id = activated(services, standin)
        services.events.relay_subscription(subscription_id)
        assert len(hook.requests) == 1
        hook.started.clear()
        hook.finished.clear()
        hook.delay = 3.0  # from now on the hook takes 3 s to answer
        services.repository.on_event_written = lambda sid: services.events.enqueue_delivery(sid)

        standin.webhook_url = devhost.url + "/api/webhook"
        operation = standin.trigger(subscription_id, "Suspend", deliver=False)
        sent = time.monotonic()
        assert standin.deliver(operation["id"]) == [200]
        answered = time.monotonic()
        # the Marketplace got its answer before the hook was even called: the job is on the queue
        assert not hook.started.is_set()
        assert services.repository.get(subscription_id).record.status is sm.LocalStatus.SUSPENDED

        assert services.events.drain() == 1  # the event_delivery function's work
        assert hook.finished.wait(WAIT)
        hook_request = hook.requests[-1]
        assert json.loads(hook_request["body"])["eventType"] == sm.EVENT_SUSPENDED
        assert sent < hook_request["at"] and answered < hook_request["at"] + hook.delay
        wait_until_delivered(services, subscription_id)


# ---------------------------------------------------------------------------------------------
# the reconciler's summary


def test_reconciler_counts_events_waiting_too_long_and_delivers_them(make_services, standin, azurite):
    name = queue_name()
    services = make_services(EVENTS_QUEUE_NAME=name)
    queue = EventQueue(azurite, name)
    services.repository.on_event_written = None
    old, recent = activated(services, standin), activated(services, standin)
    assert len(services.repository.pending_events(old)) == len(services.repository.pending_events(recent)) == 1

    row = outbox(services, old)[0]
    services.repository._subscriptions.update_entity(
        {"PartitionKey": old, "RowKey": row["RowKey"], "CreatedAt": format_timestamp(utc_now() - timedelta(hours=1))},
        mode=UpdateMode.MERGE,
    )

    summary = run_reconciliation(services)
    assert summary.completed
    assert (summary.events_pending, summary.events_waiting_too_long) == (2, 1)
    assert (summary.events_delivered, summary.events_failed) == (2, 0)
    assert services.repository.latest_runs(1)[0]["events_waiting_too_long"] == 1
    events = queue.wait_for(2)
    assert sorted(event["subscriptionId"] for event in events) == sorted([old, recent])

    again = run_reconciliation(services)
    assert (again.events_pending, again.events_waiting_too_long, again.events_delivered) == (0, 0, 0)


# ---------------------------------------------------------------------------------------------
# cost, order with the hook, and an orphaned lease


def test_the_queue_only_relay_costs_one_read_and_one_write_per_event(make_services, standin, azurite):
    """No lease when the queue is the only sink: read the pending rows, send, mark delivered."""
    name = queue_name()
    services = make_services(EVENTS_QUEUE_NAME=name)
    queue = EventQueue(azurite, name)
    subscription_id = activated(services, standin)
    wait_until_delivered(services, subscription_id)
    queue.wait_for(1)
    services.repository.on_event_written = None
    for quantity in (6, 7, 8):
        change_quantity(services, subscription_id, quantity)

    metrics = services.events.repository.metrics
    before = metrics.snapshot()
    stats = services.events.relay_subscription(subscription_id)
    after = metrics.snapshot()
    assert (stats.delivered, stats.failed) == (3, 0)
    # one read for the three pending rows, one write per event; the lease row is never touched
    assert (after["reads"] - before["reads"], after["writes"] - before["writes"]) == (1, 3)
    assert len(queue.wait_for(4)) == 4
    with pytest.raises(ResourceNotFoundError):
        services.repository._subscriptions.get_entity(subscription_id, "relay-lease")


def test_the_hook_receives_each_subscriptions_events_in_order_under_concurrent_updates(make_services, standin, azurite):
    with HookReceiver() as hook:
        services = make_services(EVENTS_QUEUE_NAME=queue_name(), EVENTS_WEBHOOK_URL=hook.url, EVENTS_WEBHOOK_SECRET=HOOK_SECRET)
        subscription_id = activated(services, standin, quantity=1)
        errors: list[BaseException] = []
        start = threading.Barrier(4)

        def worker(first: int) -> None:
            try:
                start.wait()
                for quantity in range(first, first + 4):
                    change_quantity(services, subscription_id, quantity)
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=worker, args=(10 + 10 * index,)) for index in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors, errors
        services.events.wait_idle(60)
        wait_until_delivered(services, subscription_id)
        received = [json.loads(request["body"]) for request in hook.requests if request["status"] == 200]
    assert_in_order(received)  # in the order the hook received them: the lease keeps it
    assert len(received) == 1 + 16


def test_an_orphaned_lease_delays_delivery_until_it_expires_not_until_the_next_run(make_services, standin, azurite):
    """A deliverer crashed holding the lease: the next change is delivered when the lease expires."""
    with HookReceiver() as hook:
        services = make_services(EVENTS_QUEUE_NAME=queue_name(), EVENTS_WEBHOOK_URL=hook.url, EVENTS_WEBHOOK_SECRET=HOOK_SECRET)
        subscription_id = activated(services, standin)
        wait_until_delivered(services, subscription_id)
        delivered_before = len(hook.requests)
        # the crashed holder's lease, valid for another 45 s by the services' clock
        services.repository._subscriptions.upsert_entity(
            {
                "PartitionKey": subscription_id,
                "RowKey": "relay-lease",
                "Kind": "lease",
                "LeaseUntil": format_timestamp(services.clock() + timedelta(seconds=45)),
            },
            mode=UpdateMode.REPLACE,
        )
        relay = services.events
        change_quantity(services, subscription_id, 9)  # its delivery job finds the lease held
        assert relay.drain() == 1  # the job ran (as the event_delivery function runs it) ...
        assert len(hook.requests) == delivered_before  # ... not delivered yet ...
        # ... but back on the work queue, invisible until the lease expires (45 s + 1), not 30 min
        client = relay.work_queue.client
        assert list(client.peek_messages(max_messages=32)) == []
        props = client.get_queue_properties()
        assert props.approximate_message_count == 1

        # The lease expires (the clock moves, nothing sleeps 45 s); the job runs again.
        services.clock = lambda: utc_now() + timedelta(seconds=60)
        retry = next(iter(client.receive_messages(visibility_timeout=1, max_messages=1)), None)
        assert retry is None  # Azurite keeps it invisible for the lease's remaining time
        result = relay.run_job(Job(kind=JOB_DELIVER, subscription_id=subscription_id, attempt=1).to_message())
        assert (result.stats.delivered, result.retry_in_seconds, result.poisoned) == (1, None, False)
        assert len(hook.requests) == delivered_before + 1
        assert json.loads(hook.requests[-1]["body"])["subscription"]["quantity"] == 9
        assert services.repository.pending_events(subscription_id) == []
