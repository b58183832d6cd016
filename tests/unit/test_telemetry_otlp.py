"""The OTLP/HTTP export's encoding (telemetry.otlp_request): the SDK encoder's bytes exactly."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from shop.platform import context, telemetry

CALLER = context.TraceContext(
    trace_id="0af7651916cd43dd8448eb211c80319c", span_id="b7ad6b7169203331"
)
# Every attribute type OTLP has a value for, and lengths that need a two-byte varint.
ATTRIBUTES: dict[str, Any] = {
    "text": "GET /api/product",
    "unicode": "prix: 12,50 € — ok",
    "empty": "",
    "long": "x" * 300,
    "yes": True,
    "no": False,
    "zero": 0,
    "small": 200,
    "negative": -5,
    "largest": (1 << 63) - 1,
    "smallest": -(1 << 63),
    "ratio": 0.1,
    "negative zero": -0.0,
    "strings": ["a", "", "é"],
    "ints": [1, -1, 1 << 40],
    "floats": [1.5, -2.25],
    "bools": [True, False],
    "none": [],
}


def _spans() -> list[ReadableSpan]:
    """SDK spans and recorded ones (telemetry.start_span) of two resources, several scopes,
    every kind, with events, links, statuses, trace state and dropped counts."""
    exporter = InMemorySpanExporter()
    first = TracerProvider(
        resource=Resource.create({"service.name": "api-gateway", "pid": 7}, "https://s/1"),
        sampler=ParentBasedTraceIdRatio(1.0),
    )
    second = TracerProvider(
        resource=Resource({"service.name": "order-service"}),
        span_limits=SpanLimits(max_span_attributes=2, max_events=1, max_links=1),
    )
    for provider in (first, second):
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    scoped = first.get_tracer("shop", "1.2", schema_url="https://s/2", attributes={"a": "b"})
    plain = first.get_tracer("shop.gateway")
    limited = second.get_tracer("limited")
    remote = trace.set_span_in_context(
        trace.NonRecordingSpan(
            SpanContext(5, 6, True, TraceFlags(1), TraceState([("k", "v"), ("x", "y")]))
        )
    )
    with scoped.start_as_current_span("all", kind=SpanKind.SERVER, attributes=ATTRIBUTES) as span:
        span.add_event("started", {"n": 1, "why": "test"})
        span.add_event("", timestamp=0)
        span.record_exception(ValueError("bad value"))
        span.add_link(SpanContext(1, 2, False), {"l": "x"})
        span.add_link(SpanContext(3, 4, True, TraceFlags(1)))
        span.set_status(Status(StatusCode.ERROR, "it failed"))
        with plain.start_as_current_span("", kind=SpanKind.CONSUMER) as child:
            child.set_status(StatusCode.OK)
        with scoped.start_as_current_span("n" * 200, kind=SpanKind.PRODUCER):
            pass
    plain.start_span("under a remote parent", context=remote, kind=SpanKind.CLIENT).end()
    with limited.start_as_current_span("cut", attributes={"a": 1, "b": 2, "c": 3}) as cut:
        cut.add_event("one")
        cut.add_event("two")
        cut.add_link(SpanContext(7, 8, False))
        cut.add_link(SpanContext(9, 10, False))
    telemetry.install("api-gateway", first)
    try:
        for parent in (CALLER, None):
            recorded = telemetry.start_span(
                plain,
                "proxy",
                kind="server",
                parent=parent,
                links=[context.TraceContext("1" * 32, "2" * 16)],
                attributes={"http.request.method": "GET"},
            )
            recorded.set_attribute("http.response.status_code", 200)
            recorded.end()
    finally:
        telemetry.shutdown()
        second.shutdown()
    spans = list(exporter.get_finished_spans())
    # A span made by hand with no scope and no times: what the SDK's encoder allows.
    spans.append(ReadableSpan("bare", context=SpanContext(11, 12, False)))
    return spans


@pytest.fixture(scope="module")
def spans() -> list[ReadableSpan]:
    return _spans()


def test_the_spans_cover_what_the_encoder_handles(spans: list[ReadableSpan]) -> None:
    assert len({s.resource for s in spans}) == 3  # the providers' and the bare span's default
    assert {s.kind for s in spans} == set(SpanKind)
    assert any(s.events for s in spans) and any(s.links for s in spans)
    assert any(s.dropped_attributes and s.dropped_events and s.dropped_links for s in spans)
    assert any(s.instrumentation_scope is None for s in spans)
    assert sum(type(s).__name__ == "ReadableSpan" and s.parent is not None for s in spans) >= 1


@pytest.mark.parametrize("order", ["as ended", "reversed", "each alone"])
def test_the_request_is_the_sdk_encoders_byte_for_byte(
    spans: list[ReadableSpan], order: str
) -> None:
    batches: list[list[ReadableSpan]] = {
        "as ended": [spans],
        "reversed": [spans[::-1]],
        "each alone": [[s] for s in spans],
    }[order]
    for batch in batches:
        sdks = encode_spans(batch)
        ours = telemetry.otlp_request(batch)
        assert ours == sdks.SerializePartialToString()
        # And message for message, decoded with opentelemetry-proto's own classes.
        assert ExportTraceServiceRequest.FromString(ours) == sdks


def test_a_second_encoding_of_the_same_spans_is_the_same(spans: list[ReadableSpan]) -> None:
    """Repeated attributes are encoded once and kept: the kept ones are the same bytes."""
    assert telemetry.otlp_request(spans) == telemetry.otlp_request(spans)


def test_the_decoded_request_keeps_names_kinds_attributes_and_parents(
    spans: list[ReadableSpan],
) -> None:
    request = ExportTraceServiceRequest.FromString(telemetry.otlp_request(spans))
    sent = {
        s.name: s
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for s in scope.spans
    }
    under = sent["under a remote parent"]
    assert under.parent_span_id == (6).to_bytes(8, "big") and under.trace_state == "k=v,x=y"
    assert under.kind == under.SPAN_KIND_CLIENT
    assert under.flags == 0x300  # has is_remote, is remote
    every = sent["all"]
    values = {kv.key: kv.value for kv in every.attributes}
    assert values["unicode"].string_value == ATTRIBUTES["unicode"]
    assert values["smallest"].int_value == -(1 << 63)
    assert [v.int_value for v in values["ints"].array_value.values] == ATTRIBUTES["ints"]
    assert every.status.code == every.status.STATUS_CODE_ERROR
    assert every.status.message == "it failed"
    assert [e.name for e in every.events] == ["started", "", "exception"]


def test_a_value_with_no_rule_here_leaves_the_batch_to_the_sdks_encoder() -> None:
    span = ReadableSpan(
        "mapping",
        context=SpanContext(1, 2, False),
        attributes={"nested": {"a": 1}},  # a kvlist: OTLP has one, this encoder not
    )
    with pytest.raises(telemetry._Unencodable):
        telemetry.otlp_request([span])
    too_big = ReadableSpan("big", context=SpanContext(1, 2, False), attributes={"n": 1 << 64})
    with pytest.raises(telemetry._Unencodable):
        telemetry.otlp_request([too_big])


class _Receiver(BaseHTTPRequestHandler):
    bodies: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """An OTLP/HTTP receiver the standard variables point the exporter at."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    _Receiver.bodies = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    try:
        yield _Receiver.bodies
    finally:
        telemetry.shutdown()
        server.shutdown()
        server.server_close()


def test_the_otlp_exporter_sends_this_encoding(
    receiver: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = telemetry.tracer_provider("otlp-service")
    assert provider is not None
    tracer = provider.get_tracer("shop")
    span = telemetry.start_span(tracer, "checkout", kind="server", parent=CALLER)
    span.set_attribute("http.response.status_code", 201)
    span.end()
    spans: list[ReadableSpan] = []
    original = telemetry.otlp_request

    def kept(batch: Sequence[ReadableSpan]) -> bytes:
        spans.extend(batch)
        return original(batch)

    monkeypatch.setattr(telemetry, "otlp_request", kept)  # seen, then encoded as usual
    assert provider.force_flush()
    (body,) = receiver
    assert body == encode_spans(spans).SerializePartialToString()
    (sent,) = ExportTraceServiceRequest.FromString(body).resource_spans[0].scope_spans[0].spans
    assert sent.name == "checkout" and sent.parent_span_id == bytes.fromhex(CALLER.span_id)


def test_a_batch_the_encoder_leaves_is_sent_as_the_sdk_encodes_it(receiver: list[bytes]) -> None:
    provider = telemetry.tracer_provider("otlp-service")
    assert provider is not None
    span = provider.get_tracer("shop").start_span("nested", attributes={"ok": "yes"})
    span.set_attribute("big", 1 << 64)  # not an int64: the SDK's encoder logs and drops it
    span.end()
    assert provider.force_flush()
    (body,) = receiver
    (sent,) = ExportTraceServiceRequest.FromString(body).resource_spans[0].scope_spans[0].spans
    assert sent.name == "nested" and [kv.key for kv in sent.attributes] == ["ok"]


def test_a_span_event_without_a_name_or_time_is_encoded_as_the_sdk_does() -> None:
    span = ReadableSpan(
        "events",
        context=SpanContext(1, 2, False),
        events=(Event("", timestamp=0), Event("at", {"k": "v"}, timestamp=5)),
        start_time=1,
        end_time=2,
    )
    assert telemetry.otlp_request([span]) == encode_spans([span]).SerializePartialToString()


def test_a_span_without_a_scope_has_an_empty_one() -> None:
    scope = InstrumentationScope("x", None, None)
    spans = [
        ReadableSpan("a", context=SpanContext(1, 2, False)),
        ReadableSpan("b", context=SpanContext(1, 3, False), instrumentation_scope=scope),
        ReadableSpan("c", context=SpanContext(1, 4, False), links=(Link(SpanContext(1, 2, True)),)),
    ]
    assert telemetry.otlp_request(spans) == encode_spans(spans).SerializePartialToString()


def test_a_recorded_span_reaches_the_processors_with_the_sdks_fields_and_no_span_contexts() -> None:
    """What the batch processor queues holds its ids as integers (one object for the garbage
    collector), and answers every ReadableSpan question as a span the SDK made would."""
    import gc

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBasedTraceIdRatio(1.0))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("shop.gateway")
    ours = telemetry.start_span(tracer, "proxy", kind="server", parent=CALLER)
    theirs = tracer.start_span("proxy", context=telemetry.parent_of(CALLER), kind=SpanKind.SERVER)
    for span in (ours, theirs):
        span.set_attribute("http.route", "/api/product")
        span.add_event("answered", {"status": 200})
        span.end()
    recorded, made = exporter.get_finished_spans()
    assert not any(isinstance(x, SpanContext) for x in gc.get_referents(recorded))
    assert recorded.context == ours.get_span_context()
    assert recorded.get_span_context() == recorded.context
    assert recorded.context.trace_id == made.context.trace_id
    assert recorded.context.trace_flags == made.context.trace_flags
    assert recorded.context.is_remote is made.context.is_remote is False
    parent = recorded.parent
    assert parent is not None and parent == made.parent and made.parent is not None
    assert parent.is_remote and parent.trace_flags == made.parent.trace_flags
    for field in ("name", "kind", "resource", "instrumentation_scope", "links"):
        assert getattr(recorded, field) == getattr(made, field), field
    assert recorded.status.status_code is made.status.status_code
    assert recorded.status.description == made.status.description
    assert dict(recorded.attributes or {}) == dict(made.attributes or {})
    assert [(e.name, dict(e.attributes or {})) for e in recorded.events] == [
        (e.name, dict(e.attributes or {})) for e in made.events
    ]
    assert (recorded.dropped_attributes, recorded.dropped_events, recorded.dropped_links) == (
        0,
        0,
        0,
    )
    assert '"name": "proxy"' in recorded.to_json()  # the console exporter's form
    provider.shutdown()


# --- The gateway's proxy span kept as a record (telemetry.ServerSpan) -------------------------


def _server_span(
    provider: TracerProvider,
    parent: context.TraceContext | None,
    route: str | None,
    status: int,
) -> telemetry.ServerSpan:
    spans = telemetry.server_spans(provider, "shop.gateway")
    assert spans is not None
    span = spans.start(parent, "1f" * 16, "2e" * 8)
    assert isinstance(span, telemetry.ServerSpan)
    span.end("GET", route, status)
    return span


@pytest.mark.parametrize("parent", [CALLER, None], ids=["under a caller", "root"])
@pytest.mark.parametrize("route", ["/api/product/{id}", None], ids=["route", "unmatched"])
@pytest.mark.parametrize("status", [200, 503])
def test_a_server_span_record_is_encoded_as_the_sdk_encodes_its_readable_span(
    parent: context.TraceContext | None, route: str | None, status: int
) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "api-gateway"}))
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    record = _server_span(provider, parent, route, status)
    # Alone, and in a batch with spans the SDK made under the same scope and another one.
    made = provider.get_tracer("shop.gateway").start_span("other", kind=SpanKind.CLIENT)
    made.end()
    other = provider.get_tracer("shop").start_span("relay")
    other.end()
    for batch in ([record], [made, record, other, record]):
        readables = [s.readable() if s is record else s for s in batch]
        expected = encode_spans(readables).SerializePartialToString()  # type: ignore[arg-type]
        assert telemetry.otlp_request(batch) == expected


def test_a_server_span_record_is_queued_and_sent_by_the_batch_processor(
    receiver: list[bytes],
) -> None:
    """Through the provider Shop makes: the batch processor queues the record itself and the
    exporter sends what the SDK would encode of its span."""
    provider = telemetry.tracer_provider("api-gateway")
    assert provider is not None
    record = _server_span(provider, CALLER, "/api/product/{id}", 200)
    assert provider.force_flush()
    (body,) = receiver
    assert body == encode_spans([record.readable()]).SerializePartialToString()
    (sent,) = ExportTraceServiceRequest.FromString(body).resource_spans[0].scope_spans[0].spans
    assert sent.name == "GET /api/product/{id}" and sent.kind == sent.SPAN_KIND_SERVER
    assert sent.parent_span_id == bytes.fromhex(CALLER.span_id)
    assert (sent.trace_id.hex(), sent.span_id.hex()) == (CALLER.trace_id, "2e" * 8)
