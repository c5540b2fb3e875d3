"""SSRF guard: address decisions, the guarded resolver, and aiohttp on loopback only.

No test connects anywhere but 127.0.0.1: public addresses below are data for the policy and
for fake resolvers, never dialled.
"""

import ipaddress
import logging
import pickle
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from consumer.addresses import AddressPolicy
from consumer.errors import BlockedAddress, ConfigError
from consumer.netguard import GuardedResolver, blocked_cause
from tests.support import plain_server_204

LOOPBACK = ["127.0.0.0/8", "::1/128"]
PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:4700::1111"


# --- decisions -------------------------------------------------------------------------------

REFUSED = [
    # IPv4
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("169.254.1.1", "link_local"),
    ("100.64.0.1", "cgnat"),
    ("100.127.255.254", "cgnat"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "this_network"),
    ("255.255.255.255", "broadcast"),
    ("240.0.0.1", "reserved"),
    ("192.0.0.8", "reserved"),
    ("198.18.0.1", "benchmarking"),
    ("198.19.255.255", "benchmarking"),
    ("192.0.2.1", "documentation"),
    ("198.51.100.7", "documentation"),
    ("203.0.113.9", "documentation"),
    # IPv6
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link_local"),
    ("fe80::1%eth0", "link_local"),
    ("fc00::1", "unique_local"),
    ("fd12:3456::1", "unique_local"),
    ("fec0::1", "site_local"),
    ("ff02::1", "multicast"),
    ("2001:db8::1", "documentation"),
    ("3fff::1", "documentation"),
    ("2001:2::1", "benchmarking"),
    ("100::1", "reserved"),
    ("4000::1", "reserved"),
    ("2001::1", "teredo"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "teredo"),
    # IPv6 forms carrying an IPv4 address
    ("::ffff:127.0.0.1", "ipv4_mapped:loopback"),
    ("::ffff:10.0.0.1", "ipv4_mapped:private"),
    ("::ffff:7f00:1", "ipv4_mapped:loopback"),
    (f"::ffff:{PUBLIC_V4}", "ipv4_mapped"),
    ("::10.0.0.1", "ipv4_compatible:private"),
    ("::127.0.0.1", "ipv4_compatible:loopback"),
    ("2002:7f00:1::1", "6to4:loopback"),
    ("2002:c0a8:101::", "6to4:private"),
    ("64:ff9b::127.0.0.1", "nat64:loopback"),
    ("64:ff9b::10.0.0.1", "nat64:private"),
    ("64:ff9b::100.64.0.1", "nat64:cgnat"),
    ("64:ff9b:1::192.168.0.1", "nat64:private"),
    (f"64:ff9b:1::{PUBLIC_V4}", "nat64_local"),
    # cloud metadata, directly and carried
    ("169.254.169.254", "metadata"),
    ("169.254.170.2", "metadata"),
    ("100.100.100.200", "metadata"),
    ("192.0.0.192", "metadata"),
    ("168.63.129.16", "metadata"),
    ("fd00:ec2::254", "metadata"),
    ("::ffff:169.254.169.254", "ipv4_mapped:metadata"),
    ("2002:a9fe:a9fe::", "6to4:metadata"),
    ("64:ff9b::169.254.169.254", "nat64:metadata"),
    # not an address at all
    ("example.com", "not_an_address"),
]

ALLOWED = [
    PUBLIC_V4,
    "1.1.1.1",
    "8.8.8.8",
    "100.63.255.255",  # just below CGNAT
    "100.128.0.0",  # just above CGNAT
    "172.32.0.1",  # just above 172.16/12
    "198.20.0.1",  # just above benchmarking
    PUBLIC_V6,
    "2a00:1450:4001::1",
    f"2002:{0x5DB8:x}:{0xD822:x}::1",  # 6to4 of a public address
    f"64:ff9b::{PUBLIC_V4}",  # well-known NAT64 of a public address
]


@pytest.fixture
def strict() -> AddressPolicy:
    return AddressPolicy([])


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_refused_ranges(strict: AddressPolicy, address: str, reason: str) -> None:
    assert strict.refusal_reason(address) == reason


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(strict: AddressPolicy, address: str) -> None:
    assert strict.refusal_reason(address) is None


def test_accepts_ipaddress_objects(strict: AddressPolicy) -> None:
    assert strict.refusal_reason(ipaddress.ip_address("10.0.0.1")) == "private"
    assert strict.refusal_reason(ipaddress.ip_address(PUBLIC_V6)) is None


def test_reason_labels_are_bounded() -> None:
    labels = {reason for _, reason in REFUSED}
    assert all(
        len(label) <= 32 and label.replace(":", "").replace("_", "").isalnum() for label in labels
    )


# --- allow-list ------------------------------------------------------------------------------


def test_allow_list_opens_loopback_v4_and_v6() -> None:
    policy = AddressPolicy(LOOPBACK)
    assert policy.refusal_reason("127.0.0.1") is None
    assert policy.refusal_reason("127.0.0.53") is None
    assert policy.refusal_reason("::1") is None
    assert policy.refusal_reason("10.0.0.1") == "private"


def test_allow_list_applies_to_the_address_as_resolved() -> None:
    policy = AddressPolicy(["127.0.0.0/8"])
    assert policy.refusal_reason("::ffff:127.0.0.1") == "ipv4_mapped:loopback"
    assert AddressPolicy(["::ffff:127.0.0.0/104"]).refusal_reason("::ffff:127.0.0.1") is None


def test_allow_list_of_a_private_network() -> None:
    policy = AddressPolicy(["10.20.0.0/16"])
    assert policy.refusal_reason("10.20.1.2") is None
    assert policy.refusal_reason("10.21.1.2") == "private"


@pytest.mark.parametrize("allow", [["169.254.0.0/16"], ["0.0.0.0/0", "::/0"], ["168.63.0.0/16"]])
def test_broad_allow_list_does_not_open_metadata(allow: list[str]) -> None:
    policy = AddressPolicy(allow)
    assert policy.refusal_reason("169.254.169.254") == "metadata"
    assert policy.refusal_reason("168.63.129.16") == "metadata"
    assert policy.refusal_reason("fd00:ec2::254") == "metadata"
    assert policy.refusal_reason("::ffff:169.254.169.254") == "ipv4_mapped:metadata"


def test_broad_allow_list_still_opens_non_metadata() -> None:
    assert AddressPolicy(["169.254.0.0/16"]).refusal_reason("169.254.1.1") is None


def test_metadata_opens_only_for_an_exact_entry() -> None:
    policy = AddressPolicy(["169.254.169.254/32", "fd00:ec2::254/128"])
    assert policy.refusal_reason("169.254.169.254") is None
    assert policy.refusal_reason("fd00:ec2::254") is None
    assert policy.refusal_reason("169.254.170.2") == "metadata"


@pytest.mark.parametrize("bad", ["not-a-network", "10.0.0.0/33", "300.1.1.1/8"])
def test_bad_allow_list_entry_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="PERKAMO_ALLOW_PRIVATE_NETWORKS"):
        AddressPolicy([bad])


# --- literals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("10.0.0.1", "private"),
        ("169.254.169.254", "metadata"),
        ("[::1]", "loopback"),
        ("::1", "loopback"),
        ("[fd00:ec2::254]", "metadata"),
        ("[::ffff:127.0.0.1]", "ipv4_mapped:loopback"),
        ("127.1", "ambiguous_literal"),
        ("2130706433", "ambiguous_literal"),
        ("127.0.0.1.", "ambiguous_literal"),
        ("010.0.0.1", "ambiguous_literal"),
    ],
)
def test_check_literal_refuses(strict: AddressPolicy, host: str, reason: str) -> None:
    with pytest.raises(BlockedAddress) as caught:
        strict.check_literal(host)
    assert caught.value.reason == reason
    assert caught.value.host == host


@pytest.mark.parametrize(
    "host", [PUBLIC_V4, f"[{PUBLIC_V6}]", "hooks.example.com", "localhost", "0x7f.1", ""]
)
def test_check_literal_passes_public_literals_and_names(strict: AddressPolicy, host: str) -> None:
    strict.check_literal(host)  # names are judged later, on what they resolve to


def test_check_literal_honours_allow_list() -> None:
    AddressPolicy(LOOPBACK).check_literal("127.0.0.1")
    AddressPolicy(LOOPBACK).check_literal("[::1]")


# --- BlockedAddress --------------------------------------------------------------------------


def test_blocked_address_carries_host_and_reason_only() -> None:
    exc = BlockedAddress("hooks.example.com", "private")
    assert isinstance(exc, OSError)
    assert "hooks.example.com" in str(exc)
    assert "private" in str(exc)
    again = pickle.loads(pickle.dumps(exc))
    assert (again.host, again.reason) == ("hooks.example.com", "private")


def test_blocked_cause_digs_through_chains() -> None:
    blocked = BlockedAddress("h.example", "loopback")
    try:
        try:
            raise blocked
        except OSError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert blocked_cause(outer) is blocked
    assert blocked_cause(RuntimeError("unrelated")) is None


# --- GuardedResolver with canned answers -----------------------------------------------------


class CannedResolver(AbstractResolver):
    """Answers each call with the next canned list of addresses (the last one repeats)."""

    def __init__(self, *answers: Sequence[str]) -> None:
        self.answers = [list(a) for a in answers]
        self.calls = 0
        self.closed = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        self.closed = True


GuardedFactory = Callable[..., GuardedResolver]


@pytest.fixture
def guarded() -> GuardedFactory:
    """guarded(*answers, allow=[]) -> a GuardedResolver over a CannedResolver."""

    def make(*answers: Sequence[str], allow: Sequence[str] = ()) -> GuardedResolver:
        return GuardedResolver(AddressPolicy(allow), CannedResolver(*answers))

    return make


def hosts(results: list[ResolveResult]) -> list[str]:
    return [r["host"] for r in results]


async def test_hostname_resolving_to_private_is_blocked(guarded: GuardedFactory) -> None:
    with pytest.raises(BlockedAddress) as caught:
        await guarded(["10.0.0.7"]).resolve("hooks.example.com", 443)
    assert caught.value.host == "hooks.example.com"
    assert caught.value.reason == "private"
    assert "10.0.0.7" not in str(caught.value)


async def test_hostname_resolving_to_metadata_is_blocked(guarded: GuardedFactory) -> None:
    with pytest.raises(BlockedAddress, match="metadata"):
        await guarded(["169.254.169.254", "fd00:ec2::254"]).resolve("evil.example", 443)


async def test_mixed_answers_keep_only_public_ones(
    guarded: GuardedFactory, caplog: pytest.LogCaptureFixture
) -> None:
    answers = [PUBLIC_V4, "127.0.0.1", PUBLIC_V6, "::ffff:10.0.0.1", "169.254.169.254"]
    with caplog.at_level(logging.WARNING, logger="consumer.netguard"):
        result = await guarded(answers).resolve("mixed.example", 443)
    assert hosts(result) == [PUBLIC_V4, PUBLIC_V6]
    assert all(r["port"] == 443 for r in result)
    assert "dropped 3 refused address(es) of mixed.example" in caplog.text


async def test_rebinding_second_answer_is_refused(guarded: GuardedFactory) -> None:
    resolver = guarded([PUBLIC_V4], ["127.0.0.1"])
    assert hosts(await resolver.resolve("rebind.example", 443)) == [PUBLIC_V4]
    with pytest.raises(BlockedAddress, match="loopback"):
        await resolver.resolve("rebind.example", 443)


async def test_allow_list_lets_loopback_answers_through(guarded: GuardedFactory) -> None:
    result = await guarded(["127.0.0.1", "::1"], allow=LOOPBACK).resolve("localhost", 80)
    assert hosts(result) == ["127.0.0.1", "::1"]


async def test_no_answers_is_a_lookup_failure_not_a_block(guarded: GuardedFactory) -> None:
    with pytest.raises(socket.gaierror) as caught:
        await guarded([]).resolve("empty.example", 443)
    assert not isinstance(caught.value, BlockedAddress)


async def test_close_closes_inner() -> None:
    inner = CannedResolver([PUBLIC_V4])
    await GuardedResolver(AddressPolicy([]), inner).close()
    assert inner.closed


# --- end to end, loopback only ---------------------------------------------------------------


@pytest.fixture
async def local_server() -> AsyncIterator[int]:
    """An aiohttp server on 127.0.0.1 answering 204; yields its port."""
    async with plain_server_204() as (port, _):
        yield port


SessionFactory = Callable[[Sequence[str]], Awaitable[aiohttp.ClientSession]]


@pytest.fixture
async def session_with() -> AsyncIterator[SessionFactory]:
    """session_with(allow) -> a ClientSession whose connector resolves through the guard."""
    sessions: list[aiohttp.ClientSession] = []

    async def make(allow: Sequence[str]) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(AddressPolicy(allow)))
        session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=5), trust_env=False
        )
        sessions.append(session)
        return session

    yield make
    for session in sessions:
        await session.close()


async def test_e2e_localhost_blocked_without_allow_list(
    local_server: int, session_with: SessionFactory
) -> None:
    session = await session_with([])
    url = f"http://localhost:{local_server}/hook-secret-path?token=s3cr3t"
    with pytest.raises(aiohttp.ClientConnectorError) as caught:
        await session.post(url, data=b"{}")
    assert isinstance(caught.value, aiohttp.ClientConnectorDNSError)
    blocked = blocked_cause(caught.value)
    assert blocked is not None
    assert blocked.host == "localhost"
    assert blocked.reason == "loopback"
    for text in (str(caught.value), str(blocked)):
        assert "hook-secret-path" not in text
        assert "s3cr3t" not in text


async def test_e2e_localhost_allowed_with_loopback_allow_list(
    local_server: int, session_with: SessionFactory
) -> None:
    session = await session_with(LOOPBACK)
    async with session.post(f"http://localhost:{local_server}/hook", data=b"{}") as response:
        assert response.status == 204


async def test_e2e_connection_refused_is_not_a_block(session_with: SessionFactory) -> None:
    with socket.socket() as probe:  # a loopback port with nobody listening
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    session = await session_with(LOOPBACK)
    with pytest.raises(aiohttp.ClientConnectorError) as caught:
        await session.post(f"http://localhost:{free_port}/", data=b"{}")
    assert blocked_cause(caught.value) is None


async def test_e2e_hex_host_goes_through_the_resolver_and_is_refused(
    local_server: int, session_with: SessionFactory
) -> None:
    # Not an IP literal to aiohttp, but getaddrinfo may read it as 127.0.0.1.
    session = await session_with([])
    with pytest.raises(aiohttp.ClientConnectorError) as caught:
        await session.post(f"http://0x7f.0.0.1:{local_server}/", data=b"{}")
    resolved_nowhere = isinstance(caught.value.os_error, socket.gaierror)
    assert blocked_cause(caught.value) is not None or resolved_nowhere


async def test_e2e_ip_literal_skips_the_resolver_so_check_literal_is_needed(
    local_server: int, session_with: SessionFactory
) -> None:
    # aiohttp hands IP literals straight to the socket: the guarded resolver never sees them.
    session = await session_with([])
    async with session.post(f"http://127.0.0.1:{local_server}/", data=b"{}") as response:
        assert response.status == 204
    # ... which is why the caller checks the URL's host first.
    with pytest.raises(BlockedAddress, match="loopback"):
        AddressPolicy([]).check_literal("127.0.0.1")
