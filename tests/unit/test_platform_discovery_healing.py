"""The picking rules of RegistryClient.choose: an instance that refused is passed over until
it proves alive (its quarantine ends, it registered again, or it answers its health check
after it did not). A fake clock for the quarantines and rechecks; the health checks go to
real servers on loopback."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web

from shop.order.settings import OrderSettings
from shop.platform.discovery import Instance, RegistryClient
from shop.platform.settings import PlatformSettings, SettingsRefused, load_settings

APP = "inventory-service"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _instance(port: int, *, registered_at_ms: int = 1, name: str = "") -> Instance:
    return Instance(
        app=APP,
        instance_id=name or f"127.0.0.1:{APP}:{port}",
        host="127.0.0.1",
        port=port,
        registered_at_ms=registered_at_ms,
    )


class Listed(RegistryClient):
    """The registry's answer is ``listing``; ``fetches`` counts the lookups."""

    def __init__(
        self,
        listing: list[Instance],
        clock: Clock,
        session: aiohttp.ClientSession | None = None,
        health_timeout_s: float = 1.0,
    ) -> None:
        # Without a session, nothing may be asked of the network (fetch is replaced).
        session = session or cast(aiohttp.ClientSession, object())
        super().__init__(
            base_url="http://registry",
            session=session,
            clock=clock,
            health_timeout_s=health_timeout_s,
        )
        self.listing = listing
        self.fetches = 0

    async def fetch(self, app: str) -> list[Instance]:
        self.fetches += 1
        return list(self.listing)


async def _ports(client: RegistryClient, times: int) -> list[int]:
    chosen = [await client.choose(APP) for _ in range(times)]
    return [i.port for i in chosen if i is not None]


async def test_round_robin_over_the_instances_while_none_refused() -> None:
    client = Listed([_instance(1), _instance(2)], Clock())
    assert await _ports(client, 4) == [1, 2, 1, 2]
    assert client.fetches == 1


async def test_an_instance_that_refused_is_passed_over_until_its_quarantine_ends() -> None:
    clock = Clock()
    dead, live = _instance(1), _instance(2)
    client = Listed([dead, live], clock)
    client.refused(dead)
    assert await _ports(client, 4) == [2, 2, 2, 2]
    assert client.fetches == 1, "a refusal drops the cached lookup, once"
    clock.now += 4.9
    assert 1 not in await _ports(client, 2)
    clock.now += 0.1
    assert sorted(await _ports(client, 2)) == [1, 2], "after 5 s it may be tried again"


async def test_an_instance_that_registered_again_is_taken_back_at_once() -> None:
    """A restarted process registers anew (the same instance id, a new registration time):
    that proves it is back before its quarantine ends."""
    clock = Clock()
    old, other = _instance(1, registered_at_ms=1), _instance(2)
    client = Listed([old, other], clock)
    client.refused(old)
    assert await _ports(client, 2) == [2, 2]
    client.listing = [_instance(1, registered_at_ms=2), other]
    client.forget(APP)
    assert sorted(await _ports(client, 2)) == [1, 2]


async def test_with_every_instance_passed_over_the_one_back_soonest_is_chosen() -> None:
    """Rather than no instance at all: the caller gets a verdict, its breaker bounds how often."""
    clock = Clock()
    first, second = _instance(1), _instance(2)
    client = Listed([first, second], clock)
    client.refused(second)
    clock.now += 1
    client.refused(first)
    assert await _ports(client, 3) == [2, 2, 2]


async def test_a_single_instance_that_refused_is_still_chosen() -> None:
    only = _instance(1)
    client = Listed([only], Clock())
    client.refused(only)
    assert await client.choose(APP) == only


async def test_the_registration_time_is_read_from_the_lease_info() -> None:
    raw: dict[str, Any] = {
        "app": "INVENTORY-SERVICE",
        "instanceId": "h:inventory-service:1",
        "ipAddr": "h",
        "port": {"$": 1, "@enabled": "true"},
        "status": "UP",
        "leaseInfo": {"registrationTimestamp": 1764568800123},
    }
    assert Instance.from_eureka(raw).registered_at_ms == 1764568800123
    del raw["leaseInfo"]
    assert Instance.from_eureka(raw).registered_at_ms == 0


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """For the health checks of passed-over instances (port 1, 2...: refused at once)."""
    async with aiohttp.ClientSession() as opened:
        yield opened


async def _rechecked(client: RegistryClient) -> None:
    """Wait for the background rechecks proved_alive started (lookups, health checks)."""
    await asyncio.gather(*client._rechecks.values())


async def test_proved_alive_sees_a_passed_over_instance_registered_again(
    session: aiohttp.ClientSession,
) -> None:
    """Without waiting: it answers from the latest lookup and looks again in the background
    (at most once a second), so a breaker can probe a restarted peer at once."""
    clock = Clock()
    dead = _instance(1, registered_at_ms=1)
    client = Listed([dead], clock, session=session)
    await client.choose(APP)
    client.refused(dead)
    assert not client.proved_alive(APP)  # nothing cached: a lookup starts
    await _rechecked(client)
    assert client.fetches == 2
    assert not client.proved_alive(APP), "the same registration"
    client.listing = [_instance(1, registered_at_ms=2)]
    assert not client.proved_alive(APP)
    await _rechecked(client)
    assert client.fetches == 2, "the last lookup is less than a second old"
    clock.now += 1
    client.proved_alive(APP)
    await _rechecked(client)
    assert client.proved_alive(APP)
    assert not client.proved_alive(APP), "one proof, answered once"
    assert await _ports(client, 1) == [1]


async def test_proved_alive_sees_a_new_instance_id(
    session: aiohttp.ClientSession,
) -> None:
    """An inventory restarted under a new id (or one more added) while the old one is still
    listed, passed over: that is news, and choose goes to it."""
    clock = Clock()
    dead = _instance(1, name="old")
    client = Listed([dead], clock, session=session)
    await client.choose(APP)
    client.refused(dead)
    client.proved_alive(APP)
    await _rechecked(client)
    assert not client.proved_alive(APP)
    client.listing = [dead, _instance(2, name="new")]
    clock.now += 1
    client.proved_alive(APP)
    await _rechecked(client)
    assert client.proved_alive(APP)
    assert not client.proved_alive(APP)
    assert await _ports(client, 3) == [2, 2, 2]


async def test_proved_alive_sees_a_new_instance_when_none_refused(
    session: aiohttp.ClientSession,
) -> None:
    """A breaker opened by 5xx answers (nothing passed over): the first question takes the
    listing as it is, a registration added after it is news."""
    clock = Clock()
    failing = _instance(1)
    client = Listed([failing], clock, session=session)
    await client.choose(APP)
    assert not client.proved_alive(APP), "what was listed when it opened is no news"
    client.listing = [failing, _instance(2)]
    clock.now += 1
    client.proved_alive(APP)
    await _rechecked(client)
    assert client.proved_alive(APP)


class Health:
    """A real server for ``/health/ready``: answers at once, or holds every request
    (a frozen process: the connection is taken, nothing comes back) while ``frozen``."""

    def __init__(self) -> None:
        self.frozen = False
        self.asked = 0
        self.thawed = asyncio.Event()
        self.reached = asyncio.Event()  # set by the first request

    async def ready(self, request: web.Request) -> web.Response:
        self.asked += 1
        self.reached.set()
        if self.frozen:
            await self.thawed.wait()
        return web.json_response({"status": "UP"})


@pytest.fixture
async def health() -> AsyncIterator[tuple[Health, int, aiohttp.ClientSession]]:
    state = Health()
    app = web.Application()
    app.router.add_get("/health/ready", state.ready)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port: int = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    async with aiohttp.ClientSession() as session:
        yield state, port, session
    state.thawed.set()
    await runner.cleanup()


async def test_a_frozen_instance_is_taken_back_once_it_answers_its_health_check(
    health: tuple[Health, int, aiohttp.ClientSession],
) -> None:
    """No new registration after a thaw (SIGCONT): the health check that went unanswered
    while frozen is answered now, which proves it back."""
    state, port, session = health
    clock = Clock()
    frozen, other = _instance(port), _instance(port + 1)
    client = Listed([frozen, other], clock, session=session, health_timeout_s=0.5)
    await client.choose(APP)
    state.frozen = True
    client.refused(frozen)  # its reservation timed out
    assert not client.proved_alive(APP)
    await _rechecked(client)
    assert state.asked == 1
    assert not client.proved_alive(APP), "its health check timed out"
    state.frozen = False
    state.thawed.set()
    clock.now += 1
    client.proved_alive(APP)
    await _rechecked(client)
    assert client.proved_alive(APP)
    assert not client.proved_alive(APP)
    assert sorted(await _ports(client, 2)) == sorted([port, port + 1])


async def test_an_instance_that_always_answers_its_health_check_waits_out_its_pass_over(
    health: tuple[Health, int, aiohttp.ClientSession],
) -> None:
    """Slow (its reservation timed out) but answering: no proof it changed, so no early
    probe and no early return; otherwise a breaker would probe it every second."""
    _, port, session = health
    clock = Clock()
    slow, other = _instance(port), _instance(port + 1)
    client = Listed([slow, other], clock, session=session)
    await client.choose(APP)
    client.refused(slow)
    for _ in range(3):
        client.proved_alive(APP)
        await _rechecked(client)
        assert not client.proved_alive(APP)
        clock.now += 1
    assert await _ports(client, 2) == [port + 1, port + 1]


async def test_close_stops_a_recheck_waiting_on_a_health_check(
    health: tuple[Health, int, aiohttp.ClientSession],
) -> None:
    """At shutdown a health check of a frozen instance may still be waiting: close() ends
    it before the session it uses is closed, and no recheck starts after it."""
    state, port, session = health
    clock = Clock()
    frozen = _instance(port)
    client = Listed([frozen], clock, session=session, health_timeout_s=60)
    await client.choose(APP)
    state.frozen = True
    client.refused(frozen)
    client.proved_alive(APP)
    recheck = client._rechecks[APP]
    await asyncio.wait_for(state.reached.wait(), timeout=5)  # held by the frozen server
    await asyncio.wait_for(client.close(), timeout=5)
    assert recheck.cancelled()
    clock.now += 1
    assert not client.proved_alive(APP)
    assert client._rechecks[APP] is recheck, "no recheck after close"


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """Only what a test sets: the developer's own SHOP_* and ORDER_* must not leak in."""
    for name in list(os.environ):
        if name.startswith(("SHOP_", "ORDER_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SHOP_DATA_DIR", str(tmp_path))
    return monkeypatch


@pytest.mark.parametrize("value", ["0", "-1", "soon", "3601"])
def test_a_pass_over_time_that_means_nothing_stops_the_process_with_one_line(
    value: str, environment: pytest.MonkeyPatch
) -> None:
    environment.setenv("SHOP_PASS_OVER_S", value)
    with pytest.raises(SettingsRefused) as refused:
        load_settings(OrderSettings)
    line = str(refused.value)
    assert line.startswith("SHOP_PASS_OVER_S: ") and "\n" not in line


def test_the_pass_over_time_is_five_seconds_unless_set(environment: pytest.MonkeyPatch) -> None:
    assert PlatformSettings().pass_over_s == 5.0
    environment.setenv("SHOP_PASS_OVER_S", "2.5")
    assert PlatformSettings().pass_over_s == 2.5
