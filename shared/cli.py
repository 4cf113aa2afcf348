"""Operator command line: look at subscriptions, reconcile, activate (manual mode), replay webhooks.

Uses the app's own settings (the same environment variables as the function app, read by
``Settings.from_env``) and the same use cases, so what it does is exactly what the app would do::

    python -m shared.cli list [--status S] [--offer O] [--plan P] [--json]
    python -m shared.cli show SUBSCRIPTION_ID [--json]
    python -m shared.cli reconcile [--dry-run] [--time-budget SECONDS] [--json]
    python -m shared.cli activate SUBSCRIPTION_ID [--json]
    python -m shared.cli replay [--dry-run] [--json]
    python -m shared.cli plans SUBSCRIPTION_ID [--json]
    python -m shared.cli change-plan SUBSCRIPTION_ID PLAN_ID [--wait] [--json]
    python -m shared.cli change-quantity SUBSCRIPTION_ID QUANTITY [--wait] [--json]
    python -m shared.cli cancel SUBSCRIPTION_ID [--wait] [--json]
    python -m shared.cli operation OPERATION_ID [--json]
    python -m shared.cli usage SUBSCRIPTION_ID [--from TIME] [--to TIME] [--json]
    python -m shared.cli usage --flagged [--json]
    python -m shared.cli meter-now [--time-budget SECONDS] [--json]

Exit codes: 0 success, 1 the operation failed (or found nothing to act on), 2 usage or
configuration error. ``--json`` prints one JSON document on standard output; messages and logs go
to standard error.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from shared.ids import canonical_marketplace_id, is_marketplace_id

if TYPE_CHECKING:
    from shared.services import Services

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class _UsageError(Exception):
    """A usage problem (argparse's, or found after parsing, e.g. an unknown status)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so usage errors get the same handling (and JSON)."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _marketplace_id(what: str) -> Callable[[str], str]:
    """An argparse type accepting only a GUID, refusing anything else as "<what> is a GUID"."""

    def parse(text: str) -> str:
        if not is_marketplace_id(text):
            raise argparse.ArgumentTypeError(f"{what} is a GUID")
        return canonical_marketplace_id(text)

    return parse


_subscription_id = _marketplace_id("a subscription id")


def _usage_target(text: str) -> str:
    """``usage``'s first argument: a subscription id, or ``reconcile`` (the read-back)."""
    return "reconcile" if text.strip().lower() == "reconcile" else _subscription_id(text)


_operation_id = _marketplace_id("an operation id")


# ---------------------------------------------------------------------------------------------
# output helpers


def _emit_json(out: TextIO, data: Any) -> None:
    out.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _table(out: TextIO, headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[("" if value is None else str(value)) for value in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    out.write("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=False)).rstrip() + "\n")
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() + "\n")


def _stderr(message: str) -> None:
    sys.stderr.write(message.rstrip("\n") + "\n")


def _operator() -> str:
    user = os.environ.get("USER") or os.environ.get("USERNAME") or os.environ.get("LOGNAME")
    if not user:
        try:
            import getpass

            user = getpass.getuser()
        except Exception:  # noqa: BLE001 - no user database (containers)
            user = "unknown"
    return f"operator:{user}"


def _record_json(record) -> dict[str, Any]:
    from shared.domain import format_timestamp

    data = record.snapshot()
    data.update(
        {
            "publisherId": record.publisher_id,
            "allowedCustomerOperations": list(record.allowed_customer_operations),
            "signedInUser": record.signed_in_user,
            "activationAttempts": record.activation_attempts,
            "activationRequestedAt": format_timestamp(record.activation_requested_at),
            "unsubscribedAt": format_timestamp(record.unsubscribed_at),
            "lastEventAt": format_timestamp(record.last_event_at),
            "createdAt": format_timestamp(record.created_at),
            "updatedAt": format_timestamp(record.updated_at),
            "needsAttention": record.needs_attention,
            "historyCount": record.history_seq,
        }
    )
    return data


def _status_value(text: str) -> str:
    """The stored spelling of a local status, matched case-insensitively."""
    from shared.state_machine import LocalStatus

    for status in LocalStatus:
        if status.value.lower() == text.strip().lower():
            return status.value
    raise _UsageError(f"unknown status {text!r}; one of: {', '.join(s.value for s in LocalStatus)}")


# ---------------------------------------------------------------------------------------------
# commands


def cmd_list(services: Services, args, out: TextIO) -> int:
    status = _status_value(args.status) if args.status else ""
    records = sorted(
        services.repository.list_records(status=status, offer_id=args.offer or "", plan_id=args.plan or ""),
        key=lambda r: (r.created_at is None, r.created_at, r.id),
    )
    if args.json:
        _emit_json(out, [_record_json(record) for record in records])
        return EXIT_OK
    if not records:
        out.write("No subscriptions.\n")
        return EXIT_OK
    _table(
        out,
        ["ID", "STATUS", "OFFER", "PLAN", "QTY", "FLAGS", "UPDATED"],
        [
            [
                r.id,
                r.status.value,
                r.offer_id,
                r.plan_id,
                "-" if r.quantity is None else r.quantity,
                ",".join(r.flags) or "-",
                r.updated_at.strftime("%Y-%m-%d %H:%M") if r.updated_at else "-",
            ]
            for r in records
        ],
    )
    out.write(f"{len(records)} subscription(s)\n")
    return EXIT_OK


def cmd_show(services: Services, args, out: TextIO) -> int:
    stored = services.repository.get(args.subscription_id)
    if stored is None:
        if args.json:
            _emit_json(out, {"error": "not_found", "subscriptionId": args.subscription_id})
        _stderr(f"No subscription {args.subscription_id} is recorded.")
        return EXIT_FAILED
    record = stored.record
    history = services.repository.history(args.subscription_id)
    data = _record_json(record)
    data["history"] = history
    if args.json:
        _emit_json(out, data)
        return EXIT_OK
    fields = [
        ("Subscription", record.id),
        ("Name", record.name),
        ("Status", f"{record.status.value} (Microsoft: {record.marketplace_status or '-'})"),
        ("Offer / plan", f"{record.offer_id or '-'} / {record.plan_id or '-'}"),
        ("Quantity", "-" if record.quantity is None else record.quantity),
        ("Term", f"{record.term_unit or '-'} {data['term']['startDate'] or '-'} .. {data['term']['endDate'] or '-'}"),
        ("Purchaser", record.purchaser.email_id or "-"),
        ("Beneficiary", record.beneficiary.email_id or "-"),
        ("Activated by", record.activated_by or "-"),
        ("Activation attempts", record.activation_attempts),
        ("Flags", ", ".join(record.flags) or "-"),
        ("Created / updated", f"{data['createdAt'] or '-'} / {data['updatedAt'] or '-'}"),
    ]
    if record.unsubscribed_at:
        fields.append(("Unsubscribed", f"{data['unsubscribedAt']} (keep data until {data['retainDataUntil']})"))
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        out.write(f"{name.ljust(width)}  {value}\n")
    out.write(f"\nHistory ({len(history)}):\n")
    _table(
        out,
        ["SEQ", "RECORDED", "SOURCE", "KIND", "RESULT", "STATUS", "DETAIL"],
        [
            [
                h.get("seq"),
                h.get("recordedAt"),
                h.get("source"),
                h.get("kind"),
                h.get("result"),
                f"{h.get('fromStatus') or '-'} -> {h.get('toStatus') or '-'}",
                h.get("detail") or ", ".join(sorted((h.get("changes") or {}).keys())),
            ]
            for h in history
        ],
    )
    return EXIT_OK


EXPLAIN_LIMIT = 100  # dry run: field-level detail for this many differences (one read each side)


def _explain(services: Services, differences: list[dict[str, Any]]) -> None:
    """Dry run: add the differing fields (ours -> Microsoft's) to status and detail drift."""
    from shared import state_machine as sm
    from shared.errors import AppError

    explained = 0
    for difference in differences:
        if difference["kind"] not in ("status_drift", "detail_drift") or explained >= EXPLAIN_LIMIT:
            continue
        explained += 1
        try:
            stored = services.repository.get(difference["subscriptionId"])
            subscription = services.marketplace.get_subscription(difference["subscriptionId"])
        except AppError:
            continue
        if stored is not None:
            difference["changes"] = sm.drift(stored.record, subscription)


def _describe_difference(difference: dict[str, Any]) -> str:
    changes = difference.get("changes")
    if changes:
        return "; ".join(
            f"{name}: {ours} -> {theirs}"
            for name, (ours, theirs) in sorted(changes.items())
            if not (name == "marketplace_status" and "status" in changes)
        )
    detail = difference.get("detail")
    if isinstance(detail, dict):
        return ", ".join(f"{key}={value}" for key, value in detail.items())
    return str(detail)


def _print_summary(out: TextIO, summary: dict[str, Any], *, what: str) -> None:
    dry = summary.get("dry_run")
    state = "completed" if summary.get("completed") else f"stopped ({summary.get('stopped_reason') or 'unknown'})"
    out.write(f"{what} {state}{' - dry run, nothing was changed' if dry else ''}\n")
    repairs = summary.get("repairs") or {}
    label = "Would repair" if dry else "Repairs"
    out.write(f"  {label}: " + (", ".join(f"{k}={v}" for k, v in sorted(repairs.items())) or "none") + "\n")
    if summary.get("deferred"):
        out.write(f"  Deferred (changed locally meanwhile; next run looks again): {summary['deferred']}\n")
    flagged = summary.get("flagged") or []
    total = summary.get("flagged_count", len(flagged))
    shown = f" (first {len(flagged)} listed)" if total > len(flagged) else ""
    out.write(f"  Flagged for an operator: {total}{shown}\n")
    for flag in flagged:
        out.write(f"    {flag['subscriptionId']}  {flag['reason']}\n")
    if "subscriptions_seen" in summary and summary.get("pages"):
        out.write(
            f"  Subscriptions seen: {summary['subscriptions_seen']} in {summary['pages']} page(s)"
            f"{' (resumed from checkpoint)' if summary.get('resumed_from_checkpoint') else ''}\n"
        )
    if summary.get("events_pending"):
        out.write(
            f"  Lifecycle events pending: {summary['events_pending']}"
            f" (waiting over 15 minutes: {summary.get('events_waiting_too_long', 0)})\n"
        )
    out.write(
        f"  Marketplace calls: {summary.get('marketplace_calls', 0)}, storage reads: {summary.get('storage_reads', 0)},"
        f" writes: {summary.get('storage_writes', 0)}, {summary.get('duration_seconds', 0)} s\n"
    )
    if summary.get("stopped_reason") == "time_budget" and not dry:
        out.write("  Out of time: a checkpoint was saved; run again to continue.\n")


def cmd_reconcile(services: Services, args, out: TextIO) -> int:
    from shared.reconcile import run_reconciliation

    summary = run_reconciliation(services, dry_run=args.dry_run, time_budget_seconds=args.time_budget, actor=_operator())
    data = summary.to_json(with_differences=True)
    if args.dry_run:
        _explain(services, data["differences"])
    failed = not summary.completed and summary.stopped_reason != "time_budget"
    if args.json:
        _emit_json(out, data)
    else:
        differences = data["differences"]
        out.write(f"Differences ({len(differences)}):\n")
        if differences:
            _table(
                out,
                ["SUBSCRIPTION", "KIND", "DETAIL"],
                [[d["subscriptionId"], d["kind"], _describe_difference(d)] for d in differences],
            )
        else:
            out.write("  none: our records match Microsoft's\n")
        _print_summary(out, data, what="Reconciliation")
    if failed:
        _stderr(f"reconciliation stopped: {summary.stopped_reason}")
    return EXIT_FAILED if failed else EXIT_OK


def cmd_activate(services: Services, args, out: TextIO) -> int:
    from shared.activation import ActivationResult, activate
    from shared.state_machine import Source

    subscription_id = args.subscription_id
    if services.repository.get(subscription_id) is None:
        if args.json:
            _emit_json(out, {"subscriptionId": subscription_id, "result": "not_found"})
        _stderr(f"No subscription {subscription_id} is recorded (run `reconcile` to pick up purchases).")
        return EXIT_FAILED
    if services.settings.activation_mode != "manual":
        _stderr("note: ACTIVATION_MODE is not manual; activating anyway.")
    actor = _operator()
    result = activate(services, subscription_id, actor=actor, source=Source.OPERATOR)
    ok = result.result in (ActivationResult.ACTIVATED, ActivationResult.ALREADY_ACTIVE, ActivationResult.REQUESTED)
    messages = {
        ActivationResult.ACTIVATED: "activated: Microsoft shows it Subscribed",
        ActivationResult.ALREADY_ACTIVE: "already active: nothing sent",
        ActivationResult.REQUESTED: "activation sent; Microsoft has not confirmed yet (the reconciler confirms it)",
        ActivationResult.IN_PROGRESS: "another activation is in flight; try again in two minutes",
        ActivationResult.CANCELLED: "the subscription is cancelled (Unsubscribed)",
        ActivationResult.FAILED: "activation failed",
    }
    record = result.record
    if args.json:
        _emit_json(
            out,
            {
                "subscriptionId": subscription_id,
                "result": result.result.value,
                "ok": ok,
                "actor": actor,
                "status": record.status.value if record else None,
                "error": str(result.error) if result.error else None,
            },
        )
    else:
        out.write(f"{subscription_id}: {messages.get(result.result, result.result.value)}\n")
        if record is not None:
            out.write(f"  status: {record.status.value}, by {actor}\n")
        if result.error:
            out.write(f"  error: {result.error}\n")
    return EXIT_OK if ok else EXIT_FAILED


def cmd_replay(services: Services, args, out: TextIO) -> int:
    from shared.reconcile import Reconciler

    reconciler = Reconciler(services, dry_run=args.dry_run, time_budget_seconds=args.time_budget)
    summary = reconciler.replay_pending(all_pending=True)
    data = summary.to_json(with_differences=True)
    data["pending_found"] = len(reconciler.pending_markers)
    if args.json:
        _emit_json(out, data)
    else:
        found = data["pending_found"]
        out.write(f"Recorded but unapplied webhook operations: {found}\n")
        if data["differences"]:
            _table(
                out,
                ["SUBSCRIPTION", "KIND", "DETAIL"],
                [[d["subscriptionId"], d["kind"], _describe_difference(d)] for d in data["differences"]],
            )
        _print_summary(out, data, what="Replay")
    if not summary.completed:
        _stderr(f"replay stopped: {summary.stopped_reason}")
        return EXIT_FAILED
    return EXIT_OK


def cmd_plans(services: Services, args, out: TextIO) -> int:
    from shared.publisher import plans_view

    view = plans_view(services, args.subscription_id)
    if args.json:
        _emit_json(out, view)
        return EXIT_OK
    out.write(
        f"Plans available to {args.subscription_id} (current: {view['currentPlanId']}, quantity {view['currentQuantity']}):\n"
    )
    _table(
        out,
        ["PLAN", "NAME", "PER SEAT", "MIN", "MAX"],
        [
            [p["planId"], p["displayName"], "yes" if p["isPricePerSeat"] else "no", p["minQuantity"], p["maxQuantity"]]
            for p in view["plans"]
        ],
    )
    return EXIT_OK


def _publisher_change(services: Services, args, out: TextIO, request) -> int:
    import time

    from shared.publisher import follow_operation, request_change

    result = request_change(services, request, caller=_operator(), idempotency_key=args.idempotency_key or "")
    operation_id = result.body["id"]
    status = result.body["status"]
    operation = None
    if args.wait:
        ends = time.monotonic() + args.timeout
        wait = 1.0
        while status == "InProgress" and time.monotonic() < ends:
            time.sleep(min(wait, max(0.0, ends - time.monotonic())))
            operation = follow_operation(services, request.subscription_id, operation_id)
            status = operation.public_status if operation is not None else status
            wait = min(wait * 2, 10.0)
    body = operation.to_api() if operation is not None else result.body
    if args.json:
        _emit_json(out, body)
    else:
        out.write(f"operation {operation_id}: {body['action']} of {request.subscription_id}: {status}\n")
        if body.get("errorMessage"):
            out.write(f"  Microsoft: {body['errorMessage']}\n")
        if status == "InProgress":
            out.write("  still in progress: `operation ID` shows it; the app follows it to the end\n")
    if status in ("Failed", "Conflict") or (args.wait and status == "InProgress"):
        return EXIT_FAILED
    return EXIT_OK


def cmd_change_plan(services: Services, args, out: TextIO) -> int:
    from shared.publisher import CHANGE_PLAN, ChangeRequest

    return _publisher_change(services, args, out, ChangeRequest(args.subscription_id, CHANGE_PLAN, plan_id=args.plan_id))


def cmd_change_quantity(services: Services, args, out: TextIO) -> int:
    from shared.publisher import CHANGE_QUANTITY, ChangeRequest

    return _publisher_change(services, args, out, ChangeRequest(args.subscription_id, CHANGE_QUANTITY, quantity=args.quantity))


def cmd_cancel(services: Services, args, out: TextIO) -> int:
    from shared.publisher import UNSUBSCRIBE, ChangeRequest

    return _publisher_change(services, args, out, ChangeRequest(args.subscription_id, UNSUBSCRIBE))


def cmd_operation(services: Services, args, out: TextIO) -> int:
    from shared.publisher import describe, operation_view

    operation = operation_view(services, args.operation_id)
    if args.json:
        _emit_json(out, operation.to_api())
    else:
        out.write(describe(operation) + "\n")
    return EXIT_OK


def cmd_usage(services: Services, args, out: TextIO) -> int:
    from shared.domain import parse_timestamp
    from shared.metering import usage_store, usage_view

    if args.subscription_id == "reconcile":
        return _usage_reconcile(services, args, out)
    decisions = [name for name in ("requeue", "move", "unbillable") if getattr(args, name)]
    if decisions:
        return _usage_resolve(services, args, decisions, out)
    if args.flagged:
        if args.subscription_id:
            raise _UsageError("give SUBSCRIPTION_ID or --flagged, not both")
        flagged = usage_store(services).list_flagged()
        if args.json:
            _emit_json(out, {"flagged": flagged})
            return EXIT_OK
        out.write(f"Flagged usage ({len(flagged)}):\n")
        if flagged:
            rows = [
                [f["hour"], f["subscriptionId"], f["dimension"], _number(f["quantity"]), f["status"], f["message"]]
                for f in flagged
            ]
            _table(out, ["HOUR", "SUBSCRIPTION", "DIMENSION", "QUANTITY", "STATUS", "WHY"], rows)
        else:
            out.write("  none: nothing needs a person\n")
        return EXIT_OK
    if not args.subscription_id:
        raise _UsageError("give SUBSCRIPTION_ID or --flagged")
    now = services.clock()
    end = parse_timestamp(args.to) if args.to else now
    start = parse_timestamp(args.from_) if args.from_ else now - timedelta(hours=24)
    if start is None or end is None:
        raise _UsageError("--from and --to take ISO 8601 UTC date-times, e.g. 2026-12-03T09:00:00Z")
    buckets = usage_view(services, args.subscription_id, start, end)
    if args.json:
        _emit_json(out, {"subscriptionId": args.subscription_id, "buckets": buckets})
        return EXIT_OK
    out.write(f"Usage of {args.subscription_id} ({len(buckets)} buckets):\n")
    if buckets:
        rows = [
            [
                b["hour"],
                b["dimension"],
                b["planId"],
                _number(b["reported"]),
                _number(b["quantity"]),
                b["status"],
                b["usageEventId"] or "",
                b["message"],
            ]
            for b in buckets
        ]
        _table(out, ["HOUR", "DIMENSION", "PLAN", "REPORTED", "SENT", "STATUS", "USAGE EVENT", "NOTE"], rows)
    return EXIT_OK


def _number(value: float) -> str:
    return f"{value:g}"


def _usage_reconcile(services: Services, args, out: TextIO) -> int:
    """``usage reconcile [--days N]``: read Microsoft's daily aggregates now and compare."""
    from shared.usage_readback import run_usage_readback

    summary = run_usage_readback(services, days=args.days)
    if args.json:
        _emit_json(out, summary.to_json())
        return EXIT_OK if not summary.differences and not summary.error else EXIT_FAILED
    data = summary.to_json()
    if summary.error:
        out.write(
            f"Read-back of {', '.join(summary.days)}: Microsoft's usageEvents could not be read ({summary.error}); nothing compared\n"
        )
        return EXIT_FAILED
    out.write(
        "Read-back of {days}: {rows} rows, {matched} match, {differences} differ ({rejected} rejected), {processing} processing, "
        "{test_rows} test; ours {revenue_ours}, Microsoft processed {revenue_microsoft}\n".format(
            **{**data, "days": ", ".join(summary.days)}
        )
    )
    if summary.found:
        rows = [
            [
                f["day"],
                f["subscriptionId"],
                f["dimension"],
                f["ours"],
                f["submitted"],
                f["processed"],
                f["reconStatus"],
                f["status"],
            ]
            for f in summary.found
        ]
        _table(out, ["DAY", "SUBSCRIPTION", "DIMENSION", "OURS", "SUBMITTED", "PROCESSED", "RECON", "STATUS"], rows)
    return EXIT_OK if not summary.differences else EXIT_FAILED


def _usage_resolve(services: Services, args, decisions: list[str], out: TextIO) -> int:
    """``usage SUBSCRIPTION_ID --hour H --dimension D --requeue|--move|--unbillable``: decide on flagged usage."""
    from shared.domain import parse_timestamp
    from shared.metering import resolve_flagged_usage

    if len(decisions) > 1:
        raise _UsageError("give one of --requeue, --move, --unbillable")
    if args.subscription_id is None or not args.hour or not args.dimension:
        raise _UsageError("deciding on flagged usage needs SUBSCRIPTION_ID, --hour and --dimension")
    hour = parse_timestamp(args.hour)
    if hour is None:
        raise _UsageError("--hour takes an ISO 8601 UTC date-time, e.g. 2026-12-03T09:00:00Z")
    result = resolve_flagged_usage(services, args.subscription_id, hour, args.dimension, decisions[0], actor=_operator())
    if args.json:
        _emit_json(out, result)
    else:
        out.write(
            f"{result['hour']} {result['dimension']} of {result['subscriptionId']}: {result['status']} ({result['message']})\n"
        )
    return EXIT_OK


def cmd_meter_now(services: Services, args, out: TextIO) -> int:
    from shared.metering import run_metering

    summary = run_metering(services, time_budget_seconds=args.time_budget).to_json()
    if args.json:
        _emit_json(out, summary)
    else:
        out.write(
            "Metering: {hours_listed} hour shards listed, {hours_settled} settled; {buckets_sent} buckets sent in {calls} calls: "
            "{accepted} accepted, {flagged} flagged, {carried_forward} carried forward, {retry} to retry; late usage {late_carried} carried, "
            "{late_unbillable} unbillable; {near_expiry} near expiry; {pending_hours} hour shards pending, {flagged_total} flagged in all\n".format(
                **summary
            )
        )
    return EXIT_OK


COMMANDS: dict[str, Callable[..., int]] = {
    "list": cmd_list,
    "show": cmd_show,
    "reconcile": cmd_reconcile,
    "activate": cmd_activate,
    "replay": cmd_replay,
    "plans": cmd_plans,
    "change-plan": cmd_change_plan,
    "change-quantity": cmd_change_quantity,
    "cancel": cmd_cancel,
    "operation": cmd_operation,
    "usage": cmd_usage,
    "meter-now": cmd_meter_now,
}


# ---------------------------------------------------------------------------------------------
# parsing and main


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    # SUPPRESS: `--json` before or after the command both work.
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress to stderr")

    parser = _Parser(
        prog="python -m shared.cli",
        description="Operate the marketplace SaaS integration with the app's own settings (environment variables).",
        parents=[common],
        epilog="Exit codes: 0 success, 1 operation failed, 2 usage or configuration error.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser("list", parents=[common], help="list recorded subscriptions")
    p.add_argument("--status", help="local status, e.g. Subscribed, Suspended, PendingActivation")
    p.add_argument("--offer", help="offer id")
    p.add_argument("--plan", help="plan id")

    p = commands.add_parser("show", parents=[common], help="one subscription with its full history")
    p.add_argument("subscription_id", metavar="SUBSCRIPTION_ID", type=_subscription_id)

    p = commands.add_parser("reconcile", parents=[common], help="compare with Microsoft and repair the differences")
    p.add_argument("--dry-run", action="store_true", help="only print the differences; change nothing")
    p.add_argument(
        "--time-budget",
        type=_positive_seconds,
        metavar="SECONDS",
        help="stop (and checkpoint) after this long; default RECONCILE_TIME_BUDGET_SECONDS",
    )

    p = commands.add_parser("activate", parents=[common], help="activate a subscription (ACTIVATION_MODE=manual)")
    p.add_argument("subscription_id", metavar="SUBSCRIPTION_ID", type=_subscription_id)

    p = commands.add_parser("replay", parents=[common], help="finish webhook operations recorded but never applied")
    p.add_argument("--dry-run", action="store_true", help="only list them")
    p.add_argument("--time-budget", type=_positive_seconds, metavar="SECONDS", help=argparse.SUPPRESS)

    p = commands.add_parser("plans", parents=[common], help="the plans a subscription can change to (List available plans)")
    p.add_argument("subscription_id", metavar="SUBSCRIPTION_ID", type=_subscription_id)

    change = _Parser(add_help=False)
    change.add_argument("--wait", action="store_true", help="follow Microsoft's operation until it ends")
    change.add_argument("--timeout", type=_positive_seconds, default=300.0, metavar="SECONDS", help="how long --wait waits")
    change.add_argument("--idempotency-key", metavar="KEY", help="repeat with the same key: sent once")

    p = commands.add_parser("change-plan", parents=[common, change], help="ask Microsoft to change the plan")
    p.add_argument("subscription_id", metavar="SUBSCRIPTION_ID", type=_subscription_id)
    p.add_argument("plan_id", metavar="PLAN_ID")

    p = commands.add_parser("change-quantity", parents=[common, change], help="ask Microsoft to change the seats")
    p.add_argument("subscription_id", metavar="SUBSCRIPTION_ID", type=_subscription_id)
    p.add_argument("quantity", metavar="QUANTITY", type=_positive_int)

    p = commands.add_parser("cancel", parents=[common, change], help="ask Microsoft to cancel the subscription")
    p.add_argument("subscription_id", metavar="SUBSCRIPTION_ID", type=_subscription_id)

    p = commands.add_parser("operation", parents=[common], help="one publisher operation")
    p.add_argument("operation_id", metavar="OPERATION_ID", type=_operation_id)

    p = commands.add_parser(
        "usage",
        parents=[common],
        help="metered usage of a subscription by hour, --flagged, a decision on flagged usage, or `usage reconcile`",
    )
    p.add_argument(
        "subscription_id",
        metavar="SUBSCRIPTION_ID|reconcile",
        type=_usage_target,
        nargs="?",
        help="a subscription, or `reconcile`: compare Microsoft's daily usage aggregates with ours now",
    )
    p.add_argument("--from", dest="from_", metavar="TIME", help="first hour (ISO 8601 UTC); default 24 hours ago")
    p.add_argument("--to", metavar="TIME", help="last hour (ISO 8601 UTC); default now")
    p.add_argument("--flagged", action="store_true", help="every hour of usage that needs a person")
    p.add_argument("--days", type=int, default=None, metavar="N", help="reconcile: closed days to compare (USAGE_RECONCILE_DAYS)")
    p.add_argument("--hour", metavar="TIME", help="the flagged hour to decide on (ISO 8601 UTC)")
    p.add_argument("--dimension", metavar="DIMENSION", help="the flagged dimension to decide on")
    p.add_argument("--requeue", action="store_true", help="flagged usage: send it again as it is")
    p.add_argument("--move", action="store_true", help="flagged usage: carry it into the current hour")
    p.add_argument("--unbillable", action="store_true", help="flagged usage: write it off (recorded, never billed)")

    p = commands.add_parser("meter-now", parents=[common], help="send every closed hour of usage not yet accepted")
    p.add_argument(
        "--time-budget",
        type=_positive_seconds,
        metavar="SECONDS",
        help="stop after this long; default METERING_TIME_BUDGET_SECONDS",
    )
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("azure", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None, *, services=None, out: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout
    if out is sys.stdout and isinstance(out, io.TextIOWrapper):
        out.reconfigure(errors="backslashreplace")  # whatever a record holds, printing it never fails
    parser = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except _UsageError as error:
        if "--json" in arguments:
            _emit_json(out, {"error": "usage", "message": str(error)})
        parser.print_usage(sys.stderr)
        _stderr(f"{parser.prog}: error: {error}")
        return EXIT_USAGE
    args.json = getattr(args, "json", False)
    args.verbose = getattr(args, "verbose", False)
    args.time_budget = getattr(args, "time_budget", None)
    args.wait = getattr(args, "wait", False)
    args.idempotency_key = getattr(args, "idempotency_key", None)

    from shared.errors import AppError, ConfigurationError

    owned = services is None
    try:
        if owned:
            _configure_logging(args.verbose)
            from shared.services import build_services
            from shared.settings import Settings, local_settings_environment

            services = build_services(Settings.from_env(local_settings_environment(), require=()))
            services.repository.ensure_tables()
        return COMMANDS[args.command](services, args, out)
    except ConfigurationError as error:
        if args.json:
            _emit_json(out, {"error": error.code, "problems": error.problems})
        _stderr("configuration error:\n" + "\n".join(f"  - {problem}" for problem in error.problems))
        return EXIT_USAGE
    except _UsageError as error:
        if args.json:
            _emit_json(out, {"error": "usage", "message": str(error)})
        _stderr(f"{parser.prog}: error: {error}")
        return EXIT_USAGE
    except AppError as error:
        if args.json:
            _emit_json(out, {"error": error.code, "message": str(error)})
        _stderr(f"{args.command} failed: {error}")
        return EXIT_FAILED
    finally:
        if owned and services is not None:
            services.close()


if __name__ == "__main__":  # pragma: no cover - exercised through subprocess tests
    sys.exit(main())
