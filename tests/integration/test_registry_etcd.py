"""Two registry nodes on one etcd serve one registry; clients use whichever node answers.

Each test has an etcd key prefix of its own on the run's etcd server.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from shop.platform.discovery import Heartbeat, Registration, RegistryClient
from shop.platform.http import http_session
from shop.platform.serve import bind_socket
from shop.platform.settings import PlatformSettings
from shop.registry.app import build_app
from shop.registry.settings import RegistrySettings
from tests.support import ManualClock, free_port

T0 = 1_700_000_000.0
JSON = {"Accept": "application/json"}
ID = "10.0.0.5:order-service:8081"
INSTANCE = f"/eureka/apps/ORDER-SERVICE/{ID}"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def store_url(etcd_server_url: str) -> str:
    return f"{etcd_server_url}/test/{uuid.uuid4().hex}"


def registry_app(
    store_url: str, clock: Callable[[], float] = time.time, *, eviction_interval_s: float = 30.0
) -> FastAPI:
    settings = RegistrySettings(store_url=store_url, eviction_interval_s=eviction_interval_s)
    return build_app(platform=PlatformSettings(), settings=settings, clock=clock)


async def eventually(check: Callable[[], Awaitable[bool]], *, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def node(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A registry node served in-process; ready once its store answers."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://registry") as http:

            async def ready() -> bool:
                return (await http.get("/health/ready")).status_code == 200

            await eventually(ready)
            yield http


@asynccontextmanager
async def served(app: FastAPI) -> AsyncIterator[str]:
    """The app on a real port, for clients that speak HTTP; yields its ``/eureka`` URL."""
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(
        uvicorn.Config(app, lifespan="on", log_level="warning", log_config=None)
    )
    serving = asyncio.create_task(server.serve(sockets=[sock]))

    async def started() -> bool:
        return server.started

    try:
        await eventually(started)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/eureka"
    finally:
        server.should_exit = True
        await serving
        sock.close()


@pytest.fixture
async def nodes(
    store_url: str, clock: ManualClock
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    async with (
        node(registry_app(store_url, clock)) as one,
        node(registry_app(store_url, clock)) as two,
    ):
        yield one, two


def instance(instance_id: str = ID, **fields: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "instanceId": instance_id,
        "hostName": "10.0.0.5",
        "app": "ORDER-SERVICE",
        "ipAddr": "10.0.0.5",
        "status": "UP",
        "port": {"$": 8081, "@enabled": "true"},
        "leaseInfo": {"renewalIntervalInSecs": 10, "durationInSecs": 30},
    }
    document.update(fields)
    return {"instance": document}


async def register(http: httpx.AsyncClient, instance_id: str = ID, **fields: Any) -> None:
    answer = await http.post("/eureka/apps/order-service", json=instance(instance_id, **fields))
    assert answer.status_code == 204, answer.text


async def listing(http: httpx.AsyncClient) -> dict[str, Any]:
    answer = await http.get("/eureka/apps", headers=JSON)
    assert answer.status_code == 200, answer.text
    apps: dict[str, Any] = answer.json()["applications"]
    return apps


async def shown(http: httpx.AsyncClient) -> dict[str, Any]:
    answer = await http.get(INSTANCE, headers=JSON)
    assert answer.status_code == 200, answer.text
    document: dict[str, Any] = answer.json()["instance"]
    return document


def assert_problem(answer: httpx.Response, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = answer.json()
    assert body["status"] == status
    return body


# --- one registry, two nodes ----------------------------------------------------------------


async def test_a_registration_on_one_node_is_listed_by_both(
    nodes: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    one, two = nodes
    before = await listing(two)

    await register(one)

    on_one, on_two = await listing(one), await listing(two)
    assert on_one == on_two
    assert int(on_two["versions__delta"]) > int(before["versions__delta"])
    assert on_two["apps__hashcode"] == "UP_1_"
    assert (await shown(two))["instanceId"] == ID
    assert (await two.get("/eureka/web")).text.count(ID) == 1


async def test_a_heartbeat_on_the_other_node_renews_the_lease(
    nodes: tuple[httpx.AsyncClient, httpx.AsyncClient], clock: ManualClock
) -> None:
    one, two = nodes
    await register(one)
    version = (await listing(one))["versions__delta"]
    clock.now += 25

    answer = await two.put(INSTANCE, params={"status": "UP"})

    assert answer.status_code == 200
    assert (await shown(one))["leaseInfo"]["lastRenewalTimestamp"] == int((T0 + 25) * 1000)
    clock.now += 25  # past the first lease, within the renewed one
    assert (await shown(one))["status"] == "UP"
    assert (await listing(one))["versions__delta"] == version  # heartbeats are no change
    assert (await listing(two))["versions__delta"] == version


async def test_a_cancel_on_one_node_is_gone_from_both(
    nodes: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    one, two = nodes
    await register(two)
    version = int((await listing(one))["versions__delta"])

    assert (await one.delete(INSTANCE)).status_code == 200

    for http in (one, two):
        assert_problem(await http.get("/eureka/apps/order-service", headers=JSON), 404)
        assert int((await listing(http))["versions__delta"]) > version
    assert_problem(await two.delete(INSTANCE), 404)


async def test_a_status_override_on_one_node_holds_on_both(
    nodes: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    one, two = nodes
    await register(one)

    answer = await one.put(f"{INSTANCE}/status", params={"value": "OUT_OF_SERVICE"})
    assert answer.status_code == 200
    await two.put(INSTANCE, params={"status": "UP"})
    await register(two, status="UP")

    for http in (one, two):
        overridden = await shown(http)
        assert (overridden["status"], overridden["overriddenStatus"]) == ("OUT_OF_SERVICE",) * 2
    assert (await two.delete(f"{INSTANCE}/status")).status_code == 200
    assert (await shown(one))["status"] == "UP"


async def test_an_expired_lease_is_evicted_once_whichever_node_sweeps(
    store_url: str, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shop.registry")
    async with (
        node(registry_app(store_url, clock, eviction_interval_s=0.01)) as one,
        node(registry_app(store_url, clock, eviction_interval_s=0.01)) as two,
    ):
        await register(one)
        version = int((await listing(two))["versions__delta"])
        clock.now += 31

        async def evicted() -> bool:
            return f"evicted ORDER-SERVICE/{ID}" in caplog.text

        await eventually(evicted)
        await asyncio.sleep(0.2)  # many more sweeps by both nodes

        assert caplog.text.count(f"evicted ORDER-SERVICE/{ID}") == 1
        assert "eviction sweep" not in caplog.text
        on_one, on_two = await listing(one), await listing(two)
        assert on_one == on_two
        assert (on_two["application"], int(on_two["versions__delta"]) > version) == ([], True)


async def test_a_node_that_restarts_forgets_nothing(store_url: str, clock: ManualClock) -> None:
    async with node(registry_app(store_url, clock)) as one:
        await register(one)
        await one.put(f"{INSTANCE}/status", params={"value": "DOWN"})
        before = await listing(one)

    async with node(registry_app(store_url, clock)) as again:
        assert await listing(again) == before


# --- the same instance changed through both nodes at once ------------------------------------


async def test_an_override_racing_heartbeats_on_both_nodes_survives(
    nodes: tuple[httpx.AsyncClient, httpx.AsyncClient], clock: ManualClock
) -> None:
    one, two = nodes
    await register(one)
    clock.now += 5

    heartbeats = [http.put(INSTANCE, params={"status": "UP"}) for _ in range(8) for http in nodes]
    override = two.put(f"{INSTANCE}/status", params={"value": "OUT_OF_SERVICE"})
    answers = await asyncio.gather(*heartbeats[:8], override, *heartbeats[8:])

    assert [a.status_code for a in answers] == [200] * 17
    for http in (one, two):
        final = await shown(http)
        assert (final["status"], final["overriddenStatus"]) == ("OUT_OF_SERVICE",) * 2
        assert final["leaseInfo"]["lastRenewalTimestamp"] == int((T0 + 5) * 1000)


async def test_registrations_overrides_and_heartbeats_at_once_lose_nothing(
    nodes: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    one, two = nodes
    await register(one, metadata={"build": "1"})

    await asyncio.gather(
        *(register(http, metadata={"build": "2"}) for http in nodes for _ in range(4)),
        one.put(f"{INSTANCE}/status", params={"value": "DOWN"}),
        *(http.put(INSTANCE, params={"status": "UP"}) for http in nodes for _ in range(4)),
    )

    final = await shown(two)
    assert (final["status"], final["metadata"]) == ("DOWN", {"build": "2"})


async def test_many_instances_registered_through_both_nodes_are_all_listed(
    nodes: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    one, two = nodes
    ids = [f"10.0.0.{n}:order-service:8081" for n in range(20)]

    await asyncio.gather(*(register(nodes[n % 2], i) for n, i in enumerate(ids)))

    on_one, on_two = await listing(one), await listing(two)
    assert on_one == on_two
    (application,) = on_two["application"]
    assert sorted(i["instanceId"] for i in application["instance"]) == sorted(ids)
    assert on_two["apps__hashcode"] == "UP_20_"


# --- clients given several registries --------------------------------------------------------


async def test_a_client_given_a_dead_registry_first_registers_and_finds_through_the_next(
    store_url: str,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/eureka"
    async with (
        served(registry_app(store_url)) as live,
        node(registry_app(store_url)) as other_node,
        http_session() as http,
    ):
        client = RegistryClient(base_url=f"{dead},{live}", session=http, cache_ttl_s=0.0)
        heartbeat = Heartbeat(
            client,
            Registration(app="order-service", host="127.0.0.1", port=8081, renewal_interval_s=0.05),
        )
        heartbeat.start()
        try:

            async def listed() -> bool:
                return [i.port for i in await client.instances("order-service")] == [8081]

            await eventually(listed)
            assert client.base_urls == [dead, live]
            assert client.base_url == live  # it keeps to the one that answered
            assert (await client.choose("order-service")) is not None
            assert (await listing(other_node))["apps__hashcode"] == "UP_1_"
        finally:
            await heartbeat.stop()
        assert await client.fetch("order-service") == []


async def test_a_client_moves_past_a_registry_whose_store_is_down(store_url: str) -> None:
    down = f"etcd://127.0.0.1:{free_port()}/nowhere"
    async with (
        served(registry_app(down)) as broken,
        served(registry_app(store_url)) as live,
        http_session() as http,
    ):
        async with http.get(f"{broken}/apps", headers=JSON) as answer:
            assert answer.status == 503
        client = RegistryClient(base_url=[broken, live], session=http, cache_ttl_s=0.0)

        await client.register(Registration(app="order-service", host="127.0.0.1", port=8082))

        assert client.base_url == live
        assert [i.port for i in await client.fetch("order-service")] == [8082]


async def test_a_client_moves_past_a_registry_that_never_answers(store_url: str) -> None:
    silent: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    hanging = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/eureka"
    try:
        async with served(registry_app(store_url)) as live, http_session() as http:
            client = RegistryClient(base_url=[hanging, live], session=http, timeout_s=0.3)
            registration = Registration(app="order-service", host="127.0.0.1", port=8083)

            started = time.monotonic()
            await client.register(registration)

            assert time.monotonic() - started < 2.0
            assert await client.renew(registration)
            assert [i.port for i in await client.fetch("order-service")] == [8083]
    finally:
        for writer in silent:
            writer.close()
        server.close()
        await server.wait_closed()


# --- etcd down -----------------------------------------------------------------------------


async def test_without_etcd_the_registry_answers_503_and_is_not_ready() -> None:
    app = registry_app(f"etcd://127.0.0.1:{free_port()}/nowhere")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://registry") as http:
            answers = [
                await http.get("/eureka/apps", headers=JSON),
                await http.get("/eureka/apps/order-service", headers=JSON),
                await http.post("/eureka/apps/order-service", json=instance()),
                await http.put(INSTANCE, params={"status": "UP"}),
                await http.delete(INSTANCE),
                await http.get("/eureka/web"),
            ]
            ready = await http.get("/health/ready")
            live = await http.get("/health/live")

    for answer in answers:
        problem = assert_problem(answer, 503)
        assert answer.headers["retry-after"] == "1"
        assert "etcd" not in problem["detail"] and "127.0.0.1" not in problem["detail"]
    assert assert_problem(ready, 503)["checks"] == {"store": "DOWN"}
    assert live.status_code == 200


async def test_a_dead_etcd_member_is_passed_over(etcd_server_url: str, clock: ManualClock) -> None:
    live = etcd_server_url.removeprefix("etcd://")
    url = f"etcd://127.0.0.1:{free_port()},{live}/test/{uuid.uuid4().hex}"
    async with node(registry_app(url, clock)) as http:
        await register(http)

        assert (await listing(http))["apps__hashcode"] == "UP_1_"
        assert (await http.get("/health/ready")).json()["checks"] == {"store": "UP"}
