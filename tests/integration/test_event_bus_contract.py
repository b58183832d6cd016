"""What every event bus promises, run against each implementation (the embedded log now).

Order per key, at-least-once delivery with redelivery after a failure or a crash, every
consumer group gets every event, and nothing is lost or repeated across a restart.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from shop.platform.eventlog import SqliteEventLog
from shop.platform.events import Event, EventBus, open_event_bus

LEASE_S = 1.0


@pytest.fixture(params=["sqlite"])
def bus_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'events.db'}"


@asynccontextmanager
async def open_bus(url: str, *, max_attempts: int = 8) -> AsyncIterator[EventBus]:
    """A bus tuned for tests: short leases and back-off, so take-over is quick."""
    bus = SqliteEventLog(
        url,
        client_id="test",
        lease_s=LEASE_S,
        retry_backoff_s=0.01,
        max_attempts=max_attempts,
    )
    try:
        yield bus
    finally:
        await bus.close()


def _event(key: str, n: int) -> Event:
    return Event(type="order.placed", source="/test", subject=key, data={"n": n})


async def _until(check: Callable[[], bool], *, within_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not check():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


class Recorder:
    def __init__(self, fail_first: int = 0) -> None:
        self.seen: list[Event] = []
        self.fail_first = fail_first
        self.calls = 0

    async def __call__(self, event: Event) -> None:
        self.calls += 1
        if self.calls <= self.fail_first:
            raise RuntimeError("handler failed")
        self.seen.append(event)

    def numbers(self, key: str | None = None) -> list[int]:
        return [int(e.data["n"]) for e in self.seen if key is None or e.subject == key]


async def test_events_arrive_whole_and_in_order_per_key(bus_url: str) -> None:
    recorder = Recorder()
    async with open_bus(bus_url) as bus:
        bus.subscribe("orders", group="g", handler=recorder)
        await bus.start()
        for n in range(30):
            await bus.publish("orders", [_event("A" if n % 3 else "B", n)])
        await _until(lambda: len(recorder.seen) == 30)
    assert recorder.numbers("A") == [n for n in range(30) if n % 3]
    assert recorder.numbers("B") == [n for n in range(30) if not n % 3]
    first = recorder.seen[0]
    assert first.to_dict()["specversion"] == "1.0" and first.key == "B"


async def test_a_failing_handler_gets_the_same_event_again_before_later_ones(bus_url: str) -> None:
    recorder = Recorder(fail_first=3)
    async with open_bus(bus_url) as bus:
        bus.subscribe("orders", group="g", handler=recorder)
        await bus.publish("orders", [_event("A", 1), _event("A", 2)])
        await bus.start()
        await _until(lambda: len(recorder.seen) == 2)
    assert recorder.numbers() == [1, 2]
    assert recorder.calls == 5


async def test_every_group_gets_every_event(bus_url: str) -> None:
    mail, audit = Recorder(), Recorder()
    async with open_bus(bus_url) as bus:
        bus.subscribe("orders", group="mail", handler=mail)
        bus.subscribe("orders", group="audit", handler=audit)
        bus.subscribe("products", group="audit", handler=audit)
        await bus.start()
        await bus.publish("orders", [_event("A", n) for n in range(5)])
        await bus.publish("products", [_event("P", 99)])
        await _until(lambda: len(mail.seen) == 5 and len(audit.seen) == 6)
    assert mail.numbers() == [0, 1, 2, 3, 4]
    assert sorted(audit.numbers()) == [0, 1, 2, 3, 4, 99]


async def test_a_restart_resumes_after_the_last_committed_event(bus_url: str) -> None:
    before, after = Recorder(), Recorder()
    async with open_bus(bus_url) as bus:
        bus.subscribe("orders", group="g", handler=before)
        await bus.start()
        await bus.publish("orders", [_event("A", n) for n in range(3)])
        await _until(lambda: len(before.seen) == 3)
    async with open_bus(bus_url) as bus:
        await bus.publish("orders", [_event("A", n) for n in range(3, 5)])
    async with open_bus(bus_url) as bus:
        bus.subscribe("orders", group="g", handler=after)
        await bus.start()
        await _until(lambda: len(after.seen) == 2)
        await asyncio.sleep(0.3)  # nothing already handled may come back
    assert after.numbers() == [3, 4]


async def test_a_poisoned_event_is_set_aside_and_the_topic_moves_on(bus_url: str) -> None:
    handled: list[int] = []

    async def handler(event: Event) -> None:
        if event.data["n"] == 1:
            raise ValueError("cannot handle this one")
        handled.append(int(event.data["n"]))

    async with open_bus(bus_url, max_attempts=3) as bus:
        bus.subscribe("orders", group="g", handler=handler)
        await bus.publish("orders", [_event("A", n) for n in range(3)])
        await bus.start()
        await _until(lambda: handled == [0, 2])


CRASHING_CONSUMER = textwrap.dedent(
    """
    import asyncio, os, sys
    from shop.platform.eventlog import SqliteEventLog

    url, out = sys.argv[1], sys.argv[2]

    async def handle(event):
        with open(out, "a") as f:
            f.write(f"{event.data['n']}\\n")
        if event.data["n"] == 2:
            os._exit(17)  # dies after the work, before the offset is committed

    async def main():
        bus = SqliteEventLog(url, client_id="crashy", lease_s=1.0)
        bus.subscribe("orders", group="g", handler=handle)
        await bus.start()
        await asyncio.sleep(30)

    asyncio.run(main())
    """
)


async def test_a_consumer_that_dies_mid_event_gets_it_again_elsewhere(
    bus_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "handled.txt"
    async with open_bus(bus_url) as bus:
        await bus.publish("orders", [_event("A", n) for n in range(5)])
    crashed = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_CONSUMER, bus_url, str(out)
    )
    assert await asyncio.wait_for(crashed.wait(), 30) == 17
    assert out.read_text().split() == ["0", "1", "2"]

    survivor = Recorder()
    async with open_bus(bus_url) as bus:
        bus.subscribe("orders", group="g", handler=survivor)
        await bus.start()  # takes over once the dead consumer's lease lapses
        await _until(lambda: len(survivor.seen) == 3)
    assert survivor.numbers() == [2, 3, 4], "the unfinished event comes again, nothing else"


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from shop.platform.eventlog import SqliteEventLog
    from shop.platform.events import Event

    url, key = sys.argv[1], sys.argv[2]

    async def main():
        bus = SqliteEventLog(url, client_id=key)
        for n in range(100):
            await bus.publish("orders", [Event(type="t", source="/w", subject=key, data={"n": n})])
        await bus.close()

    asyncio.run(main())
    """
)


async def test_processes_writing_at_once_lose_nothing_and_keep_their_order(bus_url: str) -> None:
    writers = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", WRITER, bus_url, key)
        for key in ("W1", "W2", "W3")
    ]
    assert [await asyncio.wait_for(w.wait(), 60) for w in writers] == [0, 0, 0]
    recorder = Recorder()
    async with open_bus(bus_url) as bus:
        bus.subscribe("orders", group="g", handler=recorder)
        await bus.start()
        await _until(lambda: len(recorder.seen) == 300, within_s=20)
    for key in ("W1", "W2", "W3"):
        assert recorder.numbers(key) == list(range(100))


async def test_the_factory_opens_the_embedded_log_from_its_url(bus_url: str) -> None:
    recorder = Recorder()
    async with open_event_bus(bus_url, client_id="factory") as bus:
        await bus.ping()
        bus.subscribe("orders", group="g", handler=recorder)
        await bus.start()
        await bus.publish("orders", [_event("A", 7)])
        await _until(lambda: recorder.numbers() == [7])


def test_an_unknown_bus_url_is_refused() -> None:
    async def open_unknown() -> None:
        async with open_event_bus("carrier-pigeon://coop", client_id="x"):
            pass

    with pytest.raises(ValueError, match="carrier-pigeon"):
        asyncio.run(open_unknown())
