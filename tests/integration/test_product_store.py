"""The product store contract: every test on SQLite, MariaDB and MongoDB.

Each backend's events are read back through its outbox source (what the relay reads), so
"the change and its event are one transaction" is checked the same way everywhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from shop.platform.db import create_engine, migrate
from shop.platform.mongo import MongoOutbox, mongo_database
from shop.platform.outbox import OutboxEntry, OutboxSource, SqlOutbox
from shop.product.domain import (
    CatalogueQuery,
    Product,
    ProductDraft,
    ProductIds,
    SkuTaken,
)
from shop.product.events import PRODUCT_CREATED, PRODUCT_DELETED, PRODUCT_UPDATED, product_event
from shop.product.service import ProductService
from shop.product.store import ProductStore, SqlProductStore
from shop.product.store_mongo import MongoProductStore

START = datetime(2025, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)


@dataclass
class Catalogue:
    store: ProductStore
    outbox: OutboxSource
    ids: ProductIds
    made: int = 0

    def product(self, sku_code: str, **fields: Any) -> Product:
        """A new product, each one created a millisecond after the previous one."""
        created_at = fields.pop("created_at", START + timedelta(milliseconds=self.made))
        self.made += 1
        draft = ProductDraft.of(
            name=fields.pop("name", sku_code.replace("_", " ").title()),
            description=fields.pop("description", ""),
            price=fields.pop("price", "10.00"),
            sku_code=sku_code,
            category=fields.pop("category", None),
        )
        return Product.new(draft, id=self.ids.new(created_at), created_at=created_at)

    async def add(self, sku_code: str, **fields: Any) -> Product:
        product = self.product(sku_code, **fields)
        await self.store.add(product, event=product_event(PRODUCT_CREATED, product))
        return product

    async def outbox_entries(self) -> list[OutboxEntry]:
        return list(await self.outbox.unpublished(1000))

    async def product_count(self) -> int:
        return (await self.store.search(CatalogueQuery(limit=1))).total


@asynccontextmanager
async def sql_catalogue(url: str) -> AsyncIterator[Catalogue]:
    engine = create_engine(url)
    try:
        await migrate(engine, package="shop.product", service="product")
        yield Catalogue(SqlProductStore(engine), SqlOutbox(engine), ProductIds())
    finally:
        await engine.dispose()


@asynccontextmanager
async def mongo_catalogue(url: str) -> AsyncIterator[Catalogue]:
    async with mongo_database(url) as database:
        store = MongoProductStore(database)
        try:
            # Two instances starting at once, then a restart: each a no-op for the others.
            await asyncio.gather(
                store.create_indexes(), MongoProductStore(database).create_indexes()
            )
            await store.create_indexes()
            yield Catalogue(store, MongoOutbox(database), ProductIds())
        finally:
            await database.client.drop_database(database.name)


@pytest.fixture(
    params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql), "mongo"],
)
async def catalogue(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Catalogue]:
    if request.param == "sqlite":
        opened = sql_catalogue(f"sqlite+aiosqlite:///{tmp_path / 'product.db'}")
    elif request.param == "mysql":
        make_mysql: Callable[[], str] = request.getfixturevalue("make_mysql_url")
        opened = sql_catalogue(make_mysql())
    else:
        make_mongo: Callable[[], str] = request.getfixturevalue("make_mongo_url")
        opened = mongo_catalogue(make_mongo())
    async with opened as catalogue:
        yield catalogue


async def test_a_product_round_trips_exactly(catalogue: Catalogue) -> None:
    added = await catalogue.add(
        "big_ticket",
        name="Écran 4K « pro » 📺",
        description="Ligne 1\nLigne 2",
        price="9999999999.99",
        category="Displays",
    )
    found = await catalogue.store.get(added.id)
    assert found == added
    assert found is not None and found.price == Decimal("9999999999.99")
    assert found.created_at.tzinfo is not None
    # The look-up by SKU code (on SQLite a path of its own) reads the same product back.
    assert await catalogue.store.with_sku_codes(["big_ticket"]) == [added]
    assert await catalogue.store.get(catalogue.ids.new(START)) is None


async def test_adding_records_its_event_in_the_outbox(catalogue: Catalogue) -> None:
    product = catalogue.product("pixel_8", price="899.00")
    event = product_event(PRODUCT_CREATED, product)
    await catalogue.store.add(product, event=event)
    [entry] = await catalogue.outbox_entries()
    assert (entry.event.id, entry.topic, entry.event.key) == (event.id, "products", product.id)
    assert entry.event.type == "product.created"
    assert entry.event.data["price"] == "899.00"
    assert entry.event.data == product.document()
    assert entry.event.to_json() == event.to_json()


async def test_a_taken_sku_code_stores_neither_product_nor_event(catalogue: Catalogue) -> None:
    await catalogue.add("pixel_8")
    with pytest.raises(SkuTaken):
        await catalogue.add("pixel_8", name="Impostor")
    assert await catalogue.product_count() == 1
    assert len(await catalogue.outbox_entries()) == 1


async def test_sku_codes_are_case_sensitive(catalogue: Catalogue) -> None:
    await catalogue.add("pixel_8")
    await catalogue.add("PIXEL_8")
    found = await catalogue.store.with_sku_codes(["PIXEL_8"])
    assert [p.sku_code for p in found] == ["PIXEL_8"]


async def test_racing_adds_of_one_sku_code_let_exactly_one_win(catalogue: Catalogue) -> None:
    contenders = [catalogue.product("hot_item", name=f"Try {i}") for i in range(5)]
    outcomes = await asyncio.gather(
        *(catalogue.store.add(p, event=product_event(PRODUCT_CREATED, p)) for p in contenders),
        return_exceptions=True,
    )
    assert sum(o is None for o in outcomes) == 1
    assert all(isinstance(o, SkuTaken) for o in outcomes if o is not None)
    assert await catalogue.product_count() == 1
    assert len(await catalogue.outbox_entries()) == 1


async def test_update_replaces_fields_and_records_the_event(catalogue: Catalogue) -> None:
    original = await catalogue.add("pixel_8", price="899.00", category="phones")
    revised = original.revised(
        ProductDraft.of(
            name="Pixel 8 (2024)",
            description="Now cheaper.",
            price="799.50",
            sku_code="pixel_8_2024",
            category="Phones",
        )
    )
    event = product_event(PRODUCT_UPDATED, revised)
    assert await catalogue.store.update(revised, event=event)
    assert await catalogue.store.get(original.id) == revised
    # The price look-up sees the change as soon as it is committed, under its new code only.
    assert await catalogue.store.with_sku_codes(["pixel_8", "pixel_8_2024"]) == [revised]
    # The same values again still count as found (MySQL reports "matched", not "changed").
    assert await catalogue.store.update(revised, event=product_event(PRODUCT_UPDATED, revised))
    entries = await catalogue.outbox_entries()
    assert [e.event.type for e in entries] == [
        "product.created",
        "product.updated",
        "product.updated",
    ]
    assert entries[1].event.id == event.id
    assert entries[0].position < entries[1].position < entries[2].position


async def test_updating_a_missing_product_records_nothing(catalogue: Catalogue) -> None:
    ghost = catalogue.product("ghost")
    assert not await catalogue.store.update(ghost, event=product_event(PRODUCT_UPDATED, ghost))
    assert await catalogue.outbox_entries() == []


async def test_update_to_another_products_sku_is_refused_and_changes_nothing(
    catalogue: Catalogue,
) -> None:
    await catalogue.add("pixel_8")
    galaxy = await catalogue.add("galaxy_s24", price="999.00")
    clash = galaxy.revised(
        ProductDraft.of(name="Galaxy", description="", price="1.00", sku_code="pixel_8")
    )
    with pytest.raises(SkuTaken):
        await catalogue.store.update(clash, event=product_event(PRODUCT_UPDATED, clash))
    assert await catalogue.store.get(galaxy.id) == galaxy
    assert len(await catalogue.outbox_entries()) == 2


async def test_remove_deletes_and_announces_what_was_deleted(catalogue: Catalogue) -> None:
    product = await catalogue.add("kindle_paperwhite", price="139.99")

    def announce(removed: Product) -> Any:
        return product_event(PRODUCT_DELETED, removed)

    assert await catalogue.store.remove(product.id, announce=announce) == product
    assert await catalogue.store.get(product.id) is None
    assert await catalogue.store.remove(product.id, announce=announce) is None
    entries = await catalogue.outbox_entries()
    assert len(entries) == 2
    deleted = entries[1].event
    assert (deleted.type, deleted.subject, deleted.data) == (
        "product.deleted",
        product.id,
        product.document(),
    )


async def test_search_filters_pages_and_counts(catalogue: Catalogue) -> None:
    phone = await catalogue.add(
        "pixel_8", name="Pixel 8", description="An Android phone", category="Phones"
    )
    reader = await catalogue.add(
        "kindle", name="Kindle", description="A glare-free PHONE-sized reader", category="readers"
    )
    screen = await catalogue.add("screen", name="ÉCRAN Straße", category="phones")
    odd = await catalogue.add("odd", name="100% cotton_shirt", category="clothes")
    store = catalogue.store

    async def ids(**query: Any) -> tuple[list[str], int]:
        page = await store.search(CatalogueQuery(**query))
        return [p.id for p in page.products], page.total

    assert await ids() == ([phone.id, reader.id, screen.id, odd.id], 4)
    assert await ids(text="phone") == ([phone.id, reader.id], 2)
    assert await ids(text="écran") == ([screen.id], 1)
    assert await ids(text="STRASSE") == ([screen.id], 1)
    assert await ids(category="PHONES") == ([phone.id, screen.id], 2)
    assert await ids(text="phone", category="phones") == ([phone.id], 1)
    # LIKE wildcards in the text are plain characters.
    assert await ids(text="%") == ([odd.id], 1)
    assert await ids(text="o_t") == ([], 0)
    assert await ids(text="cotton_") == ([odd.id], 1)
    assert await ids(text="!") == ([], 0)
    # Paging: the total ignores limit and offset.
    assert await ids(limit=2) == ([phone.id, reader.id], 4)
    assert await ids(limit=2, offset=2) == ([screen.id, odd.id], 4)
    assert await ids(limit=2, offset=10) == ([], 4)


async def test_products_created_in_one_millisecond_keep_a_stable_order(
    catalogue: Catalogue,
) -> None:
    added = [await catalogue.add(f"sku_{i}", created_at=START) for i in range(5)]
    first = await catalogue.store.search(CatalogueQuery(limit=3))
    rest = await catalogue.store.search(CatalogueQuery(limit=3, offset=3))
    listed = [p.id for p in first.products + rest.products]
    assert listed == sorted(p.id for p in added)


async def test_lookup_by_sku_codes_and_emptiness(catalogue: Catalogue) -> None:
    assert await catalogue.store.is_empty()
    await catalogue.add("a", price="1.50")
    await catalogue.add("b")
    assert not await catalogue.store.is_empty()
    found = await catalogue.store.with_sku_codes(["b", "a", "missing"])
    assert sorted((p.sku_code, str(p.price)) for p in found) == [("a", "1.50"), ("b", "10.00")]
    assert await catalogue.store.with_sku_codes([]) == []


async def test_search_text_is_taken_literally(catalogue: Catalogue) -> None:
    book = await catalogue.add(
        "book", name="C++ (2nd ed.) [v1.0]", description="a|b ^start$ back\\slash *?{2}"
    )
    await catalogue.add("plain", name="Plain", description="2nd edition, v10 ab")

    async def ids(text: str) -> list[str]:
        return [p.id for p in (await catalogue.store.search(CatalogueQuery(text=text))).products]

    for text in ["C++", "(2nd ed.)", "[v1.0]", "a|b", "^start$", "back\\slash", "*?{2}", "."]:
        assert await ids(text) == [book.id], text
    for text in ["v1.0]x", "a.b", "\\d", "c+"]:
        assert await ids(text) == ([book.id] if text == "c+" else []), text


async def test_racing_creates_of_one_name_each_get_their_own_sku_code(
    catalogue: Catalogue,
) -> None:
    service = ProductService(store=catalogue.store)
    draft = ProductDraft.of(name="Pixel 8", description="", price="899.00")
    first = await service.add_product(draft)
    assert first.sku_code == "pixel_8"
    racers = await asyncio.gather(*(service.add_product(draft) for _ in range(4)))
    codes = [first.sku_code, *(p.sku_code for p in racers)]
    assert len(set(codes)) == 5
    assert all(code.startswith("pixel_8_") for code in codes[1:])
    assert await catalogue.product_count() == 5
    assert len(await catalogue.outbox_entries()) == 5
