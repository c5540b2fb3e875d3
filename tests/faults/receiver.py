"""Scripted HTTPS webhook receivers in a process of their own: `python -m tests.faults.receiver SPEC`.

SPEC is a JSON file: {"cert", "key", "out", "ready", "routes": {path: {"mode": ..., ...}}, "garbage": bool}.
Every request is appended to `out` (JSON lines) as a receipt: time, path, delivery id, attempt,
event id (from the body) and the status answered (0: no HTTP answer). `certain` is false when
the status may not have reached the client (an abort, a stalled or huge body): the accounting
then asks the history whether the consumer saw a 2xx.

Modes (the answer is a pure function of (seed, event id, attempt), so a redelivered attempt
gets the same answer):
- ok: 200 after `delay_ms` = [lo, hi] milliseconds;
- flaky: 503 for `fail_pct` percent of attempts, else 200;
- chaos: 5xx, 429/503 + Retry-After, timeouts, resets before and after the status line, slow and
  stalled bodies, redirects, huge bodies and headers, 4xx, and plain 200s;
- target: records only (a redirect target: a consumer that followed a redirect lands here).
With "garbage": true a raw TLS server on a second port answers every request with invalid HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

HUGE_BYTES = 20 * 1024 * 1024
SLEEP_PAST_TIMEOUT_S = 3.0

# chaos: (action, weight in percent)
CHAOS: tuple[tuple[str, int], ...] = (
    ("ok", 30),
    ("error_5xx", 10),
    ("retry_after", 8),
    ("timeout", 7),
    ("reset_after_status", 6),
    ("reset_before_status", 5),
    ("slow_body", 6),
    ("stalled_body", 4),
    ("redirect", 6),
    ("huge_body", 4),
    ("huge_error", 3),
    ("huge_header", 4),
    ("client_error", 7),
)
GARBAGE: tuple[bytes, ...] = (
    b"HTTP/1.1 2OO OK\r\n\r\n",
    b"HTTP/1.1 abc\r\n\r\n",
    b"HTTP/1.1 500 Bad\r\nthis header has no colon\r\n\r\n",
    b"\x00\xff\xfe garbage \x00\r\n\r\n",
    b"",  # close without a word
    b"SMTP ready\r\n",
    b"HTTP/1.1 500 Oops\r\nContent-Length: 100\r\n\r\nshort",
)


def pick(seed: int, event_id: str, attempt: str, modulo: int) -> int:
    digest = hashlib.sha256(f"{seed}|{event_id}|{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % modulo


def chaos_action(seed: int, event_id: str, attempt: str) -> tuple[str, int]:
    roll = pick(seed, event_id, attempt, 100)
    for action, weight in CHAOS:
        if roll < weight:
            return action, pick(seed + 1, event_id, attempt, 1000)
        roll -= weight
    return "ok", 0


def event_id_of(body: bytes) -> str:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    value = doc.get("id") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else ""


class Recorder:
    """Appends receipts to a JSON-lines file, flushed every 100 ms and on exit."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("ab")

    def add(self, path: str, headers: Any, body: bytes, status: int, certain: bool, action: str) -> None:
        receipt = {
            "t": time.time(),
            "path": path,
            "delivery": headers.get("x-perkamo-delivery", ""),
            "attempt": headers.get("x-perkamo-attempt", ""),
            "event_id": event_id_of(body),
            "status": status,
            "certain": certain,
            "action": action,
        }
        self._file.write(orjson.dumps(receipt) + b"\n")

    async def flusher(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            self._file.flush()

    def close(self) -> None:
        self._file.flush()
        self._file.close()


class Routes:
    def __init__(self, routes: dict[str, dict[str, Any]], recorder: Recorder) -> None:
        self.routes = routes
        self.rec = recorder

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        spec = self.routes.get(request.path, {"mode": "ok"})
        mode = spec.get("mode", "ok")
        headers = request.headers
        event_id = event_id_of(body)
        attempt = headers.get("x-perkamo-attempt", "")
        seed = int(spec.get("seed", 0))
        if mode == "target":
            self.rec.add(request.path, headers, body, 200, True, "target")
            return web.Response(status=200)
        if mode == "flaky":
            fail = pick(seed, event_id, attempt, 100) < int(spec.get("fail_pct", 30))
            status = 503 if fail else 200
            self.rec.add(request.path, headers, body, status, True, "flaky")
            return web.Response(status=status)
        if mode == "chaos":
            action, n = chaos_action(seed, event_id, attempt)
            return await self.chaos(request, body, action, n)
        lo, hi = spec.get("delay_ms", [0, 0])
        self.rec.add(request.path, headers, body, 200, True, "ok")
        if hi:
            await asyncio.sleep(random.uniform(lo, hi) / 1000)  # noqa: S311
        return web.Response(status=200, text='{"ok":true}', content_type="application/json")

    async def chaos(self, request: web.Request, body: bytes, action: str, n: int) -> web.StreamResponse:
        path, headers = request.path, request.headers

        def record(status: int, certain: bool = True) -> None:
            self.rec.add(path, headers, body, status, certain, action)

        if action == "ok":
            record(200)
            return web.Response(status=200, text="ok")
        if action == "error_5xx":
            status = (500, 502, 503, 504)[n % 4]
            record(status)
            return web.Response(status=status, text="server error")
        if action == "retry_after":
            status = (429, 503)[n % 2]
            record(status)
            return web.Response(status=status, headers={"Retry-After": str(1 + n % 3)})
        if action == "client_error":
            status = (400, 404, 410, 422)[n % 4]
            record(status)
            return web.Response(status=status)
        if action == "redirect":
            status = (301, 302, 307, 308)[n % 4]
            record(status)
            return web.Response(status=status, headers={"Location": "/redirect-target"})
        if action == "timeout":
            record(0)  # answered after the client gave up
            await asyncio.sleep(SLEEP_PAST_TIMEOUT_S)
            return web.Response(status=200)
        if action == "reset_before_status":
            record(0)
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=200)  # never sent
        if action == "huge_header":
            record(200, certain=False)
            return web.Response(status=200, headers={"X-Huge": "h" * 20000})
        status = 500 if action == "huge_error" else 200
        response = web.StreamResponse(status=status)
        response.content_type = "text/plain"
        record(status, certain=status >= 300)
        await response.prepare(request)
        try:
            if action == "reset_after_status":
                await response.write(b"partial")
                assert request.transport is not None
                request.transport.abort()
                return response
            if action == "slow_body":
                for _ in range(8):
                    await response.write(b"s" * 100)
                    await asyncio.sleep(0.05)
            elif action == "stalled_body":
                await asyncio.sleep(SLEEP_PAST_TIMEOUT_S)
                await response.write(b"late")
            else:  # huge_body, huge_error
                chunk = b"x" * 65536
                for _ in range(HUGE_BYTES // len(chunk)):
                    await response.write(chunk)
            await response.write_eof()
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            pass  # the client hung up, as it should after reading an excerpt
        return response


async def garbage_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rec: Recorder) -> None:
    """Read one request, answer it with something that is not HTTP, hang up."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        path = lines[0].split(" ")[1] if " " in lines[0] else ""
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 10)
        event_id = event_id_of(body)
        answer = GARBAGE[pick(3, event_id, headers.get("x-perkamo-attempt", ""), len(GARBAGE))]
        rec.add(path, headers, body, 0, True, "garbage")
        writer.write(answer)
        await writer.drain()
    except (
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
        TimeoutError,
        ConnectionError,
        ValueError,
        ssl.SSLError,
    ):
        pass
    finally:
        writer.close()


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    return sock


async def main(spec_path: Path) -> None:
    spec = orjson.loads(spec_path.read_bytes())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(spec["cert"], spec["key"])
    rec = Recorder(Path(spec["out"]))
    routes = Routes(spec["routes"], rec)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", routes.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handle_signals=False)
    await runner.setup()
    sock = _listening_socket()
    await web.SockSite(runner, sock, ssl_context=context).start()
    ready = {"port": sock.getsockname()[1]}
    server = None
    if spec.get("garbage"):
        gsock = _listening_socket()
        server = await asyncio.start_server(lambda r, w: garbage_client(r, w, rec), sock=gsock, ssl=context)
        ready["garbage_port"] = gsock.getsockname()[1]
    flusher = asyncio.create_task(rec.flusher())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tmp = Path(spec["ready"] + ".tmp")
    tmp.write_bytes(orjson.dumps(ready))
    os.replace(tmp, spec["ready"])
    await stop.wait()
    if server is not None:
        server.close()
    await runner.cleanup()
    flusher.cancel()
    rec.close()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
