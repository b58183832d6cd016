"""The notification service consuming in batches (issue 8): the events the embedded log has
in hand are recorded together, each exactly once, whenever the consumer is killed.

Real parts throughout: the SQLite event log, the notification store on SQLite, the log
courier's lines, and a second OS process that is killed (``SIGKILL``, or dying right after
a batch's commit) while it consumes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import closing
from pathlib import Path

import pytest

from shop.notification.domain import Notification
from shop.notification.events import subscribe
from shop.notification.service import NotificationService
from shop.notification.store import SqlNotificationStore
from shop.platform import context
from shop.platform.db import create_engine, migrate
from shop.platform.eventlog import SqliteEventLog
from shop.platform.events import Event
from tests.integration.test_notification_api import LogLines, Orders, order_event, until


class CountingStore(SqlNotificationStore):
    """The real store, counting its recording transactions."""

    transactions = 0

    async def record_event(
        self,
        event_id: str,
        notification: Notification | None,
        *,
        announce: Callable[[Notification], None] | None = None,
    ) -> bool:
        self.transactions += 1
        return await super().record_event(event_id, notification, announce=announce)

    async def record_events(
        self,
        entries: Sequence[tuple[str, Notification | None]],
        *,
        announce: Callable[[Notification], None] | None = None,
    ) -> list[bool]:
        self.transactions += 1
        return await super().record_events(entries, announce=announce)


class BoundLines(LogLines):
    """The log courier's lines, each with the request id it was written under."""

    def __init__(self) -> None:
        super().__init__()
        self.request_ids: list[str | None] = []

    def announce(self, notification: Notification) -> None:
        super().announce(notification)
        self.request_ids.append(context.current_request_id())


@pytest.fixture
def bus_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'events.db'}"


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "notification.db"


@pytest.fixture
async def orders(bus_url: str) -> AsyncIterator[Orders]:
    publisher = Orders(bus_url)
    try:
        yield publisher
    finally:
        await publisher.log.close()


def stored(database: Path) -> tuple[list[str], int]:
    """The event ids of the notifications recorded, and how many events the inbox holds."""
    with closing(sqlite3.connect(database)) as db:
        notified = [row[0] for row in db.execute("SELECT event_id FROM notifications")]
        (seen,) = db.execute("SELECT count(*) FROM inbox").fetchone()
    return notified, int(seen)


async def test_the_events_in_hand_are_recorded_together_each_once(
    database: Path, bus_url: str, orders: Orders
) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{database}")
    await migrate(engine, package="shop.notification", service="notification")
    store, lines = CountingStore(engine), BoundLines()
    service = NotificationService(store=store, couriers=[lines])
    placed = [order_event(f"ord-{n}") for n in range(20)]
    # Handled before, e.g. by another instance.
    await NotificationService(
        store=SqlNotificationStore(engine), couriers=[LogLines()]
    ).on_order_event(placed[3])
    await orders.publish(
        *placed,
        placed[7],  # the same event twice in one batch
        order_event("ord-bad", email="not an address"),
        Event(type="order.shipped", source="/order-service", subject="ord-0", data={}),
    )
    bus = SqliteEventLog(bus_url, client_id="notification-test")
    try:
        subscribe(bus, service)
        await bus.start()
        await orders.all_handled()
    finally:
        await bus.close()
        await engine.dispose()
    assert store.transactions == 1, "one transaction for the batch"
    notified, seen = stored(database)
    assert sorted(notified) == sorted(e.id for e in placed), "one notification per event"
    assert seen == 21, "every well-formed event is in the inbox, the shipped one included"
    announced = [n.event_id for n in lines.delivered]
    assert sorted(announced) == sorted(e.id for e in placed if e is not placed[3])
    assert lines.request_ids == announced, "each line is bound to its own event"


CONSUMER = textwrap.dedent(
    """
    import asyncio, os, sys
    from shop.notification.couriers import LogCourier
    from shop.notification.events import subscribe
    from shop.notification.service import NotificationService
    from shop.notification.store import SqlNotificationStore
    from shop.platform.db import create_engine
    from shop.platform.eventlog import SqliteEventLog

    bus_url, database_url, how = sys.argv[1:4]

    class DiesAfterCommit(SqlNotificationStore):
        async def record_events(self, entries, *, announce=None):
            await super().record_events(entries, announce=announce)
            os._exit(17)  # the batch is recorded; its offset is not committed

    async def main():
        engine = create_engine(database_url)
        store = DiesAfterCommit(engine) if how == "after-commit" else SqlNotificationStore(engine)
        bus = SqliteEventLog(bus_url, client_id="notification-1", lease_s=1.0)
        subscribe(bus, NotificationService(store=store, couriers=[LogCourier()]))
        await bus.start()
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("how", ["after-commit", "sigkill"])
async def test_a_consumer_killed_at_any_moment_leaves_one_notification_per_event(
    database: Path, bus_url: str, orders: Orders, how: str
) -> None:
    """Killed right after a batch's commit (the batch comes again: the inbox drops it), or
    by ``SIGKILL`` wherever it is while events stream in: either way the next consumer
    makes exactly one notification per event."""
    engine = create_engine(f"sqlite+aiosqlite:///{database}")
    await migrate(engine, package="shop.notification", service="notification")
    placed = [order_event(f"ord-{n}") for n in range(300)]
    await orders.publish(*placed[:50])
    killed = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CONSUMER, bus_url, f"sqlite+aiosqlite:///{database}", how
    )
    try:
        if how == "after-commit":
            assert await asyncio.wait_for(killed.wait(), 60) == 17
            notified_before, _ = stored(database)
            assert sorted(notified_before) == sorted(e.id for e in placed[:50])
        else:
            for start in range(50, 150, 10):  # a stream, the consumer in the middle of it
                await orders.publish(*placed[start : start + 10])
            await until(lambda: len(stored(database)[0]) >= 60, within_s=30)
            os.kill(killed.pid, signal.SIGKILL)
            assert await asyncio.wait_for(killed.wait(), 60) == -signal.SIGKILL
            notified_before, _ = stored(database)
    finally:
        if killed.returncode is None:
            killed.kill()
            await killed.wait()
    await orders.publish(*placed[orders.published :])

    lines = LogLines()
    bus = SqliteEventLog(bus_url, client_id="notification-2", lease_s=1.0)
    try:
        subscribe(bus, NotificationService(store=SqlNotificationStore(engine), couriers=[lines]))
        await bus.start()  # takes over once the killed consumer's lease lapses
        await orders.all_handled(within_s=30)
    finally:
        await bus.close()
        await engine.dispose()
    notified, seen = stored(database)
    assert sorted(notified) == sorted(e.id for e in placed), "exactly one per event"
    assert seen == len(placed)
    announced = [n.event_id for n in lines.delivered]
    assert len(set(announced)) == len(announced)
    assert not set(announced) & set(notified_before), "what was recorded is not told again"
