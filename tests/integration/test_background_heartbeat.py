"""The heartbeat is a job on the common loop: a beat that fails in a way nobody planned for
is logged, counted, and the heartbeat goes on (it used to end silently while the process
kept serving, and the registry evicted a live instance). Against the real registry."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from shop.platform.discovery import Heartbeat, Registration, RegistryClient
from shop.platform.worker import JOBS
from shop.registry.settings import RegistrySettings
from tests.integration.test_registry_interop import Running, eventually, serving


@pytest.fixture
async def registry() -> AsyncIterator[Running]:
    async with serving(RegistrySettings(eviction_interval_s=0.05)) as up:
        yield up


class OnceBrokenClient(RegistryClient):
    """The real client, whose second renewal fails with an error no one expects (a bug)."""

    def __init__(self, *, base_url: str, registry: Running) -> None:
        super().__init__(base_url=base_url, session=registry.http, cache_ttl_s=0.0)
        self.renewals = 0
        self.broke = asyncio.Event()

    async def renew(self, registration: Registration) -> bool:
        self.renewals += 1
        if self.renewals == 2:
            self.broke.set()
            raise KeyError("leaseInfo")
        return await super().renew(registration)


async def test_the_heartbeat_survives_an_unexpected_exception(
    registry: Running, caplog: pytest.LogCaptureFixture
) -> None:
    client = OnceBrokenClient(base_url=registry.url, registry=registry)
    registration = Registration(
        app="order-service", host="127.0.0.1", port=8081, renewal_interval_s=0.05
    )
    heartbeat = Heartbeat(client, registration)
    job = "heartbeat-order-service"
    counted_before = JOBS.failures[job]
    heartbeat.start()
    try:
        await asyncio.wait_for(client.broke.wait(), 5)
        renewals_at_failure = client.renewals

        async def beating_again() -> bool:
            return heartbeat.registered and client.renewals >= renewals_at_failure + 2

        await eventually(beating_again)
        (found,) = await registry.client().fetch("order-service")
        assert found.status == "UP"
    finally:
        await heartbeat.stop()
    assert heartbeat.failures == 1
    assert JOBS.failures[job] == counted_before + 1, "shop_background_failures_total{job}"
    (logged,) = [r for r in caplog.records if r.levelno == logging.ERROR and job in r.getMessage()]
    assert logged.exc_info is not None and "KeyError" in caplog.text
    # The registry runs in this process here, so its /metrics shows this process's jobs.
    metrics_url = registry.url.removesuffix("/eureka") + "/metrics"
    async with registry.http.get(metrics_url) as answer:
        exposed = await answer.text()
    assert f'shop_background_failures_total{{job="{job}"}} {counted_before + 1:.1f}' in exposed
    assert await registry.client().fetch("order-service") == [], "stopping cancels it"
