"""Routes of the inventory service: the public stock API (SPEC §3) and reservations (SPEC §4)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, Field
from pydantic_core import PydanticCustomError

from shop.inventory.domain import (
    MAX_QUANTITY,
    InventoryError,
    OutOfStock,
    Reservation,
    ReservationConflict,
    ReservationLine,
    StockBusy,
    StockLevel,
    order_number_problem,
    sku_code_problem,
    sku_codes_from_query,
)
from shop.inventory.service import InvalidRequest, InventoryService
from shop.platform.fastpath import LeanRequest, Reply, json_reply
from shop.platform.problems import Problem, from_problem
from shop.platform.security import AdminUser, CurrentUser, internal_caller
from shop.platform.tokens import Principal

__all__ = ["install_error_answers", "internal_router", "reserve_lean", "router"]

VALIDATION_DETAIL = "The request is not valid; see errors."


def _sku_code(value: str) -> str:
    if problem := sku_code_problem(value):
        raise PydanticCustomError("sku_code", problem)
    return value


def _order_number(value: str) -> str:
    if problem := order_number_problem(value):
        raise PydanticCustomError("order_number", problem)
    return value


SkuCode = Annotated[
    str,
    Field(max_length=64, examples=["iphone_15"], description="1-64 of [A-Za-z0-9_.-]"),
    AfterValidator(_sku_code),
]
OrderNumber = Annotated[
    str, Field(max_length=36, description="The order's UUID."), AfterValidator(_order_number)
]
# Strict: "5", 5.5 and true are not quantities.
Units = Annotated[int, Field(strict=True, gt=0, le=MAX_QUANTITY)]
Stock = Annotated[int, Field(strict=True, ge=0, le=MAX_QUANTITY)]


class StockLevelView(BaseModel):
    skuCode: str
    quantity: int = Field(description="Units that can still be ordered.")
    isInStock: bool

    @classmethod
    def of(cls, level: StockLevel) -> StockLevelView:
        return cls(skuCode=level.sku_code, quantity=level.quantity, isInStock=level.in_stock)


class StockView(BaseModel):
    skuCode: str
    quantity: int

    @classmethod
    def of(cls, level: StockLevel) -> StockView:
        return cls(skuCode=level.sku_code, quantity=level.quantity)


class StockAddition(BaseModel):
    skuCode: SkuCode
    quantity: Units = Field(description="Units to add to what is available.")


class StockSetting(BaseModel):
    quantity: Stock = Field(description="Units available from now on.")


class LineBody(BaseModel):
    skuCode: SkuCode
    quantity: Units


class ReservationRequest(BaseModel):
    orderNumber: OrderNumber
    lines: list[LineBody] = Field(description="One line per SKU; all are reserved or none.")


class ReservationView(BaseModel):
    orderNumber: str
    status: Literal["RESERVED"]
    lines: list[LineBody]


async def get_inventory(request: Request) -> InventoryService:
    # async: FastAPI runs a plain function dependency on a worker thread, a hop per request.
    inventory: InventoryService = request.app.state.inventory
    return inventory


InventoryDep = Annotated[InventoryService, Depends(get_inventory)]

router = APIRouter(prefix="/api/inventory", tags=["inventory"])
internal_router = APIRouter(prefix="/internal", tags=["internal"])
# Reservations are the order service's to make and release; no other service's token will do.
ORDER_SERVICE = internal_caller("order-service")
OrderServiceCaller = Annotated[Principal, Depends(ORDER_SERVICE)]

_SKUS = "Repeatable, or comma-separated; up to 100 SKU codes in all."
_LISTING = "Paging of the admin's list of every SKU (no skuCode given)."
MAX_LISTED = 1000
_AUTH: dict[int | str, dict[str, Any]] = {401: {"description": "No valid access token"}}
_ADMIN: dict[int | str, dict[str, Any]] = {**_AUTH, 403: {"description": "Not an admin"}}
_SERVICE: dict[int | str, dict[str, Any]] = {
    **_AUTH,
    403: {"description": "Not order-service's token (users' and other services' are refused)"},
}


@router.get("", response_model=list[StockLevelView], responses=_AUTH)
async def stock_levels(
    request: Request,
    response: Response,
    caller: CurrentUser,
    inventory: InventoryDep,
    # Declared for the docs; read below from the raw query, which keeps the order asked
    # across both names.
    _sku_code: Annotated[list[str], Query(alias="skuCode", description=_SKUS)] = [],  # noqa: B006
    _sku_codes: Annotated[list[str], Query(alias="skuCodes", description=_SKUS)] = [],  # noqa: B006
    limit: Annotated[int, Query(ge=1, le=MAX_LISTED, description=_LISTING)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_QUANTITY, description=_LISTING)] = 0,
) -> list[StockLevelView]:
    """Available units per SKU, in the order asked; a SKU never stocked has 0.

    Without any SKU code, an admin gets every SKU the inventory knows (stocked, or listed
    by the catalogue) by SKU code, a page at a time, with `X-Total-Count`.
    """
    asked = [v for k, v in request.query_params.multi_items() if k in {"skuCode", "skuCodes"}]
    if not asked and caller.is_admin:
        page, total = await inventory.all_stock_levels(limit=limit, offset=offset)
        response.headers["X-Total-Count"] = str(total)
        return [StockLevelView.of(level) for level in page]
    codes, problems = sku_codes_from_query(asked)
    if problems:
        raise Problem(422, VALIDATION_DETAIL, errors=problems)
    return [StockLevelView.of(level) for level in await inventory.stock_levels(codes)]


@router.post("", response_model=StockView, responses=_ADMIN)
async def add_stock(body: StockAddition, _admin: AdminUser, inventory: InventoryDep) -> StockView:
    """Add units to a SKU (creating it); answers the new total."""
    return StockView.of(await inventory.add_stock(body.skuCode, body.quantity))


@router.put("/{skuCode}", response_model=StockView, responses=_ADMIN)
async def set_stock(
    sku_code: Annotated[SkuCode, Path(alias="skuCode")],
    body: StockSetting,
    _admin: AdminUser,
    inventory: InventoryDep,
) -> StockView:
    """Set the units available to order (creating the SKU); reserved units are not touched."""
    return StockView.of(await inventory.set_stock(sku_code, body.quantity))


@internal_router.post(
    "/reservations",
    status_code=201,
    response_model=ReservationView,
    responses={**_SERVICE, 409: {"description": "Short lines, or the order holds another one"}},
)
async def reserve(
    body: ReservationRequest, _caller: OrderServiceCaller, inventory: InventoryDep
) -> Response:
    """Reserve every line or none; a repeat with the same order number answers the same."""
    lines = [ReservationLine(line.skuCode, line.quantity) for line in body.lines]
    reservation = await inventory.reserve(body.orderNumber, lines)
    return JSONResponse(_reservation_document(reservation), status_code=201)


def _reservation_document(reservation: Reservation) -> dict[str, Any]:
    # The body ReservationView documents, written directly: the hot path of every order
    # skips validating and serialising a model of what it has just built.
    return {
        "orderNumber": reservation.order_number,
        "status": "RESERVED",
        "lines": [
            {"skuCode": line.sku_code, "quantity": line.quantity} for line in reservation.lines
        ],
    }


async def reserve_lean(request: LeanRequest) -> Reply:
    """``reserve`` as the lean path serves it (platform/fastpath.py): the caller's token,
    then the body, as FastAPI checks them."""
    await ORDER_SERVICE.admit_in(request.app.state.runtime, request.header(b"authorization"))
    body = request.valid(ReservationRequest)
    inventory: InventoryService = request.app.state.inventory
    reservation = await inventory.reserve(
        body.orderNumber, [ReservationLine(line.skuCode, line.quantity) for line in body.lines]
    )
    return json_reply(_reservation_document(reservation), 201)


@internal_router.delete("/reservations/{orderNumber}", status_code=204, responses=_SERVICE)
async def release(
    order_number: Annotated[OrderNumber, Path(alias="orderNumber")],
    _caller: OrderServiceCaller,
    inventory: InventoryDep,
) -> Response:
    """Return the reserved units to stock; releasing twice, or an unknown order, is a no-op."""
    await inventory.release(order_number)
    return Response(status_code=204)


def _problem_for(exc: Exception) -> Problem:
    match exc:
        case OutOfStock(shortages=short):
            return Problem(
                409,
                "Not enough stock for " + ", ".join(s.sku_code for s in short) + ".",
                title="Out of stock",
                type_="https://shop.dev/problems/out-of-stock",
                extra={
                    "shortages": [
                        {"skuCode": s.sku_code, "requested": s.requested, "available": s.available}
                        for s in short
                    ]
                },
            )
        case ReservationConflict():
            return Problem(409, str(exc))
        case InvalidRequest(errors=errors):
            return Problem(422, VALIDATION_DETAIL, errors=errors)
        case StockBusy():
            return Problem(
                503, "The stock is too busy right now; try again.", headers={"Retry-After": "1"}
            )
        case _:
            return Problem(500)


def install_error_answers(app: FastAPI) -> None:
    async def on_inventory_error(request: Request, exc: Exception) -> Response:
        return from_problem(_problem_for(exc), instance=request.url.path)

    app.add_exception_handler(InventoryError, on_inventory_error)
