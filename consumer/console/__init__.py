"""The delivery console: server-rendered pages under /console/ on the admin listener.

Support staff sign in with the admin token; a Space's own developers open a signed,
expiring `console-link` that confines every query and action to their Space. Pages: the
delivery list (filters, search, keyset paging), one delivery (every attempt, the body and
headers sent, the response excerpts, Resend), replay (dry-run count, confirm, progress) and
each Space's endpoint and health (set, disable, reveal the URL with the admin token).

The one integration surface: `mount(app, ctx, reads=...)` with a `ConsoleContext` and the
history reads' pool it shares with the history API (the history role mounts it).
"""

from __future__ import annotations

from aiohttp import web

from consumer.console.auth import Keys
from consumer.console.base import PREFIX
from consumer.console.context import ConsoleContext, ConsoleSettings, EndpointDirectory, Republishing
from consumer.console.views import Console
from consumer.read_pool import ReadPool

__all__ = ["ConsoleContext", "ConsoleSettings", "EndpointDirectory", "Keys", "Republishing",
           "console_link", "mount"]


def mount(app: web.Application, ctx: ConsoleContext, reads: ReadPool | None = None) -> None:
    """Serve the console under /console/ of `app` (before the app is started); its history reads
    run on `reads`, the history API's pool and places (a pool of its own without one)."""

    async def to_console(_: web.Request) -> web.StreamResponse:
        raise web.HTTPPermanentRedirect(f"{PREFIX}/")

    # Before the sub-application: its resource also claims the bare prefix (and answers 404).
    app.router.add_get(PREFIX, to_console)
    app.add_subapp(f"{PREFIX}/", Console(ctx, reads).application())


def console_link(settings: ConsoleSettings, space: str, ttl_s: float) -> str:
    """A URL that opens the console for one Space until ttl_s seconds from now."""
    keys = Keys.from_settings(settings.console_secret.get_secret_value(),
                              settings.admin_token.get_secret_value())
    if keys is None:
        raise ValueError("set PERKAMO_CONSOLE_SECRET or PERKAMO_ADMIN_TOKEN to sign console links")
    return f"{settings.console_base_url}link?token={keys.link_token(space, ttl_s)}"
