"""The in-process limit on failed log-ins, per email and per client."""

from __future__ import annotations

from shop.auth.throttle import FailureWindow, LoginThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


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


def test_throttle_refuses_by_email_and_reports_whole_seconds() -> None:
    clock = Clock()
    throttle = LoginThrottle(
        max_failures_per_email=2, max_failures_per_client=100, window_s=30.5, clock=clock
    )
    throttle.record_failure(email="ada@x.io", client="10.0.0.1")
    throttle.record_failure(email="ada@x.io", client="10.0.0.2")
    assert throttle.retry_after_s(email="ada@x.io", client="10.0.0.3") == 31
    assert throttle.retry_after_s(email="bob@x.io", client="10.0.0.1") is None


def test_throttle_refuses_a_client_spraying_many_emails() -> None:
    throttle = LoginThrottle(
        max_failures_per_email=100, max_failures_per_client=3, window_s=60, clock=Clock()
    )
    for i in range(3):
        throttle.record_failure(email=f"user{i}@x.io", client="10.0.0.9")
    assert throttle.retry_after_s(email="fresh@x.io", client="10.0.0.9") == 60
    assert throttle.retry_after_s(email="fresh@x.io", client="10.0.0.8") is None


def test_success_clears_the_email_but_not_the_client() -> None:
    throttle = LoginThrottle(
        max_failures_per_email=2, max_failures_per_client=2, window_s=60, clock=Clock()
    )
    throttle.record_failure(email="ada@x.io", client="10.0.0.1")
    throttle.record_failure(email="ada@x.io", client="10.0.0.1")
    throttle.record_success(email="ada@x.io")
    assert throttle.retry_after_s(email="ada@x.io", client="10.0.0.2") is None
    assert throttle.retry_after_s(email="other@x.io", client="10.0.0.1") is not None
