"""Giving reserved stock back to the inventory, durably: the release reconciler.

Every reservation the order service asks for is preceded by a ``pending_releases`` row in
its own database, due once the request has surely ended; the transaction that saves the
order deletes it. A cancel writes one due at once. Whatever happens in between — a save
that fails, a timeout, the process dying — the row outlives it, and this reconciler
releases every due row (``DELETE /internal/reservations/{n}``, idempotent at the
inventory) until the inventory confirms. One process per service runs it (a lease in the
order database); each row backs off on its own after a failed attempt.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from shop.order.domain import Unavailable, UpstreamRefused
from shop.order.peers import Inventory
from shop.order.store import PendingReleases
from shop.platform.lease import Lease
from shop.platform.worker import LeasedLoop

__all__ = ["ReleaseOutcome", "ReleaseReconciler"]

log = logging.getLogger("shop.order.releases")


def _utcnow() -> datetime:
    return datetime.now(UTC)


class ReleaseOutcome(enum.Enum):
    RELEASED = "released"
    FAILED = "failed"  # the inventory refused it oddly; tried again after a back-off
    UNAVAILABLE = "unavailable"  # the inventory (or auth) cannot be reached now
    NOT_OURS = "not-ours"  # not due, or another caller started it first


class ReleaseReconciler:
    def __init__(
        self,
        *,
        store: PendingReleases,
        inventory: Inventory,
        lease: Lease | None,
        interval_s: float = 1.0,
        backoff_s: float = 2.0,
        backoff_max_s: float = 60.0,
        batch_size: int = 50,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._store = store
        self._inventory = inventory
        self._backoff = backoff_s
        self._backoff_max = backoff_max_s
        self._batch = batch_size
        self._clock = clock
        # lease None: this process is the only one (tests); otherwise one holder per service.
        self._loop = LeasedLoop(
            self._step,
            name="release-reconciler",
            lease=lease,
            interval_s=interval_s,
            backoff_s=min(interval_s, 1.0),
            backoff_max_s=10.0,
        )

    def retry_delay(self, attempts: int) -> timedelta:
        """How long a release waits after its ``attempts``-th try before the next one."""
        exponent = min(max(attempts - 1, 0), 16)
        return timedelta(seconds=min(self._backoff * 2**exponent, self._backoff_max))

    async def release(self, order_number: str, *, attempts: int) -> ReleaseOutcome:
        """Claim a due release (read with ``attempts``) and make one attempt at it."""
        now = self._clock()
        if not await self._store.claim_release(
            order_number,
            attempts=attempts,
            now=now,
            retry_at=now + self.retry_delay(attempts + 1),
        ):
            return ReleaseOutcome.NOT_OURS
        return await self.attempt(order_number, guarded=False)

    async def attempt(self, order_number: str, *, guarded: bool) -> ReleaseOutcome:
        """One call for a release this caller has claimed; never raises for a failed call.

        On failure the row stays, due at the retry time its claim set.
        """
        try:
            await self._inventory.release(order_number, guarded=guarded)
        except (Unavailable, UpstreamRefused) as exc:
            log.warning("release of order %s failed; will retry: %s", order_number, exc)
            with contextlib.suppress(Exception):
                await self._store.release_failed(order_number, error=str(exc))
            if isinstance(exc, Unavailable):
                return ReleaseOutcome.UNAVAILABLE
            return ReleaseOutcome.FAILED
        await self._store.release_done(order_number)
        log.info("released the reservation of order %s", order_number)
        return ReleaseOutcome.RELEASED

    async def reconcile_once(self) -> int:
        """Release the due rows, oldest first; how many were released."""
        released = 0
        for due in await self._store.due_releases(now=self._clock(), limit=self._batch):
            if self._loop.stopping:
                break
            outcome = await self.release(due.order_number, attempts=due.attempts)
            if outcome is ReleaseOutcome.RELEASED:
                released += 1
            elif outcome is ReleaseOutcome.UNAVAILABLE:
                break  # the others would wait for the same outage; next round
        return released

    def wake(self) -> None:
        """Look for due releases now rather than at the next interval."""
        self._loop.wake()

    def start(self) -> None:
        self._loop.start()

    async def stop(self, *, grace_s: float = 5.0) -> None:
        """Let the round in progress end, then stop; cancel only if it hangs.

        A release cut short stays claimed until its retry time, then is taken up again.
        """
        await self._loop.stop(grace_s=grace_s)

    async def __aenter__(self) -> ReleaseReconciler:
        self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    async def _step(self) -> bool:
        await self.reconcile_once()
        return False
