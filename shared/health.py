"""Health check: is the configuration complete and does storage answer? Never reveals secrets."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shared.errors import AppError, ConfigurationError

if TYPE_CHECKING:
    from shared.services import Services


def check_health(get_services: Callable[[], Services]) -> tuple[int, dict[str, Any]]:
    checks: dict[str, dict[str, Any]] = {}
    try:
        services = get_services()
    except ConfigurationError as error:
        return 503, {"status": "unhealthy", "checks": {"configuration": {"ok": False, "problems": error.problems}}}
    try:
        _ = services.policy  # a PUBLISHER_POLICY that cannot be loaded is a configuration problem
    except ConfigurationError as error:
        return 503, {"status": "unhealthy", "checks": {"configuration": {"ok": False, "problems": error.problems}}}
    from shared.settings import OPTIONAL_ENTRY_POINTS

    problems = services.settings.problems_by_entry_point()
    by_function = {entry: found for entry, found in problems.items() if entry not in OPTIONAL_ENTRY_POINTS}
    # An optional feature left unconfigured (e.g. the publisher API without PUBLISHER_API_AUDIENCE):
    # its functions answer 503 and say why, but a health probe must not restart a working app for it.
    disabled = {entry: found for entry, found in problems.items() if entry in OPTIONAL_ENTRY_POINTS}
    if by_function:  # the other functions still work; this one answers 503 until it is fixed
        checks["configuration"] = {
            "ok": False,
            "problems": [problem for found in by_function.values() for problem in found],
            "functions": by_function,
        }
    else:
        checks["configuration"] = {"ok": True}
    if disabled:
        checks["configuration"]["disabled"] = disabled
    try:
        services.repository.check()
        checks["storage"] = {"ok": True}
    except AppError as error:
        checks["storage"] = {"ok": False, "error": error.code}
    if checks["storage"]["ok"] and services.usage_store is not None:
        checks["metering"] = _metering(services)
    healthy = all(check["ok"] for check in checks.values())
    return (200 if healthy else 503), {"status": "healthy" if healthy else "unhealthy", "checks": checks}


def _metering(services: Services) -> dict[str, Any]:
    """The last metering run's backlog (one row read; informational: usage waits, it is not lost)."""
    from shared.domain import parse_timestamp

    assert services.usage_store is not None
    try:
        summary = services.usage_store.latest_summary()
    except AppError as error:
        return {"ok": True, "error": error.code}
    read_back = _read_back(services)
    if summary is None:
        return {"ok": True, "lastRunAt": None, "emission": services.settings.metering_emission, "readBack": read_back}
    oldest = parse_timestamp(summary.get("oldest_pending_hour"))
    age = round((services.clock() - oldest).total_seconds() / 3600, 2) if oldest else None
    emission = summary.get("emission", "on")
    warnings = []
    if emission == "endpoint_missing":
        warnings.append(
            "the metering API answered 404 on batchUsageEvent (Microsoft's SaaS emulator has no metering routes): "
            "usage is kept pending; point MARKETPLACE_API_BASE_URL at Microsoft or set METERING_EMISSION=off"
        )
    elif emission == "off":
        warnings.append("METERING_EMISSION=off: usage is taken in and kept pending, never sent")
    if read_back.get("differences"):
        warnings.append(
            f"{read_back['differences']} usage differences with Microsoft's read-back: see the console's Billing page"
        )
    return {
        "ok": True,  # usage waits, it is not lost: never a reason to restart the app
        "lastRunAt": summary.get("ranAt"),
        "emission": emission,
        "pendingHours": summary.get("pending_hours", 0),
        "bucketsToRetry": summary.get("retry", 0),
        "oldestPendingHours": age,
        "flagged": summary.get("flagged_total", 0),
        "nearExpiry": summary.get("near_expiry", 0),
        "carriedForward": summary.get("carried_forward", 0),
        "readBack": read_back,
        **({"warnings": warnings} if warnings else {}),
    }


def _read_back(services: Services) -> dict[str, Any]:
    """The last daily read-back of Microsoft's usage aggregates (one row)."""
    assert services.usage_store is not None
    try:
        summary = services.usage_store.latest_summary("readback")
    except AppError as error:
        return {"error": error.code}
    if summary is None:
        return {"lastRunAt": None}
    return {
        "lastRunAt": summary.get("ranAt"),
        "days": summary.get("days", []),
        "differences": summary.get("differences", 0),
        "rejected": summary.get("rejected", 0),
        "error": summary.get("error") or None,
    }
