"""Issue 13, item 1: the SSRF guard judges the address actually dialled.

Decision-level tests for every look-alike spelling that yarl (what aiohttp dials) folds into a
private or metadata address, with no socket opened; end-to-end tests on loopback only; the
DNS pool of its own. Public addresses are data here, never dialled.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yarl

from consumer.addresses import AddressPolicy, TrustedAddresses, host_problem, url_host
from consumer.config import load_settings
from consumer.delivery import Deliverer
from consumer.endpoints import REASON_SCHEMA, EndpointRegistry, load_file, parse_record
from consumer.errors import BlockedAddress, InvalidEndpoint
from consumer.history import TABLE
from consumer.metrics import Metrics
from consumer.models import Endpoint, Event, host_of
from consumer.netguard import GuardedResolver, GuardedSocketFactory, PoolResolver, blocked_cause, dialling
from tests.support import make_event, plain_server_204, produce, unique, wait_for
from tests.test_registry import follow_fixture  # noqa: F401 - fixture
from tests.test_security import publish_record

# The spellings measured in the issue: five dot look-alikes and a suffix character.
DOTS = {
    "U+2024": "\u2024",  # ONE DOT LEADER
    "U+3002": "\u3002",  # IDEOGRAPHIC FULL STOP
    "U+FE52": "\ufe52",  # SMALL FULL STOP
    "U+FF0E": "\uff0e",  # FULLWIDTH FULL STOP
    "U+FF61": "\uff61",  # HALFWIDTH IDEOGRAPHIC FULL STOP
}
TARGETS = {"127.0.0.1": "loopback", "10.0.0.1": "private", "169.254.169.254": "metadata"}


def look_alikes() -> list[tuple[str, str, str]]:
    """(id, host as typed, the ASCII address yarl makes of it)."""
    cases = []
    for target in TARGETS:
        for name, dot in DOTS.items():
            cases.append((f"{target}-{name}", target.replace(".", dot), target))
        cases.append((f"{target}-all-but-one-{DOTS['U+3002']}", target.replace(".", "\u3002", 2), target))
    # Suffix characters: NFKC turns ⑩ into "10", so 127.0.0.1⑩ is 127.0.0.110.
    cases.append(("suffix-circled-ten", "127.0.0.1\u2469", "127.0.0.110"))
    cases.append(("suffix-circled-one", "10.0.0.\u2460", "10.0.0.1"))
    cases.append(("fullwidth-digits", "\uff11\uff12\uff17.0.0.1", "127.0.0.1"))
    cases.append(("fullwidth-metadata", "\uff11\uff16\uff19.254.169.254", "169.254.169.254"))
    return cases


LOOK_ALIKES = look_alikes()
IDS = [case[0] for case in LOOK_ALIKES]


@pytest.mark.parametrize(("typed", "dialled"), [c[1:] for c in LOOK_ALIKES], ids=IDS)
def test_yarl_dials_the_look_alike_as_an_ascii_address(typed: str, dialled: str) -> None:
    # The finding: urlsplit kept the look-alike, aiohttp (yarl) dials the address.
    url = f"https://{typed}:8443/hook"
    assert yarl.URL(url).raw_host == dialled
    assert url_host(url) == dialled == host_of(url)  # every check now starts from yarl's host


@pytest.mark.parametrize(("typed", "dialled"), [c[1:] for c in LOOK_ALIKES], ids=IDS)
def test_look_alike_records_are_refused_with_a_sentence(typed: str, dialled: str) -> None:
    with pytest.raises(InvalidEndpoint, match="plain ASCII.*xn--"):
        parse_record({"space": "shop", "url": f"https://{typed}:8443/hook"})


@pytest.mark.parametrize(("typed", "dialled"), [c[1:] for c in LOOK_ALIKES], ids=IDS)
def test_look_alike_host_is_refused_before_the_request(typed: str, dialled: str) -> None:
    # Even an Endpoint built past parse_record: its host is what is dialled, and it is refused.
    endpoint = Endpoint(id="ep_x", space="shop", url=f"https://{typed}:8443/hook")
    assert endpoint.host == dialled
    with pytest.raises(BlockedAddress):
        AddressPolicy([]).check_literal(endpoint.host)


@pytest.mark.parametrize(("typed", "dialled"), [c[1:] for c in LOOK_ALIKES], ids=IDS)
def test_socket_factory_refuses_the_dialled_address(typed: str, dialled: str) -> None:
    factory = GuardedSocketFactory(AddressPolicy([]))

    def dial() -> tuple[Any, BlockedAddress]:
        record = dialling(dialled)
        with pytest.raises(BlockedAddress) as caught:
            factory.check((dialled, 8443))  # no socket is created
        return record, caught.value

    # In a context of its own, as each delivery task has: the record does not outlive it.
    record, refused = contextvars.copy_context().run(dial)
    assert refused.host == dialled
    assert record.refused == [refused]
    caught = pytest.ExceptionInfo.from_exc_info((BlockedAddress, refused, None))
    expected = TARGETS.get(dialled, "loopback")
    assert caught.value.reason == expected


@pytest.mark.parametrize(("typed", "dialled"), [c[1:] for c in LOOK_ALIKES], ids=IDS)
def test_look_alikes_via_the_registry_topic_are_ignored(typed: str, dialled: str) -> None:
    registry = EndpointRegistry()
    value = orjson.dumps({"space": "shop", "url": f"https://{typed}:8443/hook"})
    assert registry.apply(b"shop", value) == REASON_SCHEMA
    assert registry.get("shop") is None


def test_idna_names_pass_only_in_their_xn_form() -> None:
    assert parse_record({"space": "s", "url": "https://xn--bcher-kva.example/h"}).host == (
        "xn--bcher-kva.example")
    with pytest.raises(InvalidEndpoint, match="xn--"):
        parse_record({"space": "s", "url": "https://bücher.example/h"})
    for bad in ("https://127%2e0%2e0%2e1/h", "https://[fe80::1%25eth0]/h", "https://a_b..c/h"):
        assert host_problem(bad) is not None, bad


def test_public_and_allow_listed_literals_pass_the_socket_factory() -> None:
    factory = GuardedSocketFactory(AddressPolicy(["127.0.0.0/8"]))
    factory.check(("93.184.216.34", 443))
    factory.check(("127.0.0.1", 443))
    factory.check(("2606:4700::1111", 443, 0, 0))
    with pytest.raises(BlockedAddress, match="metadata"):
        factory.check(("169.254.169.254", 80))
    with pytest.raises(BlockedAddress, match="ipv4_mapped"):
        factory.check(("::ffff:127.0.0.1", 443, 0, 0))


def test_the_proxy_is_the_one_trusted_destination() -> None:
    trusted = TrustedAddresses(["10.9.8.7"])
    factory = GuardedSocketFactory(AddressPolicy([]), trusted)
    factory.check(("10.9.8.7", 3128))
    with pytest.raises(BlockedAddress):
        factory.check(("10.9.8.6", 3128))


async def test_proxy_host_answers_become_trusted_addresses() -> None:
    from tests.test_netguard import CannedResolver

    trusted = TrustedAddresses()
    resolver = GuardedResolver(AddressPolicy([]), CannedResolver(["10.1.1.1"]),
                               trusted_hosts=["proxy.internal"], trusted_addresses=trusted)
    assert [r["host"] for r in await resolver.resolve("proxy.internal", 3128)] == ["10.1.1.1"]
    assert "10.1.1.1" in trusted
    with pytest.raises(BlockedAddress):  # a customer's name resolving there is still refused
        await resolver.resolve("hooks.example.com", 443)


# --- end to end, loopback only ---------------------------------------------------------------


@pytest.fixture
async def loopback_server() -> AsyncIterator[tuple[int, list[str]]]:
    """A plain-HTTP server on 127.0.0.1 answering 204; yields (port, paths it saw)."""
    async with plain_server_204() as server:
        yield server


async def test_e2e_socket_factory_refuses_an_ip_literal_the_resolver_never_sees(
    loopback_server: tuple[int, list[str]],
) -> None:
    port, seen = loopback_server
    connector = aiohttp.TCPConnector(socket_factory=GuardedSocketFactory(AddressPolicy([])))
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        with pytest.raises(aiohttp.ClientConnectorError) as caught:
            await session.get(f"http://127.0.0.1:{port}/literal")
    assert blocked_cause(caught.value) is not None
    assert seen == []


async def test_e2e_socket_factory_judges_names_even_behind_an_unguarded_resolver(
    loopback_server: tuple[int, list[str]],
) -> None:
    from tests.test_netguard import CannedResolver

    port, seen = loopback_server
    connector = aiohttp.TCPConnector(
        resolver=CannedResolver(["127.0.0.1"]),
        socket_factory=GuardedSocketFactory(AddressPolicy([])),
    )
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        with pytest.raises(aiohttp.ClientConnectorError) as caught:
            await session.get(f"http://rebound.example:{port}/name")
        assert blocked_cause(caught.value) is not None
        # With the allow-list the same dial goes through.
    connector = aiohttp.TCPConnector(
        resolver=CannedResolver(["127.0.0.1"]),
        socket_factory=GuardedSocketFactory(AddressPolicy(["127.0.0.0/8"])),
    )
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session, \
            session.get(f"http://rebound.example:{port}/name") as response:
        assert response.status == 204
    assert seen == ["/name"]


def deliverer(**overrides: Any) -> Deliverer:
    settings = load_settings(allow_private_networks=[], delivery_timeout_s=3, **overrides)
    return Deliverer(settings, Metrics())


def event_for(space: str) -> Event:
    doc = make_event(space)
    return Event(orjson.dumps(doc), doc["id"], doc["type"], space, "live", "u", "t")


@pytest.mark.parametrize("dot", list(DOTS.values()), ids=list(DOTS))
async def test_e2e_look_alike_loopback_endpoint_is_never_delivered(
    loopback_server: tuple[int, list[str]], dot: str
) -> None:
    # The measured bypass: a 127。0。0。1:PORT endpoint got the body, with an empty allow-list.
    # Plain http here (built past parse_record, which refuses both), so that before the fix
    # the request really arrived: the Deliverer itself must refuse the dial.
    port, seen = loopback_server
    host = "127.0.0.1".replace(".", dot)
    endpoint = Endpoint(id="ep_lookalike", space="shop", url=f"http://{host}:{port}/hook")
    sender = deliverer()
    await sender.start()
    try:
        result = await sender.call(endpoint, event_for("shop"), "dlv_x", 1)
    finally:
        await sender.close()
    assert result.outcome == "blocked_address", result
    assert "loopback" in result.error and dot not in result.error
    assert seen == []


async def test_e2e_deliverer_refuses_a_name_that_resolves_to_loopback(
    loopback_server: tuple[int, list[str]],
) -> None:
    port, seen = loopback_server
    sender = deliverer()
    await sender.start()
    try:
        result = await sender.call(
            Endpoint(id="ep_local", space="shop", url=f"https://localhost:{port}/hook"),
            event_for("shop"), "dlv_y", 1)
    finally:
        await sender.close()
    assert result.outcome == "blocked_address"
    assert seen == []


async def test_e2e_registry_topic_look_alikes_reach_no_receiver(
    harness: Any, receiver: Any, follow: Any
) -> None:
    # Measured: two of three look-alike spellings given through the registry topic reached the
    # receiver. Now every one is ignored as invalid, and nothing is delivered.
    app = await harness.start(harness.settings(allow_private_networks=[]))
    await follow(app)
    spaces = {}
    for name, dot in list(DOTS.items())[:3]:
        space = unique("lookalike")
        spaces[space] = name
        host = "127.0.0.1".replace(".", dot)
        publish_record(harness.kafka, space, {"space": space, "url": f"https://{host}:{receiver.port}/x"})
    # The topic has one partition: once a record published after them applies, they did too.
    sentinel = unique("sentinel")
    publish_record(harness.kafka, sentinel, {"space": sentinel, "url": "https://hooks.example.com/h"})
    await wait_for(lambda: app.registry.get(sentinel) is not None, what="registry caught up")
    assert (app.metrics.registry.get_sample_value(
        "perkamo_webhook_endpoint_records_invalid_total", {"reason": "schema"}) or 0) >= 3
    for space in spaces:
        assert app.registry.get(space) is None
    produce(harness.kafka, harness.events_topic, [orjson.dumps(make_event(s)) for s in spaces])
    await wait_for(lambda: sum(app.metrics.registry.get_sample_value(
        "perkamo_webhook_no_endpoint_total", {"space": s}) or 0 for s in spaces) >= len(spaces),
        what="events counted as no endpoint")
    assert receiver.requests == []
    _, rows = harness.store.query(f"SELECT count() FROM {TABLE} WHERE space_slug IN {{s:Array(String)}}",
                                  {"s": list(spaces)})
    assert rows[0][0] == 0


def test_file_loader_refuses_a_look_alike_naming_the_record(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.json"
    path.write_text(orjson.dumps([{"space": "ok", "url": "https://hooks.example.com/h"},
                                  {"space": "bad", "url": "https://127\u30020\u30020\u30021/h"}]).decode())
    with pytest.raises(InvalidEndpoint,
                       match=r"PERKAMO_ENDPOINTS_FILE .*record 1: url host must be plain ASCII"):
        load_file(path)


# --- DNS on its own bounded pool --------------------------------------------------------------


@pytest.fixture
def slow_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """getaddrinfo takes 1.5 s for *.slow.test (then fails); other names resolve as usual.

    Replaces socket.getaddrinfo for every caller, the loop's default executor included, as a
    slow customer DNS server would."""
    real = socket.getaddrinfo
    calls = {"slow": 0}
    lock = threading.Lock()

    def fake(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".slow.test"):
            with lock:
                calls["slow"] += 1
            time.sleep(1.5)
            raise socket.gaierror(socket.EAI_NONAME, "slow and unknown")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return calls


async def _default_pool_latency() -> float:
    started = time.monotonic()
    await asyncio.get_running_loop().run_in_executor(None, lambda: None)
    return time.monotonic() - started


async def test_slow_dns_does_not_delay_the_default_executor(slow_dns: dict[str, int]) -> None:
    # Measured: 12 endpoints with slow lookups delayed an unrelated call by 11.8 s. Lookups now
    # run on the deliverer's own pool (PERKAMO_DNS_THREADS), so the default pool stays free.
    sender = deliverer(dns_threads=2)
    await sender.start()
    # More slow lookups than the default executor has threads (min(32, CPUs + 4)).
    count = min(32, (os.cpu_count() or 1) + 4) + 2
    try:
        attempts = [
            asyncio.create_task(sender.call(
                Endpoint(id=f"ep_slow{n}", space=f"s{n}", url=f"https://h{n}.slow.test/hook"),
                event_for(f"s{n}"), f"dlv_{n}", 1))
            for n in range(count)
        ]
        await asyncio.sleep(0.3)  # the lookups are under way
        latencies = [await _default_pool_latency() for _ in range(3)]
        assert max(latencies) < 0.5, latencies
        results = await asyncio.gather(*attempts)
    finally:
        await sender.close()
    assert {r.outcome for r in results} <= {"connect_error", "timeout"}
    assert 1 <= slow_dns["slow"] < count  # bounded: 2 threads, the rest queued and timed out


async def test_pool_resolver_resolves_loopback_on_its_own_threads() -> None:
    resolver = PoolResolver(1)
    try:
        answers = await resolver.resolve("localhost", 443, socket.AF_INET)
    finally:
        await resolver.close()
    assert {a["host"] for a in answers} == {"127.0.0.1"}
    assert all(a["port"] == 443 for a in answers)


# --- the egress proxy: the one trusted destination --------------------------------------------


async def _tunnel_proxy() -> tuple[asyncio.AbstractServer, list[bytes]]:
    """A CONNECT proxy on loopback that tunnels to 127.0.0.1 only; records the CONNECT lines."""
    seen: list[bytes] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        line = head.split(b"\r\n", 1)[0]
        seen.append(line)
        port = int(line.split()[1].rsplit(b":", 1)[1])
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, seen


@pytest.mark.parametrize("proxy_host", ["127.0.0.1", "localhost"])
async def test_e2e_deliveries_go_through_the_trusted_proxy_with_a_strict_guard(
    receiver: Any, ca_file: Path, proxy_host: str
) -> None:
    server, seen = await _tunnel_proxy()
    port = server.sockets[0].getsockname()[1]
    sender = deliverer(https_proxy=f"http://{proxy_host}:{port}", ca_bundle=ca_file)
    await sender.start()
    try:
        result = await sender.call(
            Endpoint(id="ep_viaproxy", space="shop", url=receiver.url("/via-proxy")),
            event_for("shop"), "dlv_p", 1)
    finally:
        await sender.close()
        server.close()
    assert result.outcome == "delivered", result
    assert seen and seen[0].startswith(b"CONNECT localhost:")
    assert len(receiver.to("/via-proxy")) == 1


def test_a_refusal_summarised_by_happy_eyeballs_is_still_blocked_address() -> None:
    # Several refused addresses: aiohappyeyeballs raises a plain OSError summary, which aiohttp
    # wraps; the attempt's dial record still names the refusal. A record never leaks into
    # another host's failure, nor into a timeout.
    from aiohttp.client_reqrep import ConnectionKey

    from consumer.delivery import _failure

    def run() -> tuple[str, str, str]:
        dialling("multi.example")
        factory = GuardedSocketFactory(AddressPolicy([]))
        for address in ("10.0.0.1", "127.0.0.1"):
            with pytest.raises(BlockedAddress):
                factory.check((address, 443))
        key = ConnectionKey("multi.example", 443, True, True, None, None, None)
        summary = aiohttp.ClientConnectorError(key, OSError(13, "Multiple exceptions: ..."))
        first = _failure(summary, "multi.example", "https://multi.example/x", 1).outcome
        again = _failure(summary, "multi.example", "https://multi.example/x", 1).outcome
        dialling("other.example")
        GuardedSocketFactory(AddressPolicy([])).check(("93.184.216.34", 443))
        timeout = _failure(TimeoutError(), "other.example", "https://other.example/x", 1).outcome
        return first, again, timeout

    first, again, timeout = contextvars.copy_context().run(run)
    assert first == "blocked_address"
    assert again == "connect_error"  # the record was taken once
    assert timeout == "timeout"
