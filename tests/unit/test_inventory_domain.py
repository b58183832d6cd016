"""Rules of the inventory: SKU codes, queries, reservation lines, shortages, replays."""

from __future__ import annotations

import pytest

from shop.inventory.domain import (
    MAX_QUANTITY,
    MAX_SKUS_PER_QUERY,
    OutOfStock,
    Reservation,
    ReservationAsk,
    ReservationConflict,
    ReservationLine,
    ReservationStatus,
    Shortage,
    StockLevel,
    in_lock_order,
    line_problems,
    normalise_order_number,
    order_number_problem,
    quantity_problem,
    replay,
    settle,
    shortages,
    sku_code_problem,
    sku_codes_from_query,
    stock_levels,
)

ORDER = "3f2b8c1e-9a4d-4c1b-8f0e-2d7a6b5c4e3f"


@pytest.mark.parametrize("code", ["iphone_15", "A", "sku-1.2_X", "x" * 64])
def test_acceptable_sku_codes(code: str) -> None:
    assert sku_code_problem(code) is None


@pytest.mark.parametrize("code", ["", "x" * 65, "has space", "semi;colon", "ünï", "a/b", "a\n"])
def test_malformed_sku_codes(code: str) -> None:
    assert sku_code_problem(code) is not None


def test_quantity_bounds() -> None:
    assert quantity_problem(1) is None
    assert quantity_problem(MAX_QUANTITY) is None
    assert quantity_problem(0) == "must be at least 1"
    assert quantity_problem(-3) == "must be at least 1"
    assert quantity_problem(MAX_QUANTITY + 1) is not None
    assert quantity_problem(0, allow_zero=True) is None
    assert quantity_problem(-1, allow_zero=True) == "must be at least 0"


def test_order_numbers_are_uuids_in_one_spelling() -> None:
    assert order_number_problem(ORDER) is None
    assert order_number_problem(ORDER.upper()) is None
    for bad in ["", "42", ORDER.replace("-", ""), "{" + ORDER + "}", ORDER + "0", "g" * 36]:
        assert order_number_problem(bad) is not None, bad
    assert normalise_order_number(ORDER.upper()) == ORDER


def test_query_accepts_repeats_and_commas_keeps_first_asked_order() -> None:
    codes, problems = sku_codes_from_query(["pixel_8,iphone_15", " galaxy_s24 ", "pixel_8", "a,"])
    assert problems == {}
    assert codes == ["pixel_8", "iphone_15", "galaxy_s24", "a"]


@pytest.mark.parametrize("values", [[], [""], [" , "]])
def test_query_without_a_sku_is_refused(values: list[str]) -> None:
    assert sku_codes_from_query(values) == ([], {"skuCode": "give at least one SKU code"})


def test_query_names_the_malformed_sku() -> None:
    codes, problems = sku_codes_from_query(["ok", "bad sku"])
    assert codes == []
    assert "'bad sku'" in problems["skuCode"]


def test_query_size_is_capped_after_removing_repeats() -> None:
    many = [f"sku{i}" for i in range(MAX_SKUS_PER_QUERY)]
    assert sku_codes_from_query([*many, *many])[0] == many
    assert "at most" in sku_codes_from_query([*many, "one_more"])[1]["skuCode"]


def test_stock_levels_list_unknown_skus_as_out_of_stock() -> None:
    levels = stock_levels(["b", "unknown", "a"], {"a": 3, "b": 0})
    assert levels == [StockLevel("b", 0), StockLevel("unknown", 0), StockLevel("a", 3)]
    assert [level.in_stock for level in levels] == [False, False, True]


def test_valid_lines_have_no_problems() -> None:
    assert line_problems([ReservationLine("a", 1), ReservationLine("b", MAX_QUANTITY)]) == {}


def test_line_problems_name_each_field() -> None:
    problems = line_problems(
        [
            ReservationLine("a", 1),
            ReservationLine("b", 0),
            ReservationLine("a", 2),
            ReservationLine("bad sku", -1),
        ]
    )
    assert problems == {
        "lines.1.quantity": "must be at least 1",
        "lines.2.skuCode": "a appears in more than one line",
        "lines.3.skuCode": "must be 1-64 characters of letters, digits, '_', '.' or '-'",
        "lines.3.quantity": "must be at least 1",
    }


def test_no_lines_or_too_many_lines() -> None:
    assert line_problems([]) == {"lines": "give at least one line"}
    many = [ReservationLine(f"s{i}", 1) for i in range(101)]
    assert line_problems(many) == {"lines": "at most 100 lines"}


def test_lock_order_is_the_same_whatever_order_lines_come_in() -> None:
    one = [ReservationLine("b", 1), ReservationLine("a", 2), ReservationLine("c", 3)]
    other = [ReservationLine("c", 3), ReservationLine("b", 1), ReservationLine("a", 2)]
    assert in_lock_order(one) == in_lock_order(other)
    assert [line.sku_code for line in in_lock_order(one)] == ["a", "b", "c"]


def test_shortages_list_every_short_line_with_what_is_available() -> None:
    lines = [ReservationLine("a", 5), ReservationLine("b", 2), ReservationLine("ghost", 1)]
    assert shortages(lines, {"a": 4, "b": 2}) == [Shortage("a", 5, 4), Shortage("ghost", 1, 0)]
    assert shortages(lines, {"a": 5, "b": 9, "ghost": 1}) == []


def test_a_replay_answers_the_first_reservation_in_the_lines_order_asked() -> None:
    stored = Reservation(
        ORDER, ReservationStatus.RESERVED, (ReservationLine("a", 1), ReservationLine("b", 2))
    )
    asked = [ReservationLine("b", 2), ReservationLine("a", 1)]
    assert replay(stored, asked) == Reservation(ORDER, ReservationStatus.RESERVED, tuple(asked))


@pytest.mark.parametrize(
    "asked",
    [
        [ReservationLine("a", 2)],
        [ReservationLine("a", 1), ReservationLine("b", 1)],
        [ReservationLine("c", 1)],
    ],
)
def test_a_replay_with_other_lines_conflicts(asked: list[ReservationLine]) -> None:
    stored = Reservation(ORDER, ReservationStatus.RESERVED, (ReservationLine("a", 1),))
    with pytest.raises(ReservationConflict, match="other lines"):
        replay(stored, asked)


def test_a_released_reservation_cannot_be_replayed() -> None:
    stored = Reservation(ORDER, ReservationStatus.RELEASED, (ReservationLine("a", 1),))
    with pytest.raises(ReservationConflict, match="released"):
        replay(stored, [ReservationLine("a", 1)])


def test_settle_decides_in_arrival_order_each_request_all_or_nothing() -> None:
    other = "0f2b8c1e-9a4d-4c1b-8f0e-2d7a6b5c4e3f"
    stored = Reservation(other, ReservationStatus.RELEASED, (ReservationLine("a", 1),))
    asks = [
        ReservationAsk(ORDER, (ReservationLine("a", 2), ReservationLine("b", 1))),
        ReservationAsk("1f2b8c1e-9a4d-4c1b-8f0e-2d7a6b5c4e3f", (ReservationLine("a", 2),)),
        ReservationAsk(other, (ReservationLine("a", 1),)),
        ReservationAsk(ORDER, (ReservationLine("b", 1), ReservationLine("a", 2))),
        ReservationAsk("2f2b8c1e-9a4d-4c1b-8f0e-2d7a6b5c4e3f", (ReservationLine("a", 1),)),
    ]
    settled = settle(asks, available={"a": 3, "b": 1}, known={other: stored})

    first = Reservation(ORDER, ReservationStatus.RESERVED, asks[0].lines)
    assert settled.outcomes[0] == first
    short = settled.outcomes[1]
    assert isinstance(short, OutOfStock)
    assert short.shortages == (Shortage("a", 2, 1),)
    assert isinstance(settled.outcomes[2], ReservationConflict)  # released: refused
    assert settled.outcomes[3] == Reservation(ORDER, ReservationStatus.RESERVED, asks[3].lines)
    last = Reservation(asks[4].order_number, ReservationStatus.RESERVED, asks[4].lines)
    assert settled.outcomes[4] == last
    assert settled.new == [first, last]
    assert settled.taken == {"a": 3, "b": 1}
