"""The inventory service over HTTP: the app with its real lifespan and a SQLite file in
tmp_path, consuming the catalogue's events from the embedded event log in the same folder.

Access tokens are minted here with a test RSA key; the app's verifier is pointed at that
key's JWKS, as it would be at the auth service's.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from shop.inventory.app import build_app
from shop.inventory.settings import InventorySettings
from shop.platform.eventlog import SqliteEventLog
from shop.platform.events import Event
from shop.platform.settings import PlatformSettings
from shop.platform.tokens import JwksVerifier
from tests.prometheus import metric

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KID = "inventory-test-key"
PROBLEM_JSON = "application/problem+json"
FRESH = "<a new order number>"
DEMO = {
    "iphone_15": 100,
    "pixel_8": 50,
    "galaxy_s24": 30,
    "airpods_pro": 200,
    "kindle_paperwhite": 0,
}


def _jwks() -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key()))
    return {"keys": [{**jwk, "kid": KID, "use": "sig", "alg": "RS256"}]}


# The instance under test, as the registry would list it: service tokens name it.
HERE = "http://127.0.0.1:8083"


def _token(*roles: str, key: Any = KEY, sub: str | None = None, target: str = HERE) -> str:
    platform = PlatformSettings()
    now = int(time.time())
    service = sub is not None
    claims: dict[str, Any] = {
        "sub": sub or str(uuid.uuid4()),
        "email": "" if service else "ada@example.com",
        "roles": list(roles),
        "iss": platform.auth_issuer,
        # Service tokens are for the internal audience, users' for the public one.
        "aud": platform.internal_audience if service else platform.auth_audience,
        "iat": now,
        "exp": now + 900,
        "jti": uuid.uuid4().hex,
    }
    if service:
        claims["target"] = target
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": KID})


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


CUSTOMER = _bearer(_token("customer"))
ADMIN = _bearer(_token("customer", "admin"))
# What auth-service issues to order-service for internal calls.
SERVICE = _bearer(_token("service", sub="service:order-service"))
# Another service's token: genuine, but not a caller reservations accept.
NOTIFICATION = _bearer(_token("service", sub="service:notification-service"))


@asynccontextmanager
async def running(
    data_dir: Path, *, profile: str = "embedded", **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    platform = PlatformSettings(data_dir=data_dir, profile=profile)
    app = build_app(platform=platform, settings=InventorySettings(_env_file=None, **overrides))
    async with app.router.lifespan_context(app):

        async def fetch_jwks() -> dict[str, Any]:
            return _jwks()

        app.state.runtime.tokens = JwksVerifier(
            fetch_jwks=fetch_jwks,
            issuer=platform.auth_issuer,
            audience=platform.auth_audience,
            internal_audience=platform.internal_audience,
        )
        app.state.runtime.origin = HERE
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://inventory") as client:
            yield client


@pytest.fixture
async def inventory(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with running(tmp_path) as client:
        yield client


async def _levels(client: httpx.AsyncClient, *skus: str) -> dict[str, int]:
    answer = await client.get("/api/inventory", params={"skuCode": list(skus)}, headers=ADMIN)
    assert answer.status_code == 200, answer.text
    return {level["skuCode"]: level["quantity"] for level in answer.json()}


def _assert_problem(answer: httpx.Response, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == PROBLEM_JSON
    body: dict[str, Any] = answer.json()
    assert body["status"] == status
    return body


def _reservation(order: str, **lines: int) -> dict[str, Any]:
    return {
        "orderNumber": order,
        "lines": [{"skuCode": sku, "quantity": qty} for sku, qty in lines.items()],
    }


# --- public API -----------------------------------------------------------------------


async def test_embedded_start_stocks_the_demo_skus(inventory: httpx.AsyncClient) -> None:
    answer = await inventory.get(
        "/api/inventory?skuCode=kindle_paperwhite&skuCode=iphone_15", headers=CUSTOMER
    )
    assert answer.status_code == 200
    assert answer.json() == [
        {"skuCode": "kindle_paperwhite", "quantity": 0, "isInStock": False},
        {"skuCode": "iphone_15", "quantity": 100, "isInStock": True},
    ]
    assert await _levels(inventory, *DEMO) == DEMO


async def test_seeding_happens_only_once_and_never_in_production(tmp_path: Path) -> None:
    async with running(tmp_path) as client:
        await client.put("/api/inventory/iphone_15", json={"quantity": 1}, headers=ADMIN)
    async with running(tmp_path) as client:  # a restart does not top the stock up again
        assert await _levels(client, "iphone_15", "pixel_8") == {"iphone_15": 1, "pixel_8": 50}
    async with running(tmp_path / "off", seed_demo_stock=False) as client:
        assert await _levels(client, "iphone_15") == {"iphone_15": 0}
    url = f"sqlite+aiosqlite:///{tmp_path / 'prod.db'}"
    async with running(tmp_path, profile="production", database_url=url) as client:
        assert await _levels(client, "iphone_15") == {"iphone_15": 0}


async def test_get_lists_unknown_skus_in_the_order_asked(inventory: httpx.AsyncClient) -> None:
    answer = await inventory.get(
        "/api/inventory?skuCodes=nope,pixel_8&skuCode=galaxy_s24&skuCode=pixel_8",
        headers=CUSTOMER,
    )
    assert answer.status_code == 200
    assert answer.json() == [
        {"skuCode": "nope", "quantity": 0, "isInStock": False},
        {"skuCode": "pixel_8", "quantity": 50, "isInStock": True},
        {"skuCode": "galaxy_s24", "quantity": 30, "isInStock": True},
    ]


@pytest.mark.parametrize(
    "query",
    ["", "?skuCode=", "?skuCode=bad%20sku", "?skuCode=" + "x" * 65, "?skuCodes=a;b"]
    + ["?" + "&".join(f"skuCode=s{i}" for i in range(101))],
)
async def test_get_refuses_a_missing_or_malformed_sku(
    inventory: httpx.AsyncClient, query: str
) -> None:
    body = _assert_problem(await inventory.get("/api/inventory" + query, headers=CUSTOMER), 422)
    assert "skuCode" in body["errors"]


async def test_get_needs_a_valid_token(inventory: httpx.AsyncClient) -> None:
    _assert_problem(await inventory.get("/api/inventory?skuCode=pixel_8"), 401)
    forged = _bearer(_token("admin", key=rsa.generate_private_key(65537, 2048)))
    _assert_problem(await inventory.get("/api/inventory?skuCode=pixel_8", headers=forged), 401)


async def test_post_adds_units_and_answers_the_new_total(inventory: httpx.AsyncClient) -> None:
    added = await inventory.post(
        "/api/inventory", json={"skuCode": "pixel_8", "quantity": 5}, headers=ADMIN
    )
    assert added.status_code == 200
    assert added.json() == {"skuCode": "pixel_8", "quantity": 55}
    created = await inventory.post(
        "/api/inventory", json={"skuCode": "new.sku-1", "quantity": 3}, headers=ADMIN
    )
    assert created.json() == {"skuCode": "new.sku-1", "quantity": 3}
    assert await _levels(inventory, "pixel_8", "new.sku-1") == {"pixel_8": 55, "new.sku-1": 3}


async def test_put_sets_the_absolute_stock(inventory: httpx.AsyncClient) -> None:
    answer = await inventory.put("/api/inventory/pixel_8", json={"quantity": 7}, headers=ADMIN)
    assert answer.status_code == 200
    assert answer.json() == {"skuCode": "pixel_8", "quantity": 7}
    zero = await inventory.put("/api/inventory/fresh", json={"quantity": 0}, headers=ADMIN)
    assert zero.json() == {"skuCode": "fresh", "quantity": 0}
    assert await _levels(inventory, "pixel_8", "fresh") == {"pixel_8": 7, "fresh": 0}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"skuCode": "pixel_8", "quantity": 0}, "quantity"),
        ({"skuCode": "pixel_8", "quantity": -4}, "quantity"),
        ({"skuCode": "pixel_8", "quantity": 1_000_000_001}, "quantity"),
        ({"skuCode": "pixel_8", "quantity": "5"}, "quantity"),
        ({"skuCode": "pixel_8", "quantity": 2.5}, "quantity"),
        ({"skuCode": "pixel_8", "quantity": True}, "quantity"),
        ({"skuCode": "pixel_8"}, "quantity"),
        ({"skuCode": "bad sku", "quantity": 1}, "skuCode"),
        ({"skuCode": "", "quantity": 1}, "skuCode"),
        ({"quantity": 1}, "skuCode"),
    ],
)
async def test_post_refuses_bad_input_and_changes_nothing(
    inventory: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    answer = await inventory.post("/api/inventory", json=body, headers=ADMIN)
    assert field in _assert_problem(answer, 422)["errors"]
    assert await _levels(inventory, "pixel_8") == {"pixel_8": 50}


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/inventory/pixel_8", {"quantity": -1}, "quantity"),
        ("/api/inventory/pixel_8", {"quantity": "3"}, "quantity"),
        ("/api/inventory/pixel_8", {}, "quantity"),
        ("/api/inventory/bad%20sku", {"quantity": 3}, "skuCode"),
        ("/api/inventory/" + "x" * 65, {"quantity": 3}, "skuCode"),
    ],
)
async def test_put_refuses_bad_input_and_changes_nothing(
    inventory: httpx.AsyncClient, path: str, body: dict[str, Any], field: str
) -> None:
    answer = await inventory.put(path, json=body, headers=ADMIN)
    assert field in _assert_problem(answer, 422)["errors"]
    assert await _levels(inventory, "pixel_8") == {"pixel_8": 50}


async def test_writing_stock_needs_an_admin(inventory: httpx.AsyncClient) -> None:
    post = {"skuCode": "pixel_8", "quantity": 5}
    _assert_problem(await inventory.post("/api/inventory", json=post), 401)
    _assert_problem(await inventory.post("/api/inventory", json=post, headers=CUSTOMER), 403)
    put = {"quantity": 1}
    _assert_problem(await inventory.put("/api/inventory/pixel_8", json=put), 401)
    _assert_problem(await inventory.put("/api/inventory/pixel_8", json=put, headers=CUSTOMER), 403)
    assert await _levels(inventory, "pixel_8") == {"pixel_8": 50}


# --- internal API ---------------------------------------------------------------------


async def test_reserve_then_release(inventory: httpx.AsyncClient) -> None:
    order = str(uuid.uuid4())
    body = _reservation(order, pixel_8=2, iphone_15=1)
    answer = await inventory.post("/internal/reservations", json=body, headers=SERVICE)
    assert answer.status_code == 201, answer.text
    assert answer.json() == {**body, "status": "RESERVED"}
    assert await _levels(inventory, "pixel_8", "iphone_15") == {"pixel_8": 48, "iphone_15": 99}

    released = await inventory.delete(f"/internal/reservations/{order}", headers=SERVICE)
    assert released.status_code == 204
    assert released.content == b""
    assert await _levels(inventory, "pixel_8", "iphone_15") == {"pixel_8": 50, "iphone_15": 100}
    again = await inventory.delete(f"/internal/reservations/{order}", headers=SERVICE)
    assert again.status_code == 204
    assert await _levels(inventory, "pixel_8", "iphone_15") == {"pixel_8": 50, "iphone_15": 100}


async def test_a_repeated_reservation_answers_the_same_and_takes_nothing_more(
    inventory: httpx.AsyncClient,
) -> None:
    order = str(uuid.uuid4())
    body = _reservation(order, galaxy_s24=3)
    first = await inventory.post("/internal/reservations", json=body, headers=SERVICE)
    again = await inventory.post("/internal/reservations", json=body, headers=SERVICE)
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json() == first.json()
    assert await _levels(inventory, "galaxy_s24") == {"galaxy_s24": 27}

    other = _reservation(order, galaxy_s24=4)
    conflict = await inventory.post("/internal/reservations", json=other, headers=SERVICE)
    assert "other lines" in _assert_problem(conflict, 409)["detail"]
    assert await _levels(inventory, "galaxy_s24") == {"galaxy_s24": 27}


async def test_an_order_number_is_one_reservation_however_it_is_spelled(
    inventory: httpx.AsyncClient,
) -> None:
    order = str(uuid.uuid4())
    upper = await inventory.post(
        "/internal/reservations", json=_reservation(order.upper(), pixel_8=1), headers=SERVICE
    )
    assert upper.json()["orderNumber"] == order
    await inventory.post(
        "/internal/reservations", json=_reservation(order, pixel_8=1), headers=SERVICE
    )
    assert await _levels(inventory, "pixel_8") == {"pixel_8": 49}
    await inventory.delete(f"/internal/reservations/{order.upper()}", headers=SERVICE)
    assert await _levels(inventory, "pixel_8") == {"pixel_8": 50}


async def test_orders_arriving_together_are_answered_each_on_its_own(
    inventory: httpx.AsyncClient,
) -> None:
    # Sent at once (galaxy_s24 has 30): twelve orders of 2, one of 31 that can never fit,
    # and three copies of one order. They share transactions; each gets its own answer.
    repeated = _reservation(str(uuid.uuid4()), galaxy_s24=1, pixel_8=1)
    bodies = [_reservation(str(uuid.uuid4()), galaxy_s24=2) for _ in range(12)]
    bodies += [_reservation(str(uuid.uuid4()), galaxy_s24=31), repeated, repeated, repeated]
    answers = await asyncio.gather(
        *(inventory.post("/internal/reservations", json=body, headers=SERVICE) for body in bodies)
    )

    assert [answer.status_code for answer in answers] == [201] * 12 + [409] + [201] * 3
    assert answers[0].json() == {
        "orderNumber": bodies[0]["orderNumber"],
        "status": "RESERVED",
        "lines": [{"skuCode": "galaxy_s24", "quantity": 2}],
    }
    (short,) = _assert_problem(answers[12], 409)["shortages"]
    assert short["skuCode"] == "galaxy_s24"
    assert short["requested"] == 31
    assert 5 <= short["available"] <= 30
    assert answers[13].content == answers[14].content == answers[15].content
    assert await _levels(inventory, "galaxy_s24", "pixel_8") == {"galaxy_s24": 5, "pixel_8": 49}


async def test_a_short_line_reserves_nothing_and_names_each_shortage(
    inventory: httpx.AsyncClient,
) -> None:
    order = str(uuid.uuid4())
    body = _reservation(order, iphone_15=5, kindle_paperwhite=1, galaxy_s24=31, unknown_sku=2)
    answer = await inventory.post("/internal/reservations", json=body, headers=SERVICE)
    problem = _assert_problem(answer, 409)
    assert problem["title"] == "Out of stock"
    # The oversell it refused is counted for the operator.
    assert await metric(inventory, "shop_reservations_refused_total", reason="out_of_stock") == 1
    assert await metric(inventory, "shop_reservations_total") == 0
    assert sorted(problem["shortages"], key=lambda s: s["skuCode"]) == [
        {"skuCode": "galaxy_s24", "requested": 31, "available": 30},
        {"skuCode": "kindle_paperwhite", "requested": 1, "available": 0},
        {"skuCode": "unknown_sku", "requested": 2, "available": 0},
    ]
    assert await _levels(inventory, "iphone_15", "galaxy_s24") == {
        "iphone_15": 100,
        "galaxy_s24": 30,
    }
    # The failed attempt was not remembered: once restocked, the same order goes through.
    await inventory.put("/api/inventory/kindle_paperwhite", json={"quantity": 1}, headers=ADMIN)
    await inventory.put("/api/inventory/unknown_sku", json={"quantity": 2}, headers=ADMIN)
    await inventory.post(
        "/api/inventory", json={"skuCode": "galaxy_s24", "quantity": 1}, headers=ADMIN
    )
    retry = await inventory.post("/internal/reservations", json=body, headers=SERVICE)
    assert retry.status_code == 201
    assert await _levels(inventory, "galaxy_s24", "kindle_paperwhite") == {
        "galaxy_s24": 0,
        "kindle_paperwhite": 0,
    }


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            {"orderNumber": "ORDER-1", "lines": [{"skuCode": "pixel_8", "quantity": 1}]},
            "orderNumber",
        ),
        ({"lines": [{"skuCode": "pixel_8", "quantity": 1}]}, "orderNumber"),
        ({"orderNumber": FRESH, "lines": []}, "lines"),
        ({"orderNumber": FRESH}, "lines"),
        (
            {"orderNumber": FRESH, "lines": [{"skuCode": "pixel_8", "quantity": 0}]},
            "lines.0.quantity",
        ),
        (
            {"orderNumber": FRESH, "lines": [{"skuCode": "pixel_8", "quantity": -1}]},
            "lines.0.quantity",
        ),
        (
            {"orderNumber": FRESH, "lines": [{"skuCode": "no way", "quantity": 1}]},
            "lines.0.skuCode",
        ),
        (
            {
                "orderNumber": FRESH,
                "lines": [
                    {"skuCode": "pixel_8", "quantity": 1},
                    {"skuCode": "pixel_8", "quantity": 2},
                ],
            },
            "lines.1.skuCode",
        ),
    ],
)
async def test_reserve_refuses_bad_input_and_changes_nothing(
    inventory: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    order = str(uuid.uuid4())
    if body.get("orderNumber") == FRESH:
        body = {**body, "orderNumber": order}
    answer = await inventory.post("/internal/reservations", json=body, headers=SERVICE)
    assert field in _assert_problem(answer, 422)["errors"]
    assert await _levels(inventory, "pixel_8") == {"pixel_8": 50}
    # Nothing was stored under the order number: a valid request for it still reserves.
    valid = await inventory.post(
        "/internal/reservations", json=_reservation(order, pixel_8=1), headers=SERVICE
    )
    assert valid.status_code == 201


async def test_release_of_an_unknown_or_malformed_order(inventory: httpx.AsyncClient) -> None:
    order = str(uuid.uuid4())
    unknown = await inventory.delete(f"/internal/reservations/{order}", headers=SERVICE)
    assert unknown.status_code == 204
    assert await _levels(inventory, *DEMO) == DEMO
    # The reservation the order service gave up on arrives late: it must take nothing.
    late = await inventory.post(
        "/internal/reservations", json=_reservation(order, pixel_8=2), headers=SERVICE
    )
    assert "released" in _assert_problem(late, 409)["detail"]
    assert await _levels(inventory, *DEMO) == DEMO
    malformed = await inventory.delete("/internal/reservations/not-a-uuid", headers=SERVICE)
    assert "orderNumber" in _assert_problem(malformed, 422)["errors"]


async def test_internal_calls_need_a_service_token(inventory: httpx.AsyncClient) -> None:
    order = str(uuid.uuid4())
    body = _reservation(order, pixel_8=1)
    _assert_problem(await inventory.post("/internal/reservations", json=body), 401)
    tampered = _bearer(_token("service", sub="service:order-service")[:-4] + "AAAA")
    _assert_problem(
        await inventory.post("/internal/reservations", json=body, headers=tampered), 401
    )
    # A user's token, even an admin's, is not a service's: internal routes refuse it.
    for user in (CUSTOMER, ADMIN):
        refused = await inventory.post("/internal/reservations", json=body, headers=user)
        assert "only services" in _assert_problem(refused, 403)["detail"]
    # A service token of another service: reservations are order-service's alone.
    refused = await inventory.post("/internal/reservations", json=body, headers=NOTIFICATION)
    assert "order-service only" in _assert_problem(refused, 403)["detail"]
    # order-service's own token, issued for another instance: whoever holds it (that
    # instance, maybe an impostor in the registry) cannot replay it here.
    elsewhere = _bearer(_token("service", sub="service:order-service", target="http://10.6.6.6:1"))
    refused = await inventory.post("/internal/reservations", json=body, headers=elsewhere)
    assert "another instance" in _assert_problem(refused, 403)["detail"]
    assert await _levels(inventory, "pixel_8") == {"pixel_8": 50}
    ok = await inventory.post("/internal/reservations", json=body, headers=SERVICE)
    assert ok.status_code == 201
    _assert_problem(await inventory.delete(f"/internal/reservations/{order}"), 401)
    for other in (CUSTOMER, NOTIFICATION):
        _assert_problem(
            await inventory.delete(f"/internal/reservations/{order}", headers=other), 403
        )
    assert await _levels(inventory, "pixel_8") == {"pixel_8": 49}


async def test_ready_checks_the_database_and_the_event_bus(inventory: httpx.AsyncClient) -> None:
    answer = await inventory.get("/health/ready")
    assert answer.status_code == 200
    assert answer.json()["checks"] == {"database": "UP", "events": "UP"}


async def test_a_service_token_cannot_act_as_a_user(inventory: httpx.AsyncClient) -> None:
    answer = await inventory.get("/api/inventory", params={"skuCode": "pixel_8"}, headers=SERVICE)
    assert answer.status_code == 403
    assert answer.headers["content-type"] == "application/problem+json"


# --- the catalogue's events --------------------------------------------------------------


def _product_event(kind: str, sku_code: object, *, event_id: str | None = None) -> Event:
    """An event as the product service publishes it on ``products``."""
    product_id = uuid.uuid4().hex[:24]
    data = {
        "id": product_id,
        "name": "Gadget",
        "description": "",
        "price": "10.00",
        "skuCode": sku_code,
        "category": "general",
        "createdAt": "2025-03-01T12:00:00.000Z",
    }
    event = Event(type=kind, source="/product-service", subject=product_id, data=data)
    return event if event_id is None else replace(event, id=event_id)


async def _publish(data_dir: Path, *events: Event) -> None:
    log = SqliteEventLog(f"sqlite:///{(data_dir / 'events.db').resolve()}", client_id="catalogue")
    try:
        await log.publish("products", events)
    finally:
        await log.close()


async def _listing(client: httpx.AsyncClient, **params: int) -> tuple[dict[str, int], str]:
    answer = await client.get("/api/inventory", params=params, headers=ADMIN)
    assert answer.status_code == 200, answer.text
    levels = {level["skuCode"]: level["quantity"] for level in answer.json()}
    return levels, answer.headers["x-total-count"]


async def _until_listed(client: httpx.AsyncClient, sku_code: str) -> dict[str, int]:
    async with asyncio.timeout(10):
        while True:
            levels, _ = await _listing(client, limit=1000)
            if sku_code in levels:
                return levels
            await asyncio.sleep(0.02)


async def test_without_sku_codes_an_admin_lists_every_known_sku(
    inventory: httpx.AsyncClient,
) -> None:
    assert await _listing(inventory) == (DEMO, "5")
    assert await _listing(inventory, limit=2, offset=1) == (
        {"galaxy_s24": 30, "iphone_15": 100},
        "5",
    )
    answer = await inventory.get("/api/inventory", headers=ADMIN)
    assert [level["skuCode"] for level in answer.json()] == sorted(DEMO)
    assert answer.json()[3] == {"skuCode": "kindle_paperwhite", "quantity": 0, "isInStock": False}
    # A customer still has to say which SKUs: the whole stock list is the admin's view.
    assert (
        "skuCode"
        in _assert_problem(await inventory.get("/api/inventory", headers=CUSTOMER), 422)["errors"]
    )
    for bad in ({"limit": 0}, {"limit": 1001}, {"offset": -1}):
        _assert_problem(await inventory.get("/api/inventory", params=bad, headers=ADMIN), 422)


async def test_a_product_the_catalogue_lists_is_known_with_no_stock(tmp_path: Path) -> None:
    async with running(tmp_path) as client:
        before, _ = await _listing(client)
        assert "gadget_1" not in before
        await _publish(
            tmp_path,
            _product_event("product.created", "gadget_1"),
            # A SKU the inventory stocks already keeps its units.
            _product_event("product.created", "pixel_8"),
        )
        levels = await _until_listed(client, "gadget_1")
        assert levels == {**DEMO, "gadget_1": 0}
        assert (await client.get("/api/inventory?skuCode=gadget_1", headers=CUSTOMER)).json() == [
            {"skuCode": "gadget_1", "quantity": 0, "isInStock": False}
        ]
        # Stock then comes in as for any SKU.
        await client.post(
            "/api/inventory", json={"skuCode": "gadget_1", "quantity": 4}, headers=ADMIN
        )
        assert await _levels(client, "gadget_1") == {"gadget_1": 4}


async def test_catalogue_events_never_lower_stock_nor_remove_a_sku(tmp_path: Path) -> None:
    async with running(tmp_path) as client:
        created = _product_event("product.created", "gadget_2")
        await _publish(tmp_path, created)
        await _until_listed(client, "gadget_2")
        await client.put("/api/inventory/gadget_2", json={"quantity": 7}, headers=ADMIN)
        await _publish(
            tmp_path,
            created,  # delivered again
            _product_event("product.created", "gadget_2"),  # another product, the same SKU
            _product_event("product.deleted", "gadget_2"),
            _product_event("product.created", "bad sku"),  # malformed: skipped, not retried
            _product_event("product.updated", "gadget_2_renamed"),
        )
        levels = await _until_listed(client, "gadget_2_renamed")
    assert levels == {**DEMO, "gadget_2": 7, "gadget_2_renamed": 0}


async def test_listed_skus_survive_a_restart_and_are_not_listed_twice(tmp_path: Path) -> None:
    await _publish(tmp_path, _product_event("product.created", "gadget_3"))
    async with running(tmp_path) as client:
        await _until_listed(client, "gadget_3")
        await client.put("/api/inventory/gadget_3", json={"quantity": 2}, headers=ADMIN)
    async with running(tmp_path) as client:
        levels, total = await _listing(client)
    assert (levels["gadget_3"], total) == (2, "6")
