"""`make run`: Azurite, the marketplace stand-in and the dev host, wired together, on embedded defaults.

Any setting already in the environment wins, so the same command can point the app at Microsoft's
SaaS API emulator or the real API (set MARKETPLACE_API_BASE_URL and friends; the stand-in is then
not started). Prints a landing page link with a fresh purchase token. Ctrl-C stops everything.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
import threading
import time
from urllib.parse import quote

import requests

from devtools.azurite import Azurite, free_port

DEV_TENANT_ID = "00000000-0000-4000-8000-00000000d0e1"
DEV_CLIENT_ID = "00000000-0000-4000-8000-00000000a991"
DEV_USER = "Dev Buyer <buyer@contoso.example>"


def _port(preferred: int) -> int:
    """The preferred port when it is free, another free one otherwise."""
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return free_port()


def _wait_healthy(url: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    last: dict = {}
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


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    env = os.environ
    host_port = _port(int(env.get("DEV_HOST_PORT", "7071")))
    app_url = f"http://127.0.0.1:{host_port}"
    started: list = []

    azurite = None
    if not env.get("TABLES_CONNECTION_STRING") and not env.get("TABLES_ENDPOINT"):
        azurite = Azurite(blob_port=_port(10000), queue_port=_port(10001), table_port=_port(10002), in_memory=True).start()
        started.append(azurite)
        env["TABLES_CONNECTION_STRING"] = azurite.connection_string
        env.setdefault("AzureWebJobsStorage", azurite.connection_string)

    standin = None
    if not env.get("MARKETPLACE_API_BASE_URL"):
        from devtools.marketplace_standin import MarketplaceStandIn

        standin = MarketplaceStandIn(
            host="127.0.0.1",
            port=_port(7072),
            tenant_id=env.get("MARKETPLACE_TENANT_ID", DEV_TENANT_ID),
            audience=env.get("WEBHOOK_AUDIENCE") or env.get("MARKETPLACE_CLIENT_ID", DEV_CLIENT_ID),
            webhook_url=app_url + "/api/webhook",
        )
        standin.start()
        started.append(standin)
        env["MARKETPLACE_API_BASE_URL"] = standin.api_base_url
        env.setdefault("MARKETPLACE_AUTH", "none")
        env.setdefault("WEBHOOK_OPENID_CONFIG_URL", standin.openid_config_url)

    env.setdefault("MARKETPLACE_TENANT_ID", DEV_TENANT_ID)
    env.setdefault("MARKETPLACE_CLIENT_ID", DEV_CLIENT_ID)
    env.setdefault("LANDING_FORM_SECRET", secrets.token_urlsafe(32))
    env.setdefault("RECONCILE_SCHEDULE", "0 */5 * * * *")
    env.setdefault("DEV_SIGNED_IN_USER", DEV_USER)
    env.setdefault("SAAS_APP_URL", "https://app.contoso.example/")
    env.setdefault("BRAND_NAME", "Contoso SaaS (local)")
    env.setdefault("SUPPORT_EMAIL", "support@contoso.example")

    from devtools.devhost import DevHost

    host = DevHost.from_module("function_app:app", host="127.0.0.1", port=host_port)
    host.start()
    started.append(host)
    stop = threading.Event()

    def shutdown(*_):
        stop.set()

    signal.signal(signal.SIGINT, shutdown)
    signal.signal(signal.SIGTERM, shutdown)
    try:
        health = _wait_healthy(app_url + "/api/health")
        print("\n" + "\n".join(host.describe()))
        print(f"\nhealth: {health['status']}")
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
