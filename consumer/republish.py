"""Resend one delivery or replay many by re-publishing them to Kafka (docs/support.md).

Nothing here calls an endpoint. A re-published message goes to the redeliver topic with
the delivery's id, the next attempt number (history's highest + 1), a `resend`/`replay`
trigger, a replay id and the original topic/partition/offset in headers; the Kafka loop then
delivers it like any event, to the Space's endpoint as it is now, and records the attempt.

Double work is refused, not done silently:
- a replay's id is derived from its selection (Space, since, until, status), so the same
  selection asked for twice gets the same id and is refused (409) while history holds rows of
  it, or while this process has published it and the rows have not landed yet;
- a delivery whose latest attempt belongs to an EARLIER replay is not replayed again by an
  overlapping selection (e.g. `--since 24h` run twice): that refuses the request;
- a delivery still waiting in the retry tiers is left to them (its next attempt would collide
  with the re-published one); only one stuck past its due time (queries.STUCK_AFTER) is taken.
`force` overrides these on purpose. Two things it never overrides: a delivery published here
whose attempt has not reached history yet is "on its way" (a resend refuses it, a replay
skips it and counts it), and a Space has at most one replay publishing at a time (the next is
a Conflict naming it). The in-process guard covers one consumer instance; history covers all
of them once the rows land. A delivery is a (Space, delivery id) pair throughout: an id with
rows in two Spaces is no Space's to re-publish.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from consumer import constants as c
from consumer.errors import (
    Conflict,
    KafkaFailure,
    NotFound,
    OriginalUnavailable,
    PublishFailed,
    SeveralSpaces,
)
from consumer.headers import republish_headers
from consumer.kafka_io import AsyncProducer, Source
from consumer.metrics import Metrics
from consumer.models import stable_id
from consumer.originals import Refusal, Wanted, read_originals
from consumer.queries import LATEST, Reader, check_text, iso
from consumer.republish_plan import (
    RESEND_PREFIX,
    DeliveryState,
    ReplayPlan,
    ResendResult,
    Selection,
    plan_of,
)
from consumer.sql import BODIES, REPLAY_ROWS, REPLAY_SELECTION, REPUBLISH_ONE

log = logging.getLogger(__name__)

PENDING_TTL_S: Final = 600.0  # how long a published attempt is expected to take to land
_CHUNK = 500

Progress = Callable[[int], Awaitable[None]]
Key = tuple[str, str]  # (space, delivery id)


@dataclass(slots=True)
class _Pending:
    attempt: int
    expires: float


class Republisher:
    """Resend and replay for one running consumer; holds its in-process double-work guard."""

    def __init__(
        self, store: Reader, topic: str, producer: AsyncProducer, metrics: Metrics,
        has_endpoint: Callable[[str], bool] | None = None, *, originals: Source | None = None,
    ) -> None:
        """`originals`: the Kafka cluster a cut body's original is read back from (the
        settings or their bootstrap string); without it such deliveries are refused."""
        self._store = store
        self._originals = originals
        self._has_endpoint = has_endpoint or (lambda _: True)
        self._topic = topic
        self._producer = producer
        self._metrics = metrics
        self._lock = asyncio.Lock()
        # (space, delivery id) -> the attempt published here that has not reached history yet
        self._pending: dict[Key, _Pending] = {}
        self._replays: dict[str, float] = {}  # replay id -> expiry of the in-process guard
        # space -> (replay id, expiry) of the replay publishing now: one per Space at a time
        self._running: dict[str, tuple[str, float]] = {}

    # Resend ------------------------------------------------------------------------------

    async def resend(
        self, delivery_id: str, force: bool = False, space: str = "", scoped: bool = False
    ) -> ResendResult:
        """Re-publish one delivery with the next attempt number and a `resend` trigger.

        `space` confines it to one Space's rows ('' = any, but one: an id with rows in two
        Spaces is SeveralSpaces then); for a `scoped` caller (a Space session) such an id is
        NotFound."""
        check_text("delivery_id", delivery_id, required=True)
        check_text("space", space)
        producer = self._producer
        async with self._lock:
            self._prune()
            _, rows = await asyncio.to_thread(
                self._store.query, REPUBLISH_ONE,
                {"delivery_id": delivery_id, "space": space, "scoped": scoped and bool(space)}
            )
            if not rows:
                raise NotFound(f"history has no attempt of delivery {delivery_id}")
            if len(rows) > 1:
                spaces = ", ".join(sorted(str(row[1]) for row in rows)[:5])
                raise SeveralSpaces(f"delivery id {delivery_id} has rows in {len(rows)} Spaces "
                                    f"({spaces}); name the Space to resend one (space)")
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
            if pending:  # force or not: a second copy would be delivered twice
                raise Conflict(
                    f"attempt {pending} of delivery {delivery_id} was re-published moments ago "
                    "and has not reached history yet; wait for it (force does not resend a "
                    "delivery on its way)"
                )
            attempt = state.last_attempt + 1
            if attempt > c.MAX_ATTEMPT:
                raise Conflict(f"delivery {delivery_id} reached the {c.MAX_ATTEMPT} attempt limit")
            resend_id = stable_id(RESEND_PREFIX, delivery_id, str(attempt))
            key = (state.space, delivery_id)
            self._pending[key] = _Pending(attempt, time.monotonic() + PENDING_TTL_S)
        try:
            bodies, refused = await asyncio.to_thread(self._bodies, state.space, [delivery_id])
            if delivery_id in refused:
                raise refused[delivery_id]
            if delivery_id not in bodies:
                raise NotFound(f"history has no request body of delivery {delivery_id}")
            await self._publish(
                producer, state, (attempt, c.TRIGGER_RESEND, resend_id), bodies[delivery_id]
            )
        except BaseException:
            self._pending.pop(key, None)
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
        replayed by another selection (unless `force`), and, with `reserve`, while another
        replay of the Space is publishing. Deliveries on their way are skipped and counted.
        """
        async with self._lock:
            self._prune()
            running = self._running.get(selection.space)
            if reserve and running is not None:
                raise Conflict(
                    f"replay {running[0]} of space {selection.space} is still publishing; one "
                    "replay per Space runs at a time: wait for it to finish, then try again",
                    replay_id=running[0],
                )
            base_id = selection.replay_id
            states = await asyncio.to_thread(self._selected, selection)
            if states:
                self._check_endpoint(selection.space)
            if not force:
                await self._refuse_repeat(selection, base_id, len(states))
            plan = plan_of(selection, states, datetime.now(UTC), self._pending_attempt, force)
            if reserve and plan.todo:
                self._reserve(plan)
            return plan

    def release(self, plan: ReplayPlan) -> None:
        """Give up a reserved plan that will not be executed (its caller left before it began),
        so the Space's next replay is not refused for it."""
        self._release(plan, set())
        if self._running.get(plan.selection.space, ("",))[0] == plan.replay_id:
            del self._running[plan.selection.space]

    async def execute(self, plan: ReplayPlan, progress: Progress | None = None) -> int:
        """Publish a reserved plan in chunks; returns how many Kafka acknowledged."""
        try:
            return await self._execute(plan, progress)
        finally:
            if self._running.get(plan.selection.space, ("",))[0] == plan.replay_id:
                del self._running[plan.selection.space]

    async def _execute(self, plan: ReplayPlan, progress: Progress | None) -> int:
        done: set[str] = set()
        try:
            producer = self._producer
            for start in range(0, len(plan.todo), _CHUNK):
                chunk = plan.todo[start : start + _CHUNK]
                ids = [state.delivery_id for state, _ in chunk]
                bodies, refused = await asyncio.to_thread(self._bodies, plan.selection.space, ids)
                for delivery_id in refused:  # not on its way: free for a later resend or replay
                    self._pending.pop((plan.selection.space, delivery_id), None)
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

    def _selected(self, selection: Selection) -> list[DeliveryState]:
        """The selection's deliveries (at most MAX_REPLAY + 1): in a thread, rows and all."""
        _, rows = self._store.query(REPLAY_SELECTION, {
            "space": selection.space,
            "since": selection.since,
            "until": selection.until or LATEST,
            "status": selection.status,
        })
        return [DeliveryState.of(row) for row in rows]

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

    def _reserve(self, plan: ReplayPlan) -> None:
        """Guard the plan's selection, its replay id and its deliveries until they land."""
        expires = time.monotonic() + PENDING_TTL_S
        self._replays[plan.replay_id] = expires
        self._replays[plan.selection.replay_id] = expires
        self._running[plan.selection.space] = (plan.replay_id, expires)
        for state, attempt in plan.todo:
            self._pending[(state.space, state.delivery_id)] = _Pending(attempt, expires)

    def _check_endpoint(self, space: str) -> None:
        """The loop drops events of a Space with no active endpoint: re-publishing would be lost."""
        if not self._has_endpoint(space):
            raise Conflict(
                f"space {space} has no active endpoint, so nothing would be delivered; set one "
                "first (perkamo-webhooks endpoints set)"
            )

    def _pending_attempt(self, state: DeliveryState) -> int:
        """The attempt re-published here that history does not show yet, or 0."""
        entry = self._pending.get((state.space, state.delivery_id))
        if entry is None or entry.attempt <= state.last_attempt:
            return 0
        return entry.attempt

    def _prune(self) -> None:
        now = time.monotonic()
        self._pending = {k: v for k, v in self._pending.items() if v.expires > now}
        self._replays = {k: v for k, v in self._replays.items() if v > now}
        self._running = {k: v for k, v in self._running.items() if v[1] > now}

    def _release(self, plan: ReplayPlan, done: set[str]) -> None:
        """Drop the guard of what a failed replay did not publish (its published part stays)."""
        for state, _ in plan.todo:
            if state.delivery_id not in done:
                self._pending.pop((state.space, state.delivery_id), None)
        if not done:
            self._replays.pop(plan.replay_id, None)
            self._replays.pop(plan.selection.replay_id, None)

    def _bodies(
        self, space: str, delivery_ids: list[str]
    ) -> tuple[dict[str, bytes], dict[str, Refusal]]:
        """The bodies to publish, and the deliveries refused with why. History holds the whole
        body, or, where its records carry a cut one, the original is read back from its source
        topic and checked (consumer.originals): a cut body is never published."""
        _, rows = self._store.query(BODIES, {"space": space, "delivery_ids": delivery_ids})
        bodies: dict[str, bytes] = {}
        wanted: list[Wanted] = []
        for did, body, truncated, size, sha256, topic, partition, offset in rows:
            if truncated:
                wanted.append(Wanted(str(did), str(topic), int(partition), int(offset),
                                     int(size), str(sha256)))
            else:
                bodies[str(did)] = base64.b64decode(body)
        if not wanted:
            return bodies, {}
        if self._originals is None:
            return bodies, {w.delivery_id: OriginalUnavailable(
                f"delivery {w.delivery_id} cannot be re-published: history keeps only the first bytes "
                "of its body, and this process has no Kafka connection to read the original from"
            ) for w in wanted}
        refused: dict[str, Refusal] = {}
        for did, found in read_originals(self._originals, wanted).items():
            if isinstance(found, bytes):
                bodies[did] = found
            else:
                refused[did] = found
        return bodies, refused

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
        except KafkaFailure:
            raise
        except Exception as exc:  # BufferError, KafkaException from produce(): same meaning
            raise KafkaFailure(f"publish to {self._topic} failed: {type(exc).__name__}") from exc
