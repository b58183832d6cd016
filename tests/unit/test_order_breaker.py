"""The inventory circuit breaker's state machine, on a fake clock."""

from __future__ import annotations

import pytest

from shop.order.breaker import BreakerState, CircuitBreaker, CircuitOpen
from tests.support import ManualClock


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1000.0)


@pytest.fixture
def breaker(clock: ManualClock) -> CircuitBreaker:
    return CircuitBreaker(
        name="inventory-service", failure_threshold=3, open_for_s=10.0, clock=clock
    )


def _state(breaker: CircuitBreaker) -> BreakerState:
    return breaker.state


def _fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        breaker.acquire()
        breaker.failed()


def test_it_opens_after_the_threshold_of_consecutive_failures(breaker: CircuitBreaker) -> None:
    _fail(breaker, 2)
    assert _state(breaker) is BreakerState.CLOSED
    breaker.acquire()  # still lets calls through
    breaker.failed()
    assert _state(breaker) is BreakerState.OPEN
    with pytest.raises(CircuitOpen) as refused:
        breaker.acquire()
    assert refused.value.retry_after_s == pytest.approx(10.0)


def test_a_success_resets_the_count(breaker: CircuitBreaker) -> None:
    _fail(breaker, 2)
    breaker.acquire()
    breaker.succeeded()
    _fail(breaker, 2)
    assert _state(breaker) is BreakerState.CLOSED


def test_retry_after_counts_down(breaker: CircuitBreaker, clock: ManualClock) -> None:
    _fail(breaker, 3)
    clock.now += 7.5
    with pytest.raises(CircuitOpen) as refused:
        breaker.acquire()
    assert refused.value.retry_after_s == pytest.approx(2.5)
    assert breaker.retry_after_s() == pytest.approx(2.5)


def test_after_the_open_time_one_probe_goes_through_and_its_success_closes(
    breaker: CircuitBreaker, clock: ManualClock
) -> None:
    _fail(breaker, 3)
    clock.now += 10.0
    breaker.acquire()  # the probe
    assert _state(breaker) is BreakerState.HALF_OPEN
    with pytest.raises(CircuitOpen):
        breaker.acquire()  # no second call while the probe is out
    breaker.succeeded()
    assert _state(breaker) is BreakerState.CLOSED
    breaker.acquire()
    breaker.acquire()


def test_a_failed_probe_opens_it_for_another_full_period(
    breaker: CircuitBreaker, clock: ManualClock
) -> None:
    _fail(breaker, 3)
    clock.now += 11.0
    breaker.acquire()
    breaker.failed()  # one failure is enough in half-open
    assert _state(breaker) is BreakerState.OPEN
    with pytest.raises(CircuitOpen) as refused:
        breaker.acquire()
    assert refused.value.retry_after_s == pytest.approx(10.0)
    clock.now += 10.0
    breaker.acquire()
    breaker.succeeded()
    assert _state(breaker) is BreakerState.CLOSED


def test_an_abandoned_probe_lets_the_next_call_probe(
    breaker: CircuitBreaker, clock: ManualClock
) -> None:
    _fail(breaker, 3)
    clock.now += 10.0
    breaker.acquire()
    breaker.abandon()
    breaker.acquire()
    breaker.succeeded()
    assert _state(breaker) is BreakerState.CLOSED


def test_settings_that_would_never_close_or_never_open_are_refused() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(name="x", failure_threshold=0, open_for_s=1.0)
    with pytest.raises(ValueError):
        CircuitBreaker(name="x", failure_threshold=1, open_for_s=0.0)


def test_every_transition_is_heard_once(clock: ManualClock) -> None:
    heard: list[BreakerState] = []
    breaker = CircuitBreaker(
        name="inventory-service",
        failure_threshold=2,
        open_for_s=10.0,
        clock=clock,
        on_change=heard.append,
    )
    _fail(breaker, 2)
    breaker.failed()  # a call let in before it opened: no new transition
    clock.advance(10)
    breaker.acquire()
    breaker.failed()  # the probe fails: open again
    clock.advance(10)
    breaker.acquire()
    breaker.succeeded()
    breaker.succeeded()  # closed already: nothing
    assert heard == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]


def test_probe_now_lets_one_probe_go_before_the_period_ends(
    breaker: CircuitBreaker, clock: ManualClock
) -> None:
    """A peer known to be back (it registered again) is probed at once, still one at a time."""
    _fail(breaker, 3)
    clock.advance(1)
    breaker.probe_now()
    assert breaker.retry_after_s() == 0
    breaker.acquire()
    with pytest.raises(CircuitOpen):
        breaker.acquire()
    breaker.succeeded()
    assert _state(breaker) is BreakerState.CLOSED


def test_a_failed_early_probe_opens_it_for_a_full_period(
    breaker: CircuitBreaker, clock: ManualClock
) -> None:
    _fail(breaker, 3)
    breaker.probe_now()
    breaker.acquire()
    breaker.failed()
    assert breaker.retry_after_s() == pytest.approx(10.0)
    with pytest.raises(CircuitOpen):
        breaker.acquire()


def test_probe_now_changes_nothing_when_closed_or_while_the_probe_is_out(
    breaker: CircuitBreaker, clock: ManualClock
) -> None:
    breaker.probe_now()
    assert _state(breaker) is BreakerState.CLOSED
    _fail(breaker, 3)
    clock.advance(10)
    breaker.acquire()
    breaker.probe_now()
    with pytest.raises(CircuitOpen):
        breaker.acquire()
