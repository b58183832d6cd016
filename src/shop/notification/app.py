"""Wiring of the notification service: the only place that picks implementations."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from shop.notification import events
from shop.notification.api import router
from shop.notification.couriers import Courier, EmailCourier, LogCourier
from shop.notification.service import NotificationService, Sweeper
from shop.notification.settings import NotificationSettings
from shop.notification.store import SqlNotificationStore
from shop.platform import retention
from shop.platform.app import Runtime, create_app, service_database, service_events
from shop.platform.observe import Watch, install_health, metrics_registry
from shop.platform.settings import PlatformSettings

__all__ = ["SERVICE_NAME", "build_app", "couriers_for"]

SERVICE_NAME = "notification-service"


def couriers_for(settings: NotificationSettings) -> list[Courier]:
    """E-mail first when an SMTP server is configured; the log always (LOG records)."""
    couriers: list[Courier] = []
    if settings.smtp_host is not None:
        couriers.append(
            EmailCourier(
                host=settings.smtp_host,
                port=settings.smtp_port,
                sender=settings.smtp_from,
                username=settings.smtp_username,
                password=(
                    settings.smtp_password.get_secret_value() if settings.smtp_password else None
                ),
                starttls=settings.smtp_starttls,
                timeout_s=settings.smtp_timeout_s,
            )
        )
    couriers.append(LogCourier())
    return couriers


def build_app(*, platform: PlatformSettings, settings: NotificationSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI, runtime: Runtime) -> AsyncIterator[None]:
        url = settings.resolved_database_url(platform=platform, service="notification")
        async with (
            service_database(runtime, url=url, package="shop.notification") as engine,
            service_events(runtime) as bus,
        ):
            service = NotificationService(
                store=SqlNotificationStore(engine),
                couriers=couriers_for(settings),
                claim_s=settings.claim_s,
                retry_base_s=settings.retry_base_s,
                retry_max_s=settings.retry_max_s,
                max_attempts=settings.max_attempts,
                registry=registry,
            )
            app.state.notifications = service
            events.subscribe(bus, service)
            await bus.start()
            sweeper = Sweeper(service, interval_s=settings.sweep_interval_s)
            sweeper.start()
            watch.consumer(bus, topic=events.ORDERS_TOPIC, group=events.CONSUMER_GROUP)
            try:
                watch.report_to(lambda: runtime.heartbeat)
                inbox_kept = retention.policy(platform, keep_s=platform.inbox_retention_s)
                async with (
                    watch,
                    retention.inbox_retention(engine, service="notification", policy=inbox_kept),
                ):
                    yield
            finally:
                await sweeper.stop()

    app = create_app(
        name=SERVICE_NAME,
        title="Shop notification service",
        description="Tells buyers about their orders, once per order event; lists what was sent.",
        platform=platform,
        routers=[router],
        lifespan=lifespan,
    )
    registry = metrics_registry(app)
    watch = Watch(service=SERVICE_NAME, registry=registry, health=install_health(app))
    return app
