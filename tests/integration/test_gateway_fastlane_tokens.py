"""The gateway's fast lane (gateway/fastlane.py) for token routes and small bodies, over real
HTTP: a request that needs a token, or that carries a small body (an order), must get from
the fast lane exactly what the ASGI path gives it — the same answer and headers, the same
request at the service, the same rate limits — and every refusal stays the ASGI path's."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from shop.gateway.fastlane import GatewayProtocol
from tests.fakes import FakeRegistry
from tests.integration.test_gateway import (
    UPSTREAM_TIMEOUT_S,
    Gateway,
    Received,
    SigningKey,
    Upstream,
    assert_problem,
    bearer,
    mint,
    running_gateway,
    started,
)

# Vary from request to request (ids, trace) or between the two paths' answers anyway.
_VARYING = {"x-request-id", "date", "content-length"}
_UNLIMITED: dict[str, Any] = {
    "rate_limit_per_client": "1000000/second",
    "rate_limit_per_user": "1000000/second",
}
# Every route family waits as long as the reads do here (test_gateway's UPSTREAM_TIMEOUT_S).
_TIMEOUTS: dict[str, Any] = {
    "write_timeout_s": UPSTREAM_TIMEOUT_S,
    "order_timeout_s": UPSTREAM_TIMEOUT_S,
}
ORDER = {"orderLineItemDtoList": [{"skuCode": "iphone_15", "quantity": 1}]}


class Service(Upstream):
    """An echoing instance that can also drop a request without answering (``.../drop``)."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/drop") and request.transport is not None:
            body = await request.read()
            self.received.append(
                Received(request.method, request.raw_path, dict(request.headers), body)
            )
            request.transport.close()  # as a crash would: no answer at all
            return web.Response(status=500)
        return await super().handle(request)


@dataclass
class World:
    gateway: Gateway
    registry: FakeRegistry
    auth: Service
    order: Service
    inventory: Service
    product: Service
    http: aiohttp.ClientSession
    keys: dict[str, SigningKey]
    customer: str
    admin: str

    def forget_requests(self) -> None:
        for service in (self.auth, self.order, self.inventory, self.product):
            service.received.clear()

    def reached(self) -> list[Received]:
        return [
            r for s in (self.auth, self.order, self.inventory, self.product) for r in s.received
        ]


@pytest.fixture(scope="module")
async def world() -> AsyncIterator[World]:
    keys = {"k1": SigningKey("k1"), "rogue": SigningKey("k1")}
    auth, order = Service("auth-service"), Service("order-service")
    inventory, product = Service("inventory-service"), Service("product-service")
    auth.jwks = [keys["k1"]]
    async with started(auth, order, inventory, product):
        registry = FakeRegistry(
            {
                "auth-service": [auth.port],
                "order-service": [order.port],
                "inventory-service": [inventory.port],
                "product-service": [product.port],
            }
        )
        async with (
            started(registry),
            running_gateway(registry, **_UNLIMITED, **_TIMEOUTS) as gateway,
        ):
            async with aiohttp.ClientSession(auto_decompress=False) as http:
                yield World(
                    gateway=gateway,
                    registry=registry,
                    auth=auth,
                    order=order,
                    inventory=inventory,
                    product=product,
                    http=http,
                    keys=keys,
                    customer=mint(keys["k1"]),
                    admin=mint(keys["k1"], roles=["customer", "admin"]),
                )


@pytest.fixture
def fast_lane(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """Whether each request offered to the fast lane was taken by it, in order."""
    taken: list[bool] = []
    original = GatewayProtocol._take

    def spy(self: GatewayProtocol, *args: Any) -> bool:
        took = original(self, *args)
        taken.append(took)
        return took

    monkeypatch.setattr(GatewayProtocol, "_take", spy)
    yield taken


def _asgi_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(GatewayProtocol, "_take", lambda self, *args: False)


async def call(
    url: str, http: aiohttp.ClientSession, method: str, path: str, **kwargs: Any
) -> tuple[int, CIMultiDict[str], bytes]:
    async with http.request(method, url + path, **kwargs) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


async def _warm(world: World) -> None:
    """Instances known, the signing key held and a kept-alive connection idle to each service
    (what the fast lane needs), then nothing recorded."""
    for path in ("/api/order", "/api/inventory", "/api/product"):
        for _ in range(2):
            status, _, body = await call(
                world.gateway.url, world.http, "GET", path, headers=bearer(world.customer)
            )
            assert status == 200, body
    world.forget_requests()


def _comparable(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower() not in _VARYING}


def _as_seen(received: Received) -> dict[str, str]:
    return {k.lower(): v for k, v in received.headers.items() if k.lower() != "traceparent"}


async def _both_ways(
    world: World, monkeypatch: pytest.MonkeyPatch, method: str, path: str, **kwargs: Any
) -> tuple[tuple[int, CIMultiDict[str], bytes], tuple[int, CIMultiDict[str], bytes]]:
    """The same request on the fast lane (as taken or refused there), then on the ASGI path."""
    fast = await call(world.gateway.url, world.http, method, path, **kwargs)
    with monkeypatch.context() as patch:
        _asgi_only(patch)
        asgi = await call(world.gateway.url, world.http, method, path, **kwargs)
    return fast, asgi


async def test_a_token_route_on_the_fast_lane_answers_as_the_asgi_path(
    world: World, fast_lane: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    await _warm(world)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    sent = {
        **bearer(world.customer),
        "X-Request-ID": "caller-chosen-id-2",
        "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01",
        "X-Forwarded-For": "6.6.6.6",
        "TE": "trailers",
    }
    fast_lane.clear()
    fast, asgi = await _both_ways(
        world, monkeypatch, "GET", "/api/inventory?skuCode=a&skuCode=b", headers=sent
    )
    assert fast_lane == [True]
    (status, headers, body), (asgi_status, asgi_headers, asgi_body) = fast, asgi
    assert status == asgi_status == 200
    assert body == asgi_body
    assert _comparable(headers) == _comparable(asgi_headers)
    assert headers["X-Request-ID"] == asgi_headers["X-Request-ID"] == "caller-chosen-id-2"
    assert "X-Upstream-Hop" not in headers and "Keep-Alive" not in headers
    first, second = world.inventory.received
    assert _as_seen(first) == _as_seen(second)
    seen = _as_seen(first)
    assert seen["authorization"] == f"Bearer {world.customer}"
    assert seen["x-request-id"] == "caller-chosen-id-2"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert "te" not in seen
    for received in (first, second):
        _, trace, span, _ = received.headers["traceparent"].split("-")
        assert (trace, span != "00f067aa0ba902b7") == (trace_id, True)


async def test_an_order_post_on_the_fast_lane_reaches_the_service_as_on_the_asgi_path(
    world: World, fast_lane: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    await _warm(world)
    payload = json.dumps(ORDER).encode()
    sent = {
        **bearer(world.customer),
        "Content-Type": "application/json",
        "Idempotency-Key": "order-key-1",
        "X-Request-ID": "order-request-1",
    }
    fast_lane.clear()
    fast, asgi = await _both_ways(
        world, monkeypatch, "POST", "/api/order", data=payload, headers=sent
    )
    assert fast_lane == [True]
    (status, headers, body), (asgi_status, asgi_headers, asgi_body) = fast, asgi
    assert status == asgi_status == 200
    assert body == asgi_body
    assert _comparable(headers) == _comparable(asgi_headers)
    first, second = world.order.received
    assert (first.method, first.raw_path, first.body) == ("POST", "/api/order", payload)
    assert (second.method, second.raw_path, second.body) == ("POST", "/api/order", payload)
    assert _as_seen(first) == _as_seen(second)
    seen = _as_seen(first)
    assert seen["content-length"] == str(len(payload))
    assert seen["idempotency-key"] == "order-key-1"
    assert seen["x-request-id"] == "order-request-1"
    assert seen["authorization"] == f"Bearer {world.customer}"


async def test_an_admin_route_is_taken_for_an_admin(
    world: World, fast_lane: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    await _warm(world)
    product = {"name": "Phone", "price": "10.00"}
    fast_lane.clear()
    fast, asgi = await _both_ways(
        world, monkeypatch, "POST", "/api/product", json=product, headers=bearer(world.admin)
    )
    assert fast_lane == [True]
    assert fast[0] == asgi[0] == 200
    assert [json.loads(r.body) for r in world.product.received] == [product, product]


def _refusals(world: World) -> list[tuple[str, str, dict[str, str], int]]:
    keys = world.keys
    service = mint(keys["k1"], roles=["service"], sub="service:order-service")
    return [
        ("GET", "/api/order", {}, 401),
        ("GET", "/api/order", {"Authorization": "Basic YTpi"}, 401),
        ("GET", "/api/order", bearer(mint(keys["k1"], exp=1_000_000)), 401),
        ("POST", "/api/order", bearer(mint(keys["k1"], aud="someone-else")), 401),
        ("GET", "/api/inventory", bearer(mint(keys["rogue"], roles=["admin"])), 401),
        ("POST", "/api/order", bearer(service), 403),
        ("POST", "/api/product", bearer(world.customer), 403),
        ("PUT", "/api/inventory/a", bearer(world.customer), 403),
        ("DELETE", "/api/order/1", bearer(world.admin), 405),
    ]


async def test_refusals_are_the_asgi_paths_own_answers(
    world: World, fast_lane: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    await _warm(world)
    for method, path, headers, expected in _refusals(world):
        fast_lane.clear()
        fast, asgi = await _both_ways(
            world, monkeypatch, method, path, json={"quantity": 1}, headers=headers
        )
        assert fast_lane == [False], (method, path, expected)
        problem = assert_problem(*fast, expected)
        asgi_problem = assert_problem(*asgi, expected)
        ids = {"requestId", "traceId"}
        assert {k: v for k, v in problem.items() if k not in ids} == {
            k: v for k, v in asgi_problem.items() if k not in ids
        }
        for name in ("WWW-Authenticate", "Allow"):
            assert fast[1].get(name) == asgi[1].get(name), (method, path, name)
    assert world.reached() == []


async def test_rate_limits_count_and_refuse_the_same_on_the_fast_lane(
    world: World, fast_lane: list[bool]
) -> None:
    limited: dict[str, Any] = {
        "trusted_proxies": ("127.0.0.1",),
        "rate_limit_per_client": "5/minute",
        "rate_limit_per_user": "3/minute",
        "rate_limit_key_prefix": f"test-{uuid.uuid4().hex}",
    }
    async with running_gateway(world.registry, **limited) as gateway:

        async def get(token: str, address: str) -> tuple[int, CIMultiDict[str], bytes]:
            headers = {**bearer(token), "X-Forwarded-For": address}
            return await call(gateway.url, world.http, "GET", "/api/order", headers=headers)

        # One request to have the instance known and a connection to it idle.
        assert (await get(mint(world.keys["k1"]), "198.51.100.9"))[0] == 200
        world.forget_requests()
        fast_lane.clear()
        ada = mint(world.keys["k1"])
        for address in ("198.51.100.1", "198.51.100.2", "198.51.100.3"):
            assert (await get(ada, address))[0] == 200
        assert fast_lane == [True, True, True]
        # Ada's fourth is over her limit from any address: refused, and nothing forwarded.
        problem = assert_problem(*await get(ada, "198.51.100.4"), 429)
        assert "user" in problem["detail"]
        users = [mint(world.keys["k1"]) for _ in range(6)]
        for user in users[:5]:
            assert (await get(user, "198.51.100.5"))[0] == 200
        status, headers, body = await get(users[5], "198.51.100.5")
        assert "client" in assert_problem(status, headers, body, 429)["detail"]
        assert 1 <= int(headers["Retry-After"]) <= 60
        assert len(world.order.received) == 8
        assert fast_lane.count(True) == 8


@pytest.mark.parametrize(("method", "sent"), [("POST", 1), ("GET", 2)])
async def test_a_request_whose_connection_breaks_before_any_answer_is_sent_again_if_idempotent(
    world: World,
    fast_lane: list[bool],
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    sent: int,
) -> None:
    """A POST may have been applied: 502, never sent twice. A GET goes again on a new
    connection (which the service drops too here). Each path from a kept-alive connection."""
    for asgi in (False, True):
        await _warm(world)
        fast_lane.clear()
        with monkeypatch.context() as patch:
            if asgi:
                _asgi_only(patch)
            answer = await call(
                world.gateway.url,
                world.http,
                method,
                "/api/order/drop",
                json=ORDER if method == "POST" else None,
                headers=bearer(world.customer),
            )
        assert fast_lane == ([] if asgi else [True])
        assert_problem(*answer, 502)
        assert len(world.order.received) == sent, (method, asgi)


async def test_a_slow_service_is_504_for_a_post_on_the_fast_lane(
    world: World, fast_lane: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    await _warm(world)
    fast_lane.clear()
    fast, asgi = await _both_ways(
        world, monkeypatch, "POST", "/api/order/slow", json=ORDER, headers=bearer(world.customer)
    )
    assert fast_lane == [True]
    assert assert_problem(*fast, 504)["detail"] == assert_problem(*asgi, 504)["detail"]


async def _answers(reader: asyncio.StreamReader, count: int) -> list[tuple[bytes, bytes]]:
    """``count`` answers (head, body) read off a connection, each delimited by its length."""
    got = []
    for _ in range(count):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        got.append((head, await reader.readexactly(length)))
    return got


def _post(world: World, path: str, body: bytes, *extra: bytes) -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: shop\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
        % (path.encode(), world.customer.encode(), len(body), b"".join(extra), body)
    )


async def test_pipelined_posts_are_answered_in_order_with_their_bodies(
    world: World, fast_lane: list[bool]
) -> None:
    await _warm(world)
    bodies = [json.dumps({**ORDER, "n": n}).encode() for n in range(3)]
    fast_lane.clear()
    reader, writer = await asyncio.open_connection("127.0.0.1", world.gateway.port)
    try:
        writer.write(
            _post(world, "/api/order/1", bodies[0])
            + b"GET /api/product/2 HTTP/1.1\r\nHost: shop\r\n\r\n"
            + _post(world, "/api/order/3", bodies[1])
            + _post(world, "/api/order/4", bodies[2])
        )
        answers = await _answers(reader, 4)
    finally:
        writer.close()
    assert all(head.startswith(b"HTTP/1.1 200 ") for head, _ in answers)
    paths = [json.loads(body)["path"] for _, body in answers]
    assert paths == ["/api/order/1", "/api/product/2", "/api/order/3", "/api/order/4"]
    assert [r.body for r in world.order.received] == bodies
    assert fast_lane[0] is True


async def test_a_body_that_is_late_or_chunked_is_read_whole_by_the_asgi_path(
    world: World,
) -> None:
    await _warm(world)
    body = json.dumps(ORDER).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", world.gateway.port)
    try:
        # The head alone first: the body comes with a later read (or with the same one on a
        # busy machine); either way the service gets all of it, once.
        request = _post(world, "/api/order/late", body)
        writer.write(request[: -len(body)])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(body)
        chunked = (
            b"POST /api/order/chunked HTTP/1.1\r\nHost: shop\r\nAuthorization: Bearer %s\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
            % (world.customer.encode(), len(body), body)
        )
        writer.write(chunked)
        answers = await _answers(reader, 2)
    finally:
        writer.close()
    assert [head[:13] for head, _ in answers] == [b"HTTP/1.1 200 "] * 2
    assert [(r.raw_path, r.body) for r in world.order.received] == [
        ("/api/order/late", body),
        ("/api/order/chunked", body),
    ]


async def test_connection_close_is_honoured_for_a_post_on_the_fast_lane(
    world: World, fast_lane: list[bool]
) -> None:
    await _warm(world)
    body = json.dumps(ORDER).encode()
    fast_lane.clear()
    reader, writer = await asyncio.open_connection("127.0.0.1", world.gateway.port)
    try:
        writer.write(_post(world, "/api/order", body, b"Connection: close\r\n"))
        answer = await asyncio.wait_for(reader.read(), 5)  # until the gateway closes
    finally:
        writer.close()
    assert fast_lane == [True]
    head, _, answer_body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nconnection: close" in head.lower()
    assert json.loads(answer_body)["path"] == "/api/order"
    assert [r.body for r in world.order.received] == [body]
