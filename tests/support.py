"""Test building blocks: a scripted HTTPS receiver, Kafka helpers, event factories, polling."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from consumer.history import TABLE

_counter = itertools.count()


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port free now and never handed out before by this process: the kernel may
    give a just-closed port again, and two listeners of one test (the history and the deliver
    role's admin) then collide."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@contextlib.asynccontextmanager
async def plain_server_204() -> AsyncIterator[tuple[int, list[str]]]:
    """A plain-HTTP aiohttp server on 127.0.0.1 answering 204 to everything; yields (port, the
    paths it saw). For the SSRF guard's loopback tests, where TLS is beside the point."""
    seen: list[str] = []

    async def ok(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield int(runner.addresses[0][1]), seen
    finally:
        await runner.cleanup()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def make_event(
    space: str, n: int | None = None, event_type: str = "purchase.completed", environment: str = "live"
) -> dict[str, Any]:
    """An event shaped like the contract's example."""
    n = next(_counter) if n is None else n
    return {
        "id": f"evt_{uuid.uuid4().hex[:12]}_{n}",
        "type": event_type,
        "created_at": "2026-06-01T10:00:00.000Z",
        "data": {
            "space": {"slug": space, "name": "Commerce Live", "environment": environment},
            "user_id": "customer_123",
            "transaction_id": f"order_{n}",
            "event": event_type,
            "status": "applied",
            "occurred_at": "2026-06-01T10:00:00.000Z",
            "context": {"amount": 12900, "currency": "CZK"},
            "delta": [{"wallet": "loyalty_points", "amount": 10}],
            "effects": [],
            "wallet_state": {"loyalty_points": 120},
        },
    }


def event_rows(store: Any, event_id: str, columns: Sequence[str]) -> list[tuple[Any, ...]]:
    """One event's history rows (hold records included), oldest attempt first: `columns` of
    each, read with FINAL as every reader does. `store` is a HistoryStore."""
    _, rows = store.query(
        f"SELECT {', '.join(columns)} FROM {TABLE} FINAL WHERE event_id = {{e:String}} "
        "ORDER BY attempt",
        {"e": event_id},
    )
    return [tuple(row) for row in rows]


def event_records(store: Any, event_id: str, columns: Sequence[str]) -> list[dict[str, Any]]:
    """`event_rows` as {column: value} dicts."""
    return [dict(zip(columns, row, strict=True)) for row in event_rows(store, event_id, columns)]


def latest_status(store: Any, space: str, key: str = "event_id") -> dict[str, str]:
    """Per `key` (event_id or delivery_id) of a Space, the status of its newest row."""
    _, rows = store.query(
        f"SELECT {key}, argMax(status, (attempted_at, attempt)) FROM {TABLE} FINAL "
        f"WHERE space_slug = {{s:String}} GROUP BY {key}",
        {"s": space},
    )
    return {str(k): str(s) for k, s in rows}


def produce(
    bootstrap: str,
    topic: str,
    values: list[bytes | None],
    key: bytes | None = None,
    headers: list[tuple[str, bytes]] | None = None,
    partition: int | None = None,
) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for value in values:
        kwargs: dict[str, Any] = {"key": key, "headers": headers}
        if partition is not None:
            kwargs["partition"] = partition
        producer.produce(topic, value, **kwargs)
    assert producer.flush(30) == 0


def end_offsets(bootstrap: str, topics: list[str]) -> dict[tuple[str, int], int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("probe")})
    try:
        meta = consumer.list_topics(timeout=10)
        out = {}
        for topic in topics:
            for pid in meta.topics[topic].partitions:
                out[(topic, pid)] = _watermark(consumer, TopicPartition(topic, pid))
        return out
    finally:
        consumer.close()


def _watermark(consumer: Consumer, tp: TopicPartition) -> int:
    # A topic created a moment ago may answer NOT_LEADER for a short while.
    deadline = time.monotonic() + 15
    while True:
        try:
            return int(consumer.get_watermark_offsets(tp, timeout=10)[1])
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


_COORDINATOR_ERRORS = frozenset({KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                                  KafkaError.COORDINATOR_NOT_AVAILABLE})


def fast_forward_group(bootstrap: str, group: str, topics: list[str]) -> None:
    """Commit the group's offsets at the topics' ends, so messages of earlier tests are skipped."""
    ends = end_offsets(bootstrap, topics)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in ends.items()],
                                asynchronous=False)
                return
            except KafkaException as exc:  # a new broker's group coordinator is still loading
                err = exc.args[0]
                if not (err.retriable() or err.code() in _COORDINATOR_ERRORS) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        consumer.close()


def committed(bootstrap: str, group: str, topic: str, partitions: int = 1) -> list[int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return [tp.offset for tp in tps]
    finally:
        consumer.close()


def read_topic(
    bootstrap: str,
    topic: str,
    since: dict[tuple[str, int], int] | None = None,
    timeout: float = 10.0,
    expect: int | None = None,
) -> list[Any]:
    """Messages of `topic` after the `since` offsets (all of them by default)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique("reader"),
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=10)
        tps = [
            TopicPartition(topic, p, (since or {}).get((topic, p), 0)) for p in meta.topics[topic].partitions
        ]
        consumer.assign(tps)
        ends = {p.partition: _watermark(consumer, p) for p in tps}
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.5):
                if msg.error() is None:
                    out.append(msg)
            positions = {tp.partition: tp.offset for tp in consumer.position(tps)}
            caught_up = all(positions.get(p, 0) >= end for p, end in ends.items() if end > 0)
            if (expect is None and caught_up) or (expect is not None and len(out) >= expect):
                break
        return out
    finally:
        consumer.close()


async def wait_for(
    predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


@dataclass
class Request:
    path: str
    raw_headers: list[tuple[bytes, bytes]]
    body: bytes
    at: float

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode().lower(): v.decode() for k, v in self.raw_headers}


Behaviour = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


@dataclass
class ScriptedReceiver:
    """An HTTPS server on loopback whose answer per path is scripted by the test."""

    ssl_context: Any
    requests: list[Request] = field(default_factory=list)
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    port: int = 0
    runner: web.AppRunner | None = None

    def url(self, path: str, host: str = "localhost") -> str:
        return f"https://{host}:{self.port}{path}"

    def on(self, path: str, behaviour: Behaviour) -> str:
        self.behaviours[path] = behaviour
        return path

    def to(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=self.ssl_context).start()

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        count = len(self.to(request.path))
        self.requests.append(Request(request.path, list(request.raw_headers), body, time.time()))
        behaviour = self.behaviours.get(request.path)
        if behaviour is None:
            return web.Response(status=204)
        return await behaviour(request, count)


def status(code: int, text: str = "", headers: dict[str, str] | None = None) -> Behaviour:
    async def answer(_: web.Request, __: int) -> web.StreamResponse:
        return web.Response(status=code, text=text or None, headers=headers)

    return answer


def sequence(*codes: int) -> Behaviour:
    """Answer the n-th request with codes[n] (the last code repeats)."""

    async def answer(_: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=codes[min(n, len(codes) - 1)])

    return answer


def delayed(seconds: float, code: int = 204) -> Behaviour:
    async def answer(_: web.Request, __: int) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(status=code)

    return answer


def loads(value: bytes) -> Any:
    return orjson.loads(value)


def query_history_in_subprocess(path: str, sql: str) -> list[list[Any]]:
    """Read a chDB history path from a fresh process (chDB opens one path per process)."""
    import subprocess
    import sys

    code = (
        "import sys, orjson\n"
        "from consumer.history import HistoryStore\n"
        "cols, rows = HistoryStore(sys.argv[1]).query(sys.argv[2])\n"
        "sys.stdout.buffer.write(orjson.dumps([list(r) for r in rows], default=str))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, f"chdb://{path}", sql], check=True, capture_output=True, timeout=120
    )
    return list(orjson.loads(out.stdout))
