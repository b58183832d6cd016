"""What the notification service consumes: the ``orders`` topic, as its own consumer group."""

from __future__ import annotations

from shop.notification.service import NotificationService
from shop.platform.events import BatchDelivery, EventBus

__all__ = ["CONSUMER_GROUP", "ORDERS_TOPIC", "subscribe"]

ORDERS_TOPIC = "orders"
CONSUMER_GROUP = "notification-service"


def subscribe(bus: EventBus, service: NotificationService) -> None:
    """Call before ``bus.start()``. In batches where the bus can: the events it has in hand
    are recorded in one transaction and committed once (docs/notification.md)."""
    if isinstance(bus, BatchDelivery):
        bus.subscribe_batches(
            ORDERS_TOPIC,
            group=CONSUMER_GROUP,
            handler=service.on_order_event,
            batch_handler=service.on_order_events,
        )
        return
    bus.subscribe(ORDERS_TOPIC, group=CONSUMER_GROUP, handler=service.on_order_event)
