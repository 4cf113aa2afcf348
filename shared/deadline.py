"""Request deadlines: a unit of work (one webhook, one landing page request) gets a time budget, and
every outbound call inside it is bounded by what is left.

The deadline travels in a context variable, like the correlation id, so the Marketplace client,
the signing-key cache and storage calls read it without threading a parameter through every layer.
Outside a ``deadline_scope`` nothing is bounded beyond each call's own timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from shared.errors import DeadlineExceededError


@dataclass(frozen=True)
class Deadline:
    """An absolute point on a monotonic clock (injectable, so tests move time without sleeping)."""

    expires_at: float
    clock: Callable[[], float] = time.monotonic

    @classmethod
    def after(cls, seconds: float, clock: Callable[[], float] = time.monotonic) -> Deadline:
        return cls(clock() + seconds, clock)

    def remaining(self) -> float:
        return self.expires_at - self.clock()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def timeout(self, cap: float, *, what: str = "call") -> float:
        """The timeout for one outbound call: ``cap`` or what is left, whichever is smaller.

        Raises DeadlineExceededError when nothing is left, so no call starts that cannot finish.
        """
        left = self.remaining()
        if left <= 0:
            raise DeadlineExceededError(f"no time left for {what}")
        return min(cap, left)


_current: ContextVar[Deadline | None] = ContextVar("deadline", default=None)


def current_deadline() -> Deadline | None:
    return _current.get()


@contextmanager
def deadline_scope(seconds: float, clock: Callable[[], float] = time.monotonic) -> Iterator[Deadline]:
    """Run the block under a deadline ``seconds`` from now (an enclosing, earlier deadline wins)."""
    deadline = Deadline.after(seconds, clock)
    outer = _current.get()
    if outer is not None and outer.expires_at <= deadline.expires_at and outer.clock is clock:
        deadline = outer
    token = _current.set(deadline)
    try:
        yield deadline
    finally:
        _current.reset(token)


def bounded_timeout(cap: float, *, what: str = "call") -> float:
    """``cap`` outside a deadline scope; inside one, what is left (DeadlineExceededError when nothing)."""
    deadline = _current.get()
    return cap if deadline is None else deadline.timeout(cap, what=what)
