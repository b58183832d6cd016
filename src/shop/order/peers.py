"""The services the order service calls: the catalogue (prices) and the inventory (stock).

Both are found through the registry and called with the one pooled HTTP session, this
service's own token (``Authorization``: a service token from auth-service, not the
caller's; the release reconciler has no caller) and this request's identity
(``X-Request-ID``, ``traceparent``). A peer the registry names may be an impostor, so it
never sees a reusable credential: the token is short-lived, names order-service and the
internal audience (no user route takes it), and the secret behind it goes to the pinned
``SHOP_AUTH_URL`` only (platform/security.py). Users' tokens are never forwarded. Calls
to the inventory go through a circuit breaker (unless asked not to): an inventory that
fails is left alone for a while instead of making every order wait for its timeout.

The inventory is called on every order, so those calls use the kept-alive httptools client
of platform/upstream.py rather than aiohttp's (whose request, URL and header objects were
about 5 % of the order process); the catalogue, asked when the price list misses a SKU (or
for every order with ``ORDER_PRICE_SOURCE=catalogue``), keeps the aiohttp session.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Protocol

import aiohttp

from shop.order.breaker import BreakerState, CircuitBreaker, CircuitOpen
from shop.order.domain import (
    OutOfStock,
    RequestedLine,
    Shortage,
    Unavailable,
    UpstreamRefused,
    parse_price,
)
from shop.platform.context import outgoing_headers
from shop.platform.discovery import Instance, RegistryClient, RegistryUnavailable
from shop.platform.security import ServiceTokenUnavailable
from shop.platform.upstream import ConnectFailed, UpstreamBroken, UpstreamPool

__all__ = [
    "CIRCUIT_OPEN",
    "INVENTORY_SERVICE",
    "PRODUCT_SERVICE",
    "Catalogue",
    "Credentials",
    "HttpCatalogue",
    "HttpInventory",
    "Inventory",
]

log = logging.getLogger("shop.order.peers")

PRODUCT_SERVICE = "product-service"
INVENTORY_SERVICE = "inventory-service"
# A catalogue outage has no breaker to say when it ends; a short, honest guess.
CATALOGUE_RETRY_AFTER_S = 2.0
CIRCUIT_OPEN = "The inventory is unavailable (circuit open); try again later."
# One inventory failure that did not open the breaker: worth trying again soon.
INVENTORY_RETRY_AFTER_S = 1.0
# auth-service could not issue our service token; it caches tokens, so this is an outage.
AUTH_RETRY_AFTER_S = 2.0
# ``json.dumps(..., separators=...)`` builds an encoder per call; this one is built once.
_COMPACT = json.JSONEncoder(separators=(",", ":"))

# The ``Authorization`` header value to call the instance at a base URL with
# (``runtime.service_tokens.bearer``): a token good for that instance only.
Credentials = Callable[[str], Awaitable[str]]


class Catalogue(Protocol):
    async def prices(self, sku_codes: Sequence[str]) -> dict[str, Decimal]:
        """The current price of each known SKU; unknown SKUs are left out."""


class Inventory(Protocol):
    async def reserve(self, order_number: str, lines: Sequence[RequestedLine]) -> None:
        """Reserve every line or none: OutOfStock, Unavailable or UpstreamRefused if not.

        ``Unavailable.maybe_applied`` says whether the reservation may exist nonetheless.
        """

    async def release(self, order_number: str, *, guarded: bool = True) -> None:
        """Give the order's stock back (idempotent): Unavailable if it cannot be done now.

        ``guarded=False`` bypasses the breaker (background retries, see docs/order.md).
        """

    def unavailable_for_s(self) -> float:
        """Seconds the inventory is known to be unavailable for (0: worth a call)."""


async def _headers(credentials: Credentials, *, peer: str, target: str) -> dict[str, str]:
    try:
        authorization = await credentials(target)
    except ServiceTokenUnavailable as exc:
        log.warning("no service token to call %s: %s", peer, exc)
        raise Unavailable(
            "This service cannot authenticate to its peers right now; try again shortly.",
            retry_after_s=AUTH_RETRY_AFTER_S,
        ) from exc
    return {"Accept": "application/json", "Authorization": authorization, **outgoing_headers()}


async def _json(resp: aiohttp.ClientResponse) -> Any:
    try:
        return await resp.json(content_type=None)
    except ValueError:
        return None


class HttpCatalogue:
    def __init__(
        self,
        *,
        registry: RegistryClient,
        http: aiohttp.ClientSession,
        credentials: Credentials,
        timeout_s: float,
    ) -> None:
        self._registry = registry
        self._http = http
        self._credentials = credentials
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def prices(self, sku_codes: Sequence[str]) -> dict[str, Decimal]:
        unavailable = "The catalogue cannot be reached to price the order; try again shortly."
        try:
            instance = await self._registry.choose(PRODUCT_SERVICE)
        except RegistryUnavailable as exc:
            log.warning("no catalogue: %s", exc)
            raise Unavailable(unavailable, retry_after_s=CATALOGUE_RETRY_AFTER_S) from exc
        if instance is None:
            log.warning("no %s instance is UP", PRODUCT_SERVICE)
            raise Unavailable(unavailable, retry_after_s=CATALOGUE_RETRY_AFTER_S)
        headers = await _headers(self._credentials, peer=PRODUCT_SERVICE, target=instance.base_url)
        try:
            async with self._http.get(
                instance.base_url + "/internal/products",
                params=[("skuCode", code) for code in sku_codes],
                headers=headers,
                timeout=self._timeout,
            ) as resp:
                if resp.status >= 500:
                    raise Unavailable(unavailable, retry_after_s=CATALOGUE_RETRY_AFTER_S)
                if resp.status != 200:
                    raise UpstreamRefused(f"{PRODUCT_SERVICE} answered {resp.status}")
                body = await _json(resp)
        except aiohttp.ClientConnectorError as exc:
            self._registry.refused(instance)
            log.warning("%s refused the connection: %s", PRODUCT_SERVICE, exc)
            raise Unavailable(unavailable, retry_after_s=CATALOGUE_RETRY_AFTER_S) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("%s failed: %r", PRODUCT_SERVICE, exc)
            raise Unavailable(unavailable, retry_after_s=CATALOGUE_RETRY_AFTER_S) from exc
        return _prices_from(body, sku_codes)


def _prices_from(body: Any, asked: Sequence[str]) -> dict[str, Decimal]:
    if not isinstance(body, list):
        raise UpstreamRefused(f"{PRODUCT_SERVICE} sent a price list that is not a list")
    wanted = set(asked)
    prices: dict[str, Decimal] = {}
    for item in body:
        sku = item.get("skuCode") if isinstance(item, Mapping) else None
        if sku not in wanted:
            continue
        price = parse_price(item.get("price"))
        if price is None:
            raise UpstreamRefused(f"{PRODUCT_SERVICE} sent an unreadable price for {sku}")
        prices[sku] = price
    return prices


class _CallFailed(Exception):
    def __init__(self, reason: str, *, maybe_done: bool) -> None:
        super().__init__(reason)
        # The request may have reached the inventory and been applied before we gave up.
        self.maybe_done = maybe_done


class HttpInventory:
    def __init__(
        self,
        *,
        registry: RegistryClient,
        pool: UpstreamPool,
        breaker: CircuitBreaker,
        credentials: Credentials,
        timeout_s: float,
    ) -> None:
        self._registry = registry
        self._pool = pool
        self._breaker = breaker
        self._credentials = credentials
        self._timeout_s = timeout_s

    async def reserve(self, order_number: str, lines: Sequence[RequestedLine]) -> None:
        body = {
            "orderNumber": order_number,
            "lines": [{"skuCode": line.sku_code, "quantity": line.quantity} for line in lines],
        }
        try:
            status, answer = await self._call("POST", "/internal/reservations", json=body)
        except _CallFailed as exc:
            raise self._unavailable(exc, maybe_applied=exc.maybe_done) from exc
        if status in (200, 201):
            return
        if status == 409:
            shortages = _shortages_from(answer)
            if shortages:
                raise OutOfStock(shortages)
        raise UpstreamRefused(f"{INVENTORY_SERVICE} answered {status} to a reservation")

    async def release(self, order_number: str, *, guarded: bool = True) -> None:
        path = f"/internal/reservations/{order_number}"
        try:
            status, _ = await self._call("DELETE", path, guarded=guarded)
        except _CallFailed as exc:
            raise self._unavailable(exc, maybe_applied=exc.maybe_done) from exc
        if status not in (200, 202, 204, 404):
            raise UpstreamRefused(f"{INVENTORY_SERVICE} answered {status} to a release")

    def unavailable_for_s(self) -> float:
        wait = self._breaker.retry_after_s()
        if (
            wait
            and self._breaker.state is BreakerState.OPEN
            and self._registry.proved_alive(INVENTORY_SERVICE)
        ):
            # A restarted or added inventory registers at once, a thawed one answers its
            # health check: probe it now, not when the open period ends.
            log.info("%s proved alive: probing it now", INVENTORY_SERVICE)
            self._breaker.probe_now()
            return self._breaker.retry_after_s()
        return wait

    def _unavailable(self, failure: _CallFailed, *, maybe_applied: bool) -> Unavailable:
        wait = self._breaker.retry_after_s() or INVENTORY_RETRY_AFTER_S
        return Unavailable(
            f"The inventory cannot be reached ({failure}); try again shortly.",
            retry_after_s=wait,
            maybe_applied=maybe_applied,
        )

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: Mapping[str, Any] | None = None,
        guarded: bool = True,
    ) -> tuple[int, Any]:
        if not guarded:
            return await self._send(method, path, json)
        try:
            self._breaker.acquire()
        except CircuitOpen as exc:
            raise Unavailable(CIRCUIT_OPEN, retry_after_s=exc.retry_after_s) from exc
        try:
            outcome = await self._send(method, path, json)
        except _CallFailed:
            self._breaker.failed()
            raise
        except BaseException:
            # Auth being down (no token) says nothing about the inventory's health.
            self._breaker.abandon()
            raise
        # A 4xx, 409 above all, is the inventory answering: it is up.
        self._breaker.succeeded()
        return outcome

    async def _send(
        self, method: str, path: str, json: Mapping[str, Any] | None
    ) -> tuple[int, Any]:
        """Send to one inventory instance; one that refuses the connection is passed over
        and the next one tried (nothing reached it, so nothing was applied)."""
        tried: set[str] = set()
        while True:
            try:
                instance = await self._registry.choose(INVENTORY_SERVICE)
            except RegistryUnavailable as exc:
                raise _CallFailed(f"registry: {exc}", maybe_done=False) from exc
            if instance is None:
                raise _CallFailed(f"no {INVENTORY_SERVICE} instance is UP", maybe_done=False)
            if instance.instance_id in tried:
                # Every listed instance refused: the breaker hears one failure.
                raise _CallFailed("connection refused", maybe_done=False)
            tried.add(instance.instance_id)
            try:
                return await self._send_to(instance, method, path, json)
            except ConnectFailed:
                self._registry.refused(instance)
                log.warning("%s refused the connection", instance.instance_id)

    async def _send_to(
        self, instance: Instance, method: str, path: str, json: Mapping[str, Any] | None
    ) -> tuple[int, Any]:
        # A token for this instance alone: another cannot replay what this one receives.
        headers = await _headers(
            self._credentials, peer=INVENTORY_SERVICE, target=instance.base_url
        )
        head, body = _request(method, path, headers, json)
        try:
            # One deadline for the whole exchange, as aiohttp's ``total`` timeout was.
            async with asyncio.timeout(self._timeout_s):
                answer = await self._pool.request(
                    instance.base_url,
                    head,
                    body,
                    head_only=False,
                    # Both calls are idempotent (a reservation is keyed by its order
                    # number), so one sent on a kept-alive connection the inventory had
                    # just closed may go again.
                    idempotent=True,
                    connect_timeout_s=self._timeout_s,
                    timeout_s=self._timeout_s,
                )
                if answer.status >= 500:
                    answer.abandon()
                    raise _CallFailed(f"answered {answer.status}", maybe_done=True)
                raw = answer.whole_body()
                if raw is None:
                    raw = b"".join([chunk async for chunk in answer.body()])
        except TimeoutError as exc:
            # Not tried again (it may have been applied), but passed over by the next call.
            self._registry.refused(instance)
            raise _CallFailed("timed out", maybe_done=True) from exc
        except UpstreamBroken as exc:
            raise _CallFailed("connection broken", maybe_done=True) from exc
        return answer.status, _parsed(raw)


def _request(
    method: str, path: str, headers: Mapping[str, str], document: Mapping[str, Any] | None
) -> tuple[bytes, bytes]:
    """The request line and headers (``UpstreamPool`` adds ``Host``), and the JSON body."""
    lines = [f"{method} {path} HTTP/1.1\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
    body = b""
    if document is not None:
        body = _COMPACT.encode(document).encode()
        lines.append(f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1"), body


def _parsed(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _shortages_from(answer: Any) -> list[Shortage]:
    raw = answer.get("shortages") if isinstance(answer, Mapping) else None
    if not isinstance(raw, list):
        return []
    found = []
    for item in raw:
        if not isinstance(item, Mapping):
            continue
        sku, requested, available = (
            item.get("skuCode"),
            item.get("requested"),
            item.get("available"),
        )
        if isinstance(sku, str) and isinstance(requested, int) and isinstance(available, int):
            found.append(Shortage(sku, requested, available))
    return found
