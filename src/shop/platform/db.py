"""SQLAlchemy 2 async engines from a URL, and each service's Alembic migrations at start-up.

SQLite is the embedded default; MySQL/MariaDB (aiomysql) is chosen by URL. SQLite statements
run inline on the event loop (``InlineSQLiteDialect``): they take microseconds, and handing
each one to aiosqlite's thread and back cost more CPU than the statement itself.
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Iterator, Mapping
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from typing import Any, TypeVar, overload

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, DateTime, event, make_url, pool, text
from sqlalchemy.dialects import mysql, registry
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.ext.asyncio import AsyncSession as AsyncSession
from sqlalchemy.sql import Executable
from sqlalchemy.util.concurrency import await_, in_greenlet

__all__ = [
    "AsyncSession",
    "InlineSQLiteDialect",
    "Timestamp",
    "create_engine",
    "from_db_time",
    "is_lock_conflict",
    "execute_retrying",
    "retry_on_lock_conflict",
    "is_mysql",
    "migrate",
    "normalise_url",
    "open_sqlite",
    "patiently",
    "ping",
    "run_migrations_env",
    "session_factory",
    "to_db_time",
]

# A moment, stored as naive UTC with microseconds on every backend (MySQL's DATETIME would
# drop them by default).
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


@overload
def to_db_time(moment: datetime) -> datetime: ...
@overload
def to_db_time(moment: None) -> None: ...
def to_db_time(moment: datetime | None) -> datetime | None:
    """An aware moment as the naive UTC a ``Timestamp`` column holds."""
    return None if moment is None else moment.astimezone(UTC).replace(tzinfo=None)


@overload
def from_db_time(moment: datetime) -> datetime: ...
@overload
def from_db_time(moment: None) -> None: ...
def from_db_time(moment: datetime | None) -> datetime | None:
    """What a ``Timestamp`` column gave back, as an aware UTC moment."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


T = TypeVar("T")

_DRIVERS = {"sqlite": "sqlite+aiosqlite", "mysql": "mysql+aiomysql", "mariadb": "mysql+aiomysql"}


def normalise_url(url: str) -> URL:
    """Accept plain ``mysql://`` and ``sqlite:///`` URLs and pick the async driver."""
    parsed = make_url(url)
    if parsed.drivername in _DRIVERS:
        parsed = parsed.set(drivername=_DRIVERS[parsed.drivername])
    if parsed.drivername.startswith("mysql") and "charset" not in parsed.query:
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    return parsed


# A MySQL/MariaDB engine's pool (and RawSql's beside it: shop.platform.rawsql): connections
# kept, more opened while concurrency asks, the age at which one is made anew, and the
# isolation level of every transaction.
MYSQL_POOL_SIZE = 10
MYSQL_MAX_OVERFLOW = 20
MYSQL_RECYCLE_S = 1800
MYSQL_ISOLATION = "READ COMMITTED"

# InnoDB's "deadlock found" and "lock wait timeout": the transaction was rolled back whole.
_MYSQL_LOCK_CONFLICTS = {1213, 1205}


def is_lock_conflict(exc: OperationalError) -> bool:
    """Lost a lock race (a deadlock, a lock wait, SQLite's busy file): the transaction did
    nothing, and running it again is safe."""
    code = exc.orig.args[0] if exc.orig is not None and exc.orig.args else None
    if code in _MYSQL_LOCK_CONFLICTS:
        return True
    return "database is locked" in str(exc.orig)


async def retry_on_lock_conflict(operation: Callable[[], Awaitable[T]], *, attempts: int = 3) -> T:
    """Run a whole transaction again when the database rolled it back to break a lock tie
    (InnoDB picks a deadlock victim even among plain single-row updates)."""
    for attempt in range(1, attempts + 1):
        try:
            return await operation()
        except OperationalError as exc:
            if not is_lock_conflict(exc) or attempt == attempts:
                raise
        await asyncio.sleep(random.uniform(0.005, 0.02) * attempt)  # noqa: S311 - jitter
    raise AssertionError("unreachable")  # pragma: no cover


async def execute_retrying(
    engine: AsyncEngine, statement: Executable, parameters: Mapping[str, Any] | None = None
) -> None:
    """One idempotent write in a transaction of its own, run again if it lost a lock race."""

    async def once() -> None:
        async with engine.begin() as conn:
            await conn.execute(statement, parameters)

    await retry_on_lock_conflict(once)


def is_mysql(engine: AsyncEngine) -> bool:
    return engine.dialect.name in {"mysql", "mariadb"}


# How long a statement waits for another connection's write lock (SQLite's "database is
# locked") before it fails, on either SQLite driver.
SQLITE_BUSY_PATIENCE_S = 10.0
# SQLITE_BUSY and the variants that clear when the other writer is done. Not
# SQLITE_BUSY_SNAPSHOT: this transaction read a snapshot another writer has since moved past,
# so no wait can help — it fails at once and the caller runs the transaction again.
_WAIT_ON = frozenset(
    {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_BUSY_RECOVERY, sqlite3.SQLITE_BUSY_TIMEOUT}
)
# The longest pause between two tries of a call that found the write lock taken.
SQLITE_LOCK_PAUSE_MAX_S = 0.05


def _busy(exc: sqlite3.OperationalError) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in _WAIT_ON


def _pauses() -> Iterator[float]:
    """The waits between tries of a call that found the write lock taken: 1 ms doubling to
    ``SQLITE_LOCK_PAUSE_MAX_S``, jittered, until ``SQLITE_BUSY_PATIENCE_S`` has passed."""
    deadline = time.monotonic() + SQLITE_BUSY_PATIENCE_S
    pause = 0.001
    while time.monotonic() < deadline:
        yield pause * random.uniform(0.5, 1.0)  # noqa: S311 - jitter
        pause = min(pause * 2, SQLITE_LOCK_PAUSE_MAX_S)


def _patiently(call: Callable[[], T]) -> T:
    """Run a sqlite3 call that found the write lock taken again until it gets through or
    ``SQLITE_BUSY_PATIENCE_S`` passes, sleeping on the event loop between tries.

    SQLite's own busy timeout would sleep in the statement, blocking the loop: a holder in
    this process (another task's open transaction) could then never finish, and every other
    task would stop as well.
    """
    for delay in _pauses():
        try:
            return call()
        except sqlite3.OperationalError as exc:
            if not _busy(exc):
                raise
        if in_greenlet():
            await_(asyncio.sleep(delay))
        else:  # a synchronous caller of the engine (none in Shop): no loop to give back
            time.sleep(delay)
    return call()  # patience is over: this try's "database is locked" is the answer


async def patiently(call: Callable[[], T]) -> T:
    """``_patiently`` for plain async code (no greenlet): the raw SQLite path's
    ``BEGIN IMMEDIATE`` (``shop.platform.rawsql``)."""
    for delay in _pauses():
        try:
            return call()
        except sqlite3.OperationalError as exc:
            if not _busy(exc):
                raise
        await asyncio.sleep(delay)
    return call()


def open_sqlite(database: str) -> sqlite3.Connection:
    """A bare sqlite3 connection set up as the inline engine's are (WAL, NORMAL sync,
    foreign keys, no busy timeout: waits are ``patiently``'s), in autocommit mode: its user
    writes ``BEGIN IMMEDIATE`` and ``COMMIT`` itself."""
    connection = sqlite3.connect(database, timeout=0, isolation_level=None, check_same_thread=False)
    _sqlite_pragmas(busy_timeout_ms=0)(connection, None)
    return connection


class _Done:
    """Awaited by each statement, done at once: the async engine insists that its driver
    awaits (a guard against blocking drivers), and this hands control to the greenlet that
    runs the engine and straight back, without a turn of the event loop."""

    def __await__(self) -> Generator[None, None, None]:
        return
        yield  # a generator that finishes without suspending


_DONE = _Done()


def _awaited() -> None:
    if in_greenlet():
        await_(_DONE)


class _InlineCursor:
    """A DBAPI cursor over sqlite3 that, like SQLAlchemy's adapter of aiosqlite, reads a
    query's rows at once: the statement is done (and its read snapshot let go) before the
    caller awaits anything else."""

    __slots__ = ("_cursor", "_rows", "arraysize", "description", "lastrowid", "rowcount")

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._cursor = sqlite3.Connection.cursor(connection)
        self._rows: deque[Any] = deque()
        self.arraysize = 1
        self.description: Any = None
        self.lastrowid: int | None = None
        self.rowcount = -1

    def execute(self, sql: str, parameters: Any = ()) -> _InlineCursor:
        _awaited()
        cursor = self._cursor
        try:
            cursor.execute(sql, parameters)
        except sqlite3.OperationalError as exc:
            if not _busy(exc):
                raise
            _patiently(lambda: cursor.execute(sql, parameters))
        self._settle()
        return self

    def executemany(self, sql: str, seq_of_parameters: Any) -> _InlineCursor:
        _awaited()
        cursor = self._cursor
        # Only the first row can meet a taken lock: from then on the transaction holds it.
        rows = list(seq_of_parameters)
        _patiently(lambda: cursor.executemany(sql, rows))
        self._settle()
        return self

    def _settle(self) -> None:
        cursor = self._cursor
        self.description = cursor.description
        self._rows = deque(cursor.fetchall()) if cursor.description else deque()
        self.rowcount = cursor.rowcount
        self.lastrowid = cursor.lastrowid

    def fetchone(self) -> Any:
        return self._rows.popleft() if self._rows else None

    def fetchmany(self, size: int | None = None) -> list[Any]:
        count = self.arraysize if size is None else size
        return [self._rows.popleft() for _ in range(min(count, len(self._rows)))]

    def fetchall(self) -> list[Any]:
        rows = list(self._rows)
        self._rows.clear()
        return rows

    def __iter__(self) -> Iterator[Any]:
        while self._rows:
            yield self._rows.popleft()

    def close(self) -> None:
        self._rows.clear()
        self._cursor.close()

    async def _async_soft_close(self) -> None:
        """What the async engine calls on a result's cursor: the rows are already read."""


class _InlineConnection(sqlite3.Connection):
    def cursor(self, factory: Any = None) -> Any:
        return _InlineCursor(self)

    def commit(self) -> None:
        # A COMMIT that found the database busy leaves the transaction open: try it again.
        try:
            super().commit()
        except sqlite3.OperationalError as exc:
            if not _busy(exc):
                raise
            _patiently(super().commit)


class InlineSQLiteDialect(SQLiteDialect_pysqlite):
    """SQLite for the async engine, each statement run inline on the event loop.

    The async engine runs the synchronous pysqlite dialect in a greenlet; this DBAPI never
    awaits except to wait out another connection's write lock (``_patiently``), so a
    statement costs what sqlite3 costs, with no hop to a thread and back. A statement that
    runs long (a scan of a big table) blocks the loop for that long: ``create_engine(url,
    threaded=True)`` keeps aiosqlite's thread for a database that has such statements.
    """

    driver = "shop_inline"
    supports_statement_cache = True
    is_async = True

    @classmethod
    def get_pool_class(cls, url: URL) -> type[pool.Pool]:
        if cls._is_url_file_db(url):
            return pool.AsyncAdaptedQueuePool
        return pool.StaticPool

    def connect(self, *cargs: Any, **cparams: Any) -> Any:
        cparams.setdefault("factory", _InlineConnection)
        # Connections move between greenlets of one thread, and the pool may close one from
        # a finaliser: sqlite3's thread check would refuse either for no reason.
        cparams["check_same_thread"] = False
        return super().connect(*cargs, **cparams)


registry.register("sqlite.shop_inline", __name__, "InlineSQLiteDialect")


# Connections one SQLite engine keeps at most; a transaction beyond them waits its turn.
SQLITE_POOL_SIZE = 64


def _sqlite_pragmas(*, busy_timeout_ms: int) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # WAL lets readers and one writer work at once; busy_timeout waits instead of failing.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.close()

    return on_connect


def create_engine(url: str, *, threaded: bool = False) -> AsyncEngine:
    """An engine whose errors never carry bound values: a failed statement's exception (and
    so any log line or traceback of it) shows the SQL, not the e-mail or hash it held.

    SQLite runs inline on the event loop (``InlineSQLiteDialect``) unless ``threaded``, which
    keeps aiosqlite's thread per connection for a database with long statements.
    """
    parsed = normalise_url(url)
    if parsed.drivername.startswith("sqlite"):
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        patience_ms = int(SQLITE_BUSY_PATIENCE_S * 1000)
        if threaded or parsed.drivername != "sqlite+aiosqlite":
            engine = create_async_engine(
                parsed, connect_args={"timeout": patience_ms / 1000}, hide_parameters=True
            )
            event.listen(
                engine.sync_engine, "connect", _sqlite_pragmas(busy_timeout_ms=patience_ms)
            )
            return engine
        # No busy timeout inside SQLite: ``_patiently`` waits, without blocking the loop.
        engine = create_async_engine(
            parsed.set(drivername="sqlite+shop_inline"),
            connect_args={"timeout": 0},
            hide_parameters=True,
            # The async engine gives a connection back from a task of its own (it shields the
            # close), so every transaction in flight holds one a moment longer than it runs:
            # with the default 5 (+10 overflow) a busy service opened and closed a connection
            # for most of its transactions (connect + pragmas: ~10 % of the order service's
            # CPU). Connections are made only as concurrency asks and then kept.
            pool_size=SQLITE_POOL_SIZE,
            max_overflow=0,
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas(busy_timeout_ms=0))
        return engine
    return create_async_engine(
        parsed,
        hide_parameters=True,
        pool_pre_ping=True,
        pool_recycle=MYSQL_RECYCLE_S,
        pool_size=MYSQL_POOL_SIZE,
        max_overflow=MYSQL_MAX_OVERFLOW,
        isolation_level=MYSQL_ISOLATION,
    )


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def ping(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


def _upgrade(connection: Connection, *, script_location: str, version_table: str) -> None:
    config = Config()
    config.set_main_option("script_location", script_location)
    config.attributes["connection"] = connection
    config.attributes["version_table"] = version_table
    command.upgrade(config, "head")


async def migrate(engine: AsyncEngine, *, package: str, service: str) -> None:
    """Apply ``<package>/migrations`` up to head. Several instances may start at once."""
    script_location = os.fspath(Path(str(files(package))) / "migrations")
    version_table = f"alembic_version_{service}"
    async with engine.connect() as conn:
        lock = f"shop_migrate_{service}"
        if is_mysql(engine):
            await conn.execute(text("SELECT GET_LOCK(:name, 60)"), {"name": lock})
        try:
            await conn.run_sync(
                lambda sync: _upgrade(
                    sync, script_location=script_location, version_table=version_table
                )
            )
            await conn.commit()
        finally:
            if is_mysql(engine):
                await conn.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": lock})


def run_migrations_env() -> None:
    """Body of every service's ``migrations/env.py``: migrate on the connection it is given."""
    from alembic import context

    connection = context.config.attributes["connection"]
    context.configure(
        connection=connection,
        version_table=context.config.attributes["version_table"],
        render_as_batch=connection.dialect.name == "sqlite",
        transaction_per_migration=False,
    )
    with context.begin_transaction():
        context.run_migrations()
