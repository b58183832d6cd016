"""The composition side of the event bus: which implementation a URL names.

``events`` is the interface and imports no implementation; this table does the picking,
importing the chosen module only when its URL is used (a deployment on the embedded log
needs no Kafka client installed). A new backend is a new module with a ``from_url`` factory
plus one entry in ``BACKENDS``.

``python -m shop.platform.buses replay --url URL --group G [--topic T]`` puts a consumer
group's dead letters back on their topics, whichever bus the URL names.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from types import MappingProxyType
from typing import Protocol, cast

from shop.platform.events import DeadLetterReplay, EventBus, RetryPolicy
from shop.platform.settings import PlatformSettings

__all__ = ["BACKENDS", "BusFactory", "main", "open_event_bus"]

# URL scheme -> "module:factory". The part of a scheme after "+" names a driver
# (``sqlite+aiosqlite``) and does not change the backend.
BACKENDS: Mapping[str, str] = MappingProxyType(
    {
        "sqlite": "shop.platform.eventlog:from_url",
        "kafka": "shop.platform.kafka:from_url",
    }
)


class BusFactory(Protocol):
    def __call__(
        self,
        url: str,
        *,
        client_id: str,
        retry: RetryPolicy,
        settings: PlatformSettings | None,
    ) -> EventBus: ...


def _factory(url: str) -> BusFactory:
    scheme = url.partition(":")[0].partition("+")[0].lower()
    target = BACKENDS.get(scheme)
    if target is None:
        known = ", ".join(sorted(BACKENDS))
        raise ValueError(f"no event bus for {scheme!r} URLs (known: {known})")
    module, _, name = target.partition(":")
    return cast(BusFactory, getattr(importlib.import_module(module), name))


@asynccontextmanager
async def open_event_bus(
    url: str,
    *,
    client_id: str,
    retry: RetryPolicy | None = None,
    settings: PlatformSettings | None = None,
) -> AsyncIterator[EventBus]:
    """Open the bus the URL names; start consumers with ``start()`` after subscribing.

    ``settings`` carries what a backend needs beyond its URL (Kafka's ``SHOP_KAFKA_*``);
    without it, a backend that needs them reads them from the environment.
    """
    bus = _factory(url)(url, client_id=client_id, retry=retry or RetryPolicy(), settings=settings)
    try:
        yield bus
    finally:
        await bus.close()


async def _replay(url: str, *, group: str, topic: str | None) -> int:
    async with open_event_bus(url, client_id="replay") as bus:
        if not isinstance(bus, DeadLetterReplay):
            raise ValueError(f"the bus at {url!r} keeps no dead letters")
        return await bus.replay_dead_letters(group=group, topic=topic)


def main(
    argv: Sequence[str] | None = None,
    *,
    prog: str = "python -m shop.platform.buses",
    only: str | None = None,
) -> int:
    """``python -m shop.platform.buses replay --url URL --group G [--topic T]``.

    ``only`` restricts it to one backend's scheme (the embedded log's own command).
    """
    parser = argparse.ArgumentParser(prog=prog, description="Tend the event bus.")
    commands = parser.add_subparsers(dest="command", required=True)
    replay = commands.add_parser(
        "replay", help="put a consumer group's dead letters back on their topics"
    )
    replay.add_argument(
        "--url", required=True, help="the bus: sqlite:///.data/events.db or kafka://host:9092"
    )
    replay.add_argument("--group", required=True, help="the consumer group that gave up")
    replay.add_argument("--topic", help="only this topic's dead letters")
    args = parser.parse_args(argv)
    if only is not None and not str(args.url).startswith(only):
        parser.error(f"--url must name the embedded log ({only}:///…)")
    try:
        _factory(args.url)
    except ValueError as exc:
        parser.error(str(exc))
    count = asyncio.run(_replay(args.url, group=args.group, topic=args.topic))
    where = f" on {args.topic}" if args.topic else ""
    print(f"replayed {count} dead letter(s) of group {args.group}{where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
