"""Wiring of the order service: the only place that picks implementations from settings."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI

from shop.order.api import install_error_answers, router
from shop.order.breaker import CircuitBreaker
from shop.order.peers import INVENTORY_SERVICE, HttpCatalogue, HttpInventory
from shop.order.service import OrderService
from shop.order.settings import OrderSettings
from shop.order.store import SqlOrderStore
from shop.platform.app import Runtime, create_app, service_database, service_events
from shop.platform.outbox import OutboxRelay
from shop.platform.settings import PlatformSettings

__all__ = ["SERVICE_NAME", "build_app"]

SERVICE_NAME = "order-service"

log = logging.getLogger("shop.order")


def build_app(*, platform: PlatformSettings, settings: OrderSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI, runtime: Runtime) -> AsyncIterator[None]:
        url = settings.resolved_database_url(platform=platform, service="order")
        breaker = CircuitBreaker(
            name=INVENTORY_SERVICE,
            failure_threshold=settings.breaker_failure_threshold,
            open_for_s=settings.breaker_open_s,
        )
        inventory = HttpInventory(
            registry=runtime.registry,
            http=runtime.http,
            breaker=breaker,
            timeout_s=settings.inventory_timeout_s,
            release_retry_delays_s=settings.release_retry_delays_s,
        )
        async with (
            service_database(runtime, url=url, package="shop.order") as engine,
            service_events(runtime) as bus,
            OutboxRelay(
                engine, bus, service="order", poll_interval_s=settings.outbox_poll_interval_s
            ) as relay,
        ):
            app.state.orders = OrderService(
                store=SqlOrderStore(engine),
                catalogue=HttpCatalogue(
                    registry=runtime.registry,
                    http=runtime.http,
                    timeout_s=settings.catalogue_timeout_s,
                ),
                inventory=inventory,
                events_added=relay.wake,
                idempotency_stale_after=timedelta(seconds=settings.idempotency_stale_s),
            )
            app.state.inventory_breaker = breaker
            app.state.outbox_relay = relay
            try:
                yield
            finally:
                await inventory.aclose()

    app = create_app(
        name=SERVICE_NAME,
        title="Shop order service",
        description="Orders at catalogue prices, with their stock reserved; cancellation.",
        platform=platform,
        routers=[router],
        lifespan=lifespan,
    )
    install_error_answers(app)
    return app
