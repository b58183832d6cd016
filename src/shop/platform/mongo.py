"""MongoDB for a service that keeps its data there: the client, multi-document transactions,
the outbox and a lease — the same semantics as their SQL counterparts (``outbox``, ``lease``).

Requires the ``mongo`` extra (PyMongo's ``AsyncMongoClient``; Motor is end of life). A
service opens its database with ``mongo_database(url)``: the URL names the database
(``mongodb://host/shop_product``), as a SQL URL does.

- Transactions go through ``in_transaction``, PyMongo's ``with_transaction``: it runs the
  work again on ``TransientTransactionError`` (a write conflict with a concurrent
  transaction) and retries the commit on ``UnknownTransactionCommitResult``, for up to
  two minutes, as the driver's documentation recommends. The work must therefore be safe
  to run again from the start.
- The outbox is a collection whose ``_id`` is a sequence number drawn, inside the
  transaction of the change, from one counter document. Every writer of events updates
  that document, so two transactions that write events are serialised by it (the second
  one's write conflicts and is run again): commit order equals ``_id`` order, and the
  relay never sees event 12 and later event 11. The price is that event-writing
  transactions of one service do not run in parallel, which a catalogue can afford.
- Times the relay compares (lease expiry, publication) are epoch seconds as doubles, like
  the SQL tables' ``DOUBLE`` columns.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC
from typing import Any, TypeVar

from pymongo import ASCENDING, AsyncMongoClient, ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConfigurationError, DuplicateKeyError
from pymongo.monitoring import (
    CommandFailedEvent,
    CommandListener,
    CommandStartedEvent,
    CommandSucceededEvent,
)

from shop.platform import telemetry
from shop.platform.events import Event
from shop.platform.outbox import OutboxEntry

__all__ = [
    "COUNTERS",
    "LEASES",
    "OUTBOX",
    "Document",
    "MongoLease",
    "MongoOutbox",
    "add_event",
    "in_transaction",
    "mongo_database",
    "ping",
]

Document = dict[str, Any]
T = TypeVar("T")

OUTBOX = "outbox"
COUNTERS = "counters"
LEASES = "shop_leases"
_OUTBOX_SEQ = "outbox"


@asynccontextmanager
async def mongo_database(url: str) -> AsyncIterator[AsyncDatabase[Document]]:
    """The database the URL names, on a client closed on the way out.

    Dates come back aware, in UTC. Connecting is lazy: a server that is down is reported
    by ``ping`` (readiness), not here.
    """
    listeners = [CommandSpans()] if telemetry.enabled() else []
    client: AsyncMongoClient[Document] = AsyncMongoClient(
        url, tz_aware=True, tzinfo=UTC, event_listeners=listeners
    )
    try:
        try:
            database = client.get_default_database()
        except ConfigurationError:
            raise ValueError(
                "a MongoDB URL must name its database: mongodb://host:27017/<database>"
            ) from None
        yield database
    finally:
        await client.close()


class CommandSpans(CommandListener):
    """A span per command sent while a sampled request's or event's trace is bound
    (``telemetry.statement_span``: why not opentelemetry-instrumentation-pymongo)."""

    def __init__(self) -> None:
        self._open: dict[tuple[int, int], Any] = {}

    def started(self, event: CommandStartedEvent) -> None:
        collection = event.command.get(event.command_name)
        name = f"{event.command_name} {collection}" if isinstance(collection, str) else ""
        span = telemetry.statement_span(
            "mongodb",
            event.command_name,
            name or event.command_name,
            namespace=event.database_name,
        )
        if span is not None:
            span.update_name(name or event.command_name)
            self._open[(event.request_id, event.operation_id or 0)] = span

    def succeeded(self, event: CommandSucceededEvent) -> None:
        span = self._open.pop((event.request_id, event.operation_id or 0), None)
        if span is not None:
            telemetry.end_span(span)

    def failed(self, event: CommandFailedEvent) -> None:
        span = self._open.pop((event.request_id, event.operation_id or 0), None)
        if span is not None:
            span.set_attribute("db.response.status_code", str(event.failure.get("code", "")))
            telemetry.end_span(span, RuntimeError(str(event.failure.get("codeName", "error"))))


async def ping(database: AsyncDatabase[Document]) -> None:
    await database.command("ping")


async def in_transaction(
    database: AsyncDatabase[Document], work: Callable[[AsyncClientSession], Awaitable[T]]
) -> T:
    """Run ``work`` in one multi-document transaction, again if it was transient-aborted."""

    async def callback(session: AsyncClientSession) -> T:
        return await work(session)

    async with database.client.start_session() as session:
        return await session.with_transaction(callback)


async def add_event(
    session: AsyncClientSession, *, database: AsyncDatabase[Document], topic: str, event: Event
) -> None:
    """Record ``event`` for ``topic`` inside the transaction ``session`` is running."""
    counter = await database[COUNTERS].find_one_and_update(
        {"_id": _OUTBOX_SEQ},
        {"$inc": {"seq": 1}},
        upsert=True,
        return_document=ReturnDocument.AFTER,
        session=session,
    )
    if counter is None:  # an upsert that returns the document after never finds none
        raise RuntimeError("the outbox counter vanished")
    await database[OUTBOX].insert_one(
        {
            "_id": int(counter["seq"]),
            "eventId": event.id,
            "topic": topic,
            "key": event.key,
            "payload": event.to_json(),
            "createdAt": time.time(),
            "publishedAt": None,
        },
        session=session,
    )


class MongoLease:
    """A named lease in the ``shop_leases`` collection; the semantics of ``lease.Lease``."""

    def __init__(
        self, database: AsyncDatabase[Document], *, name: str, owner: str, duration_s: float
    ) -> None:
        self._leases = database[LEASES]
        self.name = name
        self.owner = owner
        self.duration_s = duration_s

    async def hold(self) -> bool:
        """Take or renew the lease; False while another owner holds it."""
        now = time.time()
        try:
            # Matches our own or a lapsed lease; when another owner holds it, the upsert
            # tries to insert a second document with its _id and fails: not ours.
            await self._leases.update_one(
                {"_id": self.name, "$or": [{"owner": self.owner}, {"until": {"$lt": now}}]},
                {"$set": {"owner": self.owner, "until": now + self.duration_s}},
                upsert=True,
            )
        except DuplicateKeyError:
            return False
        return True

    async def renew(self) -> bool:
        """Extend the lease this owner holds without a break; False once it lapsed or moved."""
        now = time.time()
        renewed = await self._leases.update_one(
            {"_id": self.name, "owner": self.owner, "until": {"$gt": now}},
            {"$set": {"until": now + self.duration_s}},
        )
        return renewed.matched_count == 1

    async def release(self) -> None:
        await self._leases.update_one(
            {"_id": self.name, "owner": self.owner}, {"$set": {"until": 0.0}}
        )


class MongoOutbox:
    """The ``outbox`` collection of a service's MongoDB database, as its relay reads it."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._database = database
        self._outbox = database[OUTBOX]

    async def create_indexes(self) -> None:
        """Idempotent, and safe when several instances start at once."""
        await self._outbox.create_index(
            [("publishedAt", ASCENDING), ("_id", ASCENDING)], name="outbox_unpublished"
        )
        await self._outbox.create_index("eventId", unique=True, name="uq_outbox_event_id")
        try:
            # Made here, outside any transaction, so that racing first writers of events
            # never both try to insert it.
            await self._database[COUNTERS].update_one(
                {"_id": _OUTBOX_SEQ}, {"$setOnInsert": {"seq": 0}}, upsert=True
            )
        except DuplicateKeyError:
            pass  # another instance made it at the same moment

    async def backlog(self) -> tuple[int, float | None]:
        """How many events are unpublished and when the oldest was written (None: none), for
        the operator's gauges (``observe.Watch``): both read off the ``outbox_unpublished``
        index, whose ``_id`` order is the order of writing."""
        count = await self._outbox.count_documents({"publishedAt": None})
        if not count:
            return 0, None
        oldest = await self._outbox.find_one(
            {"publishedAt": None}, {"createdAt": 1}, sort=[("_id", ASCENDING)]
        )
        return count, float(oldest["createdAt"]) if oldest is not None else None

    async def unpublished(self, limit: int) -> list[OutboxEntry]:
        found = self._outbox.find({"publishedAt": None}).sort("_id", ASCENDING).limit(limit)
        return [
            OutboxEntry(int(doc["_id"]), doc["topic"], Event.from_json(doc["payload"]))
            async for doc in found
        ]

    async def mark_published(self, positions: Sequence[int]) -> None:
        await self._outbox.update_many(
            {"_id": {"$in": list(positions)}}, {"$set": {"publishedAt": time.time()}}
        )

    async def purge_published(self, before: float, limit: int) -> tuple[int, bool]:
        """The relay's retention job: at most ``limit`` published events, oldest first."""
        old = {"publishedAt": {"$lt": before}}
        found = self._outbox.find(old, {"_id": 1}).sort("publishedAt", ASCENDING).limit(limit)
        positions = [doc["_id"] async for doc in found]
        if not positions:
            return 0, False
        gone = await self._outbox.delete_many({"_id": {"$in": positions}, **old})
        return int(gone.deleted_count), len(positions) == limit

    def lease(self, *, name: str, owner: str, duration_s: float) -> MongoLease:
        return MongoLease(self._database, name=name, owner=owner, duration_s=duration_s)
