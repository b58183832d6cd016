"""Persistence of the catalogue: a small protocol and its SQLAlchemy (Core) backend.

The protocol speaks products and events only; ``store_mongo`` implements it on MongoDB.
Every change is stored together with the event announcing it (the outbox), atomically.

SQL details: the same code runs on SQLite and MySQL/MariaDB (but the look-up by SKU code
reads a SQLite file through a bare ``sqlite3`` connection, ``_SqliteReads``). Search
matches a casefolded copy of name and description (``search_text``) and of the category
(``category_key``), compared byte for byte, so "ÉCRAN" finds "écran" alike on both
backends (SQLite's own LIKE folds ASCII only; MySQL's default collation would also ignore
accents). SKU codes compare case-sensitively on both. Prices are NUMERIC(12,2) on MySQL and
text on SQLite, whose NUMERIC would turn them into floats.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

from sqlalchemy import (
    Column,
    Dialect,
    Index,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    and_,
    delete,
    func,
    insert,
    select,
    true,
    update,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.event import listen
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator, TypeEngine

from shop.platform import context, telemetry
from shop.platform.db import Timestamp, from_db_time, open_sqlite, patiently, to_db_time
from shop.platform.events import Event
from shop.platform.outbox import add_event
from shop.product.domain import CataloguePage, CatalogueQuery, Product, SkuTaken
from shop.product.events import TOPIC

__all__ = ["Money", "ProductStore", "SqlProductStore", "metadata", "products"]

BinaryText = Text().with_variant(mysql.MEDIUMTEXT(collation="utf8mb4_bin"), "mysql", "mariadb")
_LIKE_ESCAPE = "!"


class Money(TypeDecorator[Decimal]):
    """Exact decimal with two places on every backend."""

    impl = Numeric(12, 2)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(16))
        return dialect.type_descriptor(Numeric(12, 2, asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None or dialect.name != "sqlite":
            return value
        return f"{value:f}"

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        return None if value is None else Decimal(str(value))


metadata = MetaData()

products = Table(
    "products",
    metadata,
    Column("id", String(24), primary_key=True),
    Column(
        "sku_code",
        String(64).with_variant(
            mysql.VARCHAR(64, charset="ascii", collation="ascii_bin"), "mysql", "mariadb"
        ),
        nullable=False,
    ),
    Column("name", String(200), nullable=False),
    Column("description", Text, nullable=False),
    Column("price", Money, nullable=False),
    Column("category", String(100), nullable=False),
    Column(
        "category_key",
        String(300).with_variant(mysql.VARCHAR(300, collation="utf8mb4_bin"), "mysql", "mariadb"),
        nullable=False,
    ),
    Column("search_text", BinaryText, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Index("uq_products_sku_code", "sku_code", unique=True),
    Index("ix_products_created", "created_at", "id"),
    Index("ix_products_category", "category_key", "created_at", "id"),
)


class ProductStore(Protocol):
    async def add(self, product: Product, *, event: Event) -> None:
        """Store a new product and the event announcing it, atomically.

        Raises SkuTaken when another product has its SKU code (then nothing is stored).
        """

    async def update(self, product: Product, *, event: Event) -> bool:
        """Replace the product with ``product.id`` and record ``event``, atomically.

        False (and nothing recorded) when there is no such product; raises SkuTaken when
        the new SKU code belongs to another product.
        """

    async def remove(
        self, product_id: str, *, announce: Callable[[Product], Event]
    ) -> Product | None:
        """Delete the product and record ``announce(product as it was)``, atomically.

        None when there was no such product.
        """

    async def get(self, product_id: str) -> Product | None: ...

    async def search(self, query: CatalogueQuery) -> CataloguePage:
        """The page asked for, oldest first (then by id), and how many products match."""

    async def with_sku_codes(self, sku_codes: Sequence[str]) -> list[Product]:
        """The products that have one of these SKU codes, in no particular order."""

    async def is_empty(self) -> bool: ...


def _row_values(product: Product) -> dict[str, Any]:
    return {
        "sku_code": product.sku_code,
        "name": product.name,
        "description": product.description,
        "price": product.price,
        "category": product.category,
        "category_key": product.category_key,
        "search_text": product.search_text,
    }


def _product(row: Any) -> Product:
    return Product(
        id=row.id,
        name=row.name,
        description=row.description,
        price=row.price,
        sku_code=row.sku_code,
        category=row.category,
        created_at=from_db_time(row.created_at),
    )


def _is_sku_clash(exc: IntegrityError) -> bool:
    # SQLite names the column ("products.sku_code"), MySQL the index ("uq_products_sku_code").
    return "sku_code" in str(exc.orig)


def _like_contains(text: str) -> str:
    escaped = (
        text.replace(_LIKE_ESCAPE, _LIKE_ESCAPE * 2)
        .replace("%", _LIKE_ESCAPE + "%")
        .replace("_", _LIKE_ESCAPE + "_")
    )
    return f"%{escaped}%"


def _matching(query: CatalogueQuery) -> ColumnElement[bool]:
    conditions: list[ColumnElement[bool]] = []
    if query.text_key:
        pattern = _like_contains(query.text_key)
        conditions.append(products.c.search_text.like(pattern, escape=_LIKE_ESCAPE))
    if query.category_key:
        conditions.append(products.c.category_key == query.category_key)
    return and_(true(), *conditions)


_BY_SKU_CODES = (
    "SELECT id, name, description, price, sku_code, category, created_at "
    "FROM products WHERE sku_code IN"
)


class _SqliteReads:
    """The look-up by SKU code on a SQLite file, on a bare ``sqlite3`` connection.

    It is the order service's price look-up, once per order when the catalogue prices
    orders: through the async engine one ``SELECT … IN`` cost more than everything else the
    request does (pool checkout, greenlets, the compiled ``IN``'s expansion, a result
    object, the connection's return). Here it is one statement on one connection, in
    autocommit mode: in WAL mode each ``SELECT`` reads the last committed state, and never
    waits for a writer. The statement runs without awaiting, so one connection serves the
    whole event loop; a busy database (rare for a reader) is waited for on the loop, like
    ``RawSql``'s ``BEGIN IMMEDIATE``. Columns come back as the engine stored them: the
    price as text, the moment as SQLAlchemy's SQLite ``DATETIME`` text.
    """

    def __init__(self, engine: AsyncEngine, database: str) -> None:
        self._database = database
        self._namespace = database.rsplit("/", 1)[-1]
        self._connection: sqlite3.Connection | None = None
        # The engine's dispose (the app's shutdown) closes this connection as well.
        listen(engine.sync_engine, "engine_disposed", lambda _engine: self.close())

    async def with_sku_codes(self, sku_codes: Sequence[str]) -> list[Product]:
        marks = ", ".join("?" * len(sku_codes))  # only placeholders, never a value
        sql = f"{_BY_SKU_CODES} ({marks})"
        if self._connection is None:
            self._connection = open_sqlite(self._database)
        connection = self._connection
        span = (
            telemetry.statement_span("sqlite", "SELECT", sql, namespace=self._namespace)
            if context.spans_exported
            else None
        )
        try:
            try:
                rows = connection.execute(sql, sku_codes).fetchall()
            except sqlite3.OperationalError:
                rows = await patiently(lambda: connection.execute(sql, sku_codes).fetchall())
        except sqlite3.Error as exc:
            if span is not None:
                telemetry.end_span(span, exc)
            raise DBAPIError.instance(sql, None, exc, sqlite3.Error, hide_parameters=True) from exc
        if span is not None:
            telemetry.end_span(span)
        return [
            Product(
                id=id_,
                name=name,
                description=description,
                price=Decimal(price),
                sku_code=sku_code,
                category=category,
                created_at=datetime.fromisoformat(created_at).replace(tzinfo=UTC),
            )
            for id_, name, description, price, sku_code, category, created_at in rows
        ]

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


class SqlProductStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        # A SQLite file (an in-memory database is only the engine's own connection's).
        database = engine.url.database or ""
        on_file = engine.dialect.name == "sqlite" and database not in ("", ":memory:")
        self._reads = _SqliteReads(engine, database) if on_file else None

    async def add(self, product: Product, *, event: Event) -> None:
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    insert(products).values(
                        id=product.id,
                        created_at=to_db_time(product.created_at),
                        **_row_values(product),
                    )
                )
                await add_event(conn, topic=TOPIC, event=event)
        except IntegrityError as exc:
            if _is_sku_clash(exc):
                raise SkuTaken(product.sku_code) from exc
            raise

    async def update(self, product: Product, *, event: Event) -> bool:
        try:
            async with self._engine.begin() as conn:
                # The row lock taken here orders concurrent changes of one product, and so
                # the outbox rows (and events) that announce them.
                changed = await conn.execute(
                    update(products)
                    .where(products.c.id == product.id)
                    .values(**_row_values(product))
                )
                if changed.rowcount != 1:
                    return False
                await add_event(conn, topic=TOPIC, event=event)
        except IntegrityError as exc:
            if _is_sku_clash(exc):
                raise SkuTaken(product.sku_code) from exc
            raise
        return True

    async def remove(
        self, product_id: str, *, announce: Callable[[Product], Event]
    ) -> Product | None:
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(
                    select(products).where(products.c.id == product_id).with_for_update()
                )
            ).first()
            if row is None:
                return None
            product = _product(row)
            deleted = await conn.execute(delete(products).where(products.c.id == product_id))
            if deleted.rowcount != 1:
                return None
            await add_event(conn, topic=TOPIC, event=announce(product))
        return product

    async def get(self, product_id: str) -> Product | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(products).where(products.c.id == product_id))).first()
        return None if row is None else _product(row)

    async def search(self, query: CatalogueQuery) -> CataloguePage:
        matching = _matching(query)
        async with self._engine.connect() as conn:
            total = await conn.scalar(select(func.count()).select_from(products).where(matching))
            rows = (
                await conn.execute(
                    select(products)
                    .where(matching)
                    .order_by(products.c.created_at, products.c.id)
                    .limit(query.limit)
                    .offset(query.offset)
                )
            ).all()
        return CataloguePage([_product(row) for row in rows], int(total or 0))

    async def with_sku_codes(self, sku_codes: Sequence[str]) -> list[Product]:
        if not sku_codes:
            return []
        if self._reads is not None:
            return await self._reads.with_sku_codes(sku_codes)
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(select(products).where(products.c.sku_code.in_(sku_codes)))
            ).all()
        return [_product(row) for row in rows]

    async def is_empty(self) -> bool:
        async with self._engine.connect() as conn:
            return (await conn.scalar(select(products.c.id).limit(1))) is None
