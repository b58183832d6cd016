"""The storefront over HTTP: the app with its real lifespan, rendering pages from a stand-in
gateway (a real HTTP server on a free port, answering the public ``GET /api/product`` as
the gateway does: the storefront's one peer, across a service boundary)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from shop.platform.discovery import Instance
from shop.platform.settings import PlatformSettings
from shop.web.app import build_app
from shop.web.settings import WebSettings
from tests.support import free_port

PRODUCT_ID = "65a1b2c3d4e5f60718293a4b"
HTML = {"Accept": "text/html,application/xhtml+xml"}


def _product(n: int, **overrides: str) -> dict[str, str]:
    return {
        "id": f"{n:024x}",
        "name": f"Lamp {n}",
        "description": "A lamp.",
        "price": "24.50",
        "skuCode": f"lamp_{n}",
        "category": "home",
        "createdAt": "2026-01-01T00:00:00.000Z",
        **overrides,
    }


@dataclass
class StandInGateway:
    """Answers like the gateway's public catalogue; remembers what it was asked."""

    products: list[dict[str, str]]
    asked: list[tuple[str, dict[str, str], dict[str, str]]] = field(default_factory=list)
    status: int = 200
    body: Any = None

    async def catalogue(self, request: web.Request) -> web.Response:
        self.asked.append((request.path, dict(request.query), dict(request.headers)))
        if self.status != 200:
            return web.json_response(
                self.body or {"status": self.status},
                status=self.status,
                content_type="application/problem+json",
                headers={"Retry-After": "7"} if self.status == 503 else None,
            )
        offset = int(request.query.get("offset", "0"))
        limit = int(request.query.get("limit", "20"))
        page = self.products[offset : offset + limit]
        return web.json_response(page, headers={"X-Total-Count": str(len(self.products))})

    async def product(self, request: web.Request) -> web.Response:
        self.asked.append((request.path, dict(request.query), dict(request.headers)))
        for product in self.products:
            if product["id"] == request.match_info["id"]:
                return web.json_response(product)
        return web.json_response({"status": 404}, status=404)


@dataclass
class Storefront:
    client: httpx.AsyncClient
    gateway: StandInGateway


async def _stand_in(gateway: StandInGateway) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_get("/api/product", gateway.catalogue)
    app.router.add_get("/api/product/{id}", gateway.product)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


@pytest.fixture
async def shop(tmp_path: Path) -> AsyncIterator[Storefront]:
    gateway = StandInGateway(products=[_product(n) for n in range(1, 31)])
    runner, port = await _stand_in(gateway)
    instance = Instance(app="api-gateway", instance_id="gw", host="127.0.0.1", port=port)

    async def find() -> Instance:
        return instance

    app = build_app(
        platform=PlatformSettings(data_dir=tmp_path),
        settings=WebSettings(_env_file=None),
        find_gateway=lambda _runtime: find,
    )
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://web") as client:
                yield Storefront(client, gateway)
    finally:
        await runner.cleanup()


async def test_the_catalogue_is_rendered_from_the_public_api_a_page_at_a_time(
    shop: Storefront,
) -> None:
    page = await shop.client.get("/", params={"q": "lamp", "page": "2"}, headers=HTML)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "Showing 13–24 of 30 products" in html
    assert 'href="/shop/product/00000000000000000000000d">Lamp 13</a>' in html
    assert "Lamp 12<" not in html and "Lamp 25<" not in html
    assert 'rel="prev" href="/?q=lamp"' in html and 'rel="next" href="/?q=lamp&amp;page=3"' in html
    listing = [params for path, params, _ in shop.gateway.asked if params.get("q")]
    assert listing == [{"q": "lamp", "limit": "12", "offset": "12"}]


async def test_what_the_catalogue_holds_is_text_never_markup(shop: Storefront) -> None:
    shop.gateway.products = [_product(1, name="<script>alert(1)</script>", category='"><b>')]
    html = (await shop.client.get("/", headers=HTML)).text
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert '"><b>' not in html


async def test_the_filter_offers_the_catalogues_categories(shop: Storefront) -> None:
    shop.gateway.products = [
        _product(1, category="phones"),
        _product(2, category="Audio"),
        _product(3, category="phones"),
    ]
    html = (await shop.client.get("/", params={"category": "phones"}, headers=HTML)).text
    assert '<option value="Audio">' in html
    assert '<option value="phones" selected>' in html
    # Kept a while: a second page view does not ask for the list again.
    await shop.client.get("/", headers=HTML)
    full_lists = [params for _, params, _ in shop.gateway.asked if params == {"limit": "100"}]
    assert len(full_lists) == 1


async def test_the_shoppers_address_goes_with_the_call(shop: Storefront) -> None:
    await shop.client.get("/", headers={**HTML, "X-Forwarded-For": "203.0.113.9"})
    assert {headers.get("X-Forwarded-For") for _, _, headers in shop.gateway.asked} == {
        "203.0.113.9"
    }


async def test_a_product_page_shows_the_product(shop: Storefront) -> None:
    shop.gateway.products = [_product(1, id=PRODUCT_ID, name="Brass lamp", price="1299.00")]
    page = await shop.client.get(f"/shop/product/{PRODUCT_ID}", headers=HTML)
    assert page.status_code == 200
    assert "<h1>Brass lamp</h1>" in page.text and '<p class="price">1299.00</p>' in page.text
    assert 'data-sku="lamp_1"' in page.text


async def test_an_unknown_or_malformed_product_is_404_and_only_ids_reach_the_gateway(
    shop: Storefront,
) -> None:
    unknown = await shop.client.get(f"/shop/product/{'f' * 24}", headers=HTML)
    assert unknown.status_code == 404 and "No such product" in unknown.text
    malformed = await shop.client.get("/shop/product/..%2F..%2Finternal", headers=HTML)
    assert malformed.status_code == 404
    assert [path for path, _, _ in shop.gateway.asked] == [f"/api/product/{'f' * 24}"]


async def test_a_bad_query_is_422_problem_json_or_a_page_for_a_browser(shop: Storefront) -> None:
    problem = await shop.client.get("/", params={"page": "0"})
    assert problem.status_code == 422
    assert problem.headers["content-type"] == "application/problem+json"
    assert problem.json()["errors"] == {"page": "must be a whole number from 1 to 10000"}
    page = await shop.client.get("/", params={"page": "0"}, headers=HTML)
    assert page.status_code == 422 and "whole number from 1 to 10000" in page.text
    assert shop.gateway.asked == []


async def test_the_apis_own_refusal_is_shown_with_its_fields(shop: Storefront) -> None:
    shop.gateway.status = 422
    shop.gateway.body = {"status": 422, "errors": {"q": "must not contain control characters"}}
    page = await shop.client.get("/", params={"q": "lamp"}, headers=HTML)
    assert page.status_code == 422
    assert "must not contain control characters" in page.text


async def test_an_unavailable_catalogue_is_503_with_retry_after(shop: Storefront) -> None:
    shop.gateway.status = 503
    page = await shop.client.get("/", headers=HTML)
    assert page.status_code == 503
    assert page.headers["retry-after"] == "7"
    assert "try again in 7 s" in page.text


async def test_no_gateway_is_503_not_500(tmp_path: Path) -> None:
    async def nowhere() -> None:
        return None

    closed = Instance(app="api-gateway", instance_id="gone", host="127.0.0.1", port=free_port())

    async def refusing() -> Instance:
        return closed

    for finder in (nowhere, refusing):
        app = build_app(
            platform=PlatformSettings(data_dir=tmp_path),
            settings=WebSettings(_env_file=None),
            find_gateway=lambda _runtime, f=finder: f,  # type: ignore[misc]
        )
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://web") as client:
                answer = await client.get("/")
        assert answer.status_code == 503
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.headers["retry-after"].isdigit()


async def test_pages_and_files_come_from_this_origin_only(shop: Storefront) -> None:
    for path in ("/", "/shop/cart", "/shop/checkout", "/shop/login", "/shop/admin"):
        page = await shop.client.get(path, headers=HTML)
        assert page.status_code == 200, path
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy
        assert "http" not in page.text.split("<body", 1)[0], "nothing loaded from elsewhere"
    for asset in ("app.js", "session.js", "cart.js", "store.css"):
        answer = await shop.client.get(f"/shop/static/{asset}")
        assert answer.status_code == 200, asset
        assert "http://" not in answer.text and "https://" not in answer.text
    assert (await shop.client.get("/shop/static/nope.js")).status_code == 404
