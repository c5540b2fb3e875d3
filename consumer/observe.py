"""What the pipeline's call step sees of each attempt: its span, its network timings and the
endpoint's certificate (consumer.tracing, consumer.nettiming), put where they are read.

    seen = observer.begin(job)            # the span starts; the timing record is this task's
    result = await deliverer.call(..., seen.request_headers)   # traceparent, when propagated
    seen.done(result, gate)               # span ended; histograms; certificate kept per endpoint
    meta = seen.carry(meta)               # retry / DLQ headers: the next attempt is its child
    seen.fill(row)                        # the attempt record's trace and timing fields

Each attempt's span is a child of the one before it (the first: of the event's own
`traceparent`, or a new trace), so retries, held deliveries, resends and replays stay in one
trace and the chain reads in order.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Protocol

from consumer import nettiming
from consumer import tracing as tracing_mod
from consumer.config import Settings
from consumer.gate import EndpointGate
from consumer.headers import DeliveryMeta
from consumer.metrics import Metrics
from consumer.models import AttemptResult, AttemptRow, Endpoint, Event
from consumer.nettiming import NOT_MEASURED, NetTiming, Phases
from consumer.tracecontext import TRACEPARENT, TraceContext
from consumer.tracing import AttemptSpan, Tracing

log = logging.getLogger(__name__)


class JobLike(Protocol):
    """What of the pipeline's Job an attempt's observation reads."""

    @property
    def event(self) -> Event: ...

    @property
    def endpoint(self) -> Endpoint: ...

    @property
    def delivery_id(self) -> str: ...

    @property
    def meta(self) -> DeliveryMeta: ...

    @property
    def trigger(self) -> str: ...


class AttemptObserver:
    """One per pipeline: PERKAMO_TRACE_PROPAGATION, PERKAMO_NETWORK_TIMINGS and the tracing."""

    def __init__(self, settings: Settings, metrics: Metrics, tracing: Tracing | None = None) -> None:
        self.tracing = tracing if tracing is not None else tracing_mod.current()
        self._propagate = settings.trace_propagation
        self._timings = settings.network_timings
        self._metrics = metrics

    def begin(self, job: JobLike) -> Observation:
        timing = nettiming.begin() if self._timings else None
        span = self.tracing.attempt(job.meta.trace, endpoint=job.endpoint, event=job.event,
                                    delivery_id=job.delivery_id, attempt=job.meta.attempt,
                                    trigger=job.trigger)
        headers = {TRACEPARENT: span.context.traceparent} if self._propagate else None
        return Observation(self, span, timing, headers)

    def fill_hold(self, row: AttemptRow, meta: DeliveryMeta) -> None:
        """A hold record (no call, no span) names the context the delivery continues from."""
        if meta.trace is not None:
            row.trace_id, row.span_id = meta.trace.trace_id, meta.trace.span_id

    def _observed(self, phases: Phases) -> None:
        metrics = self._metrics
        if phases.reused is None:
            return
        metrics.child(metrics.connections, "true" if phases.reused else "false").inc()
        histogram = metrics.attempt_phase
        if not phases.reused:
            for name, value in (("dns", phases.dns_ms), ("connect", phases.connect_ms),
                                ("tls", phases.tls_ms)):
                if value is not None:
                    metrics.child(histogram, name).observe(value / 1000)
        if phases.ttfb_ms is not None:
            metrics.child(histogram, "ttfb").observe(phases.ttfb_ms / 1000)


class Observation:
    """One attempt, from `begin()` to its record."""

    __slots__ = ("_observer", "_span", "_timing", "phases", "request_headers")

    def __init__(self, observer: AttemptObserver, span: AttemptSpan, timing: NetTiming | None,
                 request_headers: Mapping[str, str] | None) -> None:
        self._observer = observer
        self._span = span
        self._timing = timing
        self.phases = NOT_MEASURED
        # Extra request headers: the span's traceparent with PERKAMO_TRACE_PROPAGATION, else None.
        self.request_headers = request_headers

    @property
    def context(self) -> TraceContext:
        return self._span.context

    def done(self, result: AttemptResult, gate: EndpointGate) -> None:
        """The call returned: end the span, observe the timings, keep the certificate's expiry.
        Never raises: what only observes a delivery must not stop it."""
        try:
            timing = self._timing
            if timing is not None:
                self.phases = timing.phases()
                if timing.cert_not_after is not None:
                    gate.health.saw_certificate(timing.cert_not_after)
            self._span.end(result, self.phases)
            self._observer._observed(self.phases)
        except Exception:
            log.exception("attempt observation failed (span or timings lost; the delivery goes on)")

    def carry(self, meta: DeliveryMeta) -> DeliveryMeta:
        """The delivery's headers from here on: its next attempt is this one's child."""
        return dataclasses.replace(meta, trace=self._span.context)

    def fill(self, row: AttemptRow) -> None:
        context, phases = self._span.context, self.phases
        row.trace_id, row.span_id = context.trace_id, context.span_id
        row.dns_ms, row.connect_ms, row.tls_ms = phases.dns_ms, phases.connect_ms, phases.tls_ms
        row.ttfb_ms, row.connection_reused = phases.ttfb_ms, phases.reused
        timing = self._timing
        if timing is not None and timing.cert_not_after is not None:
            row.cert_not_after = datetime.fromtimestamp(timing.cert_not_after, tz=UTC)
