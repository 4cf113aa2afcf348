"""Reconciliation timer (schedule: the RECONCILE_SCHEDULE setting, 6-field NCRONTAB, UTC)."""

import logging

import azure.functions as func

from shared.observability import correlation

bp = func.Blueprint()
log = logging.getLogger(__name__)


@bp.function_name("reconcile_timer")
@bp.timer_trigger(arg_name="timer", schedule="%RECONCILE_SCHEDULE%", run_on_startup=False, use_monitor=True)
def reconcile_timer(timer: func.TimerRequest) -> None:
    from shared.reconcile import run_reconciliation
    from shared.services import get_services

    with correlation():
        if timer.past_due:
            log.warning("reconciliation is running late (past due)")
        run_reconciliation(get_services())
