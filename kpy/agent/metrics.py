"""Prometheus metrics for one agent, in its own registry.

Every agent gets a dedicated :class:`prometheus_client.CollectorRegistry` — no global
state, so tests (and a process running several agents) can create as many as they
like. :class:`Metrics` is a :class:`~kpy.agent.agent.SyncObserver` (sync durations, network
programming latency, failures, ops) and a :class:`SourceMetrics` (watch reconnects and
relists, called by a source); gauges that mirror the agent's status (pending changes,
services and endpoints programmed) are read at scrape time, so they cost nothing
between scrapes.

docs/metrics.md maps every metric to its kube-proxy counterpart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from kpy import __version__
from kpy.agent.agent import Agent
from kpy.agent.http import Response
from kpy.core.backend import ApplyResult
from kpy.core.model import Plan
from kpy.sources import SourceMetrics

# kube-proxy's buckets, so dashboards' quantiles mean the same thing.
SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))  # 1 ms … 16 s
NETWORK_PROGRAMMING_BUCKETS = (
    0.25,
    0.5,
    *range(1, 60),
    *range(60, 120, 5),
    *range(120, 330, 30),
)
OPS_BUCKETS = (0, 1, 5, 10, 50, 100, 500, 1000, 5000, 10000, 50000, 100000)


class _StatusCollector(Collector):
    """Gauges read from the agent when scraped."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        status = self._agent.status
        gauges: tuple[tuple[str, str, float], ...] = (
            (
                "kpy_sync_proxy_rules_pending_changes",
                "Services with changes not yet programmed.",
                float(self._agent.tracker.pending_count),
            ),
            (
                "kpy_sync_proxy_rules_last_queued_timestamp_seconds",
                "When the oldest unprogrammed change arrived (0: nothing pending).",
                status.pending_since or 0.0,
            ),
            (
                "kpy_services_programmed",
                "Service ports in the last successful sync.",
                float(status.services),
            ),
            (
                "kpy_endpoints_programmed",
                "Endpoints known for the programmed service ports.",
                float(status.endpoints),
            ),
            (
                "kpy_objects_skipped",
                "Objects skipped as invalid since start (see warnings).",
                float(status.skipped_objects),
            ),
            (
                "kpy_service_ports_refused",
                "Service ports the backend refused, held at their last programmed state.",
                float(status.refused),
            ),
            (
                "kpy_service_port_refusals",
                "Service ports found refused by the backend since start.",
                float(status.refused_total),
            ),
            (
                "kpy_frontend_conflicts",
                "Service ports programmed without a frontend that another port holds.",
                float(status.conflicts),
            ),
            (
                "kpy_source_connected",
                "1 while the source reaches its upstream (API server).",
                1.0 if status.source_healthy else 0.0,
            ),
            (
                "kpy_ready",
                "1 once the first full sync has succeeded.",
                1.0 if status.first_full_sync_done else 0.0,
            ),
        )
        for name, help_text, value in gauges:
            gauge = GaugeMetricFamily(name, help_text)
            gauge.add_metric([], value)
            yield gauge
        readback = getattr(self._agent.backend, "readback_failures", None)
        if isinstance(readback, int):
            failures = CounterMetricFamily(
                "kpy_backend_readback_failures",
                "Full syncs whose read-back of the kernel failed (they wrote without the diff).",
            )
            failures.add_metric([], float(readback))
            yield failures


class Metrics:
    """All of one agent's metrics. Implements ``SyncObserver`` and ``SourceMetrics``."""

    def __init__(
        self,
        agent: Agent | None = None,
        *,
        backend: str = "",
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.backend = backend or (agent.backend.name if agent is not None else "")
        self.clock = clock
        r = self.registry
        self.sync_duration = Histogram(
            "kpy_sync_proxy_rules_duration_seconds",
            "Time one successful sync took to apply, by sync kind (full or partial).",
            ["sync"],
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.network_programming = Histogram(
            "kpy_network_programming_duration_seconds",
            "From an EndpointSlice change (its last-change-trigger-time) to programmed.",
            buckets=NETWORK_PROGRAMMING_BUCKETS,
            registry=r,
        )
        self.last_sync = Gauge(
            "kpy_sync_proxy_rules_last_timestamp_seconds",
            "Unix time of the last successful sync.",
            registry=r,
        )
        self.failures = Counter(
            "kpy_sync_proxy_rules_failures",
            "Syncs whose apply failed (the next one is full).",
            registry=r,
        )
        self.syncs = Counter(
            "kpy_sync_proxy_rules",
            "Successful syncs, by sync kind.",
            ["sync"],
            registry=r,
        )
        self.ops = Histogram(
            "kpy_sync_proxy_rules_ops",
            "Kernel operations sent per successful sync.",
            buckets=OPS_BUCKETS,
            registry=r,
        )
        self.last_ops = Gauge(
            "kpy_sync_proxy_rules_last_ops", "Kernel operations of the last sync.", registry=r
        )
        self.changes = Counter(
            "kpy_sync_proxy_rules_service_changes",
            "Service ports changed or removed by successful syncs.",
            ["change"],
            registry=r,
        )
        self.backend_objects = Gauge(
            "kpy_backend_objects",
            "Backend-defined counts from the last apply (ApplyResult.detail).",
            ["backend", "kind"],
            registry=r,
        )
        self.watch_reconnects = Counter(
            "kpy_source_watch_reconnects",
            "Watches restarted, by resource.",
            ["resource"],
            registry=r,
        )
        self.relists = Counter(
            "kpy_source_relists", "Full lists of a resource, by resource.", ["resource"], registry=r
        )
        self.conntrack_deleted = Counter(
            "kpy_conntrack_flows_deleted",
            "Stale UDP conntrack entries deleted after syncs.",
            registry=r,
        )
        self.conntrack_failures = Counter(
            "kpy_conntrack_cleanup_failures",
            "Conntrack deletions that failed (entries expire on their own).",
            registry=r,
        )
        self.health_answers = Counter(
            "kpy_proxy_healthz",
            "Answers of the health server, by path and HTTP code.",
            ["path", "code"],
            registry=r,
        )
        info = Gauge(
            "kpy_build_info", "kpy's version and backend.", ["version", "backend"], registry=r
        )
        info.labels(version=__version__, backend=self.backend).set(1)
        if agent is not None:
            r.register(_StatusCollector(agent))

    # ----------------------------------------------------------- SyncObserver

    def plan_applied(self, plan: Plan, result: ApplyResult, seconds: float) -> None:
        kind = "full" if plan.full_sync else "partial"
        now = self.clock()
        self.sync_duration.labels(sync=kind).observe(seconds)
        self.syncs.labels(sync=kind).inc()
        self.last_sync.set(now)
        self.ops.observe(result.ops)
        self.last_ops.set(result.ops)
        if plan.changed:
            self.changes.labels(change="changed").inc(len(plan.changed))
        if plan.removed:
            self.changes.labels(change="removed").inc(len(plan.removed))
        for trigger in plan.trigger_times:
            # A trigger time from the future (clock skew) counts as zero, never negative.
            self.network_programming.observe(max(0.0, now - trigger))
        for kind_name, count in result.detail.items():
            self.backend_objects.labels(backend=self.backend, kind=kind_name).set(count)

    def sync_failed(self, plan: Plan, error: Exception, seconds: float) -> None:
        self.failures.inc()

    # ----------------------------------------------------------- SourceMetrics

    def watch_reconnected(self, resource: str) -> None:
        self.watch_reconnects.labels(resource=resource).inc()

    def relisted(self, resource: str) -> None:
        self.relists.labels(resource=resource).inc()

    # ----------------------------------------------------------- others

    def conntrack_cleaned(self, deleted: int, failed: int) -> None:
        self.conntrack_deleted.inc(deleted)
        self.conntrack_failures.inc(failed)

    def health_answered(self, path: str, code: int) -> None:
        self.health_answers.labels(path=path, code=str(code)).inc()

    # ----------------------------------------------------------- exposition

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def answer(self, method: str, path: str) -> Response:
        """The metrics server: ``/metrics``, plus ``/healthz`` and ``/proxyMode`` as kube-proxy."""
        path = path.rstrip("/") or "/"
        if path == "/metrics":
            return Response(status=200, body=self.exposition(), content_type=CONTENT_TYPE_LATEST)
        if path == "/proxyMode":
            return Response.text(200, self.backend)
        if path == "/healthz":
            return Response.text(200, "ok")
        return Response.text(404, "not found\n")


__all__ = ["NETWORK_PROGRAMMING_BUCKETS", "SYNC_BUCKETS", "Metrics", "SourceMetrics"]
