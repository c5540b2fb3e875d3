"""Offsets: never committed past an unfinished message; a crash redelivers with the same delivery id."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson

from consumer import constants as c
from consumer.history import TABLE
from tests.support import (
    committed,
    delayed,
    fast_forward_group,
    free_port,
    make_event,
    produce,
    query_history_in_subprocess,
    unique,
    wait_for,
)


async def test_commit_never_passes_an_unfinished_offset(harness, receiver):
    receiver.on("/slow", delayed(4))
    await harness.start(
        harness.settings(
            [
                {"space": "s-slow", "url": receiver.url("/slow")},
                {"space": "s-fast", "url": receiver.url("/fast")},
            ],
            delivery_timeout_s=10,
        )
    )
    first = make_event("s-slow")
    rest = [make_event("s-fast") for _ in range(20)]
    produce(harness.kafka, harness.events_topic, [orjson.dumps(e) for e in [first, *rest]], partition=1)
    await wait_for(lambda: len(receiver.to("/fast")) == 20, what="the fast deliveries")
    await wait_for(lambda: receiver.to("/slow"), what="the slow delivery to start")
    # Later messages finished long ago; the slow first one has not: nothing may be committed.
    for _ in range(5):
        assert committed(harness.kafka, harness.group, harness.events_topic, 3)[1] < 0
        await __import__("asyncio").sleep(0.3)
    await wait_for(
        lambda: committed(harness.kafka, harness.group, harness.events_topic, 3)[1] == 21,
        timeout=15,
        what="the commit after the slow delivery finished",
    )


def _run(env, role):
    """A role in a process of its own; its log goes to a file (a pipe nobody reads would fill
    up and block the process once it logs enough: a full registry topic's warnings do)."""
    log_path = Path(env["PERKAMO_DATA_DIR"]).parent / f"{role}-{unique('log')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "consumer", "run", "--role", role], env=env,
        stdout=subprocess.DEVNULL, stderr=log_path.open("wb"),
    )
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


def _tail(proc) -> str:
    return proc.log_path.read_text(errors="replace")[-3000:]


async def test_kill_before_commit_redelivers_with_the_same_delivery_id(harness, receiver, tmp_path):
    space = "s-crash"
    endpoints = harness.endpoints_file([{"space": space, "url": receiver.url("/crash")}])
    data = tmp_path / "consumer-data"
    env = {
        **os.environ,
        "PERKAMO_KAFKA_BOOTSTRAP_SERVERS": harness.kafka,
        "PERKAMO_EVENTS_TOPICS": harness.events_topic,
        "PERKAMO_GROUP_ID": unique("crash"),
        "PERKAMO_DATA_DIR": str(data),
        "PERKAMO_ENDPOINTS_FILE": str(endpoints),
        "PERKAMO_ALLOW_PRIVATE_NETWORKS": "127.0.0.0/8,::1/128",
        "PERKAMO_CA_BUNDLE": str(harness.ca_file),
        "PERKAMO_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
        "PERKAMO_DELIVER_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
        "PERKAMO_HISTORY_GROUP_ID": unique("crash-history"),
        "PERKAMO_RETRY_TIERS": "1s,2s,4s",
        # Never commit on a timer: the kill lands before any commit.
        "PERKAMO_COMMIT_INTERVAL_S": "3600",
        "PERKAMO_HISTORY_FLUSH_INTERVAL_S": "0.2",
    }
    fast_forward_group(harness.kafka, env["PERKAMO_HISTORY_GROUP_ID"], [c.ATTEMPTS_TOPIC])
    events = [make_event(space) for _ in range(5)]
    produce(harness.kafka, harness.events_topic, [orjson.dumps(e) for e in events])
    history = _run(env, "history")
    proc = _run(env, "deliver")
    try:
        try:
            await wait_for(lambda: len(receiver.to("/crash")) >= 5, timeout=60, what="first deliveries")
            await __import__("asyncio").sleep(0.5)  # let the attempt records go out
        finally:
            proc.send_signal(signal.SIGKILL)  # the deliver role dies before any commit
            proc.wait(10)
        first_round = {r.headers["x-perkamo-delivery"] for r in receiver.to("/crash")}
        assert len(first_round) == 5

        proc = _run({**env, "PERKAMO_COMMIT_INTERVAL_S": "0.2"}, "deliver")
        try:
            await wait_for(lambda: len(receiver.to("/crash")) >= 10, timeout=60, what="redeliveries")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, _tail(proc)
    finally:
        history.send_signal(signal.SIGTERM)
        assert history.wait(30) == 0, _tail(history)
    by_id: dict[str, list[str]] = {}
    for r in receiver.to("/crash"):
        by_id.setdefault(r.headers["x-perkamo-delivery"], []).append(r.headers["x-perkamo-attempt"])
    assert set(by_id) == first_round  # every duplicate carries its original's delivery id
    assert all(attempts == ["1", "1"] for attempts in by_id.values())
    # Written twice, counted once.
    ids = ",".join(f"'{e['id']}'" for e in events)
    raw = query_history_in_subprocess(
        str(data / "history"), f"SELECT count() FROM {TABLE} WHERE event_id IN ({ids})"
    )
    deduped = query_history_in_subprocess(
        str(data / "history"), f"SELECT count() FROM {TABLE} FINAL WHERE event_id IN ({ids})"
    )
    assert raw[0][0] >= 5
    assert deduped == [[5]]
