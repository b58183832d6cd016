"""Persistence of notifications: a small protocol and its SQLAlchemy (Core) backend.

The same code runs on SQLite and MySQL/MariaDB; times are stored as naive UTC. A
notification and the inbox row of the event that caused it commit together, so a
redelivered event finds the inbox row and adds nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import (
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    select,
    update,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from shop.notification.domain import Channel, Notification, Status
from shop.platform.db import (
    Timestamp,
    execute_retrying,
    from_db_time,
    is_lock_conflict,
    to_db_time,
)
from shop.platform.inbox import first_delivery
from shop.platform.rawsql import RawSql, RawTransaction

__all__ = ["CONSUMER", "NotificationStore", "SqlNotificationStore", "metadata", "notifications"]

CONSUMER = "notification-service"


metadata = MetaData()

notifications = Table(
    "notifications",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("event_id", String(64), nullable=False, unique=True),
    Column("user_id", String(64), nullable=False),
    Column("email", String(320), nullable=False),
    Column("order_number", String(64), nullable=False),
    Column("type", String(32), nullable=False),
    Column("channel", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("subject", String(400), nullable=False),
    Column("body", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_error", String(2000), nullable=True),
    Column("next_attempt_at", Timestamp, nullable=True),
    Column("created_at", Timestamp, nullable=False),
    Column("sent_at", Timestamp, nullable=True),
    Index("ix_notifications_user_created", "user_id", "created_at"),
    Index("ix_notifications_next_attempt", "next_attempt_at"),
)


class NotificationStore(Protocol):
    async def record_event(
        self,
        event_id: str,
        notification: Notification | None,
        *,
        announce: Callable[[Notification], None] | None = None,
    ) -> bool:
        """Mark the event processed and store its notification (if any), atomically.

        False, and nothing stored, when the event was processed before. ``announce`` is
        called with the notification once it is stored, before the commit (the log line of
        a notification recorded as already ``LOGGED``).
        """

    async def record_events(
        self,
        entries: Sequence[tuple[str, Notification | None]],
        *,
        announce: Callable[[Notification], None] | None = None,
    ) -> list[bool]:
        """``record_event`` for several events (event id, notification or None) in one
        transaction: for each entry, whether it was recorded now (False for an event
        processed before, or earlier in ``entries``). All or nothing: if this raises,
        nothing was recorded."""

    async def claim_due(
        self, *, now: datetime, hold_until: datetime, channels: Collection[Channel], limit: int
    ) -> list[Notification]:
        """Notifications whose next attempt is due, each now held by the caller until
        ``hold_until`` (no other sweeper takes it meanwhile), their attempts counted."""

    async def mark_done(self, notification_id: str, *, status: Status, now: datetime) -> None: ...

    async def mark_failed(
        self, notification_id: str, *, error: str, next_attempt_at: datetime | None
    ) -> None: ...

    async def of_user(
        self, user_id: str, *, order_number: str | None, limit: int, offset: int
    ) -> list[Notification]:
        """The user's notifications, newest first."""

    async def by_event(self, event_id: str) -> Notification | None: ...


def _notification(row: Any) -> Notification:
    return Notification(
        id=row.id,
        event_id=row.event_id,
        user_id=row.user_id,
        email=row.email,
        order_number=row.order_number,
        type=row.type,
        channel=row.channel,
        status=row.status,
        subject=row.subject,
        body=row.body,
        attempts=row.attempts,
        last_error=row.last_error,
        next_attempt_at=from_db_time(row.next_attempt_at),
        created_at=row.created_at.replace(tzinfo=UTC),
        sent_at=from_db_time(row.sent_at),
    )


# Built once and executed with a row of values: building a statement per call cost more
# than running it on SQLite.
_UPDATE_ONE = update(notifications).where(notifications.c.id == bindparam("notification_id"))


class _Insert:
    """The insert of a notification (once per event) as plain SQL run by the driver as it
    is: SQLAlchemy's per-statement work on a fifteen-column insert cost more than SQLite
    spent on it. Times go in as naive UTC: on SQLite in SQLAlchemy's own ``DateTime`` text
    (so Core reads and compares them as before), on MySQL as ``datetime``."""

    _SQL = (
        "INSERT INTO notifications (id, event_id, user_id, email, order_number, type, channel,"
        " status, subject, body, attempts, last_error, next_attempt_at, created_at, sent_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )

    def __init__(self, engine: AsyncEngine) -> None:
        self._sqlite = engine.dialect.name == "sqlite"
        mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        self.sql = self._SQL.replace("?", mark)

    def _time(self, moment: datetime | None) -> datetime | str | None:
        if moment is None:
            return None
        naive = to_db_time(moment)
        return naive.strftime("%Y-%m-%d %H:%M:%S.%f") if self._sqlite else naive

    def row(self, n: Notification) -> tuple[Any, ...]:
        return (
            n.id,
            n.event_id,
            n.user_id,
            n.email,
            n.order_number,
            n.type,
            n.channel,
            n.status,
            n.subject,
            n.body,
            n.attempts,
            n.last_error,
            self._time(n.next_attempt_at),
            self._time(n.created_at),
            self._time(n.sent_at),
        )


class _Inbox:
    """The inbox rows of a batch of events, as plain SQL run by the driver: which of them
    are there already (one query), and the insert of the others (one ``executemany``). On
    SQLite the transaction holds the write lock from its start, so nobody inserts in
    between; on MySQL a row another consumer inserted meanwhile makes the insert fail, and
    with it the batch's transaction: the bus then hands the events over one at a time
    (``first_delivery``)."""

    _INSERT = "INSERT INTO inbox (consumer, event_id, processed_at) VALUES (?, ?, ?)"
    _SEEN = "SELECT event_id FROM inbox WHERE consumer = ? AND event_id IN ("

    def __init__(self, *, placeholder: str, consumer: str) -> None:
        self._mark = placeholder
        self._consumer = consumer
        self.insert = self._INSERT.replace("?", placeholder)

    def seen_query(self, count: int) -> str:
        # Only placeholders go into the text: the values are parameters.
        return self._SEEN.replace("?", self._mark) + ", ".join([self._mark] * count) + ")"

    async def seen(self, tx: RawTransaction, event_ids: Sequence[str]) -> set[str]:
        found = await tx.execute(self.seen_query(len(event_ids)), (self._consumer, *event_ids))
        return {row[0] for row in found.rows}

    async def add(self, tx: RawTransaction, event_ids: Sequence[str]) -> None:
        now = time.time()
        await tx.executemany(
            self.insert, [(self._consumer, event_id, now) for event_id in event_ids]
        )


class SqlNotificationStore:
    def __init__(self, engine: AsyncEngine, *, consumer: str = CONSUMER) -> None:
        self._engine = engine
        self._consumer = consumer
        self._insert = _Insert(engine)
        # A batch's transaction: on a SQLite file a bare connection (no SQLAlchemy per
        # statement), on MySQL the engine's.
        self._raw = RawSql(engine)
        self._inbox = _Inbox(placeholder=self._raw.placeholder, consumer=consumer)

    async def record_event(
        self,
        event_id: str,
        notification: Notification | None,
        *,
        announce: Callable[[Notification], None] | None = None,
    ) -> bool:
        async with self._engine.begin() as conn:
            if not await first_delivery(conn, consumer=self._consumer, event_id=event_id):
                return False
            if notification is not None:
                await conn.exec_driver_sql(self._insert.sql, self._insert.row(notification))
                if announce is not None:
                    announce(notification)
        return True

    async def record_events(
        self,
        entries: Sequence[tuple[str, Notification | None]],
        *,
        announce: Callable[[Notification], None] | None = None,
    ) -> list[bool]:
        if not entries:
            return []
        async with self._raw.writing() as tx:
            seen = await self._inbox.seen(tx, list({event_id for event_id, _ in entries}))
            recorded: list[bool] = []
            for event_id, _ in entries:
                recorded.append(event_id not in seen)
                seen.add(event_id)
            fresh = [entry for entry, new in zip(entries, recorded, strict=True) if new]
            if fresh:
                await self._inbox.add(tx, [event_id for event_id, _ in fresh])
            notices = [notification for _, notification in fresh if notification is not None]
            if notices:
                await tx.executemany(
                    self._insert.sql, [self._insert.row(notice) for notice in notices]
                )
                if announce is not None:
                    for notice in notices:
                        announce(notice)
        return recorded

    async def claim_due(
        self, *, now: datetime, hold_until: datetime, channels: Collection[Channel], limit: int
    ) -> list[Notification]:
        if not channels:
            return []
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(notifications)
                    .where(notifications.c.next_attempt_at <= to_db_time(now))
                    .where(notifications.c.channel.in_(list(channels)))
                    .order_by(notifications.c.next_attempt_at)
                    .limit(limit)
                )
            ).all()
        claimed: list[Notification] = []
        for row in rows:
            # Compare-and-set on the attempt count: of two sweepers, one wins each row.
            try:
                async with self._engine.begin() as conn:
                    won = await conn.execute(
                        update(notifications)
                        .where(notifications.c.id == row.id)
                        .where(notifications.c.attempts == row.attempts)
                        .where(notifications.c.next_attempt_at <= to_db_time(now))
                        .values(attempts=row.attempts + 1, next_attempt_at=to_db_time(hold_until))
                    )
            except OperationalError as exc:
                if not is_lock_conflict(exc):
                    raise
                continue  # InnoDB chose this claim as a deadlock victim: another sweeper has it
            if won.rowcount == 1:
                claimed.append(
                    replace(
                        _notification(row), attempts=row.attempts + 1, next_attempt_at=hold_until
                    )
                )
        return claimed

    async def mark_done(self, notification_id: str, *, status: Status, now: datetime) -> None:
        await self._update(
            notification_id,
            status=status,
            sent_at=to_db_time(now),
            next_attempt_at=None,
            last_error=None,
        )

    async def mark_failed(
        self, notification_id: str, *, error: str, next_attempt_at: datetime | None
    ) -> None:
        await self._update(
            notification_id,
            status="FAILED",
            last_error=error[:2000],
            next_attempt_at=to_db_time(next_attempt_at),
        )

    async def _update(self, notification_id: str, **values: Any) -> None:
        # A sweeper's claim on the same row may make InnoDB roll this back as a deadlock
        # victim; the update is idempotent, so it is simply run again.
        await execute_retrying(
            self._engine, _UPDATE_ONE, {"notification_id": notification_id, **values}
        )

    async def of_user(
        self, user_id: str, *, order_number: str | None, limit: int, offset: int
    ) -> list[Notification]:
        query = select(notifications).where(notifications.c.user_id == user_id)
        if order_number is not None:
            query = query.where(notifications.c.order_number == order_number)
        query = (
            query.order_by(notifications.c.created_at.desc(), notifications.c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_notification(row) for row in rows]

    async def by_event(self, event_id: str) -> Notification | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(notifications).where(notifications.c.event_id == event_id)
                )
            ).first()
        return None if row is None else _notification(row)
