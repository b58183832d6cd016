"""What ``shop up`` reads from the environment, and the environment it gives its children."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import quote

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shop.launcher.zygote import MALLOC_TUNING
from shop.platform.settings import secret_table

__all__ = [
    "REGISTRY_CLIENTS",
    "REGISTRY_CLIENTS_FILE",
    "SERVICE_CLIENTS",
    "SERVICE_SECRET",
    "LauncherSettings",
    "child_environment",
    "registry_clients",
    "service_clients",
    "with_credentials",
]

REGISTRY_CLIENTS = "REGISTRY_CLIENTS"
REGISTRY_CLIENTS_FILE = "REGISTRY_CLIENTS_FILE"
# Auth's table of calling services and their secrets; each caller gets its own entry only.
SERVICE_CLIENTS = "AUTH_SERVICE_CLIENTS"
SERVICE_SECRET = "SHOP_SERVICE_SECRET"  # noqa: S105 - the variable's name, not a secret


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
    # Restarts of one crashed service within a minute before the launcher gives up; 0 is
    # fail-fast (the first crash stops everything).
    max_restarts: int = Field(default=5, ge=0, le=100, validation_alias="SHOP_MAX_RESTARTS")
    admin_email: str = Field(default="admin@example.com", validation_alias="AUTH_ADMIN_EMAIL")
    admin_password: str = Field(default="admin-password", validation_alias="AUTH_ADMIN_PASSWORD")


def child_environment(
    base: Mapping[str, str],
    *,
    data_dir: Path,
    profile: str,
    registrants: Iterable[str] = (),
    internal_callers: Iterable[str] = (),
) -> dict[str, str]:
    """The launcher's environment plus what makes the children one deployment.

    ``SHOP_REGISTRY_URL`` and each service's port variable are added by the supervisor,
    once it knows the registry's real port; it also hands ``REGISTRY_CLIENTS`` to the
    registry alone and each service only its own credential, and ``AUTH_SERVICE_CLIENTS``
    to auth alone and each internal caller (``internal_callers``) only its own secret.
    """
    env = dict(base)
    env["SHOP_PROFILE"] = profile
    # Absolute, so a service that changes directory still finds the same files.
    env["SHOP_DATA_DIR"] = str(data_dir.expanduser().resolve())
    env["PYTHONUNBUFFERED"] = "1"
    for name, value in MALLOC_TUNING.items():  # glibc's allocator: see there
        env.setdefault(name, value)
    # Services prove who they are to each other with tokens auth issues against each one's
    # own secret; one embedded run of `shop up` is one deployment, so fresh ones per run
    # will do. Production secrets come from the operator: the services refuse to start
    # without.
    if profile == "embedded":
        if not env.get(SERVICE_CLIENTS, "").strip():
            callers = sorted({name.lower() for name in internal_callers})
            if callers:
                env[SERVICE_CLIENTS] = json.dumps({n: secrets.token_urlsafe(32) for n in callers})
        # Likewise one registry credential per application (``registrants``) and per run,
        # unless the operator gave them.
        if not env.get(REGISTRY_CLIENTS, "").strip() and not env.get(REGISTRY_CLIENTS_FILE):
            names = sorted({name.lower() for name in registrants})
            if names:
                env[REGISTRY_CLIENTS] = json.dumps({n: secrets.token_urlsafe(32) for n in names})
    return env


def registry_clients(env: Mapping[str, str]) -> dict[str, str]:
    """``REGISTRY_CLIENTS`` and the file ``REGISTRY_CLIENTS_FILE`` names, as application name
    (lower-case) -> secret; ``{}`` when neither is set. ValueError never shows the value: it
    holds every service's secret. The registry validates them again (lengths, names)."""
    clients: dict[str, str] = {}
    sources = [(REGISTRY_CLIENTS, env.get(REGISTRY_CLIENTS, ""))]
    if path := env.get(REGISTRY_CLIENTS_FILE, "").strip():
        try:
            sources.append((REGISTRY_CLIENTS_FILE, Path(path).read_text()))
        except (OSError, UnicodeDecodeError):
            raise ValueError(f"{REGISTRY_CLIENTS_FILE}: cannot read {path}") from None
    for setting, text in sources:
        if not text.strip():
            continue
        parsed = secret_table(text, setting=setting)
        clients.update({name.lower(): secret for name, secret in parsed.items()})
    return clients


def service_clients(env: Mapping[str, str]) -> dict[str, str]:
    """``AUTH_SERVICE_CLIENTS`` as service name -> secret; ``{}`` when unset. ValueError
    never shows the value. Auth validates it again (names, lengths on production)."""
    text = env.get(SERVICE_CLIENTS, "")
    if not text.strip():
        return {}
    parsed = secret_table(text, setting=SERVICE_CLIENTS)
    return {name.lower(): secret for name, secret in parsed.items()}


def with_credentials(registry_url: str, *, app: str, secret: str) -> str:
    """``http://host:port/eureka`` with ``app:secret@`` in it, percent-encoded."""
    scheme, _, rest = registry_url.partition("://")
    return f"{scheme}://{quote(app, safe='')}:{quote(secret, safe='')}@{rest}"
