"""Publisher API: the publisher's SaaS application reads subscriptions and changes plan, seats or cancels.

    GET    /api/subscriptions/{subscriptionId}         our record and any pending publisher operation
    GET    /api/subscriptions/{subscriptionId}/plans   List available plans (cached briefly)
    PATCH  /api/subscriptions/{subscriptionId}         {"planId": "..."} or {"quantity": n}: 202 + Location
    DELETE /api/subscriptions/{subscriptionId}         cancel: 202 + Location
    GET    /api/operations/{operationId}               InProgress | Succeeded | Failed | Conflict
    POST   /api/usage                                  metered usage: {"events": [...]}, per-event results (202)

Anonymous at the Functions level (no key in the URL); the use cases validate the caller's Entra bearer
token and app role themselves (shared/api_auth.py).
"""

import logging

import azure.functions as func

from shared.errors import AppError
from shared.observability import correlation

bp = func.Blueprint()
log = logging.getLogger(__name__)


def _answer(call) -> func.HttpResponse:
    """Run one use case inside a correlation scope and turn its result or error into the response."""
    from shared.http import error_response, json_response
    from shared.services import get_services
    from shared.settings import PUBLISHER_API

    with correlation() as cid:
        try:
            services = get_services()
            services.settings.require(PUBLISHER_API)
            result = call(services)
        except AppError as error:
            level = logging.WARNING if error.http_status < 500 else logging.ERROR
            log.log(level, "publisher API answered %s: %s", error.http_status, error.code)
            return error_response(error, cid)
        except Exception as error:  # noqa: BLE001 - a 500 with the correlation id, never a stack trace
            return error_response(error, cid)
        return json_response(result.status, {**result.body, "correlationId": cid}, dict(result.headers))


@bp.function_name("publisher_subscription")
@bp.route(route="subscriptions/{subscriptionId}", methods=["GET", "PATCH", "DELETE"], auth_level=func.AuthLevel.ANONYMOUS)
def publisher_subscription(req: func.HttpRequest) -> func.HttpResponse:
    from shared import publisher

    subscription_id = req.route_params.get("subscriptionId", "")
    authorization = req.headers.get("Authorization")
    key = req.headers.get("Idempotency-Key")
    if req.method == "PATCH":
        return _answer(lambda services: publisher.api_change(services, authorization, subscription_id, req.get_body(), key))
    if req.method == "DELETE":
        return _answer(lambda services: publisher.api_cancel(services, authorization, subscription_id, key))
    return _answer(lambda services: publisher.api_get_subscription(services, authorization, subscription_id))


@bp.function_name("publisher_plans")
@bp.route(route="subscriptions/{subscriptionId}/plans", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def publisher_plans(req: func.HttpRequest) -> func.HttpResponse:
    from shared import publisher

    subscription_id = req.route_params.get("subscriptionId", "")
    authorization = req.headers.get("Authorization")
    return _answer(lambda services: publisher.api_list_plans(services, authorization, subscription_id))


@bp.function_name("publisher_operation")
@bp.route(route="operations/{operationId}", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def publisher_operation(req: func.HttpRequest) -> func.HttpResponse:
    from shared import publisher

    operation_id = req.route_params.get("operationId", "")
    authorization = req.headers.get("Authorization")
    return _answer(lambda services: publisher.api_get_operation(services, authorization, operation_id))


@bp.function_name("publisher_usage")
@bp.route(route="usage", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def publisher_usage(req: func.HttpRequest) -> func.HttpResponse:
    from shared import metering

    authorization = req.headers.get("Authorization")
    return _answer(lambda services: metering.api_report_usage(services, authorization, req.get_body()))
