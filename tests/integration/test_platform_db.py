"""Engines from URLs: the embedded SQLite file and MariaDB answer through the same code."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import pymysql
import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError, OperationalError

from shop.platform import db
from shop.platform.db import (
    create_engine,
    is_lock_conflict,
    normalise_url,
    ping,
    retry_on_lock_conflict,
)


def test_plain_urls_get_the_async_drivers() -> None:
    assert normalise_url("sqlite:///x.db").drivername == "sqlite+aiosqlite"
    mysql = normalise_url("mysql://u:p@db:3306/shop")
    assert mysql.drivername == "mysql+aiomysql" and mysql.query["charset"] == "utf8mb4"


async def test_sqlite_file_is_created_in_wal_mode(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'nested' / 'svc.db'}")
    try:
        await ping(engine)
        async with engine.connect() as conn:
            mode = (await conn.execute(text("PRAGMA journal_mode"))).scalar_one()
        assert mode == "wal"
        assert (tmp_path / "nested" / "svc.db").exists()
    finally:
        await engine.dispose()


async def test_sqlite_runs_on_the_loop_and_waits_for_a_writer_without_blocking_it(
    tmp_path: Path,
) -> None:
    """Statements run inline (no thread per connection), and one that finds the write lock
    taken waits on the loop: the lock's holder (here released by a timer on that very
    loop, as a task of the same process would) gets to finish, and the statement goes on."""
    path = tmp_path / "svc.db"
    engine = create_engine(f"sqlite:///{path}")
    threads = threading.active_count()
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE probe (id INTEGER PRIMARY KEY)"))
        assert engine.dialect.driver == "shop_inline"
        assert threading.active_count() == threads, "no thread per connection"
        with closing(sqlite3.connect(path, isolation_level=None)) as holder:
            holder.execute("BEGIN IMMEDIATE")  # takes the write lock
            loop = asyncio.get_running_loop()
            loop.call_later(0.3, holder.execute, "COMMIT")
            started = loop.time()
            async with engine.begin() as conn:
                await conn.execute(text("INSERT INTO probe (id) VALUES (1)"))
            assert loop.time() - started >= 0.25, "it waited for the lock"
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM probe"))).scalar_one() == 1
    finally:
        await engine.dispose()


async def test_sqlite_gives_up_on_a_lock_that_is_never_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "SQLITE_BUSY_PATIENCE_S", 0.2)
    path = tmp_path / "svc.db"
    engine = create_engine(f"sqlite:///{path}")
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE probe (id INTEGER PRIMARY KEY)"))
        with closing(sqlite3.connect(path, isolation_level=None)) as holder:
            holder.execute("BEGIN IMMEDIATE")
            with pytest.raises(OperationalError) as failed:
                async with engine.begin() as conn:
                    await conn.execute(text("INSERT INTO probe (id) VALUES (1)"))
            assert is_lock_conflict(failed.value), "callers run the transaction again"
    finally:
        await engine.dispose()


async def test_a_busy_sqlite_engine_keeps_its_connections(tmp_path: Path) -> None:
    """Bursts of concurrent transactions reuse the connections the first burst opened,
    rather than opening (and running the pragmas of) a new one for most transactions."""
    engine = create_engine(f"sqlite:///{tmp_path / 'busy.db'}")
    opened = 0

    def count(*_: object) -> None:
        nonlocal opened
        opened += 1

    event.listen(engine.sync_engine, "connect", count)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE t (n INTEGER)"))

        async def transaction(n: int) -> None:
            async with engine.begin() as conn:
                await conn.execute(text("INSERT INTO t VALUES (:n)"), {"n": n})

        for _ in range(10):
            await asyncio.gather(*(transaction(n) for n in range(48)))
        async with engine.connect() as conn:
            written = (await conn.execute(text("SELECT count(*) FROM t"))).scalar_one()
    finally:
        await engine.dispose()
    assert written == 480
    assert opened <= 48, f"{opened} connections opened for 480 transactions"


async def test_a_threaded_sqlite_engine_keeps_aiosqlite(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'svc.db'}", threaded=True)
    try:
        await ping(engine)
        assert engine.dialect.driver == "aiosqlite"
    finally:
        await engine.dispose()


async def test_same_engine_code_reaches_both_backends(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await ping(engine)
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE probe (id INTEGER PRIMARY KEY, note TEXT)"))
            await conn.execute(text("INSERT INTO probe (id, note) VALUES (1, 'ünïcode')"))
        async with engine.connect() as conn:
            note = (await conn.execute(text("SELECT note FROM probe"))).scalar_one()
        assert note == "ünïcode"
    finally:
        await engine.dispose()


async def test_a_failing_statement_does_not_carry_its_bound_values(database_url: str) -> None:
    """Logged database errors must not leak the e-mails and hashes a statement was given.

    (A server's own message may still quote a value: MariaDB's duplicate-key error names
    the entry. That one the parameters setting cannot hide; docs/platform.md says so.)
    """
    engine = create_engine(database_url)
    secret = "ada.lovelace@example.com"
    try:
        with pytest.raises(DBAPIError) as failed:
            async with engine.begin() as conn:
                insert = text("INSERT INTO nobody (email) VALUES (:email)")
                await conn.execute(insert, {"email": secret})
        assert "INSERT INTO nobody" in str(failed.value)
        assert secret not in str(failed.value)
        assert "hidden due to hide_parameters" in str(failed.value)
    finally:
        await engine.dispose()


def test_lost_lock_races_are_told_apart_from_real_errors() -> None:
    deadlock = OperationalError("UPDATE", {}, pymysql.err.OperationalError(1213, "Deadlock found"))
    busy = OperationalError("UPDATE", {}, sqlite3.OperationalError("database is locked"))
    gone = OperationalError("UPDATE", {}, pymysql.err.OperationalError(2013, "Lost connection"))
    assert is_lock_conflict(deadlock) and is_lock_conflict(busy)
    assert not is_lock_conflict(gone)


async def test_a_transaction_that_lost_a_lock_race_is_run_again() -> None:
    deadlock = OperationalError("UPDATE", {}, pymysql.err.OperationalError(1213, "Deadlock found"))
    gone = OperationalError("UPDATE", {}, pymysql.err.OperationalError(2013, "Lost connection"))
    outcomes: list[Exception | None] = [deadlock, deadlock, None]
    calls = 0

    async def update() -> int:
        nonlocal calls
        calls += 1
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome
        return calls

    assert await retry_on_lock_conflict(update) == 3

    async def always(error: Exception) -> None:
        raise error

    with pytest.raises(OperationalError):
        await retry_on_lock_conflict(lambda: always(deadlock), attempts=2)
    with pytest.raises(OperationalError, match="Lost connection"):
        await retry_on_lock_conflict(lambda: always(gone))
