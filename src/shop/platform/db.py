"""SQLAlchemy 2 async engines from a URL, and each service's Alembic migrations at start-up.

SQLite (aiosqlite) is the embedded default; MySQL/MariaDB (aiomysql) is chosen by URL.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from typing import Any, TypeVar, overload

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, DateTime, event, make_url, text
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.ext.asyncio import AsyncSession as AsyncSession
from sqlalchemy.sql import Executable

__all__ = [
    "AsyncSession",
    "Timestamp",
    "create_engine",
    "from_db_time",
    "is_lock_conflict",
    "execute_retrying",
    "retry_on_lock_conflict",
    "is_mysql",
    "migrate",
    "normalise_url",
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


async def execute_retrying(engine: AsyncEngine, statement: Executable) -> None:
    """One idempotent write in a transaction of its own, run again if it lost a lock race."""

    async def once() -> None:
        async with engine.begin() as conn:
            await conn.execute(statement)

    await retry_on_lock_conflict(once)


def is_mysql(engine: AsyncEngine) -> bool:
    return engine.dialect.name in {"mysql", "mariadb"}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers and one writer work at once; busy_timeout waits instead of failing.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def create_engine(url: str) -> AsyncEngine:
    """An engine whose errors never carry bound values: a failed statement's exception (and
    so any log line or traceback of it) shows the SQL, not the e-mail or hash it held."""
    parsed = normalise_url(url)
    if parsed.drivername.startswith("sqlite"):
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(parsed, connect_args={"timeout": 30}, hide_parameters=True)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(
        parsed,
        hide_parameters=True,
        pool_pre_ping=True,
        pool_recycle=1800,
        pool_size=10,
        max_overflow=20,
        isolation_level="READ COMMITTED",
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
