"""A degraded instance as the registry shows it: still UP for callers, DEGRADED with its
reason on the dashboard and on /metrics, and back when it recovers. The platform's
heartbeat against the registry served by uvicorn on a real port."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shop.platform.discovery import Heartbeat, Registration
from shop.registry.settings import RegistrySettings
from tests.integration.test_registry_interop import Running, eventually, serving

REASON = "breaker:inventory-service: circuit to inventory-service is open"


@pytest.fixture
async def registry() -> AsyncIterator[Running]:
    async with serving(RegistrySettings(eviction_interval_s=0.05, metrics_interval_s=0.05)) as up:
        yield up


def _registration() -> Registration:
    # Renewals far apart: a change of health must not wait for the next one.
    return Registration(app="order-service", host="127.0.0.1", port=8081, renewal_interval_s=60)


async def _metric(registry: Running, name: str, **labels: str) -> float | None:
    async with registry.http.get(registry.url.removesuffix("/eureka") + "/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


async def _dashboard(registry: Running) -> str:
    async with registry.http.get(registry.url + "/web") as resp:
        return await resp.text()


async def _metadata(registry: Running) -> dict[str, str]:
    (found,) = await registry.client().fetch("order-service")
    assert found.status == "UP"  # a degraded instance still serves: callers keep it
    async with registry.http.get(
        f"{registry.url}/apps/ORDER-SERVICE", headers={"Accept": "application/json"}
    ) as resp:
        body = await resp.json()
    instance = body["application"]["instance"]
    instance = instance[0] if isinstance(instance, list) else instance
    metadata: dict[str, str] = instance.get("metadata", {})
    return metadata


async def test_a_degraded_instance_shows_on_the_dashboard_and_metrics_until_it_recovers(
    registry: Running,
) -> None:
    heartbeat = Heartbeat(registry.client(), _registration())
    heartbeat.start()
    try:

        async def registered() -> bool:
            return heartbeat.registered

        await eventually(registered)
        assert 'class="status DEGRADED"' not in await _dashboard(registry)

        async def counted(value: float, name: str, **labels: str) -> bool:
            return await _metric(registry, name, **labels) == value

        await eventually(
            lambda: counted(1, "shop_registry_instances", app="ORDER-SERVICE", status="UP")
        )
        heartbeat.report_health("UP")  # no change: nothing is sent
        heartbeat.report_health("DEGRADED", REASON)

        async def degraded() -> bool:
            return (await _metadata(registry)).get("health") == "DEGRADED"

        await eventually(degraded)
        assert (await _metadata(registry))["healthReason"] == REASON
        page = await _dashboard(registry)
        assert 'class="status DEGRADED"' in page
        assert REASON in page
        await eventually(
            lambda: counted(1, "shop_registry_instances_degraded", app="ORDER-SERVICE")
        )

        heartbeat.report_health("UP")

        async def recovered() -> bool:
            return "health" not in await _metadata(registry)

        await eventually(recovered)
        assert 'class="status DEGRADED"' not in await _dashboard(registry)
        await eventually(
            lambda: counted(0, "shop_registry_instances_degraded", app="ORDER-SERVICE")
        )
    finally:
        await heartbeat.stop()
