"""Many orders racing for the last units: none oversold, none lost, no deadlock surfacing.

Each test runs the reservations through the store with a real connection pool, all at
once (``asyncio.gather``), then checks conservation from the tables themselves:
initial stock == remaining stock + units held by RESERVED reservations.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from shop.inventory.domain import OutOfStock, Reservation, ReservationLine, ReservationStatus
from shop.inventory.store import SqlInventoryStore, reservation_lines, reservations
from shop.platform.db import create_engine, migrate

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
async def mysql_store(make_mysql_url: Callable[[], str]) -> AsyncIterator[SqlInventoryStore]:
    engine = create_engine(make_mysql_url())
    try:
        await migrate(engine, package="shop.inventory", service="inventory")
        yield SqlInventoryStore(engine)
    finally:
        await engine.dispose()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqlInventoryStore]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'inventory.db'}")
    try:
        await migrate(engine, package="shop.inventory", service="inventory")
        yield SqlInventoryStore(engine)
    finally:
        await engine.dispose()


async def _held(store: SqlInventoryStore) -> dict[str, int]:
    """Units per SKU held by RESERVED reservations, read from the tables."""
    query = (
        select(reservation_lines.c.sku_code, func.sum(reservation_lines.c.quantity))
        .join(reservations, reservations.c.order_number == reservation_lines.c.order_number)
        .where(reservations.c.status == ReservationStatus.RESERVED.value)
        .group_by(reservation_lines.c.sku_code)
    )
    async with store._engine.connect() as conn:
        return {sku: int(total) for sku, total in (await conn.execute(query)).all()}


async def _race(
    store: SqlInventoryStore, orders: Sequence[list[ReservationLine]]
) -> list[Reservation | OutOfStock]:
    async def attempt(lines: list[ReservationLine]) -> Reservation | OutOfStock:
        try:
            return await store.reserve(str(uuid.uuid4()), lines, now=NOW)
        except OutOfStock as short:
            return short

    # Every attempt runs to its end before anything is asserted, failures included.
    outcomes = await asyncio.gather(*(attempt(lines) for lines in orders), return_exceptions=True)
    errors = [o for o in outcomes if not isinstance(o, Reservation | OutOfStock)]
    assert not errors, errors[:3]
    return [o for o in outcomes if isinstance(o, Reservation | OutOfStock)]


async def _one_sku_race(store: SqlInventoryStore, *, stock: int, orders: int) -> None:
    await store.set_stock("hot", stock, now=NOW)
    wanted = [[ReservationLine("hot", 2 if i % 5 == 0 else 1)] for i in range(orders)]
    outcomes = await _race(store, wanted)

    won = [o for o in outcomes if isinstance(o, Reservation)]
    lost = [o for o in outcomes if isinstance(o, OutOfStock)]
    assert len(won) + len(lost) == orders
    reserved = sum(r.lines[0].quantity for r in won)
    remaining = (await store.quantities(["hot"]))["hot"]
    assert remaining >= 0
    assert stock == remaining + reserved == remaining + _held_total(await _held(store))
    # Stock only went down, so an order refused then could not be served now either:
    # no sale was lost to the race.
    assert lost, "demand exceeds the stock"
    assert all(remaining < short.shortages[0].requested for short in lost)
    assert all(short.shortages[0].available < short.shortages[0].requested for short in lost)


def _held_total(held: dict[str, int]) -> int:
    return sum(held.values())


@pytest.mark.mysql
async def test_sixty_orders_race_for_twenty_units(mysql_store: SqlInventoryStore) -> None:
    await _one_sku_race(mysql_store, stock=20, orders=60)


@pytest.mark.mysql
async def test_orders_taking_two_skus_in_opposite_orders_do_not_deadlock(
    mysql_store: SqlInventoryStore,
) -> None:
    await mysql_store.set_stock("left", 30, now=NOW)
    await mysql_store.set_stock("right", 30, now=NOW)
    rng = random.Random(7)
    orders = []
    for i in range(60):
        pair = [ReservationLine("left", rng.randint(1, 2)), ReservationLine("right", 1)]
        orders.append(pair if i % 2 else pair[::-1])
    outcomes = await _race(mysql_store, orders)

    won = [o for o in outcomes if isinstance(o, Reservation)]
    assert won, "some orders must fit"
    assert any(isinstance(o, OutOfStock) for o in outcomes), "demand exceeds the stock"
    remaining = await mysql_store.quantities(["left", "right"])
    assert min(remaining.values()) >= 0
    held = await _held(mysql_store)
    for sku in ("left", "right"):
        taken = sum(line.quantity for r in won for line in r.lines if line.sku_code == sku)
        assert held[sku] == taken
        assert remaining[sku] + taken == 30


@pytest.mark.mysql
async def test_reserves_and_releases_interleaved_conserve_stock(
    mysql_store: SqlInventoryStore,
) -> None:
    await mysql_store.set_stock("hot", 10, now=NOW)
    first = [str(uuid.uuid4()) for _ in range(10)]
    for order in first:
        await mysql_store.reserve(order, [ReservationLine("hot", 1)], now=NOW)

    async def release(order: str) -> None:
        await mysql_store.release(order, now=NOW)

    newcomers = [[ReservationLine("hot", 1)] for _ in range(20)]
    outcomes, _ = await asyncio.gather(
        _race(mysql_store, newcomers),
        asyncio.gather(*(release(order) for order in first + first)),
    )
    won = sum(isinstance(o, Reservation) for o in outcomes)
    remaining = (await mysql_store.quantities(["hot"]))["hot"]
    assert 0 <= won <= 10
    assert remaining + won == 10 == remaining + _held_total(await _held(mysql_store))


async def test_twenty_orders_race_for_eight_units_on_sqlite(
    sqlite_store: SqlInventoryStore,
) -> None:
    await _one_sku_race(sqlite_store, stock=8, orders=20)


@pytest.fixture
async def any_store(database_url: str) -> AsyncIterator[SqlInventoryStore]:
    """SQLite, then MariaDB (``database_url`` is parametrised over both)."""
    engine = create_engine(database_url)
    try:
        await migrate(engine, package="shop.inventory", service="inventory")
        yield SqlInventoryStore(engine)
    finally:
        await engine.dispose()


async def test_two_hundred_buyers_of_several_skus_some_short(any_store: SqlInventoryStore) -> None:
    # 200 orders at once of 1-3 lines over three SKUs that cannot serve them all: they are
    # applied in shared transactions, and every unit is still accounted for.
    stock = {"hot": 60, "warm": 40, "cold": 5}
    for sku, units in stock.items():
        await any_store.set_stock(sku, units, now=NOW)
    rng = random.Random(11)
    orders = [
        [ReservationLine(sku, rng.randint(1, 3)) for sku in rng.sample(sorted(stock), k)]
        for k in (rng.randint(1, 3) for _ in range(200))
    ]
    outcomes = await _race(any_store, orders)

    won = [o for o in outcomes if isinstance(o, Reservation)]
    lost = [o for o in outcomes if isinstance(o, OutOfStock)]
    assert won and lost
    remaining = await any_store.quantities(sorted(stock))
    held = await _held(any_store)
    for sku, units in stock.items():
        taken = sum(line.quantity for r in won for line in r.lines if line.sku_code == sku)
        assert remaining[sku] >= 0
        assert remaining[sku] + taken == units == remaining[sku] + held.get(sku, 0)
    # Every refusal names a line that really did not fit at its turn.
    assert all(s.available < s.requested for short in lost for s in short.shortages)
