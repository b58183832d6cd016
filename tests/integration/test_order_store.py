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

from shop.order.domain import Order, OrderLine, OrderStatus, new_order_number, order_document
from shop.order.events import order_cancelled, order_placed
from shop.order.store import (
    ClaimOutcome,
    KeyClaim,
    SavedAnswer,
    SqlOrderStore,
    idempotency_keys,
    order_lines,
    orders,
)
from shop.platform.db import create_engine, migrate
from shop.platform.outbox import outbox

NOW = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
STALE = timedelta(seconds=60)


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


async def test_a_placed_order_round_trips_with_its_event(
    store: SqlOrderStore, engine: AsyncEngine
) -> None:
    order = _order()
    await store.save_placed(order, event=order_placed(order))
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
    await store.save_placed(first, event=event)
    second = _order()
    # The outbox refuses a second event with the same id, after the order rows went in.
    with pytest.raises(IntegrityError):
        await store.save_placed(second, event=event)
    assert await store.order(second.order_number) is None
    assert await _count(engine, orders) == 1
    assert await _count(engine, order_lines) == 2
    assert await _count(engine, outbox) == 1


async def test_orders_of_a_user_newest_first_in_pages(store: SqlOrderStore) -> None:
    placed = [_order(at=NOW + timedelta(minutes=i)) for i in range(5)]
    for order in placed:
        await store.save_placed(order, event=order_placed(order))
    someone_else = _order("u-2", at=NOW + timedelta(hours=1))
    await store.save_placed(someone_else, event=order_placed(someone_else))

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
    await store.save_placed(order, event=order_placed(order))
    cancelled = order.cancelled()
    assert await store.cancel(order.order_number, event=order_cancelled(cancelled), now=NOW)
    assert not await store.cancel(order.order_number, event=order_cancelled(cancelled), now=NOW)
    found = await store.order(order.order_number)
    assert found is not None and found.status is OrderStatus.CANCELLED
    assert [t for _, t, _ in await _outbox_types(engine)] == ["order.placed", "order.cancelled"]
    assert not await store.cancel(new_order_number(), event=order_cancelled(cancelled), now=NOW)


async def test_concurrent_cancels_change_the_order_once(
    store: SqlOrderStore, engine: AsyncEngine
) -> None:
    order = _order()
    await store.save_placed(order, event=order_placed(order))
    outcomes = await asyncio.gather(
        *(
            store.cancel(order.order_number, event=order_cancelled(order.cancelled()), now=NOW)
            for _ in range(4)
        )
    )
    assert sorted(outcomes) == [False, False, False, True]
    assert [t for _, t, _ in await _outbox_types(engine)].count("order.cancelled") == 1


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
    await store.save_placed(
        order,
        event=order_placed(order),
        answer=SavedAnswer(user_id="u-1", key="k1", status_code=201, body=body),
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
    await store.save_placed(
        order,
        event=order_placed(order),
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
