"""Settings of the discovery server (env prefix ``REGISTRY_``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Final, Self

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from shop.platform.settings import (
    MIN_SERVICE_SECRET,
    PlatformSettings,
    ServiceSettings,
    SettingsRefused,
    check_url,
    secret_table,
)
from shop.registry.domain import MAX_LEASE_DURATION_S

__all__ = ["DEFAULT_ETCD_PREFIX", "EtcdTarget", "RegistrySettings", "parse_etcd_url"]

DEFAULT_ETCD_PREFIX: Final = "/shop/registry"
_ETCD_PORT: Final = 2379
_HOST = re.compile(r"[A-Za-z0-9.\-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")
_PREFIX = re.compile(r"(/[A-Za-z0-9_.\-]+)+")
_ETCD_URL_FORM = "etcd://host:2379[,host2:2379][/prefix]"
_APP_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,255}")
_CLIENTS_FORM = 'a JSON object of application name to its secret, {"order-service": "..."}'
# Store URL scheme -> (the module its client is, the extra that installs it).
_STORE_SCHEMES: Final[Mapping[str, tuple[str, str]]] = {"etcd": ("aetcd", "shop[etcd]")}


@dataclass(frozen=True, slots=True)
class EtcdTarget:
    """Where the etcd lease store is: members to try in order, and the key prefix to use."""

    endpoints: tuple[tuple[str, int], ...]
    prefix: str


def _endpoint(text: str) -> tuple[str, int]:
    host, port = text, str(_ETCD_PORT)
    if text.startswith("["):
        host, bracket, rest = text.partition("]")
        if not bracket:
            raise ValueError(f"{text[:60]!r} is not a host name or address")
        host += "]"
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r} is not host:port")
            port = rest[1:]
    elif ":" in text:
        host, _, port = text.rpartition(":")
    if not _HOST.fullmatch(host):
        raise ValueError(f"{host[:60]!r} is not a host name or address")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{port[:10]!r} is not a port (1-65535)")
    return host.strip("[]"), int(port)


def parse_etcd_url(url: str) -> EtcdTarget:
    """``etcd://h1:2379,h2:2379/prefix``; ValueError names what is wrong, never a credential."""
    scheme, separator, rest = url.strip().partition("://")
    if scheme.lower() != "etcd" or not separator:
        raise ValueError(f"must be {_ETCD_URL_FORM}, or empty for the in-memory store")
    if "?" in rest or "#" in rest:
        raise ValueError(f"takes no query or fragment: {_ETCD_URL_FORM}")
    hosts, _, path = rest.partition("/")
    if "@" in hosts:
        raise ValueError("carries no credentials: the etcd client speaks plain gRPC (no auth)")
    endpoints = tuple(_endpoint(part.strip()) for part in hosts.split(","))
    prefix = "/" + path.strip("/") if path.strip("/") else DEFAULT_ETCD_PREFIX
    if not _PREFIX.fullmatch(prefix):
        raise ValueError("the prefix may hold only letters, digits, '_', '.', '-' and '/'")
    return EtcdTarget(endpoints=endpoints, prefix=prefix)


def _parse_clients(text: str, *, setting: str) -> dict[str, str]:
    """Application name (upper-case) -> secret. Messages never echo the text: it holds secrets."""
    clients: dict[str, str] = {}
    for name, secret in secret_table(text, setting=setting).items():
        if not _APP_NAME.fullmatch(name):
            raise ValueError(
                f"{setting}: application names are 1 to 255 letters, digits, '_', '.' or '-'"
            )
        if name.upper() in clients:
            raise ValueError(f"{setting} names {name.upper()} twice")
        clients[name.upper()] = secret
    return clients


class RegistrySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="REGISTRY_", extra="ignore")

    uses_database: ClassVar[bool] = False
    # It is what the others register with.
    registers: ClassVar[bool] = False
    # Its credentials are its own (REGISTRY_CLIENTS): it checks no access tokens.
    verifies_tokens: ClassVar[bool] = False

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
    metrics_interval_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="How often shop_registry_instances on /metrics follows the leases.",
    )
    store_url: str = Field(
        default="",
        description=(
            f"Where leases live: empty = in this process's memory (one node); {_ETCD_URL_FORM}"
            " = etcd, shared by every registry node given the same URL."
        ),
    )
    store_timeout_s: float = Field(
        default=2.0, gt=0, le=60, description="Longest wait for one etcd call (503 after)."
    )
    clients: SecretStr = Field(
        default=SecretStr(""),
        description=f"Who may register what: {_CLIENTS_FORM}. Empty: writes are open.",
    )
    clients_file: Path | None = Field(
        default=None, description="A file holding the same JSON, added to REGISTRY_CLIENTS."
    )
    # Sized for every instance of a deployment heartbeating from one address (the launcher
    # runs them all on 127.0.0.1): 1,000 instances renewing every 30 s are 33 writes a second.
    write_rate_per_s: float = Field(
        default=50.0, gt=0, le=1_000_000, description="Writes a second per client address."
    )
    write_burst: int = Field(
        default=200, ge=1, le=1_000_000, description="Writes at once per client address."
    )
    max_instances: int = Field(
        default=5000, ge=1, le=1_000_000, description="Instances the registry holds in all."
    )
    max_instances_per_app: int = Field(
        default=500, ge=1, le=1_000_000, description="Instances of one application."
    )

    _client_secrets: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _read_clients(self) -> Self:
        # A model validator, not a field one: its errors are shown without the input.
        secrets = self.clients.get_secret_value().strip()
        clients = _parse_clients(secrets, setting="REGISTRY_CLIENTS") if secrets else {}
        if self.clients_file is not None:
            try:
                text = self.clients_file.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
                raise ValueError(f"REGISTRY_CLIENTS_FILE: cannot read it ({reason})") from None
            from_file = _parse_clients(text, setting="REGISTRY_CLIENTS_FILE")
            if both := sorted(clients.keys() & from_file.keys()):
                raise ValueError(
                    f"REGISTRY_CLIENTS and REGISTRY_CLIENTS_FILE both name {', '.join(both)}"
                )
            clients.update(from_file)
        self._client_secrets = clients
        return self

    @property
    def client_secrets(self) -> dict[str, str]:
        """Application name (upper-case) -> the secret it registers with."""
        return dict(self._client_secrets)

    @field_validator("store_url")
    @classmethod
    def _a_store_we_have(cls, value: str) -> str:
        value = value.strip()
        if value:
            parse_etcd_url(value)
        return value

    @property
    def store_scheme(self) -> str:
        return self.store_url.partition("://")[0].lower()

    @property
    def etcd(self) -> EtcdTarget:
        return parse_etcd_url(self.store_url)

    def check_stores(self, platform: PlatformSettings) -> None:
        super().check_stores(platform)
        if self.store_url:
            check_url(
                self.store_url,
                setting=self.env_name("store_url"),
                schemes=_STORE_SCHEMES,
                production=platform.is_production,
            )

    def check_secrets(self, platform: PlatformSettings) -> None:
        super().check_secrets(platform)
        if not platform.is_production:
            return
        if not self._client_secrets:
            raise SettingsRefused(
                "the production profile needs REGISTRY_CLIENTS (or REGISTRY_CLIENTS_FILE):"
                f" {_CLIENTS_FORM}; without it anyone could register any service"
            )
        for name, secret in self._client_secrets.items():
            if len(secret) < MIN_SERVICE_SECRET:
                raise SettingsRefused(
                    f"REGISTRY_CLIENTS: the secret of {name} is shorter than"
                    f" {MIN_SERVICE_SECRET} characters, which the production profile refuses"
                )
