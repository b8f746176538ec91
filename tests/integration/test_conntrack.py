"""Stale UDP conntrack entries, with real datagrams through namespaces.

client ns (10.77.0.1) ── veth ── node ns (10.77.0.2 | 10.78.0.1, DNAT by nft) ── veth ──
pods ns (endpoint A 10.78.0.2, endpoint B 10.78.0.3)

The client keeps one UDP socket (one source port), as a DNS resolver does. After the
DNAT rule moves from A to B the client's datagrams still go to A — the conntrack entry
made by its first datagram wins — until the cleaner deletes the stale entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from kpy.agent.conntrack import ConntrackCleaner
from kpy.core.backend import ApplyResult
from kpy.core.model import Protocol, StaleFlow
from kpy.kernel import netns as netns_socket
from kpy.testing import builders as b
from tests.conftest import require_root

VIP = "10.96.0.53"
NODE_IP = "10.77.0.2"
A, B = "10.78.0.2", "10.78.0.3"


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


@dataclass
class Topology:
    client: str
    node: str
    pods: str

    def nft(self, script: str) -> None:
        subprocess.run(
            ["ip", "netns", "exec", self.node, "nft", "-f", "-"],
            input=script,
            check=True,
            text=True,
        )

    def dnat(self, endpoint: str) -> None:
        self.nft(
            "flush table ip kpytest\n"
            "table ip kpytest {\n"
            "  chain pre { type nat hook prerouting priority -100;\n"
            f"    ip daddr {VIP} udp dport 53 dnat to {endpoint}:5353\n"
            f"    ip daddr {NODE_IP} udp dport 30053 dnat to {endpoint}:5353\n"
            "  }\n"
            "}\n"
        )

    def entries(self) -> str:
        return sh("ip", "netns", "exec", self.node, "conntrack", "-L", "-p", "udp")


@pytest.fixture
def topology() -> Iterator[Topology]:
    require_root()
    tag = f"kpy-ct{os.getpid()}"
    t = Topology(client=f"{tag}-c", node=f"{tag}-n", pods=f"{tag}-p")
    try:
        for ns in (t.client, t.node, t.pods):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh(
            "ip",
            "link",
            "add",
            "kc0",
            "netns",
            t.client,
            "type",
            "veth",
            "peer",
            "kn0",
            "netns",
            t.node,
        )
        sh(
            "ip",
            "link",
            "add",
            "kp0",
            "netns",
            t.pods,
            "type",
            "veth",
            "peer",
            "kn1",
            "netns",
            t.node,
        )
        for ns, dev, addr in (
            (t.client, "kc0", "10.77.0.1/24"),
            (t.node, "kn0", f"{NODE_IP}/24"),
            (t.node, "kn1", "10.78.0.1/24"),
            (t.pods, "kp0", f"{A}/24"),
            (t.pods, "kp0", f"{B}/24"),
        ):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", t.client, "route", "add", "default", "via", NODE_IP)
        sh("ip", "-n", t.pods, "route", "add", "default", "via", "10.78.0.1")
        sh("ip", "netns", "exec", t.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        t.nft("table ip kpytest {}\n")
        yield t
    finally:
        for ns in (t.client, t.node, t.pods):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def udp_socket(netns: str, address: str, port: int) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((address, port))
        s.settimeout(2.0)
        return s

    return netns_socket.run_in_netns(netns, make)


def which_endpoint(
    client: socket.socket, servers: dict[str, socket.socket], dst: tuple[str, int], payload: bytes
) -> str:
    """Send one datagram; the endpoint that received it answers, the client reads the answer."""
    client.sendto(payload, dst)
    for name, server in servers.items():
        server.settimeout(0.3)
        try:
            data, peer = server.recvfrom(100)
        except TimeoutError:
            continue
        assert data == payload
        server.sendto(name.encode(), peer)
        answer, _ = client.recvfrom(100)
        assert answer == name.encode()  # the reply made it back through the reverse NAT
        return name
    raise AssertionError("no endpoint received the datagram")


@contextlib.contextmanager
def endpoints_and_client(
    topology: Topology, client_port: int
) -> Iterator[tuple[dict[str, socket.socket], socket.socket]]:
    """UDP servers on both endpoints (port 5353) and a client socket; closed after."""
    servers = {A: udp_socket(topology.pods, A, 5353), B: udp_socket(topology.pods, B, 5353)}
    client = udp_socket(topology.client, "10.77.0.1", client_port)
    try:
        yield servers, client
    finally:
        client.close()
        for s in servers.values():
            s.close()


def test_stale_udp_entries_are_deleted_so_the_client_moves_on(topology: Topology) -> None:
    with endpoints_and_client(topology, 40000) as (servers, client):
        topology.dnat(A)
        assert which_endpoint(client, servers, (VIP, 53), b"1") == A
        entries = topology.entries()
        assert f"dst={VIP}" in entries and f"src={A}" in entries
        topology.dnat(B)  # the rules now say B ...
        assert which_endpoint(client, servers, (VIP, 53), b"2") == A  # ... conntrack says A

        cleaner = ConntrackCleaner(netns=topology.node)
        plan = b.plan([])
        plan = type(plan)(
            node=plan.node,
            services=plan.services,
            stale_flows=(
                StaleFlow(
                    protocol=Protocol.UDP,
                    destination=ipaddress.ip_address(VIP),
                    port=53,
                    endpoint=ipaddress.ip_address(A),
                ),
            ),
        )

        async def clean() -> None:
            task = asyncio.create_task(cleaner.run())
            cleaner.plan_applied(plan, ApplyResult(full_sync=False, ops=1), 0.0)
            await asyncio.wait_for(cleaner.idle(), 10)
            task.cancel()

        asyncio.run(clean())
        assert cleaner.deleted == 1 and cleaner.failed == 0
        assert f"src={A}" not in topology.entries()
        assert which_endpoint(client, servers, (VIP, 53), b"3") == B


def test_nodeport_flows_without_destination_and_nothing_to_delete(topology: Topology) -> None:
    with endpoints_and_client(topology, 40001) as (servers, client):
        topology.dnat(A)
        assert which_endpoint(client, servers, (NODE_IP, 30053), b"1") == A
        topology.dnat(B)
        cleaner = ConntrackCleaner(netns=topology.node)
        nodeport = StaleFlow(protocol=Protocol.UDP, destination=None, port=30053)
        nothing = StaleFlow(
            protocol=Protocol.UDP, destination=ipaddress.ip_address("10.96.9.9"), port=53
        )
        outcomes = asyncio.run(cleaner.clean([nodeport, nothing]))
        # NodePort: IPv4 and IPv6 are both cleaned; "0 flow entries" is not an error.
        assert sorted(
            (str(o.flow.destination), o.family, o.deleted, o.error) for o in outcomes
        ) == [
            ("10.96.9.9", "ipv4", 0, None),
            ("None", "ipv4", 1, None),
            ("None", "ipv6", 0, None),
        ]
        assert which_endpoint(client, servers, (NODE_IP, 30053), b"2") == B


def test_missing_namespace_is_a_reported_failure() -> None:
    require_root()
    cleaner = ConntrackCleaner(netns=f"kpy-absent{os.getpid()}")

    flow = StaleFlow(protocol=Protocol.UDP, destination=ipaddress.ip_address(VIP), port=53)
    [outcome] = asyncio.run(cleaner.clean([flow]))
    assert outcome.error is not None and cleaner.failed == 1
