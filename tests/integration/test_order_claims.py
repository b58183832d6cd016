"""Idempotency-Key claims of a process that died are taken over within seconds (issue 11),
while a live process's claim is still "409 in progress".

Each claim names its process (``owner``), whose lease in the order database says it is
alive; a retry meeting a claim whose owner's lease has lapsed takes it over at once, and
the dead attempt's stock is given back rather than kept for the hold's full minute. The
store rules run on SQLite and MariaDB; the API checks run the order service with its real
lifespan and in-process peers (tests/integration/test_order_api.py), the dead process's
claim written through the store as it would have left it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from shop.order.api import IDEMPOTENCY_IN_PROGRESS
from shop.order.domain import (
    Order,
    OrderLine,
    OrderStatus,
    RequestedLine,
    new_order_number,
    order_document,
    request_fingerprint,
)
from shop.order.events import order_placed
from shop.order.store import (
    ClaimOutcome,
    KeyClaim,
    KeyLost,
    KeyRequest,
    PendingHold,
    SavedAnswer,
    SqlOrderStore,
    idempotency_keys,
    owner_lease_name,
    pending_releases,
)
from shop.platform.db import create_engine, migrate
from shop.platform.lease import Lease, leases
from tests.integration import test_order_api
from tests.integration.test_order_api import STOCK, World, eventually, open_world

signing_key = test_order_api.signing_key  # the same key fixture, one for this module

NOW = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
STALE = timedelta(seconds=60)
HOLD = timedelta(seconds=60)
DEAD, LIVE, RETRY = "order@host:101:dead01", "order@host:102:live02", "order@host:103:new003"


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    try:
        await migrate(engine, package="shop.order", service="order")
        yield engine
    finally:
        await engine.dispose()


async def _lease(engine: AsyncEngine, owner: str, *, until: float) -> None:
    """``owner``'s lease, as its heartbeat left it (``until``: epoch seconds)."""
    await Lease(engine, name=owner_lease_name(owner), owner=owner, duration_s=60).hold()
    async with engine.begin() as conn:
        await conn.execute(
            update(leases).where(leases.c.name == owner_lease_name(owner)).values(until=until)
        )


def _key(owner: str, attempt: str) -> KeyRequest:
    return KeyRequest("u-1", "k", "a" * 64, STALE, owner=owner, attempt=attempt)


async def _claimed(store: SqlOrderStore, owner: str, *, at: datetime = NOW) -> str:
    """A claim by ``owner`` with its pending release, as a placement starts; its number."""
    number = new_order_number()
    started = await store.start_order(
        key=_key(owner, number), hold=PendingHold(number, at + HOLD), sku_codes=[], now=at
    )
    assert started.claim == KeyClaim(ClaimOutcome.CLAIMED)
    return number


async def _pending(engine: AsyncEngine) -> dict[str, datetime]:
    async with engine.connect() as conn:
        rows = (await conn.execute(select(pending_releases))).all()
    return {row.order_number: row.due_at.replace(tzinfo=UTC) for row in rows}


async def test_a_live_owners_claim_is_in_progress_until_its_lease_lapses(
    engine: AsyncEngine,
) -> None:
    store = SqlOrderStore(engine)
    await _lease(engine, LIVE, until=NOW.timestamp() + 5)
    first = await _claimed(store, LIVE)
    retry = new_order_number()
    hold = PendingHold(retry, NOW + HOLD)
    started = await store.start_order(key=_key(RETRY, retry), hold=hold, sku_codes=[], now=NOW)
    assert started.claim == KeyClaim(ClaimOutcome.IN_PROGRESS)
    # Its own process asking again is not a takeover either.
    again = await store.start_order(
        key=_key(LIVE, new_order_number()), hold=None, sku_codes=[], now=NOW
    )
    assert again.claim == KeyClaim(ClaimOutcome.IN_PROGRESS)
    assert set(await _pending(engine)) == {first}

    # Seconds later its lease has lapsed (no heartbeat since): the retry takes it over, and
    # the first attempt's stock is owed back now, not when its hold ends.
    later = NOW + timedelta(seconds=6)
    hold = PendingHold(retry, later + HOLD)
    taken = await store.start_order(key=_key(RETRY, retry), hold=hold, sku_codes=[], now=later)
    assert taken.claim == KeyClaim(ClaimOutcome.CLAIMED, abandoned=first)
    assert await _pending(engine) == {first: later, retry: later + HOLD}


async def test_a_claim_whose_owner_left_no_lease_is_taken_over_at_once(
    engine: AsyncEngine,
) -> None:
    store = SqlOrderStore(engine)
    first = await _claimed(store, DEAD)
    retry = new_order_number()
    taken = await store.start_order(key=_key(RETRY, retry), hold=None, sku_codes=[], now=NOW)
    assert taken.claim == KeyClaim(ClaimOutcome.CLAIMED, abandoned=first)
    # Once taken, the claim is the retry's: a third request waits for it.
    await _lease(engine, RETRY, until=NOW.timestamp() + 5)
    third = await store.start_order(
        key=_key(DEAD, new_order_number()), hold=None, sku_codes=[], now=NOW
    )
    assert third.claim == KeyClaim(ClaimOutcome.IN_PROGRESS)


async def test_the_attempt_taken_over_can_neither_answer_nor_let_go_of_the_key(
    engine: AsyncEngine,
) -> None:
    """Its process was only slow, not dead: whatever it does now must not touch the claim
    that is no longer its own, nor save an order the client will not hear of."""
    store = SqlOrderStore(engine)
    first = await _claimed(store, DEAD)
    retry = new_order_number()
    hold = PendingHold(retry, NOW + HOLD)
    await store.start_order(key=_key(RETRY, retry), hold=hold, sku_codes=[], now=NOW)

    late = Order(
        order_number=first,
        user_id="u-1",
        buyer_email="u-1@example.com",
        status=OrderStatus.PLACED,
        lines=(OrderLine("iphone_15", 1, Decimal("1299.00")),),
        created_at=NOW,
    )
    answer = SavedAnswer("u-1", "k", 201, order_document(late))
    with pytest.raises(KeyLost):
        await store.save_placed(late, event=order_placed(late), answer=answer)
    assert await store.order(first) is None
    await store.give_up(order_number=first, maybe_reserved=True, now=NOW, key=_key(DEAD, first))
    async with engine.connect() as conn:
        row = (await conn.execute(select(idempotency_keys))).one()
    assert (row.order_number, row.owner, row.status_code) == (retry, RETRY, None)

    # The retry answers it; the answer is what every later request gets.
    placed = Order(
        order_number=retry,
        user_id="u-1",
        buyer_email="u-1@example.com",
        status=OrderStatus.PLACED,
        lines=late.lines,
        created_at=NOW,
    )
    saved = SavedAnswer("u-1", "k", 201, order_document(placed))
    await store.save_placed(placed, event=order_placed(placed), answer=saved)
    replay = await store.answered_key(_key(RETRY, new_order_number()))
    assert replay == KeyClaim(ClaimOutcome.REPLAY, status_code=201, body=order_document(placed))


async def test_lapsed_owner_leases_are_dropped_live_ones_kept(engine: AsyncEngine) -> None:
    store = SqlOrderStore(engine)
    await _lease(engine, DEAD, until=NOW.timestamp() - 1)
    await _lease(engine, LIVE, until=NOW.timestamp() + 5)
    await Lease(engine, name="releases:order", owner=LIVE, duration_s=0.001).hold()
    assert await store.forget_lapsed_owners(now=NOW) == 1
    async with engine.connect() as conn:
        names = set((await conn.execute(select(leases.c.name))).scalars())
    assert names == {owner_lease_name(LIVE), "releases:order"}


# --- through the API --------------------------------------------------------------------------

LINES = [{"skuCode": "iphone_15", "quantity": 1}]


@pytest.fixture
async def service(tmp_path: Path, signing_key: rsa.RSAPrivateKey) -> AsyncIterator[World]:
    async with open_world(tmp_path, signing_key) as opened:
        yield opened


async def _left_by(world: World, owner: str, *, user_id: str, key: str, reserved: bool) -> str:
    """What a process that died mid-placement leaves: its claim, its pending release, and
    (``reserved``) the stock the inventory holds for its order number."""
    engine = create_engine(f"sqlite+aiosqlite:///{world.data_dir / 'order.db'}")
    try:
        number = new_order_number()
        now = datetime.now(UTC)
        request = KeyRequest(
            user_id,
            key,
            request_fingerprint([RequestedLine("iphone_15", 1)]),
            STALE,
            owner=owner,
            attempt=number,
        )
        await SqlOrderStore(engine).start_order(
            key=request, hold=PendingHold(number, now + HOLD), sku_codes=[], now=now
        )
        if owner == LIVE:
            await _lease(engine, LIVE, until=now.timestamp() + 60)
    finally:
        await engine.dispose()
    if reserved:
        world.inventory.reservations[number] = {"iphone_15": 1}
        world.inventory.stock["iphone_15"] -= 1
    return number


async def test_a_retry_after_the_owning_process_died_is_answered_at_once(service: World) -> None:
    ada = service.user("ada")
    dead = await _left_by(service, DEAD, user_id=ada.user_id, key="checkout-1", reserved=True)

    placed = await service.place(ada, LINES, key="checkout-1")
    assert placed.status_code == 201, placed.text
    number = placed.json()["orderNumber"]
    assert number != dead
    # The dead attempt's units go back at once; only the order placed keeps any.
    await eventually(lambda: dead in service.inventory.released)
    assert service.inventory.stock["iphone_15"] == STOCK["iphone_15"] - 1

    again = await service.place(ada, LINES, key="checkout-1")
    assert again.status_code == 201
    assert again.json()["orderNumber"] == number
    assert again.headers["Idempotent-Replayed"] == "true"


async def test_a_live_processs_claim_is_still_in_progress(service: World) -> None:
    ada = service.user("ada")
    await _left_by(service, LIVE, user_id=ada.user_id, key="checkout-2", reserved=False)
    busy = await service.place(ada, LINES, key="checkout-2")
    assert busy.status_code == 409
    assert busy.json()["type"] == IDEMPOTENCY_IN_PROGRESS
    assert busy.headers["Retry-After"] == "1"
    assert service.inventory.requests("POST") == []

    # Its lease lapses (the process stopped renewing it): the next retry is served.
    await service.execute(
        f"UPDATE shop_leases SET until = 0 WHERE name = '{owner_lease_name(LIVE)}'"  # noqa: S608
    )
    placed = await service.place(ada, LINES, key="checkout-2")
    assert placed.status_code == 201, placed.text


async def test_the_service_keeps_its_own_lease_and_lets_it_go_when_it_stops(
    tmp_path: Path, signing_key: rsa.RSAPrivateKey
) -> None:
    async def owner_leases() -> dict[str, float]:
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'order.db'}")
        try:
            async with engine.connect() as conn:
                rows = await conn.execute(
                    select(leases.c.name, leases.c.until).where(
                        leases.c.name.like(owner_lease_name("%"))
                    )
                )
                return {row.name: float(row.until) for row in rows}
        finally:
            await engine.dispose()

    async with open_world(tmp_path, signing_key, claim_lease_s=3.0):
        [(name, until)] = (await owner_leases()).items()
        assert until > datetime.now(UTC).timestamp() + 1
    # Stopped: its claims are free at once.
    assert (await owner_leases())[name] <= datetime.now(UTC).timestamp()


async def test_with_the_breaker_open_a_key_writes_nothing_and_an_answer_is_replayed(
    service: World,
) -> None:
    ada = service.user("ada")
    placed = await service.place(ada, LINES, key="checkout-3")
    assert placed.status_code == 201
    service.inventory.failing = True
    for n in range(3):  # BREAKER_THRESHOLD failures open it
        failed = await service.place(ada, LINES, key=f"failing-{n}")
        assert failed.status_code == 503
    keys = await service.count(idempotency_keys)

    refused = await service.place(ada, LINES, key="checkout-4")
    assert refused.status_code == 503
    assert "circuit open" in refused.json()["detail"]
    assert int(refused.headers["Retry-After"]) >= 1
    assert await service.count(idempotency_keys) == keys  # no claim written, none to forget
    replay = await service.place(ada, LINES, key="checkout-3")
    assert replay.status_code == 201
    assert replay.json() == placed.json()
    assert replay.headers["Idempotent-Replayed"] == "true"
    other_body = await service.place(ada, [{"skuCode": "pixel_8", "quantity": 1}], key="checkout-3")
    assert other_body.status_code == 409
