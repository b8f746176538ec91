"""What the userspace proxy must hold for one service port (pure: no I/O, no clock).

A service port becomes a :class:`PortTable`: the VIP addresses that must sit on the
node namespace's ``lo``, the sockets to listen on (:class:`Frontend`, each with what it
does with a new flow: forward, reject or drop), and the endpoint lists the relay picks
from. The data plane (:mod:`kpy_userspace.proxy`) compares tables with ``==`` to find
what changed, and :func:`objects` turns a table into the keyed objects ``observe()``
reports, so ``diff.compute`` shows drift.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from kpy.core.backend import BackendConfig, ServiceView, desired_view
from kpy.core.model import (
    Endpoint,
    IPAddress,
    IPNetwork,
    Protocol,
    ServicePortName,
    ServicePortState,
    SessionAffinity,
)

# IFA_PROTO stamped on every address this backend adds to ``lo``: how a restarted agent
# tells its own addresses from anyone else's (the kernel reserves 0-3 for itself).
ADDRESS_PROTO = 0x6B
INTERFACE = "lo"


class Role(enum.StrEnum):
    """Which endpoint list a frontend's traffic goes to."""

    INTERNAL = "internal"  # ClusterIP: ServicePortState.internal
    EXTERNAL = "external"  # NodePort, LoadBalancer, externalIPs: ServicePortState.external


class Disposition(enum.StrEnum):
    """What a frontend does with a new connection or datagram."""

    FORWARD = "forward"  # listen and relay to an endpoint
    REJECT = "reject"  # nothing listens: the kernel answers RST / ICMP port unreachable
    DROP = "drop"  # a listener whose socket filter drops every packet (Local policy, none here)


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class ListenKey:
    """One listening socket. ``address`` "" means every address of ``family`` (NodePort)."""

    protocol: Protocol
    family: int  # 4 or 6
    address: str
    port: int

    def __str__(self) -> str:
        host = self.address or "*"
        if self.family == 6 and self.address:
            host = f"[{host}]"
        return f"{host}:{self.port}/{self.protocol}/v{self.family}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Frontend:
    key: ListenKey
    role: Role
    source_ranges: tuple[IPNetwork, ...] = ()  # empty: any client


@dataclass(frozen=True, slots=True, kw_only=True)
class PortTable:
    """Everything the proxy needs for one service port."""

    name: ServicePortName
    frontends: tuple[Frontend, ...]
    addresses: frozenset[IPAddress]
    internal: tuple[Endpoint, ...]
    external: tuple[Endpoint, ...]
    has_endpoints: bool  # any usable endpoint anywhere: reject vs drop
    affinity_timeout: int | None  # seconds; None without ClientIP affinity
    view: ServiceView

    def endpoints(self, role: Role, family: int) -> tuple[Endpoint, ...]:
        eps = self.internal if role is Role.INTERNAL else self.external
        return tuple(ep for ep in eps if ep.ip.version == family)

    def disposition(self, frontend: Frontend) -> Disposition:
        """Forward while there is somewhere to send traffic. Otherwise, as the kernel
        backends do: reject when the Service has no usable endpoint at all, drop when it
        has some but a Local traffic policy excludes them all on this node."""
        if self.endpoints(frontend.role, frontend.key.family):
            return Disposition.FORWARD
        return Disposition.DROP if self.has_endpoints else Disposition.REJECT

    def listening(self) -> tuple[Frontend, ...]:
        """The frontends that need a socket (forward and drop; reject needs none)."""
        return tuple(fe for fe in self.frontends if self.disposition(fe) is not Disposition.REJECT)

    def endpoint_set(self) -> frozenset[Endpoint]:
        return frozenset(self.internal) | frozenset(self.external)


def _key(protocol: Protocol, address: IPAddress | None, family: int, port: int) -> ListenKey:
    return ListenKey(
        protocol=protocol,
        family=family,
        address="" if address is None else str(address),
        port=port,
    )


def nodeport_addresses(config: BackendConfig) -> tuple[IPAddress, ...] | None:
    """Where NodePorts listen: None (every local address, one wildcard socket per family)
    without ``nodeport_addresses``; otherwise the node addresses inside those ranges."""
    if not config.nodeport_addresses:
        return None
    return tuple(
        ip
        for ip in config.node_ips
        if any(ip.version == net.version and ip in net for net in config.nodeport_addresses)
    )


def port_table(
    state: ServicePortState,
    *,
    nodeport_addresses: Iterable[IPAddress] | None = None,
    primary_ips: tuple[IPAddress, ...] = (),
) -> PortTable | None:
    """The table for one service port; None when it has no VIP (headless, ExternalName)
    or a protocol the proxy does not relay (SCTP).

    ``nodeport_addresses`` None: NodePorts listen on every address of the family;
    otherwise on exactly those addresses (those of the Service's families).
    ``primary_ips``: the node's primary IP per family; where a loadBalancerSourceRange
    holds it, the Service's own LB IPs are allowed sources too, as upstream's firewall
    (:meth:`kpy.core.model.ServicePort.firewall_sources`): the node reaching an LB IP on ``lo``
    has that IP as its source.
    """
    svc = state.service
    if not svc.has_vip or svc.protocol is Protocol.SCTP:
        return None
    proto = svc.protocol
    families = sorted({ip.version for ip in svc.cluster_ips})
    fronts: dict[ListenKey, Frontend] = {}

    def add(key: ListenKey, role: Role, ranges: tuple[IPNetwork, ...] = ()) -> None:
        fronts.setdefault(key, Frontend(key=key, role=role, source_ranges=ranges))

    for ip in svc.cluster_ips:
        add(_key(proto, ip, ip.version, svc.port), Role.INTERNAL)
    for ip in svc.external_ips:
        add(_key(proto, ip, ip.version, svc.port), Role.EXTERNAL)
    allowed = svc.firewall_sources(primary_ips) if svc.load_balancer_source_ranges else ()
    for ip in svc.load_balancer_ips:
        # Per family, as upstream: ranges of the other family only mean no filter here.
        fam_ranges = (
            tuple(n for n in allowed if n.version == ip.version)
            if svc.firewalled(ip.version)
            else ()
        )
        add(_key(proto, ip, ip.version, svc.port), Role.EXTERNAL, fam_ranges)
    if svc.node_port is not None:
        if nodeport_addresses is None:
            for fam in families:
                add(_key(proto, None, fam, svc.node_port), Role.EXTERNAL)
        else:
            for ip in nodeport_addresses:
                if ip.version in families:
                    add(_key(proto, ip, ip.version, svc.node_port), Role.EXTERNAL)
    vips = {*svc.cluster_ips, *svc.external_ips, *svc.load_balancer_ips}
    return PortTable(
        name=svc.name,
        frontends=tuple(fronts[k] for k in sorted(fronts)),
        addresses=frozenset(vips),
        internal=tuple(sorted(state.internal, key=Endpoint.sort_key)),
        external=tuple(sorted(state.external, key=Endpoint.sort_key)),
        has_endpoints=state.has_endpoints,
        affinity_timeout=(
            svc.affinity_timeout if svc.session_affinity is SessionAffinity.CLIENT_IP else None
        ),
        view=desired_view(state),
    )


def address_key(address: IPAddress) -> str:
    return f"address/{address}"


def objects(table: PortTable) -> dict[str, object]:
    """The keyed objects one table stands for: its addresses, listeners and endpoints."""
    result: dict[str, object] = {address_key(a): INTERFACE for a in table.addresses}
    for fe in table.listening():
        result[f"listener/{fe.key}"] = f"{table.name} {table.disposition(fe)}"
    result[f"table/{table.name}"] = (
        tuple(str(ep) for ep in table.internal),
        tuple(str(ep) for ep in table.external),
    )
    return result


__all__ = [
    "ADDRESS_PROTO",
    "INTERFACE",
    "Disposition",
    "Frontend",
    "ListenKey",
    "PortTable",
    "Role",
    "address_key",
    "nodeport_addresses",
    "objects",
    "port_table",
]
