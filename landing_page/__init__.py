"""Landing page (GET/POST /api/landing) and health (GET /api/health) functions."""

import logging

import azure.functions as func

from shared.errors import ConfigurationError
from shared.observability import correlation

bp = func.Blueprint()
log = logging.getLogger(__name__)


def _html(page) -> func.HttpResponse:
    from shared.web import render_page

    html, headers = render_page(page.template, page.context)
    return func.HttpResponse(html, status_code=page.status, mimetype="text/html", headers=headers)


def _config_error_page(cid: str) -> func.HttpResponse:
    from shared.landing import Page

    log.error("landing page unavailable: configuration is incomplete")
    return _html(
        Page(
            503,
            "unavailable.html",
            {
                "brand_name": "",
                "brand_logo_url": "",
                "support_email": "",
                "saas_app_url": "",
                "user": None,
                "correlation_id": cid,
            },
        )
    )


@bp.function_name("landing_page")
@bp.route(route="landing", methods=["GET", "POST"], auth_level=func.AuthLevel.ANONYMOUS)
def landing_page(req: func.HttpRequest) -> func.HttpResponse:
    from shared import landing
    from shared.principal import signed_in_user
    from shared.services import get_services
    from shared.settings import LANDING_PAGE

    with correlation() as cid:
        try:
            services = get_services()
            services.settings.require(LANDING_PAGE)
        except ConfigurationError:
            return _config_error_page(cid)
        user = signed_in_user(req.headers)
        if req.method == "POST":
            form = req.form
            page = landing.confirm_activation(services, form.get("subscription_id", ""), form.get("form_token", ""), user)
        else:
            page = landing.view_purchase(services, req.params.get("token"), user)
        log.info("landing %s answered %s (%s)", req.method, page.status, page.template)
        return _html(page)


@bp.function_name("health")
@bp.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def health(req: func.HttpRequest) -> func.HttpResponse:
    from shared.health import check_health
    from shared.http import json_response
    from shared.services import get_services

    status, body = check_health(get_services)
    return json_response(status, body)
