"""Checks of the deployment description in infra/ (run by `make test`, hence by CI).

1. Every .bicep file parses with the Bicep parser checkov uses (pycep). The Bicep CLI cannot be
   installed here, and checkov silently skips files it cannot parse, so this is what catches a
   syntax error before a deployment does.
2. `checkov --framework bicep` reports no failed check; every suppression is written inline in the
   Bicep file, next to the resource, with a reason.
3. The app settings the Function App gets in Bicep are exactly the settings the code declares in
   shared.settings.SETTINGS (scope "app"), plus a short, commented allow-list of platform settings;
   and every setting name also appears in local.settings.json.example and in README.md.

checkov and pycep live in their own virtualenv (.venv-checkov, created by `make setup-test`) because
their dependencies conflict with the app's; they run as subprocesses of that virtualenv's Python.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

from shared.settings import SETTINGS

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
CHECKOV_VENV = ROOT / ".venv-checkov"
CHECKOV_PYTHON = CHECKOV_VENV / "bin" / "python"
CHECKOV = CHECKOV_VENV / "bin" / "checkov"

# The Bicep file whose Function App carries the app settings.
API_BICEP = INFRA / "app" / "api.bicep"

# App settings Bicep may set although the code does not read them: the platform reads them.
# Every entry says why; add a name here only with a reason.
PLATFORM_SETTING_PREFIXES = (
    # Identity-based connection of the Functions host to its storage account
    # (__credential, __clientId, __blobServiceUri, __queueServiceUri, __tableServiceUri).
    "AzureWebJobsStorage__",
)
PLATFORM_SETTINGS = {
    # Where the Functions host sends telemetry.
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
    # Makes the host authenticate to Application Insights with the managed identity (local auth is off).
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
    # App Service Authentication, signInCredentialType = 'secret': the setting named by
    # authsettingsV2 clientSecretSettingName; its value is a Key Vault reference.
    "MICROSOFT_PROVIDER_AUTHENTICATION_SECRET",
    # App Service Authentication, signInCredentialType = 'federated': the reserved setting name that
    # tells the platform to use the managed identity (this client id) as the sign-in app's credential.
    "OVERRIDE_USE_MI_FIC_ASSERTION_CLIENTID",
}

# Values in local.settings.json.example that only the local Functions host reads.
LOCAL_HOST_SETTINGS = {"FUNCTIONS_WORKER_RUNTIME", "AzureWebJobsStorage", "AzureWebJobsFeatureFlags"}

# main.bicep parameters that carry a setting's default value, and the setting they feed.
MAIN_PARAMETER_DEFAULTS = {
    "reconcileSchedule": "RECONCILE_SCHEDULE",
    "meteringSchedule": "METERING_SCHEDULE",
    "activationMode": "ACTIVATION_MODE",
    "tablesPrefix": "TABLES_PREFIX",
    "eventsQueueName": "EVENTS_QUEUE_NAME",
    "brandName": "BRAND_NAME",
}

KEY_VAULT_REFERENCE = "@Microsoft.KeyVault(SecretUri="

APP_SETTING_NAMES = {spec.name for spec in SETTINGS if spec.scope == "app"}
LOCAL_ONLY_NAMES = {spec.name for spec in SETTINGS if spec.scope != "app"}
ALL_SETTING_NAMES = {spec.name for spec in SETTINGS}
DEFAULTS = {spec.name: spec.default for spec in SETTINGS}


# ---- helpers ---------------------------------------------------------------------------------


def _require_checkov_venv() -> None:
    if not (CHECKOV_PYTHON.exists() and CHECKOV.exists()):
        pytest.fail(
            f"checkov's virtualenv is missing ({CHECKOV_VENV}). Create it with `make setup-test` "
            "(or: python3 -m venv .venv-checkov && .venv-checkov/bin/pip install -r "
            "devtools/requirements-checkov.txt). These infrastructure checks cannot run without it.",
            pytrace=False,
        )


def _bicep_files() -> list[Path]:
    files = sorted(INFRA.rglob("*.bicep"))
    assert files, f"no .bicep files under {INFRA}"
    return files


# Runs inside .venv-checkov: parses each file exactly as checkov's Bicep runner does and prints,
# per file, either the parsed template (JSON) or the parse error.
_PARSE_SCRIPT = r"""
import json, sys
from pathlib import Path
from pycep import BicepParser
parser = BicepParser(add_line_numbers=False)
out = {}
for name in sys.argv[1:]:
    try:
        out[name] = {"template": parser.parse(text=Path(name).read_text(encoding="utf-8")), "error": None}
    except Exception as exc:  # report every file's error, not only the first
        out[name] = {"template": None, "error": f"{type(exc).__name__}: {exc}"[:2000]}
print(json.dumps(out, default=str))
"""


@lru_cache(maxsize=1)
def _parsed() -> dict[str, dict[str, Any]]:
    _require_checkov_venv()
    files = [str(path) for path in _bicep_files()]
    proc = subprocess.run(
        [str(CHECKOV_PYTHON), "-c", _PARSE_SCRIPT, *files],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"the parser script failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


def _template(path: Path) -> dict[str, Any]:
    result = _parsed()[str(path)]
    assert result["error"] is None, f"{path.relative_to(ROOT)} does not parse: {result['error']}"
    return result["template"]


def _unquote(key: str) -> str:
    # pycep keeps the quotes of quoted object keys ('azd-service-name').
    return key[1:-1] if len(key) >= 2 and key[0] == key[-1] == "'" else key


class _AppSettings:
    """Resolves the Function App's app settings in a parsed Bicep template to {name: value node}.

    Handles what an app-settings expression can reasonably be: an object literal, a variable holding
    one, union(...) of those, a conditional between two of them, a siteConfig.appSettings array of
    {name, value} items, or a for-loop over items(<object>). Anything else fails the test loudly, so
    a refactoring of the Bicep cannot make the comparison silently incomplete.
    """

    def __init__(self, template: dict[str, Any]) -> None:
        self.variables = {name: var["value"] for name, var in (template.get("variables") or {}).items()}
        self.template = template

    def from_sources(self) -> dict[str, Any]:
        settings: dict[str, Any] = {}
        sources = 0
        for name, resource in (self.template.get("resources") or {}).items():
            if resource.get("existing"):
                continue
            config = resource.get("config") or {}
            if "condition" in config and "config" in config:  # `resource x ... = if (...) { }`
                config = config["config"]
            properties = config.get("properties")
            if resource["type"] in ("Microsoft.Web/sites", "Microsoft.Web/sites/slots") and isinstance(properties, dict):
                site_config = properties.get("siteConfig")
                if isinstance(site_config, dict) and "appSettings" in site_config:
                    settings.update(self.resolve_list(site_config["appSettings"], where=f"{name}.siteConfig.appSettings"))
                    sources += 1
            elif resource["type"] == "Microsoft.Web/sites/config" and _unquote(str(config.get("name"))) == "appsettings":
                settings.update(self.resolve_object(properties, where=f"{name}.properties"))
                sources += 1
        assert sources, "no app settings found (neither siteConfig.appSettings nor a config/appsettings resource)"
        return settings

    def resolve_list(self, node: Any, where: str) -> dict[str, Any]:
        if isinstance(node, list):
            settings = {}
            for item in node:
                assert isinstance(item, dict) and isinstance(item.get("name"), str), (
                    f"{where}: item without a literal name: {item!r}"
                )
                settings[_unquote(item["name"])] = item.get("value")
            return settings
        if isinstance(node, dict) and "loop_type" in node:
            loop = node["loop_type"]
            # for x in items(<object>): { name: x.key, value: x.value }
            assert loop.get("type") == "object", f"{where}: unsupported loop {loop!r}"
            return self.resolve_object(loop["detail"]["object_name"], where=where)
        if isinstance(node, str) and node in self.variables:
            return self.resolve_list(self.variables[node], where=f"{where} -> var {node}")
        raise AssertionError(f"{where}: cannot read app settings from {json.dumps(node)[:500]}")

    def resolve_object(self, node: Any, where: str) -> dict[str, Any]:
        if isinstance(node, str) and node in self.variables:
            return self.resolve_object(self.variables[node], where=f"{where} -> var {node}")
        if isinstance(node, dict):
            function = node.get("function")
            if isinstance(function, dict) and function.get("type") == "union":
                merged: dict[str, Any] = {}
                for arg in function["parameters"].values():
                    merged.update(self.resolve_object(arg, where=f"{where} -> union"))
                return merged
            operator = node.get("operator")
            if isinstance(operator, dict) and len(node) == 1:
                if operator.get("type") == "conditional":
                    operands = operator["operands"]
                    merged = dict(self.resolve_object(operands["true_value"], where=f"{where} -> true branch"))
                    merged.update(self.resolve_object(operands["false_value"], where=f"{where} -> false branch"))
                    return merged
                raise AssertionError(f"{where}: unsupported expression {json.dumps(node)[:500]}")
            if "function" in node and len(node) == 1:
                raise AssertionError(f"{where}: unsupported function {json.dumps(node)[:500]}")
            return {_unquote(key): value for key, value in node.items()}
        raise AssertionError(f"{where}: cannot read app settings from {json.dumps(node)[:500]}")

    def possible_values(self, node: Any) -> list[Any]:
        """The values a setting can take: both branches of every conditional, else the node itself."""
        found = list(self._conditional_branches(node))
        return found or [node]

    def _conditional_branches(self, node: Any) -> Iterable[Any]:
        if isinstance(node, dict):
            operator = node.get("operator")
            if isinstance(operator, dict) and operator.get("type") == "conditional":
                operands = operator["operands"]
                for branch in (operands["true_value"], operands["false_value"]):
                    yield from self.possible_values(branch)
                return
            for value in node.values():
                yield from self._conditional_branches(value)

    def expand(self, value: str) -> str:
        """Substitute ${var} interpolations that name string variables of the template."""

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            found = self.variables.get(name)
            return found if isinstance(found, str) else match.group(0)

        return re.sub(r"\$\{(\w+)\}", replace, value)


@lru_cache(maxsize=1)
def _api_settings() -> tuple[_AppSettings, dict[str, Any]]:
    resolver = _AppSettings(_template(API_BICEP))
    return resolver, resolver.from_sources()


def _is_platform_setting(name: str) -> bool:
    return name in PLATFORM_SETTINGS or name.startswith(PLATFORM_SETTING_PREFIXES)


# ---- 1. every Bicep file parses -----------------------------------------------------------------


def test_every_bicep_file_parses() -> None:
    results = _parsed()
    expected = {INFRA / "main.bicep", API_BICEP}
    missing = sorted(str(path.relative_to(ROOT)) for path in expected if str(path) not in results)
    assert not missing, f"expected Bicep files are missing: {missing}"
    errors = {str(Path(name).relative_to(ROOT)): result["error"] for name, result in results.items() if result["error"]}
    assert not errors, "Bicep files that do not parse:\n" + "\n".join(f"- {name}: {error}" for name, error in errors.items())


def test_azd_layout_is_consistent() -> None:
    azure_yaml = (ROOT / "azure.yaml").read_text(encoding="utf-8")
    assert re.search(r"^\s+api:\s*$", azure_yaml, re.M), "azure.yaml must declare the service `api`"
    assert re.search(r"^\s+host:\s*function\s*$", azure_yaml, re.M), "service `api` must have host: function"
    assert re.search(r"^\s+language:\s*python\s*$", azure_yaml, re.M), "service `api` must have language: python"
    assert "'azd-service-name': serviceName" in API_BICEP.read_text(encoding="utf-8"), (
        "the Function App must carry the azd-service-name tag"
    )

    main = _template(INFRA / "main.bicep")
    assert main["globals"]["scope"]["value"] == "subscription", "infra/main.bicep must target the subscription"
    parameters = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))["parameters"]
    unknown = sorted(set(parameters) - set(main.get("parameters") or {}))
    assert not unknown, f"main.parameters.json passes parameters main.bicep does not declare: {unknown}"
    required = sorted(
        name for name, param in (main.get("parameters") or {}).items() if param.get("default") is None and name not in parameters
    )
    assert not required, f"main.bicep parameters without a default that main.parameters.json does not pass: {required}"

    outputs = set(main.get("outputs") or {})
    for name in (
        "PARTNER_CENTER_LANDING_PAGE_URL",
        "PARTNER_CENTER_CONNECTION_WEBHOOK",
        "PARTNER_CENTER_ENTRA_TENANT_ID",
        "PARTNER_CENTER_ENTRA_APPLICATION_ID",
        "AZURE_KEY_VAULT_NAME",  # read back by main.parameters.json (secretOrRandomPassword)
    ):
        assert name in outputs, f"main.bicep must output {name}"


def _http_routes() -> dict[str, str]:
    """Function name -> public path (/<routePrefix>/<route>) of every HTTP function of the app."""
    from function_app import app

    host = json.loads((ROOT / "host.json").read_text(encoding="utf-8"))
    prefix = ((host.get("extensions") or {}).get("http") or {}).get("routePrefix", "api").strip("/")
    routes = {}
    for function in app.get_functions():
        for binding in function.get_bindings_dict()["bindings"]:
            if binding.get("type") == "httpTrigger":
                routes[function.get_function_name()] = "/" + "/".join(
                    part for part in (prefix, binding["route"].strip("/")) if part
                )
    return routes


def test_landing_sign_in_accepts_personal_accounts_by_default() -> None:
    """Microsoft's life-cycle guidance asks landing pages to accept personal Microsoft accounts too."""
    main = _template(INFRA / "main.bicep")
    accounts = main["parameters"]["signInAccounts"]
    assert accounts["default"] == "workSchoolAndPersonal"
    allowed = next(d["argument"] for d in accounts["decorators"] if d["type"] == "allowed")
    assert set(allowed) == {"workSchoolAndPersonal", "workSchoolOnly"}  # work/school only stays a parameter
    text = (INFRA / "main.bicep").read_text(encoding="utf-8")
    # common = work, school and personal accounts; organizations = work and school only
    assert "signInAccounts == 'workSchoolAndPersonal' ? 'common' : 'organizations'" in text
    assert "signInIssuer: '${environment().authentication.loginEndpoint}${signInAuthority}/v2.0'" in text
    outputs = main.get("outputs") or {}
    assert "SIGN_IN_AUDIENCE" in outputs
    parameters = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))["parameters"]
    assert parameters["signInAccounts"]["value"] == "${SIGN_IN_ACCOUNTS=workSchoolAndPersonal}"


def test_urls_and_alerts_match_the_function_app() -> None:
    routes = _http_routes()
    for name in ("landing_page", "webhook", "health"):
        assert name in routes, f"the function app has no HTTP function {name!r}; update infra/ if it was renamed"

    outputs = _template(INFRA / "main.bicep").get("outputs") or {}
    landing = outputs["PARTNER_CENTER_LANDING_PAGE_URL"]["value"]
    webhook = outputs["PARTNER_CENTER_CONNECTION_WEBHOOK"]["value"]
    assert landing.endswith(routes["landing_page"]), f"landing page URL {landing!r} does not end with {routes['landing_page']!r}"
    assert webhook.endswith(routes["webhook"]), f"webhook URL {webhook!r} does not end with {routes['webhook']!r}"

    # Easy Auth must let Microsoft's webhook calls and health probes through to the code.
    api = _template(API_BICEP)
    auth = [
        resource["config"]
        for resource in api["resources"].values()
        if resource["type"] == "Microsoft.Web/sites/config" and _unquote(str(resource["config"].get("name"))) == "authsettingsV2"
    ]
    assert len(auth) == 1, "api.bicep must declare one authsettingsV2 resource"
    excluded = set(auth[0]["properties"]["globalValidation"]["excludedPaths"])
    assert {routes["webhook"], routes["health"]} <= excluded, (
        f"authsettingsV2 excludedPaths {sorted(excluded)} must contain the webhook and health paths"
    )
    assert routes["landing_page"] not in excluded, "the landing page must stay behind sign-in"
    assert routes["publisher_usage"] in excluded, "the SaaS application's usage reports carry an app token, validated in code"

    # The alerts query what the code writes.
    alerts = (INFRA / "app" / "alerts.bicep").read_text(encoding="utf-8")
    assert f"'{routes['webhook']}'" in alerts, "alerts.bicep must filter webhook 401s on the webhook path"
    reconcile = (ROOT / "shared" / "reconcile.py").read_text(encoding="utf-8")
    for marker in ("reconcile summary", "flagged_count"):
        assert marker in alerts and marker in reconcile, (
            f"the reconciliation alert and shared/reconcile.py must both use {marker!r}"
        )
    metering = (ROOT / "shared" / "metering.py").read_text(encoding="utf-8")
    for marker in ("usage_flagged", "usage_near_expiry", "metering_endpoint_missing"):
        assert marker in alerts and f'"{marker}: ' in metering, (
            f"the metering alert and shared/metering.py must both use {marker!r}"
        )
    read_back = (ROOT / "shared" / "usage_readback.py").read_text(encoding="utf-8")
    assert "usage_readback_difference" in alerts and '"usage_readback_difference: ' in read_back
    work_queue = (ROOT / "shared" / "work_queue.py").read_text(encoding="utf-8")
    devhost = (ROOT / "devtools" / "devhost.py").read_text(encoding="utf-8")
    marker = "queue_message_poisoned"
    assert marker in alerts and f'POISON_MARKER = "{marker}"' in work_queue and f'POISON_MARKER = "{marker}"' in devhost
    storage = (INFRA / "core" / "storage.bicep").read_text(encoding="utf-8")
    api = (INFRA / "app" / "api.bicep").read_text(encoding="utf-8")
    # the work queue the app setting names exists, with its poison queue
    assert "EVENTS_WORK_QUEUE: '${eventsQueueName}-jobs'" in api
    assert "name: '${eventsQueueName}-jobs'" in storage and "name: '${eventsQueueName}-jobs-poison'" in storage


# ---- 2. checkov ----------------------------------------------------------------------------------


def test_checkov_reports_no_failed_check() -> None:
    _require_checkov_venv()
    for config in (".checkov.yaml", ".checkov.yml"):
        for folder in (ROOT, INFRA):
            assert not (folder / config).exists(), (
                f"{(folder / config).relative_to(ROOT)} exists: suppress checks inline in the Bicep file, with a reason"
            )
    env = dict(os.environ)
    env.pop("BC_API_KEY", None)  # never talk to a platform from a test
    proc = subprocess.run(
        [str(CHECKOV), "-d", str(INFRA), "--framework", "bicep", "--output", "json", "--skip-download", "--compact"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert proc.stdout.strip(), f"checkov printed nothing (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    bicep = [item for item in reports if item.get("check_type") == "bicep"]
    assert bicep, f"checkov ran no bicep checks:\n{proc.stdout[:2000]}"
    results = bicep[0]["results"]

    assert not results.get("parsing_errors"), f"checkov could not parse: {results['parsing_errors']}"
    failed = [
        f"- {check['check_id']} {check['check_name']}: {check['resource']} ({check['file_path']}:{check['file_line_range']})"
        for check in results.get("failed_checks", [])
    ]
    assert not failed, (
        "checkov failed checks (fix them, or suppress inline with `// checkov:skip=CKV_...: reason`):\n" + "\n".join(failed)
    )
    assert results.get("passed_checks"), "checkov passed no check at all: is it scanning infra/?"

    unexplained = [
        f"- {check['check_id']} on {check['resource']}"
        for check in results.get("skipped_checks", [])
        if len((check.get("check_result") or {}).get("suppress_comment") or "") < 20
        or check["check_result"]["suppress_comment"] == "No comment provided"
    ]
    assert not unexplained, "suppressions without a reason:\n" + "\n".join(unexplained)
    assert proc.returncode == 0, f"checkov exited with {proc.returncode}:\n{proc.stderr[-4000:]}"


# ---- 3. settings: code, Bicep, local.settings.json.example, README ------------------------------


def test_bicep_sets_every_app_setting_of_the_code() -> None:
    _, settings = _api_settings()
    missing = sorted(APP_SETTING_NAMES - set(settings))
    assert not missing, f"app settings the code reads but {API_BICEP.relative_to(ROOT)} does not set: {missing}"


def test_bicep_sets_no_setting_unknown_to_the_code() -> None:
    _, settings = _api_settings()
    local_only = sorted(set(settings) & LOCAL_ONLY_NAMES)
    assert not local_only, f"local-development-only settings must not be set in Azure: {local_only}"
    unknown = sorted(name for name in settings if name not in APP_SETTING_NAMES and not _is_platform_setting(name))
    assert not unknown, (
        f"app settings in {API_BICEP.relative_to(ROOT)} that shared/settings.py does not declare: {unknown} "
        "(declare them there, or, for a platform setting, add it with a reason to PLATFORM_SETTINGS in this test)"
    )


def test_secret_settings_are_key_vault_references() -> None:
    resolver, settings = _api_settings()
    problems = []
    for spec in SETTINGS:
        if not spec.secret or spec.name not in settings:
            continue
        for value in resolver.possible_values(settings[spec.name]):
            if value == "":
                continue
            if not (isinstance(value, str) and resolver.expand(value).startswith(KEY_VAULT_REFERENCE)):
                problems.append(f"- {spec.name}: {json.dumps(value)[:200]}")
    auth_secret = settings.get("MICROSOFT_PROVIDER_AUTHENTICATION_SECRET")
    if auth_secret is not None:
        for value in resolver.possible_values(auth_secret):
            if value != "" and not (isinstance(value, str) and resolver.expand(value).startswith(KEY_VAULT_REFERENCE)):
                problems.append(f"- MICROSOFT_PROVIDER_AUTHENTICATION_SECRET: {json.dumps(value)[:200]}")
    assert not problems, "secret settings must be empty or a Key Vault reference:\n" + "\n".join(problems)


def test_bicep_literal_values_match_the_code_defaults() -> None:
    resolver, settings = _api_settings()
    declared = set(resolver.variables) | set(resolver.template.get("parameters") or {})
    mismatches = []
    for name, value in settings.items():
        default = DEFAULTS.get(name)
        # Plain strings that are not the name of a parameter or variable are literals.
        if name not in DEFAULTS or not isinstance(value, str) or value in declared or "${" in value:
            continue
        if value and default and value != default:
            mismatches.append(f"- {name}: Bicep {value!r}, shared/settings.py {default!r}")

    main = _template(INFRA / "main.bicep")
    main_parameters = main.get("parameters") or {}
    azd_parameters = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))["parameters"]
    for parameter, setting in MAIN_PARAMETER_DEFAULTS.items():
        assert parameter in main_parameters, f"main.bicep no longer has the parameter {parameter}"
        bicep_default = main_parameters[parameter].get("default")
        if bicep_default != DEFAULTS[setting]:
            mismatches.append(f"- main.bicep {parameter} default {bicep_default!r}, {setting} default {DEFAULTS[setting]!r}")
        azd_value = (azd_parameters.get(parameter) or {}).get("value", "")
        match = re.fullmatch(r"\$\{\w+=(.*)\}", azd_value)
        if match and match.group(1) != DEFAULTS[setting]:
            mismatches.append(
                f"- main.parameters.json {parameter} default {match.group(1)!r}, {setting} default {DEFAULTS[setting]!r}"
            )
    assert not mismatches, "Bicep defaults differ from shared/settings.py:\n" + "\n".join(mismatches)


def test_local_settings_example_lists_every_setting() -> None:
    path = ROOT / "local.settings.json.example"
    assert path.exists(), f"{path.name} is missing"
    values = json.loads(path.read_text(encoding="utf-8")).get("Values")
    assert isinstance(values, dict), f"{path.name} has no Values object"
    missing = sorted(ALL_SETTING_NAMES - set(values))
    assert not missing, f"settings missing from {path.name} Values: {missing}"
    unknown = sorted(
        name
        for name in values
        if name not in ALL_SETTING_NAMES and name not in LOCAL_HOST_SETTINGS and not name.startswith("AzureWebJobsStorage__")
    )
    assert not unknown, f"{path.name} Values has names shared/settings.py does not declare: {unknown}"


def test_readme_documents_every_setting() -> None:
    path = ROOT / "README.md"
    assert path.exists(), "README.md is missing"
    text = path.read_text(encoding="utf-8")
    missing = sorted(name for name in ALL_SETTING_NAMES if f"`{name}`" not in text)
    assert not missing, f"settings README.md does not mention (as `NAME`): {missing}"
