"""Scenario 2: notification and order killed with SIGKILL mid-burst while the embedded event
log is locked (a write transaction held on ``events.db`` by the test, as a stuck process
or a backup would): every placed order is notified exactly once after recovery."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from shop.platform.db import SQLITE_BUSY_PATIENCE_S
from tests.chaos.conftest import OUTAGE_S, trials
from tests.chaos.ledger import Ledger, notification_problems
from tests.chaos.load import Buyers, stock_new_product
from tests.chaos.shop import ChaosShop

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

BUYERS = 6
PATIENCE_S = 60.0


@contextlib.asynccontextmanager
async def write_locked(database: Path) -> AsyncIterator[None]:
    """Every other writer of ``database`` waits (or gives up) until the block ends."""
    db = sqlite3.connect(database, timeout=30, isolation_level=None, check_same_thread=False)
    try:
        await asyncio.to_thread(db.execute, "BEGIN IMMEDIATE")
        try:
            yield
        finally:
            await asyncio.to_thread(db.execute, "ROLLBACK")
    finally:
        db.close()


@pytest.mark.parametrize("trial", trials())
async def test_one_notification_per_order_with_notification_and_order_killed_and_the_log_locked(
    shop: ChaosShop, gateway: httpx.AsyncClient, tokens: list[str], ledger: Ledger, trial: int
) -> None:
    sku = await stock_new_product(gateway, shop.admin_password, units=1_000_000)
    buyers = Buyers(gateway, tokens, sku, quantities=(1, 2))
    burst = asyncio.create_task(buyers.run(BUYERS))
    ready = {name: shop.ready_count(name) for name in ("notification", "order")}
    try:
        await buyers.reached(5, within_s=PATIENCE_S)
        shop.kill("notification")
        async with write_locked(shop.system.data_dir / "events.db"):
            locked = time.monotonic()
            # Orders go on while the log is locked: their events wait in the order outbox.
            await buyers.reached(buyers.successes + 3, within_s=PATIENCE_S)
            shop.kill("order")
            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - locked)))
        for name in ("notification", "order"):
            await asyncio.to_thread(shop.wait_ready, name, count=ready[name] + 1)
        await buyers.reached(buyers.successes + 5, within_s=PATIENCE_S)
    finally:
        buyers.stop()
        await burst
    shop.assert_running()

    placed, told = await ledger.settled_notifications([sku], within_s=PATIENCE_S)
    assert notification_problems(placed, told, buyers.created) == [], dict(buyers.statuses)
    print(
        f"trial {trial}: {len(placed)} orders placed ({len(buyers.created)} answered 201),"
        f" each notified once; answers {dict(buyers.statuses)}"
    )


async def test_a_consumer_started_while_the_log_is_locked_past_patience_consumes_afterwards(
    shop: ChaosShop, gateway: httpx.AsyncClient, tokens: list[str], ledger: Ledger
) -> None:
    sku = await stock_new_product(gateway, shop.admin_password, units=1_000_000)
    buyers = Buyers(gateway, tokens, sku)
    burst = asyncio.create_task(buyers.run(3))
    try:
        await buyers.reached(3, within_s=PATIENCE_S)
        async with write_locked(shop.system.data_dir / "events.db"):
            ready = shop.ready_count("notification")
            shop.kill("notification")
            await asyncio.to_thread(shop.wait_ready, "notification", count=ready + 1)
            # Its consumer started before it was ready: outlast that first statement's wait.
            await asyncio.sleep(SQLITE_BUSY_PATIENCE_S + 2)
        await buyers.reached(buyers.successes + 5, within_s=PATIENCE_S)
    finally:
        buyers.stop()
        await burst
    try:
        placed, told = await ledger.settled_notifications([sku], within_s=10)
        assert notification_problems(placed, told, buyers.created) == []
    finally:
        # A fresh notification process for the tests after this one (the Shop is shared).
        ready = shop.ready_count("notification")
        shop.kill("notification")
        await asyncio.to_thread(shop.wait_ready, "notification", count=ready + 1)
