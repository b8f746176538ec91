"""One bad object costs only that object: find the service ports a backend refuses.

A backend applies a sync as one kernel transaction, so one service port whose rules the
kernel (or ``nft``, or ``iptables-restore``) refuses makes the whole transaction fail —
and, left alone, every later one too: the good Services are never programmed, health
turns red, the kubelet restarts the agent, which fails the same way. Every node sees the
same object, so one object could take a whole fleet down.

When an apply fails, the agent asks :func:`find_refused` which of the plan's service
ports are to blame. It never experiments on the live node: each *attempt* tries a plan
holding only some of the ports, as a cold start, somewhere harmless — the backend's own
dry run (``check``: ``nft --check``, ``iptables-restore --test``, which commit nothing)
or, for a backend without one, a fresh backend of the same kind in a throwaway network
namespace (:class:`ScratchNamespaces`, which needs CAP_SYS_ADMIN). First the bare plan
(no port at all): if even that is refused the failure is not any object's (a missing tool, a
kernel that lacks a feature) and nothing is blamed. Then the suspects are bisected: a
group that is accepted is good; a refused group is split in two until single ports are
left (a refused group whose first half is accepted has its second half split at once).
One bad port among *n* costs at most 2·log2(n) attempts whose sizes add up to less
than 3·n ports' rules (2·n when the bad port sorts last).

The agent then programs the plan with every refused port held at its last programmed
state (or absent, if it never was), reports each refused port (warning log, metric, Node
event, ``kpy dump``), and retries a refused port when its state changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence

import structlog

from kpy.core.backend import Backend, BackendConfig
from kpy.core.model import Plan, ServicePortName, ServicePortState
from kpy.kernel import proc

log = structlog.get_logger("kpy.quarantine")

Attempt = Callable[[Plan], Awaitable[str | None]]
"""Apply a plan somewhere harmless: None when accepted, else the reason it was refused."""

# Beyond this many refused ports in one search the failure is treated as the node's, not
# the objects' (a scratch namespace that refuses nearly everything says little).
MAX_REFUSED_SHARE = 0.5


def subset(plan: Plan, names: Iterable[ServicePortName]) -> Plan:
    """A full plan holding only ``names`` of ``plan``'s service ports."""
    services = {n: plan.services[n] for n in names if n in plan.services}
    return Plan(
        node=plan.node,
        services=services,
        changed=frozenset(services),
        full_sync=True,
        service_cidrs=plan.service_cidrs,
    )


async def find_refused(
    plan: Plan, suspects: Sequence[ServicePortName], attempt: Attempt
) -> dict[ServicePortName, str] | None:
    """The suspects whose rules are refused, with the reason; None: no object is to blame."""
    if await attempt(subset(plan, ())) is not None:
        return None
    refused: dict[ServicePortName, str] = {}

    async def search(group: Sequence[ServicePortName], known: str | None = None) -> None:
        """Find the refused ports of ``group``; ``known``: it was seen refused already."""
        reason = known if known is not None else await attempt(subset(plan, group))
        if reason is None:
            return
        if len(group) == 1:
            refused[group[0]] = reason
            return
        middle = len(group) // 2
        left, right = group[:middle], group[middle:]
        before = len(refused)
        await search(left)
        # The group was refused and its left half was not: the right half is to blame,
        # no need to try it whole.
        await search(right, reason if len(refused) == before else None)

    await search([n for n in suspects if n in plan.services])
    if len(suspects) > 1 and len(refused) > MAX_REFUSED_SHARE * len(suspects):
        log.warning(
            "quarantine_gave_up",
            refused=len(refused),
            suspects=len(suspects),
            note="most service ports refused one by one: treated as a failure of the node",
        )
        return None
    return refused


class Overlay(Mapping[ServicePortName, ServicePortState]):
    """``base`` with some ports replaced (a state) or hidden (None); read-only, O(1) to make."""

    __slots__ = ("_base", "_over")

    def __init__(
        self,
        base: Mapping[ServicePortName, ServicePortState],
        over: Mapping[ServicePortName, ServicePortState | None],
    ) -> None:
        self._base = base
        self._over = over

    def __getitem__(self, key: ServicePortName) -> ServicePortState:
        if key in self._over:
            value = self._over[key]
            if value is None:
                raise KeyError(key)
            return value
        return self._base[key]

    def __iter__(self) -> Iterator[ServicePortName]:
        for key in self._base:
            if key not in self._over or self._over[key] is not None:
                yield key
        for key, value in self._over.items():
            if value is not None and key not in self._base:
                yield key

    def __len__(self) -> int:
        hidden = sum(1 for k, v in self._over.items() if v is None and k in self._base)
        added = sum(1 for k, v in self._over.items() if v is not None and k not in self._base)
        return len(self._base) - hidden + added


@dataclasses.dataclass(slots=True)
class Quarantine:
    """The refused service ports, and the last programmed state of every port."""

    refused: dict[ServicePortName, tuple[ServicePortState, str]] = dataclasses.field(
        default_factory=dict
    )
    good: dict[ServicePortName, ServicePortState] = dataclasses.field(default_factory=dict)

    def effective(self, plan: Plan) -> Plan:
        """``plan`` with each refused port held at its last good state.

        A refused port whose state changed (or that is gone) is released: its new state
        gets its own chance.
        """
        if not self.refused:
            return plan
        over: dict[ServicePortName, ServicePortState | None] = {}
        for name, (state, _) in list(self.refused.items()):
            if plan.services.get(name) != state:
                del self.refused[name]
                continue
            good = self.good.get(name)
            # A state one writer took and another refuses (a partial sync's netlink batch
            # and a full sync's script) is no good state to fall back to.
            over[name] = good if good != state else None
        if not over:
            return plan
        return dataclasses.replace(
            plan,
            services=Overlay(plan.services, over),
            changed=plan.changed - over.keys(),
            refused={n: r for n, (_, r) in self.refused.items()},
        )

    def hold(self, plan: Plan, refused: Mapping[ServicePortName, str]) -> None:
        for name, reason in refused.items():
            self.refused[name] = (plan.services[name], reason)

    def applied(self, plan: Plan) -> None:
        """Record what ``plan`` (as given to the backend) programmed."""
        if plan.full_sync:
            self.good = dict(plan.services)
            return
        for name in plan.removed:
            self.good.pop(name, None)
        for name in plan.changed:
            state = plan.services.get(name)
            if state is None:
                self.good.pop(name, None)
            else:
                self.good[name] = state


class ScratchNamespaces:
    """Attempts in throwaway network namespaces, with a fresh backend of the node's kind.

    Each attempt creates a namespace, applies the plan there as a node's first sync,
    and deletes the namespace (whatever the backend made in it goes with it).
    """

    def __init__(
        self,
        make: Callable[[BackendConfig], Backend],
        config: BackendConfig,
        run: Callable[[Sequence[str]], Awaitable[int]] | None = None,
    ) -> None:
        self._make = make
        self._config = config
        self._run = run or _run
        self._counter = itertools.count()
        self.attempts = 0

    async def __call__(self, plan: Plan) -> str | None:
        self.attempts += 1
        name = f"kpy-scratch-{os.getpid()}-{next(self._counter)}"
        if await self._run(["ip", "netns", "add", name]) != 0:
            return "cannot create a scratch network namespace"
        backend: Backend | None = None
        try:
            backend = self._make(dataclasses.replace(self._config, netns=name))
            await backend.apply(plan)
            return None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            if backend is not None:
                with contextlib.suppress(Exception):
                    await backend.cleanup()
            await self._run(["ip", "netns", "delete", name])


async def _run(argv: Sequence[str]) -> int:
    status, _, _ = await proc.communicate(argv)
    return status
