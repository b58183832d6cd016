"""Routes of the order service (SPEC §3 Order): parse, call a use case, shape the answer."""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StrictInt

from shop.order.domain import (
    LINES_FIELD,
    AlreadyCancelled,
    IdempotencyKeyReused,
    InvalidOrder,
    OrderError,
    OrderNotFound,
    OutOfStock,
    RequestedLine,
    RequestInProgress,
    Unavailable,
    UpstreamRefused,
    idempotency_key_problem,
    order_document,
)
from shop.order.recent import RECENT_ORDERS_PATH, RecentOrders
from shop.order.service import Answer, OrderService
from shop.platform.fastpath import LeanRequest, Reply, json_reply
from shop.platform.problems import Problem, from_problem
from shop.platform.security import CurrentUser, user_principal

__all__ = [
    "IDEMPOTENCY_IN_PROGRESS",
    "IDEMPOTENCY_MISMATCH",
    "install_error_answers",
    "operations_router",
    "place_order_lean",
    "router",
]

IDEMPOTENCY_KEY = "Idempotency-Key"
# Two 409s a client must tell apart: wait and retry, or stop and use a new key.
IDEMPOTENCY_IN_PROGRESS = "https://shop.dev/problems/idempotency-in-progress"
IDEMPOTENCY_MISMATCH = "https://shop.dev/problems/idempotency-mismatch"


class LineItem(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    sku_code: str = Field(alias="skuCode", max_length=200)
    quantity: StrictInt
    price: Any = Field(
        default=None, description="Ignored: every line is priced from the catalogue."
    )


class PlaceOrderRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lines: list[LineItem] = Field(
        validation_alias=AliasChoices(LINES_FIELD, "items"),
        description=f"The lines to order (``{LINES_FIELD}``, or ``items``).",
    )


class OrderLineView(BaseModel):
    skuCode: str
    quantity: int
    unitPrice: str = Field(examples=["1299.00"])
    lineTotal: str = Field(examples=["2598.00"])


class OrderView(BaseModel):
    orderNumber: str
    status: str = Field(examples=["PLACED"])
    userId: str
    lines: list[OrderLineView]
    total: str = Field(examples=["2598.00"])
    createdAt: str


# async: FastAPI runs a plain ``def`` dependency in a worker thread, a thread hop per request
# (8 % of the order's CPU in py-spy).
async def _service(request: Request) -> OrderService:
    service: OrderService = request.app.state.orders
    return service


Orders = Annotated[OrderService, Depends(_service)]

router = APIRouter(prefix="/api/order", tags=["order"])


def _answer_headers(answer: Answer) -> dict[str, str]:
    headers = {"Location": f"/api/order/{answer.body['orderNumber']}"}
    if answer.replayed:
        headers["Idempotent-Replayed"] = "true"
    return headers


def _order_answer(answer: Answer) -> Response:
    headers = _answer_headers(answer)
    return JSONResponse(answer.body, status_code=answer.status_code, headers=headers)


@router.post(
    "",
    status_code=201,
    response_model=OrderView,
    responses={409: {"description": "Out of stock, or the Idempotency-Key was used otherwise"}},
)
async def place_order(
    placed: PlaceOrderRequest,
    buyer: CurrentUser,
    orders: Orders,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias=IDEMPOTENCY_KEY,
            description="Repeat a request safely: the same key and body get the first answer.",
        ),
    ] = None,
) -> Response:
    if idempotency_key is not None and (problem := idempotency_key_problem(idempotency_key)):
        raise InvalidOrder({IDEMPOTENCY_KEY: problem})
    answer = await orders.place_order(
        buyer,
        [RequestedLine(line.sku_code, line.quantity) for line in placed.lines],
        idempotency_key=idempotency_key,
    )
    return _order_answer(answer)


_IDEMPOTENCY_HEADER = IDEMPOTENCY_KEY.lower().encode("latin-1")


async def place_order_lean(request: LeanRequest) -> Reply:
    """``place_order`` as the lean path serves it (platform/fastpath.py): the same checks in
    the order FastAPI makes them (the body's JSON, the token, the body's shape, the key)."""
    runtime = request.app.state.runtime
    buyer = await user_principal(
        request.header(b"authorization"),
        verifier=runtime.tokens,
        audience=str(runtime.platform.auth_audience),
    )
    placed = request.valid(PlaceOrderRequest)
    idempotency_key = request.header(_IDEMPOTENCY_HEADER)
    if idempotency_key is not None and (problem := idempotency_key_problem(idempotency_key)):
        raise InvalidOrder({IDEMPOTENCY_KEY: problem})
    orders: OrderService = request.app.state.orders
    answer = await orders.place_order(
        buyer,
        [RequestedLine(line.sku_code, line.quantity) for line in placed.lines],
        idempotency_key=idempotency_key,
    )
    return json_reply(answer.body, answer.status_code, _answer_headers(answer))


@router.get("", response_model=list[OrderView])
async def list_orders(
    buyer: CurrentUser,
    orders: Orders,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> Response:
    page, total = await orders.orders_of(buyer, limit=limit, offset=offset)
    return JSONResponse(
        [order_document(order) for order in page], headers={"X-Total-Count": str(total)}
    )


OrderNumber = Annotated[str, Path(alias="orderNumber")]


@router.get("/{orderNumber}", response_model=OrderView, responses={404: {}})
async def get_order(buyer: CurrentUser, orders: Orders, order_number: OrderNumber) -> Response:
    order = await orders.order(buyer, order_number)
    return JSONResponse(order_document(order))


@router.post(
    "/{orderNumber}/cancel",
    response_model=OrderView,
    responses={404: {}, 409: {"description": "Already cancelled"}},
)
async def cancel_order(buyer: CurrentUser, orders: Orders, order_number: OrderNumber) -> Response:
    """Cancel a placed order. Its stock goes back to the inventory: at once, or (if the
    inventory cannot be reached) as soon as it can; the answer is 200 either way."""
    order = await orders.cancel_order(buyer, order_number)
    return JSONResponse(order_document(order))


async def _recent(request: Request) -> RecentOrders:
    recent: RecentOrders = request.app.state.recent_orders
    return recent


# On the service's own port, like /metrics: the gateway routes no such path (docs/console.md).
operations_router = APIRouter(tags=["operations"])


@operations_router.get(RECENT_ORDERS_PATH, include_in_schema=False)
async def recent_orders(recent: Annotated[RecentOrders, Depends(_recent)]) -> Response:
    """The last orders this process placed or cancelled, newest first, for the console."""
    return JSONResponse(
        [entry.as_json() for entry in recent.latest()], headers={"Cache-Control": "no-store"}
    )


def _problem_for(exc: Exception) -> Problem:
    if isinstance(exc, InvalidOrder):
        return Problem(422, exc.detail or "The order is not valid; see errors.", errors=exc.errors)
    if isinstance(exc, OutOfStock):
        shortages = [
            {"skuCode": s.sku_code, "requested": s.requested, "available": s.available}
            for s in exc.shortages
        ]
        return Problem(409, str(exc), title="Out of stock", extra={"shortages": shortages})
    if isinstance(exc, OrderNotFound):
        return Problem(404, str(exc))
    if isinstance(exc, AlreadyCancelled):
        return Problem(409, str(exc))
    if isinstance(exc, IdempotencyKeyReused):
        return Problem(409, str(exc), title="Idempotency-Key reused", type_=IDEMPOTENCY_MISMATCH)
    if isinstance(exc, RequestInProgress):
        return Problem(
            409,
            str(exc),
            title="Request in progress",
            type_=IDEMPOTENCY_IN_PROGRESS,
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, Unavailable):
        retry_after = str(max(1, math.ceil(exc.retry_after_s)))
        return Problem(503, str(exc), headers={"Retry-After": retry_after})
    if isinstance(exc, UpstreamRefused):
        return Problem(502, "A service this order depends on answered unexpectedly.")
    return Problem(500)


def install_error_answers(app: FastAPI) -> None:
    async def on_order_error(request: Request, exc: Exception) -> Response:
        return from_problem(_problem_for(exc), instance=request.url.path)

    app.add_exception_handler(OrderError, on_order_error)
