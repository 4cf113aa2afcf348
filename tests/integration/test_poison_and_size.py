"""Oversized Marketplace fields, long event bodies and records storage refuses (issue 11, items 4-5),
against Azurite: the limits are Table Storage's own (64 KiB a property, 1 MiB an entity, 64 KiB a
queue message), not assumptions."""

from __future__ import annotations

import json

import pytest

from shared.errors import StorageRefusedError, StorageUnavailableError
from shared.reconcile import FLAG_INVALID_ID, FLAG_STORAGE_REFUSED, run_reconciliation
from shared.repository import MAX_FIELD_CHARS, MAX_PAYLOAD_CHARS, join_text, split_text
from tests.integration.test_events import EventQueue, HookReceiver, queue_name, wait_until_delivered
from tests.unit.test_event_signature import published_schema, validate

pytestmark = pytest.mark.azurite
HOOK_SECRET = "hook-secret-0123456789abcdef"


def test_text_longer_than_a_property_is_split_and_joined_whole():
    text = json.dumps({"name": "x" * 70_000})
    parts = split_text("Body", text)
    assert len(parts) == 3 and all(len(part) <= MAX_PAYLOAD_CHARS for part in parts.values())
    assert join_text(parts, "Body") == text
    assert join_text({"Body": "short"}, "Body") == "short"


def test_an_oversized_name_is_stored_and_its_event_stays_valid_json(make_services, standin, azurite):
    """Before: the 400 for a property over 64 KiB stopped every reconciliation run (storage_unavailable),
    and event bodies over 30,000 characters were cut into invalid JSON."""
    name = queue_name()
    with HookReceiver() as hook:
        services = make_services(EVENTS_QUEUE_NAME=name, EVENTS_WEBHOOK_URL=hook.url, EVENTS_WEBHOOK_SECRET=HOOK_SECRET)
        queue = EventQueue(azurite, name)
        huge, others = standin.seed(1, plan_id="standard")[0], standin.seed(3, plan_id="standard")
        long_name = "Fabrikam " + "n" * 60_000
        standin.set_subscription(huge, name=long_name)

        summary = run_reconciliation(services)

        assert summary.completed, summary.stopped_reason
        assert summary.repairs == {"recorded_new": 4}
        record = services.repository.get(huge).record
        assert len(record.name) == MAX_FIELD_CHARS and record.name.endswith("\u2026")  # a display copy
        for sid in others:
            assert services.repository.get(sid) is not None
        wait_until_delivered(services, huge)
        hooked = [json.loads(r["body"]) for r in hook.requests if json.loads(r["body"])["subscriptionId"] == huge]
    schema = published_schema()
    # The hook gets the whole document (stored in parts), the queue a deliberately shortened one.
    assert len(hooked) == 1 and hooked[0]["subscription"]["name"] == long_name
    assert validate(hooked[0], schema) == []
    queued = [event for event in queue.wait_for(4) if event["subscriptionId"] == huge]
    assert len(queued) == 1 and validate(queued[0], schema) == []
    assert queued[0]["subscription"]["name"].endswith("[truncated]")
    assert len(json.dumps(queued[0]).encode()) <= 48_000


def test_a_long_webhook_payload_is_kept_whole_for_replay(services):
    subscription_id = "3f2c1d2e-0000-4000-8000-000000000001"
    operation_id = "3f2c1d2e-0000-4000-8000-000000000002"
    payload = json.dumps({"id": operation_id, "subscriptionId": subscription_id, "padding": "p" * 50_000})
    services.repository.record_operation(subscription_id, operation_id, action="Suspend", payload=payload, correlation_id="c")
    marker = services.repository.get_marker(subscription_id, operation_id)
    assert marker is not None and marker.payload == payload
    assert json.loads(marker.payload)["padding"] == "p" * 50_000


def test_storage_refusing_a_request_is_permanent_not_an_outage(services):
    """Before: every HttpResponseError, a 400 included, became StorageUnavailableError (retry forever)."""
    with pytest.raises(StorageRefusedError) as refused:  # Table Storage answers 400 for such a key
        services.repository.record_operation("not/a#valid?key", "op", action="Suspend", payload="{}", correlation_id="c")
    assert not isinstance(refused.value, StorageUnavailableError)
    assert refused.value.code == "storage_refused"


def test_one_poison_subscription_does_not_stop_the_run(standin, services):
    """Before: the run aborted on it, every run: 2 of 10 recorded."""
    ids = standin.seed(10, plan_id="standard")
    poison = ids[2]
    original = services.repository.apply

    def refusing(subscription_id, *args, **kwargs):
        if subscription_id == poison:  # what Table Storage answers for a record it cannot hold
            raise StorageRefusedError("storage refused write change (400)")
        return original(subscription_id, *args, **kwargs)

    services.repository.apply = refusing  # type: ignore[method-assign]
    summary = run_reconciliation(services)
    services.repository.apply = original  # type: ignore[method-assign]

    assert summary.completed and summary.subscriptions_seen == 10
    assert summary.repairs == {"recorded_new": 9}
    assert {"subscriptionId": poison, "reason": FLAG_STORAGE_REFUSED} in summary.flagged
    assert [sid for sid in ids if services.repository.get(sid) is None] == [poison]


def test_a_listed_id_that_is_not_a_guid_is_flagged_and_never_stored(standin, services):
    ids = standin.seed(3, plan_id="standard")
    original = services.marketplace.list_subscription_pages

    def with_a_bad_id(start_link=None):
        for page, next_link in original(start_link):
            bad = page[0].__class__.from_api({**page[0].raw, "id": "bad/id?x=1"})
            yield [*page, bad], next_link

    services.marketplace.list_subscription_pages = with_a_bad_id  # type: ignore[method-assign]
    summary = run_reconciliation(services)
    services.marketplace.list_subscription_pages = original  # type: ignore[method-assign]

    assert summary.completed and summary.repairs == {"recorded_new": 3}
    assert {"subscriptionId": "bad/id?x=1", "reason": FLAG_INVALID_ID} in summary.flagged
    assert all(services.repository.get(sid) is not None for sid in ids)


def test_a_poison_webhook_is_acknowledged_and_alerted_not_retried_forever(standin, services, devhost, caplog):
    """Before: a 503 for an event storage refuses, which Microsoft retries forever."""
    standin.webhook_url = devhost.url + "/api/webhook"
    (subscription_id,) = standin.seed(1, plan_id="standard")
    original = services.repository.record_operation

    def refusing(sid, *args, **kwargs):
        raise StorageRefusedError("storage refused record operation (400)")

    services.repository.record_operation = refusing  # type: ignore[method-assign]
    try:
        operation = standin.trigger(subscription_id, "Suspend")
    finally:
        services.repository.record_operation = original  # type: ignore[method-assign]

    assert standin.webhook_deliveries == [(operation["id"], 200)]
    assert any("OPERATOR ACTION NEEDED" in record.getMessage() for record in caplog.records)
