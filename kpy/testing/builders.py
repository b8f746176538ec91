"""Short constructors for model values and Plans, for tests and benchmarks."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from types import MappingProxyType

from kpy.core import endpoints as select
from kpy.core.model import (
    Endpoint,
    NodeInfo,
    Plan,
    Protocol,
    ServicePort,
    ServicePortName,
    ServicePortState,
    ServiceType,
    SessionAffinity,
    TrafficPolicy,
)

NODE = "node-a"


def node(
    name: str = NODE,
    addresses: Iterable[str] = ("192.168.50.2",),
    zone: str | None = None,
    pod_cidrs: Iterable[str] = ("10.244.1.0/24",),
) -> NodeInfo:
    return NodeInfo(
        name=name,
        addresses=tuple(ipaddress.ip_address(a) for a in addresses),
        zone=zone,
        pod_cidrs=tuple(ipaddress.ip_network(c) for c in pod_cidrs),
    )


def port_name(
    name: str = "web", namespace: str = "default", port: str = "http", protocol: str = "TCP"
) -> ServicePortName:
    return ServicePortName(namespace=namespace, name=name, port=port, protocol=Protocol(protocol))


def service(
    name: str = "web",
    namespace: str = "default",
    *,
    port_name_: str = "http",
    cluster_ip: str | Iterable[str] | None = "10.96.0.10",
    port: int = 80,
    protocol: str = "TCP",
    target_port: int = 8080,
    type: str = "ClusterIP",
    node_port: int | None = None,
    external_ips: Iterable[str] = (),
    lb_ips: Iterable[str] = (),
    source_ranges: Iterable[str] = (),
    affinity: bool = False,
    affinity_timeout: int = 10800,
    etp_local: bool = False,
    itp_local: bool = False,
    health_check_node_port: int | None = None,
    traffic_distribution: str | None = None,
    external_name: str | None = None,
) -> ServicePort:
    if cluster_ip is None:
        ips: tuple[str, ...] = ()
    elif isinstance(cluster_ip, str):
        ips = (cluster_ip,)
    else:
        ips = tuple(cluster_ip)
    return ServicePort(
        name=port_name(name, namespace, port_name_, protocol),
        type=ServiceType(type),
        cluster_ips=tuple(ipaddress.ip_address(i) for i in ips),
        headless=cluster_ip is None and external_name is None,
        external_name=external_name,
        port=port,
        protocol=Protocol(protocol),
        target_port=target_port,
        node_port=node_port,
        external_ips=tuple(ipaddress.ip_address(i) for i in external_ips),
        load_balancer_ips=tuple(ipaddress.ip_address(i) for i in lb_ips),
        load_balancer_source_ranges=tuple(ipaddress.ip_network(r) for r in source_ranges),
        session_affinity=SessionAffinity.CLIENT_IP if affinity else SessionAffinity.NONE,
        affinity_timeout=affinity_timeout,
        external_traffic_policy=TrafficPolicy.LOCAL if etp_local else TrafficPolicy.CLUSTER,
        internal_traffic_policy=TrafficPolicy.LOCAL if itp_local else TrafficPolicy.CLUSTER,
        health_check_node_port=health_check_node_port,
        traffic_distribution=traffic_distribution,
    )


def load_balancer(
    name: str,
    cluster_ip: str,
    node_port: int,
    lb_ip: str,
    *,
    source_ranges: Iterable[str] = (),
    etp_local: bool = False,
    target_port: int = 8080,
) -> ServicePort:
    """A LoadBalancer Service's port 80 (to ``target_port``) with one load-balancer IP."""
    return service(
        name,
        cluster_ip=cluster_ip,
        type="LoadBalancer",
        node_port=node_port,
        lb_ips=(lb_ip,),
        source_ranges=source_ranges,
        etp_local=etp_local,
        target_port=target_port,
    )


def endpoint(
    ip: str,
    port: int = 8080,
    *,
    node: str | None = NODE,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    zone: str | None = None,
    hints: Iterable[str] = (),
) -> Endpoint:
    return Endpoint(
        ip=ipaddress.ip_address(ip),
        port=port,
        ready=ready,
        serving=ready if serving is None else serving,
        terminating=terminating,
        node_name=node,
        zone=zone,
        hints=frozenset(hints),
    )


def state(
    svc: ServicePort, endpoints: Iterable[Endpoint] = (), node_info: NodeInfo | None = None
) -> ServicePortState:
    return select.categorize(svc, tuple(endpoints), node_info or node())


def plan(
    states: Iterable[ServicePortState],
    *,
    node_info: NodeInfo | None = None,
    full_sync: bool = True,
    changed: Iterable[ServicePortName] | None = None,
    removed: Iterable[ServicePortName] = (),
    service_cidrs: Iterable[str] = (),
) -> Plan:
    services = {s.name: s for s in states}
    return Plan(
        node=node_info or node(),
        services=MappingProxyType(services),
        changed=frozenset(services if changed is None else changed),
        removed=frozenset(removed),
        full_sync=full_sync,
        service_cidrs=tuple(ipaddress.ip_network(c) for c in service_cidrs),
    )


def synthetic_states(
    count: int, endpoints_per_service: int = 5, node_name: str = NODE
) -> list[ServicePortState]:
    """``count`` service ports (a mix of ClusterIP, NodePort and LoadBalancer)."""
    states = []
    nodes = (node_name, "node-b", "node-c")
    next_node_port = 30000
    for i in range(count):
        kind = ("ClusterIP", "NodePort", "LoadBalancer")[i % 3]
        if kind != "ClusterIP" and next_node_port > 32767:
            kind = "ClusterIP"  # the NodePort range is exhausted; nodePorts are unique
        node_port = None
        if kind != "ClusterIP":
            node_port, next_node_port = next_node_port, next_node_port + 1
        svc = service(
            f"svc-{i}",
            namespace=f"ns-{i % 50}",
            cluster_ip=str(ipaddress.IPv4Address("10.96.0.0") + 10 + i),
            type=kind,
            node_port=node_port,
            lb_ips=(str(ipaddress.IPv4Address("172.18.0.0") + 10 + i),)
            if kind == "LoadBalancer"
            else (),
        )
        eps = [
            endpoint(
                str(ipaddress.IPv4Address("10.244.0.0") + 10 + i * endpoints_per_service + j),
                node=nodes[j % 3],
            )
            for j in range(endpoints_per_service)
        ]
        states.append(state(svc, eps, node(node_name)))
    return states
