"""The OpenAPI document (shared/openapi.json) as a test oracle.

``validate_exchange`` checks one real HTTP exchange (a ``requests`` response and its request)
against the document: status code documented for the operation, headers, and the body's schema.
The ``http`` fixture (tests/conftest.py) runs it on every response to a documented route, so no
integration test can see an answer the document does not describe.
"""

from __future__ import annotations

import functools
from urllib.parse import urlsplit

import requests


@functools.cache
def _openapi():
    from openapi_core import Config, OpenAPI

    from shared.openapi import document

    return OpenAPI.from_dict(document(), config=Config())


def documented(url: str) -> bool:
    """True for a path the document describes (only those are validated)."""
    from shared.openapi import document

    path = urlsplit(url).path
    for template in document()["paths"]:
        parts, given = template.strip("/").split("/"), path.strip("/").split("/")
        if len(parts) == len(given) and all(p.startswith("{") or p == g for p, g in zip(parts, given, strict=True)):
            return True
    return False


class ContractViolation(AssertionError):
    pass


#: exchanges validated in this process (a test proves the hook runs)
validated = 0


def validate_exchange(response: requests.Response) -> None:
    """Raise ContractViolation when ``response`` is not what the document says its operation answers."""
    from openapi_core.contrib.requests import RequestsOpenAPIRequest, RequestsOpenAPIResponse

    request = response.request
    if request is None or request.url is None or not documented(request.url):
        return
    from openapi_core.templating.paths.exceptions import OperationNotFound

    try:
        _openapi().validate_response(RequestsOpenAPIRequest(request), RequestsOpenAPIResponse(response))
    except OperationNotFound as error:
        # A method the document does not list on a documented path: the host refuses it (405).
        if response.status_code != 405:
            raise ContractViolation(
                f"{request.method} {urlsplit(request.url).path} is not documented but answered {response.status_code}"
            ) from error
    except Exception as error:
        raise ContractViolation(
            f"{request.method} {urlsplit(request.url).path} answered {response.status_code}, "
            f"which the OpenAPI document does not describe: {error!r}\nbody: {response.text[:2000]}"
        ) from error
    global validated
    validated += 1


def contract_hook(response: requests.Response, *args, **kwargs) -> requests.Response:
    validate_exchange(response)
    return response
