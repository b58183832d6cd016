"""The gateway's Upstreams: an instance that refused is passed over, and taken back at once
when the registry lists it registered again (a restarted process)."""

from __future__ import annotations

from typing import cast

import aiohttp

from shop.gateway.service import Upstreams
from shop.platform.discovery import Instance, RegistryClient

APP = "inventory-service"


def _instance(port: int, *, registered_at_ms: int = 1) -> Instance:
    return Instance(
        app=APP,
        instance_id=f"127.0.0.1:{APP}:{port}",
        host="127.0.0.1",
        port=port,
        registered_at_ms=registered_at_ms,
    )


class Listed(RegistryClient):
    def __init__(self, listing: list[Instance]) -> None:
        session = cast(aiohttp.ClientSession, object())  # never used: fetch is replaced
        super().__init__(base_url="http://registry", session=session)
        self.listing = listing
        self.fetches = 0

    async def fetch(self, app: str) -> list[Instance]:
        self.fetches += 1
        return list(self.listing)


async def test_a_refused_instance_is_passed_over_then_taken_back_once_registered_again() -> None:
    dead, other = _instance(1), _instance(2)
    registry = Listed([dead, other])
    upstreams = Upstreams(registry=registry, fixed={})
    assert len(await upstreams.candidates(APP)) == 2
    upstreams.refused(dead.base_url, APP)
    for _ in range(3):
        assert (await upstreams.candidates(APP))[0] == other.base_url
    assert registry.fetches == 2, "the first refusal has the service looked up afresh"
    upstreams.refused(dead.base_url, APP)
    await upstreams.candidates(APP)
    assert registry.fetches == 2, "not again while it is passed over"

    registry.listing = [_instance(1, registered_at_ms=2), other]
    registry.forget(APP)
    firsts = {(await upstreams.candidates(APP))[0] for _ in range(2)}
    assert firsts == {dead.base_url, other.base_url}


async def test_a_lone_instance_that_refused_is_still_a_candidate() -> None:
    only = _instance(1)
    upstreams = Upstreams(registry=Listed([only]), fixed={})
    await upstreams.candidates(APP)
    upstreams.refused(only.base_url, APP)
    assert await upstreams.candidates(APP) == [only.base_url]
