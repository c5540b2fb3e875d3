"""A sample HTTPS webhook receiver with its own test CA, for the demo and local trials.

Paths choose the behaviour: `/webhooks/ok` answers 204, `/webhooks/fail` answers 500, any
other path 404. Every request is kept in memory (headers and body) for the demo's summary.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

import trustme
from aiohttp import web


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class SampleReceiver:
    cert_dir: Path
    hostnames: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
    received: list[Received] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0

    @property
    def ca_file(self) -> Path:
        return self.cert_dir / "ca.pem"

    def _server_context(self) -> ssl.SSLContext:
        """A fresh test CA (trustme) and a server certificate for `hostnames`."""
        self.cert_dir.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(self.ca_file))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*self.hostnames).configure_cert(context)
        return context

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        app = web.Application()
        app.router.add_post("/webhooks/ok", self._ok)
        app.router.add_post("/webhooks/fail", self._fail)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=self._server_context())
        await site.start()
        self.port = int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _record(self, request: web.Request) -> None:
        self.received.append(Received(request.path, dict(request.headers), await request.read()))

    async def _ok(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(status=204)

    async def _fail(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(status=500, text="handler crashed (demo)")
