"""The operations console (docs/console.md) and the gateway's offline API docs.

``/console`` is a static page (HTML, CSS and a script from ``console_static/``, nothing from
another origin) that logs in through the public ``POST /auth/token`` and polls
``/console/api/services``: every registered service and instance, its status in the
registry and what its own ``/health/ready`` answers. That route is admin-only and the only
thing the page needs besides the public API. ``/docs`` and ``/redoc`` show the merged API
with Swagger UI and ReDoc assets served from this process (platform/docs.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import aiohttp
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from shop.gateway.domain import Access
from shop.gateway.service import admit
from shop.platform.discovery import Instance
from shop.platform.docs import assets_mount, redoc_page, swagger_page
from shop.platform.problems import Problem, from_problem

__all__ = ["API_PATH", "CONSOLE_PATH", "console_routes", "serves"]

CONSOLE_PATH = "/console"
API_PATH = "/console/api/services"
# How long one instance's /health/ready may take before it shows as UNREACHABLE.
PROBE_TIMEOUT_S = 2.0
_PROBE_TIMEOUT = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
_JSON = {"Accept": "application/json", "Accept-Encoding": "identity"}

# The page may load and call this origin only: no CDN can sneak in, no script can leak the
# token elsewhere, and no other site may frame it.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
        " img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-cache",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
_PAGE = (files("shop.gateway") / "console_static" / "index.html").read_text(encoding="utf-8")


def serves(path: str) -> bool:
    """True for the paths this module answers: the gateway routes them to Starlette instead
    of the proxy (no public route starts with these). On the proxy's path for every request,
    so one ``startswith`` decides for all the others."""
    return path.startswith(_PREFIXES) and (path in _EXACT or path.startswith(_UNDER))


_PREFIXES = ("/console", "/docs/", "/redoc")
_EXACT = frozenset({CONSOLE_PATH, "/redoc"})
_UNDER = ("/console/", "/docs/")


@dataclass(frozen=True, slots=True)
class InstanceView:
    """One instance as the console shows it."""

    service: str
    instance_id: str
    url: str
    registry: str  # its status in the registry: UP, DOWN, STARTING, OUT_OF_SERVICE...
    health: str  # what its /health/ready says: UP, DOWN... or UNREACHABLE

    def as_json(self) -> dict[str, str]:
        return {
            "id": self.instance_id,
            "url": self.url,
            "registry": self.registry,
            "health": self.health,
        }


def _registered(body: Any) -> list[Instance]:
    """Every instance in a ``GET /eureka/apps`` answer (Eureka's JSON writes a list of one
    as the item alone, so both shapes are read)."""
    applications = body.get("applications", {}) if isinstance(body, dict) else {}
    apps = applications.get("application", []) if isinstance(applications, dict) else []
    found: list[Instance] = []
    for app in apps if isinstance(apps, list) else [apps]:
        raw = app.get("instance", []) if isinstance(app, dict) else []
        found += [Instance.from_eureka(item) for item in (raw if isinstance(raw, list) else [raw])]
    return found


async def _probe(http: aiohttp.ClientSession, instance: Instance) -> str:
    """The instance's own word on its health: ``GET /health``'s ``status`` (UP or DEGRADED,
    docs/observability.md), or ``/health/ready``'s where a process has no ``/health``; UP
    for a 200 without a status word, DOWN for any other answer."""
    try:
        status = await _health(http, f"{instance.base_url}/health")
        if status is None:
            status = await _health(http, f"{instance.base_url}/health/ready")
        return status or "DOWN"
    except (aiohttp.ClientError, TimeoutError):
        return "UNREACHABLE"


async def _health(http: aiohttp.ClientSession, url: str) -> str | None:
    """The status one health route gives; None if the process has no such route (404)."""
    async with http.get(url, headers=_JSON, timeout=_PROBE_TIMEOUT) as resp:
        if resp.status == 404:
            return None
        try:
            body = await resp.json(content_type=None)
        except ValueError:
            body = None
        status = body.get("status") if isinstance(body, dict) else None
        if isinstance(status, str) and status.replace("_", "").isalpha() and len(status) <= 32:
            return status.upper() if resp.status == 200 else "DOWN"
        return "UP" if resp.status == 200 else "DOWN"


async def overview(http: aiohttp.ClientSession, registry_url: str) -> dict[str, Any]:
    """The registry's view of every instance and each one's readiness, probed in parallel."""
    try:
        async with http.get(f"{registry_url}/apps", headers=_JSON, timeout=_PROBE_TIMEOUT) as resp:
            if resp.status != 200:
                return {"registry": "DOWN", "services": []}
            instances = _registered(await resp.json(content_type=None))
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return {"registry": "UNREACHABLE", "services": []}
    healths = await asyncio.gather(*(_probe(http, i) for i in instances))
    views = sorted(
        (
            InstanceView(i.app, i.instance_id, i.base_url, i.status, health)
            for i, health in zip(instances, healths, strict=True)
        ),
        key=lambda v: (v.service, v.instance_id),
    )
    services: dict[str, list[dict[str, str]]] = {}
    for view in views:
        services.setdefault(view.service, []).append(view.as_json())
    return {
        "registry": "UP",
        "services": [{"name": name, "instances": found} for name, found in services.items()],
    }


async def page(_request: Request) -> Response:
    return HTMLResponse(_PAGE, headers=_PAGE_HEADERS)


async def services(request: Request) -> Response:
    """Admin-only: the client's and the user's rate limits apply, as on the proxied routes."""
    runtime = request.app.state.gateway
    proxy = request.app.proxy
    try:
        peer = request.client.host if request.client else "unknown"
        await runtime.limits.check_client(proxy.client_of(peer, request.scope["headers"]))
        principal = await admit(
            Access.ADMIN,
            authorization=request.headers.get("authorization"),
            verifier=runtime.verifier,
        )
        assert principal is not None  # noqa: S101 - admit returns one for every rule but PUBLIC
        await runtime.limits.check_user(principal.user_id)
    except Problem as problem:
        return from_problem(problem, instance=request.url.path)
    found = await overview(runtime.http, runtime.registry.base_url)
    return JSONResponse(found, headers={"Cache-Control": "no-store"})


async def docs(request: Request) -> Response:
    return swagger_page(request, openapi_url="/openapi.json", title="Shop API")


async def redoc(request: Request) -> Response:
    return redoc_page(request, openapi_url="/openapi.json", title="Shop API")


def console_routes() -> list[BaseRoute]:
    """Listed before the gateway's other operations routes: this ``/docs`` (local assets)
    is the one served."""
    return [
        Route(CONSOLE_PATH, page, methods=["GET"]),
        Route(API_PATH, services, methods=["GET"]),
        Mount(
            "/console/assets",
            # Not the page itself: it is only ever served with its policy headers (page()).
            app=StaticFiles(packages=[("shop.gateway", "console_static/assets")]),
            name="console-assets",
        ),
        Route("/docs", docs, methods=["GET"]),
        Route("/redoc", redoc, methods=["GET"]),
        assets_mount(),
    ]
