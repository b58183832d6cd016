"""The soak: a steady stream of orders for ``SHOP_CHAOS_SOAK_S`` seconds (a few in CI,
minutes under ``make chaos``), every process's memory sampled; memory stays flat, every
order is placed with its stock and notified once."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from bench.procs import pss_kib, rss_kib

from tests.chaos.conftest import SOAK_S
from tests.chaos.ledger import Ledger, notification_problems
from tests.chaos.load import Buyers, stock_new_product
from tests.chaos.shop import RELEASE_HOLD_S, ChaosShop

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

STOCK = 10_000_000
BUYERS = 4
PACE_S = 0.02  # each buyer's pause between orders: a steady load, not a flood
SAMPLE_S = max(0.5, SOAK_S / 60)
# Growth allowed per process between the soak's second quarter and its last quarter:
# allocator and cache noise, not a leak (a leak grows with the orders, and the longer soak
# of `make chaos` shows it).
GROWTH_MIB = 8.0
GROWTH_SHARE = 0.05
MIB = 1024.0

Sample = dict[str, tuple[float, float]]  # process -> (PSS, RSS) in MiB


def memory(shop: ChaosShop) -> Sample:
    out: Sample = {}
    for name, pids in shop.processes().items():
        out[name] = (sum(pss_kib(p) for p in pids) / MIB, sum(rss_kib(p) for p in pids) / MIB)
    return out


def growth(samples: list[Sample]) -> dict[str, tuple[float, float, float]]:
    """Per process: the most it used in the second quarter (warmed up), the least it used in
    the last quarter, and the growth in between (PSS, MiB)."""
    quarter = max(1, len(samples) // 4)
    warm, last = samples[quarter : 2 * quarter], samples[-quarter:]
    out: dict[str, tuple[float, float, float]] = {}
    for name in samples[-1]:
        early = max(s[name][0] for s in warm if name in s)
        late = min(s[name][0] for s in last if name in s)
        out[name] = (early, late, late - early)
    return out


async def test_a_steady_soak_keeps_memory_flat_and_the_books_balanced(
    shop: ChaosShop, gateway: httpx.AsyncClient, tokens: list[str], ledger: Ledger
) -> None:
    sku = await stock_new_product(gateway, shop.admin_password, units=STOCK)
    buyers = Buyers(gateway, tokens, sku, pace_s=PACE_S)
    burst = asyncio.create_task(buyers.run(BUYERS))
    samples: list[Sample] = []
    began = time.monotonic()
    try:
        while time.monotonic() - began < SOAK_S or len(samples) < 8:
            samples.append(await asyncio.to_thread(memory, shop))
            await asyncio.sleep(SAMPLE_S)  # the sampling period
    finally:
        buyers.stop()
        await burst
    took = time.monotonic() - began
    shop.assert_running()

    books = await ledger.settled_books(
        sku, stocked=STOCK, created=buyers.created, within_s=RELEASE_HOLD_S + 30
    )
    assert books.problems(buyers.created) == [], dict(buyers.statuses)
    placed, told = await ledger.settled_notifications([sku], within_s=120)
    assert notification_problems(placed, told, buyers.created) == []
    assert buyers.statuses[201] == sum(buyers.statuses.values()), dict(buyers.statuses)

    grew = growth(samples)
    print(
        f"soak {took:.0f} s: {len(buyers.created)} orders ({len(buyers.created) / took:.0f}/s),"
        f" {len(samples)} samples; PSS MiB warm -> end: "
        + ", ".join(f"{n} {a:.1f}->{b:.1f}" for n, (a, b, _) in sorted(grew.items()))
    )
    leaking = {
        name: f"{early:.1f} -> {late:.1f} MiB"
        for name, (early, late, grown) in grew.items()
        if grown > max(GROWTH_MIB, GROWTH_SHARE * early)
    }
    assert leaking == {}, leaking
