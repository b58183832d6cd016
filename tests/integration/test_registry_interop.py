"""The platform's own discovery client against the registry served by uvicorn on a real port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import uvicorn
from pydantic import SecretStr

from shop.platform.discovery import Heartbeat, Registration, RegistryClient, RegistryUnavailable
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
    stop: Callable[[], Awaitable[None]]

    def client(self) -> RegistryClient:
        return RegistryClient(base_url=self.url, session=self.http, cache_ttl_s=0.0)


@pytest.fixture
async def registry() -> AsyncIterator[Running]:
    async with serving(RegistrySettings(eviction_interval_s=0.05)) as running:
        yield running


ORDER_SECRET = "order/secret:with@odd%chars-and-32+"


@pytest.fixture
async def guarded_registry() -> AsyncIterator[Running]:
    clients = SecretStr(json.dumps({"order-service": ORDER_SECRET}))
    async with serving(RegistrySettings(eviction_interval_s=0.05, clients=clients)) as running:
        yield running


@contextlib.asynccontextmanager
async def serving(settings: RegistrySettings) -> AsyncIterator[Running]:
    clock = ShiftedClock()
    app = build_app(platform=PlatformSettings(), settings=settings, clock=clock)
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(
        uvicorn.Config(app, lifespan="on", log_level="warning", log_config=None)
    )
    serving = asyncio.create_task(server.serve(sockets=[sock]))

    async def started() -> bool:
        return server.started

    async def stop() -> None:
        server.should_exit = True
        await serving
        sock.close()

    await eventually(started)
    port = sock.getsockname()[1]
    try:
        async with http_session() as http:
            yield Running(url=f"http://127.0.0.1:{port}/eureka", clock=clock, http=http, stop=stop)
    finally:
        await stop()


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


@pytest.mark.parametrize("cache_ttl_s", [0.0, 5.0])
async def test_choose_spreads_calls_over_every_up_instance(
    registry: Running, cache_ttl_s: float
) -> None:
    client = RegistryClient(base_url=registry.url, session=registry.http, cache_ttl_s=cache_ttl_s)
    heartbeats = [Heartbeat(client, registration(port)) for port in (8081, 8082)]
    for heartbeat in heartbeats:
        heartbeat.start()
    try:
        await eventually(lambda: _listed(client, count=2))

        chosen = [await client.choose("order-service") for _ in range(6)]

        assert sorted(i.port for i in chosen if i is not None) == [8081] * 3 + [8082] * 3
    finally:
        for heartbeat in heartbeats:
            await heartbeat.stop()


async def test_a_comma_separated_list_is_kept_in_order(registry: Running) -> None:
    dead = "http://127.0.0.1:9/eureka"

    client = RegistryClient(
        base_url=f" {registry.url}/ ,{dead},", session=registry.http, cache_ttl_s=0.0
    )

    assert client.base_urls == [registry.url, dead]
    await client.register(registration())
    assert [i.port for i in await client.fetch("order-service")] == [8081]
    assert client.base_url == registry.url  # the first answered: no reason to move


async def test_lookups_are_cached_single_flight_and_served_stale_when_no_registry_answers(
    registry: Running,
) -> None:
    requests: list[str] = []

    async def count(_session: object, _context: object, params: Any) -> None:
        requests.append(str(params.url))

    tracing = aiohttp.TraceConfig()
    tracing.on_request_start.append(count)
    dead = "http://127.0.0.1:9/eureka"
    async with aiohttp.ClientSession(trace_configs=[tracing]) as http:
        client = RegistryClient(base_url=[registry.url, dead], session=http, cache_ttl_s=0.2)
        await client.register(registration())
        requests.clear()

        found = await asyncio.gather(*(client.instances("order-service") for _ in range(10)))
        again = await client.instances("order-service")

        assert [[i.port for i in each] for each in [*found, again]] == [[8081]] * 11
        assert len(requests) == 1  # one lookup for eleven callers
        await registry.stop()
        await asyncio.sleep(0.25)

        assert [i.port for i in await client.instances("order-service")] == [8081]
        assert len(requests) == 3  # the stopped registry, then the dead one, then the cache
        with pytest.raises(RegistryUnavailable):
            await client.fetch("order-service")
        client.forget("order-service")
        with pytest.raises(RegistryUnavailable):
            await client.instances("order-service")


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


def _with_credential(url: str, user: str, secret: str) -> str:
    return url.replace("http://", f"http://{quote(user, safe='')}:{quote(secret, safe='')}@")


async def test_the_credential_in_the_registry_url_registers_renews_and_cancels(
    guarded_registry: Running, caplog: pytest.LogCaptureFixture
) -> None:
    url = _with_credential(guarded_registry.url, "order-service", ORDER_SECRET)
    client = RegistryClient(base_url=url, session=guarded_registry.http, cache_ttl_s=0.0)
    assert client.base_urls == [guarded_registry.url], "no secret kept where it may be shown"
    caplog.set_level(logging.DEBUG)
    heartbeat = Heartbeat(client, registration())
    heartbeat.start()
    try:
        await eventually(lambda: _listed(client))
        first = await _last_renewal(guarded_registry)
        await eventually(lambda: _renewed_after(guarded_registry, first))
    finally:
        await heartbeat.stop()
    assert await client.fetch("order-service") == [], "cancelled with the credential"
    assert ORDER_SECRET not in caplog.text


@pytest.mark.parametrize("user", [None, "auth-service"])
async def test_without_its_own_credential_a_service_cannot_register(
    guarded_registry: Running, user: str | None
) -> None:
    url = guarded_registry.url
    if user:
        url = _with_credential(url, user, ORDER_SECRET)
    client = RegistryClient(base_url=url, session=guarded_registry.http, cache_ttl_s=0.0)
    with pytest.raises(RegistryUnavailable, match="register answered 401") as refused:
        await client.register(registration())
    assert ORDER_SECRET not in str(refused.value)
    assert await client.fetch("order-service") == []
