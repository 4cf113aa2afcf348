"""GET /api/openapi.json: the publisher API's OpenAPI 3.1 document (shared/openapi.json).

Public (anonymous), like the health endpoint: it describes the routes and their contract, names no
subscription, setting or secret, and a SaaS application's build must be able to fetch it to
generate its client. Every route it describes still requires its Entra ID bearer token.
"""

import azure.functions as func

bp = func.Blueprint()


@bp.function_name("openapi_document")
@bp.route(route="openapi.json", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def openapi_document(req: func.HttpRequest) -> func.HttpResponse:
    from shared.openapi import document_bytes

    return func.HttpResponse(
        document_bytes(),
        status_code=200,
        mimetype="application/json",
        headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"},
    )
