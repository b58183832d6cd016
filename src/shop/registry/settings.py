"""Settings of the discovery server (env prefix ``REGISTRY_``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Final

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from shop.platform.settings import PlatformSettings, ServiceSettings, check_url
from shop.registry.domain import MAX_LEASE_DURATION_S

__all__ = ["DEFAULT_ETCD_PREFIX", "EtcdTarget", "RegistrySettings", "parse_etcd_url"]

DEFAULT_ETCD_PREFIX: Final = "/shop/registry"
_ETCD_PORT: Final = 2379
_HOST = re.compile(r"[A-Za-z0-9.\-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")
_PREFIX = re.compile(r"(/[A-Za-z0-9_.\-]+)+")
_ETCD_URL_FORM = "etcd://host:2379[,host2:2379][/prefix]"
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


class RegistrySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="REGISTRY_", extra="ignore")

    uses_database: ClassVar[bool] = False

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
