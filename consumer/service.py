"""The Kafka loop: takes events and retries, runs deliveries, commits only what is durable.

Flow per message (DESIGN §4-§7): parse and validate -> find the Space's endpoint -> attempt
(unless its circuit is open) -> record the attempt row and, on failure, publish to the next
retry tier or the dead-letter topic -> mark the offset done once the row is written and the
publish acknowledged. Offsets are committed per partition up to the highest contiguous done.

Threads: the asyncio loop runs deliveries and all bookkeeping; one executor thread owns every
call into the librdkafka consumer (consume, pause, resume, seek, commit), so those calls never
overlap. Rebalance callbacks run on that thread inside consume() and hand their work to the
loop, waiting for it (the loop is free, as it only awaits consume()).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from confluent_kafka import Consumer, Message, TopicPartition

from consumer import constants as c
from consumer import metrics as m
from consumer.breaker import CircuitBreakers
from consumer.config import Settings
from consumer.delivery import Deliverer
from consumer.endpoints import EndpointRegistry
from consumer.errors import InvalidEvent, PerkamoError
from consumer.headers import DeliveryMeta, due_ms, read_meta
from consumer.history import HistoryStore, HistoryWriter
from consumer.intake import parse_event
from consumer.kafka_io import AsyncProducer, Headers, consumer_config, header_list, header_map, position
from consumer.models import AttemptResult, AttemptRow, Endpoint, Event, delivery_id_for
from consumer.offsets import OffsetTracker
from consumer.retry_policy import decide, tier_topic

log = logging.getLogger(__name__)

TP = tuple[str, int]

PAUSE_DUE = "due"  # a retry message that is not due yet heads the partition
PAUSE_WINDOW = "window"  # too many uncommitted messages in this partition
PAUSE_HISTORY = "history"  # the history writer is behind
PAUSE_REASONS = (PAUSE_DUE, PAUSE_WINDOW, PAUSE_HISTORY)

REASON_EXHAUSTED = "exhausted"
REASON_INTERNAL = "internal_error"

_BATCH = 500
_NO_CALL = frozenset({m.OUTCOME_CIRCUIT_OPEN, m.OUTCOME_SATURATED})
_REVOKE_BUDGET_S = 10.0


@dataclass(eq=False)
class PartitionState:
    """What the loop knows of one assigned partition; dropped on revoke or loss."""

    tp: TP
    tracker: OffsetTracker = field(default_factory=OffsetTracker)
    reasons: set[str] = field(default_factory=set)
    due_ms: int = 0
    committed: int | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # History rows of finished deliveries not yet written: their offsets wait for them.
    unwritten: set[asyncio.Future[None]] = field(default_factory=set)
    revoked: bool = False


def _now_ms() -> int:
    return int(time.time() * 1000)


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


class DeliveryService:
    """One consumer-group member. `run()` until `stop()`; then it drains, flushes and commits."""

    def __init__(
        self,
        settings: Settings,
        registry: EndpointRegistry,
        store: HistoryStore,
        metrics: m.Metrics,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self.tiers = settings.tier_seconds
        self.retry_topics = {tier_topic(name): name for name, _ in self.tiers}
        self.writer = HistoryWriter(
            store, metrics, settings.history_batch_rows, settings.history_flush_interval_s
        )
        self.breakers = CircuitBreakers(
            settings.breaker_failures, settings.breaker_cooldown_s, on_change=self._circuit_changed
        )
        self.deliverer = Deliverer(settings, metrics, self.breakers)
        self.producer: AsyncProducer | None = None
        self._consumer: Consumer | None = None
        self._kafka = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kafka-consumer")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._parts: dict[TP, PartitionState] = {}
        self._in_flight = 0
        self._stopping = asyncio.Event()
        self._room = asyncio.Event()  # set when an in-flight place frees
        self._last_commit = 0.0
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
    def in_flight(self) -> int:
        return self._in_flight

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.writer.start()
        await self.deliverer.start()
        self.producer = AsyncProducer(self.settings.kafka_bootstrap_servers)
        config = consumer_config(
            self.settings.kafka_bootstrap_servers,
            self.settings.group_id,
            self.settings.group_protocol,
            self.settings.lag_interval_s,
        )
        config["stats_cb"] = self._on_stats
        self._consumer = Consumer(config)
        topics = [*self.settings.events_topics, *self.retry_topics]
        self._consumer.subscribe(
            topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        self.started = True
        log.info("consuming %s as group %s", ",".join(topics), self.settings.group_id)
        try:
            while not self._stopping.is_set():
                await self._tick()
        finally:
            await self._shutdown()

    async def _tick(self) -> None:
        self._update_pauses()
        room = self.settings.max_in_flight - self._in_flight
        if room <= 0:
            # At the cap: take nothing until a place frees. Not a pause: pausing drops what
            # librdkafka prefetched, and the cap is reached all the time under a backlog.
            # (Deliveries end within the delivery timeout, far inside max.poll.interval.ms.)
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), timeout=0.5)
        else:
            timeout = self._poll_timeout()
            msgs: list[Message] = await self._call(self._fetch, min(_BATCH, room), timeout)
            if msgs:
                self._take(msgs)
        if time.monotonic() - self._last_commit >= self.settings.commit_interval_s:
            await self.commit()

    def _fetch(self, most: int, timeout: float) -> list[Message]:
        """Whatever is ready now; if nothing, wait up to `timeout` for one message, then take
        whatever else is ready. (`consume(n, t)` would wait for n messages or the full t, which
        adds up to t to every delivery's latency at low rates.) Runs on the consumer thread."""
        consumer = self._consumer_or_fail()
        msgs: list[Message] = consumer.consume(most, 0)
        if msgs or most == 0:
            return msgs
        msgs = consumer.consume(1, timeout)
        if msgs and most > 1:
            msgs += consumer.consume(most - 1, 0)
        return msgs

    def _poll_timeout(self) -> float:
        timeout = 0.1
        dues = [st.due_ms for st in self._parts.values() if PAUSE_DUE in st.reasons]
        if dues:
            timeout = min(timeout, max(0.0, (min(dues) - _now_ms()) / 1000))
        return max(timeout, 0.005)

    async def _shutdown(self) -> None:
        log.info("stopping: %d deliveries in flight", self._in_flight)
        deadline = time.monotonic() + self.settings.drain_timeout_s
        tasks = [t for st in self._parts.values() for t in st.tasks]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
            for task in pending:
                task.cancel()
            if pending:
                log.warning(
                    "drain deadline passed: %d deliveries abandoned (redelivered later)", len(pending)
                )
                await asyncio.gather(*pending, return_exceptions=True)
        flushed = await asyncio.to_thread(self.writer.stop, max(1.0, deadline - time.monotonic()))
        if not flushed:
            log.error("history rows still unwritten at shutdown; their offsets are not committed")
        unwritten = [f for st in self._parts.values() for f in st.unwritten]
        if unwritten:  # written rows resolve their futures through the loop: let that run
            await asyncio.wait(unwritten, timeout=2.0)
        await self.commit()
        if self.producer is not None:
            await asyncio.to_thread(self.producer.close, 10.0)
        if self._consumer is not None:
            await self._call(self._consumer.close)
        await self.deliverer.close()
        self._kafka.shutdown(wait=True)
        log.info("stopped")

    # Intake --------------------------------------------------------------------------

    def _take(self, msgs: Iterable[Message]) -> None:
        consumer = self._consumer_or_fail()
        halted: set[TP] = set()  # partitions paused mid-batch: the rest of their batch is dropped
        now = _now_ms()
        for msg in msgs:
            if msg.error() is not None:
                log.warning("consume error: %s", msg.error())
                continue
            topic, partition, offset = position(msg)
            tp = (topic, partition)
            st = self._parts.get(tp)
            if st is None or st.revoked or tp in halted:
                continue
            if tp[0] in self.retry_topics:
                due = due_ms(header_map(msg))
                if due is not None and due > now:
                    # Not due: pause, then seek back to exactly this message, so it and the
                    # messages after it (dropped from this batch) are fetched again on resume.
                    st.due_ms = due
                    self._set_reason(st, PAUSE_DUE, True)
                    consumer.seek(TopicPartition(tp[0], tp[1], offset))
                    halted.add(tp)
                    continue
            self.metrics.child(self.metrics.events_consumed, topic).inc()
            st.tracker.add(offset)
            self._in_flight += 1
            task = asyncio.create_task(self._process(msg, st, offset))
            st.tasks.add(task)
            task.add_done_callback(st.tasks.discard)
        self.metrics.in_flight.set(self._in_flight)

    def _set_reason(self, st: PartitionState, reason: str, on: bool) -> None:
        before = bool(st.reasons)
        if on:
            st.reasons.add(reason)
        else:
            st.reasons.discard(reason)
        after = bool(st.reasons)
        if before == after or st.revoked:
            return
        partition = [TopicPartition(st.tp[0], st.tp[1])]
        consumer = self._consumer_or_fail()
        if after:
            consumer.pause(partition)
        else:
            consumer.resume(partition)

    def _update_pauses(self) -> None:
        now = _now_ms()
        history_full = self.writer.backlog >= self.settings.history_max_buffered_rows
        history_ok = self.writer.backlog < self.settings.history_max_buffered_rows // 2
        counts = dict.fromkeys(PAUSE_REASONS, 0)
        for st in self._parts.values():
            if PAUSE_DUE in st.reasons and now >= st.due_ms:
                self._set_reason(st, PAUSE_DUE, False)
            window = st.tracker.window
            if window >= self.settings.partition_window:
                self._set_reason(st, PAUSE_WINDOW, True)
            elif window < self.settings.partition_window // 2:
                self._set_reason(st, PAUSE_WINDOW, False)
            if history_full:
                self._set_reason(st, PAUSE_HISTORY, True)
            elif history_ok:
                self._set_reason(st, PAUSE_HISTORY, False)
            for reason in st.reasons:
                counts[reason] += 1
        for reason, count in counts.items():
            self.metrics.paused_partitions.labels(reason).set(count)

    # One message ---------------------------------------------------------------------

    async def _process(self, msg: Message, st: PartitionState, offset: int) -> None:
        """One message, start to end. Its in-flight place is freed once the attempt is made and
        any retry/DLQ publish acknowledged; its offset becomes committable only once its history
        row is written too (the writer's backlog and the partition window bound that wait)."""
        written: asyncio.Future[None] | None = None
        try:
            written = await self._handle(msg)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "internal error on %s[%d]@%d; dead-lettering it", msg.topic(), msg.partition(), msg.offset()
            )
            try:
                await self._dead_letter_invalid(msg, REASON_INTERNAL, "internal error, see the consumer log")
            except Exception:
                log.exception(
                    "could not dead-letter %s[%d]@%d; its offset stays uncommitted",
                    msg.topic(),
                    msg.partition(),
                    msg.offset(),
                )
                return
        finally:
            self._in_flight -= 1
            self.metrics.in_flight.set(self._in_flight)
            self._room.set()
        if written is None or written.done():
            st.tracker.done(offset)
        else:
            st.unwritten.add(written)
            written.add_done_callback(functools.partial(_row_written, st, offset))

    async def _handle(self, msg: Message) -> asyncio.Future[None] | None:
        """Attempt the delivery; returns the history write to wait for (None if no row)."""
        headers = header_map(msg)
        try:
            event = parse_event(msg.value(), self.settings.max_payload_bytes)
            meta = read_meta(headers)
        except InvalidEvent as exc:
            self.metrics.invalid_events.labels(exc.reason).inc()
            log.warning(
                "invalid event on %s[%d]@%d: %s (dead-lettered)",
                msg.topic(),
                msg.partition(),
                msg.offset(),
                exc,
            )
            await self._dead_letter_invalid(msg, exc.reason, exc.detail)
            return None
        endpoint = self.registry.get(event.space_slug)
        if endpoint is None:
            self.metrics.no_endpoint.labels(event.space_slug).inc()
            log.info("event %s: space %s has no active endpoint; not delivered", event.id, event.space_slug)
            return None
        delivery_id = meta.delivery_id or delivery_id_for(event.id, endpoint.id)
        attempt_no = meta.attempt
        trigger = meta.trigger or (
            c.TRIGGER_RETRY if msg.topic() in self.retry_topics else c.TRIGGER_INITIAL
        )
        result = await self.deliverer.attempt(endpoint, event, delivery_id, attempt_no)
        metrics = self.metrics
        if result.outcome not in _NO_CALL:
            metrics.child(metrics.attempt_duration, event.space_slug).observe(result.duration_ms / 1000)
        metrics.child(metrics.attempts, event.space_slug, event.type, result.outcome).inc()
        origin = meta.origin or position(msg)
        if result.outcome == m.OUTCOME_SATURATED:
            await self._defer(
                event=event, delivery_id=delivery_id, meta=meta, trigger=trigger, origin=origin, result=result
            )
            return None
        return await self._complete(
            event=event,
            endpoint=endpoint,
            delivery_id=delivery_id,
            meta=meta,
            trigger=trigger,
            origin=origin,
            result=result,
        )

    async def _complete(
        self,
        *,
        event: Event,
        endpoint: Endpoint,
        delivery_id: str,
        meta: DeliveryMeta,
        trigger: str,
        origin: tuple[str, int, int],
        result: AttemptResult,
    ) -> asyncio.Future[None]:
        """Record the attempt and move a failed delivery on; returns once the publish (if any)
        is acknowledged, with the history write still to wait for."""
        now = _now_ms()
        next_at: int | None = None
        publish = None
        if result.delivered:
            status = c.STATUS_DELIVERED
        else:
            decision = decide(meta.run_attempt, self.tiers, now, result.retry_after_s)
            out_headers = _retry_headers(
                delivery_id=delivery_id,
                next_attempt=meta.attempt + 1,
                next_run_attempt=meta.run_attempt + 1,
                meta=meta,
                origin=origin,
                now=now,
                result=result,
            )
            if decision.tier is None:
                status = c.STATUS_FAILED
                out_headers += [
                    (c.K_DLQ_REASON, REASON_EXHAUSTED.encode()),
                    (c.K_DLQ_DETAIL, result.error.encode()[:500]),
                ]
                publish = self._publisher().publish(c.DLQ_TOPIC, event.body, delivery_id, out_headers)
                self.metrics.dead_lettered.labels(REASON_EXHAUSTED).inc()
            else:
                status = c.STATUS_RETRYING
                next_at = decision.due_ms
                out_headers.append((c.K_DUE_MS, str(decision.due_ms).encode()))
                publish = self._publisher().publish(
                    tier_topic(decision.tier), event.body, delivery_id, out_headers
                )
                self.metrics.retries_scheduled.labels(decision.tier).inc()
        row = AttemptRow(
            delivery_id=delivery_id,
            attempt=meta.attempt,
            event_id=event.id,
            event_type=event.type,
            space_slug=event.space_slug,
            environment=event.environment,
            endpoint_id=endpoint.id,
            endpoint_host=endpoint.host,
            user_id=event.user_id,
            transaction_id=event.transaction_id,
            trigger=trigger,
            status=status,
            status_code=result.status_code,
            status_text=result.status_text,
            duration_ms=result.duration_ms,
            error=result.error,
            attempted_at=_ts(now),
            next_attempt_at=_ts(next_at) if next_at else None,
            request_body=event.body,
            response_excerpt=result.response_excerpt,
            source_topic=origin[0],
            source_partition=origin[1],
            source_offset=origin[2],
            error_kind="" if result.delivered else result.outcome,
            replay_id=meta.replay_id,
        )
        written = self.writer.submit(row)
        if publish is not None:
            await publish
        # Successes at DEBUG: at thousands per second a line each would dominate the hot path.
        log.log(
            logging.DEBUG if result.delivered else logging.INFO,
            "attempt delivery=%s space=%s event_type=%s attempt=%d status=%s outcome=%s code=%d "
            "duration_ms=%d",
            delivery_id,
            event.space_slug,
            event.type,
            meta.attempt,
            status,
            result.outcome,
            result.status_code,
            result.duration_ms,
        )
        return written

    async def _defer(
        self,
        *,
        event: Event,
        delivery_id: str,
        meta: DeliveryMeta,
        trigger: str,
        origin: tuple[str, int, int],
        result: AttemptResult,
    ) -> None:
        """No call was made (the endpoint is saturated): wait in the first tier with the same
        attempt number and run position, so shedding load never uses up a delivery's tiers.
        No history row: nothing was attempted."""
        tier = self.tiers[0][0]
        now = _now_ms()
        due = decide(1, self.tiers, now).due_ms
        out_headers = _retry_headers(
            delivery_id=delivery_id,
            next_attempt=meta.attempt,
            next_run_attempt=meta.run_attempt,
            meta=meta,
            origin=origin,
            now=now,
            result=result,
        )
        out_headers += [(c.K_DUE_MS, str(due).encode()), (c.K_TRIGGER, trigger.encode())]
        await self._publisher().publish(tier_topic(tier), event.body, delivery_id, out_headers)
        self.metrics.retries_scheduled.labels(tier).inc()
        log.info(
            "deferred delivery=%s space=%s attempt=%d: endpoint saturated, retry in %s",
            delivery_id, event.space_slug, meta.attempt, tier,
        )

    async def _dead_letter_invalid(self, msg: Message, reason: str, detail: str) -> None:
        """Bad input: the original bytes and headers go to the DLQ with the reason."""
        topic, partition, offset = position(msg)
        kept = [(k, v) for k, v in header_list(msg) if not k.startswith("perkamo-")]
        kept += [
            (c.K_DLQ_REASON, reason.encode()),
            (c.K_DLQ_DETAIL, detail.encode("utf-8", "replace")[:500]),
            (c.K_ORIGIN_TOPIC, topic.encode()),
            (c.K_ORIGIN_PARTITION, str(partition).encode()),
            (c.K_ORIGIN_OFFSET, str(offset).encode()),
        ]
        await self._publisher().publish(c.DLQ_TOPIC, msg.value(), msg.key(), kept)
        self.metrics.dead_lettered.labels(reason).inc()

    # Offsets and rebalances ------------------------------------------------------------

    async def commit(self) -> None:
        """Commit, per partition, the highest offset below which everything is durable."""
        self._last_commit = time.monotonic()
        offsets = self._committable(self._parts.values())
        if offsets:
            await self._call(self._commit_sync, offsets)

    def _committable(self, states: Iterable[PartitionState]) -> list[TopicPartition]:
        offsets = []
        for st in states:
            position = st.tracker.committable()
            if position is not None and position != st.committed:
                offsets.append(TopicPartition(st.tp[0], st.tp[1], position))
        return offsets

    def _commit_sync(self, offsets: list[TopicPartition]) -> None:
        consumer = self._consumer_or_fail()
        try:
            results = consumer.commit(offsets=offsets, asynchronous=False)
        except Exception as exc:  # e.g. no longer in the group; redelivery covers it
            log.warning("commit failed: %s", exc)
            return
        for tp in results or []:
            if tp.error:
                log.warning("commit of %s[%d] failed: %s", tp.topic, tp.partition, tp.error)
                continue
            st = self._parts.get((tp.topic, tp.partition))
            if st is not None:
                st.committed = tp.offset

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._run_on_loop(self._assigned([(p.topic, p.partition) for p in partitions]))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        offsets = self._run_on_loop(
            self._revoking([(p.topic, p.partition) for p in partitions]), _REVOKE_BUDGET_S + 5
        )
        if offsets:
            self._commit_sync(offsets)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._run_on_loop(self._lost([(p.topic, p.partition) for p in partitions]))

    async def _assigned(self, tps: list[TP]) -> None:
        for tp in tps:
            self._parts[tp] = PartitionState(tp)  # every newly assigned partition starts unpaused
        self.assigned_once = True
        self.metrics.rebalances.labels("assigned").inc()
        self.metrics.assigned_partitions.set(len(self._parts))
        log.info("assigned %d partitions (%d in all)", len(tps), len(self._parts))

    async def _revoking(self, tps: list[TP]) -> list[TopicPartition]:
        """Finish (or abandon, after a budget) the revoked partitions' work; return what to commit."""
        states = [self._parts[tp] for tp in tps if tp in self._parts]
        for st in states:
            st.revoked = True
        tasks = [t for st in states for t in st.tasks]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=_REVOKE_BUDGET_S)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
                log.warning("revoke: %d deliveries abandoned (redelivered to the new owner)", len(pending))
        unwritten = [f for st in states for f in st.unwritten]
        if unwritten:  # at most a flush interval, unless the history store is down
            await asyncio.wait(unwritten, timeout=_REVOKE_BUDGET_S)
        offsets = self._committable(states)
        self._drop(states)
        self.metrics.rebalances.labels("revoked").inc()
        return offsets

    async def _lost(self, tps: list[TP]) -> None:
        states = [self._parts[tp] for tp in tps if tp in self._parts]
        for st in states:
            st.revoked = True
            for task in st.tasks:
                task.cancel()
        self._drop(states)
        self.metrics.rebalances.labels("lost").inc()
        log.warning("lost %d partitions; their uncommitted work will be redelivered", len(states))

    def _drop(self, states: list[PartitionState]) -> None:
        for st in states:
            self._parts.pop(st.tp, None)
            with contextlib.suppress(KeyError):  # no statistics arrived for it yet
                self.metrics.consumer_lag.remove(st.tp[0], str(st.tp[1]))
        self.metrics.assigned_partitions.set(len(self._parts))

    def _on_stats(self, stats_json: str) -> None:
        """librdkafka statistics: consumer lag per assigned partition (committed vs high watermark)."""
        try:
            stats = orjson.loads(stats_json)
        except orjson.JSONDecodeError:
            return
        for topic, tstats in stats.get("topics", {}).items():
            for pid, pstats in tstats.get("partitions", {}).items():
                if pid == "-1" or (topic, int(pid)) not in self._parts:
                    continue
                lag = _partition_lag(pstats)
                if lag is not None:
                    self.metrics.consumer_lag.labels(topic, pid).set(lag)

    # Helpers -------------------------------------------------------------------------

    def _run_on_loop(self, coro: Any, timeout: float = 30.0) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _call(self, fn: Any, *args: Any) -> Any:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._kafka, fn, *args)

    def _consumer_or_fail(self) -> Consumer:
        if self._consumer is None:
            raise PerkamoError("consumer not started")
        return self._consumer

    def _publisher(self) -> AsyncProducer:
        if self.producer is None:
            raise PerkamoError("producer not started")
        return self.producer

    def _circuit_changed(self, endpoint_id: str, state: int) -> None:
        space = next((ep.space for ep in self.registry.all() if ep.id == endpoint_id), "unknown")
        self.metrics.circuit_state.labels(space).set(state)
        log.warning("circuit for space %s is now %s", space, ("closed", "open", "half-open")[state])


def _retry_headers(
    *,
    delivery_id: str,
    next_attempt: int,
    next_run_attempt: int,
    meta: DeliveryMeta,
    origin: tuple[str, int, int],
    now: int,
    result: AttemptResult,
) -> Headers:
    """The header list of a retry/DLQ message, rebuilt from scratch (one value per name)."""
    first_failed = meta.first_failed_ms if meta.first_failed_ms is not None else now
    out: Headers = [
        (c.K_DELIVERY_ID, delivery_id.encode()),
        (c.K_ATTEMPT, str(next_attempt).encode()),
        (c.K_RUN_ATTEMPT, str(next_run_attempt).encode()),
        (c.K_FIRST_FAILED_MS, str(first_failed).encode()),
        (c.K_ORIGIN_TOPIC, origin[0].encode()),
        (c.K_ORIGIN_PARTITION, str(origin[1]).encode()),
        (c.K_ORIGIN_OFFSET, str(origin[2]).encode()),
        (c.K_ERROR_KIND, result.outcome.encode()),
        (c.K_STATUS_CODE, str(result.status_code).encode()),
    ]
    if meta.replay_id:
        out.append((c.K_REPLAY_ID, meta.replay_id.encode()))
    return out


def _row_written(st: PartitionState, offset: int, future: asyncio.Future[None]) -> None:
    st.unwritten.discard(future)
    st.tracker.done(offset)


def _partition_lag(pstats: dict[str, Any]) -> int | None:
    """High watermark minus the committed offset; with no commit yet, minus the log start.

    librdkafka's own `consumer_lag` is -1 until the group has committed the partition, which
    would hide exactly the backlog of a new group or a never-committed partition.
    """
    high = int(pstats.get("hi_offset", -1))
    if high < 0:
        return None
    committed = int(pstats.get("committed_offset", -1))
    base = committed if committed >= 0 else int(pstats.get("lo_offset", -1))
    if base < 0:
        return None
    return max(0, high - base)


