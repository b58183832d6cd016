"""Settings of the product service (env prefix ``PRODUCT_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shop.platform.settings import PlatformSettings, ServiceSettings

__all__ = ["ProductSettings"]


class ProductSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PRODUCT_", extra="ignore")

    seed_demo_catalogue: bool = Field(
        default=True,
        description="Add the demo products when the catalogue is empty (embedded profile only).",
    )

    def seeds_demo_catalogue(self, platform: PlatformSettings) -> bool:
        # A production catalogue is real: a forgotten setting must never invent products.
        return self.seed_demo_catalogue and not platform.is_production
