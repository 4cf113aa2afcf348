"""Rendering of landing pages: Jinja2 with autoescape, and the security headers every page carries."""

from __future__ import annotations

import secrets
from functools import lru_cache
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "templates"


@lru_cache(maxsize=1)
def _environment():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    from shared.domain import describe_term

    environment = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=select_autoescape(enabled_extensions=("html",), default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["term_words"] = describe_term
    return environment


def security_headers(nonce: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": (
            f"default-src 'none'; style-src 'nonce-{nonce}'; img-src 'self' https: data:; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
        ),
        "Referrer-Policy": "no-referrer",  # the purchase token is in the URL
        "Cache-Control": "no-store",
        "Pragma": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
    }


def render_page(template: str, context: dict) -> tuple[str, dict[str, str]]:
    """Render a template; returns the HTML and the headers (with a fresh CSP nonce)."""
    nonce = secrets.token_urlsafe(16)
    html = _environment().get_template(template).render(**context, csp_nonce=nonce)
    return html, security_headers(nonce)
