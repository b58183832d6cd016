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
import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from functools import cache, partial
from importlib.metadata import entry_points
from time import time_ns
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
    "sampling",
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
# The process tracer of each provider, made once: ``get_tracer`` builds two scope objects
# and rewrites the warnings filters on every call (~15 µs, per span when asked each time).
_tracers: dict[TracerProvider, Tracer] = {}


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
    exporter = next(iter(found)).load()
    if target == "otlp_proto_http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        if exporter is OTLPSpanExporter:  # the SDK's, with the batch encoded here (below)
            return _otlp_exporter()()
    return exporter()


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

    made = Resource.create({SERVICE_NAME: service})
    provider = TracerProvider(
        resource=_hashed_once(made.attributes, made.schema_url), id_generator=_chosen_ids()
    )
    batches = _batches[provider] = [_batching()(_exporter(name)) for name in names]
    for processor in batches:
        provider.add_span_processor(processor)
    _providers[service] = provider
    context.spans_exported = True
    log.info("tracing %s to %s", service, ", ".join(names))
    return provider


def _hashed_once(attributes: Any, schema_url: str | None) -> Any:
    """A ``Resource`` of ``attributes`` that computes its hash once: the OTLP exporter groups
    the spans of a batch by resource, and ``Resource.__hash__`` dumps the attributes as
    JSON every time (~7 µs per exported span here). A resource never changes."""
    from opentelemetry.sdk.resources import Resource

    class HashedOnce(Resource):
        def __init__(self, attributes: Any, schema_url: str | None = None) -> None:
            super().__init__(attributes, schema_url)
            self._hash = super().__hash__()

        def __hash__(self) -> int:
            return self._hash

    return HashedOnce(attributes, schema_url)


# A root span's trace id chosen by the caller of ``start_span`` (see ``sampling``).
_chosen_trace_id: ContextVar[int | None] = ContextVar("shop_chosen_trace_id", default=None)


def _chosen_ids() -> Any:
    """The SDK's random ids, except a root span's trace id when one was chosen."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class ChosenIds(RandomIdGenerator):
        def generate_trace_id(self) -> int:
            chosen = _chosen_trace_id.get()
            return chosen if chosen is not None else super().generate_trace_id()

    return ChosenIds()


# The low 64 bits of a trace id (its last 16 hex digits) are what the SDK's ratio compares.
_ALL = 1 << 64
_LOW_64 = _ALL - 1


def sampling(provider: TracerProvider) -> Callable[[context.TraceContext | None, str], bool]:
    """Whether ``provider``'s sampler (``OTEL_TRACES_SAMPLER``) records a span under a
    remote ``parent``, or a root span of ``trace_id`` (hex): asked before any span exists,
    so a request that is not sampled costs no span at all (the gateway's hot path). A root
    span started then with ``start_span(..., trace_id=trace_id)`` gets the same answer
    from the SDK.

    The SDK's standard samplers (``always_on``/``off``, ``traceidratio``, ``parentbased_*``
    with their default delegates) are decided here with exactly their rule, a comparison of
    the trace id's low 64 bits with a bound (the parent's sampled flag picks the bound for a
    parent-based one): asking the SDK builds a context, a sampling result and an attribute
    set for every request, which was a tenth of the gateway's CPU per request at 10 %.
    Any other sampler is asked itself."""
    bounds = _bounds(provider.sampler)
    if bounds is None:
        return partial(_ask, provider.sampler)
    root, under_sampled, under_unsampled = bounds

    def sampled(parent: context.TraceContext | None, trace_id: str) -> bool:
        if parent is None:
            return int(trace_id[16:], 16) < root
        bound = under_sampled if int(parent.flags, 16) & 1 else under_unsampled
        return int(parent.trace_id[16:], 16) < bound

    return sampled


def _bounds(sampler: Any) -> tuple[int, int, int] | None:
    """The bounds (root, under a sampled remote parent, under an unsampled one) that decide
    as ``sampler`` does, or None when it is not one whose rule is known here."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased

    if getattr(type(sampler), "should_sample", None) is not ParentBased.should_sample:
        bound = _bound(sampler)
        return None if bound is None else (bound, bound, bound)
    delegates = (
        getattr(sampler, "_remote_parent_sampled", None),
        getattr(sampler, "_remote_parent_not_sampled", None),
    )
    if delegates != (ALWAYS_ON, ALWAYS_OFF):
        return None  # a parent-based sampler with delegates of its own: the SDK decides
    root = _bound(getattr(sampler, "_root", None))
    return None if root is None else (root, _ALL, 0)


def _bound(sampler: Any) -> int | None:
    """What a trace id's low 64 bits must be below for ``sampler`` to sample it (a ratio's
    bound; every id or none for the static samplers), or None for another sampler."""
    from opentelemetry.sdk.trace.sampling import StaticSampler, TraceIdRatioBased

    should_sample = getattr(type(sampler), "should_sample", None)
    if should_sample is TraceIdRatioBased.should_sample:
        return int(sampler.bound)
    if should_sample is StaticSampler.should_sample:
        description = sampler.get_description()
        if description == "AlwaysOnSampler":
            return _ALL
        if description == "AlwaysOffSampler":
            return 0
    return None


def _ask(sampler: Any, parent: context.TraceContext | None, trace_id: str) -> bool:
    """The SDK sampler's own answer (for samplers ``sampling`` has no rule for)."""
    from opentelemetry.sdk.trace.sampling import Decision

    result = sampler.should_sample(
        parent_of(parent), int(parent.trace_id if parent else trace_id, 16), "sampled?"
    )
    return bool(result.decision is not Decision.DROP)


def install(service: str, provider: TracerProvider) -> None:
    """Trace ``service`` with a provider made elsewhere (tests, an embedding program),
    whatever the environment says."""
    _providers[service] = provider
    context.spans_exported = True


def process_tracer() -> Tracer | None:
    """The tracer of the (first) service of this process, for work no request carries: the
    outbox relay, event consumers. None when tracing is off."""
    for provider in _providers.values():
        tracer = _tracers.get(provider)
        if tracer is None:
            tracer = _tracers[provider] = provider.get_tracer("shop")
        return tracer
    return None


def shutdown() -> None:
    """Export what is buffered and stop the exporters (a process's last word)."""
    while _providers:
        _, provider = _providers.popitem()
        provider.shutdown()
    _tracers.clear()
    _recorders.clear()
    _batches.clear()
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
    if type(span) is _RecordedSpan:  # made with its ids in hex (see _recorded)
        known: context.TraceContext = span.trace  # type: ignore[attr-defined]
        return known
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
    a root span (no ``parent``) of ``trace_id`` when one is given.

    With one of the standard samplers (``sampling``) the span is a :func:`_recorded` one:
    decided and made here, handed to the provider's processors as the SDK's own
    ``ReadableSpan`` when it ends. Otherwise the SDK's tracer makes it."""
    recorder = _recorders.get(tracer)
    if recorder is None:
        recorder = _recorders[tracer] = _recorder(tracer)
    if recorder is not False and len(links) <= recorder.max_links:
        recorded: Span = recorder.start(name, kind, parent, links, attributes, trace_id)
        return recorded
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


# Per tracer: what makes its spans (a recorder, see _recorded), or False: the SDK's tracer.
# The classes of the recorded spans and of the spans processors get of them, once made
# (``span_trace`` and the OTLP encoding know them by it).
_RecordedSpan: Any = None
_EndedSpan: Any = None
_recorders: dict[Any, Any] = {}


# Shop's spans carry at most eight attributes: span limits at least this high never bite.
_ATTRIBUTES_KEPT = 32


def _recorder(tracer: Any) -> Any:
    """A recorder of ``tracer``'s spans, or False when its sampler is not a standard one, its
    span limits could cut a span (``OTEL_SPAN_ATTRIBUTE_*``), or the tracer is not the
    SDK's: those spans are the SDK tracer's to make."""
    bounds = _bounds(getattr(tracer, "sampler", None))
    scope = getattr(tracer, "_instrumentation_scope", None)
    processor = getattr(tracer, "span_processor", None)
    limits = getattr(tracer, "_span_limits", None)
    if bounds is None or scope is None or processor is None or limits is None:
        return False
    kept = limits.max_span_attributes
    if limits.max_span_attribute_length is not None or (
        kept is not None and kept < _ATTRIBUTES_KEPT
    ):
        return False
    max_links = limits.max_links if limits.max_links is not None else math.inf
    return _recorded()(tracer, bounds, scope, processor, max_links)


@cache
def _recorded() -> Any:
    """The recorder of spans made without the SDK's tracer (made once OpenTelemetry is loaded).

    Why: the SDK's ``Tracer.start_span`` and ``Span`` (context look-up, the sampler asked
    again, locked attribute and event containers, processor calls at the start) cost the
    gateway about 100 µs of CPU per span on its event loop, twice per sampled request:
    most of what tracing at 10 % cost it (docs/telemetry.md, Performance). A recorded span
    keeps its name, ids, kind, attributes, links, events and status in plain fields and,
    when it ends, gives the provider's span processors (the batch processor, an exporter)
    the SDK's ``ReadableSpan`` of it, exactly what they get from an SDK span; processors'
    ``on_start`` is not called (the SDK's batch and simple processors do nothing there).
    A span is used by one task or callback at a time, so it takes no lock. It keeps its ids
    in hex as well (``trace``), as ``span_trace`` gives them (formatting the integers again
    cost ~1 µs of the ~7 µs a sampled request's span took on the gateway's event loop), and
    makes its ``SpanContext`` only when asked."""
    global _RecordedSpan, _EndedSpan
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.trace import (
        Link,
        NonRecordingSpan,
        SpanContext,
        SpanKind,
        Status,
        StatusCode,
        TraceFlags,
    )
    from opentelemetry.trace import Span as ApiSpan

    kinds = {k.name.lower(): k for k in SpanKind}
    unset = Status(StatusCode.UNSET)
    sampled_flags = int(TraceFlags.SAMPLED)
    random_flags = int(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID)

    class RecordedSpan(ApiSpan):
        _links: tuple[Link, ...]
        _state: Status
        _ended: int | None
        _context: SpanContext | None

        def __init__(
            self,
            recorder: Recorder,
            name: str,
            kind: Any,
            ids: tuple[int, int, int],
            parent: tuple[int, int] | None,
            attributes: dict[str, Any],
            links: tuple[Link, ...],
            trace: context.TraceContext,
        ) -> None:
            self.trace = trace
            self._recorder = recorder
            self._name = name
            self._kind = kind
            self._ids = ids  # trace id, span id, trace flags
            self._parent = parent  # the remote parent's span id and trace flags
            self._context = None  # made when asked
            self._attributes = attributes
            self._links = links
            self._events: list[Event] = []
            self._state = unset
            self._start = time_ns()
            self._ended = None

        def get_span_context(self) -> SpanContext:
            if self._context is None:
                trace, span_id, flags = self._ids
                self._context = SpanContext(trace, span_id, False, TraceFlags(flags))
            return self._context

        def is_recording(self) -> bool:
            return self._ended is None

        def set_attribute(self, key: str, value: Any) -> None:
            if self._ended is None:
                self._attributes[key] = value

        def set_attributes(self, attributes: Mapping[str, Any]) -> None:
            if self._ended is None:
                self._attributes.update(attributes)

        def add_event(
            self, name: str, attributes: Any = None, timestamp: int | None = None
        ) -> None:
            if self._ended is None:
                self._events.append(Event(name, attributes, timestamp))

        def add_link(self, context: SpanContext, attributes: Any = None) -> None:
            if self._ended is None:
                self._links = (*self._links, Link(context, attributes))

        def update_name(self, name: str) -> None:
            if self._ended is None:
                self._name = name

        def set_status(self, status: Any, description: str | None = None) -> None:
            # The SDK's rule: OK is final, UNSET changes nothing.
            if self._ended is not None or self._state.status_code is StatusCode.OK:
                return
            if not isinstance(status, Status):
                status = Status(status, description)
            if status.status_code is not StatusCode.UNSET:
                self._state = status

        def record_exception(
            self,
            exception: BaseException,
            attributes: Any = None,
            timestamp: int | None = None,
            escaped: bool = False,
        ) -> None:
            self.add_event(
                "exception",
                {
                    "exception.type": type(exception).__qualname__,
                    "exception.message": str(exception),
                    **(attributes or {}),
                },
                timestamp,
            )

        def end(self, end_time: int | None = None) -> None:
            if self._ended is not None:
                return
            self._ended = end_time if end_time is not None else time_ns()
            self._recorder.processor.on_end(EndedSpan(self, self._ended))

    class EndedSpan(ReadableSpan):
        """A recorded span as the processors get it: the SDK's ``ReadableSpan`` whose
        ``SpanContext``s (its own, its parent's) are made when asked rather than kept. Why: a
        span waits in the batch processor's queue for seconds, long enough to reach the
        collector's oldest generation, and each ``SpanContext`` (a tuple holding a tracked
        ``TraceFlags`` and ``TraceState``) is one more object there; kept as integers, a
        queued span is one. Measured: the garbage collector's share of tracing at 10 %
        (docs/telemetry.md, "The export and the collector")."""

        def __init__(self, span: RecordedSpan, end_time: int) -> None:
            # ReadableSpan.__init__'s fields, but _context and _parent, properties here.
            recorder = span._recorder
            self._name = span._name
            self._kind = span._kind
            self._instrumentation_info = None
            self._instrumentation_scope = recorder.scope
            self._start_time = span._start
            self._end_time = end_time
            self._attributes = span._attributes
            self._events = tuple(span._events)
            self._links = span._links
            self._resource = recorder.resource
            self._status = span._state
            self._trace_id, self._span_id, self._flags = span._ids
            self._parent_ids = span._parent

        # Attributes of ReadableSpan, computed here.
        @property
        def _context(self) -> SpanContext:  # type: ignore[override]
            return SpanContext(self._trace_id, self._span_id, False, TraceFlags(self._flags))

        @property
        def _parent(self) -> SpanContext | None:  # type: ignore[override]
            if self._parent_ids is None:
                return None
            span_id, flags = self._parent_ids
            return SpanContext(self._trace_id, span_id, True, TraceFlags(flags))

    class Recorder:
        def __init__(
            self,
            tracer: Any,
            bounds: tuple[int, int, int],
            scope: Any,
            processor: Any,
            max_links: float,
        ) -> None:
            self.max_links = max_links  # a span with more is the SDK's, which keeps the last
            self.resource = tracer.resource
            self.scope = scope
            self.processor = processor
            self.ids = tracer.id_generator
            self.random = bool(self.ids.is_trace_id_random())
            self.root, self.under_sampled, self.under_unsampled = bounds

        def start(
            self,
            name: str,
            kind: str,
            parent: context.TraceContext | None,
            links: Sequence[context.TraceContext],
            attributes: Mapping[str, str | int] | None,
            trace_id: str | None,
        ) -> ApiSpan:
            ids = self.ids
            span_id = ids.generate_span_id()
            if parent is None:
                if trace_id:
                    trace, trace_hex = int(trace_id, 16), trace_id
                else:
                    trace = ids.generate_trace_id()
                    trace_hex = format(trace, "032x")
                bound, random, parent_flags = self.root, self.random, 0
            else:
                trace, trace_hex = int(parent.trace_id, 16), parent.trace_id
                parent_flags = int(parent.flags, 16)
                bound = self.under_sampled if parent_flags & 1 else self.under_unsampled
                random = bool(parent_flags & TraceFlags.RANDOM_TRACE_ID)
            if trace & _LOW_64 >= bound:  # not sampled: ids only, as the SDK's answer
                flags = TraceFlags(TraceFlags.RANDOM_TRACE_ID if random else 0)
                return NonRecordingSpan(SpanContext(trace, span_id, False, flags))
            return RecordedSpan(
                self,
                name,
                kinds[kind],
                (trace, span_id, random_flags if random else sampled_flags),
                None if parent is None else (int(parent.span_id, 16), parent_flags),
                dict(attributes) if attributes else {},
                tuple(Link(_span_context(link)) for link in links) if links else (),
                context.TraceContext(trace_hex.lower(), format(span_id, "016x"), "01"),
            )

    _RecordedSpan, _EndedSpan = RecordedSpan, EndedSpan
    return Recorder


# --- HTTP server spans kept as records (the gateway's proxy span) ----------------------------
#
# The gateway makes one span per sampled request, always of one shape: a SERVER span named by
# the route template, with the method, the status and the route as attributes, ERROR from 500
# up, under the caller's span or at the root. Made as a recorded span (above) it still cost
# ~28 µs of CPU per sampled request live at 10 % (a RecordedSpan, its EndedSpan, the
# processors' on_end, its SpanContext): code that runs for one request in ten runs cold.
# Kept as a record of eight fields it costs the sampled request a few lines on the loop; the
# batch processor queues the record itself, the OTLP encoding below writes it directly, and
# any other exporter (Zipkin) gets the SDK's ``ReadableSpan`` of it, made in the export
# thread. docs/telemetry.md, "The proxy's span as a record".


def _server_shape(method: str, route: str | None, status: int) -> tuple[str, dict[str, str | int]]:
    """An HTTP server span's name (by its route template, bounded like the metrics) and
    attributes, in the order the SDK's span holds them; from 500 up it is also ERROR."""
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        "http.response.status_code": status,
    }
    if route:
        attributes["http.route"] = route
    return (f"{method} {route}" if route else method), attributes


class ServerSpan:
    """One HTTP request's SERVER span as a record: ``trace`` is its own ids (the next hop's
    parent), ``parent`` the caller's span (remote) or None at a trace's root. End it once
    with the request's method, route template and status."""

    __slots__ = ("origin", "trace", "parent", "start", "end_time", "method", "route", "status")

    def __init__(
        self,
        origin: ServerSpans,
        trace: context.TraceContext,
        parent: context.TraceContext | None,
        start: int,
    ) -> None:
        self.origin = origin
        self.trace = trace
        self.parent = parent
        self.start = start
        self.end_time = 0
        self.method = ""
        self.route: str | None = None
        self.status = 0

    def end(self, method: str, route: str | None, status: int) -> None:
        if self.end_time:
            return
        self.end_time = time_ns()
        self.method, self.route, self.status = method, route, status
        self.origin.ended(self)

    def readable(self) -> Any:
        """The SDK's ``ReadableSpan`` of this record (for processors and exporters other
        than Shop's batch processor and OTLP encoding)."""
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        trace_id = int(self.trace.trace_id, 16)
        parent = self.parent
        if parent is None:
            random, parent_context = self.origin.random, None
        else:
            parent_flags = int(parent.flags, 16)
            random = bool(parent_flags & TraceFlags.RANDOM_TRACE_ID)
            parent_context = SpanContext(
                trace_id, int(parent.span_id, 16), True, TraceFlags(parent_flags)
            )
        flags = TraceFlags.SAMPLED | (TraceFlags.RANDOM_TRACE_ID if random else 0)
        name, attributes = _server_shape(self.method, self.route, self.status)
        return ReadableSpan(
            name=name,
            context=SpanContext(trace_id, int(self.trace.span_id, 16), False, TraceFlags(flags)),
            parent=parent_context,
            resource=self.origin.resource,
            attributes=attributes,
            kind=SpanKind.SERVER,
            instrumentation_scope=self.origin.scope,
            status=Status(StatusCode.ERROR if self.status >= 500 else StatusCode.UNSET),
            start_time=self.start,
            end_time=self.end_time,
        )


class _SdkServerSpan:
    """A server span the SDK's tracer makes (a sampler or span limits of the operator's own:
    ``ServerSpans`` then cannot keep a record that exports the same), with the record's
    ``trace`` and ``end``."""

    __slots__ = ("span", "trace")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.trace = span_trace(span)

    def end(self, method: str, route: str | None, status: int) -> None:
        span = self.span
        name, attributes = _server_shape(method, route, status)
        span.update_name(name)
        span.set_attributes(attributes)
        if status >= 500:
            from opentelemetry.trace import StatusCode

            span.set_status(StatusCode.ERROR)
        span.end()


class ServerSpans:
    """Where a service's HTTP server spans of ``scope`` are decided and started
    (:func:`server_spans`)."""

    def __init__(self, provider: TracerProvider, scope: str) -> None:
        self.tracer = provider.get_tracer(scope)
        self.sampled = sampling(provider)
        tracer: Any = self.tracer
        self.resource = provider.resource
        self.scope = getattr(tracer, "_instrumentation_scope", None)
        self.random = bool(provider.id_generator.is_trace_id_random())
        # A record exports what the SDK's span would only with a standard sampler and span
        # limits that cut nothing, from the SDK's tracer (the recorded spans' conditions).
        self.records = _recorder(tracer) is not False
        # A provider ``tracer_provider`` made has Shop's batch processors only: they queue
        # the record itself. Another's processors (tests) get the ReadableSpan of it.
        ours = _batches.get(provider)
        if ours is not None and len(ours) == 1:
            self.ended: Callable[[ServerSpan], None] = ours[0].record
        elif ours is not None:
            self.ended = partial(_record_in_each, ours)
        else:
            self.ended = partial(_readable_to, tracer.span_processor)

    def start(
        self, parent: context.TraceContext | None, trace_id: str, span_id: str
    ) -> ServerSpan | _SdkServerSpan:
        """A span (end it) under ``parent``, else the root of ``trace_id``; ``span_id`` its
        own id (16 hex digits, random): for a request ``sampled`` said yes to."""
        if self.records:
            trace = context.TraceContext(parent.trace_id if parent else trace_id, span_id, "01")
            return ServerSpan(self, trace, parent, time_ns())
        span = start_span(self.tracer, "proxy", kind="server", parent=parent, trace_id=trace_id)
        return _SdkServerSpan(span)


def server_spans(provider: TracerProvider | None, scope: str) -> ServerSpans | None:
    """The server spans of ``provider``'s service (None: tracing is off)."""
    return ServerSpans(provider, scope) if provider is not None else None


def _record_in_each(processors: Sequence[Any], span: ServerSpan) -> None:
    for processor in processors:
        processor.record(span)


def _readable_to(processor: Any, span: ServerSpan) -> None:
    processor.on_end(span.readable())


# The batch processors ``tracer_provider`` gave each provider it made.
_batches: dict[Any, list[Any]] = {}


@cache
def _batching() -> Any:
    """The SDK's ``BatchSpanProcessor``, which also queues ``ServerSpan`` records: as they
    are for Shop's OTLP encoding, as ``ReadableSpan``s (made in the export thread) for any
    other exporter."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Expanded(SpanExporter):
        """An exporter given ReadableSpans for the records of a batch."""

        def __init__(self, exporter: SpanExporter) -> None:
            self.exporter = exporter

        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return self.exporter.export(_readables(spans))

        def shutdown(self) -> None:
            self.exporter.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return self.exporter.force_flush(timeout_millis)

    class Batching(BatchSpanProcessor):
        def __init__(self, exporter: SpanExporter) -> None:
            encodes = isinstance(exporter, _otlp_exporter())
            super().__init__(exporter if encodes else Expanded(exporter))
            # A record goes into the queue as a span does (BatchProcessor.emit: the queue's
            # bound, the wake-up at a full batch); without that method, as its ReadableSpan.
            emit = getattr(getattr(self, "_batch_processor", None), "emit", None)
            self.record: Callable[[ServerSpan], None] = (
                emit if emit is not None else partial(_readable_to, self)
            )

    return Batching


def _readables(spans: Sequence[Any]) -> list[Any]:
    """``spans`` with each record as its ``ReadableSpan``."""
    return [span.readable() if type(span) is ServerSpan else span for span in spans]


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


def client_span(method: str, host: str, url: str) -> Span | None:
    """A CLIENT span (end it) for one outgoing HTTP request under the bound trace, when it
    is sampled; None when spans are not exported or that trace is not sampled."""
    if not context.spans_exported:
        return None
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        "server.address": host,
        "url.full": url.split("?", 1)[0],
    }
    return _client(method, context.current_trace(), attributes)


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


# --- The OTLP/HTTP export: the batch encoded here, sent by the SDK's exporter -----------------
#
# The SDK's encoder (opentelemetry-exporter-otlp-proto-common) builds a protobuf message per
# span, status, attribute and attribute value (a dozen per span of the gateway's) and then
# serialises them: ~25 µs of CPU per span, in the batch processor's thread but on the same
# core as the event loop, ~2.5 µs per request of the gateway traced at 10 % (docs/telemetry.md,
# "The export and the collector"). ``otlp_request`` writes the same bytes directly (~6 µs a
# span): the protobuf wire format of ``ExportTraceServiceRequest`` (opentelemetry-proto's
# trace/v1/trace.proto), fields in number order and defaults left out, as the protobuf
# runtime writes them. tests/unit/test_telemetry_otlp.py checks it byte for byte against
# the SDK's ``encode_spans(...).SerializePartialToString()`` and decodes it with
# opentelemetry-proto's classes. A value this encoder has no rule for (an attribute that is
# not a string, bool, int, float, bytes or a sequence of them, an int beyond 64 bits) raises
# ``_Unencodable`` and the whole batch goes to the SDK's encoder.


class _Unencodable(Exception):
    """A span this encoder leaves to the SDK's."""


def _varint(value: int) -> bytes:
    """``value`` (0 <= value < 2**64) as a protobuf varint."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# The varint of every length under 128: one byte, looked up.
_SHORT = [bytes((n,)) for n in range(0x80)]


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag (field number << 3 | 2), length and payload."""
    n = len(payload)
    return tag + (_SHORT[n] if n < 0x80 else _varint(n)) + payload


# Tags (field number << 3 | wire type) of the fields written below.
_ANY_STRING, _ANY_BOOL, _ANY_INT, _ANY_DOUBLE = b"\x0a", b"\x10", b"\x18", b"\x21"
_ANY_ARRAY, _ANY_BYTES = b"\x2a", b"\x3a"
_MIN_INT64, _MAX_INT64 = -(1 << 63), (1 << 63) - 1
_DOUBLE, _FIXED32, _FIXED64 = struct.Struct("<d"), struct.Struct("<I"), struct.Struct("<Q")


def _any_value(value: Any) -> bytes:
    """An ``AnyValue``'s fields (a oneof: written even when the value is a default)."""
    if isinstance(value, bool):  # before int: a bool is an int
        return _ANY_BOOL + (b"\x01" if value else b"\x00")
    if isinstance(value, str):
        return _field(_ANY_STRING, value.encode())
    if isinstance(value, int):
        if not _MIN_INT64 <= value <= _MAX_INT64:
            raise _Unencodable(value)
        return _ANY_INT + _varint(value & _LOW_64)  # two's complement, as int64 is written
    if isinstance(value, float):
        return _ANY_DOUBLE + _DOUBLE.pack(value)
    if isinstance(value, bytes):
        return _field(_ANY_BYTES, value)
    if value is None:
        return b""
    if isinstance(value, Sequence):  # ArrayValue { repeated AnyValue values = 1 }
        return _field(_ANY_ARRAY, b"".join(_field(b"\x0a", _any_value(v)) for v in value))
    raise _Unencodable(value)


# A span's attributes mostly repeat (the method, route, status, the service's statements):
# their encoded KeyValue field is kept, up to a bound, keyed by (tag, key, type, value).
_key_values: dict[tuple[bytes, str, type, Any], bytes] = {}
_KEY_VALUES_KEPT = 4096


def _key_value(tag: bytes, key: str, value: Any) -> bytes:
    """A ``KeyValue`` message (key = 1, value = 2) as the field ``tag``."""
    kind = type(value)
    if kind is str or kind is int:
        known = _key_values.get((tag, key, kind, value))
        if known is not None:
            return known
    encoded = _field(
        tag, (_field(b"\x0a", key.encode()) if key else b"") + _field(b"\x12", _any_value(value))
    )
    if (kind is str or kind is int) and len(_key_values) < _KEY_VALUES_KEPT:
        _key_values[(tag, key, kind, value)] = encoded
    return encoded


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    """Each of ``attributes`` as a ``KeyValue`` field ``tag``."""
    if not attributes:
        return b""
    return b"".join([_key_value(tag, k, v) for k, v in attributes.items()])


def _count(tag: bytes, count: int) -> bytes:
    return tag + _varint(count) if count else b""


@cache
def _encoding() -> tuple[dict[Any, bytes], tuple[bytes, bytes], tuple[bytes, bytes]]:
    """From the generated classes: SpanKind -> the ``kind`` field; a span's ``flags`` field
    ("has is_remote", and "is remote"), without and with a remote parent; a link's."""
    from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
    from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags
    from opentelemetry.trace import SpanKind

    kinds = {
        kind: b"\x30" + _varint(PbSpan.SpanKind.Value(f"SPAN_KIND_{kind.name}"))
        for kind in SpanKind
    }
    local = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
    remote = local | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
    span_flags = (b"\x85\x01" + _FIXED32.pack(local), b"\x85\x01" + _FIXED32.pack(remote))
    link_flags = (b"\x35" + _FIXED32.pack(local), b"\x35" + _FIXED32.pack(remote))
    return kinds, span_flags, link_flags


def _otlp_span(span: Any) -> bytes:
    """A ``Span`` message (trace/v1/trace.proto) of a ``ReadableSpan``, as ``ScopeSpans``'s
    field ``spans`` (2). Read through the ``ReadableSpan`` API, as the SDK's encoder does,
    but for a recorded span's ids (integers kept in it, see ``_recorded``)."""
    kinds, span_flags, link_flags = _encoding()
    if type(span) is _EndedSpan:  # a recorded span: its ids as kept, no SpanContext made
        trace_id, span_id, trace_state = span._trace_id, span._span_id, None
        parent_ids = span._parent_ids
        parent_span_id = None if parent_ids is None else parent_ids[0]
        remote = parent_ids is not None  # a recorded span's parent is always a remote one
    else:
        ids = span.get_span_context()
        parent = span.parent
        trace_id, span_id, trace_state = ids.trace_id, ids.span_id, ids.trace_state
        parent_span_id = None if parent is None else parent.span_id
        remote = parent is not None and parent.is_remote
    out = b"\x0a\x10%s\x12\x08%s" % (  # trace_id = 1, span_id = 2
        trace_id.to_bytes(16, "big"),
        span_id.to_bytes(8, "big"),
    )
    if trace_state:  # trace_state = 3
        state = ",".join([f"{k}={v}" for k, v in trace_state.items()])
        out += _field(b"\x1a", state.encode())
    if parent_span_id is not None:  # parent_span_id = 4
        out += b"\x22\x08" + parent_span_id.to_bytes(8, "big")
    name = span.name
    if name:  # name = 5
        out += _field(b"\x2a", name.encode())
    out += kinds[span.kind]  # kind = 6 (never SPAN_KIND_UNSPECIFIED)
    start, end = span.start_time, span.end_time
    if start:  # start_time_unix_nano = 7, end_time_unix_nano = 8 (fixed64)
        out += b"\x39" + _FIXED64.pack(start)
    if end:
        out += b"\x41" + _FIXED64.pack(end)
    out += _attributes(b"\x4a", span.attributes)  # attributes = 9
    out += _count(b"\x50", span.dropped_attributes)  # dropped_attributes_count = 10
    for event in span.events:  # events = 11: time = 1, name = 2, attributes = 3, dropped = 4
        body = b"\x09" + _FIXED64.pack(event.timestamp) if event.timestamp else b""
        if event.name:
            body += _field(b"\x12", event.name.encode())
        body += _attributes(b"\x1a", event.attributes)
        out += _field(b"\x5a", body + _count(b"\x20", event.dropped_attributes))
    out += _count(b"\x60", span.dropped_events)  # dropped_events_count = 12
    for link in span.links:  # links = 13: trace_id = 1, span_id = 2, attributes = 4 ...
        linked = link.context
        body = b"\x0a\x10%s\x12\x08%s" % (
            linked.trace_id.to_bytes(16, "big"),
            linked.span_id.to_bytes(8, "big"),
        )
        body += _attributes(b"\x22", link.attributes)
        body += _count(b"\x28", link.dropped_attributes)  # dropped_attributes_count = 5
        out += _field(b"\x6a", body + link_flags[linked.is_remote])  # flags = 6 (fixed32)
    out += _count(b"\x70", span.dropped_links)  # dropped_links_count = 14
    status = span.status  # status = 15: message = 2, code = 3 (written even when empty)
    body = _field(b"\x12", status.description.encode()) if status.description else b""
    out += _field(b"\x7a", body + _count(b"\x18", status.status_code.value))
    out += span_flags[remote]  # flags = 16 (fixed32)
    return _field(b"\x12", out)


# A record's status field (15): UNSET (empty), or ERROR (code = 3: 2).
_UNSET_STATUS, _ERROR_STATUS = b"\x7a\x00", b"\x7a\x02\x18\x02"
# Per (method, route, status): a record's fields before its times (name, kind) and after
# them (attributes, status), the same for every request of that route and status. Bounded,
# as ``_key_values``: the routes are the gateway's table, the statuses a few dozen.
_server_parts: dict[tuple[str, str | None, int], tuple[bytes, bytes]] = {}


def _otlp_server_span(span: ServerSpan) -> bytes:
    """A ``Span`` message of a ``ServerSpan`` record: the same bytes as ``_otlp_span`` of
    its ``ReadableSpan``, written from its fields."""
    method, route, status = span.method, span.route, span.status
    parts = _server_parts.get((method, route, status))
    if parts is None:
        parts = _server_span_parts(method, route, status)
    trace, parent = span.trace, span.parent
    before, after = parts
    span_flags = _encoding()[1]
    out = b"\x0a\x10%s\x12\x08%s%s%s\x39%s\x41%s%s%s" % (  # trace_id, span_id, parent ...
        bytes.fromhex(trace.trace_id),
        bytes.fromhex(trace.span_id),
        b"" if parent is None else b"\x22\x08" + bytes.fromhex(parent.span_id),
        before,
        _FIXED64.pack(span.start),
        _FIXED64.pack(span.end_time),
        after,
        span_flags[parent is not None],
    )
    return _field(b"\x12", out)


def _server_span_parts(method: str, route: str | None, status: int) -> tuple[bytes, bytes]:
    """A record's fields before its times and after them (without ``flags``)."""
    from opentelemetry.trace import SpanKind

    kinds, _, _ = _encoding()
    name, attributes = _server_shape(method, route, status)
    before = _field(b"\x2a", name.encode()) + kinds[SpanKind.SERVER]
    after = _attributes(b"\x4a", attributes)
    after += _ERROR_STATUS if status >= 500 else _UNSET_STATUS
    if len(_server_parts) < _KEY_VALUES_KEPT:
        _server_parts[(method, route, status)] = before, after
    return before, after


def otlp_request(spans: Sequence[Any]) -> bytes:
    """The serialised ``ExportTraceServiceRequest`` of ``spans`` (SDK ``ReadableSpan``s):
    what ``encode_spans(spans).SerializePartialToString()`` returns, spans grouped by
    resource, then by instrumentation scope, in the order they first appear."""
    grouped: dict[Any, dict[Any, list[bytes]]] = {}
    last_resource = last_scope = encoded = None
    for span in spans:
        record = type(span) is ServerSpan
        if record:
            resource, scope = span.origin.resource, span.origin.scope
        else:
            resource, scope = span.resource, span.instrumentation_scope or None
        # A batch is mostly one resource and scope: the same objects need no hashing
        # (``Resource.__hash__`` dumps its attributes as JSON unless cached).
        if resource is not last_resource or scope is not last_scope or encoded is None:
            encoded = grouped.setdefault(resource, {}).setdefault(scope, [])
            last_resource, last_scope = resource, scope
        encoded.append(_otlp_server_span(span) if record else _otlp_span(span))
    out = []
    for resource, scopes in grouped.items():
        # ResourceSpans: resource = 1 (Resource.attributes = 1), scope_spans = 2, schema_url = 3
        body = _field(b"\x0a", _attributes(b"\x0a", resource.attributes))
        for scope, encoded_spans in scopes.items():
            # ScopeSpans: scope = 1 (name = 1, version = 2, attributes = 3), schema_url = 3
            described = b""
            if scope is not None:
                if scope.name:
                    described += _field(b"\x0a", scope.name.encode())
                if scope.version:
                    described += _field(b"\x12", scope.version.encode())
                described += _attributes(b"\x1a", scope.attributes)
            schema = scope.schema_url if scope is not None else None
            body += _field(
                b"\x12",
                b"".join([_field(b"\x0a", described), *encoded_spans])
                + (_field(b"\x1a", schema.encode()) if schema else b""),
            )
        if resource.schema_url:
            body += _field(b"\x1a", resource.schema_url.encode())
        out.append(_field(b"\x0a", body))  # ExportTraceServiceRequest.resource_spans = 1
    return b"".join(out)


@cache
def _otlp_exporter() -> Any:
    """The SDK's OTLP/HTTP span exporter with the batch encoded by :func:`otlp_request` (the
    SDK's encoder for a batch it has no rule for); sending, retries, compression, the size
    limit and the exporter's own metrics are the SDK's (its ``export`` with one line changed)."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    class Exporter(OTLPSpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            if self._shutdown:
                return super().export(_readables(spans))  # the SDK's warning and failure
            try:
                serialized = otlp_request(spans)
            except _Unencodable:
                serialized = encode_spans(_readables(spans)).SerializePartialToString()
            except Exception:  # noqa: BLE001 - the SDK's encoder logs what it cannot encode
                return super().export(_readables(spans))
            return self._send(serialized, len(spans))

        def _send(self, serialized: bytes, count: int) -> SpanExportResult:
            # OTLPSpanExporter.export after its encoding (opentelemetry-exporter-otlp-proto-http).
            from opentelemetry.exporter.otlp.proto.http._common import (
                RequestPayloadTooLargeError,
                _is_request_too_large,
            )

            with self._metrics.export_operation(count) as result:
                if _is_request_too_large(serialized, self._max_request_size):
                    log.warning(
                        "Dropping span batch: serialized size %d bytes exceeds max_request_size"
                        " %d bytes.",
                        len(serialized),
                        self._max_request_size,
                    )
                    result.error = RequestPayloadTooLargeError(
                        f"Serialized span request size {len(serialized)} bytes exceeds "
                        f"max_request_size {self._max_request_size} bytes."
                    )
                    return SpanExportResult.FAILURE
                exported = self._client.export(serialized)
                if not exported.success:
                    result.error = exported.error
                    result.error_attrs = (
                        {"http.response.status_code": exported.status_code}
                        if exported.status_code is not None
                        else None
                    )
                    return SpanExportResult.FAILURE
            return SpanExportResult.SUCCESS

    return Exporter
