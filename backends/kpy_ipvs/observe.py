"""Kernel snapshot → :class:`~kpy.core.backend.Programmed`, for ``kpy dump`` and drift checks.

IPVS does not record which Service a virtual service belongs to, so the per-service
views are attributed through what this backend rendered (the service ports it was last
told about); virtual services kpy owns but cannot attribute (e.g. read before the first
sync of a restarted agent) are listed under ``?<frontend>``. Real servers with weight 0
are draining (graceful termination): they are shown in ``extra``, not as endpoints; so
are the short-circuit (firewall-mark) virtual services' real servers.
"""

from __future__ import annotations

from collections.abc import Mapping, Set

from kpy.core.backend import Programmed, ServiceView, frontend
from kpy.core.model import ServicePortName
from kpy_ipvs.apply import DestStatus, Snapshot
from kpy_ipvs.render import DestKey, PortObjects, VirtualKey


def objects(snap: Snapshot, owned: Set[VirtualKey]) -> dict[str, object]:
    """The keyed kernel objects, with the same values render produces."""
    result: dict[str, object] = {}
    for key, settings in snap.services.items():
        if key in owned:
            result[f"service {key}"] = settings
    for dest, status in snap.destinations.items():
        if dest.virtual in owned:
            result[f"dest {dest}"] = status.weight
    for addr in snap.addresses:
        result[f"address {addr}"] = True
    for el in snap.elements:
        result[f"element {el}"] = True
    return result


def _endpoint(dest: DestKey) -> str:
    if dest.address.version == 6:
        return f"[{dest.address}]:{dest.port}"
    return f"{dest.address}:{dest.port}"


def programmed(
    backend: str,
    snap: Snapshot,
    owned: Set[VirtualKey],
    ports: Mapping[ServicePortName, PortObjects],
    *,
    pending: Set[DestKey] = frozenset(),
) -> Programmed:
    owner: dict[VirtualKey, tuple[ServicePortName, bool]] = {}
    for name, objs in ports.items():
        for key in objs.services:
            owner[key] = (name, key in objs.node_ports)
    by_dest: dict[VirtualKey, list[tuple[DestKey, DestStatus]]] = {}
    for dest, status in snap.destinations.items():
        by_dest.setdefault(dest.virtual, []).append((dest, status))

    fronts: dict[str, set[str]] = {}
    endpoints: dict[str, set[str]] = {}
    extra: dict[str, dict[str, str]] = {}
    for key in sorted(owned, key=str):
        if key not in snap.services:
            continue
        found = owner.get(key)
        label = str(found[0]) if found is not None else f"?{key}"
        if key.fwmark:
            # pods' and the node's way to an externalTrafficPolicy Local frontend: not a
            # frontend of its own, and its (cluster-wide) real servers are not the view's
            facts = extra.setdefault(label, {})
            facts[f"short-circuit {key}"] = " ".join(
                _endpoint(d) for d, st in sorted(by_dest.get(key, []), key=lambda d: str(d[0]))
            )
            continue
        node_port = found is not None and found[1]
        text = frontend(None, key.port, str(key.protocol)) if node_port else str(key)
        fronts.setdefault(label, set()).add(text)
        eps = endpoints.setdefault(label, set())
        facts = extra.setdefault(label, {})
        settings = snap.services[key]
        facts["scheduler"] = settings.scheduler
        if settings.persistence:
            facts["persistence"] = str(settings.persistence)
        for dest, status in sorted(by_dest.get(key, []), key=lambda d: str(d[0])):
            if status.weight > 0:
                eps.add(_endpoint(dest))
            else:
                state = "draining" if dest in pending else "weight-0"
                facts[f"{state} {dest}"] = f"active={status.active} inactive={status.inactive}"
            facts[f"conns {dest}"] = f"{status.active}/{status.inactive}"
    services = {
        label: ServiceView(
            frontends=tuple(sorted(fronts[label])),
            endpoints=tuple(sorted(endpoints[label])),
            extra=extra[label],
        )
        for label in fronts
    }
    return Programmed(backend=backend, objects=objects(snap, owned), services=services)
