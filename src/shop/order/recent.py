"""The last orders this process placed or cancelled, for the operations console
(docs/console.md "Recent orders"): a small ring in memory, served on the service's own port
at ``GET /operations/recent-orders``, next to ``/metrics``, never routed by the gateway.

Each entry says what an operator needs to find the order's trace and nothing about who
bought it: no user id, no e-mail.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shop.order.domain import Order, money, timestamp

__all__ = ["RECENT_ORDERS_PATH", "RecentOrder", "RecentOrders"]

RECENT_ORDERS_PATH = "/operations/recent-orders"
# The console shows the latest 20 of all instances: the newest 20 overall are each among the
# newest 20 of the instance that took them, so 20 per process is enough.
DEFAULT_SIZE = 20


@dataclass(frozen=True, slots=True)
class RecentOrder:
    order_number: str
    status: str  # PLACED or CANCELLED: what happened at ``at``
    total: str
    lines: int
    at: str  # when it happened (placement or cancel), ISO 8601 UTC
    trace_id: str | None  # of the request that placed (or cancelled) it

    def as_json(self) -> dict[str, Any]:
        return {
            "orderNumber": self.order_number,
            "status": self.status,
            "total": self.total,
            "lines": self.lines,
            "at": self.at,
            "traceId": self.trace_id,
        }


class RecentOrders:
    """A bounded ring: the oldest entry drops out when a new one comes in. Written and read
    on the event loop only (no lock needed). On the order path a record is one append: the
    entry is shaped (total, time as text) only when the console asks."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        if size < 1:
            raise ValueError("a ring of recent orders holds at least one")
        self._ring: deque[tuple[Order, datetime, str | None]] = deque(maxlen=size)

    def record(self, order: Order, *, at: datetime, trace_id: str | None) -> None:
        self._ring.append((order, at, trace_id))

    def latest(self) -> list[RecentOrder]:
        """Newest first."""
        return [
            RecentOrder(
                order_number=order.order_number,
                status=order.status.value,
                total=money(order.total),
                lines=len(order.lines),
                at=timestamp(at),
                trace_id=trace_id,
            )
            for order, at, trace_id in reversed(self._ring)
        ]
