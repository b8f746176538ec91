"""Trace a packet through the IPVS objects and companion layer this backend renders (pure).

``kpy explain --backend ipvs`` takes its verdict, endpoints and masquerade from here, not
from a second computation. The Plan is rendered with :mod:`kpy_ipvs.render` (virtual
services, real servers with weights, companion ipset elements) and the companion rules
(:func:`kpy_ipvs.render.rules`, plus the jumps from the built-in chains that the kernel
side inserts first) are loaded into an in-memory copy of the ``mangle``, ``nat`` and
``filter`` tables. The first packet of a connection then meets them in the kernel's order:

* from a pod or from outside: mangle ``PREROUTING`` (a pod's short-circuit mark, from
  a ``SHORT`` element's skbmark), nat ``PREROUTING`` (the masquerade mark is set before
  IPVS rewrites the destination); if the destination is local (a VIP bound on
  ``kpy-ipvs0`` or a node address), filter ``INPUT`` (traffic policy Local drops,
  source ranges), then IPVS at ``LOCAL_IN`` (it hooks after filter); the packet IPVS
  sends to a real server continues through nat ``POSTROUTING`` (masquerade);
* from the node itself: mangle ``OUTPUT`` (policy Local drops, source ranges and the
  short-circuit mark for the node), nat ``OUTPUT``, then IPVS at ``LOCAL_OUT`` (locally
  generated connections are scheduled there, after nat and before filter, so filter
  ``INPUT`` is never reached and filter ``OUTPUT`` only sees the real server), then nat
  ``POSTROUTING``.

IPVS itself: a firewall-mark virtual service whose mark equals the packet's, else the
virtual service keyed by (destination, port, protocol); its real servers with weight > 0
are the endpoints (weight 0 takes no new connection); a virtual service without one
answers a new connection with ICMP port unreachable (reject). A packet no virtual
service matches is not IPVS's (accept). ``-m addrtype --src-type LOCAL`` means a node
address or a bound VIP.

The rule interpreter knows exactly the syntax :func:`kpy_ipvs.render.rules` emits and
raises :class:`TraceError` on anything else, so a new kind of companion rule cannot be
skipped silently.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from kpy_iptables import trace as iptables_trace
from kpy_iptables.render import FILTER, NAT
from kpy_iptables.trace import Rule, Syntax, Tables, TraceError

from kpy.core.backend import BackendConfig
from kpy.core.model import IPAddress, Plan, Protocol
from kpy.core.trace import Origin, Packet, Trace, Verdict, first_packet
from kpy_ipvs import render
from kpy_ipvs.render import DestKey, PortObjects, VirtualKey, VirtualService

__all__ = [
    "Flow",
    "Rule",
    "Sets",
    "Tables",
    "TraceError",
    "hooks",
    "load",
    "parse_rule",
    "trace",
]

MAX_DEPTH = 8

TERMINAL = frozenset({"ACCEPT", "DROP", "RETURN"})


def _set_flags(args: tuple[str, ...]) -> str | None:
    flags = args[1]
    return (
        None
        if flags in ("dst,dst", "dst,dst,src", "src,dst")
        else f"set flags {flags!r} are not modelled"
    )


def _map_flags(args: tuple[str, ...]) -> str | None:
    return None if args[1] == "dst,dst" else f"--map-set flags {args[1]!r} are not modelled"


def _local_type(args: tuple[str, ...]) -> str | None:
    return None if args[0] == "LOCAL" else f"address type {args[0]!r} is not modelled"


# The companion's part of the iptables language, read by the iptables backend's parser.
SYNTAX = Syntax(
    modules={
        "comment": {"--comment": 1},
        "set": {"--match-set": 2},
        "mark": {"--mark": 1},
        "addrtype": {"--src-type": 1},
    },
    targets={t: {} for t in (*TERMINAL, "MASQUERADE")}
    | {"MARK": {"--or-mark": 1}, "SET": {"--map-set": 2, "--map-mark": 0}},
    addresses=("-s", "-d", "-i"),
    user_chains="KPY-",
    verbs=frozenset({"-A", "-I"}),
    checks={"--match-set": _set_flags, "--map-set": _map_flags, "--src-type": _local_type},
)


def parse_rule(text: str) -> Rule:
    """One companion rule in ``iptables-save`` form (without ``-A CHAIN``)."""
    return iptables_trace.parse_rule(text, SYNTAX)


def load(text: str) -> Tables:
    """Apply the companion's restore input to empty tables, as the kernel would.

    The iptables tracer models ``nat`` and ``filter``; the companion's ``mangle``
    sections hold only ``PREROUTING``, ``OUTPUT`` and chains of its own, so they are read
    with the same loader (as if they were ``nat``, which has those built-in chains) and
    keyed ``mangle``."""
    sections: dict[bool, list[str]] = {False: [], True: []}
    mangle = False
    for line in text.splitlines():
        if line.startswith("*"):
            mangle = line == f"*{render.MANGLE}"
            sections[mangle].append(f"*{NAT}" if mangle else line)
        else:
            sections[mangle].append(line)
    tables = iptables_trace.load("\n".join(sections[False]) + "\n", SYNTAX)
    theirs = iptables_trace.load("\n".join(sections[True]) + "\n", SYNTAX)
    unused = set(iptables_trace.BUILTIN_CHAINS[NAT]) - {"PREROUTING", "OUTPUT"}
    for chain in sorted(unused):
        if theirs[(NAT, chain)]:
            raise TraceError(
                f"mangle {chain} is not modelled (the companion uses PREROUTING, OUTPUT)"
            )
    tables.update(
        {(render.MANGLE, c): r for (t, c), r in theirs.items() if t == NAT and c not in unused}
    )
    return tables


def hooks() -> str:
    """The jumps the kernel side inserts at the top of the built-in chains."""
    return "".join(f"*{t}\n-I {c} 1 -j {target}\nCOMMIT\n" for t, c, target in render.HOOKS)


# --- sets ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Member:
    """One parsed ipset element: ``ip,proto:port`` or ``ip,proto:port,net``."""

    text: str
    address: IPAddress
    protocol: str
    port: int
    net: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    skbmark: tuple[int, int] | None = None  # (mark, mask) of a skbinfo set's element


Sets = dict[str, list[Member]]


def parse_element(set_name: str, value: str) -> Member:
    value_part, _, extension = value.partition(" ")
    skbmark = None
    if extension:
        word, _, mark = extension.partition(" ")
        text, _, mask = mark.partition("/")
        try:
            if word != "skbmark":
                raise ValueError(f"unknown extension {word!r}")
            skbmark = (int(text, 0), int(mask or "0xffffffff", 0))
        except ValueError as exc:
            raise TraceError(f"cannot read element {value!r} of set {set_name}: {exc}") from None
    parts = value_part.split(",")
    try:
        address = ipaddress.ip_address(parts[0])
        protocol, _, port = parts[1].partition(":")
        if protocol not in ("tcp", "udp", "sctp") or not port.isdigit():
            raise ValueError(f"bad proto:port {parts[1]!r}")
        net = ipaddress.ip_network(parts[2], strict=False) if len(parts) == 3 else None
        if len(parts) not in (2, 3):
            raise ValueError("expected 2 or 3 fields")
    except (ValueError, IndexError) as exc:
        raise TraceError(f"cannot read element {value!r} of set {set_name}: {exc}") from None
    return Member(f"{set_name} {value}", address, protocol, int(port), net, skbmark)


def sets(ports: Iterable[PortObjects]) -> Sets:
    """Every companion set (empty ones too) with the elements render puts in it."""
    out: Sets = {name: [] for name, _, _ in render.set_names()}
    for objs in ports:
        for el in sorted(objs.elements):
            if el.set not in out:
                raise TraceError(f"element {el} names an unknown set")
            out[el.set].append(parse_element(el.set, el.value))
    return out


# --- the walk -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Flow:
    """The first packet of a connection, as the companion and IPVS have changed it."""

    src: IPAddress
    dst: IPAddress
    port: int
    protocol: str  # lower case, as ipset writes it
    iif: str = ""  # the input interface ("" for the node's own packets)
    mark: int = 0
    masquerade: bool = False
    seen: tuple[str, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class _Walker:
    chains: Tables
    sets: Sets
    family: int
    local: frozenset[IPAddress] = frozenset()  # addrtype LOCAL: node addresses and VIPs

    def _in_set(self, rule: Rule, name: str, flags: str, flow: Flow) -> Member | None:
        if name not in self.sets:
            raise TraceError(f"set {name} does not exist in rule {rule.text!r}")
        # src,dst: the element's address is the packet's source, its port the destination's
        address = flow.src if flags == "src,dst" else flow.dst
        for m in self.sets[name]:
            if (m.address, m.port, m.protocol) != (address, flow.port, flow.protocol):
                continue
            if flags == "dst,dst,src":
                if m.net is None:
                    raise TraceError(f"{m.text}: a dst,dst,src match needs a net element")
                if not (flow.src.version == m.net.version and flow.src in m.net):
                    continue
            elif m.net is not None:
                raise TraceError(f"{m.text}: a dst,dst match of an ip,port,net set")
            return m
        return None

    def _matches(self, rule: Rule, flow: Flow) -> tuple[bool, tuple[str, ...]]:
        """Whether ``rule`` matches, and the set elements that made it match."""
        used: list[str] = []
        for match in rule.matches:
            for option, negated, args in match.options:
                if option == "--comment":
                    continue
                if option == "-i":  # a trailing + matches every name with that prefix
                    name = args[0]
                    hit = flow.iif.startswith(name[:-1]) if name.endswith("+") else flow.iif == name
                elif option in ("-s", "-d"):
                    ip = flow.src if option == "-s" else flow.dst
                    nets = (ipaddress.ip_network(t, strict=False) for t in args[0].split(","))
                    hit = any(ip.version == n.version and ip in n for n in nets)
                elif option == "--match-set":
                    member = self._in_set(rule, args[0], args[1], flow)
                    hit = member is not None
                    if member is not None and not negated:
                        used.append(f"ipset {member.text}")
                elif option == "--src-type":
                    hit = flow.src in self.local
                else:  # --mark
                    value, _, mask = args[0].partition("/")
                    hit = flow.mark & int(mask or "0xffffffff", 0) == int(value, 0)
                if hit is negated:
                    return False, ()
        return True, tuple(used)

    def run(self, table: str, chain: str, flow: Flow, depth: int = 0) -> tuple[Flow, str]:
        """How ``flow`` leaves ``chain``: (flow, ACCEPT/DROP/RETURN)."""
        if depth > MAX_DEPTH:
            raise TraceError(f"jumps nested deeper than {MAX_DEPTH} at {table} {chain}")
        if (table, chain) not in self.chains:
            raise TraceError(f"jump to missing chain {chain} in table {table}")
        tool = "iptables" if self.family == 4 else "ip6tables"
        for rule in self.chains[(table, chain)]:
            matched, used = self._matches(rule, flow)
            if not matched:
                continue
            seen = (*flow.seen, f"{tool} -t {table} -A {chain} {rule.text}", *used)
            flow = replace(flow, seen=seen)
            if rule.target in TERMINAL:
                return flow, rule.target
            if rule.target == "MARK":
                flow = replace(flow, mark=flow.mark | int(rule.target_options["--or-mark"], 0))
            elif rule.target == "SET":
                flow = self._map_mark(rule, flow)
            elif rule.target == "MASQUERADE":
                if table != NAT or chain not in (render.CHAIN_POST, "POSTROUTING"):
                    raise TraceError(f"MASQUERADE outside nat POSTROUTING: {rule.text!r}")
                return replace(flow, masquerade=True), "ACCEPT"
            else:
                flow, verdict = self.run(table, rule.target, flow, depth + 1)
                if verdict != "RETURN":
                    return flow, verdict
        return flow, "RETURN"

    def _map_mark(self, rule: Rule, flow: Flow) -> Flow:
        """``-j SET --map-set NAME dst,dst --map-mark``: the element's skbmark, as the
        kernel applies it (``mark = (mark & ~mask) ^ value``); no element, no change."""
        if "--map-mark" not in rule.target_options:
            raise TraceError(f"SET without --map-mark is not modelled: {rule.text!r}")
        member = self._in_set(rule, rule.target_options["--map-set"], "dst,dst", flow)
        if member is None:
            return flow
        if member.skbmark is None:
            raise TraceError(f"{member.text}: --map-mark from an element without skbmark")
        value, mask = member.skbmark
        seen = (*flow.seen, f"ipset {member.text}")
        return replace(flow, mark=(flow.mark & ~mask & 0xFFFFFFFF) ^ value, seen=seen)

    def hook(self, table: str, chain: str, flow: Flow) -> tuple[Flow, str]:
        """A built-in chain: falling off means its policy, ACCEPT."""
        flow, verdict = self.run(table, chain, flow)
        return flow, "ACCEPT" if verdict == "RETURN" else verdict


def _ipvsadm(key: VirtualKey) -> str:
    if key.fwmark:
        return f"-f {key.fwmark}" + (" -6" if key.address.version == 6 else "")
    flag = {Protocol.TCP: "-t", Protocol.UDP: "-u", Protocol.SCTP: "--sctp-service"}
    return f"{flag[key.protocol]} {_host_port(key.address, key.port)}"


def _host_port(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def _service_text(key: VirtualKey, settings: VirtualService) -> str:
    text = f"ipvsadm -A {_ipvsadm(key)} -s {settings.scheduler}"
    return text + (f" -p {settings.persistence}" if settings.persistence else "")


def _dest_text(dest: DestKey, weight: int) -> str:
    real = _host_port(dest.address, dest.port)
    return f"ipvsadm -a {_ipvsadm(dest.virtual)} -r {real} -m -w {weight}"


def trace(plan: Plan, packet: Packet, origin: Origin, config: BackendConfig) -> Trace:
    """What the rendered IPVS objects and companion rules do with the first packet of
    ``packet``'s connection."""
    family = packet.dst.version
    ctx = render.context(config, plan.node)
    ports = render.render(plan, ctx)
    services: dict[VirtualKey, VirtualService] = {}
    dests: dict[DestKey, int] = {}
    bound: set[IPAddress] = set()
    for objs in ports.values():
        services.update(objs.services)
        dests.update(objs.destinations)
        bound |= objs.addresses
    local = bound | set(config.node_ips) | set(plan.node.addresses) | set(ctx.nodeport_ips)
    tables = load(render.rules(ctx, family) + hooks())
    walker = _Walker(tables, sets(ports.values()), family, frozenset(local))
    flow = Flow(**first_packet(packet, origin, config))

    def done(verdict: Verdict, f: Flow, endpoints: tuple[str, ...] = ()) -> Trace:
        return Trace(verdict=verdict, endpoints=endpoints, masquerade=f.masquerade, kernel=f.seen)

    if origin is Origin.NODE:
        flow, verdict = walker.hook(render.MANGLE, "OUTPUT", flow)
        if verdict == "ACCEPT":
            flow, verdict = walker.hook(NAT, "OUTPUT", flow)
    else:
        flow, verdict = walker.hook(render.MANGLE, "PREROUTING", flow)
        if verdict == "ACCEPT":
            flow, verdict = walker.hook(NAT, "PREROUTING", flow)
        if verdict == "ACCEPT" and flow.dst in local:
            flow, verdict = walker.hook(FILTER, "INPUT", flow)
        elif verdict == "ACCEPT":
            # routed onwards: IPVS only sees packets delivered locally
            flow, verdict = walker.hook(FILTER, "FORWARD", flow)
    if verdict == "DROP":
        return done(Verdict.DROP, flow)
    key = VirtualKey(address=flow.dst, port=flow.port, protocol=packet.protocol)
    if flow.mark and render.fwmark_key(flow.mark, family) in services:
        key = render.fwmark_key(flow.mark, family)  # IPVS looks firewall marks up first
    settings = services.get(key)
    if settings is None or (origin is not Origin.NODE and flow.dst not in local):
        return done(Verdict.ACCEPT, flow)  # not IPVS's: delivered or routed as it is
    seen = [_service_text(key, settings)]
    reals = sorted(
        ((d, w) for d, w in dests.items() if d.virtual == key),
        key=lambda dw: (int(dw[0].address), dw[0].port),
    )
    seen += [_dest_text(d, w) for d, w in reals]
    eligible = [d for d, w in reals if w > 0]
    flow = replace(flow, seen=(*flow.seen, *seen))
    if not eligible:
        return done(Verdict.REJECT, replace(flow, seen=(*flow.seen, "ipvs: no real server")))
    endpoints = tuple(_host_port(d.address, d.port) for d in eligible)
    # after IPVS each real server is a different packet (hairpin masquerade depends on
    # it): follow every one through nat POSTROUTING
    masquerade = False
    kernel = list(flow.seen)
    for real in eligible:
        nat, verdict = walker.hook(
            NAT, "POSTROUTING", replace(flow, dst=real.address, port=real.port)
        )
        if verdict != "ACCEPT":
            raise TraceError(f"nat POSTROUTING ends {real.address} in {verdict}: not modelled")
        masquerade = masquerade or nat.masquerade
        kernel += [k for k in nat.seen if k not in kernel]
    return Trace(
        verdict=Verdict.FORWARD, endpoints=endpoints, masquerade=masquerade, kernel=tuple(kernel)
    )
