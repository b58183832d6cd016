"""What every event bus promises, run against each implementation: the embedded SQLite log
and Kafka (a fresh, empty Kafka-protocol broker per test).

Order per key, at-least-once delivery with redelivery after a failure or a crash, every
consumer group gets every event, members of one group share it without handling an event
twice, nothing is lost or repeated across a restart, and an event no handler can take is
set aside (without holding up other keys longer than the retry policy says) until an
operator replays it. A batch subscriber gets the events in hand together, one commit for
them: a crash repeats that batch and nothing before it, and a batch it fails on goes one
event at a time, with the same retries and dead letters. What only the SQLite log does
(its lease, its tables, its CLI) is tested in ``test_eventlog.py``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import ssl
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError
from aiokafka.partitioner import DefaultPartitioner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shop.platform import context
from shop.platform.buses import main as bus_cli
from shop.platform.buses import open_event_bus
from shop.platform.eventlog import SqliteEventLog
from shop.platform.events import (
    BatchDelivery,
    DeadLetterReplay,
    Delivery,
    Event,
    EventBus,
    RetryPolicy,
)
from shop.platform.kafka import (
    DLQ_ERROR,
    DLQ_GROUP,
    DLQ_OFFSET,
    DLQ_TOPIC,
    KafkaEventBus,
    bootstrap_servers,
    client_options,
    dead_letter_topic,
)
from shop.platform.settings import PlatformSettings
from tests.servers import Server
from tests.support import free_port, run_module

PARTITIONS = 6
LEASE_S = 1.0
# Quick retries: a failing event costs milliseconds, not the production quarter of an hour.
FAST = RetryPolicy(max_attempts=40, backoff_s=0.01, backoff_max_s=0.05, handler_timeout_s=10.0)
# A Kafka consumer's first join takes a few seconds on the test broker.
JOIN_S = 20.0


@dataclass(frozen=True)
class Backend:
    """``make_bus(client_id=…, retry=…)`` opens a bus of this backend (closed on exit)."""

    name: str
    url: str

    def __call__(
        self, *, client_id: str = "test", retry: RetryPolicy = FAST
    ) -> AbstractAsyncContextManager[EventBus]:
        if self.name == "sqlite":
            return _closing(
                SqliteEventLog(
                    self.url,
                    client_id=client_id,
                    lease_s=LEASE_S,  # a dead consumer's lease lapses quickly
                    max_attempts=retry.max_attempts,
                    retry_backoff_s=retry.backoff_s,
                    retry_backoff_max_s=retry.backoff_max_s,
                    handler_timeout_s=retry.handler_timeout_s,
                )
            )
        return open_event_bus(self.url, client_id=client_id, retry=retry, settings=_settings())


def _settings() -> PlatformSettings:
    return PlatformSettings(kafka_partitions=PARTITIONS)


@asynccontextmanager
async def _closing(bus: SqliteEventLog) -> AsyncIterator[EventBus]:
    try:
        yield bus
    finally:
        await bus.close()


@pytest.fixture(params=["sqlite", "kafka"])
def make_bus(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", f"sqlite:///{tmp_path / 'events.db'}")
    broker: Server = request.getfixturevalue("fresh_kafka")
    return Backend("kafka", broker.url)


def _event(key: str, n: int, **extra: Any) -> Event:
    return Event(type="order.placed", source="/test", subject=key, data={"n": n}, **extra)


def _keys_on_distinct_partitions(count: int) -> list[str]:
    """Keys Kafka's default partitioner puts on ``count`` different partitions (on the
    SQLite log every key shares one order anyway)."""
    chosen: dict[int, str] = {}
    partitions = list(range(PARTITIONS))
    for n in range(1000):
        key = f"K{n}"
        chosen.setdefault(DefaultPartitioner()(key.encode(), partitions, partitions), key)
        if len(chosen) == count:
            return sorted(chosen.values())
    raise AssertionError("not enough partitions")


async def _until(check: Callable[[], bool], *, within_s: float = JOIN_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not check():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def _caught_up(bus: EventBus, topic: str, *, group: str) -> None:
    """Wait until the group committed every event of the topic."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + JOIN_S
    while await bus.pending(topic, group=group):
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.05)


class Recorder:
    def __init__(self, fail_first: int = 0) -> None:
        self.seen: list[Event] = []
        self.traces: list[str | None] = []
        self.fail_first = fail_first
        self.calls = 0

    async def __call__(self, event: Event) -> None:
        self.calls += 1
        if self.calls <= self.fail_first:
            raise RuntimeError("handler failed")
        trace = context.current_trace()
        self.traces.append(trace.traceparent if trace else None)
        self.seen.append(event)

    def numbers(self, key: str | None = None) -> list[int]:
        return [int(e.data["n"]) for e in self.seen if key is None or e.subject == key]


class BatchRecorder(Recorder):
    """A batch subscriber: the batches it handled (``batch``), and the events it handled
    one at a time (``__call__``); both fail on the event numbered ``poison``."""

    def __init__(self, *, poison: int | None = None) -> None:
        super().__init__()
        self.poison = poison
        self.batches: list[list[int]] = []
        self.one_by_one: list[int] = []

    def subscribe(self, bus: EventBus, topic: str = "orders", *, group: str = "g") -> None:
        assert isinstance(bus, BatchDelivery), "every bus can deliver in batches"
        bus.subscribe_batches(topic, group=group, handler=self, batch_handler=self.batch)

    async def batch(self, deliveries: Sequence[Delivery]) -> None:
        numbers = [int(d.event.data["n"]) for d in deliveries]
        if self.poison in numbers:
            raise RuntimeError("batch failed")
        self.batches.append(numbers)
        for delivery in deliveries:
            delivery.bind()  # as a handler does before each event's log lines
            trace = context.current_trace()
            self.traces.append(trace.traceparent if trace else None)
            self.seen.append(delivery.event)

    async def __call__(self, event: Event) -> None:
        if event.data["n"] == self.poison:
            raise RuntimeError("cannot handle this one")
        self.one_by_one.append(int(event.data["n"]))
        self.seen.append(event)


# --- dead letters, wherever the backend keeps them -----------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    topic: str
    payload: str
    error: str
    headers: dict[str, bytes]


async def dead_letters(backend: Backend, *, group: str, topics: Sequence[str]) -> list[DeadLetter]:
    """The group's dead letters not replayed yet, in order per topic."""
    if backend.name == "sqlite":
        with closing(sqlite3.connect(backend.url.removeprefix("sqlite:///"))) as db:
            rows = db.execute(
                "SELECT topic, payload, error FROM dead_letters WHERE grp = ? ORDER BY topic, seq",
                (group,),
            ).fetchall()
        return [DeadLetter(t, p, e, {}) for t, p, e in rows if t in topics]
    letters: list[DeadLetter] = []
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers(backend.url),
        group_id=f"{group}.dlq-replay",  # what replay has consumed is no longer a dead letter
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    try:
        for topic in topics:
            tps = [TopicPartition(dead_letter_topic(topic, group), p) for p in range(PARTITIONS)]
            consumer.assign(tps)
            batches: dict[TopicPartition, list[Any]] = {tp: [] for tp in tps}
            while not await _read_to_end(consumer, tps):
                for tp, messages in (await consumer.getmany(timeout_ms=100)).items():
                    batches[tp].extend(messages)
            for tp in tps:
                for message in batches[tp]:
                    headers = dict(message.headers)
                    letters.append(
                        DeadLetter(
                            headers[DLQ_TOPIC].decode(),
                            message.value.decode(),
                            headers[DLQ_ERROR].decode(),
                            headers,
                        )
                    )
    finally:
        await consumer.stop()
    return letters


async def _read_to_end(consumer: Any, partitions: list[TopicPartition]) -> bool:
    for tp in partitions:
        end = consumer.highwater(tp)
        if end is None or await consumer.position(tp) < end:
            return False
    return True


async def append_raw(backend: Backend, *, topic: str, key: str, payload: bytes) -> None:
    """Put a message on the bus that is not a CloudEvents envelope (a foreign producer)."""
    if backend.name == "sqlite":
        with closing(sqlite3.connect(backend.url.removeprefix("sqlite:///"))) as db, db:
            db.execute(
                "INSERT INTO events (topic, key, event_id, payload, appended_at)"
                " VALUES (?, ?, 'x', ?, 0)",
                (topic, key, payload.decode()),
            )
        return
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers(backend.url), acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, key=key.encode(), value=payload)
    finally:
        await producer.stop()


# --- the contract ----------------------------------------------------------------------------


async def test_events_arrive_whole_and_in_order_per_key(make_bus: Backend) -> None:
    recorder = Recorder()
    trace = context.TraceContext.new()
    async with make_bus() as bus:
        bus.subscribe("orders", group="g", handler=recorder)
        await bus.start()
        for n in range(0, 30, 5):
            await bus.publish(
                "orders",
                [
                    _event("A" if m % 3 else "B", m, traceparent=trace.traceparent)
                    for m in range(n, n + 5)
                ],
            )
        await _until(lambda: len(recorder.seen) == 30)
    assert recorder.numbers("A") == [n for n in range(30) if n % 3]
    assert recorder.numbers("B") == [n for n in range(30) if not n % 3]
    zero = recorder.seen[recorder.numbers().index(0)]
    assert zero.to_dict()["specversion"] == "1.0" and zero.key == "B"
    assert set(recorder.traces) == {trace.traceparent}, "the handler continues the trace"


async def test_a_failing_handler_gets_the_same_event_again_before_later_ones(
    make_bus: Backend,
) -> None:
    recorder = Recorder(fail_first=3)
    async with make_bus() as bus:
        bus.subscribe("orders", group="g", handler=recorder)
        await bus.publish("orders", [_event("A", 1), _event("A", 2)])
        await bus.start()
        await _until(lambda: len(recorder.seen) == 2)
    assert recorder.numbers() == [1, 2]
    assert recorder.calls == 5


async def test_every_group_gets_every_event(make_bus: Backend) -> None:
    mail, audit = Recorder(), Recorder()
    async with make_bus() as bus:
        bus.subscribe("orders", group="mail", handler=mail)
        bus.subscribe("orders", group="audit", handler=audit)
        bus.subscribe("products", group="audit", handler=audit)
        await bus.start()
        await bus.publish("orders", [_event("A", n) for n in range(5)])
        await bus.publish("products", [_event("P", 99)])
        await _until(lambda: len(mail.seen) == 5 and len(audit.seen) == 6)
    assert mail.numbers() == [0, 1, 2, 3, 4]
    assert sorted(audit.numbers()) == [0, 1, 2, 3, 4, 99]


async def test_a_restart_resumes_after_the_last_committed_event(make_bus: Backend) -> None:
    before, after = Recorder(), Recorder()
    async with make_bus() as bus:
        bus.subscribe("orders", group="g", handler=before)
        await bus.start()
        await bus.publish("orders", [_event("A", n) for n in range(3)])
        await _until(lambda: len(before.seen) == 3)
        await _caught_up(bus, "orders", group="g")
    async with make_bus() as bus:
        await bus.publish("orders", [_event("A", n) for n in range(3, 5)])
        assert await bus.pending("orders", group="g") == 2
        assert await bus.pending("orders", group="newcomer") == 5, "a new group starts at 0"
        assert await bus.pending("returns", group="g") == 0, "a topic nobody wrote to"
    async with make_bus() as bus:
        bus.subscribe("orders", group="g", handler=after)
        await bus.start()
        await _until(lambda: len(after.seen) == 2)
        await _caught_up(bus, "orders", group="g")
        await asyncio.sleep(0.3)  # nothing already handled may come back
    assert after.numbers() == [3, 4]


async def test_members_of_one_group_handle_each_event_once(make_bus: Backend) -> None:
    """Two processes of one service, joining and leaving while events flow: Kafka shares
    the partitions between them, the SQLite log lets one work at a time. Either way each
    event is handled once and, across the hand-overs, in order per key: a member finishes
    the events in hand before it gives them up."""
    timeline: list[tuple[str, Event]] = []  # in the order handlers finished

    def handler(member: str) -> Callable[[Event], Any]:
        async def handle(event: Event) -> None:
            await asyncio.sleep(0.01)  # so that events are in hand when the group changes
            timeline.append((member, event))

        return handle

    def by(member: str) -> int:
        return sum(1 for m, _ in timeline if m == member)

    keys = _keys_on_distinct_partitions(PARTITIONS)
    published = 0
    flowing = asyncio.Event()
    flowing.set()

    async def publish_steadily(bus: EventBus) -> None:
        nonlocal published
        while flowing.is_set():
            await bus.publish("orders", [_event(key, published + i) for i, key in enumerate(keys)])
            published += len(keys)
            await asyncio.sleep(0.05)

    async with make_bus(client_id="first") as first, make_bus(client_id="second") as second:
        first.subscribe("orders", group="g", handler=handler("first"))
        second.subscribe("orders", group="g", handler=handler("second"))
        publisher = asyncio.create_task(publish_steadily(second))
        try:
            await first.start()
            await _until(lambda: by("first") >= 10)
            await second.start()  # a rebalance while the first member has events in hand
            if isinstance(first, KafkaEventBus) and isinstance(second, KafkaEventBus):
                await _until(lambda: _split(first.assigned("g"), second.assigned("g")))
                await _until(lambda: by("second") >= 10)
            await first.close()  # leaves with events in hand: they finish and are committed
            handled_before = len(timeline)
            await _until(lambda: len(timeline) >= handled_before + 10 and by("second") >= 10)
        finally:
            flowing.clear()
            await publisher
        await _until(lambda: len(timeline) >= published)
        await _caught_up(second, "orders", group="g")
    numbers = [int(e.data["n"]) for _, e in timeline]
    assert sorted(numbers) == list(range(published)), "each event once"
    for key in keys:
        assert [int(e.data["n"]) for _, e in timeline if e.subject == key] == sorted(
            int(e.data["n"]) for _, e in timeline if e.subject == key
        ), f"{key} in order across the hand-overs"


def _split(one: frozenset[tuple[str, int]], other: frozenset[tuple[str, int]]) -> bool:
    return bool(one) and bool(other) and not one & other and len(one | other) == PARTITIONS


CRASHING_CONSUMER = textwrap.dedent(
    """
    import asyncio, os, sys
    from shop.platform.eventlog import SqliteEventLog
    from shop.platform.kafka import KafkaEventBus, bootstrap_servers

    url, out = sys.argv[1], sys.argv[2]

    async def handle(event):
        with open(out, "a") as f:
            f.write(f"{event.data['n']}\\n")
        if event.data["n"] == 2:
            os._exit(17)  # dies after the work, before the offset is committed

    async def main():
        if url.startswith("sqlite"):
            bus = SqliteEventLog(url, client_id="crashy", lease_s=1.0)
        else:
            bus = KafkaEventBus(bootstrap_servers(url), client_id="crashy")
        bus.subscribe("orders", group="g", handler=handle)
        await bus.start()
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


async def test_a_consumer_that_dies_mid_event_gets_it_again_elsewhere(
    make_bus: Backend, tmp_path: Path
) -> None:
    out = tmp_path / "handled.txt"
    async with make_bus() as bus:
        await bus.publish("orders", [_event("A", n) for n in range(5)])
    crashed = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_CONSUMER, make_bus.url, str(out)
    )
    assert await asyncio.wait_for(crashed.wait(), 60) == 17
    assert out.read_text().split() == ["0", "1", "2"]

    survivor = Recorder()
    async with make_bus() as bus:
        bus.subscribe("orders", group="g", handler=survivor)
        # Takes over once the dead consumer's lease lapses, or the broker gave up on it.
        await bus.start()
        await _until(lambda: len(survivor.seen) == 3, within_s=40)
        await _caught_up(bus, "orders", group="g")
    assert survivor.numbers() == [2, 3, 4], "the unfinished event comes again, nothing else"


CRASHING_BATCH_CONSUMER = textwrap.dedent(
    """
    import asyncio, os, sys
    from shop.platform.eventlog import SqliteEventLog
    from shop.platform.kafka import KafkaEventBus, bootstrap_servers

    url, out = sys.argv[1], sys.argv[2]

    async def handle(event):
        raise AssertionError("only whole batches here")

    async def handle_batch(deliveries):
        numbers = [d.event.data["n"] for d in deliveries]
        with open(out, "a") as f:
            f.write(" ".join(map(str, numbers)) + "\\n")
        if 4 in numbers:
            os._exit(17)  # dies after the work, before the batch's offset is committed

    async def main():
        if url.startswith("sqlite"):
            bus = SqliteEventLog(url, client_id="crashy", lease_s=1.0)
        else:
            bus = KafkaEventBus(bootstrap_servers(url), client_id="crashy")
        bus.subscribe_batches("orders", group="g", handler=handle, batch_handler=handle_batch)
        await bus.start()
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


async def test_a_batch_subscriber_gets_the_events_in_hand_together_in_order(
    make_bus: Backend,
) -> None:
    recorder = BatchRecorder()
    traces = [context.TraceContext.new() for _ in range(12)]
    async with make_bus() as bus:
        recorder.subscribe(bus)
        await bus.publish(
            "orders",
            [_event("AB"[n % 2], n, traceparent=traces[n].traceparent) for n in range(12)],
        )
        await bus.start()
        await _until(lambda: len(recorder.seen) == 12)
        await _caught_up(bus, "orders", group="g")
    assert recorder.one_by_one == []
    assert max(len(batch) for batch in recorder.batches) > 1, "events in hand go together"
    assert recorder.numbers("A") == list(range(0, 12, 2))
    assert recorder.numbers("B") == list(range(1, 12, 2))
    bound = {int(e.data["n"]): t for e, t in zip(recorder.seen, recorder.traces, strict=True)}
    assert all((bound[n] or "").split("-")[1] == traces[n].trace_id for n in range(12)), (
        "each event's handling is bound to its own trace"
    )


async def test_a_batch_that_fails_goes_one_event_at_a_time_with_retries_and_dead_letters(
    make_bus: Backend,
) -> None:
    recorder = BatchRecorder(poison=2)
    policy = RetryPolicy(max_attempts=3, backoff_s=0.01, backoff_max_s=0.05, handler_timeout_s=5)
    async with make_bus(retry=policy) as bus:
        recorder.subscribe(bus)
        await bus.publish("orders", [_event("A", n) for n in range(5)])
        await bus.start()
        await _until(lambda: len(recorder.seen) == 4)
        await _caught_up(bus, "orders", group="g")
        await bus.publish("orders", [_event("A", n) for n in range(5, 8)])
        await _until(lambda: len(recorder.seen) == 7)
    assert recorder.numbers() == [0, 1, 3, 4, 5, 6, 7], "each once, in order, but the poisoned"
    assert recorder.one_by_one[:2] == [0, 1], "the failed batch's events went one at a time"
    assert [n for batch in recorder.batches for n in batch][-3:] == [5, 6, 7], (
        "later events go together again"
    )
    [letter] = await dead_letters(make_bus, group="g", topics=["orders"])
    assert Event.from_json(letter.payload).data == {"n": 2}
    assert "cannot handle this one" in letter.error


async def test_a_batch_subscriber_that_dies_gets_the_batch_in_hand_again_and_nothing_else(
    make_bus: Backend, tmp_path: Path
) -> None:
    out = tmp_path / "batches.txt"

    def handled() -> list[list[int]]:
        lines = out.read_text().splitlines() if out.exists() else []
        return [[int(n) for n in line.split()] for line in lines]

    crashed = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_BATCH_CONSUMER, make_bus.url, str(out)
    )
    async with make_bus() as bus:
        await bus.publish("orders", [_event("A", n) for n in range(3)])
        await _until(lambda: sum(handled(), []) == [0, 1, 2], within_s=40)
        await _caught_up(bus, "orders", group="g")
        await bus.publish("orders", [_event("A", n) for n in range(3, 6)])
    assert await asyncio.wait_for(crashed.wait(), 60) == 17
    in_hand = handled()[-1]
    assert 4 in in_hand and sum(handled(), []) == list(range(in_hand[-1] + 1))

    survivor = BatchRecorder()
    async with make_bus() as bus:
        survivor.subscribe(bus)
        await bus.start()
        await _until(lambda: survivor.numbers()[-1:] == [5], within_s=40)
        await _caught_up(bus, "orders", group="g")
    assert survivor.numbers() == list(range(in_hand[0], 6)), (
        "the batch in hand comes again whole, nothing committed before it"
    )


async def test_a_poisoned_event_is_set_aside_without_holding_up_other_keys(
    make_bus: Backend,
) -> None:
    """On Kafka, other keys on other partitions flow while the poisoned one is retried;
    on the SQLite log they wait, but no longer than the retry policy's patience."""
    poisoned, other = _keys_on_distinct_partitions(2)
    policy = RetryPolicy(max_attempts=4, backoff_s=0.1, backoff_max_s=1.0, handler_timeout_s=5)
    tries: list[float] = []
    handled: dict[int, float] = {}

    async def handler(event: Event) -> None:
        if event.data["n"] == 0:
            tries.append(time.monotonic())
            raise ValueError("cannot handle this one")
        handled[int(event.data["n"])] = time.monotonic()

    trace = context.TraceContext.new()
    async with make_bus(retry=policy) as bus:
        bus.subscribe("orders", group="g", handler=handler)
        await bus.publish("orders", [_event(poisoned, 0, traceparent=trace.traceparent)])
        await bus.publish("orders", [_event(poisoned, 1)] + [_event(other, n) for n in range(2, 6)])
        await bus.start()
        await _until(lambda: len(handled) == 5)
        await _caught_up(bus, "orders", group="g")
    assert len(tries) == 4, "max_attempts in all"
    assert handled[1] > tries[-1], "its own key waits for it"
    others = [handled[n] for n in range(2, 6)]
    assert max(others) - tries[0] < policy.patience_s + 1.0
    if make_bus.name == "kafka":
        assert max(others) < tries[-1], "other partitions went on meanwhile"
    [letter] = await dead_letters(make_bus, group="g", topics=["orders"])
    assert letter.topic == "orders" and "cannot handle this one" in letter.error
    assert Event.from_json(letter.payload).data == {"n": 0}
    if make_bus.name == "kafka":
        # The raw message, with where it came from: its trace and its place in the topic.
        assert letter.headers["traceparent"] == trace.traceparent.encode()
        assert letter.headers[DLQ_GROUP] == b"g" and letter.headers[DLQ_OFFSET] == b"0"


async def test_a_handler_that_hangs_is_given_up_on_and_the_topic_moves_on(
    make_bus: Backend,
) -> None:
    handled: list[int] = []

    async def handler(event: Event) -> None:
        if event.data["n"] == 0:
            await asyncio.sleep(3600)
        handled.append(int(event.data["n"]))

    policy = RetryPolicy(max_attempts=2, backoff_s=0.01, handler_timeout_s=0.1)
    async with make_bus(retry=policy) as bus:
        bus.subscribe("orders", group="g", handler=handler)
        await bus.publish("orders", [_event("A", 0), _event("A", 1)])
        await bus.start()
        await _until(lambda: handled == [1])
    [letter] = await dead_letters(make_bus, group="g", topics=["orders"])
    assert "TimeoutError" in letter.error


async def test_an_envelope_that_is_not_cloudevents_is_set_aside_at_once(
    make_bus: Backend,
) -> None:
    recorder = Recorder()
    patient = RetryPolicy(backoff_s=30.0, backoff_max_s=30.0)  # a retry would time the test out
    async with make_bus(retry=patient) as bus:
        await bus.publish("orders", [_event("A", 1)])
        await append_raw(make_bus, topic="orders", key="A", payload=b'{"hello": 1}')
        bus.subscribe("orders", group="g", handler=recorder)
        await bus.publish("orders", [_event("A", 3)])
        await bus.start()
        await _until(lambda: recorder.numbers() == [1, 3])
    [letter] = await dead_letters(make_bus, group="g", topics=["orders"])
    assert letter.payload == '{"hello": 1}' and "CloudEvents" in letter.error


async def test_dead_letters_can_be_replayed_to_their_group(make_bus: Backend) -> None:
    """After the outage is fixed, an operator puts a group's dead letters back: the group
    handles them; the other groups see the same event id again (their inbox drops it)."""
    broken = {1, 99}
    mail: list[Event] = []
    audit = Recorder()

    async def send_mail(event: Event) -> None:
        if event.data["n"] in broken:
            raise ConnectionError("mail relay refuses us")
        mail.append(event)

    async def dead_mail() -> list[DeadLetter]:
        return await dead_letters(make_bus, group="mail", topics=["orders", "products"])

    async with make_bus(retry=RetryPolicy(max_attempts=2, backoff_s=0.01)) as bus:
        bus.subscribe("orders", group="mail", handler=send_mail)
        bus.subscribe("products", group="mail", handler=send_mail)
        bus.subscribe("orders", group="audit", handler=audit)
        await bus.start()
        await bus.publish("orders", [_event("A", n) for n in range(3)])
        await bus.publish("products", [_event("P", 99)])
        await _until(lambda: len(audit.seen) == 3 and len(mail) == 2)
        await _caught_up(bus, "products", group="mail")
        assert [int(e.data["n"]) for e in mail] == [0, 2]
        assert [d.topic for d in await dead_mail()] == ["orders", "products"]

        broken.clear()
        assert isinstance(bus, DeadLetterReplay)
        replay = bus.replay_dead_letters
        assert await replay(group="audit") == 0
        status, output = await run_module(
            "shop.platform.buses",
            "replay",
            "--url",
            make_bus.url,
            "--group",
            "mail",
            "--topic",
            "orders",
        )
        assert (status, output) == (0, "replayed 1 dead letter(s) of group mail on orders\n")
        await _until(lambda: len(mail) == 3 and len(audit.seen) == 4)
        assert [int(e.data["n"]) for e in mail] == [0, 2, 1]
        assert audit.seen[3].id == audit.seen[1].id, "the same event, for the inbox to drop"
        assert [d.topic for d in await dead_mail()] == ["products"]
        assert await replay(group="mail") == 1
        await _until(lambda: len(mail) == 4)
        assert await dead_mail() == []
        assert await replay(group="mail") == 0, "a dead letter is replayed once"


async def test_the_factory_applies_the_configured_retry_policy(make_bus: Backend) -> None:
    calls: list[int] = []

    async def handler(event: Event) -> None:
        calls.append(int(event.data["n"]))
        if event.data["n"] == 0:
            raise ValueError("never works")

    policy = RetryPolicy(max_attempts=2, backoff_s=0.01, backoff_max_s=0.01)
    async with open_event_bus(
        make_bus.url, client_id="configured", retry=policy, settings=_settings()
    ) as bus:
        await bus.ping()
        bus.subscribe("orders", group="g", handler=handler)
        await bus.publish("orders", [_event("A", 0), _event("A", 1)])
        await bus.start()
        await _until(lambda: calls == [0, 0, 1])
        await _caught_up(bus, "orders", group="g")


def test_an_unknown_bus_url_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    async def open_unknown() -> None:
        async with open_event_bus("carrier-pigeon://coop", client_id="x"):
            pass

    with pytest.raises(ValueError, match="carrier-pigeon"):
        asyncio.run(open_unknown())
    with pytest.raises(SystemExit) as exit_:
        bus_cli(["replay", "--url", "carrier-pigeon://coop", "--group", "g"])
    assert exit_.value.code == 2
    assert "carrier-pigeon" in capsys.readouterr().err


# --- Kafka only: connection and security settings ------------------------------------------


async def test_an_unreachable_broker_fails_publish_and_readiness() -> None:
    async with open_event_bus(
        f"kafka://127.0.0.1:{free_port()}", client_id="lonely", settings=_settings()
    ) as bus:
        with pytest.raises(KafkaConnectionError):
            await bus.publish("orders", [_event("A", 1)])
        with pytest.raises(KafkaConnectionError):
            await bus.ping()


def _certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate and its key, as a broker's CA and a client's identity."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shop-test-ca")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "ca.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_kafka_security_settings_reach_every_client(tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path)
    settings = PlatformSettings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="order-service",
        kafka_sasl_password="s3cret",
        kafka_ssl_cafile=cert,
        kafka_ssl_certfile=cert,
        kafka_ssl_keyfile=key,
    )
    bus = KafkaEventBus("broker-1:9093,broker-2:9093", client_id="order-service", settings=settings)
    options = bus.client_options
    assert options["security_protocol"] == "SASL_SSL"
    assert (options["sasl_mechanism"], options["sasl_plain_username"]) == (
        "SCRAM-SHA-512",
        "order-service",
    )
    assert options["sasl_plain_password"] == "s3cret"
    context_: ssl.SSLContext = options["ssl_context"]
    assert context_.verify_mode == ssl.CERT_REQUIRED and context_.check_hostname
    [ca] = context_.get_ca_certs()
    assert ca["subject"] == ((("commonName", "shop-test-ca"),),)
    producer = AIOKafkaProducer(**options)
    consumer = bus.new_consumer(group="g")
    try:
        for client in (producer.client, consumer._client):
            assert client._security_protocol == "SASL_SSL"
            assert client._sasl_mechanism == "SCRAM-SHA-512"
            assert client._sasl_plain_username == "order-service"
            assert client._ssl_context is context_
    finally:
        await producer.stop()
        await consumer.stop()


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        ({"kafka_security_protocol": "SASL_PLAINTEXT"}, "SASL_USERNAME"),
        ({"kafka_sasl_username": "order-service"}, "protocol is PLAINTEXT"),
        ({"kafka_ssl_cafile": Path("ca.pem")}, "protocol is PLAINTEXT"),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_keyfile": Path("key.pem")},
            "needs SHOP_KAFKA_SSL_CERTFILE",
        ),
    ],
)
def test_kafka_security_settings_that_would_be_ignored_are_refused(
    settings: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ValueError, match=complaint):
        client_options(PlatformSettings(**settings))


def test_a_kafka_url_names_its_brokers() -> None:
    assert bootstrap_servers("kafka://k1:9092,k2:9092/") == "k1:9092,k2:9092"
    for url in ("kafka://", "mysql://db:3306"):
        with pytest.raises(ValueError, match="not a Kafka URL"):
            bootstrap_servers(url)
