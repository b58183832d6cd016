"""The gateway's rate limits in memory: what is counted apart, and what a refusal says."""

from __future__ import annotations

import pytest

from shop.gateway.ratelimit import RateLimits, _reached, _Windows, parse_limits
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


def test_a_window_that_ended_counts_afresh_and_is_dropped_at_the_next_sweep() -> None:
    windows = _Windows()
    windows.sweep_every_s = 3600.0  # no sweep within the test
    assert [windows.count("a", 10, now) for now in (0.0, 1.0, 2.0)] == [1, 2, 3]
    at_three = (("a", 3, 10),)  # (key, amount, expiry), as RateLimits keeps its limits
    assert _reached(windows, at_three, 9.9)
    assert windows.ends_in("a", 9.0) == pytest.approx(1.0)
    # The window ended at 10: the next hit opens a new one, the old count is gone.
    assert not _reached(windows, at_three, 10.0)
    assert windows.ends_in("a", 10.0) == 0.0
    assert windows.count("a", 10, 10.0) == 1
    # Ended windows of other keys stay in memory until a sweep, which drops them all.
    windows.count("b", 1, 11.0)
    assert "b" in windows.counts
    windows.sweep_every_s = 0.0
    windows.count("c", 10, 13.0)  # a new window: the sweep runs
    assert "b" not in windows.counts and "b" not in windows.ends
    assert windows.counts == {"a": 1, "c": 1}


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
