"""The gateway's fast lane: the common request proxied from the HTTP protocol's own callbacks,
with no ASGI scope, cycle, task or message dicts.

uvicorn runs every request as a task driving an ASGI app through message dicts; for a proxy
whose whole work is a few dictionary look-ups and two socket writes, that machinery was most
of its CPU (docs/gateway.md, Performance). So the gateway's protocol (``GatewayProtocol``, a
subclass of the platform's guarded httptools protocol, which keeps the header deadline and
size limits) takes a request itself when all of this holds once its head is in:

- GET or HEAD, HTTP/1.1, no body (no Content-Length, no Transfer-Encoding), no upgrade, no
  earlier request of the connection still being answered (pipelining queues as usual);
- an origin-form target, canonical, on a routed **public** route (not the gateway's own
  endpoints; token and admin routes need an await to verify a token they have not seen);
- the service's instances known without asking the registry, a kept-alive connection to
  the chosen one (or the next candidate) idle, and the client's rate limit counted in
  memory and not reached.

Everything else, and every refusal (404, 405, 429...), goes the ordinary ASGI way
(``Proxy``), before anything is counted or sent. Once admitted, the request is sent at once
on the idle connection, and the service's answer, when it arrives whole, is written back
with the same header rules and ids as the ASGI path. What needs waiting or a problem answer
after that is handed to ``Proxy`` with what was done (``Handover``): an answer still
streaming in, a timeout (504), a connection that broke mid-answer (502), or one that broke
before answering (sent again on a new connection, as ``UpstreamPool.request`` does).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast
from urllib.parse import unquote

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

from shop.gateway.api import HANDOVER, OPS_PATHS, Handover, Identity, Proxy
from shop.gateway.domain import Access, Match, canonical_path, response_headers
from shop.platform.problems import Problem
from shop.platform.serve import GuardedProtocol
from shop.platform.upstream import Answer

__all__ = ["GatewayProtocol"]

_FAST_METHODS = {b"GET": "GET", b"HEAD": "HEAD"}
_OPS_PATHS = frozenset(path.encode() for path in OPS_PATHS)
_NO_BODY_STATUSES = frozenset({204, 304})


class GatewayProtocol(GuardedProtocol):
    """The guarded httptools protocol with the proxy's fast lane (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        proxy = getattr(self.app, "proxy", None)  # the GatewayApp, unless uvicorn wrapped it
        self._proxy = proxy if isinstance(proxy, Proxy) else None

    def dispatch(self) -> None:
        proxy = self._proxy
        if proxy is None or not self._take(proxy):
            super().dispatch()

    def _take(self, proxy: Proxy) -> bool:
        """Send the request on the fast lane; False, with nothing counted or sent, if it is
        not one the fast lane may take."""
        runtime = proxy.runtime
        if runtime is None or proxy.tracer is not None:
            return False  # not started yet; or traced, which the ASGI path does
        cycle = self.cycle
        if (cycle is not None and not cycle.response_complete) or self.pipeline:
            return False
        parser = self.parser
        method = _FAST_METHODS.get(parser.get_method())
        if method is None or parser.get_http_version() != "1.1" or parser.should_upgrade():
            return False
        url: bytes = self.url
        if url[:1] != b"/" or b"#" in url:
            return False  # absolute-form or a fragment: uvicorn's parser decides
        raw_path, _, query = url.partition(b"?")
        if raw_path in _OPS_PATHS or not canonical_path(raw_path):
            return False
        target = raw_path.decode("ascii")
        path = unquote(target) if "%" in target else target
        outcome = proxy.routes.match(method, path)
        if not isinstance(outcome, Match) or outcome.access is not Access.PUBLIC:
            return False
        headers = self.headers
        identity = proxy.identify(headers)
        if identity.has_body:
            return False
        route = outcome.route
        pool = runtime.pool
        for base_url in runtime.upstreams.ready_candidates(route.service) or ():
            if pool.has_idle(base_url):
                break
        else:
            return False
        peer = self.client[0] if self.client else "unknown"
        if not runtime.limits.admit_client_now(proxy.client_of(peer, headers)):
            return False
        # Admitted and counted: from here on the request is the fast lane's to finish.
        scope: Any = self.scope
        scope["method"] = method
        scope["path"] = path
        scope["raw_path"] = raw_path
        scope["query_string"] = query
        scope["route"] = route
        head = proxy.upstream_head(scope, target, identity, None)
        exchange = _Exchange(
            self,
            proxy,
            scope,
            identity=identity,
            method=method,
            service=route.service,
            base_url=base_url,
            head=head,
            keep_alive=parser.should_keep_alive(),
            timeout_s=runtime.settings.upstream_timeout_s,
        )
        # It stands in for uvicorn's cycle (the attributes uvicorn touches are there).
        self.cycle = cast(RequestResponseCycle, exchange)
        exchange.send()
        return True


class _Exchange:
    """One fast-lane request in flight. It stands in for uvicorn's ``RequestResponseCycle``
    as the protocol's ``cycle``, so that pipelined requests queue behind it and a lost
    connection or a shutdown reaches it (the attributes uvicorn touches are here)."""

    __slots__ = (
        "base_url",
        "began",
        "conn",
        "disconnected",
        "head",
        "identity",
        "keep_alive",
        "message_event",
        "method",
        "more_body",
        "protocol",
        "proxy",
        "response_complete",
        "scope",
        "service",
        "timeout_s",
    )

    def __init__(
        self,
        protocol: GatewayProtocol,
        proxy: Proxy,
        scope: Any,
        *,
        identity: Identity,
        method: str,
        service: str,
        base_url: str,
        head: bytes,
        keep_alive: bool,
        timeout_s: float,
    ) -> None:
        self.protocol = protocol
        self.proxy = proxy
        self.scope = scope
        self.identity = identity
        self.method = method
        self.service = service
        self.base_url = base_url
        self.head = head
        self.keep_alive = keep_alive
        self.timeout_s = timeout_s
        self.began = time.perf_counter()
        self.conn: Any = None
        self.response_complete = False
        self.disconnected = False
        self.more_body = False
        self.message_event = self  # uvicorn sets it when the caller leaves; nothing waits

    def set(self) -> None:
        """``message_event.set()``: nothing to wake."""

    def send(self) -> None:
        runtime = self.proxy.runtime
        assert runtime is not None  # noqa: S101 - checked before admitting
        conn = runtime.pool.send_now(self.base_url, self.head, head_only=self.method == "HEAD")
        if conn is None:  # the idle connection closed in the meantime
            self.hand_over(None)
            return
        self.conn = conn
        conn.listen(self.on_upstream, self.timeout_s)

    def on_upstream(self) -> None:
        """Something arrived on the service's connection (or broke, or timed out)."""
        conn = self.conn
        error = conn.error
        if error is not None:
            conn.listen(None)
            conn.close()
            if isinstance(error, TimeoutError):
                problem = Problem(
                    504, f"{self.service} did not answer within {self.timeout_s:g} s."
                )
                self.hand_over(problem)
            elif conn.headers or conn.head_done:
                self.hand_over(Problem(502, f"{self.service} broke off its answer."))
            else:
                # Most likely the service closed the kept-alive connection as the request
                # left (its idle timeout): GET and HEAD may go again (RFC 9110, 9.2.2).
                self.hand_over(None)
            return
        if not conn.head_done:
            return
        conn.listen(None)
        runtime = self.proxy.runtime
        assert runtime is not None  # noqa: S101 - checked before admitting
        if not conn.complete:  # a larger answer: streamed by the ASGI path
            self.hand_over(
                Answer(conn, pool=runtime.pool, key=self.base_url, timeout_s=self.timeout_s)
            )
            return
        status, headers = conn.status, conn.headers
        body = conn.take() if conn.chunks else b""
        runtime.pool.release(self.base_url, conn)
        self.answer(status, headers, body)

    def answer(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """Write the service's whole answer as uvicorn would have written the ASGI path's."""
        protocol = self.protocol
        self.response_complete = True
        self.proxy.observe(self.method, self.scope["route"].path, status, self.began, self.identity)
        if self.disconnected or protocol.transport.is_closing():
            return
        out = [STATUS_LINE[status]]
        out += [b"%s: %s\r\n" % pair for pair in protocol.server_state.default_headers]
        length = False
        for name, value in response_headers(headers):
            if name == b"content-length":
                length = True
            out.append(b"%s: %s\r\n" % (name, value))
        if not length and self.method != "HEAD" and status not in _NO_BODY_STATUSES:
            out.append(b"content-length: %d\r\n" % len(body))
        out.append(b"x-request-id: %s\r\n" % self.identity.stamp[1])
        if not self.keep_alive:
            out.append(b"connection: close\r\n")
        out.append(b"\r\n")
        if self.method != "HEAD":
            out.append(body)
        protocol.write_whole(b"".join(out))
        if not self.keep_alive:
            protocol.transport.close()
        protocol.on_response_complete()

    def hand_over(self, outcome: Answer | Problem | None) -> None:
        """Finish on the ASGI path: ``Proxy`` relays, answers or resends (see Handover)."""
        protocol = self.protocol
        scope = self.scope
        scope[HANDOVER] = Handover(
            identity=self.identity,
            began=self.began,
            service=self.service,
            method=self.method,
            head=self.head,
            outcome=outcome,
        )
        cycle = RequestResponseCycle(
            scope=scope,
            transport=protocol.transport,
            flow=protocol.flow,
            logger=protocol.logger,
            access_logger=protocol.access_logger,
            access_log=protocol.access_log,
            default_headers=protocol.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=False,
            keep_alive=self.keep_alive,
            on_response=protocol.on_response_complete,
        )
        cycle.more_body = False
        cycle.disconnected = self.disconnected
        self.response_complete = True
        if protocol.cycle is cast(RequestResponseCycle, self):
            protocol.cycle = cycle
        protocol._start_asgi_task(cycle, protocol.app)  # noqa: SLF001 - uvicorn's own way
