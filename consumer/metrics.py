"""Prometheus metrics: one place for names, labels and help texts (docs/operations.md).

Labels are of bounded cardinality only: space, event type, outcome, tier, reason, topic,
partition. Never a URL, a delivery id or a user id. `Metrics(enabled=False)` gives the same
interface doing nothing, so the cost of metrics on the hot path can be measured.

Space and event type come from the input, so they are bounded by construction
(`LabelBounder`): known Spaces (those in the endpoint registry) and known event types
(PERKAMO_METRICS_EVENT_TYPES) always pass; of the others, the first
PERKAMO_METRICS_MAX_LABEL_VALUES distinct values pass, the rest are folded into `_other`.
`forget_space()` drops a Space's series once its endpoint went away.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from consumer.metric_definitions import DEFINITIONS, PREFIX, buckets_of, metric_names

__all__ = ["BOUNDED_LABELS", "DEFINITIONS", "OTHER", "PREFIX", "LabelBounder", "Metrics", "metric_names"]

# The one label value that unknown Spaces and event types fold into past the cap.
OTHER: Final = "_other"
# Labels whose values come from the input and are bounded (see LabelBounder).
BOUNDED_LABELS: Final = ("space", "event_type")
# Kept when a Space's endpoint goes away: it counts what happens to the Space's events next.
_KEPT_ON_FORGET: Final = frozenset({"no_endpoint_total"})

class LabelBounder:
    """Passes known values and the first `cap` other distinct values; folds the rest to OTHER.

    Called on the hot path: a set lookup, no lock (the loop thread is the only writer; a
    concurrent reader can at worst let one value more through)."""

    def __init__(self, cap: int, known: Iterable[str] = ()) -> None:
        self._cap = cap
        self._fixed = frozenset(known)  # from settings: never forgotten
        self._known: set[str] = set()  # from the endpoint registry
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._known or value in self._seen or value in self._fixed:
            return value
        if len(self._seen) < self._cap:
            self._seen.add(value)
            return value
        return OTHER

    def configure(self, cap: int, fixed: Iterable[str] = ()) -> None:
        """Set the cap and the values that always pass (from settings)."""
        self._cap = cap
        self._fixed = frozenset(fixed)

    def add_known(self, value: str) -> None:
        self._known.add(value)
        self._seen.discard(value)

    def forget(self, value: str) -> None:
        """The value is no longer known (its Space's endpoint went away): from now on it is one
        of the other values, passing while it has a place under the cap."""
        self._known.discard(value)
        if value not in self._seen and len(self._seen) < self._cap:
            self._seen.add(value)

    @property
    def seen(self) -> int:
        return len(self._seen)


class _Bounded:
    """A labelled metric whose input-driven label values go through LabelBounders first."""

    def __init__(self, metric: Any, bounders: tuple[Callable[[str], str] | None, ...]) -> None:
        self.metric = metric
        self._bounders = bounders
        self.created: set[tuple[str, ...]] = set()

    def bound(self, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(
            bound(str(v)) if bound is not None else str(v)
            for v, bound in zip(values, self._bounders, strict=True)
        )

    def labels(self, *values: str) -> Any:
        bounded = self.bound(values)
        self.created.add(bounded)
        return self.metric.labels(*bounded)

    def remove(self, *values: str) -> None:
        self.created.discard(tuple(values))
        self.metric.remove(*values)

    def clear(self) -> None:
        self.created.clear()
        self.metric.clear()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.metric, name)


class _Null:
    """Stands in for any metric when metrics are disabled."""

    def labels(self, *_: Any, **__: Any) -> _Null:
        return self

    def inc(self, *_: Any) -> None:
        pass

    def dec(self, *_: Any) -> None:
        pass

    def set(self, *_: Any) -> None:
        pass

    def set_function(self, *_: Any) -> None:
        pass

    def observe(self, *_: Any) -> None:
        pass

    def remove(self, *_: Any) -> None:
        pass

    def clear(self) -> None:
        pass


class Metrics:
    """The service's metrics in their own registry (so tests can run several services)."""

    def __init__(
        self, enabled: bool = True, max_label_values: int = 100, event_types: Iterable[str] = ()
    ) -> None:
        self.enabled = enabled
        self.spaces = LabelBounder(max_label_values)
        self.event_types = LabelBounder(max_label_values, event_types)
        bounders = {"space": self.spaces, "event_type": self.event_types}
        self._bounded: list[tuple[_Bounded, int]] = []  # (metric, position of its space label)
        self.registry = CollectorRegistry(auto_describe=True)
        if enabled:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        made = {short: self._create(short, kind, doc, labels, bounders)
                for short, (kind, doc, labels) in DEFINITIONS.items()}
        self._bind(made)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def _create(
        self, short: str, kind: str, doc: str, labels: tuple[str, ...],
        bounders: dict[str, LabelBounder],
    ) -> Any:
        """One metric of DEFINITIONS in this registry, its input-driven labels bounded."""
        if not self.enabled:
            return _Null()
        name = PREFIX + short
        metric: Any
        if kind == "counter":
            # prometheus-client adds _total itself
            metric = Counter(name.removesuffix("_total"), doc, labels, registry=self.registry)
        elif kind == "gauge":
            metric = Gauge(name, doc, labels, registry=self.registry)
        else:
            metric = Histogram(name, doc, labels, buckets=buckets_of(short), registry=self.registry)
        if not any(label in BOUNDED_LABELS for label in labels):
            return metric
        wrapped = _Bounded(metric, tuple(bounders.get(label) for label in labels))
        if "space" in labels and short not in _KEPT_ON_FORGET:
            self._bounded.append((wrapped, labels.index("space")))
        return wrapped

    def _bind(self, made: dict[str, Any]) -> None:
        """The metrics as attributes, named for the code that updates them."""
        self.events_consumed: Any = made["events_consumed_total"]
        self.attempts: Any = made["attempts_total"]
        self.attempt_duration: Any = made["attempt_duration_seconds"]
        self.attempt_phase: Any = made["attempt_phase_seconds"]
        self.connections: Any = made["attempt_connections_total"]
        self.endpoint_cert_expiry: Any = made["endpoint_cert_expiry_seconds"]
        self.in_flight: Any = made["in_flight"]
        self.in_flight_max_per_endpoint: Any = made["in_flight_max_per_endpoint"]
        self.retries_scheduled: Any = made["retries_scheduled_total"]
        self.dead_lettered: Any = made["dead_lettered_total"]
        self.invalid_events: Any = made["invalid_events_total"]
        self.kafka_writes_waiting: Any = made["kafka_writes_waiting"]
        self.kafka_write_retries: Any = made["kafka_write_retries_total"]
        self.unpublishable: Any = made["unpublishable_total"]
        self.kafka_reachable: Any = made["kafka_reachable"]
        self.no_endpoint: Any = made["no_endpoint_total"]
        self.circuit_state: Any = made["circuit_state"]
        self.endpoint_health: Any = made["endpoint_health"]
        self.endpoint_failure_ratio: Any = made["endpoint_failure_ratio"]
        self.endpoint_last_success: Any = made["endpoint_last_success_timestamp_seconds"]
        self.endpoint_last_failure: Any = made["endpoint_last_failure_timestamp_seconds"]
        self.held_deliveries: Any = made["held_deliveries"]
        self.holds: Any = made["holds_total"]
        self.operational_events: Any = made["operational_events_total"]
        self.consumer_lag: Any = made["consumer_lag"]
        self.rebalances: Any = made["rebalances_total"]
        self.assigned_partitions: Any = made["assigned_partitions"]
        self.paused_partitions: Any = made["paused_partitions"]
        self.history_rows_written: Any = made["history_rows_written_total"]
        self.history_flush_duration: Any = made["history_flush_duration_seconds"]
        self.history_buffer_rows: Any = made["history_buffer_rows"]
        self.history_write_errors: Any = made["history_write_errors_total"]
        self.history_records_invalid: Any = made["history_records_invalid_total"]
        self.endpoints_loaded: Any = made["endpoints_loaded"]
        self.endpoint_records_invalid: Any = made["endpoint_records_invalid_total"]
        self.republished: Any = made["republished_total"]
        self.gc_pause: Any = made["gc_pause_seconds_total"]

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached: label lookups cost a lock and a dict per call.

        Input-driven labels are bounded first. Only label values that pass unchanged are
        cached under what was asked, so the cache is bounded by the bounded values too (a
        value folded into `_other` takes the slow way, and unfolds when its Space is known)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is not None:
            return found
        if isinstance(metric, _Bounded):
            bounded = metric.bound(labels)
            metric.created.add(bounded)
            found = metric.metric.labels(*bounded)
            if bounded != labels:
                return found
        else:
            found = metric.labels(*labels)
        self._children[key] = found
        return found

    def limit_labels(self, max_label_values: int, event_types: Iterable[str] = ()) -> None:
        """Apply PERKAMO_METRICS_MAX_LABEL_VALUES and PERKAMO_METRICS_EVENT_TYPES."""
        self.spaces.configure(max_label_values)
        self.event_types.configure(max_label_values, event_types)

    def forget_space(self, space: str) -> int:
        """Drop a Space's delivery series (attempts, durations, circuit state) once its endpoint
        went away; returns how many. `no_endpoint_total` stays: it goes on counting the Space's
        events. Call it on the thread that updates the metrics (the event loop)."""
        removed = 0
        for metric, position in self._bounded:
            for labels in [t for t in metric.created if t[position] == space]:
                metric.remove(*labels)
                self._children.pop((id(metric), labels), None)
                removed += 1
        self.spaces.forget(space)
        return removed
