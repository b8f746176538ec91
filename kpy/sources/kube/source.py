"""The kube source: one reflector per resource, ``synced()`` once each has listed."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping
from typing import Any

import structlog

from kpy.sources import Event, EventType, Kind, Sink, SourceMetrics
from kpy.sources.kube.api import (
    ENDPOINT_SLICES_PATH,
    IGNORED_LABEL_SELECTOR,
    JSON,
    NODES_PATH,
    SERVICE_CIDRS_PATH,
    SERVICES_PATH,
    ApiStatusError,
)
from kpy.sources.kube.backoff import BackoffPolicy
from kpy.sources.kube.config import ApiTarget, load_target
from kpy.sources.kube.http import ConnectionPool, request
from kpy.sources.kube.reflector import Reflector, Timeouts

log = structlog.get_logger("kpy.sources.kube")


class KubeSource:
    """The ``kube`` source: four reflectors, one sync gate, one connection state."""

    def __init__(
        self,
        target: ApiTarget,
        node_name: str,
        *,
        backoff: BackoffPolicy | None = None,
        timeouts: Timeouts | None = None,
        node_grace: float = 30.0,
        node_log_interval: float = 60.0,
        page_size: int = 500,
        metrics: SourceMetrics | None = None,
    ) -> None:
        self.target = target
        self.page_size = page_size  # list in pages of this many objects (0: all at once)
        self.metrics = metrics
        self.node_name = node_name
        self.backoff = backoff or BackoffPolicy()
        self.timeouts = timeouts or Timeouts()
        self.node_grace = node_grace
        self.node_log_interval = node_log_interval
        self.services = Reflector(
            self, Kind.SERVICE, SERVICES_PATH, label_selector=IGNORED_LABEL_SELECTOR
        )
        self.endpoint_slices = Reflector(
            self, Kind.ENDPOINT_SLICE, ENDPOINT_SLICES_PATH, label_selector=IGNORED_LABEL_SELECTOR
        )
        self.node = Reflector(
            self, Kind.NODE, NODES_PATH, field_selector=f"metadata.name={node_name}"
        )
        self.service_cidrs = Reflector(self, Kind.SERVICE_CIDR, SERVICE_CIDRS_PATH, optional=True)
        self.reflectors = (self.services, self.endpoint_slices, self.node, self.service_cidrs)
        self.pool = ConnectionPool(max_idle=1)  # for the Events the agent posts
        self.healthy = True
        self.is_synced = False
        self._sink: Sink | None = None
        self._node_seen = asyncio.Event()

    @classmethod
    def from_config(cls, config: Any) -> KubeSource:
        """From the agent's configuration (``kpy.agent.config.AgentConfig``)."""
        target = load_target(kubeconfig=config.kubeconfig, master=config.master)
        # With node IPs given by flags the Node is not needed to program anything.
        grace = 0.0 if config.node_ips else 30.0
        return cls(target, config.node_name(), node_grace=grace)

    def set_metrics(self, metrics: SourceMetrics | None) -> None:
        """Report watch reconnects and relists here (``kpy.agent.observers.attach`` calls it)."""
        self.metrics = metrics

    # -- called by reflectors

    def emit(self, event: Event) -> None:
        if event.kind is Kind.NODE and event.name == self.node_name:
            if event.type is EventType.UPSERT:
                self._node_seen.set()
            else:
                self._node_seen.clear()
                log.error(
                    "node_object_deleted",
                    node=self.node_name,
                    note="keeping the last known node state; watching for it",
                )
        assert self._sink is not None
        self._sink.event(event)

    def report(self, reflector: Reflector, healthy: bool, reason: str = "") -> None:
        reflector.healthy = healthy
        now = all(r.healthy for r in self.reflectors)
        if now != self.healthy:
            self.healthy = now
            assert self._sink is not None
            self._sink.connection(now, "" if now else reason)

    # -- running

    async def run(self, sink: Sink) -> None:
        self._sink = sink
        log.info("kube_source_starting", server=self.target.url, node=self.node_name)
        try:
            async with asyncio.TaskGroup() as tasks:
                for r in self.reflectors:
                    tasks.create_task(r.run(), name=f"reflector-{r.kind}")
                tasks.create_task(self._gate(sink), name="kube-sync-gate")
        finally:
            for pool in (self.pool, *(r.pool for r in self.reflectors)):
                pool.close()

    async def _gate(self, sink: Sink) -> None:
        """Call ``synced()`` once all are listed and the Node exists (or grace ends)."""
        for r in self.reflectors:
            await r.listed.wait()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.node_grace
        while not self._node_seen.is_set():
            remaining = give_up - loop.time()
            log.error(
                "node_object_missing",
                node=self.node_name,
                note="no Node object with this name: check --node / the host name; watching for it",
                programming="waiting" if remaining > 0 else "without node addresses",
            )
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._node_seen.wait(), timeout=min(remaining, self.node_log_interval)
                )
        self.is_synced = True
        sink.synced()
        while True:  # keep saying so while this node has no Node object
            await asyncio.sleep(self.node_log_interval)
            if not self._node_seen.is_set():
                log.error("node_object_missing", node=self.node_name, note="still missing")

    # -- other API calls the agent makes (events)

    async def post(self, path: str, body: Mapping[str, Any]) -> JSON:
        """POST a JSON object (e.g. an Event); raises :class:`ApiStatusError` on failure."""
        return await self._call("POST", path, json.dumps(body).encode(), "application/json")

    async def patch(self, path: str, body: Mapping[str, Any]) -> JSON:
        """Merge-patch an object."""
        return await self._call(
            "PATCH", path, json.dumps(body).encode(), "application/merge-patch+json"
        )

    async def _call(self, method: str, path: str, body: bytes, content_type: str) -> JSON:
        async with asyncio.timeout(self.timeouts.list):
            response = await request(
                self.target,
                method,
                path,
                None,
                body,
                content_type,
                connect_timeout=self.timeouts.connect,
                pool=self.pool,
            )
            try:
                data = await response.body()
            finally:
                response.close()
        if response.status >= 300:
            raise ApiStatusError(response.status, data, response.retry_after)
        result = json.loads(data)
        return result if isinstance(result, dict) else {}
