"""When to sync: a bounded-frequency runner.

Event handlers call :meth:`Runner.request`; the runner decides when the sync function
actually runs:

* never more often than ``min_interval`` (event storms coalesce into one sync);
* at least every ``full_interval`` a full sync, which repairs drift in the kernel;
* after a failure, retry with exponential backoff (capped), and the retry is full.
  The backoff holds every kind of sync back: a periodic full sync that comes due, or
  new requests arriving meanwhile, wait for the retry time too (otherwise a failing
  sync would be retried as fast as events arrive, or at once when the periodic full
  sync is overdue because the last full one failed).

The sync function receives ``full: bool`` and raises on failure. Time comes from an
injectable clock and wait, so tests drive it without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

log = structlog.get_logger("kpy.runner")


@dataclass(frozen=True, slots=True, kw_only=True)
class RunnerTimes:
    min_interval: float = 1.0
    full_interval: float = 300.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0


Waiter = Callable[[asyncio.Event, "float | None"], Awaitable[None]]
"""Wait until the event is set or ``seconds`` have passed (None: no limit)."""


async def wait_event(event: asyncio.Event, seconds: float | None) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


class Runner:
    def __init__(
        self,
        sync: Callable[[bool], Awaitable[None]],
        times: RunnerTimes | None = None,
        clock: Callable[[], float] = time.monotonic,
        wait: Waiter = wait_event,
    ) -> None:
        self._sync = sync
        self._times = times or RunnerTimes()
        self._clock = clock
        self._wait = wait
        self._wake = asyncio.Event()
        self._pending = True  # the first sync always runs
        self._full_pending = True
        self._last_start = float("-inf")
        self._last_full = float("-inf")
        self._failures = 0
        self._retry_at = float("-inf")
        self.syncs = 0

    def request(self, full: bool = False) -> None:
        """Mark work pending; cheap, never blocks, safe from any handler."""
        self._pending = True
        self._full_pending = self._full_pending or full
        self._wake.set()

    @property
    def failures(self) -> int:
        return self._failures

    @property
    def retry_at(self) -> float:
        """Clock time before which no sync runs (-inf when the last sync succeeded)."""
        return self._retry_at

    def _next_due(self, now: float) -> float:
        """The earliest time the next sync may run (inf: nothing to do)."""
        due = self._last_full + self._times.full_interval
        if self._pending:
            due = min(due, self._last_start + self._times.min_interval)
        # After a failure nothing runs before the retry time: not a request, and not the
        # periodic full sync (overdue, since the failed full sync did not move it on).
        return max(due, self._retry_at)

    async def run(self) -> None:
        """Run until cancelled."""
        while True:
            now = self._clock()
            due = self._next_due(now)
            if due > now:
                self._wake.clear()
                timeout = None if due == float("inf") else due - now
                await self._wait(self._wake, timeout)
                continue
            full = self._full_pending or now >= self._last_full + self._times.full_interval
            self._pending = False
            self._full_pending = False
            self._last_start = now
            try:
                await self._sync(full)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failures += 1
                delay = min(
                    self._times.backoff_initial * 2 ** (self._failures - 1), self._times.backoff_max
                )
                self._retry_at = self._clock() + delay
                self._pending = True
                self._full_pending = True
                log.warning(
                    "sync_failed",
                    error=str(exc),
                    error_type=type(exc).__name__,
                    failures=self._failures,
                    retry_in_s=round(delay, 3),
                )
                continue
            self.syncs += 1
            self._failures = 0
            self._retry_at = float("-inf")
            if full:
                self._last_full = now
