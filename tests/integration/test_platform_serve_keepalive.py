"""The served connection's keep-alive timeout (platform/serve.py): a deadline checked by the
connection's one timer, not a timer per request. A kept-alive connection serves request after
request, and once idle for the keep-alive time it is closed, even when its header deadline
(armed at connect, much later) had set the timer first. And the header limit, counted as
the headers come, to the byte."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from shop.platform.serve import ServerLimits, bind_socket, server_config

REQUEST = b"GET /ping HTTP/1.1\r\nHost: shop\r\n\r\n"


async def _ping(_request: Request) -> PlainTextResponse:
    return PlainTextResponse("pong")


@asynccontextmanager
async def _serving(limits: ServerLimits) -> AsyncIterator[int]:
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    app = Starlette(routes=[Route("/ping", _ping)])
    server = uvicorn.Server(server_config(app, log_level="warning", limits=limits))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:  # uvicorn has no event for it
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
        yield port
    finally:
        server.should_exit = True
        await task


async def _answer(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return await reader.readexactly(length)


async def test_an_idle_kept_alive_connection_is_closed_after_the_keep_alive_time() -> None:
    # The header deadline (10 s, armed at connect) sets the connection's timer first; the
    # keep-alive deadline (1 s) after each answer must bring it forward.
    async with _serving(ServerLimits(header_timeout_s=10.0, keep_alive_s=1.0)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(3):  # one connection, request after request
                writer.write(REQUEST)
                assert await _answer(reader) == b"pong"
            answered = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 5.0) == b""  # closed by the server
            idle = time.monotonic() - answered
        finally:
            writer.close()
    assert 0.8 <= idle < 3.0


async def test_a_request_before_the_keep_alive_time_keeps_the_connection() -> None:
    async with _serving(ServerLimits(header_timeout_s=10.0, keep_alive_s=1.0)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(REQUEST)
            assert await _answer(reader) == b"pong"
            began = time.monotonic()
            # Requests for longer than the keep-alive time, none more than half of it apart:
            # the deadline of each idle gap is met by the next request, never the close.
            while time.monotonic() - began < 1.6:
                await asyncio.sleep(0.4)
                writer.write(REQUEST)
                assert await _answer(reader) == b"pong"
        finally:
            writer.close()


async def _status_of(port: int, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        return (await reader.readuntil(b"\r\n")).split(b" ")[1]
    finally:
        writer.close()


async def test_the_header_limit_counts_the_target_and_the_headers_to_the_byte() -> None:
    # The size is counted as the headers come: the target plus each name and value and 4,
    # so a head right at the limit is served and one byte more is refused.
    limit = 2_000
    async with _serving(ServerLimits(max_header_bytes=limit)) as port:
        target, base = b"/ping", len(b"/ping") + len(b"host") + len(b"shop") + 4
        padding = limit - base - len(b"x-pad") - 4
        at_limit = b"GET %s HTTP/1.1\r\nHost: shop\r\nX-Pad: %s\r\n\r\n" % (target, b"a" * padding)
        over = at_limit.replace(b"X-Pad: ", b"X-Pad: a")
        assert await _status_of(port, at_limit) == b"200"
        assert await _status_of(port, over) == b"431"
