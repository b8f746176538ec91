"""Frozen values that describe what one node must do for every Service.

Everything past :mod:`kpy.core.convert` speaks in these types: no Kubernetes dict travels
further.  They are immutable and hashable, so the tracker and the backends can compare
them with ``==`` and use them as dictionary keys.

The shape follows upstream kube-proxy's ``ServicePortName`` / ``ServicePort`` /
``Endpoint`` split: one :class:`ServicePort` per (Service, port), because every port of
a Service is programmed independently.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field and the reason."""


class Protocol(enum.StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


class IPFamily(enum.StrEnum):
    IPV4 = "IPv4"
    IPV6 = "IPv6"

    @staticmethod
    def of(address: IPAddress | IPNetwork) -> IPFamily:
        return IPFamily.IPV4 if address.version == 4 else IPFamily.IPV6


class ServiceType(enum.StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"
    EXTERNAL_NAME = "ExternalName"


class TrafficPolicy(enum.StrEnum):
    CLUSTER = "Cluster"
    LOCAL = "Local"


class SessionAffinity(enum.StrEnum):
    NONE = "None"
    CLIENT_IP = "ClientIP"


DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds, the API server's default


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class ServiceName:
    """A Service by namespace and name."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class ServicePortName:
    """One port of one Service: the unit kpy programs."""

    namespace: str
    name: str
    port: str  # the port's name; "" for an unnamed single port
    protocol: Protocol

    @property
    def service(self) -> ServiceName:
        return ServiceName(namespace=self.namespace, name=self.name)

    def __str__(self) -> str:
        port = f":{self.port}" if self.port else ""
        return f"{self.namespace}/{self.name}{port}/{self.protocol}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServicePort:
    """What the API says about one Service port (not yet about this node)."""

    name: ServicePortName
    type: ServiceType = ServiceType.CLUSTER_IP
    cluster_ips: tuple[IPAddress, ...] = ()  # one per family, primary first; () when headless
    headless: bool = False
    external_name: str | None = None  # ExternalName target
    port: int = 0
    protocol: Protocol = Protocol.TCP
    target_port: int | str = 0
    node_port: int | None = None
    external_ips: tuple[IPAddress, ...] = ()
    load_balancer_ips: tuple[IPAddress, ...] = ()
    load_balancer_source_ranges: tuple[IPNetwork, ...] = ()
    session_affinity: SessionAffinity = SessionAffinity.NONE
    affinity_timeout: int = DEFAULT_AFFINITY_TIMEOUT
    external_traffic_policy: TrafficPolicy = TrafficPolicy.CLUSTER
    internal_traffic_policy: TrafficPolicy = TrafficPolicy.CLUSTER
    health_check_node_port: int | None = None
    traffic_distribution: str | None = None
    topology_mode: str | None = (
        None  # service.kubernetes.io/topology-mode (or legacy hints annotation)
    )
    annotations: tuple[tuple[str, str], ...] = ()  # only kpy's own kpy.io/* annotations

    @property
    def has_vip(self) -> bool:
        return bool(self.cluster_ips) and not self.headless and self.external_name is None

    @property
    def externally_accessible(self) -> bool:
        """True when traffic can arrive from outside the cluster (NodePort, LB, external IPs)."""
        return self.node_port is not None or bool(self.external_ips) or bool(self.load_balancer_ips)

    @property
    def external_policy_local(self) -> bool:
        return self.externally_accessible and self.external_traffic_policy is TrafficPolicy.LOCAL

    @property
    def internal_policy_local(self) -> bool:
        return self.internal_traffic_policy is TrafficPolicy.LOCAL

    def ips(self, family: IPFamily) -> tuple[IPAddress, ...]:
        return tuple(ip for ip in self.cluster_ips if IPFamily.of(ip) is family)

    def firewalled(self, version: int) -> bool:
        """Whether this IP family's load-balancer IPs filter sources. As upstream, the
        ranges are taken per family: a family none of the ranges belongs to has no
        firewall, nor has one with a zero-masked range ("allow any")."""
        mine = [n for n in self.load_balancer_source_ranges if n.version == version]
        return bool(mine) and not any(n.prefixlen == 0 for n in mine)

    def firewall_sources(self, primary_ips: tuple[IPAddress, ...]) -> tuple[IPNetwork, ...]:
        """The sources this Service's load-balancer IPs accept when it has
        ``loadBalancerSourceRanges``, as upstream kube-proxy's firewall rules: the
        ranges, and — for a family where a range holds the node's primary IP
        (``primary_ips``, one per family) — the Service's own load-balancer IPs. A
        VIP-like load balancer's IP is often a local address of the node: the node
        reaching it, or a load balancer that SNATs hairpin traffic to it, has the LB IP
        as its source. An LB IP a range already holds is not repeated."""
        ranges = self.load_balancer_source_ranges
        allowed = list(ranges)
        for ip in self.load_balancer_ips:
            node_allowed = any(
                node.version == ip.version and _within(node, ranges) for node in primary_ips
            )
            if node_allowed and not _within(ip, ranges):
                allowed.append(ipaddress.ip_network(ip))
        return tuple(allowed)


def _within(ip: IPAddress, nets: tuple[IPNetwork, ...]) -> bool:
    return any(ip.version == n.version and ip in n for n in nets)


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """One backend address of one Service port, as EndpointSlices describe it."""

    ip: IPAddress
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None
    hints: frozenset[str] = frozenset()  # zone hints
    node_hints: frozenset[str] = frozenset()  # forNodes hints
    hostname: str | None = None

    @property
    def family(self) -> IPFamily:
        return IPFamily.of(self.ip)

    def sort_key(self) -> tuple[int, int, int]:
        """Deterministic order across families (addresses of two families don't compare)."""
        return (self.ip.version, int(self.ip), self.port)

    def __str__(self) -> str:
        if self.ip.version == 6:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfo:
    """This node, as far as Service programming cares."""

    name: str
    addresses: tuple[IPAddress, ...] = ()  # InternalIP then ExternalIP, in API order
    zone: str | None = None
    pod_cidrs: tuple[IPNetwork, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()

    def label(self, key: str) -> str | None:
        for k, v in self.labels:
            if k == key:
                return v
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class ServicePortState:
    """A service port as this node programs it: the Service and the chosen endpoints.

    ``endpoints`` is every endpoint known for the port (for the dump); ``internal`` is
    what traffic from inside the cluster is sent to, ``external`` what NodePort,
    LoadBalancer and external-IP traffic is sent to (local endpoints only under
    externalTrafficPolicy Local). An empty tuple means, as upstream kube-proxy does it:
    reject (TCP reset / ICMP port unreachable) when the Service has no usable endpoint
    anywhere (:attr:`has_endpoints` False), and drop when it has some but a Local policy
    excludes them all on this node.
    """

    service: ServicePort
    endpoints: tuple[Endpoint, ...] = ()
    internal: tuple[Endpoint, ...] = ()
    external: tuple[Endpoint, ...] = ()
    local: tuple[Endpoint, ...] = ()  # this node's usable endpoints (health check count)

    @property
    def name(self) -> ServicePortName:
        return self.service.name

    @property
    def has_endpoints(self) -> bool:
        """Any endpoint, anywhere, that could serve (ready, or serving while terminating)."""
        return any(ep.ready or (ep.serving and ep.terminating) for ep in self.endpoints)

    def internal_for(self, family: IPFamily) -> tuple[Endpoint, ...]:
        return tuple(ep for ep in self.internal if ep.family is family)

    def external_for(self, family: IPFamily) -> tuple[Endpoint, ...]:
        return tuple(ep for ep in self.external if ep.family is family)


@dataclass(frozen=True, slots=True, kw_only=True)
class StaleFlow:
    """A UDP conntrack entry that must be deleted so clients stop reaching a dead backend.

    ``endpoint`` None means every entry towards ``destination``:``port`` (a Service that
    went from no endpoints to some, whose cached reject entries must go). ``destination``
    None means any local address (a NodePort).
    """

    protocol: Protocol
    destination: IPAddress | None
    port: int
    endpoint: IPAddress | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Conflict:
    """A frontend a service port claims but does not get: another port holds it.

    Two Services claiming one address and port (or one NodePort) is invalid input — or an
    attempt to take over someone else's traffic (an ``externalIPs`` entry naming another
    Service's ClusterIP). The address the cluster allocated wins: ClusterIP, then
    load-balancer ingress, then user-supplied external IPs, then the older Service, then
    the name; the loser is programmed without the frontend.
    """

    frontend: str  # "10.96.0.10:80/TCP", "*:30080/TCP" for a NodePort
    claimed_as: str  # ClusterIP, LoadBalancer, ExternalIP or NodePort: how the loser claims it
    held_by: ServicePortName
    held_as: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What one sync must do: the full node-local state and what changed since the last.

    ``services`` is a read-only view owned by the tracker; it stays valid until the
    tracker's next ``checkout()``. ``conflicts`` names every service port programmed
    without a frontend it claims (see :class:`Conflict`); ``refused`` every service port
    the backend refused, kept at its last programmed state (see :mod:`kpy.agent.quarantine`).
    """

    node: NodeInfo
    services: Mapping[ServicePortName, ServicePortState]
    changed: frozenset[ServicePortName] = frozenset()
    removed: frozenset[ServicePortName] = frozenset()
    stale_flows: tuple[StaleFlow, ...] = ()
    full_sync: bool = False
    trigger_times: tuple[float, ...] = field(default=(), compare=False)
    conflicts: Mapping[ServicePortName, tuple[Conflict, ...]] = field(
        default_factory=dict, compare=False
    )
    refused: Mapping[ServicePortName, str] = field(default_factory=dict, compare=False)
    # The CIDRs of the cluster's ServiceCIDR objects (networking.k8s.io/v1), each once,
    # IPv4 first, sorted: where the cluster allocates ClusterIPs. The nftables backend
    # drops traffic to an address in them that no Service has (with the configured
    # ``service_cidrs``); other backends ignore them, as upstream's iptables and ipvs modes.
    service_cidrs: tuple[IPNetwork, ...] = ()

    @property
    def needs_conntrack_cleanup(self) -> bool:
        return bool(self.stale_flows)
