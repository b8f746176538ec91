"""The runner: coalesces requests, retries with backoff that holds every sync back, and the
retry is full."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

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


def _run_until(runner: Runner, done: asyncio.Event) -> None:
    async def main() -> None:
        task = asyncio.create_task(runner.run())
        await done.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_requests_coalesce_and_failures_retry_full() -> None:
    fake = FakeTime()
    calls: list[tuple[float, bool]] = []
    done = asyncio.Event()
    runner: Runner

    async def sync(full: bool) -> None:
        calls.append((fake.now, full))
        if len(calls) <= 2:
            raise RuntimeError("apply failed")  # the first sync (full) fails twice
        if len(calls) == 3:
            for _ in range(100):
                runner.request()  # a storm of requests while a sync runs...
            return
        done.set()

    times = RunnerTimes(
        min_interval=0.05, full_interval=3600, backoff_initial=0.01, backoff_max=0.02
    )
    runner = Runner(sync, times, clock=fake.clock, wait=fake.wait)
    _run_until(runner, done)
    assert [full for _, full in calls] == [True, True, True, False]  # ...is one partial sync
    starts = [t for t, _ in calls]
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(starts)]
    assert gaps == [0.01, 0.02, 0.05]  # backoff 0.01, doubled, then min_interval
    assert runner.failures == 0 and runner.syncs == 2


def test_periodic_full_sync() -> None:
    fake = FakeTime()
    calls: list[tuple[float, bool]] = []
    done = asyncio.Event()

    async def sync(full: bool) -> None:
        calls.append((fake.now, full))
        if len(calls) == 3:
            done.set()

    runner = Runner(
        sync, RunnerTimes(min_interval=0.0, full_interval=0.05), clock=fake.clock, wait=fake.wait
    )
    _run_until(runner, done)
    assert all(full for _, full in calls)
    starts = [t for t, _ in calls]
    assert [round(b - a, 6) for a, b in itertools.pairwise(starts)] == [0.05, 0.05]


def _failing_runner(
    times: RunnerTimes, fake: FakeTime, calls: list[tuple[float, bool]], stop_after: int
) -> tuple[Runner, asyncio.Event]:
    done = asyncio.Event()
    runner: Runner

    async def sync(full: bool) -> None:
        calls.append((fake.now, full))
        # Work keeps arriving while the sync fails: requests must not shorten the backoff.
        runner.request()
        runner.request(full=False)
        if len(calls) >= stop_after:
            done.set()
        raise RuntimeError("nft: transaction refused")

    runner = Runner(sync, times, clock=fake.clock, wait=fake.wait)
    return runner, done


def test_backoff_holds_back_requests_and_the_overdue_periodic_full_sync() -> None:
    fake = FakeTime()
    calls: list[tuple[float, bool]] = []
    # A short full period: after the first failed full sync the periodic one is always
    # overdue — it must still wait for the retry time.
    times = RunnerTimes(min_interval=0.5, full_interval=2.0, backoff_initial=1.0, backoff_max=8.0)
    runner, done = _failing_runner(times, fake, calls, stop_after=8)
    _run_until(runner, done)
    gaps = [round(b[0] - a[0], 6) for a, b in itertools.pairwise(calls)]
    assert gaps == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    assert all(full for _, full in calls)  # every retry is a full sync
    assert runner.failures == 8
    assert runner.retry_at == calls[-1][0] + 8.0


def test_backoff_ends_with_the_first_success() -> None:
    fake = FakeTime()
    calls: list[tuple[float, bool]] = []
    done = asyncio.Event()
    runner: Runner

    async def sync(full: bool) -> None:
        calls.append((fake.now, full))
        if len(calls) <= 3:
            raise RuntimeError("refused")
        if len(calls) == 4:
            runner.request()  # new work right after the recovery: no backoff any more
            return
        done.set()

    times = RunnerTimes(
        min_interval=0.25, full_interval=3600.0, backoff_initial=1.0, backoff_max=60.0
    )
    runner = Runner(sync, times, clock=fake.clock, wait=fake.wait)
    _run_until(runner, done)
    gaps = [round(b[0] - a[0], 6) for a, b in itertools.pairwise(calls)]
    assert gaps == [1.0, 2.0, 4.0, 0.25]
    assert [full for _, full in calls] == [True, True, True, True, False]
    assert runner.failures == 0 and runner.retry_at == float("-inf")
