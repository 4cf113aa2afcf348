"""SubscriptionRepository against Azurite: round trips, append-only history, atomic transactions,
optimistic concurrency, exactly-once operation markers, the reconciler's scan and storage outages."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import fields, replace
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from shared import state_machine as sm
from shared.domain import AadIdentifier, Subscription, utc_now
from shared.errors import ConflictError, StorageUnavailableError
from shared.events import build_event_document
from shared.repository import SubscriptionRepository, table_service_from_settings
from shared.state_machine import Change, Kind, LocalStatus, Result, Source, SubscriptionRecord

pytestmark = pytest.mark.azurite


@pytest.fixture
def service(azurite):
    return table_service_from_settings(SimpleNamespace(tables_connection_string=azurite.connection_string, tables_endpoint=""))


@pytest.fixture
def repo(service):
    repository = SubscriptionRepository(service, "t" + uuid.uuid4().hex[:12])
    repository.ensure_tables()
    yield repository
    for name in (repository.subscriptions_table_name, repository.runs_table_name):
        try:
            service.delete_table(name)
        except Exception:  # noqa: BLE001 - best effort cleanup (e.g. after an outage test)
            pass


@pytest.fixture
def table(repo, service):
    """Raw access to the subscriptions table, to set up what the repository would never write."""
    return service.get_table_client(repo.subscriptions_table_name)


def new_id() -> str:
    return str(uuid.uuid4())


def snapshot(sid: str, status: str = "Subscribed", **overrides) -> Subscription:
    payload = {
        "id": sid,
        "publisherId": "contoso",
        "offerId": "offer1",
        "name": "Contoso",
        "saasSubscriptionStatus": status,
        "planId": "standard",
        "quantity": 0,
        "term": {"termUnit": "P1M"},
        "purchaser": {"emailId": "buyer@contoso.example"},
        "beneficiary": {"emailId": "user@contoso.example"},
    }
    payload.update(overrides)
    return Subscription.from_api(payload)


def change(kind: Kind, at: datetime | None = None, **kwargs) -> Change:
    return Change(kind=kind, source=kwargs.pop("source", Source.WEBHOOK), occurred_at=at or utc_now(), **kwargs)


def deciding(the_change: Change):
    return lambda record: sm.apply(record, the_change)


def create(
    repo: SubscriptionRepository, sid: str, status: str = "Subscribed", at: datetime | None = None, **overrides
) -> sm.Outcome:
    return repo.apply(
        sid,
        deciding(change(Kind.SYNC, at=at or utc_now() - timedelta(minutes=5), subscription=snapshot(sid, status, **overrides))),
    )


# --- round trip -------------------------------------------------------------------------------------


def full_record(sid: str) -> SubscriptionRecord:
    moment = datetime(2024, 5, 1, 12, 30, 45, 123456, tzinfo=UTC)
    return SubscriptionRecord(
        id=sid,
        status=LocalStatus.SUSPENDED,
        marketplace_status="Suspended",
        name="Contoso «Analytics» ✓ 'quoted' \"double\"",
        offer_id="offer1-preview",
        plan_id="premium",
        quantity=42,
        publisher_id="contoso",
        purchaser=AadIdentifier(email_id="buyer@contoso.example", object_id="oid-p", tenant_id="tid-p", puid="puid-p"),
        beneficiary=AadIdentifier(email_id="user@fabrikam.example", object_id="oid-b", tenant_id="tid-b", puid="puid-b"),
        term_unit="P18M",
        term_start=moment - timedelta(days=30),
        term_end=moment + timedelta(days=500),
        is_free_trial=True,
        auto_renew=True,
        allowed_customer_operations=("Read", "Update"),
        last_event_at=moment,
        created_at=moment - timedelta(days=31),
        updated_at=moment + timedelta(seconds=1),
        signed_in_user="Ada Lovelace <ada@contoso.example>",
        activated_by="operator@contoso.example",
        activation_requested_at=moment - timedelta(days=31, minutes=-1),
        activation_attempts=3,
        unsubscribed_at=moment + timedelta(days=1),
        retain_data_until=moment + timedelta(days=8),
        flags=("activation_stuck", "unknown_status"),
        pending_operation_id="0f1e2d3c-4b5a-4968-8776-655443322110",
        history_seq=1,
        is_test=True,
        sandbox_type="Sandbox",
        session_mode="DryRun",
    )


def write_record(repo: SubscriptionRepository, record: SubscriptionRecord) -> sm.Outcome:
    """Store exactly ``record`` (through the normal write path, with a first history entry)."""
    first = sm.apply(None, change(Kind.SYNC, subscription=snapshot(record.id)))
    return repo.apply(record.id, lambda current: replace(first, record=record))


def test_round_trip_of_every_field(repo):
    sid = new_id()
    record = full_record(sid)
    for spec in fields(SubscriptionRecord):  # the test only proves something if no field is at its default
        assert getattr(record, spec.name) != spec.default, spec.name
    write_record(repo, record)
    stored = repo.get(sid)
    assert stored is not None and stored.etag
    for spec in fields(SubscriptionRecord):
        assert getattr(stored.record, spec.name) == getattr(record, spec.name), spec.name
    assert stored.record == record
    assert list(repo.list_records()) == [record]


def test_round_trip_of_empty_values(repo):
    sid = new_id()
    record = SubscriptionRecord(id=sid, status=LocalStatus.PENDING_FULFILLMENT_START, quantity=None, history_seq=1)
    write_record(repo, record)
    assert repo.get(sid).record == record
    zero = replace(record, id=new_id(), quantity=0, status=LocalStatus.ACTIVATION_FAILED)
    write_record(repo, zero)
    assert repo.get(zero.id).record.quantity == 0  # 0 seats is not "no quantity"


def test_timestamps_in_other_zones_come_back_as_the_same_instant(repo):
    sid = new_id()
    plus_two = timezone(timedelta(hours=2))
    record = replace(full_record(sid), term_end=datetime(2025, 1, 1, 2, 0, tzinfo=plus_two))
    write_record(repo, record)
    assert repo.get(sid).record.term_end == datetime(2025, 1, 1, 0, 0, tzinfo=UTC)


def test_get_unknown_returns_none(repo):
    assert repo.get(new_id()) is None
    assert repo.get_marker(new_id(), "op") is None
    assert repo.history(new_id()) == []


def test_list_records_filters(repo):
    first, second, third = new_id(), new_id(), new_id()
    create(repo, first, "Subscribed", planId="standard")
    create(repo, second, "Suspended", planId="premium")
    create(repo, third, "Subscribed", planId="premium")
    assert {r.id for r in repo.list_records()} == {first, second, third}
    assert {r.id for r in repo.list_records(status="Subscribed")} == {first, third}
    assert {r.id for r in repo.list_records(plan_id="premium")} == {second, third}
    assert {r.id for r in repo.list_records(status="Subscribed", plan_id="premium")} == {third}


class _ShortAnswers:
    """The real table client, except that the service answers at most ``cap`` entities a request, as
    Table storage does for a filtered query that crosses partition ranges or scans 1,000 entities."""

    def __init__(self, client, cap: int):
        self._client, self.cap, self.requests = client, cap, 0

    def query_entities(self, query, *, results_per_page, **kwargs):
        self.requests += 1
        return self._client.query_entities(query, results_per_page=min(self.cap, results_per_page), **kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_a_page_is_filled_across_short_answers_and_pages_chain(repo):
    suspended = {new_id() for _ in range(7)}
    for sid in suspended:
        create(repo, sid, "Suspended")
    for _ in range(3):
        create(repo, new_id(), "Subscribed")
    short = _ShortAnswers(repo._subscriptions_client, cap=2)
    repo._subscriptions_client = short

    first, token = repo.page_records(status="Suspended", page_size=5)
    assert len(first) == 5 and {r.status for r in first} == {LocalStatus.SUSPENDED}
    assert short.requests == 3  # 2 + 2 + 1: each request asks only for what is missing
    rest, end = repo.page_records(status="Suspended", page_size=5, continuation=token)
    assert {r.id for r in first} | {r.id for r in rest} == suspended and len(rest) == 2
    assert end is None


def test_search_reads_the_searched_columns_then_each_match_whole(repo):
    by_name, by_purchaser, by_beneficiary, suspended_match, other = sorted(new_id() for _ in range(5))
    create(repo, by_name, name="Fabrikam Analytics")
    create(repo, by_purchaser, purchaser={"emailId": "Finance@FABRIKAM.example", "tenantId": "tenant-zq"})
    create(repo, by_beneficiary, beneficiary={"emailId": "ops@fabrikam.example"})
    create(repo, suspended_match, "Suspended", name="fabrikam (old)")
    create(repo, other, name="Northwind", purchaser={"emailId": "it@northwind.example"})
    reads_before = repo.metrics.snapshot()["reads"]

    found, cut_short = repo.search_records("fabrikam")
    assert [r.id for r in found] == [by_name, by_purchaser, by_beneficiary, suspended_match] and not cut_short
    assert found[1] == repo.get(by_purchaser).record  # each match whole, not the few columns searched
    assert repo.metrics.snapshot()["reads"] - reads_before == 1 + 4 + 1  # one query page, one point read a match
    assert [r.id for r in repo.search_records("FABRIKAM", status="Suspended")[0]] == [suspended_match]
    assert [r.id for r in repo.search_records(other[:8])[0]] == [other]  # part of an id
    assert repo.search_records("tenant-zq") == ([], False)  # e-mails are searched, not the rest of an identity
    assert [r.id for r in repo.search_records("fabrikam", limit=2)[0]] == [by_name, by_purchaser]
    assert repo.search_records("northwind", scan_limit=3) == ([], True)  # said when the scan was cut short
    assert repo.search_records("nobody@nowhere.example") == ([], False)


def test_history_can_start_at_a_sequence_number(repo):
    sid = new_id()
    create(repo, sid, "Subscribed")
    for n in range(1, 12):
        repo.apply(sid, deciding(change(Kind.CHANGE_QUANTITY, at=utc_now() + timedelta(seconds=n), quantity=n)))
    assert [entry["seq"] for entry in repo.history(sid, since_seq=10)] == [10, 11, 12]
    assert len(repo.history(sid)) == 12


# --- history -------------------------------------------------------------------------------------


def test_history_is_append_only_and_ordered(repo):
    sid = new_id()
    base = utc_now() - timedelta(hours=1)
    create(repo, sid, "PendingFulfillmentStart", at=base)
    steps = [
        change(Kind.ACTIVATION_SENT, at=base + timedelta(seconds=1), source=Source.LANDING_PAGE),
        change(Kind.ACTIVATION_CONFIRMED, at=base + timedelta(seconds=2), source=Source.RECONCILE),
        change(Kind.SUSPEND, at=base),  # stale: still recorded
        change(Kind.ACTIVATION_CONFIRMED, at=base + timedelta(seconds=3)),  # noop
    ] + [change(Kind.CHANGE_QUANTITY, at=base + timedelta(seconds=10 + n), quantity=n) for n in range(1, 9)]
    before = None
    for index, step in enumerate(steps, start=2):
        repo.apply(sid, deciding(step))
        history = repo.history(sid)
        assert [entry["seq"] for entry in history] == list(range(1, index + 1))
        if before is not None:
            assert history[: len(before)] == before  # earlier entries never change
        before = history
    history = repo.history(sid)
    assert len(history) == 13  # more than 9: the zero-padded keys keep the order numeric
    assert [entry["kind"] for entry in history[:5]] == [
        "sync",
        "activation_sent",
        "activation_confirmed",
        "suspend",
        "activation_confirmed",
    ]
    assert [entry["result"] for entry in history[:5]] == ["applied", "applied", "applied", "stale", "noop"]
    assert [entry["changes"].get("quantity") for entry in history[5:]] == [[0, 1]] + [[n, n + 1] for n in range(1, 8)]
    assert repo.get(sid).record.history_seq == 13


# --- atomic transactions ------------------------------------------------------------------------------


def test_transaction_is_atomic(repo, table):
    """The state row, the history entry, the marker and the outbox event are written together or not at all."""
    sid, op = new_id(), new_id()
    create(repo, sid, "Subscribed")
    repo.record_operation(sid, op, action="Suspend", payload="{}", correlation_id="cid")
    stored = repo.get(sid)
    # a history row already sits where the next change writes its entry: the transaction's create fails (409)
    table.create_entity({"PartitionKey": sid, "RowKey": "history|0000000002", "Kind": "history", "Entry": '{"blocker": true}'})
    decisions = []

    def decide(record):
        decisions.append(record)
        return sm.apply(record, change(Kind.SUSPEND))

    with pytest.raises(ConflictError):
        repo.apply(sid, decide, operation_id=op, build_event=build_event_document)
    assert len(decisions) == 6  # every attempt re-read and re-decided before giving up

    after = repo.get(sid)
    assert after.etag == stored.etag  # the state row was not touched...
    assert after.record == stored.record
    assert repo.get_marker(sid, op).pending  # ...nor the marker...
    assert repo.pending_events(sid) == []  # ...and no event was queued
    assert table.get_entity(sid, "history|0000000002")["Entry"] == '{"blocker": true}'

    table.delete_entity(sid, "history|0000000002")
    outcome = repo.apply(sid, decide, operation_id=op, build_event=build_event_document)
    assert outcome.result is Result.APPLIED
    assert repo.get(sid).record.status is LocalStatus.SUSPENDED
    assert repo.history(sid)[-1]["kind"] == "suspend"
    marker = repo.get_marker(sid, op)
    assert not marker.pending and marker.status == "applied"
    events = repo.pending_events(sid)
    assert [json.loads(event.body)["eventType"] for event in events] == [sm.EVENT_SUSPENDED]
    assert events[0].seq == 2


def test_etag_conflict_retries_and_re_decides(repo):
    sid = new_id()
    create(repo, sid, "Subscribed")
    seen = []

    def decide(record):
        seen.append(record)
        if len(seen) == 1:  # another writer gets in between our read and our write
            repo.apply(sid, deciding(change(Kind.CHANGE_PLAN, plan_id="premium")))
        return sm.apply(record, change(Kind.CHANGE_QUANTITY, quantity=record.quantity + 1))

    outcome = repo.apply(sid, decide)
    assert len(seen) == 2
    assert seen[0].plan_id == "standard"
    assert seen[1].plan_id == "premium"  # the second decision saw the other writer's change
    final = repo.get(sid).record
    assert final.plan_id == "premium" and final.quantity == 1  # neither update was lost
    assert outcome.record == final
    assert [entry["kind"] for entry in repo.history(sid)] == ["sync", "change_plan", "change_quantity"]


def test_concurrent_first_sighting(repo):
    """Two writers both see no record: the loser's create fails and it re-decides on the winner's row."""
    sid = new_id()
    seen = []

    def decide(record):
        seen.append(record)
        if len(seen) == 1:
            create(repo, sid, "Subscribed")
        return sm.apply(record, change(Kind.SYNC, subscription=snapshot(sid, "Suspended")))

    outcome = repo.apply(sid, decide)
    assert seen[0] is None and seen[1] is not None
    assert outcome.record.status is LocalStatus.SUSPENDED
    assert [entry["seq"] for entry in repo.history(sid)] == [1, 2]


def test_decide_returning_none_writes_nothing(repo):
    sid = new_id()
    create(repo, sid)
    stored = repo.get(sid)
    assert repo.apply(sid, lambda record: None) is None
    assert repo.get(sid).etag == stored.etag
    assert len(repo.history(sid)) == 1


def test_known_record_with_stale_etag_costs_one_retry(repo):
    sid = new_id()
    create(repo, sid)
    old = repo.get(sid)
    repo.apply(sid, deciding(change(Kind.CHANGE_QUANTITY, quantity=7)))
    seen = []

    def decide(record):
        seen.append(record)
        return sm.apply(record, change(Kind.CHANGE_PLAN, plan_id="premium"))

    repo.apply(sid, decide, known=old)  # e.g. the reconciler's row from its scan, outdated meanwhile
    assert [record.quantity for record in seen] == [0, 7]
    final = repo.get(sid).record
    assert final.quantity == 7 and final.plan_id == "premium"


def test_twenty_concurrent_writers_lose_nothing(repo):
    sid = new_id()
    create(repo, sid, "Subscribed")
    writers = 20
    barrier = threading.Barrier(writers)
    decisions = []
    errors = []

    def decide(record):
        decisions.append(record.quantity)
        return sm.apply(record, change(Kind.CHANGE_QUANTITY, quantity=record.quantity + 1))

    def writer():
        try:
            barrier.wait()
            repo.apply(sid, decide, attempts=writers * 3)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=writer) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    final = repo.get(sid).record
    assert final.quantity == writers
    history = repo.history(sid)
    increments = [entry for entry in history if entry["kind"] == "change_quantity"]
    assert len(increments) == writers
    assert all(entry["result"] == "applied" for entry in increments)
    assert sorted(entry["changes"]["quantity"][0] for entry in increments) == list(range(writers))
    assert [entry["seq"] for entry in history] == list(range(1, writers + 2))
    assert final.history_seq == writers + 1
    assert len(decisions) > writers  # there really were conflicts, and they were re-decided


# --- operation markers (exactly once) ------------------------------------------------------------------


def test_record_operation_twice(repo):
    sid, op = new_id(), new_id()
    created, marker = repo.record_operation(sid, op, action="ChangePlan", payload='{"id": "first"}', correlation_id="cid-1")
    assert created is True
    assert marker.pending
    assert (marker.subscription_id, marker.operation_id, marker.action) == (sid, op, "ChangePlan")
    assert marker.payload == '{"id": "first"}' and marker.correlation_id == "cid-1"
    assert marker.received_at is not None and marker.etag

    created_again, again = repo.record_operation(sid, op, action="ChangePlan", payload='{"id": "second"}', correlation_id="cid-2")
    assert created_again is False
    assert again.payload == '{"id": "first"}'  # the first delivery's record is kept
    assert again.correlation_id == "cid-1"
    assert again.pending


def test_apply_settles_the_marker_exactly_once(repo):
    sid, op = new_id(), new_id()
    create(repo, sid)
    repo.record_operation(sid, op, action="ChangePlan", payload="{}", correlation_id="cid")
    outcome = repo.apply(sid, deciding(change(Kind.CHANGE_PLAN, plan_id="premium", operation_id=op)), operation_id=op)
    assert outcome.result is Result.APPLIED
    marker = repo.get_marker(sid, op)
    assert not marker.pending
    assert marker.status == "applied"
    assert marker.completed_at is not None
    assert repo.history(sid)[-1]["operationId"] == op

    decided = []

    def decide_again(record):
        decided.append(record)
        return sm.apply(record, change(Kind.CHANGE_PLAN, plan_id="basic", operation_id=op))

    assert repo.apply(sid, decide_again, operation_id=op) is None
    assert decided == []  # a duplicate is not even decided
    assert repo.get(sid).record.plan_id == "premium"
    assert len(repo.history(sid)) == 2


def test_apply_without_a_prior_marker_creates_a_settled_one(repo):
    sid, op = new_id(), new_id()
    outcome = repo.apply(sid, deciding(change(Kind.SYNC, subscription=snapshot(sid), operation_id=op)), operation_id=op)
    assert outcome is not None
    marker = repo.get_marker(sid, op)
    assert not marker.pending and marker.status == "applied"
    assert repo.apply(sid, deciding(change(Kind.SUSPEND)), operation_id=op) is None
    assert repo.get(sid).record.status is LocalStatus.SUBSCRIBED


def test_noop_outcome_still_settles_the_marker(repo):
    sid, op = new_id(), new_id()
    create(repo, sid)
    repo.record_operation(sid, op, action="Suspend", payload="{}", correlation_id="")
    outcome = repo.apply(sid, deciding(change(Kind.CHANGE_PLAN, plan_id="standard")), operation_id=op)
    assert outcome.result is Result.NOOP
    assert repo.get_marker(sid, op).status == "noop"
    assert repo.apply(sid, deciding(change(Kind.CHANGE_PLAN, plan_id="premium")), operation_id=op) is None


@pytest.mark.parametrize("with_marker", [True, False])
def test_concurrent_duplicate_deliveries_apply_once(repo, with_marker):
    sid, op = new_id(), new_id()
    create(repo, sid)
    if with_marker:
        repo.record_operation(sid, op, action="ChangeQuantity", payload="{}", correlation_id="")
    deliveries = 8
    barrier = threading.Barrier(deliveries)
    outcomes, errors = [], []

    def deliver():
        try:
            barrier.wait()
            outcomes.append(
                repo.apply(
                    sid,
                    lambda record: sm.apply(record, change(Kind.CHANGE_QUANTITY, quantity=record.quantity + 1, operation_id=op)),
                    operation_id=op,
                    attempts=deliveries * 2,
                )
            )
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=deliver) for _ in range(deliveries)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert sum(outcome is not None for outcome in outcomes) == 1
    assert repo.get(sid).record.quantity == 1
    assert [entry["kind"] for entry in repo.history(sid)] == ["sync", "change_quantity"]


def test_settle_marker(repo):
    sid, op = new_id(), new_id()
    _, marker = repo.record_operation(sid, op, action="ChangePlan", payload="{}", correlation_id="")
    assert repo.settle_marker(marker, "refused") is True
    settled = repo.get_marker(sid, op)
    assert settled.status == "refused" and not settled.pending
    assert repo.settle_marker(marker, "verified_away") is False  # someone (we) settled it first
    assert repo.get_marker(sid, op).status == "refused"
    assert repo.apply(sid, deciding(change(Kind.SYNC, subscription=snapshot(sid))), operation_id=op) is None


# --- the reconciler's scan ----------------------------------------------------------------------------


def test_scan_returns_state_pending_markers_and_pending_events(repo):
    a, b, c = new_id(), new_id(), new_id()
    pending_op, settled_op = new_id(), new_id()
    create(repo, a, "PendingFulfillmentStart")
    create(repo, b, "Subscribed")
    repo.record_operation(a, pending_op, action="Suspend", payload="{}", correlation_id="")
    repo.record_operation(b, settled_op, action="Suspend", payload="{}", correlation_id="")
    repo.apply(b, deciding(change(Kind.SUSPEND)), operation_id=settled_op, build_event=build_event_document)
    repo.apply(b, deciding(change(Kind.REINSTATE)), build_event=build_event_document)
    delivered = repo.pending_events(b)[0]
    repo.mark_event_delivered(delivered)
    orphan_op = new_id()
    repo.record_operation(c, orphan_op, action="Unsubscribe", payload="{}", correlation_id="")  # a marker, no record yet

    items = list(repo.scan(page_size=2))  # small pages: the scan follows them all
    states = {item.stored.record.id: item.stored for item in items if item.kind == "state"}
    markers = [(item.marker.subscription_id, item.marker.operation_id) for item in items if item.kind == "op"]
    events = [(item.event.subscription_id, item.event.seq) for item in items if item.kind == "event"]
    assert set(states) == {a, b}
    assert states[b].record.status is LocalStatus.SUBSCRIBED and states[b].etag == repo.get(b).etag
    assert sorted(markers) == sorted([(a, pending_op), (c, orphan_op)])  # not the settled one of b
    assert events == [(b, 3)]  # the reinstate event; the delivered suspend event is gone
    assert {item.kind for item in items} == {"state", "op", "event"}  # no history rows
    assert len(items) == 2 + 2 + 1
    assert repo.metrics.scanned_pages >= 3
    # with delivered_since, the same scan also returns the events delivered from then on
    recent = [item for item in repo.scan(delivered_since=utc_now() - timedelta(hours=1)) if item.kind == "delivered"]
    assert [(item.event.subscription_id, item.event.seq) for item in recent] == [(b, delivered.seq)]
    assert recent[0].event.delivered_at is not None and not recent[0].event.pending
    assert not [item for item in repo.scan(delivered_since=utc_now() + timedelta(minutes=1)) if item.kind == "delivered"]


def test_outbox_bookkeeping(repo):
    sid = new_id()
    create(repo, sid)
    repo.apply(sid, deciding(change(Kind.SUSPEND)), build_event=build_event_document)
    repo.apply(sid, deciding(change(Kind.CHANGE_PLAN, plan_id="premium")), build_event=build_event_document)
    repo.apply(sid, deciding(change(Kind.CHANGE_PLAN, plan_id="premium")), build_event=build_event_document)  # noop: no event
    events = repo.pending_events(sid)
    assert [event.seq for event in events] == [2, 3]
    documents = [json.loads(event.body) for event in events]
    assert [d["eventType"] for d in documents] == [sm.EVENT_SUSPENDED, sm.EVENT_PLAN_CHANGED]
    assert [d["eventId"] for d in documents] == [event.event_id for event in events]
    repo.note_event_attempt(events[0], "HTTP 500")
    assert repo.pending_events(sid)[0].attempts == 1
    repo.mark_event_delivered(events[0])
    assert [event.seq for event in repo.pending_events(sid)] == [3]


# --- storage outage ----------------------------------------------------------------------------------


def test_storage_outage_fails_fast_and_writes_nothing(azurite, repo):
    sid = new_id()
    create(repo, sid)
    stored = repo.get(sid)
    op = new_id()
    decided = []

    def decide(record):
        decided.append(record)
        return sm.apply(record, change(Kind.SUSPEND))

    with azurite.outage():
        started = time.monotonic()
        with pytest.raises(StorageUnavailableError):
            repo.apply(sid, decide, known=stored, operation_id="", build_event=build_event_document)  # fails at the write
        assert decided, "the write itself was attempted"
        with pytest.raises(StorageUnavailableError):
            repo.get(sid)
        with pytest.raises(StorageUnavailableError):
            repo.record_operation(sid, op, action="Suspend", payload="{}", correlation_id="")
        with pytest.raises(StorageUnavailableError):
            list(repo.scan())
        with pytest.raises(StorageUnavailableError):
            repo.check()
        elapsed = time.monotonic() - started
        assert elapsed < 30, f"storage errors took {elapsed:.1f}s to surface"

    after = repo.get(sid)
    assert after.etag == stored.etag
    assert after.record == stored.record
    assert len(repo.history(sid)) == 1
    assert repo.get_marker(sid, op) is None
    assert repo.pending_events(sid) == []
    repo.check()  # and it works again once storage is back
