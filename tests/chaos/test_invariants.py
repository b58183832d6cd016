"""The chaos tests' judges, on books made up by hand: each breach they exist to catch is
reported, and balanced books are not (a judge that cannot fail would make every chaos
test pass)."""

from __future__ import annotations

from collections import Counter

from tests.chaos.ledger import Conservation, notification_problems


def books(*, left: int, placed: dict[str, int], reserved: dict[str, int]) -> Conservation:
    return Conservation(stocked=10, left=left, placed=placed, reserved=reserved)


def test_balanced_books_have_no_problem() -> None:
    balanced = books(left=7, placed={"a": 1, "b": 2}, reserved={"a": 1, "b": 2})
    assert balanced.problems({"a": 1}) == []


def test_each_breach_of_the_books_is_reported() -> None:
    oversold = books(left=0, placed={"a": 6, "b": 5}, reserved={"a": 6, "b": 5})
    assert any("oversold: 11 units of 10" in p for p in oversold.problems({}))
    negative = books(left=-1, placed={"a": 11}, reserved={"a": 11})
    assert any("stock below zero" in p for p in negative.problems({}))
    lost = books(left=9, placed={"a": 1}, reserved={"a": 1})
    assert any("answered 201 but not placed" in p for p in lost.problems({"a": 1, "b": 2}))
    unreserved = books(left=9, placed={"a": 1, "b": 2}, reserved={"a": 1})
    assert any("without their reservation" in p for p in unreserved.problems({}))
    orphan = books(left=7, placed={"a": 1}, reserved={"a": 1, "b": 2})
    assert any("without a placed order" in p for p in orphan.problems({}))
    leaked = books(left=5, placed={"a": 1}, reserved={"a": 1})
    assert any("units not conserved" in p for p in leaked.problems({}))


def test_missing_and_repeated_notifications_are_reported() -> None:
    placed = {"a", "b", "c"}
    assert notification_problems(placed, Counter({"a": 1, "b": 1, "c": 1}), {"a"}) == []
    problems = notification_problems(placed, Counter({"a": 2, "b": 1}), {"a", "z"})
    assert len(problems) == 3
    assert "answered 201 are not in the order store" in problems[0]
    assert "1 of 3 placed orders never notified: ['c']" in problems[1]
    assert "notified more than once: {'a': 2}" in problems[2]
