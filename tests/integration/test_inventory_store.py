"""The inventory store contract, run against SQLite and MariaDB alike."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from shop.inventory.domain import (
    OutOfStock,
    Reservation,
    ReservationConflict,
    ReservationLine,
    ReservationStatus,
    Shortage,
    StockLevel,
)
from shop.inventory.store import SqlInventoryStore, reservation_lines, reservations
from shop.platform.db import create_engine, migrate
from shop.platform.inbox import inbox

NOW = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[SqlInventoryStore]:
    engine = create_engine(database_url)
    try:
        await migrate(engine, package="shop.inventory", service="inventory")
        await migrate(engine, package="shop.inventory", service="inventory")  # restart: no-op
        yield SqlInventoryStore(engine)
    finally:
        await engine.dispose()


def _order() -> str:
    return str(uuid.uuid4())


def _lines(**quantities: int) -> list[ReservationLine]:
    return [ReservationLine(sku, qty) for sku, qty in quantities.items()]


async def _reservation_rows(store: SqlInventoryStore) -> tuple[int, int]:
    engine = store._engine  # the test reads what was stored, not what the store says
    async with engine.connect() as conn:
        heads = await conn.scalar(select(func.count()).select_from(reservations))
        lines = await conn.scalar(select(func.count()).select_from(reservation_lines))
    return int(heads or 0), int(lines or 0)


async def test_add_creates_then_adds(store: SqlInventoryStore) -> None:
    assert await store.add_stock("pixel_8", 5, now=NOW) == 5
    assert await store.add_stock("pixel_8", 7, now=NOW) == 12
    assert await store.quantities(["pixel_8", "unknown"]) == {"pixel_8": 12}
    assert await store.quantities([]) == {}


async def test_sku_codes_differing_in_case_are_different_skus(store: SqlInventoryStore) -> None:
    await store.add_stock("pixel_8", 5, now=NOW)
    await store.add_stock("PIXEL_8", 2, now=NOW)
    assert await store.quantities(["pixel_8", "PIXEL_8"]) == {"pixel_8": 5, "PIXEL_8": 2}


async def test_set_is_absolute_and_creates(store: SqlInventoryStore) -> None:
    assert await store.set_stock("kindle", 3, now=NOW) == 3
    await store.add_stock("kindle", 10, now=NOW)
    assert await store.set_stock("kindle", 4, now=NOW) == 4
    assert await store.set_stock("kindle", 4, now=NOW) == 4
    assert await store.set_stock("kindle", 0, now=NOW) == 0
    assert await store.quantities(["kindle"]) == {"kindle": 0}


async def test_concurrent_adds_all_count(store: SqlInventoryStore) -> None:
    totals = await asyncio.gather(*(store.add_stock("new_sku", 2, now=NOW) for _ in range(10)))
    assert await store.quantities(["new_sku"]) == {"new_sku": 20}
    assert sorted(totals) == list(range(2, 21, 2))


async def test_seed_only_an_empty_stock(store: SqlInventoryStore) -> None:
    assert await store.seed_if_empty({"a": 1, "b": 0}, now=NOW)
    assert not await store.seed_if_empty({"a": 100, "c": 5}, now=NOW)
    assert await store.quantities(["a", "b", "c"]) == {"a": 1, "b": 0}


async def test_reserve_takes_every_line(store: SqlInventoryStore) -> None:
    await store.add_stock("a", 5, now=NOW)
    await store.add_stock("b", 3, now=NOW)
    order = _order()
    reservation = await store.reserve(order, _lines(b=3, a=2), now=NOW)
    assert reservation == Reservation(order, ReservationStatus.RESERVED, tuple(_lines(b=3, a=2)))
    assert await store.quantities(["a", "b"]) == {"a": 3, "b": 0}
    assert await store.reservation(order) == Reservation(
        order, ReservationStatus.RESERVED, tuple(_lines(a=2, b=3))
    )


async def test_reserve_is_all_or_nothing_and_lists_each_short_line(
    store: SqlInventoryStore,
) -> None:
    await store.add_stock("a", 5, now=NOW)
    await store.add_stock("b", 1, now=NOW)
    await store.add_stock("c", 9, now=NOW)
    order = _order()
    with pytest.raises(OutOfStock) as short:
        await store.reserve(order, _lines(c=9, b=2, a=5, ghost=1), now=NOW)
    assert sorted(short.value.shortages, key=lambda s: s.sku_code) == [
        Shortage("b", 2, 1),
        Shortage("ghost", 1, 0),
    ]
    assert await store.quantities(["a", "b", "c"]) == {"a": 5, "b": 1, "c": 9}
    assert await store.reservation(order) is None
    assert await _reservation_rows(store) == (0, 0)
    # Nothing was kept of the failed attempt, so a retry once stock arrived succeeds.
    await store.add_stock("b", 1, now=NOW)
    await store.add_stock("ghost", 1, now=NOW)
    await store.reserve(order, _lines(c=9, b=2, a=5, ghost=1), now=NOW)
    assert await store.quantities(["a", "b", "c", "ghost"]) == {"a": 0, "b": 0, "c": 0, "ghost": 0}


async def test_a_repeat_reserves_nothing_more(store: SqlInventoryStore) -> None:
    await store.add_stock("a", 10, now=NOW)
    order = _order()
    first = await store.reserve(order, _lines(a=3), now=NOW)
    again = await store.reserve(order, _lines(a=3), now=NOW)
    assert again == first
    assert await store.quantities(["a"]) == {"a": 7}
    assert await _reservation_rows(store) == (1, 1)


async def test_a_repeat_with_other_lines_conflicts_and_changes_nothing(
    store: SqlInventoryStore,
) -> None:
    await store.add_stock("a", 10, now=NOW)
    await store.add_stock("b", 10, now=NOW)
    order = _order()
    await store.reserve(order, _lines(a=3), now=NOW)
    for other in (_lines(a=4), _lines(a=3, b=1)):
        with pytest.raises(ReservationConflict):
            await store.reserve(order, other, now=NOW)
    assert await store.quantities(["a", "b"]) == {"a": 7, "b": 10}


async def test_identical_requests_racing_reserve_once(store: SqlInventoryStore) -> None:
    await store.add_stock("a", 10, now=NOW)
    await store.add_stock("b", 10, now=NOW)
    order = _order()
    answers = await asyncio.gather(
        *(store.reserve(order, _lines(a=2, b=1), now=NOW) for _ in range(8))
    )
    assert all(answer == answers[0] for answer in answers)
    assert await store.quantities(["a", "b"]) == {"a": 8, "b": 9}


async def test_release_returns_the_units_once(store: SqlInventoryStore) -> None:
    await store.add_stock("a", 10, now=NOW)
    await store.add_stock("b", 10, now=NOW)
    order = _order()
    await store.reserve(order, _lines(a=4, b=1), now=NOW)
    assert await store.release(order, now=NOW)
    assert not await store.release(order, now=NOW)
    assert await store.quantities(["a", "b"]) == {"a": 10, "b": 10}
    released = await store.reservation(order)
    assert released is not None
    assert released.status is ReservationStatus.RELEASED


async def test_racing_releases_return_the_units_once(store: SqlInventoryStore) -> None:
    await store.add_stock("a", 10, now=NOW)
    order = _order()
    await store.reserve(order, _lines(a=4), now=NOW)
    outcomes = await asyncio.gather(*(store.release(order, now=NOW) for _ in range(6)))
    assert outcomes.count(True) == 1
    assert await store.quantities(["a"]) == {"a": 10}


async def test_a_released_order_cannot_reserve_again(store: SqlInventoryStore) -> None:
    await store.add_stock("a", 10, now=NOW)
    order = _order()
    await store.reserve(order, _lines(a=4), now=NOW)
    await store.release(order, now=NOW)
    with pytest.raises(ReservationConflict, match="released"):
        await store.reserve(order, _lines(a=4), now=NOW)
    assert await store.quantities(["a"]) == {"a": 10}


async def test_releasing_an_unknown_order_moves_no_stock_and_bars_a_late_reservation(
    store: SqlInventoryStore,
) -> None:
    await store.add_stock("a", 10, now=NOW)
    order = _order()
    assert not await store.release(order, now=NOW)
    assert not await store.release(order, now=NOW)
    assert await store.quantities(["a"]) == {"a": 10}
    # The order gave up on this reservation; if its request still arrives it holds nothing.
    with pytest.raises(ReservationConflict):
        await store.reserve(order, _lines(a=1), now=NOW)
    assert await store.quantities(["a"]) == {"a": 10}


async def test_stock_released_by_one_order_serves_the_next(store: SqlInventoryStore) -> None:
    await store.add_stock("a", 3, now=NOW)
    first, second = _order(), _order()
    await store.reserve(first, _lines(a=3), now=NOW)
    with pytest.raises(OutOfStock) as short:
        await store.reserve(second, _lines(a=1), now=NOW)
    assert short.value.shortages == (Shortage("a", 1, 0),)
    await store.release(first, now=NOW)
    await store.reserve(second, _lines(a=1), now=NOW)
    assert await store.quantities(["a"]) == {"a": 2}


async def test_a_listed_sku_is_known_with_no_units_once_per_event(
    store: SqlInventoryStore,
) -> None:
    assert await store.register_sku("gadget", event_id="e-1", now=NOW)
    assert await store.quantities(["gadget"]) == {"gadget": 0}
    await store.add_stock("gadget", 3, now=NOW)
    assert not await store.register_sku("gadget", event_id="e-1", now=NOW), "a redelivery"
    # Another event naming a known SKU never lowers its stock.
    assert await store.register_sku("gadget", event_id="e-2", now=NOW)
    assert await store.quantities(["gadget"]) == {"gadget": 3}
    async with store._engine.connect() as conn:  # what was stored, not what the store says
        applied = await conn.scalar(select(func.count()).select_from(inbox))
    assert applied == 2


async def test_racing_listings_of_one_sku_make_one_stock_row(store: SqlInventoryStore) -> None:
    await asyncio.gather(*(store.register_sku("hot", event_id=f"e-{n}", now=NOW) for n in range(5)))
    assert await store.all_levels(limit=10, offset=0) == ([StockLevel("hot", 0)], 1)


async def test_all_levels_page_by_sku_code(store: SqlInventoryStore) -> None:
    for sku, quantity in {"b": 2, "a": 1, "C": 5, "d": 0}.items():
        await store.set_stock(sku, quantity, now=NOW)
    # Byte order: upper case first, as the SKU codes compare on every backend.
    assert await store.all_levels(limit=2, offset=0) == (
        [StockLevel("C", 5), StockLevel("a", 1)],
        4,
    )
    assert await store.all_levels(limit=10, offset=3) == ([StockLevel("d", 0)], 4)


async def test_a_short_request_among_concurrent_ones_fails_alone(store: SqlInventoryStore) -> None:
    # Requests arriving together share a transaction; each still takes all its lines or none,
    # in the order they arrived, and a short one leaves its units to those after it.
    await store.add_stock("hot", 10, now=NOW)
    await store.add_stock("cold", 2, now=NOW)
    asked = [
        _lines(hot=3),
        _lines(hot=3),
        _lines(hot=1, cold=5),
        _lines(hot=3),
        _lines(hot=5),
        _lines(hot=1),
    ]
    orders = [_order() for _ in asked]
    outcomes = await asyncio.gather(
        *(store.reserve(order, lines, now=NOW) for order, lines in zip(orders, asked, strict=True)),
        return_exceptions=True,
    )
    kinds = [type(outcome).__name__ for outcome in outcomes]
    assert kinds == ["Reservation"] * 2 + ["OutOfStock", "Reservation", "OutOfStock", "Reservation"]
    assert isinstance(outcomes[2], OutOfStock)
    assert outcomes[2].shortages == (Shortage("cold", 5, 2),)
    assert isinstance(outcomes[4], OutOfStock)
    assert outcomes[4].shortages == (Shortage("hot", 5, 1),)
    assert await store.quantities(["hot", "cold"]) == {"hot": 0, "cold": 2}
    assert await _reservation_rows(store) == (4, 4)
    for order, outcome in zip(orders, outcomes, strict=True):
        stored = await store.reservation(order)
        assert stored == (outcome if isinstance(outcome, Reservation) else None)


async def test_repeats_among_concurrent_requests_reserve_once(store: SqlInventoryStore) -> None:
    await store.add_stock("a", 5, now=NOW)
    order, other, released = _order(), _order(), _order()
    await store.release(released, now=NOW)  # a cancelled order: its late request must not take
    asked = [
        (order, _lines(a=2)),
        (released, _lines(a=1)),
        (order, _lines(a=2)),
        (order, _lines(a=3)),
        (other, _lines(a=3)),
        (order, _lines(a=2)),
    ]
    outcomes = await asyncio.gather(
        *(store.reserve(number, lines, now=NOW) for number, lines in asked),
        return_exceptions=True,
    )
    first = Reservation(order, ReservationStatus.RESERVED, tuple(_lines(a=2)))
    assert outcomes[0] == outcomes[2] == outcomes[5] == first
    assert isinstance(outcomes[1], ReservationConflict)
    assert isinstance(outcomes[3], ReservationConflict)
    # Counted once: 5 - 2 leaves exactly the 3 the other order asked for.
    assert outcomes[4] == Reservation(other, ReservationStatus.RESERVED, tuple(_lines(a=3)))
    assert await store.quantities(["a"]) == {"a": 0}
    assert await _reservation_rows(store) == (3, 2)  # two reservations and the released mark
