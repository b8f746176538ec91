"""The objects the lab writes to a real API server, and what it reads back.

The lab plays kubelet for its pods: :func:`pod` is a Pod bound to its node and
:func:`running_status` the status kubelet would write for it. :func:`lab_objects` turns
example manifests (Services, EndpointSlices, Nodes) into what a real cluster holds:
Services selecting labelled Pods, the EndpointSlices left to the controller.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kpy.tools.lab.api_client import Client


def load_manifests(path: Path) -> list[dict[str, Any]]:
    """Every object in a YAML file (multi-document) or a directory of them, in order."""
    files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    objects: list[dict[str, Any]] = []
    for file in files:
        with file.open(encoding="utf-8") as f:
            objects += [doc for doc in yaml.safe_load_all(f) if isinstance(doc, dict)]
    return objects


def pod(
    name: str,
    node: str,
    labels: dict[str, str],
    ports: list[dict[str, Any]] | None = None,
    namespace: str = "default",
) -> dict[str, Any]:
    """A Pod bound to ``node`` (no scheduler: ``nodeName`` set at creation, as kubelet's
    static pods or a bound pod would be)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 30,
            "containers": [{"name": "echo", "image": "kpy.invalid/echo", "ports": ports or []}],
        },
    }


def running_status(ips: list[str], host_ip: str, *, ready: bool = True) -> dict[str, Any]:
    """The status kubelet writes for a running pod (phase, IPs, Ready condition)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    condition = "True" if ready else "False"
    return {
        "phase": "Running",
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "podIP": ips[0],
        "podIPs": [{"ip": ip} for ip in ips],
        "startTime": now,
        "conditions": [
            {"type": t, "status": condition if t in ("Ready", "ContainersReady") else "True",
             "lastTransitionTime": now}
            for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
        ],
    }  # fmt: skip


LAB_LABEL = "kpy.lab/"  # pod label prefix: the Services a lab pod is an endpoint of


@dataclass
class LabObjects:
    """Manifests (Services, EndpointSlices, Nodes) turned into what a real cluster has:
    Services select the pods their example EndpointSlices name (one label per Service),
    the slices themselves are left to the EndpointSlice controller, and each lab pod
    becomes a Pod bound to its node."""

    nodes: list[dict[str, Any]] = field(default_factory=list)
    services: list[dict[str, Any]] = field(default_factory=list)
    slices: list[dict[str, Any]] = field(default_factory=list)  # of Services without selector
    pods: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def lab_objects(objects: list[dict[str, Any]], pods: dict[str, str]) -> LabObjects:
    """``pods``: lab pod name → its node. Pods named by no slice get no Service label."""
    out = LabObjects()
    members: dict[tuple[str, str], set[str]] = {}
    ports: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in pods}
    selected = {
        (o["metadata"].get("namespace", "default"), o["metadata"]["name"])
        for o in objects
        if o.get("kind") == "Service" and (o.get("spec") or {}).get("selector")
    }
    for obj in objects:
        if obj.get("kind") != "EndpointSlice":
            continue
        meta = obj["metadata"]
        ns = meta.get("namespace", "default")
        service = (meta.get("labels") or {}).get("kubernetes.io/service-name", "")
        if (ns, service) not in selected:
            out.slices.append(obj)
            continue
        for ep in obj.get("endpoints") or []:
            name = (ep.get("targetRef") or {}).get("name", "")
            if name in pods:
                members.setdefault((ns, service), set()).add(name)
                for port in obj.get("ports") or []:
                    if port.get("name") and port.get("port"):
                        ports[name].setdefault(
                            port["name"],
                            {"name": port["name"], "containerPort": port["port"],
                             "protocol": port.get("protocol", "TCP")},
                        )  # fmt: skip
    labels: dict[str, dict[str, str]] = {name: {} for name in pods}
    for obj in objects:
        kind = obj.get("kind")
        if kind == "Node":
            out.nodes.append(obj)
        elif kind == "Service":
            svc = json.loads(json.dumps(obj))
            meta, spec = svc["metadata"], svc.setdefault("spec", {})
            ns = meta.setdefault("namespace", "default")
            if spec.get("selector"):
                label = f"{LAB_LABEL}{meta['name']}"
                spec["selector"] = {label: "true"}
                for name in members.get((ns, meta["name"]), ()):
                    labels[name][label] = "true"
            if "healthCheckNodePort" in spec and spec.get("type") != "LoadBalancer":
                del spec["healthCheckNodePort"]
                out.notes.append(
                    f"{ns}/{meta['name']}: healthCheckNodePort dropped (the API server allows "
                    "it only on LoadBalancer Services with externalTrafficPolicy Local)"
                )
            out.services.append(svc)
    for name, node in pods.items():
        # Kubernetes' name rules: a port name is at most 15 characters
        container_ports = [p for p in ports[name].values() if len(p["name"]) <= 15]
        out.pods.append(pod(name, node, labels[name], container_ports))
    return out


def list_objects(client: Client) -> list[dict[str, Any]]:
    """Every Service, EndpointSlice and Node, each with its ``kind`` (a list's items lack it)."""
    out: list[dict[str, Any]] = []
    for path, kind, version in (
        ("/api/v1/services", "Service", "v1"),
        ("/apis/discovery.k8s.io/v1/endpointslices", "EndpointSlice", "discovery.k8s.io/v1"),
        ("/api/v1/nodes", "Node", "v1"),
    ):
        for item in client.get(path).get("items") or []:
            item["kind"], item["apiVersion"] = kind, version
            out.append(item)
    return out
