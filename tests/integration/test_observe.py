"""The outbox backlog and consumer lag gauges, and the degradation they report, on real
SQLite files and the embedded event log (clocks moved by hand, no sleeps)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

from shop.platform.db import create_engine
from shop.platform.eventlog import SqliteEventLog
from shop.platform.events import Event
from shop.platform.observe import Health, Watch
from shop.platform.outbox import add_event, outbox
from tests.support import ManualClock


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'service.db'}")
    async with engine.begin() as conn:
        await conn.run_sync(outbox.metadata.create_all)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[SqliteEventLog]:
    bus = SqliteEventLog(f"sqlite+aiosqlite:///{tmp_path / 'events.db'}", client_id="test")
    try:
        yield bus
    finally:
        await bus.close()


def _event(n: int) -> Event:
    return Event.new(type="order.placed", source="/test", subject=f"o-{n}", data={"n": n})


def _watch(registry: CollectorRegistry, health: Health, clock: ManualClock) -> Watch:
    return Watch(
        service="order-service", registry=registry, health=health, clock=clock, wall_clock=clock
    )


async def test_the_outbox_backlog_counts_unpublished_rows_and_degrades_when_old(
    engine: AsyncEngine,
) -> None:
    registry, health, clock = CollectorRegistry(), Health(), ManualClock()
    watch = _watch(registry, health, clock)
    watch.outbox(engine, max_age_s=30.0)
    await watch.sample()
    assert registry.get_sample_value("shop_outbox_backlog", {"service": "order-service"}) == 0
    assert health.report()["status"] == "UP"

    async with engine.begin() as conn:
        for n in range(3):
            await add_event(conn, topic="orders", event=_event(n))
        await conn.execute(outbox.update().where(outbox.c.seq == 1).values(published_at=1.0))
        await conn.execute(outbox.update().values(created_at=clock.now))
    clock.advance(10)
    await watch.sample()
    assert registry.get_sample_value("shop_outbox_backlog", {"service": "order-service"}) == 2
    age = registry.get_sample_value("shop_outbox_oldest_age_seconds", {"service": "order-service"})
    assert age == 10
    assert health.degraded() == {}

    clock.advance(25)
    await watch.sample()
    assert health.degraded() == {
        "outbox": "2 events unpublished, the oldest for 35 s (more than 30 s)"
    }


async def test_consumer_lag_counts_the_events_a_group_has_not_consumed(
    log: SqliteEventLog,
) -> None:
    registry, health, clock = CollectorRegistry(), Health(), ManualClock()
    watch = _watch(registry, health, clock)
    watch.consumer(log, topic="orders", group="notification-service")
    watch.consumer(log, topic="products", group="notification-service")
    await log.publish("orders", [_event(n) for n in range(4)])
    await watch.sample()
    labels = {"service": "order-service", "group": "notification-service"}
    assert registry.get_sample_value("shop_event_consumer_lag", {**labels, "topic": "orders"}) == 4
    lag = registry.get_sample_value("shop_event_consumer_lag", {**labels, "topic": "products"})
    assert lag == 0


class Lag:
    """A bus whose lag and dead letters the test sets."""

    def __init__(self) -> None:
        self.lag = 0
        self.dead = 0

    async def pending(self, topic: str, *, group: str) -> int:
        return self.lag

    async def dead_letters(self, topic: str, *, group: str) -> int:
        return self.dead


async def test_a_consumer_whose_lag_does_not_go_down_is_stuck_until_it_does() -> None:
    registry, health, clock, bus = CollectorRegistry(), Health(), ManualClock(), Lag()
    watch = _watch(registry, health, clock)
    watch.consumer(bus, topic="orders", group="notification-service", stuck_after_s=30.0)
    bus.lag = 5
    await watch.sample()
    clock.advance(20)
    bus.lag = 3  # it consumes, more slowly than wished: not stuck
    await watch.sample()
    clock.advance(29)
    bus.lag = 7
    await watch.sample()
    assert health.degraded() == {}
    clock.advance(1)
    await watch.sample()
    assert health.report() == {
        "status": "DEGRADED",
        "checks": {"consumer:notification-service:orders": "DEGRADED"},
        "reasons": {
            "consumer:notification-service:orders": (
                "7 events of orders pending for notification-service, none consumed for 30 s"
            )
        },
    }
    bus.lag = 6
    await watch.sample()
    assert health.report()["status"] == "UP"


async def test_dead_letters_are_counted_where_the_bus_counts_them() -> None:
    registry, health, clock, bus = CollectorRegistry(), Health(), ManualClock(), Lag()
    watch = _watch(registry, health, clock)
    watch.consumer(bus, topic="orders", group="notification-service")
    bus.dead = 2
    await watch.sample()
    labels = {"service": "order-service", "topic": "orders", "group": "notification-service"}
    assert registry.get_sample_value("shop_event_dead_letters", labels) == 2
