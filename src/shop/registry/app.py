"""Wiring of the discovery server: the one place that picks the store and the clock."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI

from shop.platform.app import Runtime, create_app
from shop.platform.settings import PlatformSettings
from shop.platform.worker import expose_jobs
from shop.registry.access import Registrants, WriteThrottle
from shop.registry.api import dashboard_router, eureka_router, install_error_answers
from shop.registry.domain import Clock
from shop.registry.service import (
    InstanceCounts,
    Registry,
    counting_loop,
    eviction_loop,
)
from shop.registry.settings import RegistrySettings
from shop.registry.store import InMemoryLeaseStore, LeaseStore

__all__ = ["build_app"]

log = logging.getLogger("shop.registry")

StoreOpener = Callable[[RegistrySettings], AbstractAsyncContextManager[LeaseStore]]


@asynccontextmanager
async def _in_memory(_settings: RegistrySettings) -> AsyncIterator[LeaseStore]:
    yield InMemoryLeaseStore()


@asynccontextmanager
async def _etcd(settings: RegistrySettings) -> AsyncIterator[LeaseStore]:
    # Imported here: aetcd comes with the `etcd` extra, and an in-memory registry needs none.
    from shop.registry.store_etcd import EtcdLeaseStore

    target = settings.etcd
    store = EtcdLeaseStore(
        endpoints=target.endpoints, prefix=target.prefix, timeout_s=settings.store_timeout_s
    )
    try:
        yield store
    finally:
        await store.close()


# REGISTRY_STORE_URL's scheme -> the store it names ("" = unset).
_STORES: Mapping[str, StoreOpener] = {"": _in_memory, "etcd": _etcd}


def _given(store: LeaseStore) -> StoreOpener:
    @asynccontextmanager
    async def opener(_settings: RegistrySettings) -> AsyncIterator[LeaseStore]:
        yield store  # the caller's to close

    return opener


def build_app(
    *,
    platform: PlatformSettings,
    settings: RegistrySettings,
    store: LeaseStore | None = None,
    clock: Clock = time.time,
) -> FastAPI:
    """The registry; ``store`` replaces the one ``REGISTRY_STORE_URL`` names."""
    open_store = _given(store) if store is not None else _STORES[settings.store_scheme]

    @asynccontextmanager
    async def lifespan(app: FastAPI, runtime: Runtime) -> AsyncIterator[None]:
        async with open_store(settings) as opened:
            registry = Registry(
                store=opened,
                clock=clock,
                default_lease_duration_s=settings.lease_duration_s,
                max_instances=settings.max_instances,
                max_instances_per_app=settings.max_instances_per_app,
            )
            app.state.registry = registry
            runtime.readiness["store"] = registry.ping
            try:
                await registry.ping()
            except Exception as exc:  # readiness reports it; requests answer 503 meanwhile
                log.warning("the registry's store is not reachable yet: %s", exc)
            async with (
                eviction_loop(registry, interval_s=settings.eviction_interval_s),
                counting_loop(registry, counts, interval_s=settings.metrics_interval_s),
            ):
                yield

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
    counts = InstanceCounts(app.state.metrics.registry)
    expose_jobs(app.state.metrics.registry)  # shop_background_failures_total{job}
    app.state.instance_counts = counts
    app.state.eviction_interval_s = settings.eviction_interval_s
    app.state.registrants = Registrants(settings.client_secrets)
    app.state.write_throttle = WriteThrottle(
        rate_per_s=settings.write_rate_per_s, burst=settings.write_burst, clock=clock
    )
    if not app.state.registrants.enforced:
        # Only the embedded profile gets here (production refuses to start without clients).
        log.warning(
            "REGISTRY_CLIENTS is empty: anyone who reaches this registry may register any"
            " service (embedded profile only; `shop up` always sets it)"
        )
    install_error_answers(app)
    return app
