"""The marketplace stand-in, exercised over real HTTP with plain ``requests``.

These tests pin the contract the app is developed against (docs/marketplace-fulfillment-v2.md §3-§7),
so a change here is a change of what the app may rely on.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote_plus, urlsplit

import jwt
import pytest
import requests

from devtools.marketplace_standin import API_VERSION, MARKETPLACE_APP_ID, MarketplaceStandIn, make_identity


class WebhookReceiver:
    """A tiny HTTP server that records the webhooks it gets and answers ``status``."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.status = 200
        self._arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver._arrived:
                    receiver.received.append({"headers": dict(self.headers), "body": json.loads(body)})
                    receiver._arrived.notify_all()
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/api/webhook"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout: float = 5.0) -> list[dict]:
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.received) >= count, timeout):
                raise AssertionError(f"got {len(self.received)} of {count} webhooks")
            return list(self.received)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def receiver():
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def _standin(receiver):
    with MarketplaceStandIn(port=0, tenant_id="tenant-under-test", audience="app-under-test") as standin:
        yield standin


@pytest.fixture
def standin(_standin, receiver):
    _standin.reset()
    _standin.webhook_url = receiver.url
    receiver.received.clear()
    receiver.status = 200
    return _standin


@pytest.fixture(scope="module")
def http():
    session = requests.Session()
    session.trust_env = False  # never through a proxy
    yield session
    session.close()


def api(http: requests.Session, standin: MarketplaceStandIn, method: str, path: str, **kwargs) -> requests.Response:
    params = {"api-version": API_VERSION, **kwargs.pop("params", {})}
    return http.request(method, standin.api_base_url + path, params=params, timeout=5, **kwargs)


def eventually(predicate, timeout: float = 3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def subscribed(standin: MarketplaceStandIn, plan_id: str = "standard", quantity: int | None = 5) -> str:
    return standin.seed(1, plan_id=plan_id, quantity=quantity)[0]


# ---- conventions ------------------------------------------------------------------------------


def test_api_version_is_required_and_errors_have_code_message_target(standin, http):
    response = http.get(standin.api_base_url + "/saas/subscriptions", timeout=5)
    assert response.status_code == 400
    assert set(response.json()) == {"code", "message", "target"}
    wrong = http.get(standin.api_base_url + "/saas/subscriptions", params={"api-version": "2020-01-01"}, timeout=5)
    assert wrong.status_code == 400
    assert api(http, standin, "GET", "/saas/subscriptions/", params={"publisherId": "contoso"}).status_code == 200


def test_request_and_correlation_ids_are_echoed_or_generated(standin, http):
    echoed = api(http, standin, "GET", "/saas/subscriptions", headers={"x-ms-requestid": "req-1", "x-ms-correlationid": "corr-1"})
    assert echoed.headers["x-ms-requestid"] == "req-1"
    assert echoed.headers["x-ms-correlationid"] == "corr-1"
    generated = api(http, standin, "GET", "/saas/subscriptions")
    assert generated.headers["x-ms-requestid"] and generated.headers["x-ms-correlationid"]
    entry = standin.last_request("list")
    assert "x-ms-correlationid" not in entry["headers"]
    assert entry["correlationId"] == generated.headers["x-ms-correlationid"]
    assert standin.last_requests[-2]["headers"]["x-ms-requestid"] == "req-1"
    assert standin.calls["list"] == 2


def test_require_bearer_knob(standin, http):
    standin.require_bearer = True
    assert api(http, standin, "GET", "/saas/subscriptions").status_code == 401
    assert api(http, standin, "GET", "/saas/subscriptions", headers={"Authorization": "Bearer x"}).status_code == 200


# ---- resolve ----------------------------------------------------------------------------------


def test_resolve_with_a_token_that_needs_url_encoding(standin, http):
    purchase = standin.create_purchase(plan_id="standard", quantity=7, name="Contoso HR")
    token = purchase["token"]
    while token.startswith("+"):  # 1 in 64: "+" -> " " would be a leading space, which requests refuses to send
        token = standin.new_token(purchase["subscriptionId"])["token"]
    assert {"+", "/", "="} <= set(token)

    # The landing page gets the token percent-encoded; decoding once gives it back intact ...
    query = urlsplit(f"https://landing.example/?token={quote(token, safe='')}").query
    assert parse_qs(query)["token"] == [token]
    response = api(http, standin, "POST", "/saas/subscriptions/resolve", headers={"x-ms-marketplace-token": token})
    assert response.status_code == 200
    resolved = response.json()
    assert resolved["id"] == purchase["subscriptionId"]
    assert (resolved["subscriptionName"], resolved["offerId"], resolved["planId"], resolved["quantity"]) == (
        "Contoso HR",
        "contoso-offer",
        "standard",
        7,
    )
    subscription = resolved["subscription"]
    assert subscription["saasSubscriptionStatus"] == "PendingFulfillmentStart"
    assert "startDate" not in subscription["term"]
    assert subscription["purchaser"] == subscription["beneficiary"]

    # ... while a "+ becomes space" decoding bug does not resolve.
    mangled = api(http, standin, "POST", "/saas/subscriptions/resolve", headers={"x-ms-marketplace-token": unquote_plus(token)})
    assert mangled.status_code == 400


def test_resolve_rejects_missing_unknown_and_expired_tokens(standin, http):
    purchase = standin.create_purchase()
    assert api(http, standin, "POST", "/saas/subscriptions/resolve").json()["code"] == "HeaderNotPresent"
    unknown = api(http, standin, "POST", "/saas/subscriptions/resolve", headers={"x-ms-marketplace-token": "nope"})
    assert unknown.status_code == 400
    standin.expire_token(purchase["token"])
    expired = api(http, standin, "POST", "/saas/subscriptions/resolve", headers={"x-ms-marketplace-token": purchase["token"]})
    assert expired.status_code == 400
    short_lived = standin.create_purchase(token_ttl_seconds=-1)
    assert (
        api(
            http, standin, "POST", "/saas/subscriptions/resolve", headers={"x-ms-marketplace-token": short_lived["token"]}
        ).status_code
        == 400
    )


def test_resolve_works_in_every_status_and_new_tokens_manage_the_account(standin, http):
    purchaser, beneficiary = make_identity("reseller@csp.example"), make_identity("user@customer.example")
    purchase = standin.create_purchase(purchaser=purchaser, beneficiary=beneficiary)
    sid = purchase["subscriptionId"]
    for status in ("Subscribed", "Suspended", "Unsubscribed"):
        standin.set_subscription(sid, status=status)
        token = standin.new_token(sid)["token"]
        resolved = api(http, standin, "POST", "/saas/subscriptions/resolve", headers={"x-ms-marketplace-token": token})
        assert resolved.status_code == 200
        assert resolved.json()["subscription"]["saasSubscriptionStatus"] == status
        assert resolved.json()["subscription"]["purchaser"]["emailId"] == "reseller@csp.example"
        assert "quantity" not in resolved.json()  # "basic" is not priced per seat


# ---- activate ---------------------------------------------------------------------------------


def test_activate_rules(standin, http):
    sid = standin.create_purchase(plan_id="standard", quantity=3)["subscriptionId"]
    path = f"/saas/subscriptions/{sid}/activate"
    assert api(http, standin, "POST", path, json={"planId": "premium"}).status_code == 400
    first = api(http, standin, "POST", path, json={"planId": "standard", "quantity": 3})
    assert (first.status_code, first.content) == (200, b"")
    subscription = standin.get_subscription(sid)
    assert subscription["saasSubscriptionStatus"] == "Subscribed"
    assert subscription["term"]["startDate"] < subscription["term"]["endDate"]
    assert api(http, standin, "POST", path, json={"planId": "standard"}).status_code == 400
    assert standin.activation_count(sid) == 3

    standin.set_subscription(sid, status="Unsubscribed")
    assert api(http, standin, "POST", path, json={}).status_code == 404
    assert api(http, standin, "POST", "/saas/subscriptions/no-such-id/activate", json={}).status_code == 404


def test_activation_can_be_asynchronous_or_fail(standin, http, receiver):
    standin.activation_delay_seconds = 0.2
    sid = standin.create_purchase()["subscriptionId"]
    assert api(http, standin, "POST", f"/saas/subscriptions/{sid}/activate", json={}).status_code == 200
    assert standin.get_subscription(sid)["saasSubscriptionStatus"] == "PendingFulfillmentStart"
    eventually(lambda: standin.get_subscription(sid)["saasSubscriptionStatus"] == "Subscribed")

    standin.activation_delay_seconds, standin.activation_outcome = 0, "fail"
    failing = standin.create_purchase()["subscriptionId"]
    assert api(http, standin, "POST", f"/saas/subscriptions/{failing}/activate", json={}).status_code == 200
    webhook = receiver.wait(1)[0]["body"]
    assert (webhook["subscriptionId"], webhook["action"], webhook["status"]) == (failing, "Unsubscribe", "Succeeded")
    assert standin.get_subscription(failing)["saasSubscriptionStatus"] == "Unsubscribed"


# ---- list, get, plans -------------------------------------------------------------------------


def test_listing_pages_with_next_links(standin, http):
    empty = api(http, standin, "GET", "/saas/subscriptions")
    assert (empty.status_code, empty.content) == (200, b"")

    ids = standin.seed(250)
    pages, url = [], f"{standin.api_base_url}/saas/subscriptions?api-version={API_VERSION}"
    while url:
        body = http.get(url, timeout=5).json()
        pages.append(body["subscriptions"])
        url = body.get("@nextLink")
        if url:
            assert url.startswith(standin.api_base_url + "/saas/subscriptions?")
            query = parse_qs(urlsplit(url).query)
            assert query["api-version"] == [API_VERSION] and query["continuationToken"][0]
    assert [len(page) for page in pages] == [100, 100, 50]
    assert [s["id"] for page in pages for s in page] == ids
    assert standin.calls["list"] == 4

    bad = api(http, standin, "GET", "/saas/subscriptions", params={"continuationToken": "bogus"})
    assert bad.status_code == 400


def test_get_subscription_and_available_plans(standin, http):
    sid = subscribed(standin)
    assert api(http, standin, "GET", f"/saas/subscriptions/{sid}").json()["planId"] == "standard"
    assert api(http, standin, "GET", "/saas/subscriptions/unknown").status_code == 404

    plans = api(http, standin, "GET", f"/saas/subscriptions/{sid}/listAvailablePlans").json()["plans"]
    assert {plan["planId"] for plan in plans} == {"basic", "standard", "premium"}
    standard = next(plan for plan in plans if plan["planId"] == "standard")
    assert (standard["isPricePerSeat"], standard["minQuantity"], standard["maxQuantity"]) == (True, 1, 100)
    assert "recurrentBillingTerms" in standard["planComponents"]
    unknown = api(http, standin, "GET", "/saas/subscriptions/unknown/listAvailablePlans")
    assert (unknown.status_code, unknown.content) == (200, b"")


# ---- publisher-initiated changes --------------------------------------------------------------


def test_change_plan_is_accepted_then_completes_and_sends_a_signed_webhook(standin, http, receiver):
    sid = subscribed(standin, plan_id="basic", quantity=None)
    response = api(
        http,
        standin,
        "PATCH",
        f"/saas/subscriptions/{sid}",
        json={"planId": "standard"},
        headers={"x-ms-correlationid": "change-1"},
    )
    assert response.status_code == 202
    location = response.headers["Operation-Location"]
    operation_id = urlsplit(location).path.split("/")[-1]
    assert location.startswith(f"{standin.api_base_url}/saas/subscriptions/{sid}/operations/")
    assert location.endswith(f"?api-version={API_VERSION}")
    assert response.headers["Operation-Id"] == operation_id

    operation = http.get(location, timeout=5).json()
    assert (operation["status"], operation["action"], operation["operationRequestSource"]) == (
        "InProgress",
        "ChangePlan",
        "Partner",
    )
    assert api(http, standin, "PATCH", f"/saas/subscriptions/{sid}", json={"quantity": 3}).status_code == 400  # locked

    delivery = receiver.wait(1)[0]
    payload = delivery["body"]
    assert (payload["id"], payload["action"], payload["status"], payload["planId"]) == (
        operation_id,
        "ChangePlan",
        "Succeeded",
        "standard",
    )
    assert payload["subscription"]["planId"] == "standard"
    assert payload["purchaseToken"] is None
    assert payload["timeStamp"].endswith("Z") and len(payload["timeStamp"].split(".")[1]) == 8
    assert http.get(location, timeout=5).json()["status"] == "Succeeded"

    claims = verify_webhook_jwt(standin, http, delivery["headers"]["Authorization"])
    assert claims["azp"] == MARKETPLACE_APP_ID

    # PATCHing an operation the publisher started itself: 500, as observed on the real service.
    assert (
        api(
            http, standin, "PATCH", f"/saas/subscriptions/{sid}/operations/{operation_id}", json={"status": "Success"}
        ).status_code
        == 500
    )


def verify_webhook_jwt(standin: MarketplaceStandIn, http: requests.Session, authorization: str) -> dict:
    scheme, _, token = authorization.partition(" ")
    assert scheme == "Bearer"
    metadata = http.get(standin.openid_config_url, timeout=5).json()
    assert metadata["issuer"] == "https://login.microsoftonline.com/tenant-under-test/v2.0"
    key = jwt.PyJWKClient(metadata["jwks_uri"]).get_signing_key_from_jwt(token).key
    return jwt.decode(token, key, algorithms=["RS256"], audience="app-under-test", issuer=metadata["issuer"])


@pytest.mark.parametrize(
    "body, message",
    [
        ({"planId": "premium", "quantity": 2}, "Cannot patch more than one field in the same request"),
        ({"planId": "standard"}, "already subscribed to plan"),
        ({"planId": "gold"}, "NOT in Catalog"),
        ({"quantity": 5}, "same"),
        ({"quantity": 500}, "between"),
        ({}, "required"),
    ],
)
def test_change_validation(standin, http, body, message):
    sid = subscribed(standin, plan_id="standard", quantity=5)
    response = api(http, standin, "PATCH", f"/saas/subscriptions/{sid}", json=body)
    assert response.status_code == 400
    assert message in response.json()["message"]


def test_change_needs_a_subscribed_subscription(standin, http):
    sid = standin.create_purchase(plan_id="standard")["subscriptionId"]
    assert api(http, standin, "PATCH", f"/saas/subscriptions/{sid}", json={"quantity": 9}).status_code == 400
    assert api(http, standin, "PATCH", "/saas/subscriptions/unknown", json={"quantity": 9}).status_code == 404


def test_delete_unsubscribes_asynchronously(standin, http, receiver):
    sid = subscribed(standin)
    response = api(http, standin, "DELETE", f"/saas/subscriptions/{sid}")
    assert response.status_code == 202 and "Operation-Location" in response.headers
    payload = receiver.wait(1)[0]["body"]
    assert (payload["action"], payload["status"]) == ("Unsubscribe", "Succeeded")
    assert payload["subscription"]["saasSubscriptionStatus"] == "Unsubscribed"
    assert api(http, standin, "DELETE", f"/saas/subscriptions/{sid}").status_code == 400


# ---- Microsoft-initiated operations and the ACK -------------------------------------------------


def test_marketplace_change_plan_then_patch_success_and_conflict(standin, http, receiver):
    sid = subscribed(standin, plan_id="standard", quantity=5)
    operation = standin.trigger(sid, "ChangePlan", plan_id="premium")
    payload = receiver.wait(1)[0]["body"]
    assert (payload["status"], payload["planId"], payload["subscription"]["planId"]) == ("InProgress", "premium", "standard")
    assert payload["operationRequestSource"] == "Azure"

    outstanding = api(http, standin, "GET", f"/saas/subscriptions/{sid}/operations").json()["operations"]
    assert [op["id"] for op in outstanding] == [operation["id"]]
    fetched = api(http, standin, "GET", f"/saas/subscriptions/{sid}/operations/{operation['id']}").json()
    assert set(fetched) >= {
        "id",
        "activityId",
        "subscriptionId",
        "offerId",
        "publisherId",
        "planId",
        "quantity",
        "action",
        "timeStamp",
        "status",
        "operationRequestSource",
        "errorStatusCode",
        "errorMessage",
    }

    path = f"/saas/subscriptions/{sid}/operations/{operation['id']}"
    assert api(http, standin, "PATCH", path, json={"status": "Succeeded"}).status_code == 400
    assert api(http, standin, "PATCH", path, json={"status": "Success"}).status_code == 200
    assert standin.get_subscription(sid)["planId"] == "premium"
    assert standin.get_operation(operation["id"])["status"] == "Succeeded"
    assert api(http, standin, "PATCH", path, json={"status": "Failure"}).status_code == 409
    assert api(http, standin, "GET", f"/saas/subscriptions/{sid}/operations").json() == {"operations": []}
    assert [(p["status"], p["responseStatus"]) for p in standin.patches] == [
        ("Succeeded", 400),
        ("Success", 200),
        ("Failure", 409),
    ]


def test_patch_failure_keeps_the_old_values(standin, http):
    sid = subscribed(standin, plan_id="standard", quantity=5)
    operation = standin.trigger(sid, "ChangeQuantity", quantity=9, deliver=False)
    assert operation["quantity"] == 9 and operation["status"] == "InProgress"
    response = api(http, standin, "PATCH", f"/saas/subscriptions/{sid}/operations/{operation['id']}", json={"status": "Failure"})
    assert response.status_code == 200
    assert standin.get_operation(operation["id"])["status"] == "Failed"
    assert standin.get_subscription(sid)["quantity"] == 5


def test_unpatched_changes_are_auto_accepted_but_reinstate_waits(standin, http):
    standin.auto_accept_seconds = 0.1
    sid = subscribed(standin)
    change = standin.trigger(sid, "ChangeQuantity", quantity=8, deliver=False)
    eventually(lambda: standin.get_operation(change["id"])["status"] == "Succeeded")
    assert standin.get_subscription(sid)["quantity"] == 8

    standin.set_subscription(sid, status="Suspended")
    reinstate = standin.trigger(sid, "Reinstate", deliver=False)
    time.sleep(0.3)
    assert standin.get_operation(reinstate["id"])["status"] == "InProgress"
    assert (
        api(
            http, standin, "PATCH", f"/saas/subscriptions/{sid}/operations/{reinstate['id']}", json={"status": "Success"}
        ).status_code
        == 200
    )
    assert standin.get_subscription(sid)["saasSubscriptionStatus"] == "Subscribed"


def test_a_4xx_webhook_answer_rejects_a_change(standin, receiver):
    receiver.status = 401
    sid = subscribed(standin, quantity=5)
    operation = standin.trigger(sid, "ChangeQuantity", quantity=6)
    assert operation["status"] == "Failed"
    assert standin.get_subscription(sid)["quantity"] == 5
    assert standin.webhook_deliveries == [(operation["id"], 401)]


def test_notification_actions_apply_at_once(standin, receiver):
    sid = subscribed(standin)
    term = standin.get_subscription(sid)["term"]
    renew = standin.trigger(sid, "Renew")
    renewed = standin.get_subscription(sid)["term"]
    assert renew["status"] == "Succeeded" and renewed["startDate"] > term["endDate"][:10]
    standin.trigger(sid, "Suspend")
    assert standin.get_subscription(sid)["saasSubscriptionStatus"] == "Suspended"
    standin.trigger(sid, "Unsubscribe")
    assert standin.get_subscription(sid)["saasSubscriptionStatus"] == "Unsubscribed"
    assert [w["body"]["action"] for w in receiver.wait(3)] == ["Renew", "Suspend", "Unsubscribe"]
    assert all(w["body"]["status"] == "Succeeded" for w in receiver.received)


def test_duplicate_and_concurrent_deliveries(standin, receiver):
    sids = standin.seed(5)
    operations = [standin.trigger(sid, "Suspend", deliver=False)["id"] for sid in sids]
    assert standin.deliver(operations[0], times=3) == [200, 200, 200]
    assert standin.deliver_many(operations[1:], concurrency=4) == [200] * 4
    bodies = [w["body"] for w in receiver.wait(7)]
    assert [b for b in bodies if b["id"] == operations[0]] == [bodies[0]] * 3
    assert len(standin.webhook_deliveries) == 7


def test_failed_deliveries_are_retried_when_asked(standin, receiver):
    receiver.status = 500
    standin.webhook_retries, standin.webhook_retry_delay_seconds = 2, 0.01
    operation = standin.trigger(subscribed(standin), "Suspend")
    assert standin.webhook_deliveries == [(operation["id"], 500)] * 3
    standin.webhook_url = "http://127.0.0.1:9/unreachable"
    standin.webhook_retries = 0
    assert standin.deliver(operation["id"]) == [None]


def test_operations_of_unknown_subscriptions(standin, http):
    assert api(http, standin, "GET", "/saas/subscriptions/unknown/operations").json() == {"operations": []}
    sid = subscribed(standin)
    assert api(http, standin, "GET", f"/saas/subscriptions/{sid}/operations/unknown").status_code == 404


# ---- JWT --------------------------------------------------------------------------------------


def test_tokens_verify_against_the_served_keys_in_both_versions(standin, http):
    v1_metadata = http.get(f"{standin.url}/tenant-under-test/.well-known/openid-configuration", timeout=5).json()
    assert v1_metadata["issuer"] == "https://sts.windows.net/tenant-under-test/"
    v1 = standin.sign_token(version="1.0")
    key = jwt.PyJWKClient(v1_metadata["jwks_uri"]).get_signing_key_from_jwt(v1).key
    claims = jwt.decode(v1, key, algorithms=["RS256"], audience="app-under-test", issuer=v1_metadata["issuer"])
    assert (claims["appid"], claims["ver"], claims["tid"]) == (MARKETPLACE_APP_ID, "1.0", "tenant-under-test")

    v2 = standin.sign_token({"tid": "someone-else", "oid": None})
    claims = verify_webhook_jwt(standin, http, f"Bearer {v2}")
    assert claims["tid"] == "someone-else" and "oid" not in claims and claims["exp"] > time.time() + 3000

    forged = standin.sign_token(key=standin.other_key())
    with pytest.raises(jwt.InvalidSignatureError):
        verify_webhook_jwt(standin, http, f"Bearer {forged}")

    old_kid = jwt.get_unverified_header(v2)["kid"]
    new_kid = standin.rotate_key()
    rotated = standin.sign_token()
    assert jwt.get_unverified_header(rotated)["kid"] == new_kid != old_kid
    assert {k["kid"] for k in http.get(standin.jwks_url, timeout=5).json()["keys"]} == {old_kid, new_kid}
    verify_webhook_jwt(standin, http, f"Bearer {rotated}")


# ---- faults -----------------------------------------------------------------------------------


def test_throttling_and_unavailability_faults(standin, http):
    standin.fail_next(1, status=429, retry_after=2)
    throttled = api(http, standin, "GET", "/saas/subscriptions")
    assert (throttled.status_code, throttled.headers["Retry-After"]) == (429, "2")
    assert throttled.headers["x-ms-requestid"]
    assert api(http, standin, "GET", "/saas/subscriptions").status_code == 200

    standin.fail_next(2, status=503, path_contains="/resolve")
    assert api(http, standin, "GET", "/saas/subscriptions").status_code == 200
    assert [api(http, standin, "POST", "/saas/subscriptions/resolve").status_code for _ in range(3)] == [503, 503, 400]
    assert standin.calls["resolve"] == 3


def test_a_page_in_the_middle_of_a_listing_fails_once(standin, http):
    standin.seed(250)
    standin.fail_after(1, times=1, status=500, path_contains="continuationToken")  # page 3
    first = api(http, standin, "GET", "/saas/subscriptions").json()
    second = http.get(first["@nextLink"], timeout=5).json()
    assert http.get(second["@nextLink"], timeout=5).status_code == 500
    assert len(http.get(second["@nextLink"], timeout=5).json()["subscriptions"]) == 50


def test_a_processed_request_whose_answer_is_lost(standin, http):
    sid = standin.create_purchase()["subscriptionId"]
    standin.fail_next(1, status=500, path_contains="/activate", process=True)
    assert api(http, standin, "POST", f"/saas/subscriptions/{sid}/activate", json={}).status_code == 500
    assert standin.get_subscription(sid)["saasSubscriptionStatus"] == "Subscribed"


# ---- control endpoints ------------------------------------------------------------------------


def test_control_endpoints(standin, http, receiver):
    control = standin.url + "/_control"
    purchase = http.post(f"{control}/purchases", json={"planId": "standard", "quantity": 4}, timeout=5).json()
    assert {"token", "subscriptionId"} <= set(purchase)
    sid = purchase["subscriptionId"]
    assert (
        http.post(f"{control}/seed", json={"count": 3, "status": "Suspended"}, timeout=5).json()["subscriptionIds"].__len__() == 3
    )
    http.post(f"{control}/subscriptions/{sid}", json={"status": "Subscribed"}, timeout=5).raise_for_status()
    operation = http.post(
        f"{control}/subscriptions/{sid}/actions", json={"action": "ChangeQuantity", "quantity": 6}, timeout=5
    ).json()
    assert operation["status"] == "InProgress" and operation["webhookStatusCodes"] == [200]
    assert receiver.wait(1)[0]["body"]["quantity"] == 6
    assert http.post(f"{control}/operations/{operation['id']}/deliver", json={"times": 2}, timeout=5).json() == {
        "statusCodes": [200, 200]
    }

    state = http.post(f"{control}/faults", json={"pageSize": 2, "failNext": {"n": 1, "status": 503}}, timeout=5).json()
    assert state["knobs"]["page_size"] == 2 and state["faults"] == 1
    assert api(http, standin, "GET", "/saas/subscriptions").status_code == 503
    assert len(api(http, standin, "GET", "/saas/subscriptions").json()["subscriptions"]) == 2
    assert http.post(f"{control}/faults", json={"nonsense": 1}, timeout=5).status_code == 400
    assert http.post(f"{control}/subscriptions/unknown/actions", json={"action": "Suspend"}, timeout=5).status_code == 404

    record = http.get(f"{control}/subscriptions/{sid}", timeout=5).json()
    assert record["activateCalls"] == 0 and len(record["operations"]) == 1
    state = http.get(f"{control}/state", timeout=5).json()
    assert (state["subscriptions"], state["deliveries"]) == (4, 3)
    assert http.get(f"{control}/deliveries", timeout=5).json()["deliveries"][0]["statusCode"] == 200
    assert http.post(f"{control}/reset", timeout=5).status_code == 200
    assert http.get(f"{control}/state", timeout=5).json()["subscriptions"] == 0
    assert standin.page_size == 100
