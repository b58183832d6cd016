"""Persistence of orders, Idempotency-Keys and pending releases: a small protocol and its
SQLAlchemy (Core) backend.

The same code runs on SQLite and MySQL/MariaDB. Times are stored as naive UTC, money as
whole cents. Every change that others must hear about writes its event to the outbox in
the same transaction.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shop.order.domain import Order, OrderLine, OrderStatus, cents, from_cents
from shop.platform.db import (
    Timestamp,
    execute_retrying,
    from_db_time,
    retry_on_lock_conflict,
    to_db_time,
)
from shop.platform.events import Event
from shop.platform.outbox import add_event

__all__ = [
    "ORDERS_TOPIC",
    "ClaimOutcome",
    "DueRelease",
    "KeyClaim",
    "KeyLost",
    "OrderStore",
    "PendingReleases",
    "ReservationLapsed",
    "SavedAnswer",
    "SqlOrderStore",
    "idempotency_keys",
    "metadata",
    "order_lines",
    "orders",
    "pending_releases",
]

ORDERS_TOPIC = "orders"


metadata = MetaData()

orders = Table(
    "orders",
    metadata,
    Column("order_number", String(36), primary_key=True),
    Column("user_id", String(64), nullable=False),
    Column("buyer_email", String(320), nullable=False),
    Column("status", String(16), nullable=False),
    Column("total_cents", BigInteger, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("cancelled_at", Timestamp, nullable=True),
    Index("ix_orders_user_newest", "user_id", "created_at", "order_number"),
)

order_lines = Table(
    "order_lines",
    metadata,
    Column(
        "order_number",
        String(36),
        ForeignKey("orders.order_number", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("line_no", Integer, primary_key=True, autoincrement=False),
    Column("sku_code", String(64), nullable=False),
    Column("quantity", Integer, nullable=False),
    Column("unit_price_cents", BigInteger, nullable=False),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("user_id", String(64), primary_key=True),
    Column("idempotency_key", String(255), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("status_code", Integer, nullable=True),
    Column("response_body", Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")),
    Column("order_number", String(36), nullable=True),
)

# A reservation to give back to the inventory. Written before a reservation is asked for
# (due once the request has surely ended) and deleted by the transaction that saves the
# order; written due at once by a cancel. ``attempts`` > 0: a release has been started.
pending_releases = Table(
    "pending_releases",
    metadata,
    Column("order_number", String(36), primary_key=True),
    Column("due_at", Timestamp, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", String(500), nullable=True),
    Index("ix_pending_releases_due", "due_at"),
)


class ClaimOutcome(enum.Enum):
    CLAIMED = "claimed"  # the key is ours: go ahead
    REPLAY = "replay"  # answered before with the same body: send that answer again
    MISMATCH = "mismatch"  # used before with another body
    IN_PROGRESS = "in-progress"  # the first request with this key is still being answered


@dataclass(frozen=True, slots=True)
class KeyClaim:
    outcome: ClaimOutcome
    status_code: int | None = None
    body: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class SavedAnswer:
    """The answer to keep with an Idempotency-Key, for replays."""

    user_id: str
    key: str
    status_code: int
    body: dict[str, Any]


class KeyLost(Exception):
    """The Idempotency-Key row this request claimed is gone (taken over as abandoned)."""


class ReservationLapsed(Exception):
    """The order's pending release is gone or started: its stock is (being) given back."""


@dataclass(frozen=True, slots=True)
class DueRelease:
    order_number: str
    attempts: int


class PendingReleases(Protocol):
    """Reservations to give back to the inventory, kept until the inventory confirms."""

    async def hold_release(self, order_number: str, *, due_at: datetime) -> None:
        """Before reserving: release this order's stock at ``due_at`` unless it is saved."""

    async def drop_release(self, order_number: str) -> None:
        """Nothing was reserved after all: forget a release no one has started."""

    async def release_due_now(self, order_number: str, *, now: datetime) -> None:
        """The order will not be saved: release its stock as soon as possible."""

    async def due_releases(self, *, now: datetime, limit: int) -> list[DueRelease]: ...

    async def claim_release(
        self, order_number: str, *, attempts: int, now: datetime, retry_at: datetime
    ) -> bool:
        """Start a release: one more attempt, and not due again before ``retry_at``.

        False when it is not due or another caller started it since ``attempts`` was read.
        """

    async def release_done(self, order_number: str) -> None: ...

    async def release_failed(self, order_number: str, *, error: str) -> None: ...


class OrderStore(PendingReleases, Protocol):
    async def claim_key(
        self, *, user_id: str, key: str, fingerprint: str, now: datetime, stale_after: timedelta
    ) -> KeyClaim: ...

    async def forget_key(self, *, user_id: str, key: str) -> None:
        """Drop an unanswered claim so the client may try again with the same key."""

    async def save_placed(
        self, order: Order, *, event: Event, answer: SavedAnswer | None = None
    ) -> None:
        """The order, its lines, its event and the key's answer: all in one transaction,
        which also drops the order's pending release (ReservationLapsed if it is gone or
        already started: then nothing is saved)."""

    async def order(self, order_number: str) -> Order | None: ...

    async def orders_of(self, user_id: str, *, limit: int, offset: int) -> tuple[list[Order], int]:
        """One page of the user's orders, newest first, and how many there are in all."""

    async def cancel(
        self, order_number: str, *, event: Event, now: datetime, release_retry_at: datetime
    ) -> bool:
        """PLACED → CANCELLED with its event and its stock release, in one transaction;
        False if it was not PLACED (nothing changes).

        The release is written as started by the caller (one attempt), due again at
        ``release_retry_at`` should the caller not confirm it by then.
        """


class SqlOrderStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def claim_key(
        self, *, user_id: str, key: str, fingerprint: str, now: datetime, stale_after: timedelta
    ) -> KeyClaim:
        # Inserting first makes the unique key the referee between concurrent requests.
        for _ in range(3):
            try:
                async with self._engine.begin() as conn:
                    await conn.execute(
                        insert(idempotency_keys).values(
                            user_id=user_id,
                            idempotency_key=key,
                            request_hash=fingerprint,
                            created_at=to_db_time(now),
                        )
                    )
                return KeyClaim(ClaimOutcome.CLAIMED)
            except IntegrityError:
                pass
            async with self._engine.begin() as conn:
                row = (
                    await conn.execute(
                        select(idempotency_keys).where(
                            idempotency_keys.c.user_id == user_id,
                            idempotency_keys.c.idempotency_key == key,
                        )
                    )
                ).one_or_none()
                if row is None:
                    continue  # the other attempt failed and let the key go: try again
                if row.request_hash != fingerprint:
                    return KeyClaim(ClaimOutcome.MISMATCH)
                if row.status_code is not None:
                    return KeyClaim(
                        ClaimOutcome.REPLAY,
                        status_code=row.status_code,
                        body=json.loads(row.response_body),
                    )
                if from_db_time(row.created_at) > now - stale_after:
                    return KeyClaim(ClaimOutcome.IN_PROGRESS)
                # Its process died mid-request: take the key over, unless another did first.
                taken = await conn.execute(
                    update(idempotency_keys)
                    .where(
                        idempotency_keys.c.user_id == user_id,
                        idempotency_keys.c.idempotency_key == key,
                        idempotency_keys.c.status_code.is_(None),
                        idempotency_keys.c.created_at == row.created_at,
                    )
                    .values(created_at=to_db_time(now))
                )
                if taken.rowcount == 1:
                    return KeyClaim(ClaimOutcome.CLAIMED)
                return KeyClaim(ClaimOutcome.IN_PROGRESS)
        return KeyClaim(ClaimOutcome.IN_PROGRESS)

    async def forget_key(self, *, user_id: str, key: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                delete(idempotency_keys).where(
                    idempotency_keys.c.user_id == user_id,
                    idempotency_keys.c.idempotency_key == key,
                    idempotency_keys.c.status_code.is_(None),
                )
            )

    async def save_placed(
        self, order: Order, *, event: Event, answer: SavedAnswer | None = None
    ) -> None:
        async with self._engine.begin() as conn:
            # First: a release the reconciler started (or finished) means the stock is on
            # its way back, and an order without its stock must not be saved.
            kept = await conn.execute(
                delete(pending_releases).where(
                    pending_releases.c.order_number == order.order_number,
                    pending_releases.c.attempts == 0,
                )
            )
            if kept.rowcount != 1:
                raise ReservationLapsed(order.order_number)
            await conn.execute(
                insert(orders).values(
                    order_number=order.order_number,
                    user_id=order.user_id,
                    buyer_email=order.buyer_email,
                    status=order.status.value,
                    total_cents=cents(order.total),
                    created_at=to_db_time(order.created_at),
                )
            )
            await conn.execute(
                insert(order_lines),
                [
                    {
                        "order_number": order.order_number,
                        "line_no": number,
                        "sku_code": line.sku_code,
                        "quantity": line.quantity,
                        "unit_price_cents": cents(line.unit_price),
                    }
                    for number, line in enumerate(order.lines, start=1)
                ],
            )
            await add_event(conn, topic=ORDERS_TOPIC, event=event)
            if answer is not None:
                kept = await conn.execute(
                    update(idempotency_keys)
                    .where(
                        idempotency_keys.c.user_id == answer.user_id,
                        idempotency_keys.c.idempotency_key == answer.key,
                        idempotency_keys.c.status_code.is_(None),
                    )
                    .values(
                        status_code=answer.status_code,
                        response_body=json.dumps(answer.body, separators=(",", ":")),
                        order_number=order.order_number,
                    )
                )
                if kept.rowcount != 1:
                    raise KeyLost(answer.key)

    async def order(self, order_number: str) -> Order | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(select(orders).where(orders.c.order_number == order_number))
            ).one_or_none()
            if row is None:
                return None
            found = await self._with_lines(conn, [row])
        return found[0]

    async def orders_of(self, user_id: str, *, limit: int, offset: int) -> tuple[list[Order], int]:
        async with self._engine.connect() as conn:
            total = int(
                (
                    await conn.execute(
                        select(func.count()).select_from(orders).where(orders.c.user_id == user_id)
                    )
                ).scalar_one()
            )
            rows = (
                await conn.execute(
                    select(orders)
                    .where(orders.c.user_id == user_id)
                    .order_by(orders.c.created_at.desc(), orders.c.order_number.desc())
                    .limit(limit)
                    .offset(offset)
                )
            ).all()
            return await self._with_lines(conn, rows), total

    async def cancel(
        self, order_number: str, *, event: Event, now: datetime, release_retry_at: datetime
    ) -> bool:
        async with self._engine.begin() as conn:
            changed = await conn.execute(
                update(orders)
                .where(
                    orders.c.order_number == order_number,
                    orders.c.status == OrderStatus.PLACED.value,
                )
                .values(status=OrderStatus.CANCELLED.value, cancelled_at=to_db_time(now))
            )
            if changed.rowcount != 1:
                return False
            await add_event(conn, topic=ORDERS_TOPIC, event=event)
            await conn.execute(
                delete(pending_releases).where(pending_releases.c.order_number == order_number)
            )
            await conn.execute(
                insert(pending_releases).values(
                    order_number=order_number, due_at=to_db_time(release_retry_at), attempts=1
                )
            )
        return True

    async def hold_release(self, order_number: str, *, due_at: datetime) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                insert(pending_releases).values(
                    order_number=order_number, due_at=to_db_time(due_at), attempts=0
                )
            )

    async def drop_release(self, order_number: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                delete(pending_releases).where(
                    pending_releases.c.order_number == order_number,
                    pending_releases.c.attempts == 0,
                )
            )

    async def release_due_now(self, order_number: str, *, now: datetime) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                update(pending_releases)
                .where(pending_releases.c.order_number == order_number)
                .values(due_at=to_db_time(now))
            )

    async def due_releases(self, *, now: datetime, limit: int) -> list[DueRelease]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(pending_releases.c.order_number, pending_releases.c.attempts)
                .where(pending_releases.c.due_at <= to_db_time(now))
                .order_by(pending_releases.c.due_at, pending_releases.c.order_number)
                .limit(limit)
            )
            return [DueRelease(row.order_number, int(row.attempts)) for row in rows]

    async def claim_release(
        self, order_number: str, *, attempts: int, now: datetime, retry_at: datetime
    ) -> bool:
        async def once() -> bool:
            async with self._engine.begin() as conn:
                claimed = await conn.execute(
                    update(pending_releases)
                    .where(
                        pending_releases.c.order_number == order_number,
                        pending_releases.c.attempts == attempts,
                        pending_releases.c.due_at <= to_db_time(now),
                    )
                    .values(attempts=attempts + 1, due_at=to_db_time(retry_at))
                )
            return bool(claimed.rowcount == 1)

        # Racing claims on one row can end in an InnoDB deadlock; run again, the compare
        # then tells who won.
        return await retry_on_lock_conflict(once)

    async def release_done(self, order_number: str) -> None:
        await execute_retrying(
            self._engine,
            delete(pending_releases).where(pending_releases.c.order_number == order_number),
        )

    async def release_failed(self, order_number: str, *, error: str) -> None:
        await execute_retrying(
            self._engine,
            update(pending_releases)
            .where(pending_releases.c.order_number == order_number)
            .values(last_error=error[:500]),
        )

    async def _with_lines(self, conn: AsyncConnection, rows: Sequence[Any]) -> list[Order]:
        if not rows:
            return []
        numbers = [row.order_number for row in rows]
        lines: dict[str, list[OrderLine]] = {n: [] for n in numbers}
        for line in await conn.execute(
            select(order_lines)
            .where(order_lines.c.order_number.in_(numbers))
            .order_by(order_lines.c.order_number, order_lines.c.line_no)
        ):
            lines[line.order_number].append(
                OrderLine(line.sku_code, line.quantity, from_cents(line.unit_price_cents))
            )
        return [
            Order(
                order_number=row.order_number,
                user_id=row.user_id,
                buyer_email=row.buyer_email,
                status=OrderStatus(row.status),
                lines=tuple(lines[row.order_number]),
                created_at=from_db_time(row.created_at),
            )
            for row in rows
        ]
