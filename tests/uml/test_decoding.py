"""The IPVS backend's readers decode what they are given: virtual services and real
servers as the kernel reports them (addresses in a 16-byte ``nf_inet_addr``, extra
attributes such as statistics around them), and the attribute walk stops at a truncated
attribute instead of reading past its message (host test, no kernel)."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from kpy_ipvs import apply, render
from kpy_ipvs.render import DestKey, VirtualKey, VirtualService

from kpy.core.model import Protocol
from kpy.kernel import netlink

_nla = netlink.attr


def _inner(attr: bytes) -> bytes:
    """The payload of one (nested) attribute."""
    size, _ = struct.unpack_from("=HH", attr)
    return attr[4:size]


@pytest.mark.parametrize("addr", ["10.96.0.10", "fd00::10"])
@pytest.mark.parametrize("persistence", [0, 10800])
def test_service_round_trip(addr: str, persistence: int) -> None:
    key = VirtualKey(address=ipaddress.ip_address(addr), port=8443, protocol=Protocol.UDP)
    settings = VirtualService(scheduler="wrr", persistence=persistence)
    body = _inner(apply.encode_service(key, settings))
    assert apply._decode_service(body, 0, len(body)) == (key, settings)


@pytest.mark.parametrize("version", [4, 6])
def test_fwmark_service_round_trip(version: int) -> None:
    key = render.fwmark_key(0x30000, version)
    settings = VirtualService(scheduler="rr", persistence=0)
    body = _inner(apply.encode_service(key, settings))
    assert apply._decode_service(body, 0, len(body)) == (key, settings)


def test_service_as_the_kernel_reports_it() -> None:
    body = (
        _nla(1, struct.pack("=H", socket.AF_INET))  # AF
        + _nla(2, struct.pack("=H", socket.IPPROTO_TCP))  # PROTOCOL
        + _nla(3, ipaddress.ip_address("10.96.0.10").packed + bytes(12))  # ADDR, 16 bytes
        + _nla(4, struct.pack("!H", 80))  # PORT
        + _nla(6, b"rr\0")  # SCHED_NAME
        + _nla(7, struct.pack("=II", 0, 0xFFFFFFFF))  # FLAGS: not persistent
        + _nla(8, struct.pack("=I", 300))  # TIMEOUT, ignored without PERSISTENT
        + _nla(10 | 0x8000, _nla(1, struct.pack("=I", 7)))  # STATS (nested), skipped
    )
    key = VirtualKey(address=ipaddress.ip_address("10.96.0.10"), port=80, protocol=Protocol.TCP)
    assert apply._decode_service(b"xx" + body + b"yy", 2, 2 + len(body)) == (
        key,
        VirtualService(scheduler="rr", persistence=0),
    )


@pytest.mark.parametrize("addr", ["10.244.1.2", "fd00:244::2"])
def test_real_server_as_the_kernel_reports_it(addr: str) -> None:
    address = ipaddress.ip_address(addr)
    virtual = VirtualKey(address=address, port=80, protocol=Protocol.TCP)  # any service
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    body = (
        _nla(1, address.packed + bytes(16 - len(address.packed)))  # ADDR, 16 bytes
        + _nla(2, struct.pack("!H", 8080))  # PORT
        + _nla(3, struct.pack("=I", 0))  # FWD_METHOD
        + _nla(4, struct.pack("=I", 3))  # WEIGHT
        + _nla(7, struct.pack("=I", 5))  # ACTIVE_CONNS
        + _nla(8, struct.pack("=I", 9))  # INACT_CONNS
        + _nla(11, struct.pack("=H", family))  # ADDR_FAMILY
    )
    key, status = apply._decode_dest(virtual, body, 0, len(body))
    assert key == DestKey(virtual=virtual, address=address, port=8080)
    assert (status.weight, status.active, status.inactive) == (3, 5, 9)


def test_the_attribute_walk_stops_at_a_truncated_attribute() -> None:
    whole = _nla(1, b"abcd") + _nla(2, b"efgh")
    assert [k for k, _, _ in list(netlink.attrs(whole, 0, len(whole)))] == [1, 2]
    assert [k for k, _, _ in netlink.attrs(whole, 0, len(whole) - 1)] == [1]
    counters = _nla(4, b"abcd") + _nla(7, b"efgh")  # WEIGHT, ACTIVE_CONNS only
    with pytest.raises(apply.KernelError, match="without address or port"):
        apply._decode_dest(render.fwmark_key(1, 4), counters, 0, len(counters))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MASQ", "10.96.0.10,tcp:80"),
        ("MASQ", "fd00::10,udp:53"),
        ("LOOPBACK", "10.244.1.2,sctp:8080,10.244.1.2"),
        ("ALLOWED", "172.18.0.10,tcp:80,192.168.0.0/16"),
        ("ALLOWED", "172.18.0.10,tcp:80,192.168.1.7"),  # a host network: render.net_text
        ("SHORT", "172.18.0.10,tcp:80 skbmark 0x30000/0xffff0000"),
    ],
)
def test_set_element_round_trip(name: str, value: str) -> None:
    """An element read back from a set listing is the text render wrote for it."""
    version = 6 if ":" in value.split(",")[0] else 4
    el = render.Element(set=render.set_name(name, version), value=value)
    message = apply.encode_element(el)
    data = {k: (s, e) for k, s, e in list(netlink.attrs(message, 4, len(message)))}[7]  # DATA
    kinds = apply.SET_TYPES[el.set].split(",")
    assert apply._decode_element(kinds, message, *data) == value
