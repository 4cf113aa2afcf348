"""Azure Functions entry point (Python v2 programming model): creates the app, registers the blueprints."""

import azure.functions as func

from console import bp as console_bp
from event_delivery import bp as event_delivery_bp
from landing_page import bp as landing_page_bp
from metering_timer import bp as metering_timer_bp
from openapi_document import bp as openapi_document_bp
from operation_followup import bp as operation_followup_bp
from publisher_api import bp as publisher_api_bp
from reconcile_timer import bp as reconcile_timer_bp
from usage_reconcile_timer import bp as usage_reconcile_timer_bp
from webhook import bp as webhook_bp

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
app.register_functions(landing_page_bp)
app.register_functions(webhook_bp)
app.register_functions(reconcile_timer_bp)
app.register_functions(publisher_api_bp)
app.register_functions(metering_timer_bp)
app.register_functions(console_bp)
app.register_functions(usage_reconcile_timer_bp)
app.register_functions(openapi_document_bp)
app.register_functions(event_delivery_bp)
app.register_functions(operation_followup_bp)
