"""Rules of the inventory service: SKU codes, stock levels, reservations and shortages.

No I/O here. ``quantity`` of a SKU is what can still be ordered: reserving moves units
out of it into a reservation, releasing moves them back. Units held by reservations are
therefore never counted twice, and "in stock" means "at least one unit can be ordered".
"""

from __future__ import annotations

import enum
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

__all__ = [
    "DEMO_STOCK",
    "MAX_LINES",
    "MAX_QUANTITY",
    "MAX_SKUS_PER_QUERY",
    "InventoryError",
    "MalformedProductEvent",
    "OutOfStock",
    "Reservation",
    "ReservationConflict",
    "ReservationAsk",
    "ReservationLine",
    "ReservationStatus",
    "Settlement",
    "Shortage",
    "StockBusy",
    "StockLevel",
    "in_lock_order",
    "line_problems",
    "listed_sku_code",
    "normalise_order_number",
    "order_number_problem",
    "quantity_problem",
    "replay",
    "settle",
    "shortages",
    "sku_code_problem",
    "sku_codes_from_query",
    "stock_levels",
]

MAX_SKUS_PER_QUERY = 100
MAX_LINES = 100
# Far above any real order or delivery, far below a BIGINT: totals cannot overflow in practice.
MAX_QUANTITY = 1_000_000_000
_SKU_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_ORDER_NUMBER = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)

# The catalogue the product service seeds in the embedded profile, with stock to order from.
DEMO_STOCK: Mapping[str, int] = {
    "iphone_15": 100,
    "pixel_8": 50,
    "galaxy_s24": 30,
    "airpods_pro": 200,
    "kindle_paperwhite": 0,
}


class InventoryError(Exception):
    """A use case refused; the API turns each kind into its status code."""


@dataclass(frozen=True, slots=True)
class StockLevel:
    sku_code: str
    quantity: int

    @property
    def in_stock(self) -> bool:
        return self.quantity > 0


@dataclass(frozen=True, slots=True)
class ReservationLine:
    sku_code: str
    quantity: int


class ReservationStatus(enum.StrEnum):
    RESERVED = "RESERVED"
    RELEASED = "RELEASED"


@dataclass(frozen=True, slots=True)
class Reservation:
    order_number: str
    status: ReservationStatus
    lines: tuple[ReservationLine, ...]


@dataclass(frozen=True, slots=True)
class Shortage:
    sku_code: str
    requested: int
    available: int


class OutOfStock(InventoryError):
    def __init__(self, shortages: Sequence[Shortage]) -> None:
        super().__init__(", ".join(s.sku_code for s in shortages) + " short")
        self.shortages = tuple(shortages)


class MalformedProductEvent(ValueError):
    """A catalogue event whose data names no well-formed SKU code."""


class StockBusy(InventoryError):
    """The database kept breaking ties against this request; it changed nothing."""


class ReservationConflict(InventoryError):
    """The order number already names a different, or a released, reservation."""


def sku_code_problem(value: str) -> str | None:
    if not _SKU_CODE.fullmatch(value):
        return "must be 1-64 characters of letters, digits, '_', '.' or '-'"
    return None


def quantity_problem(value: int, *, allow_zero: bool = False) -> str | None:
    low = 0 if allow_zero else 1
    if value < low:
        return f"must be at least {low}"
    if value > MAX_QUANTITY:
        return f"must be at most {MAX_QUANTITY}"
    return None


def order_number_problem(value: str) -> str | None:
    if not _ORDER_NUMBER.fullmatch(value):
        return "must be a UUID (8-4-4-4-12 hexadecimal digits)"
    return None


def normalise_order_number(value: str) -> str:
    """One spelling per order: ``ABC...`` and ``abc...`` are the same reservation."""
    return str(uuid.UUID(value))


def sku_codes_from_query(values: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """SKU codes asked for (repeated and/or comma-separated), first-asked order, no repeats.

    Returns the codes and the problems found (``{}`` when the query is usable).
    """
    codes: list[str] = []
    for value in values:
        codes += [part.strip() for part in value.split(",") if part.strip()]
    if not codes:
        return [], {"skuCode": "give at least one SKU code"}
    bad = [code for code in codes if sku_code_problem(code)]
    if bad:
        shown = ", ".join(repr(code[:70]) for code in bad[:5])
        return [], {"skuCode": f"{shown}: {sku_code_problem(bad[0])}"}
    unique = list(dict.fromkeys(codes))
    if len(unique) > MAX_SKUS_PER_QUERY:
        return [], {"skuCode": f"at most {MAX_SKUS_PER_QUERY} SKU codes per request"}
    return unique, {}


def stock_levels(sku_codes: Sequence[str], known: Mapping[str, int]) -> list[StockLevel]:
    """One level per code asked, in the order asked; a SKU never stocked has none."""
    return [StockLevel(code, known.get(code, 0)) for code in sku_codes]


# Catalogue events (topic ``products``) after which the product's SKU is in the catalogue.
_LISTING_EVENTS = frozenset({"product.created", "product.updated"})


def listed_sku_code(event_type: str, data: Mapping[str, Any]) -> str | None:
    """The SKU code a catalogue event puts in the catalogue: a created product's, or a
    revised one's (its SKU may have changed); None for an event that lists none (a
    deletion leaves the stock alone). Raises MalformedProductEvent."""
    if event_type not in _LISTING_EVENTS:
        return None
    sku_code = data.get("skuCode")
    if not isinstance(sku_code, str) or sku_code_problem(sku_code):
        raise MalformedProductEvent(f"{event_type} without a valid skuCode: {sku_code!r:.80}")
    return sku_code


def line_problems(lines: Sequence[ReservationLine]) -> dict[str, str]:
    """Why these lines cannot make a reservation (``{}`` when they can), per field path."""
    if not lines:
        return {"lines": "give at least one line"}
    if len(lines) > MAX_LINES:
        return {"lines": f"at most {MAX_LINES} lines"}
    problems: dict[str, str] = {}
    seen: set[str] = set()
    for index, line in enumerate(lines):
        if problem := sku_code_problem(line.sku_code):
            problems[f"lines.{index}.skuCode"] = problem
        elif line.sku_code in seen:
            problems[f"lines.{index}.skuCode"] = f"{line.sku_code} appears in more than one line"
        seen.add(line.sku_code)
        if problem := quantity_problem(line.quantity):
            problems[f"lines.{index}.quantity"] = problem
    return problems


def in_lock_order(lines: Iterable[ReservationLine]) -> list[ReservationLine]:
    """Every transaction locks stock rows in this one order, so two never wait on each other."""
    return sorted(lines, key=lambda line: line.sku_code)


def shortages(lines: Iterable[ReservationLine], available: Mapping[str, int]) -> list[Shortage]:
    """The lines that ask for more than is available (an unknown SKU has 0), in line order."""
    found = []
    for line in lines:
        have = available.get(line.sku_code, 0)
        if line.quantity > have:
            found.append(Shortage(line.sku_code, line.quantity, have))
    return found


def _same_lines(a: Iterable[ReservationLine], b: Iterable[ReservationLine]) -> bool:
    return {line.sku_code: line.quantity for line in a} == {
        line.sku_code: line.quantity for line in b
    }


def replay(existing: Reservation, lines: Sequence[ReservationLine]) -> Reservation:
    """A repeated request for ``existing``: the first answer again, or a conflict."""
    if existing.status is not ReservationStatus.RESERVED:
        raise ReservationConflict(
            f"The reservation of order {existing.order_number} was released; "
            "a released order cannot reserve again."
        )
    if not _same_lines(existing.lines, lines):
        raise ReservationConflict(
            f"Order {existing.order_number} already holds a reservation with other lines."
        )
    # The lines as asked, not as stored: an identical request gets a byte-identical answer.
    return replace(existing, lines=tuple(lines))


@dataclass(frozen=True, slots=True)
class ReservationAsk:
    """One request to reserve ``lines`` for an order, as it waits to be applied."""

    order_number: str
    lines: tuple[ReservationLine, ...]


@dataclass(slots=True)
class Settlement:
    """What one transaction applies for a group of requests, and each request's answer."""

    outcomes: list[Reservation | InventoryError]
    new: list[Reservation]
    taken: dict[str, int]


def settle(
    asks: Sequence[ReservationAsk],
    *,
    available: Mapping[str, int],
    known: Mapping[str, Reservation],
) -> Settlement:
    """Decide requests in arrival order against locked stock levels and the reservations
    already stored: each takes every line or none, so a short request leaves what it asked
    for to the ones after it. A repeat of an order number (stored, or earlier in the group)
    is answered by ``replay``; a short request reports the units left at its turn."""
    left = dict(available)
    decided: dict[str, Reservation] = dict(known)
    outcomes: list[Reservation | InventoryError] = []
    new: list[Reservation] = []
    taken: dict[str, int] = {}
    for ask in asks:
        existing = decided.get(ask.order_number)
        if existing is not None:
            try:
                outcomes.append(replay(existing, ask.lines))
            except ReservationConflict as conflict:
                outcomes.append(conflict)
            continue
        short = shortages(ask.lines, left)
        if short:
            outcomes.append(OutOfStock(short))
            continue
        for line in ask.lines:
            left[line.sku_code] -= line.quantity
            taken[line.sku_code] = taken.get(line.sku_code, 0) + line.quantity
        made = Reservation(ask.order_number, ReservationStatus.RESERVED, ask.lines)
        decided[ask.order_number] = made
        new.append(made)
        outcomes.append(made)
    return Settlement(outcomes, new, taken)
