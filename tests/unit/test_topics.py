"""consumer.topics.plan: every topic the service needs, with its config."""

from __future__ import annotations

import pytest

from consumer import constants as c
from consumer.config import Settings, load_settings
from consumer.topics import DAY_MS, TopicSpec, plan

HOUR_MS = 3_600_000


@pytest.fixture
def settings() -> Settings:
    return load_settings()


def by_name(specs: list[TopicSpec]) -> dict[str, TopicSpec]:
    return {spec.name: spec for spec in specs}


def test_every_tier_has_a_topic(settings: Settings) -> None:
    specs, _ = plan(settings, partitions=6, retention_hours=None)
    names = [spec.name for spec in specs]
    for tier in ["10s", "1m", "10m", "1h", "6h", "24h"]:
        assert f"perkamo.webhooks.retry.{tier}" in names
    assert len(names) == len(set(names))


def test_events_dlq_and_endpoints_topics(settings: Settings) -> None:
    topics = by_name(plan(settings, partitions=6, retention_hours=None)[0])
    assert topics[c.EVENTS_TOPIC].partitions == 6
    assert topics[c.DLQ_TOPIC].partitions == 6
    assert topics[c.DLQ_TOPIC].config["cleanup.policy"] == "delete"
    endpoints = topics[c.ENDPOINTS_TOPIC]
    assert endpoints.partitions == 1
    assert endpoints.config["cleanup.policy"] == "compact"
    assert "retention.ms" not in endpoints.config


def test_all_configured_event_topics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERKAMO_EVENTS_TOPICS", "a.events,b.events")
    topics = by_name(plan(load_settings(), partitions=3, retention_hours=None)[0])
    assert {"a.events", "b.events"} <= set(topics)
    assert c.EVENTS_TOPIC not in topics


def test_default_retention_outlives_the_longest_tier(settings: Settings) -> None:
    specs, warnings = plan(settings, partitions=1, retention_hours=None)
    assert warnings == []
    for spec in specs:
        if spec.name.startswith(c.RETRY_TOPIC_PREFIX):
            assert int(spec.config["retention.ms"]) >= 2 * 24 * HOUR_MS
            assert int(spec.config["retention.ms"]) >= 7 * DAY_MS


def test_dlq_keeps_at_least_thirty_days(settings: Settings) -> None:
    topics = by_name(plan(settings, partitions=1, retention_hours=24)[0])
    assert int(topics[c.DLQ_TOPIC].config["retention.ms"]) == 30 * DAY_MS
    assert int(topics["perkamo.webhooks.retry.1h"].config["retention.ms"]) == 24 * HOUR_MS


@pytest.mark.parametrize("hours", [1, 24, 47.9])
def test_retention_shorter_than_twice_the_longest_tier_warns(
    settings: Settings, hours: float
) -> None:
    _, warnings = plan(settings, partitions=1, retention_hours=hours)
    assert len(warnings) == 1
    assert "24.0h" in warnings[0]


@pytest.mark.parametrize("hours", [48, 24 * 7])
def test_retention_of_twice_the_longest_tier_is_fine(settings: Settings, hours: float) -> None:
    assert plan(settings, partitions=1, retention_hours=hours)[1] == []


def test_warning_follows_configured_tiers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERKAMO_RETRY_TIERS", "1s,2s,4s")
    specs, warnings = plan(load_settings(), partitions=1, retention_hours=1)
    assert warnings == []
    assert "perkamo.webhooks.retry.4s" in [spec.name for spec in specs]
    assert "perkamo.webhooks.retry.24h" not in [spec.name for spec in specs]


def test_every_topic_takes_the_size_budget_and_asks_two_in_sync_copies() -> None:
    from consumer.budget import budget_of

    settings = load_settings(max_payload_bytes=2_000_000)
    for spec in plan(settings, partitions=3, retention_hours=None)[0]:
        assert spec.config["max.message.bytes"] == str(budget_of(2_000_000).message_max_bytes), spec.name
        assert spec.config["min.insync.replicas"] == "2", spec.name


@pytest.mark.parametrize(("replicas", "expected"), [(1, "1"), (2, "2"), (3, "2"), (5, "2")])
def test_min_insync_replicas_is_capped_at_the_topics_replicas(replicas: int, expected: str) -> None:
    from consumer.kafka_topics import _capped

    capped = _capped({"min.insync.replicas": "2", "x": "y"}, replicas)
    assert capped == {"min.insync.replicas": expected, "x": "y"}
    assert _capped({"x": "y"}, replicas) == {"x": "y"}
