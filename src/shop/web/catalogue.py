"""The catalogue as the public API shows it: ``GET /api/product`` at the gateway, found
through the registry like any peer (``api-gateway``). The storefront reads nothing else on
the server; everything a shopper does beyond browsing, the browser asks the gateway itself.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from shop.platform.context import outgoing_headers
from shop.platform.discovery import Instance, RegistryClient, RegistryUnavailable

__all__ = [
    "GATEWAY",
    "CatalogueUnavailable",
    "GatewayCatalogue",
    "NoSuchProduct",
    "ProductRefused",
    "Product",
    "ProductPage",
    "registry_gateway",
]

log = logging.getLogger("shop.web")

GATEWAY = "api-gateway"
_ID_CHARS = frozenset("0123456789abcdefABCDEF")

FindGateway = Callable[[], Awaitable[Instance | None]]


class CatalogueUnavailable(Exception):
    """No gateway answered (none registered, refused, timed out, or a 5xx/429): try later."""

    def __init__(self, reason: str, *, retry_after_s: int = 2) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class NoSuchProduct(Exception):
    pass


class ProductRefused(Exception):
    """The API refused the query (422): ``errors`` is field -> message."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        super().__init__("the catalogue refused the query")
        self.errors = dict(errors)


@dataclass(frozen=True, slots=True)
class Product:
    id: str
    name: str
    description: str
    price: str  # the API's decimal string, shown as it is
    sku_code: str
    category: str

    @classmethod
    def of(cls, raw: Any) -> Product:
        if not isinstance(raw, dict):
            raise ValueError("a product is a JSON object")
        return cls(
            id=str(raw["id"]),
            name=str(raw["name"]),
            description=str(raw.get("description") or ""),
            price=str(raw["price"]),
            sku_code=str(raw["skuCode"]),
            category=str(raw.get("category") or ""),
        )


@dataclass(frozen=True, slots=True)
class ProductPage:
    products: list[Product]
    total: int


def registry_gateway(registry: RegistryClient) -> FindGateway:
    async def find() -> Instance | None:
        try:
            return await registry.choose(GATEWAY)
        except RegistryUnavailable as exc:
            log.warning("registry unreachable while looking for the gateway: %s", exc)
            return None

    return find


class GatewayCatalogue:
    """Reads the public catalogue; ``forwarded_for`` keeps the shopper's address on the
    call, so a gateway that trusts this service (GATEWAY_TRUSTED_PROXIES) counts its rate
    limit against the shopper rather than against the storefront."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        find_gateway: FindGateway,
        on_refused: Callable[[Instance], None] = lambda _i: None,
        timeout_s: float = 5.0,
        categories_ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._find = find_gateway
        self._on_refused = on_refused
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._categories_ttl_s = categories_ttl_s
        self._clock = clock
        self._categories: tuple[float, list[str]] | None = None

    async def browse(
        self, params: Mapping[str, str], *, forwarded_for: str | None = None
    ) -> ProductPage:
        status, headers, body = await self._get("/api/product", params, forwarded_for)
        if status == 422:
            errors = body.get("errors") if isinstance(body, dict) else None
            raise ProductRefused(errors if isinstance(errors, dict) else {"query": "is invalid"})
        if status != 200 or not isinstance(body, list):
            raise CatalogueUnavailable(f"the catalogue answered {status}")
        try:
            products = [Product.of(item) for item in body]
            total = int(headers.get("X-Total-Count", len(products)))
        except (KeyError, ValueError) as exc:
            raise CatalogueUnavailable(f"the catalogue answered something else: {exc}") from None
        return ProductPage(products, total)

    async def product(self, product_id: str, *, forwarded_for: str | None = None) -> Product:
        # Only an id of the API's form goes into the path: nothing a shopper types can
        # reach another route of the gateway.
        if len(product_id) != 24 or not set(product_id) <= _ID_CHARS:
            raise NoSuchProduct(product_id)
        status, _headers, body = await self._get(f"/api/product/{product_id}", {}, forwarded_for)
        if status == 404:
            raise NoSuchProduct(product_id)
        if status != 200:
            raise CatalogueUnavailable(f"the catalogue answered {status}")
        try:
            return Product.of(body)
        except (KeyError, ValueError) as exc:
            raise CatalogueUnavailable(f"the catalogue answered something else: {exc}") from None

    async def categories(self, *, forwarded_for: str | None = None) -> list[str]:
        """The categories of the first 100 products, for the filter; kept a while. An
        unavailable catalogue gives none: the page still works with the text field."""
        now = self._clock()
        if self._categories and now - self._categories[0] < self._categories_ttl_s:
            return self._categories[1]
        try:
            page = await self.browse({"limit": "100"}, forwarded_for=forwarded_for)
        except (CatalogueUnavailable, ProductRefused):
            return self._categories[1] if self._categories else []
        found = sorted({p.category for p in page.products if p.category}, key=str.casefold)
        self._categories = (now, found)
        return found

    async def _get(
        self, path: str, params: Mapping[str, str], forwarded_for: str | None
    ) -> tuple[int, Mapping[str, str], Any]:
        gateway = await self._find()
        if gateway is None:
            raise CatalogueUnavailable("no gateway is registered")
        headers = {"Accept": "application/json", **outgoing_headers()}
        if forwarded_for:
            headers["X-Forwarded-For"] = forwarded_for
        try:
            async with self._session.get(
                f"{gateway.base_url}{path}", params=params, headers=headers, timeout=self._timeout
            ) as resp:
                raw = await resp.read()
                status, answer_headers = resp.status, resp.headers
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            self._on_refused(gateway)
            raise CatalogueUnavailable(f"the gateway did not answer: {exc!r}") from None
        if status == 429 or status >= 500:
            retry = answer_headers.get("Retry-After", "2")
            raise CatalogueUnavailable(
                f"the catalogue answered {status}",
                retry_after_s=int(retry) if retry.isdigit() else 2,
            )
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        return status, answer_headers, body
