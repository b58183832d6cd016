"""Wiring of the product service: the only place that picks implementations from settings."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from shop.platform.app import Runtime, create_app
from shop.platform.db import create_engine, migrate, ping
from shop.platform.events import EventBus, open_event_bus
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
        engine = create_engine(settings.resolved_database_url(platform=platform, service="product"))
        try:
            await migrate(engine, package="shop.product", service="product")
            async with open_event_bus(
                platform.resolved_event_bus_url, client_id=SERVICE_NAME
            ) as bus:
                relay = OutboxRelay(engine, bus, service="product")
                relay.start()
                try:
                    products = ProductService(store=SqlProductStore(engine), on_change=relay.wake)
                    app.state.products = products
                    app.state.outbox_relay = relay
                    runtime.readiness["database"] = _database_check(engine)
                    runtime.readiness["events"] = _bus_check(bus)
                    if settings.seeds_demo_catalogue(platform):
                        await products.seed_catalogue()
                    yield
                finally:
                    await relay.stop()
        finally:
            await engine.dispose()

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


def _database_check(engine: AsyncEngine) -> Callable[[], Awaitable[None]]:
    async def check() -> None:
        await ping(engine)

    return check


def _bus_check(bus: EventBus) -> Callable[[], Awaitable[None]]:
    async def check() -> None:
        await bus.ping()

    return check
