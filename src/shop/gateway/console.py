"""The operations console (docs/console.md) and the gateway's offline API docs.

``/console`` is a static page (HTML, CSS and a script from ``console_static/``, nothing from
another origin) that logs in through the public ``POST /auth/token`` and polls
``/console/api/services``: every registered service and instance, its status in the
registry, what its own ``/health`` answers (with the reasons when DEGRADED) and the vitals
read from its private ``/metrics`` (breaker state, outbox backlog, consumer lag, orders per
second) and the latest orders of every order instance, each with a link to its trace when a
trace UI is configured (``GATEWAY_TRACE_URL_TEMPLATE``). That route is admin-only and the
only thing the page needs besides the public API: ``/metrics`` and the orders are read here,
server-side, and never reach the browser unfiltered. ``/docs`` and ``/redoc`` show the
merged API with Swagger UI and ReDoc assets served from this process (platform/docs.py).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from shop.gateway.domain import Access
from shop.gateway.service import admit
from shop.platform.discovery import Instance
from shop.platform.docs import assets_mount, redoc_page, swagger_page
from shop.platform.problems import Problem, from_problem

__all__ = [
    "API_PATH",
    "CONSOLE_PATH",
    "RECENT_ORDERS_SHOWN",
    "OrderRates",
    "console_routes",
    "recent_orders",
    "serves",
]

CONSOLE_PATH = "/console"
API_PATH = "/console/api/services"
# How long one instance's /health (or /metrics) may take before it shows as UNREACHABLE.
PROBE_TIMEOUT_S = 2.0
_PROBE_TIMEOUT = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
_JSON = {"Accept": "application/json", "Accept-Encoding": "identity"}
_TEXT = {"Accept": "text/plain", "Accept-Encoding": "identity"}
# Each order instance's last placed/cancelled orders, on its own port (order/recent.py; the
# gateway may not import the order service, hence the path written twice).
ORDER_SERVICE = "order-service"
RECENT_ORDERS_PATH = "/operations/recent-orders"
RECENT_ORDERS_SHOWN = 20
_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
_WORD = re.compile(r"^[A-Z_]{1,20}$")

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
class Probe:
    """An instance's own word on its health and, when DEGRADED, why (check name -> reason)."""

    status: str  # UP, DEGRADED, DOWN... or UNREACHABLE
    reasons: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Vitals:
    """What the console shows from an instance's ``/metrics`` (docs/observability.md): None
    or empty where the instance does not export that metric (a service without a breaker,
    an outbox or a consumer, or a process with no ``/metrics`` on its port: the gateway)."""

    breaker: dict[str, str] = field(default_factory=dict)  # peer -> closed/open/half-open
    outbox_backlog: float | None = None
    outbox_oldest_age_s: float | None = None
    consumer_lag: dict[str, float] = field(default_factory=dict)  # "group:topic" -> events
    orders_placed: float | None = None  # the counter; the page gets a rate (OrderRates)


# The families the console shows; a line of any other (RED per route, process...) is dropped
# before parsing: the parser costs ~40 µs a line, and these are a tenth of the text.
_SHOWN = (
    "shop_breaker_state",
    "shop_event_consumer_lag",
    "shop_orders_placed",
    "shop_outbox_backlog",
    "shop_outbox_oldest_age_seconds",
)
_KEPT = _SHOWN + tuple(f"# {kind} {name}" for kind in ("HELP", "TYPE") for name in _SHOWN)


def parse_vitals(text: str) -> Vitals:
    """Read the console's few metrics from Prometheus text with prometheus_client's own
    parser, given only the lines of the families shown."""
    vitals = Vitals()
    kept = "\n".join(line for line in text.splitlines() if line.startswith(_KEPT))
    for family in text_string_to_metric_families(kept):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "shop_breaker_state" and sample.value == 1.0:
                vitals.breaker[labels.get("peer", "?")] = labels.get("state", "?")
            elif sample.name == "shop_event_consumer_lag":
                key = f"{labels.get('group', '?')}:{labels.get('topic', '?')}"
                vitals.consumer_lag[key] = sample.value
            elif sample.name == "shop_outbox_backlog":
                vitals.outbox_backlog = sample.value
            elif sample.name == "shop_outbox_oldest_age_seconds":
                vitals.outbox_oldest_age_s = sample.value
            elif sample.name == "shop_orders_placed_total":
                vitals.orders_placed = sample.value
    return vitals


class OrderRates:
    """Orders per second per instance from two successive readings of its
    ``shop_orders_placed_total``. A reading closer than ``min_interval_s`` to the kept one
    (two consoles polling together) reuses the last rate rather than dividing by ~0; a
    counter that went down (the instance restarted) starts over."""

    def __init__(
        self, *, min_interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._last: dict[str, tuple[float, float]] = {}  # instance -> (when, count)
        self._rate: dict[str, float] = {}

    def update(self, instance_id: str, count: float | None) -> float | None:
        """The rate after this reading; None until there are two (or with no counter)."""
        if count is None:
            self._last.pop(instance_id, None)
            self._rate.pop(instance_id, None)
            return None
        now = self._clock()
        previous = self._last.get(instance_id)
        if previous is None or count < previous[1]:
            self._last[instance_id] = (now, count)
            self._rate.pop(instance_id, None)
            return None
        elapsed = now - previous[0]
        if elapsed >= self._min_interval_s:
            self._rate[instance_id] = (count - previous[1]) / elapsed
            self._last[instance_id] = (now, count)
        return self._rate.get(instance_id)

    def forget_all_but(self, instance_ids: set[str]) -> None:
        """Drop what is kept for instances no longer registered (bounded memory)."""
        for gone in set(self._last) - instance_ids:
            self._last.pop(gone, None)
            self._rate.pop(gone, None)


@dataclass(frozen=True, slots=True)
class InstanceView:
    """One instance as the console shows it."""

    service: str
    instance_id: str
    url: str
    registry: str  # its status in the registry: UP, DOWN, STARTING, OUT_OF_SERVICE...
    probe: Probe
    vitals: Vitals
    orders_per_second: float | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.instance_id,
            "url": self.url,
            "registry": self.registry,
            "health": self.probe.status,
            "reasons": self.probe.reasons,
            "breaker": self.vitals.breaker,
            "outboxBacklog": self.vitals.outbox_backlog,
            "outboxOldestAgeS": self.vitals.outbox_oldest_age_s,
            "consumerLag": self.vitals.consumer_lag,
            "ordersPerSecond": self.orders_per_second,
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


async def _probe(http: aiohttp.ClientSession, instance: Instance) -> Probe:
    """The instance's own word on its health: ``GET /health``'s ``status`` (UP or DEGRADED,
    docs/observability.md) and ``reasons``, or ``/health/ready``'s where a process has no
    ``/health``; UP for a 200 without a status word, DOWN for any other answer."""
    try:
        probe = await _health(http, f"{instance.base_url}/health")
        if probe is None:
            probe = await _health(http, f"{instance.base_url}/health/ready")
        return probe or Probe("DOWN")
    except (aiohttp.ClientError, TimeoutError):
        return Probe("UNREACHABLE")


async def _health(http: aiohttp.ClientSession, url: str) -> Probe | None:
    """What one health route says; None if the process has no such route (404)."""
    async with http.get(url, headers=_JSON, timeout=_PROBE_TIMEOUT) as resp:
        if resp.status == 404:
            return None
        try:
            body = await resp.json(content_type=None)
        except ValueError:
            body = None
        body = body if isinstance(body, dict) else {}
        reasons = _reasons(body.get("reasons"))
        status = body.get("status")
        if isinstance(status, str) and status.replace("_", "").isalpha() and len(status) <= 32:
            return Probe(status.upper() if resp.status == 200 else "DOWN", reasons)
        return Probe("UP" if resp.status == 200 else "DOWN", reasons)


def _reasons(raw: object) -> dict[str, str]:
    """``reasons`` as text only (the page writes them with ``textContent`` anyway)."""
    if not isinstance(raw, dict):
        return {}
    return {str(name)[:100]: str(reason)[:500] for name, reason in list(raw.items())[:20]}


async def _vitals(http: aiohttp.ClientSession, instance: Instance) -> Vitals:
    """The instance's ``/metrics`` read and parsed; nothing for a process that has none on
    its port, does not answer or answers something else than Prometheus text."""
    try:
        async with http.get(
            f"{instance.base_url}/metrics", headers=_TEXT, timeout=_PROBE_TIMEOUT
        ) as resp:
            if resp.status != 200:
                return Vitals()
            text = await resp.text()
        return parse_vitals(text)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return Vitals()


@dataclass(frozen=True, slots=True)
class RecentOrder:
    """One of an order instance's latest orders, as the console shows it."""

    order_number: str
    status: str
    total: str
    lines: int
    at: str
    trace_id: str | None
    instance_id: str

    def as_json(self, trace_url: Callable[[str], str | None]) -> dict[str, Any]:
        return {
            "orderNumber": self.order_number,
            "status": self.status,
            "total": self.total,
            "lines": self.lines,
            "at": self.at,
            "instance": self.instance_id,
            "traceId": self.trace_id,
            "traceUrl": trace_url(self.trace_id) if self.trace_id else None,
        }


def _recent_order(raw: object, instance_id: str) -> RecentOrder | None:
    """One entry of an instance's answer, kept only if it has the expected shape (the page
    writes it as text anyway; a trace id must be one, as it goes into a link)."""
    if not isinstance(raw, dict):
        return None
    number, status, total, lines, at = (
        raw.get(k) for k in ("orderNumber", "status", "total", "lines", "at")
    )
    trace_id = raw.get("traceId")
    if not (
        isinstance(number, str)
        and len(number) <= 64
        and isinstance(status, str)
        and _WORD.match(status)
        and isinstance(total, str)
        and len(total) <= 32
        and isinstance(lines, int)
        and isinstance(at, str)
        and len(at) <= 40
    ):
        return None
    valid_trace = isinstance(trace_id, str) and _TRACE_ID.match(trace_id)
    return RecentOrder(
        number, status, total, lines, at, trace_id if valid_trace else None, instance_id
    )


async def _recent(http: aiohttp.ClientSession, instance: Instance) -> list[RecentOrder]:
    """An order instance's latest orders; none from any other process, or one that does not
    answer with a list."""
    if instance.app != ORDER_SERVICE:
        return []
    try:
        async with http.get(
            f"{instance.base_url}{RECENT_ORDERS_PATH}", headers=_JSON, timeout=_PROBE_TIMEOUT
        ) as resp:
            if resp.status != 200:
                return []
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return []
    entries = body[:RECENT_ORDERS_SHOWN] if isinstance(body, list) else []
    return [o for o in (_recent_order(e, instance.instance_id) for e in entries) if o]


def recent_orders(
    found: list[list[RecentOrder]], *, trace_url: Callable[[str], str | None]
) -> list[dict[str, Any]]:
    """Every instance's latest orders merged: the newest ``RECENT_ORDERS_SHOWN`` first (the
    times are ISO 8601 UTC, all written alike, so they sort as text)."""
    merged = sorted((o for orders in found for o in orders), key=lambda o: o.at, reverse=True)
    return [o.as_json(trace_url) for o in merged[:RECENT_ORDERS_SHOWN]]


def _no_link(_trace_id: str) -> str | None:
    return None


async def overview(
    http: aiohttp.ClientSession,
    registry_url: str,
    rates: OrderRates,
    *,
    trace_url: Callable[[str], str | None] = _no_link,
) -> dict[str, Any]:
    """The registry's view of every instance, each one's health and vitals, probed in
    parallel, and the latest orders of the order instances, each with its trace's link
    (``trace_url``; None: no trace UI configured)."""
    try:
        async with http.get(f"{registry_url}/apps", headers=_JSON, timeout=_PROBE_TIMEOUT) as resp:
            if resp.status != 200:
                return {"registry": "DOWN", "services": [], "recentOrders": []}
            instances = _registered(await resp.json(content_type=None))
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return {"registry": "UNREACHABLE", "services": [], "recentOrders": []}
    probes, vitals, recent = await asyncio.gather(
        asyncio.gather(*(_probe(http, i) for i in instances)),
        asyncio.gather(*(_vitals(http, i) for i in instances)),
        asyncio.gather(*(_recent(http, i) for i in instances)),
    )
    rates.forget_all_but({i.instance_id for i in instances})
    views = sorted(
        (
            InstanceView(
                i.app,
                i.instance_id,
                i.base_url,
                i.status,
                probe,
                vital,
                rates.update(i.instance_id, vital.orders_placed),
            )
            for i, probe, vital in zip(instances, probes, vitals, strict=True)
        ),
        key=lambda v: (v.service, v.instance_id),
    )
    services: dict[str, list[dict[str, Any]]] = {}
    for view in views:
        services.setdefault(view.service, []).append(view.as_json())
    return {
        "registry": "UP",
        "services": [{"name": name, "instances": found} for name, found in services.items()],
        "recentOrders": recent_orders(list(recent), trace_url=trace_url),
    }


# One per gateway process: the rates are computed across every console's polls.
_RATES = OrderRates()


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
    found = await overview(
        runtime.http, runtime.registry.base_url, _RATES, trace_url=runtime.settings.trace_url
    )
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
