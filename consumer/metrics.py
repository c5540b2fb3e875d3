"""Prometheus metrics: one place for names, labels and help texts (DESIGN §8).

Labels are of bounded cardinality only: space, event type, outcome, tier, reason, topic,
partition. Never a URL, a delivery id or a user id. `Metrics(enabled=False)` gives the same
interface doing nothing, so the cost of metrics on the hot path can be measured.
"""

from __future__ import annotations

import contextlib
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
OUTCOME_PROTOCOL = "protocol_error"
OUTCOMES = (
    OUTCOME_DELIVERED,
    OUTCOME_HTTP_STATUS,
    OUTCOME_TIMEOUT,
    OUTCOME_CONNECT,
    OUTCOME_TLS,
    OUTCOME_BLOCKED,
    OUTCOME_PROTOCOL,
)

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
        "Per-Space endpoint circuit breaker: 0 closed, 1 open, 2 half-open (ramping).",
        ("space",),
    ),
    "endpoint_health": (
        "gauge",
        "Per-Space endpoint health: 0 healthy, 1 degraded, 2 failing, 3 circuit open.",
        ("space",),
    ),
    "endpoint_failure_ratio": (
        "gauge",
        "Share of this process's calls to the Space's endpoint that did not deliver, over the "
        "health window.",
        ("space",),
    ),
    "endpoint_last_success_timestamp_seconds": (
        "gauge",
        "When a call to the Space's endpoint last delivered (unix time; 0 = not since start).",
        ("space",),
    ),
    "endpoint_last_failure_timestamp_seconds": (
        "gauge",
        "When a call to the Space's endpoint last failed (unix time; 0 = not since start).",
        ("space",),
    ),
    "held_deliveries": (
        "gauge",
        "Deliveries this process holds in memory for the Space's endpoint (circuit open or "
        "saturated); none of them spent an attempt.",
        ("space",),
    ),
    "holds_total": (
        "counter",
        "Deliveries parked on the held topic without a call, by reason (circuit_open, "
        "endpoint_saturated).",
        ("reason",),
    ),
    "operational_events_total": (
        "counter",
        "Records published to perkamo.webhooks.operational, by type.",
        ("type",),
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
    "history_buffer_rows": ("gauge", "Attempt records gathered by the history role, not yet inserted.", ()),
    "history_write_errors_total": ("counter", "Failed history batch inserts (retried).", ()),
    "history_records_invalid_total": (
        "counter",
        "Messages on perkamo.webhooks.attempts that are not attempt records (skipped).",
        (),
    ),
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
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def endpoint_gauges(self) -> tuple[Any, ...]:
        """The per-Space gauges refreshed from the endpoint gates, in one place for removal."""
        return (
            self.circuit_state,
            self.endpoint_health,
            self.endpoint_failure_ratio,
            self.endpoint_last_success,
            self.endpoint_last_failure,
            self.held_deliveries,
        )

    def forget_space(self, space: str) -> None:
        """Drop a Space's endpoint gauges (its endpoint went away)."""
        for gauge in self.endpoint_gauges():
            with contextlib.suppress(KeyError):  # never set for this Space
                gauge.remove(space)
        self._children = {k: v for k, v in self._children.items() if space not in k[1]}

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached: label lookups cost a lock and a dict per call."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found
