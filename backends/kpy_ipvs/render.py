"""Plan → the IPVS objects and companion ipset elements one node must hold (pure).

IPVS holds one virtual service per (VIP, port, protocol): every ClusterIP, external IP
and LoadBalancer IP of a service port, and its NodePort on each of the node's
addresses. Its real servers are the port's endpoints in masquerade (NAT) mode. The VIPs
(not the node's own addresses) are bound to the dummy interface ``kpy-ipvs0`` so the
kernel accepts packets for them.

IPVS cannot express every Service semantic, so a companion layer carries the rest, as
upstream's IPVS proxier does: ipsets of frontends whose traffic is masqueraded,
frontends dropped under externalTrafficPolicy Local without a local endpoint, and
LoadBalancer source ranges, read by a few fixed iptables rules in ``KPY-IPVS-*``
chains (README.md says why this is not nftables). The rules are fixed for a given
configuration (:func:`rules`); only set elements change with Services, so a
one-endpoint change never rewrites rules.

Everything here is keyed per service port, so a partial sync renders only the ports
that changed.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from kpy.backend import BackendConfig, frontend
from kpy.model import (
    Endpoint,
    IPAddress,
    IPNetwork,
    NodeInfo,
    Plan,
    Protocol,
    ServicePortName,
    ServicePortState,
    SessionAffinity,
)

INTERFACE = "kpy-ipvs0"
SCHEDULER_ANNOTATION = "kpy.io/ipvs-scheduler"
SCHEDULERS = frozenset({"rr", "wrr", "lc", "wlc", "sh", "dh", "mh", "sed", "nq", "lblc", "lblcr"})
DEFAULT_SCHEDULER = "rr"
WEIGHT = 1
MASQUERADE_MARK = 0x4000  # the packet-mark bit upstream kube-proxy uses for "masquerade me"
_MARK = f"meta mark set meta mark | {MASQUERADE_MARK:#x}"


@dataclass(frozen=True, slots=True, kw_only=True)
class VirtualKey:
    """One IPVS virtual service: what a packet's destination must be to hit it."""

    address: IPAddress
    port: int
    protocol: Protocol

    def __str__(self) -> str:
        return frontend(self.address, self.port, str(self.protocol))


@dataclass(frozen=True, slots=True, kw_only=True)
class VirtualService:
    """The settable part of a virtual service."""

    scheduler: str = DEFAULT_SCHEDULER
    persistence: int = 0  # seconds of ClientIP affinity; 0 = none


@dataclass(frozen=True, slots=True, kw_only=True)
class DestKey:
    """One real server of one virtual service."""

    virtual: VirtualKey
    address: IPAddress
    port: int

    def __str__(self) -> str:
        ep = (
            f"[{self.address}]:{self.port}"
            if self.address.version == 6
            else (f"{self.address}:{self.port}")
        )
        return f"{self.virtual} {ep}"


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class Element:
    """One element of one companion ipset, in ipset's own text (``10.96.0.10,tcp:80``)."""

    set: str
    value: str

    def __str__(self) -> str:
        return f"{self.set} {self.value}"


@dataclass(frozen=True, slots=True, kw_only=True)
class PortObjects:
    """Everything one service port puts into the kernel."""

    services: Mapping[VirtualKey, VirtualService]
    destinations: Mapping[DestKey, int]  # weight
    addresses: frozenset[IPAddress]  # VIPs bound on kpy-ipvs0
    elements: frozenset[Element]
    node_ports: frozenset[VirtualKey] = frozenset()  # the NodePort ones among ``services``


EMPTY = PortObjects(services={}, destinations={}, addresses=frozenset(), elements=frozenset())


@dataclass(frozen=True, slots=True, kw_only=True)
class Context:
    """The node-wide inputs of render (a change means a full sync)."""

    scheduler: str = DEFAULT_SCHEDULER
    nodeport_ips: tuple[IPAddress, ...] = ()
    cluster_cidrs: tuple[IPNetwork, ...] = ()
    masquerade_all: bool = False


def context(config: BackendConfig, node: NodeInfo) -> Context:
    """The render context for this node: scheduler flag and NodePort addresses."""
    scheduler = config.option("scheduler", DEFAULT_SCHEDULER) or DEFAULT_SCHEDULER
    if scheduler not in SCHEDULERS:
        scheduler = DEFAULT_SCHEDULER
    ips = config.node_ips or node.addresses
    if config.nodeport_addresses:
        ips = tuple(
            ip
            for ip in ips
            if any(ip.version == net.version and ip in net for net in config.nodeport_addresses)
        )
    return Context(
        scheduler=scheduler,
        nodeport_ips=tuple(dict.fromkeys(ips)),
        cluster_cidrs=config.cluster_cidrs,
        masquerade_all=config.masquerade_all,
    )


def _frontend_value(address: IPAddress, protocol: Protocol, port: int) -> str:
    return f"{address},{str(protocol).lower()}:{port}"


def render_port(state: ServicePortState, ctx: Context) -> PortObjects:
    """The IPVS services, real servers, VIPs and companion elements of one service port."""
    svc = state.service
    if not svc.has_vip:
        return EMPTY
    scheduler = dict(svc.annotations).get(SCHEDULER_ANNOTATION, ctx.scheduler)
    if scheduler not in SCHEDULERS:
        scheduler = ctx.scheduler
    persistence = svc.affinity_timeout if svc.session_affinity is SessionAffinity.CLIENT_IP else 0
    settings = VirtualService(scheduler=scheduler, persistence=persistence)
    services: dict[VirtualKey, VirtualService] = {}
    dests: dict[DestKey, int] = {}
    elements: set[Element] = set()
    addresses: set[IPAddress] = set()

    def add(address: IPAddress, port: int, endpoints: tuple[Endpoint, ...]) -> VirtualKey:
        key = VirtualKey(address=address, port=port, protocol=svc.protocol)
        services[key] = settings
        for ep in endpoints:
            if ep.ip.version == address.version:
                dests[DestKey(virtual=key, address=ep.ip, port=ep.port)] = WEIGHT
        return key

    for ip in svc.cluster_ips:
        add(ip, svc.port, state.internal)
        addresses.add(ip)
        value = _frontend_value(ip, svc.protocol, svc.port)
        if ctx.masquerade_all:
            elements.add(Element(set=set_name("MASQ", ip.version), value=value))
        elif ctx.cluster_cidrs:
            elements.add(Element(set=set_name("CLUSTER", ip.version), value=value))

    external: list[tuple[IPAddress, int]] = [(ip, svc.port) for ip in svc.external_ips]
    external += [(ip, svc.port) for ip in svc.load_balancer_ips]
    bound = {ip for ip, _ in external}
    if svc.node_port is not None:
        external += [(ip, svc.node_port) for ip in ctx.nodeport_ips]
    drop = svc.external_policy_local and not state.external
    node_ports: set[VirtualKey] = set()
    for ip, port in external:
        key = add(ip, port, state.external)
        if ip not in bound:
            node_ports.add(key)
        value = _frontend_value(ip, svc.protocol, port)
        if drop:
            elements.add(Element(set=set_name("DROP", ip.version), value=value))
        elif not svc.external_policy_local:
            elements.add(Element(set=set_name("MASQ", ip.version), value=value))
    addresses |= bound
    # Hairpin: an endpoint reaching itself through the Service is masqueraded, or its
    # reply would go straight back over its own loopback, past IPVS's reverse NAT.
    proto = str(svc.protocol).lower()
    elements.update(
        Element(set=set_name("LOOPBACK", ep.ip.version), value=f"{ep.ip},{proto}:{ep.port},{ep.ip}")
        for ep in {*state.internal, *state.external}
    )
    for ip in svc.load_balancer_ips:
        ranges = [r for r in svc.load_balancer_source_ranges if r.version == ip.version]
        if not ranges:
            continue
        value = _frontend_value(ip, svc.protocol, svc.port)
        elements.add(Element(set=set_name("RANGED", ip.version), value=value))
        elements.update(
            Element(set=set_name("ALLOWED", ip.version), value=f"{value},{r}") for r in ranges
        )
    return PortObjects(
        services=services,
        destinations=dests,
        addresses=frozenset(addresses),
        elements=frozenset(elements),
        node_ports=frozenset(node_ports),
    )


def render(plan: Plan, ctx: Context) -> dict[ServicePortName, PortObjects]:
    """Every service port of the plan."""
    return {name: render_port(state, ctx) for name, state in plan.services.items()}


SETS: tuple[tuple[str, str], ...] = (
    # (name, ipset type); the IPv6 twin of each is named with a trailing "6"
    ("MASQ", "hash:ip,port"),
    ("CLUSTER", "hash:ip,port"),
    ("DROP", "hash:ip,port"),
    ("RANGED", "hash:ip,port"),
    ("ALLOWED", "hash:ip,port,net"),
    ("LOOPBACK", "hash:ip,port,ip"),  # endpoint,proto:port,endpoint: hairpin
)
CHAIN_MARK = "KPY-IPVS-MARK"  # nat: mark what must be masqueraded (before IPVS)
CHAIN_POST = "KPY-IPVS-POSTROUTING"  # nat: masquerade marked packets
CHAIN_FILTER = "KPY-IPVS-FILTER"  # filter: ETP Local drop, source ranges
HOOKS: tuple[tuple[str, str, str], ...] = (
    # (table, built-in chain, our chain): jump rules, inserted first
    ("nat", "PREROUTING", CHAIN_MARK),
    ("nat", "OUTPUT", CHAIN_MARK),
    ("nat", "POSTROUTING", CHAIN_POST),
    ("filter", "INPUT", CHAIN_FILTER),
)


def set_name(name: str, version: int) -> str:
    return f"KPY-IPVS-{name}" + ("6" if version == 6 else "")


def set_names() -> Iterator[tuple[str, str, int]]:
    """(set name, ipset type, IP version) of every companion set."""
    for name, typ in SETS:
        for version in (4, 6):
            yield set_name(name, version), typ, version


def rules(ctx: Context, version: int) -> str:
    """The companion chains of one family, as ``iptables-restore --noflush`` text.

    The rules read the frontend sets that :func:`render_port` fills (the upstream IPVS
    proxier's design, with ipsets):

    * ``DROP``: external frontends of externalTrafficPolicy Local services with no
      local endpoint are dropped in INPUT, which runs before IPVS's hook;
    * ``RANGED``/``ALLOWED``: a LoadBalancer frontend with source ranges accepts only
      sources inside them;
    * ``LOOPBACK``: an endpoint whose connection IPVS sent back to itself (hairpin) is
      masqueraded in POSTROUTING (destination = source = the endpoint);
    * ``MASQ``: always masqueraded (external traffic under policy Cluster, or every
      frontend with masquerade-all); ``CLUSTER``: masqueraded when the source is outside
      the cluster CIDRs. The packet is marked in nat PREROUTING/OUTPUT (before IPVS sees
      it) and masqueraded in POSTROUTING after IPVS rewrote its destination; the NAT
      binding lives on its conntrack entry (``net.ipv4.vs.conntrack=1``).

    The first rule of the mark chain carries :func:`skeleton_id` as its comment, so
    adoption can tell whether the rules in the kernel are these.
    """
    mark = f"-j MARK --or-mark {MASQUERADE_MARK:#x}"
    cidrs = [str(c) for c in ctx.cluster_cidrs if c.version == version]
    lines = ["*nat", f":{CHAIN_MARK} - [0:0]", f":{CHAIN_POST} - [0:0]"]
    lines.append(
        f"-A {CHAIN_MARK} -m comment --comment {skeleton_id(ctx)} "
        f"-m set --match-set {set_name('MASQ', version)} dst,dst {mark}"
    )
    if not ctx.masquerade_all and cidrs:
        lines.append(
            f"-A {CHAIN_MARK} ! -s {','.join(cidrs)} "
            f"-m set --match-set {set_name('CLUSTER', version)} dst,dst {mark}"
        )
    lines.append(
        f"-A {CHAIN_POST} -m mark --mark {MASQUERADE_MARK:#x}/{MASQUERADE_MARK:#x} -j MASQUERADE"
    )
    lines.append(
        f"-A {CHAIN_POST} -m set --match-set {set_name('LOOPBACK', version)} dst,dst,src "
        "-j MASQUERADE"
    )
    lines += ["COMMIT", "*filter", f":{CHAIN_FILTER} - [0:0]"]
    lines.append(
        f"-A {CHAIN_FILTER} -m set --match-set {set_name('DROP', version)} dst,dst -j DROP"
    )
    lines.append(
        f"-A {CHAIN_FILTER} -m set --match-set {set_name('RANGED', version)} dst,dst "
        f"-m set ! --match-set {set_name('ALLOWED', version)} dst,dst,src -j DROP"
    )
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def skeleton_id(ctx: Context) -> str:
    """A short identity of the rules (a rule comment, read back on adoption)."""
    text = repr((ctx.masquerade_all, tuple(str(c) for c in ctx.cluster_cidrs), SETS, 2))
    return "kpy-ipvs-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def elements_script(add: Iterable[Element], delete: Iterable[Element]) -> str:
    """``ipset restore`` text adding and deleting elements."""
    lines = [f"add {el.set} {el.value} -exist" for el in sorted(add)]
    lines += [f"del {el.set} {el.value} -exist" for el in sorted(delete)]
    return "\n".join(lines) + ("\n" if lines else "")


def network(text: str) -> IPNetwork:
    return ipaddress.ip_network(text, strict=False)
