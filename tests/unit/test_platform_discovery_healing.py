"""The picking rules of RegistryClient.choose: an instance that refused is passed over until
it proves alive (its quarantine ends, or it registered again). A fake clock, no sleeps."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import aiohttp

from shop.platform.discovery import Instance, RegistryClient

APP = "inventory-service"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _instance(port: int, *, registered_at_ms: int = 1) -> Instance:
    return Instance(
        app=APP,
        instance_id=f"127.0.0.1:{APP}:{port}",
        host="127.0.0.1",
        port=port,
        registered_at_ms=registered_at_ms,
    )


class Listed(RegistryClient):
    """The registry's answer is ``listing``; ``fetches`` counts the lookups."""

    def __init__(self, listing: list[Instance], clock: Clock) -> None:
        session = cast(aiohttp.ClientSession, object())  # never used: fetch is replaced
        super().__init__(base_url="http://registry", session=session, clock=clock)
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


async def test_registered_again_sees_a_new_registration_of_one_passed_over() -> None:
    """Without waiting: it answers from the latest lookup and looks again in the background
    (at most once a second), so a breaker can probe a restarted peer at once."""
    clock = Clock()
    dead = _instance(1, registered_at_ms=1)
    client = Listed([dead], clock)
    assert not client.registered_again(APP), "nothing passed over: nothing to look for"
    await client.choose(APP)
    client.refused(dead)
    assert not client.registered_again(APP)  # nothing cached: a lookup starts
    await asyncio.sleep(0)  # the background lookup (the fake registry answers at once)
    assert client.fetches == 2
    assert not client.registered_again(APP), "the same registration"
    client.listing = [_instance(1, registered_at_ms=2)]
    assert not client.registered_again(APP), "the lookup is less than a second old"
    clock.now += 1
    client.registered_again(APP)
    await asyncio.sleep(0)
    assert client.registered_again(APP)
    assert await _ports(client, 1) == [1]
    assert not client.registered_again(APP), "chosen again: no longer passed over"
