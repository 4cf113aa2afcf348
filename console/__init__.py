"""Operator console (server-rendered pages behind App Service Authentication; shared/console.py).

    GET /api/console                                  the subscriptions (filters, server-side paging)
    GET /api/console/subscriptions/{subscriptionId}   one subscription: ours vs Microsoft's, history, operations, usage
    GET /api/console/attention                        everything flagged for a person, with what to do
    POST /api/console/subscriptions/{subscriptionId}/activate   activate (manual mode; operator, CSRF, confirmed)
    POST /api/console/subscriptions/{subscriptionId}/redeliver  deliver waiting lifecycle events now (operator, CSRF)
    POST /api/console/subscriptions/{subscriptionId}/replay     apply a recorded-but-unapplied webhook operation now
    POST /api/console/subscriptions/{subscriptionId}/change     publisher change plan / seats / cancel (operator, CSRF)
    POST /api/console/subscriptions/{subscriptionId}/acknowledge    clear a flag once its cause is handled (operator, CSRF)
    GET/POST /api/console/reconcile                   recent runs; preview (dry run) or run now (operator, CSRF)
    GET /api/console/billing                          usage read-back: ours beside Microsoft's, per day and dimension
    POST /api/console/usage/resolve                   requeue / move / write off a flagged hour of usage (operator, CSRF)

Never in Easy Auth's excludedPaths: the platform signs the user in; the use case checks the app role.
"""

import logging

import azure.functions as func

from shared.observability import correlation

bp = func.Blueprint()
log = logging.getLogger(__name__)


def _page(call) -> func.HttpResponse:
    """Run one console use case and render its page; errors become a small page with the right status."""
    from shared.errors import AppError, http_status_for
    from shared.principal import signed_in_user
    from shared.services import get_services
    from shared.web import render_page

    with correlation() as cid:
        try:
            services = get_services()
            page = call(services, signed_in_user)
            html, headers = render_page(page.template, page.context)
            return func.HttpResponse(html, status_code=page.status, mimetype="text/html", headers=headers)
        except Exception as error:
            status = http_status_for(error)
            if not isinstance(error, AppError):
                log.exception("console page failed")
            message = error.message if isinstance(error, AppError) and status < 500 else "Something went wrong."
            html, headers = render_page("console_error.html", {"status": status, "message": message, "correlation_id": cid})
            return func.HttpResponse(html, status_code=status, mimetype="text/html", headers=headers)


@bp.function_name("console_list")
@bp.route(route="console", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def console_list(req: func.HttpRequest) -> func.HttpResponse:
    from shared import console

    params = {name: req.params.get(name, "") for name in ("status", "offer", "plan", "flagged", "q", "cursor")}
    return _page(lambda services, who: console.list_page(services, who(req.headers), params))


@bp.function_name("console_subscription")
@bp.route(route="console/subscriptions/{subscriptionId}", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def console_subscription(req: func.HttpRequest) -> func.HttpResponse:
    from shared import console

    subscription_id = req.route_params.get("subscriptionId", "")
    return _page(lambda services, who: console.subscription_page(services, who(req.headers), subscription_id))


def _form(req: func.HttpRequest) -> dict[str, str]:
    """The posted form's fields (urlencoded; anything else is an empty form, refused by the use case)."""
    from urllib.parse import parse_qs

    body = req.get_body()[:16_384].decode("utf-8", "replace")
    return {name: values[0] for name, values in parse_qs(body).items()}


def _subscription_action(req: func.HttpRequest, use_case) -> func.HttpResponse:
    """A POSTed action on one subscription: use_case(services, user, subscription_id, form)."""
    subscription_id = req.route_params.get("subscriptionId", "")
    form = _form(req)
    return _page(lambda services, who: use_case(services, who(req.headers), subscription_id, form))


@bp.function_name("console_activate")
@bp.route(route="console/subscriptions/{subscriptionId}/activate", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def console_activate(req: func.HttpRequest) -> func.HttpResponse:
    from shared import console

    return _subscription_action(req, console.activate_action)


@bp.function_name("console_reconcile")
@bp.route(route="console/reconcile", methods=["GET", "POST"], auth_level=func.AuthLevel.ANONYMOUS)
def console_reconcile(req: func.HttpRequest) -> func.HttpResponse:
    from shared import console

    if req.method == "POST":
        form = _form(req)
        return _page(lambda services, who: console.reconcile_action(services, who(req.headers), form))
    return _page(lambda services, who: console.runs_page(services, who(req.headers)))


@bp.function_name("console_attention")
@bp.route(route="console/attention", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def console_attention(req: func.HttpRequest) -> func.HttpResponse:
    from shared import console

    return _page(lambda services, who: console.attention_page(services, who(req.headers)))


@bp.function_name("console_redeliver")
@bp.route(route="console/subscriptions/{subscriptionId}/redeliver", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def console_redeliver(req: func.HttpRequest) -> func.HttpResponse:
    from shared import console

    return _subscription_action(req, console.redeliver_action)


@bp.function_name("console_replay")
@bp.route(route="console/subscriptions/{subscriptionId}/replay", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def console_replay(req: func.HttpRequest) -> func.HttpResponse:
    from shared import console

    return _subscription_action(req, console.replay_action)


@bp.function_name("console_change")
@bp.route(route="console/subscriptions/{subscriptionId}/change", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def console_change(req: func.HttpRequest) -> func.HttpResponse:
    from shared import console

    return _subscription_action(req, console.change_action)


@bp.function_name("console_acknowledge")
@bp.route(route="console/subscriptions/{subscriptionId}/acknowledge", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def console_acknowledge(req: func.HttpRequest) -> func.HttpResponse:
    from shared import console

    return _subscription_action(req, console.acknowledge_action)


@bp.function_name("console_billing")
@bp.route(route="console/billing", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def console_billing(req: func.HttpRequest) -> func.HttpResponse:
    from shared import console

    params = {"days": req.params.get("days", "")}
    return _page(lambda services, who: console.billing_page(services, who(req.headers), params))


@bp.function_name("console_usage_resolve")
@bp.route(route="console/usage/resolve", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def console_usage_resolve(req: func.HttpRequest) -> func.HttpResponse:
    from shared import console

    form = _form(req)
    return _page(lambda services, who: console.usage_resolve_action(services, who(req.headers), form))
