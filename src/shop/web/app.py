"""Wiring of the storefront: the only place that picks implementations from settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.staticfiles import StaticFiles

from shop.platform.app import Runtime, create_app
from shop.platform.settings import PlatformSettings
from shop.web.api import Storefront, router
from shop.web.catalogue import FindGateway, GatewayCatalogue, registry_gateway
from shop.web.settings import WebSettings

__all__ = ["SERVICE_NAME", "STATIC_PATH", "build_app"]

SERVICE_NAME = "web-service"
STATIC_PATH = "/shop/static"


def templates() -> Environment:
    return Environment(
        loader=PackageLoader("shop.web", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )


def build_app(
    *,
    platform: PlatformSettings,
    settings: WebSettings,
    find_gateway: Callable[[Runtime], FindGateway] | None = None,
) -> FastAPI:
    """``find_gateway``: how to find the gateway (default: the registry's ``api-gateway``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI, runtime: Runtime) -> AsyncIterator[None]:
        finder = (find_gateway or (lambda r: registry_gateway(r.registry)))(runtime)
        app.state.storefront = Storefront(
            templates=templates(),
            catalogue=GatewayCatalogue(
                session=runtime.http,
                find_gateway=finder,
                on_refused=runtime.registry.refused,
                timeout_s=settings.gateway_timeout_s,
                categories_ttl_s=settings.categories_ttl_s,
            ),
            page_size=settings.page_size,
        )
        yield

    app = create_app(
        name=SERVICE_NAME,
        title="Shop storefront",
        description="The storefront's pages; the shop's API is the gateway's.",
        platform=platform,
        routers=[router],
        lifespan=lifespan,
    )
    app.mount(
        STATIC_PATH,
        StaticFiles(packages=[("shop.web", "static")]),
        name="static",
    )
    return app
