"""Traffic policy Local through the IPVS backend, with real packets in the guest's kernel.

The edge cases where one virtual service per frontend is not enough and the companion
layer decides (``kpy_ipvs.render``): a Local policy without a local endpoint drops
(a timeout, not a refusal), except where upstream sends pods and the node to the
cluster-wide endpoints; with no endpoint anywhere it rejects; source ranges hold for
the node's own connections too. "Remote" endpoints are pods of this guest that the
Plan places on another node.
"""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
from collections.abc import Iterator
from dataclasses import replace

import pytest
from kpy_ipvs import IpvsBackend

from kpy.core.backend import BackendConfig
from kpy.core.model import Endpoint, ServicePortState
from kpy.testing import builders as b

from .netlab import CLIENT_IP, NODE_IP, Lab, ask, dropped, restart_ops, running

NODE = b.node(addresses=[NODE_IP], pod_cidrs=())
CONFIG = BackendConfig(
    node_name=NODE.name,
    node_ips=(ipaddress.ip_address(NODE_IP),),
    cluster_cidrs=(ipaddress.ip_network("10.244.0.0/16"), ipaddress.ip_network("fd00:244::/32")),
)
LB_IP = "172.18.0.10"


@pytest.fixture
def backend(lab: Lab) -> Iterator[IpvsBackend]:
    with running(CONFIG) as backend:
        yield backend


def remote(lab: Lab, pod: str) -> Endpoint:
    return b.endpoint(lab.pods[pod], node="node-b")


def test_internal_policy_local_without_local_endpoint_drops(lab: Lab, backend: IpvsBackend) -> None:
    svc = b.service("itp", cluster_ip="10.96.0.20", itp_local=True)
    empty = b.service("itp-empty", cluster_ip="10.96.0.21", itp_local=True)
    states = [b.state(svc, [remote(lab, "pod2")], NODE), b.state(empty, [], NODE)]
    asyncio.run(backend.apply(b.plan(states, node_info=NODE)))
    assert dropped("10.96.0.20", 80, netns="pod3"), "a pod's connection is dropped"
    assert dropped("10.96.0.20", 80), "the node's own connection is dropped before IPVS"
    with pytest.raises(ConnectionRefusedError):  # no endpoint anywhere: reject
        ask("10.96.0.21", 80, netns="pod3")
    with pytest.raises(ConnectionRefusedError):
        ask("10.96.0.21", 80)


def test_node_to_local_nodeport_without_local_endpoint_reaches_the_cluster(
    lab: Lab, backend: IpvsBackend
) -> None:
    svc = b.service("np", cluster_ip="10.96.0.22", type="NodePort", node_port=30090, etp_local=True)
    asyncio.run(backend.apply(b.plan([b.state(svc, [remote(lab, "pod2")], NODE)], node_info=NODE)))
    name, peer = ask(NODE_IP, 30090).split()
    assert name == "pod2"
    assert peer == "10.244.2.1", "the node's connection is masqueraded towards the pod"
    assert dropped(NODE_IP, 30090, netns="client"), "an outside client is dropped"


def test_pod_to_local_lb_without_local_endpoint_short_circuits(
    lab: Lab, backend: IpvsBackend
) -> None:
    svc = b.load_balancer("lb", "10.96.0.23", 30091, LB_IP, etp_local=True)
    asyncio.run(backend.apply(b.plan([b.state(svc, [remote(lab, "pod2")], NODE)], node_info=NODE)))
    assert ask(LB_IP, 80, netns="pod3").split() == ["pod2", lab.pods["pod3"]], (
        "a pod reaches the cluster-wide endpoint with its own address"
    )
    assert dropped(LB_IP, 80, netns="client"), "an outside client is dropped"


def test_local_frontend_without_any_endpoint_rejects(lab: Lab, backend: IpvsBackend) -> None:
    svc = b.load_balancer("lb-empty", "10.96.0.24", 30092, LB_IP, etp_local=True)
    asyncio.run(backend.apply(b.plan([b.state(svc, [], NODE)], node_info=NODE)))
    for address, port in ((LB_IP, 80), (NODE_IP, 30092)):
        with pytest.raises(ConnectionRefusedError):
            ask(address, port, netns="client")


def test_source_ranges_hold_for_the_node(lab: Lab, backend: IpvsBackend) -> None:
    svc = b.load_balancer("ranged", "10.96.0.25", 30093, LB_IP, source_ranges=(f"{CLIENT_IP}/32",))
    pods = [b.endpoint(lab.pods["pod1"])]
    asyncio.run(backend.apply(b.plan([b.state(svc, pods, NODE)], node_info=NODE)))
    assert ask(LB_IP, 80, netns="client").split()[0] == "pod1", "an allowed source passes"
    assert dropped(LB_IP, 80, netns="pod3"), "a pod outside the ranges is dropped"
    assert dropped(LB_IP, 80), "so is the node's own connection, before IPVS"


FOREIGN_FWMARK = 0x10000  # inside the default mask, outside 0x3fff


@pytest.mark.parametrize("mask", [None, "0x3fff"], ids=["default-mask", "mask-0x3fff"])
def test_pods_and_the_node_reach_every_endpoint_of_a_local_frontend(
    lab: Lab, mask: str | None
) -> None:
    """With a local endpoint too, outside clients keep to it (source kept) while pods and
    the node are short-circuited by their mark to the cluster-wide endpoints; a restarted
    backend adopts the firewall-mark services and marked set elements as they are.

    With ``ipvs_mark_mask=0x3fff`` (the low bits, as beside Calico's 0xffff0000) the
    marks, the firewall-mark virtual services and the masquerade rule live in those
    bits, and a firewall-mark service outside them is not kpy's: sync and cleanup leave
    it alone."""
    config = CONFIG if mask is None else replace(CONFIG, options=(("ipvs_mark_mask", mask),))
    bits = 0xFFFF0000 if mask is None else int(mask, 0)
    if mask is not None:
        run("ipvsadm", "-A", "-f", str(FOREIGN_FWMARK), "-s", "rr")
    backend = IpvsBackend(config)
    try:
        svc = b.load_balancer("lb-both", "10.96.0.26", 30094, LB_IP, etp_local=True)
        plan = b.plan(
            [b.state(svc, [b.endpoint(lab.pods["pod1"]), remote(lab, "pod2")], NODE)],
            node_info=NODE,
        )
        asyncio.run(backend.apply(plan))
        from_pod = {tuple(ask(LB_IP, 80, netns="pod3").split()) for _ in range(6)}
        assert from_pod == {("pod1", lab.pods["pod3"]), ("pod2", lab.pods["pod3"])}
        from_node = {tuple(ask(NODE_IP, 30094).split()) for _ in range(6)}
        assert from_node == {("pod1", "10.244.1.1"), ("pod2", "10.244.2.1")}, "masqueraded"
        from_outside = {tuple(ask(LB_IP, 80, netns="client").split()) for _ in range(4)}
        assert from_outside == {("pod1", CLIENT_IP)}
        assert restart_ops(config, plan) == 0
        view = asyncio.run(backend.observe()).services[str(svc.name)]
        short = {k: v for k, v in view.extra.items() if k.startswith("short-circuit fwmark ")}
        assert list(short.values()) == [f"{lab.pods['pod1']}:8080 {lab.pods['pod2']}:8080"]
        fwmark = int(next(iter(short)).split()[2], 0)
        assert fwmark and fwmark & ~bits == 0, view.extra
        post = [
            line
            for line in run("iptables-legacy-save", "-t", "nat").splitlines()
            if line.startswith("-A KPY-IPVS-POSTROUTING") and "! --mark" in line
        ]
        assert post and all(f"--mark 0x0/{bits:#x}" in line for line in post), post
    finally:
        asyncio.run(backend.cleanup())
        backend.close()
        left = run("ipvsadm", "-S", "-n")
        if mask is not None:
            run("ipvsadm", "-D", "-f", str(FOREIGN_FWMARK), check=False)
    if mask is not None:
        assert f"-A -f {FOREIGN_FWMARK} " in left, "a firewall mark outside the mask is not kpy's"
    assert left.count("-A -f") == (mask is not None), left


def run(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


def test_a_port_added_by_a_partial_sync_gets_its_own_mark(lab: Lab, backend: IpvsBackend) -> None:
    def lb(name: str, cluster_ip: str, node_port: int, lb_ip: str) -> ServicePortState:
        svc = b.load_balancer(name, cluster_ip, node_port, lb_ip, etp_local=True)
        return b.state(svc, [b.endpoint(lab.pods["pod1"]), remote(lab, "pod2")], NODE)

    first = lb("first", "10.96.0.27", 30096, LB_IP)
    asyncio.run(backend.apply(b.plan([first], node_info=NODE)))
    second = lb("second", "10.96.0.28", 30097, "172.18.0.11")
    plan = b.plan([first, second], node_info=NODE, full_sync=False, changed=[second.name])
    asyncio.run(backend.apply(plan))
    for vip in (LB_IP, "172.18.0.11"):
        assert {ask(vip, 80, netns="pod3").split()[0] for _ in range(6)} == {"pod1", "pod2"}
        assert {ask(vip, 80, netns="client").split()[0] for _ in range(4)} == {"pod1"}


def test_ipv6_short_circuit(lab: Lab, backend: IpvsBackend) -> None:
    svc = b.load_balancer(
        "lb6", "fd00:96::26", 30098, "fd00:18::10", etp_local=True, target_port=8086
    )
    pods = [b.endpoint(lab.pods6["pod1"], 8086), b.endpoint(lab.pods6["pod2"], 8086, node="node-b")]
    asyncio.run(backend.apply(b.plan([b.state(svc, pods, NODE)], node_info=NODE)))
    from_pod = {tuple(ask("fd00:18::10", 80, netns="pod3").split()) for _ in range(6)}
    assert from_pod == {("pod1", lab.pods6["pod3"]), ("pod2", lab.pods6["pod3"])}
    from_node = {tuple(ask("fd00:18::10", 80).split()) for _ in range(6)}
    assert from_node == {("pod1", "fd00:244:1::1"), ("pod2", "fd00:244:2::1")}, "masqueraded"
