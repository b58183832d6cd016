"""The console's parts: which paths the gateway keeps for itself, the registry's answer
read in both of Eureka's JSON shapes, the health word (and reasons) shown for each instance,
the vitals read from its Prometheus text and the orders/s computed from two readings."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web

from shop.gateway.console import (
    OrderRates,
    Probe,
    Vitals,
    _probe,
    _registered,
    _vitals,
    parse_vitals,
    serves,
)
from shop.platform.discovery import Instance
from tests.support import free_port


@pytest.mark.parametrize(
    "path", ["/console", "/console/api/services", "/console/assets/console.js", "/redoc"]
)
def test_the_console_and_docs_paths_are_the_gateways_own(path: str) -> None:
    assert serves(path)


@pytest.mark.parametrize(
    "path", ["/api/order", "/consoles", "/redocs", "/auth/token", "/documents", "/"]
)
def test_every_other_path_goes_to_the_proxy(path: str) -> None:
    assert not serves(path)


def _instance(app: str, port: int, status: str = "UP") -> dict[str, object]:
    return {
        "instanceId": f"127.0.0.1:{app}:{port}",
        "app": app.upper(),
        "ipAddr": "127.0.0.1",
        "status": status,
        "port": {"$": port, "@enabled": "true"},
    }


def test_a_list_of_one_written_as_the_item_alone_is_read() -> None:
    body = {
        "applications": {
            "application": {"name": "ORDER-SERVICE", "instance": _instance("order-service", 1)}
        }
    }
    [only] = _registered(body)
    assert (only.app, only.port, only.status) == ("order-service", 1, "UP")


def test_every_instance_of_every_application_is_read() -> None:
    body = {
        "applications": {
            "application": [
                {"name": "A", "instance": [_instance("a", 1), _instance("a", 2, "DOWN")]},
                {"name": "B", "instance": [_instance("b", 3)]},
            ]
        }
    }
    found = _registered(body)
    assert [(i.app, i.port, i.status) for i in found] == [
        ("a", 1, "UP"),
        ("a", 2, "DOWN"),
        ("b", 3, "UP"),
    ]


@pytest.mark.parametrize("body", [None, [], {}, {"applications": []}, {"applications": {}}])
def test_an_empty_or_odd_answer_is_no_instance(body: object) -> None:
    assert _registered(body) == []


async def _serving(routes: dict[str, tuple[int, object]]) -> tuple[web.AppRunner, int]:
    """A stand-in instance answering ``routes`` (path -> status, JSON body); 404 elsewhere."""
    app = web.Application()
    for path, (status, body) in routes.items():

        async def answer(_request: web.Request, status: int = status, body: object = body) -> Any:
            return web.json_response(body, status=status)

        if isinstance(body, str):  # Prometheus text

            async def text(_request: web.Request, status: int = status, body: str = body) -> Any:
                return web.Response(text=body, status=status, content_type="text/plain")

            app.router.add_get(path, text)
        else:
            app.router.add_get(path, answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


@pytest.mark.parametrize(
    ("routes", "shown"),
    [
        # /health's word wins: a degraded service that still serves is shown DEGRADED.
        ({"/health": (200, {"status": "DEGRADED"}), "/health/ready": (200, {})}, "DEGRADED"),
        ({"/health": (200, {"status": "UP"})}, "UP"),
        # A process without /health (the gateway, the registry) is asked for readiness.
        ({"/health/ready": (200, {"status": "UP"})}, "UP"),
        ({"/health/ready": (503, {"status": "DOWN"})}, "DOWN"),
        ({"/health": (503, {"status": "DOWN"})}, "DOWN"),
    ],
)
async def test_each_instance_is_shown_with_its_own_word_on_its_health(
    routes: dict[str, tuple[int, object]], shown: str
) -> None:
    runner, port = await _serving(routes)
    try:
        async with aiohttp.ClientSession() as http:
            instance = Instance.from_eureka(_instance("order-service", port))
            assert (await _probe(http, instance)).status == shown
    finally:
        await runner.cleanup()


async def test_an_instance_nobody_answers_at_is_unreachable() -> None:
    async with aiohttp.ClientSession() as http:
        instance = Instance.from_eureka(_instance("order-service", free_port()))
        assert await _probe(http, instance) == Probe("UNREACHABLE")
        assert await _vitals(http, instance) == Vitals()


_BREAKER = "circuit to inventory-service is open: orders are refused with 503"


@pytest.mark.parametrize("status", [200, 503])
async def test_a_degraded_or_failing_instance_says_why(status: int) -> None:
    body = {"status": "DEGRADED", "reasons": {"breaker:inventory-service": _BREAKER}}
    runner, port = await _serving({"/health": (status, body)})
    try:
        async with aiohttp.ClientSession() as http:
            probe = await _probe(http, Instance.from_eureka(_instance("order-service", port)))
    finally:
        await runner.cleanup()
    assert probe == Probe(
        "DEGRADED" if status == 200 else "DOWN", {"breaker:inventory-service": _BREAKER}
    )


# What an order instance's /metrics says (docs/observability.md), RED per route and all.
ORDER_METRICS = """\
# HELP shop_http_requests_total Requests
# TYPE shop_http_requests_total counter
shop_http_requests_total{method="POST",route="/api/order",status="201"} 12.0
# HELP shop_orders_placed_total Orders placed
# TYPE shop_orders_placed_total counter
shop_orders_placed_total 42.0
shop_orders_placed_created 1.7e+09
# HELP shop_breaker_state Circuit breaker state (1 = the current one)
# TYPE shop_breaker_state gauge
shop_breaker_state{peer="inventory-service",service="order-service",state="closed"} 0.0
shop_breaker_state{peer="inventory-service",service="order-service",state="open"} 1.0
shop_breaker_state{peer="inventory-service",service="order-service",state="half-open"} 0.0
# HELP shop_outbox_backlog Events not yet published
# TYPE shop_outbox_backlog gauge
shop_outbox_backlog{service="order-service"} 7.0
# HELP shop_outbox_oldest_age_seconds Age of the oldest
# TYPE shop_outbox_oldest_age_seconds gauge
shop_outbox_oldest_age_seconds{service="order-service"} 3.5
# HELP shop_event_consumer_lag Events after the committed offset
# TYPE shop_event_consumer_lag gauge
shop_event_consumer_lag{group="order-service",service="order-service",topic="products"} 2.0
"""


def test_the_vitals_are_read_from_prometheus_text() -> None:
    assert parse_vitals(ORDER_METRICS) == Vitals(
        breaker={"inventory-service": "open"},
        outbox_backlog=7.0,
        outbox_oldest_age_s=3.5,
        consumer_lag={"order-service:products": 2.0},
        orders_placed=42.0,
    )


def test_a_process_without_those_metrics_has_no_vitals() -> None:
    assert parse_vitals("# TYPE up gauge\nup 1.0\n") == Vitals()


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        ({"/metrics": (200, ORDER_METRICS)}, parse_vitals(ORDER_METRICS)),
        # The gateway: no /metrics on its port (404 at the edge).
        ({}, Vitals()),
        # Not Prometheus text at all.
        ({"/metrics": (200, "<html>hello</html>")}, Vitals()),
    ],
)
async def test_each_instance_metrics_are_read_from_its_own_port(
    routes: dict[str, tuple[int, object]], expected: Vitals
) -> None:
    runner, port = await _serving(routes)
    try:
        async with aiohttp.ClientSession() as http:
            instance = Instance.from_eureka(_instance("order-service", port))
            assert await _vitals(http, instance) == expected
    finally:
        await runner.cleanup()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_orders_per_second_come_from_two_successive_readings() -> None:
    clock = Clock()
    rates = OrderRates(min_interval_s=1.0, clock=clock)
    assert rates.update("a", 10.0) is None  # one reading: no rate yet
    clock.now += 2.0
    assert rates.update("a", 30.0) == 10.0
    # A second console polling right after: the last rate, not a division by ~0.
    clock.now += 0.01
    assert rates.update("a", 30.0) == 10.0
    clock.now += 4.0
    assert rates.update("a", 30.0) == 0.0
    # The instance restarted (the counter went down): start over.
    clock.now += 3.0
    assert rates.update("a", 1.0) is None
    clock.now += 1.0
    assert rates.update("a", 4.0) == 3.0
    # No counter (a service that places no orders): no rate.
    assert rates.update("b", None) is None


def test_rates_of_instances_gone_from_the_registry_are_forgotten() -> None:
    clock = Clock()
    rates = OrderRates(clock=clock)
    rates.update("a", 1.0)
    rates.update("b", 1.0)
    rates.forget_all_but({"b"})
    clock.now += 2.0
    assert rates.update("a", 5.0) is None
    assert rates.update("b", 5.0) == 2.0
