"""One HTTPS delivery attempt with aiohttp, mapped to an outcome in one place (DESIGN §4).

Exactly the contract's headers go out (plus Host and Content-Length, which HTTP needs, and
the opt-in signature headers when the endpoint has signing secrets). Redirects are not
followed; at most `response_excerpt_bytes` of any body is read. The URL never appears in an
error string: errors name the host only.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import time
from collections.abc import Mapping

import aiohttp

from consumer import constants as c
from consumer import metrics as m
from consumer.breaker import CircuitBreakers
from consumer.config import Settings
from consumer.errors import BlockedAddress
from consumer.models import AttemptResult, Endpoint, Event
from consumer.netguard import (
    AddressPolicy,
    GuardedResolver,
    GuardedSocketFactory,
    TrustedAddresses,
    blocked_cause,
    dialling,
    take_dial,
    url_host,
)
from consumer.retry_policy import parse_retry_after
from consumer.signing import signature_headers

log = logging.getLogger(__name__)

# aiohttp adds Accept and Accept-Encoding by default; the contract's header set has neither.
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding")


_CIRCUIT_OPEN = AttemptResult(
    m.OUTCOME_CIRCUIT_OPEN,
    error="circuit open: the endpoint kept failing; no HTTP call made, moved to the next tier",
)


def contract_headers(event: Event, delivery_id: str, attempt: int) -> dict[str, str]:
    """The v1 contract's request headers, in order."""
    return {
        c.H_CONTENT_TYPE: "application/json",
        c.H_USER_AGENT: c.USER_AGENT,
        c.H_DELIVERY: delivery_id,
        c.H_EVENT: event.type,
        c.H_SPACE: event.space_slug,
        c.H_ATTEMPT: str(attempt),
    }


def make_ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    """System trust plus PERKAMO_CA_BUNDLE; verification is always on."""
    context = ssl.create_default_context()
    if ca_bundle:
        context.load_verify_locations(cafile=ca_bundle)
    return context


class Deliverer:
    """Owns the process's one aiohttp session and makes delivery attempts."""

    def __init__(self, settings: Settings, metrics: m.Metrics, breakers: CircuitBreakers) -> None:
        self._settings = settings
        self._metrics = metrics
        self._policy = AddressPolicy(settings.allow_private_networks)
        self._timeout = aiohttp.ClientTimeout(total=settings.delivery_timeout_s)
        self._excerpt = settings.response_excerpt_bytes
        self._proxy = settings.https_proxy or None
        self._session: aiohttp.ClientSession | None = None
        self._resolver: GuardedResolver | None = None
        self._breakers = breakers
        self._per_endpoint: dict[str, asyncio.Semaphore] = {}
        self._waiting: dict[str, int] = {}
        # Deliveries that may wait for one endpoint's connections before more are moved on.
        self._queue_cap = 2 * settings.max_in_flight_per_endpoint
        self._vetted: dict[str, BlockedAddress | None] = {}
        # Per endpoint: the start time of each call in progress (token -> monotonic time).
        self._started: dict[str, dict[int, float]] = {}
        self._tokens = itertools.count()
        self._slow_after_s = min(1.0, settings.delivery_timeout_s / 2)

    async def start(self) -> None:
        # The proxy is the one trusted destination: its literal, or what its host resolves to.
        proxy_host = _proxy_host(self._proxy)
        trusted = TrustedAddresses([proxy_host] if proxy_host else [])
        self._resolver = GuardedResolver(
            self._policy,
            trusted_hosts=(proxy_host,) if proxy_host else (),
            trusted_addresses=trusted,
            dns_threads=self._settings.dns_threads,
        )
        connector = aiohttp.TCPConnector(
            limit=self._settings.max_in_flight,
            # Per-endpoint caps are the semaphores above; aiohttp's limit_per_host would couple
            # different customers' endpoints that share a host name.
            limit_per_host=0,
            ssl=make_ssl_context(str(self._settings.ca_bundle) if self._settings.ca_bundle else None),
            # With an egress proxy aiohttp resolves only the proxy's host, which the operator
            # chose (often a private address); the proxy must enforce egress rules itself.
            resolver=self._resolver,
            # Every dial, of names and IP literals alike, is judged on the address it connects to.
            socket_factory=GuardedSocketFactory(self._policy, trusted),
            ttl_dns_cache=30,
            enable_cleanup_closed=True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            auto_decompress=False,
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._resolver is not None:  # the connector does not close a resolver it was given
            await self._resolver.close()
            self._resolver = None

    @property
    def max_active_per_endpoint(self) -> int:
        return max((len(calls) for calls in self._started.values()), default=0)

    async def attempt(
        self, endpoint: Endpoint, event: Event, delivery_id: str, attempt: int
    ) -> AttemptResult:
        """POST the event to the endpoint once; never raises for network or HTTP failures.

        Isolation: an endpoint whose circuit is open gets no call, and neither does one that is
        slow or failing while a full queue of deliveries already waits for its connections: the
        delivery moves on to its next tier at once instead of holding one of the global
        in-flight places. A healthy endpoint's backlog (a big customer's burst) just waits.
        """
        key = endpoint.id
        if self._breakers.is_open(key):
            return _CIRCUIT_OPEN
        waiting = self._waiting.get(key, 0)
        if waiting >= self._queue_cap and (self._breakers.failing(key) or self._slow(key)):
            return AttemptResult(
                m.OUTCOME_SATURATED,
                error=f"endpoint saturated: {waiting} deliveries already waiting; no HTTP call made",
            )
        semaphore = self._per_endpoint.get(key)
        if semaphore is None:
            semaphore = self._per_endpoint[key] = asyncio.Semaphore(self._settings.max_in_flight_per_endpoint)
        self._waiting[key] = waiting + 1
        try:
            await semaphore.acquire()
        finally:
            self._waiting[key] -= 1
        token: int | None = None
        try:
            # Checked again after the wait: the circuit may have opened meanwhile, and this
            # takes the half-open probe's place when one is due.
            if not self._breakers.allow(key):
                return _CIRCUIT_OPEN
            token = next(self._tokens)
            self._started.setdefault(key, {})[token] = time.monotonic()
            self._metrics.in_flight_max_per_endpoint.set(self.max_active_per_endpoint)
            headers = contract_headers(event, delivery_id, attempt)
            if endpoint.signing_secrets:
                headers.update(
                    signature_headers(endpoint.signing_secrets, delivery_id, int(time.time()), event.body)
                )
            result = await self._post(endpoint, event.body, headers)
            self._breakers.record(key, result.delivered)
            return result
        finally:
            semaphore.release()
            if token is not None:
                calls = self._started[key]
                del calls[token]
                if not calls:
                    del self._started[key]

    def _slow(self, key: str) -> bool:
        """The endpoint's oldest request in progress has run longer than a healthy one would."""
        started = self._started.get(key)
        if not started:
            return False
        return time.monotonic() - min(started.values()) > self._slow_after_s

    def forget(self, endpoint_id: str, host: str = "") -> None:
        """Drop what is kept per endpoint (and per host) once the endpoint went away.

        State an attempt still uses stays: a delivery waiting for the endpoint's semaphore, or
        a call in progress; the next forget, or the end of those calls, is soon enough."""
        if not self._waiting.get(endpoint_id) and endpoint_id not in self._started:
            self._per_endpoint.pop(endpoint_id, None)
            self._waiting.pop(endpoint_id, None)
        if host:
            self._vetted.pop(host, None)

    def _vet_literal(self, host: str) -> None:
        """The SSRF guard for IP-literal hosts before the request (a proxy only sees CONNECT),
        cached per host; it also names the host the socket factory judges this task's dial for.
        `host` is yarl's normalised host (Endpoint.host), the one aiohttp dials."""
        dialling(host)
        if host in self._vetted:
            refused = self._vetted[host]
        else:
            try:
                self._policy.check_literal(host)
                refused = None
            except BlockedAddress as exc:
                refused = exc
            if len(self._vetted) >= 4096:  # one entry per host; bounded even without forget()
                self._vetted.clear()
            self._vetted[host] = refused
        if refused is not None:
            raise refused

    async def _post(self, endpoint: Endpoint, body: bytes, headers: Mapping[str, str]) -> AttemptResult:
        assert self._session is not None, "Deliverer.start() was not called"
        host = endpoint.host
        started = time.perf_counter()
        try:
            self._vet_literal(host)
            async with self._session.post(
                endpoint.url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=self._timeout,
                proxy=self._proxy,
            ) as response:
                excerpt = await self._read_excerpt(response)
                duration_ms = _ms_since(started)
                status_text = response.reason or ""
                if 200 <= response.status < 300:
                    return AttemptResult(
                        m.OUTCOME_DELIVERED, response.status, status_text, duration_ms, "", excerpt
                    )
                retry_after = None
                if response.status in (429, 503):
                    retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
                error = f"HTTP {response.status}"
                if 300 <= response.status < 400:
                    error += " (redirects are not followed)"
                return AttemptResult(
                    m.OUTCOME_HTTP_STATUS,
                    response.status,
                    status_text,
                    duration_ms,
                    error,
                    excerpt,
                    retry_after,
                )
        except Exception as exc:  # every failure becomes an outcome; nothing escapes
            return _failure(exc, host, endpoint.url, _ms_since(started))

    async def _read_excerpt(self, response: aiohttp.ClientResponse) -> str:
        if self._excerpt <= 0:
            return ""
        try:
            chunk = await response.content.read(self._excerpt)
        except (TimeoutError, aiohttp.ClientError):
            return ""
        return chunk.decode("utf-8", "replace")


def _proxy_host(proxy: str | None) -> str:
    """The proxy's host as aiohttp dials it (yarl's normalised form), '' without a proxy."""
    return url_host(proxy) if proxy else ""


def _ms_since(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)


def _failure(exc: BaseException, host: str, url: str, duration_ms: int) -> AttemptResult:
    """Map aiohttp's exception tree to an outcome and a URL-free error string."""
    # The dial record matters only for a connection error (aiohttp's wrapping of the socket
    # factory's refusal); it is taken once, for this host.
    record = take_dial(host) if isinstance(exc, aiohttp.ClientConnectorError) else None
    blocked = exc if isinstance(exc, BlockedAddress) else blocked_cause(exc, record)
    if blocked is not None:
        outcome, text = m.OUTCOME_BLOCKED, f"address refused: {blocked}"
    elif isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        outcome, text = m.OUTCOME_TIMEOUT, "timed out waiting for the endpoint"
    elif isinstance(exc, (aiohttp.ClientSSLError, ssl.SSLError)) or isinstance(
        getattr(exc, "os_error", None), ssl.SSLError
    ):
        outcome, text = m.OUTCOME_TLS, f"TLS error: {_describe(exc)}"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        outcome, text = m.OUTCOME_CONNECT, f"cannot connect: {_describe(exc)}"
    elif isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
        outcome, text = m.OUTCOME_PROTOCOL, f"connection dropped: {_describe(exc)}"
    elif isinstance(exc, aiohttp.ClientResponseError):
        outcome, text = m.OUTCOME_PROTOCOL, f"invalid HTTP response: {_describe(exc)}"
    elif isinstance(exc, (aiohttp.ClientError, OSError)):
        outcome, text = m.OUTCOME_CONNECT, f"connection error: {_describe(exc)}"
    else:
        log.error("unexpected delivery error for host %s: %s", host, type(exc).__name__)
        outcome, text = m.OUTCOME_PROTOCOL, f"unexpected error: {type(exc).__name__}"
    return AttemptResult(outcome, 0, "", duration_ms, text.replace(url, host)[:500])


def _describe(exc: BaseException) -> str:
    # Some aiohttp errors carry the URL in their text (ClientResponseError, InvalidURL): use
    # only their URL-free parts.
    if isinstance(exc, aiohttp.InvalidURL):
        detail = "invalid URL"
    elif isinstance(exc, aiohttp.ClientResponseError):
        detail = f"{exc.status} {exc.message}"
    else:
        detail = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {detail}"
