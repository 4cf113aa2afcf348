"""Property tests (hypothesis) for the pure parsers that read hostile input (issue 25).

Each parser either returns its parsed value or raises one of the app's 4xx errors; nothing else
(a TypeError, a RecursionError) may escape, because an escaped error is a 500 and a 500 invites a
retry storm. Found by these tests and fixed: JSON nested deeper than the parser's recursion limit
raised RecursionError (500) in the change body, the usage body, the webhook body and the principal
header; every one is now a 400 (or "nobody signed in"). The console's page cursor catches it too,
although its 200-character limit keeps it below the recursion limit today.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import console, metering, publisher, webhook
from shared.errors import AppError

NOW = datetime(2026, 12, 6, 12, 30, tzinfo=UTC)
SID = "37f9dea2-4345-438f-b0bd-03d40d28c7e0"
PROPERTY = settings(max_examples=250, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)


def as_bytes(value) -> bytes:
    return json.dumps(value).encode()


def refused_with_4xx(call) -> AppError | None:
    try:
        call()
    except AppError as error:
        assert 400 <= error.http_status < 500, (error.code, error.http_status)
        return error
    return None


DEEP = [b"[" * 50_000 + b"]" * 50_000, b'{"a":' * 20_000 + b"1" + b"}" * 20_000]


# --- publisher change bodies -------------------------------------------------------------------

change_bodies = (
    st.fixed_dictionaries(
        {}, optional={"planId": json_values, "quantity": json_values | st.integers(min_value=-(10**30), max_value=10**30)}
    )
    | json_values
)


@PROPERTY
@given(change_bodies)
def test_change_bodies_parse_or_are_refused_with_400(value):
    body = as_bytes(value)
    holder: list = []
    error = refused_with_4xx(lambda: holder.append(publisher.parse_change_body(SID, body)))
    if error is None:
        request = holder[0]
        assert request.action in (publisher.CHANGE_PLAN, publisher.CHANGE_QUANTITY)
        if request.action == publisher.CHANGE_PLAN:
            assert request.plan_id and request.plan_id == request.plan_id.strip() and request.quantity is None
            assert all(ord(ch) >= 32 for ch in request.plan_id)
        else:
            assert isinstance(request.quantity, int) and 0 < request.quantity <= publisher.MAX_QUANTITY


@PROPERTY
@given(st.binary(max_size=300))
def test_change_bodies_of_any_bytes_never_escape(body):
    refused_with_4xx(lambda: publisher.parse_change_body(SID, body))


@pytest.mark.parametrize("body", DEEP)
def test_deeply_nested_bodies_are_400_not_500(body):
    assert refused_with_4xx(lambda: publisher.parse_change_body(SID, body[:16_000] if len(body) > 16_000 else body)) is not None
    assert refused_with_4xx(lambda: metering.parse_usage_body(body[: metering.MAX_USAGE_BODY_BYTES], NOW)) is not None
    assert refused_with_4xx(lambda: webhook.parse_event(body, 10**6)) is not None


# --- usage bodies ------------------------------------------------------------------------------

usage_event = st.fixed_dictionaries(
    {},
    optional={
        "subscriptionId": st.sampled_from([SID, SID.upper(), "x", ""]) | json_values,
        "dimension": st.sampled_from(["api_calls", "a.b-c_d", " bad", ""]) | json_values,
        "quantity": st.decimals(allow_nan=False, allow_infinity=False, places=3).map(float) | json_values,
        "effectiveStartTime": st.datetimes(
            min_value=datetime(2026, 12, 4), max_value=datetime(2026, 12, 7), timezones=st.just(UTC)
        ).map(lambda d: d.isoformat().replace("+00:00", "Z"))
        | json_values,
        "id": st.from_regex(r"[A-Za-z0-9._:@\-]{1,20}", fullmatch=True) | json_values,
    },
)
usage_bodies = st.fixed_dictionaries({"events": st.lists(usage_event | json_values, max_size=5)}) | json_values


@PROPERTY
@given(usage_bodies)
def test_usage_bodies_parse_into_checked_events_or_refusals(value):
    holder: list = []
    if refused_with_4xx(lambda: holder.append(metering.parse_usage_body(as_bytes(value), NOW))) is not None:
        return
    (parsed,) = holder
    assert [item.index for item in parsed] == list(range(len(value["events"])))
    for item in parsed:
        if isinstance(item, metering.ReportedUsage):
            assert item.subscription_id == SID  # canonical lower case, whatever the spelling
            assert item.quantity > 0 and item.quantity.is_finite()
            assert NOW - timedelta(hours=25) < item.at <= NOW + metering.FUTURE_TOLERANCE
        else:
            assert item.status == "refused" and item.reason and item.message


@PROPERTY
@given(st.binary(max_size=300))
def test_usage_bodies_of_any_bytes_never_escape(body):
    refused_with_4xx(lambda: metering.parse_usage_body(body, NOW))


def test_usage_nan_and_infinity_literals_are_refused_per_event():
    body = (
        b'{"events": [{"subscriptionId": "%s", "dimension": "d", "quantity": NaN}, {"subscriptionId": "%s", "dimension": "d", "quantity": Infinity}]}'
        % (
            SID.encode(),
            SID.encode(),
        )
    )
    parsed = metering.parse_usage_body(body, NOW)
    assert [getattr(item, "reason", "") for item in parsed] == [metering.INVALID_QUANTITY] * 2


# --- webhook payloads --------------------------------------------------------------------------

webhook_payloads = (
    st.fixed_dictionaries(
        {},
        optional={
            "id": st.sampled_from([SID, "x"]) | json_values,
            "subscriptionId": st.sampled_from([SID, "../x"]) | json_values,
            "action": st.sampled_from(["ChangePlan", "Unsubscribe", "Suspend", "Bogus"]) | json_values,
            "status": st.sampled_from(["Succeeded", "InProgress"]) | json_values,
            "planId": json_values,
            "quantity": json_values,
            "subscription": json_values | st.fixed_dictionaries({}, optional={"id": json_values, "planId": json_values}),
        },
    )
    | json_values
)


@PROPERTY
@given(webhook_payloads)
def test_webhook_payloads_parse_or_are_refused_with_400(value):
    holder: list = []
    if refused_with_4xx(lambda: holder.append(webhook.parse_event(as_bytes(value), 10**6))) is None:
        event = holder[0]
        assert event.subscription_id.lower() == SID and event.id.lower() == SID


@PROPERTY
@given(st.binary(max_size=300))
def test_webhook_bodies_of_any_bytes_never_escape(body):
    refused_with_4xx(lambda: webhook.parse_event(body, 10**6))


# --- console filters and cursors ---------------------------------------------------------------


@PROPERTY
@given(st.text(max_size=300) | json_values.map(lambda v: base64.urlsafe_b64encode(as_bytes(v)).decode().rstrip("=")))
def test_console_cursors_decode_or_are_refused_with_400(text):
    holder: list = []
    if refused_with_4xx(lambda: holder.append(console._cursor_in(text))) is None:
        token = holder[0]
        assert token is None or (isinstance(token, dict) and all(isinstance(v, str) for v in token.values()))


def test_console_cursor_round_trips():
    token = {"NextPartitionKey": "a", "NextRowKey": "b"}
    assert console._cursor_in(console._cursor_out(token)) == token


def test_a_deeply_nested_cursor_is_400():
    text = base64.urlsafe_b64encode(b"[" * 150).decode()
    assert refused_with_4xx(lambda: console._cursor_in(text)) is not None


@PROPERTY
@given(st.dictionaries(st.sampled_from(["q", "status", "plan", "cursor", "flagged", "x"]), st.text(max_size=260), max_size=5))
def test_console_filters_are_bounded_text_or_400(params):
    for name in ("q", "status", "plan"):
        try:
            value = console._filter(params, name)
        except AppError as error:
            assert error.http_status == 400 and len(params[name].strip()) > console.MAX_FILTER_CHARS
            continue
        assert len(value) <= console.MAX_FILTER_CHARS and value == value.strip()
