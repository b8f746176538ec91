"""Restart adoption in the guest's kernel, with many virtual services: a new backend's
first full sync reads every virtual service and its real servers back and finds exactly
the differences made behind the agent's back (a real server deleted, one re-weighted,
one added, a scheduler changed) — real servers attributed to the wrong virtual service
would show up as differences of their own — sends exactly those, and then nothing."""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess

from kpy_ipvs import IpvsBackend, _dest_spec, _service_spec
from kpy_ipvs.apply import Snapshot
from kpy_ipvs.render import DestKey

from kpy.core.backend import BackendConfig
from kpy.testing import builders as b

SERVICES = 300  # ~600 virtual services (ClusterIP, NodePort, LoadBalancer), 5 servers each
NODE_IP = "192.168.50.1"


def new_backend() -> IpvsBackend:
    node = b.node(addresses=[NODE_IP])
    return IpvsBackend(
        BackendConfig(node_name=node.name, node_ips=(ipaddress.ip_address(NODE_IP),))
    )


def restart(backend: IpvsBackend) -> IpvsBackend:
    """A new agent's backend; the old one's sockets and thread are closed first."""
    backend.close()
    return new_backend()


def snapshot(backend: IpvsBackend) -> Snapshot:
    return backend._kernel._executor.submit(backend._kernel.snapshot).result()


def ipvsadm(command: str, spec: str, *args: str) -> None:
    subprocess.run(["ipvsadm", command, *spec.split(), *args], check=True, capture_output=True)


def operations(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_adoption_finds_exactly_the_real_servers_changed_behind_its_back() -> None:
    node = b.node(addresses=[NODE_IP])
    plan = b.plan(b.synthetic_states(SERVICES), node_info=node)
    backend = new_backend()
    try:
        assert asyncio.run(backend.apply(plan)).ops > 0
        snap = snapshot(backend)
        assert len(snap.services) > SERVICES
        assert len(snap.destinations) == 5 * len(snap.services)

        backend = restart(backend)  # nothing changed: nothing to send
        assert asyncio.run(backend.apply(plan)).ops == 0
        assert snapshot(backend) == snap

        # Changes spread over the dump, in four different virtual services.
        dests = sorted(snap.destinations, key=str)
        step = len(dests) // 4
        deleted, reweighted, crowded, rescheduled = (dests[i * step + 2] for i in range(4))
        assert len({d.virtual for d in (deleted, reweighted, crowded, rescheduled)}) == 4
        extra = DestKey(
            virtual=crowded.virtual, address=ipaddress.ip_address("10.250.9.9"), port=8080
        )
        weight = snap.destinations[reweighted].weight
        scheduler = snap.services[rescheduled.virtual].scheduler
        ipvsadm("-d", _dest_spec(deleted))
        ipvsadm("-e", _dest_spec(reweighted), "-m", "-w", str(weight + 6))
        ipvsadm("-a", _dest_spec(extra), "-m", "-w", "1")
        ipvsadm("-E", _service_spec(rescheduled.virtual), "-s", "wrr")

        backend = restart(backend)
        expected = {
            f"-a {_dest_spec(deleted)} -m -w {snap.destinations[deleted].weight}",
            f"-e {_dest_spec(reweighted)} -m -w {weight}",
            f"-d {_dest_spec(extra)}",
            f"-E {_service_spec(rescheduled.virtual)} -s {scheduler}",
        }
        assert set(operations(asyncio.run(backend.dry_run(plan)))) == expected
        assert asyncio.run(backend.apply(plan)).ops == len(expected)

        backend = restart(backend)
        assert asyncio.run(backend.apply(plan)).ops == 0
        assert snapshot(backend) == snap
    finally:
        try:
            asyncio.run(backend.cleanup())
        finally:
            backend.close()
