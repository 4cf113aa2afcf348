"""The function app's registrations, read the way the Functions host reads them (in a fresh process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_INDEX = """
import json
from function_app import app
out = {}
for fn in app.get_functions():
    out[fn.get_function_name()] = [
        {k: (str(v.value) if hasattr(v, "value") else [str(getattr(m, "value", m)) for m in v] if isinstance(v, list) else v)
         for k, v in b.items()}
        for b in fn.get_bindings_dict()["bindings"]
    ]
print(json.dumps(out))
"""


def _index() -> dict:
    # A fresh interpreter with no app settings: indexing must not need configuration or I/O.
    result = subprocess.run(
        [sys.executable, "-c", _INDEX], cwd=ROOT, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"}
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_functions_are_registered_with_the_contracted_names_routes_and_triggers():
    functions = _index()
    assert set(functions) == {
        "landing_page",
        "webhook",
        "reconcile_timer",
        "health",
        "publisher_subscription",
        "publisher_plans",
        "publisher_operation",
        "publisher_usage",
        "metering_timer",
        "console_list",
        "console_subscription",
        "console_activate",
        "console_reconcile",
        "console_attention",
        "console_redeliver",
        "console_replay",
        "console_change",
        "console_acknowledge",
        "console_billing",
        "console_usage_resolve",
        "usage_reconcile_timer",
        "openapi_document",
        "event_delivery",
        "operation_followup",
    }

    def trigger(name):
        return next(b for b in functions[name] if b["direction"] == "0")

    assert trigger("landing_page")["route"] == "landing"
    assert sorted(trigger("landing_page")["methods"]) == ["GET", "POST"]
    assert trigger("webhook")["route"] == "webhook" and trigger("webhook")["methods"] == ["POST"]
    assert trigger("health")["route"] == "health" and trigger("health")["methods"] == ["GET"]
    assert trigger("publisher_subscription")["route"] == "subscriptions/{subscriptionId}"
    assert sorted(trigger("publisher_subscription")["methods"]) == ["DELETE", "GET", "PATCH"]
    assert trigger("publisher_plans")["route"] == "subscriptions/{subscriptionId}/plans"
    assert trigger("publisher_operation")["route"] == "operations/{operationId}"
    assert trigger("publisher_operation")["methods"] == ["GET"]
    assert trigger("publisher_usage")["route"] == "usage" and trigger("publisher_usage")["methods"] == ["POST"]
    assert trigger("openapi_document")["route"] == "openapi.json" and trigger("openapi_document")["methods"] == ["GET"]
    assert trigger("console_list")["route"] == "console" and trigger("console_list")["methods"] == ["GET"]
    assert trigger("console_subscription")["route"] == "console/subscriptions/{subscriptionId}"
    for name in (
        "landing_page",
        "webhook",
        "health",
        "publisher_subscription",
        "publisher_plans",
        "publisher_operation",
        "publisher_usage",
        "openapi_document",
    ):
        # No function keys: Microsoft sends none and keys in URLs fail certification.
        assert trigger(name)["authLevel"] == "anonymous"
    timer = trigger("reconcile_timer")
    assert timer["type"] == "timerTrigger"
    assert timer["schedule"] == "%RECONCILE_SCHEDULE%"
    assert timer["runOnStartup"] is False
    metering = trigger("metering_timer")
    assert metering["type"] == "timerTrigger"
    assert metering["schedule"] == "%METERING_SCHEDULE%"
    assert metering["runOnStartup"] is False
    read_back = trigger("usage_reconcile_timer")
    assert read_back["type"] == "timerTrigger"
    assert read_back["schedule"] == "%USAGE_RECONCILE_SCHEDULE%"
    assert read_back["runOnStartup"] is False
    # Work for later runs on queue triggers, on the identity-based AzureWebJobsStorage connection.
    for name, setting in (("event_delivery", "%EVENTS_WORK_QUEUE%"), ("operation_followup", "%OPERATIONS_WORK_QUEUE%")):
        queue = trigger(name)
        assert queue["type"] == "queueTrigger"
        assert queue["queueName"] == setting and queue["connection"] == "AzureWebJobsStorage"


def test_host_json_keeps_the_api_prefix_and_an_extension_bundle():
    host = json.loads((ROOT / "host.json").read_text())
    assert host["version"] == "2.0"
    assert host["extensions"]["http"]["routePrefix"] == "api"
    assert host["extensionBundle"]["id"] == "Microsoft.Azure.Functions.ExtensionBundle"
    from shared.events import MAX_JOB_ATTEMPTS

    queues = host["extensions"]["queues"]
    assert queues["maxDequeueCount"] == MAX_JOB_ATTEMPTS  # the use case poisons a job at the same count
    assert queues["messageEncoding"] == "base64"  # the app sends base64 text


def test_requirements_are_pinned_and_only_what_the_app_imports():
    lines = [
        raw.strip() for raw in (ROOT / "requirements.txt").read_text().splitlines() if raw.strip() and not raw.startswith("#")
    ]
    assert all("==" in line for line in lines), lines
    names = {line.split("==")[0].lower() for line in lines}
    assert "pytest" not in names and "playwright" not in names and "azure-functions-worker" not in names


def test_funcignore_keeps_development_files_out_of_the_package():
    ignored = (ROOT / ".funcignore").read_text().split()
    for entry in ("tests/", ".venv/", "devtools/", "infra/", "local.settings.json"):
        assert entry in ignored
    # The OpenAPI document is served by the app (GET /api/openapi.json): it must ship with it.
    import fnmatch

    for entry in ignored:
        assert not any(fnmatch.fnmatch(name, entry.rstrip("/")) for name in ("shared", "openapi.json", "shared/openapi.json")), (
            entry
        )
