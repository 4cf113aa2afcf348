"""Publisher operation follow-up (queue trigger on OPERATIONS_WORK_QUEUE): "poll operation Y" jobs.

Each job polls Get Operation once; the use case puts it back with a longer visibility delay until
the operation settles or its budget ends (the reconciler finishes the rest). Connection:
AzureWebJobsStorage (identity-based in Azure, Azurite locally).
"""

import logging

import azure.functions as func

from shared.observability import correlation

bp = func.Blueprint()
log = logging.getLogger(__name__)


@bp.function_name("operation_followup")
@bp.queue_trigger(arg_name="msg", queue_name="%OPERATIONS_WORK_QUEUE%", connection="AzureWebJobsStorage")
def operation_followup(msg: func.QueueMessage) -> None:
    from shared.services import get_services

    with correlation():
        try:
            finished = get_services().follower.run_job(msg.get_body().decode("utf-8"))
        except ValueError as error:
            log.error("operation_followup dropped a message that is not a poll job: %s", error)
            return  # the publisher operation row is the truth; the reconciler follows it
        log.info("operation_followup: %s", "finished" if finished else "polls again later")
