"""Raw write transactions (``shop.platform.rawsql``): bare sqlite3 on a SQLite file, the
engine on MariaDB, the same behaviour and the same exceptions on both."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from shop.platform import db
from shop.platform.db import create_engine, is_lock_conflict
from shop.platform.rawsql import RawSql

PROBE_COLUMNS = "id INTEGER PRIMARY KEY, note VARCHAR(40)"


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text("CREATE TABLE probe (id INTEGER PRIMARY KEY, note VARCHAR(40))")
            )
        yield engine
    finally:
        await engine.dispose()


async def _notes(engine: AsyncEngine) -> list[tuple[int, str]]:
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT id, note FROM probe ORDER BY id"))
        return [(int(row.id), str(row.note)) for row in rows]


def _sqlite_file(engine: AsyncEngine) -> Path:
    return Path(str(engine.url.database))


def _driver_sql(raw: RawSql, statement: str) -> str:
    """``statement`` with the driver's placeholder for each ``?``."""
    return statement.replace("?", raw.placeholder)


async def test_a_transaction_commits_whole_or_not_at_all(engine: AsyncEngine) -> None:
    raw = RawSql(engine)
    insert = _driver_sql(raw, "INSERT INTO probe (id, note) VALUES (?, ?)")
    async with raw.writing() as tx:
        await tx.executemany(insert, [(1, "a"), (2, "b")])
        changed = await tx.execute(
            _driver_sql(raw, "UPDATE probe SET note = ? WHERE id > ?"), ("c", 1)
        )
        assert changed.rowcount == 1
        found = await tx.execute(_driver_sql(raw, "SELECT note FROM probe WHERE id = ?"), (2,))
        assert found.rows == [("c",)], "a transaction reads its own writes"
    with pytest.raises(RuntimeError):
        async with raw.writing() as tx:
            await tx.execute(insert, (3, "lost"))
            raise RuntimeError("the caller changed its mind")
    assert await _notes(engine) == [(1, "a"), (2, "c")]
    async with raw.writing() as tx:  # a rolled-back connection serves again
        await tx.execute(insert, (3, "d"))
    assert await _notes(engine) == [(1, "a"), (2, "c"), (3, "d")]


async def test_errors_are_the_engines_and_leave_nothing_behind(engine: AsyncEngine) -> None:
    """Stores catch SQLAlchemy's IntegrityError (a taken key) whichever path ran."""
    raw = RawSql(engine)
    insert = _driver_sql(raw, "INSERT INTO probe (id, note) VALUES (?, ?)")
    async with raw.writing() as tx:
        await tx.execute(insert, (1, "first"))
    with pytest.raises(IntegrityError) as taken:
        async with raw.writing() as tx:
            await tx.execute(insert, (2, "second"))
            await tx.execute(insert, (1, "secret-value"))
    if engine.dialect.name == "sqlite":  # MariaDB quotes the entry in its own message
        assert "secret-value" not in str(taken.value)
    assert await _notes(engine) == [(1, "first")]


async def test_sqlite_runs_bare_and_waits_for_another_writer_on_the_loop(tmp_path: Path) -> None:
    """On a SQLite file no statement goes through the engine; a transaction that finds the
    write lock taken waits on the loop, so the holder (here a timer on the same loop) ends."""
    engine = create_engine(f"sqlite:///{tmp_path / 'svc.db'}")
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE probe (id INTEGER PRIMARY KEY, note TEXT)"))
        raw = RawSql(engine)
        assert raw.raw
        with closing(sqlite3.connect(_sqlite_file(engine), isolation_level=None)) as holder:
            holder.execute("BEGIN IMMEDIATE")
            loop = asyncio.get_running_loop()
            loop.call_later(0.3, holder.execute, "COMMIT")
            started = loop.time()
            async with raw.writing() as tx:
                await tx.execute("INSERT INTO probe (id, note) VALUES (1, 'waited')")
            assert loop.time() - started >= 0.25, "it waited for the lock"
        assert await _notes(engine) == [(1, "waited")]
    finally:
        await engine.dispose()


async def test_sqlite_gives_up_on_a_lock_that_is_never_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "SQLITE_BUSY_PATIENCE_S", 0.2)
    engine = create_engine(f"sqlite:///{tmp_path / 'svc.db'}")
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE probe (id INTEGER PRIMARY KEY, note TEXT)"))
        raw = RawSql(engine)
        with closing(sqlite3.connect(_sqlite_file(engine), isolation_level=None)) as holder:
            holder.execute("BEGIN IMMEDIATE")
            with pytest.raises(OperationalError) as failed:
                async with raw.writing() as tx:
                    await tx.execute("INSERT INTO probe (id, note) VALUES (1, 'never')")
            assert is_lock_conflict(failed.value), "callers run the transaction again"
        async with raw.writing() as tx:  # the lock is free again: so is the connection
            await tx.execute("INSERT INTO probe (id, note) VALUES (2, 'later')")
        assert await _notes(engine) == [(2, "later")]
    finally:
        await engine.dispose()


def _open_files(path: Path) -> int:
    """How many of this process's file descriptors are ``path`` (its connections)."""
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == str(path.resolve()))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
async def test_sqlite_connections_are_kept_and_closed_with_the_engine(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'svc.db'}")
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE probe (id INTEGER PRIMARY KEY, note TEXT)"))
    raw = RawSql(engine)
    path = _sqlite_file(engine)
    engine_files = _open_files(path)

    async def insert(n: int) -> None:
        async with raw.writing() as tx:
            await tx.execute("INSERT INTO probe (id, note) VALUES (?, 'x')", (n,))

    await asyncio.gather(*(insert(n) for n in range(200)))
    # Transactions that never wait finish before the next starts: one connection serves.
    kept = _open_files(path) - engine_files
    assert kept == 1
    await asyncio.gather(*(insert(n) for n in range(200, 400)))
    assert _open_files(path) - engine_files == kept, "connections are reused, not reopened"
    await engine.dispose()
    assert _open_files(path) == 0
    with closing(sqlite3.connect(path)) as check:
        assert check.execute("SELECT count(*) FROM probe").fetchone() == (400,)
