"""The publisher's policy for changes Microsoft asks us to accept (ChangePlan, ChangeQuantity, Reinstate).

A policy is one function ``(PolicyRequest) -> PolicyDecision``, named by the ``PUBLISHER_POLICY``
setting as ``module:function``. It must answer fast: Microsoft auto-accepts after 10 seconds.
Example (refuse a seat reduction below the seats in use)::

    # my_policies.py
    from shared.policy import PolicyDecision, PolicyRequest

    def seats_in_use_guard(request: PolicyRequest) -> PolicyDecision:
        if request.action == "ChangeQuantity" and request.quantity is not None:
            in_use = my_saas_app.seats_in_use(request.subscription_id)
            if request.quantity < in_use:
                return PolicyDecision.refuse(f"{in_use} seats are in use")
        return PolicyDecision.accept()
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from shared.errors import ConfigurationError
from shared.state_machine import SubscriptionRecord


@dataclass(frozen=True)
class PolicyRequest:
    action: str  # "ChangePlan" | "ChangeQuantity" | "Reinstate"
    subscription_id: str
    record: SubscriptionRecord | None  # our current record
    plan_id: str = ""  # the plan Microsoft wants to move to
    quantity: int | None = None  # the quantity Microsoft wants to set
    operation_id: str = ""


@dataclass(frozen=True)
class PolicyDecision:
    accepted: bool
    reason: str = ""

    @classmethod
    def accept(cls, reason: str = "") -> PolicyDecision:
        return cls(True, reason)

    @classmethod
    def refuse(cls, reason: str) -> PolicyDecision:
        return cls(False, reason)


Policy = Callable[[PolicyRequest], PolicyDecision]


def accept_everything(request: PolicyRequest) -> PolicyDecision:
    return PolicyDecision.accept()


def load_policy(spec: str) -> Policy:
    if not spec:
        return accept_everything
    module_name, _, function_name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name or "policy")
    except (ImportError, AttributeError) as error:
        raise ConfigurationError([f"PUBLISHER_POLICY {spec!r} cannot be loaded: {error}"]) from error
    if not callable(function):
        raise ConfigurationError([f"PUBLISHER_POLICY {spec!r} is not callable"])
    return function
