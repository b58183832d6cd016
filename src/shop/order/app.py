"""Wiring of the order service: the only place that picks implementations from settings."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from functools import partial

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy.ext.asyncio import AsyncEngine

from shop.order import events
from shop.order.api import install_error_answers, operations_router, place_order_lean, router
from shop.order.breaker import BreakerState, CircuitBreaker
from shop.order.peers import INVENTORY_SERVICE, HttpCatalogue, HttpInventory
from shop.order.recent import RecentOrders
from shop.order.releases import ReleaseReconciler
from shop.order.service import OrderMetrics, OrderService
from shop.order.settings import OrderSettings
from shop.order.store import SqlOrderStore, owner_lease_name, purge_answered_keys
from shop.platform import retention
from shop.platform.app import (
    Runtime,
    add_lean_route,
    create_app,
    service_database,
    service_events,
)
from shop.platform.lease import Lease
from shop.platform.observe import BreakerStates, Watch, install_health, metrics_registry
from shop.platform.outbox import OutboxRelay, SqlOutbox
from shop.platform.settings import PlatformSettings
from shop.platform.upstream import UpstreamPool
from shop.platform.worker import LeasedLoop

__all__ = ["SERVICE_NAME", "build_app"]

SERVICE_NAME = "order-service"

log = logging.getLogger("shop.order")


def build_app(
    *,
    platform: PlatformSettings,
    settings: OrderSettings,
    clock: Callable[[], float] = time.monotonic,
) -> FastAPI:
    """``clock`` (monotonic seconds) times the breaker and the stuck-consumer check: tests
    move it by hand."""

    @asynccontextmanager
    async def lifespan(app: FastAPI, runtime: Runtime) -> AsyncIterator[None]:
        url = settings.resolved_database_url(platform=platform, service="order")

        async def credentials(target: str) -> str:
            # Looked up at each call, not bound once: the runtime's token source may be
            # replaced while the app runs (tests do).
            return await runtime.service_tokens.bearer(target)

        # Kept-alive connections to the inventory, for the reservations (order/peers.py).
        cafile = platform.tls_cafile
        context = ssl.create_default_context(cafile=cafile) if cafile else None
        pool = UpstreamPool(ssl_context=context)
        breaker = CircuitBreaker(
            name=INVENTORY_SERVICE,
            failure_threshold=settings.breaker_failure_threshold,
            open_for_s=settings.breaker_open_s,
            on_change=transitions,
            clock=clock,
        )
        breaker_states.track(breaker)
        health.add("breaker:" + INVENTORY_SERVICE, partial(_breaker_verdict, breaker))
        inventory = HttpInventory(
            registry=runtime.registry,
            pool=pool,
            breaker=breaker,
            credentials=credentials,
            timeout_s=settings.inventory_timeout_s,
        )
        async with (
            _closing(pool),
            service_database(runtime, url=url, package="shop.order") as engine,
            service_events(runtime) as bus,
            OutboxRelay(
                SqlOutbox(engine),
                bus,
                service="order",
                poll_interval_s=settings.outbox_poll_interval_s,
                retention=retention.policy(platform, keep_s=platform.outbox_retention_s),
            ) as relay,
        ):
            watch.outbox(engine)
            watch.consumer(bus, topic=events.PRODUCTS_TOPIC, group=events.CONSUMER_GROUP)
            store = SqlOrderStore(engine)
            owner = f"order@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
            claims = await _claim_owner(store, engine, owner=owner, lease_s=settings.claim_lease_s)
            async with (
                ReleaseReconciler(
                    store=store,
                    inventory=inventory,
                    lease=Lease(engine, name="releases:order", owner=owner, duration_s=10.0),
                    interval_s=settings.release_interval_s,
                    backoff_s=settings.release_backoff_s,
                    backoff_max_s=settings.release_backoff_max_s,
                ) as releases,
                claims,
            ):
                orders = OrderService(
                    store=store,
                    catalogue=HttpCatalogue(
                        registry=runtime.registry,
                        http=runtime.http,
                        credentials=credentials,
                        timeout_s=settings.catalogue_timeout_s,
                    ),
                    inventory=inventory,
                    releases=releases,
                    events_added=_coalesced(relay.wake, delay_s=settings.outbox_wake_delay_s),
                    idempotency_stale_after=timedelta(seconds=settings.idempotency_stale_s),
                    release_hold=timedelta(seconds=settings.release_hold_s),
                    metrics=order_metrics,
                    owner=owner,
                    recent=recent,
                    prices_from_catalogue=settings.price_source == "catalogue",
                )
                app.state.orders = orders
                # The price list follows the catalogue from here on (docs/order.md).
                events.subscribe(bus, orders.on_product_event)
                await bus.start()
                app.state.inventory_breaker = breaker
                app.state.outbox_relay = relay
                app.state.release_reconciler = releases
                watch.report_to(lambda: runtime.heartbeat)
                async with (
                    watch,
                    # Answered Idempotency-Keys after their replay window; the inbox of the
                    # catalogue's events after the redelivery horizon (docs/platform.md).
                    retention.RetentionJob(
                        purge_answered_keys(engine),
                        name="idempotency-retention-order",
                        policy=retention.policy(platform, keep_s=platform.idempotency_retention_s),
                    ),
                    retention.inbox_retention(
                        engine,
                        service="order",
                        policy=retention.policy(platform, keep_s=platform.inbox_retention_s),
                    ),
                ):
                    yield

    app = create_app(
        name=SERVICE_NAME,
        title="Shop order service",
        description="Orders at catalogue prices, with their stock reserved; cancellation.",
        platform=platform,
        routers=[router, operations_router],
        lifespan=lifespan,
    )
    install_error_answers(app)
    registry = metrics_registry(app)
    health = install_health(app)
    order_metrics = OrderMetrics(registry)
    transitions = _transition_counter(registry)
    breaker_states = BreakerStates(SERVICE_NAME)
    registry.register(breaker_states)
    watch = Watch(service=SERVICE_NAME, registry=registry, health=health, clock=clock)
    app.state.watch = watch
    # Placed and cancelled orders for the console, kept from the first request on.
    recent = app.state.recent_orders = RecentOrders()
    # The route every order takes, without FastAPI's routing and dependency solving.
    add_lean_route(app, "POST", "/api/order", place_order_lean)
    return app


async def _claim_owner(
    store: SqlOrderStore, engine: AsyncEngine, *, owner: str, lease_s: float
) -> LeasedLoop:
    """The lease that says this process is alive while it holds Idempotency-Key claims
    (docs/order.md): held before the first request, renewed every third of ``lease_s`` by
    a loop, let go when the loop stops. Lapsed ones of processes gone are dropped first."""
    await store.forget_lapsed_owners(now=datetime.now(UTC))
    lease = Lease(engine, name=owner_lease_name(owner), owner=owner, duration_s=lease_s)
    await lease.hold()

    async def alive() -> bool:
        return False  # the loop's hold() before each step is the renewal

    return LeasedLoop(alive, name="claim-owner", lease=lease, interval_s=lease_s / 3)


@asynccontextmanager
async def _closing(pool: UpstreamPool) -> AsyncIterator[None]:
    """The pool's connections closed on the way out, after everything that calls with it."""
    try:
        yield
    finally:
        pool.close()


def _transition_counter(registry: CollectorRegistry) -> Callable[[BreakerState], None]:
    """``shop_breaker_transitions_total{service, peer, to}``, one child per state."""
    counter = Counter(
        "shop_breaker_transitions",
        "Circuit breaker transitions, by the state entered",
        ["service", "peer", "to"],
        registry=registry,
    )
    children = {s: counter.labels(SERVICE_NAME, INVENTORY_SERVICE, s.value) for s in BreakerState}
    return lambda state: children[state].inc()


def _breaker_verdict(breaker: CircuitBreaker) -> str | None:
    """Degraded while the breaker is not closed: orders are refused with 503 meanwhile."""
    state = breaker.state
    if state is BreakerState.CLOSED:
        return None
    return f"circuit to {breaker.name} is {state.value}: orders are refused with 503"


def _coalesced(wake: Callable[[], None], *, delay_s: float) -> Callable[[], None]:
    """``wake`` once ``delay_s`` after the first call, however many calls come meanwhile.

    A relay round costs several statements whatever it carries; woken per order it was
    about a tenth of the order service's CPU (docs/order.md "Performance").
    """
    if delay_s <= 0:
        return wake
    pending: list[asyncio.TimerHandle] = []

    def fire() -> None:
        pending.clear()
        wake()

    def soon() -> None:
        if not pending:
            pending.append(asyncio.get_running_loop().call_later(delay_s, fire))

    return soon
