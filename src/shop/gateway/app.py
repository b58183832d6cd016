"""Wiring: the only place that picks the gateway's implementations from settings."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from shop.gateway.api import OPS_PATHS, GatewayRuntime, Proxy, ReadinessCheck, ops_routes
from shop.gateway.console import console_routes, serves
from shop.gateway.domain import DASHBOARD, Access, public_route_table
from shop.gateway.fastlane import GatewayProtocol
from shop.gateway.ratelimit import RateLimits, parse_limits
from shop.gateway.service import ApiCatalogue, Upstreams
from shop.gateway.settings import GatewaySettings
from shop.platform.addresses import TrustedAddresses
from shop.platform.discovery import Heartbeat, Registration, RegistryClient
from shop.platform.http import http_session
from shop.platform.middleware import (
    BodyLimitMiddleware,
    BodyTimeoutMiddleware,
    HttpMetrics,
    MetricsMiddleware,
    RequestContextMiddleware,
)
from shop.platform.problems import problem_response
from shop.platform.security import pinned_jwks
from shop.platform.settings import PlatformSettings
from shop.platform.tokens import JwksVerifier
from shop.platform.upstream import UpstreamPool

__all__ = ["NAME", "GatewayApp", "build_app"]

NAME = "api-gateway"


class GatewayApp(Starlette):
    """Starlette for the gateway's own endpoints and the lifespan; every other request goes
    straight to the proxy, past Starlette's routing and middleware stack (see docs/gateway.md,
    Performance). Served with ``GatewayProtocol``, whose fast lane proxies the common
    request without calling the app at all (gateway/fastlane.py). The operations console and
    the docs' assets (gateway/console.py) are the gateway's own too."""

    http_protocol = GatewayProtocol

    def __init__(self, *, proxy: Proxy, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.proxy = proxy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPS_PATHS and not serves(scope["path"]):
            scope["app"] = self
            await self.proxy(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)  # noqa: S101 - registered for HTTPException only
    return problem_response(exc.status_code, instance=request.url.path, headers=exc.headers)


def _registry_reachable(registry: RegistryClient) -> ReadinessCheck:
    async def check() -> None:
        await registry.fetch(NAME)

    return check


def build_app(*, platform: PlatformSettings, settings: GatewaySettings) -> Starlette:
    """The gateway. Whoever serves it sets ``app.state.bound_port`` first to have it registered."""
    # The dashboard lists every instance's address: a map of the inside, for admins only
    # once the deployment is real; on a laptop it stays as open as Eureka's.
    dashboard_access = Access.ADMIN if platform.is_production else Access.PUBLIC
    routes = public_route_table(dashboard_access=dashboard_access)
    instruments = HttpMetrics(NAME)
    proxy = Proxy(
        routes=routes,
        metrics=instruments,
        max_body_bytes=platform.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
        trusted_proxies=TrustedAddresses(settings.trusted_proxies),
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # decompress=False: bodies pass through byte for byte, Content-Encoding and all.
        ssl_context = (
            ssl.create_default_context(cafile=platform.tls_cafile) if platform.tls_cafile else None
        )
        pool = UpstreamPool(ssl_context=ssl_context)
        async with http_session(decompress=False, ca_file=platform.tls_cafile) as http:
            registry = RegistryClient(
                base_url=platform.registry_url,
                session=http,
                cache_ttl_s=platform.registry_cache_ttl_s,
                pass_over_s=platform.pass_over_s,
            )
            upstreams = Upstreams(
                registry=registry,
                fixed={DASHBOARD: settings.dashboard_url(platform)},
                cache_ttl_s=platform.registry_cache_ttl_s,
                pass_over_s=platform.pass_over_s,
            )
            runtime = GatewayRuntime(
                platform=platform,
                settings=settings,
                http=http,
                pool=pool,
                registry=registry,
                upstreams=upstreams,
                verifier=JwksVerifier(
                    # Users' tokens only: service tokens have no business at the edge.
                    fetch_jwks=pinned_jwks(platform, http),
                    issuer=platform.auth_issuer,
                    audience=platform.auth_audience,
                    min_refetch_interval_s=settings.jwks_min_refetch_s,
                ),
                catalogue=ApiCatalogue(
                    upstreams=upstreams,
                    session=http,
                    routes=routes,
                    ttl_s=settings.openapi_cache_ttl_s,
                ),
                limits=RateLimits(
                    storage_url=settings.rate_limit_storage_url,
                    per_client=parse_limits(settings.rate_limit_per_client),
                    per_user=parse_limits(settings.rate_limit_per_user),
                    key_prefix=settings.rate_limit_key_prefix,
                ),
            )
            runtime.readiness["registry"] = _registry_reachable(registry)
            app.state.gateway = runtime
            proxy.runtime = runtime
            port: int | None = getattr(app.state, "bound_port", None)
            if port:
                runtime.heartbeat = Heartbeat(
                    registry,
                    Registration(
                        app=NAME,
                        host=platform.advertise_host,
                        port=port,
                        secure=platform.serves_tls,
                        lease_duration_s=platform.lease_duration_s,
                        renewal_interval_s=platform.heartbeat_interval_s,
                    ),
                )
                runtime.readiness["registration"] = runtime.heartbeat.check_registered
                runtime.heartbeat.start()
            try:
                yield
            finally:
                if runtime.heartbeat is not None:
                    await runtime.heartbeat.stop()
                await registry.close()
                await runtime.limits.close()
                pool.close()

    app = GatewayApp(
        proxy=proxy,
        # The console's routes first: its /docs (assets served here) is the one answered.
        routes=[*console_routes(), *ops_routes()],
        # First listed = outermost: request identity wraps even the 413 and the metrics.
        middleware=[
            Middleware(RequestContextMiddleware),
            Middleware(BodyTimeoutMiddleware, timeout_s=settings.body_timeout_s),
            Middleware(BodyLimitMiddleware, max_bytes=platform.max_body_bytes),
            Middleware(MetricsMiddleware, metrics=instruments),
        ],
        exception_handlers={HTTPException: _on_http_error},
        lifespan=lifespan,
    )
    app.state.metrics = instruments
    return app
