"""Everything an operator talks to besides the rules, started and stopped in one place.

:func:`attach` builds the health server, the metrics, the healthCheckNodePort servers,
the conntrack cleaner and the event recorder for one agent and adds their observers
to it; :meth:`Operations.run` runs their tasks under one TaskGroup until cancelled.
``kpy run`` makes one call::

    ops = operations.attach(agent, config, poster=...)
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(ops.run(), name="operations")
        await agent.run()

Attaching happens before ``agent.run()`` so no sync is missed by an observer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from kpy.agent import healthz as health
from kpy.agent import http
from kpy.agent.agent import Agent, SyncObserver
from kpy.agent.config import AgentConfig
from kpy.agent.conntrack import ConntrackCleaner
from kpy.agent.events import EventPoster, EventRecorder, SyncEvents
from kpy.agent.metrics import Metrics
from kpy.agent.service_health import HealthCheckServers

log = structlog.get_logger("kpy.operations")


@dataclass
class Operations:
    """The operational parts of one agent. Build with :func:`attach`."""

    agent: Agent
    config: AgentConfig
    health: health.HealthServer
    metrics: Metrics
    health_checks: HealthCheckServers
    conntrack: ConntrackCleaner
    events: EventRecorder
    ports: dict[str, int] = field(default_factory=dict)  # server name → bound port
    _bound: asyncio.Event = field(default_factory=asyncio.Event)

    def _note(self, name: str) -> Callable[[int], None]:
        def bound(port: int) -> None:
            self.ports[name] = port
            if {"healthz", "metrics"} <= self.ports.keys():
                self._bound.set()

        return bound

    async def listening(self) -> dict[str, int]:
        """Wait until the health and metrics servers listen; their ports."""
        await self._bound.wait()
        return dict(self.ports)

    async def run(self) -> None:
        """Serve until cancelled; every server is closed on the way out."""
        self.events.starting(self.agent.backend.name)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(
                self.health.serve(self.config.healthz_bind_address, bound=self._note("healthz")),
                name="healthz",
            )
            tasks.create_task(
                http.serve_forever(
                    "metrics",
                    self.metrics.answer,
                    self.config.metrics_bind_address,
                    bound=self._note("metrics"),
                ),
                name="metrics",
            )
            tasks.create_task(self.health_checks.run(), name="health_check_node_ports")
            tasks.create_task(self.conntrack.run(), name="conntrack")
            tasks.create_task(self.events.run(), name="events")


def health_timeout(config: AgentConfig) -> float:
    """How long changes may stay pending: kube-proxy's 2 * syncPeriod."""
    return 2 * config.sync_period


def attach(
    agent: Agent,
    config: AgentConfig,
    *,
    poster: EventPoster | None = None,
    node_eligible: Callable[[], bool] = lambda: True,
) -> Operations:
    """Build the operational parts for ``agent`` and add their observers to it."""
    metrics = Metrics(agent)
    status = health.HealthServer(
        agent.status,
        timeout=health_timeout(config),
        stale_after=config.healthz_stale_after,
        node_eligible=node_eligible,
        on_answer=metrics.health_answered,
    )
    netns = config.netns or None
    checks = HealthCheckServers(
        netns=netns, proxy_healthy=lambda: status.proxy_healthy(status.clock())
    )
    cleaner = ConntrackCleaner(
        netns=netns, enabled=config.conntrack_cleanup, on_done=metrics.conntrack_cleaned
    )
    recorder = EventRecorder(agent.node_name, poster)
    observers: tuple[SyncObserver, ...] = (
        metrics,
        checks,
        cleaner,
        SyncEvents(recorder, agent.backend.name),
    )
    agent.observers = (*agent.observers, *observers)
    source_metrics = getattr(agent.source, "set_metrics", None)
    if callable(source_metrics):
        source_metrics(metrics)  # the kube source reports reconnects and relists here
    return Operations(
        agent=agent,
        config=config,
        health=status,
        metrics=metrics,
        health_checks=checks,
        conntrack=cleaner,
        events=recorder,
    )


async def serve(agent: Agent, config: AgentConfig, *, poster: EventPoster | None = None) -> None:
    """Attach and run until cancelled (attaches at the first step of the task)."""
    await attach(agent, config, poster=poster).run()


__all__ = ["Operations", "attach", "health_timeout", "serve"]
