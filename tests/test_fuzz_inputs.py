"""Issue 13, item 6: fuzz what comes from outside, bounded in count and time (CI runs it).

* retry-topic messages: their perkamo-* headers (headers.read_meta, headers.due_ms) and values
  (intake.parse_event);
* registry records (endpoints.parse_record, EndpointRegistry.apply), look-alike hosts included;
* admin API parameters, against the real handlers on a real server over the embedded
  ClickHouse store: every answer is 2xx/4xx JSON, never a 5xx.

Each property runs at most FUZZ_EXAMPLES examples (env PERKAMO_TEST_FUZZ_EXAMPLES, default
200), with no shrinking database, derandomized in CI so a failure reproduces.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import ipaddress
import logging
import os
import string
import threading
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer import constants as c
from consumer.addresses import AddressPolicy, host_problem
from consumer.admin import start_admin
from consumer.config import load_settings
from consumer.constants import DlqReason
from consumer.endpoints import EndpointRegistry, parse_record
from consumer.errors import BlockedAddress, InvalidEndpoint, InvalidEvent
from consumer.headers import DeliveryMeta, due_ms, read_meta
from consumer.history import HistoryStore
from consumer.history_api import history_app
from consumer.intake import parse_event
from consumer.kafka_io import AsyncProducer
from consumer.metrics import Metrics
from consumer.models import host_of
from consumer.netguard import GuardedSocketFactory
from tests.support import free_port, make_event, unique
from tests.test_admin_auth import ADMIN, READ, Context
from tests.test_queries import attempt

FUZZ_EXAMPLES = int(os.environ.get("PERKAMO_TEST_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# --- retry-topic messages ---------------------------------------------------------------------

HEADER_NAMES = [c.K_ATTEMPT, c.K_RUN_ATTEMPT, c.K_TRIGGER, c.K_ORIGIN_TOPIC, c.K_ORIGIN_PARTITION,
                c.K_ORIGIN_OFFSET, c.K_DELIVERY_ID, c.K_REPLAY_ID, c.K_FIRST_FAILED_MS, c.K_DUE_MS,
                "perkamo-error-kind", "perkamo-status-code", "x-other"]
numbers = st.one_of(st.integers(-10, 2**70), st.sampled_from([0, 1, 10_000, 10_001, 2**31, 2**63]))
header_value = st.one_of(
    st.binary(max_size=300),
    numbers.map(lambda n: str(n).encode()),
    st.text(string.printable + "٣⑩。", max_size=140).map(lambda t: t.encode("utf-8")),
    st.sampled_from([b"", b" 1", b"1 ", b"+1", b"0x10", b"1e3", b"resend", b"replay", b"initial"]),
)
headers = st.dictionaries(st.sampled_from(HEADER_NAMES), header_value, max_size=len(HEADER_NAMES))


@FUZZ
@given(headers)
def test_retry_headers_are_read_strictly_or_refused(values: dict[str, bytes]) -> None:
    try:
        meta = read_meta(values)
    except InvalidEvent as exc:
        assert exc.reason == "bad_header"
        assert len(str(exc)) < 300
    else:
        assert isinstance(meta, DeliveryMeta)
        assert 1 <= meta.attempt <= 10_000 and 1 <= meta.run_attempt <= 10_000
        assert meta.delivery_id.isascii() and len(meta.delivery_id) <= 128
        assert meta.trigger in ("", *c.TRIGGERS)
        if meta.origin is not None:
            assert 0 <= meta.origin[1] < 2**31 and 0 <= meta.origin[2] < 2**63
    due = due_ms(values)
    assert due is None or (isinstance(due, int) and due >= 0)


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40))
json_docs = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=5)),
    max_leaves=20)


@st.composite
def mutated_events(draw: Any) -> bytes:
    """A valid event with one part replaced by arbitrary JSON."""
    doc = make_event("fuzz")
    path = draw(st.sampled_from([[], ["id"], ["type"], ["data"], ["data", "space"],
                                 ["data", "space", "slug"], ["data", "user_id"]]))
    if path:
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = draw(json_docs)
    return orjson.dumps(doc)


@FUZZ
@given(st.one_of(st.binary(max_size=2000), json_docs.map(orjson.dumps), mutated_events()))
def test_retry_message_values_become_an_event_or_a_dead_letter_reason(value: bytes) -> None:
    try:
        event = parse_event(value, 1_048_576)
    except InvalidEvent as exc:
        assert exc.reason in set(DlqReason)
        assert len(exc.detail) <= 400
    else:
        assert event.body == value and event.space_slug and event.id


# --- registry records ----------------------------------------------------------------------------

LOOK_ALIKE_DOTS = "\u2024\u3002\ufe52\uff0e\uff61"
host_chars = string.ascii_letters + string.digits + ".-_" + LOOK_ALIKE_DOTS + "\u2469\uff11äß%[]:@"
hosts = st.one_of(
    st.text(host_chars, min_size=1, max_size=40),
    st.sampled_from(["127.0.0.1", "10.0.0.1", "169.254.169.254", "[::1]", "[fe80::1%25eth0]",
                     "localhost", "xn--bcher-kva.example", "hooks.example.com", "0x7f.1", "127.1"]),
    st.tuples(st.sampled_from(["127", "10", "169"]), st.sampled_from(list(LOOK_ALIKE_DOTS + ".")),
              st.sampled_from(["0", "254"])).map(lambda t: f"{t[0]}{t[1]}{t[2]}{t[1]}0{t[1]}1"),
)
urls = st.builds(
    lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
    st.sampled_from(["https", "http", "HTTPS", "ftp", ""]), hosts,
    st.sampled_from(["", ":443", ":0", ":99999", ":8443", ":"]),
    st.text(string.printable + "é", max_size=30).map(lambda p: "/" + p),
)
records = st.fixed_dictionaries(
    {"space": st.one_of(st.from_regex(r"\A[a-z0-9][a-z0-9-]{0,10}\Z"), st.text(max_size=8)),
     "url": st.one_of(urls, json_leaf)},
    optional={"active": json_leaf, "id": st.one_of(st.from_regex(r"\Aep_[a-z0-9]{1,8}\Z"), json_leaf),
              "signing_secrets": st.lists(st.text(max_size=30), max_size=5),
              "colour": json_leaf},
)


@FUZZ
@given(st.one_of(records, json_docs))
def test_registry_records_are_endpoints_that_dial_what_they_say_or_refused(doc: Any) -> None:
    try:
        endpoint = parse_record(doc)
    except InvalidEndpoint as exc:
        message = str(exc)
        assert message and "violates" not in message and len(message) < 400
        if isinstance(doc, dict) and isinstance(doc.get("url"), str) and len(doc["url"]) > 12:
            assert doc["url"] not in message  # never echoes the URL
        return
    url = doc["url"]
    typed_host = urllib.parse.urlsplit(url).netloc
    assert typed_host.isascii(), "a look-alike host was accepted"
    assert url.startswith("https://")
    assert endpoint.host == host_of(url) and endpoint.host and endpoint.host.isascii()
    assert host_problem(url) is None
    # What the record says is what is dialled: for an IP literal, the check before the request
    # and the socket factory's check at the dial give the same answer.
    try:
        ipaddress.ip_address(endpoint.host)
    except ValueError:
        return  # a name: judged on what it resolves to
    policy = AddressPolicy([])
    before = policy.refusal_reason(endpoint.host)
    try:
        GuardedSocketFactory(policy).check((endpoint.host, 443))
        at_dial = None
    except BlockedAddress as exc:
        at_dial = exc.reason
    assert before == at_dial


@FUZZ
@given(st.one_of(st.none(), st.binary(max_size=40)),
       st.one_of(st.none(), st.binary(max_size=400), records.map(orjson.dumps)))
def test_registry_topic_records_never_break_the_registry(key: bytes | None, value: bytes | None) -> None:
    registry = EndpointRegistry()
    reason = registry.apply(key, value)
    assert reason in (None, "invalid_json", "schema", "key_mismatch")
    for endpoint in registry.all():
        assert endpoint.host.isascii()


# --- admin API parameters against the real handlers ---------------------------------------------


class AdminServer:
    """The real admin app (real store, a real producer, no endpoints) on a thread of its own."""

    def __init__(self, store: HistoryStore, kafka: str) -> None:
        self.port = free_port()
        self._store, self._kafka = store, kafka
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        settings = load_settings(admin_token=ADMIN, admin_read_token=READ,
                                 admin_listen=f"127.0.0.1:{self.port}", kafka_bootstrap_servers=self._kafka)
        context = Context(settings, self._store)
        context.service.producer = AsyncProducer(self._kafka)

        async def ready() -> dict[str, bool]:
            return {"history": True}

        app = history_app(Metrics(), ready, context)
        runner = await start_admin(app, "127.0.0.1", self.port)
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()
        context.service.producer.close(5)

    def __enter__(self) -> AdminServer:
        self._thread.start()
        assert self._ready.wait(30), "admin server did not start"
        return self

    def __exit__(self, *_: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def request(self, method: str, target: str, body: bytes | None = None,
                headers: dict[str, bytes] | None = None) -> tuple[int, bytes, str]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.putrequest(method, target, skip_accept_encoding=True)
            for name, value in (headers or {}).items():
                connection.putheader(name, value)
            if body is not None:
                connection.putheader("Content-Length", str(len(body)).encode())
                connection.putheader("Content-Type", b"application/json")
            connection.endheaders(body)
            response = connection.getresponse()
            return response.status, response.read(), response.getheader("Content-Type", "")
        finally:
            connection.close()


@pytest.fixture(scope="module")
def admin_server(store: HistoryStore, kafka: str) -> Iterator[AdminServer]:
    space = unique("fuzz")
    now = datetime.now(UTC)
    store.insert([attempt(f"{space}-d{n}", 1, space, "failed", now - timedelta(minutes=n))
                  for n in range(5)])
    with AdminServer(store, kafka) as server:
        server.space = space  # type: ignore[attr-defined]
        yield server


@pytest.fixture(scope="module")
def guessed_server(store: HistoryStore, kafka: str) -> Iterator[AdminServer]:
    """A server of its own for wrong-token fuzzing: its throttle then holds back no other test."""
    with AdminServer(store, kafka) as server:
        yield server


def _assert_json_answer(status: int, body: bytes, content_type: str, what: Any) -> None:
    assert status < 500, (status, body[:300], what)
    assert 200 <= status < 500
    assert content_type.startswith("application/json"), (status, content_type, what)
    doc = orjson.loads(body)
    if status >= 400:
        assert isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc["error"], doc


cursor_docs = st.fixed_dictionaries({"f": json_leaf, "t": json_leaf, "d": json_leaf})
param_values = st.one_of(
    st.text(max_size=60),
    numbers.map(lambda n: f"{n}{'smhdw'[n % 5]}"),
    st.sampled_from(["now", "24h", "800000d", "2026-06-01T10:00:00Z", "9999-12-31", "0001-01-01",
                     "delivered", "failed", "retrying", "true", "1", "", "-1", "1000", "1001"]),
    cursor_docs.map(lambda d: base64.urlsafe_b64encode(orjson.dumps(d)).decode().rstrip("=")),
)
list_params = st.dictionaries(
    st.one_of(st.sampled_from(["space", "status", "event_type", "since", "until", "limit", "cursor"]),
              st.text(max_size=10)),
    param_values, max_size=6)
# Bytes an HTTP field value may hold (RFC 9110: visible ASCII, space, tab, obs-text); control
# characters are not HTTP at all (see test_malformed_http_is_a_400_without_a_traceback).
field_bytes = st.binary(max_size=60).map(
    lambda b: bytes(x for x in b if x in (9, 32) or 33 <= x <= 126 or x >= 128))
tokens = st.one_of(st.just(READ), st.just(ADMIN))


@FUZZ
@given(list_params, tokens)
def test_fuzzed_list_parameters_get_2xx_or_4xx_json(
    admin_server: AdminServer, params: dict[str, str], token: str
) -> None:
    """Valid tokens only: wrong ones would soon put the test's address over the sign-in
    throttle, and every later example would be a 429 that checks no parameter."""
    query = urllib.parse.urlencode(params)
    status, body, kind = admin_server.request("GET", f"/api/v1/deliveries?{query}",
                                              headers={"Authorization": f"Bearer {token}".encode()})
    _assert_json_answer(status, body, kind, (params, token))
    assert status != 429, body[:300]


@FUZZ
@given(field_bytes)
def test_fuzzed_tokens_get_a_json_401_403_or_429(guessed_server: AdminServer, token: bytes) -> None:
    """Anything in the Authorization field: refused in JSON (429 once the address has guessed
    too often), never a 5xx."""
    auth = (b"Bearer " + token).strip()
    status, body, kind = guessed_server.request("GET", "/api/v1/deliveries?since=1h",
                                              headers={"Authorization": auth})
    _assert_json_answer(status, body, kind, token)
    assert status in (401, 403, 429) or token in (READ.encode(), ADMIN.encode()), (status, token)


@FUZZ
@given(st.one_of(st.text(max_size=80), st.sampled_from(["dlv_x", "a/b", "..", "%00", "é"])),
       st.sampled_from(["", "?include_body=true", "?include_body=maybe", "?x=1"]))
def test_fuzzed_delivery_ids_get_2xx_or_4xx_json(
    admin_server: AdminServer, delivery_id: str, suffix: str
) -> None:
    target = "/api/v1/deliveries/" + urllib.parse.quote(delivery_id or "x", safe="") + suffix
    for token in (READ, ADMIN):
        status, body, kind = admin_server.request("GET", target,
                                                  headers={"Authorization": f"Bearer {token}".encode()})
        _assert_json_answer(status, body, kind, target)
    status, body, kind = admin_server.request(
        "POST", "/api/v1/deliveries/" + urllib.parse.quote(delivery_id or "x", safe="") + "/resend",
        body=b"{}", headers={"Authorization": f"Bearer {ADMIN}".encode()})
    _assert_json_answer(status, body, kind, delivery_id)


replay_bodies = st.one_of(
    st.fixed_dictionaries({"space": st.one_of(st.just("SPACE"), json_leaf),
                           "since": st.one_of(param_values, json_leaf)},
                          optional={"until": st.one_of(param_values, json_leaf),
                                    "status": st.one_of(param_values, json_leaf),
                                    "dry_run": json_leaf, "force": json_leaf, "other": json_leaf}),
    json_docs,
)


@FUZZ
@given(st.one_of(replay_bodies.map(orjson.dumps), st.binary(max_size=200)))
def test_fuzzed_replay_bodies_get_2xx_or_4xx_json(admin_server: AdminServer, raw: bytes) -> None:
    raw = raw.replace(b'"SPACE"', orjson.dumps(admin_server.space))  # type: ignore[attr-defined]
    status, body, kind = admin_server.request("POST", "/api/v1/replay", body=raw,
                                              headers={"Authorization": f"Bearer {ADMIN}".encode()})
    _assert_json_answer(status, body, kind, raw)


def test_malformed_http_is_a_400_without_a_traceback(
    admin_server: AdminServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for header in (b"Bearer \x00", b"Bearer \x01\x02", b"\x7f"):
        status, _, _ = admin_server.request("GET", "/api/v1/deliveries",
                                            headers={"Authorization": header})
        assert status == 400
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
