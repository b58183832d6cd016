"""Tracing with OpenTelemetry, on only when an exporter is named (the standard ``OTEL_*``).

Off (the default: no ``OTEL_TRACES_EXPORTER``, or ``none``, or ``OTEL_SDK_DISABLED=true``) no
SDK is imported and no provider exists: the request paths test one module flag
(``context.spans_exported``) and go on as before, with the hand-made ``traceparent`` of
``shop.platform.context``. On, every process gets an SDK ``TracerProvider`` per service
name: the SDK itself reads the sampler (``OTEL_TRACES_SAMPLER``/``_ARG``), the resource
(``OTEL_RESOURCE_ATTRIBUTES``), the batch processor's timings (``OTEL_BSP_*``) and the
exporter's endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_ZIPKIN_ENDPOINT``).

The exporters are found as the SDK's own configurator finds them, by their
``opentelemetry_traces_exporter`` entry points; ``otlp`` means OTLP over HTTP/protobuf (the
one installed) and ``zipkin`` Zipkin's JSON. The ids a span gets are bound as the request's
:class:`~shop.platform.context.TraceContext`, so the next hop's parent, an event's
``traceparent`` and a problem's ``traceId`` are that span's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from shop.platform import context

if TYPE_CHECKING:  # imported where used: with tracing off OpenTelemetry is never loaded
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, SpanContext, Tracer
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "current_trace",
    "enabled",
    "install",
    "sampled",
    "parent_of",
    "process_tracer",
    "shutdown",
    "client_span",
    "consuming",
    "end_span",
    "sql_operation",
    "statement_span",
    "trace_engine",
    "span_trace",
    "start_process_span",
    "start_span",
    "tracer_provider",
]

log = logging.getLogger("shop.telemetry")

# Names OTEL_TRACES_EXPORTER may use -> the entry point that provides them.
_ALIASES = {"otlp": "otlp_proto_http", "zipkin": "zipkin_json"}
_providers: dict[str, TracerProvider] = {}


def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",")]
    return [n for n in names if n and n != "none"]


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether spans are to be exported (an exporter is named and the SDK not disabled)."""
    return bool(_exporter_names(os.environ if environ is None else environ))


def _exporter(name: str) -> Any:
    target = _ALIASES.get(name, name)
    found = entry_points(group="opentelemetry_traces_exporter", name=target)
    if not found:
        raise RuntimeError(f"OTEL_TRACES_EXPORTER names {name!r}, which is not installed")
    return next(iter(found)).load()()


def tracer_provider(service: str) -> TracerProvider | None:
    """The provider whose spans name ``service`` (one per name and process), or None when
    tracing is off."""
    provider = _providers.get(service)
    if provider is not None:
        return provider
    names = _exporter_names(os.environ)
    if not names:
        return None
    # Imported here: with tracing off the SDK is never loaded.
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: service}), id_generator=_chosen_ids()
    )
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    _providers[service] = provider
    context.spans_exported = True
    log.info("tracing %s to %s", service, ", ".join(names))
    return provider


# A root span's trace id chosen by the caller of ``start_span`` (see ``sampled``).
_chosen_trace_id: ContextVar[int | None] = ContextVar("shop_chosen_trace_id", default=None)


def _chosen_ids() -> Any:
    """The SDK's random ids, except a root span's trace id when one was chosen."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class ChosenIds(RandomIdGenerator):
        def generate_trace_id(self) -> int:
            chosen = _chosen_trace_id.get()
            return chosen if chosen is not None else super().generate_trace_id()

    return ChosenIds()


def sampled(provider: TracerProvider, parent: context.TraceContext | None, trace_id: str) -> bool:
    """Whether ``provider``'s sampler (``OTEL_TRACES_SAMPLER``) records a span under
    ``parent``, or a root span of ``trace_id``: asked before any span exists, so a request
    that is not sampled costs no span at all (the gateway's hot path). A root span started
    then with ``start_span(..., trace_id=trace_id)`` gets the same answer from the SDK."""
    from opentelemetry.sdk.trace.sampling import Decision

    result = provider.sampler.should_sample(
        parent_of(parent), int(parent.trace_id if parent else trace_id, 16), "sampled?"
    )
    return result.decision is not Decision.DROP


def install(service: str, provider: TracerProvider) -> None:
    """Trace ``service`` with a provider made elsewhere (tests, an embedding program),
    whatever the environment says."""
    _providers[service] = provider
    context.spans_exported = True


def process_tracer() -> Tracer | None:
    """The tracer of the (first) service of this process, for work no request carries: the
    outbox relay, event consumers. None when tracing is off."""
    for provider in _providers.values():
        return provider.get_tracer("shop")
    return None


def shutdown() -> None:
    """Export what is buffered and stop the exporters (a process's last word)."""
    while _providers:
        _, provider = _providers.popitem()
        provider.shutdown()
    context.spans_exported = False


def parent_of(trace_context: context.TraceContext | None) -> Any:
    """An OpenTelemetry context whose current span is ``trace_context`` (a remote parent),
    or None for a new trace."""
    if trace_context is None:
        return None
    from opentelemetry import trace

    return trace.set_span_in_context(trace.NonRecordingSpan(_span_context(trace_context)))


def span_trace(span: Span) -> context.TraceContext:
    """The span's ids as the request's trace (what the next hop and a problem get)."""
    ids = span.get_span_context()
    return context.TraceContext(
        trace_id=format(ids.trace_id, "032x"),
        span_id=format(ids.span_id, "016x"),
        flags="01" if ids.trace_flags.sampled else "00",
    )


def start_span(
    tracer: Tracer,
    name: str,
    *,
    kind: str,
    parent: context.TraceContext | None,
    links: Sequence[context.TraceContext] = (),
    attributes: Mapping[str, str | int] | None = None,
    trace_id: str | None = None,
) -> Span:
    """A span (end it) of ``kind`` (``server``, ``client``, ``producer``, ``consumer``,
    ``internal``) under ``parent``, linked to ``links`` (e.g. the other events of a batch);
    a root span (no ``parent``) of ``trace_id`` when one is given."""
    from opentelemetry.trace import Link, SpanKind

    chosen = _chosen_trace_id.set(int(trace_id, 16)) if trace_id and parent is None else None
    try:
        return tracer.start_span(
            name,
            context=parent_of(parent),
            kind=SpanKind[kind.upper()],
            attributes=attributes,
            links=[Link(_span_context(link)) for link in links],
        )
    finally:
        if chosen is not None:
            _chosen_trace_id.reset(chosen)


def start_process_span(
    name: str,
    *,
    kind: str,
    parent: context.TraceContext | None,
    links: Sequence[context.TraceContext] = (),
    attributes: Mapping[str, str | int] | None = None,
) -> Span | None:
    """:func:`start_span` with the process's tracer (work no request carries: the outbox
    relay, event consumers, the mail sender); None when tracing is off."""
    tracer = process_tracer()
    if tracer is None:
        return None
    return start_span(tracer, name, kind=kind, parent=parent, links=links, attributes=attributes)


def current_trace() -> context.TraceContext:
    """The current OpenTelemetry span's ids (an instrumentation's server span)."""
    from opentelemetry import trace

    return span_trace(trace.get_current_span())


def _span_context(trace_context: context.TraceContext) -> SpanContext:
    from opentelemetry.trace import SpanContext, TraceFlags

    return SpanContext(
        trace_id=int(trace_context.trace_id, 16),
        span_id=int(trace_context.span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(int(trace_context.flags, 16)),
    )


def consuming(
    *, system: str, topic: str, group: str, event_id: str, parent: context.TraceContext | None
) -> Span | None:
    """Bind the handling of one delivered event as the current request: the event's id as
    the request id, and as trace a CONSUMER span under the event's ``parent`` when spans are
    exported (returned: end it when the handling ends), else the event's own trace."""
    span = None
    trace = parent
    if context.spans_exported:
        span = start_process_span(
            f"{topic} process",
            kind="consumer",
            parent=parent,
            attributes={
                "messaging.system": system,
                "messaging.operation.type": "process",
                "messaging.destination.name": topic,
                "messaging.consumer.group.name": group,
                "messaging.message.id": event_id,
            },
        )
        if span is not None:
            trace = span_trace(span)
    context.bind(request_id=event_id, trace=trace or context.TraceContext.new())
    return span


# --- Statement spans: SQL (SQLAlchemy engines and RawSql) and MongoDB commands ----------------
#
# Written here rather than taken from opentelemetry-instrumentation-sqlalchemy/-pymongo: those
# parent their spans on OpenTelemetry's current context, which Shop does not keep for event
# handlers, the lean routes' database work or a group transaction run for several callers;
# Shop binds its own trace (``shop.platform.context``) wherever work is done for a request or
# an event. A statement span is made only when that bound trace is sampled: background jobs
# (relay polling, sweepers) bind none and make no spans. docs/telemetry.md.


def statement_span(system: str, operation: str, text: str, *, namespace: str = "") -> Span | None:
    """A CLIENT span (end it) for one database statement under the bound request's or
    event's trace; None when spans are not exported or the bound trace is not sampled."""
    if not context.spans_exported:
        return None
    attributes: dict[str, str | int] = {
        "db.system.name": system,
        "db.operation.name": operation,
        "db.query.text": text,
    }
    if namespace:
        attributes["db.namespace"] = namespace
    return _client(operation, context.current_trace(), attributes)


def client_span(
    method: str, host: str, url: str, *, parent: context.TraceContext | None = None
) -> Span | None:
    """A CLIENT span (end it) for one outgoing HTTP request under ``parent``, or else the
    bound trace, when sampled; None when spans are not exported or that trace is not
    sampled."""
    if not context.spans_exported:
        return None
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        "server.address": host,
        "url.full": url.split("?", 1)[0],
    }
    return _client(method, parent or context.current_trace(), attributes)


def _client(
    name: str, parent: context.TraceContext | None, attributes: dict[str, str | int]
) -> Span | None:
    """A CLIENT span under ``parent`` when it is a sampled trace of this process's tracer."""
    if parent is None or parent.flags == "00":
        return None
    tracer = process_tracer()
    if tracer is None:
        return None
    return start_span(tracer, name, kind="client", parent=parent, attributes=attributes)


def sql_operation(statement: str) -> str:
    """The statement's first keyword (``SELECT``, ``INSERT``...), a span's name."""
    head = statement.lstrip().split(None, 1)
    return head[0].upper() if head else "SQL"


def end_span(span: Span, error: BaseException | None = None) -> None:
    """End ``span``, marked as failed with ``error``'s type when one is given."""
    if error is not None:
        from opentelemetry.trace import StatusCode

        span.set_attribute("error.type", type(error).__qualname__)
        span.set_status(StatusCode.ERROR)
    span.end()


def trace_engine(engine: AsyncEngine) -> None:
    """A span per statement ``engine`` runs (when spans are exported: a no-op otherwise)."""
    if not (context.spans_exported or enabled()):
        return
    from sqlalchemy import event

    sync_engine = engine.sync_engine
    system = "mysql" if sync_engine.dialect.name in ("mysql", "mariadb") else "sqlite"
    namespace = engine.url.database or ""
    if system == "sqlite":
        namespace = namespace.rsplit("/", 1)[-1]

    def before(
        _conn: Any, _cursor: Any, statement: str, _params: Any, ctx: Any, _many: bool
    ) -> None:
        span = statement_span(system, sql_operation(statement), statement, namespace=namespace)
        if ctx is not None and span is not None:
            ctx._shop_span = span

    def after(
        _conn: Any, _cursor: Any, _statement: str, _params: Any, ctx: Any, _many: bool
    ) -> None:
        span = getattr(ctx, "_shop_span", None)
        if span is not None:
            ctx._shop_span = None
            end_span(span)

    def failed(exception_context: Any) -> None:
        span = getattr(exception_context.execution_context, "_shop_span", None)
        if span is not None:
            exception_context.execution_context._shop_span = None
            end_span(span, exception_context.original_exception)

    event.listen(sync_engine, "before_cursor_execute", before)
    event.listen(sync_engine, "after_cursor_execute", after)
    event.listen(sync_engine, "handle_error", failed)
