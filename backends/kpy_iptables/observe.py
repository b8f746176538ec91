"""``iptables-save`` text → the keyed objects render produces, and the ``kpy dump`` view.

Parsing is pure (the text comes from :mod:`kpy_iptables.apply`). Only this backend's
objects are read: ``KPY-`` chains (not another backend's ``KPY-IPVS-`` ones) and the
rules of built-in chains that jump to them. Rules of ``KPY-SERVICES`` and
``KPY-NODEPORTS`` become one object each, exactly as render keys them, so a diff
between the two is empty when the kernel holds what is wanted.

The per-Service view is found from the kernel alone: each dispatch rule names its
service port in a comment; from there the jumps are followed down to the ``KPY-SEP-``
chains, whose DNAT targets are the endpoints, with the statistic probabilities turned
into each endpoint's share and the packet counters of the DNAT rules.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from kpy.core.backend import Programmed, ServiceView
from kpy_iptables.netlink import NlRule, Summary
from kpy_iptables.render import (
    BUILTIN,
    DISPATCH,
    FILTER,
    NAT,
    NODEPORTS,
    SERVICES,
    Key,
    Objects,
    Rules,
    owned,
)

_COUNTERS = re.compile(r"^\[(\d+):(\d+)\] ")
_TARGET = re.compile(r"(?:^| )-j (\S+)")
_COMMENT = re.compile(r'--comment "([^"]*)"')
_DEST = re.compile(r"(?:^| )-d (\S+?)/\d+ ")
_PROTO = re.compile(r"(?:^| )-p (\w+) ")
_DPORT = re.compile(r"--dport (\d+)")
_PROBABILITY = re.compile(r"--probability (\S+)")
_DNAT = re.compile(r"--to-destination (\S+)")
_WALK = ("KPY-SVC-", "KPY-SVL-", "KPY-EXT-", "KPY-FW-", "KPY-SEP-")


@dataclass(slots=True)
class Saved:
    """One family's kpy objects as read back (``iptables-save -c`` or netlink), parsed."""

    family: int
    objects: Objects = field(default_factory=dict)
    # (table, chain) → [(rule, packets)], for every owned chain (dispatch ones included)
    rules: dict[tuple[str, str], list[tuple[str, int]]] = field(default_factory=dict)
    # (table, built-in chain, owned chain it jumps to)
    jumps: set[tuple[str, str, str]] = field(default_factory=set)


def parse(text: str, family: int) -> Saved:
    """This backend's objects in ``iptables-save`` (with or without ``-c``) output."""
    saved = Saved(family)
    chains: dict[tuple[str, str], list[str]] = {}
    table = ""
    for raw in text.splitlines():
        if not raw or raw[0] == "#":
            continue
        if raw[0] == "*":
            table = raw[1:].strip()
            continue
        if table not in (NAT, FILTER):
            continue
        if raw[0] == ":":
            chain = raw[1:].split(" ", 1)[0]
            if owned(chain):
                chains[(table, chain)] = []
                saved.rules[(table, chain)] = []
            continue
        line, packets = raw, 0
        if raw[0] == "[":
            m = _COUNTERS.match(raw)
            if m is None:
                continue
            packets = int(m.group(1))
            line = raw[m.end() :]
        if not line.startswith("-A "):
            continue
        chain, _, rule = line[3:].partition(" ")
        if chain in BUILTIN:
            target = _TARGET.search(rule)
            if target is not None and owned(target.group(1)):
                saved.objects[Key(family, table, chain, rule)] = ()
                saved.jumps.add((table, chain, target.group(1)))
            continue
        if (table, chain) not in chains:
            continue
        chains[(table, chain)].append(rule)
        saved.rules[(table, chain)].append((rule, packets))
        if chain in DISPATCH:
            saved.objects[Key(family, table, chain, rule)] = ()
    for (table, chain), rules in chains.items():
        saved.objects[Key(family, table, chain)] = () if chain in DISPATCH else tuple(rules)
    return saved


def from_netlink(family: int, chains: dict[tuple[str, str], list[NlRule]]) -> Saved:
    """The owned and built-in chains read over netlink (nft flavour) as a :class:`Saved`
    whose rule texts are the rules' summaries (:meth:`NlRule.text`): enough for the
    per-Service view, not the exact iptables text."""
    saved = Saved(family)
    for (table, chain), rules in chains.items():
        if chain in BUILTIN:
            for rule in rules:
                if owned(rule.target):
                    text = rule.text()
                    saved.objects[Key(family, table, chain, text)] = ()
                    saved.jumps.add((table, chain, rule.target))
            continue
        if not owned(chain):
            continue
        saved.rules[(table, chain)] = [(rule.text(), rule.packets) for rule in rules]
        texts = tuple(text for text, _ in saved.rules[(table, chain)])
        if chain in DISPATCH:
            saved.objects[Key(family, table, chain)] = ()
            for text in texts:
                saved.objects[Key(family, table, chain, text)] = ()
        else:
            saved.objects[Key(family, table, chain)] = texts
    return saved


_DEST_EXACT = re.compile(r"(?:^|[^!] )-d (\S+)")
_PROTO_ANY = re.compile(r"(?:^| )-p (\w+)")
_COMMENT_ANY = re.compile(r'--comment (?:"((?:[^"\\]|\\.)*)"|(\S+))')
_JUMP = re.compile(r"(?:^| )-([jg]) (\S+)")


def summary(rule: str) -> Summary:
    """What the netlink reader decodes of a rule (:meth:`NlRule.key`), from its
    iptables text: the exact destination, protocol, comment, destination port, the
    ``recent --rcheck`` and ``statistic`` matches, the jump or target and the DNAT
    address. Dispatch rules, built-in jumps and (on a first start) whole chains are
    compared by it (see docs/decisions/iptables.md). Each regex only runs when its
    option is in the text: this runs once per wanted rule on a first start."""
    address = ""
    if "-d " in rule:
        dest = _DEST_EXACT.search(rule)
        if dest is not None:
            address = dest.group(1)
            if not address.endswith(("/32", "/128")) or (
                address.endswith("/32") and ":" in address
            ):
                address = ""
    proto = ""
    if "-p " in rule:
        found = _PROTO_ANY.search(rule)
        proto = found.group(1) if found is not None else ""
    comment = None
    if "--comment" in rule:
        note = _COMMENT_ANY.search(rule)
        if note is not None:
            comment = (
                note.group(2) if note.group(1) is None else re.sub(r"\\(.)", r"\1", note.group(1))
            )
    dport = None
    if "--dport" in rule:
        port = _DPORT.search(rule)
        dport = int(port.group(1)) if port is not None else None
    chance = None
    if "--probability" in rule:
        m = _PROBABILITY.search(rule)
        chance = f"{float(m.group(1)):.11f}" if m is not None else None
    target = _JUMP.search(rule)
    to = ""
    if "--to-destination" in rule:
        dnat = _DNAT.search(rule)
        to = dnat.group(1) if dnat is not None else ""
    return (
        address,
        proto,
        comment,
        dport,
        "--rcheck" in rule,
        chance,
        target.group(2) if target is not None else "",
        target is not None and target.group(1) == "g",
        to,
    )


def shares(rules: Iterable[tuple[str, int]]) -> list[tuple[str, float]]:
    """(target, share of new connections) for the statistic jumps of a spread chain."""
    result: list[tuple[str, float]] = []
    left = 1.0
    for rule, _ in rules:
        if "--rcheck" in rule:
            continue
        target = _TARGET.search(rule)
        if target is None or not target.group(1).startswith("KPY-SEP-"):
            continue
        m = _PROBABILITY.search(rule)
        p = float(m.group(1)) if m else 1.0
        result.append((target.group(1), left * p))
        left *= 1.0 - p
    return result


def _frontend(chain: str, rule: str) -> str | None:
    proto = _PROTO.search(rule)
    port = _DPORT.search(rule)
    if proto is None or port is None:
        return None
    dest = _DEST.search(rule)
    if dest is None or chain == "KPY-NODEPORTS":
        host = "*"
    else:
        host = f"[{dest.group(1)}]" if ":" in dest.group(1) else dest.group(1)
    return f"{host}:{port.group(1)}/{proto.group(1).upper()}"


# The built-in chains that must jump to a dispatch chain for it to see traffic.
HOOKS = {
    (NAT, SERVICES): ("PREROUTING", "OUTPUT"),
    (FILTER, SERVICES): ("INPUT", "FORWARD", "OUTPUT"),
}


def reachable(saved: Saved) -> set[tuple[str, str]]:
    """The dispatch chains traffic reaches: every built-in jump to them in place (and,
    for ``KPY-NODEPORTS``, the jump from nat ``KPY-SERVICES``)."""
    found = {
        where
        for where, hooks in HOOKS.items()
        if all((where[0], hook, where[1]) in saved.jumps for hook in hooks)
    }
    if (NAT, SERVICES) in found and any(
        rule.endswith(f"-j {NODEPORTS}") for rule, _ in saved.rules.get((NAT, SERVICES), [])
    ):
        found.add((NAT, NODEPORTS))
    return found


def services(saved: Iterable[Saved]) -> dict[str, ServiceView]:
    """Per service port (by comment): frontends, endpoints and what each got. A
    frontend in a dispatch chain no built-in chain leads to is not counted (the
    Service does not work), so a deleted built-in jump shows as drift."""
    fronts: dict[str, set[str]] = defaultdict(set)
    roots: dict[str, set[tuple[int, str]]] = defaultdict(set)
    packets: dict[str, int] = defaultdict(int)
    by_family = {s.family: s for s in saved}
    for s in by_family.values():
        live = reachable(s)
        for (table, chain), rules in s.rules.items():
            if chain not in DISPATCH or (table, chain) not in live:
                continue
            for rule, count in rules:
                note = _COMMENT.search(rule)
                if note is None:
                    continue
                name = note.group(1)
                front = _frontend(chain, rule)
                if front is not None:
                    fronts[name].add(front)
                target = _TARGET.search(rule)
                if table == NAT and target is not None and target.group(1).startswith(_WALK):
                    roots[name].add((s.family, target.group(1)))
                    packets[name] += count
    result: dict[str, ServiceView] = {}
    for name in sorted(fronts):
        endpoints: set[str] = set()
        extra: dict[str, str] = {}
        chains: set[str] = set()
        todo = sorted(roots[name])
        seen: set[tuple[int, str]] = set()
        while todo:
            family, chain = todo.pop()
            if (family, chain) in seen:
                continue
            seen.add((family, chain))
            chains.add(chain)
            rules = by_family[family].rules.get((NAT, chain), [])
            if chain.startswith("KPY-SEP-"):
                for rule, count in rules:
                    m = _DNAT.search(rule)
                    if m is not None:
                        endpoints.add(m.group(1))
                        extra[f"packets {m.group(1)}"] = str(count)
                        extra[f"chain {m.group(1)}"] = chain
                continue
            if chain.startswith(("KPY-SVC-", "KPY-SVL-")):
                for sep, share in shares(rules):
                    extra[f"share {chain} {sep}"] = f"{share:.4f}"
            for rule, _ in rules:
                target = _TARGET.search(rule)
                if target is not None and target.group(1).startswith(_WALK):
                    todo.append((family, target.group(1)))
        extra["chains"] = " ".join(sorted(chains))
        extra["packets"] = str(packets[name])
        result[name] = ServiceView(
            frontends=tuple(sorted(fronts[name])), endpoints=tuple(sorted(endpoints)), extra=extra
        )
    return result


def programmed(backend: str, saved: Iterable[Saved]) -> Programmed:
    saved = list(saved)
    objects: dict[str, object] = {}
    for s in saved:
        objects.update({str(k): v for k, v in s.objects.items()})
    return Programmed(backend=backend, objects=objects, services=services(saved))


def merge(saved: Iterable[Saved]) -> dict[Key, Rules]:
    result: dict[Key, Rules] = {}
    for s in saved:
        result.update(s.objects)
    return result
