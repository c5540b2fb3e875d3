"""The console's endpoint pages: health, the masked URL (revealed to the admin), and the
forms that publish to the registry topic."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from consumer.console.auth import Session
from consumer.console.base import (
    PREFIX,
    ConsoleBase,
    ConsoleError,
    not_found,
    see_other,
    valid_slug,
)
from consumer.constants import ENDPOINTS_TOPIC
from consumer.endpoints import parse_record, record_of
from consumer.errors import InvalidEndpoint, KafkaFailure
from consumer.models import Endpoint
from consumer.queries import (
    success_rates,
)
from consumer.throttle import subject_of

log = logging.getLogger(__name__)

class EndpointPages(ConsoleBase):
    """Endpoints and their health; set, disable, enable, remove, reveal."""

    # Endpoints ------------------------------------------------------------------------------

    def _endpoint_of(self, space: str) -> Endpoint | None:
        return next((ep for ep in self._ctx.endpoints.all() if ep.space == space), None)

    def _visible_space(self, session: Session, space: str) -> str:
        if session.scope and space != session.scope:
            raise not_found("endpoint")
        if not valid_slug(space):
            raise not_found("endpoint")
        return space

    async def endpoints(self, request: web.Request) -> web.StreamResponse:
        session = self._require(request)
        if session.scope:
            return see_other(f"{PREFIX}/endpoints/{session.scope}")
        rates = await self._read(session, success_rates, self._ctx.reader, "")
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
        rates = await self._read(session, success_rates, self._ctx.reader, space)
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
        except KafkaFailure as exc:
            return await self._endpoint_page(request, session, space, error=str(exc), status=503)
        log.info("console %s of the endpoint of space %s by %s session: published at %s[%d]@%d",
                 action, space, session.role, ENDPOINTS_TOPIC, receipt.partition, receipt.offset)
        return see_other(f"{PREFIX}/endpoints/{space}?published={receipt.partition}-{receipt.offset}")

    async def endpoint_reveal(self, request: web.Request) -> web.StreamResponse:
        session = self._require(request)
        attempt = self._admit(request)  # counted before the body is read
        try:
            form = await self._form(request, session)
            space = self._visible_space(session, request.match_info["space"])
            if not session.admin:
                raise ConsoleError(403, "Only the admin can reveal an endpoint URL.")
            keys = self._require_keys()
            token = form.get("token", "")
            subject = subject_of("admin", token)
            self._check(attempt, subject, across_peers=False)
            if not keys.admin_token_ok(token):
                self._throttle.failed(attempt, subject, across_peers=False)
                log.warning("console URL reveal refused (wrong token) for space %s from %s",
                            space, request.remote)
                return await self._endpoint_page(request, session, space, status=401,
                                                 error="Wrong admin token: the URL stays hidden.")
        finally:
            self._throttle.release(attempt)
        endpoint = self._endpoint_of(space)
        if endpoint is None:
            raise not_found("endpoint")
        log.info("console revealed the endpoint URL of space %s to an admin session", space)
        return await self._endpoint_page(request, session, space, revealed=endpoint.url)



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


