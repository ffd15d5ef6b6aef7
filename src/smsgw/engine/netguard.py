"""Which hosts and addresses status callbacks may reach: the guard against server-side request
forgery, shared by the URL check at registration and the poster at each connection.

In production a callback may reach only globally routable unicast addresses: never this
machine, a private or link-local network (where cloud metadata services answer, at
169.254.169.254 and the like), multicast, or the IPv6 forms that embed such an IPv4 address.
Outside production it may reach only loopback. The registration check sees only what the URL
spells (an IP literal, in any form the resolver takes, or a name known to be local); the
poster resolves the name itself at each connection, refuses if any address is forbidden, and
connects to the address it checked, so DNS that changes in between cannot redirect it.
"""

from __future__ import annotations

import ipaddress
import socket
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TypeAlias

IPAddress: TypeAlias = IPv4Address | IPv6Address


class DestinationRefused(Exception):
    """A callback's host is, or resolves to, an address callbacks must not reach. The account's
    configuration is wrong: retrying cannot help, so the callback is given up at once."""


_SHARED = IPv4Network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598); not in is_private
_NAT64 = IPv6Network("64:ff9b::/96")  # RFC 6052: the last 32 bits are the IPv4 address
_NAT64_LOCAL = IPv6Network("64:ff9b:1::/48")  # RFC 8215, local use

# Names that reach only this machine, its network or its cloud's metadata service, whatever
# they resolve to today. Single-label names ("metadata", "instance-data") are refused as well:
# they are completed by the resolver's search domains, never names on the internet.
_LOCAL_SUFFIXES = (".localhost", ".internal", ".local", ".home.arpa")
_METADATA_NAMES = frozenset({"metadata.goog", "metadata.tencentyun.com"})


def literal_address(host: str) -> IPAddress | None:
    """The address `host` spells, if it is an IP literal in any form the system resolver takes:
    dotted quads, IPv6 (with a zone), and inet_aton's others: one number (`2130706433`), hex
    (`0x7f000001`), octal (`0177.0.0.1`), fewer parts (`127.1`), and full-width or other
    Unicode digits, which socket.getaddrinfo folds to ASCII (IDNA). None for a name."""
    host = host.removesuffix(".")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        ascii_host = host.encode("idna").decode("ascii")
        return IPv4Address(socket.inet_aton(ascii_host))
    except (UnicodeError, OSError):
        return None


def _embedded_ipv4(addr: IPv6Address) -> tuple[IPv4Address, str] | None:
    """The IPv4 address an IPv6 one carries, that a dual-stack host or a gateway reaches."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped, "IPv4-mapped"
    if addr in _NAT64:
        return IPv4Address(int(addr) & 0xFFFF_FFFF), "NAT64"
    if addr.sixtofour is not None:
        return addr.sixtofour, "6to4"
    return None


def forbidden_class(addr: IPAddress) -> str | None:
    """Which class of addresses that callbacks must not reach in production `addr` is in (an
    adjective or a phrase to follow "is"), or None for a globally routable unicast address."""
    if isinstance(addr, IPv6Address):
        embedded = _embedded_ipv4(addr)
        if embedded is not None:
            inner, form = embedded
            kind = forbidden_class(inner)
            return None if kind is None else f"{kind} ({form})"
        if addr in _NAT64_LOCAL:
            return "private"
        if addr.is_site_local:  # fec0::/10, deprecated but still routed by some stacks
            return "private"
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link-local"
    if addr.is_multicast:
        return "multicast"
    if addr.is_reserved:
        return "reserved"
    if isinstance(addr, IPv4Address) and addr in _SHARED:
        return "shared address space (100.64.0.0/10)"
    if addr.is_private:
        return "private"
    if not addr.is_global:  # documentation, benchmarking, Teredo and other special ranges
        return "not globally routable"
    return None


def _is_loopback(addr: IPAddress) -> bool:
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def address_problem(addr: IPAddress, *, production: bool) -> str | None:
    """Why a callback must not connect to `addr`, or None: in production, any forbidden class;
    otherwise anything but loopback."""
    if production:
        kind = forbidden_class(addr)
        return None if kind is None else f"{addr} is {kind}"
    return None if _is_loopback(addr) else f"{addr} is not loopback (not in production mode)"


def host_problem(host: str) -> str | None:
    """Why a production node refuses `host` (a URL's host, lower case) before resolving it:
    an IP literal of a forbidden class, or a name that is local by definition. None when only
    resolving it can tell (the poster does, at each connection)."""
    addr = literal_address(host)
    if addr is not None:
        kind = forbidden_class(addr)
        if kind is None:
            return None
        spelled = host if host == str(addr) else f"{host} ({addr})"
        return f"names {spelled}, which is {kind}; callbacks go to public addresses only"
    name = host.removesuffix(".")
    if "." not in name or name.endswith(_LOCAL_SUFFIXES) or name in _METADATA_NAMES:
        return f"names a local or metadata host ({host}); callbacks go to public hosts only"
    return None
