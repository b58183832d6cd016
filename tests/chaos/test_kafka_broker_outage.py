"""Scenario 3, the production profile (MariaDB, a MongoDB-protocol server, etcd, and a
Kafka-protocol broker whose storage survives it, two notification instances in one
consumer group): mid-burst both notification instances freeze (SIGSTOP), so events pile
up in the broker; the broker is stopped (or killed), the frozen instances killed (the
supervisor restarts them), the broker started again on the same port after the outage.
Every placed order is notified exactly once: events wait in the order outbox while the bus
is away, those the broker acknowledged survive its restart, and whatever the consumers see
twice (a redelivery after the restart, a rebalance) their inbox drops."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator

import httpx
import pytest

from tests.chaos.broker import DurableBroker
from tests.chaos.conftest import OUTAGE_S, trials
from tests.chaos.ledger import Ledger, notification_problems
from tests.chaos.load import Buyers, stock_new_product
from tests.chaos.shop import ChaosShop, running_shop

pytestmark = [pytest.mark.e2e, pytest.mark.chaos, pytest.mark.mysql]

BUYERS = 6
PATIENCE_S = 90.0
SCALE = {"notification": 2}


@pytest.fixture(scope="module")
def shop(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    durable_kafka: DurableBroker,
) -> Iterator[ChaosShop]:
    root = tmp_path_factory.mktemp("chaos-production")
    with running_shop(request, root, profile="production", scale=SCALE) as shop:
        yield shop


@pytest.mark.parametrize("trial", trials())
async def test_one_notification_per_order_with_the_kafka_broker_stopped_mid_burst(
    shop: ChaosShop,
    durable_kafka: DurableBroker,
    gateway: httpx.AsyncClient,
    tokens: list[str],
    ledger: Ledger,
    trial: int,
) -> None:
    sku = await stock_new_product(gateway, shop.admin_password, units=1_000_000)
    buyers = Buyers(gateway, tokens, sku, quantities=(1, 2))
    burst = asyncio.create_task(buyers.run(BUYERS))
    consumers = [f"notification-{n}" for n in range(1, SCALE["notification"] + 1)]
    ready = {name: shop.ready_count(name) for name in consumers}
    try:
        await buyers.reached(5, within_s=PATIENCE_S)
        # The consumers freeze, so the events of the next orders are in the broker alone
        # when it stops: they survive only if the broker keeps what it acknowledged.
        frozen = [shop.kill(name, signal.SIGSTOP) for name in consumers]
        await buyers.reached(buyers.successes + 10, within_s=PATIENCE_S)
        # Every other trial the broker crashes rather than stops.
        crash = signal.SIGKILL if trial % 2 == 0 else signal.SIGTERM
        await asyncio.to_thread(durable_kafka.stop, crash)
        for pid in frozen:
            os.kill(pid, signal.SIGKILL)  # the supervisor starts them again
        before = buyers.successes
        await asyncio.sleep(OUTAGE_S)  # the planned outage; orders go on meanwhile
        during = buyers.successes - before
        await asyncio.to_thread(durable_kafka.start)
        for name in consumers:
            await asyncio.to_thread(shop.wait_ready, name, count=ready[name] + 1)
        await buyers.reached(buyers.successes + 5, within_s=PATIENCE_S)
    finally:
        buyers.stop()
        await burst
    shop.assert_running()

    placed, told = await ledger.settled_notifications([sku], within_s=PATIENCE_S)
    assert notification_problems(placed, told, buyers.created) == [], dict(buyers.statuses)
    print(
        f"trial {trial}: {len(placed)} orders placed ({len(buyers.created)} answered 201,"
        f" {during} while the broker was down), each notified once;"
        f" answers {dict(buyers.statuses)}"
    )
