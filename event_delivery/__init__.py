"""Event delivery (queue trigger on EVENTS_WORK_QUEUE): "deliver subscription X" jobs.

The connection is AzureWebJobsStorage, identity-based in Azure (AzureWebJobsStorage__queueServiceUri
and the managed identity), the Azurite connection string locally. A job that must wait is put back
on the queue with a visibility delay by the use case; an exception lets the host retry the message
up to host.json's maxDequeueCount, then move it to ``<queue>-poison``.
"""

import logging

import azure.functions as func

from shared.observability import correlation

bp = func.Blueprint()
log = logging.getLogger(__name__)


@bp.function_name("event_delivery")
@bp.queue_trigger(arg_name="msg", queue_name="%EVENTS_WORK_QUEUE%", connection="AzureWebJobsStorage")
def event_delivery(msg: func.QueueMessage) -> None:
    from shared.services import get_services

    with correlation():
        try:
            body = msg.get_body().decode("utf-8")
            result = get_services().events.run_job(body)
        except ValueError as error:
            log.error("event_delivery dropped a message that is not a job: %s", error)
            return  # retrying would not help; nothing is lost (the outbox is the truth)
        log.info(
            "event_delivery %s: delivered=%s failed=%s retry_in=%s poisoned=%s",
            result.job.subscription_id,
            result.stats.delivered,
            result.stats.failed,
            result.retry_in_seconds,
            result.poisoned,
        )
