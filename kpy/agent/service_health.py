"""healthCheckNodePort servers: cloud load balancers ask every node "do you have endpoints?".

For a Service with ``externalTrafficPolicy: Local`` the API allocates a
``healthCheckNodePort``; the load balancer probes ``http://<node>:<port>/`` and sends
traffic only to nodes answering 200. As kube-proxy, each node answers 200 with
``{"service": {"namespace", "name"}, "localEndpoints": N, "serviceProxyHealthy": true}``
when it has N > 0 *ready* local endpoints, and 503 otherwise — including when only
terminating endpoints are left, so the load balancer drains the node while those still
finish their connections.

:class:`HealthCheckServers` is a ``SyncObserver``: ``plan_applied`` looks only at the
Plan's changed and removed ports (everything on a full sync), updates the counts the
handlers read (so answers flip at once), and wakes a task that opens and closes the
listening sockets. Sockets are created inside ``BackendConfig.netns`` when set.

``localEndpoints`` counts distinct ready local endpoint addresses across the
Service's ports (kube-proxy sums over ports, so a pod serving two ports counts twice
there; only 200 versus 503 matters to load balancers).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from kpy.agent.http import Response, start_http
from kpy.core.backend import ApplyResult
from kpy.core.model import IPAddress, Plan, ServiceName, ServicePortName, ServicePortState
from kpy.kernel import netns as netns_socket

log = structlog.get_logger("kpy.healthcheck")


@dataclass(frozen=True, slots=True, kw_only=True)
class _PortHealth:
    """One service port's contribution to its Service's health check."""

    node_port: int
    service: ServiceName
    ready_local: frozenset[IPAddress]


def _health_of(state: ServicePortState) -> _PortHealth | None:
    svc = state.service
    if not svc.external_policy_local or svc.health_check_node_port is None or not svc.has_vip:
        return None
    return _PortHealth(
        node_port=svc.health_check_node_port,
        service=svc.name.service,
        ready_local=frozenset(ep.ip for ep in state.local if ep.ready),
    )


class HealthCheckServers:
    """Keeps one HTTP server per healthCheckNodePort, as the Plans say."""

    def __init__(
        self,
        *,
        netns: str | None = None,
        host: str = "",
        proxy_healthy: Callable[[], bool] = lambda: True,
        retry_after: float = 5.0,
    ) -> None:
        self.netns = netns
        self.host = host
        self.proxy_healthy = proxy_healthy
        self.retry_after = retry_after
        self._ports: dict[ServicePortName, _PortHealth] = {}
        self._by_node_port: dict[int, dict[ServicePortName, _PortHealth]] = {}
        self._servers: dict[int, asyncio.Server] = {}
        self._wake = asyncio.Event()
        self._reconciled = asyncio.Event()
        self._generation = 0  # bumped by every Plan that changes what is wanted
        self._done = 0  # the generation the last finished reconcile started from

    # ----------------------------------------------------------- SyncObserver

    def plan_applied(self, plan: Plan, result: ApplyResult, seconds: float) -> None:
        if plan.full_sync:
            keys: set[ServicePortName] = set(self._ports) | set(plan.services)
        else:
            keys = set(plan.changed) | set(plan.removed)
        touched = False
        for key in keys:
            state = plan.services.get(key)
            health = _health_of(state) if state is not None else None
            old = self._ports.get(key)
            if health == old:
                continue
            touched = True
            if old is not None:
                group = self._by_node_port[old.node_port]
                del group[key]
                if not group:
                    del self._by_node_port[old.node_port]
                del self._ports[key]
            if health is not None:
                self._ports[key] = health
                self._by_node_port.setdefault(health.node_port, {})[key] = health
        if touched:
            self._generation += 1
            self._wake.set()

    def sync_failed(self, plan: Plan, error: Exception, seconds: float) -> None:
        return None  # the last programmed state keeps being reported

    # ----------------------------------------------------------- answers

    def wanted(self) -> dict[int, ServiceName]:
        """Health-check node ports that should be served, and for which Service."""
        return {
            port: next(iter(group.values())).service for port, group in self._by_node_port.items()
        }

    def serving(self) -> frozenset[int]:
        return frozenset(self._servers)

    def answer_for(self, node_port: int) -> Response:
        group = self._by_node_port.get(node_port)
        if not group:
            return Response.text(404, "no service uses this health check port\n")
        first = next(iter(group.values()))
        local: set[IPAddress] = set()
        for health in group.values():
            local |= health.ready_local
        healthy = self.proxy_healthy()
        code = 200 if local and healthy else 503
        return Response.json(
            code,
            {
                "service": {"namespace": first.service.namespace, "name": first.service.name},
                "localEndpoints": len(local),
                "serviceProxyHealthy": healthy,
            },
        )

    # ----------------------------------------------------------- servers

    async def _open(self, node_port: int) -> None:
        sock = await netns_socket.listen(self.netns, self.host, node_port)
        server = await start_http(lambda method, path: self.answer_for(node_port), sock)
        self._servers[node_port] = server
        log.info("health_check_serving", node_port=node_port, netns=self.netns)

    async def _close(self, node_port: int) -> None:
        server = self._servers.pop(node_port)
        server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await server.wait_closed()
        log.info("health_check_stopped", node_port=node_port)

    async def reconcile(self) -> bool:
        """Open and close servers to match the Plans; True when every wanted port is served."""
        generation = self._generation
        wanted = set(self._by_node_port)
        for port in sorted(set(self._servers) - wanted):
            await self._close(port)
        complete = True
        for port in sorted(wanted - set(self._servers)):
            try:
                await self._open(port)
            except OSError as exc:
                complete = False
                log.warning(
                    "health_check_bind_failed",
                    node_port=port,
                    error=str(exc),
                    retry_in_s=self.retry_after,
                )
        self._done = generation
        self._reconciled.set()
        return complete

    async def run(self) -> None:
        """Serve until cancelled; closes every server on the way out."""
        try:
            while True:
                self._wake.clear()
                complete = await self.reconcile()
                timeout = None if complete else self.retry_after
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
        finally:
            for port in list(self._servers):
                self._servers.pop(port).close()

    async def settled(self) -> None:
        """Wait until a reconcile pass has started after the latest change and finished."""
        while self._done < self._generation:
            self._reconciled.clear()
            await self._reconciled.wait()


__all__ = ["HealthCheckServers"]
