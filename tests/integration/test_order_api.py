"""The order service over HTTP, with real in-process peers.

The app runs with its real lifespan (SQLite and the event log in tmp_path). Product and
inventory are small aiohttp servers that behave like the real ones (a price list; stock
with reservations that are all-or-nothing, idempotent, and released idempotently), found
through a Eureka stand-in. Every peer records what reached it, so a refused order is
shown to have reserved nothing. Like the real ones, the peers take only order-service's
service token (``internal_caller("order-service")``); the order service's token source is
a stand-in handing out one minted with the test key.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI
from sqlalchemy import func, select, text
from sqlalchemy.exc import OperationalError

from shop.order.app import build_app
from shop.order.settings import OrderSettings
from shop.order.store import SqlOrderStore, catalogue_prices, orders, pending_releases
from shop.platform.buses import open_event_bus
from shop.platform.db import create_engine
from shop.platform.events import Event
from shop.platform.outbox import outbox
from shop.platform.security import ServiceTokenUnavailable
from shop.platform.settings import PlatformSettings
from shop.platform.tokens import JwksVerifier
from tests.fakes import FakeRegistry
from tests.support import free_port

PROBLEM = "application/problem+json"
KID = "order-test-key"
PRICES = {
    "iphone_15": "1299.00",
    "pixel_8": "899.00",
    "galaxy_s24": "999.00",
    "airpods_pro": "249.00",
    "kindle_paperwhite": "139.99",
    "usb_c_cable": "12.99",
}
STOCK = {"iphone_15": 100, "pixel_8": 50, "galaxy_s24": 30, "airpods_pro": 200, "usb_c_cable": 500}
INVENTORY_TIMEOUT_S = 0.3
BREAKER_THRESHOLD = 3
BREAKER_OPEN_S = 0.5
RELEASE_INTERVAL_S = 0.05
# Above INVENTORY_TIMEOUT_S, as in production: an attempt ends before the next may start.
RELEASE_BACKOFF_S = 0.4


# --- tokens -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass(frozen=True)
class User:
    user_id: str
    email: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _claims(sub: str, email: str, roles: list[str]) -> dict[str, Any]:
    now = int(time.time())
    return {
        "sub": sub,
        "email": email,
        "roles": roles,
        "iss": "shop-auth",
        # As auth issues them: service tokens for the internal audience only.
        "aud": "shop-internal" if sub.startswith("service:") else "shop",
        "iat": now,
        "exp": now + 900,
        "jti": uuid.uuid4().hex,
    }


def _user(key: rsa.RSAPrivateKey, name: str, *roles: str) -> User:
    user_id, email = str(uuid.uuid4()), f"{name}@example.com"
    claims = _claims(user_id, email, ["customer", *roles])
    token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": KID})
    return User(user_id, email, token)


def _service_token(key: rsa.RSAPrivateKey) -> str:
    claims = _claims("service:order-service", "", ["service"])
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": KID})


class FakeServiceTokens:
    """Stands in for ``runtime.service_tokens``: auth-service's answer, or its outage."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.down = False
        # The instances tokens were asked for: each token is good at one instance only.
        self.targets: list[str] = []

    async def bearer(self, target: str) -> str:
        if self.down:
            raise ServiceTokenUnavailable("auth-service is down (test)")
        self.targets.append(target)
        return f"Bearer {self.token}"


def _jwks(key: rsa.RSAPrivateKey) -> Callable[[], Awaitable[Mapping[str, Any]]]:
    jwk = {
        **json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())),
        "kid": KID,
        "use": "sig",
        "alg": "RS256",
    }

    async def fetch() -> Mapping[str, Any]:
        return {"keys": [jwk]}

    return fetch


# --- the peers ------------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any = None


class Peer:
    """An aiohttp server on a free port that records every request.

    It answers 401 without a token and 403 to anything but ``service_token``, as a real
    ``internal_caller("order-service")`` route does (the signature is the real services' business).
    """

    service_token = ""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.port = 0
        self.failing = False
        self.delay_s = 0.0
        self._runner: web.AppRunner | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        @web.middleware
        async def record(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        ) -> web.StreamResponse:
            body = await request.json() if request.can_read_body else None
            self.seen.append(Seen(request.method, request.path_qs, dict(request.headers), body))
            authorization = request.headers.get("Authorization", "")
            if not authorization.startswith("Bearer "):
                return web.json_response({"title": "Unauthorized"}, status=401)
            if authorization != f"Bearer {self.service_token}":
                return web.json_response({"title": "Forbidden"}, status=403)
            if self.failing:
                return web.json_response({"title": "Internal Server Error"}, status=500)
            return await handler(request)

        app = web.Application(middlewares=[record])
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def requests(self, method: str, path_prefix: str = "") -> list[Seen]:
        return [s for s in self.seen if s.method == method and s.path.startswith(path_prefix)]


class FakeCatalogue(Peer):
    def __init__(self, prices: Mapping[str, str]) -> None:
        super().__init__()
        self.prices = dict(prices)

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/internal/products", self.products)

    async def products(self, request: web.Request) -> web.Response:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        codes = request.query.getall("skuCode", [])
        return web.json_response(
            [
                {"id": f"{i:024x}", "skuCode": code, "name": code, "price": self.prices[code]}
                for i, code in enumerate(codes)
                if code in self.prices
            ]
        )


class FakeInventory(Peer):
    """Stock per SKU, with all-or-nothing reservations keyed by order number."""

    def __init__(self, stock: Mapping[str, int]) -> None:
        super().__init__()
        self.stock = dict(stock)
        self.reservations: dict[str, dict[str, int]] = {}
        self.released: set[str] = set()
        self.failing_releases = False
        # Set: each reservation's answer waits for it (the caller must give up first).
        self.answers_held: asyncio.Event | None = None

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/internal/reservations", self.reserve)
        app.router.add_delete("/internal/reservations/{number}", self.release)

    async def reserve(self, request: web.Request) -> web.Response:
        body = await request.json()
        number = body["orderNumber"]
        lines = {line["skuCode"]: line["quantity"] for line in body["lines"]}
        if number in self.reservations:
            if self.reservations[number] == lines and number not in self.released:
                return web.json_response({"orderNumber": number, "status": "RESERVED"})
            return web.json_response({"title": "Conflict"}, status=409)
        shortages = [
            {"skuCode": sku, "requested": qty, "available": self.stock.get(sku, 0)}
            for sku, qty in lines.items()
            if qty > self.stock.get(sku, 0)
        ]
        if shortages:
            return web.json_response(
                {"title": "Out of stock", "status": 409, "shortages": shortages},
                status=409,
                content_type="application/problem+json",
            )
        for sku, qty in lines.items():
            self.stock[sku] -= qty
        self.reservations[number] = lines
        # Slow after the fact: the caller gives up on a reservation that did happen.
        if self.answers_held is not None:
            await self.answers_held.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return web.json_response({"orderNumber": number, "status": "RESERVED"}, status=201)

    async def release(self, request: web.Request) -> web.Response:
        if self.failing_releases:
            return web.json_response({"title": "Internal Server Error"}, status=500)
        number = request.match_info["number"]
        if number in self.reservations and number not in self.released:
            for sku, qty in self.reservations[number].items():
                self.stock[sku] += qty
            self.released.add(number)
        return web.Response(status=204)


# --- the world ------------------------------------------------------------------------------


@dataclass
class Peers:
    catalogue: FakeCatalogue
    inventory: FakeInventory
    registry: FakeRegistry
    service_token: str


@asynccontextmanager
async def open_peers(key: rsa.RSAPrivateKey) -> AsyncIterator[Peers]:
    catalogue, inventory = FakeCatalogue(PRICES), FakeInventory(STOCK)
    token = _service_token(key)
    for peer in (catalogue, inventory):
        peer.service_token = token
    for peer in (catalogue, inventory):
        await peer.start()
    registry = FakeRegistry(
        {"product-service": [catalogue.port], "inventory-service": [inventory.port]}
    )
    await registry.start()
    try:
        yield Peers(catalogue, inventory, registry, token)
    finally:
        for thing in (registry, inventory, catalogue):
            await thing.stop()


@dataclass
class World:
    client: httpx.AsyncClient
    app: FastAPI
    catalogue: FakeCatalogue
    inventory: FakeInventory
    data_dir: Path
    key: rsa.RSAPrivateKey
    service_tokens: FakeServiceTokens
    users: dict[str, User] = field(default_factory=dict)

    def user(self, name: str, *roles: str) -> User:
        if name not in self.users:
            self.users[name] = _user(self.key, name, *roles)
        return self.users[name]

    async def place(
        self,
        user: User,
        lines: list[dict[str, Any]] | None = None,
        *,
        key: str | None = None,
        body: Any = None,
    ) -> httpx.Response:
        headers = dict(user.headers)
        if key is not None:
            headers["Idempotency-Key"] = key
        payload = body if body is not None else {"orderLineItemDtoList": lines}
        return await self.client.post("/api/order", json=payload, headers=headers)

    async def execute(self, sql: str) -> None:
        """Change the order database behind the service's back (to make it fail)."""
        engine = create_engine(f"sqlite+aiosqlite:///{self.data_dir / 'order.db'}")
        try:
            async with engine.begin() as conn:
                await conn.execute(text(sql))
        finally:
            await engine.dispose()

    async def count(self, table: Any) -> int:
        engine = create_engine(f"sqlite+aiosqlite:///{self.data_dir / 'order.db'}")
        try:
            async with engine.connect() as conn:
                return int(
                    (await conn.execute(select(func.count()).select_from(table))).scalar_one()
                )
        finally:
            await engine.dispose()

    async def events(self) -> list[dict[str, Any]]:
        engine = create_engine(f"sqlite+aiosqlite:///{self.data_dir / 'order.db'}")
        try:
            async with engine.connect() as conn:
                rows = (await conn.execute(select(outbox.c.payload).order_by(outbox.c.seq))).all()
        finally:
            await engine.dispose()
        return [json.loads(row.payload) for row in rows]


@asynccontextmanager
async def run_order_service(
    data_dir: Path, key: rsa.RSAPrivateKey, peers: Peers, **overrides: Any
) -> AsyncIterator[World]:
    platform = PlatformSettings(data_dir=data_dir, registry_url=peers.registry.url)
    settings = OrderSettings(
        _env_file=None,
        **{
            "inventory_timeout_s": INVENTORY_TIMEOUT_S,
            "breaker_failure_threshold": BREAKER_THRESHOLD,
            "breaker_open_s": BREAKER_OPEN_S,
            "release_interval_s": RELEASE_INTERVAL_S,
            "release_backoff_s": RELEASE_BACKOFF_S,
            "outbox_poll_interval_s": 0.05,
            **overrides,
        },
    )
    app = build_app(platform=platform, settings=settings)
    service_tokens = FakeServiceTokens(peers.service_token)
    async with app.router.lifespan_context(app):
        app.state.runtime.tokens = JwksVerifier(
            fetch_jwks=_jwks(key), issuer="shop-auth", audience="shop"
        )
        app.state.runtime.service_tokens = service_tokens
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://order") as client:
            yield World(
                client, app, peers.catalogue, peers.inventory, data_dir, key, service_tokens
            )


@asynccontextmanager
async def open_world(
    data_dir: Path, key: rsa.RSAPrivateKey, **overrides: Any
) -> AsyncIterator[World]:
    async with (
        open_peers(key) as peers,
        run_order_service(data_dir, key, peers, **overrides) as world,
    ):
        yield world


@pytest.fixture
async def world(tmp_path: Path, signing_key: rsa.RSAPrivateKey) -> AsyncIterator[World]:
    async with open_world(tmp_path, signing_key) as opened:
        yield opened


async def eventually(check: Callable[[], bool], *, within_s: float = 2.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def eventually_async(
    read: Callable[[], Awaitable[Any]], expected: Any, *, within_s: float = 3.0
) -> None:
    deadline = time.monotonic() + within_s
    while (value := await read()) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"still {value!r}, not {expected!r}")
        await asyncio.sleep(0.02)


def _problem(answer: httpx.Response, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == PROBLEM
    body: dict[str, Any] = answer.json()
    return body


# --- placing orders -------------------------------------------------------------------------


async def test_an_order_is_priced_from_the_catalogue_and_its_stock_reserved(
    world: World,
) -> None:
    ada = world.user("ada")
    answer = await world.place(
        ada,
        [
            {
                "skuCode": "iphone_15",
                "quantity": 2,
                "price": "1.00",
            },  # the client's price is ignored
            {"skuCode": "usb_c_cable", "quantity": 3},
        ],
    )
    assert answer.status_code == 201, answer.text
    order = answer.json()
    assert uuid.UUID(order["orderNumber"]).version == 4
    assert answer.headers["location"] == f"/api/order/{order['orderNumber']}"
    assert order["status"] == "PLACED"
    assert order["userId"] == ada.user_id
    assert order["lines"] == [
        {"skuCode": "iphone_15", "quantity": 2, "unitPrice": "1299.00", "lineTotal": "2598.00"},
        {"skuCode": "usb_c_cable", "quantity": 3, "unitPrice": "12.99", "lineTotal": "38.97"},
    ]
    assert order["total"] == "2636.97"
    assert order["createdAt"].endswith("Z")

    assert world.inventory.stock["iphone_15"] == STOCK["iphone_15"] - 2
    assert world.inventory.reservations[order["orderNumber"]] == {
        "iphone_15": 2,
        "usb_c_cable": 3,
    }
    # This service's own token (not the caller's) and this request's identity travelled.
    request_id = answer.headers["x-request-id"]
    for peer in (world.catalogue, world.inventory):
        seen = peer.seen[-1]
        assert seen.headers["Authorization"] == f"Bearer {world.service_tokens.token}"
        assert f"http://127.0.0.1:{peer.port}" in world.service_tokens.targets
        assert seen.headers["X-Request-ID"] == request_id
        assert seen.headers["traceparent"].startswith("00-")

    again = await world.client.get(f"/api/order/{order['orderNumber']}", headers=ada.headers)
    assert again.status_code == 200
    assert again.json() == order

    [event] = await world.events()
    assert event["type"] == "order.placed"
    assert event["subject"] == order["orderNumber"]
    assert event["source"] == "/order-service"
    assert event["data"] == {**order, "email": "ada@example.com"}


async def test_the_items_alias_is_accepted(world: World) -> None:
    answer = await world.place(
        world.user("ada"), body={"items": [{"skuCode": "pixel_8", "quantity": 1}]}
    )
    assert answer.status_code == 201, answer.text
    assert answer.json()["total"] == "899.00"


async def test_placed_events_leave_through_the_relay(world: World) -> None:
    answer = await world.place(world.user("ada"), [{"skuCode": "pixel_8", "quantity": 1}])
    assert answer.status_code == 201
    engine = create_engine(f"sqlite+aiosqlite:///{world.data_dir / 'events.db'}")
    try:
        deadline = time.monotonic() + 3.0
        while True:
            try:
                async with engine.connect() as conn:
                    rows = (
                        await conn.execute(text("SELECT topic, key, payload FROM events"))
                    ).all()
            except OperationalError as exc:
                # The log creates its schema on first use: until then there is nothing yet.
                if "no such table" not in str(exc):
                    raise
                rows = []
            if rows or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
    finally:
        await engine.dispose()
    assert [(r.topic, r.key) for r in rows] == [("orders", answer.json()["orderNumber"])]
    assert json.loads(rows[0].payload)["data"]["email"] == "ada@example.com"


async def test_out_of_stock_names_each_short_line_and_keeps_nothing(world: World) -> None:
    answer = await world.place(
        world.user("ada"),
        [
            {"skuCode": "iphone_15", "quantity": 1},
            {"skuCode": "pixel_8", "quantity": 51},
            {"skuCode": "kindle_paperwhite", "quantity": 1},
        ],
    )
    problem = _problem(answer, 409)
    assert problem["shortages"] == [
        {"skuCode": "pixel_8", "requested": 51, "available": 50},
        {"skuCode": "kindle_paperwhite", "requested": 1, "available": 0},
    ]
    assert "pixel_8 (requested 51, available 50)" in problem["detail"]
    assert world.inventory.stock == STOCK
    assert await world.count(orders) == 0
    assert await world.count(outbox) == 0


async def test_invalid_orders_are_refused_and_change_nothing(world: World) -> None:
    ada = world.user("ada")
    cases: list[tuple[Any, dict[str, str], str]] = [
        ({"orderLineItemDtoList": []}, {}, "orderLineItemDtoList"),
        (
            {"orderLineItemDtoList": [{"skuCode": "iphone_15", "quantity": 0}]},
            {},
            "orderLineItemDtoList.0.quantity",
        ),
        (
            {"orderLineItemDtoList": [{"skuCode": "iphone_15", "quantity": -2}]},
            {},
            "orderLineItemDtoList.0.quantity",
        ),
        (
            {"orderLineItemDtoList": [{"skuCode": "iphone_15", "quantity": 1001}]},
            {},
            "orderLineItemDtoList.0.quantity",
        ),
        (
            {"orderLineItemDtoList": [{"skuCode": "iphone_15", "quantity": "lots"}]},
            {},
            "orderLineItemDtoList.0.quantity",
        ),
        (
            {
                "orderLineItemDtoList": [
                    {"skuCode": "iphone_15", "quantity": 1},
                    {"skuCode": "iphone_15", "quantity": 2},
                ]
            },
            {},
            "orderLineItemDtoList.1.skuCode",
        ),
        ({"orderLineItemDtoList": [{"quantity": 1}]}, {}, "orderLineItemDtoList.0.skuCode"),
        ({"lines": [{"skuCode": "iphone_15", "quantity": 1}]}, {}, "orderLineItemDtoList"),
        ([1, 2], {}, "body"),
        (
            {"orderLineItemDtoList": [{"skuCode": "iphone_15", "quantity": 1}]},
            {"Idempotency-Key": "has spaces"},
            "Idempotency-Key",
        ),
        (
            {"orderLineItemDtoList": [{"skuCode": "iphone_15", "quantity": 1}]},
            {"Idempotency-Key": "k" * 256},
            "Idempotency-Key",
        ),
    ]
    for body, headers, field_path in cases:
        answer = await world.client.post(
            "/api/order", json=body, headers={**ada.headers, **headers}
        )
        problem = _problem(answer, 422)
        assert field_path in problem["errors"], (body, problem)

    malformed = await world.client.post(
        "/api/order",
        content=b'{"orderLineItemDtoList": [',
        headers={**ada.headers, "Content-Type": "application/json"},
    )
    assert _problem(malformed, 422)["errors"] == {"body": "is not valid JSON"}

    assert world.inventory.requests("POST") == []
    assert await world.count(orders) == 0
    assert await world.count(outbox) == 0


async def test_unknown_skus_are_each_named_and_nothing_is_reserved(world: World) -> None:
    answer = await world.place(
        world.user("ada"),
        [
            {"skuCode": "iphone_15", "quantity": 1},
            {"skuCode": "nokia_3310", "quantity": 1},
            {"skuCode": "walkman", "quantity": 1},
        ],
    )
    problem = _problem(answer, 422)
    assert problem["errors"] == {
        "orderLineItemDtoList.1.skuCode": "unknown SKU 'nokia_3310'",
        "orderLineItemDtoList.2.skuCode": "unknown SKU 'walkman'",
    }
    assert "nokia_3310, walkman" in problem["detail"]
    assert world.inventory.requests("POST") == []
    assert await world.count(orders) == 0


async def test_a_token_is_required(world: World) -> None:
    answer = await world.client.post(
        "/api/order", json={"orderLineItemDtoList": [{"skuCode": "iphone_15", "quantity": 1}]}
    )
    _problem(answer, 401)
    _problem(await world.client.get("/api/order"), 401)
    assert world.catalogue.seen == []


# --- Idempotency-Key ----------------------------------------------------------------------


async def test_a_repeated_request_gets_the_first_answer_and_orders_once(world: World) -> None:
    ada = world.user("ada")
    lines = [{"skuCode": "galaxy_s24", "quantity": 3}]
    first = await world.place(ada, lines, key="checkout-1")
    assert first.status_code == 201
    again = await world.client.post(
        "/api/order",
        # The same body, spelt differently: key order and spacing do not make it another.
        content=b'{ "orderLineItemDtoList" : [ {"quantity": 3, "skuCode": "galaxy_s24"} ] }',
        headers={
            **ada.headers,
            "Idempotency-Key": "checkout-1",
            "Content-Type": "application/json",
        },
    )
    assert again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"]
    assert len(world.inventory.requests("POST")) == 1
    assert world.inventory.stock["galaxy_s24"] == STOCK["galaxy_s24"] - 3
    assert await world.count(orders) == 1
    assert await world.count(outbox) == 1

    other = await world.place(ada, [{"skuCode": "galaxy_s24", "quantity": 4}], key="checkout-1")
    mismatch = _problem(other, 409)
    assert "different request body" in mismatch["detail"]
    assert mismatch["type"] == "https://shop.dev/problems/idempotency-mismatch"
    # Keys belong to one user: another user's identical key is theirs alone.
    bob = await world.place(world.user("bob"), lines, key="checkout-1")
    assert bob.status_code == 201
    assert bob.json()["orderNumber"] != first.json()["orderNumber"]
    assert await world.count(orders) == 2


async def test_a_refused_attempt_frees_its_key(world: World) -> None:
    ada = world.user("ada")
    lines = [{"skuCode": "airpods_pro", "quantity": 250}]
    _problem(await world.place(ada, lines, key="k-1"), 409)
    world.inventory.stock["airpods_pro"] = 300  # restocked
    retry = await world.place(ada, lines, key="k-1")
    assert retry.status_code == 201, retry.text
    assert await world.count(orders) == 1


async def test_a_duplicate_while_the_first_is_in_flight_is_told_so(world: World) -> None:
    ada = world.user("ada")
    world.catalogue.delay_s = 0.3
    lines = [{"skuCode": "pixel_8", "quantity": 1}]
    first = asyncio.create_task(world.place(ada, lines, key="double-click"))
    await eventually(lambda: len(world.catalogue.seen) == 1)  # the first holds the key
    second = await world.place(ada, lines, key="double-click")
    problem = _problem(second, 409)
    assert "in progress" in problem["detail"]
    # Not the "different body" conflict: this one a client waits out and retries.
    assert problem["type"] == "https://shop.dev/problems/idempotency-in-progress"
    assert second.headers["retry-after"] == "1"
    assert (await first).status_code == 201
    assert len(world.inventory.requests("POST")) == 1
    replay = await world.place(ada, lines, key="double-click")
    assert replay.json() == (await first).json()


# --- reading orders -------------------------------------------------------------------------


async def test_a_user_lists_their_own_orders_newest_first(world: World) -> None:
    ada, bob = world.user("ada"), world.user("bob")
    placed = []
    for sku in ("iphone_15", "pixel_8", "galaxy_s24"):
        answer = await world.place(ada, [{"skuCode": sku, "quantity": 1}])
        placed.append(answer.json()["orderNumber"])
    await world.place(bob, [{"skuCode": "airpods_pro", "quantity": 1}])

    listed = await world.client.get("/api/order", headers=ada.headers)
    assert listed.status_code == 200
    assert listed.headers["x-total-count"] == "3"
    assert [o["orderNumber"] for o in listed.json()] == placed[::-1]
    assert listed.json()[0]["lines"][0]["skuCode"] == "galaxy_s24"

    page = await world.client.get("/api/order?limit=2&offset=1", headers=ada.headers)
    assert [o["orderNumber"] for o in page.json()] == placed[1::-1]
    assert page.headers["x-total-count"] == "3"

    for query in ("limit=0", "limit=101", "offset=-1", "limit=many"):
        _problem(await world.client.get(f"/api/order?{query}", headers=ada.headers), 422)


async def test_another_users_order_is_not_found_but_an_admin_sees_it(world: World) -> None:
    ada, bob, admin = world.user("ada"), world.user("bob"), world.user("root", "admin")
    number = (await world.place(ada, [{"skuCode": "pixel_8", "quantity": 1}])).json()["orderNumber"]
    _problem(await world.client.get(f"/api/order/{number}", headers=bob.headers), 404)
    seen_by_admin = await world.client.get(f"/api/order/{number}", headers=admin.headers)
    assert seen_by_admin.status_code == 200
    assert seen_by_admin.json()["userId"] == ada.user_id
    assert (await world.client.get(f"/api/order/{number.upper()}", headers=ada.headers)).json()[
        "orderNumber"
    ] == number
    for missing in (str(uuid.uuid4()), "not-a-uuid", "1" * 300):
        _problem(await world.client.get(f"/api/order/{missing}", headers=ada.headers), 404)


# --- cancelling -----------------------------------------------------------------------------


async def test_cancel_releases_the_stock_once(world: World) -> None:
    ada = world.user("ada")
    placed = (await world.place(ada, [{"skuCode": "iphone_15", "quantity": 5}])).json()
    number = placed["orderNumber"]
    assert world.inventory.stock["iphone_15"] == 95

    _problem(
        await world.client.post(f"/api/order/{number}/cancel", headers=world.user("bob").headers),
        404,
    )
    cancelled = await world.client.post(f"/api/order/{number}/cancel", headers=ada.headers)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json() == {**placed, "status": "CANCELLED"}
    assert world.inventory.stock["iphone_15"] == 100
    assert [s.path for s in world.inventory.requests("DELETE")] == [
        f"/internal/reservations/{number}"
    ]

    again = await world.client.post(f"/api/order/{number}/cancel", headers=ada.headers)
    assert "already cancelled" in _problem(again, 409)["detail"]
    assert len(world.inventory.requests("DELETE")) == 1
    shown = await world.client.get(f"/api/order/{number}", headers=ada.headers)
    assert shown.json()["status"] == "CANCELLED"

    types = [(e["type"], e["data"]["status"], e["data"]["email"]) for e in await world.events()]
    assert types == [
        ("order.placed", "PLACED", "ada@example.com"),
        ("order.cancelled", "CANCELLED", "ada@example.com"),
    ]
    _problem(await world.client.post(f"/api/order/{uuid.uuid4()}/cancel", headers=ada.headers), 404)


async def test_concurrent_cancels_cancel_once(world: World) -> None:
    ada = world.user("ada")
    number = (await world.place(ada, [{"skuCode": "pixel_8", "quantity": 2}])).json()["orderNumber"]
    answers = await asyncio.gather(
        *(world.client.post(f"/api/order/{number}/cancel", headers=ada.headers) for _ in range(3))
    )
    assert sorted(a.status_code for a in answers) == [200, 409, 409]
    assert world.inventory.stock["pixel_8"] == 50
    assert [e["type"] for e in await world.events()].count("order.cancelled") == 1


async def test_cancel_while_the_inventory_fails_cancels_and_releases_later(
    world: World,
) -> None:
    ada = world.user("ada")
    number = (await world.place(ada, [{"skuCode": "pixel_8", "quantity": 2}])).json()["orderNumber"]
    world.inventory.failing = True
    cancelled = await world.client.post(f"/api/order/{number}/cancel", headers=ada.headers)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "CANCELLED"
    assert len(world.inventory.requests("DELETE")) == 1  # tried at once, and failed
    assert world.inventory.stock["pixel_8"] == 48
    assert [e["type"] for e in await world.events()] == ["order.placed", "order.cancelled"]
    assert await world.count(pending_releases) == 1
    again = await world.client.post(f"/api/order/{number}/cancel", headers=ada.headers)
    _problem(again, 409)

    world.inventory.failing = False
    await eventually(lambda: world.inventory.stock["pixel_8"] == 50)
    await eventually_async(lambda: world.count(pending_releases), 0)
    assert world.inventory.released == {number}


# --- when peers fail ------------------------------------------------------------------------


async def test_the_breaker_opens_answers_at_once_and_closes_after_a_probe(world: World) -> None:
    ada = world.user("ada")
    lines = [{"skuCode": "pixel_8", "quantity": 1}]
    world.inventory.failing = True
    for _ in range(BREAKER_THRESHOLD):
        failed = await world.place(ada, lines)
        _problem(failed, 503)
        assert "retry-after" in failed.headers
    # A 5xx may hide a reservation that happened: each is released in the background.
    failed_numbers = {seen.body["orderNumber"] for seen in world.inventory.requests("POST")}
    await eventually(
        lambda: (
            {s.path.rsplit("/", 1)[-1] for s in world.inventory.requests("DELETE")}
            == failed_numbers
        )
    )
    reserves = len(world.inventory.requests("POST"))

    started = time.perf_counter()
    refused = await world.place(ada, lines)
    elapsed = time.perf_counter() - started
    problem = _problem(refused, 503)
    assert "circuit open" in problem["detail"]
    assert elapsed < 0.1
    assert 1 <= int(refused.headers["retry-after"]) <= BREAKER_OPEN_S + 1
    assert len(world.inventory.requests("POST")) == reserves  # the inventory was not asked

    world.inventory.failing = False
    await asyncio.sleep(BREAKER_OPEN_S)
    probe = await world.place(ada, lines)
    assert probe.status_code == 201, probe.text
    assert (await world.place(ada, lines)).status_code == 201
    assert await world.count(orders) == 2
    assert world.inventory.stock["pixel_8"] == 48
    # The background releases of the failed attempts end once the inventory confirms them.
    await eventually_async(lambda: world.count(pending_releases), 0)


async def test_a_failed_probe_opens_the_breaker_again(world: World) -> None:
    ada = world.user("ada")
    lines = [{"skuCode": "pixel_8", "quantity": 1}]
    world.inventory.failing = True
    for _ in range(BREAKER_THRESHOLD):
        _problem(await world.place(ada, lines), 503)
    await asyncio.sleep(BREAKER_OPEN_S)
    posts = len(world.inventory.requests("POST"))
    _problem(await world.place(ada, lines), 503)  # the probe, failing
    assert len(world.inventory.requests("POST")) == posts + 1
    refused = await world.place(ada, lines)
    assert "circuit open" in _problem(refused, 503)["detail"]
    assert len(world.inventory.requests("POST")) == posts + 1


async def test_a_timed_out_reservation_is_released_in_the_background(world: World) -> None:
    ada = world.user("ada")
    held = world.inventory.answers_held = asyncio.Event()
    # The inventory does not answer until the order is answered: only the order service's
    # own time-out can end the wait (no clock read here: a loaded machine must not matter).
    answer = await asyncio.wait_for(
        world.place(ada, [{"skuCode": "galaxy_s24", "quantity": 4}]), 30
    )
    held.set()
    _problem(answer, 503)
    [number] = world.inventory.reservations  # it did reserve, too late
    await eventually(lambda: number in world.inventory.released)
    assert world.inventory.stock["galaxy_s24"] == STOCK["galaxy_s24"]
    assert await world.count(orders) == 0
    assert await world.count(outbox) == 0
    await eventually_async(lambda: world.count(pending_releases), 0)


async def test_an_unreachable_catalogue_is_a_503_that_reserves_nothing(world: World) -> None:
    world.catalogue.failing = True
    answer = await world.place(world.user("ada"), [{"skuCode": "pixel_8", "quantity": 1}])
    assert "catalogue" in _problem(answer, 503)["detail"]
    assert answer.headers["retry-after"] == "2"
    assert world.inventory.seen == []


async def test_unreachable_inventory_is_a_503(
    tmp_path: Path, signing_key: rsa.RSAPrivateKey
) -> None:
    async with open_world(tmp_path, signing_key) as down:
        await down.inventory.stop()
        answer = await down.place(down.user("ada"), [{"skuCode": "pixel_8", "quantity": 1}])
        _problem(answer, 503)
        assert await down.count(orders) == 0


async def test_readiness_checks_the_database_and_the_event_log(world: World) -> None:
    ready = await world.client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "UP", "events": "UP"}


async def test_the_same_lines_are_the_same_request_however_they_are_sent(world: World) -> None:
    ada = world.user("ada")
    first = await world.place(
        ada,
        [
            {"skuCode": "pixel_8", "quantity": 1, "price": "1.00"},
            {"skuCode": "airpods_pro", "quantity": 2},
        ],
        key="checkout-2",
    )
    assert first.status_code == 201, first.text
    # Under ``items``, in another order, without the (ignored) client price.
    again = await world.place(
        ada,
        body={
            "items": [
                {"skuCode": "airpods_pro", "quantity": 2},
                {"skuCode": "pixel_8", "quantity": 1},
            ]
        },
        key="checkout-2",
    )
    assert again.status_code == 201, again.text
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert len(world.inventory.requests("POST")) == 1
    assert await world.count(orders) == 1

    more = await world.place(
        ada,
        body={
            "items": [
                {"skuCode": "airpods_pro", "quantity": 3},
                {"skuCode": "pixel_8", "quantity": 1},
            ]
        },
        key="checkout-2",
    )
    assert _problem(more, 409)["type"] == "https://shop.dev/problems/idempotency-mismatch"
    assert len(world.inventory.requests("POST")) == 1


# --- prices -----------------------------------------------------------------------------------


async def test_prices_up_to_the_catalogues_limit_are_ordered(world: World) -> None:
    world.catalogue.prices["yacht"] = "9999999999.99"
    world.inventory.stock["yacht"] = 1000
    ada = world.user("ada")
    answer = await world.place(ada, [{"skuCode": "yacht", "quantity": 1000}])
    assert answer.status_code == 201, answer.text
    order = answer.json()
    assert order["lines"][0]["unitPrice"] == "9999999999.99"
    assert order["total"] == "9999999999990.00"
    shown = await world.client.get(f"/api/order/{order['orderNumber']}", headers=ada.headers)
    assert shown.json() == order
    [event] = await world.events()
    assert event["data"]["total"] == "9999999999990.00"


async def test_a_price_the_catalogue_would_never_accept_is_a_502(world: World) -> None:
    world.catalogue.prices["yacht"] = "10000000000.00"
    world.inventory.stock["yacht"] = 1
    answer = await world.place(world.user("ada"), [{"skuCode": "yacht", "quantity": 1}])
    _problem(answer, 502)
    assert world.inventory.requests("POST") == []
    assert await world.count(orders) == 0


# --- service identity -----------------------------------------------------------------------


async def test_without_a_service_token_orders_wait_and_cancels_release_later(
    world: World,
) -> None:
    ada = world.user("ada")
    number = (await world.place(ada, [{"skuCode": "pixel_8", "quantity": 2}])).json()["orderNumber"]
    asked = len(world.catalogue.seen) + len(world.inventory.seen)
    world.service_tokens.down = True

    refused = await world.place(ada, [{"skuCode": "pixel_8", "quantity": 1}])
    assert "authenticate" in _problem(refused, 503)["detail"]
    assert refused.headers["retry-after"] == "2"
    cancelled = await world.client.post(f"/api/order/{number}/cancel", headers=ada.headers)
    assert cancelled.status_code == 200, cancelled.text
    assert len(world.catalogue.seen) + len(world.inventory.seen) == asked  # no one was asked
    assert await world.count(orders) == 1
    assert world.inventory.stock["pixel_8"] == 48
    # An outage of auth is not the inventory's: its breaker stays closed.
    assert world.app.state.inventory_breaker.state.value == "closed"

    world.service_tokens.down = False
    await eventually(lambda: world.inventory.stock["pixel_8"] == 50)
    await eventually_async(lambda: world.count(pending_releases), 0)


# --- durable releases -----------------------------------------------------------------------

FAIL_ORDER_INSERTS = (
    "CREATE TRIGGER fail_orders BEFORE INSERT ON orders"
    " BEGIN SELECT RAISE(ABORT, 'disk I/O error (test)'); END"
)


async def test_an_order_that_fails_to_save_after_its_reservation_gives_the_stock_back(
    world: World,
) -> None:
    await world.execute(FAIL_ORDER_INSERTS)
    answer = await world.place(world.user("ada"), [{"skuCode": "galaxy_s24", "quantity": 4}])
    assert "could not be saved" in _problem(answer, 503)["detail"]
    [number] = world.inventory.reservations  # reserved before the save failed
    await eventually(lambda: number in world.inventory.released)
    assert world.inventory.stock["galaxy_s24"] == STOCK["galaxy_s24"]
    await eventually_async(lambda: world.count(pending_releases), 0)
    assert await world.count(orders) == 0
    assert await world.count(outbox) == 0

    await world.execute("DROP TRIGGER fail_orders")
    retried = await world.place(world.user("ada"), [{"skuCode": "galaxy_s24", "quantity": 4}])
    assert retried.status_code == 201, retried.text
    assert await world.count(pending_releases) == 0


async def test_a_release_still_pending_at_shutdown_is_done_after_a_restart(
    tmp_path: Path, signing_key: rsa.RSAPrivateKey
) -> None:
    async with open_peers(signing_key) as peers:
        inventory = peers.inventory
        async with run_order_service(tmp_path, signing_key, peers) as first:
            await first.execute(FAIL_ORDER_INSERTS)
            inventory.failing_releases = True
            answer = await first.place(first.user("ada"), [{"skuCode": "pixel_8", "quantity": 5}])
            _problem(answer, 503)
            [number] = inventory.reservations
            await eventually(lambda: len(inventory.requests("DELETE")) >= 1)
        # The process is gone; the release it owed is not.
        assert inventory.stock["pixel_8"] == STOCK["pixel_8"] - 5
        inventory.failing_releases = False
        async with run_order_service(tmp_path, signing_key, peers) as second:
            await eventually(lambda: number in inventory.released)
            assert inventory.stock["pixel_8"] == STOCK["pixel_8"]
            await eventually_async(lambda: second.count(pending_releases), 0)
            assert await second.count(orders) == 0


async def test_a_reservation_whose_process_died_before_the_save_is_released_once_due(
    tmp_path: Path, signing_key: rsa.RSAPrivateKey
) -> None:
    hold_s = 1.0
    async with open_world(tmp_path, signing_key, release_hold_s=hold_s) as world:
        # What a process leaves when it dies between reserving and saving: the pending
        # release it wrote first, and the reservation at the inventory; no order.
        number = str(uuid.uuid4())
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'order.db'}")
        due = datetime.now(UTC) + timedelta(seconds=hold_s)
        try:
            await SqlOrderStore(engine).hold_release(number, due_at=due)
        finally:
            await engine.dispose()
        async with httpx.AsyncClient() as peer:
            reserved = await peer.post(
                f"http://127.0.0.1:{world.inventory.port}/internal/reservations",
                json={"orderNumber": number, "lines": [{"skuCode": "iphone_15", "quantity": 7}]},
                headers={"Authorization": f"Bearer {world.service_tokens.token}"},
            )
        assert reserved.status_code == 201
        assert world.inventory.stock["iphone_15"] == STOCK["iphone_15"] - 7

        await asyncio.sleep(hold_s / 4)
        # Until it is due, the order might still be saved: no release yet. (Checked only
        # while it is not due: on a slow machine the hold may be over by now.)
        looked_at = datetime.now(UTC)
        assert world.inventory.requests("DELETE") == [] or looked_at >= due
        await eventually(lambda: number in world.inventory.released)
        assert world.inventory.stock["iphone_15"] == STOCK["iphone_15"]
        await eventually_async(lambda: world.count(pending_releases), 0)
        assert len(world.inventory.requests("DELETE")) == 1


# --- the price list: prices from the catalogue's events -------------------------------------


def _product_event(
    type_: str, product_id: str, sku: str, price: str, *, at: datetime | None = None
) -> Event:
    moment = (at or datetime.now(UTC)).isoformat(timespec="milliseconds")
    return Event(
        type=type_,
        source="/product-service",
        subject=product_id,
        data={
            "id": product_id,
            "name": sku,
            "description": "",
            "price": price,
            "skuCode": sku,
            "category": "phones",
            "createdAt": "2026-01-01T00:00:00.000Z",
        },
        time=moment.replace("+00:00", "Z"),
    )


async def publish_products(world: World, *events: Event) -> None:
    """As product-service's relay does: onto ``products``; then wait for order-service."""
    url = f"sqlite:///{(world.data_dir / 'events.db').resolve()}"
    async with open_event_bus(url, client_id="product-service-test") as bus:
        await bus.publish("products", list(events))
        deadline = time.monotonic() + 5.0
        while await bus.pending("products", group="order-service"):
            assert time.monotonic() < deadline, "order-service did not catch up"
            await asyncio.sleep(0.02)


async def test_an_order_is_priced_from_the_catalogues_events_without_asking_it(
    world: World,
) -> None:
    await publish_products(
        world,
        _product_event("product.created", "p-iphone", "iphone_15", "1249.00"),
        _product_event("product.created", "p-cable", "usb_c_cable", "9.99"),
    )
    assert await world.count(catalogue_prices) == 2
    answer = await world.place(
        world.user("ada"),
        [{"skuCode": "iphone_15", "quantity": 2}, {"skuCode": "usb_c_cable", "quantity": 1}],
    )
    assert answer.status_code == 201, answer.text
    assert [line["unitPrice"] for line in answer.json()["lines"]] == ["1249.00", "9.99"]
    assert answer.json()["total"] == "2507.99"
    assert world.catalogue.seen == []  # the catalogue was not asked


async def test_an_update_reprices_and_an_older_event_does_not(world: World) -> None:
    then = datetime.now(UTC) - timedelta(minutes=1)
    created = _product_event("product.created", "p-pixel", "pixel_8", "899.00", at=then)
    await publish_products(world, created)
    await publish_products(world, _product_event("product.updated", "p-pixel", "pixel_8", "799.00"))
    # A replayed older event (a dead letter put back comes after later events of its key).
    stale = _product_event("product.updated", "p-pixel", "pixel_8", "999.00", at=then)
    await publish_products(world, stale, created)
    answer = await world.place(world.user("ada"), [{"skuCode": "pixel_8", "quantity": 1}])
    assert answer.status_code == 201, answer.text
    assert answer.json()["lines"][0]["unitPrice"] == "799.00"
    assert world.catalogue.seen == []


async def test_a_sku_missing_from_the_price_list_is_priced_by_the_catalogue(
    world: World,
) -> None:
    await publish_products(
        world, _product_event("product.created", "p-s24", "galaxy_s24", "949.00")
    )
    answer = await world.place(
        world.user("ada"),
        [{"skuCode": "galaxy_s24", "quantity": 1}, {"skuCode": "airpods_pro", "quantity": 1}],
    )
    assert answer.status_code == 201, answer.text
    assert [line["unitPrice"] for line in answer.json()["lines"]] == ["949.00", "249.00"]
    # Asked for the one price the list lacks, and only that one.
    [asked] = world.catalogue.requests("GET", "/internal/products")
    assert asked.path == "/internal/products?skuCode=airpods_pro"


async def test_a_deleted_product_is_no_longer_priced_from_the_list(world: World) -> None:
    await publish_products(
        world,
        _product_event("product.created", "p-walkman", "walkman", "99.00"),
        _product_event("product.deleted", "p-walkman", "walkman", "99.00"),
    )
    refused = await world.place(world.user("ada"), [{"skuCode": "walkman", "quantity": 1}])
    problem = _problem(refused, 422)
    assert problem["errors"] == {"orderLineItemDtoList.0.skuCode": "unknown SKU 'walkman'"}
    assert len(world.catalogue.requests("GET")) == 1  # the catalogue had the last word
    assert world.inventory.requests("POST") == []
    assert await world.count(pending_releases) == 0


# --- ORDER_PRICE_SOURCE=catalogue: every order priced by the catalogue itself ---------------


@pytest.fixture
async def catalogue_priced(tmp_path: Path, signing_key: rsa.RSAPrivateKey) -> AsyncIterator[World]:
    async with open_world(tmp_path, signing_key, price_source="catalogue") as opened:
        yield opened


async def test_the_catalogue_source_charges_a_new_price_before_its_event_arrives(
    catalogue_priced: World,
) -> None:
    world = catalogue_priced
    await publish_products(world, _product_event("product.created", "p-pixel", "pixel_8", "899.00"))
    # The catalogue has changed the price; its event has not reached the price list yet.
    world.catalogue.prices["pixel_8"] = "799.00"
    answer = await world.place(world.user("ada"), [{"skuCode": "pixel_8", "quantity": 2}])
    assert answer.status_code == 201, answer.text
    assert answer.json()["lines"][0]["unitPrice"] == "799.00"
    assert answer.json()["total"] == "1598.00"
    [asked] = world.catalogue.requests("GET", "/internal/products")
    assert asked.path == "/internal/products?skuCode=pixel_8"
    # The list still follows the catalogue's events, for a switch back to it.
    assert await world.count(catalogue_prices) == 1


async def test_the_catalogue_source_refuses_with_503_when_the_catalogue_is_down(
    catalogue_priced: World,
) -> None:
    world = catalogue_priced
    await publish_products(world, _product_event("product.created", "p-pixel", "pixel_8", "899.00"))
    world.catalogue.failing = True
    lines, key = [{"skuCode": "pixel_8", "quantity": 1}], str(uuid.uuid4())
    answer = await world.place(world.user("ada"), lines, key=key)
    # The price list's price is no fallback: it may be older than the catalogue's.
    assert "catalogue" in _problem(answer, 503)["detail"]
    assert answer.headers["retry-after"] == "2"
    assert world.inventory.seen == []
    assert await world.count(orders) == 0
    assert await world.count(pending_releases) == 0
    # Once the catalogue is back, the same request goes through.
    world.catalogue.failing = False
    retried = await world.place(world.user("ada"), lines, key=key)
    assert retried.status_code == 201, retried.text
