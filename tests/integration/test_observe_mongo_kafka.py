"""The operator's gauges where product keeps its outbox in MongoDB and where events travel on
Kafka: the outbox backlog and age, and the dead letters a group set aside, against the real
MongoDB-protocol server and a fresh Kafka-protocol broker (clocks moved by hand)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase

from shop.platform.events import Event
from shop.platform.kafka import KafkaEventBus, bootstrap_servers
from shop.platform.mongo import OUTBOX, Document, MongoOutbox, add_event, in_transaction
from shop.platform.observe import Health, Watch
from shop.platform.settings import PlatformSettings
from tests.servers import Server
from tests.support import ManualClock

SERVICE = {"service": "product-service"}


def _event(n: int) -> Event:
    return Event.new(type="product.created", source="/test", subject=f"p-{n}", data={"n": n})


@pytest.fixture
async def database(make_mongo_url: Callable[[], str]) -> AsyncIterator[AsyncDatabase[Document]]:
    from shop.platform.mongo import mongo_database

    async with mongo_database(make_mongo_url()) as database:
        try:
            yield database
        finally:
            await database.client.drop_database(database.name)


async def test_the_mongo_outbox_backlog_counts_unpublished_events_and_degrades_when_old(
    database: AsyncDatabase[Document],
) -> None:
    outbox = MongoOutbox(database)
    await outbox.create_indexes()
    registry, health, clock = CollectorRegistry(), Health(), ManualClock()
    watch = Watch(
        service="product-service", registry=registry, health=health, clock=clock, wall_clock=clock
    )
    watch.outbox(outbox, max_age_s=30.0)
    await watch.sample()
    assert registry.get_sample_value("shop_outbox_backlog", SERVICE) == 0
    assert registry.get_sample_value("shop_outbox_oldest_age_seconds", SERVICE) == 0
    assert health.report()["status"] == "UP"

    for n in range(3):

        async def write(session: AsyncClientSession, n: int = n) -> None:
            await add_event(session, database=database, topic="products", event=_event(n))

        await in_transaction(database, write)
    [first, *_] = await outbox.unpublished(10)
    await outbox.mark_published([first.position])
    await database[OUTBOX].update_many({}, {"$set": {"createdAt": clock.now}})
    await database[OUTBOX].update_one({"_id": 3}, {"$set": {"createdAt": clock.now + 5}})
    clock.advance(10)
    await watch.sample()
    assert registry.get_sample_value("shop_outbox_backlog", SERVICE) == 2
    # The oldest unpublished, not the published one nor the newest.
    assert registry.get_sample_value("shop_outbox_oldest_age_seconds", SERVICE) == 10
    assert health.degraded() == {}

    clock.advance(25)
    await watch.sample()
    assert health.degraded() == {
        "outbox": "2 events unpublished, the oldest for 35 s (more than 30 s)"
    }
    await outbox.mark_published([entry.position for entry in await outbox.unpublished(10)])
    await watch.sample()
    assert registry.get_sample_value("shop_outbox_backlog", SERVICE) == 0
    assert health.degraded() == {}


async def test_kafka_dead_letters_are_counted_until_replayed(fresh_kafka: Server) -> None:
    bus = KafkaEventBus(
        bootstrap_servers(fresh_kafka.url),
        client_id="watched",
        settings=PlatformSettings(kafka_partitions=2),
    )
    registry, health, clock = CollectorRegistry(), Health(), ManualClock()
    watch = Watch(
        service="notification-service",
        registry=registry,
        health=health,
        clock=clock,
        wall_clock=clock,
    )
    watch.consumer(bus, topic="orders", group="mail")
    labels = {"service": "notification-service", "topic": "orders", "group": "mail"}
    try:
        await bus.ensure_topics(["orders"])
        await watch.sample()
        assert registry.get_sample_value("shop_event_dead_letters", labels) == 0  # no DLQ yet
        for n in range(3):
            # What the consumer does with an event after its last attempt.
            raw = SimpleNamespace(
                topic="orders",
                partition=n % 2,
                offset=n,
                key=f"o-{n}".encode(),
                value=_event(n).to_json().encode(),
                headers=[],
            )
            await bus.dead_letter(raw, group="mail", error="boom", attempts=5)
        # Another group's dead letters are its own.
        await bus.dead_letter(raw, group="audit", error="boom", attempts=5)
        await watch.sample()
        assert registry.get_sample_value("shop_event_dead_letters", labels) == 3
        assert await bus.dead_letters("orders", group="audit") == 1

        assert await bus.replay_dead_letters(group="mail") == 3
        await watch.sample()
        assert registry.get_sample_value("shop_event_dead_letters", labels) == 0
        assert await bus.dead_letters("orders", group="audit") == 1
    finally:
        await bus.close()
