"""Use cases of the inventory service: one method per thing a caller (or the start-up) does."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter

from shop.inventory.domain import (
    InventoryError,
    MalformedProductEvent,
    OutOfStock,
    Reservation,
    ReservationConflict,
    ReservationLine,
    StockBusy,
    StockLevel,
    line_problems,
    listed_sku_code,
    normalise_order_number,
    order_number_problem,
    stock_levels,
)
from shop.inventory.store import InventoryStore
from shop.platform.events import Event

__all__ = ["InvalidRequest", "InventoryService", "ReservationMetrics"]

log = logging.getLogger("shop.inventory")


def _utcnow() -> datetime:
    return datetime.now(UTC)


class InvalidRequest(InventoryError):
    """The request breaks a rule of the domain; ``errors`` says which field, and why."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = dict(errors)


class ReservationMetrics:
    """``shop_reservations_total`` and ``shop_reservations_refused_total{reason}``; a refusal
    with reason ``out_of_stock`` is an oversell the inventory prevented.

    Children resolved once: on the reservation path a count is one ``inc()``.
    """

    REASONS: dict[type[InventoryError], str] = {
        OutOfStock: "out_of_stock",
        ReservationConflict: "conflict",
        StockBusy: "busy",
        InvalidRequest: "invalid",
    }

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.reserved = Counter(
            "shop_reservations",
            "Reservations answered 201 (an idempotent repeat included)",
            registry=registry,
        )
        refused = Counter(
            "shop_reservations_refused",
            "Reservations refused, by reason",
            ["reason"],
            registry=registry,
        )
        self._refused = {kind: refused.labels(reason) for kind, reason in self.REASONS.items()}
        self._other = refused.labels("other")

    def refused(self, error: InventoryError) -> None:
        self._refused.get(type(error), self._other).inc()


class InventoryService:
    def __init__(
        self,
        *,
        store: InventoryStore,
        clock: Callable[[], datetime] = _utcnow,
        metrics: ReservationMetrics | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._metrics = metrics if metrics is not None else ReservationMetrics()

    async def stock_levels(self, sku_codes: Sequence[str]) -> list[StockLevel]:
        return stock_levels(sku_codes, await self._store.quantities(sku_codes))

    async def all_stock_levels(self, *, limit: int, offset: int) -> tuple[list[StockLevel], int]:
        """Every SKU the inventory knows (stocked, or listed by the catalogue), by SKU code,
        one page of them; and how many there are."""
        return await self._store.all_levels(limit=limit, offset=offset)

    async def on_product_event(self, event: Event) -> None:
        """Handler of the ``products`` topic: a product's SKU is known from the moment the
        catalogue lists it, with 0 units until stock comes in. Raises only when nothing was
        recorded, so the bus delivers the event again."""
        try:
            sku_code = listed_sku_code(event.type, event.data)
        except MalformedProductEvent as exc:
            # Redelivering cannot repair the data; the producer has to. Log and move on.
            log.error("ignoring event %s (subject %s): %s", event.id, event.subject, exc)
            return
        if sku_code is None:
            return
        if await self._store.register_sku(sku_code, event_id=event.id, now=self._clock()):
            log.info("SKU %s is in the catalogue (%s)", sku_code, event.type)

    async def add_stock(self, sku_code: str, quantity: int) -> StockLevel:
        total = await self._store.add_stock(sku_code, quantity, now=self._clock())
        log.info("stock of %s +%d = %d", sku_code, quantity, total)
        return StockLevel(sku_code, total)

    async def set_stock(self, sku_code: str, quantity: int) -> StockLevel:
        total = await self._store.set_stock(sku_code, quantity, now=self._clock())
        log.info("stock of %s set to %d", sku_code, total)
        return StockLevel(sku_code, total)

    async def reserve(self, order_number: str, lines: Sequence[ReservationLine]) -> Reservation:
        """Raises InvalidRequest, OutOfStock, ReservationConflict or StockBusy; each answer
        is counted."""
        try:
            problems = line_problems(lines)
            if problem := order_number_problem(order_number):
                problems = {"orderNumber": problem, **problems}
            if problems:
                raise InvalidRequest(problems)
            reservation = await self._store.reserve(
                normalise_order_number(order_number), lines, now=self._clock()
            )
        except InventoryError as error:
            self._metrics.refused(error)
            raise
        self._metrics.reserved.inc()
        return reservation

    async def release(self, order_number: str) -> None:
        if problem := order_number_problem(order_number):
            raise InvalidRequest({"orderNumber": problem})
        order_number = normalise_order_number(order_number)
        if await self._store.release(order_number, now=self._clock()):
            log.info("reservation of order %s released", order_number)

    async def seed_demo_stock(self, levels: Mapping[str, int]) -> None:
        if await self._store.seed_if_empty(levels, now=self._clock()):
            log.info("stocked the demo SKUs: %s", ", ".join(levels))
