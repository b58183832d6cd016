"""Settings shared by every process, and the base class each service extends with its own prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["PlatformSettings", "ServiceSettings", "Profile"]

Profile = Literal["embedded", "production"]


class PlatformSettings(BaseSettings):
    """What every process of one Shop deployment agrees on (env prefix ``SHOP_``)."""

    model_config = SettingsConfigDict(env_prefix="SHOP_", extra="ignore")

    profile: Profile = "embedded"
    data_dir: Path = Path(".data")
    registry_url: str = "http://127.0.0.1:8761/eureka"
    # Where events travel: unset = the embedded SQLite event log under the data dir.
    event_bus_url: str | None = None
    # A failing event handler is retried with back-off, then its event is dead-lettered.
    event_max_attempts: int = Field(default=40, ge=1)
    event_retry_backoff_s: float = Field(default=0.2, gt=0)
    event_retry_backoff_max_s: float = Field(default=30.0, gt=0)
    event_handler_timeout_s: float = Field(default=60.0, gt=0)
    # How this process is reached by others; 127.0.0.1 suits a laptop, a pod sets its own IP.
    advertise_host: str = "127.0.0.1"
    heartbeat_interval_s: float = 30.0
    lease_duration_s: int = 90
    registry_cache_ttl_s: float = 5.0
    # Shared by the services to obtain service tokens from auth (SPEC §4 internal calls).
    # `shop up` makes one per run; production sets it from a secret store.
    service_secret: SecretStr | None = None
    auth_issuer: str = "shop-auth"
    auth_audience: str = "shop"
    log_level: str = "INFO"
    max_body_bytes: int = 1_048_576

    @property
    def is_production(self) -> bool:
        return self.profile == "production"

    @property
    def resolved_event_bus_url(self) -> str:
        return self.event_bus_url or f"sqlite:///{(self.data_dir / 'events.db').resolve()}"


class ServiceSettings(BaseSettings):
    """Base for one service's own settings. Subclasses set ``env_prefix`` (``AUTH_``, ...)."""

    model_config = SettingsConfigDict(extra="ignore")

    host: str = "127.0.0.1"
    port: int = 0
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; the embedded profile uses a SQLite file under the data dir.",
    )

    def resolved_database_url(self, *, platform: PlatformSettings, service: str) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{platform.data_dir.resolve() / f'{service}.db'}"
