"""schemathesis over every operation of the OpenAPI document, against the dev host (issue 25).

Cases are generated from shared/openapi.json (fixed seed, bounded examples) and each is sent as no
caller and with a stand-in Entra token for each app role. For every answer:

* no 5xx;
* it conforms to the document (status, headers, body: tests/contract.py, openapi-core);
* a refusal (any 4xx) changes nothing: no PATCH/DELETE/usage call reached the Marketplace stand-in,
  and the subscription's record, history and publisher operations are as they were;
* a 202 of a change links to its operation (the document's GetOperation link): it is read back.

Path ids are steered half of the time to a real subscription (in upper case too) and to a real
operation, so the fuzzing reaches past "404 not found". The number of generated cases is written
to test-artifacts/fuzz-cases.txt and checked by the last test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, seed, settings

from shared.openapi import document
from tests.integration.test_publisher_api import API_AUDIENCE, SAAS_APP_ID, entra_api_services, publisher_rows, subscribed

pytestmark = pytest.mark.azurite

schema = schemathesis.openapi.from_dict(document())
ROOT = Path(__file__).resolve().parents[2]
MAX_EXAMPLES = 12
ROLES: tuple[tuple[str, ...] | None, ...] = (
    None,
    (),
    ("Subscriptions.Read",),
    ("Subscriptions.ReadWrite",),
    ("Usage.Write",),
)
MARKETPLACE_WRITES = ("update", "delete", "usage_event", "batch_usage_event")
generated = {"cases": 0, "requests": 0}


class Fuzz:
    def __init__(self, services, standin, devhost, http):
        self.services, self.standin, self.devhost, self.http = services, standin, devhost, http
        self.subscription_id = subscribed(self)
        change = http.patch(
            f"{devhost.url}/api/subscriptions/{self.subscription_id}",
            data=json.dumps({"quantity": 7}),
            headers={"Authorization": f"Bearer {self.token(('Subscriptions.ReadWrite',))}", "Content-Type": "application/json"},
            timeout=30,
        )
        assert change.status_code == 202, change.text
        self.operation_id = change.json()["id"]
        self.turn = 0

    def token(self, roles) -> str:
        return self.standin.sign_token({"aud": API_AUDIENCE, "azp": SAAS_APP_ID, "roles": list(roles)})

    def state(self) -> tuple:
        stored = self.services.repository.get(self.subscription_id)
        rows = sorted((op.id, op.status, op.plan_id, op.quantity) for op in publisher_rows(self.services, self.subscription_id))
        writes = {name: self.standin.calls[name] for name in MARKETPLACE_WRITES}
        return (
            stored.record.snapshot() if stored else None,
            len(self.services.repository.history(self.subscription_id)),
            rows,
            writes,
        )


@pytest.fixture
def fuzz(standin, make_services, devhost, http):
    # nothing settles behind the test's back
    services = entra_api_services(make_services, standin, PUBLISHER_OPERATION_POLL_SECONDS="3600")
    standin.webhook_url = None
    yield Fuzz(services, standin, devhost, http)
    services.follower.close()


def _steer(fuzz: Fuzz, case) -> None:
    fuzz.turn += 1
    params = case.path_parameters or {}
    if "subscriptionId" in params and fuzz.turn % 2 == 0:
        params["subscriptionId"] = fuzz.subscription_id.upper() if fuzz.turn % 4 == 0 else fuzz.subscription_id
    if "operationId" in params and fuzz.turn % 2 == 0:
        params["operationId"] = fuzz.operation_id
    if case.operation.path == "/api/usage" and isinstance(case.body, dict) and fuzz.turn % 2 == 0:
        for event in case.body.get("events") or []:
            if isinstance(event, dict):
                event["subscriptionId"] = fuzz.subscription_id


@schema.parametrize()
@seed(25)
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_with_every_role(case, fuzz):
    _steer(fuzz, case)
    generated["cases"] += 1
    for roles in ROLES:
        before = fuzz.state()
        headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        if roles is not None:
            headers["Authorization"] = f"Bearer {fuzz.token(roles)}"
        # fuzz.http validates the answer against the document (tests/contract.py) before returning it
        response = case.call(base_url=fuzz.devhost.url, session=fuzz.http, headers=headers, timeout=30)
        generated["requests"] += 1
        assert response.status_code < 500, (case.as_curl_command(), response.status_code, response.text[:500])
        if response.status_code >= 400:
            assert fuzz.state() == before, ("a refusal changed something", case.as_curl_command(), response.text[:500])
        if response.status_code == 202 and case.operation.path.startswith("/api/subscriptions/"):
            followed = fuzz.http.get(
                fuzz.devhost.url + response.headers["Location"],
                headers={"Authorization": f"Bearer {fuzz.token(('Subscriptions.Read',))}"},
                timeout=30,
            )
            assert followed.status_code == 200 and followed.json()["id"] == response.json()["id"]


def test_the_fuzzing_ran_every_operation():
    """Runs after the fuzzing (file order): every operation was generated for; the count is recorded."""
    operations = len([1 for item in document()["paths"].values() for method in item if method != "parameters"])
    assert generated["cases"] >= operations, generated
    out = ROOT / "test-artifacts"
    out.mkdir(exist_ok=True)
    (out / "fuzz-cases.txt").write_text(
        f"operations={operations} cases={generated['cases']} requests={generated['requests']} seed=25 max_examples={MAX_EXAMPLES}\n"
    )
