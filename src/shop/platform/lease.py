"""A named lease in a database: at most one holder at a time, taken over when it lapses.

Used so that one process, of several, runs a job that must not run twice at once: the
outbox relay of a service, the consumer of a group on the embedded event log.

A holder that must not act after losing the lease (a consumer committing its offset)
renews with ``renew`` — which never takes a lapsed lease back, since someone else may have
held it meanwhile — and puts ``is_held()`` in the WHERE clause of the write it fences.

``shop.platform.mongo.MongoLease`` is the same lease in a MongoDB database; a job that only
needs ``hold``/``renew``/``release`` takes either (``shop.platform.worker.JobLease``).
"""

from __future__ import annotations

import time

from sqlalchemy import (
    Column,
    ColumnElement,
    Double,
    MetaData,
    String,
    Table,
    exists,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["LEASES_DDL", "Lease", "leases"]

_metadata = MetaData()
leases = Table(
    "shop_leases",
    _metadata,
    Column("name", String(200), primary_key=True),
    Column("owner", String(200), nullable=False),
    Column("until", Double, nullable=False),
)

# Safe when several processes run it at once (metadata.create_all is not).
LEASES_DDL = (
    "CREATE TABLE IF NOT EXISTS shop_leases ("
    "name VARCHAR(200) NOT NULL PRIMARY KEY, owner VARCHAR(200) NOT NULL, until DOUBLE NOT NULL)"
)


class Lease:
    def __init__(self, engine: AsyncEngine, *, name: str, owner: str, duration_s: float) -> None:
        self._engine = engine
        self.name = name
        self.owner = owner
        self.duration_s = duration_s

    async def hold(self) -> bool:
        """Take or renew the lease; False while another owner holds it."""
        now = time.time()
        async with self._engine.begin() as conn:
            renewed = await conn.execute(
                update(leases)
                .where(leases.c.name == self.name)
                .where((leases.c.owner == self.owner) | (leases.c.until < now))
                .values(owner=self.owner, until=now + self.duration_s)
            )
            if renewed.rowcount == 1:
                return True
            held = await conn.scalar(select(leases.c.owner).where(leases.c.name == self.name))
            if held is not None:
                return False
            try:
                async with conn.begin_nested():
                    await conn.execute(
                        insert(leases).values(
                            name=self.name, owner=self.owner, until=now + self.duration_s
                        )
                    )
            except IntegrityError:
                return False  # another process created it first
            return True

    async def renew(self) -> bool:
        """Extend the lease this owner holds without a break; False once it lapsed or moved."""
        now = time.time()
        async with self._engine.begin() as conn:
            renewed = await conn.execute(
                update(leases)
                .where(leases.c.name == self.name)
                .where(leases.c.owner == self.owner, leases.c.until > now)
                .values(until=now + self.duration_s)
            )
        return renewed.rowcount == 1

    def is_held(self) -> ColumnElement[bool]:
        """A condition true while this owner holds the lease: fences a write in one statement."""
        return exists().where(
            leases.c.name == self.name,
            leases.c.owner == self.owner,
            leases.c.until > time.time(),
        )

    async def release(self) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                update(leases)
                .where(leases.c.name == self.name, leases.c.owner == self.owner)
                .values(until=0.0)
            )
