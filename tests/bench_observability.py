"""What issue 17 costs per attempt, measured in one process without Kafka (a shared machine's noise
swamps a few tens of µs in the end-to-end benchmark):

    python -m tests.bench_observability [--rounds 25] [--requests 1500]

The Deliverer posts to the benchmark receiver (tests/bench_receiver.py, its own process, so its
CPU is not counted) with 50 calls in flight, as the deliver role does, in four variants: the bare
call with timings off; with the pipeline's AttemptObserver and tracing off (no SDK: ids only);
with the network-timing marks on; with the SDK on (batch span processor into a counting exporter,
tests/bench_tracing.py). Each round runs every variant once, in a random order; the table gives
the median CPU per attempt and the median of each round's difference to the first variant.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from consumer import gctune, tracing
from consumer.breaker import BreakerPolicy
from consumer.config import Settings, load_settings
from consumer.delivery import Deliverer
from consumer.gate import GateLimits, Gates
from consumer.headers import DeliveryMeta
from consumer.health import HealthPolicy
from consumer.metrics import Metrics
from consumer.models import Endpoint, Event
from consumer.observe import AttemptObserver
from tests.bench_client import payload
from tests.bench_receiver import make_certs
from tests.bench_tracing import CountingExporter
from tests.support import free_port

IN_FLIGHT = 50
VARIANTS: dict[str, tuple[bool, str]] = {  # name -> (network timings, tracing: ""=no observer)
    "bare Deliverer.call, timings off": (False, ""),
    "observer, tracing off (no SDK), timings off": (False, "off"),
    "observer, tracing off, timings on (marks)": (True, "off"),
    "observer, tracing on (SDK), timings on": (True, "sdk"),
}


@dataclass(frozen=True)
class Job:
    event: Event
    endpoint: Endpoint
    delivery_id: str
    meta: DeliveryMeta
    trigger: str


async def measure(settings: Settings, observer: AttemptObserver | None, job: Job, n: int) -> float:
    """CPU µs per attempt over n attempts (after a warm-up that opens the connections)."""
    deliverer = Deliverer(settings, Metrics())
    await deliverer.start()
    gate = Gates(BreakerPolicy(), HealthPolicy(), GateLimits()).get(job.endpoint)
    places = asyncio.Semaphore(IN_FLIGHT)

    async def attempt() -> None:
        async with places:
            if observer is None:
                await deliverer.call(job.endpoint, job.event, job.delivery_id, 1)
                return
            seen = observer.begin(job)
            result = await deliverer.call(job.endpoint, job.event, job.delivery_id, 1, seen.request_headers)
            seen.done(result, gate)

    await asyncio.gather(*(attempt() for _ in range(200)))
    started = time.process_time()
    await asyncio.gather(*(attempt() for _ in range(n)))
    spent = time.process_time() - started
    await deliverer.close()
    return spent / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--requests", type=int, default=1500)
    args = parser.parse_args()
    gctune.tune()  # as the deliver role does after start-up
    work = Path(tempfile.mkdtemp(prefix="perkamo-bench-obs-"))
    ca = make_certs(work)
    port, control = free_port(), free_port()
    receiver = subprocess.Popen([sys.executable, "-m", "tests.bench_receiver", "--port", str(port),
                                 "--control-port", str(control), "--cert-dir", str(work)],
                                stdout=subprocess.DEVNULL)
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(CountingExporter()))
    sdk = tracing.Tracing(provider)
    try:
        time.sleep(2)
        endpoint = Endpoint("ep_bench", "bench", f"https://127.0.0.1:{port}/ok")
        event = Event(payload("bench", 1), "evt_bench", "purchase.completed", "bench", "live", "u", "t")
        job = Job(event, endpoint, "dlv_bench", DeliveryMeta(), "initial")
        base: dict[str, Any] = {"ca_bundle": ca, "allow_private_networks": ["127.0.0.0/8"],
                                "max_in_flight": IN_FLIGHT * 2}
        names = list(VARIANTS)
        cpu: dict[str, list[float]] = {name: [] for name in names}
        diff: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.rounds):
            got = {}
            for name in random.sample(names, len(names)):
                timings, traced = VARIANTS[name]
                settings = load_settings(**base, network_timings=timings)
                chosen = sdk if traced == "sdk" else tracing.Tracing()
                observer = AttemptObserver(settings, Metrics(), chosen) if traced else None
                got[name] = uvloop.run(measure(settings, observer, job, args.requests))
            for name in names:
                cpu[name].append(got[name])
                diff[name].append(got[name] - got[names[0]])
        print(f"{args.rounds} rounds of {args.requests} attempts, {IN_FLIGHT} in flight; "
              "CPU µs per attempt")
        for name in names:
            print(f"  {name:46s} median {statistics.median(cpu[name]):6.1f}   "
                  f"vs the first, median of rounds {statistics.median(diff[name]):+6.1f}")
    finally:
        provider.shutdown()
        receiver.terminate()


if __name__ == "__main__":
    main()
