"""The background loop the relay and the reconciler run on."""

from __future__ import annotations

import asyncio

from shop.platform.worker import LeasedLoop


async def test_a_wake_runs_the_step_at_once_and_more_work_runs_it_again() -> None:
    runs: list[float] = []
    backlog = 3

    async def step() -> bool:
        nonlocal backlog
        runs.append(asyncio.get_running_loop().time())
        backlog = max(backlog - 1, 0)
        return backlog > 0

    async with LeasedLoop(step, name="t", lease=None, interval_s=60) as loop:
        await asyncio.sleep(0.05)
        assert len(runs) == 3, "a step reporting more work is run again without waiting"
        loop.wake()
        await asyncio.sleep(0.05)
    assert len(runs) == 4


async def test_stopping_lets_the_step_in_hand_finish() -> None:
    finished: list[bool] = []
    started = asyncio.Event()

    async def slow_step() -> bool:
        started.set()
        await asyncio.sleep(0.2)
        finished.append(True)
        return False

    loop = LeasedLoop(slow_step, name="t", lease=None, interval_s=60)
    loop.start()
    await started.wait()
    await loop.stop()
    assert finished == [True] and loop.stopping


async def test_a_step_that_hangs_is_cancelled_after_the_grace() -> None:
    async def stuck() -> bool:
        await asyncio.sleep(3600)
        return False

    loop = LeasedLoop(stuck, name="t", lease=None, interval_s=60)
    loop.start()
    await asyncio.sleep(0.01)
    began = asyncio.get_running_loop().time()
    await loop.stop(grace_s=0.1)
    assert asyncio.get_running_loop().time() - began < 1


async def test_a_failing_step_is_retried_not_fatal() -> None:
    calls = 0

    async def flaky() -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("database blinked")
        return False

    async with LeasedLoop(flaky, name="t", lease=None, interval_s=0.01):
        await asyncio.sleep(0.1)
    assert calls >= 2
