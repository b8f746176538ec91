"""The iptables backend: kube-proxy's iptables rule model under ``KPY-`` names.

:class:`IptablesBackend` keeps two maps of keyed objects (:mod:`kpy_iptables.render`):
what it *wants* (every service port's chains and dispatch rules plus the fixed part)
and what the kernel *has* (what it wrote, kept up to date with each restore that
succeeded, and checked against the kernel on every full sync). A sync diffs the two
with :mod:`kpy.core.diff` — over every key on a full sync, over the changed and removed
ports' keys on a partial one — and sends the difference as one
``iptables-restore --noflush`` transaction per IP family. A one-endpoint change
rewrites one ``KPY-SVC-`` chain and creates or deletes one ``KPY-SEP-`` chain, whatever
the size of the cluster.

A full sync reads the kernel back: with ``iptables-nft`` over netlink, chain by chain,
only kpy's chains (:mod:`kpy_iptables.held`: fingerprints of what kpy wrote, recorded
after each restore); with ``iptables-legacy`` with ``iptables-legacy-save``. A chain or
rule changed behind kpy's back is rewritten; a restarted agent adopts what already
matches. When the read-back fails, the sync goes on without it — against the last
state kpy wrote, or, with none, by writing every wanted chain — the failure is logged
and counted (``readback_failures`` in each :class:`~kpy.core.backend.ApplyResult`'s detail)
and the read is tried again at a later full sync, backing off. Partial syncs never
read anything.

A failed restore changes nothing (restore is atomic) and makes the next sync a full
one.

Options (``BackendConfig.options``): ``iptables_mode`` = ``auto`` (default), ``nft`` or
``legacy``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import shlex
import time
from collections.abc import Callable

import structlog

from kpy.core import diff
from kpy.core.backend import ApplyResult, BackendConfig, BackendError, Programmed
from kpy.core.model import Plan, ServicePortName
from kpy.core.trace import Origin, Packet, Trace
from kpy.kernel.netns import run_in_netns
from kpy_iptables import check as check_
from kpy_iptables import held as held_
from kpy_iptables import observe as observe_
from kpy_iptables import render
from kpy_iptables import trace as trace_
from kpy_iptables.apply import LOCK_WAIT, MODES, IptablesError, Kernel, tool
from kpy_iptables.netlink import NetlinkError
from kpy_iptables.render import BUILTIN, DISPATCH, FILTER, NAT, Key, Objects, Rules, owned

__all__ = ["IptablesBackend"]

log = structlog.get_logger("kpy.iptables")

READ_BACKOFF_MIN = 30.0  # seconds before a failed read-back is tried again, doubling
READ_BACKOFF_MAX = 600.0
DELETE_CHUNK = 5_000  # chain deletions per cleanup transaction


@dataclasses.dataclass(slots=True)
class _Step:
    """One part of a sync: a diff to restore, or ready restore text per family."""

    change: diff.Diff[Key, Rules] | None = None
    texts: dict[int, str] = dataclasses.field(default_factory=dict)
    absent: frozenset[Key] = frozenset()  # chains known not to exist (may be split)


def _inputs(steps: list[_Step], mode: str) -> list[tuple[int, render.Restore]]:
    """The restore inputs of ``steps``, in the order they are sent: (family, input)."""
    limit = render.CHUNK_LINES if mode == "nft" else None
    out: list[tuple[int, render.Restore]] = []
    for step in steps:
        if step.change is not None:
            split = render.restores(step.change, limit, step.absent)
            for family, transactions in sorted(split.items()):
                out += [(family, restore) for restore in transactions]
        for family, text in sorted(step.texts.items()):
            out.append((family, render.Restore(text=text, ops=text.count("\n"))))
    return out


def _route_localnet(netns: str | None) -> None:
    """route_localnet=1 in the node's network namespace (a connection from 127.0.0.1 to
    a localhost NodePort leaves the node DNATed and masqueraded); a failure is logged
    and the sync goes on without localhost NodePorts."""
    path = "/proc/sys/net/ipv4/conf/all/route_localnet"

    def write() -> None:
        with open(path) as f:
            if f.read().strip() == "1":
                return
        with open(path, "w") as f:
            f.write("1")

    try:
        run_in_netns(netns, write)
    except OSError as exc:
        log.warning("iptables_route_localnet_failed", error=str(exc))


class IptablesBackend:
    """kpy's iptables backend (see the module docstring and README.md)."""

    name = "iptables"

    def __init__(
        self, config: BackendConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._kernel = Kernel(config.netns, config.option("iptables_mode"))
        self._ctx = render.context(config)
        self._ports: dict[ServicePortName, Objects] = {}
        self._want: Objects = {}
        self._have: Objects = {}
        self._needs_full = True
        # nft flavour: the digest of every whole chain as kpy last wrote it
        self._record: dict[held_.ChainId, bytes] = {}
        self._clock = clock
        self.readback_failures = 0  # full syncs whose read-back failed (since start)
        self._read_after = 0.0  # no read-back before this time (backing off)
        self._backoff = 0.0
        self.last_drift: list[str] = []  # what the last full sync found different

    @property
    def mode(self) -> str:
        """The iptables flavour in use (``nft`` or ``legacy``)."""
        return self._kernel.detect()

    # --- the Backend protocol -------------------------------------------------------------

    def probe(self) -> str | None:
        try:
            return self._kernel.probe()
        except Exception as exc:  # any failure to run the tools is a reason, not a crash
            return f"iptables unavailable: {type(exc).__name__}: {exc}"

    async def apply(self, plan: Plan) -> ApplyResult:
        full = self._is_full(plan)
        started = time.monotonic()
        done: list[render.Restore] = []
        try:
            mode = await self._kernel.mode()
            if full:
                steps, how = await self._full(plan, mode)
            else:
                steps, how = [_Step(change=self._partial(plan))], "partial"
            for family, restore in _inputs(steps, mode):
                await self._kernel.restore(family, restore.text)
                done.append(restore)
        except IptablesError as exc:
            self._needs_full = True
            log.warning("iptables_apply_failed", error=str(exc), full_sync=full)
            raise BackendError(str(exc)) from exc
        except BaseException:
            self._needs_full = True
            raise
        if full:
            self._have = dict(self._want)
        else:
            assert steps[0].change is not None
            self._apply_to_have(steps[0].change)
        self._needs_full = False
        if mode == "nft":
            await self._remember(steps, full)
        ops = sum(r.ops for r in done)
        lines = sum(r.lines for r in done)
        size = sum(len(r.text) for r in done)
        log.debug(
            "iptables_applied",
            full_sync=full,
            how=how,
            ops=ops,
            lines=lines,
            ms=round((time.monotonic() - started) * 1000, 3),
        )
        return ApplyResult(
            full_sync=full,
            ops=ops,
            size=lines,
            size_unit="restore lines",
            detail={
                "bytes": size,
                "transactions": len(done),
                "readback_failures": self.readback_failures,
            },
        )

    async def differences(self, plan: Plan) -> tuple[str, ...]:
        """kpy's chains the kernel holds otherwise than this configuration renders for
        ``plan`` (read, never changed): one missing, one not rendered, or one with
        another number of rules. For ``kpy dump --backend``, whose node flags may not be
        the agent's. (Rules are compared by count: read back from the kernel they are
        not spelled as rendered.)"""
        families = await self._kernel.families()
        ctx = dataclasses.replace(render.context(self.config, plan.node), families=families)
        want = {str(k): len(v) for k, v in render.desired(ctx, render.render(plan, ctx)).items()
                if not k.rule}  # fmt: skip
        held = {
            k: len(v) if isinstance(v, tuple) else -1
            for k, v in (await self.observe()).objects.items()
            if " " not in k
        }
        found = []
        for key in sorted(want.keys() | held.keys()):
            if key not in held:
                found.append(f"{key}: not in the kernel")
            elif key not in want:
                found.append(f"{key}: in the kernel, not rendered")
            elif held[key] != want[key]:
                found.append(f"{key}: the kernel holds {held[key]} rules, kpy renders {want[key]}")
        return tuple(found)

    async def observe(self) -> Programmed:
        mode = await self._kernel.mode()
        families = await self._kernel.families()
        try:
            if mode == "nft":
                saved = []
                for family in families:
                    h = await asyncio.to_thread(
                        held_.read, self._kernel.reader, family, decode_all=True
                    )
                    saved.append(observe_.from_netlink(family, h.decoded))
            else:
                saved = [await self._read(family) for family in families]
        except (IptablesError, NetlinkError) as exc:
            raise BackendError(f"reading the iptables rules back failed: {exc}") from exc
        return observe_.programmed(self.name, saved)

    async def cleanup(self) -> None:
        """Remove every chain kpy creates and the built-in chains' jumps to them, in both
        flavours, by name. A flavour or table holding nothing of kpy's is not touched
        (nothing is created). Raises :class:`BackendError` when anything of kpy's is
        left."""
        errors: list[str] = []
        try:
            for mode in MODES:
                if not self._kernel.available(mode):
                    continue
                for family in (4, 6):
                    try:
                        if mode == "nft":
                            await self._cleanup_nft(family)
                        else:
                            await self._cleanup_legacy(family)
                    except (IptablesError, NetlinkError, OSError) as exc:
                        errors.append(f"{tool(mode, family, 'restore')}: {exc}")
        finally:
            self._ports.clear()
            self._want.clear()
            self._have.clear()
            self._record.clear()
            self._needs_full = True
        if errors:
            raise BackendError("cleanup incomplete: " + "; ".join(errors))

    def close(self) -> None:
        self._kernel.close()

    def _is_full(self, plan: Plan) -> bool:
        # The Node's pod CIDRs tell pods apart in every externalTrafficPolicy Local chain.
        return (
            plan.full_sync
            or self._needs_full
            or render.with_node(self._ctx, self.config, plan.node) != self._ctx
        )

    async def dry_run(self, plan: Plan) -> str:
        """The ``iptables-restore --noflush`` inputs ``apply(plan)`` would send now, in
        order (a full sync reads the kernel back first, as apply does), sending nothing."""
        full = self._is_full(plan)
        mode = await self._kernel.mode()
        if full:
            steps, _ = await self._full(plan, mode)
        else:
            steps = [_Step(change=self._partial(plan))]
        return "".join(
            f"# {tool(mode, family, 'restore')} --noflush\n{restore.text}"
            for family, restore in _inputs(steps, mode)
        )

    async def check(self, plan: Plan) -> str | None:
        """None when iptables would take ``plan``'s ports (``--test``, changes nothing)."""
        return await check_.check(plan, self.config, self._ctx, await self._kernel.mode())

    def trace(self, plan: Plan, packet: Packet, origin: Origin) -> Trace:
        """``packet`` through the rules render makes of ``plan`` (touches no kernel)."""
        return trace_.trace(plan, packet, origin, self.config)

    # --- internals ------------------------------------------------------------------------

    async def _read(self, family: int) -> observe_.Saved:
        return observe_.parse(await self._kernel.save(family), family)

    async def _full(self, plan: Plan, mode: str) -> tuple[list[_Step], str]:
        families = await self._kernel.families()
        if families != self._ctx.families:
            log.warning("iptables_family_unavailable", families=families)
            self._ctx = dataclasses.replace(self._ctx, families=families)
        self._ctx = render.with_node(self._ctx, self.config, plan.node)
        if self._ctx.localhost_nodeports:  # NodePorts on 127.0.0.1 need route_localnet
            await asyncio.to_thread(_route_localnet, self.config.netns)
        self._ports = render.render(plan, self._ctx)
        self._want = render.desired(self._ctx, self._ports)
        now = self._clock()
        if now >= self._read_after:
            try:
                steps = await self._compared(mode, families)
            except (IptablesError, NetlinkError, OSError) as exc:
                self.readback_failures += 1
                self._backoff = min(max(2 * self._backoff, READ_BACKOFF_MIN), READ_BACKOFF_MAX)
                self._read_after = now + self._backoff
                log.warning(
                    "iptables_readback_failed",
                    error=str(exc),
                    failures=self.readback_failures,
                    retry_after_s=self._backoff,
                    fallback="last written state" if self._have else "write every chain",
                )
            else:
                self._backoff = 0.0
                self._read_after = 0.0
                return steps, "read back"
        if self._have:
            # The last state kpy wrote stands in for the kernel: every wanted change is
            # made, drift is not repaired and stale chains stay until a read succeeds.
            return [_Step(change=diff.compute(self._have, self._want))], "last written state"
        return await self._blind(mode, families), "every chain written"

    async def _compared(self, mode: str, families: tuple[int, ...]) -> list[_Step]:
        """Read the kernel and diff: the normal full sync."""
        if mode != "nft":
            self._have = observe_.merge([await self._read(family) for family in families])
            return [_Step(change=diff.compute(self._have, self._want))]
        reader = self._kernel.reader
        first = not self._record
        held = {
            family: await asyncio.to_thread(
                functools.partial(
                    held_.read, reader, family, decode_all=first, record=dict(self._record)
                )
            )
            for family in families
        }
        repair = held_.compare(held, self._want, self._have, self._record)
        self._record.update(repair.adopted)
        self.last_drift = repair.drift
        if repair.drift and not first:
            log.warning("iptables_drift", found=len(repair.drift), first=repair.drift[:10])
        builtin = {}
        for family in families:
            lines = await asyncio.to_thread(held_.builtin_repair, reader, family, self._want)
            if lines:
                builtin[family] = held_.text(lines)
        absent = frozenset(
            key
            for key, _ in repair.main.added
            if not key.rule
            and key.family in held
            and (key.table, key.chain) not in held[key.family].chains
        )
        return [
            _Step(change=repair.main, absent=absent),
            _Step(texts=builtin),
            _Step(change=repair.strays),
        ]

    async def _blind(self, mode: str, families: tuple[int, ...]) -> list[_Step]:
        """Every wanted chain written (declared, so created or flushed, and filled), the
        dispatch chains whole, the built-in jumps added where ``-C`` finds them
        missing: the kernel's state is not known. Nothing is deleted."""
        added: list[tuple[Key, Rules]] = []
        dispatch: dict[Key, list[Key]] = {}
        for key in self._want:
            if key.rule and key.chain in DISPATCH:
                dispatch.setdefault(Key(key.family, key.table, key.chain), []).append(key)
        for key, rules in self._want.items():
            if not key.rule:
                added.append(
                    (key, held_.ordered(dispatch.get(key, [])) if key.chain in DISPATCH else rules)
                )
        for key in self._want:
            if key.rule and key.chain in BUILTIN and not await self._has_rule(mode, key):
                added.append((key, ()))
        return [_Step(change=diff.Diff(added=tuple(added)))]

    async def _has_rule(self, mode: str, key: Key) -> bool:
        """``iptables -C``: is this exact rule there? (Reads one chain.)"""
        binary = f"{'ip6tables' if key.family == 6 else 'iptables'}-{mode}"
        argv = [binary, "-w", LOCK_WAIT, "-t", key.table, "-C", key.chain, *shlex.split(key.rule)]
        try:
            await self._kernel._run(argv)
        except IptablesError as exc:
            if "exit status 1" in str(exc):
                return False
            raise
        return True

    async def _remember(self, steps: list[_Step], full: bool) -> None:
        """Read back the whole chains a sync wrote and record their digests (nft)."""
        touched: set[held_.ChainId] = set()
        for step in steps:
            if step.change is None:
                continue
            for key, _rules in (*step.change.added, *((k, n) for k, _o, n in step.change.changed)):
                cid = (key.family, key.table, key.chain)
                if key.chain in DISPATCH and not full:
                    self._record.pop(cid, None)  # decoded and checked at the next full sync
                elif key.chain not in BUILTIN:
                    touched.add(cid)
            for key, _rules in step.change.removed:
                cid = (key.family, key.table, key.chain)
                if key.rule and key.chain in DISPATCH and full:
                    touched.add(cid)
                else:
                    self._record.pop(cid, None)
        if full:  # (a walk over every wanted key: never on a partial sync)
            wanted = {(k.family, k.table, k.chain) for k in self._want if not k.rule}
            # the dispatch chains as checked (or written, read back below)
            touched |= {cid for cid in wanted if cid[2] in DISPATCH and cid not in self._record}
            for cid in list(self._record):
                if cid not in wanted:
                    del self._record[cid]
        if not touched:
            return
        by_family: dict[int, list[tuple[str, str]]] = {}
        for family, table, chain in sorted(touched):
            by_family.setdefault(family, []).append((table, chain))
        try:
            for family, chains in by_family.items():
                digests = await asyncio.to_thread(self._kernel.reader.digests, family, chains)
                for table, chain in chains:
                    got = digests.get((table, chain))
                    if got is None:
                        self._record.pop((family, table, chain), None)
                    else:
                        self._record[(family, table, chain)] = got
        except NetlinkError as exc:
            for cid in touched:
                self._record.pop(cid, None)
            log.warning("iptables_record_failed", error=str(exc), chains=len(touched))

    async def _cleanup_nft(self, family: int) -> None:
        reader = self._kernel.reader
        present = await asyncio.to_thread(reader.chains, family, (NAT, FILTER))
        ours = [(c.table, c.name) for c in present if owned(c.name)]
        if not ours:
            return  # nothing of kpy's: no restore, so no table is created
        builtins = [(c.table, c.name) for c in present if c.base and c.name in BUILTIN]
        rules = await asyncio.to_thread(reader.rules, family, builtins)
        first: list[str] = []
        deletes: list[str] = []
        for table in (FILTER, NAT):
            mine = [name for t, name in ours if t == table]
            if not mine:
                continue
            lines = [f"*{table}"]
            for t, chain in builtins:
                if t != table:
                    continue
                positions = [
                    p for p, r in enumerate(rules.get((t, chain), []), 1) if owned(r.target)
                ]
                lines += [f"-D {chain} {p}" for p in reversed(positions)]
            first.append("\n".join([*lines, "COMMIT"]))  # the jumps first: nothing reaches kpy's
            for i in range(0, len(mine), render.CHUNK_LINES):  # one big flush is superlinear
                chunk = mine[i : i + render.CHUNK_LINES]
                first.append("\n".join([f"*{table}", *(f":{n} - [0:0]" for n in chunk), "COMMIT"]))
            for i in range(0, len(mine), DELETE_CHUNK):
                chunk = mine[i : i + DELETE_CHUNK]
                deletes.append("\n".join([f"*{table}", *(f"-X {n}" for n in chunk), "COMMIT"]))
        for text in [*first, *deletes]:
            await self._kernel.restore(family, text + "\n", "nft")
        left = [
            c.name
            for c in await asyncio.to_thread(reader.chains, family, (NAT, FILTER))
            if owned(c.name)
        ]
        if left:
            raise IptablesError(f"{len(left)} chains left, e.g. {left[0]}")

    async def _cleanup_legacy(self, family: int) -> None:
        tables = await asyncio.to_thread(self._kernel.legacy_tables, family)
        if not tables & {NAT, FILTER}:
            return  # no legacy table here: nothing to read, nothing created
        have = observe_.parse(await self._kernel.save(family, "legacy"), family).objects
        if not have:
            return
        inputs = render.restores(diff.compute(have, {}), None)
        for restore in inputs.get(family, []):
            await self._kernel.restore(family, restore.text, "legacy")
        left = observe_.parse(await self._kernel.save(family, "legacy"), family).objects
        if left:
            raise IptablesError(f"{len(left)} objects left, e.g. {next(iter(left))}")

    def _partial(self, plan: Plan) -> diff.Diff[Key, Rules]:
        keys: set[Key] = set()
        for name in plan.changed | plan.removed:
            old = self._ports.pop(name, {})
            for key in old:
                self._want.pop(key, None)
            state = plan.services.get(name)
            new = render.render_port(state, self._ctx) if state is not None else {}
            if new:
                self._ports[name] = new
                self._want.update(new)
            keys.update(old)
            keys.update(new)
        return diff.compute_keys(self._have, self._want, keys)

    def _apply_to_have(self, change: diff.Diff[Key, Rules]) -> None:
        for key, rules in change.added:
            self._have[key] = rules
        for key, _, rules in change.changed:
            self._have[key] = rules
        for key, _ in change.removed:
            del self._have[key]
