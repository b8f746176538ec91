"""The runner: coalesces requests, retries with backoff that holds every sync back, and the
retry is full."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable

from kpy.agent.runner import Runner, RunnerTimes


class FakeTime:
    """An injected clock: waiting with a timeout moves time on instead of sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def clock(self) -> float:
        return self.now

    async def wait(self, event: asyncio.Event, seconds: float | None) -> None:
        if event.is_set():
            return
        if seconds is None:
            await event.wait()
            return
        self.now += seconds
        await asyncio.sleep(0)


class Recorded:
    """A Runner on :class:`FakeTime` whose sync records ``(time, full)`` and then runs
    ``step`` with the number of syncs so far (raising to fail the sync); :meth:`run`
    returns once ``done`` is set."""

    def __init__(self, times: RunnerTimes, step: Callable[[int, Recorded], None]) -> None:
        self.fake = FakeTime()
        self.calls: list[tuple[float, bool]] = []
        self.done = asyncio.Event()

        async def sync(full: bool) -> None:
            self.calls.append((self.fake.now, full))
            step(len(self.calls), self)

        self.runner = Runner(sync, times, clock=self.fake.clock, wait=self.fake.wait)

    def run(self) -> None:
        async def main() -> None:
            task = asyncio.create_task(self.runner.run())
            await self.done.wait()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        asyncio.run(main())

    def gaps(self) -> list[float]:
        """The time between one sync's start and the next's."""
        return [round(b[0] - a[0], 6) for a, b in itertools.pairwise(self.calls)]

    def fulls(self) -> list[bool]:
        return [full for _, full in self.calls]


def test_requests_coalesce_and_failures_retry_full() -> None:
    def step(n: int, r: Recorded) -> None:
        if n <= 2:
            raise RuntimeError("apply failed")  # the first sync (full) fails twice
        if n == 3:
            for _ in range(100):
                r.runner.request()  # a storm of requests while a sync runs...
            return
        r.done.set()

    times = RunnerTimes(
        min_interval=0.05, full_interval=3600, backoff_initial=0.01, backoff_max=0.02
    )
    recorded = Recorded(times, step)
    recorded.run()
    assert recorded.fulls() == [True, True, True, False]  # ...is one partial sync
    assert recorded.gaps() == [0.01, 0.02, 0.05]  # backoff 0.01, doubled, then min_interval
    assert recorded.runner.failures == 0 and recorded.runner.syncs == 2


def test_periodic_full_sync() -> None:
    def step(n: int, r: Recorded) -> None:
        if n == 3:
            r.done.set()

    recorded = Recorded(RunnerTimes(min_interval=0.0, full_interval=0.05), step)
    recorded.run()
    assert all(recorded.fulls())
    assert recorded.gaps() == [0.05, 0.05]


def test_backoff_holds_back_requests_and_the_overdue_periodic_full_sync() -> None:
    def step(n: int, r: Recorded) -> None:
        # Work keeps arriving while the sync fails: requests must not shorten the backoff.
        r.runner.request()
        r.runner.request(full=False)
        if n >= 8:
            r.done.set()
        raise RuntimeError("nft: transaction refused")

    # A short full period: after the first failed full sync the periodic one is always
    # overdue — it must still wait for the retry time.
    times = RunnerTimes(min_interval=0.5, full_interval=2.0, backoff_initial=1.0, backoff_max=8.0)
    recorded = Recorded(times, step)
    recorded.run()
    assert recorded.gaps() == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    assert all(recorded.fulls())  # every retry is a full sync
    assert recorded.runner.failures == 8
    assert recorded.runner.retry_at == recorded.calls[-1][0] + 8.0


def test_backoff_ends_with_the_first_success() -> None:
    def step(n: int, r: Recorded) -> None:
        if n <= 3:
            raise RuntimeError("refused")
        if n == 4:
            r.runner.request()  # new work right after the recovery: no backoff any more
            return
        r.done.set()

    times = RunnerTimes(
        min_interval=0.25, full_interval=3600.0, backoff_initial=1.0, backoff_max=60.0
    )
    recorded = Recorded(times, step)
    recorded.run()
    assert recorded.gaps() == [1.0, 2.0, 4.0, 0.25]
    assert recorded.fulls() == [True, True, True, True, False]
    assert recorded.runner.failures == 0 and recorded.runner.retry_at == float("-inf")
