"""`make up` survives a kill -9 of any of its services (issue 11, "Done when"): each process
of the Shop in turn is killed with SIGKILL, the supervisor starts it again on its port, and
the whole flow works again through the gateway: the storefront and the catalogue, a log-in,
an order placed and its notification recorded. The other processes are never restarted."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

from tests.chaos.load import PASSWORD, bearer, stock_new_product
from tests.chaos.shop import ChaosShop

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

# Every process `shop up` runs (the launcher's names), killed in this order.
EVERY_SERVICE = (
    "registry",
    "gateway",
    "auth",
    "product",
    "inventory",
    "order",
    "notification",
    "web",
)
PATIENCE_S = 60.0
PACE_S = 0.1


async def _serves_the_whole_flow(
    gateway: httpx.AsyncClient, email: str, sku: str, *, within_s: float
) -> float:
    """Retry the flow until every step of it works once, start to end: seconds it took."""
    began = time.monotonic()
    last = "nothing tried"
    while time.monotonic() - began < within_s:
        try:
            last = await _flow(gateway, email, sku)
            if not last:
                return time.monotonic() - began
        except httpx.HTTPError as exc:  # the gateway itself may be the one restarting
            last = repr(exc)
        await asyncio.sleep(PACE_S)
    raise AssertionError(f"the flow did not work again within {within_s:g} s: {last}")


async def _flow(gateway: httpx.AsyncClient, email: str, sku: str) -> str:
    """One pass of the flow; "" when it all worked, else what did not."""
    page = await gateway.get("/")
    if page.status_code != 200:
        return f"storefront: {page.status_code}"
    found = await gateway.get("/api/product", params={"q": sku})
    if found.status_code != 200 or not found.json():
        return f"catalogue: {found.status_code} {found.text[:200]}"
    login = await gateway.post("/auth/token", json={"email": email, "password": PASSWORD})
    if login.status_code != 200:
        return f"log-in: {login.status_code} {login.text[:200]}"
    token = bearer(login.json()["access_token"])
    body = {"orderLineItemDtoList": [{"skuCode": sku, "quantity": 1}]}
    placed = await gateway.post("/api/order", headers=token, json=body)
    if placed.status_code != 201:
        return f"order: {placed.status_code} {placed.text[:200]}"
    number = placed.json()["orderNumber"]
    deadline = time.monotonic() + PATIENCE_S
    while time.monotonic() < deadline:
        mine = await gateway.get(
            "/api/notifications", params={"orderNumber": number}, headers=token
        )
        if mine.status_code == 200 and mine.json():
            return ""
        await asyncio.sleep(PACE_S)
    return f"no notification for {number} within {PATIENCE_S:g} s"


async def test_the_shop_serves_again_after_each_of_its_services_is_killed(
    shop: ChaosShop, gateway: httpx.AsyncClient
) -> None:
    assert set(EVERY_SERVICE) <= set(shop.names()), shop.names()
    sku = await stock_new_product(gateway, shop.admin_password, units=1_000)
    email = await _an_email(gateway)
    await _serves_the_whole_flow(gateway, email, sku, within_s=PATIENCE_S)
    for name in EVERY_SERVICE:
        others = {n: shop.pid(n) for n in EVERY_SERVICE if n != name}
        ready = shop.ready_count(name)
        killed = shop.kill(name)
        await asyncio.to_thread(shop.wait_ready, name, count=ready + 1, within_s=PATIENCE_S)
        assert shop.pid(name) != killed
        took = await _serves_the_whole_flow(gateway, email, sku, within_s=PATIENCE_S)
        shop.assert_running()
        assert {n: shop.pid(n) for n in others} == others, "only the killed one restarts"
        print(f"{name} killed: the whole flow worked again {took:.1f} s after it was ready")


async def _an_email(gateway: httpx.AsyncClient) -> str:
    """A customer of this test (registered here: the log-in is part of the flow)."""
    email = f"anykill-{uuid.uuid4().hex[:8]}@example.com"
    body = {"name": "Any Kill", "email": email, "password": PASSWORD}
    answer = await gateway.post("/auth/register", json=body)
    assert answer.status_code == 201, answer.text
    return email
