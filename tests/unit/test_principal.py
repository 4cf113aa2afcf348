"""The Easy Auth principal header is parsed from hostile input without ever raising (issue 25, defect 2).

Easy Auth sets X-MS-CLIENT-PRINCIPAL itself, but a misconfigured front door (or the dev host) may
pass whatever a client sent: any shape must yield "nobody signed in" or a partial identity, never a
TypeError that becomes a 500.
"""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.principal import MAX_PRINCIPAL_CHARS, parse_principal, signed_in_user


def encode(document) -> str:
    return base64.b64encode(json.dumps(document).encode()).decode()


def headers_for(document) -> dict[str, str]:
    return {"X-MS-CLIENT-PRINCIPAL": encode(document)}


@pytest.mark.parametrize(
    "document",
    [
        {"claims": 5},
        {"claims": "oid"},
        {"claims": {"typ": "oid", "val": "x"}},
        {"claims": None},
        {"claims": [5, "x", None, [1], True]},
        {"claims": [{"typ": 5}, {"typ": "oid"}, {"val": "x"}, {"typ": None, "val": None}]},
        {"claims": [{"typ": {"a": 1}, "val": ["x"]}, {"typ": "oid", "val": {"nested": True}}]},
        {"claims": [{"typ": "oid", "val": True}]},
        {"auth_typ": {"x": 1}, "claims": []},
        [],
        "principal",
        5,
        None,
    ],
)
def test_hostile_principal_shapes_mean_nobody_signed_in(document):
    assert signed_in_user(headers_for(document)) is None


@pytest.mark.parametrize(
    "encoded",
    [
        "%%%not-base64%%%",
        "é" * 10,
        base64.b64encode(b"\xff\xfe\x00garbage").decode(),
        base64.b64encode(b"{not json").decode(),
        base64.b64encode(b"[" * 100_000 + b"]" * 100_000).decode()[:MAX_PRINCIPAL_CHARS],
        base64.b64encode(b"[" * 5_000 + b"]" * 5_000).decode(),  # nested past the JSON parser's recursion limit
        "A" * (MAX_PRINCIPAL_CHARS + 4),
    ],
)
def test_undecodable_principals_mean_nobody_signed_in(encoded):
    assert signed_in_user({"X-MS-CLIENT-PRINCIPAL": encoded}) is None


def test_numeric_claim_values_are_text_and_objects_are_skipped():
    document = {
        "auth_typ": "aad",
        "claims": [
            {"typ": "oid", "val": 12345},
            {"typ": "name", "val": {"x": 1}},
            {"typ": "name", "val": "Ada"},
            {"typ": "roles", "val": "Console.Reader"},
            {"typ": "roles", "val": ["Console.Operator"]},
        ],
    }
    user = signed_in_user(headers_for(document))
    assert user is not None
    assert user.object_id == "12345" and user.name == "Ada" and user.roles == ("Console.Reader",)
    assert user.identity_provider == "aad"


def test_a_real_principal_still_signs_in():
    document = {
        "auth_typ": "aad",
        "claims": [
            {"typ": "preferred_username", "val": "ada@contoso.com"},
            {"typ": "http://schemas.microsoft.com/identity/claims/objectidentifier", "val": "oid-1"},
            {"typ": "tid", "val": "tenant-1"},
            {"typ": "http://schemas.microsoft.com/ws/2008/06/identity/claims/role", "val": "Console.Operator"},
        ],
    }
    user = signed_in_user({**headers_for(document), "X-MS-CLIENT-PRINCIPAL-NAME": "ada@contoso.com"})
    assert user is not None
    assert (user.email, user.object_id, user.tenant_id, user.roles) == (
        "ada@contoso.com",
        "oid-1",
        "tenant-1",
        ("Console.Operator",),
    )


def test_non_string_header_values_are_ignored():
    assert signed_in_user({"X-MS-CLIENT-PRINCIPAL": 5, "X-MS-CLIENT-PRINCIPAL-ID": None}) is None  # type: ignore[dict-item]


def test_console_answers_401_for_a_hostile_principal(make_services):
    from shared import console
    from shared.errors import UnauthorizedError

    services = make_services(CONSOLE_AUTH="entra", CONSOLE_TENANT_ID="tenant-1")
    user = signed_in_user(headers_for({"claims": 5}))
    with pytest.raises(UnauthorizedError):
        console.authorize(services, user)


# --- property: any JSON document, any bytes, any header map: never raises ---------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
claim = st.dictionaries(st.sampled_from(["typ", "val", "x"]), json_values, max_size=3) | json_values
document = (
    st.fixed_dictionaries({}, optional={"claims": st.lists(claim, max_size=6) | json_values, "auth_typ": json_values})
    | json_values
)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(document)
def test_any_json_principal_parses_without_raising(value):
    claims, roles, provider = parse_principal(encode(value))
    assert all(isinstance(k, str) and isinstance(v, str) and k and v for k, v in claims.items())
    assert all(isinstance(role, str) for role in roles) and isinstance(provider, str)
    user = signed_in_user(headers_for(value))
    assert user is None or (user.email or user.object_id)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()))
def test_any_header_text_parses_without_raising(encoded):
    parse_principal(encoded)
    signed_in_user({"X-MS-CLIENT-PRINCIPAL": encoded, "X-MS-CLIENT-PRINCIPAL-NAME": encoded})
