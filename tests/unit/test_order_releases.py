"""The release reconciler's rules: back-off per release, and a round that stops at an outage.

The store is an in-memory stand-in for the pending_releases table (its SQL contract is
tested in tests/integration/test_order_store.py); the inventory is a scripted peer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from shop.order.domain import RequestedLine, Unavailable, UpstreamRefused
from shop.order.releases import ReleaseOutcome, ReleaseReconciler
from shop.order.store import DueRelease

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@dataclass
class Row:
    due_at: datetime
    attempts: int = 0
    last_error: str | None = None


class MemoryReleases:
    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}

    async def hold_release(self, order_number: str, *, due_at: datetime) -> None:
        self.rows[order_number] = Row(due_at)

    async def due_releases(self, *, now: datetime, limit: int) -> list[DueRelease]:
        due = sorted((row.due_at, n) for n, row in self.rows.items() if row.due_at <= now)
        return [DueRelease(n, self.rows[n].attempts) for _, n in due[:limit]]

    async def claim_release(
        self, order_number: str, *, attempts: int, now: datetime, retry_at: datetime
    ) -> bool:
        row = self.rows.get(order_number)
        if row is None or row.attempts != attempts or row.due_at > now:
            return False
        row.attempts, row.due_at = attempts + 1, retry_at
        return True

    async def release_done(self, order_number: str) -> None:
        self.rows.pop(order_number, None)

    async def release_failed(self, order_number: str, *, error: str) -> None:
        self.rows[order_number].last_error = error


class ScriptedInventory:
    """Answers each release as told: "ok", "down" (Unavailable) or "odd" (UpstreamRefused)."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, bool]] = []

    async def reserve(self, order_number: str, lines: Sequence[RequestedLine]) -> None:
        raise AssertionError("the reconciler never reserves")

    async def release(self, order_number: str, *, guarded: bool = True) -> None:
        self.asked.append((order_number, guarded))
        answer = self.answers.get(order_number, "ok")
        if answer == "down":
            raise Unavailable("inventory down", retry_after_s=1.0)
        if answer == "odd":
            raise UpstreamRefused("inventory answered 418")

    def unavailable_for_s(self) -> float:
        return 0.0


def _reconciler(
    store: MemoryReleases, inventory: ScriptedInventory, *, now: datetime = NOW
) -> ReleaseReconciler:
    return ReleaseReconciler(
        store=store,
        inventory=inventory,
        lease=None,
        backoff_s=2.0,
        backoff_max_s=30.0,
        clock=lambda: now,
    )


def test_each_release_backs_off_on_its_own_up_to_a_cap() -> None:
    reconciler = _reconciler(MemoryReleases(), ScriptedInventory({}))
    delays = [reconciler.retry_delay(n).total_seconds() for n in range(1, 8)]
    assert delays == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert reconciler.retry_delay(10_000) == timedelta(seconds=30)


async def test_a_round_releases_what_is_due_and_stops_at_an_outage() -> None:
    store = MemoryReleases()
    for offset, number in enumerate(["odd", "ok-1", "down", "ok-2"]):
        await store.hold_release(number, due_at=NOW - timedelta(seconds=10 - offset))
    await store.hold_release("not-yet", due_at=NOW + timedelta(seconds=5))
    inventory = ScriptedInventory({"odd": "odd", "down": "down"})

    assert await _reconciler(store, inventory).reconcile_once() == 1
    # Oldest first; an odd refusal does not stop the round, an outage does.
    assert [n for n, _ in inventory.asked] == ["odd", "ok-1", "down"]
    assert all(not guarded for _, guarded in inventory.asked)  # outside the breaker
    assert set(store.rows) == {"odd", "down", "ok-2", "not-yet"}
    assert store.rows["odd"] == Row(NOW + timedelta(seconds=2), 1, "inventory answered 418")
    assert store.rows["down"].attempts == 1
    assert store.rows["ok-2"].attempts == 0  # not tried: it waits for the next round

    later = _reconciler(store, inventory, now=NOW + timedelta(seconds=2))
    inventory.answers = {}
    assert await later.reconcile_once() == 3
    assert set(store.rows) == {"not-yet"}


async def test_a_release_started_elsewhere_is_left_alone() -> None:
    store = MemoryReleases()
    await store.hold_release("n-1", due_at=NOW)
    inventory = ScriptedInventory({})
    reconciler = _reconciler(store, inventory)
    assert await reconciler.release("n-1", attempts=0) is ReleaseOutcome.RELEASED
    await store.hold_release("n-2", due_at=NOW)
    await store.claim_release("n-2", attempts=0, now=NOW, retry_at=NOW + timedelta(seconds=9))
    # A stale read (attempts 0) of a release another caller started: no second call.
    assert await reconciler.release("n-2", attempts=0) is ReleaseOutcome.NOT_OURS
    assert inventory.asked == [("n-1", False)]
