"""Plan → nftables objects keyed by stable names, and the transaction between two states.

Pure: no I/O, no clock. :func:`base_objects` renders the fixed skeleton of the ``ip kpy``
and ``ip6 kpy`` tables (hook chains, dispatch chains, verdict maps) from the node's
configuration; :func:`port_objects` renders what one service port needs (its service,
external, firewall and endpoint chains, affinity sets and map elements). Every object
has a key (``"ip chain service-…"``) and a *value* — a short text that is equal for
equal objects — which is also what :mod:`kpy_nftables.observe` reads back from the
kernel, so ``kpy.core.diff`` between the wanted and the programmed values is the work to do.

A chain's rules are :class:`Rule` objects: typed statements (matches, set lookups, mark,
DNAT, verdicts) whose text, the rule itself as a ``str``, is exactly its ``nft`` syntax.
A chain's value is its fingerprint: a hash of its hook and its rules' text. Reading rules back
from the kernel is slow (listing a table of 10,000 Services takes the kernel ~10 s),
so every chain's fingerprint is also kept in the ``fingerprints`` set: one element per
chain, keyed by a 128-bit hash of the chain's key (as an IPv6 address), the fingerprint
in its comment. A restarted agent lists chain names, set and map elements — fast —
and knows which chains are intact without reading a single rule.

:func:`transaction` turns wanted objects and programmed values, over a set of keys,
into one transaction whose size is proportional to what differs: typed operations (add
a table, chain, set or elements, add a rule, flush or delete) that carry these objects.
Each operation's ``nft()`` is its line of an ``nft -f`` script;
:mod:`kpy_nftables.netlink` encodes the same operations as netlink messages directly.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from kpy.core.backend import BackendConfig, LocalDetector
from kpy.core.model import (
    Endpoint,
    IPAddress,
    IPFamily,
    IPNetwork,
    Protocol,
    ServicePortName,
    ServicePortState,
    SessionAffinity,
    TrafficPolicy,
)

TABLE = "kpy"
# Service ports are spread over this many shard tables per family, ``kpy-0`` … by the
# hash of their name. Committing a rule with a DNAT, a mark or a jump makes the kernel
# re-validate every chain reachable from that table's hooks, so a commit costs in
# proportion to the Services of the table it touches; a shard holds 1/SHARDS of them.
# Each shard hooks nat prerouting and output itself, one priority after the base table,
# and looks up only its own ports. Why 128 (a change's commit against a new connection's
# walk over every shard's hook, measured up to 100,000 Services): docs/benchmarks.md,
# "Shard count".
SHARDS = 128
SHARD_PREFIX = f"{TABLE}-"
SHARD_NAT_PRIORITY = "-99"  # after the base table's nat chains (dstnat = -100)
MASQ_MARK = "0x00004000"
FAMILIES = ("ip", "ip6")
COMMENT_MAX = 127  # nftables' user comment limit

# Fixed chain names (per table).
SERVICES = "services"
MARK_MASQ = "mark-for-masquerade"
MASQUERADING = "masquerading"
REJECT = "reject-chain"
FIREWALL_CHECK = "firewall-check"
SERVICE_EP_CHECK = "service-endpoints-check"
CLUSTER_IPS_CHECK = "cluster-ips-check"  # unknown ports of ClusterIPs, unallocated addresses
# The node's own packets after DNAT (nat output is -100, the shards -99): what is still
# addressed to a ClusterIP was not DNATed.
FILTER_OUTPUT_POST_DNAT = "filter-output-post-dnat"
NODEPORT_EP_CHECK = "nodeport-endpoints-check"

# Verdict maps.
SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
NO_EP_SERVICES = "no-endpoint-services"
NO_EP_NODEPORTS = "no-endpoint-nodeports"
FIREWALL_IPS = "firewall-ips"
FINGERPRINTS = "fingerprints"
MAPS = (SERVICE_IPS, SERVICE_NODEPORTS, NO_EP_SERVICES, NO_EP_NODEPORTS, FIREWALL_IPS)
SHARD_MAPS = (SERVICE_IPS, SERVICE_NODEPORTS)  # in the shard tables; the rest in the base
# Sets (elements without verdicts).
MASQ_IPS = "masquerade-ips"  # external/LB frontends whose traffic is masqueraded
MASQ_NODEPORTS = "masquerade-nodeports"
# endpoint . port . service hash, for the dump; in the shard tables (no rule uses it): the
# kernel dumps a set's elements ~32 KiB at a time and walks the set from its first
# element again for each part, so one set of every endpoint cost the square of them (7.3
# s of the kernel's time to read at 100,000 Services, against 0.1 s for 100,000 elements)
SERVICE_ENDPOINTS = "service-endpoints"
# "10.244.1.5 . 10.244.1.5" for every endpoint address: a DNATed connection whose source
# is its destination (a pod reaching itself through a Service) is masqueraded. Shared:
# ports with an endpoint on the same address want the same element.
HAIRPIN = "hairpin"
# Every ClusterIP of every Service (upstream's cluster-ips): a new connection still
# addressed to one after DNAT is to a port no Service serves, and is rejected. Shared:
# every port of a Service wants its ClusterIP's element.
CLUSTER_IPS = "cluster-ips"
SETS = (FINGERPRINTS, MASQ_IPS, MASQ_NODEPORTS, SERVICE_ENDPOINTS, HAIRPIN, CLUSTER_IPS)
SHARED_SETS = frozenset((HAIRPIN, CLUSTER_IPS))
# The sets and maps whose elements are frontends: two service ports may claim the same
# one (invalid input), and the first in name order keeps it. Other elements are unique
# to their port by construction (they hold its hash or its chain's).
FRONTEND_SETS = frozenset(
    (
        SERVICE_IPS,
        SERVICE_NODEPORTS,
        NO_EP_SERVICES,
        NO_EP_NODEPORTS,
        FIREWALL_IPS,
        MASQ_IPS,
        MASQ_NODEPORTS,
    )
)

CHAIN_ONLY = "chain-without-fingerprint"  # how observe reports a chain with no fingerprint


def family_of(family: IPFamily) -> str:
    return "ip" if family is IPFamily.IPV4 else "ip6"


def _addr_type(nf: str) -> str:
    return "ipv4_addr" if nf == "ip" else "ipv6_addr"


def shard_table(name: ServicePortName) -> str:
    """The shard table a service port's chains, sets and dispatch elements live in."""
    return f"{SHARD_PREFIX}{int(port_hash(name), 16) % SHARDS}"


def is_kpy_table(name: str) -> bool:
    """The base table or a shard table (of any shard count)."""
    if name == TABLE:
        return True
    return name.startswith(SHARD_PREFIX) and name[len(SHARD_PREFIX) :].isdigit()


def shard_tables() -> tuple[str, ...]:
    return tuple(f"{SHARD_PREFIX}{i}" for i in range(SHARDS))


def _where(family: str, table: str) -> str:
    """A key's prefix: the family, and the table when it is a shard."""
    return family if table == TABLE else f"{family} {table}"


@dataclass(frozen=True, slots=True)
class Chain:
    family: str
    name: str
    rules: tuple[Rule, ...]
    hook: str | None = None  # "type nat hook prerouting priority dstnat; policy accept;"
    table: str = TABLE

    @property
    def key(self) -> str:
        return f"{_where(self.family, self.table)} chain {self.name}"

    @property
    def value(self) -> str:
        return chain_fingerprint(self.rules, self.hook)


@dataclass(frozen=True, slots=True)
class Element:
    family: str
    map: str
    element: str  # "10.96.0.1 . tcp . 80" or "tcp . 30080"
    verdict: str  # "goto service-…", "drop"; "" in a set (no verdict)
    comment: str
    table: str = TABLE

    @property
    def key(self) -> str:
        return f"{_where(self.family, self.table)} element {self.map} {self.element}"

    @property
    def claim(self) -> str:
        """What two service ports cannot both hold: the element in its map, whichever
        shard table the map is in."""
        return claim_key(self.key)

    @property
    def value(self) -> str:
        return f"{self.verdict} # {self.comment}"


@dataclass(frozen=True, slots=True)
class Set:
    """A named set or verdict map; only its definition is keyed (elements are separate).

    Affinity sets carry their timeout in their name, so a definition never changes in
    place: a new timeout is a new set (and new chain rules), the old one is deleted.
    """

    family: str
    name: str
    type: str  # "ipv4_addr" or "ipv4_addr . inet_proto . inet_service"
    timeout: int | None = None  # seconds; a dynamic set with per-element expiry
    kind: str = "set"  # "set" or "map" (a verdict map)
    table: str = TABLE

    @property
    def key(self) -> str:
        return f"{_where(self.family, self.table)} {self.kind} {self.name}"

    @property
    def value(self) -> str:
        return set_value(self.type, self.timeout)

    @property
    def spec(self) -> str:
        if self.kind == "map":
            return f"type {self.type} : verdict;"
        if self.timeout is not None:
            return f"type {self.type}; flags dynamic,timeout; timeout {self.timeout}s;"
        return f"type {self.type};"


_KINDS = frozenset(("chain", "element", "set", "map"))


def split_key(key: str) -> tuple[str, str, str, str]:
    """A key's family, table, kind and the rest (name, or map and element)."""
    family, second, rest = key.split(" ", 2)
    if second in _KINDS:
        return family, TABLE, second, rest
    kind, rest = rest.split(" ", 1)
    return family, second, kind, rest


def claim_key(key: str) -> str:
    """``key`` without its shard table (see :attr:`Element.claim`)."""
    family, table, kind, rest = split_key(key)
    return key if table == TABLE else f"{family} {kind} {rest}"


def set_value(type_: str, timeout: int | None) -> str:
    return type_ if timeout is None else f"{type_} timeout {timeout}s"


Obj = Chain | Element | Set


def chain_fingerprint(rules: tuple[str, ...], hook: str | None = None) -> str:
    """A hash of the chain's hook and its rules' text, and their count."""
    digest = hashlib.sha256("\n".join((hook or "", *rules)).encode()).hexdigest()
    return f"kpy:{digest[:20]}:{len(rules)}"


def fingerprint_key(chain_key: str) -> str:
    """The ``fingerprints`` element that holds a chain's fingerprint: a 128-bit hash of
    the chain's key, written as an exploded IPv6 address (observe explodes what it reads)."""
    h = hashlib.sha256(chain_key.encode()).hexdigest()
    return ":".join(h[i : i + 4] for i in range(0, 32, 4))


def with_fingerprints(objs: Iterable[Obj]) -> dict[str, Obj]:
    """Key ``objs``, adding each chain's ``fingerprints`` element."""
    result: dict[str, Obj] = {}
    for obj in objs:
        result[obj.key] = obj
        if isinstance(obj, Chain):
            fp = Element(obj.family, FINGERPRINTS, fingerprint_key(obj.key), "", obj.value)
            result[fp.key] = fp
    return result


# --- naming ------------------------------------------------------------------------------


# What a part of a label may hold: what Kubernetes allows in namespaces, Service names
# and port names (kpy.core.convert refuses anything else), all of it plain in an nft
# identifier and in a quoted comment.
_LABEL_PART = re.compile(r"(?:[a-z0-9](?:[-a-z0-9.]{0,61}[a-z0-9])?)?")


def label_part(text: str) -> str:
    """``text`` when it is a Kubernetes name; anything else becomes ``_`` and a hash.

    Every name-derived piece of rule text (chain names, comments) goes through here, so
    no quote, newline, ``;``, ``}``, ``#``, space or non-ASCII character from an object
    can reach an nft script, whatever the render functions are given. ``_`` is in no
    Kubernetes name, so a hashed part never looks like a real one.
    """
    if _LABEL_PART.fullmatch(text):
        return text
    return "_" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def port_label(name: ServicePortName) -> str:
    """``ns/name/tcp/portname`` — readable, and parseable back (see :func:`parse_label`)."""
    return (
        f"{label_part(name.namespace)}/{label_part(name.name)}/"
        f"{name.protocol.lower()}/{label_part(name.port)}"
    )


def parse_label(label: str) -> str | None:
    """The ``str(ServicePortName)`` a label stands for, or None if it is not one."""
    parts = label.split("/")
    if len(parts) != 4:
        return None
    ns, name, proto, port = parts
    try:
        protocol = Protocol(proto.upper())
    except ValueError:
        return None
    return str(ServicePortName(namespace=ns, name=name, port=port, protocol=protocol))


def port_hash(name: ServicePortName) -> str:
    return hashlib.sha256(str(name).encode("utf-8", "surrogatepass")).hexdigest()[:8].upper()


class PortNames:
    """The names of one service port's chains and sets (computed once per render)."""

    __slots__ = ("_base", "_hash")

    def __init__(self, name: ServicePortName) -> None:
        self._hash = port_hash(name)
        self._base = f"{self._hash}-{port_label(name)}"

    @property
    def service(self) -> str:
        return f"service-{self._base}"

    @property
    def external(self) -> str:
        return f"external-{self._base}"

    @property
    def firewall(self) -> str:
        return f"firewall-{self._base}"

    def affinity(self, ep: Endpoint, ip: str, timeout: int) -> str:
        return f"affinity-{self._hash}-{timeout}__{ip.replace(':', '.')}/{ep.port}"


def service_chain(name: ServicePortName) -> str:
    return PortNames(name).service


def firewall_chain(name: ServicePortName) -> str:
    return PortNames(name).firewall


def parse_chain_label(chain: str) -> str | None:
    """The service port a per-port chain belongs to (``str(ServicePortName)``), if any."""
    kind, sep, rest = chain.partition("-")
    if not sep or kind not in ("service", "external", "firewall"):
        return None
    _hash, sep, label = rest.partition("-")
    if not sep:
        return None
    return parse_label(label.split("__", 1)[0])


def _comment(label: str) -> str:
    return label if len(label) <= COMMENT_MAX else label[: COMMENT_MAX - 9] + "~" + label[-8:]


# --- rules -------------------------------------------------------------------------------
#
# A rule is a sequence of typed statements. Its text — what ``nft -f`` reads, what the
# trace interprets and what a chain's fingerprint hashes — is the statements' ``nft()``
# joined by spaces; kpy_nftables.netlink encodes the statements themselves. Every name
# in a statement is render's own (chain and set names made of label parts), every value
# an address, network, number or protocol render formatted.


class _Statement:
    """A statement's fields and, made once with it, its text (``nft()``); equal to
    another of its kind with the same text. Never changed once made."""

    __slots__ = ("text",)
    text: str

    def nft(self) -> str:
        return self.text

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.text!r})"


class L4Proto(_Statement):
    """``meta l4proto tcp``"""

    __slots__ = ("proto",)

    def __init__(self, proto: str) -> None:  # "tcp", "udp", "sctp"
        self.proto = proto
        self.text = f"meta l4proto {proto}"


class DPort(_Statement):
    """``tcp dport 80`` (nft adds the ``meta l4proto`` match it depends on)"""

    __slots__ = ("port", "proto")

    def __init__(self, proto: str, port: int) -> None:
        self.proto = proto
        self.port = port
        self.text = f"{proto} dport {port}"


class Addr(_Statement):
    """``ip daddr 10.96.0.1``, ``ip daddr 10.96.0.0/12``, ``ip saddr != { a/16, b/24 }``
    (several values: an anonymous set)."""

    __slots__ = ("family", "negate", "selector", "values")

    def __init__(
        self, family: str, selector: str, values: tuple[str, ...], negate: bool = False
    ) -> None:
        self.family = family
        self.selector = selector  # "saddr" or "daddr"
        self.values = values
        self.negate = negate
        op = "!= " if negate else ""
        self.text = f"{family} {selector} {op}{_set_literal(list(values))}"


class AddrIn(_Statement):
    """``ip daddr @cluster-ips``: the address is in a named set."""

    __slots__ = ("family", "selector", "set")

    def __init__(self, family: str, selector: str, set_: str) -> None:
        self.family = family
        self.selector = selector
        self.set = set_
        self.text = f"{family} {selector} @{set_}"


class Lookup(_Statement):
    """``ip daddr . meta l4proto . th dport @masquerade-ips`` (``vmap``: a verdict map)."""

    __slots__ = ("keys", "set", "vmap")

    def __init__(self, keys: tuple[str, ...], set_: str, vmap: bool = False) -> None:
        self.keys = keys  # "ip daddr", "meta l4proto", "th dport"
        self.set = set_
        self.vmap = vmap
        self.text = f"{' . '.join(keys)} {'vmap ' if vmap else ''}@{set_}"


class FibLocal(_Statement):
    """``fib saddr type local``: the address is one of this node's."""

    __slots__ = ("selector",)

    def __init__(self, selector: str) -> None:  # "saddr" or "daddr"
        self.selector = selector
        self.text = f"fib {selector} type local"


class IifName(_Statement):
    """``iifname "cni0"``, ``iifname != "cali*"``"""

    __slots__ = ("name", "negate")

    def __init__(self, name: str, negate: bool = False) -> None:  # "cali*": a prefix
        self.name = name
        self.negate = negate
        self.text = f'iifname {"!= " if negate else ""}"{name}"'


class CtState(_Statement):
    """``ct state new``"""

    __slots__ = ("state",)

    def __init__(self, state: str = "new") -> None:
        self.state = state
        self.text = f"ct state {state}"


class MarkSet(_Statement):
    """``meta mark set meta mark | 0x00004000`` (``^``: toggled)"""

    __slots__ = ("mark", "op")

    def __init__(self, mark: str, op: str = "|") -> None:
        self.mark = mark
        self.op = op
        self.text = f"meta mark set meta mark {op} {mark}"


class MarkClear(_Statement):
    """``meta mark & 0x00004000 == 0x00000000``: the bits are not set."""

    __slots__ = ("mark",)

    def __init__(self, mark: str) -> None:
        self.mark = mark
        self.text = f"meta mark & {mark} == 0x00000000"


class Numgen(_Statement):
    """``numgen random mod 3 == 0``: one time in ``modulus``."""

    __slots__ = ("modulus",)

    def __init__(self, modulus: int) -> None:
        self.modulus = modulus
        self.text = f"numgen random mod {modulus} == 0"


class Update(_Statement):
    """``update @affinity-… { ip saddr }``: the source address into a dynamic set."""

    __slots__ = ("family", "set")

    def __init__(self, family: str, set_: str) -> None:
        self.family = family
        self.set = set_
        self.text = f"update @{set_} {{ {family} saddr }}"


class Dnat(_Statement):
    """``dnat to 10.244.1.5:8080``, ``dnat to [fd00::5]:8080``"""

    __slots__ = ("family", "ip", "port")

    def __init__(self, family: str, ip: str, port: int) -> None:
        self.family = family
        self.ip = ip
        self.port = port
        self.text = f"dnat to [{ip}]:{port}" if family == "ip6" else f"dnat to {ip}:{port}"


class Masquerade(_Statement):
    """``masquerade fully-random``"""

    __slots__ = ("flags",)

    def __init__(self, flags: str = "fully-random") -> None:
        self.flags = flags
        self.text = f"masquerade {flags}"


class Reject(_Statement):
    """``reject`` (ICMP port unreachable), ``reject with tcp reset``"""

    __slots__ = ("tcp_reset",)

    def __init__(self, tcp_reset: bool = False) -> None:
        self.tcp_reset = tcp_reset
        self.text = "reject with tcp reset" if tcp_reset else "reject"


class Verdict(_Statement):
    """``drop``, ``return``, ``jump services``, ``goto service-…``"""

    __slots__ = ("chain", "verdict")

    def __init__(self, verdict: str, chain: str | None = None) -> None:
        self.verdict = verdict
        self.chain = chain
        self.text = verdict if chain is None else f"{verdict} {chain}"


Statement = (
    L4Proto
    | DPort
    | Addr
    | AddrIn
    | Lookup
    | FibLocal
    | IifName
    | CtState
    | MarkSet
    | MarkClear
    | Numgen
    | Update
    | Dnat
    | Masquerade
    | Reject
    | Verdict
)


class Rule(str):
    """A rule: its statements, and (as the ``str`` it is) their text. Made by
    :func:`rule`; one made from text alone has no statements (the netlink encoder
    refuses it, the trace reads its text)."""

    statements: tuple[Statement, ...] = ()

    def nft(self) -> str:
        return str(self)

    def __reduce__(self) -> tuple[Any, tuple[Statement, ...]]:
        return rule, self.statements  # copied and pickled as its statements


def rule(*statements: Statement) -> Rule:
    """The rule of ``statements`` (made by ``str``'s own constructor: a rule is made
    for every endpoint of every service port on a full sync)."""
    made = Rule(" ".join([s.text for s in statements]))
    made.statements = statements
    return made


# Marking inline rather than jumping to mark-for-masquerade: a rule that adds a jump or
# goto makes the kernel re-validate every chain reachable from the table's hooks at
# commit (~70 ms at 10,000 Services), and service chains change on every endpoint change.
SET_MASQ = MarkSet(MASQ_MARK)
DROP = Verdict("drop")


# made once: every service chain has them
_L4PROTO = {p: L4Proto(p) for p in ("tcp", "udp", "sctp")}
_numgen = functools.lru_cache(maxsize=256)(Numgen)


def _jump(chain: str) -> Verdict:
    return Verdict("jump", chain)


def _goto(chain: str) -> Verdict:
    return Verdict("goto", chain)


# --- the skeleton ------------------------------------------------------------------------


def _cidrs(networks: Iterable[IPNetwork], version: int) -> list[str]:
    return sorted({str(n) for n in networks if n.version == version})


def _set_literal(items: list[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _nodeport_match(nf: str, config: BackendConfig) -> tuple[Statement, ...] | None:
    """The match for traffic to this node's NodePort addresses, None for none."""
    version = 4 if nf == "ip" else 6
    nets = config.nodeport_networks(version)
    if nets is not None:
        if not nets:
            return None  # nowhere
        return (FibLocal("daddr"), Addr(nf, "daddr", tuple(_cidrs(nets, version))))
    loopback = "127.0.0.0/8" if nf == "ip" else "::1"
    return (FibLocal("daddr"), Addr(nf, "daddr", (loopback,), negate=True))


_L4_PORT = ("meta l4proto", "th dport")


def base_objects(config: BackendConfig) -> dict[str, Obj]:
    """The tables' fixed chains and maps, for both families."""
    objs: list[Obj] = []
    for nf in FAMILIES:
        addr = _addr_type(nf)
        objs.append(Set(nf, FINGERPRINTS, "ipv6_addr"))
        objs.append(Set(nf, MASQ_IPS, f"{addr} . inet_proto . inet_service"))
        objs.append(Set(nf, MASQ_NODEPORTS, "inet_proto . inet_service"))
        objs.append(Set(nf, HAIRPIN, f"{addr} . {addr}"))
        objs.append(Set(nf, CLUSTER_IPS, addr))
        # upstream nftables mode: a port no Service serves on a ClusterIP is rejected, an
        # address of the service CIDRs that no Service has is dropped (one rule per CIDR,
        # where upstream writes one with an anonymous set: the same packets, and rules a
        # partial sync sends over netlink when a ServiceCIDR comes or goes)
        cluster_check = [rule(AddrIn(nf, "daddr", CLUSTER_IPS), Reject())]
        for cidr in _cidrs(config.all_service_cidrs(), 4 if nf == "ip" else 6):
            cluster_check.append(rule(Addr(nf, "daddr", (cidr,)), DROP))
        for name in (NO_EP_SERVICES, FIREWALL_IPS):
            objs.append(Set(nf, name, f"{addr} . inet_proto . inet_service", kind="map"))
        objs.append(Set(nf, NO_EP_NODEPORTS, "inet_proto . inet_service", kind="map"))
        dispatch = (f"{nf} daddr", *_L4_PORT)
        nodeport = _nodeport_match(nf, config)
        # The base table's nat chains only mark for masquerade; the shards (one priority
        # later) dispatch. A nat chain that DNATs ends the hook's nat chains for that
        # connection, so marking must come first.
        services = [rule(Lookup(dispatch, MASQ_IPS), _jump(MARK_MASQ))]
        if nodeport is not None:
            services.append(rule(*nodeport, Lookup(_L4_PORT, MASQ_NODEPORTS), _jump(MARK_MASQ)))
        nodeport_check = []
        if nodeport is not None:
            nodeport_check.append(rule(*nodeport, Lookup(_L4_PORT, NO_EP_NODEPORTS, vmap=True)))
        objs += _shard_skeleton(nf, addr, dispatch, nodeport)
        new = CtState("new")

        def new_jump(chain: str) -> Rule:
            return rule(new, _jump(chain))  # noqa: B023 (called in this iteration only)

        objs += [
            Chain(
                nf,
                "nat-prerouting",
                (rule(_jump(SERVICES)),),
                _hook("nat", "prerouting", "dstnat"),
            ),
            Chain(nf, "nat-output", (rule(_jump(SERVICES)),), _hook("nat", "output", "-100")),
            Chain(
                nf,
                "nat-postrouting",
                (rule(_jump(MASQUERADING)),),
                _hook("nat", "postrouting", "srcnat"),
            ),
            Chain(
                nf,
                "filter-prerouting",
                (new_jump(FIREWALL_CHECK),),
                _hook("filter", "prerouting", "-110"),
            ),
            Chain(
                nf,
                "filter-input",
                (new_jump(NODEPORT_EP_CHECK), new_jump(SERVICE_EP_CHECK)),
                _hook("filter", "input", "-110"),
            ),
            Chain(
                nf,
                "filter-forward",
                (new_jump(SERVICE_EP_CHECK), new_jump(CLUSTER_IPS_CHECK)),
                _hook("filter", "forward", "-110"),
            ),
            Chain(
                nf,
                FILTER_OUTPUT_POST_DNAT,
                (new_jump(CLUSTER_IPS_CHECK),),
                _hook("filter", "output", "0"),
            ),
            Chain(nf, CLUSTER_IPS_CHECK, tuple(cluster_check)),
            # The node's own traffic: source ranges and rejects before DNAT. No NodePort
            # check here: a packet to a local address meets filter-input too, after NAT.
            Chain(
                nf,
                "filter-output",
                (new_jump(FIREWALL_CHECK), new_jump(SERVICE_EP_CHECK)),
                _hook("filter", "output", "-110"),
            ),
            Chain(nf, SERVICES, tuple(services)),
            Chain(nf, FIREWALL_CHECK, (rule(Lookup(dispatch, FIREWALL_IPS, vmap=True)),)),
            Chain(nf, SERVICE_EP_CHECK, (rule(Lookup(dispatch, NO_EP_SERVICES, vmap=True)),)),
            Chain(nf, NODEPORT_EP_CHECK, tuple(nodeport_check)),
            Chain(nf, MARK_MASQ, (rule(SET_MASQ),)),
            Chain(
                nf,
                MASQUERADING,
                (
                    rule(Lookup((f"{nf} saddr", f"{nf} daddr"), HAIRPIN), Masquerade()),
                    rule(MarkClear(MASQ_MARK), Verdict("return")),
                    rule(MarkSet(MASQ_MARK, "^")),
                    rule(Masquerade()),
                ),
            ),
            Chain(nf, REJECT, (rule(L4Proto("tcp"), Reject(tcp_reset=True)), rule(Reject()))),
        ]
    return with_fingerprints(objs)


def _shard_skeleton(
    nf: str, addr: str, dispatch: tuple[str, ...], nodeport: tuple[Statement, ...] | None
) -> list[Obj]:
    """Each shard table's dispatch: its own nat hooks, verdict maps and services chain."""
    objs: list[Obj] = []
    services = [rule(Lookup(dispatch, SERVICE_IPS, vmap=True))]
    if nodeport is not None:
        services.append(rule(*nodeport, Lookup(_L4_PORT, SERVICE_NODEPORTS, vmap=True)))
    for table in shard_tables():
        objs += [
            Set(nf, SERVICE_IPS, f"{addr} . inet_proto . inet_service", kind="map", table=table),
            Set(nf, SERVICE_NODEPORTS, "inet_proto . inet_service", kind="map", table=table),
            Set(nf, SERVICE_ENDPOINTS, f"{addr} . inet_service . mark", table=table),
            Chain(nf, SERVICES, tuple(services), table=table),
            Chain(
                nf,
                "nat-prerouting",
                (rule(_jump(SERVICES)),),
                _hook("nat", "prerouting", SHARD_NAT_PRIORITY),
                table=table,
            ),
            Chain(
                nf,
                "nat-output",
                (rule(_jump(SERVICES)),),
                _hook("nat", "output", SHARD_NAT_PRIORITY),
                table=table,
            ),
        ]
    return objs


def local_match(nf: str, detector: LocalDetector, *, negate: bool = False) -> Statement:
    """The match for traffic from this node's pods (upstream's IfLocalNFT), or for
    anything else with ``negate`` (IfNotLocalNFT). ``detector`` must be implemented."""
    if detector.interface:
        wildcard = "*" if detector.prefix else ""
        return IifName(f"{detector.interface}{wildcard}", negate)
    cidrs = _cidrs(detector.cidrs, 4 if nf == "ip" else 6)
    return Addr(nf, "saddr", tuple(cidrs), negate)


def _hook(kind: str, hook: str, priority: str) -> str:
    return f"type {kind} hook {hook} priority {priority}; policy accept;"


# --- one service port --------------------------------------------------------------------


def _unique(endpoints: Iterable[Endpoint]) -> list[Endpoint]:
    """One endpoint per address and port, in :meth:`Endpoint.sort_key` order. (Keyed by
    the sort key, not the address: hashing an ``ipaddress`` object formats it in hex.)"""
    seen: dict[tuple[int, int, int], Endpoint] = {}
    for ep in endpoints:
        seen.setdefault(ep.sort_key(), ep)
    return [seen[key] for key in sorted(seen)]


@dataclass(frozen=True, slots=True)
class _Target:
    ip: str
    dnat: Dnat
    affinity: str | None  # the endpoint's affinity set


def _pick(nf: str, proto: str, targets: list[_Target]) -> list[Rule]:
    """Rules that DNAT a new connection to one of ``targets``: sticky clients first, then
    endpoint i of n with probability 1/(n - i) (uniform overall). A client that lands on
    itself is masqueraded in postrouting (the ``hairpin`` set), not here.

    (No numgen vmap: that needs an anonymous map per chain and the kernel names
    anonymous sets by a scan of the table — quadratic. No chain per endpoint: chains are
    what a transaction's cache and the kernel's validation cost.)
    """
    rules = []
    l4 = _L4PROTO.get(proto) or L4Proto(proto)
    for t in targets:
        if t.affinity is not None:
            sticky = (AddrIn(nf, "saddr", t.affinity), Update(nf, t.affinity))
            rules.append(rule(l4, *sticky, t.dnat))
    n = len(targets)
    for i, t in enumerate(targets):
        if t.affinity is not None:
            update = Update(nf, t.affinity)
            if i < n - 1:
                rules.append(rule(l4, _numgen(n - i), update, t.dnat))
            else:
                rules.append(rule(l4, update, t.dnat))
        elif i < n - 1:
            rules.append(rule(l4, _numgen(n - i), t.dnat))
        else:
            rules.append(rule(l4, t.dnat))
    return rules


def hairpin_element(family: str, ip: str) -> Element:
    return Element(family, HAIRPIN, f"{ip} . {ip}", "", "")


def shared_object(key: str) -> Element:
    """The (shared) object a key of :data:`SHARED_SETS` stands for."""
    family, _table, kind, rest = split_key(key)
    name, element = rest.split(" ", 1)
    if kind != "element" or name not in SHARED_SETS:
        raise ValueError(f"{key!r} is not a shared element")
    if name == CLUSTER_IPS:
        return Element(family, CLUSTER_IPS, element, "", "")
    return hairpin_element(family, element.split(" . ")[0])


def is_shared(obj: Obj) -> bool:
    """Whether ``obj`` is an element several ports may want (:data:`SHARED_SETS`)."""
    return type(obj) is Element and obj.map in SHARED_SETS


def port_objects(state: ServicePortState, config: BackendConfig) -> dict[str, Obj]:
    """Every object one service port needs, in both families. Empty without a VIP."""
    svc = state.service
    if not svc.has_vip:
        return {}
    objs: list[Obj] = []
    for family in (IPFamily.IPV4, IPFamily.IPV6):
        cluster_ips = svc.ips(family)
        if cluster_ips:
            objs += _family_objects(state, config, family, cluster_ips[0])
    return with_fingerprints(objs)


def _family_objects(
    state: ServicePortState, config: BackendConfig, family: IPFamily, cluster_ip: IPAddress
) -> list[Obj]:
    svc = state.service
    name = svc.name
    nf = family_of(family)
    version = 4 if nf == "ip" else 6
    proto = svc.protocol.lower()
    label = _comment(port_label(name))
    affinity = svc.affinity_timeout if svc.session_affinity is SessionAffinity.CLIENT_IP else None
    internal = _unique(state.internal_for(family))
    external = _unique(state.external_for(family)) if svc.externally_accessible else []
    no_endpoints = f"goto {REJECT}" if not state.has_endpoints else "drop"  # a verdict
    detector = config.local_detector(version)
    objs: list[Obj] = []

    # Endpoints: affinity sets, and the dump's record of which endpoints are programmed.
    names = PortNames(name)
    shard = shard_table(name)
    mark = str(int(port_hash(name), 16))  # decimal, as nft prints it back
    targets: dict[tuple[int, int, int], _Target] = {}
    for ep in internal if not external or external == internal else _unique([*internal, *external]):
        ep_ip = str(ep.ip)
        aset = None
        if affinity is not None:
            aset = names.affinity(ep, ep_ip, affinity)
            objs.append(Set(nf, aset, _addr_type(nf), timeout=affinity, table=shard))
        targets[ep.sort_key()] = _Target(ep_ip, Dnat(nf, ep_ip, ep.port), aset)
        element = f"{ep_ip} . {ep.port} . {mark}"
        objs.append(Element(nf, SERVICE_ENDPOINTS, element, "", label, shard))
        objs.append(hairpin_element(nf, ep_ip))
    objs.append(Element(nf, CLUSTER_IPS, str(cluster_ip), "", ""))
    internal_targets = (
        list(targets.values())
        if len(targets) == len(internal)
        else [targets[ep.sort_key()] for ep in internal]
    )
    if external == internal:
        external_targets = internal_targets
    else:
        external_targets = [targets[ep.sort_key()] for ep in external]

    # ClusterIP.
    vip = f"{cluster_ip} . {proto} . {svc.port}"
    if internal:
        match = (Addr(nf, "daddr", (str(cluster_ip),)), DPort(proto, svc.port))
        rules = []
        if config.masquerade_all:
            rules.append(rule(*match, SET_MASQ))
        elif detector.implemented:  # traffic not from this node's pods
            rules.append(rule(*match, local_match(nf, detector, negate=True), SET_MASQ))
        rules += _pick(nf, proto, internal_targets)
        objs.append(Chain(nf, names.service, tuple(rules), table=shard))
        objs.append(Element(nf, SERVICE_IPS, vip, f"goto {names.service}", label, shard))
    else:
        objs.append(Element(nf, NO_EP_SERVICES, vip, no_endpoints, label))

    if not svc.externally_accessible:
        return objs

    # External traffic: NodePort, external IPs, LoadBalancer IPs.
    addresses = sorted(
        {ip for ip in (*svc.external_ips, *svc.load_balancer_ips) if ip.version == version},
        key=int,
    )
    cluster_policy = svc.external_traffic_policy is TrafficPolicy.CLUSTER
    if external and cluster_policy and external_targets == internal_targets:
        # The common case needs no chain of its own: the frontends are in the
        # masquerade sets and go straight to the service chain.
        to_external = f"goto {names.service}"
        ip_map, port_map = SERVICE_IPS, SERVICE_NODEPORTS
        for ip in addresses:
            objs.append(Element(nf, MASQ_IPS, f"{ip} . {proto} . {svc.port}", "", label))
        if svc.node_port is not None:
            objs.append(Element(nf, MASQ_NODEPORTS, f"{proto} . {svc.node_port}", "", label))
    elif external or (not cluster_policy and internal and state.has_endpoints):
        # Policy Local with no endpoint on this node still has a chain: pods and the
        # node itself are sent on to the cluster-wide endpoints, everyone else dropped.
        rules = []
        if cluster_policy:
            rules.append(rule(SET_MASQ))
        elif internal:
            # Pods and the node itself reaching an external address use the cluster-wide
            # path (no reason to drop them); node-originated traffic is masqueraded.
            if detector.implemented:
                rules.append(rule(local_match(nf, detector), _goto(names.service)))
            rules.append(rule(FibLocal("saddr"), SET_MASQ))
            rules.append(rule(FibLocal("saddr"), _goto(names.service)))
        rules += _pick(nf, proto, external_targets) if external_targets else [rule(DROP)]
        objs.append(Chain(nf, names.external, tuple(rules), table=shard))
        to_external = f"goto {names.external}"
        ip_map, port_map = SERVICE_IPS, SERVICE_NODEPORTS
    else:
        to_external = no_endpoints
        ip_map, port_map = NO_EP_SERVICES, NO_EP_NODEPORTS

    ip_table = shard if ip_map == SERVICE_IPS else TABLE
    port_table = shard if port_map == SERVICE_NODEPORTS else TABLE
    for ip in addresses:
        element = f"{ip} . {proto} . {svc.port}"
        objs.append(Element(nf, ip_map, element, to_external, label, ip_table))
    if svc.node_port is not None:
        element = f"{proto} . {svc.node_port}"
        objs.append(Element(nf, port_map, element, to_external, label, port_table))

    lb_ips = sorted({ip for ip in svc.load_balancer_ips if ip.version == version}, key=int)
    if svc.firewalled(version) and lb_ips:
        ranges = _cidrs(svc.firewall_sources(config.primary_ips()), version)
        allow = rule(Addr(nf, "saddr", tuple(ranges), True), DROP) if ranges else rule(DROP)
        objs.append(Chain(nf, names.firewall, (allow,)))
        for ip in lb_ips:
            element = f"{ip} . {proto} . {svc.port}"
            objs.append(Element(nf, FIREWALL_IPS, element, f"goto {names.firewall}", label))
    return objs


# --- the transaction ---------------------------------------------------------------------


_UNQUOTABLE = re.compile(r"[^A-Za-z0-9 _.:/~=+,-]")


def comment_text(comment: str) -> str:
    """What of a comment reaches the kernel: only characters nft takes inside quotes as
    they are (no quote, backslash, newline, ``;`` or non-ASCII), at most
    ``COMMENT_MAX`` long. The netlink encoder sends exactly this text."""
    return _UNQUOTABLE.sub("_", comment)[:COMMENT_MAX]


def _quote(comment: str) -> str:
    """A comment as an nft string (:func:`comment_text` in quotes)."""
    return '"' + comment_text(comment) + '"'


# Operations: one command of a transaction each, carrying the render objects it is
# about. ``nft()`` is its line in an ``nft -f`` script; kpy_nftables.netlink encodes
# the same operation as netlink messages without reading that text. Never changed once
# made (not frozen only because a frozen dataclass takes four times as long to make,
# and a cold sync makes one per rule).


@dataclass(slots=True)
class _TableOp:
    family: str
    table: str
    verb: ClassVar[str]

    def nft(self) -> str:
        return f"{self.verb} table {self.family} {self.table}"


class AddTable(_TableOp):
    __slots__ = ()
    verb = "add"


class DeleteTable(_TableOp):
    __slots__ = ()
    verb = "delete"


class _Defines:
    """An operation that carries the object it defines (``defined``)."""

    __slots__ = ()

    @property
    def defined(self) -> Chain | Set:
        raise NotImplementedError

    @property
    def family(self) -> str:
        return self.defined.family

    @property
    def table(self) -> str:
        return self.defined.table


@dataclass(slots=True)
class AddChain(_Defines):
    """A chain's definition (its hook, if any), without its rules."""

    chain: Chain

    @property
    def defined(self) -> Chain:
        return self.chain

    def nft(self) -> str:
        c = self.chain
        body = f" {{ {c.hook} }}" if c.hook else ""
        return f"add chain {c.family} {c.table} {c.name}{body}"


@dataclass(slots=True)
class _ChainOp:
    family: str
    table: str
    name: str
    verb: ClassVar[str]

    def nft(self) -> str:
        return f"{self.verb} chain {self.family} {self.table} {self.name}"


class FlushChain(_ChainOp):
    """Every rule of a chain removed."""

    __slots__ = ()
    verb = "flush"


class DeleteChain(_ChainOp):
    __slots__ = ()
    verb = "delete"


@dataclass(slots=True)
class AddRule:
    """One of a chain's rules, appended to it."""

    family: str
    table: str
    chain: str
    rule: Rule

    def nft(self) -> str:
        return f"add rule {self.family} {self.table} {self.chain} {self.rule}"


@dataclass(slots=True)
class AddSet(_Defines):
    """A named set's or verdict map's definition."""

    set: Set

    @property
    def defined(self) -> Set:
        return self.set

    def nft(self) -> str:
        s = self.set
        return f"add {s.kind} {s.family} {s.table} {s.name} {{ {s.spec} }}"


@dataclass(slots=True)
class DeleteSet:
    family: str
    table: str
    kind: str  # "set" or "map"
    name: str

    def nft(self) -> str:
        return f"delete {self.kind} {self.family} {self.table} {self.name}"


@dataclass(slots=True)
class AddElements:
    """Elements added to one set or map (``elements`` all name it)."""

    family: str
    table: str
    map: str
    elements: tuple[Element, ...]

    def nft(self) -> str:
        body = ", ".join(_element_body(e) for e in self.elements)
        return f"add element {self.family} {self.table} {self.map} {{ {body} }}"


@dataclass(slots=True)
class DeleteElements:
    """Elements removed from one set or map, by their key (``Element.element``)."""

    family: str
    table: str
    map: str
    elements: tuple[Element, ...]

    def nft(self) -> str:
        body = ", ".join(e.element for e in self.elements)
        return f"delete element {self.family} {self.table} {self.map} {{ {body} }}"


Op = (
    AddTable
    | DeleteTable
    | AddChain
    | FlushChain
    | DeleteChain
    | AddRule
    | AddSet
    | DeleteSet
    | AddElements
    | DeleteElements
)


def _element_body(e: Element) -> str:
    comment = f" comment {_quote(e.comment)}" if e.comment else ""
    verdict = f" : {e.verdict}" if e.verdict else ""
    return f"{e.element}{comment}{verdict}"


def _rule_ops(chain: Chain) -> Iterator[AddRule]:
    for one in chain.rules:
        yield AddRule(chain.family, chain.table, chain.name, one)


def _removal(family: str, table: str, map_name: str, element: str) -> Element:
    """An element as a removal names it: by its key alone."""
    return Element(family, map_name, element, "", "", table)


@dataclass(frozen=True, slots=True)
class Transaction:
    """The operations of one transaction in their order. The rules are kept as their
    chains and the elements as render's objects; operations are made only when read
    (a cold sync of 10,000 Services has 110,000 rules)."""

    before: tuple[Op, ...]  # tables, definitions, flushes
    rule_chains: tuple[Chain, ...]  # the chains whose rules are (re)added
    del_elements: tuple[Element, ...]  # by key (see _removal)
    add_elements: tuple[Element, ...]
    after: tuple[Op, ...]  # deletions of chains and sets
    ops: int  # objects added, changed or removed
    group: bool = False  # a set's elements in operations of up to GROUP

    def iter_ops(self) -> Iterator[Op]:
        yield from self.before
        for chain in self.rule_chains:
            yield from _rule_ops(chain)
        if self.group:
            yield from _grouped(DeleteElements, self.del_elements)
            yield from _grouped(AddElements, self.add_elements)
        else:
            for e in self.del_elements:
                yield DeleteElements(e.family, e.table, e.map, (e,))
            for e in self.add_elements:
                yield AddElements(e.family, e.table, e.map, (e,))
        yield from self.after

    def iter_lines(self) -> Iterator[str]:
        return (op.nft() for op in self.iter_ops())

    @property
    def lines(self) -> tuple[str, ...]:
        return tuple(self.iter_lines())

    @property
    def line_count(self) -> int:
        rules = sum(len(c.rules) for c in self.rule_chains)
        if self.group:
            dels = _commands(Counter(_set_of(e) for e in self.del_elements))
            adds = _commands(Counter(_set_of(e) for e in self.add_elements))
        else:
            dels, adds = len(self.del_elements), len(self.add_elements)
        return len(self.before) + rules + dels + adds + len(self.after)

    @property
    def script(self) -> str:
        return "\n".join(self.iter_lines()) + "\n" if self.ops else ""


class Fresh:
    """A full sync onto tables that hold no service port yet (a node's first start),
    rendered while it is written: the skeleton's transaction first, then each port's
    sets, chains and rules as ``ports`` yields them, and after every
    :data:`FRESH_CHUNK` ports their elements (grouped; a shared element once). Whoever
    reads the operations renders the ports, so ``nft`` parses the head of the script
    while the rest is still being rendered, and only one chunk's elements are held.
    ``ops`` and ``line_count`` are final once the operations have been read."""

    def __init__(self, skeleton: Transaction, ports: Iterable[Mapping[str, Obj]]) -> None:
        self.skeleton = skeleton
        self.ports = ports
        self.ops = skeleton.ops
        self.line_count = 0

    def iter_ops(self) -> Iterator[Op]:
        for op in self._ops():
            self.line_count += 1
            yield op

    def iter_lines(self) -> Iterator[str]:
        return (op.nft() for op in self.iter_ops())

    def _ops(self) -> Iterator[Op]:
        yield from self.skeleton.iter_ops()
        elements: list[Element] = []
        shared: set[str] = set()  # the shared elements written
        for i, objs in enumerate(self.ports, 1):
            for obj in objs.values():
                if isinstance(obj, Set):
                    self.ops += 1
                    yield AddSet(obj)
            for obj in objs.values():
                if isinstance(obj, Chain):
                    self.ops += 1
                    yield AddChain(obj)
                    yield from _rule_ops(obj)
            for key, obj in objs.items():
                if isinstance(obj, Element):
                    if is_shared(obj):
                        if key in shared:
                            continue
                        shared.add(key)
                    elements.append(obj)
            if i % FRESH_CHUNK == 0:
                self.ops += len(elements)
                yield from _grouped(AddElements, elements)
                elements = []
        self.ops += len(elements)
        yield from _grouped(AddElements, elements)

    @property
    def script(self) -> str:
        text = "\n".join(self.iter_lines())
        return text + "\n" if text else ""

    def halves(self) -> tuple[Iterator[str], Iterator[str]]:
        """The lines split by table — the base table and the first
        :data:`SHARDS_WITH_BASE` shards, the other shards — for two ``nft`` processes at
        once (a table references nothing in another). Both read one rendering; a half
        that is behind buffers its lines."""
        source = self.iter_ops()
        queues: tuple[deque[str], deque[str]] = (deque(), deque())

        def half(i: int) -> Iterator[str]:
            while True:
                while not queues[i]:
                    op = next(source, None)
                    if op is None:
                        return
                    queues[_half_of(op.table)].append(op.nft())
                yield queues[i].popleft()

        return half(0), half(1)


# Shards written by the base table's ``nft`` process on a first start, so the two
# halves are about the same size: the base table holds the hairpin, cluster-IP,
# fingerprint and masquerade elements, ~16% of the script (38% while it also held every
# endpoint's ``service-endpoints`` element); with 56 of the 128 shards beside it, ~53%.
SHARDS_WITH_BASE = SHARDS * 7 // 16


def _half_of(table: str) -> int:
    """0 for the base table or one of the first :data:`SHARDS_WITH_BASE` shards, else 1."""
    if table == TABLE:
        return 0
    return 0 if int(table[len(SHARD_PREFIX) :]) < SHARDS_WITH_BASE else 1


GROUP = 1000  # elements per command when grouped
# Ports whose elements a first start writes together (see :class:`Fresh`): the larger,
# the fewer and larger element commands; the smaller, the fewer elements held at once.
FRESH_CHUNK = 4096


def _grouped(
    kind: type[AddElements] | type[DeleteElements], elements: Iterable[Element]
) -> Iterator[AddElements | DeleteElements]:
    """The elements of each set in operations of up to :data:`GROUP` (order kept per
    set): nft parses one big command much faster than many small ones (a cold sync of
    10,000 Services has 125,000 elements)."""
    by_set: dict[tuple[str, str, str], list[Element]] = {}
    for e in elements:
        by_set.setdefault(_set_of(e), []).append(e)
    for (family, table, name), items in by_set.items():
        for i in range(0, len(items), GROUP):
            yield kind(family, table, name, tuple(items[i : i + GROUP]))


def _commands(per_set: Counter[Any]) -> int:
    """How many commands elements grouped per set take (GROUP to a command)."""
    return sum(-(-n // GROUP) for n in per_set.values())


def _set_of(e: Element) -> tuple[str, str, str]:
    return (e.family, e.table, e.map)


def transaction(
    want: Mapping[str, Obj],
    have: Mapping[str, str],
    keys: Iterable[str],
    *,
    group: bool = False,
) -> Transaction:
    """The operations that make ``have`` equal ``want`` on ``keys``, ordered so every
    reference exists when it is made and nothing referenced is deleted before its users.
    With ``group`` the elements of one set go in operations of many elements (for
    ``nft``; the netlink encoder sends one message per element either way)."""
    add_defs: list[Op] = []  # sets, maps, chains to create
    flushes: list[Op] = []
    rules: list[Chain] = []
    del_elements: list[Element] = []
    add_elements: list[Element] = []
    del_chains: list[Op] = []
    del_sets: list[Op] = []
    ops = 0
    tables: set[tuple[str, str]] = set()
    for key in sorted(set(keys)):
        obj = want.get(key)
        current = have.get(key)
        if obj is not None and current == obj.value:
            continue
        if obj is None and current is None:
            continue
        ops += 1
        family, table, kind, rest = split_key(key)
        tables.add((family, table))
        if obj is None:  # remove
            if kind == "element":
                map_name, element = rest.split(" ", 1)
                del_elements.append(_removal(family, table, map_name, element))
            elif kind == "chain":
                flushes.append(FlushChain(family, table, rest))
                del_chains.append(DeleteChain(family, table, rest))
            else:
                del_sets.append(DeleteSet(family, table, kind, rest))
            continue
        if isinstance(obj, Element):
            if current is not None:
                del_elements.append(_removal(family, table, obj.map, obj.element))
            add_elements.append(obj)
        elif isinstance(obj, Chain):
            add_defs.append(AddChain(obj))
            if current is not None:
                flushes.append(FlushChain(family, table, obj.name))
            rules.append(obj)
        elif current is None:
            add_defs.append(AddSet(obj))
        else:
            # A set or map whose definition differs from what is wanted cannot be
            # redefined while rules use it; its name fixes what matters, so leave it.
            ops -= 1
    if not ops:
        return Transaction((), (), (), (), (), 0)
    # Fingerprints live in the base tables, so a transaction always touches them.
    tables.update((nf, TABLE) for nf in FAMILIES)
    head = [AddTable(nf, table) for nf, table in sorted(tables)]
    return Transaction(
        (*head, *add_defs, *flushes),
        tuple(rules),
        tuple(del_elements),
        tuple(add_elements),
        (*del_chains, *del_sets),
        ops,
        group,
    )
