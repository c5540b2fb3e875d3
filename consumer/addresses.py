"""Which addresses deliveries may connect to: public ones, plus the operator's allow-list.

The SSRF guard's decisions, with no I/O: IANA's special-purpose registries (RFC 6890 and its
successors) as explicit tables, IPv6 forms that carry an IPv4 address judged by that address,
cloud metadata addresses, and endpoint hosts as aiohttp will dial them (yarl's normalised
host). consumer.netguard applies these decisions on every connection the deliverer opens.

Metadata addresses (`METADATA_ADDRESSES`) stay refused even when an allow-list network
contains them; only an allow-list entry that is exactly that address (`169.254.169.254/32`,
`fd00:ec2::254/128`) opens one. A broad entry such as `169.254.0.0/16` or `0.0.0.0/0` opened for
a test must not expose instance credentials.

The allow-list applies to the address as resolved: `127.0.0.0/8` opens `127.0.0.1` but not
its IPv4-mapped form `::ffff:127.0.0.1`; list `::ffff:127.0.0.0/104` for that.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Sequence
from typing import Final
from urllib.parse import urlsplit

from consumer.errors import BlockedAddress, ConfigError
from consumer.models import host_of

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


# A DNS name as dialled (after yarl's lower-casing): labels of letters, digits, `-` and `_`.
_LABEL: Final = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME_RE: Final = re.compile(rf"^(?=.{{1,253}}\.?$){_LABEL}(\.{_LABEL})*\.?$")


def url_host(url: str) -> str:
    """The host aiohttp dials for `url`: yarl's normalised ASCII host ('' if none or invalid).

    Every decision about an endpoint starts here, never from `urlsplit`, which keeps look-alike
    dots (U+3002 ...) that yarl folds into an address such as 127.0.0.1."""
    return host_of(url)


def host_problem(url: str) -> str | None:
    """Why an endpoint URL's host is refused as written, in a sentence; None if it is fine.

    The host must be plain ASCII as typed (IDNA names only in their `xn--` form), so what the
    record says is exactly what is dialled; then it must be a DNS name, an IPv4 address or a
    bracketed IPv6 address without a zone."""
    try:
        typed = urlsplit(url).netloc.rpartition("@")[2]
    except ValueError:
        return "url is malformed"
    if not typed.isascii():
        return ("url host must be plain ASCII: write an internationalised name in its xn-- "
                "(IDNA) form, and dots and digits as ASCII characters")
    host = url_host(url)
    if not host:
        return "url must have a host"
    if ":" in host:
        valid = "%" not in host and _parse_address(host) is not None
    else:
        valid = _NAME_RE.match(host) is not None
    if valid:
        return None
    return ("url host must be a DNS name (letters, digits, hyphens and dots), an IPv4 "
            "address or a bracketed IPv6 address")


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


class TrustedAddresses:
    """Addresses the operator configured (the egress proxy's): they pass the socket factory.

    Filled from the proxy's literal and from what its configured host name resolves to, so the
    proxy stays the one trusted destination however DNS answers for it change."""

    def __init__(self, literals: Collection[str] = ()) -> None:
        self._addresses: set[IPAddress] = set()
        for literal in literals:
            self.add(literal)

    def add(self, address: str | IPAddress) -> None:
        parsed = _parse_address(address)
        if parsed is not None:
            self._addresses.add(parsed)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, (str, ipaddress.IPv4Address, ipaddress.IPv6Address)):
            return False
        parsed = _parse_address(address)
        return parsed is not None and parsed in self._addresses
