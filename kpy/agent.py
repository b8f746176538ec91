"""The agent: source → convert → tracker → runner → backend, under one TaskGroup.

Handlers convert and record (and log what they skip); the runner decides when to
sync; a sync checks out a Plan and applies it in one backend transaction. A failed
apply makes the next sync a full one (the tracker is told), and nothing is recorded as
programmed until the backend says it is. Nothing is programmed before the source has
listed everything once, and nothing is removed because the source lost its upstream.

Status for health checks and metrics is exposed through :class:`AgentStatus` and the
optional :class:`SyncObserver` hooks, so the operational servers stay outside this file.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import structlog

from kpy import convert
from kpy.backend import ApplyResult, Backend
from kpy.model import NodeInfo, Plan, ServiceName
from kpy.runner import Runner, RunnerTimes
from kpy.sources import Event, EventType, Kind, Source
from kpy.tracker import Tracker

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
        if node_override is not None:
            self.tracker.set_node(node_override(NodeInfo(name=node_name)))

    # ----------------------------------------------------------------- Sink

    def event(self, event: Event) -> None:
        try:
            self._handle(event)
        except Exception as exc:  # a handler never takes the agent down
            log.error(
                "event_failed",
                kind=str(event.kind),
                namespace=event.namespace,
                name=event.name,
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
            if event.type is EventType.DELETE or convert.is_other_proxys(event.obj):
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
        plan = self.tracker.checkout()
        started = time.perf_counter()
        self.status.last_sync_attempt = time.time()
        try:
            result = await self.backend.apply(plan)
        except Exception as exc:
            seconds = time.perf_counter() - started
            self.status.sync_failures += 1
            # Everything in this plan must be re-sent: make the next checkout full.
            self.tracker.request_full_sync()
            for o in self.observers:
                o.sync_failed(plan, exc, seconds)
            raise
        seconds = time.perf_counter() - started
        self.status.last_sync_ok = time.time()
        self.status.last_result = result
        self.status.pending_since = None if not self.tracker.pending else self.status.pending_since
        if plan.full_sync:
            self.status.first_full_sync_done = True
        self.status.services = len(plan.services)
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
