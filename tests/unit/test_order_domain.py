"""The order's rules: lines, money, totals, Idempotency-Keys and request fingerprints."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from shop.order.domain import (
    LINES_FIELD,
    MAX_LINES,
    MAX_QUANTITY,
    InvalidOrder,
    Order,
    OrderLine,
    OrderStatus,
    PriceChange,
    RequestedLine,
    cents,
    event_version,
    from_cents,
    idempotency_key_problem,
    line_problems,
    money,
    order_document,
    parse_order_number,
    parse_price,
    price_change,
    price_lines,
    request_fingerprint,
)

CATALOGUE = {"iphone_15": Decimal("1299.00"), "kindle_paperwhite": Decimal("139.99")}


def _order(*lines: OrderLine) -> Order:
    return Order(
        order_number="5f0c6d4e-4a43-4c38-9d58-6f1f1f7a9e01",
        user_id="u-1",
        buyer_email="ada@example.com",
        status=OrderStatus.PLACED,
        lines=lines,
        created_at=datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC),
    )


def test_line_totals_and_the_order_total_are_exact_decimals() -> None:
    order = _order(
        OrderLine("kindle_paperwhite", 3, Decimal("139.99")),
        OrderLine("pen", 7, Decimal("0.10")),
    )
    assert [line.line_total for line in order.lines] == [Decimal("419.97"), Decimal("0.70")]
    assert order.total == Decimal("420.67")  # 0.1 * 7 in floats would not add up to this


def test_money_is_a_string_with_two_places() -> None:
    assert money(Decimal("1299")) == "1299.00"
    assert money(Decimal("0.005")) == "0.01"
    assert money(Decimal("1E+3")) == "1000.00"
    assert money(Decimal("0")) == "0.00"


def test_cents_round_trip() -> None:
    assert cents(Decimal("139.99")) == 13999
    assert from_cents(13999) == Decimal("139.99")
    assert money(from_cents(cents(Decimal("1299.00")))) == "1299.00"


@pytest.mark.parametrize(
    ("raw", "price"),
    [
        ("1299.00", Decimal("1299.00")),
        ("899", Decimal("899.00")),
        (249.5, Decimal("249.50")),
        (0, Decimal("0.00")),
        ("139.999", Decimal("140.00")),
        # The catalogue's own limit: anything it accepts can be ordered.
        ("9999999999.99", Decimal("9999999999.99")),
        (9_999_999_999, Decimal("9999999999.00")),
    ],
)
def test_catalogue_prices_are_read_as_decimals(raw: object, price: Decimal) -> None:
    assert parse_price(raw) == price


@pytest.mark.parametrize(
    "raw",
    ["abc", "-1.00", "NaN", "Infinity", None, True, [], "1e12", "10000000000", "9999999999.995"],
)
def test_unreadable_prices_are_refused(raw: object) -> None:
    assert parse_price(raw) is None


def test_the_document_clients_see() -> None:
    order = _order(OrderLine("iphone_15", 2, Decimal("1299.00")))
    assert order_document(order) == {
        "orderNumber": "5f0c6d4e-4a43-4c38-9d58-6f1f1f7a9e01",
        "status": "PLACED",
        "userId": "u-1",
        "lines": [
            {"skuCode": "iphone_15", "quantity": 2, "unitPrice": "1299.00", "lineTotal": "2598.00"}
        ],
        "total": "2598.00",
        "createdAt": "2025-03-01T12:00:00.123Z",
    }
    assert order_document(order.cancelled())["status"] == "CANCELLED"


def test_created_at_is_written_in_utc() -> None:
    local = datetime(2025, 3, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    order = Order("n", "u", "e", OrderStatus.PLACED, (), local)
    assert order_document(order)["createdAt"] == "2025-03-01T12:00:00.000Z"


def test_good_lines_have_no_problems() -> None:
    lines = [RequestedLine("iphone_15", 1), RequestedLine("pixel_8", MAX_QUANTITY)]
    assert line_problems(lines) == {}


@pytest.mark.parametrize(
    ("lines", "field", "fragment"),
    [
        ([], LINES_FIELD, "at least one line"),
        ([RequestedLine("iphone_15", 0)], f"{LINES_FIELD}.0.quantity", "at least 1"),
        ([RequestedLine("iphone_15", -3)], f"{LINES_FIELD}.0.quantity", "at least 1"),
        (
            [RequestedLine("iphone_15", MAX_QUANTITY + 1)],
            f"{LINES_FIELD}.0.quantity",
            f"at most {MAX_QUANTITY}",
        ),
        (
            [RequestedLine("pixel_8", 1), RequestedLine("pixel_8", 2)],
            f"{LINES_FIELD}.1.skuCode",
            "more than one line",
        ),
        ([RequestedLine("", 1)], f"{LINES_FIELD}.0.skuCode", "1-64 characters"),
        ([RequestedLine("a b", 1)], f"{LINES_FIELD}.0.skuCode", "1-64 characters"),
        (
            [RequestedLine(f"sku{i}", 1) for i in range(MAX_LINES + 1)],
            LINES_FIELD,
            f"at most {MAX_LINES} lines",
        ),
    ],
)
def test_bad_lines_are_named(lines: list[RequestedLine], field: str, fragment: str) -> None:
    problems = line_problems(lines)
    assert fragment in problems[field]


def test_every_bad_line_is_reported_at_once() -> None:
    problems = line_problems(
        [RequestedLine("ok", 1), RequestedLine("ok", 0), RequestedLine("x y", 2000)]
    )
    assert set(problems) == {
        f"{LINES_FIELD}.1.skuCode",
        f"{LINES_FIELD}.1.quantity",
        f"{LINES_FIELD}.2.skuCode",
        f"{LINES_FIELD}.2.quantity",
    }


def test_lines_are_priced_from_the_catalogue() -> None:
    priced = price_lines(
        [RequestedLine("kindle_paperwhite", 2), RequestedLine("iphone_15", 1)], CATALOGUE
    )
    assert priced == (
        OrderLine("kindle_paperwhite", 2, Decimal("139.99")),
        OrderLine("iphone_15", 1, Decimal("1299.00")),
    )


def test_every_unknown_sku_is_named() -> None:
    with pytest.raises(InvalidOrder) as refused:
        price_lines(
            [RequestedLine("nope", 1), RequestedLine("iphone_15", 1), RequestedLine("gone", 2)],
            CATALOGUE,
        )
    assert refused.value.errors == {
        f"{LINES_FIELD}.0.skuCode": "unknown SKU 'nope'",
        f"{LINES_FIELD}.2.skuCode": "unknown SKU 'gone'",
    }
    assert refused.value.detail == "Unknown SKU: nope, gone."


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5F0C6D4E-4A43-4C38-9D58-6F1F1F7A9E01", "5f0c6d4e-4a43-4c38-9d58-6f1f1f7a9e01"),
        ("5f0c6d4e4a434c389d586f1f1f7a9e01", None),  # UUID() takes it; a path must not
        ("not-a-uuid", None),
        ("", None),
    ],
)
def test_order_numbers(value: str, expected: str | None) -> None:
    assert parse_order_number(value) == expected


@pytest.mark.parametrize("key", ["a", "order-2025-03-01/7", "x" * 255, "!~"])
def test_acceptable_idempotency_keys(key: str) -> None:
    assert idempotency_key_problem(key) is None


@pytest.mark.parametrize("key", ["", "x" * 256, "with space", "tab\t", "é"])
def test_unacceptable_idempotency_keys(key: str) -> None:
    assert idempotency_key_problem(key) is not None


def test_fingerprint_is_of_the_lines_asked_for() -> None:
    asked = [RequestedLine("iphone_15", 1), RequestedLine("airpods_pro", 2)]
    assert len(request_fingerprint(asked)) == 64
    # Line order does not make another request (the body's field name and the ignored
    # client prices never reach it).
    assert request_fingerprint(asked) == request_fingerprint(asked[::-1])
    assert request_fingerprint(asked) != request_fingerprint(
        [RequestedLine("iphone_15", 2), RequestedLine("airpods_pro", 2)]
    )
    assert request_fingerprint(asked) != request_fingerprint(asked[:1])
    # SKU codes are case-sensitive, as everywhere in the shop.
    assert request_fingerprint([RequestedLine("a", 1)]) != request_fingerprint(
        [RequestedLine("A", 1)]
    )
    # Not fooled by a SKU that looks like a quantity.
    assert request_fingerprint([RequestedLine("1", 2)]) != request_fingerprint(
        [RequestedLine("2", 1)]
    )


def test_a_catalogue_event_becomes_a_price_change_ordered_by_its_time() -> None:
    product = {"id": "p1", "skuCode": "iphone_15", "price": "1299.00", "name": "iPhone"}
    created = price_change(
        product_id="p1", data=product, deleted=False, time="2026-12-01T02:00:00.123Z"
    )
    assert created == PriceChange("p1", "iphone_15", Decimal("1299.00"), created.version)
    later = price_change(
        product_id="p1", data=product, deleted=False, time="2026-12-01T02:00:00.124Z"
    )
    assert later.version - created.version == 1000  # microseconds
    assert event_version("2026-12-01T02:00:00.123+00:00") == created.version
    # A deletion, or a price the catalogue would never send, cannot price an order.
    assert price_change(product_id="p1", data=product, deleted=True, time="x").price is None
    assert event_version("x") == 0
    broken = price_change(product_id="p1", data={**product, "price": "-1"}, deleted=False, time="x")
    assert broken.price is None and broken.sku_code == "iphone_15"
