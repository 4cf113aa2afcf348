"""The marketplace stand-in's metering API (usageEvent, batchUsageEvent, usageEvents), over real HTTP,
as Microsoft documents it: one event per resource, dimension and hour; 24-hour window; per-item
statuses; at most 25 per batch; fault knobs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import requests

from devtools.marketplace_standin import make_plan

NOW = datetime(2026, 12, 3, 10, 30, tzinfo=UTC)
DIMENSIONS = [{"id": "api_calls", "name": "API calls", "unitOfMeasure": "call", "pricePerUnit": 0.01}]


@pytest.fixture
def meter(standin):
    standin.usage_clock = lambda: NOW
    standin.set_plans("contoso-offer", [make_plan("metered", planComponents={"meteringDimensions": DIMENSIONS})])
    (active,) = standin.seed(1, plan_id="metered")
    (suspended,) = standin.seed(1, status="Suspended", plan_id="metered")
    session = requests.Session()
    session.trust_env = False
    yield standin, session, active, suspended
    session.close()


def event(resource_id: str, hour: datetime = NOW - timedelta(hours=1), **fields) -> dict:
    return {
        "resourceId": resource_id,
        "dimension": "api_calls",
        "quantity": 12.5,
        "effectiveStartTime": hour.isoformat().replace("+00:00", "Z"),
        "planId": "metered",
        **fields,
    }


def post(standin, session, path: str, body) -> requests.Response:
    return session.post(f"{standin.api_base_url}/{path}?api-version=2018-08-31", json=body, timeout=10)


def test_one_event_per_resource_dimension_and_hour(meter):
    standin, session, active, _ = meter
    first = post(standin, session, "usageEvent", event(active))
    assert first.status_code == 200 and first.json()["status"] == "Accepted" and first.json()["usageEventId"]
    same_hour = post(standin, session, "usageEvent", event(active, NOW - timedelta(minutes=59), quantity=3))
    assert same_hour.status_code == 409
    accepted = same_hour.json()["additionalInfo"]["acceptedMessage"]
    assert accepted["status"] == "Duplicate" and accepted["quantity"] == 12.5  # what Microsoft kept
    assert post(standin, session, "usageEvent", event(active, NOW - timedelta(hours=2))).status_code == 200
    assert [e["quantity"] for e in standin.accepted_usage(active)] == [12.5, 12.5]


def test_batch_gives_each_item_its_status(meter):
    standin, session, active, suspended = meter
    items = [
        event(active),
        event(active),  # the same hour again
        event(active, NOW - timedelta(hours=25)),
        event(active, NOW + timedelta(hours=1)),
        event(active, dimension="storage_gb"),
        event(active, quantity=0),
        event(active, quantity=True),
        event(suspended),
        event("00000000-0000-4000-8000-000000000000"),
        event(active, planId="other"),
    ]
    response = post(standin, session, "batchUsageEvent", {"request": items})
    assert response.status_code == 200 and response.json()["count"] == len(items)
    statuses = [item["status"] for item in response.json()["result"]]
    assert statuses == [
        "Accepted",
        "Duplicate",
        "Expired",
        "BadArgument",
        "InvalidDimension",
        "InvalidQuantity",
        "InvalidQuantity",
        "ResourceNotActive",
        "ResourceNotFound",
        "BadArgument",
    ]
    assert len(standin.accepted_usage()) == 1


def test_batch_of_more_than_25_is_refused_whole(meter):
    standin, session, active, _ = meter
    items = [event(active, NOW - timedelta(hours=hour)) for hour in range(1, 27)]
    response = post(standin, session, "batchUsageEvent", {"request": items})
    assert response.status_code == 400
    assert standin.accepted_usage() == []


def test_single_event_refusals_are_400_with_the_status_as_code(meter):
    standin, session, _, suspended = meter
    response = post(standin, session, "usageEvent", event(suspended))
    body = response.json()
    assert response.status_code == 400 and "ResourceNotActive" in (body.get("code"), body.get("error", {}).get("code"))


def test_faults_and_read_back(meter):
    standin, session, active, _ = meter
    standin.fail_next(1, 429, path_contains="batchUsageEvent", retry_after=1)
    throttled = post(standin, session, "batchUsageEvent", {"request": [event(active)]})
    assert throttled.status_code == 429 and throttled.headers.get("Retry-After") == "1"
    assert standin.accepted_usage() == []  # a throttled batch records nothing
    standin.fail_next(1, 503, path_contains="batchUsageEvent", process=True)  # applied, answer lost
    assert post(standin, session, "batchUsageEvent", {"request": [event(active)]}).status_code == 503
    again = post(standin, session, "batchUsageEvent", {"request": [event(active)]})
    assert again.json()["result"][0]["status"] == "Duplicate"
    listed = session.get(
        f"{standin.api_base_url}/usageEvents",
        params={"api-version": "2018-08-31", "usageStartDate": (NOW - timedelta(days=1)).isoformat()},
        timeout=10,
    )
    assert listed.status_code == 200
    assert [(e["usageResourceId"], e["submittedQuantity"], e["processedQuantity"], e["reconStatus"]) for e in listed.json()] == [
        (active, 12.5, 12.5, "Accepted")
    ]
