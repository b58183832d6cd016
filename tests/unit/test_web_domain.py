"""The storefront's decisions without I/O: which catalogue page a query asks for, its API
parameters and links, and where a page sits among the results."""

from __future__ import annotations

import pytest

from shop.web.domain import MAX_PAGE, BadQuery, CatalogueRequest, Pages


def test_a_plain_visit_is_the_first_page_of_everything() -> None:
    query = CatalogueRequest.parse({})
    assert query == CatalogueRequest(text="", category="", page=1)
    assert query.api_params(12) == {"limit": "12", "offset": "0"}
    assert query.link(1) == "/"


def test_search_category_and_page_become_the_public_api_parameters() -> None:
    query = CatalogueRequest.parse({"q": "  lamp ", "category": "home & garden", "page": "3"})
    assert query.api_params(12) == {
        "limit": "12",
        "offset": "24",
        "q": "lamp",
        "category": "home & garden",
    }
    # Links to other pages keep the search, encoded.
    assert query.link(4) == "/?q=lamp&category=home+%26+garden&page=4"
    assert query.link(1) == "/?q=lamp&category=home+%26+garden"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"page": "0"}, "page"),
        ({"page": "-1"}, "page"),
        ({"page": "two"}, "page"),
        ({"page": "١"}, "page"),  # a digit, but not an ASCII one
        ({"page": str(MAX_PAGE + 1)}, "page"),
        ({"q": "x" * 201}, "q"),
        ({"q": "lamp\x00"}, "q"),
        ({"category": "c" * 101}, "category"),
        ({"category": "home\x1b"}, "category"),
    ],
)
def test_what_no_page_answers_to_is_refused_naming_the_field(
    params: dict[str, str], field: str
) -> None:
    with pytest.raises(BadQuery) as refused:
        CatalogueRequest.parse(params)
    assert list(refused.value.errors) == [field]


def test_an_empty_page_parameter_is_the_first_page() -> None:
    assert CatalogueRequest.parse({"page": ""}).page == 1


def test_pages_say_what_is_shown_and_where_to_go() -> None:
    middle = Pages(page=2, total=30, size=12)
    assert (middle.count, middle.first_shown, middle.last_shown) == (3, 13, 24)
    assert middle.has_previous and middle.has_next
    last = Pages(page=3, total=30, size=12)
    assert (last.first_shown, last.last_shown, last.has_next) == (25, 30, False)
    nothing = Pages(page=1, total=0, size=12)
    assert (nothing.count, nothing.first_shown, nothing.last_shown) == (1, 0, 0)
    assert not nothing.has_previous and not nothing.has_next
