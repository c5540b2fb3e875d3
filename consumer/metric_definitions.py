"""Every metric this service exports: its name, kind, help text and labels, in one table.

The single list `consumer.metrics.Metrics` creates, and that the dashboard and alert-rule
tests check against (docs/operations.md describes them).
"""

from __future__ import annotations

from typing import Final

PREFIX: Final = "perkamo_webhook_"

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Network steps are shorter than whole attempts: from 1 ms.
_PHASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_BUCKETS: Final = {"attempt_phase_seconds": _PHASE_BUCKETS}

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
    "attempt_phase_seconds": (
        "histogram",
        "Where attempts' time went, by step: dns, connect, tls (new connections only) and ttfb "
        "(connection ready to the response's head).",
        ("phase",),
    ),
    "attempt_connections_total": (
        "counter",
        "Attempts by whether they reused a kept-alive connection (reused=true) or opened one.",
        ("reused",),
    ),
    "endpoint_cert_expiry_seconds": (
        "gauge",
        "Seconds until the Space's endpoint TLS certificate expires (its notAfter, as seen on "
        "this process's latest new connection); negative once expired.",
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
    "kafka_writes_waiting": (
        "gauge",
        "Messages this process keeps trying to publish because Kafka cannot take them now "
        "(brokers down, a leader moving, a missing topic); their offsets stay uncommitted.",
        (),
    ),
    "kafka_write_retries_total": (
        "counter",
        "Publishes tried again after Kafka failed to take them, per topic.",
        ("topic",),
    ),
    "unpublishable_total": (
        "counter",
        "Messages Kafka refused for their size or form, dead-lettered as a stub instead, per "
        "topic they were meant for.",
        ("topic",),
    ),
    "kafka_reachable": (
        "gauge",
        "1 while this process's last round trip to Kafka is at most 10 s old, 0 while "
        "Kafka does not answer (its /readyz is false then).",
        (),
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
    "gc_pause_seconds_total": (
        "counter",
        "Time spent in Python's cyclic garbage collector, by generation (0, 1, 2).",
        ("generation",),
    ),
    "republished_total": (
        "counter",
        "Deliveries re-published by an operator, by trigger (resend, replay).",
        ("trigger",),
    ),
}


def buckets_of(short: str) -> tuple[float, ...]:
    """The histogram buckets of metric `short`."""
    return _BUCKETS.get(short, _DURATION_BUCKETS)


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
