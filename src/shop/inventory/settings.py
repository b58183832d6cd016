"""Settings of the inventory service (env prefix ``INVENTORY_``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shop.platform.settings import PlatformSettings, ServiceSettings

__all__ = ["InventorySettings"]


class InventorySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="INVENTORY_", extra="ignore")
    # It learns new SKUs from the catalogue's product events.
    uses_event_bus: ClassVar[bool] = True

    seed_demo_stock: bool = Field(
        default=True,
        description="Stock the demo SKUs when the stock table is empty (embedded profile only).",
    )
    reserve_attempts: int = Field(
        default=3,
        ge=1,
        le=10,
        description="Tries of one reservation when MySQL reports a deadlock or lock wait timeout.",
    )
    reserve_group_window_ms: float = Field(
        default=0.5,
        ge=0,
        le=50,
        description="How long a reservation arriving at rest waits for others to share its "
        "transaction (under load, groups form while the previous one commits).",
    )
    reserve_group_size: int = Field(
        default=128,
        ge=1,
        le=1000,
        description="Most reservations applied in one transaction.",
    )

    def seeds_demo_stock(self, platform: PlatformSettings) -> bool:
        # Production stock is real: a forgotten setting must never invent units to sell.
        return self.seed_demo_stock and platform.profile == "embedded"
