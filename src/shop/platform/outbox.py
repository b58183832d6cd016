"""The transactional outbox: an event is a row written in the same transaction as the change
it announces, and a relay publishes it afterwards.

If the transaction rolls back, the event never existed; if the process dies after the
commit, the relay publishes the row when it comes back. A crash between publishing and
marking the row means it is published again: consumers de-duplicate (``inbox``).
One relay per service runs at a time (a lease in the service's database), so events leave
in the order they were written. The lease is checked before each batch, not during it: a
relay that stalls for longer than the lease (10 s) can overlap with the next holder, which
may publish the same rows again — consumers de-duplicate, as for any redelivery.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Double,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shop.platform.events import Event, EventBus
from shop.platform.lease import Lease, leases
from shop.platform.worker import LeasedLoop

__all__ = ["OutboxRelay", "add_event", "create_outbox_tables", "outbox"]

log = logging.getLogger("shop.outbox")

_metadata = MetaData()
outbox = Table(
    "outbox",
    _metadata,
    Column(
        "seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("event_id", String(64), nullable=False, unique=True),
    Column("topic", String(100), nullable=False),
    Column("event_key", String(200), nullable=False),
    Column("payload", Text().with_variant(mysql.MEDIUMTEXT(), "mysql"), nullable=False),
    Column("created_at", Double, nullable=False),
    Column("published_at", Double, nullable=True),
    Index("outbox_unpublished", "published_at", "seq"),
)


def create_outbox_tables(op: Any) -> None:
    """For a service's Alembic migration: ``create_outbox_tables(op)``."""
    bind = op.get_bind()
    outbox.create(bind)
    leases.create(bind, checkfirst=True)


async def add_event(conn: AsyncConnection, *, topic: str, event: Event) -> None:
    """Record ``event`` for ``topic`` inside the caller's transaction."""
    await conn.execute(
        insert(outbox).values(
            event_id=event.id,
            topic=topic,
            event_key=event.key,
            payload=event.to_json(),
            created_at=time.time(),
        )
    )


class OutboxRelay:
    def __init__(
        self,
        engine: AsyncEngine,
        bus: EventBus,
        *,
        service: str,
        poll_interval_s: float = 1.0,
        batch_size: int = 100,
        lease_s: float = 10.0,
        retention_s: float = 7 * 24 * 3600.0,
    ) -> None:
        self._engine = engine
        self._bus = bus
        self._batch = batch_size
        self._retention_s = retention_s
        owner = f"{service}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        lease = Lease(engine, name=f"outbox:{service}", owner=owner, duration_s=lease_s)
        self._loop = LeasedLoop(
            self._step, name=f"outbox-relay-{service}", lease=lease, interval_s=poll_interval_s
        )
        self._purged_at = 0.0

    async def __aenter__(self) -> OutboxRelay:
        self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    def wake(self) -> None:
        """Publish now rather than at the next poll (call after a commit that added events)."""
        self._loop.wake()

    def start(self) -> None:
        self._loop.start()

    async def stop(self, *, grace_s: float = 5.0) -> None:
        """Let the relay finish the batch it is publishing, then stop."""
        await self._loop.stop(grace_s=grace_s)

    async def relay_once(self) -> int:
        """Publish the oldest unpublished events; how many were published."""
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(outbox.c.seq, outbox.c.topic, outbox.c.payload)
                    .where(outbox.c.published_at.is_(None))
                    .order_by(outbox.c.seq)
                    .limit(self._batch)
                )
            ).all()
        if not rows:
            return 0
        # Consecutive rows of one topic go in one append; order is kept within each topic.
        start = 0
        for end in range(1, len(rows) + 1):
            if end == len(rows) or rows[end].topic != rows[start].topic:
                events = [Event.from_json(r.payload) for r in rows[start:end]]
                await self._bus.publish(rows[start].topic, events)
                start = end
        async with self._engine.begin() as conn:
            await conn.execute(
                update(outbox)
                .where(outbox.c.seq.in_([r.seq for r in rows]))
                .values(published_at=time.time())
            )
        return len(rows)

    async def _purge(self) -> None:
        if time.monotonic() - self._purged_at < 3600:
            return
        self._purged_at = time.monotonic()
        async with self._engine.begin() as conn:
            await conn.execute(
                delete(outbox).where(outbox.c.published_at < time.time() - self._retention_s)
            )

    async def _step(self) -> bool:
        if await self.relay_once() == self._batch:
            return True  # more are waiting
        await self._purge()
        return False
