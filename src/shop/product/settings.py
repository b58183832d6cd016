"""Settings of the product service (env prefix ``PRODUCT_``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shop.platform.settings import (
    MONGO_SCHEMES,
    SQL_SCHEMES,
    PlatformSettings,
    ServiceSettings,
)

__all__ = ["ProductSettings"]


class ProductSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PRODUCT_", extra="ignore")
    uses_event_bus: ClassVar[bool] = True
    # The catalogue lives in MongoDB on the production profile, SQL anywhere.
    database_schemes: ClassVar[Mapping[str, tuple[str, str]]] = {**SQL_SCHEMES, **MONGO_SCHEMES}

    seed_demo_catalogue: bool = Field(
        default=True,
        description="Add the demo products when the catalogue is empty (embedded profile only).",
    )

    def seeds_demo_catalogue(self, platform: PlatformSettings) -> bool:
        # A production catalogue is real: a forgotten setting must never invent products.
        return self.seed_demo_catalogue and not platform.is_production
