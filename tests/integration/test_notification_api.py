"""The notification service as it runs: its real lifespan, the embedded event log, a real SMTP
server (aiosmtpd) on a free port, SQLite under tmp_path, and tokens from a test signing key.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from aiosmtpd.controller import Controller
from cryptography.hazmat.primitives.asymmetric import rsa

from shop.notification.app import build_app
from shop.notification.couriers import LogCourier
from shop.notification.domain import Channel, Notification
from shop.notification.events import CONSUMER_GROUP, ORDERS_TOPIC, subscribe
from shop.notification.service import NotificationService
from shop.notification.settings import NotificationSettings
from shop.notification.store import SqlNotificationStore
from shop.platform.db import create_engine, migrate
from shop.platform.eventlog import SqliteEventLog
from shop.platform.events import Event
from shop.platform.settings import PlatformSettings
from shop.platform.tokens import JwksVerifier
from tests.prometheus import metric
from tests.support import free_port

ISSUER, AUDIENCE, KID = "shop-auth", "shop", "test-key"
PROBLEM = "application/problem+json"


# --- tokens -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwks(key: rsa.RSAPrivateKey) -> dict[str, Any]:
    public: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return {"keys": [{**public, "kid": KID, "use": "sig", "alg": "RS256"}]}


def bearer(
    key: rsa.RSAPrivateKey, user_id: str, *, roles: tuple[str, ...] = ("customer",)
) -> dict[str, str]:
    now = int(time.time())
    claims = {
        "sub": user_id,
        "email": f"{user_id}@example.com",
        "roles": list(roles),
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 900,
        "jti": uuid.uuid4().hex,
    }
    token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": KID})
    return {"Authorization": f"Bearer {token}"}


# --- the world around the service -------------------------------------------------------


@dataclass
class MailServer:
    """An SMTP server that keeps every message it accepts."""

    port: int = field(default_factory=free_port)
    received: list[EmailMessage] = field(default_factory=list)

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:  # noqa: N802
        message = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        self.received.append(message)
        return "250 Message accepted for delivery"

    @asynccontextmanager
    async def running(self) -> AsyncIterator[MailServer]:
        controller = Controller(self, hostname="127.0.0.1", port=self.port)
        await asyncio.to_thread(controller.start)
        try:
            yield self
        finally:
            await asyncio.to_thread(controller.stop)


@pytest.fixture
async def mail() -> AsyncIterator[MailServer]:
    async with MailServer().running() as server:
        yield server


def order_data(order_number: str, *, user_id: str = "u-ada", **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "orderNumber": order_number,
        "status": "PLACED",
        "userId": user_id,
        "email": "ada@example.com",
        "lines": [
            {"skuCode": "iphone_15", "quantity": 2, "unitPrice": "1299.00", "lineTotal": "2598.00"},
            {"skuCode": "airpods_pro", "quantity": 1, "unitPrice": "249.00", "lineTotal": "249.00"},
        ],
        "total": "2847.00",
        "createdAt": "2025-01-01T10:00:00.000Z",
    }
    data.update(overrides)
    return data


def order_event(order_number: str, *, event_type: str = "order.placed", **data: Any) -> Event:
    return Event(
        type=event_type,
        source="/order-service",
        subject=order_number,
        data=order_data(order_number, **data),
    )


class Orders:
    """The order service's side of the topic: publishes, and sees how far the group got."""

    def __init__(self, url: str) -> None:
        self.log = SqliteEventLog(url, client_id="order-service-test")
        self.published = 0

    async def publish(self, *events: Event) -> None:
        await self.log.publish(ORDERS_TOPIC, events)
        self.published += len(events)

    async def all_handled(self, *, within_s: float = 10.0) -> None:
        async def handled() -> bool:
            done = await self.log.committed(ORDERS_TOPIC, group=CONSUMER_GROUP)
            return done >= self.published

        await until(handled, within_s=within_s)


async def until(check: Callable[[], Any], *, within_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        outcome = check()
        if asyncio.iscoroutine(outcome):
            outcome = await outcome
        if outcome:
            return
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.fixture
def bus_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'events.db'}"


@pytest.fixture
async def orders(bus_url: str) -> AsyncIterator[Orders]:
    publisher = Orders(bus_url)
    try:
        yield publisher
    finally:
        await publisher.log.close()


@asynccontextmanager
async def running(
    data_dir: Path, *, key: rsa.RSAPrivateKey, bus_url: str, **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    platform = PlatformSettings(_env_file=None, data_dir=data_dir, event_bus_url=bus_url)
    options: dict[str, Any] = {
        "sweep_interval_s": 0.05,
        "retry_base_s": 0.1,
        "smtp_timeout_s": 2.0,
        "claim_s": 3.0,
    }
    options.update(overrides)
    app = build_app(platform=platform, settings=NotificationSettings(_env_file=None, **options))
    async with app.router.lifespan_context(app):

        async def fetch_jwks() -> dict[str, Any]:
            return jwks(key)

        app.state.runtime.tokens = JwksVerifier(
            fetch_jwks=fetch_jwks, issuer=ISSUER, audience=AUDIENCE
        )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://notification") as client:
            yield client


async def listed(
    client: httpx.AsyncClient, key: rsa.RSAPrivateKey, user_id: str, **params: str
) -> list[dict[str, Any]]:
    answer = await client.get("/api/notifications", params=params, headers=bearer(key, user_id))
    assert answer.status_code == 200, answer.text
    body: list[dict[str, Any]] = answer.json()
    return body


def reset_consumer_offset(bus_url: str) -> None:
    """What a lost offset commit looks like to the consumer: everything comes again."""
    with closing(sqlite3.connect(bus_url.removeprefix("sqlite:///"))) as db, db:
        db.execute("UPDATE consumer_offsets SET committed = 0 WHERE grp = ?", (CONSUMER_GROUP,))


# --- behaviour --------------------------------------------------------------------------


async def test_order_mail_arrives_once_despite_redelivery_and_restart(
    tmp_path: Path, mail: MailServer, orders: Orders, bus_url: str, signing_key: rsa.RSAPrivateKey
) -> None:
    smtp = {"smtp_host": "127.0.0.1", "smtp_port": mail.port, "smtp_from": "shop@shop.example"}
    placed = order_event("ord-1001")
    async with running(tmp_path, key=signing_key, bus_url=bus_url, **smtp) as client:
        await orders.publish(placed)
        await until(lambda: len(mail.received) == 1)
        (message,) = mail.received
        assert message["To"] == "ada@example.com"
        assert message["From"] == "shop@shop.example"
        assert "ord-1001" in message["Subject"] and "2847.00" in message["Subject"]
        body = message.get_content()
        assert "Total: 2847.00" in body
        assert "2 x iphone_15 at 1299.00 = 2598.00" in body
        assert message["Message-ID"] == f"<order-notice.{placed.id}@shop.example>"

        await orders.publish(placed)  # the bus delivers the same event again
        await orders.all_handled()

        mine = await listed(client, signing_key, "u-ada")
        assert [(n["orderNumber"], n["type"], n["channel"], n["status"]) for n in mine] == [
            ("ord-1001", "ORDER_PLACED", "EMAIL", "SENT")
        ]
        assert set(mine[0]) == {"id", "orderNumber", "type", "channel", "status", "createdAt"}
        assert mine[0]["createdAt"].endswith("Z")
        assert await metric(client, "shop_notifications_sent_total", channel="EMAIL") == 1
        assert await listed(client, signing_key, "u-bob") == []
        assert await listed(client, signing_key, "admin-1", orderNumber="ord-1001") == []

    reset_consumer_offset(bus_url)
    async with running(tmp_path, key=signing_key, bus_url=bus_url, **smtp) as client:
        cancelled = order_event("ord-1001", event_type="order.cancelled", status="CANCELLED")
        await orders.publish(cancelled)
        await orders.all_handled()
        await until(lambda: len(mail.received) == 2)
        assert "cancelled" in mail.received[1]["Subject"]
        mine = await listed(client, signing_key, "u-ada", orderNumber="ord-1001")
        assert [n["type"] for n in mine] == ["ORDER_CANCELLED", "ORDER_PLACED"]
    assert len(mail.received) == 2


async def test_the_list_needs_a_valid_token(
    tmp_path: Path, orders: Orders, bus_url: str, signing_key: rsa.RSAPrivateKey
) -> None:
    async with running(tmp_path, key=signing_key, bus_url=bus_url) as client:
        for headers in ({}, {"Authorization": "Bearer not.a.token"}):
            answer = await client.get("/api/notifications", headers=headers)
            assert answer.status_code == 401
            assert answer.headers["content-type"] == PROBLEM
        other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        forged = await client.get("/api/notifications", headers=bearer(other_key, "u-ada"))
        assert forged.status_code == 401


@pytest.mark.parametrize(
    "params",
    [
        {"orderNumber": "x" * 65},
        {"orderNumber": ""},
        {"limit": "0"},
        {"limit": "101"},
        {"offset": "-1"},
        {"offset": "9223372036854775808"},  # past SQLite's integers: was a 500
        {"offset": "1000000001"},
    ],
)
async def test_bad_query_parameters_are_422(
    tmp_path: Path,
    bus_url: str,
    signing_key: rsa.RSAPrivateKey,
    params: dict[str, str],
) -> None:
    async with running(tmp_path, key=signing_key, bus_url=bus_url) as client:
        answer = await client.get(
            "/api/notifications", params=params, headers=bearer(signing_key, "u-ada")
        )
        assert answer.status_code == 422
        assert answer.headers["content-type"] == PROBLEM
        assert set(answer.json()["errors"]) & {"orderNumber", "limit", "offset"}


async def test_without_smtp_the_notification_is_logged(
    tmp_path: Path,
    orders: Orders,
    bus_url: str,
    signing_key: rsa.RSAPrivateKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("INFO", logger="shop.notification"):
        async with running(tmp_path, key=signing_key, bus_url=bus_url) as client:
            await orders.publish(order_event("ord-2002"))
            await orders.all_handled()
            mine = await listed(client, signing_key, "u-ada")
            ready = await client.get("/health/ready")
            logged = await metric(client, "shop_notifications_sent_total", channel="LOG")
    assert [(n["orderNumber"], n["channel"], n["status"]) for n in mine] == [
        ("ord-2002", "LOG", "LOGGED")
    ]
    assert any(
        "ord-2002" in r.getMessage() and "ada@example.com" in r.getMessage() for r in caplog.records
    )
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "UP", "events": "UP"}
    assert logged == 1


async def test_malformed_events_are_skipped_and_the_next_one_is_handled(
    tmp_path: Path, orders: Orders, bus_url: str, signing_key: rsa.RSAPrivateKey
) -> None:
    async with running(tmp_path, key=signing_key, bus_url=bus_url) as client:
        await orders.publish(
            order_event("ord-bad", email="not an address"),
            order_event("ord-bad-2", total=12.5),
            order_event("ord-good"),
        )
        await orders.all_handled()
        mine = await listed(client, signing_key, "u-ada")
    assert [n["orderNumber"] for n in mine] == ["ord-good"]


async def test_a_mail_server_outage_is_retried_until_the_mail_goes_out(
    tmp_path: Path, orders: Orders, bus_url: str, signing_key: rsa.RSAPrivateKey
) -> None:
    server = MailServer()  # not started yet: connections are refused
    async with running(
        tmp_path, key=signing_key, bus_url=bus_url, smtp_host="127.0.0.1", smtp_port=server.port
    ) as client:
        await orders.publish(order_event("ord-3003"))
        await orders.all_handled()
        (failed,) = await listed(client, signing_key, "u-ada")
        assert (failed["channel"], failed["status"]) == ("EMAIL", "FAILED")
        failures = await metric(client, "shop_notifications_failed_total", channel="EMAIL")
        assert failures is not None and failures >= 1
        async with server.running():
            await until(lambda: len(server.received) == 1)

            async def sent() -> bool:
                (notice,) = await listed(client, signing_key, "u-ada")
                return bool(notice["status"] == "SENT")

            await until(sent)
            await asyncio.sleep(0.3)  # a few more sweeps: nothing goes out twice
        assert len(server.received) == 1
        assert "ord-3003" in server.received[0]["Subject"]
        assert await metric(client, "shop_notifications_sent_total", channel="EMAIL") == 1


# --- the consumer when the handler fails -----------------------------------------------


class FlakyStore(SqlNotificationStore):
    """Fails the first recording, before or after its commit (a connection lost at commit),
    whether of one event or of a batch."""

    def __init__(self, *args: Any, fail_after_commit: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail_after_commit = fail_after_commit
        self.calls = 0

    async def record_event(
        self,
        event_id: str,
        notification: Notification | None,
        *,
        announce: Callable[[Notification], None] | None = None,
    ) -> bool:
        self.calls += 1
        if self.calls == 1 and not self.fail_after_commit:
            raise ConnectionError("database went away")
        recorded = await super().record_event(event_id, notification, announce=announce)
        if self.calls == 1:
            raise ConnectionError("connection lost while committing")
        return recorded

    async def record_events(
        self,
        entries: Sequence[tuple[str, Notification | None]],
        *,
        announce: Callable[[Notification], None] | None = None,
    ) -> list[bool]:
        self.calls += 1
        if self.calls == 1 and not self.fail_after_commit:
            raise ConnectionError("database went away")
        recorded = await super().record_events(entries, announce=announce)
        if self.calls == 1:
            raise ConnectionError("connection lost while committing")
        return recorded


class MailCourier:
    """Stands for the SMTP server: a courier that is not announced in the transaction."""

    channel: Channel = "EMAIL"
    timeout_s: float = 0.05

    def __init__(self) -> None:
        self.delivered: list[Notification] = []

    async def deliver(self, notification: Notification) -> None:
        self.delivered.append(notification)


class LogLines(LogCourier):
    """The log courier, its lines kept."""

    def __init__(self) -> None:
        self.delivered: list[Notification] = []

    def announce(self, notification: Notification) -> None:
        self.delivered.append(notification)


@pytest.mark.parametrize("fail_after_commit", [False, True], ids=["before-commit", "after-commit"])
async def test_a_failing_handler_gets_the_event_again_and_records_it_once(
    database_url: str, bus_url: str, orders: Orders, fail_after_commit: bool
) -> None:
    """E-mail: a record whose commit failed after the fact is the sweeper's to send."""
    engine = create_engine(database_url)
    await migrate(engine, package="shop.notification", service="notification")
    courier = MailCourier()
    store = FlakyStore(engine, fail_after_commit=fail_after_commit)
    service = NotificationService(store=store, couriers=[courier], claim_s=0.2)
    bus = SqliteEventLog(bus_url, client_id="notification-test", retry_backoff_s=0.01)
    try:
        subscribe(bus, service)
        await bus.start()
        await orders.publish(order_event("ord-4004"))
        await orders.all_handled()
        assert store.calls == 2
        if fail_after_commit:
            # Recorded but never sent: the sweeper's case, once the claim has lapsed.
            assert courier.delivered == []
            await asyncio.sleep(0.25)
            assert await service.retry_due() == 1
        (notice,) = await service.notifications_of("u-ada")
        assert notice.status == "SENT"
        assert [n.order_number for n in courier.delivered] == ["ord-4004"]
    finally:
        await bus.close()
        await engine.dispose()


@pytest.mark.parametrize("fail_after_commit", [False, True], ids=["before-commit", "after-commit"])
async def test_a_log_notification_is_recorded_logged_with_its_line_in_one_transaction(
    database_url: str, bus_url: str, orders: Orders, fail_after_commit: bool
) -> None:
    """The log line is written inside the recording transaction: one record however the
    commit fails, the line at least once, and nothing left for the sweeper."""
    engine = create_engine(database_url)
    await migrate(engine, package="shop.notification", service="notification")
    courier = LogLines()
    store = FlakyStore(engine, fail_after_commit=fail_after_commit)
    service = NotificationService(store=store, couriers=[courier], claim_s=0.2)
    bus = SqliteEventLog(bus_url, client_id="notification-test", retry_backoff_s=0.01)
    try:
        subscribe(bus, service)
        await bus.start()
        await orders.publish(order_event("ord-4005"))
        await orders.all_handled()
        assert store.calls == 2
        (notice,) = await service.notifications_of("u-ada")
        assert (notice.status, notice.attempts) == ("LOGGED", 1)
        assert notice.sent_at is not None
        assert [n.order_number for n in courier.delivered] == ["ord-4005"]
        await asyncio.sleep(0.25)
        assert await service.retry_due() == 0
    finally:
        await bus.close()
        await engine.dispose()
