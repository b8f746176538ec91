"""Real packets through the IPVS backend in the guest's kernel: node, pods, a client."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
from collections.abc import Iterator

import pytest
from kpy_ipvs import IpvsBackend

from kpy.core.backend import BackendConfig
from kpy.core.model import ServicePortState
from kpy.testing import builders as b

from .netlab import CLIENT_IP, NODE_IP, Lab, ask, connect, running, talk

NODE = b.node(addresses=[NODE_IP])
CONFIG = BackendConfig(
    node_name=NODE.name,
    node_ips=(ipaddress.ip_address(NODE_IP),),
    cluster_cidrs=(ipaddress.ip_network("10.244.0.0/16"),),
    options=(("grace_period", "1"),),
)


@pytest.fixture
def backend(lab: Lab) -> Iterator[IpvsBackend]:
    with running(CONFIG) as backend:
        yield backend


def web(*pods: str, lab: Lab) -> ServicePortState:
    svc = b.service("web", cluster_ip="10.96.0.10", type="NodePort", node_port=30080)
    return b.state(svc, [b.endpoint(lab.pods[p]) for p in pods], NODE)


def states(lab: Lab) -> list[ServicePortState]:
    sticky = b.service("sticky", cluster_ip="10.96.0.11", affinity=True, affinity_timeout=60)
    empty = b.service("empty", cluster_ip="10.96.0.12")
    return [
        web("pod1", "pod2", lab=lab),
        b.state(sticky, [b.endpoint(lab.pods["pod1"]), b.endpoint(lab.pods["pod2"])], NODE),
        b.state(empty, [], NODE),
    ]


def test_clusterip_from_node_and_pod_spreads_round_robin(lab: Lab, backend: IpvsBackend) -> None:
    asyncio.run(backend.apply(b.plan(states(lab), node_info=NODE)))
    answers = [ask("10.96.0.10", 80).split()[0] for _ in range(8)]
    assert sorted(answers) == ["pod1"] * 4 + ["pod2"] * 4  # rr alternates
    name, peer = ask("10.96.0.10", 80, netns="pod3").split()
    assert name in {"pod1", "pod2"}
    assert peer == lab.pods["pod3"], "pod traffic inside the cluster CIDR keeps its source"


def test_nodeport_from_outside_is_masqueraded(lab: Lab, backend: IpvsBackend) -> None:
    asyncio.run(backend.apply(b.plan(states(lab), node_info=NODE)))
    name, peer = ask(NODE_IP, 30080, netns="client").split()
    assert name in {"pod1", "pod2"}
    assert peer != CLIENT_IP
    assert peer.startswith("10.244."), "masqueraded to the node's address towards the pod"


def test_session_affinity_sticks(lab: Lab, backend: IpvsBackend) -> None:
    asyncio.run(backend.apply(b.plan(states(lab), node_info=NODE)))
    answers = {ask("10.96.0.11", 80, netns="pod3").split()[0] for _ in range(8)}
    assert len(answers) == 1


def test_no_endpoints_is_refused_fast(lab: Lab, backend: IpvsBackend) -> None:
    asyncio.run(backend.apply(b.plan(states(lab), node_info=NODE)))
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        ask("10.96.0.12", 80, netns="pod3")
    assert time.monotonic() - started < 2.0


def test_graceful_termination_drains_then_removes(lab: Lab, backend: IpvsBackend) -> None:
    plan = b.plan(states(lab), node_info=NODE)
    asyncio.run(backend.apply(plan))
    held = None
    for _ in range(4):
        sock = connect("10.96.0.10", 80)
        if talk(sock).startswith("pod1"):
            held = sock
            break
        sock.close()
    assert held is not None, "rr never chose pod1"
    try:
        only2 = [web("pod2", lab=lab), *states(lab)[1:]]
        name = only2[0].name
        asyncio.run(backend.apply(b.plan(only2, node_info=NODE, full_sync=False, changed=[name])))
        view = asyncio.run(backend.observe()).services[str(name)]
        assert view.endpoints == (f"{lab.pods['pod2']}:8080",)
        assert any(k.startswith("draining 10.96.0.10:80/TCP 10.244.1.2") for k in view.extra)
        assert talk(held).startswith("pod1"), "the open connection keeps its pod"
        assert {ask("10.96.0.10", 80).split()[0] for _ in range(4)} == {"pod2"}
        asyncio.run(backend.apply(b.plan(only2, node_info=NODE, full_sync=False, changed=[])))
        objects = asyncio.run(backend.observe()).objects
        assert objects.get("dest 10.96.0.10:80/TCP 10.244.1.2:8080") == 0, "still draining"
    finally:
        held.close()
    time.sleep(1.2)  # the grace period (1 s) ends; IPVS keeps the closed conn in TIME_WAIT
    result = asyncio.run(backend.apply(b.plan(only2, node_info=NODE, full_sync=False, changed=[])))
    assert result.ops >= 1
    objects = asyncio.run(backend.observe()).objects
    assert "dest 10.96.0.10:80/TCP 10.244.1.2:8080" not in objects


def test_restart_during_traffic_loses_no_connection(lab: Lab, backend: IpvsBackend) -> None:
    plan = b.plan(states(lab), node_info=NODE)
    asyncio.run(backend.apply(plan))
    stop = threading.Event()
    outcomes: list[str] = []

    def traffic() -> None:
        while not stop.is_set():
            try:
                outcomes.append(ask("10.96.0.10", 80, timeout=2.0).split()[0])
            except OSError as exc:
                outcomes.append(f"error {exc!r}")

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        time.sleep(0.3)
        backend.close()
        restarted = IpvsBackend(CONFIG)
        try:
            result = asyncio.run(restarted.apply(plan))
            assert result.ops == 0, "the restarted backend adopts the kernel's state"
            time.sleep(0.3)
        finally:
            restarted.close()
        backend._kernel = IpvsBackend(CONFIG)._kernel  # a live kernel handle for cleanup
    finally:
        stop.set()
        thread.join()
    errors = [o for o in outcomes if o.startswith("error")]
    assert len(outcomes) >= 5
    assert errors == []


def test_hairpin_pod_reaches_itself_masqueraded(lab: Lab, backend: IpvsBackend) -> None:
    pod1 = b.endpoint(lab.pods["pod1"])
    own = b.state(b.service("own", cluster_ip="10.96.0.13"), [pod1], NODE)
    twin = b.state(b.service("twin", cluster_ip="10.96.0.14"), [pod1], NODE)
    asyncio.run(backend.apply(b.plan([own, twin], node_info=NODE)))
    for vip in ("10.96.0.13", "10.96.0.14"):
        name, peer = ask(vip, 80, netns="pod1").split()
        assert name == "pod1"
        assert peer == "10.244.1.1", "hairpin is masqueraded to the node's address"
    # both ports share the pod's hairpin element: removing one keeps it for the other
    plan = b.plan([own], node_info=NODE, full_sync=False, changed=[], removed=[twin.name])
    asyncio.run(backend.apply(plan))
    assert ask("10.96.0.13", 80, netns="pod1").split() == ["pod1", "10.244.1.1"]
    # from another pod the source is kept (inside the cluster CIDR, not a hairpin)
    assert ask("10.96.0.13", 80, netns="pod3").split() == ["pod1", lab.pods["pod3"]]


def test_ipv6_clusterip_from_node_and_pod(lab: Lab, backend: IpvsBackend) -> None:
    svc = b.service("web6", cluster_ip="fd00:96::10", target_port=8086)
    pods = [b.endpoint(lab.pods6[p], 8086) for p in ("pod1", "pod2")]
    asyncio.run(backend.apply(b.plan([b.state(svc, pods, NODE)], node_info=NODE)))
    answers = [ask("fd00:96::10", 80).split()[0] for _ in range(4)]
    assert sorted(answers) == ["pod1", "pod1", "pod2", "pod2"]  # rr alternates
    name, peer = ask("fd00:96::10", 80, netns="pod3").split()
    assert name in {"pod1", "pod2"}
    assert peer == lab.pods6["pod3"], "pod traffic keeps its source"
    objects = asyncio.run(backend.observe()).objects
    assert "dest [fd00:96::10]:80/TCP [fd00:244:1::2]:8086" in objects, sorted(objects)[:8]
