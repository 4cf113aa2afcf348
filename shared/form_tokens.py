"""CSRF tokens for forms: bound to what the form acts on, the signed-in user and an expiry.

The landing page's confirmation (subject: the subscription) and the operator console's actions
(subject: ``<action>:<target>``, their own audience, so one form's token never works for the other).
Signed with LANDING_FORM_SECRET (HS256 via PyJWT). The purchase token is never part of the form.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import jwt

from shared.errors import ForbiddenError

FORM_TOKEN_TTL = timedelta(minutes=30)
_AUDIENCE = "landing-form"
CONSOLE_AUDIENCE = "console-form"


def issue_form_token(secret: str, subscription_id: str, user_id: str, now: datetime, *, audience: str = _AUDIENCE) -> str:
    claims = {"sid": subscription_id, "uid": user_id, "aud": audience, "iat": now, "exp": now + FORM_TOKEN_TTL}
    return jwt.encode(claims, secret, algorithm="HS256")


def verify_form_token(
    secret: str, token: str, subscription_id: str, user_id: str, now: datetime, *, audience: str = _AUDIENCE
) -> None:
    """Raise ForbiddenError unless the token is ours, unexpired and bound to this subscription and user."""
    try:
        # Expiry is checked below against the caller's clock, the same one that issued the token.
        claims = jwt.decode(
            token or "",
            secret,
            algorithms=["HS256"],
            audience=audience,
            options={"require": ["exp", "sid", "uid"], "verify_exp": False},
        )
    except jwt.PyJWTError as error:
        raise ForbiddenError("the form token is not valid") from error
    if not isinstance(claims["exp"], (int, float)) or claims["exp"] < now.timestamp():
        raise ForbiddenError("the form has expired; reload the page")
    if claims["sid"] != subscription_id:
        raise ForbiddenError("the form token belongs to another subscription")
    if claims["uid"] != user_id:
        raise ForbiddenError("the form token belongs to another user")
