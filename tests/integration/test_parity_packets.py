"""Real packets for kube-proxy parity items, through the nftables and iptables backends.

Each class programs its own Services in a namespace topology of its own
(:mod:`kpy.testing.netns`) and checks what real connections do, next to what the
backend's packet trace says about the same packet.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from collections.abc import Callable, Iterator

import pytest
from kpy_iptables import IptablesBackend
from kpy_iptables import trace as ipt_trace
from kpy_nftables import NftablesBackend
from kpy_nftables import trace as nft_trace

from kpy import explain as ex
from kpy.backend import Backend, BackendConfig
from kpy.model import Plan, ServicePortState
from kpy.testing import builders as b
from kpy.testing.netns import CLIENT_IP, NODE_IP, POD_A, POD_B, Topology, ip, tcp, topology
from kpy.testing.packets import NODE, config_for

pytestmark = pytest.mark.root

Factory = Callable[[BackendConfig], Backend]


def _iptables(mode: str) -> Factory:
    def make(config: BackendConfig) -> Backend:
        options = (*config.options, ("iptables_mode", mode))
        return IptablesBackend(dataclasses.replace(config, options=options))

    return make


BACKENDS: dict[str, tuple[Factory, ex.Tracer]] = {
    "nftables": (NftablesBackend, nft_trace.trace),
    "iptables-nft": (_iptables("nft"), ipt_trace.trace),
    "iptables-legacy": (_iptables("legacy"), ipt_trace.trace),
}


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    with topology("kpy-pp") as t:
        yield t


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> tuple[Factory, ex.Tracer]:
    return BACKENDS[request.param]


def _program(
    topo: Topology, factory: Factory, states: list[ServicePortState], **config: object
) -> tuple[Backend, Plan, BackendConfig]:
    cfg = dataclasses.replace(config_for(topo), **config)  # type: ignore[arg-type]
    backend = factory(cfg)
    plan = b.plan(states, node_info=NODE)
    asyncio.run(backend.apply(plan))
    return backend, plan, cfg


def _traced(
    tracer: ex.Tracer, plan: Plan, cfg: BackendConfig, src: str, dst: str, port: int, origin: str
) -> ex.Verdict:
    packet = ex.Packet(src=ipaddress.ip_address(src), dst=ipaddress.ip_address(dst), port=port)
    return tracer(plan, packet, ex.Origin(origin), cfg).verdict


# --- 1. LoadBalancer source ranges and the LB's own address ---------------------------------


def _lb_states() -> list[ServicePortState]:
    def lb(name: str, cluster_ip: str, lb_ip: str, ranges: str) -> ServicePortState:
        svc = b.service(
            name, cluster_ip=cluster_ip, type="LoadBalancer", lb_ips=[lb_ip], source_ranges=[ranges]
        )
        return b.state(svc, [b.endpoint(POD_A)], NODE)

    return [
        # a range holds the node's primary IP (192.168.50.2): the LB IP is a source too
        lb("lb-open", "10.96.0.30", "172.18.0.50", "192.168.50.0/24"),
        # no range holds it: the LB IP as a source is outside the ranges like any other
        lb("lb-closed", "10.96.0.31", "172.18.0.51", "198.51.100.0/24"),
    ]


class TestLoadBalancerIPAsSource:
    @pytest.fixture
    def programmed(
        self, topo: Topology, backend: tuple[Factory, ex.Tracer]
    ) -> Iterator[tuple[Plan, BackendConfig]]:
        factory, _ = backend
        # the node holds both VIPs locally (a VIP-like load balancer's IP route)
        ip("-n", topo.node, "addr", "replace", "172.18.0.51/32", "dev", "lo")
        programmed, plan, cfg = _program(topo, factory, _lb_states())
        try:
            yield plan, cfg
        finally:
            asyncio.run(programmed.cleanup())

    def test_the_node_reaches_its_local_lb_ip_when_a_range_holds_the_node(
        self,
        topo: Topology,
        programmed: tuple[Plan, BackendConfig],
        backend: tuple[Factory, ex.Tracer],
    ) -> None:
        plan, cfg = programmed
        tracer = backend[1]
        # the node's connection to its own VIP has the VIP as its source
        assert _traced(tracer, plan, cfg, "172.18.0.50", "172.18.0.50", 80, "node") == (
            ex.Verdict.FORWARD
        )
        # pod-a answers, not the node's own server on the VIP
        assert tcp(topo.node, "172.18.0.50", 80).startswith("pod-a ")

    def test_the_lb_ip_as_source_is_dropped_when_no_range_holds_the_node(
        self,
        topo: Topology,
        programmed: tuple[Plan, BackendConfig],
        backend: tuple[Factory, ex.Tracer],
    ) -> None:
        plan, cfg = programmed
        tracer = backend[1]
        assert _traced(tracer, plan, cfg, "172.18.0.51", "172.18.0.51", 80, "node") == (
            ex.Verdict.DROP
        )
        with pytest.raises(TimeoutError):
            tcp(topo.node, "172.18.0.51", 80, timeout=1.0)


# --- 4. detecting local (pod) traffic: --detect-local-mode ----------------------------------


def _detect_states() -> list[ServicePortState]:
    return [
        b.state(
            b.service("web", cluster_ip="10.96.0.40"), [b.endpoint(POD_B, node="node-b")], NODE
        ),
        b.state(
            b.service(
                "remote", cluster_ip="10.96.0.41", type="NodePort", node_port=30090, etp_local=True
            ),
            [b.endpoint(POD_B, node="node-b")],
            NODE,
        ),
    ]


NO_CIDR: tuple[ipaddress.IPv4Network, ...] = ()
# mode → the BackendConfig fields; in every one but "no-detector", pod-a is told as a pod
# of this node (the topology's pods sit on the bridge br0, in the Node's 10.244.1.0/24)
DETECT: dict[str, dict[str, object]] = {
    "cluster-cidr": {},
    "node-cidr": {"cluster_cidrs": NO_CIDR, "detect_local_mode": "NodeCIDR"},
    "bridge": {
        "cluster_cidrs": NO_CIDR,
        "detect_local_mode": "BridgeInterface",
        "pod_bridge_interface": "br0",
    },
    "prefix": {
        "cluster_cidrs": NO_CIDR,
        "detect_local_mode": "InterfaceNamePrefix",
        "pod_interface_name_prefix": "br",
    },
    "no-detector": {"cluster_cidrs": NO_CIDR},
}


class TestDetectLocal:
    @pytest.fixture(params=sorted(DETECT))
    def mode(self, request: pytest.FixtureRequest) -> str:
        return str(request.param)

    @pytest.fixture
    def programmed(
        self, topo: Topology, backend: tuple[Factory, ex.Tracer], mode: str
    ) -> Iterator[tuple[Plan, BackendConfig]]:
        programmed, plan, cfg = _program(topo, backend[0], _detect_states(), **DETECT[mode])
        try:
            yield plan, cfg
        finally:
            asyncio.run(programmed.cleanup())

    def test_pods_and_others_as_the_detector_tells_them(
        self,
        topo: Topology,
        programmed: tuple[Plan, BackendConfig],
        backend: tuple[Factory, ex.Tracer],
        mode: str,
    ) -> None:
        plan, cfg = programmed
        tracer = backend[1]
        detector = mode != "no-detector"
        # a pod reaching a ClusterIP keeps its address (never masqueraded)
        assert tcp(topo.pods["pod-a"], "10.96.0.40", 80) == f"pod-b {POD_A}"
        # from outside: masqueraded (the node's bridge address) unless there is no detector
        peer = tcp(topo.client, "10.96.0.40", 80).split()[1]
        assert peer == ("10.244.1.1" if detector else CLIENT_IP)
        traced = tracer(
            plan,
            ex.Packet(
                src=ipaddress.ip_address(CLIENT_IP), dst=ipaddress.ip_address("10.96.0.40"), port=80
            ),
            ex.Origin.EXTERNAL,
            cfg,
        )
        assert traced.masquerade is detector
        # a pod reaching a NodePort under externalTrafficPolicy Local without a local
        # endpoint: short-circuited to the cluster-wide endpoints when told as a pod,
        # else dropped like any outside client
        verdict = _traced(tracer, plan, cfg, POD_A, NODE_IP, 30090, "pod")
        if detector:
            assert verdict is ex.Verdict.FORWARD
            assert tcp(topo.pods["pod-a"], NODE_IP, 30090).startswith("pod-b ")
        else:
            assert verdict is ex.Verdict.DROP
            with pytest.raises(TimeoutError):
                tcp(topo.pods["pod-a"], NODE_IP, 30090, timeout=1.0)


# --- 5. nodePortAddresses "primary" --------------------------------------------------------


class TestNodePortPrimary:
    @pytest.fixture
    def programmed(
        self, topo: Topology, backend: tuple[Factory, ex.Tracer]
    ) -> Iterator[tuple[Plan, BackendConfig]]:
        np = b.service("np", cluster_ip="10.96.0.50", type="NodePort", node_port=30091)
        states = [b.state(np, [b.endpoint(POD_B, node="node-b")], NODE)]
        # no configured node IP: the primary IP is the Node's first address (NODE_IP)
        programmed, plan, cfg = _program(
            topo, backend[0], states, node_ips=(), nodeport_primary=True
        )
        try:
            yield plan, cfg
        finally:
            asyncio.run(programmed.cleanup())

    def test_nodeports_answer_on_the_primary_ip_only(
        self,
        topo: Topology,
        programmed: tuple[Plan, BackendConfig],
        backend: tuple[Factory, ex.Tracer],
    ) -> None:
        plan, cfg = programmed
        tracer = backend[1]
        assert tcp(topo.client, NODE_IP, 30091).startswith("pod-b ")
        assert tcp(topo.pods["pod-a"], NODE_IP, 30091).startswith("pod-b ")
        # the node's bridge address is local too, but not the primary IP: nothing there
        assert _traced(tracer, plan, cfg, POD_A, "10.244.1.1", 30091, "pod") is ex.Verdict.ACCEPT
        with pytest.raises(ConnectionRefusedError):
            tcp(topo.pods["pod-a"], "10.244.1.1", 30091)
