"""In a real headless Chromium (Debian's, driven by Playwright): the gateway's /docs and
/redoc render with every request kept to the system's own origin, and the operations
console shows every service UP to an admin, and a new order among the recent orders with a
link to its trace, and refuses anyone else; with the inventory frozen it shows the order
service's breaker open, and closed again once it is thawed.

Screenshots of what the browser saw go to ``.artifacts/screenshots/`` (docs/console.md).
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.e2e.browser import SCREENSHOTS, chromium, home_tab
from tests.shop_system import System

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = pytest.mark.e2e

# Started by `shop up`: the console must show each of them, every instance UP.
SERVICES = (
    "api-gateway",
    "auth-service",
    "product-service",
    "inventory-service",
    "order-service",
    "notification-service",
)
PROBLEM_JSON = "application/problem+json"
# The trace UI the e2e system's gateway links to (GATEWAY_TRACE_URL_TEMPLATE, conftest.py).
TRACE_UI = "http://127.0.0.1:9411/zipkin/traces/{traceId}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as browser:
        yield browser


@pytest.fixture
def page(browser: Browser, system: System) -> Iterator[Page]:
    with home_tab(browser, system.gateway) as tab:
        yield tab


def _screenshot(page: Page, name: str, system: System) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}-{system.profile}.png"), full_page=True)


def _customer(system: System) -> tuple[str, str]:
    email = f"console-{uuid.uuid4().hex[:10]}@example.com"
    with httpx.Client(base_url=system.gateway, timeout=10.0) as gateway:
        created = gateway.post(
            "/auth/register", json={"name": "Ada", "email": email, "password": "engine-1843"}
        )
    assert created.status_code == 201, created.text
    return email, "engine-1843"


def _log_in(page: Page, system: System, email: str, password: str) -> None:
    page.goto(f"{system.gateway}/console")
    page.fill("#email", email)
    page.fill("#password", password)
    page.click("#login-form button[type=submit]")


def test_swagger_ui_lists_every_operation_offline(page: Page, system: System) -> None:
    page.goto(f"{system.gateway}/docs")
    operations = page.locator(".opblock")
    operations.first.wait_for()
    with httpx.Client(base_url=system.gateway, timeout=10.0) as gateway:
        document = gateway.get("/openapi.json").json()
    expected = sum(
        1
        for item in document["paths"].values()
        for method in item
        if method in {"get", "put", "post", "delete", "patch", "head", "options"}
    )
    assert operations.count() == expected > 5
    assert page.locator(".opblock-summary-path", has_text="/api/order").count() >= 1
    _screenshot(page, "docs", system)


def test_redoc_renders_offline(page: Page, system: System) -> None:
    page.goto(f"{system.gateway}/redoc")
    page.locator("[data-section-id*='operation/']").first.wait_for()
    _screenshot(page, "redoc", system)


def test_the_console_shows_every_service_up_to_an_admin(page: Page, system: System) -> None:
    # An order placed in a trace of the test's own: the console lists it, linked to that trace.
    trace_id = secrets.token_hex(16)
    email, password = _customer(system)
    with httpx.Client(base_url=system.gateway, timeout=10.0) as gateway:
        sku = _new_sku(gateway, _token(gateway, "admin@example.com", system.admin_password))
        placed = gateway.post(
            "/api/order",
            headers={
                "Authorization": f"Bearer {_token(gateway, email, password)}",
                "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01",
            },
            json={"orderLineItemDtoList": [{"skuCode": sku, "quantity": 2}]},
        )
    assert placed.status_code == 201, placed.text
    order_number = placed.json()["orderNumber"]
    _log_in(page, system, "admin@example.com", system.admin_password)
    for service in SERVICES:
        page.locator(f"#services tr[data-service='{service}']").first.wait_for()
    # Live: the rows settle on UP within a few polls (an instance may still be starting).
    page.wait_for_function(
        """(services) => {
            const rows = [...document.querySelectorAll("#services tr")];
            return services.every((s) => rows.some((r) => r.dataset.service === s))
                && rows.length > 0
                && rows.every((r) => [...r.querySelectorAll(".status")]
                    .every((c) => c.textContent === "UP"));
        }""",
        arg=list(SERVICES),
        timeout=20_000,
    )
    assert page.text_content("#registry-status") == "UP"
    # The token is kept in this tab's sessionStorage, never in the address.
    assert "token" not in page.url and page.evaluate("sessionStorage.length") == 1
    order = page.locator(f"#recent-orders tr[data-order='{order_number}']")
    order.wait_for()
    assert "PLACED" in order.inner_text() and "19.98" in order.inner_text()
    # The row comes whole: its trace cell is there with it, a link given a trace UI.
    assert order.locator("td.trace [data-trace-id]").get_attribute("data-trace-id") == trace_id
    link = order.locator("td.trace a")
    assert link.count() == 1, "the e2e gateway needs GATEWAY_TRACE_URL_TEMPLATE = TRACE_UI"
    assert link.get_attribute("href") == TRACE_UI.replace("{traceId}", trace_id)
    assert link.get_attribute("rel") == "noopener noreferrer"
    first_update = page.text_content("#updated")
    page.wait_for_function(
        "(before) => document.getElementById('updated').textContent !== before",
        arg=first_update,
        timeout=10_000,
    )
    _screenshot(page, "console", system)


def test_the_console_refuses_a_customer(page: Page, system: System) -> None:
    email, password = _customer(system)
    _log_in(page, system, email, password)
    refusal = page.locator("#login-error")
    refusal.filter(has_text="admins only").wait_for()
    assert page.is_hidden("#overview")
    assert page.evaluate("sessionStorage.length") == 0
    _screenshot(page, "console-refused", system)


def test_the_console_api_is_admin_only(system: System) -> None:
    email, password = _customer(system)
    with httpx.Client(base_url=system.gateway, timeout=10.0) as gateway:
        anonymous = gateway.get("/console/api/services")
        token = gateway.post("/auth/token", json={"email": email, "password": password})
        customer = gateway.get(
            "/console/api/services",
            headers={"Authorization": f"Bearer {token.json()['access_token']}"},
        )
    assert anonymous.status_code == 401
    assert anonymous.headers["content-type"] == PROBLEM_JSON
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    assert customer.status_code == 403
    assert customer.headers["content-type"] == PROBLEM_JSON


def test_the_console_page_allows_only_its_own_origin(system: System) -> None:
    with httpx.Client(base_url=system.gateway, timeout=10.0) as gateway:
        console = gateway.get("/console")
    assert console.status_code == 200
    policy = console.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy


def _token(gateway: httpx.Client, email: str, password: str) -> str:
    resp = gateway.post("/auth/token", json={"email": email, "password": password})
    assert resp.status_code == 200, resp.text
    token: str = resp.json()["access_token"]
    return token


def _new_sku(gateway: httpx.Client, admin: str) -> str:
    """A product of its own with plenty of stock: the buyer below may place hundreds."""
    sku = f"sku_{uuid.uuid4().hex[:10]}"
    bearer = {"Authorization": f"Bearer {admin}"}
    product = {"name": f"Widget {sku}", "description": "A thing", "price": "9.99"}
    created = gateway.post(
        "/api/product", headers=bearer, json={**product, "skuCode": sku, "category": "widgets"}
    )
    assert created.status_code == 201, created.text
    stocked = gateway.post(
        "/api/inventory", headers=bearer, json={"skuCode": sku, "quantity": 1000}
    )
    assert stocked.status_code == 200, stocked.text
    return sku


class Buyer(threading.Thread):
    """Places one order every ``PACE_S`` until stopped, keeping each answer's status: the
    orders that fail while the inventory is frozen, and the ones whose half-open probe closes
    the breaker again. Paced well under the gateway's rate limits (the console's polls share
    this client address)."""

    PACE_S = 0.1

    def __init__(self, system: System, token: str, sku: str) -> None:
        super().__init__(daemon=True)
        self._gateway = system.gateway
        self._headers = {"Authorization": f"Bearer {token}"}
        self._body = {"orderLineItemDtoList": [{"skuCode": sku, "quantity": 1}]}
        self._enough = threading.Event()
        self.statuses: list[int] = []

    def run(self) -> None:
        with httpx.Client(base_url=self._gateway, timeout=10.0) as gateway:
            while not self._enough.wait(self.PACE_S):
                answer = gateway.post("/api/order", headers=self._headers, json=self._body)
                self.statuses.append(answer.status_code)

    def stop(self) -> None:
        self._enough.set()
        self.join(timeout=15)


# Every order-service row of the table: its breaker's state, health, reason and orders/s.
_ORDER_ROWS = """[...document.querySelectorAll("#services tr[data-service='order-service']")]
    .map((row) => ({
        breaker: row.querySelector(".breaker-state[data-peer='inventory-service']")
            ?.dataset.state,
        health: row.querySelector(".health .status")?.textContent,
        reason: row.querySelector(".reasons li[data-check='breaker:inventory-service']")
            ?.textContent ?? "",
        outbox: row.querySelector("td.outbox")?.textContent,
        rate: Number.parseFloat(row.querySelector("td.rate")?.textContent),
    }))"""


def _until_order_rows(page: Page, condition: str, timeout_ms: int) -> None:
    """Wait on the page until ``condition`` (a JavaScript expression over ``rows``, the order
    instances' rows as above) holds, with at least one order row shown."""
    page.wait_for_function(
        f"() => {{ const rows = {_ORDER_ROWS}; return rows.length > 0 && ({condition}); }}",
        timeout=timeout_ms,
    )


_ALL_CLOSED = "rows.every((r) => r.breaker === 'closed' && r.health === 'UP')"


def test_the_console_shows_the_breaker_open_while_inventory_is_frozen(
    page: Page, system: System
) -> None:
    inventory = system.pids("inventory")
    assert inventory, system.output()[-3000:]
    email, password = _customer(system)
    with httpx.Client(base_url=system.gateway, timeout=10.0) as gateway:
        sku = _new_sku(gateway, _token(gateway, "admin@example.com", system.admin_password))
        buyer = Buyer(system, _token(gateway, email, password), sku)
    _log_in(page, system, "admin@example.com", system.admin_password)
    # Before: every order instance's breaker closed, healthy, nothing waiting in its outbox.
    _until_order_rows(page, f"{_ALL_CLOSED} && rows.every((r) => r.outbox === '0')", 20_000)
    for pid in inventory:
        os.kill(pid, signal.SIGSTOP)
    try:
        buyer.start()
        # The orders fail (timeouts, then the breaker's fast 503s): the console says so.
        _until_order_rows(
            page,
            "rows.some((r) => r.breaker === 'open' && r.health === 'DEGRADED'"
            " && r.reason.includes('open'))",
            20_000,
        )
        _screenshot(page, "console-breaker-open", system)
    finally:
        for pid in inventory:
            os.kill(pid, signal.SIGCONT)
    try:
        # The buyer's next order after the open window is the half-open probe: it succeeds
        # now, and the breaker closes (on every order instance: each has its own); the
        # orders it places then show as a rate.
        _until_order_rows(page, _ALL_CLOSED, 30_000)
        _until_order_rows(page, "rows.some((r) => r.rate > 0)", 15_000)
    finally:
        buyer.stop()
    assert 503 in buyer.statuses, buyer.statuses
    assert buyer.statuses[-1] == 201, buyer.statuses
    _screenshot(page, "console-breaker-closed", system)
