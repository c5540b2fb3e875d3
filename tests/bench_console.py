"""Console render-time benchmark: the delivery list and a delivery page on 1 million attempts.

    python -m tests.bench_console [--rows 1000000] [--runs 30]

Seeds `--rows` attempts into a fresh embedded store of its own (a temp directory; this
process is the only one that opens it), with tests.bench_history's data (50 Spaces over
30 days, ~1.2 attempts per delivery, ~5 % failed), mounts the console on a local aiohttp
server over that store, signs in, and times whole pages (request to last byte, query and
template included) with an aiohttp client: p50 and p95 over `--runs` warm runs. Not
collected by pytest (bench_*.py); not run in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from consumer.config import Settings, load_settings
from consumer.console import mount
from consumer.endpoints import EndpointRegistry, parse_record
from consumer.history import HistoryStore
from consumer.metrics import Metrics
from consumer.registry_publish import Receipt
from consumer.republish import Republisher
from tests.bench_history import SPACES, TARGET, attempts, batches
from tests.support import free_port

TOKEN = "bench-console-admin-token-0123456789"


@dataclass
class BenchContext:
    settings: Settings
    reader: HistoryStore
    endpoints: EndpointRegistry
    republisher: Any = field(default=None)

    def __post_init__(self) -> None:
        self.republisher = Republisher(self.reader, "perkamo.events", None, Metrics())  # type: ignore[arg-type]

    async def publish_endpoint(self, space: str, record: Mapping[str, Any] | None) -> Receipt:
        raise RuntimeError("the benchmark publishes nothing")

    def endpoint_health(self, space: str) -> Mapping[str, Any] | None:
        return {"state": "healthy", "circuit": "closed"}


def seed(store: HistoryStore, rows: int) -> float:
    started = time.perf_counter()
    for batch in batches(attempts(rows, 30, seed=1), 5000):
        store.insert(batch)
    return time.perf_counter() - started


async def sign_in(session: aiohttp.ClientSession, root: str) -> None:
    async with session.get(f"{root}/console/") as response:
        csrf = re.search(r'name="csrf" value="([^"]+)"', await response.text())
    assert csrf is not None
    async with session.post(f"{root}/console/sign-in", data={"csrf": csrf.group(1), "token": TOKEN},
                            allow_redirects=False) as response:
        assert response.status == 303, response.status


async def time_page(session: aiohttp.ClientSession, url: str, runs: int) -> tuple[list[float], int]:
    times = []
    size = 0
    for n in range(runs + 1):
        started = time.perf_counter()
        async with session.get(url) as response:
            body = await response.read()
            assert response.status == 200, (url, response.status, body[:300])
        if n:  # the first run warms caches
            times.append((time.perf_counter() - started) * 1000)
        size = len(body)
    return times, size


def report(name: str, times: list[float], size: int) -> None:
    times = sorted(times)
    p95 = times[min(len(times) - 1, round(len(times) * 0.95) - 1)]
    print(f"{name:58} p50 {statistics.median(times):7.1f} ms   p95 {p95:7.1f} ms   "
          f"max {times[-1]:7.1f} ms   {size / 1024:6.1f} KiB")


async def bench(store: HistoryStore, runs: int) -> None:
    port = free_port()
    settings = load_settings(admin_token=TOKEN, admin_listen=f"127.0.0.1:{port}")
    registry = EndpointRegistry([parse_record({"space": s, "url": f"https://hooks.{s}.example/p"})
                                 for s in SPACES])
    app = web.Application()
    mount(app, BenchContext(settings, store, registry))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    root = f"http://127.0.0.1:{port}"
    _, rows = store.query(
        "SELECT delivery_id, any(transaction_id) FROM perkamo.webhook_attempts FINAL "
        "WHERE space_slug = {s:String} GROUP BY delivery_id HAVING count() = 3 LIMIT 1", {"s": TARGET})
    delivery_id, transaction_id = rows[0]
    pages = [
        ("deliveries: every Space, no filter (first page)", "/console/deliveries"),
        ("deliveries: every Space, last 24 h", "/console/deliveries?since=24h"),
        ("deliveries: one Space, no time filter", f"/console/deliveries?space={TARGET}"),
        ("deliveries: one Space, last 24 h", f"/console/deliveries?space={TARGET}&since=24h"),
        ("deliveries: one Space, failed, last 7 d",
         f"/console/deliveries?space={TARGET}&status=failed&since=7d"),
        ("search: a transaction id, every Space (30 d window)", f"/console/deliveries?q={transaction_id}"),
        ("delivery page: 3 attempts, body, headers, excerpts", f"/console/deliveries/{delivery_id}"),
        ("endpoint page: health and success rates", f"/console/endpoints/{TARGET}"),
    ]
    try:
        # unsafe=True: keep cookies for an IP address host (127.0.0.1)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            await sign_in(session, root)
            async with session.get(f"{root}/console/deliveries?space={TARGET}") as response:
                text = await response.text()
            cursor = re.search(r'href="([^"]+)" rel="next"', text)
            if cursor:
                pages.insert(3, ("deliveries: one Space, second page (keyset cursor)",
                                 cursor.group(1).replace("&amp;", "&")))
            for name, path in pages:
                times, size = await time_page(session, root + path, runs)
                report(name, times, size)
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    path = tempfile.mkdtemp(prefix="perkamo-bench-console-")
    try:
        store = HistoryStore(f"chdb://{path}")
        store.migrate(90)
        seconds = seed(store, args.rows)
        _, parts = store.query("SELECT count() FROM perkamo.webhook_attempts")
        print(f"seeded {parts[0][0]:,} attempts in {seconds:.0f} s (embedded engine at {path}); "
              f"{args.runs} warm runs per page")
        asyncio.run(bench(store, args.runs))
    finally:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
