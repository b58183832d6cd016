"""A background job that one process of several runs: the outbox relay, a reconciler.

It calls ``step`` while it holds its lease, again at once when ``step`` says there is
more to do, otherwise after ``interval_s`` or as soon as ``wake()`` is called. Stopping
lets the step in hand finish (a step cancelled while it opened a connection would leave
it half made) and cancels only one that hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Protocol

__all__ = ["JobLease", "LeasedLoop"]

log = logging.getLogger("shop.worker")


class JobLease(Protocol):
    """A named lease in some database (``shop.platform.lease.Lease`` on SQL,
    ``shop.platform.mongo.MongoLease`` on MongoDB): at most one holder at a time."""

    async def hold(self) -> bool:
        """Take or renew the lease; False while another owner holds it."""

    async def renew(self) -> bool:
        """Extend the lease this owner holds without a break; False once it lapsed or moved."""

    async def release(self) -> None: ...


class LeasedLoop:
    def __init__(
        self,
        step: Callable[[], Awaitable[bool]],
        *,
        name: str,
        lease: JobLease | None,
        interval_s: float,
    ) -> None:
        self._step = step
        self._name = name
        # None: this process is the only one that runs the job (tests, single instances).
        self._lease = lease
        self._interval = interval_s
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def stopping(self) -> bool:
        """True once ``stop()`` was called: a long step should end early."""
        return self._stopping.is_set()

    def wake(self) -> None:
        self._wakeup.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self, *, grace_s: float = 5.0) -> None:
        if self._task is None:
            return
        self._stopping.set()
        self._wakeup.set()
        try:
            async with asyncio.timeout(grace_s):
                await asyncio.shield(self._task)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None
        if self._lease is not None:
            with contextlib.suppress(Exception):
                await self._lease.release()

    async def __aenter__(self) -> LeasedLoop:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            more = False
            try:
                if self._lease is None or await self._lease.hold():
                    more = await self._step()
            except Exception:
                log.exception("%s failed; retrying", self._name)
            if self._stopping.is_set():
                break
            if more:
                continue
            # Not asyncio.wait_for: on 3.11 it swallows a cancel that lands as the event is set.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wakeup.wait()
            self._wakeup.clear()
