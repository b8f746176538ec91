"""LoadBalancer source ranges in the userspace proxy: the Service's own LB IP is an
allowed source when a range holds the node's primary IP (upstream's firewall rule).

The node reaching an LB IP that sits on its ``lo`` has that IP as its source, so a
range naming the node would otherwise refuse the node itself. Real TCP connections and
UDP datagrams in the namespace topology of :mod:`kpy.testing.netns` (the node holds
172.18.0.50 on ``lo``; 192.168.50.2 is its primary IP); the table render is checked
without namespaces.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from collections.abc import Iterator
from dataclasses import replace

import pytest
from kpy_userspace import UserspaceBackend, render

from kpy.core.backend import BackendConfig
from kpy.core.model import NodeInfo, Plan
from kpy.testing import builders as b
from kpy.testing.netns import NODE_IP, POD_A, Topology, tcp, topology, udp
from kpy.testing.packets import NODE, config_for

LB_IP = "172.18.0.50"
DROPPED = 1.0  # seconds a connection attempt is given before it counts as dropped


def _plan(ranges: tuple[str, ...], node: NodeInfo = NODE, protocol: str = "TCP") -> Plan:
    svc = b.service(
        "lb" if protocol == "TCP" else "lb-udp",
        cluster_ip="10.96.0.12" if protocol == "TCP" else "10.96.0.13",
        port=8000,
        protocol=protocol,
        type="LoadBalancer",
        node_port=30081 if protocol == "TCP" else 30082,
        lb_ips=[LB_IP],
        source_ranges=ranges,
    )
    return b.plan([b.state(svc, [b.endpoint(POD_A)], node)], node_info=node)


def _ranges(ranges: tuple[str, ...], primary: tuple[str, ...]) -> set[str]:
    (state,) = _plan(ranges).services.values()
    primary_ips = tuple(ipaddress.ip_address(ip) for ip in primary)
    table = render.port_table(state, primary_ips=primary_ips)
    assert table is not None
    (lb,) = [fe for fe in table.frontends if fe.key.address == LB_IP]
    return {str(r) for r in lb.source_ranges}


def test_the_lb_ip_is_an_allowed_source_only_when_a_range_holds_the_primary_ip() -> None:
    assert _ranges(("192.168.50.0/24",), (NODE_IP,)) == {"192.168.50.0/24", f"{LB_IP}/32"}
    assert _ranges(("198.51.100.0/24",), (NODE_IP,)) == {"198.51.100.0/24"}
    assert _ranges(("192.168.50.0/24",), ()) == {"192.168.50.0/24"}  # no primary IP known
    assert _ranges(("172.18.0.0/16", f"{NODE_IP}/32"), (NODE_IP,)) == {
        "172.18.0.0/16",
        f"{NODE_IP}/32",
    }  # a range holding the LB IP already: not repeated


def test_the_dry_run_lists_the_lb_ip_among_the_sources() -> None:
    config = BackendConfig(node_name=NODE.name, node_ips=(ipaddress.ip_address(NODE_IP),))
    backend = UserspaceBackend(config)
    try:
        text = asyncio.run(backend.dry_run(_plan((f"{NODE_IP}/32",))))
    finally:
        backend.close()
    (line,) = [ln for ln in text.splitlines() if f" {LB_IP}:8000/" in ln]
    assert line.endswith(f" from {NODE_IP}/32,{LB_IP}/32"), line


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    with topology("kpy-uslb") as t:
        yield t


@pytest.fixture
def backend(topo: Topology) -> Iterator[UserspaceBackend]:
    backend = UserspaceBackend(config_for(topo))
    try:
        yield backend
    finally:
        asyncio.run(backend.cleanup())


def dropped(netns: str, host: str, port: int, *, source: str | None = None) -> bool:
    try:
        tcp(netns, host, port, source=source, timeout=DROPPED)
    except TimeoutError:
        return True
    return False


@pytest.mark.root
def test_the_node_reaches_its_lb_ip_when_a_range_holds_it(
    topo: Topology, backend: UserspaceBackend
) -> None:
    asyncio.run(backend.apply(_plan((f"{NODE_IP}/32",))))
    # the node's connection leaves from the LB IP on lo: the LB IP is let in
    assert tcp(topo.node, LB_IP, 8000).startswith("pod-a ")
    assert tcp(topo.node, LB_IP, 8000, source=NODE_IP).startswith("pod-a ")
    assert dropped(topo.client, LB_IP, 8000), "a client outside the range is dropped"
    # a range without the node: the LB IP is a source like any other
    asyncio.run(backend.apply(_plan(("198.51.100.0/24",))))
    assert dropped(topo.node, LB_IP, 8000)


@pytest.mark.root
def test_udp_from_the_lb_ip_is_let_in(topo: Topology, backend: UserspaceBackend) -> None:
    asyncio.run(backend.apply(_plan((f"{NODE_IP}/32",), protocol="UDP")))
    assert udp(topo.node, LB_IP, 8000).startswith("pod-a ")
    asyncio.run(backend.apply(_plan(("198.51.100.0/24",), protocol="UDP")))
    with pytest.raises(TimeoutError):
        udp(topo.node, LB_IP, 8000, timeout=DROPPED)


@pytest.mark.root
def test_a_new_primary_ip_re_renders_every_port(topo: Topology) -> None:
    """Without a configured node IP the primary IP is the Node's first address: when it
    changes, a partial sync becomes a full one, re-rendering every ranged frontend."""
    backend = UserspaceBackend(replace(config_for(topo), node_ips=()))
    try:
        moved = b.node("node-a", addresses=["192.168.60.2"])
        asyncio.run(backend.apply(_plan((f"{NODE_IP}/32",), node=moved)))
        assert dropped(topo.node, LB_IP, 8000), "the Node's primary IP is outside the range"
        (state,) = _plan((f"{NODE_IP}/32",)).services.values()
        partial = b.plan([state], node_info=NODE, full_sync=False, changed=[])
        assert asyncio.run(backend.apply(partial)).full_sync
        assert tcp(topo.node, LB_IP, 8000).startswith("pod-a ")
    finally:
        asyncio.run(backend.cleanup())
