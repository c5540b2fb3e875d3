"""The delivery console in a real browser: Debian's headless chromium driven by Playwright,
against the in-process consumer on the real broker, the embedded ClickHouse engine and an
HTTPS receiver (the `harness`).

Covers sign-in, filters, a delivery page, resend end to end (the new attempt appears on the
page when it lands), replay with its dry run and progress, a receiver answer carrying
`<script>` and `onerror=` markup that must not run, a Space-scoped link that cannot see
another Space (by URL guessing too), and CSRF refusal. With PERKAMO_SCREENSHOTS_DIR set
(`make screenshots` sets docs/console), each page is saved there as a PNG.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from consumer.console import console_link
from consumer.endpoints import endpoint_id_for
from consumer.models import delivery_id_for
from tests.support import make_event, produce, unique, wait_for
from tests.test_history_api import Api, redeliver_ends, republished, wait_delivery
from tests.test_queries import attempt

pytestmark = pytest.mark.integration

TOKEN = "console-browser-admin-token-0123456789"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS_BODY = ('<script>window.__xss = "script"; alert("script")</script>'
            '<img src=x onerror="window.__xss = \'img\'; alert(\'img\')">')
XSS_REASON = 'Oops <img src=y onerror="alert(1)">'


def chromium() -> str:
    path = os.environ.get("PERKAMO_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        message = "chromium not found: apt-get install chromium (Debian), or deploy/install-tools.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    executable = chromium()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable, headless=True,
                                                    args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


class Watched:
    """A page whose dialogs and console messages are recorded (none may come from data)."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.dialogs: list[str] = []
        self.console: list[str] = []
        page.on("dialog", self._dialog)
        page.on("console", lambda msg: self.console.append(msg.text))
        page.on("pageerror", lambda err: self.console.append(f"pageerror: {err}"))

    async def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    def assert_nothing_ran(self) -> None:
        assert self.dialogs == [], self.dialogs
        blocked = [m for m in self.console if "Content Security Policy" in m or "pageerror" in m]
        assert not blocked, self.console


async def new_page(browser: Any, width: int = 1280, height: int = 860) -> Watched:
    context = await browser.new_context(viewport={"width": width, "height": height})
    return Watched(await context.new_page())


async def shot(page: Any, name: str) -> None:
    folder = os.environ.get("PERKAMO_SCREENSHOTS_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


def switchable(broken: set[str]) -> Any:
    """500 with markup in the body and reason for events in `broken`; 204 once fixed."""
    async def answer(request: web.Request, _: int) -> web.StreamResponse:
        event = orjson.loads(await request.read())
        if event["id"] in broken:
            return web.Response(status=500, reason=XSS_REASON, text=XSS_BODY, content_type="text/html")
        return web.Response(status=204)
    return answer


async def submit(page: Any, selector: str) -> None:
    """Click a form's button and wait for the page it leads to."""
    async with page.expect_navigation():
        await page.click(selector)


async def sign_in(watched: Watched, root: str) -> None:
    page = watched.page
    await page.goto(f"{root}/console/deliveries")
    assert page.url.endswith("/console/")  # no session: the sign-in form, nothing else
    assert await page.locator("input[type=password][name=token]").count() == 1
    await page.fill("input[name=token]", "not-the-token")
    await submit(page, "main button[type=submit]")
    assert await page.locator("text=Wrong token.").count() == 1, await page.content()
    assert await page.locator("table").count() == 0
    await page.fill("input[name=token]", TOKEN)
    await shot(page, "01-sign-in")
    await submit(page, "main button[type=submit]")
    assert page.url.endswith("/console/deliveries")


async def test_support_flow_in_a_browser(harness, receiver, browser):
    space, quiet = unique("shop"), unique("games")
    events = [make_event(space) for _ in range(3)]
    broken = {events[0]["id"], events[1]["id"]}
    receiver.on("/hook", switchable(broken))
    receiver.on("/quiet", switchable(set()))
    settings = harness.settings(
        [{"space": space, "url": receiver.url("/hook")}, {"space": quiet, "url": receiver.url("/quiet")}],
        retry_tiers=["1s"], admin_token=TOKEN)
    app = await harness.start(settings)
    api = Api(settings, token=TOKEN)
    produce(harness.kafka, harness.events_topic, [orjson.dumps(e) for e in events])
    quiet_event = make_event(quiet, event_type="reward.granted")
    produce(harness.kafka, harness.events_topic, [orjson.dumps(quiet_event)])
    failed_id = delivery_id_for(events[0]["id"], endpoint_id_for(space))
    other_failed = delivery_id_for(events[1]["id"], endpoint_id_for(space))
    await wait_delivery(api, failed_id, 2, "failed")
    await wait_delivery(api, other_failed, 2, "failed")
    host, port = settings.admin_host_port
    root = f"http://{host}:{port}"

    watched = await new_page(browser)
    page = watched.page
    await sign_in(watched, root)

    # Filters, as the CLI's: Space and status.
    await page.fill("#space", space)
    await page.select_option("#status", "failed")
    await submit(page, "text=Apply")
    assert "status=failed" in page.url
    rows = page.locator("#deliveries tbody tr")
    assert await rows.count() == 2
    assert {await rows.nth(i).locator("td").nth(3).inner_text() for i in range(2)} == {"failed"}
    await shot(page, "02-deliveries")
    await page.fill("#space", "")
    await page.select_option("#status", "")
    await submit(page, "text=Apply")
    assert await page.locator(f"#deliveries >> text={quiet}").count() == 1

    # One delivery: attempts, the receiver's markup as text, the request that was sent.
    await page.goto(f"{root}/console/deliveries?q={events[0]['data']['transaction_id']}")
    await submit(page, f"text={failed_id}")
    assert page.url.endswith(f"/console/deliveries/{failed_id}")
    assert await page.locator("#attempts tbody tr").count() == 2
    excerpt = page.locator("pre.excerpt").last
    assert await excerpt.inner_text() == XSS_BODY
    assert await page.locator("main script, main img").count() == 0
    assert "Oops <img" in await page.locator("#attempts").inner_text()
    assert await page.evaluate("window.__xss") is None
    assert '"transaction_id": "' in await page.locator("#request-body").inner_text()
    assert failed_id in await page.locator("table.headers").inner_text()
    await shot(page, "03-delivery-failed")

    # Resend once the handler is fixed: published through Kafka, the attempt appears by itself.
    broken.discard(events[0]["id"])
    before = redeliver_ends(harness.kafka)  # resends and replays go to the redeliver topic
    await submit(page, "button[name=resend]")
    assert "awaiting=3" in page.url
    assert "published to Kafka as attempt 3" in await page.locator("#resend-notice").inner_text()
    assert len(republished(harness.kafka, space, before)) == 1
    await page.wait_for_selector("text=Attempt 3 landed in the history", timeout=30_000)
    third = page.locator("#attempts tbody tr").nth(2)
    assert "resend" in await third.inner_text() and "delivered" in await third.inner_text()
    assert receiver.to("/hook")[-1].headers["x-perkamo-attempt"] == "3"
    await shot(page, "04-delivery-resent")

    # CSRF: a POST without the session's token is refused and publishes nothing.
    for form in ({}, {"csrf": "forged"}):
        response = await page.request.post(f"{root}/console/deliveries/{other_failed}/resend", form=form)
        assert response.status == 403
    assert len(republished(harness.kafka, space, before)) == 1

    # Replay: a dry-run count first, then confirm, then progress to the end.
    broken.clear()
    await page.goto(f"{root}/console/replay")
    await page.fill("#space", space)
    await page.fill("#since", "1h")
    await page.select_option("#status", "failed")
    await submit(page, "text=Count (dry run)")
    assert await page.locator("#eligible").inner_text() == "1"
    assert len(republished(harness.kafka, space, before)) == 1
    await shot(page, "05-replay-dry-run")
    await submit(page, "button[name=confirm]")
    assert "/console/replay/" in page.url
    await page.wait_for_selector("text=Done: 1 of 1", timeout=30_000)
    await shot(page, "06-replay-done")
    await wait_delivery(api, other_failed, 3, "delivered")

    # Endpoint and health; the URL stays masked until revealed with the admin token.
    await page.goto(f"{root}/console/endpoints")
    assert "/hook" not in await page.content()
    await shot(page, "07-endpoints")
    await submit(page, f"#endpoints >> text={space}")
    assert "https://localhost/…" in await page.locator("#endpoint-url").inner_text()
    health = await page.locator("#health").inner_text()
    # 4 of its 7 calls failed (the 500s above): the real health model says so.
    assert "failing" in health and "closed" in health and "57.1 %" in health
    await shot(page, "08-endpoint")
    await page.fill("#reveal-token", TOKEN)
    await submit(page, "#reveal button")
    assert await page.locator("#endpoint-url").inner_text() == receiver.url("/hook")

    # Setting a new URL publishes to the registry topic; the running consumer applies it.
    await page.fill("#url", receiver.url("/hook-v2"))
    await submit(page, "#set-endpoint button")
    assert "Published to perkamo.webhooks.endpoints" in await page.locator("#published").inner_text()
    assert "/hook-v2" not in await page.content()
    await wait_for(lambda: (ep := app.registry.get(space)) is not None and ep.url.endswith("/hook-v2"),
                   timeout=20, what="the registry to apply the console's record")

    # A phone.
    phone = await new_page(browser, 390, 844)
    await sign_in(phone, root)
    await phone.page.goto(f"{root}/console/deliveries/{failed_id}")
    await shot(phone.page, "09-phone-delivery")
    width = await phone.page.evaluate("document.documentElement.scrollWidth")
    assert width <= 400, width  # wide tables scroll inside their box, the page does not

    watched.assert_nothing_ran()
    phone.assert_nothing_ran()


async def test_a_scoped_link_cannot_see_another_space(harness, receiver, browser):
    mine, other = unique("mine"), unique("other")
    now = datetime.now(UTC).replace(microsecond=0)
    mine_ids = [f"dlv_{mine}_{n}" for n in range(2)]
    other_ids = [f"dlv_{other}_{n}" for n in range(2)]
    harness.store.insert(
        [attempt(d, 1, mine, "failed", now - timedelta(minutes=5 - n), response_excerpt=XSS_BODY,
                 transaction_id=f"order_{mine}_{n}") for n, d in enumerate(mine_ids)]
        + [attempt(d, 1, other, "failed", now - timedelta(minutes=4 - n), transaction_id=f"order_{other}_{n}")
           for n, d in enumerate(other_ids)])
    settings = harness.settings(
        [{"space": mine, "url": receiver.url("/mine-secret")},
         {"space": other, "url": receiver.url("/other")}],
        admin_token=TOKEN)
    await harness.start(settings)
    host, port = settings.admin_host_port
    root = f"http://{host}:{port}"
    link = console_link(settings, mine, 3600)
    assert link.startswith(f"{root}/console/link?token=")

    watched = await new_page(browser)
    page = watched.page
    await page.goto(link)
    await shot(page, "10-scoped-link")
    await submit(page, "main button[type=submit]")
    assert page.url.endswith("/console/deliveries")
    text = await page.locator("main").inner_text()
    assert all(d in text for d in mine_ids) and not any(d in text for d in other_ids)
    assert f"Space {mine}" in await page.locator("header").inner_text()
    await shot(page, "11-scoped-deliveries")

    # URL guessing: another Space's deliveries, search, endpoint and replay.
    for path in (f"/console/deliveries?space={other}", f"/console/deliveries?q=order_{other}_0",
                 f"/console/deliveries?q={other_ids[0]}", f"/console/replay?space={other}&since=1d"):
        await page.goto(root + path)
        rows = await page.locator("#deliveries tbody").all_inner_texts()
        assert not any(d in "".join(rows) for d in other_ids), path
    assert await page.locator("#eligible").inner_text() == "2"  # the dry run counted its own Space
    for path in (f"/console/deliveries/{other_ids[0]}", f"/console/endpoints/{other}"):
        response = await page.goto(root + path)
        assert response is not None and response.status == 404, path
        assert other_ids[0] not in await page.content()
    await page.goto(f"{root}/console/endpoints")
    await page.wait_for_url(f"**/console/endpoints/{mine}")
    content = await page.content()
    assert "mine-secret" not in content and await page.locator("#reveal").count() == 0
    await shot(page, "12-scoped-endpoint")
    await page.goto(f"{root}/console/deliveries/{mine_ids[0]}")
    assert await page.evaluate("window.__xss") is None
    assert await page.locator("pre.excerpt").last.inner_text() == XSS_BODY

    # Forms aimed at the other Space are refused on the server (the form is forged here).
    csrf = await page.locator("input[name=csrf]").first.get_attribute("value")
    response = await page.request.post(f"{root}/console/endpoints", form={
        "csrf": csrf or "", "space": other, "action": "disable"})
    assert response.status == 403
    response = await page.request.post(f"{root}/console/deliveries/{other_ids[0]}/resend",
                                       form={"csrf": csrf or ""})
    assert response.status == 404
    watched.assert_nothing_ran()
