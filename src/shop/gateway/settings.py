"""The gateway's own settings (env prefix ``GATEWAY_``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shop.platform.settings import PlatformSettings, ServiceSettings

__all__ = ["GatewaySettings"]


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")
    uses_database: ClassVar[bool] = False

    port: int = 8765
    upstream_timeout_s: float = Field(
        default=10.0, gt=0, description="Longest wait for a service's next bytes (504 after)."
    )
    registry_dashboard_url: str | None = Field(
        default=None,
        description="Origin serving /eureka/web; derived from SHOP_REGISTRY_URL when unset.",
    )
    openapi_cache_ttl_s: float = Field(default=30.0, ge=0)
    jwks_min_refetch_s: float = Field(
        default=10.0, ge=0, description="An unknown key id refetches the JWKS at most this often."
    )

    trusted_proxies: list[str] = Field(
        default=[],
        description=(
            "Peers (load balancers) whose X-Forwarded-* are kept and appended to; from any "
            "other peer they are replaced by what the gateway saw."
        ),
    )

    def dashboard_url(self, platform: PlatformSettings) -> str:
        if self.registry_dashboard_url:
            return self.registry_dashboard_url.rstrip("/")
        # Any registry serves the dashboard; the first one listed is the one operators expect.
        base = platform.registry_urls[0].rstrip("/")
        return base.removesuffix("/eureka")
