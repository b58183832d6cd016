"""How an answer on a kept-alive connection to a service ends (platform/upstream.py): one with
a length or chunked ends where it says, and a connection closed before then broke it; one
with neither ends with its connection (HTTP/1.1, 6.3), and is then whole."""

from __future__ import annotations

import asyncio

import pytest

from shop.platform.upstream import UpstreamBroken, _Connection


class _Transport:
    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


def _connection(loop: asyncio.AbstractEventLoop) -> _Connection:
    conn = _Connection(loop)
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    conn.start(b"GET /p HTTP/1.1\r\nHost: s\r\n\r\n", head_only=False)
    return conn


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nCONTENT-LENGTH: 10\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
    ],
)
async def test_an_answer_that_says_its_end_is_broken_by_an_early_close(answer: bytes) -> None:
    conn = _connection(asyncio.get_running_loop())
    conn.data_received(answer)
    conn.connection_lost(None)
    assert conn.head_done and not conn.complete
    assert isinstance(conn.error, UpstreamBroken)


async def test_an_answer_without_a_length_ends_with_its_connection() -> None:
    conn = _connection(asyncio.get_running_loop())
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nabc")
    conn.data_received(b"def")
    conn.connection_lost(None)
    assert conn.complete and conn.error is None
    assert conn.take() == b"abcdef"


async def test_the_length_of_an_early_hint_does_not_count_for_the_answer() -> None:
    conn = _connection(asyncio.get_running_loop())
    conn.data_received(b"HTTP/1.1 103 Early Hints\r\nContent-Length: 0\r\n\r\n")
    conn.data_received(b"HTTP/1.1 200 OK\r\n\r\nabc")
    conn.connection_lost(None)
    assert conn.status == 200 and conn.complete and conn.error is None
    assert conn.take() == b"abc"
