"""The one loop every periodic job runs on: steps, wake-ups, the stop rule, failures."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import text

from shop.platform.db import create_engine
from shop.platform.lease import LEASES_DDL, Lease
from shop.platform.worker import BackgroundJobs, LeasedLoop, Loop, expose_jobs


async def test_a_wake_runs_the_step_at_once_and_more_work_runs_it_again() -> None:
    runs = 0
    backlog = 3
    drained, woken = asyncio.Event(), asyncio.Event()

    async def step() -> bool:
        nonlocal backlog, runs
        runs += 1
        backlog = max(backlog - 1, 0)
        if runs == 3:
            drained.set()
        if runs == 4:
            woken.set()
        return backlog > 0

    async with Loop(step, name="t", interval_s=60) as loop:
        await drained.wait()  # a step reporting more work is run again without waiting
        assert runs == 3
        loop.wake()
        await woken.wait()
    assert runs == 4


async def test_stopping_lets_the_step_in_hand_finish() -> None:
    finished: list[bool] = []
    started, go_on = asyncio.Event(), asyncio.Event()

    async def slow_step() -> bool:
        started.set()
        await go_on.wait()
        finished.append(True)
        return False

    loop = Loop(slow_step, name="t", interval_s=60)
    loop.start()
    await started.wait()
    stopping = asyncio.create_task(loop.stop())
    await asyncio.sleep(0.01)
    assert loop.stopping and not stopping.done(), "stop waits for the step in hand"
    go_on.set()
    await stopping
    assert finished == [True]
    assert not loop.running


async def test_a_step_that_hangs_is_cancelled_after_the_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started = asyncio.Event()
    cancelled: list[bool] = []

    async def stuck() -> bool:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return False

    loop = Loop(stuck, name="stuck-job", interval_s=60)
    loop.start()
    await started.wait()
    began = asyncio.get_running_loop().time()
    await loop.stop(grace_s=0.05)
    assert cancelled == [True]
    assert asyncio.get_running_loop().time() - began < 1
    assert "stuck-job" in caplog.text


async def test_a_failing_step_is_logged_counted_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    jobs = BackgroundJobs()
    calls = 0
    recovered = asyncio.Event()

    async def flaky() -> bool:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError("database blinked")
        recovered.set()
        return False

    async with Loop(flaky, name="nightly-purge", interval_s=60, backoff_s=0.001, jobs=jobs):
        await recovered.wait()
    assert calls == 3
    assert jobs.failures["nightly-purge"] == 2
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 2
    assert all("nightly-purge" in r.getMessage() and r.exc_info for r in failures)


async def test_failures_are_on_the_metrics_an_app_serves() -> None:
    jobs = BackgroundJobs()
    failed = asyncio.Event()

    async def broken() -> bool:
        failed.set()
        raise ValueError("bug")

    async with Loop(broken, name="heartbeat-x", interval_s=60, backoff_s=60, jobs=jobs):
        await failed.wait()
    jobs.record_purge("outbox", 7)
    registry = CollectorRegistry()
    expose_jobs(registry, jobs)
    expose_jobs(registry, jobs)  # a second time changes nothing (the app factory and a service)
    exposed = generate_latest(registry).decode()
    assert 'shop_background_failures_total{job="heartbeat-x"} 1.0' in exposed
    assert 'shop_retention_purged_rows_total{job="outbox"} 7.0' in exposed


async def test_the_back_off_doubles_after_each_failure() -> None:
    stamps: list[float] = []
    recovered = asyncio.Event()
    clock = asyncio.get_running_loop().time

    async def step() -> bool:
        stamps.append(clock())
        if len(stamps) <= 3:
            raise RuntimeError("down")
        recovered.set()
        return False

    async with Loop(step, name="t", interval_s=60, backoff_s=0.02, backoff_max_s=1):
        await recovered.wait()
    gaps = [later - earlier for earlier, later in zip(stamps, stamps[1:], strict=False)]
    # (less a hair: asyncio fires a timer up to its clock resolution early)
    assert gaps[0] > 0.019 and gaps[1] > 0.039 and gaps[2] > 0.079


async def test_a_wake_up_does_not_cut_a_back_off_short_but_stop_does() -> None:
    calls = 0
    failed = asyncio.Event()

    async def down() -> bool:
        nonlocal calls
        calls += 1
        failed.set()
        raise RuntimeError("bus down")

    loop = Loop(down, name="t", interval_s=0.001, backoff_s=3600)
    loop.start()
    await failed.wait()
    loop.wake()
    await asyncio.sleep(0.02)
    assert calls == 1, "no retry before the back-off is over, however often it is woken"
    began = asyncio.get_running_loop().time()
    await loop.stop()
    assert asyncio.get_running_loop().time() - began < 1, "stopping does not wait it out"


async def test_an_expected_failure_is_one_warning_line(caplog: pytest.LogCaptureFixture) -> None:
    jobs = BackgroundJobs()
    failed = asyncio.Event()

    async def unreachable() -> bool:
        failed.set()
        raise ConnectionError("registry down")

    async with Loop(
        unreachable,
        name="heartbeat-y",
        interval_s=60,
        backoff_s=60,
        expected=(ConnectionError,),
        jobs=jobs,
    ):
        await failed.wait()
    (record,) = [r for r in caplog.records if "heartbeat-y" in r.getMessage()]
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert "registry down" in record.getMessage()
    assert jobs.failures["heartbeat-y"] == 1


@pytest.fixture
async def two_leases(tmp_path: Path) -> AsyncIterator[tuple[Lease, Lease]]:
    engine = create_engine(f"sqlite:///{tmp_path / 'leases.db'}")
    async with engine.begin() as conn:
        await conn.execute(text(LEASES_DDL))
    try:
        yield (
            Lease(engine, name="job", owner="a", duration_s=60),
            Lease(engine, name="job", owner="b", duration_s=60),
        )
    finally:
        await engine.dispose()


async def test_a_leased_loop_runs_only_while_it_holds_the_lease(
    two_leases: tuple[Lease, Lease],
) -> None:
    mine, theirs = two_leases
    assert await theirs.hold()
    runs = 0
    looked = asyncio.Event()

    async def step() -> bool:
        nonlocal runs
        runs += 1
        return False

    loop = LeasedLoop(step, name="t", lease=mine, interval_s=60)
    original_hold = mine.hold

    async def hold() -> bool:
        held = await original_hold()
        looked.set()
        return held

    mine.hold = hold  # type: ignore[method-assign]  # observe the real lease's answer
    async with loop:
        await looked.wait()
        assert runs == 0, "another process holds the lease: the step is skipped"
        await theirs.release()
        looked.clear()
        loop.wake()
        await looked.wait()
        await asyncio.sleep(0)
    assert runs == 1
    assert await theirs.hold(), "stopping gives the lease back"
