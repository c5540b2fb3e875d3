"""`perkamo-webhooks demo`: the whole path on one machine, ending with the delivery history.

Starts the local Kafka broker (deploy/kafka/kafka.sh), creates the topics, starts a sample
HTTPS receiver with a test CA, configures two Spaces (commerce-live answers 204, games-test
answers 500), publishes sample events shaped like the contract's example (plus one for a
Space with no endpoint and one that is not JSON), runs the service as it runs in production
(`perkamo-webhooks run --role all`: a history process and a deliver process, supervised)
until every event has an outcome, prints the history from its admin API and the console's
address, and stops everything (at once, or on Ctrl-C when run in a terminal).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from rich.console import Console
from rich.table import Table
from rich.text import Text

from consumer import constants as c
from consumer.config import load_settings
from consumer.console import console_link
from consumer.errors import PerkamoError
from consumer.kafka_io import publish_now
from consumer.kafka_topics import ensure_topics, wait_for_broker
from consumer.receiver import SampleReceiver
from consumer.topics import plan

REPO = Path(__file__).resolve().parent.parent
KAFKA_SCRIPT = REPO / "deploy" / "kafka" / "kafka.sh"
HEALTHY, FAILING, UNKNOWN = "commerce-live", "games-test", "no-webhook-space"
EVENT_TYPES = ("purchase.completed", "reward.granted", "wallet.updated")
TIERS = "1s,2s"


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


def run_demo(workdir: Path, events: int = 20, stay: bool = False) -> int:
    """`stay`: after the history, keep the service running for the console until Ctrl+C."""
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
        return asyncio.run(_demo(workdir, f"127.0.0.1:{port}", events, console, stay))
    finally:
        subprocess.run([str(KAFKA_SCRIPT), "stop"], env=env, check=False)


def _service_env(workdir: Path, bootstrap: str, receiver: SampleReceiver, token: str) -> dict[str, str]:
    base = f"https://localhost:{receiver.port}/webhooks"
    endpoints_file = workdir / "endpoints.json"
    endpoints_file.write_bytes(orjson.dumps([
        {"space": HEALTHY, "url": f"{base}/ok", "active": True},
        {"space": FAILING, "url": f"{base}/fail", "active": True},
    ]))
    return {
        **os.environ,
        "PERKAMO_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "PERKAMO_DATA_DIR": str(workdir),
        "PERKAMO_ENDPOINTS_FILE": str(endpoints_file),
        "PERKAMO_RETRY_TIERS": TIERS,
        "PERKAMO_ALLOW_PRIVATE_NETWORKS": "127.0.0.0/8,::1/128",
        "PERKAMO_CA_BUNDLE": str(receiver.ca_file),
        "PERKAMO_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
        "PERKAMO_DELIVER_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
        "PERKAMO_ADMIN_TOKEN": token,
        "PERKAMO_HISTORY_FLUSH_INTERVAL_S": "0.5",
        "PERKAMO_LOG_LEVEL": "WARNING",
    }


async def _demo(workdir: Path, bootstrap: str, events: int, console: Console, stay: bool) -> int:
    receiver = SampleReceiver(workdir / "receiver")
    await receiver.start("127.0.0.1", 0)
    token = secrets.token_urlsafe(32)
    env = _service_env(workdir, bootstrap, receiver, token)
    # The service's own view of the settings the console link is signed with.
    settings = load_settings(kafka_bootstrap_servers=bootstrap, retry_tiers=TIERS.split(","),
                             admin_listen=env["PERKAMO_ADMIN_LISTEN"], admin_token=token)
    console.print(f"[bold]2/5[/] creating topics; receiver with a test CA on 127.0.0.1:{receiver.port}")
    await asyncio.to_thread(wait_for_broker, bootstrap, 30)
    specs, _ = plan(settings, partitions=3, retention_hours=None)
    await asyncio.to_thread(ensure_topics, bootstrap, [(s.name, s.partitions, s.config) for s in specs])

    healthy = [sample_event(n, HEALTHY) for n in range(events)]
    failing = [sample_event(events + n, FAILING, "test") for n in range(max(1, events // 4))]
    console.print(
        f"[bold]3/5[/] publishing {len(healthy)} events for {HEALTHY} (answers 204), "
        f"{len(failing)} for {FAILING} (answers 500), 1 for a Space with no endpoint, 1 not JSON"
    )
    samples = [(c.EVENTS_TOPIC, orjson.dumps(doc), doc["data"]["space"]["slug"])
               for doc in [*healthy, *failing, sample_event(10_000, UNKNOWN)]]
    publish_now(bootstrap, [*samples, (c.EVENTS_TOPIC, b"{not json", b"broken")], 30,
                client_id="perkamo-demo")

    console.print(f"[bold]4/5[/] running `perkamo-webhooks run --role all` (retry tiers {TIERS}) "
                  "until every event has an outcome")
    started = time.monotonic()
    service = subprocess.Popen([sys.executable, "-m", "consumer", "run", "--role", "all"], env=env)
    api = f"http://{env['PERKAMO_ADMIN_LISTEN']}"
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with aiohttp.ClientSession(headers=headers) as session:
            done = await _wait_outcomes(session, api, len(healthy), len(failing), service)
            elapsed = time.monotonic() - started
            rows = await _attempts(session, api)
        console.print("[bold]5/5[/] delivery history (perkamo.webhook_attempts, from the history API)")
        console.print(_table(rows))
        delivered = sum(1 for r in rows if r["status"] == "delivered")
        failed = sum(1 for r in rows if r["status"] == "failed")
        console.print(
            f"{'[green]done' if done else '[red]incomplete'}[/]: {delivered} delivered and {failed} "
            f"dead-lettered after retries in {elapsed:.1f}s; receiver saw {len(receiver.received)} "
            f"requests; 1 event had no endpoint, 1 invalid event went to {c.DLQ_TOPIC}"
        )
        console.print(f"console: {settings.console_base_url} (sign in with the admin token {token})",
                      soft_wrap=True)
        console.print(f"a link for {HEALTHY} only: {console_link(settings, HEALTHY, 86400)}", soft_wrap=True)
        if stay and done:
            console.print("the service keeps serving the console (resend works too); Ctrl+C stops it all")
            await _until_interrupted(service)
        else:
            console.print("(both work while the service runs: `make demo-console` keeps it running)")
        return 0 if done else 1
    finally:
        if service.poll() is None:
            service.send_signal(signal.SIGTERM)
            await asyncio.to_thread(service.wait, 60)
        await receiver.stop()


async def _wait_outcomes(
    session: aiohttp.ClientSession, api: str, healthy: int, failing: int, service: subprocess.Popen[bytes]
) -> bool:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise PerkamoError(f"the service exited with {service.returncode}; see its log above")
        await asyncio.sleep(0.5)
        try:
            counts = {}
            for status in ("delivered", "failed"):
                query = {"status": status, "limit": "1000"}
                async with session.get(f"{api}/api/v1/deliveries", params=query) as r:
                    if r.status != 200:
                        break
                    counts[status] = len((await r.json())["deliveries"])
        except aiohttp.ClientError:
            continue  # not listening yet
        if counts.get("delivered", 0) >= healthy and counts.get("failed", 0) >= failing:
            return True
    return False


async def _attempts(session: aiohttp.ClientSession, api: str) -> list[dict[str, Any]]:
    async with session.get(f"{api}/api/v1/deliveries", params={"limit": "1000"}) as r:
        deliveries = (await r.json())["deliveries"]
    rows = []
    for delivery in deliveries:
        async with session.get(f"{api}/api/v1/deliveries/{delivery['delivery_id']}") as r:
            detail = await r.json()
        rows += [{"delivery_id": detail["delivery_id"], **a} for a in detail["attempts"]]
    return sorted(rows, key=lambda r: (r["space_slug"], r["event_id"], r["attempt"]))


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table("delivery", "att", "space", "event", "trigger", "status", "code", "ms", "error", "at (UTC)")
    for row in rows:
        style = {"delivered": "green", "retrying": "yellow", "failed": "red"}.get(row["status"], "")
        table.add_row(
            row["delivery_id"], str(row["attempt"]), row["space_slug"], row["event_type"], row["trigger"],
            Text(row["status"], style=style), str(row["status_code"]), str(row["duration_ms"]),
            Text((row["error"] or "")[:40]), (row["attempted_at"] or "")[11:23],
        )
    return table


async def _until_interrupted(service: subprocess.Popen[bytes]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    while not stop.is_set() and service.poll() is None:
        await asyncio.sleep(0.5)
