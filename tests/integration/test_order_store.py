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
    PriceChange,
    new_order_number,
    order_document,
)
from shop.order.events import order_cancelled, order_placed
from shop.order.store import (
    ClaimOutcome,
    DueRelease,
    KeyClaim,
    KeyRequest,
    PendingHold,
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

    await store.give_up(order_number=later, maybe_reserved=True, now=NOW, key=None)
    assert DueRelease(later, 0) in await store.due_releases(now=NOW, limit=10)
    await store.give_up(order_number=later, maybe_reserved=False, now=NOW, key=None)
    await store.release_done(second)
    assert await _pending(engine) == {first: (retry_at, 1)}
    # A release someone started is not dropped as "nothing reserved".
    await store.give_up(order_number=first, maybe_reserved=False, now=NOW, key=None)
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


# --- one transaction to start an order ------------------------------------------------------


def _key(key: str = "k", fingerprint: str = "a" * 64) -> KeyRequest:
    return KeyRequest(user_id="u-1", key=key, fingerprint=fingerprint, stale_after=STALE)


async def test_starting_an_order_claims_its_key_holds_its_release_and_reads_prices(
    store: SqlOrderStore, engine: AsyncEngine
) -> None:
    await store.apply_price_change(
        PriceChange("p1", "iphone_15", Decimal("1299.00"), 1), event_id="e1"
    )
    number = new_order_number()
    started = await store.start_order(
        key=_key(),
        hold=PendingHold(number, NOW + HOLD),
        sku_codes=["iphone_15", "nokia_3310"],
        now=NOW,
    )
    assert started.claim == KeyClaim(ClaimOutcome.CLAIMED)
    assert started.prices == {"iphone_15": Decimal("1299.00")}  # the unknown one is left out
    assert await _pending(engine) == {number: (NOW + HOLD, 0)}
    assert await _count(engine, idempotency_keys) == 1

    # A key that is not ours writes no pending release.
    other = new_order_number()
    again = await store.start_order(
        key=_key(), hold=PendingHold(other, NOW + HOLD), sku_codes=["iphone_15"], now=NOW
    )
    assert again.claim is not None and again.claim.outcome is ClaimOutcome.IN_PROGRESS
    assert list(await _pending(engine)) == [number]

    # Taken over once stale: the release is held by the transaction that takes it.
    later = NOW + STALE + timedelta(seconds=1)
    taken = await store.start_order(
        key=_key(), hold=PendingHold(other, later + HOLD), sku_codes=["iphone_15"], now=later
    )
    assert taken.claim == KeyClaim(ClaimOutcome.CLAIMED)
    assert taken.prices == {"iphone_15": Decimal("1299.00")}
    assert set(await _pending(engine)) == {number, other}

    # Without a key: the hold and the prices.
    keyless = new_order_number()
    plain = await store.start_order(
        key=None, hold=PendingHold(keyless, NOW + HOLD), sku_codes=["iphone_15"], now=NOW
    )
    assert plain.claim is None and plain.prices == {"iphone_15": Decimal("1299.00")}
    assert keyless in await _pending(engine)


async def test_giving_up_an_order_frees_its_key_and_drops_or_hastens_its_release(
    store: SqlOrderStore, engine: AsyncEngine
) -> None:
    nothing, maybe = new_order_number(), new_order_number()
    for number, key in ((nothing, "k1"), (maybe, "k2")):
        await store.start_order(
            key=_key(key), hold=PendingHold(number, NOW + HOLD), sku_codes=[], now=NOW
        )
    await store.give_up(order_number=nothing, maybe_reserved=False, now=NOW, key=_key("k1"))
    await store.give_up(order_number=maybe, maybe_reserved=True, now=NOW, key=_key("k2"))
    # Nothing reserved: no release owed. Maybe reserved: released as soon as possible.
    assert await _pending(engine) == {maybe: (NOW, 0)}
    assert await _count(engine, idempotency_keys) == 0


async def test_many_placements_at_once_are_all_saved_with_their_answers(
    store: SqlOrderStore, engine: AsyncEngine
) -> None:
    """The hot SKU's shape: more placements in flight than the engine's pool holds, each
    through both transactions; every one is saved, answered, and owes no release."""
    await store.apply_price_change(
        PriceChange("p1", "iphone_15", Decimal("1299.00"), 1), event_id="e1"
    )

    async def place(n: int) -> None:
        order = _order(f"u-{n % 16}")
        key = KeyRequest(order.user_id, f"k-{n}", "a" * 64, STALE)
        started = await store.start_order(
            key=key,
            hold=PendingHold(order.order_number, NOW + HOLD),
            sku_codes=["iphone_15"],
            now=NOW,
        )
        assert started.claim == KeyClaim(ClaimOutcome.CLAIMED)
        assert started.prices == {"iphone_15": Decimal("1299.00")}
        await asyncio.sleep(0)  # the inventory's answer
        answer = SavedAnswer(order.user_id, key.key, 201, order_document(order))
        await store.save_placed(order, event=order_placed(order), answer=answer)

    await asyncio.gather(*(place(n) for n in range(150)))
    assert await _count(engine, orders) == 150
    assert await _count(engine, outbox) == 150
    assert await _pending(engine) == {}
    async with engine.connect() as conn:
        unanswered = await conn.execute(
            select(func.count())
            .select_from(idempotency_keys)
            .where(idempotency_keys.c.status_code.is_(None))
        )
        assert unanswered.scalar_one() == 0


# --- the price list (read model of the catalogue) -------------------------------------------


async def _prices(store: SqlOrderStore, *skus: str) -> dict[str, Decimal]:
    return await store.known_prices(list(skus))


async def test_the_price_list_follows_created_updated_and_deleted_products(
    store: SqlOrderStore,
) -> None:
    assert await _prices(store, "pixel_8") == {}  # a fresh database knows no price
    created = PriceChange("p8", "pixel_8", Decimal("899.00"), 100)
    assert await store.apply_price_change(created, event_id="e1")
    assert await _prices(store, "pixel_8", "iphone_15") == {"pixel_8": Decimal("899.00")}
    updated = PriceChange("p8", "pixel_8", Decimal("849.50"), 200)
    assert await store.apply_price_change(updated, event_id="e2")
    assert await _prices(store, "pixel_8") == {"pixel_8": Decimal("849.50")}
    deleted = PriceChange("p8", "pixel_8", None, 300)
    assert await store.apply_price_change(deleted, event_id="e3")
    assert await _prices(store, "pixel_8") == {}
    # Listed again as a new product: known again.
    relisted = PriceChange("p9", "pixel_8", Decimal("799.00"), 400)
    assert await store.apply_price_change(relisted, event_id="e4")
    assert await _prices(store, "pixel_8") == {"pixel_8": Decimal("799.00")}


async def test_a_duplicate_or_older_event_does_not_overwrite_the_price(
    store: SqlOrderStore,
) -> None:
    created = PriceChange("p1", "iphone_15", Decimal("1299.00"), 100)
    updated = PriceChange("p1", "iphone_15", Decimal("1199.00"), 200)
    assert await store.apply_price_change(created, event_id="e1")
    assert await store.apply_price_change(updated, event_id="e2")
    # The same event again (at-least-once delivery), and an older one replayed late.
    assert not await store.apply_price_change(created, event_id="e1")
    assert not await store.apply_price_change(created, event_id="e1-replayed")
    assert await _prices(store, "iphone_15") == {"iphone_15": Decimal("1199.00")}
    # An older deletion cannot remove a product changed since, and once deleted, an older
    # update cannot bring it back.
    assert not await store.apply_price_change(
        PriceChange("p1", "iphone_15", None, 150), event_id="e-old-delete"
    )
    assert await _prices(store, "iphone_15") == {"iphone_15": Decimal("1199.00")}
    assert await store.apply_price_change(PriceChange("p1", "iphone_15", None, 300), event_id="e3")
    assert not await store.apply_price_change(updated, event_id="e2-replayed")
    assert await _prices(store, "iphone_15") == {}
    # Same time, later delivery: applied (the bus keeps one product's events in order), even
    # when it changes nothing.
    assert await store.apply_price_change(PriceChange("p1", "iphone_15", None, 300), event_id="e4")


async def test_a_sku_two_products_claim_is_not_priced_from_the_list(
    store: SqlOrderStore,
) -> None:
    # p1 moved from sku "a" to "b"; p2 took "a", and its event came before p1's move.
    await store.apply_price_change(PriceChange("p1", "a", Decimal("1.00"), 100), event_id="e1")
    await store.apply_price_change(PriceChange("p2", "a", Decimal("2.00"), 300), event_id="e2")
    assert await _prices(store, "a") == {}  # ambiguous: the catalogue is asked instead
    await store.apply_price_change(PriceChange("p1", "b", Decimal("1.00"), 200), event_id="e3")
    assert await _prices(store, "a", "b") == {"a": Decimal("2.00"), "b": Decimal("1.00")}


async def test_concurrent_deliveries_of_one_event_apply_it_once(store: SqlOrderStore) -> None:
    change = PriceChange("p1", "iphone_15", Decimal("1299.00"), 100)
    outcomes = await asyncio.gather(
        *(store.apply_price_change(change, event_id="e1") for _ in range(4))
    )
    assert sorted(outcomes) == [False, False, False, True]
    assert await _prices(store, "iphone_15") == {"iphone_15": Decimal("1299.00")}
