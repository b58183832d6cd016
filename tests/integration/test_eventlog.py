"""What only the embedded SQLite event log does, beyond the bus contract
(``test_event_bus_contract.py``): the lease that lets one process of a group consume at a
time and fences its commits, attempts counted in the log across restarts, many writer
processes on one file, the ``dead_letters`` table and the ``eventlog`` command.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import pytest

from shop.platform import eventlog
from shop.platform.eventlog import SqliteEventLog, main
from shop.platform.events import Event
from tests.support import run_module

LEASE_S = 1.0


@pytest.fixture
def bus_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'events.db'}"


@asynccontextmanager
async def open_bus(url: str, **options: Any) -> AsyncIterator[SqliteEventLog]:
    """A bus tuned for tests: short leases and back-off, so take-over is quick."""
    bus = SqliteEventLog(
        url, client_id="test", **{"lease_s": LEASE_S, "retry_backoff_s": 0.01, **options}
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


async def test_a_poisoned_event_reaches_dead_letters_however_often_consumers_restart(
    bus_url: str,
) -> None:
    poisoned_calls = 0
    handled: list[int] = []

    async def handler(event: Event) -> None:
        nonlocal poisoned_calls
        if event.data["n"] == 0:
            poisoned_calls += 1
            raise ValueError("cannot handle this one")
        handled.append(int(event.data["n"]))

    async with open_bus(bus_url) as bus:
        await bus.publish("orders", [_event("A", 0), _event("A", 1)])
    for _ in range(8):  # each consumer gets one try at most before it is restarted
        async with open_bus(bus_url, max_attempts=3, retry_backoff_s=5) as bus:
            bus.subscribe("orders", group="g", handler=handler)
            await bus.start()
            await asyncio.sleep(0.15)
        if handled:
            break
    assert handled == [1]
    assert poisoned_calls == 3, "attempts count across restarts, not per consumer"


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


def _append_elsewhere(url: str, event: Event) -> None:
    """Append ``event`` to topic ``orders`` as another process would: on a connection the
    log knows nothing of."""
    with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db, db:
        db.execute(
            "INSERT INTO events (topic, key, event_id, payload, appended_at)"
            " VALUES ('orders', ?, ?, ?, 0)",
            (event.subject, f"e-{event.id}", event.to_json()),
        )


@pytest.mark.parametrize("watch", ["inotify", "polling"])
async def test_an_idle_consumer_hears_of_new_events_without_polling_the_table(
    bus_url: str, monkeypatch: pytest.MonkeyPatch, watch: str
) -> None:
    """Appends by this process wake its consumers; appends by another process are noticed
    through the file's data version. Neither waits for the consumer's own re-check, whether
    the kernel reports writes to the file (inotify) or the watcher polls (elsewhere)."""
    monkeypatch.setattr(eventlog, "_RECHECK_S", 60.0)
    if watch == "polling":
        monkeypatch.setattr(eventlog, "_wal_writes", lambda _database: None)
    recorder = Recorder()
    async with open_bus(bus_url) as bus:
        bus.subscribe("orders", group="g", handler=recorder)
        await bus.start()
        await bus.publish("orders", [_event("A", 1)])
        await _until(lambda: recorder.numbers() == [1], within_s=5)
        await asyncio.sleep(0.2)  # the consumer found nothing more and waits
        _append_elsewhere(bus_url, _event("A", 2))
        await _until(lambda: recorder.numbers() == [1, 2], within_s=5)


async def test_an_idle_watcher_looks_only_when_the_file_is_written(
    bus_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the kernel reports writes (Linux), a process with nothing to consume does not
    wake up a hundred times a second to look for other processes' appends, and still hears
    of one at once: here neither the watcher's fallback nor the consumer's re-check would
    come within the test."""
    monkeypatch.setattr(eventlog, "_RECHECK_S", 60.0)
    monkeypatch.setattr(eventlog, "_WATCH_FALLBACK_S", 60.0)
    recorder = Recorder()
    async with open_bus(bus_url) as bus:
        bus.subscribe("orders", group="g", handler=recorder)
        await bus.start()
        await bus.publish("orders", [_event("A", 1)])
        await _until(lambda: recorder.numbers() == [1], within_s=5)
        await asyncio.sleep(0.1)  # the look after this process's own append has been
        idle_since = bus.watch_looks
        await asyncio.sleep(0.5)  # idle: polling every 10 ms would have looked ~50 times
        assert bus.watch_looks - idle_since <= 1
        _append_elsewhere(bus_url, _event("A", 2))
        await _until(lambda: recorder.numbers() == [1, 2], within_s=5)


# --- one group, two consumers: the lease fences them -------------------------------------


class Timeline:
    """Who handled what, when: start and end of every handler call, per consumer."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, float, float]] = []
        self.running: dict[str, int] = {}

    def handler(self, consumer: str, *, takes_s: float) -> Callable[[Event], Any]:
        async def handle(event: Event) -> None:
            n = int(event.data["n"])
            others = {c: m for c, m in self.running.items() if c != consumer}
            assert not others, f"{consumer} got {n} while {others} was being handled"
            self.running[consumer] = n
            started = time.monotonic()
            try:
                await asyncio.sleep(takes_s)
            finally:
                del self.running[consumer]
            self.calls.append((consumer, n, started, time.monotonic()))

        return handle

    def numbers(self) -> list[int]:
        return [n for _, n, _, _ in sorted(self.calls, key=lambda c: c[2])]


@asynccontextmanager
async def watch_offset(url: str, *, topic: str, group: str) -> AsyncIterator[list[int]]:
    """Every committed offset seen while the block runs (sampled every 10 ms)."""
    seen: list[int] = []
    watcher = SqliteEventLog(url, client_id="watcher")
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            seen.append(await watcher.committed(topic, group=group))
            await asyncio.sleep(0.01)

    task = asyncio.create_task(sample())
    try:
        yield seen
    finally:
        done.set()
        await task
        await watcher.close()


def _never_decreases(offsets: list[int]) -> bool:
    return all(a <= b for a, b in zip(offsets, offsets[1:], strict=False))


async def test_two_consumers_of_a_group_never_handle_events_at_once(bus_url: str) -> None:
    """A handler slower than the lease: the holder keeps it renewed, the other one waits."""
    lease_s, takes_s = 0.6, 0.9
    timeline = Timeline()
    first = SqliteEventLog(bus_url, client_id="first", lease_s=lease_s)
    second = SqliteEventLog(bus_url, client_id="second", lease_s=lease_s)
    await first.publish("orders", [_event("AB"[n % 2], n) for n in range(4)])
    async with watch_offset(bus_url, topic="orders", group="g") as offsets:
        try:
            first.subscribe("orders", group="g", handler=timeline.handler("first", takes_s=takes_s))
            second.subscribe(
                "orders", group="g", handler=timeline.handler("second", takes_s=takes_s)
            )
            await first.start()
            await _until(lambda: bool(timeline.running))
            await second.start()
            await _until(lambda: len(timeline.calls) == 2)
            # The holder leaves after the event in hand; the other one takes over from there.
            await first.close()
            await _until(lambda: len(timeline.calls) == 4 and offsets[-1] == 4)
        finally:
            await first.close()
            await second.close()
    assert timeline.numbers() == [0, 1, 2, 3], "every event once, in order"
    owners = [c for c, _, _, _ in timeline.calls]
    handed_over = owners.index("second")
    assert owners == ["first"] * handed_over + ["second"] * (4 - handed_over)
    assert handed_over >= 2
    spans = sorted((start, end) for _, _, start, end in timeline.calls)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:], strict=False))
    assert _never_decreases(offsets) and offsets[-1] == 4


STALLING_CONSUMER = textwrap.dedent(
    """
    import asyncio, sys
    from shop.platform.eventlog import SqliteEventLog

    url, out, lease_s = sys.argv[1], sys.argv[2], float(sys.argv[3])

    def note(line):
        with open(out, "a") as f:
            f.write(line + "\\n")

    async def handle(event):
        note(f"start {event.data['n']}")
        await asyncio.sleep(0.5)
        note(f"end {event.data['n']}")

    async def main():
        bus = SqliteEventLog(url, client_id="stalling", lease_s=lease_s)
        bus.subscribe("orders", group="g", handler=handle)
        await bus.start()
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


async def test_a_consumer_that_stalls_past_its_lease_cannot_move_the_offset_back(
    bus_url: str, tmp_path: Path
) -> None:
    """A process frozen mid-event (a pause, a swapped-out laptop) wakes up after a take-over:
    it finishes the event in hand, but its late commit is refused and it delivers no more."""
    lease_s = 0.6
    out = tmp_path / "stalling.txt"
    survivor = Recorder()
    async with open_bus(bus_url) as bus:
        await bus.publish("orders", [_event("A", n) for n in range(4)])
    stalling = await asyncio.create_subprocess_exec(
        sys.executable, "-c", STALLING_CONSUMER, bus_url, str(out), str(lease_s)
    )
    try:
        async with watch_offset(bus_url, topic="orders", group="g") as offsets:
            await _until(lambda: out.exists() and "start 1" in out.read_text().split("\n"))
            stalling.send_signal(signal.SIGSTOP)
            bus = SqliteEventLog(bus_url, client_id="survivor", lease_s=lease_s)
            try:
                bus.subscribe("orders", group="g", handler=survivor)
                await bus.start()  # takes over once the frozen process's lease lapses
                await _until(lambda: len(survivor.seen) == 3)
                stalling.send_signal(signal.SIGCONT)
                await _until(lambda: "end 1" in out.read_text().split("\n"))
                await asyncio.sleep(0.5)  # its commit, and any further delivery, would be now
            finally:
                await bus.close()
    finally:
        stalling.send_signal(signal.SIGCONT)
        stalling.kill()
        await stalling.wait()
    assert out.read_text().split("\n")[:-1] == ["start 0", "end 0", "start 1", "end 1"]
    assert survivor.numbers() == [1, 2, 3], "only the event in hand at the take-over comes twice"
    assert _never_decreases(offsets) and offsets[-1] == 4


# --- dead letters: only after a long outage, and replayable --------------------------------


def dead_letters(url: str) -> list[tuple[str, str, int]]:
    with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
        rows = db.execute("SELECT grp, topic, seq FROM dead_letters ORDER BY grp, topic, seq")
        return [(g, t, int(s)) for g, t, s in rows]


def test_by_default_a_failing_event_is_retried_for_a_quarter_of_an_hour(bus_url: str) -> None:
    patience_s = SqliteEventLog(bus_url, client_id="defaults").patience_s
    assert 15 * 60 <= patience_s <= 20 * 60


async def test_an_outage_is_ridden_out_with_capped_back_off_not_dead_lettered(
    bus_url: str,
) -> None:
    """The handler's database is down for a while: the event waits, retried at a steady
    pace once the back-off reaches its cap, and goes through when the outage ends."""
    outage_ends = time.monotonic() + 0.6
    attempts: list[float] = []
    handled: list[int] = []

    async def handler(event: Event) -> None:
        attempts.append(time.monotonic())
        if attempts[-1] < outage_ends:
            raise ConnectionError("database is down")
        handled.append(int(event.data["n"]))

    async with open_bus(
        bus_url, retry_backoff_s=0.01, retry_backoff_max_s=0.05, max_attempts=60
    ) as bus:
        bus.subscribe("orders", group="g", handler=handler)
        await bus.publish("orders", [_event("A", 1), _event("A", 2)])
        await bus.start()
        await _until(lambda: handled == [1, 2])
    gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    assert len(attempts) > 8, "more attempts than the old policy's eight"
    assert max(gaps) < 0.05 + 0.15, "the back-off stops growing at its cap"
    assert dead_letters(bus_url) == []


async def test_the_eventlog_command_replays_dead_letters_off_the_table(
    bus_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """After the outage is fixed, an operator puts a group's dead letters back on the log:
    the group handles them; the other groups see the same event id again (their inbox
    drops it)."""
    broken = {1, 99}
    mail: list[Event] = []
    audit = Recorder()

    async def send_mail(event: Event) -> None:
        if event.data["n"] in broken:
            raise ConnectionError("mail relay refuses us")
        mail.append(event)

    async with open_bus(bus_url, max_attempts=2) as bus:
        bus.subscribe("orders", group="mail", handler=send_mail)
        bus.subscribe("products", group="mail", handler=send_mail)
        bus.subscribe("orders", group="audit", handler=audit)
        await bus.start()
        await bus.publish("orders", [_event("A", n) for n in range(3)])
        await bus.publish("products", [_event("P", 99)])
        await _until(
            lambda: len(dead_letters(bus_url)) == 2 and len(audit.seen) == 3 and len(mail) == 2
        )
        assert [int(e.data["n"]) for e in mail] == [0, 2]
        counts = [
            await bus.dead_letters(topic, group=group)
            for topic, group in [("orders", "mail"), ("products", "mail"), ("orders", "audit")]
        ]
        assert counts == [1, 1, 0]

        broken.clear()
        # The same command in-process (saves starting Python twice more).
        assert await asyncio.to_thread(main, ["replay", "--url", bus_url, "--group", "audit"]) == 0
        assert capsys.readouterr().out == "replayed 0 dead letter(s) of group audit\n"
        status, output = await run_module(
            "shop.platform.eventlog",
            "replay",
            "--url",
            bus_url,
            "--group",
            "mail",
            "--topic",
            "orders",
        )
        assert (status, output) == (0, "replayed 1 dead letter(s) of group mail on orders\n")
        await _until(lambda: len(mail) == 3 and len(audit.seen) == 4)
        assert [int(e.data["n"]) for e in mail] == [0, 2, 1]
        assert audit.seen[3].id == audit.seen[1].id, "the same event, for the inbox to drop"
        assert dead_letters(bus_url) == [("mail", "products", 4)]
        assert await bus.dead_letters("orders", group="mail") == 0
        assert await asyncio.to_thread(main, ["replay", "--url", bus_url, "--group", "mail"]) == 0
        assert capsys.readouterr().out == "replayed 1 dead letter(s) of group mail\n"
        await _until(lambda: len(mail) == 4)
        assert dead_letters(bus_url) == []


def test_replay_refuses_a_log_it_cannot_tend(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["replay", "--url", "mysql://db/x", "--group", "g"], ["replay", "--group", "g"]):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2
    assert "sqlite" in capsys.readouterr().err
