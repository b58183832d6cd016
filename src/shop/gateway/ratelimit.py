"""Rate limits per client and per user (SPEC §1), on the ``limits`` library: in this process's
memory, or in Redis so that every gateway instance shares the counts."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

from limits import RateLimitItem, parse_many
from limits.aio.storage import RedisStorage
from limits.aio.strategies import FixedWindowRateLimiter
from limits.errors import StorageError

from shop.platform.problems import Problem

__all__ = ["RateLimits", "parse_limits", "shared_storage"]

log = logging.getLogger("shop.gateway")

_REDIS_SCHEMES = ("redis://", "rediss://", "redis+unix://")


def parse_limits(text: str) -> list[RateLimitItem]:
    """``"50/second"`` or several, ``"50/second;1000/minute"``; ValueError if not."""
    return list(parse_many(text))


def shared_storage(url: str) -> bool:
    return url.startswith(_REDIS_SCHEMES)


class _Windows:
    """Fixed windows counted in this process's memory: per key, the hits of its current
    window and when that window ends. Why not limits' own ``MemoryStorage``: a hit there is
    a coroutine behind a per-key ``asyncio.Lock`` (guarding nothing when no await comes
    between reading the count and writing it) and starts a sweep over every key (260 µs a
    request with 10,000 clients in the window, measured): most of what a hit cost the
    gateway. Bending it meant overriding its private methods; these few lines are the
    same fixed-window arithmetic without them (docs/gateway.md, "Rate limits").

    A window that ended counts as empty when next read; ended windows are dropped all at
    once at most once a second (``sweep_every_s``), so memory follows the clients seen in
    the longest window, not every client ever seen."""

    sweep_every_s = 1.0

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.ends: dict[str, float] = {}
        self._swept_at = time.monotonic()

    def count(self, key: str, expiry: float, now: float) -> int:
        """One hit on ``key`` at ``now`` (``time.time()``); its window's hits so far. A new
        window lasts ``expiry`` seconds from its first hit."""
        if self.ends.get(key, 0.0) > now:
            count = self.counts[key] = self.counts[key] + 1
            return count
        clock = time.monotonic()
        if clock - self._swept_at >= self.sweep_every_s:
            self._swept_at = clock
            self._sweep(now)
        self.counts[key] = 1
        self.ends[key] = now + expiry
        return 1

    def ends_in(self, key: str, now: float) -> float:
        """Seconds until ``key``'s window ends (0 when none is open)."""
        return max(0.0, self.ends.get(key, 0.0) - now)

    def _sweep(self, now: float) -> None:
        ended = [key for key, end in self.ends.items() if end <= now]
        for key in ended:
            del self.ends[key]
            del self.counts[key]


_Counters = tuple[tuple[str, int, int], ...]


def _reached(memory: _Windows, counters: _Counters, now: float) -> bool:
    """Whether a window still open of any of ``counters`` has reached its amount."""
    ends, counts = memory.ends, memory.counts
    for key, amount, _ in counters:
        if ends.get(key, 0.0) > now and counts[key] >= amount:
            return True
    return False


def _count(memory: _Windows, counters: _Counters, now: float) -> None:
    """One hit on each of ``counters``."""
    ends, counts = memory.ends, memory.counts
    for key, _, expiry in counters:
        if ends.get(key, 0.0) > now:
            counts[key] += 1  # a window in progress; ``count`` opens a new one (and sweeps)
        else:
            memory.count(key, expiry, now)


def _admit(memory: _Windows, counters: _Counters, now: float) -> bool:
    """``_reached`` then ``_count``, in one call (the fast lane's public request makes this
    one check): True with a hit on each of ``counters`` if none has reached its amount."""
    ends, counts = memory.ends, memory.counts
    for key, amount, _ in counters:
        if ends.get(key, 0.0) > now and counts[key] >= amount:
            return False
    for key, _, expiry in counters:
        if ends.get(key, 0.0) > now:
            counts[key] += 1  # a window in progress; ``count`` opens a new one (and sweeps)
        else:
            memory.count(key, expiry, now)
    return True


def _redis(url: str, *, key_prefix: str) -> RedisStorage:
    # redis-py rather than limits' default coredis: one Redis client in the dependencies.
    return RedisStorage(
        "async+" + url, implementation="redispy", key_prefix=key_prefix, wrap_exceptions=True
    )


class RateLimits:
    """One fixed-window counter per (limit, client) and per (limit, user): a hit is one
    increment in memory, or one Redis round trip.

    If Redis cannot be reached the request passes (and a warning is logged at most once a
    minute): the limits protect the services, they must not become the outage.
    """

    def __init__(
        self,
        *,
        storage_url: str,
        per_client: Sequence[RateLimitItem],
        per_user: Sequence[RateLimitItem],
        key_prefix: str = "shop-gateway",
    ) -> None:
        # In memory a hit is counted without a coroutine (_Windows); in Redis by limits.
        self._memory: _Windows | None = None
        self._redis: RedisStorage | None = None
        if shared_storage(storage_url):
            self._redis = _redis(storage_url, key_prefix=key_prefix)
        elif storage_url == "memory://":
            self._memory = _Windows()
        else:
            raise ValueError(f"{storage_url!r} is neither memory:// nor redis://")
        self._keys: dict[tuple[RateLimitItem, str, str], str] = {}
        # Per (kind, who): (key, amount, expiry) of each of its limits, for the fast lane.
        self._counter_sets: dict[tuple[str, str], _Counters] = {}
        self._limiter = None if self._redis is None else FixedWindowRateLimiter(self._redis)
        self._per_client = tuple(per_client)
        self._per_user = tuple(per_user)
        self._warned_at = float("-inf")

    async def check_client(self, client: str) -> None:
        await self._check(self._per_client, "client", client)

    def admit_client_now(self, client: str) -> bool:
        """``check_client`` without an await, for the gateway's fast lane: True with the hit
        counted when the client is within every limit; False, nothing counted, when it may
        not be or the counts are not in memory (then ``check_client`` decides and answers).
        """
        memory = self._memory
        if memory is None:
            return False
        counters = self._counter_sets.get(("client", client)) or self._counters("client", client)
        return _admit(memory, counters, time.time())

    def admit_now(self, client: str, user: str) -> bool:
        """``admit_client_now`` with ``user``'s limits too (a token route): True with every
        hit counted when the client and the user are within every limit; False, nothing
        counted, when either may not be (then ``check_client``/``check_user`` decide)."""
        memory = self._memory
        if memory is None:
            return False
        clients, users = self._counters("client", client), self._counters("user", user)
        now = time.time()
        if _reached(memory, clients, now) or _reached(memory, users, now):
            return False
        _count(memory, clients, now)
        _count(memory, users, now)
        return True

    def _counters(self, kind: str, who: str) -> _Counters:
        """(key, amount, expiry) of each of ``kind``'s limits for ``who``, made once."""
        counters = self._counter_sets.get((kind, who))
        if counters is None:
            if len(self._counter_sets) >= 10_000:
                self._counter_sets.clear()
            items = self._per_client if kind == "client" else self._per_user
            counters = self._counter_sets[kind, who] = tuple(
                (self._key(item, kind, who), item.amount, item.get_expiry()) for item in items
            )
        return counters

    async def check_user(self, user: str) -> None:
        await self._check(self._per_user, "user", user)

    async def _check(self, items: Sequence[RateLimitItem], kind: str, who: str) -> None:
        memory, limiter = self._memory, self._limiter
        for item in items:
            if memory is not None:
                now = time.time()
                key = self._key(item, kind, who)
                if memory.count(key, item.get_expiry(), now) <= item.amount:
                    continue
                wait_s = memory.ends_in(key, now)
            else:
                assert limiter is not None  # noqa: S101 - one of the two is set
                try:
                    if await limiter.hit(item, kind, who):
                        continue
                    stats = await limiter.get_window_stats(item, kind, who)
                except StorageError as exc:
                    self._warn(exc)
                    return
                wait_s = stats.reset_time - time.time()
            wait = max(1, math.ceil(wait_s))
            raise Problem(
                429,
                f"Too many requests from this {kind} (limit {item}); retry in {wait} s.",
                headers={"Retry-After": str(wait)},
            )

    def _key(self, item: RateLimitItem, kind: str, who: str) -> str:
        """limits' key for the counter (``get_window_stats`` reads it back), remembered."""
        key = self._keys.get((item, kind, who))
        if key is None:
            if len(self._keys) >= 10_000:
                self._keys.clear()
            key = self._keys[item, kind, who] = item.key_for(kind, who)
        return key

    def _warn(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at >= 60:
            self._warned_at = now
            log.warning("rate limits not enforced: their storage failed (%s)", exc)

    async def close(self) -> None:
        if self._redis is None:
            return
        # limits' Redis storage keeps redis-py's client on its bridge and has no close of its own.
        client = getattr(getattr(self._redis, "bridge", None), "storage", None)
        close = getattr(client, "aclose", None)
        if close is not None:
            await close()
