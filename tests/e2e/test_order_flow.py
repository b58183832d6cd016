"""The reference's whole flow, done right, through the gateway with every real process."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.shop_system import System

PROBLEM_JSON = "application/problem+json"


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _token(gateway: httpx.Client, email: str, password: str) -> str:
    resp = gateway.get("/auth/getToken", auth=(email, password))  # the reference's way in
    assert resp.status_code == 200, resp.text
    token: str = resp.json()["access_token"]
    return token


@pytest.fixture
def admin(system: System) -> str:
    with httpx.Client(base_url=system.gateway) as gateway:
        return _token(gateway, "admin@example.com", system.admin_password)


@pytest.fixture
def customer(gateway: httpx.Client) -> str:
    email = f"buyer-{uuid.uuid4().hex[:10]}@example.com"
    resp = gateway.post(
        "/auth/register", json={"name": "Grace", "email": email, "password": "compiler-1952"}
    )
    assert resp.status_code == 201, resp.text
    return _token(gateway, email, "compiler-1952")


@pytest.fixture
def new_product(gateway: httpx.Client, admin: str) -> Callable[..., dict[str, Any]]:
    def make(*, price: str = "19.99", stock: int = 10) -> dict[str, Any]:
        sku = f"sku_{uuid.uuid4().hex[:10]}"
        created = gateway.post(
            "/api/product",
            headers=_bearer(admin),
            json={
                "name": f"Widget {sku}",
                "description": "A thing to buy",
                "price": price,
                "skuCode": sku,
                "category": "widgets",
            },
        )
        assert created.status_code == 201, created.text
        stocked = gateway.post(
            "/api/inventory", headers=_bearer(admin), json={"skuCode": sku, "quantity": stock}
        )
        assert stocked.status_code == 200, stocked.text
        product: dict[str, Any] = created.json()
        return product

    return make


def _stock(gateway: httpx.Client, token: str, sku: str) -> int:
    resp = gateway.get("/api/inventory", params={"skuCode": sku}, headers=_bearer(token))
    assert resp.status_code == 200, resp.text
    quantity: int = resp.json()[0]["quantity"]
    return quantity


def _order(
    gateway: httpx.Client,
    token: str,
    lines: list[dict[str, Any]],
    *,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return gateway.post(
        "/api/order",
        headers={**_bearer(token), **(headers or {})},
        json={"orderLineItemDtoList": lines},
    )


def _eventually(check: Callable[[], Any], *, within_s: float = 15.0) -> Any:
    deadline = time.monotonic() + within_s
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_newcomer_finds_a_demo_catalogue_with_stock(gateway: httpx.Client, customer: str) -> None:
    products = gateway.get("/api/product", params={"limit": 100})
    skus = {p["skuCode"] for p in products.json()}
    assert products.status_code == 200 and int(products.headers["x-total-count"]) >= 5
    assert {"iphone_15", "pixel_8"} <= skus
    assert _stock(gateway, customer, "iphone_15") > 0


def test_the_reference_product_body_gets_a_sku_and_appears_in_inventory(
    gateway: httpx.Client, admin: str
) -> None:
    """The reference's own request has no skuCode: one is derived from the name, and the
    inventory learns of the product (through its event) with no stock yet."""
    name = f"Reference Widget {uuid.uuid4().hex[:6]}"
    created = gateway.post(
        "/api/product",
        headers=_bearer(admin),
        json={"name": name, "description": "as in the reference", "price": 1200},
    )
    assert created.status_code == 201, created.text
    sku = created.json()["skuCode"]
    assert sku == name.lower().replace(" ", "_")

    def listed() -> list[dict[str, Any]]:
        found, offset, total = [], 0, 1
        while offset < total:
            page = gateway.get(
                "/api/inventory", params={"limit": 100, "offset": offset}, headers=_bearer(admin)
            )
            assert page.status_code == 200, page.text
            total, offset = int(page.headers["x-total-count"]), offset + 100
            found += [level for level in page.json() if level["skuCode"] == sku]
        return found

    [level] = _eventually(listed)
    assert level["quantity"] == 0 and level["isInStock"] is False


def test_the_reference_flow_order_then_notification_then_cancel(
    gateway: httpx.Client, customer: str, new_product: Callable[..., dict[str, Any]]
) -> None:
    product = new_product(price="1299.00", stock=5)
    sku = product["skuCode"]
    placed = _order(gateway, customer, [{"skuCode": sku, "quantity": 2, "price": "0.01"}])
    assert placed.status_code == 201, placed.text
    order = placed.json()
    assert order["status"] == "PLACED"
    assert order["total"] == "2598.00", "priced from the catalogue, not from the client"
    assert order["lines"] == [
        {"skuCode": sku, "quantity": 2, "unitPrice": "1299.00", "lineTotal": "2598.00"}
    ]
    assert _stock(gateway, customer, sku) == 3

    number = order["orderNumber"]
    mine = gateway.get(f"/api/order/{number}", headers=_bearer(customer))
    assert mine.status_code == 200 and mine.json()["orderNumber"] == number

    def notified(kind: str) -> list[dict[str, Any]]:
        resp = gateway.get(
            "/api/notifications", params={"orderNumber": number}, headers=_bearer(customer)
        )
        assert resp.status_code == 200
        return [n for n in resp.json() if n["type"] == kind]

    [placed_note] = _eventually(lambda: notified("ORDER_PLACED"))
    assert placed_note["orderNumber"] == number

    cancelled = gateway.post(f"/api/order/{number}/cancel", headers=_bearer(customer))
    again = gateway.post(f"/api/order/{number}/cancel", headers=_bearer(customer))
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "CANCELLED"
    assert again.status_code == 409 and again.headers["content-type"] == PROBLEM_JSON
    assert _stock(gateway, customer, sku) == 5
    _eventually(lambda: notified("ORDER_CANCELLED"))
    time.sleep(0.5)
    assert len(notified("ORDER_PLACED")) == 1, "exactly one notification per event"


def test_someone_elses_order_is_not_found(
    gateway: httpx.Client, customer: str, new_product: Callable[..., dict[str, Any]]
) -> None:
    product = new_product()
    order = _order(gateway, customer, [{"skuCode": product["skuCode"], "quantity": 1}]).json()
    stranger_email = f"stranger-{uuid.uuid4().hex[:8]}@example.com"
    gateway.post(
        "/auth/register", json={"name": "S", "email": stranger_email, "password": "not-yours-1"}
    )
    stranger = _token(gateway, stranger_email, "not-yours-1")
    peek = gateway.get(f"/api/order/{order['orderNumber']}", headers=_bearer(stranger))
    cancel = gateway.post(f"/api/order/{order['orderNumber']}/cancel", headers=_bearer(stranger))
    assert peek.status_code == 404 and cancel.status_code == 404
    assert gateway.get("/api/order", headers=_bearer(stranger)).json() == []


def test_concurrent_orders_on_the_last_units_never_oversell(
    system: System, customer: str, new_product: Callable[..., dict[str, Any]]
) -> None:
    product = new_product(stock=5)
    sku = product["skuCode"]

    async def storm() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=system.gateway, timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/api/order",
                        headers=_bearer(customer),
                        json={"orderLineItemDtoList": [{"skuCode": sku, "quantity": 1}]},
                    )
                    for _ in range(20)
                )
            )

    answers = asyncio.run(storm())
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [201] * 5 + [409] * 15, statuses
    short = next(r for r in answers if r.status_code == 409).json()
    assert short["shortages"] == [{"skuCode": sku, "requested": 1, "available": 0}]
    with httpx.Client(base_url=system.gateway) as gateway:
        assert _stock(gateway, customer, sku) == 0


def test_out_of_stock_names_each_short_line(
    gateway: httpx.Client, customer: str, new_product: Callable[..., dict[str, Any]]
) -> None:
    plenty, scarce = new_product(stock=10), new_product(stock=1)
    resp = _order(
        gateway,
        customer,
        [
            {"skuCode": plenty["skuCode"], "quantity": 2},
            {"skuCode": scarce["skuCode"], "quantity": 3},
        ],
    )
    assert resp.status_code == 409 and resp.headers["content-type"] == PROBLEM_JSON
    assert resp.json()["shortages"] == [
        {"skuCode": scarce["skuCode"], "requested": 3, "available": 1}
    ]
    assert _stock(gateway, customer, plenty["skuCode"]) == 10, "all lines or none"


def test_idempotency_key_replays_the_first_answer(
    gateway: httpx.Client, customer: str, new_product: Callable[..., dict[str, Any]]
) -> None:
    sku = new_product(stock=10)["skuCode"]
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = _order(gateway, customer, [{"skuCode": sku, "quantity": 1}], headers=key)
    second = _order(gateway, customer, [{"skuCode": sku, "quantity": 1}], headers=key)
    other = _order(gateway, customer, [{"skuCode": sku, "quantity": 2}], headers=key)
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    assert other.status_code == 409
    assert _stock(gateway, customer, sku) == 9
    orders = gateway.get("/api/order", headers=_bearer(customer)).json()
    assert [o["orderNumber"] for o in orders].count(first.json()["orderNumber"]) == 1


@pytest.mark.parametrize(
    "body",
    [
        {"orderLineItemDtoList": []},
        {"orderLineItemDtoList": [{"skuCode": "no_such_sku_anywhere", "quantity": 1}]},
        {"orderLineItemDtoList": [{"skuCode": "iphone_15", "quantity": 0}]},
        {"orderLineItemDtoList": [{"skuCode": "iphone_15", "quantity": -3}]},
        {"orderLineItemDtoList": [{"skuCode": "iphone_15", "quantity": 1}] * 2},
        {"items": "not a list"},
        {},
    ],
    ids=["empty", "unknown-sku", "zero", "negative", "duplicate-lines", "wrong-type", "missing"],
)
def test_bad_orders_are_422_and_change_nothing(
    gateway: httpx.Client, customer: str, body: dict[str, Any]
) -> None:
    before = _stock(gateway, customer, "iphone_15")
    resp = gateway.post("/api/order", headers=_bearer(customer), json=body)
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"] == PROBLEM_JSON and resp.json()["errors"]
    assert _stock(gateway, customer, "iphone_15") == before
    assert gateway.get("/api/order", headers=_bearer(customer)).json() == []


class InventoryProcess:
    """Every real inventory process, frozen (there, but answering nothing) and thawed."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.frozen = False

    def freeze(self) -> None:
        for pid in self.pids:
            os.kill(pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            for pid in self.pids:
                os.kill(pid, signal.SIGCONT)
            self.frozen = False


@pytest.fixture
def inventory_process(system: System) -> Iterator[InventoryProcess]:
    pids = system.pids("inventory")
    assert len(pids) == (2 if system.profile == "production" else 1), system.output()[-3000:]
    process = InventoryProcess(pids)
    try:
        yield process
    finally:
        process.thaw()


def test_the_breaker_fails_fast_while_inventory_is_down_and_recovers(
    system: System,
    gateway: httpx.Client,
    customer: str,
    new_product: Callable[..., dict[str, Any]],
    inventory_process: InventoryProcess,
) -> None:
    sku = new_product(stock=10)["skuCode"]
    line = [{"skuCode": sku, "quantity": 1}]
    inventory_process.freeze()
    for _ in range(10):
        started = time.monotonic()
        resp = _order(gateway, customer, line)
        elapsed = time.monotonic() - started
        assert resp.status_code == 503, resp.text
        assert resp.headers["content-type"] == PROBLEM_JSON and "retry-after" in resp.headers
        if elapsed < 0.1:
            break
    else:
        pytest.fail("the breaker never opened: every 503 waited for the timeout")
    # Each order instance has a breaker of its own (two on the production profile), and the
    # gateway spreads orders over them: the next ones are refused too, and fast again as soon
    # as they reach an instance whose breaker is open.
    fast = 0
    for _ in range(2 * len(system.pids("order"))):
        started = time.monotonic()
        resp = _order(gateway, customer, line)
        assert resp.status_code == 503 and "retry-after" in resp.headers, resp.text
        fast += time.monotonic() - started < 0.1
    assert fast >= 1, "no order was refused at once after the breaker had opened"

    inventory_process.thaw()
    # Recovered once every order instance (each has its own breaker) has placed an order in
    # a row, so the tests after this one meet a healthy system.
    in_a_row = len(system.pids("order"))
    placed_now: list[httpx.Response] = []
    streak = 0

    def every_instance_recovered() -> bool:
        nonlocal streak
        answer = _order(gateway, customer, line)
        if answer.status_code == 201:
            placed_now.append(answer)
            streak += 1
        else:
            streak = 0
        return streak >= in_a_row

    _eventually(every_instance_recovered, within_s=30)
    assert all(r.json()["status"] == "PLACED" for r in placed_now)
    assert all(Decimal(r.json()["total"]) > 0 for r in placed_now)
    # Reservations that timed out may have landed once inventory woke: the order service
    # releases them, so in the end only the placed orders hold stock.
    _eventually(lambda: _stock(gateway, customer, sku) == 10 - len(placed_now), within_s=30)
    placed = gateway.get("/api/order", headers=_bearer(customer)).json()
    assert [o["status"] for o in placed] == ["PLACED"] * len(placed_now)


@pytest.mark.parametrize("system", ["production"], indirect=True)
def test_every_instance_takes_its_share_and_each_order_is_notified_once(
    system: System, customer: str, new_product: Callable[..., dict[str, Any]]
) -> None:
    """Production runs two of order, inventory and notification: calls are spread over the
    instances, the consumer group shares the topic, and no notification is sent twice."""
    sku = new_product(stock=50)["skuCode"]
    with httpx.Client(base_url=system.gateway, timeout=10.0) as gateway:
        numbers = []
        for _ in range(12):
            placed = _order(gateway, customer, [{"skuCode": sku, "quantity": 1}])
            assert placed.status_code == 201, placed.text
            numbers.append(placed.json()["orderNumber"])

        def all_notified() -> bool:
            notes = gateway.get("/api/notifications", headers=_bearer(customer)).json()
            return {n["orderNumber"] for n in notes} >= set(numbers)

        _eventually(all_notified, within_s=30)
        time.sleep(0.5)  # a duplicate would be recorded by now
        notes = gateway.get("/api/notifications", headers=_bearer(customer)).json()
    placed_notes = [n["orderNumber"] for n in notes if n["type"] == "ORDER_PLACED"]
    assert sorted(placed_notes) == sorted(numbers), "exactly one notification per order"
    output = system.output()
    mentioned = re.compile("|".join(numbers))

    def instances_mentioning_an_order(service: str) -> set[str]:
        lines = re.finditer(rf"^({service}-\d)\s+\|(.*)$", output, re.M)
        return {line.group(1) for line in lines if mentioned.search(line.group(2))}

    for number in numbers:
        assert len(re.findall(rf"^order-\d\s+\|.*order {number} placed", output, re.M)) == 1
    for service in ("order", "notification"):
        assert instances_mentioning_an_order(service) == {f"{service}-1", f"{service}-2"}
