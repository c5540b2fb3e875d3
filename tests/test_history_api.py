"""The history API on the admin port, resend and replay through Kafka, and the CLI on top of it:
real broker, embedded ClickHouse, in-process consumer (the `harness`), scripted receivers."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from consumer import constants as c
from consumer.endpoints import endpoint_id_for
from consumer.errors import BadRequest
from consumer.models import delivery_id_for
from consumer.queries import iso, parse_time
from tests.support import end_offsets, make_event, produce, read_topic, unique, wait_for
from tests.test_queries import attempt

TOKEN = "admin-token-for-tests-0123456789abcdef"
NOW = datetime.now(UTC).replace(microsecond=0)


class Api:
    """A client of one running consumer's admin API."""

    def __init__(self, settings: Any, token: str | None = TOKEN, deliver: bool = False) -> None:
        """The history role's admin API, or with `deliver` the deliver role's (worker 0)."""
        host, port = settings.deliver_host_port(0) if deliver else settings.admin_host_port
        self.root = f"http://{host}:{port}"
        self.token = token

    async def call(self, method: str, path: str, body: Any = None, token: str | None = "default",
                   **params: Any) -> tuple[int, Any]:
        token = self.token if token == "default" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        query = {k: str(v) for k, v in params.items() if v is not None}
        async with aiohttp.ClientSession() as session, session.request(
            method, self.root + path, json=body, headers=headers, params=query
        ) as response:
            raw = await response.read()
            return response.status, orjson.loads(raw) if raw else None

    async def get(self, path: str, **params: Any) -> tuple[int, Any]:
        return await self.call("GET", f"/api/v1{path}", **params)

    async def post(self, path: str, body: Any = None, token: str | None = "default") -> tuple[int, Any]:
        return await self.call("POST", f"/api/v1{path}", body, token=token)

    async def list_all(self, **params: Any) -> list[dict[str, Any]]:
        status, doc = await self.get("/deliveries", **params)
        assert status == 200, doc
        return doc["deliveries"]

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as session, session.get(self.root + "/metrics") as resp:
            return await resp.text()


def ids(deliveries: list[dict[str, Any]]) -> list[str]:
    return [d["delivery_id"] for d in deliveries]


def redeliver_ends(kafka: str) -> dict[tuple[str, int], int]:
    """Where the redeliver topic (resends and replays; shared by every test) ends now."""
    return end_offsets(kafka, [c.REDELIVER_TOPIC])


def republished(kafka: str, space: str, since: dict[tuple[str, int], int]) -> list[Any]:
    """The messages re-published for `space` (its key) after the `since` offsets."""
    messages = read_topic(kafka, c.REDELIVER_TOPIC, since)
    return [m for m in messages if m.key() == space.encode()]


def seed_deliveries(store: Any, space: str) -> tuple[list[str], str, datetime]:
    """Seven deliveries a minute apart (plus one that began 3 days ago), duplicates included."""
    base = NOW - timedelta(hours=3)
    statuses = ["delivered", "failed", "delivered", "retrying", "delivered", "failed", "delivered"]
    names = [f"{space}-d{n}" for n in range(7)]
    rows = []
    for n, (name, status) in enumerate(zip(names, statuses, strict=True)):
        at = base + timedelta(minutes=n)
        kind = "reward.granted" if n % 2 else "purchase.completed"
        if status == "failed":
            rows.append(attempt(name, 1, space, "retrying", at, event_type=kind))
            rows.append(attempt(name, 2, space, "failed", at + timedelta(seconds=2), event_type=kind))
        elif status == "retrying":
            rows.append(attempt(name, 1, space, "retrying", at, event_type=kind,
                                next_attempt_at=NOW + timedelta(hours=1)))
        else:
            rows.append(attempt(name, 1, space, status, at, event_type=kind))
    old = f"{space}-old"
    rows += [attempt(old, 1, space, "retrying", NOW - timedelta(days=3)),
             attempt(old, 2, space, "delivered", NOW - timedelta(hours=2))]
    store.insert(rows)
    store.insert([r for r in rows if r.delivery_id == names[1]])  # d1 written twice
    return names, old, base


async def test_list_filters_paging_and_deduplication(harness):
    space = unique("list")
    names, old, base = seed_deliveries(harness.store, space)
    # An endpoint for the Space (never called: nothing is published here).
    settings = harness.settings([{"space": space, "url": "https://localhost:9/hook"}], admin_token=TOKEN)
    await harness.start(settings)
    api = Api(settings)
    newest_first = list(reversed(names))

    everything = await api.list_all(space=space)
    assert ids(everything) == [*newest_first, old]
    d1 = next(d for d in everything if d["delivery_id"] == names[1])
    assert (d1["status"], d1["attempts"], d1["last_attempt"]) == ("failed", 2, 2)  # not 4
    assert d1["first_attempted_at"] == iso(base + timedelta(minutes=1))

    assert ids(await api.list_all(space=space, status="failed")) == [names[5], names[1]]
    assert ids(await api.list_all(space=space, status="retrying")) == [names[3]]
    assert ids(await api.list_all(space=space, event_type="reward.granted")) == [
        names[5], names[3], names[1]]
    # `old` began before the window: its later attempt does not pull it in.
    assert ids(await api.list_all(space=space, since="1d")) == newest_first
    window = {"since": iso(base + timedelta(minutes=2)), "until": iso(base + timedelta(minutes=5))}
    assert ids(await api.list_all(space=space, **window)) == [names[4], names[3], names[2]]

    pages, cursor = [], None
    while True:
        status, doc = await api.get("/deliveries", space=space, limit=3, cursor=cursor)
        assert status == 200, doc
        pages.append(ids(doc["deliveries"]))
        cursor = doc["next_cursor"]
        if cursor is None:
            break
    assert pages == [newest_first[:3], newest_first[3:6], [newest_first[6], old]]

    _, first = await api.get("/deliveries", space=space, limit=3)
    status, doc = await api.get("/deliveries", space=space, status="failed", cursor=first["next_cursor"])
    assert status == 400 and "other filters" in doc["error"]
    for params, words in [
        ({"status": "lost"}, "status must be one of"),
        ({"limit": 0}, "limit must be between"),
        ({"limit": "ten"}, "limit must be an integer"),
        ({"since": "yesterday"}, "neither ISO-8601"),
        ({"since": "1h", "until": "2h"}, "since must be before until"),
        ({"cursor": "not-a-cursor"}, "cursor is not one this API handed out"),
        ({"spaec": space}, "unknown parameter 'spaec'"),
    ]:
        status, doc = await api.get("/deliveries", space=space, **params)
        assert status == 400 and words in doc["error"], (params, doc)

    status, detail = await api.get(f"/deliveries/{names[1]}")
    assert status == 200
    assert [(a["attempt"], a["status"]) for a in detail["attempts"]] == [(1, "retrying"), (2, "failed")]
    assert detail["status"] == "failed" and "request_body" not in detail["attempts"][0]
    status, detail = await api.call("GET", f"/api/v1/deliveries/{names[1]}", include_body="true")
    assert status == 200 and detail["attempts"][0]["request_body"] == '{"id":"evt"}'
    status, _ = await api.call("GET", f"/api/v1/deliveries/{names[1]}", include_body="true", token=None)
    assert status == 401
    status, doc = await api.get(f"/deliveries/{space}-missing")
    assert status == 404 and "no attempt" in doc["error"]

    # A replay selection counts each delivery once, duplicates or not.
    status, doc = await api.post("/replay", {"space": space, "since": "1d", "status": "failed",
                                             "dry_run": True})
    assert status == 200, doc
    assert (doc["matched"], doc["eligible"], doc["published"]) == (2, 2, 0)
    status, doc = await api.post("/replay", {"space": space, "since": "1d", "dry_run": True})
    assert (doc["matched"], doc["eligible"], doc["skipped_in_retry"]) == (7, 6, 1)  # d3 is retrying


async def wait_delivery(api: Api, delivery_id: str, attempts: int, status: str,
                        timeout: float = 30) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        code, doc = await api.get(f"/deliveries/{delivery_id}")
        if code == 200 and len(doc["attempts"]) >= attempts and doc["status"] == status:
            return doc
        return None
    return await wait_for(check, timeout=timeout, interval=0.2,
                          what=f"{delivery_id} at {attempts} attempts, {status}")


def switchable(broken: set[str]) -> Any:
    """500 for events whose id is in `broken` (a set the test empties to fix the handler).

    The few failures these tests make stay below PERKAMO_BREAKER_MIN_CALLS: the circuit stays
    closed (tests/test_lifecycle.py covers resends meeting an open one)."""
    async def answer(request: web.Request, _: int) -> web.StreamResponse:
        event = orjson.loads(await request.read())
        return web.Response(status=500 if event["id"] in broken else 204)
    return answer


async def test_resend_after_the_receiver_is_fixed(harness, receiver):
    space = unique("resend")
    event = make_event(space)
    broken = {event["id"]}
    receiver.on("/hook", switchable(broken))
    settings = harness.settings([{"space": space, "url": receiver.url("/hook")}],
                                retry_tiers=["1s"], admin_token=TOKEN)
    await harness.start(settings)
    api = Api(settings)
    produce(harness.kafka, harness.events_topic, [orjson.dumps(event)])
    delivery_id = delivery_id_for(event["id"], endpoint_id_for(space))

    before = await wait_delivery(api, delivery_id, 2, "failed")
    assert [a["trigger"] for a in before["attempts"]] == ["initial", "retry"]

    broken.clear()  # the customer fixed the handler
    status, doc = await api.post(f"/deliveries/{delivery_id}/resend")
    assert status == 202, doc
    assert doc["attempt"] == 3 and doc["resend_id"].startswith("rsn_")
    status, again = await api.post(f"/deliveries/{delivery_id}/resend")
    assert status == 409 and "has not reached history yet" in again["error"]

    after = await wait_delivery(api, delivery_id, 3, "delivered")
    third = after["attempts"][2]
    assert (third["attempt"], third["trigger"], third["status"], third["replay_id"]) == (
        3, c.TRIGGER_RESEND, c.STATUS_DELIVERED, doc["resend_id"])
    first = after["attempts"][0]
    assert (third["source_topic"], third["source_offset"]) == (first["source_topic"], first["source_offset"])
    last_request = receiver.to("/hook")[-1].headers
    assert last_request["x-perkamo-delivery"] == delivery_id
    assert last_request["x-perkamo-attempt"] == "3"
    assert len(receiver.to("/hook")) == 3
    assert 'perkamo_webhook_republished_total{trigger="resend"} 1.0' in await api.metrics()

    status, doc = await api.post(f"/deliveries/{space}-unknown/resend")
    assert status == 404


async def test_replay_dry_run_then_for_real_and_never_twice(harness, receiver):
    space = unique("replay")
    bad = [make_event(space) for _ in range(3)]
    good = [make_event(space) for _ in range(2)]
    broken = {e["id"] for e in bad}
    receiver.on("/hook", switchable(broken))
    settings = harness.settings([{"space": space, "url": receiver.url("/hook")}],
                                retry_tiers=["1s"], admin_token=TOKEN)
    await harness.start(settings)
    api = Api(settings)
    since = iso(datetime.now(UTC) - timedelta(minutes=1))
    produce(harness.kafka, harness.events_topic, [orjson.dumps(e) for e in bad + good])
    bad_ids = {delivery_id_for(e["id"], endpoint_id_for(space)) for e in bad}

    async def settled() -> bool:
        deliveries = await api.list_all(space=space)
        return len(deliveries) == 5 and sorted(d["status"] for d in deliveries) == (
            ["delivered"] * 2 + ["failed"] * 3)
    await wait_for(settled, timeout=30, interval=0.3, what="3 failed and 2 delivered")

    selection = {"space": space, "since": since, "status": "failed"}
    offsets = redeliver_ends(harness.kafka)
    status, dry = await api.post("/replay", {**selection, "dry_run": True})
    assert status == 200, dry
    assert (dry["matched"], dry["eligible"], dry["published"], dry["dry_run"]) == (3, 3, 0, True)
    status, empty = await api.post("/replay", {**selection, "until": since, "since": "1h",
                                               "dry_run": True})
    assert status == 200 and empty["matched"] == 0
    assert republished(harness.kafka, space, offsets) == []

    broken.clear()
    status, done = await api.post("/replay", selection)
    assert status == 202, done
    assert (done["matched"], done["published"], done["replay_id"]) == (3, 3, dry["replay_id"])
    after = redeliver_ends(harness.kafka)
    assert len(republished(harness.kafka, space, offsets)) == 3

    for delivery_id in bad_ids:
        doc = await wait_delivery(api, delivery_id, 3, "delivered")
        assert [(a["attempt"], a["trigger"], a["replay_id"]) for a in doc["attempts"]][2] == (
            3, c.TRIGGER_REPLAY, done["replay_id"])
    assert all(d["attempts"] == 1 for d in await api.list_all(space=space, status="delivered")
               if d["delivery_id"] not in bad_ids)

    # The same selection again, by accident: refused, naming the earlier replay.
    status, again = await api.post("/replay", selection)
    assert status == 409 and again["replay_id"] == done["replay_id"], again
    # A wider selection overlapping it: refused too, unless forced.
    status, wider = await api.post("/replay", {"space": space, "since": "1h"})
    assert status == 409 and wider["earlier_replay_ids"] == [done["replay_id"]], wider
    assert republished(harness.kafka, space, after) == []
    status, forced = await api.post("/replay", {**selection, "force": True})
    assert status == 200 and forced["matched"] == 0 and forced["forced"], forced  # all delivered now
    assert 'perkamo_webhook_republished_total{trigger="replay"} 3.0' in await api.metrics()


async def test_mutations_need_the_right_token_and_publish_nothing_otherwise(harness):
    space = unique("auth")
    names, _, _ = seed_deliveries(harness.store, space)
    settings = harness.settings(admin_token=TOKEN)
    await harness.start(settings)
    before = redeliver_ends(harness.kafka)
    replay = {"space": space, "since": "1d"}
    for token in (None, "wrong-token", TOKEN + "x", ""):
        status, doc = await Api(settings, token=token).post(f"/deliveries/{names[1]}/resend")
        assert status == 401 and "admin token" in doc["error"], (token, doc)
        status, doc = await Api(settings, token=token).post("/replay", replay)
        assert status == 401, (token, doc)
    async with aiohttp.ClientSession() as session, session.post(
        f"{Api(settings).root}/api/v1/deliveries/{names[1]}/resend",
        headers={"Authorization": f"Basic {TOKEN}"},
    ) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert republished(harness.kafka, space, before) == []

    # The right token, but the Space has no endpoint: the event would be dropped, so no.
    status, doc = await Api(settings).post(f"/deliveries/{names[1]}/resend")
    assert status == 409 and "no active endpoint" in doc["error"], doc
    status, doc = await Api(settings).post("/replay", replay)
    assert status == 409 and "no active endpoint" in doc["error"], doc

    # Bad bodies are refused after the token check, with a reason.
    api = Api(settings)
    for body, words in [
        ({"since": "1d"}, "space is required"),
        ({"space": space}, "since is required"),
        ({"space": space, "since": "1d", "status": "gone"}, "status must be one of"),
        ({"space": space, "since": "1d", "dry_run": "yes"}, "dry_run must be true or false"),
        ({"space": space, "since": "1d", "limit": 3}, "unknown field 'limit'"),
        ([space], "must be a JSON object"),
    ]:
        status, doc = await api.post("/replay", body)
        assert status == 400 and words in doc["error"], (body, doc)
    assert republished(harness.kafka, space, before) == []


async def test_without_a_configured_token_mutations_are_forbidden(harness):
    space = unique("notoken")
    names, _, _ = seed_deliveries(harness.store, space)
    settings = harness.settings()  # PERKAMO_ADMIN_TOKEN unset
    await harness.start(settings)
    before = redeliver_ends(harness.kafka)
    for token in (None, "anything"):
        api = Api(settings, token=token)
        status, doc = await api.post(f"/deliveries/{names[1]}/resend")
        assert status == 403 and "set PERKAMO_ADMIN_TOKEN" in doc["error"]
        status, doc = await api.post("/replay", {"space": space, "since": "1d", "dry_run": True})
        assert status == 403
    status, doc = await Api(settings, token=None).get("/deliveries", space=space)
    assert status == 403 and "PERKAMO_ADMIN_READ_TOKEN" in doc["error"]  # reads need one too
    assert republished(harness.kafka, space, before) == []


# CLI -----------------------------------------------------------------------------------


async def cli(tmp_path: Path, settings: Any, *args: str, token: str | None = TOKEN) -> tuple[int, str, str]:
    """Run `perkamo-webhooks` in a subprocess against the in-process consumer's admin port."""
    workdir = tmp_path / "cli"
    workdir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERKAMO_")}
    env.update({"PERKAMO_ADMIN_LISTEN": settings.admin_listen, "PERKAMO_DATA_DIR": str(workdir / "data"),
                "COLUMNS": "250"})
    if token is not None:
        env["PERKAMO_ADMIN_TOKEN"] = token
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "consumer", *args, cwd=workdir, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert not (workdir / "data" / "history").exists(), "the CLI opened the embedded engine"
    return int(proc.returncode or 0), out.decode(), err.decode()


def seed_real_events(store: Any, space: str, statuses: list[str], topic: str) -> list[str]:
    """History rows whose request bodies are real events, so a replay can deliver them."""
    names = []
    rows = []
    for n, status in enumerate(statuses):
        event = make_event(space)
        name = delivery_id_for(event["id"], endpoint_id_for(space))
        names.append(name)
        at = NOW - timedelta(hours=2, minutes=-n)
        rows.append(attempt(name, 1, space, status, at, request_body=orjson.dumps(event),
                            event_id=event["id"], source_topic=topic, source_offset=n))
    store.insert(rows)
    return names


async def test_cli_history_resend_and_replay(harness, receiver, tmp_path):
    space = unique("cli")
    receiver.on("/hook", switchable(set()))
    names = seed_real_events(harness.store, space, ["failed", "delivered", "failed"], harness.events_topic)
    settings = harness.settings([{"space": space, "url": receiver.url("/hook")}], admin_token=TOKEN)
    await harness.start(settings)
    api = Api(settings)

    code, out, err = await cli(tmp_path, settings, "history", "--space", space, "--json")
    assert code == 0, err
    assert ids(orjson.loads(out)["deliveries"]) == list(reversed(names))
    code, out, err = await cli(tmp_path, settings, "history", "--space", space, "--status", "failed",
                               "--since", "1d", "--limit", "1", "--json")
    doc = orjson.loads(out)
    assert ids(doc["deliveries"]) == [names[2]] and doc["next_cursor"]
    code, out, err = await cli(tmp_path, settings, "history", "--space", space, "--status", "failed",
                               "--since", "1d", "--limit", "1", "--cursor", doc["next_cursor"], "--json")
    assert ids(orjson.loads(out)["deliveries"]) == [names[0]]
    code, out, err = await cli(tmp_path, settings, "history", "--space", space)
    assert code == 0 and names[0] in out and "failed" in out
    code, out, err = await cli(tmp_path, settings, "history", "--delivery-id", names[0], "--json")
    assert code == 0 and [a["attempt"] for a in orjson.loads(out)["attempts"]] == [1]
    code, out, err = await cli(tmp_path, settings, "history", "--delivery-id", names[0])
    assert code == 0 and "initial" in out
    code, out, err = await cli(tmp_path, settings, "history", "--since", "last week")
    assert code == 2 and "neither ISO-8601" in err

    code, out, err = await cli(tmp_path, settings, "replay", "--space", space, "--since", "1d",
                               "--status", "failed", "--dry-run")
    assert code == 0 and "2 of 2 matched" in out and "nothing published" in out, (out, err)
    code, out, err = await cli(tmp_path, settings, "replay", "--space", space, "--since", "1d",
                               "--status", "failed", token="wrong-" + "x" * 40)
    assert code == 1 and "PERKAMO_ADMIN_TOKEN" in err
    since = iso(NOW - timedelta(days=1))
    code, out, err = await cli(tmp_path, settings, "replay", "--space", space, "--since", since,
                               "--status", "failed", "--json")
    assert code == 0, err
    result = orjson.loads(out)
    assert (result["matched"], result["published"]) == (2, 2)
    for name in (names[0], names[2]):
        await wait_delivery(api, name, 2, "delivered")
    # The same command again: refused, naming the replay that already ran.
    code, out, err = await cli(tmp_path, settings, "replay", "--space", space, "--since", since,
                               "--status", "failed")
    assert code == 3 and result["replay_id"] in err, err
    # A relative time makes another selection each time; the overlap is refused all the same.
    code, out, err = await cli(tmp_path, settings, "replay", "--space", space, "--since", "1d")
    assert code == 3 and result["replay_id"] in err, err
    # With --status failed there is nothing left to replay (both were delivered).
    code, out, err = await cli(tmp_path, settings, "replay", "--space", space, "--since", "1d",
                               "--status", "failed")
    assert code == 0 and "nothing to replay" in out and "has status failed" in out, (out, err)

    code, out, err = await cli(tmp_path, settings, "resend", names[1])
    assert code == 0 and f"resent {names[1]} as attempt 2" in out, err
    doc = await wait_delivery(api, names[1], 2, "delivered")
    assert doc["attempts"][1]["trigger"] == "resend"
    code, out, err = await cli(tmp_path, settings, "resend", f"{space}-nope")
    assert code == 1 and "no attempt" in err


async def test_cli_without_a_running_consumer_says_so(tmp_path):
    from tests.support import free_port

    class Unreachable:
        admin_listen = f"127.0.0.1:{free_port()}"

    code, _, err = await cli(tmp_path, Unreachable(), "history", "--json")
    assert code == 1
    assert "running consumer" in err and "embedded engine" in err


def test_times_accept_iso_and_relative():
    now = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    assert parse_time("24h", now) == datetime(2026, 5, 31, 12, 0, tzinfo=UTC)
    assert parse_time("7d", now) == datetime(2026, 5, 25, 12, 0, tzinfo=UTC)
    assert parse_time("30m", now) == datetime(2026, 6, 1, 11, 30, tzinfo=UTC)
    assert parse_time("2026-06-01T10:00:00Z") == datetime(2026, 6, 1, 10, 0, tzinfo=UTC)
    assert parse_time("2026-06-01T12:00:00+02:00") == datetime(2026, 6, 1, 10, 0, tzinfo=UTC)
    assert parse_time("2026-06-01 10:00") == datetime(2026, 6, 1, 10, 0, tzinfo=UTC)
    assert parse_time("2026-06-01T10:00:00.123456Z").microsecond == 123000
    for bad in ("yesterday", "24", "-1h", "3000-01-01"):
        with pytest.raises(BadRequest):
            parse_time(bad, now)
