"""Rules of the catalogue: product ids, prices, what a valid product is. No I/O here."""

from __future__ import annotations

import itertools
import math
import re
import secrets
import unicodedata
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

__all__ = [
    "DEFAULT_CATEGORY",
    "DEMO_CATALOGUE",
    "MAX_OFFSET",
    "MAX_SKUS_PER_LOOKUP",
    "CataloguePage",
    "CatalogueQuery",
    "InvalidField",
    "InvalidProduct",
    "Product",
    "ProductDraft",
    "ProductError",
    "ProductIds",
    "ProductNotFound",
    "SkuTaken",
    "clean_category",
    "clean_description",
    "clean_name",
    "clean_search_term",
    "clean_sku_code",
    "derive_sku_code",
    "format_price",
    "format_timestamp",
    "is_product_id",
    "parse_price",
    "sku_code_candidates",
    "sku_codes_from_query",
    "truncate_to_millis",
]

DEFAULT_CATEGORY = "general"
MAX_NAME = 200
MAX_DESCRIPTION = 5000
MAX_CATEGORY = 100
MAX_SKUS_PER_LOOKUP = 100
# Far beyond any catalogue, far below what a database's OFFSET accepts.
MAX_OFFSET = 1_000_000_000
_PRICE_LIMIT = Decimal(10) ** 10
_CENT = Decimal("0.01")
_PRICE_TEXT = re.compile(r"-?[0-9]+(\.[0-9]+)?")
_PRICE_FORMS = 'must be a decimal string like "19.99" or a JSON number'
MAX_SKU_CODE = 64
_SKU_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# A derived SKU code: the name's slug, then _2 ... _9, then _ and six random characters.
_SKU_NUMBERED = range(2, 10)
_SKU_NOISE = re.compile(r"[a-z0-9]{1,6}")
_SKU_BASE_MAX = MAX_SKU_CODE - 1 - 6
_SKU_FALLBACK = "product"
_SKU_GAP = re.compile(r"_+")
# Latin letters that Unicode does not decompose into a base letter and an accent.
_SKU_LETTERS = str.maketrans(
    {"æ": "ae", "œ": "oe", "ø": "o", "đ": "d", "ð": "d", "ł": "l", "þ": "th", "ħ": "h", "ı": "i"}
)
_PRODUCT_ID = re.compile(r"[0-9a-f]{24}")


class ProductError(Exception):
    """Base of what a catalogue use case refuses."""


class ProductNotFound(ProductError):
    def __init__(self, product_id: str) -> None:
        super().__init__(f"no product {product_id[:64]!r}")
        self.product_id = product_id


class SkuTaken(ProductError):
    def __init__(self, sku_code: str) -> None:
        super().__init__(f"skuCode {sku_code!r} belongs to another product")
        self.sku_code = sku_code


class InvalidField(ValueError):
    """One field breaks a rule; the message says which rule, for the client to read."""


class InvalidProduct(ProductError):
    """A product breaks rules; ``errors`` maps each field (API spelling) to its problem."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = dict(errors)


def parse_price(value: object) -> Decimal:
    """A price from a request: a decimal string or a JSON number with at most two places.

    JSON numbers arrive as floats; their shortest repr is the literal the client wrote (for
    up to 15 significant digits, which covers every valid price), so 19.99 is exact and
    19.999 is refused rather than rounded.
    """
    if isinstance(value, bool):
        raise InvalidField(_PRICE_FORMS)
    if isinstance(value, int):
        amount = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidField("must be a finite amount")
        amount = Decimal(repr(value))
    elif isinstance(value, str):
        if not _PRICE_TEXT.fullmatch(value):
            raise InvalidField(_PRICE_FORMS)
        amount = Decimal(value)
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise InvalidField("must be a finite amount")
        amount = value
    else:
        raise InvalidField(_PRICE_FORMS)
    if amount <= 0:
        raise InvalidField("must be greater than 0")
    if amount >= _PRICE_LIMIT:
        raise InvalidField("must be less than 10000000000")
    if amount != amount.quantize(_CENT):
        raise InvalidField("must have at most two decimal places")
    return amount.quantize(_CENT)


def format_price(amount: Decimal) -> str:
    """Money as clients see it: a string with exactly two places, never an exponent."""
    return f"{amount.quantize(_CENT):f}"


def format_timestamp(moment: datetime) -> str:
    """UTC, milliseconds, ``Z``: what MongoDB keeps too, so every backend answers alike."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def truncate_to_millis(moment: datetime) -> datetime:
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


# Explicit embeddings, overrides and isolates: text that displays in another order than it
# reads ("Trojan Source"), so a listing could show a name or price it does not contain.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _unstorable(char: str) -> bool:
    # Newlines and tabs are fine in a description; NUL, other controls and lone surrogates
    # (which JSON can carry but UTF-8 cannot) are not, nor are bidirectional overrides.
    if char in "\n\r\t":
        return False
    return unicodedata.category(char) in {"Cc", "Cs"} or char in _BIDI_CONTROLS


def _text(value: str, *, required: bool, high: int) -> str:
    value = value.strip()
    if not value.isprintable() and any(_unstorable(c) for c in value):
        raise InvalidField(
            "must be text without control characters, lone surrogates or bidirectional overrides"
        )
    if required and not value:
        raise InvalidField("must not be blank")
    if len(value) > high:
        raise InvalidField(f"must be at most {high} characters")
    return value


def clean_name(value: str) -> str:
    return _text(value, required=True, high=MAX_NAME)


def clean_description(value: str) -> str:
    return _text(value, required=False, high=MAX_DESCRIPTION)


def clean_search_term(value: str) -> str:
    """A search text or category as asked for: trimmed; "" means no filter. Refuses what no
    product can contain (control characters), which SQLite would otherwise cut short."""
    return _text(value, required=False, high=MAX_DESCRIPTION)


def clean_category(value: str | None) -> str:
    if value is None:
        return DEFAULT_CATEGORY
    return _text(value, required=True, high=MAX_CATEGORY)


def clean_sku_code(value: str) -> str:
    if not _SKU_CODE.fullmatch(value):
        raise InvalidField("must be 1-64 characters of letters, digits, '_', '.' or '-'")
    return value


def _sku_code_base(name: str) -> str:
    folded = unicodedata.normalize("NFKD", name.casefold().translate(_SKU_LETTERS))
    kept = "".join(
        "" if unicodedata.combining(c) else c if c.isascii() and c.isalnum() else "_"
        for c in folded
    )
    base = _SKU_GAP.sub("_", kept).strip("_")[:_SKU_BASE_MAX].rstrip("_")
    return base or _SKU_FALLBACK


def sku_code_candidates(name: str) -> list[str]:
    """The SKU codes a product called ``name`` may get, in order of preference.

    The name's slug: case folded, accents dropped (``Écran`` → ``ecran``, ``Straße`` →
    ``strasse``), every run of other characters one ``_``, at most 57 characters (room for
    a suffix), ``product`` when nothing is left; then the slug with ``_2`` ... ``_9``.
    """
    base = _sku_code_base(name)
    return [base, *(f"{base}_{n}" for n in _SKU_NUMBERED)]


def derive_sku_code(name: str, *, taken: Collection[str], noise: str | None = None) -> str:
    """The first of ``sku_code_candidates(name)`` not in ``taken``; when all are, the slug
    with ``_`` and ``noise`` (default: six random letters and digits)."""
    candidates = sku_code_candidates(name)
    for candidate in candidates:
        if candidate not in taken:
            return candidate
    noise = noise if noise is not None else secrets.token_hex(3)
    if not _SKU_NOISE.fullmatch(noise):
        raise ValueError("noise must be 1-6 lowercase letters or digits")
    return f"{candidates[0]}_{noise}"


def is_product_id(value: str) -> bool:
    return _PRODUCT_ID.fullmatch(value) is not None


def sku_codes_from_query(values: Iterable[str]) -> list[str]:
    """SKU codes asked for (repeated and/or comma-separated), first-asked order, no repeats.

    Raises InvalidProduct (field ``skuCode``) when none, a malformed one, or too many.
    """
    codes = [part.strip() for value in values for part in value.split(",") if part.strip()]
    if not codes:
        raise InvalidProduct({"skuCode": "give at least one SKU code"})
    for code in codes:
        try:
            clean_sku_code(code)
        except InvalidField as exc:
            raise InvalidProduct({"skuCode": f"{code[:70]!r} {exc}"}) from None
    unique = list(dict.fromkeys(codes))
    if len(unique) > MAX_SKUS_PER_LOOKUP:
        raise InvalidProduct({"skuCode": f"at most {MAX_SKUS_PER_LOOKUP} SKU codes per request"})
    return unique


class ProductIds:
    """Ids in MongoDB's ObjectId form: 4-byte seconds, 5 random bytes, 3-byte counter.

    The random part is drawn once per instance (per process, as MongoDB's drivers do) and
    the counter starts at a random value, so two processes never collide in practice and
    ids of one process sort by creation.
    """

    def __init__(self) -> None:
        self._process = secrets.token_bytes(5)
        self._counter = itertools.count(secrets.randbelow(1 << 24))

    def new(self, now: datetime) -> str:
        seconds = int(now.timestamp()) & 0xFFFFFFFF
        count = next(self._counter) & 0xFFFFFF
        raw = seconds.to_bytes(4, "big") + self._process + count.to_bytes(3, "big")
        return raw.hex()


@dataclass(frozen=True, slots=True, kw_only=True)
class ProductDraft:
    """What a client gives for a product: validated, ready to store.

    ``sku_code`` None: the client gave none — a new product gets one derived from its name
    (``derive_sku_code``), a revised one keeps its own.
    """

    name: str
    description: str
    price: Decimal
    sku_code: str | None
    category: str = DEFAULT_CATEGORY

    @classmethod
    def of(
        cls,
        *,
        name: str,
        description: str,
        price: object,
        sku_code: str | None = None,
        category: str | None = None,
    ) -> ProductDraft:
        """Validate every field; raises InvalidProduct naming each field that is wrong."""
        checks: dict[str, tuple[Any, Any]] = {
            "name": (clean_name, name),
            "description": (clean_description, description),
            "price": (parse_price, price),
            "skuCode": (_optional_sku_code, sku_code),
            "category": (clean_category, category),
        }
        values: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for field, (clean, raw) in checks.items():
            try:
                values[field] = clean(raw)
            except InvalidField as exc:
                errors[field] = str(exc)
        if errors:
            raise InvalidProduct(errors)
        return cls(
            name=values["name"],
            description=values["description"],
            price=values["price"],
            sku_code=values["skuCode"],
            category=values["category"],
        )

    def with_sku_code(self, sku_code: str) -> ProductDraft:
        return replace(self, sku_code=clean_sku_code(sku_code))


def _optional_sku_code(value: str | None) -> str | None:
    return None if value is None else clean_sku_code(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Product:
    id: str
    name: str
    description: str
    price: Decimal
    sku_code: str
    category: str
    created_at: datetime

    @classmethod
    def new(cls, draft: ProductDraft, *, id: str, created_at: datetime) -> Product:
        if draft.sku_code is None:
            raise ValueError("a new product needs a SKU code: derive one from its name first")
        return cls(
            id=id,
            name=draft.name,
            description=draft.description,
            price=draft.price,
            sku_code=draft.sku_code,
            category=draft.category,
            created_at=created_at,
        )

    def revised(self, draft: ProductDraft) -> Product:
        """Everything a client may change replaced; id and creation time kept, and the SKU
        code too when the draft has none."""
        return replace(
            self,
            name=draft.name,
            description=draft.description,
            price=draft.price,
            sku_code=draft.sku_code if draft.sku_code is not None else self.sku_code,
            category=draft.category,
        )

    @property
    def search_text(self) -> str:
        """What a search text is looked for in, by every backend: name and description,
        case folded (``Straße`` → ``strasse``, so ``STRASSE`` finds it)."""
        return f"{self.name}\n{self.description}".casefold()

    @property
    def category_key(self) -> str:
        return self.category.casefold()

    def document(self) -> dict[str, str]:
        """The product as clients and event consumers see it."""
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "price": format_price(self.price),
            "skuCode": self.sku_code,
            "category": self.category,
            "createdAt": format_timestamp(self.created_at),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class CatalogueQuery:
    """``text`` matches name or description, ignoring case; ``category`` ignores case too."""

    text: str | None = None
    category: str | None = None
    limit: int = 20
    offset: int = 0

    @property
    def text_key(self) -> str | None:
        """A substring of ``Product.search_text`` for a match."""
        return self.text.casefold() if self.text else None

    @property
    def category_key(self) -> str | None:
        """Equal to ``Product.category_key`` for a match."""
        return self.category.casefold() if self.category else None


@dataclass(frozen=True, slots=True)
class CataloguePage:
    products: list[Product]
    total: int


def _demo(name: str, description: str, price: str, sku_code: str, category: str) -> ProductDraft:
    return ProductDraft(
        name=name,
        description=description,
        price=Decimal(price),
        sku_code=sku_code,
        category=category,
    )


# Seeded in the embedded profile; inventory stocks the same SKUs.
DEMO_CATALOGUE: tuple[ProductDraft, ...] = (
    _demo(
        "iPhone 15",
        "Apple iPhone 15, 6.1-inch Super Retina XDR display, A16 Bionic chip, 128 GB, "
        "48 MP main camera, USB-C.",
        "1299.00",
        "iphone_15",
        "phones",
    ),
    _demo(
        "Pixel 8",
        "Google Pixel 8, 6.2-inch Actua display, Tensor G3 chip, 128 GB, seven years of "
        "OS and security updates.",
        "899.00",
        "pixel_8",
        "phones",
    ),
    _demo(
        "Galaxy S24",
        "Samsung Galaxy S24, 6.2-inch Dynamic AMOLED 2X display, 256 GB, 50 MP triple camera, "
        "Galaxy AI.",
        "999.00",
        "galaxy_s24",
        "phones",
    ),
    _demo(
        "AirPods Pro (2nd generation)",
        "Apple wireless earbuds with active noise cancellation, adaptive transparency and a "
        "MagSafe USB-C charging case.",
        "249.00",
        "airpods_pro",
        "audio",
    ),
    _demo(
        "Kindle Paperwhite",
        "Amazon e-reader with a 6.8-inch glare-free 300 ppi display, adjustable warm light and "
        "weeks of battery life; 16 GB.",
        "139.99",
        "kindle_paperwhite",
        "e-readers",
    ),
)
