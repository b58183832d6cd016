"""Wiring of the product service: the only place that picks implementations from settings."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial

from fastapi import FastAPI

from shop.platform import retention
from shop.platform.app import (
    Runtime,
    add_lean_route,
    create_app,
    service_database,
    service_events,
)
from shop.platform.observe import Backlogged, Watch, install_health, metrics_registry
from shop.platform.outbox import OutboxRelay, OutboxSource, SqlOutbox
from shop.platform.settings import PlatformSettings
from shop.product.api import install_error_answers, internal, products_by_sku_lean, router
from shop.product.service import ProductService
from shop.product.settings import ProductSettings
from shop.product.store import ProductStore, SqlProductStore

__all__ = ["SERVICE_NAME", "build_app"]

log = logging.getLogger("shop.product")

SERVICE_NAME = "product-service"

Catalogue = tuple[ProductStore, OutboxSource]
CatalogueBackend = Callable[[Runtime, str], AbstractAsyncContextManager[Catalogue]]


@asynccontextmanager
async def _sql_catalogue(runtime: Runtime, url: str) -> AsyncIterator[Catalogue]:
    async with service_database(runtime, url=url, package="shop.product") as engine:
        yield SqlProductStore(engine), SqlOutbox(engine)


@asynccontextmanager
async def _mongo_catalogue(runtime: Runtime, url: str) -> AsyncIterator[Catalogue]:
    # Imported here: PyMongo is the ``mongo`` extra, which a SQL deployment need not install.
    from shop.platform.mongo import MongoOutbox, mongo_database, ping
    from shop.product.store_mongo import MongoProductStore

    async with mongo_database(url) as database:
        store = MongoProductStore(database)
        await store.create_indexes()
        runtime.readiness["database"] = partial(ping, database)
        yield store, MongoOutbox(database)


# URL scheme -> backend; any other scheme is a SQLAlchemy URL.
_BACKENDS: Mapping[str, CatalogueBackend] = {
    "mongodb": _mongo_catalogue,
    "mongodb+srv": _mongo_catalogue,
}


def _catalogue_backend(url: str) -> CatalogueBackend:
    scheme = url.split("://", 1)[0].lower()
    return _BACKENDS.get(scheme, _sql_catalogue)


def build_app(*, platform: PlatformSettings, settings: ProductSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI, runtime: Runtime) -> AsyncIterator[None]:
        url = settings.resolved_database_url(platform=platform, service="product")
        async with (
            _catalogue_backend(url)(runtime, url) as (store, outbox),
            service_events(runtime) as bus,
            OutboxRelay(
                outbox,
                bus,
                service="product",
                retention=retention.policy(platform, keep_s=platform.outbox_retention_s),
            ) as relay,
        ):
            products = ProductService(store=store, on_change=relay.wake)
            app.state.products = products
            app.state.outbox_relay = relay
            if settings.seeds_demo_catalogue(platform):
                await products.seed_catalogue()
            # The outbox's backlog is watched on either store (docs/observability.md).
            if isinstance(outbox, SqlOutbox):
                watch.outbox(outbox.engine)
            elif isinstance(outbox, Backlogged):  # MongoDB's counts its own
                watch.outbox(outbox)
            watch.report_to(lambda: runtime.heartbeat)
            async with watch:
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
    watch = Watch(service=SERVICE_NAME, registry=metrics_registry(app), health=install_health(app))
    app.state.watch = watch
    # The order service's price look-up, without FastAPI's routing and dependency solving.
    add_lean_route(app, "GET", "/internal/products", products_by_sku_lean)
    return app
