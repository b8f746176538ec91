"""The iptables backend: kube-proxy's iptables rule model under ``KPY-`` names.

:class:`IptablesBackend` keeps two maps of keyed objects (:mod:`kpy_iptables.render`):
what it *wants* (every service port's chains and dispatch rules plus the fixed part)
and what the kernel *has* (read back with ``iptables-save`` on every full sync, then
kept up to date with each restore that succeeded). A sync diffs the two with
:mod:`kpy.diff` — over every key on a full sync, over the changed and removed ports'
keys on a partial one — and sends the difference as one ``iptables-restore --noflush``
transaction per IP family. A one-endpoint change rewrites one ``KPY-SVC-`` chain and
creates or deletes one ``KPY-SEP-`` chain, whatever the size of the cluster.

A restarted agent reads the kernel first, so its first sync changes nothing that is
already right and drops no connection. A failed restore changes nothing (restore is
atomic) and makes the next sync a full one, which also repairs rules deleted by hand.

Options (``BackendConfig.options``): ``iptables_mode`` = ``auto`` (default), ``nft`` or
``legacy``.
"""

from __future__ import annotations

import dataclasses
import time

import structlog

from kpy import diff
from kpy.backend import ApplyResult, BackendConfig, BackendError, Programmed
from kpy.explain import Origin, Packet, Trace
from kpy.model import Plan, ServicePortName
from kpy_iptables import observe as observe_
from kpy_iptables import render
from kpy_iptables import trace as trace_
from kpy_iptables.apply import MODES, IptablesError, Kernel
from kpy_iptables.render import Key, Objects, Rules

__all__ = ["IptablesBackend"]

log = structlog.get_logger("kpy.iptables")


class IptablesBackend:
    """kpy's iptables backend (see the module docstring and README.md)."""

    name = "iptables"

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self._kernel = Kernel(config.netns, config.option("iptables_mode"))
        self._ctx = render.context(config)
        self._ports: dict[ServicePortName, Objects] = {}
        self._want: Objects = {}
        self._have: Objects = {}
        self._needs_full = True

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
        # The Node's pod CIDRs tell pods apart in every externalTrafficPolicy Local chain.
        full = plan.full_sync or self._needs_full or plan.node.pod_cidrs != self._ctx.pod_cidrs
        started = time.monotonic()
        try:
            if full:
                change = await self._full(plan)
            else:
                change = self._partial(plan)
            mode = await self._kernel.mode()
            inputs = render.restores(change, render.CHUNK_LINES if mode == "nft" else None)
            for family, transactions in sorted(inputs.items()):
                for restore in transactions:
                    await self._kernel.restore(family, restore.text)
        except IptablesError as exc:
            self._needs_full = True
            log.warning("iptables_apply_failed", error=str(exc), full_sync=full)
            raise BackendError(str(exc)) from exc
        except BaseException:
            self._needs_full = True
            raise
        self._record(change)
        self._needs_full = False
        done = [r for transactions in inputs.values() for r in transactions]
        ops = sum(r.ops for r in done)
        lines = sum(r.lines for r in done)
        size = sum(len(r.text) for r in done)
        log.debug(
            "iptables_applied",
            full_sync=full,
            ops=ops,
            lines=lines,
            ms=round((time.monotonic() - started) * 1000, 3),
        )
        return ApplyResult(
            full_sync=full,
            ops=ops,
            size=lines,
            size_unit="restore lines",
            detail={"bytes": size, "transactions": len(done)},
        )

    async def observe(self) -> Programmed:
        families = await self._kernel.families()
        saved = [await self._read(family) for family in families]
        return observe_.programmed(self.name, saved)

    async def cleanup(self) -> None:
        """Remove every ``KPY-`` chain and the jumps to them, in both flavours."""
        try:
            for mode in MODES:
                if not self._kernel.available(mode):
                    continue
                for family in await self._kernel.families():
                    have = observe_.parse(await self._kernel.save(family, mode), family).objects
                    limit = render.CHUNK_LINES if mode == "nft" else None
                    inputs = render.restores(diff.compute(have, {}), limit)
                    for restore in inputs.get(family, []):
                        await self._kernel.restore(family, restore.text, mode)
        except IptablesError as exc:
            raise BackendError(str(exc)) from exc
        finally:
            self._ports.clear()
            self._want.clear()
            self._have.clear()
            self._needs_full = True

    def trace(self, plan: Plan, packet: Packet, origin: Origin) -> Trace:
        """``packet`` through the rules render makes of ``plan`` (touches no kernel)."""
        return trace_.trace(plan, packet, origin, self.config)

    # --- internals ------------------------------------------------------------------------

    async def _read(self, family: int) -> observe_.Saved:
        return observe_.parse(await self._kernel.save(family), family)

    async def _full(self, plan: Plan) -> diff.Diff[Key, Rules]:
        families = await self._kernel.families()
        if families != self._ctx.families:
            log.warning("iptables_family_unavailable", families=families)
            self._ctx = dataclasses.replace(self._ctx, families=families)
        if plan.node.pod_cidrs != self._ctx.pod_cidrs:
            self._ctx = dataclasses.replace(self._ctx, pod_cidrs=plan.node.pod_cidrs)
        self._ports = render.render(plan, self._ctx)
        self._want = render.desired(self._ctx, self._ports)
        self._have = observe_.merge([await self._read(family) for family in families])
        return diff.compute(self._have, self._want)

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

    def _record(self, change: diff.Diff[Key, Rules]) -> None:
        for key, rules in change.added:
            self._have[key] = rules
        for key, _, rules in change.changed:
            self._have[key] = rules
        for key, _ in change.removed:
            del self._have[key]
