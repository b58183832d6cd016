"""A circuit breaker around calls to a peer service (the order service's to the inventory,
the gateway's to each service it routes to).

Closed: calls go through; ``failure_threshold`` consecutive failures open it. Open: calls
are refused at once with the seconds left (for ``Retry-After``). When the open time has
passed, exactly one call is let through as a probe (half-open): its success closes the
breaker, its failure opens it again for another full period. Other calls are refused
while the probe is out. ``probe_now`` lets the probe go before the period ends, when the
peer is known to be back (a new registration, a health check answered after a freeze:
``RegistryClient.proved_alive``). Hand-written rather than ``purgatory``: see
docs/order.md.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

__all__ = ["BreakerState", "CircuitBreaker", "CircuitOpen"]

log = logging.getLogger("shop.breaker")

# While the probe is out, others are told to come back about when it will have answered.
_PROBE_RETRY_AFTER_S = 1.0


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitOpen(Exception):
    def __init__(self, name: str, *, retry_after_s: float) -> None:
        super().__init__(f"circuit {name} is open")
        self.retry_after_s = retry_after_s


class CircuitBreaker:
    def __init__(
        self,
        *,
        name: str,
        failure_threshold: int,
        open_for_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] = lambda _state: None,
    ) -> None:
        """``on_change`` hears every transition (to open, half-open, closed): metrics."""
        if failure_threshold < 1 or open_for_s <= 0:
            raise ValueError("failure_threshold must be >= 1 and open_for_s > 0")
        self.name = name
        self._threshold = failure_threshold
        self._open_for = open_for_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        self._on_change = on_change

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._probing or self._clock() - self._opened_at >= self._open_for:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def retry_after_s(self) -> float:
        """Seconds until a call may be let through again (0 when closed)."""
        if self._opened_at is None:
            return 0.0
        left = self._opened_at + self._open_for - self._clock()
        if left > 0:
            return left
        return _PROBE_RETRY_AFTER_S if self._probing else 0.0

    def acquire(self) -> None:
        """Ask to make a call: returns to go ahead, raises CircuitOpen to refuse it."""
        if self._opened_at is None:
            return
        wait = self.retry_after_s()
        if wait > 0:
            raise CircuitOpen(self.name, retry_after_s=wait)
        self._probing = True
        log.info("circuit %s half-open: letting one probe through", self.name)
        self._on_change(BreakerState.HALF_OPEN)

    def succeeded(self) -> None:
        was_open = self._opened_at is not None
        self._failures = 0
        self._opened_at = None
        self._probing = False
        if was_open:
            log.info("circuit %s closed: %s answers again", self.name, self.name)
            self._on_change(BreakerState.CLOSED)

    def failed(self) -> None:
        if self._opened_at is not None:
            # The probe failed (or a call let in before the breaker opened): another period.
            self._open()
            return
        self._failures += 1
        if self._failures >= self._threshold:
            self._open()

    def probe_now(self) -> None:
        """The peer proved alive out of band (registered anew, or thawed): end the
        open period now, so the next call is the one probe. Nothing when closed or while a
        probe is out; a failed probe opens the breaker for a full period as usual."""
        if self._opened_at is None or self._probing:
            return
        self._opened_at = min(self._opened_at, self._clock() - self._open_for)

    def abandon(self) -> None:
        """The call was given up without a verdict (cancelled): the next call may probe."""
        self._probing = False

    def _open(self) -> None:
        changes = self._opened_at is None or self._probing
        if changes:
            log.warning(
                "circuit %s open for %.1fs after %d consecutive failures",
                self.name,
                self._open_for,
                max(self._failures, 1),
            )
        self._opened_at = self._clock()
        self._probing = False
        if changes:
            self._on_change(BreakerState.OPEN)
