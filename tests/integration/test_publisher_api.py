"""The publisher API end to end: dev host (real HTTP), Azurite, the marketplace stand-in.

Every test goes through the real path: a bearer token signed by the stand-in's tenant key, the
function app's routes, the use case, Table Storage, and PATCH/DELETE/Get Operation over HTTP.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import timedelta

import pytest

from devtools.marketplace_standin import make_plan
from shared import publisher
from shared.domain import utc_now
from shared.reconcile import run_reconciliation
from shared.state_machine import LocalStatus

pytestmark = pytest.mark.azurite

API_AUDIENCE = "api://contoso-fulfillment-api"
SAAS_APP_ID = "5aa5aa5a-0000-4000-8000-0000000000cc"
READ = "Subscriptions.Read"
WRITE = "Subscriptions.ReadWrite"


class PublisherApi:
    """A SaaS application calling the publisher API with its token."""

    def __init__(self, services, standin, devhost, http):
        self.services, self.standin, self.devhost, self.http = services, standin, devhost, http
        self.base = devhost.url + "/api"

    def token(self, roles=(WRITE,), **claims) -> str:
        return self.standin.sign_token({"aud": API_AUDIENCE, "azp": SAAS_APP_ID, "roles": list(roles), **claims})

    def headers(self, token: str | None = "default", key: str | None = None, roles=(WRITE,)) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if token == "default":
            token = self.token(roles)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if key is not None:
            headers["Idempotency-Key"] = key
        return headers

    def patch(self, subscription_id: str, body, **kw):
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return self.http.patch(f"{self.base}/subscriptions/{subscription_id}", data=data, headers=self.headers(**kw), timeout=30)

    def delete(self, subscription_id: str, **kw):
        return self.http.delete(f"{self.base}/subscriptions/{subscription_id}", headers=self.headers(**kw), timeout=30)

    def get(self, path: str, **kw):
        return self.http.get(f"{self.base}/{path}", headers=self.headers(**kw), timeout=30)

    def wait_for(self, operation_id: str, timeout: float = 20.0) -> dict:
        """Poll GET /api/operations/{id} until it leaves InProgress."""
        ends = time.monotonic() + timeout
        follower = self.services.follower
        while True:
            follower.queue.release_delayed()  # the poll wait has passed
            follower.queue.drain(follower.run_job)  # the operation_followup queue trigger's work
            body = self.get(f"operations/{operation_id}", roles=(READ,)).json()
            if body["status"] != "InProgress" or time.monotonic() > ends:
                return body
            time.sleep(0.2)


def entra_api_services(make_services, standin, **overrides):
    """A services bundle whose publisher API checks the stand-in's Entra tokens for API_AUDIENCE."""
    return make_services(
        PUBLISHER_API_AUTH="entra",
        PUBLISHER_API_AUDIENCE=API_AUDIENCE,
        PUBLISHER_API_OPENID_CONFIG_URL=standin.openid_config_url,
        **overrides,
    )


@pytest.fixture
def api(standin, make_services, devhost, http):
    services = entra_api_services(make_services, standin, PUBLISHER_OPERATION_POLL_SECONDS="1")
    standin.webhook_url = devhost.url + "/api/webhook"
    yield PublisherApi(services, standin, devhost, http)


def record_locally(services, minutes: float = 10) -> None:
    """Record Microsoft's subscriptions as if synced a while ago (recent local changes win otherwise)."""
    services.clock = lambda: utc_now() - timedelta(minutes=minutes)
    assert run_reconciliation(services).completed
    services.clock = utc_now


def subscribed(api, *, plan_id: str = "standard", quantity: int | None = 5, **fields) -> str:
    (subscription_id,) = api.standin.seed(1, plan_id=plan_id, quantity=quantity)
    if fields:
        api.standin.set_subscription(subscription_id, **fields)
    record_locally(api.services)
    return subscription_id


def changes_sent(standin) -> int:
    return sum(standin.calls[name] for name in ("update", "delete"))


def publisher_rows(services, subscription_id: str) -> list:
    return services.publisher_store.list_for(subscription_id)


def history_kinds(services, subscription_id: str) -> list[str]:
    return [entry["kind"] for entry in services.repository.history(subscription_id)]


def outbox_events(services, subscription_id: str) -> list[dict]:
    rows = services.repository._subscriptions.query_entities(
        "PartitionKey eq @pk and Kind eq 'event'", parameters={"pk": subscription_id}
    )
    return [json.loads("".join(str(row.get(f"Body{i}" if i else "Body", "")) for i in range(12))) for row in rows]


# ---------------------------------------------------------------------------------------------
# the three commands end to end


def test_change_plan_end_to_end_applies_once_with_a_publisher_event(api):
    subscription_id = subscribed(api)
    response = api.patch(subscription_id, {"planId": "premium"})
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["Location"] == f"/api/operations/{body['id']}"
    assert body["status"] == "InProgress" and body["action"] == "ChangePlan" and body["planId"] == "premium"
    assert body["requestedBy"] == f"app:{SAAS_APP_ID}"

    # While it is pending, the subscription names it.
    view = api.get(f"subscriptions/{subscription_id}", roles=(READ,)).json()
    assert view["pendingOperation"] is None or view["pendingOperation"]["id"] == body["id"]

    done = api.wait_for(body["id"])
    assert done["status"] == "Succeeded", done
    assert done["marketplaceOperationId"]
    api.services.follower.wait_idle(10)
    api.standin.wait_for_deliveries(1)  # Microsoft's Partner webhook for the same operation

    record = api.services.repository.get(subscription_id).record
    assert record.plan_id == "premium" and record.pending_operation_id == ""
    assert history_kinds(api.services, subscription_id).count("change_plan") == 1
    plan_events = [e for e in outbox_events(api.services, subscription_id) if e["eventType"] == "subscription.plan_changed"]
    assert len(plan_events) == 1 and plan_events[0]["source"] == "publisher"
    assert plan_events[0]["previous"]["planId"] == "standard"
    assert api.standin.calls["update"] == 1  # one PATCH, whatever else happened


def test_change_quantity_end_to_end(api):
    subscription_id = subscribed(api, quantity=5)
    response = api.patch(subscription_id, {"quantity": 12})
    assert response.status_code == 202, response.text
    assert api.wait_for(response.json()["id"])["status"] == "Succeeded"
    api.services.follower.wait_idle(10)
    assert api.services.repository.get(subscription_id).record.quantity == 12
    assert api.standin.get_subscription(subscription_id)["quantity"] == 12


def test_cancel_end_to_end_unsubscribes_with_the_retention_rule(api):
    subscription_id = subscribed(api)
    response = api.delete(subscription_id)
    assert response.status_code == 202, response.text
    assert response.json()["action"] == "Unsubscribe"
    assert api.wait_for(response.json()["id"])["status"] == "Succeeded"
    api.services.follower.wait_idle(10)
    record = api.services.repository.get(subscription_id).record
    assert record.status is LocalStatus.UNSUBSCRIBED
    assert record.retain_data_until is not None and record.unsubscribed_at is not None
    assert record.retain_data_until - record.unsubscribed_at == timedelta(days=7)
    # A second cancel is refused before anything is sent.
    again = api.delete(subscription_id)
    assert again.status_code == 409 and again.json()["error"] == "subscription_not_active"
    assert api.standin.calls["delete"] == 1


def test_get_subscription_and_plans(api):
    subscription_id = subscribed(api)
    view = api.get(f"subscriptions/{subscription_id}", roles=(READ,))
    assert view.status_code == 200
    assert view.json()["planId"] == "standard" and view.json()["quantity"] == 5 and view.json()["pendingOperation"] is None
    plans = api.get(f"subscriptions/{subscription_id}/plans", roles=(READ,))
    assert plans.status_code == 200
    assert {p["planId"] for p in plans.json()["plans"]} == {"basic", "standard", "premium"}
    assert plans.json()["currentPlanId"] == "standard"
    # Cached briefly: a second read does not call Microsoft again.
    calls = api.standin.calls["list_plans"]
    api.get(f"subscriptions/{subscription_id}/plans", roles=(READ,))
    assert api.standin.calls["list_plans"] == calls
    missing = api.get(f"subscriptions/{uuid.uuid4()}", roles=(READ,))
    assert missing.status_code == 404 and missing.json()["error"] == "subscription_not_found"
    assert api.get(f"operations/{uuid.uuid4()}", roles=(READ,)).status_code == 404
    assert api.get("operations/not-a-guid", roles=(READ,)).status_code == 400


# ---------------------------------------------------------------------------------------------
# validation: refused before anything is sent or recorded


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({}, 400, "nothing_to_change"),
        ({"planId": "premium", "quantity": 3}, 400, "one_change_at_a_time"),
        ({"quantity": 0}, 400, "invalid_quantity"),
        ({"quantity": -4}, 400, "invalid_quantity"),
        ({"quantity": 2.5}, 400, "invalid_quantity"),
        ({"quantity": "7"}, 400, "invalid_quantity"),
        ({"quantity": True}, 400, "invalid_quantity"),
        ({"planId": ""}, 400, "invalid_plan_id"),
        ({"planId": 42}, 400, "invalid_plan_id"),
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_body"),
        (b'{"planId": "' + b"x" * 20_000 + b'"}', 413, "payload_too_large"),
        ({"planId": "no-such-plan"}, 422, "plan_not_available"),
        ({"planId": "standard"}, 422, "plan_unchanged"),
        ({"quantity": 101}, 422, "quantity_out_of_range"),
        ({"quantity": 5}, 422, "quantity_unchanged"),
    ],
)
def test_invalid_changes_are_refused_and_change_nothing(api, body, status, code):
    subscription_id = subscribed(api)
    before = api.services.repository.get(subscription_id)
    response = api.patch(subscription_id, body)
    assert response.status_code == status, response.text
    assert response.json()["error"] == code and response.json()["message"]
    assert changes_sent(api.standin) == 0
    assert publisher_rows(api.services, subscription_id) == []
    assert api.services.repository.get(subscription_id).etag == before.etag


def test_state_and_permission_refusals(api):
    (suspended,) = api.standin.seed(1, status="Suspended", plan_id="standard", quantity=2)
    (basic,) = api.standin.seed(1, plan_id="basic")
    (csp,) = api.standin.seed(1, plan_id="standard", quantity=2)
    api.standin.set_subscription(csp, allowedCustomerOperations=["Read"])
    record_locally(api.services)

    cases = [
        (api.patch(suspended, {"quantity": 3}), 409, "subscription_not_active"),
        (api.patch(basic, {"quantity": 3}), 422, "plan_not_per_seat"),
        (api.patch(csp, {"planId": "premium"}), 422, "operation_not_allowed"),
        (api.delete(csp), 422, "operation_not_allowed"),
        (api.patch(str(uuid.uuid4()), {"planId": "premium"}), 404, "subscription_not_found"),
        (api.patch("not-a-guid", {"planId": "premium"}), 400, "bad_request"),
    ]
    for response, status, code in cases:
        assert (response.status_code, response.json()["error"]) == (status, code), response.text
    assert changes_sent(api.standin) == 0
    for subscription_id in (suspended, basic, csp):
        assert publisher_rows(api.services, subscription_id) == []


# ---------------------------------------------------------------------------------------------
# authentication and authorization


def test_auth_matrix(api):
    subscription_id = subscribed(api)
    other_tenant = "0bad7e11-0000-4000-8000-0000000000dd"
    cases = [
        ("no token", api.headers(token=None), 401),
        ("not a bearer", {**api.headers(), "Authorization": "Basic dXNlcjpwYXNz"}, 401),
        ("wrong audience", api.headers(token=api.token(aud="api://someone-else")), 401),
        (
            "wrong tenant",
            api.headers(token=api.token(tid=other_tenant, iss=f"https://login.microsoftonline.com/{other_tenant}/v2.0")),
            401,
        ),
        ("expired", api.headers(token=api.token(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200)), 401),
        (
            "forged",
            api.headers(token=api.standin.sign_token({"aud": API_AUDIENCE, "roles": [WRITE]}, key=api.standin.other_key())),
            401,
        ),
        ("no role", api.headers(roles=()), 403),
        ("read role writing", api.headers(roles=(READ,)), 403),
        ("another app's role", api.headers(roles=("Usage.Write",)), 403),
    ]
    url = f"{api.base}/subscriptions/{subscription_id}"
    for name, headers, status in cases:
        response = api.http.patch(url, data=json.dumps({"planId": "premium"}), headers=headers, timeout=30)
        assert response.status_code == status, (name, response.text)
        assert response.json()["error"] in ("unauthorized", "missing_role"), name
        token = headers.get("Authorization", "").partition(" ")[2]
        assert not token or token not in response.text  # never echoed
    # Reads: the read role is enough, ReadWrite too, none is not.
    assert api.get(f"subscriptions/{subscription_id}", roles=(READ,)).status_code == 200
    assert api.get(f"subscriptions/{subscription_id}", roles=(WRITE,)).status_code == 200
    assert api.get(f"subscriptions/{subscription_id}", roles=()).status_code == 403
    assert api.get(f"subscriptions/{subscription_id}/plans", token=None).status_code == 401
    assert changes_sent(api.standin) == 0
    assert publisher_rows(api.services, subscription_id) == []


def test_publisher_api_auth_none_is_refused_in_azure():
    from shared.errors import ConfigurationError
    from shared.settings import Settings

    env = {"MARKETPLACE_AUTH": "none", "WEBHOOK_AUTH": "entra", "MARKETPLACE_TENANT_ID": "t", "MARKETPLACE_CLIENT_ID": "c"}
    env.update(TABLES_CONNECTION_STRING="UseDevelopmentStorage=true", PUBLISHER_API_AUTH="none", WEBSITE_INSTANCE_ID="x")
    with pytest.raises(ConfigurationError, match="PUBLISHER_API_AUTH=none is refused"):
        Settings.from_env(env, require=())
    missing = Settings.from_env({**env, "PUBLISHER_API_AUTH": "entra", "WEBSITE_INSTANCE_ID": ""}, require=())
    with pytest.raises(ConfigurationError, match="PUBLISHER_API_AUDIENCE is required"):
        missing.require("publisher_api")


# ---------------------------------------------------------------------------------------------
# idempotency and concurrency


def test_idempotency_key_sends_once_and_refuses_another_body(api):
    subscription_id = subscribed(api)
    first = api.patch(subscription_id, {"planId": "premium"}, key="order-7781")
    again = api.patch(subscription_id, {"planId": "premium"}, key="order-7781")
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert api.standin.calls["update"] == 1
    other_body = api.patch(subscription_id, {"planId": "basic"}, key="order-7781")
    assert other_body.status_code == 422 and other_body.json()["error"] == "idempotency_key_reused"
    # After the change went through, the same request with the same key still answers the first
    # answer (not "plan unchanged"), and sends nothing.
    api.wait_for(first.json()["id"])
    replay = api.patch(subscription_id, {"planId": "premium"}, key="order-7781")
    assert replay.status_code == 202 and replay.json()["id"] == first.json()["id"]
    assert replay.json()["status"] == "Succeeded"
    assert api.standin.calls["update"] == 1
    # Another caller's identical key is another request.
    another_app = api.headers(token=api.token(azp="6bb6bb6b-0000-4000-8000-0000000000ee"), key="order-7781")
    response = api.http.patch(
        f"{api.base}/subscriptions/{subscription_id}", data=json.dumps({"quantity": 9}), headers=another_app, timeout=30
    )
    assert response.status_code == 202 and response.json()["id"] != first.json()["id"]


def test_two_concurrent_changes_one_is_accepted_the_other_gets_409(api):
    subscription_id = subscribed(api)
    api.standin.operation_delay_seconds = 2.0  # keep the first one pending
    barrier = threading.Barrier(2)
    results = []

    def change(body):
        barrier.wait()
        results.append(api.patch(subscription_id, body))

    threads = [threading.Thread(target=change, args=(body,)) for body in ({"planId": "premium"}, {"quantity": 8})]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(r.status_code for r in results)
    assert statuses == [202, 409], [r.text for r in results]
    accepted = next(r for r in results if r.status_code == 202).json()
    refused = next(r for r in results if r.status_code == 409).json()
    assert refused["error"] == "operation_pending"
    assert refused["details"]["pendingOperationId"] == accepted["id"]
    assert changes_sent(api.standin) == 1
    assert api.wait_for(accepted["id"])["status"] == "Succeeded"
    api.services.follower.wait_idle(10)
    # The claim is released: the next change goes through (a quantity neither request asked for).
    assert api.patch(subscription_id, {"quantity": 11}).status_code == 202


def test_microsoft_locked_by_its_own_pending_operation_maps_to_409_and_records_nothing(api):
    subscription_id = subscribed(api)
    api.standin.trigger(subscription_id, "ChangeQuantity", quantity=9, deliver=False)  # the customer's, InProgress
    response = api.patch(subscription_id, {"planId": "premium"})
    assert response.status_code == 409 and response.json()["error"] == "subscription_locked"
    assert "locked" in response.json()["message"]
    assert publisher_rows(api.services, subscription_id) == []
    assert api.services.repository.get(subscription_id).record.pending_operation_id == ""


# ---------------------------------------------------------------------------------------------
# both orders of webhook and poll, failures


def test_webhook_before_poll_applies_once(api, make_services):
    slow = make_services(
        TABLES_PREFIX=api.services.settings.tables_prefix,
        PUBLISHER_API_AUTH="none",
        PUBLISHER_OPERATION_POLL_SECONDS="3600",  # the follower waits: only the webhook can settle it
    )
    subscription_id = subscribed(api)
    result = publisher.request_change(
        slow, publisher.ChangeRequest(subscription_id, publisher.CHANGE_PLAN, plan_id="premium"), caller="test"
    )
    operation_id = result.body["id"]
    api.standin.wait_for_deliveries(1)
    operation = slow.publisher_store.get(subscription_id, operation_id)
    assert operation.status == "Succeeded"
    assert slow.repository.get(subscription_id).record.plan_id == "premium"
    calls = api.standin.calls["update"]
    # The poll comes later and finds it settled: nothing applied twice.
    assert publisher.follow_operation(slow, subscription_id, operation_id).status == "Succeeded"
    assert history_kinds(slow, subscription_id).count("change_plan") == 1
    assert api.standin.calls["update"] == calls == 1
    entry = next(e for e in slow.repository.history(subscription_id) if e["kind"] == "change_plan")
    assert entry["source"] == "publisher" and entry["actor"] == "test"


def test_poll_before_webhook_applies_once(api):
    api.standin.partner_webhook = False
    subscription_id = subscribed(api)
    response = api.patch(subscription_id, {"planId": "premium"})
    done = api.wait_for(response.json()["id"])
    assert done["status"] == "Succeeded"
    api.services.follower.wait_idle(10)
    # Now Microsoft's webhook arrives: a duplicate of what the poll applied.
    statuses = api.standin.deliver(done["marketplaceOperationId"])
    assert statuses == [200]
    assert history_kinds(api.services, subscription_id).count("change_plan") == 1
    marker = api.services.repository.get_marker(subscription_id, done["marketplaceOperationId"])
    assert marker is not None and not marker.pending


@pytest.mark.parametrize(("outcome", "status"), [("fail", "Failed"), ("conflict", "Conflict")])
def test_failed_and_conflicting_operations_keep_the_subscription_and_release_the_claim(api, outcome, status):
    api.standin.partner_outcome = outcome
    subscription_id = subscribed(api)
    response = api.patch(subscription_id, {"planId": "premium"})
    done = api.wait_for(response.json()["id"])
    assert done["status"] == status and done["errorMessage"]
    api.services.follower.wait_idle(10)
    record = api.services.repository.get(subscription_id).record
    assert record.plan_id == "standard" and record.pending_operation_id == ""
    failed = [e for e in outbox_events(api.services, subscription_id) if e["eventType"] == "subscription.change_failed"]
    assert len(failed) == 1 and failed[0]["source"] == "publisher" and done["errorMessage"] in failed[0]["reason"]
    assert "change_failed" in history_kinds(api.services, subscription_id)
    assert api.services.repository.get(subscription_id).record.flags == ("change_failed",)  # for a person to look at
    api.standin.partner_outcome = "succeed"
    assert api.patch(subscription_id, {"planId": "premium"}).status_code == 202


# ---------------------------------------------------------------------------------------------
# crashes: the reconciler settles what a dead request left


class Crash(BaseException):
    """The process dies here (not an error anything catches)."""


@pytest.mark.parametrize("settled_by", ["reconciler", "webhook"])
def test_crash_after_the_patch_is_settled_later(api, make_services, monkeypatch, settled_by):
    """The process dies after Microsoft accepted the PATCH, before its operation id was recorded."""
    api.standin.partner_webhook = settled_by == "webhook"
    crashing = make_services(TABLES_PREFIX=api.services.settings.tables_prefix, PUBLISHER_API_AUTH="none")
    subscription_id = subscribed(api)

    def die(_operation):
        raise Crash()

    monkeypatch.setattr(crashing.publisher_store, "update", die)
    monkeypatch.setattr(crashing.follower, "follow", lambda *_: None)  # dead: nothing follows it
    with pytest.raises(Crash):
        publisher.request_change(
            crashing, publisher.ChangeRequest(subscription_id, publisher.CHANGE_PLAN, plan_id="premium"), caller="test"
        )
    assert api.standin.calls["update"] == 1  # Microsoft has the change
    (pending,) = publisher_rows(api.services, subscription_id)
    assert pending.marketplace_operation_id == ""
    if settled_by == "webhook":
        # Microsoft's Partner webhook carries an operation id we never recorded: it matches the
        # claim by its change, settles it and adopts the id, in the webhook's own transaction.
        api.standin.wait_for_deliveries(1)
    else:
        assert pending.status == "Claimed"
        assert api.services.repository.get(subscription_id).record.pending_operation_id == pending.id
        # While the claim stands, another change is refused.
        assert api.patch(subscription_id, {"quantity": 9}).status_code == 409
        time.sleep(0.5)  # the stand-in completes the operation after operation_delay_seconds (0.2 s)
        later = utc_now() + timedelta(minutes=1)  # past the grace the dead request had
        api.services.clock = lambda: later
        summary = run_reconciliation(api.services)
        api.services.clock = utc_now
        assert summary.publisher_operations_settled == 1
    (settled,) = publisher_rows(api.services, subscription_id)
    assert settled.status == "Succeeded"
    record = api.services.repository.get(subscription_id).record
    assert record.plan_id == "premium" and record.pending_operation_id == ""
    assert history_kinds(api.services, subscription_id).count("change_plan") == 1
    assert api.standin.calls["update"] == 1


def test_a_claim_microsoft_never_received_expires_as_failed(api, make_services, monkeypatch):
    crashing = make_services(TABLES_PREFIX=api.services.settings.tables_prefix, PUBLISHER_API_AUTH="none")
    subscription_id = subscribed(api)

    def die(*_args):
        raise Crash()

    monkeypatch.setattr(crashing.marketplace, "change_quantity", die)
    with pytest.raises(Crash):
        publisher.request_change(
            crashing, publisher.ChangeRequest(subscription_id, publisher.CHANGE_QUANTITY, quantity=9), caller="test"
        )
    assert changes_sent(api.standin) == 0
    # Inside the claim timeout the reconciler looks and leaves it (Microsoft may still show it).
    soon = utc_now() + timedelta(minutes=2)
    api.services.clock = lambda: soon
    assert run_reconciliation(api.services).publisher_operations_settled == 0
    assert publisher_rows(api.services, subscription_id)[0].status == "Claimed"
    # Past PUBLISHER_CLAIM_TIMEOUT_SECONDS (300 s) it is settled as failed and the claim released.
    late = utc_now() + timedelta(minutes=6)
    api.services.clock = lambda: late
    assert run_reconciliation(api.services).publisher_operations_settled == 1
    api.services.clock = utc_now
    (operation,) = publisher_rows(api.services, subscription_id)
    assert operation.status == "Failed" and "no record" in operation.error_message
    record = api.services.repository.get(subscription_id).record
    assert record.pending_operation_id == "" and record.quantity == 5
    assert [e["eventType"] for e in outbox_events(api.services, subscription_id)].count("subscription.change_failed") == 1


def test_microsoft_timeout_on_the_patch_answers_202_and_is_confirmed_later(api):
    subscription_id = subscribed(api)
    api.get(f"subscriptions/{subscription_id}/plans", roles=(READ,))  # plans cached: the next call is the PATCH
    api.standin.fail_next(1, 503, path_contains=subscription_id)  # PATCH is not retried on a 5xx
    response = api.patch(subscription_id, {"quantity": 7})
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "InProgress"
    # Nothing reached Microsoft; after the claim timeout the reconciler settles it as failed.
    late = utc_now() + timedelta(minutes=6)
    api.services.clock = lambda: late
    run_reconciliation(api.services)
    api.services.clock = utc_now
    assert api.get(f"operations/{response.json()['id']}", roles=(READ,)).json()["status"] == "Failed"


def test_plans_with_limits_come_from_list_available_plans(api):
    api.standin.set_plans(
        "contoso-offer",
        [make_plan("standard", per_seat=True, min_quantity=5, max_quantity=20), make_plan("gold", per_seat=True)],
    )
    subscription_id = subscribed(api, quantity=6)
    assert api.patch(subscription_id, {"quantity": 4}).json()["error"] == "quantity_out_of_range"
    assert api.patch(subscription_id, {"quantity": 21}).json()["error"] == "quantity_out_of_range"
    assert api.patch(subscription_id, {"planId": "premium"}).json()["error"] == "plan_not_available"
    assert changes_sent(api.standin) == 0


# ---------------------------------------------------------------------------------------------
# ids are case-insensitive at every door (issue 25, defect 1)


def test_upper_case_ids_reach_the_same_subscription_and_operation(api):
    subscription_id = subscribed(api)
    upper = subscription_id.upper()
    assert upper != subscription_id
    view = api.get(f"subscriptions/{upper}", roles=(READ,))
    assert view.status_code == 200, view.text
    assert view.json()["id"] == subscription_id
    plans = api.get(f"subscriptions/{upper}/plans", roles=(READ,))
    assert plans.status_code == 200 and plans.json()["subscriptionId"] == subscription_id

    changed = api.patch(upper, {"planId": "premium"})
    assert changed.status_code == 202, changed.text
    operation_id = changed.json()["id"]
    assert changed.json()["subscriptionId"] == subscription_id
    read = api.get(f"operations/{operation_id.upper()}", roles=(READ,))
    assert read.status_code == 200 and read.json()["id"] == operation_id
    assert api.wait_for(operation_id)["status"] == "Succeeded"
    api.services.follower.wait_idle(10)
    assert api.services.repository.get(subscription_id).record.plan_id == "premium"

    cancelled = api.delete(upper)
    assert cancelled.status_code == 202, cancelled.text
    assert api.wait_for(cancelled.json()["id"])["status"] == "Succeeded"
    api.services.follower.wait_idle(10)
    assert api.services.repository.get(subscription_id).record.status is LocalStatus.UNSUBSCRIBED
    # One record, under the canonical id: nothing was written under the upper-case spelling.
    assert api.services.repository.get(upper.lower()) is not None
    assert publisher_rows(api.services, upper) == []


def test_the_openapi_document_is_served_and_every_answer_here_is_checked_against_it(api):
    from shared.openapi import document_bytes
    from tests import contract

    served = api.http.get(f"{api.base}/openapi.json", timeout=30)
    assert served.status_code == 200 and served.headers["Content-Type"].startswith("application/json")
    assert served.content == document_bytes() and "Authorization" not in served.request.headers
    before = contract.validated
    api.get(f"subscriptions/{uuid.uuid4()}", roles=(READ,))
    api.get("operations/not-a-guid", roles=(READ,))
    api.patch(str(uuid.uuid4()), {"planId": "premium"}, token=None)
    assert contract.validated == before + 3  # the http fixture validated each answer


def test_a_claim_whose_answer_was_lost_is_undone_so_the_retry_goes_through(api, monkeypatch):
    """The claim's transaction landed but its answer did not (a dropped pooled connection: seen in
    the bench as 503 storage_unavailable). The 503 leaves no claim behind and nothing was sent, so
    the caller's retry is accepted instead of being refused as operation_pending."""
    from shared.errors import StorageUnavailableError
    from shared.publisher_store import PublisherOperationStore

    subscription_id = subscribed(api)
    real_claim = PublisherOperationStore.claim

    def claim_then_lose_the_answer(self, stored, operation):
        real_claim(self, stored, operation)  # written at the storage...
        raise StorageUnavailableError("storage failed during claim subscription: ServiceResponseError")  # ...answer lost

    monkeypatch.setattr(PublisherOperationStore, "claim", claim_then_lose_the_answer)
    refused = api.patch(subscription_id, {"quantity": 9})
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"] == "storage_unavailable"
    assert api.services.repository.get(subscription_id).record.pending_operation_id == ""
    assert publisher_rows(api.services, subscription_id) == []
    assert changes_sent(api.standin) == 0

    monkeypatch.setattr(PublisherOperationStore, "claim", real_claim)
    retried = api.patch(subscription_id, {"quantity": 9})
    assert retried.status_code == 202, retried.text
    assert api.wait_for(retried.json()["id"])["status"] == "Succeeded"
    assert changes_sent(api.standin) == 1


def test_an_idempotency_index_whose_answer_was_lost_does_not_hold_up_the_retry_with_the_same_key(api, monkeypatch):
    from shared.errors import StorageUnavailableError
    from shared.publisher_store import PublisherOperationStore

    subscription_id = subscribed(api)
    real_create_index = PublisherOperationStore.create_index

    def create_then_lose_the_answer(self, index):
        real_create_index(self, index)
        raise StorageUnavailableError("storage failed during write operation index: ServiceResponseError")

    monkeypatch.setattr(PublisherOperationStore, "create_index", create_then_lose_the_answer)
    assert api.patch(subscription_id, {"quantity": 9}, key="retry-me").status_code == 503
    monkeypatch.setattr(PublisherOperationStore, "create_index", real_create_index)
    retried = api.patch(subscription_id, {"quantity": 9}, key="retry-me")
    assert retried.status_code == 202, retried.text  # not 409 request_in_progress
    assert api.wait_for(retried.json()["id"])["status"] == "Succeeded"
    assert changes_sent(api.standin) == 1
