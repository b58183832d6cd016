"""The gateway's rate limits in memory: what is counted apart, and what a refusal says."""

from __future__ import annotations

import asyncio

import pytest
from limits.aio.storage import MemoryStorage

from shop.gateway.ratelimit import RateLimits, _SweptMemoryStorage, parse_limits
from shop.platform.problems import Problem


def _limits(per_client: str = "2/minute", per_user: str = "2/minute") -> RateLimits:
    return RateLimits(
        storage_url="memory://",
        per_client=parse_limits(per_client),
        per_user=parse_limits(per_user),
    )


async def test_a_client_over_its_limit_gets_429_with_retry_after() -> None:
    limits = _limits()
    try:
        for _ in range(2):
            await limits.check_client("10.0.0.1")
        with pytest.raises(Problem) as refused:
            await limits.check_client("10.0.0.1")
        assert refused.value.status == 429
        assert 1 <= int(refused.value.headers["Retry-After"]) <= 60
        await limits.check_client("10.0.0.2")
        # A user named like a client address is another counter.
        await limits.check_user("10.0.0.1")
    finally:
        await limits.close()


async def test_every_limit_of_a_list_applies() -> None:
    limits = _limits(per_client="5/minute;2/second")
    try:
        for _ in range(2):
            await limits.check_client("10.0.0.1")
        with pytest.raises(Problem):
            await limits.check_client("10.0.0.1")
    finally:
        await limits.close()


def test_limits_that_do_not_parse_are_refused() -> None:
    with pytest.raises(ValueError):
        parse_limits("lots")


async def test_the_memory_sweep_runs_at_most_once_a_second() -> None:
    # The override must name the method limits really calls, or the sweep is per request.
    assert callable(getattr(MemoryStorage, "_MemoryStorage__schedule_expiry", None))
    storage = _SweptMemoryStorage()
    await storage.incr("a", 60)
    first = storage.timer
    assert first is not None
    await asyncio.sleep(0)  # the first sweep runs and finishes
    for key in range(100):
        await storage.incr(f"k{key}", 60)
    assert storage.timer is first


async def test_the_fast_lanes_check_counts_like_check_client_and_never_refuses_itself() -> None:
    limits = _limits(per_client="5/minute;2/second")
    try:
        assert limits.admit_client_now("10.0.0.1")
        await limits.check_client("10.0.0.1")  # the second of 2 a second
        # At a limit it counts nothing and leaves the answer (429) to check_client.
        assert not limits.admit_client_now("10.0.0.1")
        assert not limits.admit_client_now("10.0.0.1")
        with pytest.raises(Problem) as refused:
            await limits.check_client("10.0.0.1")
        assert refused.value.status == 429
        assert limits.admit_client_now("10.0.0.2")
    finally:
        await limits.close()


async def test_the_fast_lanes_check_of_a_user_counts_both_or_neither() -> None:
    limits = _limits(per_client="100/minute", per_user="2/minute")
    try:
        assert limits.admit_now("10.0.0.1", "alice")
        assert limits.admit_now("10.0.0.2", "alice")  # the user's limit spans addresses
        # At the user's limit: nothing counted, the answer (429) is check_user's.
        assert not limits.admit_now("10.0.0.3", "alice")
        with pytest.raises(Problem) as refused:
            await limits.check_user("alice")
        assert refused.value.status == 429
        # The refused hit counted nothing against the client either.
        for _ in range(100):
            assert limits.admit_client_now("10.0.0.3")
        assert not limits.admit_client_now("10.0.0.3")
        assert limits.admit_now("10.0.0.4", "bob")
    finally:
        await limits.close()
