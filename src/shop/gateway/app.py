"""Wiring: the only place that picks the gateway's implementations from settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from shop.gateway.api import GatewayRuntime, ProxyMiddleware, ReadinessCheck, ops_routes
from shop.gateway.domain import DASHBOARD, Access, public_route_table
from shop.gateway.ratelimit import RateLimits, parse_limits
from shop.gateway.service import ApiCatalogue, Upstreams
from shop.gateway.settings import GatewaySettings
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

__all__ = ["NAME", "build_app"]

NAME = "api-gateway"


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

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # decompress=False: bodies pass through byte for byte, Content-Encoding and all.
        async with http_session(decompress=False, ca_file=platform.tls_cafile) as http:
            registry = RegistryClient(
                base_url=platform.registry_url,
                session=http,
                cache_ttl_s=platform.registry_cache_ttl_s,
            )
            upstreams = Upstreams(
                registry=registry, fixed={DASHBOARD: settings.dashboard_url(platform)}
            )
            runtime = GatewayRuntime(
                platform=platform,
                settings=settings,
                http=http,
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
                await runtime.limits.close()

    app = Starlette(
        routes=ops_routes(),
        # First listed = outermost: request identity wraps even the 413 and the metrics.
        middleware=[
            Middleware(RequestContextMiddleware),
            Middleware(BodyTimeoutMiddleware, timeout_s=settings.body_timeout_s),
            Middleware(BodyLimitMiddleware, max_bytes=platform.max_body_bytes),
            Middleware(MetricsMiddleware, metrics=instruments),
            Middleware(
                ProxyMiddleware,
                routes=routes,
                trusted_proxies=frozenset(settings.trusted_proxies),
            ),
        ],
        exception_handlers={HTTPException: _on_http_error},
        lifespan=lifespan,
    )
    app.state.metrics = instruments
    return app
