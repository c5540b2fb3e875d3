"""The console's pages and forms under /console/ (aiohttp handlers).

Every handler starts from the session: an admin session sees every Space; a Space-scoped
session (from a `console-link`) has its Space forced into every query and checked on every
action, on the server, whatever the URL or form says. A delivery, replay or endpoint of
another Space answers exactly like one that does not exist (404), so guessing ids tells
nothing. Every POST needs the session's CSRF token, and a same-origin request.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any, Final
from urllib.parse import urlencode, urlsplit

import orjson
from aiohttp import web

from consumer.console.auth import ROLE_ADMIN, ROLE_SPACE, Keys, Revoked, Session, Throttle
from consumer.console.context import ConsoleContext
from consumer.console.render import STATIC, pretty_body, render
from consumer.constants import ENDPOINTS_TOPIC
from consumer.delivery import contract_headers
from consumer.endpoints import parse_record, record_of
from consumer.errors import InvalidEndpoint, KafkaError, PerkamoError
from consumer.models import Endpoint, Event
from consumer.queries import (
    STATUSES,
    BadRequest,
    DeliveryFilter,
    check_text,
    delivery_attempts,
    iso,
    list_newest_first,
    parse_time,
    search_deliveries,
    success_rates,
)
from consumer.republish import Conflict, NotFound, NotReady, PublishFailed, ReplayPlan, Selection
from consumer.schemas import schema_path

log = logging.getLogger(__name__)

PREFIX: Final = "/console"
COOKIE: Final = "perkamo_console"
PRE_COOKIE: Final = "perkamo_console_pre"  # sign-in form nonce (login CSRF)
PAGE_SIZE: Final = 50
CSP: Final = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
              "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
RESEND_WAIT_S: Final = 120  # how long a delivery page refreshes itself waiting for a resend
_JOBS_KEPT: Final = 100
_TIMING_COLUMNS: Final = ("dns_ms", "connect_ms", "tls_ms", "ttfb_ms")
_HTML: Final = "text/html"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ConsoleError(Exception):
    """Answer with an error page: status and a sentence for the person reading it."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


def _not_found(what: str) -> ConsoleError:
    return ConsoleError(404, f"No {what} here. It may not exist, be past the history's retention, "
                             "or belong to a Space this session cannot see.")


@cache
def _slug_re() -> re.Pattern[str]:
    schema = orjson.loads(schema_path("endpoint.schema.json").read_bytes())
    return re.compile(str(schema["properties"]["space"]["pattern"]))


def valid_slug(space: str) -> bool:
    """A Space slug as the endpoint record schema defines it."""
    return len(space) <= 128 and _slug_re().fullmatch(space) is not None


@dataclass(slots=True)
class ReplayJob:
    """A confirmed replay publishing in the background; its page shows the progress."""

    id: str
    space: str
    plan: ReplayPlan
    started: float = field(default_factory=time.time)
    published: int = 0
    state: str = "publishing"  # publishing | done | failed
    error: str = ""
    task: asyncio.Task[None] | None = None


class Console:
    """The console's handlers over one ConsoleContext."""

    def __init__(self, ctx: ConsoleContext) -> None:
        self._ctx = ctx
        settings = ctx.settings
        self._keys = Keys.from_settings(settings.console_secret.get_secret_value(),
                                        settings.admin_token.get_secret_value())
        self._ttl_s = settings.console_session_ttl_s
        self._base_url = settings.console_base_url
        self._revoked = Revoked()
        self._throttle = Throttle()
        self._jobs: OrderedDict[str, ReplayJob] = OrderedDict()
        self._running: set[asyncio.Task[None]] = set()  # strong references until they finish

    # Assembly -------------------------------------------------------------------------------

    def application(self) -> web.Application:
        app = web.Application(middlewares=[_security_headers, self._error_pages])
        r = app.router
        r.add_get("/", self.index)
        r.add_post("/sign-in", self.sign_in)
        r.add_post("/sign-out", self.sign_out)
        r.add_get("/link", self.link_landing)
        r.add_post("/link", self.link_open)
        r.add_get("/deliveries", self.deliveries)
        r.add_get("/deliveries/{delivery_id}", self.delivery)
        r.add_post("/deliveries/{delivery_id}/resend", self.resend)
        r.add_get("/replay", self.replay_form)
        r.add_post("/replay", self.replay_confirm)
        r.add_get("/replay/{job_id}", self.replay_job)
        r.add_get("/endpoints", self.endpoints)
        r.add_post("/endpoints", self.endpoint_edit)
        r.add_get("/endpoints/{space}", self.endpoint)
        r.add_post("/endpoints/{space}/reveal", self.endpoint_reveal)
        r.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
        app.on_shutdown.append(self._stop_jobs)
        return app

    async def _stop_jobs(self, _: web.Application) -> None:
        for task in list(self._running):
            task.cancel()

    @web.middleware
    async def _error_pages(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ConsoleError as exc:
            return self._page(request, "error.html", self._session(request), status=exc.status,
                              headers=exc.headers, message=str(exc), title=f"Error {exc.status}")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return self._page(request, "error.html", self._session(request), status=exc.status,
                              message=exc.reason, title=f"Error {exc.status}")
        except Exception as exc:  # the store or the broker: say so, never echo what failed
            route = request.match_info.route.resource
            log.exception("console %s %s failed", request.method, route.canonical if route else "?")
            return self._page(request, "error.html", None, status=503, title="Error 503",
                              message=f"The history store or the broker is unavailable "
                                      f"({type(exc).__name__}): try again shortly; details are in "
                                      "the service log.")

    # Sessions -------------------------------------------------------------------------------

    def _session(self, request: web.Request) -> Session | None:
        if self._keys is None:
            return None
        session = self._keys.session(request.cookies.get(COOKIE, ""))
        if session is None or session.sid in self._revoked:
            return None
        return session

    def _require(self, request: web.Request) -> Session:
        self._require_keys()
        session = self._session(request)
        if session is None:
            if request.method == "GET":
                raise web.HTTPSeeOther(location=f"{PREFIX}/")
            raise ConsoleError(403, "Your session has ended: sign in again; nothing was done.")
        return session

    def _require_keys(self) -> Keys:
        if self._keys is None:
            raise ConsoleError(503, "The console is off: set PERKAMO_ADMIN_TOKEN (or "
                                    "PERKAMO_CONSOLE_SECRET for links only) on the service.")
        return self._keys

    async def _form(self, request: web.Request, session: Session) -> Mapping[str, str]:
        """The POSTed form, after the same-origin and CSRF checks."""
        _same_origin(request, self._base_url)
        form = await request.post()
        keys = self._require_keys()
        if not keys.csrf_ok(session, str(form.get("csrf", ""))):
            raise ConsoleError(403, "This form is out of date or did not come from the console "
                                    "(CSRF token missing or wrong); nothing was done. Reload the page.")
        return {k: v for k, v in form.items() if isinstance(v, str)}

    def _set_session(self, request: web.Request, response: web.StreamResponse, session: Session) -> None:
        keys = self._require_keys()
        response.set_cookie(
            COOKIE, keys.session_cookie(session), path=PREFIX, httponly=True, samesite="Strict",
            secure=self._secure(request), max_age=max(1, int(session.expires - time.time())),
        )
        response.del_cookie(PRE_COOKIE, path=PREFIX)

    def _secure(self, request: web.Request) -> bool:
        return request.secure or self._base_url.startswith("https://")

    def _pre_page(self, request: web.Request, template: str, status: int = 200,
                  **context: Any) -> web.Response:
        """A page with a pre-session form (sign-in, open a link): its CSRF token is bound to a
        nonce cookie, so another site cannot sign a browser in (login CSRF)."""
        keys = self._require_keys()
        nonce = request.cookies.get(PRE_COOKIE, "")
        if not re.fullmatch(r"[A-Za-z0-9_-]{16,64}", nonce):
            nonce = secrets.token_urlsafe(16)
        response = self._page(request, template, None, status=status,
                              login_csrf=keys.login_csrf(nonce), **context)
        response.set_cookie(PRE_COOKIE, nonce, path=PREFIX, httponly=True, samesite="Strict",
                            secure=self._secure(request), max_age=3600)
        return response

    def _throttled(self, request: web.Request) -> None:
        wait = self._throttle.retry_after(request.remote or "?")
        if wait > 0:
            raise ConsoleError(429, f"Too many wrong tokens from your address: try again in "
                                    f"{int(wait) + 1} s.", headers={"Retry-After": str(int(wait) + 1)})

    # Rendering ------------------------------------------------------------------------------

    def _page(self, request: web.Request, template: str, session: Session | None, status: int = 200,
              headers: Mapping[str, str] | None = None, **context: Any) -> web.Response:
        csrf = self._keys.csrf(session) if session is not None and self._keys is not None else ""
        values = {"title": "", "refresh": None, **context}
        html = render(template, session=session, csrf=csrf, prefix=PREFIX, **values)
        return web.Response(text=html, status=status, content_type=_HTML, charset="utf-8",
                            headers=headers)

    # Sign-in --------------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        self._require_keys()
        if self._session(request) is not None:
            return _see_other(f"{PREFIX}/deliveries")
        return self._sign_in_page(request)

    def _sign_in_page(self, request: web.Request, status: int = 200, error: str = "") -> web.Response:
        admin_enabled = bool(self._ctx.settings.admin_token.get_secret_value())
        return self._pre_page(request, "signin.html", status=status, error=error, title="Sign in",
                              admin_enabled=admin_enabled)

    async def sign_in(self, request: web.Request) -> web.StreamResponse:
        keys = self._require_keys()
        self._throttled(request)
        _same_origin(request, self._base_url)
        form = await request.post()
        if not keys.login_csrf_ok(request.cookies.get(PRE_COOKIE, ""), str(form.get("csrf", ""))):
            return self._sign_in_page(request, 403, "The sign-in form was out of date; try again.")
        if not keys.admin_token_ok(str(form.get("token", ""))):
            self._throttle.failed(request.remote or "?")
            log.warning("console sign-in refused (wrong token) from %s", request.remote)
            return self._sign_in_page(request, 401, "Wrong token.")
        session = keys.new_session(ROLE_ADMIN, "", self._ttl_s)
        log.info("console sign-in (admin) from %s", request.remote)
        response = _see_other(f"{PREFIX}/deliveries")
        self._set_session(request, response, session)
        return response

    async def sign_out(self, request: web.Request) -> web.StreamResponse:
        session = self._require(request)
        await self._form(request, session)
        self._revoked.add(session)
        response = _see_other(f"{PREFIX}/")
        response.del_cookie(COOKIE, path=PREFIX)
        return response

    async def link_landing(self, request: web.Request) -> web.StreamResponse:
        keys = self._require_keys()
        self._throttled(request)
        link = keys.link(request.query.get("token", ""))
        if link is None:
            self._throttle.failed(request.remote or "?")
            raise ConsoleError(403, "This console link is not valid or has expired: ask for a new one.")
        return self._pre_page(request, "link.html", title="Open the console", space=link.space,
                              expires=iso(datetime.fromtimestamp(link.expires, UTC)),
                              token=request.query["token"])

    async def link_open(self, request: web.Request) -> web.StreamResponse:
        keys = self._require_keys()
        self._throttled(request)
        _same_origin(request, self._base_url)
        form = await request.post()
        if not keys.login_csrf_ok(request.cookies.get(PRE_COOKIE, ""), str(form.get("csrf", ""))):
            raise ConsoleError(403, "The form was out of date: open the link again.")
        link = keys.link(str(form.get("token", "")))
        if link is None:
            self._throttle.failed(request.remote or "?")
            raise ConsoleError(403, "This console link is not valid or has expired: ask for a new one.")
        session = keys.new_session(ROLE_SPACE, link.space, self._ttl_s, not_after=link.expires)
        log.info("console link opened for space %s from %s", link.space, request.remote)
        response = _see_other(f"{PREFIX}/deliveries")
        self._set_session(request, response, session)
        return response

    # Deliveries -----------------------------------------------------------------------------

    async def deliveries(self, request: web.Request) -> web.StreamResponse:
        session = self._require(request)
        query = request.query
        filters = {name: query.get(name, "").strip()[:256]
                   for name in ("space", "status", "event_type", "since", "until", "q")}
        if session.scope:
            filters["space"] = session.scope  # forced, whatever the URL says
        rows: list[dict[str, Any]] = []
        next_url = ""
        error = ""
        try:
            flt = DeliveryFilter(
                space=filters["space"], status=filters["status"], event_type=filters["event_type"],
                since=parse_time(filters["since"]) if filters["since"] else None,
                until=parse_time(filters["until"]) if filters["until"] else None,
            )
            if filters["q"].startswith("dlv_") and await self._visible(session, filters["q"]):
                return _see_other(f"{PREFIX}/deliveries/{filters['q']}")
            if filters["q"]:
                rows = await asyncio.to_thread(search_deliveries, self._ctx.reader, flt, filters["q"])
                if len(rows) == 1 and rows[0]["delivery_id"] == filters["q"]:
                    return _see_other(f"{PREFIX}/deliveries/{filters['q']}")
            else:
                page = await asyncio.to_thread(list_newest_first, self._ctx.reader, flt, PAGE_SIZE,
                                               query.get("cursor") or None)
                rows = page.deliveries
                if page.next_cursor:
                    kept = {k: v for k, v in filters.items() if v and not (k == "space" and session.scope)}
                    next_url = f"{PREFIX}/deliveries?" + urlencode({**kept, "cursor": page.next_cursor})
        except BadRequest as exc:
            error = str(exc)
        return self._page(request, "deliveries.html", session, status=400 if error else 200,
                          title="Deliveries", filters=filters, rows=rows, next_url=next_url,
                          error=error, statuses=STATUSES, paged=bool(query.get("cursor")))

    async def _visible(self, session: Session, delivery_id: str) -> bool:
        """Whether this session may open the delivery (it exists and is in its scope)."""
        try:
            await self._attempts(session, delivery_id, with_body=False)
        except ConsoleError:
            return False
        return True

    async def _attempts(self, session: Session, delivery_id: str, with_body: bool) -> list[dict[str, Any]]:
        try:
            check_text("delivery_id", delivery_id, required=True)
        except BadRequest:
            raise _not_found("delivery") from None
        attempts = await asyncio.to_thread(delivery_attempts, self._ctx.reader, delivery_id, with_body)
        if not attempts or (session.scope and attempts[0]["space_slug"] != session.scope):
            raise _not_found("delivery")
        return attempts

    async def delivery(self, request: web.Request) -> web.StreamResponse:
        session = self._require(request)
        delivery_id = request.match_info["delivery_id"]
        awaiting = _int(request.query.get("awaiting"))
        since = _int(request.query.get("t"))
        return await self._delivery_page(request, session, delivery_id, awaiting=awaiting, since=since)

    async def _delivery_page(self, request: web.Request, session: Session, delivery_id: str, *,
                             awaiting: int = 0, since: int = 0, error: str = "",
                             status: int = 200) -> web.Response:
        rows = await self._attempts(session, delivery_id, with_body=True)
        # Attempt 0 is the hold record, not a call: shown apart, while it is the newest row.
        attempts = [a for a in rows if int(a["attempt"]) > 0]
        newest = max(rows, key=lambda r: (r["attempted_at"], int(r["attempt"])))
        hold = newest if int(newest["attempt"]) == 0 else None
        first = rows[0]
        last = dict(attempts[-1] if attempts else {**first, "attempt": first["pending_attempt"]})
        last["status"] = newest["status"]
        event = Event(b"", first["event_id"], first["event_type"], first["space_slug"],
                      first["environment"], first["user_id"], first["transaction_id"])
        headers = contract_headers(event, delivery_id, int(last["attempt"]))
        endpoint = next((ep for ep in self._ctx.endpoints.all() if ep.space == first["space_slug"]), None)
        timings = [c for c in _TIMING_COLUMNS if any(a.get(c) is not None for a in attempts)]
        landed = bool(awaiting) and bool(attempts) and int(attempts[-1]["attempt"]) >= awaiting
        refresh = None
        if awaiting and not landed and time.time() - since < RESEND_WAIT_S:
            refresh = 2
        return self._page(
            request, "delivery.html", session, status=status, title=delivery_id,
            delivery_id=delivery_id, first=first, last=last, attempts=attempts, hold=hold,
            body=pretty_body(str(first.get("request_body") or "")), sent_headers=headers,
            signed=bool(endpoint and endpoint.signing_secrets), timings=timings,
            awaiting=awaiting, landed=landed, refresh=refresh, error=error,
            waited_out=bool(awaiting and not landed and refresh is None),
        )

    async def resend(self, request: web.Request) -> web.StreamResponse:
        session = self._require(request)
        form = await self._form(request, session)
        delivery_id = request.match_info["delivery_id"]
        attempts = await self._attempts(session, delivery_id, with_body=False)
        try:
            result = await self._ctx.republisher.resend(delivery_id, force=form.get("force") == "1")
        except Conflict as exc:
            return await self._delivery_page(request, session, delivery_id, error=str(exc), status=409)
        except NotFound as exc:
            return await self._delivery_page(request, session, delivery_id, error=str(exc), status=404)
        except (NotReady, PublishFailed, KafkaError) as exc:
            return await self._delivery_page(request, session, delivery_id, error=str(exc), status=503)
        log.info("console resend of delivery %s (space %s) by %s session: attempt %d",
                 delivery_id, attempts[0]["space_slug"], session.role, result.attempt)
        return _see_other(f"{PREFIX}/deliveries/{delivery_id}?awaiting={result.attempt}&t={int(time.time())}")

    # Replay ---------------------------------------------------------------------------------

    def _selection(self, session: Session, values: Mapping[str, str]) -> tuple[Selection, dict[str, str]]:
        """The replay selection of a form, Space forced for scoped sessions; times absolute."""
        space = session.scope or values.get("space", "").strip()
        if session.scope and values.get("space", session.scope).strip() != session.scope:
            raise ConsoleError(403, "This session can replay its own Space only; nothing was done.")
        since_text, until_text = values.get("since", "").strip(), values.get("until", "").strip()
        if not since_text:
            raise BadRequest("since is required")
        now = datetime.now(UTC)
        since = parse_time(since_text, now)
        until = parse_time(until_text, now) if until_text else parse_time("now", now)
        selection = Selection(space=space, since=since, until=until, status=values.get("status", ""))
        fixed = {"space": space, "since": iso(since) or "", "until": iso(until) or "",
                 "status": selection.status}
        return selection, fixed

    async def replay_form(self, request: web.Request) -> web.StreamResponse:
        session = self._require(request)
        values = {k: request.query.get(k, "").strip()[:256] for k in ("space", "since", "until", "status")}
        if session.scope:
            values["space"] = session.scope
        plan_doc: dict[str, Any] | None = None
        fixed: dict[str, str] = {}
        error = ""
        force = request.query.get("force") == "1"
        if values["since"]:
            try:
                selection, fixed = self._selection(session, values)
                plan = await self._ctx.republisher.plan_replay(selection, force=force, reserve=False)
                plan_doc = plan.as_json(published=0, dry_run=True)
            except (BadRequest, Conflict, NotReady) as exc:
                error = str(exc)
        return self._page(request, "replay.html", session, status=400 if error else 200,
                          title="Replay", values=values, plan=plan_doc, fixed=fixed, error=error,
                          force=force, statuses=STATUSES)

    async def replay_confirm(self, request: web.Request) -> web.StreamResponse:
        session = self._require(request)
        form = await self._form(request, session)
        force = form.get("force") == "1"
        try:
            selection, _ = self._selection(session, form)
            plan = await self._ctx.republisher.plan_replay(selection, force=force, reserve=True)
        except (BadRequest, Conflict, NotReady) as exc:
            return self._page(request, "replay.html", session, status=409, title="Replay",
                              values=dict(form), plan=None, fixed={}, error=str(exc), force=force,
                              statuses=STATUSES)
        job = ReplayJob(secrets.token_urlsafe(9), selection.space, plan)
        if plan.todo:
            job.task = asyncio.create_task(self._run_job(job))
            self._running.add(job.task)
            job.task.add_done_callback(self._running.discard)
        else:
            job.state = "done"
        self._jobs[job.id] = job
        while len(self._jobs) > _JOBS_KEPT:
            self._jobs.popitem(last=False)
        log.info("console replay %s of space %s by %s session: %d to publish",
                 plan.replay_id, selection.space, session.role, len(plan.todo))
        return _see_other(f"{PREFIX}/replay/{job.id}")

    async def _run_job(self, job: ReplayJob) -> None:
        async def progress(published: int) -> None:
            job.published = published

        try:
            job.published = await self._ctx.republisher.execute(job.plan, progress)
            job.state = "done"
        except PublishFailed as exc:
            job.published, job.state, job.error = exc.published, "failed", str(exc)
        except (PerkamoError, OSError) as exc:
            job.state, job.error = "failed", str(exc)
        except Exception as exc:
            log.exception("console replay %s failed while publishing", job.plan.replay_id)
            job.state = "failed"
            job.error = f"replay stopped ({type(exc).__name__}); see the service log"

    async def replay_job(self, request: web.Request) -> web.StreamResponse:
        session = self._require(request)
        job = self._jobs.get(request.match_info["job_id"])
        if job is None or (session.scope and job.space != session.scope):
            raise _not_found("replay")
        plan = job.plan.as_json(published=job.published, dry_run=False)
        return self._page(request, "replay_job.html", session, title="Replay progress", job=job,
                          plan=plan, eligible=len(job.plan.todo),
                          refresh=1 if job.state == "publishing" else None)

    # Endpoints ------------------------------------------------------------------------------

    def _endpoint_of(self, space: str) -> Endpoint | None:
        return next((ep for ep in self._ctx.endpoints.all() if ep.space == space), None)

    def _visible_space(self, session: Session, space: str) -> str:
        if session.scope and space != session.scope:
            raise _not_found("endpoint")
        if not valid_slug(space):
            raise _not_found("endpoint")
        return space

    async def endpoints(self, request: web.Request) -> web.StreamResponse:
        session = self._require(request)
        if session.scope:
            return _see_other(f"{PREFIX}/endpoints/{session.scope}")
        rates = await asyncio.to_thread(success_rates, self._ctx.reader, "")
        rows = [{"endpoint": ep, "health": self._ctx.endpoint_health(ep.space) or {},
                 "rates": _rates(rates.get(ep.space))} for ep in self._ctx.endpoints.all()]
        return self._page(request, "endpoints.html", session, title="Endpoints", rows=rows)

    async def endpoint(self, request: web.Request) -> web.StreamResponse:
        session = self._require(request)
        space = self._visible_space(session, request.match_info["space"])
        return await self._endpoint_page(request, session, space,
                                         published=request.query.get("published", ""))

    async def _endpoint_page(self, request: web.Request, session: Session, space: str, *,
                             published: str = "", error: str = "", status: int = 200,
                             revealed: str = "") -> web.Response:
        rates = await asyncio.to_thread(success_rates, self._ctx.reader, space)
        receipt = re.fullmatch(r"(\d{1,6})-(\d{1,19})", published)
        return self._page(
            request, "endpoint.html", session, status=status, title=f"Endpoint of {space}",
            space=space, endpoint=self._endpoint_of(space),
            health=self._ctx.endpoint_health(space) or {}, rates=_rates(rates.get(space)),
            receipt=receipt.groups() if receipt else None, error=error, revealed=revealed,
            topic=ENDPOINTS_TOPIC,
        )

    async def endpoint_edit(self, request: web.Request) -> web.StreamResponse:
        session = self._require(request)
        form = await self._form(request, session)
        space = form.get("space", "").strip()
        if session.scope and space != session.scope:
            raise ConsoleError(403, "This session can change its own Space's endpoint only; "
                                    "nothing was published.")
        if not valid_slug(space):
            raise ConsoleError(400, "space must be a Space slug (lower-case letters, digits, dashes); "
                                    "nothing was published.")
        action = form.get("action", "")
        existing = self._endpoint_of(space)
        try:
            record = _record_for(action, space, existing, form.get("url", "").strip(), session)
        except ValueError as exc:
            return await self._endpoint_page(request, session, space, error=str(exc), status=400)
        try:
            receipt = await self._ctx.publish_endpoint(space, record)
        except KafkaError as exc:
            return await self._endpoint_page(request, session, space, error=str(exc), status=503)
        log.info("console %s of the endpoint of space %s by %s session: published at %s[%d]@%d",
                 action, space, session.role, ENDPOINTS_TOPIC, receipt.partition, receipt.offset)
        return _see_other(f"{PREFIX}/endpoints/{space}?published={receipt.partition}-{receipt.offset}")

    async def endpoint_reveal(self, request: web.Request) -> web.StreamResponse:
        session = self._require(request)
        form = await self._form(request, session)
        space = self._visible_space(session, request.match_info["space"])
        if not session.admin:
            raise ConsoleError(403, "Only the admin can reveal an endpoint URL.")
        self._throttled(request)
        keys = self._require_keys()
        if not keys.admin_token_ok(form.get("token", "")):
            self._throttle.failed(request.remote or "?")
            log.warning("console URL reveal refused (wrong token) for space %s from %s",
                        space, request.remote)
            return await self._endpoint_page(request, session, space, status=401,
                                             error="Wrong admin token: the URL stays hidden.")
        endpoint = self._endpoint_of(space)
        if endpoint is None:
            raise _not_found("endpoint")
        log.info("console revealed the endpoint URL of space %s to an admin session", space)
        return await self._endpoint_page(request, session, space, revealed=endpoint.url)


# Helpers -----------------------------------------------------------------------------------


def _record_for(action: str, space: str, existing: Endpoint | None, url: str,
                session: Session) -> dict[str, Any] | None:
    """The record an endpoint form publishes (None = tombstone); ValueError says what is wrong.

    Changing the URL or the active flag keeps the record's id and signing secrets."""
    doc: dict[str, Any] = record_of(existing) if existing else {"space": space}
    if action == "set":
        if not url:
            raise ValueError("Give the endpoint's URL (https://…); nothing was published.")
        if urlsplit(url).scheme.lower() != "https":
            raise ValueError("The URL must be an https:// URL (plain http and other schemes are "
                             "refused); nothing was published.")
        doc["url"], doc["active"] = url, True
    elif action in ("disable", "enable"):
        if existing is None:
            raise ValueError("This Space has no endpoint to change: set one first.")
        doc["active"] = action == "enable"
    elif action == "remove":
        if not session.admin:
            raise ValueError("Only the admin can remove an endpoint record.")
        return None
    else:
        raise ValueError("Unknown action; nothing was published.")
    try:
        parse_record(doc)
    except InvalidEndpoint as exc:
        message = str(exc).removeprefix("data.")
        raise ValueError(f"The endpoint record was refused: {message}; nothing was published.") from None
    return doc


def _rates(row: Mapping[str, Any] | None) -> dict[str, Any]:
    row = row or {}
    out: dict[str, Any] = {}
    for window in ("1h", "24h"):
        calls = int(row.get(f"calls_{window}", 0))
        delivered = int(row.get(f"delivered_{window}", 0))
        out[window] = {"calls": calls, "delivered": delivered,
                       "rate": delivered / calls if calls else None}
    return out


def _int(value: str | None) -> int:
    if value is None or not value.isdigit() or len(value) > 12:
        return 0
    return int(value)


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _same_origin(request: web.Request, base_url: str) -> None:
    """Refuse a POST whose browser says it came from another site (defence beside CSRF tokens).

    Sec-Fetch-Site decides where the browser sends it; else Origin, unless it is `null` (what
    browsers send under Referrer-Policy: no-referrer), where the CSRF token alone decides."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        if site not in ("same-origin", "none"):
            raise ConsoleError(403, "Refused: this request came from another site; nothing was done.")
        return
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return
    base = urlsplit(base_url)
    allowed = {f"{request.scheme}://{request.host}", f"{base.scheme}://{base.netloc}"}
    if origin not in allowed:
        raise ConsoleError(403, "Refused: this request came from another origin; nothing was done.")


@web.middleware
async def _security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """CSP and friends on every console response, errors and static files included."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(SECURITY_HEADERS)
        raise
    response.headers.update(SECURITY_HEADERS)
    return response
