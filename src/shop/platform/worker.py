"""One way to run a periodic job: the outbox relay, the release reconciler, the registry's
eviction sweep, the heartbeat, the operator watch, the retention jobs (docs/platform.md,
"Background jobs").

A ``Loop`` calls ``step`` again at once when it says there is more to do, otherwise after
``interval_s`` or as soon as ``wake()`` is called. The rules every job shares:

- **Failures**: a step that raises is logged with the job's name (an exception the job
  declared ``expected``, such as "the registry is unreachable", as one warning line; any
  other with its traceback), counted in ``shop_background_failures_total{job}``, and the
  loop goes on after a back-off that doubles from ``backoff_s`` up to ``backoff_max_s``
  and starts again after a step that succeeds. A wake-up does not cut a back-off short,
  so a job whose database is down is not hammered by every request that wakes it. The
  loop never ends on its own: only ``stop()`` ends it.
- **Stopping**: ``stop()`` lets the step in hand finish (a step cancelled while it opened
  a connection would leave it half made) and cancels it only if it has not finished
  within the grace period. A long step may look at ``stopping`` to end early.

A ``LeasedLoop`` is the same loop for a job that one process of several runs: it takes or
renews its lease before each step, and skips the step while another process holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType
from typing import Protocol, Self

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["JOBS", "BackgroundJobs", "JobLease", "LeasedLoop", "Loop", "Step", "expose_jobs"]

log = logging.getLogger("shop.worker")

Step = Callable[[], Awaitable[bool]]


class BackgroundJobs(Collector):
    """What this process's background jobs report, for ``/metrics``:
    ``shop_background_failures_total{job}`` (steps that raised) and
    ``shop_retention_purged_rows_total{job}`` (rows the retention jobs deleted).

    One per process (``JOBS``), since a job belongs to the process, not to one app; each
    app's metrics registry serves it (``expose_jobs(registry)``)."""

    def __init__(self) -> None:
        self.failures: Counter[str] = Counter()
        self.purged: Counter[str] = Counter()

    def failed(self, job: str) -> None:
        self.failures[job] += 1

    def record_purge(self, job: str, rows: int) -> None:
        self.purged[job] += rows

    def collect(self) -> Iterator[CounterMetricFamily]:
        failures = CounterMetricFamily(
            "shop_background_failures",
            "Steps of a background job that raised (the job goes on after a back-off)",
            labels=["job"],
        )
        for job, count in sorted(self.failures.items()):
            failures.add_metric([job], count)
        yield failures
        purged = CounterMetricFamily(
            "shop_retention_purged_rows",
            "Rows a retention job deleted because they outlived their retention",
            labels=["job"],
        )
        for job, count in sorted(self.purged.items()):
            purged.add_metric([job], count)
        yield purged

    def describe(self) -> Iterator[CounterMetricFamily]:
        return self.collect()


JOBS = BackgroundJobs()


def expose_jobs(registry: CollectorRegistry, jobs: BackgroundJobs = JOBS) -> None:
    """Serve the process's job metrics on the ``/metrics`` of ``registry`` (once)."""
    with contextlib.suppress(ValueError):  # registered already: the same time series
        registry.register(jobs)


class JobLease(Protocol):
    """A named lease in some database (``shop.platform.lease.Lease`` on SQL,
    ``shop.platform.mongo.MongoLease`` on MongoDB): at most one holder at a time."""

    async def hold(self) -> bool:
        """Take or renew the lease; False while another owner holds it."""

    async def renew(self) -> bool:
        """Extend the lease this owner holds without a break; False once it lapsed or moved."""

    async def release(self) -> None: ...


class Loop:
    """A periodic job in this process (see the module's docstring for its rules)."""

    def __init__(
        self,
        step: Step,
        *,
        name: str,
        interval_s: float,
        backoff_s: float = 1.0,
        backoff_max_s: float = 60.0,
        expected: tuple[type[Exception], ...] = (),
        grace_s: float = 5.0,
        jobs: BackgroundJobs = JOBS,
    ) -> None:
        self._step = step
        self.name = name
        self._interval = interval_s
        self._backoff = backoff_s
        self._backoff_max = max(backoff_max_s, backoff_s)
        self._expected = expected
        self._grace = grace_s
        self._jobs = jobs
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.steps = 0  # steps tried since the loop was made
        self.failures = 0  # steps that raised, since the loop was made

    @property
    def stopping(self) -> bool:
        """True once ``stop()`` was called: a long step should end early."""
        return self._stopping.is_set()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        """Run the step now rather than at the next interval (not during a back-off)."""
        self._wakeup.set()

    def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self, *, grace_s: float | None = None) -> None:
        """Let the step in hand finish, then stop; cancel it if it outlasts the grace."""
        if self._task is None:
            return
        self._stopping.set()
        self._wakeup.set()
        task, self._task = self._task, None
        try:
            async with asyncio.timeout(self._grace if grace_s is None else grace_s):
                await asyncio.shield(task)
        except TimeoutError:
            log.warning("%s: the step in hand outlasted the grace period; cancelled", self.name)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._stopped()

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _attempt(self) -> bool:
        """One step; whether there is more to do at once."""
        return await self._step()

    async def _stopped(self) -> None:
        """After the last step (a leased loop gives its lease back)."""

    async def _run(self) -> None:
        failed_in_a_row = 0
        while not self._stopping.is_set():
            try:
                self.steps += 1
                more = await self._attempt()
            except Exception as exc:
                failed_in_a_row += 1
                self.failures += 1
                self._jobs.failed(self.name)
                delay = min(self._backoff * 2 ** min(failed_in_a_row - 1, 30), self._backoff_max)
                if isinstance(exc, self._expected):
                    log.warning("%s failed (%r); next try in %.1f s", self.name, exc, delay)
                else:
                    log.exception("%s failed unexpectedly; next try in %.1f s", self.name, delay)
                await self._pause(delay, wakeable=False)
                continue
            failed_in_a_row = 0
            if self._stopping.is_set():
                break
            if more:
                # Give the loop a turn: an inline SQLite statement never awaits, so a backlog
                # worked off step after step would otherwise hold everything else up.
                await asyncio.sleep(0)
                continue
            await self._pause(self._interval, wakeable=True)

    async def _pause(self, seconds: float, *, wakeable: bool) -> None:
        # Not asyncio.wait_for: on 3.11 it swallows a cancel that lands as the event is set.
        waited = self._wakeup if wakeable else self._stopping
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await waited.wait()
        # The step that comes next sees whatever the wake-ups were for.
        self._wakeup.clear()


class LeasedLoop(Loop):
    """A periodic job that one process of several runs: the step runs while this process
    holds ``lease`` (taken or renewed before each step). ``lease=None``: this process is
    the only one that runs the job (tests, single instances)."""

    def __init__(
        self,
        step: Step,
        *,
        name: str,
        lease: JobLease | None,
        interval_s: float,
        backoff_s: float = 1.0,
        backoff_max_s: float = 60.0,
        expected: tuple[type[Exception], ...] = (),
        grace_s: float = 5.0,
        jobs: BackgroundJobs = JOBS,
    ) -> None:
        super().__init__(
            step,
            name=name,
            interval_s=interval_s,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
            expected=expected,
            grace_s=grace_s,
            jobs=jobs,
        )
        self._lease = lease

    async def _attempt(self) -> bool:
        if self._lease is None or await self._lease.hold():
            return await self._step()
        return False

    async def _stopped(self) -> None:
        if self._lease is not None:
            with contextlib.suppress(Exception):
                await self._lease.release()
