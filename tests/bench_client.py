"""The benchmark's raw ceiling: a bare aiohttp client posting the consumer's payloads (phase 1).

    python -m tests.bench_client --url https://127.0.0.1:PORT/ok --ca CA --events N --concurrency C

Runs in its own process (so it gets a core like the consumer does) with uvloop, like
`perkamo-webhooks run`. One ClientSession, TCPConnector(limit=C, limit_per_host=C), TLS
verified against the test CA, the same body bytes and contract headers the consumer sends,
and the same way of reading a response (a bounded excerpt). Everything but the HTTP exchange
(event building, serialization, delivery ids) is done before the clock starts. Prints one JSON
object: posted, ok, errors, wall_s, cpu_s, rss_start_kb (when the clock starts), max_rss_kb.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import resource
import ssl
import sys
import time
from typing import Any

import aiohttp
import orjson

from consumer.models import delivery_id_for
from tests.support import make_event

USER_AGENT = "Perkamo-Webhook/1.0"


def payload(space: str, n: int, sent_ns: int | None = None) -> bytes:
    """One event body as the benchmark publishes it (contract-shaped, ~450 bytes)."""
    event = make_event(space, n)
    if sent_ns is not None:
        event["data"]["context"]["sent_ns"] = sent_ns
    return orjson.dumps(event)


def headers_for(body: bytes, endpoint_id: str) -> dict[str, str]:
    doc = orjson.loads(body)
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "x-perkamo-delivery": delivery_id_for(doc["id"], endpoint_id),
        "x-perkamo-event": doc["type"],
        "x-perkamo-space": doc["data"]["space"]["slug"],
        "x-perkamo-attempt": "1",
    }


def _rss_kb() -> int:
    """This process's resident set now (VmRSS, Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(url: str, ca: str, events: int, concurrency: int, space: str,
              timeout_s: float) -> dict[str, Any]:
    requests = [(body, headers_for(body, "ep_bench")) for body in (payload(space, n) for n in range(events))]
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=ca)
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, ssl=context,
                                     ttl_dns_cache=30, enable_cleanup_closed=True)
    session = aiohttp.ClientSession(connector=connector, skip_auto_headers=("Accept", "Accept-Encoding"),
                                    auto_decompress=False, trust_env=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    next_index = itertools.count()
    ok = errors = 0

    async def worker() -> None:
        nonlocal ok, errors
        for index in next_index:
            if index >= len(requests):
                return
            body, headers = requests[index]
            try:
                async with session.post(url, data=body, headers=headers, allow_redirects=False,
                                        timeout=timeout) as response:
                    await response.content.read(1024)
                    if 200 <= response.status < 300:
                        ok += 1
                    else:
                        errors += 1
            except (TimeoutError, aiohttp.ClientError, OSError):
                errors += 1

    rss_start = _rss_kb()
    cpu_before = _cpu_seconds()
    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        wall = time.perf_counter() - started
        cpu = _cpu_seconds() - cpu_before
        await session.close()
    return {"posted": len(requests), "ok": ok, "errors": errors, "wall_s": wall, "cpu_s": cpu,
            "concurrency": concurrency, "rss_start_kb": rss_start,
            "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--space", default="bench-live")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    coro = run(args.url, args.ca, args.events, args.concurrency, args.space, args.timeout)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(coro)
    else:
        result = uvloop.run(coro)
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")


if __name__ == "__main__":
    main()
