"""SSRF guard: endpoint hosts may only resolve to public addresses, checked at connect time.

DESIGN §5: endpoint URLs are customers' public HTTPS URLs. `AddressPolicy` decides whether an
address may be connected to; `GuardedResolver` applies it inside aiohttp's connector, so the
check runs on the very addresses the socket connects to.

What aiohttp 3.14 does (read in `aiohttp/connector.py`, `client.py`), and what follows from it:

* Rebinding. `TCPConnector._create_direct_connection` resolves through `_resolve_host` and then
  connects only to the `ResolveResult`s it got back (`_convert_hosts_to_addr_infos`, numeric
  host flags: no second lookup). The DNS cache (`use_dns_cache`, `ttl_dns_cache`) stores what
  the resolver returned, i.e. the already-filtered list. So no rebinding window exists between
  the check and the connect.
* IP literals skip the resolver. `_resolve_host` returns `is_ip_address(host)` hosts (all
  digits and dots, or any ':') as they are, without calling the resolver; aiohttp 3.14 rejects
  non-canonical IPv4 forms such as `127.1` or `2130706433` there, older versions pass them to
  the socket, which maps them onto an address. Hence `AddressPolicy.check_literal`, which the
  caller runs on the URL's host before `session.post()`: it refuses refused literals and any
  host that looks numeric but is not a canonical address. Hex or octal forms (`0x7f.1`) are
  not literals to aiohttp; they go through the resolver and are judged on the result.
* How a refusal surfaces. An exception from `resolver.resolve()` that is an `OSError` is
  wrapped: `raise ClientConnectorDNSError(req.connection_key, exc) from exc` (a subclass of
  `ClientConnectorError` -> `ClientOSError` -> `OSError`), with `.os_error` and `__cause__`
  both the original; `ClientSession._request` re-raises `ClientConnectorError` unchanged. A
  non-OSError would escape unwrapped. `BlockedAddress` is an `OSError`, so callers get a
  `ClientConnectorDNSError`, like a failed lookup; `blocked_cause()` tells the two apart.
  With the DNS cache on, concurrent lookups of one host share the resolver call and all get
  the same exception; failures are not cached.
* Redirects. The redirect loop in `_request` connects again for each hop; a `Location` with
  an IP literal would bypass the resolver and so this guard. Deliveries do not follow
  redirects (DESIGN §4, `allow_redirects=False`), which keeps `check_literal` sufficient.
* Proxies. Through an HTTP(S) proxy the connector resolves the proxy's host, not the
  endpoint's; the endpoint is named in the CONNECT request and resolved by the proxy. The
  guard then judges the proxy's address (which usually needs an allow-list entry) and cannot
  see the endpoint's: with a proxy configured, the proxy must enforce the same rules.

Metadata addresses (`METADATA_ADDRESSES`) stay refused even when an allow-list network
contains them; only an allow-list entry that is exactly that address (`169.254.169.254/32`,
`fd00:ec2::254/128`) opens one. A broad entry such as `169.254.0.0/16` or `0.0.0.0/0` opened for
a test must not expose instance credentials.

The allow-list applies to the address as resolved: `127.0.0.0/8` opens `127.0.0.1` but not
its IPv4-mapped form `::ffff:127.0.0.1`; list `::ffff:127.0.0.0/104` for that.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Collection, Iterator, Sequence
from typing import Final

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_exceptions import ClientConnectorError

from consumer.errors import BlockedAddress, ConfigError

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Instance-metadata and host-agent services: they hand out credentials, so a request there
# from our egress is the worst SSRF outcome. Most are link-local anyway; 168.63.129.16 is not.
METADATA_ADDRESSES: Final[frozenset[IPAddress]] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle, Hetzner ...
        "169.254.169.253",  # AWS VPC DNS
        "169.254.169.123",  # AWS Time Sync
        "169.254.170.2",  # AWS ECS task metadata and credentials
        "169.254.170.23",  # AWS EKS Pod Identity agent
        "169.254.0.23",  # Tencent Cloud
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
        "168.63.129.16",  # Azure WireServer (a public-range address)
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::253",  # AWS VPC DNS over IPv6
        "fd00:ec2::123",  # AWS Time Sync over IPv6
        "fd00:ec2::23",  # AWS EKS Pod Identity agent over IPv6
        "fd20:ce::254",  # GCP metadata over IPv6
    )
)


def _table(*rows: tuple[str, str]) -> tuple[tuple[IPNetwork, str], ...]:
    """Parse (CIDR, label) rows; the first matching row names the refusal."""
    return tuple((ipaddress.ip_network(cidr), label) for cidr, label in rows)


# IANA special-purpose registries (RFC 6890 and successors), narrowest first where they nest.
_REFUSED_V4: Final = _table(
    ("0.0.0.0/32", "unspecified"),
    ("0.0.0.0/8", "this_network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "cgnat"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link_local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"),  # IETF protocol assignments
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "reserved"),  # deprecated 6to4 relay anycast
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("240.0.0.0/4", "reserved"),
)
# :: and ::1 lie inside the deprecated IPv4-compatible range ::/96, so they are judged first.
_V6_BEFORE_EMBEDDING: Final = _table(("::/128", "unspecified"), ("::1/128", "loopback"))
_REFUSED_V6: Final = _table(
    ("100::/64", "reserved"),  # discard-only
    ("2001::/32", "teredo"),  # the client address is obfuscated; refuse the whole range
    ("2001:2::/48", "benchmarking"),
    ("2001::/23", "reserved"),  # IETF protocol assignments
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "reserved"),  # SRv6 SIDs
    ("fc00::/7", "unique_local"),
    ("fe80::/10", "link_local"),
    ("fec0::/10", "site_local"),
    ("ff00::/8", "multicast"),
)
_GLOBAL_UNICAST_V6: Final = ipaddress.IPv6Network("2000::/3")
# IPv6 forms that carry an IPv4 address: (range, label, bit offset of the IPv4 address,
# label when the carried address is public -- None lets it through).
_EMBEDDING_FORMS: Final = (
    (ipaddress.IPv6Network("::ffff:0:0/96"), "ipv4_mapped", 0, "ipv4_mapped"),
    # deprecated IPv4-compatible form; :: and ::1 are judged before this
    (ipaddress.IPv6Network("::/96"), "ipv4_compatible", 0, "ipv4_compatible"),
    (ipaddress.IPv6Network("2002::/16"), "6to4", 80, None),
    (ipaddress.IPv6Network("64:ff9b::/96"), "nat64", 0, None),
    # Local-use NAT64 prefix (RFC 8215): where the IPv4 address sits depends on the operator's
    # prefix length, so the /96 reading is only a hint; public endpoints never resolve here.
    (ipaddress.IPv6Network("64:ff9b:1::/48"), "nat64", 0, "nat64_local"),
)


def _parse_address(address: str | IPAddress) -> IPAddress | None:
    """The address without an IPv6 zone (`fe80::1%eth0`), or None if it is not an address."""
    if isinstance(address, str):
        try:
            address = ipaddress.ip_address(address)
        except ValueError:
            return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        return ipaddress.IPv6Address(int(address))
    return address


def _lookup(address: IPAddress, table: tuple[tuple[IPNetwork, str], ...]) -> str | None:
    """The label of the first table row containing the address."""
    for network, label in table:
        if address in network:
            return label
    return None


def _v4_reason(address: ipaddress.IPv4Address) -> str | None:
    """Why the built-in rules refuse an IPv4 address, or None if it is public."""
    if address in METADATA_ADDRESSES:
        return "metadata"
    return _lookup(address, _REFUSED_V4)


def _carried_reason(
    address: ipaddress.IPv6Address, label: str, shift: int, label_if_public: str | None
) -> str | None:
    """Judge an IPv6 form by the IPv4 address it carries: '<form>:<why>' if that is refused."""
    inner = _v4_reason(ipaddress.IPv4Address((int(address) >> shift) & 0xFFFFFFFF))
    return f"{label}:{inner}" if inner else label_if_public


def _v6_reason(address: ipaddress.IPv6Address) -> str | None:
    """Why the built-in rules refuse an IPv6 address, or None if it is public."""
    if address in METADATA_ADDRESSES:
        return "metadata"
    early = _lookup(address, _V6_BEFORE_EMBEDDING)
    if early is not None:
        return early
    for network, label, shift, label_if_public in _EMBEDDING_FORMS:
        if address in network:
            return _carried_reason(address, label, shift, label_if_public)
    listed = _lookup(address, _REFUSED_V6)
    if listed is None and address not in _GLOBAL_UNICAST_V6:
        return "reserved"  # everything outside 2000::/3 is unassigned or special
    return listed


def builtin_reason(address: IPAddress) -> str | None:
    """Why the built-in rules (no allow-list) refuse an address, or None if it is public."""
    if isinstance(address, ipaddress.IPv4Address):
        return _v4_reason(address)
    return _v6_reason(address)


def _looks_numeric(host: str) -> bool:
    """What aiohttp treats as an IP literal and hands to the socket without resolving."""
    return ":" in host or host.replace(".", "").isdigit()


class AddressPolicy:
    """Which resolved addresses deliveries may connect to: public ones, plus the allow-list."""

    def __init__(self, allow_networks: Sequence[str]) -> None:
        self._allowed = tuple(self._parse_network(cidr) for cidr in allow_networks)
        self._allowed_hosts = frozenset(
            net.network_address for net in self._allowed if net.num_addresses == 1
        )

    @staticmethod
    def _parse_network(cidr: str) -> IPNetwork:
        """One allow-list entry; a bad one is a configuration error naming it."""
        try:
            return ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError as exc:
            raise ConfigError(
                f"PERKAMO_ALLOW_PRIVATE_NETWORKS: {cidr!r} is not a CIDR network ({exc})"
            ) from None

    def refusal_reason(self, address: str | IPAddress) -> str | None:
        """None if allowed, else a short bounded label such as 'private' or 'ipv4_mapped:private'.

        Metadata addresses need an allow-list entry that is exactly that address; everything
        else is allowed when any allow-list network contains it.
        """
        parsed = _parse_address(address)
        if parsed is None:
            return "not_an_address"
        reason = builtin_reason(parsed)
        if reason is not None and reason.endswith("metadata"):  # itself, or carried in IPv6
            return None if parsed in self._allowed_hosts else reason
        if any(parsed in network for network in self._allowed):
            return None
        return reason

    def check_literal(self, host: str) -> None:
        """Raise BlockedAddress if host is a refused IP literal (v4, v6 or [v6]); names pass."""
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not _looks_numeric(bare):
            return
        reason = self.refusal_reason(bare)
        if reason == "not_an_address":
            reason = "ambiguous_literal"  # e.g. 127.1 or 2130706433, which sockets accept
        if reason is not None:
            raise BlockedAddress(host, reason)


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that drops refused addresses, so the connector never dials them."""

    def __init__(
        self,
        policy: AddressPolicy,
        inner: AbstractResolver | None = None,
        trusted_hosts: Collection[str] = (),
    ) -> None:
        """`trusted_hosts`: names the operator configured (the egress proxy), not customers'."""
        self._policy = policy
        self._inner = inner
        self._trusted = frozenset(h.lower() for h in trusted_hosts)

    def _resolver(self) -> AbstractResolver:
        """The inner resolver; the default is created lazily as it needs a running loop."""
        if self._inner is None:
            self._inner = aiohttp.ThreadedResolver()
        return self._inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve via the inner resolver and keep only allowed addresses; none left: refuse."""
        answers = await self._resolver().resolve(host, port, family=family)
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} resolved to no addresses")
        if host.lower() in self._trusted:
            return answers
        allowed: list[ResolveResult] = []
        reasons: list[str] = []
        for answer in answers:
            reason = self._policy.refusal_reason(answer["host"])
            if reason is None:
                allowed.append(answer)
            else:
                reasons.append(reason)
        if not allowed:
            raise BlockedAddress(host, reasons[0])
        if reasons:
            log.warning("dropped %d refused address(es) of %s (%s)", len(reasons), host, reasons[0])
        return allowed

    async def close(self) -> None:
        """Close the inner resolver."""
        if self._inner is not None:
            await self._inner.close()


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything it wraps: os_error, __cause__, __context__ (no cycles)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [current.__context__, current.__cause__]
        if isinstance(current, ClientConnectorError):
            linked.append(current.os_error)
        stack.extend(e for e in linked if e is not None)


def blocked_cause(exc: BaseException) -> BlockedAddress | None:
    """The BlockedAddress behind whatever aiohttp raised (see the module docstring), or None."""
    for candidate in _causes(exc):
        if isinstance(candidate, BlockedAddress):
            return candidate
    return None
