"""Resend one delivery or replay many by re-publishing them to Kafka (docs/support.md).

Nothing here calls an endpoint. A re-published message goes to the first events topic with
the delivery's id, the next attempt number (history's highest + 1), a `resend`/`replay`
trigger, a replay id and the original topic/partition/offset in headers; the Kafka loop then
delivers it like any event, to the Space's endpoint as it is now, and records the attempt.

Double work is refused, not done silently:
- a replay's id is derived from its selection (Space, since, until, status), so the same
  selection asked for twice gets the same id and is refused (409) while history holds rows of
  it, or while this process has published it and the rows have not landed yet;
- a delivery whose latest attempt belongs to an EARLIER replay is not replayed again by an
  overlapping selection (e.g. `--since 24h` run twice), and a delivery published here whose
  attempt has not reached history yet is not published again: both refuse the request;
- a delivery still waiting in the retry tiers is left to them (its next attempt would collide
  with the re-published one); only one stuck past its due time (queries.STUCK_AFTER) is taken.
`force` overrides each of these on purpose. The in-process guard covers one consumer
instance; history covers all of them once the rows land.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from consumer import constants as c
from consumer.errors import KafkaError, PerkamoError
from consumer.headers import republish_headers
from consumer.kafka_io import AsyncProducer
from consumer.metrics import Metrics
from consumer.models import stable_id
from consumer.queries import (
    LATEST,
    STUCK_AFTER,
    BadRequest,
    Reader,
    check_range,
    check_status,
    check_text,
    iso,
)
from consumer.sql import BODIES, REPLAY_ROWS, REPLAY_SELECTION, REPUBLISH_ONE
from consumer.tracecontext import TraceContext, of_ids

log = logging.getLogger(__name__)

MAX_ATTEMPT: Final = 10_000  # the Kafka loop refuses attempt headers above this
MAX_REPLAY: Final = 100_000  # deliveries per replay request: split larger ranges
PENDING_TTL_S: Final = 600.0  # how long a published attempt is expected to take to land
_CHUNK = 500
REPLAY_PREFIX: Final = "rpl"
RESEND_PREFIX: Final = "rsn"

ProducerRef = Callable[[], AsyncProducer | None]
Progress = Callable[[int], Awaitable[None]]


class NotFound(PerkamoError):
    """History holds no attempt of this delivery (unknown id, or past the TTL)."""


class Conflict(PerkamoError):
    """Re-publishing now would double work; `force` overrides. Names what it collides with."""

    def __init__(
        self, message: str, replay_id: str = "", details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.replay_id = replay_id
        self.details = details or {}


class NotReady(PerkamoError):
    """The consumer's Kafka producer is not started yet: try again in a moment."""


class PublishFailed(PerkamoError):
    """Kafka did not acknowledge some re-published messages; `published` did go out."""

    def __init__(self, message: str, published: int) -> None:
        super().__init__(message)
        self.published = published


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

    def as_json(self, published: int, dry_run: bool) -> dict[str, Any]:
        return {
            "replay_id": self.replay_id,
            "matched": self.matched,
            "eligible": len(self.todo),
            "published": published,
            "skipped_in_retry": self.in_retry,
            "dry_run": dry_run,
            "forced": self.forced,
            "selection": self.selection.describe(),
        }


@dataclass(slots=True)
class _Pending:
    attempt: int
    expires: float


class Republisher:
    """Resend and replay for one running consumer; holds its in-process double-work guard."""

    def __init__(
        self, store: Reader, topic: str, producer: ProducerRef, metrics: Metrics,
        has_endpoint: Callable[[str], bool] | None = None,
    ) -> None:
        self._store = store
        self._has_endpoint = has_endpoint or (lambda _: True)
        self._topic = topic
        self._producer = producer
        self._metrics = metrics
        self._lock = asyncio.Lock()
        # delivery id -> the attempt published here that has not reached history yet
        self._pending: dict[str, _Pending] = {}
        self._replays: dict[str, float] = {}  # replay id -> expiry of the in-process guard

    # Resend ------------------------------------------------------------------------------

    async def resend(self, delivery_id: str, force: bool = False) -> ResendResult:
        """Re-publish one delivery with the next attempt number and a `resend` trigger."""
        check_text("delivery_id", delivery_id, required=True)
        producer = self._ready()
        async with self._lock:
            self._prune()
            _, rows = await asyncio.to_thread(
                self._store.query, REPUBLISH_ONE, {"delivery_id": delivery_id}
            )
            if not rows:
                raise NotFound(f"history has no attempt of delivery {delivery_id}")
            state = DeliveryState.of(rows[0])
            self._check_endpoint(state.space)
            now = datetime.now(UTC)
            if state.last_status == c.STATUS_HELD and not force:
                raise Conflict(
                    f"delivery {delivery_id} is held: its endpoint's circuit is open, and it goes "
                    "out by itself as soon as the endpoint recovers. Use force to resend anyway."
                )
            if state.in_retry(now) and not force:
                raise Conflict(
                    f"delivery {delivery_id} is still in the retry tiers (next attempt at "
                    f"{iso(state.next_attempt_at)}); it will be attempted then. "
                    "Use force to resend now."
                )
            pending = self._pending_attempt(state)
            if pending and not force:
                raise Conflict(
                    f"attempt {pending} of delivery {delivery_id} was re-published moments ago "
                    "and has not reached history yet; wait for it, or use force"
                )
            attempt = max(state.last_attempt, pending) + 1
            if attempt > MAX_ATTEMPT:
                raise Conflict(f"delivery {delivery_id} reached the {MAX_ATTEMPT} attempt limit")
            resend_id = stable_id(RESEND_PREFIX, delivery_id, str(attempt))
            self._pending[delivery_id] = _Pending(attempt, time.monotonic() + PENDING_TTL_S)
        try:
            bodies = await asyncio.to_thread(self._bodies, state.space, [delivery_id])
            if delivery_id not in bodies:
                raise NotFound(f"history has no request body of delivery {delivery_id}")
            await self._publish(
                producer, state, (attempt, c.TRIGGER_RESEND, resend_id), bodies[delivery_id]
            )
        except BaseException:
            self._pending.pop(delivery_id, None)
            raise
        self._metrics.republished.labels(c.TRIGGER_RESEND).inc()
        log.info("resend of delivery %s (space %s) published as attempt %d",
                 delivery_id, state.space, attempt)
        return ResendResult(delivery_id, attempt, resend_id, self._topic)

    # Replay ------------------------------------------------------------------------------

    async def plan_replay(
        self, selection: Selection, force: bool = False, reserve: bool = True
    ) -> ReplayPlan:
        """Select and check; with `reserve`, guard the selection until execute() published it.

        Raises Conflict when the same selection was replayed, or when matched deliveries were
        replayed by another selection or re-published moments ago (unless `force`).
        """
        async with self._lock:
            self._prune()
            base_id = selection.replay_id
            _, rows = await asyncio.to_thread(self._store.query, REPLAY_SELECTION, {
                "space": selection.space,
                "since": selection.since,
                "until": selection.until or LATEST,
                "status": selection.status,
            })
            states = [DeliveryState.of(row) for row in rows]
            if states:
                self._check_endpoint(selection.space)
            if not force:
                await self._refuse_repeat(selection, base_id, len(states))
            now = datetime.now(UTC)
            plan = ReplayPlan(selection, base_id, matched=len(states), in_retry=0, forced=force)
            if force:
                plan.replay_id = stable_id(REPLAY_PREFIX, base_id, "forced", str(time.time_ns()))
            earlier: dict[str, int] = {}
            pending = 0
            for state in states:
                if state.in_retry(now):
                    plan.in_retry += 1
                    continue
                attempt = max(state.last_attempt, self._pending_attempt(state)) + 1
                if self._pending_attempt(state):
                    pending += 1
                elif state.last_replay_id.startswith(REPLAY_PREFIX + "_"):
                    earlier[state.last_replay_id] = earlier.get(state.last_replay_id, 0) + 1
                if attempt <= MAX_ATTEMPT:
                    plan.todo.append((state, attempt))
            if (earlier or pending) and not force:
                ids = sorted(earlier, key=lambda k: -earlier[k])
                raise Conflict(
                    f"{sum(earlier.values()) + pending} of the {len(states)} matched deliveries "
                    "were already re-published (their latest attempt is from an earlier replay, "
                    "or is on its way); nothing published. Check them, then use force to replay "
                    "them again.",
                    replay_id=ids[0] if ids else "",
                    details={"earlier_replay_ids": ids[:10], "matched": len(states),
                             "already_replayed": sum(earlier.values()), "on_the_way": pending},
                )
            if len(plan.todo) > MAX_REPLAY:
                raise BadRequest(
                    f"the selection has {len(plan.todo)} deliveries to replay, more than "
                    f"{MAX_REPLAY} per request: split the time range"
                )
            if reserve and plan.todo:
                expires = time.monotonic() + PENDING_TTL_S
                self._replays[plan.replay_id] = expires
                self._replays[base_id] = expires
                for state, attempt in plan.todo:
                    self._pending[state.delivery_id] = _Pending(attempt, expires)
            return plan

    async def execute(self, plan: ReplayPlan, progress: Progress | None = None) -> int:
        """Publish a reserved plan in chunks; returns how many Kafka acknowledged."""
        done: set[str] = set()
        try:
            producer = self._ready()
            for start in range(0, len(plan.todo), _CHUNK):
                chunk = plan.todo[start : start + _CHUNK]
                ids = [state.delivery_id for state, _ in chunk]
                bodies = await asyncio.to_thread(self._bodies, plan.selection.space, ids)
                sent = [(state, attempt) for state, attempt in chunk if state.delivery_id in bodies]
                results = await asyncio.gather(
                    *(self._publish(producer, state, (attempt, c.TRIGGER_REPLAY, plan.replay_id),
                                    bodies[state.delivery_id])
                      for state, attempt in sent),
                    return_exceptions=True,
                )
                failures = [r for r in results if isinstance(r, BaseException)]
                acked = [state.delivery_id for (state, _), r in zip(sent, results, strict=True)
                         if not isinstance(r, BaseException)]
                done.update(acked)
                self._metrics.republished.labels(c.TRIGGER_REPLAY).inc(len(acked))
                if failures:
                    raise PublishFailed(
                        f"Kafka did not acknowledge {len(failures)} messages ({failures[0]}); "
                        f"{len(done)} of {len(plan.todo)} were published with replay id "
                        f"{plan.replay_id}: use force to replay the rest",
                        len(done),
                    )
                if progress is not None:
                    await progress(len(done))
        except BaseException:
            self._release(plan, done)
            raise
        log.info("replay %s of space %s: %d matched, %d published", plan.replay_id,
                 plan.selection.space, plan.matched, len(done))
        return len(done)

    # Helpers -----------------------------------------------------------------------------

    async def _refuse_repeat(self, selection: Selection, replay_id: str, matched: int) -> None:
        _, result = await asyncio.to_thread(
            self._store.query, REPLAY_ROWS, {"space": selection.space, "replay_id": replay_id}
        )
        rows = int(result[0][0]) if result else 0
        if rows or replay_id in self._replays:
            where = f"{rows} of its attempts in history" if rows else "its attempts are on their way"
            raise Conflict(
                f"this selection was already replayed as {replay_id} ({where}); "
                "nothing published. Use force to replay it again.",
                replay_id=replay_id,
                details={"matched": matched},
            )

    def _check_endpoint(self, space: str) -> None:
        """The loop drops events of a Space with no active endpoint: re-publishing would be lost."""
        if not self._has_endpoint(space):
            raise Conflict(
                f"space {space} has no active endpoint, so nothing would be delivered; set one "
                "first (perkamo-webhooks endpoints set)"
            )

    def _ready(self) -> AsyncProducer:
        producer = self._producer()
        if producer is None:
            raise NotReady(
                "the consumer is still starting (no Kafka producer yet): try again shortly"
            )
        return producer

    def _pending_attempt(self, state: DeliveryState) -> int:
        """The attempt re-published here that history does not show yet, or 0."""
        entry = self._pending.get(state.delivery_id)
        if entry is None or entry.attempt <= state.last_attempt:
            return 0
        return entry.attempt

    def _prune(self) -> None:
        now = time.monotonic()
        self._pending = {k: v for k, v in self._pending.items() if v.expires > now}
        self._replays = {k: v for k, v in self._replays.items() if v > now}

    def _release(self, plan: ReplayPlan, done: set[str]) -> None:
        """Drop the guard of what a failed replay did not publish (its published part stays)."""
        for state, _ in plan.todo:
            if state.delivery_id not in done:
                self._pending.pop(state.delivery_id, None)
        if not done:
            self._replays.pop(plan.replay_id, None)
            self._replays.pop(plan.selection.replay_id, None)

    def _bodies(self, space: str, delivery_ids: list[str]) -> dict[str, bytes]:
        _, rows = self._store.query(BODIES, {"space": space, "delivery_ids": delivery_ids})
        return {str(did): base64.b64decode(body) for did, body in rows}

    async def _publish(
        self, producer: AsyncProducer, state: DeliveryState, how: tuple[int, str, str], body: bytes
    ) -> None:
        """Publish one delivery; `how` is (attempt number, trigger, replay id)."""
        attempt, trigger, replay_id = how
        origin = (state.source_topic, state.source_partition, state.source_offset)
        headers = republish_headers(
            state.delivery_id, origin, attempt=attempt, trigger=trigger, replay_id=replay_id,
            trace=state.trace,
        )
        try:
            await producer.publish(self._topic, body, state.space, headers)
        except KafkaError:
            raise
        except Exception as exc:  # BufferError, KafkaException from produce(): same meaning
            raise KafkaError(f"publish to {self._topic} failed: {type(exc).__name__}") from exc
