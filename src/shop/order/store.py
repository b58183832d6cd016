"""Persistence of orders, Idempotency-Keys and pending releases: a small protocol and its
SQLAlchemy (Core) backend.

The same code runs on SQLite and MySQL/MariaDB. Times are stored as naive UTC, money as
whole cents. Every change that others must hear about writes its event to the outbox in
the same transaction.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol, cast

from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shop.order.domain import (
    Order,
    OrderLine,
    OrderStatus,
    PriceChange,
    cents,
    from_cents,
)
from shop.platform.db import (
    Timestamp,
    execute_retrying,
    from_db_time,
    open_sqlite,
    retry_on_lock_conflict,
    to_db_time,
)
from shop.platform.events import Event
from shop.platform.inbox import first_delivery
from shop.platform.lease import leases
from shop.platform.outbox import add_event
from shop.platform.rawsql import Many, RawSql, Rows, Step
from shop.platform.retention import KeysetSweep

__all__ = [
    "ORDERS_TOPIC",
    "PRICES_CONSUMER",
    "ClaimOutcome",
    "DueRelease",
    "KeyClaim",
    "KeyLost",
    "KeyRequest",
    "OWNER_LEASE_PREFIX",
    "OrderStart",
    "OrderStore",
    "PendingHold",
    "PendingReleases",
    "ReservationLapsed",
    "SavedAnswer",
    "SqlOrderStore",
    "catalogue_prices",
    "idempotency_keys",
    "metadata",
    "order_lines",
    "orders",
    "owner_lease_name",
    "pending_releases",
    "purge_answered_keys",
]

ORDERS_TOPIC = "orders"
# The inbox's name for the consumer of the catalogue's events (the price list).
PRICES_CONSUMER = "order-prices"
# The saved answer's JSON: ``json.dumps(..., separators=...)`` builds an encoder per call.
_COMPACT = json.JSONEncoder(separators=(",", ":"))


metadata = MetaData()

orders = Table(
    "orders",
    metadata,
    Column("order_number", String(36), primary_key=True),
    Column("user_id", String(64), nullable=False),
    Column("buyer_email", String(320), nullable=False),
    Column("status", String(16), nullable=False),
    Column("total_cents", BigInteger, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("cancelled_at", Timestamp, nullable=True),
    Index("ix_orders_user_newest", "user_id", "created_at", "order_number"),
)

order_lines = Table(
    "order_lines",
    metadata,
    Column(
        "order_number",
        String(36),
        ForeignKey("orders.order_number", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("line_no", Integer, primary_key=True, autoincrement=False),
    Column("sku_code", String(64), nullable=False),
    Column("quantity", Integer, nullable=False),
    Column("unit_price_cents", BigInteger, nullable=False),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("user_id", String(64), primary_key=True),
    Column("idempotency_key", String(255), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("status_code", Integer, nullable=True),
    Column("response_body", Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")),
    # While unanswered: the order number of the attempt holding the claim; answered: the order.
    Column("order_number", String(36), nullable=True),
    # The process holding an unanswered claim (its lease ``owner_lease_name(owner)``).
    Column("owner", String(200), nullable=True),
)

# A reservation to give back to the inventory. Written before a reservation is asked for
# (due once the request has surely ended) and deleted by the transaction that saves the
# order; written due at once by a cancel. ``attempts`` > 0: a release has been started.
pending_releases = Table(
    "pending_releases",
    metadata,
    Column("order_number", String(36), primary_key=True),
    Column("due_at", Timestamp, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", String(500), nullable=True),
    Index("ix_pending_releases_due", "due_at"),
)

# The catalogue's prices, a read model fed by product.* events (docs/order.md). One row per
# product: ``price_cents`` NULL when it cannot be priced from here (deleted: the row stays
# as a tombstone, so an older event replayed later cannot bring it back); ``version`` is
# the time of the event that wrote the row, in microseconds.
catalogue_prices = Table(
    "catalogue_prices",
    metadata,
    Column("product_id", String(64), primary_key=True),
    Column("sku_code", String(64), nullable=True),
    Column("price_cents", BigInteger, nullable=True),
    Column("version", BigInteger, nullable=False),
    Index("ix_catalogue_prices_sku", "sku_code"),
)

# Statements built once: building a Core statement per call costs more than running it on
# SQLite, and an unchanged statement object is compiled once. The hot path of placing an
# order goes further, to plain SQL (``_HotPath``).
_FORGET_KEY = delete(idempotency_keys).where(
    idempotency_keys.c.user_id == bindparam("user"),
    idempotency_keys.c.idempotency_key == bindparam("key"),
    idempotency_keys.c.status_code.is_(None),
)
_UPDATE_PRICE = (
    update(catalogue_prices)
    .where(
        catalogue_prices.c.product_id == bindparam("product"),
        catalogue_prices.c.version <= bindparam("v"),
    )
    .values(sku_code=bindparam("sku"), price_cents=bindparam("cents"), version=bindparam("v"))
)
_PRICE_ROW = select(catalogue_prices.c.version).where(
    catalogue_prices.c.product_id == bindparam("product")
)
_INSERT_PRICE = insert(catalogue_prices)


OWNER_LEASE_PREFIX = "order-owner:"


def owner_lease_name(owner: str) -> str:
    """The ``shop_leases`` row an order process keeps alive while it holds claims."""
    return OWNER_LEASE_PREFIX + owner


class ClaimOutcome(enum.Enum):
    CLAIMED = "claimed"  # the key is ours: go ahead
    REPLAY = "replay"  # answered before with the same body: send that answer again
    MISMATCH = "mismatch"  # used before with another body
    IN_PROGRESS = "in-progress"  # the first request with this key is still being answered


@dataclass(frozen=True, slots=True)
class KeyClaim:
    outcome: ClaimOutcome
    status_code: int | None = None
    body: dict[str, Any] | None = None
    # CLAIMED by taking over an abandoned claim: the order number its attempt had, whose
    # pending release (if any) was made due at once.
    abandoned: str | None = None


@dataclass(frozen=True, slots=True)
class SavedAnswer:
    """The answer to keep with an Idempotency-Key, for replays."""

    user_id: str
    key: str
    status_code: int
    body: dict[str, Any]


class _HotPath:
    """The statements of placing an order (and of giving an attempt up), as plain SQL run
    by the driver as they are, in ``RawSql`` transactions.

    py-spy put SQLAlchemy's per-statement work (cache key, parameter processing, result
    set-up) at 15-46 % of the order service's CPU; these skip it, and on SQLite the
    transactions skip the async engine as well (docs/order.md "Storage performance").
    Parameters are passed as the driver takes them: times as naive UTC, on SQLite in
    SQLAlchemy's own text form (so Core reads and compares them as before), on MySQL as
    ``datetime``.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.sqlite = engine.dialect.name == "sqlite"
        mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"

        def sql(statement: str) -> str:
            return statement.replace("?", mark)

        self.mark = mark
        self.insert_key = sql(
            "INSERT INTO idempotency_keys (user_id, idempotency_key, request_hash, created_at,"
            " order_number, owner) VALUES (?, ?, ?, ?, ?, ?)"
        )
        self.insert_hold = sql(
            "INSERT INTO pending_releases (order_number, due_at, attempts) VALUES (?, ?, 0)"
        )
        self.prices = "SELECT sku_code, price_cents FROM catalogue_prices WHERE sku_code IN ({})"
        self.drop_unstarted_hold = sql(
            "DELETE FROM pending_releases WHERE order_number = ? AND attempts = 0"
        )
        self.insert_order = sql(
            "INSERT INTO orders (order_number, user_id, buyer_email, status, total_cents,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?)"
        )
        self.insert_lines = sql(
            "INSERT INTO order_lines (order_number, line_no, sku_code, quantity,"
            " unit_price_cents) VALUES (?, ?, ?, ?, ?)"
        )
        self.insert_event = sql(
            "INSERT INTO outbox (event_id, topic, event_key, payload, created_at)"
            " VALUES (?, ?, ?, ?, ?)"
        )
        self.hold_due = sql("UPDATE pending_releases SET due_at = ? WHERE order_number = ?")
        self.key_answer = sql(
            "SELECT request_hash, status_code, response_body FROM idempotency_keys"
            " WHERE user_id = ? AND idempotency_key = ?"
        )
        # Both only while the claim is still this attempt's (not taken over since); a claim
        # written before claims named their attempt has none.
        self.forget_key = sql(
            "DELETE FROM idempotency_keys"
            " WHERE user_id = ? AND idempotency_key = ? AND status_code IS NULL"
            " AND (order_number IS NULL OR order_number = ?)"
        )
        self.save_answer = sql(
            "UPDATE idempotency_keys SET status_code = ?, response_body = ?, order_number = ?"
            " WHERE user_id = ? AND idempotency_key = ? AND status_code IS NULL"
            " AND (order_number IS NULL OR order_number = ?)"
        )

    def time(self, moment: datetime) -> datetime | str:
        naive = to_db_time(moment)
        # SQLAlchemy's SQLite DateTime text, microseconds always written (compared as text):
        # its "%Y-%m-%d %H:%M:%S.%f", which isoformat writes in about half strftime's time.
        return naive.isoformat(" ", "microseconds") if self.sqlite else naive

    def prices_of(self, count: int) -> str:
        return self.prices.format(", ".join([self.mark] * count))


@dataclass(frozen=True, slots=True)
class KeyRequest:
    """A request's Idempotency-Key, to claim before the request is answered.

    ``owner``: the claiming process, whose lease (``owner_lease_name``) says it is alive; a
    claim whose owner's lease has lapsed is taken over at once, any other once older than
    ``stale_after``. ``attempt``: the order number of this attempt, which the claim keeps,
    so only this attempt answers or lets go of it."""

    user_id: str
    key: str
    fingerprint: str
    stale_after: timedelta
    owner: str | None = None
    attempt: str | None = None


@dataclass(frozen=True, slots=True)
class PendingHold:
    """The pending release to write before the inventory hears of an order."""

    order_number: str
    due_at: datetime


@dataclass(frozen=True, slots=True)
class OrderStart:
    """What the first transaction of a placement found: the key's claim (None without a
    key) and the prices the price list knows (SKUs it cannot price are left out)."""

    claim: KeyClaim | None
    prices: dict[str, Decimal]


class KeyLost(Exception):
    """The Idempotency-Key row this request claimed is gone (taken over as abandoned)."""


class ReservationLapsed(Exception):
    """The order's pending release is gone or started: its stock is (being) given back."""


@dataclass(frozen=True, slots=True)
class DueRelease:
    order_number: str
    attempts: int


class PendingReleases(Protocol):
    """Reservations to give back to the inventory, kept until the inventory confirms."""

    async def hold_release(self, order_number: str, *, due_at: datetime) -> None:
        """Before reserving: release this order's stock at ``due_at`` unless it is saved."""

    async def due_releases(self, *, now: datetime, limit: int) -> list[DueRelease]: ...

    async def claim_release(
        self, order_number: str, *, attempts: int, now: datetime, retry_at: datetime
    ) -> bool:
        """Start a release: one more attempt, and not due again before ``retry_at``.

        False when it is not due or another caller started it since ``attempts`` was read.
        """

    async def release_done(self, order_number: str) -> None: ...

    async def release_failed(self, order_number: str, *, error: str) -> None: ...


class OrderStore(PendingReleases, Protocol):
    async def start_order(
        self,
        *,
        key: KeyRequest | None,
        hold: PendingHold | None,
        sku_codes: Sequence[str],
        now: datetime,
    ) -> OrderStart:
        """One transaction: claim the key, write the pending release (only if the key was
        claimed, or there is no key) and read the price list for ``sku_codes``."""

    async def give_up(
        self,
        *,
        order_number: str | None,
        maybe_reserved: bool,
        now: datetime,
        key: KeyRequest | None,
    ) -> None:
        """A placement that will not be saved, in one transaction: its pending release made
        due now (stock may be reserved) or dropped unless started (nothing was), and its
        unanswered Idempotency-Key let go so the client may retry with it."""

    async def apply_price_change(self, change: PriceChange, *, event_id: str) -> bool:
        """Apply a catalogue event to the price list, once per event id and never over a
        newer version of the product; False if it changed nothing."""

    async def claim_key(
        self, *, user_id: str, key: str, fingerprint: str, now: datetime, stale_after: timedelta
    ) -> KeyClaim: ...

    async def answered_key(self, key: KeyRequest) -> KeyClaim | None:
        """Without claiming anything: REPLAY (answered, same body) or MISMATCH (another body)
        when the key was answered, else None."""

    async def forget_key(self, *, user_id: str, key: str) -> None:
        """Drop an unanswered claim so the client may try again with the same key."""

    async def save_placed(
        self, order: Order, *, event: Event, answer: SavedAnswer | None = None
    ) -> None:
        """The order, its lines, its event and the key's answer: all in one transaction,
        which also drops the order's pending release (ReservationLapsed if it is gone or
        already started: then nothing is saved)."""

    async def order(self, order_number: str) -> Order | None: ...

    async def orders_of(self, user_id: str, *, limit: int, offset: int) -> tuple[list[Order], int]:
        """One page of the user's orders, newest first, and how many there are in all."""

    async def cancel(
        self, order_number: str, *, event: Event, now: datetime, release_retry_at: datetime
    ) -> bool:
        """PLACED → CANCELLED with its event and its stock release, in one transaction;
        False if it was not PLACED (nothing changes).

        The release is written as started by the caller (one attempt), due again at
        ``release_retry_at`` should the caller not confirm it by then.
        """


class SqlOrderStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._sql = _HotPath(engine)
        # The two transactions of every placement skip SQLAlchemy on SQLite (rawsql.py).
        self._raw = RawSql(engine)
        # The look-up of a key while the breaker is open, likewise (``answered_key``).
        self._reader: sqlite3.Connection | None = None
        if self._raw.raw:
            event.listen(engine.sync_engine, "engine_disposed", lambda _e: self._close_reader())

    async def start_order(
        self,
        *,
        key: KeyRequest | None,
        hold: PendingHold | None,
        sku_codes: Sequence[str],
        now: datetime,
    ) -> OrderStart:
        sql = self._sql
        # One pipeline per transaction (one round trip on MySQL): the hold, the prices.
        steps: list[Step] = []
        if hold is not None:
            steps.append((sql.insert_hold, (hold.order_number, sql.time(hold.due_at))))
        if sku_codes:
            steps.append((sql.prices_of(len(sku_codes)), sku_codes))
        if key is None:
            async with self._raw.writing() as tx:
                return OrderStart(None, self._prices_of(await tx.pipeline(steps), sku_codes))
        # Inserting first makes the unique key the referee between concurrent requests.
        insert_key: Step = (
            sql.insert_key,
            (key.user_id, key.key, key.fingerprint, sql.time(now), key.attempt, key.owner),
        )
        for _ in range(3):
            try:
                async with self._raw.writing() as tx:
                    answers = await tx.pipeline([insert_key, *steps])
                prices = self._prices_of(answers, sku_codes)
                return OrderStart(KeyClaim(ClaimOutcome.CLAIMED), prices)
            except IntegrityError:
                pass
            async with self._engine.begin() as conn:
                row = (
                    await conn.execute(
                        select(idempotency_keys).where(
                            idempotency_keys.c.user_id == key.user_id,
                            idempotency_keys.c.idempotency_key == key.key,
                        )
                    )
                ).one_or_none()
                if row is None:
                    continue  # the other attempt failed and let the key go: try again
                if row.request_hash != key.fingerprint:
                    return OrderStart(KeyClaim(ClaimOutcome.MISMATCH), {})
                if row.status_code is not None:
                    replay = KeyClaim(
                        ClaimOutcome.REPLAY,
                        status_code=row.status_code,
                        body=json.loads(row.response_body),
                    )
                    return OrderStart(replay, {})
                fresh = from_db_time(row.created_at) > now - key.stale_after
                if fresh and not await self._owner_gone(conn, row.owner, key.owner, now):
                    return OrderStart(KeyClaim(ClaimOutcome.IN_PROGRESS), {})
                # Its process died mid-request: take the key over, unless another did first.
                taken = await conn.execute(
                    update(idempotency_keys)
                    .where(
                        idempotency_keys.c.user_id == key.user_id,
                        idempotency_keys.c.idempotency_key == key.key,
                        idempotency_keys.c.status_code.is_(None),
                        idempotency_keys.c.created_at == row.created_at,
                    )
                    .values(created_at=to_db_time(now), order_number=key.attempt, owner=key.owner)
                )
                if taken.rowcount == 1:
                    abandoned = row.order_number
                    if abandoned is not None:
                        # Whatever the dead attempt reserved goes back now, not when its hold
                        # ends: the retry reserves anew (docs/order.md).
                        await conn.execute(
                            update(pending_releases)
                            .where(
                                pending_releases.c.order_number == abandoned,
                                pending_releases.c.attempts == 0,
                            )
                            .values(due_at=to_db_time(now))
                        )
                    if hold is not None:
                        await self._write_hold(conn, hold)
                    prices = await self._known_prices(conn, sku_codes)
                    claim = KeyClaim(ClaimOutcome.CLAIMED, abandoned=abandoned)
                    return OrderStart(claim, prices)
                return OrderStart(KeyClaim(ClaimOutcome.IN_PROGRESS), {})
        return OrderStart(KeyClaim(ClaimOutcome.IN_PROGRESS), {})

    async def claim_key(
        self, *, user_id: str, key: str, fingerprint: str, now: datetime, stale_after: timedelta
    ) -> KeyClaim:
        request = KeyRequest(user_id, key, fingerprint, stale_after)
        started = await self.start_order(key=request, hold=None, sku_codes=(), now=now)
        assert started.claim is not None  # noqa: S101
        return started.claim

    async def answered_key(self, key: KeyRequest) -> KeyClaim | None:
        # Every order refused by an open breaker asks (with its key), so: plain SQL, and on
        # a SQLite file a read on a bare connection (WAL: it waits for no writer), which
        # costs a tenth of the async engine's connection check-out and check-in.
        params = (key.user_id, key.key)
        row: tuple[str, int | None, str | None] | None = None
        try:
            if self._raw.raw:
                row = self._bare_reader().execute(self._sql.key_answer, params).fetchone()
                found = True
            else:
                found = False
        except sqlite3.OperationalError:
            self._close_reader()
            found = False
        if not found:
            rows = (await self._raw.read(self._sql.key_answer, params)).rows
            row = cast("tuple[str, int | None, str | None] | None", rows[0] if rows else None)
        if row is None:
            return None
        fingerprint, status_code, body = row
        if status_code is None or body is None:
            return None  # claimed, not answered
        if fingerprint != key.fingerprint:
            return KeyClaim(ClaimOutcome.MISMATCH)
        return KeyClaim(ClaimOutcome.REPLAY, status_code=int(status_code), body=json.loads(body))

    def _bare_reader(self) -> sqlite3.Connection:
        if self._reader is None:
            self._reader = open_sqlite(str(self._engine.url.database))
        return self._reader

    def _close_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    async def forget_lapsed_owners(self, *, now: datetime) -> int:
        """Drop the lease rows of order processes that stopped or died (a missing row says
        the same as a lapsed one); how many."""
        async with self._engine.begin() as conn:
            dropped = await conn.execute(
                delete(leases).where(
                    leases.c.name.like(OWNER_LEASE_PREFIX + "%"),
                    leases.c.until < now.timestamp(),
                )
            )
        return int(dropped.rowcount)

    @staticmethod
    async def _owner_gone(
        conn: AsyncConnection, owner: str | None, asking: str | None, now: datetime
    ) -> bool:
        """Whether the process that holds a claim is known to be gone: its lease lapsed or
        never was. Unknown (a claim without owner) and the asking process itself are not."""
        if owner is None or owner == asking:
            return False
        until = await conn.scalar(
            select(leases.c.until).where(leases.c.name == owner_lease_name(owner))
        )
        return until is None or float(until) <= now.timestamp()

    async def give_up(
        self,
        *,
        order_number: str | None,
        maybe_reserved: bool,
        now: datetime,
        key: KeyRequest | None,
    ) -> None:
        if order_number is None and key is None:
            return
        sql = self._sql
        async with self._raw.writing() as tx:
            if order_number is not None:
                if maybe_reserved:
                    await tx.execute(sql.hold_due, (sql.time(now), order_number))
                else:
                    await tx.execute(sql.drop_unstarted_hold, (order_number,))
            if key is not None:
                await tx.execute(sql.forget_key, (key.user_id, key.key, key.attempt))

    async def apply_price_change(self, change: PriceChange, *, event_id: str) -> bool:
        row = {
            "product": change.product_id,
            "sku": change.sku_code,
            "cents": None if change.price is None else cents(change.price),
            "v": change.version,
        }

        async def once() -> bool:
            async with self._engine.begin() as conn:
                if not await first_delivery(conn, consumer=PRICES_CONSUMER, event_id=event_id):
                    return False
                if (await conn.execute(_UPDATE_PRICE, row)).rowcount == 1:
                    return True
                if (await conn.execute(_PRICE_ROW, row)).first() is not None:
                    return False  # a later change of this product is already applied
                await conn.execute(
                    _INSERT_PRICE,
                    {
                        "product_id": change.product_id,
                        "sku_code": change.sku_code,
                        "price_cents": row["cents"],
                        "version": change.version,
                    },
                )
                return True

        # Two consumers racing on one product (a hand-over) can deadlock or both insert;
        # the loser runs again and then sees the winner's row.
        return await retry_on_lock_conflict(once)

    async def known_prices(self, sku_codes: Sequence[str]) -> dict[str, Decimal]:
        """The price list's prices of ``sku_codes`` (those it cannot price are left out)."""
        async with self._engine.connect() as conn:
            return await self._known_prices(conn, sku_codes)

    async def forget_key(self, *, user_id: str, key: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(_FORGET_KEY, {"user": user_id, "key": key})

    async def save_placed(
        self, order: Order, *, event: Event, answer: SavedAnswer | None = None
    ) -> None:
        number = order.order_number
        sql = self._sql
        steps: list[Step] = [
            # First: a release the reconciler started (or finished) means the stock is on
            # its way back, and an order without its stock must not be saved (checked
            # below, before the COMMIT: the rows written after it are then rolled back).
            (sql.drop_unstarted_hold, (number,)),
            (
                sql.insert_order,
                (
                    number,
                    order.user_id,
                    order.buyer_email,
                    order.status.value,
                    cents(order.total),
                    sql.time(order.created_at),
                ),
            ),
            Many(
                sql.insert_lines,
                [
                    (number, line_no, line.sku_code, line.quantity, cents(line.unit_price))
                    for line_no, line in enumerate(order.lines, start=1)
                ],
            ),
            # add_event's row (shop.platform.outbox), in plain SQL like the rest.
            (sql.insert_event, (event.id, ORDERS_TOPIC, event.key, event.to_json(), time.time())),
        ]
        if answer is not None:
            saved = (
                answer.status_code,
                _COMPACT.encode(answer.body),
                number,
                answer.user_id,
                answer.key,
                number,
            )
            steps.append((sql.save_answer, saved))
        async with self._raw.writing() as tx:
            answers = await tx.pipeline(steps)  # one round trip on MySQL
            if answers[0].rowcount != 1:
                raise ReservationLapsed(number)
            if answer is not None and answers[-1].rowcount != 1:
                raise KeyLost(answer.key)

    async def order(self, order_number: str) -> Order | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(select(orders).where(orders.c.order_number == order_number))
            ).one_or_none()
            if row is None:
                return None
            found = await self._with_lines(conn, [row])
        return found[0]

    async def orders_of(self, user_id: str, *, limit: int, offset: int) -> tuple[list[Order], int]:
        async with self._engine.connect() as conn:
            total = int(
                (
                    await conn.execute(
                        select(func.count()).select_from(orders).where(orders.c.user_id == user_id)
                    )
                ).scalar_one()
            )
            rows = (
                await conn.execute(
                    select(orders)
                    .where(orders.c.user_id == user_id)
                    .order_by(orders.c.created_at.desc(), orders.c.order_number.desc())
                    .limit(limit)
                    .offset(offset)
                )
            ).all()
            return await self._with_lines(conn, rows), total

    async def cancel(
        self, order_number: str, *, event: Event, now: datetime, release_retry_at: datetime
    ) -> bool:
        async with self._engine.begin() as conn:
            changed = await conn.execute(
                update(orders)
                .where(
                    orders.c.order_number == order_number,
                    orders.c.status == OrderStatus.PLACED.value,
                )
                .values(status=OrderStatus.CANCELLED.value, cancelled_at=to_db_time(now))
            )
            if changed.rowcount != 1:
                return False
            await add_event(conn, topic=ORDERS_TOPIC, event=event)
            await conn.execute(
                delete(pending_releases).where(pending_releases.c.order_number == order_number)
            )
            await conn.execute(
                insert(pending_releases).values(
                    order_number=order_number, due_at=to_db_time(release_retry_at), attempts=1
                )
            )
        return True

    async def hold_release(self, order_number: str, *, due_at: datetime) -> None:
        async with self._engine.begin() as conn:
            await self._write_hold(conn, PendingHold(order_number, due_at))

    async def due_releases(self, *, now: datetime, limit: int) -> list[DueRelease]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(pending_releases.c.order_number, pending_releases.c.attempts)
                .where(pending_releases.c.due_at <= to_db_time(now))
                .order_by(pending_releases.c.due_at, pending_releases.c.order_number)
                .limit(limit)
            )
            return [DueRelease(row.order_number, int(row.attempts)) for row in rows]

    async def claim_release(
        self, order_number: str, *, attempts: int, now: datetime, retry_at: datetime
    ) -> bool:
        async def once() -> bool:
            async with self._engine.begin() as conn:
                claimed = await conn.execute(
                    update(pending_releases)
                    .where(
                        pending_releases.c.order_number == order_number,
                        pending_releases.c.attempts == attempts,
                        pending_releases.c.due_at <= to_db_time(now),
                    )
                    .values(attempts=attempts + 1, due_at=to_db_time(retry_at))
                )
            return bool(claimed.rowcount == 1)

        # Racing claims on one row can end in an InnoDB deadlock; run again, the compare
        # then tells who won.
        return await retry_on_lock_conflict(once)

    async def release_done(self, order_number: str) -> None:
        await execute_retrying(
            self._engine,
            delete(pending_releases).where(pending_releases.c.order_number == order_number),
        )

    async def release_failed(self, order_number: str, *, error: str) -> None:
        await execute_retrying(
            self._engine,
            update(pending_releases)
            .where(pending_releases.c.order_number == order_number)
            .values(last_error=error[:500]),
        )

    async def _write_hold(self, conn: AsyncConnection, hold: PendingHold) -> None:
        await conn.exec_driver_sql(
            self._sql.insert_hold, (hold.order_number, self._sql.time(hold.due_at))
        )

    async def _known_prices(
        self, conn: AsyncConnection, sku_codes: Sequence[str]
    ) -> dict[str, Decimal]:
        """The price of each SKU one product of the price list sells; deleted ones and a
        SKU two products claim (a change of SKU whose events have not all arrived) are
        left out, so the catalogue is asked for them."""
        if not sku_codes:
            return {}
        rows = await conn.exec_driver_sql(self._sql.prices_of(len(sku_codes)), tuple(sku_codes))
        return _priced(cast("list[tuple[str, int | None]]", rows.all()))

    @staticmethod
    def _prices_of(answers: Sequence[Rows], sku_codes: Sequence[str]) -> dict[str, Decimal]:
        """The prices a ``start_order`` pipeline read (its last step, when it had SKUs)."""
        if not sku_codes:
            return {}
        return _priced(cast("list[tuple[str, int | None]]", answers[-1].rows))

    async def _with_lines(self, conn: AsyncConnection, rows: Sequence[Any]) -> list[Order]:
        if not rows:
            return []
        numbers = [row.order_number for row in rows]
        lines: dict[str, list[OrderLine]] = {n: [] for n in numbers}
        for line in await conn.execute(
            select(order_lines)
            .where(order_lines.c.order_number.in_(numbers))
            .order_by(order_lines.c.order_number, order_lines.c.line_no)
        ):
            lines[line.order_number].append(
                OrderLine(line.sku_code, line.quantity, from_cents(line.unit_price_cents))
            )
        return [
            Order(
                order_number=row.order_number,
                user_id=row.user_id,
                buyer_email=row.buyer_email,
                status=OrderStatus(row.status),
                lines=tuple(lines[row.order_number]),
                created_at=from_db_time(row.created_at),
            )
            for row in rows
        ]


def _priced(rows: Sequence[tuple[str, int | None]]) -> dict[str, Decimal]:
    """The price list's rows as prices: deleted products (no price) and a SKU two products
    claim (a change of SKU whose events have not all arrived) are left out, so the
    catalogue is asked for them."""
    found: dict[str, Decimal] = {}
    ambiguous: set[str] = set()
    for sku, price_cents in rows:
        if price_cents is None:
            continue
        if sku in found:
            ambiguous.add(sku)
        found[sku] = from_cents(int(price_cents))
    for sku in ambiguous:
        del found[sku]
    return found


def purge_answered_keys(engine: AsyncEngine) -> KeysetSweep:
    """Retention of answered Idempotency-Keys: ``purge(before, limit)`` deletes keys
    answered and created before ``before`` (epoch seconds), a page of the table at a time
    (no index on ``created_at`` needed). A repeat after that gets a new order: the key's
    replay window is over. An unanswered claim is never purged here."""

    def answered_before(before: Any) -> Any:
        return and_(
            idempotency_keys.c.status_code.is_not(None), idempotency_keys.c.created_at < before
        )

    return KeysetSweep(
        engine,
        idempotency_keys,
        expired=answered_before,
        time_of=lambda epoch: to_db_time(datetime.fromtimestamp(epoch, UTC)),
    )
