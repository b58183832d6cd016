"""What the inventory service consumes: the catalogue's ``products`` topic, as its own
consumer group, so a new product's SKU is known (with 0 units) as soon as it is listed."""

from __future__ import annotations

from shop.inventory.service import InventoryService
from shop.platform.events import EventBus

__all__ = ["CONSUMER_GROUP", "PRODUCTS_TOPIC", "subscribe"]

PRODUCTS_TOPIC = "products"
CONSUMER_GROUP = "inventory-service"


def subscribe(bus: EventBus, service: InventoryService) -> None:
    """Call before ``bus.start()``."""
    bus.subscribe(PRODUCTS_TOPIC, group=CONSUMER_GROUP, handler=service.on_product_event)
