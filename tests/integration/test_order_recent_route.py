"""The order service's ``GET /operations/recent-orders`` on its own port: what the console
shows as recent orders. The real app (SQLite, the lean order path) with the in-process
peers of tests/integration/test_order_api.py."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from shop.gateway.domain import Access, public_route_table
from shop.order.app import build_app
from shop.order.settings import OrderSettings
from shop.platform.settings import PlatformSettings
from shop.platform.tokens import JwksVerifier
from tests.integration.test_order_api import FakeServiceTokens, _jwks, _user, open_peers

PATH = "/operations/recent-orders"


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def order_service(
    tmp_path: Path, signing_key: rsa.RSAPrivateKey
) -> AsyncIterator[httpx.AsyncClient]:
    async with open_peers(signing_key) as peers:
        app = build_app(
            platform=PlatformSettings(data_dir=tmp_path, registry_url=peers.registry.url),
            settings=OrderSettings(_env_file=None),
        )
        async with app.router.lifespan_context(app):
            app.state.runtime.tokens = JwksVerifier(
                fetch_jwks=_jwks(signing_key), issuer="shop-auth", audience="shop"
            )
            app.state.runtime.service_tokens = FakeServiceTokens(peers.service_token)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://order") as client:
                yield client


async def _recent(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    answer = await client.get(PATH)
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    body: list[dict[str, Any]] = answer.json()
    return body


async def test_placed_and_cancelled_orders_are_listed_with_their_requests_trace(
    order_service: httpx.AsyncClient, signing_key: rsa.RSAPrivateKey
) -> None:
    ada = _user(signing_key, "ada")
    assert await _recent(order_service) == []
    traces = [secrets.token_hex(16) for _ in range(3)]

    def traced(trace_id: str) -> dict[str, str]:
        return {**ada.headers, "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}

    lines = {"orderLineItemDtoList": [{"skuCode": "pixel_8", "quantity": 2}]}
    placed = await order_service.post("/api/order", json=lines, headers=traced(traces[0]))
    assert placed.status_code == 201, placed.text
    refused = {"orderLineItemDtoList": [{"skuCode": "pixel_8", "quantity": 10_000}]}
    assert (await order_service.post("/api/order", json=refused, headers=ada.headers)).is_error
    number = placed.json()["orderNumber"]
    cancelled = await order_service.post(f"/api/order/{number}/cancel", headers=traced(traces[1]))
    assert cancelled.status_code == 200, cancelled.text

    cancel, place = await _recent(order_service)  # a refused order is not one
    assert place == {
        "orderNumber": number,
        "status": "PLACED",
        "total": placed.json()["total"],
        "lines": 1,
        "at": placed.json()["createdAt"],
        "traceId": traces[0],
    }
    assert (cancel["orderNumber"], cancel["status"], cancel["traceId"]) == (
        number,
        "CANCELLED",
        traces[1],
    )
    assert cancel["at"] >= place["at"]
    # Nothing that names the buyer.
    text = (await order_service.get(PATH)).text
    assert ada.user_id not in text and ada.email not in text


async def test_the_list_is_not_in_the_public_api(order_service: httpx.AsyncClient) -> None:
    document = (await order_service.get("/openapi.json")).json()
    assert PATH not in document["paths"]
    # The gateway routes no such path: it is reachable on the service's own port only.
    routes = public_route_table(dashboard_access=Access.ADMIN)
    assert routes.resolve(PATH) is None
