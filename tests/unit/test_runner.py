"""The runner: coalesces requests, retries with backoff, and the retry is full."""

from __future__ import annotations

import asyncio
import contextlib

from kpy.runner import Runner, RunnerTimes


def test_requests_coalesce_and_failures_retry_full() -> None:
    calls: list[bool] = []
    fail = {"left": 2}

    async def sync(full: bool) -> None:
        calls.append(full)
        if fail["left"]:
            fail["left"] -= 1
            raise RuntimeError("apply failed")

    async def main() -> Runner:
        runner = Runner(
            sync,
            RunnerTimes(
                min_interval=0.05, full_interval=3600, backoff_initial=0.01, backoff_max=0.02
            ),
        )
        task = asyncio.create_task(runner.run())
        await asyncio.sleep(0.2)  # first sync (full) fails twice, then succeeds
        for _ in range(100):
            runner.request()  # a storm of requests...
        await asyncio.sleep(0.2)  # ...is one partial sync
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return runner

    runner = asyncio.run(main())
    assert calls[:3] == [True, True, True]
    assert calls[3:] == [False]
    assert runner.failures == 0 and runner.syncs == 2


def test_periodic_full_sync() -> None:
    calls: list[bool] = []

    async def sync(full: bool) -> None:
        calls.append(full)

    async def main() -> None:
        runner = Runner(sync, RunnerTimes(min_interval=0.0, full_interval=0.05))
        task = asyncio.create_task(runner.run())
        await asyncio.sleep(0.28)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert len(calls) >= 2 and all(calls)
