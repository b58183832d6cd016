"""Wiring of the discovery server: the one place that picks the store and the clock."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from shop.platform.app import Runtime, create_app
from shop.platform.settings import PlatformSettings
from shop.registry.api import dashboard_router, eureka_router, install_error_answers
from shop.registry.domain import Clock
from shop.registry.service import Registry, evict_periodically
from shop.registry.settings import RegistrySettings
from shop.registry.store import InMemoryLeaseStore, LeaseStore

__all__ = ["build_app"]


def build_app(
    *,
    platform: PlatformSettings,
    settings: RegistrySettings,
    store: LeaseStore | None = None,
    clock: Clock = time.time,
) -> FastAPI:
    registry = Registry(
        store=store if store is not None else InMemoryLeaseStore(),
        clock=clock,
        default_lease_duration_s=settings.lease_duration_s,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI, _runtime: Runtime) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(
            evict_periodically(registry, interval_s=settings.eviction_interval_s),
            name="registry-eviction",
        )
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

    app = create_app(
        name="registry",
        title="Shop registry",
        description="Discovery server speaking Eureka's REST protocol, with a dashboard.",
        platform=platform,
        routers=[eureka_router, dashboard_router],
        lifespan=lifespan,
        # The registry is what others register with; it never registers itself.
        register=False,
    )
    app.state.registry = registry
    app.state.eviction_interval_s = settings.eviction_interval_s
    install_error_answers(app)
    return app
