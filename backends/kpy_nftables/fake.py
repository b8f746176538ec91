"""A fake nf_tables for tests: render's objects in dicts, changed by render's operations.

:class:`FakeKernel` stands in for :class:`kpy_nftables.Kernel`: it applies the typed
operations of a transaction (:mod:`kpy_nftables.render`) — whether the backend would
send them through ``nft -f`` or, encoded by :func:`kpy_nftables.netlink.encode`, over
netlink — to tables, chains (their rules), sets and elements held as render's objects,
and answers the backend's reads (:meth:`FakeKernel.observe`, rule digests) through the
same :class:`kpy_nftables.observe.Reading` as the netlink reader. So the backend's
diff, adoption and drift repair can be tested in a unit test, without a namespace.

It refuses what the kernel refuses of kpy's transactions — a reference to a missing
table, chain or set, a chain or set still referenced or a chain not empty when
deleted, a missing element deleted, an element added again with other data — with an
:class:`~kpy_nftables.apply.NftError` naming the operation, and like the kernel
changes nothing then. It does not look at packets, and holds no clients in affinity
sets; the real kernel's tests (tests/backends, tests/integration) stay the reference.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from errno import EBUSY, EEXIST, ENOENT

from kpy_nftables import Kernel, Reader, Writer, netlink, observe, render
from kpy_nftables.apply import NftError
from kpy_nftables.netlink_read import RuleDigests

Ident = tuple[str, str, str]  # (family, table, name)


@dataclass
class _State:
    tables: set[tuple[str, str]] = field(default_factory=set)
    chains: dict[Ident, tuple[str | None, list[render.Rule]]] = field(default_factory=dict)
    sets: dict[Ident, render.Set] = field(default_factory=dict)
    elements: dict[Ident, dict[str, render.Element]] = field(default_factory=dict)

    def copy(self) -> _State:
        """A copy to change (the objects themselves are never changed)."""
        return _State(
            set(self.tables),
            {i: (hook, list(rules)) for i, (hook, rules) in self.chains.items()},
            dict(self.sets),
            {i: dict(held) for i, held in self.elements.items()},
        )


class _Refused(Exception):
    def __init__(self, errno: int) -> None:
        self.errno = errno


def _references(rule: render.Rule) -> tuple[set[str], set[str]]:
    """The chains (jumped or gone to) and the sets a rule refers to."""
    chains: set[str] = set()
    sets: set[str] = set()
    for st in rule.statements:
        if isinstance(st, render.Verdict) and st.chain is not None:
            chains.add(st.chain)
        elif isinstance(st, render.AddrIn | render.Lookup | render.Update):
            sets.add(st.set)
    return chains, sets


class FakeKernel(Kernel):
    """nf_tables as dicts of render's objects (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(None)  # its nft is never run: the backend writes over netlink
        self.state = _State()
        self.transactions = 0  # transactions applied (refused ones not counted)

    # --- writing ------------------------------------------------------------------------

    def apply(self, ops: Iterable[render.Op]) -> None:
        """Apply ``ops`` as one transaction: all of them, or (NftError) none."""
        state = self.state.copy()
        for op in ops:
            try:
                self._apply(state, op)
            except _Refused as exc:
                text = f"{os.strerror(exc.errno)} (errno {exc.errno})"
                raise NftError(f"kernel refused: {text}: {op.nft()}") from None
        self.state = state
        self.transactions += 1

    def _apply(self, state: _State, op: render.Op) -> None:
        where = (op.family, op.table)
        if isinstance(op, render.AddTable):
            state.tables.add(where)
            return
        if where not in state.tables:
            raise _Refused(ENOENT)
        if isinstance(op, render.DeleteTable):
            state.tables.discard(where)
            for ident in [i for i in state.chains if i[:2] == where]:
                del state.chains[ident]
            for ident in [i for i in state.sets if i[:2] == where]:
                del state.sets[ident], state.elements[ident]
        elif isinstance(op, render.AddChain):
            ident = (*where, op.chain.name)
            state.chains.setdefault(ident, (op.chain.hook, []))
        elif isinstance(op, render.FlushChain):
            self._chain(state, (*where, op.name)).clear()
        elif isinstance(op, render.DeleteChain):
            ident = (*where, op.name)
            if self._chain(state, ident) or self._chain_used(state, ident):
                raise _Refused(EBUSY)
            del state.chains[ident]
        elif isinstance(op, render.AddRule):
            chains, sets = _references(op.rule)
            for name in chains:
                self._chain(state, (*where, name))
            for name in sets:
                self._set(state, (*where, name))
            self._chain(state, (*where, op.chain)).append(op.rule)
        elif isinstance(op, render.AddSet):
            ident = (*where, op.set.name)
            defined = state.sets.get(ident)
            if defined is not None and defined.value != op.set.value:
                raise _Refused(EEXIST)
            state.sets[ident] = op.set
            state.elements.setdefault(ident, {})
        elif isinstance(op, render.DeleteSet):
            ident = (*where, op.name)
            self._set(state, ident)
            if any(op.name in _references(r)[1] for r in self._rules_of_table(state, where)):
                raise _Refused(EBUSY)
            del state.sets[ident]
            del state.elements[ident]
        else:
            self._elements(state, op)

    def _elements(self, state: _State, op: render.AddElements | render.DeleteElements) -> None:
        ident = (op.family, op.table, op.map)
        kind = self._set(state, ident).kind
        held = state.elements[ident]
        for e in op.elements:
            if isinstance(op, render.DeleteElements):
                if held.pop(e.element, None) is None:
                    raise _Refused(ENOENT)
                continue
            if bool(e.verdict) != (kind == "map"):
                raise _Refused(EBUSY)  # nft refuses it before the kernel sees it
            target = e.verdict.split(" ", 1)[1] if " " in e.verdict else None
            if target is not None:
                self._chain(state, (op.family, op.table, target))
            old = held.get(e.element)
            if old is not None and (old.verdict, old.comment) != (e.verdict, e.comment):
                raise _Refused(EEXIST)
            held[e.element] = e

    @staticmethod
    def _chain(state: _State, ident: Ident) -> list[render.Rule]:
        held = state.chains.get(ident)
        if held is None:
            raise _Refused(ENOENT)
        return held[1]

    @staticmethod
    def _set(state: _State, ident: Ident) -> render.Set:
        held = state.sets.get(ident)
        if held is None:
            raise _Refused(ENOENT)
        return held

    @staticmethod
    def _rules_of_table(state: _State, where: tuple[str, str]) -> list[render.Rule]:
        return [r for i, (_hook, rules) in state.chains.items() if i[:2] == where for r in rules]

    def _chain_used(self, state: _State, ident: Ident) -> bool:
        where, name = ident[:2], ident[2]
        if any(name in _references(r)[0] for r in self._rules_of_table(state, where)):
            return True
        return any(
            e.verdict.endswith(f" {name}")
            for i, held in state.elements.items()
            if i[:2] == where
            for e in held.values()
        )

    async def write_nft(self, txn: render.Transaction | render.Fresh) -> int:
        ops = list(txn.iter_ops())  # a first start's are rendered as they are read: once
        self.apply(ops)
        return sum(len(op.nft().encode()) + 1 for op in ops)  # what nft -f would read

    def writer(self) -> Writer:
        return _FakeWriter(self)

    def reader(self) -> Reader:
        return _FakeReader(self)

    # --- reading ------------------------------------------------------------------------

    def observe(
        self, rules: observe.RuleCounts | None = None, *, views: bool = True
    ) -> observe.Observed:
        """What a netlink read of these tables gives."""
        reading = observe.Reading(views=views)
        state = self.state
        for family, table in sorted(state.tables):
            reading.table(family, table)
        for family, table, name in state.chains:
            reading.chain(family, table, name)
        for (family, table, name), s in state.sets.items():
            elements = reading.set(s.kind, family, table, name, s.type, s.timeout)
            if elements is None:
                continue
            for e in state.elements[(family, table, name)].values():
                elements.element(e.element, render.comment_text(e.comment), e.verdict or None)
        return reading.finish(rules)

    def rules(self, chains: Iterable[Ident] | None = None) -> RuleDigests:
        """The rule count and a digest of the rules' text per chain that holds rules."""
        result = RuleDigests()
        wanted = self.state.chains if chains is None else chains
        for ident in wanted:
            held = self.state.chains.get(ident)
            if held is not None and held[1]:
                digest = hashlib.blake2b("\n".join(held[1]).encode(), digest_size=16).digest()
                result.chains[ident] = (len(held[1]), digest)
        return result

    def tables(self) -> list[tuple[str, str]]:
        return sorted(self.state.tables)


class _FakeWriter:
    """Applies what a netlink batch was encoded from (each operation once)."""

    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel

    def send(self, batch: netlink.Batch) -> None:
        ops: list[render.Op] = []
        for op in batch.sources:
            if not ops or ops[-1] is not op:  # a rule's anonymous set: its rule's messages
                ops.append(op)
        self.kernel.apply(ops)

    def close(self) -> None:
        pass


class _FakeReader:
    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel

    def observe(
        self, rules: observe.RuleCounts | None = None, *, views: bool = True
    ) -> observe.Observed:
        return self.kernel.observe(rules, views=views)

    def rules(self, chains: Iterable[Ident] | None = None) -> RuleDigests:
        return self.kernel.rules(chains)

    def close(self) -> None:
        pass


__all__ = ["FakeKernel"]
