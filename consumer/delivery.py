"""One HTTPS delivery attempt with aiohttp, mapped to an outcome in one place (docs/delivery-contract.md).

Exactly the contract's headers go out (plus Host and Content-Length, which HTTP needs, and
the opt-in signature headers when the endpoint has signing secrets). Redirects are not
followed; at most `response_excerpt_bytes` of any body is read. The URL never appears in an
error string: errors name the host only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from collections.abc import Mapping
from functools import lru_cache

import aiohttp
import yarl

from consumer import metrics as m
from consumer import nettiming
from consumer.addresses import AddressPolicy, TrustedAddresses, url_host
from consumer.config import Settings
from consumer.constants import Outcome
from consumer.contract import contract_headers
from consumer.errors import BlockedAddress
from consumer.models import AttemptResult, Endpoint, Event
from consumer.netguard import GuardedResolver, GuardedSocketFactory, blocked_cause, dialling, take_dial
from consumer.retry_policy import parse_retry_after
from consumer.signing import signature_headers

log = logging.getLogger(__name__)

# aiohttp adds Accept and Accept-Encoding by default; the contract's header set has neither.
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding")
# aiohttp rounds the deadline of any timeout of 5 s or more up to the next whole second of the
# loop's clock (`ceil_threshold`, to batch timers): a 5 s setting timed out after 5 to 6 s. An
# infinite threshold turns the rounding off, so an attempt times out at the setting.
_NO_CEIL = math.inf


def make_ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    """System trust plus PERKAMO_CA_BUNDLE; verification is always on."""
    context = ssl.create_default_context()
    if ca_bundle:
        context.load_verify_locations(cafile=ca_bundle)
    return context


class Deliverer:
    """Owns the process's one aiohttp session and makes delivery calls.

    It knows nothing of caps, circuits or retries: the loop admits a call through the
    endpoint's gate (consumer.gate) and decides what follows from the result.
    """

    def __init__(self, settings: Settings, metrics: m.Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._policy = AddressPolicy(settings.allow_private_networks)
        self._timeout = aiohttp.ClientTimeout(total=settings.delivery_timeout_s,
                                              ceil_threshold=_NO_CEIL)
        self._excerpt = settings.response_excerpt_bytes
        self._proxy = settings.https_proxy or None
        self._session: aiohttp.ClientSession | None = None
        self._resolver: GuardedResolver | None = None
        self._vetted: dict[str, BlockedAddress | None] = {}

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
            # Per-endpoint caps are the gates' (consumer.gate); aiohttp's limit_per_host would
            # couple different customers' endpoints that share a host name.
            limit_per_host=0,
            ssl=self._tls_context(),
            # With an egress proxy aiohttp resolves only the proxy's host, which the operator
            # chose (often a private address); the proxy must enforce egress rules itself.
            resolver=self._resolver,
            # Every dial, of names and IP literals alike, is judged on the address it connects to.
            socket_factory=GuardedSocketFactory(self._policy, trusted),
            ttl_dns_cache=30,
            enable_cleanup_closed=True,
            timeout_ceil_threshold=_NO_CEIL,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            auto_decompress=False,
            trust_env=False,
            # Webhook receivers set no cookies we would send back: no jar to update per answer.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    def _tls_context(self) -> ssl.SSLContext:
        context = make_ssl_context(str(self._settings.ca_bundle) if self._settings.ca_bundle else None)
        # Marks TLS handshakes and reads the certificate's notAfter (verification unchanged).
        return nettiming.instrument(context) if self._settings.network_timings else context

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._resolver is not None:  # the connector does not close a resolver it was given
            await self._resolver.close()
            self._resolver = None

    async def call(
        self, endpoint: Endpoint, event: Event, delivery_id: str, attempt: int,
        extra_headers: Mapping[str, str] | None = None,
    ) -> AttemptResult:
        """POST the event to the endpoint once; never raises for network or HTTP failures.
        `extra_headers`: the opt-in `traceparent` (PERKAMO_TRACE_PROPAGATION)."""
        headers = contract_headers(event, delivery_id, attempt)
        if extra_headers:
            headers.update(extra_headers)
        if endpoint.signing_secrets:
            headers.update(
                signature_headers(endpoint.signing_secrets, delivery_id, int(time.time()), event.body)
            )
        return await self._post(endpoint, event.body, headers)

    def forget(self, host: str) -> None:
        """Drop what is kept per host once its endpoint went away (per-endpoint caps, circuits
        and waiters live in the endpoint's gate: consumer.gate.Gates.forget)."""
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
            nettiming.refused()
            raise refused

    async def _post(self, endpoint: Endpoint, body: bytes, headers: Mapping[str, str]) -> AttemptResult:
        assert self._session is not None, "Deliverer.start() was not called"
        host = endpoint.host
        started = time.perf_counter()
        try:
            self._vet_literal(host)
            async with self._session.post(
                _target(endpoint.url),
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=self._timeout,
                proxy=self._proxy,
            ) as response:
                nettiming.answered()
                excerpt = await self._read_excerpt(response)
                duration_ms = _ms_since(started)
                status_text = response.reason or ""
                if 200 <= response.status < 300:
                    return AttemptResult(
                        Outcome.DELIVERED, response.status, status_text, duration_ms, "", excerpt
                    )
                retry_after = None
                if response.status in (429, 503):
                    retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
                error = f"HTTP {response.status}"
                if 300 <= response.status < 400:
                    error += " (redirects are not followed)"
                return AttemptResult(
                    Outcome.HTTP_STATUS,
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


@lru_cache(maxsize=65_536)
def _target(url: str) -> yarl.URL:
    """The endpoint URL parsed once (aiohttp would parse the string on every request)."""
    return yarl.URL(url)


def _ms_since(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)


def _failure(exc: BaseException, host: str, url: str, duration_ms: int) -> AttemptResult:
    """Map aiohttp's exception tree to an outcome and a URL-free error string."""
    # The dial record matters only for a connection error (aiohttp's wrapping of the socket
    # factory's refusal); it is taken once, for this host.
    record = take_dial(host) if isinstance(exc, aiohttp.ClientConnectorError) else None
    blocked = exc if isinstance(exc, BlockedAddress) else blocked_cause(exc, record)
    if blocked is not None:
        outcome, text = Outcome.BLOCKED, f"address refused: {blocked}"
    elif isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        outcome, text = Outcome.TIMEOUT, "timed out waiting for the endpoint"
    elif isinstance(exc, (aiohttp.ClientSSLError, ssl.SSLError)) or isinstance(
        getattr(exc, "os_error", None), ssl.SSLError
    ):
        outcome, text = Outcome.TLS, f"TLS error: {_describe(exc)}"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        outcome, text = Outcome.CONNECT, f"cannot connect: {_describe(exc)}"
    elif isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
        outcome, text = Outcome.PROTOCOL, f"connection dropped: {_describe(exc)}"
    elif isinstance(exc, aiohttp.ClientResponseError):
        outcome, text = Outcome.PROTOCOL, f"invalid HTTP response: {_describe(exc)}"
    elif isinstance(exc, (aiohttp.ClientError, OSError)):
        outcome, text = Outcome.CONNECT, f"connection error: {_describe(exc)}"
    else:
        log.error("unexpected delivery error for host %s: %s", host, type(exc).__name__)
        outcome, text = Outcome.PROTOCOL, f"unexpected error: {type(exc).__name__}"
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
