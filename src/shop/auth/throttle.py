"""Limits on failed log-ins, per client address and account and per client address, held in
this process's memory.

Each key keeps the times of its recent failures; once a key has ``max_failures`` inside the
window it is refused until the oldest of them leaves the window. An attempt is counted as a
failure the moment it is admitted, before the password is checked, and withdrawn only if
it succeeds: there is no gap between the check and the count for concurrent guesses to
slip through. Nothing is counted per account alone, so nobody can lock another person out
(docs/auth.md). Several auth instances each count on their own.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from shop.auth.domain import TooManyAttempts

__all__ = ["Attempt", "FailureWindow", "LoginThrottle"]


class FailureWindow:
    """Recent failures per key, in a sliding window."""

    def __init__(
        self,
        *,
        max_failures: int,
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._clock = clock
        self._max_keys = max_keys
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def retry_after(self, key: str) -> float | None:
        """Seconds until ``key`` may try again, or None if it may now."""
        now = self._clock()
        times = self._recent(key, now)
        if times is None or len(times) < self.max_failures:
            return None
        return times[0] + self.window_s - now

    def record_failure(self, key: str) -> float:
        """Count a failure now; the time returned identifies it to ``withdraw``."""
        now = self._clock()
        times = self._recent(key, now)
        if times is None:
            if len(self._failures) >= self._max_keys:
                self._forget_stale(now)
            times = self._failures[key] = deque(maxlen=self.max_failures)
        times.append(now)
        return now

    def withdraw(self, key: str, at: float) -> None:
        """Un-count one failure recorded at ``at`` (an attempt that turned out well)."""
        times = self._failures.get(key)
        if times is not None and at in times:
            times.remove(at)
            if not times:
                del self._failures[key]

    def forget(self, key: str) -> None:
        self._failures.pop(key, None)

    def _forget_stale(self, now: float) -> None:
        # Bounded memory under a spray of distinct emails: drop expired keys, then the oldest.
        for key in list(self._failures):
            self._recent(key, now)
        while len(self._failures) >= self._max_keys:
            del self._failures[next(iter(self._failures))]


@dataclass(frozen=True, slots=True)
class Attempt:
    """A log-in admitted by the throttle and already counted as a failure."""

    email: str
    client: str
    at_pair: float
    at_client: float


class LoginThrottle:
    """``max_failures_per_email`` counts one account's failures from one client address;
    ``max_failures_per_client`` counts a client's failures over every account."""

    def __init__(
        self,
        *,
        max_failures_per_email: int,
        max_failures_per_client: int,
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._by_pair = FailureWindow(
            max_failures=max_failures_per_email, window_s=window_s, clock=clock
        )
        self._by_client = FailureWindow(
            max_failures=max_failures_per_client, window_s=window_s, clock=clock
        )

    @staticmethod
    def _pair(email: str, client: str) -> str:
        return f"{client}\x00{email}"

    def retry_after_s(self, *, email: str, client: str) -> int | None:
        waits = [
            w
            for w in (
                self._by_pair.retry_after(self._pair(email, client)),
                self._by_client.retry_after(client),
            )
            if w is not None
        ]
        return max(1, math.ceil(max(waits))) if waits else None

    def admit(self, *, email: str, client: str) -> Attempt:
        """Refuse (TooManyAttempts) or count the attempt as a failure, in one step with no
        await in between: N concurrent guesses are N failures."""
        wait = self.retry_after_s(email=email, client=client)
        if wait is not None:
            raise TooManyAttempts(wait)
        return Attempt(
            email=email,
            client=client,
            at_pair=self._by_pair.record_failure(self._pair(email, client)),
            at_client=self._by_client.record_failure(client),
        )

    def succeeded(self, attempt: Attempt) -> None:
        """The right password: the pair's count is cleared and this attempt un-counted; the
        client's earlier failures stay (one good account must not launder its guessing)."""
        self._by_pair.forget(self._pair(attempt.email, attempt.client))
        self._by_client.withdraw(attempt.client, attempt.at_client)

    def abandoned(self, attempt: Attempt) -> None:
        """The check itself failed (a store error): no verdict on the password, no count."""
        self._by_pair.withdraw(self._pair(attempt.email, attempt.client), attempt.at_pair)
        self._by_client.withdraw(attempt.client, attempt.at_client)
