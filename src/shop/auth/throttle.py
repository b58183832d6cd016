"""Limits on failed log-ins, per email and per client address, held in this process's memory.

Each key keeps the times of its recent failures; once a key has ``max_failures`` inside the
window it is refused until the oldest of them leaves the window. Several auth instances
each count on their own (documented in docs/auth.md).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

__all__ = ["FailureWindow", "LoginThrottle"]


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

    def record_failure(self, key: str) -> None:
        now = self._clock()
        times = self._recent(key, now)
        if times is None:
            if len(self._failures) >= self._max_keys:
                self._forget_stale(now)
            times = self._failures[key] = deque(maxlen=self.max_failures)
        times.append(now)

    def forget(self, key: str) -> None:
        self._failures.pop(key, None)

    def _forget_stale(self, now: float) -> None:
        # Bounded memory under a spray of distinct emails: drop expired keys, then the oldest.
        for key in list(self._failures):
            self._recent(key, now)
        while len(self._failures) >= self._max_keys:
            del self._failures[next(iter(self._failures))]


class LoginThrottle:
    def __init__(
        self,
        *,
        max_failures_per_email: int,
        max_failures_per_client: int,
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._by_email = FailureWindow(
            max_failures=max_failures_per_email, window_s=window_s, clock=clock
        )
        self._by_client = FailureWindow(
            max_failures=max_failures_per_client, window_s=window_s, clock=clock
        )

    def retry_after_s(self, *, email: str, client: str) -> int | None:
        waits = [
            w
            for w in (self._by_email.retry_after(email), self._by_client.retry_after(client))
            if w is not None
        ]
        return max(1, math.ceil(max(waits))) if waits else None

    def record_failure(self, *, email: str, client: str) -> None:
        self._by_email.record_failure(email)
        self._by_client.record_failure(client)

    def record_success(self, *, email: str) -> None:
        # The client's count stays: one good account must not launder a client's guessing.
        self._by_email.forget(email)
