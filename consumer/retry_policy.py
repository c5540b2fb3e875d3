"""The retry decision: a small pure function of the attempt, the tiers and the response.

See docs/architecture.md (retries).

Attempt 1 is immediate. After the n-th failed attempt the delivery waits in tier n
(`perkamo.webhooks.retry.<tier n>`); after the last tier's attempt fails it is dead-lettered.
A `Retry-After` on 429/503 jumps to the first tier not shorter than it.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

from consumer.constants import RETRY_TOPIC_PREFIX

_DELTA_SECONDS_RE = re.compile(r"[0-9]{1,10}")
_TIER_RE = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
JITTER_FRACTION = 0.10


def parse_tiers(tiers: Sequence[str]) -> list[tuple[str, float]]:
    """`["10s", "1m"]` -> `[("10s", 10.0), ("1m", 60.0)]`; raises ValueError naming a bad tier."""
    if not tiers:
        raise ValueError("at least one retry tier is required, e.g. 10s,1m,10m")
    parsed: list[tuple[str, float]] = []
    for tier in tiers:
        match = _TIER_RE.match(tier)
        if not match or int(match.group(1)) == 0:
            raise ValueError(f"retry tier {tier!r} is not a positive duration like 10s, 1m, 6h")
        parsed.append((tier, int(match.group(1)) * _UNIT_SECONDS[match.group(2)]))
    if len({name for name, _ in parsed}) != len(parsed):
        raise ValueError("retry tiers must be distinct")
    if any(b[1] < a[1] for a, b in itertools.pairwise(parsed)):
        raise ValueError("retry tiers must not get shorter")
    return parsed


def tier_topic(tier: str) -> str:
    return RETRY_TOPIC_PREFIX + tier


def schedule_span_s(tiers: Sequence[tuple[str, float]]) -> float:
    """The longest a run of attempts can take: every tier's delay at its full jitter.

    A delivery held by an open circuit ends `failed` once its run is older than this.
    """
    return sum(delay for _, delay in tiers) * (1 + JITTER_FRACTION)


def due_ahead_s(delay_s: float) -> float:
    """The furthest ahead a due time this service writes for a tier of `delay_s` can lie (its
    delay at full jitter, plus a second of slack for clocks)."""
    return delay_s * (1 + JITTER_FRACTION) + 1.0


def max_due_ahead_s(tiers: Sequence[tuple[str, float]]) -> float:
    """The furthest ahead a due time on any tier can lie."""
    return max(due_ahead_s(delay) for _, delay in tiers)


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """Where a failed delivery goes next: a tier (with its due time) or the dead-letter topic."""

    tier: str | None  # None: dead-letter, the attempts are exhausted
    due_ms: int  # epoch ms of the next attempt; 0 when dead-lettered

    @property
    def exhausted(self) -> bool:
        return self.tier is None


def parse_retry_after(value: str | None, now_s: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS_RE.fullmatch(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # asctime form: RFC 9110 says it is GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now_s)


def decide(
    failed_attempt: int,
    tiers: Sequence[tuple[str, float]],
    now_ms: int,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> RetryDecision:
    """The next step after attempt number `failed_attempt` (1-based) failed at `now_ms`.

    Tier n follows attempt n. Retry-After moves forward to the first tier whose delay is at
    least that long (never backwards); past the last tier it dead-letters. The due time is
    failure time + tier delay + 0-10 % jitter, so a delivery is never attempted early.
    """
    index = failed_attempt - 1
    if retry_after_s is not None:
        while index < len(tiers) and tiers[index][1] < retry_after_s:
            index += 1
    if index >= len(tiers):
        return RetryDecision(tier=None, due_ms=0)
    name, delay = tiers[index]
    jitter = (rng or random).random() * JITTER_FRACTION
    return RetryDecision(tier=name, due_ms=now_ms + int(delay * (1 + jitter) * 1000))


def attempt_after_tier(tier: str, tiers: Sequence[tuple[str, float]]) -> int:
    """The attempt number a message in `tier` makes when no header says otherwise."""
    for index, (name, _) in enumerate(tiers):
        if name == tier:
            return index + 2
    raise ValueError(f"unknown retry tier {tier!r}")
