"""What a resend or replay will re-publish, checked before anything goes out.

The value types of re-publishing (a replay's Selection, where a delivery stands in history,
the ReplayPlan and the results), the errors the API maps to statuses, and `plan_of`: the pure
rule that turns a selection's deliveries into the attempts to publish, or refuses double work.
Publishing and the in-process guard are `consumer.republish.Republisher`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from consumer import constants as c
from consumer.errors import BadRequest, Conflict
from consumer.models import stable_id
from consumer.queries import STUCK_AFTER, check_range, check_status, check_text, iso
from consumer.sql import REPLAY_CAP
from consumer.tracecontext import TraceContext, of_ids

MAX_REPLAY: Final = REPLAY_CAP  # deliveries per replay request: split larger ranges
REPLAY_PREFIX: Final = "rpl"
RESEND_PREFIX: Final = "rsn"


@dataclass(frozen=True, slots=True)
class Selection:
    """Which deliveries a replay takes: a Space's, first attempted in [since, until)."""

    space: str
    since: datetime
    until: datetime | None = None
    status: str = ""

    def __post_init__(self) -> None:
        check_text("space", self.space, required=True)
        check_status(self.status)
        check_range(self.since, self.until)

    @property
    def replay_id(self) -> str:
        """Deterministic: the same selection always gets the same id."""
        return stable_id(
            REPLAY_PREFIX, self.space, iso(self.since) or "", iso(self.until) or "", self.status
        )

    def describe(self) -> dict[str, Any]:
        return {"space": self.space, "since": iso(self.since), "until": iso(self.until),
                "status": self.status or None}


@dataclass(frozen=True, slots=True)
class DeliveryState:
    """Where one delivery stands in history, and where its event first came from."""

    delivery_id: str
    space: str
    last_attempt: int
    last_status: str
    next_attempt_at: datetime | None
    last_replay_id: str
    source_topic: str
    source_partition: int
    source_offset: int
    # The latest record's span: a re-published attempt is its child, in the delivery's trace.
    trace: TraceContext | None = None

    @classmethod
    def of(cls, row: Sequence[Any]) -> DeliveryState:
        next_at = row[4]
        if next_at is not None and next_at.tzinfo is None:
            next_at = next_at.replace(tzinfo=UTC)
        last_trace = row[10] if len(row) > 10 and row[10] else ("", "")
        return cls(str(row[0]), str(row[1]), int(row[2]), str(row[3]), next_at, str(row[5]),
                   str(row[6]), int(row[7]), int(row[8]),
                   of_ids(str(last_trace[0]), str(last_trace[1])))

    def in_retry(self, now: datetime) -> bool:
        """Still waiting in a retry tier (and not stuck), or held for its endpoint's circuit:
        the loop will attempt it anyway."""
        if self.last_status == c.STATUS_HELD:
            return True
        if self.last_status != c.STATUS_RETRYING:
            return False
        return self.next_attempt_at is None or self.next_attempt_at > now - STUCK_AFTER


@dataclass(frozen=True, slots=True)
class ResendResult:
    delivery_id: str
    attempt: int
    resend_id: str
    topic: str

    def as_json(self) -> dict[str, Any]:
        return {"delivery_id": self.delivery_id, "attempt": self.attempt,
                "resend_id": self.resend_id, "topic": self.topic, "trigger": c.TRIGGER_RESEND}


@dataclass(slots=True)
class ReplayPlan:
    """A checked replay: what it matched and what it will publish, at which attempt numbers."""

    selection: Selection
    replay_id: str
    matched: int
    in_retry: int
    todo: list[tuple[DeliveryState, int]] = field(default_factory=list)
    forced: bool = False
    # Re-published moments ago (a resend, another replay) and not in history yet: skipped.
    on_the_way: int = 0

    def as_json(self, published: int, dry_run: bool) -> dict[str, Any]:
        return {
            "replay_id": self.replay_id,
            "matched": self.matched,
            "eligible": len(self.todo),
            "published": published,
            "skipped_in_retry": self.in_retry,
            "skipped_on_the_way": self.on_the_way,
            "dry_run": dry_run,
            "forced": self.forced,
            "selection": self.selection.describe(),
        }


def plan_of(
    selection: Selection, states: list[DeliveryState], now: datetime,
    pending_attempt: Callable[[DeliveryState], int], force: bool = False,
) -> ReplayPlan:
    """The deliveries a replay publishes and their next attempt numbers.

    `pending_attempt` gives the attempt re-published moments ago that history does not show
    yet (0: none): such a delivery is on its way and is skipped, counted, forced or not (a
    second copy would deliver it twice). Deliveries still in the retry tiers are left to them.
    Raises Conflict when some were replayed by an earlier selection (unless `force`), and
    BadRequest when more than MAX_REPLAY matched (the selection reads MAX_REPLAY + 1 rows)."""
    if len(states) > MAX_REPLAY:
        raise BadRequest(
            f"the selection has more than {MAX_REPLAY} deliveries, the most one request "
            "replays: split the time range"
        )
    base_id = selection.replay_id
    plan = ReplayPlan(selection, base_id, matched=len(states), in_retry=0, forced=force)
    if force:
        plan.replay_id = stable_id(REPLAY_PREFIX, base_id, "forced", str(time.time_ns()))
    earlier: dict[str, int] = {}
    for state in states:
        if state.in_retry(now):
            plan.in_retry += 1
            continue
        if pending_attempt(state):
            plan.on_the_way += 1
            continue
        if state.last_replay_id.startswith(REPLAY_PREFIX + "_"):
            earlier[state.last_replay_id] = earlier.get(state.last_replay_id, 0) + 1
        attempt = state.last_attempt + 1
        if attempt <= c.MAX_ATTEMPT:
            plan.todo.append((state, attempt))
    if earlier and not force:
        ids = sorted(earlier, key=lambda k: -earlier[k])
        raise Conflict(
            f"{sum(earlier.values())} of the {len(states)} matched deliveries were already "
            "replayed (their latest attempt is from an earlier replay); nothing published. "
            "Check them, then use force to replay them again.",
            replay_id=ids[0],
            details={"earlier_replay_ids": ids[:10], "matched": len(states),
                     "already_replayed": sum(earlier.values()), "on_the_way": plan.on_the_way},
        )
    return plan
