"""Input an attacker (or a broken peer) controls, through the real paths: ids that are not GUIDs,
lone surrogates in Marketplace fields, URL settings with other schemes, and CLI usage errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.errors import ConfigurationError
from shared.reconcile import run_reconciliation
from shared.settings import LANDING_PAGE, Settings
from tests.conftest import make_env

pytestmark = pytest.mark.azurite

ROOT = Path(__file__).resolve().parents[2]
BAD_IDS = ["a/b", "a?b=1", "..", "x'y", "../../other", "%2e%2e", "", " "]


@pytest.mark.parametrize("field", ["subscriptionId", "id"])
@pytest.mark.parametrize("bad", BAD_IDS)
def test_a_webhook_whose_ids_are_not_guids_is_400_with_nothing_recorded_and_no_call_out(
    field, bad, standin, services, devhost, http
):
    (subscription_id,) = standin.seed(1, plan_id="standard", quantity=5)
    operation = standin.trigger(subscription_id, "Suspend", deliver=False)
    payload = {**standin.webhook_payload(operation["id"]), field: bad}
    calls_before = dict(standin.calls)

    response = http.post(
        devhost.url + "/api/webhook",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer " + standin.sign_token()},
        timeout=30,
    )

    assert response.status_code == 400, response.text
    assert "GUID" in response.json()["message"] or "missing" in response.json()["message"]
    assert services.repository.get(subscription_id) is None
    assert services.repository.get_marker(subscription_id, operation["id"]) is None
    for kind in ("get", "get_operation", "patch_operation"):
        assert standin.calls[kind] == calls_before.get(kind, 0), kind


@pytest.mark.parametrize("bad", ["a/b", "a?b=1", "x'y"])
def test_a_landing_form_naming_no_guid_is_400_with_nothing_recorded(bad, standin, services, devhost, http):
    response = http.post(devhost.url + "/api/landing", data={"subscription_id": bad, "form_token": "x"}, timeout=30)
    assert response.status_code == 400
    assert standin.calls["activate"] == 0
    assert list(services.repository.list_records()) == []


def test_lone_surrogates_from_microsoft_render_and_print(standin, services, devhost, http):
    """Found by a probe: a 500 on the landing page and a traceback in `cli show`."""
    purchase = standin.create_purchase(plan_id="standard", quantity=2, name="Contoso \ud800 Ltd")
    page = http.get(devhost.url + "/api/landing", params={"token": purchase["token"]}, timeout=30)
    assert page.status_code == 200, page.text
    assert "Contoso \ufffd Ltd" in page.text

    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHONPATH": str(ROOT),
        "PYTHONIOENCODING": "utf-8",
        "LOCAL_SETTINGS_FILE": "/nonexistent/local.settings.json",
        **make_env_for(services),
    }
    shown = subprocess.run(
        [sys.executable, "-m", "shared.cli", "show", purchase["subscriptionId"]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert "Traceback" not in shown.stderr
    assert "Contoso \ufffd Ltd" in shown.stdout


def make_env_for(services) -> dict[str, str]:
    """The environment the CLI needs to reach the same tables and stand-in as ``services``."""
    settings = services.settings
    return {
        "MARKETPLACE_API_BASE_URL": settings.marketplace_api_base_url,
        "MARKETPLACE_AUTH": "none",
        "TABLES_CONNECTION_STRING": settings.tables_connection_string,
        "TABLES_PREFIX": settings.tables_prefix,
    }


@pytest.mark.parametrize("argv", [["show", "a/b"], ["activate", "a?b=1"], ["list", "--no-such-option"], ["nosuchcommand"]])
def test_cli_usage_errors_are_json_with_json_and_touch_nothing(argv, services, capsys):
    from shared.cli import main

    out = io.StringIO()
    assert main([*argv, "--json"], services=services, out=out) == 2
    document = json.loads(out.getvalue())
    assert document["error"] == "usage" and document["message"]
    assert "error:" in capsys.readouterr().err
    assert list(services.repository.list_records()) == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SAAS_APP_URL", "javascript:alert(1)"),
        ("SAAS_APP_URL", "http://app.contoso.example/"),
        ("BRAND_LOGO_URL", "data:image/svg+xml,<svg onload=alert(1)>"),
        ("BRAND_LOGO_URL", "//evil.example/logo.png"),
        ("EVENTS_WEBHOOK_URL", "ftp://hooks.example/"),
    ],
)
def test_url_settings_accept_only_https_and_are_reported_at_start_up(name, value, azurite, standin):
    env = make_env(azurite, standin, **{name: value, "EVENTS_WEBHOOK_SECRET": "s" * 32})
    with pytest.raises(ConfigurationError) as refused:
        Settings.from_env(env)
    assert any(name in problem and "https://" in problem for problem in refused.value.problems)
    if name != "EVENTS_WEBHOOK_URL":  # a landing page setting: the other functions still start
        settings = Settings.from_env(env, require=())
        with pytest.raises(ConfigurationError):
            settings.require(LANDING_PAGE)


def test_https_and_local_http_urls_are_accepted(azurite, standin):
    settings = Settings.from_env(
        make_env(
            azurite,
            standin,
            SAAS_APP_URL="https://app.contoso.example/",
            BRAND_LOGO_URL="http://localhost:8080/logo.png",
            EVENTS_WEBHOOK_URL="http://127.0.0.1:9000/hooks",
            EVENTS_WEBHOOK_SECRET="s" * 32,
        )
    )
    assert settings.brand_logo_url == "http://localhost:8080/logo.png"


def test_reconciliation_records_the_surrogate_name_cleanly(standin, services):
    (subscription_id,) = standin.seed(1, plan_id="standard", quantity=3)
    standin.set_subscription(subscription_id, name="Fabrikam \udfff")
    assert run_reconciliation(services).completed
    assert services.repository.get(subscription_id).record.name == "Fabrikam \ufffd"
