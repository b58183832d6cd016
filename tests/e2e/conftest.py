"""The real system: `shop up` started as a process on free ports, driven through the gateway.

Once per profile: ``embedded`` (SQLite files and the embedded event log, one process per
service) and ``production`` (MariaDB, a MongoDB-protocol server, a Kafka-protocol broker,
the registry's leases in etcd; two instances each of order, inventory and notification).
Tests that use ``system`` run on both; a module may pin one with
``pytest.mark.parametrize("system", [...], indirect=True)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.shop_system import SCALE, System, running_system, stock_the_demo_catalogue

PROFILES = ("embedded", "production")


@pytest.fixture(scope="session", params=PROFILES)
def system(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    profile: str = request.param
    environment = {
        "SHOP_HEARTBEAT_INTERVAL_S": "1",
        "SHOP_REGISTRY_CACHE_TTL_S": "1",
        "REGISTRY_EVICTION_INTERVAL_S": "1",
        # The console links each recent order to its trace (test_console.TRACE_UI).
        "GATEWAY_TRACE_URL_TEMPLATE": "http://127.0.0.1:9411/zipkin/traces/{traceId}",
        # A hung inventory must open the order service's breaker within a test's patience.
        "ORDER_INVENTORY_TIMEOUT_S": "0.5",
        "ORDER_BREAKER_FAILURE_THRESHOLD": "3",
        "ORDER_BREAKER_OPEN_S": "2",
        "ORDER_RELEASE_BACKOFF_MAX_S": "2",
    }
    # `shop up` hands each caller its own service-token secret (order-service);
    # notification-service's entry is never given to notification, which makes no internal
    # call: tests use it to show that another service's genuine token is refused where
    # order-service's is expected.
    with running_system(
        tmp_path_factory.mktemp(f"system-{profile}"),
        profile=profile,
        environment=environment,
        scale=SCALE if profile == "production" else None,
        request=request,
    ) as running:
        if profile == "production":
            stock_the_demo_catalogue(running.system)
        yield running.system


@pytest.fixture
def gateway(system: System) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=system.gateway, timeout=10.0) as client:
        yield client
