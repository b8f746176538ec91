"""Plan → the iptables chains and rules one node must hold, and the restore text (pure).

The rule model is upstream kube-proxy's iptables mode under kpy's own ``KPY-`` names
(README.md walks through it chain by chain). Everything is a keyed object:

* a *chain* (:class:`Key` with ``rule == ""``) whose value is its rules, in order —
  ``KPY-SVC-…``, ``KPY-SVL-…``, ``KPY-EXT-…``, ``KPY-FW-…``, ``KPY-SEP-…`` and the fixed
  helper chains. A changed chain is rewritten whole (flushed and refilled), which is
  cheap because each holds the rules of one service port or one endpoint;
* a *dispatch rule* (:class:`Key` with the rule's text) in ``KPY-SERVICES``,
  ``KPY-NODEPORTS`` or a built-in chain. Each is its own object, so it is inserted or
  deleted by spec on its own and the dispatch chains are never rewritten: a one-endpoint
  change in a cluster of any size touches a handful of lines.

Every rule is written in the exact form ``iptables-save`` prints it back (match order,
``/32`` on addresses, quoted comments, probabilities with eleven decimals), so the
objects read back from the kernel by :mod:`kpy_iptables.observe` compare equal to the
rendered ones and a restarted agent finds nothing to change.

Nothing here does I/O: :func:`restore` turns a :class:`~kpy.core.diff.Diff` of objects into
``iptables-restore --noflush`` input, one text per IP family.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from kpy.core import diff
from kpy.core.backend import BackendConfig, LocalDetector, nodeport_networks
from kpy.core.model import (
    Endpoint,
    IPAddress,
    IPFamily,
    IPNetwork,
    NodeInfo,
    Plan,
    ServicePortName,
    ServicePortState,
    SessionAffinity,
)

NAT = "nat"
FILTER = "filter"
TABLES = (FILTER, NAT)  # the order of the sections in a restore input

SERVICES = "KPY-SERVICES"  # nat: VIP dispatch; filter: rejects and drops
NODEPORTS = "KPY-NODEPORTS"  # nat: NodePort dispatch
MARK_MASQ = "KPY-MARK-MASQ"  # nat: mark a packet for masquerading
POSTROUTING = "KPY-POSTROUTING"  # nat: masquerade marked packets
FORWARD = "KPY-FORWARD"  # filter: accept forwarded Service traffic
LOCALNET = "KPY-FIREWALL"  # filter: the martian guard of localhost NodePorts (IPv4)
LOOPBACK4 = ipaddress.ip_network("127.0.0.0/8")
# Upstream's KUBE-FIREWALL rule (kubelet writes the same): with route_localnet on, a
# packet from elsewhere to 127.0.0.0/8 must not reach a local service; only connections
# to it that were DNATed (a localhost NodePort) or answers pass.
LOCALNET_GUARD = (
    f'! -s {LOOPBACK4} -d {LOOPBACK4} -m comment --comment "block incoming localnet connections" '
    "-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
)

PREFIX = "KPY-"
BUILTIN = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})
DISPATCH = frozenset({SERVICES, NODEPORTS})  # chains edited rule by rule

MASQ_MARK = "0x4000"
FAMILIES = (4, 6)

Rules = tuple[str, ...]


@dataclass(frozen=True, slots=True, order=True, repr=False)
class Key:
    """One kernel object: a whole chain (``rule == ""``) or one dispatch rule."""

    family: int  # 4 (iptables) or 6 (ip6tables)
    table: str
    chain: str
    rule: str = ""

    def __repr__(self) -> str:  # kpy.core.diff sorts keys by repr; the generated one is slow
        return f"Key({self.family}, {self.table}, {self.chain}, {self.rule})"

    def __str__(self) -> str:
        where = f"ipv{self.family}/{self.table}/{self.chain}"
        return f"{where} {self.rule}" if self.rule else where


Objects = dict[Key, Rules]


FIXED = frozenset({SERVICES, NODEPORTS, MARK_MASQ, POSTROUTING, FORWARD, LOCALNET})
KINDS = ("SVC", "SVL", "EXT", "FW", "SEP")  # the per-port and per-endpoint chains
_HASH_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")


def owned(chain: str) -> bool:
    """True for a chain this backend creates: one of the fixed chains, or
    ``KPY-<kind>-`` and the 16 base32 characters of :func:`chain_name`. Any other name,
    even under ``KPY-`` (the IPVS backend's ``KPY-IPVS-…``, a user's ``KPY-MINE``), is
    not ours and is never read as ours, rewritten or deleted."""
    if chain in FIXED:
        return True
    kind, _, digest = chain.removeprefix(PREFIX).partition("-")
    return (
        chain.startswith(PREFIX)
        and kind in KINDS
        and len(digest) == 16
        and _HASH_CHARS.issuperset(digest)
    )


def _hash(*parts: str) -> str:
    """16 base32 characters of the SHA-256 of the parts (10 bytes make 16 characters)."""
    data = "/".join(parts).encode("utf-8", "surrogatepass")
    return base64.b32encode(hashlib.sha256(data).digest()[:10]).decode()


def chain_name(kind: str, *parts: str) -> str:
    """``KPY-<kind>-`` and a stable 16-character hash: a restarted agent finds the same name."""
    return f"KPY-{kind}-{_hash(*parts)}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Context:
    """The node-wide settings render needs (changing any means a full sync)."""

    cluster_cidrs: tuple[IPNetwork, ...] = ()
    pod_cidrs: tuple[IPNetwork, ...] = ()  # the Node's spec.podCIDRs
    nodeport_addresses: tuple[IPNetwork, ...] = ()
    nodeport_primary: bool = False  # nodeport_addresses are the primary IPs (or none)
    masquerade_all: bool = False
    families: tuple[int, ...] = FAMILIES  # 6 left out where the host has no ip6tables
    primary_ips: tuple[IPAddress, ...] = ()  # the node's primary IP per family
    localhost_nodeports: bool = False  # NodePorts on 127.0.0.1 (IPv4; route_localnet)
    detect_local_mode: str = "ClusterCIDR"
    pod_bridge_interface: str = ""
    pod_interface_name_prefix: str = ""

    def cidrs(self, family: int) -> tuple[IPNetwork, ...]:
        return tuple(c for c in self.cluster_cidrs if c.version == family)

    def detector(self, family: int) -> LocalDetector:
        """How traffic from this node's pods is told (``--detect-local-mode``)."""
        return BackendConfig(
            cluster_cidrs=self.cluster_cidrs,
            node_pod_cidrs=self.pod_cidrs,
            detect_local_mode=self.detect_local_mode,
            pod_bridge_interface=self.pod_bridge_interface,
            pod_interface_name_prefix=self.pod_interface_name_prefix,
        ).local_detector(family)


def context(config: BackendConfig, node: NodeInfo | None = None) -> Context:
    """The render context of ``config`` on ``node`` (whose pod CIDRs tell pods apart,
    and whose addresses tell the node's primary IPs)."""
    if node is not None:
        config = config.for_node(node)
    return Context(
        cluster_cidrs=config.cluster_cidrs,
        pod_cidrs=node.pod_cidrs if node is not None else (),
        nodeport_addresses=config.nodeport_addresses,
        nodeport_primary=config.nodeport_primary,
        masquerade_all=config.masquerade_all,
        primary_ips=config.primary_ips(),
        localhost_nodeports=localhost_nodeports(config),
        detect_local_mode=config.detect_local_mode,
        pod_bridge_interface=config.pod_bridge_interface,
        pod_interface_name_prefix=config.pod_interface_name_prefix,
    )


def localhost_nodeports(config: BackendConfig) -> bool:
    """Whether NodePorts answer on 127.0.0.1 (upstream's iptables.localhostNodePorts):
    asked for, and the NodePort addresses hold IPv4 loopback (every address does)."""
    if not config.localhost_nodeports:
        return False
    nets = config.nodeport_networks(4)
    return nets is None or any(LOOPBACK4[0] in n for n in nets)


def with_node(ctx: Context, config: BackendConfig, node: NodeInfo) -> Context:
    """``ctx`` (its families kept) for ``node``: a change means a full sync."""
    return dataclasses.replace(context(config, node), families=ctx.families)


# --- rule text ----------------------------------------------------------------------------


def _host(ip: IPAddress | IPNetwork) -> str:
    if isinstance(ip, IPAddress):
        return f"{ip}/{ip.max_prefixlen}"
    return str(ip)


def probability(p: float) -> str:
    """``p`` as ``iptables-save`` prints the statistic match's 31-bit fixed-point value."""
    fixed = int(0x80000000 * p + 0.5)
    return f"{fixed / 0x80000000:.11f}"


def _mask(family: int) -> str:
    return "255.255.255.255" if family == 4 else "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"


def _reject(family: int, proto: str) -> str:
    """The reject of a packet no endpoint can take. TCP: a TCP reset, in both families —
    the kernel rate-limits ICMP errors per client (a burst of 6, then about one a second
    for IPv4; IPv6 answered a SYN only after the client's retransmission, measured), so
    under many refused connections (a busy client, a check suite) an ICMP reject turns
    into a timeout; a reset is immediate and not rate-limited (kpy's nftables backend
    rejects TCP the same way). Other protocols: ICMP port unreachable, as upstream."""
    if proto == "tcp":
        return "REJECT --reject-with tcp-reset"
    kind = "icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable"
    return f"REJECT --reject-with {kind}"


COMMENT_MAX = 255  # XT_MAX_COMMENT_LEN, less its terminating NUL
_UNQUOTABLE = re.compile(r"[^A-Za-z0-9 _.:/=+,-]")
# What a part of a service port's name may hold: what Kubernetes allows in namespaces,
# Service names and port names (kpy.core.convert refuses anything else).
_NAME_PART = re.compile(r"(?:[a-z0-9](?:[-a-z0-9.]{0,61}[a-z0-9])?)?")


def comment(text: str) -> str:
    """A comment match. Only characters iptables-restore takes inside double quotes as
    they are (no quote, backslash, newline, ``#`` or non-ASCII: each becomes ``_``), at
    most ``COMMENT_MAX`` long — a comment can never end early or start a new rule."""
    return f'-m comment --comment "{_UNQUOTABLE.sub("_", text)[:COMMENT_MAX]}"'


def _name_part(text: str) -> str:
    if _NAME_PART.fullmatch(text):
        return text
    return "_" + _hash(text)


def port_text(name: ServicePortName) -> str:
    """``str(name)`` (``ns/name:port/TCP``) when its parts are Kubernetes names; a part
    that is not becomes ``_`` and a hash (``_`` is in no Kubernetes name)."""
    parts = (name.namespace, name.name, name.port)
    if all(_NAME_PART.fullmatch(p) for p in parts):
        return str(name)
    ns, svc, port = (_name_part(p) for p in parts)
    return f"{ns}/{svc}{f':{port}' if port else ''}/{name.protocol}"


def _interface(detector: LocalDetector) -> str:
    """The pods' interface as ``-i`` takes it (``+`` ends a prefix)."""
    return detector.interface + ("+" if detector.prefix else "")


# --- the fixed part -----------------------------------------------------------------------


def base(ctx: Context, family: int) -> Objects:
    """The helper chains and the jumps from the built-in chains, for one family."""
    portals = comment("kpy service portals")
    objs: Objects = {
        Key(family, NAT, SERVICES): (),
        Key(family, NAT, NODEPORTS): (),
        Key(family, NAT, MARK_MASQ): (f"-j MARK --set-xmark {MASQ_MARK}/{MASQ_MARK}",),
        Key(family, NAT, POSTROUTING): (
            f"-m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
            f"-j MARK --set-xmark {MASQ_MARK}/0x0",
            "-j MASQUERADE --random-fully",
        ),
        Key(family, NAT, "PREROUTING", f"{portals} -j {SERVICES}"): (),
        Key(family, NAT, "OUTPUT", f"{portals} -j {SERVICES}"): (),
        Key(family, NAT, "POSTROUTING", f"{comment('kpy postrouting')} -j {POSTROUTING}"): (),
        Key(family, FILTER, SERVICES): (),
        Key(family, FILTER, FORWARD): (
            f"-m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT",
            "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        ),
        Key(family, FILTER, "FORWARD", f"{comment('kpy forwarding')} -j {FORWARD}"): (),
    }
    for builtin in ("INPUT", "FORWARD", "OUTPUT"):
        objs[
            Key(family, FILTER, builtin, f"-m conntrack --ctstate NEW {portals} -j {SERVICES}")
        ] = ()
    local = family == 4 and ctx.localhost_nodeports
    nodeports = nodeport_networks(ctx.nodeport_addresses, ctx.nodeport_primary, family)
    if nodeports is not None:  # None: every local address
        for cidr in nodeports:
            for net in _without_loopback(cidr) if not local else (cidr,):
                rule = f"-d {net} -m addrtype --dst-type LOCAL -j {NODEPORTS}"
                objs[Key(family, NAT, SERVICES, rule)] = ()
    elif local:
        objs[Key(family, NAT, SERVICES, f"-m addrtype --dst-type LOCAL -j {NODEPORTS}")] = ()
    else:  # never on loopback: IPv6 has no route_localnet; IPv4 when not asked for
        loopback = LOOPBACK4 if family == 4 else ipaddress.ip_network("::1/128")
        rule = f"! -d {loopback} -m addrtype --dst-type LOCAL -j {NODEPORTS}"
        objs[Key(family, NAT, SERVICES, rule)] = ()
    if local:
        objs[Key(family, FILTER, LOCALNET)] = (LOCALNET_GUARD,)
        for builtin in ("INPUT", "OUTPUT"):
            guard = f"{comment('kpy localnet guard')} -j {LOCALNET}"
            objs[Key(family, FILTER, builtin, guard)] = ()
    return objs


def _without_loopback(cidr: IPNetwork) -> list[IPNetwork]:
    """``cidr`` less 127.0.0.0/8 (IPv4) or ::1 (IPv6): the NodePort addresses when
    NodePorts must not answer on loopback."""
    loopback = LOOPBACK4 if cidr.version == 4 else ipaddress.ip_network("::1/128")
    if not cidr.overlaps(loopback):
        return [cidr]
    if cidr.subnet_of(loopback):  # type: ignore[arg-type]
        return []
    return sorted(cidr.address_exclude(loopback))  # type: ignore[arg-type]


# --- one service port ---------------------------------------------------------------------


def _usable(ep: Endpoint) -> bool:
    return ep.ready or (ep.serving and ep.terminating)


def _sorted(eps: Iterable[Endpoint]) -> list[Endpoint]:
    return sorted(set(eps), key=Endpoint.sort_key)


def _spread(
    eps: list[Endpoint], seps: Mapping[Endpoint, str], affinity: int | None, family: int
) -> Rules:
    """Jumps that spread new connections evenly (and, with affinity, keep clients)."""
    rules: list[str] = []
    if affinity is not None:
        for ep in eps:
            sep = seps[ep]
            rules.append(
                f"-m recent --rcheck --seconds {affinity} --reap --name {sep} "
                f"--mask {_mask(family)} --rsource -j {sep}"
            )
    count = len(eps)
    for i, ep in enumerate(eps):
        if i < count - 1:
            p = probability(1.0 / (count - i))
            rules.append(f"-m statistic --mode random --probability {p} -j {seps[ep]}")
        else:
            rules.append(f"-j {seps[ep]}")
    return tuple(rules)


def render_port(state: ServicePortState, ctx: Context) -> Objects:
    """Every object one service port needs, in both families."""
    svc = state.service
    if not svc.has_vip:
        return {}
    objs: Objects = {}
    families = sorted({ip.version for ip in svc.cluster_ips} & set(ctx.families))
    for family in families:
        _render_family(state, ctx, family, objs)
    return objs


def _render_family(state: ServicePortState, ctx: Context, family: int, objs: Objects) -> None:
    svc = state.service
    fam = IPFamily.IPV4 if family == 4 else IPFamily.IPV6
    name = str(svc.name)
    proto = svc.protocol.lower()
    note = comment(port_text(svc.name))
    dport = f"-m {proto} --dport"

    internal = _sorted(state.internal_for(fam))
    external = _sorted(state.external_for(fam))
    usable = any(_usable(ep) for ep in state.endpoints if ep.family is fam)
    vips = svc.ips(fam)
    externals = [ip for ip in svc.external_ips if ip.version == family]
    lbs = [ip for ip in svc.load_balancer_ips if ip.version == family]
    firewalled = svc.firewalled(family)
    sources = svc.firewall_sources(ctx.primary_ips) if firewalled else ()
    ranges = [str(r) for r in sources if r.version == family]

    port_hash = _hash(name)
    svc_chain = f"KPY-SVC-{port_hash}"
    ext_chain = f"KPY-EXT-{port_hash}"
    fw_chain = f"KPY-FW-{port_hash}"
    svl_chain = f"KPY-SVL-{port_hash}"
    addresses = {ep: str(ep.ip) for ep in {*internal, *external}}  # formatting IPs is slow
    targets = {
        ep: f"[{ip}]:{ep.port}" if family == 6 else f"{ip}:{ep.port}"
        for ep, ip in addresses.items()
    }  # as str(Endpoint) and --to-destination print them
    seps = {ep: f"KPY-SEP-{_hash(name, target)}" for ep, target in targets.items()}
    affinity = svc.affinity_timeout if svc.session_affinity is SessionAffinity.CLIENT_IP else None

    def nat(chain: str, rule: str) -> None:
        objs[Key(family, NAT, chain, rule)] = ()

    def drop(rule: str, reject: bool) -> None:
        target = _reject(family, proto) if reject else "DROP"
        objs[Key(family, FILTER, SERVICES, f"{rule} -j {target}")] = ()

    # Cluster IPs: to the internal endpoints, or rejected/dropped in the filter table.
    for vip in vips:
        match = f"-d {_host(vip)} -p {proto} {note} {dport} {svc.port}"
        if internal:
            nat(SERVICES, f"{match} -j {svc_chain}")
        else:
            drop(match, reject=not usable)

    detector = ctx.detector(family)
    if internal:
        rules: list[str] = []
        for vip in vips:
            match = f"-d {_host(vip)} -p {proto} {note} {dport} {svc.port}"
            if ctx.masquerade_all:
                rules.append(f"{match} -j {MARK_MASQ}")
            elif detector.cidrs:  # traffic not from this node's pods: upstream's IfNotLocal
                rules.append(f"! -s {detector.cidrs[0]} {match} -j {MARK_MASQ}")
            elif detector.interface:
                # iptables-save prints -i after -d
                not_pod = f"! -i {_interface(detector)}"
                rules.append(
                    f"-d {_host(vip)} {not_pod} -p {proto} {note} {dport} {svc.port} -j {MARK_MASQ}"
                )
        objs[Key(family, NAT, svc_chain)] = (*rules, *_spread(internal, seps, affinity, family))

    # External frontends: external IPs, LoadBalancer IPs, the NodePort.
    external_matches = [f"-d {_host(ip)} -p {proto} {note} {dport} {svc.port}" for ip in externals]
    lb_matches = [f"-d {_host(ip)} -p {proto} {note} {dport} {svc.port}" for ip in lbs]
    nodeport_match = (
        f"-p {proto} {note} {dport} {svc.node_port}" if svc.node_port is not None else None
    )
    local = svc.external_policy_local
    ext_rules: list[str] = []
    if local:
        if internal:
            # Pods and the node itself reach the Service as if it were Cluster-wide.
            if detector.interface:  # upstream's IfLocal
                ext_rules.append(f"-i {_interface(detector)} -j {svc_chain}")
            ext_rules += [f"-s {cidr} -j {svc_chain}" for cidr in detector.cidrs]
            ext_rules.append(f"-m addrtype --src-type LOCAL -j {MARK_MASQ}")
            ext_rules.append(f"-m addrtype --src-type LOCAL -j {svc_chain}")
    else:
        ext_rules.append(f"-j {MARK_MASQ}")
    if external:
        if external == internal:
            ext_rules.append(f"-j {svc_chain}")
        else:
            ext_rules.append(f"-j {svl_chain}")
            objs[Key(family, NAT, svl_chain)] = _spread(external, seps, affinity, family)
    via_nat = bool(external) or (local and bool(internal))
    has_external = bool(external_matches or lb_matches or nodeport_match)
    if has_external and via_nat:
        objs[Key(family, NAT, ext_chain)] = tuple(ext_rules)
        for match in external_matches:
            nat(SERVICES, f"{match} -j {ext_chain}")
        for match in lb_matches:
            nat(SERVICES, f"{match} -j {fw_chain if firewalled else ext_chain}")
        if nodeport_match is not None:
            nat(NODEPORTS, f"{nodeport_match} -j {ext_chain}")
        if firewalled and lbs:
            objs[Key(family, NAT, fw_chain)] = tuple(f"-s {r} -j {ext_chain}" for r in ranges)
    if not external:
        # Nothing to send it to: reject when the Service has no endpoint at all, drop when
        # a Local policy excludes the ones it has (what was not DNATed above). A
        # LoadBalancer IP with source ranges drops the sources outside them first, in a
        # filter-table firewall chain (as upstream's nftables mode does).
        for match in external_matches:
            drop(match, reject=not usable)
        if firewalled and lbs:
            target = _reject(family, proto) if not usable else "DROP"
            only_tcp = "-p tcp " if target.endswith("tcp-reset") else ""  # the reset needs it
            objs[Key(family, FILTER, fw_chain)] = (
                *(f"-s {r} {only_tcp}-j {target}" for r in ranges),
                "-j DROP",
            )
            for match in lb_matches:
                objs[Key(family, FILTER, SERVICES, f"{match} -j {fw_chain}")] = ()
        else:
            for match in lb_matches:
                drop(match, reject=not usable)
        if nodeport_match is not None:
            np = f"-p {proto} {note} -m addrtype --dst-type LOCAL {dport} {svc.node_port}"
            drop(np, reject=not usable)
    if firewalled and external:
        for match in lb_matches:
            drop(match, reject=False)  # sources outside the ranges were not DNATed

    for ep, sep in seps.items():
        if affinity is not None:
            dnat = (
                f"-p {proto} -m recent --set --name {sep} --mask {_mask(family)} --rsource "
                f"-j DNAT --to-destination {targets[ep]}"
            )
        else:
            dnat = f"-p {proto} -j DNAT --to-destination {targets[ep]}"
        plen = 32 if family == 4 else 128
        objs[Key(family, NAT, sep)] = (f"-s {addresses[ep]}/{plen} -j {MARK_MASQ}", dnat)


def render(plan: Plan, ctx: Context) -> dict[ServicePortName, Objects]:
    """Every service port's objects (ports without any are left out)."""
    result: dict[ServicePortName, Objects] = {}
    for name, state in plan.services.items():
        objs = render_port(state, ctx)
        if objs:
            result[name] = objs
    return result


def desired(ctx: Context, ports: Mapping[ServicePortName, Objects]) -> Objects:
    """The whole wanted state: the fixed part of each family and every port's objects."""
    want: Objects = {}
    for family in ctx.families:
        want.update(base(ctx, family))
    for objs in ports.values():
        want.update(objs)
    return want


# --- the transaction ----------------------------------------------------------------------


def _position(key: Key) -> str:
    """How a dispatch rule is added: VIP rules go first, the NodePort jump stays last."""
    if key.chain in BUILTIN:
        return f"-I {key.chain} 1"
    if key.table == NAT and key.chain == SERVICES and not key.rule.endswith(f"-j {NODEPORTS}"):
        return f"-I {key.chain} 1"
    return f"-A {key.chain}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Restore:
    """One ``iptables-restore --noflush`` input and how many commands it carries."""

    text: str
    ops: int

    @property
    def lines(self) -> int:
        return self.text.count("\n")


def restore(change: diff.Diff[Key, Rules]) -> dict[int, Restore]:
    """The restore input per family that turns the old objects into the new ones.

    Per table: declare (create, or flush) every added, changed and removed chain; delete
    removed dispatch rules by spec; fill the declared chains; add new dispatch rules;
    finally delete the removed chains, whose references are gone by then.
    """
    sections: dict[tuple[int, str], dict[str, list[str]]] = {}

    def part(key: Key, name: str) -> list[str]:
        section = sections.setdefault(
            (key.family, key.table),
            {"declare": [], "delete": [], "fill": [], "add": [], "remove": []},
        )
        return section[name]

    for key, rules in change.added:
        if key.rule:
            part(key, "add").append(f"{_position(key)} {key.rule}")
        else:
            part(key, "declare").append(f":{key.chain} - [0:0]")
            part(key, "fill").extend(f"-A {key.chain} {r}" for r in rules)
    for key, _, rules in change.changed:
        part(key, "declare").append(f":{key.chain} - [0:0]")
        part(key, "fill").extend(f"-A {key.chain} {r}" for r in rules)
    flushed = {(k.family, k.table, k.chain) for k, _ in change.removed if not k.rule}
    for key, _ in change.removed:
        if key.rule:
            if (key.family, key.table, key.chain) not in flushed:  # else gone with its chain
                part(key, "delete").append(f"-D {key.chain} {key.rule}")
        else:
            part(key, "declare").append(f":{key.chain} - [0:0]")
            part(key, "remove").append(f"-X {key.chain}")

    result: dict[int, Restore] = {}
    for family in FAMILIES:
        lines: list[str] = []
        ops = 0
        for table in TABLES:
            section = sections.get((family, table))
            if section is None:
                continue
            body = [
                *section["declare"],
                *section["delete"],
                *section["fill"],
                *section["add"],
                *section["remove"],
            ]
            ops += len(body)
            lines += [f"*{table}", *body, "COMMIT"]
        if lines:
            result[family] = Restore(text="\n".join(lines) + "\n", ops=ops)
    return result


CHUNK_LINES = 2_500  # iptables-nft-restore slows down more than linearly past a few thousand

_DEPTH = {"SEP": 1, "SVC": 2, "SVL": 2, "EXT": 3, "FW": 4}


def _depth(key: Key) -> int:
    """Chains that others jump to come first: endpoint, service, external, firewall,
    the dispatch chains (helper chains, jumped to from anywhere, count as 0)."""
    if key.chain in DISPATCH:
        return 6 if key.chain == SERVICES else 5
    parts = key.chain.split("-")
    return _DEPTH.get(parts[1], 0) if len(parts) == 3 else 0


T = TypeVar("T")


def _chunks(items: Iterable[T], size: Callable[[T], int], limit: int) -> list[tuple[T, ...]]:
    chunks: list[tuple[T, ...]] = []
    current: list[T] = []
    used = 0
    for item in items:
        if current and used + size(item) > limit:
            chunks.append(tuple(current))
            current, used = [], 0
        current.append(item)
        used += size(item)
    if current:
        chunks.append(tuple(current))
    return chunks


def restores(
    change: diff.Diff[Key, Rules],
    limit: int | None = CHUNK_LINES,
    absent: frozenset[Key] = frozenset(),
) -> dict[int, list[Restore]]:
    """:func:`restore`, split into several transactions when the change is very large.

    A change of at most ``limit`` lines is one transaction per family (every ordinary
    partial sync), and so is any change when ``limit`` is None (iptables-legacy, whose
    every restore rewrites the whole table in the kernel). A larger one — a cold start,
    a cleanup — goes in dependency order, each transaction leaving the kernel
    consistent: new chains, endpoint chains before the chains that jump to them (all
    unreachable until a dispatch rule points at them); the rest of the new chains too
    long for one transaction (appended); new dispatch rules; changed chains; removed
    dispatch rules; removed chains, the ones that jump first.

    Only a chain in ``absent`` (known not to exist in the kernel) is split: declaring
    one that exists flushes it, so it is rewritten in one transaction, never left
    half-filled between two.
    """
    lines = (
        len(change)
        + sum(len(v) for _, v in change.added)
        + sum(len(v) for _, _, v in change.changed)
    )
    if limit is None or lines <= limit:
        return {family: [r] for family, r in restore(change).items()}
    flushed = {(k.family, k.table, k.chain) for k, _ in change.removed if not k.rule}

    def added(item: tuple[Key, Rules]) -> int:
        return 1 + len(item[1])

    def changed(item: tuple[Key, Rules, Rules]) -> int:
        return 1 + len(item[2])

    def removed(item: tuple[Key, Rules]) -> int:
        return 1 if item[0].rule else 2

    new_chains = sorted((i for i in change.added if not i[0].rule), key=lambda i: _depth(i[0]))
    # A new chain longer than a transaction (the dispatch chains of a large cluster):
    # created with its first rules, the rest appended in later transactions. Each rule
    # that jumps makes iptables-nft-restore 1.8.9 insert the target's name into a sorted
    # linked list (its cache request), so one transaction naming n chains costs O(n²)
    # in the tool — 17 s for 40,000 jumps, minutes for 100,000.
    tails: list[tuple[Key, Rules]] = []
    for i, (key, rules) in enumerate(new_chains):
        if 1 + len(rules) > limit and key in absent:
            new_chains[i] = (key, rules[: limit - 1])
            rest = rules[limit - 1 :]
            tails += [(key, rest[j : j + limit]) for j in range(0, len(rest), limit)]
    new_rules = [i for i in change.added if i[0].rule]
    old_rules = [
        i
        for i in change.removed
        if i[0].rule and (i[0].family, i[0].table, i[0].chain) not in flushed
    ]
    old_chains = sorted((i for i in change.removed if not i[0].rule), key=lambda i: -_depth(i[0]))
    phases: list[diff.Diff[Key, Rules] | tuple[tuple[Key, Rules], ...]] = [
        diff.Diff(added=c) for c in _chunks(new_chains, added, limit)
    ]
    phases += _chunks(tails, lambda i: len(i[1]), limit)  # every chain exists by now
    phases += [diff.Diff(added=c) for c in _chunks(new_rules, added, limit)]
    phases += [diff.Diff(changed=c) for c in _chunks(change.changed, changed, limit)]
    phases += [diff.Diff(removed=c) for c in _chunks(old_rules, removed, limit)]
    phases += [diff.Diff(removed=c) for c in _chunks(old_chains, removed, limit)]
    result: dict[int, list[Restore]] = {}
    for phase in phases:
        inputs = restore(phase) if isinstance(phase, diff.Diff) else _appends(phase)
        for family, r in inputs.items():
            result.setdefault(family, []).append(r)
    return result


def _appends(items: Iterable[tuple[Key, Rules]]) -> dict[int, Restore]:
    """Rules appended to chains that exist (declaring them would flush them)."""
    sections: dict[tuple[int, str], list[str]] = {}
    for key, rules in items:
        sections.setdefault((key.family, key.table), []).extend(
            f"-A {key.chain} {r}" for r in rules
        )
    result: dict[int, Restore] = {}
    for family in FAMILIES:
        lines: list[str] = []
        ops = 0
        for table in TABLES:
            body = sections.get((family, table))
            if body:
                ops += len(body)
                lines += [f"*{table}", *body, "COMMIT"]
        if lines:
            result[family] = Restore(text="\n".join(lines) + "\n", ops=ops)
    return result
