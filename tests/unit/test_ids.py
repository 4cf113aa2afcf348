"""Marketplace ids are GUIDs; anything else is refused before it reaches a storage key or a URL."""

from __future__ import annotations

import pytest

from shared.errors import BadRequestError
from shared.ids import is_marketplace_id, require_marketplace_id

GOOD = "37f9dea2-4345-438f-b0bd-03d40d28c7e0"


@pytest.mark.parametrize("value", [GOOD, GOOD.upper(), "00000000-0000-0000-0000-000000000000"])
def test_guids_are_accepted_in_their_canonical_lower_case_form(value):
    assert is_marketplace_id(value)
    assert require_marketplace_id(value) == value.lower()


@pytest.mark.parametrize(
    "value",
    [
        "",
        "a/b",
        "..",
        f"{GOOD}/..",
        f"{GOOD}?b=1",
        "a?b=1",
        f"{GOOD}'",
        f"'{GOOD}",
        f"{GOOD}\n",
        f" {GOOD}",
        GOOD[:-1],
        GOOD + "0",
        "{" + GOOD + "}",
        GOOD.replace("-", ""),
        "37f9dea2-4345-438f-b0bd-03d40d28c7eg",
        None,
        123,
        ["x"],
    ],
)
def test_anything_else_is_refused_without_echoing_it(value):
    assert not is_marketplace_id(value)
    with pytest.raises(BadRequestError) as raised:
        require_marketplace_id(value, "operation id")
    assert raised.value.http_status == 400
    assert "operation id must be a GUID" in str(raised.value)
    if isinstance(value, str) and value:
        assert value not in str(raised.value)
