"""A small local stand-in for the Azure Functions host (``func start``) for v2-model Python apps.

Azure Functions Core Tools cannot be installed everywhere; this module serves the functions
registered on a ``func.FunctionApp`` by reading the app's own registrations
(``app.get_functions()``), so routes, methods and schedules are defined in one place only.

Command line (from the project root)::

    python -m devtools.devhost [--app function_app:app] [--host 127.0.0.1] [--port 7071]
                               [--settings local.settings.json] [--no-timers] [--no-queues]

In-process (tests)::

    with DevHost(app, port=0, signed_in_user="Ada <ada@example.com>") as host:
        requests.get(host.url + "/api/landing")

What it emulates:

* **HTTP triggers** - ``route`` (default: the function name), ``methods``, the route prefix from
  ``host.json`` ``extensions.http.routePrefix`` (default ``api``) and whole-segment ``{name}``
  parameters (the other ASP.NET template forms are refused at start-up: no app here uses them).
  Served by werkzeug's threaded WSGI server. Query strings are decoded once, the ASP.NET way (``+`` -> space, ``%2B`` -> ``+``);
  repeated query keys / headers are joined with ``,`` / ``, ``. A function may return a
  ``func.HttpResponse`` or a ``str``; anything else - or an exception - is a 500 with a generic
  body (traceback in the log). 404 unknown route, 405 wrong method, 413 bodies over 100 MB.
  Function keys / ``auth_level`` are not enforced, as with Core Tools.
* **Timer triggers** - ``%SETTING%`` schedules, six-field NCRONTAB or TimeSpan (see
  :mod:`devtools.ncrontab`), ``run_on_startup``, ``past_due``; a function never overlaps itself.
* **Queue triggers** - ``%SETTING%`` queue names on the connection string in the binding's
  ``connection`` setting (Azurite); host.json ``extensions.queues`` ``batchSize``,
  ``maxPollingInterval`` (empty polls back off to it), ``visibilityTimeout`` (a failed message
  comes back after it), ``maxDequeueCount`` (then ``<queue>-poison``, logged with the
  ``queue_message_poisoned`` marker); the messages of a batch run concurrently, as the host runs
  them. ``queues=False`` / ``--no-queues`` turns polling off.
* **Admin API** - ``POST /admin/functions/<name>`` (body ``{"input": ...}``) runs a non-HTTP
  function in the background and answers 202; ``?wait=true`` (dev-host extension) waits and
  answers 200/500. ``GET /admin/host/status``; ``GET /`` lists the functions.
* **Easy Auth stand-in** - incoming ``X-MS-CLIENT-PRINCIPAL*`` / ``X-MS-TOKEN-*`` headers are
  always stripped; when a signed-in user is configured (``DEV_SIGNED_IN_USER`` or the
  ``signed_in_user`` argument) the headers App Service Authentication would add are injected.
* ``AzureWebJobs.<FunctionName>.Disabled=true`` disables routing/scheduling of a function.

Not emulated: bindings other than the HTTP/timer/queue triggers and the HTTP output (inputs receive
``None``, ``func.Out`` outputs are logged and discarded), CORS, keys, ``functionTimeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextvars
import html
import importlib
import inspect
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from http import HTTPStatus
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl, unquote, urlsplit

import azure.functions as func

# NB: ``func.TimerRequest`` is the abstract base class (it takes no arguments); the
# constructible TimerRequest(past_due=, schedule_status=, schedule=) lives in azure.functions.timer.
from azure.functions.timer import TimerRequest
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler
from werkzeug.wrappers import Request

from . import ncrontab

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PORT",
    "MAX_REQUEST_BODY_BYTES",
    "DevHost",
    "DevHostError",
    "InvocationResult",
    "RouteTemplate",
    "SignedInUser",
    "load_app",
    "load_local_settings",
    "main",
]

DEFAULT_PORT = 7071
DEFAULT_ROUTE_PREFIX = "api"
#: the Functions host (Kestrel) rejects larger request bodies with 413
MAX_REQUEST_BODY_BYTES = 100 * 1024 * 1024
#: a scheduled run that starts later than this after its occurrence gets past_due=True
PAST_DUE_TOLERANCE = timedelta(seconds=5)
SIGNED_IN_USER_ENV = "DEV_SIGNED_IN_USER"
SIGNED_IN_TENANT_ENV = "DEV_SIGNED_IN_TENANT_ID"

_DATETIME_MIN = "0001-01-01T00:00:00"  # .NET DateTime.MinValue, what the host reports for "never"
_ALL_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE")
# Headers only App Service Authentication may set; never accepted from clients.
_EASY_AUTH_HEADER_PREFIXES = ("x-ms-client-principal", "x-ms-token-")
# Response headers the dev host computes itself.
_HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive"}
_SETTING_RE = re.compile(r"%([^%\s]+)%")
_ADMIN_REASON = "This function was programmatically called via the host APIs."


class DevHostError(Exception):
    """The app cannot be served as configured (missing setting, bad schedule or route, ...)."""


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Binding dicts carry enums (HttpMethod, AuthLevel, BindingDirection); make them plain."""
    if isinstance(value, Enum):
        return value.value if isinstance(value.value, str) else value.name.lower()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _next_run(schedule: ncrontab.Schedule, after: datetime) -> datetime:
    """Next occurrence (aware UTC) of a parsed schedule strictly after the aware ``after``."""
    naive = after.astimezone(UTC).replace(tzinfo=None)
    nxt = schedule.next_after(naive)
    if nxt is None:  # pragma: no cover - parse_schedule rejects never-occurring crons
        raise DevHostError(f"schedule {schedule} has no next occurrence")
    return nxt.replace(tzinfo=UTC)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def resolve_setting_references(text: str, environ: Mapping[str, str], *, what: str) -> str:
    """Replace ``%NAME%`` binding expressions with app settings; DevHostError when one is missing."""

    def substitute(match: re.Match) -> str:
        name = match.group(1)
        if name not in environ:
            raise DevHostError(
                f"{what}: app setting '{name}' (referenced as '%{name}%') is not set; "
                f"add it to local.settings.json Values or the environment"
            )
        return environ[name]

    return _SETTING_RE.sub(substitute, text)


# --------------------------------------------------------------------------------------------
# Routes: the subset of ASP.NET Core templates the apps here use
# --------------------------------------------------------------------------------------------

_PARAMETER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class RouteTemplate:
    """A route such as ``api/subscriptions/{subscriptionId}``: literal segments (matched
    case-insensitively, one trailing slash ignored, like ASP.NET Core) and ``{name}`` parameters,
    one whole segment each. Constraints, optional, default and catch-all parameters are refused at
    start-up rather than half-emulated: no app here uses them."""

    def __init__(self, route: str, prefix: str = ""):
        self.template = "/".join(part for part in ((prefix or "").strip("/"), (route or "").strip("/")) if part)
        pattern = []
        for segment in self.template.split("/") if self.template else []:
            parameter = _PARAMETER.fullmatch(segment)
            if parameter:
                pattern.append(f"(?P<{parameter.group(1)}>[^/]+)")
            elif "{" in segment or "}" in segment:
                raise DevHostError(f"route {self.template!r}: only whole-segment {{name}} parameters are supported")
            else:
                pattern.append(re.escape(segment))
        self._regex = re.compile("/" + "/".join(pattern) + "/?", re.IGNORECASE)
        # Literal routes win over parameterised ones, as in ASP.NET Core.
        self.precedence = self.template.count("{")

    def __repr__(self) -> str:
        return f"RouteTemplate({self.template!r})"

    def match(self, path: str) -> dict[str, str] | None:
        """Route values (percent-decoded) of the still-encoded URL ``path``, or None."""
        found = self._regex.fullmatch(path)
        return {name: unquote(value) for name, value in found.groupdict().items()} if found else None


# --------------------------------------------------------------------------------------------
# Easy Auth stand-in
# --------------------------------------------------------------------------------------------

_CLAIM_EMAIL = "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/emailaddress"
_CLAIM_OID = "http://schemas.microsoft.com/identity/claims/objectidentifier"
_CLAIM_TID = "http://schemas.microsoft.com/identity/claims/tenantid"
_CLAIM_ROLE = "http://schemas.microsoft.com/ws/2008/06/identity/claims/role"


@dataclass(frozen=True)
class SignedInUser:
    """The user App Service Authentication would report, built from ``Name <email>`` or an email."""

    name: str
    email: str
    tenant_id: str
    roles: tuple[str, ...] = ()  # app roles, as Entra puts them in the token's `roles` claim

    @classmethod
    def parse(cls, text: str, tenant_id: str | None = None, roles: tuple[str, ...] = ()) -> SignedInUser:
        text = text.strip()
        match = re.fullmatch(r"(.*?)\s*<\s*([^<>\s]+@[^<>\s]+)\s*>", text) or re.fullmatch(r"()([^<>\s]+@[^<>\s]+)", text)
        if not match:
            raise DevHostError(f"signed-in user {text!r} is neither 'Display Name <email>' nor an email")
        name, email = match.group(1).strip().strip('"'), match.group(2)
        domain = email.rsplit("@", 1)[1].lower()
        tenant = tenant_id or str(uuid.uuid5(uuid.NAMESPACE_DNS, f"devhost-tenant.{domain}"))
        return cls(name=name or email, email=email, tenant_id=tenant, roles=tuple(roles))

    @property
    def object_id(self) -> str:
        """Stable per email (uuid5), so the same dev user keeps the same id across runs."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, "mailto:" + self.email.lower()))

    def principal(self) -> dict:
        claims = [
            ("name", self.name),
            ("preferred_username", self.email),
            (_CLAIM_EMAIL, self.email),
            (_CLAIM_OID, self.object_id),
            (_CLAIM_TID, self.tenant_id),
            *(("roles", role) for role in self.roles),
        ]
        return {
            "auth_typ": "aad",
            "claims": [{"typ": typ, "val": val} for typ, val in claims],
            "name_typ": _CLAIM_EMAIL,
            "role_typ": _CLAIM_ROLE,
        }

    def headers(self) -> dict[str, str]:
        encoded = base64.b64encode(json.dumps(self.principal()).encode("utf-8")).decode("ascii")
        return {
            "X-MS-CLIENT-PRINCIPAL": encoded,
            "X-MS-CLIENT-PRINCIPAL-ID": self.object_id,
            "X-MS-CLIENT-PRINCIPAL-NAME": self.email,
            "X-MS-CLIENT-PRINCIPAL-IDP": "aad",
        }


# --------------------------------------------------------------------------------------------
# Invocation plumbing
# --------------------------------------------------------------------------------------------


class _TraceContext:
    trace_parent = ""
    trace_state = ""
    attributes: ClassVar[dict] = {}


class _InvocationContext(func.Context):
    """What the Python worker passes to a ``context`` parameter."""

    def __init__(self, function_name: str, function_directory: str, invocation_id: str):
        self._function_name = function_name
        self._function_directory = function_directory
        self._invocation_id = invocation_id
        self._thread_local_storage = threading.local()
        self._thread_local_storage.invocation_id = invocation_id

    @property
    def invocation_id(self) -> str:
        return self._invocation_id

    @property
    def thread_local_storage(self):
        return self._thread_local_storage

    @property
    def function_name(self) -> str:
        return self._function_name

    @property
    def function_directory(self) -> str:
        return self._function_directory

    @property
    def trace_context(self):
        return _TraceContext()

    @property
    def retry_context(self):
        return None


class _Out(func.Out):
    """A ``func.Out`` for output bindings; the value is kept for the caller to inspect."""

    def __init__(self) -> None:
        self._value: Any = None

    def set(self, val: Any) -> None:
        self._value = val

    def get(self) -> Any:
        return self._value


# Threads a function leaves running: the Functions host does not track them and may stop the
# instance right after the answer, so the dev host names each one (marker below). Thread.start
# tags a thread with the invocation that started it.
THREADS_LEFT_MARKER = "function_left_threads_running"
_current_invocation: contextvars.ContextVar[str | None] = contextvars.ContextVar("devhost_invocation", default=None)
_original_thread_start = threading.Thread.start


def _tagging_start(thread: threading.Thread) -> None:
    invocation = _current_invocation.get()
    if invocation is not None:
        thread._devhost_invocation = invocation  # type: ignore[attr-defined]
    _original_thread_start(thread)


def _track_thread_starts() -> None:
    threading.Thread.start = _tagging_start  # type: ignore[method-assign,assignment]


def _threads_left_by(invocation_id: str) -> list[str]:
    return [t.name for t in threading.enumerate() if getattr(t, "_devhost_invocation", None) == invocation_id and t.is_alive()]


@dataclass
class InvocationResult:
    """Outcome of one function invocation."""

    function_name: str
    invocation_id: str
    value: Any = None
    error: BaseException | None = None
    duration_ms: float = 0.0
    outputs: dict[str, Any] = field(default_factory=dict)
    #: names of the threads the function started that were still running when it returned
    threads_left: list[str] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.error is None


@dataclass
class _FunctionInfo:
    """One indexed function, with what the dev host needs to call it."""

    name: str
    trigger_type: str
    trigger: dict
    bindings: list[dict]
    user_function: Callable[..., Any]
    directory: str
    signature: inspect.Signature | None
    disabled: bool = False
    route: RouteTemplate | None = None
    methods: tuple[str, ...] | None = None
    http_output: str | None = None
    schedule_expression: str | None = None
    schedule: ncrontab.Schedule | None = None
    run_on_startup: bool = False

    @property
    def is_http(self) -> bool:
        return self.trigger_type == "httpTrigger"

    @property
    def http_route(self) -> RouteTemplate:
        if self.route is None:
            raise DevHostError(f"{self.name} is not an HTTP function")
        return self.route

    @property
    def timer_schedule(self) -> ncrontab.Schedule:
        if self.schedule is None:
            raise DevHostError(f"{self.name} is not a timer function")
        return self.schedule

    def describe(self, base_url: str, timers_enabled: bool) -> str:
        if self.is_http:
            methods = ",".join(self.methods) if self.methods else "ANY"
            line = f"{self.name}: [{methods}] {base_url}/{self.http_route.template}"
        elif self.trigger_type == "timerTrigger":
            line = f"{self.name}: timerTrigger ({self.schedule_expression})"
            if not timers_enabled:
                line += " [schedule off: --no-timers]"
        else:
            line = f"{self.name}: {self.trigger_type} (not triggered by the dev host; POST /admin/functions/{self.name})"
        return line + (" [disabled]" if self.disabled else "")


def index_app(app: Any) -> list[Any]:
    """``app.get_functions()``, callable more than once.

    azure-functions 1.26 remembers indexed names on the app, so a second ``get_functions()``
    (e.g. after a test that indexed the app) reports every function as a duplicate. The
    memory is cleared for the call and restored afterwards; real duplicates still raise.
    """
    saved = getattr(app, "functions_bindings", None)
    if hasattr(app, "functions_bindings"):
        app.functions_bindings = None
    try:
        return list(app.get_functions())
    finally:
        if hasattr(app, "functions_bindings"):
            app.functions_bindings = saved


def read_route_prefix(host_json: Path | str | None) -> str:
    """``extensions.http.routePrefix`` from host.json; ``api`` when absent."""
    if host_json is None or not Path(host_json).is_file():
        return DEFAULT_ROUTE_PREFIX
    try:
        document = json.loads(Path(host_json).read_text(encoding="utf-8-sig"))
    except ValueError as exc:
        raise DevHostError(f"{host_json}: not valid JSON ({exc})") from exc
    prefix = ((document.get("extensions") or {}).get("http") or {}).get("routePrefix")
    return DEFAULT_ROUTE_PREFIX if prefix is None else str(prefix).strip("/")


# --------------------------------------------------------------------------------------------
# Timers
# --------------------------------------------------------------------------------------------


class _TimerRunner:
    """Runs one timer function at its occurrences, in its own thread."""

    def __init__(self, host: DevHost, fn: _FunctionInfo):
        self.host = host
        self.fn = fn
        self.last: datetime | None = None
        self.next_due: datetime | None = None
        self.thread: threading.Thread | None = None

    def status(self, started: datetime, scheduled: datetime | None) -> dict:
        return {
            "Last": self.last.isoformat() if self.last else _DATETIME_MIN,
            "Next": _next_run(self.fn.timer_schedule, scheduled or started).isoformat(),
            "LastUpdated": started.isoformat(),
        }

    def run_once(self, scheduled: datetime | None, reason: str) -> InvocationResult:
        """One run; waits for a run in progress to finish first (no overlap)."""
        with self.host._run_lock(self.fn.name):
            started = self.host.clock()
            past_due = scheduled is not None and started - scheduled > PAST_DUE_TOLERANCE
            request = TimerRequest(
                past_due=past_due, schedule_status=self.status(started, scheduled), schedule={"AdjustForDST": True}
            )
            result = self.host._invoke(self.fn, request, reason=reason)
            if scheduled is not None:  # like the host's schedule monitor: manual runs don't count
                self.last = scheduled
            return result

    def loop(self, stop: threading.Event) -> None:
        if self.fn.run_on_startup and not stop.is_set():
            self.run_once(None, "run_on_startup")
        due = _next_run(self.fn.timer_schedule, self.host.clock())
        while not stop.is_set():
            self.next_due = due
            logger.debug("Timer %s: next run at %s", self.fn.name, due.isoformat())
            delay = (due - self.host.clock()).total_seconds()
            if delay > 0 and stop.wait(delay):
                break
            self.run_once(due, f"Timer fired at {due.isoformat()}")
            due = _next_run(self.fn.timer_schedule, max(self.host.clock(), due))


# --------------------------------------------------------------------------------------------
# Queue triggers (against Azurite's queue service, as the Functions host serves them)
# --------------------------------------------------------------------------------------------

POISON_MARKER = "queue_message_poisoned"


@dataclass(frozen=True)
class QueueOptions:
    """host.json ``extensions.queues`` (the Functions host's defaults where absent)."""

    batch_size: int = 16
    max_polling_interval: float = 60.0
    visibility_timeout: float = 0.0
    max_dequeue_count: int = 5

    @classmethod
    def read(cls, host_json: Path | str | None) -> QueueOptions:
        if host_json is None or not Path(host_json).is_file():
            return cls()
        document = json.loads(Path(host_json).read_text(encoding="utf-8-sig"))
        queues = (document.get("extensions") or {}).get("queues") or {}
        return cls(
            batch_size=int(queues.get("batchSize", 16)),
            max_polling_interval=_timespan_seconds(queues.get("maxPollingInterval"), 60.0),
            visibility_timeout=_timespan_seconds(queues.get("visibilityTimeout"), 0.0),
            max_dequeue_count=int(queues.get("maxDequeueCount", 5)),
        )


def _timespan_seconds(value: Any, default: float) -> float:
    if value is None:
        return default
    hours, minutes, seconds = str(value).split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


class _QueueRunner:
    """Polls one queue for one queue-triggered function: messages in batches, invisible while a
    run holds them (``LOCK_SECONDS``), deleted on success; on failure put back after the
    ``visibilityTimeout``; after ``maxDequeueCount`` failures moved to ``<queue>-poison`` and logged
    with the ``queue_message_poisoned`` marker. Empty polls back off up to ``maxPollingInterval``."""

    LOCK_SECONDS = 600  # the host renews its hold while a function runs; our functions finish far sooner

    def __init__(self, host: DevHost, fn: _FunctionInfo, queue_name: str, connection_string: str, options: QueueOptions):
        self.host = host
        self.fn = fn
        self.queue_name = queue_name
        self.connection_string = connection_string
        self.options = options
        self.thread: threading.Thread | None = None

    def _client(self, name: str) -> Any:
        from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy

        return QueueClient.from_connection_string(
            self.connection_string,
            name,
            message_encode_policy=TextBase64EncodePolicy(),
            message_decode_policy=TextBase64DecodePolicy(),
        )

    def poll_once(self) -> int:
        """One batch: returns the number of messages run (0: the queue is empty or missing)."""
        from azure.core.exceptions import ResourceNotFoundError

        client = self._client(self.queue_name)
        try:
            messages = list(
                client.receive_messages(
                    messages_per_page=self.options.batch_size,
                    max_messages=self.options.batch_size,
                    visibility_timeout=self.LOCK_SECONDS,
                )
            )
        except ResourceNotFoundError:
            return 0
        if len(messages) <= 1:
            for message in messages:
                self._run(client, message)
        else:
            # The Functions host runs the messages of a batch concurrently; so does this, joined
            # before the next poll (the host's newBatchThreshold refill is not emulated).
            from concurrent.futures import ThreadPoolExecutor

            prefix = f"devhost-queue-{self.fn.name}"
            with ThreadPoolExecutor(len(messages), thread_name_prefix=prefix) as pool:
                list(pool.map(lambda message: self._run(client, message), messages))
        return len(messages)

    def _run(self, client: Any, message: Any) -> None:
        from azure.core.exceptions import ResourceExistsError

        body = message.content
        request = func.QueueMessage(id=message.id, body=body, pop_receipt=message.pop_receipt)
        result = self.host._invoke(self.fn, request, reason=f"New queue message detected on '{self.queue_name}'")
        if result.error is None:
            client.delete_message(message)
        elif (message.dequeue_count or 0) >= self.options.max_dequeue_count:
            poison = self._client(self.queue_name + "-poison")
            try:
                poison.create_queue()
            except ResourceExistsError:
                pass
            poison.send_message(body)
            client.delete_message(message)
            logger.error(
                "%s queue=%s function=%s dequeueCount=%s: moved to %s-poison",
                POISON_MARKER,
                self.queue_name,
                self.fn.name,
                message.dequeue_count,
                self.queue_name,
            )
        else:
            client.update_message(message, visibility_timeout=int(self.options.visibility_timeout))

    def loop(self, stop: threading.Event) -> None:
        interval = 0.1
        while not stop.is_set():
            try:
                ran = self.poll_once()
            except Exception:
                logger.warning("Queue %s: poll failed", self.queue_name, exc_info=True)
                ran = 0
            interval = 0.1 if ran else min(interval * 2, self.options.max_polling_interval)
            if stop.wait(0 if ran else interval):
                break


# --------------------------------------------------------------------------------------------
# HTTP server (werkzeug's threaded WSGI server; the host's routing and Easy Auth are ours)
# --------------------------------------------------------------------------------------------


@dataclass
class _Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @classmethod
    def text(cls, status: int, text: str | None = None, headers: Iterable[tuple[str, str]] = ()) -> _Response:
        body = (text if text is not None else HTTPStatus(status).phrase).encode("utf-8")
        return cls(status, [("Content-Type", "text/plain; charset=utf-8"), *headers], body)

    @classmethod
    def json(cls, status: int, payload: Any) -> _Response:
        return cls(status, [("Content-Type", "application/json; charset=utf-8")], json.dumps(payload).encode("utf-8"))


def _redact_query(text: str) -> str:
    """Query strings may carry marketplace purchase tokens: never let them reach a log."""
    return re.sub(r"\?[^\s'\"]*", "?<redacted>", text)


class _Handler(WSGIRequestHandler):
    server_version = "AzureFunctionsDevHost/1.0"

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        pass  # one line per request is written by the host, never with the query string

    def log_message(self, format: str, *args: Any) -> None:
        message = _redact_query(format % args)
        logger.log(logging.DEBUG if "timed out" in message else logging.WARNING, "%s", message)

    def handle_expect_100(self) -> bool:
        # Kestrel refuses an oversized body before the client sends it.
        length = self.headers.get("Content-Length", "")
        server: _Server = self.server  # type: ignore[assignment]
        if length.isdigit() and int(length) > server.max_request_body_bytes:
            self.send_error(413)
            return False
        return super().handle_expect_100()


class _Server(ThreadedWSGIServer):
    daemon_threads = True
    request_queue_size = 128  # a burst of concurrent senders must not overflow the listen backlog
    max_request_body_bytes = MAX_REQUEST_BODY_BYTES


# --------------------------------------------------------------------------------------------
# The host
# --------------------------------------------------------------------------------------------


class DevHost:
    """Serve a v2-model ``func.FunctionApp`` over HTTP and run its timers.

    :param app: the ``func.FunctionApp`` (indexed immediately: configuration errors such as a
        missing ``%SETTING%`` raise :class:`DevHostError` here).
    :param host: interface to bind; :param port: 0 picks a free port (see :attr:`url`).
    :param timers: False disables the schedules (``run_on_startup`` included); on-demand runs
        through ``POST /admin/functions/<name>`` still work.
    :param signed_in_user: ``"Name <email>"`` / ``"email"``; ``None`` = use ``DEV_SIGNED_IN_USER``,
        ``""`` = nobody signed in.
    :param route_prefix: overrides host.json; :param host_json: the host.json to read for
        ``extensions.http.routePrefix`` (default: ``./host.json``; :meth:`from_module` uses the
        one beside the app module). No host.json means the default prefix ``api``.
    :param environ: where ``%SETTING%`` references are resolved (default ``os.environ``).
    :param clock: the timers' clock (aware UTC datetimes); injectable so tests need not wait.
    """

    max_request_body_bytes = MAX_REQUEST_BODY_BYTES

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        timers: bool = True,
        queues: bool = True,
        signed_in_user: str | None = None,
        route_prefix: str | None = None,
        host_json: str | Path | None = None,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ):
        self.app = app
        # The timers' clock (aware UTC); tests pass one that moves, so schedules are checked without waiting.
        self.clock = clock
        self.host = host
        self.port = port
        self.timers_enabled = timers
        self.queues_enabled = queues
        self._environ = os.environ if environ is None else environ
        if signed_in_user is None:
            signed_in_user = self._environ.get(SIGNED_IN_USER_ENV, "")
        self.signed_in_user = (
            SignedInUser.parse(signed_in_user, self._environ.get(SIGNED_IN_TENANT_ENV) or None)
            if signed_in_user.strip()
            else None
        )
        host_json_path = Path("host.json") if host_json is None else host_json
        if route_prefix is None:
            route_prefix = read_route_prefix(host_json_path)
        self.route_prefix = route_prefix.strip("/")
        self.functions: dict[str, _FunctionInfo] = {}
        for function in index_app(app):
            info = self._describe_function(function)
            self.functions[info.name.lower()] = info
        self._http_functions = sorted((f for f in self.functions.values() if f.is_http), key=lambda f: f.http_route.precedence)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        #: "function: thread" for every thread a function left running (THREADS_LEFT_MARKER)
        self.threads_left: list[str] = []
        _track_thread_starts()
        self._stop = threading.Event()
        self._server: _Server | None = None
        self._server_thread: threading.Thread | None = None
        self._timers = {
            name: _TimerRunner(self, info) for name, info in self.functions.items() if info.trigger_type == "timerTrigger"
        }
        self._queues: dict[str, _QueueRunner] = {}
        if queues:
            options = QueueOptions.read(host_json_path)
            for name, info in self.functions.items():
                if info.trigger_type != "queueTrigger":
                    continue
                what = f"function {info.name!r} queue name"
                queue_name = resolve_setting_references(str(info.trigger.get("queueName", "")), self._environ, what=what)
                setting = str(info.trigger.get("connection") or "AzureWebJobsStorage")
                connection = self._environ.get(setting) or self._environ.get("TABLES_CONNECTION_STRING", "")
                if not connection or ("AccountName" not in connection and "UseDevelopmentStorage" not in connection):
                    raise DevHostError(f"{what}: the dev host needs a connection string in {setting} (Azurite)")
                self._queues[name] = _QueueRunner(self, info, queue_name, connection, options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._loop_guard = threading.Lock()

    @classmethod
    def from_module(cls, spec: str = "function_app:app", **kwargs: Any) -> DevHost:
        """Import ``module:attribute`` and serve it; host.json is read beside the module."""
        app, module = load_app(spec)
        if "route_prefix" not in kwargs and "host_json" not in kwargs and getattr(module, "__file__", None):
            kwargs["host_json"] = Path(module.__file__).resolve().parent / "host.json"
        return cls(app, **kwargs)

    # -- indexing ------------------------------------------------------------------------------

    def _describe_function(self, function: Any) -> _FunctionInfo:
        name = function.get_function_name()
        bindings = [_plain(b) for b in function.get_bindings_dict()["bindings"]]
        trigger = next((b for b in bindings if str(b.get("type", "")).lower().endswith("trigger")), None)
        if trigger is None:
            raise DevHostError(f"function {name!r} has no trigger")
        user_function = function.get_user_function()
        try:
            signature = inspect.signature(user_function)
        except (TypeError, ValueError):
            signature = None
        source = inspect.getsourcefile(user_function) if inspect.isfunction(user_function) else None
        info = _FunctionInfo(
            name=name,
            trigger_type=trigger["type"],
            trigger=trigger,
            bindings=bindings,
            user_function=user_function,
            signature=signature,
            directory=str(Path(source).parent) if source else str(Path.cwd()),
            disabled=_truthy(self._environ.get(f"AzureWebJobs.{name}.Disabled")),
        )
        if info.is_http:
            info.route = RouteTemplate(trigger.get("route") or name, self.route_prefix)
            methods = trigger.get("methods")
            info.methods = tuple(dict.fromkeys(str(m).upper() for m in methods)) if methods else None
            outputs = [b for b in bindings if b.get("type") == "http" and b.get("direction") == "out"]
            info.http_output = outputs[0]["name"] if outputs else "$return"
        elif info.trigger_type == "timerTrigger":
            what = f"function {name!r} timer schedule"
            info.schedule_expression = resolve_setting_references(str(trigger.get("schedule", "")), self._environ, what=what)
            try:
                info.schedule = ncrontab.parse_schedule(info.schedule_expression)
            except ValueError as exc:
                raise DevHostError(f"{what}: {exc}") from exc
            info.run_on_startup = bool(trigger.get("runOnStartup"))
        for binding in bindings:
            if binding is trigger or binding.get("type") == "http":
                continue
            logger.warning(
                "Function %s: %s binding '%s' is not emulated by the dev host (%s)",
                name,
                binding.get("type"),
                binding.get("name"),
                "receives None" if binding.get("direction") == "in" else "the value set is discarded",
            )
        return info

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:7071`` (the real port once started with port 0)."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"

    def describe(self) -> list[str]:
        """One line per function, like ``func start`` prints them."""
        return [
            info.describe(self.url, self.timers_enabled) for info in sorted(self.functions.values(), key=lambda f: f.name.lower())
        ]

    def start(self) -> DevHost:
        """Bind, serve in a background thread and start the timer schedules."""
        if self._server is not None:
            raise RuntimeError("DevHost already started")
        self._stop.clear()
        self._server = _Server(self.host, self.port, self._wsgi, handler=_Handler)
        self._server.max_request_body_bytes = self.max_request_body_bytes
        self.port = self._server.server_address[1]
        self._server_thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="devhost-http", daemon=True
        )
        self._server_thread.start()
        logger.info("Dev host listening on %s (route prefix %r)", self.url, self.route_prefix)
        if self.host not in ("127.0.0.1", "localhost", "::1"):
            logger.warning(
                "Listening on %s: anyone who can reach it may run functions through "
                "/admin and act as the configured signed-in user",
                self.host,
            )
        for line in self.describe():  # the command line prints these to stdout
            logger.debug("  %s", line)
        if self.timers_enabled:
            for runner in self._timers.values():
                if not runner.fn.disabled:
                    runner.thread = threading.Thread(
                        target=runner.loop, args=(self._stop,), name=f"devhost-timer-{runner.fn.name}", daemon=True
                    )
                    runner.thread.start()
        for queue_runner in self._queues.values():
            if not queue_runner.fn.disabled:
                queue_runner.thread = threading.Thread(
                    target=queue_runner.loop, args=(self._stop,), name=f"devhost-queue-{queue_runner.fn.name}", daemon=True
                )
                queue_runner.thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and scheduling; waits up to ``timeout`` s for running timer functions."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for runner in self._timers.values():
            if runner.thread is not None:
                runner.thread.join(timeout)
                if runner.thread.is_alive():
                    logger.warning("Timer %s still running at shutdown", runner.fn.name)
                runner.thread = None
        for queue_runner in self._queues.values():
            if queue_runner.thread is not None:
                queue_runner.thread.join(timeout)
                queue_runner.thread = None
        with self._loop_guard:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._loop.stop)
                if self._loop_thread is not None:
                    self._loop_thread.join(timeout)
                if not self._loop.is_running():
                    self._loop.close()
                self._loop = self._loop_thread = None
        logger.info("Dev host stopped")

    def __enter__(self) -> DevHost:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # -- invoking functions --------------------------------------------------------------------

    def _run_lock(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(name.lower(), threading.Lock())

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """One shared loop for async functions, as in the Python worker."""
        with self._loop_guard:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._loop_thread = threading.Thread(target=self._loop.run_forever, name="devhost-asyncio", daemon=True)
                self._loop_thread.start()
            return self._loop

    def _arguments(
        self, info: _FunctionInfo, trigger_value: Any, context: _InvocationContext
    ) -> tuple[dict[str, Any], dict[str, _Out]]:
        """Keyword arguments by parameter name, as the worker binds them."""
        by_name = {b.get("name"): b for b in info.bindings}
        kwargs: dict[str, Any] = {}
        outputs: dict[str, _Out] = {}
        if info.signature is None:
            return {info.trigger["name"]: trigger_value}, outputs
        for parameter in info.signature.parameters.values():
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            binding = by_name.get(parameter.name)
            if parameter.name == info.trigger["name"]:
                kwargs[parameter.name] = trigger_value
            elif binding is not None and binding.get("direction") == "out":
                outputs[parameter.name] = kwargs[parameter.name] = _Out()
            elif binding is not None:
                kwargs[parameter.name] = None
            elif parameter.name == "context" or parameter.annotation in (func.Context, "func.Context"):
                kwargs[parameter.name] = context
            elif parameter.default is parameter.empty:
                kwargs[parameter.name] = None
        return kwargs, outputs

    def _invoke(self, info: _FunctionInfo, trigger_value: Any, *, reason: str) -> InvocationResult:
        """Call the user function (sync, or async on the shared loop); never raises."""
        invocation_id = str(uuid.uuid4())
        log_level = logging.DEBUG if info.is_http else logging.INFO
        logger.log(log_level, "Executing 'Functions.%s' (Reason='%s', Id=%s)", info.name, reason, invocation_id)
        context = _InvocationContext(info.name, info.directory, invocation_id)
        result = InvocationResult(info.name, invocation_id)
        started = time.perf_counter()
        tracking = _current_invocation.set(invocation_id)
        try:
            kwargs, outputs = self._arguments(info, trigger_value, context)
            value = info.user_function(**kwargs)
            if inspect.isawaitable(value):
                value = asyncio.run_coroutine_threadsafe(_await(value), self._event_loop()).result()
            result.value = value
            result.outputs = {name: out.get() for name, out in outputs.items()}
        except Exception as exc:  # noqa: BLE001 - a failing function must not take the host down
            result.error = exc
        finally:
            _current_invocation.reset(tracking)
        result.duration_ms = (time.perf_counter() - started) * 1000
        result.threads_left = _threads_left_by(invocation_id)
        if result.threads_left:
            with self._locks_guard:
                self.threads_left.extend(f"{info.name}: {name}" for name in result.threads_left)
            logger.warning(
                "%s: 'Functions.%s' (Id=%s) returned with threads it started still running: %s. Azure Functions"
                " does not track them and may stop the instance right after the answer; put work for later"
                " on a queue and join work done in parallel before returning",
                THREADS_LEFT_MARKER,
                info.name,
                invocation_id,
                ", ".join(result.threads_left),
            )
        if result.error is not None:
            logger.error(
                "Executed 'Functions.%s' (Failed, Id=%s, Duration=%.0fms)",
                info.name,
                invocation_id,
                result.duration_ms,
                exc_info=result.error,
            )
        else:
            logger.log(
                log_level,
                "Executed 'Functions.%s' (Succeeded, Id=%s, Duration=%.0fms)",
                info.name,
                invocation_id,
                result.duration_ms,
            )
            for name, value in result.outputs.items():
                if value is not None and name != info.http_output:
                    logger.info("Function %s set output binding '%s' (not emulated; discarded)", info.name, name)
        return result

    def invoke(self, name: str, input: Any = None, *, reason: str = "manual") -> InvocationResult:
        """Run a non-HTTP function now (what ``POST /admin/functions/<name>?wait=true`` does).

        Timer functions get a ``TimerRequest``; queue triggers a ``func.QueueMessage``;
        other triggers the raw ``input``. Waits for a run of the same function in progress.
        """
        info = self.functions.get(name.lower())
        if info is None:
            raise KeyError(name)
        if info.is_http:
            raise ValueError(f"{info.name} is an HTTP function; call its URL instead")
        if info.trigger_type == "timerTrigger":
            return self._timers[info.name.lower()].run_once(None, reason)
        if info.trigger_type == "queueTrigger":
            trigger_value: Any = func.QueueMessage(
                id=str(uuid.uuid4()), body=input if isinstance(input, (str, bytes)) else json.dumps(input)
            )
        else:
            trigger_value = input
        with self._run_lock(info.name):
            return self._invoke(info, trigger_value, reason=reason)

    # -- HTTP handling -------------------------------------------------------------------------

    def _wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        started = time.perf_counter()
        request = Request(environ)
        request.max_content_length = self.max_request_body_bytes
        method = request.method.upper()
        raw_path = urlsplit(environ.get("RAW_URI") or environ.get("REQUEST_URI") or request.path).path or "/"
        try:
            body = request.get_data(cache=False)
        except RequestEntityTooLarge:
            response = _Response.text(413)
        else:
            try:
                base_url = f"http://{request.host or f'{self.host}:{self.port}'}"
                query = environ.get("QUERY_STRING", "")
                response = self._handle(method, raw_path, query, request.headers.items(), body, base_url)
            except Exception:
                logger.exception("Dev host failed handling %s %s", method, raw_path)
                response = _Response.text(500)
        logger.info("%s %s %d %.0fms", method, raw_path, response.status, (time.perf_counter() - started) * 1000)
        headers = list(response.headers)
        if response.status >= 200 and response.status not in (204, 304):
            headers.append(("Content-Length", str(len(response.body))))
        start_response(f"{response.status} {HTTPStatus(response.status).phrase}", headers)
        return [response.body]

    def _handle(
        self, method: str, path: str, query: str, header_items: Iterable[tuple[str, str]], body: bytes, base_url: str
    ) -> _Response:
        method = method.upper()
        if path.lower() == "/admin" or path.lower().startswith("/admin/"):
            return self._handle_admin(method, path, query, body)
        matched: list[tuple[_FunctionInfo, dict[str, str]]] = []
        for info in self._http_functions:
            if info.disabled:
                continue
            values = info.http_route.match(path)
            if values is not None:
                matched.append((info, values))
        for info, values in matched:
            if info.methods is None or method in info.methods:
                return self._call_http_function(info, method, path, query, header_items, body, base_url, values)
        if matched:
            allowed = sorted({m for info, _ in matched for m in (info.methods or _ALL_METHODS)})
            return _Response.text(405, headers=[("Allow", ", ".join(allowed))])
        if path == "/" and method in ("GET", "HEAD"):
            return self._index_page()
        return _Response.text(404)

    def _request_headers(self, header_items: Iterable[tuple[str, str]]) -> dict[str, str]:
        headers: dict[str, tuple[str, str]] = {}
        for name, value in header_items:
            key = name.lower()
            if key.startswith(_EASY_AUTH_HEADER_PREFIXES):
                continue  # never trust these from a client, like Easy Auth
            if key in headers:
                separator = "; " if key == "cookie" else ", "
                headers[key] = (headers[key][0], f"{headers[key][1]}{separator}{value}")
            else:
                headers[key] = (name, value)
        if self.signed_in_user is not None:
            for name, value in self.signed_in_user.headers().items():
                headers[name.lower()] = (name, value)
        return dict(headers.values())

    @staticmethod
    def _query_params(query: str) -> dict[str, str]:
        """Decode once like ASP.NET: '+' is a space, '%2B' a plus; repeated keys joined by ','."""
        params: dict[str, str] = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            params[key] = f"{params[key]},{value}" if key in params else value
        return params

    def _call_http_function(
        self,
        info: _FunctionInfo,
        method: str,
        path: str,
        query: str,
        header_items: Iterable[tuple[str, str]],
        body: bytes,
        base_url: str,
        route_values: dict[str, str],
    ) -> _Response:
        request = func.HttpRequest(
            method=method,
            url=base_url + path + (f"?{query}" if query else ""),
            headers=self._request_headers(header_items),
            params=self._query_params(query),
            route_params=route_values,
            body=body,
        )
        result = self._invoke(info, request, reason=f"HTTP {method} {path}")
        if result.error is not None:
            return _Response.text(500)
        value = result.value if info.http_output == "$return" else result.outputs.get(info.http_output or "")
        try:
            return self._convert_response(value)
        except (TypeError, ValueError) as exc:
            logger.error("Function %s: %s", info.name, exc)
            return _Response.text(500)

    @staticmethod
    def _convert_response(value: Any) -> _Response:
        if isinstance(value, str):
            return _Response(200, [("Content-Type", "text/plain; charset=utf-8")], value.encode("utf-8"))
        if not isinstance(value, func.HttpResponse):
            raise TypeError(f"returned {type(value).__name__}; an HTTP function must return func.HttpResponse or str")
        headers = [(k, v) for k, v in value.headers.items() if k.lower() not in _HOP_BY_HOP]
        for name, header_value in headers:
            if "\r" in name or "\n" in name or "\r" in header_value or "\n" in header_value:
                raise ValueError(f"response header {name!r} contains a line break")
        if not any(k.lower() == "content-type" for k, _ in headers):
            mimetype = value.mimetype
            content_type = f"{mimetype}; charset={value.charset}" if mimetype.startswith("text/") else mimetype
            headers.append(("Content-Type", content_type))
        return _Response(int(value.status_code), headers, value.get_body() or b"")

    def _handle_admin(self, method: str, path: str, query: str, body: bytes) -> _Response:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts == ["admin", "host", "status"] and method in ("GET", "HEAD"):
            return _Response.json(200, {"state": "Running", "version": "devhost"})
        if len(parts) == 2 and parts[1].lower() == "functions" and method in ("GET", "HEAD"):
            return _Response.json(200, [self._metadata(f) for f in self.functions.values()])
        if len(parts) != 3 or parts[1].lower() != "functions":
            return _Response.text(404)
        info = self.functions.get(parts[2].lower())
        if info is None:
            return _Response.text(404, f"No function named {parts[2]!r}")
        if method in ("GET", "HEAD"):
            return _Response.json(200, self._metadata(info))
        if method != "POST":
            return _Response.text(405, headers=[("Allow", "GET, POST")])
        if info.is_http:
            return _Response.text(400, f"{info.name} is an HTTP function; call its URL instead")
        try:
            payload = json.loads(body) if body.strip() else {}
            input_value = payload.get("input") if isinstance(payload, dict) else None
        except ValueError:
            return _Response.text(400, 'Body must be JSON such as {"input": "..."}')
        wait = _truthy(self._query_params(query).get("wait"))
        if not wait:
            threading.Thread(
                target=self._invoke_in_background, args=(info.name, input_value), name=f"devhost-run-{info.name}", daemon=True
            ).start()
            return _Response(202)
        result = self.invoke(info.name, input_value, reason=_ADMIN_REASON)
        payload = {
            "name": info.name,
            "invocationId": result.invocation_id,
            "status": "Succeeded" if result.succeeded else "Failed",
            "durationMs": round(result.duration_ms),
        }
        if not result.succeeded:
            payload["error"] = type(result.error).__name__  # details are in the host log
        return _Response.json(200 if result.succeeded else 500, payload)

    def _invoke_in_background(self, name: str, input_value: Any) -> None:
        try:
            self.invoke(name, input_value, reason=_ADMIN_REASON)
        except Exception:
            logger.exception("On-demand run of %s failed", name)

    def _metadata(self, info: _FunctionInfo) -> dict:
        data = {"name": info.name, "trigger": info.trigger_type, "disabled": info.disabled, "config": {"bindings": info.bindings}}
        if info.is_http:
            data["invoke_url_template"] = f"{self.url}/{info.http_route.template}"
        if info.schedule_expression is not None:
            data["schedule"] = info.schedule_expression
        return data

    def _index_page(self) -> _Response:
        items = []
        for info in sorted(self.functions.values(), key=lambda f: f.name.lower()):
            line = html.escape(info.describe(self.url, self.timers_enabled))
            if info.is_http and "{" not in info.http_route.template and (info.methods is None or "GET" in info.methods):
                link = html.escape(f"/{info.http_route.template}")
                line = f'<a href="{link}">{line}</a>'
            items.append(f"<li>{line}</li>")
        page = (
            '<!doctype html><html><head><meta charset="utf-8"><title>Functions dev host</title>'
            "</head><body><h1>Functions dev host</h1><ul>" + "".join(items) + "</ul>"
            "<p>Run a non-HTTP function: <code>POST /admin/functions/&lt;name&gt;</code></p>"
            "</body></html>"
        )
        return _Response(200, [("Content-Type", "text/html; charset=utf-8")], page.encode("utf-8"))


async def _await(awaitable: Any) -> Any:
    return await awaitable


# --------------------------------------------------------------------------------------------
# Settings, app loading, command line
# --------------------------------------------------------------------------------------------


def load_local_settings(
    path: str | Path, *, required: bool = False, environ: MutableMapping[str, str] | None = None
) -> dict[str, Any]:
    """Load ``Values`` of a local.settings.json into the environment; the environment wins.

    Returns the parsed document (``{}`` when the file is absent and not ``required``).
    """
    environ = os.environ if environ is None else environ
    settings_path = Path(path)
    if not settings_path.is_file():
        if required:
            raise DevHostError(f"settings file {settings_path} not found")
        logger.info("No %s; using the environment only", settings_path)
        return {}
    try:
        document = json.loads(settings_path.read_text(encoding="utf-8-sig"))
    except ValueError as exc:
        raise DevHostError(f"{settings_path}: not valid JSON ({exc})") from exc
    if document.get("IsEncrypted"):
        raise DevHostError(
            f"{settings_path}: encrypted settings are not supported (run 'func settings decrypt' or set IsEncrypted to false)"
        )
    applied = []
    for name, value in (document.get("Values") or {}).items():
        if value is None or name in environ:
            continue
        environ[name] = value if isinstance(value, str) else json.dumps(value)
        applied.append(name)
    logger.info("Loaded %d setting(s) from %s (existing environment variables win)", len(applied), settings_path)
    return document


def load_app(spec: str) -> tuple[Any, Any]:
    """Import ``module[:attribute]`` (attribute defaults to ``app``); returns (app, module)."""
    module_name, _, attribute = spec.partition(":")
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    module = importlib.import_module(module_name)
    try:
        app = getattr(module, attribute or "app")
    except AttributeError:
        raise DevHostError(f"module {module_name!r} has no attribute {attribute or 'app'!r}") from None
    if not hasattr(app, "get_functions"):
        raise DevHostError(f"{spec} is not a func.FunctionApp")
    return app, module


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.devhost", description="Serve an Azure Functions v2 Python app locally."
    )
    parser.add_argument("--app", default="function_app:app", help="module:attribute (default %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default %(default)s)")
    parser.add_argument(
        "--port", type=int, default=None, help=f"port (default: Host.LocalHttpPort of the settings file, else {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--settings", default=None, help="local.settings.json to load (default: ./local.settings.json if present)"
    )
    parser.add_argument(
        "--no-timers", action="store_true", help="do not run timer schedules (POST /admin/functions/<name> still works)"
    )
    parser.add_argument("--no-queues", action="store_true", help="do not poll the queue triggers' queues")
    parser.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    try:
        settings = load_local_settings(args.settings or "local.settings.json", required=args.settings is not None)
        port = args.port
        if port is None:
            port = int((settings.get("Host") or {}).get("LocalHttpPort") or DEFAULT_PORT)
        host = DevHost.from_module(args.app, host=args.host, port=port, timers=not args.no_timers, queues=not args.no_queues)
        host.start()
    except DevHostError as exc:
        logger.error("Cannot start: %s", exc)
        return 1
    except (ImportError, OSError, ValueError) as exc:
        logger.error("Cannot start: %s", exc, exc_info=not isinstance(exc, OSError))
        return 1

    print("\nFunctions:\n")
    for line in host.describe():
        print(f"        {line}\n")
    print("For detailed output, run with --log-level DEBUG. Stop with Ctrl+C.", flush=True)

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        while not stopping.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    host.stop()
    return 0


if __name__ == "__main__":
    # Run the package module rather than this __main__ copy, so logger names and the classes
    # are the same ones the app and tests import (devtools.devhost).
    from devtools.devhost import main as _main

    sys.exit(_main())
