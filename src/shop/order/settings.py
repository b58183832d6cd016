"""Settings of the order service (env prefix ``ORDER_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shop.platform.settings import ServiceSettings

__all__ = ["OrderSettings"]


class OrderSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ORDER_", extra="ignore")

    inventory_timeout_s: float = Field(
        default=2.0, gt=0, description="How long a reservation or release may take."
    )
    catalogue_timeout_s: float = Field(
        default=2.0, gt=0, description="How long the price look-up at product-service may take."
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
    release_retry_delays_s: list[float] = Field(
        default=[0.5, 2.0, 5.0],
        description="Pauses between background releases of a reservation that may exist.",
    )
    outbox_poll_interval_s: float = Field(default=1.0, gt=0)
