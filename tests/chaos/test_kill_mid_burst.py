"""Scenario 1: inventory and order killed with SIGKILL in the middle of a burst of concurrent
orders for the last units of a product, under ``shop up``'s supervisor (it restarts them).

Whatever was in flight: no unit sold twice, stock never below zero, every order answered
201 is placed with its reservation, every reservation belongs to a placed order (one whose
order service died before saving it is given back after the release hold), and each
placed order is notified exactly once."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.chaos.conftest import trials
from tests.chaos.ledger import Ledger, notification_problems
from tests.chaos.load import Buyers, stock_new_product
from tests.chaos.shop import RELEASE_HOLD_S, ChaosShop

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

STOCK = 60
BUYERS = 8
QUANTITIES = (1, 2, 3)
PATIENCE_S = 60.0


@pytest.mark.parametrize("trial", trials())
async def test_no_oversell_with_inventory_and_order_killed_mid_burst(
    shop: ChaosShop, gateway: httpx.AsyncClient, tokens: list[str], ledger: Ledger, trial: int
) -> None:
    sku = await stock_new_product(gateway, shop.admin_password, units=STOCK)
    buyers = Buyers(gateway, tokens, sku, quantities=QUANTITIES, until_sold_out=True)
    burst = asyncio.create_task(buyers.run(BUYERS))
    try:
        await buyers.reached(3, within_s=PATIENCE_S)
        victims = ("inventory", "order")
        ready = {name: shop.ready_count(name) for name in victims}
        killed = {name: shop.kill(name) for name in victims[:1]}
        if trial % 2 == 0:  # every other trial both at once, else one after the other
            killed["order"] = shop.kill("order")
        else:
            await asyncio.to_thread(shop.wait_ready, "inventory", count=ready["inventory"] + 1)
            await buyers.reached(buyers.successes + 2, within_s=PATIENCE_S)
            killed["order"] = shop.kill("order")
        for name in victims:
            await asyncio.to_thread(shop.wait_ready, name, count=ready[name] + 1)
            assert shop.pid(name) != killed[name]
        # The burst goes on until the inventory says nothing is left, or for a while (not
        # sold out in time: the books must balance all the same).
        await asyncio.wait([asyncio.create_task(buyers.sold_out.wait())], timeout=PATIENCE_S)
    finally:
        buyers.stop()
        await burst
    shop.assert_running()

    books = await ledger.settled_books(
        sku, stocked=STOCK, created=buyers.created, within_s=RELEASE_HOLD_S + 30
    )
    assert books.problems(buyers.created) == [], dict(buyers.statuses)
    placed, told = await ledger.settled_notifications([sku], within_s=PATIENCE_S)
    assert notification_problems(placed, told, buyers.created) == []
    print(
        f"trial {trial}: {sum(books.placed.values())} of {STOCK} units sold in"
        f" {len(books.placed)} orders ({len(buyers.created)} answered 201), {books.left} left;"
        f" answers {dict(buyers.statuses)}"
    )
