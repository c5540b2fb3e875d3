"""The topics this service uses, with their settings (`perkamo-webhooks topics`)."""

from __future__ import annotations

from dataclasses import dataclass

from consumer import constants as c
from consumer.budget import budget_of
from consumer.config import Settings
from consumer.retry_policy import schedule_span_s, tier_topic

DAY_MS = 86_400_000
# A retry message must outlive its wait: keep it for the longest tier plus this slack.
RETENTION_SLACK = 2.0
MIN_INSYNC = 2


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def plan(
    settings: Settings, partitions: int, retention_hours: float | None
) -> tuple[list[TopicSpec], list[str]]:
    """Every topic with its config, and warnings (e.g. retention shorter than a tier)."""
    longest_ms = int(max(seconds for _, seconds in settings.tier_seconds) * 1000)
    default_ms = max(7 * DAY_MS, int(longest_ms * RETENTION_SLACK) + DAY_MS)
    retention_ms = int(retention_hours * 3_600_000) if retention_hours else default_ms
    warnings = []
    if retention_ms < longest_ms * RETENTION_SLACK:
        warnings.append(
            f"retention {retention_ms / 3_600_000:.1f}h is shorter than {RETENTION_SLACK:g}x the longest "
            f"retry tier ({longest_ms / 3_600_000:.1f}h): waiting retries could be deleted before "
            "they are due"
        )
    # Every topic takes the largest message the service may write (consumer.budget); `topics`
    # sets it on existing topics too, and each role reads it back at start-up.
    # min.insync.replicas: with acks=all, two copies of every write; the topic creation caps it
    # at each topic's replica count (kafka_topics.ensure_topics), so it is min(2, replicas).
    size = {
        "max.message.bytes": str(budget_of(settings.max_payload_bytes).message_max_bytes),
        "min.insync.replicas": str(MIN_INSYNC),
    }
    keep = {"retention.ms": str(retention_ms), "cleanup.policy": "delete", **size}
    specs = [TopicSpec(topic, partitions, keep) for topic in settings.events_topics]
    specs += [TopicSpec(tier_topic(name), partitions, keep) for name, _ in settings.tier_seconds]
    # A held delivery may wait out the schedule's whole span on the held topic.
    span_ms = int(schedule_span_s(settings.tier_seconds) * 1000)
    held_ms = max(retention_ms, int(span_ms * RETENTION_SLACK))
    specs.append(TopicSpec(c.HELD_TOPIC, partitions, {**keep, "retention.ms": str(held_ms)}))
    specs.append(
        TopicSpec(c.DLQ_TOPIC, partitions, {**keep, "retention.ms": str(max(retention_ms, 30 * DAY_MS))})
    )
    # Resends and replays: written only by the service (its perkamo-* headers are trusted).
    specs.append(TopicSpec(c.REDELIVER_TOPIC, partitions, keep))
    specs.append(TopicSpec(c.OPERATIONAL_TOPIC, partitions, keep))
    # The history role may be stopped for a while: its records wait here (7 days by default).
    specs.append(TopicSpec(c.ATTEMPTS_TOPIC, partitions, keep))
    compacted = {"cleanup.policy": "compact", "min.compaction.lag.ms": "0", **size}
    specs.append(TopicSpec(c.ENDPOINTS_TOPIC, 1, compacted))
    return specs, warnings

