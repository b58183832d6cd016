"""Settings of the auth service (env prefix ``AUTH_``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from shop.auth.domain import SERVICE_NAME_RE, password_problem
from shop.auth.throttle import check_redis_url
from shop.platform.addresses import AddressEntries
from shop.platform.retention import RetentionPolicy
from shop.platform.settings import (
    MIN_SERVICE_SECRET,
    PlatformSettings,
    ServiceSettings,
    SettingsRefused,
    secret_table,
)

__all__ = ["DEV_ADMIN_PASSWORD", "AuthSettings", "UnsafeSettings", "parse_service_clients"]

DEV_ADMIN_PASSWORD = "admin-password"  # noqa: S105 - the published dev default, refused in production


class UnsafeSettings(SettingsRefused):
    """The settings would run the service insecurely; it refuses to start."""


def parse_service_clients(text: str) -> dict[str, str]:
    """``AUTH_SERVICE_CLIENTS``: a JSON object of service name -> that service's secret.

    ValueError never shows a value: the table holds every service's secret."""
    parsed = secret_table(text, setting="AUTH_SERVICE_CLIENTS")
    for name in parsed:
        if not re.fullmatch(SERVICE_NAME_RE, name):
            raise ValueError(f"AUTH_SERVICE_CLIENTS: {name[:64]!r} is not a service name")
    return parsed


class AuthSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="AUTH_", extra="ignore")
    # It verifies tokens with its own keys, never with a JWKS.
    verifies_tokens: ClassVar[bool] = False

    service_clients: SecretStr | None = Field(
        default=None,
        description=(
            "JSON object: each service that makes internal calls -> its own secret. A service"
            " token names its caller, so a secret mints that one name only."
        ),
    )
    jwks_max_age_s: int = Field(
        default=300,
        ge=0,
        le=3600,
        description="Cache-Control max-age of the JWKS: how soon a withdrawn key stops working.",
    )

    access_token_ttl_s: int = Field(default=900, ge=30, le=86_400)
    refresh_token_ttl_s: int = Field(default=14 * 86_400, ge=60)
    refresh_token_retention_s: float = Field(
        default=86_400.0,
        ge=0,
        le=10 * 365 * 86_400,
        description=(
            "How long an expired refresh token is kept after it expired (its reuse still"
            " revokes its family meanwhile); then it, and a family left empty, is deleted."
            " 0 deletes it as soon as the retention job sees it."
        ),
    )

    signing_key: SecretStr | None = Field(
        default=None, description="PEM of the RSA private key that signs access tokens."
    )
    signing_key_file: Path | None = None
    previous_signing_keys: SecretStr | None = Field(
        default=None,
        description="PEMs (private or public) of retired keys, still published in the JWKS.",
    )
    previous_signing_keys_file: Path | None = None
    keys_dir: Path | None = Field(
        default=None, description="Embedded profile key store; default <data_dir>/auth/keys."
    )
    key_size: int = Field(default=2048, ge=2048, le=4096)
    published_previous_keys: int = Field(default=2, ge=1, le=10)

    admin_email: str = "admin@example.com"
    admin_name: str = "Shop admin"
    admin_password: SecretStr = Field(
        default=SecretStr(DEV_ADMIN_PASSWORD),
        description="Password of the admin created at start-up; empty creates no admin.",
    )

    # OWASP's minimum for argon2id; raise them as the hardware allows.
    argon2_time_cost: int = Field(default=2, ge=1)
    argon2_memory_cost_kib: int = Field(default=19_456, ge=8)
    argon2_parallelism: int = Field(default=1, ge=1)
    max_concurrent_hashes: int = Field(default=4, ge=1)

    login_window_s: float = Field(default=300.0, gt=0)
    # The name predates the change: it counts one account's failures from one client
    # address, never an account's alone (that would let anyone lock its owner out).
    max_failures_per_email: int = Field(
        default=5, ge=1, description="Failed log-ins to one account from one client address."
    )
    max_failures_per_client: int = Field(
        default=20, ge=1, description="Failed log-ins from one client address, any account."
    )
    login_throttle_storage_url: str | None = Field(
        default=None,
        description=(
            "Where failed log-ins are counted: unset, this process's memory; redis://host:6379/0"
            " (rediss:// for TLS), shared by every auth instance and kept across restarts."
        ),
    )
    login_throttle_key_prefix: str = Field(
        default="shop-auth-login",
        min_length=1,
        description="Prefix of the log-in throttle's Redis keys.",
    )
    trusted_proxies: AddressEntries = Field(
        default=["127.0.0.1", "::1"],
        description=(
            "Peers whose X-Forwarded-For names the real client (the gateway), as addresses "
            "or networks (CIDR: 10.42.0.0/16)."
        ),
    )

    @field_validator("service_clients", "login_throttle_storage_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("login_throttle_storage_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_redis_url(value)
        return value

    def check_stores(self, platform: PlatformSettings) -> None:
        if platform.is_production and self.login_throttle_storage_url is None:
            raise SettingsRefused(
                "the production profile needs AUTH_LOGIN_THROTTLE_STORAGE_URL=redis://...: "
                "failed log-ins counted in one auth process's memory are multiplied by the "
                "instances"
            )
        super().check_stores(platform)

    def service_secrets(self) -> dict[str, str]:
        """Service name -> its secret; ``{}`` when no table is given (no service tokens)."""
        if self.service_clients is None:
            return {}
        return parse_service_clients(self.service_clients.get_secret_value())

    def refresh_token_retention(self, platform: PlatformSettings) -> RetentionPolicy:
        """The retention job of expired refresh tokens (SHOP_RETENTION_* give its pace)."""
        return RetentionPolicy(
            # keep_s 0 would turn the job off: expired tokens go within a second instead.
            keep_s=max(self.refresh_token_retention_s, 1.0),
            interval_s=platform.retention_interval_s,
            batch=platform.retention_batch,
        )

    def resolved_keys_dir(self, platform: PlatformSettings) -> Path:
        return self.keys_dir or platform.data_dir / "auth" / "keys"

    def has_configured_key(self) -> bool:
        return self.signing_key is not None or self.signing_key_file is not None

    def check_secrets(self, platform: PlatformSettings) -> None:
        """Refuse, with a message an operator can act on, what auth must not run with."""
        password = self.admin_password.get_secret_value()
        if password and (problem := password_problem(password)):
            raise UnsafeSettings(f"AUTH_ADMIN_PASSWORD {problem}")
        if platform.is_production:
            if not self.has_configured_key():
                raise UnsafeSettings(
                    "the production profile needs a signing key: set AUTH_SIGNING_KEY (PEM) "
                    "or AUTH_SIGNING_KEY_FILE"
                )
            if password == DEV_ADMIN_PASSWORD:
                raise UnsafeSettings(
                    "the production profile refuses the default admin password: set "
                    "AUTH_ADMIN_PASSWORD to a strong secret, or to an empty value to create no "
                    "admin"
                )
        try:
            clients = self.service_secrets()
        except ValueError as exc:
            raise UnsafeSettings(str(exc)) from None
        if platform.is_production:
            if not clients:
                raise UnsafeSettings(
                    "the production profile needs AUTH_SERVICE_CLIENTS (JSON: each calling"
                    " service's name -> its own secret)"
                )
            weak = sorted(n for n, secret in clients.items() if len(secret) < MIN_SERVICE_SECRET)
            if weak:
                raise UnsafeSettings(
                    f"AUTH_SERVICE_CLIENTS: the secret of {', '.join(weak)} is shorter than"
                    f" {MIN_SERVICE_SECRET} characters"
                )
        super().check_secrets(platform)
