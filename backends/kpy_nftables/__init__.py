"""The nftables backend: Service VIPs as verdict-map dispatch in kpy's own tables.

:class:`NftablesBackend` renders every service port into keyed nftables objects
(:mod:`kpy_nftables.render`), compares them with what the kernel holds and sends one
transaction with the difference: render's typed operations, through ``nft -f`` (full
syncs) or encoded as one netlink batch (partial syncs, :mod:`kpy_nftables.netlink`).
It knows what the kernel holds because it reads kpy's tables back on every full sync
(start-up, the periodic resync, after a failure; :mod:`kpy_nftables.netlink_read`) and
records what each successful transaction changed in between — so a partial sync never
lists the kernel and costs O(what changed). Where transactions go and what is read
back is a :class:`Kernel` (a fake one in tests: :mod:`kpy_nftables.fake`).

Two service ports claiming the same frontend (the same ClusterIP and port, or the same
NodePort) is invalid input: the first in name order keeps it, the other is served
without it and a ``nftables_frontend_conflict`` warning names both.

See README.md beside this file for the table layout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

import structlog

from kpy.core.backend import ApplyResult, BackendConfig, BackendError, Programmed
from kpy.core.model import Plan, ServicePortName, ServicePortState
from kpy.core.trace import Origin, Packet, Trace
from kpy_nftables import check as check_
from kpy_nftables import netlink, netlink_read, render
from kpy_nftables import observe as observe_
from kpy_nftables import trace as trace_
from kpy_nftables.apply import Nft, NftError

__all__ = ["Kernel", "NftablesBackend", "Reader", "Writer"]

log = structlog.get_logger("kpy.nftables")


class Writer(Protocol):
    """Sends netlink batches (:class:`kpy_nftables.netlink.NetlinkWriter`)."""

    def send(self, batch: netlink.Batch) -> None: ...
    def close(self) -> None: ...


class Reader(Protocol):
    """Reads kpy's tables back (:class:`kpy_nftables.netlink_read.NetlinkReader`)."""

    def observe(
        self, rules: observe_.RuleCounts | None = None, *, views: bool = True
    ) -> observe_.Observed: ...
    def rules(
        self, chains: Iterable[tuple[str, str, str]] | None = None
    ) -> netlink_read.RuleDigests: ...
    def close(self) -> None: ...


class Kernel:
    """Where the backend's transactions go and what it reads back: ``nft`` and
    nfnetlink sockets inside the configured namespace. (In tests,
    :class:`kpy_nftables.fake.FakeKernel` holds render's objects instead.)"""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self.nft = Nft(netns)

    async def write_nft(self, txn: render.Transaction | render.Fresh) -> int:
        """``txn`` through ``nft -f`` (a first start: in two processes at once, see
        :meth:`render.Fresh.halves`); the bytes written."""
        if isinstance(txn, render.Fresh):
            return await self.nft.run_parallel(txn.halves())
        return await self.nft.run_lines(txn.iter_lines())

    def writer(self) -> Writer:
        return netlink.NetlinkWriter(self.netns)

    def reader(self) -> Reader:
        return netlink_read.NetlinkReader(self.netns)


class NftablesBackend:
    """kpy's nftables backend (see the module docstring and README.md)."""

    name = "nftables"

    def __init__(self, config: BackendConfig, kernel: Kernel | None = None) -> None:
        self.config = config
        self._kernel = kernel or Kernel(config.netns)
        self._nft = self._kernel.nft
        self._base = render.base_objects(config)
        # What the kernel holds, as what it was last written from: the base objects'
        # values, and per service port the state (and configuration) its objects were
        # rendered from — a partial sync renders the recorded state again to know the
        # port's keys and values. The states are the tracker's own objects (shared, not
        # copied): ~100 bytes per port instead of every key and value (docs/benchmarks.md,
        # "Memory per Service").
        self._base_have: dict[str, str] = {}  # base object key → value
        self._record: dict[ServicePortName, _Rec] = {}
        # an element's claim (its key without the shard table) → the port holding it
        self._owner: dict[str, ServicePortName] = {}
        # a shared element's key (render.SHARED_SETS) → how many ports want it
        self._shares: dict[str, int] = {}
        self._needs_full = True
        writer = config.option("nftables_writer", "netlink")
        if writer not in ("netlink", "nft"):
            raise ValueError(f"nftables_writer must be netlink or nft (got {writer!r})")
        self._use_netlink = writer == "netlink"
        self._netlink: Writer | None = None
        self._reader: Reader | None = None
        self._set_types = netlink.set_types(self._base.values())
        # chain key → the digest of its rules as the kernel held them right after kpy
        # last wrote (or first verified) it: a full sync compares the kernel's with it
        self._digests: dict[str, bytes] = {}
        # after a large write: the thread reading every rule back, and what it read
        self._learner: tuple[threading.Thread, dict[str, Any]] | None = None
        # the chains a partial sync wrote, read back right after the batch was sent
        self._read_back: dict[tuple[str, str, str], tuple[int, bytes]] | None = None

    # --- the Backend protocol -----------------------------------------------------------

    def probe(self) -> str | None:
        """Whether ``nft`` can be started and nf_tables answers in the namespace (one
        netlink request; nothing is listed, however large the ruleset)."""
        return self._nft.probe() or netlink_read.ping(self.config.netns)

    async def apply(self, plan: Plan) -> ApplyResult:
        await self._settle()
        base_changes = self._reconfigure(plan)
        full = plan.full_sync or self._needs_full
        started = time.monotonic()
        if full:
            # A full sync compares with the kernel, not with the record: the record is
            # let go first (its memory is reused by the read), and until this sync
            # succeeds, the next one is full too.
            self._needs_full = True
            self._record, self._shares, self._owner = {}, {}, {}
        try:
            work = await self._full(plan) if full else self._partial(plan, base_changes)
            txn = self._transaction(work, full)
            if isinstance(txn, render.Fresh):
                # nothing of ours to disturb yet: two nft processes, part of the tables each
                size, writer = await self._kernel.write_nft(txn), "nft"
            elif not txn.ops:
                size, writer = 0, "none"
            elif full or not self._use_netlink:
                size, writer = await self._kernel.write_nft(txn), "nft"
            else:
                size, writer = await self._send_small(txn)
        except (NftError, OSError) as exc:
            self._needs_full = True
            self._read_back = None
            log.warning("nftables_apply_failed", error=str(exc), full_sync=full)
            raise BackendError(f"nft transaction failed: {exc}") from exc
        self._commit(work, full)
        try:
            await self._learn(txn, work, full)
        except (NftError, OSError) as exc:  # written; verified at the next full sync
            log.warning("nftables_rules_unread", error=str(exc))
            self._digests.clear()
        self._needs_full = False
        log.debug(
            "nftables_applied",
            full_sync=full,
            ops=txn.ops,
            bytes=size,
            writer=writer,
            ms=round((time.monotonic() - started) * 1000, 3),
        )
        return ApplyResult(
            full_sync=full,
            ops=txn.ops,
            size=size,
            size_unit="bytes",
            detail={
                "lines": txn.line_count,
                "ports": len(work.ports),
                "netlink": writer == "netlink",
            },
        )

    def _reconfigure(self, plan: Plan) -> frozenset[str]:
        """Take the configuration ``plan`` implies: the Node's addresses and pod CIDRs
        render into many rules (a full sync follows); the cluster's ServiceCIDRs only
        into the base tables' ``cluster-ips-check`` chains — the keys of the base
        objects that changed are returned, for a partial sync to send."""
        config = self.config.for_plan(plan)
        if config == self.config:
            return frozenset()
        base = render.base_objects(config)
        cidrs_only = (
            dataclasses.replace(config, cluster_service_cidrs=self.config.cluster_service_cidrs)
            == self.config
        )
        changed = frozenset(
            key for key in base.keys() | self._base.keys() if base.get(key) != self._base.get(key)
        )
        self.config, self._base = config, base
        if not cidrs_only:
            self._needs_full = True
        return changed

    def _transaction(self, work: _Work, full: bool) -> render.Transaction | render.Fresh:
        if work.fresh is not None:
            return work.fresh
        # nft takes a set's elements faster in one command; a netlink batch has one
        # message per element either way, so its transaction stays one element per line
        group = full or not self._use_netlink
        return render.transaction(work.want, work.have, work.keys, group=group)

    async def _send_small(self, txn: render.Transaction) -> tuple[int, str]:
        """A partial sync's transaction as one netlink batch from this process (no nft
        process, no cache of the ruleset); ``nft -f`` when it holds an operation the
        encoder does not know. Returns the script's size in bytes and the writer used."""
        script = txn.script
        try:
            batch = netlink.encode(txn.iter_ops(), self._set_types)
        except netlink.Unsupported as exc:
            log.debug("nftables_netlink_unsupported", line=str(exc))
            await self._kernel.write_nft(txn)
            return len(script.encode()), "nft"
        if self._netlink is None:
            self._netlink = self._kernel.writer()
            weakref.finalize(self, self._netlink.close)  # the socket goes with the backend
        writer, reader = self._netlink, self._netlink_reader()
        ids = [(c.family, c.table, c.name) for c in txn.rule_chains]

        def send_and_read_back() -> None:
            # the chains just written, read back on the same thread (see _learn)
            writer.send(batch)
            if ids:
                try:
                    self._read_back = reader.rules(ids).chains
                except NftError as exc:
                    log.warning("nftables_rules_unread", error=str(exc))

        await asyncio.to_thread(send_and_read_back)
        return len(script.encode()), "netlink"

    async def dry_run(self, plan: Plan) -> str:
        """The transaction ``apply(plan)`` would send now, without sending it."""
        await self._settle()
        kept = (self.config, self._base, self._needs_full)  # nothing is sent: nothing kept
        try:
            base_changes = self._reconfigure(plan)
            full = plan.full_sync or self._needs_full
            work = await self._full(plan) if full else self._partial(plan, base_changes)
            return self._transaction(work, full).script
        finally:
            self.config, self._base, self._needs_full = kept

    def _netlink_reader(self) -> Reader:
        if self._reader is None:
            self._reader = self._kernel.reader()
            weakref.finalize(self, self._reader.close)
        return self._reader

    async def _read(self, *, views: bool = True) -> observe_.Observed:
        """What kpy's tables hold: over netlink (no nft process, one set slice at a
        time; without ``views`` only what a sync compares, see
        :class:`observe_.Reading`), or ``nft -j list`` with ``nftables_writer=nft``;
        and the rules of every chain, their count and digest, over netlink either way,
        on a second socket at the same time (mostly the kernel's time and hashing, which
        leave the interpreter to the decoding: reading 100,000 Services took 7.8 s
        instead of 9.3 s; at 10,000 on a busy machine it once cost more than it saved,
        before the reader's GIL switch interval was shortened)."""
        rules = asyncio.create_task(asyncio.to_thread(self._read_rules))
        try:
            if self._use_netlink:
                reader = self._netlink_reader()
                observed = await asyncio.to_thread(reader.observe, None, views=views)
            else:
                observed = observe_.parse(await self._nft.list_tables())
        except BaseException:
            rules.cancel()
            with contextlib.suppress(BaseException):
                await rules  # its thread finishes; its result or error is not wanted
            raise
        observe_.check_rules(observed, (await rules).chains)
        return observed

    def _read_rules(self) -> netlink_read.RuleDigests:
        reader = self._kernel.reader()
        try:
            return reader.rules()
        finally:
            reader.close()

    async def _learn(self, txn: render.Transaction | render.Fresh, work: _Work, full: bool) -> None:
        """Record the digest of every chain the transaction wrote, read back right
        after the write (one filtered dump per chain), and forget those of deleted
        chains. After a large full sync (the first start: 60,000 rules at 10,000
        Services) every rule is read back by a thread while ``apply`` returns; the
        next call of this backend waits for it (:meth:`_settle`)."""
        if isinstance(txn, render.Fresh) or (full and len(txn.rule_chains) > LEARN_ONE_BY_ONE):
            self._digests = {}
            box: dict[str, Any] = {}
            reader = self._kernel.reader()

            def read_back() -> None:
                try:
                    box["rules"] = reader.rules().chains
                except Exception as exc:  # reported by _settle
                    box["error"] = exc
                finally:
                    reader.close()

            # a daemon: an agent exiting meanwhile does not wait for a read
            thread = threading.Thread(target=read_back, name="kpy-nftables-read-back", daemon=True)
            thread.start()
            self._learner = (thread, box)
            return
        for key in work.keys:
            if key not in work.want and render.split_key(key)[2] == "chain":
                self._digests.pop(key, None)  # deleted
        if not txn.rule_chains:
            return
        ids = [(c.family, c.table, c.name) for c in txn.rule_chains]
        rules, self._read_back = self._read_back, None
        if rules is None:  # not read back by the netlink writer's thread
            rules = (await asyncio.to_thread(self._netlink_reader().rules, ids)).chains
        for chain, ident in zip(txn.rule_chains, ids, strict=True):
            self._digests[chain.key] = rules.get(ident, observe_.NO_RULES)[1]

    async def _settle(self) -> None:
        """Wait for the read-back of a large write (see :meth:`_learn`) and record the
        digest of every chain it found."""
        if self._learner is None:
            return
        thread, box = self._learner
        self._learner = None
        await asyncio.to_thread(thread.join)
        rules = box.get("rules")
        if rules is None:  # the next full sync verifies counts and records digests
            log.warning("nftables_rules_unread", error=str(box.get("error")))
            return
        # every chain of kpy's tables the write left (a chain without rules has no
        # record: its first full sync verifies its count)
        self._digests = {
            render.Chain(family, name, (), table=table).key: digest
            for (family, table, name), (_count, digest) in rules.items()
        }

    def _compare_rules(self, observed: observe_.Observed, *, learn: bool) -> observe_.Observed:
        """Mark every chain whose rules differ from the digest recorded when kpy last
        wrote it (a value no render produces, and a drift reason for the dump); with
        ``learn``, record the digest of chains seen for the first time (their rule
        count was checked against their fingerprint)."""
        for key, (_count, digest) in observed.rules.items():
            known = self._digests.get(key)
            if known is None:
                if learn:
                    self._digests[key] = digest
            elif known != digest and observed.values.get(key) != render.CHAIN_ONLY:
                observed.values[key] = f"{observed.values[key]} but its rules changed"
                name = render.split_key(key)[3]
                owner = render.parse_chain_label(name) or observe_.NODE_VIEW
                observed.drift[owner].append(f"{key}: rules changed since kpy wrote them")
                log.info("nftables_rules_drift", chain=key)
        return observed

    async def differences(self, plan: Plan) -> tuple[str, ...]:
        """Every object the kernel holds otherwise than this configuration renders for
        ``plan`` (read, never changed): for ``kpy dump --backend``, whose node flags
        may not be the agent's."""
        want = self._wanted(plan)
        try:
            observed = await self._read()
        except NftError as exc:
            raise BackendError(f"cannot read the kpy tables: {exc}") from exc
        keys = sorted(want.keys() | observed.values.keys())
        return self._compare(want, observed, keys, strays=True)

    def _wanted(self, plan: Plan) -> dict[str, render.Obj]:
        config = self.config.for_plan(plan)
        want: dict[str, render.Obj] = dict(render.base_objects(config))
        for state in plan.services.values():
            want.update(render.port_objects(state, config))
        return want

    async def observe(self) -> Programmed:
        await self._settle()
        try:
            observed = self._compare_rules(await self._read(), learn=False)
        except NftError as exc:
            raise BackendError(f"cannot read the kpy tables: {exc}") from exc
        return Programmed(
            backend=self.name, objects=observed.values, services=observe_.views(observed)
        )

    async def check(self, plan: Plan) -> str | None:
        """None when the kernel would take ``plan``'s ports (``nft --check``, changes nothing)."""
        return await check_.check(plan, self.config)

    def trace(self, plan: Plan, packet: Packet, origin: Origin) -> Trace:
        """``packet`` through the objects this backend renders for ``plan``
        (:func:`kpy_nftables.trace.trace`; pure). With a namespace configured (``kpy
        explain --netns``, a live node), each object traversed is also compared with
        what that kernel holds — read, never changed — and every difference named in
        ``differs`` (the rules themselves are compared by count and fingerprint, not
        decoded: docs/decisions/nftables-drift.md)."""
        traced = trace_.trace(plan, packet, origin, self.config)
        if self.config.netns is None:
            return traced
        return dataclasses.replace(traced, differs=self._differences(plan, traced.kernel))

    def _differences(self, plan: Plan, keys: Iterable[str]) -> tuple[str, ...]:
        want = self._wanted(plan)
        try:
            observed = asyncio.run(self._read())
        except NftError as exc:
            return (f"the kernel could not be read: {exc}",)
        return self._compare(want, observed, keys, strays=False)

    @staticmethod
    def _compare(
        want: Mapping[str, render.Obj],
        observed: observe_.Observed,
        keys: Iterable[str],
        *,
        strays: bool,
    ) -> tuple[str, ...]:
        """Why each of ``keys`` differs in ``observed`` from ``want``; with ``strays``,
        a key only the kernel holds is one too (else a statement, not an object)."""
        found = []
        for key in keys:
            obj = want.get(key)
            if obj is None:
                if strays and key in observed.values:
                    found.append(f"{key}: in the kernel, not rendered")
                continue
            have = observed.values.get(key)
            if have is None:
                found.append(f"{key}: not in the kernel")
            elif have == obj.value:
                continue
            elif isinstance(obj, render.Chain):
                count = observed.rules.get(key, observe_.NO_RULES)[0]
                if count != len(obj.rules):
                    found.append(f"{key}: the kernel holds {count} of its {len(obj.rules)} rules")
                else:
                    found.append(f"{key}: the kernel's chain was written for other rules")
            else:
                found.append(f"{key}: the kernel holds {have!r}, kpy renders {obj.value!r}")
        return tuple(found)

    def close(self) -> None:
        """Close the netlink sockets (the rules stay; a later sync opens new ones)."""
        if self._learner is not None:
            self._learner[0].join()
            self._learner = None
        if self._netlink is not None:
            self._netlink.close()
            self._netlink = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    async def cleanup(self) -> None:
        """Delete kpy's base and shard tables (of any shard count), nothing else, in
        one netlink batch (no ``nft``). Nothing to do where nf_tables is not there at
        all; raises BackendError when the tables could not be listed or deleted."""
        self.close()
        try:
            await asyncio.to_thread(_delete_tables, self.config.netns)
        except (NftError, OSError) as exc:
            raise BackendError(f"cannot delete the kpy tables: {exc}") from exc
        self._base_have.clear()
        self._record.clear()
        self._owner.clear()
        self._shares.clear()
        self._digests.clear()
        self._needs_full = True

    # --- syncs --------------------------------------------------------------------------

    async def _full(self, plan: Plan) -> _Work:
        try:
            observed = await self._read(views=False)
        except NftError as exc:
            raise NftError(f"reading the kpy tables back: {exc}") from exc
        have = self._compare_rules(observed, learn=True).values
        del observed  # its views are not needed; ``have`` is emptied as it is compared
        # Only what differs from the kernel is kept: at start-up against intact tables
        # that is nothing, and each port's objects are dropped as soon as compared.
        want: dict[str, render.Obj] = {}
        current: dict[str, str] = {}  # the kernel's value of every key in want
        ports: dict[ServicePortName, _Rec | None] = {}
        owner = _Owners({})
        shares: Counter[str] = Counter()
        for key, obj in self._base.items():
            value = have.pop(key, None)
            if value != obj.value:
                want[key] = obj
                if value is not None:
                    current[key] = value
        if not have:
            # Nothing of any service port in the kernel: render while nft reads.
            def rendered() -> Iterator[Mapping[str, render.Obj]]:
                for name in sorted(plan.services):
                    state = plan.services[name]
                    objs, rec = self._port_objects(state, owner)
                    ports[name] = rec
                    shares.update(k for k, o in objs.items() if render.is_shared(o))
                    yield objs
                work.shares = shares  # a Counter is a dict: not copied (600,000 keys at 100,000)

            skeleton = render.transaction(want, current, want.keys(), group=True)
            work = _Work({}, current, (), ports, owner)
            work.fresh = render.Fresh(skeleton, rendered())
            return work
        take, peek = have.pop, have.get
        for name in sorted(plan.services):
            objs, rec = self._port_objects(plan.services[name], owner)
            ports[name] = rec
            for key, obj in objs.items():
                if render.is_shared(obj):
                    shares[key] += 1
                    if shares[key] > 1:
                        continue  # compared for the first port that wants it
                    value = peek(key)  # taken out below
                else:
                    value = take(key, None)
                if value != obj.value:
                    want[key] = obj
                    if value is not None:
                        current[key] = value
        for key in shares:
            have.pop(key, None)
        current.update(have)  # what the kernel holds and nothing renders: removed
        keys = set(want)
        keys.update(have)
        work = _Work(want, current, keys, ports, owner)
        work.shares = shares
        return work

    def _partial(self, plan: Plan, base_changes: Iterable[str] = ()) -> _Work:
        want: dict[str, render.Obj] = {}
        keys: set[str] = set(base_changes)  # base objects whose rendering changed
        have: dict[str, str] = {}  # what the kernel holds of these keys
        for key in keys:
            if key in self._base:
                want[key] = self._base[key]
            if key in self._base_have:
                have[key] = self._base_have[key]
        ports: dict[ServicePortName, _Rec | None] = {}
        owner = _Owners(self._owner)
        names = sorted(plan.changed | plan.removed)
        delta: Counter[str] = Counter()
        for name in names:
            for key, obj in self._recorded(name).items():
                keys.add(key)
                if render.is_shared(obj):
                    delta[key] -= 1
                    continue
                have[key] = obj.value
                if isinstance(obj, render.Element):
                    claim = render.claim_key(key)
                    if owner.get(claim) == name:
                        owner.release(claim)
        for name in names:
            state = plan.services.get(name)
            objs, rec = self._port_objects(state, owner) if state is not None else ({}, None)
            want.update(objs)
            keys.update(objs)
            ports[name] = rec
            delta.update(k for k, o in objs.items() if render.is_shared(o))
        work = _Work(want, have, keys, ports, owner)
        for key, change in delta.items():
            before = self._shares.get(key, 0)
            if before > 0:
                have[key] = render.shared_object(key).value
            count = before + change
            work.shares[key] = count
            if count > 0 and key not in want:
                want[key] = render.shared_object(key)  # other ports still want it
        return work

    def _recorded(self, name: ServicePortName) -> Mapping[str, render.Obj]:
        """The objects the kernel holds for service port ``name``: its recorded state
        rendered again with the configuration it was written with, without the
        frontends another port held then."""
        rec = self._record.get(name)
        if rec is None:
            return {}
        state, config, dropped = rec
        objs = render.port_objects(state, config)
        for key in dropped:
            objs.pop(key, None)
        return objs

    def _port_objects(
        self, state: ServicePortState, owner: _Owners
    ) -> tuple[dict[str, render.Obj], _Rec]:
        """The port's objects, without the frontends another port holds, and the record
        they are written as."""
        objs = render.port_objects(state, self.config)
        dropped: list[str] = []
        element, frontend_sets, name = render.Element, render.FRONTEND_SETS, state.name
        for key, obj in objs.items():
            if type(obj) is not element or obj.map not in frontend_sets:
                continue
            holder = owner.claim(obj.claim, name)
            if holder != name:
                log.warning(
                    "nftables_frontend_conflict",
                    service=str(name),
                    held_by=str(holder),
                    frontend=obj.element,
                    map=obj.map,
                )
                dropped.append(key)
        for key in dropped:
            del objs[key]
        return objs, (state, self.config, frozenset(dropped) if dropped else _NONE)

    def _commit(self, work: _Work, full: bool) -> None:
        if full:
            self._base_have = {key: obj.value for key, obj in self._base.items()}
            self._record = {name: rec for name, rec in work.ports.items() if rec is not None}
            self._owner = {k: v for k, v in work.owner.changes.items() if v is not None}
            self._shares = work.shares
            return
        for key, count in work.shares.items():
            if count > 0:
                self._shares[key] = count
            else:
                self._shares.pop(key, None)
        for key in work.keys:
            if key in self._base:
                self._base_have[key] = self._base[key].value
            else:
                self._base_have.pop(key, None)  # a base object no longer rendered, or a port's
        for name, rec in work.ports.items():
            if rec is not None:
                self._record[name] = rec
            else:
                self._record.pop(name, None)
        work.owner.commit()


# a port's record: the state its objects were rendered from, the configuration they were
# rendered with, the keys left out because another port held the frontend
_Rec = tuple[ServicePortState, BackendConfig, frozenset[str]]
_NONE: frozenset[str] = frozenset()


LEARN_ONE_BY_ONE = 256  # chains written: read back one by one, else all rules at once


def _delete_tables(netns: str | None) -> None:
    """Delete every kpy table in ``netns`` over netlink (see ``cleanup``)."""
    try:
        reader = netlink_read.NetlinkReader(netns)
    except OSError as exc:
        raise NftError(f"cannot open an nfnetlink socket: {exc}") from exc
    try:
        try:
            tables = reader.tables()
        except netlink_read.DumpRefused as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EPROTONOSUPPORT):
                return  # no nf_tables in this kernel: nothing of kpy's can be there
            raise
    except NftError as exc:
        if isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.EPROTONOSUPPORT:
            return  # no nfnetlink: nothing of kpy's can be there
        raise
    finally:
        reader.close()
    if not tables:
        return
    ops = [render.DeleteTable(family, name) for family, name in tables]
    writer = netlink.NetlinkWriter(netns)
    try:
        writer.send(netlink.encode(ops, {}))
    finally:
        writer.close()


class _Work:
    """One sync's inputs to :func:`render.transaction` and what to record after it."""

    __slots__ = ("fresh", "have", "keys", "owner", "ports", "shares", "want")

    def __init__(
        self,
        want: dict[str, render.Obj],
        have: Mapping[str, str],
        keys: Iterable[str],
        ports: dict[ServicePortName, _Rec | None],
        owner: _Owners,
    ) -> None:
        self.want = want
        self.have = have  # what the kernel holds of ``keys``
        self.keys = keys if isinstance(keys, set) else set(keys)
        self.ports = ports  # the record of every port synced (None: removed)
        self.owner = owner
        self.shares: dict[str, int] = {}  # shared keys' new counts (all of them in a full sync)
        self.fresh: render.Fresh | None = None  # a full sync rendered while written


class _Owners:
    """Which port holds each map element key: a base mapping plus this sync's changes,
    so a partial sync never copies the whole table of owners."""

    __slots__ = ("base", "changes")

    def __init__(self, base: dict[str, ServicePortName]) -> None:
        self.base = base
        self.changes: dict[str, ServicePortName | None] = {}

    def get(self, key: str) -> ServicePortName | None:
        if key in self.changes:
            return self.changes[key]
        return self.base.get(key)

    def release(self, key: str) -> None:
        self.changes[key] = None

    def claim(self, key: str, name: ServicePortName) -> ServicePortName:
        holder = self.get(key)
        if holder is None:
            self.changes[key] = name
            return name
        return holder

    def commit(self) -> None:
        for key, name in self.changes.items():
            if name is None:
                self.base.pop(key, None)
            else:
                self.base[key] = name
