"""The admin HTTP server on PERKAMO_ADMIN_LISTEN: /metrics, /healthz, /readyz (DESIGN §8)."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consumer.metrics import Metrics

log = logging.getLogger(__name__)

ReadinessCheck = Callable[[], Awaitable[dict[str, bool]]]


def token_ok(expected: str, given: str | None) -> bool:
    """Constant-time comparison of the admin token; an unset token refuses everything."""
    if not expected or given is None:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def build_app(metrics: Metrics, readiness: ReadinessCheck) -> web.Application:
    app = web.Application()

    async def metrics_handler(_: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        checks = await readiness()
        ready = all(checks.values())
        return web.json_response(
            {"status": "ready" if ready else "not ready", "checks": checks}, status=200 if ready else 503
        )

    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_admin(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("admin API and /metrics on %s:%d", host, port)
    return runner
