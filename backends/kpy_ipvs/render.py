"""Plan → the IPVS objects and companion ipset elements one node must hold (pure).

IPVS holds one virtual service per (VIP, port, protocol): every ClusterIP, external IP
and LoadBalancer IP of a service port, and its NodePort on each of the node's
addresses. Its real servers are the port's endpoints in masquerade (NAT) mode. The VIPs
(not the node's own addresses) are bound to the dummy interface ``kpy-ipvs0`` so the
kernel accepts packets for them.

IPVS cannot express every Service semantic, so a companion layer carries the rest, as
upstream's IPVS proxier does: ipsets of frontends whose traffic is masqueraded,
frontends dropped under a Local traffic policy without a local endpoint, and
LoadBalancer source ranges, read by a few fixed iptables rules in ``KPY-IPVS-*``
chains (README.md says why this is not nftables).

Traffic policy Local, where one virtual service per frontend cannot say everything:

* internalTrafficPolicy Local with no local endpoint (but some elsewhere): the cluster
  IP's virtual service has no real server, and the frontend goes into ``NOLOCAL``,
  dropped for every source before IPVS sees it (filter INPUT for pods, mangle OUTPUT
  for the node); with no endpoint anywhere it is not, and IPVS rejects.
* externalTrafficPolicy Local: an external frontend's own virtual service holds the
  local endpoints, for outside clients (source kept). Pods and the node go to the
  cluster-wide endpoints, as upstream short-circuits them: the port has a mark
  (:func:`allocate_marks`, in the ``ipvs_mark_mask`` bits, by default the upper 16),
  its frontends are ``SHORT`` elements
  carrying it as ``skbmark``, mangle PREROUTING (pod sources) and OUTPUT (the node)
  set it with ``-j SET --map-mark``, and IPVS, which looks firewall-mark services up
  before addresses, picks the port's firewall-mark virtual service holding the
  cluster-wide endpoints. The node's marked connections are masqueraded. With no local
  endpoint (but some elsewhere) the frontend is also in ``DROP``: outside clients are
  dropped in filter INPUT (pods ``RETURN`` first). With no endpoint anywhere nothing
  drops, and IPVS rejects.
* Should the marks run out, a port has none: then the node's connections are
  masqueraded through ``LOCAL``, the frontend's virtual service holds the cluster-wide
  endpoints when there is no local one, and with local endpoints pods and the node use
  those only (README.md).

The rules are fixed for a given configuration (:func:`rules`); only set elements change
with Services, so a one-endpoint change never rewrites rules.

Everything here is keyed per service port, so a partial sync renders only the ports
that changed.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace

from kpy.core import endpoints as select
from kpy.core.backend import BackendConfig, LocalDetector, frontend
from kpy.core.model import (
    Endpoint,
    IPAddress,
    IPNetwork,
    NodeInfo,
    Plan,
    Protocol,
    ServicePortName,
    ServicePortState,
    SessionAffinity,
    TrafficPolicy,
)

INTERFACE = "kpy-ipvs0"
SCHEDULER_ANNOTATION = "kpy.io/ipvs-scheduler"
SCHEDULERS = frozenset({"rr", "wrr", "lc", "wlc", "sh", "dh", "mh", "sed", "nq", "lblc", "lblcr"})
DEFAULT_SCHEDULER = "rr"
WEIGHT = 1
MASQUERADE_MARK = 0x4000  # the packet-mark bit upstream kube-proxy uses for "masquerade me"
# Every other packet-mark bit this backend sets or matches: the short-circuit mask may
# not overlap these.
RESERVED_MARKS = MASQUERADE_MARK
# Short-circuit marks (pods and the node to an externalTrafficPolicy Local frontend): one
# per service port, a number in the bits of a mask (backend option ``ipvs_mark_mask``,
# default the upper 16 bits), selecting its firewall-mark virtual service.
MARK_MASK_OPTION = "ipvs_mark_mask"
SHORT_MARK_MASK = 0xFFFF0000  # the default mask
SHORT_MARK_SHIFT = 16  # its lowest set bit
SHORT_MARKS = 0xFFFF  # how many service ports can have one under it
MIN_MARK_BITS = 4
_MARK = f"meta mark set meta mark | {MASQUERADE_MARK:#x}"


@dataclass(frozen=True, slots=True, kw_only=True)
class VirtualKey:
    """One IPVS virtual service: what a packet's destination must be to hit it, or (with
    ``fwmark``) the packet mark that selects it (:func:`fwmark_key`)."""

    address: IPAddress
    port: int
    protocol: Protocol
    fwmark: int = 0

    def __hash__(self) -> int:
        # as the generated hash, but over the address's integer: ipaddress hashes its
        # hex text, the larger part of a full sync's dict work over every object
        return hash((int(self.address), self.port, self.protocol, self.fwmark))

    def __str__(self) -> str:
        if self.fwmark:
            return f"fwmark {self.fwmark:#x} IPv{self.address.version}"
        return frontend(self.address, self.port, str(self.protocol))


def fwmark_key(mark: int, version: int) -> VirtualKey:
    """The key of a firewall-mark virtual service (the kernel keeps no address, port or
    protocol for one: it reports TCP)."""
    unspecified = ipaddress.ip_address("::" if version == 6 else "0.0.0.0")
    return VirtualKey(address=unspecified, port=0, protocol=Protocol.TCP, fwmark=mark)


def is_short_circuit(key: VirtualKey, mask: int = SHORT_MARK_MASK) -> bool:
    """Whether ``key`` is one of kpy's short-circuit (firewall-mark) virtual services:
    its mark lies inside ``mask`` (the configured one, :attr:`Context.mark_mask`)."""
    return bool(key.fwmark) and key.fwmark & ~mask == 0


def mark_mask(text: str | None) -> int:
    """The short-circuit mark mask from the ``ipvs_mark_mask`` option's text (hex with
    ``0x`` or decimal; None or empty: the default).

    Raises ValueError naming the option when the mask is not one contiguous run of at
    least :data:`MIN_MARK_BITS` bits inside 32, or overlaps a mark bit this backend
    uses for something else (:data:`RESERVED_MARKS`: the masquerade mark)."""
    if text is None or not text.strip():
        return SHORT_MARK_MASK
    try:
        mask = int(text.strip(), 0)
    except ValueError:
        raise ValueError(
            f"{MARK_MASK_OPTION}={text!r}: not a number (hex with 0x, or decimal)"
        ) from None
    if mask <= 0 or mask > 0xFFFFFFFF:
        raise ValueError(f"{MARK_MASK_OPTION}={text!r}: must be a non-zero 32-bit mask")
    run = mask >> _lowest_bit(mask)
    if run & (run + 1):
        raise ValueError(
            f"{MARK_MASK_OPTION}={mask:#x}: must be one contiguous run of bits "
            "(the marks are numbers counted inside it)"
        )
    if run.bit_length() < MIN_MARK_BITS:
        raise ValueError(
            f"{MARK_MASK_OPTION}={mask:#x}: must have at least {MIN_MARK_BITS} bits "
            f"(it has {run.bit_length()}, for {run} service ports)"
        )
    if mask & RESERVED_MARKS:
        raise ValueError(
            f"{MARK_MASK_OPTION}={mask:#x}: overlaps {mask & RESERVED_MARKS:#x}, "
            f"the masquerade mark ({MASQUERADE_MARK:#x}) kpy sets on packets to masquerade"
        )
    return mask


def _lowest_bit(mask: int) -> int:
    return (mask & -mask).bit_length() - 1


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

    def __hash__(self) -> int:  # see VirtualKey.__hash__
        return hash((self.virtual, int(self.address), self.port))

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
    node: NodeInfo | None = None  # the cluster-wide endpoint set follows its topology
    mark_mask: int = SHORT_MARK_MASK  # short-circuit marks (option ``ipvs_mark_mask``)
    primary_ips: tuple[IPAddress, ...] = ()  # the node's primary IP per family
    detect_local_mode: str = "ClusterCIDR"
    pod_bridge_interface: str = ""
    pod_interface_name_prefix: str = ""

    @property
    def mark_shift(self) -> int:
        """The mask's lowest set bit: a port's mark number shifted by it is its mark."""
        return _lowest_bit(self.mark_mask)

    @property
    def mark_count(self) -> int:
        """How many service ports can have a short-circuit mark."""
        return self.mark_mask >> self.mark_shift

    def cidrs(self, version: int) -> tuple[IPNetwork, ...]:
        return tuple(c for c in self.cluster_cidrs if c.version == version)

    def detector(self, version: int) -> LocalDetector:
        """How traffic from this node's pods is told (``--detect-local-mode``)."""
        return BackendConfig(
            cluster_cidrs=self.cluster_cidrs,
            node_pod_cidrs=() if self.node is None else self.node.pod_cidrs,
            detect_local_mode=self.detect_local_mode,
            pod_bridge_interface=self.pod_bridge_interface,
            pod_interface_name_prefix=self.pod_interface_name_prefix,
        ).local_detector(version)

    def pods(self, version: int) -> tuple[str, ...]:
        """The matches, one rule each, for traffic from this node's pods (upstream's
        IfLocal): ``-s CIDR`` per CIDR, or ``-i`` the pods' interface; none for a
        no-op detector. Worked out once per context (render asks once per port)."""
        return _pods(self, version)


@functools.lru_cache(maxsize=16)
def _pods(ctx: Context, version: int) -> tuple[str, ...]:
    detector = ctx.detector(version)
    if detector.interface:
        return (f"-i {detector.interface}{'+' if detector.prefix else ''}",)
    return tuple(f"-s {c}" for c in detector.cidrs)


def _nodeport_ip(ip: IPAddress, nets: tuple[IPNetwork, ...] | None) -> bool:
    return nets is None or any(ip in net for net in nets)


def context(config: BackendConfig, node: NodeInfo) -> Context:
    """The render context for this node: scheduler flag, NodePort addresses and the
    short-circuit mark mask (ValueError when the ``ipvs_mark_mask`` option is invalid)."""
    scheduler = config.option("scheduler", DEFAULT_SCHEDULER) or DEFAULT_SCHEDULER
    if scheduler not in SCHEDULERS:
        scheduler = DEFAULT_SCHEDULER
    config = config.for_node(node)  # nodePortAddresses "primary": the node's primary IPs
    ips = config.node_ips or node.addresses
    ips = tuple(ip for ip in ips if _nodeport_ip(ip, config.nodeport_networks(ip.version)))
    return Context(
        scheduler=scheduler,
        nodeport_ips=tuple(dict.fromkeys(ips)),
        cluster_cidrs=config.cluster_cidrs,
        masquerade_all=config.masquerade_all,
        node=node,
        mark_mask=mark_mask(config.option(MARK_MASK_OPTION)),
        primary_ips=config.primary_ips(),
        detect_local_mode=config.detect_local_mode,
        pod_bridge_interface=config.pod_bridge_interface,
        pod_interface_name_prefix=config.pod_interface_name_prefix,
    )


def _frontend_value(address: IPAddress, protocol: Protocol, port: int) -> str:
    return f"{address},{str(protocol).lower()}:{port}"


def _versions(endpoints: Iterable[Endpoint]) -> frozenset[int]:
    return frozenset(ep.ip.version for ep in endpoints)


def cluster_endpoints(state: ServicePortState, node: NodeInfo | None) -> tuple[Endpoint, ...]:
    """The port's cluster-wide endpoints (what policy Cluster would use), whatever its
    traffic policies: where pods and the node go when a Local policy finds none here."""
    svc = state.service
    if not (svc.internal_policy_local or svc.external_policy_local):
        return state.internal
    cluster = replace(
        svc,
        internal_traffic_policy=TrafficPolicy.CLUSTER,
        external_traffic_policy=TrafficPolicy.CLUSTER,
    )
    return select.categorize(cluster, state.endpoints, node or NodeInfo(name="")).internal


def wants_mark(state: ServicePortState) -> bool:
    """Whether the port needs a short-circuit mark: externalTrafficPolicy Local with an
    external frontend."""
    svc = state.service
    external = svc.external_ips or svc.load_balancer_ips or svc.node_port is not None
    return svc.has_vip and svc.external_policy_local and bool(external)


def _preferred_mark(name: ServicePortName, count: int) -> int:
    # The only use of a service port's name here: hashed, never written into rule text
    # (ipset elements, virtual services and companion rules hold addresses and numbers).
    digest = hashlib.sha256(str(name).encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:4], "big") % count + 1


def allocate_marks(
    names: Iterable[ServicePortName],
    taken: Mapping[ServicePortName, int] | None = None,
    count: int = SHORT_MARKS,
) -> dict[ServicePortName, int]:
    """Short-circuit mark numbers (1..``count``, :attr:`Context.mark_count`; 0: none
    left) for ``names``, in name order, each at a hash of its name or the next free
    one, around the ones in ``taken`` (kept as they are). A number is shifted into the
    mask by :attr:`Context.mark_shift`."""
    result = dict(taken or {})
    used = set(result.values())
    for name in sorted(set(names) - set(result)):
        mark = _preferred_mark(name, count)
        for _ in range(count):
            if mark not in used:
                break
            mark = mark % count + 1
        else:
            mark = 0
        result[name] = mark
        used.add(mark)
    return result


def render_port(state: ServicePortState, ctx: Context, mark: int = 0) -> PortObjects:
    """The IPVS services, real servers, VIPs and companion elements of one service port.

    ``mark`` (from :func:`allocate_marks`) is the port's short-circuit mark under
    externalTrafficPolicy Local: its external frontends go into ``SHORT`` with it, and a
    firewall-mark virtual service per family holds the cluster-wide endpoints, which
    pods and the node reach that way. Without one, the fallback in the module docstring
    applies."""
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
    served: set[Endpoint] = set()  # every endpoint some virtual service sends to
    cluster = cluster_endpoints(state, ctx.node)
    elsewhere = _versions((*cluster, *state.local))  # families with an endpoint anywhere

    def add(address: IPAddress, port: int, endpoints: tuple[Endpoint, ...]) -> VirtualKey:
        return add_key(VirtualKey(address=address, port=port, protocol=svc.protocol), endpoints)

    def add_key(key: VirtualKey, endpoints: tuple[Endpoint, ...]) -> VirtualKey:
        services[key] = settings
        for ep in endpoints:
            if ep.ip.version == key.address.version:
                dests[DestKey(virtual=key, address=ep.ip, port=ep.port)] = WEIGHT
                served.add(ep)
        return key

    internal = _versions(state.internal)
    for ip in svc.cluster_ips:
        add(ip, svc.port, state.internal)
        addresses.add(ip)
        value = _frontend_value(ip, svc.protocol, svc.port)
        if ip.version not in internal and ip.version in elsewhere:
            # internalTrafficPolicy Local without a local endpoint: drop, not reject
            elements.add(Element(set=set_name("NOLOCAL", ip.version), value=value))
        if ctx.masquerade_all:
            elements.add(Element(set=set_name("MASQ", ip.version), value=value))
        else:  # masqueraded unless from this node's pods (no detector: see rules())
            elements.add(Element(set=set_name("CLUSTER", ip.version), value=value))

    external: list[tuple[IPAddress, int]] = [(ip, svc.port) for ip in svc.external_ips]
    external += [(ip, svc.port) for ip in svc.load_balancer_ips]
    bound = {ip for ip, _ in external}
    if svc.node_port is not None:
        external += [(ip, svc.node_port) for ip in ctx.nodeport_ips]
    local = _versions(state.external)
    node_ports: set[VirtualKey] = set()
    skbmark = f"skbmark {mark << ctx.mark_shift:#x}/{ctx.mark_mask:#x}"
    for ip, port in external:
        value = _frontend_value(ip, svc.protocol, port)
        targets = state.external
        if svc.external_policy_local:
            if ip.version not in local and ip.version in elsewhere:
                # none here but some elsewhere: outside clients are dropped
                elements.add(Element(set=set_name("DROP", ip.version), value=value))
            if mark:
                # pods and the node: the firewall-mark virtual service (cluster-wide)
                elements.add(Element(set=set_name("SHORT", ip.version), value=f"{value} {skbmark}"))
                add_key(fwmark_key(mark << ctx.mark_shift, ip.version), cluster)
            else:
                # no mark: the node's own connections are masqueraded, and without a
                # local endpoint the virtual service holds the cluster-wide ones
                elements.add(Element(set=set_name("LOCAL", ip.version), value=value))
                if ip.version not in local and ip.version in elsewhere:
                    targets = cluster
        else:
            elements.add(Element(set=set_name("MASQ", ip.version), value=value))
        key = add(ip, port, targets)
        if ip not in bound:
            node_ports.add(key)
    addresses |= bound
    # Hairpin: an endpoint reaching itself through the Service is masqueraded, or its
    # reply would go straight back over its own loopback, past IPVS's reverse NAT.
    proto = str(svc.protocol).lower()
    elements.update(
        Element(set=set_name("LOOPBACK", ep.ip.version), value=f"{ep.ip},{proto}:{ep.port},{ep.ip}")
        for ep in served
    )
    sources = svc.firewall_sources(ctx.primary_ips) if svc.load_balancer_source_ranges else ()
    for ip in svc.load_balancer_ips:
        ranges = [r for r in sources if r.version == ip.version]
        if not ranges or any(r.prefixlen == 0 for r in ranges):
            # none of this family, or a zero-masked range: any source (as upstream,
            # which also cannot put a /0 into a hash:ip,port,net set)
            continue
        value = _frontend_value(ip, svc.protocol, svc.port)
        elements.add(Element(set=set_name("RANGED", ip.version), value=value))
        elements.update(
            Element(set=set_name("ALLOWED", ip.version), value=f"{value},{net_text(r)}")
            for r in ranges
        )
    return PortObjects(
        services=services,
        destinations=dests,
        addresses=frozenset(addresses),
        elements=frozenset(elements),
        node_ports=frozenset(node_ports),
    )


def net_text(net: IPNetwork) -> str:
    """A network as ``ipset save`` writes it back: a host network (/32, /128) as the bare
    address, so what adoption reads compares equal to what render wants (a ``/32`` one
    would look like a different element: deleting the read-back one deletes it)."""
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def render(plan: Plan, ctx: Context) -> dict[ServicePortName, PortObjects]:
    """Every service port of the plan (short-circuit marks as a full sync allocates them)."""
    marks = allocate_marks(
        (name for name, st in plan.services.items() if wants_mark(st)), count=ctx.mark_count
    )
    return {
        name: render_port(state, ctx, marks.get(name, 0)) for name, state in plan.services.items()
    }


def merged(objects: Iterable[PortObjects]) -> PortObjects:
    """All of ``objects`` together (a later port's entry wins a key two ports share)."""
    ports = tuple(objects)
    return PortObjects(
        services={k: v for o in ports for k, v in o.services.items()},
        destinations={k: w for o in ports for k, w in o.destinations.items()},
        addresses=frozenset(a for o in ports for a in o.addresses),
        elements=frozenset(e for o in ports for e in o.elements),
        node_ports=frozenset(k for o in ports for k in o.node_ports),
    )


SETS: tuple[tuple[str, str], ...] = (
    # (name, ipset type); the IPv6 twin of each is named with a trailing "6"
    ("MASQ", "hash:ip,port"),
    ("CLUSTER", "hash:ip,port"),
    ("DROP", "hash:ip,port"),  # external, policy Local, none here: outside clients dropped
    ("NOLOCAL", "hash:ip,port"),  # cluster IP, policy Local, none here: every source dropped
    ("LOCAL", "hash:ip,port"),  # external, policy Local, no mark: the node masqueraded
    ("SHORT", "hash:ip,port"),  # external, policy Local: skbmark = the port's mark (skbinfo)
    ("RANGED", "hash:ip,port"),
    ("ALLOWED", "hash:ip,port,net"),
    ("LOOPBACK", "hash:ip,port,ip"),  # endpoint,proto:port,endpoint: hairpin
)
MANGLE = "mangle"
CHAIN_MARK = "KPY-IPVS-MARK"  # nat: mark what must be masqueraded (before IPVS)
CHAIN_POST = "KPY-IPVS-POSTROUTING"  # nat: masquerade marked packets
CHAIN_FILTER = "KPY-IPVS-FILTER"  # filter: policy Local drops, source ranges
CHAIN_OUTPUT = "KPY-IPVS-OUTPUT"  # mangle: the node's own connections, before IPVS
CHAIN_PODS = "KPY-IPVS-PREROUTING"  # mangle: short-circuit marks for pods
HOOKS: tuple[tuple[str, str, str], ...] = (
    # (table, built-in chain, our chain): jump rules, inserted first
    ("nat", "PREROUTING", CHAIN_MARK),
    ("nat", "OUTPUT", CHAIN_MARK),
    ("nat", "POSTROUTING", CHAIN_POST),
    ("filter", "INPUT", CHAIN_FILTER),
    (MANGLE, "PREROUTING", CHAIN_PODS),
    (MANGLE, "OUTPUT", CHAIN_OUTPUT),
)
CHAINS: tuple[tuple[str, str], ...] = tuple(dict.fromkeys((t, c) for t, _, c in HOOKS))


def set_name(name: str, version: int) -> str:
    return f"KPY-IPVS-{name}" + ("6" if version == 6 else "")


# How many elements a companion set may hold. ipset's default (65,536) is one element
# per frontend in the largest sets: a cluster of more than ~65,000 Service ports (or
# hairpin pairs) made every full sync fail with "hash is full". The hash grows as
# elements come; this is only the ceiling.
MAXELEM = 1 << 22


def create_options(name: str) -> str:
    """Extra ``ipset create`` options of a companion set."""
    skbinfo = " skbinfo" if name.rstrip("6") == set_name("SHORT", 4) else ""
    return f"maxelem {MAXELEM}{skbinfo}"


def set_names() -> Iterator[tuple[str, str, int]]:
    """(set name, ipset type, IP version) of every companion set."""
    for name, typ in SETS:
        for version in (4, 6):
            yield set_name(name, version), typ, version


def rules(ctx: Context, version: int) -> str:
    """The companion chains of one family, as ``iptables-restore --noflush`` text.

    The rules read the frontend sets that :func:`render_port` fills (the upstream IPVS
    proxier's design, with ipsets). Packets from pods and from outside meet nat
    PREROUTING, then filter INPUT, then IPVS (it hooks LOCAL_IN after filter); the
    node's own connections meet mangle OUTPUT, nat OUTPUT, then IPVS (LOCAL_OUT, after
    nat and before filter, so filter OUTPUT only sees the real server):

    * ``NOLOCAL``: cluster IPs under internalTrafficPolicy Local without a local
      endpoint are dropped for every source: filter INPUT, and mangle OUTPUT for the node;
    * ``DROP``: external frontends under externalTrafficPolicy Local without a local
      endpoint are dropped in filter INPUT, except for pods (``RETURN`` per pod CIDR),
      whose connections the virtual service sends to the cluster-wide endpoints;
    * ``RANGED``/``ALLOWED``: a LoadBalancer frontend with source ranges accepts only
      sources inside them (filter INPUT, and mangle OUTPUT for the node); when a range
      holds the node's primary IP, the Service's own LB IPs are allowed sources too
      (upstream's ``KUBE-LOAD-BALANCER-SOURCE-IP``: the node reaching a VIP it holds has
      that VIP as its source). A zero-masked range allows any source (no ``RANGED``);
    * ``LOCAL``: the node's own connections to an external frontend under policy Local
      are marked for masquerade in mangle OUTPUT;
    * ``LOOPBACK``: an endpoint whose connection IPVS sent back to itself (hairpin) is
      masqueraded in POSTROUTING (destination = source = the endpoint);
    * ``MASQ``: always masqueraded (external traffic under policy Cluster, or every
      frontend with masquerade-all); ``CLUSTER``: masqueraded when the source is not
      this node's pods (``--detect-local-mode``: ``-s`` per CIDR or ``-i`` the pods'
      interface); with no detector for the family (ClusterCIDR mode without a cluster
      CIDR), only when the source is the cluster IP itself (``src,dst``, upstream's
      rule: the node's own connections, whose source the kernel picks as the local
      VIP). The packet is marked in nat PREROUTING/OUTPUT (before IPVS sees
      it) and masqueraded in POSTROUTING after IPVS rewrote its destination; the NAT
      binding lives on its conntrack entry (``net.ipv4.vs.conntrack=1``).

    A source test against several CIDRs is a ``RETURN`` per CIDR before the rule, as
    iptables refuses ``! -s`` with more than one network.
    The first rule of the mark chain carries :func:`skeleton_id` as its comment, so
    adoption can tell whether the rules in the kernel are these.
    """
    mark = f"-j MARK --or-mark {MASQUERADE_MARK:#x}"

    def match(name: str, flags: str = "dst,dst") -> str:
        return f"-m set --match-set {set_name(name, version)} {flags}"

    ranged = f"{match('RANGED')} -m set ! --match-set {set_name('ALLOWED', version)} dst,dst,src"
    lines = ["*nat", f":{CHAIN_MARK} - [0:0]", f":{CHAIN_POST} - [0:0]"]
    lines.append(f"-A {CHAIN_MARK} -m comment --comment {skeleton_id(ctx)} {match('MASQ')} {mark}")
    if not ctx.masquerade_all and ctx.pods(version):
        lines += [f"-A {CHAIN_MARK} {p} {match('CLUSTER')} -j RETURN" for p in ctx.pods(version)]
        lines.append(f"-A {CHAIN_MARK} {match('CLUSTER')} {mark}")
    elif not ctx.masquerade_all:
        # no local-traffic detector: only the node's own connections whose source is
        # the cluster IP itself (the VIP is a local address, so the kernel picks it as
        # the source) are masqueraded, or an endpoint on another node would answer a VIP
        lines.append(f"-A {CHAIN_MARK} {match('CLUSTER', 'src,dst')} {mark}")
    lines.append(
        f"-A {CHAIN_POST} -m mark --mark {MASQUERADE_MARK:#x}/{MASQUERADE_MARK:#x} -j MASQUERADE"
    )
    lines.append(f"-A {CHAIN_POST} {match('LOOPBACK', 'dst,dst,src')} -j MASQUERADE")
    lines.append(
        f"-A {CHAIN_POST} -m mark ! --mark 0x0/{ctx.mark_mask:#x} "
        "-m addrtype --src-type LOCAL -j MASQUERADE"
    )
    lines += ["COMMIT", "*filter", f":{CHAIN_FILTER} - [0:0]"]
    lines.append(f"-A {CHAIN_FILTER} {match('NOLOCAL')} -j DROP")
    lines.append(f"-A {CHAIN_FILTER} {ranged} -j DROP")
    lines += [f"-A {CHAIN_FILTER} {p} {match('DROP')} -j RETURN" for p in ctx.pods(version)]
    lines.append(f"-A {CHAIN_FILTER} {match('DROP')} -j DROP")
    short = f"{match('SHORT')} -j SET --map-set {set_name('SHORT', version)} dst,dst --map-mark"
    lines += ["COMMIT", f"*{MANGLE}", f":{CHAIN_PODS} - [0:0]", f":{CHAIN_OUTPUT} - [0:0]"]
    lines += [f"-A {CHAIN_PODS} {p} {short}" for p in ctx.pods(version)]
    lines.append(f"-A {CHAIN_OUTPUT} {match('NOLOCAL')} -j DROP")
    lines.append(f"-A {CHAIN_OUTPUT} {ranged} -j DROP")
    lines.append(f"-A {CHAIN_OUTPUT} {short}")
    lines.append(f"-A {CHAIN_OUTPUT} {match('LOCAL')} {mark}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def skeleton_id(ctx: Context) -> str:
    """A short identity of the rules (a rule comment, read back on adoption)."""
    pods = tuple(p.removeprefix("-s ") for version in (4, 6) for p in ctx.pods(version))
    text = repr((ctx.masquerade_all, tuple(str(c) for c in ctx.cluster_cidrs), pods, SETS, 4))
    if ctx.mark_mask != SHORT_MARK_MASK:  # (the default keeps the identity it had)
        text += f" mark_mask={ctx.mark_mask:#x}"
    if not ctx.masquerade_all and not all(ctx.pods(version) for version in (4, 6)):
        text += " cluster-src-dst"  # a family without a detector: the src,dst rule
    text += f" maxelem={MAXELEM}"  # sets made with another ceiling are made again
    return "kpy-ipvs-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def elements_script(add: Iterable[Element], delete: Iterable[Element]) -> str:
    """``ipset restore`` text adding and deleting elements."""
    lines = [f"add {el.set} {el.value} -exist" for el in sorted(add)]
    lines += [f"del {el.set} {el.value} -exist" for el in sorted(delete)]
    return "\n".join(lines) + ("\n" if lines else "")


def network(text: str) -> IPNetwork:
    return ipaddress.ip_network(text, strict=False)
