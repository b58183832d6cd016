"""Fixtures shared by every suite: real databases, created for the run and dropped after."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

from tests.servers import Server, ServerMissing, etcd_server, kafka_broker, mongo_server
from tests.support import require_or_skip

MYSQL_HOST = os.environ.get("SHOP_TEST_MYSQL_HOST", "127.0.0.1")
MYSQL_PORT = int(os.environ.get("SHOP_TEST_MYSQL_PORT", "3306"))
MYSQL_USER = os.environ.get("SHOP_TEST_MYSQL_USER", "root")
MYSQL_PASSWORD = os.environ.get("SHOP_TEST_MYSQL_PASSWORD", "")


def mysql_admin() -> pymysql.connections.Connection:
    """A connection as the test account (create and drop databases, watch sessions)."""
    return pymysql.connect(
        host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, password=MYSQL_PASSWORD
    )


@pytest.fixture(scope="session")
def mysql_server() -> Iterator[None]:
    try:
        mysql_admin().close()
    except pymysql.err.MySQLError as exc:
        require_or_skip(f"MariaDB/MySQL on {MYSQL_HOST}:{MYSQL_PORT}: {exc}")
    yield


class MysqlDatabases:
    """Fresh, empty MySQL databases made on demand, dropped by ``drop_all``."""

    def __init__(self) -> None:
        self.created: list[str] = []

    def new_url(self) -> str:
        name = f"shop_test_{uuid.uuid4().hex[:12]}"
        conn = mysql_admin()
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        finally:
            conn.close()
        self.created.append(name)
        auth = MYSQL_USER + (f":{MYSQL_PASSWORD}" if MYSQL_PASSWORD else "")
        return f"mysql+aiomysql://{auth}@{MYSQL_HOST}:{MYSQL_PORT}/{name}"

    def drop_all(self) -> None:
        conn = mysql_admin()
        try:
            with conn.cursor() as cur:
                for name in self.created:
                    cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        finally:
            conn.close()
        self.created.clear()


@pytest.fixture
def make_mysql_url(mysql_server: None) -> Iterator[Callable[[], str]]:
    """Factory: a fresh, empty MySQL database per call, dropped when the test ends."""
    databases = MysqlDatabases()
    yield databases.new_url
    databases.drop_all()


@pytest.fixture(scope="session")
def session_mysql(mysql_server: None) -> Iterator[MysqlDatabases]:
    """Databases that live for the whole run (a running system's), dropped at its end."""
    databases = MysqlDatabases()
    yield databases
    databases.drop_all()


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same store test runs once on SQLite and once on MariaDB."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    make: Callable[[], str] = request.getfixturevalue("make_mysql_url")
    url: str = make()
    return url


# --- the production profile's servers: started once per run, isolated per test by name ----


def _started(request: pytest.FixtureRequest, start: Callable[[], Any], what: str) -> Server:
    stack = contextlib.ExitStack()
    try:
        server: Server = stack.enter_context(start())
    except ServerMissing as exc:
        stack.close()
        require_or_skip(f"{what}: {exc}")
    request.addfinalizer(stack.close)
    return server


@pytest.fixture(scope="session")
def kafka_server(request: pytest.FixtureRequest) -> Server:
    """One Kafka-protocol broker for the run (e2e); bus tests start their own (kafka_broker)."""
    return _started(request, kafka_broker, "a Kafka-protocol broker")


@pytest.fixture
def fresh_kafka(request: pytest.FixtureRequest) -> Server:
    """An empty broker of the test's own: topics and groups start from nothing."""
    return _started(request, kafka_broker, "a Kafka-protocol broker")


@pytest.fixture(scope="session")
def mongo_server_url(request: pytest.FixtureRequest) -> str:
    return _started(request, mongo_server, "a MongoDB-protocol server").url


@pytest.fixture
def make_mongo_url(mongo_server_url: str) -> Callable[[], str]:
    """Factory: a URL naming a fresh database of its own on the run's MongoDB server."""

    def make() -> str:
        name = f"shop_test_{uuid.uuid4().hex[:12]}"
        base, _, query = mongo_server_url.partition("?")
        return f"{base.rstrip('/')}/{name}?{query}"

    return make


@pytest.fixture(scope="session")
def etcd_server_url(request: pytest.FixtureRequest) -> str:
    return _started(request, etcd_server, "etcd").url
