"""Persistence of stock and reservations: a small protocol and its SQLAlchemy (Core) backend.

The same code runs on SQLite and MySQL/MariaDB. Stock only ever moves through conditional
single-statement updates (``quantity = quantity - n WHERE quantity >= n``), so no
interleaving of requests can sell a unit twice; times are stored as naive UTC.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
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

from shop.inventory.batching import GroupCommit
from shop.inventory.domain import (
    InventoryError,
    Reservation,
    ReservationAsk,
    ReservationLine,
    ReservationStatus,
    StockBusy,
    StockLevel,
    in_lock_order,
    settle,
)
from shop.platform.db import Timestamp, is_lock_conflict, is_mysql, to_db_time
from shop.platform.inbox import first_delivery
from shop.platform.rawsql import Many, RawSql, RawTransaction, Rows

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


@dataclass(frozen=True, slots=True)
class _Ask:
    order_number: str
    lines: tuple[ReservationLine, ...]
    now: datetime


class _ReservationSql:
    """The reservation path's statements, written out for one DBAPI: no SQLAlchemy
    compilation per request, and as few statements per group as the work allows."""

    def __init__(self, *, placeholder: str, mysql: bool) -> None:
        self._p = placeholder
        # On SQLite the group's transaction is a ``BEGIN IMMEDIATE`` (rawsql.py): the write
        # lock is taken before reading, so the levels read are the ones the group writes
        # against. MySQL locks the rows it reads instead.
        self._lock = " ORDER BY sku_code FOR UPDATE" if mysql else ""
        p = placeholder
        # Only placeholders are formatted into these statements, never a value (hence S608).
        values = f"VALUES ({p}, {p}, {p})"
        heads, lines = "reservations (order_number, status, created_at)", "reservation_lines"
        self.insert_reservations = f"INSERT INTO {heads} {values}"  # noqa: S608
        self.insert_lines = f"INSERT INTO {lines} (order_number, sku_code, quantity) {values}"  # noqa: S608
        self.lock_stock = cache(self._lock_stock)
        self.take_stock = cache(self._take_stock)
        self.reservations_of = cache(self._reservations_of)
        self.lines_of = cache(self._lines_of)

    def _marks(self, count: int) -> str:
        return ", ".join([self._p] * count)

    def _lock_stock(self, count: int) -> str:
        marks = self._marks(count)
        return f"SELECT sku_code, quantity FROM stock WHERE sku_code IN ({marks}){self._lock}"  # noqa: S608

    def _take_stock(self, count: int) -> str:
        p = self._p
        cases = " ".join([f"WHEN {p} THEN {p}"] * count)
        marks = self._marks(count)
        taken = f"quantity - CASE sku_code {cases} END"
        return f"UPDATE stock SET quantity = {taken}, updated_at = {p} WHERE sku_code IN ({marks})"  # noqa: S608

    def _reservations_of(self, count: int) -> str:
        marks = self._marks(count)
        return f"SELECT order_number, status FROM reservations WHERE order_number IN ({marks})"  # noqa: S608

    def _lines_of(self, count: int) -> str:
        marks = self._marks(count)
        columns = "order_number, sku_code, quantity"
        return f"SELECT {columns} FROM reservation_lines WHERE order_number IN ({marks})"  # noqa: S608


# A group is at most this many requests and this many lines (a request has at most 100).
GROUP_MAX_ASKS = 128
GROUP_MAX_LINES = 1000


class SqlInventoryStore:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        attempts: int = 3,
        group_window_s: float = 0.0005,
        group_max_asks: int = GROUP_MAX_ASKS,
    ) -> None:
        self._engine = engine
        self._attempts = attempts
        # The reservation groups' transactions skip SQLAlchemy on SQLite (rawsql.py).
        self._raw = RawSql(engine)
        dialect = engine.dialect
        self._sql = _ReservationSql(
            placeholder="?" if dialect.paramstyle == "qmark" else "%s", mysql=is_mysql(engine)
        )
        self._bind_time = Timestamp.dialect_impl(dialect).bind_processor(dialect)
        # Reservations that arrive together share one transaction (see batching.py).
        self._group: GroupCommit[_Ask, Reservation] = GroupCommit(
            self._reserve_group,
            weigh=lambda ask: len(ask.lines),
            max_asks=group_max_asks,
            max_weight=GROUP_MAX_LINES,
            window_s=group_window_s,
        )

    def _db_time(self, moment: datetime) -> Any:
        """``moment`` as the driver takes it for a ``Timestamp`` column."""
        naive = to_db_time(moment)
        return self._bind_time(naive) if self._bind_time else naive

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
        return await self._group.submit(_Ask(order_number, tuple(lines), now))

    async def _reserve_group(self, asks: Sequence[_Ask]) -> list[Reservation | Exception]:
        try:
            outcomes = await self._retrying(lambda: self._reserve_group_once(asks))
        except StockBusy:
            return [StockBusy(f"gave up after {self._attempts} attempts") for _ in asks]
        return list(outcomes)

    async def _reserve_group_once(self, asks: Sequence[_Ask]) -> list[Reservation | InventoryError]:
        """One transaction for a group of reservations: a handful of statements in all.

        The group's stock rows are locked (sorted, so two groups never wait on each other),
        every request is decided against them in arrival order (``settle``), and then the new
        reservations, their lines and one decrement per SKU are written.
        """
        sql = self._sql
        order_numbers = list(dict.fromkeys(ask.order_number for ask in asks))
        sku_codes = sorted({line.sku_code for ask in asks for line in ask.lines})
        try:
            async with self._raw.writing() as tx:
                # Reads, then writes: each a pipeline (one round trip on MySQL).
                heads, rows = await tx.pipeline(
                    [
                        (sql.reservations_of(len(order_numbers)), order_numbers),
                        (sql.lock_stock(len(sku_codes)), sku_codes),
                    ]
                )
                known = await self._stored(tx, heads)
                available = {sku: int(quantity) for sku, quantity in rows.rows}
                settled = settle(
                    [ReservationAsk(ask.order_number, ask.lines) for ask in asks],
                    available=available,
                    known=known,
                )
                if settled.new:
                    now = self._db_time(asks[0].now)
                    reserved = ReservationStatus.RESERVED.value
                    taken = sorted(settled.taken.items())
                    *_, decremented = await tx.pipeline(
                        [
                            Many(
                                sql.insert_reservations,
                                [(r.order_number, reserved, now) for r in settled.new],
                            ),
                            Many(
                                sql.insert_lines,
                                [
                                    (r.order_number, line.sku_code, line.quantity)
                                    for r in settled.new
                                    for line in r.lines
                                ],
                            ),
                            (
                                sql.take_stock(len(taken)),
                                (
                                    *(v for item in taken for v in item),
                                    now,
                                    *(sku for sku, _ in taken),
                                ),
                            ),
                        ]
                    )
                    if decremented.rowcount != len(taken):
                        raise _TryAgain  # cannot happen under the lock; never write on a guess
        except IntegrityError as exc:
            # Another instance stored one of these order numbers just now: read it next time.
            raise _TryAgain from exc
        return settled.outcomes

    async def _stored(self, tx: RawTransaction, heads: Rows) -> dict[str, Reservation]:
        """The reservations already stored (``heads``: their numbers and statuses, read in
        ``tx``), with their lines."""
        sql = self._sql
        statuses = {order: ReservationStatus(status) for order, status in heads.rows}
        if not statuses:
            return {}
        rows = await tx.execute(sql.lines_of(len(statuses)), tuple(statuses))
        lines: dict[str, list[ReservationLine]] = {order: [] for order in statuses}
        for order, sku, quantity in rows.rows:
            lines[order].append(ReservationLine(sku, int(quantity)))
        return {
            order: Reservation(order, status, tuple(lines[order]))
            for order, status in statuses.items()
        }

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
