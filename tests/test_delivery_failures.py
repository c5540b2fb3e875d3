"""Each kind of failed attempt is recorded with its status code, status text, error and duration."""

from __future__ import annotations

import ssl

import orjson
import pytest
import trustme

from consumer import constants as c
from tests.support import (
    ScriptedReceiver,
    delayed,
    event_rows,
    free_port,
    make_event,
    produce,
    status,
    wait_for,
)

# Long tiers: these tests look at the first attempt only; no retry happens during them.
SLOW_TIERS = {"retry_tiers": ["1m"]}


async def _first_attempt(harness, space: str, url: str, **overrides):
    await harness.start(harness.settings([{"space": space, "url": url}], **{**SLOW_TIERS, **overrides}))
    event = make_event(space)
    produce(harness.kafka, harness.events_topic, [orjson.dumps(event)])
    rows = await wait_for(
        lambda: event_rows(harness.store, event["id"], ("status", "status_code", "status_text",
                                                         "error_kind", "error", "duration_ms",
                                                         "next_attempt_at")),
        timeout=30,
        what="the attempt row",
    )
    assert len(rows) == 1
    return dict(zip(["status", "code", "text", "kind", "error", "duration_ms", "next_at"], rows[0]))


@pytest.mark.parametrize(
    ("code", "text"),
    [(404, "Not Found"), (400, "Bad Request"), (500, "Internal Server Error"), (503, "Service Unavailable")],
)
async def test_http_error_status_is_recorded(harness, receiver, code, text):
    receiver.on("/h", status(code, "nope"))
    row = await _first_attempt(harness, f"s-{code}", receiver.url("/h"))
    assert row["status"] == c.STATUS_RETRYING
    assert (row["code"], row["text"], row["kind"]) == (code, text, "http_status")
    assert row["error"] == f"HTTP {code}"
    assert row["next_at"] is not None


async def test_redirect_is_not_followed(harness, receiver):
    receiver.on("/moved", status(302, headers={"Location": receiver.url("/elsewhere")}))
    row = await _first_attempt(harness, "s-redirect", receiver.url("/moved"))
    assert (row["code"], row["kind"]) == (302, "http_status")
    assert "redirects are not followed" in row["error"]
    assert receiver.to("/elsewhere") == []


async def test_timeout_is_recorded_with_its_duration(harness, receiver):
    receiver.on("/slow", delayed(5))
    row = await _first_attempt(harness, "s-timeout", receiver.url("/slow"), delivery_timeout_s=1.0)
    assert (row["code"], row["kind"]) == (0, "timeout")
    assert "timed out" in row["error"]
    assert 900 <= row["duration_ms"] < 3000


async def test_connection_refused_is_recorded(harness):
    closed = free_port()  # nothing listens here
    row = await _first_attempt(harness, "s-refused", f"https://127.0.0.1:{closed}/hook")
    assert (row["code"], row["kind"]) == (0, "connect_error")
    assert "cannot connect" in row["error"]
    assert str(closed) in row["error"]  # host:port is fine; the path is not
    assert "/hook" not in row["error"]


async def test_untrusted_certificate_is_a_tls_error(harness):
    other_ca = trustme.CA()  # not in PERKAMO_CA_BUNDLE
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    other_ca.issue_cert("localhost").configure_cert(context)
    rogue = ScriptedReceiver(context)
    await rogue.start()
    try:
        row = await _first_attempt(harness, "s-tls", rogue.url("/hook"))
    finally:
        await rogue.stop()
    assert (row["code"], row["kind"]) == (0, "tls_error")
    assert "certificate verify failed" in row["error"].lower()
    assert rogue.requests == []


async def test_large_response_body_is_cut_to_the_excerpt(harness, receiver):
    receiver.on("/big", status(500, "x" * 5_000_000))
    await harness.start(
        harness.settings(
            [{"space": "s-big", "url": receiver.url("/big")}], **SLOW_TIERS, response_excerpt_bytes=100
        )
    )
    event = make_event("s-big")
    produce(harness.kafka, harness.events_topic, [orjson.dumps(event)])
    rows = await wait_for(
        lambda: event_rows(harness.store, event["id"], ("length(response_excerpt)", "status_code")),
        timeout=30,
    )
    assert rows == [(100, 500)]
