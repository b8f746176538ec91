"""Trace a packet through the iptables rules this backend renders (pure).

``kpy explain --backend iptables`` takes its verdict, endpoints and masquerade from here,
not from a second computation: the Plan is rendered with :mod:`kpy_iptables.render`,
the restore text a first sync would send is loaded into an in-memory copy of the
``nat`` and ``filter`` tables (``-I`` and ``-A`` as the kernel applies them, so rule
order is the kernel's), and a NEW connection is walked through them hook by hook:

* from a pod or from outside: nat ``PREROUTING``; then filter ``INPUT`` when the
  (possibly DNATed) destination is a node address, else filter ``FORWARD`` and nat
  ``POSTROUTING``;
* from the node itself: nat ``OUTPUT``, filter ``OUTPUT``, nat ``POSTROUTING``.

The interpreter knows exactly the rule syntax render emits and raises
:class:`TraceError` on anything else, so a new kind of rule cannot be skipped silently.
Matches are evaluated as the kernel does for a first packet: ``-m statistic --mode
random`` may go either way (every branch is followed, so every reachable DNAT target is
collected), ``-m recent --rcheck`` does not match (the client is new), ``--set`` does,
``--ctstate`` sees ``NEW``, ``-i`` the interface :func:`kpy.core.trace.input_interface`
gives the packet's origin (none for the node's own), ``--dst-type``/``--src-type
LOCAL`` mean a node address (``config.node_ips`` and the Node's addresses). Built-in
chains' policy is ACCEPT.
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

from kpy.core import diff
from kpy.core.backend import BackendConfig
from kpy.core.model import IPAddress, Plan
from kpy.core.trace import Origin, Packet, Trace, Verdict, first_packet
from kpy_iptables import render
from kpy_iptables.render import FILTER, NAT

__all__ = [
    "BUILTIN_CHAINS",
    "SYNTAX",
    "Flow",
    "Match",
    "Rule",
    "Syntax",
    "Tables",
    "TraceError",
    "load",
    "parse_rule",
    "tables",
    "trace",
]

MAX_DEPTH = 32  # nested jumps; render's deepest path is FW → EXT → SVC → SEP → MARK-MASQ

ACCEPT = "ACCEPT"
DROP = "DROP"
REJECT = "REJECT"
RETURN = "RETURN"


class TraceError(ValueError):
    """The rules hold something this interpreter does not understand."""


# --- rules --------------------------------------------------------------------------------

# module → option → number of arguments (every option render emits, nothing else)
MODULES: dict[str, dict[str, int]] = {
    "comment": {"--comment": 1},
    "tcp": {"--dport": 1},
    "udp": {"--dport": 1},
    "sctp": {"--dport": 1},
    "addrtype": {"--dst-type": 1, "--src-type": 1},
    "conntrack": {"--ctstate": 1},
    "mark": {"--mark": 1},
    "statistic": {"--mode": 1, "--probability": 1},
    "recent": {
        "--rcheck": 0,
        "--set": 0,
        "--seconds": 1,
        "--reap": 0,
        "--name": 1,
        "--mask": 1,
        "--rsource": 0,
    },
}
TARGETS: dict[str, dict[str, int]] = {
    ACCEPT: {},
    DROP: {},
    RETURN: {},
    REJECT: {"--reject-with": 1},
    "MARK": {"--set-xmark": 1},
    "DNAT": {"--to-destination": 1},
    "MASQUERADE": {"--random-fully": 0},
}


@dataclass(frozen=True, slots=True)
class Syntax:
    """The part of the iptables language a backend's rules use; anything else is refused.

    The IPVS backend's companion rules are read with the same parser and a syntax of
    their own (``-m set``, ``-j MARK --or-mark``, no ``-D``).
    """

    modules: Mapping[str, Mapping[str, int]]  # module → option → number of arguments
    targets: Mapping[str, Mapping[str, int]]  # target → option → number of arguments
    addresses: tuple[str, ...] = ("-s", "-d", "-i", "-p")
    user_chains: str = ""  # the prefix a jump to a user chain must have ("": any)
    verbs: frozenset[str] = frozenset({"-A", "-I", "-D", "-X"})
    # option → why its arguments are not modelled (None: they are)
    checks: Mapping[str, Callable[[tuple[str, ...]], str | None]] = field(default_factory=dict)


SYNTAX = Syntax(modules=MODULES, targets=TARGETS)


@dataclass(frozen=True, slots=True)
class Match:
    """One match: ``-s``/``-d``/``-p`` (module ``""``) or one ``-m`` module's options."""

    module: str
    options: tuple[tuple[str, bool, tuple[str, ...]], ...]  # (option, negated, arguments)


@dataclass(frozen=True, slots=True)
class Rule:
    text: str
    matches: tuple[Match, ...]
    target: str
    target_options: dict[str, str] = field(default_factory=dict)


def parse_rule(text: str, syntax: Syntax = SYNTAX) -> Rule:
    """One rule in ``iptables-save`` form (without ``-A CHAIN``)."""
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise TraceError(f"cannot tokenize rule {text!r}: {exc}") from None
    matches: list[Match] = []
    target = ""
    target_options: dict[str, str] = {}
    i = 0

    def take(n: int, what: str) -> tuple[str, ...]:
        nonlocal i
        args = tuple(tokens[i : i + n])
        if len(args) != n:
            raise TraceError(f"{what} needs {n} argument(s) in rule {text!r}")
        i += n
        check = syntax.checks.get(what)
        why = check(args) if check is not None else None
        if why is not None:
            raise TraceError(f"{why} in rule {text!r}")
        return args

    while i < len(tokens):
        negated = tokens[i] == "!"
        if negated:
            i += 1
        if i >= len(tokens):
            raise TraceError(f"dangling '!' in rule {text!r}")
        token = tokens[i]
        i += 1
        if token in syntax.addresses:
            matches.append(Match("", ((token, negated, take(1, token)),)))
        elif token == "-m" and not negated:
            (module,) = take(1, "-m")
            known = syntax.modules.get(module)
            if known is None:
                raise TraceError(f"unknown match module {module!r} in rule {text!r}")
            options: list[tuple[str, bool, tuple[str, ...]]] = []
            while i < len(tokens):
                neg = tokens[i] == "!" and i + 1 < len(tokens) and tokens[i + 1].startswith("--")
                option = tokens[i + 1] if neg else tokens[i]
                if not option.startswith("--"):
                    break
                if option not in known:
                    raise TraceError(f"unknown option {option!r} of -m {module} in {text!r}")
                i += 2 if neg else 1
                options.append((option, neg, take(known[option], option)))
            matches.append(Match(module, tuple(options)))
        elif token == "-j" and not negated:
            (target,) = take(1, "-j")
            if target not in syntax.targets and not target.startswith(syntax.user_chains):
                raise TraceError(f"unknown target {target!r} in rule {text!r}")
            allowed = syntax.targets.get(target, {})  # a user chain takes no options
            while i < len(tokens):
                option = tokens[i]
                if option not in allowed:
                    only = f" ({target} is modelled with {', '.join(allowed)} only)"
                    raise TraceError(
                        f"unknown option {option!r} of target {target}"
                        f"{only if allowed else ''} in {text!r}"
                    )
                i += 1
                args = take(allowed[option], option)
                target_options[option] = args[0] if args else ""
        else:
            raise TraceError(f"unknown rule option {'! ' if negated else ''}{token!r} in {text!r}")
    if not target:
        raise TraceError(f"rule without a target: {text!r}")
    return Rule(text, tuple(matches), target, target_options)


# --- tables -------------------------------------------------------------------------------

Tables = dict[tuple[str, str], list[Rule]]  # (table, chain) → rules in kernel order

BUILTIN_CHAINS = {
    NAT: ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    FILTER: ("INPUT", "FORWARD", "OUTPUT"),
}


def load(text: str, syntax: Syntax = SYNTAX) -> Tables:
    """Apply an ``iptables-restore --noflush`` input to empty tables, as the kernel would."""
    chains: Tables = {(t, c): [] for t, cs in BUILTIN_CHAINS.items() for c in cs}
    table = ""
    for line in text.splitlines():
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            table = line[1:]
            if table not in BUILTIN_CHAINS:
                raise TraceError(f"table {table!r} is not modelled")
            continue
        if line.startswith(":"):
            chains[(table, line[1:].split()[0])] = []  # declare, or flush
            continue
        verb, _, rest = line.partition(" ")
        chain, _, rule = rest.partition(" ")
        if verb not in syntax.verbs:
            raise TraceError(f"unknown restore command {line!r}")
        if (table, chain) not in chains:
            raise TraceError(f"{line!r}: chain {chain} does not exist in table {table}")
        rules = chains[(table, chain)]
        if verb == "-A":
            rules.append(parse_rule(rule, syntax))
        elif verb == "-I":
            position, _, rule = rule.partition(" ")
            if not position.isdigit():
                raise TraceError(f"{line!r}: -I needs a position")
            rules.insert(int(position) - 1, parse_rule(rule, syntax))
        elif verb == "-D":
            texts = [r.text for r in rules]
            if rule not in texts:
                raise TraceError(f"{line!r}: no such rule")
            del rules[texts.index(rule)]
        else:  # -X
            del chains[(table, chain)]
    return chains


def tables(plan: Plan, config: BackendConfig, family: int) -> Tables:
    """The nat and filter tables of one family after a first sync of ``plan``."""
    ctx = render.context(config, plan.node)
    wanted = render.desired(ctx, render.render(plan, ctx))
    inputs = render.restore(diff.compute({}, wanted))
    return load(inputs[family].text if family in inputs else "")


# --- the walk -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Flow:
    """The first packet of a connection, as the rules have changed it so far."""

    src: IPAddress
    dst: IPAddress
    port: int
    protocol: str  # lower case, as -p prints it
    iif: str = ""  # the input interface ("" for the node's own packets)
    mark: int = 0
    dnat: str | None = None  # the --to-destination taken
    masquerade: bool = False
    seen: tuple[str, ...] = ()  # the rules that matched, in order


@dataclass(frozen=True, slots=True)
class _Walker:
    chains: Tables
    family: int
    local: frozenset[IPAddress]

    def _fail(self, rule: Rule, why: str) -> TraceError:
        return TraceError(f"{why} in rule {rule.text!r}")

    def matches(self, rule: Rule, flow: Flow) -> Iterator[tuple[bool, Flow]]:
        """Whether ``rule`` matches ``flow``; both answers for a random statistic match."""
        outcomes = [True]
        for match in rule.matches:
            for option, negated, args in match.options:
                result = self._option(rule, match.module, option, args, flow)
                if result is None:  # either way
                    if negated:
                        raise self._fail(rule, f"negated {option} is not modelled")
                    outcomes = [o for o in outcomes if o] + [False]
                    continue
                if result is negated:
                    yield False, flow
                    return
        for outcome in dict.fromkeys(outcomes):
            yield outcome, flow

    def _option(
        self, rule: Rule, module: str, option: str, args: tuple[str, ...], flow: Flow
    ) -> bool | None:
        arg = args[0] if args else ""
        if module == "":
            if option in ("-s", "-d"):
                net = ipaddress.ip_network(arg, strict=False)
                ip = flow.src if option == "-s" else flow.dst
                return ip.version == net.version and ip in net
            if option == "-i":  # a trailing + matches every name with that prefix
                return flow.iif.startswith(arg[:-1]) if arg.endswith("+") else flow.iif == arg
            return flow.protocol == arg  # -p
        if module == "comment":
            return True
        if module in ("tcp", "udp", "sctp"):
            return flow.protocol == module and flow.port == int(arg)
        if module == "addrtype":
            if arg != "LOCAL":
                raise self._fail(rule, f"address type {arg!r} is not modelled")
            ip = flow.dst if option == "--dst-type" else flow.src
            return ip in self.local or ip.is_loopback
        if module == "conntrack":  # a new connection; DNAT once a rule translated it
            states = arg.split(",")
            return "NEW" in states or (flow.dnat is not None and "DNAT" in states)
        if module == "mark":
            value, _, mask = arg.partition("/")
            return flow.mark & int(mask or "0xffffffff", 0) == int(value, 0)
        if module == "statistic":
            if option == "--mode":
                if arg != "random":
                    raise self._fail(rule, f"statistic mode {arg!r} is not modelled")
                return True
            p = float(arg)
            return True if p >= 1 else (False if p <= 0 else None)
        if module == "recent":
            # --rcheck: a new client is in no list yet; --set (adds it) and the
            # qualifiers always match
            return option != "--rcheck"
        raise self._fail(rule, f"match module {module!r} is not modelled")

    def run(self, table: str, chain: str, flow: Flow, depth: int = 0) -> list[tuple[Flow, str]]:
        """Every way ``flow`` leaves ``chain``: (flow, verdict), ``RETURN`` for falling off."""
        if depth > MAX_DEPTH:
            raise TraceError(f"jumps nested deeper than {MAX_DEPTH} at {table} {chain}")
        if (table, chain) not in self.chains:
            raise TraceError(f"jump to missing chain {chain} in table {table}")
        tool = "iptables" if self.family == 4 else "ip6tables"
        active = [flow]
        done: list[tuple[Flow, str]] = []
        for rule in self.chains[(table, chain)]:
            following: list[Flow] = []
            for current in active:
                for matched, f in self.matches(rule, current):
                    if not matched:
                        following.append(f)
                        continue
                    f = replace(f, seen=(*f.seen, f"{tool} -t {table} -A {chain} {rule.text}"))
                    self._target(table, rule, f, depth, following, done)
            active = following
            if not active:
                break
        done.extend((f, RETURN) for f in active)
        return done

    def _target(
        self,
        table: str,
        rule: Rule,
        flow: Flow,
        depth: int,
        following: list[Flow],
        done: list[tuple[Flow, str]],
    ) -> None:
        target, opts = rule.target, rule.target_options
        if target in (ACCEPT, DROP, REJECT, RETURN):
            done.append((flow, target))
        elif target == "MARK":
            value, _, mask = opts["--set-xmark"].partition("/")
            m = int(mask or "0xffffffff", 0)
            following.append(replace(flow, mark=(flow.mark & ~m) ^ int(value, 0)))
        elif target == "DNAT":
            if table != NAT:
                raise self._fail(rule, "DNAT outside the nat table")
            to = opts["--to-destination"]
            host, _, port = to.rpartition(":")
            dst = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
            done.append((replace(flow, dst=dst, port=int(port), dnat=to), ACCEPT))
        elif target == "MASQUERADE":
            done.append((replace(flow, masquerade=True), ACCEPT))
        elif target in TARGETS:
            raise self._fail(rule, f"target {target} is not modelled")
        else:
            for f, verdict in self.run(table, target, flow, depth + 1):
                if verdict == RETURN:
                    following.append(f)
                else:
                    done.append((f, verdict))

    def hook(self, table: str, chain: str, flows: Iterable[Flow]) -> list[tuple[Flow, str]]:
        """A built-in chain: falling off means its policy, ACCEPT."""
        out: list[tuple[Flow, str]] = []
        for flow in flows:
            out += [(f, ACCEPT if v == RETURN else v) for f, v in self.run(table, chain, flow)]
        return out


def _walk(walker: _Walker, flow: Flow, origin: Origin) -> list[tuple[Flow, str]]:
    """Every fate of ``flow``: (final flow, ACCEPT/DROP/REJECT)."""
    ended: list[tuple[Flow, str]] = []

    def through(table: str, chain: str, flows: list[Flow]) -> list[Flow]:
        passed = []
        for f, verdict in walker.hook(table, chain, flows):
            if verdict == ACCEPT:
                passed.append(f)
            else:
                ended.append((f, verdict))
        return passed

    if origin is Origin.NODE:
        flows = through(NAT, "OUTPUT", [flow])
        flows = through(FILTER, "OUTPUT", flows)
        flows = through(NAT, "POSTROUTING", flows)
    else:
        flows = through(NAT, "PREROUTING", [flow])
        delivered = [f for f in flows if f.dst in walker.local]
        forwarded = [f for f in flows if f.dst not in walker.local]
        flows = through(FILTER, "INPUT", delivered)
        forwarded = through(FILTER, "FORWARD", forwarded)
        flows += through(NAT, "POSTROUTING", forwarded)
    return ended + [(f, ACCEPT) for f in flows]


def _sort_key(target: str) -> tuple[int, int, int]:
    host, _, port = target.rpartition(":")
    ip = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    return (ip.version, int(ip), int(port))


def trace(plan: Plan, packet: Packet, origin: Origin, config: BackendConfig) -> Trace:
    """What the rendered iptables rules do with the first packet of ``packet``'s flow."""
    family = packet.dst.version
    local = frozenset(ip for ip in (*config.node_ips, *plan.node.addresses) if ip.version == family)
    walker = _Walker(tables(plan, config, family), family, local)
    start = Flow(**first_packet(packet, origin, config))
    fates = _walk(walker, start, origin)
    verdicts: dict[Verdict, list[Flow]] = {}
    for f, verdict in fates:
        if verdict == DROP:
            kind = Verdict.DROP
        elif verdict == REJECT:
            kind = Verdict.REJECT
        else:
            kind = Verdict.FORWARD if f.dnat is not None else Verdict.ACCEPT
        verdicts.setdefault(kind, []).append(f)
    # One verdict in practice; if the rules could end a connection differently depending
    # on a random branch, a forward wins (its endpoints are what matter) and the rest
    # is reported in the kernel objects.
    order = (Verdict.FORWARD, Verdict.DROP, Verdict.REJECT, Verdict.ACCEPT)
    verdict = next(v for v in order if v in verdicts)
    chosen = verdicts[verdict]
    kernel = list(dict.fromkeys(entry for f, _ in fates for entry in f.seen))
    for other, flows in verdicts.items():
        if other is not verdict:
            kernel.append(f"note: {len(flows)} of {len(fates)} paths end in {other}")
    endpoints = sorted({f.dnat for f in chosen if f.dnat is not None}, key=_sort_key)
    return Trace(
        verdict=verdict,
        endpoints=tuple(endpoints),
        masquerade=any(f.masquerade for f in chosen),
        kernel=tuple(kernel),
    )
