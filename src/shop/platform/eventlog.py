"""The embedded event log: a durable, ordered log in one SQLite file shared by local processes.

- Topics are rows in one append-only table; ``seq`` gives a total order. SQLite serialises
  writers, so the order of ``seq`` is the order of commits: no reader sees a gap fill in
  later, and order per key follows.
- A consumer group keeps its committed offset per topic. One process at a time consumes for
  a group, holding a lease that a heartbeat renews while handlers run; if it dies, another
  takes over after the lease lapses and starts from the last committed offset:
  at-least-once. The commit is fenced by the lease and never moves the offset back, so a
  process that stalled past its lease cannot undo its successor's work.
- A handler that raises gets the same event again after a back-off (order is kept, so the
  key's later events wait), doubling up to a cap, for about a quarter of an hour by default;
  then the event goes to ``dead_letters`` and the group moves on, so one poisoned event
  cannot stop a topic forever. ``python -m shop.platform.buses replay`` (or
  ``python -m shop.platform.eventlog replay``) puts them back.
WAL mode lets readers and one writer work at once across processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import column, table, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from shop.platform import context
from shop.platform.db import create_engine
from shop.platform.events import Event, Handler, MalformedEvent, RetryPolicy
from shop.platform.lease import LEASES_DDL, Lease

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
_offsets = table("consumer_offsets", column("grp"), column("topic"), column("committed"))


@dataclass(slots=True)
class _Subscription:
    topic: str
    group: str
    handler: Handler


class SqliteEventLog:
    def __init__(
        self,
        url: str,
        *,
        client_id: str,
        poll_interval_s: float = 0.05,
        batch_size: int = 100,
        lease_s: float = 5.0,
        max_attempts: int = 40,
        retry_backoff_s: float = 0.2,
        retry_backoff_max_s: float = 30.0,
        handler_timeout_s: float = 60.0,
    ) -> None:
        self._url = url
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

    async def _open(self) -> AsyncEngine:
        async with self._ready:
            if self._engine is None:
                engine = create_engine(self._url)
                async with engine.begin() as conn:
                    for statement in _SCHEMA:
                        await conn.execute(text(statement))
                self._engine = engine
            return self._engine

    async def publish(self, topic: str, events: Sequence[Event]) -> None:
        if not events:
            return
        engine = await self._open()
        now = time.time()
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO events (topic, key, event_id, payload, appended_at)"
                    " VALUES (:topic, :key, :event_id, :payload, :now)"
                ),
                [
                    {
                        "topic": topic,
                        "key": e.key,
                        "event_id": e.id,
                        "payload": e.to_json(),
                        "now": now,
                    }
                    for e in events
                ],
            )

    def subscribe(self, topic: str, *, group: str, handler: Handler) -> None:
        self._subscriptions.append(_Subscription(topic=topic, group=group, handler=handler))

    async def start(self) -> None:
        await self._open()
        for sub in self._subscriptions:
            self._tasks.append(
                asyncio.create_task(self._consume(sub), name=f"consume-{sub.group}-{sub.topic}")
            )

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
        if self._tasks:
            _, hanging = await asyncio.wait(self._tasks, timeout=grace_s)
            for task in hanging:
                task.cancel()
            for task in hanging:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._tasks.clear()
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

    async def _consume(self, sub: _Subscription) -> None:
        engine = await self._open()
        lease = Lease(
            engine,
            name=f"consumer:{sub.group}:{sub.topic}",
            owner=self._owner,
            duration_s=self._lease_s,
        )
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT OR IGNORE INTO consumer_offsets (grp, topic, committed)"
                    " VALUES (:g, :t, 0)"
                ),
                {"g": sub.group, "t": sub.topic},
            )
        try:
            while not self._stopping.is_set():
                try:
                    if await lease.hold():
                        await self._consume_while_held(engine, sub, lease)
                    else:
                        await self._pause(self._poll * 4)
                except Exception:
                    log.exception("consumer %s on %s failed; retrying", sub.group, sub.topic)
                    await self._pause(self._retry.backoff_s)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(lease.release())

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the log is closing."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

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
            self._keep(lease, held=held, done=done), name=f"lease-{lease.name}"
        )
        try:
            while held.is_set() and not self._stopping.is_set():
                if not await self._consume_batch(engine, sub, lease=lease, held=held):
                    await self._pause(self._poll)
        finally:
            done.set()
            await heartbeat

    async def _keep(self, lease: Lease, *, held: asyncio.Event, done: asyncio.Event) -> None:
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
            return

    async def _consume_batch(
        self, engine: AsyncEngine, sub: _Subscription, *, lease: Lease, held: asyncio.Event
    ) -> bool:
        """Handle the next events while the lease is held; False if there were none."""
        async with engine.connect() as conn:
            committed = await conn.scalar(
                text("SELECT committed FROM consumer_offsets WHERE grp = :g AND topic = :t"),
                {"g": sub.group, "t": sub.topic},
            )
            rows = (
                await conn.execute(
                    text(
                        "SELECT seq, payload FROM events WHERE topic = :t AND seq > :c"
                        " ORDER BY seq LIMIT :n"
                    ),
                    {"t": sub.topic, "c": committed or 0, "n": self._batch},
                )
            ).all()
        for seq, payload in rows:
            if self._stopping.is_set() or not held.is_set():
                break
            finished, error = await self._deliver(engine, sub, seq=seq, payload=payload, held=held)
            if not finished:
                break  # closing, or the lease lost, while the event failed: it comes again
            if not await self._commit(
                engine, sub, lease=lease, seq=seq, payload=payload, error=error
            ):
                log.warning(
                    "%s lost lease %s before committing %s; another consumer has it",
                    self._owner,
                    lease.name,
                    seq,
                )
                held.clear()
                break
        return bool(rows)

    async def _deliver(
        self,
        engine: AsyncEngine,
        sub: _Subscription,
        *,
        seq: int,
        payload: str,
        held: asyncio.Event,
    ) -> tuple[bool, str | None]:
        """Hand the event over: (finished, why it goes to dead letters if it does).

        Not finished if the log closed or the lease was lost before the handler succeeded.
        """
        try:
            event = Event.from_json(payload)
        except MalformedEvent as exc:
            return True, str(exc)  # no retry can make it readable
        trace = context.parse_traceparent(event.traceparent) or context.TraceContext.new()
        context.bind(request_id=event.id, trace=trace)
        key = {"g": sub.group, "t": sub.topic, "s": seq}
        async with engine.connect() as conn:
            tried = await conn.scalar(
                text(
                    "SELECT attempts FROM delivery_attempts"
                    " WHERE grp = :g AND topic = :t AND seq = :s"
                ),
                key,
            )
        for attempt in range(int(tried or 0) + 1, self._retry.max_attempts + 1):
            try:
                # A handler that hangs would hold the lease (and the topic) for ever.
                async with asyncio.timeout(self._retry.handler_timeout_s):
                    await sub.handler(event)
                return True, None
            except Exception as exc:
                async with engine.begin() as conn:
                    await conn.execute(
                        text(
                            "INSERT OR REPLACE INTO delivery_attempts (grp, topic, seq, attempts)"
                            " VALUES (:g, :t, :s, :n)"
                        ),
                        {**key, "n": attempt},
                    )
                if attempt == self._retry.max_attempts:
                    log.exception(
                        "%s gave up on event %s (%s) after %d attempts",
                        sub.group,
                        event.id,
                        event.type,
                        attempt,
                    )
                    return True, repr(exc)
                log.warning(
                    "%s failed on event %s (attempt %d): %r", sub.group, event.id, attempt, exc
                )
                await self._pause(self._retry.delay_after(attempt))
                if self._stopping.is_set() or not held.is_set():
                    return False, None
        return True, f"gave up after {self._retry.max_attempts} attempts"

    async def _commit(
        self,
        engine: AsyncEngine,
        sub: _Subscription,
        *,
        lease: Lease,
        seq: int,
        payload: str,
        error: str | None,
    ) -> bool:
        """Move the offset to ``seq`` (setting the event aside if it failed); False if the
        lease is no longer ours.

        Fenced in one statement: a consumer that stalled past its lease must not commit, and
        an offset never moves back.
        """
        async with engine.begin() as conn:
            moved = await conn.execute(
                update(_offsets)
                .where(
                    _offsets.c.grp == sub.group,
                    _offsets.c.topic == sub.topic,
                    _offsets.c.committed < seq,
                    lease.is_held(),
                )
                .values(committed=seq)
            )
            if moved.rowcount != 1:
                return False
            await conn.execute(
                text("DELETE FROM delivery_attempts WHERE grp = :g AND topic = :t AND seq <= :s"),
                {"g": sub.group, "t": sub.topic, "s": seq},
            )
            if error is not None:
                await conn.execute(
                    text(
                        "INSERT OR REPLACE INTO dead_letters"
                        " (grp, topic, seq, payload, error, failed_at)"
                        " VALUES (:g, :t, :s, :p, :e, :now)"
                    ),
                    {
                        "g": sub.group,
                        "t": sub.topic,
                        "s": seq,
                        "p": payload,
                        "e": error[:2000],
                        "now": time.time(),
                    },
                )
        return True


def from_url(
    url: str,
    *,
    client_id: str,
    retry: RetryPolicy,
    settings: PlatformSettings | None = None,
) -> SqliteEventLog:
    """The factory ``shop.platform.buses`` names for ``sqlite://`` URLs (``settings`` holds
    nothing the log needs: its file is the URL)."""
    return SqliteEventLog(
        url,
        client_id=client_id,
        max_attempts=retry.max_attempts,
        retry_backoff_s=retry.backoff_s,
        retry_backoff_max_s=retry.backoff_max_s,
        handler_timeout_s=retry.handler_timeout_s,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shop.platform.eventlog replay --url sqlite:///… --group G [--topic T]``:
    ``python -m shop.platform.buses replay`` for the embedded log only."""
    from shop.platform.buses import main as bus_main  # the composition side picks the bus

    return bus_main(argv, prog="python -m shop.platform.eventlog", only="sqlite")


if __name__ == "__main__":
    sys.exit(main())
