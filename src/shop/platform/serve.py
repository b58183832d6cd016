"""Run one service process: check its settings, bind the port (0 = any free one), then serve
and register it."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar, cast

import httptools
import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shop.platform.logs import configure_logging
from shop.platform.problems import PROBLEM_JSON, problem_body
from shop.platform.settings import PlatformSettings, ServiceSettings, SettingsRefused, load_settings

__all__ = [
    "EXIT_REFUSED",
    "GuardedProtocol",
    "ServerLimits",
    "TlsFiles",
    "bind_socket",
    "configure_logging",
    "guarded_protocol",
    "main",
    "run",
    "serve",
    "server_config",
]

# What a process that refuses its settings exits with (before it binds a port).
EXIT_REFUSED = 2

S = TypeVar("S", bound=ServiceSettings)
S_contra = TypeVar("S_contra", bound=ServiceSettings, contravariant=True)


class AppBuilder(Protocol[S_contra]):
    def __call__(self, *, platform: PlatformSettings, settings: S_contra) -> Starlette: ...


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What a connection may cost before the app sees a request. uvicorn bounds only the idle
    time between two requests (``timeout_keep_alive``); these bound the rest.

    The services' default header limit is twice the gateway's (16 KiB) so that what the
    gateway forwards, plus the headers it adds, always fits.
    """

    header_timeout_s: float = 10.0
    max_header_bytes: int = 32_768
    keep_alive_s: float = 5.0


class _CoalescedWrites:
    """The connection's transport, with the writes of one loop step sent as one: uvicorn
    writes an answer's head and its body separately, two ``send`` syscalls where one will do
    (on loopback each also pays for the receiver's TCP processing)."""

    __slots__ = ("_pending", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            self._transport.write(data)

    def write_now(self, data: bytes) -> None:
        """Write at once, after whatever is pending (an answer known to be whole)."""
        if self._pending:
            self._pending.append(data)
            self.flush()
        else:
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _GuardedProtocol(HttpToolsProtocol):
    """httptools' protocol with a deadline on each request's line and headers (a silent or
    one-byte-a-second client is cut off: 408 if it sent anything) and a cap on their size
    (431, the connection closed, the app never called)."""

    limits: ClassVar[ServerLimits] = ServerLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The deadlines (a request's head; uvicorn's keep-alive timeout, the idle time after
        # an answer) are times; one timer per connection checks them, re-armed only when it
        # fires early, rather than a timer made and cancelled for every request (uvicorn's
        # keep-alive timer alone cost ~3 µs a request).
        self._head_deadline: float | None = None
        self._idle_deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._awaiting_head = True
        self._head_bytes = 0
        self._head_size = 0  # the request line's target and headers, as the limit counts them
        self._refused = False
        # The body of a request a subclass holds back (its own protocol answers it once the
        # body is whole: the gateway's fast lane). While it is set, ``held_complete`` is
        # called when the request ends, and ``held_read_ended`` when a read ends before that:
        # asked here rather than in overrides calling ``super()``, which cost two calls a
        # request (docs/gateway.md, "Sixth cut").
        self._held: list[bytes] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # The transport itself too: asking it whether it closes costs no call through the
        # wrapper (every answer asks).
        self.raw_transport = transport
        self._writes = _CoalescedWrites(transport)
        super().connection_made(cast(asyncio.Transport, self._writes))
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm(stop_timer=True)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """uvicorn's (its errors answered as it answers them), with the head's size counted."""
        if self._refused:
            return
        if self._awaiting_head:
            self._head_bytes += len(data)
        self._idle_deadline = None  # bytes came: no longer idle
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            if self._held is not None:
                self.held_read_ended()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        # Still no end of headers: refuse before the parser buffers any more of them.
        if self._awaiting_head and self._head_bytes > self.limits.max_header_bytes:
            self._refuse(431, "The request line and headers are too large.")
        if self._held is not None:
            self.held_read_ended()

    def on_message_begin(self) -> None:
        """uvicorn's, without the ASGI scope: it is made when a request is dispatched to the
        app (``new_scope``), so that a protocol answering a request itself (the gateway's fast
        lane) does not pay for a dict of eleven entries and a copy of the app's state."""
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self.scope = None  # type: ignore[assignment]
        self._head_size = 0
        if self._head_deadline is None:
            deadline = self._head_deadline = self.loop.time() + self.limits.header_timeout_s
            if self._timer is None or deadline < self._timer_at:
                self._time_for(deadline)

    def on_header(self, name: bytes, value: bytes) -> None:
        """uvicorn's, counting the head's size as it comes (checked at its end)."""
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))
        self._head_size += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._awaiting_head = False
        self._head_deadline = None
        if len(self.url) + self._head_size > self.limits.max_header_bytes:
            self._refuse(431, "The request line and headers are too large.")
            return
        self.dispatch()

    def dispatch(self) -> None:
        """A request's head is in and within the limits: start its ASGI cycle. An app's own
        protocol (``http_protocol``, see ``server_config``) may answer some without one."""
        self.scope = self.new_scope(self.headers)
        super().on_headers_complete()

    def new_scope(self, headers: list[tuple[bytes, bytes]]) -> Any:
        """The ASGI scope uvicorn's ``on_message_begin`` makes, for a request with ``headers``
        (uvicorn's ``on_headers_complete`` adds the method, path and query)."""
        return {
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "root_path": self.root_path,
            "headers": headers,
            "state": self.app_state.copy(),
        }

    def _should_upgrade(self) -> bool:
        # A refused request is never dispatched (no scope): nothing of it is upgraded either.
        return not self._refused and super()._should_upgrade()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        """uvicorn's: the request's body is whole (its cycle told so)."""
        if self._held is not None:
            self.held_complete()
        if self._refused:
            return
        self._awaiting_head = True
        self._head_bytes = 0
        if self.parser.should_upgrade() and self._should_upgrade():
            return
        cycle = self.cycle
        # A cycle that reads no body (more_body False from the start: an app's own, such as
        # the gateway's fast lane) has no one to wake.
        if cycle.more_body and not cycle.response_complete:
            cycle.more_body = False
            cycle.message_event.set()

    def held_complete(self) -> None:
        """The request whose body was held (``_held``) is whole: the subclass's to answer."""
        self._held = None

    def held_read_ended(self) -> None:
        """A read ended with the held request's body not yet whole: the subclass's to decide
        (it may keep holding it)."""

    def on_response_complete(self) -> None:
        """uvicorn's, with its keep-alive timer a deadline (see ``__init__``)."""
        if self._writes._pending:  # noqa: SLF001 - this module's own wrapper
            self._writes.flush()
        self.server_state.total_requests += 1
        if self.raw_transport.is_closing():
            return
        self._idle_deadline = None
        flow = self.flow
        if flow.read_paused:
            flow.resume_reading()
        if self.pipeline:  # the next request, which came while this one was answered
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            deadline = self._idle_deadline = self.loop.time() + self.timeout_keep_alive
            if self._timer is None or deadline < self._timer_at:
                self._time_for(deadline)

    def _unset_keepalive_if_required(self) -> None:
        # uvicorn calls it when bytes come, and when the connection is lost.
        self._idle_deadline = None

    def write_whole(self, data: bytes) -> None:
        """Write a whole answer at once (no loop step's coalescing: nothing follows it)."""
        if self._writes._pending:  # noqa: SLF001 - this module's own wrapper
            self._writes.write_now(data)
        else:
            self.raw_transport.write(data)

    def _arm(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self._deadline_in(self.limits.header_timeout_s)

    def _disarm(self, *, stop_timer: bool = False) -> None:
        self._head_deadline = None
        if stop_timer:
            self._idle_deadline = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _deadline_in(self, seconds: float) -> float:
        """A deadline ``seconds`` from now, the timer brought forward if it would be late
        (written out where it runs for every request: a call is most of its cost)."""
        deadline = self.loop.time() + seconds
        if self._timer is None or deadline < self._timer_at:
            self._time_for(deadline)
        return deadline

    def _time_for(self, deadline: float) -> None:
        """The connection's one timer, (re)set for ``deadline``."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(deadline, self._timer_fired)
        self._timer_at = deadline

    def _timer_fired(self) -> None:
        self._timer = None
        now = self.loop.time()
        head, idle = self._head_deadline, self._idle_deadline
        if head is not None and head <= now:
            self._head_deadline = None
            self._head_too_slow()
        if idle is not None and idle <= now:
            self._idle_deadline = None
            if not self.transport.is_closing():
                self.transport.close()  # idle past the keep-alive timeout, as uvicorn does
        if self.transport.is_closing():
            return
        # Early for a deadline moved on since (a later request's): wait for the nearest one.
        pending = [d for d in (self._head_deadline, self._idle_deadline) if d is not None]
        if pending:
            self._timer_at = min(pending)
            self._timer = self.loop.call_at(self._timer_at, self._timer_fired)

    def _head_too_slow(self) -> None:
        if not self._awaiting_head or self.transport.is_closing():
            return
        if self._head_bytes:
            self._refuse(408, "The request headers did not arrive in time.")
        else:
            self.transport.close()  # an idle connection that never asked anything

    def _refuse(self, status: int, detail: str) -> None:
        self._refused = True
        self._disarm(stop_timer=True)
        body = json.dumps(problem_body(status, instance="", detail=detail)).encode()
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s"
            % (status, reason, PROBLEM_JSON.encode(), len(body), body)
        )
        self.transport.close()


GuardedProtocol = _GuardedProtocol


def guarded_protocol(
    limits: ServerLimits, base: type[GuardedProtocol] = GuardedProtocol
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class with ``limits`` (uvicorn instantiates it per connection)."""
    return type("GuardedHttpProtocol", (base,), {"limits": limits})


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The certificate (chain) and key a process serves https with."""

    certfile: Path
    keyfile: Path

    @classmethod
    def of(cls, platform: PlatformSettings) -> TlsFiles | None:
        if platform.tls_certfile is None or platform.tls_keyfile is None:
            return None
        return cls(platform.tls_certfile, platform.tls_keyfile)


def server_config(
    app: ASGIApp,
    *,
    log_level: str = "INFO",
    proxy_headers: bool = True,
    limits: ServerLimits | None = None,
    tls: TlsFiles | None = None,
) -> uvicorn.Config:
    limits = limits or ServerLimits()
    # An app may bring its own subclass of the guarded protocol (the gateway's fast lane).
    base: type[GuardedProtocol] = getattr(app, "http_protocol", GuardedProtocol)
    return uvicorn.Config(
        app,
        ssl_certfile=tls.certfile if tls else None,
        ssl_keyfile=tls.keyfile if tls else None,
        http=guarded_protocol(limits, base),
        timeout_keep_alive=int(max(1, limits.keep_alive_s)),
        proxy_headers=proxy_headers,
        log_level=log_level.lower(),
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        server_header=False,
        date_header=False,
        log_config=None,
    )


def serve(
    app: ASGIApp,
    *,
    name: str,
    sock: socket.socket,
    log_level: str = "INFO",
    proxy_headers: bool = True,
    limits: ServerLimits | None = None,
    tls: TlsFiles | None = None,
) -> None:
    """Serve on an already bound socket until SIGINT/SIGTERM; announce the real port.

    The launcher reads the ``listening on`` line to learn the port a service got.
    ``proxy_headers=False`` for the edge (the gateway): there ``X-Forwarded-For`` comes from
    the caller and must not become the client address.
    """
    host, port = sock.getsockname()[:2]
    config = server_config(
        app, log_level=log_level, proxy_headers=proxy_headers, limits=limits, tls=tls
    )
    server = uvicorn.Server(config)
    scheme = "https" if tls else "http"
    logging.getLogger("shop").info("%s listening on %s://%s:%d", name, scheme, host, port)
    server.run(sockets=[sock])


def run(
    app: Starlette,
    *,
    name: str,
    host: str,
    port: int,
    log_level: str = "INFO",
    proxy_headers: bool = True,
    limits: ServerLimits | None = None,
    tls: TlsFiles | None = None,
) -> None:
    """Bind ``host:port`` (0 = any free port), tell the app the port it got, serve it."""
    sock = bind_socket(host, port)
    app.state.bound_port = sock.getsockname()[1]
    serve(
        app,
        name=name,
        sock=sock,
        log_level=log_level,
        proxy_headers=proxy_headers,
        limits=limits,
        tls=tls,
    )


def main(
    *,
    name: str,
    settings: type[S],
    build_app: AppBuilder[S],
    proxy_headers: bool = True,
    preflight: Callable[[PlatformSettings, S], None] | None = None,
    server_limits: Callable[[S], ServerLimits] | None = None,
) -> int:
    """A service process from start to end: every setting checked before anything is opened or
    bound — a refusal is one line on stderr and exit code 2 — then serve until SIGTERM.

    ``preflight`` is for refusals that need a look outside the settings (auth's stored admin).
    ``server_limits`` reads the connection limits from the process's own settings.
    """
    try:
        platform, loaded = load_settings(settings)
        if preflight is not None:
            preflight(platform, loaded)
        configure_logging(
            platform.log_level,
            service=name,
            # JSON for a log shipper on production, readable text on embedded, unless chosen.
            fmt=platform.log_format or ("json" if platform.profile == "production" else "text"),
            access_log=platform.access_log,
        )
        app = build_app(platform=platform, settings=loaded)
    except SettingsRefused as exc:
        print(f"{name} refuses to start: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    run(
        app,
        name=name,
        host=loaded.host,
        port=loaded.port,
        log_level=platform.log_level,
        proxy_headers=proxy_headers,
        limits=server_limits(loaded) if server_limits is not None else None,
        tls=TlsFiles.of(platform),
    )
    return 0
