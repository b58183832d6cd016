"""What ``shop up`` reads from the environment, and the environment it gives its children."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["LauncherSettings", "child_environment"]


class LauncherSettings(BaseSettings):
    """The launcher's own knobs. Flags of ``shop up`` override them.

    The admin login is the auth service's setting (``AUTH_ADMIN_*``); it is read here
    only to be printed, since the launcher imports no service. The defaults are the
    embedded profile's dev account.
    """

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    registry_port: int = Field(default=8761, ge=0, le=65535, validation_alias="REGISTRY_PORT")
    gateway_port: int = Field(default=8765, ge=0, le=65535, validation_alias="GATEWAY_PORT")
    ready_timeout_s: float = Field(default=60.0, gt=0, validation_alias="SHOP_READY_TIMEOUT")
    stop_timeout_s: float = Field(default=10.0, gt=0, validation_alias="SHOP_STOP_TIMEOUT")
    admin_email: str = Field(default="admin@example.com", validation_alias="AUTH_ADMIN_EMAIL")
    admin_password: str = Field(default="admin-password", validation_alias="AUTH_ADMIN_PASSWORD")


def child_environment(base: Mapping[str, str], *, data_dir: Path, profile: str) -> dict[str, str]:
    """The launcher's environment plus what makes the children one deployment.

    ``SHOP_REGISTRY_URL`` and each service's port variable are added by the supervisor,
    once it knows the registry's real port.
    """
    env = dict(base)
    env["SHOP_PROFILE"] = profile
    # Absolute, so a service that changes directory still finds the same files.
    env["SHOP_DATA_DIR"] = str(data_dir.expanduser().resolve())
    env["PYTHONUNBUFFERED"] = "1"
    # Services prove who they are to each other with tokens auth issues against this
    # secret; one embedded run of `shop up` is one deployment, so a fresh one per run will
    # do. Production secrets come from the operator: the services refuse to start without.
    if profile == "embedded":
        env.setdefault("SHOP_SERVICE_SECRET", secrets.token_urlsafe(32))
    return env
