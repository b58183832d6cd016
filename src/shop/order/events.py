"""What the order service publishes and consumes.

It publishes ``order.placed`` and ``order.cancelled`` on ``orders``: the order as clients
see it plus the buyer's ``email``, so a consumer (the notification service) needs nothing
else to tell the buyer.

It consumes the catalogue's ``products`` topic (``product.created/updated/deleted``, each
carrying the product document) as its own consumer group, to keep the price list it prices
orders from (docs/order.md, "Prices").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from shop.order.domain import Order, PriceChange, order_document, price_change
from shop.platform.events import Event, EventBus

__all__ = [
    "CONSUMER_GROUP",
    "ORDER_CANCELLED",
    "ORDER_PLACED",
    "PRODUCTS_TOPIC",
    "PRODUCT_EVENTS",
    "SOURCE",
    "order_cancelled",
    "order_placed",
    "price_change_of",
    "subscribe",
]

SOURCE = "/order-service"
ORDER_PLACED = "order.placed"
ORDER_CANCELLED = "order.cancelled"

PRODUCTS_TOPIC = "products"
CONSUMER_GROUP = "order-service"
PRODUCT_CREATED = "product.created"
PRODUCT_UPDATED = "product.updated"
PRODUCT_DELETED = "product.deleted"
PRODUCT_EVENTS = frozenset({PRODUCT_CREATED, PRODUCT_UPDATED, PRODUCT_DELETED})


def _event(type_: str, order: Order) -> Event:
    return Event.new(
        type=type_,
        source=SOURCE,
        subject=order.order_number,
        data={**order_document(order), "email": order.buyer_email},
    )


def order_placed(order: Order) -> Event:
    return _event(ORDER_PLACED, order)


def order_cancelled(order: Order) -> Event:
    return _event(ORDER_CANCELLED, order)


def price_change_of(event: Event) -> PriceChange | None:
    """The price-list change a catalogue event makes; None for a type it does not know.

    The subject (the bus key) is the product id; the event's time orders one product's
    changes (the catalogue writes them under the product's lock, in commit order).
    """
    if event.type not in PRODUCT_EVENTS:
        return None
    return price_change(
        product_id=event.subject,
        data=event.data,
        deleted=event.type == PRODUCT_DELETED,
        time=event.time,
    )


def subscribe(bus: EventBus, handler: Callable[[Event], Awaitable[None]]) -> None:
    """Call before ``bus.start()``."""
    bus.subscribe(PRODUCTS_TOPIC, group=CONSUMER_GROUP, handler=handler)
