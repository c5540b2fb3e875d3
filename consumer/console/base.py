"""What every console page shares: the session, the CSRF and same-origin checks, rendering,
error pages and the security headers (consumer.console.views assembles the pages).

Every handler starts from the session: an admin session sees every Space; a Space-scoped
session (from a `console-link`) has its Space forced into every query and checked on every
action, on the server, whatever the URL or form says. A delivery, replay or endpoint of
another Space answers exactly like one that does not exist (404), so guessing ids tells
nothing. Every POST needs the session's CSRF token, and a same-origin request.

Reads run on the history API's pool and places (read_pool.ReadPool): the console may hold all
places but one (the API always finds one), and each Space (or admin session) one at a time;
past that a page is a 429 page, never a queue. Resends and replay confirms are limited the same
way, per Space or admin session (ACTIONS_PER_WINDOW in ACTION_WINDOW_S): opening a link again
starts no new allowance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cache
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from consumer.console.auth import Keys, Session, SignOuts
from consumer.console.context import ConsoleContext
from consumer.console.render import render
from consumer.errors import ApiError, Busy, RequestError, Throttled
from consumer.read_pool import ReadPool
from consumer.republish_plan import ReplayPlan
from consumer.schemas import schema_path
from consumer.throttle import Attempt, Throttle, subject_of

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
JOBS_KEPT: Final = 100
TIMING_COLUMNS: Final = ("dns_ms", "connect_ms", "tls_ms", "ttfb_ms")
_HTML: Final = "text/html"
# Resends and replay confirms one session may ask for per window (a person clicks a few; a
# script flooding the redeliver topic is stopped after these).
ACTIONS_PER_WINDOW: Final = 10
ACTION_WINDOW_S: Final = 60.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


class ConsoleError(ApiError):
    """Answer with an error page: status and a sentence for the person reading it."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status, message, dict(headers or {}))


def not_found(what: str) -> ConsoleError:
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


class ActionLimit:
    """At most ACTIONS_PER_WINDOW resends and replay confirms per window, per owner (a Space
    session's Space, an admin session)."""

    def __init__(self, most: int = ACTIONS_PER_WINDOW, window_s: float = ACTION_WINDOW_S) -> None:
        self._most = most
        self._window_s = window_s
        self._times: dict[str, list[float]] = {}

    def take(self, sid: str, now: float | None = None) -> float:
        """Count one action; 0 if allowed, else the seconds until the next one is."""
        now = time.monotonic() if now is None else now
        if len(self._times) > 10_000:  # forget sessions whose window has passed
            self._times = {k: v for k, v in self._times.items() if v and v[-1] > now - self._window_s}
        recent = [t for t in self._times.get(sid, []) if t > now - self._window_s]
        if len(recent) >= self._most:
            self._times[sid] = recent
            return recent[0] + self._window_s - now
        recent.append(now)
        self._times[sid] = recent
        return 0.0


class ConsoleBase:
    """Sessions, forms and rendering over one ConsoleContext."""


    def __init__(self, ctx: ConsoleContext, reads: ReadPool | None = None) -> None:
        self._ctx = ctx
        settings = ctx.settings
        # The history API's pool when mounted beside it (history_api.history_app), else one of
        # its own (its idle threads end with the process).
        self._reads = reads or ReadPool(settings.history_max_concurrent_queries)
        self._max_span = timedelta(days=settings.history_max_span_days)
        self._actions = ActionLimit()
        self._keys = Keys.from_settings(settings.console_secret.get_secret_value(),
                                        settings.admin_token.get_secret_value())
        self._ttl_s = settings.console_session_ttl_s
        self._base_url = settings.console_base_url
        self._signed_out = SignOuts(self._ttl_s)
        self._throttle = Throttle()
        self._jobs: OrderedDict[str, ReplayJob] = OrderedDict()
        self._running: set[asyncio.Task[None]] = set()  # strong references until they finish

    async def _stop_jobs(self, _: web.Application) -> None:
        for task in list(self._running):
            task.cancel()

    def _shares(self, session: Session) -> list[tuple[str, int]]:
        return [("console", max(1, self._reads.slots - 1)), (_owner(session), 1)]

    async def _read(self, session: Session, fn: Callable[..., T], *args: Any) -> T:
        """A blocking history read on the shared pool, within the console's and the session's
        shares of its places; a 429 page when they are taken."""
        try:
            return await self._reads.run(fn, *args, shares=self._shares(session))
        except Busy as exc:
            raise _busy_page(exc) from None

    @contextlib.asynccontextmanager
    async def _place(self, session: Session) -> AsyncIterator[None]:
        """A place for a resend's or replay's reads (they run on the Republisher's threads)."""
        try:
            async with self._reads.slot(self._shares(session)):
                yield
        except Busy as exc:
            raise _busy_page(exc) from None

    def _count_action(self, session: Session) -> None:
        """Count a resend or replay confirm against the session's limit; 429 past it."""
        wait = self._actions.take(_owner(session))
        if wait:
            raise ConsoleError(
                429, f"This session asked for {ACTIONS_PER_WINDOW} resends or replays in the last "
                     f"{ACTION_WINDOW_S:.0f} seconds, the most allowed; nothing was done. Try again "
                     f"in {int(wait) + 1} seconds.", headers={"Retry-After": str(int(wait) + 1)})

    @web.middleware
    async def _error_pages(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except RequestError as exc:  # a ConsoleError, or any request error with its status
            return self._page(request, "error.html", self._session(request), status=exc.status,
                              headers=exc.headers(), message=str(exc), title=f"Error {exc.status}")
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
        if session is None or self._signed_out.refused(session):
            return None
        return session

    def _refuse_malformed_cookie(self, request: web.Request) -> None:
        """A session cookie the console never makes (not ASCII) is a forgery: counted by the
        sign-in throttle, answered 403, and deleted."""
        cookie = request.cookies.get(COOKIE, "")
        if cookie.isascii():
            return
        attempt = self._admit(request)
        self._throttle.failed(attempt, subject_of("cookie", cookie, signed=True), across_peers=False)
        log.warning("console refused a malformed session cookie from %s", request.remote)
        raise ConsoleError(403, "Your session cookie is malformed: sign in again; nothing was done.",
                           headers={"Set-Cookie": f"{COOKIE}=; Max-Age=0; Path={PREFIX}"})

    def _require(self, request: web.Request) -> Session:
        self._require_keys()
        self._refuse_malformed_cookie(request)
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
        same_origin(request, self._base_url)
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

    def _admit(self, request: web.Request) -> Attempt:
        """Count a sign-in, link or token attempt before its body is read (consumer.throttle);
        every path then settles it: `_check` and `_throttle.failed`, or `_throttle.release`."""
        try:
            return self._throttle.admit(request.remote or "?")
        except Throttled as exc:
            raise _too_many(exc) from None

    def _check(self, attempt: Attempt, subject: str, across_peers: bool = True) -> None:
        """429 when this credential was wrong too often; call it just before testing it."""
        try:
            self._throttle.check(attempt, subject, across_peers)
        except Throttled as exc:
            raise _too_many(exc) from None

    # Rendering ------------------------------------------------------------------------------

    def _page(self, request: web.Request, template: str, session: Session | None, status: int = 200,
              headers: Mapping[str, str] | None = None, **context: Any) -> web.Response:
        csrf = self._keys.csrf(session) if session is not None and self._keys is not None else ""
        values = {"title": "", "refresh": None, **context}
        html = render(template, session=session, csrf=csrf, prefix=PREFIX, **values)
        return web.Response(text=html, status=status, content_type=_HTML, charset="utf-8",
                            headers=headers)

# Helpers -----------------------------------------------------------------------------------


def _too_many(exc: Throttled) -> ConsoleError:
    return ConsoleError(429, f"Too many wrong tokens or links: try again in {exc.retry_after} s; "
                             "nothing was checked.", headers={"Retry-After": str(exc.retry_after)})


def _owner(session: Session) -> str:
    """Whose share a read or action counts against: a Space session's Space (opening its link
    again starts no new allowance), an admin session's own id."""
    return f"space:{session.scope}" if session.scope else f"admin:{session.sid}"


def _busy_page(exc: Busy) -> ConsoleError:
    return ConsoleError(429, f"The history store is busy: {exc}. Reload the page in a moment.",
                        headers={"Retry-After": str(exc.retry_after_s)})


def int_param(value: str | None) -> int:
    if value is None or not value.isdigit() or len(value) > 12:
        return 0
    return int(value)


def see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def same_origin(request: web.Request, base_url: str) -> None:
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
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """CSP and friends on every console response, errors and static files included."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(SECURITY_HEADERS)
        raise
    response.headers.update(SECURITY_HEADERS)
    return response
