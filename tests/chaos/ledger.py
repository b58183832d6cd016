"""The invariants, read from the services' own databases (read-only, SQLite or MariaDB):
what was ordered, what is reserved, what is left, what was notified.

Read-only queries with the standard drivers rather than bench.system's store reader: that
one is private to the bench and pins MariaDB's address; this one takes each service's URL
as the system was given it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymysql
from sqlalchemy.engine import make_url

__all__ = ["Ledger", "Conservation"]


@dataclass(frozen=True)
class Conservation:
    """One SKU's books: units stocked = units left + units held for placed orders."""

    stocked: int
    left: int
    placed: dict[str, int]  # order number -> units of the SKU, PLACED orders
    reserved: dict[str, int]  # order number -> units of the SKU, RESERVED reservations

    def problems(self, created: Mapping[str, int]) -> list[str]:
        out: list[str] = []
        if self.left < 0:
            out.append(f"stock below zero: {self.left}")
        if sum(self.placed.values()) > self.stocked:
            out.append(f"oversold: {sum(self.placed.values())} units of {self.stocked}")
        lost = {n: u for n, u in created.items() if self.placed.get(n) != u}
        if lost:
            out.append(f"{len(lost)} orders answered 201 but not placed as answered: {lost}")
        unreserved = {n: u for n, u in self.placed.items() if self.reserved.get(n) != u}
        if unreserved:
            out.append(f"{len(unreserved)} placed orders without their reservation: {unreserved}")
        orphans = {n: u for n, u in self.reserved.items() if n not in self.placed}
        if orphans:
            out.append(f"{len(orphans)} reservations without a placed order: {orphans}")
        if self.left + sum(self.reserved.values()) != self.stocked:
            out.append(
                f"units not conserved: {self.left} left + {sum(self.reserved.values())} "
                f"reserved != {self.stocked} stocked"
            )
        return out


class Ledger:
    def __init__(self, *, data_dir: Path, databases: Mapping[str, str]) -> None:
        self.data_dir = data_dir
        self.databases = dict(databases)

    def query(self, service: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        url = self.databases.get(service)
        if url is None:
            path = self.data_dir / f"{service}.db"
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                db.execute("PRAGMA busy_timeout = 5000")
                return list(db.execute(sql, tuple(params)).fetchall())
        parsed = make_url(url)
        conn = pymysql.connect(
            host=parsed.host or "127.0.0.1",
            port=parsed.port or 3306,
            user=parsed.username or "root",
            password=parsed.password or "",
            database=parsed.database,
        )
        try:
            with conn.cursor() as cur:
                cur.execute(sql.replace("?", "%s"), tuple(params))
                return list(cur.fetchall())
        finally:
            conn.close()

    def conservation(self, sku: str, *, stocked: int) -> Conservation:
        left = self.query("inventory", "SELECT quantity FROM stock WHERE sku_code = ?", [sku])
        placed = self.query(
            "order",
            "SELECT l.order_number, SUM(l.quantity) FROM order_lines l JOIN orders o"
            " ON o.order_number = l.order_number"
            " WHERE l.sku_code = ? AND o.status = 'PLACED' GROUP BY l.order_number",
            [sku],
        )
        reserved = self.query(
            "inventory",
            "SELECT l.order_number, SUM(l.quantity) FROM reservation_lines l JOIN reservations r"
            " ON r.order_number = l.order_number"
            " WHERE l.sku_code = ? AND r.status = 'RESERVED' GROUP BY l.order_number",
            [sku],
        )
        return Conservation(
            stocked=stocked,
            left=int(left[0][0]) if left else 0,
            placed={str(n): int(u) for n, u in placed},
            reserved={str(n): int(u) for n, u in reserved},
        )

    def placed_orders(self, skus: Collection[str]) -> set[str]:
        marks = ",".join("?" * len(skus))
        join = "orders o JOIN order_lines l ON o.order_number = l.order_number"
        sql = f"SELECT DISTINCT o.order_number FROM {join} WHERE l.sku_code IN ({marks})"  # noqa: S608
        rows = self.query("order", sql, list(skus))
        return {str(n) for (n,) in rows}

    def notifications(self, numbers: Collection[str]) -> Counter[str]:
        """ORDER_PLACED notifications recorded per order number."""
        found: Counter[str] = Counter()
        ordered = sorted(numbers)
        for start in range(0, len(ordered), 500):
            chunk = ordered[start : start + 500]
            marks = ",".join("?" * len(chunk))
            placed = "type = 'ORDER_PLACED'"
            sql = f"SELECT order_number FROM notifications WHERE {placed} AND order_number IN ({marks})"  # noqa: S608, E501
            rows = self.query("notification", sql, chunk)
            found.update(str(n) for (n,) in rows)
        return found

    async def settled_books(
        self, sku: str, *, stocked: int, created: Mapping[str, int], within_s: float
    ) -> Conservation:
        """The SKU's books once they balance (reservations of orders that died with the order
        service come back after the release hold), or as they are at the deadline."""
        deadline = time.monotonic() + within_s
        while True:
            books = await asyncio.to_thread(self.conservation, sku, stocked=stocked)
            if not books.problems(created) or time.monotonic() > deadline:
                return books
            await asyncio.sleep(0.2)

    async def settled_notifications(
        self, skus: Collection[str], *, within_s: float
    ) -> tuple[set[str], Counter[str]]:
        """Every order placed for ``skus`` and its notifications, once each order has one (or
        at the deadline)."""
        deadline = time.monotonic() + within_s
        while True:
            placed = await asyncio.to_thread(self.placed_orders, skus)
            told = await asyncio.to_thread(self.notifications, placed)
            if all(told[n] >= 1 for n in placed) or time.monotonic() > deadline:
                return placed, told
            await asyncio.sleep(0.2)


def notification_problems(
    placed: Collection[str], told: Counter[str], created: Collection[str]
) -> list[str]:
    out: list[str] = []
    missing_201 = sorted(set(created) - set(placed))
    if missing_201:
        out.append(f"{len(missing_201)} orders answered 201 are not in the order store")
    silent = sorted(n for n in placed if told[n] == 0)
    if silent:
        out.append(f"{len(silent)} of {len(placed)} placed orders never notified: {silent[:5]}")
    repeated = {n: c for n, c in told.items() if c > 1}
    if repeated:
        out.append(f"{len(repeated)} orders notified more than once: {repeated}")
    return out
