"""Delete stale UDP conntrack entries after a sync, so clients stop talking to dead backends.

UDP has no connection to reset: a client that keeps sending from the same port keeps
hitting the conntrack entry made by its first datagram, whose DNAT still points at
the endpoint that was chosen then. When that endpoint goes away (or the Service's VIP
or NodePort changes, or a Service gets its first endpoint after its datagrams were
rejected) the entry must be deleted or the client is stuck until it times out. As
upstream kube-proxy does, kpy deletes them — only after the apply that changed the
rules succeeded, or the next datagram would recreate the same stale entry.

The Plan lists the flows (:class:`~kpy.core.model.StaleFlow`); this module runs the
``conntrack`` tool for each, inside the node's network namespace when one is set
(``nsenter``, :func:`kpy.kernel.proc.in_netns`). docs/decisions/conntrack.md says why the
tool and not netlink.
The work is bounded (a capped queue that coarsens before it drops, a few deletions at
a time, a timeout per deletion) and never blocks the event loop (asyncio subprocesses).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import structlog

from kpy.core.backend import ApplyResult
from kpy.core.model import IPAddress, Plan, Protocol, StaleFlow
from kpy.kernel import proc

log = structlog.get_logger("kpy.conntrack")

MAX_PENDING = 4096  # flows queued at most; beyond it they coarsen, then are dropped
CONCURRENCY = 4
TIMEOUT = 10.0
_DELETED = re.compile(rb"(\d+) flow entries have been deleted")


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    flow: StaleFlow
    family: str
    deleted: int
    error: str | None = None


def commands(flow: StaleFlow) -> list[tuple[str, list[str]]]:
    """The ``conntrack`` argument lists deleting one stale flow, with their family.

    A flow without a destination (a NodePort: any local address) and without an
    endpoint has no family of its own, so both are cleaned.
    """
    family_of: IPAddress | None = flow.destination or flow.endpoint
    if family_of is None:
        families = ["ipv4", "ipv6"]
    else:
        families = ["ipv4" if family_of.version == 4 else "ipv6"]
    result = []
    for family in families:
        args = ["conntrack", "-D", "-f", family, "-p", str(flow.protocol).lower()]
        if flow.destination is not None:
            args += ["--orig-dst", str(flow.destination)]
        args += ["--dport", str(flow.port)]
        if flow.endpoint is not None:
            args += ["--reply-src", str(flow.endpoint)]
        result.append((family, args))
    return result


def _coarse(flow: StaleFlow) -> StaleFlow:
    """The same flow for every endpoint: a superset, so still correct to delete."""
    return replace(flow, endpoint=None)


class ConntrackCleaner:
    """A ``SyncObserver`` that queues each applied Plan's stale UDP flows and deletes them."""

    def __init__(
        self,
        *,
        netns: str | None = None,
        enabled: bool = True,
        max_pending: int = MAX_PENDING,
        concurrency: int = CONCURRENCY,
        timeout: float = TIMEOUT,
        on_done: Callable[[int, int], None] | None = None,
    ) -> None:
        self.netns = netns
        self.enabled = enabled
        self.max_pending = max_pending
        self.concurrency = concurrency
        self.timeout = timeout
        self.on_done = on_done
        self._pending: dict[StaleFlow, None] = {}  # insertion-ordered set
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.dropped = 0
        self.deleted = 0
        self.failed = 0

    # ----------------------------------------------------------- SyncObserver

    def plan_applied(self, plan: Plan, result: ApplyResult, seconds: float) -> None:
        if not self.enabled or not plan.stale_flows:
            return
        self.add(plan.stale_flows)

    def sync_failed(self, plan: Plan, error: Exception, seconds: float) -> None:
        return None  # nothing changed in the kernel: nothing became stale

    # ----------------------------------------------------------- queue

    def add(self, flows: Sequence[StaleFlow]) -> None:
        for flow in flows:
            if flow.protocol is not Protocol.UDP:
                continue
            self._pending[flow] = None
        if len(self._pending) > self.max_pending:
            # Deleting every entry to a frontend is a superset of deleting those to one
            # endpoint: coarsen first, and drop only what still does not fit.
            coarse = dict.fromkeys(_coarse(f) for f in self._pending)
            if len(coarse) > self.max_pending:
                extra = len(coarse) - self.max_pending
                self.dropped += extra
                log.warning(
                    "conntrack_cleanup_overflow",
                    dropped=extra,
                    note="the dropped entries expire on their own (UDP timeout)",
                )
                coarse = dict.fromkeys(list(coarse)[: self.max_pending])
            self._pending = coarse
        if self._pending:
            self._idle.clear()
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def idle(self) -> None:
        """Wait until every queued flow has been handled."""
        await self._idle.wait()

    # ----------------------------------------------------------- work

    async def _run(self, flow: StaleFlow, family: str, args: list[str]) -> Outcome:
        try:
            async with asyncio.timeout(self.timeout):
                status, out, err = await proc.communicate(proc.in_netns(self.netns, args))
        except OSError as exc:
            return Outcome(flow=flow, family=family, deleted=0, error=str(exc))
        except TimeoutError:  # the child was killed and reaped by communicate
            return Outcome(flow=flow, family=family, deleted=0, error="timed out")
        match = _DELETED.search(err) or _DELETED.search(out)
        deleted = int(match.group(1)) if match else 0
        # Exit status 1 with "0 flow entries have been deleted" means nothing matched.
        if status == 0 or (status == 1 and match is not None and deleted == 0):
            return Outcome(flow=flow, family=family, deleted=deleted)
        message = err.decode(errors="replace").strip() or f"exit status {status}"
        return Outcome(flow=flow, family=family, deleted=deleted, error=message)

    async def clean(self, flows: Sequence[StaleFlow]) -> list[Outcome]:
        """Delete these flows now, ``concurrency`` processes at a time."""
        limit = asyncio.Semaphore(self.concurrency)

        async def one(flow: StaleFlow, family: str, args: list[str]) -> Outcome:
            async with limit:
                return await self._run(flow, family, args)

        jobs = [one(f, fam, args) for f in flows for fam, args in commands(f)]
        outcomes = list(await asyncio.gather(*jobs))
        deleted = sum(o.deleted for o in outcomes)
        failed = [o for o in outcomes if o.error is not None]
        self.deleted += deleted
        self.failed += len(failed)
        for o in failed:
            log.warning(
                "conntrack_delete_failed",
                destination=str(o.flow.destination or "*"),
                port=o.flow.port,
                endpoint=str(o.flow.endpoint) if o.flow.endpoint else None,
                family=o.family,
                error=o.error,
            )
        if flows:
            log.info("conntrack_cleaned", flows=len(flows), deleted=deleted, failed=len(failed))
        if self.on_done is not None:
            self.on_done(deleted, len(failed))
        return outcomes

    async def run(self, batch: int = 256) -> None:
        """Drain the queue until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                flows = list(self._pending)[:batch]
                for f in flows:
                    del self._pending[f]
                await self.clean(flows)
            self._idle.set()


__all__ = ["ConntrackCleaner", "Outcome", "commands"]
