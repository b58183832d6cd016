"""Use cases of the order service: place, list, show and cancel orders."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter

from shop.order.domain import (
    AlreadyCancelled,
    IdempotencyKeyReused,
    InvalidOrder,
    Order,
    OrderError,
    OrderNotFound,
    OrderStatus,
    OutOfStock,
    RequestedLine,
    RequestInProgress,
    Unavailable,
    UpstreamRefused,
    line_problems,
    new_order_number,
    order_document,
    parse_order_number,
    price_lines,
    request_fingerprint,
)
from shop.order.events import order_cancelled, order_placed, price_change_of
from shop.order.peers import CIRCUIT_OPEN, Catalogue, Inventory
from shop.order.recent import RecentOrders
from shop.order.store import (
    ClaimOutcome,
    KeyClaim,
    KeyRequest,
    OrderStart,
    OrderStore,
    PendingHold,
    SavedAnswer,
)
from shop.platform import context
from shop.platform.events import Event
from shop.platform.tokens import Principal

__all__ = ["Answer", "OrderMetrics", "OrderService", "StockReleases"]

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


class OrderMetrics:
    """``shop_orders_placed_total`` and ``shop_orders_refused_total{reason}``.

    Every child is resolved here, once: on the order path a count is one ``inc()``.
    """

    REASONS: dict[type[OrderError], str] = {
        InvalidOrder: "invalid",
        OutOfStock: "out_of_stock",
        Unavailable: "unavailable",
        IdempotencyKeyReused: "idempotency_key_reused",
        RequestInProgress: "in_progress",
        UpstreamRefused: "upstream_refused",
    }

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry()
        self.placed = Counter(
            "shop_orders_placed", "Orders placed (replays not counted)", registry=registry
        )
        refused = Counter(
            "shop_orders_refused", "Orders refused, by reason", ["reason"], registry=registry
        )
        self._refused = {kind: refused.labels(reason) for kind, reason in self.REASONS.items()}
        # The breaker's refusals are Unavailable too, but an operator wants them apart.
        self._circuit_open = refused.labels("circuit_open")
        self._other = refused.labels("other")

    def refused(self, error: OrderError) -> None:
        if isinstance(error, Unavailable) and str(error) == CIRCUIT_OPEN:
            self._circuit_open.inc()
        else:
            self._refused.get(type(error), self._other).inc()


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
        metrics: OrderMetrics | None = None,
        owner: str | None = None,
        recent: RecentOrders | None = None,
        prices_from_catalogue: bool = False,
    ) -> None:
        """``owner``: this process's name on the Idempotency-Key claims it holds, kept alive
        by its lease (``owner_lease_name``) so that another process takes its claims over
        as soon as it dies (docs/order.md); None: claims are taken over once stale only.
        ``recent``: where placed and cancelled orders are noted for the console.
        ``prices_from_catalogue``: every order is priced by the catalogue itself, not the
        price list (``ORDER_PRICE_SOURCE=catalogue``, docs/order.md "Prices")."""
        self.recent = recent if recent is not None else RecentOrders()
        self._prices_from_catalogue = prices_from_catalogue
        self._owner = owner
        self._store = store
        self._catalogue = catalogue
        self._inventory = inventory
        self._releases = releases
        # Tells the outbox relay that a commit added events, so they leave at once.
        self._events_added = events_added
        self._stale_after = idempotency_stale_after
        self._release_hold = release_hold
        self._clock = clock
        self._metrics = metrics if metrics is not None else OrderMetrics()

    async def place_order(
        self,
        buyer: Principal,
        lines: Sequence[RequestedLine],
        *,
        idempotency_key: str | None = None,
    ) -> Answer:
        """Raises InvalidOrder, OutOfStock, Unavailable, IdempotencyKeyReused, RequestInProgress
        (see ``_place``); each placed or refused order is counted."""
        try:
            answer = await self._place(buyer, lines, idempotency_key=idempotency_key)
        except OrderError as error:
            self._metrics.refused(error)
            raise
        if not answer.replayed:
            self._metrics.placed.inc()
        return answer

    async def _place(
        self,
        buyer: Principal,
        lines: Sequence[RequestedLine],
        *,
        idempotency_key: str | None = None,
    ) -> Answer:
        """Two transactions when all goes well: the first claims the Idempotency-Key, writes
        the pending release and reads the price list; the second saves the order with its
        event and answer and drops the pending release. Between them, the inventory
        reserves the stock (and the catalogue is asked for the prices the list lacks, or
        for every price when it is the price source).
        """
        if problems := line_problems(lines):
            raise InvalidOrder(problems)
        now = self._clock()
        number = new_order_number()
        key = (
            KeyRequest(
                user_id=buyer.user_id,
                key=idempotency_key,
                fingerprint=request_fingerprint(lines),
                stale_after=self._stale_after,
                owner=self._owner,
                attempt=number,
            )
            if idempotency_key is not None
            else None
        )
        # Fail fast: with the breaker open the order cannot be placed, so ask no one and
        # write nothing; a key already answered is still replayed (one read).
        circuit_wait = self._inventory.unavailable_for_s()
        if circuit_wait:
            known = await self._answered(key) if key is not None else None
            if known is None:
                raise Unavailable(CIRCUIT_OPEN, retry_after_s=circuit_wait)
            started = OrderStart(known, {})
        # Durable before the inventory hears of the order: if this process dies before the
        # save, the reconciler gives the stock back once the hold has passed.
        hold = None if circuit_wait else PendingHold(number, now + self._release_hold)
        sku_codes = [line.sku_code for line in lines]
        if not circuit_wait:
            try:
                started = await self._store.start_order(
                    key=key,
                    hold=hold,
                    # The price list is not read when the catalogue prices every order.
                    sku_codes=() if self._prices_from_catalogue else sku_codes,
                    now=now,
                )
            except Exception as exc:
                log.exception("cannot start order %s", number)
                # Its commit may have happened nonetheless; nothing is reserved yet. The key
                # is left alone: it may be another request's (taken over once ours is gone).
                await self._give_up(number if hold else None, key=None, maybe_reserved=False)
                raise Unavailable(NOT_SAVED, retry_after_s=1.0) from exc
        claim = started.claim
        if claim is not None and claim.abandoned is not None:
            # A dead process's attempt was taken over: its stock goes back now.
            log.info("key of order %s taken over from a process gone", claim.abandoned)
            self._releases.wake()
        if claim is not None and claim.outcome is ClaimOutcome.REPLAY:
            assert claim.status_code is not None and claim.body is not None  # noqa: S101
            return Answer(claim.status_code, claim.body, replayed=True)
        if claim is not None and claim.outcome is ClaimOutcome.MISMATCH:
            raise IdempotencyKeyReused(
                "This Idempotency-Key was already used with a different request body."
            )
        if claim is not None and claim.outcome is ClaimOutcome.IN_PROGRESS:
            raise RequestInProgress(
                "A request with this Idempotency-Key is still in progress; retry shortly."
            )
        # Whether the inventory may hold stock for this order number (a failure then
        # releases it rather than dropping the pending release).
        maybe_reserved = False
        try:
            prices = await self._prices(sku_codes, known=started.prices)
            order = Order(
                order_number=number,
                user_id=buyer.user_id,
                buyer_email=buyer.email,
                status=OrderStatus.PLACED,
                lines=price_lines(lines, prices),
                created_at=now,
            )
            try:
                await self._inventory.reserve(number, lines)
            except Unavailable as exc:
                maybe_reserved = exc.maybe_applied
                raise
            except OutOfStock:
                raise
            except BaseException:
                maybe_reserved = True
                raise
            maybe_reserved = True
            body = order_document(order)
            answer = (
                SavedAnswer(user_id=buyer.user_id, key=key.key, status_code=CREATED, body=body)
                if key is not None
                else None
            )
            try:
                await self._store.save_placed(order, event=order_placed(order), answer=answer)
            except Exception as exc:
                log.exception("order %s reserved but not saved; releasing", number)
                raise Unavailable(NOT_SAVED, retry_after_s=1.0) from exc
        except BaseException:
            # A refused attempt leaves no trace, so the client may retry with the same key.
            await self._give_up(number if hold else None, key=key, maybe_reserved=maybe_reserved)
            raise
        self._events_added()
        self.recent.record(order, at=now, trace_id=_trace_id())
        # One line per order, saying which instance took it: log lines are written by a
        # thread of their own, so this no longer costs the third of the CPU it once did.
        log.info("order %s placed by %s", number, buyer.user_id)
        return Answer(CREATED, body)

    async def _answered(self, key: KeyRequest) -> KeyClaim | None:
        try:
            return await self._store.answered_key(key)
        except Exception as exc:
            log.warning("cannot look up an Idempotency-Key: %s", exc)
            raise Unavailable(NOT_SAVED, retry_after_s=1.0) from exc

    async def _prices(
        self, sku_codes: Sequence[str], *, known: dict[str, Decimal]
    ) -> dict[str, Decimal]:
        """The price list's prices; the catalogue is asked only for the SKUs it lacks (all
        of them when it is the price source: then ``known`` is empty).

        An unreachable catalogue is Unavailable (503) in both cases: the list is no
        fallback, since charging its possibly older price is what the catalogue source is
        chosen to rule out.
        """
        missing = [code for code in sku_codes if code not in known]
        if not missing:
            return known
        return {**known, **await self._catalogue.prices(missing)}

    async def _give_up(
        self, order_number: str | None, *, key: KeyRequest | None, maybe_reserved: bool
    ) -> None:
        # If this fails too (the database is down), the pending release still comes due
        # when the hold ends (a release of nothing leaves a harmless mark at the
        # inventory), and the key is taken over once stale.
        with contextlib.suppress(Exception):
            await self._store.give_up(
                order_number=order_number,
                maybe_reserved=maybe_reserved,
                now=self._clock(),
                key=key,
            )
        if maybe_reserved:
            self._releases.wake()

    async def on_product_event(self, event: Event) -> None:
        """Handler of the catalogue's ``products`` topic: keeps the price list."""
        change = price_change_of(event)
        if change is None:
            return
        if await self._store.apply_price_change(change, event_id=event.id):
            log.debug("price list: %s %s → %s", event.type, change.sku_code, change.price)

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
        self.recent.record(cancelled, at=now, trace_id=_trace_id())
        log.info("order %s cancelled", order.order_number)
        try:
            await self._releases.attempt(order.order_number, guarded=True)
        except Exception:  # the cancel stands; the reconciler finishes the release
            log.exception("release of cancelled order %s left to the reconciler", number)
        return cancelled


def _trace_id() -> str | None:
    """The trace of the request being served (its ``traceparent``'s, or the span's)."""
    trace = context.current_trace()
    return trace.trace_id if trace is not None else None
