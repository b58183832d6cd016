"""Use cases of the order service: place, list, show and cancel orders."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from shop.order.domain import (
    AlreadyCancelled,
    IdempotencyKeyReused,
    InvalidOrder,
    Order,
    OrderNotFound,
    OrderStatus,
    OutOfStock,
    RequestedLine,
    RequestInProgress,
    Unavailable,
    line_problems,
    new_order_number,
    order_document,
    parse_order_number,
    price_lines,
    request_fingerprint,
)
from shop.order.events import order_cancelled, order_placed
from shop.order.peers import CIRCUIT_OPEN, Catalogue, Inventory
from shop.order.store import ClaimOutcome, OrderStore, SavedAnswer
from shop.platform.tokens import Principal

__all__ = ["Answer", "OrderService", "StockReleases"]

log = logging.getLogger("shop.order")

CREATED = 201
NOT_SAVED = "The order could not be saved; nothing was ordered. Try again shortly."


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Answer:
    status_code: int
    body: dict[str, Any]
    replayed: bool = False


class StockReleases(Protocol):
    """The release reconciler, as the use cases see it."""

    def retry_delay(self, attempts: int) -> timedelta: ...

    async def attempt(self, order_number: str, *, guarded: bool) -> object:
        """One call for a release the caller has claimed; failures are left to retries."""

    def wake(self) -> None: ...


class OrderService:
    def __init__(
        self,
        *,
        store: OrderStore,
        catalogue: Catalogue,
        inventory: Inventory,
        releases: StockReleases,
        events_added: Callable[[], None] = lambda: None,
        idempotency_stale_after: timedelta = timedelta(seconds=60),
        release_hold: timedelta = timedelta(seconds=60),
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._store = store
        self._catalogue = catalogue
        self._inventory = inventory
        self._releases = releases
        # Tells the outbox relay that a commit added events, so they leave at once.
        self._events_added = events_added
        self._stale_after = idempotency_stale_after
        self._release_hold = release_hold
        self._clock = clock

    async def place_order(
        self,
        buyer: Principal,
        lines: Sequence[RequestedLine],
        *,
        idempotency_key: str | None = None,
    ) -> Answer:
        """Raises InvalidOrder, OutOfStock, Unavailable, IdempotencyKeyReused, RequestInProgress."""
        if problems := line_problems(lines):
            raise InvalidOrder(problems)
        if idempotency_key is None:
            return await self._place(buyer, lines, answer_key=None)
        claim = await self._store.claim_key(
            user_id=buyer.user_id,
            key=idempotency_key,
            fingerprint=request_fingerprint(lines),
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
                await self._store.forget_key(user_id=buyer.user_id, key=idempotency_key)
            raise

    async def _place(
        self, buyer: Principal, lines: Sequence[RequestedLine], *, answer_key: str | None
    ) -> Answer:
        # Fail fast: with the breaker open the order cannot be placed, so ask no one.
        if wait := self._inventory.unavailable_for_s():
            raise Unavailable(CIRCUIT_OPEN, retry_after_s=wait)
        prices = await self._catalogue.prices([line.sku_code for line in lines])
        order = Order(
            order_number=new_order_number(),
            user_id=buyer.user_id,
            buyer_email=buyer.email,
            status=OrderStatus.PLACED,
            lines=price_lines(lines, prices),
            created_at=self._clock(),
        )
        number = order.order_number
        try:
            # Durable before the inventory hears of the order: if this process dies before
            # the save, the reconciler gives the stock back once the hold has passed.
            await self._store.hold_release(number, due_at=self._clock() + self._release_hold)
        except Exception as exc:
            log.exception("cannot record the pending release of order %s", number)
            raise Unavailable(NOT_SAVED, retry_after_s=1.0) from exc
        try:
            await self._inventory.reserve(number, lines)
        except OutOfStock:
            await self._nothing_reserved(number)
            raise
        except Unavailable as exc:
            if exc.maybe_applied:
                await self._release_soon(number)
            else:
                await self._nothing_reserved(number)
            raise
        except BaseException:
            await self._release_soon(number)
            raise
        body = order_document(order)
        answer = (
            SavedAnswer(user_id=buyer.user_id, key=answer_key, status_code=CREATED, body=body)
            if answer_key is not None
            else None
        )
        try:
            await self._store.save_placed(order, event=order_placed(order), answer=answer)
        except BaseException as exc:
            log.exception("order %s reserved but not saved; releasing", number)
            await self._release_soon(number)
            if isinstance(exc, Exception):
                raise Unavailable(NOT_SAVED, retry_after_s=1.0) from exc
            raise
        self._events_added()
        log.info("order %s placed by %s", number, buyer.user_id)
        return Answer(CREATED, body)

    async def _nothing_reserved(self, order_number: str) -> None:
        # If this fails too, the row comes due later and the release leaves a harmless mark.
        with contextlib.suppress(Exception):
            await self._store.drop_release(order_number)

    async def _release_soon(self, order_number: str) -> None:
        # If this fails too (the database is down), the row still comes due when the hold ends.
        with contextlib.suppress(Exception):
            await self._store.release_due_now(order_number, now=self._clock())
        self._releases.wake()

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

    async def cancel_order(self, buyer: Principal, order_number: str) -> Order:
        """Raises OrderNotFound, AlreadyCancelled.

        The order is CANCELLED, its event and its stock release recorded, in one
        transaction; the release is then tried at once, and if the inventory cannot take
        it now the reconciler keeps trying. The stock comes back either way.
        """
        number = parse_order_number(order_number)
        order = await self._store.order(number) if number else None
        if order is None or order.user_id != buyer.user_id:
            raise OrderNotFound(f"There is no order {order_number[:40]!r}.")
        if order.status is OrderStatus.CANCELLED:
            raise AlreadyCancelled(f"Order {order.order_number} is already cancelled.")
        cancelled = order.cancelled()
        now = self._clock()
        # The release is ours to try first; the reconciler takes it up only if we have not
        # confirmed it by the first retry time (we failed, or this process died).
        if not await self._store.cancel(
            order.order_number,
            event=order_cancelled(cancelled),
            now=now,
            release_retry_at=now + self._releases.retry_delay(1),
        ):
            raise AlreadyCancelled(f"Order {order.order_number} is already cancelled.")
        self._events_added()
        log.info("order %s cancelled", order.order_number)
        try:
            await self._releases.attempt(order.order_number, guarded=True)
        except Exception:  # the cancel stands; the reconciler finishes the release
            log.exception("release of cancelled order %s left to the reconciler", number)
        return cancelled
