"""The gateway's fast lane (gateway/fastlane.py) over real HTTP: a public GET or HEAD that
finds a kept-alive connection to its service is proxied from the protocol's callbacks, and
must be answered exactly as the ASGI path answers it, failures included."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from shop.gateway.fastlane import GatewayProtocol, _Exchange
from tests.integration import test_gateway
from tests.integration.test_gateway import STREAMED_PARTS, World, assert_problem, call

world = test_gateway.world  # the same world around a gateway, one for this module

# Vary from request to request, or name the instance (two product-service instances answer).
_VARYING = {"x-request-id", "date", "content-length"}


@pytest.fixture
def fast_lane(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """Whether each request was taken by the fast lane, in order."""
    taken: list[bool] = []
    original = GatewayProtocol._take

    def spy(self: GatewayProtocol, *args: Any) -> bool:
        took = original(self, *args)
        taken.append(took)
        return took

    monkeypatch.setattr(GatewayProtocol, "_take", spy)
    yield taken


def _content_length(head: bytes) -> int:
    """The Content-Length an answer's head (status line and headers) declares."""
    return next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )


async def _warm(world: World) -> None:
    """Instances known and a kept-alive connection idle to each product instance."""
    for _ in range(4):
        status, _, _ = await call(world, "GET", "/api/product")
        assert status == 200


def _comparable(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower() not in _VARYING}


async def test_the_fast_lane_answers_as_the_asgi_path_does(
    world: World, fast_lane: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    await _warm(world)
    sent = {"X-Request-ID": "caller-chosen-id-1", "X-Forwarded-For": "6.6.6.6", "TE": "trailers"}
    fast_lane.clear()
    world.forget_requests()
    fast = await call(world, "GET", "/api/product/7?q=a%20b", headers=sent)
    assert fast_lane == [True]
    monkeypatch.setattr(GatewayProtocol, "_take", lambda self, *args: False)
    slow = await call(world, "GET", "/api/product/7?q=a%20b", headers=sent)

    (status, headers, body), (asgi_status, asgi_headers, asgi_body) = fast, slow
    assert status == asgi_status == 200
    assert _comparable(headers) == _comparable(asgi_headers)
    assert headers["X-Request-ID"] == asgi_headers["X-Request-ID"] == "caller-chosen-id-1"
    assert "Keep-Alive" not in headers and "X-Upstream-Hop" not in headers
    assert json.loads(body)["path"] == json.loads(asgi_body)["path"] == "/api/product/7?q=a%20b"
    assert int(headers["Content-Length"]) == len(body)
    reached = world.reached()
    assert len(reached) == 2
    seen = [{k.lower(): v for k, v in r.headers.items()} for r in reached]
    for one in seen:
        assert one["x-forwarded-for"] == "127.0.0.1"
        assert one["x-request-id"] == "caller-chosen-id-1"
        assert "te" not in one
    # Each request has a trace span of its own; the two product instances have two hosts.
    assert {k: v for k, v in seen[0].items() if k not in {"traceparent", "host"}} == {
        k: v for k, v in seen[1].items() if k not in {"traceparent", "host"}
    }


async def test_head_on_the_fast_lane_has_the_length_and_no_body(
    world: World, fast_lane: list[bool]
) -> None:
    await _warm(world)
    _, _, get_body = await call(world, "GET", "/api/product/1")
    fast_lane.clear()
    status, headers, body = await call(world, "HEAD", "/api/product/1")
    assert fast_lane == [True]
    assert status == 200
    assert body == b""
    assert headers["Content-Length"] == str(len(get_body))
    status, _, body = await call(world, "GET", "/api/product/1")
    assert status == 200
    assert json.loads(body)["path"] == "/api/product/1"


async def test_a_slow_service_is_504_from_the_fast_lane_too(
    world: World, fast_lane: list[bool]
) -> None:
    await _warm(world)
    fast_lane.clear()
    status, headers, body = await call(world, "GET", "/api/product/slow")
    assert fast_lane == [True]
    assert_problem(status, headers, body, 504)
    assert headers["X-Request-ID"]


async def test_streamed_and_broken_answers_from_the_fast_lane(
    world: World, fast_lane: list[bool]
) -> None:
    await _warm(world)
    fast_lane.clear()
    status, _, body = await call(world, "GET", "/api/product/streamed")
    assert (status, body) == (200, b"".join(STREAMED_PARTS))
    await _warm(world)
    with pytest.raises(aiohttp.ClientPayloadError):
        await call(world, "GET", "/api/product/broken")
    assert fast_lane[0] is True
    status, _, _ = await call(world, "GET", "/api/product")
    assert status == 200


async def test_a_kept_alive_connection_the_service_closed_is_retried(
    world: World, fast_lane: list[bool]
) -> None:
    for _ in range(3):
        await _warm(world)
        status, _, _ = await call(world, "GET", "/api/product/then-hang-up")
        assert status == 200
        await asyncio.sleep(0.2)  # the service has closed the kept-alive connection by now
        fast_lane.clear()
        status, _, _ = await call(world, "GET", "/api/product/after")
        assert status == 200
    assert any(fast_lane), "no request took the fast lane"


async def test_pipelined_requests_are_answered_in_order(world: World) -> None:
    await _warm(world)
    reader, writer = await asyncio.open_connection("127.0.0.1", world.gateway.port)
    try:
        paths = ["/api/product/1", "/health/live", "/api/product/2", "/api/product/3"]
        writer.write(b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % p.encode() for p in paths))
        got = []
        for _ in paths:
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            length = _content_length(head)
            got.append(json.loads(await reader.readexactly(length)))
        assert [g.get("path") for g in got] == [paths[0], None, paths[2], paths[3]]
    finally:
        writer.close()


async def test_connection_close_is_honoured_on_the_fast_lane(
    world: World, fast_lane: list[bool]
) -> None:
    await _warm(world)
    fast_lane.clear()
    reader, writer = await asyncio.open_connection("127.0.0.1", world.gateway.port)
    try:
        writer.write(b"GET /api/product/9 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)  # until the gateway closes
    finally:
        writer.close()
    assert fast_lane == [True]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nconnection: close" in head.lower()
    assert json.loads(body)["path"] == "/api/product/9"


async def test_http_1_0_takes_the_asgi_path_even_after_the_same_head_in_1_1(
    world: World, fast_lane: list[bool]
) -> None:
    # The fast lane knows a repeated head's version without asking the parser only when
    # nothing but 1.1 can be kept alive with it: a 1.0 request asking for keep-alive with
    # the very same headers is still answered the ASGI way, which closes it as uvicorn does.
    await _warm(world)
    fast_lane.clear()
    head = b"GET /api/product/4 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", world.gateway.port)
    try:
        for request in (head, head, head.replace(b"HTTP/1.1", b"HTTP/1.0")):
            writer.write(request)
            answer = await reader.readuntil(b"\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200 ")
            length = _content_length(answer)
            assert json.loads(await reader.readexactly(length))["path"] == "/api/product/4"
        assert await asyncio.wait_for(reader.read(), 5) == b""  # 1.0: closed after it
    finally:
        writer.close()
    assert fast_lane == [True, True, False]


async def test_traced_requests_take_the_fast_lane_with_the_proxys_span(
    world: World, fast_lane: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tracing on (10 % sampled in production) keeps the fast lane: each request's proxy
    span ends with its answer, and the service's parent is that span."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from shop.platform import telemetry

    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "api-gateway"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.install("api-gateway", provider)
    proxy = world.gateway.app.proxy  # type: ignore[attr-defined]
    monkeypatch.setattr(proxy, "spans", telemetry.server_spans(provider, "shop.gateway"))
    try:
        await _warm(world)
        fast_lane.clear()
        world.forget_requests()
        exporter.clear()
        caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        status, headers, _ = await call(
            world, "GET", "/api/product/7", headers={"traceparent": caller}
        )
        unsampled = "00-1af7651916cd43dd8448eb211c80319c-c7ad6b7169203331-00"
        await call(world, "GET", "/api/product/8", headers={"traceparent": unsampled})
    finally:
        telemetry.shutdown()
    assert status == 200 and fast_lane == [True, True]
    spans = exporter.get_finished_spans()  # the unsampled request exports none
    # One span per request at the gateway (docs/telemetry.md): the proxy's, which is the
    # service's parent; no CLIENT span of its own for the proxied call.
    (span,) = spans
    assert span.kind is SpanKind.SERVER and span.name == "GET /api/product"
    assert span.parent is not None and span.parent.span_id == 0xB7AD6B7169203331
    assert dict(span.attributes or {})["http.response.status_code"] == 200
    sampled, not_sampled = (r.headers["traceparent"] for r in world.reached())
    assert sampled == f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-01"
    assert not_sampled.startswith("00-1af7651916cd43dd8448eb211c80319c-")
    assert not_sampled.endswith("-00")


async def test_a_connection_varying_its_head_gets_each_request_forwarded_as_sent(
    world: World, fast_lane: list[bool]
) -> None:
    # The fast lane reuses what it concluded from a connection's last head only when the
    # method, target and headers are the same again: any change is forwarded as sent.
    await _warm(world)
    fast_lane.clear()
    world.forget_requests()
    heads = [
        (b"GET", b"/api/product/1?x=1", b""),
        (b"GET", b"/api/product/1?x=1", b""),
        (b"GET", b"/api/product/1?x=2", b""),
        (b"GET", b"/api/product/2?x=2", b""),
        (b"GET", b"/api/product/2?x=2", b"X-Extra: a\r\n"),
        (b"GET", b"/api/product/2?x=2", b"X-Extra: b\r\n"),
        (b"GET", b"/api/product/2?x=2", b"X-Extra: b\r\n"),
        (b"GET", b"/api/product/2", b"X-Extra: b\r\n"),
        # Last: an answer to HEAD leaves its connection unusable (the fast lane opens none).
        (b"HEAD", b"/api/product/2", b"X-Extra: b\r\n"),
    ]
    reader, writer = await asyncio.open_connection("127.0.0.1", world.gateway.port)
    try:
        for method, target, extra in heads:
            writer.write(b"%s %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (method, target, extra))
            answer = await reader.readuntil(b"\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200 ")
            length = _content_length(answer)
            if method != b"HEAD":
                assert json.loads(await reader.readexactly(length))["path"] == target.decode()
    finally:
        writer.close()
    assert fast_lane == [True] * len(heads)
    seen = [
        (r.method, r.raw_path, {k.lower(): v for k, v in r.headers.items()}.get("x-extra"))
        for r in world.reached()
    ]
    # Two instances answer in turn: the order across them is the round-robin's.
    expected = [
        (m.decode(), t.decode(), e[len(b"X-Extra: ") : -2].decode() or None) for m, t, e in heads
    ]
    assert sorted(seen, key=str) == sorted(expected, key=str)


async def test_a_finished_exchange_is_freed_at_once_not_left_to_the_collector(
    world: World, fast_lane: list[bool]
) -> None:
    """Nothing of a proxied request outlives it in a reference cycle: the garbage collector
    ran every few dozen requests for them, ~3 µs a request (docs/gateway.md)."""
    await _warm(world)
    fast_lane.clear()
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            status, _, _ = await call(world, "GET", "/api/product")
            assert status == 200
        left = [o for o in gc.get_objects() if type(o) is _Exchange]
    finally:
        gc.enable()
    assert fast_lane == [True] * 5
    assert len(left) <= 1  # the last one, still its connection's until the next request
