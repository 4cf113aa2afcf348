"""Metered billing end to end: ingest and emission against Azurite and the marketplace stand-in.

Time is the services bundle's clock and the stand-in's usage clock, moved together (no sleeps).
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from devtools.marketplace_standin import make_plan
from shared import metering
from shared import state_machine as sm
from shared.domain import format_timestamp, parse_timestamp
from shared.metering import report_usage, run_metering, usage_view
from shared.reconcile import run_reconciliation
from shared.state_machine import Change, Kind, Source
from shared.usage_store import hour_of

pytestmark = pytest.mark.azurite

DIMENSIONS = [
    {"id": "api_calls", "name": "API calls", "unitOfMeasure": "call", "pricePerUnit": 0.01},
    {"id": "storage_gb", "name": "Storage", "unitOfMeasure": "GB", "pricePerUnit": 0.1},
]
PRO_DIMENSIONS = [*DIMENSIONS, {"id": "gpu_hours", "name": "GPU hours", "unitOfMeasure": "hour", "pricePerUnit": 2.0}]
START = datetime(2026, 12, 3, 10, 20, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta) -> None:
        self.now += timedelta(**delta)


class Meter:
    def __init__(self, services, standin, clock):
        self.services, self.standin, self.clock = services, standin, clock

    def report(self, *events, caller: str = "app:test") -> tuple[int, dict]:
        result = report_usage(self.services, json.dumps({"events": list(events)}).encode(), caller=caller)
        return result.status, result.body

    def emit(self, **kw) -> metering.MeteringSummary:
        return run_metering(self.services, **kw)

    def accepted(self, subscription_id=None) -> list[dict]:
        """What Microsoft's stand-in accepted, with its hour as ``2026-12-03T09:00:00Z``."""
        events = self.standin.accepted_usage(subscription_id)
        for event in events:
            event["effectiveStartTime"] = format_timestamp(parse_timestamp(event["effectiveStartTime"]))
        return events

    def subscription(self, plan_id="metered", status="Subscribed") -> str:
        (subscription_id,) = self.standin.seed(1, plan_id=plan_id, status=status)
        # Recorded long ago (a day and a half), so usage of the last 24 hours finds it in force.
        now = self.clock.now
        self.services.clock = lambda: now - timedelta(hours=36)
        assert run_reconciliation(self.services).completed
        self.services.clock = self.clock
        return subscription_id


def usage(subscription_id: str, quantity=1, dimension="api_calls", at: datetime | None = None, **fields) -> dict:
    event = {"subscriptionId": subscription_id, "dimension": dimension, "quantity": quantity, **fields}
    if at is not None:
        event["effectiveStartTime"] = at.isoformat().replace("+00:00", "Z")
    return event


@pytest.fixture(params=["request", "shuffled"])
def meter(request, standin, make_services):
    """Every metering test runs twice: Microsoft's results in request order, and shuffled (the
    documentation does not promise an order)."""
    standin.usage_result_order = request.param
    standin.set_plans(
        "contoso-offer",
        [
            make_plan("metered", planComponents={"meteringDimensions": DIMENSIONS}),
            make_plan("metered-pro", planComponents={"meteringDimensions": PRO_DIMENSIONS}),
        ],
    )
    clock = Clock(START)
    standin.usage_clock = clock
    services = make_services()
    services.clock = clock
    return Meter(services, standin, clock)


def usage_rows(services) -> list[dict]:
    table = services.usage_store._table
    return list(table.query_entities("Kind eq 'usage'"))


def usage_events(services, subscription_id: str) -> list[dict]:
    """The subscription's usage.* lifecycle events in the outbox."""
    rows = services.repository._subscriptions.query_entities(
        "PartitionKey eq @pk and Kind eq 'event'", parameters={"pk": subscription_id}
    )
    documents = [json.loads("".join(str(row.get(f"Body{i}" if i else "Body", "")) for i in range(12))) for row in rows]
    return [d for d in documents if d["eventType"].startswith("usage.")]


def fail_batches(standin, calls: int, status: int = 503, *, process: bool = False) -> None:
    """The next ``calls`` batchUsageEvent calls fail, each with all its retries (4 attempts)."""
    standin.fail_next(4 * calls, status, path_contains="batchUsageEvent", retry_after=0, process=process)


# ---------------------------------------------------------------------------------------------
# ingest


def test_usage_is_bucketed_by_hour_and_dimension_and_sent_once_with_exact_sums(meter):
    sid = meter.subscription()
    ten = START.replace(minute=0)
    status, body = meter.report(
        usage(sid, 1.5, at=ten + timedelta(minutes=1), id="a1"),
        usage(sid, 2.25, at=ten + timedelta(minutes=19), id="a2"),
        usage(sid, 0.1, at=ten + timedelta(minutes=5), id="a3"),
        usage(sid, 0.2, at=ten + timedelta(minutes=6), id="a4"),
        usage(sid, 7, dimension="storage_gb", at=ten + timedelta(minutes=2), id="s1"),
        usage(sid, 3, at=ten - timedelta(minutes=30), id="b1"),  # the hour before
    )
    assert status == 202 and body["accepted"] == 6 and body["refused"] == 0
    assert [r["hour"] for r in body["results"]][:2] == ["2026-12-03T10:00:00Z"] * 2
    assert body["results"][5]["hour"] == "2026-12-03T09:00:00Z"
    # Hour 10 is open: only hour 9 goes out.
    summary = meter.emit()
    assert summary.accepted == 1 and summary.calls == 1
    assert [(e["dimension"], e["quantity"], e["effectiveStartTime"]) for e in meter.accepted(sid)] == [
        ("api_calls", 3, "2026-12-03T09:00:00Z")
    ]
    meter.clock.advance(hours=1)
    summary = meter.emit()
    assert summary.accepted == 2 and summary.calls == 1 and summary.hours_settled == 1
    sent = {(e["dimension"], e["effectiveStartTime"]): e["quantity"] for e in meter.accepted(sid)}
    assert sent[("api_calls", "2026-12-03T10:00:00Z")] == Decimal("4.05")  # 1.5 + 2.25 + 0.1 + 0.2, exactly
    assert sent[("storage_gb", "2026-12-03T10:00:00Z")] == 7
    # Nothing left: a second run sends nothing.
    again = meter.emit()
    assert again.buckets_sent == 0 and again.calls == 0 and again.pending_hours == 0
    view = usage_view(meter.services, sid, START - timedelta(hours=2), START)
    assert {(v["dimension"], v["status"], v["quantity"], v["events"]) for v in view} == {
        ("api_calls", "Accepted", 3.0, 1),
        ("api_calls", "Accepted", 4.05, 4),
        ("storage_gb", "Accepted", 7.0, 1),
    }
    assert all(v["usageEventId"] for v in view)


def test_a_repeated_id_is_counted_once_even_in_another_hour(meter):
    sid = meter.subscription()
    first = meter.report(usage(sid, 5, id="job-42"))
    assert first[1]["results"][0]["duplicate"] is False
    meter.clock.advance(hours=1)  # a retry without effectiveStartTime would land in the next hour
    status, body = meter.report(usage(sid, 5, id="job-42"), usage(sid, 5, id="job-42"))
    assert status == 202 and body["accepted"] == 2
    assert all(r["duplicate"] for r in body["results"])
    assert {r["hour"] for r in body["results"]} == {first[1]["results"][0]["hour"]}
    reused = meter.report(usage(sid, 6, id="job-42"))[1]["results"][0]
    assert reused["status"] == "refused" and reused["reason"] == "id_reused"
    assert len(usage_rows(meter.services)) == 1
    meter.clock.advance(hours=1)
    meter.emit()
    assert [e["quantity"] for e in meter.accepted(sid)] == [5]


def test_a_repeated_id_with_its_time_is_counted_once_and_another_quantity_is_refused(meter):
    sid = meter.subscription()
    at = START - timedelta(minutes=50)
    first = meter.report(usage(sid, 5, at=at, id="t-1"), usage(sid, 5, at=at, id="t-1"))[1]["results"]
    assert [r["duplicate"] for r in first] == [False, True]
    again = meter.report(usage(sid, 5, at=at, id="t-1"))[1]["results"][0]  # a retry of the whole call
    assert again["status"] == "accepted" and again["duplicate"] is True
    other = meter.report(usage(sid, 7, at=at, id="t-1"), usage(sid, 5, dimension="storage_gb", at=at, id="t-1"))[1]["results"]
    assert [(r["status"], r.get("reason")) for r in other] == [("refused", "id_reused"), ("refused", "id_reused")]
    assert len(usage_rows(meter.services)) == 1
    meter.clock.advance(hours=1)
    meter.emit()
    assert [e["quantity"] for e in meter.accepted(sid)] == [5]


def test_twenty_concurrent_reporters_into_one_bucket_lose_nothing(meter):
    sid = meter.subscription()
    errors: list[BaseException] = []

    def reporter(n: int) -> None:
        try:
            events = [usage(sid, 1, id=f"r{n}-{i}") for i in range(25)]
            status, body = meter.report(*events)
            assert status == 202 and body["accepted"] == 25, body
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=reporter, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(usage_rows(meter.services)) == 500
    meter.clock.advance(hours=1)
    summary = meter.emit()
    assert summary.accepted == 1
    assert [e["quantity"] for e in meter.accepted(sid)] == [500]


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ("not an object", "invalid_event"),
        ({"subscriptionId": "not-a-guid", "dimension": "api_calls", "quantity": 1}, "invalid_subscription_id"),
        ({"dimension": "api_calls", "quantity": 1}, "invalid_subscription_id"),
        ({"SID": 1, "dimension": "api calls!", "quantity": 1}, "invalid_dimension"),
        ({"SID": 1, "dimension": "api_calls", "quantity": 0}, "invalid_quantity"),
        ({"SID": 1, "dimension": "api_calls", "quantity": -2}, "invalid_quantity"),
        ({"SID": 1, "dimension": "api_calls", "quantity": "3"}, "invalid_quantity"),
        ({"SID": 1, "dimension": "api_calls", "quantity": True}, "invalid_quantity"),
        ({"SID": 1, "dimension": "api_calls", "quantity": 1e13}, "invalid_quantity"),
        ({"SID": 1, "dimension": "api_calls", "quantity": 1, "effectiveStartTime": "yesterday"}, "invalid_effective_start_time"),
        (
            {"SID": 1, "dimension": "api_calls", "quantity": 1, "effectiveStartTime": "2026-12-03T12:00:00Z"},
            "effective_start_time_in_future",
        ),
        (
            {"SID": 1, "dimension": "api_calls", "quantity": 1, "effectiveStartTime": "2026-12-02T09:59:00Z"},
            "effective_start_time_too_old",
        ),
        ({"SID": 1, "dimension": "api_calls", "quantity": 1, "id": "a/b"}, "invalid_id"),
        ({"SID": 1, "dimension": "api_calls", "quantity": 1, "id": "x" * 129}, "invalid_id"),
        ({"SID": 1, "dimension": "gpu_hours", "quantity": 1}, "unknown_dimension"),
        (
            {"subscriptionId": "00000000-0000-4000-8000-00000000abcd", "dimension": "api_calls", "quantity": 1},
            "unknown_subscription",
        ),
        ({"SID": "suspended", "dimension": "api_calls", "quantity": 1}, "not_subscribed"),
    ],
)
def test_bad_events_are_refused_with_a_reason_and_record_nothing(meter, event, reason):
    sid = meter.subscription()
    suspended = meter.subscription(status="Suspended")
    if isinstance(event, dict) and "SID" in event:
        event = {
            **{k: v for k, v in event.items() if k != "SID"},
            "subscriptionId": suspended if event["SID"] == "suspended" else sid,
        }
    good = usage(sid, 2, id="good")
    status, body = meter.report(event, good)
    assert status == 202
    bad, ok = body["results"]
    assert bad["status"] == "refused" and bad["reason"] == reason, bad
    assert bad["message"]
    assert ok["status"] == "accepted"
    assert len(usage_rows(meter.services)) == 1  # only the good one


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "malformed_json"),
        (b'{"events": []}', 400, "no_events"),
        (b'{"events": {}}', 400, "no_events"),
        (b"[]", 400, "no_events"),
        (json.dumps({"events": [{}] * 1001}).encode(), 400, "too_many_events"),
        (b'{"events": [' + b'"' + b"x" * (1024 * 1024) + b'"]}', 413, "payload_too_large"),
    ],
)
def test_bad_bodies_are_refused_whole(meter, body, status, code):
    with pytest.raises(metering.AppError) as raised:
        report_usage(meter.services, body, caller="app:test")
    assert raised.value.http_status == status and raised.value.code == code
    assert usage_rows(meter.services) == []


def test_usage_before_activation_or_during_suspension_is_refused_by_its_time(meter):
    sid = meter.subscription()
    suspended_at = START - timedelta(minutes=10)
    change = Change(kind=Kind.SUSPEND, source=Source.WEBHOOK, occurred_at=suspended_at)
    meter.services.repository.apply(sid, lambda r: sm.apply(r, change, now=START))
    _, body = meter.report(
        usage(sid, 1, at=suspended_at - timedelta(minutes=30), id="before"),
        usage(sid, 1, at=suspended_at + timedelta(minutes=5), id="after"),
    )
    assert [r["status"] for r in body["results"]] == ["accepted", "refused"]
    assert body["results"][1]["reason"] == "not_subscribed" and "Suspended" in body["results"][1]["message"]


# ---------------------------------------------------------------------------------------------
# emission


def test_plan_change_mid_hour_keeps_each_events_plan_and_sends_the_latest(meter):
    sid = meter.subscription()
    ten = START.replace(minute=0)
    changed_at = ten + timedelta(minutes=15)
    change = Change(kind=Kind.CHANGE_PLAN, source=Source.WEBHOOK, occurred_at=changed_at, plan_id="metered-pro")
    meter.services.repository.apply(sid, lambda r: sm.apply(r, change, now=START))
    meter.standin.set_subscription(sid, planId="metered-pro")
    _, body = meter.report(
        usage(sid, 2, at=ten + timedelta(minutes=5), id="old"),
        usage(sid, 3, at=ten + timedelta(minutes=18), id="new"),
        usage(sid, 1, dimension="gpu_hours", at=ten + timedelta(minutes=1), id="gpu-before"),  # not in the old plan
    )
    assert [(r["status"], r.get("planId")) for r in body["results"]] == [
        ("accepted", "metered"),
        ("accepted", "metered-pro"),
        ("refused", None),
    ]
    assert {row["PlanId"] for row in usage_rows(meter.services)} == {"metered", "metered-pro"}
    meter.clock.advance(hours=1)
    meter.emit()
    (event,) = meter.accepted(sid)
    assert (event["planId"], event["quantity"]) == ("metered-pro", 5)


def test_every_per_item_status_is_recorded_and_refusals_are_flagged_never_resent(meter):
    sid = meter.subscription()
    gone = meter.subscription()
    inactive = meter.subscription()
    dup = meter.subscription()
    nine = START.replace(minute=0) - timedelta(hours=1)
    meter.report(
        usage(sid, 4, at=nine, id="ok"),
        usage(gone, 1, at=nine, id="gone"),
        usage(inactive, 1, at=nine, id="inactive"),
        usage(dup, 9, at=nine, id="dup"),
        usage(sid, 2, dimension="storage_gb", at=nine, id="dim"),
    )
    # Microsoft's side moves on: one subscription disappears, one is suspended, one hour already holds
    # another quantity, and a dimension is withdrawn from the plan.
    meter.standin._subscriptions.pop(gone)
    meter.standin.set_subscription(inactive, status="Suspended")
    meter.standin.usage_events[(dup, "api_calls", nine.isoformat())] = {
        "usageEventId": "kept-before",
        "status": "Accepted",
        "quantity": Decimal(10),  # more than ours (9): someone else sent this hour
        "resourceId": dup,
        "dimension": "api_calls",
        "effectiveStartTime": "2026-12-03T09:00:00Z",
        "planId": "metered",
    }
    meter.standin.set_plans("contoso-offer", [make_plan("metered", planComponents={"meteringDimensions": DIMENSIONS[:1]})])
    summary = meter.emit()
    assert summary.accepted == 1 and summary.flagged == 4 and summary.calls == 1
    assert summary.by_status == {
        "Accepted": 1,
        "ResourceNotFound": 1,
        "ResourceNotActive": 1,
        "Duplicate": 1,
        "InvalidDimension": 1,
    }
    flagged = {(f["subscriptionId"], f["marketplaceStatus"]) for f in metering.usage_store(meter.services).list_flagged()}
    assert flagged == {(gone, "ResourceNotFound"), (inactive, "ResourceNotActive"), (dup, "Duplicate"), (sid, "InvalidDimension")}
    dup_view = usage_view(meter.services, dup, nine, nine)
    assert "already holds 10" in dup_view[0]["message"] and dup_view[0]["status"] == "Flagged"
    calls = meter.standin.calls["batch_usage_event"]
    again = meter.emit()
    assert again.buckets_sent == 0 and meter.standin.calls["batch_usage_event"] == calls  # never re-sent blindly
    assert again.flagged_total == 4
    events = usage_events(meter.services, sid)
    assert sorted(e["eventType"] for e in events) == ["usage.accepted", "usage.rejected"]
    rejected = next(e for e in events if e["eventType"] == "usage.rejected")
    assert rejected["usage"][0]["dimension"] == "storage_gb" and rejected["usage"][0]["marketplaceStatus"] == "InvalidDimension"
    assert rejected["source"] == "metering"


def test_bad_argument_is_flagged_and_microsofts_expired_is_carried_into_the_next_open_hour(meter):
    moved = meter.subscription()
    late = meter.subscription()
    nine = START.replace(minute=0) - timedelta(hours=1)
    meter.report(usage(moved, 2, at=nine, id="m"))
    meter.standin.set_subscription(moved, planId="metered-pro")  # changed at Microsoft before the hour was sent
    first = meter.emit()
    assert first.by_status == {"BadArgument": 1} and first.flagged == 1 and first.accepted == 0
    meter.report(usage(late, 3, at=START, id="l"))
    meter.clock.advance(hours=22)
    # Microsoft's clock runs ahead of ours: for it the hour is past the 24-hour window.
    meter.standin.usage_clock = lambda: meter.clock.now + timedelta(hours=3)
    second = meter.emit()
    assert second.by_status == {"Expired": 1} and second.carried_forward == 1 and second.accepted == 0
    assert second.carried_forward_quantity == 3 and second.flagged == 0
    flagged = {f["subscriptionId"]: f for f in metering.usage_store(meter.services).list_flagged()}
    assert set(flagged) == {moved}
    assert flagged[moved]["marketplaceStatus"] == "BadArgument" and "not the plan" in flagged[moved]["message"]
    (ten,) = usage_view(meter.services, late, START, START)
    assert (ten["status"], ten["carriedOut"], ten["quantity"]) == ("Carried", 3.0, 0.0) and "Expired" in ten["message"]
    # The carried units go out with the hour they were carried into, once it closes.
    meter.standin.usage_clock = meter.clock
    meter.clock.advance(hours=1)
    third = meter.emit()
    assert third.accepted == 1
    assert [(e["effectiveStartTime"], e["quantity"]) for e in meter.accepted(late)] == [("2026-12-04T08:00:00Z", 3)]
    (into,) = usage_view(meter.services, late, meter.clock.now - timedelta(hours=1), meter.clock.now - timedelta(hours=1))
    assert (into["status"], into["carriedIn"], into["quantity"]) == ("Accepted", 3.0, 3.0)


@pytest.mark.parametrize(
    ("status", "ours"),
    [
        ("InvalidQuantity", "Flagged"),
        ("InvalidDimension", "Flagged"),
        ("ResourceNotFound", "Flagged"),
        ("ResourceNotActive", "Flagged"),
        ("BadArgument", "Flagged"),
        ("Error", "Pending"),  # not definitive: sent again
        ("ResourceNotAuthorized", "Flagged"),
        ("SomethingNew", "Flagged"),
        ("Expired", "Carried"),
        ("Accepted", "Accepted"),
    ],
)
def test_every_status_microsoft_may_answer_maps_to_a_bucket_state(meter, status, ours):
    from shared.domain import UsageEvent, UsageResult
    from shared.usage_store import Bucket

    emitter = metering.Emitter(meter.services)
    bucket = Bucket("s", START, "api_calls", quantity=Decimal(2))
    result = UsageResult.from_api(
        {"status": status, "quantity": 2, "usageEventId": "u", "error": {"code": status, "message": "why"}}
    )
    settled = emitter._settle(bucket, UsageEvent("s", "metered", "api_calls", Decimal(2), START), result)
    assert settled.status == ours
    assert settled.marketplace_status == ("Unknown" if status == "SomethingNew" else status)
    if ours != "Accepted":
        assert settled.message  # a person sees why


def test_duplicate_with_the_same_quantity_counts_as_accepted(meter):
    sid = meter.subscription()
    nine = START.replace(minute=0) - timedelta(hours=1)
    meter.report(usage(sid, 6, at=nine, id="x"))
    fail_batches(meter.standin, 1, process=True)  # Microsoft kept it; we never heard
    first = meter.emit()
    assert first.retry == 1 and first.accepted == 0 and first.pending_hours == 1
    second = meter.emit()
    assert second.accepted == 1 and second.duplicates_matched == 1 and second.pending_hours == 0
    assert [e["quantity"] for e in meter.accepted(sid)] == [6]
    (view,) = usage_view(meter.services, sid, nine, nine)
    assert view["status"] == "Accepted" and view["marketplaceStatus"] == "Duplicate" and view["usageEventId"]


def test_a_lost_answer_then_more_usage_bills_what_microsoft_kept_and_carries_the_rest(meter):
    sid = meter.subscription()
    nine = START.replace(minute=0) - timedelta(hours=1)
    meter.report(usage(sid, 6, at=nine, id="first"))
    fail_batches(meter.standin, 1, process=True)  # Microsoft keeps 6; we never hear it
    assert meter.emit().retry == 1
    meter.report(usage(sid, 4, at=nine + timedelta(minutes=40), id="more"))  # the hour grows before the resend
    summary = meter.emit()
    assert summary.accepted == 1 and summary.flagged == 0 and summary.shortfall_carried == 1
    assert summary.shortfall_carried_quantity == 4 and summary.late_carried == 0
    (nine_view,) = usage_view(meter.services, sid, nine, nine)
    assert (nine_view["status"], nine_view["quantity"], nine_view["carriedOut"]) == ("Accepted", 6.0, 4.0)
    meter.clock.advance(hours=1)
    meter.emit()
    assert [(e["effectiveStartTime"], e["quantity"]) for e in meter.accepted(sid)] == [
        ("2026-12-03T09:00:00Z", 6),
        ("2026-12-03T10:00:00Z", 4),
    ]


def test_throttling_and_timeouts_retry_next_run_without_duplicates(meter, monkeypatch):
    subscriptions = [meter.subscription() for _ in range(30)]  # two batches
    nine = START.replace(minute=0) - timedelta(hours=1)
    meter.report(*[usage(s, 1, at=nine, id=f"e-{n}") for n, s in enumerate(subscriptions)])
    fail_batches(meter.standin, 2, 429)
    throttled = meter.emit()
    assert throttled.calls == 2 and throttled.retry == 30 and throttled.accepted == 0
    monkeypatch.setattr(metering, "SEND_DEADLINE_SECONDS", 0.5)
    meter.standin.latency_seconds = 1.0
    timed_out = meter.emit()
    assert timed_out.accepted == 0 and timed_out.retry == throttled.retry
    meter.standin.latency_seconds = 0
    monkeypatch.setattr(metering, "SEND_DEADLINE_SECONDS", 30.0)
    final = meter.emit()
    assert final.accepted == 30 and final.pending_hours == 0
    assert sorted(e["resourceId"] for e in meter.accepted()) == sorted(subscriptions)  # each exactly once


def test_an_outage_of_hours_is_caught_up_oldest_first_and_an_hour_past_the_window_is_carried_not_dropped(meter):
    sid = meter.subscription()
    base = START.replace(minute=0)
    for hours_ago in range(5):
        meter.report(usage(sid, hours_ago + 1, at=base - timedelta(hours=hours_ago), id=f"h{hours_ago}"))
    # The app is down for a day: the oldest hour (base - 4 h) is now 24 h old, the next close to it.
    meter.clock.advance(hours=20)
    summary = meter.emit()
    assert summary.accepted == 4 and summary.expired == 0 and summary.near_expiry >= 1
    assert summary.carried_forward == 1 and summary.carried_forward_quantity == 5
    assert [e["effectiveStartTime"] for e in meter.accepted(sid)] == [
        "2026-12-03T07:00:00Z",
        "2026-12-03T08:00:00Z",
        "2026-12-03T09:00:00Z",
        "2026-12-03T10:00:00Z",
    ]
    # The hour that left the window while we were down is never sent for itself (Microsoft would
    # answer Expired) and never dropped: it is carried into the open hour, recorded on both.
    assert metering.usage_store(meter.services).list_flagged() == []
    assert meter.standin.calls["batch_usage_event"] == 1
    (six,) = usage_view(meter.services, sid, base - timedelta(hours=4), base - timedelta(hours=4))
    assert (six["status"], six["carriedOut"]) == ("Carried", 5.0)
    meter.clock.advance(hours=1)
    meter.emit()
    assert sum(e["quantity"] for e in meter.accepted(sid)) == 1 + 2 + 3 + 4 + 5  # every unit billed once
    assert meter.accepted(sid)[-1]["effectiveStartTime"] == "2026-12-04T06:00:00Z"


def test_a_spent_time_budget_leaves_the_rest_for_the_next_run(meter):
    subscriptions = [meter.subscription() for _ in range(3)]
    nine = START.replace(minute=0) - timedelta(hours=1)
    meter.report(*[usage(s, 1, at=nine, id=f"b-{n}") for n, s in enumerate(subscriptions)])
    stopped = meter.emit(time_budget_seconds=-1)  # spent before the first step
    assert stopped.budget_exhausted and stopped.buckets_sent == 0 and stopped.pending_hours == stopped.hours_listed > 0
    finished = meter.emit()
    assert not finished.budget_exhausted and finished.accepted == 3 and finished.pending_hours == 0


def test_near_expiry_is_logged_loudly_before_the_window_closes(meter, caplog):
    sid = meter.subscription()
    nine = START.replace(minute=0) - timedelta(hours=1)
    meter.report(usage(sid, 1, at=nine, id="n"))
    fail_batches(meter.standin, 1)
    meter.clock.advance(hours=21)  # 3 h before the 24-hour limit (warning: 4 h)
    with caplog.at_level("ERROR", logger="shared.metering"):
        summary = meter.emit()
    assert summary.near_expiry == 1 and summary.retry == 1
    assert any("usage_near_expiry" in r.getMessage() and sid in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("mode", ["carry", "unbillable"])
def test_late_usage_after_emission_never_makes_a_second_event(meter, make_services, mode):
    if mode == "unbillable":
        meter.services = make_services(METERING_LATE_USAGE="unbillable")
        meter.services.clock = meter.clock
    sid = meter.subscription()
    nine = START.replace(minute=0) - timedelta(hours=1)
    meter.report(usage(sid, 10, at=nine, id="on-time"))
    meter.emit()
    _, body = meter.report(usage(sid, 4, at=nine + timedelta(minutes=30), id="late"))
    assert body["results"][0]["hour"] == "2026-12-03T09:00:00Z"
    summary = meter.emit()
    nine_events = [e for e in meter.accepted(sid) if e["effectiveStartTime"] == "2026-12-03T09:00:00Z"]
    assert [e["quantity"] for e in nine_events] == [10]  # never a second event for 09:00
    (nine_view,) = usage_view(meter.services, sid, nine, nine)
    if mode == "carry":
        assert summary.late_carried == 1 and summary.late_carried_quantity == 4
        assert nine_view["carriedOut"] == 4
        meter.clock.advance(hours=1)
        meter.emit()
        ten = [e for e in meter.accepted(sid) if e["effectiveStartTime"] == "2026-12-03T10:00:00Z"]
        assert [e["quantity"] for e in ten] == [4]  # billed in the earliest open hour
        (ten_view,) = usage_view(meter.services, sid, START, START)
        assert ten_view["carriedIn"] == 4
        assert sum(e["quantity"] for e in meter.accepted(sid)) == 14
    else:
        assert summary.late_unbillable == 1 and summary.late_unbillable_quantity == 4
        assert nine_view["unbillable"] == 4
        meter.clock.advance(hours=1)
        meter.emit()
        assert sum(e["quantity"] for e in meter.accepted(sid)) == 10
    # A further run finds nothing more to carry.
    assert meter.emit().late_carried == 0


def test_usage_events_reach_the_outbox_once(meter):
    sid = meter.subscription()
    nine = START.replace(minute=0) - timedelta(hours=1)
    meter.report(usage(sid, 2, at=nine, id="a"), usage(sid, 3, dimension="storage_gb", at=nine, id="b"))
    meter.emit()
    meter.emit()
    (event,) = usage_events(meter.services, sid)
    assert event["eventType"] == "usage.accepted"
    assert [(u["dimension"], u["quantity"]) for u in event["usage"]] == [("api_calls", 2.0), ("storage_gb", 3.0)]
    assert all(u["usageEventId"] for u in event["usage"])
    kinds = [h["kind"] for h in meter.services.repository.history(sid)]
    assert kinds.count("usage_accepted") == 1


def test_health_reports_metering_backlog_and_flags(meter):
    from shared.health import check_health

    sid = meter.subscription()
    nine = START.replace(minute=0) - timedelta(hours=1)
    meter.report(usage(sid, 2, at=nine, id="a"))
    fail_batches(meter.standin, 1)
    meter.emit()
    status, body = check_health(lambda: meter.services)
    assert status == 200
    assert body["checks"]["metering"]["pendingHours"] == 1
    assert body["checks"]["metering"]["oldestPendingHours"] == pytest.approx(1.33, abs=0.01)
    assert body["checks"]["metering"]["flagged"] == 0
    assert body["checks"]["metering"]["bucketsToRetry"] == 1


def test_hour_of_is_utc():
    assert hour_of(datetime(2026, 12, 3, 10, 59, 59, tzinfo=UTC)) == datetime(2026, 12, 3, 10, tzinfo=UTC)


# ---------------------------------------------------------------------------------------------
# over HTTP: the route, its authentication and its app role

API_AUDIENCE = "api://contoso-fulfillment-api"


def test_usage_api_auth_matrix_over_http(standin, make_services, devhost, http):
    import time

    from shared.domain import utc_now

    standin.set_plans("contoso-offer", [make_plan("metered", planComponents={"meteringDimensions": DIMENSIONS})])
    services = make_services(PUBLISHER_API_AUDIENCE=API_AUDIENCE)
    (sid,) = standin.seed(1, plan_id="metered")
    services.clock = lambda: utc_now() - timedelta(hours=36)
    assert run_reconciliation(services).completed
    services.clock = utc_now

    def token(roles=("Usage.Write",), **claims) -> str:
        return standin.sign_token(
            {"aud": API_AUDIENCE, "azp": "5aa5aa5a-0000-4000-8000-0000000000cc", "roles": list(roles), **claims}
        )

    body = json.dumps({"events": [usage(sid, 3, id="http-1")]})
    url = devhost.url + "/api/usage"
    now = int(time.time())
    cases = [
        ("no token", None, 401),
        ("wrong audience", token(aud="api://someone-else"), 401),
        ("expired", token(exp=now - 3600, iat=now - 7200), 401),
        ("forged", standin.sign_token({"aud": API_AUDIENCE, "roles": ["Usage.Write"]}, key=standin.other_key()), 401),
        ("no role", token(roles=()), 403),
        ("the change role is not the usage role", token(roles=("Subscriptions.ReadWrite",)), 403),
    ]
    for name, bearer, status in cases:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {bearer}"} if bearer else {})}
        response = http.post(url, data=body, headers=headers, timeout=30)
        assert response.status_code == status, (name, response.text)
        assert not bearer or bearer not in response.text
        assert usage_rows(services) == [], name
    accepted = http.post(url, data=body, headers={"Authorization": f"Bearer {token()}"}, timeout=30)
    assert accepted.status_code == 202, accepted.text
    result = accepted.json()
    assert result["accepted"] == 1 and result["results"][0]["status"] == "accepted" and result["correlationId"]
    assert [row["Caller"] for row in usage_rows(services)] == ["app:5aa5aa5a-0000-4000-8000-0000000000cc"]
    bad = http.post(url, data=b"{nope", headers={"Authorization": f"Bearer {token()}"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"] == "malformed_json"


def test_cli_usage_flagged_and_meter_now(meter):
    from tests.integration.test_cli import cli, cli_json

    sid = meter.subscription()
    nine = START.replace(minute=0) - timedelta(hours=1)
    meter.report(usage(sid, 2, at=nine, id="a"), usage(sid, 5, dimension="storage_gb", at=nine, id="b"))
    meter.standin.set_plans("contoso-offer", [make_plan("metered", planComponents={"meteringDimensions": DIMENSIONS[:1]})])
    summary = cli_json(meter.services, "meter-now")
    assert summary["accepted"] == 1 and summary["flagged"] == 1 and summary["calls"] == 1
    shown = cli_json(meter.services, "usage", sid, "--from", "2026-12-03T08:00:00Z")
    assert {(b["dimension"], b["status"], b["reported"]) for b in shown["buckets"]} == {
        ("api_calls", "Accepted", 2.0),
        ("storage_gb", "Flagged", 5.0),
    }
    flagged = cli_json(meter.services, "usage", "--flagged")["flagged"]
    assert [(f["subscriptionId"], f["dimension"], f["marketplaceStatus"]) for f in flagged] == [
        (sid, "storage_gb", "InvalidDimension")
    ]
    code, text = cli(meter.services, "usage", "--flagged")
    assert code == 0 and "storage_gb" in text and "InvalidDimension" not in text.split("\n")[0]
    code, text = cli(meter.services, "usage", sid)
    assert code == 0 and "Accepted" in text and "Flagged" in text
    assert cli(meter.services, "usage")[0] == 2  # neither an id nor --flagged
    code, text = cli(meter.services, "meter-now")
    assert code == 0 and "0 buckets sent" in text
