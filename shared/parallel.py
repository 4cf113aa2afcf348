"""Concurrent work inside one invocation, joined before it returns.

Azure Functions does not track threads left running after a function answers, so no pool outlives
the call that needs it: each ``run_parallel`` starts its own workers and waits for all of them.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

THREAD_PREFIX = "app-parallel"


def run_parallel(calls: Iterable[Callable[[], Any]], *, workers: int) -> list[Any]:
    """The calls' results in order, run on up to ``workers`` threads, each in a copy of the caller's
    context (its deadline, its correlation id); the first failure is raised after all have ended."""
    pending = list(calls)
    if len(pending) <= 1 or workers <= 1:
        return [call() for call in pending]
    with ThreadPoolExecutor(min(workers, len(pending)), thread_name_prefix=THREAD_PREFIX) as pool:
        futures = [pool.submit(contextvars.copy_context().run, call) for call in pending]
        return [future.result() for future in futures]
