"""The order service's ring of recent orders (order/recent.py): bounded, newest first, and
nothing in it that names the buyer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from shop.order.domain import Order, OrderLine, OrderStatus
from shop.order.recent import RecentOrders

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def _order(number: int, *, lines: int = 2) -> Order:
    return Order(
        order_number=f"00000000-0000-4000-8000-{number:012d}",
        user_id="a4c1e2f0-0000-4000-8000-000000000001",
        buyer_email="ada@example.com",
        status=OrderStatus.PLACED,
        lines=tuple(
            OrderLine(sku_code=f"sku_{i}", quantity=2, unit_price=Decimal("9.99"))
            for i in range(lines)
        ),
        created_at=T0,
    )


def test_the_latest_orders_come_newest_first_and_the_oldest_drop_out() -> None:
    recent = RecentOrders(size=3)
    for n in range(5):
        recent.record(_order(n), at=T0 + timedelta(seconds=n), trace_id=f"{n:032x}")
    assert [entry.order_number[-1] for entry in recent.latest()] == ["4", "3", "2"]
    assert [entry.trace_id for entry in recent.latest()] == [f"{n:032x}" for n in (4, 3, 2)]


def test_an_entry_says_what_happened_when_and_in_which_trace_and_nothing_of_the_buyer() -> None:
    recent = RecentOrders()
    placed = _order(7, lines=3)
    recent.record(placed, at=T0, trace_id="ab" * 16)
    recent.record(placed.cancelled(), at=T0 + timedelta(minutes=5), trace_id=None)
    cancel, place = (entry.as_json() for entry in recent.latest())
    assert place == {
        "orderNumber": placed.order_number,
        "status": "PLACED",
        "total": "59.94",
        "lines": 3,
        "at": "2026-12-01T10:00:00.000Z",
        "traceId": "ab" * 16,
    }
    assert cancel["status"] == "CANCELLED" and cancel["at"] == "2026-12-01T10:05:00.000Z"
    assert cancel["traceId"] is None
    shown = repr(recent.latest())
    assert placed.user_id not in shown and placed.buyer_email not in shown


def test_an_empty_ring_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        RecentOrders(size=0)
