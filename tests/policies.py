"""Publisher policies used by the integration tests through ``PUBLISHER_POLICY=tests.policies:<name>``.

Each policy is a plain ``(PolicyRequest) -> PolicyDecision`` function, exactly what a publisher writes.
``seen`` lets a test check what the app asked (the app calls the policy in-process, also from the dev
host's threads, so a module-level list is shared with the test).
"""

from __future__ import annotations

import threading

from shared.policy import PolicyDecision, PolicyRequest

MIN_SEATS = 3

seen: list[PolicyRequest] = []
_seen_lock = threading.Lock()


def _note(request: PolicyRequest) -> None:
    with _seen_lock:
        seen.append(request)


def refuse_small_quantity(request: PolicyRequest) -> PolicyDecision:
    """Refuse a ChangeQuantity below MIN_SEATS seats; accept everything else."""
    _note(request)
    if request.action == "ChangeQuantity" and request.quantity is not None and request.quantity < MIN_SEATS:
        return PolicyDecision.refuse(f"at least {MIN_SEATS} seats are required, asked for {request.quantity}")
    return PolicyDecision.accept()


def refuse_reinstate(request: PolicyRequest) -> PolicyDecision:
    """Refuse every Reinstate (e.g. the customer still owes money); accept everything else."""
    _note(request)
    if request.action == "Reinstate":
        return PolicyDecision.refuse("account is on hold")
    return PolicyDecision.accept()


def broken(request: PolicyRequest) -> PolicyDecision:
    """A policy with a bug: it raises instead of deciding."""
    _note(request)
    raise RuntimeError("policy backend is down")
