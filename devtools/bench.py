"""Benchmarks: webhooks, publisher changes, metering, reconciliation, cold start, console (``make bench``).

    python -m devtools.bench                       # full run; writes docs/benchmarks.md
    python -m devtools.bench --quick               # smoke sizes; prints only (unless --output)
    python -m devtools.bench --only webhook|publisher|queues|metering|readback|reconcile|coldstart|console [--output PATH]

Everything runs on 127.0.0.1: an in-memory Azurite, the marketplace stand-in (in this process)
and the app in a *separate* process (``AppProcess``: the dev host serving the real
``function_app.app``, or a reconciliation run), so the app's figures are not mixed with the
stand-in's or the load generator's work on the same GIL. The app process counts storage round
trips twice: the repository's own ``metrics`` and every HTTP request the storage SDK sends
(``wire``), split into the request's own work (``app``) and the event delivery jobs
(``relay``). Marketplace calls are counted by the client's ``counter`` and by the stand-in.

Every phase is bounded (request timeouts, command timeouts, fixed counts) and stops by itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
RELAY_THREAD_PREFIX = "event-relay"
# Storage requests counted as the relay's: its old pool, and the dev host serving event_delivery.
RELAY_THREAD_NAMES = (RELAY_THREAD_PREFIX, "devhost-queue-event_delivery")

if TYPE_CHECKING:
    from devtools.devhost import DevHost

DEFAULT_OUTPUT = ROOT / "docs" / "benchmarks.md"

BENCH_TENANT_ID = "0be1c4a2-0000-4000-8000-00000000be01"
BENCH_CLIENT_ID = "0be1c4a2-0000-4000-8000-00000000be02"
FORM_SECRET = "bench-form-secret-0123456789abcdef"
PUBLISHER_API_AUDIENCE = "api://bench-fulfillment-api"


class Sizes(TypedDict):
    webhooks: int
    senders: int
    publisher_changes: int
    publisher_callers: int
    usage_events: int
    usage_subscriptions: int
    reconcile: tuple[int, ...]
    coldstart_runs: int
    console: int
    console_loads: int
    queue_events: int
    queue_changes: int


FULL_SIZES: Sizes = {
    "webhooks": 1000,
    "senders": 20,
    "publisher_changes": 500,
    "publisher_callers": 10,
    "usage_events": 100_000,
    "usage_subscriptions": 1000,
    "reconcile": (1000, 10000),
    "coldstart_runs": 5,
    "console": 10000,
    "console_loads": 20,
    "queue_events": 300,
    "queue_changes": 200,
}
QUICK_SIZES: Sizes = {
    "webhooks": 100,
    "senders": 20,
    "publisher_changes": 50,
    "publisher_callers": 10,
    "usage_events": 5000,
    "usage_subscriptions": 100,
    "reconcile": (500,),
    "coldstart_runs": 3,
    "console": 500,
    "console_loads": 5,
    "queue_events": 30,
    "queue_changes": 20,
}

# The reconciler leaves a record alone when it changed less than SETTLE_WINDOW (2 min) before the
# listing was fetched. The measured runs play "the setup run was a while ago" by running the
# reconciler's clock this much ahead (the records written by the setup run are then old enough).
RECONCILE_CLOCK_SKEW_SECONDS = 180

COMMAND_TIMEOUT = 1800.0  # one app-process command (the 10,000-subscription setup run is the longest)
REQUEST_TIMEOUT = 30.0

log = logging.getLogger("devtools.bench")


# =================================================================================================
# Small helpers


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def latency_summary(latencies: list[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean of durations in seconds, as milliseconds."""
    return {
        "p50": _ms(percentile(latencies, 50)),
        "p90": _ms(percentile(latencies, 90)),
        "p99": _ms(percentile(latencies, 99)),
        "max": _ms(max(latencies)),
        "mean": _ms(statistics.fmean(latencies)),
    }


def _diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    keys = set(after) | set(before)
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(keys) if after.get(k, 0) - before.get(k, 0)}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _per(total: float, count: int, digits: int = 2) -> float:
    return round(total / count, digits) if count else 0.0


# =================================================================================================
# The app process


STORAGE_READ_KINDS = ("point_read", "query_page")
STORAGE_WRITE_KINDS = ("insert", "update", "delete", "transaction")


def classify_storage_request(method: str, url: str) -> str:
    """What one storage HTTP request is, from its method and URL (Table and Queue REST APIs)."""
    path = urlsplit(url).path
    last = path.rstrip("/").rsplit("/", 1)[-1]
    if "/messages" in path:
        return {"POST": "queue_send", "GET": "queue_receive", "DELETE": "queue_delete", "PUT": "queue_update"}.get(
            method, "queue_other"
        )
    if last == "$batch":
        return "transaction"
    if last.lower().startswith("tables"):
        return "table_admin"
    if "(" in last and not last.endswith("()"):  # table(PartitionKey='..',RowKey='..')
        return {"GET": "point_read", "DELETE": "delete"}.get(method, "update")
    if method == "GET":
        return "query_page"
    if method == "POST":
        return "insert"
    if method == "PUT":
        return "queue_admin"
    return "other"


def storage_target(url: str) -> str:
    """The table (or queue) one storage HTTP request is addressed to, from its URL."""
    parts = urlsplit(url).path.rstrip("/").split("/")
    if parts[-1] == "messages" and len(parts) > 1:
        return parts[-2]
    return parts[-1].split("(", 1)[0]


class _WireCounter:
    """Storage HTTP requests by bucket (``app`` or ``relay`` thread) and kind; and by "target kind"
    (e.g. ``benchab12subscriptions query_page``) in ``by_target``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, Counter] = {"app": Counter(), "relay": Counter()}
        self.by_target: dict[str, Counter] = {"app": Counter(), "relay": Counter()}
        self.trace = bool(os.environ.get("BENCH_TRACE_STORAGE"))  # log every storage request (debugging)

    def add(self, method: str, url: str) -> None:
        bucket = "relay" if threading.current_thread().name.startswith(RELAY_THREAD_NAMES) else "app"
        kind = classify_storage_request(method, url)
        if self.trace:
            log.info("storage %s %s %s %s", bucket, kind, method, url)
        with self._lock:
            self.counts[bucket][kind] += 1
            self.by_target[bucket][f"{storage_target(url)} {kind}"] += 1

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {bucket: dict(counter) for bucket, counter in self.counts.items()}

    def snapshot_targets(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {bucket: dict(counter) for bucket, counter in self.by_target.items()}


class _Timings:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.values: dict[str, list[float]] = {}

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.values.setdefault(name, []).append(seconds)

    def snapshot(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {name: {"count": len(v), "total": sum(v)} for name, v in self.values.items()}


def _proc_status_kib(field_name: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` figure of this process from /proc (Linux), in KiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next reading is this run's peak."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class _Worker:
    """Runs inside the app process: the services bundle, the dev host and the instruments."""

    def __init__(self, env: dict[str, str], log_path: str):
        logging.basicConfig(
            level=logging.INFO, filename=log_path, format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"
        )
        from azure.core.pipeline.transport import RequestsTransport

        self.wire = _WireCounter()
        self.timings = _Timings()
        original_send = RequestsTransport.send
        wire = self.wire

        def counting_send(transport, request, **kwargs):
            wire.add(request.method, request.url)
            return original_send(transport, request, **kwargs)

        RequestsTransport.send = counting_send

        from shared.services import build_services, set_services_factory
        from shared.settings import Settings

        self.services = build_services(Settings.from_env(env))
        self.services.repository.ensure_tables()
        set_services_factory(lambda: self.services)
        self.devhost: DevHost | None = None
        self._instrumented = False

    # -- instruments ---------------------------------------------------------------------------

    def _instrument_webhook(self) -> None:
        if self._instrumented:
            return
        import shared.webhook as webhook_module

        timings = self.timings
        original_handle = webhook_module.handle_webhook

        def timed_handle(services, authorization, body):
            started, cpu_started = time.perf_counter(), time.thread_time()
            try:
                return original_handle(services, authorization, body)
            finally:
                timings.add("handle", time.perf_counter() - started)
                timings.add("handle_cpu", time.thread_time() - cpu_started)

        webhook_module.handle_webhook = timed_handle  # the function looks it up at call time
        authenticator = self.services.webhook_authenticator
        original_authenticate = authenticator.authenticate
        self._authenticate = original_authenticate

        def timed_authenticate(header):
            started = time.perf_counter()
            try:
                return original_authenticate(header)
            finally:
                timings.add("authenticate", time.perf_counter() - started)

        authenticator.authenticate = timed_authenticate
        self._instrumented = True

    # -- commands --------------------------------------------------------------------------------

    def cmd_serve(self, queues: bool = False) -> str:
        """Serve the app; ``queues``: the dev host also serves the queue triggers as the Functions
        host does (else the bench drains the delivery jobs itself, services.events.wait_idle)."""
        from devtools.devhost import DevHost
        from function_app import app

        self._instrument_webhook()
        settings = self.services.settings
        host = self.devhost = DevHost(
            app,
            host="127.0.0.1",
            port=0,
            timers=False,
            queues=queues,
            signed_in_user="",
            environ={
                "RECONCILE_SCHEDULE": "0 0 0 1 1 *",
                "METERING_SCHEDULE": "0 0 0 1 1 *",
                "USAGE_RECONCILE_SCHEDULE": "0 0 0 1 1 *",
                "EVENTS_WORK_QUEUE": settings.events_work_queue,
                "OPERATIONS_WORK_QUEUE": settings.operations_work_queue,
                "AzureWebJobsStorage": settings.tables_connection_string,
            },
            host_json=ROOT / "host.json",
        )
        host.start()
        return host.url

    def cmd_snapshot(self) -> dict[str, Any]:
        services = self.services
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "repo": services.repository.metrics.snapshot(),
            "relay_repo": services.events.repository.metrics.snapshot(),
            "wire": self.wire.snapshot(),
            "wire_targets": self.wire.snapshot_targets(),
            "marketplace": dict(services.marketplace.counter.counts),
            "timings": self.timings.snapshot(),
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
        }

    def cmd_wait_followers(self, timeout: float = 300.0) -> bool:
        """Wait until the background followers of publisher operations are done."""
        return self.services.follower.wait_idle(timeout)

    def cmd_work_queues_idle(self, timeout: float = 120.0) -> bool:
        """Wait until both work queues are empty (the dev host serving them); False on timeout."""
        ends = time.monotonic() + timeout
        queues = (self.services.events.work_queue, self.services.follower.queue)
        while any(queue is not None and queue.waiting() for queue in queues):
            if time.monotonic() > ends:
                return False
            time.sleep(0.1)
        return True

    def cmd_settle_times(self, ids: list[str]) -> dict[str, list[Any]]:
        """Publisher operations of these subscriptions: id -> [status, completed_at epoch s or None]."""
        store = self.services.publisher_store
        assert store is not None
        return {
            op.id: [op.status, op.completed_at.timestamp() if op.completed_at else None]
            for sid in ids
            for op in store.list_for(sid)
        }

    def cmd_publisher_operations(self, ids: list[str]) -> dict[str, int]:
        """How the publisher operations of these subscriptions ended (status -> count)."""
        store = self.services.publisher_store
        assert store is not None
        return dict(Counter(op.status for sid in ids for op in store.list_for(sid)))

    def cmd_sign_in(self, user: str, tenant_id: str, roles: list[str]) -> None:
        """Sign a user in at the dev host (the headers App Service Authentication would add)."""
        from devtools.devhost import SignedInUser

        assert self.devhost is not None, "serve first"
        self.devhost.signed_in_user = SignedInUser.parse(user, tenant_id, roles=tuple(roles))

    def cmd_request_activation(self, ids: list[str]) -> dict[str, int]:
        """Manual activation mode: the buyers confirmed, the purchases wait for an operator (result -> count)."""
        from shared.activation import request_operator_activation
        from shared.state_machine import Source

        return dict(
            Counter(
                request_operator_activation(
                    self.services, sid, "Bench Buyer <buyer@customer.example>", Source.LANDING_PAGE
                ).result.value
                for sid in ids
            )
        )

    def cmd_meter(self) -> dict[str, Any]:
        """One metering run (no time budget to speak of), with its Marketplace and storage counts."""
        from shared.metering import run_metering

        wire_before, calls_before = self.wire.snapshot()["app"], dict(self.services.marketplace.counter.counts)
        started = time.perf_counter()
        summary = run_metering(self.services, time_budget_seconds=3600.0)
        wall = time.perf_counter() - started
        return {
            "summary": summary.to_json(),
            "wall_seconds": round(wall, 3),
            "wire": _diff(self.wire.snapshot()["app"], wire_before),
            "marketplace": _diff(dict(self.services.marketplace.counter.counts), calls_before),
        }

    def cmd_set_clock_skew(self, seconds: float = 0.0) -> None:
        """Run the app's clock ``seconds`` ahead (negative: behind), for the read-back's closed days."""
        skew = timedelta(seconds=seconds)
        self.services.clock = lambda: datetime.now(UTC) + skew

    def cmd_meter_until_settled(self, runs: int = 6) -> dict[str, Any]:
        """Metering runs until nothing is left to retry (at most ``runs``): calls and what each run left."""
        per_run = []
        for _ in range(runs):
            result = self.cmd_meter()
            per_run.append(
                {
                    "calls": result["marketplace"].get("batch_usage_event", 0),
                    "retry": result["summary"]["retry"],
                    "item_errors": result["summary"]["item_errors"],
                    "unmatched_answers": result["summary"]["unmatched_answers"],
                    "accepted": result["summary"]["accepted"],
                    "pending_hours": result["summary"]["pending_hours"],
                    "wall_seconds": result["wall_seconds"],
                }
            )
            self.services.events.wait_idle(600.0)
            if not result["summary"]["retry"] and not result["summary"]["pending_hours"]:
                break
        return {"runs": per_run}

    def cmd_readback(self, days: int) -> dict[str, Any]:
        """One usage read-back (as its timer runs it), with its Marketplace and storage counts."""
        from shared.usage_readback import run_usage_readback

        wire_before, calls_before = self.wire.snapshot()["app"], dict(self.services.marketplace.counter.counts)
        cpu_before = time.process_time()
        started = time.perf_counter()
        summary = run_usage_readback(self.services, days=days)
        return {
            "summary": summary.to_json(),
            "wall_seconds": round(time.perf_counter() - started, 3),
            "cpu_seconds": round(time.process_time() - cpu_before, 3),
            "wire": _diff(self.wire.snapshot()["app"], wire_before),
            "marketplace": _diff(dict(self.services.marketplace.counter.counts), calls_before),
        }

    def cmd_wait_relays(self, timeout: float = 120.0) -> int:
        """Serve the waiting delivery jobs as the event_delivery trigger would, on a thread whose
        storage requests count as the relay's; returns 1 when they did not finish in ``timeout``."""
        finished: list[bool] = []
        worker = threading.Thread(
            target=lambda: finished.append(self.services.events.wait_idle(timeout)), name=RELAY_THREAD_PREFIX + "-jobs"
        )
        worker.start()
        worker.join()  # a drain is bounded (max_messages); never leave it running beside the next command
        return 0 if finished and finished[0] else 1

    def cmd_auth_loop(self, tokens: list[str]) -> list[float]:
        """Time authenticate() alone (keys cached by a first call), one token after another."""
        self._instrument_webhook()
        authenticate = self._authenticate
        authenticate("Bearer " + tokens[0])  # keys fetched and cached here, not timed
        durations = []
        for token in tokens:
            started = time.perf_counter()
            authenticate("Bearer " + token)
            durations.append(time.perf_counter() - started)
        return durations

    def cmd_reconcile(
        self,
        clock_skew_seconds: float = 0.0,
        trace_memory: bool = False,
        wait_relays: float = 600.0,
        probe_ids: list[str] | None = None,
    ) -> dict[str, Any]:
        import tracemalloc

        from shared.domain import utc_now
        from shared.reconcile import Reconciler

        skew = timedelta(seconds=clock_skew_seconds)
        self.services.clock = (lambda: utc_now() + skew) if clock_skew_seconds else utc_now
        reconciler = Reconciler(self.services)
        phases: dict[str, float] = {}
        for name in ("scan", "replay_operations", "compare_listing", "relay_events"):
            original = getattr(reconciler, name)

            def timed(*args, _original=original, _name=name, **kwargs):
                started = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    phases[_name] = phases.get(_name, 0.0) + time.perf_counter() - started

            setattr(reconciler, name, timed)
        wire_before = self.wire.snapshot()["app"]
        # Not ru_maxrss: Linux keeps it across execve, so a child starts with its parent's peak.
        peak_reset = _reset_peak_rss()
        rss_before = _proc_status_kib("VmRSS")
        cpu_before = time.process_time()
        if trace_memory:
            tracemalloc.start()
        started = time.perf_counter()
        summary = reconciler.run()
        wall = time.perf_counter() - started
        peak_heap = tracemalloc.get_traced_memory()[1] if trace_memory else None
        if trace_memory:
            tracemalloc.stop()
        cpu = time.process_time() - cpu_before
        rss_peak = _proc_status_kib("VmHWM") if peak_reset else None
        wire = _diff(self.wire.snapshot()["app"], wire_before)
        still_relaying = self.cmd_wait_relays(wait_relays)
        point_reads = self._time_point_reads(probe_ids or [])
        return {
            "summary": summary.to_json(),
            "wall_seconds": wall,
            "cpu_seconds": cpu,
            "phases": phases,
            "wire": wire,
            "peak_heap_bytes": peak_heap,
            "rss_kib_before": rss_before,
            "peak_rss_kib": rss_peak,
            "relays_still_running": still_relaying,
            "point_read_ms": point_reads,
        }

    def _time_point_reads(self, ids: list[str]) -> float | None:
        """Mean time of one state-row read, alone (how fast the storage answers at this table size)."""
        if not ids:
            return None
        durations = []
        for subscription_id in ids:
            started = time.perf_counter()
            self.services.repository.get(subscription_id)
            durations.append(time.perf_counter() - started)
        return round(statistics.fmean(durations) * 1000, 3)

    def close(self) -> None:
        if self.devhost is not None:
            self.devhost.stop()
        self.cmd_wait_relays(30.0)
        self.services.close()


def _app_worker(connection, env: dict[str, str], log_path: str) -> None:
    """Serve (command, kwargs) messages on ``connection`` until "stop"."""
    worker = None
    try:
        worker = _Worker(env, log_path)
        connection.send(("ok", os.getpid()))
        while True:
            command, kwargs = connection.recv()
            if command == "stop":
                break
            try:
                connection.send(("ok", getattr(worker, "cmd_" + command)(**kwargs)))
            except Exception:  # noqa: BLE001 - reported to the parent, which raises it
                connection.send(("error", traceback.format_exc()))
    except Exception:  # noqa: BLE001
        try:
            connection.send(("error", traceback.format_exc()))
        except OSError:
            pass
    finally:
        if worker is not None:
            worker.close()
        connection.close()


def _worker_main() -> None:
    """Entry point of the app process (``python -c "from devtools.bench import _worker_main; ..."``)."""
    from multiprocessing.connection import Client

    host, port = os.environ["BENCH_PARENT_ADDRESS"].rsplit(":", 1)
    connection = Client((host, int(port)), authkey=bytes.fromhex(os.environ["BENCH_PARENT_KEY"]))
    env, log_path = connection.recv()
    _app_worker(connection, env, log_path)


class AppProcessError(RuntimeError):
    pass


class AppProcess:
    """The app in its own interpreter; ``call`` runs one ``_Worker.cmd_*`` there and returns its value.

    A plain subprocess (not multiprocessing's spawn, which re-imports the caller's ``__main__``)
    connected back over an authenticated loopback socket.
    """

    def __init__(self, env: dict[str, str], log_path: str, start_timeout: float = 120.0):
        from multiprocessing.connection import Listener

        self.log_path = log_path
        key = os.urandom(16)
        self._connection: Any = None  # multiprocessing Connection once the child connected
        with Listener(("127.0.0.1", 0), authkey=key) as listener:
            host, port = listener.address
            child_env = {
                **os.environ,
                "BENCH_PARENT_ADDRESS": f"{host}:{port}",
                "BENCH_PARENT_KEY": key.hex(),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])),
            }
            self._stderr = open(log_path + ".stderr", "wb")  # noqa: SIM115 - closed in stop(); outlives this block
            self.process = subprocess.Popen(
                [sys.executable, "-c", "from devtools.bench import _worker_main; _worker_main()"],
                cwd=ROOT,
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=self._stderr,
                stderr=self._stderr,
            )
            accepted: list = []
            accepter = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
            accepter.start()
            accepter.join(start_timeout)
            if not accepted:
                self._kill()
                raise AppProcessError(f"the app process did not connect within {start_timeout:.0f} s")
            self._connection = accepted[0]
        self._connection.send((env, log_path))
        self.pid = self._receive(start_timeout)

    def _receive(self, timeout: float) -> Any:
        try:
            if not self._connection.poll(timeout):
                raise AppProcessError(f"the app process did not answer within {timeout:.0f} s")
            status, value = self._connection.recv()
        except (EOFError, OSError) as error:
            raise AppProcessError(f"the app process went away ({type(error).__name__}); see {self.log_path}.stderr") from error
        if status != "ok":
            raise AppProcessError(f"the app process failed:\n{value}")
        return value

    def call(self, command: str, timeout: float = COMMAND_TIMEOUT, **kwargs: Any) -> Any:
        self._connection.send((command, kwargs))
        return self._receive(timeout)

    def _kill(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def stop(self) -> None:
        if self._connection is not None:
            try:
                self._connection.send(("stop", {}))
            except OSError:
                pass
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            pass
        self._kill()
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self._stderr.close()

    def log_counts(self) -> dict[str, int]:
        """WARNING and ERROR lines the app process logged."""
        counts: Counter = Counter()
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    for level in (" WARNING ", " ERROR ", " CRITICAL "):
                        if level in line:
                            counts[level.strip()] += 1
                    if "Connection pool is full" in line:
                        counts["of which 'connection pool is full'"] += 1
        except OSError:
            pass
        return dict(counts)

    def __enter__(self) -> AppProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# =================================================================================================
# The environment


class BenchEnvironment:
    """Azurite and the marketplace stand-in (started here unless given), and app processes."""

    def __init__(self, azurite=None, standin=None, log_dir: str | None = None):
        from devtools.azurite import Azurite
        from devtools.marketplace_standin import MarketplaceStandIn

        self._started: list[Any] = []
        if azurite is None:
            azurite = Azurite(in_memory=True).start()
            self._started.append(azurite)
        if standin is None:
            standin = MarketplaceStandIn(host="127.0.0.1", port=0, tenant_id=BENCH_TENANT_ID, audience=BENCH_CLIENT_ID)
            standin.start()
            self._started.append(standin)
        self.azurite = azurite
        self.standin = standin
        self._own_log_dir = log_dir is None
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="bench-logs-")

    def app_env(self, **overrides: str) -> dict[str, str]:
        """App settings for a fresh set of tables (a new TABLES_PREFIX)."""
        env = {
            "MARKETPLACE_API_BASE_URL": self.standin.api_base_url,
            "MARKETPLACE_AUTH": "none",
            "MARKETPLACE_TENANT_ID": self.standin.tenant_id,
            "MARKETPLACE_CLIENT_ID": self.standin.audience,
            "TABLES_CONNECTION_STRING": self.azurite.connection_string,
            "TABLES_PREFIX": "bench" + uuid.uuid4().hex[:10],
            "LANDING_FORM_SECRET": FORM_SECRET,
            "WEBHOOK_AUTH": "entra",
            "WEBHOOK_OPENID_CONFIG_URL": self.standin.openid_config_url,
            "PUBLISHER_API_AUTH": "entra",
            "PUBLISHER_API_AUDIENCE": PUBLISHER_API_AUDIENCE,
            "PUBLISHER_API_OPENID_CONFIG_URL": self.standin.openid_config_url,
            "SAAS_APP_URL": "https://app.contoso.example/",
            # The setup run records every subscription; at 10,000 that can exceed the default 480 s budget.
            "RECONCILE_TIME_BUDGET_SECONDS": "3600",
        }
        env.update(overrides)
        return env

    def app(self, env: dict[str, str], name: str = "app") -> AppProcess:
        log_path = os.path.join(self.log_dir, f"{name}-{uuid.uuid4().hex[:6]}.log")
        return AppProcess(env, log_path)

    def reset_standin(self) -> None:
        self.standin.reset()
        self.standin.auto_accept_seconds = None  # the app answers every InProgress operation itself
        self.standin.webhook_url = None  # the bench posts the webhooks itself

    def close(self) -> None:
        for component in reversed(self._started):
            component.stop()
        self._started.clear()
        if self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> BenchEnvironment:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# =================================================================================================
# 1. Webhook burst

# The burst's mix (shares of the events); Reinstate goes to subscriptions seeded Suspended.
WEBHOOK_MIX = (
    ("ChangeQuantity", 0.25),
    ("ChangePlan", 0.15),
    ("Suspend", 0.20),
    ("Renew", 0.20),
    ("Unsubscribe", 0.10),
    ("Reinstate", 0.10),
)
ANSWERED_ACTIONS = frozenset({"ChangePlan", "ChangeQuantity", "Reinstate"})  # InProgress: the app PATCHes

# The design's minimum per new event (see shared/webhook.py, shared/repository.py):
# Marketplace: Get Operation (+ PATCH operation when it is InProgress);
# storage: marker read, marker create, state read, one transaction (state + history + marker + outbox).
MIN_MARKETPLACE_PER_EVENT = {"plain": 1, "answered": 2}
MIN_STORAGE_READS = 2
MIN_STORAGE_WRITES = 2
BRIEF_STORAGE_READS = 3  # the brief's count: marker read, marker read-back after the create, state read


def webhook_actions(count: int) -> list[str]:
    """``count`` actions in the mix's proportions, interleaved (not in blocks)."""
    quotas = [(action, share * count) for action, share in WEBHOOK_MIX]
    sizes = {action: int(quota) for action, quota in quotas}
    for action, _ in sorted(quotas, key=lambda item: item[1] - int(item[1]), reverse=True)[: count - sum(sizes.values())]:
        sizes[action] += 1
    # Spread each action evenly over the sequence (stable sort by fractional position).
    positions = []
    for action, size in sizes.items():
        positions += [((index + 0.5) / size, action) for index in range(size)]
    return [action for _, action in sorted(positions)]


def _trigger_kwargs(action: str, index: int) -> dict[str, Any]:
    if action == "ChangeQuantity":
        return {"quantity": 6 + index % 40}
    if action == "ChangePlan":
        return {"plan_id": "premium"}
    return {}


@dataclass
class _Delivery:
    action: str
    subscription_id: str
    operation_id: str
    body: bytes
    token: str


def _prepare_delivery(standin, subscription_id: str, action: str, index: int) -> _Delivery:
    operation = standin.trigger(subscription_id, action, deliver=False, **_trigger_kwargs(action, index))
    body = json.dumps(standin.webhook_payload(operation["id"])).encode()
    return _Delivery(action, subscription_id, operation["id"], body, standin.sign_token())


def _post(session, url: str, delivery: _Delivery) -> tuple[int | None, float, str]:
    started = time.perf_counter()
    try:
        response = session.post(
            url,
            data=delivery.body,
            timeout=REQUEST_TIMEOUT,
            headers={"Authorization": "Bearer " + delivery.token, "Content-Type": "application/json"},
        )
        elapsed = time.perf_counter() - started
        try:
            result = response.json().get("result", "") if response.status_code == 200 else response.text[:200]
        except ValueError:
            result = response.text[:200]
        return response.status_code, elapsed, result
    except Exception as error:  # noqa: BLE001 - counted as an error
        return None, time.perf_counter() - started, type(error).__name__


def _new_session():
    import requests

    session = requests.Session()
    session.trust_env = False  # loopback only: never through a proxy from the environment
    return session


def _storage_counts(after: dict, before: dict, bucket: str = "app") -> dict[str, int]:
    return _diff(after["wire"][bucket], before["wire"][bucket])


def _reads_writes(wire: dict[str, int]) -> tuple[int, int]:
    return (sum(wire.get(k, 0) for k in STORAGE_READ_KINDS), sum(wire.get(k, 0) for k in STORAGE_WRITE_KINDS))


def bench_webhook(
    bench: BenchEnvironment, events: int = 1000, senders: int = 20, auth_samples: int = 200, deadline_seconds: float = 600.0
) -> dict[str, Any]:
    """``events`` distinct signed webhooks from ``senders`` threads through the dev host (one per subscription)."""
    standin = bench.standin
    bench.reset_standin()
    actions = webhook_actions(events)
    reinstates = actions.count("Reinstate")
    probe_actions = [action for action, _ in WEBHOOK_MIX]
    active_ids = standin.seed(events - reinstates + len(probe_actions) - 1, plan_id="standard", quantity=5)
    suspended_ids = standin.seed(reinstates + 1, status="Suspended", plan_id="standard", quantity=5)
    probe_ids = {action: active_ids.pop() for action in probe_actions if action != "Reinstate"}
    probe_ids["Reinstate"] = suspended_ids.pop()
    result: dict[str, Any] = {"events": events, "senders": senders}

    with bench.app(bench.app_env(), "webhook") as app:
        url = app.call("serve") + "/api/webhook"
        started = time.perf_counter()
        setup = app.call("reconcile")  # records the seeded subscriptions locally (not measured)
        result["setup_seconds"] = round(time.perf_counter() - started, 2)
        result["setup_recorded"] = setup["summary"]["repairs"].get("recorded_new", 0)

        # -- probes: one event of each kind, alone, so each one's calls are exact ----------------
        first_seen_id = standin.seed(1, plan_id="standard", quantity=5)[0]  # never reconciled
        session = _new_session()
        probes = []
        probe_plan = [(action, probe_ids[action], action) for action in probe_actions]
        probe_plan.append(("Suspend (first seen)", first_seen_id, "Suspend"))
        last_delivery: _Delivery | None = None
        for label, subscription_id, action in probe_plan:
            delivery = _prepare_delivery(standin, subscription_id, action, 0)
            probes.append(_probe(app, standin, session, url, label, delivery))
            last_delivery = delivery
        assert last_delivery is not None  # the plan always holds the first-seen probe
        probes.append(_probe(app, standin, session, url, "duplicate (redelivery)", last_delivery))
        session.close()
        result["probes"] = probes

        # -- the burst -------------------------------------------------------------------------
        deliveries = []
        active_iter, suspended_iter = iter(active_ids), iter(suspended_ids)
        for index, action in enumerate(actions):
            subscription_id = next(suspended_iter) if action == "Reinstate" else next(active_iter)
            deliveries.append(_prepare_delivery(standin, subscription_id, action, index))
        patches_before = len(standin.patches)
        calls_before = dict(standin.calls)
        before = app.call("snapshot")
        local = threading.local()
        sessions: list = []
        sessions_lock = threading.Lock()

        def send(delivery: _Delivery) -> tuple[int | None, float, str]:
            session = getattr(local, "session", None)
            if session is None:
                session = local.session = _new_session()
                with sessions_lock:
                    sessions.append(session)
            return _post(session, url, delivery)

        burst_started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=senders, thread_name_prefix="bench-sender") as pool:
            futures = [pool.submit(send, delivery) for delivery in deliveries]
            outcomes = [
                future.result(timeout=max(1.0, deadline_seconds - (time.perf_counter() - burst_started))) for future in futures
            ]
        burst_seconds = time.perf_counter() - burst_started
        for session in sessions:
            session.close()
        after = app.call("snapshot")
        app.call("wait_relays")
        after_relays = app.call("snapshot")
        calls = _diff(dict(standin.calls), calls_before)
        patches = standin.patches[patches_before:]

        # -- JWT validation alone, keys cached ------------------------------------------------------
        tokens = [standin.sign_token() for _ in range(auth_samples)]
        auth_durations = app.call("auth_loop", tokens=tokens)

        # -- consistency: a reconciliation right after the burst finds nothing to repair ------------
        check = app.call("reconcile", clock_skew_seconds=RECONCILE_CLOCK_SKEW_SECONDS)
        result["log"] = app.log_counts()

    latencies = [elapsed for status, elapsed, _ in outcomes]
    statuses = Counter(str(status) for status, _, _ in outcomes)
    results = Counter(res for status, _, res in outcomes if status == 200)
    errors = sum(count for status, count in statuses.items() if status != "200")
    error_kinds = Counter(f"{status}: {res}" for status, _, res in outcomes if status != 200)
    answered = sum(1 for d in deliveries if d.action in ANSWERED_ACTIONS)
    wire = _storage_counts(after, before)
    reads, writes = _reads_writes(wire)
    relay_wire = _diff(after_relays["wire"]["relay"], before["wire"]["relay"])
    repo = _diff(after["repo"], before["repo"])
    marketplace = _diff(after["marketplace"], before["marketplace"])
    timings = {
        name: {k: after["timings"][name][k] - before["timings"].get(name, {}).get(k, 0) for k in ("count", "total")}
        for name in after["timings"]
    }
    handle_mean = _per(timings["handle"]["total"], int(timings["handle"]["count"]), 6)
    auth_in_burst_mean = _per(timings["authenticate"]["total"], int(timings["authenticate"]["count"]), 6)
    auth_mean = statistics.fmean(auth_durations)
    patch_statuses = Counter(str(p.get("status") or p.get("body", {}).get("status")) for p in patches)
    result.update(
        {
            "burst_seconds": round(burst_seconds, 3),
            "throughput_per_second": round(events / burst_seconds, 1),
            "latency_ms": latency_summary(latencies),
            "statuses": dict(statuses),
            "results": dict(results),
            "errors": errors,
            "error_kinds": dict(error_kinds),
            "answered_events": answered,
            "patches": len(patches),
            "patch_statuses": dict(patch_statuses),
            "marketplace_calls": marketplace,
            "standin_calls": calls,
            "marketplace_per_event": _per(sum(marketplace.values()), events),
            "storage_wire": wire,
            "storage_reads_per_event": _per(reads, events),
            "storage_writes_per_event": _per(writes, events),
            "repo_metrics": repo,
            "repo_reads_per_event": _per(repo.get("reads", 0), events),
            "repo_writes_per_event": _per(repo.get("writes", 0), events),
            "relay_storage_wire": relay_wire,
            "relay_storage_per_event": _per(sum(relay_wire.values()), events),
            "app_cpu_ms_per_event": _per((after_relays["cpu_seconds"] - before["cpu_seconds"]) * 1000, events),
            "handle_cpu_ms_per_event": _per(timings["handle_cpu"]["total"] * 1000, events),
            "handle_mean_ms": _ms(handle_mean),
            "auth_in_burst_mean_ms": _ms(auth_in_burst_mean),
            "auth_in_burst_share": round(timings["authenticate"]["total"] / timings["handle"]["total"], 5)
            if timings["handle"]["total"]
            else 0.0,
            "auth_alone_ms": {
                "mean": _ms(auth_mean),
                "p50": _ms(percentile(auth_durations, 50)),
                "p99": _ms(percentile(auth_durations, 99)),
                "samples": len(auth_durations),
            },
            "auth_alone_share_of_handle": round(auth_mean / handle_mean, 5) if handle_mean else 0.0,
            "auth_alone_share_of_latency": round(auth_mean / statistics.fmean(latencies), 5),
            "auth_alone_share_of_cpu": round(
                auth_mean * 1000 / max(_per((after_relays["cpu_seconds"] - before["cpu_seconds"]) * 1000, events), 1e-9), 5
            ),
            "consistency_repairs": check["summary"]["repairs"],
            "consistency_flagged": check["summary"]["flagged_count"],
            "consistency_completed": check["summary"]["completed"],
        }
    )
    return result


def bench_publisher(bench: BenchEnvironment, changes: int = 500, callers: int = 10) -> dict[str, Any]:
    """``changes`` PATCHes of the publisher API from ``callers`` threads, one subscription each,
    followed to the end (Microsoft's Partner webhook and our polls), then checked for consistency."""
    standin = bench.standin
    bench.reset_standin()
    ids = standin.seed(changes + 1, plan_id="standard", quantity=5)
    probe_id = ids.pop()
    env = bench.app_env(PUBLISHER_OPERATION_POLL_SECONDS="1")
    token = standin.sign_token(
        {"aud": PUBLISHER_API_AUDIENCE, "azp": "0be1c4a2-0000-4000-8000-00000000be03", "roles": ["Subscriptions.ReadWrite"]}
    )
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    result: dict[str, Any] = {"changes": changes, "callers": callers}
    with bench.app(env, "publisher") as app:
        app_url = app.call("serve")
        base = app_url + "/api/subscriptions/"
        standin.webhook_url = app_url + "/api/webhook"  # Microsoft announces each completed Partner operation
        app.call("reconcile")  # records the seeded subscriptions (not measured)
        session = _new_session()
        # -- probe: one change alone; the snapshot right after the 202 holds the request's own work
        # (the follower's first poll waits PUBLISHER_OPERATION_POLL_SECONDS).
        before = app.call("snapshot")
        response = session.patch(base + probe_id, data=json.dumps({"quantity": 6}), headers=headers, timeout=REQUEST_TIMEOUT)
        after = app.call("snapshot")
        reads, writes = _reads_writes(_storage_counts(after, before))
        result["probe"] = {
            "status": response.status_code,
            "storage_reads": reads,
            "storage_writes": writes,
            "marketplace": _diff(after["marketplace"], before["marketplace"]),
        }
        app.call("wait_followers")
        app.call("wait_relays")
        session.close()

        # -- the burst ------------------------------------------------------------------------------
        calls_before = dict(standin.calls)
        deliveries_before = len(standin.webhook_deliveries)
        before = app.call("snapshot")
        local = threading.local()

        def change(index: int) -> tuple[int | None, float]:
            session = getattr(local, "session", None) or _new_session()
            local.session = session
            started = time.perf_counter()
            try:
                answer = session.patch(
                    base + ids[index], data=json.dumps({"quantity": 6 + index % 50}), headers=headers, timeout=REQUEST_TIMEOUT
                )
                return answer.status_code, time.perf_counter() - started
            except Exception:  # noqa: BLE001 - counted as an error
                return None, time.perf_counter() - started

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=callers, thread_name_prefix="bench-caller") as pool:
            outcomes = list(pool.map(change, range(changes)))
        burst_seconds = time.perf_counter() - started
        app.call("wait_followers")
        settled_seconds = time.perf_counter() - started
        app.call("wait_relays")
        after = app.call("snapshot")
        endings = app.call("publisher_operations", ids=ids)
        check = app.call("reconcile", clock_skew_seconds=RECONCILE_CLOCK_SKEW_SECONDS)
        result["log"] = app.log_counts()

    latencies = [elapsed for _, elapsed in outcomes]
    statuses = Counter(str(status) for status, _ in outcomes)
    marketplace = _diff(after["marketplace"], before["marketplace"])
    webhooks = len(standin.webhook_deliveries) - deliveries_before
    wire = _storage_counts(after, before)
    reads, writes = _reads_writes(wire)
    relay_wire = _diff(after["wire"]["relay"], before["wire"]["relay"])
    applied = sum(1 for index, sid in enumerate(ids) if standin.get_subscription(sid).get("quantity") == 6 + index % 50)
    polls = marketplace.get("get_operation", 0) - webhooks  # every webhook is verified with one Get Operation
    result.update(
        {
            "burst_seconds": round(burst_seconds, 3),
            "settled_seconds": round(settled_seconds, 3),
            "throughput_per_second": round(changes / burst_seconds, 1),
            "latency_ms": latency_summary(latencies),
            "statuses": dict(statuses),
            "errors": sum(count for status, count in statuses.items() if status != "202"),
            "marketplace_calls": marketplace,
            "standin_patches": _diff(dict(standin.calls), calls_before).get("update", 0),
            "partner_webhooks": webhooks,
            "follower_polls": polls,
            "polls_per_change": _per(polls, changes),
            "marketplace_per_change": _per(sum(marketplace.values()), changes),
            "storage_wire": wire,
            "storage_reads_per_change": _per(reads, changes),
            "storage_writes_per_change": _per(writes, changes),
            "relay_storage_per_change": _per(sum(relay_wire.values()), changes),
            "endings": endings,
            "applied_at_microsoft": applied,
            "consistency_repairs": check["summary"]["repairs"],
            "consistency_open_operations": check["summary"].get("publisher_operations_pending", 0),
        }
    )
    return result


def _render_publisher(p: dict[str, Any]) -> list[str]:
    lat, probe = p["latency_ms"], p["probe"]
    return [
        "## 2. Publisher changes (publisher API)",
        "",
        f'{p["changes"]} `PATCH /api/subscriptions/{{id}}` (`{{"quantity": n}}`, one subscription each) from'
        f" {p['callers']} concurrent callers with one Entra token (validated, role checked), through the dev host;"
        " Microsoft's stand-in completes each operation after 0.2 s and sends its Partner webhook, as Microsoft does;"
        " `PUBLISHER_OPERATION_POLL_SECONDS=1`.",
        "",
        "| Figure | Value |",
        "|---|---|",
        f"| Answers | {_fmt_counts(p['statuses'])} (errors: {p['errors']}) |",
        f"| Latency of the 202 | p50 {lat['p50']} ms, p90 {lat['p90']} ms, p99 {lat['p99']} ms, max {lat['max']} ms |",
        f"| Burst / all settled | {p['burst_seconds']} s ({p['throughput_per_second']}/s) / {p['settled_seconds']} s |",
        f"| PATCHes sent to Microsoft | {p['standin_patches']} for {p['changes']} changes |",
        f"| Marketplace calls per change (whole life) | {p['marketplace_per_change']}: {_fmt_counts(p['marketplace_calls'])} |",
        f"| Get Operation polls by the follower | {p['follower_polls']} ({p['polls_per_change']} per change); the other"
        f" {p['partner_webhooks']} Get Operation calls verify the {p['partner_webhooks']} Partner webhooks |",
        f"| Storage per change (request, follow, webhook) | {p['storage_reads_per_change']} reads,"
        f" {p['storage_writes_per_change']} writes (+ relay {p['relay_storage_per_change']} in background) |",
        f"| One change alone, until its 202 | {probe['storage_reads']} storage reads, {probe['storage_writes']} writes,"
        f" Marketplace {_fmt_counts(probe['marketplace'])} |",
        f"| How they ended | {_fmt_counts(p['endings'])}; applied at Microsoft: {p['applied_at_microsoft']} |",
        f"| Reconciliation right after | repairs {_fmt_counts(p['consistency_repairs']) or 'none'},"
        f" open publisher operations {p['consistency_open_operations']} |",
        "",
        "Design minimum per change: 1 PATCH plus the Get Operation polls until Microsoft says `Succeeded`"
        f" (here {p['polls_per_change']} polls per change). Whichever comes first settles the operation: Microsoft's"
        " Partner webhook (its Get Operation verifies it) or our first poll after `PUBLISHER_OPERATION_POLL_SECONDS`;"
        " the other finds it settled. A poll that finds it settled calls nobody; one that settles it reads the"
        " subscription back once (the `get_subscription` calls). List available plans is one call per subscription"
        " (cached 60 s; every change here is on another subscription).",
        "",
    ]


# =================================================================================================
# 7. Work on queues (event delivery and operation follow-up as queue triggers)


class _Arrivals:
    """Events as they arrived somewhere: (epoch s, subscriptionId, eventType)."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()

    def first(self, event_type: str) -> dict[str, float]:
        """When each subscription's first event of this type arrived."""
        with self._lock:
            found: dict[str, float] = {}
            for at, subscription_id, kind in self.arrivals:
                if kind == event_type:
                    found.setdefault(subscription_id, at)
            return found


class _HookServer(_Arrivals):
    """EVENTS_WEBHOOK_URL for the bench: stamps when each subscription's events arrive."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        super().__init__()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                at = time.time()
                try:
                    event = json.loads(body)
                    with hook._lock:
                        hook.arrivals.append((at, str(event.get("subscriptionId")), str(event.get("eventType"))))
                except ValueError:
                    pass
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/events"
        self._thread = threading.Thread(target=self._server.serve_forever, name="bench-hook", daemon=True)

    def __enter__(self) -> _HookServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class _QueueWatcher(_Arrivals):
    """Reads the events queue (EVENTS_QUEUE_NAME) continuously, as a consumer would, stamping arrivals."""

    def __init__(self, connection_string: str, name: str):
        from azure.storage.queue import QueueClient, TextBase64DecodePolicy

        super().__init__()
        self.client = QueueClient.from_connection_string(connection_string, name, message_decode_policy=TextBase64DecodePolicy())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-queue-watcher", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                messages = list(self.client.receive_messages(messages_per_page=32, max_messages=32, visibility_timeout=300))
            except Exception:  # noqa: BLE001 - not created yet, or Azurite busy: try again
                messages = []
            at = time.time()
            for message in messages:
                try:
                    event = json.loads(message.content)
                    with self._lock:
                        self.arrivals.append((at, str(event.get("subscriptionId")), str(event.get("eventType"))))
                    self.client.delete_message(message)
                except Exception:  # noqa: BLE001 - counted as not arrived
                    pass
            if not messages:
                self._stop.wait(0.05)

    def __enter__(self) -> _QueueWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _delays_ms(start: dict[str, float], end: dict[str, float]) -> dict[str, float]:
    delays = [end[key] - at for key, at in start.items() if key in end]
    return {**latency_summary(delays), "count": len(delays)} if delays else {"count": 0}


def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    ends = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > ends:
            return False
        time.sleep(0.1)
    return True


def bench_queues(
    bench: BenchEnvironment, events: int = 300, senders: int = 10, changes: int = 200, callers: int = 10
) -> dict[str, Any]:
    """The queue-triggered work as the Functions host runs it (the dev host serving the queue
    triggers against Azurite, host.json extensions.queues): the delay from a webhook's 200 to its
    event at the hook and on the events queue, storage requests per delivered event, and the time
    from a publisher change's 202 to Succeeded, with and without Microsoft's Partner webhook."""
    result: dict[str, Any] = {"events": events, "senders": senders, "changes": changes, "callers": callers}
    result["delivery"] = {
        "queue": _delivery_run(bench, events, senders, hook=False),
        "queue_and_hook": _delivery_run(bench, events, senders, hook=True),
    }
    # -- publisher changes: 202 -> Succeeded, with Microsoft's Partner webhook and by our polls alone
    paced = max(1, changes // 5)
    result["paced_changes"], result["pace_seconds"] = paced, PACE_SECONDS
    result["followup"] = {
        "webhook": _followup_run(bench, changes, callers, partner_webhook=True),
        "polls_only": _followup_run(bench, changes, callers, partner_webhook=False),
        "webhook_paced": _followup_run(bench, paced, 1, partner_webhook=True, pace_seconds=PACE_SECONDS),
        "polls_only_paced": _followup_run(bench, paced, 1, partner_webhook=False, pace_seconds=PACE_SECONDS),
    }
    return result


PACE_SECONDS = 0.25  # the paced runs: one caller, a change every quarter second (the app mostly idle)


def _delivery_run(bench: BenchEnvironment, events: int, senders: int, *, hook: bool) -> dict[str, Any]:
    """``events`` Suspend webhooks; their events delivered by the event_delivery queue trigger to the
    events queue alone (``hook`` False: no order to keep, no lease) or to the queue and a hook."""
    standin = bench.standin
    bench.reset_standin()
    ids = standin.seed(events, plan_id="standard", quantity=5)
    events_queue = "bq" + uuid.uuid4().hex[:10]
    with _HookServer() as hook_server, _QueueWatcher(bench.azurite.connection_string, events_queue) as watcher:
        sinks = {"EVENTS_WEBHOOK_URL": hook_server.url, "EVENTS_WEBHOOK_SECRET": "bench-hook-secret"} if hook else {}
        env = bench.app_env(EVENTS_QUEUE_NAME=events_queue, **sinks)
        with bench.app(env, "queues") as app:
            url = app.call("serve", queues=True) + "/api/webhook"
            app.call("reconcile")  # records the seeded subscriptions (not measured)
            app.call("work_queues_idle")
            deliveries = [_prepare_delivery(standin, sid, "Suspend", i) for i, sid in enumerate(ids)]
            before = app.call("snapshot")
            answered: dict[str, float] = {}
            local = threading.local()

            def send(delivery: _Delivery) -> int | None:
                session = getattr(local, "session", None) or _new_session()
                local.session = session
                status, _, _ = _post(session, url, delivery)
                if status == 200:
                    answered[delivery.subscription_id] = time.time()
                return status

            def arrived() -> bool:
                on_queue = len(watcher.first("subscription.suspended")) >= len(answered)
                return on_queue and (not hook or len(hook_server.first("subscription.suspended")) >= len(answered))

            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=senders, thread_name_prefix="bench-sender") as pool:
                statuses = Counter(str(status) for status in pool.map(send, deliveries))
            burst_seconds = time.perf_counter() - started
            everything = _wait_for(arrived, 180)
            delivered_seconds = time.perf_counter() - started
            app.call("work_queues_idle")
            after = app.call("snapshot")
            log_counts = app.log_counts()
    on_queue = watcher.first("subscription.suspended")
    request_wire = _storage_counts(after, before)
    relay_wire = _storage_counts(after, before, "relay")
    return {
        "statuses": dict(statuses),
        "burst_seconds": round(burst_seconds, 3),
        "delivered_seconds": round(delivered_seconds, 3),
        "all_delivered": everything,
        "delivered_on_queue": len(on_queue),
        "to_hook_ms": _delays_ms(answered, hook_server.first("subscription.suspended")) if hook else None,
        "to_queue_ms": _delays_ms(answered, on_queue),
        "request_work_queue_sends": request_wire.get("queue_send", 0),
        "relay_wire": relay_wire,
        "relay_requests_per_event": _per(sum(relay_wire.values()), len(on_queue)),
        "log": log_counts,
    }


def _followup_run(
    bench: BenchEnvironment, changes: int, callers: int, *, partner_webhook: bool, pace_seconds: float = 0.0
) -> dict[str, Any]:
    standin = bench.standin
    bench.reset_standin()
    ids = standin.seed(changes, plan_id="standard", quantity=5)
    env = bench.app_env(PUBLISHER_OPERATION_POLL_SECONDS="1")
    token = standin.sign_token(
        {"aud": PUBLISHER_API_AUDIENCE, "azp": "0be1c4a2-0000-4000-8000-00000000be03", "roles": ["Subscriptions.ReadWrite"]}
    )
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    accepted: dict[str, float] = {}
    local = threading.local()
    try:
        with bench.app(env, "followup") as app:
            app_url = app.call("serve", queues=True)
            standin.webhook_url = app_url + "/api/webhook" if partner_webhook else None
            standin.partner_webhook = partner_webhook
            app.call("reconcile")
            app.call("work_queues_idle")

            def change(index: int) -> int | None:
                session = getattr(local, "session", None) or _new_session()
                local.session = session
                if pace_seconds:
                    time.sleep(pace_seconds)
                try:
                    answer = session.patch(
                        f"{app_url}/api/subscriptions/{ids[index]}",
                        data=json.dumps({"quantity": 6 + index % 50}),
                        headers=headers,
                        timeout=REQUEST_TIMEOUT,
                    )
                except Exception:  # noqa: BLE001 - counted as an error
                    return None
                if answer.status_code == 202:
                    accepted[answer.json()["id"]] = time.time()
                return answer.status_code

            def settled() -> bool:
                times = app.call("settle_times", ids=ids)
                return all(times.get(op, [None, None])[1] is not None for op in accepted)

            before = app.call("snapshot")
            with ThreadPoolExecutor(max_workers=callers, thread_name_prefix="bench-caller") as pool:
                statuses = Counter(str(status) for status in pool.map(change, range(changes)))
            everything = _wait_for(settled, 300)
            times = app.call("settle_times", ids=ids)
            after = app.call("snapshot")
    finally:
        standin.partner_webhook = True
    completed = {op: at for op, (_, at) in times.items() if at is not None}
    return {
        "statuses": dict(statuses),
        "all_settled": everything,
        "endings": dict(Counter(status for status, _ in times.values())),
        "to_settled_ms": _delays_ms(accepted, completed),
        "get_operation_calls": _diff(after["marketplace"], before["marketplace"]).get("get_operation", 0),
    }


def _fmt_delay(d: dict[str, Any]) -> str:
    if not d.get("count"):
        return "none arrived"
    return f"p50 {d['p50']} ms, p90 {d['p90']} ms, p99 {d['p99']} ms, max {d['max']} ms ({d['count']})"


def _render_queues(q: dict[str, Any]) -> list[str]:
    queue, both = q["delivery"]["queue"], q["delivery"]["queue_and_hook"]
    runs = [q["followup"][name] for name in ("webhook", "polls_only", "webhook_paced", "polls_only_paced")]
    per_event = {
        name: round(run["request_work_queue_sends"] / max(1, run["delivered_on_queue"]) + run["relay_requests_per_event"], 2)
        for name, run in (("queue", queue), ("both", both))
    }
    return [
        "## 7. Work on queues (event delivery and operation follow-up)",
        "",
        'Since issue 24 nothing runs after a function answers: a state change puts a "deliver subscription X"'
        " job on EVENTS_WORK_QUEUE and the `event_delivery` queue trigger delivers; a publisher change puts a"
        ' "poll operation Y" job on OPERATIONS_WORK_QUEUE, invisible for `PUBLISHER_OPERATION_POLL_SECONDS`, and'
        " `operation_followup` polls. Here the dev host serves both queue triggers against Azurite as the Functions"
        " host does with this host.json (`batchSize` 16, the messages of a batch concurrently, empty polls backing"
        " off to `maxPollingInterval` 2 s). Delays run from the moment the caller got its answer to the moment the"
        " event reached a local hook (EVENTS_WEBHOOK_URL) or a consumer polling the events queue every 50 ms; both"
        " run in the bench process, on one clock.",
        "",
        f"{q['events']} signed Suspend webhooks from {q['senders']} senders, each run on fresh tables:",
        "",
        "| Figure | Events queue only | Events queue and hook |",
        "|---|---|---|",
        f"| Answers | {_fmt_counts(queue['statuses'])} in {queue['burst_seconds']} s | {_fmt_counts(both['statuses'])} in {both['burst_seconds']} s |",
        f"| All delivered | {queue['all_delivered']}, after {queue['delivered_seconds']} s | {both['all_delivered']}, after {both['delivered_seconds']} s |",
        f"| Webhook 200 -> event on the events queue | {_fmt_delay(queue['to_queue_ms'])} | {_fmt_delay(both['to_queue_ms'])} |",
        f"| Webhook 200 -> event at the hook | (no hook) | {_fmt_delay(both['to_hook_ms'])} |",
        f"| Job sends on the request path | {queue['request_work_queue_sends']} | {both['request_work_queue_sends']} |",
        f"| Delivery storage requests (event_delivery runs; the host's receive and delete included) | {_fmt_counts(queue['relay_wire'])} = {queue['relay_requests_per_event']} per event | {_fmt_counts(both['relay_wire'])} = {both['relay_requests_per_event']} per event |",
        f"| Storage requests per delivered event, job send included | {per_event['queue']} | {per_event['both']} |",
        "",
        "Before issue 24 the relay ran on a thread pool of the app after the answer: 3.0 storage requests per event"
        " with the queue as the only sink (query_page, queue_send, update; section 1 of the run of 2026-12-03), and no"
        " delay figure could be trusted in Azure, where nothing keeps that thread alive. The job adds its send on the"
        " request path and, on the delivery side, the host's receive (shared by a batch of up to 16) and delete. With"
        " a hook the relay keeps order under a per-subscription lease (take, release, and a look for events written"
        " meanwhile), and records that the queue has the event only when the hook then fails.",
        "",
        "Publisher changes (`PATCH` with a new quantity), `PUBLISHER_OPERATION_POLL_SECONDS=1`; the stand-in completes"
        f" each operation after 0.2 s. Burst: {q['changes']} changes from {q['callers']} callers at once; paced:"
        f" {q['paced_changes']} changes from one caller, one every {q['pace_seconds']} s:",
        "",
        "| Figure | Burst, Partner webhook | Burst, our polls alone | Paced, Partner webhook | Paced, our polls alone |",
        "|---|---|---|---|---|",
        "| Answers | " + " | ".join(_fmt_counts(run["statuses"]) for run in runs) + " |",
        "| 202 -> Succeeded | " + " | ".join(_fmt_delay(run["to_settled_ms"]) for run in runs) + " |",
        "| How they ended | " + " | ".join(_fmt_counts(run["endings"]) for run in runs) + " |",
        "| Get Operation calls | " + " | ".join(str(run["get_operation_calls"]) for run in runs) + " |",
        "",
        "Paced, the delay is the mechanism's: the Partner webhook settles a change about when Microsoft completes it;"
        " without it the floor is the first poll job's visibility delay (1 s) plus the host's queue polling (empty"
        " polls back off to 2 s). In the burst one app process also answers the changes, Microsoft's webhooks and the"
        " poll jobs on the same two cores, so the delay is mostly queueing for CPU (Functions would scale out). A"
        " change settled by the webhook first leaves its poll job to find it settled and call nobody; a poll that"
        " comes first calls Get Operation, so the burst with the webhook counts more calls than changes.",
        "",
    ]


METERING_DIMENSIONS = ("api_calls", "storage_gb", "gpu_minutes")
METERING_HOURS = 3
USAGE_PER_CALL = 100  # a reporter's batch (the API takes up to 1,000)
USAGE_ATTEMPTS = 5  # a reporter sends events answered `failed` again, same ids


def _usage_events(ids: list[str], count: int, hours: list[datetime]) -> tuple[list[dict[str, Any]], int]:
    """``count`` events spread evenly over every (subscription, dimension, hour); quantities are
    multiples of 0.25 (exact in binary), so totals can be compared to the unit without rounding."""
    rng = random.Random(13)
    buckets = len(ids) * len(METERING_DIMENSIONS) * len(hours)
    events = []
    for index in range(count):
        bucket = index % buckets
        hour = hours[bucket // (len(ids) * len(METERING_DIMENSIONS))]
        events.append(
            {
                "subscriptionId": ids[bucket % len(ids)],
                "dimension": METERING_DIMENSIONS[(bucket // len(ids)) % len(METERING_DIMENSIONS)],
                "quantity": rng.randint(1, 400) / 4,
                "effectiveStartTime": (hour + timedelta(seconds=rng.randint(0, 3599))).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "id": f"bench-{index}",
            }
        )
    return events, min(buckets, count)


def _metered_subscriptions(standin, subscriptions: int) -> tuple[list[str], dict[str, str]]:
    """``subscriptions`` on a plan with the bench's meter dimensions, and the headers of a reporter
    (an Entra token with ``Usage.Write``)."""
    from devtools.marketplace_standin import DEFAULT_OFFER_ID, make_plan

    dimensions = [{"id": d, "name": d, "unitOfMeasure": "unit", "pricePerUnit": 0.01} for d in METERING_DIMENSIONS]
    standin.set_plans(DEFAULT_OFFER_ID, [make_plan("metered", planComponents={"meteringDimensions": dimensions})])
    ids = standin.seed(subscriptions, plan_id="metered")
    token = standin.sign_token(
        {"aud": PUBLISHER_API_AUDIENCE, "azp": "0be1c4a2-0000-4000-8000-00000000be04", "roles": ["Usage.Write"]}
    )
    return ids, {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def _report_usage(
    session, url: str, headers: dict[str, str], batch: list[dict[str, Any]]
) -> tuple[list[int | None], list[float], int, Counter, int]:
    """POST a batch of usage events, then again whatever was answered `failed` (same ids: counted once).
    Statuses and latencies per attempt, events accepted, refusal reasons, events still not stored."""
    statuses: list[int | None] = []
    latencies: list[float] = []
    accepted = 0
    refused: Counter = Counter()
    for _attempt in range(USAGE_ATTEMPTS):
        started = time.perf_counter()
        try:
            answer = session.post(url, data=json.dumps({"events": batch}), headers=headers, timeout=120)
            status: int | None = answer.status_code
            results = answer.json().get("results", []) if status in (202, 503) else []
        except Exception:  # noqa: BLE001 - counted as an error, sent again
            status, results = None, []
        latencies.append(time.perf_counter() - started)
        statuses.append(status)
        accepted += sum(1 for r in results if r["status"] == "accepted")
        refused.update(r.get("reason") for r in results if r["status"] == "refused")
        again = {r["index"] for r in results if r["status"] == "failed"} if results else set(range(len(batch)))
        batch = [event for index, event in enumerate(batch) if index in again]
        if not batch:
            break
    return statuses, latencies, accepted, refused, len(batch)


def bench_metering(
    bench: BenchEnvironment,
    events: int = 100_000,
    subscriptions: int = 1000,
    reporters: int = 20,
    *,
    order: str = "request",
    error_rate: float = 0.0,
) -> dict[str, Any]:
    """``events`` usage events from ``reporters`` concurrent callers (``POST /api/usage``, 1,000 per call)
    over ``subscriptions`` x 3 dimensions x 3 closed hours; then metering runs until nothing is left
    to retry, and the check that Microsoft's stand-in accepted exactly what was reported. ``order``
    and ``error_rate``: the stand-in's result order and share of per-item ``Error`` answers."""
    from decimal import Decimal

    standin = bench.standin
    bench.reset_standin()
    standin.usage_result_order = order
    standin.usage_error_rate = error_rate
    ids, headers = _metered_subscriptions(standin, subscriptions)
    now = datetime.now(UTC)
    current = now.replace(minute=0, second=0, microsecond=0)
    hours = [current - timedelta(hours=n) for n in range(METERING_HOURS, 0, -1)]
    usage, buckets = _usage_events(ids, events, hours)
    calls = [usage[start : start + USAGE_PER_CALL] for start in range(0, len(usage), USAGE_PER_CALL)]
    result: dict[str, Any] = {"events": events, "reporters": reporters, "subscriptions": subscriptions, "buckets": buckets}
    with bench.app(bench.app_env(), "metering") as app:
        url = app.call("serve") + "/api/usage"
        # Record the subscriptions as known since well before the usage hours (not measured), then
        # put the app's clock back to now.
        app.call("reconcile", clock_skew_seconds=-36 * 3600)
        app.call("reconcile")
        app.call("wait_relays")
        local = threading.local()

        def report(batch: list[dict[str, Any]]) -> tuple[list[int | None], list[float], int]:
            session = getattr(local, "session", None) or _new_session()
            local.session = session
            statuses, latencies, accepted, _, _ = _report_usage(session, url, headers, batch)
            return statuses, latencies, accepted

        before = app.call("snapshot")
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=reporters, thread_name_prefix="bench-reporter") as pool:
            outcomes = list(pool.map(report, calls))
        ingest_seconds = time.perf_counter() - started
        after = app.call("snapshot")
        emission = app.call("meter")
        app.call("wait_relays", timeout=600.0)
        retries = app.call("meter_until_settled", runs=6)["runs"]
        again = retries[-1]
        result["log"] = app.log_counts()

    reads, writes = _reads_writes(_storage_counts(after, before))
    accepted_events = sum(accepted for _, _, accepted in outcomes)
    statuses = Counter(str(status) for attempts, _, _ in outcomes for status in attempts)
    latencies = [elapsed for _, times, _ in outcomes for elapsed in times]
    reported_total = sum(Decimal(str(e["quantity"])) for e in usage)
    kept = standin.accepted_usage()
    kept_total = sum((Decimal(str(e["quantity"])) for e in kept), Decimal(0))
    emission_reads, emission_writes = _reads_writes(emission["wire"])
    summary = emission["summary"]
    result.update(
        {
            "calls": len(calls),
            "requests": sum(statuses.values()),
            "statuses": dict(statuses),
            "accepted_events": accepted_events,
            "ingest_seconds": round(ingest_seconds, 3),
            "events_per_second": round(events / ingest_seconds, 1),
            "call_latency_ms": latency_summary(latencies),
            "storage_reads_per_event": _per(reads, events, 3),
            "storage_writes_per_event": _per(writes, events, 3),
            "emission_seconds": emission["wall_seconds"],
            "emission_calls": emission["marketplace"].get("batch_usage_event", 0),
            "emission_minimum_calls": math.ceil(buckets / 25),
            "emission_marketplace": emission["marketplace"],
            "emission_wire": emission["wire"],
            "emission_storage_reads": emission_reads,
            "emission_storage_writes": emission_writes,
            "emission_summary": {
                k: summary[k]
                for k in ("hours_listed", "hours_settled", "buckets_sent", "accepted", "flagged", "retry", "events_written")
            },
            "microsoft_events": len(kept),
            "reported_total": str(reported_total),
            "accepted_total": str(kept_total),
            "exact": reported_total == kept_total,
            "order": order,
            "error_rate": error_rate,
            "item_errors_answered": standin.usage_item_errors_answered,
            "first_run_item_errors": summary["item_errors"],
            "first_run_unmatched": summary["unmatched_answers"],
            "retry_runs": retries,
            "retry_calls": sum(r["calls"] for r in retries),
            "ingest_cpu_seconds": round(after["cpu_seconds"] - before["cpu_seconds"], 3),
            "cpu_ms_per_event": round((after["cpu_seconds"] - before["cpu_seconds"]) * 1000 / events, 4),
            "second_run_calls": again["calls"],
            "second_run_retry": again["retry"],
            "second_run_pending": again["pending_hours"],
        }
    )
    return result


def bench_readback(bench: BenchEnvironment, subscriptions: int = 1000, days: int = 2) -> dict[str, Any]:
    """The daily read-back of ``subscriptions`` x 3 dimensions x ``days`` closed days: the usage is
    reported and emitted through the real path on each of those days (the app's clock and the
    stand-in's set back), then one read-back today compares Microsoft's daily aggregates with ours.
    One difference, one Rejected and one Mismatch are planted to show they are found."""
    from decimal import Decimal

    standin = bench.standin
    bench.reset_standin()
    ids, headers = _metered_subscriptions(standin, subscriptions)
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    result: dict[str, Any] = {"subscriptions": subscriptions, "days": days, "dimensions": len(METERING_DIMENSIONS)}
    session = _new_session()
    reported = Decimal(0)
    try:
        with bench.app(bench.app_env(), "readback") as app:
            url = app.call("serve") + "/api/usage"
            app.call("reconcile", clock_skew_seconds=-(days + 2) * 86400)  # known long before the usage days
            app.call("wait_relays")
            for back in range(days, 0, -1):
                day = today - timedelta(days=back)
                noon = day + timedelta(hours=12)
                skew = (noon + timedelta(hours=1, minutes=5) - datetime.now(UTC)).total_seconds()
                app.call("set_clock_skew", seconds=skew)  # 13:05 of that day: noon's hour is closed
                standin.usage_clock = lambda skew=skew: datetime.now(UTC) + timedelta(seconds=skew)
                batch = [
                    {
                        "subscriptionId": sid,
                        "dimension": dimension,
                        "quantity": 1 + (index % 7) * 0.25,
                        "effectiveStartTime": (noon + timedelta(minutes=index % 60)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                        "id": f"readback-{back}-{index}-{dimension}",
                    }
                    for index, sid in enumerate(ids)
                    for dimension in METERING_DIMENSIONS
                ]
                for start in range(0, len(batch), USAGE_PER_CALL):
                    statuses, _, _, refused, left = _report_usage(session, url, headers, batch[start : start + USAGE_PER_CALL])
                    assert set(statuses) <= {202, 503} and not refused, (statuses, refused)
                    assert not left, f"{left} usage events still failed after {USAGE_ATTEMPTS} attempts"
                reported += sum((Decimal(str(e["quantity"])) for e in batch), Decimal(0))
                app.call("meter_until_settled", runs=3)
            app.call("set_clock_skew", seconds=0.0)
            standin.usage_clock = lambda: datetime.now(UTC)
            first_day = (today - timedelta(days=days)).date().isoformat()
            standin.usage_recon[(ids[0], METERING_DIMENSIONS[0], first_day)] = {"processedQuantity": Decimal("0.5")}
            standin.usage_recon[(ids[1], METERING_DIMENSIONS[0], first_day)] = {"reconStatus": "Rejected"}
            standin.usage_recon[(ids[2], METERING_DIMENSIONS[1], first_day)] = {"reconStatus": "Mismatch"}
            readback = app.call("readback", days=days)
            again = app.call("readback", days=days)
            result["log"] = app.log_counts()
    finally:
        standin.usage_clock = lambda: datetime.now(UTC)
        session.close()
    summary = readback["summary"]
    reads, writes = _reads_writes(readback["wire"])
    result.update(
        {
            "rows": summary["rows"],
            "matched": summary["matched"],
            "differences": summary["differences"],
            "rejected": summary["rejected"],
            "events_written": summary["events_written"],
            "hour_queries": summary["hour_queries"],
            "marketplace_calls": readback["marketplace"],
            "wall_seconds": readback["wall_seconds"],
            "cpu_seconds": readback["cpu_seconds"],
            "storage_reads": reads,
            "storage_writes": writes,
            "wire": readback["wire"],
            "reported_total": str(reported),
            "ours_total": summary["revenue_ours"],
            "microsoft_total": summary["revenue_microsoft"],
            "second_run_events_written": again["summary"]["events_written"],
            "second_run_seconds": again["wall_seconds"],
        }
    )
    return result


def _render_readback(r: dict[str, Any]) -> list[str]:
    return [
        "### 5b. Usage read-back (what Microsoft billed)",
        "",
        f"{r['subscriptions']:,} subscriptions x {r['dimensions']} dimensions x {r['days']} closed days: each day's usage"
        " was reported through `POST /api/usage` and emitted by the metering timer's code with the app's clock (and"
        " the stand-in's) set back to that day; then one read-back (`run_usage_readback`, as `usage_reconcile_timer`"
        " runs it) compared Microsoft's daily aggregates (`GET /api/usageEvents`) with what the app recorded as"
        " accepted. Three rows were planted at the stand-in: one processed quantity lower, one `Rejected`, one `Mismatch`.",
        "",
        "| Figure | Value |",
        "|---|---|",
        f"| Rows compared | {r['rows']:,} (subscription, dimension, day): {r['matched']:,} match, {r['differences']} differ"
        f" (of which {r['rejected']} `Rejected`); {r['events_written']} `usage.mismatch` events |",
        f"| Time | {r['wall_seconds']} s wall, {r['cpu_seconds']} s CPU of the app process |",
        f"| Marketplace calls | {_fmt_counts(r['marketplace_calls'])} |",
        f"| Storage | {r['hour_queries']:,} hour-shard queries; {r['storage_reads']:,} reads, {r['storage_writes']:,} writes"
        f" ({_fmt_counts(r['wire'])}) |",
        f"| Totals | reported {r['reported_total']}, ours accepted {r['ours_total']}, Microsoft processed {r['microsoft_total']}"
        " (the planted lower row is the difference) |",
        f"| Second read-back | {r['second_run_seconds']} s, {r['second_run_events_written']} new `usage.mismatch` events"
        " (a difference is reported once) |",
        "",
    ]


def _retry_runs(m: dict[str, Any]) -> str:
    runs = m["retry_runs"]
    text = "; ".join(
        f"run {n}: {r['calls']} calls, {r['accepted']} accepted, {r['item_errors']} item errors, {r['retry']} left"
        for n, r in enumerate(runs, 2)
    )
    return f"{text} ({m['retry_calls']} calls in all after the first run)"


def _render_metering_variant(m: dict[str, Any]) -> list[str]:
    summary = m["emission_summary"]
    return [
        f"### 5a. The same run, results in {m['order']} order and {m['error_rate']:.0%} per-item `Error`",
        "",
        "The stand-in answered each `batchUsageEvent` with its results in another order than the request (the"
        " documentation does not promise one; the app matches them by resource, dimension, hour and plan) and a"
        " per-item `Error` (nothing recorded at Microsoft) for a random share of the events.",
        "",
        "| Figure | Value |",
        "|---|---|",
        f"| Answers at ingest | {_fmt_counts(m['statuses'])}; events accepted {m['accepted_events']:,} of {m['events']:,};"
        f" {m['events_per_second']:,} events/s |",
        f"| First emission | {m['emission_seconds']} s; {summary['buckets_sent']:,} buckets sent, {summary['accepted']:,} accepted,"
        f" {m['first_run_item_errors']} per-item `Error` answers (sent again), {m['first_run_unmatched']} answers not matching"
        f" the request; {m['emission_calls']} calls (design minimum {m['emission_minimum_calls']}) |",
        f"| Retry runs | {_retry_runs(m)} |",
        f"| batchUsageEvent calls in all | {m['emission_calls'] + m['retry_calls']} = minimum {m['emission_minimum_calls']} +"
        f" {m['emission_calls'] + m['retry_calls'] - m['emission_minimum_calls']} for the retries; the stand-in answered"
        f" {m['item_errors_answered']} per-item errors |",
        f"| Exactness | reported {m['reported_total']}, accepted {m['accepted_total']} in {m['microsoft_events']:,} events:"
        f" {'equal to the unit' if m['exact'] else 'DIFFERENT'} |",
        f"| Ingest CPU | {m['cpu_ms_per_event']} ms per ingested event |",
        "",
    ]


def _render_metering(m: dict[str, Any]) -> list[str]:
    lat, summary = m["call_latency_ms"], m["emission_summary"]
    return [
        "## 5. Metered billing (usage ingest and hourly emission)",
        "",
        f"{m['events']:,} usage events, each with an `id`, from {m['reporters']} concurrent reporters (`POST /api/usage`,"
        f" {USAGE_PER_CALL:,} events per call, one Entra token with `Usage.Write`) over {m['subscriptions']:,} subscriptions x"
        f" {len(METERING_DIMENSIONS)} dimensions x {METERING_HOURS} closed hours ({m['buckets']:,} buckets); then one"
        " metering run (`run_metering`, as the timer runs it) and a second one.",
        "",
        "| Figure | Value |",
        "|---|---|",
        f"| Answers | {_fmt_counts(m['statuses'])} for {m['calls']:,} batches ({m['requests']:,} requests: events answered"
        f" `failed` are sent again, same ids); events accepted {m['accepted_events']:,} of {m['events']:,} |",
        f"| Ingest throughput | {m['events_per_second']:,} events/s ({m['ingest_seconds']} s) |",
        f"| Latency of one call ({USAGE_PER_CALL} events) | p50 {lat['p50']} ms, p90 {lat['p90']} ms, p99 {lat['p99']} ms, max {lat['max']} ms |",
        f"| Storage per event at ingest | {m['storage_writes_per_event']} writes, {m['storage_reads_per_event']} reads |",
        f"| Emission | {m['emission_seconds']} s; {summary['buckets_sent']:,} buckets sent, {summary['accepted']:,} accepted,"
        f" {summary['flagged']} flagged, {summary['retry']} to retry; {summary['hours_settled']:,} of {summary['hours_listed']:,}"
        f" hour shards settled; {summary['events_written']:,} `usage.accepted` events |",
        f"| batchUsageEvent calls | {m['emission_calls']} (design minimum ceil({m['buckets']:,} / 25) = {m['emission_minimum_calls']});"
        f" all Marketplace calls: {_fmt_counts(m['emission_marketplace'])} |",
        f"| Emission storage | {m['emission_storage_reads']:,} reads, {m['emission_storage_writes']:,} writes"
        f" ({_fmt_counts(m['emission_wire'])}) |",
        f"| Exactness | reported {m['reported_total']}, accepted by Microsoft's stand-in {m['accepted_total']}"
        f" in {m['microsoft_events']:,} events: {'equal to the unit' if m['exact'] else 'DIFFERENT'} |",
        f"| Ingest CPU | {m['cpu_ms_per_event']} ms of app-process CPU per ingested event ({m['ingest_cpu_seconds']} s in all) |",
        f"| Retry runs | {_retry_runs(m)} |",
        f"| Last run | {m['second_run_calls']} calls, {m['second_run_pending']} hours pending |",
        "",
        "Ingest: one row per event plus one id row per event (every caller's id is claimed once in its shard's id"
        " partition, so an id counts once wherever it lands), both written per partition in transactions from 6 rows"
        " on, which is why a write carries several events; reads: each subscription's record, cached 30 s per process. The work list is"
        " one upsert per hour shard touched. Emission: one paged query per hour shard, the bucket writes in"
        " transactions, and per subscription-hour one lifecycle event (state read, marker read, one"
        " transaction): those events are most of the emission's storage work and time.",
        "",
    ]


def _probe(app: AppProcess, standin, session, url: str, label: str, delivery: _Delivery) -> dict[str, Any]:
    before = app.call("snapshot")
    calls_before = dict(standin.calls)
    status, elapsed, outcome = _post(session, url, delivery)
    app.call("wait_relays")
    after = app.call("snapshot")
    wire = _storage_counts(after, before)
    reads, writes = _reads_writes(wire)
    calls = {k: v for k, v in _diff(dict(standin.calls), calls_before).items() if k not in ("openid_config", "jwks")}
    return {
        "label": label,
        "status": status,
        "result": outcome,
        "latency_ms": _ms(elapsed),
        "marketplace": calls,
        "storage": wire,
        "reads": reads,
        "writes": writes,
        "repo": _diff(after["repo"], before["repo"]),
        "relay_storage": _diff(after["wire"]["relay"], before["wire"]["relay"]),
    }


# =================================================================================================
# 2. Reconciliation

DRIFT_KINDS = (("status", {"status": "Suspended"}), ("plan", {"plan_id": "premium"}), ("quantity", {"quantity": 7}))


def drift_subscriptions(standin, ids: list[str], count: int, offset: int = 0) -> dict[str, int]:
    """Silently change ``count`` subscriptions spread over ``ids`` (status, plan, quantity in turn)."""
    if count <= 0:
        return {}
    step = max(1, len(ids) // count)
    kinds: Counter = Counter()
    for index in range(count):
        subscription_id = ids[(offset + index * step) % len(ids)]
        kind, fields = DRIFT_KINDS[index % len(DRIFT_KINDS)]
        if kind == "quantity":
            fields = {"quantity": 7 + offset % 5}
        standin.set_subscription(subscription_id, **fields)
        kinds[kind] += 1
    return dict(kinds)


def _run_figures(run: dict[str, Any], subscriptions: int) -> dict[str, Any]:
    summary = run["summary"]
    return {
        "wall_seconds": round(run["wall_seconds"], 3),
        "ms_per_subscription": round(run["wall_seconds"] * 1000 / subscriptions, 4),
        "cpu_seconds": round(run["cpu_seconds"], 3),
        "phases_seconds": {k: round(v, 3) for k, v in run["phases"].items()},
        "marketplace_calls": summary["marketplace_calls"],
        "storage_reads": summary["storage_reads"],
        "storage_writes": summary["storage_writes"],
        "wire": run["wire"],
        "pages": summary["pages"],
        "subscriptions_seen": summary["subscriptions_seen"],
        "repairs": summary["repairs"],
        "repairs_total": summary["repairs_total"],
        "deferred": summary["deferred"],
        "flagged": summary["flagged_count"],
        "completed": summary["completed"],
        "stopped_reason": summary["stopped_reason"],
        "cpu_ms_per_subscription": round(run["cpu_seconds"] * 1000 / subscriptions, 4),
        "peak_heap_bytes": run["peak_heap_bytes"],
        "rss_kib_before": run["rss_kib_before"],
        "peak_rss_kib": run["peak_rss_kib"],
        "point_read_ms": run["point_read_ms"],
    }


def bench_reconcile(
    bench: BenchEnvironment, subscriptions: int = 1000, drift_ratio: float = 0.01, memory: bool = True
) -> dict[str, Any]:
    """Seed, record (setup run), drift 1 %, then measure: the drift run, a clean run, and (``memory``)
    a second drift run under tracemalloc. ``memory`` also gives the measured runs fresh app processes
    so their max RSS is theirs, not the setup run's."""
    standin = bench.standin
    bench.reset_standin()
    ids = standin.seed(subscriptions, plan_id="standard", quantity=5)
    env = bench.app_env()
    drifted = max(1, round(subscriptions * drift_ratio))
    result: dict[str, Any] = {"subscriptions": subscriptions, "drifted": drifted, "page_size": standin.page_size}
    skew = RECONCILE_CLOCK_SKEW_SECONDS

    with ExitStack() as stack:  # every app process is stopped, also on errors
        app = stack.enter_context(bench.app(env, f"reconcile-{subscriptions}-setup"))
        started = time.perf_counter()
        setup = app.call("reconcile")
        result["setup"] = {
            "seconds": round(time.perf_counter() - started, 2),
            "recorded": setup["summary"]["repairs"].get("recorded_new", 0),
            "storage_writes": setup["summary"]["storage_writes"],
            "relays_still_running": setup["relays_still_running"],
        }
        if memory:
            app.stop()
            app = stack.enter_context(bench.app(env, f"reconcile-{subscriptions}-drift"))
        result["drift_kinds"] = drift_subscriptions(standin, ids, drifted)
        probe_ids = random.Random(subscriptions).sample(ids, min(50, len(ids)))
        result["drift_run"] = _run_figures(app.call("reconcile", clock_skew_seconds=skew, probe_ids=probe_ids), subscriptions)
        result["clean_run"] = _run_figures(app.call("reconcile", clock_skew_seconds=skew), subscriptions)
        if memory:
            drift_subscriptions(standin, ids, drifted, offset=max(1, len(ids) // (2 * drifted)))
            app = stack.enter_context(bench.app(env, f"reconcile-{subscriptions}-memory"))
            result["memory_run"] = _run_figures(app.call("reconcile", clock_skew_seconds=skew, trace_memory=True), subscriptions)
        result["log"] = app.log_counts()
    return result


# =================================================================================================
# 3. Cold start

_IMPORT_LINE = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|( *)(\S+)\s*$")

LAZY_GROUPS = {
    "landing (shared.landing, shared.web)": "import shared.landing, shared.web",
    "webhook (shared.webhook, shared.webhook_auth)": "import shared.webhook, shared.webhook_auth",
    "services bundle (build_services: shared.services, marketplace, repository)": "import shared.services, shared.marketplace, shared.repository, shared.observability",
    "first landing invocation (all of its lazy imports)": "import shared.landing, shared.principal, shared.services, shared.marketplace, shared.repository, "
    "shared.observability, shared.web",
    "first webhook invocation (all of its lazy imports)": "import shared.http, shared.services, shared.webhook, shared.marketplace, shared.repository, "
    "shared.observability, shared.webhook_auth, shared.policy, shared.events, azure.storage.queue",
    "reconcile timer (all of its lazy imports)": "import shared.reconcile, shared.services, shared.marketplace, shared.repository, shared.observability",
}


def parse_importtime(stderr: str) -> list[tuple[str, int, int, int]]:
    """``-X importtime`` lines -> (module, self us, cumulative us, depth)."""
    rows = []
    for line in stderr.splitlines():
        match = _IMPORT_LINE.match(line)
        if match:
            rows.append((match.group(4), int(match.group(1)), int(match.group(2)), len(match.group(3)) // 2))
    return rows


def _importtime(code: str) -> list[tuple[str, int, int, int]]:
    python = sys.executable
    completed = subprocess.run(
        [python, "-X", "importtime", "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    if completed.returncode != 0:
        raise RuntimeError(f"import failed: {completed.stderr[-2000:]}")
    return parse_importtime(completed.stderr)


def bench_coldstart(runs: int = 5) -> dict[str, Any]:
    """Median import time of function_app in fresh interpreters, its top modules, and the lazy imports."""
    totals: list[int] = []
    own: list[int] = []
    per_module: dict[tuple[str, int], list[int]] = {}
    for _ in range(runs):
        rows = _importtime("import function_app")
        top = next(cumulative for name, _, cumulative, depth in rows if name == "function_app" and depth == 0)
        totals.append(top)
        functions_lib = sum(cumulative for name, _, cumulative, depth in rows if name == "azure.functions")
        own.append(top - functions_lib)
        for name, _, cumulative, depth in rows:
            per_module.setdefault((name, depth), []).append(cumulative)
    top_modules = sorted(
        ((statistics.median(v), name, depth) for (name, depth), v in per_module.items() if name != "function_app"), reverse=True
    )[:10]
    lazy, lazy_top = {}, {}
    for label, code in LAZY_GROUPS.items():
        samples: list[int] = []
        modules: dict[str, list[int]] = {}
        for _ in range(runs):
            rows = _importtime("import function_app\n" + code)
            index = next(i for i, row in enumerate(rows) if row[0] == "function_app" and row[3] == 0)
            later = rows[index + 1 :]
            samples.append(sum(cumulative for _, _, cumulative, depth in later if depth == 0))
            for name, _, cumulative, _depth in later:
                if not name.startswith("shared"):
                    modules.setdefault(name, []).append(cumulative)
        lazy[label] = round(statistics.median(samples) / 1000, 1)
        heaviest = sorted(((statistics.median(v), name) for name, v in modules.items()), reverse=True)
        heaviest_roots: list[str] = []
        seen: set[str] = set()
        for us, name in heaviest:  # the heaviest third-party packages, not their submodules
            root = name.split(".")[0] if not name.startswith("azure.") else ".".join(name.split(".")[:2])
            if root not in seen:
                seen.add(root)
                heaviest_roots.append(f"{root} {us / 1000:.0f}")
            if len(heaviest_roots) == 3:
                break
        lazy_top[label] = ", ".join(heaviest_roots)
    interpreter = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import function_app"], cwd=ROOT, check=True, timeout=120)
        interpreter.append(time.perf_counter() - started)
    return {
        "runs": runs,
        "import_ms_median": round(statistics.median(totals) / 1000, 1),
        "import_ms_all": [round(t / 1000, 1) for t in totals],
        "import_ms_without_azure_functions": round(statistics.median(own) / 1000, 1),
        "process_ms_median": _ms(statistics.median(interpreter)),
        "top_modules": [
            {"module": name, "depth": depth, "cumulative_ms": round(us / 1000, 1)} for us, name, depth in top_modules
        ],
        "lazy_imports_ms": lazy,
        "lazy_imports_heaviest": lazy_top,
    }


# =================================================================================================
# 6. Operator console

CONSOLE_USER = "Olivia Operator <olivia@contoso.example>"
CONSOLE_ROLES = ("Console.Operator",)  # an operator: the pages issue their forms' CSRF tokens, as for real staff
CONSOLE_RARE = 5  # purchases waiting for an operator: the rare-filter case
CONSOLE_RARE_STATUS = "PendingActivation"
CONSOLE_SECOND_OFFER = "contoso-analytics"
CONSOLE_SEARCH_POSITION = 0.4  # the text search's target: this far into Table storage's order (PartitionKey)
CONSOLE_ROW_MARKERS = {
    "list": ('data-testid="subscription-row"',),
    "subscription": ('data-testid="history-entry"',),
    "attention": ('data-testid="attention-activation"', 'data-testid="attention-flagged"', 'data-testid="attention-flag"'),
    "runs": ('data-testid="run"',),
}
_NEXT_PAGE = re.compile(r'data-testid="next-page" href="([^"]+)"')


def console_mix(subscriptions: int, offer_id: str) -> list[tuple[str, int, str, str, str]]:
    """(group, count, status at Microsoft, offer, plan): most Subscribed over three plans and a second
    offer, 10 % Suspended, 5 % Unsubscribed, a few bought and not activated yet (of which
    CONSOLE_RARE will wait for an operator)."""
    waiting = CONSOLE_RARE + max(5, subscriptions // 500)
    suspended, unsubscribed = subscriptions // 10, subscriptions // 20
    subscribed = subscriptions - waiting - suspended - unsubscribed
    premium = second_offer = subscribed // 10
    standard = subscribed * 35 // 100
    return [
        ("Subscribed (basic)", subscribed - premium - second_offer - standard, "Subscribed", offer_id, "basic"),
        ("Subscribed (standard)", standard, "Subscribed", offer_id, "standard"),
        ("Subscribed (premium)", premium, "Subscribed", offer_id, "premium"),
        (f"Subscribed ({CONSOLE_SECOND_OFFER})", second_offer, "Subscribed", CONSOLE_SECOND_OFFER, "standard"),
        ("Suspended", suspended, "Suspended", offer_id, "standard"),
        ("Unsubscribed", unsubscribed, "Unsubscribed", offer_id, "basic"),
        ("PendingFulfillmentStart", waiting, "PendingFulfillmentStart", offer_id, "standard"),
    ]


def _rows_shown(marker_kind: str, html: str) -> int:
    return sum(html.count(marker) for marker in CONSOLE_ROW_MARKERS[marker_kind])


def _console_load(app: AppProcess, session, url: str, prefix: str = "") -> dict[str, Any]:
    """One page view, alone: its status, wall time, page, and what the app sent to storage (by kind, and by
    table without the tables' ``prefix``) and to Microsoft for it."""
    before = app.call("snapshot")
    started = time.perf_counter()
    response = session.get(url, timeout=REQUEST_TIMEOUT)
    elapsed = time.perf_counter() - started
    after = app.call("snapshot")
    return {
        "status": response.status_code,
        "seconds": elapsed,
        "html": response.text,
        "storage": _storage_counts(after, before),
        "by_table": {
            key.removeprefix(prefix): count
            for key, count in _diff(after["wire_targets"]["app"], before["wire_targets"]["app"]).items()
        },
        "relay": _storage_counts(after, before, "relay"),
        "marketplace": _diff(after["marketplace"], before["marketplace"]),
    }


def _per_load(counts: list[dict[str, int]]) -> tuple[dict[str, float], dict[str, list[int]]]:
    """Mean per load by key, and the keys whose count varied between loads ([min, max])."""
    keys = sorted(set().union(*counts)) if counts else []
    means = {k: _per(sum(c.get(k, 0) for c in counts), len(counts)) for k in keys}
    varied = {k: [min(c.get(k, 0) for c in counts), max(c.get(k, 0) for c in counts)] for k in keys}
    return means, {k: v for k, v in varied.items() if v[0] != v[1]}


def _table_rows(env: dict[str, str]) -> dict[str, int]:
    """The subscriptions table's rows by kind (state, history, event, op...), read from this process
    (outside the app's counts): what a query that filters on other columns than the keys runs over."""
    from azure.data.tables import TableClient

    with TableClient.from_connection_string(env["TABLES_CONNECTION_STRING"], env["TABLES_PREFIX"] + "subscriptions") as table:
        return dict(Counter(row["RowKey"].split("|", 1)[0] for row in table.list_entities(select=["RowKey"])))


def _scan_probe(env: dict[str, str], limit: int, repeats: int = 3) -> dict[str, float]:
    """What reading ``limit`` state rows costs the storage SDK alone (in this process, best of ``repeats``):
    every column, and only the four columns the text search reads (``$select``)."""
    from itertools import islice

    from azure.data.tables import TableClient

    from shared.repository import SEARCHED_COLUMNS as searched

    out: dict[str, float] = {"rows": 0}
    with TableClient.from_connection_string(env["TABLES_CONNECTION_STRING"], env["TABLES_PREFIX"] + "subscriptions") as table:
        for label, select in (("all_columns_ms", None), ("select_searched_ms", searched)):
            best = math.inf
            for _ in range(repeats):
                started = time.perf_counter()
                rows = sum(1 for _ in islice(table.query_entities("RowKey eq 'state'", select=select), limit))
                best = min(best, time.perf_counter() - started)
            out[label], out["rows"] = _ms(best), rows
    return out


def bench_console(bench: BenchEnvironment, subscriptions: int = 10_000, loads: int = 20) -> dict[str, Any]:
    """``subscriptions`` recorded by a reconciliation run (a status mix, three plans, two offers), counted by a
    second run; then each console page loaded ``loads`` times, one at a time, over HTTP by a signed-in operator."""
    from html import unescape
    from urllib.parse import urlencode

    from devtools.marketplace_standin import DEFAULT_OFFER_ID

    standin = bench.standin
    bench.reset_standin()
    groups: dict[str, list[str]] = {}
    for group, count, status, offer, plan in console_mix(subscriptions, DEFAULT_OFFER_ID):
        groups[group] = standin.seed(count, status=status, offer_id=offer, plan_id=plan, quantity=None if plan == "basic" else 5)
    in_key_order = sorted(sid for ids in groups.values() for sid in ids)  # PartitionKey = the subscription id
    search_target = in_key_order[int(len(in_key_order) * CONSOLE_SEARCH_POSITION)]
    search_email = standin.get_subscription(search_target)["purchaser"]["emailId"]
    detail_id = groups["Suspended"][0]
    env = bench.app_env(ACTIVATION_MODE="manual")
    prefix = env["TABLES_PREFIX"]
    result: dict[str, Any] = {
        "subscriptions": subscriptions,
        "loads": loads,
        "mix": {group: len(ids) for group, ids in groups.items()},
        "search_position": CONSOLE_SEARCH_POSITION,
    }
    with bench.app(env, "console") as app:
        url = app.call("serve")
        started = time.perf_counter()
        setup = app.call("reconcile")  # records every subscription (not measured)
        result["setup_seconds"] = round(time.perf_counter() - started, 2)
        result["setup_recorded"] = setup["summary"]["repairs"].get("recorded_new", 0)
        # Manual activation mode: these buyers confirmed on the landing page; the purchases wait for an operator.
        result["activation_requests"] = app.call("request_activation", ids=groups["PendingFulfillmentStart"][:CONSOLE_RARE])
        counted = app.call("reconcile")  # a run counts what its scan found: the list page's counts
        result["counts"] = counted["summary"]["by_status"]
        result["counting_run_seconds"] = round(counted["wall_seconds"], 2)
        result["counting_run_flagged"] = counted["summary"]["flagged_count"]
        app.call("sign_in", user=CONSOLE_USER, tenant_id=standin.tenant_id, roles=list(CONSOLE_ROLES))

        session = _new_session()
        first = _console_load(app, session, url + "/api/console", prefix)  # the process's first page view (not in the figures)
        result["first_view"] = {"status": first["status"], "ms": _ms(first["seconds"])}
        cursor = _NEXT_PAGE.search(first["html"])
        next_path = "/api/console" + unescape(cursor.group(1)) if cursor else ""
        rare = CONSOLE_RARE_STATUS
        kinds = [
            ("list_first", "List, first page (no filter)", "/api/console", "list"),
            ("list_next", "List, next page (the first page's cursor)", next_path, "list"),
            ("status_common", "Status filter, common (Suspended)", "/api/console?status=Suspended", "list"),
            ("status_rare", f"Status filter, rare ({rare})", f"/api/console?status={rare}", "list"),
            ("plan", "Plan filter (premium)", "/api/console?plan=premium", "list"),
            ("offer", f"Offer filter ({CONSOLE_SECOND_OFFER})", f"/api/console?offer={CONSOLE_SECOND_OFFER}", "list"),
            ("search_id", "Search by subscription id", "/api/console?" + urlencode({"q": search_target}), "list"),
            ("search_text", "Text search (a purchaser's e-mail)", "/api/console?" + urlencode({"q": search_email}), "list"),
            ("subscription", "Subscription page (a Suspended one)", f"/api/console/subscriptions/{detail_id}", "subscription"),
            ("attention", "Needs attention", "/api/console/attention", "attention"),
            ("runs", "Reconciliation runs", "/api/console/reconcile", "runs"),
        ]
        pages = []
        for key, label, path, marker_kind in kinds:
            if not path:
                pages.append({"key": key, "label": label, "missing": True})
                continue
            warm = _console_load(app, session, url + path, prefix)  # first use of the page: template compiled, imports
            views = [_console_load(app, session, url + path, prefix) for _ in range(loads)]
            seconds = [v["seconds"] for v in views]
            rows = [_rows_shown(marker_kind, v["html"]) for v in views]
            storage, storage_varied = _per_load([v["storage"] for v in views])
            by_table, _ = _per_load([v["by_table"] for v in views])
            relay, _ = _per_load([v["relay"] for v in views])
            marketplace, _ = _per_load([v["marketplace"] for v in views])
            pages.append(
                {
                    "key": key,
                    "label": label,
                    "statuses": dict(Counter(str(v["status"]) for v in views)),
                    "rows": rows[-1],
                    "rows_range": [min(rows), max(rows)],
                    "first_use_ms": _ms(warm["seconds"]),
                    "latency_ms": {
                        "p50": _ms(percentile(seconds, 50)),
                        "p95": _ms(percentile(seconds, 95)),
                        "max": _ms(max(seconds)),
                        "mean": _ms(statistics.fmean(seconds)),
                    },
                    "storage": storage,
                    "storage_varied": storage_varied,
                    "by_table": by_table,
                    "storage_reads": round(sum(storage.get(k, 0) for k in STORAGE_READ_KINDS), 2),
                    "storage_writes": round(sum(storage.get(k, 0) for k in STORAGE_WRITE_KINDS), 2),
                    "relay": relay,
                    "marketplace": marketplace,
                    "marketplace_calls": round(sum(marketplace.values()), 2),
                    "next_page": 'data-testid="next-page"' in views[-1]["html"],
                    "scan_note": "Searched the first" in views[-1]["html"],
                    "kib": round(len(views[-1]["html"].encode()) / 1024, 1),
                }
            )
        session.close()
        result["pages"] = pages
        result["log"] = app.log_counts()
    result["table_rows"] = _table_rows(env)
    from shared.console import SEARCH_SCAN_LIMIT

    result["scan_probe"] = _scan_probe(env, SEARCH_SCAN_LIMIT)
    return result


def _fmt_per_view(counts: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:g}" for key, value in sorted(counts.items())) or "none"


def _console_pages(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["key"]: p for p in c["pages"] if not p.get("missing")}


def _render_console(c: dict[str, Any]) -> list[str]:
    from shared.console import SEARCH_SCAN_LIMIT
    from shared.repository import MAX_PAGE_REQUESTS

    pages = _console_pages(c)
    n = c["subscriptions"]
    total_rows = sum(c["table_rows"].values())
    lines = [
        "## 6. Operator console (page loads)",
        "",
        f"{n:,} subscriptions at Microsoft's stand-in ({', '.join(f'{g} {k:,}' for g, k in c['mix'].items())}),"
        f" recorded by a reconciliation run (not measured, {c['setup_seconds']} s). {CONSOLE_RARE} of the purchases not"
        f" activated yet then wait for an operator (`ACTIVATION_MODE=manual`: what the landing page records when the buyer"
        " confirms), and a second run counts the records by status, as the list page shows them:"
        f" {_fmt_counts(c['counts'])}. An operator (App Service Authentication's principal, publisher's tenant, app role"
        f" `Console.Operator`) then loads each page {c['loads']} times, one view at a time, over HTTP through the dev host;"
        " each view's storage requests (the app process's wire counter, by class and by table) and Marketplace calls are"
        " counted alone. Each page had one view before the measured ones (its first use: template compiled, imports; the"
        f" process's very first page view took {c['first_view']['ms']} ms). A fresh Azurite held only this section's tables;"
        f" the subscriptions table had {total_rows:,} rows ({_fmt_counts(c['table_rows'])}).",
        "",
        "| Page | Answers | Rows shown | p50 ms | p95 ms | max ms | Storage requests per view | By table | Marketplace calls per view |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in c["pages"]:
        if p.get("missing"):
            lines.append(f"| {p['label']} | not measured: the first page had no next-page link | | | | | | | |")
            continue
        lat = p["latency_ms"]
        rows = str(p["rows"]) if p["rows_range"][0] == p["rows_range"][1] else "{}-{}".format(*p["rows_range"])
        varied = "".join(f" ({key} varied {low}-{high})" for key, (low, high) in p["storage_varied"].items())
        lines.append(
            f"| {p['label']} | {_fmt_counts(p['statuses'])} | {rows} | {lat['p50']} | {lat['p95']} | {lat['max']} |"
            f" {_fmt_per_view(p['storage'])}{varied} | {_fmt_per_view(p['by_table'])} | {_fmt_per_view(p['marketplace'])} |"
        )
    writes = sum(p["storage_writes"] for p in pages.values())
    lines += [
        "",
        "Rows shown: subscriptions (list pages), history entries (subscription page), waiting activations + flags"
        " (Needs attention), runs (reconciliation page). Tables: `subscriptions` (state, history, markers, outbox; one"
        " partition per subscription), `runs` (run summaries, newest first), `usage` (metered usage by hour).",
        "",
    ]
    first, following = pages.get("list_first"), pages.get("list_next")
    if first:
        lines += [
            f"**Why the first page is cheap.** One filtered query of the subscriptions table (`RowKey eq 'state'`, plus"
            " `Status` / `OfferId` / `PlanId` when filtered; 50 rows asked, so the service stops after 50 matches) and one"
            f" read of the last run summary: {_fmt_per_view(first['by_table'])} per view at {n:,} subscriptions, the same"
            " at any size (the smoke test checks it at 200). The counts per status are not counted per view: they are the"
            " `by_status` of the last reconciliation run, which reads every record anyway, shown with the run's time."
            + (
                f" The next page costs the same ({_fmt_per_view(following['by_table'])}, p50 {following['latency_ms']['p50']} ms):"
                " its link carries Table storage's continuation token as the cursor, so the service resumes where the"
                " first page stopped; nothing before it is read again, however deep the page."
                if following
                else ""
            )
            + " A filter is the same one query; a search by subscription id is one point read (+ the run summary)."
            f" No page view wrote anything ({writes:g} storage writes in all).",
            "",
        ]
    text, detail, rare = pages.get("search_text"), pages.get("subscription"), pages.get("status_rare")
    costs = []
    if text:
        text_pages = text["by_table"].get("subscriptions query_page", 0)
        costs.append(
            "The text search (name, purchaser, beneficiary) has no index: it reads the four searched columns of state rows"
            f" (`$select`) in key order until 50 match or {SEARCH_SCAN_LIMIT:,} were read, then each match whole (one point"
            f" read a match): {_fmt_per_view(text['by_table'])}. Searching one purchaser's e-mail (a subscription"
            f" {int(c['search_position'] * 100)} % into the key order) read {text_pages:g} query page(s) of up to 1,000 rows"
            f" (p50 {text['latency_ms']['p50']} ms against {first['latency_ms']['p50'] if first else '?'} ms for the first"
            f" page), {'found it' if text['rows'] else 'did not find it'}, and"
            + (
                f" said it searched only the first {SEARCH_SCAN_LIMIT:,} records."
                if text["scan_note"]
                else " read to the end of the table."
            )
            + f" A match beyond the first {SEARCH_SCAN_LIMIT:,} records (in id order) is not found by text; the id search is"
            " exact and costs one point read."
        )
    if detail:
        usage_queries = detail["by_table"].get("usage query_page", 0)
        costs.append(
            f"The subscription page makes {sum(detail['storage'].values()):g} storage requests and"
            f" {detail['marketplace_calls']:g} Marketplace call ({_fmt_per_view(detail['marketplace'])}): {usage_queries:g}"
            " queries for the usage of the last 24 hours (one per hour shard: the usage table is laid out by hour, not by"
            " subscription; they run concurrently, and for a plan without metering dimensions too, since its plan may"
            " have changed within the 24 hours),"
            f" {detail['by_table'].get('subscriptions query_page', 0):g} range queries in the subscription's own partition"
            " (history, lifecycle events, waiting events, webhook operation markers, publisher operations) and the point"
            f" read of its record; p50 {detail['latency_ms']['p50']} ms. The stand-in answers Get Subscription at once;"
            " Microsoft's own latency adds to this page only."
        )
    attention = pages.get("attention")
    if attention:
        costs.append(
            f"Needs attention: {_fmt_per_view(attention['by_table'])} (the two activation statuses and the Flagged filter,"
            " one filtered page each; the last run summary; the usage table's flagged partition)."
        )
    if costs:
        lines += ["**What costs more.** " + " ".join(costs), ""]
    if rare and first:
        lines += [
            f"**A rare filter.** `Status eq '{CONSOLE_RARE_STATUS}'` matches {rare['rows']} of {n:,}:"
            f" {_fmt_per_view(rare['by_table'])} per view, p50 {rare['latency_ms']['p50']} ms (first page"
            f" {first['latency_ms']['p50']} ms, with {first['rows']} rows to parse and render). Azurite answers a filtered query in one response however many rows it read,"
            f" so for this page it evaluated the filter over the whole table ({total_rows:,} rows) in that one request. Table"
            " storage may answer such a query short (fewer matches and a continuation token: after 5 s of work or at a"
            f" partition range boundary); `page_records` then joins at most {MAX_PAGE_REQUESTS} answers into one page. How many a page"
            " needs depends on the storage account's partition ranges and cannot be measured on Azurite.",
            "",
        ]
    log_note = ""
    if c["log"].get("WARNING") and c.get("counting_run_flagged"):
        log_note = (
            f" (a run that flags something logs its summary as a warning: the counting run flagged the"
            f" {c['counting_run_flagged']} purchases waiting for an operator)"
        )
    lines += [f"App log: {_fmt_counts(c['log'])}{log_note}.", ""]
    return lines


# =================================================================================================
# Report


def _git_state() -> str:
    """The commit measured, and whether the app's code had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "shared", "function_app.py", "webhook", "landing_page", "reconcile_timer"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = sorted({line[3:].strip() for line in dirty if line.strip()})
    return f"{head or 'unknown'}" + (f" + uncommitted changes in {', '.join(changed)}" if changed else " (clean)")


def machine_info() -> dict[str, str]:
    return {
        "code": _git_state(),
        "nproc": str(os.cpu_count()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


def _mib(kib: int | None) -> str:
    return "?" if kib is None else f"{kib / 1024:.0f}"


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def print_summary(results: dict[str, Any]) -> None:
    webhook = results.get("webhook")
    if webhook:
        lat = webhook["latency_ms"]
        print(
            f"webhook: {webhook['events']} events / {webhook['senders']} senders in {webhook['burst_seconds']} s "
            f"({webhook['throughput_per_second']}/s): p50 {lat['p50']} ms, p99 {lat['p99']} ms, errors {webhook['errors']}"
        )
        print(
            f"  per event: marketplace {webhook['marketplace_per_event']}, storage reads {webhook['storage_reads_per_event']}, "
            f"writes {webhook['storage_writes_per_event']} (+ relay {webhook['relay_storage_per_event']} in background)"
        )
        print(
            f"  JWT: {webhook['auth_alone_ms']['mean']} ms alone = {webhook['auth_alone_share_of_handle']:.2%} of mean handling "
            f"({webhook['handle_mean_ms']} ms); in the burst {webhook['auth_in_burst_share']:.2%}; app CPU per event "
            f"{webhook['app_cpu_ms_per_event']} ms (request thread {webhook['handle_cpu_ms_per_event']} ms)"
        )
        for probe in webhook["probes"]:
            print(
                f"  probe {probe['label']:<24} reads {probe['reads']} writes {probe['writes']} "
                f"marketplace {_fmt_counts(probe['marketplace'])}"
            )
    for run in results.get("reconcile", []):
        drift, clean = run["drift_run"], run["clean_run"]
        print(
            f"reconcile {run['subscriptions']}: setup {run['setup']['seconds']} s; drift run {drift['wall_seconds']} s "
            f"({drift['ms_per_subscription']} ms/sub), marketplace {drift['marketplace_calls']}, reads {drift['storage_reads']}, "
            f"writes {drift['storage_writes']} (drifted {run['drifted']}), repairs {drift['repairs_total']}; "
            f"clean run {clean['wall_seconds']} s, writes {clean['storage_writes']}"
        )
        if "memory_run" in run:
            mem = run["memory_run"]
            print(
                f"  peak heap {mem['peak_heap_bytes'] / 1e6:.1f} MB; peak RSS {_mib(drift['peak_rss_kib'])} MiB "
                f"(before the run {_mib(drift['rss_kib_before'])} MiB)"
            )
    pub = results.get("publisher")
    if pub:
        print(
            f"publisher: {pub['changes']} changes / {pub['callers']} callers: {_fmt_counts(pub['statuses'])}, 202 p50"
            f" {pub['latency_ms']['p50']} ms p99 {pub['latency_ms']['p99']} ms; PATCHes {pub['standin_patches']}, polls"
            f" {pub['follower_polls']}, marketplace/change {pub['marketplace_per_change']}, storage/change"
            f" {pub['storage_reads_per_change']} r {pub['storage_writes_per_change']} w; endings {_fmt_counts(pub['endings'])}"
        )
    met = results.get("metering")
    if met:
        print(
            f"metering: {met['events']} events / {met['reporters']} reporters, {met['requests']} requests: {_fmt_counts(met['statuses'])},"
            f" accepted {met['accepted_events']}, {met['events_per_second']} events/s, call p99 {met['call_latency_ms']['p99']} ms,"
            f" storage/event {met['storage_writes_per_event']} w {met['storage_reads_per_event']} r; emission"
            f" {met['emission_seconds']} s, {met['emission_calls']} calls (minimum {met['emission_minimum_calls']}),"
            f" {met['microsoft_events']} events at Microsoft; reported {met['reported_total']} accepted {met['accepted_total']}"
            f" exact={met['exact']}; second run {met['second_run_calls']} calls"
        )
    con = results.get("console")
    if con:
        print(
            f"console: {con['subscriptions']} subscriptions (setup {con['setup_seconds']} s), counts {_fmt_counts(con['counts'])};"
            f" {con['loads']} loads per page"
        )
        for page in con["pages"]:
            if page.get("missing"):
                print(f"  {page['label']:<44} not measured (no next-page link)")
                continue
            lat = page["latency_ms"]
            print(
                f"  {page['label']:<44} {_fmt_counts(page['statuses'])}, rows {page['rows']}, p50 {lat['p50']} ms p95 {lat['p95']} ms,"
                f" storage {_fmt_counts(page['storage'])}, marketplace {_fmt_counts(page['marketplace'])}"
            )
    cold = results.get("coldstart")
    if cold:
        print(
            f"cold start: import function_app {cold['import_ms_median']} ms median of {cold['runs']} "
            f"(without azure.functions {cold['import_ms_without_azure_functions']} ms)"
        )
        for label, ms in cold["lazy_imports_ms"].items():
            print(f"  lazy {label}: {ms} ms")


def render_markdown(results: dict[str, Any], machine: dict[str, str], argv: list[str]) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `devtools/bench.py` (`make bench`). Figures are from one run on the machine below;",
        "rerun to compare. Everything ran on 127.0.0.1: Azurite (in memory), the marketplace stand-in and",
        "the app in its own process (the dev host serving the real `function_app.app`).",
        "",
        "## Machine and reproduction",
        "",
        f"- Date: {machine['date']}; code: {machine.get('code', 'unknown')}",
        f"- CPUs (nproc): {machine['nproc']}; Python {machine['python']}; {machine['platform']}",
        f"- Load average when the run finished: {machine['load_average']} (the machine was shared with other work;"
        " latencies and wall times carry that noise, call counts do not)",
        f"- Command: `{' '.join(['python -m devtools.bench', *_shown_args(argv)]).strip()}` (`make bench` = no arguments;"
        " `--quick` = 100 webhooks and 500 subscriptions, printed only; `--only webhook|publisher|queues|metering|readback|reconcile|coldstart|console`)",
        "",
    ]
    webhook = results.get("webhook")
    if webhook:
        lines += _render_webhook(webhook)
    if results.get("publisher"):
        lines += _render_publisher(results["publisher"])
    if results.get("reconcile"):
        lines += _render_reconcile(results["reconcile"], results.get("reconcile_note", ""))
    if results.get("coldstart"):
        lines += _render_coldstart(results["coldstart"])
    if results.get("metering"):
        lines += _render_metering(results["metering"])
    if results.get("metering_variant"):
        lines += _render_metering_variant(results["metering_variant"])
    if results.get("readback"):
        lines += _render_readback(results["readback"])
    if results.get("console"):
        lines += _render_console(results["console"])
    if results.get("queues"):
        lines += _render_queues(results["queues"])
    if results.get("interpretation"):
        lines += ["## Against the targets", ""] + [f"- {item}" for item in results["interpretation"]] + [""]
    if results.get("findings"):
        lines += ["## Findings (bottlenecks and inefficiencies measured above)", ""]
        lines += [f"- {item}" for item in results["findings"]] + [""]
    return "\n".join(lines).rstrip() + "\n"


def _shown_args(argv: list[str]) -> list[str]:
    """The arguments that change what is measured (not where the report goes)."""
    shown, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--output", "--json"):
            skip = True
            continue
        if arg.startswith(("--output=", "--json=")):
            continue
        shown.append(arg)
    return shown


def _render_webhook(w: dict[str, Any]) -> list[str]:
    lat = w["latency_ms"]
    probes = w["probes"]
    lines = [
        "## 1. Webhook burst",
        "",
        f"{w['events']} distinct signed webhooks (one per subscription; mix: "
        + ", ".join(f"{a} {int(s * 100)} %" for a, s in WEBHOOK_MIX)
        + f") POSTed by {w['senders']} concurrent senders (`requests` sessions, a fresh stand-in token each)"
        " through the dev host, against Azurite and the stand-in. The signing keys were cached by the probes"
        " that ran before the burst.",
        "",
        "| Figure | Value |",
        "|---|---|",
        f"| Burst wall time | {w['burst_seconds']} s ({w['throughput_per_second']} events/s) |",
        f"| Latency p50 / p90 / p99 / max | {lat['p50']} / {lat['p90']} / {lat['p99']} / {lat['max']} ms |",
        f"| Errors (non-200 or no answer) | {w['errors']} (statuses: {_fmt_counts(w['statuses'])})"
        f"{'; ' + _fmt_counts(w['error_kinds']) if w.get('error_kinds') else ''} |",
        f"| Results | {_fmt_counts(w['results'])} |",
        f"| Operations PATCHed (InProgress events) | {w['patches']} of {w['answered_events']} ({_fmt_counts(w['patch_statuses'])}) |",
        f"| Marketplace calls | {_fmt_counts(w['marketplace_calls'])} = {w['marketplace_per_event']} per event |",
        f"| Storage requests (request path) | {_fmt_counts(w['storage_wire'])} |",
        f"| Storage reads / writes per event | {w['storage_reads_per_event']} / {w['storage_writes_per_event']}"
        f" (repository metrics: {w['repo_reads_per_event']} / {w['repo_writes_per_event']}) |",
        f"| Event delivery (the delivery jobs, run as `event_delivery` runs them), storage requests | {_fmt_counts(w['relay_storage_wire'])} = {w['relay_storage_per_event']} per event |",
        f"| App process CPU per event | {w['app_cpu_ms_per_event']} ms in all (request thread in `handle_webhook`:"
        f" {w['handle_cpu_ms_per_event']} ms; the rest is the dev host's HTTP handling and the delivery jobs) |",
        f"| Mean handling time in the app (`handle_webhook`) | {w['handle_mean_ms']} ms |",
        f"| JWT validation alone, keys cached ({w['auth_alone_ms']['samples']} calls) | mean {w['auth_alone_ms']['mean']} ms,"
        f" p50 {w['auth_alone_ms']['p50']} ms, p99 {w['auth_alone_ms']['p99']} ms |",
        f"| JWT share of handling time | {w['auth_alone_share_of_handle']:.2%} (alone vs mean handling);"
        f" {w['auth_in_burst_share']:.2%} measured inside the burst; {w['auth_alone_share_of_latency']:.2%} of mean latency;"
        f" {w['auth_alone_share_of_cpu']:.2%} of the CPU per event |",
        f"| Reconciliation right after the burst | repairs {_fmt_counts(w['consistency_repairs'])}, flagged {w['consistency_flagged']} |",
        f"| App log | {_fmt_counts(w['log'])} |",
        "",
        "Design minimum per event vs observed (probes: one event at a time, so each count is exact):",
        "",
        "| Per event | Design minimum | Observed |",
        "|---|---|---|",
        f"| Marketplace, plain event (Suspend, Renew, Unsubscribe) | {MIN_MARKETPLACE_PER_EVENT['plain']} (Get Operation) |"
        f" {_probe_calls(probes, 'Suspend')} |",
        f"| Marketplace, InProgress event (ChangePlan, ChangeQuantity, Reinstate) | {MIN_MARKETPLACE_PER_EVENT['answered']}"
        f" (Get Operation + PATCH) | {_probe_calls(probes, 'ChangeQuantity')} |",
        f"| Storage reads, new event | {MIN_STORAGE_READS} (marker, state); {BRIEF_STORAGE_READS} with the marker read-back |"
        f" {_probe_field(probes, 'Suspend', 'reads')} plain, {_probe_field(probes, 'ChangeQuantity', 'reads')} InProgress |",
        f"| Storage writes, new event | {MIN_STORAGE_WRITES} (marker create, one transaction) |"
        f" {_probe_field(probes, 'Suspend', 'writes')} plain, {_probe_field(probes, 'ChangeQuantity', 'writes')} InProgress |",
        f"| Redelivery of a settled event | 1 storage read, no Marketplace call | {_probe_field(probes, 'duplicate (redelivery)', 'reads')}"
        f" read(s), {_probe_calls(probes, 'duplicate (redelivery)')} |",
        "",
        "Per event, measured alone (storage = HTTP requests the app sent; delivery = its delivery job's):",
        "",
        "| Event | Result | Marketplace calls | Storage reads | Storage writes | Storage requests | Delivery job |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in probes:
        lines.append(
            f"| {p['label']} | {p['status']} {p['result']} | {_fmt_counts(p['marketplace'])} | {p['reads']} | {p['writes']}"
            f" | {_fmt_counts(p['storage'])} | {_fmt_counts(p['relay_storage'])} |"
        )
    lines += [""]
    return lines


def _probe_calls(probes: list[dict[str, Any]], label: str) -> str:
    probe = next((p for p in probes if p["label"] == label), None)
    if probe is None:
        return "?"
    return f"{sum(probe['marketplace'].values())} ({_fmt_counts(probe['marketplace'])})"


def _probe_field(probes: list[dict[str, Any]], label: str, name: str) -> str:
    probe = next((p for p in probes if p["label"] == label), None)
    return str(probe[name]) if probe else "?"


def _render_reconcile(runs: list[dict[str, Any]], note: str) -> list[str]:
    lines = [
        "## 3. Reconciliation",
        "",
        "N subscriptions held by the stand-in (List subscriptions pages of "
        f"{runs[0]['page_size']}); a setup run records them (not measured), then 1 % drift is made silently"
        " (status Suspended, plan, quantity in turn) and the next run is measured (*drift run*), then a run with"
        " nothing to do (*clean run*). The measured runs run the reconciler's clock "
        f"{RECONCILE_CLOCK_SKEW_SECONDS} s ahead so the setup run's records are outside the 2-minute settle window."
        " Memory: peak Python heap by `tracemalloc` in a separate drift run (another 1 %) in a fresh app process"
        " (tracemalloc slows that run down; its time is not used); RSS of the app process (a fresh one) that ran the"
        " drift run, from /proc (`VmRSS` before, `VmHWM` reset before and read after the run; `ru_maxrss` is useless"
        " here because Linux keeps it across `execve`, so a child starts with its parent's peak).",
        "",
    ]
    if note:
        lines += [note, ""]
    header = "| Figure | " + " | ".join(f"N = {r['subscriptions']:,}" for r in runs) + " |"
    lines += [header, "|---|" + "---|" * len(runs)]

    def row(label: str, fn: Callable[[dict[str, Any]], Any]) -> None:
        lines.append(f"| {label} | " + " | ".join(str(fn(r)) for r in runs) + " |")

    row("Setup run (records N, not measured)", lambda r: f"{r['setup']['seconds']} s")
    row("Drifted subscriptions", lambda r: f"{r['drifted']} ({_fmt_counts(r['drift_kinds'])})")
    row("Drift run: wall time", lambda r: f"{r['drift_run']['wall_seconds']} s")
    row("Drift run: time per subscription", lambda r: f"{r['drift_run']['ms_per_subscription']} ms")
    row("Drift run: phases (s)", lambda r: _fmt_counts(r["drift_run"]["phases_seconds"]))
    row(
        "Drift run: app CPU (per subscription)",
        lambda r: f"{r['drift_run']['cpu_seconds']} s ({r['drift_run']['cpu_ms_per_subscription']} ms)",
    )
    row("Storage point read alone, after the run (mean of 50)", lambda r: f"{r['drift_run']['point_read_ms']} ms")
    row("Drift run: Marketplace calls", lambda r: f"{r['drift_run']['marketplace_calls']} ({r['drift_run']['pages']} list pages)")
    row("Drift run: storage reads", lambda r: r["drift_run"]["storage_reads"])
    row(
        "Drift run: storage writes (target drifted + 1)",
        lambda r: f"{r['drift_run']['storage_writes']} (target {r['drifted'] + 1})",
    )
    row("Drift run: storage requests", lambda r: _fmt_counts(r["drift_run"]["wire"]))
    row("Drift run: repairs / deferred", lambda r: f"{_fmt_counts(r['drift_run']['repairs'])} / {r['drift_run']['deferred']}")
    row("Clean run: wall time", lambda r: f"{r['clean_run']['wall_seconds']} s ({r['clean_run']['ms_per_subscription']} ms/sub)")
    row(
        "Clean run: app CPU (per subscription)",
        lambda r: f"{r['clean_run']['cpu_seconds']} s ({r['clean_run']['cpu_ms_per_subscription']} ms)",
    )
    row("Clean run: phases (s)", lambda r: _fmt_counts(r["clean_run"]["phases_seconds"]))
    row("Clean run: Marketplace calls", lambda r: r["clean_run"]["marketplace_calls"])
    row(
        "Clean run: storage reads / writes (target writes 1)",
        lambda r: f"{r['clean_run']['storage_reads']} / {r['clean_run']['storage_writes']}",
    )
    if all("memory_run" in r for r in runs):
        row(
            "Peak Python heap during a drift run (tracemalloc)",
            lambda r: (
                f"{r['memory_run']['peak_heap_bytes'] / 1e6:.1f} MB"
                f" ({r['memory_run']['peak_heap_bytes'] / r['subscriptions']:.0f} B/sub)"
            ),
        )
        row(
            "RSS of the app process before the drift run → its peak during the run",
            lambda r: f"{_mib(r['drift_run']['rss_kib_before'])} → {_mib(r['drift_run']['peak_rss_kib'])} MiB",
        )
        row("Memory run: writes / repairs", lambda r: f"{r['memory_run']['storage_writes']} / {r['memory_run']['repairs_total']}")
    row("App log", lambda r: _fmt_counts(r["log"]))
    lines.append("")
    return lines


def _render_coldstart(c: dict[str, Any]) -> list[str]:
    lines = [
        "## 4. Cold start",
        "",
        f'`python -X importtime -c "import function_app"` in a fresh interpreter, {c["runs"]} runs, median.',
        "",
        "| Figure | Value |",
        "|---|---|",
        f"| Import of `function_app` (cumulative) | {c['import_ms_median']} ms (runs: {', '.join(map(str, c['import_ms_all']))}) |",
        f"| of which not `azure.functions` (our modules) | {c['import_ms_without_azure_functions']} ms |",
        f"| Whole interpreter start + import (wall) | {c['process_ms_median']} ms |",
        "",
        "Top 10 modules by cumulative import time (depth = nesting under `function_app`):",
        "",
        "| Module | Depth | Cumulative (ms) |",
        "|---|---|---|",
    ]
    lines += [f"| `{m['module']}` | {m['depth']} | {m['cumulative_ms']} |" for m in c["top_modules"]]
    lines += [
        "",
        "Lazy imports paid by the first invocation (after `import function_app`, fresh interpreter, median):",
        "",
        "| Imports | ms | Heaviest third-party packages in it (ms, cumulative) |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {ms} | {c['lazy_imports_heaviest'].get(label, '')} |" for label, ms in c["lazy_imports_ms"].items()]
    lines.append("")
    return lines


# =================================================================================================
# Interpretation against the targets


def interpret(results: dict[str, Any]) -> list[str]:
    notes = []
    pub = results.get("publisher")
    if pub:
        notes.append(
            f"Publisher changes: {pub['errors']} errors in {pub['changes']} (target zero); {pub['standin_patches']} PATCHes"
            f" for {pub['changes']} changes (exactly one each); {pub['applied_at_microsoft']} applied at Microsoft and"
            f" {pub['endings'].get('Succeeded', 0)} recorded Succeeded; the 202 answered in p99 {pub['latency_ms']['p99']} ms"
            " without waiting for Microsoft's operation."
        )
    webhook = results.get("webhook")
    if webhook:
        probes = {p["label"]: p for p in webhook["probes"]}
        plain, answered = probes.get("Suspend"), probes.get("ChangeQuantity")
        duplicate = probes.get("duplicate (redelivery)")
        notes.append(
            f"Webhook errors: {webhook['errors']} of {webhook['events']} (target zero); every InProgress operation was"
            f" answered ({webhook['patches']} PATCHes for {webhook['answered_events']} events) and a reconciliation right"
            f" after the burst found {'nothing' if not webhook['consistency_repairs'] else _fmt_counts(webhook['consistency_repairs'])}"
            " to repair."
        )
        notes.append(
            f"Marketplace calls per event: {_fmt_counts(plain['marketplace']) if plain else '?'} for a plain event,"
            f" {_fmt_counts(answered['marketplace']) if answered else '?'} for an InProgress one"
            f" (burst average {webhook['marketplace_per_event']}): the design's minimum"
            f" ({MIN_MARKETPLACE_PER_EVENT['plain']} / {MIN_MARKETPLACE_PER_EVENT['answered']}) is met. A redelivery costs"
            f" {sum(duplicate['marketplace'].values()) if duplicate else '?'} Marketplace calls, {duplicate['reads'] if duplicate else '?'}"
            f" storage read and {duplicate['writes'] if duplicate else '?'} writes (minimum: the marker read)."
        )
        if plain and answered:
            met = plain["reads"] <= BRIEF_STORAGE_READS and answered["reads"] <= BRIEF_STORAGE_READS
            notes.append(
                f"Storage per new event: {plain['reads']} reads + {plain['writes']} writes (plain), {answered['reads']} reads +"
                f" {answered['writes']} writes (InProgress); the design's minimum is {MIN_STORAGE_READS} reads (marker, state)"
                f" + {MIN_STORAGE_WRITES} writes (marker create, one transaction), {BRIEF_STORAGE_READS} reads if the marker"
                f" is read back after its create. Writes: met. Reads: {'met' if met else 'not met, see Findings'}."
                f" Delivering the event (its job on the work queue) adds {webhook['relay_storage_per_event']} storage requests per event off the request path."
            )
        cpu = webhook["app_cpu_ms_per_event"]
        notes.append(
            f"Latency: p50 {webhook['latency_ms']['p50']} ms, p99 {webhook['latency_ms']['p99']} ms with {webhook['senders']}"
            f" requests in flight. The app process spends {cpu} ms of CPU per event (request thread"
            f" {webhook['handle_cpu_ms_per_event']} ms; the rest is HTTP serving and the delivery jobs), and one Python"
            f" process runs Python code on one core at a time: {webhook['senders']} x {cpu} ms = {webhook['senders'] * cpu:.0f} ms"
            f" of queueing, {webhook['senders'] * cpu / max(webhook['latency_ms']['p50'], 1e-9):.0%} of the p50 (Azurite, the"
            f" stand-in and the senders share the same {os.cpu_count()} cores). {1000 / cpu if cpu else 0:.0f} events/s is the"
            f" CPU ceiling of one app process (measured {webhook['throughput_per_second']}/s). Fewer storage requests per"
            " event (request path and relay) is what would move latency and throughput."
        )
        notes.append(
            f"JWT validation with cached keys: {webhook['auth_alone_ms']['mean']} ms per token alone,"
            f" {webhook['auth_alone_share_of_handle']:.2%} of the mean handling time and {webhook['auth_alone_share_of_cpu']:.2%}"
            f" of the CPU per event ({webhook['auth_in_burst_share']:.2%} of handling time measured inside the burst):"
            " not a bottleneck; the keys are fetched once per process (the probes paid it) and RS256 verification is cheap."
        )
    for run in results.get("reconcile", []):
        drift, clean = run["drift_run"], run["clean_run"]
        ok_writes = drift["storage_writes"] == run["drifted"] + 1 and clean["storage_writes"] == 1
        scan_pages = drift["wire"].get("query_page", 0)
        clean_pages = clean["wire"].get("query_page", 0)
        exact = drift["storage_reads"] == scan_pages + 1 + run["drifted"]
        notes.append(
            f"Reconcile {run['subscriptions']:,}: writes {drift['storage_writes']} = drifted {run['drifted']} + 1 summary"
            f" ({'met' if ok_writes else 'NOT met'}); the clean run writes {clean['storage_writes']}. Reads"
            f" {drift['storage_reads']} {'=' if exact else 'vs'} {scan_pages} scan page(s) of up to 1,000 rows + 1 checkpoint"
            f" + 1 point read per drifted subscription (its current ETag and record before the write); the clean run reads"
            f" {clean['storage_reads']} = {clean_pages} scan page(s) + 1 checkpoint: page scans, not per-subscription reads"
            f" ({'met' if clean['storage_reads'] == clean_pages + 1 else 'NOT met'}). The scan's pages hold the state rows and"
            " the lifecycle events delivered in the last 24 hours (the console's chart; here the setup run's, one per"
            " subscription, and the drift run's repairs), so a day of many deliveries adds pages."
            f" Marketplace: {drift['marketplace_calls']} calls = {drift['pages']} list pages"
            f" + {drift['marketplace_calls'] - drift['pages']} List operations (subscriptions suspended at Microsoft)."
        )
    sizes = results.get("reconcile", [])
    if len(sizes) >= 2:
        small, large = sizes[0], sizes[-1]
        scale = large["subscriptions"] / small["subscriptions"]

        def ratio(run: str, key: str) -> float:
            return large[run][key] / max(small[run][key], 1e-9)

        cpu_ratio, wall_ratio = ratio("drift_run", "cpu_seconds"), ratio("drift_run", "wall_seconds")
        read_ratio = (
            ratio("drift_run", "point_read_ms")
            if small["drift_run"]["point_read_ms"] and large["drift_run"]["point_read_ms"]
            else 1.0
        )

        def value_is_linear(value: float) -> bool:
            return value <= scale * 1.25

        def verdict(value: float) -> str:
            return "linear within 25 %" if value <= scale * 1.25 else "more than linear"

        text = (
            f"Linearity ({scale:.0f}x the subscriptions): the clean run took {ratio('clean_run', 'wall_seconds'):.1f}x the time"
            f" ({small['clean_run']['ms_per_subscription']} -> {large['clean_run']['ms_per_subscription']} ms per subscription,"
            f" {verdict(ratio('clean_run', 'wall_seconds'))}), the drift run {wall_ratio:.1f}x"
            f" ({small['drift_run']['ms_per_subscription']} -> {large['drift_run']['ms_per_subscription']} ms,"
            f" {verdict(wall_ratio)}). The app's CPU in the drift run grew {cpu_ratio:.1f}x"
            f" ({small['drift_run']['cpu_ms_per_subscription']} -> {large['drift_run']['cpu_ms_per_subscription']} ms per"
            f" subscription, {verdict(cpu_ratio)})."
        )
        clean_ratio = ratio("clean_run", "wall_seconds")
        if value_is_linear(cpu_ratio) and not (value_is_linear(wall_ratio) and value_is_linear(clean_ratio)):
            scan_ratio = large["clean_run"]["phases_seconds"].get("scan", 0) / max(
                small["clean_run"]["phases_seconds"].get("scan", 0), 1e-9
            )
            text += (
                " The app's own CPU stays about linear, so the excess is mostly waiting on storage: the scan phase of the clean run grew"
                f" {scan_ratio:.1f}x (the scan's filter, `RowKey eq 'state' or Pending eq true` or an event delivered in the"
                " last 24 hours, is evaluated over every row of the table, history, marker and outbox rows included), and a point read alone took"
                f" {small['drift_run']['point_read_ms']} ms after the {small['subscriptions']:,} run and"
                f" {large['drift_run']['point_read_ms']} ms after the {large['subscriptions']:,} run"
                + (" (the emulator slows down as the table grows)" if read_ratio > 1.2 else "")
                + "; each repair is a point read + a transaction, one after the other."
            )
        notes.append(text)
    if sizes:
        biggest = max(sizes, key=lambda r: r["subscriptions"])
        memory = biggest.get("memory_run")
        if memory and memory.get("peak_heap_bytes"):
            smallest = min(sizes, key=lambda r: r["subscriptions"])
            per_sub = ""
            if smallest is not biggest and smallest.get("memory_run"):
                grown = memory["peak_heap_bytes"] - smallest["memory_run"]["peak_heap_bytes"]
                what = (
                    "the fingerprint index"
                    if smallest["subscriptions"] >= 1000
                    else "the index, and the scan page filling up to 1,000 entities"
                )
                per_sub = (
                    f"; from {smallest['subscriptions']:,} to {biggest['subscriptions']:,} subscriptions it grew by"
                    f" {grown / 1e6:.1f} MB, about {grown / (biggest['subscriptions'] - smallest['subscriptions']):.0f} B"
                    f" per subscription ({what})"
                )
            notes.append(
                f"Memory: peak Python heap {memory['peak_heap_bytes'] / 1e6:.1f} MB at {biggest['subscriptions']:,} subscriptions"
                f"{per_sub}; the rest is one scan page (1,000 entities) and one listing page at a time. Peak RSS of the app"
                f" process during the drift run: {_mib(biggest['drift_run']['peak_rss_kib'])} MiB"
                f" (from {_mib(biggest['drift_run']['rss_kib_before'])} MiB before it)."
            )
    console = results.get("console")
    if console:
        pages = _console_pages(console)
        first, by_id, search = pages.get("list_first"), pages.get("search_id"), pages.get("search_text")
        if first and by_id:
            from shared.console import SEARCH_SCAN_LIMIT

            first_queries = first["storage"].get("query_page", 0)
            cheap = first_queries <= 2 and not first["storage_varied"]
            point = by_id["storage"].get("point_read", 0) == 1 and by_id["by_table"].get("subscriptions query_page", 0) == 0
            writes = sum(p["storage_writes"] for p in pages.values())
            text_pages = search["by_table"].get("subscriptions query_page", 0) if search else 0
            notes.append(
                f"Operator console at {console['subscriptions']:,} subscriptions: the first list page made"
                f" {_fmt_per_view(first['storage'])} ({_fmt_per_view(first['by_table'])}), p50 {first['latency_ms']['p50']} ms:"
                f" no scan per page view ({'met' if cheap else 'NOT met'}); a search by id is one point read"
                f" ({'met' if point else 'NOT met'}); page views wrote {writes:g} times. The text search read {text_pages:g}"
                f" query page(s) (bounded by {SEARCH_SCAN_LIMIT:,} records, p50 {search['latency_ms']['p50'] if search else '?'} ms)."
            )
    cold = results.get("coldstart")
    if cold:
        notes.append(
            f"Cold start: {cold['import_ms_median']} ms to import function_app, of which "
            f"{cold['import_ms_without_azure_functions']} ms is ours; the rest is `azure.functions` (and werkzeug under it),"
            " which the Functions host loads anyway. The SDKs (storage, requests, PyJWT, the state machine) stay out of the"
            " import path and are paid by the first invocation (lazy imports above)."
        )
    return notes


def findings(results: dict[str, Any]) -> list[str]:
    """Where the measured counts exceed the design's minimum, and why (file and function)."""
    out = []
    met = results.get("metering")
    if met:
        out.append(
            f"Metering ingest is bound by the storage SDK's CPU, not by round trips: {met['events_per_second']:,} events/s"
            f" with {met['storage_writes_per_event']} writes per event. A single insert costs ~2.6 ms of Python CPU and a"
            " transaction ~13 ms plus ~0.7 ms per row (azure-core builds and parses a multipart body part by part;"
            " measured against Azurite), so one process tops out at a few hundred events/s and the latency of a call"
            " under 20 concurrent reporters is mostly queueing (`shared/usage_store.py` `_insert_all`). Functions scale"
            " out by instance; a single instance's ceiling is what is measured here."
        )
        if met["emission_calls"] > met["emission_minimum_calls"]:
            out.append(
                f"Metering emission made {met['emission_calls']} batchUsageEvent calls where"
                f" {met['emission_minimum_calls']} suffice (`shared/metering.py` `Emitter._send_batches`)."
            )
    webhook = results.get("webhook")
    if webhook:
        probes = {p["label"]: p for p in webhook["probes"]}
        plain, answered, first = probes.get("Suspend"), probes.get("ChangeQuantity"), probes.get("Suspend (first seen)")
        if plain and plain["reads"] > MIN_STORAGE_READS:
            out.append(
                f"Webhook storage reads: {plain['reads']} per plain event and {answered['reads'] if answered else '?'} per"
                f" InProgress event where {MIN_STORAGE_READS} suffice (marker, state). The extra point reads:"
                " `shared/repository.py` `record_operation` reads the marker back after `create_entity` (the create's"
                " response already carries the ETag); `shared/webhook.py` `_ensure_known` reads the state row and"
                " `SubscriptionRepository.apply` reads it again (`apply(known=...)` exists for this); `_answer` reads the"
                " state row a third time for the policy (InProgress events); `apply` reads the marker again although"
                " `handle_webhook` has just created it. Each is one Azurite/Table round trip on the request path"
                f" (mean handling {webhook['handle_mean_ms']} ms)."
            )
        if first:
            out.append(
                f"A webhook for a subscription never seen locally costs {first['reads']} reads + {first['writes']} writes and"
                f" {_fmt_counts(first['marketplace'])}: `_ensure_known` writes the subscription in its own transaction before"
                " the event's transaction."
            )
        relay = webhook["relay_storage_per_event"]
        if relay:
            sample = plain["relay_storage"] if plain else {}
            request_path = webhook["storage_reads_per_event"] + webhook["storage_writes_per_event"]
            out.append(
                "Event relay (off the request path, on the work queue): each change puts a `deliver` job on"
                " `EVENTS_WORK_QUEUE` before the answer (one queue put on the request path) and `shared/events.py`"
                " `EventRelay.run_job` (the event_delivery queue trigger; here drained in-process) makes"
                f" {relay} storage requests per event, the job's receive and delete included"
                f" ({_fmt_counts(webhook['relay_storage_wire'])} over the burst; one event alone: {_fmt_counts(sample)}):"
                " with the queue as the only sink there is no lease (queues keep no order; consumers order by"
                " `sequence`), so an event costs the outbox query, the queue send and the delivery mark, plus the job's"
                " receive (shared by a batch) and delete:"
                f" {relay / max(request_path, 1e-9):.1f}x the request path's {request_path:g} storage requests (7 before"
                " this design, when a lease row was taken and released for every delivery). With the ordered HTTPS hook"
                " configured the lease comes back: 4 more requests per delivery pass (lease read and take, release, and a second"
                " look for events written meanwhile; section 7)."
            )
        pool_full = webhook["log"].get("of which 'connection pool is full'", 0)
        if pool_full:
            out.append(
                f"Storage connection pool: {pool_full} 'Connection pool is full, discarding connection' warnings during the"
                f" webhook run: the storage SDK's default pool holds 10 connections (`shared/repository.py`"
                f" `table_service_from_settings` sets no transport), fewer than {webhook['senders']} concurrent requests plus"
                " the delivery jobs, so connections are closed and reopened under load."
            )
    for run in results.get("reconcile", []):
        drift = run["drift_run"]
        pages = drift["pages"]
        extra = drift["marketplace_calls"] - pages
        if extra > 0:
            out.append(
                f"Reconcile {run['subscriptions']:,}: {drift['marketplace_calls']} Marketplace calls = {pages} list pages + {extra}"
                " List operations call(s), one per subscription that is Suspended at Microsoft, in every run"
                " (`shared/reconcile.py` `compare` -> `_settle_overdue_operations`), even when nothing is overdue."
                " The cost grows with the number of suspended subscriptions, not with pages."
            )
            break
    for run in results.get("reconcile", [])[-1:]:
        drift, clean = run["drift_run"], run["clean_run"]
        per_repair = (
            drift["phases_seconds"].get("compare_listing", 0) - clean["phases_seconds"].get("compare_listing", 0)
        ) / run["drifted"]
        if per_repair > 0:
            out.append(
                f"Reconcile repairs run one after another (`shared/reconcile.py` `_repair` -> `repository.apply`): at"
                f" {run['subscriptions']:,} subscriptions each drifted one added about {per_repair * 1000:.0f} ms to the run"
                f" (point read + transaction + a relay job queued), about {1 / per_repair:.0f} repairs/s. Harmless at 1 %"
                " drift; after a long webhook outage (large drift) the run's time budget, not the scan, becomes the limit."
            )
    cold = results.get("coldstart")
    if cold:
        landing = cold["lazy_imports_heaviest"].get("landing (shared.landing, shared.web)", "")
        if "jwt" in landing:
            out.append(
                f"Cold start of the landing page: `shared/form_tokens.py` imports PyJWT (and through it `cryptography`) only"
                f" to sign the HS256 CSRF form token; importing `shared.landing, shared.web` costs"
                f" {cold['lazy_imports_ms']['landing (shared.landing, shared.web)']} ms, of which {landing.split(',')[0]} ms."
                " `hmac` from the standard library would do the same at no import cost. The import path of"
                " `function_app` itself is clean (only `azure.functions` and a few small modules of ours)."
            )
    console = results.get("console")
    if console:
        pages = _console_pages(console)
        detail, first, search = pages.get("subscription"), pages.get("list_first"), pages.get("search_text")
        usage_queries = detail["by_table"].get("usage query_page", 0) if detail else 0
        if detail and usage_queries:
            out.append(
                f"Console subscription page: {usage_queries:g} of its {sum(detail['storage'].values()):g} storage requests are the"
                " usage view's hourly queries (`shared/console.py` `subscription_page` -> `shared/metering.py` `usage_view`,"
                " one query per hour shard of the last 24 hours, run concurrently), also for a subscription whose plan has"
                f" no metering dimensions (the one measured); p50 {detail['latency_ms']['p50']} ms against"
                f" {first['latency_ms']['p50'] if first else '?'} ms for a list page. A usage table keyed by subscription as"
                " well as by hour would make them one query, at the price of a second write per reported event."
            )
        if search and first and search["latency_ms"]["p50"] > 4 * first["latency_ms"]["p50"]:
            text_pages = search["by_table"].get("subscriptions query_page", 0)
            probe = console.get("scan_probe") or {}
            cause = ""
            if probe.get("all_columns_ms"):
                cause = (
                    f" Its floor is the storage SDK turning rows into Python: reading the same {probe['rows']:,} state rows"
                    f" with the SDK alone took {probe['select_searched_ms']} ms with `$select` of the four searched columns"
                    f" (what the search reads) and {probe['all_columns_ms']} ms with all of them."
                )
            out.append(
                f"Console text search: p50 {search['latency_ms']['p50']} ms ({text_pages:g} query page(s) of the searched"
                f" columns, matched in Python: `shared/console.py` `list_page` -> `repository.search_records`),"
                f" {search['latency_ms']['p50'] / max(first['latency_ms']['p50'], 1e-9):.0f}x a"
                f" list page; bounded, and the page says so.{cause}"
            )
    for run in results.get("reconcile", []):
        setup = run["setup"]
        out.append(
            f"First sync of {run['subscriptions']:,} unknown subscriptions (the setup run) took {setup['seconds']} s"
            f" ({setup['seconds'] * 1000 / run['subscriptions']:.1f} ms each): one point read + one transaction per"
            " subscription, sequentially, plus one delivery job each on the work queue (see above)."
        )
    return out


# =================================================================================================
# Command line


LARGE_RUN_LIMIT_SECONDS = 600.0  # setup + measured runs of one estate size
FALLBACK_SIZE = 5000


def _projected_seconds(previous: dict[str, Any], count: int) -> float:
    spent = previous["setup"]["seconds"] + sum(
        previous[name]["wall_seconds"] for name in ("drift_run", "clean_run", "memory_run") if name in previous
    )
    return spent * count / previous["subscriptions"]


def _affordable_size(previous: dict[str, Any], count: int) -> tuple[int, str]:
    """``count``, or FALLBACK_SIZE when ``count`` would take longer than LARGE_RUN_LIMIT_SECONDS (linear projection)."""
    projected = _projected_seconds(previous, count)
    if projected <= LARGE_RUN_LIMIT_SECONDS or count <= FALLBACK_SIZE:
        return count, ""
    return FALLBACK_SIZE, (
        f"{count:,} subscriptions were not measured: projected from the {previous['subscriptions']:,} run, setup and runs"
        f" would take about {projected / 60:.0f} min on this machine (limit {LARGE_RUN_LIMIT_SECONDS / 60:.0f} min; the"
        f" setup run, which records every subscription once, dominates). {FALLBACK_SIZE:,} were measured instead."
    )


def run(
    quick: bool = False, only: str | None = None, *, reconcile_sizes: tuple[int, ...] | None = None, webhooks: int | None = None
) -> dict[str, Any]:
    sizes = QUICK_SIZES if quick else FULL_SIZES
    results: dict[str, Any] = {}
    if only in (None, "webhook", "publisher", "queues", "metering", "readback", "reconcile"):
        with BenchEnvironment() as bench:
            if only in (None, "webhook"):
                print(f"webhook burst: {webhooks or sizes['webhooks']} events, {sizes['senders']} senders ...", flush=True)
                results["webhook"] = bench_webhook(bench, webhooks or sizes["webhooks"], sizes["senders"])
            if only in (None, "publisher"):
                print(
                    f"publisher changes: {sizes['publisher_changes']} from {sizes['publisher_callers']} callers ...", flush=True
                )
                results["publisher"] = bench_publisher(bench, sizes["publisher_changes"], sizes["publisher_callers"])
            if only in (None, "queues"):
                print(
                    f"work queues: {sizes['queue_events']} webhooks, {sizes['queue_changes']} publisher changes x 2 ...",
                    flush=True,
                )
                results["queues"] = bench_queues(bench, sizes["queue_events"], changes=sizes["queue_changes"])
            if only in (None, "metering"):
                print(f"metering: {sizes['usage_events']} usage events, 20 reporters ...", flush=True)
                results["metering"] = bench_metering(bench, sizes["usage_events"], sizes["usage_subscriptions"])
                print("metering again: results shuffled, 1 % per-item Error ...", flush=True)
                results["metering_variant"] = bench_metering(
                    bench, sizes["usage_events"], sizes["usage_subscriptions"], order="shuffled", error_rate=0.01
                )
            if only in (None, "readback"):
                print(f"usage read-back: {sizes['usage_subscriptions']} subscriptions x 3 dimensions x 2 days ...", flush=True)
                results["readback"] = bench_readback(bench, sizes["usage_subscriptions"], days=2)
            if only in (None, "reconcile"):
                results["reconcile"] = []
                for count in reconcile_sizes or sizes["reconcile"]:
                    if not reconcile_sizes and results["reconcile"]:
                        count, note = _affordable_size(results["reconcile"][-1], count)
                        if note:
                            print(note, flush=True)
                            results["reconcile_note"] = note
                    print(f"reconciliation: {count} subscriptions ...", flush=True)
                    results["reconcile"].append(bench_reconcile(bench, count))
    if only in (None, "console"):
        # A fresh Azurite: the earlier sections' tables (100,000 usage rows, 11,000 subscriptions) do not weigh on it.
        with BenchEnvironment() as bench:
            print(f"operator console: {sizes['console']} subscriptions, {sizes['console_loads']} loads per page ...", flush=True)
            results["console"] = bench_console(bench, sizes["console"], sizes["console_loads"])
    if only in (None, "coldstart"):
        print("cold start ...", flush=True)
        results["coldstart"] = bench_coldstart(sizes["coldstart_runs"])
    return results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m devtools.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (100 webhooks, 500 subscriptions); a smoke run")
    parser.add_argument(
        "--only", choices=("webhook", "publisher", "queues", "metering", "readback", "reconcile", "coldstart", "console")
    )
    parser.add_argument("--reconcile-sizes", help="comma-separated subscription counts (default 1000,10000)")
    parser.add_argument("--output", help="markdown report path (default docs/benchmarks.md for a full run, none otherwise)")
    parser.add_argument("--json", help="also write the raw results as JSON to this path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM (timeout, CI cancel): unwind normally so Azurite and the app processes are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    reconcile_sizes = tuple(int(x) for x in args.reconcile_sizes.split(",")) if args.reconcile_sizes else None
    started = time.perf_counter()
    code = _git_state()  # at the start: other work may change the tree while the bench runs
    results = run(args.quick, args.only, reconcile_sizes=reconcile_sizes)
    results["interpretation"] = interpret(results)
    results["findings"] = findings(results)
    results["machine"] = {**machine_info(), "code": code}
    print_summary(results)
    print(f"total bench time {time.perf_counter() - started:.0f} s")
    output = args.output or (str(DEFAULT_OUTPUT) if not args.quick and not args.only else None)
    if output:
        text = render_markdown(results, results["machine"], argv)
        Path(output).write_text(text, encoding="utf-8")
        print(f"wrote {output}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
