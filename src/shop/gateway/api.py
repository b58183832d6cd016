"""The gateway's HTTP surface: the proxy (plain ASGI, the hot path) and its own operations
endpoints (/health, /metrics, /docs, /openapi.json)."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Awaitable, Callable, Container, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import unquote

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, Metric, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as StarletteRoute
from starlette.types import Message, Receive, Scope, Send

from shop.gateway.domain import (
    Access,
    Match,
    MethodNotAllowed,
    Route,
    RouteTable,
    RouteTimeouts,
    canonical_path,
    request_head,
    response_headers,
    upstream_headers,
)
from shop.gateway.ratelimit import RateLimits
from shop.gateway.service import ApiCatalogue, Upstreams, admit, forward
from shop.gateway.settings import GatewaySettings
from shop.platform import context, logs, telemetry
from shop.platform.breaker import BreakerState, CircuitBreaker, CircuitOpen
from shop.platform.discovery import Heartbeat, RegistryClient
from shop.platform.middleware import LATENCY_BUCKETS, HttpMetrics
from shop.platform.observe import BreakerStates
from shop.platform.problems import Problem, problem_response, send_problem
from shop.platform.settings import PlatformSettings
from shop.platform.tokens import JwksVerifier
from shop.platform.upstream import Answer, UpstreamBroken, UpstreamPool

__all__ = [
    "HANDOVER",
    "OPS_PATHS",
    "GatewayRuntime",
    "Handover",
    "Identity",
    "Proxy",
    "ProxyMetrics",
    "ReadinessCheck",
    "with_identity",
    "UpstreamBreakers",
    "ops_routes",
]

log = logging.getLogger("shop.gateway")

OPS_PATHS = frozenset(
    {"/health", "/health/live", "/health/ready", "/metrics", "/docs", "/openapi.json"}
)
ReadinessCheck = Callable[[], Awaitable[None]]
# What a service's circuit counts as failing: no answer in time (504), or the connection
# broken before an answer (502). A refused connection is not counted: it costs the caller
# nothing, the next instance is tried and the refusing one passed over (service.py), and
# a restarted service must be used as soon as it is registered, not after an open period.
_BREAKING = frozenset({502, 504})


class UpstreamBreakers:
    """The gateway's circuit breaker per service it routes to (shop.platform.breaker), made
    when first needed: consecutive timeouts open it, and while it is open the service's
    routes are answered 503 with ``Retry-After`` at once; then one request probes.

    ``clock`` is read by every breaker at each call: a test may replace it."""

    def __init__(
        self,
        *,
        failure_threshold: int,
        open_for_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, BreakerState], None] = lambda _service, _state: None,
    ) -> None:
        self.clock = clock
        self._threshold = failure_threshold
        self._open_for_s = open_for_s
        self._on_change = on_change
        self._breakers: dict[str, CircuitBreaker] = {}
        self.transitions: Counter[tuple[str, str]] = Counter()

    def of(self, service: str) -> CircuitBreaker:
        breaker = self._breakers.get(service)
        if breaker is None:
            breaker = self._breakers[service] = CircuitBreaker(
                name=service,
                failure_threshold=self._threshold,
                open_for_s=self._open_for_s,
                clock=lambda: self.clock(),
                on_change=partial(self._changed, service),
            )
        return breaker

    def all(self) -> list[CircuitBreaker]:
        return list(self._breakers.values())

    def degraded(self) -> dict[str, str]:
        """``breaker:<service>`` -> why, for every circuit not closed (docs/observability.md)."""
        return {
            f"breaker:{b.name}": (
                f"circuit to {b.name} is {b.state.value}: its routes are answered 503 at once"
            )
            for b in self._breakers.values()
            if b.state is not BreakerState.CLOSED
        }

    def _changed(self, service: str, state: BreakerState) -> None:
        self.transitions[(service, state.value)] += 1
        self._on_change(service, state)


@dataclass(slots=True)
class GatewayRuntime:
    """What the gateway opens in its lifespan; the proxy finds it on ``app.state.gateway``."""

    platform: PlatformSettings
    settings: GatewaySettings
    http: aiohttp.ClientSession
    pool: UpstreamPool
    registry: RegistryClient
    upstreams: Upstreams
    verifier: JwksVerifier
    catalogue: ApiCatalogue
    limits: RateLimits
    heartbeat: Heartbeat | None = None
    readiness: dict[str, ReadinessCheck] = field(default_factory=dict)
    # From the settings: the timeout of each routed method and route, a breaker per service.
    timeouts: RouteTimeouts = field(init=False)
    breakers: UpstreamBreakers = field(init=False)

    def __post_init__(self) -> None:
        self.timeouts = self.settings.timeouts()
        self.breakers = UpstreamBreakers(
            failure_threshold=self.settings.breaker_failure_threshold,
            open_for_s=self.settings.breaker_open_s,
            on_change=self._breaker_changed,
        )

    def _breaker_changed(self, _service: str, _state: BreakerState) -> None:
        """The registry's dashboard shows the gateway DEGRADED while a circuit is open."""
        if self.heartbeat is not None:
            reasons = self.breakers.degraded()
            self.heartbeat.report_health(
                "DEGRADED" if reasons else "UP",
                "; ".join(f"{name}: {why}" for name, why in reasons.items()) or None,
            )


class _AnswerStarted(Exception):
    """The service failed mid-answer: the caller's connection must be cut, not answered."""


@dataclass(slots=True)
class Identity:
    """What one pass over a request's headers finds, and the ids the gateway gives it."""

    request_id: str
    trace: context.TraceContext
    stamp: tuple[bytes, bytes]  # the answer's X-Request-ID
    upstream: tuple[tuple[bytes, bytes], ...]  # the service's X-Request-ID and traceparent
    declared: bytes | None  # Content-Length
    has_body: bool
    span: Any = None  # the request's server span (ServerSpans.start), when spans are exported


# The scope key of a request the fast lane (gateway/fastlane.py) began and hands over.
HANDOVER = "shop.gateway.handover"


@dataclass(slots=True)
class Handover:
    """A request the fast lane admitted and sent, finished on the ASGI path: ``outcome`` is
    the service's answer to relay (it streams), the problem to answer (504, 502), or None to
    send the request again on a new connection (a kept-alive one broke before any answer)."""

    identity: Identity
    began: float  # time.perf_counter() when the request's head was in
    service: str
    method: str
    head: bytes
    outcome: Answer | Problem | None


class Proxy:
    """Everything but the operations paths: the hot path, plain ASGI with no router, framework
    or middleware stack in the way. What the platform middlewares do for every other app
    (request identity, body limit and deadline, metrics) is done here inline, once.

    Order of refusals: a declared body over the limit is 413 first; then the client's rate
    limit; a non-canonical or /internal path is 404, an unrouted path 404, a routed path with
    another method 405, then the route's rule (401/403) and the user's rate limit; then the
    body is read (413, 408), and only then is a service looked up.
    """

    def __init__(
        self,
        *,
        routes: RouteTable,
        metrics: HttpMetrics,
        max_body_bytes: int,
        body_timeout_s: float,
        trusted_proxies: Container[str] = frozenset(),
        service: str = "api-gateway",
    ) -> None:
        self.routes = routes
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.trusted_proxies = trusted_proxies
        self.runtime: GatewayRuntime | None = None  # set by the lifespan
        self.counts = ProxyMetrics(metrics)
        # Request and trace ids only need to be unique, not unpredictable: one draw of a
        # seeded PRNG instead of three reads of the OS's entropy per request.
        self._random_bits = random.Random(os.urandom(32)).getrandbits  # noqa: S311
        # The proxy's own server span (no ASGI instrumentation wraps it), started when the
        # sampler says so; None: tracing off.
        self.spans = telemetry.server_spans(telemetry.tracer_provider(service), "shop.gateway")
        metrics.registry.register(_BreakerMetrics(self, metrics.service))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handover: Handover | None = scope.get(HANDOVER)
        if handover is None:
            began = time.perf_counter()
            identity = self.identify(scope["headers"])
        else:
            began, identity = handover.began, handover.identity
        context.bind(request_id=identity.request_id, trace=identity.trace)
        stamp = identity.stamp
        status = 500
        started = False
        try:
            if handover is None:
                answer = await self._admit_and_forward(scope, receive, identity)
            else:
                answer = await self._finish(handover, scope["route"])
            if answer is not None:
                status, started = answer.status, True
                await _relay(answer, send, stamp)
        except Problem as problem:
            status = problem.status
            await _send_stamped_problem(send, stamp, problem, instance=scope["path"])
        except _AnswerStarted as exc:
            log.warning(
                "%s %s: the service broke off mid-answer (%s)", scope["method"], scope["path"], exc
            )
            raise  # the server cuts the connection: a truncated body must not look complete
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            status = 500
            await _send_stamped_problem(
                send,
                stamp,
                Problem(
                    500, "An unexpected error occurred. Quote the requestId when reporting it."
                ),
                instance=scope["path"],
            )
        finally:
            route = scope.get("route")
            template = route.path if route else None
            self.observe(scope["method"], template, status, began, identity)
            if identity.span is not None:  # named by its route template, like the metrics
                identity.span.end(scope["method"], template, status)

    def identify(self, headers: list[tuple[bytes, bytes]]) -> Identity:
        """Request id and trace (the caller's when valid, else new ones), the body's length."""
        caller_request_id = caller_trace = declared = None
        has_body = False
        for name, value in headers:
            if name == b"x-request-id":
                if caller_request_id is None:
                    caller_request_id = value
            elif name == b"traceparent":
                if caller_trace is None:
                    caller_trace = value
            elif name == b"content-length":
                if declared is None:
                    declared = value
                has_body = True
            elif name == b"transfer-encoding":
                has_body = True
        fresh = self._random_bits(384).to_bytes(48, "little").hex()  # cheaper than f"{:096x}"
        request_id = (
            context.accept_request_id(caller_request_id.decode("latin-1"))
            if caller_request_id
            else fresh[:32]
        )
        caller = context.parse_traceparent(caller_trace.decode("latin-1")) if caller_trace else None
        span = None
        flags = caller.flags if caller else "01"
        spans = self.spans
        if spans is not None:
            if spans.sampled(caller, fresh[32:64]):
                span = spans.start(caller, fresh[32:64], fresh[64:80])
            elif caller is None:
                flags = "00"  # a new trace not sampled: no span, and the services make none
        if span is None:
            # Arguments by position, here and below: keywords cost 0.2-0.3 µs a construction.
            trace = caller or context.TraceContext(fresh[32:64], fresh[64:80], flags)
            child = f"00-{trace.trace_id}-{fresh[80:96]}-{trace.flags}".encode()
        else:  # the service's parent is the gateway's span
            trace = span.trace
            child = trace.traceparent.encode()
        stamp = (b"x-request-id", request_id.encode("latin-1"))
        return Identity(
            request_id, trace, stamp, (stamp, (b"traceparent", child)), declared, has_body, span
        )

    def observe(
        self, method: str, template: str | None, status: int, began: float, identity: Identity
    ) -> None:
        """Count the request under its route (never the raw path) and its status, and write
        its access line with ``identity``'s ids (the fast lane has no context bound)."""
        seconds = time.perf_counter() - began
        template = template or "unmatched"
        self.counts.observe(method, template, status, seconds)
        logs.access(
            self.metrics.service,
            method,
            template,
            status,
            seconds,
            identity.request_id,
            identity.trace,
        )

    def client_of(self, peer: str, headers: list[tuple[bytes, bytes]]) -> str:
        """The peer, or behind a trusted load balancer the address it appended last."""
        if peer not in self.trusted_proxies:
            return peer
        forwarded = [v for n, v in headers if n == b"x-forwarded-for"]
        if not forwarded:
            return peer
        # The balancer appends its hop last; anything before it a client may have written.
        last = forwarded[-1].decode("latin-1").rsplit(",", 1)[-1].strip()
        return last[:64] or peer

    def upstream_head(
        self, scope: Scope, target: str, identity: Identity, body_length: int | None
    ) -> bytes:
        """The request line and headers the service gets (``target``: the canonical path)."""
        before, after = self.upstream_head_parts(scope, target, body_length)
        return with_identity(before, identity, after)

    def upstream_head_parts(
        self, scope: Scope, target: str, body_length: int | None
    ) -> tuple[bytes, bytes]:
        """``upstream_head`` without the request's own ids: what comes before them and after
        (the same for every request of a connection that repeats its request; the fast lane
        keeps it)."""
        client = scope.get("client")
        headers = upstream_headers(
            scope["headers"],
            client_ip=client[0] if client else None,
            scheme=scope.get("scheme", "http"),
            identity=(),
            trusted_proxies=self.trusted_proxies,
        )
        query: bytes = scope.get("query_string", b"")
        if query:
            target += "?" + query.decode("latin-1")
        before = request_head(scope["method"], target, headers)[:-2]  # without the blank line
        if body_length is None:
            return before, b"\r\n"
        return before, b"content-length: %d\r\n\r\n" % body_length

    async def _finish(self, handover: Handover, route: Route) -> Answer:
        """The rest of a request the fast lane began (see Handover)."""
        outcome = handover.outcome
        runtime = self.runtime
        assert runtime is not None  # noqa: S101 - the fast lane runs only once it is set
        if isinstance(outcome, Answer):
            return outcome
        if isinstance(outcome, Problem):
            if outcome.status in _BREAKING:
                runtime.breakers.of(handover.service).failed()
            raise outcome
        return await self._forward(
            runtime,
            route=route,
            method=handover.method,
            head=handover.head,
            body=b"",
            new_connection=True,
        )

    async def _forward(
        self,
        runtime: GatewayRuntime,
        *,
        route: Route,
        method: str,
        head: bytes,
        body: bytes,
        new_connection: bool = False,
    ) -> Answer:
        """``forward`` to the route's service within the route's timeout, through the
        service's circuit breaker: while it is open, 503 with ``Retry-After`` at once."""
        service = route.service
        breaker = runtime.breakers.of(service)
        try:
            breaker.acquire()
        except CircuitOpen as exc:
            raise Problem(
                503,
                f"{service} is not answering (circuit open); try again later.",
                headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))},
            ) from None
        try:
            answer = await forward(
                upstreams=runtime.upstreams,
                service=service,
                pool=runtime.pool,
                head=head,
                body=body,
                method=method,
                timeout_s=runtime.timeouts.of(route, method),
                retry_after_s=runtime.platform.registry_cache_ttl_s,
                new_connection=new_connection,
            )
        except Problem as problem:
            if problem.status in _BREAKING:
                breaker.failed()
            else:  # no instance, or refused: says nothing of a frozen service
                breaker.abandon()
            raise
        except BaseException:
            breaker.abandon()  # the caller left: no verdict, and a probe must not stay out
            raise
        # Any answer, an error status included, is the service answering.
        breaker.succeeded()
        return answer

    async def _admit_and_forward(
        self, scope: Scope, receive: Receive, identity: Identity
    ) -> Answer | None:
        """The service's answer, or None when the caller left before its request was whole."""
        declared = identity.declared
        if declared is not None:
            try:
                too_big = int(declared) > self.max_body_bytes
            except ValueError:
                raise Problem(400, "Bad Content-Length") from None
            if too_big:
                raise self._too_large()
        runtime = self.runtime
        assert runtime is not None  # noqa: S101 - the lifespan sets it before serving
        # First, before any other work: a flood of refused paths or bad tokens counts too.
        client = scope.get("client")
        await runtime.limits.check_client(
            self.client_of(client[0] if client else "unknown", scope["headers"])
        )
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        # Some servers leave the query on raw_path; it is not part of what routes match.
        raw_path = raw_path.split(b"?", 1)[0]
        if not canonical_path(raw_path):
            raise Problem(404, "No such resource.")
        # What is matched is exactly what is forwarded, whatever the server decoded.
        target = raw_path.decode("ascii")
        path = unquote(target) if "%" in target else target
        method: str = scope["method"]
        outcome = self.routes.match(method, path)
        if isinstance(outcome, MethodNotAllowed):
            scope["route"] = outcome.route
            raise Problem(
                405,
                f"{method} is not allowed here.",
                headers={"Allow": outcome.route.allow},
            )
        if not isinstance(outcome, Match):
            raise Problem(404, "No such resource.")
        route = outcome.route
        scope["route"] = route  # the metrics label: the route, never the raw path
        if outcome.access is not Access.PUBLIC:
            authorization = None
            for name, value in scope["headers"]:
                if name == b"authorization":
                    authorization = value.decode("latin-1")
                    break
            principal = await admit(
                outcome.access, authorization=authorization, verifier=runtime.verifier
            )
            if principal is not None:
                # Only where a token is verified anyway: public routes are limited per client.
                await runtime.limits.check_user(principal.user_id)
        body = b""
        if identity.has_body:
            read = await self._read_body(receive)
            if read is None:
                return None  # the caller left
            body = read
        length = len(body) if body or method in _BODY_METHODS else None
        return await self._forward(
            runtime,
            route=route,
            method=method,
            head=self.upstream_head(scope, target, identity, length),
            body=body,
        )

    def _too_large(self) -> Problem:
        return Problem(
            413,
            f"The request body is larger than {self.max_body_bytes} bytes.",
            headers={"Connection": "close"},
        )

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole request body, within the size limit and the body deadline; buffered, so a
        request whose connection was refused can be sent again to another instance."""
        chunks: list[bytes] = []
        seen = 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk: bytes = message.get("body", b"")
                    seen += len(chunk)
                    if seen > self.max_body_bytes:
                        raise self._too_large()
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise Problem(
                408,
                f"The request did not arrive within {self.body_timeout_s:g} s.",
                headers={"Connection": "close"},
            ) from None


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


# The latency buckets' upper bounds, +Inf last, and their ``le`` labels as the histogram
# writes them.
_BOUNDS = (*(float(bound) for bound in LATENCY_BUCKETS), math.inf)
_le_label: Callable[[float], str] = floatToGoString  # the histogram's own (untyped)
_LE = tuple(_le_label(bound) for bound in _BOUNDS)
# ``HttpMetrics``' label names, in the order its instruments are labelled.
_REQUEST_LABELS = ("service", "method", "route", "status")
_LATENCY_LABELS = ("service", "method", "route")


class _Latency:
    """The latency histogram of one (method, route): a count per bucket (not cumulative)."""

    __slots__ = ("buckets", "created", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * len(_BOUNDS)
        self.sum = 0.0
        self.created = time.time()


class _Requests:
    """The request count of one (method, route, status), and its (method, route)'s latency."""

    __slots__ = ("count", "created", "latency")

    def __init__(self, latency: _Latency) -> None:
        self.count = 0
        self.created = time.time()
        self.latency = latency


class ProxyMetrics(Collector):
    """``shop_http_requests`` and ``shop_http_request_duration_seconds`` with the proxy's
    requests counted in plain ints: prometheus_client's ``labels(...).inc()`` and
    ``observe()`` cost ~2 µs a request through their wrappers and locks (docs/gateway.md,
    "Sixth cut"). It takes the place of ``HttpMetrics``' counter and histogram in their
    registry, and its families hold their samples (the gateway's own endpoints, counted by
    ``MetricsMiddleware``) summed with the proxy's, so ``/metrics`` says what it said with
    the proxy counting into them: the same names, help, labels, buckets and ``_created``.

    Counted and collected on the event loop's thread only (the proxy and ``/metrics`` both
    run there), so the counts need no lock."""

    def __init__(self, metrics: HttpMetrics) -> None:
        self._metrics = metrics
        self._service = metrics.service
        self._requests: dict[tuple[str, str, int], _Requests] = {}
        self._latencies: dict[tuple[str, str], _Latency] = {}
        metrics.registry.unregister(metrics.requests)
        metrics.registry.unregister(metrics.latency)
        metrics.registry.register(self)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """One request answered ``status`` in ``seconds``."""
        requests = self._requests.get((method, route, status))
        if requests is None:
            requests = self._new(method, route, status)
        requests.count += 1
        latency = requests.latency
        # The first bucket whose bound is at least ``seconds``, as the histogram picks it.
        latency.buckets[bisect_left(_BOUNDS, seconds)] += 1
        latency.sum += seconds

    def _new(self, method: str, route: str, status: int) -> _Requests:
        latency = self._latencies.get((method, route))
        if latency is None:
            latency = self._latencies[method, route] = _Latency()
        requests = self._requests[method, route, status] = _Requests(latency)
        return requests

    def collect(self) -> Iterator[Metric]:
        # Whether counters and histograms write ``_created`` (prometheus_client's
        # ``disable_created_metrics`` and its environment variable decide): asked of a
        # counter outside any registry, as there is no other public way to know.
        (probe,) = PromCounter("probe", "", registry=None).collect()
        created = len(probe.samples) > 1
        yield self._requests_family(created=created)
        yield self._latency_family(created=created)

    def _requests_family(self, *, created: bool) -> Metric:
        (theirs,) = self._metrics.requests.collect()
        # (service, method, route, status) -> [count, created], theirs then the proxy's (a
        # series of both, which the gateway's own "unmatched" may be: summed, the earlier).
        merged: dict[tuple[str, ...], list[float]] = {}
        for sample in theirs.samples:
            kept = merged.setdefault(tuple(sample.labels.values()), [0.0, math.inf])
            kept[0 if sample.name.endswith("_total") else 1] = sample.value
        for (method, route, status), mine in self._requests.items():
            kept = merged.setdefault((self._service, method, route, str(status)), [0.0, math.inf])
            kept[0] += mine.count
            kept[1] = min(kept[1], mine.created)
        family = Metric(theirs.name, theirs.documentation, theirs.type)
        for values, (count, since) in merged.items():
            labels = dict(zip(_REQUEST_LABELS, values, strict=True))
            family.add_sample(f"{theirs.name}_total", labels, count)
            if created:
                family.add_sample(f"{theirs.name}_created", labels, since)
        return family

    def _latency_family(self, *, created: bool) -> Metric:
        (theirs,) = self._metrics.latency.collect()
        # (service, method, route) -> [count per bucket (cumulative)..., sum, created], theirs
        # then the proxy's (a series of both: the counts summed, the earlier creation).
        merged: dict[tuple[str, ...], list[float]] = {}
        slots = len(_BOUNDS)
        index = {le: i for i, le in enumerate(_LE)}
        for sample in theirs.samples:
            labels = dict(sample.labels)
            le = labels.pop("le", None)
            kept = merged.setdefault(tuple(labels.values()), [0.0] * (slots + 1) + [math.inf])
            if le is not None:
                kept[index[le]] = sample.value
            elif sample.name.endswith("_sum"):
                kept[slots] = sample.value
            elif sample.name.endswith("_created"):
                kept[slots + 1] = sample.value
            # ``_count`` is the +Inf bucket's: written again from it
        for (method, route), mine in self._latencies.items():
            kept = merged.setdefault(
                (self._service, method, route), [0.0] * (slots + 1) + [math.inf]
            )
            running = 0
            for i, count in enumerate(mine.buckets):
                running += count
                kept[i] += running
            kept[slots] += mine.sum
            kept[slots + 1] = min(kept[slots + 1], mine.created)
        family = Metric(theirs.name, theirs.documentation, theirs.type)
        name = theirs.name
        for values, kept in merged.items():
            labels = dict(zip(_LATENCY_LABELS, values, strict=True))
            for le, cumulative in zip(_LE, kept, strict=False):
                family.add_sample(f"{name}_bucket", {**labels, "le": le}, cumulative)
            family.add_sample(f"{name}_count", labels, kept[slots - 1])
            family.add_sample(f"{name}_sum", labels, kept[slots])
            if created:
                family.add_sample(f"{name}_created", labels, kept[slots + 1])
        return family


class _BreakerMetrics(Collector):
    """``shop_breaker_state`` and ``shop_breaker_transitions_total`` of the gateway's
    breakers (``peer`` = the service), read at scrape time as the order service's are."""

    def __init__(self, proxy: Proxy, service: str) -> None:
        self._proxy = proxy
        self._service = service
        self._states = BreakerStates(service, source=self._breakers)

    def _breakers(self) -> list[CircuitBreaker]:
        runtime = self._proxy.runtime
        return runtime.breakers.all() if runtime is not None else []

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield from self._states.collect()
        family = CounterMetricFamily(
            "shop_breaker_transitions",
            "Circuit breaker transitions, by the state entered",
            labels=["service", "peer", "to"],
        )
        runtime = self._proxy.runtime
        if runtime is not None:
            for (peer, state), count in sorted(runtime.breakers.transitions.items()):
                family.add_metric([self._service, peer, state], count)
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        return self.collect()


def with_identity(before: bytes, identity: Identity, after: bytes) -> bytes:
    """An upstream head from its parts (``Proxy.upstream_head_parts``) and the request's ids."""
    upstream = identity.upstream
    if len(upstream) == 2:  # the request id and traceparent: one format
        (name, value), (other, more) = upstream
        return b"%s%s: %s\r\n%s: %s\r\n%s" % (before, name, value, other, more, after)
    return b"".join([before, *[b"%s: %s\r\n" % pair for pair in upstream], after])


async def _relay(answer: Answer, send: Send, stamp: tuple[bytes, bytes]) -> None:
    headers = response_headers(answer.headers)
    headers.append(stamp)
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    whole = answer.whole_body()
    if whole is not None:
        await send({"type": "http.response.body", "body": whole, "more_body": False})
        return
    try:
        async for chunk in answer.body():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except (UpstreamBroken, TimeoutError) as exc:
        answer.abandon()
        raise _AnswerStarted(str(exc) or type(exc).__name__) from exc
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_stamped_problem(
    send: Send, stamp: tuple[bytes, bytes], problem: Problem, *, instance: str
) -> None:
    async def stamped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message["headers"], stamp]
        await send(message)

    await send_problem(
        stamped, problem.status, instance=instance, detail=problem.detail, headers=problem.headers
    )


def _runtime(request: Request) -> GatewayRuntime:
    runtime: GatewayRuntime = request.app.state.gateway
    return runtime


async def live(_request: Request) -> Response:
    return JSONResponse({"status": "UP"})


async def _readiness(runtime: GatewayRuntime) -> dict[str, str]:
    names = list(runtime.readiness)
    outcomes = await asyncio.gather(
        *(asyncio.wait_for(runtime.readiness[n](), 2.0) for n in names),
        return_exceptions=True,
    )
    return {
        n: "DOWN" if isinstance(o, BaseException) else "UP"
        for n, o in zip(names, outcomes, strict=True)
    }


async def health(request: Request) -> Response:
    """Readiness and degradation in one answer, as every service's ``GET /health``
    (platform/observe.py): DEGRADED while a service's circuit is open (``breaker:<service>``).
    At the edge the status word only, unless ``GATEWAY_PUBLIC_OPERATIONS``."""
    runtime = _runtime(request)
    checks = await _readiness(runtime)
    if any(v == "DOWN" for v in checks.values()):
        return _not_ready(request, runtime, checks)
    reasons = runtime.breakers.degraded()
    body: dict[str, Any] = {"status": "DEGRADED" if reasons else "UP"}
    if runtime.settings.public_operations:
        for breaker in runtime.breakers.all():
            name = f"breaker:{breaker.name}"
            checks[name] = "DEGRADED" if name in reasons else "UP"
        body |= {"checks": checks, "reasons": reasons}
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


async def ready(request: Request) -> Response:
    runtime = _runtime(request)
    checks = await _readiness(runtime)
    public = runtime.settings.public_operations
    if all(v == "UP" for v in checks.values()):
        return JSONResponse({"status": "UP", "checks": checks} if public else {"status": "UP"})
    return _not_ready(request, runtime, checks)


def _not_ready(request: Request, runtime: GatewayRuntime, checks: dict[str, str]) -> Response:
    if not runtime.settings.public_operations:
        # Which dependency is down is a map of the inside: the status is all the edge says.
        return problem_response(503, instance=request.url.path, detail="Not ready")
    down = ", ".join(n for n, v in checks.items() if v == "DOWN")
    return problem_response(
        503, instance=request.url.path, detail=f"Not ready: {down}", extra={"checks": checks}
    )


async def metrics(request: Request) -> Response:
    if not _runtime(request).settings.public_operations:
        return problem_response(404, instance=request.url.path, detail="No such resource.")
    instruments: HttpMetrics = request.app.state.metrics
    return Response(generate_latest(instruments.registry), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    return JSONResponse(await _runtime(request).catalogue.document())


def ops_routes() -> list[StarletteRoute]:
    return [
        StarletteRoute("/health", health, methods=["GET"]),
        StarletteRoute("/health/live", live, methods=["GET"]),
        StarletteRoute("/health/ready", ready, methods=["GET"]),
        StarletteRoute("/metrics", metrics, methods=["GET"]),
        StarletteRoute("/openapi.json", openapi, methods=["GET"]),
    ]
