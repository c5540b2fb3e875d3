"""The deliver role's Kafka loop: takes events, retries and held deliveries, commits what is durable.

Per message (consumer.pipeline): prepare, call, complete; the message's offset is done once
its attempt record and any retry/held/DLQ message are acknowledged by Kafka. Per partition
(consumer.partitions): the highest contiguous done offset is committed, and a partition is
paused while a retry at its head is not due or too much of it is in flight.

Threads: the asyncio loop runs deliveries and all bookkeeping; one executor thread owns every
call into the librdkafka consumer (consume, commit, close), so those calls never overlap.
Rebalance callbacks run on that thread inside consume() and hand their work to the loop,
waiting for it (the loop is free, as it only awaits consume()).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Iterable
from typing import Any

from consumer import constants as c
from consumer.circuits import health_of
from consumer.deliver_context import DeliverContext
from consumer.errors import PerkamoError
from consumer.headers import due_ms
from consumer.kafka_group import GroupMember
from consumer.kafka_io import Message, header_map, position
from consumer.partitions import TP, Partitions, PartitionState
from consumer.pipeline import Pipeline, now_ms

log = logging.getLogger(__name__)

_BATCH = 500
_REVOKE_BUDGET_S = 10.0
_REFRESH_S = 1.0


class DeliveryService:
    """One consumer-group member. `run()` until `stop()`; then it drains and commits."""

    def __init__(self, ctx: DeliverContext) -> None:
        self.ctx = ctx
        self.settings = settings = ctx.settings
        self.registry = ctx.registry
        self.metrics = ctx.metrics
        self.gates = ctx.gates
        self.pipeline = Pipeline(ctx)
        self._in_flight = ctx.in_flight
        self._consumer: GroupMember | None = None
        self._kafka = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kafka-consumer")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._parts = Partitions(settings.partition_window)
        self._stopping = asyncio.Event()
        self._last_commit = 0.0
        self._last_refresh = 0.0
        self.assigned_once = False
        self.started = False

    # Life cycle ----------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to stop intake and drain (safe from a signal handler)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def writes_blocked(self) -> bool:
        """True while a message is being tried again because Kafka cannot take it now."""
        return self.pipeline.out.writes_waiting > 0

    @property
    def in_flight(self) -> int:
        return self._in_flight.count

    def endpoint_health(self) -> dict[str, dict[str, Any]]:
        return health_of(self.gates)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.ctx.deliverer.start()
        self._consumer = GroupMember(
            self.settings, self.settings.group_id, self.metrics.consumer_lag, self._parts
        )
        topics = [*self.settings.events_topics, c.REDELIVER_TOPIC, *self.pipeline.retry_topics, c.HELD_TOPIC]
        self._consumer.subscribe(topics, self._on_assign, self._on_revoke, self._on_lost)
        self.started = True
        log.info("consuming %s as group %s", ",".join(topics), self.settings.group_id)
        try:
            while not self._stopping.is_set():
                await self._tick()
        finally:
            await self._shutdown()

    async def _tick(self) -> None:
        self._apply_pauses()
        room = self._in_flight.room
        if room <= 0:
            # At the cap: take nothing until a place frees. Not a pause: pausing drops what
            # librdkafka prefetched, and the cap is reached all the time under a backlog.
            # (Deliveries end within the delivery timeout, far inside max.poll.interval.ms.)
            await self._in_flight.wait_for_room(0.5)
        else:
            msgs: list[Message] = await self._kafka_call(self._fetch, min(_BATCH, room), self._poll_timeout())
            if msgs:
                self._take(msgs)
        mono = time.monotonic()
        if mono - self._last_commit >= self.settings.commit_interval_s:
            await self.commit()
        if mono - self._last_refresh >= _REFRESH_S:
            self._last_refresh = mono
            self.ctx.reporter.refresh(self.gates)
            self.metrics.in_flight.set(self._in_flight.count)

    def _fetch(self, most: int, timeout: float) -> list[Message]:
        """Whatever is ready now; if nothing, wait up to `timeout` for one message, then take
        whatever else is ready. (`consume(n, t)` would wait for n messages or the full t, which
        adds up to t to every delivery's latency at low rates.) Runs on the consumer thread."""
        consumer = self._consumer_or_fail()
        msgs = consumer.consume(most, 0)
        if msgs or most == 0:
            return msgs
        msgs = consumer.consume(1, timeout)
        if msgs and most > 1:
            msgs += consumer.consume(most - 1, 0)
        return msgs

    def _poll_timeout(self) -> float:
        timeout = 0.1
        due = self._parts.next_due_ms()
        if due is not None:
            timeout = min(timeout, max(0.0, (due - now_ms()) / 1000))
        return max(timeout, 0.005)

    async def _shutdown(self) -> None:
        log.info("stopping: %d deliveries in flight", self._in_flight.count)
        deadline = time.monotonic() + self.settings.drain_timeout_s
        tasks = [t for st in self._parts for t in st.tasks]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
            for task in pending:
                task.cancel()
            if pending:
                log.warning(
                    "drain deadline passed: %d deliveries abandoned (redelivered later)", len(pending)
                )
                await asyncio.gather(*pending, return_exceptions=True)
        await self.commit()
        await self.ctx.reporter.drain(5.0)
        await asyncio.to_thread(self.ctx.producer.close, 10.0)
        if self._consumer is not None:
            await self._kafka_call(self._consumer.close)
        await self.ctx.deliverer.close()
        self._kafka.shutdown(wait=True)
        log.info("stopped")

    # Intake --------------------------------------------------------------------------

    def _take(self, msgs: Iterable[Message]) -> None:
        consumer = self._consumer_or_fail()
        halted: set[TP] = set()  # partitions paused mid-batch: the rest of their batch is dropped
        now = now_ms()
        retry_topics = self.pipeline.retry_topics
        due_ahead = self.pipeline.due_ahead_ms
        taken: dict[str, int] = {}  # per topic, counted into the metric once per batch
        for msg in msgs:
            if msg.error() is not None:
                log.warning("consume error: %s", msg.error())
                continue
            topic, partition, offset = position(msg)
            tp = (topic, partition)
            st = self._parts.get(tp)
            if st is None or st.revoked or tp in halted:
                continue
            if topic in retry_topics:
                due = due_ms(header_map(msg))
                # A due time beyond any tier's reach is not waited for: prepare dead-letters it.
                if due is not None and now < due <= now + due_ahead[topic]:
                    # Not due: pause, then seek back to exactly this message, so it and the
                    # messages after it (dropped from this batch) are fetched again on resume.
                    if self._parts.hold_until_due(st, due):
                        consumer.pause([tp])
                    consumer.seek(tp, offset)
                    halted.add(tp)
                    continue
            taken[topic] = taken.get(topic, 0) + 1
            st.tracker.add(offset)
            self._in_flight.take()
            task = asyncio.create_task(self._process(msg, st, offset))
            st.tasks.add(task)
            task.add_done_callback(st.tasks.discard)
        for topic, count in taken.items():
            self.metrics.child(self.metrics.events_consumed, topic).inc(count)

    def _apply_pauses(self) -> None:
        changes = self._parts.changes(now_ms())
        if changes:
            consumer = self._consumer_or_fail()
            if changes.pause:
                consumer.pause(changes.pause)
            if changes.resume:
                consumer.resume(changes.resume)
        for reason, count in self._parts.paused_counts().items():
            self.metrics.paused_partitions.labels(reason).set(count)

    async def _process(self, msg: Message, st: PartitionState, offset: int) -> None:
        """One message; its offset is done once everything it published is acknowledged."""
        try:
            await self.pipeline.handle(msg)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("could not dead-letter %s[%d]@%d; its offset stays uncommitted",
                          msg.topic(), msg.partition(), msg.offset())
            return
        finally:
            self._in_flight.give()
        st.tracker.done(offset)

    # Offsets and rebalances ------------------------------------------------------------

    async def commit(self) -> None:
        """Commit, per partition, the highest offset below which everything is durable."""
        self._last_commit = time.monotonic()
        offsets = self._parts.committable()
        if offsets:
            await self._kafka_call(self._commit_sync, offsets)

    def _commit_sync(self, offsets: list[tuple[TP, int]]) -> None:
        for tp, offset in self._consumer_or_fail().commit(offsets):
            self._parts.committed(tp, offset)

    def _on_assign(self, tps: list[TP]) -> None:
        self._run_on_loop(self._assigned(tps))

    def _on_revoke(self, tps: list[TP]) -> None:
        offsets = self._run_on_loop(self._revoking(tps), _REVOKE_BUDGET_S + 5)
        if offsets:
            self._commit_sync(offsets)

    def _on_lost(self, tps: list[TP]) -> None:
        self._run_on_loop(self._lost(tps))

    async def _assigned(self, tps: list[TP]) -> None:
        self._parts.assign(tps)
        self.assigned_once = True
        self.metrics.rebalances.labels("assigned").inc()
        self.metrics.assigned_partitions.set(len(self._parts))
        log.info("assigned %d partitions (%d in all)", len(tps), len(self._parts))

    async def _revoking(self, tps: list[TP]) -> list[tuple[TP, int]]:
        """Finish (or abandon, after a budget) the revoked partitions' work; return what to commit."""
        states = self._parts.take(tps)
        tasks = [t for st in states for t in st.tasks]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=_REVOKE_BUDGET_S)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
                log.warning("revoke: %d deliveries abandoned (redelivered to the new owner)", len(pending))
        offsets = self._parts.committable(states)
        self._drop(states)
        self.metrics.rebalances.labels("revoked").inc()
        return offsets

    async def _lost(self, tps: list[TP]) -> None:
        states = self._parts.take(tps)
        for st in states:
            for task in st.tasks:
                task.cancel()
        self._drop(states)
        self.metrics.rebalances.labels("lost").inc()
        log.warning("lost %d partitions; their uncommitted work will be redelivered", len(states))

    def _drop(self, states: list[PartitionState]) -> None:
        self._parts.drop(states)
        if self._consumer is not None:
            self._consumer.forget_lag(st.tp for st in states)
        self.metrics.assigned_partitions.set(len(self._parts))

    # Helpers -------------------------------------------------------------------------

    def _run_on_loop(self, coro: Any, timeout: float = 30.0) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _kafka_call(self, fn: Any, *args: Any) -> Any:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._kafka, fn, *args)

    def _consumer_or_fail(self) -> GroupMember:
        if self._consumer is None:
            raise PerkamoError("consumer not started")
        return self._consumer
