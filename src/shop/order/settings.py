"""Settings of the order service (env prefix ``ORDER_``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shop.platform.settings import ServiceSettings

__all__ = ["OrderSettings"]


class OrderSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ORDER_", extra="ignore")
    uses_event_bus: ClassVar[bool] = True
    # It asks auth for a service token to reserve and release stock.
    uses_service_secret: ClassVar[bool] = True

    inventory_timeout_s: float = Field(
        default=2.0, gt=0, description="How long a reservation or release may take."
    )
    catalogue_timeout_s: float = Field(
        default=2.0, gt=0, description="How long the price look-up at product-service may take."
    )
    price_source: Literal["price-list", "catalogue"] = Field(
        default="price-list",
        description=(
            "Where an order's prices come from: the price list fed by the catalogue's events "
            "(the catalogue asked only for a SKU it lacks), or the catalogue itself, asked for "
            'every order (docs/order.md "Prices").'
        ),
    )
    breaker_failure_threshold: int = Field(
        default=5, ge=1, description="Consecutive inventory failures that open the breaker."
    )
    breaker_open_s: float = Field(
        default=10.0, gt=0, description="How long the breaker stays open before one probe."
    )
    idempotency_stale_s: float = Field(
        default=60.0,
        gt=0,
        description="An Idempotency-Key still in flight after this long is taken as abandoned.",
    )
    claim_lease_s: float = Field(
        default=5.0,
        ge=0.5,
        le=600,
        description=(
            "An order process renews a lease every third of this; its Idempotency-Key claims "
            "are taken over this long after it died (at once after it stopped)."
        ),
    )
    release_hold_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "A reservation whose order is not saved within this long (the process died "
            "mid-request) is released by the reconciler."
        ),
    )
    release_interval_s: float = Field(
        default=1.0, gt=0, description="How often the reconciler looks for due releases."
    )
    release_backoff_s: float = Field(
        default=3.0,
        gt=0,
        description=(
            "Wait after a release's first failed attempt, doubled after each further one; "
            "more than INVENTORY_TIMEOUT_S, so an attempt is over before the next starts."
        ),
    )
    release_backoff_max_s: float = Field(
        default=60.0, gt=0, description="The longest wait between two attempts of a release."
    )
    outbox_poll_interval_s: float = Field(default=1.0, gt=0)
    outbox_wake_delay_s: float = Field(
        default=0.01,
        ge=0,
        description=(
            "How long the relay waits after an order's commit before publishing, so the "
            "events of the orders committed meanwhile leave in one round (0: at once)."
        ),
    )
