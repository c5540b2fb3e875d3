"""What a Space session may do, on the real roles (broker, embedded ClickHouse, HTTPS
receiver): by-id reads and resends confined to its Space in the SQL, replays limited (no force,
the span bound, one at a time per Space, a rate limit), deliveries on their way skipped, and
console reads on the history API's places (429 pages under a flood, the API still fast)."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import timedelta
from typing import Any

import aiohttp
import pytest

from consumer import constants as c
from consumer.console import console_link
from consumer.console.base import ACTIONS_PER_WINDOW
from tests.support import delayed, unique, wait_for
from tests.test_history_api import NOW, TOKEN, Api, redeliver_ends, republished, seed_real_events, switchable
from tests.test_queries import attempt

pytestmark = pytest.mark.integration


class Browser:
    """A console client with its own cookie jar, on the history role's listener."""

    def __init__(self, settings: Any) -> None:
        host, port = settings.admin_host_port
        self.root = f"http://{host}:{port}"
        self.settings = settings
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def get(self, path: str, redirects: bool = True) -> tuple[int, str, Any]:
        async with self.http.get(self.root + path, allow_redirects=redirects) as r:
            return r.status, await r.text(), r.headers

    async def post(self, path: str, data: dict[str, str]) -> tuple[int, str, Any]:
        async with self.http.post(self.root + path, data=data, allow_redirects=False) as r:
            return r.status, await r.text(), r.headers

    async def open_link(self, space: str) -> None:
        url = console_link(self.settings, space, 3600)
        status, html, _ = await self.get(url[url.index("/console/"):])
        assert status == 200, html[:300]
        fields = dict(re.findall(r'name="(csrf|token)" value="([^"]+)"', html))
        status, _, _ = await self.post("/console/link", fields)
        assert status == 303

    async def sign_in(self) -> None:
        _, html, _ = await self.get("/console/")
        login = re.search(r'name="csrf" value="([^"]+)"', html)
        assert login, html[:300]
        status, _, _ = await self.post("/console/sign-in", {"csrf": login.group(1), "token": TOKEN})
        assert status == 303

    async def csrf(self) -> str:
        _, html, _ = await self.get("/console/deliveries")
        match = re.search(r'name="csrf" value="([^"]+)"', html)
        assert match, html[:300]
        return match.group(1)

    async def close(self) -> None:
        await self.http.close()


async def test_a_space_session_reaches_only_its_own_rows_of_an_id(harness, receiver):
    receiver.on("/hook", switchable(set()))
    a, b = unique("scopea"), unique("scopeb")
    a_ids = seed_real_events(harness.store, a, ["failed"], harness.events_topic)
    b_ids = seed_real_events(harness.store, b, ["failed"], harness.events_topic)
    shared = f"dlv_{unique('shared')}"  # one id with rows in both Spaces (a forged header's work)
    harness.store.insert([attempt(shared, 1, a, "failed", NOW - timedelta(hours=1)),
                          attempt(shared, 1, b, "failed", NOW - timedelta(hours=1),
                                  response_excerpt="B's receiver said this")])
    settings = harness.settings([{"space": a, "url": receiver.url("/hook")},
                                 {"space": b, "url": receiver.url("/hook")}], admin_token=TOKEN)
    await harness.start(settings)
    before = redeliver_ends(harness.kafka)
    api = Api(settings)
    browsers = {space: Browser(settings) for space in (a, b)}
    try:
        for space, browser in browsers.items():
            await browser.open_link(space)
        alpha = browsers[a]
        # Another Space's delivery: the page, the resend, the search redirect, all not found.
        status, html, _ = await alpha.get(f"/console/deliveries/{b_ids[0]}")
        assert status == 404 and b not in html
        csrf = await alpha.csrf()
        status, html, _ = await alpha.post(f"/console/deliveries/{b_ids[0]}/resend", {"csrf": csrf})
        assert status == 404
        status, html, _ = await alpha.post(f"/console/deliveries/{b_ids[0]}/resend",
                                           {"csrf": csrf, "space": b})
        assert status == 404
        # The id in two Spaces: not found to either Space's session, page and resend.
        for space, browser in browsers.items():
            status, html, _ = await browser.get(f"/console/deliveries/{shared}")
            assert status == 404 and "B's receiver" not in html, space
            status, _, _ = await browser.post(f"/console/deliveries/{shared}/resend",
                                              {"csrf": await browser.csrf()})
            assert status == 404, space
        # Its own delivery: shown, with the body of the attempt shown.
        status, html, _ = await alpha.get(f"/console/deliveries/{a_ids[0]}")
        assert status == 200 and "evt_" in html

        # The API: by id within a Space, in the SQL; the admin sees both rows only by naming one.
        status, doc = await api.get(f"/deliveries/{b_ids[0]}", space=a)
        assert status == 404, doc
        status, doc = await api.get(f"/deliveries/{shared}")
        assert status == 400 and a in doc["error"] and b in doc["error"], doc
        status, doc = await api.get(f"/deliveries/{shared}", space=b)
        assert status == 200 and doc["space"] == b and len(doc["attempts"]) == 1, doc
        status, doc = await api.post(f"/deliveries/{b_ids[0]}/resend", {"space": a})
        assert status == 404, doc
        status, doc = await api.post(f"/deliveries/{shared}/resend")
        assert status == 400 and "2 Spaces" in doc["error"], doc
        assert republished(harness.kafka, a, before) == [] and republished(harness.kafka, b, before) == []

        # Answers that carry customer data are not cached nor sniffed; /console redirects.
        async with aiohttp.ClientSession() as http, http.get(
            f"{api.root}/api/v1/deliveries/{a_ids[0]}", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as response:
            assert response.status == 200
            assert response.headers["Cache-Control"] == "no-store"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
        status, _, headers = await alpha.get("/console", redirects=False)
        assert status in (301, 302, 303, 307, 308) and headers["Location"] == "/console/"

        # An admin session sees the id in both Spaces, and resends one by naming its Space.
        admin = Browser(settings)
        browsers["admin"] = admin
        await admin.sign_in()
        status, html, _ = await admin.get(f"/console/deliveries/{shared}")
        assert status == 409 and a in html and b in html and "?space=" in html
        status, html, _ = await admin.get(f"/console/deliveries/{shared}?space={b}")
        assert status == 200 and "B&#39;s receiver said this" in html
        fields = dict(re.findall(r'<input type="hidden" name="(csrf|space)" value="([^"]*)">', html))
        assert fields["space"] == b
        status, _, headers = await admin.post(f"/console/deliveries/{shared}/resend", fields)
        assert status == 303 and f"space={b}" in headers["Location"], headers
        assert len(republished(harness.kafka, b, before)) == 1
        assert republished(harness.kafka, a, before) == []
    finally:
        for browser in browsers.values():
            await browser.close()


async def test_space_links_cannot_force_flood_or_widen_replays(harness, receiver):
    receiver.on("/hook", delayed(0.05))
    space = unique("flood")
    names = seed_real_events(harness.store, space, ["failed"] * 40, harness.events_topic)
    settings = harness.settings([{"space": space, "url": receiver.url("/hook")}], admin_token=TOKEN)
    await harness.start(settings)
    before = redeliver_ends(harness.kafka)
    browser = Browser(settings)
    try:
        await browser.open_link(space)
        csrf = await browser.csrf()
        form = {"csrf": csrf, "since": "1d", "status": "failed"}
        # force is the admin's: refused with a sentence, on the form and on the confirm.
        status, html, _ = await browser.post("/console/replay", {**form, "force": "1"})
        assert status == 403 and "Only an admin session may force" in html
        status, html, _ = await browser.get("/console/replay?since=1d&status=failed&force=1")
        assert status == 403 and "Only an admin session may force" in html
        status, html, _ = await browser.post(f"/console/deliveries/{names[0]}/resend",
                                             {"csrf": csrf, "force": "1"})
        assert status == 403
        # The span bound, as in the API: a dry run over 60 days is refused by both.
        status, html, _ = await browser.get("/console/replay?since=60d&status=failed")
        assert status == 400 and "PERKAMO_HISTORY_MAX_SPAN_DAYS" in html
        status, doc = await Api(settings).post("/replay", {"space": space, "since": "60d", "dry_run": True})
        assert status == 400 and "PERKAMO_HISTORY_MAX_SPAN_DAYS" in doc["error"]
        # A confirm without its status field: 400 and a sentence, not a 503.
        status, html, _ = await browser.post("/console/replay", {"csrf": csrf, "since": "1d"})
        assert status == 400 and "status is missing" in html

        # Ten confirms at once, each a different selection: one replay publishes, once; the
        # others are refused (the Space's one read place: 429; one replay at a time: 409).
        sinces = [f"{h}h" for h in range(20, 30)]
        answers = await asyncio.gather(*(browser.post("/console/replay", {**form, "since": s})
                                         for s in sinces))
        statuses = sorted(status for status, _, _ in answers)
        assert statuses.count(303) == 1 and set(statuses) <= {303, 409, 429}, statuses
        # The eleventh confirm in a minute is past the rate limit, whatever it selects.
        status, html, headers = await browser.post("/console/replay", {**form, "since": "31h"})
        assert status == 429 and f"{ACTIONS_PER_WINDOW} resends or replays" in html
        assert int(headers["Retry-After"]) >= 1
        await wait_for(lambda: len(republished(harness.kafka, space, before)) >= 40, timeout=20,
                       interval=0.5, what="the replay's 40 messages")
        await asyncio.sleep(1.0)
        assert len(republished(harness.kafka, space, before)) == 40  # not 10 x 40
    finally:
        await browser.close()


async def test_a_replay_after_a_resend_skips_the_delivery_on_its_way(harness, receiver):
    receiver.on("/hook", delayed(1.5))  # the resent attempt reaches history after 1.5 s
    space = unique("onway")
    names = seed_real_events(harness.store, space, ["failed"] * 3, harness.events_topic)
    settings = harness.settings([{"space": space, "url": receiver.url("/hook")}], admin_token=TOKEN,
                                delivery_timeout_s=5.0)
    await harness.start(settings)
    before = redeliver_ends(harness.kafka)
    api = Api(settings)
    status, doc = await api.post(f"/deliveries/{names[0]}/resend")
    assert status == 202, doc
    selection = {"space": space, "since": "1d", "status": "failed"}
    status, dry = await api.post("/replay", {**selection, "dry_run": True})
    assert status == 200, dry
    assert (dry["matched"], dry["eligible"], dry["skipped_on_the_way"]) == (3, 2, 1), dry
    status, done = await api.post("/replay", selection)
    assert status == 202, done
    assert (done["published"], done["skipped_on_the_way"]) == (2, 1), done
    # Forced by the admin: still nothing on its way goes out twice.
    status, forced = await api.post("/replay", {**selection, "force": True})
    assert status in (200, 202) and forced["published"] == 0 and forced["skipped_on_the_way"] == 3, forced
    messages = republished(harness.kafka, space, before)
    ids = sorted(dict(m.headers())[c.K_DELIVERY_ID].decode() for m in messages)
    assert ids == sorted(names), ids  # each delivery once: the resend's and the replay's two


async def test_console_reads_under_a_flood_leave_the_api_and_metrics_fast(harness):
    heavy = unique("heavy")
    other = unique("quiet")
    start = NOW - timedelta(days=20)
    rows = [attempt(f"dlv_{heavy}_{n}", 1, heavy, "failed", start + timedelta(seconds=20 * n),
                    request_body=b"{}") for n in range(60_000)]
    for at in range(0, len(rows), 20_000):
        harness.store.insert(rows[at:at + 20_000])
    harness.store.insert([attempt(f"dlv_{other}_0", 1, other, "delivered", NOW - timedelta(minutes=5))])
    settings = harness.settings(admin_token=TOKEN)
    await harness.start(settings)
    api = Api(settings)
    browsers = [Browser(settings) for _ in range(12)]
    try:
        for browser in browsers:  # twelve sessions of one Space link
            await browser.open_link(heavy)
        pages = ["/console/deliveries?status=failed&since=30d", "/console/deliveries?since=30d",
                 "/console/replay?since=30d&status=failed"]
        flood_done = False
        api_times: list[float] = []
        metrics_times: list[float] = []

        async def probe() -> None:
            while not flood_done:
                t0 = time.perf_counter()
                status, doc = await api.get("/deliveries", space=other, limit=5)
                api_times.append(time.perf_counter() - t0)
                assert status == 200, doc
                t0 = time.perf_counter()
                await api.metrics()
                metrics_times.append(time.perf_counter() - t0)
                await asyncio.sleep(0.05)

        prober = asyncio.create_task(probe())
        t0 = time.perf_counter()
        answers = []
        for _ in range(3):
            answers += await asyncio.gather(*(b.get(pages[n % len(pages)]) for n, b in enumerate(browsers)))
        flood_s = time.perf_counter() - t0
        flood_done = True
        await prober
        statuses = [status for status, _, _ in answers]
        busy = [html for status, html, _ in answers if status == 429]
        assert busy and all(s in (200, 429) for s in statuses), sorted(statuses)
        assert "history store is busy" in busy[0]
        worst_api, worst_metrics = max(api_times), max(metrics_times)
        print(f"\nflood of {len(answers)} console pages in {flood_s:.2f} s: "
              f"{statuses.count(429)} answered 429; API reads {len(api_times)}, worst {worst_api:.3f} s; "
              f"/metrics worst {worst_metrics:.3f} s")
        # Before the console shared the API's places: /metrics 10.3 s and the API 14.4 s at worst.
        assert worst_metrics < 2.0, metrics_times
        assert worst_api < 4.0, api_times
    finally:
        for browser in browsers:
            await browser.close()



class SlowProducer:
    """Takes half a second per message: a replay stays in its publishing phase for a while."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def publish(self, topic: str, value: bytes, key: str, headers: list[tuple[str, bytes]]) -> None:
        await asyncio.sleep(0.5)
        self.sent.append(key)


async def test_one_replay_per_space_at_a_time_and_force_never_doubles(store):
    from consumer.errors import Conflict
    from consumer.metrics import Metrics
    from consumer.queries import parse_time
    from consumer.republish import Republisher
    from consumer.republish_plan import Selection

    space, other = unique("oneata"), unique("oneatb")
    seed_real_events(store, space, ["failed"] * 10, "perkamo.events")
    seed_real_events(store, other, ["failed"] * 2, "perkamo.events")
    producer = SlowProducer()
    republisher = Republisher(store, c.REDELIVER_TOPIC, producer, Metrics())  # type: ignore[arg-type]
    first = await republisher.plan_replay(Selection(space, parse_time("1d"), status="failed"))
    running = asyncio.create_task(republisher.execute(first))
    await asyncio.sleep(0.1)
    with pytest.raises(Conflict) as refused:  # another selection of the same Space, even forced
        await republisher.plan_replay(Selection(space, parse_time("2d")), force=True)
    assert refused.value.replay_id == first.replay_id and first.replay_id in str(refused.value)
    dry = await republisher.plan_replay(Selection(space, parse_time("2d")), reserve=False)
    assert (dry.matched, len(dry.todo), dry.on_the_way) == (10, 0, 10)  # a dry run still counts
    elsewhere = await republisher.plan_replay(Selection(other, parse_time("1d")))
    assert len(elsewhere.todo) == 2  # other Spaces are not held up
    await republisher.execute(elsewhere)
    assert await running == 10
    # Done publishing, not yet in history: forced, nothing of it goes out again.
    forced = await republisher.plan_replay(Selection(space, parse_time("3d")), force=True)
    assert (forced.matched, len(forced.todo), forced.on_the_way) == (10, 0, 10)
    assert producer.sent.count(space) == 10 and producer.sent.count(other) == 2
