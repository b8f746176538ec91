"""Real packets through the iptables backend's rules, in both flavours.

A small topology of network namespaces, created here and deleted afterwards:

* ``node``: the node whose rules kpy programs. A bridge ``br0`` (10.244.1.1/24,
  fd00:244:1::1/64) for its pods, ``vc`` (192.168.50.2/24, the node address) towards
  the client; forwarding and bridge netfilter on.
* ``pod-a`` (10.244.1.5, fd00:244:1::5) and ``pod-b`` (10.244.1.6, fd00:244:1::6) on the
  bridge. Each runs echo servers (TCP and UDP, port 8080, both families) that answer
  ``"<pod-name> <client-ip>"`` and then echo what they receive.
* the node holds the LoadBalancer IP 172.18.0.50 on ``lo`` with its own echo server on
  port 80, so traffic that escapes the source-range filter gets an answer.
* ``client``: outside the cluster, 192.168.50.10/24 and 203.0.113.7/24, routing Service
  addresses through the node.

pod-a is this node's endpoint; pod-b is labelled as node-b's (the kernel does not care
where a pod is, the model does: that is what externalTrafficPolicy Local looks at).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from kpy_iptables import IptablesBackend

from kpy.backend import BackendConfig
from kpy.model import Endpoint, ServicePortState
from kpy.netns_socket import run_in_netns
from kpy.testing import builders as b
from tests.conftest import require_root

pytestmark = pytest.mark.root

NODE_IP = "192.168.50.2"
CLIENT_IP = "192.168.50.10"
OUTSIDE_IP = "203.0.113.7"
POD_A, POD_B = "10.244.1.5", "10.244.1.6"
POD_A6, POD_B6 = "fd00:244:1::5", "fd00:244:1::6"
NODE = b.node("node-a", addresses=[NODE_IP])


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


def ns_sysctl(netns: str, key: str, value: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", netns, "sysctl", "-qw", f"{key}={value}"],
        check=True,
        capture_output=True,
    )


@dataclass
class EchoServers:
    """TCP and UDP echo servers in one pod namespace, served by threads of this process."""

    name: str
    netns: str
    port: int = 8080
    sockets: list[socket.socket] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        def make() -> list[socket.socket]:
            tcp = socket.create_server(
                ("::", self.port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=256
            )
            udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            udp.bind(("::", self.port))
            return [tcp, udp]

        self.sockets = run_in_netns(self.netns, make)
        for target in (self._tcp, self._udp):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self.threads.append(thread)

    @staticmethod
    def _peer(address: str) -> str:
        return address.removeprefix("::ffff:")

    def _tcp(self) -> None:
        server = self.sockets[0]
        while True:
            try:
                conn, peer = server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True).start()

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        with contextlib.suppress(OSError), conn:
            conn.sendall(f"{self.name} {self._peer(peer[0])}\n".encode())
            while data := conn.recv(4096):
                conn.sendall(data)

    def _udp(self) -> None:
        server = self.sockets[1]
        while True:
            try:
                _, peer = server.recvfrom(4096)
                if not peer:  # shut down
                    return
                server.sendto(f"{self.name} {self._peer(peer[0])}\n".encode(), peer)
            except OSError:
                return

    def stop(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self.threads:
            thread.join(timeout=2)


@dataclass
class Topology:
    node: str
    client: str
    pods: dict[str, str]


_counter = iter(range(1_000_000))


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    require_root()
    tag = f"{os.getpid()}-{next(_counter)}"
    names = {role: f"kpy-iptp-{role}-{tag}" for role in ("node", "client", "pod-a", "pod-b")}
    servers: list[EchoServers] = []
    created: list[str] = []
    try:
        for netns in names.values():
            ip("netns", "add", netns)
            created.append(netns)
            ip("-n", netns, "link", "set", "lo", "up")
        node, client = names["node"], names["client"]
        ip("-n", node, "link", "add", "br0", "type", "bridge")
        ip("-n", node, "addr", "add", "10.244.1.1/24", "dev", "br0")
        ip("-n", node, "addr", "add", "fd00:244:1::1/64", "dev", "br0", "nodad")
        ip("-n", node, "link", "set", "br0", "up")
        for pod, v4, v6 in (("pod-a", POD_A, POD_A6), ("pod-b", POD_B, POD_B6)):
            pns = names[pod]
            veth = f"v{pod[-1]}"
            ip(
                "-n",
                node,
                "link",
                "add",
                veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                pns,
            )
            ip("-n", node, "link", "set", veth, "master", "br0", "up")
            # a pod reaching itself through a Service leaves the port it came in by
            ip("-n", node, "link", "set", veth, "type", "bridge_slave", "hairpin", "on")
            ip("-n", pns, "addr", "add", f"{v4}/24", "dev", "eth0")
            ip("-n", pns, "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
            ip("-n", pns, "link", "set", "eth0", "up")
            ip("-n", pns, "route", "add", "default", "via", "10.244.1.1")
            ip("-n", pns, "-6", "route", "add", "default", "via", "fd00:244:1::1")
        ip("-n", node, "link", "add", "vc", "type", "veth", "peer", "name", "eth0", "netns", client)
        ip("-n", node, "addr", "add", f"{NODE_IP}/24", "dev", "vc")
        ip("-n", node, "link", "set", "vc", "up")
        ip("-n", node, "route", "add", "203.0.113.0/24", "via", CLIENT_IP)
        ip("-n", node, "route", "add", "default", "via", CLIENT_IP)
        ip("-n", node, "-6", "route", "add", "fd00:96::/64", "dev", "br0")
        ip("-n", client, "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0")
        ip("-n", client, "addr", "add", f"{OUTSIDE_IP}/24", "dev", "eth0")
        ip("-n", client, "link", "set", "eth0", "up")
        ip("-n", client, "route", "add", "default", "via", NODE_IP)
        ns_sysctl(node, "net.ipv4.ip_forward", "1")
        ns_sysctl(node, "net.ipv6.conf.all.forwarding", "1")
        ns_sysctl(node, "net.bridge.bridge-nf-call-iptables", "1")
        ns_sysctl(node, "net.bridge.bridge-nf-call-ip6tables", "1")
        # Something answers on the LoadBalancer IP if a packet reaches the node undNATed
        # and is not dropped: a source-range test then fails instead of timing out.
        ip("-n", node, "addr", "add", "172.18.0.50/32", "dev", "lo")
        bystander = EchoServers("node", node, port=80)
        bystander.start()
        servers.append(bystander)
        for pod in ("pod-a", "pod-b"):
            server = EchoServers(pod, names[pod])
            server.start()
            servers.append(server)
        yield Topology(
            node=node, client=client, pods={"pod-a": names["pod-a"], "pod-b": names["pod-b"]}
        )
    finally:
        for server in servers:
            server.stop()
        for netns in created:
            subprocess.run(["ip", "netns", "del", netns], check=False)


# --- clients ------------------------------------------------------------------------------


def _socket(netns: str, family: int, kind: int, source: str | None) -> socket.socket:
    def make() -> socket.socket:
        sock = socket.socket(family, kind)
        if source is not None:
            sock.bind((source, 0))
        return sock

    return run_in_netns(netns, make)


def tcp(
    netns: str, host: str, port: int, *, source: str | None = None, timeout: float = 2.0
) -> str:
    """The greeting of a TCP server reached from ``netns``; raises OSError on failure."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with _socket(netns, family, socket.SOCK_STREAM, source) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        return sock.makefile().readline().strip()


def udp(netns: str, host: str, port: int, *, timeout: float = 2.0) -> str:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with _socket(netns, family, socket.SOCK_DGRAM, None) as sock:
        sock.settimeout(timeout)
        sock.sendto(b"hello", (host, port))
        return sock.recv(4096).decode().strip()


# --- the Services under test --------------------------------------------------------------


def local_and_remote(*, ipv6: bool = False) -> list[Endpoint]:
    a, b_ = (POD_A6, POD_B6) if ipv6 else (POD_A, POD_B)
    return [b.endpoint(a, node="node-a"), b.endpoint(b_, node="node-b")]


def states() -> list[ServicePortState]:
    return [
        b.state(b.service("web", cluster_ip="10.96.0.10"), local_and_remote(), NODE),
        b.state(
            b.service("np", cluster_ip="10.96.0.11", type="NodePort", node_port=30080),
            local_and_remote(),
            NODE,
        ),
        b.state(
            b.service(
                "lb",
                cluster_ip="10.96.0.12",
                type="LoadBalancer",
                node_port=30081,
                lb_ips=["172.18.0.50"],
                source_ranges=["192.168.50.0/24"],
            ),
            [b.endpoint(POD_A)],
            NODE,
        ),
        b.state(
            b.service(
                "local", cluster_ip="10.96.0.13", type="NodePort", node_port=30082, etp_local=True
            ),
            local_and_remote(),
            NODE,
        ),
        b.state(
            b.service(
                "remote", cluster_ip="10.96.0.20", type="NodePort", node_port=30083, etp_local=True
            ),
            [b.endpoint(POD_B, node="node-b")],
            NODE,
        ),
        b.state(
            b.service("ext", cluster_ip="10.96.0.14", external_ips=["192.0.2.10"]),
            [b.endpoint(POD_B, node="node-b")],
            NODE,
        ),
        b.state(
            b.service("sticky", cluster_ip="10.96.0.15", affinity=True, affinity_timeout=60),
            local_and_remote(),
            NODE,
        ),
        b.state(
            b.service("empty", cluster_ip="10.96.0.16", type="NodePort", node_port=30084), [], NODE
        ),
        b.state(
            b.service("dns", cluster_ip="10.96.0.17", port=53, protocol="UDP", port_name_="dns"),
            [b.endpoint(POD_B, node="node-b")],
            NODE,
        ),
        b.state(b.service("v6", cluster_ip="fd00:96::18"), local_and_remote(ipv6=True), NODE),
    ]


@pytest.fixture(params=["nft", "legacy"])
def programmed(request: pytest.FixtureRequest, topology: Topology) -> Iterator[IptablesBackend]:
    config = BackendConfig(
        node_name="node-a",
        node_ips=(ipaddress.ip_address(NODE_IP),),
        cluster_cidrs=(ipaddress.ip_network("10.244.0.0/16"),),
        netns=topology.node,
        options=(("iptables_mode", request.param),),
    )
    backend = IptablesBackend(config)
    asyncio.run(backend.apply(b.plan(states(), node_info=NODE)))
    try:
        yield backend
    finally:
        asyncio.run(backend.cleanup())


def names(replies: list[str]) -> Counter[str]:
    return Counter(r.split()[0] for r in replies)


# --- the tests ----------------------------------------------------------------------------


def test_cluster_ip_from_a_pod_and_from_the_node(
    topology: Topology, programmed: IptablesBackend
) -> None:
    from_pod = [tcp(topology.pods["pod-a"], "10.96.0.10", 80) for _ in range(30)]
    assert set(names(from_pod)) == {"pod-a", "pod-b"}  # hairpin to itself included
    for reply in from_pod:  # pod-to-pod traffic keeps the pod's address, hairpin is masqueraded
        assert reply in {"pod-b 10.244.1.5", "pod-a 10.244.1.1"}
    from_node = [tcp(topology.node, "10.96.0.10", 80) for _ in range(30)]
    assert set(names(from_node)) == {"pod-a", "pod-b"}


def test_nodeport_from_outside_is_masqueraded(
    topology: Topology, programmed: IptablesBackend
) -> None:
    replies = [tcp(topology.client, NODE_IP, 30080) for _ in range(30)]
    assert set(names(replies)) == {"pod-a", "pod-b"}
    assert {r.split()[1] for r in replies} == {"10.244.1.1"}  # the node's address on br0
    assert CLIENT_IP not in " ".join(replies)


def test_load_balancer_ip_honours_source_ranges(
    topology: Topology, programmed: IptablesBackend
) -> None:
    assert tcp(topology.client, "172.18.0.50", 80).startswith("pod-a ")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        tcp(topology.client, "172.18.0.50", 80, source=OUTSIDE_IP, timeout=1.0)
    assert time.monotonic() - started >= 0.9  # dropped, not rejected
    assert tcp(topology.client, NODE_IP, 30081).startswith("pod-a ")  # NodePort not filtered


def test_external_ip(topology: Topology, programmed: IptablesBackend) -> None:
    assert tcp(topology.client, "192.0.2.10", 80).startswith("pod-b ")


def test_no_endpoints_is_refused_at_once(topology: Topology, programmed: IptablesBackend) -> None:
    for netns, host, port in (
        (topology.pods["pod-a"], "10.96.0.16", 80),
        (topology.node, "10.96.0.16", 80),
        (topology.client, NODE_IP, 30084),
    ):
        started = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            tcp(netns, host, port)
        assert time.monotonic() - started < 0.5


def test_external_policy_local_keeps_the_client_address(
    topology: Topology, programmed: IptablesBackend
) -> None:
    replies = {tcp(topology.client, NODE_IP, 30082) for _ in range(20)}
    assert replies == {f"pod-a {CLIENT_IP}"}
    # from inside the cluster the Service still reaches every endpoint
    inside = {tcp(topology.pods["pod-a"], "10.96.0.13", 80).split()[0] for _ in range(30)}
    assert inside == {"pod-a", "pod-b"}


def test_external_policy_local_drops_without_a_local_endpoint(
    topology: Topology, programmed: IptablesBackend
) -> None:
    with pytest.raises(TimeoutError):
        tcp(topology.client, NODE_IP, 30083, timeout=1.0)
    # pods still reach it (short-circuited to the cluster-wide chain)
    assert tcp(topology.pods["pod-a"], "10.96.0.20", 80).startswith("pod-b ")


def test_session_affinity_sticks(topology: Topology, programmed: IptablesBackend) -> None:
    replies = {tcp(topology.node, "10.96.0.15", 80).split()[0] for _ in range(25)}
    assert len(replies) == 1


def test_new_connections_spread_over_the_endpoints(
    topology: Topology, programmed: IptablesBackend
) -> None:
    counts = names([tcp(topology.node, "10.96.0.10", 80) for _ in range(200)])
    assert set(counts) == {"pod-a", "pod-b"}
    assert min(counts.values()) > 60, counts  # 100 expected each; 60 is > 5 sigma away


def test_udp_cluster_ip(topology: Topology, programmed: IptablesBackend) -> None:
    assert udp(topology.pods["pod-a"], "10.96.0.17", 53) == f"pod-b {POD_A}"


def test_ipv6_cluster_ip(topology: Topology, programmed: IptablesBackend) -> None:
    replies = {tcp(topology.pods["pod-a"], "fd00:96::18", 80) for _ in range(30)}
    assert {r.split()[0] for r in replies} == {"pod-a", "pod-b"}
    assert f"pod-b {POD_A6}" in replies


def test_dump_counts_packets_per_endpoint(topology: Topology, programmed: IptablesBackend) -> None:
    for _ in range(5):
        tcp(topology.client, "192.0.2.10", 80)
    view = asyncio.run(programmed.observe()).services["default/ext:http/TCP"]
    assert view.frontends == ("10.96.0.14:80/TCP", "192.0.2.10:80/TCP")
    assert view.endpoints == (f"{POD_B}:8080",)
    assert int(view.extra[f"packets {POD_B}:8080"]) >= 5


def test_restart_adopts_without_dropping_connections(
    topology: Topology, programmed: IptablesBackend
) -> None:
    family = socket.AF_INET
    held = _socket(topology.client, family, socket.SOCK_STREAM, None)
    with held:
        held.settimeout(2)
        held.connect((NODE_IP, 30080))
        reader = held.makefile("rb")
        greeting = reader.readline()
        assert greeting
        failures: list[BaseException] = []
        stop = threading.Event()

        def keep_connecting() -> None:
            while not stop.is_set():
                try:
                    tcp(topology.client, NODE_IP, 30080)
                except OSError as exc:
                    failures.append(exc)

        worker = threading.Thread(target=keep_connecting)
        worker.start()
        try:
            restarted = IptablesBackend(programmed.config)
            result = asyncio.run(restarted.apply(b.plan(states(), node_info=NODE)))
            time.sleep(0.2)
        finally:
            stop.set()
            worker.join()
        assert result.ops == 0
        assert not failures
        held.sendall(b"still there\n")
        assert reader.readline() == b"still there\n"
