"""Kubernetes objects as an API server serves them (plain dicts), for tests.

A Service, an EndpointSlice, a Node and a ServiceCIDR with the fields most tests need;
keyword arguments give the rest. Feed them to :class:`kpy.testing.apiserver.FakeApiServer`
or to :mod:`kpy.core.convert`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

HTTP = {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}
HTTP_ENDPOINT = {"name": "http", "port": 8080, "protocol": "TCP"}


def service(
    name: str = "web",
    namespace: str = "default",
    *,
    ip: str = "10.96.0.10",
    ports: Iterable[dict[str, Any]] = (HTTP,),
    **spec: Any,
) -> dict[str, Any]:
    """A ClusterIP Service on ``ip`` with ``ports`` (port http 80 to 8080/TCP); ``spec``
    adds to or replaces fields of its spec."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "ports": [dict(p) for p in ports], **spec},
    }


def endpoint_slice(
    name: str,
    service: str,
    addresses: Iterable[str],
    *,
    namespace: str = "default",
    node: str | None = "node-a",
    ports: Iterable[dict[str, Any]] = (HTTP_ENDPOINT,),
) -> dict[str, Any]:
    """An IPv4 EndpointSlice of ``service`` with one ready endpoint per address, on
    ``node`` (none named if None)."""
    on_node = {"nodeName": node} if node is not None else {}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [dict(p) for p in ports],
        "endpoints": [
            {"addresses": [a], "conditions": {"ready": True}, **on_node} for a in addresses
        ],
    }


def node(
    name: str = "node-a", address: str = "192.168.50.2", pod_cidr: str | None = None
) -> dict[str, Any]:
    """A Node with one InternalIP (and a podCIDR if given)."""
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "status": {"addresses": [{"type": "InternalIP", "address": address}]},
    }
    if pod_cidr is not None:
        obj["spec"] = {"podCIDR": pod_cidr}
    return obj


def service_cidr(name: str, *cidrs: str) -> dict[str, Any]:
    """A ServiceCIDR (cluster-scoped) of ``cidrs``."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "ServiceCIDR",
        "metadata": {"name": name},
        "spec": {"cidrs": list(cidrs)},
    }
