"""Plain data the modules pass between them: events, endpoints, attempt results and rows."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

import yarl

from consumer.constants import Outcome

# Lower-case RFC 4648 base32, two characters (10 bits) per table entry.
_B32 = "abcdefghijklmnopqrstuvwxyz234567"
_B32_PAIRS = tuple(a + b for a in _B32 for b in _B32)


def stable_id(prefix: str, *parts: str) -> str:
    """A deterministic, readable id: `prefix_` + 26 base32 chars of SHA-256 over the parts.

    The same characters as `b32encode(digest)[:26].lower()` (the ids of every version so
    far): the first 130 bits of the digest, 10 bits at a time from a table, without
    base64's pure-Python loop over the whole digest."""
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    bits = int.from_bytes(digest[:17], "big") >> 6  # 136 bits -> the first 130
    return prefix + "_" + "".join([_B32_PAIRS[(bits >> shift) & 1023] for shift in range(120, -1, -10)])


def delivery_id_for(event_id: str, endpoint_id: str) -> str:
    """x-perkamo-delivery: the same for an (event, endpoint) pair on every attempt and redelivery."""
    return stable_id("dlv", event_id, endpoint_id)


@lru_cache(maxsize=65_536)
def host_of(url: str) -> str:
    """The host aiohttp dials for a URL: yarl's normalised ASCII host, not `urlsplit`'s, which
    keeps look-alike dots such as U+3002 (cached: it is asked for on every delivery)."""
    try:
        return yarl.URL(url).raw_host or ""
    except (ValueError, TypeError):
        return ""


@dataclass(frozen=True, slots=True)
class Event:
    """A validated event envelope; `body` is the exact bytes that are POSTed."""

    body: bytes
    id: str
    type: str
    space_slug: str
    environment: str
    user_id: str
    transaction_id: str
    text: str = ""  # `body` decoded (valid UTF-8: it parsed as JSON), for the attempt record


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A Space's webhook endpoint. The URL is a secret: log `host` only."""

    id: str
    space: str
    url: str
    active: bool = True
    signing_secrets: tuple[str, ...] = ()

    @property
    def host(self) -> str:
        return host_of(self.url)

    def __repr__(self) -> str:  # never let the URL reach a log line through repr()
        return f"Endpoint(id={self.id!r}, space={self.space!r}, host={self.host!r})"


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one delivery attempt came to."""

    outcome: str  # an Outcome; "held" on the stand-in result of a hold record
    status_code: int = 0
    status_text: str = ""
    duration_ms: int = 0
    error: str = ""
    response_excerpt: str = ""
    retry_after_s: float | None = None

    @property
    def delivered(self) -> bool:
        return self.outcome == Outcome.DELIVERED

    @property
    def called(self) -> bool:
        """A connection was attempted (the SSRF guard refuses before any socket opens)."""
        return self.outcome != Outcome.BLOCKED


@dataclass(slots=True)
class AttemptRow:
    """One row of perkamo.webhook_attempts (docs/analysts.md lists its columns)."""

    delivery_id: str
    attempt: int
    event_id: str
    event_type: str
    space_slug: str
    environment: str
    endpoint_id: str
    endpoint_host: str
    user_id: str
    transaction_id: str
    trigger: str
    status: str
    status_code: int
    status_text: str
    duration_ms: int
    error: str
    attempted_at: datetime
    next_attempt_at: datetime | None
    request_body: str  # the exact POSTed bytes, decoded (valid UTF-8 JSON); a prefix when cut
    response_excerpt: str
    source_topic: str
    source_partition: int
    source_offset: int
    error_kind: str = ""
    replay_id: str = ""
    # Hold records only (attempt 0, status held or failed): the attempt the delivery waits to make.
    pending_attempt: int = 0
    # The attempt's span (W3C ids, consumer.tracing); a hold record: the context it continues from.
    trace_id: str = ""
    span_id: str = ""
    # Where the attempt's time went (consumer.nettiming); None = not measured or not reached.
    dns_ms: int | None = None
    connect_ms: int | None = None
    tls_ms: int | None = None
    ttfb_ms: int | None = None
    connection_reused: bool | None = None
    # The endpoint certificate's notAfter, when this attempt opened a new TLS connection.
    cert_not_after: datetime | None = None
    # Set when the record carries a cut request_body (consumer.attempts): the POSTed body's
    # full length in bytes and its SHA-256 (hex); 0 and '' when request_body is the whole body.
    request_body_truncated: bool = False
    request_body_bytes: int = 0
    request_body_sha256: str = ""
