"""The gateway's HTTP surface: the proxy (plain ASGI, the hot path) and its own operations
endpoints (/health, /metrics, /docs, /openapi.json)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import unquote

import aiohttp
from fastapi.openapi.docs import get_swagger_ui_html
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as StarletteRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from shop.gateway.domain import (
    Match,
    MethodNotAllowed,
    RouteTable,
    canonical_path,
    upstream_headers,
)
from shop.gateway.ratelimit import RateLimits
from shop.gateway.service import ApiCatalogue, Upstreams, admit, forward
from shop.gateway.settings import GatewaySettings
from shop.platform.context import outgoing_headers
from shop.platform.discovery import Heartbeat, RegistryClient
from shop.platform.middleware import HttpMetrics
from shop.platform.problems import Problem, problem_response, send_problem
from shop.platform.settings import PlatformSettings
from shop.platform.tokens import JwksVerifier

__all__ = ["OPS_PATHS", "GatewayRuntime", "ProxyMiddleware", "ReadinessCheck", "ops_routes"]

OPS_PATHS = frozenset({"/health/live", "/health/ready", "/metrics", "/docs", "/openapi.json"})
ReadinessCheck = Callable[[], Awaitable[None]]


@dataclass(slots=True)
class GatewayRuntime:
    """What the gateway opens in its lifespan; the proxy finds it on ``app.state.gateway``."""

    platform: PlatformSettings
    settings: GatewaySettings
    http: aiohttp.ClientSession
    registry: RegistryClient
    upstreams: Upstreams
    verifier: JwksVerifier
    catalogue: ApiCatalogue
    limits: RateLimits
    heartbeat: Heartbeat | None = None
    readiness: dict[str, ReadinessCheck] = field(default_factory=dict)


class ProxyMiddleware:
    """Everything but the operations paths is proxied, without a router or a framework in the way.

    Order of refusals: a non-canonical or /internal path is 404 before anything else, then
    an unrouted path 404, a routed path with another method 405, then the route's rule
    (401/403), and only then is a service looked up.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: RouteTable,
        trusted_proxies: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.routes = routes
        self.trusted_proxies = trusted_proxies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPS_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            await self._proxy(scope, receive, send)
        except Problem as problem:
            await send_problem(
                send,
                problem.status,
                instance=scope["path"],
                detail=problem.detail,
                headers=problem.headers,
            )

    def _client(self, scope: Scope) -> str:
        """The peer, or behind a trusted load balancer the address it appended last."""
        client = scope.get("client")
        peer: str = client[0] if client else "unknown"
        if peer not in self.trusted_proxies:
            return peer
        forwarded = [v for n, v in scope["headers"] if n == b"x-forwarded-for"]
        if not forwarded:
            return peer
        # The balancer appends its hop last; anything before it a client may have written.
        last = forwarded[-1].decode("latin-1").rsplit(",", 1)[-1].strip()
        return last[:64] or peer

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime: GatewayRuntime = scope["app"].state.gateway
        # First, before any other work: a flood of refused paths or bad tokens counts too.
        await runtime.limits.check_client(self._client(scope))
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        # Some servers leave the query on raw_path; it is not part of what routes match.
        raw_path = raw_path.split(b"?", 1)[0]
        if not canonical_path(raw_path):
            raise Problem(404, "No such resource.")
        # What is matched is exactly what is forwarded, whatever the server decoded.
        path = unquote(raw_path.decode("ascii"))
        method: str = scope["method"]
        outcome = self.routes.match(method, path)
        if isinstance(outcome, MethodNotAllowed):
            scope["route"] = outcome.route
            raise Problem(
                405,
                f"{method} is not allowed here.",
                headers={"Allow": outcome.route.allow},
            )
        if not isinstance(outcome, Match):
            raise Problem(404, "No such resource.")
        route = outcome.route
        scope["route"] = route  # the metrics label: the route, never the raw path
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        principal = await admit(
            outcome.access, authorization=authorization, verifier=runtime.verifier
        )
        if principal is not None:
            # Only where a token is verified anyway: public routes are limited per client.
            await runtime.limits.check_user(principal.user_id)
        body = await _read_body(receive)
        if body is None:
            return  # the caller left, or the body limit cut it off (and answers 413)
        client = scope.get("client")
        headers = upstream_headers(
            scope["headers"],
            client_ip=client[0] if client else None,
            scheme=scope.get("scheme", "http"),
            identity=outgoing_headers(),
            trusted_proxies=self.trusted_proxies,
        )
        target = raw_path.decode("ascii")
        query: bytes = scope.get("query_string", b"")
        if query:
            target += "?" + query.decode("latin-1")
        await forward(
            upstreams=runtime.upstreams,
            service=route.service,
            session=runtime.http,
            method=method,
            target=target,
            headers=headers,
            body=body,
            timeout_s=runtime.settings.upstream_timeout_s,
            retry_after_s=runtime.platform.registry_cache_ttl_s,
            send=send,
        )


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body; the body limit keeps it small, and a buffered body can be
    sent again to another instance when the first refused the connection."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _runtime(request: Request) -> GatewayRuntime:
    runtime: GatewayRuntime = request.app.state.gateway
    return runtime


async def live(_request: Request) -> Response:
    return JSONResponse({"status": "UP"})


async def ready(request: Request) -> Response:
    runtime = _runtime(request)
    names = list(runtime.readiness)
    outcomes = await asyncio.gather(
        *(asyncio.wait_for(runtime.readiness[n](), 2.0) for n in names),
        return_exceptions=True,
    )
    checks = {
        n: "DOWN" if isinstance(o, BaseException) else "UP"
        for n, o in zip(names, outcomes, strict=True)
    }
    public = runtime.settings.public_operations
    if all(v == "UP" for v in checks.values()):
        return JSONResponse({"status": "UP", "checks": checks} if public else {"status": "UP"})
    if not public:
        # Which dependency is down is a map of the inside: the status is all the edge says.
        return problem_response(503, instance=request.url.path, detail="Not ready")
    down = ", ".join(n for n, v in checks.items() if v == "DOWN")
    return problem_response(
        503, instance=request.url.path, detail=f"Not ready: {down}", extra={"checks": checks}
    )


async def metrics(request: Request) -> Response:
    if not _runtime(request).settings.public_operations:
        return problem_response(404, instance=request.url.path, detail="No such resource.")
    instruments: HttpMetrics = request.app.state.metrics
    return Response(generate_latest(instruments.registry), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    return JSONResponse(await _runtime(request).catalogue.document())


async def docs(_request: Request) -> Response:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="Shop API")


def ops_routes() -> list[StarletteRoute]:
    return [
        StarletteRoute("/health/live", live, methods=["GET"]),
        StarletteRoute("/health/ready", ready, methods=["GET"]),
        StarletteRoute("/metrics", metrics, methods=["GET"]),
        StarletteRoute("/openapi.json", openapi, methods=["GET"]),
        StarletteRoute("/docs", docs, methods=["GET"]),
    ]
