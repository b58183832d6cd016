"""The catalogue on MongoDB (``PRODUCT_DATABASE_URL=mongodb://…/<database>``).

Implements ``ProductStore`` with the same answers as the SQL store:

- a product is a document whose ``_id`` is the product id as an ObjectId, its price a
  Decimal128 (exact), its ``createdAt`` a BSON date (milliseconds, UTC, as the domain
  already truncates);
- search matches ``searchText`` and ``categoryKey``, the same case-folded copies the SQL
  store keeps (``Product.search_text``, ``Product.category_key``): the text with a regular
  expression whose every special character is escaped, the category by equality; order
  by ``createdAt`` then ``_id`` (an ObjectId sorts as its hex string does);
- SKU codes are unique through an index (binary comparison: case-sensitive);
- each change and its event are written in one multi-document transaction
  (``shop.platform.mongo``), the event into the ``outbox`` collection the relay reads.

``create_indexes`` is this backend's migration: idempotent, run by every instance at start.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC
from typing import Any

from bson import Decimal128, ObjectId
from pymongo import ASCENDING
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from shop.platform.events import Event
from shop.platform.mongo import Document, MongoOutbox, add_event, in_transaction
from shop.product.domain import (
    CataloguePage,
    CatalogueQuery,
    Product,
    SkuTaken,
    is_product_id,
)
from shop.product.events import TOPIC

__all__ = ["PRODUCTS", "MongoProductStore", "literal_pattern"]

PRODUCTS = "products"
_SKU_INDEX = "uq_products_sku_code"
_ORDER = [("createdAt", ASCENDING), ("_id", ASCENDING)]
_REGEX_SPECIAL = frozenset("\\^$.|?*+()[]{}")


def literal_pattern(text: str) -> str:
    """A regular expression matching ``text`` literally, anywhere in a string.

    Special characters are escaped with a backslash, which PCRE (MongoDB) and Python's
    ``re`` both read as the character itself; control characters are written ``\\xHH``,
    since MongoDB refuses a pattern with an embedded NUL.
    """
    return "".join(
        "\\" + c if c in _REGEX_SPECIAL else f"\\x{ord(c):02x}" if ord(c) < 0x20 else c
        for c in text
    )


def _fields(product: Product) -> Document:
    return {
        "skuCode": product.sku_code,
        "name": product.name,
        "description": product.description,
        "price": Decimal128(product.price),
        "category": product.category,
        "categoryKey": product.category_key,
        "searchText": product.search_text,
    }


def _product(document: Document) -> Product:
    return Product(
        id=str(document["_id"]),
        name=document["name"],
        description=document["description"],
        price=document["price"].to_decimal(),
        sku_code=document["skuCode"],
        category=document["category"],
        created_at=document["createdAt"].astimezone(UTC),
    )


def _is_sku_clash(exc: DuplicateKeyError) -> bool:
    details: Mapping[str, Any] = exc.details or {}
    return "skuCode" in (details.get("keyPattern") or {}) or _SKU_INDEX in str(exc)


def _matching(query: CatalogueQuery) -> Document:
    conditions: Document = {}
    if query.text_key:
        conditions["searchText"] = {"$regex": literal_pattern(query.text_key)}
    if query.category_key:
        conditions["categoryKey"] = query.category_key
    return conditions


class MongoProductStore:
    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._database = database
        self._products = database[PRODUCTS]

    async def create_indexes(self) -> None:
        """The products' indexes and the outbox's; safe when several instances start at once
        (creating an index that exists with the same keys and options is a no-op)."""
        await self._products.create_index("skuCode", unique=True, name=_SKU_INDEX)
        await self._products.create_index(_ORDER, name="ix_products_created")
        await self._products.create_index(
            [("categoryKey", ASCENDING), *_ORDER], name="ix_products_category"
        )
        await MongoOutbox(self._database).create_indexes()

    async def _record(self, session: AsyncClientSession, event: Event) -> None:
        await add_event(session, database=self._database, topic=TOPIC, event=event)

    async def add(self, product: Product, *, event: Event) -> None:
        async def work(session: AsyncClientSession) -> None:
            document = {
                "_id": ObjectId(product.id),
                **_fields(product),
                "createdAt": product.created_at,
            }
            await self._products.insert_one(document, session=session)
            await self._record(session, event)

        try:
            await in_transaction(self._database, work)
        except DuplicateKeyError as exc:
            if _is_sku_clash(exc):
                raise SkuTaken(product.sku_code) from exc
            raise

    async def update(self, product: Product, *, event: Event) -> bool:
        async def work(session: AsyncClientSession) -> bool:
            # The document write orders concurrent changes of one product: the second
            # transaction conflicts and runs again after the first commits, so its event
            # comes later in the outbox.
            changed = await self._products.update_one(
                {"_id": ObjectId(product.id)}, {"$set": _fields(product)}, session=session
            )
            if changed.matched_count != 1:
                return False
            await self._record(session, event)
            return True

        try:
            return await in_transaction(self._database, work)
        except DuplicateKeyError as exc:
            if _is_sku_clash(exc):
                raise SkuTaken(product.sku_code) from exc
            raise

    async def remove(
        self, product_id: str, *, announce: Callable[[Product], Event]
    ) -> Product | None:
        if not is_product_id(product_id):
            return None

        async def work(session: AsyncClientSession) -> Product | None:
            removed = await self._products.find_one_and_delete(
                {"_id": ObjectId(product_id)}, session=session
            )
            if removed is None:
                return None
            product = _product(removed)
            await self._record(session, announce(product))
            return product

        return await in_transaction(self._database, work)

    async def get(self, product_id: str) -> Product | None:
        if not is_product_id(product_id):
            return None
        found = await self._products.find_one({"_id": ObjectId(product_id)})
        return None if found is None else _product(found)

    async def search(self, query: CatalogueQuery) -> CataloguePage:
        matching = _matching(query)
        total = await self._products.count_documents(matching)
        page = self._products.find(matching).sort(_ORDER).skip(query.offset).limit(query.limit)
        return CataloguePage([_product(document) async for document in page], total)

    async def with_sku_codes(self, sku_codes: Sequence[str]) -> list[Product]:
        if not sku_codes:
            return []
        found = self._products.find({"skuCode": {"$in": list(sku_codes)}})
        return [_product(document) async for document in found]

    async def is_empty(self) -> bool:
        return await self._products.find_one({}, projection={"_id": True}) is None
