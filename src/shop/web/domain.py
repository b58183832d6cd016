"""What the storefront decides without I/O: which catalogue page a query string asks for,
and how many pages there are."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

__all__ = [
    "LOW_STOCK",
    "MAX_PAGE",
    "BadQuery",
    "CatalogueRequest",
    "Pages",
]

# At or below this many units a product shows "only N left" (the script reads it from the page).
LOW_STOCK = 5
# The public API refuses offsets beyond 10^9; no catalogue gets near.
MAX_PAGE = 10_000
MAX_TEXT = 200
MAX_CATEGORY = 100


class BadQuery(ValueError):
    """A query parameter no page answers to: ``errors`` is field -> message."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = dict(errors)


@dataclass(frozen=True, slots=True)
class CatalogueRequest:
    """A catalogue page as the shopper asked for it (``/?q=&category=&page=``)."""

    text: str = ""
    category: str = ""
    page: int = 1

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> CatalogueRequest:
        errors: dict[str, str] = {}
        text = params.get("q", "").strip()
        category = params.get("category", "").strip()
        raw_page = params.get("page", "1").strip() or "1"
        if len(text) > MAX_TEXT:
            errors["q"] = f"at most {MAX_TEXT} characters"
        if len(category) > MAX_CATEGORY:
            errors["category"] = f"at most {MAX_CATEGORY} characters"
        if any(ord(c) < 32 or ord(c) == 127 for c in text + category):
            errors["q" if any(ord(c) < 32 or ord(c) == 127 for c in text) else "category"] = (
                "must not contain control characters"
            )
        page = 1
        if not raw_page.isascii() or not raw_page.isdigit() or not 1 <= int(raw_page) <= MAX_PAGE:
            errors["page"] = f"must be a whole number from 1 to {MAX_PAGE}"
        else:
            page = int(raw_page)
        if errors:
            raise BadQuery(errors)
        return cls(text=text, category=category, page=page)

    def offset(self, page_size: int) -> int:
        return (self.page - 1) * page_size

    def api_params(self, page_size: int) -> dict[str, str]:
        """The public ``GET /api/product`` parameters for this page."""
        params = {"limit": str(page_size), "offset": str(self.offset(page_size))}
        if self.text:
            params["q"] = self.text
        if self.category:
            params["category"] = self.category
        return params

    def link(self, page: int) -> str:
        """The URL of another page of the same search."""
        params = {"q": self.text, "category": self.category}
        kept = {k: v for k, v in params.items() if v}
        if page != 1:
            kept["page"] = str(page)
        return "/" + (f"?{urlencode(kept)}" if kept else "")


@dataclass(frozen=True, slots=True)
class Pages:
    """Where a page sits among all of a search's results."""

    page: int
    total: int  # products that match, from X-Total-Count
    size: int

    @property
    def count(self) -> int:
        return max(1, math.ceil(self.total / self.size))

    @property
    def has_previous(self) -> bool:
        return self.page > 1

    @property
    def has_next(self) -> bool:
        return self.page < self.count

    @property
    def first_shown(self) -> int:
        return 0 if self.total == 0 else min(self.total, (self.page - 1) * self.size + 1)

    @property
    def last_shown(self) -> int:
        return min(self.total, self.page * self.size)
