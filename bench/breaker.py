"""The breaker phase of ``make bench`` (issue 11, point 3): fast, honest failure.

Inventory is frozen with SIGSTOP (as a hung process looks to its callers: connections are
accepted, nothing is answered). Orders then wait for the order service's inventory timeout
until its breaker opens; from then on every order must be answered 503 with
``Retry-After`` at once. Measured: ``POST /api/order`` through the gateway at a modest
fixed rate (open loop, so a slow answer cannot slow the sending), each answer timed from
its first byte written to its last byte read, on kept-alive connections of a lean client
(raw asyncio streams: an aiohttp client would add its own milliseconds to the figure).
Then SIGCONT, and the time until an order is placed again.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from bench.loadgen import percentile

__all__ = ["BreakerResult", "run_breaker_phase"]


@dataclass(slots=True)
class BreakerResult:
    rate: float
    seconds: float
    sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    with_retry_after: int = 0  # 503s that carried Retry-After
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    opened_after_s: float = float("nan")  # SIGSTOP -> the first "circuit open" answer
    recovered_after_s: float = float("nan")  # SIGCONT -> the first 201
    created: int = 0  # 201s in this phase, recovery included
    notes: list[str] = field(default_factory=list)

    @property
    def share_503_retry_after(self) -> float:
        return self.with_retry_after / self.sent if self.sent else 0.0


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    retry_after: bool
    body: bytes


class _Client:
    """Kept-alive HTTP/1.1 connections to the gateway, one request at a time on each."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.netloc = parts.netloc
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    def order(self, token: str, sku: str) -> bytes:
        body = json.dumps({"orderLineItemDtoList": [{"skuCode": sku, "quantity": 1}]}).encode()
        head = (
            f"POST /api/order HTTP/1.1\r\nHost: {self.netloc}\r\n"
            f"Authorization: Bearer {token}\r\nIdempotency-Key: {uuid.uuid4().hex}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode("latin-1") + body

    async def send(self, request: bytes) -> tuple[_Answer, float]:
        """The answer and the seconds from writing the request to reading its last byte."""
        if self._idle:
            reader, writer = self._idle.pop()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        began = time.perf_counter()
        writer.write(request)
        try:
            answer = await _read(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return _Answer(0, False, b""), time.perf_counter() - began
        took = time.perf_counter() - began
        self._idle.append((reader, writer))
        return answer, took

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def _read(reader: asyncio.StreamReader) -> _Answer:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    retry_after = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"retry-after" and value.strip().isdigit():
            retry_after = True
    body = await reader.readexactly(length) if length else b""
    return _Answer(status, retry_after, body)


def _circuit_open(answer: _Answer) -> bool:
    return answer.status == 503 and b"circuit open" in answer.body


async def _until_open(
    client: _Client, tokens: Sequence[str], sku: str, *, timeout_s: float
) -> float:
    """Orders (a few at a time) until one is refused by the open breaker; seconds it took."""
    began = time.monotonic()
    n = 0
    while time.monotonic() - began < timeout_s:
        batch = [client.order(tokens[(n + i) % len(tokens)], sku) for i in range(8)]
        n += len(batch)
        answers = await asyncio.gather(*(client.send(r) for r in batch))
        if any(_circuit_open(answer) for answer, _ in answers):
            return time.monotonic() - began
    raise RuntimeError(f"the order service's breaker did not open within {timeout_s:g} s")


async def _until_placed(
    client: _Client, tokens: Sequence[str], sku: str, *, timeout_s: float
) -> tuple[float, int]:
    """Orders at 20/s until one is placed: seconds it took, and the 201s."""
    began = time.monotonic()
    n = 0
    while time.monotonic() - began < timeout_s:
        answer, _ = await client.send(client.order(tokens[n % len(tokens)], sku))
        n += 1
        if answer.status == 201:
            return time.monotonic() - began, 1
        await asyncio.sleep(0.05)
    return float("nan"), 0


async def run_breaker_phase(
    gateway: str,
    *,
    inventory_pid: int,
    tokens: Sequence[str],
    sku: str,
    rate: float,
    seconds: float,
) -> BreakerResult:
    result = BreakerResult(rate=rate, seconds=seconds)
    client = _Client(gateway)
    os.kill(inventory_pid, signal.SIGSTOP)
    try:
        result.opened_after_s = round(await _until_open(client, tokens, sku, timeout_s=60.0), 2)
        statuses: Counter[int] = Counter()
        latencies: list[int] = []
        retry_after = 0

        async def one(request: bytes) -> None:
            nonlocal retry_after
            answer, took = await client.send(request)
            statuses[answer.status] += 1
            latencies.append(int(took * 1e9))
            if answer.status == 503 and answer.retry_after:
                retry_after += 1

        total = int(rate * seconds)
        requests = [client.order(tokens[n % len(tokens)], sku) for n in range(total)]
        tasks = []
        began = time.monotonic()
        for n, request in enumerate(requests):
            delay = began + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(request)))
        await asyncio.gather(*tasks)
        result.sent = total
        result.statuses = dict(statuses)
        result.with_retry_after = retry_after
        samples = sorted(latencies)
        result.p50_ms = round(percentile(samples, 0.50), 2)
        result.p99_ms = round(percentile(samples, 0.99), 2)
        result.max_ms = round(samples[-1] / 1e6, 2) if samples else float("nan")
        result.created += statuses[201]
    finally:
        os.kill(inventory_pid, signal.SIGCONT)
    recovered, created = await _until_placed(client, tokens, sku, timeout_s=60.0)
    result.created += created
    result.recovered_after_s = round(recovered, 2)
    if created == 0:
        result.notes.append("no order placed within 60 s of SIGCONT")
    client.close()
    return result
