"""Persistence of orders and Idempotency-Keys: a small protocol and its SQLAlchemy (Core) backend.

The same code runs on SQLite and MySQL/MariaDB. Times are stored as naive UTC, money as
whole cents. Every change that others must hear about writes its event to the outbox in
the same transaction.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
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
from shop.platform.events import Event
from shop.platform.outbox import add_event

__all__ = [
    "ORDERS_TOPIC",
    "ClaimOutcome",
    "KeyClaim",
    "KeyLost",
    "OrderStore",
    "SavedAnswer",
    "SqlOrderStore",
    "idempotency_keys",
    "metadata",
    "order_lines",
    "orders",
]

ORDERS_TOPIC = "orders"

Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

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


class OrderStore(Protocol):
    async def claim_key(
        self, *, user_id: str, key: str, fingerprint: str, now: datetime, stale_after: timedelta
    ) -> KeyClaim: ...

    async def forget_key(self, *, user_id: str, key: str) -> None:
        """Drop an unanswered claim so the client may try again with the same key."""

    async def save_placed(
        self, order: Order, *, event: Event, answer: SavedAnswer | None = None
    ) -> None:
        """The order, its lines, its event and the key's answer: all in one transaction."""

    async def order(self, order_number: str) -> Order | None: ...

    async def orders_of(self, user_id: str, *, limit: int, offset: int) -> tuple[list[Order], int]:
        """One page of the user's orders, newest first, and how many there are in all."""

    async def cancel(self, order_number: str, *, event: Event, now: datetime) -> bool:
        """PLACED → CANCELLED with its event; False if it was not PLACED (nothing changes)."""


def _naive_utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None)


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


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
                            created_at=_naive_utc(now),
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
                if _aware(row.created_at) > now - stale_after:
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
                    .values(created_at=_naive_utc(now))
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
            await conn.execute(
                insert(orders).values(
                    order_number=order.order_number,
                    user_id=order.user_id,
                    buyer_email=order.buyer_email,
                    status=order.status.value,
                    total_cents=cents(order.total),
                    created_at=_naive_utc(order.created_at),
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

    async def cancel(self, order_number: str, *, event: Event, now: datetime) -> bool:
        async with self._engine.begin() as conn:
            changed = await conn.execute(
                update(orders)
                .where(
                    orders.c.order_number == order_number,
                    orders.c.status == OrderStatus.PLACED.value,
                )
                .values(status=OrderStatus.CANCELLED.value, cancelled_at=_naive_utc(now))
            )
            if changed.rowcount != 1:
                return False
            await add_event(conn, topic=ORDERS_TOPIC, event=event)
        return True

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
                created_at=_aware(row.created_at),
            )
            for row in rows
        ]
