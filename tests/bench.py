"""`make bench`: the deliver and history roles measured against a raw aiohttp ceiling, in one run.

    python -m tests.bench [--quick | --smoke] [--events N] [--only e2e,outage] [--out-dir DIR]
    python -m tests.bench --profile [FILE]        # phases raw,e2e plus a py-spy profile of the
                                                  # deliver role (pip install py-spy into the venv);
                                                  # add --only all for every phase

Everything is real and on loopback: an Apache Kafka broker started for the run
(deploy/kafka/kafka.sh, free ports, a temp KAFKA_DIR, stopped at the end); the service as its
roles, each a subprocess with its own admin port and PERKAMO_DATA_DIR: `python -m consumer run
--role deliver` (events in, HTTP calls, attempt records out to perkamo.webhooks.attempts) and
`--role history` (attempt records into the embedded ClickHouse, in a group of its own); HTTPS
receivers in processes of their own (tests/bench_receiver.py, a trustme test CA). The raw
ceiling is a bare aiohttp client in a subprocess (tests/bench_client.py). Phases:

    1 raw        aiohttp client -> receiver, deliveries/s and CPU per request (the ceiling)
    2 e2e        N pre-published events, 6 partitions, one Space: one deliver role with a history
                 role running, after an unmeasured warm-up run (the broker's JIT, first inserts);
                 deliveries/s, ratio to the ceiling, CPU per delivery (per thread), GC time,
                 metrics on and off; then the history role's catch-up (attempts-topic lag 0)
    3 latency    fixed produce rate (at most half of phase 2's deliveries/s); receiver takes
                 arrival - data.context.sent_ns
    4 memory     deliver role peak RSS (VmHWM) with 5,000 deliveries in flight (answers after 8 s)
    5 isolation  healthy deliveries/s while 20 % of events go to a hanging endpoint, vs without
    6 retry      lateness of tier attempts (tiers 1s,2s,4s, an endpoint answering 500), read from
                 the history role's data dir once it caught up and stopped
    7 scaling    two deliver roles in one group vs one (history role running)
    8 outage     steady stream; the history role stopped (SIGTERM) for a while, then started
                 again; and its store failing for as long (tests/faults/faulty_run.py): deliveries/s
                 during vs before, and rows lost (receiver's attempts vs history rows, FINAL)

Sizes: default (what `make bench` runs: 30k events, 1,000/s for 15 s, a 60 s outage, ...; about
15 minutes on 2 cores), `--quick` (5k events, 10 s outages; about 5 minutes, for development),
`--smoke` (phases 1,2,3,6,8 tiny, 80-90 s; for CI, not timed). Every phase has a time limit and
stops by itself. Results: a table on stdout (figure, target, met) and a JSON file
bench-results/bench-<UTC>.json. Exit status 0 when every phase ran (targets met or not), 1 when
a phase failed to run.

`--profile` runs phase 2 once more under py-spy (native frames, so C code and the cyclic GC show;
the measured runs stay unprofiled), from the first deliveries to the last commit, and prints the
top 20 functions, the threads and the GC's share. The collapsed stacks stay in FILE (flamegraph.pl
and speedscope read them). Phase 2's metrics-on run always starts the deliver role through a
launcher that times every GC collection with gc.callbacks (thread CPU time): the table's GC row.
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
import threading
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
from consumer.constants import ATTEMPTS_TOPIC, HELD_TOPIC, REDELIVER_TOPIC
from consumer.kafka_topics import ensure_topics, wait_for_broker
from consumer.retry_policy import tier_topic
from consumer.topics import plan
from tests.bench_client import payload
from tests.bench_receiver import make_certs
from tests.support import end_offsets, fast_forward_group, free_port, query_history_in_subprocess, unique

REPO = Path(__file__).resolve().parent.parent
KAFKA_SCRIPT = REPO / "deploy" / "kafka" / "kafka.sh"
FAULTY_RUN = REPO / "tests" / "faults" / "faulty_run.py"
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")

PHASES = ("raw", "e2e", "latency", "memory", "isolation", "retry", "scaling", "outage")
SMOKE_PHASES = ("raw", "e2e", "latency", "retry", "outage")
PROFILE_PHASES = ("raw", "e2e")
PARTITIONS = 6
DEFAULT_TIERS = "10s,1m,10m,1h,6h,24h"
ISOLATION_TIERS = "1h"
RETRY_TIERS = "1s,2s,4s"
EVENT_TOPICS = ("warm", "e2e", "latency", "memory", "iso.base", "iso.mix", "retry", "scale.one", "scale.two",
                "stream")

# Spaces (one endpoint each) and the receiver path each one's endpoint points at.
SPACE_OK, SPACE_LAT, SPACE_SLOW, SPACE_FAIL, SPACE_HANG, SPACE_STREAM = (
    "bench-live", "bench-latency", "bench-slow", "bench-fail", "bench-hang", "bench-stream")

# Targets: issue 14 (the roles split) and, for latency, isolation and retries, issue 9.
TARGET_RAW_RATIO = 0.65
AIM_RAW_RATIO = 0.8
TARGET_P99_MS = 50.0
TARGET_RSS_MB = 150.0
TARGET_ISOLATION = 0.9
TARGET_RETRY_P99_MS = 1000.0
TARGET_SCALING = 1.3
TARGET_CATCH_UP_S = 5.0
TARGET_OUTAGE_RATIO = 0.9
# Phase 4's endpoint answers after 8 s: deliveries pile up to the in-flight limit even while
# the machine completes only a few hundred a second.
MEMORY_PATH = "/slow8"
RECEIVER_BUSY = 0.9  # a receiver above this share of one core may be what limits the figure
_LAG_SERIES = re.compile(r'^perkamo_webhook_consumer_lag\{[^}]*partition="(\d+)"[^}]*\}', re.MULTILINE)
_PYSPY_THREAD = re.compile(r'^Thread (\d+) \([^)]*\): "(.*)"', re.MULTILINE)

# The deliver role started through this launcher (phase 2's metrics-on and profiled runs) times
# every cyclic GC collection with gc.callbacks, in CPU time of the collecting thread (so neither
# descheduling on a busy machine nor py-spy's pauses count), and writes the totals, with a
# timeline, to $BENCH_GC_OUT at exit. Everything else is `python -m consumer` as is.
GC_LAUNCHER = r"""
import atexit, gc, json, os, sys, time
_out, _clock = os.environ["BENCH_GC_OUT"], time.thread_time
_t, _spent, _count, _collected, _timeline, _last = [0.0], [0.0, 0.0, 0.0], [0, 0, 0], [0], [], [0.0]
def _point():
    _timeline.append((time.time_ns(), sum(_spent), *_count))
def _cb(phase, info):
    if phase == "start":
        _t[0] = _clock()
        return
    g, now = info["generation"], _clock()
    _spent[g] += now - _t[0]
    _count[g] += 1
    _collected[0] += info["collected"]
    if now - _last[0] >= 0.2:
        _last[0] = now
        _point()
def _write():
    _point()
    with open(_out, "w") as f:
        json.dump({"seconds": _spent, "collections": _count, "collected": _collected[0],
                   "timeline": _timeline, "freeze_count": gc.get_freeze_count(),
                   "thresholds": gc.get_threshold()}, f)
gc.callbacks.append(_cb)
atexit.register(_write)
_point()
from consumer.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@dataclass
class Sizes:
    mode: str
    events: int  # phases 1, 2, 7: the burst the history role must catch up with
    concurrency: int  # PERKAMO_MAX_IN_FLIGHT_PER_ENDPOINT and the raw client's connection limit
    max_in_flight: int
    latency_rate: int
    latency_seconds: float
    memory_events: int
    memory_in_flight: int
    isolation_events: int
    retry_events: int
    receivers: int
    stream_rate: int  # phase 8: a steady stream at this rate...
    stream_before_s: float  # ...measured this long before the outage,
    outage_s: float  # ...during it,
    stream_after_s: float  # ...and this long after the history role is back
    store_fault: bool  # phase 8 also with the store failing, not only the role stopped
    metrics_off: bool  # phase 2 also with metrics off
    warm_up_events: int  # phase 2 first runs this many, unmeasured (0: none)


def sizes_for(args: argparse.Namespace) -> Sizes:
    if args.smoke:
        sizes = Sizes("smoke", 500, 100, 1000, 100, 3.0, 15_000, 5000, 500, 50, 1,
                      150, 2.0, 3.0, 2.0, False, False, 0)
    elif args.quick:
        sizes = Sizes("quick", 5_000, 100, 1000, 300, 5.0, 15_000, 5000, 5_000, 200, 1,
                      300, 6.0, 10.0, 6.0, True, True, 3_000)
    else:
        sizes = Sizes("full", 30_000, 100, 1000, 1000, 15.0, 20_000, 5000, 30_000, 200, 1,
                      500, 20.0, 60.0, 20.0, True, True, 10_000)
    if args.events:
        sizes.events = args.events
        sizes.isolation_events = min(args.events, 50_000)
    if args.concurrency:
        sizes.concurrency = args.concurrency
    if args.receivers:
        sizes.receivers = args.receivers
    if args.outage_s:
        sizes.outage_s = args.outage_s
    return sizes


class PhaseError(Exception):
    """A phase could not produce its figures (a process died, a deadline passed before any result)."""


# Small helpers ---------------------------------------------------------------------------


def now_ns() -> int:
    return time.time_ns()


def _stat_cpu(data: str) -> float:
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    try:
        return _stat_cpu(Path(f"/proc/{pid}/stat").read_text())
    except OSError:
        return None


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (comm, utime + stime) of each live thread, from /proc/<pid>/task/*/stat."""
    out: dict[int, tuple[str, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            data = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        out[int(tid)] = (data[data.index("(") + 1:data.rindex(")")], _stat_cpu(data))
    return out


def proc_status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def maps_mention(pid: int, word: str) -> bool | None:
    """Whether any mapping of the process names `word` (e.g. the chDB engine's library)."""
    try:
        return word in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None


def pyspy_path() -> str | None:
    found = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    return found if Path(found).exists() else None


def python_thread_names(pid: int) -> dict[int, str]:
    """tid -> Python thread name (py-spy dump, when py-spy is installed; else {})."""
    pyspy = pyspy_path()
    if pyspy is None:
        return {}
    try:
        out = subprocess.run([pyspy, "dump", "--pid", str(pid), "--nonblocking"], capture_output=True,
                             timeout=20, check=False).stdout.decode(errors="replace")
    except (OSError, subprocess.SubprocessError):
        return {}
    return {int(m.group(1)): m.group(2) for m in _PYSPY_THREAD.finditer(out)}


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


def mean(values: list[float | None]) -> float | None:
    """The mean of the figures that exist (None if none does)."""
    known = [v for v in values if v is not None]
    return round(sum(known) / len(known), 1) if known else None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def r3(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


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

    def stats(self, latencies: bool = False, ids: bool = False) -> dict[str, Any]:
        """The processes' figures added up."""
        query = "&".join(q for q, on in (("latencies=1", latencies), ("ids=1", ids)) if on)
        docs = [orjson.loads(http_get(f"http://127.0.0.1:{c}/stats{'?' + query if query else ''}", 30)[1])
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
        if ids:
            out["ids"] = [x for d in docs for x in d.get("ids", [])]
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


Sample = tuple[int, float, dict[int, tuple[str, float]]]  # (time ns, process CPU s, per-thread CPU)


@dataclass
class RoleProc:
    """One `python -m consumer run --role R` process with its own data dir and admin port."""

    name: str
    role: str  # "deliver" or "history"
    proc: subprocess.Popen[bytes]
    admin: str
    data_dir: Path
    log_path: Path
    started_ns: int
    group: str  # the deliver group, or the history group on the attempts topic
    base_records: int = 0  # history: attempts-topic end offsets (summed) when its group was made
    samples: list[Sample] = field(default_factory=list)
    exit_code: int | None = None
    killed: bool = False
    term_sent: bool = False
    stop_s: float | None = None  # SIGTERM -> exit

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def sample(self) -> None:
        cpu = proc_cpu_s(self.pid)
        if cpu is not None:
            self.samples.append((now_ns(), cpu, thread_cpu(self.pid)))

    def _around(self, first_ns: int, last_ns: int) -> tuple[Sample, Sample] | None:
        before = [s for s in self.samples if s[0] <= first_ns] or self.samples[:1]
        after = [s for s in self.samples if s[0] >= last_ns] or self.samples[-1:]
        if not before or not after or after[0][0] <= before[-1][0]:
            return None
        return before[-1], after[0]

    def cpu_between(self, first_ns: int, last_ns: int) -> tuple[float, float]:
        """(CPU seconds, wall seconds) between the samples just outside [first_ns, last_ns]."""
        around = self._around(first_ns, last_ns)
        if around is None:
            return 0.0, 0.0
        a, b = around
        return b[1] - a[1], (b[0] - a[0]) / 1e9

    def threads_between(self, first_ns: int, last_ns: int, names: dict[int, str]) -> list[dict[str, Any]]:
        """CPU per thread over the window, threads of one name added up, busiest first. Names:
        the Python thread name where known (py-spy dump), MainThread for the main thread (the
        asyncio loop), else the kernel's (librdkafka names its threads rdk:*)."""
        around = self._around(first_ns, last_ns)
        if around is None:
            return []
        (t0, cpu0, before), (t1, cpu1, after) = around
        wall = (t1 - t0) / 1e9
        groups: dict[str, list[float]] = defaultdict(list)
        for tid, (comm, cpu) in after.items():
            label = names.get(tid) or ("MainThread" if tid == self.pid else comm)
            label = re.sub(r"_\d+$", "_N", label)  # executor workers: one line per pool
            groups[label].append(cpu - before.get(tid, (comm, 0.0))[1])
        gone = (cpu1 - cpu0) - sum(sum(v) for v in groups.values())
        if gone > max(0.05, 0.01 * (cpu1 - cpu0)):  # not just tick rounding
            groups["(threads that ended in the window)"].append(gone)
        total = cpu1 - cpu0
        rows = [{"thread": label, "threads": len(v), "cpu_s": round(sum(v), 3),
                 "share_of_process": round(sum(v) / total, 3) if total else None,
                 "core_share": round(sum(v) / wall, 3) if wall else None}
                for label, v in groups.items()]
        return sorted(rows, key=lambda r: -r["cpu_s"])

    def get(self, path: str, timeout: float = 1.0) -> int:
        try:
            return http_get(f"http://{self.admin}{path}", timeout)[0]
        except OSError:
            return 0

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
        started = time.monotonic()
        self.terminate()
        try:
            self.exit_code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.killed = True
            self.exit_code = self.proc.wait(10)
        self.stop_s = round(time.monotonic() - started, 2)

    def exit_ok(self) -> bool:
        return self.exit_code == 0 and not self.killed


def _sum_committed(probe: Consumer, ends: dict[tuple[str, int], int]) -> tuple[bool, int]:
    """(every partition's committed offset reached its end, records not yet committed)."""
    tps = [TopicPartition(t, p) for (t, p) in ends]
    got = {(tp.topic, tp.partition): tp.offset for tp in probe.committed(tps, timeout=10)}
    behind = sum(max(0, v - max(got.get(k, 0), 0)) for k, v in ends.items())
    return all(got.get(k, -1) >= v for k, v in ends.items() if v > 0), behind


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
        self.history_env = dict(kv.split("=", 1) for kv in args.history_env)
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
            {"space": SPACE_SLOW, "url": self.receiver.url(MEMORY_PATH), "active": True},
            {"space": SPACE_FAIL, "url": self.receiver.url("/fail"), "active": True},
            {"space": SPACE_HANG, "url": self.hang_receiver.url("/hang"), "active": True},
            {"space": SPACE_STREAM, "url": self.receiver.url("/stream"), "active": True},
        ]
        self.endpoints_file.write_bytes(orjson.dumps(records))
        topics = {}
        for tiers in (DEFAULT_TIERS, ISOLATION_TIERS, RETRY_TIERS):
            settings = load_settings(kafka_bootstrap_servers=self.broker.bootstrap,
                                     events_topics=[f"bench.{n}" for n in EVENT_TOPICS],
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

    def probe(self, group: str) -> Consumer:
        return Consumer({"bootstrap.servers": self.broker.bootstrap, "group.id": group,
                         "enable.auto.commit": False})

    # Roles -------------------------------------------------------------------------------

    def _env(self, name: str, extra: dict[str, str]) -> tuple[dict[str, str], Path]:
        data_dir = self.workdir / f"{name}-data"
        data_dir.mkdir(parents=True, exist_ok=True)
        full = {k: v for k, v in os.environ.items() if not k.startswith("PERKAMO_")}
        full.update({
            "PERKAMO_KAFKA_BOOTSTRAP_SERVERS": self.broker.bootstrap,
            "PERKAMO_DATA_DIR": str(data_dir),
            "PERKAMO_ENDPOINTS_FILE": str(self.endpoints_file),
            "PERKAMO_CA_BUNDLE": str(self.ca_file),
            "PERKAMO_ALLOW_PRIVATE_NETWORKS": "127.0.0.0/8",
            "PERKAMO_MAX_IN_FLIGHT": str(self.sizes.max_in_flight),
            "PERKAMO_MAX_IN_FLIGHT_PER_ENDPOINT": str(self.sizes.concurrency),
            "PERKAMO_DELIVERY_TIMEOUT_S": "5",
            # both listeners on free ports, whichever one the role opens
            "PERKAMO_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
            "PERKAMO_DELIVER_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
        })
        full.update(extra)
        return full, data_dir

    def _spawn(self, name: str, role: str, cmd: list[str], env: dict[str, str], admin: str,
               data_dir: Path, group: str) -> RoleProc:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        CHILDREN.add(proc)
        return RoleProc(name, role, proc, admin, data_dir, log_path, now_ns(), group)

    def start_deliver(self, name: str, topic: str, group: str, tiers: str, env: dict[str, str] | None = None,
                      worker: int = 0, gc_out: Path | None = None, launcher: str = "") -> RoleProc:
        """`run --role deliver --worker I`: its /metrics on a free port (the base port minus I, as
        the role listens on base + worker index)."""
        port = free_port()
        full, data_dir = self._env(name, {
            "PERKAMO_EVENTS_TOPICS": topic, "PERKAMO_GROUP_ID": group, "PERKAMO_RETRY_TIERS": tiers,
            "PERKAMO_DELIVER_ADMIN_LISTEN": f"127.0.0.1:{port - worker}",
            **(env or {}), **self.extra_env})
        args = ["run", "--role", "deliver", "--worker", str(worker)]
        if gc_out is not None:
            full["BENCH_GC_OUT"] = str(gc_out)
            cmd = [PYTHON, "-c", GC_LAUNCHER, *args]
        elif launcher:  # a module wrapping consumer.cli.main (tests/bench_tracing.py)
            cmd = [PYTHON, "-m", launcher, *args]
        else:
            cmd = [PYTHON, "-m", "consumer", *args]
        return self._spawn(name, "deliver", cmd, full, f"127.0.0.1:{port}", data_dir, group)

    def new_history_group(self) -> tuple[str, int]:
        """A history group positioned at the attempts topic's end (earlier phases left records)."""
        group = unique("bench-history")
        fast_forward_group(self.broker.bootstrap, group, [ATTEMPTS_TOPIC])
        return group, sum(self.ends([ATTEMPTS_TOPIC]).values())

    def start_history(self, name: str, topic: str, tiers: str, group: tuple[str, int] | None = None,
                      data_name: str | None = None, control_dir: Path | None = None) -> RoleProc:
        """`run --role history` in a fresh group at the attempts topic's end (or `group`, to start
        it again), with its own data dir (or `data_name`'s). With `control_dir`: the same role
        through tests/faults/faulty_run.py, whose store fails while control_dir/history-down exists."""
        group_id, base = group or self.new_history_group()
        port = free_port()
        full, data_dir = self._env(data_name or name, {
            "PERKAMO_EVENTS_TOPICS": topic, "PERKAMO_RETRY_TIERS": tiers,
            "PERKAMO_HISTORY_GROUP_ID": group_id, "PERKAMO_GROUP_ID": unique("bench-unused"),
            "PERKAMO_ADMIN_LISTEN": f"127.0.0.1:{port}",
            "PERKAMO_LAG_INTERVAL_S": "1",  # the lag gauge read beside the committed offsets
            **self.history_env})
        if control_dir is not None:
            control_dir.mkdir(parents=True, exist_ok=True)
            full["FAULTS_CONTROL_DIR"] = str(control_dir)
            cmd = [PYTHON, "-m", "tests.faults.faulty_run"]
        else:
            cmd = [PYTHON, "-m", "consumer", "run", "--role", "history"]
        hist = self._spawn(name, "history", cmd, full, f"127.0.0.1:{port}", data_dir, group_id)
        hist.base_records = base
        return hist

    def new_group(self, tiers: str, topics: list[str] | None = None) -> str:
        """A fresh deliver group, at the end of its retry topics and the held topic (earlier
        phases left messages there), and of `topics`."""
        group = unique("bench")
        shared = [*(tier_topic(t) for t in tiers.split(",")), HELD_TOPIC, REDELIVER_TOPIC]
        fast_forward_group(self.broker.bootstrap, group, [*shared, *(topics or [])])
        return group

    @staticmethod
    def deliver_partitions(tiers: str) -> int:
        """What a deliver group is assigned: the events topic, the redeliver topic, each retry
        tier, the held topic."""
        return PARTITIONS * (3 + len(tiers.split(",")))

    def stop_roles(self, roles: list[RoleProc], timeout: float = 60.0) -> None:
        for role in roles:
            role.terminate()
        for role in roles:
            role.stop(timeout)

    def wait_up(self, roles: list[RoleProc], timeout: float = 90.0, path: str = "/healthz") -> None:
        """Until each answers 200 on `path` (/readyz for a history role: assigned, store up)."""
        deadline = time.monotonic() + timeout
        pending = list(roles)
        while pending:
            for role in list(pending):
                if not role.alive():
                    raise PhaseError(f"{role.name} exited with {role.proc.returncode}:\n{role.tail()}")
                if role.get("/readyz" if role.role == "history" else path) == 200:
                    pending.remove(role)
            if time.monotonic() > deadline:
                names = [r.name for r in pending]
                raise PhaseError(f"{names} not up in {timeout:.0f}s:\n{pending[0].tail()}")
            time.sleep(0.05)

    def wait_assigned(self, roles: list[RoleProc], partitions: int, timeout: float = 90.0) -> None:
        """Until the members' assigned-partitions gauges add up to `partitions`, each having some."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = []
            for role in roles:
                if not role.alive():
                    raise PhaseError(f"{role.name} exited:\n{role.tail()}")
                counts.append(metric_sum(role.metrics(), "perkamo_webhook_assigned_partitions"))
            if sum(counts) == partitions and all(counts):
                return
            time.sleep(0.1)
        raise PhaseError(f"group assignment of {partitions} partitions not complete in {timeout:.0f}s")

    def check_alive(self, roles: list[RoleProc]) -> None:
        for role in roles:
            role.sample()
            if not role.alive():
                raise PhaseError(f"{role.name} exited with {role.proc.returncode}:\n{role.tail()}")

    def sleep_until(self, deadline: float, roles: list[RoleProc]) -> None:
        """Sleep until time.monotonic() reaches `deadline`, sampling and watching `roles`."""
        while True:
            self.check_alive(roles)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.2, left))

    def drive(self, consumers: list[RoleProc], path: str, expect: int, group: str,
              commit_topics: list[str] | None, limit_s: float, watch: list[RoleProc] | None = None,
              on_poll: Callable[[], None] | None = None, interval: float = 0.2) -> dict[str, Any]:
        """Poll until the receiver saw `expect` requests on `path` and (if `commit_topics`) the
        deliver group's committed offsets reached the end offsets; sample CPU (`consumers` and
        `watch`) meanwhile."""
        receiver = self.main_receiver() if path != "/hang" else self.hang_receiver
        assert receiver is not None
        roles = [*consumers, *(watch or [])]
        deadline = time.monotonic() + limit_s
        delivered_ns = committed_ns = 0
        ends: dict[tuple[str, int], int] = {}
        probe = None
        timed_out = False
        try:
            while True:
                self.check_alive(roles)
                if on_poll is not None:
                    on_poll()
                if not delivered_ns and receiver.path_count(path) >= expect:
                    delivered_ns = now_ns()
                    if commit_topics:
                        ends = self.ends(commit_topics)
                        probe = self.probe(group)
                if delivered_ns and not commit_topics:
                    break
                if delivered_ns and probe is not None and _sum_committed(probe, ends)[0]:
                    committed_ns = now_ns()
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(interval)
        finally:
            if probe is not None:
                probe.close()
        for role in roles:
            role.sample()
        return {"delivered_ns": delivered_ns, "committed_ns": committed_ns, "timed_out": timed_out}

    def history_mark(self, hist: RoleProc) -> tuple[int, int]:
        """(attempt records on the topic, rows the history role wrote) now: a run's starting point."""
        rows = int(metric_sum(hist.metrics(), "perkamo_webhook_history_rows_written_total"))
        return sum(self.ends([ATTEMPTS_TOPIC]).values()), rows

    def history_catch_up(self, hist: RoleProc, from_ns: int, limit_s: float = 120.0,
                         others: list[RoleProc] | None = None,
                         mark: tuple[int, int] | None = None) -> dict[str, Any]:
        """Once every attempt record is on the topic (the deliver group committed): until the
        history group's committed offsets on the attempts topic reach the end offsets (the role
        commits after each insert), timed from `from_ns`; then until its lag gauge reads 0."""
        ends = self.ends([ATTEMPTS_TOPIC])
        probe = self.probe(hist.group)
        deadline = time.monotonic() + limit_s
        caught_ns = 0
        behind_at_start = None
        try:
            while True:
                self.check_alive([hist, *(others or [])])
                done, behind = _sum_committed(probe, ends)
                if behind_at_start is None:
                    behind_at_start = behind
                if done:
                    caught_ns = now_ns()
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        finally:
            probe.close()
        gauge_zero_ns = 0
        gauge_deadline = time.monotonic() + 5
        while caught_ns and time.monotonic() < gauge_deadline:
            text = hist.metrics()
            series = [m for m in _LAG_SERIES.finditer(text) if f'topic="{ATTEMPTS_TOPIC}"' in m.group(0)]
            if series and metric_sum(text, "perkamo_webhook_consumer_lag", topic=ATTEMPTS_TOPIC) == 0:
                gauge_zero_ns = now_ns()
                break
            time.sleep(0.2)
        text = hist.metrics()
        flush = "perkamo_webhook_history_flush_duration_seconds"
        return {
            # this run's records and rows: since `mark`, else since the role's group was made
            "attempt_records": sum(ends.values()) - (mark[0] if mark else hist.base_records),
            "behind_when_deliveries_committed": behind_at_start,
            "caught_up_s": round((caught_ns - from_ns) / 1e9, 2) if caught_ns else None,
            "lag_metric_zero_s": round((gauge_zero_ns - from_ns) / 1e9, 2) if gauge_zero_ns else None,
            "rows_written": (int(metric_sum(text, "perkamo_webhook_history_rows_written_total"))
                             - (mark[1] if mark else 0)),
            "flushes": int(metric_sum(text, f"{flush}_count")),
            "flush_avg_s": r3(ratio(metric_sum(text, f"{flush}_sum"), metric_sum(text, f"{flush}_count"))),
            "write_errors": int(metric_sum(text, "perkamo_webhook_history_write_errors_total")),
            "timed_out": not caught_ns,
        }

    # Profile -----------------------------------------------------------------------------

    def profile_path(self) -> Path:
        return Path(self.args.profile).resolve()

    def start_profile(self, role: RoleProc) -> None:
        pyspy = pyspy_path()
        if pyspy is None:
            print("bench: py-spy not found; --profile records nothing "
                  f"({PYTHON} -m pip install py-spy)", file=sys.stderr)
            return
        cmd = [pyspy, "record", "--pid", str(role.pid), "--rate", str(self.args.profile_rate), "--format",
               "raw", "--threads", "-o", str(self.profile_path())]
        cmd.append("--nonblocking" if self.args.profile_python_only else "--native")
        with (self.workdir / "py-spy.log").open("wb") as log:
            self.profile_proc = CHILDREN.add(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log))

    def stop_profile(self) -> None:
        """SIGINT: py-spy writes what it recorded and exits."""
        proc = self.profile_proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def finish_profile(self, names: dict[int, str]) -> dict[str, Any] | None:
        if self.profile_proc is None:
            return {"error": "py-spy never started (deliveries did not flow?)"}
        self.stop_profile()
        self.profile_proc = None
        path = self.profile_path()
        if not path.is_file():
            return {"error": f"py-spy wrote nothing; see {self.workdir / 'py-spy.log'}"}
        doc = summarize_profile(path, names)
        doc["file"] = str(path)
        doc["rate_hz"] = self.args.profile_rate
        doc["native"] = not self.args.profile_python_only
        return doc

    # Phases ------------------------------------------------------------------------------

    def raw_client(self, path: str, events: int, concurrency: int, timeout_s: float = 5.0) -> dict[str, Any]:
        """tests/bench_client.py against the main receiver: its JSON line."""
        rec = self.main_receiver()
        cmd = [PYTHON, "-m", "tests.bench_client", "--url", rec.url(path), "--ca", str(self.ca_file),
               "--events", str(events), "--concurrency", str(concurrency), "--space", SPACE_OK,
               "--timeout", str(timeout_s)]
        proc = CHILDREN.add(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        try:
            out, err = proc.communicate(timeout=60 + events / 500)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise PhaseError("raw client did not finish in time") from None
        if proc.returncode != 0:
            raise PhaseError(f"raw client failed: {err.decode(errors='replace')[-2000:]}")
        return dict(orjson.loads(out))

    def phase_raw(self) -> dict[str, Any]:
        """1. A bare aiohttp client in a subprocess: the ceiling the deliver role is compared with."""
        rec = self.main_receiver()
        rec.reset()
        n = self.sizes.events
        client = self.raw_client("/ok", n, self.sizes.concurrency)
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
            "cpu_us_per_request": round(client["cpu_s"] / client["ok"] * 1e6, 1) if client["ok"] else None,
            "client_core_share": round(client["cpu_s"] / client["wall_s"], 3) if client["wall_s"] else None,
            "window_s": window,
            "receiver": receiver_figures(stats, window),
        }

    def run_throughput(self, label: str, processes: int, hist: RoleProc | None,
                       env: dict[str, str] | None = None, profile: bool = False, gc_timed: bool = False,
                       topic: str = "bench.e2e", assigned_first: bool = False,
                       events: int | None = None, launcher: str = "") -> dict[str, Any]:
        """N events for one Space through a fresh group of `processes` deliver roles, with the
        history role `hist` running beside them; then the history role's catch-up.

        Default: the events are published before the deliver roles start (phase 2). With
        `assigned_first` they start on the empty topic, and the events are published (as fast as
        the producer goes) once the group's assignment is complete: a group of two then shares
        the work from the first event instead of one member taking all of it while the other
        joins (phase 7)."""
        n = events or self.sizes.events
        bodies: list[bytes] = []
        if assigned_first:
            bodies = [payload(SPACE_OK, i) for i in range(n)]
        else:
            self.ensure_published(topic, SPACE_OK, n)
        rec = self.main_receiver()
        rec.reset()
        group = self.new_group(DEFAULT_TIERS)
        mark = self.history_mark(hist) if hist is not None else None
        cpu_broker = self.broker.cpu_s()
        gc_out = self.workdir / f"{label}-gc.json" if gc_timed else None
        roles = [self.start_deliver(f"{label}-{i}", topic, group, DEFAULT_TIERS, env, worker=i, gc_out=gc_out,
                                    launcher=launcher)
                 for i in range(processes)]
        watch = [hist] if hist is not None else []
        names: dict[int, str] = {}
        # The profile starts once deliveries flow (start-up, the TLS context and the first
        # handshakes left out) and stops when the last one is committed (the drain left out).
        profile_after = min(500, n // 10)

        def start_profile_when_flowing() -> None:
            if profile and self.profile_proc is None and rec.path_count("/ok") >= profile_after:
                self.start_profile(roles[0])

        try:
            start_ns = min(r.started_ns for r in roles)
            if assigned_first:
                self.wait_up(roles)
                self.wait_assigned(roles, self.deliver_partitions(DEFAULT_TIERS))
                start_ns = now_ns()
                self.publish(topic, iter(bodies))
            run = self.drive(roles, "/ok", n, group, [topic], limit_s=120 + n / 200, watch=watch,
                             on_poll=start_profile_when_flowing if profile else None)
            if profile:
                names = python_thread_names(roles[0].pid)  # non-blocking: fine beside py-spy record
                self.stop_profile()
            metrics = [r.metrics() for r in roles]
            for role, text in zip(roles, metrics, strict=True):
                (self.workdir / f"{role.name}.metrics.txt").write_text(text)  # kept with --keep
            hwm = [proc_status_kb(r.pid, "VmHWM") for r in roles]
            names = names or python_thread_names(roles[0].pid)
            stats = rec.stats()
            ok = stats["paths"].get("/ok", {"count": 0, "first_ns": 0, "last_ns": 0})
            catch_up = (self.history_catch_up(hist, ok["last_ns"], others=roles, mark=mark)
                        if hist is not None and run["committed_ns"] else None)
        finally:
            self.stop_roles(roles)
            profile_doc = self.finish_profile(names) if profile else None
        window = (ok["last_ns"] - ok["first_ns"]) / 1e9 if ok["count"] > 1 else None
        wall = (run["committed_ns"] - start_ns) / 1e9 if run["committed_ns"] else None
        deliveries = ok["count"]
        per_process = []
        for role, text, kb in zip(roles, metrics, hwm, strict=True):
            cpu, _ = role.cpu_between(ok["first_ns"], ok["last_ns"])
            counted = "perkamo_webhook_attempts_total" in text  # absent with metrics off
            delivered = int(metric_sum(text, "perkamo_webhook_attempts_total", outcome="delivered"))
            # partitions of the events topic this member held at the end (lag series, every 5 s)
            event_partitions = {m.group(1) for m in _LAG_SERIES.finditer(text)
                                if f'topic="{topic}"' in m.group(0)}
            calls = metric_sum(text, "perkamo_webhook_attempt_duration_seconds_count")
            per_process.append({
                "name": role.name,
                # at a fixed per-endpoint in-flight cap, deliveries/s = cap / call time
                "http_call_ms_avg": (round(metric_sum(text, "perkamo_webhook_attempt_duration_seconds_sum")
                                           / calls * 1000, 1) if calls else None),
                "delivered": delivered if counted else None,
                "deliveries_per_s": delivered / window if counted and window else None,
                "cpu_s": round(role.samples[-1][1], 2) if role.samples else None,
                "cpu_s_window": round(cpu, 2),
                "peak_rss_mb": round(kb / 1024, 1) if kb else None,
                # the role's own GC pause counter (whole life, wall clock), where it has one
                "gc_pause_metric_s": round(metric_sum(text, "perkamo_webhook_gc_pause_seconds_total"), 3),
                "event_partitions": len(event_partitions) if counted else None,
                "exit_code": role.exit_code,
                "killed": role.killed,
            })
        cpu_window = [r.cpu_between(ok["first_ns"], ok["last_ns"]) for r in roles]
        cpu_in_window = sum(c for c, _ in cpu_window)
        wall_window = max((w for _, w in cpu_window), default=0.0)
        cpu_total = sum(p["cpu_s"] or 0.0 for p in per_process)
        broker_cpu = self.broker.cpu_s()
        out: dict[str, Any] = {
            "events": n,
            "processes": processes,
            "deliveries": deliveries,
            "duplicates": max(0, deliveries - n),
            "deliveries_per_s": rate(deliveries, ok["first_ns"], ok["last_ns"]),
            "window_s": window,
            "wall_to_committed_s": wall,
            "wall_from": "publish start" if assigned_first else "deliver role start",
            "deliveries_per_s_wall": n / wall if wall else None,
            "all_committed": bool(run["committed_ns"]),
            "timed_out": run["timed_out"],
            # the deliver role(s) over the first-to-last delivery window (samples just outside it)
            "cpu_us_per_delivery": round(cpu_in_window / deliveries * 1e6, 1) if deliveries else None,
            "cpu_s_per_1k": round(cpu_total / deliveries * 1000, 3) if deliveries else None,
            "cpu_s_per_1k_steady": round(cpu_in_window / deliveries * 1000, 3) if deliveries else None,
            "consumer_core_share": round(cpu_in_window / wall_window, 3) if wall_window else None,
            "threads": roles[0].threads_between(ok["first_ns"], ok["last_ns"], names),
            "thread_names_from": "py-spy dump" if names else "/proc comm (py-spy not installed)",
            "per_process": per_process,
            "exit_ok": all(r.exit_ok() for r in roles),
            "receiver": receiver_figures(stats, window),
            "broker_cpu_s": round(broker_cpu - cpu_broker, 2) if broker_cpu and cpu_broker else None,
        }
        if hist is not None:
            hcpu, hwall = hist.cpu_between(ok["first_ns"], ok["last_ns"])
            out["history_role"] = {
                "cpu_s_window": round(hcpu, 2),
                "core_share": round(hcpu / hwall, 3) if hwall else None,
                "cpu_us_per_attempt": round(hcpu / deliveries * 1e6, 1) if deliveries else None,
                "catch_up": catch_up,
            }
        if gc_out is not None and gc_out.is_file():
            out["gc"] = gc_figures(orjson.loads(gc_out.read_bytes()), ok, roles[0])
        if profile_doc is not None:
            profile_doc["deliveries_per_s_profiled"] = out["deliveries_per_s"]
            profile_doc["proc_threads"] = out["threads"]
            self.results["profile"] = profile_doc
        return out

    def phase_e2e(self) -> dict[str, Any]:
        """2. End-to-end throughput of one deliver role with the history role running: metrics on
        (and off), and the history role's catch-up after each burst."""
        hist = self.start_history("e2e-history", "bench.e2e", DEFAULT_TIERS)
        warm: dict[str, Any] | None = None
        try:
            self.wait_up([hist])
            if self.sizes.warm_up_events:
                # Not measured: the broker's JVM compiles its hot paths (about a core for tens of
                # seconds) and the history role makes its first inserts; the measured runs then
                # start on a warm machine, as the later phases do.
                warm = self.run_throughput("e2e-warm-up", 1, hist, topic="bench.warm",
                                           events=self.sizes.warm_up_events)
            on = self.run_throughput("e2e-metrics-on", 1, hist, gc_timed=not self.args.no_gc_launcher)
            off = (self.run_throughput("e2e-metrics-off", 1, hist, {"PERKAMO_METRICS_ENABLED": "false"})
                   if self.sizes.metrics_off else None)
            # Issue 17: tracing on and timings off, bracketed by two baseline runs (tracing off,
            # timings on, metrics on, no GC launcher): the first run of a phase is slower (a fresh
            # group, cold caches), so `on` is no fair baseline for them.
            bases: list[dict[str, Any]] = []
            traced = untimed = None
            if self.sizes.metrics_off:
                bases.append(self.run_throughput("e2e-baseline-a", 1, hist))
                traced = self.run_throughput("e2e-tracing-on", 1, hist, launcher="tests.bench_tracing")
                untimed = self.run_throughput("e2e-timings-off", 1, hist,
                                              {"PERKAMO_NETWORK_TIMINGS": "false"})
                bases.append(self.run_throughput("e2e-baseline-b", 1, hist))
            if self.args.profile:
                self.results["profile_run"] = self.run_throughput("e2e-profiled", 1, hist, profile=True)
                self.results["profile"]["gc"] = on.get("gc")  # timed in the unprofiled run
        finally:
            self.stop_roles([hist])
        raw_doc = self.results.get("phases", {}).get("raw", {})
        raw = raw_doc.get("deliveries_per_s")
        catch = (on.get("history_role") or {}).get("catch_up") or {}
        doc: dict[str, Any] = {
            "metrics_on": on,
            "deliveries_per_s": on["deliveries_per_s"],
            "ratio_to_raw": ratio(on["deliveries_per_s"], raw),
            "cpu_us_per_delivery": on["cpu_us_per_delivery"],
            "raw_cpu_us_per_request": raw_doc.get("cpu_us_per_request"),
            "cpu_over_raw": ratio(on["cpu_us_per_delivery"], raw_doc.get("cpu_us_per_request")),
            "history_caught_up_s": catch.get("caught_up_s"),
            "warm_up": None if warm is None else {k: warm[k] for k in ("events", "deliveries_per_s",
                                                                       "broker_cpu_s", "exit_ok")},
            "gc_us_per_delivery": (on.get("gc") or {}).get("us_per_delivery"),
            "history_exit_ok": hist.exit_ok(),
            "history_stop_s": hist.stop_s,
        }
        if off is not None:
            doc["metrics_off"] = off
            doc["metrics_off_over_on"] = ratio(off["deliveries_per_s"], on["deliveries_per_s"])
            on_cpu, off_cpu = on["cpu_s_per_1k_steady"], off["cpu_s_per_1k_steady"]
            doc["metrics_cpu_share"] = (None if not on_cpu or off_cpu is None
                                        else round(1 - off_cpu / on_cpu, 3))
        if bases:
            doc["baselines"] = bases
            doc["baseline_deliveries_per_s"] = mean([b["deliveries_per_s"] for b in bases])
            doc["baseline_cpu_us_per_delivery"] = mean([b["cpu_us_per_delivery"] for b in bases])
        for key, run, what in (("tracing_on", traced, "tracing_on_over_off"),
                               ("timings_off", untimed, "timings_off_over_on")):
            if run is None:
                continue
            doc[key] = run
            doc[what] = ratio(run["deliveries_per_s"], doc["baseline_deliveries_per_s"])
            doc[key + "_cpu_us_per_delivery"] = run["cpu_us_per_delivery"]
        if "profile_run" in self.results:
            doc["profiled"] = {k: self.results["profile_run"][k]
                               for k in ("deliveries_per_s", "cpu_us_per_delivery", "exit_ok")}
        return doc

    def phase_latency(self) -> dict[str, Any]:
        """3. Fixed produce rate; the receiver measures arrival - sent_ns (history role running)."""
        topic = "bench.latency"
        rec = self.main_receiver()
        group = self.new_group(DEFAULT_TIERS, [topic])
        hist = self.start_history("latency-history", topic, DEFAULT_TIERS)
        cons = self.start_deliver("latency", topic, group, DEFAULT_TIERS)
        rate_per_s, seconds = self.sizes.latency_rate, self.sizes.latency_seconds
        # Latency is a figure below saturation: at most half of what phase 2 measured.
        capacity = self.results.get("phases", {}).get("e2e", {}).get("deliveries_per_s")
        rate_from = "fixed"
        if capacity and capacity / 2 < rate_per_s:
            rate_per_s, rate_from = max(50, int(capacity / 2 / 50) * 50), "half of phase 2's deliveries/s"
        total = int(rate_per_s * seconds)
        try:
            self.wait_up([hist, cons])
            self.wait_assigned([cons], self.deliver_partitions(DEFAULT_TIERS))
            producer = Producer({"bootstrap.servers": self.broker.bootstrap, "enable.idempotence": True,
                                 "acks": "all", "linger.ms": 1})
            # Warm-up at the same rate (connections, caches), not measured.
            warm = int(rate_per_s * min(3.0, seconds / 3))
            rec.reset()
            produce_at_rate(producer, topic, rate_per_s, warm, [])
            self.drive([cons], "/lat", warm, group, None, limit_s=30, watch=[hist])
            rec.reset()
            acks: list[float] = []
            produce_s = produce_at_rate(producer, topic, rate_per_s, total, acks)
            run = self.drive([cons], "/lat", total, group, None, limit_s=30, watch=[hist])
        finally:
            self.stop_roles([cons, hist])
        stats = rec.stats(latencies=True)
        latencies = [x / 1e6 for x in stats["latencies_ns"]]
        lat = stats["paths"].get("/lat", {"count": 0, "first_ns": 0, "last_ns": 0})
        window = (lat["last_ns"] - lat["first_ns"]) / 1e9 if lat["count"] > 1 else None
        return {
            "rate_per_s": rate_per_s,
            "rate_from": rate_from,
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
            "exit_ok": cons.exit_ok() and hist.exit_ok(),
            "receiver": receiver_figures(stats, window),
        }

    def phase_memory(self) -> dict[str, Any]:
        """4. Deliver role peak RSS with `memory_in_flight` deliveries in flight to an endpoint
        answering after 8 s (no history role: it has no bearing on the deliver role's memory)."""
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
        cons = self.start_deliver("memory", topic, group, DEFAULT_TIERS, {
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
            self.wait_up([cons])
            rss_start = proc_status_kb(cons.pid, "VmRSS")
            file_start = proc_status_kb(cons.pid, "RssFile")
            chdb = maps_mention(cons.pid, "chdb")
            run = self.drive([cons], MEMORY_PATH, n, group, [topic], limit_s=120 + n / 100, on_poll=watch)
            hwm = proc_status_kb(cons.pid, "VmHWM")
            rss = proc_status_kb(cons.pid, "VmRSS")
            chdb = chdb or maps_mention(cons.pid, "chdb")
            text = cons.metrics()
            outcomes = {o: int(metric_sum(text, "perkamo_webhook_attempts_total", outcome=o))
                        for o in ("delivered", "timeout", "circuit_open", "connect_error", "http_status")}
            holds = int(metric_sum(text, "perkamo_webhook_holds_total"))
        finally:
            self.stop_roles([cons])
        stats = rec.stats()
        slow = stats["paths"].get(MEMORY_PATH, {"count": 0, "first_ns": 0, "last_ns": 0})
        window = (slow["last_ns"] - slow["first_ns"]) / 1e9 if slow["count"] > 1 else None
        # The same 5,000 requests in flight from the bare aiohttp client: what TLS connections and
        # aiohttp cost by themselves.
        rec.reset()
        in_flight = self.sizes.memory_in_flight
        raw = self.raw_client(MEMORY_PATH, in_flight, in_flight, timeout_s=60)
        raw_concurrent = rec.stats()["slow_max_concurrent"]
        return {
            "events": n,
            "in_flight_limit": self.sizes.memory_in_flight,
            "in_flight_max_observed": int(in_flight_max),
            "receiver_max_concurrent": stats["slow_max_concurrent"],
            "peak_rss_mb": round(hwm / 1024, 1) if hwm else None,
            "rss_at_start_mb": round(rss_start / 1024, 1) if rss_start else None,
            "rss_file_at_start_mb": round(file_start / 1024, 1) if file_start else None,
            "rss_anon_max_sampled_mb": round(anon_max / 1024, 1) if anon_max else None,
            "rss_at_end_mb": round(rss / 1024, 1) if rss else None,
            # what each delivery in flight adds (connection, TLS state, task, buffers)
            "rss_kb_per_in_flight": (round((hwm - rss_start) / in_flight_max, 1)
                                     if hwm and rss_start and in_flight_max else None),
            "chdb_mapped": chdb,  # the deliver role must not load the history engine
            "raw_client": {
                "requests": raw["posted"], "errors": raw["errors"], "receiver_max_concurrent": raw_concurrent,
                "rss_start_mb": round(raw["rss_start_kb"] / 1024, 1),
                "peak_rss_mb": round(raw["max_rss_kb"] / 1024, 1),
                "rss_kb_per_in_flight": (round((raw["max_rss_kb"] - raw["rss_start_kb"]) / raw_concurrent, 1)
                                         if raw_concurrent else None),
            },
            "deliveries": slow["count"],
            "attempts_by_outcome": outcomes,  # timeouts here mean the machine could not keep up
            "holds": holds,
            "deliveries_per_s": rate(slow["count"], slow["first_ns"], slow["last_ns"]),
            "timed_out": run["timed_out"],
            "exit_ok": cons.exit_ok(),
            "receiver": receiver_figures(stats, window),
        }

    def phase_isolation(self) -> dict[str, Any]:
        """5. Healthy deliveries/s with 20 % of events for a hanging endpoint, vs without them
        (deliver role only: the figure is a ratio of two runs made the same way)."""
        total = self.sizes.isolation_events
        healthy = total * 4 // 5
        hanging = total - healthy
        self.ensure_published("bench.iso.base", SPACE_OK, healthy)
        if "bench.iso.mix" not in self.published:
            def mixed() -> Iterator[bytes]:
                u = 0
                for i in range(total):
                    if i % 5 == 4 and u < hanging:
                        u += 1
                        yield payload(SPACE_HANG, i)
                    else:
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
            cons = self.start_deliver(f"isolation-{label}", topic, group, ISOLATION_TIERS, env)
            try:
                run = self.drive([cons], "/ok", healthy, group, None, limit_s=60 + total / 200)
            finally:
                self.stop_roles([cons], timeout=40)
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
                "exit_ok": cons.exit_ok(),
                "receiver": receiver_figures(stats, window),
            }
        out["ratio"] = ratio(out["with_hang"]["healthy_deliveries_per_s"],
                             out["without_hang"]["healthy_deliveries_per_s"])
        return out

    def phase_retry(self) -> dict[str, Any]:
        """6. Lateness of tier attempts: attempted_at(n) - next_attempt_at(n-1), from the history
        role's data dir once it has caught up and stopped."""
        topic = "bench.retry"
        n = self.sizes.retry_events
        tiers = RETRY_TIERS.split(",")
        attempts = len(tiers) + 1
        self.ensure_published(topic, SPACE_FAIL, n)
        rec = self.main_receiver()
        rec.reset()
        group = self.new_group(RETRY_TIERS)
        hist = self.start_history("retry-history", topic, RETRY_TIERS)
        cons = self.start_deliver("retry", topic, group, RETRY_TIERS,
                                  {"PERKAMO_BREAKER_MIN_CALLS": "1000000"})
        catch: dict[str, Any] = {}
        try:
            self.wait_up([hist])
            run = self.drive([cons], "/fail", n * attempts, group, [topic, *(tier_topic(t) for t in tiers)],
                             limit_s=90 + n / 20, watch=[hist])
            if run["committed_ns"]:
                catch = self.history_catch_up(hist, run["committed_ns"], others=[cons])
        finally:
            self.stop_roles([cons, hist])
        rows = query_history_in_subprocess(
            str(hist.data_dir / "history"),
            "SELECT delivery_id, attempt, toUnixTimestamp64Milli(attempted_at), "
            "toUnixTimestamp64Milli(next_attempt_at), duration_ms, status "
            "FROM perkamo.webhook_attempts FINAL WHERE attempt >= 1 ORDER BY delivery_id, attempt",
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
            "history_catch_up": catch,
            "timed_out": run["timed_out"] or bool(catch.get("timed_out")),
            "exit_ok": cons.exit_ok() and hist.exit_ok(),
            "receiver": receiver_figures(stats, window),
        }

    def phase_scaling(self) -> dict[str, Any]:
        """7. Two deliver roles in one group vs one (history role running), both measured the same
        way: group assigned first, then N events published (see run_throughput)."""
        hist = self.start_history("scaling-history", "bench.scale.one", DEFAULT_TIERS)
        try:
            self.wait_up([hist])
            single = self.run_throughput("scaling-one", 1, hist, topic="bench.scale.one", assigned_first=True)
            two = self.run_throughput("scaling-two", 2, hist, topic="bench.scale.two", assigned_first=True)
        finally:
            self.stop_roles([hist])
        return {
            "one": single,
            "two": two,
            "deliveries_per_s_one": single["deliveries_per_s"],
            "deliveries_per_s_two": two["deliveries_per_s"],
            "ratio": ratio(two["deliveries_per_s"], single["deliveries_per_s"]),
            "history_exit_ok": hist.exit_ok(),
        }

    def phase_outage(self) -> dict[str, Any]:
        """8. A steady stream while the history role is stopped (SIGTERM, started again later),
        and while its store fails (tests/faults/faulty_run.py): deliveries/s during vs before,
        and no attempt the receiver saw missing from history once it is back."""
        out: dict[str, Any] = {"rate_per_s": self.sizes.stream_rate, "outage_s": self.sizes.outage_s,
                               "variants": ["stopped"]}
        out["stopped"] = self.outage_run("stopped")
        if self.sizes.store_fault:
            if FAULTY_RUN.is_file():
                out["variants"].append("store_down")
                out["store_down"] = self.outage_run("store_down")
            else:
                out["store_down_skipped"] = f"{FAULTY_RUN.relative_to(REPO)} not found"
        return out

    def outage_run(self, variant: str) -> dict[str, Any]:
        topic = "bench.stream"
        sizes = self.sizes
        rec = self.main_receiver()
        rec.reset()
        group = self.new_group(DEFAULT_TIERS, [topic])
        name = f"outage-{variant}"
        control = self.workdir / f"{name}-control" if variant == "store_down" else None
        hist = self.start_history(f"{name}-history", topic, DEFAULT_TIERS, control_dir=control)
        cons = self.start_deliver(f"{name}-deliver", topic, group, DEFAULT_TIERS)
        roles = [hist, cons]
        warm_s = min(3.0, sizes.stream_before_s / 2)
        total_s = warm_s + sizes.stream_before_s + sizes.outage_s + sizes.stream_after_s
        total = int(sizes.stream_rate * total_s)
        marks: dict[str, tuple[float, int]] = {}
        extra: dict[str, Any] = {}
        error: list[BaseException] = []
        try:
            self.wait_up([hist, cons])
            self.wait_assigned([cons], self.deliver_partitions(DEFAULT_TIERS))
            producer = Producer({"bootstrap.servers": self.broker.bootstrap, "enable.idempotence": True,
                                 "acks": "all", "linger.ms": 5})

            def produce() -> None:
                try:
                    produce_at_rate(producer, topic, sizes.stream_rate, total, [], space=SPACE_STREAM)
                except BaseException as exc:  # noqa: BLE001 - reported by the phase
                    error.append(exc)

            feeder = threading.Thread(target=produce, name="bench-stream", daemon=True)
            t0 = time.monotonic()
            feeder.start()

            def mark(label: str) -> None:
                marks[label] = (time.monotonic(), rec.path_count("/stream"))

            self.sleep_until(t0 + warm_s, roles)
            mark("before")
            self.sleep_until(t0 + warm_s + sizes.stream_before_s, roles)
            mark("outage")
            if control is not None:
                (control / "history-down").touch()
                watched = roles
            else:
                hist.stop(60)
                extra["history_stop_s"] = hist.stop_s
                extra["history_exit_ok"] = hist.exit_ok()
                watched = [cons]
            self.sleep_until(t0 + warm_s + sizes.stream_before_s + sizes.outage_s, watched)
            mark("back")
            back_ns = now_ns()
            if control is not None:
                (control / "history-down").unlink()
                extra["write_errors_during"] = int(metric_sum(hist.metrics(),
                                                              "perkamo_webhook_history_write_errors_total"))
            else:
                first = hist
                hist = self.start_history(f"{name}-history-2", topic, DEFAULT_TIERS,
                                          group=(first.group, first.base_records),
                                          data_name=f"{name}-history")
                roles = [hist, cons]
            probe = self.probe(hist.group)
            try:
                _, extra["records_waiting_when_back"] = _sum_committed(probe, self.ends([ATTEMPTS_TOPIC]))
            finally:
                probe.close()
            self.sleep_until(t0 + total_s, roles)
            mark("end")
            feeder.join(60)
            if error:
                raise PhaseError(f"stream producer failed: {error[0]}")
            run = self.drive([cons], "/stream", total, group, [topic], limit_s=60, watch=[hist])
            catch = self.history_catch_up(hist, back_ns, others=[cons]) if run["committed_ns"] else {}
        finally:
            self.stop_roles(roles)
        stats = rec.stats(ids=True)
        seen = set(stats["ids"])
        rows = query_history_in_subprocess(
            str(hist.data_dir / "history"),
            "SELECT delivery_id, attempt FROM perkamo.webhook_attempts FINAL WHERE attempt >= 1")
        stored = {f"{r[0]}:{r[1]}" for r in rows}
        raw_rows = query_history_in_subprocess(
            str(hist.data_dir / "history"), "SELECT count() FROM perkamo.webhook_attempts WHERE attempt >= 1")

        def window_rate(a: str, b: str) -> float | None:
            (ta, ca), (tb, cb) = marks[a], marks[b]
            return round((cb - ca) / (tb - ta), 1) if tb > ta else None

        before, during = window_rate("before", "outage"), window_rate("outage", "back")
        after = window_rate("back", "end")
        return {
            "events": total,
            "deliveries": stats["paths"].get("/stream", {}).get("count", 0),
            "deliveries_per_s_before": before,
            "deliveries_per_s_during": during,
            "deliveries_per_s_after": after,
            "ratio_during_before": r3(ratio(during, before)),
            "history_rows_final": len(stored),
            "history_rows_unmerged": raw_rows[0][0] if raw_rows else None,
            "attempts_seen_by_receiver": len(seen),
            "rows_lost": len(seen - stored),
            "rows_without_request": len(stored - seen),
            "history_catch_up": catch,
            "caught_up_after_back_s": catch.get("caught_up_s"),
            **extra,
            "all_committed": bool(run["committed_ns"]),
            "timed_out": run["timed_out"] or bool(catch.get("timed_out")),
            "exit_ok": cons.exit_ok() and hist.exit_ok(),
        }


def produce_at_rate(producer: Producer, topic: str, rate_per_s: int, count: int, acks: list[float],
                    space: str = SPACE_LAT) -> float:
    """Produce `count` events at a fixed rate, each stamped with data.context.sent_ns at produce
    time; appends each one's produce -> acknowledgement time (ms) to `acks`. Returns seconds."""
    def acked(err: Any, msg: Any) -> None:
        if err is None:
            sent = orjson.loads(msg.value())["data"]["context"]["sent_ns"]
            acks.append((time.time_ns() - sent) / 1e6)

    started = time.perf_counter()
    for i in range(count):
        delay = started + i / rate_per_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        producer.produce(topic, payload(space, i, time.time_ns()), key=str(i).encode(), on_delivery=acked)
        producer.poll(0)
    elapsed = time.perf_counter() - started
    if producer.flush(30) != 0:
        raise PhaseError("events not acknowledged by the broker")
    return elapsed


def _lift_nofile() -> None:
    """5,000 in flight means as many sockets: lift the soft descriptor limit (children inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


# Profile summary ---------------------------------------------------------------------------

_GC_NATIVE = "gc_collect"  # CPython 3.11's collector: gc_collect_main (the rest inlined), ..._with_callback


def gc_figures(doc: dict[str, Any], ok: dict[str, Any], role: RoleProc) -> dict[str, Any]:
    """The GC launcher's timings over the delivery window, per delivery and as a share of the
    process's CPU there."""
    timeline = doc.get("timeline") or []
    first, last = ok.get("first_ns", 0), ok.get("last_ns", 0)
    before = [p for p in timeline if p[0] <= first] or timeline[:1]
    after = [p for p in timeline if p[0] >= last] or timeline[-1:]
    seconds = counts = None
    if before and after:
        seconds = after[0][1] - before[-1][1]
        counts = [after[0][i] - before[-1][i] for i in (2, 3, 4)]
    cpu, _ = role.cpu_between(first, last)
    deliveries = ok.get("count", 0)
    return {
        "seconds_in_window": r3(seconds),
        "us_per_delivery": (round(seconds / deliveries * 1e6, 1)
                            if seconds is not None and deliveries else None),
        "share_of_process_cpu": r3(ratio(seconds, cpu)),
        "collections_in_window": counts,  # generations 0, 1, 2
        "seconds_whole_run": [round(s, 3) for s in doc.get("seconds", [])],
        "collections_whole_run": doc.get("collections"),
        "freeze_count_at_exit": doc.get("freeze_count"),
        "thresholds_at_exit": doc.get("thresholds"),
    }


def _frame(frame: str) -> tuple[str, str, str, bool]:
    """py-spy's 'Class.func (pkg/mod.py:123)' -> ('Class.func (pkg/mod.py)', 'pkg/mod.py:123',
    'pkg', True); a native frame 'SSL_read (libssl.so.3)' -> (..., False); an unresolved
    '0x7f12 (libc.so.6)' -> ('[libc.so.6]', ...)."""
    name, sep, loc = frame.partition(" (")
    if not sep:
        return frame, frame, "?", False
    loc = loc.rstrip(")")
    file, colon, line = loc.rpartition(":")
    python = bool(colon) and line.isdigit() and (file.endswith((".py", ".pyx")) or file.startswith("<"))
    if not python:
        if name.startswith("0x"):
            return f"[{loc}]", loc, loc, False
        return f"{name} ({loc})", loc, loc, False
    package = file.split("/", 1)[0] if "/" in file else file.removesuffix(".py")
    return f"{name} ({file})", loc, package, True


# Native frames that mean the thread is waiting, not running: a lock, the GIL, a condition, poll.
_WAITS = frozenset({
    "epoll_wait", "epoll_pwait", "poll", "ppoll", "select", "pselect", "pthread_cond_timedwait",
    "pthread_cond_wait", "cnd_timedwait", "cnd_wait", "PyThread_acquire_lock_timed", "take_gil",
    "sem_timedwait", "sem_wait", "sem_clockwait", "nanosleep", "clock_nanosleep", "futex_wait",
    "__futex_abstimed_wait_common", "pthread_cond_clockwait",
})
_THREAD_HEAD = re.compile(r"^thread \((\d+)\)(?::\s*(.*))?$")


def summarize_profile(path: Path, names: dict[int, str] | None = None, top: int = 20) -> dict[str, Any]:
    """py-spy `--format raw --threads` output (collapsed stacks) -> where the deliver role's CPU
    goes. In native mode py-spy also samples threads blocked in C (a lock, the GIL, poll): those
    samples are counted per thread as waiting and left out of everything else, so the shares are
    of running samples. Then: the cyclic GC's share and the Python lines that triggered it; self
    time by Python function (native callees folded into the Python frame that called them) with
    its hottest line; self time by native function; by package; the inclusive time of the
    project's functions (consumer/)."""
    names = names or {}
    total = running = gc_samples = 0
    by_python: Counter[str] = Counter()
    python_line: dict[str, Counter[str]] = defaultdict(Counter)
    by_native: Counter[str] = Counter()
    by_pkg: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    ours_line: dict[str, Counter[str]] = defaultdict(Counter)
    threads: Counter[str] = Counter()
    waiting: Counter[str] = Counter()
    gc_from: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        head = _THREAD_HEAD.match(frames[0])
        parsed = [_frame(f) for f in frames if not f.startswith(("thread (", "process ("))]
        if not parsed:
            continue
        total += count
        thread = "?"
        if head:
            thread = head.group(2) or names.get(int(head.group(1))) or f"thread {head.group(1)}"
        threads[thread] += count
        last_py = max((i for i, p in enumerate(parsed) if p[3]), default=-1)
        if any(p[0].split(" (")[0] in _WAITS for p in parsed[last_py + 1:]):
            waiting[thread] += count
            continue
        running += count
        inner = parsed[last_py] if last_py >= 0 else parsed[-1]
        by_python[inner[0]] += count
        python_line[inner[0]][inner[1]] += count
        by_pkg[inner[2]] += count
        if not parsed[-1][3]:
            by_native[parsed[-1][0]] += count
        gc_at = next((i for i, p in enumerate(parsed) if not p[3] and p[0].startswith(_GC_NATIVE)), None)
        if gc_at is not None:
            gc_samples += count
            caller = next((p for p in reversed(parsed[:gc_at]) if p[3]), None)
            gc_from[caller[1] if caller else "(C code: uvloop callbacks)"] += count
        seen = set()
        for name, loc, pkg, _python in parsed:
            if pkg == "consumer" and name not in seen:
                seen.add(name)
                ours[name] += count
                ours_line[name][loc] += count

    def pct(n: int) -> float:
        return round(100 * n / running, 1) if running else 0.0

    return {
        "samples": total,
        "running_samples": running,
        "threads": [{"thread": t, "pct_running": pct(n - waiting[t]), "samples": n, "waiting": waiting[t]}
                    for t, n in sorted(threads.items(), key=lambda kv: -(kv[1] - waiting[kv[0]]))[:8]],
        "gc_pct": pct(gc_samples),
        "gc_triggered_at": [{"at": at, "pct": pct(n)} for at, n in gc_from.most_common(5)],
        "self": [{"function": fn, "at": python_line[fn].most_common(1)[0][0], "pct": pct(n)}
                 for fn, n in by_python.most_common(top)],
        "self_native": [{"function": fn, "pct": pct(n)} for fn, n in by_native.most_common(10)],
        "self_by_package": [{"package": k, "pct": pct(n)} for k, n in by_pkg.most_common(12)],
        "consumer_inclusive": [{"function": fn, "at": ours_line[fn].most_common(1)[0][0], "pct": pct(n)}
                               for fn, n in ours.most_common(15)],
    }


def print_profile(profile: dict[str, Any]) -> None:
    if "error" in profile:
        print(f"\nprofile: {profile['error']}")
        return
    kind = "native + Python frames" if profile.get("native") else "Python frames only"
    print(f"\nprofile of the phase-2 deliver role (py-spy {profile.get('rate_hz')} Hz, {kind}): "
          f"{profile['running_samples']:,} running samples of {profile['samples']:,} "
          f"-> {profile.get('file')}")
    print(f"  deliveries/s while profiled: {_fmt(profile.get('deliveries_per_s_profiled'), '/s', 0)} "
          "(py-spy pauses the process per sample; the table's figures are from unprofiled runs)")
    if profile.get("proc_threads"):
        print(f"  CPU by thread (/proc): {_threads_text(profile['proc_threads'], 6)}")
    print("  running samples by thread: " + ", ".join(
        f"{t['thread']} {t['pct_running']}%" for t in profile["threads"] if t["pct_running"]))
    gc = profile.get("gc") or {}
    line = f"  cyclic GC: {profile['gc_pct']}% of running samples (py-spy)"
    if gc:
        share = gc.get("share_of_process_cpu")
        line += (f"; gc.callbacks in the unprofiled run: {_fmt(gc.get('us_per_delivery'), ' µs')} CPU "
                 "per delivery, "
                 f"{_fmt(None if share is None else 100 * share, '%')} of the process's CPU, "
                 f"collections (gen 0/1/2) {gc.get('collections_in_window')}, "
                 f"thresholds {gc.get('thresholds_at_exit')}, "
                 f"frozen objects {gc.get('freeze_count_at_exit')}")
    print(line)
    if profile.get("gc_triggered_at"):
        print("  GC triggered at: " + ", ".join(f"{g['at']} {g['pct']}%" for g in profile["gc_triggered_at"]))
    print(f"  top {len(profile['self'])} by Python function (self, native callees folded in; % of running "
          "samples; on a busy VM syscall sites such as write() weigh up to ~3x their CPU):")
    for item in profile["self"]:
        print(f"    {item['pct']:5.1f}%  {item['function']}  hottest at {item['at']}")
    if profile.get("self_native"):
        print("  top native functions (self):")
        for item in profile["self_native"]:
            print(f"    {item['pct']:5.1f}%  {item['function']}")
    print("  by package: " + ", ".join(f"{i['package']} {i['pct']}%" for i in profile["self_by_package"]))
    print("  inclusive, consumer/ functions:")
    for item in profile["consumer_inclusive"]:
        print(f"    {item['pct']:5.1f}%  {item['function']}  hottest at {item['at']}")


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


def _threads_text(threads: list[dict[str, Any]], most: int = 4) -> str:
    def one(t: dict[str, Any]) -> str:
        share = t["share_of_process"]
        count = f" x{t['threads']}" if t["threads"] > 1 else ""
        return f"{t['thread']}{count} {_fmt(None if share is None else 100 * share, '%', 0)}"

    return " ; ".join(one(t) for t in threads[:most])


def table_rows(phases: dict[str, Any]) -> list[dict[str, Any]]:  # noqa: C901, PLR0915 - one branch per phase
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

    def catch_row(phase: str, doc: dict[str, Any] | None, label: str) -> None:
        catch = (doc or {}).get("history_role", {}).get("catch_up") or {}
        v = catch.get("caught_up_s")
        row(phase, label, v, f"<= {TARGET_CATCH_UP_S:.0f} s", check(v, lambda x: x <= TARGET_CATCH_UP_S),
            " s", 2)

    for name, doc in phases.items():
        if "error" in doc:
            row(name, "phase failed", doc["error"].splitlines()[0][:80], "runs", False)
            continue
        if name == "raw":
            row("1 raw", "raw ceiling, deliveries/s", doc["deliveries_per_s"], unit="/s", digits=0)
            row("1 raw", "raw client CPU per request", doc["cpu_us_per_request"], unit=" µs", digits=0)
            row("1 raw", "raw client CPU, share of one core", doc["client_core_share"], digits=2)
            receiver_row("1 raw", doc)
        elif name == "e2e":
            on = doc["metrics_on"]
            row("2 e2e", "deliveries/s, deliver role, history role on", on["deliveries_per_s"],
                unit="/s", digits=0)
            row("2 e2e", "ratio to raw ceiling", doc["ratio_to_raw"],
                f">= {TARGET_RAW_RATIO} (aim {AIM_RAW_RATIO})",
                check(doc["ratio_to_raw"], lambda x: x >= TARGET_RAW_RATIO), digits=2)
            row("2 e2e", "deliver role CPU per delivery ; raw client's per request",
                f"{_fmt(on['cpu_us_per_delivery'], ' µs', 0)} ; "
                f"{_fmt(doc['raw_cpu_us_per_request'], ' µs', 0)}")
            row("2 e2e", "deliver role CPU by thread (share of its CPU)", _threads_text(on["threads"]))
            gc = on.get("gc") or {}
            share = gc.get("share_of_process_cpu")
            row("2 e2e", "cyclic GC CPU per delivery (share of the deliver role's CPU)",
                f"{_fmt(gc.get('us_per_delivery'), ' µs', 0)} "
                f"({_fmt(None if share is None else 100 * share, '%', 0)})")
            row("2 e2e", "deliver role CPU, share of one core", on["consumer_core_share"], digits=2)
            row("2 e2e", "HTTP call, average (deliver role; 100 in flight per endpoint)",
                on["per_process"][0]["http_call_ms_avg"], unit=" ms")
            hist = on.get("history_role") or {}
            row("2 e2e", "history role CPU per attempt (share of one core)",
                f"{_fmt(hist.get('cpu_us_per_attempt'), ' µs', 0)} "
                f"({_fmt(hist.get('core_share'), digits=2)})")
            catch_row("2 e2e", on, f"history lag 0 after the last delivery ({on['events']:,} burst)")
            catch = hist.get("catch_up") or {}
            row("2 e2e", "attempt records ; history rows written",
                f"{_fmt(catch.get('attempt_records'))} ; {_fmt(catch.get('rows_written'))}",
                f"{on['events']:,}", catch.get("attempt_records") == on["events"] if catch else None)
            row("2 e2e", "deliveries/s, wall (start -> all committed)", on["deliveries_per_s_wall"],
                unit="/s", digits=0)
            if "metrics_off" in doc:
                off = doc["metrics_off"]
                row("2 e2e", "deliveries/s, metrics off", off["deliveries_per_s"], unit="/s", digits=0)
                row("2 e2e", "metrics off / on (throughput)", doc["metrics_off_over_on"], digits=2)
                row("2 e2e", "CPU per delivery spent on metrics", doc["metrics_cpu_share"], digits=3)
            if "baselines" in doc:
                row("2 e2e", "baseline runs before ; after (tracing off, timings on)",
                    " ; ".join(f"{_fmt(b['deliveries_per_s'], '/s', 0)} "
                               f"{_fmt(b['cpu_us_per_delivery'], ' µs', 0)}" for b in doc["baselines"]))
            if "tracing_on" in doc:
                traced = doc["tracing_on"]
                row("2 e2e", "deliveries/s, tracing on (SDK, batch processor, counting exporter)",
                    traced["deliveries_per_s"], unit="/s", digits=0)
                row("2 e2e", "tracing on / off (throughput)", doc["tracing_on_over_off"], digits=2)
                row("2 e2e", "CPU per delivery, tracing on ; off",
                    f"{_fmt(traced['cpu_us_per_delivery'], ' µs', 0)} ; "
                    f"{_fmt(doc['baseline_cpu_us_per_delivery'], ' µs', 0)}")
            if "timings_off" in doc:
                untimed = doc["timings_off"]
                row("2 e2e", "deliveries/s, network timings off", untimed["deliveries_per_s"], unit="/s",
                    digits=0)
                row("2 e2e", "timings off / on (throughput)", doc["timings_off_over_on"], digits=2)
                row("2 e2e", "CPU per delivery, timings off ; on",
                    f"{_fmt(untimed['cpu_us_per_delivery'], ' µs', 0)} ; "
                    f"{_fmt(doc['baseline_cpu_us_per_delivery'], ' µs', 0)}")
            runs = [on, *(doc[k] for k in ("metrics_off", "tracing_on", "timings_off") if k in doc),
                    *doc.get("baselines", [])]
            clean = all(r["all_committed"] and r["exit_ok"] for r in runs) and doc["history_exit_ok"]
            row("2 e2e", "all offsets committed, every role exit 0", clean, "yes", clean)
            receiver_row("2 e2e", on)
        elif name == "latency":
            row("3 latency", f"p50 at {doc['rate_per_s']}/s", doc["p50_ms"], unit=" ms")
            row("3 latency", "p95", doc["p95_ms"], unit=" ms")
            row("3 latency", "p99", doc["p99_ms"], f"< {TARGET_P99_MS:.0f} ms",
                check(doc["p99_ms"], lambda x: x < TARGET_P99_MS), " ms")
            row("3 latency", "max", doc["max_ms"], unit=" ms")
            row("3 latency", "received / produced", f"{doc['received']:,} / {doc['produced']:,}",
                "all", doc["received"] >= doc["produced"])
            ack = doc["produce_ack"]
            row("3 latency", "produce -> broker ack p50 ; p99 (broker share)",
                f"{_fmt(ack['p50_ms'], ' ms')} ; {_fmt(ack['p99_ms'], ' ms')}")
            receiver_row("3 latency", doc)
        elif name == "memory":
            v = doc["peak_rss_mb"]
            row("4 memory", f"deliver role peak RSS at {doc['in_flight_limit']:,} in flight", v,
                f"<= {TARGET_RSS_MB:.0f} MB", check(v, lambda x: x <= TARGET_RSS_MB), " MB")
            row("4 memory", "RSS when started (of which file-backed)",
                f"{_fmt(doc['rss_at_start_mb'], ' MB')} ({_fmt(doc['rss_file_at_start_mb'], ' MB')})")
            row("4 memory", "RSS per delivery in flight (peak - start) / in flight",
                doc["rss_kb_per_in_flight"], unit=" KB")
            raw = doc["raw_client"]
            row("4 memory", f"raw aiohttp client: peak RSS ; per request in flight "
                            f"({raw['receiver_max_concurrent']:,} in flight)",
                f"{_fmt(raw['peak_rss_mb'], ' MB')} ; {_fmt(raw['rss_kb_per_in_flight'], ' KB')}")
            row("4 memory", "chDB engine mapped in the deliver role", doc["chdb_mapped"], "no",
                None if doc["chdb_mapped"] is None else not doc["chdb_mapped"])
            row("4 memory", "in flight reached: deliver gauge (receiver concurrent)",
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
            row("6 retry", "complete deliveries in history (4 attempts)",
                f"{doc['complete_deliveries']} / {doc['events']}", f"{doc['events']}",
                doc["complete_deliveries"] == doc["events"])
        elif name == "scaling":
            row("7 scaling", "deliveries/s, one deliver role", doc["deliveries_per_s_one"],
                unit="/s", digits=0)
            row("7 scaling", "deliveries/s, two deliver roles", doc["deliveries_per_s_two"],
                unit="/s", digits=0)
            each = " ; ".join(f"{_fmt(p['deliveries_per_s'], '/s', 0)} ({_fmt(p['event_partitions'])})"
                              for p in doc["two"]["per_process"])
            row("7 scaling", "deliveries/s of each of the two (events-topic partitions held)", each)
            row("7 scaling", "ratio two / one", doc["ratio"], f">= {TARGET_SCALING}",
                check(doc["ratio"], lambda x: x >= TARGET_SCALING), digits=2)
            row("7 scaling", "CPU per delivery, one ; two (µs)",
                f"{_fmt(doc['one']['cpu_us_per_delivery'], digits=0)} ; "
                f"{_fmt(doc['two']['cpu_us_per_delivery'], digits=0)}")
            catch_row("7 scaling", doc["two"],
                      f"history lag 0 after the last delivery (two, {doc['two']['events']:,})")
            receiver_row("7 scaling", doc["two"])
        elif name == "outage":
            for variant in doc["variants"]:
                v = doc[variant]
                what = "history role stopped" if variant == "stopped" else "history store failing"
                ph = "8 outage" if variant == "stopped" else "8 store down"
                row(ph, f"deliveries/s before ; {what} ; after (stream {doc['rate_per_s']}/s, "
                        f"{doc['outage_s']:.0f} s)",
                    f"{_fmt(v['deliveries_per_s_before'], digits=0)} ; "
                    f"{_fmt(v['deliveries_per_s_during'], digits=0)} ; "
                    f"{_fmt(v['deliveries_per_s_after'], digits=0)}")
                row(ph, f"ratio {what} / before", v["ratio_during_before"], f">= {TARGET_OUTAGE_RATIO}",
                    check(v["ratio_during_before"], lambda x: x >= TARGET_OUTAGE_RATIO), digits=2)
                row(ph, "attempt records waiting when it came back", v.get("records_waiting_when_back"))
                row(ph, "history lag 0 after it came back", v["caught_up_after_back_s"], unit=" s", digits=1)
                row(ph, "rows lost (receiver's attempts not in history, FINAL)",
                    f"{v['rows_lost']:,} of {v['attempts_seen_by_receiver']:,}", "0",
                    v["rows_lost"] == 0 and v["attempts_seen_by_receiver"] > 0)
                clean = v["all_committed"] and v["exit_ok"] and v.get("history_exit_ok", True)
                row(ph, "all committed, every role exit 0", clean, "yes", clean)
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
    Console(width=max(150, shutil.get_terminal_size().columns)).print(table)


# Main --------------------------------------------------------------------------------------


def parse_only(text: str | None, smoke: bool, profile: bool) -> list[str]:
    if not text:
        return list(SMOKE_PHASES if smoke else PROFILE_PHASES if profile else PHASES)
    if text.strip() == "all":
        return list(PHASES)
    chosen = []
    for raw_part in text.split(","):
        part = raw_part.strip()
        if part.isdigit() and 1 <= int(part) <= len(PHASES):
            part = PHASES[int(part) - 1]
        if part not in PHASES:
            raise SystemExit(f"bench: unknown phase {part!r}; phases: {', '.join(PHASES)} "
                             f"(or 1-{len(PHASES)})")
        chosen.append(part)
    return [p for p in PHASES if p in chosen]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="small sizes (5k events, 10 s outages) for development")
    size.add_argument("--smoke", action="store_true", help="tiny, phases 1,2,3,6,8 only, about a minute (CI)")
    parser.add_argument("--events", type=int, help="events for phases 1, 2, 7 (default 30k; quick 5k)")
    parser.add_argument("--only",
                        help=f"comma-separated phases: {','.join(PHASES)} (or 1-{len(PHASES)}, or all)")
    parser.add_argument("--concurrency", type=int,
                        help="per-endpoint in-flight limit and the raw client's connection limit (100)")
    parser.add_argument("--receivers", type=int, help="receiver processes sharing the port (SO_REUSEPORT)")
    parser.add_argument("--outage-s", type=float, help="phase 8's outage (default 60 s; quick 10 s)")
    parser.add_argument("--out-dir", default=str(REPO / "bench-results"), help="where the JSON goes")
    parser.add_argument("--consumer-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for every deliver role (e.g. PERKAMO_LOG_LEVEL=WARNING)")
    parser.add_argument("--history-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for every history role")
    parser.add_argument("--profile", nargs="?", const="", metavar="FILE",
                        help="py-spy a third phase-2 run of the deliver role into FILE (collapsed stacks; "
                             "default OUT_DIR/profile-<UTC>.txt); without --only runs phases raw,e2e")
    parser.add_argument("--profile-rate", type=int, default=50,
                        help="py-spy samples per second (50: each native sample pauses the process)")
    parser.add_argument("--profile-python-only", action="store_true",
                        help="Python frames only (py-spy --nonblocking: lighter, but no C frames and no GC)")
    parser.add_argument("--no-gc-launcher", action="store_true",
                        help="start phase 2's metrics-on deliver role as `python -m consumer` (no GC timing)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, data) afterwards")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _lift_nofile()
    sizes = sizes_for(args)
    phases = parse_only(args.only, args.smoke, args.profile is not None)
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.profile is not None:
        if "e2e" not in phases:
            raise SystemExit("bench: --profile profiles phase 2 (e2e); include it in --only")
        if pyspy_path() is None:
            raise SystemExit(f"bench: --profile needs py-spy: {PYTHON} -m pip install py-spy")
        args.profile = args.profile or str(out_dir / f"profile-{stamp}.txt")
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
            "deliver_env": bench.extra_env,
            "history_env": bench.history_env,
            "work_dir": str(workdir) if args.keep else None,
            "completed": not failed,
        },
        "phases": results["phases"],
        "table": [{k: v for k, v in r.items() if k != "shown"} for r in rows],
    }
    if "profile" in results:
        doc["profile"] = results["profile"]
    out = out_dir / f"bench-{stamp}.json"
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
    """A phase that ran but whose roles did not exit cleanly, or that ran out of time."""
    if "error" in doc:
        return True
    parts = [doc, *(v for v in doc.values() if isinstance(v, dict))]
    return any(p.get("timed_out") or p.get("exit_ok") is False for p in parts)


if __name__ == "__main__":
    sys.exit(main())
