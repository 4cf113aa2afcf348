"""MarketplaceClient against the marketplace stand-in over real HTTP (docs/marketplace-fulfillment-v2.md §3-§5, §10).

Every call of the client, the retry policy per call (what may be repeated and what may not),
error details, request/correlation ids, the publisherId query and the timeouts.
"""

from __future__ import annotations

import socket
import time
import uuid
from urllib.parse import parse_qs, urlsplit

import pytest

from shared.domain import Action, OperationStatus, SubscriptionStatus, UpdateStatus
from shared.errors import (
    MarketplaceBadRequestError,
    MarketplaceConflictError,
    MarketplaceError,
    MarketplaceNotFoundError,
    MarketplaceThrottledError,
    MarketplaceUnauthorizedError,
    MarketplaceUnavailableError,
)
from shared.marketplace import MarketplaceClient, RetryPolicy, operation_id_from_location
from shared.observability import correlation

FAST = dict(backoff_factor=0.05, jitter=0.0, connect_timeout=2.0, read_timeout=5.0)


@pytest.fixture
def make_client(standin):
    clients = []

    def make(publisher_id: str = "", base_url: str | None = None, token_provider=None, **policy) -> MarketplaceClient:
        client = MarketplaceClient(
            base_url or standin.api_base_url,
            publisher_id=publisher_id,
            token_provider=token_provider,
            retry=RetryPolicy(**{**FAST, **policy}),
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client):
    return make_client()


def api_requests(standin, kind: str | None = None) -> list[dict]:
    return [entry for entry in standin.last_requests if entry["kind"] != "unknown" and kind in (None, entry["kind"])]


def query_of(entry: dict) -> dict[str, list[str]]:
    return parse_qs(urlsplit(entry["path"]).query)


# --- every call -----------------------------------------------------------------------------------


def test_resolve_sends_the_token_verbatim(standin, client):
    purchase = standin.create_purchase(plan_id="standard", quantity=5, name="Contoso Analytics")
    token = purchase["token"]
    assert "+" in token and "/" in token and token.endswith("==")

    resolved = client.resolve(token)

    assert resolved.subscription_id == purchase["subscriptionId"]
    assert resolved.subscription_name == "Contoso Analytics"
    assert resolved.plan_id == "standard"
    assert resolved.quantity == 5
    assert resolved.subscription.status is SubscriptionStatus.PENDING_FULFILLMENT_START
    assert resolved.subscription.term.start_date is None
    sent = standin.last_request("resolve")
    assert sent["method"] == "POST"
    assert sent["headers"]["x-ms-marketplace-token"] == token  # not re-encoded, not unquoted
    assert sent["status"] == 200
    assert standin.calls["resolve"] == 1


def test_resolve_with_an_expired_token_is_a_bad_request_not_retried(standin, client):
    purchase = standin.create_purchase()
    standin.expire_token(purchase["token"])
    with pytest.raises(MarketplaceBadRequestError) as error:
        client.resolve(purchase["token"])
    assert error.value.status == 400
    assert error.value.error_code == "InvalidValue"
    assert standin.calls["resolve"] == 1


def test_activate(standin, client):
    purchase = standin.create_purchase(plan_id="standard", quantity=3)
    sid = purchase["subscriptionId"]
    client.activate(sid, "standard", 3)
    assert standin.get_subscription(sid)["saasSubscriptionStatus"] == "Subscribed"
    assert standin.activation_count(sid) == 1
    sent = standin.last_request("activate")
    assert sent["method"] == "POST" and sent["path"].startswith(f"/api/saas/subscriptions/{sid}/activate?")

    with pytest.raises(MarketplaceBadRequestError) as error:  # a second Activate: already Subscribed
        client.activate(sid, "standard", 3)
    assert error.value.status == 400
    assert standin.activation_count(sid) == 2


def test_activate_with_another_plan_is_refused(standin, client):
    sid = standin.create_purchase(plan_id="basic")["subscriptionId"]
    with pytest.raises(MarketplaceBadRequestError) as error:
        client.activate(sid, "premium")
    assert error.value.error_code == "BadRequest"
    assert "plan" in error.value.error_message.lower()
    assert standin.get_subscription(sid)["saasSubscriptionStatus"] == "PendingFulfillmentStart"


def test_activate_an_unsubscribed_subscription_is_not_found(standin, client):
    sid = standin.seed(1, status="Unsubscribed")[0]
    with pytest.raises(MarketplaceNotFoundError):
        client.activate(sid)


def test_list_subscriptions_follows_paging(standin, client):
    ids = standin.seed(260)
    assert standin.page_size == 100
    listed = [subscription.id for subscription in client.list_subscriptions()]
    assert listed == ids  # all, in order, none twice
    assert standin.calls["list"] == 3
    requests_made = api_requests(standin, "list")
    assert "continuationToken" not in requests_made[0]["path"]
    assert all("continuationToken=" in entry["path"] for entry in requests_made[1:])
    for entry in requests_made:
        assert query_of(entry)["api-version"] == ["2018-08-31"]  # once, not appended twice to @nextLink


def test_list_subscription_pages(standin, client):
    ids = standin.seed(260, status="Suspended")
    pages = list(client.list_subscription_pages())
    assert [len(page) for page, _ in pages] == [100, 100, 60]
    links = [link for _, link in pages]
    assert links[0] and links[1] and links[2] == ""
    assert [s.id for page, _ in pages for s in page] == ids
    assert all(s.status is SubscriptionStatus.SUSPENDED for page, _ in pages for s in page)

    # a run can resume from a saved @nextLink (the reconciler's checkpoint)
    resumed = list(client.list_subscription_pages(links[0]))
    assert [len(page) for page, _ in resumed] == [100, 60]
    assert [s.id for page, _ in resumed for s in page] == ids[100:]


def test_list_with_a_small_page_size(standin, client):
    standin.page_size = 7
    ids = standin.seed(251)
    assert [s.id for s in client.list_subscriptions()] == ids
    assert standin.calls["list"] == 36


def test_list_survives_a_failing_page(standin, client):
    ids = standin.seed(260)
    standin.fail_after(1, 1, 503, "continuationToken")  # page 3 fails once
    assert [s.id for s in client.list_subscriptions()] == ids
    assert standin.calls["list"] == 4


def test_empty_body_means_no_subscriptions(standin, client):
    assert list(client.list_subscriptions()) == []
    assert list(client.list_subscription_pages()) == []
    entry = standin.last_request("list")
    assert entry["status"] == 200
    assert standin.calls["list"] == 2  # one request per listing, no retry of an empty answer


def test_get_subscription(standin, client):
    purchase = standin.create_purchase(
        plan_id="standard", quantity=4, term_unit="P1Y", extra={"allowedCustomerOperations": ["Read"], "futureField": 1}
    )
    sid = purchase["subscriptionId"]
    subscription = client.get_subscription(sid)
    assert subscription.id == sid
    assert subscription.status is SubscriptionStatus.PENDING_FULFILLMENT_START
    assert subscription.plan_id == "standard"
    assert subscription.quantity == 4
    assert subscription.term.term_unit == "P1Y"
    assert subscription.allowed_customer_operations == ("Read",)
    assert subscription.raw["futureField"] == 1


def test_get_unknown_subscription(standin, client):
    with pytest.raises(MarketplaceNotFoundError) as error:
        client.get_subscription(str(uuid.uuid4()))
    assert error.value.status == 404
    assert error.value.error_code == "EntityNotFound"
    assert standin.calls["get"] == 1  # 404 is not retried


def test_list_available_plans(standin, client):
    sid = standin.seed(1)[0]
    plans = {plan.plan_id: plan for plan in client.list_available_plans(sid)}
    assert set(plans) == {"basic", "standard", "premium"}
    assert plans["standard"].is_price_per_seat is True
    assert plans["standard"].min_quantity == 1 and plans["standard"].max_quantity == 100
    assert plans["basic"].is_price_per_seat is False
    assert client.list_available_plans(str(uuid.uuid4())) == []  # documented: empty body for unknown ids


def test_change_plan_returns_the_operation_id(standin, client):
    sid = standin.seed(1, plan_id="basic")[0]
    operation_id = client.change_plan(sid, "premium")
    operation = standin.get_operation(operation_id)
    assert operation["action"] == "ChangePlan"
    assert operation["planId"] == "premium"
    assert operation["operationRequestSource"] == "Partner"
    assert [op["id"] for op in standin.operations_for(sid)] == [operation_id]
    sent = standin.last_request("update")
    assert sent["method"] == "PATCH"
    assert urlsplit(sent["path"]).path == f"/api/saas/subscriptions/{sid}"


def test_change_quantity_returns_the_operation_id(standin, client):
    sid = standin.seed(1, plan_id="standard", quantity=5)[0]
    operation_id = client.change_quantity(sid, 8)
    operation = standin.get_operation(operation_id)
    assert operation["action"] == "ChangeQuantity"
    assert operation["quantity"] == 8


def test_change_refused_by_marketplace(standin, client):
    sid = standin.seed(1, plan_id="basic")[0]
    with pytest.raises(MarketplaceBadRequestError):
        client.change_plan(sid, "basic")  # same as current
    with pytest.raises(MarketplaceBadRequestError):
        client.change_quantity(sid, 3)  # basic is not per seat
    assert standin.operations_for(sid) == []


def test_delete_subscription(standin, client):
    sid = standin.seed(1)[0]
    operation_id = client.delete_subscription(sid)
    operation = standin.get_operation(operation_id)
    assert operation["action"] == "Unsubscribe"
    assert operation["subscriptionId"] == sid
    assert standin.last_request("delete")["method"] == "DELETE"


def test_operations_list_get_and_update(standin, client):
    sid = standin.seed(1, plan_id="basic")[0]
    triggered = standin.trigger(sid, "ChangePlan", plan_id="premium", deliver=False)

    outstanding = client.list_outstanding_operations(sid)
    assert [op.id for op in outstanding] == [triggered["id"]]
    assert outstanding[0].action is Action.CHANGE_PLAN
    assert outstanding[0].status is OperationStatus.IN_PROGRESS

    operation = client.get_operation(sid, triggered["id"])
    assert operation.id == triggered["id"]
    assert operation.subscription_id == sid
    assert operation.plan_id == "premium"
    assert operation.status is OperationStatus.IN_PROGRESS
    assert operation.request_source == "Azure"
    assert operation.timestamp is not None

    client.update_operation(sid, triggered["id"], UpdateStatus.SUCCESS)
    assert standin.patches[-1]["status"] == "Success"
    assert standin.patches[-1]["responseStatus"] == 200
    assert standin.get_subscription(sid)["planId"] == "premium"
    assert client.get_operation(sid, triggered["id"]).status is OperationStatus.SUCCEEDED
    assert client.list_outstanding_operations(sid) == []


def test_update_operation_failure(standin, client):
    sid = standin.seed(1, status="Suspended")[0]
    triggered = standin.trigger(sid, "Reinstate", deliver=False)
    client.update_operation(sid, triggered["id"], "Failure")  # the plain word is accepted too
    assert standin.patches[-1]["status"] == "Failure"
    assert client.get_operation(sid, triggered["id"]).status is OperationStatus.FAILED
    assert standin.get_subscription(sid)["saasSubscriptionStatus"] == "Suspended"


def test_update_operation_rejects_unknown_words(client):
    with pytest.raises(ValueError):
        client.update_operation("sid", "oid", "Succeeded")  # the operation status word, not the PATCH word


def test_update_settled_operation_is_a_conflict(standin, client):
    sid = standin.seed(1, plan_id="basic")[0]
    triggered = standin.trigger(sid, "ChangePlan", plan_id="standard", deliver=False)
    client.update_operation(sid, triggered["id"], UpdateStatus.SUCCESS)
    with pytest.raises(MarketplaceConflictError) as error:
        client.update_operation(sid, triggered["id"], UpdateStatus.FAILURE)
    assert error.value.status == 409
    assert error.value.error_code == "Conflict"
    assert standin.calls["patch_operation"] == 2  # 409 is final, never retried


def test_unknown_operation(standin, client):
    sid = standin.seed(1)[0]
    with pytest.raises(MarketplaceNotFoundError):
        client.get_operation(sid, str(uuid.uuid4()))
    assert client.list_outstanding_operations(str(uuid.uuid4())) == []  # observed: empty list, not 404


def test_operation_id_from_location():
    location = "https://marketplaceapi.microsoft.com/api/saas/subscriptions/sid/operations/op-123?api-version=2018-08-31"
    assert operation_id_from_location(location) == "op-123"
    assert operation_id_from_location(location.replace("?", "/?")) == "op-123"
    assert operation_id_from_location("") == ""


def test_bearer_token_is_sent(standin, make_client):
    standin.require_bearer = True
    sid = standin.seed(1)[0]
    calls = []

    def provider() -> str:
        calls.append(1)
        return "access-token-123"

    assert make_client(token_provider=provider).get_subscription(sid).id == sid
    assert standin.last_request("get")["headers"]["authorization"] == "Bearer access-token-123"
    assert calls == [1]
    with pytest.raises(MarketplaceUnauthorizedError) as error:
        make_client().get_subscription(sid)
    assert error.value.status == 401
    assert standin.calls["get"] == 2  # 401 is not retried


# --- retries ------------------------------------------------------------------------------------


def test_429_with_retry_after_is_honoured(standin, client):
    sid = standin.seed(1)[0]
    standin.fail_next(1, 429, retry_after=1)
    started = time.monotonic()
    assert client.get_subscription(sid).id == sid
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 4.0
    assert standin.calls["get"] == 2


def test_retry_after_is_capped(standin, make_client):
    sid = standin.seed(1)[0]
    client = make_client(max_retry_after=0.3)
    standin.fail_next(1, 429, retry_after=30)
    started = time.monotonic()
    assert client.get_subscription(sid).id == sid
    assert time.monotonic() - started < 3.0
    assert standin.calls["get"] == 2


def test_unparseable_retry_after_falls_back_to_backoff(standin, client):
    """Retry-After must be whole seconds or an HTTP date; "0.5" must not fail the call (urllib3 raises)."""
    sid = standin.seed(1)[0]
    standin.fail_next(1, 429, retry_after=0.5)
    assert client.get_subscription(sid).id == sid
    assert standin.calls["get"] == 2


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_transient_server_errors_are_retried_for_reads(standin, client, status):
    sid = standin.seed(1)[0]
    standin.fail_next(1, status)
    assert client.get_subscription(sid).id == sid
    assert standin.calls["get"] == 2


def test_503_then_200(standin, client):
    sid = standin.seed(1)[0]
    standin.fail_next(2, 503)
    assert client.get_subscription(sid).id == sid
    assert standin.calls["get"] == 3


def test_retries_are_bounded(standin, make_client):
    sid = standin.seed(1)[0]
    client = make_client(attempts=2)
    standin.fail_next(10, 503)
    with correlation("cid-exhausted"), pytest.raises(MarketplaceUnavailableError) as error:
        client.get_subscription(sid)
    assert standin.calls["get"] == 3  # the first try and two retries
    assert error.value.status == 503
    assert error.value.error_code == "ServiceUnavailable"
    assert error.value.correlation_id == "cid-exhausted"
    assert error.value.request_id == standin.last_request("get")["requestId"]


def test_429_that_outlasts_the_retries(standin, make_client):
    sid = standin.seed(1)[0]
    client = make_client(attempts=1)
    standin.fail_next(5, 429, retry_after=0.1)
    with pytest.raises(MarketplaceThrottledError) as error:
        client.get_subscription(sid)
    assert error.value.status == 429
    assert error.value.http_status == 503
    assert standin.calls["get"] == 2


@pytest.mark.parametrize(
    "status, error_type",
    [
        (400, MarketplaceBadRequestError),
        (403, MarketplaceUnauthorizedError),
        (404, MarketplaceNotFoundError),
        (409, MarketplaceConflictError),
    ],
)
def test_client_errors_are_not_retried(standin, client, status, error_type):
    sid = standin.seed(1)[0]
    standin.fail_next(1, status)
    with pytest.raises(error_type) as error:
        client.get_subscription(sid)
    assert error.value.status == status
    assert error.value.error_code == "InjectedFault"
    assert standin.calls["get"] == 1


def test_other_statuses_map_to_the_base_error(standin, client):
    sid = standin.seed(1)[0]
    standin.fail_next(1, 418)
    with pytest.raises(MarketplaceError) as error:
        client.get_subscription(sid)
    assert type(error.value) is MarketplaceError
    assert error.value.status == 418


def test_activate_and_resolve_are_retried(standin, client):
    purchase = standin.create_purchase()
    standin.fail_next(1, 503, path_contains="/resolve")
    assert client.resolve(purchase["token"]).subscription_id == purchase["subscriptionId"]
    assert standin.calls["resolve"] == 2
    standin.fail_next(1, 500, path_contains="/activate")
    client.activate(purchase["subscriptionId"])
    assert standin.calls["activate"] == 2
    assert standin.get_subscription(purchase["subscriptionId"])["saasSubscriptionStatus"] == "Subscribed"


def test_update_operation_is_retried(standin, client):
    sid = standin.seed(1, plan_id="basic")[0]
    triggered = standin.trigger(sid, "ChangePlan", plan_id="premium", deliver=False)
    standin.fail_next(1, 503, path_contains="/operations/")
    client.update_operation(sid, triggered["id"], UpdateStatus.SUCCESS)
    assert standin.calls["patch_operation"] == 2
    assert standin.get_subscription(sid)["planId"] == "premium"


@pytest.mark.parametrize("retry_after", [None, 1])
def test_patch_subscription_not_retried_on_503(standin, client, retry_after):
    sid = standin.seed(1, plan_id="basic")[0]
    standin.fail_next(1, 503, path_contains=sid, retry_after=retry_after)
    with pytest.raises(MarketplaceUnavailableError) as error:
        client.change_plan(sid, "premium")
    assert error.value.status == 503
    assert standin.calls["update"] == 1
    assert standin.operations_for(sid) == []


def test_patch_subscription_with_a_lost_answer_is_not_repeated(standin, client):
    sid = standin.seed(1, plan_id="standard", quantity=5)[0]
    standin.fail_next(1, 500, path_contains=sid, process=True)  # Microsoft did it, the answer was lost
    with pytest.raises(MarketplaceUnavailableError):
        client.change_quantity(sid, 9)
    assert standin.calls["update"] == 1
    assert len(standin.operations_for(sid)) == 1  # no second operation was started


def test_patch_subscription_retried_on_429(standin, client):
    sid = standin.seed(1, plan_id="basic")[0]
    standin.fail_next(1, 429, path_contains=sid, retry_after=0.2)
    operation_id = client.change_plan(sid, "premium")
    assert standin.calls["update"] == 2
    assert [op["id"] for op in standin.operations_for(sid)] == [operation_id]


@pytest.mark.parametrize("status", [500, 503])
def test_delete_not_retried_on_server_errors(standin, client, status):
    sid = standin.seed(1)[0]
    standin.fail_next(1, status, path_contains=sid)
    with pytest.raises(MarketplaceUnavailableError):
        client.delete_subscription(sid)
    assert standin.calls["delete"] == 1
    assert standin.operations_for(sid) == []


# --- ids on requests and errors --------------------------------------------------------------------


def test_errors_carry_status_code_request_and_correlation(standin, client):
    unknown = str(uuid.uuid4())
    with correlation("cid-errors-1"), pytest.raises(MarketplaceNotFoundError) as error:
        client.get_subscription(unknown)
    sent = standin.last_request("get")
    assert error.value.status == 404
    assert error.value.error_code == "EntityNotFound"
    assert unknown in error.value.error_message
    assert error.value.request_id == sent["requestId"] == sent["headers"]["x-ms-requestid"]
    assert error.value.correlation_id == "cid-errors-1"
    assert error.value.operation == "get_subscription"
    text = str(error.value)
    assert sent["requestId"] in text and "cid-errors-1" in text and "EntityNotFound" in text


def test_request_ids_differ_and_correlation_id_is_the_current_one(standin, client):
    sid = standin.seed(1)[0]
    with correlation("cid-shared") as cid:
        client.get_subscription(sid)
        client.list_available_plans(sid)
        client.list_outstanding_operations(sid)
        list(client.list_subscriptions())
    entries = api_requests(standin)
    assert len(entries) == 4
    request_ids = [entry["headers"]["x-ms-requestid"] for entry in entries]
    assert len(set(request_ids)) == 4
    for request_id in request_ids:
        uuid.UUID(request_id)
    assert {entry["headers"]["x-ms-correlationid"] for entry in entries} == {cid}
    assert {entry["correlationId"] for entry in entries} == {"cid-shared"}


def test_without_a_unit_of_work_each_call_gets_its_own_correlation_id(standin, client):
    sid = standin.seed(1)[0]
    client.get_subscription(sid)
    client.get_subscription(sid)
    ids = [entry["headers"]["x-ms-correlationid"] for entry in api_requests(standin, "get")]
    assert len(ids) == 2 and all(ids) and ids[0] != ids[1]


def test_common_headers_and_api_version(standin, client):
    sid = standin.seed(1)[0]
    client.get_subscription(sid)
    sent = standin.last_request("get")
    assert sent["headers"]["content-type"] == "application/json"
    assert sent["headers"]["accept"] == "application/json"
    assert "authorization" not in sent["headers"]  # MARKETPLACE_AUTH=none: no token provider
    assert query_of(sent) == {"api-version": ["2018-08-31"]}


def test_publisher_id_sent_when_configured(standin, make_client):
    standin.seed(120)
    client = make_client(publisher_id="contoso")
    sid = next(iter(client.list_subscriptions())).id
    assert len(list(client.list_subscriptions())) == 120
    client.get_subscription(sid)
    client.list_available_plans(sid)
    for entry in api_requests(standin):
        query = query_of(entry)
        assert query["publisherId"] == ["contoso"], entry["path"]
        assert query["api-version"] == ["2018-08-31"]


def test_publisher_id_absent_by_default(standin, client):
    sid = standin.seed(1)[0]
    client.get_subscription(sid)
    assert "publisherId" not in query_of(standin.last_request("get"))


def test_call_counter_counts_calls(standin, client):
    sid = standin.seed(1)[0]
    standin.fail_next(1, 503)
    client.get_subscription(sid)
    client.list_available_plans(sid)
    assert client.counter.counts == {"get_subscription": 1, "list_plans": 1}  # calls, not attempts
    assert client.counter.total == 2


# --- timeouts --------------------------------------------------------------------------------------


def test_timeouts_are_set_by_default():
    policy = RetryPolicy()
    assert 0 < policy.connect_timeout <= 10
    assert 0 < policy.read_timeout <= 60


def test_read_timeout(standin, make_client):
    sid = standin.seed(1)[0]
    client = make_client(read_timeout=0.3, attempts=1)
    standin.latency_seconds = 1.5
    started = time.monotonic()
    with pytest.raises(MarketplaceUnavailableError) as error:
        client.get_subscription(sid)
    elapsed = time.monotonic() - started
    assert elapsed < 1.4  # gave up before the stand-in answered
    assert standin.calls["get"] == 2  # a read may be repeated after a timeout
    assert error.value.request_id and error.value.correlation_id
    assert "Read timed out" in repr(error.value.__cause__)


def test_read_timeout_on_patch_subscription_is_not_repeated(standin, make_client):
    sid = standin.seed(1, plan_id="basic")[0]
    client = make_client(read_timeout=0.3, attempts=3)
    standin.latency_seconds = 1.0
    with pytest.raises(MarketplaceUnavailableError):
        client.change_plan(sid, "premium")
    assert standin.calls["update"] == 1
    deadline = time.monotonic() + 5
    while not standin.operations_for(sid) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert len(standin.operations_for(sid)) == 1  # the slow request did land, exactly once


@pytest.fixture
def unresponsive_port():
    """A port whose accept queue is full: connections neither succeed nor fail (a connect timeout)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(filler)
    time.sleep(0.1)
    yield port
    for filler in fillers:
        filler.close()
    server.close()


def test_connect_timeout(make_client, unresponsive_port):
    client = make_client(base_url=f"http://127.0.0.1:{unresponsive_port}/api", connect_timeout=0.3, attempts=1)
    started = time.monotonic()
    with pytest.raises(MarketplaceUnavailableError) as error:
        client.get_subscription(str(uuid.uuid4()))
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 3.0  # two attempts of 0.3 s, not a hang
    assert "Timeout" in type(error.value.__cause__).__name__ or "Timeout" in str(error.value)


def test_connection_refused_is_unavailable(make_client):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    client = make_client(base_url=f"http://127.0.0.1:{port}/api", attempts=1)
    with pytest.raises(MarketplaceUnavailableError) as error:
        client.get_subscription("x")
    assert error.value.status is None
    assert error.value.http_status == 503


def test_batch_usage_event_returns_one_result_per_event_and_is_safe_to_retry(standin, client):
    from datetime import UTC, datetime, timedelta
    from decimal import Decimal

    from devtools.marketplace_standin import make_plan
    from shared.domain import UsageEvent, UsageStatus

    now = datetime.now(UTC)
    dimensions = [{"id": "api_calls", "name": "API calls"}]
    standin.set_plans("contoso-offer", [make_plan("metered", planComponents={"meteringDimensions": dimensions})])
    (active,) = standin.seed(1, plan_id="metered")
    hour = (now - timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)
    events = [
        UsageEvent(active, "metered", "api_calls", Decimal("1234.5"), hour),
        UsageEvent(active, "metered", "storage_gb", Decimal(3), hour),
        UsageEvent(active, "metered", "api_calls", Decimal(7), now - timedelta(hours=30)),
    ]
    # The first answer is lost after Microsoft recorded it (a 503): the retry finds it Duplicate.
    standin.fail_next(1, 503, path_contains="batchUsageEvent", process=True)
    results = client.batch_usage_event(events)
    assert [r.status for r in results] == [UsageStatus.DUPLICATE, UsageStatus.INVALID_DIMENSION, UsageStatus.EXPIRED]
    # What Microsoft kept is under error.additionalInfo.acceptedMessage; an error item has no usageEventId.
    assert results[0].kept_quantity == Decimal("1234.5") and results[0].kept_usage_event_id
    assert results[0].usage_event_id == ""
    assert results[1].error_message
    assert standin.calls["batch_usage_event"] == 2
    assert [e["quantity"] for e in standin.accepted_usage(active)] == [Decimal("1234.5")]
    with pytest.raises(ValueError, match="at most 25"):
        client.batch_usage_event([events[0]] * 26)


@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_batch_usage_results_are_matched_to_their_events_by_key_fields_in_any_order(standin, client, order):
    from datetime import UTC, datetime, timedelta
    from decimal import Decimal

    from devtools.marketplace_standin import make_plan
    from shared.domain import UsageEvent, UsageStatus

    now = datetime.now(UTC)
    standin.set_plans("contoso-offer", [make_plan("metered")])
    subscriptions = standin.seed(12, plan_id="metered")
    (suspended,) = standin.seed(1, plan_id="metered", status="Suspended")
    hour = (now - timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)
    events = [UsageEvent(s, "metered", "api_calls", Decimal(n + 1), hour) for n, s in enumerate(subscriptions)]
    events.append(UsageEvent(suspended, "metered", "api_calls", Decimal(99), hour))
    standin.usage_result_order = order
    results = client.batch_usage_event(events)
    assert [(r.resource_id, r.quantity) for r in results] == [(e.resource_id, e.quantity) for e in events]
    assert [r.status for r in results] == [UsageStatus.ACCEPTED] * 12 + [UsageStatus.RESOURCE_NOT_ACTIVE]


def test_batch_usage_answer_that_does_not_match_the_request_is_unknown_and_the_quantity_is_sent_exactly(standin, client):
    from datetime import UTC, datetime, timedelta
    from decimal import Decimal

    from devtools.marketplace_standin import make_plan
    from shared.domain import UsageEvent

    now = datetime.now(UTC)
    standin.set_plans("contoso-offer", [make_plan("metered")])
    (active,) = standin.seed(1, plan_id="metered")
    hour = (now - timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)
    exact = Decimal("1000000000000.5")
    huge = Decimal("9007199254740993")  # 2^53 + 1: a float would send ...992
    client.batch_usage_event([UsageEvent(active, "metered", "api_calls", exact, hour)])
    client.batch_usage_event([UsageEvent(active, "metered", "storage_gb", huge, hour)])
    bodies = [e["body"] for e in standin.last_requests if e["kind"] == "batch_usage_event"]
    assert '"quantity": 1000000000000.5' in bodies[0] and '"quantity": 9007199254740993' in bodies[1]
    assert {e["quantity"] for e in standin.accepted_usage(active)} == {exact, huge}
    # An answer about another event than the one sent is never guessed at.
    standin.usage_answer_rewrite = lambda results: [{**r, "dimension": "other"} for r in results]
    with pytest.raises(MarketplaceUnavailableError, match="other events"):
        client.batch_usage_event([UsageEvent(active, "metered", "api_calls", Decimal(1), hour - timedelta(hours=1))])
