"""Billing fidelity: each defect of issue #23 has a test here that failed on the code before it, and the
read-back of what Microsoft processed. Azurite, the stand-in over real HTTP, the injected clock; every
test runs with Microsoft's batch results in request order and shuffled (the ``meter`` fixture)."""

from __future__ import annotations

import json
import logging
import re
from datetime import timedelta
from decimal import Decimal

import pytest

from devtools.marketplace_standin import make_plan
from shared import metering
from shared.metering import report_usage, resolve_flagged_usage, usage_view
from shared.usage_readback import run_usage_readback
from tests.integration.test_metering import DIMENSIONS, START, fail_batches, meter, usage, usage_events, usage_rows

__all__ = ["meter"]  # the fixture, shared with test_metering.py

pytestmark = pytest.mark.azurite
NINE = START.replace(minute=0) - timedelta(hours=1)


@pytest.fixture
def console_as(meter, devhost, http):
    """call(method, path, roles=..., **form): a console request as a signed-in staff member, served
    from the metering test's services (the dev host fixture installs a bundle of its own)."""
    from devtools.devhost import SignedInUser
    from shared.services import set_services_factory

    set_services_factory(lambda: meter.services)
    from tests.conftest import TENANT_ID

    def call(method: str, path: str, roles=("Console.Operator",), **data):
        devhost.signed_in_user = SignedInUser.parse("Ada Operator <ada@contoso.example>", TENANT_ID, roles=roles)
        return http.request(method, devhost.url + path, data=data or None, timeout=30)

    return call


def total_billed(meter, sid: str) -> Decimal:
    return sum((Decimal(e["quantity"]) for e in meter.accepted(sid)), Decimal(0))


# ---------------------------------------------------------------------------------------------
# 1. a Duplicate is compared exactly; what Microsoft kept less is carried, more is flagged


def test_a_duplicate_that_kept_less_by_500_units_in_1e12_carries_the_500(meter):
    sid = meter.subscription()
    meter.report(usage(sid, 10**12, at=NINE, id="big"))
    fail_batches(meter.standin, 1, process=True)  # Microsoft keeps 1e12; the answer is lost
    assert meter.emit().retry == 1
    meter.report(usage(sid, 500, at=NINE + timedelta(minutes=50), id="late"))  # the hour grows before the resend
    summary = meter.emit()
    assert summary.duplicates_matched == 1 and summary.shortfall_carried_quantity == 500
    (nine,) = usage_view(meter.services, sid, NINE, NINE)
    assert (nine["status"], nine["quantity"], nine["carriedOut"]) == ("Accepted", 1e12, 500.0)
    meter.clock.advance(hours=1)
    meter.emit()
    assert total_billed(meter, sid) == Decimal(10**12 + 500)  # not one unit lost
    assert [e["quantity"] for e in meter.accepted(sid)] == [Decimal(10**12), Decimal(500)]


def test_a_duplicate_that_kept_more_than_ours_is_flagged_with_both_quantities(meter):
    sid = meter.subscription()
    meter.report(usage(sid, 7, at=NINE, id="a"))
    meter.standin.usage_events[(sid, "api_calls", NINE.isoformat())] = {
        "usageEventId": "kept",
        "status": "Accepted",
        "messageTime": "2026-12-03T09:30:00Z",
        "quantity": Decimal("7.000000001"),  # within 1e-9 relative of ours: the old tolerance called it equal
        "resourceId": sid,
        "dimension": "api_calls",
        "effectiveStartTime": "2026-12-03T09:00:00Z",
        "planId": "metered",
    }
    summary = meter.emit()
    assert summary.flagged == 1 and summary.accepted == 0
    (flag,) = metering.usage_store(meter.services).list_flagged()
    assert "7.000000001" in flag["message"] and "our total is 7" in flag["message"]


# ---------------------------------------------------------------------------------------------
# 2. an id counts once wherever it lands


def test_an_id_counts_once_across_hours_with_and_without_a_time(meter):
    sid = meter.subscription()
    first = meter.report(usage(sid, 5, at=NINE + timedelta(minutes=10), id="job-7"))[1]["results"][0]
    assert first["hour"] == "2026-12-03T09:00:00Z" and first["duplicate"] is False
    other_hour = meter.report(usage(sid, 5, at=START, id="job-7"))[1]["results"][0]
    untimed = meter.report(usage(sid, 5, id="job-7"))[1]["results"][0]
    for again in (other_hour, untimed):
        assert again["status"] == "accepted" and again["duplicate"] is True and again["hour"] == "2026-12-03T09:00:00Z"
    reused = meter.report(usage(sid, 6, at=START, id="job-7"))[1]["results"][0]
    assert reused["reason"] == "id_reused"
    # within one call too: the second occurrence goes where the first counts
    _, body = meter.report(usage(sid, 2, at=NINE, id="pair"), usage(sid, 2, at=START, id="pair"))
    assert [r["hour"] for r in body["results"]] == ["2026-12-03T09:00:00Z"] * 2 and body["results"][1]["duplicate"]
    assert len(usage_rows(meter.services)) == 2
    meter.clock.advance(hours=1)
    meter.emit()
    assert total_billed(meter, sid) == 7


# ---------------------------------------------------------------------------------------------
# 3. exact quantities


def raw_report(meter, events_json: str):
    return report_usage(meter.services, ('{"events": [' + events_json + "]}").encode(), caller="app:test")


def test_quantities_are_parsed_exactly_and_refused_per_event_beyond_a_doubles_precision(meter):
    sid = meter.subscription()
    at = '"effectiveStartTime": "2026-12-03T09:10:00Z"'
    events = ", ".join(
        [
            f'{{"subscriptionId": "{sid}", "dimension": "api_calls", "quantity": 0.123456789012345678901234567890, {at}, "id": "p"}}',
            f'{{"subscriptionId": "{sid}", "dimension": "api_calls", "quantity": {"9" * 400}, {at}, "id": "big"}}',
            f'{{"subscriptionId": "{sid}", "dimension": "api_calls", "quantity": 1e-999999, {at}, "id": "tiny"}}',
            f'{{"subscriptionId": "{sid}", "dimension": "api_calls", "quantity": NaN, {at}, "id": "nan"}}',
            f'{{"subscriptionId": "{sid}", "dimension": "api_calls", "quantity": 0.1, {at}, "id": "a"}}',
            f'{{"subscriptionId": "{sid}", "dimension": "api_calls", "quantity": 0.2, {at}, "id": "b"}}',
        ]
    )
    result = raw_report(meter, events)
    assert result.status == 202  # never a 500 for a number
    reasons = [(r["id"], r["status"], r.get("reason")) for r in result.body["results"]]
    assert reasons == [
        ("p", "refused", "quantity_precision"),
        ("big", "refused", "invalid_quantity"),
        ("tiny", "refused", "quantity_precision"),
        ("nan", "refused", "invalid_quantity"),
        ("a", "accepted", None),
        ("b", "accepted", None),
    ]
    assert "15 significant digits" in result.body["results"][0]["message"]
    meter.emit()
    (event,) = meter.accepted(sid)
    assert event["quantity"] == Decimal("0.3")  # 0.1 + 0.2 exactly, not 0.30000000000000004
    body = next(e["body"] for e in meter.standin.last_requests if e["kind"] == "batch_usage_event")
    assert '"quantity": 0.3,' in body or '"quantity": 0.3}' in body


def test_an_hour_total_a_double_cannot_hold_is_billed_to_15_digits_and_the_rest_carried(meter):
    sid = meter.subscription()
    parts = [Decimal(10**12), Decimal("0.00001"), Decimal("0.00002")]  # each exact; the sum has 18 digits
    meter.report(*[usage(sid, float(q), at=NINE, id=f"q{n}") for n, q in enumerate(parts)])
    total = sum(parts, Decimal(0))
    assert not metering.exact_in_double(total)
    meter.emit()
    sent = meter.accepted(sid)[0]["quantity"]
    assert sent == Decimal("1000000000000.00") and metering.exact_in_double(sent)
    (nine,) = usage_view(meter.services, sid, NINE, NINE)
    assert Decimal(str(nine["shortfall"])) == total - sent and nine["carriedOut"] == pytest.approx(0.00003)
    meter.clock.advance(hours=1)
    meter.emit()
    assert total_billed(meter, sid) == total  # every fraction billed, one hour later


# ---------------------------------------------------------------------------------------------
# 4. never drop billable usage


def test_an_answer_for_other_events_than_those_sent_is_counted_and_sent_again(meter):
    sid = meter.subscription()
    meter.report(usage(sid, 3, at=NINE, id="u"))
    meter.standin.usage_answer_rewrite = lambda results: [{**r, "dimension": "other"} for r in results]
    summary = meter.emit()
    assert (summary.unmatched_answers, summary.retry, summary.accepted) == (1, 1, 0)
    meter.standin.usage_answer_rewrite = None
    assert meter.emit().accepted == 1 and total_billed(meter, sid) == 3


def test_a_per_item_error_is_sent_again_not_flagged(meter):
    sid = meter.subscription()
    meter.report(usage(sid, 4, at=NINE, id="e"))
    meter.standin.fail_usage_items(1)
    first = meter.emit()
    assert first.item_errors == 1 and first.retry == 1 and first.flagged == 0 and first.by_status == {"Error": 1}
    second = meter.emit()
    assert second.accepted == 1 and total_billed(meter, sid) == 4


def test_an_hour_failing_until_its_window_closes_is_carried_into_the_next_open_hour(meter):
    sid = meter.subscription()
    meter.report(usage(sid, 9, at=NINE, id="f"))
    meter.standin.fail_usage_items(1000)  # Microsoft answers Error for this hour, run after run
    for hours in (1, 10):
        meter.clock.advance(hours=hours)
        assert meter.emit().item_errors >= 1
    # 23:20 after the hour: less than the last-chance margin is left; this failure carries it
    meter.clock.advance(hours=11)
    summary = meter.emit()
    assert summary.carried_forward == 1 and summary.carried_forward_quantity == 9 and summary.flagged == 0
    (nine,) = usage_view(meter.services, sid, NINE, NINE)
    assert (nine["status"], nine["carriedOut"]) == ("Carried", 9.0)
    meter.standin.fail_usage_items(-meter.standin._usage_item_errors)  # Microsoft recovers
    meter.clock.advance(hours=1)
    meter.emit()
    assert total_billed(meter, sid) == 9
    assert meter.accepted(sid)[0]["effectiveStartTime"] == "2026-12-04T08:00:00Z"


def test_a_metering_run_after_a_long_outage_carries_every_hour_past_the_window_and_reports_it(meter):
    sid = meter.subscription()
    meter.report(*[usage(sid, n + 1, at=NINE - timedelta(hours=n), id=f"o{n}") for n in range(3)])
    meter.clock.advance(hours=30)  # the app was down longer than Microsoft's window
    summary = meter.emit()
    assert summary.carried_forward == 3 and summary.carried_forward_quantity == 6 and summary.calls == 0
    assert metering.usage_store(meter.services).list_flagged() == []
    meter.clock.advance(hours=1)
    meter.emit()
    assert total_billed(meter, sid) == 6 and len(meter.accepted(sid)) == 1  # one event: one open hour


# ---------------------------------------------------------------------------------------------
# 5. flagged usage has a way back (CLI here; the console below)


def flag_one(meter, quantity=5):
    sid = meter.subscription()
    meter.report(usage(sid, quantity, dimension="storage_gb", at=NINE, id="s"))
    meter.standin.set_plans("contoso-offer", [make_plan("metered", planComponents={"meteringDimensions": DIMENSIONS[:1]})])
    assert meter.emit().flagged == 1
    meter.standin.set_plans("contoso-offer", [make_plan("metered", planComponents={"meteringDimensions": DIMENSIONS})])
    return sid


@pytest.mark.parametrize("action", ["requeue", "move", "unbillable"])
def test_an_operator_decides_on_flagged_usage_from_the_cli(meter, action):
    from tests.integration.test_cli import cli_json

    sid = flag_one(meter)
    flag = f"--{action}"
    result = cli_json(meter.services, "usage", sid, "--hour", "2026-12-03T09:00:00Z", "--dimension", "storage_gb", flag)
    assert result["action"] == action
    assert metering.usage_store(meter.services).list_flagged() == []
    history = meter.services.repository.history(sid)
    assert history[-1]["kind"] == "operator_action" and history[-1]["actor"].startswith("operator:")
    assert action in history[-1]["detail"] or "moved" in history[-1]["detail"]
    meter.emit()
    meter.clock.advance(hours=1)
    meter.emit()
    billed = [(e["dimension"], e["effectiveStartTime"], e["quantity"]) for e in meter.accepted(sid)]
    expected = {
        "requeue": [("storage_gb", "2026-12-03T09:00:00Z", 5)],
        "move": [("storage_gb", "2026-12-03T10:00:00Z", 5)],
        "unbillable": [],
    }[action]
    assert billed == expected
    # a second decision on the same hour is refused: it is no longer flagged
    with pytest.raises(metering.AppError) as refused:
        resolve_flagged_usage(meter.services, sid, NINE, "storage_gb", "requeue", actor="operator:x")
    assert refused.value.code == "usage_not_flagged"


# ---------------------------------------------------------------------------------------------
# 6. a metering endpoint that does not exist (Microsoft's SaaS emulator)


def test_a_missing_metering_route_is_reported_once_and_spends_nothing(meter, caplog):
    from shared.health import check_health

    sid = meter.subscription()
    meter.report(usage(sid, 3, at=NINE, id="m"))
    meter.standin.metering_routes = False
    metering._endpoint_missing_logged = False
    with caplog.at_level(logging.ERROR, logger="shared.metering"):
        first = meter.emit()
        second = meter.emit()
    assert first.emission == second.emission == "endpoint_missing"
    assert [r for r in caplog.records if "metering_endpoint_missing" in r.getMessage()].__len__() == 1
    (nine,) = usage_view(meter.services, sid, NINE, NINE)
    assert nine["status"] == "Unsent" and nine["attempts"] == 0  # nothing recorded as tried
    assert second.pending_hours == 1 and second.retry == 0
    _, health = check_health(lambda: meter.services)
    assert health["checks"]["metering"]["emission"] == "endpoint_missing" and health["checks"]["metering"]["warnings"]
    meter.standin.metering_routes = True
    assert meter.emit().accepted == 1 and total_billed(meter, sid) == 3


def test_emission_off_keeps_taking_usage_and_sends_nothing(meter, make_services):
    meter.services = make_services(METERING_EMISSION="off")
    meter.services.clock = meter.clock
    sid = meter.subscription()
    assert meter.report(usage(sid, 2, at=NINE, id="x"))[1]["accepted"] == 1
    calls = meter.standin.calls["batch_usage_event"]
    summary = meter.emit()
    assert summary.emission == "off" and summary.pending_hours == 1 and meter.standin.calls["batch_usage_event"] == calls


# ---------------------------------------------------------------------------------------------
# 7. test purchases are kept as such


def test_test_purchases_keep_their_markers_and_are_not_revenue(meter, console_as):
    real = meter.subscription()
    test = meter.standin.seed(1, plan_id="metered")[0]
    meter.standin.set_subscription(test, isTest=True, sandboxType="Sandbox", sessionMode="DryRun")
    now = meter.clock.now
    meter.services.clock = lambda: now - timedelta(hours=36)
    from shared.reconcile import run_reconciliation

    assert run_reconciliation(meter.services).completed
    meter.services.clock = meter.clock
    record = meter.services.repository.get(test).record
    assert (record.is_test, record.sandbox_type, record.session_mode) == (True, "Sandbox", "DryRun")
    assert record.is_test_purchase and not meter.services.repository.get(real).record.is_test_purchase
    meter.report(usage(real, 10, at=NINE, id="r"), usage(test, 99, at=NINE, id="t"))
    meter.emit()
    meter.clock.advance(days=1)
    summary = run_usage_readback(meter.services, days=1)
    assert summary.test_rows == 1 and summary.revenue_ours == 10 and summary.revenue_microsoft == 10
    page = console_as("GET", f"/api/console/subscriptions/{test}", roles=("Console.Reader",))
    assert 'data-testid="test-badge"' in page.text
    billing = console_as("GET", "/api/console/billing?days=3", roles=("Console.Reader",))
    assert billing.status_code == 200
    assert test in re.search(r'data-testid="billing-test-row">(.*?)</tr>', billing.text, re.S).group(1)
    assert all(test not in row for row in re.findall(r'data-testid="billing-row"[^>]*>(.*?)</tr>', billing.text, re.S))


# ---------------------------------------------------------------------------------------------
# read-back


def test_read_back_matches_flags_differences_rejected_and_mismatch_and_writes_one_event(meter):
    a, b, c, d = (meter.subscription() for _ in range(4))
    meter.report(
        usage(a, 10, at=NINE, id="a"),
        usage(b, 20, at=NINE, id="b"),
        usage(c, 30, at=NINE, id="c"),
        usage(d, 40, at=NINE, id="d"),
        usage(a, 1.5, dimension="storage_gb", at=NINE - timedelta(hours=2), id="a2"),
    )
    meter.emit()
    day = "2026-12-03"
    meter.standin.usage_recon[(b, "api_calls", day)] = {"processedQuantity": Decimal(18)}  # Microsoft billed less
    meter.standin.usage_recon[(c, "api_calls", day)] = {"reconStatus": "Rejected"}
    meter.standin.usage_recon[(d, "api_calls", day)] = {"reconStatus": "Mismatch"}
    meter.standin.usage_result_order = "shuffled"  # the read-back's order is not promised either
    meter.clock.advance(days=1)
    summary = run_usage_readback(meter.services, days=2)
    assert summary.days == ["2026-12-02", "2026-12-03"] and summary.marketplace_calls == 1
    assert (summary.rows, summary.matched, summary.differences, summary.rejected) == (5, 2, 3, 1)
    statuses = {(f["subscriptionId"], f["status"]) for f in summary.found}
    assert statuses == {(b, "Difference"), (c, "Rejected"), (d, "Mismatch")}
    assert summary.hour_queries == 2 * 24 * 16
    # stored per day, an event per subscription with a finding, once
    from shared.usage_readback import read_back_view

    rows = read_back_view(meter.services, 2)["rows"]
    assert {(r["subscriptionId"], r["dimension"], r["status"]) for r in rows} >= {
        (a, "storage_gb", "Match"),
        (b, "api_calls", "Difference"),
    }
    (event,) = [e for e in usage_events(meter.services, b) if e["eventType"] == "usage.mismatch"]
    assert event["readBack"][0] | {} == event["readBack"][0] and event["readBack"][0]["processed"] == "18"
    again = run_usage_readback(meter.services, days=2)
    assert again.differences == 3 and again.events_written == 0  # the same finding: no second event


def test_read_back_finds_usage_microsoft_lacks_or_we_lack(meter):
    ours_only, theirs_only = meter.subscription(), meter.subscription()
    meter.report(usage(ours_only, 3, at=NINE, id="x"))
    meter.emit()
    meter.standin.usage_events.pop((ours_only, "api_calls", NINE.isoformat()))  # lost at Microsoft
    meter.standin.usage_events[(theirs_only, "api_calls", NINE.isoformat())] = {
        "usageEventId": "someone-else",
        "status": "Accepted",
        "quantity": Decimal(4),
        "resourceId": theirs_only,
        "dimension": "api_calls",
        "effectiveStartTime": "2026-12-03T09:00:00Z",
        "planId": "metered",
    }
    meter.clock.advance(days=1)
    summary = run_usage_readback(meter.services, days=1)
    assert {(f["subscriptionId"], f["status"]) for f in summary.found} == {
        (ours_only, "MissingAtMicrosoft"),
        (theirs_only, "UnknownToUs"),
    }


def test_read_back_when_microsoft_cannot_answer_compares_nothing_and_says_so(meter):
    from shared.health import check_health

    meter.standin.fail_next(8, 503, path_contains="usageEvents", retry_after=0)
    summary = run_usage_readback(meter.services, days=1)
    assert summary.error and summary.rows == 0 and summary.differences == 0
    _, health = check_health(lambda: meter.services)
    assert health["checks"]["metering"]["readBack"]["error"]


def test_cli_usage_reconcile_and_health(meter):
    from shared.health import check_health
    from tests.integration.test_cli import cli, cli_json

    sid = meter.subscription()
    meter.report(usage(sid, 5, at=NINE, id="y"))
    meter.emit()
    meter.standin.usage_recon[(sid, "api_calls", "2026-12-03")] = {"submittedQuantity": Decimal(6)}
    meter.clock.advance(days=1)
    data = cli_json(meter.services, "usage", "reconcile", "--days", "1", expect=1)  # exit 1: something differs
    assert data["differences"] == 1 and data["found"][0]["submitted"] == "6" and data["found"][0]["ours"] == "5"
    code, text = cli(meter.services, "usage", "reconcile")
    assert code == 1 and "1 differ" in text and sid in text
    _, health = check_health(lambda: meter.services)
    assert health["checks"]["metering"]["readBack"]["differences"] == 1
    assert any("Billing page" in w for w in health["checks"]["metering"]["warnings"])
    assert json.dumps(health)  # health stays JSON


def test_console_usage_decision_over_http_needs_the_operator_role_csrf_and_confirmation(meter, console_as):
    sid = flag_one(meter, quantity=8)
    reader = console_as("GET", "/api/console/attention", roles=("Console.Reader",))
    assert reader.status_code == 200 and "/api/console/usage/resolve" not in reader.text
    attention = console_as("GET", "/api/console/attention")
    form = re.search(r'<form method="post" action="/api/console/usage/resolve".*?</form>', attention.text, re.S).group(0)
    fields = dict(re.findall(r'name="(form_token|subscription_id|hour|dimension)" value="([^"]*)"', form))
    assert fields["subscription_id"] == sid
    url = "/api/console/usage/resolve"
    as_reader = console_as("POST", url, roles=("Console.Reader",), **fields, action="move", confirm="yes")
    assert as_reader.status_code == 403 and metering.usage_store(meter.services).list_flagged()
    unconfirmed = console_as("POST", url, **fields, action="move")
    assert unconfirmed.status_code == 400 and metering.usage_store(meter.services).list_flagged()
    forged = console_as("POST", url, **{**fields, "form_token": "x"}, action="move", confirm="yes")
    assert forged.status_code in (400, 403) and metering.usage_store(meter.services).list_flagged()
    done = console_as("POST", url, **fields, action="move", confirm="yes")
    assert done.status_code == 200 and "Carried" in done.text
    assert metering.usage_store(meter.services).list_flagged() == []
    assert meter.services.repository.history(sid)[-1]["actor"].startswith("operator:")
