"""Wiring of the product service: the only place that picks implementations from settings."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from shop.platform.app import Runtime, create_app, service_database, service_events
from shop.platform.outbox import OutboxRelay
from shop.platform.settings import PlatformSettings
from shop.product.api import install_error_answers, internal, router
from shop.product.service import ProductService
from shop.product.settings import ProductSettings
from shop.product.store import SqlProductStore

__all__ = ["SERVICE_NAME", "build_app"]

log = logging.getLogger("shop.product")

SERVICE_NAME = "product-service"


def build_app(*, platform: PlatformSettings, settings: ProductSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI, runtime: Runtime) -> AsyncIterator[None]:
        url = settings.resolved_database_url(platform=platform, service="product")
        async with (
            service_database(runtime, url=url, package="shop.product") as engine,
            service_events(runtime) as bus,
            OutboxRelay(engine, bus, service="product") as relay,
        ):
            products = ProductService(store=SqlProductStore(engine), on_change=relay.wake)
            app.state.products = products
            app.state.outbox_relay = relay
            if settings.seeds_demo_catalogue(platform):
                await products.seed_catalogue()
            yield

    app = create_app(
        name=SERVICE_NAME,
        title="Shop product service",
        description="The catalogue: browse and search products; admins add, revise and remove.",
        platform=platform,
        routers=[router, internal],
        lifespan=lifespan,
    )
    install_error_answers(app)
    return app
