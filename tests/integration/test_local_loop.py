"""`make run` (devtools/run_local.py): fixed ports, the settings file the CLI reads, persistent storage.

The stack runs as a real subprocess on free ports (chosen through the same environment variables a
user would set) and writes its settings to a temporary file, never the developer's own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from devtools.azurite import Azurite, free_port
from devtools.run_local import PortTaken, chosen_ports, port_is_free, write_local_settings

pytestmark = pytest.mark.azurite

ROOT = Path(__file__).resolve().parents[2]
PORT_VARIABLES = ("DEV_HOST_PORT", "AZURITE_BLOB_PORT", "AZURITE_QUEUE_PORT", "AZURITE_TABLE_PORT", "MARKETPLACE_STANDIN_PORT")


def _time_wait_port() -> int:
    """A port whose only socket is in TIME_WAIT: the server side closed an accepted connection first.

    The server sets SO_REUSEADDR, as every server here does (Python's HTTP servers, Node's Azurite).
    """
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the side that closes first keeps TIME_WAIT, on the server's port
    client.close()
    server.close()
    for _ in range(200):  # the client's FIN arrives asynchronously: wait for the state, not for time
        if _tcp_states(port) == {TIME_WAIT}:
            return port
        time.sleep(0.01)
    raise AssertionError(f"port {port} never reached TIME_WAIT: {_tcp_states(port)}")


TIME_WAIT = "06"


def _tcp_states(port: int) -> set[str]:
    """States of the sockets whose local port is ``port`` (from /proc/net/tcp)."""
    states = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port:
            states.add(fields[3])
    return states


def test_a_port_in_time_wait_is_free_and_a_listening_one_is_taken():
    port = _time_wait_port()
    with socket.socket() as plain, pytest.raises(OSError):  # the old probe: TIME_WAIT looked busy
        plain.bind(("127.0.0.1", port))
    assert port_is_free(port)

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        taken = listener.getsockname()[1]
        assert not port_is_free(taken)
        with pytest.raises(PortTaken) as error:
            chosen_ports({"DEV_HOST_PORT": str(taken)}, (("DEV_HOST_PORT", 7071, "the dev host"),))
        assert f"port {taken} for the dev host is taken" in str(error.value)
        assert "DEV_HOST_PORT" in str(error.value)


def test_the_settings_file_keeps_the_users_values_and_refreshes_the_stacks(tmp_path):
    path = tmp_path / "local.settings.json"
    path.write_text(
        json.dumps({"IsEncrypted": False, "Values": {"MY_OWN": "kept", "TABLES_PREFIX": "old"}, "Host": {"CORS": "*"}})
    )
    write_local_settings(path, {"TABLES_PREFIX": "new", "LANDING_FORM_SECRET": "s" * 32})
    document = json.loads(path.read_text())
    assert document["Values"] == {
        "MY_OWN": "kept",
        "TABLES_PREFIX": "new",
        "LANDING_FORM_SECRET": "s" * 32,
        "FUNCTIONS_WORKER_RUNTIME": "python",
    }
    assert document["Host"] == {"CORS": "*"} and document["IsEncrypted"] is False


def _clean_env(**extra: str) -> dict[str, str]:
    """What a second terminal has: no app settings at all."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "PYTHONPATH": str(ROOT)}
    env.update(extra)
    return env


@pytest.fixture
def stack_env(tmp_path):
    ports = {name: str(free_port()) for name in PORT_VARIABLES}
    return _clean_env(
        **ports,
        LOCAL_SETTINGS_FILE=str(tmp_path / "local.settings.json"),
        AZURITE_LOCATION=str(tmp_path / "azurite-data"),
    )


def _start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "devtools.run_local", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_ready(process: subprocess.Popen[str], settings_file: Path) -> str:
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if "Press Ctrl-C to stop" in line:
            assert settings_file.exists()
            return "".join(lines)
    raise AssertionError("make run stopped before it was ready:\n" + "".join(lines[-40:]))


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def _cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_make_run_writes_the_settings_a_second_terminal_uses_and_storage_survives_a_restart(stack_env):
    settings_file = Path(stack_env["LOCAL_SETTINGS_FILE"])
    second_terminal = _clean_env(LOCAL_SETTINGS_FILE=str(settings_file))
    process = _start(stack_env)
    try:
        output = _wait_ready(process, settings_file)
        assert f"http://127.0.0.1:{stack_env['DEV_HOST_PORT']}/api/landing" in output  # the port asked for
        values = json.loads(settings_file.read_text())["Values"]
        assert values["TABLES_CONNECTION_STRING"].count(stack_env["AZURITE_TABLE_PORT"]) == 1
        assert values["MARKETPLACE_API_BASE_URL"].startswith(f"http://127.0.0.1:{stack_env['MARKETPLACE_STANDIN_PORT']}")
        assert values["FUNCTIONS_WORKER_RUNTIME"] == "python" and len(values["LANDING_FORM_SECRET"]) >= 32

        reconciled = _cli(second_terminal, "reconcile", "--json")  # records the purchase make run created
        assert reconciled.returncode == 0, reconciled.stderr
        listed = _cli(second_terminal, "list", "--json")
        assert listed.returncode == 0, listed.stderr
        before = {row["id"] for row in json.loads(listed.stdout)}
        assert len(before) == 1
        # The SaaS application's publisher API answers locally without a token (PUBLISHER_API_AUTH=none).
        assert values["PUBLISHER_API_AUTH"] == "none"
        url = f"http://127.0.0.1:{stack_env['DEV_HOST_PORT']}/api/subscriptions/{next(iter(before))}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=30) as answer:
            record = json.loads(answer.read())
            assert answer.status == 200 and record["id"] == next(iter(before))
        # ...and so does metered usage: each event gets its answer, and the metering run works locally.
        report = urllib.request.Request(
            f"http://127.0.0.1:{stack_env['DEV_HOST_PORT']}/api/usage",
            data=json.dumps({"events": [{"subscriptionId": record["id"], "dimension": "api_calls", "quantity": 2}]}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with opener.open(report, timeout=30) as answer:
            (result,) = json.loads(answer.read())["results"]
            expected = "accepted" if record["status"] == "Subscribed" else "refused"
            assert answer.status == 202 and result["status"] == expected, result
        metered = _cli(second_terminal, "meter-now", "--json")
        assert metered.returncode == 0 and json.loads(metered.stdout)["flagged"] == 0, metered.stderr
    finally:
        _stop(process)
    assert process.returncode == 0

    # Same ports right away (the previous run's sockets may sit in TIME_WAIT), same data.
    process = _start(stack_env)
    try:
        _wait_ready(process, settings_file)
        assert json.loads(settings_file.read_text())["Values"]["LANDING_FORM_SECRET"] == values["LANDING_FORM_SECRET"]
        listed = _cli(second_terminal, "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert before <= {row["id"] for row in json.loads(listed.stdout)}
    finally:
        _stop(process)

    process = _start(stack_env, "--fresh")  # make run FRESH=1
    try:
        _wait_ready(process, settings_file)
        listed = _cli(second_terminal, "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout) == []
    finally:
        _stop(process)


def test_make_run_refuses_a_taken_port_and_says_which(stack_env):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", int(stack_env["DEV_HOST_PORT"])))
        listener.listen(1)
        process = _start(stack_env)
        try:
            output, _ = process.communicate(timeout=60)
        finally:
            _stop(process)
    assert process.returncode == 1
    assert f"port {stack_env['DEV_HOST_PORT']} for the dev host is taken" in output
    assert not Path(stack_env["LOCAL_SETTINGS_FILE"]).exists()  # nothing started, nothing written


def test_azurite_keeps_its_data_in_a_location_across_restarts(tmp_path):
    from azure.data.tables import TableServiceClient

    location = tmp_path / "data"
    azurite = Azurite(location=location).start()
    try:
        table = TableServiceClient.from_connection_string(azurite.connection_string).create_table("kept")
        table.create_entity({"PartitionKey": "p", "RowKey": "r", "Value": "still here"})
    finally:
        azurite.stop()
    assert location.exists()  # stop() leaves a given location alone
    again = Azurite(location=location).start()
    try:
        table = TableServiceClient.from_connection_string(again.connection_string).get_table_client("kept")
        assert table.get_entity("p", "r")["Value"] == "still here"
    finally:
        again.stop()


def test_the_cli_needs_no_typed_settings_after_make_run_even_with_a_stale_port(stack_env, tmp_path):
    """The CLI reads the file; a variable in the environment still wins over it."""
    settings_file = Path(stack_env["LOCAL_SETTINGS_FILE"])
    settings_file.write_text(
        json.dumps({"IsEncrypted": False, "Values": {"TABLES_CONNECTION_STRING": "not a connection string"}})
    )
    result = _cli(_clean_env(LOCAL_SETTINGS_FILE=str(settings_file), MARKETPLACE_AUTH="none"), "list", "--json")
    assert result.returncode != 0  # the file's value was used (and is bad) ...
    azurite = Azurite().start()
    try:
        env = _clean_env(
            LOCAL_SETTINGS_FILE=str(settings_file), MARKETPLACE_AUTH="none", TABLES_CONNECTION_STRING=azurite.connection_string
        )
        result = _cli(env, "list", "--json")
        assert result.returncode == 0, result.stderr  # ... until the environment overrides it
        assert json.loads(result.stdout) == []
    finally:
        azurite.stop()
