"""Retention on real databases (SQLite and MariaDB; the event log on SQLite) with an
injected clock: rows past their retention go, a bounded batch at a time; rows inside it,
unpublished outbox rows, unanswered Idempotency-Keys and events some group has not passed
yet stay."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from shop.auth.domain import RefreshToken, User
from shop.auth.store import SqlAuthStore, refresh_families, refresh_tokens
from shop.order.store import idempotency_keys, purge_answered_keys
from shop.platform import mongo
from shop.platform.db import create_engine, migrate, to_db_time
from shop.platform.eventlog import SqliteEventLog
from shop.platform.events import Event
from shop.platform.inbox import inbox
from shop.platform.outbox import SqlOutbox, add_event, outbox
from shop.platform.retention import RetentionJob, RetentionPolicy, inbox_retention
from shop.platform.worker import BackgroundJobs
from tests.integration.test_registry_interop import eventually

DAY = 86_400.0
NOW = 1_800_000_000.0  # the injected clock: every job below sees this moment
WEEK = RetentionPolicy(keep_s=7 * DAY, batch=2)


def clock() -> float:
    return NOW


def ago(days: float) -> float:
    return NOW - days * DAY


def moment(days_ago: float) -> datetime:
    return datetime.fromtimestamp(ago(days_ago), UTC)


@pytest.fixture
async def order_db(database_url: str) -> AsyncIterator[AsyncEngine]:
    """The order service's real schema: outbox, inbox, Idempotency-Keys."""
    engine = create_engine(database_url)
    await migrate(engine, package="shop.order", service="order")
    try:
        yield engine
    finally:
        await engine.dispose()


async def _count(engine: AsyncEngine, column: object, *where: object) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(column).where(*where)))  # type: ignore[arg-type]


async def test_published_outbox_rows_go_after_retention_and_unpublished_never(
    order_db: AsyncEngine,
) -> None:
    async with order_db.begin() as conn:
        for n in range(7):
            event = Event(type="order.placed", source="t", subject=f"o-{n}", data={})
            await add_event(conn, topic="orders", event=event)
    # seq 1-5 published 8-12 days ago, 6 published yesterday, 7 never (and written long ago).
    async with order_db.begin() as conn:
        for seq in range(1, 6):
            await conn.execute(
                update(outbox).where(outbox.c.seq == seq).values(published_at=ago(7 + seq))
            )
        await conn.execute(update(outbox).where(outbox.c.seq == 6).values(published_at=ago(1)))
        await conn.execute(update(outbox).where(outbox.c.seq == 7).values(created_at=ago(300)))
    jobs = BackgroundJobs()
    job = RetentionJob(
        SqlOutbox(order_db).purge_published, name="outbox", policy=WEEK, clock=clock, jobs=jobs
    )

    assert await job.purge_once() == (2, True), "a bounded batch, oldest first"
    assert await job.purge_all() == 3
    async with order_db.connect() as conn:
        left = (await conn.execute(select(outbox.c.seq).order_by(outbox.c.seq))).scalars().all()
    assert list(left) == [6, 7]
    assert jobs.purged["outbox"] == 5


async def test_inbox_rows_go_after_the_redelivery_horizon(order_db: AsyncEngine) -> None:
    async with order_db.begin() as conn:
        await conn.execute(
            insert(inbox),
            [
                {"consumer": c, "event_id": f"e-{n}", "processed_at": ago(days)}
                for c in ("order-prices", "other")
                for n, days in enumerate([30, 15, 14.5, 13, 0])
            ],
        )
    job = inbox_retention(
        order_db, service="order", policy=RetentionPolicy(keep_s=14 * DAY, batch=3), clock=clock
    )

    assert await job.purge_all() == 6
    async with order_db.connect() as conn:
        kept = (await conn.execute(select(inbox.c.consumer, inbox.c.event_id))).all()
    assert sorted(kept) == sorted((c, e) for c in ("order-prices", "other") for e in ("e-3", "e-4"))


async def test_answered_idempotency_keys_go_after_their_replay_window(
    order_db: AsyncEngine,
) -> None:
    rows = [
        ("answered-old", 3.0, 201),
        ("answered-older", 40.0, 409),
        ("answered-new", 0.5, 201),
        ("claimed-old", 3.0, None),  # never answered: not retention's to drop
    ]
    async with order_db.begin() as conn:
        await conn.execute(
            insert(idempotency_keys),
            [
                {
                    "user_id": "u-1",
                    "idempotency_key": key,
                    "request_hash": "h",
                    "created_at": to_db_time(moment(days)),
                    "status_code": status,
                    "response_body": "{}" if status else None,
                }
                for key, days, status in rows
            ],
        )
    job = RetentionJob(
        purge_answered_keys(order_db),
        name="idempotency",
        policy=RetentionPolicy(keep_s=DAY, batch=2),
        clock=clock,
    )
    assert await job.purge_all() == 2
    async with order_db.connect() as conn:
        kept = (await conn.execute(select(idempotency_keys.c.idempotency_key))).scalars()
        assert sorted(kept) == ["answered-new", "claimed-old"]


@pytest.fixture
async def auth_store(database_url: str) -> AsyncIterator[tuple[AsyncEngine, SqlAuthStore]]:
    engine = create_engine(database_url)
    await migrate(engine, package="shop.auth", service="auth")
    try:
        yield engine, SqlAuthStore(engine)
    finally:
        await engine.dispose()


async def test_expired_refresh_tokens_go_and_the_families_they_leave_empty(
    auth_store: tuple[AsyncEngine, SqlAuthStore],
) -> None:
    engine, store = auth_store
    user = User(id="u-1", name="Ada", email="ada@example.com", roles=("customer",))
    await store.add_user(user, password_hash="x", now=moment(60))

    def token(name: str, family: str, *, issued: float, expires: float) -> RefreshToken:
        return RefreshToken(
            token_hash=name.ljust(64, "0"),
            family_id=family,
            user_id=user.id,
            issued_at=moment(issued),
            expires_at=moment(expires),
        )

    # Family "gone": one token, expired 3 days ago. Family "live": an expired one and the
    # current one. Family "fresh": expired an hour ago, inside the 1-day retention.
    await store.start_family(token("a", "gone", issued=17, expires=3))
    await store.start_family(token("b", "live", issued=20, expires=6))
    async with engine.begin() as conn:
        current = token("c", "live", issued=1, expires=-13)
        await SqlAuthStore._insert_token(conn, current)  # noqa: SLF001 - a rotation's row
    await store.start_family(token("d", "fresh", issued=14, expires=1 / 24))

    job = RetentionJob(
        store.purge_expired_tokens,
        name="refresh",
        policy=RetentionPolicy(keep_s=DAY, batch=1),
        clock=clock,
    )
    assert await job.purge_all() == 3  # tokens a and b, family "gone"
    async with engine.connect() as conn:
        tokens = (await conn.execute(select(refresh_tokens.c.token_hash))).scalars().all()
        families = (await conn.execute(select(refresh_families.c.id))).scalars().all()
    assert sorted(t[0] for t in tokens) == ["c", "d"]
    assert sorted(families) == ["fresh", "live"]


# --- the embedded event log (SQLite only) ---------------------------------------------------


@pytest.fixture
async def event_log(tmp_path: Path) -> AsyncIterator[tuple[SqliteEventLog, Path]]:
    path = tmp_path / "events.db"
    log = SqliteEventLog(f"sqlite:///{path}", client_id="test")
    try:
        yield log, path
    finally:
        await log.close()


def _age_events(path: Path, days_by_seq: dict[int, float]) -> None:
    with sqlite3.connect(path) as db:
        for seq, days in days_by_seq.items():
            db.execute("UPDATE events SET appended_at = ? WHERE seq = ?", (ago(days), seq))


def _offsets(path: Path, rows: list[tuple[str, str, int]]) -> None:
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT OR REPLACE INTO consumer_offsets (grp, topic, committed) VALUES (?, ?, ?)",
            rows,
        )


def _seqs(path: Path) -> list[int]:
    with sqlite3.connect(path) as db:
        return [seq for (seq,) in db.execute("SELECT seq FROM events ORDER BY seq")]


async def test_the_event_log_drops_only_old_events_every_group_has_passed(
    event_log: tuple[SqliteEventLog, Path],
) -> None:
    log, path = event_log
    events = [Event(type="order.placed", source="t", subject=f"o-{n}", data={}) for n in range(6)]
    await log.publish("orders", events)  # seq 1-6
    await log.publish("products", [Event(type="p", source="t", subject="p", data={})])  # 7
    await log.publish("orders", [Event(type="order.placed", source="t", subject="x", data={})])
    _age_events(path, {1: 30, 2: 29, 3: 28, 4: 27, 5: 26, 6: 20, 7: 30, 8: 2})
    # notification has handled up to 6, a slower group only up to 4; nobody reads products.
    _offsets(path, [("notification", "orders", 6), ("slow", "orders", 4)])
    with sqlite3.connect(path) as db:  # event 2 was set aside by a group: a replay needs it
        db.execute(
            "INSERT INTO dead_letters (grp, topic, seq, payload, error, failed_at)"
            " VALUES ('slow', 'orders', 2, '{}', 'boom', 0)"
        )
    job = RetentionJob(log.purge_events, name="eventlog", policy=WEEK, clock=clock)

    assert await job.purge_all() == 4  # 1, 3, 4 (all groups passed them) and 7 (no group)
    assert _seqs(path) == [2, 5, 6, 8]
    _offsets(path, [("slow", "orders", 8)])  # the slow group catches up
    assert await job.purge_all() == 2  # 5 and 6 go; 8 is two days old, 2 a dead letter
    assert _seqs(path) == [2, 8]
    # The log still works: the replayed dead letter comes back from what was kept.
    assert await log.replay_dead_letters(group="slow") == 1


async def test_the_retention_job_runs_on_its_own_in_the_background(tmp_path: Path) -> None:
    """As the services get it (``from_url`` passes the settings' policy): ``start`` runs
    the retention on the common loop, whose first step comes at once."""
    path = tmp_path / "events.db"
    log = SqliteEventLog(
        f"sqlite:///{path}",
        client_id="test",
        retention=RetentionPolicy(keep_s=DAY, interval_s=60, batch=10),
    )
    try:
        await log.publish("orders", [Event(type="t", source="t", subject="s", data={})])
        with sqlite3.connect(path) as db:
            db.execute("UPDATE events SET appended_at = ?", (time.time() - 2 * DAY,))
        await log.start()

        async def purged() -> bool:
            return _seqs(path) == []

        await eventually(purged, within_s=5)
    finally:
        await log.close()


async def test_the_catalogue_outbox_on_mongodb_keeps_unpublished_events(
    make_mongo_url: Callable[[], str],
) -> None:
    async with mongo.mongo_database(make_mongo_url()) as database:
        source = mongo.MongoOutbox(database)
        await source.create_indexes()
        published = [ago(30), ago(20), ago(10), ago(1), None, None]
        await database[mongo.OUTBOX].insert_many(
            [
                {"_id": n, "eventId": f"e-{n}", "topic": "products", "publishedAt": when}
                for n, when in enumerate(published, start=1)
            ]
        )
        job = RetentionJob(source.purge_published, name="outbox", policy=WEEK, clock=clock)
        assert await job.purge_once() == (2, True)
        assert await job.purge_all() == 1
        left = [doc["_id"] async for doc in database[mongo.OUTBOX].find({}, {"_id": 1})]
        assert sorted(left) == [4, 5, 6]
