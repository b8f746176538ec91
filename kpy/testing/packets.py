"""Real-packet conformance: the same Services, the same connections, every kernel backend.

Subclass :class:`PacketConformance` and provide a ``make_backend`` fixture returning a
function from :class:`~kpy.core.backend.BackendConfig` to a backend; every test below then
sends real TCP and UDP traffic through the rules that backend programs in the
:mod:`kpy.testing.netns` topology (pod-a is this node's endpoint, pod-b is labelled as
another node's: the kernel does not care where a pod is, the model does).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from kpy.core.backend import Backend, BackendConfig
from kpy.core.model import Endpoint, Plan, Protocol, ServicePort, ServicePortState
from kpy.core.trace import Origin, Packet, Tracer, Verdict
from kpy.testing import builders as b
from kpy.testing.netns import (
    CLIENT_IP,
    NODE_IP,
    OUTSIDE_IP,
    POD_A,
    POD_A6,
    POD_B,
    POD_B6,
    Topology,
    socket_in,
    tcp,
    topology,
    udp,
)

MakeBackend = Callable[[BackendConfig], Backend]
NODE = b.node("node-a", addresses=[NODE_IP])


def config_for(topo: Topology) -> BackendConfig:
    return BackendConfig(
        node_name="node-a",
        node_ips=(ipaddress.ip_address(NODE_IP),),
        cluster_cidrs=(
            ipaddress.ip_network("10.244.0.0/16"),
            ipaddress.ip_network("fd00:244::/32"),
        ),
        netns=topo.node,
    )


@contextlib.contextmanager
def applied(backend: Backend, plan: Plan) -> Iterator[Backend]:
    """``plan`` applied by ``backend``; everything it programmed removed afterwards."""
    asyncio.run(backend.apply(plan))
    try:
        yield backend
    finally:
        asyncio.run(backend.cleanup())


def local_and_remote(*, ipv6: bool = False, port: int = 8080) -> list[Endpoint]:
    """pod-a (this node's endpoint) and pod-b (labelled as node-b's)."""
    a, b_ = (POD_A6, POD_B6) if ipv6 else (POD_A, POD_B)
    return [b.endpoint(a, port, node="node-a"), b.endpoint(b_, port, node="node-b")]


def ranged_lb(name: str) -> ServicePort:
    """LoadBalancer 172.18.0.50 (NodePort 30081) for sources of the node's network only."""
    return b.load_balancer(
        name, "10.96.0.12", 30081, "172.18.0.50", source_ranges=["192.168.50.0/24"]
    )


def remote_only() -> ServicePortState:
    """NodePort 30083 under externalTrafficPolicy Local whose one endpoint (pod-b) is
    on node-b: no endpoint on this node."""
    remote = b.service(
        "remote", cluster_ip="10.96.0.20", type="NodePort", node_port=30083, etp_local=True
    )
    return b.state(remote, [b.endpoint(POD_B, node="node-b")], NODE)


def states() -> list[ServicePortState]:
    return [
        b.state(b.service("web", cluster_ip="10.96.0.10"), local_and_remote(), NODE),
        b.state(
            b.service("np", cluster_ip="10.96.0.11", type="NodePort", node_port=30080),
            local_and_remote(),
            NODE,
        ),
        b.state(ranged_lb("lb"), [b.endpoint(POD_A)], NODE),
        b.state(
            b.service(
                "local", cluster_ip="10.96.0.13", type="NodePort", node_port=30082, etp_local=True
            ),
            local_and_remote(),
            NODE,
        ),
        remote_only(),
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
        b.state(b.service("empty6", cluster_ip="fd00:96::19"), [], NODE),
    ]


def names(replies: list[str]) -> Counter[str]:
    return Counter(r.split()[0] for r in replies)


class PacketConformance:
    """Real traffic through a backend's rules; subclass and provide ``make_backend``."""

    @pytest.fixture(scope="class")
    @classmethod
    def topology(cls) -> Iterator[Topology]:
        if os.geteuid() != 0:
            pytest.skip("needs root for network namespaces")
        with topology() as topo:
            yield topo

    @pytest.fixture
    def programmed(self, topology: Topology, make_backend: MakeBackend) -> Iterator[Backend]:
        with applied(make_backend(config_for(topology)), b.plan(states(), node_info=NODE)) as on:
            yield on

    def test_cluster_ip_from_a_pod_and_from_the_node(
        self, topology: Topology, programmed: Backend
    ) -> None:
        from_pod = [tcp(topology.pods["pod-a"], "10.96.0.10", 80) for _ in range(30)]
        assert set(names(from_pod)) == {"pod-a", "pod-b"}  # hairpin to itself included
        for reply in from_pod:  # pod-to-pod traffic keeps the pod's address, hairpin is masqueraded
            assert reply in {"pod-b 10.244.1.5", "pod-a 10.244.1.1"}
        from_node = [tcp(topology.node, "10.96.0.10", 80) for _ in range(30)]
        assert set(names(from_node)) == {"pod-a", "pod-b"}

    def test_nodeport_from_outside_is_masqueraded(
        self, topology: Topology, programmed: Backend
    ) -> None:
        replies = [tcp(topology.client, NODE_IP, 30080) for _ in range(30)]
        assert set(names(replies)) == {"pod-a", "pod-b"}
        assert {r.split()[1] for r in replies} == {"10.244.1.1"}  # the node's address on br0
        assert CLIENT_IP not in " ".join(replies)

    def test_load_balancer_ip_honours_source_ranges(
        self, topology: Topology, programmed: Backend
    ) -> None:
        assert tcp(topology.client, "172.18.0.50", 80).startswith("pod-a ")
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            tcp(topology.client, "172.18.0.50", 80, source=OUTSIDE_IP, timeout=1.0)
        assert time.monotonic() - started >= 0.9  # dropped, not rejected
        assert tcp(topology.client, NODE_IP, 30081).startswith("pod-a ")  # NodePort not filtered

    def test_external_ip(self, topology: Topology, programmed: Backend) -> None:
        assert tcp(topology.client, "192.0.2.10", 80).startswith("pod-b ")

    def test_no_endpoints_is_refused_at_once(self, topology: Topology, programmed: Backend) -> None:
        for netns, host, port in (
            (topology.pods["pod-a"], "10.96.0.16", 80),
            (topology.node, "10.96.0.16", 80),
            (topology.client, NODE_IP, 30084),
            (topology.pods["pod-a"], "fd00:96::19", 80),  # IPv6 too: not after a retransmit
            (topology.node, "fd00:96::19", 80),
        ):
            started = time.monotonic()
            with pytest.raises(ConnectionRefusedError):
                tcp(netns, host, port)
            assert time.monotonic() - started < 0.5

    def test_external_policy_local_keeps_the_client_address(
        self, topology: Topology, programmed: Backend
    ) -> None:
        replies = {tcp(topology.client, NODE_IP, 30082) for _ in range(20)}
        assert replies == {f"pod-a {CLIENT_IP}"}
        # from inside the cluster the Service still reaches every endpoint
        inside = {tcp(topology.pods["pod-a"], "10.96.0.13", 80).split()[0] for _ in range(30)}
        assert inside == {"pod-a", "pod-b"}

    def test_external_policy_local_drops_without_a_local_endpoint(
        self, topology: Topology, programmed: Backend
    ) -> None:
        with pytest.raises(TimeoutError):
            tcp(topology.client, NODE_IP, 30083, timeout=1.0)
        # pods still reach it (short-circuited to the cluster-wide chain)
        assert tcp(topology.pods["pod-a"], "10.96.0.20", 80).startswith("pod-b ")

    def test_session_affinity_sticks(self, topology: Topology, programmed: Backend) -> None:
        replies = {tcp(topology.node, "10.96.0.15", 80).split()[0] for _ in range(25)}
        assert len(replies) == 1

    def test_new_connections_spread_over_the_endpoints(
        self, topology: Topology, programmed: Backend
    ) -> None:
        counts = names([tcp(topology.node, "10.96.0.10", 80) for _ in range(200)])
        assert set(counts) == {"pod-a", "pod-b"}
        assert min(counts.values()) > 60, counts  # 100 expected each; 60 is > 5 sigma away

    def test_udp_cluster_ip(self, topology: Topology, programmed: Backend) -> None:
        assert udp(topology.pods["pod-a"], "10.96.0.17", 53) == f"pod-b {POD_A}"

    def test_ipv6_cluster_ip(self, topology: Topology, programmed: Backend) -> None:
        replies = {tcp(topology.pods["pod-a"], "fd00:96::18", 80) for _ in range(30)}
        assert {r.split()[0] for r in replies} == {"pod-a", "pod-b"}
        assert f"pod-b {POD_A6}" in replies, replies

    def test_restart_adopts_without_dropping_connections(
        self, topology: Topology, programmed: Backend, make_backend: MakeBackend
    ) -> None:
        family = socket.AF_INET
        held = socket_in(topology.client, family, socket.SOCK_STREAM, None)
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
                restarted = make_backend(config_for(topology))
                result = asyncio.run(restarted.apply(b.plan(states(), node_info=NODE)))
                time.sleep(0.2)
            finally:
                stop.set()
                worker.join()
            assert result.ops == 0
            assert not failures
            held.sendall(b"still there\n")
            assert reader.readline() == b"still there\n"


# --- explain's traces against real packets --------------------------------------------------

# (name, namespace role, source, destination, port, protocol, origin)
REAL = [
    ("clusterip-from-pod", "pod-a", "10.244.1.5", "10.96.0.10", 80, "TCP", "pod"),
    ("clusterip-from-node", "node", "192.168.50.2", "10.96.0.10", 80, "TCP", "node"),
    ("nodeport-from-outside", "client", "192.168.50.10", "192.168.50.2", 30080, "TCP", "external"),
    ("nodeport-local-policy", "client", "192.168.50.10", "192.168.50.2", 30082, "TCP", "external"),
    (
        "nodeport-no-local-endpoint",
        "client",
        "192.168.50.10",
        "192.168.50.2",
        30083,
        "TCP",
        "external",
    ),
    (
        "nodeport-no-local-endpoint-from-pod",
        "pod-a",
        "10.244.1.5",
        "192.168.50.2",
        30083,
        "TCP",
        "pod",
    ),
    ("external-ip", "client", "192.168.50.10", "192.0.2.10", 80, "TCP", "external"),
    ("lb-source-range-denied", "client", "203.0.113.7", "172.18.0.50", 80, "TCP", "external"),
    ("lb-source-range-allowed", "client", "192.168.50.10", "172.18.0.50", 80, "TCP", "external"),
    ("no-endpoints", "pod-a", "10.244.1.5", "10.96.0.16", 80, "TCP", "pod"),
    ("udp", "pod-a", "10.244.1.5", "10.96.0.17", 53, "UDP", "pod"),
    ("ipv6", "pod-a", "fd00:244:1::5", "fd00:96::18", 80, "TCP", "pod"),
]


def _namespace(topo: Topology, role: str) -> str:
    return {"node": topo.node, "client": topo.client}.get(role) or topo.pods[role]


def _pod_endpoint(name: str, family: int) -> str:
    ips = {"pod-a": (POD_A, POD_A6), "pod-b": (POD_B, POD_B6)}[name]
    return f"{ips[0]}:8080" if family == 4 else f"[{ips[1]}]:8080"


class TraceAgreement:
    """Where real connections go is within what a backend's packet trace says.

    Subclass and provide ``make_backend`` and ``tracer`` (the backend's pure
    ``trace(plan, packet, origin, config)``): each row's packet is traced through the
    backend's rendered objects, then sent for real through the rules the backend
    programmed; a traced drop must time out, a traced reject be refused, and a traced
    forward reach only traced endpoints, with the source address the trace predicts.
    """

    @pytest.fixture(scope="class")
    @classmethod
    def topology(cls) -> Iterator[Topology]:
        if os.geteuid() != 0:
            pytest.skip("needs root for network namespaces")
        with topology("kpy-tr") as topo:
            yield topo

    @pytest.fixture
    def programmed(self, topology: Topology, make_backend: MakeBackend) -> Iterator[Topology]:
        with applied(make_backend(config_for(topology)), b.plan(states(), node_info=NODE)):
            yield topology

    @pytest.mark.parametrize("row", REAL, ids=[r[0] for r in REAL])
    def test_real_connections_go_where_the_trace_says(
        self,
        programmed: Topology,
        tracer: Tracer,
        row: tuple[str, str, str, str, int, str, str],
    ) -> None:
        _, role, src, dst, port, proto, origin = row
        plan = b.plan(states(), node_info=NODE)
        packet = Packet(
            src=ipaddress.ip_address(src),
            dst=ipaddress.ip_address(dst),
            port=port,
            protocol=Protocol(proto),
        )
        traced = tracer(plan, packet, Origin(origin), config_for(programmed))
        where = _namespace(programmed, role)
        source = src if role == "client" else None
        family = packet.dst.version
        if traced.verdict is Verdict.DROP:
            with pytest.raises(TimeoutError):
                tcp(where, dst, port, source=source, timeout=1.0)
            return
        if traced.verdict is Verdict.REJECT:
            with pytest.raises(ConnectionRefusedError):
                tcp(where, dst, port, source=source)
            return
        assert traced.verdict is Verdict.FORWARD, traced
        if proto == "UDP":
            replies = [udp(where, dst, port) for _ in range(5)]
        else:
            replies = [tcp(where, dst, port, source=source) for _ in range(20)]
        reached = {_pod_endpoint(r.split()[0], family) for r in replies}
        assert reached <= set(traced.endpoints), (reached, traced.endpoints)
        assert reached, replies
        if origin != "node":  # the node's own source address is the kernel's choice
            peers = {r.split()[1] for r in replies}
            if traced.masquerade:
                assert peers != {src}, replies
            else:
                assert peers == {src}, replies
