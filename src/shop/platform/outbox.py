"""The transactional outbox: an event is a row written in the same transaction as the change
it announces, and a relay publishes it afterwards.

If the transaction rolls back, the event never existed; if the process dies after the
commit, the relay publishes the row when it comes back. A crash between publishing and
marking the row means it is published again: consumers de-duplicate (``inbox``).
One relay per service runs at a time (a lease in the service's database), so events leave
in the order they were written. The lease is checked before each batch, not during it: a
relay that stalls for longer than the lease (10 s) can overlap with the next holder, which
may publish the same rows again — consumers de-duplicate, as for any redelivery.

The relay reads its outbox through ``OutboxSource``, so one relay serves every database a
service may keep its outbox in: ``SqlOutbox`` here, ``MongoOutbox`` in ``shop.platform.mongo``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

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
    bindparam,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shop.platform import context, telemetry
from shop.platform.events import Event, EventBus
from shop.platform.lease import Lease, leases
from shop.platform.retention import RetentionJob, RetentionPolicy
from shop.platform.worker import JobLease, LeasedLoop

__all__ = [
    "OutboxEntry",
    "OutboxRelay",
    "OutboxSource",
    "PurgesPublished",
    "SqlOutbox",
    "add_event",
    "create_outbox_tables",
    "outbox",
]

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


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """An unpublished event; ``position`` orders the outbox (the order events were written)."""

    position: int
    topic: str
    event: Event


class OutboxSource(Protocol):
    """Where a service's outbox lives, as its relay sees it."""

    async def unpublished(self, limit: int) -> Sequence[OutboxEntry]:
        """The oldest ``limit`` events not yet marked published, oldest first."""

    async def mark_published(self, positions: Sequence[int]) -> None: ...

    def lease(self, *, name: str, owner: str, duration_s: float) -> JobLease:
        """A lease in the same database, so the relays of one outbox take turns."""


@runtime_checkable
class PurgesPublished(Protocol):
    """An outbox whose published events the relay's retention job deletes in batches."""

    async def purge_published(self, before: float, limit: int) -> tuple[int, bool]:
        """Delete at most ``limit`` events published before ``before``, oldest first; how
        many went and whether more may be waiting. An unpublished event is never deleted."""


# The relay's statements, built once (a statement built per batch cost more to build than
# to run on SQLite); the ``IN`` list expands per call.
_UNPUBLISHED = (
    select(outbox.c.seq, outbox.c.topic, outbox.c.payload)
    .where(outbox.c.published_at.is_(None))
    .order_by(outbox.c.seq)
    .limit(bindparam("limit"))
)
_MARK_PUBLISHED = (
    update(outbox)
    .where(outbox.c.seq.in_(bindparam("positions", expanding=True)))
    .values(published_at=bindparam("now"))
)
# Through the index (published_at, seq): NULL (unpublished) is never < anything.
_PUBLISHED_BEFORE = (
    select(outbox.c.seq)
    .where(outbox.c.published_at < bindparam("before"))
    .order_by(outbox.c.published_at)
    .limit(bindparam("limit"))
)
_DELETE_PUBLISHED = delete(outbox).where(
    outbox.c.seq.in_(bindparam("positions", expanding=True)),
    outbox.c.published_at < bindparam("before"),
)


class SqlOutbox:
    """The ``outbox`` table of a service's SQL database (SQLite, MySQL/MariaDB)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @property
    def engine(self) -> AsyncEngine:
        """The database the table is in (the operator metrics read its backlog there)."""
        return self._engine

    async def unpublished(self, limit: int) -> list[OutboxEntry]:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(_UNPUBLISHED, {"limit": limit})).all()
        return [OutboxEntry(seq, topic, Event.from_json(payload)) for seq, topic, payload in rows]

    async def mark_published(self, positions: Sequence[int]) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(_MARK_PUBLISHED, {"positions": list(positions), "now": time.time()})

    async def purge_published(self, before: float, limit: int) -> tuple[int, bool]:
        async with self._engine.connect() as conn:
            found = (
                (await conn.execute(_PUBLISHED_BEFORE, {"before": before, "limit": limit}))
                .scalars()
                .all()
            )
        if not found:
            return 0, False
        async with self._engine.begin() as conn:
            gone = await conn.execute(
                _DELETE_PUBLISHED, {"positions": list(found), "before": before}
            )
        return int(gone.rowcount), len(found) == limit

    def lease(self, *, name: str, owner: str, duration_s: float) -> Lease:
        return Lease(self._engine, name=name, owner=owner, duration_s=duration_s)


def _traced(topic: str, events: list[Event]) -> tuple[list[Event], list[Any]]:
    """A PRODUCER span per event, a child of the request that wrote it; the event leaves
    carrying that span as its ``traceparent``, so its consumers' spans are the span's
    children: request -> publish -> process, one trace."""
    sent: list[Event] = []
    spans: list[Any] = []
    for event in events:
        span = telemetry.start_process_span(
            f"{topic} publish",
            kind="producer",
            parent=context.parse_traceparent(event.traceparent),
            attributes={
                "messaging.operation.type": "send",
                "messaging.destination.name": topic,
                "messaging.message.id": event.id,
            },
        )
        if span is None:
            return events, spans
        spans.append(span)
        sent.append(replace(event, traceparent=telemetry.span_trace(span).traceparent))
    return sent, spans


class OutboxRelay:
    def __init__(
        self,
        source: OutboxSource,
        bus: EventBus,
        *,
        service: str,
        poll_interval_s: float = 1.0,
        batch_size: int = 100,
        lease_s: float = 10.0,
        retention: RetentionPolicy | None = None,
    ) -> None:
        self._source = source
        self._bus = bus
        self._batch = batch_size
        owner = f"{service}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        lease = source.lease(name=f"outbox:{service}", owner=owner, duration_s=lease_s)
        self._loop = LeasedLoop(
            self._step,
            name=f"outbox-relay-{service}",
            lease=lease,
            interval_s=poll_interval_s,
            # A bus that is down is tried again soon: its events wait meanwhile.
            backoff_s=min(poll_interval_s, 1.0),
            backoff_max_s=5.0,
        )
        # Published rows go after a week unless the service says otherwise (SHOP_OUTBOX_*).
        policy = retention or RetentionPolicy(keep_s=7 * 24 * 3600.0, interval_s=3600.0)
        self.retention: RetentionJob | None = None
        if isinstance(source, PurgesPublished):
            self.retention = RetentionJob(
                source.purge_published, name=f"outbox-retention-{service}", policy=policy
            )

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
        if self.retention is not None:
            self.retention.start()

    async def stop(self, *, grace_s: float = 5.0) -> None:
        """Let the relay finish the batch it is publishing, then stop."""
        if self.retention is not None:
            await self.retention.stop()
        await self._loop.stop(grace_s=grace_s)

    async def relay_once(self) -> int:
        """Publish the oldest unpublished events; how many were published."""
        entries = await self._source.unpublished(self._batch)
        if not entries:
            return 0
        # Consecutive entries of one topic go in one append; order is kept within each topic.
        start = 0
        for end in range(1, len(entries) + 1):
            if end == len(entries) or entries[end].topic != entries[start].topic:
                topic, events = entries[start].topic, [e.event for e in entries[start:end]]
                spans: list[Any] = []
                if context.spans_exported:
                    events, spans = _traced(topic, events)
                try:
                    await self._bus.publish(topic, events)
                finally:
                    for span in spans:
                        span.end()
                start = end
        await self._source.mark_published([entry.position for entry in entries])
        return len(entries)

    async def _step(self) -> bool:
        return await self.relay_once() == self._batch  # True: more are waiting
