"""Scenario 4: inventory frozen (SIGSTOP, a hung process: connections accepted, nothing
answered) until the order service's breaker opens, then thawed (SIGCONT); then killed
(SIGKILL) and restarted by the supervisor. Each time orders succeed again within one
breaker window of inventory being back (issue 11's target), and the books balance: what
timed out while it was frozen is given back."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from tests.chaos.conftest import OUTAGE_S, trials
from tests.chaos.ledger import Ledger
from tests.chaos.load import Buyers, stock_new_product
from tests.chaos.shop import BREAKER_OPEN_S, RELEASE_HOLD_S, ChaosShop

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

STOCK = 1_000_000
BUYERS = 6
PATIENCE_S = 60.0
# One order's own time on a loaded two-core machine, on top of the window.
ONE_ORDER_S = 1.5
PACE_S = 0.1  # a client retrying ten times a second


@pytest.mark.parametrize("trial", trials())
async def test_orders_succeed_within_a_breaker_window_after_a_frozen_then_killed_inventory(
    shop: ChaosShop, gateway: httpx.AsyncClient, tokens: list[str], ledger: Ledger, trial: int
) -> None:
    sku = await stock_new_product(gateway, shop.admin_password, units=STOCK)
    buyers = Buyers(gateway, tokens, sku)
    burst = asyncio.create_task(buyers.run(BUYERS))
    frozen = shop.kill("inventory", signal.SIGSTOP)
    try:
        await asyncio.wait_for(buyers.circuit_open.wait(), PATIENCE_S)
        await asyncio.sleep(OUTAGE_S)  # the planned freeze, breaker open
    finally:
        os.kill(frozen, signal.SIGCONT)
        buyers.stop()
        await burst
    thawed_s = await buyers.first_success_after(tokens[0], pace_s=PACE_S, within_s=PATIENCE_S)
    assert thawed_s <= BREAKER_OPEN_S + ONE_ORDER_S, thawed_s

    # Killed: the supervisor starts it again; orders meanwhile open the breaker.
    ready = shop.ready_count("inventory")
    again = Buyers(gateway, tokens, sku)
    burst = asyncio.create_task(again.run(BUYERS))
    try:
        shop.kill("inventory")
        back = await asyncio.to_thread(shop.wait_ready, "inventory", count=ready + 1)
    finally:
        again.stop()
        await burst
    waited_s = time.monotonic() - back
    restarted_s = waited_s + await again.first_success_after(
        tokens[0], pace_s=PACE_S, within_s=PATIENCE_S
    )
    assert restarted_s <= BREAKER_OPEN_S + ONE_ORDER_S, restarted_s
    shop.assert_running()

    created = {**buyers.created, **again.created}
    books = await ledger.settled_books(
        sku, stocked=STOCK, created=created, within_s=RELEASE_HOLD_S + 30
    )
    assert books.problems(created) == [], (dict(buyers.statuses), dict(again.statuses))
    print(
        f"trial {trial}: orders again {thawed_s:.2f} s after the thaw and {restarted_s:.2f} s"
        f" after the restart (window {BREAKER_OPEN_S:g} s); {len(books.placed)} orders;"
        f" answers frozen {dict(buyers.statuses)}, killed {dict(again.statuses)}"
    )
