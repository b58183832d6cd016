"""What a notification says and which events call for one: pure rules, no I/O."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from shop.notification.domain import (
    MalformedOrder,
    compose_message,
    message_id,
    notification_type,
    read_order,
    retry_delay,
)
from shop.notification.settings import NotificationSettings


def order_data(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "orderNumber": "5d1f6c1e-0c1a-4c57-9a3e-2f0d3b9a7e11",
        "status": "PLACED",
        "userId": "u-1",
        "email": "ada@example.com",
        "lines": [
            {"skuCode": "iphone_15", "quantity": 2, "unitPrice": "1299.00", "lineTotal": "2598.00"},
            {"skuCode": "airpods_pro", "quantity": 1, "unitPrice": "249.00", "lineTotal": "249.00"},
        ],
        "total": "2847.00",
        "createdAt": "2025-01-01T10:00:00.000Z",
    }
    data.update(overrides)
    return data


@pytest.mark.parametrize(
    ("event_type", "kind"),
    [
        ("order.placed", "ORDER_PLACED"),
        ("order.cancelled", "ORDER_CANCELLED"),
        ("order.shipped", None),
        ("product.created", None),
        ("ORDER.PLACED", None),
    ],
)
def test_only_placed_and_cancelled_orders_are_notified(event_type: str, kind: str | None) -> None:
    assert notification_type(event_type) == kind


def test_placed_message_names_the_order_the_total_and_every_line() -> None:
    order = read_order(order_data())
    message = compose_message(order, "ORDER_PLACED")
    assert "5d1f6c1e-0c1a-4c57-9a3e-2f0d3b9a7e11" in message.subject
    assert "2847.00" in message.subject
    assert "placed" in message.subject
    assert "Total: 2847.00" in message.body
    assert "2 x iphone_15 at 1299.00 = 2598.00" in message.body
    assert "1 x airpods_pro at 249.00 = 249.00" in message.body


def test_cancelled_message_says_cancelled() -> None:
    message = compose_message(read_order(order_data(status="CANCELLED")), "ORDER_CANCELLED")
    assert "cancelled" in message.subject
    assert "placed" not in message.subject
    assert "5d1f6c1e-0c1a-4c57-9a3e-2f0d3b9a7e11" in message.body
    assert "Total: 2847.00" in message.body


def test_money_is_shown_with_two_places() -> None:
    order = read_order(order_data(total="139.9", lines=[{"skuCode": "kindle", "quantity": 1}]))
    assert order.total == Decimal("139.90")
    assert "Total: 139.90" in compose_message(order, "ORDER_PLACED").body
    assert "1 x kindle\n" in compose_message(order, "ORDER_PLACED").body


@pytest.mark.parametrize(
    "overrides",
    [
        {"orderNumber": None},
        {"orderNumber": ""},
        {"orderNumber": "abc\r\nBcc: eve@example.com"},
        {"userId": 42},
        {"email": None},
        {"email": "not-an-address"},
        {"email": "ada@example.com\nBcc: eve@example.com"},
        {"email": "ada@example.com, eve@example.com"},
        {"total": 2847.0},
        {"total": "lots"},
        {"total": "-1.00"},
        {"total": "NaN"},
        {"total": "1e300"},
        {"total": "Infinity"},
        {"lines": "iphone_15"},
        {"lines": [{"skuCode": "iphone_15", "quantity": 0}]},
        {"lines": [{"skuCode": "iphone_15", "quantity": True}]},
        {"lines": [{"quantity": 1}]},
        {"lines": [{"skuCode": "iphone_15", "quantity": 1, "lineTotal": 12.5}]},
    ],
)
def test_malformed_orders_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(MalformedOrder):
        read_order(order_data(**overrides))


def test_message_id_is_stable_per_event_and_distinct_between_events() -> None:
    first = message_id("e-1", sender="shop@shop.example")
    assert first == message_id("e-1", sender="shop@shop.example")
    assert first != message_id("e-2", sender="shop@shop.example")
    assert first.startswith("<") and first.endswith("@shop.example>")
    assert "\n" not in message_id("e\n1", sender="shop")


def test_retry_back_off_doubles_up_to_the_cap() -> None:
    delays = [retry_delay(n, base_s=5.0, max_s=60.0) for n in range(1, 7)]
    assert delays == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    assert retry_delay(10_000, base_s=5.0, max_s=600.0) == 600.0


def test_settings_treat_an_empty_smtp_host_as_no_email() -> None:
    assert not NotificationSettings(_env_file=None, smtp_host="  ").sends_email
    assert NotificationSettings(_env_file=None, smtp_host="mail.example").sends_email


def test_settings_refuse_a_claim_shorter_than_a_send() -> None:
    with pytest.raises(ValueError, match="claim_s"):
        NotificationSettings(_env_file=None, smtp_timeout_s=30, claim_s=10)
