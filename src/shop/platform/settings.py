"""Settings shared by every process, and the base class each service extends with its own prefix.

Every refusal of a process lives here and in its own settings class: the fields' bounds and
validators (nonsense on any profile), and ``check_with`` (what the production profile, or
the process's own needs, forbid). ``load_settings`` builds both models and runs the checks
before anything is opened or bound, so a bad setting stops the process with one line.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Literal, Self, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "BUS_SCHEMES",
    "MIN_SERVICE_SECRET",
    "MONGO_SCHEMES",
    "SQL_SCHEMES",
    "PlatformSettings",
    "Profile",
    "ServiceSettings",
    "SettingsRefused",
    "check_url",
    "describe_invalid",
    "load_settings",
    "secret_table",
]

Profile = Literal["embedded", "production"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
MIN_SERVICE_SECRET = 32


class SettingsRefused(ValueError):
    """A setting the process will not run with; the message is one line an operator can act on."""


# URL scheme -> (the module its driver is, the extra that installs it).
SQL_SCHEMES: Mapping[str, tuple[str, str]] = {
    "sqlite": ("aiosqlite", "shop"),
    "sqlite+aiosqlite": ("aiosqlite", "shop"),
    "mysql": ("aiomysql", "shop[mysql]"),
    "mysql+aiomysql": ("aiomysql", "shop[mysql]"),
    "mariadb": ("aiomysql", "shop[mysql]"),
    "mariadb+aiomysql": ("aiomysql", "shop[mysql]"),
}
MONGO_SCHEMES: Mapping[str, tuple[str, str]] = {
    "mongodb": ("pymongo", "shop[mongo]"),
    "mongodb+srv": ("pymongo", "shop[mongo]"),
}
BUS_SCHEMES: Mapping[str, tuple[str, str]] = {
    "sqlite": ("aiosqlite", "shop"),
    "kafka": ("aiokafka", "shop[kafka]"),
}
_EMBEDDED_ONLY = frozenset({"sqlite", "sqlite+aiosqlite"})


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def check_url(
    url: str, *, setting: str, schemes: Mapping[str, tuple[str, str]], production: bool
) -> None:
    """Refuse a URL whose scheme Shop cannot use, whose driver is not installed, or that is
    embedded-only (SQLite) on the production profile."""
    scheme = _scheme(url)
    if scheme not in schemes:
        known = ", ".join(f"{s}://" for s in schemes if "+" not in s)
        named = f"names {scheme!r}" if scheme else "is not a URL"
        raise SettingsRefused(f"{setting} {named}, which Shop cannot use (use {known})")
    module, extra = schemes[scheme]
    if importlib.util.find_spec(module) is None:
        raise SettingsRefused(
            f"{setting} needs the {module} driver, which is not installed: pip install '{extra}'"
        )
    if production and scheme in _EMBEDDED_ONLY:
        raise SettingsRefused(
            f"{setting} points at SQLite, which the production profile refuses (one machine only)"
        )


class PlatformSettings(BaseSettings):
    """What every process of one Shop deployment agrees on (env prefix ``SHOP_``)."""

    model_config = SettingsConfigDict(env_prefix="SHOP_", extra="ignore")

    profile: Profile = "embedded"
    data_dir: Path = Path(".data")
    # One URL, or several separated by commas: clients use whichever answers.
    registry_url: str = Field(default="http://127.0.0.1:8761/eureka", min_length=1)
    # Where events travel: unset = the embedded SQLite event log under the data dir.
    event_bus_url: str | None = None
    # A failing event handler is retried with back-off, then its event is dead-lettered.
    event_max_attempts: int = Field(default=40, ge=1, le=10_000)
    event_retry_backoff_s: float = Field(default=0.2, gt=0, le=3600)
    event_retry_backoff_max_s: float = Field(default=30.0, gt=0, le=3600)
    event_handler_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    # Kafka (SHOP_EVENT_BUS_URL=kafka://host:9092[,host2:9092]): passed through to the client.
    kafka_partitions: int = Field(default=6, ge=1, le=10_000)
    kafka_replication_factor: int = Field(default=1, ge=1, le=32)
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    # HTTPS: a process with a certificate and key serves TLS and registers its secure port;
    # the CA file is what it trusts when calling others over https (default: the system's).
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    tls_cafile: Path | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    # Off by default: some Kafka-protocol brokers refuse it; ordering holds without it.
    kafka_idempotent_producer: bool = False
    # How this process is reached by others; 127.0.0.1 suits a laptop, a pod sets its own IP.
    advertise_host: str = Field(default="127.0.0.1", min_length=1)
    # A heartbeat of 0 once made 17,799 registry calls in 10 s: a tenth of a second at least.
    heartbeat_interval_s: float = Field(default=30.0, ge=0.1, le=3600)
    lease_duration_s: int = Field(default=90, ge=1, le=3600)
    registry_cache_ttl_s: float = Field(default=5.0, ge=0, le=3600)
    # How long an instance that refused a connection or timed out is passed over, unless it
    # proves alive sooner (docs/registry.md "Discovery that heals").
    pass_over_s: float = Field(default=5.0, gt=0, le=3600)
    # This service's own secret, which auth knows under its name (AUTH_SERVICE_CLIENTS), to
    # obtain its service tokens (SPEC §4 internal calls). Only services that make internal
    # calls have one: `shop up` makes one per service per run; production sets it from a
    # secret store.
    service_secret: SecretStr | None = None
    # Where verifiers get the signing keys and callers their service tokens: pinned here,
    # never looked up in the registry (anyone able to register could answer otherwise).
    jwks_url: str | None = None
    auth_url: str | None = None
    # The production profile wants https for both, unless the network between is private.
    jwks_allow_http: bool = False
    auth_issuer: str = Field(default="shop-auth", min_length=1)
    auth_audience: str = Field(default="shop", min_length=1)
    # Service tokens name this audience, so no user token passes for one and vice versa.
    internal_audience: str = Field(default="shop-internal", min_length=1)
    log_level: LogLevel = "INFO"
    # Log lines as text (unset) or JSON, for a log shipper (shop.platform.logs.log_format
    # reads the same variable, SHOP_LOG_FORMAT).
    log_format: Literal["text", "json"] | None = None
    # One access line per request (method, route template, status, duration, ids), at INFO.
    access_log: bool = True
    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=1 << 30)
    # Retention (docs/platform.md "Retention"): how long each kind of row is kept (0: for
    # ever), how often the jobs look, and the most rows one step deletes.
    retention_interval_s: float = Field(default=300.0, ge=1, le=86_400)
    retention_batch: int = Field(default=200, ge=1, le=100_000)
    # The embedded event log's events, once every group of their topic has passed them.
    event_retention_s: float = Field(default=7 * 86_400.0, ge=0, le=10 * 365 * 86_400)
    # Outbox rows, once published.
    outbox_retention_s: float = Field(default=7 * 86_400.0, ge=0, le=10 * 365 * 86_400)
    # Inbox rows: at least the redelivery horizon (an event still in the log may come again).
    inbox_retention_s: float = Field(default=14 * 86_400.0, ge=0, le=10 * 365 * 86_400)
    # Answered Idempotency-Keys (the order service): how long a repeat is still replayed.
    idempotency_retention_s: float = Field(default=86_400.0, ge=0, le=10 * 365 * 86_400)

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_any_case(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _format_in_any_case(cls, value: object) -> object:
        if isinstance(value, str):
            return value.strip().lower() or None
        return value

    @field_validator("event_bus_url", "service_secret", "jwks_url", "auth_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.heartbeat_interval_s >= self.lease_duration_s:
            raise ValueError(
                "SHOP_HEARTBEAT_INTERVAL_S must be shorter than SHOP_LEASE_DURATION_S, or every"
                " lease runs out between two heartbeats"
            )
        if problem := self._retention_problem():
            raise ValueError(problem)
        if self.event_retry_backoff_max_s < self.event_retry_backoff_s:
            raise ValueError(
                "SHOP_EVENT_RETRY_BACKOFF_MAX_S must be at least SHOP_EVENT_RETRY_BACKOFF_S"
            )
        if problem := self._kafka_security_problem() or self._tls_problem():
            raise ValueError(problem)
        for url in self.registry_urls:
            if _scheme(url) not in {"http", "https"}:
                raise ValueError(f"SHOP_REGISTRY_URL: {_redacted(url)!r} is not an http(s) URL")
        if self.auth_audience == self.internal_audience:
            raise ValueError(
                "SHOP_INTERNAL_AUDIENCE must differ from SHOP_AUTH_AUDIENCE, or a service token"
                " would pass for a user's"
            )
        for setting, pinned in (("SHOP_JWKS_URL", self.jwks_url), ("SHOP_AUTH_URL", self.auth_url)):
            if pinned is not None and not _is_http_url(pinned):
                raise ValueError(f"{setting}: {_redacted(pinned)!r} is not an http(s) URL")
        return self

    def pinned_auth_problem(self, *, setting: str, url: str | None) -> str | None:
        """Why ``url`` (SHOP_JWKS_URL or SHOP_AUTH_URL) is not a source the production
        profile trusts: missing, or plain http to a host that is not this machine without
        SHOP_JWKS_ALLOW_HTTP=true."""
        if url is None:
            return f"the production profile needs {setting} (auth's own address, not the registry)"
        parts = urlsplit(url)
        loopback = (parts.hostname or "") in _LOOPBACK_HOSTS
        if parts.scheme.lower() == "http" and not loopback and not self.jwks_allow_http:
            return (
                f"{setting} must be https on the production profile (or set"
                " SHOP_JWKS_ALLOW_HTTP=true on a private network)"
            )
        return None

    def _retention_problem(self) -> str | None:
        """An inbox that forgets an event the log may still deliver again would let it be
        applied twice."""
        if self.inbox_retention_s == 0:
            return None
        if self.event_retention_s == 0 or self.inbox_retention_s < self.event_retention_s:
            return (
                "SHOP_INBOX_RETENTION_S must be 0 (keep for ever) or at least"
                " SHOP_EVENT_RETENTION_S (when SHOP_EVENT_RETENTION_S is 0, 0 too): an inbox"
                " that forgets an event the log can still redeliver applies it twice"
            )
        return None

    def _tls_problem(self) -> str | None:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            return "SHOP_TLS_CERTFILE and SHOP_TLS_KEYFILE go together"
        for name, path in (
            ("SHOP_TLS_CERTFILE", self.tls_certfile),
            ("SHOP_TLS_KEYFILE", self.tls_keyfile),
            ("SHOP_TLS_CAFILE", self.tls_cafile),
        ):
            if path is not None and not path.is_file():
                return f"{name}: {str(path)[:100]!r} is not a readable file"
        return None

    @property
    def serves_tls(self) -> bool:
        return self.tls_certfile is not None

    def _kafka_security_problem(self) -> str | None:
        """Credentials or certificates the chosen protocol would silently ignore, or a
        protocol without what it needs: refused rather than left unused."""
        protocol = self.kafka_security_protocol
        files = (self.kafka_ssl_cafile, self.kafka_ssl_certfile, self.kafka_ssl_keyfile)
        if protocol in ("SSL", "SASL_SSL"):
            if self.kafka_ssl_keyfile and not self.kafka_ssl_certfile:
                return "SHOP_KAFKA_SSL_KEYFILE needs SHOP_KAFKA_SSL_CERTFILE"
        elif any(files):
            return f"SHOP_KAFKA_SSL_* files are set but the protocol is {protocol}"
        sasl = (self.kafka_sasl_mechanism, self.kafka_sasl_username, self.kafka_sasl_password)
        if protocol.startswith("SASL_"):
            if not all(sasl):
                return (
                    f"{protocol} needs SHOP_KAFKA_SASL_MECHANISM, SHOP_KAFKA_SASL_USERNAME"
                    " and SHOP_KAFKA_SASL_PASSWORD"
                )
        elif any(sasl):
            return f"SHOP_KAFKA_SASL_* are set but the protocol is {protocol}"
        return None

    @property
    def is_production(self) -> bool:
        return self.profile == "production"

    @property
    def registry_urls(self) -> list[str]:
        return [u.strip() for u in self.registry_url.split(",") if u.strip()]

    @property
    def resolved_event_bus_url(self) -> str:
        return self.event_bus_url or f"sqlite:///{(self.data_dir / 'events.db').resolve()}"


class ServiceSettings(BaseSettings):
    """Base for one service's own settings. Subclasses set ``env_prefix`` (``AUTH_``, ...)
    and say what the process uses, so ``check_with`` can demand it."""

    model_config = SettingsConfigDict(extra="ignore")

    # What the process uses: facts about the code, not settings.
    uses_database: ClassVar[bool] = True
    database_schemes: ClassVar[Mapping[str, tuple[str, str]]] = SQL_SCHEMES
    uses_event_bus: ClassVar[bool] = False
    uses_service_secret: ClassVar[bool] = False
    # Checks access tokens against the JWKS (every process but the registry and auth).
    verifies_tokens: ClassVar[bool] = True
    # Registers with the discovery server (every process but the registry itself).
    registers: ClassVar[bool] = True

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=0, ge=0, le=65535)
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; the embedded profile uses a SQLite file under the data dir.",
    )

    @field_validator("database_url", mode="before")
    @classmethod
    def _empty_url_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @classmethod
    def env_name(cls, field: str) -> str:
        return f"{cls.model_config.get('env_prefix', '')}{field}".upper()

    def check_with(self, platform: PlatformSettings) -> None:
        """Raise SettingsRefused for what this process must not run with."""
        self.check_stores(platform)
        self.check_secrets(platform)

    def check_stores(self, platform: PlatformSettings) -> None:
        """Its database and event bus: a scheme Shop can use, a driver that is installed, and
        on the production profile given and not embedded-only."""
        production = platform.is_production
        if self.uses_database:
            setting = self.env_name("database_url")
            if self.database_url is None:
                if production:
                    raise SettingsRefused(f"the production profile needs {setting}")
            else:
                check_url(
                    self.database_url,
                    setting=setting,
                    schemes=self.database_schemes,
                    production=production,
                )
        if self.uses_event_bus:
            if platform.event_bus_url is None:
                if production:
                    raise SettingsRefused(
                        "the production profile needs SHOP_EVENT_BUS_URL (kafka://host:9092)"
                    )
            else:
                check_url(
                    platform.event_bus_url,
                    setting="SHOP_EVENT_BUS_URL",
                    schemes=BUS_SCHEMES,
                    production=production,
                )

    def check_secrets(self, platform: PlatformSettings) -> None:
        """The secrets it uses: present and strong on the production profile. Subclasses
        extend it with their own."""
        if self.uses_service_secret and platform.is_production:
            secret = platform.service_secret.get_secret_value() if platform.service_secret else ""
            if len(secret) < MIN_SERVICE_SECRET:
                raise SettingsRefused(
                    f"the production profile needs SHOP_SERVICE_SECRET of at least"
                    f" {MIN_SERVICE_SECRET} characters (this service's own, for internal calls)"
                )
            if problem := platform.pinned_auth_problem(
                setting="SHOP_AUTH_URL", url=platform.auth_url
            ):
                raise SettingsRefused(problem)
        if self.verifies_tokens and platform.is_production:
            if problem := platform.pinned_auth_problem(
                setting="SHOP_JWKS_URL", url=platform.jwks_url
            ):
                raise SettingsRefused(problem)
        if self.registers and platform.is_production:
            for url in platform.registry_urls:
                if not _has_credentials(url):
                    raise SettingsRefused(
                        "the production profile needs this service's registry credentials in"
                        " SHOP_REGISTRY_URL (http://<app-name>:<secret>@host:8761/eureka; got"
                        f" {_redacted(url)!r})"
                    )

    def resolved_database_url(self, *, platform: PlatformSettings, service: str) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{platform.data_dir.resolve() / f'{service}.db'}"


S = TypeVar("S", bound=ServiceSettings)


_SECRET_FIELD = re.compile(r"secret|password|key", re.IGNORECASE)
_CREDENTIALS = re.compile(r"//[^/@\s]*@")


_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in {"http", "https"} and bool(parts.hostname)


def _has_credentials(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return bool(parts.username and parts.password)


def _redacted(value: str) -> str:
    return _CREDENTIALS.sub("//***@", value)[:100]


def describe_invalid(exc: ValidationError, model: type[BaseSettings]) -> str:
    """The first thing wrong, in one line naming the environment variable."""
    error = exc.errors()[0]
    message = str(error["msg"]).removeprefix("Value error, ")
    field = ".".join(str(part) for part in error["loc"])
    if not field:
        return message  # a model validator: its message names the settings
    prefix = model.model_config.get("env_prefix", "")
    value = error.get("input")
    shown = ""
    if isinstance(value, str | int | float) and not _SECRET_FIELD.search(field):
        # A URL may carry a password: what an operator needs to see is the rest of it.
        shown = f" (got {_redacted(str(value))!r})"
    return f"{prefix}{field}".upper() + f": {message}{shown}"


def secret_table(text: str, *, setting: str) -> dict[str, str]:
    """A table of name -> secret given as a JSON object (``AUTH_SERVICE_CLIENTS``,
    ``REGISTRY_CLIENTS``): each value a non-empty string. The message of the ValueError
    names the setting and never shows the text, which holds every secret."""
    try:
        parsed = json.loads(text)
    except ValueError:
        raise ValueError(f"{setting} is not JSON: give a JSON object of name to secret") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{setting} must be a JSON object of name to secret")
    for name, secret in parsed.items():
        if not isinstance(secret, str) or not secret.strip():
            raise ValueError(f"{setting}: the secret of {name[:64]!r} must be a non-empty string")
    return dict(parsed)


def load_settings(model: type[S]) -> tuple[PlatformSettings, S]:
    """The process's settings from the environment, every refusal checked; raises
    SettingsRefused with one line."""
    try:
        platform = PlatformSettings()
    except ValidationError as exc:
        raise SettingsRefused(describe_invalid(exc, PlatformSettings)) from None
    try:
        settings = model()
    except ValidationError as exc:
        raise SettingsRefused(describe_invalid(exc, model)) from None
    settings.check_with(platform)
    return platform, settings
