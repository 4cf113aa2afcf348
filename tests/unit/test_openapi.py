"""The OpenAPI document (shared/openapi.json): a valid OpenAPI 3.1 document, covering every route the
SaaS application calls, with the lifecycle event schema of docs/events.md as its one definition."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import requests
from openapi_spec_validator import validate

from shared.openapi import document, document_bytes
from tests.contract import ContractViolation, validate_exchange

ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = {
    ("get", "/api/subscriptions/{subscriptionId}"),
    ("patch", "/api/subscriptions/{subscriptionId}"),
    ("delete", "/api/subscriptions/{subscriptionId}"),
    ("get", "/api/subscriptions/{subscriptionId}/plans"),
    ("get", "/api/operations/{operationId}"),
    ("post", "/api/usage"),
    ("get", "/api/health"),
}


def test_the_document_is_valid_openapi_3_1():
    spec = document()
    assert spec["openapi"].startswith("3.1")
    validate(spec)  # openapi-spec-validator: raises on any violation of the OpenAPI 3.1 schema


def test_every_route_the_saas_application_calls_is_documented_with_its_statuses():
    spec = document()
    found = {(method, path) for path, item in spec["paths"].items() for method in item if method != "parameters"}
    assert found == OPERATIONS
    expected = {
        ("get", "/api/subscriptions/{subscriptionId}"): {"200", "400", "401", "403", "404", "503"},
        ("patch", "/api/subscriptions/{subscriptionId}"): {"202", "400", "401", "403", "404", "409", "413", "422", "502", "503"},
        ("delete", "/api/subscriptions/{subscriptionId}"): {"202", "400", "401", "403", "404", "409", "422", "502", "503"},
        ("get", "/api/subscriptions/{subscriptionId}/plans"): {"200", "400", "401", "403", "404", "502", "503"},
        ("get", "/api/operations/{operationId}"): {"200", "400", "401", "403", "404", "503"},
        ("post", "/api/usage"): {"202", "400", "401", "403", "413", "503"},
        ("get", "/api/health"): {"200", "503"},
    }
    for (method, path), statuses in expected.items():
        assert set(spec["paths"][path][method]["responses"]) == statuses, (method, path)


def test_each_operation_names_its_app_role():
    spec = document()
    roles = {
        (method, path): op["security"][0].get("entra", [None])[0] if op["security"][0] else None
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method != "parameters"
    }
    assert roles[("get", "/api/subscriptions/{subscriptionId}")] == "Subscriptions.Read"
    assert roles[("patch", "/api/subscriptions/{subscriptionId}")] == "Subscriptions.ReadWrite"
    assert roles[("delete", "/api/subscriptions/{subscriptionId}")] == "Subscriptions.ReadWrite"
    assert roles[("get", "/api/operations/{operationId}")] == "Subscriptions.Read"
    assert roles[("post", "/api/usage")] == "Usage.Write"
    assert roles[("get", "/api/health")] is None
    from shared.api_auth import ROLE_SUBSCRIPTIONS_READ, ROLE_SUBSCRIPTIONS_READ_WRITE, ROLE_USAGE_WRITE

    scopes = spec["components"]["securitySchemes"]["entra"]["flows"]["clientCredentials"]["scopes"]
    assert set(scopes) == {ROLE_SUBSCRIPTIONS_READ, ROLE_SUBSCRIPTIONS_READ_WRITE, ROLE_USAGE_WRITE}


def test_the_202_answers_document_location_retry_after_and_replay_and_link_to_the_operation():
    spec = document()
    for method in ("patch", "delete"):
        op = spec["paths"]["/api/subscriptions/{subscriptionId}"][method]
        assert {"Location", "Retry-After", "Idempotent-Replayed"} <= set(op["responses"]["202"]["headers"])
        assert op["responses"]["202"]["links"]["GetOperation"]["operationId"] == "getOperation"
        assert any(p["name"] == "Idempotency-Key" and p["in"] == "header" for p in op["parameters"])
    assert "Retry-After" in spec["paths"]["/api/usage"]["post"]["responses"]["503"]["headers"]


def _events_md_schema() -> dict:
    text = (ROOT / "docs" / "events.md").read_text()
    section = text[text.index("## Event schema") :]
    match = re.search(r"```json\n(.*?)```", section, re.S)
    assert match
    return json.loads(match.group(1))


def test_the_lifecycle_event_is_one_definition_shared_with_docs_events_md():
    """The webhook's schema is docs/events.md's JSON Schema, $defs moved to components (Event_*)."""
    printed = _events_md_schema()
    spec = document()
    schemas = spec["components"]["schemas"]

    def as_component(node):
        if isinstance(node, dict):
            return {
                k: ("#/components/schemas/Event_" + v.rsplit("/", 1)[-1])
                if k == "$ref" and v.startswith("#/$defs/")
                else as_component(v)
                for k, v in node.items()
            }
        return [as_component(v) for v in node] if isinstance(node, list) else node

    defs = printed.pop("$defs")
    printed.pop("$schema"), printed.pop("$id")
    assert schemas["SubscriptionEvent"] == as_component(printed)
    for name, schema in defs.items():
        assert schemas[f"Event_{name}"] == as_component(schema)
    body = spec["webhooks"]["subscriptionEvent"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/SubscriptionEvent"}


def test_the_document_holds_no_settings_or_secrets():
    text = document_bytes().decode()
    for word in ("AccountKey", "client_secret", "PUBLISHER_API_OPENID", "AzureWebJobsStorage", "Bearer ey"):
        assert word not in text


def _exchange(method: str, url: str, status: int, body: object, headers: dict | None = None) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = json.dumps(body).encode()
    response.headers.update({"Content-Type": "application/json", **(headers or {})})
    response.request = requests.Request(method, url).prepare()
    return response


def test_the_contract_check_refuses_an_undocumented_answer():
    url = "http://127.0.0.1/api/operations/6b1d2c8e-9f4a-4a3b-8c2d-1e0f9a8b7c6d"
    validate_exchange(_exchange("GET", url, 404, {"error": "operation_not_found", "message": "m", "correlationId": "c"}))
    with pytest.raises(ContractViolation):
        validate_exchange(_exchange("GET", url, 404, {"oops": True}))  # not the error body
    with pytest.raises(ContractViolation):
        validate_exchange(_exchange("GET", url, 418, {"error": "x", "message": "m", "correlationId": "c"}))  # undocumented status
    # Routes the document does not describe (the console, the landing page) are not checked here.
    validate_exchange(_exchange("GET", "http://127.0.0.1/api/console", 200, {"anything": 1}))
