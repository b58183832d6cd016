"""The FastAPI app factory every service is built with.

It gives each service the same outside: ``/health/live``, ``/health/ready``, ``/metrics``,
``/docs``, an ``X-Request-ID`` on every answer, problem+json for every error, a body
limit, one pooled HTTP client and its registration with the discovery server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any

import aiohttp
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shop.platform import telemetry
from shop.platform.buses import open_event_bus
from shop.platform.db import create_engine, migrate, ping
from shop.platform.discovery import Heartbeat, Registration, RegistryClient
from shop.platform.docs import install_offline_docs
from shop.platform.events import EventBus, RetryPolicy
from shop.platform.fastpath import LeanHandler, LeanRoutes
from shop.platform.http import http_session
from shop.platform.middleware import (
    BodyLimitMiddleware,
    HttpMetrics,
    MetricsMiddleware,
    RequestContextMiddleware,
)
from shop.platform.problems import (
    PROBLEM_JSON,
    PROBLEM_SCHEMA,
    Problem,
    from_problem,
    problem_response,
    validation_errors,
)
from shop.platform.security import ServiceTokens, pinned_jwks
from shop.platform.settings import PlatformSettings
from shop.platform.tokens import JwksVerifier
from shop.platform.worker import expose_jobs

__all__ = [
    "HeadAsGetMiddleware",
    "Runtime",
    "RuntimeDep",
    "ServiceLifespan",
    "add_lean_route",
    "create_app",
    "get_runtime",
    "service_database",
    "service_events",
]

log = logging.getLogger("shop.platform")

ReadinessCheck = Callable[[], Awaitable[None]]
_FASTAPI_UNPARSEABLE_BODY = "There was an error parsing the body"


@dataclass(slots=True)
class Runtime:
    """What the platform opens for a service during its lifespan."""

    name: str
    platform: PlatformSettings
    http: aiohttp.ClientSession
    registry: RegistryClient
    tokens: JwksVerifier
    service_tokens: ServiceTokens
    readiness: dict[str, ReadinessCheck] = field(default_factory=dict)
    heartbeat: Heartbeat | None = None
    # This instance's base URL as callers find it in the registry; internal routes accept
    # only service tokens issued for it (platform/security.py). None until it is served.
    origin: str | None = None


ServiceLifespan = Callable[[FastAPI, Runtime], AbstractAsyncContextManager[None]]


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


@asynccontextmanager
async def _no_service_lifespan(_app: FastAPI, _runtime: Runtime) -> AsyncIterator[None]:
    yield


def _install_problem_handlers(app: FastAPI) -> None:
    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Problem)  # noqa: S101 - registered for Problem only
        return from_problem(exc, instance=request.url.path)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)  # noqa: S101
        detail = exc.detail if isinstance(exc.detail, str) else None
        if exc.status_code == 400 and detail == _FASTAPI_UNPARSEABLE_BODY:
            # FastAPI's own answer to a body json.loads gave up on (e.g. nested too deep):
            # the same 422 as any other body that is not valid JSON.
            return problem_response(
                422,
                instance=request.url.path,
                detail="The request is not valid; see errors.",
                errors={"body": "is not valid JSON"},
            )
        return problem_response(
            exc.status_code, instance=request.url.path, detail=detail, headers=exc.headers
        )

    async def on_invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)  # noqa: S101
        return problem_response(
            422,
            instance=request.url.path,
            detail="The request is not valid; see errors.",
            errors=validation_errors(exc.errors()),
        )

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_invalid)


def _ops_router(metrics: HttpMetrics) -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/health/live")
    async def live() -> dict[str, str]:
        return {"status": "UP"}

    @router.get("/health/ready", response_model=None)
    async def ready(runtime: RuntimeDep, request: Request) -> Response:
        names = list(runtime.readiness)
        outcomes = await asyncio.gather(
            *(asyncio.wait_for(runtime.readiness[n](), 2.0) for n in names),
            return_exceptions=True,
        )
        checks = {
            n: "UP" if not isinstance(o, BaseException) else "DOWN"
            for n, o in zip(names, outcomes, strict=True)
        }
        if all(v == "UP" for v in checks.values()):
            return JSONResponse({"status": "UP", "checks": checks})
        down = ", ".join(n for n, v in checks.items() if v == "DOWN")
        return problem_response(
            503,
            instance=request.url.path,
            detail=f"Not ready: {down}",
            extra={"checks": checks},
        )

    @router.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "patch", "head", "options", "trace"})
_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


def _with_problem_answers(document: dict[str, Any]) -> dict[str, Any]:
    """Every documented error answer as what the service sends: problem+json (SPEC §6),
    FastAPI's own 422 (``HTTPValidationError``, application/json) included."""
    for operations in document.get("paths", {}).values():
        for method, operation in operations.items():
            if method not in _HTTP_METHODS:
                continue
            for status, answer in operation.get("responses", {}).items():
                if status.isdigit() and int(status) >= 400:
                    answer["content"] = {PROBLEM_JSON: {"schema": dict(_PROBLEM_REF)}}
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = PROBLEM_SCHEMA
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return document


def _document_problems(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _with_problem_answers(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented extension point


class HeadAsGetMiddleware:
    """``HEAD`` where ``GET`` is (RFC 9110 §9.3.2): the GET's status and headers, no body.

    FastAPI's routes answer 405 to a HEAD; running the GET keeps one handler per resource
    and ``Content-Length`` true. Where GET is not allowed, neither is HEAD (the same 405).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


def create_app(
    *,
    name: str,
    title: str,
    platform: PlatformSettings,
    routers: Sequence[APIRouter] = (),
    lifespan: ServiceLifespan = _no_service_lifespan,
    register: bool = True,
    description: str = "",
) -> FastAPI:
    """Build a service. ``name`` is its registered name (``auth-service``...).

    The process that serves it sets ``app.state.bound_port`` before start-up; with it
    the app registers that port with the discovery server (``register=True``).
    """
    metrics = HttpMetrics(name)
    tracing = telemetry.tracer_provider(name)  # None unless OTEL_TRACES_EXPORTER names one

    @asynccontextmanager
    async def platform_lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with http_session(ca_file=platform.tls_cafile) as http:
            registry = RegistryClient(
                base_url=platform.registry_url,
                session=http,
                cache_ttl_s=platform.registry_cache_ttl_s,
                pass_over_s=platform.pass_over_s,
            )
            tokens = JwksVerifier(
                fetch_jwks=pinned_jwks(platform, http),
                issuer=platform.auth_issuer,
                audience=platform.auth_audience,
                internal_audience=platform.internal_audience,
            )
            service_tokens = ServiceTokens(
                name=name, secret=platform.service_secret, auth_url=platform.auth_url, session=http
            )
            runtime = Runtime(
                name=name,
                platform=platform,
                http=http,
                registry=registry,
                tokens=tokens,
                service_tokens=service_tokens,
            )
            app.state.runtime = runtime
            async with lifespan(app, runtime):
                port: int | None = getattr(app.state, "bound_port", None)
                if port:
                    registration = Registration(
                        app=name,
                        host=platform.advertise_host,
                        port=port,
                        secure=platform.serves_tls,
                        lease_duration_s=platform.lease_duration_s,
                        renewal_interval_s=platform.heartbeat_interval_s,
                    )
                    runtime.origin = registration.base_url
                if register and port:
                    heartbeat = Heartbeat(registry, registration)
                    runtime.heartbeat = heartbeat
                    runtime.readiness["registry"] = heartbeat.check_registered
                    heartbeat.start()
                try:
                    yield
                finally:
                    if runtime.heartbeat is not None:
                        await runtime.heartbeat.stop()
                    await registry.close()
                    if tracing is not None:  # bounded: a collector that is down must not
                        tracing.force_flush(timeout_millis=2000)  # hold the shutdown

    app = FastAPI(
        title=title,
        description=description,
        lifespan=platform_lifespan,
        # No OpenTelemetry here (metrics are Prometheus, traces are traceparent in the logs):
        # off, FastAPI stops asking the global OTel providers on every request (three
        # environment look-ups each, about 10 µs a request).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.metrics = metrics
    # shop_background_failures_total{job}, shop_retention_purged_rows_total{job}
    expose_jobs(metrics.registry)
    _install_problem_handlers(app)
    app.include_router(_ops_router(metrics))
    for router in routers:
        app.include_router(router)
    # /docs and /redoc from this process's own files: no CDN, so they work offline.
    install_offline_docs(app)
    _document_problems(app)
    # Added last = outermost: request identity wraps everything, even the 413 and metrics.
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(BodyLimitMiddleware, max_bytes=platform.max_body_bytes)
    app.add_middleware(RequestContextMiddleware)
    # Outermost: the few hot routes a service hands it skip the stack above (fastpath.py).
    lean: dict[tuple[str, str], LeanHandler] = {}
    app.state.lean_routes = lean
    app.add_middleware(LeanRoutes, routes=lean, metrics=metrics, max_bytes=platform.max_body_bytes)
    if tracing is not None:
        # Outside even the lean routes: a server span for every request (the maintained ASGI
        # instrumentation), whose ids the layers inside bind as the request's trace.
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        app.add_middleware(
            OpenTelemetryMiddleware,
            tracer_provider=tracing,
            excluded_urls="/health/,/metrics",
            exclude_spans=["receive", "send"],
        )
    return app


def add_lean_route(app: FastAPI, method: str, path: str, handler: LeanHandler) -> None:
    """Answer ``method path`` with ``handler`` (platform/fastpath.py) instead of the
    FastAPI route of the same method and path, which stays declared for the docs and must
    answer the same."""
    probe: Scope = {"type": "http", "method": method, "path": path, "root_path": ""}
    declared = any(route.matches(probe)[0] is Match.FULL for route in app.router.routes)
    if not declared:
        raise ValueError(f"{method} {path} is not a route of this app")
    routes: dict[tuple[str, str], LeanHandler] = app.state.lean_routes
    routes[(method, path)] = handler


@asynccontextmanager
async def service_database(
    runtime: Runtime, *, url: str, package: str
) -> AsyncIterator[AsyncEngine]:
    """A service's own database: engine opened, ``<package>/migrations`` applied, readiness
    checked; disposed on the way out."""
    engine = create_engine(url)
    telemetry.trace_engine(engine)  # a span per statement while spans are exported
    try:
        await migrate(engine, package=package, service=package.rsplit(".", 1)[-1])
        runtime.readiness["database"] = partial(ping, engine)
        yield engine
    finally:
        await engine.dispose()


@asynccontextmanager
async def service_events(runtime: Runtime) -> AsyncIterator[EventBus]:
    """The event bus the settings name, with its readiness check."""
    url = runtime.platform.resolved_event_bus_url
    settings = runtime.platform
    retry = RetryPolicy(
        max_attempts=settings.event_max_attempts,
        backoff_s=settings.event_retry_backoff_s,
        backoff_max_s=settings.event_retry_backoff_max_s,
        handler_timeout_s=settings.event_handler_timeout_s,
    )
    async with open_event_bus(
        url, client_id=runtime.name, retry=retry, settings=runtime.platform
    ) as bus:
        runtime.readiness["events"] = bus.ping
        try:
            await bus.ping()  # connect now, not in the middle of the first publish
        except Exception as exc:  # readiness reports it; publishers and consumers retry
            log.warning("the event bus is not reachable yet: %r", exc)
        yield bus
