"""The IPVS backend's hand-made netlink messages decode, with pyroute2's own parser, to
the same attributes pyroute2 itself sends for the same object (host test, no kernel)."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest
from kpy_ipvs import apply, render
from kpy_ipvs.render import DestKey, VirtualKey, VirtualService
from pyroute2 import IPVSDest, IPVSService
from pyroute2.netlink.generic import ipvs
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg

from kpy.core.model import Protocol
from kpy.kernel import netlink


def _decode(attrs: bytes) -> dict[str, Any]:
    header = netlink.HEADER.pack(netlink.HEADER.size + 4 + len(attrs), 30, 1, 1, 0)
    msg = ipvs.ipvsmsg(header + bytes([1, 1, 0, 0]) + attrs)
    msg.decode()
    out = {}
    for name in ("IPVS_CMD_ATTR_SERVICE", "IPVS_CMD_ATTR_DEST"):
        nested = msg.get_attr(name)
        if nested is not None:
            out[name] = {k: v for k, v in nested["attrs"]}
    return out


def _pyroute2(service: IPVSService, dest: IPVSDest | None = None, *, key: bool) -> dict[str, Any]:
    msg = ipvs.ipvsmsg()
    msg["cmd"], msg["version"] = 1, 1
    msg["attrs"] = [("IPVS_CMD_ATTR_SERVICE", service.dump_key() if key else service.dump_nla())]
    if dest is not None:
        msg["attrs"].append(("IPVS_CMD_ATTR_DEST", dest.dump_nla()))
    msg["header"]["type"] = 30
    msg.encode()
    return _decode(bytes(msg.data[netlink.HEADER.size + 4 : msg["header"]["length"]]))


@pytest.mark.parametrize("addr", ["10.96.0.10", "fd00::10"])
@pytest.mark.parametrize("persistence", [0, 10800])
def test_service_matches_pyroute2(addr: str, persistence: int) -> None:
    key = VirtualKey(address=ipaddress.ip_address(addr), port=80, protocol=Protocol.TCP)
    settings = VirtualService(scheduler="rr", persistence=persistence)
    v6 = key.address.version == 6
    theirs = IPVSService(
        addr=addr,
        port=80,
        protocol=socket.IPPROTO_TCP,
        sched_name="rr",
        timeout=persistence,
        flags={"flags": apply.PERSISTENT if persistence else 0, "mask": apply.PERSISTENT},
        **({"af": socket.AF_INET6, "netmask": "128.0.0.0"} if v6 else {}),
    )
    assert _decode(apply.encode_service(key, settings)) == _pyroute2(theirs, key=False)


@pytest.mark.parametrize("version", [4, 6])
def test_fwmark_service_decodes(version: int) -> None:
    """A short-circuit virtual service is keyed by family and mark alone."""
    key = render.fwmark_key(0xE1600000, version)
    attrs = _decode(apply.encode_service(key, VirtualService(scheduler="rr")))
    service = attrs["IPVS_CMD_ATTR_SERVICE"]
    assert service["IPVS_SVC_ATTR_AF"] == (socket.AF_INET6 if version == 6 else socket.AF_INET)
    assert service["IPVS_SVC_ATTR_FWMARK"] == 0xE1600000
    assert service["IPVS_SVC_ATTR_SCHED_NAME"] == "rr"
    assert not {"IPVS_SVC_ATTR_ADDR", "IPVS_SVC_ATTR_PORT", "IPVS_SVC_ATTR_PROTOCOL"} & set(service)


@pytest.mark.parametrize("addr", ["10.244.1.5", "fd00:244::5"])
def test_dest_matches_pyroute2(addr: str) -> None:
    virtual = VirtualKey(address=ipaddress.ip_address("10.96.0.10"), port=53, protocol=Protocol.UDP)
    dest = DestKey(virtual=virtual, address=ipaddress.ip_address(addr), port=5353)
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    theirs = IPVSDest(addr=addr, port=5353, weight=3, fwd_method=0, addr_family=family)
    service = IPVSService(addr="10.96.0.10", port=53, protocol=socket.IPPROTO_UDP)
    mine = _decode(apply.encode_service(virtual) + apply.encode_dest(dest, 3))
    expected = _pyroute2(service, theirs, key=True)
    # pyroute2 also sends the tunnel fields (zero), which masquerading ignores
    for name in ("IPVS_DEST_ATTR_TUN_TYPE", "IPVS_DEST_ATTR_TUN_PORT", "IPVS_DEST_ATTR_TUN_FLAGS"):
        expected["IPVS_CMD_ATTR_DEST"].pop(name, None)
    assert mine == expected


@pytest.mark.parametrize(("addr", "prefix"), [("10.96.0.10", 32), ("fd00::10", 128)])
def test_address_decodes(addr: str, prefix: int) -> None:
    body = apply.encode_address(7, ipaddress.ip_address(addr))
    msg = ifaddrmsg(netlink.HEADER.pack(netlink.HEADER.size + len(body), 20, 1, 1, 0) + body)
    msg.decode()
    assert (msg["index"], msg["prefixlen"]) == (7, prefix)
    assert msg.get_attr("IFA_LOCAL") == msg.get_attr("IFA_ADDRESS") == addr
