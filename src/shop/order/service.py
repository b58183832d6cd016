"""Use cases of the order service: place, list, show and cancel orders."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from shop.order.domain import (
    AlreadyCancelled,
    IdempotencyKeyReused,
    InvalidOrder,
    Order,
    OrderNotFound,
    OrderStatus,
    RequestedLine,
    RequestInProgress,
    Unavailable,
    line_problems,
    new_order_number,
    order_document,
    parse_order_number,
    price_lines,
)
from shop.order.events import order_cancelled, order_placed
from shop.order.peers import CIRCUIT_OPEN, Catalogue, Inventory
from shop.order.store import ClaimOutcome, OrderStore, SavedAnswer
from shop.platform.tokens import Principal

__all__ = ["Answer", "Buyer", "OrderService"]

log = logging.getLogger("shop.order")

CREATED = 201


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Buyer:
    """Who asks, and the credentials to forward to the services asked on their behalf."""

    principal: Principal
    authorization: str | None


@dataclass(frozen=True, slots=True)
class Answer:
    status_code: int
    body: dict[str, Any]
    replayed: bool = False


class OrderService:
    def __init__(
        self,
        *,
        store: OrderStore,
        catalogue: Catalogue,
        inventory: Inventory,
        events_added: Callable[[], None] = lambda: None,
        idempotency_stale_after: timedelta = timedelta(seconds=60),
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._store = store
        self._catalogue = catalogue
        self._inventory = inventory
        # Tells the outbox relay that a commit added events, so they leave at once.
        self._events_added = events_added
        self._stale_after = idempotency_stale_after
        self._clock = clock

    async def place_order(
        self,
        buyer: Buyer,
        lines: Sequence[RequestedLine],
        *,
        idempotency_key: str | None = None,
        fingerprint: str = "",
    ) -> Answer:
        """Raises InvalidOrder, OutOfStock, Unavailable, IdempotencyKeyReused, RequestInProgress."""
        if problems := line_problems(lines):
            raise InvalidOrder(problems)
        user_id = buyer.principal.user_id
        if idempotency_key is None:
            return await self._place(buyer, lines, answer_key=None)
        claim = await self._store.claim_key(
            user_id=user_id,
            key=idempotency_key,
            fingerprint=fingerprint,
            now=self._clock(),
            stale_after=self._stale_after,
        )
        if claim.outcome is ClaimOutcome.REPLAY:
            assert claim.status_code is not None and claim.body is not None  # noqa: S101
            return Answer(claim.status_code, claim.body, replayed=True)
        if claim.outcome is ClaimOutcome.MISMATCH:
            raise IdempotencyKeyReused(
                "This Idempotency-Key was already used with a different request body."
            )
        if claim.outcome is ClaimOutcome.IN_PROGRESS:
            raise RequestInProgress(
                "A request with this Idempotency-Key is still in progress; retry shortly."
            )
        try:
            return await self._place(buyer, lines, answer_key=idempotency_key)
        except BaseException:
            # A refused attempt leaves no trace, so the client may retry with the same key.
            with contextlib.suppress(Exception):
                await self._store.forget_key(user_id=user_id, key=idempotency_key)
            raise

    async def _place(
        self, buyer: Buyer, lines: Sequence[RequestedLine], *, answer_key: str | None
    ) -> Answer:
        principal = buyer.principal
        # Fail fast: with the breaker open the order cannot be placed, so ask no one.
        if wait := self._inventory.unavailable_for_s():
            raise Unavailable(CIRCUIT_OPEN, retry_after_s=wait)
        prices = await self._catalogue.prices(
            [line.sku_code for line in lines], authorization=buyer.authorization
        )
        order = Order(
            order_number=new_order_number(),
            user_id=principal.user_id,
            buyer_email=principal.email,
            status=OrderStatus.PLACED,
            lines=price_lines(lines, prices),
            created_at=self._clock(),
        )
        await self._inventory.reserve(order.order_number, lines, authorization=buyer.authorization)
        body = order_document(order)
        answer = (
            SavedAnswer(user_id=principal.user_id, key=answer_key, status_code=CREATED, body=body)
            if answer_key is not None
            else None
        )
        try:
            await self._store.save_placed(order, event=order_placed(order), answer=answer)
        except Exception as exc:
            log.exception("order %s reserved but not saved; releasing", order.order_number)
            self._inventory.release_later(order.order_number, authorization=buyer.authorization)
            raise Unavailable(
                "The order could not be saved; nothing was ordered. Try again shortly.",
                retry_after_s=1.0,
            ) from exc
        self._events_added()
        log.info("order %s placed by %s", order.order_number, principal.user_id)
        return Answer(CREATED, body)

    async def orders_of(
        self, buyer: Principal, *, limit: int, offset: int
    ) -> tuple[list[Order], int]:
        return await self._store.orders_of(buyer.user_id, limit=limit, offset=offset)

    async def order(self, viewer: Principal, order_number: str) -> Order:
        """The order for its buyer or an admin; OrderNotFound for anyone else."""
        number = parse_order_number(order_number)
        found = await self._store.order(number) if number else None
        if found is None or (found.user_id != viewer.user_id and not viewer.is_admin):
            raise OrderNotFound(f"There is no order {order_number[:40]!r}.")
        return found

    async def cancel_order(self, buyer: Buyer, order_number: str) -> Order:
        """Raises OrderNotFound, AlreadyCancelled, Unavailable (then nothing changed)."""
        number = parse_order_number(order_number)
        order = await self._store.order(number) if number else None
        if order is None or order.user_id != buyer.principal.user_id:
            raise OrderNotFound(f"There is no order {order_number[:40]!r}.")
        if order.status is OrderStatus.CANCELLED:
            raise AlreadyCancelled(f"Order {order.order_number} is already cancelled.")
        # Stock first: if the inventory cannot take it back now, the order stays as it was.
        await self._inventory.release(order.order_number, authorization=buyer.authorization)
        cancelled = order.cancelled()
        if not await self._store.cancel(
            order.order_number, event=order_cancelled(cancelled), now=self._clock()
        ):
            raise AlreadyCancelled(f"Order {order.order_number} is already cancelled.")
        self._events_added()
        log.info("order %s cancelled", order.order_number)
        return cancelled
