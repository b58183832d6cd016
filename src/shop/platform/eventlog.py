"""The embedded event log: a durable, ordered log in one SQLite file shared by local processes.

- Topics are rows in one append-only table; ``seq`` gives a total order. SQLite serialises
  writers, so the order of ``seq`` is the order of commits: no reader sees a gap fill in
  later, and order per key follows.
- A consumer group keeps its committed offset per topic. One process at a time consumes for
  a group, holding a lease that a heartbeat renews while handlers run; if it dies, another
  takes over after the lease lapses and starts from the last committed offset:
  at-least-once. A batch subscriber (``subscribe_batches``) gets the events of one read
  together and commits once for them. The commit is fenced by the lease and never moves the
  offset back, so a process that stalled past its lease cannot undo its successor's work.
- A handler that raises gets the same event again after a back-off (order is kept, so the
  key's later events wait), doubling up to a cap, for about a quarter of an hour by default;
  then the event goes to ``dead_letters`` and the group moves on, so one poisoned event
  cannot stop a topic forever. ``python -m shop.platform.buses replay`` (or
  ``python -m shop.platform.eventlog replay``) puts them back.
- A consumer that found nothing new waits to be told rather than polling the table: an
  append by its own process wakes it, and one watcher per process notices other processes'
  commits through ``PRAGMA data_version``, looking when the kernel reports a write to the
  file (inotify, on Linux) rather than a hundred times a second.
WAL mode lets readers and one writer work at once across processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine

from shop.platform import context, telemetry
from shop.platform.db import create_engine
from shop.platform.events import (
    BatchHandler,
    Event,
    Handler,
    MalformedEvent,
    RetryPolicy,
    hand_together,
)
from shop.platform.lease import LEASES_DDL, Lease
from shop.platform.retention import RetentionJob, RetentionPolicy
from shop.platform.worker import Loop

if TYPE_CHECKING:
    from shop.platform.settings import PlatformSettings

__all__ = ["SqliteEventLog", "from_url", "main"]

log = logging.getLogger("shop.events")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS events ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, key TEXT NOT NULL,"
    " event_id TEXT NOT NULL, payload TEXT NOT NULL, appended_at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS events_by_topic ON events (topic, seq)",
    "CREATE TABLE IF NOT EXISTS consumer_offsets ("
    " grp TEXT NOT NULL, topic TEXT NOT NULL, committed INTEGER NOT NULL,"
    " PRIMARY KEY (grp, topic))",
    "CREATE TABLE IF NOT EXISTS dead_letters ("
    " grp TEXT NOT NULL, topic TEXT NOT NULL, seq INTEGER NOT NULL, payload TEXT NOT NULL,"
    " error TEXT NOT NULL, failed_at REAL NOT NULL, PRIMARY KEY (grp, topic, seq))",
    # Failed attempts per event survive restarts and take-overs, so a poisoned event does
    # reach dead_letters however often its consumers restart.
    "CREATE TABLE IF NOT EXISTS delivery_attempts ("
    " grp TEXT NOT NULL, topic TEXT NOT NULL, seq INTEGER NOT NULL, attempts INTEGER NOT NULL,"
    " PRIMARY KEY (grp, topic, seq))",
    LEASES_DDL,
)
# The next events of a topic after the group's offset, each with the failed attempts it
# already had (usually none): one statement per batch.
_NEXT_EVENTS_SQL = (
    "SELECT e.seq, e.payload, d.attempts FROM events AS e"
    " LEFT JOIN delivery_attempts AS d ON d.grp = :g AND d.topic = e.topic AND d.seq = e.seq"
    " WHERE e.topic = :t AND e.seq > coalesce("
    "(SELECT committed FROM consumer_offsets WHERE grp = :g AND topic = :t), 0)"
    " ORDER BY e.seq LIMIT :n"
)
_NEXT_EVENTS = text(_NEXT_EVENTS_SQL)
# The fenced commit: the offset moves forward only while the lease is ours
# (``Lease.is_held()``, spelt out so the statement is compiled once).
_COMMIT = text(
    "UPDATE consumer_offsets SET committed = :s"
    " WHERE grp = :g AND topic = :t AND committed < :s AND EXISTS ("
    "SELECT 1 FROM shop_leases WHERE name = :lease AND owner = :owner AND until > :now)"
)
_APPEND_SQL = (
    "INSERT INTO events (topic, key, event_id, payload, appended_at) VALUES (?, ?, ?, ?, ?)"
)
# The same commit for the log's own connection (``_Writer``).
_COMMIT_SQL = (
    "UPDATE consumer_offsets SET committed = :s"
    " WHERE grp = :g AND topic = :t AND committed < :s AND EXISTS ("
    "SELECT 1 FROM shop_leases WHERE name = :lease AND owner = :owner AND until > :now)"
)
_FORGET_ATTEMPTS = text("DELETE FROM delivery_attempts WHERE grp = :g AND topic = :t AND seq <= :s")
_RECORD_ATTEMPT = text(
    "INSERT OR REPLACE INTO delivery_attempts (grp, topic, seq, attempts) VALUES (:g, :t, :s, :n)"
)
_SET_ASIDE = text(
    "INSERT OR REPLACE INTO dead_letters (grp, topic, seq, payload, error, failed_at)"
    " VALUES (:g, :t, :s, :p, :e, :now)"
)
# Retention (docs/events.md): the topics (one index probe each, not a scan of the log), the
# lowest offset of the topic's groups, and its oldest events every group has passed. A
# dead-lettered event stays: a replay reads it back from here.
_TOPICS = text(
    "WITH RECURSIVE t(topic) AS (SELECT min(topic) FROM events UNION ALL"
    " SELECT (SELECT min(topic) FROM events WHERE topic > t.topic) FROM t"
    " WHERE t.topic IS NOT NULL) SELECT topic FROM t WHERE topic IS NOT NULL"
)
_PASSED_BY_ALL = text("SELECT min(committed) FROM consumer_offsets WHERE topic = :t")
_OLDEST_PASSED = text(
    "SELECT e.seq, e.appended_at FROM events AS e WHERE e.topic = :t AND e.seq <= :bound"
    " AND NOT EXISTS (SELECT 1 FROM dead_letters AS d WHERE d.topic = e.topic AND d.seq = e.seq)"
    " ORDER BY e.seq LIMIT :n"
)
_DELETE_PASSED = text(
    "DELETE FROM events WHERE topic = :t AND seq <= :cut AND NOT EXISTS ("
    "SELECT 1 FROM dead_letters AS d WHERE d.topic = events.topic AND d.seq = events.seq)"
)
_NO_BOUND = 2**63 - 1
# A consumer that found nothing new looks again at least this often, whatever it was told.
_RECHECK_S = 1.0
# Where writes to the log are reported (inotify), the watcher looks this often all the same.
_WATCH_FALLBACK_S = 1.0
# How long the offset writer waits out another process's write lock, and its longest pause.
_BUSY_PATIENCE_S = 10.0
_BUSY_PAUSE_MAX_S = 0.05
_BUSY = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_BUSY_RECOVERY, sqlite3.SQLITE_BUSY_TIMEOUT})


class _Writer:
    """The log's hot statements on a ``sqlite3`` connection of its own: appending events,
    a consumer's read of its next events, and the fenced commit of a handled event (or
    batch; the usual one, which failed no attempt).

    Through the engine each was a pool checkout, a transaction and SQLAlchemy's
    per-statement work, several times what SQLite spends on the statement. The connection
    waits for no lock inside SQLite (``timeout=0``): another connection's write lock is
    waited out on the event loop, as the engine does, and this one takes the lock only
    between two awaits, so it never holds it while others wait on it. ``synchronous=NORMAL``
    as on the engine's connections (WAL). The offset is committed per event, or per batch
    for a batch subscriber: a crash redelivers only the event (or batch) in hand (the
    contract suite holds every bus to it).
    """

    def __init__(self, database: str) -> None:
        self._db = sqlite3.connect(
            database, timeout=0, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA synchronous=NORMAL")

    async def next_events(self, parameters: dict[str, object]) -> list[Any]:
        """``(seq, payload, failed attempts or None)`` of the next events of a group (a
        read of its own: autocommit, the snapshot ends with the fetch)."""
        cursor = await self._patiently(lambda: self._db.execute(_NEXT_EVENTS_SQL, parameters))
        return cursor.fetchall()

    async def commit_offset(self, parameters: dict[str, object]) -> bool:
        """Move the offset; False if the lease is not ours (or it was already there)."""
        cursor = await self._patiently(lambda: self._db.execute(_COMMIT_SQL, parameters))
        return cursor.rowcount == 1

    async def append(self, rows: Sequence[tuple[str, str, str, str, float]]) -> None:
        """Append ``(topic, key, event_id, payload, appended_at)`` rows in one transaction."""
        await self._patiently(lambda: self._db.execute("BEGIN IMMEDIATE"))
        try:
            self._db.executemany(_APPEND_SQL, rows)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    async def _patiently(self, call: Callable[[], sqlite3.Cursor]) -> sqlite3.Cursor:
        deadline = time.monotonic() + _BUSY_PATIENCE_S
        pause = 0.001
        while True:
            try:
                return call()
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorcode", None) not in _BUSY:
                    raise
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, _BUSY_PAUSE_MAX_S)

    def close(self) -> None:
        self._db.close()


def _wal_writes(database: str) -> Any | None:
    """Linux's inotify watching ``<database>-wal`` for writes (non-blocking), or None where
    there is none: not Linux, the user's limit of inotify instances reached, a file system
    that cannot be watched. The watcher then polls (``_start_watch``)."""
    try:
        from asyncinotify import Inotify, Mask
    except (ImportError, RuntimeError):  # RuntimeError: a libc without inotify
        return None
    try:
        notes = Inotify()
    except OSError as exc:
        log.info("event log watch polls: no inotify instance (%s)", exc)
        return None
    # asyncinotify 4.4's InitFlags.NONBLOCK is O_CLOEXEC's value: made non-blocking here.
    os.set_blocking(notes.fd, False)
    try:
        notes.add_watch(f"{database}-wal", Mask.MODIFY)
    except OSError as exc:
        log.info("event log watch polls: cannot watch %s-wal (%s)", database, exc)
        notes.close()
        return None
    return notes


def _drain(fd: int) -> None:
    """Read every pending inotify record (one watch, one kind: what they say is known)."""
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass


@dataclass(slots=True)
class _Subscription:
    topic: str
    group: str
    handler: Handler
    # Given (``subscribe_batches``): the events of a read go to it together.
    batch_handler: BatchHandler | None = None
    # Set when the topic may have new events: an append by this process, or a commit to the
    # file by another one (``_watch``). A consumer waits on it instead of polling the table.
    news: asyncio.Event = field(default_factory=asyncio.Event)


class SqliteEventLog:
    def __init__(
        self,
        url: str,
        *,
        client_id: str,
        poll_interval_s: float = 0.01,
        batch_size: int = 100,
        lease_s: float = 5.0,
        max_attempts: int = 40,
        retry_backoff_s: float = 0.2,
        retry_backoff_max_s: float = 30.0,
        handler_timeout_s: float = 60.0,
        retention: RetentionPolicy | None = None,
    ) -> None:
        self._url = url
        # None: the log keeps every event (from_url passes SHOP_EVENT_RETENTION_* settings).
        self._retention_policy = retention
        self._retention: RetentionJob | None = None
        self._watch_loop: Loop | None = None
        self._engine: AsyncEngine | None = None
        self._owner = f"{client_id}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._poll = poll_interval_s
        self._batch = batch_size
        self._lease_s = lease_s
        self._retry = RetryPolicy(
            max_attempts=max_attempts,
            backoff_s=retry_backoff_s,
            backoff_max_s=retry_backoff_max_s,
            handler_timeout_s=handler_timeout_s,
        )
        self._subscriptions: list[_Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._writer: _Writer | None = None  # None for an in-memory log

    async def _open(self) -> AsyncEngine:
        async with self._ready:
            if self._engine is None:
                engine = create_engine(self._url)
                async with engine.begin() as conn:
                    for statement in _SCHEMA:
                        await conn.execute(text(statement))
                self._engine = engine
                database = make_url(self._url).database
                if database and database != ":memory:":
                    self._writer = _Writer(database)
            return self._engine

    async def publish(self, topic: str, events: Sequence[Event]) -> None:
        if not events:
            return
        engine = await self._open()
        now = time.time()
        rows = [(topic, e.key, e.id, e.to_json(), now) for e in events]
        if self._writer is not None:
            await self._writer.append(rows)
        else:
            async with engine.begin() as conn:
                await conn.exec_driver_sql(_APPEND_SQL, rows)
        for sub in self._subscriptions:
            if sub.topic == topic:
                sub.news.set()

    def subscribe(self, topic: str, *, group: str, handler: Handler) -> None:
        self._subscriptions.append(_Subscription(topic=topic, group=group, handler=handler))

    def subscribe_batches(
        self, topic: str, *, group: str, handler: Handler, batch_handler: BatchHandler
    ) -> None:
        """``subscribe``, with the events of one read (up to ``batch_size``) handed to
        ``batch_handler`` together and committed once (``BatchDelivery``)."""
        self._subscriptions.append(
            _Subscription(topic=topic, group=group, handler=handler, batch_handler=batch_handler)
        )

    async def start(self) -> None:
        await self._open()
        for sub in self._subscriptions:
            self._tasks.append(
                asyncio.create_task(self._consume(sub), name=f"consume-{sub.group}-{sub.topic}")
            )
        if self._subscriptions:
            self._start_watch()
        policy = self._retention_policy
        if policy is not None and policy.enabled and self._retention is None:
            # One process of those sharing the file purges at a time.
            lease = Lease(
                await self._open(),
                name="eventlog-retention",
                owner=self._owner,
                duration_s=max(60.0, 2 * policy.interval_s),
            )
            self._retention = RetentionJob(
                self.purge_events, name="eventlog-retention", policy=policy, lease=lease
            )
            self._retention.start()

    async def ping(self) -> None:
        engine = await self._open()
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def close(self, *, grace_s: float = 5.0) -> None:
        """Let consumers finish the event in hand, then stop; cancel only the ones that hang.

        A consumer cancelled mid-step could abandon a half-opened connection, and its event
        would come again anyway.
        """
        self._stopping.set()
        for sub in self._subscriptions:
            sub.news.set()
        if self._retention is not None:
            await self._retention.stop()
            self._retention = None
        if self._watch_loop is not None:
            await self._watch_loop.stop(grace_s=grace_s)
            self._watch_loop = None
        if self._tasks:
            _, hanging = await asyncio.wait(self._tasks, timeout=grace_s)
            for task in hanging:
                task.cancel()
            for task in hanging:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._tasks.clear()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    async def committed(self, topic: str, *, group: str) -> int:
        """The group's committed offset (the ``seq`` of the last event it finished)."""
        engine = await self._open()
        async with engine.connect() as conn:
            value = await conn.scalar(
                text("SELECT committed FROM consumer_offsets WHERE grp = :g AND topic = :t"),
                {"g": group, "t": topic},
            )
        return int(value or 0)

    async def dead_letters(self, topic: str, *, group: str) -> int:
        """How many of ``topic``'s events the group gave up on (``eventlog replay`` puts them
        back); read by the operator metrics (platform/observe.py)."""
        engine = await self._open()
        async with engine.connect() as conn:
            value = await conn.scalar(
                text("SELECT count(*) FROM dead_letters WHERE grp = :g AND topic = :t"),
                {"g": group, "t": topic},
            )
        return int(value or 0)

    async def pending(self, topic: str, *, group: str) -> int:
        """How many events of ``topic`` come after the group's committed offset."""
        engine = await self._open()
        async with engine.connect() as conn:
            value = await conn.scalar(
                text(
                    "SELECT count(*) FROM events WHERE topic = :t AND seq > coalesce("
                    "(SELECT committed FROM consumer_offsets WHERE grp = :g AND topic = :t), 0)"
                ),
                {"g": group, "t": topic},
            )
        return int(value or 0)

    async def replay_dead_letters(self, *, group: str, topic: str | None = None) -> int:
        """Append the group's dead letters to their topics again and forget them; how many.

        Each comes back at a fresh ``seq`` with its event id unchanged, so the other groups
        of the topic see a duplicate and drop it through their inbox.
        """
        engine = await self._open()
        chosen = {"g": group, "t": topic}
        async with engine.begin() as conn:
            replayed = await conn.execute(
                text(
                    "INSERT INTO events (topic, key, event_id, payload, appended_at)"
                    " SELECT d.topic, e.key, e.event_id, d.payload, :now"
                    " FROM dead_letters AS d JOIN events AS e ON e.seq = d.seq"
                    " WHERE d.grp = :g AND (:t IS NULL OR d.topic = :t)"
                    " ORDER BY d.topic, d.seq"
                ),
                {**chosen, "now": time.time()},
            )
            await conn.execute(
                text(
                    "DELETE FROM dead_letters WHERE grp = :g AND (:t IS NULL OR topic = :t)"
                    " AND EXISTS (SELECT 1 FROM events AS e WHERE e.seq = dead_letters.seq)"
                ),
                chosen,
            )
        return int(replayed.rowcount)

    @property
    def patience_s(self) -> float:
        """How long an event whose handler keeps failing is retried before it is set aside."""
        return self._retry.patience_s

    @property
    def watch_looks(self) -> int:
        """How often this process's watcher has looked at the file for other processes'
        appends (diagnostics: an idle process should hardly look at all)."""
        return 0 if self._watch_loop is None else self._watch_loop.steps

    async def _consume(self, sub: _Subscription) -> None:
        # Every step, the first ones included, is retried until the log closes: a log that
        # is locked (or missing) when the consumer starts must not end it for good while
        # its process serves on (found by tests/chaos, docs/chaos.md).
        joined: tuple[AsyncEngine, Lease] | None = None
        try:
            while not self._stopping.is_set():
                try:
                    if joined is None:
                        joined = await self._join(sub)
                    engine, lease = joined
                    if await lease.hold():
                        await self._consume_while_held(engine, sub, lease)
                    else:
                        await self._pause(self._poll * 4)
                except Exception:
                    log.exception("consumer %s on %s failed; retrying", sub.group, sub.topic)
                    await self._pause(self._retry.backoff_s)
        finally:
            if joined is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(joined[1].release())

    async def _join(self, sub: _Subscription) -> tuple[AsyncEngine, Lease]:
        """The group's offset row (made once) and the lease its consumers take turns on."""
        engine = await self._open()
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT OR IGNORE INTO consumer_offsets (grp, topic, committed)"
                    " VALUES (:g, :t, 0)"
                ),
                {"g": sub.group, "t": sub.topic},
            )
        return engine, Lease(
            engine,
            name=f"consumer:{sub.group}:{sub.topic}",
            owner=self._owner,
            duration_s=self._lease_s,
        )

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the log is closing."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    def _start_watch(self) -> None:
        """Tell the consumers when another process appended events, without a query of the
        log per consumer and poll: one ``PRAGMA data_version`` (which changes when another
        connection committed to the file) on a connection of its own, and only then a look
        at the last ``seq``. A job on the common loop.

        When to look: where the kernel reports writes to the log's ``-wal`` file (Linux's
        inotify; every commit in WAL mode writes there), as soon as one comes and at most
        once per ``poll_interval_s`` while they keep coming (writes in between are merged by
        the kernel), and every ``_WATCH_FALLBACK_S`` in case one went unreported: an idle
        process does not wake up a hundred times a second. Elsewhere, every
        ``poll_interval_s``."""
        database = make_url(self._url).database
        if not database or database == ":memory:":
            # Nobody else can write to it: appends here wake the consumers directly.
            return
        watcher = sqlite3.connect(database, timeout=0, check_same_thread=False)
        seen: dict[str, Any] = {"version": None, "last": None}
        loop = asyncio.get_running_loop()
        # The first read opens the -wal file (creating it if no one had), so it can be watched.
        with contextlib.suppress(sqlite3.Error):
            watcher.execute("PRAGMA data_version").fetchone()
        notes = _wal_writes(database)
        listening: dict[str, Any] = {"on": False, "soon": None}

        def written() -> None:
            # Read the notes away and stop listening until the next look has been.
            assert notes is not None  # noqa: S101 - only ever registered with notes
            _drain(notes.fd)
            loop.remove_reader(notes.fd)
            listening["on"] = False
            watching.wake()

        def listen() -> None:
            listening["soon"] = None
            if notes is not None and not listening["on"] and not watching.stopping:
                loop.add_reader(notes.fd, written)
                listening["on"] = True

        async def look() -> bool:
            try:
                version = watcher.execute("PRAGMA data_version").fetchone()[0]
                if version != seen["version"]:
                    seen["version"] = version
                    newest = watcher.execute("SELECT max(seq) FROM events").fetchone()[0]
                    if newest != seen["last"]:
                        seen["last"] = newest
                        for sub in self._subscriptions:
                            sub.news.set()
            except sqlite3.Error as exc:  # the file is busy being recovered: look again
                log.debug("event log watch: %r", exc)
                seen["version"] = None
            if notes is not None and not listening["on"] and listening["soon"] is None:
                listening["soon"] = loop.call_later(self._poll, listen)
            return False

        class _Watching(Loop):
            async def _stopped(self) -> None:
                if notes is not None:
                    if listening["soon"] is not None:
                        listening["soon"].cancel()
                    if listening["on"]:
                        loop.remove_reader(notes.fd)
                    notes.close()
                watcher.close()

        watching = _Watching(
            look,
            name="eventlog-watch",
            interval_s=self._poll if notes is None else _WATCH_FALLBACK_S,
            backoff_s=self._poll,
            backoff_max_s=1.0,
            grace_s=1.0,
        )
        self._watch_loop = watching
        listen()
        watching.start()

    async def purge_events(self, before: float, limit: int) -> tuple[int, bool]:
        """Retention: delete at most ``limit`` events appended before ``before`` that every
        group of their topic has committed (all of them when the topic has no group), oldest
        first, keeping dead-lettered ones; how many went and whether more may be waiting."""
        engine = await self._open()
        async with engine.connect() as conn:
            topics = list((await conn.execute(_TOPICS)).scalars())
        deleted, more = 0, False
        for topic in topics:
            budget = limit - deleted
            if budget <= 0:
                return deleted, True
            async with engine.connect() as conn:
                bound = await conn.scalar(_PASSED_BY_ALL, {"t": topic})
                rows = (
                    await conn.execute(
                        _OLDEST_PASSED,
                        {"t": topic, "bound": _NO_BOUND if bound is None else bound, "n": budget},
                    )
                ).all()
            cut = None
            for seq, appended_at in rows:
                if appended_at >= before:
                    break
                cut = seq
            if cut is None:
                continue
            # A transaction of the DELETE alone: one that had read first could not take the
            # write lock after another process's append (SQLITE_BUSY_SNAPSHOT). Offsets only
            # move forward, so what every group had passed stays passed.
            async with engine.begin() as conn:
                gone = await conn.execute(_DELETE_PASSED, {"t": topic, "cut": cut})
            deleted += int(gone.rowcount)
            more = more or (len(rows) == budget and cut == rows[-1][0])
        return deleted, more

    async def _consume_while_held(
        self, engine: AsyncEngine, sub: _Subscription, lease: Lease
    ) -> None:
        """Consume until the lease is lost or the log closes, renewing it all the while.

        The heartbeat runs beside the handler, so a handler slower than the lease does not
        let another process in; the heartbeat keeps going while ``close`` waits for it.
        """
        held, done = asyncio.Event(), asyncio.Event()
        held.set()
        heartbeat = asyncio.create_task(
            self._keep(lease, held=held, done=done, wake=sub.news), name=f"lease-{lease.name}"
        )
        try:
            while held.is_set() and not self._stopping.is_set():
                # Cleared before the read, so an append after it wakes the wait below.
                sub.news.clear()
                if not await self._consume_batch(engine, sub, lease=lease, held=held):
                    await self._await_news(sub)
        finally:
            done.set()
            await heartbeat

    async def _await_news(self, sub: _Subscription) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_RECHECK_S):
                await sub.news.wait()

    async def _keep(
        self, lease: Lease, *, held: asyncio.Event, done: asyncio.Event, wake: asyncio.Event
    ) -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._lease_s / 3):
                    await done.wait()
            if done.is_set():
                return
            try:
                if await lease.renew():
                    continue
            except Exception as exc:
                # The lease lasts two more beats: a later renewal may still make it.
                log.warning("could not renew %s: %r", lease.name, exc)
                continue
            log.warning("%s lost lease %s; stops delivering", self._owner, lease.name)
            held.clear()
            wake.set()  # a consumer waiting for events goes back to waiting for the lease
            return

    async def _consume_batch(
        self, engine: AsyncEngine, sub: _Subscription, *, lease: Lease, held: asyncio.Event
    ) -> bool:
        """Handle the next events while the lease is held; False once caught up (the read
        was not full), so the caller waits for news instead of reading again to find none:
        ``news`` was cleared before this read, so an append after it ends the wait at once.

        A batch subscriber gets them together and one commit; what it cannot take (an
        event that failed before, an unreadable envelope), and every event of a batch it
        failed on, goes one at a time, each committed after it."""
        chosen = {"g": sub.group, "t": sub.topic, "n": self._batch}
        if self._writer is not None:
            rows: Sequence[Any] = await self._writer.next_events(chosen)
        else:
            async with engine.connect() as conn:
                rows = (await conn.execute(_NEXT_EVENTS, chosen)).all()
        index = 0
        while index < len(rows) and not self._stopping.is_set() and held.is_set():
            batch_handler = sub.batch_handler
            together = self._together(rows, index) if batch_handler is not None else []
            if (
                batch_handler is not None
                and together
                and await self._deliver_together(sub, batch_handler, together)
            ):
                last = together[-1][0]
                if not await self._commit(
                    engine, sub, lease=lease, seq=last, payload="", error=None, attempted=False
                ):
                    self._lost(lease, last)
                    held.clear()
                    break
                index += len(together)
                continue
            count = max(len(together), 1)
            for seq, payload, tried in rows[index : index + count]:
                if self._stopping.is_set() or not held.is_set():
                    break
                if not await self._one(
                    engine, sub, lease=lease, held=held, seq=seq, payload=payload, tried=tried
                ):
                    break
            index += count
        return len(rows) >= self._batch

    def _lost(self, lease: Lease, seq: int) -> None:
        log.warning(
            "%s lost lease %s before committing %s; another consumer has it",
            self._owner,
            lease.name,
            seq,
        )

    async def _one(
        self,
        engine: AsyncEngine,
        sub: _Subscription,
        *,
        lease: Lease,
        held: asyncio.Event,
        seq: int,
        payload: str,
        tried: int | None,
    ) -> bool:
        """Deliver one event and commit it; False if the consumer must stop here."""
        finished, error, attempted = await self._deliver(
            engine, sub, seq=seq, payload=payload, tried=int(tried or 0), held=held
        )
        if not finished:
            return False  # closing, or the lease lost, while the event failed: it comes again
        if not await self._commit(
            engine,
            sub,
            lease=lease,
            seq=seq,
            payload=payload,
            error=error,
            attempted=attempted or tried is not None,
        ):
            self._lost(lease, seq)
            held.clear()
            return False
        return True

    @staticmethod
    def _together(rows: Sequence[Any], start: int) -> list[tuple[int, Event]]:
        """The events from ``rows[start]`` on that a batch handler takes together: up to the
        first one that failed before or is not a readable envelope."""
        together: list[tuple[int, Event]] = []
        for seq, payload, tried in rows[start:]:
            if tried is not None:
                break
            try:
                together.append((seq, Event.from_json(payload)))
            except MalformedEvent:
                break
        return together

    async def _deliver_together(
        self, sub: _Subscription, batch_handler: BatchHandler, together: list[tuple[int, Event]]
    ) -> bool:
        """Hand the events to the batch handler; False if it failed (they then go one at a
        time). Each event's consumer span covers the whole call."""
        try:
            await hand_together(
                batch_handler,
                [(event, context.parse_traceparent(event.traceparent)) for _, event in together],
                system="shop-eventlog",
                topic=sub.topic,
                group=sub.group,
                timeout_s=self._retry.handler_timeout_s,
            )
            return True
        except Exception as exc:
            log.warning(
                "%s failed on a batch of %d events (seq %d to %d): %r; one at a time now",
                sub.group,
                len(together),
                together[0][0],
                together[-1][0],
                exc,
            )
            return False

    async def _deliver(
        self,
        engine: AsyncEngine,
        sub: _Subscription,
        *,
        seq: int,
        payload: str,
        tried: int,
        held: asyncio.Event,
    ) -> tuple[bool, str | None, bool]:
        """Hand the event over: (finished, why it goes to dead letters if it does, whether
        a failed attempt was recorded).

        Not finished if the log closed or the lease was lost before the handler succeeded.
        ``tried``: the failed attempts recorded for the event before.
        """
        try:
            event = Event.from_json(payload)
        except MalformedEvent as exc:
            return True, str(exc), False  # no retry can make it readable
        span = telemetry.consuming(
            system="shop-eventlog",
            topic=sub.topic,
            group=sub.group,
            event_id=event.id,
            parent=context.parse_traceparent(event.traceparent),
        )
        try:
            return await self._attempts(engine, sub, event, seq=seq, tried=tried, held=held)
        finally:
            if span is not None:
                span.end()

    async def _attempts(
        self,
        engine: AsyncEngine,
        sub: _Subscription,
        event: Event,
        *,
        seq: int,
        tried: int,
        held: asyncio.Event,
    ) -> tuple[bool, str | None, bool]:
        """The handler's attempts at ``event`` (see ``_deliver``)."""
        key = {"g": sub.group, "t": sub.topic, "s": seq}
        attempted = False
        for attempt in range(tried + 1, self._retry.max_attempts + 1):
            try:
                # A handler that hangs would hold the lease (and the topic) for ever.
                async with asyncio.timeout(self._retry.handler_timeout_s):
                    await sub.handler(event)
                return True, None, attempted
            except Exception as exc:
                async with engine.begin() as conn:
                    await conn.execute(_RECORD_ATTEMPT, {**key, "n": attempt})
                attempted = True
                if attempt == self._retry.max_attempts:
                    log.exception(
                        "%s gave up on event %s (%s) after %d attempts",
                        sub.group,
                        event.id,
                        event.type,
                        attempt,
                    )
                    return True, repr(exc), attempted
                log.warning(
                    "%s failed on event %s (attempt %d): %r", sub.group, event.id, attempt, exc
                )
                await self._pause(self._retry.delay_after(attempt))
                if self._stopping.is_set() or not held.is_set():
                    return False, None, attempted
        return True, f"gave up after {self._retry.max_attempts} attempts", attempted

    async def _commit(
        self,
        engine: AsyncEngine,
        sub: _Subscription,
        *,
        lease: Lease,
        seq: int,
        payload: str,
        error: str | None,
        attempted: bool,
    ) -> bool:
        """Move the offset to ``seq`` (setting the event aside if it failed); False if the
        lease is no longer ours.

        Fenced in one statement: a consumer that stalled past its lease must not commit, and
        an offset never moves back. ``attempted``: failed attempts of the event are recorded
        (and go with the commit); for the usual event, the commit is that one statement.
        """
        key = {"g": sub.group, "t": sub.topic, "s": seq}
        fence = {**key, "lease": lease.name, "owner": lease.owner, "now": time.time()}
        if not attempted and error is None and self._writer is not None:
            return await self._writer.commit_offset(fence)
        async with engine.begin() as conn:
            moved = await conn.execute(_COMMIT, fence)
            if moved.rowcount != 1:
                return False
            if attempted or error is not None:
                await conn.execute(_FORGET_ATTEMPTS, key)
            if error is not None:
                await conn.execute(
                    _SET_ASIDE, {**key, "p": payload, "e": error[:2000], "now": time.time()}
                )
        return True


def from_url(
    url: str,
    *,
    client_id: str,
    retry: RetryPolicy,
    settings: PlatformSettings | None = None,
) -> SqliteEventLog:
    """The factory ``shop.platform.buses`` names for ``sqlite://`` URLs; ``settings`` gives
    the retention (``SHOP_EVENT_RETENTION_S``, ``SHOP_RETENTION_*``; read from the
    environment when not given)."""
    if settings is None:
        from shop.platform.settings import PlatformSettings

        settings = PlatformSettings()
    return SqliteEventLog(
        url,
        client_id=client_id,
        max_attempts=retry.max_attempts,
        retry_backoff_s=retry.backoff_s,
        retry_backoff_max_s=retry.backoff_max_s,
        handler_timeout_s=retry.handler_timeout_s,
        retention=RetentionPolicy(
            keep_s=settings.event_retention_s,
            interval_s=settings.retention_interval_s,
            batch=settings.retention_batch,
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shop.platform.eventlog replay --url sqlite:///… --group G [--topic T]``:
    ``python -m shop.platform.buses replay`` for the embedded log only."""
    from shop.platform.buses import main as bus_main  # the composition side picks the bus

    return bus_main(argv, prog="python -m shop.platform.eventlog", only="sqlite")


if __name__ == "__main__":
    sys.exit(main())
