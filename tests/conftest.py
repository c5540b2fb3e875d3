"""Fixtures: one real Kafka broker per session (or KAFKA_BOOTSTRAP_SERVERS), one embedded
ClickHouse path per test process (chDB opens one path per process), a test CA, scripted HTTPS
receivers on loopback, and in-process consumer services."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme

from consumer import constants as c
from consumer.config import Settings, load_settings
from consumer.deliver_role import DeliverRole, build_deliver, serve_deliver
from consumer.history import HistoryStore
from consumer.history_role import HistoryRole, build_history, serve_history
from consumer.kafka_topics import ensure_topics, wait_for_broker
from consumer.metrics import Metrics
from consumer.topics import plan
from tests.support import ScriptedReceiver, fast_forward_group, free_port, unique

REPO = Path(__file__).resolve().parent.parent
KAFKA_SCRIPT = REPO / "deploy" / "kafka" / "kafka.sh"
LOOPBACK = ["127.0.0.0/8", "::1/128"]
# Short tiers everywhere in tests; the retry topics exist once per broker.
TEST_TIERS = ["1s", "2s", "4s"]


_BROKER_ENV: dict[str, str] = {}


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        wait_for_broker(external, 30)
        yield external
        return
    port = free_port()
    env = {
        **os.environ,
        "KAFKA_PORT": str(port),
        "KAFKA_CONTROLLER_PORT": str(free_port()),
        "KAFKA_DIR": str(tmp_path_factory.mktemp("kafka")),
    }
    subprocess.run([str(KAFKA_SCRIPT), "start"], env=env, check=True)
    _BROKER_ENV.update(env)
    bootstrap = f"127.0.0.1:{port}"
    try:
        wait_for_broker(bootstrap, 30)
        yield bootstrap
    finally:
        subprocess.run([str(KAFKA_SCRIPT), "stop"], env=env, check=False)


@pytest.fixture(scope="session")
def kafka_env(kafka: str) -> dict[str, str]:
    """The environment that restarts the session's own broker with `deploy/kafka/kafka.sh stop|start`
    (same port, same data dir); empty when the broker is external (restart tests then skip)."""
    return dict(_BROKER_ENV)


@pytest.fixture(scope="session")
def promtool() -> str:
    """promtool (Debian's `prometheus` package): required in CI, skipped without it locally."""
    path = shutil.which("promtool")
    if path is None:
        message = "promtool not found: apt-get install prometheus (Debian), or deploy/install-tools.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def history_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("history")


@pytest.fixture(scope="session")
def store(history_path: Path) -> HistoryStore:
    st = HistoryStore(f"chdb://{history_path}")
    st.migrate(90)
    return st


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
async def receiver(ca: trustme.CA) -> AsyncIterator[ScriptedReceiver]:
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1", "::1").configure_cert(context)
    rec = ScriptedReceiver(context)
    await rec.start()
    yield rec
    await rec.stop()


@pytest.fixture
def topics(kafka: str) -> dict[str, Any]:
    """A fresh events topic (3 partitions) and the shared retry/DLQ topics."""
    events = unique("perkamo.events.test")
    settings = load_settings(kafka_bootstrap_servers=kafka, events_topics=[events], retry_tiers=TEST_TIERS)
    specs, _ = plan(settings, partitions=3, retention_hours=None)
    ensure_topics(kafka, [(s.name, s.partitions, s.config) for s in specs])
    # "retry": the topics every test's group shares (the tiers, held and redeliver), which a new
    # group fast-forwards past earlier tests' messages.
    shared = [s.name for s in specs if ".retry." in s.name or s.name in (c.HELD_TOPIC, c.REDELIVER_TOPIC)]
    return {"events": events, "retry": shared}


@dataclass
class App:
    """Both roles of one service, in this process and this event loop: the deliver role (no
    store) and the history role (the session's embedded store). `service`, `metrics` and
    `registry` are the deliver role's; `store` and the history API are the history role's."""

    deliver: DeliverRole
    history: HistoryRole
    tasks: list[asyncio.Task[None]]

    @property
    def settings(self) -> Settings:
        return self.deliver.settings

    @property
    def service(self) -> Any:
        return self.deliver.service

    @property
    def metrics(self) -> Metrics:
        return self.deliver.metrics

    @property
    def registry(self) -> Any:
        return self.deliver.registry

    @property
    def store(self) -> HistoryStore:
        return self.history.store

    @property
    def follower(self) -> Any:
        return self.deliver.follower


async def start_roles(settings: Settings, store: HistoryStore) -> App:
    """Start the history role and the deliver role; returns once both are assigned. Their
    topics are created first, as `perkamo-webhooks topics` would (each role checks them)."""
    specs, _ = plan(settings, partitions=3, retention_hours=None)
    await asyncio.to_thread(ensure_topics, settings, [(s.name, s.partitions, s.config) for s in specs])
    history = build_history(settings, store=store, metrics=Metrics())
    deliver = build_deliver(settings, metrics=Metrics())
    deliver.tune_gc = False  # one process for both roles and the test: leave its GC alone
    tasks = [
        asyncio.create_task(serve_history(history, install_signals=False)),
        asyncio.create_task(serve_deliver(deliver, install_signals=False)),
    ]
    app = App(deliver, history, tasks)
    await asyncio.wait_for(_assigned(app), 30)
    return app


async def stop_roles(app: App) -> None:
    """Drain the deliver role first (its records are the history role's input), then history."""
    app.deliver.stop()
    await asyncio.wait_for(app.tasks[1], 30)
    app.history.stop()
    await asyncio.wait_for(app.tasks[0], 30)


class Harness:
    """Builds settings and runs in-process services for one test."""

    def __init__(
        self, kafka: str, store: HistoryStore, ca_file: Path, topics: dict[str, Any], tmp_path: Path
    ) -> None:
        self.kafka = kafka
        self.store = store
        self.ca_file = ca_file
        self.topics = topics
        self.tmp_path = tmp_path
        self.group = unique("group")
        self.running: list[App] = []
        fast_forward_group(kafka, self.group, topics["retry"])
        fast_forward_group(kafka, self.group + "-history", [c.ATTEMPTS_TOPIC])

    @property
    def events_topic(self) -> str:
        return str(self.topics["events"])

    def endpoints_file(self, records: list[dict[str, Any]]) -> Path:
        path = self.tmp_path / f"endpoints-{unique('f')}.json"
        path.write_bytes(orjson.dumps(records))
        return path

    def settings(self, endpoints: list[dict[str, Any]] | None = None, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "kafka_bootstrap_servers": self.kafka,
            "events_topics": [self.events_topic],
            "group_id": self.group,
            "history_group_id": self.group + "-history",
            "data_dir": self.tmp_path,
            "retry_tiers": TEST_TIERS,
            "allow_private_networks": LOOPBACK,
            "ca_bundle": self.ca_file,
            "admin_listen": f"127.0.0.1:{free_port()}",
            "deliver_admin_listen": f"127.0.0.1:{free_port()}",
            "delivery_timeout_s": 2.0,
            "history_flush_interval_s": 0.2,
            "commit_interval_s": 0.2,
            "drain_timeout_s": 5.0,
        }
        if endpoints is not None:
            values["endpoints_file"] = self.endpoints_file(endpoints)
        values.update(overrides)
        return load_settings(**values)

    async def start(self, settings: Settings) -> App:
        app = await start_roles(settings, self.store)
        self.running.append(app)
        return app

    async def stop(self, app: App) -> None:
        if app in self.running:
            self.running.remove(app)
            await stop_roles(app)

    async def stop_all(self) -> None:
        for app in list(self.running):
            with contextlib.suppress(Exception):
                await stop_roles(app)
        self.running.clear()


async def _assigned(app: App) -> None:
    while not (app.service.assigned_once and app.history.ingest.assigned_once):
        for task in app.tasks:
            if task.done():
                task.result()
        await asyncio.sleep(0.05)


@pytest.fixture
async def harness(
    kafka: str, store: HistoryStore, ca_file: Path, topics: dict[str, Any], tmp_path: Path
) -> AsyncIterator[Harness]:
    h = Harness(kafka, store, ca_file, topics, tmp_path)
    yield h
    await h.stop_all()


BROKER_FIXTURES = frozenset({"kafka", "kafka_env", "fault_env", "harness", "topics"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that needs a Kafka broker (through any of its fixtures) is `integration`, so
    `pytest -m "not integration"` runs without one."""
    for item in items:
        if BROKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
