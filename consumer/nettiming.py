"""Where one attempt's time went: DNS, TCP connect, TLS handshake, waiting for the first byte.

Marks are taken where the work happens, not through aiohttp's `TraceConfig` (its per-request
trace objects and signals cost ~40 µs of CPU per request, a quarter of the call itself):

    dns_start/dns_end  around the lookup, in the guarded resolver (consumer.netguard); aiohttp
                       does not call it for a name in its 30 s DNS cache or an IP literal
    dial_start         the first socket the guarded socket factory makes for this attempt
    tls_start/tls_end  the handshake, in the SSL context's `sslobject_class` (the documented
                       way to customise asyncio's and uvloop's TLS objects), which also reads the
                       endpoint certificate's `notAfter`
    answered           the response's status line and headers are in (consumer.delivery)

An attempt that neither looked up nor dialled anything went out on a kept-alive connection.
The record of the attempt being made is found through a context variable set by `begin()` in
the delivery's task: aiohttp resolves and dials in that task or in tasks it creates, and
asyncio runs the handshake in a copy of the context taken when the connection was opened.

    dns_ms      the lookup (0: a cached name, an IP literal or a kept-alive connection)
    connect_ms  TCP connect (with an HTTPS proxy: to the proxy, and CONNECT)
    tls_ms      the handshake with the endpoint (0 on a kept-alive connection)
    ttfb_ms     from the connection ready (handshake done, or the call begun on a kept-alive
                connection) to the response's status line and headers
None where a step started and did not finish (the attempt failed there) or never began.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

_current: ContextVar[NetTiming | None] = ContextVar("perkamo_net_timing", default=None)
_clock = time.perf_counter


@dataclass(slots=True)
class NetTiming:
    """perf_counter() marks of one attempt (0.0 = not reached) and what the handshake saw."""

    started: float = 0.0
    dns_start: float = 0.0
    dns_end: float = 0.0
    dial_start: float = 0.0
    tls_start: float = 0.0
    tls_end: float = 0.0
    answered: float = 0.0
    refused: bool = False  # the SSRF guard refused the host before anything was dialled
    cert_not_after: float | None = None  # unix time, from a handshake of this attempt

    def phases(self) -> Phases:
        if not self.dial_start and not self.dns_start:
            if self.refused:
                return NOT_MEASURED
            # nothing looked up, nothing dialled: a kept-alive connection carried the request
            return Phases(0, 0, 0, _ms(self.started, self.answered), True)
        dns = _ms(self.dns_start, self.dns_end) if self.dns_start else 0
        connect = _ms(self.dial_start, self.tls_start)
        tls = _ms(self.tls_start, self.tls_end)
        return Phases(dns, connect, tls, _ms(self.tls_end, self.answered), False)


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
    timing = NetTiming(started=_clock())
    _current.set(timing)
    return timing


# The marks: each a no-op outside an attempt being timed (timings off, tests, the CLI).


def dns_started() -> None:
    timing = _current.get()
    if timing is not None:
        timing.dns_start = _clock()


def dns_ended() -> None:
    timing = _current.get()
    if timing is not None:
        timing.dns_end = _clock()


def dial_started() -> None:
    """A socket is about to be made for this attempt; the first one starts `connect_ms`."""
    timing = _current.get()
    if timing is not None and not timing.dial_start:
        timing.dial_start = _clock()


def refused() -> None:
    """The guard refused the host before any lookup or dial: nothing to measure."""
    timing = _current.get()
    if timing is not None:
        timing.refused = True


def answered() -> None:
    timing = _current.get()
    if timing is not None:
        timing.answered = _clock()


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
