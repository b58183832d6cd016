"""What the product service publishes: on topic ``products``, one event per catalogue change.

The data of each is the product as the API shows it (for a deletion, as it was last);
the subject, hence the key, is the product id, so changes to one product stay in order.
"""

from __future__ import annotations

from shop.platform.events import Event
from shop.product.domain import Product

__all__ = [
    "PRODUCT_CREATED",
    "PRODUCT_DELETED",
    "PRODUCT_UPDATED",
    "SOURCE",
    "TOPIC",
    "product_event",
]

TOPIC = "products"
SOURCE = "/product-service"
PRODUCT_CREATED = "product.created"
PRODUCT_UPDATED = "product.updated"
PRODUCT_DELETED = "product.deleted"


def product_event(type: str, product: Product) -> Event:
    return Event.new(type=type, source=SOURCE, subject=product.id, data=product.document())
