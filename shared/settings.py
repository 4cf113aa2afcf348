"""Application settings, read once from the environment.

Every setting the app reads is declared in ``SETTINGS`` below; that table is the single source for
the README settings table, ``local.settings.json.example`` and the Bicep app settings (a test keeps
them in step). ``Settings.from_env`` reports every missing or malformed name at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from shared.errors import ConfigurationError

MARKETPLACE_RESOURCE_ID = "20e940b3-4c77-4b0b-9a53-9e16a1b010a7"
DEFAULT_API_BASE_URL = "https://marketplaceapi.microsoft.com/api"
DEFAULT_API_VERSION = "2018-08-31"


@dataclass(frozen=True)
class SettingSpec:
    name: str
    default: str | None
    description: str
    secret: bool = False
    # Where it is set: "app" = an app setting in Azure; "local" = local development only.
    scope: str = "app"


SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec("MARKETPLACE_API_BASE_URL", DEFAULT_API_BASE_URL, "Base URL of the SaaS Fulfillment API v2."),
    SettingSpec("MARKETPLACE_API_VERSION", DEFAULT_API_VERSION, "api-version query value."),
    SettingSpec(
        "MARKETPLACE_AUTH",
        "entra",
        "`entra` (bearer token from Entra ID) or `none` (local stand-ins, Microsoft's SaaS API emulator).",
    ),
    SettingSpec(
        "MARKETPLACE_PUBLISHER_ID", "", "Optional; sent as the `publisherId` query parameter (Microsoft's emulator needs it)."
    ),
    SettingSpec(
        "MARKETPLACE_TENANT_ID",
        "",
        "Entra tenant id of the marketplace app registration (Partner Center technical configuration).",
    ),
    SettingSpec(
        "MARKETPLACE_CLIENT_ID",
        "",
        "Application (client) id of the marketplace app registration (Partner Center technical configuration).",
    ),
    SettingSpec(
        "MARKETPLACE_CLIENT_SECRET", "", "Client secret of the marketplace app (use a Key Vault reference).", secret=True
    ),
    SettingSpec(
        "MARKETPLACE_CLIENT_CERTIFICATE",
        "",
        "PEM or base64 PKCS#12 certificate with private key for the marketplace app (Key Vault reference).",
        secret=True,
    ),
    SettingSpec(
        "MARKETPLACE_CLIENT_CERTIFICATE_PASSWORD", "", "Password of MARKETPLACE_CLIENT_CERTIFICATE, if any.", secret=True
    ),
    SettingSpec(
        "MARKETPLACE_USE_FEDERATED_IDENTITY",
        "false",
        "`true`: get the marketplace token by workload identity federation with the managed identity (no secret at all).",
    ),
    SettingSpec(
        "AZURE_CLIENT_ID",
        "",
        "Client id of the user-assigned managed identity (storage, Key Vault, federation). Never the marketplace app id.",
    ),
    SettingSpec(
        "TABLES_CONNECTION_STRING",
        "",
        "Storage connection string (Azurite locally). Either this or TABLES_ENDPOINT.",
        secret=True,
        scope="local",
    ),
    SettingSpec(
        "TABLES_ENDPOINT",
        "",
        "Table service endpoint for identity-based access in Azure, e.g. https://<account>.table.core.windows.net.",
    ),
    SettingSpec("TABLES_PREFIX", "saas", "Prefix of the table names (letters and digits)."),
    SettingSpec("RECONCILE_SCHEDULE", "0 */30 * * * *", "NCRONTAB (6 fields, UTC) schedule of the reconciliation timer."),
    SettingSpec(
        "RECONCILE_TIME_BUDGET_SECONDS",
        "480",
        "Wall-time budget of one reconciliation run; the run checkpoints and stops when it is spent.",
    ),
    SettingSpec(
        "RECONCILE_ACTIVATION_RETRY_LIMIT",
        "3",
        "How many times the reconciler re-sends an unconfirmed activation before flagging it.",
    ),
    SettingSpec(
        "RECONCILE_OPERATION_DEADLINE_SECONDS",
        "600",
        "Age after which an InProgress operation or an unapplied webhook is settled by the reconciler.",
    ),
    SettingSpec(
        "ACTIVATION_MODE", "auto", "`auto`: activate when the buyer confirms; `manual`: record PendingActivation for an operator."
    ),
    SettingSpec("SAAS_APP_URL", "", "URL of the publisher's SaaS application, linked from the landing page."),
    SettingSpec(
        "LANDING_REQUIRE_SIGNIN", "true", "Refuse to show purchase details without an App Service Authentication principal."
    ),
    SettingSpec(
        "LANDING_FORM_SECRET",
        "",
        "Secret that signs the landing page's CSRF tokens (Key Vault reference; 32+ random bytes).",
        secret=True,
    ),
    SettingSpec("BRAND_NAME", "Contoso SaaS", "Product name shown on the landing page."),
    SettingSpec("BRAND_LOGO_URL", "", "Optional logo URL shown on the landing page."),
    SettingSpec("SUPPORT_EMAIL", "", "Support contact shown on the landing page."),
    SettingSpec("WEBHOOK_AUTH", "entra", "`entra` (validate Microsoft's bearer token) or `none` (local only; refused in Azure)."),
    SettingSpec("WEBHOOK_AUDIENCE", "", "Expected `aud` of webhook tokens; default MARKETPLACE_CLIENT_ID."),
    SettingSpec(
        "WEBHOOK_OPENID_CONFIG_URL",
        "",
        "OpenID metadata URL for webhook signing keys; default the Entra one of MARKETPLACE_TENANT_ID.",
    ),
    SettingSpec("WEBHOOK_VERIFY_OPERATION", "true", "Confirm each webhook with Get Operation before acting."),
    SettingSpec("WEBHOOK_MAX_BODY_BYTES", "65536", "Largest webhook body accepted."),
    SettingSpec(
        "WEBHOOK_DEADLINE_SECONDS",
        "8",
        "Time budget of one webhook (Microsoft waits 10 s): every outbound call and retry fits in it, else 5xx.",
    ),
    SettingSpec(
        "LANDING_TENANT_CHECK",
        "details",
        "A signed-in user outside the purchaser's and beneficiary's organisations: `details` (default) sees the purchase "
        "with masked emails and may activate (recorded); `strict` is refused; `off` sees everything.",
    ),
    SettingSpec(
        "LANDING_DEADLINE_SECONDS", "20", "Time budget of one landing page request; past it the buyer sees a retry page."
    ),
    SettingSpec(
        "PUBLISHER_POLICY", "", "Optional `module:function` deciding ChangePlan/ChangeQuantity/Reinstate; default accepts all."
    ),
    SettingSpec(
        "PUBLISHER_API_AUTH",
        "entra",
        "`entra` (the SaaS application's Entra bearer token with an app role) or `none` (local only; refused in Azure).",
    ),
    SettingSpec(
        "PUBLISHER_API_AUDIENCE",
        "",
        "Expected `aud` of publisher API tokens: the Application ID URI or client id of this app's API registration.",
    ),
    SettingSpec("PUBLISHER_API_TENANT_ID", "", "Tenant that issues publisher API tokens; default MARKETPLACE_TENANT_ID."),
    SettingSpec(
        "PUBLISHER_API_OPENID_CONFIG_URL",
        "",
        "OpenID metadata URL for publisher API signing keys; default the Entra one of PUBLISHER_API_TENANT_ID.",
    ),
    SettingSpec(
        "PUBLISHER_API_DEADLINE_SECONDS",
        "10",
        "Time budget of one publisher API request (the PATCH/DELETE to Microsoft included); past it, 503.",
    ),
    SettingSpec(
        "PUBLISHER_OPERATION_POLL_SECONDS",
        "5",
        "First wait before Get Operation follows a publisher change; doubles up to 60 s between polls.",
    ),
    SettingSpec(
        "PUBLISHER_CLAIM_TIMEOUT_SECONDS",
        "300",
        "Age after which a publisher change Microsoft never confirmed (no operation found) is settled as failed.",
    ),
    SettingSpec(
        "USAGE_API_DEADLINE_SECONDS",
        "60",
        "Time budget of one `POST /api/usage` (up to 1,000 events); events not stored by then are answered `failed`.",
    ),
    SettingSpec(
        "METERING_SCHEDULE",
        "0 5 * * * *",
        "NCRONTAB (6 fields, UTC) schedule of the metering timer that sends each closed hour's usage to Microsoft.",
    ),
    SettingSpec(
        "METERING_TIME_BUDGET_SECONDS",
        "240",
        "Wall-time budget of one metering run; hours left over are sent by the next run (oldest first).",
    ),
    SettingSpec(
        "METERING_EXPIRY_WARNING_HOURS",
        "4",
        "An hour of usage still unsent this close to Microsoft's 24-hour limit is logged as `usage_near_expiry` (alerted).",
    ),
    SettingSpec(
        "METERING_EMISSION",
        "on",
        "`on` sends usage to Microsoft; `off` keeps taking usage in and holds it pending (e.g. against Microsoft's SaaS "
        "emulator, which has no metering API).",
    ),
    SettingSpec(
        "USAGE_RECONCILE_SCHEDULE",
        "0 30 2 * * *",
        "NCRONTAB (6 fields, UTC) schedule of the daily read-back that compares Microsoft's usage aggregates with ours.",
    ),
    SettingSpec(
        "USAGE_RECONCILE_DAYS",
        "2",
        "Closed UTC days the read-back compares (yesterday and the days before it).",
    ),
    SettingSpec(
        "METERING_LATE_USAGE",
        "carry",
        "Usage reported into an hour already sent: `carry` (into the current hour, billed) or `unbillable` (recorded only).",
    ),
    SettingSpec(
        "CONSOLE_AUTH",
        "entra",
        "Operator console: `entra` (App Service Authentication, app roles Console.Reader / Console.Operator) or `none` "
        "(local only: every signed-in user is an operator; refused in Azure).",
    ),
    SettingSpec(
        "CONSOLE_TENANT_ID",
        "",
        "Tenant whose users may use the operator console (their app roles count); default MARKETPLACE_TENANT_ID.",
    ),
    SettingSpec("EVENTS_QUEUE_NAME", "subscription-events", "Storage queue that receives lifecycle events."),
    SettingSpec(
        "EVENTS_QUEUE_ENDPOINT", "", "Queue service endpoint for identity-based access; default derived from TABLES_ENDPOINT."
    ),
    SettingSpec(
        "EVENTS_WORK_QUEUE",
        "",
        "Storage queue of event-delivery jobs the event_delivery function serves; default EVENTS_QUEUE_NAME + '-jobs'.",
    ),
    SettingSpec(
        "OPERATIONS_WORK_QUEUE",
        "",
        "Storage queue of publisher-operation poll jobs the operation_followup function serves; default EVENTS_QUEUE_NAME + '-operations'.",
    ),
    SettingSpec("EVENTS_WEBHOOK_URL", "", "Optional HTTPS URL that receives lifecycle events, HMAC-signed."),
    SettingSpec("EVENTS_WEBHOOK_SECRET", "", "HMAC secret for EVENTS_WEBHOOK_URL (Key Vault reference).", secret=True),
    SettingSpec("DEV_SIGNED_IN_USER", "", "Local dev host only: `Name <email>` of the user it signs in.", scope="local"),
)

SETTING_NAMES = frozenset(spec.name for spec in SETTINGS)
_DEFAULTS = {spec.name: spec.default for spec in SETTINGS}

#: Entry points that need settings beyond the common ones (storage, Marketplace access). The CLI and
#: the reconciliation timer need only the common ones; a missing landing page secret must not stop
#: the webhook, nor an operator's command line.
LANDING_PAGE = "landing_page"
WEBHOOK = "webhook"
PUBLISHER_API = "publisher_api"
ENTRY_POINTS = (LANDING_PAGE, WEBHOOK, PUBLISHER_API)
#: Features a publisher may leave unconfigured: their functions answer 503, but the app is healthy.
OPTIONAL_ENTRY_POINTS = frozenset({PUBLISHER_API})

#: Where `make run` writes the settings of the stack it started, in the format Core Tools reads for
#: `func start`; the CLI reads it too. Never deployed (.funcignore) and never committed (.gitignore).
LOCAL_SETTINGS_FILE_VARIABLE = "LOCAL_SETTINGS_FILE"
DEFAULT_LOCAL_SETTINGS_FILE = Path(__file__).resolve().parent.parent / "local.settings.json"


def local_settings_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get(LOCAL_SETTINGS_FILE_VARIABLE) or DEFAULT_LOCAL_SETTINGS_FILE)


def read_local_settings(path: Path) -> dict[str, str]:
    """The ``Values`` of a local.settings.json; {} when there is none. A malformed file is an error."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise ConfigurationError([f"{path} cannot be read as local.settings.json: {error}"]) from error
    values = document.get("Values") if isinstance(document, dict) else None
    if not isinstance(values, dict):
        raise ConfigurationError([f'{path} has no "Values" object'])
    return {str(name): str(value) for name, value in values.items() if value is not None}


def local_settings_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for local tools (the CLI): local.settings.json, overridden by real variables."""
    env = os.environ if env is None else env
    return {**read_local_settings(local_settings_path(env)), **env}


TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...], problems: list[str]) -> str:
    value = (env.get(name) or _DEFAULTS[name] or "").strip().lower()
    if value not in allowed:
        problems.append(f"{name} must be one of {', '.join(allowed)}")
        return allowed[0]
    return value


def _flag(env: Mapping[str, str], name: str, problems: list[str]) -> bool:
    value = (env.get(name) or _DEFAULTS[name] or "").strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    problems.append(f"{name} must be true or false")
    return False


def _int(env: Mapping[str, str], name: str, problems: list[str], minimum: int = 1) -> int:
    raw = (env.get(name) or _DEFAULTS[name] or "").strip()
    try:
        value = int(raw)
    except ValueError:
        problems.append(f"{name} must be a whole number")
        return int(_DEFAULTS[name] or 0)
    if value < minimum:
        problems.append(f"{name} must be at least {minimum}")
    return value


def _text(env: Mapping[str, str], name: str) -> str:
    return (env.get(name) or _DEFAULTS[name] or "").strip()


def _entra_metadata_url(tenant_id: str) -> str:
    """Entra's OpenID metadata of a tenant (its token signing keys); "" without a tenant."""
    return f"https://login.microsoftonline.com/{tenant_id}/v2.0/.well-known/openid-configuration" if tenant_id else ""


_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def _web_url(env: Mapping[str, str], name: str, problems: list[str]) -> str:
    """An optional URL that is rendered into pages or called: https only (http for this machine).
    Anything else (javascript:, data:, a typo) is a start-up problem, not something a CSP must stop."""
    value = _text(env, name)
    if not value:
        return ""
    parts = urlsplit(value)
    secure = parts.scheme == "https" and bool(parts.hostname)
    local = parts.scheme == "http" and (parts.hostname or "") in _LOCAL_HOSTS
    if not (secure or local) or any(ch.isspace() or ord(ch) < 32 for ch in value):
        problems.append(f"{name} must be an https:// URL (http:// only for localhost)")
        return ""
    return value


@dataclass(frozen=True)
class Settings:
    marketplace_api_base_url: str = DEFAULT_API_BASE_URL
    marketplace_api_version: str = DEFAULT_API_VERSION
    marketplace_auth: str = "entra"
    marketplace_publisher_id: str = ""
    marketplace_tenant_id: str = ""
    marketplace_client_id: str = ""
    marketplace_client_secret: str = field(default="", repr=False)
    marketplace_client_certificate: str = field(default="", repr=False)
    marketplace_client_certificate_password: str = field(default="", repr=False)
    marketplace_use_federated_identity: bool = False
    managed_identity_client_id: str = ""
    tables_connection_string: str = field(default="", repr=False)
    tables_endpoint: str = ""
    tables_prefix: str = "saas"
    reconcile_schedule: str = "0 */30 * * * *"
    reconcile_time_budget_seconds: int = 480
    reconcile_activation_retry_limit: int = 3
    reconcile_operation_deadline_seconds: int = 600
    activation_mode: str = "auto"
    saas_app_url: str = ""
    landing_require_signin: bool = True
    landing_form_secret: str = field(default="", repr=False)
    brand_name: str = "Contoso SaaS"
    brand_logo_url: str = ""
    support_email: str = ""
    webhook_auth: str = "entra"
    webhook_audience: str = ""
    webhook_openid_config_url: str = ""
    webhook_verify_operation: bool = True
    webhook_max_body_bytes: int = 65536
    webhook_deadline_seconds: int = 8
    landing_deadline_seconds: int = 20
    landing_tenant_check: str = "details"
    publisher_policy: str = ""
    publisher_api_auth: str = "entra"
    publisher_api_audience: str = ""
    publisher_api_tenant_id: str = ""
    publisher_api_openid_config_url: str = ""
    publisher_api_deadline_seconds: int = 10
    publisher_operation_poll_seconds: int = 5
    publisher_claim_timeout_seconds: int = 300
    usage_api_deadline_seconds: int = 60
    metering_schedule: str = "0 5 * * * *"
    metering_time_budget_seconds: int = 240
    metering_expiry_warning_hours: int = 4
    metering_late_usage: str = "carry"
    metering_emission: str = "on"
    usage_reconcile_schedule: str = "0 30 2 * * *"
    usage_reconcile_days: int = 2
    console_auth: str = "entra"
    console_tenant_id: str = ""
    events_queue_name: str = "subscription-events"
    events_queue_endpoint: str = ""
    events_work_queue: str = "subscription-events-jobs"
    operations_work_queue: str = "subscription-events-operations"
    queue_service_uri: str = ""
    events_webhook_url: str = ""
    events_webhook_secret: str = field(default="", repr=False)
    running_in_azure: bool = False
    #: (entry point, problem) for settings only that entry point needs; see ``require``
    entry_problems: tuple[tuple[str, str], ...] = ()

    def require(self, entry_point: str) -> None:
        """Raise one ConfigurationError naming every problem of the settings ``entry_point`` needs."""
        problems = [problem for entry, problem in self.entry_problems if entry == entry_point]
        if problems:
            raise ConfigurationError(problems)

    def problems_by_entry_point(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for entry, problem in self.entry_problems:
            found.setdefault(entry, []).append(problem)
        return found

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, require: Iterable[str] | None = None) -> Settings:
        """Read and validate every setting; raise one ConfigurationError naming all problems.

        ``require`` names the entry points whose own settings must be complete now (default: all of
        them). The function app passes none and each function calls ``require`` for itself; the CLI
        needs only the common settings.
        """
        env = os.environ if env is None else env
        problems: list[str] = []
        needs: dict[str, list[str]] = {entry: [] for entry in ENTRY_POINTS}
        marketplace_auth = _choice(env, "MARKETPLACE_AUTH", ("entra", "none"), problems)
        webhook_auth = _choice(env, "WEBHOOK_AUTH", ("entra", "none"), problems)
        activation_mode = _choice(env, "ACTIVATION_MODE", ("auto", "manual"), problems)
        tenant_id = _text(env, "MARKETPLACE_TENANT_ID")
        client_id = _text(env, "MARKETPLACE_CLIENT_ID")
        secret = _text(env, "MARKETPLACE_CLIENT_SECRET")
        certificate = _text(env, "MARKETPLACE_CLIENT_CERTIFICATE")
        federated = _flag(env, "MARKETPLACE_USE_FEDERATED_IDENTITY", problems)
        running_in_azure = bool(env.get("WEBSITE_INSTANCE_ID"))

        if marketplace_auth == "entra":
            for name, value in (("MARKETPLACE_TENANT_ID", tenant_id), ("MARKETPLACE_CLIENT_ID", client_id)):
                if not value:
                    problems.append(f"{name} is required when MARKETPLACE_AUTH=entra")
            if not (secret or certificate or federated):
                problems.append(
                    "one credential is required when MARKETPLACE_AUTH=entra: MARKETPLACE_CLIENT_SECRET, "
                    "MARKETPLACE_CLIENT_CERTIFICATE or MARKETPLACE_USE_FEDERATED_IDENTITY=true"
                )
        if webhook_auth == "entra":
            if not tenant_id:
                needs[WEBHOOK].append("MARKETPLACE_TENANT_ID is required when WEBHOOK_AUTH=entra")
            if not (_text(env, "WEBHOOK_AUDIENCE") or client_id):
                needs[WEBHOOK].append("WEBHOOK_AUDIENCE or MARKETPLACE_CLIENT_ID is required when WEBHOOK_AUTH=entra")
        elif running_in_azure:
            problems.append("WEBHOOK_AUTH=none is refused when running in Azure (WEBSITE_INSTANCE_ID is set)")
        publisher_api_auth = _choice(env, "PUBLISHER_API_AUTH", ("entra", "none"), problems)
        publisher_api_tenant = _text(env, "PUBLISHER_API_TENANT_ID") or tenant_id
        if publisher_api_auth == "entra":
            if not publisher_api_tenant:
                needs[PUBLISHER_API].append(
                    "PUBLISHER_API_TENANT_ID or MARKETPLACE_TENANT_ID is required when PUBLISHER_API_AUTH=entra"
                )
            if not _text(env, "PUBLISHER_API_AUDIENCE"):
                needs[PUBLISHER_API].append("PUBLISHER_API_AUDIENCE is required when PUBLISHER_API_AUTH=entra")
        elif running_in_azure:
            problems.append("PUBLISHER_API_AUTH=none is refused when running in Azure (WEBSITE_INSTANCE_ID is set)")

        console_auth = _choice(env, "CONSOLE_AUTH", ("entra", "none"), problems)
        if console_auth == "none" and running_in_azure:
            problems.append("CONSOLE_AUTH=none is refused when running in Azure (WEBSITE_INSTANCE_ID is set)")

        connection_string = _text(env, "TABLES_CONNECTION_STRING")
        endpoint = _text(env, "TABLES_ENDPOINT")
        if not (connection_string or endpoint):
            problems.append("TABLES_CONNECTION_STRING or TABLES_ENDPOINT is required")
        prefix = _text(env, "TABLES_PREFIX")
        if not (prefix.isalnum() and prefix.isascii() and prefix[:1].isalpha() and len(prefix) <= 40):
            problems.append("TABLES_PREFIX must be 1-40 letters and digits, starting with a letter")

        form_secret = _text(env, "LANDING_FORM_SECRET")
        if not form_secret:
            needs[LANDING_PAGE].append("LANDING_FORM_SECRET is required (32+ random characters)")
        elif len(form_secret) < 16:
            needs[LANDING_PAGE].append("LANDING_FORM_SECRET must be at least 16 characters")

        base_url = _text(env, "MARKETPLACE_API_BASE_URL").rstrip("/")
        if not base_url.startswith(("https://", "http://")):
            problems.append("MARKETPLACE_API_BASE_URL must be an http(s) URL")
        events_webhook_url = _web_url(env, "EVENTS_WEBHOOK_URL", problems)
        events_webhook_secret = _text(env, "EVENTS_WEBHOOK_SECRET")
        if events_webhook_url and not events_webhook_secret:
            problems.append("EVENTS_WEBHOOK_SECRET is required when EVENTS_WEBHOOK_URL is set")

        settings = cls(
            marketplace_api_base_url=base_url,
            marketplace_api_version=_text(env, "MARKETPLACE_API_VERSION"),
            marketplace_auth=marketplace_auth,
            marketplace_publisher_id=_text(env, "MARKETPLACE_PUBLISHER_ID"),
            marketplace_tenant_id=tenant_id,
            marketplace_client_id=client_id,
            marketplace_client_secret=secret,
            marketplace_client_certificate=certificate,
            marketplace_client_certificate_password=_text(env, "MARKETPLACE_CLIENT_CERTIFICATE_PASSWORD"),
            marketplace_use_federated_identity=federated,
            managed_identity_client_id=_text(env, "AZURE_CLIENT_ID"),
            tables_connection_string=connection_string,
            tables_endpoint=endpoint,
            tables_prefix=prefix,
            reconcile_schedule=_text(env, "RECONCILE_SCHEDULE"),
            reconcile_time_budget_seconds=_int(env, "RECONCILE_TIME_BUDGET_SECONDS", problems),
            reconcile_activation_retry_limit=_int(env, "RECONCILE_ACTIVATION_RETRY_LIMIT", problems, minimum=0),
            reconcile_operation_deadline_seconds=_int(env, "RECONCILE_OPERATION_DEADLINE_SECONDS", problems),
            activation_mode=activation_mode,
            saas_app_url=_web_url(env, "SAAS_APP_URL", needs[LANDING_PAGE]),
            landing_require_signin=_flag(env, "LANDING_REQUIRE_SIGNIN", problems),
            landing_form_secret=form_secret,
            brand_name=_text(env, "BRAND_NAME"),
            brand_logo_url=_web_url(env, "BRAND_LOGO_URL", needs[LANDING_PAGE]),
            support_email=_text(env, "SUPPORT_EMAIL"),
            webhook_auth=webhook_auth,
            webhook_audience=_text(env, "WEBHOOK_AUDIENCE") or client_id,
            webhook_openid_config_url=_text(env, "WEBHOOK_OPENID_CONFIG_URL") or _entra_metadata_url(tenant_id),
            webhook_verify_operation=_flag(env, "WEBHOOK_VERIFY_OPERATION", problems),
            webhook_max_body_bytes=_int(env, "WEBHOOK_MAX_BODY_BYTES", problems),
            webhook_deadline_seconds=_int(env, "WEBHOOK_DEADLINE_SECONDS", problems),
            landing_deadline_seconds=_int(env, "LANDING_DEADLINE_SECONDS", problems),
            landing_tenant_check=_choice(env, "LANDING_TENANT_CHECK", ("details", "strict", "off"), problems),
            publisher_policy=_text(env, "PUBLISHER_POLICY"),
            publisher_api_auth=publisher_api_auth,
            publisher_api_audience=_text(env, "PUBLISHER_API_AUDIENCE"),
            publisher_api_tenant_id=publisher_api_tenant,
            publisher_api_openid_config_url=_text(env, "PUBLISHER_API_OPENID_CONFIG_URL")
            or _entra_metadata_url(publisher_api_tenant),
            publisher_api_deadline_seconds=_int(env, "PUBLISHER_API_DEADLINE_SECONDS", problems),
            publisher_operation_poll_seconds=_int(env, "PUBLISHER_OPERATION_POLL_SECONDS", problems),
            publisher_claim_timeout_seconds=_int(env, "PUBLISHER_CLAIM_TIMEOUT_SECONDS", problems),
            usage_api_deadline_seconds=_int(env, "USAGE_API_DEADLINE_SECONDS", problems),
            metering_schedule=_text(env, "METERING_SCHEDULE"),
            metering_time_budget_seconds=_int(env, "METERING_TIME_BUDGET_SECONDS", problems),
            metering_expiry_warning_hours=_int(env, "METERING_EXPIRY_WARNING_HOURS", problems, minimum=0),
            metering_late_usage=_choice(env, "METERING_LATE_USAGE", ("carry", "unbillable"), problems),
            metering_emission=_choice(env, "METERING_EMISSION", ("on", "off"), problems),
            usage_reconcile_schedule=_text(env, "USAGE_RECONCILE_SCHEDULE"),
            usage_reconcile_days=_int(env, "USAGE_RECONCILE_DAYS", problems, minimum=1),
            console_auth=console_auth,
            console_tenant_id=_text(env, "CONSOLE_TENANT_ID") or tenant_id,
            events_queue_name=_text(env, "EVENTS_QUEUE_NAME"),
            events_queue_endpoint=_text(env, "EVENTS_QUEUE_ENDPOINT"),
            events_work_queue=_text(env, "EVENTS_WORK_QUEUE") or _text(env, "EVENTS_QUEUE_NAME") + "-jobs",
            # platform setting of the identity-based AzureWebJobsStorage connection (the queue triggers' too)
            operations_work_queue=_text(env, "OPERATIONS_WORK_QUEUE") or _text(env, "EVENTS_QUEUE_NAME") + "-operations",
            queue_service_uri=(env.get("AzureWebJobsStorage__queueServiceUri") or "").strip(),
            events_webhook_url=events_webhook_url,
            events_webhook_secret=events_webhook_secret,
            running_in_azure=running_in_azure,
            entry_problems=tuple((entry, problem) for entry, found in needs.items() for problem in found),
        )
        required = ENTRY_POINTS if require is None else tuple(require)
        problems += [problem for entry in required for problem in needs.get(entry, [])]
        if problems:
            raise ConfigurationError(list(dict.fromkeys(problems)))  # a name two entries need, once
        return settings
