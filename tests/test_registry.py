"""The endpoint registry topic: the CLI publishes, a running consumer's follower applies.

The registry topic is shared by every test on the session broker, so each test uses Spaces
of its own (`unique(...)`) and looks only at those.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer.config import load_settings
from consumer.constants import ENDPOINTS_TOPIC
from consumer.endpoints import REASON_INVALID_JSON, REASON_KEY_MISMATCH, REASON_SCHEMA, EndpointRegistry
from consumer.kafka_topics import ensure_topics
from consumer.metrics import Metrics
from consumer.registry_topic import RegistryFollower
from tests.conftest import App
from tests.support import end_offsets, free_port, make_event, produce, unique, wait_for

CLI = shutil.which("perkamo-webhooks", path=str(Path(sys.executable).parent))
INVALID_METRIC = "perkamo_webhook_endpoint_records_invalid_total"
NO_ENDPOINT_METRIC = "perkamo_webhook_no_endpoint_total"

Cli = Callable[..., Awaitable["subprocess.CompletedProcess[str]"]]
Follow = Callable[..., Awaitable[RegistryFollower]]


# Fixtures and helpers (test_security.py uses them too) -----------------------------------


@pytest.fixture(name="cli")
def cli_fixture(kafka: str) -> Cli:
    """Run `perkamo-webhooks ARGS` as a subprocess against the session broker.

    Runs in a thread, so the in-process consumer on the test's event loop keeps going.
    """

    async def run(*args: str, env: dict[str, str] | None = None,
                  stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("PERKAMO_")}
        clean["PERKAMO_KAFKA_BOOTSTRAP_SERVERS"] = kafka
        clean.update(env or {})
        command = [CLI] if CLI else [sys.executable, "-m", "consumer"]
        return await asyncio.to_thread(
            subprocess.run, [*command, *args], env=clean, input=stdin, capture_output=True,
            text=True, timeout=120,
        )

    return run


@pytest.fixture(name="follow")
async def follow_fixture() -> AsyncIterator[Follow]:
    """Make sure a running App follows the registry topic, and wait until it read it to its end.

    The deliver role starts its own follower (App.follower); a test may start one more on the
    App's registry, metrics and settings (kwargs: e.g. a short recheck interval).
    """
    started: list[RegistryFollower] = []

    async def start(app: App, **kwargs: Any) -> RegistryFollower:
        follower: RegistryFollower | None = None if kwargs else app.follower
        if follower is None:
            follower = RegistryFollower(app.settings, app.registry, app.metrics, **kwargs)
            follower.start()
            started.append(follower)
        assert await asyncio.to_thread(follower.wait_loaded, 30), "registry topic not loaded"
        assert app.registry.loaded
        return follower

    yield start
    for follower in started:
        await asyncio.to_thread(follower.stop)


def sample(app: App, name: str, labels: dict[str, str]) -> float:
    return app.metrics.registry.get_sample_value(name, labels) or 0.0


def registry_end(kafka: str) -> dict[tuple[str, int], int]:
    return end_offsets(kafka, [ENDPOINTS_TOPIC])


async def url_becomes(app: App, space: str, url: str | None, timeout: float = 10.0) -> None:
    """Wait until the running consumer's registry has this URL (None: no active endpoint)."""
    def current() -> bool:
        endpoint = app.registry.get(space)
        return (endpoint.url if endpoint else None) == url
    await wait_for(current, timeout=timeout, what=f"registry update for {space}")


def publish_event(kafka: str, topic: str, space: str) -> dict[str, Any]:
    event = make_event(space)
    produce(kafka, topic, [orjson.dumps(event)])
    return event


# CLI -> running consumer -------------------------------------------------------------------


async def test_set_update_inactive_remove_take_effect_on_a_running_consumer(
        harness, receiver, cli, follow):
    space = unique("reg-live")
    app = await harness.start(harness.settings())
    await follow(app)
    first, second = receiver.url(f"/first/{space}"), receiver.url(f"/second/{space}")

    result = await cli("endpoints", "set", "--space", space, "--url", first)
    assert result.returncode == 0, result.stderr
    assert f"space {space}" in result.stdout and "/first" not in result.stdout  # URL masked
    await url_becomes(app, space, first, timeout=5)
    publish_event(harness.kafka, harness.events_topic, space)
    await wait_for(lambda: receiver.to(f"/first/{space}"), what="delivery to the first URL")

    result = await cli("endpoints", "set", "--space", space, "--url", second)
    assert result.returncode == 0, result.stderr
    await url_becomes(app, space, second, timeout=5)
    publish_event(harness.kafka, harness.events_topic, space)
    await wait_for(lambda: receiver.to(f"/second/{space}"), what="delivery to the new URL")
    assert len(receiver.to(f"/first/{space}")) == 1

    # inactive: the record stays, nothing is delivered, the event counts as "no endpoint"
    result = await cli("endpoints", "set", "--space", space, "--url", second, "--inactive")
    assert result.returncode == 0, result.stderr
    await url_becomes(app, space, None, timeout=5)
    assert [ep.active for ep in app.registry.all() if ep.space == space] == [False]
    publish_event(harness.kafka, harness.events_topic, space)
    await wait_for(lambda: sample(app, NO_ENDPOINT_METRIC, {"space": space}) >= 1,
                   what="the inactive endpoint counted as no endpoint")

    # active again, then removed: deliveries stop
    result = await cli("endpoints", "set", "--space", space, "--url", second)
    assert result.returncode == 0, result.stderr
    await url_becomes(app, space, second, timeout=5)
    result = await cli("endpoints", "remove", "--space", space)
    assert result.returncode == 0, result.stderr
    await url_becomes(app, space, None, timeout=5)
    assert not [ep for ep in app.registry.all() if ep.space == space]
    publish_event(harness.kafka, harness.events_topic, space)
    await wait_for(lambda: sample(app, NO_ENDPOINT_METRIC, {"space": space}) >= 2,
                   what="the removed endpoint counted as no endpoint")
    assert len(receiver.to(f"/second/{space}")) == 1
    assert len(receiver.to(f"/first/{space}")) == 1


async def test_a_restarted_follower_rebuilds_the_same_state(harness, receiver, cli, follow):
    spaces = [unique("reg-state") for _ in range(5)]
    app = await harness.start(harness.settings())
    await follow(app)
    signing = "whsec_" + "c2lnbmluZy1rZXktZm9yLXRlc3Rz"
    steps = [
        ("set", "--space", spaces[0], "--url", receiver.url("/a")),
        ("set", "--space", spaces[1], "--url", receiver.url("/b"), "--id", "ep_custom-1"),
        ("set", "--space", spaces[2], "--url", receiver.url("/c"), "--inactive"),
        ("set", "--space", spaces[3], "--url", receiver.url("/d"), "--signing-secret", signing),
        ("set", "--space", spaces[4], "--url", receiver.url("/e")),
        ("set", "--space", spaces[0], "--url", receiver.url("/a2")),
        ("remove", "--space", spaces[4]),
    ]
    for step in steps:
        result = await cli("endpoints", *step)
        assert result.returncode == 0, result.stderr
    await url_becomes(app, spaces[0], receiver.url("/a2"))
    await url_becomes(app, spaces[4], None)

    def state(registry: EndpointRegistry) -> list[Any]:
        return [ep for ep in registry.all() if ep.space in spaces]

    live = state(app.registry)
    assert [ep.space for ep in live] == sorted(spaces[:4])
    assert {ep.space: ep.id for ep in live}[spaces[1]] == "ep_custom-1"
    assert {ep.space: ep.signing_secrets for ep in live}[spaces[3]] == (signing,)

    # A new process: fresh registry and follower; loaded means everything above is there.
    rebuilt = EndpointRegistry()
    follower = RegistryFollower(app.settings, rebuilt, Metrics())
    follower.start()
    try:
        assert await asyncio.to_thread(follower.wait_loaded, 30)
        assert rebuilt.loaded
        assert state(rebuilt) == live
        assert [rebuilt.get(s) for s in spaces] == [app.registry.get(s) for s in spaces]
    finally:
        await asyncio.to_thread(follower.stop)


# Invalid records ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--record", '{"space": "SPACE", "url": "https://localhost/x",'), "not valid JSON"),
        (("--record", '{"space": "SPACE", "url": "https://localhost/x", "colour": "red"}'),
         "unknown field(s) colour"),
        (("--space", "SPACE", "--url", "http://localhost/hooks/s3cr3t-plain"), "https://"),
        (("--space", "SPACE", "--url", "https://localhost/x", "--signing-secret", "letmein"),
         "signing secret must be whsec_"),
        (("--space", "SPACE", "--url", "https://user:pw@localhost/x"), "credentials"),
        (("--space", "Not_A_Slug", "--url", "https://localhost/x"), "not a space slug"),
        (("--space", "SPACE"), "--url required"),
    ],
    ids=["bad-json", "unknown-field", "http", "bad-secret", "credentials", "bad-slug", "no-url"],
)
async def test_cli_refuses_invalid_records_and_publishes_nothing(kafka, topics, cli, args, message):
    space = unique("reg-bad")
    before = registry_end(kafka)
    result = await cli("endpoints", "set", *[a.replace("SPACE", space) for a in args])
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    assert "nothing published" in result.stderr
    assert "s3cr3t" not in result.stderr + result.stdout  # the URL is not echoed
    assert registry_end(kafka) == before


async def test_cli_remove_refuses_a_bad_slug(kafka, topics, cli):
    before = registry_end(kafka)
    result = await cli("endpoints", "remove", "--space", "../etc")
    assert result.returncode == 2
    assert "not a space slug" in result.stderr
    assert registry_end(kafka) == before


async def test_cli_set_reads_a_record_from_stdin(harness, receiver, cli, follow):
    space = unique("reg-stdin")
    app = await harness.start(harness.settings())
    await follow(app)
    record = {"space": space, "url": receiver.url(f"/stdin/{space}"), "active": True}
    result = await cli("endpoints", "set", "--record", "-", stdin=orjson.dumps(record).decode())
    assert result.returncode == 0, result.stderr
    await url_becomes(app, space, record["url"])


async def test_follower_ignores_invalid_records_and_counts_them(harness, receiver, follow):
    app = await harness.start(harness.settings())
    await follow(app)
    reasons = (REASON_INVALID_JSON, REASON_SCHEMA, REASON_KEY_MISMATCH)
    before = {r: sample(app, INVALID_METRIC, {"reason": r}) for r in reasons}
    good, other = unique("reg-good"), unique("reg-other")
    bad = {
        unique("reg-json"): b'{"space": ',
        unique("reg-http"): None,  # filled below: the record needs its own space
        unique("reg-field"): None,
        unique("reg-key"): orjson.dumps({"space": other, "url": receiver.url("/k")}),
    }
    spaces = list(bad)
    bad[spaces[1]] = orjson.dumps({"space": spaces[1], "url": "http://localhost/plain"})
    bad[spaces[2]] = orjson.dumps({"space": spaces[2], "url": receiver.url("/f"), "colour": 1})
    for space, value in bad.items():
        produce(harness.kafka, ENDPOINTS_TOPIC, [value], key=space.encode())
    produce(harness.kafka, ENDPOINTS_TOPIC,
            [orjson.dumps({"space": good, "url": receiver.url(f"/good/{good}")})], key=good.encode())

    await url_becomes(app, good, receiver.url(f"/good/{good}"))  # records after the bad ones apply
    delta = {r: sample(app, INVALID_METRIC, {"reason": r}) - before[r] for r in reasons}
    assert delta == {REASON_INVALID_JSON: 1, REASON_SCHEMA: 2, REASON_KEY_MISMATCH: 1}
    assert all(app.registry.get(s) is None for s in [*spaces, other])
    publish_event(harness.kafka, harness.events_topic, good)
    await wait_for(lambda: receiver.to(f"/good/{good}"), what="delivery after invalid records")


# Topic vs file -----------------------------------------------------------------------------


async def test_per_space_the_topic_wins_over_the_file(harness, receiver, cli, follow):
    both, file_only, preset = unique("reg-both"), unique("reg-file"), unique("reg-preset")
    file_url, topic_url = receiver.url(f"/file/{both}"), receiver.url(f"/topic/{both}")
    # A topic record published before the consumer starts overrides the file at start-up.
    result = await cli("endpoints", "set", "--space", preset, "--url", receiver.url(f"/topic/{preset}"))
    assert result.returncode == 0, result.stderr
    settings = harness.settings([
        {"space": both, "url": file_url},
        {"space": file_only, "url": receiver.url(f"/file/{file_only}")},
        {"space": preset, "url": receiver.url(f"/file/{preset}")},
    ])
    app = await harness.start(settings)
    await follow(app)
    assert app.registry.get(preset).url == receiver.url(f"/topic/{preset}")

    publish_event(harness.kafka, harness.events_topic, both)
    await wait_for(lambda: receiver.to(f"/file/{both}"), what="delivery to the file's URL")

    result = await cli("endpoints", "set", "--space", both, "--url", topic_url)
    assert result.returncode == 0, result.stderr
    await url_becomes(app, both, topic_url)
    publish_event(harness.kafka, harness.events_topic, both)
    await wait_for(lambda: receiver.to(f"/topic/{both}"), what="delivery to the topic's URL")

    # `list` shows where each record comes from (with the same file configured)
    listed = await cli("endpoints", "list", "--json",
                       env={"PERKAMO_ENDPOINTS_FILE": str(settings.endpoints_file)})
    assert listed.returncode == 0, listed.stderr
    sources = {row["space"]: row["source"] for row in orjson.loads(listed.stdout)}
    assert sources[both] == sources[preset] == "topic (overrides file)"
    assert sources[file_only] == "file"

    # removing the topic's record brings the file's back
    result = await cli("endpoints", "remove", "--space", both)
    assert result.returncode == 0, result.stderr
    await url_becomes(app, both, file_url)
    publish_event(harness.kafka, harness.events_topic, both)
    await wait_for(lambda: len(receiver.to(f"/file/{both}")) == 2, what="the file's URL again")
    publish_event(harness.kafka, harness.events_topic, file_only)
    await wait_for(lambda: receiver.to(f"/file/{file_only}"), what="the file-only Space")
    assert len(receiver.to(f"/topic/{both}")) == 1


# list ----------------------------------------------------------------------------------------


async def test_list_masks_urls_and_never_shows_secrets(kafka, topics, cli):
    space, plain = unique("reg-list"), unique("reg-list")
    secret_path = f"/hooks/s3cr3t-{unique('p')}"
    secrets = ["whsec_" + "bGlzdC10ZXN0LXNlY3JldC1vbmU=", "whsec_" + "bGlzdC10ZXN0LXNlY3JldC10d28="]
    result = await cli("endpoints", "set", "--space", space,
                       "--url", f"https://hooks.example.com{secret_path}?token=abc",
                       "--signing-secret", secrets[0], "--signing-secret", secrets[1])
    assert result.returncode == 0, result.stderr
    result = await cli("endpoints", "set", "--space", plain, "--url", "https://[2001:4860::8]/p",
                       "--inactive")
    assert result.returncode == 0, result.stderr

    table = await cli("endpoints", "list")
    assert table.returncode == 0, table.stderr
    line = next(row for row in table.stdout.splitlines() if space in row)
    assert "https://hooks.example.com/…" in line
    assert "s3cr3t" not in table.stdout and "token=abc" not in table.stdout
    assert "https://[2001:4860::8]/…" in next(r for r in table.stdout.splitlines() if plain in r)

    masked = await cli("endpoints", "list", "--json")
    rows = {row["space"]: row for row in orjson.loads(masked.stdout)}
    assert rows[space] == {"space": space, "id": rows[space]["id"], "active": True,
                           "url": "https://hooks.example.com/…", "signing_secret_count": 2,
                           "source": "topic",
                           # no history role answers here: health and expiry unknown (stderr
                           # says why)
                           "health": None, "cert_not_after": None, "cert_expires_in_s": None}
    assert "health and certificate expiry unknown" in masked.stderr
    assert rows[plain]["active"] is False

    shown = await cli("endpoints", "list", "--json", "--show-urls")
    rows = {row["space"]: row for row in orjson.loads(shown.stdout)}
    assert rows[space]["url"] == f"https://hooks.example.com{secret_path}?token=abc"
    for output in (table.stdout, masked.stdout, shown.stdout, table.stderr, shown.stderr):
        assert not any(s in output for s in secrets)
        assert "whsec_" not in output


# Follower life cycle -------------------------------------------------------------------------


async def test_a_missing_topic_counts_as_loaded_and_is_picked_up_when_created(kafka, caplog):
    caplog.set_level(logging.INFO, logger="consumer.registry_topic")
    topic = unique("perkamo.webhooks.endpoints.missing")
    registry = EndpointRegistry()
    follower = RegistryFollower(load_settings(kafka_bootstrap_servers=kafka), registry, Metrics(),
                                topic=topic, recheck_s=0.5)
    follower.start()
    try:
        assert await asyncio.to_thread(follower.wait_loaded, 15)
        assert registry.loaded
        assert any("does not exist" in r.getMessage() and r.levelno == logging.WARNING
                   for r in caplog.records)
        ensure_topics(kafka, [(topic, 1, {"cleanup.policy": "compact"})])
        space = unique("reg-late")
        produce(kafka, topic, [orjson.dumps({"space": space, "url": "https://hooks.example.com/x"})],
                key=space.encode())
        await wait_for(lambda: registry.get(space), timeout=15, what="record on the new topic")
    finally:
        await asyncio.to_thread(follower.stop)


async def test_not_loaded_while_the_broker_is_unreachable():
    registry = EndpointRegistry()
    settings = load_settings(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")
    follower = RegistryFollower(settings, registry, Metrics(), recheck_s=0.5)
    follower.start()
    try:
        assert not await asyncio.to_thread(follower.wait_loaded, 2)
        assert not registry.loaded
    finally:
        await asyncio.to_thread(follower.stop)


async def test_endpoints_gauge_counts_active_endpoints(harness, receiver, cli, follow):
    app = await harness.start(harness.settings())
    await follow(app)
    before = sample(app, "perkamo_webhook_endpoints_loaded", {})
    space = unique("reg-gauge")
    result = await cli("endpoints", "set", "--space", space, "--url", receiver.url("/g"))
    assert result.returncode == 0, result.stderr
    await wait_for(lambda: sample(app, "perkamo_webhook_endpoints_loaded", {}) == before + 1,
                   what="the endpoints gauge")
    result = await cli("endpoints", "remove", "--space", space)
    assert result.returncode == 0, result.stderr
    await wait_for(lambda: sample(app, "perkamo_webhook_endpoints_loaded", {}) == before,
                   what="the endpoints gauge after remove")
