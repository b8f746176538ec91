"""Kubernetes Events on this node's Node object: start-up and sync failures, rate-limited.

``kubectl describe node`` is where an operator looks first; kube-proxy records a
``Starting`` event there, and kpy also records sync failures (and the recovery after
them) so a broken node is visible without reading its logs.

Events are posted as core/v1 ``Event`` objects (involvedObject kind Node, in the
``default`` namespace, where events of cluster-scoped objects live) through an
injected *poster* — with ``--source kube`` the kube source's API client, otherwise
nothing is posted. Recording never blocks and never fails: events go into a small
bounded queue; a task posts them; a failed post is logged and forgotten.

Rate limits, so a sync failing every second cannot flood the API server: the same
(reason, message) at most once per ``repeat_interval`` (suppressed repeats are counted
into the next one's ``count``), and a token bucket over all events (``burst`` at once,
then one per ``refill_seconds``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from kpy.core.backend import ApplyResult
from kpy.core.model import Plan

log = structlog.get_logger("kpy.events")

EventPoster = Callable[[str, Mapping[str, Any]], Awaitable[object]]  # (API path, body)
EVENTS_NAMESPACE = "default"
EVENTS_PATH = f"/api/v1/namespaces/{EVENTS_NAMESPACE}/events"
COMPONENT = "kpy"


class EventType:
    NORMAL = "Normal"
    WARNING = "Warning"


@dataclass(frozen=True, slots=True, kw_only=True)
class _Pending:
    type: str
    reason: str
    message: str
    count: int
    first: float
    last: float


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_body(
    *,
    node: str,
    type: str,
    reason: str,
    message: str,
    count: int,
    first: float,
    last: float,
    instance: str,
) -> dict[str, Any]:
    """A core/v1 Event about the Node ``node``."""
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{node}.", "namespace": EVENTS_NAMESPACE},
        # kube-proxy uses the node name as the UID: the agent need not read the Node.
        "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": node, "uid": node},
        "type": type,
        "reason": reason,
        "message": message,
        "count": count,
        "firstTimestamp": _rfc3339(first),
        "lastTimestamp": _rfc3339(last),
        "source": {"component": COMPONENT, "host": node},
        "reportingComponent": COMPONENT,
        "reportingInstance": instance,
    }


class EventRecorder:
    """Records Events about one Node; ``run()`` posts them until cancelled."""

    def __init__(
        self,
        node: str,
        poster: EventPoster | None,
        *,
        repeat_interval: float = 300.0,
        burst: int = 10,
        refill_seconds: float = 30.0,
        queue_size: int = 64,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node = node
        self.poster = poster
        self.repeat_interval = repeat_interval
        self.burst = burst
        self.refill_seconds = refill_seconds
        self.clock = clock
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(queue_size)
        self._last_sent: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], _Pending] = {}
        self._tokens = float(burst)
        self._tokens_at: float | None = None
        self.posted = 0
        self.dropped = 0
        self.failed = 0

    def _take_token(self, now: float) -> bool:
        if self._tokens_at is not None:
            self._tokens = min(
                float(self.burst), self._tokens + (now - self._tokens_at) / self.refill_seconds
            )
        self._tokens_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def record(self, type: str, reason: str, message: str) -> bool:
        """Queue an event; False when it was rate-limited (or there is no poster)."""
        if self.poster is None:
            return False
        now = self.clock()
        self._forget_old(now)
        key = (reason, message)
        held = self._suppressed.get(key)
        count = 1 if held is None else held.count + 1
        first = now if held is None else held.first
        last_sent = self._last_sent.get(key)
        if (last_sent is not None and now - last_sent < self.repeat_interval) or (
            not self._take_token(now)
        ):
            self._suppressed[key] = _Pending(
                type=type, reason=reason, message=message, count=count, first=first, last=now
            )
            self.dropped += 1
            return False
        body = event_body(
            node=self.node,
            type=type,
            reason=reason,
            message=message,
            count=count,
            first=first,
            last=now,
            instance=self.node,
        )
        try:
            self._queue.put_nowait(body)
        except asyncio.QueueFull:
            self.dropped += 1
            return False
        self._suppressed.pop(key, None)
        self._last_sent[key] = now
        return True

    def _forget_old(self, now: float, limit: int = 256) -> None:
        """Keep the per-message memory bounded: forget keys past their repeat interval."""
        if len(self._last_sent) > limit:
            self._last_sent = {
                k: t for k, t in self._last_sent.items() if now - t < self.repeat_interval
            }
        if len(self._suppressed) > limit:
            newest = sorted(self._suppressed.items(), key=lambda kv: kv[1].last)[-limit:]
            self._suppressed = dict(newest)

    def starting(self, backend: str) -> bool:
        return self.record(EventType.NORMAL, "Starting", f"Starting kpy with backend {backend}.")

    async def run(self) -> None:
        """Post queued events until cancelled."""
        if self.poster is None:
            await asyncio.Event().wait()  # nothing will ever be posted
        assert self.poster is not None
        while True:
            body = await self._queue.get()
            try:
                await self.poster(EVENTS_PATH, body)
                self.posted += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # events are best effort: log, never retry
                self.failed += 1
                log.warning(
                    "event_post_failed",
                    reason=body["reason"],
                    error=str(exc),
                    error_type=type(exc).__name__,
                )
            finally:
                self._queue.task_done()

    async def flush(self) -> None:
        """Wait until every queued event has been posted (or failed)."""
        await self._queue.join()


class SyncEvents:
    """A ``SyncObserver`` turning sync failures (and the recovery after them) into Events."""

    def __init__(self, recorder: EventRecorder, backend: str) -> None:
        self.recorder = recorder
        self.backend = backend
        self._failing = False
        self._refused: frozenset[str] = frozenset()
        self._conflicts: frozenset[str] = frozenset()

    def plan_applied(self, plan: Plan, result: ApplyResult, seconds: float) -> None:
        if self._failing:
            self._failing = False
            self.recorder.record(
                EventType.NORMAL,
                "SyncRecovered",
                f"Backend {self.backend} programmed the rules again (full sync).",
            )
        if plan.refused or self._refused:
            refused = frozenset(str(n) for n in plan.refused)
            for name in sorted(refused - self._refused):
                self.recorder.record(
                    EventType.WARNING,
                    "ServicePortRefused",
                    f"Backend {self.backend} refused the rules of {name}; "
                    "its last programmed state is kept, every other Service is served.",
                )
            self._refused = refused
        if plan.conflicts or self._conflicts:
            conflicts = frozenset(
                f"{name}: {c.frontend} held by {c.held_by}"
                for name, cs in plan.conflicts.items()
                for c in cs
            )
            for text in sorted(conflicts - self._conflicts):
                self.recorder.record(
                    EventType.WARNING,
                    "FrontendConflict",
                    f"Frontend not served for {text} (the allocated address wins).",
                )
            self._conflicts = conflicts

    def sync_failed(self, plan: Plan, error: Exception, seconds: float) -> None:
        self._failing = True
        self.recorder.record(
            EventType.WARNING,
            "SyncFailed",
            f"Backend {self.backend} failed to apply: {type(error).__name__}: {error}",
        )


__all__ = ["EVENTS_PATH", "EventPoster", "EventRecorder", "EventType", "SyncEvents", "event_body"]
