"""The outbox on SQLite, MariaDB and MongoDB, and the inbox on both SQL backends: an event
exists exactly when its change committed, one relay (the same code over every outbox)
publishes them in order, and a redelivered event is applied once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Protocol

import pytest
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from shop.platform import mongo
from shop.platform.db import create_engine
from shop.platform.events import Event, Handler
from shop.platform.inbox import first_delivery, inbox
from shop.platform.lease import leases
from shop.platform.outbox import (
    OutboxEntry,
    OutboxRelay,
    OutboxSource,
    SqlOutbox,
    add_event,
    outbox,
)
from shop.platform.worker import JobLease

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

    async def pending(self, topic: str, *, group: str) -> int:
        raise NotImplementedError


class Producer(Protocol):
    """A service's database as the outbox tests need it: changes with their events."""

    @property
    def source(self) -> OutboxSource: ...

    async def place(
        self, number: str, *, topic: str = "orders", fail: bool = False, linger_s: float = 0.0
    ) -> None:
        """Store order ``number`` with its event in one transaction, which stays open
        ``linger_s`` after the event is written; ``fail``: roll it back."""

    async def orders(self) -> list[str]: ...

    async def forget_publication(self) -> None:
        """As if the relay died after publishing, before marking what it published."""


class Aborted(RuntimeError):
    """The change could not be saved."""


def _placed(number: str) -> Event:
    return Event(type="order.placed", source="/order-service", subject=number, data={"n": number})


class SqlProducer:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.source = SqlOutbox(engine)

    async def place(
        self, number: str, *, topic: str = "orders", fail: bool = False, linger_s: float = 0.0
    ) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(insert(orders).values(number=number, applied=0))
            await add_event(conn, topic=topic, event=_placed(number))
            await asyncio.sleep(linger_s)
            if fail:
                raise Aborted(number)

    async def orders(self) -> list[str]:
        async with self.engine.connect() as conn:
            return list((await conn.scalars(select(orders.c.number))).all())

    async def forget_publication(self) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(update(outbox).values(published_at=None))


class MongoProducer:
    def __init__(self, database: AsyncDatabase[mongo.Document]) -> None:
        self.database = database
        self.source = mongo.MongoOutbox(database)

    async def place(
        self, number: str, *, topic: str = "orders", fail: bool = False, linger_s: float = 0.0
    ) -> None:
        async def work(session: AsyncClientSession) -> None:
            await self.database.orders.insert_one({"_id": number}, session=session)
            await mongo.add_event(
                session, database=self.database, topic=topic, event=_placed(number)
            )
            await asyncio.sleep(linger_s)
            if fail:
                raise Aborted(number)

        await mongo.in_transaction(self.database, work)

    async def orders(self) -> list[str]:
        return [str(doc["_id"]) async for doc in self.database.orders.find()]

    async def forget_publication(self) -> None:
        await self.database[mongo.OUTBOX].update_many({}, {"$set": {"publishedAt": None}})


@asynccontextmanager
async def sql_producer(url: str) -> AsyncIterator[SqlProducer]:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            for table in (outbox, inbox, leases, orders):
                await conn.run_sync(table.create)
        yield SqlProducer(engine)
    finally:
        await engine.dispose()


@asynccontextmanager
async def mongo_producer(url: str) -> AsyncIterator[MongoProducer]:
    async with mongo.mongo_database(url) as database:
        producer = MongoProducer(database)
        try:
            await producer.source.create_indexes()
            yield producer
        finally:
            await database.client.drop_database(database.name)


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql), "mongo"])
async def producer(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Producer]:
    if request.param == "mongo":
        make_mongo: Callable[[], str] = request.getfixturevalue("make_mongo_url")
        async with mongo_producer(make_mongo()) as on_mongo:
            yield on_mongo
        return
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'outbox.db'}"
    else:
        make_mysql: Callable[[], str] = request.getfixturevalue("make_mysql_url")
        url = make_mysql()
    async with sql_producer(url) as on_sql:
        yield on_sql


async def test_an_event_exists_only_if_its_change_committed(producer: Producer) -> None:
    bus = MemoryBus()
    relay = OutboxRelay(producer.source, bus, service="test")
    with pytest.raises(Aborted):
        await producer.place("o-1", fail=True)
    await producer.place("o-2")
    assert await producer.orders() == ["o-2"]
    assert await relay.relay_once() == 1
    assert await relay.relay_once() == 0, "a published event is not published again"
    assert [(t, e.subject) for t, e in bus.published] == [("orders", "o-2")]


async def test_events_leave_in_the_order_they_were_written(producer: Producer) -> None:
    bus = MemoryBus()
    for n in range(5):
        await producer.place(f"o-{n}", topic="orders" if n != 2 else "products")
    await OutboxRelay(producer.source, bus, service="test", batch_size=2).relay_once()
    await OutboxRelay(producer.source, bus, service="test", batch_size=10).relay_once()
    assert [e.subject for _, e in bus.published] == [f"o-{n}" for n in range(5)]
    assert bus.published[2][0] == "products"


class RecordingSource:
    """An outbox source that remembers the positions the relay marked, in order."""

    def __init__(self, source: OutboxSource) -> None:
        self._source = source
        self.positions: list[int] = []

    async def unpublished(self, limit: int) -> Sequence[OutboxEntry]:
        return await self._source.unpublished(limit)

    async def mark_published(self, positions: Sequence[int]) -> None:
        self.positions.extend(positions)
        await self._source.mark_published(positions)

    def lease(self, *, name: str, owner: str, duration_s: float) -> JobLease:
        return self._source.lease(name=name, owner=owner, duration_s=duration_s)


# Not on MySQL: InnoDB auto-increment values may commit out of order (docs/events.md says
# why that cannot reorder one aggregate's events).
@pytest.mark.parametrize("producer", ["sqlite", "mongo"], indirect=True)
async def test_events_of_concurrent_writers_leave_in_commit_order(producer: Producer) -> None:
    # Some transactions stay open after writing their event, so that, were positions
    # handed out outside the commit order, a later one would commit first.
    writers = asyncio.gather(
        *(producer.place(f"o-{n}", linger_s=0.01 * (n % 3)) for n in range(30))
    )
    recording = RecordingSource(producer.source)
    relay = OutboxRelay(recording, MemoryBus(), service="test", batch_size=3)
    while not writers.done():
        await relay.relay_once()
        await asyncio.sleep(0)
    await writers
    while await relay.relay_once():
        pass
    # Had a later position committed before an earlier one, the relay would have
    # published the later one first.
    assert recording.positions == sorted(set(recording.positions))
    assert len(recording.positions) == 30


async def test_a_crash_between_publishing_and_marking_republishes_the_same_event(
    producer: Producer,
) -> None:
    bus = MemoryBus()
    relay = OutboxRelay(producer.source, bus, service="test")
    await producer.place("o-1")
    assert await relay.relay_once() == 1
    await producer.forget_publication()
    assert await relay.relay_once() == 1
    assert [e.id for _, e in bus.published] == [bus.published[0][1].id] * 2


async def test_only_one_relay_of_a_service_publishes_at_a_time(producer: Producer) -> None:
    buses = [MemoryBus(), MemoryBus()]
    relays = [
        OutboxRelay(producer.source, bus, service="order", lease_s=30, poll_interval_s=0.02)
        for bus in buses
    ]
    for relay in relays:
        relay.start()
    try:
        for n in range(20):
            await producer.place(f"o-{n}")
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
    [busy] = [b for b in buses if b.published]
    assert [e.subject for _, e in busy.published] == [f"o-{n}" for n in range(20)]


async def test_a_lease_passes_on_only_once_it_lapses(producer: Producer) -> None:
    first = producer.source.lease(name="outbox:test", owner="a", duration_s=0.3)
    second = producer.source.lease(name="outbox:test", owner="b", duration_s=0.3)
    assert await first.hold()
    assert not await second.hold()
    assert await first.renew() and await first.hold()
    await asyncio.sleep(0.4)
    assert not await first.renew(), "a lapsed lease is not taken back by renewing"
    assert await second.hold()
    assert not await first.hold()
    await second.release()
    assert await first.hold()


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    async with sql_producer(database_url) as on_sql:
        yield on_sql.engine


async def test_a_republished_event_is_applied_once(engine: AsyncEngine) -> None:
    bus = MemoryBus()
    producer = SqlProducer(engine)
    relay = OutboxRelay(producer.source, bus, service="test")
    await producer.place("o-1")
    await relay.relay_once()
    await producer.forget_publication()
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
