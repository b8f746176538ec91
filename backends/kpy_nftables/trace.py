"""Trace a packet through the nftables objects :mod:`kpy_nftables.render` produces.

Pure: Plan in, :class:`kpy.core.trace.Trace` out. :func:`trace` renders every service
port exactly as the backend does (the skeleton from :func:`render.base_objects`, then
:func:`render.port_objects` per port in name order, the first port keeping a contested
map element) and runs a NEW connection's first packet through those objects hook by
hook, in the kernel's order:

* from a pod or from outside: ``filter-prerouting`` (priority -110, before DNAT),
  ``nat-prerouting`` (dstnat), then ``filter-input`` when the (possibly translated)
  destination is a node address, else ``filter-forward`` and ``nat-postrouting``;
* from the node itself: ``filter-output`` (-110, before DNAT), ``nat-output`` (-100),
  ``filter-output-post-dnat`` (0), ``nat-postrouting``, then ``filter-input`` when the
  destination is a node address.

The rules are interpreted from their text by a small interpreter for exactly the
grammar render emits (selectors, concatenations, set and verdict-map lookups, ``jump``,
``goto``, ``return``, mark arithmetic, ``numgen``, ``dnat``, ``masquerade``,
``reject``, ``drop``); anything else raises :class:`TraceError`, so a render change the
tracer does not understand — or a reference to a chain or set that was never rendered —
is an error, never silently skipped.

What the interpreter assumes about the world: the connection is new (``ct state new``);
the client is not yet in any affinity set (a fresh client: affinity sets have no
elements); ``numgen random mod N == 0`` may be true or false, and the trace follows
both, so ``endpoints`` is every DNAT target some draw reaches; ``fib … type local`` is
true for the node's addresses (``config.node_ips`` and the Node's addresses) and
loopback; ``iifname`` is the interface :func:`kpy.core.trace.input_interface` gives the
packet's origin (a pod's on the pod bridge or prefixed interface, none for the node's
own). ``masquerade`` is true when some path reaches the ``masquerade`` statement;
``kernel`` lists the objects traversed, by their render keys (``ip chain services``,
``ip element service-ips 10.96.0.10 . tcp . 80``), plus ``mark 0x00004000``,
``dnat <target>``, ``masquerade``, ``drop`` and ``reject`` where those happen.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from kpy.core.backend import BackendConfig
from kpy.core.model import IPAddress, Plan
from kpy.core.trace import Origin, Packet, Trace, Verdict, input_interface
from kpy_nftables import render

__all__ = ["TraceError", "objects", "trace", "trace_objects"]


class TraceError(ValueError):
    """The rendered objects contain something the tracer cannot interpret."""


def objects(plan: Plan, config: BackendConfig) -> dict[str, render.Obj]:
    """Every object the backend renders for ``plan``, keyed as the backend keys them."""
    config = config.for_plan(plan)
    objs: dict[str, render.Obj] = dict(render.base_objects(config))
    claimed: set[str] = set()
    for name in sorted(plan.services):
        for key, obj in render.port_objects(plan.services[name], config).items():
            if isinstance(obj, render.Element):
                if obj.claim in claimed:
                    continue  # the first port in name order keeps a contested element
                claimed.add(obj.claim)
            objs[key] = obj
    return objs


def trace(plan: Plan, packet: Packet, origin: Origin, config: BackendConfig) -> Trace:
    """What the nftables backend's rendered objects do with ``packet``'s first packet."""
    local = frozenset((*config.node_ips, *plan.node.addresses))
    iif = input_interface(origin, config)
    return trace_objects(objects(plan, config), packet, origin, local, iif=iif)


def trace_objects(
    objs: Mapping[str, render.Obj],
    packet: Packet,
    origin: Origin,
    node_addresses: Iterable[IPAddress],
    *,
    iif: str | None = None,
) -> Trace:
    """``packet`` through ``objs`` (as :func:`objects` returns them) on a node with
    ``node_addresses`` (loopback is always local), arriving on the interface ``iif``
    (default: as :func:`kpy.core.trace.input_interface` has it for ``origin``)."""
    if iif is None:
        iif = input_interface(origin, BackendConfig())
    return _Tracer(objs, frozenset(node_addresses)).run(packet, origin, iif)


# --- the interpreter ---------------------------------------------------------------------

NEXT = "next"  # the rule did not end the chain: go on with the next rule
CONTINUE = "continue"  # the chain ended (fell off its end or returned)
ACCEPT = "accept"
DROP = "drop"
REJECT = "reject"

_PROTOCOLS = ("tcp", "udp", "sctp")


@dataclass(frozen=True, slots=True)
class _Packet:
    saddr: IPAddress
    daddr: IPAddress
    proto: str
    dport: int
    iif: str = ""  # the input interface ("" for the node's own packets)
    mark: int = 0
    dnat: str | None = None
    masquerade: bool = False
    trail: tuple[str, ...] = ()  # what this path traversed in the current hook

    def visit(self, item: str) -> _Packet:
        return replace(self, trail=(*self.trail, item))


Path = tuple[_Packet, str]


_PRIORITIES = {"dstnat": -100, "filter": 0, "srcnat": 100}


def _priority(chain: render.Chain) -> int:
    """A base chain's hook priority, from ``… priority <name or number>; …``."""
    words = (chain.hook or "").replace(";", " ").split()
    if "priority" not in words or words.index("priority") + 1 >= len(words):
        raise TraceError(f"{chain.key}: no priority in {chain.hook!r}")
    value = words[words.index("priority") + 1]
    if value in _PRIORITIES:
        return _PRIORITIES[value]
    try:
        return int(value)
    except ValueError:
        raise TraceError(f"{chain.key}: unknown priority {value!r}") from None


class _Tracer:
    def __init__(self, objs: Mapping[str, render.Obj], local: frozenset[IPAddress]) -> None:
        # Keyed by (family, table, name): jumps, gotos and set references stay in the
        # table of the rule that makes them.
        self.chains: dict[tuple[str, str, str], render.Chain] = {}
        self.sets: dict[tuple[str, str, str], render.Set] = {}
        self.elements: dict[tuple[str, str, str], dict[str, render.Element]] = {}
        for obj in objs.values():
            if isinstance(obj, render.Chain):
                self.chains[(obj.family, obj.table, obj.name)] = obj
            elif isinstance(obj, render.Set):
                self.sets[(obj.family, obj.table, obj.name)] = obj
            else:
                where = (obj.family, obj.table, obj.map)
                self.elements.setdefault(where, {})[obj.element] = obj
        self.local = local
        self.nf = "ip"

    def is_local(self, ip: IPAddress) -> bool:
        return ip in self.local or ip.is_loopback

    # --- hooks ---------------------------------------------------------------------------

    def run(self, packet: Packet, origin: Origin, iif: str = "") -> Trace:
        if packet.src.version != packet.dst.version:
            raise TraceError(f"{packet.src} -> {packet.dst}: addresses of two IP families")
        self.nf = "ip" if packet.dst.version == 4 else "ip6"
        start = _Packet(
            saddr=packet.src,
            daddr=packet.dst,
            proto=str(packet.protocol).lower(),
            dport=packet.port,
            iif="" if origin is Origin.NODE else iif,
        )
        kernel: list[str] = []
        done: list[Path] = []  # paths that ended in drop or reject
        alive = [start]
        if origin is Origin.NODE:
            stages: tuple[str, ...] = (
                "filter-output",
                "nat-output",
                render.FILTER_OUTPUT_POST_DNAT,
                "nat-postrouting",
                "in",
            )
        else:
            stages = ("filter-prerouting", "nat-prerouting", "route")
        for stage in stages:
            paths: list[_Packet] = []
            for pkt in alive:
                hooks = [stage]
                if stage == "route":  # after DNAT: delivered here, or forwarded
                    local = self.is_local(pkt.daddr)
                    hooks = ["filter-input"] if local else ["filter-forward", "nat-postrouting"]
                elif stage == "in":  # the node's own packet to one of its addresses
                    hooks = ["filter-input"] if self.is_local(pkt.daddr) else []
                paths += self.hooks(hooks, pkt, kernel, done)
            alive = paths
        return _result(kernel, alive, done)

    def hooks(
        self, names: list[str], pkt: _Packet, kernel: list[str], done: list[Path]
    ) -> list[_Packet]:
        """Run ``pkt`` through the hooks ``names`` one after another; the paths that
        come out accepted (those dropped or rejected go to ``done``)."""
        paths = [pkt]
        for name in names:
            accepted = []
            for path in paths:
                for res, verdict in self.hook(name, path):
                    _merge(kernel, res.trail)
                    res = replace(res, trail=())
                    if verdict in (DROP, REJECT):
                        done.append((res, verdict))
                    else:
                        accepted.append(res)
            paths = accepted
        return paths

    def hook(self, name: str, pkt: _Packet) -> list[Path]:
        """``pkt`` through every table's base chain called ``name``, in priority order
        (the base table, then its shards). An accept goes on to the next chain; in the
        destination-NAT hooks a connection that has been DNATed skips the remaining nat
        chains, as the kernel does once a NAT binding is set up."""
        chains = sorted(
            (c for (nf, _, n), c in self.chains.items() if nf == self.nf and n == name),
            key=lambda c: (_priority(c), c.table != render.TABLE, c.table),
        )
        if not chains:
            raise TraceError(f"no base chain {self.nf} {name} was rendered")
        out: list[Path] = []
        paths = [pkt]
        for chain in chains:
            if chain.hook is None:
                raise TraceError(f"{chain.key} is not a base chain")
            accepted: list[_Packet] = []
            for path in paths:
                if name in ("nat-prerouting", "nat-output") and path.dnat is not None:
                    accepted.append(path)
                    continue
                results = self.chain(chain.table, name, path)
                if chain.table != render.TABLE and _untouched(results, path):
                    accepted.append(path)  # a shard without this frontend: not shown
                    continue
                for res, verdict in results:
                    # A base chain's end is its policy; render's hooks all say accept.
                    if verdict == CONTINUE:
                        if "policy accept;" not in chain.hook:
                            raise TraceError(f"{chain.key}: unknown policy in {chain.hook!r}")
                        verdict = ACCEPT
                    if verdict == ACCEPT:
                        accepted.append(res)
                    else:
                        out.append((res, verdict))
            paths = accepted
        return out + [(p, ACCEPT) for p in paths]

    # --- chains and rules --------------------------------------------------------------

    def chain(self, table: str, name: str, pkt: _Packet) -> list[Path]:
        chain = self.chains.get((self.nf, table, name))
        if chain is None:
            raise TraceError(
                f"jump or goto to {self.nf} {table} chain {name}, which was not rendered"
            )
        return self.rules(chain, 0, pkt.visit(chain.key))

    def rules(self, chain: render.Chain, index: int, pkt: _Packet) -> list[Path]:
        if index == len(chain.rules):
            return [(pkt, CONTINUE)]
        out: list[Path] = []
        for res, verdict in _Rule(self, chain, chain.rules[index]).run(pkt):
            if verdict == NEXT:
                out += self.rules(chain, index + 1, res)
            else:
                out.append((res, verdict))
        return out

    def lookup(self, table: str, name: str, key: str, *, vmap: bool) -> render.Element | None:
        definition = self.sets.get((self.nf, table, name))
        if definition is None:
            raise TraceError(
                f"@{name}: no {self.nf} set or map of that name was rendered in {table}"
            )
        if (definition.kind == "map") is not vmap:
            raise TraceError(
                f"@{name} is a {definition.kind}, used as a {'map' if vmap else 'set'}"
            )
        found = self.elements.get((self.nf, table, name), {}).get(key)
        if found is not None and bool(found.verdict) is not vmap:
            raise TraceError(
                f"{found.key}: a {definition.kind} element with verdict {found.verdict!r}"
            )
        return found


def _untouched(results: list[Path], pkt: _Packet) -> bool:
    """The chain let ``pkt`` through unchanged, having matched nothing."""
    if len(results) != 1 or results[0][1] != CONTINUE:
        return False
    res = results[0][0]
    return replace(res, trail=pkt.trail) == pkt and not any(
        " element " in item for item in res.trail[len(pkt.trail) :]
    )


def _merge(kernel: list[str], trail: Iterable[str]) -> None:
    seen = set(kernel)
    for item in trail:
        if item not in seen:
            kernel.append(item)
            seen.add(item)


def _endpoint_key(target: str) -> tuple[int, int, int]:
    host, _, port = target.rpartition(":")
    ip = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    return (ip.version, int(ip), int(port))


def _result(kernel: list[str], alive: list[_Packet], done: list[Path]) -> Trace:
    forwarded = [p for p in alive if p.dnat is not None]
    if forwarded:
        verdict = Verdict.FORWARD
    elif any(v == REJECT for _, v in done):
        verdict = Verdict.REJECT
    elif done:
        verdict = Verdict.DROP
    else:
        verdict = Verdict.ACCEPT
    targets = {p.dnat for p in forwarded if p.dnat is not None}
    return Trace(
        verdict=verdict,
        endpoints=tuple(sorted(targets, key=_endpoint_key)),
        masquerade=any(p.masquerade for p in forwarded),
        kernel=tuple(kernel),
    )


class _Rule:
    """One rule's tokens, evaluated left to right against one packet (which may fork at
    a ``numgen`` draw)."""

    def __init__(self, tracer: _Tracer, chain: render.Chain, text: str) -> None:
        self.t = tracer
        self.nf = tracer.nf
        self.chain = chain
        self.text = text
        self.tokens = text.split()

    def error(self, what: str) -> TraceError:
        return TraceError(f"{self.chain.key}: {what} in rule {self.text!r}")

    def run(self, pkt: _Packet) -> list[Path]:
        return self.step(0, pkt)

    # Each step consumes one match or statement starting at token ``i``.
    def step(self, i: int, pkt: _Packet) -> list[Path]:
        tok = self.tokens
        if i == len(tok):
            return [(pkt, NEXT)]
        word = tok[i]
        if word in ("jump", "goto"):
            if i + 2 != len(tok):
                raise self.error(f"{word} must end the rule")
            results = self.t.chain(self.chain.table, tok[i + 1], pkt)
            if word == "jump":
                return [(r, NEXT if v == CONTINUE else v) for r, v in results]
            return results  # a goto's chain ending returns past this chain
        if word == "return":
            self.last(i)
            return [(pkt, CONTINUE)]
        if word == "drop":
            self.last(i)
            return [(pkt.visit("drop"), DROP)]
        if word == "accept":
            self.last(i)
            return [(pkt, ACCEPT)]
        if word == "reject":
            rest = tok[i + 1 :]
            if rest not in ([], ["with", "tcp", "reset"]):
                raise self.error("unknown reject form")
            return [(pkt.visit("reject"), REJECT)]
        if word == "dnat":
            if tok[i + 1 : i + 2] != ["to"] or i + 3 != len(tok):
                raise self.error("dnat must be 'dnat to <target>' at the end")
            return [self.dnat(pkt, tok[i + 2])]
        if word == "masquerade":
            if tok[i + 1 :] not in ([], ["fully-random"]):
                raise self.error("unknown masquerade form")
            return [(replace(pkt, masquerade=True).visit("masquerade"), ACCEPT)]
        if word == "update":
            return self.update(i, pkt)
        if word == "numgen":
            return self.numgen(i, pkt)
        if word == "ct":
            if tok[i + 1 : i + 3] != ["state", "new"]:
                raise self.error("unknown ct match")
            return self.step(i + 3, pkt)  # the first packet of a connection is new
        if word == "meta" and tok[i + 1 : i + 3] == ["mark", "set"]:
            return self.mark_set(i, pkt)
        return self.match(i, pkt)

    def last(self, i: int) -> None:
        if i + 1 != len(self.tokens):
            raise self.error(f"{self.tokens[i]} must end the rule")

    def dnat(self, pkt: _Packet, target: str) -> Path:
        if pkt.dnat is not None:
            raise self.error("second DNAT of one packet")
        host, sep, port = target.rpartition(":")
        if not sep or not port.isdigit():
            raise self.error(f"DNAT target {target!r}")
        try:
            ip = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
        except ValueError:
            raise self.error(f"DNAT target {target!r}") from None
        if ip.version != pkt.daddr.version or (ip.version == 6) != host.startswith("["):
            raise self.error(f"DNAT target {target!r} of the wrong family")
        moved = replace(pkt, daddr=ip, dport=int(port), dnat=target)
        return (moved.visit(f"dnat {target}"), ACCEPT)  # NAT statements are terminal

    def update(self, i: int, pkt: _Packet) -> list[Path]:
        tok = self.tokens
        name = tok[i + 1] if i + 1 < len(tok) else ""
        body = tok[i + 2 : i + 6]
        if not name.startswith("@") or body != ["{", self.nf, "saddr", "}"]:
            raise self.error("unknown update form")
        definition = self.t.sets.get((self.nf, self.chain.table, name[1:]))
        if definition is None or definition.timeout is None:
            raise self.error(f"update of {name}, which is not a rendered dynamic set")
        # Adding the client to its affinity set matters only to the next connection.
        return self.step(i + 6, pkt)

    def numgen(self, i: int, pkt: _Packet) -> list[Path]:
        tok = self.tokens
        if tok[i + 1 : i + 3] != ["random", "mod"] or tok[i + 4 : i + 6] != ["==", "0"]:
            raise self.error("unknown numgen form")
        if not tok[i + 3].isdigit() or int(tok[i + 3]) < 1:
            raise self.error(f"numgen modulus {tok[i + 3]!r}")
        if int(tok[i + 3]) == 1:
            return self.step(i + 6, pkt)
        # Either draw can happen: follow the rule (drawn) and the next rule (not drawn).
        return [*self.step(i + 6, pkt), (pkt, NEXT)]

    def mark_set(self, i: int, pkt: _Packet) -> list[Path]:
        tok = self.tokens
        if tok[i + 3 : i + 5] != ["meta", "mark"] or tok[i + 5] not in ("|", "^"):
            raise self.error("unknown meta mark set form")
        value = self.hex(tok[i + 6])
        mark = pkt.mark | value if tok[i + 5] == "|" else pkt.mark ^ value
        moved = replace(pkt, mark=mark)
        if tok[i + 5] == "|":
            moved = moved.visit(f"mark {tok[i + 6]}")
        return self.step(i + 7, moved)

    def hex(self, text: str) -> int:
        if not text.startswith("0x"):
            raise self.error(f"mark value {text!r}")
        try:
            return int(text, 16)
        except ValueError:
            raise self.error(f"mark value {text!r}") from None

    # --- matches -----------------------------------------------------------------------

    def selector(self, i: int, pkt: _Packet) -> tuple[str, str, int]:
        """The selector at ``i``: (kind, the packet's value as render writes it, next)."""
        tok = self.tokens
        pair = tok[i : i + 2]
        if pair in ([self.nf, "daddr"], [self.nf, "saddr"]):
            return ("addr", str(pkt.daddr if pair[1] == "daddr" else pkt.saddr), i + 2)
        if tok[i] == "iifname":
            return ("ifname", pkt.iif, i + 1)
        if pair == ["meta", "l4proto"]:
            return ("proto", pkt.proto, i + 2)
        if pair == ["th", "dport"]:
            return ("port", str(pkt.dport), i + 2)
        if pair == ["meta", "mark"]:
            return ("mark", str(pkt.mark), i + 2)
        if len(pair) == 2 and pair[0] in _PROTOCOLS and pair[1] == "dport":
            # "tcp dport 80" matches TCP packets to port 80 only.
            port = str(pkt.dport) if pkt.proto == pair[0] else ""
            return ("port", port, i + 2)
        if pair in (["fib", "daddr"], ["fib", "saddr"]) and tok[i + 2 : i + 3] == ["type"]:
            ip = pkt.daddr if pair[1] == "daddr" else pkt.saddr
            return ("fib", "local" if self.t.is_local(ip) else "unicast", i + 3)
        raise self.error(f"unknown selector at {' '.join(tok[i : i + 3])!r}")

    def match(self, i: int, pkt: _Packet) -> list[Path]:
        tok = self.tokens
        kinds: list[str] = []
        values: list[str] = []
        while True:
            kind, value, i = self.selector(i, pkt)
            kinds.append(kind)
            values.append(value)
            if tok[i : i + 1] != ["."]:
                break
            i += 1
        if i >= len(tok):
            raise self.error("a selector without a value")
        op = tok[i]
        if op == "vmap":
            return self.vmap(tok, i, kinds, values, pkt)
        if op.startswith("@"):
            found = self.t.lookup(self.chain.table, op[1:], " . ".join(values), vmap=False)
            if found is None:
                return [(pkt, NEXT)]
            return self.step(i + 1, pkt.visit(found.key))
        if len(kinds) != 1:
            raise self.error("a concatenation compared with a literal")
        kind, value = kinds[0], values[0]
        if kind == "mark" and op == "&":
            mask = self.hex(tok[i + 1])
            if tok[i + 2 : i + 3] != ["=="]:
                raise self.error("unknown mark match")
            ok = (int(value) & mask) == self.hex(tok[i + 3])
            return self.step(i + 4, pkt) if ok else [(pkt, NEXT)]
        negate = op == "!="
        if op in ("!=", "=="):
            i += 1
        literals, i = self.literals(i)
        hit = any(self.equal(kind, value, lit) for lit in literals)
        if hit is negate:
            return [(pkt, NEXT)]
        return self.step(i, pkt)

    def vmap(
        self, tok: list[str], i: int, kinds: list[str], values: list[str], pkt: _Packet
    ) -> list[Path]:
        name = tok[i + 1] if i + 1 < len(tok) else ""
        if not name.startswith("@") or i + 2 != len(tok):
            raise self.error("vmap must be 'vmap @map' at the end")
        if "" in values:
            return [(pkt, NEXT)]
        found = self.t.lookup(self.chain.table, name[1:], " . ".join(values), vmap=True)
        if found is None:
            return [(pkt, NEXT)]
        verdict = found.verdict.split()
        pkt = pkt.visit(found.key)
        if verdict in (["drop"], ["accept"]):
            if verdict == ["drop"]:
                return [(pkt.visit("drop"), DROP)]
            return [(pkt, ACCEPT)]
        if len(verdict) == 2 and verdict[0] in ("goto", "jump"):
            results = self.t.chain(self.chain.table, verdict[1], pkt)
            if verdict[0] == "jump":
                return [(r, NEXT if v == CONTINUE else v) for r, v in results]
            return results
        raise self.error(f"{found.key}: unknown verdict {found.verdict!r}")

    def literals(self, i: int) -> tuple[list[str], int]:
        tok = self.tokens
        if i >= len(tok):
            raise self.error("a match without a value")
        if tok[i] != "{":
            return [tok[i]], i + 1
        try:
            end = tok.index("}", i)
        except ValueError:
            raise self.error("an unclosed set literal") from None
        items = [t.rstrip(",") for t in tok[i + 1 : end]]
        if not items or any(not t for t in items):
            raise self.error("a malformed set literal")
        return items, end + 1

    def equal(self, kind: str, value: str, literal: str) -> bool:
        if kind == "addr":
            try:
                net = ipaddress.ip_network(literal, strict=False)
            except ValueError:
                raise self.error(f"address {literal!r}") from None
            ip = ipaddress.ip_address(value)
            if net.version != ip.version:
                raise self.error(f"{literal} compared with an address of the other family")
            return ip in net
        if kind == "proto":
            if literal not in _PROTOCOLS:
                raise self.error(f"protocol {literal!r}")
            return value == literal
        if kind == "port":
            if not literal.isdigit():
                raise self.error(f"port {literal!r}")
            return value == literal
        if kind == "ifname":
            if len(literal) < 3 or literal[0] != '"' or literal[-1] != '"':
                raise self.error(f"interface name {literal!r} (quoted)")
            name = literal[1:-1]
            if name.endswith("*"):  # a wildcard: every name with that prefix
                return value.startswith(name[:-1])
            return value == name
        if kind == "fib":
            if literal not in ("local", "unicast"):
                raise self.error(f"address type {literal!r}")
            return value == literal
        raise self.error(f"{kind} compared with {literal!r}")
