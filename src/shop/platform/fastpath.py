"""A lean path for a service's hottest routes (issue 8): the same answers, fewer layers.

Every request otherwise crosses five ASGI wrappers (request context, body limit, metrics,
HEAD-as-GET, Starlette's exception middleware), FastAPI's router, its dependency solver and a
``Response`` object: profiling put that at a large share of the order and inventory
processes' CPU, besides the work itself. :class:`LeanRoutes` sits in front of that stack
and answers a few exact ``(method, path)`` pairs itself, doing in one layer what the
wrappers do (request id and trace bound, ``X-Request-ID`` on the answer, the body limit,
metrics and the access line by route template, a problem+json 500 for a crash) and what
FastAPI does for a JSON body (strict content type, ``json.loads``, the pydantic model);
every error goes through the app's own exception handlers, so refusals read exactly as
FastAPI's. The routes stay declared on the FastAPI app for ``/openapi.json``; anything
else (other methods, a trailing slash) falls through to the full stack unchanged.
"""

from __future__ import annotations

import email.message
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shop.platform import context, logs, telemetry
from shop.platform.middleware import HttpMetrics
from shop.platform.problems import send_problem

__all__ = ["LeanHandler", "LeanRequest", "LeanRoutes", "Reply", "json_reply"]

log = logging.getLogger("shop.http")

Model = TypeVar("Model", bound=BaseModel)
_NO_BODY: Any = object()  # an empty body, told apart from a JSON ``null``
_UNPARSEABLE = "There was an error parsing the body"  # FastAPI's words, its handler maps them
# JSONResponse's settings, built once: ``json.dumps`` with any argument builds an encoder per
# call (a third of the call for a small answer).
_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole answer: status, raw headers (lower-case names), body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def json_reply(content: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Reply:
    """What Starlette's ``JSONResponse`` sends for ``content``, byte for byte."""
    body = _JSON.encode(content).encode("utf-8")
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    raw.append((b"content-length", str(len(body)).encode("latin-1")))
    raw.append((b"content-type", b"application/json"))
    return Reply(status, raw, body)


class LeanRequest:
    """What a lean handler gets: the app, the path, the headers, the body as FastAPI would
    validate it (parsed JSON, or the raw bytes of a body that is not JSON), and the raw
    query string (a GET's parameters)."""

    __slots__ = ("_headers", "app", "body", "path", "query")

    def __init__(
        self, app: Any, path: str, headers: dict[bytes, bytes], body: Any, query: bytes = b""
    ) -> None:
        self.app = app
        self.path = path
        self.body = body
        self.query = query
        self._headers = headers

    def header(self, name: bytes) -> str | None:
        """The first value of a header (``name`` in lower case), as Starlette's ``Headers``."""
        value = self._headers.get(name)
        return None if value is None else value.decode("latin-1")

    def valid(self, model: type[Model]) -> Model:
        """The body as ``model``, or the same 422 FastAPI's body validation gives (which
        reads objects' attributes too, hence its words for a body that is not an object)."""
        if self.body is _NO_BODY:
            missing = {"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}
            raise RequestValidationError([missing])
        try:
            return model.model_validate(self.body, from_attributes=True)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            raise RequestValidationError(
                [{**error, "loc": ("body", *error["loc"])} for error in errors]
            ) from None


LeanHandler = Callable[[LeanRequest], Awaitable[Reply]]


def _is_json(content_type: bytes | None) -> bool:
    """FastAPI's test: ``application/json`` or ``application/*+json``; no type is not JSON."""
    if content_type is None:
        return False
    if content_type == b"application/json":
        return True
    message = email.message.Message()
    message["content-type"] = content_type.decode("latin-1")
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


def _parsed(raw: bytes, content_type: bytes | None) -> Any:
    """The body FastAPI hands to validation; a JSON syntax error raises what FastAPI raises."""
    if not raw:
        return _NO_BODY
    if not _is_json(content_type):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", exc.pos),
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": exc.msg},
                }
            ]
        ) from None
    except Exception:  # nested too deep, not UTF-8...: FastAPI's 400, mapped by the app
        raise StarletteHTTPException(400, _UNPARSEABLE) from None


class _TooLarge(Exception):
    pass


class _Gone(Exception):
    pass


class LeanRoutes:
    """ASGI middleware: answers the ``routes`` it is given itself, passes the rest on.

    ``routes`` maps ``(method, exact path)`` to a handler; it may be filled after the app
    is built (the services add theirs after ``create_app``). The path doubles as the route
    template for metrics, so only fixed paths qualify.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Mapping[tuple[str, str], LeanHandler],
        metrics: HttpMetrics,
        max_bytes: int,
    ) -> None:
        self.app = app
        self.routes = routes
        self.metrics = metrics
        self.max_bytes = max_bytes
        # (method, path, status) -> (counter, histogram) children: labels() is a locked lookup.
        self._instruments: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.routes:
            handler = self.routes.get((scope["method"], scope["path"]))
            if handler is not None:
                await self._serve(handler, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _serve(
        self, handler: LeanHandler, scope: Scope, receive: Receive, send: Send
    ) -> None:
        began = time.perf_counter()
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value)
        raw_id = headers.get(b"x-request-id")
        raw_trace = headers.get(b"traceparent")
        request_id = context.accept_request_id(raw_id.decode("latin-1") if raw_id else None)
        if context.spans_exported:  # the ASGI instrumentation's server span is current
            trace = telemetry.current_trace()
        else:
            trace = (
                context.parse_traceparent(raw_trace.decode("latin-1")) if raw_trace else None
            ) or context.TraceContext.new()
        context.bind(request_id=request_id, trace=trace)
        scope.setdefault("state", {})["request_id"] = request_id
        stamp = (b"x-request-id", request_id.encode("latin-1"))
        status = 500
        started = False

        async def stamped(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = [
                    *(h for h in message.get("headers", ()) if h[0] != b"x-request-id"),
                    stamp,
                ]
            await send(message)

        path: str = scope["path"]
        try:
            try:
                body = await self._body(headers.get(b"content-length"), receive)
            except _Gone:
                status = 0  # the client left mid-body: nobody to answer, nothing to count
                return
            except _TooLarge:
                await send_problem(
                    stamped,
                    413,
                    instance=path,
                    detail=f"The request body is larger than {self.max_bytes} bytes.",
                    headers={"Connection": "close"},
                )
                return
            except ValueError:
                await send_problem(stamped, 400, instance=path, detail="Bad Content-Length")
                return
            app = scope["app"]
            try:
                reply = await handler(
                    LeanRequest(
                        app,
                        path,
                        headers,
                        _parsed(body, headers.get(b"content-type")),
                        scope.get("query_string", b""),
                    )
                )
            except Exception as exc:
                answer = _handler_for(app, exc)
                if answer is None:
                    raise
                response = await answer(Request(scope, receive), exc)
                await response(scope, receive, stamped)
                return
            await stamped(
                {"type": "http.response.start", "status": reply.status, "headers": reply.headers}
            )
            await send({"type": "http.response.body", "body": reply.body})
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], path)
            if not started:
                await send_problem(
                    stamped,
                    500,
                    instance=path,
                    detail="An unexpected error occurred. Quote the requestId when reporting it.",
                )
        finally:
            if status:
                self._observe(
                    scope["method"], path, status, time.perf_counter() - began, request_id, trace
                )

    async def _body(self, declared: bytes | None, receive: Receive) -> bytes:
        """The whole body: ValueError for a Content-Length that is not a number, _TooLarge
        over the limit (declared or streamed), _Gone if the client disconnected."""
        if declared is not None and int(declared) > self.max_bytes:
            raise _TooLarge
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise _Gone
            chunk: bytes = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _observe(
        self,
        method: str,
        path: str,
        status: int,
        elapsed_s: float,
        request_id: str,
        trace: context.TraceContext,
    ) -> None:
        """Metrics and the access line (the path is the route's template: fixed paths only)."""
        key = (method, path, status)
        instruments = self._instruments.get(key)
        if instruments is None:
            m = self.metrics
            instruments = self._instruments[key] = (
                m.requests.labels(m.service, method, path, str(status)),
                m.latency.labels(m.service, method, path),
            )
        instruments[0].inc()
        instruments[1].observe(elapsed_s)
        logs.access(self.metrics.service, method, path, status, elapsed_s, request_id, trace)


def _handler_for(app: Any, exc: Exception) -> Any:
    """The app's exception handler for ``exc`` (by its class's MRO), as Starlette picks it."""
    handlers: Mapping[Any, Any] = app.exception_handlers
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None
