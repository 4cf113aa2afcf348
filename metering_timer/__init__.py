"""Metering timer (schedule: the METERING_SCHEDULE setting, 6-field NCRONTAB, UTC).

Sends every closed hour of reported usage that Microsoft has not accepted yet (shared/metering.py).
"""

import logging

import azure.functions as func

from shared.observability import correlation

bp = func.Blueprint()
log = logging.getLogger(__name__)


@bp.function_name("metering_timer")
@bp.timer_trigger(arg_name="timer", schedule="%METERING_SCHEDULE%", run_on_startup=False, use_monitor=True)
def metering_timer(timer: func.TimerRequest) -> None:
    from shared.metering import run_metering
    from shared.services import get_services

    with correlation():
        if timer.past_due:
            log.warning("metering is running late (past due); missed hours are caught up oldest first")
        run_metering(get_services())
