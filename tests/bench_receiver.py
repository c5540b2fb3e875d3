"""The benchmark's HTTPS webhook receiver: its own process, as cheap per request as aiohttp allows.

    python -m tests.bench_receiver --port 8443 --control-port 8444 --cert-dir DIR [--reuse-port]

Serves HTTPS on loopback with the certificate in DIR (made by `make_certs`: a trustme test CA
written to DIR/ca.pem and a server certificate for 127.0.0.1/localhost in DIR/server.pem).
Paths:

    /slow   read the body, answer 204 after 1 s (/slowN: after N seconds)
    /hang   read the body, never answer (until the client gives up and closes)
    /fail   read the body, answer 500
    /lat    read the body, take arrival - data.context.sent_ns (time.time_ns of the producer), 204
    /stream read the body, keep its x-perkamo-delivery and x-perkamo-attempt headers, 204
    other   read the body, answer 204

A plain-HTTP control server on 127.0.0.1:<control port> serves `GET /stats` (counts per path,
first/last arrival in epoch ns, latencies with `?latencies=1`, the (delivery id, attempt) of
every /stream request with `?ids=1`, the most concurrent /slow and /hang requests, this
process's CPU seconds from getrusage since the last reset) and
`POST /reset`. Several processes may share the HTTPS port with `--reuse-port` (SO_REUSEPORT);
each has its own control port and the caller adds their figures up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import ssl
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

CA_FILE = "ca.pem"
SERVER_FILE = "server.pem"
SLOW_S = 1.0
HANG_LIMIT_S = 600.0  # a hanging request still ends, so the process never piles up forever


def make_certs(cert_dir: Path) -> Path:
    """A test CA (DIR/ca.pem) and a server certificate with its key (DIR/server.pem); returns the CA file."""
    import trustme

    cert_dir.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(cert_dir / CA_FILE))
    ca.issue_cert("127.0.0.1", "localhost", "::1").private_key_and_cert_chain_pem.write_to_path(
        str(cert_dir / SERVER_FILE)
    )
    return cert_dir / CA_FILE


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Stats:
    """Counters since the last reset. Plain attributes: the handler is on the hot path."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.first_ns = 0
        self.last_ns = 0
        self.paths: dict[str, list[int]] = {}  # path -> [count, first_ns, last_ns]
        self.latencies_ns: list[int] = []
        self.ids: list[str] = []  # "delivery_id:attempt" of each /stream request
        self.latency_errors = 0
        self.slow_now = self.slow_max = 0
        self.hang_now = self.hang_max = 0
        self.cpu_at_reset = _cpu_seconds()
        self.reset_ns = time.time_ns()

    def snapshot(self, latencies: bool, ids: bool = False) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "count": self.count,
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
            "paths": {p: {"count": v[0], "first_ns": v[1], "last_ns": v[2]} for p, v in self.paths.items()},
            "latency_samples": len(self.latencies_ns),
            "latency_errors": self.latency_errors,
            "slow_max_concurrent": self.slow_max,
            "hang_max_concurrent": self.hang_max,
            "hang_now": self.hang_now,
            "cpu_s": _cpu_seconds() - self.cpu_at_reset,
            "since_reset_s": (time.time_ns() - self.reset_ns) / 1e9,
        }
        if latencies:
            doc["latencies_ns"] = self.latencies_ns
        if ids:
            doc["ids"] = self.ids
        return doc


def make_handler(stats: Stats) -> Any:
    no_content = 204

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        now = time.time_ns()
        path = request.path
        stats.count += 1
        if not stats.first_ns:
            stats.first_ns = now
        stats.last_ns = now
        entry = stats.paths.get(path)
        if entry is None:
            stats.paths[path] = [1, now, now]
        else:
            entry[0] += 1
            entry[2] = now
        if path == "/lat":
            try:
                sent = orjson.loads(body)["data"]["context"]["sent_ns"]
                stats.latencies_ns.append(now - int(sent))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                stats.latency_errors += 1
        elif path == "/stream":
            headers = request.headers
            delivery = headers.get("x-perkamo-delivery", "")
            stats.ids.append(f"{delivery}:{headers.get('x-perkamo-attempt', '')}")
        elif path == "/fail":
            return web.Response(status=500, text="failing on purpose (bench)")
        elif path.startswith("/slow"):
            stats.slow_now += 1
            stats.slow_max = max(stats.slow_max, stats.slow_now)
            try:
                await asyncio.sleep(float(path[5:]) if path[5:].isdigit() else SLOW_S)
            finally:
                stats.slow_now -= 1
        elif path == "/hang":
            stats.hang_now += 1
            stats.hang_max = max(stats.hang_max, stats.hang_now)
            try:
                deadline = time.monotonic() + HANG_LIMIT_S
                # Cancelled when the client closes (handler_cancellation); polling is the fallback.
                while request.transport is not None and not request.transport.is_closing():
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.5)
            finally:
                stats.hang_now -= 1
        return web.Response(status=no_content)

    return handle


def control_app(stats: Stats) -> web.Application:
    async def get_stats(request: web.Request) -> web.Response:
        latencies = request.query.get("latencies") == "1"
        ids = request.query.get("ids") == "1"
        body = orjson.dumps(stats.snapshot(latencies, ids))
        return web.Response(body=body, content_type="application/json")

    async def reset(_: web.Request) -> web.Response:
        stats.reset()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/stats", get_stats)
    app.router.add_post("/reset", reset)
    return app


async def serve(host: str, port: int, control_port: int, cert_dir: Path, reuse_port: bool) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert_dir / SERVER_FILE))
    stats = Stats()
    loop = asyncio.get_running_loop()
    server = web.Server(make_handler(stats), handler_cancellation=True, access_log=None)
    https = await loop.create_server(server, host, port, ssl=context, reuse_port=reuse_port, backlog=4096)
    runner = web.AppRunner(control_app(stats), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", control_port).start()
    print(f"bench receiver on https://{host}:{port} control http://127.0.0.1:{control_port}", flush=True)
    stop = asyncio.Event()
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    https.close()
    await server.shutdown(0.5)
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("--cert-dir", type=Path, required=True)
    parser.add_argument("--reuse-port", action="store_true")
    args = parser.parse_args()
    # 5,000 deliveries in flight means as many connections: lift the descriptor limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    coro = serve(args.host, args.port, args.control_port, args.cert_dir, args.reuse_port)
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


if __name__ == "__main__":
    main()
