"""`make run`: Azurite, the marketplace stand-in and the dev host, wired together, on embedded defaults.

Ports are fixed, so a webhook URL configured in Microsoft's SaaS emulator keeps working across
restarts: the dev host on 7071, Azurite on 10000-10002, the stand-in on 7072. A port that is really
taken (something listens on it) stops the start with a message naming it; the environment
variables in ``PORTS`` choose others. A socket left in TIME_WAIT by the previous run is not "taken".

The settings of the stack it started are written to local.settings.json (Core Tools' format), so
the CLI in a second terminal and ``func start`` find them. Any setting already in the environment
wins, so the same command can point the app at Microsoft's SaaS API emulator or the real API (set
MARKETPLACE_API_BASE_URL and friends; the stand-in is then not started).

Azurite keeps its data in .azurite/ between runs; ``make run FRESH=1`` (``--fresh``) starts empty.
Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import requests

from devtools.azurite import Azurite
from shared.errors import ConfigurationError
from shared.settings import local_settings_path, read_local_settings

ROOT = Path(__file__).resolve().parent.parent
AZURITE_DATA = ROOT / ".azurite"
DEV_TENANT_ID = "00000000-0000-4000-8000-00000000d0e1"
DEV_CLIENT_ID = "00000000-0000-4000-8000-00000000a991"
DEV_USER = "Dev Buyer <buyer@contoso.example>"

# (environment variable, default port, what listens there)
DEV_HOST = ("DEV_HOST_PORT", 7071, "the dev host")
AZURITE_PORTS = (
    ("AZURITE_BLOB_PORT", 10000, "Azurite (blob)"),
    ("AZURITE_QUEUE_PORT", 10001, "Azurite (queue)"),
    ("AZURITE_TABLE_PORT", 10002, "Azurite (table)"),
)
STANDIN = ("MARKETPLACE_STANDIN_PORT", 7072, "the marketplace stand-in")
PORTS = (DEV_HOST, *AZURITE_PORTS, STANDIN)


class _Stoppable(Protocol):
    def stop(self) -> None: ...


class PortTaken(RuntimeError):
    pass


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True unless something holds ``port``. Binds as servers do (SO_REUSEADDR), so a connection of
    the previous run still in TIME_WAIT does not count as taken; a listening socket does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def chosen_ports(env: Mapping[str, str], wanted: tuple[tuple[str, int, str], ...]) -> dict[str, int]:
    """The port of each wanted component (its variable, else the default); PortTaken names every
    taken one at once, with the variable that moves it."""
    ports: dict[str, int] = {}
    taken: list[str] = []
    for variable, default, what in wanted:
        raw = env.get(variable) or str(default)
        try:
            port = int(raw)
        except ValueError:
            raise PortTaken(f"{variable}={raw!r} is not a port number") from None
        ports[variable] = port
        if not port_is_free(port):
            taken.append(f"port {port} for {what} is taken by another program (choose another with {variable}=...)")
    if taken:
        raise PortTaken("; ".join(taken))
    return ports


def _wait_healthy(url: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            response = requests.get(url, timeout=5)
            last = response.json()
            if response.status_code == 200:
                return last
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the app did not become healthy: {last}")


def write_local_settings(path: Path, managed: Mapping[str, str]) -> None:
    """Write the stack's settings into local.settings.json, keeping every other value the file has
    (the user's own), in the format Core Tools reads for `func start`."""
    try:
        document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        document = {}
    if not isinstance(document, dict) or not isinstance(document.get("Values"), dict):
        document = {"IsEncrypted": False, "Values": {}}
    document["IsEncrypted"] = False
    document["Values"] = {**document["Values"], "FUNCTIONS_WORKER_RUNTIME": "python", **managed}
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    temporary.replace(path)  # never a half-written file for a CLI reading it meanwhile


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make run", description="Run the app locally on embedded defaults.")
    parser.add_argument("--fresh", action="store_true", help="start with empty storage (wipes .azurite/)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, env: MutableMapping[str, str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    env = os.environ if env is None else env
    settings_file = local_settings_path(env)
    start_azurite = not env.get("TABLES_CONNECTION_STRING") and not env.get("TABLES_ENDPOINT")
    start_standin = not env.get("MARKETPLACE_API_BASE_URL")
    wanted = (DEV_HOST, *(AZURITE_PORTS if start_azurite else ()), *((STANDIN,) if start_standin else ()))
    try:
        ports = chosen_ports(env, wanted)
        previous = read_local_settings(settings_file)
    except (PortTaken, ConfigurationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    app_url = f"http://127.0.0.1:{ports['DEV_HOST_PORT']}"
    # Everything this run decides goes to local.settings.json; what the environment sets wins.
    managed: dict[str, str] = {}
    started: list[_Stoppable] = []

    def decide(name: str, value: str) -> None:
        env.setdefault(name, value)
        managed[name] = env[name]

    if start_azurite:
        data = Path(env.get("AZURITE_LOCATION") or AZURITE_DATA)
        if args.fresh:
            shutil.rmtree(data, ignore_errors=True)
        azurite = Azurite(
            blob_port=ports["AZURITE_BLOB_PORT"],
            queue_port=ports["AZURITE_QUEUE_PORT"],
            table_port=ports["AZURITE_TABLE_PORT"],
            location=data,
        ).start()
        started.append(azurite)
        decide("TABLES_CONNECTION_STRING", azurite.connection_string)
        decide("AzureWebJobsStorage", azurite.connection_string)

    standin = None
    if start_standin:
        from devtools.marketplace_standin import MarketplaceStandIn

        standin = MarketplaceStandIn(
            host="127.0.0.1",
            port=ports["MARKETPLACE_STANDIN_PORT"],
            tenant_id=env.get("MARKETPLACE_TENANT_ID", DEV_TENANT_ID),
            audience=env.get("WEBHOOK_AUDIENCE") or env.get("MARKETPLACE_CLIENT_ID", DEV_CLIENT_ID),
            webhook_url=app_url + "/api/webhook",
        )
        standin.start()
        started.append(standin)
        decide("MARKETPLACE_API_BASE_URL", standin.api_base_url)
        decide("MARKETPLACE_AUTH", "none")
        decide("WEBHOOK_OPENID_CONFIG_URL", standin.openid_config_url)
    # The SaaS application's calls to the publisher API: no token locally (a warning on every call).
    decide("PUBLISHER_API_AUTH", "none")
    # The operator console: the dev host's signed-in user is an operator locally.
    decide("CONSOLE_AUTH", "none")

    decide("MARKETPLACE_TENANT_ID", DEV_TENANT_ID)
    decide("MARKETPLACE_CLIENT_ID", DEV_CLIENT_ID)
    # Kept across restarts, so a confirmation page left open still submits.
    decide("LANDING_FORM_SECRET", previous.get("LANDING_FORM_SECRET") or secrets.token_urlsafe(32))
    decide("RECONCILE_SCHEDULE", "0 */5 * * * *")
    decide("METERING_SCHEDULE", "0 5 * * * *")
    decide("USAGE_RECONCILE_SCHEDULE", "0 30 2 * * *")
    decide("DEV_SIGNED_IN_USER", DEV_USER)
    decide("SAAS_APP_URL", "https://app.contoso.example/")
    decide("BRAND_NAME", "Contoso SaaS (local)")
    decide("SUPPORT_EMAIL", "support@contoso.example")
    decide("EVENTS_WORK_QUEUE", "subscription-events-jobs")
    decide("OPERATIONS_WORK_QUEUE", "subscription-events-operations")

    from devtools.devhost import DevHost

    host = DevHost.from_module("function_app:app", host="127.0.0.1", port=ports["DEV_HOST_PORT"])
    host.start()
    started.append(host)
    stop = threading.Event()

    def shutdown(*_: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, shutdown)
    signal.signal(signal.SIGTERM, shutdown)
    try:
        health = _wait_healthy(app_url + "/api/health")
        write_local_settings(settings_file, managed)
        print("\n" + "\n".join(host.describe()))
        print(f"\nhealth: {health['status']}")
        print(f"\nSettings of this stack: {settings_file} (the CLI and `func start` read it; the environment wins).")
        print("In a second terminal:  .venv/bin/python -m shared.cli list")
        if standin is not None:
            purchase = standin.create_purchase(plan_id="standard", quantity=5)
            print("\nOpen this landing page link to activate a new purchase (token valid 24 h):")
            print(f"  {app_url}/api/landing?token={quote(purchase['token'], safe='')}")
            print(f"\nMarketplace stand-in: {standin.url}  (control API: {standin.url}/_control/state)")
            print(f"  new purchase:  curl -s -X POST {standin.url}/_control/purchases -d '{{}}'")
            print(
                f"  fire webhook:  curl -s -X POST {standin.url}/_control/subscriptions/{purchase['subscriptionId']}/actions "
                '-d \'{"action": "Suspend"}\''
            )
        if start_azurite:
            print("\nStorage persists in .azurite/ between runs; `make run FRESH=1` starts empty.")
        print(f"\nRun the reconciler now: curl -s -X POST '{app_url}/admin/functions/reconcile_timer?wait=true' -d '{{}}'")
        print("Press Ctrl-C to stop.\n", flush=True)
        stop.wait()
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        for component in reversed(started):
            component.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
