"""The health server: ``/healthz``, ``/livez``, ``/readyz``.

Kubelet probes, cloud load balancers and operators ask a node agent whether it is
doing its job. The answers follow kube-proxy's, so probes written for it keep working:

* ``/livez``: 503 when changes have been pending longer than ``timeout`` and no sync
  has succeeded within ``timeout`` either — the sync loop is stuck or every apply
  fails. Otherwise 200. (kube-proxy: 2 * syncPeriod.)
* ``/healthz``: ``/livez`` and, as kube-proxy since 1.28, the node must be eligible to
  receive load-balancer traffic (``nodeEligible``; a node being deleted is not).
* ``/readyz``: 200 once the first full sync has succeeded, 503 before.

The body is JSON: ``lastUpdated`` and ``currentTime`` (RFC 3339, as kube-proxy),
``nodeEligible``, and kpy's own ``stale`` / ``sourceConnected``: "stale" means the
source (the API server) has been unreachable longer than ``stale_after``. Stale alone
does **not** turn the answer to 503: the programmed rules are still right for the last
known state and keep serving, exactly as kube-proxy keeps serving through an API outage.
A 503 there would pull every node out of every load balancer at once because the
control plane is down — a cluster-wide outage made out of a control-plane one — and
restarting the agent (what a failed liveness probe does) cannot bring the API back.

The body says nothing an outsider could use: anyone who reaches the port (it must be
reachable by load balancers' health checks) reads it, so the API server's address and
error texts stay in the logs (``source_disconnected``) and metrics, not here.

The HTTP layer under it is :mod:`kpy.agent.http`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kpy.agent.agent import AgentStatus
from kpy.agent.http import Response, serve_forever


def _rfc3339(t: float | None) -> str:
    if t is None:
        return ""
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


class HealthServer:
    """Answers ``/healthz``, ``/livez`` and ``/readyz`` from an :class:`AgentStatus`.

    ``timeout``: how long changes may stay pending without a successful sync.
    ``stale_after``: how long the source may be disconnected before the body says stale.
    ``node_eligible``: whether this node should receive load-balancer traffic.
    """

    def __init__(
        self,
        status: AgentStatus,
        *,
        timeout: float,
        stale_after: float,
        node_eligible: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.time,
        on_answer: Callable[[str, int], None] | None = None,
    ) -> None:
        self.status = status
        self.timeout = timeout
        self.stale_after = stale_after
        self.node_eligible = node_eligible
        self.clock = clock
        self.on_answer = on_answer
        self._disconnected_since: float | None = None

    def note_source(self) -> None:
        """Record when the source went away; called periodically and on every request."""
        if self.status.source_healthy:
            self._disconnected_since = None
        elif self._disconnected_since is None:
            self._disconnected_since = self.clock()

    def proxy_healthy(self, now: float) -> bool:
        """kube-proxy's rule: pending for longer than ``timeout`` and no recent success."""
        pending = self.status.pending_since
        if pending is None or now - pending <= self.timeout:
            return True
        last_ok = self.status.last_sync_ok
        return last_ok is not None and now - last_ok <= self.timeout

    def body(self, now: float) -> dict[str, Any]:
        self.note_source()
        since = self._disconnected_since
        disconnected = 0.0 if since is None else now - since
        return {
            "lastUpdated": _rfc3339(self.status.last_sync_ok),
            "currentTime": _rfc3339(now),
            "nodeEligible": self.node_eligible(),
            "pendingSince": _rfc3339(self.status.pending_since) or None,
            "sourceConnected": self.status.source_healthy,
            "stale": since is not None and disconnected > self.stale_after,
            "disconnectedSeconds": round(disconnected, 3),
            "firstFullSyncDone": self.status.first_full_sync_done,
        }

    def answer(self, method: str, path: str) -> Response:
        now = self.clock()
        path = path.rstrip("/") or "/"
        if path == "/livez":
            code = 200 if self.proxy_healthy(now) else 503
        elif path == "/healthz":
            code = 200 if self.proxy_healthy(now) and self.node_eligible() else 503
        elif path == "/readyz":
            code = 200 if self.status.first_full_sync_done else 503
        else:
            return Response.text(404, "not found\n")
        if self.on_answer is not None:
            self.on_answer(path, code)
        return Response.json(code, self.body(now))

    async def watch_source(self, interval: float = 1.0) -> None:
        """Track the source's disconnection time between requests, until cancelled."""
        while True:
            self.note_source()
            await asyncio.sleep(interval)

    async def serve(self, address: str, *, bound: Callable[[int], None] | None = None) -> None:
        """Serve on ``address`` until cancelled (the health server stays in the root netns,
        where kubelet probes it)."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.watch_source())
            tasks.create_task(serve_forever("healthz", self.answer, address, bound=bound))


__all__ = ["HealthServer"]
