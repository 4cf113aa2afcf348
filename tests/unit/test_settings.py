"""Settings.from_env: defaults, every problem reported at once, malformed values, secrets kept out of repr."""

from __future__ import annotations

import json

import pytest

from shared.errors import ConfigurationError
from shared.settings import (
    DEFAULT_API_BASE_URL,
    DEFAULT_API_VERSION,
    LANDING_PAGE,
    PUBLISHER_API,
    SETTING_NAMES,
    SETTINGS,
    WEBHOOK,
    Settings,
    local_settings_environment,
    read_local_settings,
)

TENANT = "72f988bf-0000-4000-8000-0000000000aa"
CLIENT = "a1b2c3d4-0000-4000-8000-0000000000bb"


def minimal_env(**overrides) -> dict[str, str]:
    """The least a production (entra) configuration needs."""
    env = {
        "MARKETPLACE_TENANT_ID": TENANT,
        "MARKETPLACE_CLIENT_ID": CLIENT,
        "MARKETPLACE_CLIENT_SECRET": "client-secret-value-1234",
        "TABLES_CONNECTION_STRING": "UseDevelopmentStorage=true",
        "LANDING_FORM_SECRET": "form-secret-0123456789abcdef",
        "PUBLISHER_API_AUDIENCE": "api://contoso-fulfillment-api",
    }
    env.update(overrides)
    return {name: value for name, value in env.items() if value is not None}


def problems_of(env) -> list[str]:
    with pytest.raises(ConfigurationError) as error:
        Settings.from_env(env)
    assert error.value.problems, "a ConfigurationError names its problems"
    for problem in error.value.problems:
        assert problem in str(error.value)
    return error.value.problems


def test_defaults():
    settings = Settings.from_env(minimal_env())
    assert settings.marketplace_api_base_url == DEFAULT_API_BASE_URL == "https://marketplaceapi.microsoft.com/api"
    assert settings.marketplace_api_version == DEFAULT_API_VERSION == "2018-08-31"
    assert settings.marketplace_auth == "entra"
    assert settings.marketplace_publisher_id == ""
    assert settings.marketplace_use_federated_identity is False
    assert settings.tables_prefix == "saas"
    assert settings.reconcile_schedule == "0 */30 * * * *"
    assert settings.reconcile_time_budget_seconds == 480
    assert settings.reconcile_activation_retry_limit == 3
    assert settings.reconcile_operation_deadline_seconds == 600
    assert settings.activation_mode == "auto"
    assert settings.landing_require_signin is True
    assert settings.brand_name == "Contoso SaaS"
    assert settings.webhook_auth == "entra"
    assert settings.webhook_audience == CLIENT  # defaults to the marketplace app id
    assert (
        settings.webhook_openid_config_url == f"https://login.microsoftonline.com/{TENANT}/v2.0/.well-known/openid-configuration"
    )
    assert settings.webhook_verify_operation is True
    assert settings.webhook_max_body_bytes == 65536
    assert settings.events_queue_name == "subscription-events"
    assert settings.publisher_policy == ""
    assert settings.running_in_azure is False


def test_defaults_match_the_settings_table():
    """The dataclass defaults and the SETTINGS registry say the same thing."""
    settings = Settings.from_env(minimal_env())
    mapping = {"AZURE_CLIENT_ID": "managed_identity_client_id"}
    for spec in SETTINGS:
        if spec.name in minimal_env() or (spec.scope == "local" and spec.name == "DEV_SIGNED_IN_USER"):
            continue
        attribute = mapping.get(spec.name, spec.name.lower())
        value = getattr(settings, attribute)
        if spec.name in ("WEBHOOK_AUDIENCE", "WEBHOOK_OPENID_CONFIG_URL"):
            continue  # derived defaults, checked above
        if spec.name == "CONSOLE_TENANT_ID":
            assert value == TENANT  # derived from MARKETPLACE_TENANT_ID
            continue
        if spec.name in ("EVENTS_WORK_QUEUE", "OPERATIONS_WORK_QUEUE"):  # derived from EVENTS_QUEUE_NAME
            suffix = "-jobs" if spec.name == "EVENTS_WORK_QUEUE" else "-operations"
            assert value == settings.events_queue_name + suffix
            continue
        if spec.name in ("PUBLISHER_API_TENANT_ID", "PUBLISHER_API_OPENID_CONFIG_URL"):
            assert value == (TENANT if spec.name.endswith("TENANT_ID") else settings.publisher_api_openid_config_url)
            assert TENANT in settings.publisher_api_openid_config_url  # derived from MARKETPLACE_TENANT_ID
            continue
        if isinstance(value, bool):
            assert value is (spec.default == "true"), spec.name
        elif isinstance(value, int):
            assert value == int(spec.default), spec.name
        else:
            assert value == spec.default, spec.name


def test_explicit_values_are_read_and_trimmed():
    settings = Settings.from_env(
        minimal_env(
            MARKETPLACE_API_BASE_URL="http://127.0.0.1:7072/api/",
            MARKETPLACE_PUBLISHER_ID=" contoso ",
            ACTIVATION_MODE=" Manual ",
            LANDING_REQUIRE_SIGNIN="off",
            RECONCILE_TIME_BUDGET_SECONDS=" 60 ",
            RECONCILE_ACTIVATION_RETRY_LIMIT="0",
            WEBHOOK_VERIFY_OPERATION="no",
            WEBHOOK_AUDIENCE="api://webhook",
            TABLES_PREFIX="t1abc",
        )
    )
    assert settings.marketplace_api_base_url == "http://127.0.0.1:7072/api"
    assert settings.marketplace_publisher_id == "contoso"
    assert settings.activation_mode == "manual"
    assert settings.landing_require_signin is False
    assert settings.reconcile_time_budget_seconds == 60
    assert settings.reconcile_activation_retry_limit == 0
    assert settings.webhook_verify_operation is False
    assert settings.webhook_audience == "api://webhook"
    assert settings.tables_prefix == "t1abc"


@pytest.mark.parametrize(
    "word, value",
    [("1", True), ("true", True), ("YES", True), ("on", True), ("0", False), ("false", False), ("No", False), ("off", False)],
)
def test_flag_words(word, value):
    assert Settings.from_env(minimal_env(LANDING_REQUIRE_SIGNIN=word)).landing_require_signin is value


def test_empty_value_means_default():
    settings = Settings.from_env(minimal_env(ACTIVATION_MODE="", RECONCILE_TIME_BUDGET_SECONDS="", TABLES_PREFIX=""))
    assert settings.activation_mode == "auto"
    assert settings.reconcile_time_budget_seconds == 480
    assert settings.tables_prefix == "saas"


def test_every_missing_name_reported_at_once():
    problems = problems_of({})
    text = " | ".join(problems)
    for name in (
        "MARKETPLACE_TENANT_ID",
        "MARKETPLACE_CLIENT_ID",
        "MARKETPLACE_CLIENT_SECRET",
        "TABLES_CONNECTION_STRING",
        "TABLES_ENDPOINT",
        "LANDING_FORM_SECRET",
        "WEBHOOK_AUDIENCE",
    ):
        assert name in text, name
    assert len(problems) >= 5  # one entry per problem, not one lumped message


def test_each_missing_name_alone():
    for name in ("MARKETPLACE_TENANT_ID", "MARKETPLACE_CLIENT_ID", "TABLES_CONNECTION_STRING", "LANDING_FORM_SECRET"):
        problems = problems_of(minimal_env(**{name: None}))
        assert any(name in problem for problem in problems), name
    problems = problems_of(minimal_env(MARKETPLACE_CLIENT_SECRET=None))
    assert any("credential" in problem for problem in problems)


def test_alternative_credentials_and_storage():
    Settings.from_env(minimal_env(MARKETPLACE_CLIENT_SECRET=None, MARKETPLACE_CLIENT_CERTIFICATE="-----BEGIN PRIVATE KEY-----x"))
    federated = Settings.from_env(minimal_env(MARKETPLACE_CLIENT_SECRET=None, MARKETPLACE_USE_FEDERATED_IDENTITY="true"))
    assert federated.marketplace_use_federated_identity is True
    endpoint = Settings.from_env(
        minimal_env(TABLES_CONNECTION_STRING=None, TABLES_ENDPOINT="https://acct.table.core.windows.net")
    )
    assert endpoint.tables_endpoint == "https://acct.table.core.windows.net"


def test_local_configuration_without_entra():
    settings = Settings.from_env(
        {
            "MARKETPLACE_AUTH": "none",
            "WEBHOOK_AUTH": "none",
            "PUBLISHER_API_AUTH": "none",
            "TABLES_CONNECTION_STRING": "UseDevelopmentStorage=true",
            "LANDING_FORM_SECRET": "form-secret-0123456789abcdef",
        }
    )
    assert settings.marketplace_auth == "none"
    assert settings.webhook_auth == "none"
    assert settings.publisher_api_auth == "none"
    assert settings.webhook_openid_config_url == ""


def test_malformed_values_reported_together():
    problems = problems_of(
        minimal_env(ACTIVATION_MODE="sometimes", LANDING_REQUIRE_SIGNIN="maybe", RECONCILE_TIME_BUDGET_SECONDS="abc")
    )
    assert len(problems) == 3
    assert any("ACTIVATION_MODE" in p and "auto" in p and "manual" in p for p in problems)
    assert any("LANDING_REQUIRE_SIGNIN" in p for p in problems)
    assert any("RECONCILE_TIME_BUDGET_SECONDS" in p for p in problems)


@pytest.mark.parametrize(
    "name, value",
    [
        ("ACTIVATION_MODE", "sometimes"),
        ("LANDING_REQUIRE_SIGNIN", "maybe"),
        ("RECONCILE_TIME_BUDGET_SECONDS", "abc"),
        ("RECONCILE_TIME_BUDGET_SECONDS", "0"),
        ("RECONCILE_TIME_BUDGET_SECONDS", "1.5"),
        ("RECONCILE_ACTIVATION_RETRY_LIMIT", "-1"),
        ("WEBHOOK_MAX_BODY_BYTES", "64k"),
        ("MARKETPLACE_AUTH", "basic"),
        ("WEBHOOK_AUTH", "sometimes"),
        ("MARKETPLACE_USE_FEDERATED_IDENTITY", "perhaps"),
        ("WEBHOOK_VERIFY_OPERATION", "2"),
        ("TABLES_PREFIX", "my-prefix"),
        ("TABLES_PREFIX", "1abc"),
        ("TABLES_PREFIX", "a" * 41),
        ("MARKETPLACE_API_BASE_URL", "marketplaceapi.microsoft.com/api"),
    ],
)
def test_malformed_value_is_named(name, value):
    problems = problems_of(minimal_env(**{name: value}))
    assert any(name in problem for problem in problems), problems
    for problem in problems:
        assert value not in problem or len(value) < 3  # values are not echoed (they might be secrets)


def test_short_form_secret():
    problems = problems_of(minimal_env(LANDING_FORM_SECRET="short-secret"))
    assert any("LANDING_FORM_SECRET" in p for p in problems)
    assert not any("short-secret" in p for p in problems)


def test_events_webhook_needs_its_secret():
    problems = problems_of(minimal_env(EVENTS_WEBHOOK_URL="https://app.contoso.example/events"))
    assert any("EVENTS_WEBHOOK_SECRET" in p for p in problems)


def test_webhook_auth_none_refused_in_azure():
    env = minimal_env(WEBHOOK_AUTH="none", WEBSITE_INSTANCE_ID="abc123")
    problems = problems_of(env)
    assert any("WEBHOOK_AUTH" in p and "WEBSITE_INSTANCE_ID" in p for p in problems)


def test_webhook_auth_none_allowed_locally():
    settings = Settings.from_env(minimal_env(WEBHOOK_AUTH="none"))
    assert settings.webhook_auth == "none"
    assert settings.running_in_azure is False


def test_running_in_azure_with_entra_is_fine():
    settings = Settings.from_env(minimal_env(WEBSITE_INSTANCE_ID="abc123"))
    assert settings.running_in_azure is True


def test_unrelated_problems_do_not_hide_each_other():
    env = minimal_env(
        WEBHOOK_AUTH="none",
        WEBSITE_INSTANCE_ID="abc123",
        ACTIVATION_MODE="sometimes",
        LANDING_FORM_SECRET=None,
        TABLES_CONNECTION_STRING=None,
    )
    text = " | ".join(problems_of(env))
    for name in ("WEBHOOK_AUTH", "ACTIVATION_MODE", "LANDING_FORM_SECRET", "TABLES_CONNECTION_STRING"):
        assert name in text


SECRET_VALUES = {
    "MARKETPLACE_CLIENT_SECRET": "s3cr3t-client-value-AAAA",
    "MARKETPLACE_CLIENT_CERTIFICATE": "-----BEGIN PRIVATE KEY-----MIIEvQIBADANBgkqhkiG9w0BBBBB",
    "MARKETPLACE_CLIENT_CERTIFICATE_PASSWORD": "cert-password-CCCC",
    "TABLES_CONNECTION_STRING": "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=storage-key-DDDD==",
    "LANDING_FORM_SECRET": "form-secret-EEEE-0123456789abcdef",
    "EVENTS_WEBHOOK_SECRET": "events-hmac-FFFF",
}


def test_secrets_are_not_in_repr():
    env = minimal_env(EVENTS_WEBHOOK_URL="https://app.contoso.example/events", **SECRET_VALUES)
    settings = Settings.from_env(env)
    assert settings.marketplace_client_secret == SECRET_VALUES["MARKETPLACE_CLIENT_SECRET"]  # read, just not shown
    assert settings.events_webhook_secret == SECRET_VALUES["EVENTS_WEBHOOK_SECRET"]
    for text in (repr(settings), str(settings)):
        for name, value in SECRET_VALUES.items():
            assert value not in text, name
        assert "storage-key" not in text
    assert TENANT in repr(settings)  # the repr is still useful


def test_every_secret_setting_is_hidden():
    """Any setting the registry marks secret stays out of repr (guards new secrets too)."""
    secret_specs = [spec for spec in SETTINGS if spec.secret]
    assert {spec.name for spec in secret_specs} == set(SECRET_VALUES)
    env = minimal_env(
        EVENTS_WEBHOOK_URL="https://app.contoso.example/events",
        **{spec.name: f"hidden-{index}-value-0123456789abcdef" for index, spec in enumerate(secret_specs)},
    )
    text = repr(Settings.from_env(env))
    for index, spec in enumerate(secret_specs):
        assert f"hidden-{index}-value" not in text, spec.name


def test_secrets_not_in_configuration_errors():
    env = minimal_env(ACTIVATION_MODE="sometimes", **SECRET_VALUES)
    with pytest.raises(ConfigurationError) as error:
        Settings.from_env(env)
    for value in SECRET_VALUES.values():
        assert value not in str(error.value)
        assert value not in repr(error.value)


def test_configuration_error_is_a_503():
    with pytest.raises(ConfigurationError) as error:
        Settings.from_env({})
    assert error.value.http_status == 503


def test_registry_names_are_unique():
    assert len(SETTING_NAMES) == len(SETTINGS)


def test_reads_os_environ_by_default(monkeypatch):
    for name in SETTING_NAMES | {"WEBSITE_INSTANCE_ID"}:
        monkeypatch.delenv(name, raising=False)
    for name, value in minimal_env(MARKETPLACE_PUBLISHER_ID="from-environ").items():
        monkeypatch.setenv(name, value)
    assert Settings.from_env().marketplace_publisher_id == "from-environ"


# -- settings per entry point -------------------------------------------------------------------


def test_each_entry_point_requires_only_what_it_uses():
    env = minimal_env(
        LANDING_FORM_SECRET=None,
        MARKETPLACE_TENANT_ID=None,
        MARKETPLACE_AUTH="none",
        MARKETPLACE_CLIENT_SECRET=None,
        PUBLISHER_API_AUDIENCE=None,
    )
    # The CLI and the timer (no entry point of their own) start; the function app's functions too.
    settings = Settings.from_env(env, require=())
    with pytest.raises(ConfigurationError) as landing:
        settings.require(LANDING_PAGE)
    assert landing.value.problems == ["LANDING_FORM_SECRET is required (32+ random characters)"]
    with pytest.raises(ConfigurationError) as webhook:
        settings.require(WEBHOOK)
    assert webhook.value.problems == ["MARKETPLACE_TENANT_ID is required when WEBHOOK_AUTH=entra"]
    with pytest.raises(ConfigurationError) as publisher_api:
        settings.require(PUBLISHER_API)
    assert publisher_api.value.problems == [
        "PUBLISHER_API_TENANT_ID or MARKETPLACE_TENANT_ID is required when PUBLISHER_API_AUTH=entra",
        "PUBLISHER_API_AUDIENCE is required when PUBLISHER_API_AUTH=entra",
    ]
    assert settings.problems_by_entry_point() == {
        LANDING_PAGE: landing.value.problems,
        WEBHOOK: webhook.value.problems,
        PUBLISHER_API: publisher_api.value.problems,
    }
    # Asking for one entry point reports that one's problems only, all at once.
    assert problems_of_entry(env, [LANDING_PAGE]) == ["LANDING_FORM_SECRET is required (32+ random characters)"]
    # Without `require`, everything is required (deployment checks, tests): both named together.
    assert set(problems_of(env)) == {*landing.value.problems, *webhook.value.problems, *publisher_api.value.problems}


def test_a_complete_configuration_has_no_entry_point_problems():
    settings = Settings.from_env(minimal_env(), require=())
    settings.require(LANDING_PAGE)
    settings.require(WEBHOOK)
    settings.require(PUBLISHER_API)
    assert settings.problems_by_entry_point() == {}


def test_common_problems_stop_every_entry_point():
    assert any("TABLES_CONNECTION_STRING" in p for p in problems_of_entry(minimal_env(TABLES_CONNECTION_STRING=None), []))


def problems_of_entry(env, entries) -> list[str]:
    with pytest.raises(ConfigurationError) as error:
        Settings.from_env(env, require=entries)
    return error.value.problems


# -- local.settings.json -------------------------------------------------------------------------


def test_local_settings_file_fills_in_and_the_environment_wins(tmp_path):
    path = tmp_path / "local.settings.json"
    path.write_text(
        json.dumps(
            {
                "IsEncrypted": False,
                "Values": {"TABLES_PREFIX": "fromfile", "BRAND_NAME": "File", "FUNCTIONS_WORKER_RUNTIME": "python"},
            }
        )
    )
    env = {"LOCAL_SETTINGS_FILE": str(path), "BRAND_NAME": "Environment"}
    merged = local_settings_environment(env)
    assert merged["TABLES_PREFIX"] == "fromfile"
    assert merged["BRAND_NAME"] == "Environment"


def test_no_local_settings_file_is_no_problem(tmp_path):
    env = {"LOCAL_SETTINGS_FILE": str(tmp_path / "absent.json"), "X": "1"}
    assert local_settings_environment(env) == env


@pytest.mark.parametrize("content", ["{not json", '{"Values": []}', "[]"])
def test_a_malformed_local_settings_file_is_a_configuration_error(tmp_path, content):
    path = tmp_path / "local.settings.json"
    path.write_text(content)
    with pytest.raises(ConfigurationError) as error:
        read_local_settings(path)
    assert str(path) in str(error.value)
