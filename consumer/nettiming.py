"""Where one attempt's time went: DNS, TCP connect, TLS handshake, waiting for the first byte.

aiohttp's `TraceConfig` hooks mark the DNS lookup, the connection's creation (or the reuse of a
kept-alive one), the request sent and the response's head received. The TLS handshake happens
inside the connection's creation, where aiohttp has no hook, so the SSL context's
`sslobject_class` (the documented way to customise the objects asyncio's TLS runs on, also used
by uvloop) marks its start and end and reads the endpoint certificate's `notAfter`.

The record of the attempt being made is found through a context variable set by `begin()` in
the delivery's task: aiohttp runs the hooks in that task, and asyncio runs the handshake in a
copy of its context taken when the connection was opened.

    dns_ms      the lookup (0: a cached name, an IP literal or a kept-alive connection)
    connect_ms  TCP connect after the lookup (with an HTTPS proxy: to the proxy, and CONNECT)
    tls_ms      the handshake with the endpoint (0 on a kept-alive connection)
    ttfb_ms     from the request sent to the response's status line and headers
None where a step started and did not finish (the attempt failed there) or never began.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from contextvars import ContextVar
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, cast

import aiohttp

_current: ContextVar[NetTiming | None] = ContextVar("perkamo_net_timing", default=None)
_clock = time.perf_counter


@dataclass(slots=True)
class NetTiming:
    """perf_counter() marks of one attempt (0.0 = not reached) and what the handshake saw."""

    create_start: float = 0.0
    dns_start: float = 0.0
    dns_end: float = 0.0
    tls_start: float = 0.0
    tls_end: float = 0.0
    create_end: float = 0.0
    sent: float = 0.0
    answered: float = 0.0
    reused: bool = False
    cert_not_after: float | None = None  # unix time, from a handshake of this attempt

    def phases(self) -> Phases:
        if self.reused:
            return Phases(0, 0, 0, _ms(self.sent, self.answered), True)
        if not self.create_start:  # no connection was attempted (refused before any dial)
            return Phases(None, None, None, None, None)
        dns = 0 if not self.dns_start else _ms(self.dns_start, self.dns_end)
        connected = self.tls_start or self.create_end
        connect = _ms(self.dns_end or self.create_start, connected)
        tls = _ms(self.tls_start, self.tls_end)
        return Phases(dns, connect, tls, _ms(self.sent, self.answered), False)


@dataclass(frozen=True, slots=True)
class Phases:
    """Milliseconds per step; the history row's dns_ms, connect_ms, tls_ms, ttfb_ms and
    connection_reused (None: not measured)."""

    dns_ms: int | None
    connect_ms: int | None
    tls_ms: int | None
    ttfb_ms: int | None
    reused: bool | None


NOT_MEASURED = Phases(None, None, None, None, None)


def _ms(start: float, end: float) -> int | None:
    if not start or not end:
        return None
    return max(0, round((end - start) * 1000))


def begin() -> NetTiming:
    """A fresh record for the attempt this task is about to make."""
    timing = NetTiming()
    _current.set(timing)
    return timing


class TimedSSLObject(ssl.SSLObject):
    """Marks the TLS handshake of the attempt being made and reads the peer's notAfter."""

    def do_handshake(self) -> None:
        timing = _current.get()
        if timing is None:
            super().do_handshake()
            return
        if not timing.tls_start:
            timing.tls_start = _clock()
        super().do_handshake()  # SSLWantReadError until the handshake is done
        timing.tls_end = _clock()
        cert: Any = self.getpeercert()
        not_after = cert.get("notAfter") if isinstance(cert, dict) else None
        if isinstance(not_after, str):
            with contextlib.suppress(ValueError):
                timing.cert_not_after = float(ssl.cert_time_to_seconds(not_after))


def instrument(context: ssl.SSLContext) -> ssl.SSLContext:
    """The context, its TLS objects marking handshakes (verification is unchanged)."""
    context.sslobject_class = TimedSSLObject
    return context


def _context(trace_request_ctx: Any = None) -> NetTiming:
    return _current.get() or NetTiming()


# The hooks: `ctx` is the attempt's NetTiming (aiohttp's "trace config context", made by _context).


async def _create_start(_: Any, ctx: Any, __: Any) -> None:
    ctx.create_start = _clock()


async def _create_end(_: Any, ctx: Any, __: Any) -> None:
    ctx.create_end = _clock()


async def _reused(_: Any, ctx: Any, __: Any) -> None:
    ctx.reused = True


async def _dns_start(_: Any, ctx: Any, __: Any) -> None:
    ctx.dns_start = _clock()


async def _dns_end(_: Any, ctx: Any, __: Any) -> None:
    ctx.dns_end = _clock()


async def _sent(_: Any, ctx: Any, __: Any) -> None:
    ctx.sent = _clock()


async def _answered(_: Any, ctx: Any, __: Any) -> None:
    ctx.answered = _clock()


def trace_config() -> aiohttp.TraceConfig:
    """The hooks for the delivery session (`ClientSession(trace_configs=[...])`)."""
    config = aiohttp.TraceConfig(trace_config_ctx_factory=cast(type[SimpleNamespace], _context))
    config.on_connection_create_start.append(_create_start)
    config.on_connection_create_end.append(_create_end)
    config.on_connection_reuseconn.append(_reused)
    config.on_dns_resolvehost_start.append(_dns_start)
    config.on_dns_resolvehost_end.append(_dns_end)
    config.on_request_headers_sent.append(_sent)
    config.on_request_end.append(_answered)
    config.freeze()
    return config
