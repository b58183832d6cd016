"""Pure ASGI middleware shared by every service and the gateway."""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shop.platform import context, logs, telemetry
from shop.platform.problems import send_problem

__all__ = [
    "BodyLimitMiddleware",
    "BodyTimeoutMiddleware",
    "LATENCY_BUCKETS",
    "HttpMetrics",
    "MetricsMiddleware",
    "RequestContextMiddleware",
]

log = logging.getLogger("shop.http")


class RequestContextMiddleware:
    """Binds request id and trace, stamps ``X-Request-ID`` on every answer, turns crashes into 500s.

    It sits outside everything else, so even an unhandled error answers problem+json
    with the request id, and never a stack trace.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = context.accept_request_id(headers.get("x-request-id"))
        if context.spans_exported:  # the ASGI instrumentation's server span is current
            trace = telemetry.current_trace()
        else:
            trace = (
                context.parse_traceparent(headers.get("traceparent")) or context.TraceContext.new()
            )
        context.bind(request_id=request_id, trace=trace)
        scope.setdefault("state", {})
        scope["state"]["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await send_problem(
                    send_with_id,
                    500,
                    instance=scope.get("path", ""),
                    detail="An unexpected error occurred. Quote the requestId when reporting it.",
                )


class BodyLimitMiddleware:
    """413 for a request body over the limit, whether declared or streamed."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                await send_problem(send, 400, instance=scope["path"], detail="Bad Content-Length")
                return
            if too_big:
                await self._refuse(scope, send)
                return
        seen = 0
        too_large = False
        started = False

        async def counted_receive() -> Message:
            nonlocal seen, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # Look like a vanished client to the app: frameworks catch any exception
                    # raised while reading the body and would turn it into their own 400.
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if too_large:
                return  # the app's answer to a truncated body is replaced by the 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except Exception:
            if not too_large:
                raise
        if too_large and not started:
            await self._refuse(scope, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        await send_problem(
            send,
            413,
            instance=scope["path"],
            detail=f"The request body is larger than {self.max_bytes} bytes.",
            headers={"Connection": "close"},
        )


class BodyTimeoutMiddleware:
    """408 (and the connection closed) when the whole request body has not arrived within
    ``timeout_s`` of the request's start: a body trickled a byte at a time holds a
    connection and a task for as long as the client likes otherwise."""

    def __init__(self, app: ASGIApp, *, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        timed_out = False
        complete = False
        started = False

        async def timed_receive() -> Message:
            nonlocal timed_out, complete
            if timed_out:
                return {"type": "http.disconnect"}
            if complete:
                return await receive()  # waiting for a disconnect is not a slow body
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
                complete = not message.get("more_body", False)
                return message
            except TimeoutError:
                # Like the body limit: a vanished client to the app, a 408 to the caller.
                timed_out = True
                return {"type": "http.disconnect"}

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if timed_out and not started:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, timed_receive, tracked_send)
        if timed_out and not started:
            await send_problem(
                send,
                408,
                instance=scope["path"],
                detail=f"The request did not arrive within {self.timeout_s:g} s.",
                headers={"Connection": "close"},
            )


# The upper bounds of ``shop_http_request_duration_seconds``' buckets (+Inf added by the
# histogram); the gateway's proxy counts into the same buckets (gateway/api.py).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class HttpMetrics:
    """Prometheus instruments of one app, in its own registry (several apps may share a process)."""

    def __init__(self, service: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "shop_http_requests",
            "HTTP requests answered",
            ["service", "method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "shop_http_request_duration_seconds",
            "Time to answer an HTTP request",
            ["service", "method", "route"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.service = service


class MetricsMiddleware:
    """Counts, times and access-logs requests by route template (never the raw path: bounded
    cardinality, and no user data in the log). Inside ``RequestContextMiddleware``, so the
    request's ids are bound."""

    def __init__(self, app: ASGIApp, *, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        began = time.perf_counter()

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            elapsed = time.perf_counter() - began
            service = self.metrics.service
            self.metrics.requests.labels(service, method, template, str(status)).inc()
            self.metrics.latency.labels(service, method, template).observe(elapsed)
            logs.access(
                service,
                method,
                template,
                status,
                elapsed,
                context.current_request_id() or "-",
                context.current_trace(),
            )
