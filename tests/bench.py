"""`make bench`: throughput, latency, memory, isolation, retry accuracy and scaling, in one run.

    python -m tests.bench [--quick | --smoke] [--events N] [--only e2e,latency] [--out-dir DIR]

Everything is real and on loopback: an Apache Kafka broker started for the run
(deploy/kafka/kafka.sh, free ports, a temp KAFKA_DIR, stopped at the end), `python -m consumer
run` subprocesses each with their own PERKAMO_DATA_DIR (embedded ClickHouse history), and
HTTPS receivers in processes of their own (tests/bench_receiver.py, a trustme test CA). The
raw ceiling is a bare aiohttp client in a subprocess (tests/bench_client.py). Phases:

    1 raw        aiohttp client -> receiver, deliveries/s (the ceiling)
    2 e2e        N pre-published events, 6 partitions, one Space, one consumer; metrics on and off
    3 latency    fixed produce rate; receiver takes arrival - data.context.sent_ns
    4 memory     peak RSS (VmHWM) with 5,000 deliveries in flight to an endpoint answering after 1 s
    5 isolation  healthy deliveries/s while 20 % of events go to a hanging endpoint, vs without
    6 retry      lateness of tier attempts (tiers 1s,2s,4s, an endpoint answering 500) from history
    7 scaling    two consumers in one group vs one

Sizes: default (what `make bench` runs: 200k events, 1,000/s for 15 s, ...), `--quick` (5k
events; for development), `--smoke` (~500 events, phases 1,2,3,6, under 2 minutes; for CI, not
timed). Every phase has a time limit and stops by itself. Results: a table on stdout and a JSON
file bench-results/bench-<UTC timestamp>.json. Exit status 0 when every phase ran (targets met
or not), 1 when a phase failed to run.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from consumer.config import load_settings
from consumer.kafka_io import ensure_topics, wait_for_broker
from consumer.retry_policy import tier_topic
from consumer.topics import plan
from tests.bench_client import payload
from tests.bench_receiver import make_certs
from tests.support import end_offsets, fast_forward_group, free_port, query_history_in_subprocess, unique

REPO = Path(__file__).resolve().parent.parent
KAFKA_SCRIPT = REPO / "deploy" / "kafka" / "kafka.sh"
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")

PHASES = ("raw", "e2e", "latency", "memory", "isolation", "retry", "scaling")
SMOKE_PHASES = ("raw", "e2e", "latency", "retry")
PARTITIONS = 6
DEFAULT_TIERS = "10s,1m,10m,1h,6h,24h"
ISOLATION_TIERS = "1h"
RETRY_TIERS = "1s,2s,4s"

# Spaces (one endpoint each) and the receiver path each one's endpoint points at.
SPACE_OK, SPACE_LAT, SPACE_SLOW, SPACE_FAIL, SPACE_HANG = (
    "bench-live", "bench-latency", "bench-slow", "bench-fail", "bench-hang")

# Targets for one consumer process (issue 9).
TARGET_E2E_RATE = 5000.0
TARGET_RAW_RATIO = 0.8
TARGET_P99_MS = 50.0
TARGET_RSS_MB = 300.0
TARGET_ISOLATION = 0.9
TARGET_RETRY_P99_MS = 1000.0
_LAG_SERIES = re.compile(r'^perkamo_webhook_consumer_lag\{[^}]*partition="(\d+)"[^}]*\}', re.MULTILINE)
RECEIVER_BUSY = 0.9  # a receiver above this share of one core may be what limits the figure


@dataclass
class Sizes:
    mode: str
    events: int  # phases 1, 2, 7
    concurrency: int  # PERKAMO_MAX_IN_FLIGHT_PER_ENDPOINT and the raw client's connection limit
    max_in_flight: int
    latency_rate: int
    latency_seconds: float
    memory_events: int
    memory_in_flight: int
    isolation_events: int
    retry_events: int
    receivers: int


def sizes_for(args: argparse.Namespace) -> Sizes:
    if args.smoke:
        sizes = Sizes("smoke", 500, 100, 1000, 100, 5.0, 15_000, 5000, 500, 100, 1)
    elif args.quick:
        sizes = Sizes("quick", 5_000, 100, 1000, 300, 5.0, 15_000, 5000, 5_000, 200, 1)
    else:
        sizes = Sizes("full", 200_000, 100, 1000, 1000, 15.0, 20_000, 5000, 50_000, 200, 1)
    if args.events:
        sizes.events = args.events
        sizes.isolation_events = min(args.events, 50_000)
    if args.concurrency:
        sizes.concurrency = args.concurrency
    if args.receivers:
        sizes.receivers = args.receivers
    return sizes


class PhaseError(Exception):
    """A phase could not produce its figures (a process died, a deadline passed before any result)."""


# Small helpers ---------------------------------------------------------------------------


def now_ns() -> int:
    return time.time_ns()


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    k = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


def summary_ms(values_ms: list[float]) -> dict[str, Any]:
    values = sorted(values_ms)
    return {
        "samples": len(values),
        "min_ms": values[0] if values else None,
        "p50_ms": percentile(values, 50),
        "p95_ms": percentile(values, 95),
        "p99_ms": percentile(values, 99),
        "max_ms": values[-1] if values else None,
    }


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # loopback control/admin ports
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def http_post(url: str, timeout: float = 5.0) -> int:
    request = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return int(response.status)


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus text-format series, filtered by exact label values."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        if series != name and not series.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def rate(count: int, first_ns: int, last_ns: int) -> float | None:
    """Deliveries per second over the first-to-last arrival window."""
    if count < 2 or last_ns <= first_ns:
        return None
    return count / ((last_ns - first_ns) / 1e9)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


# Processes -------------------------------------------------------------------------------


class Children:
    """Every process this run started, so an interrupted run leaves none behind."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def add(self, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)


CHILDREN = Children()


class Broker:
    """A real Apache Kafka broker for this run: free ports, its own temp dir."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.env = {**os.environ, "KAFKA_PORT": str(self.port), "KAFKA_CONTROLLER_PORT": str(free_port()),
                    "KAFKA_DIR": str(workdir / "kafka")}
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.pid: int | None = None

    def start(self) -> None:
        subprocess.run([str(KAFKA_SCRIPT), "start"], env=self.env, check=True, timeout=180)
        self.pid = int((Path(self.env["KAFKA_DIR"]) / "broker.pid").read_text().strip())
        wait_for_broker(self.bootstrap, 60)

    def cpu_s(self) -> float | None:
        return proc_cpu_s(self.pid) if self.pid else None

    def stop(self) -> None:
        subprocess.run([str(KAFKA_SCRIPT), "stop"], env=self.env, check=False, timeout=60)


class Receiver:
    """One or more bench_receiver processes sharing an HTTPS port (SO_REUSEPORT)."""

    def __init__(self, name: str, cert_dir: Path, workdir: Path, processes: int = 1) -> None:
        self.name = name
        self.port = free_port()
        self.control_ports = [free_port() for _ in range(processes)]
        self.procs = []
        for index, control in enumerate(self.control_ports):
            cmd = [PYTHON, "-m", "tests.bench_receiver", "--port", str(self.port), "--control-port",
                   str(control), "--cert-dir", str(cert_dir)]
            if processes > 1:
                cmd.append("--reuse-port")
            log = (workdir / f"receiver-{name}-{index}.log").open("wb")
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            self.procs.append(CHILDREN.add(proc))
        deadline = time.monotonic() + 30
        for control in self.control_ports:
            while True:
                try:
                    http_get(f"http://127.0.0.1:{control}/stats", 1)
                    break
                except OSError:
                    if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                        raise PhaseError(f"receiver {name} did not start; see {workdir}") from None
                    time.sleep(0.1)

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def reset(self) -> None:
        for control in self.control_ports:
            http_post(f"http://127.0.0.1:{control}/reset")

    def stats(self, latencies: bool = False) -> dict[str, Any]:
        """The processes' figures added up."""
        docs = [orjson.loads(http_get(f"http://127.0.0.1:{c}/stats{'?latencies=1' if latencies else ''}")[1])
                for c in self.control_ports]
        paths: dict[str, dict[str, int]] = {}
        for doc in docs:
            for path, p in doc["paths"].items():
                agg = paths.setdefault(path, {"count": 0, "first_ns": 0, "last_ns": 0})
                agg["count"] += p["count"]
                if p["first_ns"] and (not agg["first_ns"] or p["first_ns"] < agg["first_ns"]):
                    agg["first_ns"] = p["first_ns"]
                agg["last_ns"] = max(agg["last_ns"], p["last_ns"])
        firsts = [d["first_ns"] for d in docs if d["first_ns"]]
        out: dict[str, Any] = {
            "count": sum(d["count"] for d in docs),
            "first_ns": min(firsts) if firsts else 0,
            "last_ns": max(d["last_ns"] for d in docs),
            "paths": paths,
            "cpu_s": sum(d["cpu_s"] for d in docs),
            "cpu_s_busiest": max(d["cpu_s"] for d in docs),  # per process: each has one core at most
            "since_reset_s": max(d["since_reset_s"] for d in docs),
            "slow_max_concurrent": sum(d["slow_max_concurrent"] for d in docs),
            "hang_max_concurrent": sum(d["hang_max_concurrent"] for d in docs),
            "latency_errors": sum(d["latency_errors"] for d in docs),
        }
        if latencies:
            out["latencies_ns"] = [x for d in docs for x in d["latencies_ns"]]
        return out

    def path_count(self, path: str) -> int:
        return int(self.stats()["paths"].get(path, {}).get("count", 0))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def receiver_figures(stats: dict[str, Any], window_s: float | None) -> dict[str, Any]:
    """The receiver's CPU over a phase: seconds, and the busiest process's share of one core over
    the window (the figure that says whether the receiver could be the bottleneck)."""
    share = stats["cpu_s_busiest"] / window_s if window_s else None
    return {"cpu_s": round(stats["cpu_s"], 3), "core_share": None if share is None else round(share, 3),
            "requests": stats["count"]}


@dataclass
class ConsumerProc:
    """One `python -m consumer run` process with its own data dir and admin port."""

    name: str
    proc: subprocess.Popen[bytes]
    admin: str
    data_dir: Path
    log_path: Path
    started_ns: int
    cpu_samples: list[tuple[int, float]] = field(default_factory=list)
    exit_code: int | None = None
    killed: bool = False
    term_sent: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def sample(self) -> None:
        cpu = proc_cpu_s(self.pid)
        if cpu is not None:
            self.cpu_samples.append((now_ns(), cpu))

    def cpu_between(self, first_ns: int, last_ns: int) -> tuple[float, float]:
        """(CPU seconds, wall seconds) between the samples just outside [first_ns, last_ns]."""
        before = [s for s in self.cpu_samples if s[0] <= first_ns] or self.cpu_samples[:1]
        after = [s for s in self.cpu_samples if s[0] >= last_ns] or self.cpu_samples[-1:]
        if not before or not after or after[0][0] <= before[-1][0]:
            return 0.0, 0.0
        return after[0][1] - before[-1][1], (after[0][0] - before[-1][0]) / 1e9

    def cpu_at(self, at_ns: int) -> float:
        """CPU seconds used up to `at_ns` (the last sample at or before it)."""
        best = 0.0
        for t, cpu in self.cpu_samples:
            if t > at_ns:
                break
            best = cpu
        return best

    def healthy(self) -> bool:
        try:
            return http_get(f"http://{self.admin}/healthz", 1)[0] == 200
        except OSError:
            return False

    def metrics(self) -> str:
        try:
            return http_get(f"http://{self.admin}/metrics", 5)[1].decode()
        except OSError:
            return ""

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def terminate(self) -> None:
        """SIGTERM once: a second one could land after the loop removed its handler and kill it."""
        if not self.term_sent and self.alive():
            self.proc.send_signal(signal.SIGTERM)
            self.term_sent = True

    def stop(self, timeout: float) -> None:
        self.terminate()
        try:
            self.exit_code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.killed = True
            self.exit_code = self.proc.wait(10)


class Bench:
    def __init__(self, args: argparse.Namespace, sizes: Sizes, workdir: Path) -> None:
        self.args = args
        self.sizes = sizes
        self.workdir = workdir
        self.broker = Broker(workdir)
        self.cert_dir = workdir / "certs"
        self.ca_file = make_certs(self.cert_dir)
        self.receiver: Receiver | None = None
        self.hang_receiver: Receiver | None = None
        self.endpoints_file = workdir / "endpoints.json"
        self.results: dict[str, Any] = {}
        self.published: dict[str, int] = {}  # topic -> events published
        self.extra_env = dict(kv.split("=", 1) for kv in args.consumer_env)
        self.profile_proc: subprocess.Popen[bytes] | None = None

    # Set-up ------------------------------------------------------------------------------

    def start(self) -> None:
        started = time.monotonic()
        self.broker.start()
        self.results["broker_start_s"] = round(time.monotonic() - started, 1)
        self.receiver = Receiver("main", self.cert_dir, self.workdir, self.sizes.receivers)
        self.hang_receiver = Receiver("hang", self.cert_dir, self.workdir, 1)
        records = [
            {"space": SPACE_OK, "url": self.receiver.url("/ok"), "active": True},
            {"space": SPACE_LAT, "url": self.receiver.url("/lat"), "active": True},
            {"space": SPACE_SLOW, "url": self.receiver.url("/slow"), "active": True},
            {"space": SPACE_FAIL, "url": self.receiver.url("/fail"), "active": True},
            {"space": SPACE_HANG, "url": self.hang_receiver.url("/hang"), "active": True},
        ]
        self.endpoints_file.write_bytes(orjson.dumps(records))
        topics = {}
        for tiers in (DEFAULT_TIERS, ISOLATION_TIERS, RETRY_TIERS):
            names = ("e2e", "latency", "memory", "iso.base", "iso.mix", "retry", "scale.one", "scale.two")
            settings = load_settings(kafka_bootstrap_servers=self.broker.bootstrap,
                                     events_topics=[f"bench.{n}" for n in names],
                                     retry_tiers=tiers.split(","))
            specs, _ = plan(settings, partitions=PARTITIONS, retention_hours=None)
            topics.update({s.name: (s.name, s.partitions, s.config) for s in specs})
        ensure_topics(self.broker.bootstrap, list(topics.values()))

    def stop(self) -> None:
        for rec in (self.receiver, self.hang_receiver):
            if rec is not None:
                rec.stop()
        self.broker.stop()

    def main_receiver(self) -> Receiver:
        assert self.receiver is not None
        return self.receiver

    # Kafka -------------------------------------------------------------------------------

    def publish(self, topic: str, bodies: Iterator[bytes]) -> int:
        producer = Producer({"bootstrap.servers": self.broker.bootstrap, "enable.idempotence": True,
                             "acks": "all", "linger.ms": 20, "batch.size": 1_000_000,
                             "compression.type": "lz4", "log_level": 3})
        count = 0
        for body in bodies:
            while True:
                try:
                    producer.produce(topic, body, key=str(count).encode())
                    break
                except BufferError:
                    producer.poll(0.05)
            count += 1
            if count % 1000 == 0:
                producer.poll(0)
        if producer.flush(120) != 0:
            raise PhaseError(f"could not publish to {topic}")
        self.published[topic] = self.published.get(topic, 0) + count
        return count

    def ensure_published(self, topic: str, space: str, count: int) -> None:
        """Publish `count` events for `space` once; later phases reuse them with fresh groups."""
        have = self.published.get(topic, 0)
        if have < count:
            self.publish(topic, (payload(space, n) for n in range(have, count)))

    def ends(self, topics: list[str]) -> dict[tuple[str, int], int]:
        return end_offsets(self.broker.bootstrap, topics)

    # Consumers ---------------------------------------------------------------------------

    def start_consumer(self, name: str, topic: str, group: str, tiers: str,
                       env: dict[str, str] | None = None) -> ConsumerProc:
        data_dir = self.workdir / f"{name}-data"
        data_dir.mkdir(parents=True, exist_ok=True)
        admin = f"127.0.0.1:{free_port()}"
        full = {k: v for k, v in os.environ.items() if not k.startswith("PERKAMO_")}
        full.update({
            "PERKAMO_KAFKA_BOOTSTRAP_SERVERS": self.broker.bootstrap,
            "PERKAMO_EVENTS_TOPICS": topic,
            "PERKAMO_GROUP_ID": group,
            "PERKAMO_DATA_DIR": str(data_dir),
            "PERKAMO_ENDPOINTS_FILE": str(self.endpoints_file),
            "PERKAMO_CA_BUNDLE": str(self.ca_file),
            "PERKAMO_ALLOW_PRIVATE_NETWORKS": "127.0.0.0/8",
            "PERKAMO_ADMIN_LISTEN": admin,
            "PERKAMO_RETRY_TIERS": tiers,
            "PERKAMO_MAX_IN_FLIGHT": str(self.sizes.max_in_flight),
            "PERKAMO_MAX_IN_FLIGHT_PER_ENDPOINT": str(self.sizes.concurrency),
            "PERKAMO_DELIVERY_TIMEOUT_S": "5",
        })
        full.update(env or {})
        full.update(self.extra_env)
        log_path = self.workdir / f"{name}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen([PYTHON, "-m", "consumer", "run"], cwd=REPO, env=full, stdout=log,
                                    stderr=subprocess.STDOUT)
        CHILDREN.add(proc)
        return ConsumerProc(name, proc, admin, data_dir, log_path, now_ns())

    def new_group(self, tiers: str) -> str:
        """A fresh group, positioned at the end of its retry topics (earlier phases left messages there)."""
        group = unique("bench")
        fast_forward_group(self.broker.bootstrap, group, [tier_topic(t) for t in tiers.split(",")])
        return group

    def stop_consumers(self, consumers: list[ConsumerProc], timeout: float = 60.0) -> None:
        for cons in consumers:
            cons.terminate()
        for cons in consumers:
            cons.stop(timeout)

    def wait_healthy(self, consumers: list[ConsumerProc], timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        pending = list(consumers)
        while pending:
            for cons in list(pending):
                if not cons.alive():
                    raise PhaseError(f"consumer {cons.name} exited with {cons.proc.returncode}:\n"
                                     f"{cons.tail()}")
                if cons.healthy():
                    pending.remove(cons)
            if time.monotonic() > deadline:
                raise PhaseError(f"consumer(s) {[c.name for c in pending]} not healthy in {timeout:.0f}s")
            time.sleep(0.05)

    def wait_assigned(self, cons: ConsumerProc, partitions: int, timeout: float = 60.0) -> None:
        """Until the consumer's assigned-partitions gauge reaches `partitions` (needs metrics on)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not cons.alive():
                raise PhaseError(f"consumer {cons.name} exited:\n{cons.tail()}")
            text = cons.metrics()
            if metric_sum(text, "perkamo_webhook_assigned_partitions") >= partitions:
                return
            time.sleep(0.1)
        raise PhaseError(f"consumer {cons.name}: {partitions} partitions not assigned in {timeout:.0f}s")

    def wait_group_assigned(self, consumers: list[ConsumerProc], partitions: int,
                            timeout: float = 90.0) -> None:
        """Until the members' assigned partitions add up to `partitions`, each having some."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = []
            for cons in consumers:
                if not cons.alive():
                    raise PhaseError(f"consumer {cons.name} exited:\n{cons.tail()}")
                counts.append(metric_sum(cons.metrics(), "perkamo_webhook_assigned_partitions"))
            if sum(counts) == partitions and all(counts):
                return
            time.sleep(0.2)
        raise PhaseError(f"group assignment of {partitions} partitions not complete in {timeout:.0f}s")

    def drive(self, consumers: list[ConsumerProc], path: str, expect: int, group: str,
              commit_topics: list[str] | None, limit_s: float,
              on_poll: Callable[[], None] | None = None, interval: float = 0.2) -> dict[str, Any]:
        """Poll until the receiver saw `expect` requests on `path` and (if `commit_topics`) the
        group's committed offsets reached the end offsets; sample consumer CPU meanwhile."""
        receiver = self.main_receiver() if path != "/hang" else self.hang_receiver
        assert receiver is not None
        deadline = time.monotonic() + limit_s
        delivered_ns = committed_ns = 0
        ends: dict[tuple[str, int], int] = {}
        probe = None
        timed_out = False
        try:
            while True:
                for cons in consumers:
                    cons.sample()
                    if not cons.alive():
                        raise PhaseError(f"consumer {cons.name} exited with {cons.proc.returncode}:\n"
                                         f"{cons.tail()}")
                if on_poll is not None:
                    on_poll()
                if not delivered_ns and receiver.path_count(path) >= expect:
                    delivered_ns = now_ns()
                    if commit_topics:
                        ends = self.ends(commit_topics)
                        probe = Consumer({"bootstrap.servers": self.broker.bootstrap, "group.id": group,
                                          "enable.auto.commit": False})
                if delivered_ns and not commit_topics:
                    break
                if delivered_ns and probe is not None:
                    tps = [TopicPartition(t, p) for (t, p) in ends]
                    got = {(tp.topic, tp.partition): tp.offset for tp in probe.committed(tps, timeout=10)}
                    if all(got.get(k, -1) >= v for k, v in ends.items() if v > 0):
                        committed_ns = now_ns()
                        break
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(interval)
        finally:
            if probe is not None:
                probe.close()
        for cons in consumers:
            cons.sample()
        return {"delivered_ns": delivered_ns, "committed_ns": committed_ns, "timed_out": timed_out}

    def start_profile(self, cons: ConsumerProc) -> None:
        pyspy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
        if not Path(pyspy).exists():
            print("bench: py-spy not found; --profile ignored (pip install py-spy)", file=sys.stderr)
            return
        out = Path(self.args.profile).resolve()
        cmd = [pyspy, "record", "--pid", str(cons.pid), "--rate", "250", "--format", "raw", "--threads",
               "--nonblocking", "-o", str(out)]
        if self.args.profile_native:
            cmd.append("--native")
        with (self.workdir / "py-spy.log").open("wb") as log:
            self.profile_proc = CHILDREN.add(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log))

    def finish_profile(self) -> None:
        if self.profile_proc is None:
            return
        try:
            self.profile_proc.wait(60)
        except subprocess.TimeoutExpired:
            self.profile_proc.send_signal(signal.SIGINT)
            self.profile_proc.wait(30)
        self.profile_proc = None
        path = Path(self.args.profile)
        if path.is_file():
            self.results["profile"] = summarize_profile(path)
            self.results["profile"]["file"] = str(path.resolve())

    # Phases ------------------------------------------------------------------------------

    def phase_raw(self) -> dict[str, Any]:
        """1. A bare aiohttp client in a subprocess: the ceiling the consumer is compared with."""
        rec = self.main_receiver()
        rec.reset()
        n = self.sizes.events
        cmd = [PYTHON, "-m", "tests.bench_client", "--url", rec.url("/ok"), "--ca", str(self.ca_file),
               "--events", str(n), "--concurrency", str(self.sizes.concurrency), "--space", SPACE_OK]
        proc = CHILDREN.add(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        try:
            out, err = proc.communicate(timeout=60 + n / 500)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise PhaseError("raw client did not finish in time") from None
        if proc.returncode != 0:
            raise PhaseError(f"raw client failed: {err.decode(errors='replace')[-2000:]}")
        client = orjson.loads(out)
        stats = rec.stats()
        ok = stats["paths"].get("/ok", {"count": 0, "first_ns": 0, "last_ns": 0})
        window = (ok["last_ns"] - ok["first_ns"]) / 1e9 if ok["count"] > 1 else None
        return {
            "events": n,
            "concurrency": self.sizes.concurrency,
            "deliveries": ok["count"],
            "errors": client["errors"],
            "deliveries_per_s": rate(ok["count"], ok["first_ns"], ok["last_ns"]),
            "client_deliveries_per_s": client["ok"] / client["wall_s"] if client["wall_s"] else None,
            "client_cpu_s": round(client["cpu_s"], 3),
            "client_core_share": round(client["cpu_s"] / client["wall_s"], 3) if client["wall_s"] else None,
            "window_s": window,
            "receiver": receiver_figures(stats, window),
        }

    def run_throughput(self, label: str, processes: int, env: dict[str, str] | None = None,
                       profile: bool = False, topic: str = "bench.e2e",
                       assigned_first: bool = False) -> dict[str, Any]:
        """N events for one Space through a fresh group of `processes` consumers.

        Default: the events are published before the consumers start (phase 2). With
        `assigned_first` the consumers start on the empty topic, and the events are published
        (as fast as the producer goes) once the group's assignment is complete: a group of two
        then shares the work from the first event instead of one member taking all of it while
        the other joins (phase 7)."""
        n = self.sizes.events
        bodies: list[bytes] = []
        if assigned_first:
            bodies = [payload(SPACE_OK, i) for i in range(n)]
        else:
            self.ensure_published(topic, SPACE_OK, n)
        rec = self.main_receiver()
        rec.reset()
        group = self.new_group(DEFAULT_TIERS)
        cpu_broker = self.broker.cpu_s()
        consumers = [self.start_consumer(f"{label}-{i}", topic, group, DEFAULT_TIERS, env)
                     for i in range(processes)]
        try:
            if profile:
                self.wait_healthy(consumers)
                self.start_profile(consumers[0])
            start_ns = min(c.started_ns for c in consumers)
            if assigned_first:
                self.wait_healthy(consumers)
                self.wait_group_assigned(consumers, PARTITIONS * (1 + len(DEFAULT_TIERS.split(","))))
                start_ns = now_ns()
                self.publish(topic, iter(bodies))
            run = self.drive(consumers, "/ok", n, group, [topic], limit_s=120 + n / 200)
            metrics = [c.metrics() for c in consumers]
            for cons, text in zip(consumers, metrics, strict=True):
                (self.workdir / f"{cons.name}.metrics.txt").write_text(text)  # kept with --keep
            hwm = [proc_status_kb(c.pid, "VmHWM") for c in consumers]
        finally:
            self.stop_consumers(consumers)
            if profile:
                self.finish_profile()
        stats = rec.stats()
        ok = stats["paths"].get("/ok", {"count": 0, "first_ns": 0, "last_ns": 0})
        window = (ok["last_ns"] - ok["first_ns"]) / 1e9 if ok["count"] > 1 else None
        wall = (run["committed_ns"] - start_ns) / 1e9 if run["committed_ns"] else None
        per_process = []
        for cons, text, kb in zip(consumers, metrics, hwm, strict=True):
            end_cpu = cons.cpu_samples[-1][1] if cons.cpu_samples else 0.0
            counted = "perkamo_webhook_attempts_total" in text  # absent with metrics off
            delivered = int(metric_sum(text, "perkamo_webhook_attempts_total", outcome="delivered"))
            flushes = int(metric_sum(text, "perkamo_webhook_history_flush_duration_seconds_count"))
            # partitions of the events topic this member held at the end (lag series, every 5 s)
            event_partitions = {m.group(1) for m in _LAG_SERIES.finditer(text)
                                if f'topic="{topic}"' in m.group(0)}
            flush_s = metric_sum(text, "perkamo_webhook_history_flush_duration_seconds_sum")
            per_process.append({
                "name": cons.name,
                "delivered": delivered if counted else None,
                "deliveries_per_s": delivered / window if counted and window else None,
                "cpu_s": round(end_cpu, 2),
                "cpu_s_from_first_delivery": round(end_cpu - cons.cpu_at(ok["first_ns"]), 2),
                "peak_rss_mb": round(kb / 1024, 1) if kb else None,
                # a delivery holds its in-flight slot until its history batch is written
                "event_partitions": len(event_partitions) if counted else None,
                "history_flushes": flushes if counted else None,
                "history_flush_avg_s": round(flush_s / flushes, 3) if counted and flushes else None,
                "exit_code": cons.exit_code,
                "killed": cons.killed,
            })
        cpu_window = [c.cpu_between(ok["first_ns"], ok["last_ns"]) for c in consumers]
        cpu_total = sum(p["cpu_s"] for p in per_process)
        cpu_steady = sum(p["cpu_s_from_first_delivery"] for p in per_process)
        deliveries = ok["count"]
        broker_cpu = self.broker.cpu_s()
        return {
            "events": n,
            "processes": processes,
            "deliveries": deliveries,
            "duplicates": max(0, deliveries - n),
            "deliveries_per_s": rate(deliveries, ok["first_ns"], ok["last_ns"]),
            "window_s": window,
            "wall_to_committed_s": wall,
            "wall_from": "publish start" if assigned_first else "consumer start",
            "deliveries_per_s_wall": n / wall if wall else None,
            "all_committed": bool(run["committed_ns"]),
            "timed_out": run["timed_out"],
            "cpu_s_per_1k": round(cpu_total / deliveries * 1000, 3) if deliveries else None,
            "cpu_s_per_1k_steady": round(cpu_steady / deliveries * 1000, 3) if deliveries else None,
            # CPU over the delivery window (between the samples around it) / that window
            "consumer_core_share": (round(sum(c for c, _ in cpu_window) / max(w for _, w in cpu_window), 3)
                                    if window and max(w for _, w in cpu_window) else None),
            "per_process": per_process,
            "exit_ok": all(p["exit_code"] == 0 and not p["killed"] for p in per_process),
            "receiver": receiver_figures(stats, window),
            "broker_cpu_s": round(broker_cpu - cpu_broker, 2) if broker_cpu and cpu_broker else None,
        }

    def phase_e2e(self) -> dict[str, Any]:
        """2. End-to-end throughput, metrics on and off."""
        on = self.run_throughput("e2e-metrics-on", 1, profile=bool(self.args.profile))
        off = self.run_throughput("e2e-metrics-off", 1, {"PERKAMO_METRICS_ENABLED": "false"})
        raw = self.results.get("phases", {}).get("raw", {}).get("deliveries_per_s")
        return {
            "metrics_on": on,
            "metrics_off": off,
            "deliveries_per_s": on["deliveries_per_s"],
            "ratio_to_raw": ratio(on["deliveries_per_s"], raw),
            "metrics_off_over_on": ratio(off["deliveries_per_s"], on["deliveries_per_s"]),
            "metrics_cpu_share": (None if not on["cpu_s_per_1k_steady"] or off["cpu_s_per_1k_steady"] is None
                                  else round(1 - off["cpu_s_per_1k_steady"] / on["cpu_s_per_1k_steady"], 3)),
        }

    def phase_latency(self) -> dict[str, Any]:
        """3. Fixed produce rate; the receiver measures arrival - sent_ns."""
        topic = "bench.latency"
        rec = self.main_receiver()
        group = self.new_group(DEFAULT_TIERS)
        fast_forward_group(self.broker.bootstrap, group, [topic])
        cons = self.start_consumer("latency", topic, group, DEFAULT_TIERS)
        rate_per_s, seconds = self.sizes.latency_rate, self.sizes.latency_seconds
        total = int(rate_per_s * seconds)
        try:
            self.wait_healthy([cons])
            self.wait_assigned(cons, PARTITIONS * (1 + len(DEFAULT_TIERS.split(","))))
            producer = Producer({"bootstrap.servers": self.broker.bootstrap, "enable.idempotence": True,
                                 "acks": "all", "linger.ms": 1})
            # Warm-up at the same rate (connections, JIT, caches), not measured.
            warm = int(rate_per_s * min(3.0, seconds / 3))
            rec.reset()
            produce_at_rate(producer, topic, rate_per_s, warm, [])
            self.drive([cons], "/lat", warm, group, None, limit_s=30)
            rec.reset()
            acks: list[float] = []
            produce_s = produce_at_rate(producer, topic, rate_per_s, total, acks)
            run = self.drive([cons], "/lat", total, group, None, limit_s=30)
        finally:
            self.stop_consumers([cons])
        stats = rec.stats(latencies=True)
        latencies = [x / 1e6 for x in stats["latencies_ns"]]
        lat = stats["paths"].get("/lat", {"count": 0, "first_ns": 0, "last_ns": 0})
        window = (lat["last_ns"] - lat["first_ns"]) / 1e9 if lat["count"] > 1 else None
        return {
            "rate_per_s": rate_per_s,
            "seconds": seconds,
            "produced": total,
            "achieved_produce_rate": round(total / produce_s, 1),
            "warm_up_events": warm,
            # produce() -> broker acknowledgement (acks=all): the broker's share of the latency
            "produce_ack": summary_ms(acks),
            "received": lat["count"],
            "timed_out": run["timed_out"],
            **summary_ms(latencies),
            # in arrival order, about one second of traffic per chunk: shows warm-up and stalls
            "p99_by_second_ms": [percentile(sorted(latencies[i:i + rate_per_s]), 99)
                                 for i in range(0, len(latencies), rate_per_s)],
            "exit_ok": cons.exit_code == 0 and not cons.killed,
            "receiver": receiver_figures(stats, window),
        }

    def phase_memory(self) -> dict[str, Any]:
        """4. Peak RSS with `memory_in_flight` deliveries in flight to an endpoint answering after 1 s."""
        topic = "bench.memory"
        n = self.sizes.memory_events
        self.ensure_published(topic, SPACE_SLOW, n)
        rec = self.main_receiver()
        rec.reset()
        group = self.new_group(DEFAULT_TIERS)
        limit = str(self.sizes.memory_in_flight)
        # Opening 5,000 TLS connections at once can take longer than the 5 s timeout on a busy
        # machine; a longer timeout and no circuit breaker keep the 5,000 in flight instead of
        # turning them into a storm of fast failures (counted in attempts_by_outcome).
        cons = self.start_consumer("memory", topic, group, DEFAULT_TIERS, {
            "PERKAMO_MAX_IN_FLIGHT": limit, "PERKAMO_MAX_IN_FLIGHT_PER_ENDPOINT": limit,
            "PERKAMO_DELIVERY_TIMEOUT_S": "30", "PERKAMO_BREAKER_MIN_CALLS": "1000000"})
        in_flight_max = 0.0
        last_scrape = 0.0
        anon_max = 0

        def watch() -> None:
            nonlocal in_flight_max, last_scrape, anon_max
            anon_max = max(anon_max, proc_status_kb(cons.pid, "RssAnon") or 0)
            if time.monotonic() - last_scrape >= 0.5:
                last_scrape = time.monotonic()
                in_flight_max = max(in_flight_max, metric_sum(cons.metrics(), "perkamo_webhook_in_flight"))

        try:
            self.wait_healthy([cons])
            # about the idle size (deliveries only begin): the embedded engine's library pages
            # (RssFile) are most of it
            rss_start = proc_status_kb(cons.pid, "VmRSS")
            file_start = proc_status_kb(cons.pid, "RssFile")
            run = self.drive([cons], "/slow", n, group, [topic], limit_s=120 + n / 200, on_poll=watch)
            hwm = proc_status_kb(cons.pid, "VmHWM")
            rss = proc_status_kb(cons.pid, "VmRSS")
            file_end = proc_status_kb(cons.pid, "RssFile")
            text = cons.metrics()
            outcomes = {o: int(metric_sum(text, "perkamo_webhook_attempts_total", outcome=o))
                        for o in ("delivered", "timeout", "circuit_open", "connect_error", "http_status")}
        finally:
            self.stop_consumers([cons])
        stats = rec.stats()
        slow = stats["paths"].get("/slow", {"count": 0, "first_ns": 0, "last_ns": 0})
        window = (slow["last_ns"] - slow["first_ns"]) / 1e9 if slow["count"] > 1 else None
        return {
            "events": n,
            "in_flight_limit": self.sizes.memory_in_flight,
            "in_flight_max_observed": int(in_flight_max),
            "receiver_max_concurrent": stats["slow_max_concurrent"],
            "peak_rss_mb": round(hwm / 1024, 1) if hwm else None,
            "rss_at_start_mb": round(rss_start / 1024, 1) if rss_start else None,
            "rss_file_at_start_mb": round(file_start / 1024, 1) if file_start else None,
            "rss_file_at_end_mb": round(file_end / 1024, 1) if file_end else None,
            "rss_anon_max_sampled_mb": round(anon_max / 1024, 1) if anon_max else None,
            "rss_at_end_mb": round(rss / 1024, 1) if rss else None,
            "deliveries": slow["count"],
            "attempts_by_outcome": outcomes,  # timeouts here mean the machine could not keep up
            "deliveries_per_s": rate(slow["count"], slow["first_ns"], slow["last_ns"]),
            "timed_out": run["timed_out"],
            "exit_ok": cons.exit_code == 0 and not cons.killed,
            "receiver": receiver_figures(stats, window),
        }

    def phase_isolation(self) -> dict[str, Any]:
        """5. Healthy deliveries/s with 20 % of events for a hanging endpoint, vs without them."""
        total = self.sizes.isolation_events
        healthy = total * 4 // 5
        hanging = total - healthy
        self.ensure_published("bench.iso.base", SPACE_OK, healthy)
        if "bench.iso.mix" not in self.published:
            def mixed() -> Iterator[bytes]:
                h = u = 0
                for i in range(total):
                    if i % 5 == 4 and u < hanging:
                        u += 1
                        yield payload(SPACE_HANG, i)
                    else:
                        h += 1
                        yield payload(SPACE_OK, i)
            self.publish("bench.iso.mix", mixed())
        env = {"PERKAMO_DRAIN_TIMEOUT_S": "10"}
        out: dict[str, Any] = {"events": total, "healthy_events": healthy, "hanging_events": hanging}
        for label, topic in (("without_hang", "bench.iso.base"), ("with_hang", "bench.iso.mix")):
            rec = self.main_receiver()
            rec.reset()
            assert self.hang_receiver is not None
            self.hang_receiver.reset()
            group = self.new_group(ISOLATION_TIERS)
            cons = self.start_consumer(f"isolation-{label}", topic, group, ISOLATION_TIERS, env)
            try:
                run = self.drive([cons], "/ok", healthy, group, None, limit_s=60 + total / 200)
            finally:
                self.stop_consumers([cons], timeout=40)
            stats = rec.stats()
            ok = stats["paths"].get("/ok", {"count": 0, "first_ns": 0, "last_ns": 0})
            window = (ok["last_ns"] - ok["first_ns"]) / 1e9 if ok["count"] > 1 else None
            hang_stats = self.hang_receiver.stats()
            out[label] = {
                "healthy_delivered": ok["count"],
                "healthy_deliveries_per_s": rate(ok["count"], ok["first_ns"], ok["last_ns"]),
                "window_s": window,
                "wall_to_all_healthy_s": ((run["delivered_ns"] - cons.started_ns) / 1e9
                                          if run["delivered_ns"] else None),
                "stalled": run["timed_out"],  # a result here, not a bench failure
                "hang_requests": hang_stats["count"],
                "hang_max_concurrent": hang_stats["hang_max_concurrent"],
                "exit_ok": cons.exit_code == 0 and not cons.killed,
                "receiver": receiver_figures(stats, window),
            }
        out["ratio"] = ratio(out["with_hang"]["healthy_deliveries_per_s"],
                             out["without_hang"]["healthy_deliveries_per_s"])
        return out

    def phase_retry(self) -> dict[str, Any]:
        """6. Lateness of tier attempts: attempted_at(n) - next_attempt_at(n-1), from history."""
        topic = "bench.retry"
        n = self.sizes.retry_events
        tiers = RETRY_TIERS.split(",")
        attempts = len(tiers) + 1
        self.ensure_published(topic, SPACE_FAIL, n)
        rec = self.main_receiver()
        rec.reset()
        group = self.new_group(RETRY_TIERS)
        cons = self.start_consumer("retry", topic, group, RETRY_TIERS,
                                   {"PERKAMO_BREAKER_MIN_CALLS": "1000000"})
        try:
            run = self.drive([cons], "/fail", n * attempts, group, [topic, *(tier_topic(t) for t in tiers)],
                             limit_s=90 + n / 20)
        finally:
            self.stop_consumers([cons])
        rows = query_history_in_subprocess(
            str(cons.data_dir / "history"),
            "SELECT delivery_id, attempt, toUnixTimestamp64Milli(attempted_at), "
            "toUnixTimestamp64Milli(next_attempt_at), duration_ms, status "
            "FROM perkamo.webhook_attempts FINAL ORDER BY delivery_id, attempt",
        )
        by_delivery: dict[str, list[list[Any]]] = defaultdict(list)
        for row in rows:
            by_delivery[row[0]].append(row)
        late, late_start, per_tier = [], [], defaultdict(list)
        for attempts_of in by_delivery.values():
            for prev, cur in zip(attempts_of, attempts_of[1:], strict=False):
                if prev[3] is None or cur[1] != prev[1] + 1:
                    continue
                late.append(float(cur[2] - prev[3]))
                late_start.append(float(cur[2] - cur[4] - prev[3]))
                per_tier[tiers[prev[1] - 1] if prev[1] <= len(tiers) else "?"].append(float(cur[2] - prev[3]))
        statuses = Counter(r[5] for r in rows)
        stats = rec.stats()
        fail = stats["paths"].get("/fail", {"count": 0, "first_ns": 0, "last_ns": 0})
        window = (fail["last_ns"] - fail["first_ns"]) / 1e9 if fail["count"] > 1 else None
        return {
            "events": n,
            "tiers": RETRY_TIERS,
            "history_rows": len(rows),
            "deliveries": len(by_delivery),
            "complete_deliveries": sum(1 for a in by_delivery.values() if len(a) == attempts),
            "statuses": dict(statuses),
            "lateness": summary_ms(late),
            "lateness_from_start": summary_ms(late_start),
            "lateness_p99_by_tier_ms": {t: percentile(sorted(v), 99) for t, v in per_tier.items()},
            "never_early": bool(late) and min(late) >= 0,
            "all_committed": bool(run["committed_ns"]),
            "timed_out": run["timed_out"],
            "exit_ok": cons.exit_code == 0 and not cons.killed,
            "receiver": receiver_figures(stats, window),
        }

    def phase_scaling(self) -> dict[str, Any]:
        """7. Two consumers in one group vs one, both measured the same way: group assigned first,
        then N events published (see run_throughput)."""
        single = self.run_throughput("scaling-one", 1, topic="bench.scale.one", assigned_first=True)
        two = self.run_throughput("scaling-two", 2, topic="bench.scale.two", assigned_first=True)
        return {
            "one": single,
            "two": two,
            "deliveries_per_s_one": single["deliveries_per_s"],
            "deliveries_per_s_two": two["deliveries_per_s"],
            "ratio": ratio(two["deliveries_per_s"], single["deliveries_per_s"]),
        }


def produce_at_rate(producer: Producer, topic: str, rate_per_s: int, count: int, acks: list[float]) -> float:
    """Produce `count` latency events at a fixed rate, each stamped with data.context.sent_ns at
    produce time; appends each one's produce -> acknowledgement time (ms) to `acks`. Returns seconds."""
    def acked(err: Any, msg: Any) -> None:
        if err is None:
            sent = orjson.loads(msg.value())["data"]["context"]["sent_ns"]
            acks.append((time.time_ns() - sent) / 1e6)

    started = time.perf_counter()
    for i in range(count):
        delay = started + i / rate_per_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        producer.produce(topic, payload(SPACE_LAT, i, time.time_ns()), key=str(i).encode(), on_delivery=acked)
        producer.poll(0)
    elapsed = time.perf_counter() - started
    if producer.flush(30) != 0:
        raise PhaseError("latency events not acknowledged by the broker")
    return elapsed


def _lift_nofile() -> None:
    """5,000 in flight means as many sockets: lift the soft descriptor limit (children inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


# Profile summary ---------------------------------------------------------------------------


def summarize_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """py-spy `--format raw --threads` output (collapsed stacks) -> where the consumer's CPU goes:
    threads, self time by function (with its hottest line) and by package, and the inclusive
    time of the project's own functions (consumer/)."""
    total = 0
    self_fn: Counter[str] = Counter()
    self_line: dict[str, Counter[str]] = defaultdict(Counter)
    self_pkg: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    ours_line: dict[str, Counter[str]] = defaultdict(Counter)
    threads: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith(("thread", "process")) else "?"
        parsed = [_frame(f) for f in frames if not f.startswith(("thread", "process"))]
        if not parsed:
            continue
        total += count
        threads[thread] += count
        name, loc, pkg = parsed[-1]
        self_fn[name] += count
        self_line[name][loc] += count
        self_pkg[pkg] += count
        seen = set()
        for name, loc, pkg in parsed:
            if pkg == "consumer" and name not in seen:
                seen.add(name)
                ours[name] += count
                ours_line[name][loc] += count

    def pct(n: int) -> float:
        return round(100 * n / total, 1) if total else 0.0

    return {
        "samples": total,
        "threads": [{"thread": t, "pct": pct(n)} for t, n in threads.most_common(8)],
        "self": [{"function": fn, "at": self_line[fn].most_common(1)[0][0], "pct": pct(n)}
                 for fn, n in self_fn.most_common(top)],
        "self_by_package": [{"package": k, "pct": pct(n)} for k, n in self_pkg.most_common(top)],
        "consumer_inclusive": [{"function": fn, "at": ours_line[fn].most_common(1)[0][0], "pct": pct(n)}
                               for fn, n in ours.most_common(top)],
    }


def _frame(frame: str) -> tuple[str, str, str]:
    """py-spy's 'Class.func (pkg/mod.py:123)' -> ('Class.func (pkg/mod.py)', 'pkg/mod.py:123', 'pkg')."""
    name, sep, loc = frame.partition(" (")
    if not sep:
        return frame, frame, "?"
    loc = loc.rstrip(")")
    file, _, _line = loc.rpartition(":")
    file = file or loc
    package = file.split("/", 1)[0] if "/" in file else file.removesuffix(".py")
    return f"{name} ({file})", loc, package


# Report ------------------------------------------------------------------------------------


def _fmt(value: Any, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return f"{value}{unit}"


def table_rows(phases: dict[str, Any]) -> list[dict[str, Any]]:
    """(phase, figure, value, target, met) rows; met is None where there is no target."""
    rows: list[dict[str, Any]] = []

    def row(phase: str, figure: str, value: Any, target: str = "", met: bool | None = None,
            unit: str = "", digits: int = 1) -> None:
        rows.append({"phase": phase, "figure": figure, "value": value, "shown": _fmt(value, unit, digits),
                     "target": target, "met": met})

    def check(value: float | None, good: Callable[[float], bool]) -> bool | None:
        return None if value is None else bool(good(value))

    def receiver_row(phase: str, doc: dict[str, Any]) -> None:
        share = doc.get("receiver", {}).get("core_share")
        row(phase, "receiver CPU, share of one core", share, f"< {RECEIVER_BUSY} (not the bottleneck)",
            check(share, lambda v: v < RECEIVER_BUSY), digits=2)

    for name, doc in phases.items():
        if "error" in doc:
            row(name, "phase failed", doc["error"].splitlines()[0][:80], "runs", False)
            continue
        if name == "raw":
            row("1 raw", "raw ceiling, deliveries/s", doc["deliveries_per_s"], unit="/s", digits=0)
            row("1 raw", "raw client CPU, share of one core", doc["client_core_share"], digits=2)
            receiver_row("1 raw", doc)
        elif name == "e2e":
            on, off = doc["metrics_on"], doc["metrics_off"]
            v = on["deliveries_per_s"]
            row("2 e2e", "deliveries/s, history on, metrics on", v, f">= {TARGET_E2E_RATE:,.0f}/s",
                check(v, lambda x: x >= TARGET_E2E_RATE), "/s", 0)
            row("2 e2e", "ratio to raw ceiling", doc["ratio_to_raw"], f">= {TARGET_RAW_RATIO}",
                check(doc["ratio_to_raw"], lambda x: x >= TARGET_RAW_RATIO), digits=2)
            row("2 e2e", "deliveries/s, wall (start -> all committed)", on["deliveries_per_s_wall"],
                unit="/s", digits=0)
            row("2 e2e", "CPU s per 1,000 deliveries (steady; whole process)",
                f"{_fmt(on['cpu_s_per_1k_steady'], digits=3)} ; {_fmt(on['cpu_s_per_1k'], digits=3)}")
            row("2 e2e", "consumer CPU, share of one core", on["consumer_core_share"], digits=2)
            proc = on["per_process"][0]
            row("2 e2e", "history flushes: average s (count)",
                f"{_fmt(proc['history_flush_avg_s'], ' s', 3)} ({_fmt(proc['history_flushes'])})")
            row("2 e2e", "deliveries/s, metrics off", off["deliveries_per_s"], unit="/s", digits=0)
            row("2 e2e", "metrics off / on (throughput)", doc["metrics_off_over_on"], digits=2)
            row("2 e2e", "CPU per delivery spent on metrics", doc["metrics_cpu_share"], digits=3)
            row("2 e2e", "all offsets committed, exit 0", on["all_committed"] and off["all_committed"]
                and on["exit_ok"] and off["exit_ok"], "yes", on["all_committed"] and off["all_committed"]
                and on["exit_ok"] and off["exit_ok"])
            receiver_row("2 e2e", on)
        elif name == "latency":
            row("3 latency", f"p50 at {doc['rate_per_s']}/s", doc["p50_ms"], unit=" ms")
            row("3 latency", "p95", doc["p95_ms"], unit=" ms")
            row("3 latency", "p99", doc["p99_ms"], f"< {TARGET_P99_MS:.0f} ms",
                check(doc["p99_ms"], lambda x: x < TARGET_P99_MS), " ms")
            row("3 latency", "max", doc["max_ms"], unit=" ms")
            row("3 latency", "received / produced", f"{doc['received']:,} / {doc['produced']:,}")
            ack = doc["produce_ack"]
            row("3 latency", "produce -> broker ack p50 ; p99 (broker share)",
                f"{_fmt(ack['p50_ms'], ' ms')} ; {_fmt(ack['p99_ms'], ' ms')}")
            receiver_row("3 latency", doc)
        elif name == "memory":
            v = doc["peak_rss_mb"]
            row("4 memory", f"peak RSS at {doc['in_flight_limit']:,} in flight", v,
                f"< {TARGET_RSS_MB:.0f} MB", check(v, lambda x: x < TARGET_RSS_MB), " MB")
            row("4 memory", "RSS when started (of which file-backed: the engine's library)",
                f"{_fmt(doc['rss_at_start_mb'], ' MB')} ({_fmt(doc['rss_file_at_start_mb'], ' MB')})")
            row("4 memory", "peak anonymous RSS (sampled every 0.2 s)", doc["rss_anon_max_sampled_mb"],
                unit=" MB")
            row("4 memory", "in flight reached: consumer gauge (receiver concurrent)",
                f"{doc['in_flight_max_observed']:,} ({doc['receiver_max_concurrent']:,})",
                f"~{doc['in_flight_limit']:,}", doc["in_flight_max_observed"] >= doc["in_flight_limit"] * 0.9)
            failed = sum(v for k, v in doc["attempts_by_outcome"].items() if k != "delivered")
            row("4 memory", "failed attempts (timeouts, open circuit)", failed, "0", failed == 0)
            receiver_row("4 memory", doc)
        elif name == "isolation":
            row("5 isolation", "healthy deliveries/s without hanging endpoint",
                doc["without_hang"]["healthy_deliveries_per_s"], unit="/s", digits=0)
            row("5 isolation", "healthy deliveries/s with 20 % hanging",
                doc["with_hang"]["healthy_deliveries_per_s"], unit="/s", digits=0)
            row("5 isolation", "ratio", doc["ratio"], f">= {TARGET_ISOLATION}",
                check(doc["ratio"], lambda x: x >= TARGET_ISOLATION), digits=2)
            receiver_row("5 isolation", doc["with_hang"])
        elif name == "retry":
            late = doc["lateness"]
            row("6 retry", "lateness p50", late["p50_ms"], unit=" ms", digits=0)
            row("6 retry", "lateness p99", late["p99_ms"], f"< {TARGET_RETRY_P99_MS:.0f} ms",
                check(late["p99_ms"], lambda x: x < TARGET_RETRY_P99_MS), " ms", 0)
            row("6 retry", "lateness max", late["max_ms"], unit=" ms", digits=0)
            row("6 retry", "lateness min (never early)", late["min_ms"], ">= 0 ms",
                check(late["min_ms"], lambda x: x >= 0), " ms", 0)
            row("6 retry", "complete deliveries (4 attempts)",
                f"{doc['complete_deliveries']} / {doc['events']}", f"{doc['events']}",
                doc["complete_deliveries"] == doc["events"])
        elif name == "scaling":
            row("7 scaling", "deliveries/s, one process", doc["deliveries_per_s_one"], unit="/s", digits=0)
            row("7 scaling", "deliveries/s, two processes", doc["deliveries_per_s_two"], unit="/s", digits=0)
            each = " ; ".join(f"{_fmt(p['deliveries_per_s'], '/s', 0)} ({_fmt(p['event_partitions'])})"
                              for p in doc["two"]["per_process"])
            row("7 scaling", "deliveries/s of each of the two (events-topic partitions held)", each)
            row("7 scaling", "ratio two / one", doc["ratio"], digits=2)
            receiver_row("7 scaling", doc["two"])
    return rows


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("phase", "figure", "value", "target", "met?"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for r in rows:
        met = "" if r["met"] is None else ("[green]yes[/]" if r["met"] else "[red]NO[/]")
        table.add_row(r["phase"], r["figure"], r["shown"], r["target"], met)
    Console(width=max(120, shutil.get_terminal_size().columns)).print(table)


# Main --------------------------------------------------------------------------------------


def parse_only(text: str | None, smoke: bool) -> list[str]:
    if not text:
        return list(SMOKE_PHASES if smoke else PHASES)
    chosen = []
    for raw_part in text.split(","):
        part = raw_part.strip()
        if part.isdigit() and 1 <= int(part) <= len(PHASES):
            part = PHASES[int(part) - 1]
        if part not in PHASES:
            raise SystemExit(f"bench: unknown phase {part!r}; phases: {', '.join(PHASES)} (or 1-7)")
        chosen.append(part)
    return [p for p in PHASES if p in chosen]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (5k events) for development")
    size.add_argument("--smoke", action="store_true", help="tiny, phases 1,2,3,6 only, < 2 min (CI)")
    parser.add_argument("--events", type=int, help="events for phases 1, 2, 7 (default 200k; quick 5k)")
    parser.add_argument("--only", help=f"comma-separated phases: {','.join(PHASES)} (or 1-7)")
    parser.add_argument("--concurrency", type=int,
                        help="per-endpoint in-flight limit and the raw client's connection limit (100)")
    parser.add_argument("--receivers", type=int, help="receiver processes sharing the port (SO_REUSEPORT)")
    parser.add_argument("--out-dir", default=str(REPO / "bench-results"), help="where the JSON goes")
    parser.add_argument("--consumer-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for every consumer (e.g. PERKAMO_LOG_LEVEL=WARNING)")
    parser.add_argument("--profile", metavar="FILE",
                        help="py-spy the metrics-on consumer of phase 2 into FILE (collapsed stacks)")
    parser.add_argument("--profile-native", action="store_true", help="include native frames in --profile")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, data) afterwards")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _lift_nofile()
    sizes = sizes_for(args)
    phases = parse_only(args.only, args.smoke)
    if args.profile and "e2e" not in phases:
        raise SystemExit("bench: --profile profiles phase 2 (e2e); include it in --only")
    started = datetime.now(UTC)
    workdir = Path(tempfile.mkdtemp(prefix="perkamo-bench-"))
    load_before = os.getloadavg()
    print(f"bench: {sizes.mode} sizes, phases {','.join(phases)}; work dir {workdir}; "
          f"load average {load_before[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    bench = Bench(args, sizes, workdir)
    results: dict[str, Any] = {}
    bench.results = results
    results["phases"] = {}
    failed = False
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        bench.start()
        for name in phases:
            print(f"bench: phase {PHASES.index(name) + 1} {name} ...", flush=True)
            phase_started = time.monotonic()
            try:
                doc = getattr(bench, f"phase_{name}")()
            except (PhaseError, subprocess.SubprocessError, OSError, ValueError) as exc:
                failed = True
                doc = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
                print(f"bench: phase {name} failed: {exc}", file=sys.stderr, flush=True)
            doc["phase_s"] = round(time.monotonic() - phase_started, 1)
            doc["load_average_after"] = round(os.getloadavg()[0], 2)
            results["phases"][name] = doc
            if _phase_incomplete(doc):
                failed = True
    except KeyboardInterrupt:
        failed = True
        print("bench: interrupted", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
        CHILDREN.kill_all()
        with contextlib.suppress(Exception):
            bench.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    finished = datetime.now(UTC)
    rows = table_rows(results["phases"])
    doc = {
        "meta": {
            "started": started.isoformat(timespec="seconds"),
            "finished": finished.isoformat(timespec="seconds"),
            "mode": sizes.mode,
            "phases": phases,
            "sizes": asdict(sizes),
            "argv": sys.argv[1:] if argv is None else argv,
            "machine": {"cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
                        "python": platform.python_version(), "platform": platform.platform()},
            "broker_start_s": results.get("broker_start_s"),
            "consumer_env": bench.extra_env,
            "work_dir": str(workdir) if args.keep else None,
            "completed": not failed,
        },
        "phases": results["phases"],
        "table": [{k: v for k, v in r.items() if k != "shown"} for r in rows],
    }
    if "profile" in results:
        doc["profile"] = results["profile"]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"bench-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2, default=str))
    print_table(rows, f"Perkamo webhooks bench ({sizes.mode}; load average before {load_before[0]:.2f} "
                      f"on {os.cpu_count()} CPUs)")
    if "profile" in results:
        print_profile(results["profile"])
    print(f"bench: results in {out}", flush=True)
    return 1 if failed else 0


def _raise_interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def _phase_incomplete(doc: dict[str, Any]) -> bool:
    """A phase that ran but whose consumer did not exit cleanly, or that ran out of time."""
    if "error" in doc:
        return True
    parts = [doc, *(v for v in doc.values() if isinstance(v, dict))]
    return any(p.get("timed_out") or p.get("exit_ok") is False for p in parts)


def print_profile(profile: dict[str, Any]) -> None:
    print(f"\nprofile of the phase-2 consumer: {profile['samples']} samples ({profile.get('file')})")
    print("threads: " + ", ".join(f"{t['thread']} {t['pct']}%" for t in profile["threads"]))
    print("self time by function:")
    for item in profile["self"]:
        print(f"  {item['pct']:5.1f}%  {item['function']}  hottest at {item['at']}")
    packages = ", ".join(f"{i['package']} {i['pct']}%" for i in profile["self_by_package"])
    print(f"self time by package: {packages}")
    print("inclusive time of consumer/ functions:")
    for item in profile["consumer_inclusive"]:
        print(f"  {item['pct']:5.1f}%  {item['function']}  hottest at {item['at']}")


if __name__ == "__main__":
    sys.exit(main())
