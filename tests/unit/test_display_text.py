"""Names people read in lists (users', products') refuse characters that hide or reorder
what they display: NUL and other controls, and bidirectional overrides ("Trojan Source")."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from shop.auth.domain import name_problem
from shop.product.domain import (
    InvalidField,
    clean_category,
    clean_description,
    clean_name,
)

# U+202A-U+202E (embeddings, overrides, pop) and U+2066-U+2069 (isolates).
BIDI_CONTROLS = [chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))]
HIDING = ["\x00", *BIDI_CONTROLS]


@pytest.mark.parametrize("char", HIDING, ids=lambda c: f"U+{ord(c):04X}")
def test_a_user_name_with_a_hiding_character_is_refused(char: str) -> None:
    assert name_problem(f"Ada{char}Lovelace") is not None


def test_ordinary_user_names_pass_in_any_script() -> None:
    for name in ("Ada Lovelace", "Zoë O'Brien", "محمد", "李小龙", "José-María"):
        assert name_problem(name) is None
    assert name_problem("   ") == "must not be blank"


@pytest.mark.parametrize("char", HIDING, ids=lambda c: f"U+{ord(c):04X}")
@pytest.mark.parametrize("clean", [clean_name, clean_description, clean_category])
def test_product_text_with_a_hiding_character_is_refused(
    clean: Callable[[str], str], char: str
) -> None:
    with pytest.raises(InvalidField):
        clean(f"Phone {char}gpj.exe")


def test_product_text_keeps_right_to_left_letters_and_description_lines() -> None:
    assert clean_name("هاتف 15") == "هاتف 15"
    assert clean_description("line one\nline two\ttabbed") == "line one\nline two\ttabbed"
