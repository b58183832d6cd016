"""Tracing: off by default and then invisible; on, spans whose ids the request carries on."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import httpx
import pytest
from fastapi import APIRouter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from shop.platform import context, telemetry
from shop.platform.app import add_lean_route, create_app
from shop.platform.events import Event, EventBus
from shop.platform.fastpath import LeanRequest, Reply, json_reply
from shop.platform.outbox import OutboxEntry, OutboxRelay
from shop.platform.problems import Problem
from shop.platform.settings import PlatformSettings
from shop.platform.worker import JobLease

CALLER = context.TraceContext(
    trace_id="0af7651916cd43dd8448eb211c80319c", span_id="b7ad6b7169203331"
)


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "zipkin,otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_spans_are_exported_only_when_an_exporter_is_named(
    environ: dict[str, str], on: bool
) -> None:
    assert telemetry.enabled(environ) is on


def test_off_there_is_no_provider_and_each_hop_gets_a_span_id_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert telemetry.tracer_provider("nobody-service") is None
    assert context.spans_exported is False
    hop = context.parse_traceparent(context.next_hop(CALLER))
    assert hop is not None and hop.trace_id == CALLER.trace_id and hop.span_id != CALLER.span_id


def test_an_exporter_that_is_not_installed_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "no-such-exporter")
    with pytest.raises(RuntimeError, match="no-such-exporter"):
        telemetry.tracer_provider("refused-service")


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "test-service"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.install("test-service", provider)
    try:
        yield exporter
    finally:
        telemetry.shutdown()


def test_on_the_next_hop_is_a_child_of_the_current_span(
    exported: InMemorySpanExporter,
) -> None:
    assert context.next_hop(CALLER) == CALLER.traceparent


async def _lean(_request: LeanRequest) -> Reply:
    return json_reply({"next": context.outgoing_headers()["traceparent"]}, 201)


def _router() -> APIRouter:
    router = APIRouter()

    @router.post("/lean")
    async def lean() -> None:
        """Answered by the lean route."""

    @router.get("/refused")
    async def refused() -> None:
        raise Problem(409, "Refused.")

    return router


@pytest.fixture
async def client(exported: InMemorySpanExporter) -> AsyncIterator[httpx.AsyncClient]:
    platform = PlatformSettings(registry_url="http://127.0.0.1:9/eureka")
    app = create_app(name="test-service", title="Test", platform=platform, routers=[_router()])
    add_lean_route(app, "POST", "/lean", _lean)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


def _server_span(exporter: InMemorySpanExporter) -> Any:
    (span,) = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    return span


async def test_a_lean_route_is_a_server_span_under_the_callers_and_parent_of_its_calls(
    client: httpx.AsyncClient, exported: InMemorySpanExporter
) -> None:
    answer = await client.post("/lean", headers={"traceparent": CALLER.traceparent})
    assert answer.status_code == 201
    span = _server_span(exported)
    assert format(span.context.trace_id, "032x") == CALLER.trace_id
    assert format(span.parent.span_id, "016x") == CALLER.span_id
    hop = context.parse_traceparent(answer.json()["next"])
    assert hop is not None and hop.span_id == format(span.context.span_id, "016x")


async def test_a_problems_trace_id_is_its_spans(
    client: httpx.AsyncClient, exported: InMemorySpanExporter
) -> None:
    answer = await client.get("/refused")
    assert answer.status_code == 409
    span = _server_span(exported)
    assert span.parent is None, "no caller: the service's span starts the trace"
    assert answer.json()["traceId"] == format(span.context.trace_id, "032x")


class _Source:
    """One unpublished event, as an outbox holds it."""

    def __init__(self, entries: Sequence[OutboxEntry]) -> None:
        self.entries = list(entries)

    async def unpublished(self, limit: int) -> list[OutboxEntry]:
        return self.entries[:limit]

    async def mark_published(self, positions: Sequence[int]) -> None:
        self.entries = [e for e in self.entries if e.position not in positions]

    def lease(self, *, name: str, owner: str, duration_s: float) -> JobLease:
        return cast(JobLease, None)  # the relay's loop is never started here


class _Bus:
    def __init__(self) -> None:
        self.published: list[Event] = []

    async def publish(self, topic: str, events: Sequence[Event]) -> None:
        self.published.extend(events)


async def test_the_relay_publishes_each_event_under_a_producer_span_of_its_request(
    exported: InMemorySpanExporter,
) -> None:
    event = Event(type="t", source="s", subject="k", data={}, traceparent=CALLER.traceparent)
    bus = _Bus()
    source = _Source([OutboxEntry(1, "orders", event)])
    relay = OutboxRelay(source, cast(EventBus, bus), service="test")
    assert await relay.relay_once() == 1
    (span,) = exported.get_finished_spans()
    assert span.kind is SpanKind.PRODUCER and span.name == "orders publish"
    assert span.parent is not None and format(span.parent.span_id, "016x") == CALLER.span_id
    (sent,) = bus.published
    carried = context.parse_traceparent(sent.traceparent)
    assert carried is not None and carried.span_id == format(span.context.span_id, "016x")
    assert sent.id == event.id and sent.data == event.data


def test_zipkin_is_sent_spans_as_zipkin_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference's exporter, up to its request (no Zipkin server runs here)."""
    received: list[Any] = []

    class Zipkin(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(202)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Zipkin)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}/api/v2/spans"
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    monkeypatch.setenv("OTEL_EXPORTER_ZIPKIN_ENDPOINT", endpoint)
    try:
        provider = telemetry.tracer_provider("zipkin-service")
        assert provider is not None
        provider.get_tracer("test").start_span("checkout").end()
        # The gateway's proxy span, a record in the queue, reaches Zipkin's exporter as a span.
        spans = telemetry.server_spans(provider, "shop.gateway")
        assert spans is not None
        caller = context.TraceContext("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")
        spans.start(caller, "1" * 32, "2" * 16).end("GET", "/api/product/{id}", 503)
        provider.force_flush()
        ((span, proxy),) = received
        assert span["name"] == "checkout"
        assert span["localEndpoint"]["serviceName"] == "zipkin-service"
        assert proxy["name"] == "GET /api/product/{id}"
        assert proxy["kind"] == "SERVER"
        assert (proxy["parentId"], proxy["id"]) == (caller.span_id, "2" * 16)
        assert proxy["tags"]["http.response.status_code"] == "503"
        assert proxy["tags"]["otel.status_code"] == "ERROR"
    finally:
        telemetry.shutdown()
        server.shutdown()
        server.server_close()


async def test_each_sql_statement_of_a_sampled_request_is_a_client_span_under_it(
    exported: InMemorySpanExporter, tmp_path: Any
) -> None:
    from sqlalchemy import text

    from shop.platform.db import create_engine
    from shop.platform.rawsql import RawSql

    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'orders.db'}")
    telemetry.trace_engine(engine)
    try:
        async with engine.begin() as conn:  # no trace bound: background work makes no span
            await conn.execute(text("CREATE TABLE orders (id INTEGER PRIMARY KEY, qty INTEGER)"))
        assert exported.get_finished_spans() == ()

        context.bind(request_id="r1", trace=CALLER)
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO orders (qty) VALUES (1)"))
        async with RawSql(engine).writing() as tx:
            await tx.execute("UPDATE orders SET qty = qty + ? WHERE id = ?", (1, 1))
            with pytest.raises(Exception, match="no such table"):
                await tx.execute("SELECT * FROM missing")

        unsampled = context.TraceContext(trace_id="1" * 32, span_id="2" * 16, flags="00")
        context.bind(request_id="r3", trace=unsampled)
        async with engine.begin() as conn:
            await conn.execute(text("SELECT qty FROM orders"))
    finally:
        await engine.dispose()

    spans = exported.get_finished_spans()
    assert [s.name for s in spans] == ["INSERT", "UPDATE", "SELECT"]
    for span in spans:
        assert span.kind is SpanKind.CLIENT
        assert span.parent is not None and span.parent.span_id == int(CALLER.span_id, 16)
        assert span.context.trace_id == int(CALLER.trace_id, 16)
        attributes = dict(span.attributes or {})
        assert attributes["db.system.name"] == "sqlite"
        assert attributes["db.namespace"] == "orders.db"
    assert str(dict(spans[1].attributes or {})["db.query.text"]).startswith("UPDATE orders SET")
    assert spans[2].status.is_ok is False  # the failed statement is marked as such


async def test_an_outgoing_call_of_a_sampled_request_is_a_client_span_the_callee_is_under(
    exported: InMemorySpanExporter,
) -> None:
    from aiohttp import web

    from shop.platform.http import http_session

    seen: list[str] = []

    async def prices(request: web.Request) -> web.Response:
        seen.append(request.headers["traceparent"])
        return web.json_response({"price": "1.00"}, status=200 if len(seen) == 1 else 503)

    app = web.Application()
    app.router.add_get("/api/product", prices)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with http_session() as http:
            context.bind(request_id="r1", trace=CALLER)
            for _ in range(2):
                async with http.get(
                    f"http://127.0.0.1:{port}/api/product?q=secret@example.com",
                    headers=context.outgoing_headers(),
                ) as answer:
                    await answer.read()
    finally:
        await runner.cleanup()

    spans = [s for s in exported.get_finished_spans() if s.kind is SpanKind.CLIENT]
    assert [s.name for s in spans] == ["GET", "GET"]
    for span, header in zip(spans, seen, strict=True):
        assert span.parent is not None and span.parent.span_id == int(CALLER.span_id, 16)
        # The callee's parent is the client span, not the caller's server span.
        assert header == f"00-{CALLER.trace_id}-{span.context.span_id:016x}-01"
        assert "secret" not in str(dict(span.attributes or {}))  # no query string kept
    assert [dict(s.attributes or {})["http.response.status_code"] for s in spans] == [200, 503]
    assert spans[0].status.is_ok and not spans[1].status.is_ok


async def test_a_call_over_the_upstream_client_is_a_client_span_the_callee_is_under(
    exported: InMemorySpanExporter,
) -> None:
    import asyncio

    from aiohttp import web

    from shop.platform.upstream import UpstreamPool

    seen: list[str] = []

    async def reserve(request: web.Request) -> web.Response:
        seen.append(request.headers["traceparent"])
        return web.json_response({}, status=201 if len(seen) == 1 else 503)

    app = web.Application()
    app.router.add_post("/internal/reservations", reserve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    pool = UpstreamPool()
    head = (
        "POST /internal/reservations?who=secret HTTP/1.1\r\n"
        f"traceparent: {CALLER.traceparent}\r\nContent-Length: 2\r\n\r\n"
    ).encode()
    try:
        context.bind(request_id="r1", trace=CALLER)
        statuses = []
        for _ in range(2):
            answer = await pool.request(
                base_url,
                head,
                b"{}",
                head_only=False,
                idempotent=True,
                connect_timeout_s=5,
                timeout_s=5,
            )
            statuses.append(answer.status)
            assert [chunk async for chunk in answer.body()]  # read whole: the connection is idle
        assert statuses == [201, 503]
        # The gateway's fast lane: sent at once on the idle connection, with no CLIENT span
        # (the gateway makes one span per request: its own), the head as it was given.
        context.bind(request_id="r2", trace=context.TraceContext.new())
        conn = pool.send_now(base_url, head + b"{}", head_only=False)
        assert conn is not None
        arrived = asyncio.Event()
        conn.listen(arrived.set, 5)
        while not conn.head_done:
            await asyncio.wait_for(arrived.wait(), 5)
            arrived.clear()
        conn.listen(None)
        assert conn.status == 503
        # A request not sampled: no span, the caller's traceparent goes on as it was.
        unsampled = context.TraceContext(trace_id=CALLER.trace_id, span_id="1" * 16, flags="00")
        context.bind(request_id="r3", trace=unsampled)
        answer = await pool.request(
            base_url,
            head.replace(CALLER.traceparent.encode(), unsampled.traceparent.encode()),
            b"{}",
            head_only=False,
            idempotent=True,
            connect_timeout_s=5,
            timeout_s=5,
            new_connection=True,
        )
        answer.abandon()
    finally:
        pool.close()
        await runner.cleanup()

    spans = [s for s in exported.get_finished_spans() if s.kind is SpanKind.CLIENT]
    assert [s.name for s in spans] == ["POST", "POST"]
    for span, header in zip(spans, seen[:2], strict=True):
        assert span.parent is not None and span.parent.span_id == int(CALLER.span_id, 16)
        # The callee's parent is the client span, not the caller's server span.
        assert header == f"00-{CALLER.trace_id}-{span.context.span_id:016x}-01"
        attributes = dict(span.attributes or {})
        assert attributes["url.full"] == f"{base_url}/internal/reservations"
        assert attributes["server.address"] == "127.0.0.1"
    assert seen[2] == CALLER.traceparent  # the fast lane's, untouched
    assert seen[3] == unsampled.traceparent
    assert [dict(s.attributes or {})["http.response.status_code"] for s in spans] == [201, 503]
    assert spans[0].status.is_ok and not spans[1].status.is_ok


def _samplers() -> list[Any]:
    from opentelemetry.sdk.trace import sampling

    return [
        sampling.ALWAYS_ON,
        sampling.ALWAYS_OFF,
        sampling.TraceIdRatioBased(0.1),
        sampling.ParentBasedTraceIdRatio(0.25),
        sampling.ParentBased(sampling.ALWAYS_OFF),
        # Delegates of its own: asked as it is, not decided inline.
        sampling.ParentBased(
            sampling.TraceIdRatioBased(0.5), remote_parent_not_sampled=sampling.ALWAYS_ON
        ),
    ]


@pytest.mark.parametrize("sampler", _samplers(), ids=lambda s: s.get_description()[:40])
def test_the_sampling_decision_is_the_sdk_samplers(sampler: Any) -> None:
    """The gateway decides before any span exists; a trace it samples must be exactly one
    the SDK's sampler samples, or collectors would see traces cut at the gateway."""
    import random

    from opentelemetry.sdk.trace.sampling import Decision

    decide = telemetry.sampling(TracerProvider(sampler=sampler))
    draw = random.Random(10).getrandbits  # noqa: S311 - ids, not secrets
    for n in range(4000):
        trace_id = f"{draw(128):032x}"
        parent = (
            None
            if n % 3 == 0
            else context.TraceContext(trace_id, f"{draw(64) | 1:016x}", ("00", "01", "03")[n % 3])
        )
        asked = sampler.should_sample(telemetry.parent_of(parent), int(trace_id, 16), "proxy")
        assert decide(parent, trace_id) is (asked.decision is not Decision.DROP), (parent, trace_id)


@pytest.fixture
def recorded() -> Iterator[tuple[InMemorySpanExporter, TracerProvider]]:
    """A provider whose standard sampler lets ``start_span`` record its spans itself."""
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "api-gateway"}),
        sampler=ParentBasedTraceIdRatio(0.5),
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.install("api-gateway", provider)
    try:
        yield exporter, provider
    finally:
        telemetry.shutdown()


def test_a_recorded_span_is_exported_as_the_sdks_own_would_be(
    recorded: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.trace import StatusCode

    exporter, provider = recorded
    tracer = provider.get_tracer("shop.gateway")
    link = context.TraceContext("1" * 32, "2" * 16)
    span = telemetry.start_span(
        tracer,
        "proxy",
        kind="server",
        parent=CALLER,
        links=[link],
        attributes={"http.request.method": "GET"},
    )
    span.update_name("GET /api/product")
    span.set_attribute("http.response.status_code", 503)
    span.set_status(StatusCode.ERROR)
    span.end()
    span.set_attribute("late", 1)  # ended: no longer recorded
    made = tracer.start_span(
        "GET /api/product",
        context=telemetry.parent_of(CALLER),
        kind=SpanKind.SERVER,
        attributes={"http.request.method": "GET", "http.response.status_code": 503},
    )
    made.set_status(StatusCode.ERROR)
    made.end()
    ours, sdks = exporter.get_finished_spans()
    for field in ("name", "kind", "parent", "resource", "instrumentation_scope"):
        assert getattr(ours, field) == getattr(sdks, field), field
    assert dict(ours.attributes or {}) == dict(sdks.attributes or {})
    assert ours.status.status_code is sdks.status.status_code is StatusCode.ERROR
    assert ours.context.trace_id == int(CALLER.trace_id, 16)
    assert ours.context.trace_flags.sampled and not ours.context.is_remote
    assert [format(x.context.span_id, "016x") for x in ours.links] == [link.span_id]
    assert ours.start_time is not None and ours.end_time is not None
    assert ours.start_time <= ours.end_time
    # What the OTLP exporter sends of it.
    (sent,) = [s for s in encode_spans([ours]).resource_spans[0].scope_spans[0].spans]
    assert (sent.name, sent.parent_span_id) == ("GET /api/product", bytes.fromhex(CALLER.span_id))
    assert len(sent.attributes) == 2 and len(sent.links) == 1


def test_a_span_the_sampler_drops_has_ids_and_is_not_exported(
    recorded: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    exporter, provider = recorded
    tracer = provider.get_tracer("shop.gateway")
    unsampled = context.TraceContext(CALLER.trace_id, CALLER.span_id, "00")
    under = telemetry.start_span(tracer, "proxy", kind="server", parent=unsampled)
    # A root whose trace id's low 64 bits are past the 50 % bound.
    root = telemetry.start_span(
        tracer, "proxy", kind="server", parent=None, trace_id="0" * 16 + "f" * 16
    )
    for span in (under, root):
        assert not span.is_recording()
        span.end()
    assert telemetry.span_trace(under).trace_id == CALLER.trace_id
    assert telemetry.span_trace(under).flags == "00"
    assert telemetry.span_trace(root).trace_id == "0" * 16 + "f" * 16
    assert exporter.get_finished_spans() == ()


def test_a_sampler_of_its_own_makes_the_spans_with_the_sdks_tracer() -> None:
    from opentelemetry.sdk.trace import Span as SdkSpan
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

    class ByName(Sampler):
        def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
            name = args[2] if len(args) > 2 else kwargs["name"]
            return SamplingResult(Decision.RECORD_AND_SAMPLE if name == "kept" else Decision.DROP)

        def get_description(self) -> str:
            return "ByName"

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ByName())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("shop")
    kept = telemetry.start_span(tracer, "kept", kind="internal", parent=None)
    dropped = telemetry.start_span(tracer, "dropped", kind="internal", parent=None)
    kept.end()
    dropped.end()
    assert isinstance(kept, SdkSpan) and not dropped.is_recording()
    assert [s.name for s in exporter.get_finished_spans()] == ["kept"]
    provider.shutdown()


def test_an_operators_attribute_length_limit_still_cuts_long_values() -> None:
    from opentelemetry.sdk.trace import SpanLimits

    exporter = InMemorySpanExporter()
    provider = TracerProvider(span_limits=SpanLimits(max_span_attribute_length=6))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    span = telemetry.start_span(
        provider.get_tracer("shop"),
        "SELECT",
        kind="client",
        parent=CALLER,
        attributes={"db.query.text": "SELECT * FROM orders"},
    )
    span.end()
    (sent,) = exporter.get_finished_spans()
    assert dict(sent.attributes or {})["db.query.text"] == "SELECT"
    provider.shutdown()


@pytest.mark.parametrize("parent", [CALLER, None], ids=["under a caller", "root"])
def test_the_proxys_span_record_is_the_span_the_sdk_would_make(
    parent: context.TraceContext | None,
) -> None:
    """telemetry.ServerSpan (the gateway's span per sampled request): what processors get
    of it is the SDK's own span of the same request, field for field."""
    from opentelemetry.trace import StatusCode

    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "api-gateway"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    spans = telemetry.server_spans(provider, "shop.gateway")
    assert spans is not None
    record = spans.start(parent, "3c" * 16, "4d" * 8)
    assert isinstance(record, telemetry.ServerSpan)
    assert record.trace == context.TraceContext(
        parent.trace_id if parent else "3c" * 16, "4d" * 8, "01"
    )
    record.end("POST", "/api/order", 503)
    record.end("POST", "/api/order", 200)  # ended once: nothing more is sent
    made = provider.get_tracer("shop.gateway").start_span(
        "POST /api/order",
        context=telemetry.parent_of(parent),
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": "POST",
            "http.response.status_code": 503,
            "http.route": "/api/order",
        },
    )
    made.set_status(StatusCode.ERROR)
    made.end()
    ours, sdks = exporter.get_finished_spans()
    for field in ("name", "kind", "parent", "resource", "instrumentation_scope"):
        assert getattr(ours, field) == getattr(sdks, field), field
    assert list((ours.attributes or {}).items()) == list((sdks.attributes or {}).items())
    assert ours.status.status_code is sdks.status.status_code is StatusCode.ERROR
    assert ours.context.trace_flags == sdks.context.trace_flags
    assert (ours.context.is_remote, sdks.context.is_remote) == (False, False)
    assert format(ours.context.span_id, "016x") == "4d" * 8
    assert ours.start_time is not None and ours.end_time is not None
    assert 0 < ours.start_time <= ours.end_time
    provider.shutdown()


def test_with_a_sampler_of_its_own_the_proxys_span_is_the_sdk_tracers() -> None:
    """A record could not carry what such a sampler adds: the SDK's tracer makes the span,
    ended with the same name, attributes and status."""
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

    class Tagging(Sampler):
        def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
            return SamplingResult(Decision.RECORD_AND_SAMPLE, {"sampled.by": "tagging"})

        def get_description(self) -> str:
            return "Tagging"

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=Tagging())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    spans = telemetry.server_spans(provider, "shop.gateway")
    assert spans is not None and spans.sampled(None, "5" * 32)
    span = spans.start(None, "5" * 32, "6" * 16)
    assert not isinstance(span, telemetry.ServerSpan)
    span.end("GET", None, 404)
    (sent,) = exporter.get_finished_spans()
    assert sent.name == "GET" and sent.kind is SpanKind.SERVER
    assert dict(sent.attributes or {}) == {
        "sampled.by": "tagging",
        "http.request.method": "GET",
        "http.response.status_code": 404,
    }
    # The next hop's parent is that span.
    assert span.trace.trace_id == format(sent.context.trace_id, "032x")
    assert span.trace.span_id == format(sent.context.span_id, "016x")
    provider.shutdown()
