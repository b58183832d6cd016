"""The platform's own discovery client against the registry served by uvicorn on a real port."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import pytest
import uvicorn

from shop.platform.discovery import Heartbeat, Registration, RegistryClient
from shop.platform.http import http_session
from shop.platform.serve import bind_socket
from shop.platform.settings import PlatformSettings
from shop.registry.app import build_app
from shop.registry.settings import RegistrySettings


class ShiftedClock:
    """Real time, plus whatever the test skips ahead by."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Running:
    url: str
    clock: ShiftedClock
    http: aiohttp.ClientSession

    def client(self) -> RegistryClient:
        return RegistryClient(base_url=self.url, session=self.http, cache_ttl_s=0.0)


@pytest.fixture
async def registry() -> AsyncIterator[Running]:
    clock = ShiftedClock()
    app = build_app(
        platform=PlatformSettings(),
        settings=RegistrySettings(eviction_interval_s=0.05),
        clock=clock,
    )
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(
        uvicorn.Config(app, lifespan="on", log_level="warning", log_config=None)
    )
    serving = asyncio.create_task(server.serve(sockets=[sock]))

    async def started() -> bool:
        return server.started

    await eventually(started)
    port = sock.getsockname()[1]
    try:
        async with http_session() as http:
            yield Running(url=f"http://127.0.0.1:{port}/eureka", clock=clock, http=http)
    finally:
        server.should_exit = True
        await serving
        sock.close()


async def eventually(check: Callable[[], Awaitable[bool]], *, within_s: float = 3.0) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.02)


def registration(port: int = 8081) -> Registration:
    return Registration(
        app="order-service",
        host="127.0.0.1",
        port=port,
        lease_duration_s=90,
        renewal_interval_s=0.05,
    )


async def test_heartbeat_registers_and_keeps_renewing(registry: Running) -> None:
    client = registry.client()
    heartbeat = Heartbeat(client, registration())
    heartbeat.start()
    try:
        await eventually(lambda: _listed(client))
        (found,) = await client.fetch("order-service")
        assert (found.host, found.port, found.status) == ("127.0.0.1", 8081, "UP")
        assert found.base_url == "http://127.0.0.1:8081"

        first = await _last_renewal(registry)
        await eventually(lambda: _renewed_after(registry, first))
        assert heartbeat.registered
    finally:
        await heartbeat.stop()


async def test_stopping_the_heartbeat_cancels_the_registration(registry: Running) -> None:
    client = registry.client()
    heartbeat = Heartbeat(client, registration())
    heartbeat.start()
    try:
        await eventually(lambda: _listed(client))
    finally:
        await heartbeat.stop()

    assert await client.fetch("order-service") == []


async def test_an_instance_taken_out_of_service_is_not_chosen(registry: Running) -> None:
    client = registry.client()
    heartbeats = [Heartbeat(client, registration(port)) for port in (8081, 8082)]
    for heartbeat in heartbeats:
        heartbeat.start()
    try:
        await eventually(lambda: _listed(client, count=2))
        url = f"{registry.url}/apps/ORDER-SERVICE/127.0.0.1:order-service:8082/status"
        async with registry.http.put(url, params={"value": "OUT_OF_SERVICE"}) as answer:
            assert answer.status == 200
        await asyncio.sleep(0.2)  # several heartbeats: none may undo the override

        assert [i.port for i in await client.instances("order-service")] == [8081]
        chosen = {(await client.choose("order-service")).port for _ in range(4)}  # type: ignore[union-attr]
        assert chosen == {8081}
        statuses = {i.port: i.status for i in await client.fetch("order-service")}
        assert statuses == {8081: "UP", 8082: "OUT_OF_SERVICE"}
    finally:
        for heartbeat in heartbeats:
            await heartbeat.stop()


async def test_an_evicted_instance_registers_again(
    registry: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    client = registry.client()
    heartbeat = Heartbeat(client, registration())
    heartbeat.start()
    try:
        await eventually(lambda: _listed(client))
        registry.clock.offset += 91  # the lease (90 s) runs out between two heartbeats

        await eventually(lambda: _reregistered(caplog))
        await eventually(lambda: _listed(client))
    finally:
        await heartbeat.stop()


async def _listed(client: RegistryClient, count: int = 1) -> bool:
    return len(await client.fetch("order-service")) == count


async def _reregistered(caplog: pytest.LogCaptureFixture) -> bool:
    return "registry forgot order-service; registering again" in caplog.text


async def _last_renewal(registry: Running) -> int:
    url = f"{registry.url}/apps/ORDER-SERVICE/127.0.0.1:order-service:8081"
    async with registry.http.get(url, headers={"Accept": "application/json"}) as answer:
        body = await answer.json()
    renewed: int = body["instance"]["leaseInfo"]["lastRenewalTimestamp"]
    return renewed


async def _renewed_after(registry: Running, first: int) -> bool:
    return await _last_renewal(registry) > first
