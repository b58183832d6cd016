"""Settings of the notification service (env prefix ``NOTIFICATION_``)."""

from __future__ import annotations

from typing import Any, ClassVar, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from shop.platform.settings import ServiceSettings

__all__ = ["NotificationSettings"]


class NotificationSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="NOTIFICATION_", extra="ignore")
    uses_event_bus: ClassVar[bool] = True

    smtp_host: str | None = Field(
        default=None, description="SMTP server; unset = no e-mail, notifications go to the log."
    )
    smtp_port: int = Field(default=25, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = False
    smtp_from: str = "shop@localhost"
    smtp_timeout_s: float = Field(default=10.0, gt=0)

    # The sweeper: what was recorded but not sent (a crash, a failed send) goes out later.
    sweep_interval_s: float = Field(default=5.0, gt=0)
    retry_base_s: float = Field(default=5.0, gt=0)
    retry_max_s: float = Field(default=600.0, gt=0)
    max_attempts: int = Field(default=10, ge=1)
    claim_s: float = Field(
        default=60.0,
        gt=0,
        description="How long one sender owns a notification before the sweeper takes it over.",
    )

    @field_validator("smtp_host", "smtp_username", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @model_validator(mode="after")
    def _claim_outlives_a_send(self) -> Self:
        # Otherwise the sweeper could take over a send still in progress and mail it twice.
        if self.claim_s <= self.smtp_timeout_s:
            raise ValueError("claim_s must be longer than smtp_timeout_s")
        return self

    @property
    def sends_email(self) -> bool:
        return self.smtp_host is not None
