"""A tiny v2-model function app for the dev-host tests.

Deliberately independent of the project's ``function_app.py``: it exercises the dev host with
blueprints, route parameters, a POST echo, a failing function, an async function, a timer
whose schedule comes from the ``SAMPLE_SCHEDULE`` app setting and a timer that always fails.
"""

from __future__ import annotations

import asyncio
import json
import threading

import azure.functions as func

pages = func.Blueprint()
api = func.Blueprint()
jobs = func.Blueprint()

#: every run of ``sample_timer``: {"past_due": bool, "schedule_status": dict}
TIMER_RUNS: list[dict] = []
TIMER_RUNS_LOCK = threading.Lock()


def _json(payload: object, status_code: int = 200, **kwargs) -> func.HttpResponse:
    return func.HttpResponse(json.dumps(payload), status_code=status_code, mimetype="application/json", **kwargs)


@pages.route(route="hello/{name}", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def hello(req: func.HttpRequest) -> func.HttpResponse:
    response = func.HttpResponse(f"Hello, {req.route_params['name']}!", headers={"X-Greeting": "hi", "Set-Cookie": "a=1; Path=/"})
    response.headers.add("Set-Cookie", "b=2; Path=/")
    return response


@api.function_name("inspect")
@api.route(route="inspect", methods=["GET", "POST"], auth_level=func.AuthLevel.ANONYMOUS)
def inspect_request(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    """Echo what the function received, so tests can check what the host built."""
    return _json(
        {
            "method": req.method,
            "url": req.url,
            "params": dict(req.params),
            "route_params": dict(req.route_params),
            "headers": dict(req.headers),
            "body": req.get_body().decode("utf-8", "replace"),
            "function_name": context.function_name,
            "invocation_id": context.invocation_id,
        }
    )


@api.route(route="echo", methods=[func.HttpMethod.POST], auth_level=func.AuthLevel.ANONYMOUS)
def echo(req: func.HttpRequest) -> func.HttpResponse:
    try:
        payload = req.get_json()
    except ValueError:
        return _json({"error": "body must be JSON"}, status_code=400)
    return _json({"received": payload}, headers={"X-Echo-Length": str(len(req.get_body()))})


@api.route(route="boom", auth_level=func.AuthLevel.ANONYMOUS)
def boom(req: func.HttpRequest) -> func.HttpResponse:
    raise RuntimeError("secret internal detail")


@api.route(route="orders/{orderId}/lines/{line}", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def order_line(req: func.HttpRequest) -> str:
    return f"order={req.route_params['orderId']} line={req.route_params['line']}"


@api.route(route="orders/latest/lines/{line}", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def latest_order_line(req: func.HttpRequest) -> str:
    return f"latest line={req.route_params['line']}"


@api.route(route="slow", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def slow_async(req: func.HttpRequest) -> func.HttpResponse:
    await asyncio.sleep(0.01)
    return func.HttpResponse("async ok")


@jobs.timer_trigger(schedule="%SAMPLE_SCHEDULE%", arg_name="timer", run_on_startup=False)
def sample_timer(timer: func.TimerRequest) -> None:
    with TIMER_RUNS_LOCK:
        TIMER_RUNS.append({"past_due": timer.past_due, "schedule_status": dict(timer.schedule_status)})


@jobs.timer_trigger(schedule="0 0 0 1 1 *", arg_name="timer")
def failing_job(timer: func.TimerRequest) -> None:
    raise ValueError("this job always fails")


app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
app.register_functions(pages)
app.register_functions(api)
app.register_blueprint(jobs)
