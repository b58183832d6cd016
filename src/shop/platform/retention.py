"""Retention: background jobs that delete what has outlived its use, a bounded batch at a
time (docs/platform.md, "Retention").

A ``RetentionJob`` runs a ``purge(before, limit)`` step on the common loop
(``shop.platform.worker``): the step deletes at most ``limit`` rows older than ``before``
(epoch seconds) and says how many, and whether more may be waiting; while there are, the
next batch follows at once (after giving the event loop a turn), so a large backlog is
worked off without holding anything up for long. Rows deleted are counted in
``shop_retention_purged_rows_total{job}``.

``KeysetSweep`` is the purge of a table whose age column has no index (the inbox, the
Idempotency-Keys, refresh tokens): it walks the table in primary-key order, a page at a
time, deleting the expired rows of each page. A page is an index range read, so no step
scans the table; a whole sweep reads it once per ``interval_s``.

Several processes may run the same job on one database: each deletion repeats its
condition, so a row another process deleted, or that stopped being expired, is left
alone; the second process only does the work twice.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

from sqlalchemy import ColumnElement, Table, and_, bindparam, delete, or_, select, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine

from shop.platform.inbox import inbox
from shop.platform.worker import JOBS, BackgroundJobs, JobLease, LeasedLoop

if TYPE_CHECKING:
    from shop.platform.settings import PlatformSettings

__all__ = [
    "KeysetSweep",
    "Purge",
    "RetentionJob",
    "RetentionPolicy",
    "inbox_retention",
    "policy",
]

# ``purge(before, limit)``: delete at most ``limit`` rows older than ``before`` (epoch
# seconds); how many went, and whether more may be waiting (a whole batch went, or a page
# of a sweep was read whole).
Purge = Callable[[float, int], Awaitable[tuple[int, bool]]]


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long rows are kept (``keep_s``; 0 keeps them for ever), how often the job looks,
    and how many rows one step deletes at most."""

    keep_s: float
    interval_s: float = 300.0
    batch: int = 200

    @property
    def enabled(self) -> bool:
        return self.keep_s > 0


def policy(platform: PlatformSettings, *, keep_s: float) -> RetentionPolicy:
    """Rows kept ``keep_s`` (one of the ``SHOP_*_RETENTION_S``), at the deployment's
    pace (``SHOP_RETENTION_INTERVAL_S``, ``SHOP_RETENTION_BATCH``)."""
    return RetentionPolicy(
        keep_s=keep_s, interval_s=platform.retention_interval_s, batch=platform.retention_batch
    )


class RetentionJob:
    """A purge run periodically on the common loop; ``async with`` runs it."""

    def __init__(
        self,
        purge: Purge,
        *,
        name: str,
        policy: RetentionPolicy,
        lease: JobLease | None = None,
        clock: Callable[[], float] = time.time,
        jobs: BackgroundJobs = JOBS,
    ) -> None:
        self._purge = purge
        self.name = name
        self.policy = policy
        self._clock = clock
        self._jobs = jobs
        self._loop = LeasedLoop(
            self._step,
            name=name,
            lease=lease,
            interval_s=policy.interval_s,
            backoff_s=min(policy.interval_s, 5.0),
            backoff_max_s=policy.interval_s,
        )

    async def purge_once(self) -> tuple[int, bool]:
        """One batch: how many rows went (none when retention is off), and whether more
        may be waiting."""
        if not self.policy.enabled:
            return 0, False
        purged, more = await self._purge(self._clock() - self.policy.keep_s, self.policy.batch)
        if purged:
            self._jobs.record_purge(self.name, purged)
        return purged, more

    async def purge_all(self) -> int:
        """Batches until nothing more is waiting; how many rows went (tools and tests)."""
        total, more = 0, True
        while more:
            purged, more = await self.purge_once()
            total += purged
        return total

    async def _step(self) -> bool:
        return (await self.purge_once())[1]

    def start(self) -> None:
        if self.policy.enabled:
            self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()


class KeysetSweep:
    """``purge(before, limit)`` for ``table``: the next page of at most ``limit`` rows in
    primary-key order after where the last page ended; the expired rows among them are
    deleted. A short page ends the sweep and the next call starts again at the beginning.

    ``expired(before)`` is the condition that a row has outlived its retention; it is
    checked again in the ``DELETE``. ``time_of(before)`` turns the epoch cut-off into the
    column's type (a datetime for ``Timestamp`` columns).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        table: Table,
        *,
        expired: Callable[[Any], ColumnElement[bool]],
        time_of: Callable[[float], Any] = float,
    ) -> None:
        self._engine = engine
        self._key = list(table.primary_key.columns)
        self._table = table
        self._time_of = time_of
        cutoff: Any = bindparam("before")
        after = tuple_(*self._key) > tuple_(*(bindparam(f"k{i}") for i in range(len(self._key))))
        if engine.dialect.name != "sqlite":
            after = self._after()
        self._page = (
            select(*self._key, expired(cutoff).label("expired"))
            .where(after)
            .order_by(*self._key)
            .limit(bindparam("limit"))
        )
        self._first_page = (
            select(*self._key, expired(cutoff).label("expired"))
            .order_by(*self._key)
            .limit(bindparam("limit"))
        )
        # One primary-key lookup per row, run as one executemany: a row-value ``IN`` list
        # is a scan of the table on SQLite.
        self._delete = delete(table).where(
            *(column == bindparam(f"k{i}") for i, column in enumerate(self._key)),
            expired(cutoff),
        )
        self._cursor: Sequence[Any] | None = None

    def _after(self) -> ColumnElement[bool]:
        """Keyset pagination written out (``a > :k0 OR (a = :k0 AND b > :k1)``), which
        MySQL/MariaDB read as ranges of the primary key; SQLite reads the row value
        ``(a, b) > (:k0, :k1)`` so (the written-out form makes it search on ``a`` alone)."""
        clauses: list[ColumnElement[bool]] = []
        for i, column in enumerate(self._key):
            equal = [self._key[j] == bindparam(f"k{j}") for j in range(i)]
            clauses.append(and_(*equal, column > bindparam(f"k{i}")))
        return or_(*clauses)

    async def __call__(self, before: float, limit: int) -> tuple[int, bool]:
        cutoff = self._time_of(before)
        params: dict[str, Any] = {"before": cutoff, "limit": limit}
        async with self._engine.connect() as conn:
            if self._cursor is None:
                rows = (await conn.execute(self._first_page, params)).all()
            else:
                cursor = {f"k{i}": value for i, value in enumerate(self._cursor)}
                rows = (await conn.execute(self._page, {**params, **cursor})).all()
        width = len(self._key)
        whole = len(rows) == limit
        self._cursor = tuple(rows[-1][:width]) if whole else None
        keys = [tuple(row[:width]) for row in rows if row[-1]]
        if not keys:
            return 0, whole
        rows_to_delete = [
            {"before": cutoff, **{f"k{i}": value for i, value in enumerate(key)}} for key in keys
        ]
        async with self._engine.begin() as conn:
            gone = await conn.execute(self._delete, rows_to_delete)
        return int(gone.rowcount), whole


def inbox_retention(
    engine: AsyncEngine,
    *,
    service: str,
    policy: RetentionPolicy,
    clock: Callable[[], float] = time.time,
) -> RetentionJob:
    """The inbox's rows older than ``policy.keep_s`` deleted (the redelivery horizon: an
    event that can no longer come again needs no record that it came)."""
    return RetentionJob(
        KeysetSweep(engine, inbox, expired=lambda before: inbox.c.processed_at < before),
        name=f"inbox-retention-{service}",
        policy=policy,
        clock=clock,
    )
