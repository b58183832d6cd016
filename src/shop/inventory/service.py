"""Use cases of the inventory service: one method per thing a caller (or the start-up) does."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

from shop.inventory.domain import (
    InventoryError,
    Reservation,
    ReservationLine,
    StockLevel,
    line_problems,
    normalise_order_number,
    order_number_problem,
    stock_levels,
)
from shop.inventory.store import InventoryStore

__all__ = ["InvalidRequest", "InventoryService"]

log = logging.getLogger("shop.inventory")


def _utcnow() -> datetime:
    return datetime.now(UTC)


class InvalidRequest(InventoryError):
    """The request breaks a rule of the domain; ``errors`` says which field, and why."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = dict(errors)


class InventoryService:
    def __init__(self, *, store: InventoryStore, clock: Callable[[], datetime] = _utcnow) -> None:
        self._store = store
        self._clock = clock

    async def stock_levels(self, sku_codes: Sequence[str]) -> list[StockLevel]:
        return stock_levels(sku_codes, await self._store.quantities(sku_codes))

    async def add_stock(self, sku_code: str, quantity: int) -> StockLevel:
        total = await self._store.add_stock(sku_code, quantity, now=self._clock())
        log.info("stock of %s +%d = %d", sku_code, quantity, total)
        return StockLevel(sku_code, total)

    async def set_stock(self, sku_code: str, quantity: int) -> StockLevel:
        total = await self._store.set_stock(sku_code, quantity, now=self._clock())
        log.info("stock of %s set to %d", sku_code, total)
        return StockLevel(sku_code, total)

    async def reserve(self, order_number: str, lines: Sequence[ReservationLine]) -> Reservation:
        """Raises InvalidRequest, OutOfStock, ReservationConflict or StockBusy."""
        problems = line_problems(lines)
        if problem := order_number_problem(order_number):
            problems = {"orderNumber": problem, **problems}
        if problems:
            raise InvalidRequest(problems)
        return await self._store.reserve(
            normalise_order_number(order_number), lines, now=self._clock()
        )

    async def release(self, order_number: str) -> None:
        if problem := order_number_problem(order_number):
            raise InvalidRequest({"orderNumber": problem})
        order_number = normalise_order_number(order_number)
        if await self._store.release(order_number, now=self._clock()):
            log.info("reservation of order %s released", order_number)

    async def seed_demo_stock(self, levels: Mapping[str, int]) -> None:
        if await self._store.seed_if_empty(levels, now=self._clock()):
            log.info("stocked the demo SKUs: %s", ", ".join(levels))
