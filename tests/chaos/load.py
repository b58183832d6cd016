"""Concurrent buyers through the gateway, as clients would send orders: each order its own
Idempotency-Key; every answer counted; each 201's order number and units kept, since those
are the orders that must never be lost."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

__all__ = ["Buyers", "Customers", "bearer", "stock_new_product"]

PASSWORD = "chaos-monkey-1"
# A client's pause after a refusal, so a closed loop of buyers does not turn an open breaker
# into a busy loop that starves the processes under test of the machine's two cores.
PAUSE_AFTER_REFUSAL_S = 0.02


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def login(gateway: httpx.AsyncClient, email: str, password: str) -> str:
    answer = await gateway.post("/auth/token", json={"email": email, "password": password})
    assert answer.status_code == 200, answer.text
    token: str = answer.json()["access_token"]
    return token


@dataclass
class Customers:
    """Registered once per system; tokens renewed when a long run (``make chaos``) nears
    their 15 minutes."""

    emails: list[str]
    tokens: list[str] = field(default_factory=list)
    issued: float = 0.0

    @classmethod
    async def register(cls, gateway: httpx.AsyncClient, count: int) -> Customers:
        run = uuid.uuid4().hex[:8]
        emails = [f"chaos{n}-{run}@example.com" for n in range(count)]
        for n, email in enumerate(emails):
            body = {"name": f"Chaos {n}", "email": email, "password": PASSWORD}
            answer = await gateway.post("/auth/register", json=body)
            assert answer.status_code == 201, answer.text
        return cls(emails)

    async def fresh_tokens(self, gateway: httpx.AsyncClient) -> list[str]:
        if not self.tokens or time.monotonic() - self.issued > 600:
            self.tokens = [await login(gateway, email, PASSWORD) for email in self.emails]
            self.issued = time.monotonic()
        return self.tokens


async def stock_new_product(
    gateway: httpx.AsyncClient, admin_password: str, *, units: int, price: str = "9.99"
) -> str:
    """A product of its own for one test, ``units`` in stock: its SKU."""
    sku = f"chaos_{uuid.uuid4().hex[:10]}"
    admin = bearer(await login(gateway, "admin@example.com", admin_password))
    body = {"name": f"Chaos {sku}", "description": "chaos test", "price": price, "skuCode": sku}
    created = await gateway.post("/api/product", headers=admin, json=body)
    assert created.status_code == 201, created.text
    stocked = await gateway.post(
        "/api/inventory", headers=admin, json={"skuCode": sku, "quantity": units}
    )
    assert stocked.status_code == 200, stocked.text
    return sku


class Buyers:
    """Buyers of one SKU, ``concurrency`` orders in flight, until ``stop()`` (or, with
    ``until_sold_out``, until the inventory says none is left)."""

    def __init__(
        self,
        gateway: httpx.AsyncClient,
        tokens: Sequence[str],
        sku: str,
        *,
        quantities: Sequence[int] = (1,),
        until_sold_out: bool = False,
        pace_s: float = 0.0,
    ) -> None:
        self.gateway = gateway
        self.tokens = list(tokens)
        self.sku = sku
        self.quantities = list(quantities)
        self.until_sold_out = until_sold_out
        self.pace_s = pace_s
        self.statuses: Counter[int] = Counter()
        self.created: dict[str, int] = {}  # order number -> units, every 201
        self.sold_out = asyncio.Event()
        self.circuit_open = asyncio.Event()  # an order refused by the open breaker
        self._stop = asyncio.Event()
        self._sent = 0
        self._changed = asyncio.Event()

    @property
    def successes(self) -> int:
        return len(self.created)

    def stop(self) -> None:
        self._stop.set()

    async def place(self, token: str, quantity: int) -> httpx.Response | None:
        headers = {**bearer(token), "Idempotency-Key": uuid.uuid4().hex}
        body = {"orderLineItemDtoList": [{"skuCode": self.sku, "quantity": quantity}]}
        try:
            answer = await self.gateway.post("/api/order", headers=headers, json=body)
        except httpx.HTTPError:
            self.statuses[0] += 1  # no answer: the order may or may not exist
            return None
        self.statuses[answer.status_code] += 1
        if answer.status_code == 201:
            order = answer.json()
            self.created[order["orderNumber"]] = quantity
            self._changed.set()
        elif answer.status_code == 409 and self._none_left(answer):
            self.sold_out.set()
        elif answer.status_code == 503 and "circuit open" in answer.text:
            self.circuit_open.set()
        return answer

    def _none_left(self, answer: httpx.Response) -> bool:
        try:
            shortages = answer.json().get("shortages") or []
        except ValueError:
            return False
        return any(s.get("skuCode") == self.sku and s.get("available") == 0 for s in shortages)

    async def _buyer(self, index: int) -> None:
        while not self._stop.is_set():
            if self.until_sold_out and self.sold_out.is_set():
                return
            n = self._sent
            self._sent += 1
            token = self.tokens[(index + n) % len(self.tokens)]
            answer = await self.place(token, self.quantities[n % len(self.quantities)])
            if answer is None or answer.status_code != 201:
                await asyncio.sleep(max(self.pace_s, PAUSE_AFTER_REFUSAL_S))
            elif self.pace_s:
                await asyncio.sleep(self.pace_s)

    async def run(self, concurrency: int) -> None:
        await asyncio.gather(*(self._buyer(i) for i in range(concurrency)))

    async def reached(self, successes: int, *, within_s: float) -> None:
        """Until ``successes`` orders have been answered 201 in all (a chaos step's cue)."""
        try:
            async with asyncio.timeout(within_s):
                while self.successes < successes:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"only {self.successes} of {successes} orders placed within {within_s:g} s;"
                f" answers so far {dict(self.statuses)}"
            ) from None

    async def first_success_after(self, token: str, *, pace_s: float, within_s: float) -> float:
        """One order at a time, ``pace_s`` apart, until one is placed: seconds it took."""
        began = time.monotonic()
        while time.monotonic() - began < within_s:
            answer = await self.place(token, 1)
            if answer is not None and answer.status_code == 201:
                return time.monotonic() - began
            if answer is not None:
                assert answer.status_code == 503, answer.text
            await asyncio.sleep(pace_s)
        raise AssertionError(f"no order placed within {within_s:g} s: {dict(self.statuses)}")
