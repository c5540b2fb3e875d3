"""The history API on the history role's listener (PERKAMO_ADMIN_LISTEN, docs/support.md).

The embedded history engine opens in one process only, so the CLI and support tools read
history and ask for resends and replays through this API.

    GET  /api/v1/deliveries?space=&status=&event_type=&since=&until=&limit=&cursor=
    GET  /api/v1/deliveries/{delivery_id}[?space=&include_body=true]
    GET  /api/v1/endpoints/health
    POST /api/v1/deliveries/{delivery_id}/resend        {"force": false, "space"?}
    POST /api/v1/replay  {"space", "since", "until"?, "status"?, "dry_run"?, "force"?}

Reads need the read-only or the admin token; resend, replay and stored payloads the admin
token (consumer.auth). Every read has a bounded window (PERKAMO_HISTORY_MAX_SPAN_DAYS), a
server-side time limit (PERKAMO_HISTORY_QUERY_TIMEOUT_S) and runs on a pool of its own, at
most PERKAMO_HISTORY_MAX_CONCURRENT_QUERIES at once (more: 429 with Retry-After); the console
shares that pool (read_pool.ReadPool) and may hold all its places but one. A by-id call with
`space` reads and re-publishes that Space's rows only (the filter is in the SQL). A replay
asked for with `Accept: application/x-ndjson` streams one JSON line per published chunk, then
the result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, Protocol, TypeVar

import orjson
from aiohttp import web

from consumer.admin import API, HealthView, ReadinessCheck, build_app, json_answer
from consumer.auth import ADMIN, AdminAuth
from consumer.config import Settings
from consumer.errors import BadRequest, NotFound, NotReady, PublishFailed
from consumer.metrics import Metrics
from consumer.queries import (
    DEFAULT_LIMIT,
    DeliveryFilter,
    Reader,
    check_span,
    check_text,
    delivery_detail,
    list_deliveries,
    parse_time,
)
from consumer.read_pool import ReadPool
from consumer.republish import Republisher
from consumer.republish_plan import ReplayPlan, Selection

log = logging.getLogger(__name__)

T = TypeVar("T")

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


def history_app(
    metrics: Metrics,
    readiness: ReadinessCheck,
    context: AdminContext,
    health: HealthView | None = None,
    reads: ReadPool | None = None,
) -> web.Application:
    """The history role's admin application: probes and the history API. `reads` is the pool
    and places its reads take (the role shares them with the console it mounts beside)."""
    app = build_app(metrics, readiness, context.settings, health=health)
    api = HistoryApi(context, metrics, reads)
    api.register(app.router)

    async def close_pool(_: web.Application) -> None:
        api.close()

    app.on_cleanup.append(close_pool)
    return app


class HistoryApi:
    """Handlers of /api/v1: reads off the event loop on a pool of their own (the store's client
    blocks; the loop's default executor is left to others), writes through Kafka."""

    def __init__(self, context: AdminContext, metrics: Metrics, reads: ReadPool | None = None) -> None:
        settings = context.settings
        self._store = context.store
        self._auth = AdminAuth.from_settings(settings)
        self._max_span = timedelta(days=settings.history_max_span_days)
        # The history reads' pool and places, shared with the console (consumer.history_role).
        self.reads = reads or ReadPool(settings.history_max_concurrent_queries)
        self._slot = self.reads.slot
        self._republisher = context.republisher

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking read on the history pool, within a concurrency place."""
        return await self.reads.run(fn, *args)

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
        return json_answer(page.as_json())

    async def delivery(self, request: web.Request) -> web.Response:
        delivery_id = check_text("delivery_id", request.match_info["delivery_id"], required=True)
        unknown = set(request.query) - {"space", "include_body"}
        if unknown:
            raise BadRequest(f"unknown parameter {sorted(unknown)[0]!r}; known: include_body, space")
        space = check_text("space", request.query.get("space", ""))
        with_body = _bool(request.query.get("include_body"), "include_body")
        if with_body:  # the payload is customer data
            self._authorize(request)
        detail = await self._read(delivery_detail, self._store, delivery_id, with_body, space)
        if detail is None:
            raise NotFound(f"history has no attempt of delivery {delivery_id}")
        return json_answer(detail)

    async def resend(self, request: web.Request) -> web.Response:
        self._authorize(request)
        body = await _body(request, frozenset({"force", "space"}), required=False)
        force = _field_bool(body, "force")
        space = check_text("space", _field_str(body, "space"))
        delivery_id = check_text("delivery_id", request.match_info["delivery_id"], required=True)
        async with self._slot():
            result = await self._republisher.resend(delivery_id, force=force, space=space)
        return json_answer(result.as_json(), status=202)

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
            return json_answer(plan.as_json(published=0, dry_run=dry_run))
        if NDJSON not in request.headers.get("Accept", ""):
            published = await self._republisher.execute(plan)
            return json_answer(plan.as_json(published, dry_run=False), status=202)
        return await self._stream_replay(request, plan)

    async def _stream_replay(self, request: web.Request, plan: ReplayPlan) -> web.StreamResponse:
        response = web.StreamResponse(status=202, headers={"Content-Type": NDJSON})
        try:
            await response.prepare(request)
        except BaseException:  # the client left before anything was published
            self._republisher.release(plan)
            raise
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
        except (PublishFailed, NotReady) as exc:
            await line({"error": str(exc), "status": exc.status, "published": 0, **exc.fields()})
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
        self.reads.close()


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


