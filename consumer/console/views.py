"""The console's application under /console/: its routes, sign-in, and Space links."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from aiohttp import web

from consumer.console.auth import ROLE_ADMIN, ROLE_SPACE, Link
from consumer.console.base import (
    COOKIE,
    PRE_COOKIE,
    PREFIX,
    ConsoleError,
    same_origin,
    security_headers,
    see_other,
)
from consumer.console.deliveries import DeliveryPages
from consumer.console.endpoints import EndpointPages
from consumer.console.render import STATIC
from consumer.queries import (
    iso,
)
from consumer.throttle import Attempt, subject_of

log = logging.getLogger(__name__)

class Console(DeliveryPages, EndpointPages):
    """The console's handlers over one ConsoleContext."""

    # Assembly -------------------------------------------------------------------------------

    def application(self) -> web.Application:
        app = web.Application(middlewares=[security_headers, self._error_pages])
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

    # Sign-in --------------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        self._require_keys()
        self._refuse_malformed_cookie(request)
        if self._session(request) is not None:
            return see_other(f"{PREFIX}/deliveries")
        return self._sign_in_page(request)

    def _sign_in_page(self, request: web.Request, status: int = 200, error: str = "") -> web.Response:
        admin_enabled = bool(self._ctx.settings.admin_token.get_secret_value())
        return self._pre_page(request, "signin.html", status=status, error=error, title="Sign in",
                              admin_enabled=admin_enabled)

    async def sign_in(self, request: web.Request) -> web.StreamResponse:
        keys = self._require_keys()
        attempt = self._admit(request)  # counted before the body is read
        try:
            same_origin(request, self._base_url)
            form = await request.post()
            if not keys.login_csrf_ok(request.cookies.get(PRE_COOKIE, ""), str(form.get("csrf", ""))):
                return self._sign_in_page(request, 403, "The sign-in form was out of date; try again.")
            token = str(form.get("token", ""))
            # Keyed by the token's first characters: not by the admin token as a whole, which
            # anyone reaching this page could then lock.
            subject = subject_of("admin", token)
            self._check(attempt, subject, across_peers=False)
            if not keys.admin_token_ok(token):
                self._throttle.failed(attempt, subject, across_peers=False)
                log.warning("console sign-in refused (wrong token) from %s", request.remote)
                return self._sign_in_page(request, 401, "Wrong token.")
        finally:
            self._throttle.release(attempt)
        session = keys.new_session(ROLE_ADMIN, "", self._ttl_s)
        log.info("console sign-in (admin) from %s", request.remote)
        response = see_other(f"{PREFIX}/deliveries")
        self._set_session(request, response, session)
        return response

    async def sign_out(self, request: web.Request) -> web.StreamResponse:
        session = self._require(request)
        await self._form(request, session)
        self._signed_out.sign_out(session)
        response = see_other(f"{PREFIX}/")
        response.del_cookie(COOKIE, path=PREFIX)
        return response

    async def link_landing(self, request: web.Request) -> web.StreamResponse:
        self._require_keys()
        link = self._open_link(request, self._admit(request), request.query.get("token", ""))
        return self._pre_page(request, "link.html", title="Open the console", space=link.space,
                              expires=iso(datetime.fromtimestamp(link.expires, UTC)),
                              token=request.query["token"])

    async def link_open(self, request: web.Request) -> web.StreamResponse:
        keys = self._require_keys()
        attempt = self._admit(request)  # counted before the body is read
        try:
            same_origin(request, self._base_url)
            form = await request.post()
            if not keys.login_csrf_ok(request.cookies.get(PRE_COOKIE, ""), str(form.get("csrf", ""))):
                raise ConsoleError(403, "The form was out of date: open the link again.")
        except BaseException:
            self._throttle.release(attempt)
            raise
        link = self._open_link(request, attempt, str(form.get("token", "")))
        session = keys.new_session(ROLE_SPACE, link.space, self._ttl_s, not_after=link.expires,
                                   link_id=link.id)
        log.info("console link opened for space %s from %s", link.space, request.remote)
        response = see_other(f"{PREFIX}/deliveries")
        self._set_session(request, response, session)
        return response

    def _open_link(self, request: web.Request, attempt: Attempt, token: str) -> Link:
        """The link a token carries, checked against the throttle (per link, from this peer
        and from all); a 403 for a forged, malformed or expired one, which is counted."""
        keys = self._require_keys()
        subject = subject_of("link", token, signed=True)
        self._check(attempt, subject)
        link = keys.link(token)
        if link is None:
            self._throttle.failed(attempt, subject)
            log.warning("console refused a link that is not valid from %s", request.remote)
            raise ConsoleError(403, "This console link is not valid or has expired: ask for a new one.")
        self._throttle.release(attempt)
        return link
