"""The local Functions dev host (devtools/devhost.py), exercised over real HTTP with ``requests``.

Uses its own small app (tests/devhost_sample_app.py), never the project's function_app.py.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import azure.functions as func
import pytest
import requests

from devtools.devhost import DevHost, DevHostError, RouteTemplate, load_local_settings
from tests import devhost_sample_app as sample

SAMPLE = "tests.devhost_sample_app:app"
YEARLY = "0 0 0 1 1 *"  # never fires during a test run
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def host():
    """One shared host for the sample app: nobody signed in, schedules off."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAMPLE_SCHEDULE", YEARLY)
        with DevHost.from_module(SAMPLE, port=0, timers=False, signed_in_user="") as running:
            yield running


@pytest.fixture
def sample_schedule(monkeypatch):
    monkeypatch.setenv("SAMPLE_SCHEDULE", YEARLY)


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def inspect(host: DevHost, path: str = "/api/inspect", **kwargs) -> dict:
    response = requests.get(host.url + path, timeout=5, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


# ---------------------------------------------------------------------------------- routing


def test_route_param_and_response_conversion(host):
    response = requests.get(host.url + "/api/hello/World", timeout=5)
    assert response.status_code == 200
    assert response.text == "Hello, World!"
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.headers["X-Greeting"] == "hi"
    assert response.raw.headers.getlist("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]


def test_literals_are_case_insensitive_and_a_trailing_slash_is_ignored(host):
    assert requests.get(host.url + "/API/Hello/ada/", timeout=5).text == "Hello, ada!"


@pytest.mark.parametrize("path", ["/api/nope", "/nope", "/api/hello", "/api/hello/a/b", "/hello/x"])
def test_unknown_routes_are_404(host, path):
    assert requests.get(host.url + path, timeout=5).status_code == 404


def test_wrong_method_is_405_with_allow(host):
    response = requests.get(host.url + "/api/echo", timeout=5)
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert requests.delete(host.url + "/api/hello/x", timeout=5).status_code == 405


def test_route_parameters_are_decoded_and_literal_routes_win(host):
    assert requests.get(host.url + "/api/orders/a%20b/lines/3", timeout=5).text == "order=a b line=3"
    # both templates match; the one with fewer parameters wins, as in ASP.NET Core
    assert requests.get(host.url + "/api/orders/latest/lines/3", timeout=5).text == "latest line=3"
    assert requests.get(host.url + "/api/orders/x/lines", timeout=5).status_code == 404


def test_query_is_decoded_once_like_aspnet(host):
    seen = inspect(host, "/api/inspect?plus=a%2Bb&space=c+d&pct=100%25&amp=%26&empty=&x=1&x=2")
    assert seen["params"] == {"plus": "a+b", "space": "c d", "pct": "100%", "amp": "&", "empty": "", "x": "1,2"}
    assert seen["url"] == host.url + "/api/inspect?plus=a%2Bb&space=c+d&pct=100%25&amp=%26&empty=&x=1&x=2"
    assert seen["method"] == "GET"


def test_headers_reach_the_function_and_come_back(host):
    seen = inspect(host, headers={"X-Custom": "value 1"})
    assert seen["headers"]["x-custom"] == "value 1"
    response = requests.post(host.url + "/api/echo", json={"n": 1}, timeout=5)
    assert response.headers["X-Echo-Length"] == str(len(json.dumps({"n": 1})))
    assert response.headers["Content-Type"] == "application/json"


def test_json_body_echo(host):
    payload = {"subscription": "c0ffee", "quantity": 3, "tags": ["a", "ü"]}
    response = requests.post(host.url + "/api/echo", json=payload, timeout=5)
    assert response.status_code == 200
    assert response.json() == {"received": payload}
    bad = requests.post(host.url + "/api/echo", data=b"{not json", timeout=5)
    assert bad.status_code == 400  # the function's own answer


def test_raw_and_chunked_bodies(host):
    response = requests.post(host.url + "/api/inspect", data=b"plain bytes", timeout=5)
    assert response.json()["body"] == "plain bytes"
    chunked = requests.post(host.url + "/api/inspect", data=(part for part in [b"one,", b"two"]), timeout=5)
    assert chunked.json()["body"] == "one,two"


def test_context_parameter_is_passed(host):
    seen = inspect(host)
    assert seen["function_name"] == "inspect"
    uuid.UUID(seen["invocation_id"])


def test_exception_is_a_generic_500_with_the_traceback_logged(host, caplog):
    caplog.set_level(logging.INFO, logger="devtools.devhost")
    response = requests.get(host.url + "/api/boom", timeout=5)
    assert response.status_code == 500
    assert "secret" not in response.text
    failure = next(r for r in caplog.records if r.exc_info)
    assert "boom" in failure.getMessage()
    assert "secret internal detail" in caplog.text


def test_async_function(host):
    response = requests.get(host.url + "/api/slow", timeout=5)
    assert (response.status_code, response.text) == (200, "async ok")


def test_one_log_line_per_request_without_query_string(host, caplog):
    caplog.set_level(logging.INFO, logger="devtools.devhost")
    requests.get(host.url + "/api/inspect?token=PURCHASE-TOKEN-123", timeout=5)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("GET /api/inspect")]
    assert len(lines) == 1 and lines[0].startswith("GET /api/inspect 200 ")
    assert "PURCHASE-TOKEN-123" not in caplog.text


def test_body_over_100_mb_is_413(host):
    port = int(host.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(
            b"POST /api/echo HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 104857601\r\n\r\n{"
        )
        status_line = conn.makefile("rb").readline()
    assert status_line.startswith(b"HTTP/1.1 413")


def test_status_and_index(host):
    status = requests.get(host.url + "/admin/host/status", timeout=5)
    assert status.status_code == 200 and status.json()["state"] == "Running"
    index = requests.get(host.url + "/", timeout=5)
    assert index.status_code == 200 and "text/html" in index.headers["Content-Type"]
    assert "hello: [GET]" in index.text and "sample_timer: timerTrigger" in index.text


def test_describe_lists_functions_like_func_start(host):
    lines = host.describe()
    assert f"echo: [POST] {host.url}/api/echo" in lines
    assert f"inspect: [GET,POST] {host.url}/api/inspect" in lines
    assert f"order_line: [GET] {host.url}/api/orders/{{orderId}}/lines/{{line}}" in lines
    assert f"sample_timer: timerTrigger ({YEARLY}) [schedule off: --no-timers]" in lines


def test_route_prefix_from_host_json(tmp_path, sample_schedule):
    (tmp_path / "host.json").write_text(json.dumps({"version": "2.0", "extensions": {"http": {"routePrefix": ""}}}))
    with DevHost(sample.app, port=0, timers=False, host_json=tmp_path / "host.json") as bare:
        assert requests.get(bare.url + "/hello/x", timeout=5).text == "Hello, x!"
        assert requests.get(bare.url + "/api/hello/x", timeout=5).status_code == 404
    (tmp_path / "host.json").write_text(json.dumps({"extensions": {"http": {"routePrefix": "/v1/"}}}))
    assert DevHost(sample.app, host_json=tmp_path / "host.json").route_prefix == "v1"
    assert DevHost(sample.app, host_json=tmp_path / "missing.json").route_prefix == "api"


def test_route_templates():
    route = RouteTemplate("subscriptions/{subscriptionId}", "api")
    assert route.template == "api/subscriptions/{subscriptionId}"
    assert route.match("/api/subscriptions/0f8fad5b-d9cb-469f-a165-70867728950e") == {
        "subscriptionId": "0f8fad5b-d9cb-469f-a165-70867728950e"
    }
    assert route.match("/API/Subscriptions/x/") == {"subscriptionId": "x"}
    assert route.match("/api/subscriptions/a/b") is None
    assert route.match("/api/subscriptions/") is None
    # What no app here uses is refused at start-up instead of being half-emulated.
    for unsupported in ("orders/{id:guid}", "page/{n=1}", "files/{*path}", "x/{id?}", "dl/{name}.{ext}"):
        with pytest.raises(DevHostError, match="only whole-segment"):
            RouteTemplate(unsupported)


def test_app_may_be_indexed_before_the_host(sample_schedule):
    sample.app.get_functions()  # azure-functions remembers names; a naive second call would fail
    assert "hello" in DevHost(sample.app).functions


# ---------------------------------------------------------------------------------- admin API


def test_admin_runs_timer_in_background_with_202(host):
    before = len(sample.TIMER_RUNS)
    response = requests.post(host.url + "/admin/functions/sample_timer", json={"input": ""}, timeout=5)
    assert response.status_code == 202
    wait_until(lambda: len(sample.TIMER_RUNS) == before + 1)
    run = sample.TIMER_RUNS[-1]
    assert run["past_due"] is False
    assert set(run["schedule_status"]) == {"Last", "Next", "LastUpdated"}


def test_admin_wait_true_answers_200_after_the_run(host):
    before = len(sample.TIMER_RUNS)
    response = requests.post(host.url + "/admin/functions/SAMPLE_TIMER?wait=true", timeout=5)
    assert response.status_code == 200
    assert response.json()["status"] == "Succeeded"
    assert len(sample.TIMER_RUNS) == before + 1


def test_admin_wait_true_reports_failures_as_500(host):
    response = requests.post(host.url + "/admin/functions/failing_job?wait=true", data=b"", timeout=5)
    assert response.status_code == 500
    assert response.json() == {**response.json(), "status": "Failed", "error": "ValueError"}
    assert "always fails" not in response.text


def test_admin_errors(host):
    assert requests.post(host.url + "/admin/functions/nope", timeout=5).status_code == 404
    assert requests.post(host.url + "/admin/functions/hello", timeout=5).status_code == 400
    assert requests.post(host.url + "/admin/functions/sample_timer", data=b"{bad", timeout=5).status_code == 400


# ---------------------------------------------------------------------------------- timers


def test_schedule_is_resolved_from_an_app_setting(monkeypatch):
    monkeypatch.setenv("SAMPLE_SCHEDULE", "0 */30 * * * *")
    dev = DevHost(sample.app, port=0)
    assert dev.functions["sample_timer"].schedule_expression == "0 */30 * * * *"
    assert "sample_timer: timerTrigger (0 */30 * * * *)" in dev.describe()


def test_missing_schedule_setting_is_a_startup_error(monkeypatch):
    monkeypatch.delenv("SAMPLE_SCHEDULE", raising=False)
    with pytest.raises(DevHostError, match="SAMPLE_SCHEDULE"):
        DevHost(sample.app, port=0)


def test_invalid_schedule_is_a_startup_error(monkeypatch):
    monkeypatch.setenv("SAMPLE_SCHEDULE", "*/5 * * * *")
    with pytest.raises(DevHostError, match=r"sample_timer.*6 fields"):
        DevHost(sample.app, port=0)


class _SteppingClock:
    """The dev host's timer clock, one second further at every reading: a schedule comes due at
    once instead of after real time (the loop computes a wait of zero)."""

    def __init__(self, start: datetime):
        self.now = start
        self.lock = threading.Lock()

    def __call__(self) -> datetime:
        with self.lock:
            self.now += timedelta(seconds=1)
            return self.now


def test_timer_fires_on_its_schedule(monkeypatch):
    monkeypatch.setenv("SAMPLE_SCHEDULE", "0 0 9 * * MON")  # Monday 09:00 UTC: never during a test by wall time
    before = len(sample.TIMER_RUNS)
    clock = _SteppingClock(datetime(2026, 11, 30, 8, 59, 58, tzinfo=UTC))  # a Monday, just before nine
    with DevHost(sample.app, port=0, signed_in_user="", clock=clock):
        wait_until(lambda: len(sample.TIMER_RUNS) > before)
    run = sample.TIMER_RUNS[before]
    assert run["past_due"] is False
    status = {key: datetime.fromisoformat(value) for key, value in run["schedule_status"].items() if key != "Last"}
    assert status["Next"] == datetime(2026, 12, 7, 9, 0, tzinfo=UTC)  # the following Monday's occurrence


def _tracking_app(run_on_startup: bool = False):
    """An inline app whose timer sleeps a little and records how many runs overlap."""
    state = {"active": 0, "max_active": 0, "runs": 0}
    lock = threading.Lock()
    app = func.FunctionApp()

    @app.timer_trigger(schedule=YEARLY, arg_name="timer", run_on_startup=run_on_startup)
    def slow_timer(timer: func.TimerRequest) -> None:
        with lock:
            state["active"] += 1
            state["max_active"] = max(state["max_active"], state["active"])
        time.sleep(0.15)
        with lock:
            state["active"] -= 1
            state["runs"] += 1

    return app, state


def test_runs_of_one_timer_never_overlap():
    app, state = _tracking_app()
    with DevHost(app, port=0) as dev:
        for _ in range(3):
            assert requests.post(dev.url + "/admin/functions/slow_timer", timeout=5).status_code == 202
        wait_until(lambda: state["runs"] == 3)
    assert state["max_active"] == 1


def test_run_on_startup_is_honoured_unless_timers_are_off():
    app, state = _tracking_app(run_on_startup=True)
    with DevHost(app, port=0, timers=False):
        time.sleep(0.3)
    assert state["runs"] == 0
    with DevHost(app, port=0):
        wait_until(lambda: state["runs"] == 1)


# ---------------------------------------------------------------------------------- signed-in user

SPOOFED = {
    "X-MS-CLIENT-PRINCIPAL": base64.b64encode(b'{"auth_typ":"aad","claims":[]}').decode(),
    "X-MS-CLIENT-PRINCIPAL-NAME": "mallory@evil.example",
    "X-MS-CLIENT-PRINCIPAL-ID": "00000000-0000-0000-0000-000000000000",
    "X-MS-CLIENT-PRINCIPAL-IDP": "aad",
    "X-MS-TOKEN-AAD-ID-TOKEN": "forged",
}


def test_spoofed_principal_headers_are_stripped_when_nobody_is_signed_in(host):
    headers = inspect(host, headers=SPOOFED)["headers"]
    assert not [name for name in headers if name.startswith(("x-ms-client-principal", "x-ms-token-"))]


def test_principal_headers_for_a_configured_user_replace_spoofed_ones(sample_schedule):
    with DevHost(sample.app, port=0, timers=False, signed_in_user="Ada Lovelace <ada@example.com>") as dev:
        headers = inspect(dev, headers=SPOOFED)["headers"]
    principal = json.loads(base64.b64decode(headers["x-ms-client-principal"]))
    claims = {claim["typ"]: claim["val"] for claim in principal["claims"]}
    oid = claims["http://schemas.microsoft.com/identity/claims/objectidentifier"]
    assert principal["auth_typ"] == "aad"
    assert principal["name_typ"] == "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/emailaddress"
    assert principal["role_typ"] == "http://schemas.microsoft.com/ws/2008/06/identity/claims/role"
    assert claims["name"] == "Ada Lovelace"
    assert claims["preferred_username"] == "ada@example.com"
    assert claims["http://schemas.xmlsoap.org/ws/2005/05/identity/claims/emailaddress"] == "ada@example.com"
    uuid.UUID(claims["http://schemas.microsoft.com/identity/claims/tenantid"])
    assert oid == str(uuid.uuid5(uuid.NAMESPACE_URL, "mailto:ada@example.com"))
    assert headers["x-ms-client-principal-id"] == oid
    assert headers["x-ms-client-principal-name"] == "ada@example.com"
    assert headers["x-ms-client-principal-idp"] == "aad"
    assert "x-ms-token-aad-id-token" not in headers


def test_signed_in_user_from_the_environment_and_per_host_override(monkeypatch, sample_schedule):
    monkeypatch.setenv("DEV_SIGNED_IN_USER", "bob@example.com")
    with DevHost(sample.app, port=0, timers=False) as dev:
        headers = inspect(dev)["headers"]
    assert headers["x-ms-client-principal-name"] == "bob@example.com"
    assert DevHost(sample.app, signed_in_user="").signed_in_user is None  # "" = nobody
    assert DevHost(sample.app, signed_in_user="Carol <c@example.org>").signed_in_user.email == "c@example.org"
    with pytest.raises(DevHostError):
        DevHost(sample.app, signed_in_user="not an email")


# ---------------------------------------------------------------------------------- settings and CLI


def test_local_settings_do_not_override_the_environment(tmp_path):
    settings = tmp_path / "local.settings.json"
    settings.write_text(json.dumps({"IsEncrypted": False, "Values": {"A": "from-file", "B": "from-file", "N": 5}}))
    environ = {"B": "from-env"}
    load_local_settings(settings, environ=environ)
    assert environ == {"A": "from-file", "B": "from-env", "N": "5"}
    assert load_local_settings(tmp_path / "absent.json", environ=environ) == {}
    with pytest.raises(DevHostError):
        load_local_settings(tmp_path / "absent.json", required=True, environ=environ)


def test_command_line_loads_settings_before_importing_the_app(tmp_path):
    settings = tmp_path / "local.settings.json"
    settings.write_text(json.dumps({"Values": {"SAMPLE_SCHEDULE": YEARLY}}))
    env = {k: v for k, v in os.environ.items() if k not in ("SAMPLE_SCHEDULE", "DEV_SIGNED_IN_USER")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "devtools.devhost", "--app", SAMPLE, "--port", "0", "--no-timers", "--settings", str(settings)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = None
        for line in proc.stdout:
            if "hello: [GET]" in line:
                url = line.split()[-1].rsplit("/api/", 1)[0]
            if line.startswith("For detailed output"):
                break
        assert url, proc.stderr.read() if proc.poll() is not None else "no function list printed"
        assert requests.get(url + "/api/hello/cli", timeout=5).text == "Hello, cli!"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


# -- threads a function leaves running (the host does not track them) ------------------------------

threads_app = func.FunctionApp()
LEFT_RUNNING = threading.Event()


@threads_app.function_name("leaves_a_thread")
@threads_app.route(route="leaves", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def leaves_a_thread(req: func.HttpRequest) -> func.HttpResponse:
    threading.Thread(target=LEFT_RUNNING.wait, args=(10,), name="still-working", daemon=True).start()
    return func.HttpResponse("answered")


@threads_app.function_name("joins_its_threads")
@threads_app.route(route="joins", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def joins_its_threads(req: func.HttpRequest) -> func.HttpResponse:
    from shared.parallel import run_parallel

    return func.HttpResponse(",".join(run_parallel([lambda: "a", lambda: "b", lambda: "c"], workers=3)))


def test_a_function_that_returns_with_a_thread_still_running_is_named(caplog):
    from devtools.devhost import THREADS_LEFT_MARKER

    LEFT_RUNNING.clear()
    try:
        with caplog.at_level(logging.WARNING, logger="devtools.devhost"), DevHost(threads_app, port=0, timers=False) as host:
            assert requests.get(host.url + "/api/joins", timeout=10).text == "a,b,c"
            assert host.threads_left == []
            assert requests.get(host.url + "/api/leaves", timeout=10).text == "answered"
            assert host.threads_left == ["leaves_a_thread: still-working"]
        warnings = [r.getMessage() for r in caplog.records if THREADS_LEFT_MARKER in r.getMessage()]
        assert len(warnings) == 1 and "leaves_a_thread" in warnings[0] and "still-working" in warnings[0]
    finally:
        LEFT_RUNNING.set()
