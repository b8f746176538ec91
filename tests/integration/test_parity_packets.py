"""Real packets for kube-proxy parity items, through the nftables and iptables backends.

Each class programs its own Services in a namespace topology of its own
(:mod:`kpy.testing.netns`) and checks what real connections do, next to what the
backend's packet trace says about the same packet.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kpy_iptables import IptablesBackend
from kpy_iptables import trace as ipt_trace
from kpy_nftables import NftablesBackend
from kpy_nftables import trace as nft_trace

from kpy.core import trace as ex
from kpy.core.backend import Backend, BackendConfig
from kpy.core.model import Plan, ServicePortState
from kpy.testing import builders as b
from kpy.testing.netns import (
    CLIENT_IP,
    NODE_IP,
    OUTSIDE_IP,
    POD_A,
    POD_B,
    POD_B6,
    Topology,
    ip,
    socket_in,
    tcp,
    topology,
)
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


@dataclasses.dataclass(frozen=True)
class Programmed:
    """A plan a backend programmed, with that backend's tracer for the same packets."""

    plan: Plan
    cfg: BackendConfig
    tracer: ex.Tracer

    def trace(self, src: str, dst: str, port: int, origin: str) -> ex.Trace:
        packet = ex.Packet(src=ipaddress.ip_address(src), dst=ipaddress.ip_address(dst), port=port)
        return self.tracer(self.plan, packet, ex.Origin(origin), self.cfg)

    def verdict(self, src: str, dst: str, port: int, origin: str) -> ex.Verdict:
        return self.trace(src, dst, port, origin).verdict


@contextlib.contextmanager
def _programmed(
    topo: Topology,
    backend: tuple[Factory, ex.Tracer],
    states: list[ServicePortState],
    **config: object,
) -> Iterator[Programmed]:
    """``states`` programmed for the node of ``topo``; everything removed afterwards."""
    factory, tracer = backend
    programmed, plan, cfg = _program(topo, factory, states, **config)
    try:
        yield Programmed(plan, cfg, tracer)
    finally:
        asyncio.run(programmed.cleanup())


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
        # ranges of the other family only: upstream takes ranges per family, so this
        # family has no firewall and every source is let in
        lb("lb-v6-ranges", "10.96.0.32", "172.18.0.52", "fd00:99::/64"),
    ]


class TestLoadBalancerIPAsSource:
    @pytest.fixture
    def programmed(
        self, topo: Topology, backend: tuple[Factory, ex.Tracer]
    ) -> Iterator[Programmed]:
        # the node holds both VIPs locally (a VIP-like load balancer's IP route)
        ip("-n", topo.node, "addr", "replace", "172.18.0.51/32", "dev", "lo")
        with _programmed(topo, backend, _lb_states()) as programmed:
            yield programmed

    def test_the_node_reaches_its_local_lb_ip_when_a_range_holds_the_node(
        self, topo: Topology, programmed: Programmed
    ) -> None:
        # the node's connection to its own VIP has the VIP as its source
        assert programmed.verdict("172.18.0.50", "172.18.0.50", 80, "node") == ex.Verdict.FORWARD
        # pod-a answers, not the node's own server on the VIP
        assert tcp(topo.node, "172.18.0.50", 80).startswith("pod-a ")

    def test_the_lb_ip_as_source_is_dropped_when_no_range_holds_the_node(
        self, topo: Topology, programmed: Programmed
    ) -> None:
        assert programmed.verdict("172.18.0.51", "172.18.0.51", 80, "node") == ex.Verdict.DROP
        with pytest.raises(TimeoutError):
            tcp(topo.node, "172.18.0.51", 80, timeout=1.0)

    def test_ranges_of_the_other_family_only_filter_nothing(
        self, topo: Topology, programmed: Programmed
    ) -> None:
        assert programmed.verdict(CLIENT_IP, "172.18.0.52", 80, "external") == ex.Verdict.FORWARD
        assert tcp(topo.client, "172.18.0.52", 80).startswith("pod-a ")
        assert tcp(topo.client, "172.18.0.52", 80, source=OUTSIDE_IP).startswith("pod-a ")


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
    ) -> Iterator[Programmed]:
        with _programmed(topo, backend, _detect_states(), **DETECT[mode]) as programmed:
            yield programmed

    def test_pods_and_others_as_the_detector_tells_them(
        self, topo: Topology, programmed: Programmed, mode: str
    ) -> None:
        detector = mode != "no-detector"
        # a pod reaching a ClusterIP keeps its address (never masqueraded)
        assert tcp(topo.pods["pod-a"], "10.96.0.40", 80) == f"pod-b {POD_A}"
        # from outside: masqueraded (the node's bridge address) unless there is no detector
        peer = tcp(topo.client, "10.96.0.40", 80).split()[1]
        assert peer == ("10.244.1.1" if detector else CLIENT_IP)
        assert programmed.trace(CLIENT_IP, "10.96.0.40", 80, "external").masquerade is detector
        # a pod reaching a NodePort under externalTrafficPolicy Local without a local
        # endpoint: short-circuited to the cluster-wide endpoints when told as a pod,
        # else dropped like any outside client
        verdict = programmed.verdict(POD_A, NODE_IP, 30090, "pod")
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
    ) -> Iterator[Programmed]:
        np = b.service("np", cluster_ip="10.96.0.50", type="NodePort", node_port=30091)
        states = [b.state(np, [b.endpoint(POD_B, node="node-b")], NODE)]
        # no configured node IP: the primary IP is the Node's first address (NODE_IP)
        with _programmed(topo, backend, states, node_ips=(), nodeport_primary=True) as programmed:
            yield programmed

    def test_nodeports_answer_on_the_primary_ip_only(
        self, topo: Topology, programmed: Programmed
    ) -> None:
        assert tcp(topo.client, NODE_IP, 30091).startswith("pod-b ")
        assert tcp(topo.pods["pod-a"], NODE_IP, 30091).startswith("pod-b ")
        # the node's bridge address is local too, but not the primary IP: nothing there
        assert programmed.verdict(POD_A, "10.244.1.1", 30091, "pod") is ex.Verdict.ACCEPT
        with pytest.raises(ConnectionRefusedError):
            tcp(topo.pods["pod-a"], "10.244.1.1", 30091)


class TestNodePortAddressesPerFamily:
    """Upstream takes --nodeport-addresses per IP family: IPv4 CIDRs only leave IPv6
    NodePorts on every address of the node."""

    @pytest.fixture
    def programmed(
        self, topo: Topology, backend: tuple[Factory, ex.Tracer]
    ) -> Iterator[Programmed]:
        np = b.service(
            "np-dual", cluster_ip=["10.96.0.51", "fd00:96::51"], type="NodePort", node_port=30092
        )
        endpoints = [b.endpoint(POD_B, node="node-b"), b.endpoint(POD_B6, node="node-b")]
        states = [b.state(np, endpoints, NODE)]
        only_v4 = (ipaddress.ip_network("192.168.50.0/24"),)
        with _programmed(topo, backend, states, nodeport_addresses=only_v4) as programmed:
            yield programmed

    def test_ipv4_cidrs_only_leave_ipv6_nodeports_everywhere(
        self, topo: Topology, programmed: Programmed
    ) -> None:
        assert tcp(topo.client, NODE_IP, 30092).startswith("pod-b ")
        # the bridge's IPv4 address is outside the CIDRs: no NodePort there
        assert programmed.verdict(POD_A, "10.244.1.1", 30092, "pod") is ex.Verdict.ACCEPT
        with pytest.raises(ConnectionRefusedError):
            tcp(topo.pods["pod-a"], "10.244.1.1", 30092)
        # no IPv6 CIDR: the bridge's IPv6 address is a NodePort address (the tracers know
        # only the Node's reported addresses as local, so this is checked by packets)
        assert tcp(topo.pods["pod-a"], "fd00:244:1::1", 30092).startswith("pod-b ")


# --- 3. localhost NodePorts (iptables) -------------------------------------------------------


def _route_localnet(netns: str) -> str:
    if not netns:  # read only: the machine's own value, to see that it did not change
        return Path("/proc/sys/net/ipv4/conf/all/route_localnet").read_text().strip()
    return subprocess.run(
        ["ip", "netns", "exec", netns, "sysctl", "-n", "net.ipv4.conf.all.route_localnet"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


IPTABLES = {k: v for k, v in BACKENDS.items() if k.startswith("iptables")}


@pytest.fixture(params=sorted(IPTABLES))
def iptables_backend(request: pytest.FixtureRequest) -> tuple[Factory, ex.Tracer]:
    return IPTABLES[request.param]


def _localhost_states() -> list[ServicePortState]:
    np = b.service("np-lo", cluster_ip="10.96.0.60", type="NodePort", node_port=30092)
    local = b.service(
        "np-lo-local", cluster_ip="10.96.0.61", type="NodePort", node_port=30093, etp_local=True
    )
    return [
        b.state(np, [b.endpoint(POD_B, node="node-b")], NODE),
        b.state(local, [b.endpoint(POD_B, node="node-b")], NODE),
    ]


@pytest.fixture(scope="module")
def fresh() -> Iterator[Topology]:
    with topology("kpy-lo") as t:  # route_localnet starts at 0 here
        yield t


class TestLocalhostNodePorts:
    @pytest.fixture
    def programmed(
        self,
        request: pytest.FixtureRequest,
        fresh: Topology,
        iptables_backend: tuple[Factory, ex.Tracer],
    ) -> Iterator[Programmed]:
        """Localhost NodePorts on, or as the test's ``programmed`` parameter says."""
        on = bool(getattr(request, "param", True))
        states = _localhost_states()
        with _programmed(fresh, iptables_backend, states, localhost_nodeports=on) as programmed:
            yield programmed
            # the next test starts from route_localnet 0 again
            subprocess.run(
                ["ip", "netns", "exec", fresh.node, "sysctl", "-qw",
                 "net.ipv4.conf.all.route_localnet=0"],
                check=True,
            )  # fmt: skip

    def test_nodeports_answer_on_localhost_masqueraded(
        self, fresh: Topology, programmed: Programmed, iptables_backend: tuple[Factory, ex.Tracer]
    ) -> None:
        host = _route_localnet("")
        assert _route_localnet(fresh.node) == "1"  # in the node's namespace only
        assert _route_localnet("") == host
        for port in (30092, 30093):  # policy Cluster, and Local (the node uses all)
            traced = programmed.trace("127.0.0.1", "127.0.0.1", port, "node")
            assert (traced.verdict, traced.masquerade) == (ex.Verdict.FORWARD, True)
            assert tcp(fresh.node, "127.0.0.1", port) == "pod-b 10.244.1.1"
        # a restarted agent reads the guard chain and its jumps back as its own
        restarted = iptables_backend[0](programmed.cfg)
        assert asyncio.run(restarted.apply(programmed.plan)).ops == 0

    def test_the_martian_guard_drops_loopback_from_elsewhere(
        self, fresh: Topology, programmed: Programmed
    ) -> None:
        # the client sends to 127.0.0.99 through the node (it may: route_localnet in its
        # own namespace); with route_localnet on, the node would deliver it to its echo
        # server on port 80 — the guard drops it
        subprocess.run(
            ["ip", "netns", "exec", fresh.client, "sysctl", "-qw",
             "net.ipv4.conf.all.route_localnet=1"],
            check=True,
        )  # fmt: skip
        ip("-n", fresh.client, "route", "replace", "127.0.0.99/32", "via", NODE_IP)
        with pytest.raises(TimeoutError):
            tcp(fresh.client, "127.0.0.99", 80, timeout=1.0)

    @pytest.mark.parametrize("programmed", [False], ids=["off"], indirect=True)
    def test_turned_off_nothing_answers_on_localhost_and_the_sysctl_is_untouched(
        self, fresh: Topology, programmed: Programmed
    ) -> None:
        assert _route_localnet(fresh.node) == "0"
        verdict = programmed.verdict("127.0.0.1", "127.0.0.1", 30092, "node")
        assert verdict is ex.Verdict.ACCEPT
        with pytest.raises(ConnectionRefusedError):
            tcp(fresh.node, "127.0.0.1", 30092)
        assert tcp(fresh.node, NODE_IP, 30092).startswith("pod-b ")  # the NodePort itself


# --- 2. nftables: unknown ports of ClusterIPs rejected, unallocated Service IPs dropped -----

SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/16")


def _cluster_ip_states() -> list[ServicePortState]:
    web = b.service("web", cluster_ip="10.96.0.70")  # port 80 only
    return [b.state(web, [b.endpoint(POD_B, node="node-b")], NODE)]


@pytest.fixture(scope="module")
def bystander(topo: Topology) -> Iterator[None]:
    """Listeners beyond the node (in the client namespace) on a ClusterIP's unserved port
    and on an unallocated Service IP: where packets the node lets through end up."""
    ip("-n", topo.client, "addr", "replace", "10.96.0.70/32", "dev", "lo")
    ip("-n", topo.client, "addr", "replace", "10.96.0.99/32", "dev", "lo")
    listeners = []
    for host, port in (("10.96.0.70", 81), ("10.96.0.99", 80)):
        sock = socket_in(topo.client, socket.AF_INET, socket.SOCK_STREAM, None)
        sock.bind((host, port))
        sock.listen(64)
        listeners.append(sock)
    try:
        yield None
    finally:
        for sock in listeners:
            sock.close()
        ip("-n", topo.client, "addr", "del", "10.96.0.70/32", "dev", "lo")
        ip("-n", topo.client, "addr", "del", "10.96.0.99/32", "dev", "lo")


def _connects(netns: str, host: str, port: int) -> str:
    """'connected', 'refused' or 'dropped' (no answer within a second)."""
    with socket_in(netns, socket.AF_INET, socket.SOCK_STREAM, None) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect((host, port))
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "dropped"
        return "connected"


class TestClusterIPChecks:
    @pytest.fixture
    def programmed(
        self, topo: Topology, backend: tuple[Factory, ex.Tracer], bystander: None
    ) -> Iterator[Programmed]:
        with _programmed(
            topo, backend, _cluster_ip_states(), service_cidrs=(SERVICE_CIDR,)
        ) as programmed:
            yield programmed

    def test_unserved_ports_and_unallocated_addresses(
        self, topo: Topology, programmed: Programmed
    ) -> None:
        nftables = programmed.tracer is nft_trace.trace
        assert tcp(topo.pods["pod-a"], "10.96.0.70", 80).startswith("pod-b ")  # served
        # (from a pod and from the node; the client holds the addresses itself)
        for role, where, src in (("pod", topo.pods["pod-a"], POD_A), ("node", topo.node, NODE_IP)):
            # a port no Service serves on an allocated ClusterIP: rejected by nftables
            # (upstream's nftables mode); iptables lets it through, as upstream's does
            traced = programmed.verdict(src, "10.96.0.70", 81, role)
            assert traced is (ex.Verdict.REJECT if nftables else ex.Verdict.ACCEPT)
            assert _connects(where, "10.96.0.70", 81) == ("refused" if nftables else "connected")
            # an address of the service CIDR that no Service has: dropped by nftables
            traced = programmed.verdict(src, "10.96.0.99", 80, role)
            assert traced is (ex.Verdict.DROP if nftables else ex.Verdict.ACCEPT)
            assert _connects(where, "10.96.0.99", 80) == ("dropped" if nftables else "connected")

    def test_a_service_cidr_added_at_runtime(
        self, topo: Topology, backend: tuple[Factory, ex.Tracer], bystander: None
    ) -> None:
        """The cluster's ServiceCIDR objects (``Plan.service_cidrs``, no --service-cidr):
        nftables drops an unallocated address of one added at runtime from the next
        sync on — a partial sync that rewrites the IPv4 check chain alone — and leaves
        an address outside it alone; the iptables backend ignores them (upstream's
        iptables mode), without a full sync."""
        factory, tracer = backend
        nftables = tracer is nft_trace.trace
        states = _cluster_ip_states()
        programmed, _, cfg = _program(topo, factory, states)
        ip("-n", topo.client, "addr", "replace", "10.97.0.99/32", "dev", "lo")
        outside = socket_in(topo.client, socket.AF_INET, socket.SOCK_STREAM, None)
        outside.bind(("10.97.0.99", 80))
        outside.listen(64)
        pod = topo.pods["pod-a"]
        try:
            assert _connects(pod, "10.96.0.99", 80) == "connected"  # no service CIDR yet
            added = b.plan(states, node_info=NODE, full_sync=False, changed=(),
                           service_cidrs=["10.96.0.0/16"])  # fmt: skip
            if nftables:  # the dry run shows the same transaction, and keeps nothing
                script = asyncio.run(programmed.dry_run(added))  # type: ignore[attr-defined]
                assert "flush chain ip kpy cluster-ips-check\n" in script
                assert "add rule ip kpy cluster-ips-check ip daddr 10.96.0.0/16 drop" in script
                assert "ip6" not in script.replace("add table ip6 kpy", ""), script
            result = asyncio.run(programmed.apply(added))
            assert not result.full_sync
            if nftables:
                assert result.ops == 2, result  # the ip check chain and its fingerprint
            else:
                assert result.ops == 0, result
            after = Programmed(added, cfg, tracer)
            traced = after.verdict(POD_A, "10.96.0.99", 80, "pod")
            assert traced is (ex.Verdict.DROP if nftables else ex.Verdict.ACCEPT)
            assert _connects(pod, "10.96.0.99", 80) == ("dropped" if nftables else "connected")
            assert after.verdict(POD_A, "10.97.0.99", 80, "pod") is ex.Verdict.ACCEPT
            assert _connects(pod, "10.97.0.99", 80) == "connected"  # outside: untouched
            assert tcp(pod, "10.96.0.70", 80).startswith("pod-b ")  # the Service: served
            if nftables:  # the next full sync finds the kernel as the partial one left it
                again = b.plan(states, node_info=NODE, service_cidrs=["10.96.0.0/16"])
                assert asyncio.run(programmed.apply(again)).ops == 0
            # a second ServiceCIDR of the family (a second drop rule)
            both = b.plan(states, node_info=NODE, full_sync=False, changed=(),
                          service_cidrs=["10.96.0.0/16", "10.97.0.0/16"])  # fmt: skip
            assert not asyncio.run(programmed.apply(both)).full_sync
            for address in ("10.96.0.99", "10.97.0.99"):
                assert _connects(pod, address, 80) == ("dropped" if nftables else "connected")
            # the ServiceCIDRs deleted: the address is no one's concern again
            gone = b.plan(states, node_info=NODE, full_sync=False, changed=())
            assert not asyncio.run(programmed.apply(gone)).full_sync
            assert _connects(pod, "10.96.0.99", 80) == "connected"
        finally:
            outside.close()
            ip("-n", topo.client, "addr", "del", "10.97.0.99/32", "dev", "lo")
            asyncio.run(programmed.cleanup())

    def test_the_cluster_ip_stays_while_any_port_of_it_does(
        self, topo: Topology, bystander: None
    ) -> None:
        """Partial syncs: the cluster-ips element is shared by a Service's ports."""
        web = b.service("web", cluster_ip="10.96.0.70")
        web_alt = b.service("web", cluster_ip="10.96.0.70", port=8443, port_name_="alt")
        states = [
            b.state(web, [b.endpoint(POD_B, node="node-b")], NODE),
            b.state(web_alt, [b.endpoint(POD_B, node="node-b")], NODE),
        ]
        backend, _, _ = _program(topo, NftablesBackend, states, service_cidrs=(SERVICE_CIDR,))
        try:
            pod = topo.pods["pod-a"]
            assert _connects(pod, "10.96.0.70", 81) == "refused"
            one = b.plan(states[:1], node_info=NODE, full_sync=False, changed=(),
                         removed=(states[1].name,))  # fmt: skip
            asyncio.run(backend.apply(one))
            assert _connects(pod, "10.96.0.70", 81) == "refused"  # still allocated
            none = b.plan([], node_info=NODE, full_sync=False, changed=(),
                          removed=(states[0].name,))  # fmt: skip
            asyncio.run(backend.apply(none))
            assert _connects(pod, "10.96.0.70", 81) == "dropped"  # unallocated now
        finally:
            asyncio.run(backend.cleanup())
