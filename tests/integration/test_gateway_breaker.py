"""Fast, honest failure at the gateway (issue 11): a frozen service costs its callers the
route's timeout a few times, then its circuit opens and they get 503 with ``Retry-After``
in milliseconds, nothing reaching the service, until one probe finds it answering again.

The frozen service is an in-test HTTP server that accepts connections and reads requests
but does not answer while frozen, as a SIGSTOPped process looks to its callers (the kernel
still accepts connections for it). The gateway is real (uvicorn, its fast lane), and so are
the registry stand-in and the other services around it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from shop.gateway.settings import GatewaySettings
from shop.platform.settings import SettingsRefused, load_settings
from tests.fakes import FakeRegistry
from tests.integration.test_gateway import (
    PROBLEM,
    Gateway,
    SigningKey,
    Upstream,
    bearer,
    mint,
    running_gateway,
    started,
)
from tests.support import ManualClock, free_port

THRESHOLD = 3
OPEN_S = 30.0  # the test moves the breakers' clock: nothing waits for it
INVENTORY_TIMEOUT_S = 0.6  # GET /api/inventory, set per route
READ_TIMEOUT_S = 0.4  # every other read


class FreezableService:
    """Answers ``{"service": name}``; while frozen, reads each request and never answers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.reached = 0
        self.port = free_port()
        self._thawed = asyncio.Event()
        self._thawed.set()
        self._arrivals = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    async def reaching(self, count: int) -> None:
        """Until ``count`` requests in all have reached it."""
        async with self._arrivals:
            await self._arrivals.wait_for(lambda: self.reached >= count)

    def freeze(self) -> None:
        self._thawed.clear()

    def thaw(self) -> None:
        self._thawed.set()

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        async with self._arrivals:
            self.reached += 1
            self._arrivals.notify_all()
        await self._thawed.wait()
        return web.json_response({"service": self.name})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        # No shutdown wait for handlers still hanging at the end of a test.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        self.thaw()
        if self._runner is not None:
            await self._runner.cleanup()


@dataclass
class Edge:
    gateway: Gateway
    http: aiohttp.ClientSession
    inventory: FreezableService
    product: FreezableService
    token: str
    clock: ManualClock

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any, bytes, float]:
        """Status, headers, body and the seconds the caller waited."""
        began = time.monotonic()
        async with self.http.request(method, self.gateway.url + path, **kwargs) as resp:
            body = await resp.read()
            return resp.status, resp.headers, body, time.monotonic() - began

    async def stock(self) -> tuple[int, Any, bytes, float]:
        return await self.call("GET", "/api/inventory", headers=bearer(self.token))

    async def health(self) -> dict[str, Any]:
        status, _, body, _ = await self.call("GET", "/health")
        assert status == 200
        answer: dict[str, Any] = json.loads(body)
        return answer

    async def breaker_state(self, peer: str) -> str:
        _, _, body, _ = await self.call("GET", "/metrics")
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                labels = sample.labels
                if (
                    sample.name == "shop_breaker_state"
                    and (labels["service"], labels["peer"]) == ("api-gateway", peer)
                    and sample.value == 1.0
                ):
                    return labels["state"]
        raise AssertionError(f"no breaker state for {peer}")


@pytest.fixture
async def edge() -> AsyncIterator[Edge]:
    key = SigningKey("k1")
    auth = Upstream("auth-service")
    auth.jwks = [key]
    inventory = FreezableService("inventory-service")
    product = FreezableService("product-service")
    async with started(auth, inventory, product):  # type: ignore[arg-type]
        registry = FakeRegistry(
            {
                "auth-service": [auth.port],
                "inventory-service": [inventory.port],
                "product-service": [product.port],
            }
        )
        async with (
            started(registry),
            running_gateway(
                registry,
                public_operations=True,
                upstream_timeout_s=READ_TIMEOUT_S,
                route_timeouts={"GET /api/inventory": INVENTORY_TIMEOUT_S},
                breaker_failure_threshold=THRESHOLD,
                breaker_open_s=OPEN_S,
            ) as gateway,
            aiohttp.ClientSession() as http,
        ):
            clock = ManualClock()
            gateway.app.state.gateway.breakers.clock = clock
            yield Edge(gateway, http, inventory, product, mint(key), clock)


async def test_a_frozen_service_costs_its_timeout_a_few_times_then_milliseconds(
    edge: Edge,
) -> None:
    status, _, _, _ = await edge.stock()
    assert status == 200
    assert (await edge.health())["status"] == "UP"

    edge.inventory.freeze()
    for _ in range(THRESHOLD):
        status, headers, body, waited = await edge.stock()
        assert status == 504, body
        assert headers["Content-Type"] == PROBLEM
        # The route's own timeout, not the reads' nor the old gateway-wide 10 s.
        assert INVENTORY_TIMEOUT_S - 0.05 <= waited < INVENTORY_TIMEOUT_S + 1.0
    assert edge.inventory.reached == 1 + THRESHOLD

    # Open: answered at once, honestly, and nothing reaches the frozen service.
    for _ in range(20):
        status, headers, body, waited = await edge.stock()
        assert status == 503, body
        assert headers["Content-Type"] == PROBLEM
        assert int(headers["Retry-After"]) == OPEN_S
        assert "circuit open" in json.loads(body)["detail"]
        assert waited < INVENTORY_TIMEOUT_S / 2
    assert edge.inventory.reached == 1 + THRESHOLD
    edge.clock.advance(OPEN_S / 2)
    _, headers, _, _ = await edge.stock()
    assert int(headers["Retry-After"]) == OPEN_S / 2

    # The gateway says so; other services are served as before.
    health = await edge.health()
    assert health["status"] == "DEGRADED"
    assert "inventory-service" in health["reasons"]["breaker:inventory-service"]
    assert health["checks"]["breaker:inventory-service"] == "DEGRADED"
    assert await edge.breaker_state("inventory-service") == "open"
    status, _, _, _ = await edge.call("GET", "/api/product")
    assert status == 200

    # Time up, the service back: one probe goes through and closes the circuit.
    edge.inventory.thaw()
    edge.clock.advance(OPEN_S / 2)
    assert await edge.breaker_state("inventory-service") == "half-open"
    status, _, body, _ = await edge.stock()
    assert (status, json.loads(body)) == (200, {"service": "inventory-service"})
    assert await edge.breaker_state("inventory-service") == "closed"
    assert (await edge.health())["status"] == "UP"
    status, _, _, _ = await edge.stock()
    assert status == 200


async def test_a_failed_probe_opens_the_circuit_for_another_period(edge: Edge) -> None:
    edge.inventory.freeze()
    for _ in range(THRESHOLD):
        status, _, _, _ = await edge.stock()
        assert status == 504
    edge.clock.advance(OPEN_S)
    # The probe waits its timeout; meanwhile the others are told to come back shortly.
    probe = asyncio.create_task(edge.stock())
    await edge.inventory.reaching(1 + THRESHOLD)
    status, headers, _, waited = await edge.stock()
    assert status == 503 and int(headers["Retry-After"]) == 1
    assert waited < INVENTORY_TIMEOUT_S / 2
    status, _, _, _ = await probe
    assert status == 504
    status, headers, _, _ = await edge.stock()
    assert status == 503 and int(headers["Retry-After"]) == OPEN_S
    assert edge.inventory.reached == 1 + THRESHOLD
    edge.inventory.thaw()


async def test_the_fast_lane_stops_sending_to_a_frozen_service(edge: Edge) -> None:
    # Public catalogue reads take the fast lane once a kept-alive connection is idle.
    for _ in range(3):
        status, _, _, _ = await edge.call("GET", "/api/product")
        assert status == 200
    reached = edge.product.reached
    edge.product.freeze()
    for _ in range(THRESHOLD):
        status, _, _, waited = await edge.call("GET", "/api/product")
        assert status == 504
        assert READ_TIMEOUT_S - 0.05 <= waited < READ_TIMEOUT_S + 1.0
    for _ in range(10):
        status, headers, _, waited = await edge.call("GET", "/api/product")
        assert status == 503 and "Retry-After" in headers
        assert waited < READ_TIMEOUT_S / 2
    assert edge.product.reached == reached + THRESHOLD
    edge.product.thaw()


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("GATEWAY_UPSTREAM_TIMEOUT_S", "0", "GATEWAY_UPSTREAM_TIMEOUT_S"),
        ("GATEWAY_ORDER_TIMEOUT_S", "-1", "GATEWAY_ORDER_TIMEOUT_S"),
        ("GATEWAY_ROUTE_TIMEOUTS", '{"GET /api/orders": 3}', "names no routed method and route"),
        ("GATEWAY_ROUTE_TIMEOUTS", '{"DELETE /api/order": 3}', "names no routed method"),
        ("GATEWAY_ROUTE_TIMEOUTS", '{"POST /api/order": 0}', "more than 0 and at most 600"),
        ("GATEWAY_BREAKER_FAILURE_THRESHOLD", "0", "GATEWAY_BREAKER_FAILURE_THRESHOLD"),
    ],
)
def test_a_bad_timeout_or_breaker_setting_stops_the_gateway_with_one_line(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, says: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsRefused) as refused:
        load_settings(GatewaySettings)
    message = str(refused.value)
    assert "\n" not in message
    assert says in message
    assert name in message
