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

from sqlalchemy import Column, Double, MetaData, String, Table
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


# Plain SQL run by the driver as it is: even a prebuilt Core insert cost more in
# SQLAlchemy's per-statement work (cache key, parameter processing) than in SQLite.
_RECORD_UNLESS_SEEN = (
    "INSERT INTO inbox (consumer, event_id, processed_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"
)
_RECORD = "INSERT INTO inbox (consumer, event_id, processed_at) VALUES (%s, %s, %s)"


async def first_delivery(conn: AsyncConnection, *, consumer: str, event_id: str) -> bool:
    """Record the event as processed by ``consumer``; False if it already was."""
    row = (consumer, event_id, time.time())
    if conn.dialect.name == "sqlite":
        return (await conn.exec_driver_sql(_RECORD_UNLESS_SEEN, row)).rowcount == 1
    try:
        async with conn.begin_nested():
            await conn.exec_driver_sql(_RECORD, row)
    except IntegrityError:
        return False
    return True
