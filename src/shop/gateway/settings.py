"""The gateway's own settings (env prefix ``GATEWAY_``)."""

from __future__ import annotations

import re
from typing import ClassVar
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from shop.gateway.domain import Access, RouteTimeouts, public_route_table
from shop.gateway.ratelimit import parse_limits, shared_storage
from shop.platform.addresses import AddressEntries
from shop.platform.serve import ServerLimits
from shop.platform.settings import PlatformSettings, ServiceSettings, SettingsRefused

__all__ = ["GatewaySettings"]

_USERINFO = re.compile(r"://[^/@]*@")
TRACE_ID = "{traceId}"


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")
    uses_database: ClassVar[bool] = False

    port: int = 8765
    # Per route family (docs/gateway.md "Fast, honest failure"): the longest wait for a
    # service's next bytes, then 504. Reads are short; an order placement waits for the
    # order service's own calls (inventory 2 s, catalogue 2 s) to give their honest answer.
    upstream_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=600,
        description="Reads (GET, HEAD): longest wait for a service's next bytes (504 after).",
    )
    write_timeout_s: float = Field(
        default=10.0, gt=0, le=600, description="Other methods (log-in, admin writes...)."
    )
    order_timeout_s: float = Field(
        default=8.0,
        gt=0,
        le=600,
        description="POST /api/order[/...] (placement, cancel): more than the order service's "
        "inventory plus catalogue timeouts.",
    )
    route_timeouts: dict[str, float] = Field(
        default={},
        description='Per route, over the family\'s: JSON {"POST /api/order": 12, ...} naming a '
        "routed method and route path.",
    )
    breaker_failure_threshold: int = Field(
        default=3,
        ge=1,
        le=1000,
        description="Consecutive timeouts (or answers broken off) of a service that open its "
        "circuit in the gateway.",
    )
    breaker_open_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="How long an open circuit answers 503 at once before one probe.",
    )
    registry_dashboard_url: str | None = Field(
        default=None,
        description="Origin serving /eureka/web; derived from SHOP_REGISTRY_URL when unset.",
    )
    openapi_cache_ttl_s: float = Field(default=30.0, ge=0)
    jwks_min_refetch_s: float = Field(
        default=10.0, ge=0, description="An unknown key id refetches the JWKS at most this often."
    )

    trusted_proxies: AddressEntries = Field(
        default=[],
        description=(
            "Peers (load balancers, the storefront) whose X-Forwarded-* are kept and appended "
            "to, as addresses or networks (CIDR: 10.42.0.0/16); from any other peer they are "
            "replaced by what the gateway saw."
        ),
    )

    # Generous: the e2e suite (20 concurrent orders of one user, bursts of registrations,
    # all from 127.0.0.1) and a person clicking through `make up` never meet them.
    rate_limit_per_client: str = Field(
        default="200/second",
        description="Requests per client address, limits syntax ('50/second;1000/minute').",
    )
    rate_limit_per_user: str = Field(
        default="100/second",
        description="Requests per user (token subject) on routes that need a token.",
    )
    rate_limit_storage_url: str = Field(
        default="memory://",
        description="memory:// (this process) or redis://host:6379/0 (shared by every gateway).",
    )
    rate_limit_key_prefix: str = Field(default="shop-gateway", min_length=1)

    max_header_bytes: int = Field(
        default=16_384,
        ge=1024,
        le=1 << 20,
        description="Request line plus headers; larger is refused with 431.",
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, le=600, description="Time to receive a request's line and headers."
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, le=3600, description="Time to receive a whole request (408 after)."
    )

    public_operations: bool = Field(
        default=False,
        description=(
            "Serve /metrics and the readiness checks' detail on the public port; off, "
            "/metrics is 404 and /health/ready answers only its status."
        ),
    )

    trace_url_template: str | None = Field(
        default=None,
        description=(
            "Where the console links each recent order's trace: an http(s) URL with "
            "{traceId}, e.g. http://127.0.0.1:9411/zipkin/traces/{traceId}; unset, the "
            "trace id is shown as text."
        ),
    )

    @field_validator("trace_url_template")
    @classmethod
    def _trace_link(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        try:
            parts = urlsplit(value.replace(TRACE_ID, "0"))
            linkable = parts.scheme in {"http", "https"} and bool(parts.hostname)
        except ValueError:  # e.g. an unclosed [ in the host
            linkable = False
        if (
            not linkable
            or TRACE_ID not in value
            or any(c.isspace() or not c.isprintable() for c in value)
        ):
            raise ValueError(
                f"give an http(s) URL containing {TRACE_ID}, e.g. "
                f"http://127.0.0.1:9411/zipkin/traces/{TRACE_ID}"
            )
        return value

    def trace_url(self, trace_id: str) -> str | None:
        """The link to a trace in the configured trace UI; None without one."""
        if self.trace_url_template is None:
            return None
        return self.trace_url_template.replace(TRACE_ID, trace_id)

    @field_validator("rate_limit_per_client", "rate_limit_per_user")
    @classmethod
    def _limits_parse(cls, value: str) -> str:
        parse_limits(value)
        return value

    @field_validator("route_timeouts")
    @classmethod
    def _routed_and_bounded(cls, value: dict[str, float]) -> dict[str, float]:
        routes = public_route_table(dashboard_access=Access.PUBLIC)
        for key, seconds in value.items():
            RouteTimeouts.check_key(routes, key)
            if not 0 < seconds <= 600:
                raise ValueError(f"{key!r}: a timeout is more than 0 and at most 600 seconds")
        return value

    def timeouts(self) -> RouteTimeouts:
        """The timeout of every routed method and route, overrides applied."""
        return RouteTimeouts(
            public_route_table(dashboard_access=Access.PUBLIC),
            read_s=self.upstream_timeout_s,
            write_s=self.write_timeout_s,
            order_s=self.order_timeout_s,
            overrides=self.route_timeouts,
        )

    @field_validator("rate_limit_storage_url")
    @classmethod
    def _known_storage(cls, value: str) -> str:
        if value != "memory://" and not shared_storage(value):
            raise ValueError("use memory:// or redis://host:port/db")
        return value

    def check_stores(self, platform: PlatformSettings) -> None:
        if platform.is_production and not shared_storage(self.rate_limit_storage_url):
            raise SettingsRefused(
                "the production profile needs GATEWAY_RATE_LIMIT_STORAGE_URL=redis://...: "
                "limits counted in one gateway's memory are multiplied by the instances"
            )
        super().check_stores(platform)

    def server_limits(self) -> ServerLimits:
        return ServerLimits(
            header_timeout_s=self.header_timeout_s, max_header_bytes=self.max_header_bytes
        )

    def dashboard_url(self, platform: PlatformSettings) -> str:
        if self.registry_dashboard_url:
            return self.registry_dashboard_url.rstrip("/")
        # Any registry serves the dashboard; the first one listed is the one operators expect.
        # Without the credential a URL may carry: the dashboard is open, and URLs get logged.
        base = _USERINFO.sub("://", platform.registry_urls[0]).rstrip("/")
        return base.removesuffix("/eureka")
