"""The admin HTTP server on PERKAMO_ADMIN_LISTEN: /metrics, /healthz, /readyz and the history
API (DESIGN §8). The embedded history engine opens in one process only, so the CLI and support
tools read history and ask for resends and replays through this API.

    GET  /api/v1/deliveries?space=&status=&event_type=&since=&until=&limit=&cursor=
    GET  /api/v1/deliveries/{delivery_id}[?include_body=true]
    GET  /api/v1/endpoints/health
    POST /api/v1/deliveries/{delivery_id}/resend        {"force": false}
    POST /api/v1/replay  {"space", "since", "until"?, "status"?, "dry_run"?, "force"?}

Who may call what is `consumer.auth`: every /api/v1 call needs a token (reads: the read-only
or the admin token; resend, replay and stored payloads: the admin token) and a Host header
naming this service; /metrics and the probes stay open. Every read has a bounded window
(PERKAMO_HISTORY_MAX_SPAN_DAYS), a server-side time limit (PERKAMO_HISTORY_QUERY_TIMEOUT_S)
and runs on a pool of its own, at most PERKAMO_HISTORY_MAX_CONCURRENT_QUERIES at once (more:
429 with Retry-After). Errors are JSON `{"error": "..."}` with 400/401/403/404/409/421/429/
502/503; bad input is a 400 naming the parameter. A replay asked for with
`Accept: application/x-ndjson` streams one JSON line per published chunk, then the result.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, Protocol, TypeVar

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consumer.auth import ADMIN, AdminAuth, AuthError, install, token_ok
from consumer.config import Settings
from consumer.console import ConsoleContext
from consumer.console import mount as mount_console
from consumer.metrics import Metrics
from consumer.queries import (
    DEFAULT_LIMIT,
    BadRequest,
    DeliveryFilter,
    Reader,
    check_span,
    check_text,
    delivery_detail,
    list_deliveries,
    parse_time,
)
from consumer.republish import (
    Conflict,
    NotFound,
    NotReady,
    PublishFailed,
    ReplayPlan,
    Republisher,
    Selection,
)

log = logging.getLogger(__name__)

__all__ = ["ApiError", "HistoryApi", "build_app", "start_admin", "token_ok"]

T = TypeVar("T")
ReadinessCheck = Callable[[], Awaitable[dict[str, bool]]]
HealthView = Callable[[], dict[str, dict[str, Any]]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

API = "/api/v1"
NDJSON = "application/x-ndjson"
_LIST_PARAMS = frozenset({"space", "status", "event_type", "since", "until", "limit", "cursor"})
_REPLAY_FIELDS = frozenset({"space", "since", "until", "status", "dry_run", "force"})


class AdminContext(Protocol):
    """What the history API needs of the running service (consumer.history_role.HistoryRole has it)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def store(self) -> Reader: ...

    @property
    def republisher(self) -> Republisher:
        """One per process, shared with the console (its double-work guard is per instance)."""

    def endpoints_health(self) -> dict[str, dict[str, Any]]:
        """Per Space: its endpoint's health (consumer.health)."""


class ApiError(Exception):
    """An answer other than 2xx: status, message, and extra JSON fields."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers
        self.extra = extra


def _dumps(doc: Any) -> str:
    return orjson.dumps(doc).decode()


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.json_response(doc, status=status, dumps=_dumps)


def build_app(
    metrics: Metrics,
    readiness: ReadinessCheck,
    settings: Settings,
    *,
    context: AdminContext | None = None,
    health: HealthView | None = None,
    console: ConsoleContext | None = None,
) -> web.Application:
    """/metrics and probes (open); with `context`, the history API; with `health`, endpoint
    health; with `console`, /console/. Every /api/v1 route needs a token (consumer.auth)."""
    app = web.Application(middlewares=[_errors])
    install(app, AdminAuth.from_settings(settings))

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
            return _json({"endpoints": health()})

        app.router.add_get(f"{API}/endpoints/health", endpoints_health)
    if context is not None:
        HistoryApi(context, metrics).register(app.router)
    if console is not None:
        mount_console(app, console)
    return app


class HistoryApi:
    """Handlers of /api/v1: reads off the event loop on a pool of their own (the store's client
    blocks; the loop's default executor is left to others), writes through Kafka."""

    def __init__(self, context: AdminContext, metrics: Metrics) -> None:
        settings = context.settings
        self._store = context.store
        self._auth = AdminAuth.from_settings(settings)
        self._max_span = timedelta(days=settings.history_max_span_days)
        self._slots = settings.history_max_concurrent_queries
        self._busy = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self._slots, thread_name_prefix="history-read"
        )
        self._republisher = context.republisher

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """One of the PERKAMO_HISTORY_MAX_CONCURRENT_QUERIES places, or 429 at once."""
        if self._busy >= self._slots:
            raise ApiError(
                429,
                f"{self._busy} history queries are running (PERKAMO_HISTORY_MAX_CONCURRENT_QUERIES);"
                " retry in a moment",
                headers={"Retry-After": "1"},
            )
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking read on the history pool, within a concurrency place."""
        async with self._slot():
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, fn, *args)

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get(f"{API}/deliveries", self.deliveries)
        router.add_get(f"{API}/deliveries/{{delivery_id}}", self.delivery)
        router.add_post(f"{API}/deliveries/{{delivery_id}}/resend", self.resend)
        router.add_post(f"{API}/replay", self.replay)

    async def deliveries(self, request: web.Request) -> web.Response:
        query = request.query
        unknown = set(query) - _LIST_PARAMS
        if unknown:
            known = ", ".join(sorted(_LIST_PARAMS))
            raise BadRequest(f"unknown parameter {sorted(unknown)[0]!r}; known: {known}")
        flt = DeliveryFilter(
            space=query.get("space", ""),
            status=query.get("status", ""),
            event_type=query.get("event_type", ""),
            since=parse_time(query["since"], name="since") if query.get("since") else None,
            until=parse_time(query["until"], name="until") if query.get("until") else None,
        )
        limit = _int(query.get("limit"), "limit", DEFAULT_LIMIT)
        cursor = check_text("cursor", query.get("cursor", "")) or None
        page = await self._read(list_deliveries, self._store, flt, limit, cursor, self._max_span)
        return _json(page.as_json())

    async def delivery(self, request: web.Request) -> web.Response:
        delivery_id = check_text("delivery_id", request.match_info["delivery_id"], required=True)
        with_body = _bool(request.query.get("include_body"), "include_body")
        if with_body:  # the payload is customer data
            self._authorize(request)
        detail = await self._read(delivery_detail, self._store, delivery_id, with_body)
        if detail is None:
            raise NotFound(f"history has no attempt of delivery {delivery_id}")
        return _json(detail)

    async def resend(self, request: web.Request) -> web.Response:
        self._authorize(request)
        body = await _body(request, frozenset({"force"}), required=False)
        force = _field_bool(body, "force")
        delivery_id = check_text("delivery_id", request.match_info["delivery_id"], required=True)
        async with self._slot():
            result = await self._republisher.resend(delivery_id, force=force)
        return _json(result.as_json(), status=202)

    async def replay(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request)
        body = await _body(request, _REPLAY_FIELDS, required=True)
        until = _field_str(body, "until")
        since = parse_time(_field_str(body, "since") or _missing("since"), name="since")
        until_at = parse_time(until, name="until") if until else None
        check_span(since, until_at or datetime.now(UTC), self._max_span)
        selection = Selection(
            space=check_text("space", _field_str(body, "space")),
            since=since,
            until=until_at,
            status=_field_str(body, "status"),
        )
        dry_run = _field_bool(body, "dry_run")
        force = _field_bool(body, "force")
        async with self._slot():
            plan = await self._republisher.plan_replay(selection, force, reserve=not dry_run)
        if dry_run or not plan.todo:
            return _json(plan.as_json(published=0, dry_run=dry_run))
        if NDJSON not in request.headers.get("Accept", ""):
            published = await self._republisher.execute(plan)
            return _json(plan.as_json(published, dry_run=False), status=202)
        return await self._stream_replay(request, plan)

    async def _stream_replay(self, request: web.Request, plan: ReplayPlan) -> web.StreamResponse:
        response = web.StreamResponse(status=202, headers={"Content-Type": NDJSON})
        await response.prepare(request)
        alive = True

        async def line(doc: dict[str, Any]) -> None:
            nonlocal alive
            if not alive:
                return
            try:
                await response.write(orjson.dumps(doc) + b"\n")
            except (ConnectionError, RuntimeError):
                alive = False  # the client left; the replay goes on to the end regardless

        async def progress(published: int) -> None:
            await line({"published": published, "eligible": len(plan.todo)})

        await line({"replay_id": plan.replay_id, "matched": plan.matched,
                    "eligible": len(plan.todo)})
        try:
            published = await self._republisher.execute(plan, progress)
        except PublishFailed as exc:
            await line({"error": str(exc), "status": 502, "published": exc.published})
        except NotReady as exc:
            await line({"error": str(exc), "status": 503, "published": 0})
        except Exception as exc:  # the answer has begun: report in the stream, not as a status
            log.exception("replay %s failed while publishing", plan.replay_id)
            await line({"error": f"replay stopped ({type(exc).__name__}); see the consumer log "
                                 "and the history before replaying the rest", "status": 503})
        else:
            await line({"result": plan.as_json(published, dry_run=False)})
        if alive:
            await response.write_eof()
        return response

    def _authorize(self, request: web.Request) -> None:
        """The admin scope (the middleware already let the read scope through)."""
        self._auth.require(request, ADMIN)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@web.middleware
async def _errors(  # noqa: PLR0911 - one answer per error type
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """Map the API's errors to JSON answers; never echo payloads or URLs."""
    try:
        return await handler(request)
    except AuthError as exc:
        return exc.response()
    except ApiError as exc:
        response = _json({"error": str(exc), **exc.extra}, status=exc.status)
        response.headers.update(exc.headers or {})
        return response
    except BadRequest as exc:
        return _json({"error": str(exc)}, status=400)
    except NotFound as exc:
        return _json({"error": str(exc)}, status=404)
    except Conflict as exc:
        doc = {"error": str(exc), "replay_id": exc.replay_id or None, **exc.details}
        return _json(doc, status=409)
    except NotReady as exc:
        return _json({"error": str(exc)}, status=503)
    except PublishFailed as exc:
        return _json({"error": str(exc), "published": exc.published}, status=502)
    except web.HTTPException as exc:
        if not request.path.startswith(API) or exc.status < 400:
            raise
        # aiohttp's own answers (no such route, method not allowed, body too large) in JSON too
        response = _json({"error": f"{exc.reason.lower()}: {request.method} {_route_hint(request)}"},
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
            return _json({"error": "the history query took longer than "
                                   "PERKAMO_HISTORY_QUERY_TIMEOUT_S; narrow the time window or add "
                                   "filters"}, status=503)
        log.exception("admin API %s %s failed", request.method, where)
        return _json({"error": f"history store or broker unavailable ({type(exc).__name__}); "
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


def _missing(name: str) -> NoReturn:
    raise BadRequest(f"{name} is required")


def _int(value: str | None, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    if len(value) > 12 or not value.isascii() or not value.strip().lstrip("-").isdigit():
        raise BadRequest(f"{name} must be an integer")
    return int(value)


def _bool(value: str | None, name: str) -> bool:
    if value is not None and (len(value) > 8 or not value.isascii()):
        raise BadRequest(f"{name} must be true or false")
    if value is None or value.lower() in ("", "0", "false", "no"):
        return False
    if value.lower() in ("1", "true", "yes"):
        return True
    raise BadRequest(f"{name} must be true or false")


async def _body(request: web.Request, allowed: frozenset[str], required: bool) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        if required:
            raise BadRequest("a JSON object body is required")
        return {}
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = set(doc) - allowed
    if unknown:
        known = ", ".join(sorted(allowed))
        raise BadRequest(f"unknown field {sorted(unknown)[0]!r}; known: {known}")
    return doc


def _field_str(doc: dict[str, Any], name: str) -> str:
    value = doc.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    return value


def _field_bool(doc: dict[str, Any], name: str) -> bool:
    value = doc.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false")
    return value


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
