"""The agent: source → convert → tracker → runner → backend, under one TaskGroup.

Handlers convert and record (and log what they skip); the runner decides when to
sync; a sync checks out a Plan and applies it in one backend transaction. A failed
apply makes the next sync a full one (the tracker is told), and nothing is recorded as
programmed until the backend says it is. Nothing is programmed before the source has
listed everything once, and nothing is removed because the source lost its upstream.

A refused apply does not stop the node: with an ``isolate`` attempt function (see
:mod:`kpy.agent.quarantine`) the agent finds the service ports to blame, programs everything
else with those held at their last programmed state, and reports them; only a failure
no object explains goes to the runner's retry with backoff.

Status for health checks and metrics is exposed through :class:`AgentStatus` and the
optional :class:`SyncObserver` hooks, so the operational servers stay outside this file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import structlog

from kpy.agent import quarantine
from kpy.agent.runner import Runner, RunnerTimes
from kpy.core import convert
from kpy.core.backend import ApplyResult, Backend
from kpy.core.model import Conflict, NodeInfo, Plan, ServiceName, ServicePortName
from kpy.core.tracker import Tracker
from kpy.sources import Event, EventType, Kind, Source

log = structlog.get_logger("kpy.agent")

GC_THRESHOLDS = (50_000, 50, 100)


def tune_gc() -> None:
    """Collect less often: the agent holds a large, long-lived graph of small frozen values.

    With the default thresholds (700, 10, 10) a 10,000-Service initial list spends about
    a third of its time in generation-2 collections that find nothing to free.
    """
    gc.set_threshold(*GC_THRESHOLDS)


class SyncObserver(Protocol):
    """Hooks for health, metrics, conntrack cleanup and health-check servers."""

    def plan_applied(self, plan: Plan, result: ApplyResult, seconds: float) -> None: ...

    def sync_failed(self, plan: Plan, error: Exception, seconds: float) -> None: ...


@dataclass
class AgentStatus:
    """What the agent knows about itself; read by health checks and metrics."""

    started: float = field(default_factory=time.time)
    source_synced: bool = False
    source_healthy: bool = True
    source_reason: str = ""
    first_full_sync_done: bool = False
    last_sync_ok: float | None = None  # wall clock of the last successful sync
    last_sync_attempt: float | None = None
    pending_since: float | None = None  # wall clock of the oldest unprogrammed change
    sync_failures: int = 0
    services: int = 0
    endpoints: int = 0
    last_result: ApplyResult | None = None
    skipped_objects: int = 0
    conflicts: int = 0  # service ports programmed without a frontend another port holds
    refused: int = 0  # service ports the backend refused, held at their last good state
    refused_total: int = 0  # refusals found since start


class Agent:
    """One node's agent. ``run()`` until cancelled."""

    def __init__(
        self,
        *,
        node_name: str,
        source: Source,
        backend: Backend,
        times: RunnerTimes | None = None,
        observers: tuple[SyncObserver, ...] = (),
        node_override: Callable[[NodeInfo], NodeInfo] | None = None,
        isolate: quarantine.Attempt | None = None,
    ) -> None:
        self.node_name = node_name
        self.tracker = Tracker(node_name)
        self.source = source
        self.backend = backend
        self.status = AgentStatus()
        self.observers = observers
        self.runner = Runner(self._sync, times or RunnerTimes())
        self._synced = asyncio.Event()
        self._node_override = node_override
        self._node_seen = False
        self._isolate = isolate
        self.quarantine = quarantine.Quarantine()
        self._reported: dict[ServicePortName, tuple[Conflict, ...]] = {}
        if node_override is not None:
            self.tracker.set_node(node_override(NodeInfo(name=node_name)))

    # ----------------------------------------------------------------- Sink

    def event(self, event: Event) -> None:
        try:
            self._handle(event)
        except Exception as exc:  # a handler never takes the agent down
            namespace, name = convert.identify(event.obj)
            log.error(
                "event_failed",
                kind=str(event.kind),
                namespace=namespace,
                name=name,
                error=str(exc),
                error_type=type(exc).__name__,
            )
            return
        if self.tracker.pending:
            if self.status.pending_since is None:
                self.status.pending_since = time.time()
            if self._synced.is_set():
                self.runner.request()

    def synced(self) -> None:
        if not self._synced.is_set():
            log.info("source_synced", services=len(self.tracker._services))
        self.status.source_synced = True
        self._synced.set()
        self.runner.request()

    def connection(self, healthy: bool, reason: str = "") -> None:
        if healthy != self.status.source_healthy:
            if healthy:
                log.info("source_connected")
            else:
                log.warning(
                    "source_disconnected",
                    reason=reason,
                    note="programmed rules are kept as they are",
                )
        self.status.source_healthy = healthy
        self.status.source_reason = reason

    def _warn(self, problems: tuple[convert.Problem, ...]) -> None:
        for p in problems:
            self.status.skipped_objects += 1
            log.warning("object_skipped", **p.as_log())

    def _handle(self, event: Event) -> None:
        if event.kind is Kind.SERVICE:
            name = ServiceName(namespace=event.namespace, name=event.name)
            if event.type is EventType.DELETE or convert.is_managed_by_other_proxy(event.obj):
                self.tracker.set_service(name, None)
                return
            svc, problems = convert.service(event.obj)
            self._warn(problems)
            if svc is not None:
                self.tracker.set_service(name, svc)
            # An invalid update keeps the last good version programmed.
        elif event.kind is Kind.ENDPOINT_SLICE:
            if event.type is EventType.DELETE:
                self.tracker.set_slice(event.namespace, event.name, None)
                return
            eps, problems = convert.endpoint_slice(event.obj)
            self._warn(problems)
            if eps is not None or not problems:
                self.tracker.set_slice(event.namespace, event.name, eps, _trigger_time(event.obj))
        elif event.kind is Kind.SERVICE_CIDR:
            if event.type is EventType.DELETE:
                self.tracker.set_service_cidr(event.name, None)
                return
            cidrs, problems = convert.service_cidr(event.obj)
            self._warn(problems)
            if cidrs is not None:
                self.tracker.set_service_cidr(event.name, cidrs)
            # An invalid ServiceCIDR counts for nothing; an invalid update keeps the last
            # good version (as a Service's).
        elif event.kind is Kind.NODE:
            if event.name != self.node_name or event.type is EventType.DELETE:
                return
            node, problems = convert.node(event.obj)
            self._warn(problems)
            if node is not None:
                if self._node_override is not None:
                    node = self._node_override(node)
                self._node_seen = True
                self.tracker.set_node(node)

    # ----------------------------------------------------------------- sync

    async def _sync(self, full: bool) -> None:
        if full:
            self.tracker.request_full_sync()
        plan = self.quarantine.effective(self.tracker.checkout())
        started = time.perf_counter()
        self.status.last_sync_attempt = time.time()
        try:
            try:
                result = await self.backend.apply(plan)
            except Exception as exc:
                isolated = await self._isolated(plan, exc)
                if isolated is None:
                    raise
                plan, result = isolated
        except Exception as exc:
            seconds = time.perf_counter() - started
            self.status.sync_failures += 1
            # Everything in this plan must be re-sent: make the next checkout full.
            self.tracker.request_full_sync()
            for o in self.observers:
                o.sync_failed(plan, exc, seconds)
            raise
        seconds = time.perf_counter() - started
        if self._isolate is not None:  # the last good states matter only to isolation
            self.quarantine.applied(plan)
        self.status.last_sync_ok = time.time()
        self.status.last_result = result
        self.status.pending_since = None if not self.tracker.pending else self.status.pending_since
        if plan.full_sync:
            self.status.first_full_sync_done = True
        self.status.services = len(plan.services)
        self.status.refused = len(self.quarantine.refused)
        self._report_conflicts(plan)
        if plan.full_sync or plan.changed or plan.removed:
            self.status.endpoints = sum(len(s.endpoints) for s in plan.services.values())
            log.info(
                "sync_applied",
                backend=self.backend.name,
                full=plan.full_sync,
                changed=len(plan.changed),
                removed=len(plan.removed),
                ops=result.ops,
                size=result.size,
                size_unit=result.size_unit,
                ms=round(seconds * 1000, 2),
            )
        for o in self.observers:
            o.plan_applied(plan, result, seconds)

    async def _isolated(self, plan: Plan, error: Exception) -> tuple[Plan, ApplyResult] | None:
        """After a refused apply: program everything but the ports to blame, if any are."""
        if self._isolate is None:
            return None
        suspects = sorted(plan.services if plan.full_sync else plan.changed & plan.services.keys())
        if not suspects:
            return None
        log.warning(
            "sync_refused_isolating",
            error=str(error),
            error_type=type(error).__name__,
            suspects=len(suspects),
        )
        started = time.perf_counter()
        refused = await quarantine.find_refused(plan, suspects, self._isolate)
        if not refused:
            log.warning(
                "sync_refused_not_by_an_object",
                error=str(error),
                ms=round((time.perf_counter() - started) * 1000, 1),
            )
            return None
        for name, reason in sorted(refused.items()):
            log.warning(
                "service_port_refused",
                service=str(name),
                reason=reason,
                kept="last programmed state" if name in self.quarantine.good else "nothing",
            )
        self.quarantine.hold(plan, refused)
        self.status.refused_total += len(refused)
        retry = dataclasses.replace(self.quarantine.effective(plan), full_sync=True)
        result = await self.backend.apply(retry)
        log.info(
            "sync_applied_without_refused",
            refused=len(refused),
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return retry, result

    def _report_conflicts(self, plan: Plan) -> None:
        """One warning per new or changed frontend conflict (observers see plan.conflicts)."""
        current = plan.conflicts
        self.status.conflicts = len(current)
        if not current and not self._reported:
            return
        for name, conflicts in current.items():
            if self._reported.get(name) == conflicts:
                continue
            for c in conflicts:
                log.warning(
                    "frontend_conflict",
                    service=str(name),
                    frontend=c.frontend,
                    claimed_as=c.claimed_as,
                    held_by=str(c.held_by),
                    held_as=c.held_as,
                    note="served without this frontend; the allocated address wins",
                )
        self._reported = dict(current)

    async def run(self) -> None:
        """Start the source, wait for its first complete list, then sync until cancelled."""
        log.info("agent_starting", node=self.node_name, backend=self.backend.name)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.source.run(self), name="source")
            await self._synced.wait()
            gc.freeze()  # the initial list is long-lived: keep it out of future collections
            if not self._node_seen and self._node_override is None:
                log.warning(
                    "node_not_found",
                    node=self.node_name,
                    note="programming without node addresses until the Node appears",
                )
            tasks.create_task(self.runner.run(), name="runner")


def _trigger_time(obj: dict[str, object]) -> float | None:
    """The EndpointSlice's last-change-trigger-time annotation, as a Unix time."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return None
    annotations = meta.get("annotations")
    if not isinstance(annotations, dict):
        return None
    value = annotations.get("endpoints.kubernetes.io/last-change-trigger-time")
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
