"""What the order service publishes: ``order.placed`` and ``order.cancelled`` on ``orders``.

The data is the order as clients see it plus the buyer's ``email``, so a consumer (the
notification service) needs nothing else to tell the buyer. It consumes nothing.
"""

from __future__ import annotations

from shop.order.domain import Order, order_document
from shop.platform.events import Event

__all__ = ["ORDER_CANCELLED", "ORDER_PLACED", "SOURCE", "order_cancelled", "order_placed"]

SOURCE = "/order-service"
ORDER_PLACED = "order.placed"
ORDER_CANCELLED = "order.cancelled"


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
