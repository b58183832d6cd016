"""Fixtures shared by every suite: real databases, created for the run and dropped after."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pymysql
import pytest

from tests.support import require_or_skip

MYSQL_HOST = os.environ.get("SHOP_TEST_MYSQL_HOST", "127.0.0.1")
MYSQL_PORT = int(os.environ.get("SHOP_TEST_MYSQL_PORT", "3306"))
MYSQL_USER = os.environ.get("SHOP_TEST_MYSQL_USER", "root")
MYSQL_PASSWORD = os.environ.get("SHOP_TEST_MYSQL_PASSWORD", "")


def _mysql_admin() -> pymysql.connections.Connection:
    return pymysql.connect(
        host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, password=MYSQL_PASSWORD
    )


@pytest.fixture(scope="session")
def mysql_server() -> Iterator[None]:
    try:
        _mysql_admin().close()
    except pymysql.err.MySQLError as exc:
        require_or_skip(f"MariaDB/MySQL on {MYSQL_HOST}:{MYSQL_PORT}: {exc}")
    yield


@pytest.fixture
def make_mysql_url(mysql_server: None) -> Iterator[Callable[[], str]]:
    """Factory: a fresh, empty MySQL database per call, dropped when the test ends."""
    created: list[str] = []

    def make() -> str:
        name = f"shop_test_{uuid.uuid4().hex[:12]}"
        conn = _mysql_admin()
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        finally:
            conn.close()
        created.append(name)
        auth = MYSQL_USER + (f":{MYSQL_PASSWORD}" if MYSQL_PASSWORD else "")
        return f"mysql+aiomysql://{auth}@{MYSQL_HOST}:{MYSQL_PORT}/{name}"

    yield make
    conn = _mysql_admin()
    try:
        with conn.cursor() as cur:
            for name in created:
                cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        conn.close()


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same store test runs once on SQLite and once on MariaDB."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    make: Callable[[], str] = request.getfixturevalue("make_mysql_url")
    url: str = make()
    return url
