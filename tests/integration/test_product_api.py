"""The product service over HTTP: the app with its real lifespan, on a SQLite file in
tmp_path and on a MongoDB database of its own (every test that takes ``shop``)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI
from sqlalchemy import func, select

from shop.platform.buses import open_event_bus
from shop.platform.db import create_engine
from shop.platform.events import Event
from shop.platform.mongo import OUTBOX, mongo_database
from shop.platform.outbox import outbox
from shop.platform.settings import PlatformSettings, Profile
from shop.platform.tokens import JwksVerifier
from shop.product.app import build_app
from shop.product.settings import ProductSettings
from tests.support import free_port

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
JWK = {
    **json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key())),
    "kid": "test-key",
    "use": "sig",
    "alg": "RS256",
}
PIXEL = {"name": "Pixel 8", "description": "A phone.", "price": "899.00", "skuCode": "pixel_8"}
UNKNOWN_ID = "65f1c0ffee0123456789abcd"


# The instance under test, as the registry would list it: service tokens name it.
HERE = "http://127.0.0.1:8080"


def _token(*roles: str, user_id: str = "42", target: str = HERE) -> dict[str, str]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": user_id,
        "email": "ada@example.com",
        "roles": list(roles),
        "iss": "shop-auth",
        # Service tokens are for the internal audience, users' for the public one.
        "aud": "shop-internal" if user_id.startswith("service:") else "shop",
        "iat": now,
        "exp": now + 900,
        "jti": uuid.uuid4().hex,
    }
    if user_id.startswith("service:"):
        claims["target"] = target
    token = jwt.encode(claims, KEY, algorithm="RS256", headers={"kid": "test-key"})
    return {"Authorization": f"Bearer {token}"}


ADMIN = _token("customer", "admin")
CUSTOMER = _token("customer")
ORDER_SERVICE = _token("service", user_id="service:order-service")
NOTIFICATION_SERVICE = _token("service", user_id="service:notification-service")


async def _jwks() -> dict[str, Any]:
    return {"keys": [JWK]}


@dataclass
class Shop:
    client: httpx.AsyncClient
    app: FastAPI
    data_dir: Path
    database_url: str | None = None

    @property
    def event_log_url(self) -> str:
        return f"sqlite:///{(self.data_dir / 'events.db').resolve()}"

    async def outbox_count(self) -> int:
        if self.database_url is not None and self.database_url.startswith("mongodb"):
            async with mongo_database(self.database_url) as database:
                return await database[OUTBOX].count_documents({})
        engine = create_engine(
            self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'product.db'}"
        )
        try:
            async with engine.connect() as conn:
                return int(await conn.scalar(select(func.count()).select_from(outbox)) or 0)
        finally:
            await engine.dispose()

    async def listing(self) -> list[dict[str, Any]]:
        answer = await self.client.get("/api/product", params={"limit": 100})
        assert answer.status_code == 200
        body: list[dict[str, Any]] = answer.json()
        return body

    async def add(self, **overrides: Any) -> dict[str, Any]:
        answer = await self.client.post("/api/product", json={**PIXEL, **overrides}, headers=ADMIN)
        assert answer.status_code == 201, answer.text
        body: dict[str, Any] = answer.json()
        return body


@asynccontextmanager
async def running(
    data_dir: Path,
    *,
    profile: Profile = "embedded",
    seed: bool = False,
    database_url: str | None = None,
) -> AsyncIterator[Shop]:
    platform = PlatformSettings(data_dir=data_dir, profile=profile)
    settings = ProductSettings(_env_file=None, seed_demo_catalogue=seed, database_url=database_url)
    app = build_app(platform=platform, settings=settings)
    async with app.router.lifespan_context(app):
        app.state.runtime.tokens = JwksVerifier(
            fetch_jwks=_jwks,
            issuer="shop-auth",
            audience="shop",
            internal_audience="shop-internal",
        )
        app.state.runtime.origin = HERE
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://product") as client:
            yield Shop(client, app, data_dir, database_url)


@pytest.fixture(params=["sqlite", "mongo"])
async def catalogue_url(request: pytest.FixtureRequest) -> AsyncIterator[str | None]:
    """None: the embedded default, a SQLite file in the data dir."""
    if request.param == "sqlite":
        yield None
        return
    make: Callable[[], str] = request.getfixturevalue("make_mongo_url")
    url: str = make()
    yield url
    async with mongo_database(url) as database:
        await database.client.drop_database(database.name)


@pytest.fixture
async def shop(tmp_path: Path, catalogue_url: str | None) -> AsyncIterator[Shop]:
    async with running(tmp_path, database_url=catalogue_url) as running_shop:
        yield running_shop


def _is_problem(answer: httpx.Response, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = answer.json()
    assert body["status"] == status
    return body


async def test_an_admin_adds_a_product_anyone_reads_it(shop: Shop) -> None:
    answer = await shop.client.post(
        "/api/product", json={**PIXEL, "price": 899, "category": "Phones"}, headers=ADMIN
    )
    assert answer.status_code == 201
    created = answer.json()
    assert set(created) == {
        "id",
        "name",
        "description",
        "price",
        "skuCode",
        "category",
        "createdAt",
    }
    assert len(created["id"]) == 24 and int(created["id"], 16) >= 0
    assert (created["price"], created["category"], created["skuCode"]) == (
        "899.00",
        "Phones",
        "pixel_8",
    )
    assert created["createdAt"].endswith("Z")
    assert answer.headers["location"] == f"/api/product/{created['id']}"
    shown = await shop.client.get(f"/api/product/{created['id']}")
    assert shown.status_code == 200 and shown.json() == created
    assert await shop.listing() == [created]


async def test_the_references_own_body_gets_a_derived_unique_sku_code(shop: Shop) -> None:
    # What the Spring Boot reference's clients send: no skuCode, the price a JSON number.
    body = {"name": "Écran Straße 27″ (4K)", "description": "A screen.", "price": 299.99}
    first = await shop.client.post("/api/product", json=body, headers=ADMIN)
    second = await shop.client.post("/api/product", json=body, headers=ADMIN)
    assert (first.status_code, second.status_code) == (201, 201)
    assert first.json()["skuCode"] == "ecran_strasse_27_4k"
    assert second.json()["skuCode"] == "ecran_strasse_27_4k_2"
    assert first.json()["price"] == "299.99"
    # The derived code is a SKU code like any other: the internal lookup finds it.
    found = await shop.client.get(
        "/internal/products", params={"skuCode": "ecran_strasse_27_4k_2"}, headers=ORDER_SERVICE
    )
    assert [p["id"] for p in found.json()] == [second.json()["id"]]
    # A name with nothing to make a slug of still gets a code.
    nameless = await shop.add(name="東京", skuCode=None)
    assert nameless["skuCode"] == "product"


async def test_a_put_without_sku_code_keeps_the_products_own(shop: Shop) -> None:
    product = await shop.add()
    revised = {"name": "Pixel 8a", "description": "Cheaper.", "price": "499.00"}
    answer = await shop.client.put(f"/api/product/{product['id']}", json=revised, headers=ADMIN)
    assert answer.status_code == 200
    assert answer.json() == {**product, **revised, "category": "general"}
    assert answer.json()["skuCode"] == "pixel_8"


async def test_the_category_defaults_to_general(shop: Shop) -> None:
    assert (await shop.add())["category"] == "general"
    assert (await shop.add(skuCode="other", category=None))["category"] == "general"


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"Authorization": "Bearer not-a-jwt"}, 401), (CUSTOMER, 403)],
)
async def test_writes_need_an_admin(shop: Shop, headers: dict[str, str], status: int) -> None:
    product = await shop.add()
    attempts = [
        shop.client.post("/api/product", json={**PIXEL, "skuCode": "x"}, headers=headers),
        shop.client.put(
            f"/api/product/{product['id']}", json={**PIXEL, "name": "X"}, headers=headers
        ),
        shop.client.delete(f"/api/product/{product['id']}", headers=headers),
    ]
    for attempt in attempts:
        _is_problem(await attempt, status)
    assert await shop.listing() == [product]
    assert await shop.outbox_count() == 1


async def test_a_taken_sku_code_is_409_and_adds_nothing(shop: Shop) -> None:
    first = await shop.add()
    problem = _is_problem(
        await shop.client.post("/api/product", json={**PIXEL, "name": "Copy"}, headers=ADMIN), 409
    )
    assert "pixel_8" in problem["detail"]
    assert await shop.listing() == [first]
    assert await shop.outbox_count() == 1


BAD_BODIES: list[tuple[Any, str]] = [
    ({**PIXEL, "price": 19.999}, "price"),
    ({**PIXEL, "price": "19.999"}, "price"),
    ({**PIXEL, "price": -5}, "price"),
    ({**PIXEL, "price": 0}, "price"),
    ({**PIXEL, "price": "abc"}, "price"),
    ({**PIXEL, "price": 1e10}, "price"),
    ({**PIXEL, "price": True}, "price"),
    ({**PIXEL, "price": None}, "price"),
    ({k: v for k, v in PIXEL.items() if k != "price"}, "price"),
    ({k: v for k, v in PIXEL.items() if k != "name"}, "name"),
    ({**PIXEL, "name": "   "}, "name"),
    ({**PIXEL, "name": "n" * 201}, "name"),
    ({**PIXEL, "name": 5}, "name"),
    ({**PIXEL, "description": "d" * 5001}, "description"),
    ({**PIXEL, "skuCode": "has space"}, "skuCode"),
    ({**PIXEL, "skuCode": "s" * 65}, "skuCode"),
    ({**PIXEL, "category": ""}, "category"),
    ({**PIXEL, "category": "c" * 101}, "category"),
    ([PIXEL], "body"),
]


async def test_invalid_bodies_are_422_and_change_nothing(shop: Shop) -> None:
    product = await shop.add()
    for body, field in BAD_BODIES:
        for method, path in [("POST", "/api/product"), ("PUT", f"/api/product/{product['id']}")]:
            answer = await shop.client.request(method, path, json=body, headers=ADMIN)
            problem = _is_problem(answer, 422)
            assert field in problem["errors"], (method, body, problem)
    raw = [
        b'{"name": "x", "price": NaN',
        b'{"name": "Pixel", "description": "", "price": NaN, "skuCode": "nan"}',
    ]
    for content in raw:
        answer = await shop.client.post(
            "/api/product", content=content, headers={**ADMIN, "content-type": "application/json"}
        )
        _is_problem(answer, 422)
    assert await shop.listing() == [product]
    assert await shop.outbox_count() == 1


async def test_errors_name_every_bad_field(shop: Shop) -> None:
    answer = await shop.client.post(
        "/api/product",
        json={"name": "", "description": "", "price": "1.234", "skuCode": "a b"},
        headers=ADMIN,
    )
    assert set(_is_problem(answer, 422)["errors"]) == {"name", "price", "skuCode"}


async def test_revise_replaces_the_product(shop: Shop) -> None:
    product = await shop.add(category="phones")
    revised = {
        "name": "Pixel 8 (2024)",
        "description": "Cheaper.",
        "price": 799.5,
        "skuCode": "pixel_8",
    }
    answer = await shop.client.put(f"/api/product/{product['id']}", json=revised, headers=ADMIN)
    assert answer.status_code == 200
    assert answer.json() == {
        **product,
        "name": "Pixel 8 (2024)",
        "description": "Cheaper.",
        "price": "799.50",
        "category": "general",
    }
    assert (await shop.client.get(f"/api/product/{product['id']}")).json() == answer.json()


async def test_revise_to_another_products_sku_is_409(shop: Shop) -> None:
    pixel = await shop.add()
    galaxy = await shop.add(name="Galaxy S24", skuCode="galaxy_s24", price="999.00")
    answer = await shop.client.put(
        f"/api/product/{galaxy['id']}", json={**PIXEL, "name": "Galaxy"}, headers=ADMIN
    )
    _is_problem(answer, 409)
    assert await shop.listing() == [pixel, galaxy]
    assert await shop.outbox_count() == 2


@pytest.mark.parametrize(
    "product_id", [UNKNOWN_ID, "not-an-id", "65F1C0FFEE0123456789ABCD", "1" * 25]
)
async def test_unknown_or_malformed_ids_are_404(shop: Shop, product_id: str) -> None:
    _is_problem(await shop.client.get(f"/api/product/{product_id}"), 404)
    _is_problem(await shop.client.put(f"/api/product/{product_id}", json=PIXEL, headers=ADMIN), 404)
    _is_problem(await shop.client.delete(f"/api/product/{product_id}", headers=ADMIN), 404)
    assert await shop.outbox_count() == 0


async def test_delete_removes_the_product(shop: Shop) -> None:
    product = await shop.add()
    answer = await shop.client.delete(f"/api/product/{product['id']}", headers=ADMIN)
    assert answer.status_code == 204 and answer.content == b""
    _is_problem(await shop.client.get(f"/api/product/{product['id']}"), 404)
    _is_problem(await shop.client.delete(f"/api/product/{product['id']}", headers=ADMIN), 404)
    assert await shop.listing() == []
    # The SKU code is free again.
    await shop.add()


async def test_browse_searches_filters_and_pages(shop: Shop) -> None:
    pixel = await shop.add(category="Phones")
    galaxy = await shop.add(
        name="Galaxy S24", description="Samsung.", skuCode="galaxy_s24", category="phones"
    )
    kindle = await shop.add(
        name="Kindle", description="Reads like 100% paper", skuCode="kindle", category="readers"
    )

    async def browse(**params: Any) -> tuple[list[str], str]:
        answer = await shop.client.get("/api/product", params=params)
        assert answer.status_code == 200, answer.text
        return [p["skuCode"] for p in answer.json()], answer.headers["x-total-count"]

    assert await browse() == (["pixel_8", "galaxy_s24", "kindle"], "3")
    assert await browse(q="GALAXY") == (["galaxy_s24"], "1")
    assert await browse(q="a phone") == (["pixel_8"], "1")
    assert await browse(q="100%") == (["kindle"], "1")
    assert await browse(q="1_0") == ([], "0")
    assert await browse(category="PHONES") == (["pixel_8", "galaxy_s24"], "2")
    assert await browse(category="phones", q="pixel") == (["pixel_8"], "1")
    assert await browse(limit=1, offset=1) == (["galaxy_s24"], "3")
    assert await browse(limit=2, offset=5) == ([], "3")
    assert await browse(q="", category="") == (["pixel_8", "galaxy_s24", "kindle"], "3")
    assert {p["id"] for p in await shop.listing()} == {pixel["id"], galaxy["id"], kindle["id"]}


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 101},
        {"limit": "ten"},
        {"offset": -1},
        {"offset": 10**12},
        {"q": "q" * 201},
        {"category": "c" * 101},
        {"q": "pixel\x00"},
        {"category": "phones\x1b"},
    ],
)
async def test_bad_browse_parameters_are_422(shop: Shop, params: dict[str, Any]) -> None:
    problem = _is_problem(await shop.client.get("/api/product", params=params), 422)
    assert set(problem["errors"]) == set(params)


async def test_changes_are_published_on_the_products_topic(shop: Shop) -> None:
    trace_id = uuid.uuid4().hex
    created = await shop.client.post(
        "/api/product",
        json=PIXEL,
        headers={**ADMIN, "traceparent": f"00-{trace_id}-{'1' * 16}-01"},
    )
    product = created.json()
    await shop.client.put(
        f"/api/product/{product['id']}", json={**PIXEL, "price": "799.00"}, headers=ADMIN
    )
    await shop.client.delete(f"/api/product/{product['id']}", headers=ADMIN)

    received: asyncio.Queue[Event] = asyncio.Queue()

    async def collect(event: Event) -> None:
        await received.put(event)

    async with open_event_bus(shop.event_log_url, client_id="test") as bus:
        bus.subscribe("products", group=f"test-{uuid.uuid4().hex}", handler=collect)
        await bus.start()
        events = [await asyncio.wait_for(received.get(), 10) for _ in range(3)]

    assert [e.type for e in events] == ["product.created", "product.updated", "product.deleted"]
    assert {e.subject for e in events} == {product["id"]}
    assert {e.source for e in events} == {"/product-service"}
    assert events[0].data == product
    assert events[1].data == {**product, "price": "799.00"}
    assert events[2].data == {**product, "price": "799.00"}
    assert events[0].traceparent is not None and trace_id in events[0].traceparent


async def test_internal_lookup_is_for_services_only(shop: Shop) -> None:
    await shop.add()
    _is_problem(await shop.client.get("/internal/products", params={"skuCode": "pixel_8"}), 401)
    for caller in (CUSTOMER, ADMIN, NOTIFICATION_SERVICE):
        _is_problem(
            await shop.client.get(
                "/internal/products", params={"skuCode": "pixel_8"}, headers=caller
            ),
            403,
        )
    _is_problem(
        await shop.client.get(
            "/internal/products",
            params={"skuCode": "pixel_8"},
            headers={"Authorization": "Bearer x.y.z"},
        ),
        401,
    )


async def test_internal_lookup_returns_the_known_skus_in_the_order_asked(shop: Shop) -> None:
    pixel = await shop.add()
    kindle = await shop.add(name="Kindle", skuCode="kindle", price=139.99)
    answer = await shop.client.get(
        "/internal/products?skuCode=kindle&skuCode=unknown&skuCode=pixel_8&skuCodes=kindle",
        headers=ORDER_SERVICE,
    )
    assert answer.status_code == 200
    assert answer.json() == [
        {"id": kindle["id"], "skuCode": "kindle", "name": "Kindle", "price": "139.99"},
        {"id": pixel["id"], "skuCode": "pixel_8", "name": "Pixel 8", "price": "899.00"},
    ]


async def test_internal_lookup_reads_comma_separated_and_encoded_codes(shop: Shop) -> None:
    await shop.add()
    await shop.add(name="Kindle", skuCode="kindle", price="139.99")
    # Every skuCode comes before every skuCodes, whatever the order in the query string.
    answer = await shop.client.get(
        "/internal/products?skuCodes=pixel_8%2C+kindle&skuCode=kindle,+unknown",
        headers=ORDER_SERVICE,
    )
    assert answer.status_code == 200
    assert [entry["skuCode"] for entry in answer.json()] == ["kindle", "pixel_8"]


@pytest.mark.parametrize(
    "query",
    ["", "?skuCode=", "?skuCode=bad%20sku", "?" + "&".join(f"skuCode=s{i}" for i in range(101))],
)
async def test_internal_lookup_refuses_bad_sku_lists(shop: Shop, query: str) -> None:
    answer = await shop.client.get(f"/internal/products{query}", headers=ORDER_SERVICE)
    assert "skuCode" in _is_problem(answer, 422)["errors"]


async def test_demo_catalogue_is_seeded_once_and_announced(
    tmp_path: Path, catalogue_url: str | None
) -> None:
    async with running(tmp_path, seed=True, database_url=catalogue_url) as shop:
        seeded = await shop.listing()
        ready = await shop.client.get("/health/ready")
        schema = (await shop.client.get("/openapi.json")).json()
    assert {p["skuCode"]: p["price"] for p in seeded} == {
        "iphone_15": "1299.00",
        "pixel_8": "899.00",
        "galaxy_s24": "999.00",
        "airpods_pro": "249.00",
        "kindle_paperwhite": "139.99",
    }
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "UP", "events": "UP"}
    assert {"/api/product", "/api/product/{product_id}", "/internal/products"} <= set(
        schema["paths"]
    )
    async with running(tmp_path, seed=True, database_url=catalogue_url) as shop:
        assert await shop.listing() == seeded
        assert await shop.outbox_count() == 5


async def test_production_never_seeds(tmp_path: Path) -> None:
    async with running(tmp_path, profile="production", seed=True) as shop:
        assert await shop.listing() == []


async def _until_live(client: httpx.AsyncClient) -> None:
    """The port is announced once bound; it answers once the lifespan (migrations) is done."""
    async with asyncio.timeout(20):
        for _ in itertools.count():
            try:
                if (await client.get("/health/live")).status_code == 200:
                    return
            except httpx.ConnectError:
                pass
            await asyncio.sleep(0.05)


async def test_python_dash_m_serves_the_seeded_catalogue_and_stops_cleanly(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "SHOP_DATA_DIR": str(tmp_path),
        # Nobody listens there: the service must serve anyway and keep trying to register.
        "SHOP_REGISTRY_URL": f"http://127.0.0.1:{free_port()}/eureka",
        "PRODUCT_PORT": "0",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shop.product",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None
        url = None
        async with asyncio.timeout(20):
            while url is None:
                line = (await process.stdout.readline()).decode()
                assert line, "the process ended before announcing its port"
                match = re.search(r"product-service listening on (http://\S+)", line)
                url = match.group(1) if match else None
        async with httpx.AsyncClient(base_url=url) as client:
            await _until_live(client)
            catalogue = (await client.get("/api/product")).json()
        assert len(catalogue) == 5
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            rest = (await process.stdout.read()).decode()
            # uvicorn shuts down gracefully, then re-raises the signal it caught.
            assert await process.wait() in {0, -signal.SIGTERM}
        assert "Traceback" not in rest and "ERROR" not in rest, rest
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_the_outbox_is_on_health_and_metrics_on_either_store(shop: Shop) -> None:
    """An operator sees product's outbox backlog like every other service's, whether the
    catalogue is SQL or MongoDB (docs/observability.md)."""
    await shop.app.state.watch.sample()
    health = await shop.client.get("/health")
    assert health.status_code == 200
    assert health.json()["checks"]["outbox"] == "UP"
    metrics = (await shop.client.get("/metrics")).text
    assert 'shop_outbox_backlog{service="product-service"} 0.0' in metrics
