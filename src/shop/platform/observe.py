"""What an operator needs beyond RED per route: backlog, lag and breaker gauges, and a
``GET /health`` that says DEGRADED, and why, while a dependency is failing (docs/observability.md).

Nothing here runs per order. Counters on the order path are children resolved once
(``.labels()`` at start-up); the breaker's state is read at scrape time; the outbox backlog
and the consumer lag are sampled by one task every few seconds (one cheap SQL statement
each), which also judges whether they are old or stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, runtime_checkable

from fastapi import APIRouter, FastAPI, Request
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.responses import JSONResponse, Response

from shop.platform.discovery import Heartbeat
from shop.platform.problems import problem_response
from shop.platform.worker import Loop

__all__ = [
    "Backlogged",
    "BreakerStates",
    "Health",
    "Watch",
    "health_router",
    "install_health",
    "metrics_registry",
]

log = logging.getLogger("shop.observe")

DegradedCheck = Callable[[], str | None]

# One statement: the unpublished rows are what the index (published_at, seq) starts with.
_OUTBOX_BACKLOG = text("SELECT count(*), min(created_at) FROM outbox WHERE published_at IS NULL")


class Health:
    """Named checks, each returning why the service is degraded now, or None when it is not.

    A degraded service still answers (readiness stays UP): it is a dependency of it that
    fails, and taking it out of rotation would not help its callers.
    """

    def __init__(self) -> None:
        self._checks: dict[str, DegradedCheck] = {}

    def add(self, name: str, check: DegradedCheck) -> None:
        self._checks[name] = check

    def degraded(self) -> dict[str, str]:
        """Every failing check's name and reason; empty when all is well."""
        found: dict[str, str] = {}
        for name, check in self._checks.items():
            reason = check()
            if reason is not None:
                found[name] = reason
        return found

    def report(self) -> dict[str, Any]:
        """``{"status": "UP"|"DEGRADED", "checks": {name: "UP"|"DEGRADED"}, "reasons": {...}}``."""
        reasons = self.degraded()
        return {
            "status": "DEGRADED" if reasons else "UP",
            "checks": {n: "DEGRADED" if n in reasons else "UP" for n in self._checks},
            "reasons": reasons,
        }


def health_router(health: Health) -> APIRouter:
    """``GET /health``: the readiness checks and the degradation checks in one answer.

    200 ``{"status": "UP"}`` or ``{"status": "DEGRADED", "reasons": ...}``; 503 problem+json
    (as ``/health/ready``) when a readiness check fails.
    """
    router = APIRouter(tags=["operations"])

    @router.get("/health", response_model=None)
    async def overall(request: Request) -> Response:
        runtime = request.app.state.runtime
        names = list(runtime.readiness)
        outcomes = await asyncio.gather(
            *(asyncio.wait_for(runtime.readiness[n](), 2.0) for n in names),
            return_exceptions=True,
        )
        ready = {
            n: "DOWN" if isinstance(o, BaseException) else "UP"
            for n, o in zip(names, outcomes, strict=True)
        }
        report = health.report()
        checks = {**ready, **report["checks"]}
        down = [n for n, v in ready.items() if v == "DOWN"]
        if down:
            return problem_response(
                503,
                instance=request.url.path,
                detail=f"Not ready: {', '.join(down)}",
                extra={"checks": checks, "reasons": report["reasons"]},
            )
        return JSONResponse(
            {"status": report["status"], "checks": checks, "reasons": report["reasons"]},
            headers={"Cache-Control": "no-store"},
        )

    return router


def install_health(app: FastAPI) -> Health:
    """The app's ``GET /health`` and its (empty) set of degradation checks, kept in
    ``app.state.health`` for the lifespan to add to."""
    health = Health()
    app.state.health = health
    app.include_router(health_router(health))
    return health


def metrics_registry(app: FastAPI) -> CollectorRegistry:
    """The registry ``/metrics`` of this app serves (platform/middleware.py HttpMetrics)."""
    registry: CollectorRegistry = app.state.metrics.registry
    return registry


class _Breaker(Protocol):
    name: str

    @property
    def state(self) -> str: ...


class BreakerStates(Collector):
    """``shop_breaker_state{service, peer, state}``: 1 for the breaker's current state, 0 for
    the others, read at scrape time (an open breaker turns half-open by the clock alone).
    ``source``: the breakers are asked for at each scrape instead (the gateway makes one per
    service it routes to, as they are first needed)."""

    STATES = ("closed", "open", "half-open")

    def __init__(
        self, service: str, *, source: Callable[[], Iterable[_Breaker]] | None = None
    ) -> None:
        self._service = service
        self._breakers: dict[str, _Breaker] = {}
        self._source = source

    def track(self, breaker: _Breaker) -> None:
        """Report ``breaker`` (in place of an earlier one of the same name)."""
        self._breakers[breaker.name] = breaker

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "shop_breaker_state",
            "Circuit breaker state (1 = the current one)",
            labels=["service", "peer", "state"],
        )
        breakers = self._breakers.values() if self._source is None else self._source()
        for breaker in breakers:
            current = str(breaker.state)
            for state in self.STATES:
                family.add_metric(
                    [self._service, breaker.name, state], 1.0 if state == current else 0.0
                )
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return self.collect()


@runtime_checkable
class Backlogged(Protocol):
    """An outbox that counts its own backlog (``mongo.MongoOutbox``): how many events are
    unpublished and when the oldest of them was written (epoch seconds; None when none)."""

    async def backlog(self) -> tuple[int, float | None]: ...


async def _sql_backlog(engine: AsyncEngine) -> tuple[int, float | None]:
    async with engine.connect() as conn:
        row = (await conn.execute(_OUTBOX_BACKLOG)).one()
    return int(row[0] or 0), row[1]


class _Lagging(Protocol):
    async def pending(self, topic: str, *, group: str) -> int: ...


@dataclass(slots=True)
class _Consumer:
    bus: _Lagging
    topic: str
    group: str
    stuck_after_s: float
    lag: int = 0
    # When the lag was last 0 or lower than at the sample before.
    progressed_at: float = 0.0
    error: str | None = None


@dataclass(slots=True)
class _Outbox:
    read: Callable[[], Awaitable[tuple[int, float | None]]]
    max_age_s: float
    backlog: int = 0
    oldest_age_s: float = 0.0
    error: str | None = None


class Watch:
    """Samples outbox backlog and consumer lag every ``interval_s`` into gauges, and adds a
    degradation check for each to ``health``.

    Built with the app (its gauges are registered once); the lifespan names the outbox and
    the consumers, then runs it with ``async with``, which forgets them on the way out.

    The outbox is degraded when its oldest unpublished event is older than ``max_age_s``
    (the relay cannot publish: the bus is down, or it falls behind); a consumer is stuck
    when events are pending and the lag has not gone down for ``stuck_after_s``.
    """

    def __init__(
        self,
        *,
        service: str,
        registry: CollectorRegistry,
        health: Health,
        interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._service = service
        self._health = health
        self._interval = interval_s
        self._clock = clock
        self._wall = wall_clock
        self._outbox: _Outbox | None = None
        self._consumers: list[_Consumer] = []
        self._loop: Loop | None = None
        self._heartbeat: Callable[[], Heartbeat | None] = lambda: None
        self._backlog = Gauge(
            "shop_outbox_backlog",
            "Events in the outbox not yet published",
            ["service"],
            registry=registry,
        ).labels(service)
        self._age = Gauge(
            "shop_outbox_oldest_age_seconds",
            "Age of the oldest unpublished event in the outbox (0 when none)",
            ["service"],
            registry=registry,
        ).labels(service)
        self._lag = Gauge(
            "shop_event_consumer_lag",
            "Events of a topic after the consumer group's committed offset",
            ["service", "topic", "group"],
            registry=registry,
        )
        self._dead = Gauge(
            "shop_event_dead_letters",
            "Events of a topic the consumer group set aside after its last attempt",
            ["service", "topic", "group"],
            registry=registry,
        )

    def outbox(self, source: AsyncEngine | Backlogged, *, max_age_s: float = 30.0) -> None:
        """Watch the outbox of ``source``: a service's SQL engine (its ``outbox`` table), or
        an outbox that counts its own backlog (MongoDB's)."""
        read = partial(_sql_backlog, source) if isinstance(source, AsyncEngine) else source.backlog
        self._outbox = _Outbox(read, max_age_s)
        self._health.add("outbox", self._outbox_verdict)

    def consumer(
        self, bus: _Lagging, *, topic: str, group: str, stuck_after_s: float = 30.0
    ) -> None:
        self._consumers.append(
            _Consumer(bus, topic, group, stuck_after_s, progressed_at=self._clock())
        )
        self._health.add(
            f"consumer:{group}:{topic}", partial(self.consumer_verdict, len(self._consumers) - 1)
        )

    def report_to(self, heartbeat: Callable[[], Heartbeat | None]) -> None:
        """After each round, tell the registry (through the heartbeat ``heartbeat()`` gives,
        once there is one) whether the instance is degraded and why: its dashboard shows it."""
        self._heartbeat = heartbeat

    async def sample(self) -> None:
        """One round: each query on its own, so one failing does not hide the others."""
        await self._sample()
        if (heartbeat := self._heartbeat()) is not None:
            reasons = self._health.degraded()
            heartbeat.report_health(
                "DEGRADED" if reasons else "UP",
                "; ".join(f"{name}: {why}" for name, why in reasons.items()) or None,
            )

    async def _sample(self) -> None:
        if (box := self._outbox) is not None:
            try:
                backlog, oldest = await box.read()
                box.backlog = backlog
                box.oldest_age_s = max(0.0, self._wall() - oldest) if oldest is not None else 0.0
                box.error = None
            except Exception as exc:
                box.error = f"cannot read the outbox: {exc.__class__.__name__}"
            self._backlog.set(box.backlog)
            self._age.set(box.oldest_age_s)
        for consumer in self._consumers:
            try:
                lag = await consumer.bus.pending(consumer.topic, group=consumer.group)
                consumer.error = None
            except Exception as exc:
                consumer.error = f"cannot read the lag: {exc.__class__.__name__}"
                continue
            if lag == 0 or lag < consumer.lag:
                consumer.progressed_at = self._clock()
            consumer.lag = lag
            self._lag.labels(self._service, consumer.topic, consumer.group).set(lag)
            # Only where the bus can count them cheaply (docs/observability.md).
            count = getattr(consumer.bus, "dead_letters", None)
            if count is not None:
                with contextlib.suppress(Exception):
                    dead = await count(consumer.topic, group=consumer.group)
                    self._dead.labels(self._service, consumer.topic, consumer.group).set(dead)

    def _outbox_verdict(self) -> str | None:
        box = self._outbox
        if box is None:
            return None
        if box.error is not None:
            return box.error
        if box.backlog and box.oldest_age_s > box.max_age_s:
            return (
                f"{box.backlog} events unpublished, the oldest for {box.oldest_age_s:.0f} s"
                f" (more than {box.max_age_s:g} s)"
            )
        return None

    def consumer_verdict(self, index: int) -> str | None:
        if index >= len(self._consumers):
            return None  # not watched (any more): the app is stopping
        consumer = self._consumers[index]
        if consumer.error is not None:
            return consumer.error
        still = self._clock() - consumer.progressed_at
        if consumer.lag and still >= consumer.stuck_after_s:
            return (
                f"{consumer.lag} events of {consumer.topic} pending for {consumer.group},"
                f" none consumed for {still:.0f} s"
            )
        return None

    async def __aenter__(self) -> Watch:
        # On the common loop: a bug in a round is logged and counted, the sampling goes on.
        self._loop = Loop(
            self._round,
            name=f"watch-{self._service}",
            interval_s=self._interval,
            backoff_s=self._interval,
            backoff_max_s=self._interval,
            grace_s=2.0,
        )
        self._loop.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._loop is not None:
            await self._loop.stop()
            self._loop = None
        self._outbox = None
        self._consumers = []
        self._heartbeat = lambda: None

    async def _round(self) -> bool:
        await self.sample()
        return False
