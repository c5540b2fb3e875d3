"""The delivery's own Kafka headers (retry, held, DLQ, resend, replay messages): read and written here.

Headers arrive from outside the service too (an upstream bug, an operator's hand-made
message), and their values end up in HTTP headers and history rows. So every value is
checked here, once, and a bad one dead-letters the message as `bad_header` instead of
wedging a later stage (a delivery id aiohttp refuses to send, an offset ClickHouse cannot
store, a due time years ahead that would pause a tier partition until then).

Every message the service writes gets its header list built from scratch here, one value
per name, from the `DeliveryMeta` it read and what happened since.

The W3C `traceparent`/`tracestate` headers are read too (consumer.tracecontext) and carried on
every retry, held and DLQ message, so the delivery's later attempts stay in its trace. Unlike
the perkamo-* headers, a malformed trace header is ignored (a new trace starts): the event's
producer's tracing must never stop a delivery.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from consumer import constants as c
from consumer import tracecontext
from consumer.budget import KEPT_HEADERS_MAX
from consumer.constants import DlqReason
from consumer.errors import InvalidEvent
from consumer.tracecontext import TraceContext

Headers = list[tuple[str, bytes]]

_ID_RE = re.compile(rb"[A-Za-z0-9_.:-]{1,128}")
_TOPIC_RE = re.compile(rb"[A-Za-z0-9._-]{1,249}")
_INT_RE = re.compile(rb"[0-9]{1,19}")
_MAX_PARTITION = 2**31 - 1
_MAX_INT64 = 2**63 - 1
_DETAIL_MAX = 500


@dataclass(frozen=True, slots=True)
class DeliveryMeta:
    """What a message's headers say about its delivery; defaults for a fresh event."""

    attempt: int = 1
    run_attempt: int = 1
    delivery_id: str = ""
    trigger: str = ""
    replay_id: str = ""
    origin: tuple[str, int, int] | None = None
    first_failed_ms: int | None = None
    run_started_ms: int | None = None
    held_since_ms: int | None = None
    # The delivery's trace: the event's own context, then the latest attempt's span.
    trace: TraceContext | None = None

    def started(self, now_ms: int) -> DeliveryMeta:
        """The meta with the run's start filled in (now, for the run's first message)."""
        if self.run_started_ms is not None:
            return self
        return replace(self, run_started_ms=self.first_failed_ms or now_ms)


def read_meta(headers: dict[str, bytes]) -> DeliveryMeta:
    """Validate the perkamo-* headers; raises InvalidEvent(bad_header) naming the bad one."""
    attempt = _int(headers, c.K_ATTEMPT, 1, c.MAX_ATTEMPT)
    run_attempt = _int(headers, c.K_RUN_ATTEMPT, 1, c.MAX_ATTEMPT)
    trigger = _text(headers, c.K_TRIGGER, _ID_RE)
    if trigger and trigger not in c.TRIGGERS:
        raise InvalidEvent(
            DlqReason.BAD_HEADER, f"header {c.K_TRIGGER} is not one of {', '.join(c.TRIGGERS)}"
        )
    origin_topic = _text(headers, c.K_ORIGIN_TOPIC, _TOPIC_RE)
    origin = None
    if origin_topic:
        origin = (
            origin_topic,
            _int(headers, c.K_ORIGIN_PARTITION, 0, _MAX_PARTITION) or 0,
            _int(headers, c.K_ORIGIN_OFFSET, 0, _MAX_INT64) or 0,
        )
    return DeliveryMeta(
        attempt=attempt or 1,
        run_attempt=run_attempt or attempt or 1,
        delivery_id=_text(headers, c.K_DELIVERY_ID, _ID_RE),
        trigger=trigger,
        replay_id=_text(headers, c.K_REPLAY_ID, _ID_RE),
        origin=origin,
        first_failed_ms=_int(headers, c.K_FIRST_FAILED_MS, 0, _MAX_INT64),
        run_started_ms=_int(headers, c.K_RUN_STARTED_MS, 0, _MAX_INT64),
        held_since_ms=_int(headers, c.K_HELD_SINCE_MS, 0, _MAX_INT64),
        trace=_trace(headers),
    )


def untrusted_meta(headers: dict[str, bytes]) -> DeliveryMeta:
    """A fresh delivery's meta for a message on an events topic, whose producer is not the
    service: its perkamo-* headers are ignored (a forged delivery id or attempt number must not
    write another delivery's history or skip retries); only its W3C trace context is kept."""
    return DeliveryMeta(trace=_trace(headers))


def _trace(headers: dict[str, bytes]) -> TraceContext | None:
    parent = headers.get(tracecontext.TRACEPARENT)
    if parent is None:
        return None
    return tracecontext.parse(parent, headers.get(tracecontext.TRACESTATE))


def due_ms(headers: dict[str, bytes]) -> int | None:
    """The retry's due time; a missing or unreadable one means due now (read_meta judges it)."""
    value = headers.get(c.K_DUE_MS)
    if value is None or not _INT_RE.fullmatch(value):
        return None
    return int(value)


def check_due(due: int | None, now_ms: int, max_ahead_ms: int) -> None:
    """A due time further ahead than its tier can put it is a bad header, not a long pause."""
    if due is not None and due > now_ms + max_ahead_ms:
        raise InvalidEvent(
            DlqReason.BAD_HEADER,
            f"header {c.K_DUE_MS} lies {(due - now_ms) // 1000}s ahead, beyond its retry tier's "
            f"delay plus jitter ({max_ahead_ms // 1000}s)",
        )


# Writing ---------------------------------------------------------------------------------


def _carried(
    meta: DeliveryMeta,
    delivery_id: str,
    origin: tuple[str, int, int],
    attempt: int,
    run_attempt: int,
) -> Headers:
    """What every message of a delivery carries on to the next one."""
    out: Headers = [
        (c.K_DELIVERY_ID, delivery_id.encode()),
        (c.K_ATTEMPT, str(attempt).encode()),
        (c.K_RUN_ATTEMPT, str(run_attempt).encode()),
        (c.K_ORIGIN_TOPIC, origin[0].encode()),
        (c.K_ORIGIN_PARTITION, str(origin[1]).encode()),
        (c.K_ORIGIN_OFFSET, str(origin[2]).encode()),
    ]
    if meta.run_started_ms is not None:
        out.append((c.K_RUN_STARTED_MS, str(meta.run_started_ms).encode()))
    if meta.first_failed_ms is not None:
        out.append((c.K_FIRST_FAILED_MS, str(meta.first_failed_ms).encode()))
    if meta.replay_id:
        out.append((c.K_REPLAY_ID, meta.replay_id.encode()))
    if meta.trace is not None:
        out += meta.trace.headers()
    return out


def retry_headers(
    meta: DeliveryMeta,
    delivery_id: str,
    origin: tuple[str, int, int],
    *,
    failed_at_ms: int,
    error_kind: str,
    status_code: int,
    due: int,
) -> Headers:
    """A retry-tier message after attempt `meta.attempt` failed: the next attempt, due then."""
    failed = replace(meta, first_failed_ms=meta.first_failed_ms or failed_at_ms)
    out = _carried(failed, delivery_id, origin, meta.attempt + 1, meta.run_attempt + 1)
    out += [
        (c.K_ERROR_KIND, error_kind.encode()),
        (c.K_STATUS_CODE, str(status_code).encode()),
        (c.K_DUE_MS, str(due).encode()),
    ]
    return out


def held_headers(
    meta: DeliveryMeta,
    delivery_id: str,
    origin: tuple[str, int, int],
    *,
    trigger: str,
    reason: str,
    held_since_ms: int,
) -> Headers:
    """A held-topic message: the same attempt, waiting for the endpoint (no call was made)."""
    out = _carried(meta, delivery_id, origin, meta.attempt, meta.run_attempt)
    out += [
        (c.K_TRIGGER, trigger.encode()),
        (c.K_HELD_SINCE_MS, str(held_since_ms).encode()),
        (c.K_HOLD_REASON, reason.encode()),
    ]
    return out


def dead_letter_headers(
    meta: DeliveryMeta,
    delivery_id: str,
    origin: tuple[str, int, int],
    *,
    reason: str,
    detail: str,
    error_kind: str,
    status_code: int,
    called: bool = True,
) -> Headers:
    """A delivery that ended `failed`: its attempts are spent (exhausted, after the call of
    `meta.attempt`) or its life is (expired while held: `called` False, the attempt unspent)."""
    spent = 1 if called else 0
    out = _carried(meta, delivery_id, origin, meta.attempt + spent, meta.run_attempt + spent)
    out += [
        (c.K_ERROR_KIND, error_kind.encode()),
        (c.K_STATUS_CODE, str(status_code).encode()),
        (c.K_DLQ_REASON, reason.encode()),
        (c.K_DLQ_DETAIL, detail.encode("utf-8", "replace")[:_DETAIL_MAX]),
    ]
    return out


def invalid_input_headers(
    kept: Headers, origin: tuple[str, int, int], *, reason: str, detail: str
) -> Headers:
    """Bad input: the original non-perkamo headers (as many as fit in KEPT_HEADERS_MAX bytes)
    plus the reason and where it came from."""
    out: Headers = []
    room = KEPT_HEADERS_MAX
    for k, v in kept:
        if k.startswith("perkamo-"):
            continue
        room -= len(k) + len(v)
        if room < 0:
            break
        out.append((k, v))
    out += [
        (c.K_DLQ_REASON, reason.encode()),
        (c.K_DLQ_DETAIL, detail.encode("utf-8", "replace")[:_DETAIL_MAX]),
        (c.K_ORIGIN_TOPIC, origin[0].encode()),
        (c.K_ORIGIN_PARTITION, str(origin[1]).encode()),
        (c.K_ORIGIN_OFFSET, str(origin[2]).encode()),
    ]
    return out


def republish_headers(
    delivery_id: str, origin: tuple[str, int, int], *, attempt: int, trigger: str, replay_id: str,
    trace: TraceContext | None = None,
) -> Headers:
    """A resend or replay: the next attempt number, and a fresh run through the tiers; `trace`
    (the latest attempt's span, from history) keeps it in the delivery's trace."""
    out: Headers = [
        (c.K_DELIVERY_ID, delivery_id.encode()),
        (c.K_ATTEMPT, str(attempt).encode()),
        (c.K_RUN_ATTEMPT, b"1"),  # a resend/replay walks the retry tiers afresh
        (c.K_TRIGGER, trigger.encode()),
        (c.K_REPLAY_ID, replay_id.encode()),
        (c.K_ORIGIN_TOPIC, origin[0].encode()),
        (c.K_ORIGIN_PARTITION, str(origin[1]).encode()),
        (c.K_ORIGIN_OFFSET, str(origin[2]).encode()),
    ]
    if trace is not None:
        out += trace.headers()
    return out


def _text(headers: dict[str, bytes], name: str, pattern: re.Pattern[bytes]) -> str:
    value = headers.get(name)
    if value is None:
        return ""
    if not pattern.fullmatch(value):
        raise InvalidEvent(DlqReason.BAD_HEADER, f"header {name} has characters or a length not allowed")
    return value.decode("ascii")


def _int(headers: dict[str, bytes], name: str, low: int, high: int) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    if not _INT_RE.fullmatch(value) or not low <= int(value) <= high:
        raise InvalidEvent(DlqReason.BAD_HEADER, f"header {name} is not an integer in {low}..{high}")
    return int(value)
