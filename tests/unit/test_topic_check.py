"""consumer.topic_check.problems: what stops a role from starting, said once, naming the fix."""

from __future__ import annotations

import pytest

from consumer import constants as c
from consumer.budget import budget_of
from consumer.config import Settings, load_settings
from consumer.kafka_admin import TopicState
from consumer.topic_check import problems, role_topics

COMMAND = "`perkamo-webhooks topics`"


@pytest.fixture
def settings() -> Settings:
    return load_settings(events_topics=["shop.events"], retry_tiers=["10s", "1m"])


def healthy(settings: Settings, role: str, size: int | None = None) -> TopicState:
    size = size or budget_of(settings.max_payload_bytes).message_max_bytes
    names = role_topics(settings, role)
    configs = {name: {"max.message.bytes": str(size), "cleanup.policy": "delete"} for name in names}
    configs[c.ENDPOINTS_TOPIC]["cleanup.policy"] = "compact"
    return TopicState(dict.fromkeys(names, 1), configs)


def test_each_role_lists_what_it_reads_and_writes(settings: Settings) -> None:
    deliver = role_topics(settings, "deliver")
    assert deliver == ["shop.events", c.REDELIVER_TOPIC, "perkamo.webhooks.retry.10s",
                       "perkamo.webhooks.retry.1m", c.HELD_TOPIC, c.DLQ_TOPIC, c.ATTEMPTS_TOPIC,
                       c.OPERATIONAL_TOPIC, c.ENDPOINTS_TOPIC]
    assert role_topics(settings, "history") == [c.ATTEMPTS_TOPIC, c.REDELIVER_TOPIC, c.ENDPOINTS_TOPIC]


@pytest.mark.parametrize("role", ["deliver", "history"])
def test_all_present_at_the_budget_passes(settings: Settings, role: str) -> None:
    budget = budget_of(settings.max_payload_bytes).message_max_bytes
    assert problems(settings, role, healthy(settings, role), budget) == []


@pytest.mark.parametrize("role", ["deliver", "history"])
def test_missing_topics_are_named_once_with_the_command(settings: Settings, role: str) -> None:
    state = healthy(settings, role)
    gone = [c.REDELIVER_TOPIC, c.ATTEMPTS_TOPIC]
    for name in gone:
        del state.replicas[name]
    found = problems(settings, role, state, budget_of(settings.max_payload_bytes).message_max_bytes)
    assert len(found) == 1
    assert f"topics {c.ATTEMPTS_TOPIC}, {c.REDELIVER_TOPIC}" in found[0] or \
        f"topics {c.REDELIVER_TOPIC}, {c.ATTEMPTS_TOPIC}" in found[0]
    assert COMMAND in found[0] and f"the {role} role" in found[0]


def test_a_registry_topic_that_is_not_compacted_is_refused(settings: Settings) -> None:
    state = healthy(settings, "history")
    state.configs[c.ENDPOINTS_TOPIC]["cleanup.policy"] = "delete"
    found = problems(settings, "history", state, budget_of(settings.max_payload_bytes).message_max_bytes)
    assert len(found) == 1 and "cleanup.policy=delete" in found[0] and "compact" in found[0]
    state.configs[c.ENDPOINTS_TOPIC]["cleanup.policy"] = "compact,delete"
    assert problems(settings, "history", state, budget_of(settings.max_payload_bytes).message_max_bytes) == []


def test_max_message_bytes_at_the_budget_passes_and_one_byte_under_does_not(settings: Settings) -> None:
    budget = budget_of(settings.max_payload_bytes).message_max_bytes
    state = healthy(settings, "deliver")
    state.configs[c.DLQ_TOPIC]["max.message.bytes"] = str(budget - 1)
    found = problems(settings, "deliver", state, budget)
    assert len(found) == 1 and c.DLQ_TOPIC in found[0] and COMMAND in found[0]
    state.configs[c.HELD_TOPIC]["max.message.bytes"] = "1048588"  # the broker's default
    found = problems(settings, "deliver", state, budget)
    assert len(found) == 1 and c.DLQ_TOPIC in found[0] and c.HELD_TOPIC in found[0]
    assert "1,048,588" in found[0]


def test_a_producer_below_the_budget_names_the_setting(settings: Settings) -> None:
    budget = budget_of(settings.max_payload_bytes).message_max_bytes
    assert problems(settings, "deliver", healthy(settings, "deliver"), budget) == []
    found = problems(settings, "deliver", healthy(settings, "deliver"), budget - 1)
    assert len(found) == 1 and "PERKAMO_KAFKA_MESSAGE_MAX_BYTES" in found[0]


def test_every_problem_is_reported_together(settings: Settings) -> None:
    state = healthy(settings, "deliver", size=1_000_000)
    del state.replicas["shop.events"]
    state.configs[c.ENDPOINTS_TOPIC]["cleanup.policy"] = "delete"
    assert len(problems(settings, "deliver", state, 1_000_000)) == 4
