"""Events: the CloudEvents envelope and the bus interface every service codes against.

One interface, implemented by the embedded SQLite event log (``shop.platform.eventlog``) and
by Kafka (``shop.platform.kafka``); ``shop.platform.buses.open_event_bus`` picks one by URL
scheme, so this module imports no implementation. Publish takes a topic and events; the key
of each is its ``subject``, and order is kept per key. Subscribe names a consumer group;
delivery is at least once, so handlers de-duplicate (``shop.platform.inbox``). A consumer
may ask for the events in hand together, one commit per batch (``BatchDelivery``).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from shop.platform import context, telemetry

__all__ = [
    "BatchDelivery",
    "BatchHandler",
    "DeadLetterReplay",
    "Delivery",
    "Event",
    "EventBus",
    "Handler",
    "MalformedEvent",
    "RetryPolicy",
    "hand_together",
]


class MalformedEvent(ValueError):
    """A message that is not a CloudEvents 1.0 JSON envelope."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Event:
    type: str
    source: str
    subject: str
    data: Mapping[str, Any]
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    time: str = field(default_factory=_now)
    traceparent: str | None = None

    @classmethod
    def new(cls, *, type: str, source: str, subject: str, data: Mapping[str, Any]) -> Event:
        """An event caused by the current request: it carries the request's trace onward."""
        trace = context.current_trace()
        return cls(
            type=type,
            source=source,
            subject=subject,
            data=data,
            traceparent=context.next_hop(trace) if trace else None,
        )

    @property
    def key(self) -> str:
        return self.subject

    def to_dict(self) -> dict[str, Any]:
        envelope: dict[str, Any] = {
            "specversion": "1.0",
            "id": self.id,
            "type": self.type,
            "source": self.source,
            "time": self.time,
            "subject": self.subject,
            "datacontenttype": "application/json",
            "data": dict(self.data),
        }
        if self.traceparent:
            # The CloudEvents distributed-tracing extension attribute.
            envelope["traceparent"] = self.traceparent
        return envelope

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Event:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise MalformedEvent("not JSON") from exc
        if not isinstance(body, dict) or body.get("specversion") != "1.0":
            raise MalformedEvent("not a CloudEvents 1.0 envelope")
        missing = [
            k for k in ("id", "type", "source", "subject") if not isinstance(body.get(k), str)
        ]
        if missing or not isinstance(body.get("data"), dict):
            raise MalformedEvent(f"missing or malformed: {', '.join(missing) or 'data'}")
        traceparent = body.get("traceparent")
        return cls(
            type=body["type"],
            source=body["source"],
            subject=body["subject"],
            data=body["data"],
            id=body["id"],
            time=str(body.get("time") or _now()),
            traceparent=traceparent if isinstance(traceparent, str) else None,
        )


Handler = Callable[[Event], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Delivery:
    """An event handed to a batch handler, with the trace its handling belongs to (the
    consumer span's when spans are exported, else the event's own)."""

    event: Event
    trace: context.TraceContext

    def bind(self) -> None:
        """Make this event the current request, as a per-event handler has it: its id is
        the request id of the log lines (and calls) that follow, its trace their trace."""
        context.bind(request_id=self.event.id, trace=self.trace)


BatchHandler = Callable[[Sequence[Delivery]], Awaitable[None]]


async def hand_together(
    batch_handler: BatchHandler,
    events: Sequence[tuple[Event, context.TraceContext | None]],
    *,
    system: str,
    topic: str,
    group: str,
    timeout_s: float,
) -> None:
    """Hand ``events`` (each with the trace its producer sent) to ``batch_handler`` in one
    call, each event bound under a consumer span of its own that covers the whole call (the
    SQLite log and Kafka alike); raises what the handler raised, or ``TimeoutError``."""
    deliveries: list[Delivery] = []
    spans = []
    for event, parent in events:
        span = telemetry.consuming(
            system=system, topic=topic, group=group, event_id=event.id, parent=parent
        )
        if span is not None:
            spans.append(span)
        trace = context.current_trace()  # what ``consuming`` bound for this event
        deliveries.append(Delivery(event, trace or context.TraceContext.new()))
    try:
        async with asyncio.timeout(timeout_s):
            await batch_handler(deliveries)
    finally:
        for span in spans:
            span.end()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a consumer treats a failing handler before the event goes to dead letters."""

    max_attempts: int = 40
    backoff_s: float = 0.2
    backoff_max_s: float = 30.0
    handler_timeout_s: float = 60.0

    def delay_after(self, attempt: int) -> float:
        """The back-off after failed attempt ``attempt`` (1, 2, …): doubling, then capped."""
        return float(min(self.backoff_s * 2 ** min(attempt - 1, 32), self.backoff_max_s))

    @property
    def patience_s(self) -> float:
        """How long an event whose handler keeps failing is retried before it is set aside."""
        return sum(self.delay_after(attempt) for attempt in range(1, self.max_attempts))


class EventBus(Protocol):
    async def publish(self, topic: str, events: Sequence[Event]) -> None:
        """Append ``events`` to ``topic`` durably, in order; each keyed by its subject."""

    def subscribe(self, topic: str, *, group: str, handler: Handler) -> None:
        """Deliver every event of ``topic`` to ``handler`` once per consumer ``group``.

        Call before ``start``. A handler that raises gets the same event again later.
        """

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise if the bus cannot be reached (readiness)."""

    async def pending(self, topic: str, *, group: str) -> int:
        """How many events of ``topic`` the ``group`` has not committed yet (its lag)."""


@runtime_checkable
class BatchDelivery(Protocol):
    """A bus that can hand a consumer the events it already has in hand together."""

    def subscribe_batches(
        self, topic: str, *, group: str, handler: Handler, batch_handler: BatchHandler
    ) -> None:
        """Like ``subscribe``, but the events the bus has in hand (a read of the log, a
        partition's poll), in order, go to ``batch_handler`` in one call, and the offset is
        committed once after it returns: a crash redelivers the whole batch in hand, so
        the handler de-duplicates by event id. If it raises, the same events go to
        ``handler`` one at a time, with the usual retries and dead letters; an event that
        failed before, and an envelope that is not CloudEvents, always go one at a time.
        """


@runtime_checkable
class DeadLetterReplay(Protocol):
    """A bus whose consumer groups set events aside after too many failures."""

    async def replay_dead_letters(self, *, group: str, topic: str | None = None) -> int:
        """Put the group's dead letters (of ``topic``, or all) back on their topics; how many.

        Each keeps its event id, so the topic's other groups drop it through their inbox.
        """
