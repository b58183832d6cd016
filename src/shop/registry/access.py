"""Who may change the registry: a credential bound to the application it registers, and a
throttle on writes per client address.

Reading stays open; every write (register, renew, cancel, status override and its removal)
goes through ``Registrants.check`` and ``WriteThrottle.take``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import math
from collections.abc import Mapping
from dataclasses import dataclass

from shop.registry.domain import Clock

__all__ = ["NotAuthenticated", "NotPermitted", "Registrants", "Throttled", "WriteThrottle"]


class NotAuthenticated(Exception):
    """No credential, or one the registry does not recognise (401)."""


class NotPermitted(Exception):
    """A valid credential of another application (403)."""


class Throttled(Exception):
    """Too many writes from one client address (429); ``retry_after_s`` says when to retry."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"Too many registry writes from this address; retry in {retry_after_s} s.")
        self.retry_after_s = retry_after_s


def _basic(authorization: str | None) -> tuple[str, str] | None:
    scheme, _, encoded = (authorization or "").strip().partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon else None


class Registrants:
    """Application name (upper-case) → its secret. Empty: every write is allowed (the
    embedded profile's registry started alone; production refuses to start so)."""

    def __init__(self, secrets: Mapping[str, str]) -> None:
        self._secrets = {name.upper(): secret.encode() for name, secret in secrets.items()}

    @property
    def enforced(self) -> bool:
        return bool(self._secrets)

    def check(self, app: str, authorization: str | None) -> None:
        """Raise unless ``authorization`` is HTTP Basic naming ``app`` with its secret."""
        if not self._secrets:
            return
        credential = _basic(authorization)
        if credential is None:
            raise NotAuthenticated("Registry writes need HTTP Basic credentials.")
        user, password = credential[0].upper(), credential[1].encode()
        expected = self._secrets.get(user)
        # Compared even for an unknown name, so timing does not tell which names exist.
        matches = hmac.compare_digest(password, expected or b"\0" * 32) and expected is not None
        if not matches:
            raise NotAuthenticated("The registry does not recognise these credentials.")
        if user != app.upper():
            raise NotPermitted("These credentials belong to another application.")


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class WriteThrottle:
    """A token bucket per client address: ``rate_per_s`` writes a second, ``burst`` at once.

    Kept in memory: each registry node throttles what reaches it. Addresses whose bucket
    has filled up again are forgotten once more than ``max_addresses`` are tracked.
    """

    def __init__(
        self, *, rate_per_s: float, burst: int, clock: Clock, max_addresses: int = 10_000
    ) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._clock = clock
        self._max_addresses = max_addresses
        self._buckets: dict[str, _Bucket] = {}

    @property
    def tracked_addresses(self) -> int:
        return len(self._buckets)

    def take(self, address: str) -> None:
        """Count one write from ``address``; raise ``Throttled`` when it has none left."""
        now = self._clock()
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= self._max_addresses:
                self._forget_idle(now)
            bucket = self._buckets[address] = _Bucket(tokens=self._burst, at=now)
        # max(): a wall clock stepped back must not take tokens away.
        elapsed = max(0.0, now - bucket.at)
        bucket.tokens = min(self._burst, bucket.tokens + elapsed * self._rate)
        bucket.at = now
        if bucket.tokens < 1.0:
            raise Throttled(max(1, math.ceil((1.0 - bucket.tokens) / self._rate)))
        bucket.tokens -= 1.0

    def _forget_idle(self, now: float) -> None:
        full = [
            address
            for address, bucket in self._buckets.items()
            if bucket.tokens + max(0.0, now - bucket.at) * self._rate >= self._burst
        ]
        for address in full:
            del self._buckets[address]
        if len(self._buckets) >= self._max_addresses:
            # Every tracked address is busy: drop the oldest rather than grow without bound.
            oldest = min(self._buckets, key=lambda a: self._buckets[a].at)
            del self._buckets[oldest]
