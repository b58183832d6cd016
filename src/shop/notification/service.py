"""Use cases of the notification service: tell the buyer about an order event (once), send
again what could not be sent, list a user's notifications.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry, Counter

from shop.notification.couriers import Announcer, Courier
from shop.notification.domain import (
    MalformedOrder,
    Message,
    Notification,
    NotificationType,
    OrderNotice,
    Status,
    compose_message,
    notification_type,
    read_order,
    retry_delay,
)
from shop.notification.store import NotificationStore
from shop.platform.events import Delivery, Event
from shop.platform.worker import Loop

__all__ = ["NotificationService", "Sweeper"]

log = logging.getLogger("shop.notification")

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class NotificationService:
    def __init__(
        self,
        *,
        store: NotificationStore,
        couriers: Sequence[Courier],
        claim_s: float = 60.0,
        retry_base_s: float = 5.0,
        retry_max_s: float = 600.0,
        max_attempts: int = 10,
        sweep_batch: int = 50,
        clock: Clock = _utc_now,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """``couriers[0]`` carries new notifications; the others finish older ones that
        were recorded for their channel (e.g. LOG ones after SMTP was configured).
        ``registry`` gets ``shop_notifications_sent_total`` and ``..._failed_total`` by channel."""
        if not couriers:
            raise ValueError("at least one courier is needed")
        self._store = store
        self._couriers = {c.channel: c for c in reversed(couriers)}
        self._channel = couriers[0].channel
        # New notifications of an announcing courier (the log) are recorded already done.
        self._announcer = couriers[0] if isinstance(couriers[0], Announcer) else None
        self._claim = timedelta(seconds=claim_s)
        self._retry_base_s = retry_base_s
        self._retry_max_s = retry_max_s
        self._max_attempts = max_attempts
        self._sweep_batch = sweep_batch
        self._clock = clock
        registry = registry if registry is not None else CollectorRegistry()
        sent = Counter(
            "shop_notifications_sent",
            "Notifications delivered (sent or logged), by channel",
            ["channel"],
            registry=registry,
        )
        failed = Counter(
            "shop_notifications_failed",
            "Failed delivery attempts, by channel",
            ["channel"],
            registry=registry,
        )
        # One child per channel, resolved once: a count is one inc() per notification.
        self._sent = {channel: sent.labels(channel) for channel in self._couriers}
        self._failed = {channel: failed.labels(channel) for channel in self._couriers}

    async def on_order_event(self, event: Event) -> None:
        """Handler of the ``orders`` topic. Raises only when nothing was recorded, so the
        bus delivers the event again; once recorded, a failed send is the sweeper's job."""
        kind = notification_type(event.type)
        if kind is None:
            await self._store.record_event(event.id, None)
            return
        try:
            order = read_order(event.data)
        except MalformedOrder as exc:
            self._ignore(event, exc)
            return
        notification = self._first_record(event, order, kind, self._clock())
        announcer = self._announcer
        if not await self._store.record_event(
            event.id, notification, announce=announcer.announce if announcer else None
        ):
            log.info("event %s was already processed; nothing to do", event.id)
            return
        if announcer is not None:
            self._sent[notification.channel].inc()
            return
        await self._settle(notification)

    async def on_order_events(self, deliveries: Sequence[Delivery]) -> None:
        """Batch handler of the ``orders`` topic: the events the bus has in hand, recorded
        in one transaction (inbox rows, notifications and, for the log, their lines), then
        each e-mail sent on its own, as ``on_order_event`` does for one event. Raises only
        when nothing was recorded: the bus then hands the events to ``on_order_event`` one
        at a time."""
        now = self._clock()
        entries: list[tuple[str, Notification | None]] = []
        by_event: dict[str, Delivery] = {}
        for delivery in deliveries:
            event = delivery.event
            by_event.setdefault(event.id, delivery)
            kind = notification_type(event.type)
            if kind is None:
                entries.append((event.id, None))
                continue
            try:
                order = read_order(event.data)
            except MalformedOrder as exc:
                delivery.bind()
                self._ignore(event, exc)
                continue
            entries.append((event.id, self._first_record(event, order, kind, now)))
        announcer = self._announcer

        def announce(notification: Notification) -> None:
            # Each line carries its own event's request id and trace.
            by_event[notification.event_id].bind()
            if announcer is not None:
                announcer.announce(notification)

        recorded = await self._store.record_events(
            entries, announce=announce if announcer is not None else None
        )
        to_send: list[Notification] = []
        for (event_id, notification), new in zip(entries, recorded, strict=True):
            if not new:
                by_event[event_id].bind()
                log.info("event %s was already processed; nothing to do", event_id)
            elif notification is not None and announcer is not None:
                self._sent[notification.channel].inc()
            elif notification is not None:
                to_send.append(notification)
        courier = self._couriers[self._channel]
        for notification in to_send:
            by_event[notification.event_id].bind()
            claimed_until = notification.next_attempt_at
            if claimed_until is not None and (
                self._clock() + timedelta(seconds=courier.timeout_s) >= claimed_until
            ):
                # The batch's earlier sends took that long: a send now could outlive the
                # claim and race the sweeper, which sends it once the claim lapses instead.
                log.info("notification %s is left to the sweeper", notification.id)
                continue
            # Shielded: if the bus gives up on the batch (its handler time-out) or closes,
            # the conversation in progress still ends and is marked, instead of being cut
            # after the server took the mail and sent again by the sweeper.
            await asyncio.shield(self._settle(notification))

    async def _settle(self, notification: Notification) -> None:
        try:
            await self._deliver(notification)
        except Exception:
            log.exception("could not settle notification %s; the sweeper will", notification.id)

    def _ignore(self, event: Event, error: MalformedOrder) -> None:
        # Redelivering cannot repair the data; the producer has to. Log and move on.
        log.error(
            "ignoring %s event %s from %s (subject %s): %s",
            event.type,
            event.id,
            event.source,
            event.subject,
            error,
        )

    def _first_record(
        self, event: Event, order: OrderNotice, kind: NotificationType, now: datetime
    ) -> Notification:
        """The record of ``event``'s notification, on its first attempt: for an announcing
        courier (the log) already done, its line written inside the recording transaction
        (one transaction per event instead of two; if the commit fails the event comes
        again: the line at least once, the record once); otherwise claimed by this first
        attempt, so the sweeper sends it only if this process dies before marking it."""
        message = compose_message(order, kind)
        if self._announcer is not None:
            return self._notification(
                event,
                order,
                kind,
                message,
                now,
                status="LOGGED",
                next_attempt_at=None,
                sent_at=now,
            )
        return self._notification(
            event,
            order,
            kind,
            message,
            now,
            status="PENDING",
            next_attempt_at=now + self._claim,
        )

    def _notification(
        self,
        event: Event,
        order: OrderNotice,
        kind: NotificationType,
        message: Message,
        now: datetime,
        *,
        status: Status,
        next_attempt_at: datetime | None,
        sent_at: datetime | None = None,
    ) -> Notification:
        """The record of ``event``'s notification, on its first attempt."""
        return Notification(
            id=str(uuid.uuid4()),
            event_id=event.id,
            user_id=order.user_id,
            email=order.email,
            order_number=order.order_number,
            type=kind,
            channel=self._channel,
            status=status,
            subject=message.subject,
            body=message.body,
            created_at=now,
            attempts=1,
            next_attempt_at=next_attempt_at,
            sent_at=sent_at,
        )

    async def retry_due(self) -> int:
        """Send what is due again (PENDING left by a crash, FAILED after its back-off)."""
        now = self._clock()
        due = await self._store.claim_due(
            now=now,
            hold_until=now + self._claim,
            channels=list(self._couriers),
            limit=self._sweep_batch,
        )
        for notification in due:
            await self._deliver(notification)
        return len(due)

    async def notifications_of(
        self, user_id: str, *, order_number: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[Notification]:
        return await self._store.of_user(
            user_id, order_number=order_number, limit=limit, offset=offset
        )

    async def _deliver(self, notification: Notification) -> None:
        courier = self._couriers[notification.channel]
        try:
            await courier.deliver(notification)
        except Exception as exc:
            self._failed[notification.channel].inc()
            attempts = notification.attempts
            retry = attempts < self._max_attempts
            next_attempt = (
                self._clock()
                + timedelta(
                    seconds=retry_delay(
                        attempts, base_s=self._retry_base_s, max_s=self._retry_max_s
                    )
                )
                if retry
                else None
            )
            log.warning(
                "notification %s for order %s failed (attempt %d%s): %r",
                notification.id,
                notification.order_number,
                attempts,
                "" if retry else ", giving up",
                exc,
            )
            await self._store.mark_failed(
                notification.id, error=f"{type(exc).__name__}: {exc}", next_attempt_at=next_attempt
            )
            return
        status: Status = "SENT" if notification.channel == "EMAIL" else "LOGGED"
        await self._store.mark_done(notification.id, status=status, now=self._clock())
        self._sent[notification.channel].inc()


class Sweeper:
    """Runs ``retry_due`` every ``interval_s`` in the background, on the common loop: a
    failed sweep is logged and counted (``shop_background_failures_total{job=
    "notification-sweeper"}``) and tried again after a back-off; stopping lets the sweep
    in hand finish."""

    def __init__(self, service: NotificationService, *, interval_s: float) -> None:
        self._service = service
        self._loop = Loop(
            self._sweep,
            name="notification-sweeper",
            interval_s=interval_s,
            backoff_s=interval_s,
            backoff_max_s=max(interval_s, 60.0),
        )

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def _sweep(self) -> bool:
        # True (another step at once) while due notifications keep coming.
        return bool(await self._service.retry_due())
