"""Wiring of the inventory service: the only place that picks implementations from settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from shop.inventory import events
from shop.inventory.api import install_error_answers, internal_router, reserve_lean, router
from shop.inventory.domain import DEMO_STOCK
from shop.inventory.service import InventoryService, ReservationMetrics
from shop.inventory.settings import InventorySettings
from shop.inventory.store import SqlInventoryStore
from shop.platform import retention
from shop.platform.app import (
    Runtime,
    add_lean_route,
    create_app,
    service_database,
    service_events,
)
from shop.platform.observe import Watch, install_health, metrics_registry
from shop.platform.settings import PlatformSettings

__all__ = ["SERVICE_NAME", "build_app"]

SERVICE_NAME = "inventory-service"


def build_app(*, platform: PlatformSettings, settings: InventorySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI, runtime: Runtime) -> AsyncIterator[None]:
        url = settings.resolved_database_url(platform=platform, service="inventory")
        async with (
            service_database(runtime, url=url, package="shop.inventory") as engine,
            service_events(runtime) as bus,
        ):
            inventory = InventoryService(
                store=SqlInventoryStore(
                    engine,
                    attempts=settings.reserve_attempts,
                    group_window_s=settings.reserve_group_window_ms / 1000,
                    group_max_asks=settings.reserve_group_size,
                ),
                metrics=reservation_metrics,
            )
            # Seeded before consuming: the demo stock goes into an empty table, and the
            # catalogue's events for the same SKUs then find them known.
            if settings.seeds_demo_stock(platform):
                await inventory.seed_demo_stock(DEMO_STOCK)
            app.state.inventory = inventory
            events.subscribe(bus, inventory)
            await bus.start()
            watch.consumer(bus, topic=events.PRODUCTS_TOPIC, group=events.CONSUMER_GROUP)
            watch.report_to(lambda: runtime.heartbeat)
            inbox_kept = retention.policy(platform, keep_s=platform.inbox_retention_s)
            async with (
                watch,
                retention.inbox_retention(engine, service="inventory", policy=inbox_kept),
            ):
                yield

    app = create_app(
        name=SERVICE_NAME,
        title="Shop inventory service",
        description="Stock per SKU, and all-or-nothing reservations for orders.",
        platform=platform,
        routers=[router, internal_router],
        lifespan=lifespan,
    )
    install_error_answers(app)
    registry = metrics_registry(app)
    reservation_metrics = ReservationMetrics(registry)
    watch = Watch(service=SERVICE_NAME, registry=registry, health=install_health(app))
    # The route every order takes, without FastAPI's routing and dependency solving.
    add_lean_route(app, "POST", "/internal/reservations", reserve_lean)
    return app
