"""The change tracker: converted objects in, one :class:`~kpy.model.Plan` per sync out.

Events only record what changed and mark the owning Service dirty; all work happens in
:meth:`Tracker.checkout`, which recomputes the node-local state of the dirty Services
alone and compares it with what the last Plan held. A Service updated ten times
between two syncs costs one recomputation, and one whose final state equals the
previous one vanishes from the Plan — upstream kube-proxy's {previous, current} pairs.

A change of this node (name, addresses, zone) changes what every Service selects, so it
recomputes everything and makes the Plan a full sync.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import MappingProxyType

from kpy import convert, select
from kpy.model import (
    Endpoint,
    NodeInfo,
    Plan,
    Protocol,
    ServiceName,
    ServicePort,
    ServicePortName,
    ServicePortState,
    StaleFlow,
)


class Tracker:
    """Holds the converted cluster state and the node-local state of the last Plan."""

    def __init__(self, node_name: str) -> None:
        self._node = NodeInfo(name=node_name)
        self._services: dict[ServiceName, convert.Service] = {}
        self._slices: dict[ServiceName, dict[str, convert.EndpointSlice]] = {}
        self._slice_owner: dict[tuple[str, str], ServiceName] = {}
        self._state: dict[ServicePortName, ServicePortState] = {}
        self._ports_of: dict[ServiceName, frozenset[ServicePortName]] = {}
        self._dirty: set[ServiceName] = set()
        self._full = True
        self._trigger_times: list[float] = []

    # ----------------------------------------------------------------- events

    @property
    def node(self) -> NodeInfo:
        return self._node

    @property
    def pending(self) -> bool:
        return self._full or bool(self._dirty)

    @property
    def pending_count(self) -> int:
        return len(self._dirty)

    def set_service(self, name: ServiceName, service: convert.Service | None) -> None:
        """Record a Service (None: deleted)."""
        if service is None:
            if self._services.pop(name, None) is None:
                return
        else:
            if self._services.get(name) == service:
                return
            self._services[name] = service
        self._dirty.add(name)

    def set_slice(
        self,
        namespace: str,
        slice_name: str,
        endpoint_slice: convert.EndpointSlice | None,
        trigger_time: float | None = None,
    ) -> None:
        """Record an EndpointSlice (None: deleted). A slice may move between Services."""
        key = (namespace, slice_name)
        old_owner = self._slice_owner.get(key)
        if old_owner is not None and (
            endpoint_slice is None or old_owner.name != endpoint_slice.service
        ):
            slices = self._slices.get(old_owner, {})
            slices.pop(slice_name, None)
            if not slices:
                self._slices.pop(old_owner, None)
            del self._slice_owner[key]
            self._dirty.add(old_owner)
        if endpoint_slice is not None:
            owner = ServiceName(namespace=namespace, name=endpoint_slice.service)
            slices = self._slices.setdefault(owner, {})
            if slices.get(slice_name) == endpoint_slice:
                return
            slices[slice_name] = endpoint_slice
            self._slice_owner[key] = owner
            self._dirty.add(owner)
        if trigger_time is not None:
            self._trigger_times.append(trigger_time)

    def set_node(self, node: NodeInfo) -> None:
        """Record this node; any change makes the next Plan a full recomputation."""
        if node != self._node:
            self._node = node
            self._dirty.update(self._services)
            self._dirty.update(self._ports_of)
            self._full = True

    def request_full_sync(self) -> None:
        self._full = True

    # ----------------------------------------------------------------- checkout

    def _compute(self, name: ServiceName) -> dict[ServicePortName, ServicePortState]:
        service = self._services.get(name)
        if service is None:
            return {}
        slices = tuple(self._slices.get(name, {}).values())
        result = {}
        for port in service.ports:
            endpoints = convert.endpoints_for(port, slices) if slices else ()
            result[port.name] = select.categorize(port, endpoints, self._node)
        return result

    def checkout(self) -> Plan:
        """The Plan for the next sync; resets the pending changes."""
        changed: set[ServicePortName] = set()
        removed: set[ServicePortName] = set()
        stale: list[StaleFlow] = []
        for name in self._dirty:
            new = self._compute(name)
            old_keys = self._ports_of.get(name, frozenset())
            for key in old_keys - new.keys():
                old_state = self._state.pop(key)
                removed.add(key)
                stale.extend(_stale_on_removal(old_state))
            for key, state in new.items():
                previous = self._state.get(key)
                if previous != state:
                    self._state[key] = state
                    changed.add(key)
                    stale.extend(_stale_flows(previous, state))
            if new:
                self._ports_of[name] = frozenset(new)
            else:
                self._ports_of.pop(name, None)
        self._dirty.clear()
        full, self._full = self._full, False
        triggers, self._trigger_times = tuple(self._trigger_times), []
        stale.sort(key=lambda f: (str(f.protocol), str(f.destination), f.port, str(f.endpoint)))
        return Plan(
            node=self._node,
            services=MappingProxyType(self._state),
            changed=frozenset(changed),
            removed=frozenset(removed),
            stale_flows=tuple(dict.fromkeys(stale)),
            full_sync=full,
            trigger_times=triggers,
        )


def _frontends(service: ServicePort) -> Iterable[tuple[object, int]]:
    for ip in (*service.cluster_ips, *service.external_ips, *service.load_balancer_ips):
        yield ip, service.port
    if service.node_port is not None:
        yield None, service.node_port


def _targets(state: ServicePortState) -> set[Endpoint]:
    return set(state.internal) | set(state.external)


def _stale_on_removal(old: ServicePortState) -> list[StaleFlow]:
    if old.service.protocol is not Protocol.UDP or not old.service.has_vip:
        return []
    return [
        StaleFlow(protocol=Protocol.UDP, destination=ip, port=port)  # type: ignore[arg-type]
        for ip, port in _frontends(old.service)
    ]


def _stale_flows(old: ServicePortState | None, new: ServicePortState) -> list[StaleFlow]:
    """UDP conntrack entries made stale by a change, as upstream kube-proxy deletes them."""
    if new.service.protocol is not Protocol.UDP or not new.service.has_vip:
        return []
    flows: list[StaleFlow] = []
    old_targets = _targets(old) if old is not None else set()
    new_targets = _targets(new)
    if old is not None and old.service != new.service:
        # VIP, port or NodePort changed: entries to the old frontends are stale.
        old_fronts = set(_frontends(old.service))
        for ip, port in old_fronts - set(_frontends(new.service)):
            flows.append(StaleFlow(protocol=Protocol.UDP, destination=ip, port=port))  # type: ignore[arg-type]
    gone = {ep.ip for ep in old_targets} - {ep.ip for ep in new_targets}
    for ip, port in _frontends(new.service):
        for endpoint_ip in sorted(gone, key=str):
            flows.append(
                StaleFlow(protocol=Protocol.UDP, destination=ip, port=port, endpoint=endpoint_ip)  # type: ignore[arg-type]
            )
        if not old_targets and new_targets:
            # Rejects cached in conntrack while there was no endpoint must go.
            flows.append(StaleFlow(protocol=Protocol.UDP, destination=ip, port=port))  # type: ignore[arg-type]
    return flows
