"""Issue 20, item 10: an attempt against a receiver that never answers times out at the
setting, not up to a second later.

Measured: with the 5 s default, attempts took 5 to 6 s: aiohttp rounds the deadline of any
timeout of 5 s or more up to the next whole second of the loop's clock (its `ceil_threshold`).
The receivers here are real HTTPS servers on loopback that take the request and never answer,
or take the connection and never start TLS.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from consumer.config import load_settings
from consumer.delivery import Deliverer
from consumer.metrics import Metrics
from consumer.models import Endpoint, Event
from tests.support import ScriptedReceiver, event_rows, make_event, produce, wait_for

TOLERANCE_MS = 150


async def _never(_: web.Request, __: int) -> web.StreamResponse:
    await asyncio.Event().wait()  # cancelled when the receiver stops
    raise AssertionError("unreachable")


@pytest.fixture
def silent_tcp() -> Iterator[int]:
    """A port that accepts connections and never says a word (no TLS handshake)."""
    server = socket.create_server(("127.0.0.1", 0))
    yield server.getsockname()[1]
    server.close()


async def _at_phase(phase: float) -> None:
    """Wait until the loop's clock is `phase` past a whole second: there the old rounding
    added the most (almost a whole second), so the test cannot pass by luck."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep((phase - loop.time() % 1) % 1)


def _event(space: str) -> Event:
    doc = make_event(space)
    return Event(orjson.dumps(doc), doc["id"], doc["type"], space, "live", "u", "t")


@pytest.fixture
async def sender_factory(ca_file: Path) -> AsyncIterator[Any]:
    started: list[Deliverer] = []

    async def make(timeout_s: float) -> Deliverer:
        settings = load_settings(allow_private_networks=["127.0.0.0/8"], ca_bundle=ca_file,
                                 delivery_timeout_s=timeout_s)
        sender = Deliverer(settings, Metrics())
        await sender.start()
        started.append(sender)
        return sender

    yield make
    for sender in started:
        await sender.close()


@pytest.mark.parametrize("timeout_s", [5.0, 1.3])
async def test_a_receiver_that_never_answers_times_out_at_the_setting(
    receiver: ScriptedReceiver, sender_factory: Any, timeout_s: float
) -> None:
    receiver.on("/never", _never)
    sender = await sender_factory(timeout_s)
    endpoint = Endpoint(id="ep_never", space="s-never", url=receiver.url("/never"))
    await _at_phase(0.05)
    started = time.perf_counter()
    result = await sender.call(endpoint, _event("s-never"), "dlv_never", 1)
    elapsed_ms = (time.perf_counter() - started) * 1000
    assert result.outcome == "timeout", result
    assert len(receiver.to("/never")) == 1  # the request did arrive: the answer never came
    assert abs(result.duration_ms - timeout_s * 1000) <= TOLERANCE_MS, result.duration_ms
    assert abs(elapsed_ms - timeout_s * 1000) <= TOLERANCE_MS, elapsed_ms


async def test_a_receiver_that_never_starts_tls_times_out_at_the_setting(
    silent_tcp: int, sender_factory: Any
) -> None:
    sender = await sender_factory(5.0)
    endpoint = Endpoint(id="ep_mute", space="s-mute", url=f"https://127.0.0.1:{silent_tcp}/hook")
    await _at_phase(0.05)
    result = await sender.call(endpoint, _event("s-mute"), "dlv_mute", 1)
    assert result.outcome == "timeout", result
    assert abs(result.duration_ms - 5000) <= TOLERANCE_MS, result.duration_ms


@pytest.mark.integration
@pytest.mark.parametrize("timeout_s", [5.0, 1.3])
async def test_the_recorded_duration_of_a_timeout_is_the_setting(
    harness: Any, receiver: ScriptedReceiver, timeout_s: float
) -> None:
    # The whole path: the event from Kafka, the attempt, its history row.
    space = f"s-timeout-{str(timeout_s).replace('.', '-')}"
    receiver.on("/never", _never)
    await harness.start(harness.settings([{"space": space, "url": receiver.url("/never")}],
                                         retry_tiers=["1m"], delivery_timeout_s=timeout_s))
    event = make_event(space)
    produce(harness.kafka, harness.events_topic, [orjson.dumps(event)])
    rows = await wait_for(
        lambda: event_rows(harness.store, event["id"], ("error_kind", "duration_ms")),
        timeout=30, what="the attempt row",
    )
    assert len(rows) == 1
    kind, duration_ms = rows[0]
    assert kind == "timeout"
    assert abs(duration_ms - timeout_s * 1000) <= TOLERANCE_MS, duration_ms
