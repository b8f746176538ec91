"""The change tracker: converted objects in, one :class:`~kpy.core.model.Plan` per sync out.

Events only record what changed and mark the owning Service dirty; all work happens in
:meth:`Tracker.checkout`, which recomputes the node-local state of the dirty Services
alone and compares it with what the last Plan held. A Service updated ten times
between two syncs costs one recomputation, and one whose final state equals the
previous one vanishes from the Plan — upstream kube-proxy's {previous, current} pairs.

A change of this node (name, addresses, zone) changes what every Service selects, so it
recomputes everything and makes the Plan a full sync. A change of the cluster's
ServiceCIDR objects changes no Service: the next Plan carries the new
:attr:`~kpy.core.model.Plan.service_cidrs` and nothing else.

Frontend conflicts are settled here, before any backend sees them: when two service
ports claim one frontend (address, port and protocol, or one NodePort), the address the
cluster allocated wins — ClusterIP, then load-balancer ingress, then user-supplied
external IPs (the CVE-2020-8554 class: an ``externalIPs`` entry naming someone else's
ClusterIP must not take it over), then the older Service, then the name. The loser is
programmed without that frontend, and :attr:`~kpy.core.model.Plan.conflicts` says so. An
index of claims keeps this O(what changed): only the holders of a frontend a dirty port
claims (or claimed) are looked at again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from types import MappingProxyType
from typing import TypeVar

from kpy.core import convert
from kpy.core import endpoints as select
from kpy.core.model import (
    Conflict,
    Endpoint,
    IPNetwork,
    NodeInfo,
    Plan,
    Protocol,
    ServiceName,
    ServicePort,
    ServicePortName,
    ServicePortState,
    StaleFlow,
)

K = TypeVar("K")
V = TypeVar("V")


def _record(store: dict[K, V], key: K, value: V | None) -> bool:
    """Put ``value`` at ``key`` (None: remove it); whether that changed ``store``."""
    if value is None:
        return store.pop(key, None) is not None
    if store.get(key) == value:
        return False
    store[key] = value
    return True


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
        # Frontend claims: every port's computed state before conflicts are settled, the
        # claims it makes, who claims each frontend (and how), and what each port lost.
        self._raw: dict[ServicePortName, ServicePortState] = {}
        self._claims_of: dict[ServicePortName, tuple[tuple[_Claim, str], ...]] = {}
        self._holders: dict[_Claim, dict[ServicePortName, str]] = {}
        self._conflicts: dict[ServicePortName, tuple[Conflict, ...]] = {}
        # ServiceCIDR objects by name → their CIDRs; the union, as the last Plan had it
        self._service_cidrs: dict[str, tuple[IPNetwork, ...]] = {}
        self._cidrs: tuple[IPNetwork, ...] = ()
        self._cidrs_changed = False

    # ----------------------------------------------------------------- events

    @property
    def node(self) -> NodeInfo:
        return self._node

    @property
    def pending(self) -> bool:
        return self._full or bool(self._dirty) or self._cidrs_changed

    @property
    def service_cidrs(self) -> tuple[IPNetwork, ...]:
        """The union of every ServiceCIDR's CIDRs (IPv4 first, sorted, each once)."""
        return _union(self._service_cidrs.values())

    @property
    def pending_count(self) -> int:
        return len(self._dirty)

    def set_service(self, name: ServiceName, service: convert.Service | None) -> None:
        """Record a Service (None: deleted)."""
        if _record(self._services, name, service):
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

    def set_service_cidr(self, name: str, cidrs: tuple[IPNetwork, ...] | None) -> None:
        """Record a ServiceCIDR object's CIDRs (None: deleted). Two objects may hold the
        same CIDR: it counts until neither does."""
        if _record(self._service_cidrs, name, cidrs):
            self._cidrs_changed = self.service_cidrs != self._cidrs

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
            result[port.name] = select.categorize(port, endpoints, self._node, presorted=True)
        return result

    def checkout(self) -> Plan:
        """The Plan for the next sync; resets the pending changes."""
        changed: set[ServicePortName] = set()
        removed: set[ServicePortName] = set()
        stale: list[StaleFlow] = []
        recheck: set[ServicePortName] = set()  # ports whose final state may have changed
        for name in self._dirty:
            new = self._compute(name)
            old_keys = self._ports_of.get(name, frozenset())
            for key in old_keys - new.keys():
                self._raw.pop(key, None)
                recheck.update(self._unclaim(key))
                self._conflicts.pop(key, None)
                old_state = self._state.pop(key)
                removed.add(key)
                stale.extend(_stale_on_removal(old_state))
            for key, state in new.items():
                if self._raw.get(key) == state and key in self._state:
                    continue
                recheck.update(self._unclaim(key))
                self._raw[key] = state
                recheck.update(self._claim(key, state))
                recheck.add(key)
            if new:
                self._ports_of[name] = frozenset(new)
            else:
                self._ports_of.pop(name, None)
        for key in recheck:
            raw = self._raw.get(key)
            if raw is None:
                continue
            state = self._settle(key, raw)
            previous = self._state.get(key)
            if previous != state:
                self._state[key] = state
                changed.add(key)
                stale.extend(_stale_flows(previous, state))
        self._dirty.clear()
        self._cidrs, self._cidrs_changed = self.service_cidrs, False
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
            conflicts=MappingProxyType(self._conflicts),
            service_cidrs=self._cidrs,
        )

    # ----------------------------------------------------------------- conflicts

    def _claim(self, key: ServicePortName, state: ServicePortState) -> set[ServicePortName]:
        """Index ``key``'s frontends; the other holders of any of them need a recheck."""
        claims = tuple(_claims(state.service))
        if claims:
            self._claims_of[key] = claims
        others: set[ServicePortName] = set()
        for claim, how in claims:
            holders = self._holders.setdefault(claim, {})
            others.update(holders)
            holders[key] = how
        return others

    def _unclaim(self, key: ServicePortName) -> set[ServicePortName]:
        others: set[ServicePortName] = set()
        for claim, _ in self._claims_of.pop(key, ()):
            holders = self._holders.get(claim)
            if holders is None:
                continue
            holders.pop(key, None)
            others.update(holders)
            if not holders:
                del self._holders[claim]
        return others

    def _rank(self, key: ServicePortName, how: str) -> tuple[int, str, str]:
        service = self._services.get(ServiceName(namespace=key.namespace, name=key.name))
        created = service.created if service is not None and service.created else "~"
        return (_CLAIM_RANK[how], created, str(key))

    def _settle(self, key: ServicePortName, raw: ServicePortState) -> ServicePortState:
        """``raw`` without the frontends another port holds; records the conflicts."""
        lost: list[Conflict] = []
        for claim, how in self._claims_of.get(key, ()):
            holders = self._holders[claim]
            if len(holders) == 1:
                continue
            winner = min(holders, key=lambda n: self._rank(n, holders[n]))
            if winner != key:
                lost.append(
                    Conflict(
                        frontend=_claim_text(claim),
                        claimed_as=how,
                        held_by=winner,
                        held_as=holders[winner],
                    )
                )
        if not lost:
            self._conflicts.pop(key, None)
            return raw
        self._conflicts[key] = tuple(lost)
        return dataclasses.replace(raw, service=_without(raw.service, lost))


def _union(groups: Iterable[tuple[IPNetwork, ...]]) -> tuple[IPNetwork, ...]:
    nets = {net for group in groups for net in group}
    return tuple(sorted(nets, key=lambda n: (n.version, int(n.network_address), n.prefixlen)))


_Claim = tuple[str, int, str]  # (address or "*" for a NodePort, port, protocol)
_CLAIM_RANK = {"ClusterIP": 0, "NodePort": 0, "LoadBalancer": 1, "ExternalIP": 2}


def _claims(service: ServicePort) -> Iterable[tuple[_Claim, str]]:
    proto = str(service.protocol)
    for how, ips in (
        ("ClusterIP", service.cluster_ips),
        ("LoadBalancer", service.load_balancer_ips),
        ("ExternalIP", service.external_ips),
    ):
        for ip in ips:
            yield (str(ip), service.port, proto), how
    if service.node_port is not None:
        yield ("*", service.node_port, proto), "NodePort"


def _claim_text(claim: _Claim) -> str:
    host, port, proto = claim
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}/{proto}"


def _without(service: ServicePort, lost: Iterable[Conflict]) -> ServicePort:
    gone = {c.frontend for c in lost}
    proto = str(service.protocol)

    def keep(ips: tuple[object, ...]) -> tuple[object, ...]:
        return tuple(ip for ip in ips if _claim_text((str(ip), service.port, proto)) not in gone)

    node_port = service.node_port
    if node_port is not None and _claim_text(("*", node_port, proto)) in gone:
        node_port = None
    return dataclasses.replace(
        service,
        cluster_ips=keep(service.cluster_ips),  # type: ignore[arg-type]
        load_balancer_ips=keep(service.load_balancer_ips),  # type: ignore[arg-type]
        external_ips=keep(service.external_ips),  # type: ignore[arg-type]
        node_port=node_port,
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
