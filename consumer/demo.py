"""`perkamo-webhooks demo`: the whole path on one machine, ending with the delivery history.

Starts the local Kafka broker (deploy/kafka/kafka.sh), creates the topics, starts a sample
HTTPS receiver with a test CA, configures two Spaces (commerce-live answers 204, games-test
answers 500), publishes sample events shaped like the contract's example (plus one for a
Space with no endpoint and one that is not JSON), runs the consumer until every event has
an outcome, stops it, and prints the history.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Producer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from consumer import constants as c
from consumer.app import build, serve
from consumer.config import load_settings
from consumer.console import console_link
from consumer.errors import PerkamoError
from consumer.history import TABLE
from consumer.kafka_io import ensure_topics, producer_config, wait_for_broker
from consumer.receiver import SampleReceiver
from consumer.topics import plan

REPO = Path(__file__).resolve().parent.parent
KAFKA_SCRIPT = REPO / "deploy" / "kafka" / "kafka.sh"
HEALTHY, FAILING, UNKNOWN = "commerce-live", "games-test", "no-webhook-space"
EVENT_TYPES = ("purchase.completed", "reward.granted", "wallet.updated")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sample_event(n: int, space: str, environment: str = "live") -> dict[str, Any]:
    """An event envelope like the contract's example, numbered n."""
    kind = EVENT_TYPES[n % len(EVENT_TYPES)]
    stamp = f"2026-06-01T10:{n // 60 % 60:02d}:{n % 60:02d}.000Z"
    return {
        "id": f"evt_demo_{n:05d}",
        "type": kind,
        "created_at": stamp,
        "data": {
            "space": {"slug": space, "name": space.replace("-", " ").title(), "environment": environment},
            "user_id": f"customer_{100 + n}",
            "transaction_id": f"order_{1000 + n}",
            "event": kind,
            "status": "applied",
            "occurred_at": stamp,
            "context": {"amount": 12900, "currency": "CZK"},
            "delta": [{"wallet": "loyalty_points", "amount": 10}],
            "effects": [],
            "wallet_state": {"loyalty_points": 120 + 10 * n},
        },
    }


def run_demo(workdir: Path, events: int = 20, keep_console: bool = False) -> int:
    if not KAFKA_SCRIPT.is_file():
        raise PerkamoError(f"{KAFKA_SCRIPT} not found: run the demo from a checkout of the project")
    workdir = workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    console = Console(width=max(Console().width, 150))
    port = free_port()
    env = {
        **os.environ,
        "KAFKA_PORT": str(port),
        "KAFKA_CONTROLLER_PORT": str(free_port()),
        "KAFKA_DIR": str(workdir / "kafka"),
    }
    console.print(f"[bold]1/5[/] starting Apache Kafka on 127.0.0.1:{port}")
    started = time.monotonic()
    subprocess.run([str(KAFKA_SCRIPT), "start"], env=env, check=True)
    console.print(f"    broker answered after {time.monotonic() - started:.1f}s")
    try:
        return asyncio.run(_demo(workdir, f"127.0.0.1:{port}", events, console, keep_console))
    finally:
        subprocess.run([str(KAFKA_SCRIPT), "stop"], env=env, check=False)


async def _demo(
    workdir: Path, bootstrap: str, events: int, console: Console, keep_console: bool
) -> int:
    receiver = SampleReceiver(workdir / "receiver")
    await receiver.start("127.0.0.1", 0)
    base = f"https://localhost:{receiver.port}/webhooks"
    endpoints_file = workdir / "endpoints.json"
    endpoints_file.write_bytes(
        orjson.dumps(
            [
                {"space": HEALTHY, "url": f"{base}/ok", "active": True},
                {"space": FAILING, "url": f"{base}/fail", "active": True},
            ]
        )
    )
    settings = load_settings(
        kafka_bootstrap_servers=bootstrap,
        data_dir=workdir,
        endpoints_file=endpoints_file,
        retry_tiers=["1s", "2s"],
        allow_private_networks=["127.0.0.0/8", "::1/128"],
        ca_bundle=receiver.ca_file,
        admin_listen=f"127.0.0.1:{free_port()}",
        admin_token=secrets.token_urlsafe(32),  # a fresh one per demo run, printed at the end
    )
    console.print("[bold]2/5[/] creating topics; receiver with a test CA on " + f"127.0.0.1:{receiver.port}")
    await asyncio.to_thread(wait_for_broker, settings, 30)
    specs, _ = plan(settings, partitions=3, retention_hours=None)
    await asyncio.to_thread(ensure_topics, settings, [(s.name, s.partitions, s.config) for s in specs])

    healthy = [sample_event(n, HEALTHY) for n in range(events)]
    failing = [sample_event(events + n, FAILING, "test") for n in range(max(1, events // 4))]
    orphan = sample_event(10_000, UNKNOWN)
    console.print(
        f"[bold]3/5[/] publishing {len(healthy)} events for {HEALTHY} (answers 204), "
        f"{len(failing)} for {FAILING} (answers 500), 1 for a Space with no endpoint, 1 not JSON"
    )
    producer = Producer(producer_config(settings))
    for doc in [*healthy, *failing, orphan]:
        producer.produce(c.EVENTS_TOPIC, orjson.dumps(doc), key=doc["data"]["space"]["slug"])
    producer.produce(c.EVENTS_TOPIC, b"{not json", key=b"broken")
    producer.flush(30)
    del producer  # a producer left open would log reconnect attempts after the broker stops

    app = build(settings)
    console.print("[bold]4/5[/] running the consumer (retry tiers 1s,2s) until every event has an outcome")
    started = time.monotonic()
    task = asyncio.create_task(serve(app, install_signals=False))
    expected_failed = len(failing)
    deadline = started + 120
    delivered = failed = 0
    while time.monotonic() < deadline and not task.done():
        await asyncio.sleep(0.5)
        _, rows = await asyncio.to_thread(
            app.store.query,
            f"SELECT countIf(status = 'delivered'), countIf(status = 'failed') FROM {TABLE} FINAL",  # noqa: S608 - constant
        )
        delivered, failed = rows[0]
        if delivered >= len(healthy) and failed >= expected_failed:
            break
    elapsed = time.monotonic() - started
    if not keep_console:
        app.service.stop()
        await task
        await receiver.stop()

    console.print("[bold]5/5[/] delivery history (perkamo.webhook_attempts)")
    columns = "delivery_id, attempt, space_slug, event_type, trigger, status, status_code, duration_ms, error"
    order = "ORDER BY space_slug, event_id, attempt"
    sql = f"SELECT {columns}, attempted_at FROM {TABLE} FINAL {order}"  # noqa: S608 - constants only
    _, rows = app.store.query(sql)
    table = Table("delivery", "att", "space", "event", "trigger", "status", "code", "ms", "error", "at (UTC)")
    for row in rows:
        style = {"delivered": "green", "retrying": "yellow", "failed": "red"}.get(row[5], "")
        table.add_row(
            row[0],
            str(row[1]),
            row[2],
            row[3],
            row[4],
            f"[{style}]{row[5]}[/]",
            str(row[6]),
            str(row[7]),
            Text((row[8] or "")[:40]),  # receiver text: never read as markup
            row[9].strftime("%H:%M:%S.%f")[:-3],
        )
    console.print(table)
    ok = delivered >= len(healthy) and failed >= expected_failed
    console.print(
        f"{'[green]done' if ok else '[red]incomplete'}[/]: {delivered} delivered and {failed} dead-lettered "
        f"after retries in {elapsed:.1f}s; receiver saw {len(receiver.received)} requests; "
        f"1 event had no endpoint, 1 invalid event went to {c.DLQ_TOPIC}"
    )
    console.print(f"console: {settings.console_base_url} (sign in with the admin token "
                  f"{settings.admin_token.get_secret_value()})", soft_wrap=True)
    console.print(f"a link for {HEALTHY} only: {console_link(settings, HEALTHY, 86400)}", soft_wrap=True)
    if keep_console:
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, app.service.stop)
        console.print("the consumer keeps serving the console (resend works too); Ctrl+C stops it all")
        await task
        await receiver.stop()
    else:
        console.print("(both work while the consumer runs: `make demo-console` keeps it running)")
    return 0 if ok else 1
