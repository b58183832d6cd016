"""Raw write transactions (``shop.platform.rawsql``): bare sqlite3 on a SQLite file, the
engine on MariaDB, the same behaviour and the same exceptions on both."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from shop.platform import db
from shop.platform.db import create_engine, is_lock_conflict
from shop.platform.rawsql import Many, RawSql
from tests.conftest import mysql_admin

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


async def test_a_pipeline_answers_each_step_in_order(engine: AsyncEngine) -> None:
    """One round trip on MariaDB, statement by statement on SQLite: the same answers."""
    raw = RawSql(engine)
    insert = _driver_sql(raw, "INSERT INTO probe (id, note) VALUES (?, ?)")
    async with raw.writing() as tx:
        answers = await tx.pipeline(
            [
                (insert, (1, "a; DROP TABLE probe; --")),  # values stay values
                Many(insert, [(2, "b"), (3, "it's")]),
                Many(_driver_sql(raw, "UPDATE probe SET note = ? WHERE id = ?"), [("x", 2)] * 2),
                (_driver_sql(raw, "UPDATE probe SET note = ? WHERE id >= ?"), ("c", 3)),
                (_driver_sql(raw, "SELECT id, note FROM probe WHERE id < ? ORDER BY id"), (9,)),
                ("SELECT COUNT(*) FROM probe", ()),
            ]
        )
    assert [a.rowcount for a in answers[:4]] == [1, 2, 2, 1]
    assert answers[4].rows == [(1, "a; DROP TABLE probe; --"), (2, "x"), (3, "c")]
    assert answers[5].rows == [(3,)]
    assert await _notes(engine) == [(1, "a; DROP TABLE probe; --"), (2, "x"), (3, "c")]


async def test_a_read_sees_what_was_committed(engine: AsyncEngine) -> None:
    raw = RawSql(engine)
    select = _driver_sql(raw, "SELECT note FROM probe WHERE id = ?")
    assert (await raw.read(select, (1,))).rows == []
    async with raw.writing() as tx:
        await tx.execute(_driver_sql(raw, "INSERT INTO probe (id, note) VALUES (?, ?)"), (1, "a"))
    for _ in range(3):  # the pool's connection is not left inside a read's transaction
        assert (await raw.read(select, (1,))).rows == [("a",)]
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE probe SET note = 'b' WHERE id = 1"))
    assert (await raw.read(select, (1,))).rows == [("b",)], "no snapshot kept across reads"


async def test_a_failed_step_stops_the_pipeline_and_the_transaction(engine: AsyncEngine) -> None:
    raw = RawSql(engine)
    insert = _driver_sql(raw, "INSERT INTO probe (id, note) VALUES (?, ?)")
    async with raw.writing() as tx:
        await tx.execute(insert, (1, "first"))
    with pytest.raises(IntegrityError) as taken:
        async with raw.writing() as tx:
            await tx.pipeline(
                [
                    (insert, (2, "second")),
                    (insert, (1, "secret-value")),  # taken
                    (insert, (3, "never")),
                ]
            )
    assert insert in str(taken.value), "the error names the statement as written"
    if engine.dialect.name == "sqlite":  # MariaDB quotes the entry in its own message
        assert "secret-value" not in str(taken.value)
    assert await _notes(engine) == [(1, "first")]
    async with raw.writing() as tx:  # the connection serves again
        assert [a.rowcount for a in await tx.pipeline([(insert, (4, "d"))])] == [1]
    assert await _notes(engine) == [(1, "first"), (4, "d")]


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


# --- MySQL/MariaDB: aiomysql's pool beside the engine's -------------------------------------


@pytest.fixture
async def mysql_engine(make_mysql_url: Callable[[], str]) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(make_mysql_url())
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"CREATE TABLE probe ({PROBE_COLUMNS})"))
        yield engine
    finally:
        await engine.dispose()


def _sessions_on(engine: AsyncEngine, *, running: str = "") -> list[tuple[int, str]]:
    """(id, statement) of the server's sessions on ``engine``'s database, those running a
    statement that contains ``running`` when given."""
    admin = mysql_admin()
    try:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT id, COALESCE(info, '') FROM information_schema.processlist WHERE db = %s",
                (engine.url.database,),
            )
            rows = [(int(row[0]), str(row[1])) for row in cur.fetchall()]
    finally:
        admin.close()
    return [row for row in rows if running in row[1] and "processlist" not in row[1]]


@pytest.mark.mysql
async def test_mysql_rowcount_counts_matched_rows_as_the_engine_does(
    mysql_engine: AsyncEngine,
) -> None:
    """An UPDATE that sets a row to what it holds still counts it (the stores read
    ``rowcount == 1`` as "the row is there"), as on SQLite and through the engine."""
    raw = RawSql(mysql_engine)
    async with raw.writing() as tx:
        await tx.execute("INSERT INTO probe (id, note) VALUES (%s, %s)", (1, "same"))
    async with raw.writing() as tx:
        same = await tx.execute("UPDATE probe SET note = %s WHERE id = %s", ("same", 1))
        none = await tx.execute("UPDATE probe SET note = %s WHERE id = %s", ("x", 9))
    assert (same.rowcount, none.rowcount) == (1, 0)


@pytest.mark.mysql
async def test_mysql_a_transaction_cancelled_mid_statement_leaves_no_connection_behind(
    mysql_engine: AsyncEngine,
) -> None:
    """A request given up while its statement runs: its connection (whose next read would
    be that statement's answer) is closed, never handed to the next transaction."""
    raw = RawSql(mysql_engine)

    async def sleeper() -> None:
        async with raw.writing() as tx:
            await tx.execute("SELECT SLEEP(30)")

    task = asyncio.create_task(sleeper())
    for _ in range(500):  # until the server runs it (one statement's round trip)
        if _sessions_on(mysql_engine, running="SLEEP(30)"):
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the statement never reached the server")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for n in range(3):  # one connection would serve these: never the cancelled one
        async with raw.writing() as tx:
            assert (await tx.execute("SELECT %s", (40 + n,))).rows == [(40 + n,)]


@pytest.mark.mysql
async def test_mysql_a_connection_the_server_closed_is_not_handed_out(
    mysql_engine: AsyncEngine,
) -> None:
    raw = RawSql(mysql_engine)
    async with raw.writing() as tx:
        await tx.execute("INSERT INTO probe (id, note) VALUES (%s, %s)", (1, "before"))
        ((killed,),) = (await tx.execute("SELECT CONNECTION_ID()")).rows  # then idle
    admin = mysql_admin()
    try:
        with admin.cursor() as cur:
            cur.execute(f"KILL {int(killed)}")
    finally:
        admin.close()
    await _gone(mysql_engine, {int(killed)})
    async with raw.writing() as tx:
        await tx.execute("INSERT INTO probe (id, note) VALUES (%s, %s)", (2, "after"))
        ((serving,),) = (await tx.execute("SELECT CONNECTION_ID()")).rows
    assert serving != killed
    assert await _notes(mysql_engine) == [(1, "before"), (2, "after")]


async def _gone(engine: AsyncEngine, sessions: set[int]) -> None:
    """Wait until the server has none of ``sessions`` any more (it notices a closed
    connection on its own time), and the loop has read what it sent."""
    for _ in range(500):
        if not sessions & {id_ for id_, _ in _sessions_on(engine)}:
            await asyncio.sleep(0.01)  # the goodbye's bytes, read by the loop
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"sessions {sorted(sessions)} still open")


@pytest.mark.mysql
async def test_mysql_the_engines_dispose_closes_the_pools_connections(
    make_mysql_url: Callable[[], str],
) -> None:
    engine = create_engine(make_mysql_url())
    raw = RawSql(engine)

    async def session() -> int:
        async with raw.writing() as tx:
            await tx.execute("SELECT SLEEP(0.05)")
            ((found,),) = (await tx.execute("SELECT CONNECTION_ID()")).rows
            return int(found)

    pools = set(await asyncio.gather(*(session() for _ in range(4))))
    assert len(pools) == 4 and pools <= {id_ for id_, _ in _sessions_on(engine)}
    await engine.dispose()
    await _gone(engine, pools)
