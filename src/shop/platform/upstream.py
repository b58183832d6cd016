"""An HTTP/1.1 client for calls between Shop's own processes (the gateway's proxying first):
kept-alive connections per instance, each request written as one buffer, answers parsed by
httptools (the parser uvicorn uses).

Hand-written rather than aiohttp's client because this is the hot path: aiohttp builds a
request object, a URL, a header multidict and a writer per call, and profiling put 44 % of
the gateway's time there. What a proxy needs is much less: send bytes it already has, hand
back the status, the raw headers and the body chunks as they come.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import httptools

from shop.platform import context, telemetry

if TYPE_CHECKING:
    from opentelemetry.trace import Span

__all__ = [
    "Answer",
    "ConnectFailed",
    "Origin",
    "UpstreamBroken",
    "UpstreamPool",
]

_IDLE_LIMIT = 64  # kept-alive connections per instance; more are closed after their answer
# A connection idle longer than this is closed instead of reused. Shop's servers close theirs
# after 5 s idle (platform/serve.py ServerLimits.keep_alive_s): a request written as the
# server closes meets a reset, which a POST cannot survive (not idempotent); staying well
# inside the server's time, as nginx's and Go's upstream pools advise, avoids that race.
_IDLE_EXPIRY_S = 2.0
_HIGH_WATER = 256 * 1024  # buffered answer bytes before the service is asked to wait
_LENGTH_HEADERS = frozenset({b"content-length", b"transfer-encoding"})


_TRACEPARENT = b"\r\ntraceparent:"


def _client_span(base_url: str, origin: Origin, head: bytes) -> tuple[Span | None, bytes]:
    """A CLIENT span for the request ``head`` starts (under the bound trace, when sampled),
    and ``head`` with a ``traceparent`` naming it, so the callee's server span is its child;
    (None, ``head``) when no span is made."""
    line_end = head.index(b"\r\n")
    method, _, rest = head[:line_end].partition(b" ")
    target = rest.rpartition(b" ")[0].decode("latin-1")
    span = telemetry.client_span(method.decode("ascii"), origin.host, base_url.rstrip("/") + target)
    if span is None:
        return None, head
    if not span.is_recording():  # a sampler that ignores the parent dropped it
        span.end()
        return None, head
    value = b" " + telemetry.span_trace(span).traceparent.encode("ascii")
    headers_end = head.find(b"\r\n\r\n")
    at = head.lower().find(_TRACEPARENT, line_end, headers_end)
    if at < 0:  # the caller sent none: the callee gets one all the same
        return span, b"%straceparent:%s\r\n%s" % (head[: line_end + 2], value, head[line_end + 2 :])
    start = at + len(_TRACEPARENT)
    stop = head.index(b"\r\n", start)
    return span, head[:start] + value + head[stop:]


def _end_client_span(span: Span, status: int, error: BaseException | None) -> None:
    if status:
        span.set_attribute("http.response.status_code", status)
        if error is None and status >= 500:
            error = _Status5xx()
    telemetry.end_span(span, error)


def _delimited(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether an answer says where it ends (Content-Length, chunked) rather than ending with
    its connection. Asked only when a connection closes mid-answer, not for every header."""
    return any(len(name) in (14, 17) and name.lower() in _LENGTH_HEADERS for name, _ in headers)


class _Status5xx(Exception):
    """A server error answer, as a span's error type."""


class ConnectFailed(Exception):
    """Nothing reached the instance (refused, unreachable, connect timeout): safe to retry."""


class UpstreamBroken(Exception):
    """The connection broke (or answered nonsense) after the request was sent."""


class Origin:
    """One instance's address, parsed once: ``http://10.0.0.5:8080``."""

    __slots__ = ("host", "host_header", "port", "secure")

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.secure = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.secure else 80)
        default = 443 if self.secure else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if self.port == default else f"{host}:{self.port}").encode("ascii")


class _Connection(asyncio.Protocol):
    """One kept-alive connection; carries one request at a time."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, on_silence: Callable[[], None] | None = None
    ) -> None:
        self.loop = loop
        # Called when an answer does not come in time (the pool closes the instance's idle
        # connections: they would meet the same silence).
        self.on_silence = on_silence
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reusable = False
        self.in_flight = False
        self.idle_since = 0.0  # loop time it went back to the pool
        # The answer in progress
        self.head_only = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.head_done = False
        self.complete = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.paused = False
        self.informational = False
        # Instead of a waiter: called on every event (the gateway's fast lane, no task).
        self.listener: Callable[[], None] | None = None
        self.listen_timeout_s = 0.0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but are stream transports.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.complete and self.error is None:
            if self.head_done and not _delimited(self.headers):
                self.complete = True  # an answer without a length ends with its connection
            else:
                self.error = UpstreamBroken(str(exc) if exc else "connection closed")
        self._wake()

    def data_received(self, data: bytes) -> None:
        if not self.in_flight:
            self._close()  # nothing was asked: whatever this is, the connection is unusable
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = UpstreamBroken(f"unparsable answer: {exc}")
            self._close()
        self._wake()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            # 1xx (early hints...): not the answer, which follows on the same connection.
            self.informational = True
            self.headers = []
            return
        self.status = status
        self.head_done = True
        if self.head_only:
            # An answer to HEAD has no body, whatever its Content-Length says; the parser does
            # not know what was asked and would wait for one, so the connection is not reused.
            self.complete = True
            self.reusable = False

    def on_body(self, body: bytes) -> None:
        if self.head_only:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        if self.head_only:
            return
        self.complete = True
        self.reusable = self.parser.should_keep_alive()

    # use
    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        listener = self.listener
        if listener is not None:
            self.deadline = self.loop.time() + self.listen_timeout_s
            listener()

    def listen(self, listener: Callable[[], None] | None, timeout_s: float = 0.0) -> None:
        """Call ``listener`` on every event of the answer in progress (bytes, the end, an
        error in ``error``: TimeoutError after ``timeout_s`` of silence) rather than waking a
        waiter; ``None`` stops it. For callers with no task to wait in (the gateway's fast
        lane); ``Answer.body`` needs it stopped."""
        self.listener = listener
        if listener is None:
            return
        self.listen_timeout_s = timeout_s
        self.deadline = self.loop.time() + timeout_s
        if self.timer is None:
            self.timer = self.loop.call_later(timeout_s, self._check_deadline)

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    close = _close  # for a caller driving the connection itself (``send_now``)

    def start(self, request: bytes, *, head_only: bool) -> None:
        self.head_only = head_only
        self.status = 0
        self.headers = []
        self.head_done = self.complete = self.reusable = False
        self.error = None
        self.chunks.clear()
        self.buffered = 0
        self.in_flight = True
        assert self.transport is not None  # noqa: S101 - connected before use
        self.transport.write(request)

    async def wait(self, timeout_s: float) -> None:
        """Until something new arrives; TimeoutError after ``timeout_s`` of silence."""
        if self.error is not None:
            raise self.error
        # One timer per connection checks the deadline, re-armed only when it fires early,
        # rather than a timer made and cancelled for every wait.
        self.deadline = self.loop.time() + timeout_s
        if self.timer is None:
            self.timer = self.loop.call_later(timeout_s, self._check_deadline)
        waiter = self.waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self.waiter = None
        if self.error is not None:
            raise self.error

    def _check_deadline(self) -> None:
        self.timer = None
        waiter = self.waiter
        listener = self.listener
        waiting = waiter is not None and not waiter.done()
        if not waiting and listener is None:
            return  # nothing is waiting: the next wait arms the timer again
        remaining = self.deadline - self.loop.time()
        if remaining > 0:
            self.timer = self.loop.call_later(remaining, self._check_deadline)
        elif waiting:
            assert waiter is not None  # noqa: S101 - waiting says so
            self._silent()
            waiter.set_exception(TimeoutError())
        elif listener is not None:
            self._silent()
            self.listener = None
            self.error = TimeoutError()
            listener()

    def _silent(self) -> None:
        if self.on_silence is not None:
            self.on_silence()

    def take(self) -> bytes:
        chunk = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk


class Answer:
    """A service's answer: status and raw headers now, the body as it streams in."""

    __slots__ = ("_conn", "_pool", "_key", "_timeout_s", "headers", "status")

    def __init__(
        self, conn: _Connection, *, pool: UpstreamPool, key: str, timeout_s: float
    ) -> None:
        self._conn = conn
        self._pool = pool
        self._key = key
        self._timeout_s = timeout_s
        self.status = conn.status
        self.headers = conn.headers

    def whole_body(self) -> bytes | None:
        """The whole body when it has already arrived (a small answer usually comes with its
        headers), the connection back in the pool; None when it is still streaming in."""
        conn = self._conn
        if not conn.complete:
            return None
        body = conn.take() if conn.chunks else b""
        self._pool.release(self._key, conn)
        return body

    async def body(self) -> AsyncIterator[bytes]:
        """The body's chunks; the connection goes back to the pool once it is read whole."""
        conn = self._conn
        try:
            while True:
                if conn.chunks:
                    yield conn.take()
                if conn.complete:
                    break
                await conn.wait(self._timeout_s)
        except BaseException:
            conn._close()  # broken, too slow, or the caller's task was cancelled
            raise
        self._pool.release(self._key, conn)

    def abandon(self) -> None:
        """Stop reading: the connection is in an unknown state and is closed."""
        self._conn._close()


class UpstreamPool:
    """Kept-alive connections per instance base URL."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl = ssl_context
        self._idle: dict[str, list[_Connection]] = {}
        self._origins: dict[str, Origin] = {}
        self._closing = False

    def origin(self, base_url: str) -> Origin:
        origin = self._origins.get(base_url)
        if origin is None:
            origin = self._origins[base_url] = Origin(base_url)
        return origin

    async def _connect(self, base_url: str, origin: Origin, timeout_s: float) -> _Connection:
        loop = asyncio.get_running_loop()
        context: Any = None
        if origin.secure:
            context = self._ssl or ssl.create_default_context()
        try:
            async with asyncio.timeout(timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, partial(self.drop_idle, base_url)),
                    origin.host,
                    origin.port,
                    ssl=context,
                    server_hostname=origin.host if context else None,
                )
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(str(exc) or type(exc).__name__) from exc
        return conn

    def send_now(
        self,
        base_url: str,
        head: bytes,
        *,
        head_only: bool,
        hosted: bool = False,
    ) -> _Connection | None:
        """``request`` without waiting, for a caller with no task (the gateway's fast lane):
        ``head`` (and the body after it) sent on a kept-alive connection, which is returned
        with the answer to come on it (see ``_Connection.listen``, ``Answer``); None, nothing
        sent, when no connection is idle. No CLIENT span: its caller, the gateway, makes one
        span per request (docs/telemetry.md). ``hosted``: ``head`` has its Host line already
        (``with_host``), as a caller that sends the same head again and again keeps it."""
        conn = self._take(base_url)
        if conn is not None:
            if not hosted:
                head = self._compose(self.origin(base_url), head, b"")
            conn.start(head, head_only=head_only)
        return conn

    def with_host(self, base_url: str, head: bytes) -> bytes:
        """``head`` with the Host line of ``base_url``'s instance, where ``request`` puts it
        (right after the request line)."""
        return self._compose(self.origin(base_url), head, b"")

    def _take(self, base_url: str) -> _Connection | None:
        """The most recently used idle connection to ``base_url`` still worth using: open,
        and idle for less than ``_IDLE_EXPIRY_S`` (older ones are closed on the way)."""
        idle = self._idle.get(base_url)
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if conn.loop.time() - conn.idle_since < _IDLE_EXPIRY_S:
                return conn
            conn._close()
        return None

    def drop_idle(self, base_url: str) -> None:
        """Close the idle connections to ``base_url``: one of its answers did not come in
        time, so neither would theirs. With none idle, the gateway's fast lane leaves the
        instance's requests to the proxy, where its service's circuit breaker is."""
        for conn in self._idle.pop(base_url, ()):
            conn._close()

    def has_idle(self, base_url: str) -> bool:
        """Whether ``send_now`` will probably find a connection (it may have closed since)."""
        return bool(self._idle.get(base_url))

    @staticmethod
    def _compose(origin: Origin, head: bytes, body: bytes) -> bytes:
        line_end = head.index(b"\r\n") + 2
        return b"%sHost: %s\r\n%s%s" % (head[:line_end], origin.host_header, head[line_end:], body)

    async def request(
        self,
        base_url: str,
        head: bytes,
        body: bytes,
        *,
        head_only: bool,
        idempotent: bool,
        connect_timeout_s: float,
        timeout_s: float,
        new_connection: bool = False,
        traced: bool = True,
    ) -> Answer:
        """Send ``head`` (everything but the ``Host`` line, which is added here, and ends with
        the blank line) and ``body``; wait for the answer's status and headers.

        ``head`` is ``b"GET /path HTTP/1.1\\r\\n"`` + header lines + ``b"\\r\\n"``; the
        ``Host`` header is inserted right after the request line. ``new_connection``: on a new
        connection (the request already broke on a kept-alive one). ``traced``: a CLIENT
        span for the call while a sampled trace is bound, ended when the answer's head is in
        (the ``traceparent`` in ``head`` is rewritten to name it).
        """
        if traced and context.spans_exported:
            return await self._traced(
                base_url,
                head,
                body,
                head_only=head_only,
                idempotent=idempotent,
                connect_timeout_s=connect_timeout_s,
                timeout_s=timeout_s,
                new_connection=new_connection,
            )
        origin = self.origin(base_url)
        conn = None if new_connection else self._take(base_url)
        fresh = conn is None
        if conn is None:
            conn = await self._connect(base_url, origin, connect_timeout_s)
        conn.start(self._compose(origin, head, body), head_only=head_only)
        try:
            while not conn.head_done:
                await conn.wait(timeout_s)
        except UpstreamBroken:
            conn._close()
            if idempotent and not fresh and not conn.headers:
                # Most likely a kept-alive connection the service closed as the request left
                # (its idle timeout): an idempotent request may go again (RFC 9110, 9.2.2).
                return await self.request(
                    base_url,
                    head,
                    body,
                    head_only=head_only,
                    idempotent=False,
                    connect_timeout_s=connect_timeout_s,
                    timeout_s=timeout_s,
                    traced=False,  # the call's CLIENT span covers its second attempt
                )
            raise
        except BaseException:
            conn._close()
            raise
        return Answer(conn, pool=self, key=base_url, timeout_s=timeout_s)

    async def _traced(
        self,
        base_url: str,
        head: bytes,
        body: bytes,
        *,
        head_only: bool,
        idempotent: bool,
        connect_timeout_s: float,
        timeout_s: float,
        new_connection: bool,
    ) -> Answer:
        span, head = _client_span(base_url, self.origin(base_url), head)
        try:
            answer = await self.request(
                base_url,
                head,
                body,
                head_only=head_only,
                idempotent=idempotent,
                connect_timeout_s=connect_timeout_s,
                timeout_s=timeout_s,
                new_connection=new_connection,
                traced=False,
            )
        except BaseException as exc:
            if span is not None:
                _end_client_span(span, 0, exc)
            raise
        if span is not None:
            _end_client_span(span, answer.status, None)
        return answer

    def release(self, key: str, conn: _Connection) -> None:
        conn.in_flight = False
        if conn.closed or not conn.reusable or self._closing:
            conn._close()
            return
        idle = self._idle.setdefault(key, [])
        if len(idle) >= _IDLE_LIMIT:
            conn._close()
            return
        conn.idle_since = conn.loop.time()
        idle.append(conn)

    def close(self) -> None:
        self._closing = True
        for idle in self._idle.values():
            for conn in idle:
                conn._close()
        self._idle.clear()
