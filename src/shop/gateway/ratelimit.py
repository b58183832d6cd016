"""Rate limits per client and per user (SPEC §1), on the ``limits`` library: in this process's
memory, or in Redis so that every gateway instance shares the counts."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
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


class _SweptMemoryStorage(MemoryStorage):
    """limits' MemoryStorage starts a sweep over every key after each hit: 260 µs a request
    with 10,000 clients in the window (measured). Expired counters are already ignored when
    read, so sweeping once a second only delays reclaiming their memory."""

    sweep_every_s = 1.0
    _swept_at = float("-inf")

    async def _MemoryStorage__schedule_expiry(self) -> None:
        now = time.monotonic()
        if now - self._swept_at >= self.sweep_every_s:
            self._swept_at = now
            await super()._MemoryStorage__schedule_expiry()  # type: ignore[misc]

    async def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        return self.count(key, expiry, amount)

    def count(self, key: str, expiry: float, amount: int = 1) -> int:
        """limits' ``incr``, without an await: its per-key asyncio.Lock guards nothing when
        no await comes between reading the count and writing it, and the coroutines and
        the lock were most of the cost of a hit (a few per cent of the gateway's CPU)."""
        now = time.time()
        if self.expirations.get(key, 0) <= now:
            self.storage.pop(key, None)
            self.expirations.pop(key, None)
        clock = time.monotonic()
        if clock - self._swept_at >= self.sweep_every_s:
            self._swept_at = clock
            timer = self.timer
            if timer is None or timer.done():
                self.timer = asyncio.create_task(self._MemoryStorage__expire_events())  # type: ignore[attr-defined]
        count = self.storage[key] + amount
        self.storage[key] = count
        if count == amount:
            self.expirations[key] = now + expiry
        return count


_Counters = tuple[tuple[str, int, int], ...]


def _reached(memory: _SweptMemoryStorage, counters: _Counters, now: float) -> bool:
    """Whether a window still open of any of ``counters`` has reached its amount."""
    expirations, counts = memory.expirations, memory.storage
    for key, amount, _ in counters:
        if expirations.get(key, 0) > now and counts.get(key, 0) >= amount:
            return True
    return False


def _count(memory: _SweptMemoryStorage, counters: _Counters, now: float) -> None:
    """One hit on each of ``counters``."""
    expirations, counts = memory.expirations, memory.storage
    for key, _, expiry in counters:
        if expirations.get(key, 0) > now:
            counts[key] += 1  # a window in progress; ``count`` opens a new one (and sweeps)
        else:
            memory.count(key, expiry)


def _admit(memory: _SweptMemoryStorage, counters: _Counters, now: float) -> bool:
    """``_reached`` then ``_count``, in one call (the fast lane's public request makes this
    one check): True with a hit on each of ``counters`` if none has reached its amount."""
    expirations, counts = memory.expirations, memory.storage
    for key, amount, _ in counters:
        if expirations.get(key, 0) > now and counts.get(key, 0) >= amount:
            return False
    for key, _, expiry in counters:
        if expirations.get(key, 0) > now:
            counts[key] += 1
        else:
            memory.count(key, expiry)
    return True


def _storage(url: str, *, key_prefix: str) -> Storage:
    if shared_storage(url):
        # redis-py rather than limits' default coredis: one Redis client in the dependencies.
        return RedisStorage(
            "async+" + url, implementation="redispy", key_prefix=key_prefix, wrap_exceptions=True
        )
    if url == "memory://":
        return _SweptMemoryStorage()
    raise ValueError(f"{url!r} is neither memory:// nor redis://")


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
        self._storage = _storage(storage_url, key_prefix=key_prefix)
        # In memory a hit is counted without a coroutine (see _SweptMemoryStorage.count).
        self._memory = self._storage if isinstance(self._storage, _SweptMemoryStorage) else None
        self._keys: dict[tuple[RateLimitItem, str, str], str] = {}
        # Per (kind, who): (key, amount, expiry) of each of its limits, for the fast lane.
        self._counter_sets: dict[tuple[str, str], _Counters] = {}
        self._limiter = FixedWindowRateLimiter(self._storage)
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
        memory = self._memory
        for item in items:
            try:
                if memory is not None:
                    if memory.count(self._key(item, kind, who), item.get_expiry()) <= item.amount:
                        continue
                elif await self._limiter.hit(item, kind, who):
                    continue
                stats = await self._limiter.get_window_stats(item, kind, who)
            except StorageError as exc:
                self._warn(exc)
                return
            wait = max(1, math.ceil(stats.reset_time - time.time()))
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
        if isinstance(self._storage, MemoryStorage):
            # Its expiry sweep is a task of its own; a shut-down loop must not find it pending.
            timer = self._storage.timer
            if timer is not None and not timer.done():
                timer.cancel()
            return
        client = getattr(getattr(self._storage, "bridge", None), "storage", None)
        close = getattr(client, "aclose", None)
        if close is not None:
            await close()
