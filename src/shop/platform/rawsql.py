"""Write transactions on the bare DBAPI connection, for a service's hottest path.

On SQLite an ``async with engine.begin()`` of a few plain statements cost several times
what SQLite spends on them: a pool checkout, a greenlet per statement, SQLAlchemy's
execution context and result per statement, and a task of its own to give the connection
back (the async engine shields the close). ``RawSql`` runs the same SQL on a ``sqlite3``
connection of its own, set up as the engine's (``open_sqlite``: WAL, foreign keys, no busy
timeout), as ``BEGIN IMMEDIATE … COMMIT``: the write lock is taken first, waited for on
the event loop as the engine does (``patiently``), and then held only while the
transaction's statements run, back to back.

On MySQL/MariaDB the same transaction runs on aiomysql's own connection pool
(``aiomysql.Pool``), its connections made with the engine's connect arguments
(``dialect.create_connect_args``: the same server, credentials, charset and client flags, so
``rowcount`` counts matched rows as the engine's does) and its isolation level: each
statement is one round trip and the transaction ends with one ``COMMIT`` (autocommit off:
InnoDB starts the transaction at the first statement). Through the engine the same
transaction also paid a ``ping`` at check-out (``pool_pre_ping``) and a ``ROLLBACK`` at
check-in (the pool's reset), and SQLAlchemy's greenlet, execution context and result per
statement: docs/platform.md, "Raw transactions on MySQL". aiomysql's pool drops a
connection the server closed before handing it out and closes one given back inside a
transaction; a transaction that failed is rolled back, and a connection whose state is
unknown (cancelled mid-statement, a lost connection) is closed, not kept.

An in-memory SQLite (which a second connection could not see) gets a thin face over the
engine: ``engine.begin()`` and ``exec_driver_sql``. Either way the caller writes driver SQL
(``placeholder`` tells ``?`` from ``%s``) and gets SQLAlchemy's exceptions
(``IntegrityError``, ``OperationalError``, without the bound values), so one store serves
both backends.

Not a library for SQLite: aiosqlite and its kin hand every call to a thread (the cost
``InlineSQLiteDialect`` removed), and SQLAlchemy's own ``raw_connection()`` still goes
through the async pool. That part is a pool of idle connections and a translation of errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Sequence
from typing import Any, NamedTuple, Protocol

from sqlalchemy import event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.util.concurrency import await_, in_greenlet

from shop.platform import context, telemetry
from shop.platform.db import (
    MYSQL_ISOLATION,
    MYSQL_MAX_OVERFLOW,
    MYSQL_POOL_SIZE,
    MYSQL_RECYCLE_S,
    SQLITE_POOL_SIZE,
    open_sqlite,
    patiently,
)

__all__ = ["Many", "RawSql", "RawTransaction", "Rows", "Step"]


class Rows:
    """What a statement gave: its rows (none for a write) and how many rows it changed."""

    __slots__ = ("rowcount", "rows")

    def __init__(self, rows: list[tuple[Any, ...]], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount


class Many(NamedTuple):
    """One statement run for each of ``rows`` (``executemany``), as a step of a pipeline."""

    sql: str
    rows: Sequence[Sequence[Any]]


# A step of ``RawTransaction.pipeline``: a statement and its parameters, or a ``Many``.
Step = tuple[str, Sequence[Any]] | Many


class RawTransaction(Protocol):
    """One open write transaction; parameters are positional, in the driver's style."""

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Rows: ...

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Rows: ...

    async def pipeline(self, steps: Sequence[Step]) -> list[Rows]:
        """Run ``steps`` in order and give each one's ``Rows`` (a ``Many``'s: no rows and
        the rows changed by all); the first that fails raises, and the ones after it do not
        run. On MySQL/MariaDB they go to the server together, one round trip for all:
        use it for statements whose parameters do not depend on each other's answers."""
        ...


async def _one_by_one(tx: RawTransaction, steps: Sequence[Step]) -> list[Rows]:
    """``pipeline`` where statements cost no round trip (SQLite) or through the engine."""
    return [
        await (tx.executemany(*step) if isinstance(step, Many) else tx.execute(*step))
        for step in steps
    ]


class _SqliteTransaction:
    """Statements run inline: on SQLite none of them awaits anything. While spans are
    exported each statement gets one (the engine's statements get theirs from
    ``telemetry.trace_engine``)."""

    __slots__ = ("_connection", "_namespace")

    def __init__(self, connection: sqlite3.Connection, namespace: str) -> None:
        self._connection = connection
        self._namespace = namespace

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Rows:
        span = self._span(sql) if context.spans_exported else None
        try:
            cursor = self._connection.execute(sql, parameters)
            rows = cursor.fetchall() if cursor.description else []
        except sqlite3.Error as exc:
            if span is not None:
                telemetry.end_span(span, exc)
            raise _translated(sql, exc) from exc
        if span is not None:
            telemetry.end_span(span)
        return Rows(rows, cursor.rowcount)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Rows:
        span = self._span(sql) if context.spans_exported else None
        try:
            cursor = self._connection.executemany(sql, rows)
        except sqlite3.Error as exc:
            if span is not None:
                telemetry.end_span(span, exc)
            raise _translated(sql, exc) from exc
        if span is not None:
            telemetry.end_span(span)
        return Rows([], cursor.rowcount)

    async def pipeline(self, steps: Sequence[Step]) -> list[Rows]:
        return await _one_by_one(self, steps)

    def _span(self, sql: str) -> Any:
        return telemetry.statement_span(
            "sqlite", telemetry.sql_operation(sql), sql, namespace=self._namespace
        )


class _EngineTransaction:
    """The same on an SQLAlchemy connection (an in-memory SQLite), statements as the
    driver's."""

    __slots__ = ("_conn",)

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Rows:
        result = await self._conn.exec_driver_sql(sql, tuple(parameters))
        rows = [tuple(row) for row in result.all()] if result.returns_rows else []
        return Rows(rows, result.rowcount)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Rows:
        result = await self._conn.exec_driver_sql(sql, [tuple(row) for row in rows])
        return Rows([], result.rowcount)

    async def pipeline(self, steps: Sequence[Step]) -> list[Rows]:
        return await _one_by_one(self, steps)


class _MysqlTransaction:
    """Statements on one aiomysql connection, each a span of its own while spans are
    exported (as the engine's get theirs from ``telemetry.trace_engine``)."""

    __slots__ = ("_cursor", "_error", "_namespace")

    def __init__(self, cursor: Any, error: type[Exception], namespace: str) -> None:
        self._cursor = cursor
        self._error = error
        self._namespace = namespace

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Rows:
        span = self._span(sql) if context.spans_exported else None
        cursor = self._cursor
        try:
            # No parameters: no %-formatting (what the engine's exec_driver_sql does).
            await cursor.execute(sql, tuple(parameters) if parameters else None)
            rows = list(await cursor.fetchall()) if cursor.description else []
        except self._error as exc:
            if span is not None:
                telemetry.end_span(span, exc)
            raise _translated(sql, exc, self._error) from exc
        if span is not None:
            telemetry.end_span(span)
        return Rows(rows, cursor.rowcount)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Rows:
        span = self._span(sql) if context.spans_exported else None
        cursor = self._cursor
        try:
            # An INSERT ... VALUES is sent as one multi-row statement (aiomysql's rewrite).
            await cursor.executemany(sql, [tuple(row) for row in rows])
        except self._error as exc:
            if span is not None:
                telemetry.end_span(span, exc)
            raise _translated(sql, exc, self._error) from exc
        if span is not None:
            telemetry.end_span(span)
        return Rows([], cursor.rowcount)

    async def pipeline(self, steps: Sequence[Step]) -> list[Rows]:
        """The statements as one multi-statement query (aiomysql, like PyMySQL, always
        asks for ``CLIENT_MULTI_STATEMENTS``), each with its parameters escaped by the
        driver as ``execute`` escapes them; then each statement's result in turn. The
        server stops at the first statement that fails. Spans and errors name the
        statement as written, never with its values."""
        from aiomysql.cursors import RE_INSERT_VALUES

        cursor = self._cursor
        sent: list[str] = []  # with the values
        written: list[str] = []  # without
        sizes: list[int] = []  # statements per step (a Many: one per row)
        for step in steps:
            if isinstance(step, Many):
                # An INSERT ... VALUES: one multi-row statement, as executemany sends it.
                insert = RE_INSERT_VALUES.match(step.sql) if step.rows else None
                if insert is not None:
                    head, values, tail = (
                        insert.group(1) % (),
                        insert.group(2).rstrip(),
                        insert.group(3),
                    )
                    each = ",".join(cursor.mogrify(values, tuple(row)) for row in step.rows)
                    sent.append(f"{head}{each}{tail or ''}")
                    written.append(step.sql)
                    sizes.append(1)
                    continue
                sent += [cursor.mogrify(step.sql, tuple(row)) for row in step.rows]
                written += [step.sql] * len(step.rows)
                sizes.append(len(step.rows))
            else:
                sql, parameters = step
                sent.append(cursor.mogrify(sql, tuple(parameters) if parameters else None))
                written.append(sql)
                sizes.append(1)
        if not sent:
            return [Rows([], 0) for _ in steps]
        spans = [self._span(sql) for sql in written] if context.spans_exported else []
        done = 0
        answers: list[Rows] = []
        try:
            await cursor.execute(";\n".join(sent))
            for size in sizes:
                changed = 0
                for _ in range(size):
                    if done:
                        await cursor.nextset()
                    rows = list(await cursor.fetchall()) if cursor.description else []
                    changed += cursor.rowcount
                    if spans and spans[done] is not None:
                        telemetry.end_span(spans[done])
                    done += 1
                answers.append(Rows(rows, changed) if size == 1 else Rows([], changed))
        except self._error as exc:
            for span in spans[done:]:
                if span is not None:
                    telemetry.end_span(span, exc)
            raise _translated(written[done], exc, self._error) from exc
        return answers

    def _span(self, sql: str) -> Any:
        return telemetry.statement_span(
            "mysql", telemetry.sql_operation(sql), sql, namespace=self._namespace
        )


class _MysqlWriting:
    """``RawSql.writing()`` on MySQL/MariaDB: a connection from the pool, the statements,
    ``COMMIT``; rolled back when the block raises."""

    __slots__ = ("_connection", "_pool", "_raw")

    def __init__(self, raw: RawSql) -> None:
        self._raw = raw
        self._pool: Any = None
        self._connection: Any = None

    async def __aenter__(self) -> RawTransaction:
        raw = self._raw
        pool = self._pool = raw._mysql_pool()
        error = raw._mysql_error
        try:
            connection = await pool.acquire()
        except error as exc:
            raise _translated("connect", exc, error) from exc
        self._connection = connection
        cursor = await connection.cursor()  # no I/O: one per transaction, never closed
        return _MysqlTransaction(cursor, error, raw._namespace)

    async def __aexit__(self, kind: type[BaseException] | None, *_: object) -> None:
        connection, self._connection = self._connection, None
        error = self._raw._mysql_error
        try:
            if kind is None:
                try:
                    await connection.commit()
                except error as exc:
                    connection.close()  # how it ended is the server's to know: not kept
                    raise _translated("COMMIT", exc, error) from exc
            elif issubclass(kind, Exception):  # a statement failed, or the caller gave up
                try:
                    await connection.rollback()
                except Exception:  # noqa: BLE001 - the caller's error is the one to raise
                    connection.close()
            else:  # cancelled, maybe mid-statement: what the connection will read is unknown
                connection.close()
        except BaseException:
            connection.close()  # cancelled during COMMIT or ROLLBACK
            raise
        finally:
            self._pool.release(connection)  # a closed connection is dropped, not kept


def _translated(sql: str, exc: Exception, error: type[Exception] = sqlite3.Error) -> Exception:
    """A driver's error as the engine would have raised it, without the bound values."""
    return DBAPIError.instance(sql, None, exc, error, hide_parameters=True)


class RawSql:
    """Write transactions for ``engine``'s database, on bare connections where it pays."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self.placeholder = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        database = engine.url.database
        file_db = engine.dialect.name == "sqlite" and database not in (None, "", ":memory:")
        self._database = database if file_db else None
        self._namespace = (database or "").rsplit("/", 1)[-1]
        self._idle: list[sqlite3.Connection] = []
        self._mysql = engine.dialect.name in ("mysql", "mariadb") and engine.driver == "aiomysql"
        self._pool: Any = None  # aiomysql's, made at the first transaction (it needs the loop)
        self._mysql_error: type[Exception] = Exception
        if self._database is not None or self._mysql:
            # The engine's dispose (the app's shutdown) closes these connections as well.
            event.listen(engine.sync_engine, "engine_disposed", lambda _engine: self.close())

    @property
    def raw(self) -> bool:
        """Whether this is a SQLite file (its transactions on bare sqlite3 connections)."""
        return self._database is not None

    def writing(self) -> contextlib.AbstractAsyncContextManager[RawTransaction]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        if self._mysql:
            return _MysqlWriting(self)
        if self._database is None:
            return self._engine_transaction()
        return _SqliteWriting(self, self._database)

    async def read(self, sql: str, parameters: Sequence[Any] = ()) -> Rows:
        """One statement on its own (a read): on MySQL/MariaDB on this pool (the statement
        and ``COMMIT``: no ping, no reset), otherwise through the engine."""
        if self._mysql:
            async with _MysqlWriting(self) as tx:
                return await tx.execute(sql, parameters)
        async with self._engine.connect() as conn:
            result = await conn.exec_driver_sql(sql, tuple(parameters))
            rows = [tuple(row) for row in result.all()] if result.returns_rows else []
            return Rows(rows, result.rowcount)

    def _mysql_pool(self) -> Any:
        """aiomysql's pool for this engine's database (made once, on the running loop), as
        large as the engine's and with its isolation level and recycling."""
        if self._pool is None:
            import aiomysql

            _, kwargs = self._engine.dialect.create_connect_args(self._engine.url)
            self._mysql_error = aiomysql.Error
            self._pool = aiomysql.Pool(
                minsize=0,
                maxsize=MYSQL_POOL_SIZE + MYSQL_MAX_OVERFLOW,
                echo=False,
                pool_recycle=MYSQL_RECYCLE_S,
                loop=asyncio.get_running_loop(),
                autocommit=False,
                init_command=f"SET SESSION TRANSACTION ISOLATION LEVEL {MYSQL_ISOLATION}",
                **kwargs,
            )
        return self._pool

    @contextlib.asynccontextmanager
    async def _engine_transaction(self) -> AsyncIterator[RawTransaction]:
        async with self._engine.begin() as conn:
            yield _EngineTransaction(conn)

    def _give_back(self, connection: sqlite3.Connection) -> None:
        """Keep a connection for the next transaction, rolled back if one is open; one in an
        unknown state, or beyond the pool's size, is closed."""
        try:
            if connection.in_transaction:
                connection.rollback()
        except sqlite3.Error:
            connection.close()
            return
        if len(self._idle) < SQLITE_POOL_SIZE:
            self._idle.append(connection)
        else:
            connection.close()

    def close(self) -> None:
        """Close the idle connections, as the engine's ``dispose()`` does its pool's (one in
        a transaction at that moment is kept for the next, like the engine's checked-out
        connections; on MySQL every connection is closed)."""
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()  # the ones in use closed now (the server rolls back any open)
            if in_greenlet():  # the async engine's dispose: the idle ones closed too
                await_(pool.wait_closed())


class _SqliteWriting:
    """``RawSql.writing()`` on a SQLite file. A class rather than an ``asynccontextmanager``
    (a generator driven through ``asend``/``athrow``, about 3 µs a transaction), and the
    ``BEGIN IMMEDIATE`` tried at once, waited for on the loop (``patiently``) only when
    another writer holds the lock: a placement runs two of these, a reservation group one."""

    __slots__ = ("_connection", "_database", "_raw")

    def __init__(self, raw: RawSql, database: str) -> None:
        self._raw = raw
        self._database = database
        self._connection: sqlite3.Connection | None = None

    async def __aenter__(self) -> RawTransaction:
        raw = self._raw
        connection = raw._idle.pop() if raw._idle else open_sqlite(self._database)
        try:
            try:
                connection.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:  # busy (another writer): wait on the loop
                await patiently(lambda: connection.execute("BEGIN IMMEDIATE"))
        except sqlite3.Error as exc:
            raw._give_back(connection)
            raise _translated("BEGIN IMMEDIATE", exc) from exc
        except BaseException:  # cancelled while waiting for the lock
            raw._give_back(connection)
            raise
        self._connection = connection
        return _SqliteTransaction(connection, raw._namespace)

    async def __aexit__(self, kind: type[BaseException] | None, *_: object) -> None:
        connection, self._connection = self._connection, None
        assert connection is not None  # noqa: S101 - entered before exited
        if kind is not None:
            self._raw._give_back(connection)  # rolled back
            return
        try:
            # In WAL mode the write lock is already ours, so COMMIT meets no busy one.
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            raise _translated("COMMIT", exc) from exc
        finally:
            self._raw._give_back(connection)
