"""The order store contract, run against SQLite and MariaDB alike."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from shop.order.domain import (
    MAX_LINES,
    Order,
    OrderLine,
    OrderStatus,
    new_order_number,
    order_document,
)
from shop.order.events import order_cancelled, order_placed
from shop.order.store import (
    ClaimOutcome,
    DueRelease,
    KeyClaim,
    ReservationLapsed,
    SavedAnswer,
    SqlOrderStore,
    idempotency_keys,
    order_lines,
    orders,
    pending_releases,
)
from shop.platform.db import create_engine, migrate
from shop.platform.outbox import outbox

NOW = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
STALE = timedelta(seconds=60)
HOLD = timedelta(seconds=60)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    try:
        await migrate(engine, package="shop.order", service="order")
        await migrate(engine, package="shop.order", service="order")  # a restart changes nothing
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def store(engine: AsyncEngine) -> SqlOrderStore:
    return SqlOrderStore(engine)


def _order(user_id: str = "u-1", *, at: datetime = NOW) -> Order:
    return Order(
        order_number=new_order_number(),
        user_id=user_id,
        buyer_email=f"{user_id}@example.com",
        status=OrderStatus.PLACED,
        lines=(
            OrderLine("iphone_15", 2, Decimal("1299.00")),
            OrderLine("kindle_paperwhite", 1, Decimal("139.99")),
        ),
        created_at=at,
    )


async def _count(engine: AsyncEngine, table: object) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())  # type: ignore[arg-type]


async def _outbox_types(engine: AsyncEngine) -> list[tuple[str, str, str]]:
    async with engine.connect() as conn:
        rows = (await conn.execute(select(outbox).order_by(outbox.c.seq))).all()
    return [
        (row.topic, json.loads(row.payload)["type"], json.loads(row.payload)["subject"])
        for row in rows
    ]


async def _place(store: SqlOrderStore, order: Order, answer: SavedAnswer | None = None) -> None:
    """As the service does: the pending release first, then the save that drops it."""
    await store.hold_release(order.order_number, due_at=NOW + HOLD)
    await store.save_placed(order, event=order_placed(order), answer=answer)


async def _pending(engine: AsyncEngine) -> dict[str, tuple[datetime, int]]:
    async with engine.connect() as conn:
        rows = (await conn.execute(select(pending_releases))).all()
    return {row.order_number: (row.due_at.replace(tzinfo=UTC), row.attempts) for row in rows}


async def test_a_placed_order_round_trips_with_its_event(
    store: SqlOrderStore, engine: AsyncEngine
) -> None:
    order = _order()
    await _place(store, order)
    found = await store.order(order.order_number)
    assert found == order
    assert found is not None and order_document(found)["total"] == "2737.99"
    assert await _outbox_types(engine) == [("orders", "order.placed", order.order_number)]
    assert await store.order(new_order_number()) is None


async def test_a_failed_save_leaves_neither_order_nor_event(
    store: SqlOrderStore, engine: AsyncEngine
) -> None:
    first = _order()
    event = order_placed(first)
    await store.hold_release(first.order_number, due_at=NOW + HOLD)
    await store.save_placed(first, event=event)
    second = _order()
    await store.hold_release(second.order_number, due_at=NOW + HOLD)
    # The outbox refuses a second event with the same id, after the order rows went in.
    with pytest.raises(IntegrityError):
        await store.save_placed(second, event=event)
    assert await store.order(second.order_number) is None
    assert await _count(engine, orders) == 1
    assert await _count(engine, order_lines) == 2
    assert await _count(engine, outbox) == 1
    # Its pending release outlives the failed save, so its stock will be given back.
    assert await _pending(engine) == {second.order_number: (NOW + HOLD, 0)}


async def test_orders_of_a_user_newest_first_in_pages(store: SqlOrderStore) -> None:
    placed = [_order(at=NOW + timedelta(minutes=i)) for i in range(5)]
    for order in placed:
        await _place(store, order)
    someone_else = _order("u-2", at=NOW + timedelta(hours=1))
    await _place(store, someone_else)

    first_page, total = await store.orders_of("u-1", limit=2, offset=0)
    assert total == 5
    assert [o.order_number for o in first_page] == [placed[4].order_number, placed[3].order_number]
    assert first_page[0].lines == placed[4].lines
    last_page, _ = await store.orders_of("u-1", limit=2, offset=4)
    assert [o.order_number for o in last_page] == [placed[0].order_number]
    assert await store.orders_of("u-1", limit=2, offset=10) == ([], 5)
    assert await store.orders_of("nobody", limit=20, offset=0) == ([], 0)


async def test_cancel_happens_once_with_its_event(
    store: SqlOrderStore, engine: AsyncEngine
) -> None:
    order = _order()
    await _place(store, order)
    cancelled = order.cancelled()
    retry_at = NOW + timedelta(seconds=3)
    assert await store.cancel(
        order.order_number, event=order_cancelled(cancelled), now=NOW, release_retry_at=retry_at
    )
    # The release is recorded with the cancel, as started by the canceller (one attempt).
    assert await _pending(engine) == {order.order_number: (retry_at, 1)}
    assert not await store.cancel(
        order.order_number, event=order_cancelled(cancelled), now=NOW, release_retry_at=NOW
    )
    assert await _pending(engine) == {order.order_number: (retry_at, 1)}
    found = await store.order(order.order_number)
    assert found is not None and found.status is OrderStatus.CANCELLED
    assert [t for _, t, _ in await _outbox_types(engine)] == ["order.placed", "order.cancelled"]
    assert not await store.cancel(
        new_order_number(), event=order_cancelled(cancelled), now=NOW, release_retry_at=NOW
    )


async def test_concurrent_cancels_change_the_order_once(
    store: SqlOrderStore, engine: AsyncEngine
) -> None:
    order = _order()
    await _place(store, order)
    outcomes = await asyncio.gather(
        *(
            store.cancel(
                order.order_number,
                event=order_cancelled(order.cancelled()),
                now=NOW,
                release_retry_at=NOW,
            )
            for _ in range(4)
        )
    )
    assert sorted(outcomes) == [False, False, False, True]
    assert [t for _, t, _ in await _outbox_types(engine)].count("order.cancelled") == 1
    assert list(await _pending(engine)) == [order.order_number]


async def test_an_idempotency_key_is_claimed_once_then_replayed(store: SqlOrderStore) -> None:
    claim = await store.claim_key(
        user_id="u-1", key="k1", fingerprint="a" * 64, now=NOW, stale_after=STALE
    )
    assert claim == KeyClaim(ClaimOutcome.CLAIMED)
    again = await store.claim_key(
        user_id="u-1", key="k1", fingerprint="a" * 64, now=NOW, stale_after=STALE
    )
    assert again.outcome is ClaimOutcome.IN_PROGRESS
    other_body = await store.claim_key(
        user_id="u-1", key="k1", fingerprint="b" * 64, now=NOW, stale_after=STALE
    )
    assert other_body.outcome is ClaimOutcome.MISMATCH
    # Keys are per user: another user's k1 is another key.
    theirs = await store.claim_key(
        user_id="u-2", key="k1", fingerprint="b" * 64, now=NOW, stale_after=STALE
    )
    assert theirs.outcome is ClaimOutcome.CLAIMED

    order = _order()
    body = order_document(order)
    await _place(
        store, order, answer=SavedAnswer(user_id="u-1", key="k1", status_code=201, body=body)
    )
    replay = await store.claim_key(
        user_id="u-1", key="k1", fingerprint="a" * 64, now=NOW, stale_after=STALE
    )
    assert replay == KeyClaim(ClaimOutcome.REPLAY, status_code=201, body=body)


async def test_concurrent_claims_of_one_key_let_one_through(store: SqlOrderStore) -> None:
    outcomes = await asyncio.gather(
        *(
            store.claim_key(
                user_id="u-1", key="race", fingerprint="a" * 64, now=NOW, stale_after=STALE
            )
            for _ in range(4)
        )
    )
    assert sorted(c.outcome.value for c in outcomes) == [
        "claimed",
        "in-progress",
        "in-progress",
        "in-progress",
    ]


async def test_a_forgotten_claim_frees_the_key_but_an_answered_one_stays(
    store: SqlOrderStore, engine: AsyncEngine
) -> None:
    await store.claim_key(user_id="u-1", key="k", fingerprint="a" * 64, now=NOW, stale_after=STALE)
    await store.forget_key(user_id="u-1", key="k")
    assert await _count(engine, idempotency_keys) == 0
    claim = await store.claim_key(
        user_id="u-1", key="k", fingerprint="b" * 64, now=NOW, stale_after=STALE
    )
    assert claim.outcome is ClaimOutcome.CLAIMED
    order = _order()
    await _place(
        store,
        order,
        answer=SavedAnswer(user_id="u-1", key="k", status_code=201, body={"orderNumber": "x"}),
    )
    await store.forget_key(user_id="u-1", key="k")
    assert await _count(engine, idempotency_keys) == 1


async def test_an_abandoned_claim_is_taken_over_once_stale(store: SqlOrderStore) -> None:
    await store.claim_key(user_id="u-1", key="k", fingerprint="a" * 64, now=NOW, stale_after=STALE)
    later = NOW + STALE + timedelta(seconds=1)
    takeover = await store.claim_key(
        user_id="u-1", key="k", fingerprint="a" * 64, now=later, stale_after=STALE
    )
    assert takeover.outcome is ClaimOutcome.CLAIMED
    second = await store.claim_key(
        user_id="u-1", key="k", fingerprint="a" * 64, now=later, stale_after=STALE
    )
    assert second.outcome is ClaimOutcome.IN_PROGRESS


# --- pending releases -----------------------------------------------------------------------


async def test_saving_an_order_drops_its_pending_release(
    store: SqlOrderStore, engine: AsyncEngine
) -> None:
    order = _order()
    await store.hold_release(order.order_number, due_at=NOW + HOLD)
    assert await store.due_releases(now=NOW, limit=10) == []  # not due while the request runs
    await store.save_placed(order, event=order_placed(order))
    assert await _pending(engine) == {}
    assert await store.due_releases(now=NOW + 2 * HOLD, limit=10) == []


async def test_an_order_whose_release_started_or_ended_is_not_saved(
    store: SqlOrderStore, engine: AsyncEngine
) -> None:
    late = _order()
    await store.hold_release(late.order_number, due_at=NOW)
    # The request outlived its hold: the reconciler started giving the stock back.
    assert await store.claim_release(
        late.order_number, attempts=0, now=NOW, retry_at=NOW + timedelta(seconds=3)
    )
    with pytest.raises(ReservationLapsed):
        await store.save_placed(late, event=order_placed(late))
    released = _order()
    await store.hold_release(released.order_number, due_at=NOW)
    await store.release_done(released.order_number)
    with pytest.raises(ReservationLapsed):
        await store.save_placed(released, event=order_placed(released))
    assert await _count(engine, orders) == 0
    assert await _count(engine, outbox) == 0
    assert list(await _pending(engine)) == [late.order_number]


async def test_due_releases_are_claimed_once_and_back_off(
    store: SqlOrderStore, engine: AsyncEngine
) -> None:
    first, second, later = new_order_number(), new_order_number(), new_order_number()
    await store.hold_release(second, due_at=NOW - timedelta(seconds=1))
    await store.hold_release(first, due_at=NOW - timedelta(seconds=2))
    await store.hold_release(later, due_at=NOW + HOLD)
    assert await store.due_releases(now=NOW, limit=10) == [
        DueRelease(first, 0),
        DueRelease(second, 0),
    ]
    assert await store.due_releases(now=NOW, limit=1) == [DueRelease(first, 0)]

    retry_at = NOW + timedelta(seconds=3)
    claims = await asyncio.gather(
        *(store.claim_release(first, attempts=0, now=NOW, retry_at=retry_at) for _ in range(4))
    )
    assert sorted(claims) == [False, False, False, True]
    await store.release_failed(first, error="inventory answered 500 " + "x" * 600)
    assert await store.due_releases(now=NOW, limit=10) == [DueRelease(second, 0)]
    assert await store.due_releases(now=retry_at, limit=10) == [
        DueRelease(second, 0),
        DueRelease(first, 1),
    ]
    # A stale read (attempts 0) cannot claim it again.
    assert not await store.claim_release(first, attempts=0, now=retry_at, retry_at=retry_at)
    async with engine.connect() as conn:
        error = await conn.scalar(
            select(pending_releases.c.last_error).where(pending_releases.c.order_number == first)
        )
    assert error is not None and error.startswith("inventory answered 500") and len(error) == 500

    await store.release_due_now(later, now=NOW)
    assert DueRelease(later, 0) in await store.due_releases(now=NOW, limit=10)
    await store.drop_release(later)
    await store.release_done(second)
    assert await _pending(engine) == {first: (retry_at, 1)}
    # A release someone started is not dropped as "nothing reserved".
    await store.drop_release(first)
    assert list(await _pending(engine)) == [first]


async def test_prices_up_to_the_catalogue_limit_fit(store: SqlOrderStore) -> None:
    order = Order(
        order_number=new_order_number(),
        user_id="u-1",
        buyer_email="u-1@example.com",
        status=OrderStatus.PLACED,
        lines=tuple(
            OrderLine(f"sku_{i}", 1000, Decimal("9999999999.99")) for i in range(MAX_LINES)
        ),
        created_at=NOW,
    )
    await _place(store, order)
    found = await store.order(order.order_number)
    assert found == order
    assert order_document(found)["total"] == "999999999999000.00"
