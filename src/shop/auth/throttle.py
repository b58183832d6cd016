"""Limits on failed log-ins, per client address and account and per client address: in this
process's memory (``LoginThrottle``), or in Redis, shared by every auth instance
(``SharedLoginThrottle``). Both are a ``Throttle``: the service awaits the same three calls.

Each key keeps the times of its recent failures; once a key has ``max_failures`` inside the
window it is refused until the oldest of them leaves the window. An attempt is counted as a
failure the moment it is admitted, before the password is checked, and withdrawn only if
it succeeds: there is no gap between the check and the count for concurrent guesses to
slip through. Nothing is counted per account alone, so nobody can lock another person out
(docs/auth.md).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from shop.auth.domain import TooManyAttempts

if TYPE_CHECKING:
    from prometheus_client import Counter
    from redis.asyncio import Redis

# redis-py is imported only where the shared throttle is configured: importing it costs auth
# ~80 ms of CPU at every start (docs/auth.md), for nothing on the embedded profile.

__all__ = [
    "Attempt",
    "FailureWindow",
    "LoginThrottle",
    "SharedLoginThrottle",
    "Throttle",
    "check_redis_url",
    "redis_client",
]

log = logging.getLogger("shop.auth")


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
    """A log-in admitted by the throttle and already counted as a failure: what it takes to
    withdraw that count again."""

    email: str
    client: str
    # When it was counted: this process's clock, or Redis's TIME (µs) for a shared count.
    at_pair: float
    at_client: float
    # Its member in the shared sorted sets; None when it was counted in this process's memory.
    member: str | None = None


class Throttle(Protocol):
    """What the service needs of a log-in throttle, wherever it keeps the counts."""

    async def admit(self, *, email: str, client: str) -> Attempt:
        """Raise TooManyAttempts, or count the attempt as a failure and return it."""

    async def succeeded(self, attempt: Attempt) -> None:
        """The right password: clear the pair's count and un-count this attempt."""

    async def abandoned(self, attempt: Attempt) -> None:
        """No verdict on the password (a store error): un-count this attempt."""

    async def aclose(self) -> None:
        """Release what it holds (a connection pool)."""


class LoginThrottle:
    """``max_failures_per_email`` counts one account's failures from one client address;
    ``max_failures_per_client`` counts a client's failures over every account. The counts
    are this process's: several instances each count their own."""

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
        return _whole_seconds(max(waits)) if waits else None

    async def admit(self, *, email: str, client: str) -> Attempt:
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

    async def succeeded(self, attempt: Attempt) -> None:
        """The right password: the pair's count is cleared and this attempt un-counted; the
        client's earlier failures stay (one good account must not launder its guessing)."""
        self._by_pair.forget(self._pair(attempt.email, attempt.client))
        self._by_client.withdraw(attempt.client, attempt.at_client)

    async def abandoned(self, attempt: Attempt) -> None:
        """The check itself failed (a store error): no verdict on the password, no count."""
        self._by_pair.withdraw(self._pair(attempt.email, attempt.client), attempt.at_pair)
        self._by_client.withdraw(attempt.client, attempt.at_client)

    async def aclose(self) -> None:
        """Nothing to release."""


def _whole_seconds(wait_s: float) -> int:
    """Retry-After: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(wait_s))


# --- shared through Redis ---------------------------------------------------------------------

_REDIS_SCHEMES = frozenset({"redis", "rediss"})
# Redis answers in well under a millisecond on a private network: past this, the attempt is
# counted in memory rather than make a log-in wait (docs/auth.md).
REDIS_TIMEOUT_S = 0.5


def check_redis_url(url: str) -> None:
    """ValueError, naming what to give, unless ``url`` is a redis:// or rediss:// URL that
    redis-py can connect with (host, port and database number included)."""
    from redis.asyncio.connection import parse_url

    usage = "give redis://host:6379/0 (or rediss:// for TLS)"
    try:
        parts = urlsplit(url)
        valid = parts.scheme.lower() in _REDIS_SCHEMES and bool(parts.hostname)
        # redis-py ignores a database that is not a number: refuse it rather than use db 0.
        database = parts.path.lstrip("/")
        valid = valid and (not database or database.isdigit())
        if valid:
            parse_url(url)  # the port, and options in the query string, as redis-py reads them
    except ValueError as exc:
        raise ValueError(f"{usage}: {exc}") from None
    if not valid:
        raise ValueError(usage)


def redis_client(url: str, *, timeout_s: float = REDIS_TIMEOUT_S) -> Redis:
    """A client that fails fast: no retries, short timeouts. A failed call is answered from
    this process's memory at once (SharedLoginThrottle), so retrying would only delay it."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


# One admit, atomically: drop the failures that left the window, refuse if either key is at its
# limit (with the wait until enough of them leave), else count the attempt under both keys.
# Scored by Redis's own clock (TIME, in µs), so the instances' clocks never matter.
# KEYS: the (client, account) pair's sorted set, the client's. ARGV: the window in µs, the
# pair's limit, the client's limit, this attempt's unique member.
# Returns {1, now} when admitted, {0, wait in µs} when refused.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[1])
local wait = 0
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local over = redis.call('ZCARD', key) - tonumber(ARGV[i + 1])
  if over >= 0 then
    -- Refused until the failure at rank `over` (0 = the oldest) leaves the window.
    local leaving = redis.call('ZRANGE', key, over, over, 'WITHSCORES')
    wait = math.max(wait, tonumber(leaving[2]) + window - now)
  end
end
if wait > 0 then
  return {0, wait}
end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[4])
  redis.call('PEXPIRE', key, math.ceil(window / 1000))
end
return {1, now}
"""


class SharedLoginThrottle:
    """The same rules as ``LoginThrottle``, with the counts in Redis: one sorted set of
    failures per (client, account) and per client, shared by every auth instance, kept across
    restarts. Each admit is one Lua script, so N concurrent guesses at any instances are N
    failures.

    When Redis fails (down, a time-out), the attempt is throttled by this process's memory
    instead: never admitted unthrottled, never a 5xx. A WARNING is logged once per outage;
    each attempt judged in memory meanwhile increments ``fallbacks``. While Redis is down it
    is tried again at most every ``retry_every_s``, so an outage does not cost every log-in a
    time-out.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        max_failures_per_email: int,
        max_failures_per_client: int,
        window_s: float,
        key_prefix: str,
        fallbacks: Counter | None = None,
        retry_every_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from redis.exceptions import RedisError

        # What counts as Redis failing: its own errors (connection, time-out, a refused
        # command) and the socket's, which redis-py mostly wraps but not always.
        self._failures: tuple[type[Exception], ...] = (RedisError, OSError)
        self._redis = redis
        self._admit = redis.register_script(_ADMIT)
        self._limits = (max_failures_per_email, max_failures_per_client)
        self._window_us = max(1, round(window_s * 1_000_000))
        self._prefix = key_prefix
        self._memory = LoginThrottle(
            max_failures_per_email=max_failures_per_email,
            max_failures_per_client=max_failures_per_client,
            window_s=window_s,
            clock=clock,
        )
        self._fallbacks = fallbacks
        self._retry_every_s = retry_every_s
        self._clock = clock
        self._down = False
        self._next_try = float("-inf")

    def keys(self, *, email: str, client: str) -> tuple[str, str]:
        """The Redis keys of the (client, account) pair and of the client. The client is their
        hash tag, so both fall in one Redis Cluster slot, as one script's keys must."""
        return f"{self._prefix}:{{{client}}}:pair:{email}", f"{self._prefix}:{{{client}}}:client"

    async def admit(self, *, email: str, client: str) -> Attempt:
        if self._down and self._clock() < self._next_try:
            return await self._admit_in_memory(email=email, client=client)
        member = uuid.uuid4().hex
        try:
            if self._down:
                # This attempt probes Redis; the others meanwhile go on in memory.
                self._next_try = self._clock() + self._retry_every_s
            admitted, value = await self._admit(
                keys=self.keys(email=email, client=client),
                args=[self._window_us, *self._limits, member],
            )
        except self._failures as exc:
            self._failed(exc)
            return await self._admit_in_memory(email=email, client=client)
        self._answered()
        if not admitted:
            raise TooManyAttempts(_whole_seconds(int(value) / 1_000_000))
        at = float(value)
        return Attempt(email=email, client=client, at_pair=at, at_client=at, member=member)

    async def succeeded(self, attempt: Attempt) -> None:
        if attempt.member is None:
            await self._memory.succeeded(attempt)
        else:
            await self._withdraw(attempt, clear_pair=True)

    async def abandoned(self, attempt: Attempt) -> None:
        if attempt.member is None:
            await self._memory.abandoned(attempt)
        else:
            await self._withdraw(attempt, clear_pair=False)

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def _admit_in_memory(self, *, email: str, client: str) -> Attempt:
        if self._fallbacks is not None:
            self._fallbacks.inc()
        return await self._memory.admit(email=email, client=client)

    async def _withdraw(self, attempt: Attempt, *, clear_pair: bool) -> None:
        """Un-count a shared attempt under both keys (MULTI/EXEC: both or neither), clearing
        the pair's count too after a success. If Redis fails the attempt stays counted until
        the window ends: a log-in must not fail because its count could not be withdrawn."""
        assert attempt.member is not None  # noqa: S101 - callers route memory attempts away
        if self._down and self._clock() < self._next_try:
            return  # not worth a time-out on a log-in that succeeded
        pair, client = self.keys(email=attempt.email, client=attempt.client)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                if clear_pair:
                    pipe.delete(pair)
                else:
                    pipe.zrem(pair, attempt.member)
                pipe.zrem(client, attempt.member)
                await pipe.execute()
        except self._failures as exc:
            self._failed(exc)
        else:
            self._answered()

    def _failed(self, exc: BaseException) -> None:
        self._next_try = self._clock() + self._retry_every_s
        if not self._down:
            self._down = True
            log.warning(
                "log-in throttle: Redis failed (%r); counting failed log-ins in this"
                " process's memory until it answers again",
                exc,
            )

    def _answered(self) -> None:
        if self._down:
            self._down = False
            log.info("log-in throttle: Redis answers again; failed log-ins are shared again")
