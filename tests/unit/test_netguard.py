"""The SSRF guard's rules: which addresses and hosts status callbacks may reach."""

from __future__ import annotations

import ipaddress

import pytest

from smsgw.engine.netguard import (
    address_problem,
    forbidden_class,
    host_problem,
    literal_address,
)

# Every class a production node refuses, with an example (and how the reason names it).
FORBIDDEN = [
    ("127.0.0.1", "loopback"),
    ("127.10.0.3", "loopback"),
    ("::1", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.168.1.1", "private"),
    ("fd00:ec2::254", "private"),  # unique local (AWS's IPv6 metadata address)
    ("fc00::1", "private"),
    ("fec0::1", "private"),  # site-local, deprecated
    ("169.254.169.254", "link-local"),  # cloud metadata
    ("169.254.0.1", "link-local"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("::127.0.0.1", "reserved"),  # IPv4-compatible IPv6, deprecated
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("0.1.2.3", "private"),  # "this network"
    ("100.64.0.1", "shared address space"),
    ("100.100.100.200", "shared address space"),  # Alibaba Cloud's metadata
    ("100.127.255.254", "shared address space"),
    ("::ffff:127.0.0.1", "loopback (IPv4-mapped)"),
    ("::ffff:7f00:1", "loopback (IPv4-mapped)"),
    ("::ffff:169.254.169.254", "link-local (IPv4-mapped)"),
    ("::ffff:10.0.0.1", "private (IPv4-mapped)"),
    ("2002:7f00:1::", "loopback (6to4)"),
    ("2002:a9fe:a9fe::1", "link-local (6to4)"),
    ("2002:c0a8:101::", "private (6to4)"),
    ("64:ff9b::7f00:1", "loopback (NAT64)"),
    ("64:ff9b::169.254.169.254", "link-local (NAT64)"),
    ("64:ff9b:1::a00:1", "private"),  # local-use NAT64 prefix
    ("192.0.2.1", ""),  # documentation ranges: never a real receiver
    ("2001:db8::1", ""),
]

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "100.63.255.255",  # just below shared address space
    "100.128.0.1",  # just above it
    "172.32.0.1",  # just above 172.16/12
    "2606:4700:4700::1111",
    "2a00:1450:4001:80b::200e",
    "::ffff:8.8.8.8",
    "2002:808:808::1",
    "64:ff9b::8.8.8.8",
]


@pytest.mark.parametrize(("address", "kind"), FORBIDDEN)
def test_forbidden_classes(address: str, kind: str) -> None:
    found = forbidden_class(ipaddress.ip_address(address))
    assert found is not None and found.startswith(kind)
    assert address_problem(ipaddress.ip_address(address), production=True) is not None


@pytest.mark.parametrize("address", PUBLIC)
def test_globally_routable_unicast_is_allowed(address: str) -> None:
    assert forbidden_class(ipaddress.ip_address(address)) is None
    assert address_problem(ipaddress.ip_address(address), production=True) is None


# Spellings of an IPv4 address that the system resolver (inet_aton, getaddrinfo) takes.
SPELLINGS = [
    ("2130706433", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"),
    ("0X7F000001", "127.0.0.1"),
    ("017700000001", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("0x7f.0.0.1", "127.0.0.1"),
    ("0x7f.0x0.0x0.0x1", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("127.0.1", "127.0.0.1"),
    ("127.000.000.001", "127.0.0.1"),
    ("127.0.0.1.", "127.0.0.1"),
    ("\uff11\uff12\uff17.\uff10.\uff10.\uff11", "127.0.0.1"),  # full-width digits
    ("0", "0.0.0.0"),
    ("2852039166", "169.254.169.254"),
    ("0xa9fea9fe", "169.254.169.254"),
    ("0251.0376.0251.0376", "169.254.169.254"),
    ("169.16689662", "169.254.169.254"),
    ("012.1", "10.0.0.1"),
    ("3232235777", "192.168.1.1"),
]


@pytest.mark.parametrize(("host", "address"), SPELLINGS)
def test_odd_ipv4_spellings_are_read_as_the_resolver_reads_them(host: str, address: str) -> None:
    assert literal_address(host) == ipaddress.ip_address(address)
    problem = host_problem(host)
    assert problem is not None and address in problem


@pytest.mark.parametrize(
    "host", ["example.com", "hooks.example.com", "deadbeef.example", "1.2.3.4.5"]
)
def test_names_are_not_literals(host: str) -> None:
    assert literal_address(host) is None


@pytest.mark.parametrize("address", [a for a, _ in FORBIDDEN])
def test_every_forbidden_literal_is_refused_at_registration(address: str) -> None:
    assert host_problem(address) is not None


@pytest.mark.parametrize(
    "host",
    [
        "metadata.google.internal",
        "metadata.google.internal.",
        "metadata",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.tencentyun.com",
        "localhost",
        "api.localhost",
        "printer.local",
        "router.home.arpa",
    ],
)
def test_local_and_metadata_names_are_refused(host: str) -> None:
    problem = host_problem(host)
    assert problem is not None and "metadata" in problem


@pytest.mark.parametrize("host", ["hooks.example.com", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_hosts_pass_registration(host: str) -> None:
    assert host_problem(host) is None


def test_outside_production_only_loopback_may_be_reached() -> None:
    for address in ("127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"):
        assert address_problem(ipaddress.ip_address(address), production=False) is None
    for address in ("8.8.8.8", "10.0.0.1", "169.254.169.254", "2606:4700:4700::1111"):
        problem = address_problem(ipaddress.ip_address(address), production=False)
        assert problem is not None and "loopback" in problem
