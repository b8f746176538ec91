"""What the kernel holds of kpy's iptables-nft chains, and what a full sync must rewrite.

The nft flavour is read over netlink (:mod:`kpy_iptables.netlink`) chain by chain, not
with ``iptables-nft-save``. Rules are not turned back into their exact iptables text
(the xtables matches are opaque structures); instead:

* **whole chains** (``KPY-SVC-``, ``KPY-SEP-``, … and the helper chains) are compared by
  fingerprint: after every restore the backend reads back the chains it wrote and
  records each chain's digest (:func:`kpy_iptables.netlink.chain_digest`); a full sync
  rewrites every wanted chain whose kernel digest differs from the record (a rule
  deleted, added or changed behind kpy's back, the chain flushed) or that is missing.
  With no record (the agent's first full sync after a start) a chain is adopted when
  its decoded summary (:meth:`NlRule.key`, :func:`kpy_iptables.observe.summary`)
  matches the wanted rules one for one, and its digest is recorded from then on;
* **dispatch chains** (``KPY-SERVICES``, ``KPY-NODEPORTS``) hold one rule per frontend,
  added and deleted one by one; they are compared as multisets of summaries. Missing
  rules are added; any rule kpy does not want makes the chain rewritten whole;
* **built-in chains**: kpy's jumps (rules whose target is a chain kpy owns) are compared
  as multisets of summaries; when they differ, every kpy jump is deleted by position
  and the wanted ones inserted, in one transaction (:func:`builtin_repair`);
* owned chains that are not wanted are deleted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from kpy.core import diff
from kpy_iptables.netlink import ChainReader, NlRule
from kpy_iptables.observe import summary
from kpy_iptables.render import (
    BUILTIN,
    DISPATCH,
    FILTER,
    NAT,
    NODEPORTS,
    Key,
    Objects,
    Rules,
    owned,
)

TABLES = (NAT, FILTER)
ChainId = tuple[int, str, str]  # (family, table, chain)


@dataclass(slots=True)
class NftHeld:
    """One family's kpy chains as the kernel holds them."""

    family: int
    chains: set[tuple[str, str]] = field(default_factory=set)  # owned chains present
    digests: dict[tuple[str, str], bytes] = field(default_factory=dict)  # whole chains
    decoded: dict[tuple[str, str], list[NlRule]] = field(default_factory=dict)


def read(
    reader: ChainReader,
    family: int,
    *,
    decode_all: bool = False,
    record: Mapping[ChainId, bytes] | None = None,
) -> NftHeld:
    """kpy's chains of one family (blocking). Whole chains are only digested, unless
    ``decode_all`` (a first start, and ``kpy dump``); built-in chains are decoded, and
    dispatch chains too unless their digest is the one in ``record`` (unchanged since
    kpy last checked or wrote them)."""
    held = NftHeld(family)
    present = reader.chains(family, TABLES)
    held.chains = {(c.table, c.name) for c in present if owned(c.name)}
    whole = sorted(c for c in held.chains if c[1] not in DISPATCH)
    other = sorted(c for c in held.chains if c[1] in DISPATCH)
    other += sorted((c.table, c.name) for c in present if c.base and c.name in BUILTIN)
    if decode_all:
        both = reader.read(family, [*whole, *other])
        held.decoded = {c: rules for c, (_d, rules) in both.items()}
        held.digests = {c: both[c][0] for c in whole if c in both}
    else:
        dispatch = [c for c in other if c[1] in DISPATCH]
        held.digests = reader.digests(family, [*whole, *dispatch])
        known = record or {}
        same = {c for c in dispatch if known.get((family, *c)) == held.digests.get(c)}
        held.decoded = reader.rules(family, [c for c in other if c not in same])
    held.chains &= {*held.digests, *held.decoded}  # deleted between the two reads
    return held


def ordered(rules: Iterable[Key]) -> Rules:
    """A dispatch chain's rules in the order a rewrite writes them: the NodePort jump
    last (render adds every other rule at the top, that one at the bottom)."""
    texts = sorted(k.rule for k in rules)
    last = [t for t in texts if t.endswith(f"-j {NODEPORTS}")]
    return (*[t for t in texts if not t.endswith(f"-j {NODEPORTS}")], *last)


@dataclass(slots=True)
class Repair:
    """What a full sync sends: the main change, then (built-ins aside) the strays."""

    main: diff.Diff[Key, Rules]
    strays: diff.Diff[Key, Rules]
    adopted: dict[ChainId, bytes]  # chains found right without a record
    drift: list[str]  # what differed, for the log


def compare(
    held: Mapping[int, NftHeld],
    want: Objects,
    have: Objects,
    record: Mapping[ChainId, bytes],
) -> Repair:
    """The change that makes the kernel (``held``) hold ``want`` (see the module
    docstring). ``have`` is what the backend believes it wrote, ``record`` the digests
    of the chains it wrote."""
    added: list[tuple[Key, Rules]] = []
    rule_adds: list[tuple[Key, Rules]] = []
    rule_dels: list[tuple[Key, Rules]] = []
    adopted: dict[ChainId, bytes] = {}
    drift: list[str] = []
    dispatch_rules: dict[ChainId, list[Key]] = {}
    for key in want:
        if key.rule and key.chain in DISPATCH:
            dispatch_rules.setdefault((key.family, key.table, key.chain), []).append(key)
    for key, rules in want.items():
        if key.rule or key.family not in held:
            continue
        h = held[key.family]
        where = (key.table, key.chain)
        cid = (key.family, key.table, key.chain)
        if key.chain in DISPATCH:
            wanted = dispatch_rules.get(cid, [])
            if where not in h.chains:
                drift.append(f"missing {key}")
                added.append((key, ordered(wanted)))
                continue
            if where not in h.decoded and record.get(cid) == h.digests.get(where):
                # as kpy last checked or wrote it: what ``have`` says; add and delete
                # rules by their exact text
                old = {k for k in have if k.rule and (k.family, k.table, k.chain) == cid}
                rule_adds += [(k, ()) for k in wanted if k not in old]
                rule_dels += [(k, ()) for k in sorted(old - set(wanted))]
                continue
            kernel = Counter(r.key() for r in h.decoded.get(where, []))
            mine = Counter(summary(k.rule) for k in wanted)
            if kernel == mine:
                continue
            if kernel - mine:
                drift.append(f"rules not kpy's in {key}")
                added.append((key, ordered(wanted)))
                continue
            missing = mine - kernel
            drift.append(f"{sum(missing.values())} rules missing in {key}")
            for k in wanted:
                s = summary(k.rule)
                if missing[s] > 0:
                    missing[s] -= 1
                    rule_adds.append((k, ()))
            continue
        digest = h.digests.get(where)
        if digest is None:
            drift.append(f"missing {key}")
        elif cid in record:
            if record[cid] == digest and have.get(key) == rules:
                continue
            drift.append(f"changed {key}")
        else:
            decoded = h.decoded.get(where)
            if decoded is not None and [r.key() for r in decoded] == [summary(r) for r in rules]:
                adopted[cid] = digest
                continue
            drift.append(f"differs {key}")
        added.append((key, rules))
    strays: list[tuple[Key, Rules]] = []
    for family, h in held.items():
        for table, chain in sorted(h.chains):
            key = Key(family, table, chain)
            if key not in want:
                drift.append(f"not wanted {key}")
                strays.append((key, ()))
    return Repair(
        main=diff.Diff(added=tuple(added) + tuple(rule_adds), removed=tuple(rule_dels)),
        strays=diff.Diff(removed=tuple(strays)),
        adopted=adopted,
        drift=drift,
    )


def builtin_repair(reader: ChainReader, family: int, want: Objects) -> dict[str, list[str]]:
    """Per table, the restore lines that make kpy's jumps in the built-in chains what
    ``want`` says (nothing when they already are): every kpy jump deleted by its
    position, read just now, then the wanted ones inserted at the top."""
    # the built-in chains by name (a missing one is left out): no listing of every chain
    rules = reader.rules(family, [(t, c) for t in TABLES for c in sorted(BUILTIN)])
    lines: dict[str, list[str]] = {}
    for table in TABLES:
        for chain in sorted(BUILTIN):
            wanted = [
                k
                for k in want
                if k.rule and k.family == family and k.table == table and k.chain == chain
            ]
            jumps = [
                (pos, r)
                for pos, r in enumerate(rules.get((table, chain), []), 1)
                if owned(r.target)
            ]
            if Counter(r.key() for _, r in jumps) == Counter(summary(k.rule) for k in wanted):
                continue
            out = lines.setdefault(table, [])
            out += [f"-D {chain} {pos}" for pos, _ in reversed(jumps)]
            out += [f"-I {chain} 1 {k.rule}" for k in sorted(wanted, reverse=True)]
    return lines


def text(lines: Mapping[str, list[str]]) -> str:
    """Restore input for :func:`builtin_repair`'s lines."""
    out: list[str] = []
    for table in (FILTER, NAT):
        if lines.get(table):
            out += [f"*{table}", *lines[table], "COMMIT"]
    return "\n".join(out) + "\n" if out else ""


__all__ = [
    "ChainId",
    "NftHeld",
    "Repair",
    "builtin_repair",
    "compare",
    "ordered",
    "read",
    "text",
]
