"""Knobs and systems of the chaos tests (docs/chaos.md).

- ``SHOP_CHAOS_TRIALS`` (1): trials of each scenario; ``make chaos`` runs more.
- ``SHOP_CHAOS_OUTAGE_S`` (3): how long the event log stays locked, the broker stopped, the
  inventory frozen.
- ``SHOP_CHAOS_SOAK_S`` (5): the soak's steady load; ``make chaos`` runs minutes.

One embedded Shop serves every embedded scenario (each test has its own products, so their
books never mix), stopped when the package's tests are done, so the suites after it do not
share the machine with an idle Shop; the production profile's Shop is started by its own
module.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from tests.chaos.broker import DurableBroker, durable_kafka_broker
from tests.chaos.ledger import Ledger
from tests.chaos.load import Customers
from tests.chaos.shop import ChaosShop, running_shop
from tests.servers import Server, ServerMissing
from tests.support import require_or_skip

TRIALS = max(1, int(os.environ.get("SHOP_CHAOS_TRIALS", "1")))
OUTAGE_S = float(os.environ.get("SHOP_CHAOS_OUTAGE_S", "3"))
SOAK_S = float(os.environ.get("SHOP_CHAOS_SOAK_S", "5"))
CUSTOMERS = 6


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "chaos: kills, freezes or cuts off the real processes (tests/chaos)"
    )


def trials() -> list[int]:
    """``@pytest.mark.parametrize("trial", trials())``: one test per trial."""
    return list(range(1, TRIALS + 1))


@pytest.fixture(scope="package")
def embedded_shop(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ChaosShop]:
    with running_shop(request, tmp_path_factory.mktemp("chaos-embedded")) as shop:
        yield shop


@pytest.fixture(scope="package")
def durable_kafka(request: pytest.FixtureRequest) -> Iterator[DurableBroker]:
    try:
        with durable_kafka_broker() as broker:
            yield broker
    except ServerMissing as exc:
        require_or_skip(f"a restartable Kafka-protocol broker: {exc}")


@pytest.fixture(scope="package")
def kafka_server(durable_kafka: DurableBroker) -> Server:
    """The production profile's broker here is the restartable one (tests/e2e's
    ``production_environment`` asks for ``kafka_server``)."""
    return durable_kafka.as_server()


@pytest.fixture
def shop(embedded_shop: ChaosShop) -> ChaosShop:
    """The Shop a test works on: the embedded one unless its module says otherwise."""
    return embedded_shop


@pytest.fixture
async def gateway(shop: ChaosShop) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=shop.gateway, timeout=15.0, limits=limits) as client:
        yield client


@pytest.fixture(scope="session")
def _customers_of() -> dict[str, Customers]:
    return {}


@pytest.fixture
async def tokens(
    shop: ChaosShop, gateway: httpx.AsyncClient, _customers_of: dict[str, Customers]
) -> list[str]:
    customers = _customers_of.get(shop.gateway)
    if customers is None:
        customers = await Customers.register(gateway, CUSTOMERS)
        _customers_of[shop.gateway] = customers
    return await customers.fresh_tokens(gateway)


@pytest.fixture
def ledger(shop: ChaosShop) -> Ledger:
    return Ledger(data_dir=shop.system.data_dir, databases=shop.databases)
