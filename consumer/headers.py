"""The delivery's own Kafka headers (retry, DLQ, resend, replay messages): read strictly.

Headers arrive from outside the service too (an upstream bug, an operator's hand-made
message), and their values end up in HTTP headers and history rows. So every value is
checked here, once, and a bad one dead-letters the message as `bad_header` instead of
wedging a later stage (a delivery id aiohttp refuses to send, an offset ClickHouse cannot
store).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from consumer import constants as c
from consumer.errors import InvalidEvent
from consumer.intake import REASON_BAD_HEADER

_ID_RE = re.compile(rb"[A-Za-z0-9_.:-]{1,128}")
_TOPIC_RE = re.compile(rb"[A-Za-z0-9._-]{1,249}")
_INT_RE = re.compile(rb"[0-9]{1,19}")
_MAX_ATTEMPT = 10_000
_MAX_PARTITION = 2**31 - 1
_MAX_INT64 = 2**63 - 1


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


def read_meta(headers: dict[str, bytes]) -> DeliveryMeta:
    """Validate the perkamo-* headers; raises InvalidEvent(bad_header) naming the bad one."""
    attempt = _int(headers, c.K_ATTEMPT, 1, _MAX_ATTEMPT)
    run_attempt = _int(headers, c.K_RUN_ATTEMPT, 1, _MAX_ATTEMPT)
    trigger = _text(headers, c.K_TRIGGER, _ID_RE)
    if trigger and trigger not in c.TRIGGERS:
        raise InvalidEvent(REASON_BAD_HEADER, f"header {c.K_TRIGGER} is not one of {', '.join(c.TRIGGERS)}")
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
    )


def due_ms(headers: dict[str, bytes]) -> int | None:
    """The retry's due time; a missing or unreadable one means due now (read_meta judges it)."""
    value = headers.get(c.K_DUE_MS)
    if value is None or not _INT_RE.fullmatch(value):
        return None
    return int(value)


def _text(headers: dict[str, bytes], name: str, pattern: re.Pattern[bytes]) -> str:
    value = headers.get(name)
    if value is None:
        return ""
    if not pattern.fullmatch(value):
        raise InvalidEvent(REASON_BAD_HEADER, f"header {name} has characters or a length not allowed")
    return value.decode("ascii")


def _int(headers: dict[str, bytes], name: str, low: int, high: int) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    if not _INT_RE.fullmatch(value) or not low <= int(value) <= high:
        raise InvalidEvent(REASON_BAD_HEADER, f"header {name} is not an integer in {low}..{high}")
    return int(value)
