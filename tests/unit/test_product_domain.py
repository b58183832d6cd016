"""Catalogue rules: prices, product ids, what a valid product is."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from shop.product.domain import (
    DEMO_CATALOGUE,
    InvalidField,
    InvalidProduct,
    Product,
    ProductDraft,
    ProductIds,
    derive_sku_code,
    format_price,
    format_timestamp,
    is_product_id,
    parse_price,
    sku_code_candidates,
    sku_codes_from_query,
    truncate_to_millis,
)

MOMENT = datetime(2025, 3, 1, 12, 30, 45, 123456, tzinfo=UTC)


@pytest.mark.parametrize(
    ("given", "price"),
    [
        ("1299.00", "1299.00"),
        ("19.9", "19.90"),
        ("5", "5.00"),
        ("0.01", "0.01"),
        ("1.500", "1.50"),
        ("9999999999.99", "9999999999.99"),
        (19.99, "19.99"),
        (0.1, "0.10"),
        (1e2, "100.00"),
        (9999999999.99, "9999999999.99"),
        (42, "42.00"),
        (Decimal("3.10"), "3.10"),
    ],
)
def test_accepted_prices_are_exact_with_two_places(given: object, price: str) -> None:
    assert format_price(parse_price(given)) == price


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        (19.999, "at most two decimal places"),
        ("19.999", "at most two decimal places"),
        (0.001, "at most two decimal places"),
        (math.nan, "finite"),
        (math.inf, "finite"),
        (Decimal("NaN"), "finite"),
        (-5, "greater than 0"),
        ("-5.00", "greater than 0"),
        (0, "greater than 0"),
        ("0.00", "greater than 0"),
        (10**10, "less than 10000000000"),
        ("10000000000", "less than 10000000000"),
        (1e300, "less than 10000000000"),
        ("9" * 60, "less than 10000000000"),
        ("abc", "decimal string"),
        ("1e3", "decimal string"),
        (" 12.00", "decimal string"),
        ("12,50", "decimal string"),
        ("", "decimal string"),
        (True, "decimal string"),
        (None, "decimal string"),
        ([12], "decimal string"),
    ],
)
def test_refused_prices_say_why(given: object, problem: str) -> None:
    with pytest.raises(InvalidField, match=problem):
        parse_price(given)


def test_format_price_never_uses_an_exponent() -> None:
    assert format_price(Decimal("1E+2")) == "100.00"
    assert format_price(Decimal("7")) == "7.00"


def test_product_ids_have_the_object_id_shape_and_timestamp() -> None:
    product_id = ProductIds().new(MOMENT)
    assert is_product_id(product_id)
    assert len(product_id) == 24
    assert int(product_id[:8], 16) == int(MOMENT.timestamp())


def test_product_ids_of_one_source_increase_and_never_repeat() -> None:
    ids = ProductIds()
    made = [ids.new(MOMENT) for _ in range(1000)]
    later = ids.new(MOMENT + timedelta(seconds=1))
    assert len(set(made)) == 1000
    # The counter may wrap once in 2^24; within a thousand ids it almost never does.
    assert sum(a < b for a, b in zip(made, made[1:], strict=False)) >= 998
    assert later > max(made)  # the timestamp leads: a later second sorts after


def test_two_sources_differ_in_their_random_part() -> None:
    a, b = ProductIds().new(MOMENT), ProductIds().new(MOMENT)
    assert a[8:18] != b[8:18]


@pytest.mark.parametrize(
    "value",
    [
        "",
        "65f1c0ffee0123456789abc",
        "65F1C0FFEE0123456789ABCD",
        "65f1c0ffee0123456789abcg",
        "1" * 25,
    ],
)
def test_malformed_product_ids(value: str) -> None:
    assert not is_product_id(value)


def test_timestamps_are_utc_milliseconds_with_z() -> None:
    assert format_timestamp(MOMENT) == "2025-03-01T12:30:45.123Z"
    assert truncate_to_millis(MOMENT).microsecond == 123000


def _draft(**overrides: object) -> ProductDraft:
    fields: dict[str, object] = {
        "name": "Pixel 8",
        "description": "A phone.",
        "price": "899.00",
        "sku_code": "pixel_8",
        **overrides,
    }
    return ProductDraft.of(**fields)  # type: ignore[arg-type]


def test_draft_trims_text_and_defaults_the_category() -> None:
    draft = _draft(name="  Pixel 8 ", description="  ")
    assert (draft.name, draft.description, draft.category) == ("Pixel 8", "", "general")
    assert _draft(category=" Phones ").category == "Phones"


def test_every_broken_field_is_named_at_once() -> None:
    with pytest.raises(InvalidProduct) as caught:
        _draft(
            name=" ",
            description="x" * 5001,
            price="12.345",
            sku_code="has space",
            category="c" * 101,
        )
    assert caught.value.errors == {
        "name": "must not be blank",
        "description": "must be at most 5000 characters",
        "price": "must have at most two decimal places",
        "skuCode": "must be 1-64 characters of letters, digits, '_', '.' or '-'",
        "category": "must be at most 100 characters",
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "n" * 201),
        ("name", "nul\x00byte"),
        ("description", "lone \ud800 surrogate"),
        ("category", ""),
        ("sku_code", ""),
        ("sku_code", "s" * 65),
        ("sku_code", "ümlaut"),
    ],
)
def test_invalid_fields(field: str, value: str) -> None:
    with pytest.raises(InvalidProduct):
        _draft(**{field: value})


def test_limits_are_inclusive() -> None:
    draft = _draft(name="n" * 200, description="line\nbreak\ttab" + "d" * 4986, sku_code="S" * 64)
    assert len(draft.name) == 200 and len(draft.description) == 5000


def test_revising_keeps_id_and_creation_time() -> None:
    product = Product.new(_draft(), id="65f1c0ffee0123456789abcd", created_at=MOMENT)
    revised = product.revised(_draft(name="Pixel 8a", price=499, sku_code="pixel_8a"))
    assert revised.document() == {
        "id": "65f1c0ffee0123456789abcd",
        "name": "Pixel 8a",
        "description": "A phone.",
        "price": "499.00",
        "skuCode": "pixel_8a",
        "category": "general",
        "createdAt": "2025-03-01T12:30:45.123Z",
    }


def test_sku_codes_from_query_split_dedupe_and_limit() -> None:
    assert sku_codes_from_query(["a,b", "a", " c "]) == ["a", "b", "c"]
    with pytest.raises(InvalidProduct, match="at least one"):
        sku_codes_from_query([" , "])
    with pytest.raises(InvalidProduct, match="letters, digits"):
        sku_codes_from_query(["ok", "not ok"])
    with pytest.raises(InvalidProduct, match="at most 100"):
        sku_codes_from_query([f"sku{i}" for i in range(101)])
    assert len(sku_codes_from_query([f"sku{i % 100}" for i in range(300)])) == 100


def test_demo_catalogue_is_valid_and_matches_the_inventory_skus() -> None:
    for draft in DEMO_CATALOGUE:
        assert (
            ProductDraft.of(
                name=draft.name,
                description=draft.description,
                price=draft.price,
                sku_code=draft.sku_code,
                category=draft.category,
            )
            == draft
        )
    assert {d.sku_code: format_price(d.price) for d in DEMO_CATALOGUE} == {
        "iphone_15": "1299.00",
        "pixel_8": "899.00",
        "galaxy_s24": "999.00",
        "airpods_pro": "249.00",
        "kindle_paperwhite": "139.99",
    }


@pytest.mark.parametrize(
    ("name", "sku_code"),
    [
        ("iPhone 15", "iphone_15"),
        ("AirPods Pro (2nd generation)", "airpods_pro_2nd_generation"),
        ("Écran 4K « pro » 📺", "ecran_4k_pro"),
        ("Straße", "strasse"),
        ("Œuvre Ærø Łódź", "oeuvre_aero_lodz"),
        ("ﬁne ＰＲＩＮＴ １５", "fine_print_15"),
        ("  --C++/C#--  ", "c_c"),
        ("東京", "product"),
        ("!!!", "product"),
    ],
)
def test_a_derived_sku_code_is_the_names_slug(name: str, sku_code: str) -> None:
    assert derive_sku_code(name, taken=()) == sku_code
    ProductDraft.of(name=name, description="", price="1.00", sku_code=sku_code)  # valid


def test_a_taken_slug_gets_a_number_then_random_characters() -> None:
    assert sku_code_candidates("Pixel 8")[:3] == ["pixel_8", "pixel_8_2", "pixel_8_3"]
    assert derive_sku_code("Pixel 8", taken={"pixel_8"}) == "pixel_8_2"
    assert derive_sku_code("Pixel 8", taken={"pixel_8", "pixel_8_2"}) == "pixel_8_3"
    every = set(sku_code_candidates("Pixel 8"))
    assert len(every) == 9
    assert derive_sku_code("Pixel 8", taken=every, noise="x7k2qa") == "pixel_8_x7k2qa"
    random = derive_sku_code("Pixel 8", taken=every)
    assert random.startswith("pixel_8_") and len(random) == len("pixel_8_") + 6
    with pytest.raises(ValueError, match="noise"):
        derive_sku_code("Pixel 8", taken=every, noise="Not/OK")


def test_a_long_name_leaves_room_for_any_suffix() -> None:
    name = "Extraordinarily " * 20
    base = derive_sku_code(name, taken=())
    assert len(base) <= 57 and not base.endswith("_")
    for code in [
        *sku_code_candidates(name),
        derive_sku_code(name, taken=sku_code_candidates(name)),
    ]:
        assert len(code) <= 64
        ProductDraft.of(name=name[:200], description="", price="1.00", sku_code=code)


def test_a_draft_without_sku_code_cannot_become_a_product_but_revises_one() -> None:
    draft = _draft(sku_code=None)
    assert draft.sku_code is None
    with pytest.raises(ValueError, match="SKU code"):
        Product.new(draft, id="65f1c0ffee0123456789abcd", created_at=MOMENT)
    product = Product.new(
        draft.with_sku_code("pixel_8"), id="65f1c0ffee0123456789abcd", created_at=MOMENT
    )
    assert product.revised(_draft(sku_code=None, name="Pixel 8a")).sku_code == "pixel_8"
