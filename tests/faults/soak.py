"""The fault scenarios at size, on a broker of their own: `python -m tests.faults.soak`.

    python -m tests.faults.soak --events 100000 --kills 10      # full size
    python -m tests.faults.soak --events 20000 --kills 5 --only kill-9,sigterm

Starts Apache Kafka with deploy/kafka/kafka.sh (a temp KAFKA_DIR, free ports), runs each
scenario (sized from --events and --kills), prints one table row per scenario and the notes
and problems under it. Exits 1 if any scenario broke the accounting invariant.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import trustme
from rich.console import Console
from rich.table import Table

from consumer.kafka_topics import wait_for_broker
from tests.faults import scenarios
from tests.faults.accounting import Accounting
from tests.faults.fuzz import fuzz_inputs
from tests.faults.harness import KAFKA_SCRIPT, FaultEnv, log
from tests.support import free_port

COLUMNS = [
    "scenario",
    "events",
    "delivered",
    "dead-lettered",
    "lost",
    "duplicate deliveries",
    "max duplicates allowed",
    "history rows missing/extra",
    "wall time",
    "result",
]


def plan(
    n: int, kills: int, seed: int, protocol: str = scenarios.KILL_PROTOCOL
) -> dict[str, Callable[[FaultEnv], Accounting]]:
    """Each scenario sized from the event count and the number of kills."""
    return {
        "kill-9": lambda env: scenarios.kill_restart(
            env,
            n_events=n,
            kills=kills,
            seed=seed,
            max_in_flight=500,
            endpoints=5,
            stream_s=max(10.0, n / 1500),
            protocol=protocol,
        ),
        "rebalance": lambda env: scenarios.rebalance_mid_retry(
            env,
            n_events=max(300, n // 4),
            kills=kills,
            seed=seed,
            stream_s=max(10.0, n / 4 / 1000),
            protocol=protocol,
        ),
        "broker-restart": lambda env: scenarios.broker_restart(
            env, n_events=max(400, n // 4), down_s=5, seed=seed, stream_s=max(15.0, n / 4 / 1000)
        ),
        "history": lambda env: scenarios.history_outage(
            env, n_events=max(2000, n // 10), outage_s=15, batch_rows=500, max_in_flight=300, slow_s=10
        ),
        "history-kill": lambda env: scenarios.history_kill(
            env,
            n_events=max(600, n // 4),
            kills=kills,
            seed=seed,
            stream_s=max(kills * 12 + 4, n / 4 / 1000),
            protocol=protocol,
        ),
        "chaos": lambda env: scenarios.receiver_chaos(
            env, n_events=max(150, n // 20), garbage_events=max(20, n // 200), seed=seed
        ),
        "fuzz": lambda env: fuzz_inputs(env, examples=max(5, n // 2000), max_size=50),
        "sigterm": lambda env: scenarios.sigterm_under_load(env, n_events=max(1200, n // 4)),
        "sigterm-all": lambda env: scenarios.sigterm_all(env, n_events=max(1200, n // 4), workers=2),
        "poison": scenarios.poison_origin_header,
        "delivery-id": scenarios.malformed_delivery_id,
        "burst": lambda env: scenarios.burst_to_one_endpoint(env, n_events=max(1500, n // 10)),
    }


class Broker:
    """A single-node Kafka of the soak's own, in a temp folder, on free ports."""

    def __init__(self, folder: Path) -> None:
        port = free_port()
        self.env = {
            **os.environ,
            "KAFKA_PORT": str(port),
            "KAFKA_CONTROLLER_PORT": str(free_port()),
            "KAFKA_DIR": str(folder),
        }
        self.bootstrap = f"127.0.0.1:{port}"

    def __enter__(self) -> Broker:
        subprocess.run([str(KAFKA_SCRIPT), "start"], env=self.env, check=True)
        wait_for_broker(self.bootstrap, 60)
        return self

    def __exit__(self, *_: object) -> None:
        subprocess.run([str(KAFKA_SCRIPT), "stop"], env=self.env, check=False)


def table(results: list[Accounting]) -> Table:
    out = Table(title="Perkamo webhook consumer: fault soak")
    for name in COLUMNS:
        out.add_column(name, justify="left" if name in ("scenario", "result") else "right")
    for r in results:
        out.add_row(*r.row())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.soak", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--events", type=int, default=100_000, help="events of the kill -9 scenario (others scale)"
    )
    parser.add_argument(
        "--kills", type=int, default=10, help="kill -9s in the kill, rebalance and history-kill scenarios"
    )
    parser.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    parser.add_argument(
        "--protocol",
        choices=["classic", "consumer"],
        default=scenarios.KILL_PROTOCOL,
        help="group protocol of the kill scenarios, either role (consumer = KIP-848: each kill stalls ~45 s)",
    )
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, receipts, history)")
    args = parser.parse_args(argv)

    chosen = plan(args.events, args.kills, args.seed, args.protocol)
    if args.only:
        unknown = set(args.only.split(",")) - set(chosen)
        if unknown:
            parser.error(f"unknown scenario(s) {sorted(unknown)}; choose from {sorted(chosen)}")
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    work = Path(tempfile.mkdtemp(prefix="perkamo-soak-"))
    log(f"soak: {args.events} events, {args.kills} kills, seed {args.seed}, work folder {work}")
    results: list[Accounting] = []
    console = Console(width=max(Console().width, 180))
    try:
        with Broker(work / "kafka") as broker:
            ca = trustme.CA()
            ca_file = work / "ca.pem"
            ca.cert_pem.write_to_path(str(ca_file))
            env = FaultEnv.create(broker.bootstrap, ca, ca_file, work / "runs", broker.env)
            for name, scenario in chosen.items():
                log(f"scenario {name} ...")
                try:
                    result = scenario(env)
                except Exception as exc:  # noqa: BLE001 - one broken scenario must not hide the others
                    traceback.print_exc()
                    result = Accounting(
                        name,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0.0,
                        extra_problems=[f"scenario crashed: {type(exc).__name__}: {exc}"],
                    )
                log(result.explain())
                results.append(result)
    finally:
        console.print(table(results))
        for r in results:
            for note in r.notes:
                console.print(f"[dim]{r.scenario}: {note}[/dim]")
            for problem in r.problems():
                console.print(f"[red]{r.scenario}: {problem}[/red]")
        if args.keep:
            console.print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
