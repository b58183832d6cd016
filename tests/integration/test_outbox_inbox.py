"""The outbox and the inbox on both SQL backends: an event exists exactly when its change
committed, and a redelivered event is applied once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from shop.platform.db import create_engine
from shop.platform.events import Event, Handler
from shop.platform.inbox import first_delivery, inbox
from shop.platform.lease import leases
from shop.platform.outbox import OutboxRelay, add_event, outbox

_metadata = MetaData()
orders = Table(
    "orders",
    _metadata,
    Column("number", String(36), primary_key=True),
    Column("applied", Integer, nullable=False, default=0),
)


class MemoryBus:
    """Collects what the relay publishes (the bus itself has its own contract suite)."""

    def __init__(self) -> None:
        self.published: list[tuple[str, Event]] = []

    async def publish(self, topic: str, events: Sequence[Event]) -> None:
        self.published.extend((topic, e) for e in events)

    def subscribe(self, topic: str, *, group: str, handler: Handler) -> None:
        raise NotImplementedError

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None: ...


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    async with engine.begin() as conn:
        for table in (outbox, inbox, leases, orders):
            await conn.run_sync(table.create)
    yield engine
    await engine.dispose()


def _placed(number: str) -> Event:
    return Event(type="order.placed", source="/order-service", subject=number, data={"n": number})


async def test_an_event_exists_only_if_its_change_committed(engine: AsyncEngine) -> None:
    bus = MemoryBus()
    relay = OutboxRelay(engine, bus, service="test")
    with pytest.raises(RuntimeError):
        async with engine.begin() as conn:
            await conn.execute(insert(orders).values(number="o-1"))
            await add_event(conn, topic="orders", event=_placed("o-1"))
            raise RuntimeError("the order could not be saved")
    async with engine.begin() as conn:
        await conn.execute(insert(orders).values(number="o-2"))
        await add_event(conn, topic="orders", event=_placed("o-2"))
    assert await relay.relay_once() == 1
    assert await relay.relay_once() == 0, "a published event is not published again"
    assert [(t, e.subject) for t, e in bus.published] == [("orders", "o-2")]


async def test_events_leave_in_the_order_they_were_written(engine: AsyncEngine) -> None:
    bus = MemoryBus()
    for n in range(5):
        async with engine.begin() as conn:
            topic = "orders" if n != 2 else "products"
            await add_event(conn, topic=topic, event=_placed(f"o-{n}"))
    await OutboxRelay(engine, bus, service="test", batch_size=2).relay_once()
    await OutboxRelay(engine, bus, service="test", batch_size=10).relay_once()
    assert [e.subject for _, e in bus.published] == [f"o-{n}" for n in range(5)]
    assert bus.published[2][0] == "products"


async def test_a_republished_event_is_applied_once(engine: AsyncEngine) -> None:
    bus = MemoryBus()
    relay = OutboxRelay(engine, bus, service="test")
    async with engine.begin() as conn:
        await conn.execute(insert(orders).values(number="o-1", applied=0))
        await add_event(conn, topic="orders", event=_placed("o-1"))
    await relay.relay_once()
    async with engine.begin() as conn:  # as if the relay died before marking the row
        await conn.execute(update(outbox).values(published_at=None))
    await relay.relay_once()
    assert len(bus.published) == 2 and bus.published[0][1].id == bus.published[1][1].id

    for _, event in bus.published:
        async with engine.begin() as conn:
            if await first_delivery(conn, consumer="mailer", event_id=event.id):
                await conn.execute(
                    update(orders)
                    .where(orders.c.number == event.subject)
                    .values(applied=orders.c.applied + 1)
                )
    async with engine.connect() as conn:
        applied = await conn.scalar(select(orders.c.applied))
        seen = await conn.scalar(select(func.count()).select_from(inbox))
    assert (applied, seen) == (1, 1)


async def test_only_one_relay_of_a_service_publishes_at_a_time(engine: AsyncEngine) -> None:
    buses = [MemoryBus(), MemoryBus()]
    relays = [
        OutboxRelay(engine, bus, service="order", lease_s=30, poll_interval_s=0.02) for bus in buses
    ]
    for relay in relays:
        relay.start()
    try:
        for n in range(20):
            async with engine.begin() as conn:
                await add_event(conn, topic="orders", event=_placed(f"o-{n}"))
            for relay in relays:
                relay.wake()
        for _ in range(500):
            if sum(len(b.published) for b in buses) >= 20:
                break
            await asyncio.sleep(0.01)
    finally:
        for relay in relays:
            await relay.stop()
    counts = sorted(len(b.published) for b in buses)
    assert counts == [0, 20], "both relays published: events could leave out of order"
