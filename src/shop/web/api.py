"""Routes of the storefront: the catalogue and product pages rendered here from the public
API, the other pages served as shells the browser's script fills through the gateway."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment

from shop.platform.problems import problem_response
from shop.web.catalogue import (
    CatalogueUnavailable,
    GatewayCatalogue,
    NoSuchProduct,
    ProductRefused,
)
from shop.web.domain import LOW_STOCK, BadQuery, CatalogueRequest, Pages

__all__ = ["PAGE_HEADERS", "SHELLS", "Storefront", "router"]

# Everything the pages load and call comes from this origin (the gateway's): no CDN, no
# other site's script, and no other site may frame a page holding a token.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
        " img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

# /shop/<name>: pages whose content is the shopper's own (cart, orders...), filled by the
# script from the public API with the shopper's token; name -> title.
SHELLS = {
    "cart": "Your cart",
    "checkout": "Checkout",
    "orders": "Your orders",
    "notifications": "Your notifications",
    "login": "Log in",
    "signup": "Create an account",
    "admin": "Catalogue admin",
}

router = APIRouter(include_in_schema=False)


@dataclass(frozen=True, slots=True)
class Storefront:
    """What the routes use, opened in the app's lifespan (app.py)."""

    templates: Environment
    catalogue: GatewayCatalogue
    page_size: int


def _storefront(request: Request) -> Storefront:
    storefront: Storefront = request.app.state.storefront
    return storefront


def _shopper(request: Request) -> str | None:
    # The gateway wrote what it saw (docs/gateway.md): the shopper's address, last.
    forwarded = request.headers.get("x-forwarded-for")
    if forwarded:
        return forwarded.rsplit(",", 1)[-1].strip() or None
    return request.client.host if request.client else None


def _page(
    request: Request,
    name: str,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
    **values: Any,
) -> HTMLResponse:
    template = _storefront(request).templates.get_template(name)
    html = template.render(low_stock=LOW_STOCK, **values)
    return HTMLResponse(html, status_code=status, headers={**PAGE_HEADERS, **(headers or {})})


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def _error(
    request: Request,
    status: int,
    *,
    title: str,
    detail: str,
    errors: dict[str, str] | None = None,
    retry_after_s: int | None = None,
) -> Response:
    """A browser gets a page saying what went wrong; any other client problem+json."""
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    if not _wants_html(request):
        return problem_response(
            status, instance=request.url.path, detail=detail, errors=errors, headers=headers
        )
    return _page(
        request,
        "error.html",
        status=status,
        headers=headers,
        page="error",
        title=title,
        detail=detail,
        errors=errors or {},
    )


def _unavailable(request: Request, exc: CatalogueUnavailable) -> Response:
    return _error(
        request,
        503,
        title="The catalogue is unavailable",
        detail=f"The catalogue could not be reached; try again in {exc.retry_after_s} s.",
        retry_after_s=exc.retry_after_s,
    )


@router.get("/", response_class=HTMLResponse)
async def catalogue_page(request: Request) -> Response:
    try:
        query = CatalogueRequest.parse(request.query_params)
    except BadQuery as exc:
        return _error(
            request, 422, title="Not a catalogue page", detail=str(exc), errors=exc.errors
        )
    storefront = _storefront(request)
    size, catalogue = storefront.page_size, storefront.catalogue
    shopper = _shopper(request)
    try:
        found = await catalogue.browse(query.api_params(size), forwarded_for=shopper)
    except ProductRefused as exc:
        return _error(
            request, 422, title="Not a catalogue page", detail="See errors.", errors=exc.errors
        )
    except CatalogueUnavailable as exc:
        return _unavailable(request, exc)
    categories = await catalogue.categories(forwarded_for=shopper)
    if query.category and query.category not in categories:
        categories = [*categories, query.category]
    return _page(
        request,
        "catalogue.html",
        page="catalogue",
        title="Search results" if query.text or query.category else "Catalogue",
        query=query,
        products=found.products,
        pages=Pages(page=query.page, total=found.total, size=size),
        categories=categories,
    )


@router.get("/shop/product/{product_id}", response_class=HTMLResponse)
async def product_page(request: Request, product_id: str) -> Response:
    try:
        catalogue = _storefront(request).catalogue
        product = await catalogue.product(product_id, forwarded_for=_shopper(request))
    except NoSuchProduct:
        return _error(
            request, 404, title="No such product", detail="This product is not in the catalogue."
        )
    except CatalogueUnavailable as exc:
        return _unavailable(request, exc)
    return _page(request, "product.html", page="product", title=product.name, product=product)


def _shell(name: str, title: str) -> Any:
    async def shell(request: Request) -> Response:
        return _page(request, f"{name}.html", page=name, title=title)

    shell.__name__ = f"{name}_page"
    return shell


for _name, _title in SHELLS.items():
    router.add_api_route(
        f"/shop/{_name}", _shell(_name, _title), methods=["GET"], response_class=HTMLResponse
    )
