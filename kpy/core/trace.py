"""Why does this packet go there? The pure answer behind ``kpy explain``.

Given a packet (source, destination, port, protocol, and where it comes from: a pod,
the node itself, or outside the cluster) and the node's Plan, say which Service port
frontend it hits (or why none), which traffic policy applies, which endpoints are
candidates and why each other endpoint is not (not ready, terminating while ready ones
exist, on another node under policy Local, filtered by topology, other IP family),
whether it is masqueraded and why, the loadBalancerSourceRanges verdict, and the end
result: forward, drop, reject, or accept (no Service rule touches it).

The rules are upstream kube-proxy's (iptables/nftables modes), in the order a packet
meets them. :func:`explain` is pure — Plan and options in, :class:`Explanation` out —
so it is table-tested and runs offline from manifests. The JSON form
(:meth:`Explanation.to_json`) is a stable contract: ``verdict``, ``service``,
``endpoints``, ``masquerade``, ``reasons``, ``kernel`` (plus descriptive extras).
``kernel`` lists the backend's kernel objects the packet traverses when a backend is
named: then ``verdict``, ``endpoints`` and ``masquerade`` come from that backend's own
:class:`Tracer` over the objects it renders (a render bug shows up in explain), not from
this module's computation; :func:`with_trace` merges the two and records any
disagreement as a reason.

The ``kpy explain`` command itself (flags, output) is :mod:`kpy.tools.explain`; this
module is pure and imports nothing of the shell, so every backend's tracer can use its
types.
"""

from __future__ import annotations

import enum
import ipaddress
import typing
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from kpy.core import endpoints as select
from kpy.core.backend import BackendConfig
from kpy.core.model import (
    Endpoint,
    IPAddress,
    IPFamily,
    IPNetwork,
    NodeInfo,
    Plan,
    Protocol,
    ServicePortState,
    SessionAffinity,
    TrafficPolicy,
)

# The offline commands' defaults: the first node of examples/, their default manifests.
DEMO_NODE = "node-1"
DEMO_NODE_IP = "192.168.100.11"


class Origin(enum.StrEnum):
    POD = "pod"
    NODE = "node"
    EXTERNAL = "external"


class Verdict(enum.StrEnum):
    FORWARD = "forward"
    DROP = "drop"
    REJECT = "reject"
    ACCEPT = "accept"  # no Service rule touches the packet


class Frontend(enum.StrEnum):
    CLUSTER_IP = "cluster_ip"
    NODE_PORT = "node_port"
    EXTERNAL_IP = "external_ip"
    LOAD_BALANCER_IP = "load_balancer_ip"


@dataclass(frozen=True, slots=True, kw_only=True)
class Packet:
    src: IPAddress
    dst: IPAddress
    port: int
    protocol: Protocol = Protocol.TCP
    origin: Origin | None = None  # None: inferred from the source address


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """The node options that change the answer (as in BackendConfig)."""

    cluster_cidrs: tuple[IPNetwork, ...] = ()
    nodeport_addresses: tuple[IPNetwork, ...] = ()  # () = every node address
    nodeport_primary: bool = False  # nodePortAddresses "primary": the primary IPs only
    localhost_nodeports: bool = False  # the iptables backend's NodePorts on 127.0.0.1
    service_cidrs: tuple[IPNetwork, ...] = ()  # --service-cidr; the Plan's ServiceCIDRs count too
    # upstream nftables mode's checks (the nftables backend): a port no Service serves on a
    # ClusterIP is rejected, an address of the service CIDRs no Service has is dropped
    clusterip_checks: bool = False
    masquerade_all: bool = False
    node_ips: tuple[IPAddress, ...] = ()  # in addition to the Node's addresses
    detect_local_mode: str = "ClusterCIDR"  # how pods' traffic is told (as BackendConfig)
    pod_bridge_interface: str = ""
    pod_interface_name_prefix: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Excluded:
    endpoint: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Explanation:
    verdict: Verdict
    origin: Origin
    service: str | None = None
    frontend: Frontend | None = None
    traffic: str | None = None  # "internal" or "external"
    policy: TrafficPolicy | None = None
    endpoints: tuple[str, ...] = ()
    excluded: tuple[Excluded, ...] = ()
    masquerade: bool = False
    affinity_timeout: int | None = None
    reasons: tuple[str, ...] = ()
    kernel: tuple[str, ...] = ()
    # objects traversed that a live node's kernel holds otherwise (``--netns``)
    differs: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": str(self.verdict),
            "service": self.service,
            "endpoints": list(self.endpoints),
            "masquerade": self.masquerade,
            "reasons": list(self.reasons),
            "kernel": list(self.kernel),
            "kernelDiffers": list(self.differs),
            "origin": str(self.origin),
            "frontend": None if self.frontend is None else str(self.frontend),
            "traffic": self.traffic,
            "policy": None if self.policy is None else str(self.policy),
            "excluded": [{"endpoint": e.endpoint, "reason": e.reason} for e in self.excluded],
            "affinityTimeoutSeconds": self.affinity_timeout,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Trace:
    """What one backend's rendered kernel objects do with a packet."""

    verdict: Verdict
    endpoints: tuple[str, ...] = ()  # every ip:port the packet may be sent to, sorted
    masquerade: bool = False
    kernel: tuple[str, ...] = ()  # the objects traversed, in order ("ip chain services", …)
    # traced on a live node: each object traversed that its kernel holds otherwise
    differs: tuple[str, ...] = ()


class Tracer(typing.Protocol):
    """A backend's packet tracer: pure, over what its render produces for ``plan``.

    ``origin`` is already decided (pod, node, external); ``config`` is the node's
    backend configuration (node IPs, cluster CIDRs, NodePort addresses, masquerade-all).
    Backends offer it as a ``trace`` method (``backend.trace(plan, packet, origin)``).
    """

    def __call__(
        self, plan: Plan, packet: Packet, origin: Origin, config: BackendConfig
    ) -> Trace: ...


def outcome(answer: Trace | Explanation) -> tuple[Verdict, tuple[str, ...], bool]:
    """What a trace and the model must agree on: verdict, endpoints, masquerade."""
    return answer.verdict, answer.endpoints, answer.masquerade


def with_trace(model: Explanation, trace: Trace, backend: str) -> Explanation:
    """The explanation with the backend's traced verdict, endpoints, masquerade and
    kernel objects; a disagreement with the model is flagged in ``reasons``."""
    reasons = [*model.reasons, f"traced_by_{backend}"]
    if trace.differs:
        reasons.append("kernel_differs")
    if outcome(trace) != outcome(model):
        reasons.append("trace_disagrees_with_model")
    return replace(
        model,
        verdict=trace.verdict,
        endpoints=trace.endpoints,
        masquerade=trace.masquerade,
        kernel=trace.kernel,
        differs=trace.differs,
        reasons=tuple(reasons),
    )


def options_config(node: str, options: Options) -> BackendConfig:
    """The BackendConfig a tracer sees for these explain options."""
    return BackendConfig(
        node_name=node,
        node_ips=options.node_ips,
        cluster_cidrs=options.cluster_cidrs,
        nodeport_addresses=options.nodeport_addresses,
        nodeport_primary=options.nodeport_primary,
        localhost_nodeports=options.localhost_nodeports,
        service_cidrs=options.service_cidrs,
        masquerade_all=options.masquerade_all,
        detect_local_mode=options.detect_local_mode,
        pod_bridge_interface=options.pod_bridge_interface,
        pod_interface_name_prefix=options.pod_interface_name_prefix,
    )


def first_packet(packet: Packet, origin: Origin, config: BackendConfig) -> dict[str, Any]:
    """The fields a backend's rule walk starts ``packet``'s flow with: its addresses and
    port, its protocol in lower case (as iptables and ipset print it) and the
    :func:`input_interface` it arrives on."""
    return {
        "src": packet.src,
        "dst": packet.dst,
        "port": packet.port,
        "protocol": packet.protocol.lower(),
        "iif": input_interface(origin, config),
    }


def input_interface(origin: Origin, config: BackendConfig) -> str:
    """The interface a packet of ``origin`` arrives on, as explain and the backends'
    tracers model it: none ("") for the node's own packets; for a pod, the pod bridge
    (BridgeInterface), a name with the pods' prefix (InterfaceNamePrefix) or ``cni0``;
    from outside, an uplink (``eth0``, else ``uplink0``) that is not a pod's."""
    if origin is Origin.NODE:
        return ""
    mode = config.detect_local_mode
    if origin is Origin.POD:
        if mode == "BridgeInterface":
            return config.pod_bridge_interface
        if mode == "InterfaceNamePrefix":
            return config.pod_interface_name_prefix + "0"
        return "cni0"
    pod = config.local_detector(4)
    return "eth0" if not pod.interface or not pod.is_local(_ANY, "eth0") else "uplink0"


_ANY = ipaddress.IPv4Address(0)


_LOCAL_REASON = {
    "ClusterCIDR": "source_outside_cluster_cidr",
    "NodeCIDR": "source_outside_node_pod_cidr",
    "BridgeInterface": "not_from_pod_bridge",
    "InterfaceNamePrefix": "not_from_pod_interface",
}


def _in(ip: IPAddress, nets: Iterable[IPNetwork]) -> bool:
    return any(ip.version == n.version and ip in n for n in nets)


def _node_addresses(node: NodeInfo, options: Options) -> tuple[IPAddress, ...]:
    return tuple(dict.fromkeys((*node.addresses, *options.node_ips)))


def infer_origin(src: IPAddress, node: NodeInfo, options: Options) -> Origin:
    if src in _node_addresses(node, options) or src.is_loopback:
        return Origin.NODE
    if _in(src, options.cluster_cidrs) or _in(src, node.pod_cidrs):
        return Origin.POD
    return Origin.EXTERNAL


def _match(
    state: ServicePortState, packet: Packet, node: NodeInfo, options: Options
) -> Frontend | None:
    svc = state.service
    if not svc.has_vip or svc.protocol is not packet.protocol:
        return None
    if packet.port == svc.port:
        if packet.dst in svc.cluster_ips:
            return Frontend.CLUSTER_IP
        if packet.dst in svc.external_ips:
            return Frontend.EXTERNAL_IP
        if packet.dst in svc.load_balancer_ips:
            return Frontend.LOAD_BALANCER_IP
    if (
        svc.node_port is not None
        and packet.port == svc.node_port
        and (packet.dst in _node_addresses(node, options) or _localhost(packet, options))
        and _nodeport_address(packet.dst, node, options)
    ):
        return Frontend.NODE_PORT
    return None


def _localhost(packet: Packet, options: Options) -> bool:
    """A localhost NodePort (the iptables backend's ``--iptables-localhost-nodeports``):
    IPv4 loopback, reachable by the node itself only."""
    return (
        options.localhost_nodeports
        and packet.dst.version == 4
        and packet.dst.is_loopback
        and packet.origin in (None, Origin.NODE)
    )


def _nodeport_address(ip: IPAddress, node: NodeInfo, options: Options) -> bool:
    """Whether NodePorts answer on the node address ``ip`` (--nodeport-addresses)."""
    config = options_config(node.name, options).for_node(node)
    nets = config.nodeport_networks(ip.version)
    return nets is None or _in(ip, nets)


def _cluster_set(state: ServicePortState, node: NodeInfo) -> tuple[Endpoint, ...]:
    """The cluster-wide endpoints (policy Cluster), whatever the Service's policies."""
    svc = replace(
        state.service,
        internal_traffic_policy=TrafficPolicy.CLUSTER,
        external_traffic_policy=TrafficPolicy.CLUSTER,
    )
    return select.categorize(svc, state.endpoints, node).internal


def _exclusion(
    ep: Endpoint,
    *,
    family: IPFamily,
    local_only: bool,
    node: NodeInfo,
    pool: tuple[Endpoint, ...],
) -> str:
    if ep.family is not family:
        return "other_family"
    if local_only and ep.node_name != node.name:
        return "other_node"
    if not ep.ready and not (ep.serving and ep.terminating):
        return "not_ready"
    if not ep.ready and any(p.ready for p in pool):
        return "terminating"
    return "topology"


def explain(plan: Plan, packet: Packet, options: Options | None = None) -> Explanation:
    """What this node does with ``packet``, and why."""
    options = options or Options()
    node = plan.node
    origin = packet.origin or infer_origin(packet.src, node, options)
    packet = replace(packet, origin=origin)
    matched: tuple[ServicePortState, Frontend] | None = None
    vip_other_port = False
    for state in sorted(plan.services.values(), key=lambda s: s.name):
        frontend = _match(state, packet, node, options)
        if frontend is not None:
            matched = (state, frontend)
            break
        svc = state.service
        if svc.has_vip and packet.dst in (
            *svc.cluster_ips,
            *svc.external_ips,
            *svc.load_balancer_ips,
        ):
            vip_other_port = True
    if matched is None:
        reason = "service_port_not_matched" if vip_other_port else "no_service"
        if options.clusterip_checks:
            cluster_ip = any(
                packet.dst in s.service.cluster_ips
                for s in plan.services.values()
                if s.service.has_vip
            )
            if cluster_ip:
                why = (reason, "cluster_ip_port_not_served")
                return Explanation(verdict=Verdict.REJECT, origin=origin, reasons=why)
            if _in(packet.dst, (*options.service_cidrs, *plan.service_cidrs)):
                why = (reason, "unallocated_service_ip")
                return Explanation(verdict=Verdict.DROP, origin=origin, reasons=why)
        return Explanation(verdict=Verdict.ACCEPT, origin=origin, reasons=(reason,))
    state, frontend = matched
    svc = state.service
    reasons: list[str] = [str(frontend)]
    family = IPFamily.of(packet.dst)
    external = frontend is not Frontend.CLUSTER_IP
    policy = svc.external_traffic_policy if external else svc.internal_traffic_policy
    reasons.append(f"{'external' if external else 'internal'}_traffic_policy_{policy.lower()}")
    common = {
        "origin": origin,
        "service": str(svc.name),
        "frontend": frontend,
        "traffic": "external" if external else "internal",
        "policy": policy,
    }

    if frontend is Frontend.LOAD_BALANCER_IP and svc.firewalled(packet.dst.version):
        primary = options_config(node.name, options).for_node(node).primary_ips()
        if _in(packet.src, svc.load_balancer_source_ranges):
            reasons.append("source_range_allowed")
        elif _in(packet.src, svc.firewall_sources(primary)):
            # upstream: a range holds the node's primary IP, so the LB IP itself (the
            # node reaching its own VIP, a load balancer's SNATed hairpin) is let in
            reasons.append("source_is_load_balancer_ip")
        else:
            reasons.append("source_range_denied")
            return Explanation(verdict=Verdict.DROP, reasons=tuple(reasons), **common)  # type: ignore[arg-type]

    cluster = _cluster_set(state, node)
    config = options_config(node.name, options).for_node(node)
    detector = config.local_detector(packet.dst.version)
    from_pod = detector.is_local(packet.src, input_interface(origin, config))
    masquerade_reasons: list[str] = []
    if options.masquerade_all and not external:
        # --masquerade-all marks traffic to the cluster IP; external traffic under
        # policy Local keeps its client address (as upstream's rules do).
        masquerade_reasons.append("masquerade_all")
    if external:
        if policy is TrafficPolicy.LOCAL and from_pod:
            # kube-proxy short-circuits pods' traffic to external frontends to the
            # cluster-wide endpoints: there is no client IP to preserve (pods as its
            # local-traffic detector tells them: --detect-local-mode).
            reasons.append("pod_to_external_short_circuit")
            targets, local_only = cluster, False
        elif policy is TrafficPolicy.LOCAL and origin is Origin.NODE:
            reasons.append("node_to_external_uses_cluster_endpoints")
            masquerade_reasons.append("from_node")
            targets, local_only = cluster, False
        else:
            targets, local_only = state.external, policy is TrafficPolicy.LOCAL
            if policy is TrafficPolicy.CLUSTER:
                masquerade_reasons.append("external_traffic_policy_cluster")
            else:
                reasons.append("client_ip_preserved")
    else:
        targets, local_only = state.internal, policy is TrafficPolicy.LOCAL
        if detector.implemented and not from_pod:
            masquerade_reasons.append(_LOCAL_REASON[detector.mode])

    same_family = tuple(ep for ep in targets if ep.family is family)
    pool = tuple(ep for ep in state.endpoints if not local_only or ep.node_name == node.name)
    chosen = set(same_family)
    excluded = tuple(
        Excluded(
            endpoint=str(ep),
            reason=_exclusion(ep, family=family, local_only=local_only, node=node, pool=pool),
        )
        for ep in state.endpoints
        if ep not in chosen
    )
    if same_family and not any(ep.ready for ep in same_family):
        reasons.append("terminating_fallback")
    if any(e.reason == "topology" for e in excluded):
        reasons.append("topology_hints")

    if not same_family:
        has_any = any(ep.family is family for ep in (*cluster, *state.local))
        if has_any:
            reasons.append("no_local_endpoints")
            verdict = Verdict.DROP
        else:
            reasons.append("no_endpoints")
            verdict = Verdict.REJECT
        return Explanation(
            verdict=verdict,
            excluded=excluded,
            reasons=tuple(reasons),
            **common,  # type: ignore[arg-type]
        )

    if any(ep.ip == packet.src for ep in same_family):
        masquerade_reasons.append("hairpin")
    affinity = None
    if svc.session_affinity is SessionAffinity.CLIENT_IP:
        reasons.append("session_affinity_client_ip")
        affinity = svc.affinity_timeout
    reasons.extend(f"masquerade_{r}" if r != "masquerade_all" else r for r in masquerade_reasons)
    return Explanation(
        verdict=Verdict.FORWARD,
        endpoints=tuple(str(ep) for ep in sorted(same_family, key=Endpoint.sort_key)),
        excluded=excluded,
        masquerade=bool(masquerade_reasons),
        affinity_timeout=affinity,
        reasons=tuple(reasons),
        **common,  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------- text and CLI


def parse_destination(text: str) -> tuple[IPAddress, int, Protocol]:
    """``10.96.0.10:80/TCP``, ``[fd00::10]:53/UDP``, ``10.96.0.10:80`` (TCP)."""
    address, _, proto = text.partition("/")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{text!r}: expected IP:PORT[/PROTO]")
    host = host.removeprefix("[").removesuffix("]")
    try:
        protocol = Protocol((proto or "TCP").upper())
    except ValueError:
        raise ValueError(f"{text!r}: protocol must be TCP, UDP or SCTP") from None
    return ipaddress.ip_address(host), int(port), protocol


def render_text(packet: Packet, e: Explanation) -> str:
    lines = [
        f"packet: {packet.src} -> {packet.dst}:{packet.port}/{packet.protocol} (from {e.origin})",
        f"verdict: {e.verdict}",
    ]
    if e.service is None:
        lines.append("service: none — no Service frontend matches this destination")
    else:
        lines.append(f"service: {e.service} via {e.frontend} ({e.traffic} traffic, {e.policy})")
    for ep in e.endpoints:
        lines.append(f"  candidate {ep}")
    for ex in e.excluded:
        lines.append(f"  excluded  {ex.endpoint}: {ex.reason}")
    if e.service is not None:
        lines.append(f"masquerade: {'yes' if e.masquerade else 'no'}")
    if e.affinity_timeout is not None:
        lines.append(f"session affinity: ClientIP for {e.affinity_timeout}s")
    lines.append("reasons: " + ", ".join(e.reasons))
    if e.kernel:
        lines.append("kernel objects traversed:")
        lines.extend(f"  {k}" for k in e.kernel)
    if e.differs:
        lines.append("the node's kernel differs from what kpy renders:")
        lines.extend(f"  {d}" for d in e.differs)
    return "\n".join(lines)


def networks(values: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in values)


PRIMARY = "primary"  # nodePortAddresses: the node's primary IP of each family


def check_nodeport_addresses(values: tuple[str, ...], what: str) -> None:
    """Upstream's rule: ``primary`` stands alone (no CIDRs beside it)."""
    if PRIMARY in values and len(values) > 1:
        raise ValueError(f"{what}: can't use both 'primary' and CIDRs")
