"""The console's parts: which paths the gateway keeps for itself, the registry's answer
read in both of Eureka's JSON shapes, the health word (and reasons) shown for each instance,
the vitals read from its Prometheus text, the orders/s computed from two readings, the recent
orders of every order instance merged and linked to their traces, and the trace UI setting."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web

from shop.gateway.console import (
    RECENT_ORDERS_SHOWN,
    OrderRates,
    Probe,
    RecentOrder,
    Vitals,
    _probe,
    _recent,
    _recent_order,
    _registered,
    _vitals,
    parse_vitals,
    recent_orders,
    serves,
)
from shop.gateway.settings import GatewaySettings
from shop.platform.discovery import Instance
from shop.platform.settings import SettingsRefused, load_settings
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


# --- recent orders -----------------------------------------------------------------------


def _entry(number: int, at: str, trace_id: object = None) -> dict[str, object]:
    return {
        "orderNumber": f"00000000-0000-4000-8000-{number:012d}",
        "status": "PLACED",
        "total": "19.98",
        "lines": 1,
        "at": at,
        "traceId": trace_id,
    }


TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
ZIPKIN = "http://127.0.0.1:9411/zipkin/traces/{traceId}"


async def _recent_of(app: str, routes: dict[str, tuple[int, object]]) -> list[dict[str, object]]:
    runner, port = await _serving(routes)
    try:
        async with aiohttp.ClientSession() as http:
            found = await _recent(http, Instance.from_eureka(_instance(app, port)))
    finally:
        await runner.cleanup()
    return recent_orders([found], trace_url=lambda t: ZIPKIN.replace("{traceId}", t))


async def test_an_order_instances_recent_orders_are_read_with_links_to_their_traces() -> None:
    answer = [_entry(2, "2026-12-01T10:00:02.000Z", TRACE), _entry(1, "2026-12-01T10:00:01.000Z")]
    [second, first] = await _recent_of(
        "order-service", {"/operations/recent-orders": (200, answer)}
    )
    assert second["traceId"] == TRACE
    assert second["traceUrl"] == f"http://127.0.0.1:9411/zipkin/traces/{TRACE}"
    assert str(second["instance"]).startswith("127.0.0.1:order-service:")
    # No trace id, no link.
    assert (first["traceId"], first["traceUrl"]) == (None, None)


@pytest.mark.parametrize(
    "bad",
    [
        {"traceId": "javascript:alert(1)"},  # not a trace id: never put into a link
        {"traceId": "4BF92F3577B34DA6A3CE929D0E0E4736 "},
        {"traceId": 42},
    ],
)
async def test_what_is_not_a_trace_id_gets_no_link(bad: dict[str, object]) -> None:
    answer = [{**_entry(1, "2026-12-01T10:00:01.000Z"), **bad}]
    [only] = await _recent_of("order-service", {"/operations/recent-orders": (200, answer)})
    assert (only["traceId"], only["traceUrl"]) == (None, None)


@pytest.mark.parametrize(
    ("app", "routes"),
    [
        # Another service is not asked (it has no such list).
        ("inventory-service", {"/operations/recent-orders": (200, [_entry(1, "x", TRACE)])}),
        # An order instance without the route (an older version), or answering nonsense.
        ("order-service", {}),
        ("order-service", {"/operations/recent-orders": (200, {"orders": []})}),
        ("order-service", {"/operations/recent-orders": (200, [{"orderNumber": 1}, "x"])}),
    ],
)
async def test_no_list_means_no_recent_orders(
    app: str, routes: dict[str, tuple[int, object]]
) -> None:
    assert await _recent_of(app, routes) == []


def _read(number: int, instance: str) -> RecentOrder:
    entry = _recent_order(_entry(number, f"2026-12-01T10:00:{number:02d}.000Z", TRACE), instance)
    assert entry is not None
    return entry


def test_the_instances_lists_merge_newest_first_and_the_latest_few_are_shown() -> None:
    a = [_read(n, "a") for n in range(0, 40, 2)]
    b = [_read(n, "b") for n in range(1, 40, 2)]
    shown = recent_orders([a, b], trace_url=lambda _t: None)
    assert len(shown) == RECENT_ORDERS_SHOWN == 20
    assert [o["at"] for o in shown] == [f"2026-12-01T10:00:{n:02d}.000Z" for n in range(39, 19, -1)]
    assert {o["instance"] for o in shown} == {"a", "b"}
    # Without a trace UI the trace id is still there, as text.
    assert all(o["traceId"] == TRACE and o["traceUrl"] is None for o in shown)


# --- the trace UI setting ----------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        ZIPKIN,
        "https://jaeger.example.com/trace/{traceId}",
        'https://grafana.example.com/explore?left={"queries":[{"query":"{traceId}"}]}',
    ],
)
def test_a_trace_ui_is_linked_by_its_template(
    monkeypatch: pytest.MonkeyPatch, template: str
) -> None:
    monkeypatch.setenv("GATEWAY_TRACE_URL_TEMPLATE", template)
    _platform, settings = load_settings(GatewaySettings)
    assert settings.trace_url(TRACE) == template.replace("{traceId}", TRACE)


@pytest.mark.parametrize("unset", [None, "", "  "])
def test_without_a_trace_ui_there_is_no_link(
    monkeypatch: pytest.MonkeyPatch, unset: str | None
) -> None:
    if unset is None:
        monkeypatch.delenv("GATEWAY_TRACE_URL_TEMPLATE", raising=False)
    else:
        monkeypatch.setenv("GATEWAY_TRACE_URL_TEMPLATE", unset)
    _platform, settings = load_settings(GatewaySettings)
    assert settings.trace_url(TRACE) is None


@pytest.mark.parametrize(
    "template",
    [
        "http://127.0.0.1:9411/zipkin/traces/",  # no {traceId}
        "http://127.0.0.1:9411/zipkin/traces/{traceid}",
        "javascript:alert('{traceId}')",
        "ftp://traces.example.com/{traceId}",
        "/zipkin/traces/{traceId}",  # no host
        "http://[::1/{traceId}",
        "http://zipkin:9411/traces/{traceId} x",
    ],
)
def test_a_bad_trace_ui_template_stops_the_gateway_with_one_line(
    monkeypatch: pytest.MonkeyPatch, template: str
) -> None:
    monkeypatch.setenv("GATEWAY_TRACE_URL_TEMPLATE", template)
    with pytest.raises(SettingsRefused) as refused:
        load_settings(GatewaySettings)
    message = str(refused.value)
    assert message.startswith(
        "GATEWAY_TRACE_URL_TEMPLATE: give an http(s) URL containing {traceId}"
    )
    assert "\n" not in message
