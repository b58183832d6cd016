"""Rules of the order service: order lines, money, totals, idempotency keys. No I/O here.

Money is ``Decimal`` from the catalogue's string to the order's JSON; it becomes a decimal
string with two places only at the edge (``money``), and whole cents only in the store.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

__all__ = [
    "LINES_FIELD",
    "MAX_LINES",
    "MAX_QUANTITY",
    "PRICE_LIMIT",
    "AlreadyCancelled",
    "IdempotencyKeyReused",
    "InvalidOrder",
    "Order",
    "OrderError",
    "OrderLine",
    "OrderNotFound",
    "OrderStatus",
    "OutOfStock",
    "PriceChange",
    "RequestInProgress",
    "RequestedLine",
    "Shortage",
    "Unavailable",
    "UpstreamRefused",
    "cents",
    "event_version",
    "from_cents",
    "idempotency_key_problem",
    "line_problems",
    "money",
    "new_order_number",
    "order_document",
    "parse_order_number",
    "parse_price",
    "price_change",
    "price_lines",
    "request_fingerprint",
    "timestamp",
]

# The field name of the reference's request body; errors name lines by it.
LINES_FIELD = "orderLineItemDtoList"
MAX_LINES = 100
# Far above any basket, low enough that a typo (10000 for 10) is refused, not reserved.
MAX_QUANTITY = 1000
CENT = Decimal("0.01")
# The catalogue's own bound (product-service accepts prices < 10^10). Totals still fit a
# BIGINT of cents: 100 lines x 1000 units x 10^12 cents = 10^17 < 9.2 x 10^18.
PRICE_LIMIT = Decimal(10) ** 10
_SKU_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# The fingerprint's canonical JSON, its encoder built once rather than per request.
_CANONICAL = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
# RFC 9110 visible ASCII, no spaces: what a header value can carry unambiguously.
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


class OrderStatus(enum.StrEnum):
    PLACED = "PLACED"
    CANCELLED = "CANCELLED"


@dataclass(frozen=True, slots=True)
class RequestedLine:
    """A line as the buyer asks for it: which SKU and how many (no price: the catalogue's)."""

    sku_code: str
    quantity: int


@dataclass(frozen=True, slots=True)
class OrderLine:
    sku_code: str
    quantity: int
    unit_price: Decimal

    @property
    def line_total(self) -> Decimal:
        return (self.unit_price * self.quantity).quantize(CENT, ROUND_HALF_UP)


@dataclass(frozen=True, slots=True)
class Order:
    order_number: str
    user_id: str
    buyer_email: str
    status: OrderStatus
    lines: tuple[OrderLine, ...]
    created_at: datetime

    @property
    def total(self) -> Decimal:
        return sum((line.line_total for line in self.lines), Decimal("0.00"))

    def cancelled(self) -> Order:
        return replace(self, status=OrderStatus.CANCELLED)


@dataclass(frozen=True, slots=True)
class Shortage:
    sku_code: str
    requested: int
    available: int


class OrderError(Exception):
    """A use case refused; the API turns each kind into its status code."""


class InvalidOrder(OrderError):
    """The request breaks a rule; ``errors`` names each field and why (422)."""

    def __init__(self, errors: Mapping[str, str], detail: str | None = None) -> None:
        super().__init__(detail or "; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = dict(errors)
        self.detail = detail


class OutOfStock(OrderError):
    def __init__(self, shortages: Sequence[Shortage]) -> None:
        described = ", ".join(
            f"{s.sku_code} (requested {s.requested}, available {s.available})" for s in shortages
        )
        super().__init__(f"Not enough stock: {described}." if shortages else "Out of stock.")
        self.shortages = tuple(shortages)


class OrderNotFound(OrderError):
    pass


class AlreadyCancelled(OrderError):
    pass


class IdempotencyKeyReused(OrderError):
    """The key was first used with another body."""


class RequestInProgress(OrderError):
    """A request with the same key is still being answered."""


class Unavailable(OrderError):
    """A peer (or our database) cannot answer now; the caller may retry after a while.

    ``maybe_applied``: the request may have reached the peer and been carried out before
    we gave up on it (a timeout, a 5xx), so a reservation may exist.
    """

    def __init__(self, detail: str, *, retry_after_s: float, maybe_applied: bool = False) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s
        self.maybe_applied = maybe_applied


class UpstreamRefused(OrderError):
    """A peer answered, but not in a way this service understands (a bug, not an outage)."""


def money(amount: Decimal) -> str:
    return str(amount.quantize(CENT, ROUND_HALF_UP))


def cents(amount: Decimal) -> int:
    return int(amount.quantize(CENT, ROUND_HALF_UP) * 100)


def from_cents(value: int) -> Decimal:
    return (Decimal(value) / 100).quantize(CENT)


def parse_price(raw: object) -> Decimal | None:
    """A catalogue price (``"1299.00"``, or a JSON number) as Decimal; None if it is not one."""
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        return None
    try:
        price = Decimal(str(raw))
    except InvalidOperation:
        return None
    if not price.is_finite() or price < 0 or price >= PRICE_LIMIT:
        return None
    price = price.quantize(CENT, ROUND_HALF_UP)
    return price if price < PRICE_LIMIT else None


def line_problems(lines: Sequence[RequestedLine]) -> dict[str, str]:
    """Why these lines cannot make an order (``{}`` when they can), per field path."""
    if not lines:
        return {LINES_FIELD: "give at least one line"}
    if len(lines) > MAX_LINES:
        return {LINES_FIELD: f"at most {MAX_LINES} lines"}
    problems: dict[str, str] = {}
    seen: set[str] = set()
    for index, line in enumerate(lines):
        path = f"{LINES_FIELD}.{index}"
        if not _SKU_CODE.fullmatch(line.sku_code):
            problems[f"{path}.skuCode"] = (
                "must be 1-64 characters of letters, digits, '_', '.' or '-'"
            )
        elif line.sku_code in seen:
            problems[f"{path}.skuCode"] = f"{line.sku_code} appears in more than one line"
        seen.add(line.sku_code)
        if line.quantity < 1:
            problems[f"{path}.quantity"] = "must be at least 1"
        elif line.quantity > MAX_QUANTITY:
            problems[f"{path}.quantity"] = f"must be at most {MAX_QUANTITY}"
    return problems


def price_lines(
    lines: Sequence[RequestedLine], catalogue: Mapping[str, Decimal]
) -> tuple[OrderLine, ...]:
    """The order's lines at the catalogue's prices; InvalidOrder naming every unknown SKU."""
    unknown = {
        f"{LINES_FIELD}.{index}.skuCode": f"unknown SKU {line.sku_code!r}"
        for index, line in enumerate(lines)
        if line.sku_code not in catalogue
    }
    if unknown:
        names = ", ".join(line.sku_code for line in lines if line.sku_code not in catalogue)
        raise InvalidOrder(unknown, detail=f"Unknown SKU: {names}.")
    return tuple(
        OrderLine(line.sku_code, line.quantity, catalogue[line.sku_code]) for line in lines
    )


def new_order_number() -> str:
    return str(uuid.uuid4())


def parse_order_number(value: str) -> str | None:
    """The one spelling of an order number, or None when ``value`` is not a UUID."""
    if len(value) != 36:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def idempotency_key_problem(key: str) -> str | None:
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        return "must be 1-255 visible ASCII characters (no spaces)"
    return None


def request_fingerprint(lines: Sequence[RequestedLine]) -> str:
    """SHA-256 of what the request asks for: its lines as (SKU, quantity), sorted by SKU.

    Not of the raw body: ``items`` or ``orderLineItemDtoList``, line order, spacing and the
    ignored client ``price`` do not make another request; a different SKU or quantity does.
    """
    asked = sorted([line.sku_code, line.quantity] for line in lines)
    canonical = _CANONICAL.encode({"lines": asked})
    return hashlib.sha256(canonical.encode()).hexdigest()


def timestamp(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a ``Z``, as every Shop service writes times."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def order_document(order: Order) -> dict[str, Any]:
    """The order as clients (and events) see it."""
    return {
        "orderNumber": order.order_number,
        "status": order.status.value,
        "userId": order.user_id,
        "lines": [
            {
                "skuCode": line.sku_code,
                "quantity": line.quantity,
                "unitPrice": money(line.unit_price),
                "lineTotal": money(line.line_total),
            }
            for line in order.lines
        ],
        "total": money(order.total),
        "createdAt": timestamp(order.created_at),
    }


@dataclass(frozen=True, slots=True)
class PriceChange:
    """What a catalogue event tells the order service's price list (its read model).

    ``price`` None: the product cannot be priced from the list any more (deleted, or an
    unreadable price); orders then ask the catalogue itself. ``version`` orders the changes
    of one product: the event's time in microseconds since the epoch.
    """

    product_id: str
    sku_code: str | None
    price: Decimal | None
    version: int


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def event_version(moment: str) -> int:
    """An event's ``time`` (RFC 3339) as microseconds since the epoch; 0 if unreadable."""
    try:
        at = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    except ValueError:
        return 0
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return (at - _EPOCH) // timedelta(microseconds=1)


def price_change(
    *, product_id: str, data: Mapping[str, Any], deleted: bool, time: str
) -> PriceChange:
    """The price-list change a ``product.*`` event makes (``data``: the product document)."""
    version = event_version(time)
    sku = data.get("skuCode")
    sku_code = sku if isinstance(sku, str) and 0 < len(sku) <= 64 else None
    price = None if deleted or sku_code is None else parse_price(data.get("price"))
    return PriceChange(product_id=product_id, sku_code=sku_code, price=price, version=version)
