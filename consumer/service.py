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
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from confluent_kafka import Consumer, Message, TopicPartition

from consumer import constants as c
from consumer import metrics as m
from consumer import operational
from consumer.breaker import BreakerPolicy, CircuitState, verdict_for
from consumer.config import Settings
from consumer.delivery import Deliverer
from consumer.endpoints import EndpointRegistry
from consumer.errors import InvalidEvent, PerkamoError
from consumer.gate import (
    PARK_CIRCUIT_OPEN,
    EndpointGate,
    EndpointGone,
    Expired,
    GateLimits,
    Gates,
    Parked,
    Ticket,
)
from consumer.headers import (
    DeliveryMeta,
    check_due,
    dead_letter_headers,
    due_ms,
    held_headers,
    invalid_input_headers,
    read_meta,
    retry_headers,
)
from consumer.health import HealthPolicy
from consumer.history import HistoryStore, HistoryWriter
from consumer.intake import parse_event
from consumer.kafka_io import AsyncProducer, consumer_config, header_list, header_map, position
from consumer.models import AttemptResult, AttemptRow, Endpoint, Event, delivery_id_for
from consumer.offsets import OffsetTracker
from consumer.retry_policy import decide, max_due_ahead_s, schedule_span_s, tier_topic

log = logging.getLogger(__name__)

TP = tuple[str, int]

PAUSE_DUE = "due"  # a retry message that is not due yet heads the partition
PAUSE_WINDOW = "window"  # too many uncommitted messages in this partition
PAUSE_HISTORY = "history"  # the history writer is behind
PAUSE_REASONS = (PAUSE_DUE, PAUSE_WINDOW, PAUSE_HISTORY)

REASON_EXHAUSTED = "exhausted"  # every tier tried
REASON_EXPIRED = "expired"  # the schedule's span passed while an open circuit held it
REASON_INTERNAL = "internal_error"

STATUS_TEXT_MAX = 256
_BATCH = 500
_REVOKE_BUDGET_S = 10.0
_REFRESH_S = 1.0
_NO_CALL_RESULT = AttemptResult("held")


@dataclass(frozen=True, slots=True)
class Job:
    """Everything one delivery attempt needs, prepared from one Kafka message."""

    event: Event
    endpoint: Endpoint
    delivery_id: str
    meta: DeliveryMeta  # its run start filled in
    trigger: str
    origin: tuple[str, int, int]
    held: bool  # read back from the held topic: it waits for the circuit in memory


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
        self.gates = Gates(
            BreakerPolicy(
                window_s=settings.breaker_window_s,
                min_calls=settings.breaker_min_calls,
                failure_rate=settings.breaker_failure_rate,
                cooldown_s=settings.breaker_cooldown_s,
                cooldown_max_s=settings.breaker_cooldown_max_s,
                ramp_to=settings.max_in_flight_per_endpoint,
                ramp_s=settings.breaker_ramp_s,
            ),
            HealthPolicy(
                window_s=settings.health_window_s,
                degraded_rate=settings.health_degraded_rate,
                failing_rate=settings.breaker_failure_rate,
            ),
            GateLimits(
                cap=settings.max_in_flight_per_endpoint,
                queue_cap=2 * settings.max_in_flight_per_endpoint,
                slow_after_s=min(1.0, settings.delivery_timeout_s / 2),
            ),
            on_change=self._circuit_changed,
        )
        self.deliverer = Deliverer(settings, metrics)
        self._span_ms = int(schedule_span_s(self.tiers) * 1000)
        self._max_due_ahead_ms = int(max_due_ahead_s(self.tiers) * 1000)
        self._background: set[asyncio.Task[None]] = set()
        self._last_refresh = 0.0
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
        topics = [*self.settings.events_topics, *self.retry_topics, c.HELD_TOPIC]
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
            msgs: list[Message] = await self._kafka_call(self._fetch, min(_BATCH, room), timeout)
            if msgs:
                self._take(msgs)
        if time.monotonic() - self._last_commit >= self.settings.commit_interval_s:
            await self.commit()
        if time.monotonic() - self._last_refresh >= _REFRESH_S:
            self._last_refresh = time.monotonic()
            self._refresh_endpoints()

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
        if self._background:
            await asyncio.wait(self._background, timeout=5.0)
        if self.producer is not None:
            await asyncio.to_thread(self.producer.close, 10.0)
        if self._consumer is not None:
            await self._kafka_call(self._consumer.close)
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
                # A due time beyond any tier's reach is not waited for: _prepare dead-letters it.
                if due is not None and now < due <= now + self._max_due_ahead_ms:
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

    # One message: prepare, admit, call, complete ----------------------------------------

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
        """Prepare, admit, call, complete; returns the history write to wait for (None if no row)."""
        job = await self._prepare(msg)
        while job is not None:
            gate = self.gates.get(job.endpoint.id, job.endpoint.space, job.endpoint.url)
            try:
                ticket = await self._admit(job, gate)
            except Parked as parked:
                return await self._park(job, parked.reason)
            except Expired:
                return await self._expire(job)
            except EndpointGone:  # removed or changed while it waited: look it up again
                job = self._reroute(job)
                continue
            result = await self._call(job, gate, ticket)
            return await self._complete(job, result)
        return None

    async def _prepare(self, msg: Message) -> Job | None:
        """Parse, validate and look up the endpoint; bad input is dead-lettered here."""
        headers = header_map(msg)
        now = _now_ms()
        topic = msg.topic()
        try:
            event = parse_event(msg.value(), self.settings.max_payload_bytes)
            meta = read_meta(headers).started(now)
            if topic in self.retry_topics:
                check_due(due_ms(headers), now, self._max_due_ahead_ms)
        except InvalidEvent as exc:
            self.metrics.invalid_events.labels(exc.reason).inc()
            log.warning(
                "invalid event on %s[%d]@%d: %s (dead-lettered)",
                topic,
                msg.partition(),
                msg.offset(),
                exc,
            )
            await self._dead_letter_invalid(msg, exc.reason, exc.detail)
            return None
        endpoint = self._endpoint_for(event)
        if endpoint is None:
            return None
        trigger = meta.trigger or (c.TRIGGER_RETRY if topic in self.retry_topics else c.TRIGGER_INITIAL)
        return Job(
            event=event,
            endpoint=endpoint,
            delivery_id=meta.delivery_id or delivery_id_for(event.id, endpoint.id),
            meta=meta,
            trigger=trigger,
            origin=meta.origin or position(msg),
            held=topic == c.HELD_TOPIC,
        )

    def _endpoint_for(self, event: Event) -> Endpoint | None:
        endpoint = self.registry.get(event.space_slug)
        if endpoint is None:
            self.metrics.no_endpoint.labels(event.space_slug).inc()
            log.info("event %s: space %s has no active endpoint; not delivered", event.id, event.space_slug)
        return endpoint

    def _reroute(self, job: Job) -> Job | None:
        endpoint = self._endpoint_for(job.event)
        return None if endpoint is None else dataclasses.replace(job, endpoint=endpoint)

    async def _admit(self, job: Job, gate: EndpointGate) -> Ticket:
        """A place for the call. A held delivery waits without taking an in-flight place, until
        the circuit admits it or the end of its schedule's span."""
        if not job.held:
            return await gate.enter()
        assert job.meta.run_started_ms is not None
        left_s = (job.meta.run_started_ms + self._span_ms - _now_ms()) / 1000
        if left_s <= 0:
            raise Expired(job.delivery_id)
        self._in_flight -= 1
        self._room.set()
        try:
            return await gate.enter(held=True, deadline=asyncio.get_running_loop().time() + left_s)
        finally:
            self._in_flight += 1

    async def _call(self, job: Job, gate: EndpointGate, ticket: Ticket) -> AttemptResult:
        event = job.event
        try:
            result = await self.deliverer.call(job.endpoint, event, job.delivery_id, job.meta.attempt)
        except BaseException:
            gate.leave(ticket, None)
            raise
        verdict = verdict_for(result.delivered, result.status_code) if result.called else None
        gate.leave(ticket, verdict, result.outcome)
        metrics = self.metrics
        metrics.child(metrics.attempt_duration, event.space_slug).observe(result.duration_ms / 1000)
        metrics.child(metrics.attempts, event.space_slug, event.type, result.outcome).inc()
        return result

    async def _complete(self, job: Job, result: AttemptResult) -> asyncio.Future[None]:
        """Record the attempt and move a failed delivery on; returns once the publish (if any)
        is acknowledged, with the history write still to wait for."""
        now = _now_ms()
        next_at: int | None = None
        publishes: list[Awaitable[Any]] = []
        meta, event = job.meta, job.event
        if result.delivered:
            status = c.STATUS_DELIVERED
        else:
            decision = decide(meta.run_attempt, self.tiers, now, result.retry_after_s)
            if decision.tier is None:
                status = c.STATUS_FAILED
                headers = dead_letter_headers(
                    meta, job.delivery_id, job.origin, reason=REASON_EXHAUSTED, detail=result.error,
                    error_kind=result.outcome, status_code=result.status_code,
                )
                publishes.append(self._publisher().publish(c.DLQ_TOPIC, event.body, job.delivery_id, headers))
                publishes.append(self._exhausted(job, REASON_EXHAUSTED, meta.run_attempt, result))
                self.metrics.dead_lettered.labels(REASON_EXHAUSTED).inc()
            else:
                status = c.STATUS_RETRYING
                next_at = decision.due_ms
                headers = retry_headers(
                    meta, job.delivery_id, job.origin, failed_at_ms=now, error_kind=result.outcome,
                    status_code=result.status_code, due=decision.due_ms,
                )
                publishes.append(
                    self._publisher().publish(tier_topic(decision.tier), event.body, job.delivery_id, headers)
                )
                self.metrics.retries_scheduled.labels(decision.tier).inc()
        written = self.writer.submit(self._row(job, result, status, now, next_at))
        for publish in publishes:
            await publish
        # Successes at DEBUG: at thousands per second a line each would dominate the hot path.
        log.log(
            logging.DEBUG if result.delivered else logging.INFO,
            "attempt delivery=%s space=%s event_type=%s attempt=%d status=%s outcome=%s code=%d "
            "duration_ms=%d",
            job.delivery_id,
            event.space_slug,
            event.type,
            meta.attempt,
            status,
            result.outcome,
            result.status_code,
            result.duration_ms,
        )
        return written

    async def _park(self, job: Job, reason: str) -> asyncio.Future[None]:
        """No call now (circuit open, or saturated): park it on the held topic with its attempt
        number unchanged, and say so in history with its hold record (attempt 0)."""
        now = _now_ms()
        headers = held_headers(
            job.meta, job.delivery_id, job.origin, trigger=job.trigger, reason=reason, held_since_ms=now
        )
        publish = self._publisher().publish(c.HELD_TOPIC, job.event.body, job.endpoint.id, headers)
        why = "its circuit is open" if reason == PARK_CIRCUIT_OPEN else "it is saturated"
        row = self._hold_row(
            job, c.STATUS_HELD, now, reason,
            f"held: no call made, the endpoint is not taking deliveries ({why}); attempt "
            f"{job.meta.attempt} goes out when it recovers",
        )
        written = self.writer.submit(row)
        await publish
        self.metrics.holds.labels(reason).inc()
        log.info(
            "held delivery=%s space=%s attempt=%d: %s",
            job.delivery_id, job.event.space_slug, job.meta.attempt, why,
        )
        return written

    async def _expire(self, job: Job) -> asyncio.Future[None]:
        """Its run outlived the schedule's span while held: it ends `failed`, attempt unspent."""
        now = _now_ms()
        span_h = self._span_ms / 3_600_000
        detail = (
            f"expired: held by an open circuit past the schedule's span ({span_h:.1f}h); attempt "
            f"{job.meta.attempt} was never made"
        )
        headers = dead_letter_headers(
            job.meta, job.delivery_id, job.origin, reason=REASON_EXPIRED, detail=detail,
            error_kind=REASON_EXPIRED, status_code=0, called=False,
        )
        publish = self._publisher().publish(c.DLQ_TOPIC, job.event.body, job.delivery_id, headers)
        row = self._hold_row(job, c.STATUS_FAILED, job.meta.held_since_ms or now, REASON_EXPIRED, detail)
        written = self.writer.submit(row)
        await publish
        await self._exhausted(job, REASON_EXPIRED, job.meta.run_attempt - 1, None)
        self.metrics.dead_lettered.labels(REASON_EXPIRED).inc()
        log.info("expired delivery=%s space=%s attempt=%d unspent", job.delivery_id, job.event.space_slug,
                 job.meta.attempt)
        return written

    async def _exhausted(self, job: Job, reason: str, calls: int, result: AttemptResult | None) -> None:
        record = operational.delivery_exhausted(
            job.endpoint.space, job.endpoint.id, job.endpoint.host, time.time(),
            delivery_id=job.delivery_id, event_id=job.event.id, event_type=job.event.type,
            attempts=max(0, calls), reason=reason,
            last_error_kind=result.outcome if result else reason,
            last_status_code=result.status_code if result else 0,
        )
        await self._publisher().publish(c.OPERATIONAL_TOPIC, record, job.endpoint.space)
        self.metrics.operational_events.labels(operational.DELIVERY_EXHAUSTED).inc()

    def _row(
        self, job: Job, result: AttemptResult, status: str, now: int, next_at: int | None
    ) -> AttemptRow:
        event, endpoint = job.event, job.endpoint
        return AttemptRow(
            delivery_id=job.delivery_id,
            attempt=job.meta.attempt,
            event_id=event.id,
            event_type=event.type,
            space_slug=event.space_slug,
            environment=event.environment,
            endpoint_id=endpoint.id,
            endpoint_host=endpoint.host,
            user_id=event.user_id,
            transaction_id=event.transaction_id,
            trigger=job.trigger,
            status=status,
            status_code=result.status_code,
            status_text=result.status_text[:STATUS_TEXT_MAX],
            duration_ms=result.duration_ms,
            error=result.error,
            attempted_at=_ts(now),
            next_attempt_at=_ts(next_at) if next_at else None,
            request_body=event.body,
            response_excerpt=result.response_excerpt,
            source_topic=job.origin[0],
            source_partition=job.origin[1],
            source_offset=job.origin[2],
            error_kind="" if result.delivered else result.outcome,
            replay_id=job.meta.replay_id,
        )

    def _hold_row(self, job: Job, status: str, at_ms: int, error_kind: str, error: str) -> AttemptRow:
        """The delivery's hold record: attempt 0, not a call (docs/analysts.md)."""
        row = self._row(job, _NO_CALL_RESULT, status, at_ms, None)
        row.attempt = 0
        row.pending_attempt = job.meta.attempt
        row.error_kind = error_kind
        row.error = error
        return row

    async def _dead_letter_invalid(self, msg: Message, reason: str, detail: str) -> None:
        """Bad input: the original bytes and headers go to the DLQ with the reason."""
        headers = invalid_input_headers(header_list(msg), position(msg), reason=reason, detail=detail)
        await self._publisher().publish(c.DLQ_TOPIC, msg.value(), msg.key(), headers)
        self.metrics.dead_lettered.labels(reason).inc()

    # Endpoint gates ------------------------------------------------------------------------

    def _circuit_changed(self, gate: EndpointGate, before: CircuitState, after: CircuitState) -> None:
        endpoint = self.registry.get(gate.space)
        host = endpoint.host if endpoint is not None else ""
        self.metrics.circuit_state.labels(gate.space).set(int(after))
        now = asyncio.get_running_loop().time()
        if before is CircuitState.CLOSED and after is CircuitState.OPEN:
            breaker = gate.breaker
            calls = breaker.trip_calls
            rate = breaker.trip_failures / calls if calls else 0.0
            log.warning("circuit for space %s opened: %d calls, %.0f%% found it unavailable; next "
                        "probe in %.0fs", gate.space, calls, rate * 100, breaker.cooldown_s)
            record = operational.circuit_opened(
                gate.space, gate.key, host, time.time(),
                failure_rate=rate, calls=calls, cooldown_s=breaker.cooldown_s,
            )
            self._emit(operational.CIRCUIT_OPENED, gate.space, record)
        elif after is CircuitState.CLOSED:
            open_for = now - gate.breaker.opened_at
            log.warning("circuit for space %s closed after %.1fs", gate.space, open_for)
            record = operational.circuit_closed(gate.space, gate.key, host, time.time(), open_for_s=open_for)
            self._emit(operational.CIRCUIT_CLOSED, gate.space, record)
        else:
            log.info("circuit for space %s is now %s", gate.space, after.label)

    def _emit(self, kind: str, space: str, record: bytes) -> None:
        """Publish an operational event not tied to an offset; a failure is logged, not fatal."""
        if self.producer is None:
            return

        async def publish() -> None:
            try:
                await self._publisher().publish(c.OPERATIONAL_TOPIC, record, space)
                self.metrics.operational_events.labels(kind).inc()
            except Exception as exc:
                log.warning("operational event %s for space %s not published: %s", kind, space, exc)

        task = asyncio.create_task(publish())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _refresh_endpoints(self) -> None:
        """Once a second: health gauges from the gates; gates of endpoints gone are closed."""
        metrics = self.metrics
        most = 0
        for gate in self.gates:
            endpoint = self.registry.get(gate.space)
            if endpoint is None or endpoint.id != gate.key:
                self.gates.forget(gate.key)
                metrics.forget_space(gate.space)
                continue
            gate.tick()
            snap = gate.health
            now = asyncio.get_running_loop().time()
            metrics.circuit_state.labels(gate.space).set(int(gate.circuit))
            metrics.endpoint_health.labels(gate.space).set(int(snap.state(now, gate.circuit)))
            metrics.endpoint_failure_ratio.labels(gate.space).set(snap.failure_rate(now))
            metrics.endpoint_last_success.labels(gate.space).set(snap.last_success_at or 0)
            metrics.endpoint_last_failure.labels(gate.space).set(snap.last_failure_at or 0)
            metrics.held_deliveries.labels(gate.space).set(gate.held)
            most = max(most, gate.in_flight)
        metrics.in_flight_max_per_endpoint.set(most)

    def endpoint_health(self) -> dict[str, dict[str, Any]]:
        """Per Space: the health of its endpoint as this process sees it (for the admin API)."""
        return {gate.space: gate.snapshot() for gate in self.gates}

    # Offsets and rebalances ------------------------------------------------------------

    async def commit(self) -> None:
        """Commit, per partition, the highest offset below which everything is durable."""
        self._last_commit = time.monotonic()
        offsets = self._committable(self._parts.values())
        if offsets:
            await self._kafka_call(self._commit_sync, offsets)

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

    async def _kafka_call(self, fn: Any, *args: Any) -> Any:
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


