"""Notifications as the shop's rules see them: which events deserve one, what it says, when
a failed one is tried again. No I/O here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final, Literal

__all__ = [
    "EVENT_TYPES",
    "Channel",
    "MalformedOrder",
    "Message",
    "Notification",
    "NotificationType",
    "OrderLine",
    "OrderNotice",
    "Status",
    "compose_message",
    "message_id",
    "notification_type",
    "read_order",
    "retry_delay",
    "timestamp",
]

NotificationType = Literal["ORDER_PLACED", "ORDER_CANCELLED"]
Channel = Literal["EMAIL", "LOG"]
# PENDING: recorded, not yet handed over; SENT (e-mail) or LOGGED: done; FAILED: will be
# retried until the attempts run out (then it stays FAILED with no next attempt).
Status = Literal["PENDING", "SENT", "LOGGED", "FAILED"]

EVENT_TYPES: Final[Mapping[str, NotificationType]] = {
    "order.placed": "ORDER_PLACED",
    "order.cancelled": "ORDER_CANCELLED",
}

# Values that end up in mail headers: one line, printable, bounded.
_ONE_LINE = re.compile(r"^[^\x00-\x1f\x7f]{1,64}$")
_EMAIL = re.compile(r"^[^\s@<>,;\"]{1,64}@[^\s@<>,;\"]{1,255}$")
_CENTS = Decimal("0.01")
_TOO_MUCH = Decimal(10) ** 15


class MalformedOrder(ValueError):
    """The event's data is not an order this service can tell anyone about."""


@dataclass(frozen=True, slots=True)
class OrderLine:
    sku_code: str
    quantity: int
    unit_price: Decimal | None
    line_total: Decimal | None


@dataclass(frozen=True, slots=True)
class OrderNotice:
    """What an order event says about the order, as far as telling its buyer goes."""

    order_number: str
    user_id: str
    email: str
    total: Decimal
    lines: tuple[OrderLine, ...]


@dataclass(frozen=True, slots=True)
class Message:
    subject: str
    body: str


@dataclass(frozen=True, slots=True)
class Notification:
    id: str
    event_id: str
    user_id: str
    email: str
    order_number: str
    type: NotificationType
    channel: Channel
    status: Status
    subject: str
    body: str
    created_at: datetime
    attempts: int = 0
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    sent_at: datetime | None = None


def notification_type(event_type: str) -> NotificationType | None:
    """The notification an event calls for; None for events nobody is told about."""
    return EVENT_TYPES.get(event_type)


def _text(data: Mapping[str, Any], field: str, pattern: re.Pattern[str]) -> str:
    value = data.get(field)
    if not isinstance(value, str) or not pattern.match(value):
        raise MalformedOrder(f"{field} is missing or malformed")
    return value


def _money(value: Any, field: str) -> Decimal:
    # Money travels as a decimal string; a float or a bool is a producer bug, not a price.
    if not isinstance(value, str):
        raise MalformedOrder(f"{field} must be a decimal string")
    try:
        amount = Decimal(value)
        if not amount.is_finite() or not 0 <= amount < _TOO_MUCH:
            raise MalformedOrder(f"{field} must be a non-negative amount")
        return amount.quantize(_CENTS)
    except InvalidOperation as exc:
        raise MalformedOrder(f"{field} must be a decimal string") from exc


def _line(raw: Any, index: int) -> OrderLine:
    if not isinstance(raw, Mapping):
        raise MalformedOrder(f"lines[{index}] is not an object")
    sku = _text(raw, "skuCode", _ONE_LINE)
    quantity = raw.get("quantity")
    if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity <= 0:
        raise MalformedOrder(f"lines[{index}].quantity must be a positive integer")
    unit = raw.get("unitPrice")
    total = raw.get("lineTotal")
    return OrderLine(
        sku_code=sku,
        quantity=quantity,
        unit_price=None if unit is None else _money(unit, f"lines[{index}].unitPrice"),
        line_total=None if total is None else _money(total, f"lines[{index}].lineTotal"),
    )


def read_order(data: Mapping[str, Any]) -> OrderNotice:
    """The order in an ``orders`` event (the order plus the buyer's ``email``)."""
    lines = data.get("lines", [])
    if not isinstance(lines, list):
        raise MalformedOrder("lines must be a list")
    return OrderNotice(
        order_number=_text(data, "orderNumber", _ONE_LINE),
        user_id=_text(data, "userId", _ONE_LINE),
        email=_text(data, "email", _EMAIL),
        total=_money(data.get("total"), "total"),
        lines=tuple(_line(raw, i) for i, raw in enumerate(lines)),
    )


def _line_text(line: OrderLine) -> str:
    text = f"  {line.quantity} x {line.sku_code}"
    if line.unit_price is not None:
        text += f" at {line.unit_price}"
    if line.line_total is not None:
        text += f" = {line.line_total}"
    return text


def compose_message(order: OrderNotice, kind: NotificationType) -> Message:
    lines = "\n".join(_line_text(line) for line in order.lines) or "  (no lines)"
    if kind == "ORDER_PLACED":
        subject = f"Your order {order.order_number} is placed (total {order.total})"
        opening = f"Thank you for your order {order.order_number}. We have placed it:"
    else:
        subject = f"Your order {order.order_number} is cancelled (total {order.total})"
        opening = f"Your order {order.order_number} has been cancelled. It held:"
    body = f"Hello,\n\n{opening}\n\n{lines}\n\nTotal: {order.total}\n\n-- Shop\n"
    return Message(subject=subject, body=body)


def message_id(event_id: str, *, sender: str) -> str:
    """One Message-ID per event: a mail server that sees it twice may drop the copy."""
    domain = sender.rpartition("@")[2] or "localhost"
    local = re.sub(r"[^A-Za-z0-9.\-]", "-", event_id)
    return f"<order-notice.{local}@{domain}>"


def retry_delay(attempts: int, *, base_s: float, max_s: float) -> float:
    """Exponential back-off after the ``attempts``-th failed attempt (1, 2, ...)."""
    return float(min(base_s * 2 ** min(max(attempts - 1, 0), 30), max_s))


def timestamp(moment: datetime) -> str:
    """How times leave the service: ISO 8601 in UTC with a ``Z``."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
