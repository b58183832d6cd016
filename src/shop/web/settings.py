"""Settings of the storefront (env prefix ``WEB_``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shop.platform.settings import ServiceSettings

__all__ = ["WebSettings"]


class WebSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="WEB_", extra="ignore")
    # No store of its own: the catalogue is read through the gateway's public API, and
    # tokens are checked by the gateway and the services the browser calls, never here.
    uses_database: ClassVar[bool] = False
    verifies_tokens: ClassVar[bool] = False

    page_size: int = Field(default=12, ge=1, le=100, description="Products per catalogue page.")
    gateway_timeout_s: float = Field(
        default=5.0, gt=0, le=60, description="Longest wait for the gateway's public API."
    )
    categories_ttl_s: float = Field(
        default=30.0, ge=0, description="How long the category list of the filter is kept."
    )
