"""The storefront (issue 12) in a real headless Chromium (Debian's, driven by Playwright),
on the real system `shop up` starts: every page is served by web-service through the
gateway, and every click goes to the public API. Only the system's own origin is reachable:
a request anywhere else fails the test.

A new customer signs up, finds products by search, buys two, sees the order and its
notification, cancels it and sees the stock back; a double click on "place order" makes one
order; a frozen inventory shows "retrying" and the retry with the same Idempotency-Key
makes one order; out of stock names the short line; the admin creates a product without a
SKU and stocks it; browsing works without JavaScript and at phone width.

Screenshots of each page go to ``.artifacts/screenshots/storefront/`` (docs/storefront.md).
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.e2e.browser import SCREENSHOTS as BROWSER_SCREENSHOTS
from tests.e2e.browser import chromium, home_tab
from tests.shop_system import System

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

# One system (the embedded profile) and one browser for the whole module: the production
# topology serves the same pages through the same gateway (docs/storefront.md).
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.parametrize("system", ["embedded"], indirect=True),
]

SCREENSHOTS = BROWSER_SCREENSHOTS / "storefront"
PASSWORD = "correct horse battery"
# A phone held upright (an iPhone 12's CSS pixels).
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as browser:
        yield browser


@pytest.fixture
def page(browser: Browser, system: System) -> Iterator[Page]:
    with home_tab(browser, system.gateway) as tab:
        yield tab


@dataclass(frozen=True)
class Stocked:
    """Products of this module's own, so no other test's orders move their stock."""

    tag: str  # a word only these products' names carry: what the shopper searches for
    lamp: dict[str, str]
    mug: dict[str, str]
    rare: dict[str, str]  # one unit in stock


def _admin_headers(gateway: httpx.Client, system: System) -> dict[str, str]:
    login = gateway.get("/auth/getToken", auth=("admin@example.com", system.admin_password))
    assert login.status_code == 200, login.text
    return {"Authorization": f"Bearer {login.json()['access_token']}"}


@pytest.fixture(scope="module")
def stocked(system: System) -> Stocked:
    tag = f"zq{uuid.uuid4().hex[:6]}"
    made: dict[str, dict[str, str]] = {}
    with httpx.Client(base_url=system.gateway, timeout=10.0) as gateway:
        admin = _admin_headers(gateway, system)
        for key, name, price, units in (
            ("lamp", "Desk lamp", "24.50", 40),
            ("mug", "Enamel mug", "8.25", 40),
            ("rare", "Signed print", "120.00", 1),
        ):
            body = {"name": f"{name} {tag}", "description": f"A {name.lower()}.", "price": price}
            created = gateway.post(
                "/api/product", headers=admin, json={**body, "category": f"home-{tag}"}
            )
            assert created.status_code == 201, created.text
            product = created.json()
            stock = gateway.put(
                f"/api/inventory/{product['skuCode']}", headers=admin, json={"quantity": units}
            )
            assert stock.status_code == 200, stock.text
            made[key] = product
    return Stocked(tag=tag, **made)


def _screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def _customer(system: System) -> str:
    email = f"shopper-{uuid.uuid4().hex[:10]}@example.com"
    with httpx.Client(base_url=system.gateway, timeout=10.0) as gateway:
        created = gateway.post(
            "/auth/register", json={"name": "Grace", "email": email, "password": PASSWORD}
        )
    assert created.status_code == 201, created.text
    return email


def _log_in(page: Page, system: System, email: str, password: str = PASSWORD) -> None:
    page.goto(f"{system.gateway}/shop/login")
    page.get_by_label("E-mail").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.locator("#who").filter(has_text=re.compile(".+")).wait_for()


def _orders_of(system: System, email: str) -> list[dict[str, object]]:
    with httpx.Client(base_url=system.gateway, timeout=10.0) as gateway:
        token = gateway.post("/auth/token", json={"email": email, "password": PASSWORD})
        answer = gateway.get(
            "/api/order", headers={"Authorization": f"Bearer {token.json()['access_token']}"}
        )
    assert answer.status_code == 200, answer.text
    orders: list[dict[str, object]] = answer.json()
    return orders


def _stock_shown(page: Page, system: System, product: dict[str, str]) -> str:
    page.goto(f"{system.gateway}/shop/product/{product['id']}")
    stock = page.locator(".product-page .stock[data-level]")
    stock.wait_for()
    return stock.inner_text()


def _add_from_product_page(page: Page, system: System, product: dict[str, str], n: int) -> None:
    page.goto(f"{system.gateway}/shop/product/{product['id']}")
    page.get_by_label("Quantity").fill(str(n))
    page.get_by_role("button", name="Add to cart").click()
    page.locator("#flash").filter(has_text="added to your cart").wait_for()


def test_a_new_customer_buys_two_products_and_cancels(
    page: Page, system: System, stocked: Stocked
) -> None:
    page.goto(f"{system.gateway}/")
    page.locator("#products .product").first.wait_for()
    _screenshot(page, "catalogue")

    page.get_by_role("link", name="Sign up").click()
    email = f"newcomer-{uuid.uuid4().hex[:10]}@example.com"
    page.get_by_label("Name").fill("Ada")
    page.get_by_label("E-mail").fill(email)
    page.get_by_label("Password").fill("short")
    page.get_by_role("button", name="Create account").click()
    # 422 from the API: the message sits next to its field.
    page.locator("#password-error").filter(has_text="8").wait_for()
    assert page.get_attribute("#password", "aria-invalid") == "true"
    _screenshot(page, "signup-invalid")
    page.get_by_label("Password (8 characters or more)").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    page.locator("#who").filter(has_text="Ada").wait_for()
    assert "token" not in page.url and "access" not in page.url

    # Search, then the product page, where a signed-in shopper sees the stock.
    page.get_by_role("searchbox", name="Search products").fill(stocked.tag)
    page.get_by_role("button", name="Search", exact=True).click()
    page.locator("#result-summary").filter(has_text="of 3 products").wait_for()
    _screenshot(page, "search")
    page.get_by_role("link", name=stocked.lamp["name"]).click()
    page.locator(".product-page .stock[data-level='in']").filter(has_text="40").wait_for()
    page.get_by_label("Quantity").fill("2")
    page.get_by_role("button", name="Add to cart").click()
    page.locator("#flash").filter(has_text="added to your cart").wait_for()
    _screenshot(page, "product")
    page.go_back()
    page.get_by_role("button", name=f"Add {stocked.mug['name']} to cart").click()
    assert page.inner_text("#cart-count") == "3"

    # The cart survives a reload; its total is computed in cents: 2 × 24.50 + 8.25.
    page.get_by_role("link", name=re.compile("^Cart")).click()
    page.reload()
    page.locator("#cart-total").filter(has_text="57.25").wait_for()
    assert page.locator("#cart tbody tr").count() == 2
    _screenshot(page, "cart")

    page.get_by_role("link", name="Go to checkout").click()
    page.get_by_role("button", name="Place order").click()
    placed = page.locator("#order-placed")
    placed.wait_for()
    _screenshot(page, "checkout-placed")
    number = re.search(r"Order ([0-9a-f-]{36}) placed", placed.inner_text())
    assert number, placed.inner_text()
    order_number = number.group(1)
    assert "57.25" in placed.inner_text()
    assert page.inner_text("#cart-count") == "0"
    assert _stock_shown(page, system, stocked.lamp) == "In stock (38)"

    page.goto(f"{system.gateway}/shop/orders")
    card = page.locator(f"section.order[data-order='{order_number}']")
    card.locator(".badge", has_text="PLACED").wait_for()
    _screenshot(page, "orders")

    page.goto(f"{system.gateway}/shop/notifications")
    # Sent a moment after the order (the outbox relay, then the consumer): the page polls.
    page.locator(f"tr[data-order='{order_number}'][data-type='ORDER_PLACED']").wait_for(
        timeout=30_000
    )
    _screenshot(page, "notifications")

    page.goto(f"{system.gateway}/shop/orders")
    card.get_by_role("button", name="Cancel order").click()
    card.locator(".badge", has_text="CANCELLED").wait_for()
    _screenshot(page, "orders-cancelled")
    # Its stock is back: the inventory released the reservation (at once, or moments later
    # if the inventory was busy: the page is looked at again until then).
    deadline = time.monotonic() + 15
    while (shown := _stock_shown(page, system, stocked.lamp)) != "In stock (40)":
        assert time.monotonic() < deadline, shown

    page.get_by_role("button", name="Log out").click()
    page.get_by_role("link", name="Log in").wait_for()
    assert page.evaluate("sessionStorage.getItem('shop.session')") is None


def test_a_double_click_on_place_order_makes_one_order(
    page: Page, system: System, stocked: Stocked
) -> None:
    email = _customer(system)
    _log_in(page, system, email)
    _add_from_product_page(page, system, stocked.mug, 1)
    keys: list[str | None] = []
    page.on(
        "request",
        lambda r: (
            keys.append(r.headers.get("idempotency-key"))
            if r.method == "POST" and r.url.endswith("/api/order")
            else None
        ),
    )
    page.goto(f"{system.gateway}/shop/checkout")
    page.get_by_role("button", name="Place order").dblclick()
    page.locator("#order-placed").wait_for()
    assert len(_orders_of(system, email)) == 1
    assert keys and all(k and k == keys[0] for k in keys), keys


def test_a_frozen_inventory_is_retried_with_the_same_key(
    page: Page, system: System, stocked: Stocked
) -> None:
    """SIGSTOP on every inventory process: the order service times out and answers 503 with
    Retry-After; the page says so, counts down and retries by itself with the same key; once
    the inventory is thawed the order is placed, once."""
    email = _customer(system)
    _log_in(page, system, email)
    _add_from_product_page(page, system, stocked.lamp, 1)
    keys: list[str | None] = []
    page.on(
        "request",
        lambda r: (
            keys.append(r.headers.get("idempotency-key"))
            if r.method == "POST" and r.url.endswith("/api/order")
            else None
        ),
    )
    page.goto(f"{system.gateway}/shop/checkout")
    pids = _running(system.pids("inventory"))
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        page.get_by_role("button", name="Place order").click()
        page.locator("#checkout-status").filter(
            has_text=re.compile(r"Inventory unavailable, retrying in \d+ s")
        ).wait_for()
        _screenshot(page, "checkout-retrying")
    finally:
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    page.locator("#order-placed").wait_for(timeout=30_000)
    assert len(keys) >= 2 and all(k == keys[0] for k in keys), keys
    assert len(_orders_of(system, email)) == 1


def _running(pids: list[int]) -> list[int]:
    """The inventory processes still alive: one a test before this one stopped (and the
    launcher restarted) is in the log too."""
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.append(pid)
    return alive


def test_out_of_stock_names_the_short_line(page: Page, system: System, stocked: Stocked) -> None:
    email = _customer(system)
    _log_in(page, system, email)
    _add_from_product_page(page, system, stocked.rare, 3)
    _add_from_product_page(page, system, stocked.mug, 1)
    page.goto(f"{system.gateway}/shop/checkout")
    page.get_by_role("button", name="Place order").click()
    status = page.locator("#checkout-status")
    status.filter(has_text="Out of stock").wait_for()
    assert f"{stocked.rare['name']}: you asked for 3, 1 available" in status.inner_text()
    row = page.locator(f"#checkout tr[data-sku='{stocked.rare['skuCode']}'] .line-error")
    assert row.inner_text() == "Only 1 available; you asked for 3."
    assert (
        page.locator(f"#checkout tr[data-sku='{stocked.mug['skuCode']}'] .line-error").count() == 0
    )
    _screenshot(page, "checkout-out-of-stock")
    assert _orders_of(system, email) == []


def test_the_admin_creates_a_product_without_a_sku_and_stocks_it(
    page: Page, system: System
) -> None:
    name = f"Walnut tray {uuid.uuid4().hex[:6]}"
    _log_in(page, system, "admin@example.com", system.admin_password)
    page.get_by_role("link", name="Admin").click()
    form = page.locator("#product-form")
    form.wait_for()
    form.get_by_label("Name").fill(name)
    form.get_by_label("Description").fill("Oiled walnut, 30 cm.")
    form.get_by_label("Price").fill("12.345")
    form.get_by_role("button", name="Create product").click()
    # The catalogue's 422 for a third decimal, next to the price.
    page.locator("#product-price-error").filter(has_text=re.compile(".+")).wait_for()
    form.get_by_label("Price").fill("35.00")
    form.get_by_role("button", name="Create product").click()
    page.locator("#flash").filter(has_text=f"{name} saved").wait_for()
    sku = page.input_value("#stock-sku")
    assert sku, "the derived SKU is put in the stock form"
    page.get_by_label("Units in stock").fill("7")
    page.get_by_role("button", name="Set stock", exact=True).click()
    page.locator(f"#admin-products tr[data-sku='{sku}'] .stock-units", has_text="7").wait_for()
    _screenshot(page, "admin")

    with httpx.Client(base_url=system.gateway, timeout=10.0) as gateway:
        admin = _admin_headers(gateway, system)
        found = gateway.get("/api/product", params={"q": name}).json()
        stock = gateway.get("/api/inventory", params={"skuCode": sku}, headers=admin).json()
    assert [(p["name"], p["skuCode"], p["price"]) for p in found] == [(name, sku, "35.00")]
    assert stock == [{"skuCode": sku, "quantity": 7, "isInStock": True}]


def test_a_customer_is_refused_the_admin_page(page: Page, system: System) -> None:
    _log_in(page, system, _customer(system))
    page.goto(f"{system.gateway}/shop/admin")
    page.locator("#admin-gate").filter(has_text="for the shop's admins").wait_for()
    assert page.is_hidden("#admin")


def test_browsing_works_without_javascript_at_phone_width(
    browser: Browser, system: System, stocked: Stocked
) -> None:
    with home_tab(browser, system.gateway, java_script_enabled=False, viewport=PHONE) as tab:
        tab.goto(f"{system.gateway}/")
        tab.get_by_label("Category").select_option(f"home-{stocked.tag}")
        tab.get_by_role("button", name="Apply").click()
        # A plain GET form: the next page, loaded with its stylesheet.
        tab.wait_for_url(re.compile(f"category=home-{stocked.tag}"))
        assert tab.locator("#products .product").count() == 3
        # The cart needs the script: without it no button pretends otherwise.
        assert tab.locator(".add-to-cart").first.is_hidden()
        _screenshot(tab, "catalogue-phone-no-js")
        tab.get_by_role("link", name=stocked.mug["name"]).click()
        tab.wait_for_url(re.compile(f"/shop/product/{stocked.mug['id']}$"))
        assert tab.inner_text(".product-page .price") == "8.25"
        assert tab.inner_text(".product-page h1") == stocked.mug["name"]
        # Nothing wider than the phone: no sideways scrolling.
        assert tab.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        _screenshot(tab, "product-phone-no-js")


def test_the_access_token_is_refreshed_before_it_expires(page: Page, system: System) -> None:
    _log_in(page, system, _customer(system))
    before = page.evaluate("JSON.parse(sessionStorage.getItem('shop.session'))")
    # As if the 15 minutes were nearly over: the next call refreshes first.
    page.evaluate(
        """() => {
            const held = JSON.parse(sessionStorage.getItem('shop.session'));
            held.expiresAt = Date.now() + 5000;
            sessionStorage.setItem('shop.session', JSON.stringify(held));
        }"""
    )
    page.goto(f"{system.gateway}/shop/orders")
    page.locator("#orders").filter(has_text="No orders yet").wait_for()
    after = page.evaluate("JSON.parse(sessionStorage.getItem('shop.session'))")
    assert after["refresh"] != before["refresh"]
    assert after["expiresAt"] > before["expiresAt"] - 1000
    # The spent refresh token is refused by auth: the page used the new pair.
    with httpx.Client(base_url=system.gateway, timeout=10.0) as gateway:
        spent = gateway.post("/auth/refresh", json={"refresh_token": before["refresh"]})
    assert spent.status_code == 401


def test_pages_are_problem_json_for_clients_that_are_not_browsers(system: System) -> None:
    with httpx.Client(base_url=system.gateway, timeout=10.0) as gateway:
        bad = gateway.get("/", params={"page": "0"})
        missing = gateway.get("/shop/product/" + "0" * 24)
        html = gateway.get("/", params={"page": "0"}, headers={"Accept": "text/html"})
        home = gateway.get("/")
    assert bad.status_code == 422
    assert bad.headers["content-type"] == "application/problem+json"
    assert bad.json()["errors"] == {"page": "must be a whole number from 1 to 10000"}
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert html.status_code == 422 and "whole number" in html.text
    policy = home.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy


def test_shop_up_leads_with_the_storefront(system: System) -> None:
    summary = system.output().split("Shop is up in", 1)[1].splitlines()
    assert summary[1].split() == ["storefront", f"{system.gateway}/"]
    assert summary[2].split() == ["gateway", system.gateway]
