"""Issue 13, item 2: the admin API needs a token for every history read, checks the Host,
answers bad input with a 400 naming the parameter, bounds every query, and never lets reads
hold up history writes.

The handlers are the real ones (consumer.admin.build_app) on an aiohttp test server, over the
session's embedded ClickHouse store; nothing here publishes to Kafka.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from consumer.config import Settings, load_settings
from consumer.endpoints import EndpointRegistry
from consumer.errors import ConfigError
from consumer.history import HistoryStore
from consumer.history_api import history_app
from consumer.metrics import Metrics
from consumer.republish import Republisher
from consumer.setting_values import TOKEN_PLACEHOLDERS
from tests.support import unique
from tests.test_queries import attempt

ADMIN = "admin-" + "a" * 40
READ = "read-" + "r" * 40
NOW = datetime.now(UTC).replace(microsecond=0)


@dataclass
class _Producers:
    producer: Any = None


@dataclass
class Context:
    """What history_app needs of the running service (consumer.history_api.AdminContext)."""

    settings: Settings
    store: Any
    service: _Producers = field(default_factory=_Producers)
    registry: EndpointRegistry = field(default_factory=EndpointRegistry)

    @cached_property
    def republisher(self) -> Republisher:
        registry, service = self.registry, self.service
        return Republisher(self.store, self.settings.events_topics[0], service.producer,
                           Metrics(), has_endpoint=lambda space: registry.get(space) is not None)

    def endpoints_health(self) -> dict[str, dict[str, Any]]:
        return {}


MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def admin_api(store: HistoryStore) -> AsyncIterator[MakeClient]:
    """admin_api(store=None, **settings) -> a test client of the real admin app."""
    clients: list[TestClient[Any, Any]] = []

    async def make(reader: Any = None, **overrides: Any) -> TestClient[Any, Any]:
        values: dict[str, Any] = {"admin_token": ADMIN, "admin_read_token": READ}
        values.update(overrides)
        settings = load_settings(**values)

        async def ready() -> dict[str, bool]:
            return {"history": True}

        app = history_app(Metrics(), ready, Context(settings, reader or store))
        client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def seeded(store: HistoryStore) -> tuple[str, str]:
    space = unique("auth")
    name = f"{space}-d1"
    store.insert([attempt(name, 1, space, "delivered", NOW - timedelta(hours=1),
                          user_id="usr-private-42", response_excerpt="thanks")])
    return space, name


# --- tokens ---------------------------------------------------------------------------------


async def test_history_reads_need_a_token(admin_api: MakeClient, seeded: tuple[str, str]) -> None:
    # Measured: GET /api/v1/deliveries/{id} returned user ids to anyone reaching the port.
    space, name = seeded
    client = await admin_api()
    for path in (f"/api/v1/deliveries/{name}", f"/api/v1/deliveries?space={space}"):
        for headers in ({}, bearer("wrong-" + "w" * 40), {"Authorization": f"Basic {READ}"}):
            response = await client.get(path, headers=headers)
            assert response.status == 401, (path, headers)
            text = await response.text()
            assert "usr-private-42" not in text
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        for token in (READ, ADMIN):
            response = await client.get(path, headers=bearer(token))
            assert response.status == 200, await response.text()
    doc = await (await client.get(f"/api/v1/deliveries/{name}", headers=bearer(READ))).json()
    assert doc["attempts"][0]["user_id"] == "usr-private-42"


async def test_read_token_cannot_mutate_or_read_payloads(
    admin_api: MakeClient, seeded: tuple[str, str]
) -> None:
    space, name = seeded
    client = await admin_api()
    response = await client.get(f"/api/v1/deliveries/{name}?include_body=true", headers=bearer(READ))
    assert response.status == 401
    response = await client.get(f"/api/v1/deliveries/{name}?include_body=true", headers=bearer(ADMIN))
    assert response.status == 200
    for path, body in ((f"/api/v1/deliveries/{name}/resend", {}),
                       ("/api/v1/replay", {"space": space, "since": "1d", "dry_run": True})):
        response = await client.post(path, json=body, headers=bearer(READ))
        assert response.status == 401, path
        assert "admin token" in (await response.json())["error"]


async def test_without_tokens_history_reads_are_refused(admin_api: MakeClient,
                                                        seeded: tuple[str, str]) -> None:
    client = await admin_api(admin_token="", admin_read_token="")
    response = await client.get(f"/api/v1/deliveries/{seeded[1]}")
    assert response.status == 403
    assert "PERKAMO_ADMIN_READ_TOKEN" in (await response.json())["error"]


async def test_probes_and_metrics_stay_open_with_any_host(admin_api: MakeClient) -> None:
    client = await admin_api()
    for path in ("/metrics", "/healthz", "/readyz"):
        response = await client.get(path, headers={"Host": "10.1.2.3:9464"})
        assert response.status == 200, path


async def test_host_allow_list_stops_dns_rebinding(admin_api: MakeClient,
                                                   seeded: tuple[str, str]) -> None:
    path = f"/api/v1/deliveries/{seeded[1]}"
    client = await admin_api()
    for host in ("evil.example", "evil.example:9464", "127.0.0.1.evil.example", "[::2]:9464",
                 "lócalhost"):
        response = await client.get(path, headers={**bearer(READ), "Host": host})
        assert response.status == 421, host
        assert "PERKAMO_ADMIN_ALLOWED_HOSTS" in (await response.json())["error"]
    for host in ("localhost:9464", "127.0.0.1", "LOCALHOST.", "[::1]:9464"):
        response = await client.get(path, headers={**bearer(READ), "Host": host})
        assert response.status == 200, host
    client = await admin_api(admin_allowed_hosts="perkamo-webhooks,history.internal")
    response = await client.get(path, headers={**bearer(READ), "Host": "perkamo-webhooks:9464"})
    assert response.status == 200


async def _raw_get(client: TestClient[Any, Any], path: str, header: bytes) -> tuple[int, bytes]:
    """A request with a header aiohttp's client would not send (raw bytes on the socket)."""
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + header
                 + b"\r\nConnection: close\r\n\r\n")
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_non_ascii_authorization_is_a_401_and_counted(
    admin_api: MakeClient, seeded: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    # Measured: a non-ASCII Authorization answered 503 with a traceback in the log; then a 400
    # that the throttle never counted. Now a 401 like any wrong token, and counted.
    client = await admin_api()
    caplog.set_level(logging.DEBUG)
    path = f"/api/v1/deliveries/{seeded[1]}"
    headers = ["Authorization: Bearer tök".encode(), b"Authorization: Bearer \xff\xfe",
               ("Authorization: Bearer " + READ + "\u00e9").encode(),
               b"Authorization: Bearer " + b"x" * 5000]
    for header in headers:
        status, body = await _raw_get(client, path, header)
        assert status == 401, body
        assert b"Authorization" in body
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    # The same malformed token again: its prefix has failed 1 time; 4 more, then 429.
    for _ in range(4):
        status, _ = await _raw_get(client, path, "Authorization: Bearer tök".encode())
        assert status == 401
    status, body = await _raw_get(client, path, "Authorization: Bearer tök".encode())
    assert status == 429 and b"try again" in body
    # Another token from the same address is not locked out by those.
    assert (await client.get(path, headers=bearer(READ))).status == 200


async def test_wrong_tokens_are_throttled_per_prefix_and_per_address(
    admin_api: MakeClient, seeded: tuple[str, str]
) -> None:
    client = await admin_api()
    path = f"/api/v1/deliveries/{seeded[1]}"
    for n in range(5):  # at the limit: every one is checked (401)
        response = await client.get(path, headers=bearer(f"stale-{n}" + "s" * 40))
        assert response.status == 401
    response = await client.get(path, headers=bearer("stale-x" + "s" * 40))  # one past it
    assert response.status == 429 and int(response.headers["Retry-After"]) >= 1
    assert (await client.get(path, headers=bearer(READ))).status == 200  # another prefix
    assert (await client.get(path)).status == 401  # no token tried: not counted, not throttled
    # 20 wrong tokens from one address in all, whatever their prefixes: then everything waits.
    for n in range(15):
        response = await client.get(path, headers=bearer(f"{n:02d}guess" + "g" * 40))
        assert response.status == 401, n
    response = await client.get(path, headers=bearer(READ))
    assert response.status == 429


# --- settings: strength, placeholders, files --------------------------------------------------


@pytest.mark.parametrize("setting", ["admin_token", "admin_read_token"])
def test_short_tokens_are_refused_naming_the_setting(setting: str) -> None:
    with pytest.raises(ConfigError, match=f"PERKAMO_{setting.upper()} must be at least 32"):
        load_settings(**{setting: "x" * 31})


def test_every_placeholder_shipped_in_deploy_is_refused() -> None:
    # Measured: the placeholder tokens of the k8s and compose files were accepted.
    from tests.test_deploy_static import shipped_token_placeholders

    found = shipped_token_placeholders()
    assert found, "no token placeholders found in deploy files"
    for placeholder in found | TOKEN_PLACEHOLDERS:
        with pytest.raises(ConfigError, match="PERKAMO_ADMIN_TOKEN is a placeholder|at least 32"):
            load_settings(admin_token=placeholder)


def test_tokens_from_files(tmp_path: Path) -> None:
    admin_file, read_file = tmp_path / "admin", tmp_path / "read"
    admin_file.write_text(ADMIN + "\n")
    read_file.write_text(READ)
    settings = load_settings(admin_token_file=admin_file, admin_read_token_file=read_file)
    assert settings.admin_token.get_secret_value() == ADMIN
    assert settings.admin_read_token.get_secret_value() == READ
    assert ADMIN not in str(settings.describe())
    with pytest.raises(ConfigError, match="PERKAMO_ADMIN_TOKEN and PERKAMO_ADMIN_TOKEN_FILE"):
        load_settings(admin_token=ADMIN, admin_token_file=admin_file)
    with pytest.raises(ConfigError, match="PERKAMO_ADMIN_TOKEN_FILE: cannot read"):
        load_settings(admin_token_file=tmp_path / "missing")
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(ConfigError, match="PERKAMO_ADMIN_TOKEN must be at least 32"):
        load_settings(admin_token_file=short)
    with pytest.raises(ConfigError, match="PERKAMO_ADMIN_READ_TOKEN equals"):
        load_settings(admin_token=ADMIN, admin_read_token=ADMIN)


def test_token_files_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "token"
    path.write_text(ADMIN)
    monkeypatch.setenv("PERKAMO_ADMIN_TOKEN_FILE", str(path))
    assert load_settings().admin_token.get_secret_value() == ADMIN


# --- bad input: a 400 naming the parameter, never a 503 ---------------------------------------


def _cursor(doc: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(doc)).decode().rstrip("=")


BAD_LIST_PARAMS = [
    ({"since": "800000d"}, "since"),
    ({"since": "99999999999999999999999d"}, "since"),
    ({"until": "9999-12-31"}, "until"),
    ({"since": "１h"}, "since"),
    ({"cursor": "%%%"}, "cursor"),
    ({"cursor": "é" * 10}, "cursor"),
    ({"cursor": _cursor([1, 2])}, "cursor"),
    ({"cursor": _cursor("x")}, "cursor"),
    ({"cursor": _cursor({"f": 1, "t": "2026-01-01", "d": "x"})}, "cursor"),
    ({"cursor": _cursor({"f": "x", "t": 5, "d": "x"})}, "cursor"),
    ({"limit": "1" * 50}, "limit"),
    ({"limit": "٣"}, "limit"),
    ({"space": "x" * 300}, "space"),
    ({"since": "60d"}, "PERKAMO_HISTORY_MAX_SPAN_DAYS"),
    ({"since": "2020-01-01", "until": "2026-01-01"}, "PERKAMO_HISTORY_MAX_SPAN_DAYS"),
]


@pytest.mark.parametrize(("params", "named"), BAD_LIST_PARAMS,
                         ids=[f"{next(iter(p))}-{n}" for n, (p, _) in enumerate(BAD_LIST_PARAMS)])
async def test_bad_list_input_is_a_400_naming_the_parameter(
    admin_api: MakeClient, seeded: tuple[str, str], caplog: pytest.LogCaptureFixture,
    params: dict[str, str], named: str,
) -> None:
    client = await admin_api()
    caplog.set_level(logging.DEBUG)
    response = await client.get("/api/v1/deliveries", params=params, headers=bearer(READ))
    doc = await response.json()
    assert response.status == 400, doc
    assert named in doc["error"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_a_cursor_with_our_fingerprint_and_a_forged_time_is_refused(
    admin_api: MakeClient, seeded: tuple[str, str]
) -> None:
    # The fingerprint is a hash of the filters: anyone can compute it, so the rest is checked.
    from consumer.queries import DeliveryFilter

    fingerprint = DeliveryFilter(space=seeded[0]).fingerprint()
    client = await admin_api()
    for forged in ({"f": fingerprint, "t": "0001-01-01T00:00:00", "d": "x"},
                   {"f": fingerprint, "t": "9999-12-31T23:59:59+14:00", "d": "x"},
                   {"f": fingerprint, "t": "2026-01-01T00:00:00", "d": "\x00" * 5},
                   {"f": fingerprint, "t": "2026-01-01T00:00:00", "d": "x" * 5000}):
        response = await client.get("/api/v1/deliveries", headers=bearer(READ),
                                    params={"space": seeded[0], "cursor": _cursor(forged)})
        assert response.status == 400, forged
        assert "cursor" in (await response.json())["error"]


async def test_bad_replay_times_are_a_400_naming_the_field(admin_api: MakeClient) -> None:
    client = await admin_api()
    for body, named in (({"space": "s", "since": "800000d", "dry_run": True}, "since"),
                        ({"space": "s", "since": "1d", "until": "99999999d"}, "until"),
                        ({"space": "s", "since": "90d", "dry_run": True}, "PERKAMO_HISTORY_MAX_SPAN_DAYS")):
        response = await client.post("/api/v1/replay", json=body, headers=bearer(ADMIN))
        assert response.status == 400, body
        assert named in (await response.json())["error"]


def test_cli_gives_a_clear_message_on_the_same_values(tmp_path: Path) -> None:
    # Measured: the CLI crashed on since=800000d. It never reaches a consumer here.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PERKAMO_")}
    env["PERKAMO_ADMIN_LISTEN"] = "127.0.0.1:9"
    for args, named in ((["history", "--since", "800000d"], "--since"),
                        (["history", "--until", "99999999999999999999d"], "--until"),
                        (["replay", "--space", "s", "--since", "800000d"], "--since")):
        result = subprocess.run([sys.executable, "-m", "consumer", *args], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2, result.stderr
        assert named in result.stderr and "out of range" in result.stderr
        assert "Traceback" not in result.stderr


# --- bounded queries --------------------------------------------------------------------------


class SlowReader:
    """The real store, each read taking `delay` seconds longer (a slow history server)."""

    def __init__(self, store: HistoryStore, delay: float) -> None:
        self.store = store
        self.delay = delay

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        time.sleep(self.delay)
        return self.store.query(sql, parameters)


async def test_excess_concurrent_queries_get_429_with_retry_after(
    admin_api: MakeClient, store: HistoryStore, seeded: tuple[str, str]
) -> None:
    client = await admin_api(SlowReader(store, 0.8), history_max_concurrent_queries=2)
    path = f"/api/v1/deliveries/{seeded[1]}"
    responses = await asyncio.gather(*[client.get(path, headers=bearer(READ)) for _ in range(5)])
    statuses = sorted(r.status for r in responses)
    assert statuses == [200, 200, 429, 429, 429], statuses
    busy = next(r for r in responses if r.status == 429)
    assert busy.headers["Retry-After"] == "1"
    assert "PERKAMO_HISTORY_MAX_CONCURRENT_QUERIES" in (await busy.json())["error"]


async def test_history_reads_leave_the_default_executor_free(
    admin_api: MakeClient, store: HistoryStore, seeded: tuple[str, str]
) -> None:
    client = await admin_api(SlowReader(store, 1.0), history_max_concurrent_queries=8)
    path = f"/api/v1/deliveries/{seeded[1]}"
    reads = [asyncio.create_task(client.get(path, headers=bearer(READ))) for _ in range(8)]
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await asyncio.get_running_loop().run_in_executor(None, lambda: None)
    assert time.monotonic() - started < 0.5
    assert {r.status for r in await asyncio.gather(*reads)} == {200}


def test_store_reads_have_a_server_side_time_limit(history_path: Path) -> None:
    slow = HistoryStore(f"chdb://{history_path}", query_timeout_s=0.2)
    started = time.monotonic()
    try:
        with pytest.raises(Exception, match="TIMEOUT_EXCEEDED|Timeout exceeded"):
            slow.query("SELECT sum(cityHash64(number)) FROM numbers(100000000000) "
                       "SETTINGS max_threads=1")
    finally:
        slow.close()
    assert time.monotonic() - started < 5


async def test_a_timed_out_query_is_a_clear_503_without_traceback(
    admin_api: MakeClient, history_path: Path, seeded: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    limited = HistoryStore(f"chdb://{history_path}", query_timeout_s=0.05)

    class TimingOut:  # the real engine, stopped by its own max_execution_time
        def query(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
            return limited.query("SELECT sum(cityHash64(number)) FROM numbers(100000000000) "
                                 "SETTINGS max_threads=1")

    client = await admin_api(TimingOut())
    caplog.set_level(logging.DEBUG)
    response = await client.get(f"/api/v1/deliveries/{seeded[1]}", headers=bearer(READ))
    assert response.status == 503
    assert "PERKAMO_HISTORY_QUERY_TIMEOUT_S" in (await response.json())["error"]
    assert not [r for r in caplog.records if r.exc_info]
    limited.close()


def test_an_insert_is_not_delayed_by_slow_concurrent_reads(
    store: HistoryStore, history_path: Path
) -> None:
    # Measured: a 1-row insert queued behind three slow reads waited 1.5 s (one shared lock).
    # (`store`, the session's, made the schema; this test opens the same path once more.)
    store = HistoryStore(f"chdb://{history_path}")
    space = unique("write")
    store.insert([attempt(f"{space}-warm", 1, space, "delivered", NOW)])  # a first insert warms up
    heavy = "SELECT sleepEachRow(0.25) FROM numbers(3) SETTINGS max_block_size = 1"
    started = time.monotonic()
    store.query(heavy)
    one_read = time.monotonic() - started
    readers = [threading.Thread(target=store.query, args=(heavy,)) for _ in range(3)]
    for thread in readers:
        thread.start()
    time.sleep(0.1)  # the reads hold the read client
    started = time.monotonic()
    store.insert([attempt(f"{space}-d", 1, space, "delivered", NOW)])
    insert_took = time.monotonic() - started
    for thread in readers:
        thread.join()
    store.close()
    assert one_read > 0.2, "the read is too fast to show anything"
    assert insert_took < one_read / 2, (insert_took, one_read)
