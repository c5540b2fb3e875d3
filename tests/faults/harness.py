"""Processes and Kafka plumbing for fault scenarios: consumers, receivers, publishers, a broker.

Everything here is synchronous: the consumers and the receivers are processes of their own,
so the orchestrating process only starts, signals, waits and reads.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import trustme
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from consumer import constants as c
from consumer.config import load_settings
from consumer.kafka_topics import ensure_topics
from consumer.retry_policy import parse_tiers, tier_topic
from consumer.topics import plan
from tests.faults.accounting import (
    Accounting,
    DeadLetter,
    Disruption,
    HistoryRow,
    InputMessage,
    Published,
    Receipt,
    evaluate,
)
from tests.faults.faulty_run import CONTROL_ENV
from tests.support import fast_forward_group, free_port, make_event, query_history_in_subprocess, unique

REPO = Path(__file__).resolve().parents[2]
KAFKA_SCRIPT = REPO / "deploy" / "kafka" / "kafka.sh"
LOOPBACK = "127.0.0.0/8,::1/128"
FUZZ_TAG = "x-fuzz-id"

TP = tuple[str, int]


def log(msg: str) -> None:
    print(f"[faults {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# Kafka ----------------------------------------------------------------------------------


def _client(bootstrap: str, group: str | None = None) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group or unique("faults-probe"),
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )


def partitions_of(consumer: Consumer, topics: Sequence[str]) -> list[TopicPartition]:
    meta = consumer.list_topics(timeout=15)
    return [TopicPartition(t, p) for t in topics for p in sorted(meta.topics[t].partitions)]


def end_offsets(bootstrap: str, topics: Sequence[str]) -> dict[TP, int]:
    consumer = _client(bootstrap)
    try:
        out = {}
        for tp in partitions_of(consumer, topics):
            deadline = time.monotonic() + 30
            while True:
                try:
                    out[(tp.topic, tp.partition)] = int(consumer.get_watermark_offsets(tp, timeout=10)[1])
                    break
                except KafkaException:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.3)
        return out
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, group: str, topics: Sequence[str]) -> dict[TP, int]:
    """The group's committed offsets (-1001 where none)."""
    consumer = _client(bootstrap, group)
    try:
        tps = consumer.committed(partitions_of(consumer, topics), timeout=15)
        return {(tp.topic, tp.partition): tp.offset for tp in tps}
    finally:
        consumer.close()


def read_messages(bootstrap: str, topics: Sequence[str], since: dict[TP, int]) -> list[Any]:
    """Every message of `topics` from the `since` offsets (0 where absent) to the current ends."""
    ends = end_offsets(bootstrap, topics)
    consumer = _client(bootstrap)
    out: list[Any] = []
    try:
        wanted = {tp: (since.get(tp, 0), end) for tp, end in ends.items() if end > since.get(tp, 0)}
        if not wanted:
            return out
        consumer.assign([TopicPartition(t, p, start) for (t, p), (start, _) in wanted.items()])
        left = set(wanted)
        deadline = time.monotonic() + 120
        while left and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is not None:
                    continue
                tp = (msg.topic(), msg.partition())
                out.append(msg)
                if msg.offset() >= wanted[tp][1] - 1:
                    left.discard(tp)
        if left:
            raise AssertionError(f"could not read {sorted(left)} to their ends")
        return out
    finally:
        consumer.close()


def header(msg: Any, name: str) -> bytes | None:
    value = None
    for k, v in msg.headers() or []:
        if k == name:
            value = v
    return value


def key_of(msg: Any) -> str:
    """A DLQ or retry message's scenario key: the fuzz tag, else the event id in the body."""
    tag = header(msg, FUZZ_TAG)
    if tag is not None:
        return tag.decode("utf-8", "replace")
    try:
        doc = orjson.loads(msg.value() or b"")
    except orjson.JSONDecodeError:
        return ""
    value = doc.get("id") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else ""


@dataclass
class Message:
    """A message to publish: `key` identifies it in the accounting (the event id, or a fuzz tag)."""

    key: str
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    attempt: int = 1
    expect: str = "either"
    reason: str = ""
    topic: str = ""  # the scenario's events topic unless set (e.g. the redeliver topic)


class Publisher:
    """Publishes to the scenario's events topic and records where each message landed."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.published: list[Published] = []
        self._lock = threading.Lock()
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "message.timeout.ms": 180000,
            }
        )

    def publish(self, messages: Iterable[Message], flush: bool = True) -> None:
        for m in messages:

            def done(err: Any, msg: Any, m: Message = m) -> None:
                if err is not None:
                    raise RuntimeError(f"publish of {m.key} failed: {err}")
                with self._lock:
                    self.published.append(
                        Published(
                            m.key, msg.topic(), msg.partition(), msg.offset(), m.attempt, m.expect, m.reason
                        )
                    )

            while True:
                try:
                    self._producer.produce(
                        m.topic or self.topic,
                        m.value,
                        key=m.key.encode()[:200],
                        headers=m.headers or None,
                        on_delivery=done,
                    )
                    break
                except BufferError:
                    self._producer.poll(0.05)
            self._producer.poll(0)
        if flush:
            self.flush()

    def flush(self) -> None:
        left = self._producer.flush(240)
        if left:
            raise AssertionError(f"{left} events not acknowledged by the broker")

    def stream(self, messages: Sequence[Message], seconds: float) -> threading.Thread:
        """Publish `messages` evenly over about `seconds`, in a thread."""

        def run() -> None:
            chunks = max(1, int(seconds * 10))
            size = max(1, -(-len(messages) // chunks))
            start = time.monotonic()
            for i in range(0, len(messages), size):
                self.publish(messages[i : i + size], flush=False)
                delay = start + (i // size + 1) * seconds / chunks - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            self.flush()

        thread = threading.Thread(target=run, name="publisher", daemon=True)
        thread.start()
        return thread


def events(space: str, count: int, expect: str = "either") -> list[Message]:
    out = []
    for n in range(count):
        doc = make_event(space, n)
        out.append(Message(doc["id"], orjson.dumps(doc), expect=expect))
    return out


# Processes ------------------------------------------------------------------------------


@dataclass
class FaultEnv:
    """What every scenario needs: a broker, a test CA, a receiver certificate, a work folder."""

    bootstrap: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    work: Path
    kafka_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        bootstrap: str,
        ca: trustme.CA,
        ca_file: Path,
        work: Path,
        kafka_env: dict[str, str] | None = None,
    ) -> FaultEnv:
        work.mkdir(parents=True, exist_ok=True)
        cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
        cert_file, key_file = work / "receiver-cert.pem", work / "receiver-key.pem"
        cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        key_file.write_bytes(cert.private_key_pem.bytes())
        return cls(bootstrap, ca_file, cert_file, key_file, work, dict(kafka_env or {}))

    def broker(self, action: str) -> None:
        if not self.kafka_env:
            raise RuntimeError("no broker environment: the broker is external")
        subprocess.run(
            [str(KAFKA_SCRIPT), action],
            env=self.kafka_env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


class ReceiverProc:
    """A `tests.faults.receiver` process; `receipts()` reads what it recorded so far."""

    def __init__(self, env: FaultEnv, folder: Path, routes: dict[str, dict[str, Any]], garbage: bool) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.out = folder / "receipts.jsonl"
        ready = folder / "ready.json"
        spec = {
            "cert": str(env.cert_file),
            "key": str(env.key_file),
            "out": str(self.out),
            "ready": str(ready),
            "routes": routes,
            "garbage": garbage,
        }
        (folder / "spec.json").write_bytes(orjson.dumps(spec))
        self._log = (folder / "receiver.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.receiver", str(folder / "spec.json")],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"receiver did not start: see {folder / 'receiver.log'}")
            time.sleep(0.05)
        info = orjson.loads(ready.read_bytes())
        self.port: int = info["port"]
        self.garbage_port: int | None = info.get("garbage_port")
        self._offset = 0
        self._seen: list[Receipt] = []

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def garbage_url(self, path: str = "/garbage") -> str:
        return f"https://127.0.0.1:{self.garbage_port}{path}"

    def receipts(self) -> list[Receipt]:
        if self.out.exists():
            with self.out.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
            complete = data.rfind(b"\n") + 1
            self._offset += complete
            self._seen += [
                Receipt.from_json(orjson.loads(line)) for line in data[:complete].splitlines() if line
            ]
        return self._seen

    def stop(self) -> list[Receipt]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.receipts()


ROLES = ("deliver", "history", "all")


def free_port_run(count: int) -> int:
    """A port p with p .. p + count - 1 all free (the deliver workers of `--workers N` listen on
    port + worker index)."""
    for _ in range(100):
        base = free_port()
        if base + count > 65535:
            continue
        ok = True
        for p in range(base + 1, base + count):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError(f"no {count} consecutive free ports")


class ConsumerProc:
    """One `perkamo-webhooks run --role R` process with its own data dir.

    - `deliver`: `metrics()`/`healthy()` on its PERKAMO_DELIVER_ADMIN_LISTEN;
    - `history`: on its PERKAMO_ADMIN_LISTEN; with `wrapper` it is `tests.faults.faulty_run` (the
      history role with the store fault hook);
    - `all`: the supervisor of one history child and `workers` deliver children; `metrics()` is
      deliver worker 0's, `history_metrics()` the history child's, `healthy()` asks every child.
    Every start picks free ports."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        folder: Path,
        role: str = "deliver",
        wrapper: bool = False,
        workers: int = 1,
    ) -> None:
        assert role in ROLES, role
        assert not wrapper or role == "history", "the fault hook wraps the history role only"
        self.name = name
        self.env = env
        self.folder = folder
        self.role = role
        self.wrapper = wrapper
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin = ""  # where metrics() reads: the deliver listener (worker 0), or history's
        self.history_admin = ""  # the history listener (history and all)
        self.probes: list[str] = []
        self.starts = 0
        self._logs: list[Any] = []

    @property
    def data_dir(self) -> Path:
        return Path(self.env["PERKAMO_DATA_DIR"])

    @property
    def has_history(self) -> bool:
        return self.role in ("history", "all")

    @property
    def delivers(self) -> bool:
        return self.role in ("deliver", "all")

    def command(self) -> list[str]:
        if self.wrapper:
            return [sys.executable, "-m", "tests.faults.faulty_run"]
        cmd = [sys.executable, "-m", "consumer", "run", "--role", self.role]
        return cmd + (["--workers", str(self.workers)] if self.role == "all" else [])

    def start(self) -> ConsumerProc:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        env = dict(self.env)
        self.probes = []
        if self.delivers:
            base = free_port_run(self.workers)
            env["PERKAMO_DELIVER_ADMIN_LISTEN"] = f"127.0.0.1:{base}"
            self.admin = f"127.0.0.1:{base}"
            self.probes += [f"127.0.0.1:{base + i}" for i in range(self.workers)]
        if self.has_history:
            self.history_admin = f"127.0.0.1:{free_port()}"
            env["PERKAMO_ADMIN_LISTEN"] = self.history_admin
            self.probes.append(self.history_admin)
            if not self.delivers:
                self.admin = self.history_admin
        else:  # never bind the default history port by accident
            env["PERKAMO_ADMIN_LISTEN"] = f"127.0.0.1:{free_port()}"
        log_file = (self.folder / f"{self.name}-{self.starts}.log").open("wb")
        self._logs.append(log_file)
        self.proc = subprocess.Popen(
            self.command(), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log_file
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def healthy(self) -> bool:
        """Every admin listener of the process answers: start-up is over and SIGTERM now means drain."""
        return all(_answers(f"http://{addr}/healthz") for addr in self.probes)

    def wait_healthy(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc is None or self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited during start-up:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not healthy after {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.2)

    def terminate(self, timeout: float = 120) -> tuple[int, float]:
        """Wait for start-up to finish, then SIGTERM; (exit code, seconds to exit). -9 if it had
        to be killed after `timeout`. (A SIGTERM during start-up, before the service installs its
        handler, ends the process with 0: nothing is in flight yet.)"""
        assert self.proc is not None
        deadline = time.monotonic() + 60
        while self.proc.poll() is None and not self.healthy() and time.monotonic() < deadline:
            time.sleep(0.2)
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return int(self.proc.returncode), time.monotonic() - started

    def rss_kb(self) -> int:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def metrics(self) -> dict[str, float]:
        """The deliver listener's samples (the history one's for a history process) as
        {'name{labels}': value}; {} if it does not answer."""
        return _samples(self.admin)

    def history_metrics(self) -> dict[str, float]:
        return _samples(self.history_admin)

    def worker_metrics(self) -> list[dict[str, float]]:
        """Each deliver worker's samples (one for a deliver process, `workers` for all)."""
        return [_samples(addr) for addr in self.probes[: self.workers]] if self.delivers else []

    def log_tail(self, lines: int = 30) -> str:
        path = self.folder / f"{self.name}-{self.starts}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def log_text(self) -> str:
        """Every start's log, concatenated."""
        out = []
        for n in range(1, self.starts + 1):
            path = self.folder / f"{self.name}-{n}.log"
            if path.exists():
                out.append(path.read_text(errors="replace"))
        return "\n".join(out)

    def close_logs(self) -> None:
        for f in self._logs:
            f.close()
        self._logs = []


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310
            return bool(r.status == 200)
    except OSError:
        return False


def _samples(addr: str) -> dict[str, float]:
    if not addr:
        return {}
    try:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:  # noqa: S310
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


# A scenario run -------------------------------------------------------------------------


class Run:
    """One scenario: a fresh events topic and group, its receivers, its deliver processes, ONE
    history process (started on first need), and its accounting.

    The history role's group is the run's group + "-history", fast-forwarded past older records on
    the shared attempts topic, so its store holds this run's rows only."""

    def __init__(
        self, env: FaultEnv, name: str, tiers: Sequence[str] = ("1s", "2s"), partitions: int = 3,
        replication: int = 1,
    ) -> None:
        self.env = env
        self.name = name
        self.started = time.monotonic()
        self.folder = env.work / unique(name)
        self.folder.mkdir(parents=True)
        self.tiers = list(tiers)
        self.events_topic = unique(f"perkamo.events.faults.{name}")
        self.group = unique(f"faults-{name}")
        self.history_group = self.group + "-history"
        settings = load_settings(
            kafka_bootstrap_servers=env.bootstrap, events_topics=[self.events_topic], retry_tiers=self.tiers
        )
        specs, _ = plan(settings, partitions=partitions, retention_hours=None)
        isr = {"min.insync.replicas": str(min(2, replication))}
        ensure_topics(env.bootstrap, [(s.name, s.partitions, {**s.config, **isr}) for s in specs],
                      replication_factor=replication)
        self.retry_topics = [tier_topic(name) for name, _ in parse_tiers(self.tiers)]
        # What the deliver group reads besides the events topic: retry tiers and held deliveries.
        self.redelivery_topics = [*self.retry_topics, c.HELD_TOPIC, c.REDELIVER_TOPIC]
        fast_forward_group(env.bootstrap, self.group, self.redelivery_topics)
        fast_forward_group(env.bootstrap, self.history_group, [c.ATTEMPTS_TOPIC])
        self.start_offsets = end_offsets(
            env.bootstrap, [c.DLQ_TOPIC, c.ATTEMPTS_TOPIC, *self.redelivery_topics]
        )
        self.publisher = Publisher(env.bootstrap, self.events_topic)
        self.consumers: list[ConsumerProc] = []  # what delivers: deliver (or all) processes
        self.history: ConsumerProc | None = None  # what holds the store: the history (or all) process
        self._endpoints: Path | None = None
        self.receivers: list[ReceiverProc] = []
        self.disruptions: list[Disruption] = []
        self.exit_codes: list[int] = []
        self.max_in_flight: int | None = None
        self._dlq_seen: dict[str, set[str]] = {}
        self._dlq_offsets: dict[TP, int] = {
            tp: o for tp, o in self.start_offsets.items() if tp[0] == c.DLQ_TOPIC
        }

    # set-up

    def receiver(self, routes: dict[str, dict[str, Any]], garbage: bool = False) -> ReceiverProc:
        rec = ReceiverProc(self.env, self.folder / f"receiver-{len(self.receivers)}", routes, garbage)
        self.receivers.append(rec)
        return rec

    def endpoints_file(self, urls: dict[str, str]) -> Path:
        path = self.folder / "endpoints.json"
        path.write_bytes(orjson.dumps([{"space": s, "url": u} for s, u in urls.items()]))
        self._endpoints = path
        return path

    def _env(self, name: str, endpoints: Path | None, settings: dict[str, Any]) -> dict[str, str]:
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            "PERKAMO_KAFKA_BOOTSTRAP_SERVERS": self.env.bootstrap,
            "PERKAMO_EVENTS_TOPICS": self.events_topic,
            "PERKAMO_GROUP_ID": self.group,
            "PERKAMO_HISTORY_GROUP_ID": self.history_group,
            "PERKAMO_DATA_DIR": str(self.folder / name),
            "PERKAMO_ALLOW_PRIVATE_NETWORKS": LOOPBACK,
            "PERKAMO_CA_BUNDLE": str(self.env.ca_file),
            "PERKAMO_RETRY_TIERS": ",".join(self.tiers),
            "PERKAMO_LOG_LEVEL": "WARNING",
            "PERKAMO_DRAIN_TIMEOUT_S": "10",
        }
        env.pop(CONTROL_ENV, None)
        if endpoints is not None:
            env["PERKAMO_ENDPOINTS_FILE"] = str(endpoints)
        for k, v in settings.items():
            env["PERKAMO_" + k.upper()] = str(v)
        return env

    def history_role(self, wrapper: bool = False, start: bool = True, **settings: Any) -> ConsumerProc:
        """The run's one history process (`--role history`, or the fault-hook wrapper); created
        on the first call, returned as is afterwards."""
        if self.history is not None:
            return self.history
        env = self._env("history", self._endpoints, settings)
        if wrapper:
            self.control.mkdir(exist_ok=True)
            env[CONTROL_ENV] = str(self.control)
        self.history = ConsumerProc("history", env, self.folder, role="history", wrapper=wrapper)
        return self.history.start() if start else self.history

    def consumer(
        self, endpoints: Path, wrapper: bool = False, start: bool = True, **settings: Any
    ) -> ConsumerProc:
        """A deliver-role process of this run's group; `settings` are PERKAMO_* values. The run's
        history process is started too if it is not yet (with the `history_*` settings;
        `wrapper` puts the store fault hook into it)."""
        if self.history is None:
            history = {k: v for k, v in settings.items() if k.startswith("history_")}
            self.history_role(wrapper=wrapper, **history)
        name = f"deliver{len(self.consumers)}"
        env = self._env(name, endpoints, settings)
        if "PERKAMO_MAX_IN_FLIGHT" in env:
            self.max_in_flight = int(env["PERKAMO_MAX_IN_FLIGHT"])
        proc = ConsumerProc(name, env, self.folder, role="deliver")
        self.consumers.append(proc)
        return proc.start() if start else proc

    def all_role(
        self, endpoints: Path, workers: int = 2, start: bool = True, **settings: Any
    ) -> ConsumerProc:
        """`run --role all --workers N`: the supervisor of the run's history process and N deliver
        workers (so the run has no separate history process)."""
        assert self.history is None, "the run already has a history process"
        env = self._env("all", endpoints, settings)
        if "PERKAMO_MAX_IN_FLIGHT" in env:
            self.max_in_flight = int(env["PERKAMO_MAX_IN_FLIGHT"]) * workers
        proc = ConsumerProc("all", env, self.folder, role="all", workers=workers)
        self.consumers.append(proc)
        self.history = proc
        return proc.start() if start else proc

    @property
    def control(self) -> Path:
        return self.folder / "control"

    def processes(self) -> list[ConsumerProc]:
        out = list(self.consumers)
        if self.history is not None and self.history not in out:
            out.append(self.history)
        return out

    # actions

    def committed(self) -> dict[TP, int]:
        return committed_offsets(self.env.bootstrap, self.group, [self.events_topic, *self.redelivery_topics])

    def kill(self, proc: ConsumerProc) -> None:
        """kill -9 a deliver process, then note the group's committed offsets: what a restart may
        redeliver. (A history process's kill redelivers nothing to receivers: kill_history.)"""
        assert proc.delivers, "kill_history() kills the history role"
        proc.kill()
        self.disruptions.append(Disruption("kill", time.time(), self.committed()))

    def kill_history(self) -> dict[TP, int]:
        """kill -9 the history process; returns how many attempt records it had not committed
        (per partition, end - committed) at the kill: what its restart must insert again."""
        assert self.history is not None and self.history.role == "history"
        self.history.kill()
        return self.history_lag()

    def history_lag(self) -> dict[TP, int]:
        """The history group's lag on the attempts topic, per partition (from the broker)."""
        ends = end_offsets(self.env.bootstrap, [c.ATTEMPTS_TOPIC])
        done = committed_offsets(self.env.bootstrap, self.history_group, [c.ATTEMPTS_TOPIC])
        return {
            tp: max(0, end - max(done.get(tp, 0), self.start_offsets.get(tp, 0))) for tp, end in ends.items()
        }

    def history_caught_up(self) -> bool:
        return not any(self.history_lag().values())

    def receipts(self) -> list[Receipt]:
        return [r for rec in self.receivers for r in rec.receipts()]

    def wait_receipts(self, count: int, timeout: float, what: str = "deliveries") -> None:
        wait_until(lambda: len(self.receipts()) >= count, timeout, what, self.check_alive)

    def dead_letters(self) -> dict[str, set[str]]:
        """DLQ keys seen so far -> reasons (read incrementally)."""
        new = read_messages(self.env.bootstrap, [c.DLQ_TOPIC], self._dlq_offsets)
        for msg in new:
            tp = (msg.topic(), msg.partition())
            self._dlq_offsets[tp] = max(self._dlq_offsets.get(tp, 0), msg.offset() + 1)
            reason = header(msg, c.K_DLQ_REASON)
            self._dlq_seen.setdefault(key_of(msg), set()).add(reason.decode() if reason else "")
        return self._dlq_seen

    def progress(self) -> tuple[int, int, int]:
        """(published, delivered, dead-lettered) keys so far."""
        keys = {p.key for p in self.publisher.published}
        delivered = {r.event_id for r in self.receipts() if r.ok} & keys
        dlq = set(self.dead_letters()) & keys
        return len(keys), len(delivered), len(dlq - delivered)

    def settled(self) -> bool:
        published, delivered, dlq = self.progress()
        if published == 0 or delivered + dlq < published:
            return False
        topics = [self.events_topic, *self.redelivery_topics]
        ends = end_offsets(self.env.bootstrap, topics)
        committed = self.committed()
        return all(committed.get(tp, -1) >= end for tp, end in ends.items() if end > self._start_offset(tp))

    def _start_offset(self, tp: TP) -> int:
        return self.start_offsets.get(tp, 0)

    def check_alive(self) -> None:
        for proc in self.processes():
            if proc.proc is not None and proc.proc.poll() is not None and proc.proc.returncode not in (0, -9):
                raise AssertionError(f"{proc.name} exited with {proc.proc.returncode}:\n{proc.log_tail()}")

    def wait_settled(self, timeout: float) -> bool:
        """Wait until every event is delivered or dead-lettered and the group committed it all."""
        try:
            wait_until(
                self.settled,
                timeout,
                "every event delivered or dead-lettered and committed",
                self.check_alive,
                interval=1.0,
            )
            return True
        except TimeoutError as exc:
            log(f"{self.name}: {exc}; progress (published, delivered, dead-lettered) = {self.progress()}")
            return False

    def wait_history(self, timeout: float) -> bool:
        """Wait until the history group committed the attempts topic up to its ends."""
        try:
            wait_until(self.history_caught_up, timeout, "the history role to catch up", self.check_alive,
                       interval=0.5)
            return True
        except TimeoutError as exc:
            log(f"{self.name}: {exc}; history lag {self.history_lag()}")
            return False

    def _stop(self, proc: ConsumerProc) -> None:
        if proc.alive():
            code, _ = proc.terminate()
            self.exit_codes.append(code)
            if code != 0:
                log(f"{proc.name} exited {code}:\n{proc.log_tail()}")

    # the end

    def finish(
        self, settle_timeout: float = 120, extra_allowed: int = 0, history_timeout: float = 90
    ) -> Accounting:
        """Settle; SIGTERM every deliver process (each must exit 0); wait until the history role
        caught up with the attempts topic; SIGTERM it (exit 0); stop receivers; account from the
        history process's store."""
        marks = [time.monotonic()]
        self.wait_settled(settle_timeout)
        marks.append(time.monotonic())
        for proc in self.consumers:
            if proc is not self.history:
                self._stop(proc)
        marks.append(time.monotonic())
        if self.history is not None and self.history.alive():
            self.wait_history(history_timeout)
        marks.append(time.monotonic())
        for proc in self.processes():
            self._stop(proc)
            proc.close_logs()
        receipts = [r for rec in self.receivers for r in rec.stop()]
        marks.append(time.monotonic())
        result = self.account(receipts, extra_allowed)
        marks.append(time.monotonic())
        steps = "settle %.1fs, deliver stop %.1fs, history catch-up %.1fs, history stop %.1fs, account %.1fs"
        log(f"{self.name} finish: " + steps % tuple(b - a for a, b in itertools.pairwise(marks)))
        return result

    def history_rows(self, final: bool = True) -> list[HistoryRow]:
        """The history store's rows (after FINAL, or every inserted copy); the process is stopped."""
        if self.history is None:
            return []
        path = self.history.data_dir / "history"
        if not path.exists():
            return []
        rows = query_history_in_subprocess(
            str(path),
            "SELECT delivery_id, attempt, event_id, status, error_kind, toUnixTimestamp64Milli(attempted_at) "
            "FROM perkamo.webhook_attempts" + (" FINAL" if final else ""),
        )
        return [HistoryRow(str(r[0]), int(r[1]), str(r[2]), str(r[3]), str(r[4]), int(r[5])) for r in rows]

    def account(self, receipts: list[Receipt], extra_allowed: int = 0) -> Accounting:
        bootstrap = self.env.bootstrap
        keys = {p.key for p in self.publisher.published}
        dead = []
        for msg in read_messages(bootstrap, [c.DLQ_TOPIC], self.start_offsets):
            key = key_of(msg)
            if key in keys:
                reason = header(msg, c.K_DLQ_REASON)
                dead.append(
                    DeadLetter(
                        key, reason.decode() if reason else "", msg.topic(), msg.partition(), msg.offset()
                    )
                )
        inputs = [
            InputMessage(p.topic, p.partition, p.offset, p.key, p.attempt) for p in self.publisher.published
        ]
        for msg in read_messages(bootstrap, self.redelivery_topics, self.start_offsets):
            key = key_of(msg)
            attempt = header(msg, c.K_ATTEMPT)
            if key in keys and attempt is not None:
                inputs.append(InputMessage(msg.topic(), msg.partition(), msg.offset(), key, int(attempt)))
        return evaluate(
            self.name,
            self.publisher.published,
            receipts,
            dead,
            self.history_rows(),
            committed=committed_offsets(bootstrap, self.group, [self.events_topic]),
            ends=end_offsets(bootstrap, [self.events_topic]),
            exit_codes=self.exit_codes,
            wall_time_s=time.monotonic() - self.started,
            disruptions=self.disruptions,
            inputs=inputs,
            max_in_flight=self.max_in_flight,
            extra_allowed=extra_allowed,
        )

    def cleanup(self) -> None:
        """Stop whatever is still running (after a failure)."""
        for proc in self.processes():
            if proc.alive():
                assert proc.proc is not None
                proc.proc.kill()
                proc.proc.wait(30)
            proc.close_logs()
        for rec in self.receivers:
            rec.stop()


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    check: Callable[[], None] | None = None,
    interval: float = 0.2,
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
