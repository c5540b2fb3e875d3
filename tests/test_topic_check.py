"""Topics are checked at start-up, never waited for (issue 20, item 9), and `topics` keeps
max.message.bytes and min.insync.replicas in step; on the real broker (auto-create on)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from consumer import constants as c
from consumer.budget import budget_of
from consumer.config import load_settings
from consumer.topic_check import check_topics
from tests.support import free_port, unique

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
BUDGET = budget_of(load_settings().max_payload_bytes).message_max_bytes
TOO_SMALL = 1_000_000


def cli(kafka: str, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PERKAMO_")},
        "PERKAMO_KAFKA_BOOTSTRAP_SERVERS": kafka,
        "PERKAMO_DATA_DIR": str(tmp_path / "data"),
        "PERKAMO_GROUP_ID": unique("check"),
        "PERKAMO_HISTORY_GROUP_ID": unique("check-history"),
        "PERKAMO_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
        "PERKAMO_DELIVER_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
        **env,
    }
    return subprocess.run([sys.executable, "-m", "consumer", *args], env=environ, cwd=REPO,
                          capture_output=True, text=True, timeout=90, check=False)


def broker_configs(kafka: str, names: list[str]) -> dict[str, dict[str, str]]:
    admin = AdminClient({"bootstrap.servers": kafka})
    futures = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, n) for n in names])
    return {res.name: {k: v.value for k, v in fut.result(15).items()} for res, fut in futures.items()}


def topics_of(kafka: str) -> set[str]:
    return set(AdminClient({"bootstrap.servers": kafka}).list_topics(timeout=15).topics)


def test_a_missing_events_topic_stops_the_deliver_role_with_exit_78_and_is_not_created(
    kafka: str, tmp_path: Path, topics: dict[str, object]
) -> None:
    missing = unique("perkamo.events.missing")
    done = cli(kafka, tmp_path, "run", "--role", "deliver", PERKAMO_EVENTS_TOPICS=missing,
               PERKAMO_RETRY_TIERS="1s,2s,4s")
    assert done.returncode == 78, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, done.stderr[-2000:]  # one sentence, no traceback
    assert missing in errors[0] and "`perkamo-webhooks topics`" in errors[0]
    assert "Traceback" not in done.stderr
    assert missing not in topics_of(kafka)  # the check never creates it, auto-create or not


def test_a_topic_smaller_than_the_budget_stops_start_up_until_topics_sets_it(
    kafka: str, tmp_path: Path, topics: dict[str, object]
) -> None:
    events = unique("perkamo.events.small")
    admin = AdminClient({"bootstrap.servers": kafka})
    for fut in admin.create_topics([NewTopic(events, 2, 1, config={
            "max.message.bytes": str(TOO_SMALL)})]).values():
        fut.result(30)
    env = {"PERKAMO_EVENTS_TOPICS": events, "PERKAMO_RETRY_TIERS": "1s,2s,4s"}

    done = cli(kafka, tmp_path, "run", "--role", "deliver", **env)
    assert done.returncode == 78, done.stderr[-2000:]
    assert f"topic {events} takes messages up to {TOO_SMALL:,} bytes" in done.stderr
    assert f"{BUDGET:,}" in done.stderr and "`perkamo-webhooks topics`" in done.stderr

    done = cli(kafka, tmp_path, "topics", "--partitions", "2", "--retention-hours", "200", **env)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = {line.split()[0]: line for line in done.stdout.splitlines()}
    assert "exists" in lines[events]
    for name in (events, c.REDELIVER_TOPIC, c.ATTEMPTS_TOPIC, c.ENDPOINTS_TOPIC):
        assert f"max.message.bytes={BUDGET}" in lines[name], lines[name]
        assert "min.insync.replicas=1" in lines[name], lines[name]  # min(2, 1 replica)
    # Read back from the broker, not from what `topics` printed.
    configs = broker_configs(kafka, [events, c.DLQ_TOPIC, c.ENDPOINTS_TOPIC])
    for name, config in configs.items():
        assert config["max.message.bytes"] == str(BUDGET), name
        assert config["min.insync.replicas"] == "1", name
    # An incremental alter: the plan's retention (a different value) is not forced on it.
    assert configs[events]["retention.ms"] == "604800000"
    assert configs[c.ENDPOINTS_TOPIC]["cleanup.policy"] == "compact"

    settings = load_settings(kafka_bootstrap_servers=kafka, events_topics=[events],
                             retry_tiers=["1s", "2s", "4s"])
    check_topics(settings, "deliver")
    check_topics(settings, "history")


def test_a_producer_allowed_less_than_the_budget_stops_start_up(
    kafka: str, tmp_path: Path, topics: dict[str, object]
) -> None:
    done = cli(kafka, tmp_path, "run", "--role", "history", PERKAMO_KAFKA_MESSAGE_MAX_BYTES=str(TOO_SMALL),
               PERKAMO_EVENTS_TOPICS=str(topics["events"]))
    assert done.returncode == 78, done.stderr[-2000:]
    assert "PERKAMO_KAFKA_MESSAGE_MAX_BYTES is 1,000,000" in done.stderr
