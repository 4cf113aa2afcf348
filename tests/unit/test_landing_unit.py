"""Landing page units: token restore, CSRF form tokens, escaping, security headers, Easy Auth principal.

Pages are produced by the real use cases (``shared.landing``) over the in-memory fakes and rendered
with ``shared.web.render_page``, so templates and their contexts are checked together.
"""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser

import jwt
import pytest

from devtools.devhost import SignedInUser as DevHostUser
from shared import landing
from shared.errors import ForbiddenError
from shared.form_tokens import FORM_TOKEN_TTL, issue_form_token, verify_form_token
from shared.landing import restore_token
from shared.principal import SignedInUser, signed_in_user
from shared.web import TEMPLATES, render_page, security_headers
from tests.fakes import fake_services

SECRET = "unit-test-form-secret-0123456789"
NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
SUB = "5f2a1b3c-0000-4000-8000-00000000a001"
OTHER_SUB = "5f2a1b3c-0000-4000-8000-00000000a002"
USER = "8c1d2e3f-0000-4000-8000-0000000000c1"
XSS = "<script>alert(1)</script>"
ATTR_XSS = '" onmouseover="alert(1)'


# --------------------------------------------------------------------------------------------------
# token restore
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("abc+def/ghi==", "abc+def/ghi=="),  # arrived percent-encoded: already right
        ("abc def/ghi==", "abc+def/ghi=="),  # '+' sent unencoded became a space
        ("a b c==", "a+b+c=="),
        (" abc/def==", "+abc/def=="),  # a leading '+' must not be trimmed away
        ("abc/def+", "abc/def+"),
        ("abc/def ", "abc/def+"),  # nor a trailing one
        ("abc%2Bdef%2F==", "abc%2Bdef%2F=="),  # never decoded a second time
        ("abc%20def", "abc%20def"),
        ("\tabc+def==\r\n", "abc+def=="),  # other whitespace is not part of a token
    ],
)
def test_restore_token(raw, expected):
    assert restore_token(raw) == expected


@pytest.mark.parametrize("raw", [None, "", "\n"])
def test_restore_token_empty(raw):
    assert restore_token(raw) == ""


def test_restore_token_round_trips_every_base64_token():
    for seed in range(200):
        token = base64.b64encode(bytes((seed * 37 + i) % 256 for i in range(31))).decode()
        assert restore_token(token.replace("+", " ")) == token


def test_view_purchase_resolves_the_restored_token():
    services = fake_services()
    token = "+abc/def+ghi=="
    services.marketplace.add(SUB, token=token)
    page = landing.view_purchase(services, token.replace("+", " "), _user())
    assert page.status == 200 and page.template == "confirm.html"
    assert services.marketplace.counter.counts["resolve"] == 1


# --------------------------------------------------------------------------------------------------
# CSRF form tokens
# --------------------------------------------------------------------------------------------------


def test_form_token_valid_and_bound_to_subscription_user_and_expiry():
    token = issue_form_token(SECRET, SUB, USER, NOW)
    verify_form_token(SECRET, token, SUB, USER, NOW)  # no exception
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (claims["sid"], claims["uid"]) == (SUB, USER)
    assert claims["exp"] - claims["iat"] == FORM_TOKEN_TTL.total_seconds()
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


def test_form_token_still_valid_just_before_expiry():
    token = issue_form_token(SECRET, SUB, USER, NOW)
    verify_form_token(SECRET, token, SUB, USER, NOW + FORM_TOKEN_TTL - timedelta(seconds=1))


@pytest.mark.parametrize("later", [FORM_TOKEN_TTL + timedelta(seconds=1), timedelta(days=2)])
def test_form_token_expired(later):
    token = issue_form_token(SECRET, SUB, USER, NOW)
    with pytest.raises(ForbiddenError, match="expired"):
        verify_form_token(SECRET, token, SUB, USER, NOW + later)


def test_form_token_with_non_numeric_expiry_is_refused():
    token = jwt.encode({"sid": SUB, "uid": USER, "aud": "landing-form", "exp": "never"}, SECRET, algorithm="HS256")
    with pytest.raises(ForbiddenError):
        verify_form_token(SECRET, token, SUB, USER, _now())


def _now() -> datetime:
    return datetime.now(UTC)


def _claims(**overrides):
    claims = {"sid": SUB, "uid": USER, "aud": "landing-form", "iat": _now(), "exp": _now() + timedelta(minutes=5)}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(
            lambda: jwt.encode(_claims(), "another-secret-0123456789abcdef-xyz", algorithm="HS256"), id="forged signature"
        ),
        pytest.param(lambda: jwt.encode(_claims(), None, algorithm="none"), id="alg none"),
        pytest.param(lambda: jwt.encode(_claims(), SECRET * 2, algorithm="HS512"), id="other algorithm"),
        pytest.param(lambda: jwt.encode(_claims(aud="something-else"), SECRET, algorithm="HS256"), id="other audience"),
        pytest.param(lambda: jwt.encode(_claims(exp=None), SECRET, algorithm="HS256"), id="no expiry"),
        pytest.param(lambda: jwt.encode(_claims(uid=None), SECRET, algorithm="HS256"), id="no user"),
        pytest.param(lambda: _flip_signature(issue_form_token(SECRET, SUB, USER, _now())), id="tampered signature"),
        pytest.param(
            lambda: _swap_payload(issue_form_token(SECRET, SUB, USER, _now()), issue_form_token(SECRET, OTHER_SUB, USER, _now())),
            id="spliced payload",
        ),
        pytest.param(lambda: "", id="empty"),
        pytest.param(lambda: "not-a-token", id="garbage"),
    ],
)
def test_form_token_not_ours_is_refused(token):
    with pytest.raises(ForbiddenError, match="not valid"):
        verify_form_token(SECRET, token(), SUB, USER, _now())


def _flip_signature(token: str) -> str:
    head, payload, signature = token.split(".")
    return ".".join((head, payload, ("A" if signature[0] != "A" else "B") + signature[1:]))


def _swap_payload(token: str, other: str) -> str:
    return ".".join((token.split(".")[0], other.split(".")[1], token.split(".")[2]))


def test_form_token_for_another_subscription_is_refused():
    token = issue_form_token(SECRET, OTHER_SUB, USER, _now())
    with pytest.raises(ForbiddenError, match="another subscription"):
        verify_form_token(SECRET, token, SUB, USER, _now())


def test_form_token_for_another_user_is_refused():
    token = issue_form_token(SECRET, SUB, "someone-else", _now())
    with pytest.raises(ForbiddenError, match="another user"):
        verify_form_token(SECRET, token, SUB, USER, _now())


def test_form_token_never_carries_the_purchase_token():
    services = fake_services()
    purchase_token = "pUrChAsE+ToKeN/abc=="
    services.marketplace.add(SUB, token=purchase_token)
    page = landing.view_purchase(services, purchase_token, _user())
    claims = jwt.decode(page.context["form_token"], options={"verify_signature": False})
    assert purchase_token not in json.dumps(claims)
    html, _ = render_page(page.template, page.context)
    assert purchase_token not in html


def test_confirm_with_refused_form_token_changes_nothing():
    services = fake_services()
    services.marketplace.add(SUB, token="tok")
    landing.view_purchase(services, "tok", _user())
    before = services.repository.get(SUB)
    forged = jwt.encode(_claims(), "another-secret-0123456789abcdef-xyz", algorithm="HS256")
    page = landing.confirm_activation(services, SUB, forged, _user())
    assert page.status == 403 and page.template == "forbidden.html"
    assert services.repository.get(SUB) == before
    assert services.marketplace.activations == []


# --------------------------------------------------------------------------------------------------
# rendering: escaping, templates, headers
# --------------------------------------------------------------------------------------------------


def _user(name: str = "Ada Lovelace", email: str = "ada@contoso.example") -> SignedInUser:
    return SignedInUser(name=name, email=email, object_id=USER)


class _Tags(HTMLParser):
    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _all_pages(**settings):
    """One Page per template the use cases produce, with hostile text wherever a buyer controls it."""
    pages = {}

    def make(**overrides):
        return fake_services(
            BRAND_NAME="Contoso <b>Analytics</b>", SUPPORT_EMAIL="help@contoso.example", **{**settings, **overrides}
        )

    services = make()
    user = _user(name=XSS, email="ada+x@contoso.example")
    market = services.marketplace

    def purchase(sid, status="PendingFulfillmentStart"):
        market.add(sid, status=status, name=XSS, token="tok-" + sid)
        market.subscriptions[sid]["purchaser"] = {"emailId": ATTR_XSS}
        return "tok-" + sid

    pages["no_token"] = landing.view_purchase(services, "", user)
    pages["sign_in"] = landing.view_purchase(make(), "tok+en/==", None)
    pages["invalid_token"] = landing.view_purchase(services, "unknown", user)
    confirm = landing.view_purchase(services, purchase("113ba2cc-a164-590a-813a-610bde26bc45"), user)
    pages["confirm"] = confirm
    pages["forbidden"] = landing.confirm_activation(services, "113ba2cc-a164-590a-813a-610bde26bc45", "bad", user)
    pages["success"] = landing.confirm_activation(
        services, "113ba2cc-a164-590a-813a-610bde26bc45", confirm.context["form_token"], user
    )
    for status in ("Subscribed", "Suspended", "Unsubscribed"):
        pages["returning " + status] = landing.view_purchase(services, purchase("s-" + status, status), user)
    market.activation_completes = False
    pending = landing.view_purchase(services, purchase("95a9165e-356e-51b5-8127-ab5f92038727"), user)
    pages["requested"] = landing.confirm_activation(
        services, "95a9165e-356e-51b5-8127-ab5f92038727", pending.context["form_token"], user
    )
    pages["activating"] = landing.view_purchase(services, "tok-95a9165e-356e-51b5-8127-ab5f92038727", user)
    manual = make(ACTIVATION_MODE="manual")
    manual.marketplace.add("50c04129-eaa3-5e2a-8154-f34ebb84bb7a", name=XSS, token="tok-manual")
    form = landing.view_purchase(manual, "tok-manual", user).context["form_token"]
    pages["pending_operator"] = landing.confirm_activation(manual, "50c04129-eaa3-5e2a-8154-f34ebb84bb7a", form, user)
    pages["sign_in_expired"] = landing.confirm_activation(services, "113ba2cc-a164-590a-813a-610bde26bc45", "x", None)
    down = make()
    down.marketplace.add("7b2e1d87-5438-562f-8557-e3fa0e42455f", token="tok-down")
    down.repository.down = True
    pages["unavailable"] = landing.view_purchase(down, "tok-down", user)
    return pages


def test_use_cases_produce_every_template():
    templates = {page.template for page in _all_pages().values()}
    expected = {
        path.name
        for path in TEMPLATES.glob("*.html")
        if not path.name.startswith(("_", "console_"))
        and path.name != "base.html"  # console pages: tests/integration/test_console.py
    }
    assert templates == expected


@pytest.mark.parametrize("name", sorted(_all_pages()))
def test_every_page_escapes_buyer_controlled_text(name):
    page = _all_pages()[name]
    html, _headers = render_page(page.template, page.context)
    assert "<script" not in html.lower()
    assert XSS not in html and ATTR_XSS not in html
    assert "<b>Analytics</b>" not in html and "Contoso &lt;b&gt;Analytics&lt;/b&gt;" in html
    if page.context.get("subscription_name"):
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    for tag, attrs in _Tags(html).tags:
        assert not any(attr.startswith("on") for attr in attrs), (tag, attrs)  # no event handler got in
        assert "style" not in attrs, (tag, attrs)  # CSP: no inline style attributes


def test_escaping_inside_attributes():
    html, _ = render_page(
        "manage.html", {**_all_pages()["returning Subscribed"].context, "saas_app_url": 'https://app.example/" onclick="alert(1)'}
    )
    links = [attrs for tag, attrs in _Tags(html).tags if attrs.get("data-testid") == "open-app"]
    assert links == [{"class": "button", "href": 'https://app.example/" onclick="alert(1)', "data-testid": "open-app"}]
    assert 'href="https://app.example/&#34; onclick=&#34;alert(1)"' in html


def test_confirmation_form_holds_only_subscription_and_csrf_token():
    page = _all_pages()["confirm"]
    html, _ = render_page(page.template, page.context)
    inputs = [attrs for tag, attrs in _Tags(html).tags if tag == "input"]
    assert [(i["type"], i["name"]) for i in inputs] == [("hidden", "subscription_id"), ("hidden", "form_token")]
    assert inputs[1]["value"] == page.context["form_token"]
    buttons = re.findall(r"<button[^>]*>(.*?)</button>", html, re.S)
    assert [b.strip() for b in buttons] == ["Activate subscription"]
    forms = [attrs for tag, attrs in _Tags(html).tags if tag == "form"]
    assert forms == [{"method": "post", "action": "/api/landing"}]


def _csp(headers) -> dict[str, list[str]]:
    return {part.split()[0]: part.split()[1:] for part in headers["Content-Security-Policy"].split(";") if part.strip()}


def test_security_headers():
    headers = security_headers("n0nce")
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    csp = _csp(headers)
    assert csp["default-src"] == ["'none'"]
    assert csp["frame-ancestors"] == ["'none'"]
    assert csp["base-uri"] == ["'none'"]
    assert csp["form-action"] == ["'self'"]
    assert csp["style-src"] == ["'nonce-n0nce'"]
    assert all(source.startswith("'nonce-") for source in csp.get("script-src", []))  # else default-src 'none'
    assert "unsafe-inline" not in headers["Content-Security-Policy"]
    assert "unsafe-eval" not in headers["Content-Security-Policy"]


@pytest.mark.parametrize("name", ["confirm", "success", "unavailable", "sign_in"])
def test_render_page_nonce_matches_and_is_fresh(name):
    page = _all_pages()[name]
    first_html, first = render_page(page.template, page.context)
    second_html, second = render_page(page.template, page.context)
    nonces = []
    for html, headers in ((first_html, first), (second_html, second)):
        (nonce,) = [s[len("'nonce-") : -1] for s in _csp(headers)["style-src"]]
        assert len(nonce) >= 16
        styles = [attrs for tag, attrs in _Tags(html).tags if tag == "style"]
        assert styles and all(attrs.get("nonce") == nonce for attrs in styles)
        nonces.append(nonce)
    assert nonces[0] != nonces[1]


def test_unavailable_page_quotes_the_correlation_id():
    from shared.observability import correlation

    down = fake_services()
    down.marketplace.add("s", token="t")
    down.repository.down = True
    with correlation("cid-1234") as cid:
        page = landing.view_purchase(down, "t", _user())
    assert page.status == 503
    html, _ = render_page(page.template, page.context)
    assert html.count(cid) == 2  # in the message and in the footer


# --------------------------------------------------------------------------------------------------
# Easy Auth principal
# --------------------------------------------------------------------------------------------------


def _principal_header(claims: list[tuple[str, str]], *, padding: bool = True, auth_typ: str = "aad") -> str:
    body = {
        "auth_typ": auth_typ,
        "claims": [{"typ": t, "val": v} for t, v in claims],
        "name_typ": "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/emailaddress",
        "role_typ": "http://schemas.microsoft.com/ws/2008/06/identity/claims/role",
    }
    encoded = base64.b64encode(json.dumps(body, ensure_ascii=False).encode("utf-8")).decode()
    return encoded if padding else encoded.rstrip("=")


URI = {
    "name": "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name",
    "email": "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/emailaddress",
    "upn": "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/upn",
    "oid": "http://schemas.microsoft.com/identity/claims/objectidentifier",
    "tid": "http://schemas.microsoft.com/identity/claims/tenantid",
}


def test_principal_with_short_claim_names():
    header = _principal_header(
        [("name", "Ada Lovelace"), ("preferred_username", "ada@contoso.example"), ("oid", "oid-1"), ("tid", "tid-1")]
    )
    user = signed_in_user({"X-MS-CLIENT-PRINCIPAL": header, "X-MS-CLIENT-PRINCIPAL-IDP": "aad"})
    assert user == SignedInUser("Ada Lovelace", "ada@contoso.example", "oid-1", "tid-1", "aad")
    assert user.id == "oid-1"
    assert user.label == "Ada Lovelace <ada@contoso.example>"


def test_principal_with_uri_claim_types_only():
    header = _principal_header(
        [(URI["name"], "Zoë Ångström"), (URI["email"], "zoe@fabrikam.example"), (URI["oid"], "oid-2"), (URI["tid"], "tid-2")],
        auth_typ="aad",
    )
    user = signed_in_user({"x-ms-client-principal": header})
    assert (user.name, user.email, user.object_id, user.tenant_id) == ("Zoë Ångström", "zoe@fabrikam.example", "oid-2", "tid-2")
    assert user.identity_provider == "aad"


def test_principal_upn_claim_as_email():
    user = signed_in_user({"X-MS-CLIENT-PRINCIPAL": _principal_header([(URI["upn"], "upn@contoso.example"), (URI["oid"], "o")])})
    assert user.email == "upn@contoso.example"


def test_principal_without_base64_padding():
    header = _principal_header([("name", "Ada"), ("email", "ada@contoso.example"), ("oid", "oid-3")], padding=False)
    assert not header.endswith("=")
    user = signed_in_user({"X-MS-CLIENT-PRINCIPAL": header})
    assert (user.name, user.email, user.object_id) == ("Ada", "ada@contoso.example", "oid-3")


def test_principal_from_name_and_id_headers_only():
    user = signed_in_user({"X-MS-CLIENT-PRINCIPAL-NAME": "ada@contoso.example", "X-MS-CLIENT-PRINCIPAL-ID": "oid-4"})
    assert (user.email, user.object_id, user.id) == ("ada@contoso.example", "oid-4", "oid-4")


def test_principal_id_falls_back_to_lower_case_email():
    user = signed_in_user({"X-MS-CLIENT-PRINCIPAL": _principal_header([("email", "Ada@Contoso.Example")])})
    assert user.id == "ada@contoso.example"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-MS-CLIENT-PRINCIPAL": "!!!not base64!!!"},
        {"X-MS-CLIENT-PRINCIPAL": base64.b64encode(b"[1, 2, 3]").decode()},
        {"X-MS-CLIENT-PRINCIPAL": base64.b64encode(b"{not json").decode()},
        {"X-MS-CLIENT-PRINCIPAL": _principal_header([("name", "No Identity")])},
        {"X-MS-CLIENT-PRINCIPAL-NAME": "just a name"},
    ],
)
def test_no_principal(headers):
    assert signed_in_user(headers) is None


def test_malformed_principal_falls_back_to_the_plain_headers():
    user = signed_in_user(
        {"X-MS-CLIENT-PRINCIPAL": "%%%", "X-MS-CLIENT-PRINCIPAL-NAME": "ada@contoso.example", "X-MS-CLIENT-PRINCIPAL-ID": "oid-5"}
    )
    assert (user.email, user.object_id) == ("ada@contoso.example", "oid-5")


def test_principal_from_the_dev_host_easy_auth_stand_in():
    dev = DevHostUser.parse("Ada Lovelace <ada@contoso.example>")
    user = signed_in_user(dev.headers())
    assert (user.name, user.email, user.object_id, user.tenant_id) == (dev.name, dev.email, dev.object_id, dev.tenant_id)
    assert user.identity_provider == "aad"
