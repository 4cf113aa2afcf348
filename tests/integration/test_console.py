"""Operator console, read side (issue 14, first slice), over real HTTP through the dev host: Easy Auth's
principal with app roles, Azurite and the marketplace stand-in."""

from __future__ import annotations

import re
from datetime import timedelta
from html import unescape

import pytest

from devtools.devhost import SignedInUser
from shared import console
from shared.reconcile import run_reconciliation
from tests.conftest import TENANT_ID, flag_with_waiting_event

pytestmark = pytest.mark.azurite

ADA = "Ada Operator <ada@contoso.example>"
STAFF_TENANT = TENANT_ID  # the publisher's tenant (MARKETPLACE_TENANT_ID in the tests' settings)


@pytest.fixture
def site(standin, services, devhost, http):
    ids = standin.seed(3, plan_id="standard", quantity=5)
    standin.set_subscription(ids[1], status="Suspended")
    standin.set_subscription(ids[2], name="<script>alert(1)</script> & Co")
    assert run_reconciliation(services).completed  # records them
    assert run_reconciliation(services).completed  # counts them (a run counts what its scan found)

    def get(path: str, roles: tuple[str, ...] | None = ("Console.Reader",), **params):
        devhost.signed_in_user = None if roles is None else SignedInUser.parse(ADA, STAFF_TENANT, roles=roles)
        return http.get(devhost.url + path, params=params, timeout=30)

    return ids, get


def rows(html: str) -> list[str]:
    return re.findall(r'data-testid="subscription-row">\s*<td[^>]*><a href="/api/console/subscriptions/([0-9a-f-]+)"', html)


def test_the_list_shows_every_subscription_with_counts_and_the_pages_security_headers(site):
    ids, get = site
    response = get("/api/console")
    assert response.status_code == 200
    assert sorted(rows(response.text)) == sorted(ids)
    counts = re.search(r'data-testid="counts">(.*?)</div>', response.text, re.S).group(1)
    assert "Subscribed</span> 2" in counts and "Suspended</span> 1" in counts
    chart = re.search(r'data-testid="status-chart".*?</svg>', response.text, re.S).group(0)
    bars = dict(re.findall(r'fill="#5c5c5c">(\w+)</text>\s*<rect x="170" y="2" height="16" width="([\d.]+)"', chart))
    assert float(bars["Subscribed"]) == pytest.approx(240.0) and float(bars["Suspended"]) == pytest.approx(120.0)
    headers = response.headers
    nonce = re.search(r"'nonce-([^']+)'", headers["Content-Security-Policy"]).group(1)
    assert f'nonce="{nonce}"' in response.text and "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert headers["Cache-Control"] == "no-store" and headers["Referrer-Policy"] == "no-referrer"
    assert "<script>alert(1)" not in response.text and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; Co" in response.text


def test_filters_search_and_server_side_pages(site, monkeypatch):
    ids, get = site
    assert rows(get("/api/console", status="Suspended").text) == [ids[1]]
    assert rows(get("/api/console", q=ids[2].upper()).text) == [ids[2]]  # an id: one point read
    assert rows(get("/api/console", q="& co").text) == [ids[2]]  # text: name, purchaser, beneficiary
    assert rows(get("/api/console", status="Unsubscribed").text) == []
    monkeypatch.setattr(console, "PAGE_SIZE", 2)
    first = get("/api/console")
    cursor = re.search(r'data-testid="next-page" href="([^"]+)"', first.text)
    assert len(rows(first.text)) == 2 and cursor
    second = get("/api/console" + unescape(cursor.group(1)))
    assert len(rows(second.text)) == 1 and 'data-testid="next-page"' not in second.text
    assert sorted(rows(first.text) + rows(second.text)) == sorted(ids)
    assert get("/api/console", cursor="not-a-cursor!").status_code == 400
    assert get("/api/console", status="Nonsense").status_code == 400


def test_one_subscription_side_by_side_with_microsoft_and_its_history(site, standin):
    ids, get = site
    standin.set_subscription(ids[0], quantity=9)  # drift Microsoft has and we do not yet
    page = get(f"/api/console/subscriptions/{ids[0]}")
    assert page.status_code == 200
    ours = re.search(r'data-testid="ours">(.*?)</dl>', page.text, re.S).group(1)
    theirs = re.search(r'data-testid="microsoft">(.*?)</dl>', page.text, re.S).group(1)
    assert "<dd>5</dd>" in ours and '<dd class="differs">9</dd>' in theirs
    assert page.text.count('data-testid="history-entry"') >= 1
    standin.fail_next(8, 503)
    down = get(f"/api/console/subscriptions/{ids[0]}")
    assert down.status_code == 200 and 'data-testid="microsoft-error"' in down.text  # the console works without Microsoft
    assert get("/api/console/subscriptions/00000000-0000-4000-8000-00000000abcd").status_code == 404
    assert get("/api/console/subscriptions/not-a-guid").status_code == 400


def test_roles_decide_who_may_look(site):
    ids, get = site
    for path in ("/api/console", f"/api/console/subscriptions/{ids[0]}"):
        nobody = get(path, roles=None)
        assert nobody.status_code == 401 and ids[0] not in nobody.text
        no_role = get(path, roles=())
        assert no_role.status_code == 403 and ids[0] not in no_role.text and "Console.Reader" in no_role.text
        other_app = get(path, roles=("Subscriptions.ReadWrite",))
        assert other_app.status_code == 403
        assert get(path, roles=("Console.Reader",)).status_code == 200
        operator = get(path, roles=("Console.Operator",))
        assert operator.status_code == 200 and "(read only)" not in operator.text
    assert "(read only)" in get("/api/console").text


def test_roles_assigned_in_another_tenant_do_not_count(site, devhost, http):
    ids, _ = site
    # The sign-in app is multi-tenant: a buyer's admin can assign its roles in the buyer's tenant.
    outsider = SignedInUser.parse(
        "Eve <eve@fabrikam.example>", "0bad7e11-0000-4000-8000-0000000000dd", roles=("Console.Operator",)
    )
    devhost.signed_in_user = outsider
    for path in ("/api/console", f"/api/console/subscriptions/{ids[0]}", "/api/console/attention", "/api/console/reconcile"):
        response = http.get(devhost.url + path, timeout=30)
        assert response.status_code == 403 and ids[0] not in response.text, path
    assert (
        http.post(devhost.url + "/api/console/reconcile", data={"action": "reconcile", "confirm": "yes"}, timeout=30).status_code
        == 403
    )


def test_console_auth_none_is_refused_in_azure():
    from shared.errors import ConfigurationError
    from shared.settings import Settings

    with pytest.raises(ConfigurationError) as raised:
        Settings.from_env(
            {
                "CONSOLE_AUTH": "none",
                "WEBSITE_INSTANCE_ID": "x",
                "TABLES_CONNECTION_STRING": "UseDevelopmentStorage=true",
                "MARKETPLACE_AUTH": "none",
                "WEBHOOK_AUTH": "entra",
                "PUBLISHER_API_AUTH": "entra",
            },
            require=(),
        )
    assert any("CONSOLE_AUTH=none" in problem for problem in raised.value.problems)


# ---------------------------------------------------------------------------------------------
# actions: POST, operator role, CSRF token, confirmation


def form_token(html: str, testid: str) -> str:
    form = re.search(rf'data-testid="{testid}">(.*?)</form>', html, re.S)
    assert form, f"no {testid} on the page"
    return re.search(r'name="form_token" value="([^"]+)"', form.group(1)).group(1)


@pytest.fixture
def pending(standin, services, devhost, http):
    purchase = standin.create_purchase(plan_id="standard", quantity=3, name="Waiting Co")
    assert run_reconciliation(services).completed
    sid = purchase["subscriptionId"]

    def call(method: str, path: str, roles=("Console.Operator",), user: str = ADA, **data):
        devhost.signed_in_user = SignedInUser.parse(user, STAFF_TENANT, roles=roles)
        return http.request(method, devhost.url + path, data=data or None, timeout=30)

    return sid, call


def test_activate_from_the_console_is_recorded_as_the_operator(pending, standin, services):
    sid, call = pending
    page = call("GET", f"/api/console/subscriptions/{sid}")
    token = form_token(page.text, "activate-form")
    done = call("POST", f"/api/console/subscriptions/{sid}/activate", form_token=token, confirm="yes")
    assert done.status_code == 200, done.text
    assert standin.calls["activate"] == 1
    entries = services.repository.history(sid)
    assert any(e["actor"] == "operator:Ada Operator <ada@contoso.example>" and e["source"] == "operator" for e in entries)
    # The same form again: the activation is not sent twice.
    again = call("POST", f"/api/console/subscriptions/{sid}/activate", form_token=token, confirm="yes")
    assert again.status_code == 200 and standin.calls["activate"] == 1


def test_actions_refuse_without_role_token_or_confirmation_and_send_nothing(pending, standin):
    sid, call = pending
    token = form_token(call("GET", f"/api/console/subscriptions/{sid}").text, "activate-form")
    reader_page = call("GET", f"/api/console/subscriptions/{sid}", roles=("Console.Reader",))
    assert 'data-testid="activate-form"' not in reader_page.text  # a reader sees no action
    path = f"/api/console/subscriptions/{sid}/activate"
    refusals = [
        ("reader", call("POST", path, roles=("Console.Reader",), form_token=token, confirm="yes"), 403),
        ("no token", call("POST", path, confirm="yes"), 403),
        ("forged token", call("POST", path, form_token=token[:-4] + "AAAA", confirm="yes"), 403),
        ("another user's token", call("POST", path, user="Bob <bob@contoso.example>", form_token=token, confirm="yes"), 403),
        ("not confirmed", call("POST", path, form_token=token), 400),
    ]
    for name, response, status in refusals:
        assert response.status_code == status, (name, response.text)
    other = call("GET", "/api/console/reconcile")
    reconcile_token = form_token(other.text, "reconcile-form")
    wrong_form = call("POST", path, form_token=reconcile_token, confirm="yes")  # another action's token
    assert wrong_form.status_code == 403
    assert standin.calls["activate"] == 0


def test_reconciliation_preview_changes_nothing_and_run_now_repairs(pending, standin, services):
    _, call = pending
    (drifted,) = standin.seed(1, plan_id="standard", quantity=5)  # a purchase we have not recorded
    runs = call("GET", "/api/console/reconcile")
    assert runs.status_code == 200 and runs.text.count('data-testid="run"') >= 1
    preview = call(
        "POST", "/api/console/reconcile", action="preview", form_token=form_token(runs.text, "preview-form"), confirm="yes"
    )
    assert preview.status_code == 200 and drifted in preview.text
    assert services.repository.get(drifted) is None  # a preview changes nothing
    run = call(
        "POST", "/api/console/reconcile", action="reconcile", form_token=form_token(runs.text, "reconcile-form"), confirm="yes"
    )
    assert run.status_code == 200 and "repairs" in run.text
    assert services.repository.get(drifted) is not None
    reader = call("POST", "/api/console/reconcile", roles=("Console.Reader",), action="reconcile", confirm="yes")
    assert reader.status_code == 403


def test_needs_attention_lists_waiting_activations_and_refused_usage(pending, services):

    from shared import state_machine as sm
    from shared.usage_store import Bucket, hour_of

    sid, call = pending
    # The buyer confirmed in manual mode: the subscription waits for an operator.
    change = sm.Change(
        kind=sm.Kind.REQUEST_ACTIVATION, source=sm.Source.LANDING_PAGE, occurred_at=services.clock(), actor="buyer"
    )
    services.repository.apply(sid, lambda record: sm.apply(record, change, now=services.clock()))
    services.usage_store.flag(
        Bucket(
            sid,
            hour_of(services.clock()) - timedelta(hours=2),
            "api_calls",
            status="Flagged",
            marketplace_status="InvalidDimension",
            message="no such dimension",
        )
    )
    page = call("GET", "/api/console/attention", roles=("Console.Reader",))
    assert page.status_code == 200
    assert page.text.count('data-testid="attention-activation"') == 1 and sid in page.text
    usage = re.search(r'data-testid="attention-usage">(.*?)</tr>', page.text, re.S).group(1)
    assert "InvalidDimension" in usage and "no such dimension" in usage
    assert call("GET", "/api/console/attention", roles=()).status_code == 403


def test_webhook_operations_and_redelivering_waiting_events(site, services, devhost, http):
    ids, get = site
    services.repository.record_operation(
        ids[0], "0f0f0f0f-0000-4000-8000-00000000c0de", action="Suspend", payload="{}", correlation_id="c"
    )
    flag_with_waiting_event(services, ids[0])
    page = get(f"/api/console/subscriptions/{ids[0]}", roles=("Console.Operator",))
    operation = re.search(r'data-testid="webhook-operation">(.*?)</tr>', page.text, re.S).group(1)
    assert "0f0f0f0f-0000-4000-8000-00000000c0de" in operation and "Suspend" in operation and "received" in operation
    assert len(services.repository.pending_events(ids[0])) == 1
    token = re.search(r'data-testid="redeliver-form">.*?name="form_token" value="([^"]+)"', page.text, re.S).group(1)
    devhost.signed_in_user = SignedInUser.parse(ADA, STAFF_TENANT, roles=("Console.Operator",))
    url = f"{devhost.url}/api/console/subscriptions/{ids[0]}/redeliver"
    assert http.post(url, data={"form_token": token}, timeout=30).status_code == 400  # not confirmed
    done = http.post(url, data={"form_token": token, "confirm": "yes"}, timeout=30)
    assert done.status_code == 200 and "1 delivered, 0 failed; 0 still waiting" in done.text
    assert services.repository.pending_events(ids[0]) == []


# ---------------------------------------------------------------------------------------------
# every action lands in history as operator:<user>

OPERATOR = "operator:Ada Operator <ada@contoso.example>"


def operator_entries(services, sid: str, kind: str = "operator_action") -> list[dict]:
    return [e for e in services.repository.history(sid) if e["kind"] == kind and e["actor"] == OPERATOR]


def test_redelivery_is_recorded_in_history_and_the_page_shows_delivered_events(pending, services):
    sid, call = pending
    flag_with_waiting_event(services, sid)
    page = call("GET", f"/api/console/subscriptions/{sid}")
    waiting = re.findall(r'data-testid="lifecycle-event" class="differs">(.*?)</tr>', page.text, re.S)
    assert len(waiting) == 1 and "subscription.flagged" in waiting[0] and "waiting (0 attempts)" in waiting[0]
    assert operator_entries(services, sid) == []

    done = call(
        "POST", f"/api/console/subscriptions/{sid}/redeliver", form_token=form_token(page.text, "redeliver-form"), confirm="yes"
    )
    assert done.status_code == 200 and "1 delivered" in done.text
    (entry,) = operator_entries(services, sid)
    assert entry["source"] == "operator" and entry["result"] == "recorded" and "1 delivered, 0 failed" in entry["detail"]
    assert entry["fromStatus"] == entry["toStatus"]  # history only: the state did not move

    after = call("GET", f"/api/console/subscriptions/{sid}")
    events = re.findall(r'data-testid="lifecycle-event"(.*?)</tr>', after.text, re.S)
    flagged = [e for e in events if "subscription.flagged" in e]
    assert len(flagged) == 1 and "delivered 20" in flagged[0] and 'class="differs"' not in flagged[0]
    assert 'data-testid="redeliver-form"' not in after.text  # nothing left to redeliver
    assert "redeliver events" in after.text and OPERATOR in unescape(after.text)  # the timeline shows who


def test_a_run_started_from_the_console_records_its_repairs_as_the_operator(pending, standin, services):
    sid, call = pending
    assert run_reconciliation(services).completed  # a run that counts it (the fixture's found nothing to count)
    standin.set_subscription(sid, status="Suspended")  # drift the run repairs
    runs = call("GET", "/api/console/reconcile")
    run = call(
        "POST", "/api/console/reconcile", action="reconcile", form_token=form_token(runs.text, "reconcile-form"), confirm="yes"
    )
    assert run.status_code == 200
    sync = [e for e in services.repository.history(sid) if e["kind"] == "sync" and e["toStatus"] == "Suspended"]
    assert len(sync) == 1 and sync[0]["actor"] == OPERATOR and sync[0]["source"] == "reconcile"
    latest = services.repository.latest_runs(1)[0]
    assert latest["started_by"] == OPERATOR and not latest["dry_run"]
    page = call("GET", "/api/console/reconcile")
    newest = re.search(r'data-testid="run">(.*?)</tr>', page.text, re.S).group(1)
    assert OPERATOR in unescape(newest)
    # a run counts what its scan found: the next one counts the repaired status
    assert run_reconciliation(services).completed
    page = call("GET", "/api/console/reconcile")
    chart = re.search(r'data-testid="status-history-chart"(.*?)</svg>', page.text, re.S).group(1)
    bars = re.findall(r'data-testid="chart-bar">\s*<title>(.*?)</title>', chart, re.S)
    assert len(bars) == 3 and "Suspended 1" in bars[-1] and "Suspended" not in bars[0]


def test_the_reconciliation_page_charts_lifecycle_events_delivered_per_hour(site, services):
    ids, get = site
    repository = services.repository
    events = repository.list_events(ids[0])
    assert events  # its Subscribe sync made one
    for event in events:
        repository.mark_event_delivered(event)  # (again) now
    assert run_reconciliation(services).completed
    counted = repository.latest_runs(1)[0]["delivered_by_hour"]
    page = get("/api/console/reconcile")
    chart = re.search(r'data-testid="delivery-chart"(.*?)</svg>', page.text, re.S).group(1)
    bars = re.findall(r'data-testid="delivery-bar" data-count="(\d+)"><title>(.*?) UTC', chart)
    assert len(bars) == 24 and sum(int(n) for n, _ in bars) == sum(counted.values()) >= len(events)
    delivered_hour = repository.list_events(ids[0])[0].delivered_at.strftime("%Y-%m-%d %H:00")
    assert int({hour: n for n, hour in bars}[delivered_hour]) >= len(events)


def test_replaying_an_unapplied_webhook_applies_it_once_and_records_the_operator(pending, standin, services):
    import json

    sid, call = pending
    assert (
        call(
            "POST",
            f"/api/console/subscriptions/{sid}/activate",
            form_token=form_token(call("GET", f"/api/console/subscriptions/{sid}").text, "activate-form"),
            confirm="yes",
        ).status_code
        == 200
    )
    suspend = standin.trigger(sid, "Suspend", deliver=False)  # Microsoft suspended it; our handler crashed after recording
    payload = standin.webhook_payload(suspend["id"])
    services.repository.record_operation(sid, suspend["id"], action="Suspend", payload=json.dumps(payload), correlation_id="t")
    page = call("GET", f"/api/console/subscriptions/{sid}")
    token = form_token(page.text, "replay-form")
    reader = call("GET", f"/api/console/subscriptions/{sid}", roles=("Console.Reader",))
    assert 'data-testid="replay-form"' not in reader.text

    path = f"/api/console/subscriptions/{sid}/replay"
    other = "0f0f0f0f-0000-4000-8000-00000000beef"
    assert call("POST", path, operation_id=suspend["id"], form_token=token).status_code == 400  # not confirmed
    assert call("POST", path, operation_id=other, form_token=token, confirm="yes").status_code == 403  # token is per operation
    assert call("POST", path, operation_id="not-an-id", form_token=token, confirm="yes").status_code == 400
    assert services.repository.get(sid).record.status.value == "Subscribed"  # nothing applied by the refusals

    done = call("POST", path, operation_id=suspend["id"], form_token=token, confirm="yes")
    assert done.status_code == 200 and "Applied" in done.text, done.text
    assert services.repository.get(sid).record.status.value == "Suspended"
    assert not services.repository.get_marker(sid, suspend["id"]).pending
    (entry,) = operator_entries(services, sid)
    assert suspend["id"] in entry["detail"] and "applied" in entry["detail"]
    again = call("POST", path, operation_id=suspend["id"], form_token=token, confirm="yes")
    assert again.status_code == 200 and "Already applied" in again.text
    suspends = [e for e in services.repository.history(sid) if e["kind"] == "suspend" and e["result"] == "applied"]
    assert len(suspends) == 1  # applied once


def test_publisher_changes_and_cancel_from_the_console(pending, standin, services):
    import time

    from shared import publisher

    sid, call = pending
    assert 'data-testid="change-forms"' not in call("GET", f"/api/console/subscriptions/{sid}").text  # not active yet
    call(
        "POST",
        f"/api/console/subscriptions/{sid}/activate",
        form_token=form_token(call("GET", f"/api/console/subscriptions/{sid}").text, "activate-form"),
        confirm="yes",
    )
    page = call("GET", f"/api/console/subscriptions/{sid}")
    assert 'data-testid="change-forms"' not in call("GET", f"/api/console/subscriptions/{sid}", roles=("Console.Reader",)).text
    form = re.search(r'data-testid="change-quantity-form">(.*?)</form>', page.text, re.S).group(1)
    token = re.search(r'name="form_token" value="([^"]+)"', form).group(1)
    key = re.search(r'name="key" value="([^"]+)"', form).group(1)
    path = f"/api/console/subscriptions/{sid}/change"

    refusals = [
        (call("POST", path, action="change_quantity", quantity="7", key=key, form_token=token), 400),  # not confirmed
        (call("POST", path, action="cancel", key=key, form_token=token, confirm="yes"), 403),  # the seats form's token
        (call("POST", path, action="change_quantity", quantity="-1", key=key, form_token=token, confirm="yes"), 400),
        (call("POST", path, action="change_quantity", quantity="3", key=key, form_token=token, confirm="yes"), 422),  # unchanged
        (call("POST", path, action="transfer", key=key, form_token=token, confirm="yes"), 400),
    ]
    assert [r.status_code for r, _ in refusals] == [status for _, status in refusals], [r.text[-300:] for r, _ in refusals]
    assert standin.get_subscription(sid)["quantity"] == 3 and not standin.operations_for(sid)  # nothing was sent

    done = call("POST", path, action="change_quantity", quantity="7", key=key, form_token=token, confirm="yes")
    assert done.status_code == 200, done.text
    again = call("POST", path, action="change_quantity", quantity="7", key=key, form_token=token, confirm="yes")
    assert again.status_code == 200  # the same form twice (double click, browser retry): one change at Microsoft
    partner = [op for op in standin.operations_for(sid) if op["operationRequestSource"] == "Partner"]
    assert len(partner) == 1 and partner[0]["quantity"] == 7
    operation_id = re.search(r"Operation ([0-9a-f-]{36})", done.text).group(1)
    ends = time.monotonic() + 20
    while (op := publisher.follow_operation(services, sid, operation_id)) is not None and not op.settled:
        assert time.monotonic() < ends, "the change never settled"
        time.sleep(0.2)
    assert services.repository.get(sid).record.quantity == 7
    changes = [e for e in services.repository.history(sid) if e["kind"] == "change_quantity" and e["result"] == "applied"]
    assert len(changes) == 1 and changes[0]["actor"] == OPERATOR

    cancel_page = call("GET", f"/api/console/subscriptions/{sid}")
    cancel = re.search(r'data-testid="cancel-form">(.*?)</form>', cancel_page.text, re.S).group(1)
    done = call(
        "POST",
        path,
        action="cancel",
        key=re.search(r'name="key" value="([^"]+)"', cancel).group(1),
        form_token=re.search(r'name="form_token" value="([^"]+)"', cancel).group(1),
        confirm="yes",
    )
    assert done.status_code == 200, done.text
    assert standin.get_subscription(sid)["saasSubscriptionStatus"] in ("Subscribed", "Unsubscribed")
    operation_id = re.search(r"Operation ([0-9a-f-]{36})", done.text).group(1)
    ends = time.monotonic() + 20
    while (op := publisher.follow_operation(services, sid, operation_id)) is not None and not op.settled:
        assert time.monotonic() < ends, "the cancellation never settled"
        time.sleep(0.2)
    record = services.repository.get(sid).record
    assert record.status.value == "Unsubscribed"
    unsubscribes = [e for e in services.repository.history(sid) if e["kind"] == "unsubscribe" and e["result"] == "applied"]
    assert len(unsubscribes) == 1 and unsubscribes[0]["actor"] == OPERATOR
    assert 'data-testid="change-forms"' not in call("GET", f"/api/console/subscriptions/{sid}").text  # nothing left to change


def test_flags_are_listed_with_what_to_do_and_an_operator_acknowledges_them(pending, standin, services):
    from shared import state_machine as sm

    sid, call = pending
    failed = sm.Change(
        kind=sm.Kind.CHANGE_FAILED, source=sm.Source.PUBLISHER, occurred_at=services.clock(), detail="ChangePlan Failed: no"
    )
    services.repository.apply(sid, lambda r: sm.apply(r, failed, now=services.clock()))
    assert services.repository.get(sid).record.flags == ("change_failed",)

    (unflagged,) = standin.seed(1, plan_id="standard", quantity=1)
    assert run_reconciliation(services).completed
    assert sorted(rows(call("GET", "/api/console").text)) == sorted([sid, unflagged])
    listed = call("GET", "/api/console?flagged=1", roles=("Console.Reader",))
    assert listed.status_code == 200 and rows(listed.text) == [sid]  # the flagged filter, server-side
    attention = call("GET", "/api/console/attention", roles=("Console.Reader",))
    (row,) = re.findall(r'data-testid="attention-flagged">(.*?)</tr>', attention.text, re.S)
    assert sid in row and "change_failed" in row and "Publisher operations" in unescape(row)

    page = call("GET", f"/api/console/subscriptions/{sid}")
    token = form_token(page.text, "acknowledge-form")
    assert (
        'data-testid="acknowledge-form"' not in call("GET", f"/api/console/subscriptions/{sid}", roles=("Console.Reader",)).text
    )
    path = f"/api/console/subscriptions/{sid}/acknowledge"
    assert call("POST", path, flag="change_failed", form_token=token).status_code == 400  # not confirmed
    assert call("POST", path, flag="activation_stuck", form_token=token, confirm="yes").status_code == 403  # another flag
    assert services.repository.get(sid).record.flags == ("change_failed",)

    done = call("POST", path, flag="change_failed", form_token=token, confirm="yes")
    assert done.status_code == 200 and "Acknowledged" in done.text
    assert services.repository.get(sid).record.flags == ()
    (entry,) = [e for e in services.repository.history(sid) if e["kind"] == "clear_flag"]
    assert entry["actor"] == OPERATOR and entry["changes"]["flags"] == [["change_failed"], []]
    again = call("POST", path, flag="change_failed", form_token=token, confirm="yes")
    assert again.status_code == 200 and "already cleared" in again.text
    assert rows(call("GET", "/api/console?flagged=1").text) == []


def test_change_forms_offer_list_available_plans_and_only_the_changes_microsoft_allows(site, standin, services):
    ids, get = site
    operator = ("Console.Operator",)
    page = get(f"/api/console/subscriptions/{ids[0]}", roles=operator).text
    form = re.search(r'data-testid="change-plan-form">(.*?)</form>', page, re.S).group(1)
    offered = re.findall(r'<option value="([^"]+)"', form)
    plans = {plan.plan_id for plan in standin_plans(services, ids[0])}
    assert set(offered) == plans - {"standard"} and offered  # the current plan is not offered
    assert 'name="plan_id"' in form and "<select" in form and '<input name="plan_id"' not in form
    assert 'data-testid="change-quantity-form"' in page and 'data-testid="cancel-form"' in page
    assert 'data-testid="change-blocked"' not in page

    # Suspended: only cancel, with the reason for the others.
    suspended = get(f"/api/console/subscriptions/{ids[1]}", roles=operator).text
    assert 'data-testid="cancel-form"' in suspended
    assert 'data-testid="change-plan-form"' not in suspended and 'data-testid="change-quantity-form"' not in suspended
    blocked = re.search(r'data-testid="change-blocked">(.*?)</ul>', suspended, re.S).group(1)
    assert "Change plan is not available: only Subscribed subscriptions can change (this one is Suspended)" in blocked

    # allowedCustomerOperations without Update or Delete (e.g. a CSP purchase): no change form at all.
    (csp,) = standin.seed(1, plan_id="standard", quantity=5)
    standin.set_subscription(csp, allowedCustomerOperations=["Read"])
    assert run_reconciliation(services).completed
    assert services.repository.get(csp).record.allowed_customer_operations == ("Read",)
    locked = get(f"/api/console/subscriptions/{csp}", roles=operator).text
    for testid in ("change-plan-form", "change-quantity-form", "cancel-form"):
        assert f'data-testid="{testid}"' not in locked
    reasons = re.search(r'data-testid="change-blocked">(.*?)</ul>', locked, re.S).group(1)
    assert reasons.count("allowedCustomerOperations") == 3


def standin_plans(services, subscription_id: str):
    from shared import publisher

    return publisher.available_plans(services, subscription_id)
