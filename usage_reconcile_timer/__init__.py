"""Usage read-back timer (schedule: the USAGE_RECONCILE_SCHEDULE setting, 6-field NCRONTAB, UTC).

Once a day: reads Microsoft's daily usage aggregates of the last closed days and compares them with
what was recorded accepted (shared/usage_readback.py).
"""

import logging

import azure.functions as func

from shared.observability import correlation

bp = func.Blueprint()
log = logging.getLogger(__name__)


@bp.function_name("usage_reconcile_timer")
@bp.timer_trigger(arg_name="timer", schedule="%USAGE_RECONCILE_SCHEDULE%", run_on_startup=False, use_monitor=True)
def usage_reconcile_timer(timer: func.TimerRequest) -> None:
    from shared.services import get_services
    from shared.usage_readback import run_usage_readback

    with correlation():
        if timer.past_due:
            log.warning("the usage read-back is running late (past due)")
        run_usage_readback(get_services())
