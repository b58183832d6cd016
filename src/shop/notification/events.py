"""What the notification service consumes: the ``orders`` topic, as its own consumer group."""

from __future__ import annotations

from shop.notification.service import NotificationService
from shop.platform.events import EventBus

__all__ = ["CONSUMER_GROUP", "ORDERS_TOPIC", "subscribe"]

ORDERS_TOPIC = "orders"
CONSUMER_GROUP = "notification-service"


def subscribe(bus: EventBus, service: NotificationService) -> None:
    """Call before ``bus.start()``."""
    bus.subscribe(ORDERS_TOPIC, group=CONSUMER_GROUP, handler=service.on_order_event)
