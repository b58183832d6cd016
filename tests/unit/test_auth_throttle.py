"""The in-process limit on failed log-ins, per client-and-account and per client."""

from __future__ import annotations

import pytest

from shop.auth.domain import TooManyAttempts
from shop.auth.throttle import FailureWindow, LoginThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _throttle(*, per_pair: int = 100, per_client: int = 100, window_s: float = 60) -> LoginThrottle:
    return LoginThrottle(
        max_failures_per_email=per_pair,
        max_failures_per_client=per_client,
        window_s=window_s,
        clock=Clock(),
    )


def test_a_key_is_refused_after_max_failures_until_the_oldest_leaves_the_window() -> None:
    clock = Clock()
    window = FailureWindow(max_failures=3, window_s=60, clock=clock)
    for _ in range(2):
        window.record_failure("ada")
        clock.now += 10
    assert window.retry_after("ada") is None
    window.record_failure("ada")  # failures at 1000, 1010, 1020
    assert window.retry_after("ada") == 40.0
    clock.now = 1060.0
    assert window.retry_after("ada") is None


def test_keys_are_counted_apart() -> None:
    window = FailureWindow(max_failures=1, window_s=60, clock=Clock())
    window.record_failure("ada")
    assert window.retry_after("ada") is not None
    assert window.retry_after("bob") is None


def test_memory_stays_bounded_under_many_distinct_keys() -> None:
    clock = Clock()
    window = FailureWindow(max_failures=2, window_s=60, clock=clock, max_keys=10)
    for i in range(100):
        window.record_failure(f"user{i}")
    assert len(window._failures) <= 10
    window.record_failure("user99")
    assert window.retry_after("user99") is not None  # the newest keys are the ones kept


async def test_attempts_are_counted_when_admitted_not_when_they_fail() -> None:
    # Three guesses admitted before any of them is judged: the fourth is already refused.
    throttle = _throttle(per_pair=3)
    for _ in range(3):
        await throttle.admit(email="ada@x.io", client="10.0.0.1")
    with pytest.raises(TooManyAttempts) as refused:
        await throttle.admit(email="ada@x.io", client="10.0.0.1")
    assert refused.value.retry_after_s == 60


async def test_one_clients_failures_do_not_lock_the_owner_out_elsewhere() -> None:
    throttle = _throttle(per_pair=2)
    for _ in range(2):
        await throttle.admit(email="ada@x.io", client="203.0.113.66")
    assert throttle.retry_after_s(email="ada@x.io", client="203.0.113.66") == 60
    owner = await throttle.admit(email="ada@x.io", client="10.0.0.2")
    await throttle.succeeded(owner)
    assert throttle.retry_after_s(email="ada@x.io", client="10.0.0.2") is None


async def test_a_client_spraying_many_emails_is_refused_for_every_email() -> None:
    throttle = _throttle(per_client=3)
    for i in range(3):
        await throttle.admit(email=f"user{i}@x.io", client="10.0.0.9")
    assert throttle.retry_after_s(email="fresh@x.io", client="10.0.0.9") == 60
    assert throttle.retry_after_s(email="fresh@x.io", client="10.0.0.8") is None


async def test_success_clears_the_pair_and_is_not_a_failure_but_earlier_failures_stay() -> None:
    throttle = _throttle(per_pair=2, per_client=2)
    await throttle.admit(email="ada@x.io", client="10.0.0.1")
    await throttle.succeeded(await throttle.admit(email="ada@x.io", client="10.0.0.1"))
    assert throttle.retry_after_s(email="ada@x.io", client="10.0.0.1") is None
    await throttle.admit(email="other@x.io", client="10.0.0.1")
    assert throttle.retry_after_s(email="bob@x.io", client="10.0.0.1") is not None


async def test_an_abandoned_attempt_is_not_counted() -> None:
    throttle = _throttle(per_pair=1, per_client=1)
    await throttle.abandoned(await throttle.admit(email="ada@x.io", client="10.0.0.1"))
    assert throttle.retry_after_s(email="ada@x.io", client="10.0.0.1") is None
