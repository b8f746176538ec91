"""The tracker: event storms collapse, Plans carry only what changed, UDP staleness is found."""

from __future__ import annotations

import ipaddress
from typing import Any

from kpy.core import convert
from kpy.core.model import NodeInfo, ServiceName
from kpy.core.tracker import Tracker

WEB = ServiceName(namespace="default", name="web")


def service(
    name: str = "web", ip: str = "10.96.0.10", protocol: str = "TCP", port: int = 80
) -> convert.Service:
    obj: dict[str, Any] = {
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": port, "protocol": protocol}]},
    }
    result, problems = convert.service(obj)
    assert result is not None and not problems
    return result


def slice_(
    ips: list[str], name: str = "web-1", service: str = "web", protocol: str = "TCP"
) -> convert.EndpointSlice:
    obj = {
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": protocol}],
        "endpoints": [{"addresses": [ip], "nodeName": "node-a"} for ip in ips],
    }
    result, problems = convert.endpoint_slice(obj)
    assert result is not None and not problems
    return result


def test_first_checkout_is_full_then_partial() -> None:
    t = Tracker("node-a")
    t.set_service(WEB, service())
    t.set_slice("default", "web-1", slice_(["10.244.1.5"]))
    first = t.checkout()
    assert first.full_sync and len(first.services) == 1 and len(first.changed) == 1
    assert not t.pending
    t.set_slice("default", "web-1", slice_(["10.244.1.5", "10.244.1.6"]))
    second = t.checkout()
    assert not second.full_sync
    (state,) = second.services.values()
    assert [str(e.ip) for e in state.internal] == ["10.244.1.5", "10.244.1.6"]


def test_event_storm_that_ends_where_it_began_is_no_change() -> None:
    t = Tracker("node-a")
    t.set_service(WEB, service())
    t.set_slice("default", "web-1", slice_(["10.244.1.5"]))
    t.checkout()
    for i in range(50):
        t.set_slice("default", "web-1", slice_([f"10.244.1.{i + 10}"]))
    t.set_slice("default", "web-1", slice_(["10.244.1.5"]))
    plan = t.checkout()
    assert plan.changed == frozenset() and plan.removed == frozenset()


def test_delete_service_removes_its_ports() -> None:
    t = Tracker("node-a")
    t.set_service(WEB, service())
    t.checkout()
    t.set_service(WEB, None)
    plan = t.checkout()
    assert len(plan.removed) == 1 and not plan.services


def test_slice_before_service_is_kept() -> None:
    t = Tracker("node-a")
    t.set_slice("default", "web-1", slice_(["10.244.1.5"]))
    assert not t.checkout().services
    t.set_service(WEB, service())
    (state,) = t.checkout().services.values()
    assert len(state.endpoints) == 1


def test_one_change_touches_one_service_at_any_size() -> None:
    t = Tracker("node-a")
    for i in range(2000):
        name = f"s{i}"
        t.set_service(
            ServiceName(namespace="default", name=name),
            service(name, str(ipaddress.IPv4Address("10.96.0.0") + i + 1)),
        )
        t.set_slice("default", f"{name}-1", slice_(["10.244.1.5"], name=f"{name}-1", service=name))
    t.checkout()
    t.set_slice("default", "s7-1", slice_(["10.244.1.6"], name="s7-1", service="s7"))
    plan = t.checkout()
    assert [str(k) for k in plan.changed] == ["default/s7:p/TCP"]
    assert len(plan.services) == 2000


def test_node_change_is_full_sync() -> None:
    t = Tracker("node-a")
    t.set_service(WEB, service())
    t.checkout()
    t.set_node(NodeInfo(name="node-a", zone="z1"))
    assert t.checkout().full_sync
    t.set_node(NodeInfo(name="node-a", zone="z1"))
    assert not t.pending


def test_udp_endpoint_removal_yields_stale_flows() -> None:
    dns = ServiceName(namespace="default", name="dns")
    t = Tracker("node-a")
    t.set_service(dns, service("dns", "10.96.0.53", "UDP", 53))
    t.set_slice("default", "dns-1", slice_(["10.244.1.5", "10.244.1.6"], "dns-1", "dns", "UDP"))
    first = t.checkout()
    # 0 → some endpoints: cached rejects towards the VIP must go.
    assert [(str(f.destination), f.port, f.endpoint) for f in first.stale_flows] == [
        ("10.96.0.53", 53, None)
    ]
    t.set_slice("default", "dns-1", slice_(["10.244.1.6"], "dns-1", "dns", "UDP"))
    plan = t.checkout()
    assert [(str(f.destination), str(f.endpoint)) for f in plan.stale_flows] == [
        ("10.96.0.53", "10.244.1.5")
    ]
    t.set_service(dns, None)
    assert [str(f.destination) for f in t.checkout().stale_flows] == ["10.96.0.53"]


def test_tcp_changes_need_no_conntrack_cleanup() -> None:
    t = Tracker("node-a")
    t.set_service(WEB, service())
    t.set_slice("default", "web-1", slice_(["10.244.1.5"]))
    t.checkout()
    t.set_slice("default", "web-1", slice_([]))
    assert t.checkout().stale_flows == ()
