"""The signed HTTPS hook's HMAC header, and the event format published in docs/events.md.

* ``sign_payload``/``verify_signature``: round trip, an independent HMAC computation, tampering,
  wrong secret, stale and future timestamps, malformed headers (never an exception).
* The Python verifier printed in docs/events.md is executed and must agree with the code.
* The JSON Schema printed in docs/events.md validates real event documents built by
  ``build_event_document`` for every lifecycle event type (a small validator for the subset of
  JSON Schema the document uses; it refuses keywords it does not implement).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator, FormatChecker

from shared import state_machine as sm
from shared.domain import Subscription, Term, parse_timestamp
from shared.events import SCHEMA_VERSION, build_event_document, event_id_for, sign_payload, verify_signature
from shared.state_machine import Change, Kind, LocalStatus, Source

SECRET = "hook-secret-0123456789abcdef"
BODY = json.dumps({"eventId": "e1", "eventType": "subscription.activated", "sequence": 3}, sort_keys=True)
DOCS = Path(__file__).resolve().parents[2] / "docs" / "events.md"
HEADER_FORMAT = re.compile(r"t=(\d+),v1=([0-9a-f]{64})")


# ---------------------------------------------------------------------------------------------
# sign / verify


def test_signature_header_format_and_independent_hmac():
    timestamp = int(time.time())
    header = sign_payload(SECRET, BODY, timestamp)
    match = HEADER_FORMAT.fullmatch(header)
    assert match, header
    assert int(match.group(1)) == timestamp
    expected = hmac.new(SECRET.encode(), f"{timestamp}.{BODY}".encode(), hashlib.sha256).hexdigest()
    assert match.group(2) == expected
    assert verify_signature(SECRET, BODY, header) is True


def test_signature_depends_on_body_secret_and_timestamp():
    timestamp = int(time.time())
    base = sign_payload(SECRET, BODY, timestamp)
    assert sign_payload(SECRET, BODY + " ", timestamp) != base
    assert sign_payload(SECRET + "x", BODY, timestamp) != base
    assert sign_payload(SECRET, BODY, timestamp + 1) != base
    assert sign_payload(SECRET, BODY, timestamp) == base  # deterministic


@pytest.mark.parametrize(
    "tamper",
    [
        lambda body: body.replace("activated", "suspended"),
        lambda body: body.replace('"sequence": 3', '"sequence": 4'),
        lambda body: body + " ",
        lambda body: body[:-1],
        lambda body: "",
    ],
)
def test_tampered_body_fails(tamper):
    header = sign_payload(SECRET, BODY, int(time.time()))
    tampered = tamper(BODY)
    assert tampered != BODY
    assert verify_signature(SECRET, tampered, header) is False
    assert verify_signature(SECRET, BODY, header) is True


def test_wrong_secret_fails():
    header = sign_payload(SECRET, BODY, int(time.time()))
    assert verify_signature("another-secret-0123456789", BODY, header) is False
    assert verify_signature("", BODY, header) is False
    assert verify_signature(SECRET, BODY, header) is True


def test_timestamp_is_part_of_the_signature():
    """Moving the timestamp forward (to revive a stale request) breaks the signature."""
    now = int(time.time())
    old = sign_payload(SECRET, BODY, now - 3600)
    revived = old.replace(f"t={now - 3600}", f"t={now}")
    assert revived != old
    assert verify_signature(SECRET, BODY, revived) is False


def test_stale_and_future_timestamps_fail_within_tolerance_pass():
    now = 1_800_000_000
    header = sign_payload(SECRET, BODY, now)
    assert verify_signature(SECRET, BODY, header, now=now) is True
    assert verify_signature(SECRET, BODY, header, now=now + 300) is True
    assert verify_signature(SECRET, BODY, header, now=now + 301) is False  # stale: a replay
    assert verify_signature(SECRET, BODY, header, now=now - 301) is False  # from the future
    assert verify_signature(SECRET, BODY, header, now=now + 3600, tolerance_seconds=7200) is True
    stale = sign_payload(SECRET, BODY, int(time.time()) - 3600)
    assert verify_signature(SECRET, BODY, stale) is False  # the default uses the real clock


def _valid_parts() -> tuple[int, str]:
    timestamp = int(time.time())
    return timestamp, sign_payload(SECRET, BODY, timestamp).split("v1=", 1)[1]


@pytest.mark.parametrize(
    "build",
    [
        lambda t, sig: "",
        lambda t, sig: "garbage",
        lambda t, sig: f"v1={sig}",  # no timestamp
        lambda t, sig: f"t={t}",  # no signature
        lambda t, sig: f"t=soon,v1={sig}",  # timestamp not a number
        lambda t, sig: f"t={t};v1={sig}",  # wrong separator
        lambda t, sig: f"t={t},v1={sig[:-2]}",  # truncated signature
        lambda t, sig: f"t={t},v1={sig.upper()}x",  # not the hex digest
        lambda t, sig: f"t={t},v1=",  # empty signature
        lambda t, sig: f"t={t},v0={sig}",  # unknown scheme only
        lambda t, sig: f"t={t},v1={sig[:-1]}é",  # non-ASCII signature
        lambda t, sig: f"t={t},v1=ünïcödé",  # non-ASCII signature
        lambda t, sig: ",,,",
        lambda t, sig: "=,=",
    ],
)
def test_malformed_headers_fail_without_raising(build):
    timestamp, signature = _valid_parts()
    header = build(timestamp, signature)
    assert verify_signature(SECRET, BODY, header) is False


@pytest.mark.parametrize("header", [None, b"t=1,v1=00"])
def test_missing_or_non_text_header_fails_without_raising(header):
    """``request.headers.get(...)`` is None when the header is missing: refuse, don't crash."""
    assert verify_signature(SECRET, BODY, header) is False


# ---------------------------------------------------------------------------------------------
# docs/events.md: the published verifier and the JSON Schema


def _docs() -> str:
    return DOCS.read_text(encoding="utf-8")


def _block_after(heading: str, language: str) -> str:
    """The first ```<language> block after the Markdown heading ``heading``."""
    text = _docs()
    match = re.search(rf"^#+ {re.escape(heading)}\s*$", text, re.MULTILINE)
    assert match, f"docs/events.md has no heading {heading!r}"
    block = re.compile(rf"^```{language}\n(.*?)^```", re.MULTILINE | re.DOTALL).search(text, match.end())
    assert block, f"no ```{language} block after {heading!r}"
    return block.group(1)


def _docs_verifier():
    namespace: dict = {}
    exec(compile(_block_after("Verifying the signature in Python", "python"), "docs/events.md", "exec"), namespace)
    return namespace["verify_event_signature"]


def test_the_verifier_printed_in_the_docs_agrees_with_the_code():
    verify = _docs_verifier()
    now = int(time.time())
    good = sign_payload(SECRET, BODY, now)
    cases = [
        (SECRET, BODY, good),
        (SECRET, BODY + " ", good),
        ("wrong-secret-0123456789", BODY, good),
        (SECRET, BODY, sign_payload(SECRET, BODY, now - 3600)),
        (SECRET, BODY, "garbage"),
        (SECRET, BODY, good.replace("v1=", "v1=0")),
        (SECRET, BODY, None),
    ]
    results = [(verify(secret, body.encode(), header), verify_signature(secret, body, header)) for secret, body, header in cases]
    assert results[0] == (True, True)
    assert all(mine == theirs for mine, theirs in results), results
    assert [mine for mine, _ in results[1:]] == [False] * (len(cases) - 1)


# -- JSON Schema (jsonschema, draft 2020-12) ---------------------------------------------------

_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")
# jsonschema checks "date-time" only with an optional extra package; the check is ours, explicit.
FORMATS = FormatChecker(formats=("uuid",))


@FORMATS.checks("date-time")
def _is_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True  # formats only constrain strings
    return bool(_DATE_TIME.fullmatch(value)) and parse_timestamp(value) is not None


def validate(instance, schema: dict) -> list[str]:
    """Errors of ``instance`` against ``schema`` (empty: valid), formats asserted."""
    validator = Draft202012Validator(schema, format_checker=FORMATS)
    return [f"${''.join(f'[{p!r}]' for p in error.absolute_path)}: {error.message}" for error in validator.iter_errors(instance)]


def published_schema() -> dict:
    schema = json.loads(_block_after("Event schema", "json"))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)  # the published schema is itself valid
    return schema


def _declared(schema: dict, root: dict) -> dict:
    return root["$defs"][schema["$ref"][len("#/$defs/") :]] if "$ref" in schema else schema


# -- real event documents, one per lifecycle event type ----------------------------------------

SUBSCRIPTION_ID = "37f9dea2-4345-438f-b0bd-03d40d28c7e0"
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def _microsoft(status: str = "PendingFulfillmentStart", **overrides) -> Subscription:
    identity = {
        "emailId": "it@fabrikam.example",
        "objectId": str(uuid.uuid4()),
        "tenantId": str(uuid.uuid4()),
        "puid": "10037FFE8C1A2B3C",
    }
    data = {
        "id": SUBSCRIPTION_ID,
        "publisherId": "contoso",
        "offerId": "contoso-analytics",
        "name": "Fabrikam",
        "saasSubscriptionStatus": status,
        "planId": "standard",
        "quantity": 5,
        "purchaser": identity,
        "beneficiary": identity,
        "term": {"termUnit": "P1M", "startDate": "2026-11-01", "endDate": "2026-11-30"},
        "autoRenew": True,
        "isFreeTrial": False,
        **overrides,
    }
    return Subscription.from_api(data)


class _Timeline:
    """Applies changes through the state machine like the repository does, keeping each event document."""

    def __init__(self):
        self.record = None
        self.clock = T0
        self.documents: list[dict] = []

    def apply(self, kind: Kind, source: Source = Source.WEBHOOK, **extra) -> sm.Outcome:
        self.clock += timedelta(minutes=5)
        operation_id = str(uuid.uuid4()) if source is Source.WEBHOOK else ""
        change = Change(
            kind=kind,
            source=source,
            occurred_at=self.clock,
            operation_id=operation_id,
            correlation_id=uuid.uuid4().hex,
            actor="Ada <ada@fabrikam.example>",
            **extra,
        )
        outcome = sm.apply(self.record, change, now=self.clock + timedelta(seconds=1))
        self.record = outcome.record
        if outcome.event_type:
            event_id, body = build_event_document(outcome, outcome.history.seq)
            document = json.loads(body)
            assert document["eventId"] == event_id
            self.documents.append(document)
        return outcome


def every_event_type() -> list[dict]:
    first, second = _Timeline(), _Timeline()
    first.apply(Kind.RECORD_PURCHASE, Source.LANDING_PAGE, subscription=_microsoft())
    first.apply(Kind.ACTIVATION_SENT, Source.LANDING_PAGE)
    first.apply(Kind.ACTIVATION_FAILED, Source.LANDING_PAGE)
    first.apply(Kind.REQUEST_ACTIVATION, Source.OPERATOR)
    first.apply(Kind.FLAG, Source.RECONCILE, flag="awaiting_operator")
    first.apply(Kind.ACTIVATION_CONFIRMED, Source.OPERATOR, subscription=_microsoft("Subscribed"))
    first.apply(Kind.CHANGE_PLAN, plan_id="premium")
    first.apply(Kind.CHANGE_QUANTITY, quantity=12)
    first.apply(Kind.CHANGE_FAILED, Source.PUBLISHER, detail="ChangePlan Failed: the billing system refused it")
    usage = [
        {
            "hour": "2026-11-02T08:00:00Z",
            "dimension": "api_calls",
            "planId": "premium",
            "quantity": 12.5,
            "status": "Accepted",
            "marketplaceStatus": "Accepted",
            "usageEventId": str(uuid.uuid4()),
            "message": "",
        }
    ]
    first.apply(Kind.USAGE_ACCEPTED, Source.METERING, detail=json.dumps(usage))
    rejected = [{**usage[0], "status": "Flagged", "marketplaceStatus": "InvalidDimension", "usageEventId": None, "message": "no"}]
    first.apply(Kind.USAGE_REJECTED, Source.METERING, detail=json.dumps(rejected))
    read_back = [
        {
            "day": "2026-12-03",
            "dimension": "api_calls",
            "planId": "metered",
            "ours": "12.5",
            "submitted": "10",
            "processed": "10",
            "reconStatus": "Accepted",
            "status": "Difference",
        }
    ]
    first.apply(Kind.USAGE_MISMATCH, Source.METERING, detail=json.dumps(read_back))
    first.apply(Kind.SUSPEND)
    first.apply(Kind.REINSTATE)
    first.apply(Kind.RENEW, term=Term("P1M", datetime(2026, 12, 1, tzinfo=UTC), datetime(2026, 12, 31, tzinfo=UTC)))
    first.apply(Kind.UNSUBSCRIBE)
    # a subscription first seen already Subscribed (webhook of an auto-activated purchase)
    second.apply(Kind.SYNC, Source.RECONCILE, subscription=_microsoft("Subscribed", id=str(uuid.uuid4())))
    return first.documents + second.documents


ALL_EVENT_TYPES = {value for name, value in vars(sm).items() if name.startswith("EVENT_")}


def test_the_timeline_covers_every_event_type():
    documents = every_event_type()
    assert {d["eventType"] for d in documents} == ALL_EVENT_TYPES
    assert len(ALL_EVENT_TYPES) == 14


def test_real_event_documents_validate_against_the_published_schema():
    schema = published_schema()
    documents = every_event_type()
    for document in documents:
        assert validate(document, schema) == [], (document["eventType"], validate(document, schema))
    unsubscribed = [d for d in documents if d["eventType"] == sm.EVENT_UNSUBSCRIBED]
    assert len(unsubscribed) == 1 and "retainDataUntil" in unsubscribed[0]


def test_every_produced_property_is_documented_in_the_schema():
    schema = published_schema()
    subscription_schema = _declared(schema["properties"]["subscription"], schema)
    for document in every_event_type():
        assert set(document) <= set(schema["properties"]), set(document) - set(schema["properties"])
        assert set(document["subscription"]) <= set(subscription_schema["properties"])
        term_schema = subscription_schema["properties"]["term"]
        assert set(document["subscription"]["term"]) <= set(term_schema["properties"])


def test_schema_enums_match_the_code():
    schema = published_schema()
    assert set(schema["properties"]["eventType"]["enum"]) == ALL_EVENT_TYPES
    assert set(schema["properties"]["source"]["enum"]) == {source.value for source in Source}
    subscription_schema = _declared(schema["properties"]["subscription"], schema)
    assert set(subscription_schema["properties"]["status"]["enum"]) == {status.value for status in LocalStatus}
    assert schema["properties"]["schemaVersion"]["const"] == SCHEMA_VERSION


def test_the_validator_is_not_vacuous():
    schema = published_schema()
    document = next(d for d in every_event_type() if d["eventType"] == sm.EVENT_UNSUBSCRIBED)
    assert validate(document, schema) == []
    broken = [
        {k: v for k, v in document.items() if k != "eventId"},
        {**document, "eventType": "subscription.deleted"},
        {**document, "sequence": "2"},
        {**document, "sequence": 0},
        {**document, "source": "portal"},
        {**document, "occurredAt": "yesterday"},
        {**document, "eventId": "not-a-uuid"},
        {k: v for k, v in document.items() if k != "retainDataUntil"},  # unsubscribed needs it
        {**document, "subscription": {**document["subscription"], "quantity": "5"}},
        {**document, "subscription": {**document["subscription"], "status": "Deleted"}},
        {
            **document,
            "subscription": {**document["subscription"], "term": {"termUnit": "P1M", "startDate": "soon", "endDate": ""}},
        },
        {**document, "subscription": {k: v for k, v in document["subscription"].items() if k != "flags"}},
        {**document, "subscription": {**document["subscription"], "purchaser": {"emailId": "x"}}},
    ]
    for index, candidate in enumerate(broken):
        assert validate(candidate, schema) != [], f"broken document #{index} validated"
    activated = next(d for d in every_event_type() if d["eventType"] == sm.EVENT_ACTIVATED)
    assert "retainDataUntil" not in activated and validate(activated, schema) == []


def test_the_example_event_in_the_docs_validates_and_is_consistent():
    schema = published_schema()
    example = json.loads(_block_after("Example event", "json"))
    assert validate(example, schema) == []
    assert example["eventId"] == event_id_for(example["subscriptionId"], example["sequence"])
    assert example["subscription"]["id"] == example["subscriptionId"]
    retain = parse_timestamp(example["retainDataUntil"])
    assert retain - parse_timestamp(example["occurredAt"]) >= timedelta(days=7)


def test_event_document_fields_reflect_the_transition():
    """eventId is stable (uuid5 of subscription and sequence); previous values and retention are right."""
    documents = {d["eventType"]: d for d in every_event_type() if d["subscriptionId"] == SUBSCRIPTION_ID}
    for document in documents.values():
        assert document["eventId"] == event_id_for(SUBSCRIPTION_ID, document["sequence"])
        assert document["subscription"]["id"] == SUBSCRIPTION_ID
        assert document["schemaVersion"] == SCHEMA_VERSION
    sequences = [d["sequence"] for d in every_event_type() if d["subscriptionId"] == SUBSCRIPTION_ID]
    assert sequences == sorted(set(sequences))
    plan = documents[sm.EVENT_PLAN_CHANGED]
    assert (plan["previous"]["planId"], plan["subscription"]["planId"]) == ("standard", "premium")
    quantity = documents[sm.EVENT_QUANTITY_CHANGED]
    assert (quantity["previous"]["quantity"], quantity["subscription"]["quantity"]) == (5, 12)
    assert documents[sm.EVENT_SUSPENDED]["previous"]["status"] == "Subscribed"
    assert documents[sm.EVENT_ACTIVATION_FAILED]["source"] == "landing_page"
    assert documents[sm.EVENT_ACTIVATION_FAILED]["operationId"] is None
    assert documents[sm.EVENT_FLAGGED]["subscription"]["flags"] == ["awaiting_operator"]
    assert documents[sm.EVENT_RENEWED]["subscription"]["term"]["startDate"].startswith("2026-12-01")
    gone = documents[sm.EVENT_UNSUBSCRIBED]
    assert gone["retainDataUntil"] == gone["subscription"]["retainDataUntil"]
    assert parse_timestamp(gone["retainDataUntil"]) - parse_timestamp(gone["occurredAt"]) >= timedelta(days=7)
    assert gone["operationId"] and gone["correlationId"]
