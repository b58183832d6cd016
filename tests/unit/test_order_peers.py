"""HttpInventory over the kept-alive upstream pool, against a raw HTTP server on loopback:
what the inventory receives, and how each way of failing is reported."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from shop.order.breaker import CircuitBreaker
from shop.order.domain import OutOfStock, RequestedLine, Unavailable
from shop.order.peers import HttpInventory
from shop.platform import context, upstream
from shop.platform.discovery import Instance
from shop.platform.upstream import UpstreamPool

ORDER = "0b6f3f2e-8f0c-4c36-9d55-4a1f0c3a8f11"
LINES = [RequestedLine("iphone_15", 2)]


def _answer(status: int, body: object) -> bytes:
    raw = json.dumps(body).encode()
    head = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(raw)}"
    return head.encode() + b"\r\n\r\n" + raw


@dataclass
class Inventory:
    """Answers each request with the next of ``answers``; ``close_after`` closes the
    connection once it has answered (as a server whose keep-alive ran out does)."""

    answers: list[bytes]
    close_after: bool = False
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    transports: list[asyncio.Transport] = field(default_factory=list)

    def protocol(self) -> asyncio.Protocol:
        inventory = self

        class Served(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                assert isinstance(transport, asyncio.Transport)
                self.transport = transport
                self.buffer = b""
                inventory.connections += 1
                inventory.transports.append(transport)

            def data_received(self, data: bytes) -> None:
                self.buffer += data
                head, sep, rest = self.buffer.partition(b"\r\n\r\n")
                if not sep:
                    return
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if len(rest) < length:
                    return
                inventory.requests.append(self.buffer)
                self.buffer = b""
                self.transport.write(inventory.answers.pop(0))
                if inventory.close_after:
                    self.transport.close()

        return Served()


@dataclass
class Registry:
    """Hands out its instances in turn, skipping those reported as refusing (as
    RegistryClient.choose does) until every one has refused."""

    instance: Instance
    others: list[Instance] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    turn: int = 0
    # What proved_alive answers next, and how often it was asked.
    alive: list[bool] = field(default_factory=list)
    asked: int = 0

    async def choose(self, name: str) -> Instance:
        listed = [self.instance, *self.others]
        healthy = [i for i in listed if i.instance_id not in self.refusals] or listed
        self.turn += 1
        return healthy[(self.turn - 1) % len(healthy)]

    def refused(self, instance: Instance) -> None:
        self.refusals.append(instance.instance_id)

    def proved_alive(self, name: str) -> bool:
        self.asked += 1
        return self.alive.pop(0) if self.alive else False


Serve = Callable[[Inventory], Awaitable[int]]
POOLS: list[UpstreamPool] = []


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    started: list[tuple[asyncio.Server, Inventory]] = []

    async def start(inventory: Inventory) -> int:
        server = await asyncio.get_running_loop().create_server(inventory.protocol, "127.0.0.1", 0)
        started.append((server, inventory))
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield start
    while POOLS:
        POOLS.pop().close()
    for server, inventory in started:
        server.close()
        for transport in inventory.transports:
            transport.close()
        await server.wait_closed()
    await asyncio.sleep(0)


async def _credentials(target: str) -> str:
    return f"Bearer token-for-{target}"


def _client(
    port: int, *, timeout_s: float = 2.0, failure_threshold: int = 5
) -> tuple[HttpInventory, Registry, CircuitBreaker]:
    instance = Instance(app="inventory-service", instance_id="i", host="127.0.0.1", port=port)
    registry = Registry(instance)
    breaker = CircuitBreaker(
        name="inventory-service", failure_threshold=failure_threshold, open_for_s=5.0
    )
    pool = UpstreamPool()
    POOLS.append(pool)
    inventory = HttpInventory(
        registry=registry,  # type: ignore[arg-type]  # the two methods HttpInventory uses
        pool=pool,
        breaker=breaker,
        credentials=_credentials,
        timeout_s=timeout_s,
    )
    return inventory, registry, breaker


async def test_a_reservation_carries_the_token_the_identity_and_the_lines(serve: Serve) -> None:
    ok = _answer(201, {"orderNumber": ORDER, "status": "RESERVED"})
    server = Inventory(answers=[ok])
    port = await serve(server)
    inventory, _, _ = _client(port)
    context.bind(request_id="req-1", trace=context.TraceContext.new())
    await inventory.reserve(ORDER, LINES)
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /internal/reservations HTTP/1.1"
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert headers["authorization"] == f"Bearer token-for-http://127.0.0.1:{port}"
    assert headers["x-request-id"] == "req-1"
    assert headers["traceparent"].startswith("00-")
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {
        "orderNumber": ORDER,
        "lines": [{"skuCode": "iphone_15", "quantity": 2}],
    }


async def test_connections_are_kept_and_one_the_inventory_closed_is_replaced(serve: Serve) -> None:
    ok = _answer(201, {})
    kept = Inventory(answers=[ok, ok, ok])
    inventory, _, _ = _client(await serve(kept))
    for _ in range(3):
        await inventory.reserve(ORDER, LINES)
    assert kept.connections == 1

    # Whether its close has reached the pool yet or not, the next order goes through: on a
    # fresh connection, or sent again once the reused one turns out closed.
    closing = Inventory(answers=[ok, ok, ok], close_after=True)
    inventory, _, breaker = _client(await serve(closing))
    for _ in range(3):
        await inventory.reserve(ORDER, LINES)
    assert closing.connections == 3
    assert breaker.retry_after_s() == 0


async def test_a_connection_idle_too_long_is_not_reused(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One the inventory may be closing right now (its keep-alive time running out) would
    reset the reservation written on it, and a reservation is not sent twice: a fresh one."""
    ok = _answer(201, {})
    server = Inventory(answers=[ok, ok])
    inventory, _, _ = _client(await serve(server))
    monkeypatch.setattr(upstream, "_IDLE_EXPIRY_S", 0.0)
    await inventory.reserve(ORDER, LINES)
    await inventory.reserve(ORDER, LINES)
    assert server.connections == 2


async def test_a_shortage_is_out_of_stock_and_the_breaker_stays_closed(serve: Serve) -> None:
    short = {"shortages": [{"skuCode": "iphone_15", "requested": 2, "available": 1}]}
    inventory, _, breaker = _client(await serve(Inventory(answers=[_answer(409, short)])))
    with pytest.raises(OutOfStock):
        await inventory.reserve(ORDER, LINES)
    assert breaker.retry_after_s() == 0


async def test_a_5xx_may_have_been_applied_and_counts_against_the_inventory(serve: Serve) -> None:
    inventory, _, breaker = _client(
        await serve(Inventory(answers=[_answer(503, {})])), failure_threshold=1
    )
    with pytest.raises(Unavailable) as refused:
        await inventory.reserve(ORDER, LINES)
    assert refused.value.maybe_applied
    assert breaker.retry_after_s() > 0


async def test_a_refused_connection_was_not_applied_and_the_instance_is_forgotten(
    serve: Serve,
) -> None:
    probe = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    inventory, registry, _ = _client(port)
    with pytest.raises(Unavailable) as refused:
        await inventory.reserve(ORDER, LINES)
    assert not refused.value.maybe_applied
    assert registry.refusals == ["i"]


async def test_an_instance_that_refuses_is_passed_over_for_the_next_one(serve: Serve) -> None:
    """A refused connection reached nothing, so the same call goes on to another instance;
    the breaker hears a success, and the refusing instance is reported to the registry."""
    probe = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
    dead = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    alive = Inventory(answers=[_answer(201, {"orderNumber": ORDER, "status": "RESERVED"})])
    port = await serve(alive)
    inventory, registry, breaker = _client(dead, failure_threshold=1)
    registry.others.append(
        Instance(app="inventory-service", instance_id="j", host="127.0.0.1", port=port)
    )
    await inventory.reserve(ORDER, LINES)
    assert registry.refusals == ["i"]
    assert len(alive.requests) == 1
    assert breaker.retry_after_s() == 0


async def test_one_deadline_covers_the_whole_exchange(serve: Serve) -> None:
    silent = Inventory(answers=[b"HTTP/1.1 201 Created\r\ncontent-length: 100\r\n\r\n{"])
    inventory, _, _ = _client(await serve(silent), timeout_s=0.2)
    with pytest.raises(Unavailable) as refused:
        await inventory.reserve(ORDER, LINES)
    assert refused.value.maybe_applied
    assert "timed out" in str(refused.value)


async def test_an_inventory_that_proved_alive_is_probed_before_the_open_period_ends(
    serve: Serve,
) -> None:
    """Restarted, added or thawed (the registry client says so): the next order is the one
    probe, at once, instead of after the breaker's whole open period."""
    server = Inventory(answers=[_answer(503, {}), _answer(201, {})])
    inventory, registry, breaker = _client(await serve(server), failure_threshold=1)
    with pytest.raises(Unavailable):
        await inventory.reserve(ORDER, LINES)
    assert inventory.unavailable_for_s() == pytest.approx(5.0, abs=0.5)
    registry.alive.append(True)
    assert inventory.unavailable_for_s() == 0
    await inventory.reserve(ORDER, LINES)
    assert breaker.retry_after_s() == 0 and len(server.requests) == 2
    asked = registry.asked
    assert inventory.unavailable_for_s() == 0
    assert registry.asked == asked, "closed: the registry client is not asked"


async def test_while_the_probe_is_out_the_registry_client_is_not_asked(serve: Serve) -> None:
    """Its answer would be spent on nothing: the probe gives the verdict."""
    inventory, registry, breaker = _client(
        await serve(Inventory(answers=[_answer(503, {})])), failure_threshold=1
    )
    with pytest.raises(Unavailable):
        await inventory.reserve(ORDER, LINES)
    breaker.probe_now()
    breaker.acquire()  # a probe is out
    asked = registry.asked
    assert inventory.unavailable_for_s() > 0
    assert registry.asked == asked
