"""While spans are exported, each MongoDB command of a sampled request is a span under it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from shop.platform import context, telemetry
from shop.platform.mongo import mongo_database

CALLER = context.TraceContext(
    trace_id="4bf92f3577b34da6a3ce929d0e0e4736", span_id="00f067aa0ba902b7"
)


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "product-service"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.install("product-service", provider)
    try:
        yield exporter
    finally:
        telemetry.shutdown()


async def test_commands_of_a_sampled_request_are_client_spans_under_it(
    exported: InMemorySpanExporter,
    make_mongo_url: Callable[[], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")  # as an operator turns spans on
    async with mongo_database(make_mongo_url()) as database:
        await database["products"].insert_one({"name": "made before any request"})
        assert [s for s in exported.get_finished_spans() if s.kind is SpanKind.CLIENT] == []

        context.bind(request_id="r1", trace=CALLER)
        await database["products"].find_one({"name": "made before any request"})
        context.bind(
            request_id="r2",
            trace=context.TraceContext(trace_id="1" * 32, span_id="2" * 16, flags="00"),
        )
        await database["products"].find_one({})  # not sampled: no span

    spans = [s for s in exported.get_finished_spans() if s.kind is SpanKind.CLIENT]
    assert [s.name for s in spans] == ["find products"]
    span = spans[0]
    assert span.parent is not None and span.parent.span_id == int(CALLER.span_id, 16)
    assert span.context.trace_id == int(CALLER.trace_id, 16)
    assert dict(span.attributes or {})["db.system.name"] == "mongodb"
