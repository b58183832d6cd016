"""The Kafka event bus (``SHOP_EVENT_BUS_URL=kafka://host:9092[,host2:9092]``), on aiokafka.

- Publish: key = the event's ``subject``, value = its CloudEvents JSON, ``traceparent`` in a
  header too; ``acks=all``; ``publish`` returns once the broker has every event.
- Consume: one consumer per group; its offset is committed by hand after each event whose
  handler succeeded (after each poll's events of a partition for a batch subscriber), so a
  crash redelivers at most the events in hand. Partitions are
  handled concurrently, each strictly in order.
- A failing handler gets the same event again after a back-off, during which only its
  partition is paused (the poll loop and the other partitions go on); after
  ``max_attempts`` the raw message goes to the group's dead-letter topic
  ``<topic>.<group>.dlq`` and the partition moves on. ``replay_dead_letters`` puts them back.
- On a rebalance the events in hand finish (within a grace period) before the partitions
  are given up, so a hand-over repeats nothing it need not.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    TopicAlreadyExistsError,
    for_code,
)
from aiokafka.helpers import create_ssl_context

from shop.platform import context, telemetry
from shop.platform.events import (
    BatchHandler,
    Event,
    Handler,
    MalformedEvent,
    RetryPolicy,
    hand_together,
)
from shop.platform.settings import PlatformSettings

__all__ = [
    "DEAD_LETTER_HEADERS",
    "KafkaEventBus",
    "bootstrap_servers",
    "client_options",
    "dead_letter_topic",
    "from_url",
]

log = logging.getLogger("shop.events")

T = TypeVar("T")
Headers = Sequence[tuple[str, bytes]]

TRACEPARENT = "traceparent"
RECONNECT_S = 1.0
# How long a fetch waits for new events. Kafka answers as soon as one arrives; tansu (the
# test broker) waits it out, so aiokafka's 500 ms would be the latency of every event.
FETCH_MAX_WAIT_MS = 100
# Where a dead letter came from and why, on the message in the dead-letter topic.
DLQ_TOPIC = "shop.dlq.topic"
DLQ_PARTITION = "shop.dlq.partition"
DLQ_OFFSET = "shop.dlq.offset"
DLQ_GROUP = "shop.dlq.group"
DLQ_ERROR = "shop.dlq.error"
DLQ_ATTEMPTS = "shop.dlq.attempts"
DLQ_FAILED_AT = "shop.dlq.failed_at"
DEAD_LETTER_HEADERS = (
    DLQ_TOPIC,
    DLQ_PARTITION,
    DLQ_OFFSET,
    DLQ_GROUP,
    DLQ_ERROR,
    DLQ_ATTEMPTS,
    DLQ_FAILED_AT,
)


def dead_letter_topic(topic: str, group: str) -> str:
    """Where ``group`` sets aside the events of ``topic`` it gave up on."""
    return f"{topic}.{group}.dlq"


def bootstrap_servers(url: str) -> str:
    """``kafka://h1:9092,h2:9092`` -> ``h1:9092,h2:9092``."""
    scheme, _, rest = url.partition("://")
    hosts = [host.strip() for host in rest.strip("/").split(",") if host.strip()]
    if scheme.lower() != "kafka" or not hosts:
        raise ValueError(f"not a Kafka URL: {url!r} (expected kafka://host:9092[,host2:9092])")
    return ",".join(hosts)


def client_options(settings: PlatformSettings) -> dict[str, Any]:
    """The security options every aiokafka client of the bus gets, from ``SHOP_KAFKA_*``
    (whose coherence ``PlatformSettings`` has checked: nothing given is left unused)."""
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        # No cafile: the system's CAs verify the brokers; the host name is always checked.
        options["ssl_context"] = create_ssl_context(
            cafile=settings.kafka_ssl_cafile,
            certfile=settings.kafka_ssl_certfile,
            keyfile=settings.kafka_ssl_keyfile,
        )
    if protocol.startswith("SASL_") and settings.kafka_sasl_password is not None:
        options.update(
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_plain_username=settings.kafka_sasl_username,
            sasl_plain_password=settings.kafka_sasl_password.get_secret_value(),
        )
    return options


def from_url(
    url: str,
    *,
    client_id: str,
    retry: RetryPolicy,
    settings: PlatformSettings | None = None,
) -> KafkaEventBus:
    """The factory ``shop.platform.buses`` names for ``kafka://`` URLs."""
    return KafkaEventBus(
        bootstrap_servers(url), client_id=client_id, retry=retry, settings=settings
    )


def _header(headers: Headers | None, name: str) -> bytes | None:
    for key, value in headers or ():
        if key == name:
            return value
    return None


def _without_dead_letter_headers(headers: Headers | None) -> list[tuple[str, bytes]]:
    return [(k, v) for k, v in headers or () if k not in DEAD_LETTER_HEADERS]


async def _started(client: Any) -> Any:
    """Start an aiokafka client; one that failed to start is closed, not leaked."""
    try:
        await client.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await (client.close() if isinstance(client, AIOKafkaAdminClient) else client.stop())
        raise
    return client


@dataclass(frozen=True, slots=True)
class _Message:
    key: bytes | None
    value: bytes | None
    headers: Headers


@dataclass(frozen=True, slots=True)
class _Retry:
    """A partition's event in trouble: tried ``attempts`` times, next try not before."""

    offset: int
    attempts: int
    not_before: float
    error: str


class KafkaEventBus:
    def __init__(
        self,
        bootstrap_servers: str,
        *,
        client_id: str,
        retry: RetryPolicy | None = None,
        settings: PlatformSettings | None = None,
        grace_s: float = 5.0,
        session_timeout_ms: int = 6_000,
        heartbeat_interval_ms: int = 1_000,
    ) -> None:
        self._settings = settings or PlatformSettings()
        self._options: Mapping[str, Any] = MappingProxyType(
            {
                "bootstrap_servers": bootstrap_servers,
                "client_id": client_id,
                **client_options(self._settings),
            }
        )
        self._retry = retry or RetryPolicy()
        self._grace_s = grace_s
        # Short on purpose: a dead member is noticed within seconds, and Kafka-protocol
        # brokers such as tansu make a first join wait longer with longer timeouts.
        self._session_timeout_ms = session_timeout_ms
        self._heartbeat_interval_ms = heartbeat_interval_ms
        self._subscriptions: dict[str, dict[str, Handler]] = {}
        self._batch_subscriptions: dict[str, dict[str, BatchHandler]] = {}
        self._consumers: list[_GroupConsumer] = []
        self._stopping = asyncio.Event()
        self._connecting = asyncio.Lock()
        self._creating_topics = asyncio.Lock()
        self._reading_offsets = asyncio.Lock()
        self._producer: Any = None
        self._admin: Any = None
        self._readers: dict[str | None, Any] = {}
        self._known_topics: set[str] = set()

    @property
    def client_options(self) -> Mapping[str, Any]:
        """What every aiokafka client of this bus is built with (servers, id, security)."""
        return self._options

    @property
    def retry(self) -> RetryPolicy:
        return self._retry

    @property
    def grace_s(self) -> float:
        """How long events in hand may take to finish when the bus closes or a rebalance
        takes partitions away."""
        return self._grace_s

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # --- publishing ---------------------------------------------------------------------

    async def publish(self, topic: str, events: Sequence[Event]) -> None:
        if not events:
            return
        await self.ensure_topics([topic])
        await self._send(
            topic,
            [
                _Message(
                    key=event.key.encode(),
                    value=event.to_json().encode(),
                    headers=[(TRACEPARENT, event.traceparent.encode())]
                    if event.traceparent
                    else [],
                )
                for event in events
            ],
        )

    async def _send(self, topic: str, messages: Sequence[_Message]) -> None:
        """Send every message, then wait for all: the broker has them all, or this raises.

        Without idempotence the producer still keeps one batch in flight per partition, so
        a retried batch cannot overtake the next one and order per key holds.
        """
        producer = await self._producer_started()
        delivered: list[asyncio.Future[Any]] = []
        try:
            for message in messages:
                delivered.append(
                    await producer.send(
                        topic,
                        key=message.key,
                        value=message.value,
                        headers=list(message.headers),
                    )
                )
        finally:
            outcomes = await asyncio.gather(*delivered, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _producer_started(self) -> Any:
        async with self._connecting:
            if self._producer is None:
                self._producer = await _started(
                    AIOKafkaProducer(
                        **self._options,
                        acks="all",
                        enable_idempotence=self._settings.kafka_idempotent_producer,
                    )
                )
            return self._producer

    async def _admin_started(self) -> Any:
        async with self._connecting:
            if self._admin is None:
                self._admin = await _started(AIOKafkaAdminClient(**self._options))
            return self._admin

    async def ensure_topics(self, topics: Iterable[str]) -> None:
        """Create the topics that do not exist yet, with the configured partitions.

        Asked of the topic list first, not of a topic's metadata: a metadata request may
        make the broker create the topic with its own defaults.
        """
        missing = set(topics) - self._known_topics
        if not missing:
            return
        async with self._creating_topics:
            admin = await self._admin_started()
            absent = sorted(missing - set(await admin.list_topics()))
            if absent:
                answer = await admin.create_topics(
                    [
                        NewTopic(
                            name=name,
                            num_partitions=self._settings.kafka_partitions,
                            replication_factor=self._settings.kafka_replication_factor,
                        )
                        for name in absent
                    ]
                )
                for name, code, *details in answer.topic_errors:
                    if code not in (0, TopicAlreadyExistsError.errno):
                        raise for_code(code)(f"could not create topic {name}: {details}")
                log.info("created topics %s", ", ".join(absent))
            self._known_topics |= missing

    # --- consuming ----------------------------------------------------------------------

    def subscribe(self, topic: str, *, group: str, handler: Handler) -> None:
        if self._consumers:
            raise RuntimeError("subscribe before start()")
        if "." in group:
            # Keeps ``<topic>.<group>.dlq`` unambiguous when dead letters are replayed.
            raise ValueError(f"a Kafka consumer group name has no dots: {group!r}")
        handlers = self._subscriptions.setdefault(group, {})
        if topic in handlers:
            raise ValueError(f"group {group!r} already subscribes to {topic!r}")
        handlers[topic] = handler

    def subscribe_batches(
        self, topic: str, *, group: str, handler: Handler, batch_handler: BatchHandler
    ) -> None:
        """``subscribe``, with each poll's events of a partition handed to
        ``batch_handler`` together and committed once (``BatchDelivery``)."""
        self.subscribe(topic, group=group, handler=handler)
        self._batch_subscriptions.setdefault(group, {})[topic] = batch_handler

    async def start(self) -> None:
        """Start one consumer per group in the background; each connects (and reconnects)
        on its own, so a broker that is down at start-up delays consumption, not the app."""
        for group, handlers in self._subscriptions.items():
            consumer = _GroupConsumer(
                self,
                group=group,
                handlers=dict(handlers),
                batch_handlers=dict(self._batch_subscriptions.get(group, {})),
            )
            consumer.start()
            self._consumers.append(consumer)

    def assigned(self, group: str) -> frozenset[tuple[str, int]]:
        """The (topic, partition) pairs this process consumes for ``group`` right now."""
        return frozenset(
            (tp.topic, tp.partition)
            for consumer in self._consumers
            if consumer.group == group
            for tp in consumer.assignment()
        )

    def new_consumer(self, *, group: str | None, **options: Any) -> Any:
        """An aiokafka consumer with this bus's connection and security options."""
        return AIOKafkaConsumer(
            **self._options,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=self._session_timeout_ms,
            heartbeat_interval_ms=self._heartbeat_interval_ms,
            **{"fetch_max_wait_ms": FETCH_MAX_WAIT_MS, **options},
        )

    async def wait_stopping(self, seconds: float) -> None:
        """Sleep, but wake at once when the bus is closing."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    async def dead_letter(self, message: Any, *, group: str, error: str, attempts: int) -> None:
        """Set the raw message aside on the group's dead-letter topic, saying where it came
        from and why."""
        topic = dead_letter_topic(message.topic, group)
        await self.ensure_topics([topic])
        headers = [
            *_without_dead_letter_headers(message.headers),
            (DLQ_TOPIC, message.topic.encode()),
            (DLQ_PARTITION, str(message.partition).encode()),
            (DLQ_OFFSET, str(message.offset).encode()),
            (DLQ_GROUP, group.encode()),
            (DLQ_ERROR, error[:2000].encode()),
            (DLQ_ATTEMPTS, str(attempts).encode()),
            (DLQ_FAILED_AT, f"{time.time():.3f}".encode()),
        ]
        await self._send(topic, [_Message(message.key, message.value, headers)])

    # --- operations ---------------------------------------------------------------------

    async def ping(self, *, timeout_s: float = 1.5) -> None:
        """Raise unless the cluster answers a metadata request within ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            admin = await self._admin_started()
            await admin.describe_cluster()

    async def pending(self, topic: str, *, group: str) -> int:
        """How many events of ``topic`` the group has not committed (its lag), summed over
        partitions; a group that never committed counts from the start of the topic."""
        partitions = await self._partitions(topic)
        if not partitions:
            return 0
        async with self._reading_offsets:
            reader = await self._reader(group)
            committed = {tp: await reader.committed(tp) for tp in partitions}
            ends = await self._end_offsets(partitions)
            unread = [tp for tp in partitions if committed[tp] is None]
            starts = await reader.beginning_offsets(unread) if unread else {}
        return sum(
            max(int(ends[tp]) - int(starts[tp] if committed[tp] is None else committed[tp]), 0)
            for tp in partitions
        )

    async def dead_letters(self, topic: str, *, group: str) -> int:
        """How many of ``topic``'s events the group set aside and has not replayed: the end
        of ``<topic>.<group>.dlq`` minus where ``replay_dead_letters`` left off (its group's
        commit), or minus its beginning before any replay; read by the operator metrics
        (platform/observe.py), as ``SqliteEventLog.dead_letters``."""
        return await self.pending(dead_letter_topic(topic, group), group=f"{group}.dlq-replay")

    async def _partitions(self, topic: str) -> list[TopicPartition]:
        admin = await self._admin_started()
        for described in await admin.describe_topics():
            if described["topic"] == topic:
                numbers = sorted(int(p["partition"]) for p in described["partitions"])
                return [TopicPartition(topic, n) for n in numbers]
        return []

    async def _reader(self, group: str | None) -> Any:
        """A consumer that only reads offsets: of ``group``'s commits (it never joins the
        group nor consumes for it), or with no group, of the partitions' ends."""
        if group not in self._readers:
            self._readers[group] = await _started(self.new_consumer(group=group))
        return self._readers[group]

    async def _end_offsets(
        self, partitions: list[TopicPartition], *, timeout_s: float = 5.0
    ) -> dict[TopicPartition, int]:
        """Each partition's end (the offset the next event gets).

        Read from the high watermark of a fetch of the last batch, not from ListOffsets
        alone: tansu (the test broker) answers ListOffsets with the last batch's first
        offset + 1, which is short when that batch holds several events. The probe has no
        group: aiokafka's group coordinator does not survive a user assignment that comes
        and goes.
        """
        probe = await self._reader(None)
        listed: dict[TopicPartition, int] = await probe.end_offsets(partitions)
        probed = [tp for tp in partitions if listed[tp] > 0]
        if not probed:
            return listed
        probe.assign(probed)
        try:
            for tp in probed:
                probe.seek(tp, listed[tp] - 1)
            async with asyncio.timeout(timeout_s):
                while any(probe.highwater(tp) is None for tp in probed):
                    await probe.getmany(*probed, timeout_ms=50)
            return {**listed, **{tp: max(listed[tp], int(probe.highwater(tp))) for tp in probed}}
        finally:
            probe.unsubscribe()

    async def replay_dead_letters(self, *, group: str, topic: str | None = None) -> int:
        """Re-publish the group's dead letters to their topics and consume them off the
        dead-letter topics; how many.

        Each keeps its key, value and event id, so the topic's other groups drop it through
        their inbox. The dead-letter topics are read by a group of their own
        (``<group>.dlq-replay``) that commits after each re-publish: a replay that dies
        half-way repeats at most one event and never loses one.
        """
        if "." in group:
            raise ValueError(f"a Kafka consumer group name has no dots: {group!r}")
        admin = await self._admin_started()
        existing = set(await admin.list_topics())
        wanted = (
            {dead_letter_topic(topic, group)}
            if topic is not None
            else {name for name in existing if name.endswith(f".{group}.dlq")}
        )
        sources = sorted(wanted & existing)
        partitions = [tp for source in sources for tp in await self._partitions(source)]
        if not partitions:
            return 0
        consumer = await _started(self.new_consumer(group=f"{group}.dlq-replay"))
        replayed = 0
        try:
            # Only what is there now: a group still failing may set the replayed events
            # aside again meanwhile, and those wait for the next replay.
            async with self._reading_offsets:
                ends = await self._end_offsets(partitions)
            consumer.assign(partitions)
            for tp in partitions:
                while await consumer.position(tp) < ends[tp]:
                    batch = await consumer.getmany(tp, timeout_ms=200)
                    for message in batch.get(tp, []):
                        if message.offset >= ends[tp]:
                            break
                        await self._put_back(message)
                        await consumer.commit({tp: message.offset + 1})
                        replayed += 1
            return replayed
        finally:
            await consumer.stop()

    async def _put_back(self, dead_letter: Any) -> None:
        original = _header(dead_letter.headers, DLQ_TOPIC)
        if original is None:
            raise ValueError(f"{dead_letter.topic}@{dead_letter.offset} has no {DLQ_TOPIC} header")
        topic = original.decode()
        await self.ensure_topics([topic])
        headers = _without_dead_letter_headers(dead_letter.headers)
        await self._send(topic, [_Message(dead_letter.key, dead_letter.value, headers)])

    async def close(self, *, grace_s: float | None = None) -> None:
        """Let consumers finish the events in hand (within ``grace_s``, by default the
        bus's), then stop; cancel only what hangs.

        An event whose handler had not finished is not committed: it comes again.
        """
        if grace_s is not None:
            self._grace_s = grace_s
        self._stopping.set()
        consumers, self._consumers = self._consumers, []
        if consumers:
            # Each drains within the grace period, then leaves its group (one request).
            await asyncio.gather(*(c.stop() for c in consumers))
        clients = [*self._readers.values(), self._producer]
        self._readers.clear()
        self._producer = None
        admin, self._admin = self._admin, None
        for client in clients:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
        if admin is not None:
            with contextlib.suppress(Exception):
                await admin.close()


class _Handover:
    """The group's rebalance listener: events in hand finish before partitions leave."""

    def __init__(self, consumer: _GroupConsumer) -> None:
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._consumer.hand_over(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        log.info(
            "group %s consumes %s",
            self._consumer.group,
            ", ".join(f"{tp.topic}/{tp.partition}" for tp in sorted(assigned)) or "nothing",
        )


# aiokafka checks isinstance; registering keeps mypy from subclassing an untyped class.
ConsumerRebalanceListener.register(_Handover)


class _GroupConsumer:
    """One consumer group's member in this process: a poll loop and a worker per partition.

    The poll loop never waits for handlers. A partition with events in hand is paused, so
    the next poll brings none of its events, until its worker finishes the batch and
    resumes it; a worker whose event failed seeks back to it and resumes only after the
    back-off. So a slow or failing partition never holds up the others or the poll loop
    (whose pauses aiokafka's ``max_poll_interval`` watches).
    """

    def __init__(
        self,
        bus: KafkaEventBus,
        *,
        group: str,
        handlers: dict[str, Handler],
        batch_handlers: dict[str, BatchHandler],
    ) -> None:
        self._bus = bus
        self.group = group
        self._handlers = handlers
        self._batch_handlers = batch_handlers
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._workers: dict[TopicPartition, asyncio.Task[None]] = {}
        self._resumes: dict[TopicPartition, asyncio.TimerHandle] = {}
        self._retries: dict[TopicPartition, _Retry] = {}
        self._handing_over: set[TopicPartition] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"kafka-consume-{self.group}")

    def assignment(self) -> frozenset[TopicPartition]:
        if self._consumer is None:
            return frozenset()
        return frozenset(self._consumer.assignment())

    async def stop(self) -> None:
        if self._task is None:
            return
        # The run loop drains its workers within the grace period, then leaves the group.
        done, _ = await asyncio.wait([self._task], timeout=self._bus.grace_s + 10.0)
        if not done:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None

    async def _run(self) -> None:
        topics = sorted(self._handlers)
        dead_letters = [dead_letter_topic(t, self.group) for t in topics]
        while not self._bus.stopping:
            consumer = None
            try:
                await self._bus.ensure_topics([*topics, *dead_letters])
                consumer = self._bus.new_consumer(
                    group=self.group,
                    # Bounds how long the group waits for this member to hand over.
                    rebalance_timeout_ms=int((self._bus.grace_s + 10) * 1000),
                )
                consumer.subscribe(topics, listener=_Handover(self))
                self._consumer = consumer
                if await self._unless_stopping(consumer.start()):
                    await self._poll(consumer)
            except KafkaError as exc:
                log.warning("consumer group %s: %r; reconnecting", self.group, exc)
                await self._bus.wait_stopping(RECONNECT_S)
            except Exception:
                log.exception("consumer group %s failed; reconnecting", self.group)
                await self._bus.wait_stopping(RECONNECT_S)
            finally:
                await self._drain(grace_s=self._bus.grace_s)
                if consumer is not None:
                    with contextlib.suppress(Exception):
                        await consumer.stop()
                self._consumer = None

    async def _unless_stopping(self, step: Awaitable[T]) -> bool:
        """Await ``step`` unless the bus starts closing first (a join can take seconds)."""
        work = asyncio.ensure_future(step)
        closing = asyncio.ensure_future(self._bus.wait_stopping(3600.0))
        try:
            await asyncio.wait([work, closing], return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            return False
        work.result()
        return True

    async def _poll(self, consumer: Any) -> None:
        while not self._bus.stopping:
            batch = await consumer.getmany(timeout_ms=200)
            for tp, messages in batch.items():
                # No await between the poll and here: a rebalance cannot slip in between.
                consumer.pause(tp)
                worker = asyncio.create_task(
                    self._work(consumer, tp, messages), name=f"kafka-{self.group}-{tp}"
                )
                self._workers[tp] = worker
                worker.add_done_callback(functools.partial(self._forget, tp))

    def _forget(self, tp: TopicPartition, worker: asyncio.Task[None]) -> None:
        if self._workers.get(tp) is worker:
            del self._workers[tp]

    async def _drain(self, *, grace_s: float, only: set[TopicPartition] | None = None) -> None:
        """Let the workers (of ``only``, or all) finish the event in hand; cancel the rest."""
        for tp in list(self._resumes):
            if only is None or tp in only:
                self._resumes.pop(tp).cancel()
        workers = [w for tp, w in self._workers.items() if only is None or tp in only]
        if not workers:
            return
        _, hanging = await asyncio.wait(workers, timeout=grace_s)
        for worker in hanging:
            worker.cancel()
        for worker in hanging:
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    async def hand_over(self, revoked: set[TopicPartition]) -> None:
        """Partitions are leaving: finish the events in hand (bounded), commit, let go."""
        self._handing_over |= revoked
        try:
            await self._drain(grace_s=self._bus.grace_s, only=revoked)
        finally:
            self._handing_over -= revoked

    def _may_continue(self, tp: TopicPartition) -> bool:
        return not self._bus.stopping and tp not in self._handing_over

    async def _work(self, consumer: Any, tp: TopicPartition, messages: list[Any]) -> None:
        """Handle one partition's batch in order; resume the partition when done.

        A batch subscriber gets the events together and one commit; what it cannot take,
        and every event of a batch it failed on, goes one at a time."""
        batch_handler = self._batch_handlers.get(tp.topic)
        index = 0
        while index < len(messages):
            if not self._may_continue(tp):
                return  # whoever consumes it next starts from the last commit
            together = self._together(tp, messages, index) if batch_handler is not None else []
            if (
                batch_handler is not None
                and together
                and await self._deliver_together(tp, batch_handler, together)
            ):
                index += len(together)
                if not await self._commit(consumer, tp, messages[index - 1]):
                    return
                continue
            count = max(len(together), 1)
            for message in messages[index : index + count]:
                if not await self._one(consumer, tp, message):
                    return
            index += count
        if self._may_continue(tp):
            self._resume(consumer, tp)

    async def _one(self, consumer: Any, tp: TopicPartition, message: Any) -> bool:
        """Deliver one event and commit it; False if the partition's batch stops here."""
        if not self._may_continue(tp):
            return False
        retry = self._retries.get(tp)
        if retry is not None and retry.offset == message.offset:
            wait = retry.not_before - asyncio.get_running_loop().time()
            if wait > 0:  # fetched again early (a rebalance gave it back): keep waiting
                self._retry_later(consumer, tp, offset=message.offset, delay=wait)
                return False
        try:
            delay = await self._deliver(tp, message)
        except Exception:
            log.exception("group %s could not finish %s@%d", self.group, tp, message.offset)
            delay = self._bus.retry.backoff_s
        if delay is not None:
            self._retry_later(consumer, tp, offset=message.offset, delay=delay)
            return False
        return await self._commit(consumer, tp, message)

    async def _commit(self, consumer: Any, tp: TopicPartition, last: Any) -> bool:
        """Commit the partition up to ``last``; False if the group moved on without us."""
        try:
            await consumer.commit({tp: last.offset + 1})
        except (CommitFailedError, IllegalStateError) as exc:
            # The group moved on without us: the new owner starts from the last commit.
            log.warning("group %s lost %s before committing it: %r", self.group, tp, exc)
            return False
        return True

    def _together(
        self, tp: TopicPartition, messages: list[Any], start: int
    ) -> list[tuple[Any, Event]]:
        """The events from ``messages[start]`` on that a batch handler takes together: up to
        the first one being retried or that is not a readable envelope."""
        retry = self._retries.get(tp)
        together: list[tuple[Any, Event]] = []
        for message in messages[start:]:
            if retry is not None and retry.offset == message.offset:
                break
            try:
                together.append((message, Event.from_json(message.value or b"")))
            except MalformedEvent:
                break
        return together

    async def _deliver_together(
        self, tp: TopicPartition, batch_handler: BatchHandler, together: list[tuple[Any, Event]]
    ) -> bool:
        """Hand the events to the batch handler; False if it failed (they then go one at a
        time). Each event's consumer span covers the whole call."""
        events = []
        for message, event in together:
            header = _header(message.headers, TRACEPARENT)
            sent = event.traceparent or (header.decode() if header else None)
            events.append((event, context.parse_traceparent(sent)))
        try:
            await hand_together(
                batch_handler,
                events,
                system="kafka",
                topic=tp.topic,
                group=self.group,
                timeout_s=self._bus.retry.handler_timeout_s,
            )
            return True
        except Exception as exc:
            log.warning(
                "%s failed on a batch of %d events of %s: %r; one at a time now",
                self.group,
                len(together),
                tp,
                exc,
            )
            return False

    def _retry_later(self, consumer: Any, tp: TopicPartition, *, offset: int, delay: float) -> None:
        try:
            consumer.seek(tp, offset)
        except IllegalStateError:
            return  # no longer ours
        if self._may_continue(tp):
            loop = asyncio.get_running_loop()
            self._resumes[tp] = loop.call_later(delay, self._resume, consumer, tp)

    def _resume(self, consumer: Any, tp: TopicPartition) -> None:
        self._resumes.pop(tp, None)
        if self._may_continue(tp) and tp in consumer.assignment():
            consumer.resume(tp)

    async def _deliver(self, tp: TopicPartition, message: Any) -> float | None:
        """Hand the event to its handler: None once it is done with (handled or set aside),
        else how long to wait before the next attempt."""
        try:
            event = Event.from_json(message.value or b"")
        except MalformedEvent as exc:
            # No retry can make it readable.
            await self._bus.dead_letter(message, group=self.group, error=str(exc), attempts=0)
            return None
        retry = self._bus.retry
        previous = self._retries.get(tp)
        if previous is None or previous.offset != message.offset:
            previous = None
        attempts = previous.attempts if previous else 0
        if previous is not None and attempts >= retry.max_attempts:
            # Given up on already; only setting it aside failed last time.
            await self._set_aside(tp, message, error=previous.error, attempts=attempts)
            return None
        header = _header(message.headers, TRACEPARENT)
        span = telemetry.consuming(
            system="kafka",
            topic=tp.topic,
            group=self.group,
            event_id=event.id,
            parent=context.parse_traceparent(
                event.traceparent or (header.decode() if header else None)
            ),
        )
        try:
            # A handler that hangs would hold its partition for ever.
            async with asyncio.timeout(retry.handler_timeout_s):
                await self._handlers[tp.topic](event)
        except Exception as exc:
            attempts += 1
            delay = retry.delay_after(attempts)
            self._retries[tp] = _Retry(
                offset=message.offset,
                attempts=attempts,
                not_before=asyncio.get_running_loop().time() + delay,
                error=repr(exc),
            )
            if attempts >= retry.max_attempts:
                log.exception(
                    "%s gave up on event %s (%s) after %d attempts",
                    self.group,
                    event.id,
                    event.type,
                    attempts,
                )
                await self._set_aside(tp, message, error=repr(exc), attempts=attempts)
                return None
            log.warning(
                "%s failed on event %s (attempt %d): %r", self.group, event.id, attempts, exc
            )
            return delay
        finally:
            if span is not None:
                span.end()
        self._retries.pop(tp, None)
        return None

    async def _set_aside(
        self, tp: TopicPartition, message: Any, *, error: str, attempts: int
    ) -> None:
        await self._bus.dead_letter(message, group=self.group, error=error, attempts=attempts)
        self._retries.pop(tp, None)
