"""The gateway's fast lane: the common request proxied from the HTTP protocol's own callbacks,
with no ASGI scope, cycle, task or message dicts.

uvicorn runs every request as a task driving an ASGI app through message dicts; for a proxy
whose whole work is a few dictionary look-ups and two socket writes, that machinery was most
of its CPU (docs/gateway.md, Performance). So the gateway's protocol (``GatewayProtocol``, a
subclass of the platform's guarded httptools protocol, which keeps the header deadline and
size limits) takes a request itself when all of this holds once it is in:

- HTTP/1.1, no upgrade, no earlier request of the connection still being answered
  (pipelining queues as usual), an origin-form target, canonical, on a routed method and
  path (not the gateway's own endpoints);
- no body, or a ``Content-Length`` body of at most 64 KiB (and the body limit) that arrived
  with the same read as the end of the headers: its head is held back until the end of the
  read, and a body still to come, chunked or awaiting ``100-continue`` goes the ASGI way;
- on a token or admin route, a bearer token ``JwksVerifier.cached`` decides now (verified
  before, or signed by a key held and fresh), of a user, with the admin role on admin
  routes;
- the service's instances known without asking the registry, a kept-alive connection to
  the one whose turn it is idle, and the client's (and the user's) rate limits counted in
  memory and not reached.

Everything else, and every refusal (401, 403, 404, 405, 413, 429...), goes the ordinary ASGI
way (``Proxy``), before anything is counted or sent; a token ``cached`` refused is refused
there with the same answer, without being checked twice. Once admitted, the request is sent
at once on the idle connection, and the service's answer, when it arrives whole, is written
back with the same header rules and ids as the ASGI path. What needs waiting or a problem
answer after that is handed to ``Proxy`` with what was done (``Handover``): an answer still
streaming in, a timeout (504), a connection that broke mid-answer (502), or one that broke
before answering (sent again on a new connection for idempotent methods, as
``UpstreamPool.request`` does; 502 for the others, which may have been applied).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import Any, cast
from urllib.parse import unquote

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

from shop.gateway.api import (
    HANDOVER,
    OPS_PATHS,
    GatewayRuntime,
    Handover,
    Identity,
    Proxy,
    with_identity,
)
from shop.gateway.domain import Access, Match, Route, canonical_path, response_headers
from shop.platform.breaker import BreakerState, CircuitBreaker
from shop.platform.problems import Problem
from shop.platform.security import SERVICE_ROLE, bearer_token
from shop.platform.serve import GuardedProtocol
from shop.platform.upstream import Answer

__all__ = ["GatewayProtocol"]

_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH")}
_OPS_PATHS = frozenset(path.encode() for path in OPS_PATHS)
_NO_BODY_STATUSES = frozenset({204, 304})
# As the ASGI path (gateway/api.py, service.py): these always tell the service their length;
# these may be sent again when a kept-alive connection breaks before any answer.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE"})
# The headers llhttp reads keep-alive from (HTTP/1.0 is kept alive only when one asks).
_CONNECTION_HEADERS = frozenset({b"connection", b"proxy-connection"})
# The headers that announce a request body (see _awaits_body).
_BODY_HEADERS = frozenset({b"content-length", b"transfer-encoding"})
# What a bearer token is made of (platform/security.py's pattern, which is what decides):
# ``Bearer <these>`` is checked with one translate instead of a regex over the whole token.
_TOKEN_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~+/=-"
# The largest body the fast lane holds back for (an order is a few hundred bytes); uvicorn
# pauses reading past 64 KiB buffered, so a larger one is the ASGI path's to stream.
MAX_FAST_BODY = 64 * 1024
# Kept decisions (see _Plan, _answer_head): bounded, as paths and answers are the callers' and
# the services' choice; a full table starts again empty.
_MAX_KEPT = 1024


class _Plan:
    """What the fast lane concludes from a request's method and path alone: it is canonical,
    routed, not one of the gateway's own endpoints. Kept per (method, path) for each ``Proxy``
    (its route table never changes), so that a path seen before costs one look-up; the
    runtime's breaker and timeout of the route are kept too, for the runtime they came from."""

    __slots__ = (
        "access",
        "breaker",
        "method",
        "path",
        "raw_path",
        "route",
        "runtime",
        "target",
        "timeout_s",
    )

    def __init__(self, method: str, raw_path: bytes, target: str, path: str, match: Match) -> None:
        self.method = method
        self.raw_path = raw_path
        self.target = target
        self.path = path
        self.route: Route = match.route
        self.access = match.access
        self.runtime: GatewayRuntime | None = None
        self.breaker: CircuitBreaker | None = None
        self.timeout_s = 0.0


_UNSEEN: Any = object()
_PLANS: weakref.WeakKeyDictionary[Proxy, dict[tuple[bytes, bytes], _Plan | None]] = (
    weakref.WeakKeyDictionary()
)


def _plan(proxy: Proxy, method: bytes, raw_path: bytes) -> _Plan | None:
    """The plan of a request not seen before (None: not one for the fast lane)."""
    plan = None
    name = _METHODS.get(method)
    if name is not None and raw_path not in _OPS_PATHS and canonical_path(raw_path):
        target = raw_path.decode("ascii")
        path = unquote(target) if "%" in target else target
        outcome = proxy.routes.match(name, path)
        if isinstance(outcome, Match):
            plan = _Plan(name, raw_path, target, path, outcome)
    plans = _PLANS[proxy]
    if len(plans) >= _MAX_KEPT:
        plans.clear()
    plans[method, raw_path] = plan
    return plan


class GatewayProtocol(GuardedProtocol):
    """The guarded httptools protocol with the proxy's fast lane (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        proxy = getattr(self.app, "proxy", None)  # the GatewayApp, unless uvicorn wrapped it
        self._proxy = proxy if isinstance(proxy, Proxy) else None
        self._plans = _PLANS.setdefault(self._proxy, {}) if self._proxy is not None else {}
        # The last request's upstream head without its ids, and what it was made from (method,
        # target, body length, and the plan and query string they gave): a client sends the
        # same request line and headers again and again on its connection.
        self._head_of: tuple[bytes, bytes, int | None, _Plan, bytes] | None = None
        self._head_headers: list[tuple[bytes, bytes]] = []
        self._head_parts = (b"", b"")
        self._head_plain = False  # that head has no Connection header (see _take)
        self._head_bodiless = False  # nor Content-Length or Transfer-Encoding (see dispatch)
        self._head_client = ""  # the client it names (Proxy.client_of)
        # That head with each instance's Host line, as the pool would insert it (send_now).
        self._hosted: dict[str, bytes] = {}
        # The last answer's head (_answer_head) and what it was made of: a connection's
        # answers come from the same service, and comparing is cheaper than hashing the key.
        self._answer_of: tuple[int, bool, list[tuple[bytes, bytes]], object] | None = None
        self._answer_made = (b"", False)

    def dispatch(self) -> None:
        proxy = self._proxy
        if proxy is None:
            super().dispatch()
            return
        # The connection's last head again, which announced no body: _awaits_body would say
        # no after a loop over the headers.
        repeated = self._head_bodiless and self.headers == self._head_headers
        if not repeated and self._awaits_body(proxy):
            # The request's head is held back until its body is whole, and decided then
            # (held_complete), or goes the ASGI way if the read ends first (held_read_ended).
            self._held = []
        elif not self._take(proxy):
            super().dispatch()

    def on_body(self, body: bytes) -> None:
        if self._held is None:
            super().on_body(body)
        else:
            self._held.append(body)

    def held_complete(self) -> None:
        held = self._held
        assert held is not None  # noqa: S101 - called only while a body is held
        self._held = None
        body = b"".join(held)
        if self._proxy is None or not self._take(self._proxy, body):
            self._start_cycle(body)

    def held_read_ended(self) -> None:
        # The body did not all come with this read: the ASGI path reads the rest (and keeps
        # the body deadline); the fast lane waits for no one.
        held = self._held
        assert held is not None  # noqa: S101 - called only while a body is held
        self._held = None
        if not self.transport.is_closing():
            self._start_cycle(b"".join(held))

    def _start_cycle(self, body: bytes) -> None:
        """Start the ASGI cycle of a request held back for its body, with what came of it."""
        super().dispatch()
        if body:
            self.cycle.body += body
            self.cycle.message_event.set()

    def _awaits_body(self, proxy: Proxy) -> bool:
        """Whether the request announces a body the fast lane may take once it is whole."""
        if proxy.runtime is None or self.expect_100_continue:
            return False
        cycle = self.cycle
        if (cycle is not None and not cycle.response_complete) or self.pipeline:
            return False
        length = None
        for name, value in self.headers:
            if name == b"content-length":
                if length is not None or not value.isdigit():
                    return False
                length = int(value)
            elif name == b"transfer-encoding":
                return False
        return length is not None and length <= min(MAX_FAST_BODY, proxy.max_body_bytes)

    def _take(self, proxy: Proxy, body: bytes | None = None) -> bool:
        """Send the request on the fast lane; False, with nothing counted or sent, if it is
        not one the fast lane may take. ``body``: the whole body, when one was announced."""
        runtime = proxy.runtime
        if runtime is None:
            return False  # not started yet
        cycle = self.cycle
        if (cycle is not None and not cycle.response_complete) or self.pipeline:
            return False
        parser = self.parser
        url: bytes = self.url
        method_bytes = parser.get_method()
        headers = self.headers
        last = self._head_of
        if (
            body is None
            and last is not None
            and last[2] is None
            and last[1] == url
            and last[0] == method_bytes
            and headers == self._head_headers
        ):
            # The connection's last head taken, again, without a body: its target, plan and
            # upgrade were checked then, and the same method, target and headers decide the
            # same now.
            made_of, same = last, True
            plan, query, length = last[3], last[4], None
        else:
            if url[:1] != b"/" or b"#" in url:
                return False  # absolute-form or a fragment: uvicorn's parser decides
            raw_path, _, query = url.partition(b"?")
            found = self._plans.get((method_bytes, raw_path), _UNSEEN)
            if found is _UNSEEN:
                found = _plan(proxy, method_bytes, raw_path)
            if found is None or parser.should_upgrade():
                return False
            plan = found
            length = len(body or b"") if body or plan.method in _BODY_METHODS else None
            made_of = (method_bytes, url, length, plan, query)
            same = made_of == last and headers == self._head_headers
        method, route = plan.method, plan.route
        keep_alive = parser.should_keep_alive()
        # HTTP/1.1 only. Asking the parser formats a string (0.6 µs a request); llhttp keeps
        # an HTTP/1.0 request alive only when a Connection (or Proxy-Connection) header asks,
        # so one kept alive without such a header is 1.1, and a connection that repeats its
        # last head is known to have none or not (_head_plain).
        if not (same and keep_alive and self._head_plain) and parser.get_http_version() != "1.1":
            return False
        identity = proxy.identify(headers)
        if identity.has_body and body is None:
            return False
        if plan.runtime is not runtime:
            plan.runtime = runtime
            plan.breaker = runtime.breakers.of(route.service)
            plan.timeout_s = runtime.timeouts.of(route, method)
        breaker = plan.breaker
        assert breaker is not None  # noqa: S101 - set with the runtime
        # A circuit not closed is the ASGI path's to answer (503) or to probe.
        if breaker.state is not BreakerState.CLOSED:
            return False
        # The round-robin's choice only: passing on to the next instance when it has no idle
        # connection would keep sending everything to whichever instance has one (the fast
        # lane opens none), and a quiet client's requests would never alternate again.
        candidates = runtime.upstreams.ready_candidates(route.service)
        if not candidates or not runtime.pool.has_idle(candidates[0]):
            return False
        base_url = candidates[0]
        user = None
        if plan.access is not Access.PUBLIC:
            user = _user_now(proxy, headers, admin=plan.access is Access.ADMIN)
            if user is None:
                return False
        if same:  # the client a connection's headers name is known for its repeated head
            client = self._head_client
        else:
            client = proxy.client_of(self.client[0] if self.client else "unknown", headers)
        limits = runtime.limits
        if not (
            limits.admit_client_now(client) if user is None else limits.admit_now(client, user)
        ):
            return False
        # Admitted and counted: from here on the request is the fast lane's to finish.
        body = body or b""
        if same:
            before, after = self._head_parts
        else:
            scope = self.request_scope(headers, plan, query)
            before, after = proxy.upstream_head_parts(scope, plan.target, length)
            self._head_of, self._head_headers = made_of, headers.copy()
            self._head_parts = before, after
            self._head_client = client
            self._head_plain = not any(name in _CONNECTION_HEADERS for name, _ in headers)
            self._head_bodiless = not any(name in _BODY_HEADERS for name, _ in headers)
            self._hosted = {}
        hosted = self._hosted.get(base_url)
        if hosted is None:
            hosted = self._hosted[base_url] = runtime.pool.with_host(base_url, before)
        head = with_identity(hosted, identity, after)
        exchange = _Exchange(
            self,
            proxy,
            plan,
            headers,
            query,
            identity,
            breaker,
            base_url,
            # The body rides after the head (with its instance's Host line): what is sent,
            # and, without the Host line, sent again (Handover.head).
            head + body if body else head,
            keep_alive,
            plan.timeout_s,
        )
        # It stands in for uvicorn's cycle (the attributes uvicorn touches are there).
        self.cycle = exchange  # type: ignore[assignment]
        exchange.send()
        return True

    def request_scope(self, headers: list[tuple[bytes, bytes]], plan: _Plan, query: bytes) -> Any:
        """The ASGI scope of a request the fast lane took, as uvicorn would have made it (made
        only when needed: a new upstream head, a handover)."""
        scope = self.new_scope(headers)
        scope["method"] = plan.method
        scope["path"] = plan.path
        scope["raw_path"] = plan.raw_path
        scope["query_string"] = query
        scope["route"] = plan.route
        return scope


def _user_now(proxy: Proxy, headers: list[tuple[bytes, bytes]], *, admin: bool) -> str | None:
    """The user a token route may be proxied for at once: the bearer token's ``sub`` when the
    verifier decides it now, a user's (not a service's) token, an admin's on admin routes.
    None for anything else, which ``Proxy`` answers (401, 403, 503) as it always has."""
    runtime = proxy.runtime
    assert runtime is not None  # noqa: S101 - checked by the caller
    authorization = None
    for name, value in headers:
        if name == b"authorization":
            authorization = value
            break
    if authorization is None:
        return None
    token = _bearer(authorization)
    if token is None:
        return None
    principal = runtime.verifier.cached(token)
    if principal is None or SERVICE_ROLE in principal.roles or principal.service_name:
        return None
    if admin and not principal.is_admin:
        return None
    return principal.user_id


def _bearer(authorization: bytes) -> str | None:
    """``bearer_token``, the plain form first: its case-insensitive regex costs ~40 µs over a
    700-byte token, one ``translate`` less than one; any other form is the regex's to judge."""
    if authorization[:7].lower() == b"bearer ":
        token = authorization[7:]
        if token and not token.translate(None, _TOKEN_BYTES):
            return token.decode("ascii")
    return bearer_token(authorization.decode("latin-1"))


_ANSWER_HEADS: dict[tuple[Any, ...], tuple[bytes, bool]] = {}


def _answer_head(
    status: int,
    headers: list[tuple[bytes, bytes]],
    default_headers: list[tuple[bytes, bytes]],
    *,
    head_only: bool,
) -> tuple[bytes, bool]:
    """The start of the caller's answer (status line, the server's default headers, the
    service's headers as ``response_headers`` passes them) and whether a ``Content-Length``
    must be added. Kept by what it is made of: a service sends the same headers again and
    again (its ``Date`` changes once a second), so most answers cost one look-up."""
    key = (status, head_only, tuple(headers), tuple(default_headers))
    made = _ANSWER_HEADS.get(key)
    if made is None:
        out = [STATUS_LINE[status]]
        out += [b"%s: %s\r\n" % pair for pair in default_headers]
        length = False
        for name, value in response_headers(headers):
            if name == b"content-length":
                length = True
            out.append(b"%s: %s\r\n" % (name, value))
        add_length = not length and not head_only and status not in _NO_BODY_STATUSES
        made = (b"".join(out), add_length)
        if len(_ANSWER_HEADS) >= _MAX_KEPT:
            _ANSWER_HEADS.clear()
        _ANSWER_HEADS[key] = made
    return made


def _unhosted(head: bytes) -> bytes:
    """A head sent with its instance's Host line (``UpstreamPool.with_host``) without it."""
    line_end = head.index(b"\r\n") + 2
    return head[:line_end] + head[head.index(b"\r\n", line_end) + 2 :]


class _NothingWaits:
    """An exchange's ``message_event``: uvicorn sets it when the caller leaves, and nothing
    of the fast lane's waits on it."""

    __slots__ = ()

    def set(self) -> None:
        """Nothing to wake."""


_NOTHING_WAITS = _NothingWaits()


class _Exchange:
    """One fast-lane request in flight. It stands in for uvicorn's ``RequestResponseCycle``
    as the protocol's ``cycle``, so that pipelined requests queue behind it and a lost
    connection or a shutdown reaches it (the attributes uvicorn touches are here)."""

    __slots__ = (
        "base_url",
        "began",
        "breaker",
        "conn",
        "disconnected",
        "head",
        "identity",
        "keep_alive",
        "message_event",
        "more_body",
        "plan",
        "protocol",
        "proxy",
        "query",
        "request_headers",
        "response_complete",
        "timeout_s",
    )

    def __init__(
        self,
        protocol: GatewayProtocol,
        proxy: Proxy,
        plan: _Plan,
        request_headers: list[tuple[bytes, bytes]],
        query: bytes,
        identity: Identity,
        breaker: CircuitBreaker,
        base_url: str,
        head: bytes,
        keep_alive: bool,
        timeout_s: float,
    ) -> None:
        # Made for every request: arguments by position (keywords cost ~0.3 µs a request),
        # the method and service read from the plan when needed.
        self.protocol = protocol
        self.proxy = proxy
        self.plan = plan
        self.request_headers = request_headers
        self.query = query
        self.identity = identity
        self.breaker = breaker
        self.base_url = base_url
        self.head = head
        self.keep_alive = keep_alive
        self.timeout_s = timeout_s
        self.began = time.perf_counter()
        self.conn: Any = None
        self.response_complete = False
        self.disconnected = False
        self.more_body = False
        # uvicorn sets it when the caller leaves; nothing waits. Not ``self`` (with a ``set``
        # of its own), as it was: that made every exchange a reference cycle, its identity,
        # headers and trace left for the garbage collector (~3 µs a request in collections).
        self.message_event = _NOTHING_WAITS

    def send(self) -> None:
        runtime = self.proxy.runtime
        assert runtime is not None  # noqa: S101 - checked before admitting
        conn = runtime.pool.send_now(
            self.base_url,
            self.head,
            head_only=self.plan.method == "HEAD",
            hosted=True,
        )
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
                # Not sent again (it may have been applied), but passed over for a while.
                runtime = self.proxy.runtime
                if runtime is not None:
                    runtime.upstreams.refused(self.base_url, self.plan.route.service)
                problem = Problem(
                    504, f"{self.plan.route.service} did not answer within {self.timeout_s:g} s."
                )
                self.hand_over(problem)
            elif conn.headers or conn.head_done or self.plan.method not in _IDEMPOTENT:
                self.hand_over(Problem(502, f"{self.plan.route.service} broke off its answer."))
            else:
                # Most likely the service closed the kept-alive connection as the request
                # left (its idle timeout): an idempotent one may go again (RFC 9110, 9.2.2).
                self.hand_over(None)
            return
        if not conn.head_done:
            return
        conn.listener = None  # listen(None), without the call
        self.breaker.succeeded()  # any answer is the service answering, as on the ASGI path
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
        plan = self.plan
        method, template = plan.method, plan.route.path
        self.proxy.observe(method, template, status, self.began, self.identity)
        if self.identity.span is not None:  # traced: the proxy's span ends with its answer
            self.identity.span.end(method, template, status)
        if self.disconnected or protocol.raw_transport.is_closing():
            return
        head_only = method == "HEAD"
        defaults = protocol.server_state.default_headers
        last = protocol._answer_of  # noqa: SLF001 - the protocol's memo, kept for its exchanges
        if (
            last is not None
            and last[0] == status
            and last[1] is head_only
            and last[3] is defaults
            and last[2] == headers
        ):
            start, add_length = protocol._answer_made  # noqa: SLF001
        else:
            start, add_length = _answer_head(status, headers, defaults, head_only=head_only)
            protocol._answer_of = (status, head_only, headers, defaults)  # noqa: SLF001
            protocol._answer_made = start, add_length  # noqa: SLF001
        request_id = self.identity.stamp[1]
        if add_length and self.keep_alive and not head_only:  # the usual answer: one format
            answer = b"%scontent-length: %d\r\nx-request-id: %s\r\n\r\n%s" % (
                start,
                len(body),
                request_id,
                body,
            )
        else:
            out = [start]
            if add_length:
                out.append(b"content-length: %d\r\n" % len(body))
            out.append(b"x-request-id: %s\r\n" % request_id)
            if not self.keep_alive:
                out.append(b"connection: close\r\n")
            out.append(b"\r\n")
            if not head_only:
                out.append(body)
            answer = b"".join(out)
        protocol.write_whole(answer)
        if not self.keep_alive:
            protocol.transport.close()
        protocol.on_response_complete()

    def hand_over(self, outcome: Answer | Problem | None) -> None:
        """Finish on the ASGI path: ``Proxy`` relays, answers or resends (see Handover)."""
        protocol = self.protocol
        scope = protocol.request_scope(self.request_headers, self.plan, self.query)
        scope[HANDOVER] = Handover(
            identity=self.identity,
            began=self.began,
            service=self.plan.route.service,
            method=self.plan.method,
            head=_unhosted(self.head),  # sent again, maybe to another instance: its own Host
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
