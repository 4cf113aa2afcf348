"""Webhook function (POST /api/webhook): Microsoft's notifications of subscription changes.

Anonymous at the Functions level (no key in the URL, which certification forbids); the use case
validates Microsoft's Entra bearer token itself.
"""

import logging

import azure.functions as func

from shared.errors import AppError
from shared.observability import correlation

bp = func.Blueprint()
log = logging.getLogger(__name__)


@bp.function_name("webhook")
@bp.route(route="webhook", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def webhook(req: func.HttpRequest) -> func.HttpResponse:
    from shared.http import error_response, json_response
    from shared.services import get_services
    from shared.settings import WEBHOOK
    from shared.webhook import handle_webhook

    with correlation() as cid:
        try:
            services = get_services()
            services.settings.require(WEBHOOK)
            result = handle_webhook(services, req.headers.get("Authorization"), req.get_body())
        except AppError as error:
            level = logging.WARNING if error.http_status < 500 else logging.ERROR
            log.log(level, "webhook answered %s: %s", error.http_status, error.message)
            return error_response(error, cid)
        except Exception as error:  # noqa: BLE001 - always 5xx so Microsoft retries
            return error_response(error, cid)
        return json_response(result.status, {**result.body(), "correlationId": cid})
