"""What an operator sees of the order service: business counters and breaker state on
/metrics, and /health saying DEGRADED while the inventory's breaker is open.

Same in-process peers as test_order_api.py; the breaker runs on a clock the test moves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from shop.order.app import build_app
from shop.order.settings import OrderSettings
from shop.platform.settings import PlatformSettings
from shop.platform.tokens import JwksVerifier
from tests.integration.test_order_api import (
    BREAKER_OPEN_S,
    BREAKER_THRESHOLD,
    INVENTORY_TIMEOUT_S,
    FakeServiceTokens,
    Peers,
    User,
    _jwks,
    _user,
    open_peers,
)
from tests.prometheus import metric
from tests.support import ManualClock


class Observed:
    def __init__(self, client: httpx.AsyncClient, peers: Peers, clock: ManualClock) -> None:
        self.client = client
        self.peers = peers
        self.clock = clock

    async def place(self, user: User, sku: str, quantity: int = 1) -> httpx.Response:
        body = {"orderLineItemDtoList": [{"skuCode": sku, "quantity": quantity}]}
        return await self.client.post("/api/order", json=body, headers=user.headers)

    async def metric(self, name: str, **labels: str) -> float | None:
        return await metric(self.client, name, **labels)

    async def health(self) -> dict[str, Any]:
        answer = await self.client.get("/health")
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body


@pytest.fixture
async def observed(tmp_path: Path, signing_key: rsa.RSAPrivateKey) -> AsyncIterator[Observed]:
    clock = ManualClock(1000.0)
    async with open_peers(signing_key) as peers:
        app = build_app(
            platform=PlatformSettings(data_dir=tmp_path, registry_url=peers.registry.url),
            settings=OrderSettings(
                _env_file=None,
                inventory_timeout_s=INVENTORY_TIMEOUT_S,
                breaker_failure_threshold=BREAKER_THRESHOLD,
                breaker_open_s=BREAKER_OPEN_S,
            ),
            clock=clock,
        )
        async with app.router.lifespan_context(app):
            app.state.runtime.tokens = JwksVerifier(
                fetch_jwks=_jwks(signing_key), issuer="shop-auth", audience="shop"
            )
            app.state.runtime.service_tokens = FakeServiceTokens(peers.service_token)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://order") as client:
                yield Observed(client, peers, clock)


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


async def test_placed_and_refused_orders_are_counted_by_reason(
    observed: Observed, signing_key: rsa.RSAPrivateKey
) -> None:
    ada = _user(signing_key, "ada")
    assert await observed.metric("shop_orders_placed_total") == 0
    assert (await observed.place(ada, "pixel_8")).status_code == 201
    assert (await observed.place(ada, "pixel_8", quantity=50)).status_code == 409
    assert (await observed.place(ada, "pixel_8", quantity=0)).status_code == 422

    assert await observed.metric("shop_orders_placed_total") == 1
    assert await observed.metric("shop_orders_refused_total", reason="out_of_stock") == 1
    assert await observed.metric("shop_orders_refused_total", reason="invalid") == 1


async def test_an_open_breaker_shows_on_metrics_and_health_until_it_closes(
    observed: Observed, signing_key: rsa.RSAPrivateKey
) -> None:
    ada = _user(signing_key, "ada")
    breaker = {"service": "order-service", "peer": "inventory-service"}
    assert await observed.metric("shop_breaker_state", **breaker, state="closed") == 1
    assert (await observed.health())["status"] == "UP"

    observed.peers.inventory.failing = True
    for _ in range(BREAKER_THRESHOLD):
        assert (await observed.place(ada, "pixel_8")).status_code == 503
    assert (await observed.place(ada, "pixel_8")).status_code == 503  # refused at once

    assert await observed.metric("shop_breaker_state", **breaker, state="open") == 1
    assert await observed.metric("shop_breaker_state", **breaker, state="closed") == 0
    assert await observed.metric("shop_breaker_transitions_total", **breaker, to="open") == 1
    assert await observed.metric("shop_orders_refused_total", reason="circuit_open") == 1
    health = await observed.health()
    assert health["status"] == "DEGRADED"
    assert health["checks"]["breaker:inventory-service"] == "DEGRADED"
    assert "open" in health["reasons"]["breaker:inventory-service"]
    assert health["checks"]["database"] == "UP"
    # Still ready: the service answers, it is its dependency that fails.
    assert (await observed.client.get("/health/ready")).status_code == 200

    observed.peers.inventory.failing = False
    observed.clock.advance(BREAKER_OPEN_S)
    assert await observed.metric("shop_breaker_state", **breaker, state="half-open") == 1
    assert (await observed.place(ada, "pixel_8")).status_code == 201  # the probe

    assert await observed.metric("shop_breaker_state", **breaker, state="closed") == 1
    assert await observed.metric("shop_breaker_transitions_total", **breaker, to="closed") == 1
    assert await observed.metric("shop_breaker_transitions_total", **breaker, to="half-open") == 1
    assert await observed.health() == {
        "status": "UP",
        "checks": {
            "database": "UP",
            "events": "UP",
            "breaker:inventory-service": "UP",
            "outbox": "UP",
            "consumer:order-service:products": "UP",
        },
        "reasons": {},
    }
