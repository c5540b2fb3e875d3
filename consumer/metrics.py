"""Prometheus metrics: one place for names, labels and help texts (DESIGN §8).

Labels are of bounded cardinality only: space, event type, outcome, tier, reason, topic,
partition. Never a URL, a delivery id or a user id. `Metrics(enabled=False)` gives the same
interface doing nothing, so the cost of metrics on the hot path can be measured.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

PREFIX = "perkamo_webhook_"

# Attempt outcomes (the `outcome` label); "delivered" is the only success.
OUTCOME_DELIVERED = "delivered"
OUTCOME_HTTP_STATUS = "http_status"  # a non-2xx answer, 3xx included (redirects are not followed)
OUTCOME_TIMEOUT = "timeout"
OUTCOME_CONNECT = "connect_error"
OUTCOME_TLS = "tls_error"
OUTCOME_BLOCKED = "blocked_address"
OUTCOME_CIRCUIT_OPEN = "circuit_open"
OUTCOME_PROTOCOL = "protocol_error"
# Too many deliveries already queued for this endpoint: moved to the next tier without a call.
OUTCOME_SATURATED = "endpoint_saturated"
OUTCOMES = (
    OUTCOME_SATURATED,
    OUTCOME_DELIVERED,
    OUTCOME_HTTP_STATUS,
    OUTCOME_TIMEOUT,
    OUTCOME_CONNECT,
    OUTCOME_TLS,
    OUTCOME_BLOCKED,
    OUTCOME_CIRCUIT_OPEN,
    OUTCOME_PROTOCOL,
)

CIRCUIT_CLOSED, CIRCUIT_OPEN, CIRCUIT_HALF_OPEN = 0, 1, 2

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# name -> (kind, help, labels); the single list the dashboard and alert tests check against.
DEFINITIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "events_consumed_total": ("counter", "Messages taken from Kafka, per topic.", ("topic",)),
    "attempts_total": (
        "counter",
        "Delivery attempts by outcome (delivered, http_status, timeout, ...).",
        ("space", "event_type", "outcome"),
    ),
    "attempt_duration_seconds": (
        "histogram",
        "Duration of delivery attempts that made an HTTP call.",
        ("space",),
    ),
    "in_flight": ("gauge", "Deliveries taken from Kafka and not yet finished.", ()),
    "in_flight_max_per_endpoint": (
        "gauge",
        "The largest number of HTTP requests in flight to any one endpoint.",
        (),
    ),
    "retries_scheduled_total": ("counter", "Deliveries published to a retry tier.", ("tier",)),
    "dead_lettered_total": (
        "counter",
        "Messages published to the dead-letter topic, by reason.",
        ("reason",),
    ),
    "invalid_events_total": ("counter", "Input events rejected as invalid, by reason.", ("reason",)),
    "no_endpoint_total": (
        "counter",
        "Events for a Space with no active endpoint (counted, not delivered).",
        ("space",),
    ),
    "circuit_state": (
        "gauge",
        "Per-Space endpoint circuit breaker: 0 closed, 1 open, 2 half-open.",
        ("space",),
    ),
    "consumer_lag": (
        "gauge",
        "High watermark minus committed offset, per assigned partition.",
        ("topic", "partition"),
    ),
    "rebalances_total": ("counter", "Partition assignment changes, by kind.", ("kind",)),
    "assigned_partitions": ("gauge", "Partitions assigned to this consumer.", ()),
    "paused_partitions": ("gauge", "Assigned partitions paused right now, by reason.", ("reason",)),
    "history_rows_written_total": ("counter", "Attempt rows written to the history store.", ()),
    "history_flush_duration_seconds": ("histogram", "Duration of history batch inserts.", ()),
    "history_buffer_rows": ("gauge", "Attempt rows waiting to be written to history.", ()),
    "history_write_errors_total": ("counter", "Failed history batch inserts (retried).", ()),
    "endpoints_loaded": ("gauge", "Active endpoints known to this consumer.", ()),
    "endpoint_records_invalid_total": (
        "counter",
        "Endpoint records ignored as invalid, by reason.",
        ("reason",),
    ),
    "republished_total": (
        "counter",
        "Deliveries re-published by an operator, by trigger (resend, replay).",
        ("trigger",),
    ),
}


def metric_names() -> set[str]:
    """Every series name this service exports (histograms expanded), for dashboard checks."""
    names: set[str] = set()
    for short, (kind, _, _) in DEFINITIONS.items():
        full = PREFIX + short
        if kind == "histogram":
            names.update({full + "_bucket", full + "_sum", full + "_count"})
        else:
            names.add(full)
    return names


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

    def observe(self, *_: Any) -> None:
        pass

    def remove(self, *_: Any) -> None:
        pass

    def clear(self) -> None:
        pass


class Metrics:
    """The service's metrics in their own registry (so tests can run several services)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registry = CollectorRegistry(auto_describe=True)
        if enabled:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        made: dict[str, Any] = {}
        for short, (kind, doc, labels) in DEFINITIONS.items():
            if not enabled:
                made[short] = _Null()
                continue
            name = PREFIX + short
            if kind == "counter":
                # prometheus-client adds _total itself
                made[short] = Counter(name.removesuffix("_total"), doc, labels, registry=self.registry)
            elif kind == "gauge":
                made[short] = Gauge(name, doc, labels, registry=self.registry)
            else:
                buckets = _DURATION_BUCKETS
                made[short] = Histogram(name, doc, labels, buckets=buckets, registry=self.registry)
        self.events_consumed: Any = made["events_consumed_total"]
        self.attempts: Any = made["attempts_total"]
        self.attempt_duration: Any = made["attempt_duration_seconds"]
        self.in_flight: Any = made["in_flight"]
        self.in_flight_max_per_endpoint: Any = made["in_flight_max_per_endpoint"]
        self.retries_scheduled: Any = made["retries_scheduled_total"]
        self.dead_lettered: Any = made["dead_lettered_total"]
        self.invalid_events: Any = made["invalid_events_total"]
        self.no_endpoint: Any = made["no_endpoint_total"]
        self.circuit_state: Any = made["circuit_state"]
        self.consumer_lag: Any = made["consumer_lag"]
        self.rebalances: Any = made["rebalances_total"]
        self.assigned_partitions: Any = made["assigned_partitions"]
        self.paused_partitions: Any = made["paused_partitions"]
        self.history_rows_written: Any = made["history_rows_written_total"]
        self.history_flush_duration: Any = made["history_flush_duration_seconds"]
        self.history_buffer_rows: Any = made["history_buffer_rows"]
        self.history_write_errors: Any = made["history_write_errors_total"]
        self.endpoints_loaded: Any = made["endpoints_loaded"]
        self.endpoint_records_invalid: Any = made["endpoint_records_invalid_total"]
        self.republished: Any = made["republished_total"]
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached: label lookups cost a lock and a dict per call."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found
