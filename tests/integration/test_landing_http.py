"""The landing page (GET/POST /api/landing) over real HTTP: dev host + Azurite + marketplace stand-in.

No browser: ``requests`` and a small HTML parser. Every check reads real behaviour back: the HTTP
status, the stored record and its history (``services.repository``) and the stand-in's counters.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from html.parser import HTMLParser
from urllib.parse import parse_qs, quote, urlsplit

import jwt
import pytest
import requests

from devtools.devhost import SignedInUser
from devtools.marketplace_standin import make_identity, make_plan
from shared.domain import utc_now
from shared.form_tokens import issue_form_token
from shared.state_machine import LocalStatus
from tests.conftest import FORM_SECRET, TEST_USER, sign_in

pytestmark = pytest.mark.azurite

TIMEOUT = 30
SAAS_APP_URL = "https://app.contoso.example/"
OTHER_USER = "Eve Mallory <eve@fabrikam.example>"
REQUIRED_HEADERS = {
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


class ParsedPage(HTMLParser):
    """Forms (fields, buttons), text and attributes of elements with a data-testid or an id."""

    VOID = frozenset({"input", "br", "img", "meta", "link", "hr", "source", "wbr"})

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.forms: list[dict] = []
        self.buttons: list[str] = []
        self.scripts = 0
        self._stack: list[tuple[str, dict]] = []
        self._text: dict[str, list[str]] = {}
        self._attrs: dict[str, dict] = {}
        self.feed(text)
        self.close()

    @staticmethod
    def _keys(attrs: dict) -> list[str]:
        keys = []
        if attrs.get("data-testid"):
            keys.append(attrs["data-testid"])
        if attrs.get("id"):
            keys.append("#" + attrs["id"])
        return keys

    def handle_starttag(self, tag, attrs):
        attrs = {name: value or "" for name, value in attrs}
        if tag == "script":
            self.scripts += 1
        if tag == "form":
            self.forms.append(
                {
                    "method": attrs.get("method", "get").lower(),
                    "action": attrs.get("action", ""),
                    "fields": {},
                    "inputs": [],
                    "buttons": [],
                }
            )
        if tag == "input" and self.forms:
            self.forms[-1]["inputs"].append(attrs)
            self.forms[-1]["fields"][attrs.get("name", "")] = attrs.get("value", "")
        for key in self._keys(attrs):
            self._attrs[key] = attrs
            self._text.setdefault(key, [])
        if tag in self.VOID:
            return
        if tag == "button":
            self.buttons.append("")
            if self.forms:
                self.forms[-1]["buttons"].append(attrs)
        self._stack.append((tag, attrs))

    def handle_endtag(self, tag):
        for index in range(len(self._stack) - 1, -1, -1):
            if self._stack[index][0] == tag:
                del self._stack[index:]
                return

    def handle_data(self, data):
        for tag, attrs in self._stack:
            for key in self._keys(attrs):
                self._text[key].append(data)
            if tag == "button":
                self.buttons[-1] += data

    def text(self, key: str) -> str:
        assert key in self._text, f"no element {key!r} on the page"
        return " ".join("".join(self._text[key]).split())

    def has(self, key: str) -> bool:
        return key in self._text

    def attrs(self, key: str) -> dict:
        return self._attrs[key]

    @property
    def title(self) -> str:
        return self.text("#page-title")


def landing(host) -> str:
    return host.url + "/api/landing"


def encoded(token: str) -> str:
    return quote(token, safe="")


def get_page(host, token: str | None = None, *, raw_query: str | None = None) -> tuple[requests.Response, ParsedPage]:
    url = landing(host)
    if raw_query is not None:
        url += "?" + raw_query
    elif token is not None:
        url += "?token=" + encoded(token)
    response = requests.get(url, timeout=TIMEOUT)
    return response, ParsedPage(response.text)


def post_form(host, fields: dict[str, str]) -> tuple[requests.Response, ParsedPage]:
    response = requests.post(landing(host), data=fields, timeout=TIMEOUT)
    return response, ParsedPage(response.text)


def confirm_form(page: ParsedPage) -> dict[str, str]:
    assert len(page.forms) == 1, page.forms
    form = page.forms[0]
    assert form["method"] == "post" and form["action"] == "/api/landing"
    return dict(form["fields"])


def open_confirmation(host, token: str) -> dict[str, str]:
    response, page = get_page(host, token)
    assert response.status_code == 200, response.text
    assert page.title == "Confirm your subscription"
    return confirm_form(page)


def stored(services, subscription_id: str):
    found = services.repository.get(subscription_id)
    return found.record if found else None


def snapshot(services, subscription_id: str):
    """Everything that must stay put when a request is refused: the row (with its ETag) and history."""
    found = services.repository.get(subscription_id)
    return (found.etag if found else None, found.record if found else None, len(services.repository.history(subscription_id)))


def history_kinds(services, subscription_id: str) -> list[str]:
    return [entry["kind"] for entry in services.repository.history(subscription_id)]


def assert_security_headers(response: requests.Response) -> None:
    for name, value in REQUIRED_HEADERS.items():
        assert response.headers.get(name) == value, (name, response.headers.get(name))
    assert response.headers["Content-Type"].startswith("text/html")
    csp = response.headers.get("Content-Security-Policy", "")
    directives = {part.split()[0]: part.split()[1:] for part in csp.split(";") if part.strip()}
    assert directives.get("frame-ancestors") == ["'none'"], csp
    assert directives.get("default-src") == ["'none'"], csp
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp, csp
    for directive in ("script-src", "style-src"):
        for source in directives.get(directive, []):
            assert source.startswith("'nonce-") or source in ("'self'", "'none'"), csp


@pytest.fixture
def host(devhost):
    return devhost


@pytest.fixture
def host_with(make_services, devhost_session):
    """The dev host with services built from setting overrides: ``host, services = host_with(...)``."""
    sign_in(devhost_session, TEST_USER)
    yield lambda **overrides: (devhost_session, make_services(**overrides))
    sign_in(devhost_session, TEST_USER)


# --------------------------------------------------------------------------------------------------
# token in the query string
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("query", [None, "token=", "other=1"])
def test_missing_token_is_400_and_nothing_resolved(host, standin, query):
    response, page = get_page(host, raw_query=query)
    assert response.status_code == 400
    assert page.title == "We need your purchase details"
    assert "Configure account" in response.text  # Microsoft's way to get a new link
    assert standin.calls["resolve"] == 0
    assert_security_headers(response)


def test_expired_token_is_400_with_reopen_instructions(host, standin, services):
    purchase = standin.create_purchase()
    standin.expire_token(purchase["token"])

    response, page = get_page(host, purchase["token"])

    assert response.status_code == 400
    assert page.title == "We couldn't identify this purchase"
    assert "expired" in page.text("#page-title") + response.text
    assert "Configure account" in response.text and "Manage account" in response.text
    assert standin.last_request("resolve")["status"] == 400
    assert stored(services, purchase["subscriptionId"]) is None
    assert not page.forms
    assert_security_headers(response)


def test_unknown_token_is_400(host, standin, services):
    response, page = get_page(host, "bm90LWEtcmVhbC10b2tlbg+/==")
    assert response.status_code == 400
    assert page.title == "We couldn't identify this purchase"
    assert standin.calls["resolve"] == 1


@pytest.mark.parametrize("how", ["percent-encoded", "raw plus (ASP.NET turns it into a space)"])
def test_token_reaches_resolve_exactly_as_issued(host, standin, services, how):
    purchase = standin.create_purchase()
    token = purchase["token"]
    assert "+" in token and "/" in token and token.endswith("=")
    query = "token=" + (encoded(token) if how == "percent-encoded" else token)

    response, page = get_page(host, raw_query=query)

    assert response.status_code == 200, response.text
    assert page.title == "Confirm your subscription"
    assert standin.last_request("resolve")["headers"]["x-ms-marketplace-token"] == token
    assert stored(services, purchase["subscriptionId"]).status is LocalStatus.PENDING_FULFILLMENT_START


def test_token_is_decoded_only_once(host, standin, services):
    """A token that was percent-encoded twice reaches Resolve with its '%2B' intact: never decoded again."""
    purchase = standin.create_purchase()
    token = purchase["token"]

    response, _page = get_page(host, raw_query="token=" + encoded(encoded(token)))

    assert standin.last_request("resolve")["headers"]["x-ms-marketplace-token"] == encoded(token)
    assert response.status_code == 400
    assert stored(services, purchase["subscriptionId"]) is None


def test_token_starting_with_plus_sent_unencoded(host, standin, services):
    """Base64 tokens may start with '+'; unencoded it arrives as a leading space and must come back."""
    purchase = standin.create_purchase()
    # one stand-in token in 64 starts with '+': ask for new ones ("Manage account") until one does
    leading = next(
        token for token in (standin.new_token(purchase["subscriptionId"])["token"] for _ in range(5000)) if token.startswith("+")
    )

    response, page = get_page(host, raw_query="token=" + leading)

    assert standin.last_request("resolve")["headers"]["x-ms-marketplace-token"] == leading
    assert response.status_code == 200, page.title


# --------------------------------------------------------------------------------------------------
# sign-in
# --------------------------------------------------------------------------------------------------


def test_no_principal_gets_401_and_login_round_trips_the_token(host, standin, services):
    purchase = standin.create_purchase(name="Secret Project")
    token = purchase["token"]
    sign_in(host, None)

    response, page = get_page(host, token)

    assert response.status_code == 401
    assert page.title == "Sign in to continue"
    assert "Secret Project" not in response.text and purchase["subscriptionId"] not in response.text
    assert not page.forms
    assert standin.calls["resolve"] == 0, "purchase details must not be fetched for an anonymous visitor"
    assert stored(services, purchase["subscriptionId"]) is None
    assert_security_headers(response)

    login = urlsplit(page.attrs("sign-in")["href"])
    assert login.path == "/.auth/login/aad"
    # Easy Auth decodes post_login_redirect_uri once and sends the browser there after sign-in.
    back = parse_qs(login.query, strict_parsing=True)["post_login_redirect_uri"]
    assert len(back) == 1 and back[0].startswith("/api/landing?")
    sign_in(host, TEST_USER)
    response = requests.get(host.url + back[0], timeout=TIMEOUT)
    assert response.status_code == 200
    assert ParsedPage(response.text).title == "Confirm your subscription"
    assert standin.last_request("resolve")["headers"]["x-ms-marketplace-token"] == token


def test_login_link_keeps_a_plus_that_arrived_as_space(host, standin):
    purchase = standin.create_purchase()
    token = purchase["token"]
    sign_in(host, None)

    response, page = get_page(host, raw_query="token=" + token)  # '+' unencoded

    assert response.status_code == 401
    back = parse_qs(urlsplit(page.attrs("sign-in")["href"]).query)["post_login_redirect_uri"][0]
    assert parse_qs(urlsplit(back).query)["token"] == [token]


def test_post_without_principal_changes_nothing(host, standin, services):
    purchase = standin.create_purchase()
    fields = open_confirmation(host, purchase["token"])
    before = snapshot(services, purchase["subscriptionId"])
    sign_in(host, None)

    response, page = post_form(host, fields)

    assert response.status_code == 401
    assert page.title == "Your session has ended"
    assert snapshot(services, purchase["subscriptionId"]) == before
    assert standin.activation_count(purchase["subscriptionId"]) == 0


def test_signin_can_be_switched_off(host_with, standin):
    host, services = host_with(LANDING_REQUIRE_SIGNIN="false")
    purchase = standin.create_purchase()
    sign_in(host, None)

    fields = open_confirmation(host, purchase["token"])
    response, page = post_form(host, fields)

    assert response.status_code == 200
    assert page.title == "Your subscription is active"
    record = stored(services, purchase["subscriptionId"])
    assert record.status is LocalStatus.SUBSCRIBED
    assert record.activated_by == "anonymous"


# --------------------------------------------------------------------------------------------------
# a new purchase, activated
# --------------------------------------------------------------------------------------------------


ADA_TENANT = SignedInUser.parse(TEST_USER).tenant_id  # the dev host signs Ada in from this tenant


def test_new_purchase_page_shows_every_detail(host, standin, services):
    standin.set_plans(
        "contoso-offer", [make_plan("team", per_seat=True, min_quantity=1, max_quantity=50, display_name="Team (per seat)")]
    )
    purchaser = make_identity("reseller@partner.example")
    beneficiary = make_identity("owner@customer.example", tenant_id=ADA_TENANT)  # Ada works for the customer
    purchase = standin.create_purchase(
        plan_id="team",
        quantity=7,
        name="Analytics for Finance",
        purchaser=purchaser,
        beneficiary=beneficiary,
        term_unit="P1Y",
        is_free_trial=True,
    )
    sid = purchase["subscriptionId"]

    response, page = get_page(host, purchase["token"])

    assert response.status_code == 200
    assert_security_headers(response)
    assert page.title == "Confirm your subscription"
    assert page.text("subscription-name") == "Analytics for Finance"
    assert page.text("offer") == "contoso-offer"
    assert page.text("plan").startswith("Team (per seat)")
    assert page.text("quantity") == "7"
    assert page.text("term").startswith("1 year")
    assert page.text("free-trial") == "Yes"
    assert page.text("purchaser") == "reseller@partner.example"
    assert page.text("beneficiary").startswith("owner@customer.example")
    assert "behalf" in page.text("beneficiary")  # CSP purchase: purchaser and beneficiary differ
    assert page.text("signed-in-user") == "Ada Lovelace (ada@contoso.example)"
    assert page.text("status") == "Awaiting activation"

    fields = confirm_form(page)
    assert set(fields) == {"subscription_id", "form_token"}
    assert fields["subscription_id"] == sid
    assert all(attrs.get("type") == "hidden" for attrs in page.forms[0]["inputs"])
    assert [b.strip() for b in page.buttons] == ["Activate subscription"]
    assert page.forms[0]["buttons"][0].get("type", "submit") == "submit"
    for form_of_token in (purchase["token"], encoded(purchase["token"])):
        assert form_of_token not in response.text
    assert page.scripts == 0

    record = stored(services, sid)
    assert record.status is LocalStatus.PENDING_FULFILLMENT_START
    assert (record.plan_id, record.quantity, record.term_unit, record.is_free_trial) == ("team", 7, "P1Y", True)
    assert record.purchaser.email_id == "reseller@partner.example"
    assert record.beneficiary.email_id == "owner@customer.example"
    assert record.signed_in_user == TEST_USER
    assert history_kinds(services, sid) == ["record_purchase"]
    assert services.repository.history(sid)[0]["actor"] == TEST_USER
    assert standin.activation_count(sid) == 0


def test_single_purchaser_is_not_marked_as_csp(host, standin):
    purchase = standin.create_purchase(purchaser=make_identity("solo@customer.example", tenant_id=ADA_TENANT))
    _response, page = get_page(host, purchase["token"])
    assert page.text("purchaser") == page.text("beneficiary") == "solo@customer.example"
    assert page.text("free-trial") == "No"


def test_returning_to_the_same_link_writes_nothing(host, standin, services):
    purchase = standin.create_purchase()
    open_confirmation(host, purchase["token"])
    before = snapshot(services, purchase["subscriptionId"])
    open_confirmation(host, purchase["token"])
    assert snapshot(services, purchase["subscriptionId"]) == before


def test_activate_records_subscribed_and_who_activated(host, standin, services):
    purchase = standin.create_purchase(name="Analytics")
    sid = purchase["subscriptionId"]
    fields = open_confirmation(host, purchase["token"])
    gets_before = standin.calls["get"]

    response, page = post_form(host, fields)

    assert response.status_code == 200
    assert_security_headers(response)
    assert page.title == "Your subscription is active"
    assert page.text("status") == "Active"
    assert page.attrs("open-app")["href"] == SAAS_APP_URL
    assert not page.forms
    assert purchase["token"] not in response.text
    assert standin.activation_count(sid) == 1
    assert standin.get_subscription(sid)["saasSubscriptionStatus"] == "Subscribed"
    assert standin.calls["get"] - gets_before == 1, "after Activate answers 200, read back exactly once"

    record = stored(services, sid)
    assert record.status is LocalStatus.SUBSCRIBED
    assert record.marketplace_status == "Subscribed"
    assert record.activated_by == TEST_USER
    microsoft_term = standin.get_subscription(sid)["term"]
    assert record.term_start.date().isoformat() == microsoft_term["startDate"][:10]
    assert page.text("term").endswith(microsoft_term["endDate"][:10])
    history = services.repository.history(sid)
    assert [entry["kind"] for entry in history] == ["record_purchase", "activation_sent", "activation_confirmed"]
    assert [entry["toStatus"] for entry in history] == ["PendingFulfillmentStart", "ActivationRequested", "Subscribed"]
    assert {entry["actor"] for entry in history} == {TEST_USER}


def test_double_submit_activates_once(host, standin, services):
    purchase = standin.create_purchase()
    sid = purchase["subscriptionId"]
    fields = open_confirmation(host, purchase["token"])

    first, first_page = post_form(host, fields)
    second, second_page = post_form(host, fields)  # the same form again (double click, refresh)

    assert (first.status_code, second.status_code) == (200, 200)
    assert first_page.title == second_page.title == "Your subscription is active"
    assert standin.activation_count(sid) == 1
    assert history_kinds(services, sid).count("activation_sent") == 1
    assert stored(services, sid).status is LocalStatus.SUBSCRIBED

    # a refresh of the landing link afterwards: the active page, no form, no activation
    response, page = get_page(host, purchase["token"])
    assert response.status_code == 200 and page.title == "Your subscription" and not page.forms
    assert standin.activation_count(sid) == 1


def test_concurrent_submits_from_two_tabs_activate_once(host, standin, services):
    purchase = standin.create_purchase()
    sid = purchase["subscriptionId"]
    tabs = [open_confirmation(host, purchase["token"]) for _ in range(2)]  # two tabs, two form tokens
    assert tabs[0]["form_token"] != tabs[1]["form_token"] or tabs[0] == tabs[1]
    posts = [tabs[i % 2] for i in range(6)]
    barrier = threading.Barrier(len(posts))
    results: list = [None] * len(posts)

    def submit(index: int) -> None:
        barrier.wait(timeout=10)
        results[index] = post_form(host, posts[index])

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(posts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert all(result is not None for result in results)
    assert [response.status_code for response, _ in results] == [200] * len(posts)
    titles = {page.title for _, page in results}
    assert titles <= {"Your subscription is active", "Your subscription is being activated"}, titles
    assert standin.activation_count(sid) == 1
    assert history_kinds(services, sid).count("activation_sent") == 1
    assert stored(services, sid).status is LocalStatus.SUBSCRIBED


def test_asynchronous_activation_stays_requested(host, standin, services):
    standin.activation_delay_seconds = 60  # Microsoft accepts Activate but is not Subscribed yet
    purchase = standin.create_purchase()
    sid = purchase["subscriptionId"]
    fields = open_confirmation(host, purchase["token"])

    response, page = post_form(host, fields)

    assert response.status_code == 200
    assert page.title == "Your subscription is being activated"
    assert page.text("status") == "Activating"
    assert standin.activation_count(sid) == 1
    record = stored(services, sid)
    assert record.status is LocalStatus.ACTIVATION_REQUESTED
    assert record.activated_by == TEST_USER
    assert "activation_confirmed" not in history_kinds(services, sid)

    # the buyer comes back (new link from the portal) or submits again: no second Activate
    again, again_page = post_form(host, fields)
    assert again.status_code == 200 and again_page.title == "Your subscription is being activated"
    response, page = get_page(host, standin.new_token(sid)["token"])
    assert response.status_code == 200
    assert page.title == "Your subscription is being activated" and not page.forms
    assert standin.activation_count(sid) == 1
    assert stored(services, sid).status is LocalStatus.ACTIVATION_REQUESTED


def test_activation_confirmed_later_shows_active(host, standin, services):
    standin.activation_delay_seconds = 60
    purchase = standin.create_purchase()
    sid = purchase["subscriptionId"]
    post_form(host, open_confirmation(host, purchase["token"]))
    standin.set_subscription(sid, status="Subscribed")  # Microsoft finished

    response, page = get_page(host, standin.new_token(sid)["token"])

    assert response.status_code == 200 and page.title == "Your subscription"
    assert page.text("status") == "Active"
    assert stored(services, sid).status is LocalStatus.SUBSCRIBED
    assert standin.activation_count(sid) == 1


# --------------------------------------------------------------------------------------------------
# returning buyers and manual mode
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, title, badge, app_link",
    [
        ("Subscribed", "Your subscription", "Active", True),
        ("Suspended", "Your subscription", "Suspended", True),
        ("Unsubscribed", "This subscription was cancelled", "Cancelled", False),
    ],
)
def test_returning_buyer_sees_status_and_never_activates(host, standin, services, status, title, badge, app_link):
    purchase = standin.create_purchase()
    sid = purchase["subscriptionId"]
    standin.set_subscription(sid, status=status)

    response, page = get_page(host, purchase["token"])

    assert response.status_code == 200
    assert page.title == title
    assert page.text("status") == badge
    assert not page.forms and "Activate subscription" not in response.text
    assert page.has("open-app") == app_link
    if app_link:
        assert page.attrs("open-app")["href"] == SAAS_APP_URL
    assert stored(services, sid).status.value == status
    assert standin.activation_count(sid) == 0


def test_stale_form_for_a_subscription_activated_elsewhere(host, standin, services):
    """A tab left open while the subscription became active: success, no second Activate, no error."""
    purchase = standin.create_purchase()
    sid = purchase["subscriptionId"]
    fields = open_confirmation(host, purchase["token"])
    standin.set_subscription(sid, status="Subscribed")
    get_page(host, standin.new_token(sid)["token"])  # another tab saw it active

    response, page = post_form(host, fields)

    assert response.status_code == 200
    assert page.title == "Your subscription is active"
    assert standin.activation_count(sid) == 0
    assert stored(services, sid).status is LocalStatus.SUBSCRIBED


def test_activated_at_microsoft_while_our_record_is_pending(host, standin, services):
    """Our record still says pending but Microsoft is already Subscribed: Activate's 400 is read back as done."""
    purchase = standin.create_purchase()
    sid = purchase["subscriptionId"]
    fields = open_confirmation(host, purchase["token"])
    standin.set_subscription(sid, status="Subscribed")

    response, page = post_form(host, fields)

    assert response.status_code == 200
    assert page.title == "Your subscription is active"
    assert standin.last_request("activate")["status"] == 400
    assert standin.activation_count(sid) == 1
    record = stored(services, sid)
    assert record.status is LocalStatus.SUBSCRIBED
    assert record.term_start is not None  # adopted from Microsoft's read-back


def test_cancelled_at_microsoft_before_confirmation(host, standin, services):
    purchase = standin.create_purchase()
    sid = purchase["subscriptionId"]
    fields = open_confirmation(host, purchase["token"])
    standin.set_subscription(sid, status="Unsubscribed")

    response, page = post_form(host, fields)

    assert response.status_code == 200
    assert page.title == "This subscription was cancelled"
    assert stored(services, sid).status is LocalStatus.UNSUBSCRIBED
    assert standin.get_subscription(sid)["saasSubscriptionStatus"] == "Unsubscribed"


def test_manual_mode_records_pending_activation(host_with, standin):
    host, services = host_with(ACTIVATION_MODE="manual")
    purchase = standin.create_purchase()
    sid = purchase["subscriptionId"]

    response, page = get_page(host, purchase["token"])
    assert response.status_code == 200
    assert "We will finish setting up your account" in response.text
    fields = confirm_form(page)

    first, first_page = post_form(host, fields)
    second, second_page = post_form(host, fields)

    assert (first.status_code, second.status_code) == (200, 200)
    assert first_page.title == second_page.title == "We are setting up your account"
    assert first_page.text("status") == "Set-up in progress"
    record = stored(services, sid)
    assert record.status is LocalStatus.PENDING_ACTIVATION
    assert record.activated_by == TEST_USER
    assert standin.activation_count(sid) == 0
    assert standin.get_subscription(sid)["saasSubscriptionStatus"] == "PendingFulfillmentStart"
    assert history_kinds(services, sid) == ["record_purchase", "request_activation"]

    response, page = get_page(host, standin.new_token(sid)["token"])
    assert response.status_code == 200 and page.title == "We are setting up your account" and not page.forms


def test_manual_mode_stale_form_after_operator_activated(host_with, standin):
    host, services = host_with(ACTIVATION_MODE="manual")
    purchase = standin.create_purchase()
    sid = purchase["subscriptionId"]
    fields = open_confirmation(host, purchase["token"])
    standin.set_subscription(sid, status="Subscribed")
    get_page(host, standin.new_token(sid)["token"])

    response, page = post_form(host, fields)

    assert response.status_code == 200
    assert page.title == "Your subscription is active", "an active subscription is never 'being set up'"
    assert stored(services, sid).status is LocalStatus.SUBSCRIBED
    assert "request_activation" not in history_kinds(services, sid)
    assert standin.activation_count(sid) == 0


# --------------------------------------------------------------------------------------------------
# CSRF
# --------------------------------------------------------------------------------------------------


def _forged(fields, other):
    claims = jwt.decode(fields["form_token"], options={"verify_signature": False})
    return {**fields, "form_token": jwt.encode(claims, "not-our-secret-0123456789abcdef-xyz", algorithm="HS256")}


def _alg_none(fields, other):
    claims = jwt.decode(fields["form_token"], options={"verify_signature": False})
    return {**fields, "form_token": jwt.encode(claims, None, algorithm="none")}


def _expired(fields, other):
    issued = utc_now() - timedelta(hours=1)
    user_id = jwt.decode(fields["form_token"], options={"verify_signature": False})["uid"]
    return {**fields, "form_token": issue_form_token(FORM_SECRET, fields["subscription_id"], user_id, issued)}


def _other_subscription_id(fields, other):
    return {**fields, "subscription_id": other["subscription_id"]}


def _other_subscription_token(fields, other):
    return {**fields, "form_token": other["form_token"]}


def _missing(fields, other):
    return {"subscription_id": fields["subscription_id"]}


def _tampered(fields, other):
    head, payload, signature = fields["form_token"].split(".")
    return {**fields, "form_token": ".".join((head, payload, signature[::-1]))}


@pytest.mark.parametrize(
    "tamper",
    [_forged, _alg_none, _expired, _other_subscription_id, _other_subscription_token, _missing, _tampered],
    ids=lambda f: f.__name__.strip("_"),
)
def test_refused_form_token_changes_nothing(host, standin, services, tamper):
    mine, theirs = standin.create_purchase(), standin.create_purchase()
    fields = open_confirmation(host, mine["token"])
    other = open_confirmation(host, theirs["token"])
    before = {sid: snapshot(services, sid) for sid in (mine["subscriptionId"], theirs["subscriptionId"])}

    response, page = post_form(host, tamper(fields, other))

    assert response.status_code == 403
    assert page.title == "This form can't be used"
    assert "Nothing has been changed" in response.text
    assert_security_headers(response)
    for sid, state in before.items():
        assert snapshot(services, sid) == state
        assert standin.activation_count(sid) == 0


def test_form_token_of_another_user_is_refused(host, standin, services):
    purchase = standin.create_purchase()
    sid = purchase["subscriptionId"]
    fields = open_confirmation(host, purchase["token"])
    before = snapshot(services, sid)
    sign_in(host, OTHER_USER)

    response, _page = post_form(host, fields)

    assert response.status_code == 403
    assert "another user" in response.text
    assert snapshot(services, sid) == before
    assert standin.activation_count(sid) == 0


# --------------------------------------------------------------------------------------------------
# failures: Marketplace and storage
# --------------------------------------------------------------------------------------------------


def test_marketplace_unavailable_on_resolve_then_recovered(host, standin, services):
    purchase = standin.create_purchase()
    sid = purchase["subscriptionId"]
    standin.fail_next(n=20, status=503, path_contains="/resolve")

    response, page = get_page(host, purchase["token"])

    assert response.status_code == 503
    assert page.title == "Something went wrong on our side"
    assert_security_headers(response)
    reference = page.text("support-reference")
    assert reference and reference == standin.last_request("resolve")["correlationId"]
    assert f'<span class="ref">{reference}</span>' in response.text  # quoted in the message too
    assert stored(services, sid) is None
    assert purchase["token"] not in response.text

    standin.clear_faults()
    response, page = get_page(host, purchase["token"])
    assert response.status_code == 200 and page.title == "Confirm your subscription"
    assert page.text("support-reference") != reference  # every request has its own reference
    assert stored(services, sid).status is LocalStatus.PENDING_FULFILLMENT_START


def test_marketplace_403_logs_loudly_and_shows_neutral_page(host, standin, services, caplog):
    caplog.set_level(logging.INFO)
    purchase = standin.create_purchase()
    standin.fail_next(n=1, status=403, path_contains="/resolve")

    response, page = get_page(host, purchase["token"])

    assert response.status_code == 502
    assert page.title == "Something went wrong on our side"
    text = response.text.replace(page.text("support-reference"), "")  # a random uuid may contain "403"
    for word in ("403", "credential", "Forbidden", "forbidden", "tenant", "Partner Center"):
        assert word not in text
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("OPERATOR ACTION NEEDED" in r.getMessage() for r in errors), [r.getMessage() for r in errors]
    assert stored(services, purchase["subscriptionId"]) is None


def test_marketplace_unavailable_on_activate_can_be_retried(host, standin, services):
    purchase = standin.create_purchase()
    sid = purchase["subscriptionId"]
    fields = open_confirmation(host, purchase["token"])
    standin.fail_next(n=20, status=503, path_contains="/activate")

    response, page = post_form(host, fields)

    assert response.status_code == 503
    assert page.title == "Something went wrong on our side"
    assert page.text("support-reference")
    assert standin.get_subscription(sid)["saasSubscriptionStatus"] == "PendingFulfillmentStart"
    assert stored(services, sid).status is LocalStatus.ACTIVATION_FAILED

    standin.clear_faults()
    response, page = get_page(host, purchase["token"])
    assert page.title == "Confirm your subscription"
    assert page.text("status") == "Activation failed, please try again"
    response, page = post_form(host, confirm_form(page))
    assert response.status_code == 200 and page.title == "Your subscription is active"
    assert standin.activation_count(sid) == 1
    assert stored(services, sid).status is LocalStatus.SUBSCRIBED


def test_storage_down_is_503_and_nothing_half_written(host, standin, services, azurite):
    """One outage (stopping Azurite costs seconds): a first visit and a confirmation, both refused."""
    new_purchase = standin.create_purchase()
    opened = standin.create_purchase()
    fields = open_confirmation(host, opened["token"])
    before = snapshot(services, opened["subscriptionId"])

    with azurite.outage():
        visit, visit_page = get_page(host, new_purchase["token"])
        confirm, confirm_page = post_form(host, fields)

    for response, page in ((visit, visit_page), (confirm, confirm_page)):
        assert response.status_code == 503
        assert page.title == "Something went wrong on our side"
        assert page.text("support-reference")
        assert_security_headers(response)
    assert visit_page.text("support-reference") != confirm_page.text("support-reference")
    assert stored(services, new_purchase["subscriptionId"]) is None
    assert snapshot(services, opened["subscriptionId"]) == before
    assert standin.activation_count(opened["subscriptionId"]) == 0

    # storage is back: the same link and the same form work
    response, page = get_page(host, new_purchase["token"])
    assert response.status_code == 200 and page.title == "Confirm your subscription"
    response, page = post_form(host, fields)
    assert response.status_code == 200 and page.title == "Your subscription is active"
    assert standin.activation_count(opened["subscriptionId"]) == 1


# --------------------------------------------------------------------------------------------------
# security
# --------------------------------------------------------------------------------------------------


def test_script_in_subscription_name_is_rendered_as_text(host, standin):
    name = "<script>alert(1)</script>"
    purchase = standin.create_purchase(name=name)

    response, page = get_page(host, purchase["token"])

    assert response.status_code == 200
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in response.text
    assert "<script" not in response.text.lower()
    assert page.scripts == 0
    assert page.text("subscription-name") == name

    response, page = post_form(host, confirm_form(page))
    assert response.status_code == 200 and page.scripts == 0
    assert page.text("subscription-name") == name


def test_every_page_carries_the_security_headers(host, standin):
    purchase = standin.create_purchase()
    responses = [requests.get(landing(host), timeout=TIMEOUT)]  # 400
    responses.append(requests.get(landing(host) + "?token=" + encoded(purchase["token"]), timeout=TIMEOUT))  # 200
    fields = confirm_form(ParsedPage(responses[-1].text))
    responses.append(requests.post(landing(host), data={**fields, "form_token": "x"}, timeout=TIMEOUT))  # 403
    responses.append(requests.post(landing(host), data=fields, timeout=TIMEOUT))  # 200 success
    sign_in(host, None)
    responses.append(requests.get(landing(host) + "?token=" + encoded(purchase["token"]), timeout=TIMEOUT))  # 401
    assert [r.status_code for r in responses] == [400, 200, 403, 200, 401]
    nonces = set()
    for response in responses:
        assert_security_headers(response)
        csp = response.headers["Content-Security-Policy"]
        nonce = csp.split("'nonce-", 1)[1].split("'", 1)[0]
        assert f'<style nonce="{nonce}">' in response.text
        nonces.add(nonce)
    assert len(nonces) == len(responses), "a fresh CSP nonce per response"


def test_purchase_token_is_never_logged(host, standin, services, caplog):
    caplog.set_level(logging.DEBUG)
    purchase = standin.create_purchase()
    token = purchase["token"]
    forms_of_token = {token, encoded(token), token.replace("+", " "), token.replace("+", "%2B")}

    get_page(host, raw_query="token=" + token)
    sign_in(host, None)
    get_page(host, token)
    sign_in(host, TEST_USER)
    fields = open_confirmation(host, token)
    post_form(host, fields)
    standin.expire_token(token)
    get_page(host, token)
    assert stored(services, purchase["subscriptionId"]).status is LocalStatus.SUBSCRIBED

    messages = [record.getMessage() for record in caplog.records]
    assert any("landing GET answered" in message for message in messages), "the app's logs were captured"
    leaks = [message for message in messages if any(form in message for form in forms_of_token)]
    assert not leaks
    assert all(form not in fields.values() for form in forms_of_token)


# --------------------------------------------------------------------------------------------------
# a user outside the purchasing organisations (LANDING_TENANT_CHECK)


def _purchase_for_another_organisation(standin):
    return standin.create_purchase(
        plan_id="standard",
        quantity=3,
        purchaser=make_identity("boss@fabrikam.example"),
        beneficiary=make_identity("it@fabrikam.example"),
    )


def test_a_user_of_another_organisation_sees_no_emails_but_may_activate_and_is_recorded(host, standin, services):
    """Default (`details`): the forwarded link works, the purchasing people's addresses stay private."""
    purchase = _purchase_for_another_organisation(standin)
    response, page = get_page(host, purchase["token"])
    assert response.status_code == 200 and page.title == "Confirm your subscription"
    assert "boss@fabrikam.example" not in response.text and "it@fabrikam.example" not in response.text
    assert page.text("purchaser") == "b\u2026@fabrikam.example"

    response, page = post_form(host, page.forms[0]["fields"])
    assert response.status_code == 200
    record = services.repository.get(purchase["subscriptionId"]).record
    assert record.status.value == "Subscribed"
    assert record.activated_by == "Ada Lovelace <ada@contoso.example>"  # who activated, on the record


def test_a_user_of_the_purchasing_organisation_sees_the_emails(host, standin, services):
    purchase = standin.create_purchase(plan_id="standard", purchaser=make_identity("boss@fabrikam.example", tenant_id=ADA_TENANT))
    _response, page = get_page(host, purchase["token"])
    assert page.text("purchaser") == "boss@fabrikam.example"


def test_strict_tenant_check_refuses_a_user_of_another_organisation(host, standin, make_services):
    strict = make_services(LANDING_TENANT_CHECK="strict")
    purchase = _purchase_for_another_organisation(standin)
    response, _page = get_page(host, purchase["token"])
    assert response.status_code == 403
    assert "fabrikam.example" not in response.text
    assert standin.calls["activate"] == 0
    record = strict.repository.get(purchase["subscriptionId"]).record
    assert record.status.value == "PendingFulfillmentStart"  # recorded, not activated
