"""Honest signals while Kafka is away (issue 20, items 9 and 10), on a private broker that the
test stops and starts again (deploy/kafka/kafka.sh on free ports; the shared broker is never
touched): /readyz turns false and back, the lag series go absent and come back, and a role
whose topics do not exist on a fresh broker stops with exit 78."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from consumer import constants as c
from consumer.config import Settings, load_settings
from consumer.kafka_topics import ensure_topics, wait_for_broker
from consumer.topics import plan
from tests.conftest import KAFKA_SCRIPT, LOOPBACK, start_roles, stop_roles
from tests.support import free_port, unique, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


class PrivateBroker:
    def __init__(self, tmp: Path) -> None:
        port = free_port()
        self.bootstrap = f"127.0.0.1:{port}"
        self.env = {**os.environ, "KAFKA_PORT": str(port), "KAFKA_CONTROLLER_PORT": str(free_port()),
                    "KAFKA_DIR": str(tmp), "KAFKA_HEAP": "384m"}

    def run(self, action: str) -> None:
        subprocess.run([str(KAFKA_SCRIPT), action], env=self.env, check=True, timeout=90,
                       stdout=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBroker]:
    broker = PrivateBroker(tmp_path_factory.mktemp("private-kafka"))
    broker.run("start")
    try:
        wait_for_broker(broker.bootstrap, 30)
        yield broker
    finally:
        subprocess.run([str(KAFKA_SCRIPT), "stop"], env=broker.env, check=False, timeout=60)


def test_a_fresh_broker_stops_the_history_role_with_exit_78_naming_its_topics(
    broker: PrivateBroker, tmp_path: Path
) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PERKAMO_")},
        "PERKAMO_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
        "PERKAMO_DATA_DIR": str(tmp_path),
        "PERKAMO_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
    }
    done = subprocess.run([sys.executable, "-m", "consumer", "run", "--role", "history"], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 78, done.stderr[-2000:]
    sentence = next(line for line in done.stderr.splitlines() if " ERROR " in line)
    for name in (c.ATTEMPTS_TOPIC, c.REDELIVER_TOPIC, c.ENDPOINTS_TOPIC):
        assert name in sentence
    assert "`perkamo-webhooks topics`" in sentence and "Traceback" not in done.stderr


async def ready(session: aiohttp.ClientSession, settings: Settings) -> dict[str, Any]:
    """Both roles' /readyz: {role: (status, checks)}."""
    out = {}
    for role, (host, port) in (("history", settings.admin_host_port),
                               ("deliver", settings.deliver_host_port(0))):
        async with session.get(f"http://{host}:{port}/readyz") as response:
            out[role] = (response.status, (await response.json())["checks"])
    return out


def lag_series(app: Any) -> int:
    """How many consumer-lag series each role exports now (deliver, history)."""
    def count(metrics: Any) -> int:
        return sum(len(m.samples) for m in metrics.registry.collect()
                   if m.name == "perkamo_webhook_consumer_lag")
    return count(app.deliver.metrics) + 1000 * count(app.history.metrics)


async def test_readiness_and_lag_series_follow_the_broker_down_and_back(
    broker: PrivateBroker, store: Any, tmp_path: Path
) -> None:
    events = unique("perkamo.events.outage")
    settings = load_settings(
        kafka_bootstrap_servers=broker.bootstrap, events_topics=[events], retry_tiers=["1s", "2s"],
        group_id=unique("outage"), history_group_id=unique("outage-history"), data_dir=tmp_path,
        allow_private_networks=LOOPBACK, admin_listen=f"127.0.0.1:{free_port()}",
        deliver_admin_listen=f"127.0.0.1:{free_port()}", lag_interval_s=0.5,
        history_flush_interval_s=0.2, commit_interval_s=0.2, drain_timeout_s=3.0,
    )
    specs, _ = plan(settings, partitions=1, retention_hours=None)
    ensure_topics(broker.bootstrap, [(s.name, s.partitions, s.config) for s in specs])
    app = await start_roles(settings, store)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            async def all_ready() -> bool:
                return all(status == 200 for status, _ in (await ready(session, settings)).values())

            async def none_ready() -> bool:
                states = await ready(session, settings)
                return all(status == 503 and not checks["broker"] for status, checks in states.values())

            await wait_for(all_ready, timeout=60, what="both roles ready")
            await wait_for(lambda: lag_series(app) >= 1001, timeout=20, what="lag series of both roles")

            await asyncio.to_thread(broker.run, "stop")
            stopped = time.monotonic()
            await wait_for(none_ready, timeout=20, what="/readyz false without a broker")
            went_unready_s = time.monotonic() - stopped
            # Unknown, not frozen: the series go (the alerts' absent() fires on them).
            await wait_for(lambda: lag_series(app) == 0, timeout=20, what="lag series absent")

            await asyncio.to_thread(broker.run, "start")
            started = time.monotonic()
            await wait_for(all_ready, timeout=60, what="both roles ready again")
            back_ready_s = time.monotonic() - started
            await wait_for(lambda: lag_series(app) >= 1001, timeout=30, what="lag series back")
        print(f"not ready {went_unready_s:.1f}s after the stop; ready {back_ready_s:.1f}s after the start")
    finally:
        await asyncio.wait_for(stop_roles(app), 60)
