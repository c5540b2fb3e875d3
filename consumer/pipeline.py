"""One message's way through the deliver role: prepare, call, complete (docs/architecture.md).

1. prepare: parse and validate the event and its perkamo-* headers, look up the Space's
   endpoint, and bundle what the delivery needs into a `Job`; bad input is dead-lettered here.
2. call: get a place from the endpoint's gate (consumer.gate) and make the HTTP call. An open
   circuit (or a saturated endpoint) parks the delivery on the held topic instead, attempt
   unspent; a held delivery whose schedule's span ran out ends `failed` (expired).
3. complete: decide what follows (delivered, the next retry tier, or the dead-letter topic) and
   publish it together with the attempt record on `perkamo.webhooks.attempts`.

`Pipeline.handle()` returns once every message it published is acknowledged by Kafka: only
then may the loop count the input offset as done.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from consumer import attempts, operational
from consumer import constants as c
from consumer.breaker import verdict_for
from consumer.budget import budget_of
from consumer.constants import DlqReason, HoldReason
from consumer.deliver_context import DeliverContext
from consumer.durable import DurablePublisher, Outgoing
from consumer.errors import EndpointGone, Expired, InvalidEvent, Parked
from consumer.gate import EndpointGate, Ticket
from consumer.headers import (
    DeliveryMeta,
    check_due,
    dead_letter_headers,
    due_ms,
    held_headers,
    invalid_input_headers,
    read_meta,
    retry_headers,
    untrusted_meta,
)
from consumer.intake import parse_event
from consumer.kafka_io import Message, header_list, header_map, position
from consumer.models import AttemptResult, AttemptRow, Endpoint, Event, delivery_id_for
from consumer.observe import AttemptObserver, Observation
from consumer.retry_policy import decide, due_ahead_s, schedule_span_s, tier_topic

log = logging.getLogger(__name__)

_NO_CALL: Final = AttemptResult("held")

@dataclass(frozen=True, slots=True)
class Job:
    """Everything one delivery attempt needs, prepared from one Kafka message."""

    event: Event
    endpoint: Endpoint
    delivery_id: str
    meta: DeliveryMeta  # its run's start filled in
    trigger: str
    origin: tuple[str, int, int]
    held: bool  # read back from the held topic: it waits for the circuit in memory


def now_ms() -> int:
    return int(time.time() * 1000)


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


class Pipeline:
    """The per-message steps of the deliver role; the loop owns offsets and pauses."""

    def __init__(self, ctx: DeliverContext) -> None:
        settings, metrics = ctx.settings, ctx.metrics
        self._settings = settings
        self._registry = ctx.registry
        self._metrics = metrics
        self._deliverer = ctx.deliverer
        self._gates = ctx.gates
        self._in_flight = ctx.in_flight
        budget = budget_of(settings.max_payload_bytes)
        self.out = DurablePublisher(ctx.producer, metrics, budget)
        self._record_max = budget.record_max_bytes
        self.tiers = settings.tier_seconds
        self.retry_topics = {tier_topic(name): name for name, _ in self.tiers}
        # Topics only the service writes: their perkamo-* headers are its own, and trusted.
        self.own_topics = frozenset({*self.retry_topics, c.HELD_TOPIC, c.REDELIVER_TOPIC})
        self.span_ms = int(schedule_span_s(self.tiers) * 1000)
        # A retry message's due time lies at most its own tier's delay (plus jitter) ahead.
        self.due_ahead_ms = {tier_topic(name): int(due_ahead_s(delay) * 1000) for name, delay in self.tiers}
        self._observe = AttemptObserver(settings, metrics)  # spans and network timings

    async def handle(self, msg: Message) -> None:
        """One message, start to end; returns once what it published is acknowledged."""
        try:
            await self._handle(msg)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "internal error on %s[%d]@%d; dead-lettering it", msg.topic(), msg.partition(), msg.offset()
            )
            await self.dead_letter_invalid(msg, DlqReason.INTERNAL, "internal error, see the consumer log")

    async def _handle(self, msg: Message) -> None:
        job = await self.prepare(msg)
        while job is not None:
            gate = self._gates.get(job.endpoint)
            try:
                ticket = await self._admit(job, gate)
            except Parked as parked:
                await self._park(job, parked.reason)
                return
            except Expired:
                await self._expire(job)
                return
            except EndpointGone:  # removed or changed while it waited: look it up again
                job = self._reroute(job)
                continue
            seen = self._observe.begin(job)
            result = await self.call(job, gate, ticket, seen)
            await self.complete(job, result, seen)
            return

    # 1. prepare ------------------------------------------------------------------------------

    async def prepare(self, msg: Message) -> Job | None:
        """Parse, validate and look up the endpoint; bad input is dead-lettered here."""
        headers = header_map(msg)
        now = now_ms()
        topic = msg.topic()
        try:
            event = parse_event(msg.value(), self._settings.max_payload_bytes)
            # An events topic's perkamo-* headers are anyone's: ids and attempt numbers come
            # from the service only (docs/security.md, what is trusted).
            meta = (read_meta(headers) if topic in self.own_topics else untrusted_meta(headers)).started(now)
            if topic in self.retry_topics:
                check_due(due_ms(headers), now, self.due_ahead_ms[topic])
        except InvalidEvent as exc:
            self._metrics.invalid_events.labels(exc.reason).inc()
            log.warning("invalid event on %s[%d]@%d: %s (dead-lettered)",
                        topic, msg.partition(), msg.offset(), exc)
            await self.dead_letter_invalid(msg, exc.reason, exc.detail)
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
        endpoint = self._registry.get(event.space_slug)
        if endpoint is None:
            self._metrics.no_endpoint.labels(event.space_slug).inc()
            log.info("event %s: space %s has no active endpoint; not delivered", event.id, event.space_slug)
        return endpoint

    def _reroute(self, job: Job) -> Job | None:
        endpoint = self._endpoint_for(job.event)
        return None if endpoint is None else dataclasses.replace(job, endpoint=endpoint)

    # 2. call -----------------------------------------------------------------------------------

    async def _admit(self, job: Job, gate: EndpointGate) -> Ticket:
        """A place for the call. A held delivery waits without taking an in-flight place, until
        the circuit admits it or the end of its schedule's span."""
        if not job.held:
            return await gate.enter()
        assert job.meta.run_started_ms is not None
        left_s = (job.meta.run_started_ms + self.span_ms - now_ms()) / 1000
        if left_s <= 0:
            raise Expired(job.delivery_id)
        self._in_flight.give()  # it waits without an in-flight place
        try:
            return await gate.enter(held=True, deadline=asyncio.get_running_loop().time() + left_s)
        finally:
            self._in_flight.take()

    async def call(self, job: Job, gate: EndpointGate, ticket: Ticket, seen: Observation) -> AttemptResult:
        event = job.event
        try:
            result = await self._deliverer.call(
                job.endpoint, event, job.delivery_id, job.meta.attempt, seen.request_headers
            )
        except BaseException:  # cancelled (a drain deadline, a revoke): give the place back
            try:
                gate.leave(ticket, None)
            except Exception:  # never let it replace the cancellation: the offset must stay uncommitted
                log.exception("giving back a place of space %s's endpoint failed", event.space_slug)
            raise
        verdict = verdict_for(result.delivered, result.status_code) if result.called else None
        gate.leave(ticket, verdict, result.outcome)
        seen.done(result, gate)
        metrics = self._metrics
        metrics.child(metrics.attempt_duration, event.space_slug).observe(result.duration_ms / 1000)
        metrics.child(metrics.attempts, event.space_slug, event.type, result.outcome).inc()
        return result

    # 3. complete -------------------------------------------------------------------------------

    async def complete(self, job: Job, result: AttemptResult, seen: Observation) -> None:
        """Publish what follows the attempt and its record; returns once Kafka has both."""
        now = now_ms()
        next_at: int | None = None
        meta, event = job.meta, job.event
        publishes: list[Outgoing] = []
        if result.delivered:
            status = c.STATUS_DELIVERED
        else:
            meta = seen.carry(meta)  # the next attempt is a child of this one's span
            decision = decide(meta.run_attempt, self.tiers, now, result.retry_after_s)
            if decision.tier is None:
                status = c.STATUS_FAILED
                headers = dead_letter_headers(
                    meta, job.delivery_id, job.origin, reason=DlqReason.EXHAUSTED, detail=result.error,
                    error_kind=result.outcome, status_code=result.status_code,
                )
                publishes.append(Outgoing(c.DLQ_TOPIC, event.body, job.delivery_id, headers, "dead letter"))
                publishes.append(self._exhausted(job, DlqReason.EXHAUSTED, meta.run_attempt, result))
                self._metrics.dead_lettered.labels(DlqReason.EXHAUSTED).inc()
            else:
                status = c.STATUS_RETRYING
                next_at = decision.due_ms
                headers = retry_headers(
                    meta, job.delivery_id, job.origin, failed_at_ms=now, error_kind=result.outcome,
                    status_code=result.status_code, due=decision.due_ms,
                )
                topic = tier_topic(decision.tier)
                publishes.append(Outgoing(topic, event.body, job.delivery_id, headers, "retry"))
                self._metrics.retries_scheduled.labels(decision.tier).inc()
        row = self.row(job, result, status, now, next_at)
        seen.fill(row)
        publishes.append(self._record(row))
        await self.out.publish_all(publishes, job.origin)
        # Successes at DEBUG: at thousands per second a line each would dominate the hot path.
        if not result.delivered or log.isEnabledFor(logging.DEBUG):
            log.log(
                logging.DEBUG if result.delivered else logging.INFO,
                "attempt delivery=%s space=%s event_type=%s attempt=%d status=%s outcome=%s code=%d "
                "duration_ms=%d",
                job.delivery_id, event.space_slug, event.type, meta.attempt, status, result.outcome,
                result.status_code, result.duration_ms,
            )

    async def _park(self, job: Job, reason: str) -> None:
        """No call now (circuit open, or saturated): park it on the held topic with its attempt
        number unchanged, and say so in history with its hold record (attempt 0)."""
        now = now_ms()
        headers = held_headers(
            job.meta, job.delivery_id, job.origin, trigger=job.trigger, reason=reason, held_since_ms=now
        )
        why = "its circuit is open" if reason == HoldReason.CIRCUIT_OPEN else "it is saturated"
        row = self._hold_row(
            job, c.STATUS_HELD, now, reason,
            f"held: no call made, the endpoint is not taking deliveries ({why}); attempt "
            f"{job.meta.attempt} goes out when it recovers",
        )
        await self.out.publish_all([
            Outgoing(c.HELD_TOPIC, job.event.body, job.endpoint.id, headers, "held delivery"),
            self._record(row),
        ], job.origin)
        self._metrics.holds.labels(reason).inc()
        log.info("held delivery=%s space=%s attempt=%d: %s",
                 job.delivery_id, job.event.space_slug, job.meta.attempt, why)

    async def _expire(self, job: Job) -> None:
        """Its run outlived the schedule's span while held: it ends `failed`, attempt unspent."""
        now = now_ms()
        detail = (
            f"expired: held by an open circuit past the schedule's span "
            f"({self.span_ms / 3_600_000:.1f}h); attempt {job.meta.attempt} was never made"
        )
        headers = dead_letter_headers(
            job.meta, job.delivery_id, job.origin, reason=DlqReason.EXPIRED, detail=detail,
            error_kind=DlqReason.EXPIRED, status_code=0, called=False,
        )
        row = self._hold_row(job, c.STATUS_FAILED, job.meta.held_since_ms or now, DlqReason.EXPIRED, detail)
        await self.out.publish_all([
            Outgoing(c.DLQ_TOPIC, job.event.body, job.delivery_id, headers, "dead letter"),
            self._record(row),
            self._exhausted(job, DlqReason.EXPIRED, job.meta.run_attempt - 1, None),
        ], job.origin)
        self._metrics.dead_lettered.labels(DlqReason.EXPIRED).inc()
        log.info("expired delivery=%s space=%s attempt=%d unspent",
                 job.delivery_id, job.event.space_slug, job.meta.attempt)

    async def dead_letter_invalid(self, msg: Message, reason: str, detail: str) -> None:
        """Bad input: the original bytes and headers go to the DLQ with the reason."""
        origin = position(msg)
        headers = invalid_input_headers(header_list(msg), origin, reason=reason, detail=detail)
        letter = Outgoing(c.DLQ_TOPIC, msg.value(), msg.key(), headers, "dead letter")
        if await self.out.publish(letter, origin) is not None:  # else it went out as a stub
            self._metrics.dead_lettered.labels(reason).inc()

    # Records ---------------------------------------------------------------------------------

    def _record(self, row: AttemptRow) -> Outgoing:
        value = attempts.encode(row, self._record_max)  # the body cut if need be: it always fits
        return Outgoing(c.ATTEMPTS_TOPIC, value, row.delivery_id, None, "attempt record")

    def _exhausted(self, job: Job, reason: str, calls: int, result: AttemptResult | None) -> Outgoing:
        record = operational.delivery_exhausted(
            job.endpoint.space, job.endpoint.id, job.endpoint.host, time.time(),
            delivery_id=job.delivery_id, event_id=job.event.id, event_type=job.event.type,
            attempts=max(0, calls), reason=reason,
            last_error_kind=result.outcome if result else reason,
            last_status_code=result.status_code if result else 0,
        )
        self._metrics.operational_events.labels(operational.DELIVERY_EXHAUSTED).inc()
        return Outgoing(c.OPERATIONAL_TOPIC, record, job.endpoint.space, None, "operational record")

    def row(
        self, job: Job, result: AttemptResult, status: str, at_ms: int, next_at: int | None
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
            status_text=result.status_text[:c.STATUS_TEXT_MAX],
            duration_ms=result.duration_ms,
            error=result.error[:c.ERROR_MAX],
            attempted_at=_ts(at_ms),
            next_attempt_at=_ts(next_at) if next_at else None,
            request_body=event.text,
            response_excerpt=result.response_excerpt,
            source_topic=job.origin[0],
            source_partition=job.origin[1],
            source_offset=job.origin[2],
            error_kind="" if result.delivered else result.outcome,
            replay_id=job.meta.replay_id,
        )

    def _hold_row(self, job: Job, status: str, at_ms: int, error_kind: str, error: str) -> AttemptRow:
        """The delivery's hold record: attempt 0, not a call (docs/analysts.md)."""
        row = self.row(job, _NO_CALL, status, at_ms, None)
        row.attempt = 0
        row.pending_attempt = job.meta.attempt
        row.error_kind = error_kind
        row.error = error
        self._observe.fill_hold(row, job.meta)
        return row
