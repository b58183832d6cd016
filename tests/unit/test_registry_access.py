"""Who may change the registry: a credential bound to an application; writes throttled per
address."""

from __future__ import annotations

import base64

import pytest

from shop.registry.access import (
    NotAuthenticated,
    NotPermitted,
    Registrants,
    Throttled,
    WriteThrottle,
)
from tests.support import ManualClock

ORDER_SECRET = "o" * 32
AUTH_SECRET = "a" * 32


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def registrants() -> Registrants:
    return Registrants({"order-service": ORDER_SECRET, "AUTH-SERVICE": AUTH_SECRET})


def test_an_application_changes_itself_with_its_own_secret(registrants: Registrants) -> None:
    registrants.check("ORDER-SERVICE", basic("order-service", ORDER_SECRET))
    registrants.check("order-service", basic("ORDER-SERVICE", ORDER_SECRET))


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer " + ORDER_SECRET,
        "Basic not-base64!",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        basic("auth-service", ORDER_SECRET),  # a real secret, but not this name's
        basic("order-service", ORDER_SECRET[:-1]),
        basic("stranger", ORDER_SECRET),
    ],
)
def test_without_a_valid_credential_it_is_not_authenticated(
    registrants: Registrants, authorization: str | None
) -> None:
    with pytest.raises(NotAuthenticated) as refused:
        registrants.check("AUTH-SERVICE", authorization)
    assert ORDER_SECRET not in str(refused.value)


def test_a_valid_credential_of_another_application_is_not_permitted(
    registrants: Registrants,
) -> None:
    with pytest.raises(NotPermitted):
        registrants.check("AUTH-SERVICE", basic("order-service", ORDER_SECRET))


def test_with_no_registrants_configured_writes_are_open() -> None:
    open_registry = Registrants({})
    assert not open_registry.enforced
    open_registry.check("AUTH-SERVICE", None)


def test_the_throttle_allows_a_burst_then_the_rate() -> None:
    clock = ManualClock(0.0)
    throttle = WriteThrottle(rate_per_s=2.0, burst=3, clock=clock)
    for _ in range(3):
        throttle.take("10.0.0.1")
    with pytest.raises(Throttled) as throttled:
        throttle.take("10.0.0.1")
    assert throttled.value.retry_after_s == 1
    throttle.take("10.0.0.2")  # another address has its own bucket
    clock.advance(0.5)
    throttle.take("10.0.0.1")  # one write back after 1/rate seconds
    with pytest.raises(Throttled):
        throttle.take("10.0.0.1")


def test_a_throttled_address_is_told_when_to_retry() -> None:
    clock = ManualClock(0.0)
    throttle = WriteThrottle(rate_per_s=0.1, burst=1, clock=clock)
    throttle.take("10.0.0.1")
    with pytest.raises(Throttled) as throttled:
        throttle.take("10.0.0.1")
    assert throttled.value.retry_after_s == 10


def test_the_throttle_tracks_a_bounded_number_of_addresses() -> None:
    clock = ManualClock(0.0)
    throttle = WriteThrottle(rate_per_s=1.0, burst=1, clock=clock, max_addresses=3)
    for n in range(100):
        throttle.take(f"10.0.0.{n}")  # each spends its only token: none is idle
    assert throttle.tracked_addresses <= 3
    with pytest.raises(Throttled):
        throttle.take("10.0.0.99")  # the latest is still remembered
