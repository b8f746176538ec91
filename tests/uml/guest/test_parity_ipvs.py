"""kube-proxy parity of the IPVS backend, with real packets in the guest's kernel.

* LoadBalancer source ranges: when a range holds the node's primary IP, the Service's
  own LB IP is an allowed source too (upstream's ``KUBE-LOAD-BALANCER-SOURCE-IP``). The
  node reaching an LB IP bound on ``kpy-ipvs0`` has that IP as its source, so without
  it the node would be dropped by a range that names it. A zero-masked range allows
  every source, as upstream.
* ``--detect-local-mode``: which clients of a cluster IP are masqueraded (the address
  the endpoint sees) and which pods are short-circuited to the cluster-wide endpoints
  of an externalTrafficPolicy Local frontend, per mode. Without a cluster CIDR there is
  no detector: outside clients keep their address, and only the node's own
  connections (whose source is the VIP) are masqueraded, as upstream's ``src,dst`` rule.

The lab's pods sit behind veths named ``veth-<pod>`` with /24s of their own
(``10.244.<n>.0/24``); an endpoint sees a masqueraded client as the node's address on
its own veth (``10.244.2.1`` for pod2).
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import replace

import pytest

from kpy.core.backend import BackendConfig
from kpy.core.model import ServicePortState
from kpy.testing import builders as b

from .netlab import CLIENT_IP, NODE_IP, Lab, ask, dropped, restart_ops, running

NODE = b.node(addresses=[NODE_IP], pod_cidrs=("10.244.1.0/24",))
CLUSTER_CIDRS = (ipaddress.ip_network("10.244.0.0/16"), ipaddress.ip_network("fd00:244::/32"))
BASE = BackendConfig(node_name=NODE.name, node_ips=(ipaddress.ip_address(NODE_IP),))
LB_IP = "172.18.0.30"
POD2_GATEWAY = "10.244.2.1"  # the node's address towards pod2: a masqueraded client


def lb(lab: Lab, ranges: tuple[str, ...]) -> ServicePortState:
    svc = b.load_balancer("ranged", "10.96.0.30", 30130, LB_IP, source_ranges=ranges)
    return b.state(svc, [b.endpoint(lab.pods["pod1"])], NODE)


def test_the_lb_ip_is_an_allowed_source_when_a_range_holds_the_node(lab: Lab) -> None:
    config = replace(BASE, cluster_cidrs=CLUSTER_CIDRS)
    plan = b.plan([lb(lab, (f"{NODE_IP}/32",))], node_info=NODE)
    with running(config, plan) as backend:
        # the node's connection leaves from the LB IP (a local address of kpy-ipvs0)
        assert ask(LB_IP, 80).split() == ["pod1", "10.244.1.1"], "the node is let in"
        assert dropped(LB_IP, 80, netns="client"), "a client outside the range is not"
        assert dropped(LB_IP, 80, netns="pod3"), "nor is a pod"
        # a restart adopts the elements as ipset lists them (a /32 without "/32")
        assert restart_ops(config, plan) == 0
        assert ask(LB_IP, 80).split()[0] == "pod1", "the restart kept the allowed sources"
        # a partial sync to a range without the node: the LB IP is no longer allowed
        moved = lb(lab, (f"{CLIENT_IP}/32",))
        asyncio.run(
            backend.apply(b.plan([moved], node_info=NODE, full_sync=False, changed=[moved.name]))
        )
        assert dropped(LB_IP, 80), "the node is dropped once no range holds it"
        assert ask(LB_IP, 80, netns="client").split()[0] == "pod1"


def test_a_zero_masked_range_allows_every_source(lab: Lab) -> None:
    config = replace(BASE, cluster_cidrs=CLUSTER_CIDRS)
    plan = b.plan([lb(lab, ("0.0.0.0/0", "fd00::/8"))], node_info=NODE)
    with running(config, plan):
        for netns in ("client", "pod3", None):
            assert ask(LB_IP, 80, netns=netns).split()[0] == "pod1", netns


MODES: dict[str, BackendConfig] = {
    "cluster-cidr": replace(BASE, cluster_cidrs=CLUSTER_CIDRS),
    "no-cluster-cidr": BASE,
    "node-cidr": replace(BASE, cluster_cidrs=CLUSTER_CIDRS, detect_local_mode="NodeCIDR"),
    "bridge": replace(BASE, detect_local_mode="BridgeInterface", pod_bridge_interface="veth-pod1"),
    "prefix": replace(
        BASE, detect_local_mode="InterfaceNamePrefix", pod_interface_name_prefix="veth-pod"
    ),
}
# (mode, client) -> whether the endpoint sees the client masqueraded. pod1 is on the
# node's pod CIDR and behind veth-pod1; pod3 is a pod of the cluster CIDR on another
# veth; the client is outside; None is the node itself.
MASQUERADED: dict[str, dict[str | None, bool]] = {
    "cluster-cidr": {"pod1": False, "pod3": False, "client": True, None: True},
    "no-cluster-cidr": {"pod1": False, "pod3": False, "client": False, None: True},
    "node-cidr": {"pod1": False, "pod3": True, "client": True, None: True},
    "bridge": {"pod1": False, "pod3": True, "client": True, None: True},
    "prefix": {"pod1": False, "pod3": False, "client": True, None: True},
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_cluster_ip_masquerade_follows_the_detector(lab: Lab, mode: str) -> None:
    svc = b.service("detect", cluster_ip="10.96.0.40")
    plan = b.plan([b.state(svc, [b.endpoint(lab.pods["pod2"])], NODE)], node_info=NODE)
    own = {"pod1": lab.pods["pod1"], "pod3": lab.pods["pod3"], "client": CLIENT_IP}
    with running(MODES[mode], plan):
        for netns, masquerade in MASQUERADED[mode].items():
            name, peer = ask("10.96.0.40", 80, netns=netns).split()
            assert name == "pod2"
            # the node unmasqueraded would show the VIP, its source, to the endpoint
            want = POD2_GATEWAY if masquerade else own[netns] if netns else "10.96.0.40"
            assert peer == want, (mode, netns)


# (mode, pod) -> whether a pod's connection to an externalTrafficPolicy Local frontend
# without a local endpoint is short-circuited to the remote one (else: dropped)
SHORT_CIRCUITED: dict[str, dict[str, bool]] = {
    "cluster-cidr": {"pod1": True, "pod3": True},
    "no-cluster-cidr": {"pod1": False, "pod3": False},
    "node-cidr": {"pod1": True, "pod3": False},
    "bridge": {"pod1": True, "pod3": False},
    "prefix": {"pod1": True, "pod3": True},
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_pods_short_circuit_to_a_local_frontend_as_the_detector_says(lab: Lab, mode: str) -> None:
    svc = b.load_balancer("detect-lb", "10.96.0.41", 30141, LB_IP, etp_local=True)
    remote = b.endpoint(lab.pods["pod2"], node="node-b")
    plan = b.plan([b.state(svc, [remote], NODE)], node_info=NODE)
    with running(MODES[mode], plan):
        for pod, short in SHORT_CIRCUITED[mode].items():
            if short:
                assert ask(LB_IP, 80, netns=pod).split() == ["pod2", lab.pods[pod]], (mode, pod)
            else:
                assert dropped(LB_IP, 80, netns=pod), (mode, pod)
        assert dropped(LB_IP, 80, netns="client"), "an outside client is dropped"


def test_without_a_detector_the_nodes_ipv6_connection_is_masqueraded(lab: Lab) -> None:
    svc = b.service("detect6", cluster_ip="fd00:96::40", target_port=8086)
    pod2 = b.endpoint(lab.pods6["pod2"], 8086)
    with running(BASE, b.plan([b.state(svc, [pod2], NODE)], node_info=NODE)):
        assert ask("fd00:96::40", 80).split() == ["pod2", "fd00:244:2::1"]
        assert ask("fd00:96::40", 80, netns="pod3").split() == ["pod2", lab.pods6["pod3"]]
