"""SSRF guard: endpoint hosts may only resolve to public addresses, checked at connect time.

Endpoint URLs are customers' public HTTPS URLs (docs/security.md). `AddressPolicy`
(consumer.addresses) decides whether an address may be connected to; this module applies it
inside aiohttp's connector, so the check runs on the very addresses the socket connects to.

What aiohttp 3.14 does (read in `aiohttp/connector.py`, `client.py`, `aiohappyeyeballs`), and
what follows from it:

* Host spelling. aiohttp dials `yarl.URL(url).raw_host`, which yarl normalises with IDNA/UTS-46:
  `127。0。0。1` (U+3002) and the other dot look-alikes become `127.0.0.1`, `127.0.0.1⑩` becomes
  `127.0.0.110`, full-width digits become ASCII. `urllib.parse.urlsplit` keeps them as typed.
  So every check here starts from `url_host()` (yarl's host, what is dialled), and endpoint
  records whose host is not plain ASCII are refused (`host_problem`): IDNA names only in their
  `xn--` form.
* The socket factory is the check on what is dialled. `TCPConnector(socket_factory=...)` is
  called by `aiohappyeyeballs.start_connection` with the `addrinfo` it is about to
  `sock_connect()` to, for names and IP literals alike, on every new connection (pooled
  keep-alive connections were checked when they were opened). `GuardedSocketFactory` judges
  that sockaddr with `AddressPolicy` and raises `BlockedAddress` (an `OSError`) instead of
  returning a socket: aiohappyeyeballs records it and re-raises it (one address) or an
  `OSError` summary (several), which aiohttp wraps in `ClientConnectorError`. The refusal is
  also written to the `DialRecord` of the attempt (`dialling()`), so `blocked_cause()` finds it
  whatever the wrapping.
* Names are judged twice. `GuardedResolver` drops refused answers (so happy eyeballs does not
  even try them, and a name with one public and one private address still works), and the
  socket factory judges what is left. Resolution runs on the resolver's own bounded thread pool
  (`PoolResolver`, `PERKAMO_DNS_THREADS`), never the loop's default executor, so slow customer
  DNS cannot starve `/metrics`, admin reads or the shutdown flush.
* IP literals skip the resolver: `_resolve_host` returns `is_ip_address(host)` hosts as they
  are, and aiohttp 3.14 rejects non-canonical IPv4 forms such as `127.1`. The socket factory
  sees them like any other address; `AddressPolicy.check_literal` also refuses them before the
  request (and before a CONNECT through a proxy, where the factory only sees the proxy).
* Redirects are not followed (docs/security.md, `allow_redirects=False`).
* Proxies. Through an HTTP(S) proxy the connector dials the proxy, not the endpoint; the
  endpoint is named in the CONNECT request and resolved by the proxy, which must enforce the
  same rules. The proxy is the one trusted destination: the addresses its configured host
  resolves to (or its literal) are recorded as trusted and pass the socket factory.

Which addresses are allowed at all is consumer.addresses (`AddressPolicy`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import socket
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_exceptions import ClientConnectorError

from consumer import nettiming
from consumer.addresses import AddressPolicy, TrustedAddresses
from consumer.errors import BlockedAddress

log = logging.getLogger(__name__)


@dataclass
class DialRecord:
    """What one attempt's connection dials: the endpoint's host (for messages) and refusals."""

    host: str
    refused: list[BlockedAddress] = field(default_factory=list)


_DIAL: contextvars.ContextVar[DialRecord | None] = contextvars.ContextVar("perkamo_dial", default=None)


def dialling(host: str) -> DialRecord:
    """Name the host the current task is about to connect to; returns the record refusals go to.

    A context variable: aiohttp's connector and happy eyeballs run in this task or in tasks it
    creates, which copy the context, so the socket factory sees this record."""
    record = DialRecord(host)
    _DIAL.set(record)
    return record


def take_dial(host: str) -> DialRecord | None:
    """The current task's DialRecord for `host`, once: it is cleared, so a later failure in the
    same task (or a record left by other code) is never taken for this one's."""
    record = _DIAL.get()
    _DIAL.set(None)
    return record if record is not None and record.host == host else None


class GuardedSocketFactory:
    """aiohttp's `socket_factory`: judges the sockaddr about to be connected, for every dial.

    Raises BlockedAddress (an OSError, so aiohttp reports a connection error) instead of
    creating the socket. The error names the host of the current `dialling()` record, else
    the address itself (an IP literal host), with the reason label."""

    def __init__(self, policy: AddressPolicy, trusted: TrustedAddresses | None = None) -> None:
        self._policy = policy
        self._trusted = trusted or TrustedAddresses()

    def check(self, sockaddr: tuple[Any, ...]) -> None:
        """Raise BlockedAddress if the policy refuses the sockaddr's address."""
        address = str(sockaddr[0])
        if address in self._trusted:
            return
        reason = self._policy.refusal_reason(address)
        if reason is None:
            return
        record = _DIAL.get()
        refused = BlockedAddress(record.host if record is not None else address, reason)
        if record is not None:
            record.refused.append(refused)
        raise refused

    def __call__(self, addr_info: tuple[Any, ...]) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        nettiming.dial_started()  # a refusal here still counts as a dial begun (connect_ms None)
        self.check(sockaddr)
        return socket.socket(family=family, type=type_, proto=proto)


_NUMERIC_FLAGS: Final = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
_AI_ADDRCONFIG: Final = socket.AI_ADDRCONFIG & getattr(socket, "AI_MASK", socket.AI_ADDRCONFIG)


class PoolResolver(AbstractResolver):
    """getaddrinfo() on a thread pool of its own, bounded to `threads`, never the loop's default.

    aiohttp's ThreadedResolver calls `loop.getaddrinfo`, which runs in the default executor
    that `asyncio.to_thread` (admin reads, /metrics, the shutdown flush) shares: a dozen slow
    customer lookups held every thread. Here lookups queue behind each other in their own pool;
    a lookup cancelled (the attempt timed out) before it started is dropped from the queue."""

    def __init__(self, threads: int) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="dns")

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        loop = asyncio.get_running_loop()
        infos = await loop.run_in_executor(
            self._pool, socket.getaddrinfo, host, port, family, socket.SOCK_STREAM, 0, _AI_ADDRCONFIG
        )
        results: list[ResolveResult] = []
        for fam, _, proto, _, address in infos:
            if fam == socket.AF_INET6:
                if len(address) < 4:
                    continue  # no IPv6 in this Python build
                resolved = str(address[0])
                if address[3]:  # link-local with a scope: the numeric form carries the zone
                    resolved, _ = await loop.run_in_executor(
                        self._pool, socket.getnameinfo, address,
                        socket.NI_NUMERICHOST | socket.NI_NUMERICSERV,
                    )
            elif fam == socket.AF_INET:
                resolved = str(address[0])
            else:
                continue
            results.append(ResolveResult(hostname=host, host=resolved, port=int(address[1]),
                                         family=fam, proto=proto, flags=_NUMERIC_FLAGS))
        return results

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that drops refused addresses, so the connector never dials them."""

    def __init__(
        self,
        policy: AddressPolicy,
        inner: AbstractResolver | None = None,
        trusted_hosts: Collection[str] = (),
        trusted_addresses: TrustedAddresses | None = None,
        dns_threads: int = 8,
    ) -> None:
        """`trusted_hosts`: names the operator configured (the egress proxy), not customers';
        what they resolve to is added to `trusted_addresses` for the socket factory."""
        self._policy = policy
        self._inner = inner
        self._dns_threads = dns_threads
        self._trusted = frozenset(h.lower().rstrip(".") for h in trusted_hosts)
        self._trusted_addresses = trusted_addresses

    def _resolver(self) -> AbstractResolver:
        """The inner resolver; by default a PoolResolver (its own bounded threads)."""
        if self._inner is None:
            self._inner = PoolResolver(self._dns_threads)
        return self._inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve via the inner resolver and keep only allowed addresses; none left: refuse."""
        nettiming.dns_started()
        answers = await self._resolver().resolve(host, port, family=family)
        nettiming.dns_ended()
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} resolved to no addresses")
        if host.lower().rstrip(".") in self._trusted:
            if self._trusted_addresses is not None:
                for answer in answers:
                    self._trusted_addresses.add(answer["host"])
            return answers
        allowed: list[ResolveResult] = []
        reasons: list[str] = []
        for answer in answers:
            reason = self._policy.refusal_reason(answer["host"])
            if reason is None:
                allowed.append(answer)
            else:
                reasons.append(reason)
        if not allowed:
            raise BlockedAddress(host, reasons[0])
        if reasons:
            log.warning("dropped %d refused address(es) of %s (%s)", len(reasons), host, reasons[0])
        return allowed

    async def close(self) -> None:
        """Close the inner resolver."""
        if self._inner is not None:
            await self._inner.close()


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything it wraps: os_error, __cause__, __context__ (no cycles)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [current.__context__, current.__cause__]
        if isinstance(current, ClientConnectorError):
            linked.append(current.os_error)
        stack.extend(e for e in linked if e is not None)


def blocked_cause(exc: BaseException, record: DialRecord | None = None) -> BlockedAddress | None:
    """The BlockedAddress behind whatever aiohttp raised (see the module docstring), or None.

    With several refused addresses aiohappyeyeballs raises a plain OSError summary; the
    attempt's DialRecord still holds the refusals then."""
    for candidate in _causes(exc):
        if isinstance(candidate, BlockedAddress):
            return candidate
    if record is not None and record.refused:
        return record.refused[0]
    return None
