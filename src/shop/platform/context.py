"""Request and trace identity for the current task: ``X-Request-ID`` and W3C ``traceparent``."""

from __future__ import annotations

import re
import secrets
import uuid
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = [
    "TraceContext",
    "current_request_id",
    "current_trace",
    "new_request_id",
    "outgoing_headers",
    "parse_traceparent",
    "bind",
    "next_hop",
]

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@dataclass(frozen=True, slots=True)
class TraceContext:
    trace_id: str
    span_id: str
    flags: str = "01"

    @classmethod
    def new(cls) -> TraceContext:
        return cls(trace_id=secrets.token_hex(16), span_id=secrets.token_hex(8))

    def child(self) -> TraceContext:
        return TraceContext(trace_id=self.trace_id, span_id=secrets.token_hex(8), flags=self.flags)

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"


# Set by shop.platform.telemetry while spans are exported: the bound trace is then a real
# span's, and the next hop is its child. Off, each hop gets a fresh span id of its own.
spans_exported = False

_request_id: ContextVar[str | None] = ContextVar("shop_request_id", default=None)
_trace: ContextVar[TraceContext | None] = ContextVar("shop_trace", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept_request_id(value: str | None) -> str:
    """Keep a caller's request id if it is sane, otherwise make a new one."""
    if value and _REQUEST_ID_RE.match(value):
        return value
    return new_request_id()


def parse_traceparent(value: str | None) -> TraceContext | None:
    if not value:
        return None
    match = _TRACEPARENT_RE.match(value.strip().lower())
    if not match or match.group(1) == "0" * 32 or match.group(2) == "0" * 16:
        return None
    return TraceContext(trace_id=match.group(1), span_id=match.group(2), flags=match.group(3))


def bind(*, request_id: str, trace: TraceContext) -> None:
    _request_id.set(request_id)
    _trace.set(trace)


def current_request_id() -> str | None:
    return _request_id.get()


def current_trace() -> TraceContext | None:
    return _trace.get()


def outgoing_headers() -> dict[str, str]:
    """Headers that carry this request's identity to the next hop."""
    headers: dict[str, str] = {}
    request_id = _request_id.get()
    if request_id:
        headers["X-Request-ID"] = request_id
    trace = _trace.get()
    if trace:
        headers["traceparent"] = next_hop(trace)
    return headers


def next_hop(trace: TraceContext) -> str:
    """The ``traceparent`` a call or an event caused by ``trace`` carries."""
    return trace.traceparent if spans_exported else trace.child().traceparent
