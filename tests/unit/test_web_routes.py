"""The gateway routes the storefront's pages and files to web-service, and nothing else:
public reads only, the API's paths untouched (docs/storefront.md, Paths)."""

from __future__ import annotations

import pytest

from shop.gateway.domain import Access, Match, MethodNotAllowed, NotRouted, public_route_table
from shop.web.api import SHELLS

TABLE = public_route_table(dashboard_access=Access.PUBLIC)


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/shop/product/65a1b2c3d4e5f60718293a4b",
        "/shop/static/app.js",
        *(f"/shop/{page}" for page in SHELLS),
    ],
)
def test_every_storefront_page_is_a_public_read_of_web_service(path: str) -> None:
    found = TABLE.match("GET", path)
    assert isinstance(found, Match)
    assert (found.route.service, found.access) == ("web-service", Access.PUBLIC)
    assert isinstance(TABLE.match("HEAD", path), Match)
    assert isinstance(TABLE.match("POST", path), MethodNotAllowed)


@pytest.mark.parametrize(
    "path", ["/shop", "/shop/", "/shop/unknown", "/shop/cart/x", "/index.html", "/shop/internal"]
)
def test_nothing_else_reaches_the_storefront(path: str) -> None:
    assert isinstance(TABLE.match("GET", path), NotRouted)


def test_the_apis_routes_are_untouched() -> None:
    for method, path, service in (
        ("GET", "/api/product", "product-service"),
        ("POST", "/api/order", "order-service"),
        ("POST", "/auth/token", "auth-service"),
    ):
        found = TABLE.match(method, path)
        assert isinstance(found, Match) and found.route.service == service
