"""The delivery console's rules with a plain HTTP client: sign-in, sessions, scoped links,
CSRF, headers, escaping, and that a Space-scoped session can reach nothing of another Space.

The console is mounted on a bare aiohttp app over a test context: the session's embedded
ClickHouse store (seeded here), the real Republisher with a recording producer (so resend and
replay run their real checks, and nothing reaches Kafka), and a recording registry publisher.
The browser tests (tests/test_console_browser.py) run the same console on the real broker.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from consumer import constants as c
from consumer.config import load_settings
from consumer.console import console_link, mount
from consumer.console.auth import Keys, hkdf_sha256
from consumer.endpoints import EndpointRegistry, parse_record
from consumer.metrics import Metrics
from consumer.registry_publish import Receipt
from consumer.republish import Republisher
from tests.support import unique
from tests.test_queries import attempt

TOKEN = "console-admin-token-for-tests-0123456789"
NOW = datetime.now(UTC).replace(microsecond=0)
SECRET_PATH = "/hooks/s3cr3t-path-and-query"
XSS_EXCERPT = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'


@dataclass
class RecordingProducer:
    sent: list[tuple[str, bytes, str, list[tuple[str, bytes]]]] = field(default_factory=list)

    async def publish(self, topic: str, value: bytes, key: str, headers: list[tuple[str, bytes]]) -> None:
        self.sent.append((topic, value, key, headers))


@dataclass
class Context:
    """A ConsoleContext over the test store; records what it would publish."""

    settings: Any
    reader: Any
    endpoints: EndpointRegistry
    producer: RecordingProducer = field(default_factory=RecordingProducer)
    published: list[tuple[str, Any]] = field(default_factory=list)
    health: dict[str, dict[str, Any]] = field(default_factory=dict)
    republisher: Any = None

    def __post_init__(self) -> None:
        self.republisher = Republisher(self.reader, "perkamo.events.console-test", self.producer,  # type: ignore[arg-type]
                                       Metrics(), has_endpoint=lambda s: self.endpoints.get(s) is not None)

    async def publish_endpoint(self, space: str, record: Mapping[str, Any] | None) -> Receipt:
        self.published.append((space, None if record is None else dict(record)))
        return Receipt(0, len(self.published))

    def endpoint_health(self, space: str) -> Mapping[str, Any] | None:
        return self.health.get(space)


@dataclass
class Seeded:
    a: str
    b: str
    a_ids: list[str]
    b_ids: list[str]


def seed(store: Any) -> Seeded:
    a, b = unique("alpha"), unique("bravo")
    rows = []
    a_ids, b_ids = [], []
    for n in range(3):
        at = NOW - timedelta(minutes=30 - n)
        did = f"dlv_{a}_{n}"
        a_ids.append(did)
        rows.append(attempt(did, 1, a, "retrying", at, event_id=f"evt_{a}_{n}",
                            transaction_id=f"order_{a}_{n}", response_excerpt=XSS_EXCERPT,
                            status_text="<b onmouseover=alert(1)>Bad</b>",
                            request_body=orjson.dumps({"id": f"evt_{a}_{n}", "note": "<script>x</script>"})))
        rows.append(attempt(did, 2, a, "failed", at + timedelta(seconds=5), event_id=f"evt_{a}_{n}",
                            transaction_id=f"order_{a}_{n}", error="HTTP 500 <i>oops</i>"))
    for n in range(2):
        did = f"dlv_{b}_{n}"
        b_ids.append(did)
        rows.append(attempt(did, 1, b, "failed", NOW - timedelta(minutes=20 - n), event_id=f"evt_{b}_{n}",
                            transaction_id=f"order_{b}_{n}"))
    store.insert(rows)
    return Seeded(a, b, a_ids, b_ids)


class Browserless:
    """A test client with cookies, CSRF scraping and a same-origin header."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    async def get(self, path: str, **kw: Any) -> tuple[int, str, Any]:
        async with self.client.get(path, allow_redirects=kw.pop("allow_redirects", True), **kw) as r:
            return r.status, await r.text(), r

    async def post(self, path: str, data: dict[str, str], **kw: Any) -> tuple[int, str, Any]:
        async with self.client.post(path, data=data, allow_redirects=kw.pop("allow_redirects", False),
                                    **kw) as r:
            return r.status, await r.text(), r

    async def csrf(self, path: str = "/console/deliveries") -> str:
        _, html, _ = await self.get(path)
        match = re.search(r'name="csrf" value="([^"]+)"', html)
        assert match, html[:500]
        return match.group(1)

    async def sign_in(self, token: str = TOKEN) -> tuple[int, str, Any]:
        _, html, _ = await self.get("/console/")
        login = re.search(r'name="csrf" value="([^"]+)"', html)
        assert login, html
        return await self.post("/console/sign-in", {"csrf": login.group(1), "token": token})

    async def open_link(self, url: str) -> tuple[int, str, Any]:
        path = url[url.index("/console/"):]
        status, html, _ = await self.get(path)
        if status != 200:
            return status, html, None
        fields = dict(re.findall(r'name="(csrf|token)" value="([^"]+)"', html))
        return await self.post("/console/link", fields)


@pytest.fixture
def seeded(store: Any) -> Seeded:
    return seed(store)


def make_context(store: Any, seeded: Seeded, **overrides: Any) -> Context:
    settings = load_settings(**{"admin_token": TOKEN, "admin_listen": "127.0.0.1:9464", **overrides})
    registry = EndpointRegistry([
        parse_record({"space": seeded.a, "url": f"https://hooks.alpha.example{SECRET_PATH}",
                      "signing_secrets": ["whsec_" + "A" * 43 + "="]}),
        parse_record({"space": seeded.b, "url": "https://hooks.bravo.example/other-secret-path"}),
    ])
    return Context(settings, store, registry)


@pytest.fixture
async def console(store: Any, seeded: Seeded) -> AsyncIterator[tuple[Browserless, Context]]:
    ctx = make_context(store, seeded)
    async with _served(ctx) as client:
        yield client, ctx


class _served:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    async def __aenter__(self) -> Browserless:
        app = web.Application()
        mount(app, self.ctx)
        self.client = TestClient(TestServer(app))
        await self.client.start_server()
        return Browserless(self.client)

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()


def link_for(ctx: Context, space: str, ttl_s: float = 3600) -> str:
    return console_link(ctx.settings, space, ttl_s)


# Sign-in -------------------------------------------------------------------------------------


async def test_sign_in_gives_an_httponly_strict_expiring_cookie(console):
    client, _ = console
    status, html, response = await client.get("/console/deliveries", allow_redirects=False)
    assert status == 303 and response.headers["Location"] == "/console/"
    status, html, _ = await client.get("/console/")
    assert status == 200 and 'type="password"' in html and 'name="token"' in html
    assert "dlv_" not in html

    status, _, response = await client.sign_in()
    assert status == 303 and response.headers["Location"] == "/console/deliveries"
    cookie = response.cookies["perkamo_console"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/console"
    assert 8 * 3600 - 2 <= int(cookie["max-age"]) <= 8 * 3600
    assert not cookie["secure"]  # plain http here; Secure over TLS or with an https console URL
    status, html, _ = await client.get("/console/deliveries")
    assert status == 200 and "admin" in html


async def test_a_wrong_token_sees_nothing_and_is_throttled(console, seeded):
    client, _ = console
    for _ in range(5):
        status, html, response = await client.sign_in("wrong-token")
        assert status == 401 and "Wrong token" in html
        assert "perkamo_console" not in response.cookies
        assert seeded.a not in html and "dlv_" not in html
    status, html, response = await client.sign_in("wrong-token")  # the sixth is not checked
    assert status == 429 and int(response.headers["Retry-After"]) > 0
    status, _, _ = await client.get("/console/deliveries", allow_redirects=False)
    assert status == 303
    # Counted per token prefix as well as per address (tests/test_console_auth.py): a wrong
    # token does not lock out another one typed from the same address.
    status, _, _ = await client.sign_in(TOKEN)
    assert status == 303


async def test_sign_in_without_the_form_token_is_refused(console):
    client, _ = console
    status, html, _ = await client.post("/console/sign-in", {"token": TOKEN})
    assert status == 403 and "out of date" in html


async def test_sign_out_ends_the_session_even_if_the_cookie_is_replayed(console):
    client, _ = console
    await client.sign_in()
    cookie = client.client.session.cookie_jar.filter_cookies(client.client.make_url("/console/"))
    value = cookie["perkamo_console"].value
    status, _, _ = await client.post("/console/sign-out", {"csrf": await client.csrf()})
    assert status == 303
    status, _, _ = await client.get("/console/deliveries", allow_redirects=False)
    assert status == 303
    status, _, _ = await client.get("/console/deliveries", allow_redirects=False,
                                    headers={"Cookie": f"perkamo_console={value}"})
    assert status == 303  # revoked in this process


async def test_console_off_without_any_secret(store, seeded):
    ctx = make_context(store, seeded, admin_token="")
    async with _served(ctx) as client:
        status, html, _ = await client.get("/console/")
        assert status == 503 and "PERKAMO_ADMIN_TOKEN" in html


async def test_a_console_secret_alone_allows_links_but_no_admin_sign_in(store, seeded):
    ctx = make_context(store, seeded, admin_token="", console_secret="s" * 40)
    async with _served(ctx) as client:
        status, html, _ = await client.get("/console/")
        assert status == 200 and "Admin sign-in is off" in html and 'name="token"' not in html
        status, _, _ = await client.open_link(link_for(ctx, seeded.a))
        assert status == 303
        status, html, _ = await client.get("/console/deliveries")
        assert status == 200 and seeded.a_ids[0] in html


# Headers -------------------------------------------------------------------------------------


async def test_every_console_response_carries_the_security_headers(console, seeded):
    client, _ = console
    responses = []
    for path in ("/console/", "/console/static/console.css", "/console/nowhere", "/console/deliveries"):
        responses.append(await client.get(path, allow_redirects=False))
    await client.sign_in()
    for path in ("/console/deliveries", f"/console/deliveries/{seeded.a_ids[0]}", "/console/deliveries/nope",
                 "/console/replay", f"/console/endpoints/{seeded.a}", "/console/endpoints",
                 "/console/replay/unknown", "/console/deliveries?since=yesterday"):
        responses.append(await client.get(path, allow_redirects=False))
    responses.append(await client.post("/console/deliveries/x/resend", {}))
    for status, _, response in responses:
        headers = response.headers
        csp = headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp, csp
        assert "frame-ancestors 'none'" in csp and "form-action 'self'" in csp
        assert "unsafe-inline" not in csp
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert headers["Cache-Control"] == "no-store"
    statuses = [s for s, _, _ in responses]
    assert statuses[:4] == [200, 200, 404, 303] and 404 in statuses[4:] and 400 in statuses[4:]


# CSRF ----------------------------------------------------------------------------------------


async def test_every_post_needs_the_sessions_csrf_token_and_the_same_origin(console, seeded):
    client, ctx = console
    await client.sign_in()
    good = await client.csrf()
    forms = [
        (f"/console/deliveries/{seeded.a_ids[0]}/resend", {}),
        ("/console/replay", {"space": seeded.a, "since": "1d"}),
        ("/console/endpoints", {"space": seeded.a, "action": "disable"}),
        (f"/console/endpoints/{seeded.a}/reveal", {"token": TOKEN}),
        ("/console/sign-out", {}),
    ]
    for path, data in forms:
        for csrf in ("", "forged", good[:-1] + ("A" if good[-1] != "A" else "B")):
            status, html, _ = await client.post(path, {**data, "csrf": csrf} if csrf else data)
            assert status == 403 and "nothing was done" in html, (path, csrf, status)
        status, html, _ = await client.post(path, {**data, "csrf": good},
                                            headers={"Origin": "https://evil.example"})
        assert status == 403 and "another origin" in html
        status, html, _ = await client.post(path, {**data, "csrf": good},
                                            headers={"Sec-Fetch-Site": "cross-site"})
        assert status == 403 and "another site" in html
    # A second admin session's token is not this one's.
    second = Browserless(TestClient(TestServer(client.client.server.app)))
    await second.client.start_server()
    try:
        await second.sign_in()
        assert await second.csrf() != good
    finally:
        await second.client.close()
    assert ctx.producer.sent == [] and ctx.published == []
    status, _, _ = await client.get("/console/deliveries", allow_redirects=False)
    assert status == 200  # the refused sign-out did not sign out


# Scoped links --------------------------------------------------------------------------------


async def test_a_scoped_link_sees_its_space_only_whatever_the_url_says(console, seeded):
    client, ctx = console
    status, _, response = await client.open_link(link_for(ctx, seeded.a))
    assert status == 303 and response.headers["Location"] == "/console/deliveries"
    cookie = response.cookies["perkamo_console"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and int(cookie["max-age"]) <= 3600

    _, html, _ = await client.get("/console/deliveries")
    assert all(d in html for d in seeded.a_ids) and not any(d in html for d in seeded.b_ids)
    assert f"Space {seeded.a}" in html
    # URL guessing: the space filter is forced from the session.
    for query in (f"space={seeded.b}", f"q={seeded.b_ids[0]}", f"q=evt_{seeded.b}_0",
                  f"q=order_{seeded.b}_1", f"space={seeded.b}&status=failed"):
        status, html, _ = await client.get(f"/console/deliveries?{query}")
        shown = "".join(re.findall(r'<table class="list" id="deliveries">.*?</table>', html, re.S))
        assert status == 200 and not any(d in shown for d in seeded.b_ids), query
    for path in (f"/console/deliveries/{seeded.b_ids[0]}", f"/console/endpoints/{seeded.b}",
                 "/console/deliveries/dlv_unknown"):
        status, html, _ = await client.get(path)
        assert status == 404 and "No " in html, path
        assert seeded.b not in html or path.endswith(seeded.b), path
    status, _, response = await client.get("/console/endpoints", allow_redirects=False)
    assert response.headers["Location"] == f"/console/endpoints/{seeded.a}"

    csrf = await client.csrf()
    status, _, _ = await client.post(f"/console/deliveries/{seeded.b_ids[0]}/resend", {"csrf": csrf})
    assert status == 404
    status, html, _ = await client.post("/console/replay", {"csrf": csrf, "space": seeded.b, "since": "1d"})
    assert status == 403 and "own Space only" in html
    status, html, _ = await client.get(f"/console/replay?space={seeded.b}&since=1d")
    assert seeded.b not in html  # the dry run counted the session's Space instead
    for action in ("set", "disable", "remove"):
        status, html, _ = await client.post("/console/endpoints", {
            "csrf": csrf, "space": seeded.b, "action": action, "url": "https://evil.example/x"})
        assert status == 403 and "own Space" in html
    status, _, _ = await client.post(f"/console/endpoints/{seeded.b}/reveal", {"csrf": csrf, "token": TOKEN})
    assert status == 404
    status, html, _ = await client.post(f"/console/endpoints/{seeded.a}/reveal",
                                        {"csrf": csrf, "token": TOKEN})
    assert status == 403 and SECRET_PATH not in html
    assert ctx.producer.sent == [] and ctx.published == []

    # Its own Space: resend and endpoint changes work, the URL stays masked.
    status, html, _ = await client.get(f"/console/endpoints/{seeded.a}")
    assert status == 200 and "https://hooks.alpha.example/…" in html and SECRET_PATH not in html
    assert "Reveal" not in html and "remove" not in html
    status, html, _ = await client.post("/console/endpoints", {
        "csrf": csrf, "space": seeded.a, "action": "remove"})
    assert status == 400 and "Only the admin" in html
    status, _, _ = await client.post(f"/console/deliveries/{seeded.a_ids[0]}/resend", {"csrf": csrf})
    assert status == 303 and len(ctx.producer.sent) == 1 and ctx.producer.sent[0][2] == seeded.a


async def test_a_replay_job_of_another_space_is_not_found(console, seeded):
    client, ctx = console
    await client.sign_in()
    csrf = await client.csrf()
    status, _, response = await client.post("/console/replay", {
        "csrf": csrf, "space": seeded.b, "since": "1d", "status": "failed"})
    assert status == 303, _
    job_path = response.headers["Location"]
    await asyncio.sleep(0.2)
    status, html, _ = await client.get(job_path)
    assert status == 200 and "Done: 2 of 2" in html
    scoped = Browserless(TestClient(TestServer(client.client.server.app)))
    await scoped.client.start_server()
    try:
        await scoped.open_link(link_for(ctx, seeded.a))
        status, html, _ = await scoped.get(job_path)
        assert status == 404 and seeded.b not in html
    finally:
        await scoped.client.close()


async def test_expired_forged_and_reused_credentials(console, seeded):
    client, ctx = console
    keys = Keys.from_settings("", TOKEN)
    assert keys is not None
    old = Keys(TOKEN, TOKEN, clock=lambda: time.time() - 7200)
    for url in (
        f"/console/link?token={old.link_token(seeded.a, 3600)}",  # expired an hour ago
        f"/console/link?token={keys.link_token(seeded.a, 60)[:-3]}xyz",  # forged signature
        f"/console/link?token={Keys('another-secret-' * 3, TOKEN).link_token(seeded.a, 60)}",
        "/console/link?token=",
        "/console/link?token=" + "v1." + "A" * 3000,
    ):
        status, html, _ = await client.get(url)
        assert status in (403, 429) and seeded.a_ids[0] not in html, url
    # A session cookie is not a link, nor the other way round; a forged role is refused.
    session = keys.new_session("space", seeded.a, 3600)
    status, _, _ = await client.get(f"/console/link?token={keys.session_cookie(session)}")
    assert status in (403, 429)
    version, body, mac = keys.session_cookie(session).split(".")
    claims = orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["space"] = seeded.b
    forged = ".".join([version, base64.urlsafe_b64encode(orjson.dumps(claims)).decode().rstrip("="), mac])
    for cookie in (keys.link_token(seeded.a, 60), forged,
                   old.session_cookie(old.new_session("admin", "", 3600))):
        status, _, _ = await client.get("/console/deliveries", allow_redirects=False,
                                        headers={"Cookie": f"perkamo_console={cookie}"})
        assert status == 303


def test_an_admin_session_ends_when_the_admin_token_changes():
    keys = Keys("c" * 40, TOKEN)
    cookie = keys.session_cookie(keys.new_session("admin", "", 60))
    assert keys.session(cookie) is not None
    rotated = Keys("c" * 40, TOKEN + "-rotated")
    assert rotated.session(cookie) is None
    scoped = keys.session_cookie(keys.new_session("space", "s1", 60))
    assert rotated.session(scoped) is not None  # links survive a token rotation with a console secret
    assert Keys("d" * 40, TOKEN).session(scoped) is None  # ...and end with the console secret


def test_hkdf_matches_rfc5869_test_case_1():
    ikm = bytes.fromhex("0b" * 22)
    salt = bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    okm = hkdf_sha256(ikm, salt, info, 42)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
                         "34007208d5b887185865")


# Pages ---------------------------------------------------------------------------------------


async def test_receiver_and_event_text_is_escaped(console, seeded):
    client, _ = console
    await client.sign_in()
    status, html, _ = await client.get(f"/console/deliveries/{seeded.a_ids[0]}")
    assert status == 200
    assert "<script>" not in html and "<img" not in html and "<b onmouseover" not in html
    assert "&lt;script&gt;window.__xss = 1&lt;/script&gt;" in html
    assert "onerror=&#34;window.__xss = 2&#34;" in html
    assert "&lt;b onmouseover=alert(1)&gt;Bad&lt;/b&gt;" in html
    assert "HTTP 500 &lt;i&gt;oops&lt;/i&gt;" in html
    assert '&#34;note&#34;: &#34;&lt;script&gt;x&lt;/script&gt;&#34;' in html  # pretty-printed body
    assert "x-perkamo-delivery" in html and "webhook-signature" in html  # named, never a value


async def test_delivery_page_shows_attempts_headers_and_masks_the_url(console, seeded):
    client, _ = console
    await client.sign_in()
    status, html, _ = await client.get(f"/console/deliveries/{seeded.a_ids[1]}")
    assert status == 200
    for text in (">retrying<", ">failed<", f"evt_{seeded.a}_1", f"order_{seeded.a}_1",
                 "Perkamo-Webhook/1.0", "<th>x-perkamo-attempt</th><td class=\"mono\">2</td>",
                 "name=\"resend\"", "hooks.example.com"):
        assert text in html, text
    assert "dns ms" not in html  # no timing columns in this table yet
    status, html, _ = await client.get("/console/endpoints")
    assert SECRET_PATH not in html and "https://hooks.alpha.example/…" in html


async def test_filters_search_and_paging(console, seeded):
    client, _ = console
    await client.sign_in()
    _, html, _ = await client.get(f"/console/deliveries?space={seeded.b}")
    assert [d for d in seeded.b_ids if d in html] == seeded.b_ids and seeded.a_ids[0] not in html
    assert html.index(seeded.b_ids[1]) < html.index(seeded.b_ids[0])  # newest first
    _, html, _ = await client.get(f"/console/deliveries?space={seeded.a}&status=retrying")
    assert "No deliveries match" in html
    _, html, _ = await client.get(f"/console/deliveries?q=order_{seeded.a}_2")
    assert seeded.a_ids[2] in html and seeded.a_ids[1] not in html
    _, html, _ = await client.get(f"/console/deliveries?q=evt_{seeded.b}_1")
    assert seeded.b_ids[1] in html and seeded.b_ids[0] not in html
    status, _, response = await client.get(f"/console/deliveries?q={seeded.a_ids[0]}", allow_redirects=False)
    assert status == 303 and response.headers["Location"] == f"/console/deliveries/{seeded.a_ids[0]}"
    status, html, _ = await client.get("/console/deliveries?since=last%20week")
    assert status == 400 and "neither ISO-8601" in html
    # Keyset paging: 2 per page... the page size is 50, so seed enough for two pages.
    _, html, _ = await client.get(f"/console/deliveries?space={seeded.a}&since=2h")
    assert 'rel="next"' not in html and all(d in html for d in seeded.a_ids)


async def test_paging_follows_the_cursor(console, store):
    client, _ = console
    space = unique("many")
    store.insert([attempt(f"dlv_{space}_{n:03d}", 1, space, "delivered", NOW - timedelta(seconds=n))
                  for n in range(60)])
    await client.sign_in()
    _, first, _ = await client.get(f"/console/deliveries?space={space}")
    match = re.search(r'href="([^"]+)" rel="next"', first)
    assert match and f"dlv_{space}_000" in first and f"dlv_{space}_050" not in first
    _, second, _ = await client.get(match.group(1).replace("&amp;", "&"))
    assert f"dlv_{space}_050" in second and f"dlv_{space}_059" in second and f"dlv_{space}_000" not in second
    assert 'rel="next"' not in second


async def test_endpoint_forms_publish_validated_records_keeping_id_and_secrets(console, seeded):
    client, ctx = console
    await client.sign_in()
    csrf = await client.csrf()
    for url, words in (("http://plain.example/x", "must be an https:// URL"),
                       ("", "Give the endpoint"),
                       ("https://user:pw@host.example/x", "refused")):
        status, html, _ = await client.post("/console/endpoints", {
            "csrf": csrf, "space": seeded.a, "action": "set", "url": url})
        assert status == 400 and words in html, (url, html[-800:])
        assert "user:pw" not in html
    status, _, response = await client.post("/console/endpoints", {
        "csrf": csrf, "space": seeded.a, "action": "set", "url": "https://new.alpha.example/hook"})
    assert status == 303 and response.headers["Location"] == f"/console/endpoints/{seeded.a}?published=0-1"
    space, record = ctx.published[-1]
    assert space == seeded.a and record["url"] == "https://new.alpha.example/hook"
    assert record["active"] is True and record["signing_secrets"] == ["whsec_" + "A" * 43 + "="]
    await client.post("/console/endpoints", {"csrf": csrf, "space": seeded.b, "action": "disable"})
    assert ctx.published[-1] == (seeded.b, {"space": seeded.b, "active": False,
                                            "url": "https://hooks.bravo.example/other-secret-path"})
    await client.post("/console/endpoints", {"csrf": csrf, "space": seeded.b, "action": "remove"})
    assert ctx.published[-1] == (seeded.b, None)
    status, html, _ = await client.get(f"/console/endpoints/{seeded.a}?published=0-1")
    assert "partition 0, offset 1" in html
    status, html, _ = await client.post("/console/endpoints", {
        "csrf": csrf, "space": "Not A Slug", "action": "set", "url": "https://x.example/"})
    assert status == 400 and "Space slug" in html
    assert len(ctx.published) == 3


async def test_reveal_needs_the_admin_token_again(console, seeded):
    client, _ = console
    await client.sign_in()
    csrf = await client.csrf()
    status, html, _ = await client.get(f"/console/endpoints/{seeded.a}")
    assert SECRET_PATH not in html and 'id="reveal"' in html
    status, html, _ = await client.post(f"/console/endpoints/{seeded.a}/reveal",
                                        {"csrf": csrf, "token": "no"})
    assert status == 401 and SECRET_PATH not in html
    status, html, _ = await client.post(f"/console/endpoints/{seeded.a}/reveal",
                                        {"csrf": csrf, "token": TOKEN})
    assert status == 200 and SECRET_PATH in html
    status, html, _ = await client.get(f"/console/endpoints/{seeded.a}")
    assert SECRET_PATH not in html  # shown once, on request


async def test_health_from_the_context_is_shown(console, seeded):
    client, ctx = console
    ctx.health[seeded.a] = {"state": "circuit_open", "circuit": "open", "failure_rate": 0.75,
                            "last_failure_at": NOW.isoformat(), "held": 12}
    await client.sign_in()
    _, html, _ = await client.get(f"/console/endpoints/{seeded.a}")
    assert "circuit open" in html and "75.0 %" in html and ">12<" in html
    _, html, _ = await client.get("/console/endpoints")
    assert "circuit open" in html and "unknown" in html  # bravo has no health yet


async def test_certificate_expiry_is_shown_on_the_endpoint_page(console, seeded):
    client, ctx = console
    expires = NOW + timedelta(days=3)
    ctx.health[seeded.a] = {"state": "healthy", "circuit": "closed",
                            "cert_not_after": expires.isoformat().replace("+00:00", "Z"),
                            "cert_expires_in_s": 3 * 86400}
    ctx.health[seeded.b] = {"state": "healthy", "circuit": "closed", "cert_not_after": None,
                            "cert_expires_in_s": None}
    await client.sign_in()
    _, html, _ = await client.get(f"/console/endpoints/{seeded.a}")
    shown = re.search(r'<dd id="cert-expiry">(.*?)</dd>', html, re.S)
    assert shown and "in 3 days" in shown.group(1) and "h-degraded" in shown.group(1)
    assert expires.strftime("%Y-%m-%d") in shown.group(1) and "renew" in shown.group(1)
    _, html, _ = await client.get(f"/console/endpoints/{seeded.b}")
    assert 'id="cert-expiry"' not in html  # no new connection seen yet


async def test_delivery_page_shows_the_trace_and_network_timings(console, store, seeded):
    client, _ = console
    did = f"dlv_{seeded.a}_timed"
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    store.insert([
        attempt(did, 1, seeded.a, "retrying", NOW - timedelta(minutes=2), trace_id=trace,
                span_id="00f067aa0ba902b7", dns_ms=3, connect_ms=1, tls_ms=7, ttfb_ms=41,
                connection_reused=False),
        attempt(did, 2, seeded.a, "delivered", NOW - timedelta(minutes=1), trace_id=trace,
                span_id="11f067aa0ba902b7", dns_ms=0, connect_ms=0, tls_ms=0, ttfb_ms=12,
                connection_reused=True),
    ])
    await client.sign_in()
    status, html, _ = await client.get(f"/console/deliveries/{did}")
    assert status == 200
    assert f'<dd class="mono" id="trace-id">{trace}</dd>' in html
    for heading in ("dns ms", "connect ms", "tls ms", "ttfb ms", "Connection"):
        assert heading in html
    table = html[html.index('id="attempts"'):html.index("</table>", html.index('id="attempts"'))]
    assert re.search(r'>3</td>\s*<td class="num">1</td>\s*<td class="num">7</td>\s*<td class="num">41</td>\s*'
                     r"<td>new</td>", table)
    assert re.search(r'>0</td>\s*<td class="num">0</td>\s*<td class="num">0</td>\s*<td class="num">12</td>\s*'
                     r"<td>reused</td>", table)


async def test_resend_and_replay_publish_through_kafka_with_their_checks(console, seeded):
    client, ctx = console
    await client.sign_in()
    csrf = await client.csrf()
    status, _, response = await client.post(f"/console/deliveries/{seeded.a_ids[2]}/resend", {"csrf": csrf})
    assert status == 303 and "awaiting=3" in response.headers["Location"]
    topic, body, key, headers = ctx.producer.sent[-1]
    assert key == seeded.a and dict(headers)[c.K_TRIGGER] == b"resend" and dict(headers)[c.K_ATTEMPT] == b"3"
    status, html, _ = await client.get(response.headers["Location"])
    assert "published to Kafka as attempt 3" in html and 'http-equiv="refresh"' in html
    status, html, _ = await client.post(f"/console/deliveries/{seeded.a_ids[2]}/resend", {"csrf": csrf})
    assert status == 409 and "has not reached history yet" in html

    status, html, _ = await client.get(f"/console/replay?space={seeded.b}&since=1d&status=failed")
    assert status == 200 and '<strong id="eligible">2</strong>' in html
    assert len(ctx.producer.sent) == 1  # a dry run publishes nothing
    fields = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', html))
    assert fields["space"] == seeded.b and fields["since"].endswith("Z") and fields["until"].endswith("Z")
    status, _, response = await client.post("/console/replay", fields)
    assert status == 303
    await asyncio.sleep(0.2)
    _, html, _ = await client.get(response.headers["Location"])
    assert "Done: 2 of 2" in html and 'http-equiv="refresh"' not in html
    assert sorted(m[2] for m in ctx.producer.sent[1:]) == [seeded.b, seeded.b]
    status, html, _ = await client.post("/console/replay", fields)
    assert status == 409 and "already replayed" in html


# Command line --------------------------------------------------------------------------------


def test_console_link_prints_a_url_that_opens_one_space(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERKAMO_")}
    env.update({"PERKAMO_ADMIN_TOKEN": TOKEN, "PERKAMO_CONSOLE_URL": "https://support.example/console/"})

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "consumer", "console-link", *args], env=env,
                              capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)

    done = run("--space", "commerce-live", "--ttl", "2h")
    assert done.returncode == 0, done.stderr
    url = done.stdout.strip()
    assert url.startswith("https://support.example/console/link?token=v1.")
    keys = Keys.from_settings("", TOKEN)
    assert keys is not None
    link = keys.link(url.split("token=")[1])
    assert link is not None and link.space == "commerce-live" and 7100 < link.expires - time.time() <= 7200
    for args, words in ((["--space", "Bad Slug"], "not a Space slug"),
                        (["--space", "s", "--ttl", "40d"], "at most 30d"),
                        (["--space", "s", "--ttl", "soon"], "not a duration")):
        done = run(*args)
        assert done.returncode == 2 and words in done.stderr, (args, done.stderr)
    env.pop("PERKAMO_ADMIN_TOKEN")
    done = run("--space", "s")
    assert done.returncode == 2 and "PERKAMO_CONSOLE_SECRET" in done.stderr


def test_console_settings_are_validated_by_name():
    from consumer.errors import ConfigError

    for values, name in (({"console_secret": "short"}, "PERKAMO_CONSOLE_SECRET"),
                         ({"console_session_ttl": "8 hours"}, "PERKAMO_CONSOLE_SESSION_TTL"),
                         ({"console_session_ttl": "60d"}, "PERKAMO_CONSOLE_SESSION_TTL"),
                         ({"console_url": "ftp://x/"}, "PERKAMO_CONSOLE_URL")):
        with pytest.raises(ConfigError, match=name):
            load_settings(**values)
    settings = load_settings(admin_listen="0.0.0.0:9999")
    assert settings.console_base_url == "http://127.0.0.1:9999/console/"
    assert settings.console_session_ttl_s == 8 * 3600
    assert load_settings(console_url="https://s.example/c").console_base_url == "https://s.example/c/"
    assert "PERKAMO_CONSOLE_SECRET" in settings.describe()


async def test_a_failing_store_is_a_503_page_that_echoes_nothing(store, seeded):
    class Broken:
        def query(self, sql: str, parameters: Any = None) -> Any:
            raise RuntimeError(f"connection to https://user:pw@db.internal failed running {sql}")

    ctx = make_context(store, seeded)
    ctx.reader = Broken()
    async with _served(ctx) as client:
        await client.sign_in()
        status, html, response = await client.get("/console/deliveries")
        assert status == 503 and "RuntimeError" in html and "db.internal" not in html
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]


def test_newest_first_pages_equal_the_plain_list(store):
    from consumer.queries import DeliveryFilter, list_deliveries, list_newest_first

    space = unique("narrow")
    kind = f"kind.{space}"  # every Space's list (where it narrows), this event type: only these rows
    rows = []
    # Deliveries 20 minutes to 10 days old, some retried long after they began.
    for n in range(40):
        began = NOW - timedelta(minutes=20) * (1.7 ** (n / 4))
        failed = n % 3 == 0
        did = f"dlv_{space}_{n:02d}"
        rows.append(attempt(did, 1, space, "retrying" if failed else "delivered", began, event_type=kind))
        if failed:
            rows.append(attempt(did, 2, space, "failed", began + timedelta(hours=30), event_type=kind))
    store.insert(rows)

    def walk(fn: Any, flt: DeliveryFilter) -> list[list[str]]:
        pages, cursor = [], None
        while True:
            page = fn(store, flt, 5, cursor)
            pages.append([d["delivery_id"] for d in page.deliveries])
            assert all(d["space"] == space for d in page.deliveries)
            cursor = page.next_cursor
            if cursor is None:
                return pages

    for flt in (DeliveryFilter(event_type=kind), DeliveryFilter(event_type=kind, status="failed"),
                DeliveryFilter(event_type=kind, since=NOW - timedelta(days=3)),
                DeliveryFilter(event_type=kind, until=NOW - timedelta(hours=5)),
                DeliveryFilter(space=space)):
        plain = walk(list_deliveries, flt)
        assert walk(list_newest_first, flt) == plain, flt
        assert sum(len(p) for p in plain) > 5


async def test_the_delivery_page_reads_the_body_of_the_attempt_shown_only(store, seeded):
    from consumer.sql import ATTEMPT_BODY

    class Spy:
        def __init__(self) -> None:
            self.sqls: list[str] = []

        def query(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
            self.sqls.append(sql)
            return store.query(sql, parameters)

    spy = Spy()
    ctx = make_context(spy, seeded)
    async with _served(ctx) as client:
        await client.sign_in()
        spy.sqls.clear()
        status, html, _ = await client.get(f"/console/deliveries/{seeded.a_ids[0]}")
        assert status == 200 and f"evt_{seeded.a}_0" in html
    with_body = [sql for sql in spy.sqls if re.search(r"\brequest_body\b", sql)]
    assert with_body == [ATTEMPT_BODY], spy.sqls  # one body, not one per attempt
