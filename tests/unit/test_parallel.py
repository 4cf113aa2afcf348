"""Work in parallel inside one invocation is joined before the call returns (shared/parallel.py)."""

from __future__ import annotations

import contextvars
import re
import threading
import time
from pathlib import Path

import pytest

from shared.parallel import THREAD_PREFIX, run_parallel

ROOT = Path(__file__).resolve().parents[2]
FUNCTION_CODE = [
    "shared",
    *(p.parent.name for p in ROOT.glob("*/__init__.py") if (p.parent / "__init__.py").read_text().count("func.Blueprint")),
]

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def app_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def test_results_keep_the_call_order_and_no_thread_is_left_alive():
    def slow(value: int, pause: float):
        time.sleep(pause)  # the later call ends first: the order must still be the callers'
        return value, threading.current_thread().name

    results = run_parallel([lambda: slow(1, 0.05), lambda: slow(2, 0.0), lambda: slow(3, 0.01)], workers=3)
    assert [value for value, _ in results] == [1, 2, 3]
    assert all(name.startswith(THREAD_PREFIX) for _, name in results)
    assert app_threads() == []


def test_each_call_sees_the_callers_context():
    request_id.set("corr-42")
    assert run_parallel([request_id.get, request_id.get], workers=2) == ["corr-42", "corr-42"]


def test_a_failure_is_raised_after_every_call_has_ended():
    finished = []

    def fails():
        raise ValueError("storage said no")

    def slow():
        time.sleep(0.05)
        finished.append(True)

    with pytest.raises(ValueError, match="storage said no"):
        run_parallel([fails, slow], workers=2)
    assert finished == [True]  # joined: the slow call was not abandoned still running
    assert app_threads() == []


def test_one_call_runs_in_the_callers_thread():
    assert run_parallel([lambda: threading.current_thread().name], workers=8) == [threading.current_thread().name]


def test_no_function_code_starts_threads_pools_or_timers_but_through_run_parallel():
    """Functions does not track threads left running after the answer (issue 24): the only place
    allowed to start one is shared/parallel.py, which joins them."""
    starts = re.compile(r"\b(threading\.Thread|Thread|ThreadPoolExecutor|ProcessPoolExecutor|threading\.Timer|Timer)\(")
    found = []
    for folder in FUNCTION_CODE:
        for path in (ROOT / folder).rglob("*.py"):
            if path.relative_to(ROOT).as_posix() == "shared/parallel.py":
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if starts.search(line) and not line.lstrip().startswith("#"):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert "shared" in FUNCTION_CODE and "webhook" in FUNCTION_CODE
    assert found == []
