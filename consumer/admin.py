"""The admin HTTP server of each role: /metrics, /healthz, /readyz, and the error answers.

Both roles serve /metrics and the probes (open to any caller and Host) on their listener; the
deliver role adds its view of endpoint health, the history role the history API
(consumer.history_api) and the console. Who may call what is `consumer.auth`: every /api/v1
call needs a token and a Host header naming this service. Errors are JSON `{"error": "..."}`
with 400/401/403/404/409/421/429/502/503; bad input is a 400 naming the parameter, and an
unexpected failure a 503 that repeats nothing of it. Every answer (the API's carry customer data)
says `Cache-Control: no-store` and `X-Content-Type-Options: nosniff`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consumer.auth import AdminAuth, AuthError, install, token_ok
from consumer.config import Settings
from consumer.errors import ApiError, RequestError
from consumer.metrics import Metrics

log = logging.getLogger(__name__)

__all__ = ["API", "ApiError", "build_app", "json_answer", "start_admin", "token_ok"]

T = TypeVar("T")
ReadinessCheck = Callable[[], Awaitable[dict[str, bool]]]
HealthView = Callable[[], dict[str, dict[str, Any]]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

API = "/api/v1"
# On every answer of the admin listener, streamed ones and errors included.
ANSWER_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def _dumps(doc: Any) -> str:
    return orjson.dumps(doc).decode()


def json_answer(doc: Any, status: int = 200) -> web.Response:
    return web.json_response(doc, status=status, dumps=_dumps)


def build_app(
    metrics: Metrics,
    readiness: ReadinessCheck,
    settings: Settings,
    *,
    health: HealthView | None = None,
) -> web.Application:
    """/metrics and probes (open) and, with `health`, /api/v1/endpoints/health; the history
    role adds the history API (consumer.history_api) and the console. Every /api/v1 route
    needs a token (consumer.auth)."""
    app = web.Application(middlewares=[_errors])
    install(app, AdminAuth.from_settings(settings))
    app.on_response_prepare.append(_answer_headers)

    async def metrics_handler(_: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        checks = await readiness()
        ready = all(checks.values())
        return web.json_response(
            {"status": "ready" if ready else "not ready", "checks": checks},
            status=200 if ready else 503,
        )

    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if health is not None:
        async def endpoints_health(_: web.Request) -> web.Response:
            return json_answer({"endpoints": health()})

        app.router.add_get(f"{API}/endpoints/health", endpoints_health)
    return app


async def _answer_headers(_: web.Request, response: web.StreamResponse) -> None:
    for name, value in ANSWER_HEADERS.items():
        response.headers.setdefault(name, value)


@web.middleware
async def _errors(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """Map the API's errors to JSON answers; never echo payloads or URLs."""
    try:
        return await handler(request)
    except AuthError as exc:
        return exc.response()
    except RequestError as exc:  # each carries its status (consumer.errors)
        response = json_answer({"error": str(exc), **exc.fields()}, status=exc.status)
        response.headers.update(exc.headers())
        return response
    except web.HTTPException as exc:
        if not request.path.startswith(API) or exc.status < 400:
            raise
        # aiohttp's own answers (no such route, method not allowed, body too large) in JSON too
        response = json_answer({"error": f"{exc.reason.lower()}: {request.method} {_route_hint(request)}"},
                         status=exc.status)
        response.headers.update({k: v for k, v in exc.headers.items() if k.lower() == "allow"})
        return response
    except Exception as exc:
        if not request.path.startswith(API):
            raise
        route = request.match_info.route.resource
        where = route.canonical if route else "?"
        if _timed_out(exc):
            log.warning("admin API %s %s: history query exceeded its time limit", request.method, where)
            return json_answer({"error": "the history query took longer than "
                                   "PERKAMO_HISTORY_QUERY_TIMEOUT_S; narrow the time window or add "
                                   "filters"}, status=503)
        log.exception("admin API %s %s failed", request.method, where)
        return json_answer({"error": f"history store or broker unavailable ({type(exc).__name__}); "
                               "see the consumer log"}, status=503)


def _route_hint(request: web.Request) -> str:
    """The request's route for an error message: the API routes, never the caller's text."""
    known = ("/api/v1/deliveries", "/api/v1/deliveries/{delivery_id}",
             "/api/v1/deliveries/{delivery_id}/resend", "/api/v1/replay")
    return f"is not one of {', '.join(known)}"


def _timed_out(exc: BaseException) -> bool:
    """ClickHouse stopped the query at max_execution_time (code 159, TIMEOUT_EXCEEDED)."""
    text = str(exc)
    return "TIMEOUT_EXCEEDED" in text or "Code: 159" in text


class _ServerLog(logging.Logger):
    """aiohttp's server logger, minus tracebacks for requests that are not valid HTTP.

    aiohttp logs a malformed request (a control character in a header, a broken request line)
    with `logger.exception` before answering 400: anyone who reaches the port could fill the
    log with tracebacks. Those become one warning line; every other error keeps its traceback."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            log.warning("refused a malformed HTTP request (400): %s",
                        str(exc_info.message)[:120].replace("\n", " "))
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


_SERVER_LOG = _ServerLog("aiohttp.server.perkamo")
_SERVER_LOG.parent = logging.getLogger("aiohttp.server")


async def start_admin(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, logger=_SERVER_LOG)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("admin API and /metrics on %s:%d", host, port)
    return runner
