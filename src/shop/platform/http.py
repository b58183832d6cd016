"""The one pooled aiohttp client of a process, opened and closed in the app's lifespan."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import aiohttp

from shop.platform import context, telemetry

__all__ = ["http_session"]


def _client_spans() -> aiohttp.TraceConfig:
    """A CLIENT span per request sent while a sampled trace is bound, named as the next hop's
    parent in the ``traceparent`` it carries (the header ``context.outgoing_headers`` set
    names the server span otherwise). Hand-written: docs/telemetry.md."""

    async def start(
        _session: aiohttp.ClientSession,
        trace: SimpleNamespace,
        params: aiohttp.TraceRequestStartParams,
    ) -> None:
        span = telemetry.client_span(params.method, params.url.host or "", str(params.url))
        if span is not None:
            trace.span = span
            params.headers["traceparent"] = telemetry.span_trace(span).traceparent

    async def end(
        _session: aiohttp.ClientSession,
        trace: SimpleNamespace,
        params: aiohttp.TraceRequestEndParams,
    ) -> None:
        span = getattr(trace, "span", None)
        if span is not None:
            span.set_attribute("http.response.status_code", params.response.status)
            telemetry.end_span(span, None if params.response.status < 500 else _Status5xx())

    async def failed(
        _session: aiohttp.ClientSession,
        trace: SimpleNamespace,
        params: aiohttp.TraceRequestExceptionParams,
    ) -> None:
        span = getattr(trace, "span", None)
        if span is not None:
            telemetry.end_span(span, params.exception)

    config = aiohttp.TraceConfig()
    config.on_request_start.append(start)
    config.on_request_end.append(end)
    config.on_request_exception.append(failed)
    return config


class _Status5xx(Exception):
    """A server error answer, as a span's error type."""


@asynccontextmanager
async def http_session(
    *,
    limit: int = 200,
    total_timeout_s: float = 10.0,
    decompress: bool = True,
    ca_file: Path | None = None,
) -> AsyncIterator[aiohttp.ClientSession]:
    """``ca_file``: the CA that signs the https peers (SHOP_TLS_CAFILE); the system's otherwise."""
    connector = aiohttp.TCPConnector(
        ssl=ssl.create_default_context(cafile=ca_file) if ca_file is not None else True,
        limit=limit,
        limit_per_host=limit,
        ttl_dns_cache=300,
        keepalive_timeout=30,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=total_timeout_s, connect=2.0),
        auto_decompress=decompress,
        raise_for_status=False,
        # Cookies are the callers' business, never shared between them.
        cookie_jar=aiohttp.DummyCookieJar(),
        trace_configs=[_client_spans()] if context.spans_exported or telemetry.enabled() else [],
    )
    try:
        yield session
    finally:
        await session.close()
