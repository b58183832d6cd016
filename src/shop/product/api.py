"""Routes of the product service (SPEC §3 Product, and the internal lookup for orders)."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from pydantic import AfterValidator, BaseModel, Field, field_validator
from pydantic_core import PydanticCustomError

from shop.platform.fastpath import LeanRequest, Reply, json_reply
from shop.platform.problems import Problem, from_problem
from shop.platform.security import AdminUser, internal_caller
from shop.platform.tokens import Principal
from shop.product.domain import (
    MAX_CATEGORY,
    MAX_OFFSET,
    CatalogueQuery,
    InvalidField,
    InvalidProduct,
    Product,
    ProductDraft,
    ProductError,
    ProductNotFound,
    SkuTaken,
    clean_category,
    clean_description,
    clean_name,
    clean_search_term,
    clean_sku_code,
    format_price,
    parse_price,
    sku_codes_from_query,
)
from shop.product.service import ProductService

__all__ = [
    "CatalogueEntry",
    "ProductForm",
    "ProductView",
    "install_error_answers",
    "internal",
    "products_by_sku_lean",
    "router",
]

MAX_QUERY_TEXT = 200


def _checked(clean: Any, value: Any) -> Any:
    try:
        return clean(value)
    except InvalidField as exc:
        raise PydanticCustomError("invalid_product", str(exc)) from None


def _search_term(value: str | None) -> str | None:
    if value is None:
        return None
    term: str = _checked(clean_search_term, value)
    return term


class ProductForm(BaseModel):
    """A product as a client sends it (POST and PUT); unknown fields are ignored."""

    name: str = Field(description="1-200 characters.", examples=["Pixel 8"])
    description: str = Field(description="Up to 5000 characters; may be empty.")
    price: Decimal = Field(
        description='A decimal string ("899.00") or a number with at most two decimals; '
        "more than 0 and less than 10^10.",
        examples=["899.00"],
    )
    skuCode: str | None = Field(
        default=None,
        description="1-64 of letters, digits, '_', '.', '-'; unique, case-sensitive. "
        "Left out (as the reference's own clients do): POST derives a unique one from the "
        "name, PUT keeps the product's own.",
        examples=["pixel_8"],
    )
    category: str | None = Field(
        default=None, description='1-100 characters; "general" when left out.'
    )

    @field_validator("price", mode="before")
    @classmethod
    def _price(cls, value: Any) -> Decimal:
        price: Decimal = _checked(parse_price, value)
        return price

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        name: str = _checked(clean_name, value)
        return name

    @field_validator("description")
    @classmethod
    def _description(cls, value: str) -> str:
        description: str = _checked(clean_description, value)
        return description

    @field_validator("skuCode")
    @classmethod
    def _sku_code(cls, value: str | None) -> str | None:
        if value is None:
            return None
        sku_code: str = _checked(clean_sku_code, value)
        return sku_code

    @field_validator("category")
    @classmethod
    def _category(cls, value: str | None) -> str:
        category: str = _checked(clean_category, value)
        return category

    def draft(self) -> ProductDraft:
        return ProductDraft.of(
            name=self.name,
            description=self.description,
            price=self.price,
            sku_code=self.skuCode,
            category=self.category,
        )


class ProductView(BaseModel):
    id: str = Field(description="24 hexadecimal digits (MongoDB ObjectId form).")
    name: str
    description: str
    price: str = Field(description="Two decimal places.", examples=["1299.00"])
    skuCode: str
    category: str
    createdAt: str = Field(examples=["2025-01-01T12:00:00.000Z"])

    @classmethod
    def of(cls, product: Product) -> ProductView:
        return cls(**product.document())


class CatalogueEntry(BaseModel):
    """What the order service needs of a product to price an order line."""

    id: str
    skuCode: str
    name: str
    price: str

    @classmethod
    def of(cls, product: Product) -> CatalogueEntry:
        return cls(**_catalogue_entry(product))


def _catalogue_entry(product: Product) -> dict[str, str]:
    # The body CatalogueEntry documents, written directly: the lean look-up skips
    # validating a model of what the store has just read.
    return {
        "id": product.id,
        "skuCode": product.sku_code,
        "name": product.name,
        "price": format_price(product.price),
    }


async def get_products(request: Request) -> ProductService:
    # A coroutine: FastAPI runs a plain function dependency in its thread pool, a thread
    # hand-over per request for an attribute read.
    service: ProductService = request.app.state.products
    return service


Products = Annotated[ProductService, Depends(get_products)]

router = APIRouter(prefix="/api/product", tags=["product"])
internal = APIRouter(prefix="/internal", tags=["internal"])
# Prices at the moment of ordering: the order service is the one caller this lookup has.
ORDER_SERVICE = internal_caller("order-service")
OrderServiceCaller = Annotated[Principal, Depends(ORDER_SERVICE)]
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such product"}}
_ADMIN: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid token"},
    403: {"description": "Not an admin"},
}


@router.get("", response_model=list[ProductView])
async def browse_catalogue(
    products: Products,
    response: Response,
    q: Annotated[
        str | None,
        Query(
            max_length=MAX_QUERY_TEXT,
            description="Text found in the name or description, ignoring case.",
        ),
        AfterValidator(_search_term),
    ] = None,
    category: Annotated[
        str | None,
        Query(max_length=MAX_CATEGORY, description="Exact category, ignoring case."),
        AfterValidator(_search_term),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> list[ProductView]:
    query = CatalogueQuery(
        text=q or None,
        category=category or None,
        limit=limit,
        offset=offset,
    )
    page = await products.browse(query)
    response.headers["X-Total-Count"] = str(page.total)
    return [ProductView.of(p) for p in page.products]


@router.get("/{product_id}", response_model=ProductView, responses=_NOT_FOUND)
async def show_product(product_id: str, products: Products) -> ProductView:
    return ProductView.of(await products.product(product_id))


@router.post(
    "",
    status_code=201,
    response_model=ProductView,
    responses={**_ADMIN, 409: {"description": "skuCode taken"}},
)
async def add_product(
    _admin: AdminUser, body: ProductForm, products: Products, response: Response
) -> ProductView:
    product = await products.add_product(body.draft())
    response.headers["Location"] = f"{router.prefix}/{product.id}"
    return ProductView.of(product)


@router.put(
    "/{product_id}",
    response_model=ProductView,
    responses={**_ADMIN, **_NOT_FOUND, 409: {"description": "skuCode of another product"}},
)
async def revise_product(
    _admin: AdminUser, product_id: str, body: ProductForm, products: Products
) -> ProductView:
    return ProductView.of(await products.revise_product(product_id, body.draft()))


@router.delete("/{product_id}", status_code=204, responses={**_ADMIN, **_NOT_FOUND})
async def remove_product(_admin: AdminUser, product_id: str, products: Products) -> Response:
    await products.remove_product(product_id)
    return Response(status_code=204)


@internal.get(
    "/products",
    response_model=list[CatalogueEntry],
    summary="Products by SKU code, for the order service (unknown SKUs are left out)",
    responses={
        401: {"description": "No valid token"},
        403: {"description": "Not order-service's token"},
    },
)
async def products_by_sku(
    _caller: OrderServiceCaller,
    products: Products,
    sku_code: Annotated[list[str] | None, Query(alias="skuCode")] = None,
    sku_codes: Annotated[list[str] | None, Query(alias="skuCodes")] = None,
) -> list[CatalogueEntry]:
    codes = sku_codes_from_query([*(sku_code or ()), *(sku_codes or ())])
    return [CatalogueEntry.of(p) for p in await products.products_with_sku_codes(codes)]


async def products_by_sku_lean(request: LeanRequest) -> Reply:
    """``products_by_sku`` as the lean path serves it (platform/fastpath.py), the price
    look-up of every order the catalogue prices: the caller's token first, then the codes
    (read from the query string as Starlette reads it: latin-1, blanks kept; every
    ``skuCode`` before every ``skuCodes``, as the route passes them on)."""
    await ORDER_SERVICE.admit_in(request.app.state.runtime, request.header(b"authorization"))
    pairs = parse_qsl(request.query.decode("latin-1"), keep_blank_values=True)
    asked = [value for key, value in pairs if key == "skuCode"]
    asked += [value for key, value in pairs if key == "skuCodes"]
    products: ProductService = request.app.state.products
    found = await products.products_with_sku_codes(sku_codes_from_query(asked))
    return json_reply([_catalogue_entry(p) for p in found])


def _problem_for(exc: Exception) -> Problem:
    match exc:
        case ProductNotFound():
            return Problem(404, "There is no product with this id.")
        case SkuTaken(sku_code=sku_code):
            return Problem(
                409,
                f"Another product already has skuCode {sku_code!r}.",
                extra={"skuCode": sku_code},
            )
        case InvalidProduct(errors=errors):
            return Problem(422, "The request is not valid; see errors.", errors=errors)
        case _:
            return Problem(400, str(exc))


def install_error_answers(app: FastAPI) -> None:
    async def on_product_error(request: Request, exc: Exception) -> Response:
        return from_problem(_problem_for(exc), instance=request.url.path)

    app.add_exception_handler(ProductError, on_product_error)
