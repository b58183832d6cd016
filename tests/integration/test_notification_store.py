"""Notifications on a real database (SQLite and MariaDB): once per event, retried with
back-off, listed per user. The courier is the only stand-in: it is where mail would leave.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from shop.notification.couriers import Courier
from shop.notification.domain import Channel, Notification
from shop.notification.service import NotificationService
from shop.notification.store import SqlNotificationStore, notifications
from shop.platform.context import TraceContext
from shop.platform.db import create_engine, migrate
from shop.platform.events import Delivery, Event
from shop.platform.inbox import inbox

CLAIM_S = 60.0


@dataclass
class Clock:
    now: datetime = field(default_factory=lambda: datetime(2025, 1, 1, 12, 0, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class RecordingCourier:
    channel: Channel = "EMAIL"
    timeout_s: float = 10.0
    failures_left: int = 0
    delivered: list[Notification] = field(default_factory=list)

    async def deliver(self, notification: Notification) -> None:
        if self.failures_left:
            self.failures_left -= 1
            raise ConnectionRefusedError("SMTP server is down")
        self.delivered.append(notification)


def order_event(
    *,
    order_number: str = "ord-1",
    user_id: str = "u-ada",
    event_type: str = "order.placed",
    **data: Any,
) -> Event:
    body: dict[str, Any] = {
        "orderNumber": order_number,
        "status": "PLACED",
        "userId": user_id,
        "email": f"{user_id}@example.com",
        "lines": [
            {"skuCode": "pixel_8", "quantity": 1, "unitPrice": "899.00", "lineTotal": "899.00"}
        ],
        "total": "899.00",
    }
    body.update(data)
    return Event(type=event_type, source="/order-service", subject=order_number, data=body)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    await migrate(engine, package="shop.notification", service="notification")
    try:
        yield engine
    finally:
        await engine.dispose()


def make_service(
    engine: AsyncEngine, courier: Courier, clock: Clock, **options: Any
) -> NotificationService:
    return NotificationService(
        store=SqlNotificationStore(engine),
        couriers=[courier],
        claim_s=CLAIM_S,
        retry_base_s=10.0,
        retry_max_s=100.0,
        clock=clock,
        **options,
    )


async def count(engine: AsyncEngine, table: Any) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


async def test_a_redelivered_event_makes_one_notification_and_one_mail(
    engine: AsyncEngine,
) -> None:
    courier, clock = RecordingCourier(), Clock()
    service = make_service(engine, courier, clock)
    event = order_event()
    await service.on_order_event(event)
    await service.on_order_event(event)
    await make_service(engine, courier, clock).on_order_event(event)  # another instance

    (notification,) = await service.notifications_of("u-ada")
    assert (notification.order_number, notification.type) == ("ord-1", "ORDER_PLACED")
    assert (notification.channel, notification.status) == ("EMAIL", "SENT")
    assert notification.event_id == event.id
    assert [n.event_id for n in courier.delivered] == [event.id]
    assert await count(engine, notifications) == 1


async def test_concurrent_deliveries_of_one_event_make_one_notification(
    engine: AsyncEngine,
) -> None:
    courier, clock = RecordingCourier(), Clock()
    event = order_event()
    await asyncio.gather(
        *(make_service(engine, courier, clock).on_order_event(event) for _ in range(4))
    )
    assert len(courier.delivered) == 1
    assert await count(engine, notifications) == 1


async def test_listing_is_per_user_newest_first_and_filters_by_order(engine: AsyncEngine) -> None:
    courier, clock = RecordingCourier(), Clock()
    service = make_service(engine, courier, clock)
    await service.on_order_event(order_event(order_number="ord-1"))
    clock.advance(1)
    await service.on_order_event(order_event(order_number="ord-2"))
    clock.advance(1)
    await service.on_order_event(
        order_event(order_number="ord-1", event_type="order.cancelled", status="CANCELLED")
    )
    await service.on_order_event(order_event(order_number="ord-3", user_id="u-bob"))

    mine = await service.notifications_of("u-ada")
    assert [(n.order_number, n.type) for n in mine] == [
        ("ord-1", "ORDER_CANCELLED"),
        ("ord-2", "ORDER_PLACED"),
        ("ord-1", "ORDER_PLACED"),
    ]
    assert mine[0].created_at == clock.now
    one_order = await service.notifications_of("u-ada", order_number="ord-1")
    assert [n.type for n in one_order] == ["ORDER_CANCELLED", "ORDER_PLACED"]
    assert await service.notifications_of("u-ada", order_number="ord-3") == []
    assert [n.order_number for n in await service.notifications_of("u-bob")] == ["ord-3"]
    page = await service.notifications_of("u-ada", limit=1, offset=1)
    assert [n.order_number for n in page] == ["ord-2"]


async def test_other_event_types_are_seen_but_not_notified(engine: AsyncEngine) -> None:
    courier = RecordingCourier()
    service = make_service(engine, courier, Clock())
    await service.on_order_event(order_event(event_type="order.shipped"))
    assert courier.delivered == []
    assert await count(engine, notifications) == 0
    assert await count(engine, inbox) == 1


async def test_malformed_order_data_records_nothing_and_does_not_raise(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    courier = RecordingCourier()
    service = make_service(engine, courier, Clock())
    broken = order_event(email=None)
    with caplog.at_level("ERROR", logger="shop.notification"):
        await service.on_order_event(broken)
    assert broken.id in caplog.text
    assert "email" in caplog.text
    assert courier.delivered == []
    assert await count(engine, notifications) == 0
    assert await count(engine, inbox) == 0


async def test_a_failed_send_is_kept_and_retried_after_its_back_off(engine: AsyncEngine) -> None:
    courier, clock = RecordingCourier(failures_left=2), Clock()
    service = make_service(engine, courier, clock)
    event = order_event()
    await service.on_order_event(event)

    store = SqlNotificationStore(engine)
    failed = await store.by_event(event.id)
    assert failed is not None
    assert failed.status == "FAILED"
    assert failed.last_error == "ConnectionRefusedError: SMTP server is down"
    assert failed.next_attempt_at == clock.now + timedelta(seconds=10)
    (listed,) = await service.notifications_of("u-ada")
    assert listed.status == "FAILED"

    clock.advance(9)
    assert await service.retry_due() == 0
    clock.advance(1)
    assert await service.retry_due() == 1  # fails again: the back-off doubles
    again = await store.by_event(event.id)
    assert again is not None
    assert (again.status, again.attempts) == ("FAILED", 2)
    assert again.next_attempt_at == clock.now + timedelta(seconds=20)

    clock.advance(20)
    assert await service.retry_due() == 1
    sent = await store.by_event(event.id)
    assert sent is not None
    assert (sent.status, sent.last_error, sent.next_attempt_at) == ("SENT", None, None)
    assert sent.sent_at == clock.now
    assert len(courier.delivered) == 1
    clock.advance(1000)
    assert await service.retry_due() == 0


async def test_retries_stop_after_the_last_attempt(engine: AsyncEngine) -> None:
    courier, clock = RecordingCourier(failures_left=100), Clock()
    service = make_service(engine, courier, clock, max_attempts=3)
    event = order_event()
    await service.on_order_event(event)
    for _ in range(5):
        clock.advance(1000)
        await service.retry_due()
    given_up = await SqlNotificationStore(engine).by_event(event.id)
    assert given_up is not None
    assert (given_up.status, given_up.attempts, given_up.next_attempt_at) == ("FAILED", 3, None)


async def test_a_notification_left_pending_by_a_crash_is_sent_by_the_sweeper_once(
    engine: AsyncEngine,
) -> None:
    clock = Clock()
    event = order_event()

    class Crash(BaseException):
        """The process ends between the commit and the send."""

    @dataclass
    class DyingCourier(RecordingCourier):
        async def deliver(self, notification: Notification) -> None:
            raise Crash

    with pytest.raises(Crash):
        await make_service(engine, DyingCourier(), clock).on_order_event(event)
    pending = await SqlNotificationStore(engine).by_event(event.id)
    assert pending is not None and pending.status == "PENDING"

    courier = RecordingCourier()
    sweepers = [make_service(engine, courier, clock) for _ in range(3)]
    await sweepers[0].on_order_event(event)  # the bus redelivers it: already recorded
    assert await sweepers[0].retry_due() == 0  # the dead sender's claim still holds
    clock.advance(CLAIM_S)
    await asyncio.gather(*(s.retry_due() for s in sweepers))
    assert [n.event_id for n in courier.delivered] == [event.id]
    sent = await SqlNotificationStore(engine).by_event(event.id)
    assert sent is not None and sent.status == "SENT"


async def test_without_email_the_log_channel_is_used(engine: AsyncEngine) -> None:
    courier = RecordingCourier(channel="LOG")
    service = make_service(engine, courier, Clock())
    await service.on_order_event(order_event())
    (notification,) = await service.notifications_of("u-ada")
    assert (notification.channel, notification.status) == ("LOG", "LOGGED")


# --- batches: the events a delivery has in hand, recorded together ------------------------


def delivered(*events: Event) -> list[Delivery]:
    return [Delivery(event, TraceContext.new()) for event in events]


async def test_a_batch_is_recorded_once_per_event_and_each_mail_sent_once(
    engine: AsyncEngine,
) -> None:
    courier, clock = RecordingCourier(), Clock()
    service = make_service(engine, courier, clock)
    first, second, shipped = (
        order_event(),
        order_event(order_number="ord-2"),
        order_event(order_number="ord-1", event_type="order.shipped"),
    )
    earlier = order_event(order_number="ord-0")
    await service.on_order_event(earlier)  # recorded and sent before the batch came
    batch = delivered(first, earlier, second, first, shipped)
    await service.on_order_events(batch)
    await make_service(engine, courier, clock).on_order_events(batch)  # the batch again

    assert [n.event_id for n in courier.delivered] == [earlier.id, first.id, second.id]
    assert await count(engine, notifications) == 3
    assert await count(engine, inbox) == 4, "the shipped event is seen, not notified"
    for event in (first, second):
        sent = await SqlNotificationStore(engine).by_event(event.id)
        assert sent is not None and (sent.status, sent.attempts) == ("SENT", 1)


async def test_a_batch_whose_sends_would_outlive_their_claim_leaves_them_to_the_sweeper(
    engine: AsyncEngine,
) -> None:
    """Sends after the commit take time; a mail whose turn comes when its claim has less
    than the SMTP time-out left is not started (it could race the sweeper): the sweeper
    sends it once the claim lapses. Each mail goes out exactly once."""
    clock = Clock()

    @dataclass
    class SlowCourier(RecordingCourier):
        async def deliver(self, notification: Notification) -> None:
            await super().deliver(notification)
            clock.advance(25)  # a slow server: each conversation takes 25 s

    courier = SlowCourier(timeout_s=30.0)
    service = make_service(engine, courier, clock)
    events = [order_event(order_number=f"ord-{n}") for n in range(3)]
    await service.on_order_events(delivered(*events))
    # Claimed until t+60: sent at t and t+25; at t+50 only 10 s are left (< 30 s).
    assert [n.event_id for n in courier.delivered] == [e.id for e in events[:2]]
    left = await SqlNotificationStore(engine).by_event(events[2].id)
    assert left is not None and left.status == "PENDING"
    assert await service.retry_due() == 0, "its claim still holds"
    clock.advance(CLAIM_S)
    assert await service.retry_due() == 1
    assert [n.event_id for n in courier.delivered] == [e.id for e in events]


async def test_a_send_in_progress_ends_and_is_marked_when_the_bus_gives_up_on_the_batch(
    engine: AsyncEngine,
) -> None:
    """The bus cancels a batch handler that outlasts its time-out (or when it closes): the
    conversation in progress still ends and is marked, so the sweeper does not send the
    mail a second time."""
    clock = Clock()
    talking, accepted = asyncio.Event(), asyncio.Event()

    @dataclass
    class SlowServer(RecordingCourier):
        async def deliver(self, notification: Notification) -> None:
            talking.set()
            await accepted.wait()
            await super().deliver(notification)

    courier = SlowServer()
    service = make_service(engine, courier, clock)
    event = order_event()
    batch = asyncio.create_task(service.on_order_events(delivered(event)))
    await talking.wait()
    batch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await batch
    accepted.set()
    store = SqlNotificationStore(engine)
    for _ in range(500):
        marked = await store.by_event(event.id)
        if marked is not None and marked.status == "SENT":
            break
        await asyncio.sleep(0.01)
    assert marked is not None and marked.status == "SENT"
    clock.advance(CLAIM_S)
    assert await service.retry_due() == 0
    assert [n.event_id for n in courier.delivered] == [event.id]
