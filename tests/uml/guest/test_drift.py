"""Drift of the IPVS backend in the guest's kernel: a virtual service and a real server
deleted behind the agent's back are flagged by ``kpy dump`` and restored by one full
sync (a partial sync trusts its record and reads nothing)."""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

from kpy_ipvs import IpvsBackend

from kpy.core.backend import BackendConfig
from kpy.core.model import Plan
from kpy.testing import builders as b
from kpy.testing.conformance import conformance_states
from kpy.tools import dump


def drifted(backend: IpvsBackend, plan: Plan) -> dict[str, Any]:
    rows = dump.rows(plan, asyncio.run(backend.observe()))
    return {row["service"]: row for row in rows if row["drift"]}


def ipvsadm(*args: str) -> None:
    subprocess.run(["ipvsadm", *args], check=True, capture_output=True)


def test_a_deleted_virtual_service_and_real_server_are_restored_by_one_full_sync() -> None:
    backend = IpvsBackend(BackendConfig(node_name="node-a"))
    plan = b.plan(conformance_states())
    try:
        asyncio.run(backend.apply(plan))
        assert not drifted(backend, plan)
        before = asyncio.run(backend.observe()).objects
        ipvsadm("-D", "-t", "10.96.0.10:80")  # web's ClusterIP
        ipvsadm("-d", "-u", "10.96.0.17:53", "-r", "10.244.1.14:5353")  # dns's one server
        flagged = drifted(backend, plan)
        assert flagged["default/web:http/TCP"]["programmed"] is None  # its only frontend
        # A virtual service left without real servers names no service port any more:
        # dump shows dns as holding nothing, or holding no endpoint.
        dns = flagged["default/dns:dns/UDP"]["programmed"]
        assert dns is None or dns["endpoints"] == []
        partial = asyncio.run(backend.apply(b.plan(plan.services.values(), full_sync=False)))
        assert partial.ops == 0
        repaired = asyncio.run(backend.apply(b.plan(plan.services.values())))
        assert repaired.full_sync and repaired.ops >= 2  # a service (and its servers), a server
        assert asyncio.run(backend.observe()).objects == before
        assert not drifted(backend, plan)
        assert asyncio.run(backend.apply(b.plan(plan.services.values()))).ops == 0
    finally:
        try:
            asyncio.run(backend.cleanup())
        finally:
            backend.close()
