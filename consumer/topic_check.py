"""The start-up check of each role's topics (docs/operations.md, "Topics").

Before a role consumes or publishes anything it asks the broker for every topic it reads or
writes: each must exist (a topic created on first use by a broker's auto-create gets the
broker's defaults: one partition, the default size limit, no compaction), the endpoint
registry must be compacted, and each topic's `max.message.bytes` and the producer's
`message.max.bytes` must take the size budget's largest message (consumer.budget). Any
failure is a ConfigError: the role exits 78 with one sentence naming the topics and the
command that mends them, `perkamo-webhooks topics`.
"""

from __future__ import annotations

import logging

from consumer import constants as c
from consumer.budget import LIBRDKAFKA_DEFAULT_MAX, budget_of
from consumer.config import Settings
from consumer.errors import ConfigError
from consumer.kafka_admin import TopicState, topic_state
from consumer.kafka_io import producer_config
from consumer.retry_policy import tier_topic

log = logging.getLogger(__name__)

COMMAND = "`perkamo-webhooks topics`"


def role_topics(settings: Settings, role: str) -> list[str]:
    """Every topic the role reads or writes, in a stable order."""
    if role == "deliver":
        tiers = [tier_topic(name) for name, _ in settings.tier_seconds]
        names = [*settings.events_topics, c.REDELIVER_TOPIC, *tiers, c.HELD_TOPIC, c.DLQ_TOPIC,
                 c.ATTEMPTS_TOPIC, c.OPERATIONAL_TOPIC, c.ENDPOINTS_TOPIC]
    elif role == "history":
        # It reads the attempts and the registry; it writes resends and replays (redeliver)
        # and endpoint records (the console).
        names = [c.ATTEMPTS_TOPIC, c.REDELIVER_TOPIC, c.ENDPOINTS_TOPIC]
    else:
        raise ValueError(f"no such role: {role}")
    return list(dict.fromkeys(names))


def producer_max_bytes(settings: Settings) -> int:
    """The producer's message.max.bytes as configured (PERKAMO_KAFKA_MESSAGE_MAX_BYTES wins)."""
    value = producer_config(settings).get("message.max.bytes", LIBRDKAFKA_DEFAULT_MAX)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"PERKAMO_KAFKA_MESSAGE_MAX_BYTES must be a whole number of bytes, "
                          f"not {value!r}") from None


def problems(settings: Settings, role: str, state: TopicState, producer_max: int) -> list[str]:
    """What stops the role from starting, one sentence each (empty: it may start)."""
    budget = budget_of(settings.max_payload_bytes)
    names = role_topics(settings, role)
    found: list[str] = []
    missing = [name for name in names if not state.exists(name)]
    if missing:
        found.append(
            f"the {role} role reads or writes {_listed(missing)}, which "
            f"{'does' if len(missing) == 1 else 'do'} not exist: run {COMMAND} with the same "
            "settings to create every topic, then start the role again"
        )
    registry = state.configs.get(c.ENDPOINTS_TOPIC, {})
    policy = registry.get("cleanup.policy", "")
    if state.exists(c.ENDPOINTS_TOPIC) and "compact" not in policy.split(","):
        found.append(
            f"topic {c.ENDPOINTS_TOPIC} has cleanup.policy={policy or '?'}, but the endpoint "
            "registry must be compacted (each Space's latest record is its endpoint): set "
            f"cleanup.policy=compact on it, or delete it and run {COMMAND}"
        )
    small = {name: int(state.configs.get(name, {}).get("max.message.bytes", "0") or 0)
             for name in names if state.exists(name)}
    small = {name: size for name, size in small.items() if size < budget.message_max_bytes}
    if len(small) == 1:
        (name, size), = small.items()
        found.append(str(budget.topic_problem(name, size)))
    elif small:
        sizes = ", ".join(f"{name} ({size:,})" for name, size in small.items())
        found.append(
            f"topics {sizes} take smaller messages (max.message.bytes) than PERKAMO_MAX_PAYLOAD_BYTES "
            f"({budget.max_event_bytes:,}) needs ({budget.message_max_bytes:,}): run {COMMAND} "
            "to set it, or lower PERKAMO_MAX_PAYLOAD_BYTES"
        )
    producer = budget.producer_problem(producer_max)
    if producer is not None:
        found.append(producer)
    return found


def check_topics(settings: Settings, role: str, timeout: float = 15.0) -> None:
    """Raise ConfigError (exit 78) naming what is wrong with the role's topics; never creates one."""
    state = topic_state(settings, role_topics(settings, role), timeout)
    found = problems(settings, role, state, producer_max_bytes(settings))
    if found:
        raise ConfigError("; and ".join(found))
    log.info("topics checked: %d topics of the %s role exist and take %s-byte messages",
             len(state.replicas), role, f"{budget_of(settings.max_payload_bytes).message_max_bytes:,}")


def _listed(names: list[str]) -> str:
    return f"topic {names[0]}" if len(names) == 1 else f"topics {', '.join(names)}"
