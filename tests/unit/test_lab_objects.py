"""The lab's manifests as a real API server takes them (kpy.tools.lab.control_plane)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kpy.tools.lab.cluster_objects import lab_objects

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _service(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "Service", "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def test_health_check_node_port_kept_only_where_the_api_server_allows_it() -> None:
    lb = {"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32001}
    np = {"type": "NodePort", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000}
    out = lab_objects([_service("lb", lb), _service("np", np)], pods={})
    by = {s["metadata"]["name"]: s["spec"] for s in out.services}
    assert by["lb"]["healthCheckNodePort"] == 32001
    assert "healthCheckNodePort" not in by["np"]
    assert out.notes == [
        "default/np: healthCheckNodePort dropped (the API server allows it only on "
        "LoadBalancer Services with externalTrafficPolicy Local)"
    ]


def test_the_examples_need_no_field_dropped() -> None:
    objects = [
        doc
        for path in sorted(EXAMPLES.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    assert lab_objects(objects, pods={}).notes == []
