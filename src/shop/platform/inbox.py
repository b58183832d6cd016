"""The inbox: a consumer remembers the events it has processed, so a redelivered event (the
bus delivers at least once) changes nothing the second time.

Call ``first_delivery`` inside the transaction that applies the event: both commit, or
neither does.

On SQLite it is one ``INSERT … ON CONFLICT DO NOTHING``; on MySQL/MariaDB an insert under a
savepoint, whose duplicate-key error says "already processed" (``INSERT IGNORE`` would also
turn other errors into warnings).
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Column, Double, MetaData, String, Table, insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["create_inbox_table", "first_delivery", "inbox"]

_metadata = MetaData()
inbox = Table(
    "inbox",
    _metadata,
    Column("consumer", String(100), primary_key=True),
    Column("event_id", String(64), primary_key=True),
    Column("processed_at", Double, nullable=False),
)


def create_inbox_table(op: Any) -> None:
    """For a service's Alembic migration: ``create_inbox_table(op)``."""
    inbox.create(op.get_bind())


# Built once: a statement made per call costs more to build than to run on SQLite.
_RECORD = insert(inbox)
_RECORD_UNLESS_SEEN = sqlite_insert(inbox).on_conflict_do_nothing()


async def first_delivery(conn: AsyncConnection, *, consumer: str, event_id: str) -> bool:
    """Record the event as processed by ``consumer``; False if it already was."""
    row = {"consumer": consumer, "event_id": event_id, "processed_at": time.time()}
    if conn.dialect.name == "sqlite":
        return (await conn.execute(_RECORD_UNLESS_SEEN, row)).rowcount == 1
    try:
        async with conn.begin_nested():
            await conn.execute(_RECORD, row)
    except IntegrityError:
        return False
    return True
