"""The console's delivery pages: the list, one delivery (with Resend), and replay."""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from consumer.console.auth import Session
from consumer.console.base import (
    JOBS_KEPT,
    PAGE_SIZE,
    PREFIX,
    RESEND_WAIT_S,
    TIMING_COLUMNS,
    ConsoleBase,
    ConsoleError,
    ReplayJob,
    int_param,
    not_found,
    see_other,
)
from consumer.console.render import pretty_body
from consumer.contract import contract_headers
from consumer.errors import (
    BadRequest,
    Conflict,
    KafkaFailure,
    NotReady,
    PerkamoError,
    PublishFailed,
    RequestError,
)
from consumer.models import Event
from consumer.queries import (
    SEARCH_LIMIT,
    STATUSES,
    DeliveryFilter,
    attempt_body,
    check_span,
    check_text,
    delivery_attempts,
    iso,
    list_newest_first,
    parse_time,
    search_deliveries,
    spaces_of,
)
from consumer.republish_plan import Selection

log = logging.getLogger(__name__)

_REPLAY_FIELDS = ("space", "since", "until", "status")


class DeliveryPages(ConsoleBase):
    """Deliveries, one delivery, resend and replay."""

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
                return see_other(f"{PREFIX}/deliveries/{filters['q']}")
            if filters["q"]:
                rows = await self._read(session, search_deliveries, self._ctx.reader, flt, filters["q"],
                                        SEARCH_LIMIT, self._max_span)
                if len(rows) == 1 and rows[0]["delivery_id"] == filters["q"]:
                    return see_other(f"{PREFIX}/deliveries/{filters['q']}")
            else:
                page = await self._read(session, functools.partial(
                    list_newest_first, max_span=self._max_span), self._ctx.reader, flt, PAGE_SIZE,
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
            await self._attempts(session, delivery_id)
        except ConsoleError:
            return False
        return True

    async def _attempts(self, session: Session, delivery_id: str, space: str = "") -> list[dict[str, Any]]:
        """The delivery's rows, read with the session's Space as a filter of the SQL (an id of
        another Space, or with rows in two Spaces, is not found); an admin names a Space when
        the id has rows in several."""
        try:
            check_text("delivery_id", delivery_id, required=True)
            check_text("space", space)
        except BadRequest:
            raise not_found("delivery") from None
        attempts = await self._read(session, delivery_attempts, self._ctx.reader, delivery_id,
                                    False, session.scope or space, bool(session.scope))
        if not attempts or (session.scope and any(a["space_slug"] != session.scope for a in attempts)):
            raise not_found("delivery")
        try:
            spaces_of(delivery_id, attempts)
        except BadRequest as exc:
            raise ConsoleError(409, f"{exc}: add ?space=<slug> to the address.") from None
        return attempts

    async def delivery(self, request: web.Request) -> web.StreamResponse:
        session = self._require(request)
        delivery_id = request.match_info["delivery_id"]
        awaiting = int_param(request.query.get("awaiting"))
        since = int_param(request.query.get("t"))
        return await self._delivery_page(request, session, delivery_id, awaiting=awaiting, since=since,
                                         space=request.query.get("space", ""))

    async def _delivery_page(self, request: web.Request, session: Session, delivery_id: str, *,
                             awaiting: int = 0, since: int = 0, error: str = "",
                             status: int = 200, space: str = "") -> web.Response:
        rows = await self._attempts(session, delivery_id, space)
        # Attempt 0 is the hold record, not a call: shown apart, while it is the newest row.
        attempts = [a for a in rows if int(a["attempt"]) > 0]
        newest = max(rows, key=lambda r: (r["attempted_at"], int(r["attempt"])))
        hold = newest if int(newest["attempt"]) == 0 else None
        first = rows[0]
        # The body of the one attempt shown (the first row: every attempt sends the same body).
        body = await self._read(session, attempt_body, self._ctx.reader, first["space_slug"],
                                delivery_id, int(first["attempt"]))
        last = dict(attempts[-1] if attempts else {**first, "attempt": first["pending_attempt"]})
        last["status"] = newest["status"]
        event = Event(b"", first["event_id"], first["event_type"], first["space_slug"],
                      first["environment"], first["user_id"], first["transaction_id"])
        headers = contract_headers(event, delivery_id, int(last["attempt"]))
        endpoint = next((ep for ep in self._ctx.endpoints.all() if ep.space == first["space_slug"]), None)
        timings = [c for c in TIMING_COLUMNS if any(a.get(c) is not None for a in attempts)]
        landed = bool(awaiting) and bool(attempts) and int(attempts[-1]["attempt"]) >= awaiting
        refresh = None
        if awaiting and not landed and time.time() - since < RESEND_WAIT_S:
            refresh = 2
        return self._page(
            request, "delivery.html", session, status=status, title=delivery_id,
            delivery_id=delivery_id, first=first, last=last, attempts=attempts, hold=hold,
            body=pretty_body(body), body_kept=len(body.encode()), sent_headers=headers,
            signed=bool(endpoint and endpoint.signing_secrets), timings=timings,
            awaiting=awaiting, landed=landed, refresh=refresh, error=error,
            waited_out=bool(awaiting and not landed and refresh is None),
        )

    async def resend(self, request: web.Request) -> web.StreamResponse:
        session = self._require(request)
        form = await self._form(request, session)
        force = self._force(session, form)
        delivery_id = request.match_info["delivery_id"]
        space = session.scope or form.get("space", "")
        attempts = await self._attempts(session, delivery_id, space)
        space = str(attempts[0]["space_slug"])
        self._count_action(session)
        try:
            async with self._place(session):
                result = await self._ctx.republisher.resend(delivery_id, force=force, space=space,
                                                            scoped=bool(session.scope))
        except (RequestError, KafkaFailure) as exc:  # the page, with the error's own status
            status = exc.status if isinstance(exc, RequestError) else 503
            return await self._delivery_page(request, session, delivery_id, error=str(exc), status=status,
                                             space=space)
        log.info("console resend of delivery %s (space %s) by %s session: attempt %d",
                 delivery_id, attempts[0]["space_slug"], session.role, result.attempt)
        where = urlencode({"awaiting": result.attempt, "t": int(time.time()),
                           **({} if session.scope else {"space": space})})
        return see_other(f"{PREFIX}/deliveries/{delivery_id}?{where}")

    # Replay ---------------------------------------------------------------------------------

    @staticmethod
    def _force(session: Session, values: Mapping[str, str]) -> bool:
        """`force` is the admin's alone: a Space session asking for it is refused, not ignored."""
        force = values.get("force", "") not in ("", "0")
        if force and session.scope:
            raise ConsoleError(403, "Only an admin session may force a resend or replay; nothing was "
                                    "done. Ask your support contact if a forced one is needed.")
        return force

    def _selection(self, session: Session, values: Mapping[str, str]) -> tuple[Selection, dict[str, str]]:
        """The replay selection of a form, Space forced for scoped sessions; times absolute and
        no further apart than PERKAMO_HISTORY_MAX_SPAN_DAYS (as in the API)."""
        space = session.scope or values.get("space", "").strip()
        if session.scope and values.get("space", session.scope).strip() != session.scope:
            raise ConsoleError(403, "This session can replay its own Space only; nothing was done.")
        since_text, until_text = values.get("since", "").strip(), values.get("until", "").strip()
        if not since_text:
            raise BadRequest("since is required")
        now = datetime.now(UTC)
        since = parse_time(since_text, now)
        until = parse_time(until_text, now) if until_text else parse_time("now", now)
        check_span(since, until, self._max_span)
        selection = Selection(space=space, since=since, until=until, status=values.get("status", ""))
        fixed = {"space": space, "since": iso(since) or "", "until": iso(until) or "",
                 "status": selection.status}
        return selection, fixed

    async def replay_form(self, request: web.Request) -> web.StreamResponse:
        session = self._require(request)
        values = {k: request.query.get(k, "").strip()[:256] for k in _REPLAY_FIELDS}
        if session.scope:
            values["space"] = session.scope
        plan_doc: dict[str, Any] | None = None
        fixed: dict[str, str] = {}
        error = ""
        force = self._force(session, request.query)
        if values["since"]:
            try:
                selection, fixed = self._selection(session, values)
                async with self._place(session):
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
        force = self._force(session, form)
        values = {k: str(form.get(k, "")).strip()[:256] for k in _REPLAY_FIELDS}
        if session.scope:
            values["space"] = values["space"] or session.scope
        status = 409
        try:
            selection, _ = self._selection(session, values)
            if "status" not in form:
                raise BadRequest("status is missing from the form: open the replay page again "
                                 "and confirm from there (an empty status means any)")
            self._count_action(session)
            async with self._place(session):
                plan = await self._ctx.republisher.plan_replay(selection, force=force, reserve=True)
        except BadRequest as exc:
            status, error = 400, str(exc)
        except (Conflict, NotReady) as exc:
            status, error = (409 if isinstance(exc, Conflict) else 503), str(exc)
        else:
            error = ""
        if error:
            return self._page(request, "replay.html", session, status=status, title="Replay",
                              values=values, plan=None, fixed={}, error=error, force=force,
                              statuses=STATUSES)
        job = ReplayJob(secrets.token_urlsafe(9), selection.space, plan)
        if plan.todo:
            job.task = asyncio.create_task(self._run_job(job))
            self._running.add(job.task)
            job.task.add_done_callback(self._running.discard)
        else:
            job.state = "done"
        self._jobs[job.id] = job
        while len(self._jobs) > JOBS_KEPT:
            self._jobs.popitem(last=False)
        log.info("console replay %s of space %s by %s session: %d to publish",
                 plan.replay_id, selection.space, session.role, len(plan.todo))
        return see_other(f"{PREFIX}/replay/{job.id}")

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
            raise not_found("replay")
        plan = job.plan.as_json(published=job.published, dry_run=False)
        return self._page(request, "replay_job.html", session, title="Replay progress", job=job,
                          plan=plan, eligible=len(job.plan.todo),
                          refresh=1 if job.state == "publishing" else None)

