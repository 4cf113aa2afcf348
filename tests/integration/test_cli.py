"""The operator command line, in-process against Azurite and the marketplace stand-in."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from shared.activation import ActivationResult, request_operator_activation
from shared.cli import main
from shared.domain import utc_now
from shared.reconcile import FLAG_AWAITING_OPERATOR, run_reconciliation
from shared.settings import SETTING_NAMES
from shared.state_machine import LocalStatus, Source

pytestmark = pytest.mark.azurite

ROOT = Path(__file__).resolve().parents[2]


def cli(services, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), services=services, out=out)
    return code, out.getvalue()


def cli_json(services, *argv: str, expect: int = 0):
    code, text = cli(services, *argv, "--json")
    assert code == expect, text
    return json.loads(text)


def sync_in_the_past(services, minutes: float = 10) -> None:
    """Record what Microsoft has as if it happened a while ago (changes within 2 minutes are left alone)."""
    services.clock = lambda: utc_now() - timedelta(minutes=minutes)
    assert run_reconciliation(services).completed
    services.clock = utc_now


def test_list_and_show(standin, services):
    basic = standin.seed(2, plan_id="basic")
    (premium,) = standin.seed(1, plan_id="premium", quantity=3)
    (suspended,) = standin.seed(1, status="Suspended", plan_id="basic")
    (other_offer,) = standin.seed(1, offer_id="other-offer", plan_id="standard", quantity=2)
    sync_in_the_past(services)

    everything = cli_json(services, "list")
    assert {row["id"] for row in everything} == {*basic, premium, suspended, other_offer}
    for row in everything:
        theirs = standin.get_subscription(row["id"])
        assert (row["status"], row["offerId"], row["planId"], row["quantity"]) == (
            theirs["saasSubscriptionStatus"],
            theirs["offerId"],
            theirs["planId"],
            theirs.get("quantity"),
        )

    assert [row["id"] for row in cli_json(services, "list", "--status", "suspended")] == [suspended]
    assert [row["id"] for row in cli_json(services, "list", "--plan", "premium")] == [premium]
    assert [row["id"] for row in cli_json(services, "list", "--offer", "other-offer")] == [other_offer]
    assert {row["id"] for row in cli_json(services, "--json", "list", "--offer", "contoso-offer", "--plan", "basic")} == {
        *basic,
        suspended,
    }
    assert cli_json(services, "list", "--status", "Unsubscribed") == []

    code, text = cli(services, "list", "--plan", "premium")
    assert code == 0 and premium in text and "premium" in text and "1 subscription(s)" in text

    shown = cli_json(services, "show", premium)
    assert {"id", "status", "offerId", "planId", "quantity", "history"} <= set(shown)
    assert (shown["id"], shown["status"], shown["planId"], shown["quantity"]) == (premium, "Subscribed", "premium", 3)
    assert shown["history"] == services.repository.history(premium)
    assert [(h["source"], h["kind"], h["result"]) for h in shown["history"]] == [("reconcile", "sync", "applied")]

    code, text = cli(services, "show", premium)
    assert code == 0 and premium in text and "Subscribed" in text and "History (1)" in text and "reconcile" in text
    # GUIDs are case-insensitive: the upper-case spelling finds the same record (issue 25, defect 1).
    assert cli_json(services, "show", premium.upper())["id"] == premium

    assert cli(services, "show", "00000000-0000-0000-0000-000000000000")[0] == 1
    assert cli(services, "list", "--status", "Bogus")[0] == 2
    assert cli(services)[0] == 2  # no command
    assert cli(services, "frobnicate")[0] == 2


def test_reconcile_dry_run_prints_the_differences_and_writes_nothing_then_reconcile_repairs(standin, services):
    x, y = standin.seed(2, plan_id="standard", quantity=5)
    sync_in_the_past(services)
    (new,) = standin.seed(1)
    standin.trigger(x, "Suspend", deliver=False)
    standin.set_subscription(y, quantity=9)

    before = {r.id: services.repository.get(r.id).etag for r in services.repository.list_records()}
    writes_before = services.repository.metrics.writes
    runs_before = len(services.repository.latest_runs(50))

    dry = cli_json(services, "reconcile", "--dry-run")
    assert dry["dry_run"] and dry["completed"] and dry["storage_writes"] == 0
    assert {(d["subscriptionId"], d["kind"]) for d in dry["differences"]} == {
        (new, "missing_locally"),
        (x, "status_drift"),
        (y, "detail_drift"),
    }
    assert dry["repairs"] == {"recorded_new": 1, "status_drift": 1, "detail_drift": 1}
    changes = {d["subscriptionId"]: d.get("changes") for d in dry["differences"]}
    assert changes[y] == {"quantity": [5, 9]} and changes[x]["status"] == ["Subscribed", "Suspended"]

    code, text = cli(services, "reconcile", "--dry-run")
    assert code == 0
    for sid in (new, x, y):
        assert sid in text
    assert "Differences (3)" in text and "dry run" in text and "quantity: 5 -> 9" in text

    assert services.repository.metrics.writes == writes_before
    assert {r.id: services.repository.get(r.id).etag for r in services.repository.list_records()} == before
    assert services.repository.get(new) is None
    assert len(services.repository.latest_runs(50)) == runs_before

    real = cli_json(services, "reconcile")
    assert real["completed"] and not real["dry_run"] and real["repairs"] == dry["repairs"]
    assert services.repository.get(x).record.status is LocalStatus.SUSPENDED
    assert services.repository.get(y).record.quantity == 9
    assert services.repository.get(new) is not None
    assert services.repository.latest_runs(1)[0]["run_id"] == real["run_id"]
    # who ran it: the run summary and every repair it wrote name the operator
    assert real["started_by"].startswith("operator:")
    assert services.repository.history(y)[-1]["actor"] == real["started_by"]

    code, text = cli(services, "reconcile")
    assert code == 0 and "Differences (0)" in text and "Repairs: none" in text


def test_reconcile_that_marketplace_stops_exits_1(standin, services):
    standin.seed(1)
    standin.fail_next(50, status=503)
    result = cli_json(services, "reconcile", expect=1)
    assert result["completed"] is False and result["stopped_reason"].startswith("marketplace")
    standin.clear_faults()


def test_activate_in_manual_mode_activates_exactly_once(standin, make_services, monkeypatch):
    monkeypatch.setenv("USER", "grace")
    services = make_services(ACTIVATION_MODE="manual")
    sid = standin.create_purchase(plan_id="basic")["subscriptionId"]
    sync_in_the_past(services)
    assert request_operator_activation(services, sid, "buyer", Source.LANDING_PAGE).result is ActivationResult.PENDING_OPERATOR
    code, text = cli(services, "reconcile")
    assert code == 0 and "Flagged for an operator: 1" in text and f"{sid}  {FLAG_AWAITING_OPERATOR}" in text
    assert services.repository.latest_runs(1)[0]["flagged"] == [{"subscriptionId": sid, "reason": FLAG_AWAITING_OPERATOR}]
    pending = cli_json(services, "list", "--status", "PendingActivation")
    assert [row["id"] for row in pending] == [sid] and pending[0]["needsAttention"]

    result = cli_json(services, "activate", sid)
    assert result["result"] == "activated" and result["ok"] and result["status"] == "Subscribed"
    assert standin.activation_count(sid) == 1
    assert standin.get_subscription(sid)["saasSubscriptionStatus"] == "Subscribed"
    record = services.repository.get(sid).record
    assert record.status is LocalStatus.SUBSCRIBED and record.activated_by == "operator:grace"
    assert record.flags == ()  # the operator flag is cleared by the activation
    sources = [(h["source"], h["kind"]) for h in services.repository.history(sid)]
    assert ("operator", "activation_sent") in sources and ("operator", "activation_confirmed") in sources

    again = cli_json(services, "activate", sid)
    assert again["result"] == "already_active" and again["ok"]
    code, text = cli(services, "activate", sid)
    assert code == 0 and "already active" in text
    assert standin.activation_count(sid) == 1

    assert cli_json(services, "activate", "00000000-0000-0000-0000-000000000000", expect=1)["result"] == "not_found"


def test_activate_that_microsoft_refuses_exits_1(standin, make_services):
    services = make_services(ACTIVATION_MODE="manual")
    sid = standin.create_purchase(plan_id="basic")["subscriptionId"]
    sync_in_the_past(services)
    standin.set_subscription(sid, status="Unsubscribed")  # cancelled before the operator got to it
    result = cli_json(services, "activate", sid, expect=1)
    assert result["result"] == "cancelled" and not result["ok"]
    assert services.repository.get(sid).record.status is LocalStatus.UNSUBSCRIBED


def test_replay_finishes_a_pending_operation(standin, services):
    _x, y = standin.seed(2, plan_id="standard", quantity=5)
    sync_in_the_past(services)
    operation = standin.trigger(y, "ChangeQuantity", quantity=11, deliver=False)
    payload = standin.webhook_payload(operation["id"])
    services.repository.record_operation(
        y, operation["id"], action="ChangeQuantity", payload=json.dumps(payload), correlation_id=""
    )

    listed = cli_json(services, "replay", "--dry-run")
    assert listed["pending_found"] == 1 and listed["repairs"] == {"operation_replayed": 1}
    assert services.repository.get_marker(y, operation["id"]).pending and standin.patches == []

    result = cli_json(services, "replay")  # no deadline: the operator says it is stuck
    assert result["completed"] and result["pending_found"] == 1 and result["repairs"] == {"operation_replayed": 1}
    assert [d["subscriptionId"] for d in result["differences"]] == [y]
    assert not services.repository.get_marker(y, operation["id"]).pending
    assert services.repository.get(y).record.quantity == 11
    assert standin.get_operation(operation["id"])["status"] == "Succeeded"
    assert standin.get_subscription(y)["quantity"] == 11
    assert services.repository.history(y)[-1]["operationId"] == operation["id"]

    code, text = cli(services, "replay")
    assert code == 0 and "Recorded but unapplied webhook operations: 0" in text


def test_a_configuration_error_exits_2_naming_the_missing_settings(monkeypatch, capsys, tmp_path):
    for name in SETTING_NAMES | {"WEBSITE_INSTANCE_ID"}:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOCAL_SETTINGS_FILE", str(tmp_path / "absent.json"))  # not the developer's file
    monkeypatch.setenv("MARKETPLACE_AUTH", "none")
    monkeypatch.setenv("WEBHOOK_AUTH", "none")
    out = io.StringIO()
    assert main(["list", "--json"], out=out) == 2
    problems = json.loads(out.getvalue())["problems"]
    assert any("TABLES_CONNECTION_STRING" in p for p in problems)
    # The landing page's own secret is not the command line's business.
    assert not any("LANDING_FORM_SECRET" in p for p in problems)
    assert "TABLES_CONNECTION_STRING" in capsys.readouterr().err


def test_the_module_runs_as_a_command(azurite, standin, tmp_path):
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHONPATH": str(ROOT),
        "LOCAL_SETTINGS_FILE": str(tmp_path / "absent.json"),
    }
    missing = subprocess.run(
        [sys.executable, "-m", "shared.cli", "reconcile", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2, missing.stderr
    for name in ("MARKETPLACE_TENANT_ID", "TABLES_CONNECTION_STRING"):
        assert name in missing.stderr
    assert "LANDING_FORM_SECRET" not in missing.stderr

    from tests.conftest import make_env

    ids = standin.seed(2)
    configured = {**env, **make_env(azurite, standin)}
    del configured["LANDING_FORM_SECRET"]  # the command line works without the landing page's secret
    run = subprocess.run(
        [sys.executable, "-m", "shared.cli", "reconcile", "--json"],
        cwd=ROOT,
        env=configured,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["repairs"] == {"recorded_new": 2}
    listed = subprocess.run(
        [sys.executable, "-m", "shared.cli", "list", "--json"],
        cwd=ROOT,
        env=configured,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0 and {row["id"] for row in json.loads(listed.stdout)} == set(ids)


def test_publisher_change_verbs_end_to_end(standin, services):
    (subscription_id,) = standin.seed(1, plan_id="standard", quantity=5)
    sync_in_the_past(services)

    plans = cli_json(services, "plans", subscription_id)
    assert plans["currentPlanId"] == "standard"
    assert {p["planId"] for p in plans["plans"]} == {"basic", "standard", "premium"}
    code, text = cli(services, "plans", subscription_id)
    assert code == 0 and "premium" in text

    changed = cli_json(services, "change-plan", subscription_id, "premium", "--wait")
    assert changed["status"] == "Succeeded" and changed["requestedBy"].startswith("operator:")
    assert services.repository.get(subscription_id).record.plan_id == "premium"
    entry = next(e for e in services.repository.history(subscription_id) if e["kind"] == "change_plan")
    assert entry["source"] == "publisher" and entry["actor"].startswith("operator:")

    seats = cli_json(services, "change-quantity", subscription_id, "9", "--wait")
    assert seats["status"] == "Succeeded" and services.repository.get(subscription_id).record.quantity == 9
    assert cli_json(services, "operation", seats["id"])["quantity"] == 9

    refused = cli_json(services, "change-quantity", subscription_id, "9", expect=1)
    assert refused["error"] == "quantity_unchanged"
    assert cli_json(services, "change-quantity", subscription_id, "0", expect=2)["error"] == "usage"
    assert standin.calls["update"] == 2

    started = cli_json(services, "cancel", subscription_id)  # without --wait: answered at once
    assert started["status"] == "InProgress" and started["action"] == "Unsubscribe"
    services.follower.wait_idle(30)
    code, text = cli(services, "operation", started["id"])
    assert code == 0 and "cancel" in text
    assert services.repository.get(subscription_id).record.status is LocalStatus.UNSUBSCRIBED


def test_publisher_change_that_microsoft_fails_exits_1(standin, services):
    (subscription_id,) = standin.seed(1, plan_id="standard", quantity=5)
    sync_in_the_past(services)
    standin.partner_outcome = "fail"
    failed = cli_json(services, "change-plan", subscription_id, "premium", "--wait", expect=1)
    assert failed["status"] == "Failed" and failed["errorMessage"]
    assert services.repository.get(subscription_id).record.plan_id == "standard"
