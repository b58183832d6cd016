"""Persistence of stock and reservations: a small protocol and its SQLAlchemy (Core) backend.

The same code runs on SQLite and MySQL/MariaDB. Stock only ever moves through conditional
single-statement updates (``quantity = quantity - n WHERE quantity >= n``), so no
interleaving of requests can sell a unit twice; times are stored as naive UTC.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    MetaData,
    String,
    Table,
    and_,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shop.inventory.domain import (
    OutOfStock,
    Reservation,
    ReservationLine,
    ReservationStatus,
    StockBusy,
    StockLevel,
    in_lock_order,
    replay,
    shortages,
)
from shop.platform.db import Timestamp, is_lock_conflict, is_mysql, to_db_time
from shop.platform.inbox import first_delivery

__all__ = ["CONSUMER", "InventoryStore", "SqlInventoryStore", "metadata"]

# The inbox's name for this service's consumer of catalogue events.
CONSUMER = "inventory-service"


metadata = MetaData()


# SKU codes compare byte for byte on every backend, as the product service's do (MySQL's
# default collation would make PIXEL_8 and pixel_8 one SKU).
SKU_CODE = String(64).with_variant(
    mysql.VARCHAR(64, charset="ascii", collation="ascii_bin"), "mysql", "mariadb"
)

stock = Table(
    "stock",
    metadata,
    Column("sku_code", SKU_CODE, primary_key=True),
    Column("quantity", BigInteger, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    CheckConstraint("quantity >= 0", name="ck_stock_quantity_not_negative"),
)

reservations = Table(
    "reservations",
    metadata,
    Column("order_number", String(36), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("released_at", Timestamp, nullable=True),
)

reservation_lines = Table(
    "reservation_lines",
    metadata,
    Column(
        "order_number",
        String(36),
        ForeignKey("reservations.order_number", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("sku_code", SKU_CODE, primary_key=True),
    Column("quantity", BigInteger, nullable=False),
)

T = TypeVar("T")


class InventoryStore(Protocol):
    async def quantities(self, sku_codes: Sequence[str]) -> dict[str, int]:
        """Available units of the SKUs that have a stock row (unknown ones are absent)."""

    async def add_stock(self, sku_code: str, quantity: int, *, now: datetime) -> int:
        """Add units (creating the SKU); returns the new total."""

    async def set_stock(self, sku_code: str, quantity: int, *, now: datetime) -> int: ...

    async def seed_if_empty(self, levels: Mapping[str, int], *, now: datetime) -> bool:
        """Stock ``levels`` if no SKU is stocked yet; True if this call did it."""

    async def register_sku(self, sku_code: str, *, event_id: str, now: datetime) -> bool:
        """Know ``sku_code`` with 0 units if it is not known yet (never touching the stock of
        a known one), and remember the event, atomically. False, changing nothing, when the
        event was applied before."""

    async def all_levels(self, *, limit: int, offset: int) -> tuple[list[StockLevel], int]:
        """A page of every known SKU, by SKU code, and how many there are."""

    async def reserve(
        self, order_number: str, lines: Sequence[ReservationLine], *, now: datetime
    ) -> Reservation:
        """Take every line from stock or none (raises OutOfStock); idempotent by order number.

        A repeat of a stored reservation returns it; a different or released one raises
        ReservationConflict.
        """

    async def release(self, order_number: str, *, now: datetime) -> bool:
        """Return a reservation's units to stock once; True if this call did it."""

    async def reservation(self, order_number: str) -> Reservation | None: ...


class _TryAgain(Exception):
    """This attempt lost a race whose outcome is now settled; running it again will tell."""


class _Known(Exception):
    """The order number already has a reservation row."""


class SqlInventoryStore:
    def __init__(self, engine: AsyncEngine, *, attempts: int = 3) -> None:
        self._engine = engine
        self._attempts = attempts

    async def quantities(self, sku_codes: Sequence[str]) -> dict[str, int]:
        if not sku_codes:
            return {}
        async with self._engine.connect() as conn:
            return await self._quantities(conn, sku_codes)

    @staticmethod
    async def _quantities(conn: AsyncConnection, sku_codes: Sequence[str]) -> dict[str, int]:
        rows = await conn.execute(
            select(stock.c.sku_code, stock.c.quantity).where(stock.c.sku_code.in_(sku_codes))
        )
        return {row.sku_code: int(row.quantity) for row in rows}

    def _upsert(self, sku_code: str, quantity: int, *, now: datetime, add: bool) -> Any:
        values = {"sku_code": sku_code, "quantity": quantity, "updated_at": to_db_time(now)}
        if is_mysql(self._engine):
            my = mysql.insert(stock).values(**values)
            new = my.inserted.quantity
            return my.on_duplicate_key_update(
                quantity=stock.c.quantity + new if add else new, updated_at=my.inserted.updated_at
            )
        lite = sqlite.insert(stock).values(**values)
        new = lite.excluded.quantity
        return lite.on_conflict_do_update(
            index_elements=[stock.c.sku_code],
            set_={
                "quantity": stock.c.quantity + new if add else new,
                "updated_at": lite.excluded.updated_at,
            },
        )

    async def _write_level(self, sku_code: str, quantity: int, *, now: datetime, add: bool) -> int:
        return await self._retrying(
            lambda: self._write_level_once(sku_code, quantity, now=now, add=add)
        )

    async def _write_level_once(
        self, sku_code: str, quantity: int, *, now: datetime, add: bool
    ) -> int:
        async with self._engine.begin() as conn:
            await conn.execute(self._upsert(sku_code, quantity, now=now, add=add))
            # Our row lock is still held, so this is our total, not a later writer's.
            total = await conn.scalar(select(stock.c.quantity).where(stock.c.sku_code == sku_code))
        return int(total or 0)

    async def add_stock(self, sku_code: str, quantity: int, *, now: datetime) -> int:
        return await self._write_level(sku_code, quantity, now=now, add=True)

    async def set_stock(self, sku_code: str, quantity: int, *, now: datetime) -> int:
        return await self._write_level(sku_code, quantity, now=now, add=False)

    async def seed_if_empty(self, levels: Mapping[str, int], *, now: datetime) -> bool:
        try:
            async with self._engine.begin() as conn:
                if await conn.scalar(select(func.count()).select_from(stock)):
                    return False
                await conn.execute(
                    insert(stock),
                    [
                        {"sku_code": sku, "quantity": qty, "updated_at": to_db_time(now)}
                        for sku, qty in levels.items()
                    ],
                )
        except IntegrityError:
            return False  # another instance seeded at the same moment
        return True

    async def register_sku(self, sku_code: str, *, event_id: str, now: datetime) -> bool:
        return await self._retrying(lambda: self._register_sku_once(sku_code, event_id, now=now))

    async def _register_sku_once(self, sku_code: str, event_id: str, *, now: datetime) -> bool:
        async with self._engine.begin() as conn:
            if not await first_delivery(conn, consumer=CONSUMER, event_id=event_id):
                return False
            values = {"sku_code": sku_code, "quantity": 0, "updated_at": to_db_time(now)}
            if is_mysql(self._engine):
                my = mysql.insert(stock).values(**values)
                # A no-op update: MySQL's way to insert only what is missing (INSERT IGNORE
                # would also swallow other errors).
                await conn.execute(my.on_duplicate_key_update(sku_code=stock.c.sku_code))
            else:
                lite = sqlite.insert(stock).values(**values)
                await conn.execute(lite.on_conflict_do_nothing(index_elements=[stock.c.sku_code]))
        return True

    async def all_levels(self, *, limit: int, offset: int) -> tuple[list[StockLevel], int]:
        async with self._engine.connect() as conn:
            total = await conn.scalar(select(func.count()).select_from(stock))
            rows = await conn.execute(
                select(stock.c.sku_code, stock.c.quantity)
                .order_by(stock.c.sku_code)
                .limit(limit)
                .offset(offset)
            )
            page = [StockLevel(row.sku_code, int(row.quantity)) for row in rows]
        return page, int(total or 0)

    async def _retrying(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run a whole transaction again when the database rolled it back to break a tie."""
        for attempt in range(1, self._attempts + 1):
            try:
                return await operation()
            except _TryAgain:
                pass
            except OperationalError as exc:
                if not is_lock_conflict(exc):
                    raise
            await asyncio.sleep(random.uniform(0.005, 0.02) * attempt)  # noqa: S311 - jitter
        raise StockBusy(f"gave up after {self._attempts} attempts")

    async def reserve(
        self, order_number: str, lines: Sequence[ReservationLine], *, now: datetime
    ) -> Reservation:
        return await self._retrying(lambda: self._reserve_once(order_number, lines, now=now))

    async def _reserve_once(
        self, order_number: str, lines: Sequence[ReservationLine], *, now: datetime
    ) -> Reservation:
        try:
            async with self._engine.begin() as conn:
                # The primary key is the idempotency guard: of two identical requests racing,
                # the second waits here for the first, then finds its committed reservation.
                try:
                    await conn.execute(
                        insert(reservations).values(
                            order_number=order_number,
                            status=ReservationStatus.RESERVED.value,
                            created_at=to_db_time(now),
                        )
                    )
                except IntegrityError as exc:
                    raise _Known from exc
                await self._take_stock(conn, lines, now=now)
                await conn.execute(
                    insert(reservation_lines),
                    [
                        {
                            "order_number": order_number,
                            "sku_code": line.sku_code,
                            "quantity": line.quantity,
                        }
                        for line in lines
                    ],
                )
        except _Known:
            existing = await self.reservation(order_number)
            if existing is None:
                # The one we collided with was rolled back (it was short): we may still fit.
                raise _TryAgain from None
            return replay(existing, lines)
        return Reservation(order_number, ReservationStatus.RESERVED, tuple(lines))

    async def _take_stock(
        self, conn: AsyncConnection, lines: Sequence[ReservationLine], *, now: datetime
    ) -> None:
        ordered = in_lock_order(lines)
        for index, line in enumerate(ordered):
            taken = await conn.execute(
                update(stock)
                .where(and_(stock.c.sku_code == line.sku_code, stock.c.quantity >= line.quantity))
                .values(quantity=stock.c.quantity - line.quantity, updated_at=to_db_time(now))
            )
            if taken.rowcount != 1:
                # Lines before this one hold our own decrements, so read only the rest.
                rest = ordered[index:]
                short = shortages(rest, await self._quantities(conn, [x.sku_code for x in rest]))
                if not short:
                    raise _TryAgain  # stock came in between our update and our read
                raise OutOfStock(short)

    async def release(self, order_number: str, *, now: datetime) -> bool:
        return await self._retrying(lambda: self._release_once(order_number, now=now))

    async def _release_once(self, order_number: str, *, now: datetime) -> bool:
        async with self._engine.begin() as conn:
            # Conditional on RESERVED: of two racing releases, exactly one returns the units.
            released = await conn.execute(
                update(reservations)
                .where(
                    and_(
                        reservations.c.order_number == order_number,
                        reservations.c.status == ReservationStatus.RESERVED.value,
                    )
                )
                .values(status=ReservationStatus.RELEASED.value, released_at=to_db_time(now))
            )
            if released.rowcount != 1:
                await self._leave_tombstone(conn, order_number, now=now)
                return False
            rows = await conn.execute(
                select(reservation_lines.c.sku_code, reservation_lines.c.quantity).where(
                    reservation_lines.c.order_number == order_number
                )
            )
            lines = [ReservationLine(row.sku_code, int(row.quantity)) for row in rows]
            for line in in_lock_order(lines):
                await conn.execute(
                    update(stock)
                    .where(stock.c.sku_code == line.sku_code)
                    .values(quantity=stock.c.quantity + line.quantity, updated_at=to_db_time(now))
                )
        return True

    @staticmethod
    async def _leave_tombstone(conn: AsyncConnection, order_number: str, *, now: datetime) -> None:
        """Mark an order number never reserved as released, so a late request cannot reserve.

        The order service releases when it gave up waiting for a reservation; the request
        it gave up on may still arrive, and must not then hold stock no order will use.
        """
        known = await conn.scalar(
            select(func.count())
            .select_from(reservations)
            .where(reservations.c.order_number == order_number)
        )
        if known:
            return
        try:
            await conn.execute(
                insert(reservations).values(
                    order_number=order_number,
                    status=ReservationStatus.RELEASED.value,
                    created_at=to_db_time(now),
                    released_at=to_db_time(now),
                )
            )
        except IntegrityError as exc:
            raise _TryAgain from exc  # a reservation landed just now: release that instead

    async def reservation(self, order_number: str) -> Reservation | None:
        async with self._engine.connect() as conn:
            head = (
                await conn.execute(
                    select(reservations.c.status).where(reservations.c.order_number == order_number)
                )
            ).first()
            if head is None:
                return None
            rows = await conn.execute(
                select(reservation_lines.c.sku_code, reservation_lines.c.quantity)
                .where(reservation_lines.c.order_number == order_number)
                .order_by(reservation_lines.c.sku_code)
            )
            lines = tuple(ReservationLine(row.sku_code, int(row.quantity)) for row in rows)
        return Reservation(order_number, ReservationStatus(head.status), lines)
