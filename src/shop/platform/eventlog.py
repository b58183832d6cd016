"""The embedded event log: a durable, ordered log in one SQLite file shared by local processes.

- Topics are rows in one append-only table; ``seq`` gives a total order. SQLite serialises
  writers, so the order of ``seq`` is the order of commits: no reader sees a gap fill in
  later, and order per key follows.
- A consumer group keeps its committed offset per topic. One process at a time consumes for
  a group (a lease it renews); if it dies, another takes over after the lease lapses and
  starts from the last committed offset: at-least-once.
- A handler that raises gets the same event again after a back-off (order is kept, so the
  key's later events wait). After ``max_attempts`` the event goes to ``dead_letters`` and the
  group moves on, so one poisoned event cannot stop a topic forever.
WAL mode lets readers and one writer work at once across processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shop.platform import context
from shop.platform.db import create_engine
from shop.platform.events import Event, Handler, MalformedEvent
from shop.platform.lease import LEASES_DDL, Lease

__all__ = ["SqliteEventLog"]

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
    LEASES_DDL,
)


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
        max_attempts: int = 8,
        retry_backoff_s: float = 0.2,
    ) -> None:
        self._url = url
        self._engine: AsyncEngine | None = None
        self._owner = f"{client_id}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._poll = poll_interval_s
        self._batch = batch_size
        self._lease_s = lease_s
        self._max_attempts = max_attempts
        self._backoff = retry_backoff_s
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
        renewed_at = 0.0
        try:
            while not self._stopping.is_set():
                try:
                    if time.monotonic() - renewed_at > self._lease_s / 3:
                        if not await lease.hold():
                            await self._pause(self._poll * 4)
                            continue
                        renewed_at = time.monotonic()
                    renew_by = renewed_at + self._lease_s / 3
                    if not await self._consume_batch(engine, sub, renew_by=renew_by):
                        await self._pause(self._poll)
                except Exception:
                    log.exception("consumer %s on %s failed; retrying", sub.group, sub.topic)
                    await self._pause(self._backoff)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(lease.release())

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the log is closing."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    async def _consume_batch(
        self, engine: AsyncEngine, sub: _Subscription, *, renew_by: float
    ) -> bool:
        """Handle the next events, stopping when the lease wants renewing; False if idle."""
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
            if time.monotonic() > renew_by or self._stopping.is_set():
                break  # renew first: a lapsed lease would let another process in
            if not await self._deliver(engine, sub, seq=seq, payload=payload):
                break  # closing while the event was failing: it comes again, uncommitted
            async with engine.begin() as conn:
                await conn.execute(
                    text(
                        "UPDATE consumer_offsets SET committed = :s WHERE grp = :g AND topic = :t"
                    ),
                    {"s": seq, "g": sub.group, "t": sub.topic},
                )
        return bool(rows)

    async def _deliver(
        self, engine: AsyncEngine, sub: _Subscription, *, seq: int, payload: str
    ) -> bool:
        """Hand the event over; False if the log closed before the handler succeeded."""
        try:
            event = Event.from_json(payload)
        except MalformedEvent as exc:
            await self._dead_letter(engine, sub, seq=seq, payload=payload, error=str(exc))
            return True
        trace = context.parse_traceparent(event.traceparent) or context.TraceContext.new()
        context.bind(request_id=event.id, trace=trace)
        for attempt in range(1, self._max_attempts + 1):
            try:
                await sub.handler(event)
                return True
            except Exception as exc:
                if attempt == self._max_attempts:
                    log.exception(
                        "%s gave up on event %s (%s) after %d attempts",
                        sub.group,
                        event.id,
                        event.type,
                        attempt,
                    )
                    await self._dead_letter(engine, sub, seq=seq, payload=payload, error=repr(exc))
                    return True
                log.warning(
                    "%s failed on event %s (attempt %d): %r", sub.group, event.id, attempt, exc
                )
                await self._pause(min(self._backoff * 2 ** (attempt - 1), 5.0))
                if self._stopping.is_set():
                    return False
        return True

    async def _dead_letter(
        self, engine: AsyncEngine, sub: _Subscription, *, seq: int, payload: str, error: str
    ) -> None:
        async with engine.begin() as conn:
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
