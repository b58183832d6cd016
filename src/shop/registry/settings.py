"""Settings of the discovery server (env prefix ``REGISTRY_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shop.platform.settings import ServiceSettings
from shop.registry.domain import MAX_LEASE_DURATION_S

__all__ = ["RegistrySettings"]


class RegistrySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="REGISTRY_", extra="ignore")

    port: int = 8761
    lease_duration_s: int = Field(
        default=90,
        ge=1,
        le=MAX_LEASE_DURATION_S,
        description="Lease of an instance that does not say its own leaseInfo.durationInSecs.",
    )
    eviction_interval_s: float = Field(
        default=30.0,
        gt=0,
        description="How often expired leases are swept out (they are hidden as soon as expired).",
    )
